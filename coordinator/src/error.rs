//! The coordinator's API error: an HTTP status, a stable snake_case code and a sentence
//! a person can act on. Every failure of the service layer ends up as one of these.

use crate::daemons::DaemonError;
use crate::store::StoreError;

#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "bad_request", message)
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(404, code, message)
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(409, code, message)
    }

    /// A daemon call failed: 502 with a code saying which kind of daemon and why.
    pub fn daemon(context: &str, e: &DaemonError) -> Self {
        let code = match e {
            DaemonError::Unreachable {
                what: "storage node",
                ..
            } => "storage_unreachable",
            DaemonError::Unreachable { .. } => "host_unreachable",
            DaemonError::Unauthorized { .. } => "daemon_unauthorized",
            DaemonError::Refused { .. } => "daemon_refused",
            DaemonError::BadAnswer { .. } => "daemon_bad_answer",
        };
        Self::new(502, code, format!("{context}: {e}"))
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotLeader => Self::new(
                503,
                "not_leader",
                "This coordinator no longer leads; nothing was written. Retry: the request goes to the new leader.",
            ),
            StoreError::Unavailable(why) => Self::new(
                503,
                "store_unavailable",
                format!(
                    "The state store refuses writes now ({why}); nothing was written. Reads are still served; retry when etcd has a quorum again."
                ),
            ),
            e @ StoreError::Conflict { .. } => Self::conflict("store_conflict", e.to_string()),
            e => Self::new(500, "store_failed", e.to_string()),
        }
    }
}
