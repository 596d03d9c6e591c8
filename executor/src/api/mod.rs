//! The HTTP API (`executor-api.md`): maps requests to the [`Executor`] and its results to
//! responses. Routes, Bearer auth, parameter validation and reply shapes live here; the domain
//! knows nothing about axum.

mod error;
mod params;
pub mod reply;
pub mod wire;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream;
use hearth_adapters::RestartPolicy;
use serde::Deserialize;

pub use error::{ApiError, VERSION};
use params::{check_key, Fields};

use crate::error::Error;
use crate::invoke::Version;
use crate::runtimes::execute::{parse_method, ExecutionRequest};
use crate::runtimes::{Executor, RuntimeParams};

/// Largest execution body (`body` param).
pub const MAX_BODY: usize = 20 * 1024 * 1024;
/// Largest request the API reads: a 20 MiB body escaped into JSON, or a form with it.
const MAX_REQUEST: usize = 3 * MAX_BODY;

type ApiResult = Result<Response, ApiError>;

pub fn router(executor: Arc<Executor>) -> Router {
    let authed = Router::new()
        .route("/v1/runtimes", get(list_runtimes).post(create_runtime))
        .route(
            "/v1/runtimes/{runtime_id}",
            get(get_runtime).delete(delete_runtime),
        )
        .route("/v1/runtimes/{runtime_id}/executions", post(execute))
        .route("/v1/runtimes/{runtime_id}/execution", post(execute))
        .route("/v1/runtimes/{runtime_id}/logs", get(stream_logs))
        .route("/v1/runtimes/{runtime_id}/commands", post(run_command))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(
            executor.clone(),
            require_key,
        ));
    Router::new()
        .route("/v1/health", get(|| async { "OK" }))
        .merge(authed)
        .fallback(|| async { error::route_not_found() })
        .method_not_allowed_fallback(|| async { error::route_not_found() })
        .layer(DefaultBodyLimit::max(MAX_REQUEST))
        .layer(middleware::map_response_with_state(
            executor.clone(),
            error::count_and_redact,
        ))
        .with_state(executor)
}

/// `Authorization: Bearer <OPR_EXECUTOR_SECRET>` on every route but health.
async fn require_key(
    State(executor): State<Arc<Executor>>,
    request: Request,
    next: Next,
) -> Response {
    if !authorized(&executor, request.headers()) {
        return error::unauthorized().into_response();
    }
    next.run(request).await
}

/// Whether `headers` carry the executor's key.
fn authorized(executor: &Executor, headers: &HeaderMap) -> bool {
    let given = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    constant_time_eq(given.as_bytes(), executor.config.secret.as_bytes())
}

/// Compares a given key with the secret in time independent of where they differ; an empty
/// secret matches nothing.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() || b.is_empty() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn read_body(body: Body) -> Result<Bytes, Error> {
    axum::body::to_bytes(body, MAX_REQUEST)
        .await
        .map_err(|_| Error::TooLarge(format!("Request body is larger than {MAX_REQUEST} bytes.")))
}

async fn list_runtimes(State(executor): State<Arc<Executor>>) -> Response {
    Json(executor.list()).into_response()
}

async fn get_runtime(State(executor): State<Arc<Executor>>, Path(id): Path<String>) -> ApiResult {
    let runtime = executor.get(&id).ok_or(Error::RuntimeNotFound)?;
    Ok(Json(runtime.view()).into_response())
}

async fn delete_runtime(
    State(executor): State<Arc<Executor>>,
    Path(id): Path<String>,
) -> ApiResult {
    executor.delete(&id).await?;
    Ok(StatusCode::OK.into_response())
}

