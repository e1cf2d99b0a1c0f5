//! `make bench-control`: the control plane with many VMs, on RocksDB and on etcd.
//!
//! An inventory of `BENCH_VMS` (default 10,000) VMs on `BENCH_HOSTS` (default 20)
//! hosts in two sites, served by fake daemons in this process: each host is a tiny
//! HTTP server answering the agent API the coordinator calls (health, VM show), one
//! more plays the storage node (export show). Nothing boots. The inventory is written
//! into the store before `coord serve` starts, in batches through the store
//! interface (what `vm create` would leave, without 10,000 fake creates - each of
//! which reads the whole inventory to place the VM).
//!
//! Measured, per store:
//! - `coord vm list --json` wall time (the CLI process, its HTTP call, the listing of
//!   every VM record from the store), `BENCH_LISTS` (default 10) runs; and the bare
//!   `GET /v1/vms` from a warm HTTP client.
//! - Concurrent migration starts: `BENCH_STARTS` (default 200) `POST /v1/migrations`
//!   at once (distinct VMs, per-host and per-site limits lifted), until every one is
//!   answered; starts per second and each start's latency. A start is accepted once
//!   the `planned` phase is journaled (with the VM's `migrating` mark, one
//!   transaction). The executors then call the fake source agent to begin the move,
//!   and the fake never answers that: the migrations stay at their first phase, so
//!   the figure is the coordinator's admission rate, not the agents'.
//!
//! etcd: a three-member cluster on loopback started here (the `etcd` binary; skipped
//! loudly when missing). `BENCH_STORES=rocksdb` or `etcd` runs one of the two.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use axum::Router;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use coordinator::model::{Disk, Host, Site, StorageNode, Vm, VmState};
use coordinator::store::etcd::{EtcdConfig, EtcdStore};
use coordinator::store::{Batch, Role, Store};
use serde_json::json;
use stagehand_common::secret::Secret;

const TOKEN: &str = "bench-control-token-0123456789abcdef";
/// Records per store transaction while seeding (etcd allows 128 operations).
const SEED_BATCH: usize = 100;

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One fake agent: the VMs it runs.
type AgentState = Arc<Mutex<HashSet<String>>>;

async fn health() -> impl IntoResponse {
    axum::Json(json!({"status": "ok"}))
}

async fn agent_vm(
    State(st): State<AgentState>,
    UrlPath(name): UrlPath<String>,
) -> impl IntoResponse {
    let runs = st.lock().map(|s| s.contains(&name)).unwrap_or(false);
    if runs {
        (
            StatusCode::OK,
            axum::Json(json!({"name": name, "state": "running"})),
        )
    } else {
        (
            StatusCode::NOT_FOUND,
            axum::Json(json!({"error": {"code": "vm_not_found", "message": name}})),
        )
    }
}

async fn storage_export(UrlPath(name): UrlPath<String>) -> impl IntoResponse {
    axum::Json(json!({"name": name, "size_bytes": 1 << 20, "lease": null}))
}

/// Anything else (the start of a move): never answered within the run.
async fn hang() -> impl IntoResponse {
    tokio::time::sleep(Duration::from_secs(3600)).await;
    StatusCode::SERVICE_UNAVAILABLE
}

async fn serve_fake(router: Router) -> Result<SocketAddr> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(l, router).await;
    });
    Ok(addr)
}

struct Fakes {
    hosts: Vec<(Host, AgentState)>,
    storage: StorageNode,
}

async fn start_fakes(n_hosts: usize) -> Result<Fakes> {
    let mut hosts = Vec::new();
    for i in 0..n_hosts {
        let st: AgentState = Arc::default();
        let router = Router::new()
            .route("/v1/health", get(health))
            .route("/v1/vms/{name}", get(agent_vm))
            .fallback(hang)
            .with_state(Arc::clone(&st));
        let addr = serve_fake(router).await?;
        let site = if i % 2 == 0 { "siteA" } else { "siteB" };
        hosts.push((
            Host {
                name: format!("kvm-{i}"),
                site: site.into(),
                api: format!("http://{addr}"),
                migration: "127.0.0.1:1".into(),
                memory_mib: 1 << 30,
                token: None,
                drained: None,
                report: None,
            },
            st,
        ));
    }
    let router = Router::new()
        .route("/v1/health", get(health))
        .route("/v1/exports/{name}", get(storage_export))
        .fallback(hang);
    let addr = serve_fake(router).await?;
    let storage = StorageNode {
        name: "nbd-1".into(),
        site: "siteA".into(),
        api: format!("http://{addr}"),
        nbd: "127.0.0.1:1".into(),
        reachable_from: vec!["siteB".into()],
        disk_dir: None,
        token: None,
    };
    Ok(Fakes { hosts, storage })
}

