//! The HTTP side: Open Runtimes v5 request handling (runtime-protocol.md §2) and the legacy v2
//! JSON protocol (§3), on hyper. Every request runs the guest in a fresh instance on a blocking
//! thread; a semaphore of the pool's size keeps the number of live instances within the pool.

use std::convert::Infallible;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use rand::Rng;
use serde_json::{json, Map, Value};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::sync::Semaphore;

use crate::abi::{self, GuestRequest, GuestResponse};
use crate::config::Args;
use crate::engine::{self, Engine, EngineBuilder, Env, Guest, Invocation, Outcome, Status};
use crate::pool;
use crate::wasi::Stream;

/// Largest request body (runtime-protocol.md §2.5).
pub const MAX_BODY: usize = 20 << 20;
const NATIVE_NOTICE: &str =
    "Native logs detected. Use context.log() or context.error() for better experience.";
const UNAUTHORIZED: &str = r#"Unauthorized. Provide correct "x-open-runtimes-secret" header."#;
const BAD_TIMEOUT: &str = r#"Header "x-open-runtimes-timeout" must be an integer greater than 0."#;
/// The pool protocol's one route (pool mode only).
pub const SPECIALISE_PATH: &str = "/__hearth/specialise";
/// Largest specialisation body: a base64 code archive.
pub const MAX_SPECIALISE_BODY: usize = 1 << 30;
const NOT_SPECIALISED: &str = "Runtime is not specialised yet.";
const BAD_POOL_SECRET: &str = r#"Unauthorized. Provide correct "x-hearth-pool-secret" header."#;
const ALREADY_SPECIALISED: &str = "Runtime is already specialised (or being specialised).";

/// Everything the server needs, read once by the binary (the library never reads the
/// environment).
#[derive(Debug, Clone)]
pub struct Config {
    /// `OPEN_RUNTIMES_SECRET`; empty accepts any request.
    pub secret: String,
    /// `OPEN_RUNTIMES_ENV=development`: the log id defaults to `dev`.
    pub development: bool,
    /// `OPEN_RUNTIMES_HEADERS`, lower-cased names, stringified values.
    pub enforced_headers: Vec<(String, String)>,
    /// The module file, relative to `function_dir`.
    pub entrypoint: String,
    pub function_dir: PathBuf,
    pub logs_dir: PathBuf,
    pub timings_file: PathBuf,
    /// `INTERNAL_RUNTIME_KEY`: non-empty switches to the v2 protocol.
    pub v2_key: String,
    /// Variables every guest sees (the server's environment), before the request's own.
    pub guest_env: Arc<[(String, String)]>,
    /// Memory limit of one instance in bytes (`OPEN_RUNTIMES_MEMORY` MB).
    pub memory_limit: usize,
    /// Live instances at most (pool slots).
    pub max_instances: u32,
}

impl Config {
    /// Defaults of the image (paths of runtime-protocol.md §1), 512 MiB, 256 instances.
    pub fn new(entrypoint: &str) -> Self {
        Self {
            secret: String::new(),
            development: false,
            enforced_headers: Vec::new(),
            entrypoint: entrypoint.to_string(),
            function_dir: PathBuf::from("/usr/local/server/src/function"),
            logs_dir: PathBuf::from("/mnt/logs"),
            timings_file: PathBuf::from("/mnt/telemetry/timings.txt"),
            v2_key: String::new(),
            guest_env: Arc::from(Vec::new()),
            memory_limit: 512 << 20,
            max_instances: 256,
        }
    }
}

/// Parses `OPEN_RUNTIMES_HEADERS` (a JSON object; anything else enforces nothing).
pub fn parse_enforced_headers(json: &str) -> Vec<(String, String)> {
    match serde_json::from_str::<Value>(json) {
        Ok(Value::Object(map)) => map
            .into_iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), stringify(v)))
            .collect(),
        _ => Vec::new(),
    }
}

fn stringify(value: Value) -> String {
    match value {
        Value::String(s) => s,
        other => other.to_string(),
    }
}

/// What every connection shares: the function once it is known, and in pool mode what the
/// specialisation needs.
pub struct Service {
    /// Set at start (fresh mode) or by the one specialisation (pool mode); every request reads
    /// it once, an atomic load.
    function: OnceLock<Function>,
    /// `Some` in pool mode.
    pool: Option<Pool>,
}

