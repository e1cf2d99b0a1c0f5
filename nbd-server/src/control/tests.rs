//! The control API over real HTTP on loopback, against an in-memory export host.

use std::collections::HashMap;
use std::sync::Mutex;

use reqwest::StatusCode;
use serde_json::{Value, json};

use super::*;

#[derive(Default)]
struct FakeHost {
    exports: Mutex<HashMap<String, ExportInfo>>,
}

impl FakeHost {
    fn set_connections(&self, name: &str, n: u64) {
        if let Some(e) = self.exports.lock().expect("lock").get_mut(name) {
            e.stats.connections = n;
        }
    }
}

impl ExportHost for FakeHost {
    fn list(&self) -> Vec<ExportInfo> {
        self.exports
            .lock()
            .expect("lock")
            .values()
            .cloned()
            .collect()
    }
    fn get(&self, name: &str) -> Option<ExportInfo> {
        self.exports.lock().expect("lock").get(name).cloned()
    }
    fn add(&self, export: NewExport) -> Result<ExportInfo, String> {
        let size_bytes = std::fs::metadata(&export.path)
            .map_err(|e| e.to_string())?
            .len();
        let info = ExportInfo {
            name: export.name.clone(),
            path: export.path,
            size_bytes,
            read_only: export.read_only,
            gate: export.gate,
            stats: ExportStats::default(),
            bitmaps: Vec::new(),
        };
        self.exports
            .lock()
            .expect("lock")
            .insert(export.name, info.clone());
        Ok(info)
    }
    fn remove(&self, name: &str) -> Option<ConnectionCount> {
        // The fake's connections close the moment the export goes.
        let removed = self.exports.lock().expect("lock").remove(name)?;
        drop(removed);
        Some(Box::new(|| 0))
    }
}

struct Api {
    base: String,
    client: reqwest::Client,
    token: Option<String>,
    host: Arc<FakeHost>,
    shutdown: CancellationToken,
    dir: tempfile::TempDir,
}

