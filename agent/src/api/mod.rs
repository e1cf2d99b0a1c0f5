//! The agent's HTTP API (axum): VMs, console, pause/resume, memory dumps, health and
//! metrics, behind bearer-token auth (health is open). Routes are documented in docs/agent-api.md.
//!
//! Composable: [`vm_routes`] is a `Router<ApiState>` without auth or state; [`app`]
//! applies the state, merges any extra `Router` (live migration adds its own, e.g.
//! `api::app(state, api::migration::routes(service))`), and wraps everything in the
//! bearer-token check, so extra routes are authenticated too.

pub mod migration;
pub mod vms;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;
use stagehand_common::auth::require_bearer;

use crate::config::AgentConfig;
use crate::host::{HostMonitor, HostReport};
use crate::manager::{ManagerError, VmManager};

/// Shared by every handler.
#[derive(Clone)]
pub struct ApiState {
    pub manager: Arc<VmManager>,
    pub config: Arc<AgentConfig>,
    pub metrics: Arc<ApiMetrics>,
    /// Capacity and usage (`GET /v1/host`); its sampler is started by `serve`.
    pub host: Arc<HostMonitor>,
}

impl ApiState {
    pub fn new(manager: Arc<VmManager>, config: Arc<AgentConfig>) -> Self {
        let host = Arc::new(HostMonitor::new(
            Arc::clone(&manager),
            &config.host_id,
            config.memory_for_guests_mib,
            config.sample_interval_s,
            config.test_cpu_fingerprint.as_deref(),
        ));
        ApiState {
            manager,
            config,
            metrics: Arc::new(ApiMetrics::default()),
            host,
        }
    }
}

/// Counters for /metrics.
#[derive(Debug, Default)]
pub struct ApiMetrics {
    pub requests: AtomicU64,
    pub unauthorized: AtomicU64,
    pub errors: AtomicU64,
}

/// An API error: status plus `{"error": {"code", "message"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    /// A request path outside the directories the operator allowed.
    pub fn path_not_allowed(e: stagehand_common::paths::PathError) -> Self {
        Self::new(StatusCode::FORBIDDEN, "path_not_allowed", e.to_string())
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorInner<'a>,
}

#[derive(Serialize)]
struct ErrorInner<'a> {
    code: &'a str,
    message: &'a str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorInner {
                code: self.code,
                message: &self.message,
            },
        };
        (self.status, axum::Json(body)).into_response()
    }
}

impl From<ManagerError> for ApiError {
    fn from(e: ManagerError) -> Self {
        use crate::machine::MachineError as M;
        let (status, code) = match &e {
            ManagerError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ManagerError::AlreadyExists(_) => (StatusCode::CONFLICT, "already_exists"),
            ManagerError::WrongState { .. } => (StatusCode::CONFLICT, "wrong_state"),
            ManagerError::BadName(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            ManagerError::Machine(M::Invalid(_)) => (StatusCode::BAD_REQUEST, "invalid_request"),
            ManagerError::Machine(M::Image { .. }) => (StatusCode::BAD_REQUEST, "bad_image"),
            ManagerError::Machine(M::Vm(crate::vstate::vm::VmError::Memory(_))) => {
                (StatusCode::BAD_REQUEST, "invalid_request")
            }
            ManagerError::Machine(M::WrongState { .. }) => (StatusCode::CONFLICT, "wrong_state"),
            ManagerError::Machine(M::Incompatible(_)) => (StatusCode::CONFLICT, "incompatible_cpu"),
            ManagerError::Machine(M::Dump { .. }) => (StatusCode::BAD_REQUEST, "dump_failed"),
            ManagerError::Machine(M::Disk(_)) => (StatusCode::BAD_GATEWAY, "disk_error"),
            ManagerError::Machine(_) => (StatusCode::INTERNAL_SERVER_ERROR, "kvm_error"),
        };
        ApiError::new(status, code, e.to_string())
    }
}

/// Checks request disks: a URI with `;lease=` is 400 `lease_in_uri`, an invalid one
/// 400 `invalid_request`, `nbds://` without `--tls-*` 400 `invalid_request`.
pub fn check_disks(disks: &[crate::contract::DiskSpec]) -> Result<(), ApiError> {
    use crate::devices::disk_uri::{self, DiskError};
    disk_uri::check_disks(disks).map_err(|e| match e {
        DiskError::LeaseInUri(_) => ApiError::new(
            StatusCode::BAD_REQUEST,
            "lease_in_uri",
            format!("{e}: put the token in the lease field"),
        ),
        DiskError::Invalid { .. } => ApiError::bad_request(e.to_string()),
    })?;
    if disks.iter().any(|d| d.nbd.starts_with("nbds://")) && !disk_uri::tls_configured() {
        return Err(ApiError::bad_request(
            "nbds:// disks need this agent started with --tls-cert/--tls-key/--tls-ca",
        ));
    }
    Ok(())
}

/// Runs blocking manager work off the async threads.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("worker task failed: {e}")))?
}

