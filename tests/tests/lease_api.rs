//! The control API of a real `stagehand-nbd`: 401, 409, 404, 400, and exports added
//! and removed at runtime while clients are connected.

mod lease_support;

use std::time::Duration;

use lease_support::{Node, PyWriter, backing_file, have_python_libnbd};
use nbd_client::{Client, ClientOptions};
use reqwest::{Method, StatusCode};
use serde_json::json;

const TOKEN: &str = "api-secret-for-tests";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_errors_and_auth() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = backing_file(dir.path(), "disk.img", 1 << 20);
        let token_file = dir.path().join("api-token");
        std::fs::write(&token_file, format!("{TOKEN}\n")).expect("token file");
        let node = Node::start(
            &dir.path().join("data"),
            &[
                "--export".to_string(),
                format!("disk={}", disk.display()),
                "--api-token-file".to_string(),
                token_file.display().to_string(),
            ],
            None,
        )
        .await;
        let auth = Some(TOKEN);
        let fence = |e: u64| json!({"epoch": e, "holder": "h"}).to_string();

        // 401: missing or wrong token, and nothing changes.
        for wrong in [None, Some("wrong")] {
            let (s, v) = node
                .call(
                    Method::POST,
                    "/v1/exports/disk/fence",
                    Some(&fence(1)),
                    wrong,
                )
                .await;
            assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
            assert_eq!(v["error"]["code"], "unauthorized");
            let (s, _) = node.call(Method::GET, "/v1/exports", None, wrong).await;
            assert_eq!(s, StatusCode::UNAUTHORIZED);
            let (s, _) = node
                .call(Method::DELETE, "/v1/exports/disk?force=true", None, wrong)
                .await;
            assert_eq!(s, StatusCode::UNAUTHORIZED);
        }
        let (s, v) = node.call(Method::GET, "/v1/exports/disk", None, auth).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v["lease"], serde_json::Value::Null, "a 401 call fenced");
        // Health is open and says nothing else.
        let (s, v) = node.call(Method::GET, "/v1/health", None, None).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(v, json!({"status": "ok"}));

        // 409: stale epoch.
        let (s, _) = node
            .call(
                Method::POST,
                "/v1/exports/disk/fence",
                Some(&fence(3)),
                auth,
            )
            .await;
        assert_eq!(s, StatusCode::OK);
        for stale in [3, 2] {
            let (s, v) = node
                .call(
                    Method::POST,
                    "/v1/exports/disk/fence",
                    Some(&fence(stale)),
                    auth,
                )
                .await;
            assert_eq!(s, StatusCode::CONFLICT);
            assert_eq!(v["error"]["code"], "stale_epoch");
            assert!(
                v["error"]["message"]
                    .as_str()
                    .expect("message")
                    .contains("higher")
            );
        }

        // 404: unknown export.
        for (m, path) in [
            (Method::GET, "/v1/exports/nope"),
            (Method::DELETE, "/v1/exports/nope"),
        ] {
            let (s, v) = node.call(m, path, None, auth).await;
            assert_eq!(s, StatusCode::NOT_FOUND);
            assert_eq!(v["error"]["code"], "export_not_found");
        }
        let (s, v) = node
            .call(
                Method::POST,
                "/v1/exports/nope/fence",
                Some(&fence(1)),
                auth,
            )
            .await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        assert_eq!(v["error"]["code"], "export_not_found");

        // 400: bad JSON, with a message that says so.
        for bad in [
            "{\"epoch\": 4",
            "not json",
            "{\"epoch\": -1, \"holder\": \"h\"}",
        ] {
            let (s, v) = node
                .call(Method::POST, "/v1/exports/disk/fence", Some(bad), auth)
                .await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}");
            assert_eq!(v["error"]["code"], "bad_request");
            assert!(
                v["error"]["message"]
                    .as_str()
                    .expect("message")
                    .contains("JSON")
            );
        }
        let (s, v) = node
            .call(
                Method::PUT,
                "/v1/exports/x",
                Some("{\"path\": \"relative.img\", \"size_bytes\": 1}"),
                auth,
            )
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert!(
            v["error"]["message"]
                .as_str()
                .expect("message")
                .contains("absolute"),
            "{v}"
        );

        let (s, v) = node.call(Method::GET, "/metrics", None, auth).await;
        assert_eq!(s, StatusCode::OK);
        let text = v.as_str().expect("metrics text");
        assert!(
            text.contains("stagehand_nbd_fences_total{outcome=\"ok\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("stagehand_nbd_fences_total{outcome=\"stale_epoch\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("stagehand_nbd_connections{export=\"disk\"}"),
            "{text}"
        );
    })
    .await
    .expect("test finished in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_refuses_to_start_and_insecure_no_auth_serves_open() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = stagehand_tests::run_timeout(
            std::process::Command::new(lease_support::server_bin()).args([
                "--listen",
                "127.0.0.1:0",
                "--api",
                "127.0.0.1:0",
                "--data-dir",
                &dir.path().join("data").display().to_string(),
            ]),
            Duration::from_secs(20),
        )
        .expect("server runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "started without a token: {stderr}");
        assert!(
            stderr.contains("refusing to serve the API without authentication")
                && stderr.contains("--insecure-no-auth"),
            "{stderr}"
        );

        let node = Node::start(
            &dir.path().join("data"),
            &["--insecure-no-auth".to_string()],
            None,
        )
        .await;
        assert_eq!(node.api_token, None);
        let (s, v) = node.call(Method::GET, "/v1/exports", None, None).await;
        assert_eq!(s, StatusCode::OK, "{v}");
    })
    .await
    .expect("test finished in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_added_and_removed_at_runtime() {
    if !have_python_libnbd() {
        stagehand_tests::skip!("SKIPPED: python3-libnbd missing (make deps)");
        return;
    }
    tokio::time::timeout(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().expect("tempdir");
        let node = Node::start(&dir.path().join("data"), &[], None).await;
        let addr = node.nbd_addr();
        let path = dir.path().join("new.img");
        let body = json!({"path": path, "size_bytes": 4 << 20}).to_string();
        let (s, v) = node
            .call(Method::PUT, "/v1/exports/vm7", Some(&body), None)
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        assert_eq!(
            std::fs::metadata(&path).expect("sparse file").len(),
            4 << 20
        );
        let (s, v) = node.call(Method::GET, "/v1/exports", None, None).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(v[0]["name"], "vm7");
        assert_eq!(v[0]["size_bytes"], 4 << 20);

        // Plain name: read-only; the lease token: writable.
        let (w, refused) = PyWriter::start(&addr, "vm7", 0.1, 1, 0);
        assert_eq!(refused, None);
        let r = w.finish(Duration::from_secs(20));
        assert!(
            !r.attempts.is_empty() && r.attempts.iter().all(|a| !a.1),
            "plain name wrote"
        );
        let token = node.fence("vm7", 1).await;
        let (w, refused) = PyWriter::start(&addr, &format!("vm7;lease={token}"), 30.0, 2, 0);
        assert_eq!(refused, None);

        // The server counts a connection once its handshake is over on its side,
        // which may be just after the client saw the answer to NBD_OPT_GO.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let (s, v) = node.call(Method::GET, "/v1/exports/vm7", None, None).await;
            assert_eq!(s, StatusCode::OK);
            if v["connections"] == 2 {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{v}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (s, v) = node
            .call(Method::DELETE, "/v1/exports/vm7", None, None)
            .await;
        assert_eq!(s, StatusCode::CONFLICT);
        assert_eq!(v["error"]["code"], "export_busy");
        let (s, _) = node
            .call(Method::DELETE, "/v1/exports/vm7?force=true", None, None)
            .await;
        assert_eq!(s, StatusCode::NO_CONTENT);
        let sum = lease_support::checksum(&path);
        let (s, _) = node.call(Method::GET, "/v1/exports/vm7", None, None).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        // The writer keeps trying for a while; none of its later attempts may land.
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(w);
        assert_eq!(
            lease_support::checksum(&path),
            sum,
            "write landed after removal"
        );
        let (_w, refused) = PyWriter::start(&addr, &format!("vm7;lease={token}"), 0.1, 1, 0);
        assert!(refused.is_some(), "removed export still served");

        // Re-added under the same name: served again, and epochs are not reused.
        let (s, _) = node
            .call(Method::PUT, "/v1/exports/vm7", Some(&body), None)
            .await;
        assert_eq!(s, StatusCode::CREATED);
        let (s, _) = node.try_fence("vm7", 1).await;
        assert_eq!(s, StatusCode::CONFLICT);
        node.fence("vm7", 2).await;
    })
    .await
    .expect("test finished in time");
}

