//! The storage node's HTTP/JSON control API (`--api`): exports listed, added,
//! inspected and removed at runtime, lease fencing, health and Prometheus metrics.
//! The full API is in `docs/nbd-control-api.md`.
//!
//! The API does not know how exports are served; it drives them through
//! [`ExportHost`], which the NBD server's export registry implements. The lease side
//! (gates, durable records, the fence sequence) lives here and in `lease` / `store`.

mod bitmaps;
pub mod confine;
pub mod metrics;
mod mirrors;
pub mod node;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{StatusCode, header};
use axum::middleware;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

pub use confine::Confinement;
use metrics::FenceMetrics;
pub use stagehand_common::api_error::ApiError;
use stagehand_common::api_error::parse_json;
use stagehand_common::auth::{ApiAuth, require_bearer};

use crate::lease::{FenceError, LeaseGate, LeasePolicy, LeaseToken};
use crate::store::{ExportRecord, Store};

/// Counters of one export, read at the moment of the request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExportStats {
    pub connections: u64,
    pub read_bytes: u64,
    pub written_bytes: u64,
    pub requests: u64,
}

/// What the API needs to know about one served export.
#[derive(Debug, Clone)]
pub struct ExportInfo {
    pub name: String,
    pub path: PathBuf,
    pub size_bytes: u64,
    pub read_only: bool,
    pub gate: LeaseGate,
    pub stats: ExportStats,
    /// Names of the export's dirty bitmaps.
    pub bitmaps: Vec<String>,
}

/// An export the API asks the server to start serving.
#[derive(Debug, Clone)]
pub struct NewExport {
    pub name: String,
    pub path: PathBuf,
    pub read_only: bool,
    pub gate: LeaseGate,
}

/// The NBD side of the node, as the control API sees it. Implemented by the server's
/// export registry; every method is quick (no I/O beyond opening a file).
pub trait ExportHost: Send + Sync + 'static {
    fn list(&self) -> Vec<ExportInfo>;
    fn get(&self, name: &str) -> Option<ExportInfo>;
    /// Opens `export.path` and serves it. Fails if the name is taken or the file
    /// cannot be opened.
    fn add(&self, export: NewExport) -> Result<ExportInfo, String>;
    /// Stops serving `name` and closes every connection bound to it (leased writers
    /// are fenced by the caller revoking the gate first). Returns how to read the
    /// removed export's count of connections still open, or None if there was no
    /// such export.
    fn remove(&self, name: &str) -> Option<ConnectionCount>;
    /// The served export itself, for its dirty bitmaps; None where the host has no
    /// bitmaps (the API then answers 404 for every bitmap).
    fn export(&self, _name: &str) -> Option<Arc<crate::export::Export>> {
        None
    }
}

/// Reads the number of NBD connections still open on a removed export.
pub type ConnectionCount = Box<dyn Fn() -> u64 + Send + Sync>;

/// How long a forced DELETE waits for the removed export's connections to close.
const CLOSE_WAIT: Duration = Duration::from_secs(10);

/// Everything the control API handlers share.
pub struct ControlState {
    host: Arc<dyn ExportHost>,
    store: Arc<Store>,
    /// How callers authenticate (checked by `require_bearer` before any handler).
    auth: Arc<ApiAuth>,
    /// Which files PUT may serve.
    confinement: Confinement,
    fences: FenceMetrics,
    /// Serializes export creation and removal (fences do not take it).
    registry_lock: tokio::sync::Mutex<()>,
    /// Mirror jobs (`/v1/mirrors`); None: the node runs none.
    mirrors: Option<Arc<crate::mirror::MirrorManager>>,
}

impl ControlState {
    pub fn new(host: Arc<dyn ExportHost>, store: Arc<Store>, auth: ApiAuth) -> Self {
        Self {
            host,
            store,
            auth: Arc::new(auth),
            confinement: Confinement::default(),
            fences: FenceMetrics::default(),
            registry_lock: tokio::sync::Mutex::new(()),
            mirrors: None,
        }
    }

