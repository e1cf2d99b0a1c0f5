//! The error answer every daemon's API gives: a status and
//! `{"error": {"code": "snake_case", "message": "A sentence a person can act on."}}`.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    /// Stable snake_case code that scripts match on.
    pub code: &'static str,
    /// A sentence a person can act on.
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// A path (of an export, image or dump) outside the roots the operator allowed.
    pub fn forbidden_path(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "path_not_allowed", message)
    }

    pub fn internal(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, code, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(json!({"error": {"code": self.code, "message": self.message}}));
        (self.status, body).into_response()
    }
}

/// Parses a JSON body with an error a person can act on (axum's own rejection is
/// plain text).
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "The request body is not valid JSON for this call: {e}."
        ))
    })
}
