//! The migration driver against small fake daemons (no KVM): a storage node that
//! fences like stagehand-nbd (epochs must grow, each fence mints a token) and two
//! agents that speak the coordinated switchover of the agent API. Checks what the
//! driver sends (the target's own tokens at the go-ahead, new tokens at a rollback's
//! resume) and what it journals.

// The fake daemons' handlers run outside #[test] functions; a poisoned lock there is a
// test failure like any other.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde_json::{Value, json};

use coordinator::model::{Host, MigrationOptions, StorageNode};
use coordinator::service::{Coordinator, CreateVmRequest, MigrateRequest, ServiceConfig};
use coordinator::store::Store;

#[derive(Default)]
struct Storage {
    /// export -> (epoch, holder, token)
    leases: HashMap<String, (u64, String, String)>,
    fences: u64,
    /// Bodies of every export PUT.
    puts: Vec<Value>,
    deletes: u64,
}

type Shared<T> = Arc<Mutex<T>>;

async fn serve(app: Router) -> String {
    serve_tls(app, None).await
}

/// Serves `app` on loopback (HTTPS with `tls`); returns its base URL.
async fn serve_tls(app: Router, tls: Option<Arc<rustls::ServerConfig>>) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let scheme = if tls.is_some() { "https" } else { "http" };
    tokio::spawn(stagehand_common::http::serve(
        l,
        app,
        tls,
        tokio_util::sync::CancellationToken::new(),
    ));
    format!("{scheme}://{addr}")
}

/// A fake daemon's router: `/v1/health` as every daemon answers it.
fn daemon<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new().route(
        "/v1/health",
        get(|| async { Json(json!({"status": "ok"})) }),
    )
}

fn service_config(dir: &std::path::Path) -> ServiceConfig {
    ServiceConfig {
        cluster_token: None,
        tls: None,
        images_dir: dir.join("images"),
        max_migrations_per_host: 2,
        max_migrations_per_site: 4,
    }
}

async fn storage_node(st: Shared<Storage>) -> String {
    storage_node_tls(st, None).await
}

async fn storage_node_tls(st: Shared<Storage>, tls: Option<Arc<rustls::ServerConfig>>) -> String {
    let app = daemon()
        .route(
            "/v1/exports/{name}",
            put(
                |State(st): State<Shared<Storage>>,
                 Path(name): Path<String>,
                 Json(b): Json<Value>| async move {
                    st.lock().unwrap().puts.push(b);
                    (
                        StatusCode::CREATED,
                        Json(json!({"name": name, "size_bytes": 1 << 20, "lease": null})),
                    )
                },
            )
            .delete(|State(st): State<Shared<Storage>>| async move {
                st.lock().unwrap().deletes += 1;
                StatusCode::NO_CONTENT
            })
            .get(
                |State(st): State<Shared<Storage>>, Path(name): Path<String>| async move {
                    let s = st.lock().unwrap();
                    let lease = s
                        .leases
                        .get(&name)
                        .map(|(e, h, _)| json!({"epoch": e, "holder": h}));
                    Json(json!({"name": name, "size_bytes": 1 << 20, "lease": lease}))
                },
            ),
        )
        .route(
            "/v1/exports/{name}/fence",
            post(
                |State(st): State<Shared<Storage>>,
                 Path(name): Path<String>,
                 Json(b): Json<Value>| async move {
                    let mut s = st.lock().unwrap();
                    let epoch = b["epoch"].as_u64().unwrap_or(0);
                    let holder = b["holder"].as_str().unwrap_or("").to_owned();
                    let current = s.leases.get(&name).map(|l| l.0).unwrap_or(0);
                    if epoch <= current {
                        return (
                            StatusCode::CONFLICT,
                            Json(json!({"error": {"code": "stale_epoch", "message": "epoch must grow"}})),
                        );
                    }
                    s.fences += 1;
                    let token = format!("tok-{name}-{epoch}-{holder}");
                    s.leases
                        .insert(name, (epoch, holder.clone(), token.clone()));
                    (
                        StatusCode::OK,
                        Json(json!({"epoch": epoch, "holder": holder, "token": token})),
                    )
                },
            ),
        )
        .with_state(st);
    serve_tls(app, tls).await
}

/// How the fake source agent's migration behaves.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Script {
    /// Quiesces, then completes at the go-ahead.
    Normal,
    /// Quiesces, then fails when the go-ahead arrives (the target vanished).
    TargetDiesAtGoAhead,
    /// Moves memory for ever (a capped pre-copy that does not converge) until cancelled.
    NeverConverges,
    /// Completes by itself without a go-ahead: the target runs with the source's disks.
    CompletesAlone,
}