    /// Serves `/v1/mirrors` with `mirrors`.
    pub fn with_mirrors(mut self, mirrors: Arc<crate::mirror::MirrorManager>) -> Self {
        self.mirrors = Some(mirrors);
        self
    }

    /// Limits the files PUT may serve (without this: none, and no path-less PUT).
    pub fn confined(mut self, confinement: Confinement) -> Self {
        self.confinement = confinement;
        self
    }

    pub fn fence_metrics(&self) -> &FenceMetrics {
        &self.fences
    }
}

/// The gate of an export, from its durable lease record (a never-fenced export, or
/// one re-created after removal, starts from its stored epoch high-water mark).
pub fn gate_for(store: &Store, name: &str, leased: bool, policy: LeasePolicy) -> LeaseGate {
    if !leased {
        return LeaseGate::new_unleased();
    }
    let record = store
        .snapshot()
        .leases
        .get(name)
        .cloned()
        .unwrap_or_default();
    LeaseGate::new_leased(record, policy)
}

/// Exports added through the API in an earlier run, to be served again at start.
pub fn stored_exports(store: &Store) -> Vec<(String, ExportRecord)> {
    store.snapshot().exports.into_iter().collect()
}

/// Serves the control API on `listener` (HTTPS with `tls`) until `shutdown` is
/// cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<ControlState>,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    stagehand_common::http::serve(listener, router(state), tls, shutdown).await
}

pub fn router(state: Arc<ControlState>) -> Router {
    let authed = Router::new()
        .route("/v1/exports", get(list_exports))
        .route(
            "/v1/exports/{name}",
            get(get_export).put(put_export).delete(delete_export),
        )
        .route("/v1/exports/{name}/fence", post(fence_export))
        .route("/v1/mirrors", get(mirrors::list).post(mirrors::create))
        .route(
            "/v1/mirrors/{id}",
            get(mirrors::get).delete(mirrors::cancel),
        )
        .route("/v1/mirrors/{id}/mode", post(mirrors::set_mode))
        .route("/v1/mirrors/{id}/complete", post(mirrors::complete))
        .route(
            "/v1/exports/{name}/bitmaps/{bitmap}",
            get(bitmaps::get_bitmap)
                .put(bitmaps::put_bitmap)
                .delete(bitmaps::delete_bitmap),
        )
        .route(
            "/v1/exports/{name}/bitmaps/{bitmap}/clear",
            post(bitmaps::clear_bitmap),
        )
        .route(
            "/v1/exports/{name}/bitmaps/{bitmap}/merge",
            post(bitmaps::merge_bitmap),
        )
        .route("/metrics", get(metrics_text))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state.auth),
            require_bearer,
        ));
    Router::new()
        // Health stays open so readiness probes need no secret; it reveals nothing.
        .route(
            "/v1/health",
            get(|| async { Json(serde_json::json!({"status": "ok"})) }),
        )
        .merge(authed)
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "No such API path; see docs/nbd-control-api.md.",
            )
        })
        .with_state(state)
}

/// 404 `export_not_found` for `export`.
fn not_found(export: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "export_not_found",
        format!("No export named {export:?} on this storage node; GET /v1/exports lists them."),
    )
}

fn check_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "Export name {name:?} is invalid; use 1 to 255 characters from A-Z a-z 0-9 . _ -."
        )))
    }
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct LeaseView {
    pub holder: String,
    pub epoch: u64,
}

fn lease_view(gate: &LeaseGate) -> Option<LeaseView> {
    let record = gate.record()?;
    Some(LeaseView {
        holder: record.holder?,
        epoch: record.epoch,
    })
}

#[derive(Debug, Serialize)]
struct ExportSummary {
    name: String,
    size_bytes: u64,
    read_only: bool,
    leased: bool,
    lease: Option<LeaseView>,
}

