//! The executor's errors. Each variant is one of the Open Runtimes error types; [`Error::kind`]
//! gives the wire `type` and HTTP status, and `api::ApiError` turns them into responses.

use http::StatusCode;

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("Not Found")]
    RouteNotFound,
    #[error("Missing executor key")]
    Unauthorized,
    /// A parameter is missing, of the wrong type, too long or malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// A request or one of its parameters is over its size limit.
    #[error("{0}")]
    TooLarge(String),
    #[error("Runtime not found")]
    RuntimeNotFound,
    #[error("Runtime not found. Please start it first or provide runtime-related parameters.")]
    RuntimeNotFoundNoParams,
    #[error("Runtime already exists.")]
    RuntimeConflict,
    /// The runtime could not be created, started or reached.
    #[error("{0}")]
    RuntimeFailed(String),
    #[error("Timed out waiting for runtime.")]
    RuntimeTimeout,
    /// This executor already holds its maximum number of runtimes, none of them idle.
    #[error("{0}")]
    RuntimeLimit(String),
    #[error("{0}")]
    BuildFailed(String),
    #[error("{0}")]
    ExecutionBadRequest(String),
    #[error("{0}")]
    ExecutionBadJson(String),
    #[error("{0}")]
    ExecutionTimeout(String),
    #[error("Timed out waiting for logs.")]
    LogsTimeout,
    #[error("Operation timed out.")]
    CommandTimeout,
    #[error("Failed to execute command. {0}")]
    CommandFailed(String),
    /// Anything unexpected; the message is logged in full and shortened on the wire.
    #[error("{0}")]
    Internal(String),
}

impl Error {
    /// The wire `type` and the HTTP status.
    pub fn kind(&self) -> (&'static str, StatusCode) {
        match self {
            Self::RouteNotFound => ("general_route_not_found", StatusCode::NOT_FOUND),
            Self::Unauthorized => ("general_unauthorized", StatusCode::UNAUTHORIZED),
            Self::InvalidArgument(_) => ("general_argument_invalid", StatusCode::BAD_REQUEST),
            Self::TooLarge(_) => ("execution_bad_request", StatusCode::PAYLOAD_TOO_LARGE),
            Self::RuntimeNotFound | Self::RuntimeNotFoundNoParams => {
                ("runtime_not_found", StatusCode::NOT_FOUND)
            }
            Self::RuntimeConflict => ("runtime_conflict", StatusCode::CONFLICT),
            Self::RuntimeFailed(_) => ("runtime_failed", StatusCode::BAD_REQUEST),
            Self::RuntimeTimeout => ("runtime_timeout", StatusCode::BAD_REQUEST),
            Self::RuntimeLimit(_) => ("runtime_limit", StatusCode::SERVICE_UNAVAILABLE),
            Self::BuildFailed(_) => ("build_failed", StatusCode::BAD_REQUEST),
            Self::ExecutionBadRequest(_) => ("execution_bad_request", StatusCode::BAD_REQUEST),
            Self::ExecutionBadJson(_) => ("execution_bad_json", StatusCode::BAD_REQUEST),
            Self::ExecutionTimeout(_) => ("execution_timeout", StatusCode::BAD_REQUEST),
            Self::LogsTimeout => ("logs_timeout", StatusCode::GATEWAY_TIMEOUT),
            Self::CommandTimeout => ("command_timeout", StatusCode::INTERNAL_SERVER_ERROR),
            Self::CommandFailed(_) => ("command_failed", StatusCode::INTERNAL_SERVER_ERROR),
            Self::Internal(_) => ("general_unknown", StatusCode::INTERNAL_SERVER_ERROR),
        }
    }
}

impl From<hearth_adapters::Error> for Error {
    fn from(err: hearth_adapters::Error) -> Self {
        Self::RuntimeFailed(err.to_string())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
