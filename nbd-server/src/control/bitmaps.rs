//! Dirty bitmaps through the control API: create, read, clear, merge, delete.
//! Bits are written to the bitmap file (fdatasync) before a clear or merge answers,
//! so the work runs on a blocking thread.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use super::{ApiError, ControlState, not_found, parse_json};
use crate::bitmap::{BitmapError, DEFAULT_GRANULARITY, DirtyBitmap};
use crate::export::Export;

#[derive(Debug, Serialize)]
pub(super) struct BitmapView {
    name: String,
    granularity_bytes: u64,
    dirty_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    extents: Option<Vec<(u64, u64)>>,
}

fn view(b: &DirtyBitmap, with_extents: bool) -> BitmapView {
    let extents = b.dirty_extents();
    BitmapView {
        name: b.name().to_owned(),
        granularity_bytes: b.granularity(),
        dirty_bytes: extents.iter().map(|(_, l)| l).sum(),
        extents: with_extents.then_some(extents),
    }
}

fn bitmap_not_found(export: &str, bitmap: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "bitmap_not_found",
        format!(
            "Export {export:?} has no dirty bitmap named {bitmap:?}; GET /v1/exports/{export} lists them."
        ),
    )
}

fn api_error(export: &str, e: BitmapError) -> ApiError {
    match e {
        BitmapError::Exists(n) => ApiError::new(
            StatusCode::CONFLICT,
            "bitmap_exists",
            format!("Export {export:?} already has a dirty bitmap named {n:?}; DELETE it first."),
        ),
        BitmapError::NotFound(n) => bitmap_not_found(export, &n),
        e @ (BitmapError::BadName(_)
        | BitmapError::BadGranularity(_)
        | BitmapError::BadRange { .. }) => ApiError::bad_request(format!("{e}.")),
        e @ (BitmapError::Io { .. } | BitmapError::Corrupt { .. }) => {
            tracing::error!(export, error = %e, "dirty bitmap I/O failed");
            ApiError::internal("bitmap_io_error", format!("{e}."))
        }
    }
}

fn export_of(state: &ControlState, name: &str) -> Result<Arc<Export>, ApiError> {
    state.host.export(name).ok_or_else(|| not_found(name))
}

fn bitmap_of(
    state: &ControlState,
    export: &str,
    bitmap: &str,
) -> Result<(Arc<Export>, Arc<DirtyBitmap>), ApiError> {
    let e = export_of(state, export)?;
    let b = e
        .bitmap(bitmap)
        .ok_or_else(|| bitmap_not_found(export, bitmap))?;
    Ok((e, b))
}

/// An empty body counts as `{}`.
fn parse_optional<T: serde::de::DeserializeOwned + Default>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        Ok(T::default())
    } else {
        parse_json(body)
    }
}

async fn blocking<T: Send + 'static>(
    export: &str,
    f: impl FnOnce() -> Result<T, BitmapError> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(|e| api_error(export, e)),
        Err(e) => Err(ApiError::internal(
            "bitmap_task_failed",
            format!("The bitmap operation did not finish: {e}."),
        )),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PutBitmapRequest {
    granularity_bytes: Option<u64>,
}

pub(super) async fn put_bitmap(
    State(state): State<Arc<ControlState>>,
    UrlPath((name, bitmap)): UrlPath<(String, String)>,
    body: Bytes,
) -> Result<(StatusCode, Json<BitmapView>), ApiError> {
    let req: PutBitmapRequest = parse_optional(&body)?;
    let e = export_of(&state, &name)?;
    let granularity = req.granularity_bytes.unwrap_or(DEFAULT_GRANULARITY);
    let n = bitmap.clone();
    let b = blocking(&name, move || e.create_bitmap(&n, granularity)).await?;
    tracing::info!(export = %name, bitmap = %bitmap, granularity, "dirty bitmap created");
    Ok((StatusCode::CREATED, Json(view(&b, true))))
}

#[derive(Debug, Deserialize)]
pub(super) struct GetQuery {
    #[serde(default = "yes")]
    extents: bool,
}

fn yes() -> bool {
    true
}

pub(super) async fn get_bitmap(
    State(state): State<Arc<ControlState>>,
    UrlPath((name, bitmap)): UrlPath<(String, String)>,
    Query(q): Query<GetQuery>,
) -> Result<Json<BitmapView>, ApiError> {
    let (_, b) = bitmap_of(&state, &name, &bitmap)?;
    Ok(Json(view(&b, q.extents)))
}

pub(super) async fn delete_bitmap(
    State(state): State<Arc<ControlState>>,
    UrlPath((name, bitmap)): UrlPath<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let e = export_of(&state, &name)?;
    let n = bitmap.clone();
    blocking(&name, move || e.remove_bitmap(&n)).await?;
    tracing::info!(export = %name, bitmap = %bitmap, "dirty bitmap deleted");
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ClearRequest {
    offset: Option<u64>,
    length: Option<u64>,
}

pub(super) async fn clear_bitmap(
    State(state): State<Arc<ControlState>>,
    UrlPath((name, bitmap)): UrlPath<(String, String)>,
    body: Bytes,
) -> Result<Json<BitmapView>, ApiError> {
    let req: ClearRequest = parse_optional(&body)?;
    let (e, b) = bitmap_of(&state, &name, &bitmap)?;
    let range = match (req.offset, req.length) {
        (None, None) => None,
        (Some(o), Some(l)) => Some((o, l)),
        _ => {
            return Err(ApiError::bad_request(
                "Give both offset and length, or neither to clear the whole bitmap.",
            ));
        }
    };
    let b2 = Arc::clone(&b);
    // Writes in flight (marked before this clear, landing after it) stay marked.
    blocking(&name, move || {
        let (o, l) = range.unwrap_or((0, b2.size()));
        b2.clear_range_keeping(o, l, &|o, l| e.inflight.busy(o, l))
    })
    .await?;
    Ok(Json(view(&b, false)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct MergeRequest {
    from: String,
}

pub(super) async fn merge_bitmap(
    State(state): State<Arc<ControlState>>,
    UrlPath((name, bitmap)): UrlPath<(String, String)>,
    body: Bytes,
) -> Result<Json<BitmapView>, ApiError> {
    let req: MergeRequest = parse_json(&body)?;
    let (e, b) = bitmap_of(&state, &name, &bitmap)?;
    let from = e
        .bitmap(&req.from)
        .ok_or_else(|| bitmap_not_found(&name, &req.from))?;
    let b2 = Arc::clone(&b);
    blocking(&name, move || b2.merge_from(&from)).await?;
    Ok(Json(view(&b, false)))
}