#[derive(Debug, Serialize)]
struct ExportDetail {
    name: String,
    path: PathBuf,
    size_bytes: u64,
    read_only: bool,
    leased: bool,
    require_lease_for_reads: bool,
    lease: Option<LeaseView>,
    connections: u64,
    bitmaps: Vec<String>,
}

fn summary(e: &ExportInfo) -> ExportSummary {
    ExportSummary {
        name: e.name.clone(),
        size_bytes: e.size_bytes,
        read_only: e.read_only,
        leased: e.gate.is_leased(),
        lease: lease_view(&e.gate),
    }
}

fn detail(e: &ExportInfo) -> ExportDetail {
    ExportDetail {
        name: e.name.clone(),
        path: e.path.clone(),
        size_bytes: e.size_bytes,
        read_only: e.read_only,
        leased: e.gate.is_leased(),
        require_lease_for_reads: e.gate.policy().is_some_and(|p| p.lease_required_for_reads),
        lease: lease_view(&e.gate),
        connections: e.stats.connections,
        bitmaps: e.bitmaps.clone(),
    }
}

async fn list_exports(State(state): State<Arc<ControlState>>) -> Json<Vec<ExportSummary>> {
    let mut exports = state.host.list();
    exports.sort_by(|a, b| a.name.cmp(&b.name));
    Json(exports.iter().map(summary).collect())
}

