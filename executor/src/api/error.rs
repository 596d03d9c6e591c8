//! The one place errors become responses: `{"type", "message", "code", "version"}` with the
//! status of the error's kind. 5xx are logged with their full message; 4xx are not errors.

use axum::extract::State;
use axum::http::header::{HeaderValue, CONNECTION, CONTENT_TYPE};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use std::sync::Arc;

use crate::error::Error;
use crate::runtimes::Executor;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// An error on its way to the client.
#[derive(Debug)]
pub struct ApiError(pub Error);

impl From<Error> for ApiError {
    fn from(err: Error) -> Self {
        Self(err)
    }
}

/// What [`count_and_redact`] needs to see of an error response.
#[derive(Debug, Clone)]
struct ErrorKind(&'static str);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (kind, status) = self.0.kind();
        if status.is_server_error() {
            tracing::error!(kind, error = %self.0, "request failed");
        }
        let body = json!({
            "type": kind,
            "message": self.0.to_string(),
            "code": status.as_u16(),
            "version": VERSION,
        });
        let mut response = (
            status,
            [(CONTENT_TYPE, "application/json; charset=utf-8")],
            body.to_string(),
        )
            .into_response();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            // A body over the limit is not read to its end, so the server closes the connection
            // after this answer: say so, or a client may send its next request on it and lose it
            // (as the build API does).
            response
                .headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        response.extensions_mut().insert(ErrorKind(kind));
        response
    }
}

/// Counts error responses by type and, outside development, hides the detail of unexpected
/// errors (the log has it).
pub async fn count_and_redact(
    State(executor): State<Arc<Executor>>,
    response: Response,
) -> Response {
    finish(&executor, response)
}

/// What [`count_and_redact`] does to one response (the executor's own HTTP/1.1 path calls it
/// directly).
pub fn finish(executor: &Executor, response: Response) -> Response {
    let Some(ErrorKind(kind)) = response.extensions().get::<ErrorKind>().cloned() else {
        return response;
    };
    executor.metrics.error(kind);
    if kind == "general_unknown" && !executor.config.development() {
        let status = response.status();
        let body = json!({
            "type": kind,
            "message": "Internal error. The executor's log has the details (or set OPR_EXECUTOR_ENV=development).",
            "code": status.as_u16(),
            "version": VERSION,
        });
        return (
            status,
            [(CONTENT_TYPE, "application/json; charset=utf-8")],
            body.to_string(),
        )
            .into_response();
    }
    response
}

pub fn route_not_found() -> ApiError {
    ApiError(Error::RouteNotFound)
}

pub fn unauthorized() -> ApiError {
    ApiError(Error::Unauthorized)
}
