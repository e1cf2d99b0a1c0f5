//! `/v1/vms/{name}` routes: create, inspect, console, pause, resume, memory dump, delete.

use std::path::PathBuf;

use axum::Router;
use axum::extract::{Path, State, rejection::JsonRejection};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use serde::Deserialize;

use stagehand_common::paths::confine;

use super::{ApiError, ApiState, blocking, check_disks};
use crate::manager::{CreateVmRequest, VmInfo};

pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/v1/vms", get(list))
        .route("/v1/vms/{name}", get(show).put(create).delete(delete))
        .route("/v1/vms/{name}/console", get(console))
        .route("/v1/vms/{name}/pause", post(pause))
        .route("/v1/vms/{name}/resume", post(resume))
        .route("/v1/vms/{name}/memory-dump", post(memory_dump))
}

/// Turns axum's JSON rejections into our error shape.
fn json<T>(body: Result<axum::Json<T>, JsonRejection>) -> Result<T, ApiError> {
    body.map(|axum::Json(v)| v).map_err(|e| {
        ApiError::bad_request(format!("The request body is not valid: {}", e.body_text()))
    })
}

async fn list(State(state): State<ApiState>) -> axum::Json<Vec<VmInfo>> {
    axum::Json(state.manager.list())
}

async fn show(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<axum::Json<VmInfo>, ApiError> {
    Ok(axum::Json(state.manager.info(&name)?))
}

async fn create(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    body: Result<axum::Json<CreateVmRequest>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let mut req: CreateVmRequest = json(body)?;
    check_disks(&req.disks)?;
    // A token holder boots only what the operator put in the images directory: the
    // path is resolved (symlinks, `..`) and the resolved one is what gets read.
    let image = confine(
        std::path::Path::new(&req.boot.flat_binary),
        std::slice::from_ref(&state.config.images_dir),
    )
    .map_err(ApiError::path_not_allowed)?;
    req.boot.flat_binary = image.to_string_lossy().into_owned();
    let manager = state.manager.clone();
    let info = blocking(move || Ok(manager.create(&name, &req)?)).await?;
    tracing::info!(vm = %info.name, memory_mib = info.memory_mib, vcpus = info.vcpus, "VM started");
    Ok((StatusCode::CREATED, axum::Json(info)))
}

async fn delete(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let manager = state.manager.clone();
    blocking(move || Ok(manager.delete(&name)?)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn console(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let bytes = state.manager.console(&name)?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes))
}

async fn pause(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<axum::Json<VmInfo>, ApiError> {
    let manager = state.manager.clone();
    Ok(axum::Json(
        blocking(move || Ok(manager.pause(&name)?)).await?,
    ))
}

/// Optional body of `POST /v1/vms/{name}/resume`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResumeRequest {
    /// New disks (one per disk, in order; `{nbd, lease}`) to reconnect with before
    /// resuming.
    disks: Option<Vec<crate::contract::DiskSpec>>,
}

async fn resume(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<axum::Json<VmInfo>, ApiError> {
    // The body is optional: an empty one resumes as it is.
    let req: ResumeRequest = if body.iter().all(u8::is_ascii_whitespace) {
        ResumeRequest::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("The request body is not valid: {e}")))?
    };
    if let Some(d) = &req.disks {
        check_disks(d)?;
    }
    let manager = state.manager.clone();
    Ok(axum::Json(
        blocking(move || Ok(manager.resume_with_disks(&name, req.disks.as_deref())?)).await?,
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DumpRequest {
    path: PathBuf,
}

async fn memory_dump(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    body: Result<axum::Json<DumpRequest>, JsonRejection>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let req = json(body)?;
    if !req.path.is_absolute() {
        return Err(ApiError::bad_request("The dump path must be absolute."));
    }
    // Dumps land under the data directory only (resolved, so no `..` or symlink out).
    let path = confine(&req.path, std::slice::from_ref(&state.config.data_dir))
        .map_err(ApiError::path_not_allowed)?;
    let manager = state.manager.clone();
    let bytes = blocking(move || Ok(manager.memory_dump(&name, &path)?)).await?;
    Ok(axum::Json(serde_json::json!({
        "path": req.path,
        "bytes": bytes,
    })))
}

/// For the `api_bodies` fuzz target: the VM routes' bodies, parsed and checked as
/// their handlers do before any state is touched (0: create, 1: resume, 2: memory
/// dump). Never panics, whatever the bytes.
#[doc(hidden)]
pub fn fuzz_request_body(route: u8, body: &[u8]) {
    match route % 3 {
        0 => {
            if let Ok(req) = serde_json::from_slice::<crate::manager::CreateVmRequest>(body) {
                let _ = super::check_disks(&req.disks);
            }
        }
        1 => {
            if let Ok(ResumeRequest { disks: Some(d) }) = serde_json::from_slice(body) {
                let _ = super::check_disks(&d);
            }
        }
        _ => {
            let _ = serde_json::from_slice::<DumpRequest>(body).map(|r| r.path.is_absolute());
        }
    }
}