/// Connects with our own client; `Err` carries the refusal.
async fn connect(addr: &str, name: &str) -> Result<Client, nbd_client::ClientError> {
    Client::connect_tcp(addr, ClientOptions::new(name)).await
}

/// Waits (bounded) until a read on `c` fails: the server closed the connection.
async fn closed_by_server(c: &Client) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::time::Instant::now() < deadline {
        let read = tokio::time::timeout(Duration::from_secs(1), c.read(0, 4096)).await;
        if matches!(read, Ok(Err(_))) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_reads_refuses_plain_names() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().expect("tempdir");
        let strict = backing_file(dir.path(), "strict.img", 1 << 20);
        let node = Node::start(
            &dir.path().join("data"),
            &[
                "--export".to_string(),
                format!("strict={},lease-reads", strict.display()),
            ],
            None,
        )
        .await;
        let addr = node.nbd_addr();
        let (s, v) = node
            .call(Method::GET, "/v1/exports/strict", None, None)
            .await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(v["require_lease_for_reads"], true, "{v}");

        // From the command line: a plain name is refused, the holder reads and writes.
        let refused = connect(&addr, "strict").await;
        assert!(refused.is_err(), "plain name opened a lease-reads export");
        let token = node.fence("strict", 1).await;
        let holder = connect(&addr, &format!("strict;lease={token}"))
            .await
            .expect("holder connects");
        holder
            .write(0, &[7u8; 4096], false)
            .await
            .expect("holder writes");
        assert_eq!(
            holder.read(0, 4096).await.expect("holder reads"),
            vec![7u8; 4096]
        );

        // From the API: the same, and the flag must come with a leased export.
        let path = dir.path().join("api.img");
        let body = json!({"path": path, "size_bytes": 1 << 20, "require_lease_for_reads": true});
        let (s, v) = node
            .call(
                Method::PUT,
                "/v1/exports/api",
                Some(&body.to_string()),
                None,
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        assert_eq!(v["require_lease_for_reads"], true, "{v}");
        assert!(connect(&addr, "api").await.is_err(), "plain name opened");
        let token = node.fence("api", 1).await;
        connect(&addr, &format!("api;lease={token}"))
            .await
            .expect("holder connects");
        // A second PUT differing only in the flag is a different export.
        let plain = json!({"path": path});
        let (s, v) = node
            .call(
                Method::PUT,
                "/v1/exports/api",
                Some(&plain.to_string()),
                None,
            )
            .await;
        assert_eq!(s, StatusCode::CONFLICT, "{v}");
        let bad = json!({"path": path, "leased": false, "lease_required_for_reads": true});
        let (s, v) = node
            .call(
                Method::PUT,
                "/v1/exports/other",
                Some(&bad.to_string()),
                None,
            )
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .expect("message")
                .contains("leased"),
            "{v}"
        );

        // The flag survives a restart (stored with the export).
        let node = node.kill9_and_restart().await;
        assert!(
            connect(&node.nbd_addr(), "api").await.is_err(),
            "plain name opened after restart"
        );
        assert!(
            connect(&node.nbd_addr(), "strict").await.is_err(),
            "plain name opened after restart"
        );
    })
    .await
    .expect("test finished in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_removal_closes_every_connection() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().expect("tempdir");
        let leased = backing_file(dir.path(), "leased.img", 1 << 20);
        let open = backing_file(dir.path(), "open.img", 1 << 20);
        let node = Node::start(
            &dir.path().join("data"),
            &[
                "--export".to_string(),
                format!("leased={}", leased.display()),
                "--export".to_string(),
                format!("open={},unleased", open.display()),
            ],
            None,
        )
        .await;
        let addr = node.nbd_addr();
        let token = node.fence("leased", 1).await;
        let writer = connect(&addr, &format!("leased;lease={token}"))
            .await
            .expect("writer");
        let reader = connect(&addr, "leased").await.expect("plain reader");
        let unleased = connect(&addr, "open").await.expect("unleased writer");
        writer.write(0, &[1u8; 4096], false).await.expect("writes");
        unleased
            .write(0, &[2u8; 4096], false)
            .await
            .expect("writes");
        reader.read(0, 4096).await.expect("reads");

        for name in ["leased", "open"] {
            let (s, v) = node
                .call(Method::DELETE, &format!("/v1/exports/{name}"), None, None)
                .await;
            assert_eq!(s, StatusCode::CONFLICT, "{v}");
            let (s, v) = node
                .call(
                    Method::DELETE,
                    &format!("/v1/exports/{name}?force=true"),
                    None,
                    None,
                )
                .await;
            assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
        }
        let sums = (
            lease_support::checksum(&leased),
            lease_support::checksum(&open),
        );
        assert!(
            closed_by_server(&writer).await,
            "leased writer still connected"
        );
        assert!(
            closed_by_server(&reader).await,
            "plain reader still connected"
        );
        assert!(
            closed_by_server(&unleased).await,
            "unleased writer still connected"
        );
        // Nothing lands after the 204: the connections were closed before it.
        let _ = writer.write(4096, &[9u8; 4096], false).await;
        let _ = unleased.write(4096, &[9u8; 4096], false).await;
        assert_eq!(
            (
                lease_support::checksum(&leased),
                lease_support::checksum(&open)
            ),
            sums,
            "write landed after removal"
        );
        let (s, v) = node.call(Method::GET, "/metrics", None, None).await;
        assert_eq!(s, StatusCode::OK);
        assert!(
            !v.as_str().expect("text").contains("export=\"open\""),
            "{v}"
        );
    })
    .await
    .expect("test finished in time");
}
