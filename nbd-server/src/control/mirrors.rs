//! `/v1/mirrors`: mirror jobs of this node's exports to other NBD servers (see
//! `crate::mirror` and docs/nbd-control-api.md). Jobs are kept in memory: a
//! restart of the node forgets them.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use stagehand_common::api_error::{ApiError, parse_json};
use stagehand_common::secret::Secret;

use super::ControlState;
use crate::mirror::{JobView, MirrorError, MirrorManager, Mode, NewMirror, State as JobState};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateMirror {
    export: String,
    target: TargetRequest,
    #[serde(default = "background")]
    mode: Mode,
    bandwidth_mib_s: Option<f64>,
    max_in_flight: Option<usize>,
}

fn background() -> Mode {
    Mode::Background
}

/// No `Debug`: it holds the lease token.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetRequest {
    address: String,
    export: String,
    lease_token: Option<String>,
    tls: Option<bool>,
}

impl std::fmt::Debug for TargetRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetRequest")
            .field("address", &self.address)
            .field("export", &self.export)
            .field(
                "lease_token",
                &self.lease_token.as_ref().map(|_| "<redacted>"),
            )
            .field("tls", &self.tls)
            .finish()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModeRequest {
    mode: Mode,
}

#[derive(Debug, Deserialize)]
pub(super) struct WaitQuery {
    /// How long `complete` waits for the job to end (default 60 s, at most 3600).
    timeout_s: Option<u64>,
}

fn manager(state: &ControlState) -> Result<&Arc<MirrorManager>, ApiError> {
    state.mirrors.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "mirrors_unavailable",
            "This node runs no mirror jobs.",
        )
    })
}

fn api_error(e: MirrorError) -> ApiError {
    match e {
        MirrorError::NoExport(name) => ApiError::new(
            StatusCode::NOT_FOUND,
            "export_not_found",
            format!("No export named {name:?} on this storage node; GET /v1/exports lists them."),
        ),
        MirrorError::Busy { export, id } => ApiError::new(
            StatusCode::CONFLICT,
            "mirror_exists",
            format!(
                "Export {export:?} is already mirrored by job {id}; complete or DELETE it first."
            ),
        ),
        MirrorError::NoJob(id) => ApiError::new(
            StatusCode::NOT_FOUND,
            "mirror_not_found",
            format!("No mirror job {id:?}; GET /v1/mirrors lists them."),
        ),
        MirrorError::Invalid(msg) => ApiError::bad_request(msg),
        MirrorError::NotAllowed(msg) => {
            ApiError::new(StatusCode::FORBIDDEN, "mirror_target_not_allowed", msg)
        }
    }
}

pub(super) async fn create(
    State(state): State<Arc<ControlState>>,
    body: Bytes,
) -> Result<(StatusCode, Json<JobView>), ApiError> {
    let m = manager(&state)?;
    let req: CreateMirror = parse_json(&body)?;
    let lease = match req.target.lease_token {
        Some(t) => Some(
            Secret::new(t)
                .map_err(|_| ApiError::bad_request("target.lease_token must not be empty."))?,
        ),
        None => None,
    };
    let view = m
        .start(NewMirror {
            export: req.export,
            address: req.target.address,
            target_export: req.target.export,
            lease,
            tls: req.target.tls,
            mode: req.mode,
            bandwidth_mib_s: req.bandwidth_mib_s,
            max_in_flight: req.max_in_flight,
        })
        .map_err(api_error)?;
    Ok((StatusCode::CREATED, Json(view)))
}

pub(super) async fn list(
    State(state): State<Arc<ControlState>>,
) -> Result<Json<Vec<JobView>>, ApiError> {
    Ok(Json(manager(&state)?.list()))
}

pub(super) async fn get(
    State(state): State<Arc<ControlState>>,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<JobView>, ApiError> {
    let job = manager(&state)?.get(&id).map_err(api_error)?;
    Ok(Json(job.view()))
}

fn ended(id: &str, state: JobState) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "mirror_ended",
        format!("Mirror job {id} has already ended ({state:?})."),
    )
}

pub(super) async fn set_mode(
    State(state): State<Arc<ControlState>>,
    UrlPath(id): UrlPath<String>,
    body: Bytes,
) -> Result<Json<JobView>, ApiError> {
    let job = manager(&state)?.get(&id).map_err(api_error)?;
    let req: ModeRequest = parse_json(&body)?;
    let s = job.state();
    if s.is_final() {
        return Err(ended(&id, s));
    }
    job.set_mode(req.mode);
    Ok(Json(job.view()))
}

/// Waits up to `limit` for the job to reach a final state.
async fn wait_final(job: &crate::mirror::Job, limit: Duration) -> JobState {
    let mut rx = job.subscribe();
    let _ = tokio::time::timeout(limit, rx.wait_for(|s| s.is_final())).await;
    job.state()
}

pub(super) async fn complete(
    State(state): State<Arc<ControlState>>,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<WaitQuery>,
) -> Result<Response, ApiError> {
    let job = manager(&state)?.get(&id).map_err(api_error)?;
    let s = job.state();
    if s.is_final() && s != JobState::Completed {
        return Err(ended(&id, s));
    }
    job.complete();
    let limit = Duration::from_secs(q.timeout_s.unwrap_or(60).min(3600));
    match wait_final(&job, limit).await {
        JobState::Completed => Ok((StatusCode::OK, Json(job.view())).into_response()),
        s if s.is_final() => Err(ApiError::new(
            StatusCode::CONFLICT,
            "mirror_failed",
            format!(
                "Mirror job {id} ended {s:?} instead of completing: {}",
                job.view().error.unwrap_or_default()
            ),
        )),
        // Still draining: the caller polls GET.
        _ => Ok((StatusCode::ACCEPTED, Json(job.view())).into_response()),
    }
}

pub(super) async fn cancel(
    State(state): State<Arc<ControlState>>,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    let m = manager(&state)?;
    let job = m.get(&id).map_err(api_error)?;
    if job.state().is_final() {
        m.forget(&id);
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    job.cancel();
    wait_final(&job, Duration::from_secs(10)).await;
    Ok((StatusCode::OK, Json(job.view())).into_response())
}

/// For the `api_bodies` fuzz target: parses a mirror request body.
pub(super) fn fuzz_body(body: &[u8]) {
    let _ = parse_json::<CreateMirror>(body);
}
