//! Guest disks end to end, real processes on loopback: a stagehand-nbd storage node
//! with a leased export, stagehand-agent running the disk-writer guest on it, and
//! checks of both the disk (read through a read-only NBD connection) and guest RAM
//! (memory dumps): records acknowledged to the guest are on the disk, a fence stops
//! the guest's writes without one stale byte landing, a resume with new disk URIs
//! continues, and a live migration keeps disk and RAM consistent.

mod lease_support;
mod migrate_support;

use std::time::{Duration, Instant};

use agent::guests::{
    DISK_WRITER, DISK_WRITER_ACKED_ADDR, DISK_WRITER_LOAD_ADDR, check_ab_ram, check_disk_records,
};
use nbd_server::client::{Client, ClientOptions};
use reqwest::Method;
use serde_json::json;

use lease_support::Node;
use migrate_support::{Agent, kvm_or_skip, wait_until};

const MEM_MIB: u64 = 128;
const DISK_BYTES: u64 = 8 << 20;
const CHECKED_BYTES: u32 = 1 << 20;

/// A storage node with export `disk`, fenced to epoch 1 for holder "kvm-a".
struct Storage {
    node: Node,
    rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

impl Storage {
    fn start() -> (Storage, String) {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let dir = tempfile::tempdir().expect("tempdir");
        let unix = dir.path().join("nbd.sock").display().to_string();
        let node = rt.block_on(Node::start(
            &dir.path().join("data"),
            &["--unix".to_string(), unix],
            None,
        ));
        let body = json!({"path": dir.path().join("disk.img"), "size_bytes": DISK_BYTES});
        let (s, v) = rt.block_on(node.call(
            Method::PUT,
            "/v1/exports/disk",
            Some(&body.to_string()),
            None,
        ));
        assert_eq!(s.as_u16(), 201, "PUT export: {v}");
        let storage = Storage {
            node,
            rt,
            _dir: dir,
        };
        let token = storage.fence(1, "kvm-a");
        (storage, token)
    }

    fn fence(&self, epoch: u64, holder: &str) -> String {
        let body = json!({"epoch": epoch, "holder": holder}).to_string();
        let (s, v) = self.rt.block_on(self.node.call(
            Method::POST,
            "/v1/exports/disk/fence",
            Some(&body),
            None,
        ));
        assert_eq!(s.as_u16(), 200, "fence to {epoch}: {v}");
        v["token"].as_str().expect("token").to_string()
    }

    fn uri(&self, token: &str) -> String {
        format!("nbd://{}/disk;lease={token}", self.node.nbd_addr())
    }

    fn unix_uri(&self, token: &str) -> String {
        format!(
            "nbd+unix:///disk;lease={token}?socket={}",
            self._dir.path().join("nbd.sock").display()
        )
    }