/// Reads the runtime parameters shared by create and by an execution's cold start.
fn runtime_params(
    fields: &Fields,
    runtime_id: String,
    image: String,
) -> Result<RuntimeParams, Error> {
    let mut params = RuntimeParams::new(&runtime_id, &image);
    params.entrypoint = fields.string("entrypoint", 256)?.unwrap_or_default();
    params.source = fields.string("source", 2048)?.unwrap_or_default();
    params.variables = fields.object("variables")?;
    params.runtime_entrypoint = fields
        .string("runtimeEntrypoint", 1024)?
        .unwrap_or_default();
    params.cpus = fields.float_in("cpus", 1.0, 0.01, 64.0)?;
    params.memory = fields.integer_in("memory", 512, 6, 1024 * 1024)? as u64;
    let version = fields.string("version", 8)?.unwrap_or_default();
    params.version = Version::parse(&version).ok_or_else(|| {
        Error::InvalidArgument("Invalid `version` param: Value must be one of (v2, v5)".to_string())
    })?;
    // Keep-warm (Hearth): a per-runtime idle TTL and a pin against idle reaping.
    params.idle_timeout = fields.integer_in("idleTimeout", 0, 0, 7 * 24 * 3600)? as u64;
    params.keep_warm = fields.integer_in("keepWarm", 0, 0, 1).map_err(|_| {
        Error::InvalidArgument(
            "Invalid `keepWarm` param: Value must be 0 or 1 (a runtime id is one instance; keep more warm with more runtime ids)."
                .to_string(),
        )
    })? as u64;
    let policy = fields.string("restartPolicy", 32)?.unwrap_or_default();
    params.restart_policy = RestartPolicy::parse(&policy).ok_or_else(|| {
        Error::InvalidArgument(
            "Invalid `restartPolicy` param: Value must be one of (no, always, on-failure, unless-stopped)"
                .to_string(),
        )
    })?;
    Ok(params)
}

async fn create_runtime(
    State(executor): State<Arc<Executor>>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let fields = Fields::parse(&headers, read_body(body).await?).await?;
    let runtime_id = fields.required("runtimeId", 64)?;
    check_key("runtimeId", &runtime_id, 64)?;
    let image = fields.required("image", 128)?;
    let mut params = runtime_params(&fields, runtime_id, image)?;
    params.destination = fields.string("destination", 2048)?.unwrap_or_default();
    params.output_directory = fields.string("outputDirectory", 256)?.unwrap_or_default();
    params.command = fields.string("command", 1024)?.unwrap_or_default();
    params.cache_key = fields.string("cacheKey", 128)?.unwrap_or_default();
    if !params.cache_key.is_empty() {
        check_key("cacheKey", &params.cache_key, 128)?;
    }
    params.timeout = fields.integer_in("timeout", 600, 1, 24 * 3600)? as u64;
    params.remove = fields.boolean("remove", false)?;
    let began = Instant::now();
    let started = crate::runtimes::unix_now();
    let report = executor.create(params).await?;
    let body = match report {
        Some(report) => serde_json::to_value(report)
            .map_err(|err| Error::Internal(format!("failed to encode the build report: {err}")))?,
        None => serde_json::json!({
            "output": [],
            "startTime": started,
            "duration": began.elapsed().as_secs_f64(),
        }),
    };
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

async fn execute(
    State(executor): State<Arc<Executor>>,
    Path(runtime_id): Path<String>,
    request: Request,
) -> ApiResult {
    // The request's own headers, not the copy a `HeaderMap` extractor would make.
    let (parts, body) = request.into_parts();
    execution(
        &executor,
        runtime_id,
        &parts.headers,
        read_body(body).await?,
    )
    .await
}

/// One execution from its request's headers and whole body: the route's handler, and what the
/// executor's own HTTP/1.1 path ([`wire`]) calls.
pub(crate) async fn execution(
    executor: &Arc<Executor>,
    runtime_id: String,
    headers: &HeaderMap,
    body: Bytes,
) -> ApiResult {
    let fields = Fields::parse(headers, body).await?;
    let body = fields.bytes("body", MAX_BODY)?;
    let mut path = fields
        .string("path", 2048)?
        .unwrap_or_else(|| "/".to_string());
    if !path.starts_with('/') {
        path.insert(0, '/');
    }
    if path.chars().any(|c| c.is_control() || c == ' ') {
        return Err(Error::ExecutionBadRequest(
            "Invalid `path` param: it must not contain spaces or control characters.".to_string(),
        )
        .into());
    }
    let method_name = fields
        .string("method", 16)?
        .unwrap_or_else(|| "GET".to_string());
    let method = parse_method(&method_name).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "Invalid `method` param: {method_name:?} must be one of (GET, POST, PUT, PATCH, DELETE, OPTIONS, HEAD)"
        ))
    })?;
    let call_headers = fields.object("headers")?;
    let timeout = fields.integer_in("timeout", 15, 1, 24 * 3600)? as u64;
    let logging = fields.boolean("logging", true)?;
    let image = fields.string("image", 128)?.unwrap_or_default();
    let cold_start = if !image.is_empty()
        && fields
            .string("source", 2048)?
            .is_some_and(|s| !s.is_empty())
    {
        Some(runtime_params(&fields, runtime_id.clone(), image)?)
    } else {
        None
    };
    if cold_start.is_some() {
        check_key("runtimeId", &runtime_id, 64)?;
    }
    let result = executor
        .execute(ExecutionRequest {
            runtime_id,
            body,
            path,
            method,
            headers: call_headers,
            timeout,
            logging,
            cold_start,
        })
        .await?;
    Ok(reply::render(result, headers)?)
}

