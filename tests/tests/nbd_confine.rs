//! A hostile holder of the control API token: it can only export files under the
//! operator's `--export-root` and block devices listed with `--allow-device`, and an
//! export added with `require_lease_for_reads` gives nothing to a client without the
//! lease.

mod lease_support;

use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;
use std::time::Duration;

use lease_support::{Node, backing_file, have};
use nbd_client::{Client, ClientError, ClientOptions};
use nbd_proto::consts::REP_ERR_POLICY;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// Some block device of this machine, if there is one.
fn a_block_device() -> Option<PathBuf> {
    std::fs::read_dir("/dev")
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| std::fs::metadata(p).is_ok_and(|m| m.file_type().is_block_device()))
}

async fn put(node: &Node, name: &str, body: Value) -> (StatusCode, Value) {
    node.call(
        Method::PUT,
        &format!("/v1/exports/{name}"),
        Some(&body.to_string()),
        None,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_paths_are_confined_to_export_roots() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("exports");
        std::fs::create_dir(&root).expect("mkdir root");
        let secret = backing_file(dir.path(), "secret.img", 1 << 20);
        std::os::unix::fs::symlink(&secret, root.join("link.img")).expect("symlink");
        let device = a_block_device();
        let mut extra = vec!["--export-root".to_string(), root.display().to_string()];
        // The root /dev would hold the device: still refused unless listed.
        extra.extend(["--export-root".to_string(), "/dev".to_string()]);
        let node = Node::start(&dir.path().join("data"), &extra, None).await;

        let mut hostile = vec![
            json!({"path": "/etc/passwd"}),
            json!({"path": root.join("../secret.img")}),
            json!({"path": root.join("link.img")}),
            json!({"path": root.join("../new.img"), "size_bytes": 4096}),
        ];
        match &device {
            Some(d) => hostile.push(json!({"path": d})),
            None => stagehand_tests::skip!("SKIPPED part: no block device in /dev"),
        }
        for body in hostile {
            let (s, v) = put(&node, "evil", body.clone()).await;
            assert_eq!(s, StatusCode::FORBIDDEN, "{body}: {v}");
            assert_eq!(v["error"]["code"], "path_not_allowed", "{body}: {v}");
        }
        assert!(
            !dir.path().join("new.img").exists(),
            "a refused PUT created a file"
        );
        let (s, v) = node.call(Method::GET, "/v1/exports", None, None).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(v, json!([]), "a refused PUT is served");

        // Inside the root: served; without a path: <root>/<name>.img, created sparse.
        let (s, v) = put(
            &node,
            "inside",
            json!({"path": root.join("inside.img"), "size_bytes": 4096}),
        )
        .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        let (s, v) = put(&node, "vm7", json!({"size_bytes": 1 << 20})).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        let created = root.join("vm7.img");
        assert_eq!(v["path"], json!(created.canonicalize().expect("created")));
        assert_eq!(std::fs::metadata(&created).expect("created").len(), 1 << 20);
        let (s, v) = put(&node, "nosize", json!({})).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        drop(node);

        // A listed device is allowed (whether it opens is up to the device).
        if let Some(d) = &device {
            let listed = Node::start(
                &dir.path().join("data2"),
                &[
                    "--export-root".to_string(),
                    root.display().to_string(),
                    "--allow-device".to_string(),
                    d.display().to_string(),
                ],
                None,
            )
            .await;
            let (s, v) = put(&listed, "dev", json!({"path": d, "read_only": true})).await;
            assert_ne!(s, StatusCode::FORBIDDEN, "listed device refused: {v}");
        }
    })
    .await
    .expect("test finished in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_lease_for_reads_gives_nothing_without_the_lease() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().expect("tempdir");
        let node = Node::start(&dir.path().join("data"), &[], None).await;
        let (s, v) = put(
            &node,
            "vm9",
            json!({"size_bytes": 1 << 20, "require_lease_for_reads": true}),
        )
        .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        assert_eq!(v["require_lease_for_reads"], true, "{v}");
        let path = PathBuf::from(v["path"].as_str().expect("path shown"));
        std::fs::write(&path, vec![0x5a; 1 << 20]).expect("fill");
        let addr = node.nbd_addr();

        // Our client: refused at GO with NBD_REP_ERR_POLICY.
        match Client::connect_tcp(&addr, ClientOptions::new("vm9")).await {
            Err(ClientError::Refused { code, .. }) => assert_eq!(code, REP_ERR_POLICY),
            Err(e) => panic!("expected a policy refusal, got {e}"),
            Ok(_) => panic!("a plain name opened a require_lease_for_reads export"),
        }
        if have("nbdinfo") {
            let out = stagehand_tests::run_timeout(
                std::process::Command::new("nbdinfo").arg(format!("nbd://{addr}/vm9")),
                Duration::from_secs(20),
            )
            .expect("nbdinfo runs");
            assert!(!out.status.success(), "nbdinfo read a leased export");
        } else {
            stagehand_tests::skip!("SKIPPED part: nbdinfo missing");
        }

        // The lease holder reads.
        let token = node.fence("vm9", 1).await;
        // The lease setter of our client: the token goes on the wire only.
        let lease = stagehand_common::secret::Secret::new(token).expect("token");
        let holder = Client::connect_tcp(&addr, ClientOptions::new("vm9").lease(&lease))
            .await
            .expect("holder connects");
        assert_eq!(holder.read(0, 4096).await.expect("reads"), vec![0x5a; 4096]);
    })
    .await
    .expect("test finished in time");
}