#[derive(Default)]
struct World {
    /// (agent index, vm) -> (state, disks)
    vms: HashMap<(usize, String), (String, Vec<Value>)>,
    /// migration state
    migration: String,
    polls: u32,
    /// Bodies of every resume, per agent.
    resumes: Vec<(usize, Value)>,
    go_aheads: Vec<Value>,
    script: Option<Script>,
}

#[derive(Clone)]
struct AgentState {
    idx: usize,
    world: Shared<World>,
}

fn err(status: StatusCode, code: &str) -> (StatusCode, Json<Value>) {
    (
        status,
        Json(json!({"error": {"code": code, "message": code}})),
    )
}

async fn agent(idx: usize, world: Shared<World>) -> String {
    let app =
        daemon()
            .route(
                "/v1/vms/{name}",
                put(
                    |State(a): State<AgentState>,
                     Path(name): Path<String>,
                     Json(b): Json<Value>| async move {
                        let disks = b["disks"].as_array().cloned().unwrap_or_default();
                        a.world
                            .lock()
                            .unwrap()
                            .vms
                            .insert((a.idx, name.clone()), ("running".into(), disks));
                        (
                            StatusCode::CREATED,
                            Json(json!({"name": name, "state": "running"})),
                        )
                    },
                )
                .get(
                    |State(a): State<AgentState>, Path(name): Path<String>| async move {
                        match a.world.lock().unwrap().vms.get(&(a.idx, name.clone())) {
                            Some((state, _)) => {
                                (StatusCode::OK, Json(json!({"name": name, "state": state})))
                            }
                            None => err(StatusCode::NOT_FOUND, "not_found"),
                        }
                    },
                )
                .delete(
                    |State(a): State<AgentState>, Path(name): Path<String>| async move {
                        a.world.lock().unwrap().vms.remove(&(a.idx, name));
                        StatusCode::NO_CONTENT
                    },
                ),
            )
            .route(
                "/v1/vms/{name}/resume",
                post(
                    |State(a): State<AgentState>,
                     Path(name): Path<String>,
                     body: Option<Json<Value>>| async move {
                        let mut w = a.world.lock().unwrap();
                        w.resumes
                            .push((a.idx, body.map(|b| b.0).unwrap_or(Value::Null)));
                        match w.vms.get_mut(&(a.idx, name.clone())) {
                            Some(vm) if vm.0 == "paused" => {
                                vm.0 = "running".into();
                                (
                                    StatusCode::OK,
                                    Json(json!({"name": name, "state": "running"})),
                                )
                            }
                            _ => err(StatusCode::CONFLICT, "wrong_state"),
                        }
                    },
                ),
            )
            .route(
                "/v1/vms/{name}/migrate",
                post(
                    |State(a): State<AgentState>,
                     Path(name): Path<String>,
                     Json(b): Json<Value>| async move {
                        let mut w = a.world.lock().unwrap();
                        assert_eq!(
                            b["switchover"], "coordinated",
                            "the driver asks for the coordinated mode"
                        );
                        w.migration = "active".into();
                        if let Some(vm) = w.vms.get_mut(&(a.idx, name)) {
                            vm.0 = "migrating".into();
                        }
                        Json(json!({"migration_id": "m1"}))
                    },
                ),
            )
            .route(
                "/v1/migrations/{id}",
                get(|State(a): State<AgentState>| async move {
                    let mut w = a.world.lock().unwrap();
                    w.polls += 1;
                    if w.migration == "active"
                        && w.polls > 3
                        && w.script == Some(Script::CompletesAlone)
                    {
                        w.migration = "completed".into();
                        if let Some((_, disks)) = w.vms.remove(&(a.idx, "vm7".to_owned())) {
                            w.vms
                                .insert((1 - a.idx, "vm7".to_owned()), ("running".into(), disks));
                        }
                    }
                    if w.migration == "active"
                        && w.polls > 3
                        && w.script != Some(Script::NeverConverges)
                    {
                        w.migration = "quiesced".into();
                    }
                    let error = (w.migration == "failed")
                        .then(|| json!({"code": "connection", "message": "target gone"}));
                    Json(json!({
                        "state": w.migration, "total_ms": 40.0, "downtime_ms": 7.0,
                        "ram_transferred_bytes": 4096.0 * f64::from(w.polls), "total_bytes": 8192.0,
                        "passes": [{}, {}], "quiesced_at_ms": 30.0, "error": error,
                    }))
                }),
            )
            .route(
                "/v1/vms/{name}/pause",
                post(
                    |State(a): State<AgentState>, Path(name): Path<String>| async move {
                        let mut w = a.world.lock().unwrap();
                        match w.vms.get_mut(&(a.idx, name.clone())) {
                            Some(vm) if vm.0 == "running" => {
                                vm.0 = "paused".into();
                                (
                                    StatusCode::OK,
                                    Json(json!({"name": name, "state": "paused"})),
                                )
                            }
                            _ => err(StatusCode::CONFLICT, "wrong_state"),
                        }
                    },
                ),
            )
            .route(
                "/v1/migrations/{id}/cancel",
                post(|State(a): State<AgentState>| async move {
                    let mut w = a.world.lock().unwrap();
                    if !matches!(w.migration.as_str(), "active" | "quiesced") {
                        return err(StatusCode::CONFLICT, "wrong_state");
                    }
                    // The agent resumes the source with its own disks.
                    w.migration = "cancelled".into();
                    if let Some(vm) = w.vms.get_mut(&(a.idx, "vm7".to_owned())) {
                        vm.0 = "running".into();
                    }
                    (StatusCode::OK, Json(json!({"state": "cancelled"})))
                }),
            )
            .route(
                "/v1/migrations/{id}/switchover",
                post(
                    |State(a): State<AgentState>, Json(b): Json<Value>| async move {
                        let mut w = a.world.lock().unwrap();
                        if w.migration != "quiesced" {
                            return err(StatusCode::CONFLICT, "wrong_state");
                        }
                        w.go_aheads.push(b.clone());
                        let vm = ("vm7".to_owned(), a.idx);
                        match w.script.unwrap_or(Script::Normal) {
                            Script::Normal | Script::NeverConverges | Script::CompletesAlone => {
                                let disks = b["disks"].as_array().cloned().unwrap_or_default();
                                w.vms.remove(&(vm.1, vm.0.clone()));
                                w.vms.insert((1 - vm.1, vm.0), ("running".into(), disks));
                                w.migration = "completed".into();
                            }
                            Script::TargetDiesAtGoAhead => {
                                w.vms.insert((vm.1, vm.0), ("paused".into(), vec![]));
                                w.migration = "failed".into();
                            }
                        }
                        (StatusCode::OK, Json(json!({"state": w.migration})))
                    },
                ),
            )
            .with_state(AgentState { idx, world });
    serve(app).await
}

