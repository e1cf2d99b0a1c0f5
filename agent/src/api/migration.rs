//! HTTP routes of live migration (see docs/migration.md and api.md):
//!
//! | method and path | body | answer |
//! |---|---|---|
//! | `POST /v1/vms/{name}/migrate` | `MigrateRequest` | `202 {migration_id}` |
//! | `GET /v1/migrations` | | `[MigrationInfo]` |
//! | `GET /v1/migrations/{id}` | | `MigrationInfo` (query-migrate-like statistics) |
//! | `PATCH /v1/migrations/{id}` | `LimitsPatch` | `MigrationInfo` with the new limits |
//! | `POST /v1/migrations/{id}/cancel` | | `MigrationInfo`; the guest keeps running on the source (409 `wrong_state` after a switchover go-ahead) |
//! | `POST /v1/migrations/{id}/abort` | | `MigrationInfo`; ends a quiesced coordinated migration (no go-ahead yet) as `failed` (`aborted`) with the source left paused; else 409 `wrong_state` |
//! | `POST /v1/migrations/{id}/switchover` | `{disks: [URI]}` | `MigrationInfo`; the go-ahead of a `quiesced` coordinated migration, else 409 `wrong_state` |
//! | `POST /v1/migrations/tickets` | `{vm}` | `{ticket}`: one-time credential for an incoming stream |
//!
//! The router carries no authentication itself: `api::app` merges it behind the
//! agent's bearer-token layer, which covers every route.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::ApiError;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::contract::VmError;
use crate::migration::service::{
    LimitsPatch, MigrateRequest, MigrationService, ServiceError, SwitchoverRequest,
};

pub fn routes(svc: Arc<MigrationService>) -> Router {
    Router::new()
        .route("/v1/vms/{name}/migrate", post(migrate))
        .route("/v1/migrations", get(list))
        .route("/v1/migrations/tickets", post(ticket))
        .route("/v1/migrations/{id}", get(show).patch(patch))
        .route("/v1/migrations/{id}/cancel", post(cancel))
        .route("/v1/migrations/{id}/switchover", post(switchover))
        .route("/v1/migrations/{id}/abort", post(abort))
        .with_state(svc)
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        let msg = e.to_string();
        let (status, code) = match e {
            ServiceError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ServiceError::BadRequest(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            ServiceError::LeaseInUri(_) => (StatusCode::BAD_REQUEST, "lease_in_uri"),
            ServiceError::NoCredentials => (StatusCode::BAD_REQUEST, "no_credentials"),
            ServiceError::Ended(_) => (StatusCode::CONFLICT, "migration_ended"),
            ServiceError::WrongState(_) => (StatusCode::CONFLICT, "wrong_state"),
            ServiceError::Vm(VmError::WrongState { .. }) => (StatusCode::CONFLICT, "wrong_state"),
            // The manager reports a missing VM as "no VM named ...".
            ServiceError::Vm(VmError::Other(ref m)) if m.starts_with("no VM") => {
                (StatusCode::NOT_FOUND, "not_found")
            }
            ServiceError::Vm(_) => (StatusCode::CONFLICT, "vm_error"),
        };
        ApiError::new(status, code, msg)
    }
}

/// Rejections of malformed JSON in the same error shape.
fn body<T>(b: Result<Json<T>, axum::extract::rejection::JsonRejection>) -> Result<T, ApiError> {
    b.map(|Json(v)| v)
        .map_err(|e| ApiError::bad_request(e.body_text()))
}

async fn migrate(
    State(svc): State<Arc<MigrationService>>,
    Path(name): Path<String>,
    b: Result<Json<MigrateRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let req = body(b)?;
    let id = svc.start(&name, req)?;
    Ok((StatusCode::ACCEPTED, Json(json!({"migration_id": id}))).into_response())
}

async fn list(State(svc): State<Arc<MigrationService>>) -> Response {
    Json(svc.list()).into_response()
}

async fn show(
    State(svc): State<Arc<MigrationService>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    Ok(Json(svc.get(&id)?).into_response())
}

async fn patch(
    State(svc): State<Arc<MigrationService>>,
    Path(id): Path<String>,
    b: Result<Json<LimitsPatch>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let p = body(b)?;
    Ok(Json(svc.patch(&id, p)?).into_response())
}

async fn cancel(
    State(svc): State<Arc<MigrationService>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    Ok(Json(svc.cancel(&id)?).into_response())
}

async fn abort(
    State(svc): State<Arc<MigrationService>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    Ok(Json(svc.abort(&id)?).into_response())
}

async fn switchover(
    State(svc): State<Arc<MigrationService>>,
    Path(id): Path<String>,
    b: Result<Json<SwitchoverRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let req = body(b)?;
    Ok(Json(svc.switchover(&id, req)?).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TicketRequest {
    vm: String,
}

async fn ticket(
    State(svc): State<Arc<MigrationService>>,
    b: Result<Json<TicketRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let t = body(b)?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"ticket": svc.issue_ticket(&t.vm)})),
    )
        .into_response())
}