#[derive(Debug, Deserialize)]
struct LogsQuery {
    timeout: Option<String>,
}

/// The live build log: one line per output chunk, `<timestamp> <content, newlines escaped>`,
/// ending within a second of the build's end.
async fn stream_logs(
    State(executor): State<Arc<Executor>>,
    Path(runtime_id): Path<String>,
    Query(query): Query<LogsQuery>,
) -> ApiResult {
    let timeout: u64 = match query.timeout.as_deref() {
        None | Some("") => 600,
        Some(t) => t.parse().map_err(|_| {
            Error::InvalidArgument(
                "Invalid `timeout` param: Value must be a valid integer".to_string(),
            )
        })?,
    };
    let deadline = Instant::now() + Duration::from_secs(timeout);
    // The caller may open the stream just before it creates the runtime.
    let runtime = loop {
        if let Some(runtime) = executor.get(&runtime_id) {
            break runtime;
        }
        if Instant::now() >= deadline {
            return Err(Error::LogsTimeout.into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let progress = runtime.build_log.subscribe();
    let state = (runtime, progress, 0usize, false);
    let lines = stream::unfold(
        state,
        move |(runtime, mut progress, next, done)| async move {
            if done {
                return None;
            }
            loop {
                let (entries, finished) = runtime.build_log.since(next);
                if !entries.is_empty() {
                    let mut chunk = String::new();
                    for entry in &entries {
                        chunk.push_str(&entry.timestamp);
                        chunk.push(' ');
                        chunk.push_str(&entry.content.replace('\n', "\\n"));
                        chunk.push('\n');
                    }
                    let next = next + entries.len();
                    return Some((
                        Ok::<_, std::io::Error>(chunk),
                        (runtime, progress, next, finished),
                    ));
                }
                if finished || Instant::now() >= deadline {
                    return None;
                }
                let wait = tokio::time::timeout_at(deadline.into(), progress.changed()).await;
                if !matches!(wait, Ok(Ok(()))) {
                    return None;
                }
            }
        },
    );
    Ok((
        [(CONTENT_TYPE, "text/event-stream")],
        Body::from_stream(lines),
    )
        .into_response())
}

async fn run_command(
    State(executor): State<Arc<Executor>>,
    Path(runtime_id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let fields = Fields::parse(&headers, read_body(body).await?).await?;
    let command = fields.required("command", 1024)?;
    let timeout = fields.integer_in("timeout", 600, 1, 24 * 3600)? as u64;
    let output = executor
        .command(&runtime_id, &command, Duration::from_secs(timeout))
        .await?;
    Ok(Json(serde_json::json!({ "output": output })).into_response())
}

async fn metrics(State(executor): State<Arc<Executor>>) -> Response {
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4")],
        executor.metrics.render(executor.warm())
            + &executor.pools.render_metrics()
            + &executor.invoker.render_metrics(),
    )
        .into_response()
}
