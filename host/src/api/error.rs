//! One error shape for every API failure: a status and `{"error":{"status","code","message"}}`.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Bad JSON, a bad field, a bad path or query value.
    #[error("{0}")]
    BadRequest(String),
    /// No token, or the wrong one.
    #[error("missing or invalid bearer token")]
    Unauthorized,
    /// No such lease or module.
    #[error("{0}")]
    NotFound(String),
    /// The change conflicts with what is stored (e.g. the module exists).
    #[error("{0}")]
    Conflict(String),
    /// The body is over the limit.
    #[error("{0}")]
    TooLarge(String),
    /// The store did not answer.
    #[error("{0}")]
    Unavailable(String),
    /// What the request refers to is no longer kept (an old page token).
    #[error("{0}")]
    Gone(String),
}

/// The body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// The HTTP status, repeated.
    pub status: u16,
    /// A stable code: `bad_request`, `unauthorized`, `not_found`, `conflict`, `too_large`, `unavailable`, `gone`.
    pub code: &'static str,
    /// A sentence for people.
    pub message: String,
}

impl ApiError {
    fn parts(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::Gone(_) => (StatusCode::GONE, "gone"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.parts();
        let body = ErrorBody {
            error: ErrorDetail {
                status: status.as_u16(),
                code,
                message: self.to_string(),
            },
        };
        let mut r = (status, Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer realm=\"weft\""),
            );
        }
        r
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge(r.body_text())
        } else {
            ApiError::BadRequest(r.body_text())
        }
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        ApiError::BadRequest(r.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        ApiError::BadRequest(r.body_text())
    }
}

impl From<crate::lease::StoreError> for ApiError {
    fn from(e: crate::lease::StoreError) -> Self {
        ApiError::Unavailable(format!("lease store: {e}"))
    }
}

impl From<crate::wasm::registry::RegistryError> for ApiError {
    fn from(e: crate::wasm::registry::RegistryError) -> Self {
        use crate::wasm::registry::RegistryError as R;
        match e {
            R::Store(e) => e.into(),
            R::Exists(_) => ApiError::Conflict(e.to_string()),
            R::NotFound(_) => ApiError::NotFound(e.to_string()),
            R::Module {
                error: crate::wasm::WasmError::TooLarge { .. },
                ..
            } => ApiError::TooLarge(e.to_string()),
            // Too many compiles at once is the agent's state, not the module's fault: retry.
            R::Module {
                error:
                    crate::wasm::WasmError::Pool(
                        crate::wasm::pool::PoolError::Busy(_) | crate::wasm::pool::PoolError::Stopped,
                    ),
                ..
            } => ApiError::Unavailable(e.to_string()),
            R::Module { .. } | R::Invalid(_) => ApiError::BadRequest(e.to_string()),
        }
    }
}
