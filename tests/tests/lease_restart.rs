//! kill -9 the storage node after a fence: on restart the old token is refused and
//! the new one writes; exports added through the API come back.

mod lease_support;

use std::time::Duration;

use lease_support::{Node, PyWriter, backing_file, have_python_libnbd};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fence_survives_kill_9() {
    if !have_python_libnbd() {
        stagehand_tests::skip!("SKIPPED: python3-libnbd missing (make deps)");
        return;
    }
    tokio::time::timeout(Duration::from_secs(120), run())
        .await
        .expect("test finished in time");
}

async fn run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = backing_file(dir.path(), "disk.img", 8 << 20);
    let node = Node::start(
        &dir.path().join("data"),
        &["--export".to_string(), format!("disk={}", disk.display())],
        None,
    )
    .await;

    // An export added at runtime must also survive.
    let extra = dir.path().join("extra.img");
    let body = json!({"path": extra, "size_bytes": 1 << 20}).to_string();
    let (s, v) = node
        .call(reqwest::Method::PUT, "/v1/exports/extra", Some(&body), None)
        .await;
    assert_eq!(s, reqwest::StatusCode::CREATED, "{v}");

    let token1 = node.fence("disk", 1).await;
    let addr = node.nbd_addr();
    let (w, refused) = PyWriter::start(&addr, &format!("disk;lease={token1}"), 0.2, 1, 0);
    assert_eq!(refused, None);
    let report = w.finish(Duration::from_secs(20));
    assert!(
        report.attempts.iter().any(|a| a.1),
        "epoch-1 holder could not write"
    );

    let token2 = node.fence("disk", 2).await;
    let extra_token = node.fence("extra", 9).await;
    let node = node.kill9_and_restart().await;
    let addr = node.nbd_addr();

    let (_w, refused) = PyWriter::start(&addr, &format!("disk;lease={token1}"), 0.2, 1, 0);
    assert!(refused.is_some(), "old token accepted after restart");

    let (w, refused) = PyWriter::start(&addr, &format!("disk;lease={token2}"), 0.2, 1, 0);
    assert_eq!(refused, None, "new token refused after restart");
    let report = w.finish(Duration::from_secs(20));
    assert!(!report.attempts.is_empty());
    assert!(
        report.attempts.iter().all(|a| a.1),
        "new holder's writes failed"
    );

    let (s, v) = node
        .call(reqwest::Method::GET, "/v1/exports/disk", None, None)
        .await;
    assert_eq!(s, reqwest::StatusCode::OK);
    assert_eq!(v["lease"], json!({"holder": "holder-2", "epoch": 2}));
    // Epochs never go back: the restarted node refuses a fence to 2 again.
    let (s, v) = node.try_fence("disk", 2).await;
    assert_eq!(s, reqwest::StatusCode::CONFLICT, "{v}");
    assert_eq!(v["error"]["code"], "stale_epoch");

    let (s, v) = node
        .call(reqwest::Method::GET, "/v1/exports/extra", None, None)
        .await;
    assert_eq!(s, reqwest::StatusCode::OK, "API-added export lost: {v}");
    assert_eq!(v["lease"]["epoch"], 9);
    let (w, refused) = PyWriter::start(&addr, &format!("extra;lease={extra_token}"), 0.1, 1, 0);
    assert_eq!(refused, None);
    assert!(
        w.finish(Duration::from_secs(20))
            .attempts
            .iter()
            .all(|a| a.1)
    );
}
