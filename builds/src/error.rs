//! The build service's errors. Each names the operation that failed; [`Error::kind`] gives the
//! API's error type and status, and [`Error::is_retryable`] tells a worker whether a failure is the
//! infrastructure's (retry with backoff) or the build's own (final).

use axum::http::StatusCode;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed or names something invalid (400).
    #[error("{0}")]
    InvalidArgument(String),
    /// The request body is over the limit (413).
    #[error("The request body is over {0} bytes")]
    TooLarge(usize),
    /// No function with that name (404).
    #[error("Function {0} not found: deploy it first")]
    FunctionNotFound(String),
    /// No build with that id (404).
    #[error("Build not found")]
    NotFound,
    /// The build already finished and cannot be cancelled (409).
    #[error("{0}")]
    Conflict(String),
    /// The queue did not accept the build (503): nothing was queued.
    #[error("the build queue is unavailable: {0}")]
    QueueUnavailable(String),
    /// The build itself failed: bad source, failing command, timeout (final, never retried).
    #[error("{0}")]
    BuildFailed(String),
    /// The build was cancelled while it ran.
    #[error("build cancelled")]
    Cancelled,
    /// The executor could not be reached or failed on its side (retried).
    #[error("{0}")]
    Executor(String),
    /// The state store failed (retried).
    #[error("{0}")]
    Store(String),
    /// The AMQP broker failed (retried).
    #[error("{0}")]
    Broker(String),
}

impl Error {
    /// The error body's `type` and the HTTP status.
    pub fn kind(&self) -> (&'static str, StatusCode) {
        match self {
            Error::InvalidArgument(_) => ("build_bad_request", StatusCode::BAD_REQUEST),
            Error::TooLarge(_) => ("build_bad_request", StatusCode::PAYLOAD_TOO_LARGE),
            Error::NotFound => ("build_not_found", StatusCode::NOT_FOUND),
            Error::FunctionNotFound(_) => ("function_not_found", StatusCode::NOT_FOUND),
            Error::Conflict(_) => ("build_conflict", StatusCode::CONFLICT),
            Error::QueueUnavailable(_) => {
                ("build_queue_unavailable", StatusCode::SERVICE_UNAVAILABLE)
            }
            Error::BuildFailed(_) => ("build_failed", StatusCode::BAD_REQUEST),
            Error::Cancelled => ("build_cancelled", StatusCode::CONFLICT),
            Error::Executor(_) | Error::Store(_) | Error::Broker(_) => {
                ("general_unknown", StatusCode::INTERNAL_SERVER_ERROR)
            }
        }
    }

    /// Whether a worker should try the build again later.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::Executor(_) | Error::Store(_) | Error::Broker(_)
        )
    }
}

impl From<lapin::Error> for Error {
    fn from(err: lapin::Error) -> Self {
        Error::Broker(format!("AMQP failed: {err}"))
    }
}
