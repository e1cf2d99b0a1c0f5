//! The stale-writer test: several connections write continuously with the epoch-1
//! token (the project's own client, python3-libnbd, qemu-io), the disk is fenced to
//! epoch 2 mid-stream, and the backing file's checksum taken the moment the fence
//! returns never changes while the stale writers keep trying; every stale attempt
//! started after the fence fails.

mod lease_support;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nbd_client::{Client, ClientOptions};
use nbd_proto::consts::EPERM;

use lease_support::{
    Node, PyWriter, backing_file, checksum, have, have_python_libnbd, monotonic_ns,
};

const DISK_BYTES: u64 = 8 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_stale_byte_lands_after_fence() {
    if !have_python_libnbd() || !have("qemu-io") {
        stagehand_tests::skip!("SKIPPED: python3-libnbd or qemu-io missing (make deps)");
        return;
    }
    tokio::time::timeout(Duration::from_secs(120), run())
        .await
        .expect("test finished in time");
}

async fn run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = backing_file(dir.path(), "disk.img", DISK_BYTES);
    let node = Node::start(
        &dir.path().join("data"),
        &["--export".to_string(), format!("disk={}", disk.display())],
        None,
    )
    .await;
    let token1 = node.fence("disk", 1).await;
    let addr = node.nbd_addr();
    let export1 = format!("disk;lease={token1}");

    // Real client 1: python3-libnbd, two processes of two connections each, writing
    // different regions for 2.5 s: one writes one block at a time, the other keeps
    // 32 writes in flight per connection, so that requests are queued in the server
    // when the fence comes.
    let mut py = Vec::new();
    for (p, depth) in [(0u64, 1usize), (1, 32)] {
        let (w, refused) = PyWriter::start_pipelined(&addr, &export1, 2.5, 2, p << 20, depth);
        assert_eq!(refused, None, "epoch-1 token refused");
        py.push(w);
    }
    // The project's own client: 4 connections with 8 writes in flight each.
    let stop = Arc::new(AtomicBool::new(false));
    let mut ours = Vec::new();
    for conn in 0..4u64 {
        let client = Arc::new(
            Client::connect_tcp(&addr, ClientOptions::new(&export1))
                .await
                .expect("own client binds with the epoch-1 token"),
        );
        for lane in 0..8u64 {
            let client = Arc::clone(&client);
            let stop = Arc::clone(&stop);
            ours.push(tokio::spawn(async move {
                own_writer(client, stop, (2 << 20) + (conn * 8 + lane) * 32 * 4096).await
            }));
        }
    }
    // Real client 2: qemu-io, one connection, a write every few milliseconds.
    let mut qemu_args = vec!["-f".to_string(), "raw".to_string()];
    for i in 0..400u64 {
        qemu_args.push("-c".into());
        qemu_args.push(format!(
            "write -P {} {} 4k",
            i % 251,
            (4 << 20) + (i % 256) * 4096
        ));
        qemu_args.push("-c".into());
        qemu_args.push("sleep 5".into());
    }
    qemu_args.push(format!("nbd://{addr}/{export1}"));
    let qemu = Command::new("qemu-io")
        .args(&qemu_args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn qemu-io");

    tokio::time::sleep(Duration::from_millis(700)).await;
    let token2 = node.fence("disk", 2).await;
    let fenced_at = monotonic_ns();
    let sum_at_fence = checksum(&disk);

    // The stale writers go on; sample the file while they do.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(
            checksum(&disk),
            sum_at_fence,
            "a stale write landed after the fence"
        );
    }

    stop.store(true, Ordering::SeqCst);
    let mut stale_attempts = 0;
    let mut eperm = 0;
    for task in ours {
        let attempts = task.await.expect("own writer task");
        assert!(
            attempts.iter().any(|a| a.0 < fenced_at && a.1.is_none()),
            "own client never wrote before the fence"
        );
        let after: Vec<_> = attempts.iter().filter(|a| a.0 > fenced_at).collect();
        assert!(
            !after.is_empty(),
            "own client stopped trying after the fence"
        );
        assert!(
            after.iter().all(|a| a.1.is_some()),
            "a stale write of the own client succeeded after the fence"
        );
        eperm += attempts.iter().filter(|a| a.1 == Some(Some(EPERM))).count();
        stale_attempts += after.len();
    }
    // Requests already queued on a fenced connection are answered NBD_EPERM (the
    // rest fail because the server closed the connection).
    assert!(eperm > 0, "no stale write was answered with NBD_EPERM");
    for w in py {
        let report = w.finish(Duration::from_secs(30));
        let before = report
            .attempts
            .iter()
            .filter(|a| a.0 < fenced_at && a.1)
            .count();
        assert!(before > 0, "python writer never wrote before the fence");
        let after: Vec<_> = report.attempts.iter().filter(|a| a.0 > fenced_at).collect();
        assert!(
            !after.is_empty(),
            "python writer stopped trying after the fence"
        );
        assert!(
            after.iter().all(|a| !a.1),
            "a stale python write succeeded after the fence"
        );
        stale_attempts += after.len();
    }
    let out = tokio::task::spawn_blocking(move || qemu.wait_with_output())
        .await
        .expect("join")
        .expect("qemu-io ran");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("wrote 4096/4096"),
        "qemu-io never wrote: {text}"
    );
    assert!(
        text.contains("write failed"),
        "qemu-io's stale writes did not fail: {}",
        &text[text.len().saturating_sub(2000)..]
    );
    assert_eq!(
        checksum(&disk),
        sum_at_fence,
        "a stale write landed after the fence"
    );
    assert!(stale_attempts > 0);

    // The new holder writes, and that does change the file.
    let (w, refused) = PyWriter::start(&addr, &format!("disk;lease={token2}"), 0.1, 1, 0);
    assert_eq!(refused, None, "epoch-2 token refused");
    let report = w.finish(Duration::from_secs(20));
    assert!(!report.attempts.is_empty() && report.attempts.iter().all(|a| a.1));
    assert_ne!(checksum(&disk), sum_at_fence);
}

/// One lane of the own client: writes a different 4 KiB block each time until told
/// to stop, recording (start time, None on success or Some(errno) on failure).
async fn own_writer(
    client: Arc<Client>,
    stop: Arc<AtomicBool>,
    base: u64,
) -> Vec<(u64, Option<Option<u32>>)> {
    let mut attempts = Vec::new();
    let mut i = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let data: Vec<u8> = (0..4096u64).map(|b| (b ^ i ^ base) as u8).collect();
        let start = monotonic_ns();
        match client.write(base + (i % 32) * 4096, &data, false).await {
            Ok(()) => attempts.push((start, None)),
            Err(e) => {
                attempts.push((start, Some(e.errno())));
                // A closed connection fails at once; do not spin.
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        i += 1;
    }
    attempts
}