    /// The disk writer's region of the disk, read through a plain (read-only) export
    /// name with the project's own client.
    fn read(&self) -> Vec<u8> {
        self.rt.block_on(async {
            let c = Client::connect_tcp(&self.node.nbd_addr(), ClientOptions::new("disk"))
                .await
                .expect("read-only NBD connection");
            assert!(c.info().read_only(), "plain export name opens read-only");
            let len = CHECKED_BYTES.min(c.size() as u32);
            let data = c.read(0, len).await.expect("read the disk");
            let _ = c.disconnect().await;
            data
        })
    }
}

fn start_writer(a: &Agent, vm: &str, uri: &str) {
    let image = a.dir.path().join("disk-writer.bin");
    std::fs::write(&image, DISK_WRITER).expect("write guest image");
    let v = a.ok(
        "PUT",
        &format!("/v1/vms/{vm}"),
        Some(json!({
            "memory_mib": MEM_MIB, "vcpus": 1,
            "boot": {"flat_binary": image, "load_addr": DISK_WRITER_LOAD_ADDR},
            "disks": [{"nbd": uri}]
        })),
    );
    assert_redacted(&v, uri);
    wait_until(Duration::from_secs(30), "'A' on the console", || {
        a.console(vm).contains(&b'A')
    });
}

/// The VM's disks are shown, but never the lease token.
fn assert_redacted(vm: &serde_json::Value, uri: &str) {
    let shown = vm["disks"][0]["nbd"].as_str().expect("disk shown");
    let (base, rest) = uri.split_once(";lease=").expect("URI has a token");
    let tail = rest.find('?').map_or("", |i| &rest[i..]);
    assert_eq!(shown, format!("{base};lease=<redacted>{tail}"), "{vm}");
}

/// Pauses the VM (draining its disk I/O), dumps RAM, and checks RAM (A-B sweep) and
/// disk (records) against each other. Leaves the VM paused; returns acked and disk.
fn pause_and_check(a: &Agent, s: &Storage, vm: &str) -> (u64, Vec<u8>) {
    let t = Instant::now();
    a.ok("POST", &format!("/v1/vms/{vm}/pause"), None);
    let pause = t.elapsed();
    let dump = a.dir.path().join(format!("{vm}.ram"));
    a.ok(
        "POST",
        &format!("/v1/vms/{vm}/memory-dump"),
        Some(json!({"path": dump})),
    );
    let ram = std::fs::read(&dump).expect("read dump");
    let _ = std::fs::remove_file(&dump);
    let at = DISK_WRITER_ACKED_ADDR as usize;
    let acked = u64::from_le_bytes(ram[at..at + 8].try_into().expect("8 bytes"));
    if let Err(e) = check_ab_ram(&ram) {
        panic!("A-B RAM check failed on {vm}: {e}");
    }
    let disk = s.read();
    match check_disk_records(&disk, acked) {
        Ok(c) => {
            assert_eq!(c.sectors, u64::from(CHECKED_BYTES) / 512);
            eprintln!(
                "{vm}: acked {acked}, in flight landed {}, pause (drain + flush) {pause:?}",
                c.in_flight_landed
            );
        }
        Err(e) => panic!("disk records of {vm} are wrong: {e}\n{}", a.log()),
    }
    (acked, disk)
}

fn count(bytes: &[u8], b: u8) -> usize {
    bytes.iter().filter(|&&x| x == b).count()
}

#[test]
fn disk_writer_survives_pause_fence_and_rollback() {
    if !kvm_or_skip("disk_writer_survives_pause_fence_and_rollback") {
        return;
    }
    let (storage, token1) = Storage::start();
    let uri1 = storage.uri(&token1);
    let a = Agent::start();
    start_writer(&a, "dw", &uri1);
    std::thread::sleep(Duration::from_secs(2));

    let (acked1, _) = pause_and_check(&a, &storage, "dw");
    assert!(acked1 > 0, "no record acknowledged in 2 s\n{}", a.log());
    a.ok("POST", "/v1/vms/dw/resume", None);
    let t = Instant::now();
    std::thread::sleep(Duration::from_millis(700));
    let (acked2, _) = pause_and_check(&a, &storage, "dw");
    assert!(acked2 > acked1, "writing stopped: {acked1} -> {acked2}");
    eprintln!(
        "disk writer: {:.0} records/s (512-byte writes, one at a time, plus a 1 MiB RAM sweep each)",
        (acked2 - acked1) as f64 / t.elapsed().as_secs_f64()
    );
    a.ok("POST", "/v1/vms/dw/resume", None);

    // Fence the disk away while the guest writes: it sees errors and stops acking.
    let errors_before = count(&a.console("dw"), b'E');
    let token2 = storage.fence(2, "kvm-b");
    wait_until(Duration::from_secs(10), "'E' on the console", || {
        count(&a.console("dw"), b'E') > errors_before
    });
    let (acked3, disk3) = pause_and_check(&a, &storage, "dw");
    assert!(acked3 >= acked2);
    a.ok("POST", "/v1/vms/dw/resume", None);
    std::thread::sleep(Duration::from_secs(1));
    let (acked4, disk4) = pause_and_check(&a, &storage, "dw");
    assert_eq!(acked4, acked3, "records acknowledged after the fence");
    assert!(
        disk3 == disk4,
        "a stale write landed on the disk after the fence"
    );
    assert_eq!(a.vm_state("dw").as_deref(), Some("paused"));

    // Roll back: new URI (the epoch-2 token, over the node's Unix socket this time),
    // resume, writing continues.
    let uri2 = storage.unix_uri(&token2);
    let v = a.ok("POST", "/v1/vms/dw/resume", Some(json!({"disks": [uri2]})));
    assert_eq!(v["state"], "running", "{v}");
    assert_redacted(&v, &uri2);
    let t = Instant::now();
    let mut acked5 = acked4;
    while acked5 <= acked4 {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "no progress after the new disk URI\n{}",
            a.log()
        );
        std::thread::sleep(Duration::from_millis(500));
        acked5 = pause_and_check(&a, &storage, "dw").0;
        a.ok("POST", "/v1/vms/dw/resume", None);
    }