/// The loaded function plus the settings it was loaded with.
struct Function {
    config: Config,
    /// The guest, or why it could not be loaded (answered as 503 on every request).
    guest: Result<Guest, String>,
    permits: Semaphore,
    /// Moving average of recent guest run times (µs): short guests run inline on the async
    /// worker, which saves the hop to a blocking thread; long ones go to the blocking pool.
    recent_run_micros: std::sync::atomic::AtomicU64,
}

/// A pool member waiting for its function (`runtimes/pool-protocol.md`).
struct Pool {
    /// `OPEN_RUNTIMES_POOL_SECRET`, already gone from the process environment.
    secret: String,
    /// Taken by the first authenticated specialisation, successful or not: it runs once.
    claimed: AtomicBool,
    /// Built at start so that a specialisation only loads the module.
    engine: Engine,
    /// The settings of the start; its `guest_env` is the environment the function's goes on.
    start: Config,
}

/// Guests that recently ran faster than this run inline; a slow run moves the average up at
/// once, so at most one long run lands on an async worker before the guest goes to the pool.
const INLINE_BELOW_MICROS: u64 = 500;

impl Service {
    /// Builds the engine and loads the entrypoint once (blocking: compiles when no precompiled
    /// artifact is usable). A load failure is kept and reported per request; only an engine
    /// that cannot be built is an error here.
    pub fn load(config: Config) -> Result<Arc<Self>, engine::Error> {
        let started = Instant::now();
        let engine = EngineBuilder::new()
            .memory_limit(config.memory_limit)
            .max_instances(config.max_instances)
            .build()?;
        let function = Function::load(config, &engine, started);
        Ok(Arc::new(Self {
            function: OnceLock::from(function),
            pool: None,
        }))
    }

    /// A pool member (blocking: builds the engine): no function until `POST
    /// /__hearth/specialise` with `secret` hands it one. `env` is the server's environment
    /// without the secret (the binary: the process environment); the settings of the start
    /// (paths, instances) are read from it as [`Args::from_env`] does, and the function's
    /// environment is laid on top of it.
    pub fn pool(env: Vec<(String, String)>, secret: String) -> Result<Arc<Self>, Error> {
        let start = Args::from_env(&env)
            .map_err(|e| Error::Settings(e.to_string()))?
            .into_config(env);
        let engine = EngineBuilder::new()
            .memory_limit(start.memory_limit)
            .max_instances(start.max_instances)
            .build()?;
        let telemetry = start.timings_file.parent().unwrap_or(&start.function_dir);
        pool::warm_up(&[&start.function_dir, telemetry]);
        Ok(Arc::new(Self {
            function: OnceLock::new(),
            pool: Some(Pool {
                secret,
                claimed: AtomicBool::new(false),
                engine,
                start,
            }),
        }))
    }
}

/// Why a pool member could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Engine(#[from] engine::Error),
    #[error("invalid settings: {0}")]
    Settings(String),
}

impl Function {
    /// Loads `config`'s entrypoint on `engine` and appends `load=` to the timings (`started`:
    /// when loading began).
    fn load(config: Config, engine: &Engine, started: Instant) -> Function {
        let path = config.function_dir.join(&config.entrypoint);
        let guest = if config.entrypoint.is_empty() {
            Err(engine::Error::Missing(String::new()).to_string())
        } else {
            engine.load(&path).map_err(|e| e.to_string())
        };
        if let Err(reason) = &guest {
            tracing::warn!(entrypoint = %config.entrypoint, reason = %reason, "function not loaded");
        }
        write_timing(&config.timings_file, "load", started.elapsed(), true);
        let permits = Semaphore::new(config.max_instances.max(1) as usize);
        Function {
            config,
            guest,
            permits,
            // A new guest starts on the blocking pool until a few fast runs prove it short.
            recent_run_micros: std::sync::atomic::AtomicU64::new(4 * INLINE_BELOW_MICROS),
        }
    }
}

