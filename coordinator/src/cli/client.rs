//! The coordinator's HTTP(S) client and the CLI's errors.

use std::time::Duration;

use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(
        "cannot reach the coordinator at {url}: {reason} (is `coord serve` running? set --coordinator or STAGEHAND_COORDINATOR)"
    )]
    Unreachable { url: String, reason: String },
    #[error("{message} [{code}]")]
    Api { code: String, message: String },
    #[error("the coordinator answered something unexpected: {0}")]
    BadAnswer(String),
    #[error("{0}")]
    Local(String),
    #[error("gave up waiting for migration {0}; it goes on (see `coord migration show {0}`)")]
    WaitTimeout(String),
    #[error("migration {id} ended {phase}: {reason}")]
    MigrationFailed {
        id: String,
        phase: String,
        reason: String,
    },
}

pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Client {
    /// A client of the coordinator at `base`; an https coordinator is verified against
    /// `ca` (the system roots are not used).
    pub fn new(
        base: &str,
        token: Option<String>,
        ca: Option<&std::path::Path>,
    ) -> Result<Self, CliError> {
        let mut b = reqwest::Client::builder().timeout(Duration::from_secs(120));
        if let Some(ca) = ca {
            let cfg = stagehand_common::tls::ca_only_client_config(ca)
                .map_err(|e| CliError::Local(format!("--ca: {e}")))?;
            b = b.use_preconfigured_tls(rustls::ClientConfig::clone(&cfg));
        } else if base.starts_with("https://") {
            return Err(CliError::Local(
                "an https coordinator needs --ca FILE (or STAGEHAND_CA) to verify it".into(),
            ));
        }
        Ok(Self {
            http: b
                .build()
                .map_err(|e| CliError::Local(format!("HTTP client: {e}")))?,
            base: base.trim_end_matches('/').to_owned(),
            token,
        })
    }

    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, CliError> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, &url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.map_err(|e| CliError::Unreachable {
            url: self.base.clone(),
            reason: e.to_string(),
        })?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| CliError::BadAnswer(e.to_string()))?;
        if !status.is_success() {
            let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            return Err(CliError::Api {
                code: v["error"]["code"]
                    .as_str()
                    .unwrap_or("http_error")
                    .to_owned(),
                message: v["error"]["message"]
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| format!("HTTP {status}")),
            });
        }
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&bytes).map_err(|e| CliError::BadAnswer(e.to_string()))
    }
}