    // Bad resume bodies are refused clearly, and disks change only while paused.
    for bad in [
        json!({"disks": ["http://x"]}),
        json!({"disks": [uri2, uri2]}),
        json!({"disks": [uri2], "bogus": 1}),
    ] {
        let (s, v) = a.request("POST", "/v1/vms/dw/resume", Some(bad));
        assert_eq!(s, 400, "{v}");
    }
    let (s, v) = a.request("POST", "/v1/vms/dw/resume", Some(json!({"disks": [uri2]})));
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (409, Some("wrong_state")),
        "{v}"
    );

    let log = a.log();
    for t in [&token1, &token2] {
        assert!(
            !log.contains(t.as_str()),
            "a lease token is in the agent log"
        );
    }
    a.ok("DELETE", "/v1/vms/dw", None);
}

#[test]
fn disk_writer_migrates_with_its_disk() {
    if !kvm_or_skip("disk_writer_migrates_with_its_disk") {
        return;
    }
    let (storage, token) = Storage::start();
    let (src, dst) = (Agent::start(), Agent::start());
    start_writer(&src, "dwm", &storage.uri(&token));
    std::thread::sleep(Duration::from_secs(1));
    let id = src.ok(
        "POST",
        "/v1/vms/dwm/migrate",
        // The guest dirties all of 1..100 MiB about twice a second: auto-converge
        // throttles it until the last pass fits.
        Some(json!({"target": dst.migration, "auto_converge": true, "downtime_limit_ms": 500, "timeout_s": 120})),
    )["migration_id"]
        .as_str()
        .expect("migration id")
        .to_string();
    let m = src.wait_migration_end(&id, Duration::from_secs(120));
    assert_eq!(m["state"], "completed", "{m}\n{}\n{}", src.log(), dst.log());
    assert_eq!(dst.vm_state("dwm").as_deref(), Some("running"));
    eprintln!(
        "migration with a disk: total {} ms, downtime {} ms, {} passes",
        m["total_ms"],
        m["downtime_ms"],
        m["passes"].as_array().map_or(0, Vec::len)
    );
    assert_eq!(src.vm_state("dwm"), None, "the source copy is gone");

    let (acked1, _) = pause_and_check(&dst, &storage, "dwm");
    assert!(acked1 > 0);
    dst.ok("POST", "/v1/vms/dwm/resume", None);
    let t = Instant::now();
    let mut acked2 = acked1;
    while acked2 <= acked1 {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the migrated guest does not write\n{}",
            dst.log()
        );
        std::thread::sleep(Duration::from_millis(500));
        acked2 = pause_and_check(&dst, &storage, "dwm").0;
        dst.ok("POST", "/v1/vms/dwm/resume", None);
    }
    assert!(!dst.log().contains(&token) && !src.log().contains(&token));
}
