//! Bearer-token authentication of the three daemons' HTTP APIs, secure by default:
//! a daemon serves its API only with a token, or when the operator explicitly asks
//! for an open API with `--insecure-no-auth`.

use std::path::Path;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use thiserror::Error;

use crate::api_error::ApiError;
use crate::secret::{Secret, SecretError};

/// How a daemon's API authenticates callers.
#[derive(Debug, Clone)]
pub enum ApiAuth {
    /// `Authorization: Bearer TOKEN` required on every path but `/v1/health`.
    Bearer(Secret),
    /// Open API: the operator passed `--insecure-no-auth`.
    InsecureNoAuth,
}

#[derive(Debug, Error)]
pub enum AuthError {
    #[error(
        "refusing to serve the API without authentication: give --api-token-file FILE \
         (or --api-token TOKEN), or pass --insecure-no-auth to run an open API on purpose"
    )]
    NoToken,
    #[error("--insecure-no-auth contradicts the API token that was also given; drop one")]
    Contradictory,
    #[error(transparent)]
    Token(#[from] SecretError),
}

impl ApiAuth {
    /// Resolves the flags every daemon shares. `daemon` names it in the warning.
    pub fn from_flags(
        token: Option<&str>,
        token_file: Option<&Path>,
        insecure_no_auth: bool,
        daemon: &str,
    ) -> Result<Self, AuthError> {
        match (Secret::from_flags(token, token_file)?, insecure_no_auth) {
            (Some(_), true) => Err(AuthError::Contradictory),
            (Some(t), false) => Ok(Self::Bearer(t)),
            (None, true) => {
                tracing::warn!(
                    "{daemon}: --insecure-no-auth: the API accepts every caller WITHOUT \
                     authentication; anyone who reaches it can control this daemon"
                );
                Ok(Self::InsecureNoAuth)
            }
            (None, false) => Err(AuthError::NoToken),
        }
    }

    /// The token, when there is one (the agent also uses it to authenticate
    /// migration peers).
    pub fn token(&self) -> Option<&Secret> {
        match self {
            Self::Bearer(t) => Some(t),
            Self::InsecureNoAuth => None,
        }
    }

    /// Whether `headers` carry what this policy requires.
    pub fn allows(&self, headers: &HeaderMap) -> bool {
        match self {
            Self::InsecureNoAuth => true,
            Self::Bearer(t) => bearer(headers).is_some_and(|given| t.matches(given)),
        }
    }
}

/// The token of an `Authorization: Bearer TOKEN` header.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// axum middleware: `.layer(middleware::from_fn_with_state(auth, require_bearer))`.
/// A missing or wrong token is 401 `unauthorized` and the handler never runs.
pub async fn require_bearer(
    State(auth): State<Arc<ApiAuth>>,
    request: Request,
    next: Next,
) -> Response {
    if !auth.allows(request.headers()) {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Missing or wrong bearer token; send `Authorization: Bearer TOKEN` with the API token.",
        )
        .into_response();
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn no_token_and_no_opt_out_refuses_to_start() {
        assert!(matches!(
            ApiAuth::from_flags(None, None, false, "t"),
            Err(AuthError::NoToken)
        ));
        assert!(matches!(
            ApiAuth::from_flags(Some("x"), None, true, "t"),
            Err(AuthError::Contradictory)
        ));
        assert!(matches!(
            ApiAuth::from_flags(None, None, true, "t"),
            Ok(ApiAuth::InsecureNoAuth)
        ));
    }

    #[test]
    fn bearer_checks_the_token() {
        let a = ApiAuth::from_flags(Some("s3cret"), None, false, "t").unwrap();
        assert!(a.allows(&headers("Bearer s3cret")));
        assert!(!a.allows(&headers("Bearer s3cre")));
        assert!(!a.allows(&headers("Basic s3cret")));
        assert!(!a.allows(&HeaderMap::new()));
        assert!(ApiAuth::InsecureNoAuth.allows(&HeaderMap::new()));
        assert!(!format!("{a:?}").contains("s3cret"));
    }
}
