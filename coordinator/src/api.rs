//! The coordinator's HTTP/JSON API (axum): a thin translation of `service.rs`.
//! Secrets (daemon tokens, lease tokens) never leave through it: records are shown
//! through the `*View` shapes below.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use stagehand_common::auth::{ApiAuth, require_bearer};
use stagehand_common::secret::Secret;

use crate::error::ApiError;
use crate::model::*;
use crate::service::{
    Coordinator, CreateVmRequest, FleetKind, FleetOp, FleetRequest, MigrateRequest,
};

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (
            status,
            Json(json!({"error": {"code": self.code, "message": self.message}})),
        )
            .into_response()
    }
}

#[derive(Clone)]
struct AppState {
    coord: Arc<Coordinator>,
    /// This coordinator's name (`--name`).
    name: Arc<str>,
}

/// The router, with bearer auth on everything except /v1/health (which answers only
/// `{"status":"ok"}`). On a follower, every write (any method but GET and HEAD) is
/// forwarded to the leader after the caller authenticated here.
pub fn router(coord: Arc<Coordinator>, auth: Arc<ApiAuth>, name: String) -> Router {
    let state = AppState {
        coord: Arc::clone(&coord),
        name: name.into(),
    };
    let authed = Router::new()
        .route("/metrics", get(metrics))
        .route("/v1/status", get(status))
        .route("/v1/sites", get(list_sites))
        .route("/v1/sites/{name}", put(add_site))
        .route("/v1/storage", get(list_storage))
        .route("/v1/storage/{name}", put(add_storage))
        .route("/v1/hosts", get(list_hosts))
        .route("/v1/hosts/{name}", put(add_host).get(show_host))
        .route("/v1/hosts/{name}/drain", post(drain_host))
        .route("/v1/hosts/{name}/undrain", post(undrain_host))
        .route("/v1/hosts/{name}/evacuate", post(evacuate_host))
        .route("/v1/vms/{name}/pin", post(pin_vm))
        .route("/v1/vms/{name}/unpin", post(unpin_vm))
        .route("/v1/balance", post(balance))
        .route("/v1/consolidate", post(consolidate))
        .route("/v1/fleet", get(list_fleet))
        .route("/v1/fleet/{id}", get(show_fleet))
        .route("/v1/vms", get(list_vms))
        .route(
            "/v1/vms/{name}",
            put(create_vm).get(show_vm).delete(delete_vm),
        )
        .route("/v1/migrations", get(list_migrations).post(migrate))
        .route("/v1/migrations/{id}", get(show_migration))
        .route("/v1/migrations/{id}/cancel", post(cancel_migration))
        .route("/v1/migrations/{id}/release", post(release_migration))
        .route(
            "/v1/replications",
            get(list_replications).post(start_replication),
        )
        .route("/v1/replications/{vm}", delete(stop_replication))
        .layer(middleware::from_fn_with_state(coord, forward_writes))
        .layer(middleware::from_fn_with_state(auth, require_bearer));
    Router::new()
        .route(
            "/v1/health",
            get(|| async { Json(json!({"status": "ok"})) }),
        )
        .merge(authed)
        .fallback(|| async {
            ApiError::not_found("not_found", "No such API path; see docs/coordinator.md.")
        })
        .with_state(state)
}

type ApiResult<T> = Result<Json<T>, ApiError>;

fn body<T: serde::de::DeserializeOwned>(raw: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(raw)
        .map_err(|e| ApiError::bad_request(format!("The request body is not valid: {e}")))
}

/// Largest request body a follower forwards.
const FORWARD_LIMIT: usize = 1 << 20;

/// On a follower, sends writes to the leader and returns its answer.
async fn forward_writes(
    State(coord): State<Arc<Coordinator>>,
    req: axum::extract::Request,
    next: middleware::Next,
) -> Response {
    let method = req.method().clone();
    if method == axum::http::Method::GET || method == axum::http::Method::HEAD || coord.is_leader()
    {
        return next.run(req).await;
    }
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| req.uri().path().to_owned());
    let auth = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = match axum::body::to_bytes(req.into_body(), FORWARD_LIMIT).await {
        Ok(b) => b.to_vec(),
        Err(e) => {
            return ApiError::bad_request(format!("Cannot read the request: {e}")).into_response();
        }
    };
    let Ok(m) = reqwest::Method::from_bytes(method.as_str().as_bytes()) else {
        return ApiError::bad_request("Unsupported method.").into_response();
    };
    tracing::debug!(%method, %path, "forwarding a write to the leader");
    match coord.forward(m, &path, auth.as_deref(), body).await {
        Ok((status, bytes)) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            (status, [(header::CONTENT_TYPE, "application/json")], bytes).into_response()
        }
        Err(e) => e.into_response(),
    }
}

