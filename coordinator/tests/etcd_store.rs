//! The etcd store against a real (single-member) etcd: two coordinators' stores
//! campaign, one leads; a deposed leader's writes are refused and change nothing;
//! reads, expectations and change notifications work as on RocksDB.
//! Skips loudly without the `etcd` binary (`make deps` installs Debian's etcd-server).

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use coordinator::store::etcd::{EtcdConfig, EtcdStore};
use coordinator::store::{Backend, Batch, Expect, Role, Store, StoreError};

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A one-member etcd in `dir`; None (after a loud skip) without the binary.
fn etcd(dir: &std::path::Path) -> Option<(Killed, String)> {
    if Command::new("etcd").arg("--version").output().is_err() {
        eprintln!("SKIPPED: etcd missing (run `make deps`: Debian's etcd-server)");
        return None;
    }
    let (c, p) = (port(), port());
    let curl = format!("http://127.0.0.1:{c}");
    let purl = format!("http://127.0.0.1:{p}");
    let child = Command::new("etcd")
        .args(["--name", "e0", "--data-dir"])
        .arg(dir.join("e0"))
        .args([
            "--listen-client-urls",
            &curl,
            "--advertise-client-urls",
            &curl,
            "--listen-peer-urls",
            &purl,
            "--initial-advertise-peer-urls",
            &purl,
            "--initial-cluster",
            &format!("e0={purl}"),
        ])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("etcd.log")).expect("log"))
        .spawn()
        .expect("spawn etcd");
    Some((Killed(child), format!("etcd://127.0.0.1:{c}")))
}