struct Fixture {
    coord: Arc<Coordinator>,
    storage: Shared<Storage>,
    world: Shared<World>,
    _dir: tempfile::TempDir,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage: Shared<Storage> = Arc::default();
    let world: Shared<World> = Arc::default();
    let nbd_api = storage_node(Arc::clone(&storage)).await;
    let apis = [
        agent(0, Arc::clone(&world)).await,
        agent(1, Arc::clone(&world)).await,
    ];
    let coord = Coordinator::new(
        Store::open(&dir.path().join("state")).expect("store"),
        service_config(dir.path()),
    )
    .expect("coordinator");
    coord.add_site("siteA").await.expect("site");
    coord.add_site("siteB").await.expect("site");
    coord
        .add_storage(StorageNode {
            name: "nbd-a1".into(),
            site: "siteA".into(),
            api: nbd_api,
            nbd: "127.0.0.1:1".into(),
            reachable_from: vec!["siteB".into()],
            disk_dir: None,
            token: None,
        })
        .await
        .expect("storage");
    for (i, (name, site)) in [("kvm-a1", "siteA"), ("kvm-b1", "siteB")]
        .iter()
        .enumerate()
    {
        coord
            .add_host(Host {
                name: (*name).into(),
                site: (*site).into(),
                api: apis[i].clone(),
                migration: "127.0.0.1:2".into(),
                memory_mib: 1024,
                token: None,
                drained: None,
                report: None,
            })
            .await
            .expect("host");
    }
    coord
        .create_vm(
            "vm7",
            CreateVmRequest {
                site: Some("siteA".into()),
                host: None,
                memory_mib: 128,
                vcpus: 1,
                image: "/g.bin".into(),
                load_addr: 0x7c00,
                disk_bytes: 1 << 20,
                disk_image: None,
            },
        )
        .await
        .expect("vm create");
    Fixture {
        coord,
        storage,
        world,
        _dir: dir,
    }
}