/// Writes `name=<seconds>` to the timings file (appends, or replaces it as start.sh does with
/// `extract=`). Telemetry is best effort: a read-only /mnt/telemetry must not stop the server.
fn write_timing(file: &std::path::Path, name: &str, took: Duration, append: bool) {
    let line = format!("{name}={:.6}\n", took.as_secs_f64());
    if let Ok(mut file) = std::fs::OpenOptions::new()
        .write(true)
        .append(append)
        .truncate(!append)
        .create(true)
        .open(file)
    {
        let _ = std::io::Write::write_all(&mut file, line.as_bytes());
    }
}

/// Serves HTTP/1 on `listener`, and on `unix` when given (the Hearth extension of
/// `runtimes/socket.md`), until `shutdown` completes, then lets in-flight requests finish (at
/// most 30 s).
pub async fn serve(
    service: Arc<Service>,
    listener: TcpListener,
    unix: Option<UnixListener>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    serve_connection(&service, &graceful, stream);
                }
                Err(err) => tracing::warn!(error = %err, "failed to accept a connection"),
            },
            accepted = accept_unix(unix.as_ref()) => match accepted {
                Ok(stream) => serve_connection(&service, &graceful, stream),
                Err(err) => tracing::warn!(error = %err, "failed to accept a connection on the Unix socket"),
            },
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    drop(unix);
    let _ = tokio::time::timeout(Duration::from_secs(30), graceful.shutdown()).await;
    Ok(())
}

/// The next connection on the Unix socket; never, without one.
async fn accept_unix(unix: Option<&UnixListener>) -> std::io::Result<UnixStream> {
    match unix {
        Some(listener) => listener.accept().await.map(|(stream, _)| stream),
        None => std::future::pending().await,
    }
}

fn serve_connection<S>(service: &Arc<Service>, graceful: &GracefulShutdown, stream: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service.clone();
    let handler = service_fn(move |req| {
        let service = service.clone();
        async move { Ok::<_, Infallible>(handle(&service, req).await) }
    });
    let conn =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), handler);
    let conn = graceful.watch(conn);
    tokio::spawn(async move {
        if let Err(err) = conn.await {
            tracing::debug!(error = %err, "connection ended with an error");
        }
    });
}

/// Binds the Unix socket at `path` (runtimes/socket.md), replacing one an earlier run of this
/// container left. `None` (with a warning) when it cannot: the TCP port still serves, and the
/// executor falls back to it.
pub fn bind_unix_socket(path: &std::path::Path) -> Option<UnixListener> {
    let _ = std::fs::remove_file(path);
    match UnixListener::bind(path) {
        Ok(listener) => Some(listener),
        Err(err) => {
            tracing::warn!(path = %path.display(), error = %err, "failed to listen on the Unix socket");
            None
        }
    }
}

type Reply = Response<Full<Bytes>>;

fn reply(status: StatusCode, content_type: Option<&str>, body: impl Into<Bytes>) -> Reply {
    let mut res = Response::new(Full::new(body.into()));
    *res.status_mut() = status;
    if let Some(ct) = content_type {
        if let Ok(value) = HeaderValue::from_str(ct) {
            res.headers_mut().insert(CONTENT_TYPE, value);
        }
    }
    res
}

fn header<'a>(req: &'a Request<Incoming>, name: &str) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

async fn handle(service: &Service, req: Request<Incoming>) -> Reply {
    let path = req.uri().path();
    if path == "/__opr/health" {
        return reply(StatusCode::OK, Some("text/plain; charset=utf-8"), "OK");
    }
    if let Some(pool) = &service.pool {
        if path == SPECIALISE_PATH {
            return specialise(service, pool, req).await;
        }
    }
    let Some(function) = service.function.get() else {
        return json_message(StatusCode::SERVICE_UNAVAILABLE, NOT_SPECIALISED);
    };
    if path == "/__opr/timings" {
        let timings = tokio::fs::read(&function.config.timings_file)
            .await
            .unwrap_or_default();
        return reply(StatusCode::OK, Some("text/plain; charset=utf-8"), timings);
    }
    if !function.config.v2_key.is_empty() {
        return handle_v2(function, req).await;
    }
    handle_v5(function, req).await
}

