//! The `coord` command line: `coord serve` and the client verbs of api.md. Each verb
//! is one call (or a poll loop for `migrate --wait`) to the coordinator's API; output
//! is a table for people or the API's JSON with `--json`.

use std::io::IsTerminal;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde_json::{Value, json};

use crate::config::ServeFlags;

#[derive(Parser)]
#[command(
    name = "coord",
    version,
    about = "Stagehand coordinator: inventory, placement and live migration with disk lease handoff",
    long_about = "Stagehand coordinator.\n\n`coord serve` runs the coordinator daemon. Every other verb is a client of it: \
it talks to --coordinator (default $STAGEHAND_COORDINATOR or http://127.0.0.1:7070) with the token in \
$STAGEHAND_TOKEN, prints tables (or the API's JSON with --json), and exits non-zero with a one-line reason \
on failure.\n\nTypical first steps:\n  coord site add siteA\n  coord storage add nbd-a1 --site siteA --api http://10.0.0.5:7080 --nbd 10.0.0.5:10809 --disk-dir /srv/disks\n  \
coord host add kvm-a1 --site siteA --api http://10.0.0.7:7071 --migration 10.0.0.7:9081 --memory 64G\n  \
coord vm create vm7 --site siteA --memory 256M --image /srv/guests/app.bin --disk 1G\n  coord migrate vm7 --to siteB --wait"
)]
pub struct Cli {
    /// Coordinator URL.
    #[arg(
        long,
        global = true,
        env = "STAGEHAND_COORDINATOR",
        default_value = "http://127.0.0.1:7070"
    )]
    pub coordinator: String,
    /// CA certificate (PEM) to verify an https:// coordinator against.
    #[arg(long, global = true, env = "STAGEHAND_CA", value_name = "FILE")]
    pub ca: Option<std::path::PathBuf>,
    /// Print the API's JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the coordinator daemon.
    Serve(ServeFlags),
    /// Sites (failure domains; hosts and storage nodes belong to one).
    #[command(subcommand)]
    Site(SiteCmd),
    /// Storage nodes (stagehand-nbd).
    #[command(subcommand)]
    Storage(StorageCmd),
    /// KVM hosts (stagehand-agent).
    #[command(subcommand)]
    Host(HostCmd),
    /// Virtual machines.
    #[command(subcommand)]
    Vm(VmCmd),
    /// Live-migrate a VM to another site or host, handing its disk lease over.
    Migrate(MigrateArgs),
    /// Migrations and their journal.
    #[command(subcommand)]
    Migration(MigrationCmd),
    /// TLS certificates for a cluster (a new CA and one directory per node).
    #[command(subcommand)]
    Certs(CertsCmd),
    /// Print a VM's disk lease tokens (JSON) from the coordinator's state directory.
    /// Needs read access to that directory, which holds them anyway; for tests and
    /// break-glass use. The API never shows tokens.
    #[command(hide = true)]
    LeaseTokens {
        vm: String,
        #[arg(long, value_name = "DIR")]
        data_dir: std::path::PathBuf,
    },
}

#[derive(Subcommand)]
pub enum CertsCmd {
    /// Create a CA in --out (ca-cert.pem, ca-key.pem) and, for each --node, a
    /// directory --out/NODE with ca-cert.pem, server-cert.pem, server-key.pem,
    /// client-cert.pem and client-key.pem (the layout libnbd's tls-certificates= and
    /// qemu's tls-creds-x509 take). Each node certificate is valid for its name, every
    /// --san, localhost, 127.0.0.1 and ::1, as a server and as a client. Give a daemon
    /// --tls-cert DIR/server-cert.pem --tls-key DIR/server-key.pem --tls-ca DIR/ca-cert.pem.
    Create {
        /// Directory to create the CA and node directories in.
        #[arg(long, value_name = "DIR")]
        out: std::path::PathBuf,
        /// A node (daemon) to issue a certificate for; repeat for each.
        #[arg(long = "node", value_name = "NAME", required = true)]
        nodes: Vec<String>,
        /// Another name (host name or IP address) every node certificate is valid for.
        #[arg(long = "san", value_name = "NAME")]
        sans: Vec<String>,
    },
}