async fn migrate_and_wait(f: &Fixture) -> (Value, Vec<String>) {
    let doc = f
        .coord
        .start_migration(MigrateRequest {
            vm: "vm7".into(),
            to_site: Some("siteB".into()),
            to_host: None,
            options: MigrationOptions::default(),
        })
        .await
        .expect("migration starts");
    let id = doc.record.id.clone();
    for _ in 0..500 {
        let m = f.coord.migration(&id).expect("migration");
        if m.record.phase.is_terminal() {
            let phases = f
                .coord
                .journal(&id)
                .expect("journal")
                .into_iter()
                .map(|e| e.phase.name().to_owned())
                .collect();
            return (coordinator::api::migration_view(&m, None), phases);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the migration did not end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_ahead_carries_the_targets_new_token() {
    let f = fixture().await;
    let (m, phases) = migrate_and_wait(&f).await;
    assert_eq!(
        phases,
        [
            "planned",
            "precopy",
            "quiesced",
            "fencing",
            "fenced",
            "target_running",
            "committed"
        ],
        "{m}"
    );
    let lease = f.storage.lock().unwrap().leases["vm7-disk0"].clone();
    assert_eq!((lease.0, lease.1.as_str()), (2, "kvm-b1"));
    let w = f.world.lock().unwrap();
    // {nbd, lease}: the token never in the URI.
    let disk = json!({"nbd": "nbd://127.0.0.1:1/vm7-disk0", "lease": lease.2});
    assert_eq!(w.go_aheads, vec![json!({ "disks": [disk.clone()] })]);
    assert_eq!(w.vms[&(1, "vm7".to_owned())].1[0], disk);
    assert!(!w.vms.contains_key(&(0, "vm7".to_owned())));
    let vm = f.coord.vm("vm7").expect("vm");
    assert_eq!(vm.host, "kvm-b1");
    assert_eq!(vm.disks[0].epoch, 2);
    assert_eq!(m["passes"], 2);
    assert_eq!(m["quiesced_at_ms"], 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_lost_at_the_go_ahead_rolls_back_with_a_newer_epoch() {
    let f = fixture().await;
    f.world.lock().unwrap().script = Some(Script::TargetDiesAtGoAhead);
    let (m, phases) = migrate_and_wait(&f).await;
    assert_eq!(
        phases,
        [
            "planned",
            "precopy",
            "quiesced",
            "fencing",
            "fenced",
            "rolling_back",
            "rolled_back"
        ],
        "{m}"
    );
    let s = f.storage.lock().unwrap();
    let lease = s.leases["vm7-disk0"].clone();
    assert_eq!((lease.0, lease.1.as_str()), (3, "kvm-a1"));
    // create (1), to the target (2), back to the source (3).
    assert_eq!(s.fences, 3);
    let w = f.world.lock().unwrap();
    assert_eq!(
        w.resumes,
        vec![(
            0,
            json!({"disks": [{"nbd": "nbd://127.0.0.1:1/vm7-disk0", "lease": lease.2}]})
        )],
        "the source resumes once, with the epoch-3 token"
    );
    assert_eq!(w.vms[&(0, "vm7".to_owned())].0, "running");
    let vm = f.coord.vm("vm7").expect("vm");
    assert_eq!(vm.host, "kvm-a1");
    assert_eq!(vm.disks[0].epoch, 3);
    assert!(
        m["error"].as_str().unwrap_or("").contains("target gone"),
        "{m}"
    );
}

/// Daemons called over https are verified against the CA, and the coordinator
/// presents its own certificate; a daemon whose certificate another CA signed is
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemons_over_https_are_verified_against_the_ca() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki =
        stagehand_common::pki::TestPki::generate(&dir.path().join("pki"), &["coord", "nbd-a1"])
            .expect("pki");
    let other = stagehand_common::pki::TestPki::generate(&dir.path().join("other"), &["rogue"])
        .expect("pki");
    let storage: Shared<Storage> = Arc::default();
    let good = storage_node_tls(
        Arc::clone(&storage),
        Some(
            pki.files("nbd-a1")
                .mutual_server_config()
                .expect("server config"),
        ),
    )
    .await;
    let rogue = storage_node_tls(
        Arc::clone(&storage),
        Some(
            other
                .files("rogue")
                .api_server_config()
                .expect("server config"),
        ),
    )
    .await;
    let mut cfg = service_config(dir.path());
    cfg.tls = Some(pki.files("coord").client_config().expect("client config"));
    let coord = Coordinator::new(Store::open(&dir.path().join("state")).expect("store"), cfg)
        .expect("coordinator");
    coord.add_site("siteA").await.expect("site");
    let node = |name: &str, api: &str| StorageNode {
        name: name.into(),
        site: "siteA".into(),
        api: api.into(),
        nbd: "127.0.0.1:1".into(),
        reachable_from: vec![],
        disk_dir: None,
        token: None,
    };
    // The good node requires a client certificate signed by the CA (mutual TLS).
    coord
        .add_storage(node("nbd-a1", &good))
        .await
        .expect("a node with a CA-signed certificate is reached over https");
    let e = coord
        .add_storage(node("rogue", &rogue))
        .await
        .expect_err("a node signed by another CA is refused");
    assert_eq!(e.code, "storage_unreachable", "{e}");
    // Without TLS configured, the coordinator cannot call the mutual-TLS node.
    let plain = Coordinator::new(
        Store::open(&dir.path().join("state2")).expect("store"),
        service_config(dir.path()),
    )
    .expect("coordinator");
    plain.add_site("siteA").await.expect("site");
    assert!(plain.add_storage(node("nbd-a1", &good)).await.is_err());
}

/// The disk is created without a path (the node's export root) and with reads behind
/// the lease; the agent gets `{nbd, lease}`; a storage node added with a disk
/// directory gets the path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disks_are_created_lease_guarded_and_handed_out_as_nbd_and_lease() {
    let f = fixture().await;
    let (puts, token) = {
        let s = f.storage.lock().unwrap();
        (s.puts.clone(), s.leases["vm7-disk0"].2.clone())
    };
    assert_eq!(
        puts,
        vec![json!({"size_bytes": 1 << 20, "require_lease_for_reads": true})]
    );
    let disks = f.world.lock().unwrap().vms[&(0, "vm7".to_owned())]
        .1
        .clone();
    assert_eq!(
        disks,
        vec![json!({"nbd": "nbd://127.0.0.1:1/vm7-disk0", "lease": token})]
    );
    let mut node = f.coord.storage_nodes().expect("nodes")[0].clone();
    node.name = "nbd-dir".into();
    node.disk_dir = Some("/srv/disks/".into());
    f.coord.add_storage(node).await.expect("storage");
    f.coord
        .create_vm("vm8", vm_request(Some("kvm-a1")))
        .await
        .expect("vm create");
    let puts = f.storage.lock().unwrap().puts.clone();
    // The first node that serves the site is used; either way the flag is there.
    assert!(puts.iter().all(|p| p["require_lease_for_reads"] == true));
}

fn vm_request(host: Option<&str>) -> CreateVmRequest {
    CreateVmRequest {
        site: host.is_none().then(|| "siteA".to_owned()),
        host: host.map(str::to_owned),
        memory_mib: 128,
        vcpus: 1,
        image: "/g.bin".into(),
        load_addr: 0x7c00,
        disk_bytes: 1 << 20,
        disk_image: None,
    }
}

/// `--disk-image` only from the images directory, its size checked before a byte is
/// read, with clear errors; nothing is created when it is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_images_only_from_the_images_dir_and_only_if_they_fit() {
    let f = fixture().await;
    let images = f._dir.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    let outside = f._dir.path().join("secret.img");
    std::fs::write(&outside, b"x").unwrap();
    let big = images.join("big.img");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(2 << 20)
        .unwrap();
    std::fs::write(images.join("ok.img"), vec![7u8; 4096]).unwrap();
    let puts_before = f.storage.lock().unwrap().puts.len();
    let with = |image: &str| CreateVmRequest {
        disk_image: Some(image.to_owned()),
        ..vm_request(None)
    };
    for (image, status, code) in [
        (outside.display().to_string(), 403, "path_not_allowed"),
        ("../secret.img".to_owned(), 403, "path_not_allowed"),
        ("/etc/passwd".to_owned(), 403, "path_not_allowed"),
        ("big.img".to_owned(), 400, "bad_request"),
        ("missing.img".to_owned(), 400, "bad_request"),
    ] {
        let e = f
            .coord
            .create_vm("vm9", with(&image))
            .await
            .expect_err("refused");
        assert_eq!((e.status, e.code), (status, code), "{image}: {e}");
    }
    let e = f.coord.create_vm("vm9", with("big.img")).await.unwrap_err();
    assert!(e.message.contains("larger than the disk"), "{e}");
    assert_eq!(
        f.storage.lock().unwrap().puts.len(),
        puts_before,
        "no export was created for a refused image"
    );
    // An image that fits passes the checks and is written through NBD (here the fake
    // node has no NBD listener: 502, and the export is removed again).
    let e = f
        .coord
        .create_vm("vm9", with(&images.join("ok.img").display().to_string()))
        .await
        .expect_err("no NBD listener");
    assert_eq!(e.code, "storage_unreachable", "{e}");
    assert_eq!(f.storage.lock().unwrap().deletes, 1);
    assert!(f.coord.vm("vm9").is_err());
}

/// A coordinator stopped during a pre-copy that does not converge, and a new one on
/// the same state: the migration gets an executor at once (before any API call), its
/// figures advance, and a cancel is accepted and ends it with the source running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_coordinator_drives_an_unfinished_precopy_at_once() {
    let f = fixture().await;
    f.world.lock().unwrap().script = Some(Script::NeverConverges);
    let doc = f
        .coord
        .start_migration(MigrateRequest {
            vm: "vm7".into(),
            to_site: Some("siteB".into()),
            to_host: None,
            options: MigrationOptions::default(),
        })
        .await
        .expect("migration starts");
    let id = doc.record.id.clone();
    let moving = |c: &Coordinator| {
        c.migration(&id)
            .map(|m| (m.record.phase.name(), m.figures.memory_bytes))
            .expect("migration")
    };
    wait(|| {
        let (phase, bytes) = moving(&f.coord);
        phase == "precopy" && bytes > 0
    })
    .await;
    // Stop the first coordinator (its executor ends; the agent goes on) and open the
    // state again.
    let Fixture {
        coord,
        storage: _storage,
        world,
        _dir: dir,
    } = f;
    coord.shutdown.cancel();
    let gone = Arc::downgrade(&coord);
    drop(coord);
    wait(|| gone.upgrade().is_none()).await;
    // The last executor task may still hold the store for a moment after the
    // coordinator itself is gone: wait until RocksDB's lock is free.
    let mut store = None;
    wait(|| {
        store = Store::open(&dir.path().join("state")).ok();
        store.is_some()
    })
    .await;
    let coord = Coordinator::new(store.expect("store reopens"), service_config(dir.path()))
        .expect("coordinator");
    let before = moving(&coord).1;
    assert_eq!(coord.recover().expect("recover"), 1);
    // Figures advance again.
    wait(|| moving(&coord).1 > before).await;
    // A cancel is accepted at once (it used to answer `not_driven` while the agents
    // moved memory) and ends the migration with the source running.
    coord
        .cancel_migration(&id)
        .expect("cancel after the restart");
    wait(|| moving(&coord).0 == "cancelled").await;
    let vm = coord.vm("vm7").expect("vm");
    assert_eq!(vm.host, "kvm-a1");
    assert_eq!(vm.migration, None);
    assert_eq!(
        world.lock().unwrap().vms[&(0, "vm7".to_owned())].0,
        "running"
    );
    coord.shutdown.cancel();
}

/// Waits (bounded, 10 s) until `cond` holds.
async fn wait(mut cond: impl FnMut() -> bool) {
    let end = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(tokio::time::Instant::now() < end, "timed out");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The agents finish a migration without the go-ahead (the target runs on the
/// source's, soon fenced, token): the running copy is adopted - the disks are fenced
/// to it under a new epoch and it is paused and resumed with the new token - and the
/// migration commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_running_target_is_adopted_with_its_new_token() {
    let f = fixture().await;
    f.world.lock().unwrap().script = Some(Script::CompletesAlone);
    let (m, phases) = migrate_and_wait(&f).await;
    assert_eq!(m["state"], "committed", "{m}");
    assert_eq!(
        phases.last().map(String::as_str),
        Some("committed"),
        "{phases:?}"
    );
    let lease = f.storage.lock().unwrap().leases["vm7-disk0"].clone();
    assert_eq!((lease.0, lease.1.as_str()), (2, "kvm-b1"));
    let w = f.world.lock().unwrap();
    assert_eq!(
        w.resumes,
        vec![(
            1,
            json!({"disks": [{"nbd": "nbd://127.0.0.1:1/vm7-disk0", "lease": lease.2}]})
        )],
        "the target is resumed once, with the epoch-2 token"
    );
    assert_eq!(w.vms[&(1, "vm7".to_owned())].0, "running");
    drop(w);
    assert_eq!(f.coord.vm("vm7").expect("vm").host, "kvm-b1");
}