fn json_message(status: StatusCode, message: &str) -> Reply {
    reply(
        status,
        Some("application/json"),
        json!({ "message": message }).to_string(),
    )
}

/// `POST /__hearth/specialise` (pool-protocol.md): authenticate, claim the one
/// specialisation, then unpack and load on a blocking thread.
async fn specialise(service: &Service, pool: &Pool, req: Request<Incoming>) -> Reply {
    let given = header(&req, "x-hearth-pool-secret");
    if !pool::secret_matches(&pool.secret, given) {
        return json_message(StatusCode::UNAUTHORIZED, BAD_POOL_SECRET);
    }
    if req.method() != Method::POST {
        return json_message(StatusCode::METHOD_NOT_ALLOWED, "Use POST.");
    }
    if pool.claimed.swap(true, Ordering::AcqRel) {
        return json_message(StatusCode::CONFLICT, ALREADY_SPECIALISED);
    }
    let started = Instant::now();
    let body = match Limited::new(req.into_body(), MAX_SPECIALISE_BODY)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(err) => {
            return json_message(
                StatusCode::BAD_REQUEST,
                &format!("Specialisation body could not be read: {err}"),
            )
        }
    };
    let engine = pool.engine.clone();
    let start = pool.start.clone();
    let loaded = tokio::task::spawn_blocking(move || specialised(&engine, start, &body, started));
    let function = match loaded.await {
        Ok(Ok(function)) => function,
        Ok(Err(SpecialiseError::Invalid(message))) => {
            return json_message(StatusCode::BAD_REQUEST, &message)
        }
        Ok(Err(SpecialiseError::Engine(err))) => {
            tracing::error!(error = %err, "specialisation failed");
            return json_message(StatusCode::INTERNAL_SERVER_ERROR, &err.to_string());
        }
        Err(err) => {
            tracing::error!(error = %err, "the specialisation's thread failed");
            return json_message(StatusCode::INTERNAL_SERVER_ERROR, "Specialisation failed.");
        }
    };
    // Cannot be set already: only the request holding the claim gets here.
    let _ = service.function.set(function);
    tracing::debug!(micros = started.elapsed().as_micros() as u64, "specialised");
    reply(
        StatusCode::OK,
        Some("application/json"),
        r#"{"specialised":true}"#,
    )
}

enum SpecialiseError {
    /// The request's fault (400).
    Invalid(String),
    Engine(engine::Error),
}

/// The steps of a fresh start, in process (blocking): unpack into the function directory, lay
/// the body's env and then the archive's `.open-runtimes` on the start environment, read the
/// settings from that environment as `main` does, and load the entrypoint.
fn specialised(
    engine: &Engine,
    start: Config,
    body: &[u8],
    started: Instant,
) -> Result<Function, SpecialiseError> {
    let invalid = |e: pool::Error| SpecialiseError::Invalid(e.to_string());
    let request = pool::parse(body).map_err(invalid)?;
    pool::extract(&request.code, &start.function_dir).map_err(invalid)?;
    let env = abi::merge_env(&[&start.guest_env, &request.env]);
    let settings = pool::settings(&start.function_dir, &env).map_err(invalid)?;
    let env = abi::merge_env(&[&env, &settings]);
    let args = Args::from_env(&env)
        .map_err(|e| SpecialiseError::Invalid(format!("Invalid settings: {e}")))?;
    let config = args.into_config(env);
    write_timing(&config.timings_file, "extract", started.elapsed(), false);
    let loading = Instant::now();
    let engine = if config.max_instances == engine.max_instances() {
        engine.with_memory_limit(config.memory_limit)
    } else {
        EngineBuilder::new()
            .memory_limit(config.memory_limit)
            .max_instances(config.max_instances)
            .build()
            .map_err(SpecialiseError::Engine)?
    };
    Ok(Function::load(config, &engine, loading))
}

/// The log files of one request (absent when logging is disabled).
struct Logs {
    id: String,
    enabled: bool,
    logs: Vec<String>,
    errors: Vec<String>,
}