#[derive(Subcommand)]
pub enum SiteCmd {
    /// Add a site.
    Add { name: String },
    /// List sites.
    List,
}

#[derive(Subcommand)]
pub enum StorageCmd {
    /// Add a storage node (it serves hosts of its site and of --reachable-from).
    Add {
        name: String,
        #[arg(long)]
        site: String,
        /// The node's control API URL, e.g. http://10.0.0.5:7080.
        #[arg(long)]
        api: String,
        /// The node's NBD listener HOST:PORT.
        #[arg(long)]
        nbd: String,
        /// Other sites whose hosts reach this node, comma-separated.
        #[arg(long, value_delimiter = ',')]
        reachable_from: Vec<String>,
        /// Directory on the node where VM disks are created (it must be under one of
        /// the node's --export-root). Default: the node's own export root.
        #[arg(long)]
        disk_dir: Option<String>,
        /// The node's own API token, when it differs from the cluster token.
        #[arg(long)]
        token: Option<String>,
    },
    /// List storage nodes.
    List,
}

#[derive(Subcommand)]
pub enum HostCmd {
    /// Add a KVM host running stagehand-agent.
    Add {
        name: String,
        #[arg(long)]
        site: String,
        /// The agent's API URL, e.g. http://10.0.0.7:7071.
        #[arg(long)]
        api: String,
        /// The agent's migration listener HOST:PORT.
        #[arg(long)]
        migration: String,
        /// Guest memory this host may hold (e.g. 64G, 4096M).
        #[arg(long, default_value = "8G", value_parser = parse_mib)]
        memory: u64,
        /// The agent's own API token, when it differs from the cluster token.
        #[arg(long)]
        token: Option<String>,
    },
    /// List hosts.
    List,
}

#[derive(Subcommand)]
pub enum VmCmd {
    /// Create a VM: place it, create and lease its disk, start it.
    Create(CreateArgs),
    /// List VMs.
    List,
    /// Show one VM, with its disks' lease epochs and its host's live view.
    Show { name: String },
    /// Stop a VM and remove its disk export (the disk file stays on the node).
    Delete { name: String },
}

#[derive(Args)]
pub struct CreateArgs {
    pub name: String,
    /// Site to place the VM in (a host with room is chosen).
    #[arg(long)]
    pub site: Option<String>,
    /// Place on this host instead.
    #[arg(long)]
    pub host: Option<String>,
    /// Guest memory (e.g. 256M, 1G).
    #[arg(long, value_parser = parse_mib)]
    pub memory: u64,
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// The guest's flat binary (a path valid on the hosts).
    #[arg(long)]
    pub image: String,
    /// Guest-physical load address of the image.
    #[arg(long, default_value = "0x7c00", value_parser = parse_u64)]
    pub load_addr: u64,
    /// Disk size (e.g. 1G, 64M).
    #[arg(long, value_parser = parse_bytes)]
    pub disk: u64,
    /// Fill the new disk from this raw image (read by the coordinator).
    #[arg(long)]
    pub disk_image: Option<String>,
}

#[derive(Args)]
pub struct MigrateArgs {
    pub vm: String,
    /// Target site.
    #[arg(long)]
    pub to: Option<String>,
    /// Target host (else the host of the target site with most room).
    #[arg(long)]
    pub host: Option<String>,
    /// Longest pause allowed at switchover, ms.
    #[arg(long)]
    pub downtime_ms: Option<u64>,
    /// Bandwidth cap, MiB/s.
    #[arg(long)]
    pub bandwidth: Option<u64>,
    /// Stop the guest, move it, boot it on the target (no memory is moved).
    #[arg(long)]
    pub offline: bool,
    /// Follow the migration to its end (progress bar on a terminal), then print its figures.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up waiting after this many seconds (the migration goes on).
    #[arg(long, default_value_t = 3600)]
    pub wait_timeout_s: u64,
}

