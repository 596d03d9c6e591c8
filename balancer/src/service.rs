//! The [`Balancer`]: what each route does (answer, merge, broadcast, or forward to the executor
//! holding the runtime), the runtime location cache, and the discovery and probe loops.

use std::sync::{Arc, RwLock};

use bytes::Bytes;
use dashmap::DashMap;
use futures_util::future::{join_all, select_ok, FutureExt};
use http::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, TRANSFER_ENCODING};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::client::Client;
use crate::config::Config;
use crate::error::Error;
use crate::metrics::{Metrics, Placement};
use crate::proxy::{self, full, ProxyBody, SendError};
use crate::routing::{self, Action, Route};
use crate::upstream::{Pool, Target, Upstream};

/// The header Appwrite sends to say how a call is spread over executors.
pub const ADDRESSING: &str = "x-opr-addressing-method";

/// A request body: held (can be sent again) or streamed (sent once).
enum Payload {
    Held(Bytes),
    Streamed(Option<ProxyBody>),
}

impl Payload {
    fn take(&mut self) -> ProxyBody {
        match self {
            Self::Held(bytes) => full(bytes.clone()),
            Self::Streamed(body) => body.take().unwrap_or_else(|| full(Bytes::new())),
        }
    }

    fn replayable(&self) -> bool {
        matches!(self, Self::Held(_))
    }
}

pub struct Balancer {
    pub config: Config,
    client: Arc<Client>,
    pub pool: Pool,
    targets: RwLock<Vec<Target>>,
    /// runtimeId → the executor last seen holding it.
    locations: DashMap<String, Arc<Upstream>>,
    pub metrics: Metrics,
    resolve_now: tokio::sync::Notify,
    /// The build service, when configured.
    builds: Option<Arc<Upstream>>,
}