impl Logs {
    fn add_output(&mut self, outcome: &Outcome) {
        let mut noticed = false;
        for line in &outcome.output.lines {
            match line.stream {
                Stream::Native => {
                    if !noticed {
                        self.logs.push(NATIVE_NOTICE.to_string());
                        noticed = true;
                    }
                    self.logs.push(abi::cut_log_line(&line.text));
                }
                Stream::Log => self.logs.push(abi::cut_log_line(&line.text)),
                Stream::Error => self.errors.push(abi::cut_log_line(&line.text)),
            }
        }
    }

    /// Appends the non-empty files. Blocking: called on the request's blocking thread.
    fn write(&self, dir: &std::path::Path) {
        use std::io::Write;
        if !self.enabled {
            return;
        }
        for (suffix, lines) in [("logs", &self.logs), ("errors", &self.errors)] {
            // Nothing logged, no I/O (as the other images): the executor reads absent as empty.
            if lines.is_empty() {
                continue;
            }
            let path = dir.join(format!("{}_{suffix}.log", self.id));
            let mut text = lines.join("\n");
            text.push('\n');
            let written = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .and_then(|mut file| file.write_all(text.as_bytes()));
            if let Err(err) = written {
                tracing::warn!(path = %path.display(), error = %err, "failed to write a log file");
            }
        }
    }
}

fn random_id() -> String {
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut rng = rand::rng();
    (0..20)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

async fn handle_v5(function: &Function, req: Request<Incoming>) -> Reply {
    let config = &function.config;
    let enabled = header(&req, "x-open-runtimes-logging")
        .map(|v| !v.eq_ignore_ascii_case("disabled"))
        .unwrap_or(true);
    let id = match header(&req, "x-open-runtimes-log-id") {
        _ if !enabled => String::new(),
        Some(id) if !id.is_empty() => id.to_string(),
        _ if config.development => "dev".to_string(),
        _ => random_id(),
    };
    let timeout = match header(&req, "x-open-runtimes-timeout") {
        None => None,
        Some(raw) => match raw.trim().parse::<u64>() {
            Ok(secs) if secs > 0 => Some(Duration::from_secs(secs)),
            _ => {
                return reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    Some("text/plain"),
                    BAD_TIMEOUT,
                )
            }
        },
    };
    if !config.secret.is_empty()
        && header(&req, "x-open-runtimes-secret") != Some(config.secret.as_str())
    {
        return reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            Some("text/plain"),
            UNAUTHORIZED,
        );
    }
    let mut logs = Logs {
        id,
        enabled,
        logs: Vec::new(),
        errors: Vec::new(),
    };

    let request = guest_request(&req, &config.enforced_headers);
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(body) => body.to_bytes(),
        Err(err) => {
            let status = if err.is::<http_body_util::LengthLimitError>() {
                StatusCode::PAYLOAD_TOO_LARGE
            } else {
                StatusCode::INTERNAL_SERVER_ERROR
            };
            let mut res = reply(
                status,
                Some("text/plain"),
                "Request body could not be read.",
            );
            // The rest of the body is never read: the client must not reuse this connection.
            res.headers_mut()
                .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
            return res;
        }
    };

    let guest = match &function.guest {
        Ok(guest) => guest.clone(),
        Err(reason) => {
            logs.errors.push(reason.clone());
            let dir = config.logs_dir.clone();
            let id = logs.id.clone();
            let _ = tokio::task::spawn_blocking(move || logs.write(&dir)).await;
            return with_log_id(reply(StatusCode::SERVICE_UNAVAILABLE, None, ""), &id);
        }
    };
    let base = config.guest_env.clone();
    let invocation = Invocation {
        args: Vec::new(),
        env: Env::lazy(move || abi::merge_env(&[&base, &request.env()])),
        stdin: body,
        timeout,
    };
    let Ok(_permit) = function.permits.acquire().await else {
        return reply(StatusCode::SERVICE_UNAVAILABLE, None, "");
    };
    let dir = config.logs_dir.clone();
    let finish = move || {
        let started = Instant::now();
        let outcome = guest.run(invocation);
        let took = started.elapsed().as_micros() as u64;
        logs.add_output(&outcome);
        let result = match failure(&outcome, guest.name()) {
            Some(reason) => Err(reason),
            None => abi::parse_response(&outcome.output.stdout).map_err(|e| e.to_string()),
        };
        let res = match result {
            Ok(response) => to_http(response),
            Err(reason) => {
                logs.errors.push(reason);
                reply(StatusCode::INTERNAL_SERVER_ERROR, None, "")
            }
        };
        logs.write(&dir);
        (with_log_id(res, &logs.id), took)
    };
    let recent = function.recent_run_micros.load(Ordering::Relaxed);
    let (res, took) = if recent < INLINE_BELOW_MICROS {
        finish()
    } else {
        // The run, the response and the log files in one hop to a blocking thread.
        match tokio::task::spawn_blocking(finish).await {
            Ok(done) => done,
            Err(err) => {
                tracing::error!(error = %err, "the guest's thread failed");
                return reply(StatusCode::INTERNAL_SERVER_ERROR, None, "");
            }
        }
    };
    // Slow runs count fully at once; fast ones pull the average down gradually.
    let next = if took >= recent {
        took
    } else {
        (recent * 3 + took) / 4
    };
    function.recent_run_micros.store(next, Ordering::Relaxed);
    res
}