#[derive(Subcommand)]
pub enum MigrationCmd {
    /// List migrations.
    List,
    /// Show a migration, its figures and its journal.
    Show { id: String },
    /// Cancel a migration (possible until the disk handover starts).
    Cancel { id: String },
}

fn split_unit(s: &str) -> Result<(f64, char), String> {
    let s = s.trim();
    let (num, unit) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => (&s[..i], s[i..].to_ascii_uppercase()),
        None => (s, String::new()),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 256M or 1G"))?;
    let unit = match unit.trim_end_matches("IB").trim_end_matches('B') {
        "" => 'B',
        "K" => 'K',
        "M" => 'M',
        "G" => 'G',
        "T" => 'T',
        _ => return Err(format!("{s:?} has an unknown unit (use K, M, G, T)")),
    };
    Ok((n, unit))
}

/// Sizes like `1G`, `512M`, `4096` (bytes).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let (n, unit) = split_unit(s)?;
    let mul = match unit {
        'K' => 1u64 << 10,
        'M' => 1 << 20,
        'G' => 1 << 30,
        'T' => 1 << 40,
        _ => 1,
    };
    Ok((n * mul as f64) as u64)
}

/// Memory sizes in MiB: `256M`, `1G`; a bare number is MiB.
pub fn parse_mib(s: &str) -> Result<u64, String> {
    let (n, unit) = split_unit(s)?;
    let mib = match unit {
        'B' | 'M' => n,
        'K' => n / 1024.0,
        'G' => n * 1024.0,
        _ => n * 1024.0 * 1024.0,
    };
    if mib < 1.0 {
        return Err(format!("{s:?} is less than 1 MiB"));
    }
    Ok(mib as u64)
}

fn parse_u64(s: &str) -> Result<u64, String> {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    }
    .map_err(|_| format!("{s:?} is not a number"))
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(
        "cannot reach the coordinator at {url}: {reason} (is `coord serve` running? set --coordinator or STAGEHAND_COORDINATOR)"
    )]
    Unreachable { url: String, reason: String },
    #[error("{message} [{code}]")]
    Api { code: String, message: String },
    #[error("the coordinator answered something unexpected: {0}")]
    BadAnswer(String),
    #[error("{0}")]
    Local(String),
    #[error("gave up waiting for migration {0}; it goes on (see `coord migration show {0}`)")]
    WaitTimeout(String),
    #[error("migration {id} ended {phase}: {reason}")]
    MigrationFailed {
        id: String,
        phase: String,
        reason: String,
    },
}

pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Client {
    /// A client of the coordinator at `base`; an https coordinator is verified against
    /// `ca` (the system roots are not used).
    pub fn new(
        base: &str,
        token: Option<String>,
        ca: Option<&std::path::Path>,
    ) -> Result<Self, CliError> {
        let mut b = reqwest::Client::builder().timeout(Duration::from_secs(120));
        if let Some(ca) = ca {
            let cfg = stagehand_common::tls::ca_only_client_config(ca)
                .map_err(|e| CliError::Local(format!("--ca: {e}")))?;
            b = b.use_preconfigured_tls(rustls::ClientConfig::clone(&cfg));
        } else if base.starts_with("https://") {
            return Err(CliError::Local(
                "an https coordinator needs --ca FILE (or STAGEHAND_CA) to verify it".into(),
            ));
        }
        Ok(Self {
            http: b
                .build()
                .map_err(|e| CliError::Local(format!("HTTP client: {e}")))?,
            base: base.trim_end_matches('/').to_owned(),
            token,
        })
    }

    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, CliError> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, &url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.map_err(|e| CliError::Unreachable {
            url: self.base.clone(),
            reason: e.to_string(),
        })?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| CliError::BadAnswer(e.to_string()))?;
        if !status.is_success() {
            let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            return Err(CliError::Api {
                code: v["error"]["code"]
                    .as_str()
                    .unwrap_or("http_error")
                    .to_owned(),
                message: v["error"]["message"]
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| format!("HTTP {status}")),
            });
        }
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&bytes).map_err(|e| CliError::BadAnswer(e.to_string()))
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        Value::Array(a) => a.iter().map(s).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// Prints a JSON array of records as a table: each column is a header and the JSON
/// pointer of its field in a record (a missing field prints as "-").
fn list_table(v: &Value, cols: &[(&str, &str)]) {
    let headers: Vec<&str> = cols.iter().map(|(h, _)| *h).collect();
    let rows = v
        .as_array()
        .into_iter()
        .flatten()
        .map(|x| {
            cols.iter()
                .map(|(_, ptr)| s(x.pointer(ptr).unwrap_or(&Value::Null)))
                .collect()
        })
        .collect();
    table(&headers, rows);
}

