//! The HTTP API (`/v1/builds`): submit, list, inspect, stream the log of, and cancel builds.
//! Bearer auth with the executor's secret on everything but `/v1/health`. Errors leave through
//! one [`ApiError`] as `{"type", "message", "code", "version"}`, like the executor's.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::header::{HeaderValue, AUTHORIZATION, CONNECTION, CONTENT_TYPE};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::error::Error;
use crate::model::{Build, Job, Spec, Status};
use crate::queue::Broker;
use crate::store::Store;
use crate::unix_now;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// Largest submit body: a build request is small.
const BODY_LIMIT: usize = 1 << 20;

pub struct Service {
    pub store: Store,
    pub broker: Arc<Broker>,
    pub secret: String,
    /// The executor's storage; uploads go to `uploads/` in it.
    pub storage: Arc<hearth_executor::storage::Storage>,
    /// Largest upload in bytes.
    pub max_upload: u64,
}

/// An error on its way to the client; 5xx are logged with their message.
#[derive(Debug)]
pub struct ApiError(pub Error);

impl From<Error> for ApiError {
    fn from(err: Error) -> Self {
        Self(err)
    }
}

fn error_response(kind: &str, status: StatusCode, message: &str) -> Response {
    let body =
        json!({"type": kind, "message": message, "code": status.as_u16(), "version": VERSION});
    let mut response = (
        status,
        [(CONTENT_TYPE, "application/json; charset=utf-8")],
        body.to_string(),
    )
        .into_response();
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        // The rest of the body is never read, so the server closes the connection after this
        // answer: say so, or a client may send its next request on it and lose it.
        response
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (kind, status) = self.0.kind();
        if status.is_server_error() {
            tracing::error!(kind, error = %self.0, "build request failed");
        }
        error_response(kind, status, &self.0.to_string())
    }
}

type ApiResult<T = Response> = std::result::Result<T, ApiError>;

pub fn router(service: Arc<Service>) -> Router {
    let authed = Router::new()
        .route("/v1/builds", get(list).post(submit))
        .route("/v1/builds/{id}", get(inspect).delete(cancel))
        .route("/v1/builds/{id}/logs", get(stream_logs))
        .route("/v1/uploads", axum::routing::post(upload))
        .route("/v1/functions", get(list_functions))
        .route(
            "/v1/functions/{name}",
            get(get_function).delete(remove_function),
        )
        .route_layer(middleware::from_fn_with_state(service.clone(), authorize));
    Router::new()
        .route("/v1/health", get(|| async { "OK" }))
        .merge(authed)
        .fallback(|| async {
            error_response(
                "general_route_not_found",
                StatusCode::NOT_FOUND,
                "Not Found",
            )
        })
        .with_state(service)
}

async fn authorize(State(service): State<Arc<Service>>, request: Request, next: Next) -> Response {
    let given = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    if !hearth_executor::api::constant_time_eq(given.as_bytes(), service.secret.as_bytes()) {
        return error_response(
            "general_unauthorized",
            StatusCode::UNAUTHORIZED,
            "Missing executor key",
        );
    }
    next.run(request).await
}

async fn submit(State(service): State<Arc<Service>>, body: Body) -> ApiResult {
    let body = axum::body::to_bytes(body, BODY_LIMIT)
        .await
        .map_err(|_| Error::TooLarge(BODY_LIMIT))?;
    let body: Value = serde_json::from_slice(&body)
        .map_err(|e| Error::InvalidArgument(format!("The request body is not valid JSON: {e}")))?;
    let spec = Spec::from_request(&body)?;
    let id = format!(
        "{:016x}{:04x}",
        rand::random::<u64>(),
        rand::random::<u16>()
    );
    let build = Build::queued(id.clone(), spec, unix_now());
    // Stored first, then queued: a crash in between leaves an unconfirmed build that is queued
    // again at the next start, never a job without a build.
    service.store.unconfirmed(&id).await?;
    service.store.put(&build).await?;
    if let Err(err) = service.broker.publish_job(&Job { id: id.clone() }).await {
        // Not accepted: the caller gets a 503 and no id, so the build must not linger as one.
        service.store.remove(&id).await?;
        service.store.confirmed(&id).await;
        return Err(Error::QueueUnavailable(err.to_string()).into());
    }
    service.store.confirmed(&id).await;
    Ok((StatusCode::ACCEPTED, Json(build.to_json())).into_response())
}

