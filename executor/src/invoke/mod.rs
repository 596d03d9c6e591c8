//! The executor's side of the runtime protocol (`runtime-protocol.md` §3–4): forwards a call to
//! a runtime as v5 (secret, timeout and logging headers) or as the legacy v2 JSON invocation,
//! and probes `/__opr/health` for readiness. The connections are [`conn`]'s: kept alive per
//! runtime and driven by the calling task, over the runtime's Unix socket where it has one
//! ([`Target`]).

mod conn;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http::Method;
use serde_json::{json, Value};

use conn::{Answer, Outgoing, Pool, SendError};

use hearth_adapters::Endpoint;

/// The variable that asks a runtime to serve on a Unix socket as well (`runtimes/socket.md`).
pub const SOCKET_ENV: &str = "OPEN_RUNTIMES_SOCKET";
/// Where that socket is: in the runtime's log folder, the one folder it shares with the executor
/// (bound at `/mnt/logs`).
pub const SOCKET_IN_RUNTIME: &str = "/mnt/logs/.hearth.sock";
const SOCKET_FILE: &str = ".hearth.sock";

/// Where a runtime is called: its TCP endpoint, and the Unix socket it may also serve on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    pub endpoint: Endpoint,
    /// The socket's path on the executor's side; `None`: TCP only.
    pub socket: Option<PathBuf>,
}

impl Target {
    /// `endpoint`, and the socket in `logs_dir` (the runtime's log folder on this side) if any.
    pub fn new(endpoint: Endpoint, logs_dir: Option<&Path>) -> Self {
        Self {
            endpoint,
            socket: logs_dir.map(|dir| dir.join(SOCKET_FILE)),
        }
    }
}

/// Largest response body a function may return.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;
/// Extra time the client waits beyond the function's own timeout (the runtime answers first).
const GRACE: Duration = Duration::from_secs(5);
/// Longest a pool member may take to load its function (extracting a large archive included).
const SPECIALISE_TIMEOUT: Duration = Duration::from_secs(120);

/// Response headers that describe the runtime's connection, not the function's answer.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "transfer-encoding",
    "upgrade",
    "te",
    "trailer",
    "proxy-connection",
    "proxy-authenticate",
];

/// Headers the executor sets itself or that only make sense hop by hop.
const SKIPPED_REQUEST_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "connection",
    "keep-alive",
    "transfer-encoding",
    "upgrade",
    "te",
    "trailer",
    "proxy-connection",
    "authorization",
    "x-open-runtimes-secret",
    "x-open-runtimes-timeout",
    "x-open-runtimes-logging",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V2,
    V5,
}

impl Version {
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "v2" => Some(Self::V2),
            "" | "v5" => Some(Self::V5),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::V2 => "v2",
            Self::V5 => "v5",
        }
    }
}

/// One call to forward.
pub struct Call<'a> {
    pub target: &'a Target,
    pub secret: &'a str,
    pub version: Version,
    pub method: Method,
    pub path: &'a str,
    pub headers: &'a [(String, String)],
    pub body: Bytes,
    /// What is left of the caller's budget for the function itself.
    pub timeout: Duration,
    pub logging: bool,
}

/// What the runtime answered.
#[derive(Debug, Default)]
pub struct Reply {
    pub status: u16,
    /// Lower-cased names, in order, repeated names repeated, `x-open-runtimes-*` removed.
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    /// v5: the id of the request's log files ("" when logging is off).
    pub log_id: String,
    /// v2: the logs and errors come inline.
    pub inline_logs: Option<(String, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    /// Nothing was sent: the runtime refused or dropped the connection.
    #[error("failed to connect to the runtime: {0}")]
    Connect(String),
    #[error("the runtime did not answer in time")]
    Timeout,
    #[error("the runtime's response is larger than {MAX_RESPONSE_BYTES} bytes")]
    TooLarge,
    #[error("{0}")]
    Protocol(String),
}

#[derive(Clone, Default)]
pub struct Invoker {
    pool: std::sync::Arc<Pool>,
}

impl Invoker {
    pub fn new() -> Self {
        Self::default()
    }

    /// `/metrics` lines: requests runtimes answered, by transport.
    pub fn render_metrics(&self) -> String {
        let (unix, tcp) = self.pool.answered();
        format!(
            "# HELP hearth_runtime_requests_total Requests runtimes answered (executions, probes, specialisations), by transport.\n\
             # TYPE hearth_runtime_requests_total counter\n\
             hearth_runtime_requests_total{{transport=\"unix\"}} {unix}\n\
             hearth_runtime_requests_total{{transport=\"tcp\"}} {tcp}\n"
        )
    }

    /// Forwards one call and reads the whole response.
    pub async fn call(&self, call: Call<'_>) -> Result<Reply, InvokeError> {
        let limit = call.timeout + GRACE;
        match call.version {
            Version::V5 => tokio::time::timeout(limit, self.call_v5(call))
                .await
                .map_err(|_| InvokeError::Timeout)?,
            Version::V2 => tokio::time::timeout(limit, self.call_v2(call))
                .await
                .map_err(|_| InvokeError::Timeout)?,
        }
    }