/// Prints rows as aligned columns.
fn table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut w: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        let mut out = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(c);
            } else {
                out.push_str(&format!("{c:<width$}  ", width = w[i]));
            }
        }
        println!("{}", out.trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}

fn human_bytes(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

fn print_vm(v: &Value) {
    println!("name:        {}", s(&v["name"]));
    println!("site/host:   {} / {}", s(&v["site"]), s(&v["host"]));
    println!(
        "state:       {} (host reports: {})",
        s(&v["state"]),
        s(&v["agent_state"])
    );
    println!(
        "memory:      {} MiB, {} vCPU",
        s(&v["memory_mib"]),
        s(&v["vcpus"])
    );
    println!(
        "image:       {} at {:#x}",
        s(&v["image"]),
        v["load_addr"].as_u64().unwrap_or(0)
    );
    if let Some(m) = v["migration"].as_str() {
        println!("migration:   {m}");
    }
    for d in v["disks"].as_array().into_iter().flatten() {
        println!(
            "disk:        {}/{} {} epoch {} held by {}",
            s(&d["storage"]),
            s(&d["export"]),
            human_bytes(d["size_bytes"].as_u64().unwrap_or(0)),
            s(&d["epoch"]),
            s(&d["holder"])
        );
    }
}

fn print_figures(m: &Value) {
    println!(
        "migration {} of {}: {} -> {}: {}",
        s(&m["id"]),
        s(&m["vm"]),
        s(&m["from_host"]),
        s(&m["to_host"]),
        s(&m["state"])
    );
    println!("  total:     {} ms", s(&m["total_ms"]));
    println!(
        "  downtime:  {} ms (guest paused: last pages, fence, go-ahead, resume)",
        s(&m["downtime_ms"])
    );
    let down_ms = m["downtime_ms"].as_u64().unwrap_or(0);
    let fence_us = m["fence_us"].as_u64().unwrap_or(0);
    let share = if down_ms > 0 {
        format!(
            ", {:.1}% of the downtime",
            fence_us as f64 / 10.0 / down_ms as f64
        )
    } else {
        String::new()
    };
    println!(
        "  fence:     {:.2} ms (disk lease handoff while the guest is paused{share})",
        fence_us as f64 / 1000.0
    );
    println!(
        "  handover:  {} ms (coordinator: quiesced seen -> go-ahead sent); agent: paused -> go-ahead {} ms",
        s(&m["handover_ms"]),
        s(&m["switchover_wait_ms"])
    );
    println!(
        "  memory:    {} in {} passes",
        human_bytes(m["memory_bytes"].as_u64().unwrap_or(0)),
        s(&m["passes"])
    );
    println!(
        "  disk:      {} (shared storage: nothing copied)",
        human_bytes(m["disk_bytes"].as_u64().unwrap_or(0))
    );
    if let Some(e) = m["error"].as_str() {
        println!("  error:     {e}");
    }
}

fn emit(json_out: bool, v: &Value, human: impl FnOnce(&Value)) {
    if json_out {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    } else {
        human(v);
    }
}

/// Runs one client verb. `serve` is handled by main.
pub async fn run_client(cli: Cli) -> Result<(), CliError> {
    use reqwest::Method as M;
    let token = std::env::var("STAGEHAND_TOKEN")
        .ok()
        .filter(|t| !t.is_empty());
    if let Command::Certs(CertsCmd::Create { out, nodes, sans }) = &cli.command {
        return certs_create(out, nodes, sans);
    }
    let c = Client::new(&cli.coordinator, token, cli.ca.as_deref())?;
    let j = cli.json;
    match cli.command {
        Command::Serve(_) => unreachable!("main runs serve itself"),
        Command::Certs(_) => unreachable!("handled above"),
        Command::LeaseTokens { vm, data_dir } => {
            let st = crate::store::Store::open_read_only(&data_dir)
                .map_err(|e| CliError::Local(e.to_string()))?;
            let rec: crate::model::Vm = st
                .get("vms", &vm)
                .map_err(|e| CliError::Local(e.to_string()))?
                .ok_or_else(|| {
                    CliError::Local(format!("no VM named {vm} in {}", data_dir.display()))
                })?;
            let v: Vec<Value> = rec
                .disks
                .iter()
                .map(|d| json!({"export": d.export, "epoch": d.epoch, "holder": d.holder, "token": d.token}))
                .collect();
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        }
        Command::Site(SiteCmd::Add { name }) => {
            let v = c.call(M::PUT, &format!("/v1/sites/{name}"), None).await?;
            emit(j, &v, |v| println!("site {} added", s(&v["name"])));
        }
        Command::Site(SiteCmd::List) => {
            let v = c.call(M::GET, "/v1/sites", None).await?;
            emit(j, &v, |v| list_table(v, &[("SITE", "/name")]));
        }
        Command::Storage(StorageCmd::Add {
            name,
            site,
            api,
            nbd,
            reachable_from,
            disk_dir,
            token,
        }) => {
            let body = json!({"site": site, "api": api, "nbd": nbd, "reachable_from": reachable_from, "disk_dir": disk_dir, "token": token});
            let v = c
                .call(M::PUT, &format!("/v1/storage/{name}"), Some(body))
                .await?;
            emit(j, &v, |v| {
                println!(
                    "storage node {} added in {} (reachable from {})",
                    s(&v["name"]),
                    s(&v["site"]),
                    s(&v["reachable_from"])
                )
            });
        }
        Command::Storage(StorageCmd::List) => {
            let v = c.call(M::GET, "/v1/storage", None).await?;
            emit(j, &v, |v| {
                list_table(
                    v,
                    &[
                        ("STORAGE", "/name"),
                        ("SITE", "/site"),
                        ("REACHABLE FROM", "/reachable_from"),
                        ("NBD", "/nbd"),
                        ("API", "/api"),
                    ],
                )
            });
        }
        Command::Host(HostCmd::Add {
            name,
            site,
            api,
            migration,
            memory,
            token,
        }) => {
            let body = json!({"site": site, "api": api, "migration": migration, "memory_mib": memory, "token": token});
            let v = c
                .call(M::PUT, &format!("/v1/hosts/{name}"), Some(body))
                .await?;
            emit(j, &v, |v| {
                println!(
                    "host {} added in {} ({} MiB for guests)",
                    s(&v["name"]),
                    s(&v["site"]),
                    s(&v["memory_mib"])
                )
            });
        }
        Command::Host(HostCmd::List) => {
            let v = c.call(M::GET, "/v1/hosts", None).await?;
            emit(j, &v, |v| {
                list_table(
                    v,
                    &[
                        ("HOST", "/name"),
                        ("SITE", "/site"),
                        ("MEMORY MIB", "/memory_mib"),
                        ("MIGRATION", "/migration"),
                        ("API", "/api"),
                    ],
                )
            });
        }
        Command::Vm(VmCmd::Create(a)) => {
            let body = json!({
                "site": a.site, "host": a.host, "memory_mib": a.memory, "vcpus": a.vcpus,
                "image": a.image, "load_addr": a.load_addr, "disk_bytes": a.disk, "disk_image": a.disk_image,
            });
            let v = c
                .call(M::PUT, &format!("/v1/vms/{}", a.name), Some(body))
                .await?;
            emit(j, &v, print_vm);
        }
        Command::Vm(VmCmd::List) => {
            let v = c.call(M::GET, "/v1/vms", None).await?;
            emit(j, &v, |v| {
                list_table(
                    v,
                    &[
                        ("VM", "/name"),
                        ("SITE", "/site"),
                        ("HOST", "/host"),
                        ("STATE", "/state"),
                        ("MEMORY MIB", "/memory_mib"),
                        ("DISK EPOCH", "/disks/0/epoch"),
                    ],
                )
            });
        }
        Command::Vm(VmCmd::Show { name }) => {
            let v = c.call(M::GET, &format!("/v1/vms/{name}"), None).await?;
            emit(j, &v, print_vm);
        }
        Command::Vm(VmCmd::Delete { name }) => {
            c.call(M::DELETE, &format!("/v1/vms/{name}"), None).await?;
            emit(j, &json!({"deleted": name}), |_| {
                println!("VM {name} deleted")
            });
        }
        Command::Migrate(a) => {
            let body = json!({
                "vm": a.vm, "to_site": a.to, "to_host": a.host, "downtime_ms": a.downtime_ms,
                "bandwidth_mibs": a.bandwidth, "offline": a.offline,
            });
            let v = c.call(M::POST, "/v1/migrations", Some(body)).await?;
            let id = v["id"]
                .as_str()
                .ok_or_else(|| CliError::BadAnswer("no migration id".into()))?
                .to_owned();
            if !a.wait {
                emit(j, &v, |v| {
                    println!(
                        "migration {id} started: {} -> {} (follow with `coord migration show {id}`)",
                        s(&v["from_host"]),
                        s(&v["to_host"])
                    )
                });
                return Ok(());
            }
            let m = follow(
                &c,
                &id,
                !j && std::io::stderr().is_terminal(),
                Duration::from_secs(a.wait_timeout_s),
            )
            .await?;
            emit(j, &m, print_figures);
            if m["state"] != "committed" {
                return Err(CliError::MigrationFailed {
                    id,
                    phase: s(&m["state"]),
                    reason: s(&m["error"]),
                });
            }
        }
        Command::Migration(MigrationCmd::List) => {
            let v = c.call(M::GET, "/v1/migrations", None).await?;
            emit(j, &v, |v| {
                list_table(
                    v,
                    &[
                        ("ID", "/id"),
                        ("VM", "/vm"),
                        ("FROM", "/from_host"),
                        ("TO", "/to_host"),
                        ("STATE", "/state"),
                        ("TOTAL MS", "/total_ms"),
                        ("DOWNTIME MS", "/downtime_ms"),
                    ],
                )
            });
        }
        Command::Migration(MigrationCmd::Show { id }) => {
            let v = c
                .call(M::GET, &format!("/v1/migrations/{id}"), None)
                .await?;
            emit(j, &v, |v| {
                print_figures(v);
                println!("  journal:");
                for e in v["journal"].as_array().into_iter().flatten() {
                    println!("    {}  {}", s(&e["at_ms"]), s(&e["phase"]["phase"]));
                }
            });
        }
        Command::Migration(MigrationCmd::Cancel { id }) => {
            let v = c
                .call(M::POST, &format!("/v1/migrations/{id}/cancel"), None)
                .await?;
            emit(j, &v, |_| {
                println!("cancel of {id} requested; the guest stays on the source")
            });
        }
    }
    Ok(())
}

/// `coord certs create`: a new CA and a certificate directory per node.
fn certs_create(out: &std::path::Path, nodes: &[String], sans: &[String]) -> Result<(), CliError> {
    if out.join("ca-key.pem").exists() {
        return Err(CliError::Local(format!(
            "{} already holds a CA (ca-key.pem); choose another --out",
            out.display()
        )));
    }
    let local = |e: stagehand_common::pki::PkiError| CliError::Local(e.to_string());
    let ca = stagehand_common::pki::Ca::create(out).map_err(local)?;
    let sans: Vec<&str> = sans.iter().map(String::as_str).collect();
    for n in nodes {
        let dir = ca.issue(n, &sans).map_err(local)?;
        println!("{n}: {}", dir.display());
    }
    println!("CA: {}", out.join("ca-cert.pem").display());
    Ok(())
}

/// Polls a migration until it reaches a terminal phase; draws a bar when asked.
async fn follow(c: &Client, id: &str, bar: bool, limit: Duration) -> Result<Value, CliError> {
    let pb = bar.then(|| {
        let pb = indicatif::ProgressBar::new(1);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {msg:<24} [{bar:40}] {bytes}/{total_bytes} ({elapsed})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        pb
    });
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let m = c
            .call(reqwest::Method::GET, &format!("/v1/migrations/{id}"), None)
            .await?;
        if let Some(pb) = &pb {
            let total = m["memory_total_bytes"].as_u64().unwrap_or(0).max(1);
            pb.set_length(total);
            pb.set_position(m["memory_bytes"].as_u64().unwrap_or(0).min(total));
            pb.set_message(format!("{} pass {}", s(&m["state"]), s(&m["passes"])));
            pb.tick();
        }
        let done = matches!(
            m["state"].as_str(),
            Some("committed" | "rolled_back" | "cancelled")
        );
        if done {
            if let Some(pb) = &pb {
                pb.finish_and_clear();
            }
            return Ok(m);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(CliError::WaitTimeout(id.to_owned()));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_mib("256M"), Ok(256));
        assert_eq!(parse_mib("1G"), Ok(1024));
        assert_eq!(parse_mib("1GiB"), Ok(1024));
        assert_eq!(parse_mib("512"), Ok(512));
        assert!(parse_mib("0").is_err());
        assert!(parse_mib("12Q").is_err());
        assert_eq!(parse_bytes("1G"), Ok(1 << 30));
        assert_eq!(parse_bytes("64m"), Ok(64 << 20));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_u64("0x7c00"), Ok(0x7c00));
        assert!(parse_bytes("abc").is_err());
    }

    #[test]
    fn cli_parses_the_documented_verbs() {
        let p = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("coord").chain(args.iter().copied()))
        };
        assert!(p(&["site", "add", "siteB"]).is_ok());
        assert!(
            p(&[
                "storage",
                "add",
                "nbd-b1",
                "--site",
                "siteB",
                "--api",
                "http://x",
                "--nbd",
                "h:1",
                "--reachable-from",
                "siteA,siteB"
            ])
            .is_ok()
        );
        assert!(
            p(&[
                "host",
                "add",
                "kvm-b1",
                "--site",
                "siteB",
                "--api",
                "http://x",
                "--migration",
                "h:2"
            ])
            .is_ok()
        );
        assert!(
            p(&[
                "vm", "create", "vm7", "--site", "siteA", "--memory", "256M", "--image", "/f",
                "--disk", "1G"
            ])
            .is_ok()
        );
        assert!(
            p(&[
                "vm", "create", "vm7", "--site", "siteA", "--image", "/f", "--disk", "1G"
            ])
            .is_err()
        );
        assert!(
            p(&[
                "migrate",
                "vm7",
                "--to",
                "siteB",
                "--downtime-ms",
                "50",
                "--bandwidth",
                "100",
                "--wait"
            ])
            .is_ok()
        );
        assert!(p(&["migration", "cancel", "mig-1", "--json"]).is_ok());
        assert!(p(&["vm", "list"]).is_ok());
    }
}