#[derive(Deserialize)]
struct ListQuery {
    status: Option<String>,
    limit: Option<usize>,
}

async fn list(State(service): State<Arc<Service>>, Query(query): Query<ListQuery>) -> ApiResult {
    let mut builds = service.store.list().await?;
    if let Some(status) = query.status.as_deref().filter(|s| !s.is_empty()) {
        builds.retain(|b| b.status.as_str() == status);
    }
    builds.sort_by(|a, b| b.created_at.total_cmp(&a.created_at));
    builds.truncate(query.limit.unwrap_or(100).min(1000));
    let builds: Vec<Value> = builds.iter().map(Build::to_json).collect();
    Ok(Json(json!({"total": builds.len(), "builds": builds})).into_response())
}

async fn inspect(State(service): State<Arc<Service>>, Path(id): Path<String>) -> ApiResult {
    Ok(Json(service.store.get(&id).await?.to_json()).into_response())
}

async fn cancel(State(service): State<Arc<Service>>, Path(id): Path<String>) -> ApiResult {
    let before = service.store.get(&id).await?;
    if before.status.is_final() {
        return Err(Error::Conflict(format!("Build already {}", before.status.as_str())).into());
    }
    let build = service
        .store
        .update(&id, |b| {
            if !b.status.is_final() {
                b.status = Status::Cancelled;
                b.finished_at = Some(unix_now());
            }
        })
        .await?;
    Ok(Json(build.to_json()).into_response())
}

/// `POST /v1/uploads`: a `.tar.gz` of a function's folder (what `hearth deploy <dir>` sends),
/// streamed into storage under a limit; the reply's `path` is an archive source for a build.
async fn upload(State(service): State<Arc<Service>>, body: Body) -> ApiResult {
    use futures_util::StreamExt;
    let name = format!(
        "uploads/{:016x}{:08x}.tar.gz",
        rand::random::<u64>(),
        rand::random::<u32>()
    );
    let object = object_store::path::Path::from(name);
    let limit = service.max_upload;
    // Why the stream stopped, when it was the upload's fault rather than the storage's.
    let refused: Arc<std::sync::Mutex<Option<Error>>> = Arc::default();
    let mut size = 0u64;
    let verdict = refused.clone();
    let chunks = body.into_data_stream().map(move |chunk| {
        let refuse = |err: Error| {
            let message = err.to_string();
            if let Ok(mut slot) = verdict.lock() {
                *slot = Some(err);
            }
            Err(message)
        };
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(e) => {
                return refuse(Error::InvalidArgument(format!(
                    "The upload was cut off: {e}"
                )))
            }
        };
        if size == 0 && chunk.len() >= 2 && chunk[..2] != [0x1f, 0x8b] {
            return refuse(Error::InvalidArgument(
                "The upload must be a .tar.gz archive".into(),
            ));
        }
        size += chunk.len() as u64;
        if size > limit {
            return refuse(Error::TooLarge(limit as usize));
        }
        Ok(chunk)
    });
    let stored = service.storage.put_stream(&object, Box::pin(chunks)).await;
    let refusal = refused.lock().ok().and_then(|mut slot| slot.take());
    let size = match (stored, refusal) {
        (_, Some(err)) => return Err(err.into()),
        (Err(err), None) => {
            return Err(Error::Store(format!("failed to store the upload: {err}")).into())
        }
        (Ok(0), None) => return Err(Error::InvalidArgument("The upload is empty".into()).into()),
        (Ok(size), None) => size,
    };
    let path = service.storage.api_path(&object);
    Ok((
        StatusCode::CREATED,
        Json(json!({"path": path, "size": size})),
    )
        .into_response())
}