impl Balancer {
    pub fn new(config: Config) -> Result<Arc<Self>, Error> {
        let targets = parse_targets(&config.executors)?;
        let builds = match config.builds.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(entry) => {
                let url = if entry.starts_with("http://") {
                    entry.trim_end_matches('/').to_string()
                } else {
                    format!("http://{entry}")
                };
                Some(Arc::new(Upstream::new(url, 1.0)))
            }
        };
        Ok(Arc::new(Self {
            builds,
            client: Client::new(config.connect_timeout()),
            pool: Pool::default(),
            targets: RwLock::new(targets),
            locations: DashMap::new(),
            metrics: Metrics::default(),
            resolve_now: tokio::sync::Notify::new(),
            config,
        }))
    }

    /// Replaces the configured executors (tests, or a reload) and re-resolves them now.
    pub async fn set_executors(&self, entries: &[String]) -> Result<(), Error> {
        let targets = parse_targets(entries)?;
        match self.targets.write() {
            Ok(mut t) => *t = targets,
            Err(poisoned) => *poisoned.into_inner() = targets,
        }
        self.refresh().await;
        Ok(())
    }

    /// Resolves every target and updates the pool. A failed lookup keeps the current set.
    pub async fn refresh(&self) {
        let targets = match self.targets.read() {
            Ok(t) => t.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        let mut wanted = Vec::new();
        for target in &targets {
            match target.resolve().await {
                Ok(urls) => wanted.extend(urls.into_iter().map(|u| (u, target.weight))),
                Err(err) => {
                    tracing::warn!(host = %target.host, error = %err, "executor lookup failed; keeping the current executors");
                    return;
                }
            }
        }
        let (added, removed) = self.pool.replace(wanted);
        for url in added {
            tracing::info!(executor = %url, "executor discovered");
        }
        for url in removed {
            tracing::info!(executor = %url, "executor gone from discovery");
        }
    }

    pub async fn discovery_loop(self: Arc<Self>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.config.resolve_interval()) => {}
                _ = self.resolve_now.notified() => {}
            }
            self.refresh().await;
        }
    }

    pub async fn probe_loop(self: Arc<Self>) {
        loop {
            let all = self.pool.all();
            join_all(all.iter().map(|u| self.probe(u))).await;
            tokio::time::sleep(self.config.probe_interval()).await;
        }
    }

    async fn probe(&self, upstream: &Arc<Upstream>) {
        let request = Request::get(format!("{}/v1/health", upstream.url)).body(full(Bytes::new()));
        let Ok(request) = request else { return };
        let answer =
            tokio::time::timeout(self.config.probe_timeout(), self.client.request(request));
        let passed = match answer.await {
            Ok(Ok(response)) => response.status() == StatusCode::OK,
            _ => false,
        };
        if passed {
            if upstream.probe_passed() {
                self.metrics.readmission();
                tracing::info!(executor = %upstream.url, "executor readmitted");
            }
        } else if upstream.probe_failed(self.config.unhealthy_threshold) {
            self.metrics.ejection();
            tracing::warn!(executor = %upstream.url, "executor ejected: health probes failing");
        }
    }

    /// Passive ejection: a connection to it failed.
    pub(crate) fn eject(&self, upstream: &Upstream, reason: &str) {
        if upstream.eject() {
            self.metrics.ejection();
            tracing::warn!(executor = %upstream.url, error = %reason, "executor ejected: connection failed");
        }
    }

    /// The one entry point: every error becomes its response here.
    pub async fn handle(self: Arc<Self>, request: Request<Incoming>) -> Response<ProxyBody> {
        match self.dispatch(request).await {
            Ok(response) => response,
            Err(err) => err.into_response(),
        }
    }

    async fn dispatch(&self, request: Request<Incoming>) -> Result<Response<ProxyBody>, Error> {
        let route = Route::parse(request.method(), request.uri().path());
        match route {
            Route::NotFound => Err(Error::RouteNotFound),
            Route::Health => {
                self.available()?;
                Ok(text_response(StatusCode::OK, "text/plain", "OK".into()))
            }
            Route::Metrics => {
                self.check_key(request.headers())?;
                let all = self.pool.all();
                let healthy = all.iter().filter(|u| u.is_available()).count();
                let text = self.metrics.render(healthy, all.len());
                Ok(text_response(
                    StatusCode::OK,
                    "text/plain; version=0.0.4",
                    text.into(),
                ))
            }
            Route::List => self.list(request).await,
            Route::Builds => {
                let Some(builds) = self.builds.clone() else {
                    return Err(Error::RouteNotFound);
                };
                let (parts, body) = request.into_parts();
                let mut payload = self.payload(&parts, body).await?;
                let timeout = self.config.upstream_timeout();
                match proxy::send(
                    &self.client,
                    &self.metrics,
                    &builds,
                    &parts,
                    payload.take(),
                    timeout,
                )
                .await
                {
                    Ok(response) => Ok(response),
                    Err(SendError::Connect(reason)) => Err(Error::Connect {
                        executor: format!("(build service) {}", builds.url),
                        reason,
                    }),
                    Err(SendError::Failed(err)) => Err(err),
                }
            }
            Route::Create => {
                let (parts, body) = request.into_parts();
                let bytes =
                    proxy::read_all(body, self.config.body_idle_timeout(), self.config.max_body)
                        .await?;
                let id = runtime_id_in(&parts.headers, &bytes).unwrap_or_default();
                self.forward(&id, None, parts, Payload::Held(bytes)).await
            }
            Route::Runtime { id, action } => {
                let (parts, body) = request.into_parts();
                let payload = self.payload(&parts, body).await?;
                let broadcast = parts
                    .headers
                    .get(ADDRESSING)
                    .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"broadcast"));
                if broadcast {
                    if let Payload::Held(bytes) = payload {
                        return self.broadcast(&id, parts, bytes).await;
                    }
                }
                self.forward(&id, Some(action), parts, payload).await
            }
        }
    }

    fn check_key(&self, headers: &http::HeaderMap) -> Result<(), Error> {
        let given = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        let want = self.config.secret.as_bytes();
        let same = given.len() == want.len()
            && !want.is_empty()
            && given
                .bytes()
                .zip(want)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        same.then_some(()).ok_or(Error::Unauthorized)
    }

    fn available(&self) -> Result<Vec<Arc<Upstream>>, Error> {
        let available = self.pool.available();
        if available.is_empty() {
            let all = self.pool.all();
            let reason = if all.is_empty() {
                "no executor discovered from the configured list".to_string()
            } else {
                let urls: Vec<&str> = all.iter().map(|u| u.url.as_str()).collect();
                format!(
                    "all {} executors are failing health checks ({})",
                    all.len(),
                    urls.join(", ")
                )
            };
            return Err(Error::NoExecutor(reason));
        }
        Ok(available)
    }

    /// Small bodies are held so a failed connect can be retried; large ones stream.
    async fn payload(
        &self,
        parts: &http::request::Parts,
        body: Incoming,
    ) -> Result<Payload, Error> {
        let length = parts
            .headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if length.is_some_and(|n| n > self.config.max_body) {
            return Err(Error::TooLarge(self.config.max_body));
        }
        let idle = self.config.body_idle_timeout();
        match length {
            None if !parts.headers.contains_key(TRANSFER_ENCODING) => {
                Ok(Payload::Held(Bytes::new()))
            }
            Some(n) if n <= self.config.replay_limit => Ok(Payload::Held(
                proxy::read_all(body, idle, self.config.max_body).await?,
            )),
            _ => Ok(Payload::Streamed(Some(proxy::limited(
                body,
                idle,
                self.config.max_body,
            )))),
        }
    }

    /// Where runtime `id` is: the cache, else a lookup across executors, else its home.
    pub(crate) async fn locate(
        &self,
        id: &str,
        skip: &[String],
    ) -> Result<(Arc<Upstream>, Placement), Error> {
        let cached = self.locations.get(id).map(|entry| entry.value().clone());
        if let Some(upstream) = cached {
            if upstream.is_available() && !skip.contains(&upstream.url) {
                return Ok((upstream, Placement::Cached));
            }
        }
        let candidates: Vec<Arc<Upstream>> = self
            .available()?
            .into_iter()
            .filter(|u| !skip.contains(&u.url))
            .collect();
        if candidates.is_empty() {
            return Err(Error::NoExecutor(format!(
                "every healthy executor refused the connection ({})",
                skip.join(", ")
            )));
        }
        if !id.is_empty() {
            if let Some(upstream) = self.lookup(id, &candidates).await {
                self.locations.insert(id.to_string(), upstream.clone());
                return Ok((upstream, Placement::Found));
            }
        }
        let home = routing::home(id, &candidates, self.config.load_factor)
            .ok_or_else(|| Error::NoExecutor("no candidate executor".to_string()))?;
        Ok((home, Placement::Home))
    }

    /// Records that runtime `id` is (or is being started) on `upstream`.
    pub(crate) fn remember(&self, id: &str, upstream: &Arc<Upstream>) {
        if !id.is_empty() {
            self.locations.insert(id.to_string(), upstream.clone());
        }
    }

    /// Forgets where runtime `id` is (its executor failed).
    pub(crate) fn forget(&self, id: &str) {
        self.locations.remove(id);
    }

    /// Asks every candidate whether it holds `id`; the first that does wins.
    async fn lookup(&self, id: &str, candidates: &[Arc<Upstream>]) -> Option<Arc<Upstream>> {
        let asks = candidates.iter().map(|upstream| {
            let upstream = upstream.clone();
            async move {
                let request = Request::get(format!("{}/v1/runtimes/{id}", upstream.url))
                    .header(AUTHORIZATION, format!("Bearer {}", self.config.secret))
                    .body(full(Bytes::new()))
                    .map_err(|_| ())?;
                let answer =
                    tokio::time::timeout(self.config.probe_timeout(), self.client.request(request))
                        .await;
                match answer {
                    Ok(Ok(response)) if response.status() == StatusCode::OK => Ok(upstream),
                    _ => Err(()),
                }
            }
            .boxed()
        });
        select_ok(asks).await.ok().map(|(upstream, _)| upstream)
    }

    /// Sends a runtime's call where it lives; a refused connect moves it to the next executor
    /// while the body can still be sent again.
    async fn forward(
        &self,
        id: &str,
        action: Option<Action>,
        parts: http::request::Parts,
        mut payload: Payload,
    ) -> Result<Response<ProxyBody>, Error> {
        let mut skip: Vec<String> = Vec::new();
        // A 404 from a stale cache entry, the answer if no other executor holds the runtime.
        let mut not_found: Option<Response<ProxyBody>> = None;
        loop {
            let (upstream, placement) = match self.locate(id, &skip).await {
                Ok(found) => found,
                Err(err) => return not_found.ok_or(err),
            };
            let places = matches!(action, None | Some(Action::Execute));
            if places {
                self.metrics.placement(placement);
                // Known at once, so a build's log stream finds it while it runs.
                self.remember(id, &upstream);
            }
            let sent = proxy::send(
                &self.client,
                &self.metrics,
                &upstream,
                &parts,
                payload.take(),
                self.config.upstream_timeout(),
            )
            .await;
            match sent {
                Ok(response) => {
                    let status = response.status();
                    if action == Some(Action::Delete) && status.is_success() {
                        self.locations.remove(id);
                    }
                    if status == StatusCode::NOT_FOUND && !places {
                        self.locations.remove(id);
                        // A stale cache entry: look again among the others.
                        if placement == Placement::Cached && payload.replayable() {
                            skip.push(upstream.url.clone());
                            not_found = Some(response);
                            continue;
                        }
                    }
                    return Ok(response);
                }
                Err(SendError::Connect(reason)) => {
                    self.eject(&upstream, &reason);
                    if places {
                        self.locations.remove(id);
                    }
                    if !payload.replayable() {
                        return Err(Error::Connect {
                            executor: upstream.url.clone(),
                            reason,
                        });
                    }
                    self.metrics.retry();
                    skip.push(upstream.url.clone());
                }
                Err(SendError::Failed(err)) => return Err(err),
            }
        }
    }

    /// `x-opr-addressing-method: broadcast`: the call goes to every executor; the answer is the
    /// first success, else the first answer other than 404, else a 404.
    async fn broadcast(
        &self,
        id: &str,
        parts: http::request::Parts,
        bytes: Bytes,
    ) -> Result<Response<ProxyBody>, Error> {
        let available = self.available()?;
        let sends = available.iter().map(|upstream| {
            proxy::send(
                &self.client,
                &self.metrics,
                upstream,
                &parts,
                full(bytes.clone()),
                self.config.upstream_timeout(),
            )
        });
        let results = join_all(sends).await;
        let mut best: Option<Response<ProxyBody>> = None;
        let mut last_err = None;
        for (upstream, result) in available.iter().zip(results) {
            match result {
                Ok(response) => {
                    let rank = |r: &Response<ProxyBody>| match r.status() {
                        s if s.is_success() => 0,
                        StatusCode::NOT_FOUND => 2,
                        _ => 1,
                    };
                    if best.as_ref().is_none_or(|b| rank(&response) < rank(b)) {
                        best = Some(response);
                    }
                }
                Err(SendError::Connect(reason)) => {
                    self.eject(upstream, &reason);
                    last_err = Some(Error::Connect {
                        executor: upstream.url.clone(),
                        reason,
                    });
                }
                Err(SendError::Failed(err)) => last_err = Some(err),
            }
        }
        if parts.method == Method::DELETE && best.as_ref().is_some_and(|r| r.status().is_success())
        {
            self.locations.remove(id);
        }
        match (best, last_err) {
            (Some(response), _) => Ok(response),
            (None, Some(err)) => Err(err),
            (None, None) => Err(Error::NoExecutor("no executor answered".to_string())),
        }
    }

    /// `GET /v1/runtimes`: every executor's list, merged. An executor's refusal (401) is the
    /// answer; one that cannot be reached is ejected and left out.
    async fn list(&self, request: Request<Incoming>) -> Result<Response<ProxyBody>, Error> {
        let (parts, _body) = request.into_parts();
        let available = self.available()?;
        let sends = available.iter().map(|upstream| async {
            let sent = proxy::send(
                &self.client,
                &self.metrics,
                upstream,
                &parts,
                full(Bytes::new()),
                self.config.upstream_timeout(),
            )
            .await?;
            if !sent.status().is_success() {
                return Ok(Err(sent));
            }
            let body = sent
                .into_body()
                .collect()
                .await
                .map_err(|err| {
                    SendError::Failed(Error::Upstream {
                        executor: upstream.url.clone(),
                        reason: err.to_string(),
                    })
                })?
                .to_bytes();
            let items: Vec<serde_json::Value> = serde_json::from_slice(&body).map_err(|err| {
                SendError::Failed(Error::Upstream {
                    executor: upstream.url.clone(),
                    reason: format!("runtime list is not a JSON array: {err}"),
                })
            })?;
            Ok(Ok(items))
        });
        let results = join_all(sends).await;
        let mut merged = Vec::new();
        let mut answered = false;
        let mut last_err = None;
        for (upstream, result) in available.iter().zip(results) {
            match result {
                Ok(Ok(items)) => {
                    answered = true;
                    merged.extend(items);
                }
                Ok(Err(refusal)) => return Ok(refusal),
                Err(SendError::Connect(reason)) => {
                    self.eject(upstream, &reason);
                    last_err = Some(Error::Connect {
                        executor: upstream.url.clone(),
                        reason,
                    });
                }
                Err(SendError::Failed(err)) => last_err = Some(err),
            }
        }
        if !answered {
            if let Some(err) = last_err {
                return Err(err);
            }
        }
        let body = serde_json::Value::Array(merged).to_string();
        Ok(text_response(
            StatusCode::OK,
            "application/json; charset=utf-8",
            body.into(),
        ))
    }
}