/// Runs the guest on a blocking thread once a pool slot is free.
async fn run(function: &Function, guest: Guest, invocation: Invocation) -> Result<Outcome, String> {
    let _permit = function
        .permits
        .acquire()
        .await
        .map_err(|_| "the server is shutting down".to_string())?;
    tokio::task::spawn_blocking(move || guest.run(invocation))
        .await
        .map_err(|err| format!("the guest's thread failed: {err}"))
}

/// The errors-log text of a failed run, `None` when the guest finished normally.
fn failure(outcome: &Outcome, name: &str) -> Option<String> {
    match &outcome.status {
        Status::Success => None,
        Status::Timeout => Some("Execution timed out.".to_string()),
        Status::Exit(code) => Some(format!("Error: {name} exited with code {code}.")),
        Status::Trap(reason) => Some(format!("Error: {name} trapped: {reason}")),
    }
}

fn with_log_id(mut res: Reply, id: &str) -> Reply {
    if let Ok(value) = HeaderValue::from_str(id) {
        res.headers_mut().insert("x-open-runtimes-log-id", value);
    }
    res
}

/// Method, URL parts and filtered headers of an incoming request.
fn guest_request(req: &Request<Incoming>, enforced: &[(String, String)]) -> GuestRequest {
    let mut headers: Vec<(String, String)> = Vec::new();
    for (name, value) in req.headers() {
        let name = name.as_str();
        if name.starts_with("x-open-runtimes-") {
            continue;
        }
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        match headers.iter_mut().find(|(n, _)| n == name) {
            Some((_, existing)) => {
                existing.push_str(", ");
                existing.push_str(&value);
            }
            None => headers.push((name.to_string(), value)),
        }
    }
    for (name, value) in enforced {
        match headers.iter_mut().find(|(n, _)| n == name) {
            Some((_, existing)) => *existing = value.clone(),
            None => headers.push((name.clone(), value.clone())),
        }
    }
    let scheme = header(req, "x-forwarded-proto")
        .unwrap_or("http")
        .to_ascii_lowercase();
    let default_port = if scheme == "https" { 443 } else { 80 };
    let host_header = header(req, "host").unwrap_or("");
    let (host, port) = match host_header.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(']') || host.starts_with('[') => {
            match port.parse::<u16>() {
                Ok(port) => (host.to_string(), port),
                Err(_) => (host_header.to_string(), default_port),
            }
        }
        _ => (host_header.to_string(), default_port),
    };
    GuestRequest {
        method: req.method().as_str().to_string(),
        scheme,
        host,
        port,
        path: req.uri().path().to_string(),
        query_string: req.uri().query().unwrap_or("").to_string(),
        headers,
    }
}

/// A guest response as HTTP (runtime-protocol.md §2.11).
fn to_http(response: GuestResponse) -> Reply {
    let status = StatusCode::from_u16(response.status).unwrap_or(StatusCode::OK);
    let mut res = reply(status, None, response.body);
    let mut content_type = None;
    for (name, value) in response.headers {
        if name.starts_with("x-open-runtimes-") {
            continue;
        }
        if name == "content-type" {
            content_type = Some(value.to_ascii_lowercase());
            continue;
        }
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            res.headers_mut().append(name, value);
        }
    }
    let mut content_type = content_type.unwrap_or_else(|| "text/plain".to_string());
    if !content_type.starts_with("multipart/") && !content_type.contains("charset=") {
        content_type.push_str("; charset=utf-8");
    }
    if let Ok(value) = HeaderValue::from_str(&content_type) {
        res.headers_mut().insert(CONTENT_TYPE, value);
    }
    res
}

