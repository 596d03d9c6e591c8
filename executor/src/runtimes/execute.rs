//! Executions: take (or cold-start) the runtime, forward the call within the caller's budget,
//! collect the request's logs, and report the cold start apart from the function's duration.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;

use super::{unix_now, Executor, RuntimeParams};
use crate::error::{Error, Result};
use crate::invoke::{Call, InvokeError};
use crate::logs;
use crate::metrics::Outcome;

/// One execution as the API hands it over.
#[derive(Debug, Clone)]
pub struct ExecutionRequest {
    pub runtime_id: String,
    pub body: Bytes,
    pub path: String,
    pub method: Method,
    pub headers: Vec<(String, String)>,
    /// Seconds for everything, cold start included.
    pub timeout: u64,
    pub logging: bool,
    /// Present when the caller gave `image` and `source`: used only for a cold start.
    pub cold_start: Option<RuntimeParams>,
}

#[derive(Debug, Clone)]
pub struct ExecutionResult {
    pub status_code: u16,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    pub logs: String,
    pub errors: String,
    /// Seconds the function's call took.
    pub duration: f64,
    /// Unix seconds when the execution was received.
    pub start_time: f64,
    /// Seconds spent waiting for a cold start (0 when the runtime was warm).
    pub cold_start: f64,
}

const TIMED_OUT: &str = "Execution timed out.";

impl Executor {
    pub async fn execute(self: &Arc<Self>, request: ExecutionRequest) -> Result<ExecutionResult> {
        let start_time = unix_now();
        let begun = Instant::now();
        let deadline = begun + Duration::from_secs(request.timeout.max(1));
        let mut restarted = false;
        let mut refused = 0;
        loop {
            let (guard, cold) = self
                .acquire_or_start(request.cold_start.as_ref(), &request.runtime_id, deadline)
                .await?;
            let runtime = guard.runtime().clone();
            let Some(target) = runtime.target.get() else {
                return Err(Error::RuntimeFailed("runtime has no address".to_string()));
            };
            let remaining = deadline.saturating_duration_since(Instant::now());
            let call_started = Instant::now();
            let sent = std::time::SystemTime::now();
            let reply = self
                .invoker
                .call(Call {
                    target,
                    secret: &runtime.secret,
                    version: runtime.version,
                    method: request.method.clone(),
                    path: &request.path,
                    headers: &request.headers,
                    body: request.body.clone(),
                    timeout: remaining.max(Duration::from_secs(1)),
                    logging: request.logging,
                })
                .await;
            let duration = call_started.elapsed().as_secs_f64();
            let cold_start = cold.map(|d| d.as_secs_f64()).unwrap_or_default();
            match reply {
                Ok(reply) => {
                    runtime
                        .initialised
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                    let (logs, errors) = match reply.inline_logs {
                        Some(inline) => inline,
                        None if !request.logging || reply.log_id.is_empty() => Default::default(),
                        None => match (runtime.logs(), runtime.container_id()) {
                            (Some(dir), _) => dir.take(&reply.log_id, sent).await,
                            (None, Some(container)) => {
                                logs::take_via_adapter(
                                    self.adapter.as_ref(),
                                    container,
                                    &reply.log_id,
                                )
                                .await
                            }
                            (None, None) => Default::default(),
                        },
                    };
                    let outcome = if reply.status == 500 && errors.contains(TIMED_OUT) {
                        Outcome::TimedOut
                    } else {
                        Outcome::Answered
                    };
                    self.metrics.execution(outcome);
                    return Ok(ExecutionResult {
                        status_code: reply.status,
                        headers: reply.headers,
                        body: reply.body,
                        logs,
                        errors,
                        duration,
                        start_time,
                        cold_start,
                    });
                }
                Err(InvokeError::Timeout) => {
                    self.metrics.execution(Outcome::TimedOut);
                    return Ok(ExecutionResult {
                        status_code: 500,
                        headers: Vec::new(),
                        body: Bytes::new(),
                        logs: String::new(),
                        errors: TIMED_OUT.to_string(),
                        duration,
                        start_time,
                        cold_start,
                    });
                }
                Err(InvokeError::Connect(reason)) => {
                    drop(guard);
                    if self.drop_if_dead(&runtime).await {
                        // Its container is gone: start it again once if we know how.
                        if request.cold_start.is_some() && !restarted {
                            restarted = true;
                            continue;
                        }
                        self.metrics.execution(Outcome::Failed);
                        return Err(Error::RuntimeFailed(
                            "The runtime's container is gone. Start it again or provide runtime-related parameters."
                                .to_string(),
                        ));
                    }
                    refused += 1;
                    if refused >= self.config.retry_attempts.max(1) || Instant::now() >= deadline {
                        self.metrics.execution(Outcome::Failed);
                        return Err(Error::RuntimeFailed(format!(
                            "The runtime refused the connection: {reason}"
                        )));
                    }
                    tokio::time::sleep(self.config.retry_delay()).await;
                }
                Err(InvokeError::TooLarge) => {
                    self.metrics.execution(Outcome::Failed);
                    return Err(Error::ExecutionBadRequest(format!(
                        "The function's response is larger than {} bytes.",
                        crate::invoke::MAX_RESPONSE_BYTES
                    )));
                }
                Err(InvokeError::Protocol(reason)) => {
                    self.metrics.execution(Outcome::Failed);
                    return Err(Error::Internal(format!(
                        "The runtime failed while answering: {reason}"
                    )));
                }
            }
        }
    }
}

/// The method names an execution accepts.
pub fn parse_method(value: &str) -> Option<Method> {
    match value.to_ascii_uppercase().as_str() {
        "GET" => Some(Method::GET),
        "POST" => Some(Method::POST),
        "PUT" => Some(Method::PUT),
        "PATCH" => Some(Method::PATCH),
        "DELETE" => Some(Method::DELETE),
        "OPTIONS" => Some(Method::OPTIONS),
        "HEAD" => Some(Method::HEAD),
        _ => None,
    }
}