async fn get_export(
    State(state): State<Arc<ControlState>>,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<ExportDetail>, ApiError> {
    let e = state.host.get(&name).ok_or_else(|| not_found(&name))?;
    Ok(Json(detail(&e)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PutExportRequest {
    /// Omitted: `<first export root>/<name>.img`.
    path: Option<PathBuf>,
    size_bytes: Option<u64>,
    #[serde(default)]
    read_only: bool,
    #[serde(default = "yes")]
    leased: bool,
    /// A plain `NAME` (no lease token) is refused at the handshake.
    #[serde(default, alias = "lease_required_for_reads")]
    require_lease_for_reads: bool,
}

fn yes() -> bool {
    true
}

/// Creates a sparse file of `size` bytes unless `path` exists.
fn ensure_file(path: &Path, size: Option<u64>) -> Result<(), ApiError> {
    if path.exists() {
        return Ok(());
    }
    let Some(size) = size else {
        return Err(ApiError::bad_request(format!(
            "{} does not exist; give size_bytes to create it as a sparse file.",
            path.display()
        )));
    };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .and_then(|f| f.set_len(size).map(|()| f))
        .map_err(|e| ApiError::bad_request(format!("Cannot create {}: {e}.", path.display())))?;
    file.sync_all().map_err(|e| {
        ApiError::internal("io_error", format!("Cannot sync {}: {e}.", path.display()))
    })
}

async fn put_export(
    State(state): State<Arc<ControlState>>,
    UrlPath(name): UrlPath<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<ExportDetail>), ApiError> {
    check_name(&name)?;
    let req: PutExportRequest = parse_json(&body)?;
    if req.require_lease_for_reads && !req.leased {
        return Err(ApiError::bad_request(
            "require_lease_for_reads needs a leased export; drop \"leased\": false.",
        ));
    }
    let _registry = state.registry_lock.lock().await;
    let path = state.confinement.resolve(&name, req.path.as_deref())?;
    if let Some(existing) = state.host.get(&name) {
        let same = existing.path == path
            && existing.read_only == req.read_only
            && existing.gate.is_leased() == req.leased
            && existing
                .gate
                .policy()
                .is_some_and(|p| p.lease_required_for_reads)
                == req.require_lease_for_reads;
        return if same {
            Ok((StatusCode::OK, Json(detail(&existing))))
        } else {
            Err(ApiError::new(
                StatusCode::CONFLICT,
                "export_exists",
                format!(
                    "Export {name:?} already exists with another path or mode; DELETE it first."
                ),
            ))
        };
    }
    ensure_file(&path, req.size_bytes)?;
    let policy = LeasePolicy {
        lease_required_for_reads: req.require_lease_for_reads,
    };
    let gate = gate_for(&state.store, &name, req.leased, policy);
    let info = state
        .host
        .add(NewExport {
            name: name.clone(),
            path: path.clone(),
            read_only: req.read_only,
            gate,
        })
        .map_err(|e| ApiError::bad_request(format!("Cannot serve {}: {e}.", path.display())))?;
    let record = ExportRecord {
        path,
        read_only: req.read_only,
        leased: req.leased,
        policy,
    };
    let store = Arc::clone(&state.store);
    let n = name.clone();
    let persisted = tokio::task::spawn_blocking(move || {
        store.update(|s| {
            s.exports.insert(n, record);
        })
    })
    .await;
    if let Err(e) = flatten(persisted) {
        let _ = state.host.remove(&name);
        return Err(ApiError::internal(
            "persist_failed",
            format!(
                "Export {name:?} was not added because the data directory could not be updated: {e}."
            ),
        ));
    }
    tracing::info!(export = %name, path = %info.path.display(), leased = req.leased, "export added");
    Ok((StatusCode::CREATED, Json(detail(&info))))
}

#[derive(Debug, Deserialize)]
struct DeleteQuery {
    #[serde(default)]
    force: bool,
}

async fn delete_export(
    State(state): State<Arc<ControlState>>,
    UrlPath(name): UrlPath<String>,
    Query(q): Query<DeleteQuery>,
) -> Result<StatusCode, ApiError> {
    let _registry = state.registry_lock.lock().await;
    let e = state.host.get(&name).ok_or_else(|| not_found(&name))?;
    if e.stats.connections > 0 && !q.force {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "export_busy",
            format!(
                "Export {name:?} has {} bound connection(s); disconnect them or DELETE with ?force=true.",
                e.stats.connections
            ),
        ));
    }
    // Revoke first: no writer of any epoch may change the file once the export is
    // gone, and the stored epoch stays as a floor for a future export of this name.
    let ticket = e.gate.revoke_all();
    let open_connections = state.host.remove(&name);
    let store = Arc::clone(&state.store);
    let n = name.clone();
    let tombstone = ticket.as_ref().map(|t| t.record.clone());
    let persisted = tokio::task::spawn_blocking(move || {
        store.update(|s| {
            s.exports.remove(&n);
            if let Some(record) = tombstone {
                s.merge_lease(&n, record);
            }
        })
    })
    .await;
    if let Some(ticket) = &ticket {
        ticket.drained().await;
    }
    // Every connection is told to close (readers and unleased writers too); wait
    // until they have, so that a 204 means nothing is served from the file any more.
    if let Some(open) = open_connections {
        let start = Instant::now();
        while open() > 0 {
            if start.elapsed() > CLOSE_WAIT {
                tracing::warn!(export = %name, connections = open(), "connections of a removed export still closing");
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    flatten(persisted).map_err(|e| {
        ApiError::internal(
            "persist_failed",
            format!("Export {name:?} is no longer served, but the data directory could not be updated ({e}); it may come back after a restart."),
        )
    })?;
    tracing::info!(export = %name, force = q.force, "export removed");
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FenceRequest {
    epoch: u64,
    holder: String,
}

#[derive(Debug, Serialize)]
struct FenceReply {
    epoch: u64,
    holder: String,
    /// The new holder's secret; shown only here, never stored or logged.
    token: String,
}

async fn fence_export(
    State(state): State<Arc<ControlState>>,
    UrlPath(name): UrlPath<String>,
    body: Bytes,
) -> Result<Json<FenceReply>, ApiError> {
    let req: FenceRequest = parse_json(&body)?;
    if req.holder.is_empty() || req.holder.len() > 255 || req.holder.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "holder must be 1 to 255 printable characters.",
        ));
    }
    let e = state.host.get(&name).ok_or_else(|| not_found(&name))?;
    let start = Instant::now();
    let token = LeaseToken::generate();
    let ticket = match e.gate.fence(&name, req.epoch, &req.holder, token.hash()) {
        Ok(t) => t,
        Err(FenceError::StaleEpoch { requested, current }) => {
            state.fences.record_stale();
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "stale_epoch",
                format!(
                    "Epoch {requested} is not higher than export {name:?}'s current epoch {current}; fence with a higher epoch."
                ),
            ));
        }
        Err(FenceError::Unleased(_)) => {
            state.fences.record_failure();
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "not_leased",
                format!(
                    "Export {name:?} was added without leases and cannot be fenced; re-add it with leased=true."
                ),
            ));
        }
    };
    // From here the new epoch is in force in memory: stale changes are refused. Make
    // it durable and wait for the old epoch's in-flight changes, concurrently.
    let store = Arc::clone(&state.store);
    let record = ticket.record.clone();
    let n = name.clone();
    let persist = tokio::task::spawn_blocking(move || {
        let t = Instant::now();
        store
            .update(|s| s.merge_lease(&n, record))
            .map(|()| t.elapsed())
    });
    let drain = async {
        let t = Instant::now();
        let slow = tokio::time::sleep(Duration::from_secs(1));
        tokio::pin!(slow);
        let drained = ticket.drained();
        tokio::pin!(drained);
        tokio::select! {
            () = &mut drained => return t.elapsed(),
            () = &mut slow => tracing::warn!(export = %name, in_flight = ticket.in_flight(), "fence still waiting for older-epoch changes in flight"),
        }
        drained.await;
        t.elapsed()
    };
    let (persisted, drain_time) = tokio::join!(persist, drain);
    let persist_time = match persisted {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(format!("store task failed: {e}")),
    };
    let persist_time = match persist_time {
        Ok(t) => t,
        Err(err) => {
            state.fences.record_failure();
            tracing::error!(export = %name, epoch = req.epoch, error = %err, "fence not durable");
            // Fail closed: memory keeps the new epoch (no old-epoch writer can resume),
            // but the caller must not rely on it surviving a restart.
            return Err(ApiError::internal(
                "persist_failed",
                format!(
                    "Epoch {} is in force on this node but could not be made durable ({err}); fence again with a higher epoch.",
                    req.epoch
                ),
            ));
        }
    };
    let latency = start.elapsed();
    state.fences.record_success(latency);
    tracing::info!(
        export = %name,
        epoch = req.epoch,
        holder = %req.holder,
        previous_epoch = ticket.previous.epoch,
        latency_us = latency.as_micros() as u64,
        persist_us = persist_time.as_micros() as u64,
        drain_us = drain_time.as_micros() as u64,
        "fenced"
    );
    Ok(Json(FenceReply {
        epoch: req.epoch,
        holder: req.holder,
        token: token.expose().to_string(),
    }))
}