    async fn call_v5(&self, call: Call<'_>) -> Result<Reply, InvokeError> {
        let mut request =
            Outgoing::new(call.method.as_str(), call.path).map_err(InvokeError::Protocol)?;
        for (name, value) in call.headers {
            if SKIPPED_REQUEST_HEADERS
                .iter()
                .any(|skipped| skipped.eq_ignore_ascii_case(name))
            {
                continue;
            }
            // A name or value that could not be sent as is, is left out.
            request.header(name, value);
        }
        let timeout_secs = call.timeout.as_secs().max(1);
        let basic =
            base64::engine::general_purpose::STANDARD.encode(format!("opr:{}", call.secret));
        request.header("x-open-runtimes-secret", call.secret);
        request.header("x-open-runtimes-timeout", &timeout_secs.to_string());
        request.header(
            "x-open-runtimes-logging",
            if call.logging { "enabled" } else { "disabled" },
        );
        request.header("authorization", &format!("Basic {basic}"));
        let answer = self
            .pool
            .send(call.target, request.body(call.body), MAX_RESPONSE_BYTES)
            .await
            .map_err(classify)?;
        let mut headers = Vec::with_capacity(answer.headers.len());
        let mut log_id = String::new();
        for (name, value) in answer.headers {
            if name == "x-open-runtimes-log-id" {
                log_id = value;
            } else if !name.starts_with("x-open-runtimes-") && !HOP_BY_HOP.contains(&name.as_str())
            {
                headers.push((name, value));
            }
        }
        Ok(Reply {
            status: answer.status,
            headers,
            body: answer.body,
            log_id,
            inline_logs: None,
        })
    }

    async fn call_v2(&self, call: Call<'_>) -> Result<Reply, InvokeError> {
        let headers: serde_json::Map<String, Value> = call
            .headers
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), Value::String(v.clone())))
            .collect();
        let payload = json!({
            "variables": {},
            "payload": String::from_utf8_lossy(&call.body),
            "headers": headers,
        });
        let mut request = Outgoing::new("POST", "/").map_err(InvokeError::Protocol)?;
        request.header("content-type", "application/json");
        request.header("x-internal-challenge", call.secret);
        let Answer {
            status,
            body: bytes,
            ..
        } = self
            .pool
            .send(
                call.target,
                request.body(Bytes::from(payload.to_string())),
                MAX_RESPONSE_BYTES,
            )
            .await
            .map_err(classify)?;
        let parsed: Value = serde_json::from_slice(&bytes).map_err(|err| {
            InvokeError::Protocol(format!("the v2 runtime answered with invalid JSON: {err}"))
        })?;
        let text = |key: &str| {
            parsed
                .get(key)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        let (body, content_type) = match parsed.get("response") {
            Some(Value::String(s)) => (Bytes::from(s.clone()), "text/plain; charset=utf-8"),
            Some(Value::Null) | None => (Bytes::new(), "text/plain; charset=utf-8"),
            Some(other) => (
                Bytes::from(other.to_string()),
                "application/json; charset=utf-8",
            ),
        };
        Ok(Reply {
            status,
            headers: vec![("content-type".to_string(), content_type.to_string())],
            body,
            log_id: String::new(),
            inline_logs: Some((text("stdout"), text("stderr"))),
        })
    }

    /// Hands a pool member its function (`runtimes/pool-protocol.md`): env and code archive.
    pub async fn specialise(
        &self,
        target: &Target,
        pool_secret: &str,
        env: &[(String, String)],
        code: &[u8],
    ) -> Result<(), InvokeError> {
        let env: serde_json::Map<String, Value> = env
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        let body = json!({
            "env": env,
            "code": base64::engine::general_purpose::STANDARD.encode(code),
        });
        let mut request =
            Outgoing::new("POST", "/__hearth/specialise").map_err(InvokeError::Protocol)?;
        request.header("content-type", "application/json");
        request.header("x-hearth-pool-secret", pool_secret);
        let request = request.body(Bytes::from(body.to_string()));
        let answer = async {
            let Answer {
                status,
                body: bytes,
                ..
            } = self
                .pool
                .send(target, request, 64 * 1024)
                .await
                .map_err(classify)?;
            if status == 200 {
                Ok(())
            } else {
                Err(InvokeError::Protocol(format!(
                    "the runtime refused its function ({status}): {}",
                    String::from_utf8_lossy(&bytes).trim()
                )))
            }
        };
        tokio::time::timeout(SPECIALISE_TIMEOUT, answer)
            .await
            .map_err(|_| InvokeError::Timeout)?
    }

    /// Polls the runtime until it answers HTTP at all, backing off from 1 ms. Returns false when
    /// `deadline` passes first.
    pub async fn wait_listening(&self, target: &Target, deadline: Instant) -> bool {
        let mut delay = Duration::from_millis(1);
        loop {
            let Ok(request) = Outgoing::new("GET", "/__opr/health") else {
                return false;
            };
            let attempt = tokio::time::timeout(
                Duration::from_secs(1),
                self.pool.send(target, request, 64 * 1024),
            );
            if let Ok(Ok(_)) = attempt.await {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            tokio::time::sleep(delay.min(deadline - now)).await;
            delay = (delay * 2).min(Duration::from_millis(10));
        }
    }
}

fn classify(err: SendError) -> InvokeError {
    match err {
        SendError::Connect(reason) => InvokeError::Connect(reason),
        SendError::TooLarge => InvokeError::TooLarge,
        SendError::Failed(reason) => {
            InvokeError::Protocol(format!("the runtime failed to answer: {reason}"))
        }
    }
}