/// Counts every request, the ones refused for their token (the 401s, which only
/// `require_bearer` answers) and the ones answered with an error status.
async fn count(State(metrics): State<Arc<ApiMetrics>>, request: Request, next: Next) -> Response {
    metrics.requests.fetch_add(1, Ordering::Relaxed);
    let response = next.run(request).await;
    let status = response.status();
    if status == StatusCode::UNAUTHORIZED {
        metrics.unauthorized.fetch_add(1, Ordering::Relaxed);
    }
    if status.is_client_error() || status.is_server_error() {
        metrics.errors.fetch_add(1, Ordering::Relaxed);
    }
    response
}

/// Metrics plus the VM routes; no auth, no state applied.
pub fn vm_routes() -> Router<ApiState> {
    vms::routes()
        .route("/metrics", get(metrics))
        .route("/v1/host", get(host_report))
}

async fn host_report(State(state): State<ApiState>) -> axum::Json<HostReport> {
    axum::Json(state.host.report())
}

/// The whole API: [`vm_routes`] with `state`, merged with `extra` (routes with their
/// own state already applied), all behind the token check but `/v1/health`, which is
/// open (load balancers and the coordinator probe it) and says nothing but "ok".
pub fn app(state: ApiState, extra: Router) -> Router {
    let auth = Arc::new(state.config.auth.clone());
    let protected = vm_routes()
        .with_state(state.clone())
        .merge(extra)
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(auth, require_bearer));
    Router::new()
        .route("/v1/health", get(health))
        .merge(protected)
        .layer(middleware::from_fn_with_state(state.metrics, count))
}

/// The API without extra routes.
pub fn router(state: ApiState) -> Router {
    app(state, Router::new())
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "No such API route.")
}

async fn health() -> impl IntoResponse {
    axum::Json(serde_json::json!({"status": "ok"}))
}

async fn metrics(State(state): State<ApiState>) -> impl IntoResponse {
    use std::fmt::Write;
    let counts = state.manager.state_counts();
    let mut out = String::new();
    out.push_str(
        "# HELP stagehand_agent_vms VMs on this host by state.\n# TYPE stagehand_agent_vms gauge\n",
    );
    for s in [
        "running",
        "paused",
        "incoming",
        "migrating",
        "stopped",
        "failed",
    ] {
        let _ = writeln!(
            out,
            "stagehand_agent_vms{{state=\"{s}\"}} {}",
            counts.get(s).copied().unwrap_or(0)
        );
    }
    let vms = state.manager.list();
    out.push_str("# HELP stagehand_agent_vm_memory_bytes Guest RAM per VM.\n# TYPE stagehand_agent_vm_memory_bytes gauge\n");
    for vm in &vms {
        let _ = writeln!(
            out,
            "stagehand_agent_vm_memory_bytes{{vm=\"{}\"}} {}",
            vm.name,
            vm.memory_mib << 20
        );
    }
    out.push_str("# HELP stagehand_agent_vm_throttled_seconds_total Time auto-converge held the VM's vCPUs out of the guest.\n# TYPE stagehand_agent_vm_throttled_seconds_total counter\n");
    for vm in &vms {
        if let Ok(machine) = state.manager.machine(&vm.name) {
            let _ = writeln!(
                out,
                "stagehand_agent_vm_throttled_seconds_total{{vm=\"{}\"}} {:.3}",
                vm.name,
                machine.throttled_time().as_secs_f64()
            );
        }
    }
    let m = &state.metrics;
    for (name, help, v) in [
        (
            "stagehand_agent_api_requests_total",
            "API requests received.",
            &m.requests,
        ),
        (
            "stagehand_agent_api_unauthorized_total",
            "API requests refused for a missing or wrong token.",
            &m.unauthorized,
        ),
        (
            "stagehand_agent_api_errors_total",
            "API requests answered with an error status.",
            &m.errors,
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
            v.load(Ordering::Relaxed)
        );
    }
    out.push_str(&state.host.metrics());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}
