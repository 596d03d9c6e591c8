//! The balancer's errors and the one place they become responses: the executor's error shape
//! `{"type", "message", "code", "version"}`. 5xx are logged; 4xx are not errors.

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{Response, StatusCode};
use serde_json::json;

use crate::proxy::{full, ProxyBody};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Not Found")]
    RouteNotFound,
    #[error("Missing executor key")]
    Unauthorized,
    #[error("Request body is larger than {0} bytes.")]
    TooLarge(u64),
    #[error("failed to read the request body: {0}")]
    ClientBody(String),
    #[error("No healthy executor: {0}")]
    NoExecutor(String),
    #[error("Executor {executor} is unreachable: {reason}")]
    Connect { executor: String, reason: String },
    #[error("Executor {executor} failed during the request: {reason}")]
    Upstream { executor: String, reason: String },
    #[error("Executor {executor} did not answer within {secs} s")]
    Timeout { executor: String, secs: f64 },
    #[error("invalid executor entry {0:?} (want http://host:port, host:port or host, optionally =WEIGHT)")]
    InvalidExecutor(String),
    #[error("failed to serve: {0}")]
    Serve(#[from] std::io::Error),
}

impl Error {
    /// The error type of the API and its status.
    pub fn kind(&self) -> (&'static str, StatusCode) {
        match self {
            Self::RouteNotFound => ("general_route_not_found", StatusCode::NOT_FOUND),
            Self::Unauthorized => ("general_unauthorized", StatusCode::UNAUTHORIZED),
            Self::TooLarge(_) => ("execution_bad_request", StatusCode::PAYLOAD_TOO_LARGE),
            Self::ClientBody(_) => ("execution_bad_request", StatusCode::BAD_REQUEST),
            Self::NoExecutor(_) => ("balancer_unavailable", StatusCode::SERVICE_UNAVAILABLE),
            Self::Connect { .. } => ("balancer_unavailable", StatusCode::SERVICE_UNAVAILABLE),
            Self::Upstream { .. } => ("balancer_upstream_failed", StatusCode::BAD_GATEWAY),
            Self::Timeout { .. } => ("balancer_upstream_timeout", StatusCode::GATEWAY_TIMEOUT),
            Self::InvalidExecutor(_) | Self::Serve(_) => {
                ("general_unknown", StatusCode::INTERNAL_SERVER_ERROR)
            }
        }
    }

    /// The status and the JSON body of the answer (5xx logged here).
    pub fn into_parts(self) -> (StatusCode, Bytes) {
        let (kind, status) = self.kind();
        if status.is_server_error() {
            tracing::warn!(kind, error = %self, "request failed");
        }
        let body = json!({
            "type": kind,
            "message": self.to_string(),
            "code": status.as_u16(),
            "version": VERSION,
        });
        (status, Bytes::from(body.to_string()))
    }

    pub fn into_response(self) -> Response<ProxyBody> {
        let (status, body) = self.into_parts();
        let mut response = Response::new(full(body));
        *response.status_mut() = status;
        response.headers_mut().insert(
            CONTENT_TYPE,
            http::HeaderValue::from_static("application/json; charset=utf-8"),
        );
        response
    }
}