impl Drop for Api {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn start_with(dir: tempfile::TempDir, token: Option<&str>) -> Api {
    let store = Arc::new(Store::open(&dir.path().join("data")).expect("store"));
    let host = Arc::new(FakeHost::default());
    let state = Arc::new(
        ControlState::new(
            Arc::clone(&host) as Arc<dyn ExportHost>,
            store,
            match token {
                Some(t) => {
                    ApiAuth::Bearer(stagehand_common::secret::Secret::new(t).expect("token"))
                }
                None => ApiAuth::InsecureNoAuth,
            },
        )
        .confined(Confinement {
            roots: vec![dir.path().to_path_buf()],
            devices: Vec::new(),
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let shutdown = CancellationToken::new();
    tokio::spawn(serve(listener, state, None, shutdown.clone()));
    Api {
        base,
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("client"),
        token: token.map(str::to_string),
        host,
        shutdown,
        dir,
    }
}

impl Api {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&str>,
    ) -> (StatusCode, Value) {
        let mut req = self.client.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        let resp = req.send().await.expect("request");
        let status = resp.status();
        let text = resp.text().await.expect("body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    fn disk_path(&self) -> String {
        self.dir.path().join("disk.img").display().to_string()
    }

    async fn add_disk(&self) {
        let body = json!({"path": self.disk_path(), "size_bytes": 1 << 20}).to_string();
        let (s, v) = self
            .call(reqwest::Method::PUT, "/v1/exports/disk", Some(&body))
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
    }

    async fn fence(&self, epoch: u64) -> (StatusCode, Value) {
        let body = json!({"epoch": epoch, "holder": format!("host{epoch}")}).to_string();
        self.call(reqwest::Method::POST, "/v1/exports/disk/fence", Some(&body))
            .await
    }
}

fn error_code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("<none>")
}

#[tokio::test]
async fn export_lifecycle_and_fence() {
    let api = start_with(tempfile::tempdir().expect("tempdir"), None).await;
    api.add_disk().await;
    assert_eq!(
        std::fs::metadata(api.disk_path()).expect("created").len(),
        1 << 20
    );
    let (s, v) = api.call(reqwest::Method::GET, "/v1/exports", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v[0]["name"], "disk");
    assert_eq!(v[0]["size_bytes"], 1 << 20);
    assert_eq!(v[0]["lease"], Value::Null);

    let (s, v) = api.fence(1).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let token1 = v["token"].as_str().expect("token").to_string();
    assert!(token1.len() >= 32);
    let gate = api.host.get("disk").expect("exists").gate;
    let b1 = gate.bind(Some(&token1), false).expect("token binds");

    let (s, v) = api
        .call(reqwest::Method::GET, "/v1/exports/disk", None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["lease"], json!({"holder": "host1", "epoch": 1}));
    assert_eq!(v["connections"], 0);
    assert!(!v.to_string().contains(&token1), "token leaked in GET");

    let (s, v) = api.fence(2).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(gate.begin_change(&b1).is_err(), "old epoch still writes");
    let (s, v) = api.fence(2).await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(error_code(&v), "stale_epoch");
    assert!(
        v["error"]["message"]
            .as_str()
            .expect("message")
            .contains("epoch")
    );

    let (s, v) = api.call(reqwest::Method::GET, "/metrics", None).await;
    assert_eq!(s, StatusCode::OK);
    let text = v.as_str().expect("text");
    assert!(
        text.contains("stagehand_nbd_fences_total{outcome=\"ok\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("stagehand_nbd_lease_epoch{export=\"disk\"} 2"),
        "{text}"
    );

    api.host.set_connections("disk", 1);
    let (s, v) = api
        .call(reqwest::Method::DELETE, "/v1/exports/disk", None)
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(error_code(&v), "export_busy");
    let (s, _) = api
        .call(reqwest::Method::DELETE, "/v1/exports/disk?force=true", None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, v) = api
        .call(reqwest::Method::GET, "/v1/exports/disk", None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(error_code(&v), "export_not_found");

    // Re-created under the same name, the epoch floor survives: epoch 2 is never reused.
    api.add_disk().await;
    let (s, _) = api.fence(2).await;
    assert_eq!(s, StatusCode::CONFLICT);
    let (s, _) = api.fence(3).await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn errors_are_json_with_codes() {
    let api = start_with(tempfile::tempdir().expect("tempdir"), None).await;
    let (s, v) = api.fence(1).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(error_code(&v), "export_not_found");

    api.add_disk().await;
    for bad in [
        "{",
        "{\"epoch\": \"x\", \"holder\": \"h\"}",
        "{\"holder\": \"h\"}",
        "",
    ] {
        let (s, v) = api
            .call(reqwest::Method::POST, "/v1/exports/disk/fence", Some(bad))
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(error_code(&v), "bad_request");
        assert!(
            v["error"]["message"]
                .as_str()
                .expect("message")
                .contains("JSON")
        );
    }
    let missing = json!({"path": api.dir.path().join("missing.img")}).to_string();
    let (s, v) = api
        .call(reqwest::Method::PUT, "/v1/exports/d2", Some(&missing))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(
        v["error"]["message"]
            .as_str()
            .expect("message")
            .contains("size_bytes")
    );
    let (s, _) = api
        .call(
            reqwest::Method::PUT,
            "/v1/exports/bad;name",
            Some("{\"path\": \"/tmp/x\"}"),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, v) = api.call(reqwest::Method::GET, "/v2/nothing", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(error_code(&v), "not_found");
}

#[tokio::test]
async fn missing_or_wrong_token_is_401_and_changes_nothing() {
    let mut api = start_with(tempfile::tempdir().expect("tempdir"), Some("s3cret")).await;
    api.add_disk().await;
    let (s, _) = api.fence(4).await;
    assert_eq!(s, StatusCode::OK);

    for wrong in [None, Some("nope".to_string())] {
        api.token = wrong;
        let (s, v) = api.fence(9).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        assert_eq!(error_code(&v), "unauthorized");
        let (s, _) = api
            .call(reqwest::Method::DELETE, "/v1/exports/disk", None)
            .await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        let (s, _) = api.call(reqwest::Method::GET, "/metrics", None).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        let (s, _) = api.call(reqwest::Method::GET, "/v1/health", None).await;
        assert_eq!(s, StatusCode::OK);
    }
    api.token = Some("s3cret".into());
    let (s, v) = api
        .call(reqwest::Method::GET, "/v1/exports/disk", None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["lease"]["epoch"], 4, "an unauthorized call changed state");
}

#[tokio::test]
async fn racing_fences_over_http_exactly_one_wins() {
    let api = Arc::new(start_with(tempfile::tempdir().expect("tempdir"), None).await);
    api.add_disk().await;
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let api = Arc::clone(&api);
            tokio::spawn(async move { api.fence(7).await.0 })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        match t.await.expect("task") {
            StatusCode::OK => ok += 1,
            StatusCode::CONFLICT => {}
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(ok, 1);
}

#[tokio::test]
async fn fence_is_durable_across_a_restart_of_the_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let api = start_with(dir, None).await;
    api.add_disk().await;
    let (_, v) = api.fence(5).await;
    let token = v["token"].as_str().expect("token").to_string();
    let data = api.dir.path().join("data");
    // What a restarted node would rebuild from.
    let store = Store::open(&data).expect("reopen");
    assert_eq!(stored_exports(&store).len(), 1);
    let gate = gate_for(&store, "disk", true, LeasePolicy::default());
    assert_eq!(gate.record().expect("leased").epoch, 5);
    assert!(gate.bind(Some(&token), false).is_ok());
    let raw = String::from_utf8_lossy(&std::fs::read(data.join("state.bin")).expect("state"))
        .into_owned();
    assert!(
        raw.contains("holder"),
        "state file not readable as expected"
    );
    assert!(!raw.contains(&token), "token stored in clear");
}