fn parse_targets(entries: &[String]) -> Result<Vec<Target>, Error> {
    entries
        .iter()
        .filter(|e| !e.trim().is_empty())
        .map(|e| Target::parse(e).ok_or_else(|| Error::InvalidExecutor(e.clone())))
        .collect()
}

fn text_response(
    status: StatusCode,
    content_type: &'static str,
    body: Bytes,
) -> Response<ProxyBody> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// The `runtimeId` of a create call: a JSON field or a form part.
fn runtime_id_in(headers: &http::HeaderMap, body: &[u8]) -> Option<String> {
    let content_type = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if content_type.starts_with("multipart/form-data") {
        let text = String::from_utf8_lossy(body);
        let at = text.find("name=\"runtimeId\"")?;
        let rest = &text[at..];
        let start = rest.find("\r\n\r\n")? + 4;
        let end = rest[start..].find("\r\n")?;
        return Some(rest[start..start + end].to_string());
    }
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    value.get("runtimeId")?.as_str().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_runtime_id() {
        let mut headers = http::HeaderMap::new();
        assert_eq!(
            runtime_id_in(&headers, br#"{"runtimeId":"abc","image":"x"}"#).as_deref(),
            Some("abc")
        );
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("multipart/form-data; boundary=XX"),
        );
        let form = b"--XX\r\nContent-Disposition: form-data; name=\"runtimeId\"\r\n\r\nform-id\r\n--XX--\r\n";
        assert_eq!(runtime_id_in(&headers, form).as_deref(), Some("form-id"));
    }
}
