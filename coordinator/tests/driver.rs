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
}

type Shared<T> = Arc<Mutex<T>>;

async fn serve(app: Router) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(l, app).await });
    format!("http://{addr}")
}

async fn storage_node(st: Shared<Storage>) -> String {
    let app = Router::new()
        .route("/v1/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route(
            "/v1/exports/{name}",
            put(|Path(name): Path<String>| async move {
                (
                    StatusCode::CREATED,
                    Json(json!({"name": name, "size_bytes": 1 << 20, "lease": null})),
                )
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
    serve(app).await
}

/// How the fake source agent's migration behaves.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Script {
    /// Quiesces, then completes at the go-ahead.
    Normal,
    /// Quiesces, then fails when the go-ahead arrives (the target vanished).
    TargetDiesAtGoAhead,
}

#[derive(Default)]
struct World {
    /// (agent index, vm) -> (state, disks)
    vms: HashMap<(usize, String), (String, Vec<String>)>,
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
        Router::new()
            .route(
                "/v1/health",
                get(|| async { Json(json!({"status": "ok"})) }),
            )
            .route(
                "/v1/vms/{name}",
                put(
                    |State(a): State<AgentState>,
                     Path(name): Path<String>,
                     Json(b): Json<Value>| async move {
                        let disks = b["disks"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(|d| d["nbd"].as_str().map(str::to_owned))
                            .collect();
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
                    if w.migration == "active" && w.polls > 3 {
                        w.migration = "quiesced".into();
                    }
                    let error = (w.migration == "failed")
                        .then(|| json!({"code": "connection", "message": "target gone"}));
                    Json(json!({
                        "state": w.migration, "total_ms": 40.0, "downtime_ms": 7.0,
                        "ram_transferred_bytes": 4096.0, "total_bytes": 8192.0,
                        "passes": [{}, {}], "quiesced_at_ms": 30.0, "error": error,
                    }))
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
                            Script::Normal => {
                                let disks = b["disks"]
                                    .as_array()
                                    .into_iter()
                                    .flatten()
                                    .filter_map(|d| d.as_str().map(str::to_owned))
                                    .collect();
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
        Store::open(dir.path()).expect("store"),
        ServiceConfig {
            cluster_token: None,
            max_migrations_per_host: 2,
            max_migrations_per_site: 4,
        },
    );
    coord.add_site("siteA").await.expect("site");
    coord.add_site("siteB").await.expect("site");
    coord
        .add_storage(StorageNode {
            name: "nbd-a1".into(),
            site: "siteA".into(),
            api: nbd_api,
            nbd: "127.0.0.1:1".into(),
            reachable_from: vec!["siteB".into()],
            disk_dir: "/d".into(),
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
    assert_eq!(
        w.go_aheads,
        vec![json!({"disks": [format!("nbd://127.0.0.1:1/vm7-disk0;lease={}", lease.2)]})]
    );
    assert_eq!(
        w.vms[&(1, "vm7".to_owned())].1[0],
        format!("nbd://127.0.0.1:1/vm7-disk0;lease={}", lease.2)
    );
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
            json!({"disks": [format!("nbd://127.0.0.1:1/vm7-disk0;lease={}", lease.2)]})
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
