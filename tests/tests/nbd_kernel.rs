//! The Linux kernel's NBD client (`nbd-client` + the `nbd` module) against a real
//! `stagehand-nbd`: export listing, then /dev/nbdX connected with a lease token,
//! direct-I/O writes and reads with dd checked against the backing file, mkfs.ext4 +
//! mount + a file round trip, a fence that cuts the kernel's writes off without a
//! byte landing, and a clean disconnect.
//!
//! Needs root, `nbd-client` (Debian package nbd-client, `make deps`) and a kernel
//! with NBD (`modprobe nbd`); each part skips loudly naming what is missing.

mod lease_support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use lease_support::{Node, backing_file, checksum};
use stagehand_tests::{pattern, run_ok, run_timeout};

const DISK_BYTES: u64 = 64 << 20;
const LIMIT: Duration = Duration::from_secs(60);

fn nbd_client() -> Option<PathBuf> {
    [
        "/usr/sbin/nbd-client",
        "/sbin/nbd-client",
        "/usr/bin/nbd-client",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

/// Why the kernel's NBD client cannot be used here, if it cannot.
fn kernel_nbd_missing() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("root (connecting /dev/nbdX and mounting need it)".into());
    }
    if !Path::new("/sys/module/nbd").exists() {
        // Best effort: the module may just not be loaded yet.
        let _ = Command::new("modprobe")
            .args(["nbd", "nbds_max=16"])
            .status();
    }
    if !Path::new("/sys/module/nbd").exists() || !Path::new("/dev/nbd0").exists() {
        return Some("the kernel's nbd module (CONFIG_BLK_DEV_NBD; `modprobe nbd`)".into());
    }
    None
}

/// An NBD device no one uses (no `pid` attribute: not connected).
fn free_device() -> Option<String> {
    (0..64).find_map(|i| {
        let dev = format!("/dev/nbd{i}");
        let busy = Path::new(&format!("/sys/block/nbd{i}/pid")).exists();
        (Path::new(&dev).exists() && !busy).then_some(dev)
    })
}

/// The device's size in bytes as the kernel sees it (0 while not connected).
fn device_bytes(dev: &str) -> u64 {
    let name = dev.trim_start_matches("/dev/");
    std::fs::read_to_string(format!("/sys/block/{name}/size"))
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map_or(0, |sectors| sectors * 512)
}

/// Disconnects the device on drop, so a failing test leaves no device behind.
struct Connected {
    client: PathBuf,
    dev: String,
}

impl Drop for Connected {
    fn drop(&mut self) {
        let _ = run_timeout(
            Command::new(&self.client).args(["-d", &self.dev]),
            Duration::from_secs(20),
        );
    }
}

fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len];
    std::fs::File::open(path)
        .expect("open backing file")
        .read_exact_at(&mut buf, offset)
        .expect("read backing file");
    buf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbd_client_lists_exports() {
    let Some(client) = nbd_client() else {
        stagehand_tests::skip!("SKIPPED: nbd-client missing (make deps)");
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let a = backing_file(dir.path(), "a.img", 1 << 20);
    let b = backing_file(dir.path(), "b.img", 1 << 20);
    let node = Node::start(
        &dir.path().join("data"),
        &[
            "--export".to_string(),
            format!("alpha={}", a.display()),
            "--export".to_string(),
            format!("beta={},unleased", b.display()),
        ],
        None,
    )
    .await;
    // `-l` is nbd-client's own handshake (NBD_OPT_LIST); no kernel needed.
    let out = run_ok(
        Command::new(&client).args(["-l", "127.0.0.1", &node.nbd_port.to_string()]),
        LIMIT,
    );
    // One export a line, `NAME` or `NAME: DESCRIPTION`.
    let names: Vec<&str> = out
        .lines()
        .map(|l| l.split(": ").next().unwrap_or("").trim())
        .collect();
    assert!(names.contains(&"alpha") && names.contains(&"beta"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_client_writes_reads_mounts_and_is_fenced() {
    let Some(client) = nbd_client() else {
        stagehand_tests::skip!("SKIPPED: nbd-client missing (make deps)");
        return;
    };
    if let Some(missing) = kernel_nbd_missing() {
        stagehand_tests::skip!("SKIPPED: the kernel NBD client test needs {missing}");
        return;
    }
    let Some(dev) = free_device() else {
        stagehand_tests::skip!("SKIPPED: every /dev/nbdX is in use");
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = backing_file(dir.path(), "disk.img", DISK_BYTES);
    let node = Node::start(
        &dir.path().join("data"),
        &["--export".to_string(), format!("disk={}", disk.display())],
        None,
    )
    .await;
    let token = node.fence("disk", 1).await;
    let port = node.nbd_port.to_string();
    let name = format!("disk;lease={token}");
    run_ok(
        Command::new(&client).args([
            "-N",
            &name,
            "-b",
            "4096",
            "-t",
            "20",
            "127.0.0.1",
            &port,
            &dev,
        ]),
        LIMIT,
    );
    let _connected = Connected {
        client: client.clone(),
        dev: dev.clone(),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while device_bytes(&dev) != DISK_BYTES {
        assert!(
            Instant::now() < deadline,
            "{dev} never showed {DISK_BYTES} bytes (has {})",
            device_bytes(&dev)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Direct I/O with dd: the bytes go through our server to the backing file.
    let data = pattern(1 << 20, 7);
    let src = dir.path().join("pattern.bin");
    std::fs::write(&src, &data).expect("write pattern");
    run_ok(
        Command::new("dd").args([
            &format!("if={}", src.display()),
            &format!("of={dev}"),
            "bs=1M",
            "seek=4",
            "count=1",
            "oflag=direct",
            "conv=fsync",
        ]),
        LIMIT,
    );
    assert!(
        read_at(&disk, 4 << 20, 1 << 20) == data,
        "the backing file lacks what dd wrote"
    );
    let back = dir.path().join("back.bin");
    run_ok(
        Command::new("dd").args([
            &format!("if={dev}"),
            &format!("of={}", back.display()),
            "bs=1M",
            "skip=4",
            "count=1",
            "iflag=direct",
        ]),
        LIMIT,
    );
    assert!(
        std::fs::read(&back).expect("read back") == data,
        "read back differs"
    );

    // A file system on it: mkfs (TRIM, WRITE_ZEROES, FLUSH), mount, a file round trip.
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F", &dev]), LIMIT);
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).expect("mount point");
    let mount = run_timeout(
        Command::new("mount").args([&dev, mnt.to_str().expect("utf-8 path")]),
        LIMIT,
    )
    .expect("mount runs");
    if mount.status.success() {
        let file = mnt.join("hello.bin");
        let contents = pattern(300 << 10, 11);
        std::fs::write(&file, &contents).expect("write through ext4");
        run_ok(Command::new("umount").arg(&mnt), LIMIT);
        run_ok(
            Command::new("mount").args([&dev, mnt.to_str().expect("utf-8 path")]),
            LIMIT,
        );
        let again = std::fs::read(&file).expect("read through ext4");
        run_ok(Command::new("umount").arg(&mnt), LIMIT);
        assert!(again == contents, "ext4 file changed across a remount");
    } else {
        stagehand_tests::skip!(
            "SKIPPED (part): mount {dev} failed: {}",
            String::from_utf8_lossy(&mount.stderr)
        );
    }

    // Fence the kernel's lease away: its writes fail and nothing lands.
    node.fence("disk", 2).await;
    let sum = checksum(&disk);
    let stale = run_timeout(
        Command::new("dd").args([
            &format!("if={}", src.display()),
            &format!("of={dev}"),
            "bs=1M",
            "seek=8",
            "count=1",
            "oflag=direct",
            "conv=fsync",
        ]),
        LIMIT,
    )
    .expect("dd runs");
    assert!(!stale.status.success(), "a fenced kernel client wrote");
    assert_eq!(checksum(&disk), sum, "a byte landed after the fence");
}