async fn status(State(st): State<AppState>) -> Json<Value> {
    let coord = Arc::clone(&st.coord);
    let name = Arc::clone(&st.name);
    // The store's health calls block (etcd round trips): off the async workers.
    let v = tokio::task::spawn_blocking(move || coord.status(&name))
        .await
        .unwrap_or_else(|e| json!({"error": e.to_string()}));
    Json(v)
}

async fn metrics(State(st): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.coord.metrics(),
    )
}

async fn list_sites(State(st): State<AppState>) -> ApiResult<Vec<Site>> {
    Ok(Json(st.coord.sites()?))
}

async fn add_site(State(st): State<AppState>, Path(name): Path<String>) -> ApiResult<Site> {
    Ok(Json(st.coord.add_site(&name).await?))
}

#[derive(Serialize)]
pub struct StorageView {
    name: String,
    site: String,
    api: String,
    nbd: String,
    reachable_from: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    disk_dir: Option<String>,
    own_token: bool,
}

impl From<StorageNode> for StorageView {
    fn from(s: StorageNode) -> Self {
        Self {
            own_token: s.token.is_some(),
            name: s.name,
            site: s.site,
            api: s.api,
            nbd: s.nbd,
            reachable_from: s.reachable_from,
            disk_dir: s.disk_dir,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddStorage {
    site: String,
    api: String,
    nbd: String,
    #[serde(default)]
    reachable_from: Vec<String>,
    #[serde(default)]
    disk_dir: Option<String>,
    #[serde(default)]
    token: Option<Secret>,
}

async fn list_storage(State(st): State<AppState>) -> ApiResult<Vec<StorageView>> {
    Ok(Json(
        st.coord
            .storage_nodes()?
            .into_iter()
            .map(Into::into)
            .collect(),
    ))
}

async fn add_storage(
    State(st): State<AppState>,
    Path(name): Path<String>,
    raw: axum::body::Bytes,
) -> ApiResult<StorageView> {
    let b: AddStorage = body(&raw)?;
    let node = StorageNode {
        name,
        site: b.site,
        api: b.api,
        nbd: b.nbd,
        reachable_from: b.reachable_from,
        disk_dir: b.disk_dir,
        token: b.token,
    };
    Ok(Json(st.coord.add_storage(node).await?.into()))
}

#[derive(Serialize)]
pub struct HostView {
    name: String,
    site: String,
    api: String,
    migration: String,
    memory_mib: u64,
    own_token: bool,
    /// `maintenance` or `standby` when unschedulable.
    #[serde(skip_serializing_if = "Option::is_none")]
    drained: Option<crate::plan::Drain>,
    /// The smaller of `memory_mib` and what the agent offers guests.
    capacity_mib: u64,
    /// The agent's last report (`GET /v1/host`), when one arrived.
    #[serde(skip_serializing_if = "Option::is_none")]
    report: Option<HostReport>,
}

impl From<Host> for HostView {
    fn from(h: Host) -> Self {
        Self {
            capacity_mib: Coordinator::capacity_mib(&h),
            drained: h.drained,
            report: h.report.clone(),
            own_token: h.token.is_some(),
            name: h.name,
            site: h.site,
            api: h.api,
            migration: h.migration,
            memory_mib: h.memory_mib,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddHost {
    site: String,
    api: String,
    migration: String,
    memory_mib: u64,
    #[serde(default)]
    token: Option<Secret>,
}

async fn list_hosts(State(st): State<AppState>) -> ApiResult<Vec<HostView>> {
    Ok(Json(
        st.coord.hosts()?.into_iter().map(Into::into).collect(),
    ))
}

async fn add_host(
    State(st): State<AppState>,
    Path(name): Path<String>,
    raw: axum::body::Bytes,
) -> ApiResult<HostView> {
    let b: AddHost = body(&raw)?;
    let host = Host {
        name,
        site: b.site,
        api: b.api,
        migration: b.migration,
        memory_mib: b.memory_mib,
        token: b.token,
        drained: None,
        report: None,
    };
    Ok(Json(st.coord.add_host(host).await?.into()))
}

async fn show_host(State(st): State<AppState>, Path(name): Path<String>) -> ApiResult<HostView> {
    Ok(Json(st.coord.host(&name)?.into()))
}

async fn drain_host(State(st): State<AppState>, Path(name): Path<String>) -> ApiResult<HostView> {
    Ok(Json(
        st.coord
            .set_drained(&name, Some(crate::plan::Drain::Maintenance))
            .await?
            .into(),
    ))
}

async fn undrain_host(State(st): State<AppState>, Path(name): Path<String>) -> ApiResult<HostView> {
    Ok(Json(st.coord.set_drained(&name, None).await?.into()))
}

async fn evacuate_host(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> Result<(StatusCode, Json<FleetOp>), ApiError> {
    Ok((StatusCode::ACCEPTED, Json(st.coord.evacuate(&name).await?)))
}

async fn pin_vm(State(st): State<AppState>, Path(name): Path<String>) -> ApiResult<Value> {
    Ok(Json(vm_view(
        &st.coord.set_pinned(&name, true).await?,
        None,
    )))
}

async fn unpin_vm(State(st): State<AppState>, Path(name): Path<String>) -> ApiResult<Value> {
    Ok(Json(vm_view(
        &st.coord.set_pinned(&name, false).await?,
        None,
    )))
}

async fn fleet_request(
    st: AppState,
    kind: FleetKind,
    raw: &[u8],
) -> Result<(StatusCode, Json<FleetOp>), ApiError> {
    let req: FleetRequest = if raw.is_empty() {
        FleetRequest::default()
    } else {
        body(raw)?
    };
    let dry = req.dry_run;
    let op = st.coord.plan_or_run(kind, req).await?;
    let status = if dry {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((status, Json(op)))
}

async fn balance(
    State(st): State<AppState>,
    raw: axum::body::Bytes,
) -> Result<(StatusCode, Json<FleetOp>), ApiError> {
    fleet_request(st, FleetKind::Balance, &raw).await
}

async fn consolidate(
    State(st): State<AppState>,
    raw: axum::body::Bytes,
) -> Result<(StatusCode, Json<FleetOp>), ApiError> {
    fleet_request(st, FleetKind::Consolidate, &raw).await
}

async fn list_fleet(State(st): State<AppState>) -> ApiResult<Vec<FleetOp>> {
    Ok(Json(st.coord.fleet_ops()?))
}

async fn show_fleet(State(st): State<AppState>, Path(id): Path<String>) -> ApiResult<FleetOp> {
    Ok(Json(st.coord.fleet_op(&id)?))
}

/// A VM as shown: the stored record without lease tokens, plus the live agent state.
pub fn vm_view(vm: &Vm, agent_state: Option<String>) -> Value {
    let disks: Vec<Value> = vm
        .disks
        .iter()
        .map(|d| json!({"storage": d.storage, "export": d.export, "size_bytes": d.size_bytes, "epoch": d.epoch, "holder": d.holder}))
        .collect();
    let state = serde_json::to_value(vm.state).unwrap_or(Value::Null);
    json!({
        "name": vm.name, "site": vm.site, "host": vm.host, "state": state,
        "memory_mib": vm.memory_mib, "vcpus": vm.vcpus, "image": vm.image,
        "load_addr": vm.load_addr, "disks": disks, "migration": vm.migration,
        "agent_state": agent_state, "pinned": vm.pinned, "cpu_fingerprint": vm.cpu_fingerprint,
    })
}

async fn list_vms(State(st): State<AppState>) -> ApiResult<Vec<Value>> {
    Ok(Json(
        st.coord.vms()?.iter().map(|v| vm_view(v, None)).collect(),
    ))
}

async fn show_vm(State(st): State<AppState>, Path(name): Path<String>) -> ApiResult<Value> {
    let vm = st.coord.vm(&name)?;
    let live = st.coord.vm_agent_state(&vm).await;
    Ok(Json(vm_view(&vm, live)))
}

async fn create_vm(
    State(st): State<AppState>,
    Path(name): Path<String>,
    raw: axum::body::Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let req: CreateVmRequest = body(&raw)?;
    let vm = st.coord.create_vm(&name, req).await?;
    Ok((
        StatusCode::CREATED,
        Json(vm_view(&vm, Some("running".into()))),
    ))
}

async fn delete_vm(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    st.coord.delete_vm(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A migration as shown (the fields api.md fixes, then the rest).
pub fn migration_view(m: &MigrationDoc, journal: Option<Vec<JournalEntry>>) -> Value {
    let r = &m.record;
    let f = &m.figures;
    let mut v = json!({
        "id": r.id, "vm": r.vm, "from_host": r.from_host, "to_host": r.to_host,
        "to_site": m.to_site, "state": r.phase.name(), "phase": r.phase,
        "total_ms": f.total_ms, "downtime_ms": f.downtime_ms, "fence_ms": f.fence_ms, "fence_us": f.fence_us,
        "handover_ms": f.handover_ms, "quiesced_at_ms": f.quiesced_at_ms,
        "switchover_wait_ms": f.switchover_wait_ms,
        "memory_bytes": f.memory_bytes, "memory_total_bytes": f.memory_total_bytes,
        "remaining_bytes": f.remaining_bytes, "disk_bytes": f.disk_bytes, "passes": f.passes,
        "source_epoch": r.source_epoch, "offline": m.options.offline, "hold": m.options.hold,
        "agent_migration": m.agent_migration, "created_ms": m.created_ms,
        "finished_ms": m.finished_ms, "error": m.error,
    });
    if let Some(p) = &m.disk_move {
        // Where the disks go (never their tokens).
        v["disk_dirty_bytes"] = json!(f.disk_dirty_bytes);
        v["disk_total_bytes"] = json!(f.disk_total_bytes);
        v["mirror_state"] = json!(f.mirror_state);
        v["disk_move"] = json!({
            "disks": p.disks.iter().map(|d| json!({
                "index": d.index, "storage": d.replica.storage, "export": d.replica.export,
                "mirror": d.mirror,
            })).collect::<Vec<_>>(),
            "write_blocking": p.write_blocking, "completed": p.completed, "cleaned": p.cleaned,
        });
    }
    if let Some(j) = journal {
        v["journal"] = json!(j);
    }
    v
}

async fn list_migrations(State(st): State<AppState>) -> ApiResult<Vec<Value>> {
    Ok(Json(
        st.coord
            .migrations()?
            .iter()
            .map(|m| migration_view(m, None))
            .collect(),
    ))
}

async fn show_migration(State(st): State<AppState>, Path(id): Path<String>) -> ApiResult<Value> {
    let m = st.coord.migration(&id)?;
    let j = st.coord.journal(&id)?;
    Ok(Json(migration_view(&m, Some(j))))
}

async fn migrate(
    State(st): State<AppState>,
    raw: axum::body::Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let req: MigrateRequest = body(&raw)?;
    let m = st.coord.start_migration(req).await?;
    Ok((StatusCode::ACCEPTED, Json(migration_view(&m, None))))
}

async fn start_replication(
    State(st): State<AppState>,
    raw: axum::body::Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let req: crate::service::ReplicateRequest = body(&raw)?;
    let r = st.coord.start_replication(req).await?;
    Ok((StatusCode::CREATED, Json(r)))
}

async fn list_replications(State(st): State<AppState>) -> ApiResult<Vec<Value>> {
    Ok(Json(st.coord.list_replications().await?))
}

async fn stop_replication(State(st): State<AppState>, Path(vm): Path<String>) -> ApiResult<Value> {
    Ok(Json(st.coord.stop_replication(&vm).await?))
}

async fn cancel_migration(State(st): State<AppState>, Path(id): Path<String>) -> ApiResult<Value> {
    let m = st.coord.cancel_migration(&id)?;
    Ok(Json(migration_view(&m, None)))
}

async fn release_migration(State(st): State<AppState>, Path(id): Path<String>) -> ApiResult<Value> {
    let m = st.coord.release_migration(&id)?;
    Ok(Json(migration_view(&m, None)))
}

/// For the `api_bodies` fuzz target: the coordinator's request bodies (0: storage
/// add, 1: host add, 2: vm create, 3: migrate), parsed as their handlers do.
#[doc(hidden)]
pub fn fuzz_request_body(route: u8, raw: &[u8]) {
    match route % 4 {
        0 => drop(body::<AddStorage>(raw)),
        1 => drop(body::<AddHost>(raw)),
        2 => drop(body::<CreateVmRequest>(raw)),
        _ => drop(body::<MigrateRequest>(raw)),
    }
}