/// For the `api_bodies` fuzz target: the migration routes' bodies (0: migrate,
/// 1: switchover, 2: limits patch, 3: ticket), parsed as their handlers do.
#[doc(hidden)]
pub fn fuzz_request_body(route: u8, body: &[u8]) {
    use crate::migration::service::{LimitsPatch, MigrateRequest, SwitchoverRequest};
    match route % 4 {
        0 => drop(serde_json::from_slice::<MigrateRequest>(body)),
        1 => {
            if let Ok(r) = serde_json::from_slice::<SwitchoverRequest>(body) {
                let _ = super::check_disks(&r.disks);
            }
        }
        2 => drop(serde_json::from_slice::<LimitsPatch>(body)),
        _ => drop(serde_json::from_slice::<TicketRequest>(body)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::fake::FakeHost;
    use axum::body::Body;
    use axum::http::Request;
    use std::time::Duration;
    use tower::ServiceExt;

    async fn call(
        r: &Router,
        method: &str,
        uri: &str,
        body: serde_json::Value,
    ) -> (StatusCode, serde_json::Value) {
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .expect("request");
        let resp = r.clone().oneshot(req).await.expect("infallible");
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .expect("body");
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn routes_start_show_patch_cancel_and_report_errors() {
        let host = std::sync::Arc::new(FakeHost::plain(8 << 20, Duration::from_micros(1)));
        let vm = host.add_running("vm1", 16);
        let svc = MigrationService::new(host.clone(), Some("tok".into()));
        let r = routes(svc.clone());

        // A target that never answers keeps the migration in setup while we look at it.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let target = silent.local_addr().expect("addr").to_string();
        let (s, v) = call(
            &r,
            "POST",
            "/v1/vms/vm1/migrate",
            json!({"target": target, "streams": 2, "compression": "lz4"}),
        )
        .await;
        assert_eq!(s, StatusCode::ACCEPTED, "{v}");
        let id = v["migration_id"].as_str().expect("id").to_string();

        let (s, v) = call(&r, "GET", &format!("/v1/migrations/{id}"), json!(null)).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(v["vm"], "vm1");
        assert_eq!(
            v["limits"]["downtime_limit_ms"], 300,
            "default downtime limit"
        );
        assert_eq!(v["compression"], "lz4");

        let (s, v) = call(
            &r,
            "PATCH",
            &format!("/v1/migrations/{id}"),
            json!({"downtime_limit_ms": 50, "max_bandwidth_mibs": 10}),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v["limits"]["downtime_limit_ms"], 50);
        assert_eq!(v["limits"]["max_bandwidth_mibs"], 10);

        // Not quiesced (and not coordinated): the go-ahead is a conflict.
        let (s, v) = call(
            &r,
            "POST",
            &format!("/v1/migrations/{id}/switchover"),
            json!({"disks": []}),
        )
        .await;
        assert_eq!(s, StatusCode::CONFLICT, "{v}");
        assert_eq!(v["error"]["code"], "wrong_state");
        let (s, v) = call(
            &r,
            "POST",
            &format!("/v1/migrations/{id}/switchover"),
            json!({"disk": []}),
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        let (s, _) = call(
            &r,
            "POST",
            "/v1/migrations/nope/switchover",
            json!({"disks": []}),
        )
        .await;
        assert_eq!(s, StatusCode::NOT_FOUND);

        // The VM is migrating: a second migrate is refused.
        let (s, v) = call(
            &r,
            "POST",
            "/v1/vms/vm1/migrate",
            json!({"target": "127.0.0.1:1"}),
        )
        .await;
        assert_eq!(s, StatusCode::CONFLICT, "{v}");
        assert_eq!(v["error"]["code"], "wrong_state");

        let (s, _) = call(
            &r,
            "POST",
            &format!("/v1/migrations/{id}/cancel"),
            json!(null),
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        drop(silent); // The sender's handshake now fails; the migration ends.
        let mut state = serde_json::Value::Null;
        for _ in 0..500 {
            let (_, v) = call(&r, "GET", &format!("/v1/migrations/{id}"), json!(null)).await;
            state = v["state"].clone();
            if state == "failed" || state == "cancelled" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(state == "failed" || state == "cancelled", "{state}");
        assert_eq!(
            host.get("vm1").expect("still here").1,
            crate::migration::fake::FakeState::Running
        );
        vm.kill();

        let (s, v) = call(&r, "GET", "/v1/migrations/nope", json!(null)).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        assert_eq!(v["error"]["code"], "not_found");
        let (s, v) = call(
            &r,
            "POST",
            "/v1/vms/vm1/migrate",
            json!({"target": "x", "bogus": 1}),
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .expect("sentence")
                .contains("bogus")
        );
        let (s, v) = call(
            &r,
            "POST",
            "/v1/vms/ghost/migrate",
            json!({"target": "127.0.0.1:1"}),
        )
        .await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
        let (s, v) = call(&r, "POST", "/v1/migrations/tickets", json!({"vm": "vm9"})).await;
        assert_eq!(s, StatusCode::CREATED);
        assert!(
            crate::migration::receiver::parse_ticket(v["ticket"].as_str().expect("ticket"))
                .is_some()
        );
        let (s, _) = call(&r, "GET", "/v1/migrations", json!(null)).await;
        assert_eq!(s, StatusCode::OK);
    }
}