fn flatten(
    r: Result<Result<(), crate::store::StoreError>, tokio::task::JoinError>,
) -> Result<(), String> {
    match r {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(format!("store task failed: {e}")),
    }
}

async fn metrics_text(State(state): State<Arc<ControlState>>) -> impl IntoResponse {
    let mut exports = state.host.list();
    exports.sort_by(|a, b| a.name.cmp(&b.name));
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        metrics::render(&exports, &state.fences),
    )
}

/// For the `api_bodies` fuzz target: parses and checks a request body the way the
/// handler of `route` does before it touches any state (0: PUT export, 1: fence,
/// 2: POST mirror). Never panics, whatever the bytes.
#[doc(hidden)]
pub fn fuzz_request_body(route: u8, body: &[u8]) {
    match route % 3 {
        0 => {
            if let Ok(req) = parse_json::<PutExportRequest>(body) {
                let _ = req.require_lease_for_reads && !req.leased;
                let _ = req.path.as_deref().map(std::path::Path::is_absolute);
            }
        }
        2 => mirrors::fuzz_body(body),
        _ => {
            if let Ok(req) = parse_json::<FenceRequest>(body) {
                let _ = req.holder.is_empty()
                    || req.holder.len() > 255
                    || req.holder.chars().any(char::is_control);
            }
        }
    }
}

#[cfg(test)]
mod tests;
