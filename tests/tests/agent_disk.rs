//! Guest disks end to end, real processes on loopback: a stagehand-nbd storage node
//! with a leased export, stagehand-agent running the disk-writer guest on it, and
//! checks of both the disk (read through a read-only NBD connection) and guest RAM
//! (memory dumps): records acknowledged to the guest are on the disk, a fence stops
//! the guest's writes without one stale byte landing, a resume with new disk URIs
//! continues, and a live migration keeps disk and RAM consistent.

mod lease_support;
mod migrate_support;

use std::time::{Duration, Instant};

use agent::contract::DiskSpec;
use agent::guests::{
    DISK_WRITER, DISK_WRITER_ACKED_ADDR, DISK_WRITER_LOAD_ADDR, check_ab_ram, check_disk_records,
};
use nbd_client::{Client, ClientOptions};
use reqwest::Method;
use serde_json::json;
use stagehand_common::secret::Secret;

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

    /// The disk as the agent's API takes it: the URI, and the lease in its own field.
    fn uri(&self, token: &str) -> DiskSpec {
        DiskSpec {
            nbd: format!("nbd://{}/disk", self.node.nbd_addr()),
            lease: Some(Secret::new(token).expect("token")),
        }
    }

    fn unix_uri(&self, token: &str) -> DiskSpec {
        DiskSpec {
            nbd: format!(
                "nbd+unix:///disk?socket={}",
                self._dir.path().join("nbd.sock").display()
            ),
            lease: Some(Secret::new(token).expect("token")),
        }
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

fn start_writer(a: &Agent, vm: &str, uri: &DiskSpec) {
    let image = a.images_dir().join("disk-writer.bin");
    std::fs::write(&image, DISK_WRITER).expect("write guest image");
    let v = a.ok(
        "PUT",
        &format!("/v1/vms/{vm}"),
        Some(json!({
            "memory_mib": MEM_MIB, "vcpus": 1,
            "boot": {"flat_binary": image, "load_addr": DISK_WRITER_LOAD_ADDR},
            "disks": [uri]
        })),
    );
    assert_redacted(&v, uri);
    wait_until(Duration::from_secs(30), "'A' on the console", || {
        a.console(vm).contains(&b'A')
    });
}

/// The VM's disks are shown, but never the lease token.
fn assert_redacted(vm: &serde_json::Value, disk: &DiskSpec) {
    assert_eq!(vm["disks"][0], json!({"nbd": disk.nbd}), "{vm}");
    let token = disk.lease.as_ref().expect("a leased disk").expose();
    assert!(!vm.to_string().contains(token), "{vm}");
}

/// Pauses the VM (draining its disk I/O), dumps RAM, and checks RAM (A-B sweep) and
/// disk (records) against each other. Leaves the VM paused; returns acked and disk.
fn pause_and_check(a: &Agent, s: &Storage, vm: &str) -> (u64, Vec<u8>) {
    let t = Instant::now();
    a.ok("POST", &format!("/v1/vms/{vm}/pause"), None);
    let pause = t.elapsed();
    let dump = a.data_dir().join(format!("{vm}.ram"));
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
        json!({"disks": [{"nbd": "http://x"}]}),
        json!({"disks": [uri2, uri2]}),
        json!({"disks": [uri2], "bogus": 1}),
        json!({"disks": [{"nbd": uri2.nbd, "lease": token2, "extra": 1}]}),
    ] {
        let (s, v) = a.request("POST", "/v1/vms/dw/resume", Some(bad));
        assert_eq!(s, 400, "{v}");
    }
    // The token in the URI instead of its field: refused as such, not echoed.
    let in_uri = format!("nbd://{}/disk;lease={token2}", storage.node.nbd_addr());
    let (s, v) = a.request(
        "POST",
        "/v1/vms/dw/resume",
        Some(json!({"disks": [{"nbd": in_uri}]})),
    );
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (400, Some("lease_in_uri")),
        "{v}"
    );
    assert!(!v.to_string().contains(token2.as_str()), "{v}");
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

/// Drives the block device's registers directly (no KVM needed): what a guest driver
/// does, checked against the real storage node.
mod device {
    use agent::devices::block::*;
    use agent::vstate::memory::{create_guest_memory, vmm_bitmap};
    use vm_memory::{Bytes, GuestAddress};