fn connect(uri: &str) -> Arc<EtcdStore> {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        match EtcdStore::connect(EtcdConfig::parse(uri, None).expect("uri")) {
            // Connected is not serving yet: wait for a read.
            Ok(s) if s.get("sites", "probe").is_ok() => return Arc::new(s),
            Ok(_) => {}
            Err(e) => eprintln!("etcd not up yet: {e}"),
        }
        assert!(Instant::now() < end, "etcd did not come up");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn wait_role(store: &Store, want: impl Fn(&Role) -> bool, what: &str) -> Role {
    let end = Instant::now() + Duration::from_secs(15);
    loop {
        let r = store.role().borrow().clone();
        if want(&r) {
            return r;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}: {r:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_deposed_leader_writes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some((_etcd, uri)) = etcd(dir.path()) else {
        return;
    };
    let a_backend = connect(&uri);
    let b_backend = connect(&uri);
    let a = Store::from_backend(a_backend.clone());
    let b = Store::from_backend(b_backend.clone());
    // A store that does not campaign never writes.
    assert!(matches!(
        a.put("sites", "x", &1u32),
        Err(StoreError::NotLeader)
    ));

    a_backend.start_election("a".into(), "http://a".into(), Duration::from_secs(1));
    wait_role(&a, |r| matches!(r, Role::Leader(_)), "a to lead");
    b_backend.start_election("b".into(), "http://b".into(), Duration::from_secs(1));
    let r = wait_role(
        &b,
        |r| matches!(r, Role::Follower(Some(_))),
        "b to follow a",
    );
    assert!(matches!(r, Role::Follower(Some(ref l)) if l.id == "a" && l.url == "http://a"));

    // The leader writes; everyone reads; expectations and notifications work.
    let changes = b.changes();
    let seen = *changes.borrow();
    let mut batch = Batch::default();
    batch.expect("vms", "vm1", Expect::Absent);
    batch.put("vms", "vm1", &1u32).expect("encode");
    batch.put("journal", "m1/001", &"planned").expect("encode");
    a.commit(batch).expect("the leader writes");
    assert_eq!(b.get::<u32>("vms", "vm1").expect("read"), Some(1));
    let end = Instant::now() + Duration::from_secs(5);
    while *changes.borrow() == seen {
        assert!(Instant::now() < end, "no change notification");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut batch = Batch::default();
    batch.expect("vms", "vm1", Expect::Absent);
    batch.put("vms", "vm1", &2u32).expect("encode");
    assert!(matches!(a.commit(batch), Err(StoreError::Conflict { .. })));
    assert_eq!(
        a.list::<u32>("vms").expect("list"),
        vec![("vm1".to_owned(), 1)]
    );
    // A follower's writes are refused.
    assert!(matches!(
        b.put("vms", "vm1", &3u32),
        Err(StoreError::NotLeader)
    ));

    // Depose A behind its back: its election key goes (as when its lease expires while
    // it is paused), and B takes over.
    let raw = etcd_delete_leader(&uri);
    assert!(raw, "could not delete the leader key");
    wait_role(&b, |r| matches!(r, Role::Leader(_)), "b to lead");
    // A has not noticed yet, or has: either way nothing it writes lands.
    let before = a.refused_writes();
    let r = a.put("vms", "vm1", &99u32);
    assert!(matches!(r, Err(StoreError::NotLeader)), "{r:?}");
    assert_eq!(a.refused_writes(), before + 1);
    assert_eq!(b.get::<u32>("vms", "vm1").expect("read"), Some(1));
    wait_role(
        &a,
        |r| matches!(r, Role::Follower(Some(l)) if l.id == "b"),
        "a to follow b",
    );
    b.put("vms", "vm1", &5u32).expect("the new leader writes");
    assert_eq!(a.get::<u32>("vms", "vm1").expect("read"), Some(5));
    let h = a.health();
    assert!(
        h.healthy && h.kind == "etcd" && h.members.len() == 1,
        "{h:?}"
    );
    assert!(h.members[0].healthy, "{h:?}");
}

/// Deletes the election key with a plain etcd client (as its lease expiring would).
fn etcd_delete_leader(uri: &str) -> bool {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let ep = uri.trim_start_matches("etcd://").to_owned();
    rt.block_on(async move {
        let Ok(mut c) = etcd_client::Client::connect([format!("http://{ep}")], None).await else {
            return false;
        };
        c.delete("/stagehand/leader", None)
            .await
            .is_ok_and(|r| r.deleted() == 1)
    })
}

#[test]
fn bad_store_uris_are_clear_errors() {
    for bad in ["http://h:1", "etcd://", "etcd://h", "etcd://h:port"] {
        let e = EtcdConfig::parse(bad, None).expect_err(bad);
        assert!(e.to_string().contains("--store"), "{bad}: {e}");
    }
    let c = EtcdConfig::parse("etcd://a:1,b:2/", None).expect("valid");
    assert_eq!(c.endpoints, vec!["a:1", "b:2"]);
}

/// A table larger than one gRPC message (the client decodes at most 4 MiB) and than
/// one page of the listing: every record comes back, in key order.
#[test]
fn a_large_table_lists_completely() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some((_etcd, uri)) = etcd(dir.path()) else {
        return;
    };
    let backend = connect(&uri);
    backend.start_election("big".into(), String::new(), Duration::from_secs(2));
    let store = Store::from_backend(backend);
    wait_role(&store, |r| matches!(r, Role::Leader(_)), "a leader");
    // 2,400 records of about 2.3 KiB: 5.5 MiB in all (etcd takes at most 1.5 MiB in
    // one request, so the batches stay small).
    let pad = "x".repeat(2300);
    let mut b = Batch::default();
    for i in 0..2400 {
        b.put(
            "vms",
            &format!("vm-{i:05}"),
            &serde_json::json!({"i": i, "pad": pad}),
        )
        .expect("encode");
        if (i + 1) % 100 == 0 {
            store.commit(std::mem::take(&mut b)).expect("commit");
        }
    }
    let all: Vec<(String, serde_json::Value)> = store.list("vms").expect("list every VM");
    assert_eq!(all.len(), 2400);
    for (i, (k, v)) in all.iter().enumerate() {
        assert_eq!(k, &format!("vm-{i:05}"));
        assert_eq!(v["i"], i);
    }
    // Other tables are not mixed in.
    store.put("sites", "siteA", &1u32).expect("put");
    assert_eq!(store.list::<u32>("sites").expect("list").len(), 1);
}
