//! The forwarding half: body types, hop-by-hop header stripping, client bodies under a size
//! limit and an idle timeout, and one call to one executor under the upstream timeout (through
//! the shared [`Client`]).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName};
use http::{Request, Response};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::Sleep;

use crate::client::{Client, ClientError};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::upstream::Upstream;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Every body the balancer sends or answers with.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

pub fn full(bytes: Bytes) -> ProxyBody {
    Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Headers that describe one hop, never forwarded (RFC 9110, 7.6.1); both paths strip them.
pub const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Removes hop-by-hop headers, including those the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in &named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// A client body that fails when the client sends nothing for `idle`.
pub struct IdleBody {
    inner: Incoming,
    idle: Duration,
    sleep: Pin<Box<Sleep>>,
}

impl IdleBody {
    pub fn new(inner: Incoming, idle: Duration) -> Self {
        Self {
            inner,
            idle,
            sleep: Box::pin(tokio::time::sleep(idle)),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the client sent nothing for {0:?}")]
pub struct IdleTimeout(Duration);

#[derive(Debug, thiserror::Error)]
#[error("the request body is larger than {0} bytes")]
pub struct TooLarge(u64);

impl Body for IdleBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                let deadline = tokio::time::Instant::now() + this.idle;
                this.sleep.as_mut().reset(deadline);
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => match this.sleep.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(IdleTimeout(this.idle).into()))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A streamed client body under the size limit.
pub fn limited(body: Incoming, idle: Duration, limit: u64) -> ProxyBody {
    let limit_usize = usize::try_from(limit).unwrap_or(usize::MAX);
    http_body_util::Limited::new(IdleBody::new(body, idle), limit_usize)
        .map_err(move |err| -> BoxError {
            if err.is::<http_body_util::LengthLimitError>() {
                Box::new(TooLarge(limit))
            } else {
                err
            }
        })
        .boxed_unsync()
}

/// Reads a whole client body under the limit and the idle timeout.
pub async fn read_all(body: Incoming, idle: Duration, limit: u64) -> Result<Bytes, Error> {
    match limited(body, idle, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) if err.is::<TooLarge>() => Err(Error::TooLarge(limit)),
        Err(err) => Err(Error::ClientBody(err.to_string())),
    }
}

/// Why one call to one executor failed.
#[derive(Debug)]
pub enum SendError {
    /// Nothing was sent: safe to try another executor.
    Connect(String),
    /// Something may have reached the executor: never retried.
    Failed(Error),
}

/// The client's error as the API names it: a body over the limit or idle is the client's fault.
fn classify(executor: &str, err: ClientError) -> SendError {
    if err.is_connect() {
        return SendError::Connect(source_chain(&err));
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&err);
    while let Some(e) = source {
        if let Some(TooLarge(limit)) = e.downcast_ref::<TooLarge>() {
            return SendError::Failed(Error::TooLarge(*limit));
        }
        if let Some(idle) = e.downcast_ref::<IdleTimeout>() {
            return SendError::Failed(Error::ClientBody(idle.to_string()));
        }
        source = e.source();
    }
    SendError::Failed(Error::Upstream {
        executor: executor.to_string(),
        reason: source_chain(&err),
    })
}

fn source_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

/// One call to one executor: the client's method, path and headers (hop-by-hop removed), the
/// response streamed back.
pub async fn send(
    client: &std::sync::Arc<Client>,
    metrics: &Metrics,
    upstream: &std::sync::Arc<Upstream>,
    parts: &http::request::Parts,
    body: ProxyBody,
    timeout: Duration,
) -> Result<Response<ProxyBody>, SendError> {
    let mut request = Request::new(body);
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = match parts.uri.path_and_query() {
        Some(path) => http::Uri::from(path.clone()),
        None => http::Uri::from_static("/"),
    };
    let mut headers = parts.headers.clone();
    strip_hop_by_hop(&mut headers);
    headers.remove(header::HOST);
    *request.headers_mut() = headers;
    let _in_flight = upstream.start();
    let started = Instant::now();
    let result = tokio::time::timeout(timeout, client.send(&upstream.authority, request)).await;
    metrics.latency(started.elapsed());
    let response = match result {
        Err(_) => {
            metrics.request(&upstream.url, "timeout");
            return Err(SendError::Failed(Error::Timeout {
                executor: upstream.url.clone(),
                secs: timeout.as_secs_f64(),
            }));
        }
        Ok(Err(err)) => {
            let err = classify(&upstream.url, err);
            let outcome = match &err {
                SendError::Connect(_) => "connect_error",
                SendError::Failed(Error::Upstream { .. }) => "upstream_error",
                SendError::Failed(_) => "client_error",
            };
            metrics.request(&upstream.url, outcome);
            return Err(err);
        }
        Ok(Ok(response)) => response,
    };
    let outcome = match response.status().as_u16() {
        200..=399 => "2xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    metrics.request(&upstream.url, outcome);
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Ok(Response::from_parts(parts, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_hop_by_hop() {
        let mut h = HeaderMap::new();
        h.insert("connection", "close, x-private".parse().unwrap());
        h.insert("x-private", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        h.insert("authorization", "Bearer k".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("authorization"));
    }
}