/// Writes sites, the storage node, the hosts and `n` VMs; returns the seconds taken.
fn seed(store: &Store, fakes: &Fakes, n: usize) -> Result<f64> {
    let t = Instant::now();
    let mut b = Batch::default();
    for s in ["siteA", "siteB"] {
        b.put("sites", s, &Site { name: s.into() })?;
    }
    b.put("storage", &fakes.storage.name, &fakes.storage)?;
    for (h, _) in &fakes.hosts {
        b.put("hosts", &h.name, h)?;
    }
    store.commit(b)?;
    let token = Secret::new("bench-lease-token-0123456789abcdef").context("token")?;
    let mut b = Batch::default();
    for i in 0..n {
        let (host, agent) = &fakes.hosts[i % fakes.hosts.len()];
        let name = format!("vm-{i:05}");
        agent
            .lock()
            .map_err(|_| anyhow::anyhow!("fake agent lock"))?
            .insert(name.clone());
        let vm = Vm {
            name: name.clone(),
            site: host.site.clone(),
            host: host.name.clone(),
            state: VmState::Running,
            memory_mib: 16,
            vcpus: 1,
            image: "/var/lib/stagehand/images/guest.bin".into(),
            load_addr: 0x1000,
            disks: vec![Disk {
                storage: fakes.storage.name.clone(),
                export: format!("{name}-disk0"),
                size_bytes: 1 << 20,
                epoch: 1,
                holder: host.name.clone(),
                token: Some(token.clone()),
            }],
            migration: None,
            pinned: false,
            cpu_fingerprint: None,
        };
        b.put("vms", &name, &vm)?;
        if (i + 1) % SEED_BATCH == 0 {
            store.commit(std::mem::take(&mut b))?;
        }
    }
    store.commit(b)?;
    Ok(t.elapsed().as_secs_f64())
}

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A three-member etcd on loopback in `dir`; (processes, store URI).
fn start_etcd(dir: &Path) -> Result<(Vec<Proc>, String)> {
    let client: Vec<u16> = (0..3).map(|_| free_port()).collect::<Result<_>>()?;
    let peer: Vec<u16> = (0..3).map(|_| free_port()).collect::<Result<_>>()?;
    let cluster: Vec<String> = (0..3)
        .map(|i| format!("e{i}=http://127.0.0.1:{}", peer[i]))
        .collect();
    let mut procs = Vec::new();
    for i in 0..3 {
        let c = format!("http://127.0.0.1:{}", client[i]);
        let p = format!("http://127.0.0.1:{}", peer[i]);
        let log = std::fs::File::create(dir.join(format!("e{i}.log")))?;
        let child = Command::new("etcd")
            .args(["--name", &format!("e{i}"), "--data-dir"])
            .arg(dir.join(format!("e{i}")))
            .args([
                "--listen-client-urls",
                &c,
                "--advertise-client-urls",
                &c,
                "--listen-peer-urls",
                &p,
                "--initial-advertise-peer-urls",
                &p,
                "--initial-cluster",
                &cluster.join(","),
                "--initial-cluster-state",
                "new",
                "--heartbeat-interval",
                "50",
                "--election-timeout",
                "500",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawn etcd")?;
        procs.push(Proc(child));
    }
    let eps: Vec<String> = client.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    Ok((procs, format!("etcd://{}", eps.join(","))))
}

/// Opens the store for seeding: RocksDB in `data`, or etcd as a (briefly) leading
/// writer.
fn open_store(data: &Path, uri: Option<&str>) -> Result<Store> {
    let Some(uri) = uri else {
        return Ok(Store::open(data)?);
    };
    let cfg = EtcdConfig::parse(uri, None)?;
    let end = Instant::now() + Duration::from_secs(30);
    let etcd = loop {
        match EtcdStore::connect(cfg.clone()) {
            Ok(s) => break s,
            Err(e) if Instant::now() < end => {
                eprintln!("waiting for etcd: {e}");
                std::thread::sleep(Duration::from_millis(300));
            }
            Err(e) => return Err(e.into()),
        }
    };
    etcd.start_election("bench-seed".into(), String::new(), Duration::from_secs(1));
    let store = Store::from_backend(Arc::new(etcd));
    let role = store.role();
    while !matches!(*role.borrow(), Role::Leader(_)) {
        if Instant::now() > end {
            bail!("the seeding writer was not elected on etcd");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(store)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

struct Figures {
    store: &'static str,
    seed_s: f64,
    cli_ms: Vec<f64>,
    http_ms: Vec<f64>,
    starts_ok: usize,
    starts_s: f64,
    start_ms: Vec<f64>,
}

async fn wait_leading(http: &reqwest::Client, api: &str) -> Result<()> {
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let r = http
            .get(format!("http://{api}/v1/status"))
            .bearer_auth(TOKEN)
            .send()
            .await;
        if let Ok(r) = r
            && let Ok(v) = r.json::<serde_json::Value>().await
            && v["coordinator"]["role"] == "leader"
        {
            return Ok(());
        }
        if Instant::now() > end {
            bail!("coord serve did not lead within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn run_one(
    kind: &'static str,
    coord: &Path,
    fakes: &Fakes,
    n_vms: usize,
    lists: usize,
    starts: usize,
) -> Result<Option<Figures>> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("coord-data");
    std::fs::create_dir_all(&data)?;
    let mut etcd = None;
    let uri = if kind == "etcd" {
        let ok = Command::new("etcd")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("SKIPPED: bench-control on etcd: etcd missing (run `make deps`)");
            return Ok(None);
        }
        let (procs, uri) = start_etcd(dir.path())?;
        etcd = Some(procs);
        Some(uri)
    } else {
        None
    };
    for (_, st) in &fakes.hosts {
        st.lock()
            .map_err(|_| anyhow::anyhow!("fake agent lock"))?
            .clear();
    }
    let seed_s = {
        let uri = uri.clone();
        let data = data.clone();
        let store = tokio::task::block_in_place(|| open_store(&data, uri.as_deref()))?;
        tokio::task::block_in_place(|| seed(&store, fakes, n_vms))?
    };
    eprintln!("{kind}: {n_vms} VMs written in {seed_s:.1} s");

    let api = format!("127.0.0.1:{}", free_port()?);
    let mut args: Vec<String> = vec![
        "serve".into(),
        "--api".into(),
        api.clone(),
        "--data-dir".into(),
        data.display().to_string(),
        "--api-token".into(),
        TOKEN.into(),
        "--max-migrations-per-host".into(),
        "1000000".into(),
        "--max-migrations-per-site".into(),
        "1000000".into(),
    ];
    if let Some(u) = &uri {
        args.extend(["--store".into(), u.clone(), "--name".into(), "bench".into()]);
    }
    let log = std::fs::File::create(dir.path().join("coord.log"))?;
    let _coord = Proc(
        Command::new(coord)
            .args(&args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawn coord serve")?,
    );
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()?;
    wait_leading(&http, &api).await?;

    // coord vm list: the CLI, as an operator runs it.
    let mut cli_ms = Vec::new();
    for i in 0..lists {
        let t = Instant::now();
        let out = tokio::task::block_in_place(|| {
            Command::new(coord)
                .args(["vm", "list", "--json"])
                .env("STAGEHAND_COORDINATOR", format!("http://{api}"))
                .env("STAGEHAND_TOKEN", TOKEN)
                .output()
        })?;
        cli_ms.push(t.elapsed().as_secs_f64() * 1e3);
        if !out.status.success() {
            bail!(
                "coord vm list failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        if i == 0 {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            let n = v.as_array().map(Vec::len).unwrap_or(0);
            if n != n_vms {
                bail!("coord vm list shows {n} VMs, not {n_vms}");
            }
        }
    }
    let mut http_ms = Vec::new();
    for _ in 0..lists {
        let t = Instant::now();
        let body = http
            .get(format!("http://{api}/v1/vms"))
            .bearer_auth(TOKEN)
            .send()
            .await?
            .bytes()
            .await?;
        http_ms.push(t.elapsed().as_secs_f64() * 1e3);
        if body.len() < n_vms {
            bail!("GET /v1/vms answered {} bytes", body.len());
        }
    }

    // Concurrent migration starts, each of a different VM, to the other site.
    let t = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..starts.min(n_vms) {
        let http = http.clone();
        let api = api.clone();
        let (host, _) = &fakes.hosts[i % fakes.hosts.len()];
        let to = if host.site == "siteA" {
            "siteB"
        } else {
            "siteA"
        };
        let body = json!({"vm": format!("vm-{i:05}"), "to_site": to});
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let r = http
                .post(format!("http://{api}/v1/migrations"))
                .bearer_auth(TOKEN)
                .json(&body)
                .send()
                .await;
            let ok = match r {
                Ok(r) if r.status().is_success() => true,
                Ok(r) => {
                    let status = r.status();
                    let text = r.text().await.unwrap_or_default();
                    eprintln!("a start was refused: {status} {text}");
                    false
                }
                Err(e) => {
                    eprintln!("a start failed: {e}");
                    false
                }
            };
            (ok, t.elapsed().as_secs_f64() * 1e3)
        }));
    }
    let mut start_ms = Vec::new();
    let mut starts_ok = 0;
    for task in tasks {
        let (ok, ms) = task.await?;
        starts_ok += usize::from(ok);
        start_ms.push(ms);
    }
    let starts_s = t.elapsed().as_secs_f64();
    drop(etcd);
    Ok(Some(Figures {
        store: kind,
        seed_s,
        cli_ms,
        http_ms,
        starts_ok,
        starts_s,
        start_ms,
    }))
}

fn main() -> Result<()> {
    let n_vms = env_num("BENCH_VMS", 10_000);
    let n_hosts = env_num("BENCH_HOSTS", 20).max(2);
    let lists = env_num("BENCH_LISTS", 10).max(1);
    let starts = env_num("BENCH_STARTS", 200);
    let stores = std::env::var("BENCH_STORES").unwrap_or_else(|_| "rocksdb,etcd".into());
    let bin_dir = std::env::var_os("STAGEHAND_BIN_DIR")
        .map(PathBuf::from)
        .context("set STAGEHAND_BIN_DIR to the directory of the release binaries")?;
    let coord = bin_dir.join("coord");
    if !coord.is_file() {
        bail!("{} missing: build it first", coord.display());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let fakes = start_fakes(n_hosts).await?;
        let mut all = Vec::new();
        for kind in stores.split(',').map(str::trim) {
            let kind: &'static str = match kind {
                "rocksdb" => "rocksdb",
                "etcd" => "etcd",
                other => bail!("BENCH_STORES: unknown store {other:?} (rocksdb, etcd)"),
            };
            if let Some(f) = run_one(kind, &coord, &fakes, n_vms, lists, starts).await? {
                all.push(f);
            }
        }
        println!(
            "bench-control: {n_vms} VMs on {n_hosts} fake hosts; {lists} lists; {starts} concurrent migration starts"
        );
        println!(
            "{:<8} {:>8} {:>14} {:>14} {:>14} {:>10} {:>12} {:>12}",
            "store", "seed s", "vm list p50ms", "vm list maxms", "GET p50 ms", "starts/s", "start p50ms", "start p99ms"
        );
        for mut f in all {
            for v in [&mut f.cli_ms, &mut f.http_ms, &mut f.start_ms] {
                v.sort_by(f64::total_cmp);
            }
            println!(
                "{:<8} {:>8.1} {:>14.0} {:>14.0} {:>14.0} {:>10.1} {:>12.0} {:>12.0}",
                f.store,
                f.seed_s,
                percentile(&f.cli_ms, 0.5),
                percentile(&f.cli_ms, 1.0),
                percentile(&f.http_ms, 0.5),
                f.starts_ok as f64 / f.starts_s.max(1e-9),
                percentile(&f.start_ms, 0.5),
                percentile(&f.start_ms, 0.99),
            );
            if f.starts_ok < f.start_ms.len() {
                println!(
                    "  {}: {} of {} starts refused",
                    f.store,
                    f.start_ms.len() - f.starts_ok,
                    f.start_ms.len()
                );
            }
        }
        Ok(())
    })
}