// ---- v2 -----------------------------------------------------------------------------------

fn v2_reply(status: StatusCode, body: Value) -> Reply {
    reply(status, Some("application/json"), body.to_string())
}

async fn handle_v2(function: &Function, req: Request<Incoming>) -> Reply {
    let config = &function.config;
    if header(&req, "x-internal-challenge") != Some(config.v2_key.as_str()) {
        return v2_reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"stderr": "Unauthorized"}),
        );
    }
    if req.method() != Method::POST {
        return v2_reply(StatusCode::NOT_FOUND, json!({"stderr": "Not found"}));
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => {
            return v2_reply(
                StatusCode::PAYLOAD_TOO_LARGE,
                json!({"stderr": "Request body could not be read."}),
            )
        }
    };
    let input: Map<String, Value> = if body.is_empty() {
        Map::new()
    } else {
        match serde_json::from_slice(&body) {
            Ok(Value::Object(map)) => map,
            _ => {
                return v2_reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    json!({"stderr": "Invalid JSON body."}),
                )
            }
        }
    };
    let object = |key: &str| match input.get(key) {
        Some(Value::Object(map)) => map
            .iter()
            .map(|(k, v)| (k.clone(), stringify(v.clone())))
            .collect(),
        _ => Vec::new(),
    };
    let mut variables: Vec<(String, String)> = object("variables");
    if variables.is_empty() {
        variables = object("env");
    }
    let headers: Vec<(String, String)> = object("headers")
        .into_iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .collect();
    let payload = match input.get("payload") {
        None | Some(Value::Null) => String::new(),
        Some(value) => stringify(value.clone()),
    };
    let guest = match &function.guest {
        Ok(guest) => guest.clone(),
        Err(reason) => {
            return v2_reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"stdout": "", "stderr": reason}),
            )
        }
    };
    let request = GuestRequest {
        method: "POST".into(),
        scheme: "http".into(),
        host: "localhost".into(),
        port: 80,
        path: "/".into(),
        query_string: String::new(),
        headers,
    };
    let request_env = request.env();
    let invocation = Invocation {
        args: Vec::new(),
        env: Env::new(abi::merge_env(&[
            &config.guest_env,
            &variables,
            &request_env,
        ])),
        stdin: Bytes::from(payload),
        timeout: None,
    };
    let outcome = match run(function, guest.clone(), invocation).await {
        Ok(outcome) => outcome,
        Err(reason) => {
            return v2_reply(StatusCode::INTERNAL_SERVER_ERROR, json!({"stderr": reason}))
        }
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    for line in &outcome.output.lines {
        let target = match line.stream {
            Stream::Native | Stream::Log => &mut stdout,
            Stream::Error => &mut stderr,
        };
        target.push_str(&line.text);
        target.push('\n');
    }
    let parsed = match failure(&outcome, guest.name()) {
        Some(reason) => Err(reason),
        None => abi::parse_response(&outcome.output.stdout).map_err(|e| e.to_string()),
    };
    match parsed {
        Ok(response) => {
            let is_json = response.headers.iter().any(|(n, v)| {
                n == "content-type" && v.to_ascii_lowercase().starts_with("application/json")
            });
            let text = String::from_utf8_lossy(&response.body).into_owned();
            let value = if is_json {
                serde_json::from_str(&text).unwrap_or(Value::String(text))
            } else {
                Value::String(text)
            };
            let status = StatusCode::from_u16(response.status).unwrap_or(StatusCode::OK);
            v2_reply(
                status,
                json!({"response": value, "stdout": stdout, "stderr": stderr}),
            )
        }
        Err(reason) => {
            stderr.push_str(&reason);
            stderr.push('\n');
            v2_reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"stdout": stdout, "stderr": stderr}),
            )
        }
    }
}