    use super::*;

    fn out32(dev: &BlockDevices, reg: u16, v: u32) {
        dev.pio_write(BLK_PORT_BASE + reg, &v.to_le_bytes());
    }

    fn in32(dev: &BlockDevices, reg: u16) -> u32 {
        let mut b = [0u8; 4];
        dev.pio_read(BLK_PORT_BASE + reg, &mut b);
        u32::from_le_bytes(b)
    }

    /// Issues a request and polls STATUS like a guest; returns the final status.
    fn request(dev: &BlockDevices, cmd: u32, sector: u64, addr: u64, len: u32) -> u32 {
        out32(dev, REG_SECTOR_LO, sector as u32);
        out32(dev, REG_SECTOR_HI, (sector >> 32) as u32);
        out32(dev, REG_ADDR_LO, addr as u32);
        out32(dev, REG_ADDR_HI, (addr >> 32) as u32);
        out32(dev, REG_LENGTH, len);
        out32(dev, REG_COMMAND, cmd);
        let t = Instant::now();
        loop {
            let st = in32(dev, REG_COMMAND);
            if st != STATUS_BUSY {
                return st;
            }
            assert!(t.elapsed() < Duration::from_secs(20), "request never ended");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn registers_drive_nbd_reads_and_writes_with_bounds_and_fencing() {
        let (mut storage, token1) = Storage::start();
        let mem = create_guest_memory(4).expect("4 MiB of guest RAM");
        let dev = BlockDevices::new(
            "dev-test",
            &[storage.uri(&token1)],
            mem.clone(),
            storage.rt.handle().clone(),
        )
        .expect("device");

        assert_eq!(request(&dev, CMD_IDENTIFY, 0, 0, 0), STATUS_OK);
        let sectors = DISK_BYTES / 512;
        assert_eq!(in32(&dev, REG_CAPACITY_LO), sectors as u32);
        assert_eq!(in32(&dev, REG_CAPACITY_HI), 0);

        // WRITE 4 KiB from guest RAM, READ it back elsewhere: the bytes match and the
        // VMM's dirty bitmap marks exactly the pages the device wrote.
        let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
        mem.write_slice(&pattern, GuestAddress(0x1_0000))
            .expect("fill buffer");
        assert_eq!(request(&dev, CMD_WRITE, 10, 0x1_0000, 4096), STATUS_OK);
        vmm_bitmap(&mem).reset();
        assert_eq!(request(&dev, CMD_READ, 10, 0x20_0000, 4096), STATUS_OK);
        let mut back = vec![0u8; 4096];
        mem.read_slice(&mut back, GuestAddress(0x20_0000))
            .expect("read back");
        assert_eq!(back, pattern);
        assert!(
            vmm_bitmap(&mem).is_addr_set(0x20_0000),
            "READ not in the dirty bitmap"
        );
        assert!(!vmm_bitmap(&mem).is_addr_set(0x30_0000));
        assert_eq!(request(&dev, CMD_FLUSH, 0, 0, 0), STATUS_OK);
        assert_eq!(&storage.read()[10 * 512..10 * 512 + 4096], &pattern[..]);

        // Whatever the guest asks, a bad request is an error, never a crash.
        let ram = 4u64 << 20;
        for (cmd, sector, addr, len) in [
            (CMD_READ, 0, ram - 512 + 1, 512),
            (CMD_READ, 0, u64::MAX - 100, 512),
            (CMD_WRITE, 0, 0, 100),
            (CMD_WRITE, 0, 0, 0),
            (CMD_WRITE, 0, 0, (1 << 20) + 512),
            (CMD_READ, sectors - 1, 0, 1024),
            (CMD_WRITE, u64::MAX / 2, 0, 512),
            (CMD_READ, u64::MAX, 0, 512),
            (9, 0, 0, 512),
        ] {
            assert_eq!(
                request(&dev, cmd, sector, addr, len),
                STATUS_ERROR,
                "cmd {cmd} sector {sector} addr {addr:#x} len {len}"
            );
        }
        // The device still works after them.
        assert_eq!(request(&dev, CMD_READ, 10, 0x20_0000, 512), STATUS_OK);

        // Fenced away: writes fail and nothing lands; pause-style quiesce still works.
        let before = storage.read();
        let token2 = storage.fence(2, "kvm-b");
        mem.write_slice(&[0xAB; 512], GuestAddress(0x1_0000))
            .expect("fill buffer");
        assert_eq!(request(&dev, CMD_WRITE, 0, 0x1_0000, 512), STATUS_ERROR);
        assert_eq!(request(&dev, CMD_WRITE, 1, 0x1_0000, 512), STATUS_ERROR);
        dev.quiesce(Duration::from_secs(10)).expect("quiesce");
        assert!(storage.read() == before, "a fenced write landed");

        // New URI with the current token: writing works again.
        let bad = dev.set_uris(&[storage.uri("0000")]);
        assert!(
            bad.as_ref().is_err_and(|e| !e.contains("lease=0000")),
            "{bad:?}"
        );
        dev.set_uris(&[storage.uri(&token2)]).expect("reconnect");
        assert_eq!(request(&dev, CMD_WRITE, 0, 0x1_0000, 512), STATUS_OK);
        dev.quiesce(Duration::from_secs(10)).expect("quiesce");
        assert_eq!(&storage.read()[..512], &[0xAB; 512][..]);
        let saved = dev.save_state();
        assert_eq!(saved[0].capacity, sectors);
        assert_eq!(saved[0].status, STATUS_OK);
        assert!(dev.set_uris(&[]).is_err(), "wrong number of URIs");

        // A cut connection (the storage node restarts): an error for the request that
        // finds it dead, then the device re-opens the disk by itself.
        storage.node = storage.rt.block_on(storage.node.kill9_and_restart());
        let mut statuses = Vec::new();
        while statuses.last() != Some(&STATUS_OK) {
            assert!(statuses.len() < 5, "no reconnect: {statuses:?}");
            statuses.push(request(&dev, CMD_WRITE, 2, 0x1_0000, 512));
        }
        eprintln!("statuses after the storage node restarted: {statuses:?}");
        dev.quiesce(Duration::from_secs(10)).expect("quiesce");
        assert_eq!(&storage.read()[1024..1536], &[0xAB; 512][..]);
    }
}

/// A storage node that stops answering (SIGSTOP) makes pausing a VM with a disk
/// there wait for its writes in flight; calls about other VMs must not queue behind
/// that wait (the agent drains outside its VM table lock).
#[test]
fn a_hung_storage_node_does_not_block_calls_for_other_vms() {
    if !kvm_or_skip("a_hung_storage_node_does_not_block_calls_for_other_vms") {
        return;
    }
    let (storage, token) = Storage::start();
    let a = Agent::start();
    start_writer(&a, "hung", &storage.uri(&token));
    a.start_ab("other", 64);
    let pid = storage.node.pid().expect("storage node runs") as libc::pid_t;
    // SAFETY: signals a child process this test started and still owns.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    // The guest's next write now waits for an answer that does not come.
    std::thread::sleep(Duration::from_millis(300));
    std::thread::scope(|scope| {
        let pausing = scope.spawn(|| {
            let t = Instant::now();
            let (status, v) = a.request("POST", "/v1/vms/hung/pause", None);
            (status, v, t.elapsed())
        });
        std::thread::sleep(Duration::from_millis(500));
        assert!(
            !pausing.is_finished(),
            "pause did not wait for the hung disk"
        );
        let t = Instant::now();
        let other = a.ok("GET", "/v1/vms/other", None);
        let list = a.ok("GET", "/v1/vms", None);
        let took = t.elapsed();
        assert_eq!(other["state"], "running", "{other}");
        assert!(list.as_array().is_some_and(|l| l.len() == 2), "{list}");
        assert!(
            took < Duration::from_secs(2),
            "calls for another VM waited {took:?} behind the hung pause\n{}",
            a.log()
        );
        a.ok("POST", "/v1/vms/other/pause", None);
        // SAFETY: as above.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
        let (status, v, took) = pausing.join().expect("pause thread");
        assert_eq!(
            status,
            200,
            "pause after the node came back: {v}\n{}",
            a.log()
        );
        assert_eq!(v["state"], "paused", "{v}");
        eprintln!(
            "pause of the VM on the hung node took {took:?} (node stopped for ~0.5 s + checks)"
        );
    });
}
