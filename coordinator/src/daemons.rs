//! HTTP clients of the daemons the coordinator drives: the storage node's control API
//! (exports and fences) and the agent's VM and migration API. Only the fields the
//! coordinator reads are modelled; the daemons own their full schemas.

use std::time::Duration;

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::{Value, json};
use stagehand_common::secret::Secret;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{what} at {url} is unreachable: {source}")]
    Unreachable {
        what: &'static str,
        url: String,
        source: reqwest::Error,
    },
    #[error(
        "{what} at {url} refused the token (401); check the cluster token or the node's own token"
    )]
    Unauthorized { what: &'static str, url: String },
    #[error("{what} answered {status} {code}: {message}")]
    Refused {
        what: &'static str,
        status: u16,
        code: String,
        message: String,
    },
    #[error("{what} answered something that is not the expected JSON: {detail}")]
    BadAnswer { what: &'static str, detail: String },
}

impl DaemonError {
    /// The daemon's error code when it refused the call.
    pub fn code(&self) -> Option<&str> {
        match self {
            DaemonError::Refused { code, .. } => Some(code),
            _ => None,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            DaemonError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A bearer-token JSON client of one daemon.
#[derive(Clone)]
pub struct DaemonClient {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
    what: &'static str,
}

impl DaemonClient {
    pub fn new(
        http: reqwest::Client,
        base: &str,
        token: Option<String>,
        what: &'static str,
    ) -> Self {
        Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
            token,
            what,
        }
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Option<T>, DaemonError> {
        let url = format!("{}{}", self.base, path);
        let mut req = self.http.request(method, &url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req
            .send()
            .await
            .map_err(|source| DaemonError::Unreachable {
                what: self.what,
                url: url.clone(),
                source,
            })?;
        let status = resp.status();
        if status == reqwest::StatusCode::UNAUTHORIZED {
            return Err(DaemonError::Unauthorized {
                what: self.what,
                url,
            });
        }
        let bytes = resp
            .bytes()
            .await
            .map_err(|source| DaemonError::Unreachable {
                what: self.what,
                url: url.clone(),
                source,
            })?;
        if !status.is_success() {
            let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            return Err(DaemonError::Refused {
                what: self.what,
                status: status.as_u16(),
                code: v["error"]["code"].as_str().unwrap_or("unknown").to_owned(),
                message: v["error"]["message"]
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned()),
            });
        }
        if bytes.is_empty() {
            return Ok(None);
        }
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| DaemonError::BadAnswer {
                what: self.what,
                detail: e.to_string(),
            })
    }

    async fn json<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<T, DaemonError> {
        self.call(method, path, body)
            .await?
            .ok_or_else(|| DaemonError::BadAnswer {
                what: self.what,
                detail: "empty body".into(),
            })
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct Lease {
    pub holder: String,
    pub epoch: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ExportInfo {
    pub name: String,
    pub size_bytes: u64,
    pub lease: Option<Lease>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct FenceReply {
    pub epoch: u64,
    pub holder: String,
    pub token: Secret,
}

/// stagehand-nbd's control API.
#[derive(Clone)]
pub struct StorageClient(pub DaemonClient);

impl StorageClient {
    pub async fn health(&self) -> Result<(), DaemonError> {
        self.0
            .call::<Value>(reqwest::Method::GET, "/v1/health", None)
            .await
            .map(|_| ())
    }

    /// Creates (or confirms) an export whose reads, like its writes, need the current
    /// lease. Without `path` the node creates `<its export root>/<name>.img`.
    pub async fn put_export(
        &self,
        name: &str,
        path: Option<&str>,
        size_bytes: u64,
    ) -> Result<ExportInfo, DaemonError> {
        let mut body = json!({"size_bytes": size_bytes, "require_lease_for_reads": true});
        if let Some(p) = path {
            body["path"] = json!(p);
        }
        self.0
            .json(
                reqwest::Method::PUT,
                &format!("/v1/exports/{name}"),
                Some(&body),
            )
            .await
    }

    pub async fn get_export(&self, name: &str) -> Result<ExportInfo, DaemonError> {
        self.0
            .json(reqwest::Method::GET, &format!("/v1/exports/{name}"), None)
            .await
    }

    pub async fn delete_export(&self, name: &str) -> Result<(), DaemonError> {
        self.0
            .call::<Value>(
                reqwest::Method::DELETE,
                &format!("/v1/exports/{name}?force=true"),
                None,
            )
            .await
            .map(|_| ())
    }

    pub async fn fence(
        &self,
        name: &str,
        epoch: u64,
        holder: &str,
    ) -> Result<FenceReply, DaemonError> {
        let body = json!({"epoch": epoch, "holder": holder});
        self.0
            .json(
                reqwest::Method::POST,
                &format!("/v1/exports/{name}/fence"),
                Some(&body),
            )
            .await
    }
}

/// A mirror job as the source's storage node reports it.
#[derive(Debug, Clone, Deserialize)]
pub struct MirrorInfo {
    pub id: String,
    pub export: String,
    pub state: String,
    #[serde(default)]
    pub bytes_copied: u64,
    #[serde(default)]
    pub bytes_zeroed: u64,
    #[serde(default)]
    pub dirty_bytes: u64,
    #[serde(default)]
    pub rate_mib_s: f64,
    #[serde(default)]
    pub error: Option<String>,
}

impl MirrorInfo {
    /// Still copying or following writes (not completed, failed or cancelled).
    pub fn active(&self) -> bool {
        matches!(self.state.as_str(), "copying" | "synced")
    }
}

/// Where a mirror job pushes to. No `Debug`: it holds the lease token.
pub struct MirrorTarget<'a> {
    pub address: &'a str,
    pub export: &'a str,
    pub lease_token: &'a Secret,
}

impl StorageClient {
    /// Starts a background mirror job pushing `export` to `target` (TLS as the node is
    /// configured: its default).
    pub async fn create_mirror(
        &self,
        export: &str,
        target: &MirrorTarget<'_>,
    ) -> Result<MirrorInfo, DaemonError> {
        let body = json!({
            "export": export,
            "target": {
                "address": target.address,
                "export": target.export,
                "lease_token": target.lease_token.expose(),
            },
            "mode": "background",
        });
        self.0
            .json(reqwest::Method::POST, "/v1/mirrors", Some(&body))
            .await
    }

    pub async fn mirrors(&self) -> Result<Vec<MirrorInfo>, DaemonError> {
        self.0.json(reqwest::Method::GET, "/v1/mirrors", None).await
    }

    pub async fn mirror(&self, id: &str) -> Result<MirrorInfo, DaemonError> {
        self.0
            .json(reqwest::Method::GET, &format!("/v1/mirrors/{id}"), None)
            .await
    }

    pub async fn mirror_mode(&self, id: &str, mode: &str) -> Result<(), DaemonError> {
        self.0
            .call::<Value>(
                reqwest::Method::POST,
                &format!("/v1/mirrors/{id}/mode"),
                Some(&json!({ "mode": mode })),
            )
            .await
            .map(|_| ())
    }

    /// Drains and completes the job; Ok(true) once completed, Ok(false) while it is
    /// still draining after `timeout_s`.
    pub async fn complete_mirror(&self, id: &str, timeout_s: u64) -> Result<bool, DaemonError> {
        let m: Option<MirrorInfo> = self
            .0
            .call(
                reqwest::Method::POST,
                &format!("/v1/mirrors/{id}/complete?timeout_s={timeout_s}"),
                None,
            )
            .await?;
        Ok(m.is_some_and(|m| m.state == "completed"))
    }

    /// Cancels an active job (forgets an ended one); an unknown id counts as done.
    pub async fn cancel_mirror(&self, id: &str) -> Result<(), DaemonError> {
        match self
            .0
            .call::<Value>(reqwest::Method::DELETE, &format!("/v1/mirrors/{id}"), None)
            .await
        {
            Err(e) if e.status() == Some(404) => Ok(()),
            r => r.map(|_| ()),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct AgentVm {
    pub name: String,
    pub state: String,
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct AgentMigration {
    pub state: String,
    // The agent reports times and sizes as JSON numbers that may be fractional.
    #[serde(default)]
    pub total_ms: f64,
    #[serde(default)]
    pub downtime_ms: f64,
    #[serde(default)]
    pub ram_transferred_bytes: f64,
    #[serde(default)]
    pub remaining_bytes: f64,
    #[serde(default)]
    pub total_bytes: f64,
    #[serde(default)]
    pub passes: Vec<Value>,
    #[serde(default)]
    pub error: Option<Value>,
    /// Coordinated switchover: ms after the start at which the source quiesced.
    #[serde(default)]
    pub quiesced_at_ms: Option<f64>,
    /// Where the downtime went; the coordinator reads `switchover_wait_ms` (from the
    /// pause to the go-ahead).
    #[serde(default)]
    pub downtime: Option<Value>,
}

impl AgentMigration {
    pub fn finished(&self) -> bool {
        matches!(self.state.as_str(), "completed" | "failed" | "cancelled")
    }

    /// The source paused, drained its disks and waits for the go-ahead.
    pub fn quiesced(&self) -> bool {
        self.state == "quiesced"
    }

    pub fn error_code(&self) -> Option<String> {
        self.error
            .as_ref()
            .and_then(|e| e["code"].as_str())
            .map(str::to_owned)
    }

    pub fn error_text(&self) -> String {
        match &self.error {
            Some(e) => format!(
                "{}: {}",
                e["code"].as_str().unwrap_or("error"),
                e["message"].as_str().unwrap_or("")
            ),
            None => self.state.clone(),
        }
    }
}

/// stagehand-agent's API.
#[derive(Clone)]
pub struct AgentClient(pub DaemonClient);

pub const POLL: Duration = Duration::from_millis(100);

impl AgentClient {
    pub async fn health(&self) -> Result<(), DaemonError> {
        self.0
            .call::<Value>(reqwest::Method::GET, "/v1/health", None)
            .await
            .map(|_| ())
    }

    /// The host's capacity, CPU and guests' usage (`GET /v1/host`).
    pub async fn host_report(&self) -> Result<crate::model::HostReport, DaemonError> {
        self.0.json(reqwest::Method::GET, "/v1/host", None).await
    }

    pub async fn put_vm(&self, name: &str, spec: &Value) -> Result<AgentVm, DaemonError> {
        self.0
            .json(reqwest::Method::PUT, &format!("/v1/vms/{name}"), Some(spec))
            .await
    }

    /// The VM, or None when the agent has no VM of that name.
    pub async fn get_vm(&self, name: &str) -> Result<Option<AgentVm>, DaemonError> {
        match self
            .0
            .json(reqwest::Method::GET, &format!("/v1/vms/{name}"), None)
            .await
        {
            Ok(vm) => Ok(Some(vm)),
            Err(e) if e.status() == Some(404) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Deletes the VM; absent already counts as done.
    pub async fn delete_vm(&self, name: &str) -> Result<(), DaemonError> {
        match self
            .0
            .call::<Value>(reqwest::Method::DELETE, &format!("/v1/vms/{name}"), None)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.status() == Some(404) => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub async fn pause(&self, name: &str) -> Result<AgentVm, DaemonError> {
        self.0
            .json(
                reqwest::Method::POST,
                &format!("/v1/vms/{name}/pause"),
                None,
            )
            .await
    }

    pub async fn resume(&self, name: &str) -> Result<AgentVm, DaemonError> {
        self.0
            .json(
                reqwest::Method::POST,
                &format!("/v1/vms/{name}/resume"),
                None,
            )
            .await
    }

    /// Reconnects the paused VM's disks with `disks` (new lease tokens), then resumes it.
    pub async fn resume_with_disks(
        &self,
        name: &str,
        disks: &[Value],
    ) -> Result<AgentVm, DaemonError> {
        let body = json!({ "disks": disks });
        self.0
            .json(
                reqwest::Method::POST,
                &format!("/v1/vms/{name}/resume"),
                Some(&body),
            )
            .await
    }

    /// The go-ahead of a coordinated switchover: the target opens `disks` and resumes.
    pub async fn switchover(&self, id: &str, disks: &[Value]) -> Result<(), DaemonError> {
        let body = json!({ "disks": disks });
        self.0
            .call::<Value>(
                reqwest::Method::POST,
                &format!("/v1/migrations/{id}/switchover"),
                Some(&body),
            )
            .await
            .map(|_| ())
    }

    pub async fn migrate(&self, name: &str, body: &Value) -> Result<String, DaemonError> {
        let v: Value = self
            .0
            .json(
                reqwest::Method::POST,
                &format!("/v1/vms/{name}/migrate"),
                Some(body),
            )
            .await?;
        v["migration_id"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| DaemonError::BadAnswer {
                what: "agent",
                detail: "no migration_id".into(),
            })
    }

    pub async fn migration(&self, id: &str) -> Result<AgentMigration, DaemonError> {
        self.0
            .json(reqwest::Method::GET, &format!("/v1/migrations/{id}"), None)
            .await
    }

    /// Ends a quiesced coordinated migration without a go-ahead, leaving the source
    /// paused (a rollback after the fence: the source must not resume with its old,
    /// fenced tokens). 409 when the migration is not waiting for its go-ahead.
    pub async fn abort_migration(&self, id: &str) -> Result<(), DaemonError> {
        self.0
            .call::<Value>(
                reqwest::Method::POST,
                &format!("/v1/migrations/{id}/abort"),
                None,
            )
            .await
            .map(|_| ())
    }

    /// Changes a running migration's limits (`PATCH /v1/migrations/{id}`).
    pub async fn patch_migration(&self, id: &str, body: &Value) -> Result<(), DaemonError> {
        self.0
            .call::<Value>(
                reqwest::Method::PATCH,
                &format!("/v1/migrations/{id}"),
                Some(body),
            )
            .await
            .map(|_| ())
    }

    pub async fn cancel_migration(&self, id: &str) -> Result<(), DaemonError> {
        self.0
            .call::<Value>(
                reqwest::Method::POST,
                &format!("/v1/migrations/{id}/cancel"),
                None,
            )
            .await
            .map(|_| ())
    }
}