async fn list_functions(State(service): State<Arc<Service>>) -> ApiResult {
    let functions = service.store.functions().await?;
    Ok(Json(json!({"total": functions.len(), "functions": functions})).into_response())
}

async fn get_function(State(service): State<Arc<Service>>, Path(name): Path<String>) -> ApiResult {
    match service.store.function(&name).await {
        Ok(function) => Ok(Json(function).into_response()),
        Err(Error::NotFound) => Err(Error::FunctionNotFound(name).into()),
        Err(err) => Err(err.into()),
    }
}

async fn remove_function(
    State(service): State<Arc<Service>>,
    Path(name): Path<String>,
) -> ApiResult {
    match service.store.remove_function(&name).await {
        Ok(function) => Ok(Json(function).into_response()),
        Err(Error::NotFound) => Err(Error::FunctionNotFound(name).into()),
        Err(err) => Err(err.into()),
    }
}

#[derive(Deserialize)]
struct LogsQuery {
    timeout: Option<String>,
}

/// The build's log as it grows, in the executor's line format; ends when the build is final and
/// its log read to the end (within a quarter second), or at `timeout` seconds.
async fn stream_logs(
    State(service): State<Arc<Service>>,
    Path(id): Path<String>,
    Query(query): Query<LogsQuery>,
) -> ApiResult {
    let timeout: u64 = match query.timeout.as_deref() {
        None | Some("") => 600,
        Some(t) => t.parse().map_err(|_| {
            Error::InvalidArgument("Invalid `timeout` param: Value must be a valid integer".into())
        })?,
    };
    service.store.get(&id).await?;
    let path = service.store.log_path(&id)?;
    let deadline = Instant::now() + Duration::from_secs(timeout);
    let state = (service, id, path, 0u64, false);
    let chunks =
        futures_util::stream::unfold(state, move |(service, id, path, offset, done)| async move {
            if done {
                return None;
            }
            loop {
                // Read what is new; the record is checked before reading so the last lines of a
                // finished build are never cut off.
                let finished = service
                    .store
                    .get(&id)
                    .await
                    .map(|b| b.status.is_final())
                    .unwrap_or(true);
                let mut fresh = Vec::new();
                if let Ok(mut file) = tokio::fs::File::open(&path).await {
                    if file.seek(std::io::SeekFrom::Start(offset)).await.is_ok() {
                        let _ = file.read_to_end(&mut fresh).await;
                    }
                }
                // Only whole lines go out.
                let whole = fresh.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
                if whole > 0 {
                    fresh.truncate(whole);
                    let next = offset + whole as u64;
                    return Some((
                        Ok::<_, std::io::Error>(Bytes::from(fresh)),
                        (service, id, path, next, false),
                    ));
                }
                if finished || Instant::now() >= deadline {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    Ok((
        [(CONTENT_TYPE, "text/event-stream")],
        Body::from_stream(chunks),
    )
        .into_response())
}

/// Queues again every build that was stored but never confirmed by the broker (a crash between
/// the two), until all are queued.
pub async fn requeue_unpublished(service: Arc<Service>) {
    let mut delay = Duration::from_millis(200);
    loop {
        let mut left = 0;
        for id in service.store.unconfirmed_ids().await {
            match service.store.get(&id).await {
                Ok(build) if build.status == Status::Queued => {}
                Ok(_) | Err(Error::NotFound) => {
                    service.store.confirmed(&id).await;
                    continue;
                }
                Err(_) => {
                    left += 1;
                    continue;
                }
            }
            match service.broker.publish_job(&Job { id: id.clone() }).await {
                Ok(()) => {
                    service.store.confirmed(&id).await;
                    tracing::info!(build = %id, "queued a build that was never confirmed");
                }
                Err(_) => left += 1,
            }
        }
        if left == 0 {
            return;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}
