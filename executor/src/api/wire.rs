//! The executor's own HTTP/1.1 path for executions, the hot call: each client connection starts
//! here. An execution (`POST /v1/runtimes/{id}/executions`, or `/execution`, on HTTP/1.1 with a
//! body of known length) has its head parsed once with httparse, its body read whole, and goes
//! straight to [`super::execution`], the same function the axum route calls; the reply is
//! written whole with its length. No router, middleware or second parse of the head.
//!
//! At the first request this path does not take (any other route, a query string or an escaped
//! runtime id, a chunked or oversized body, HTTP/1.0, `Expect`, `Upgrade`, a malformed head) the
//! connection, with what was already read (`hearth_conn::Rewind`), goes to hyper's server and the axum
//! router for good, so every other route and every refusal behaves exactly as there.
//!
//! Both paths keep the same rules: Bearer auth, the same replies and error JSON, the same metrics
//! (errors are counted and redacted by [`super::error::finish`]). An idle keep-alive connection
//! is kept, as hyper keeps it; a head begun must end within [`HEAD_TIMEOUT`] and a body must not
//! stall for longer than [`BODY_IDLE_TIMEOUT`].

use std::cell::RefCell;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::response::{IntoResponse, Response};
use axum::Router;
use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue};
use http_body_util::BodyExt;
use hyper::server::conn::http1;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::{error, ApiError, MAX_REQUEST};
use crate::error::Error;
use crate::runtimes::Executor;

/// Headers a request head may carry on this path (more: the general path).
const MAX_HEADERS: usize = 64;
/// A head larger than this goes to the general path, which refuses it.
const MAX_HEAD: usize = 64 * 1024;
/// Free space a read leaves at least.
const READ_ROOM: usize = 4 * 1024;
/// How long a request head may take once its first byte arrived.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a request body may go without a byte.
pub const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// A reply body up to this size is copied behind its head and sent in one write.
const COPY_BODY: usize = 16 * 1024;

/// An execution this path serves.
#[derive(Debug)]
struct Call {
    head_len: usize,
    body_len: usize,
    runtime_id: String,
    headers: HeaderMap,
    /// The client asked to close the connection after this call.
    close: bool,
}

#[derive(Debug)]
enum Head {
    Execution(Call),
    /// Anything else: the general path serves it and the rest of the connection.
    General,
}

/// Serves one client connection until it closes, or `shutdown` turns true (between calls).
pub async fn serve(
    executor: Arc<Executor>,
    app: Router,
    mut stream: TcpStream,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut buf = BytesMut::with_capacity(READ_ROOM);
    if executor.config.fast_path {
        loop {
            let Some(head) = read_head(&mut stream, &mut buf, &mut shutdown).await else {
                return;
            };
            let Head::Execution(call) = head else { break };
            let total = call.head_len + call.body_len;
            if buf.len() < total {
                buf.reserve(total - buf.len());
            }
            while buf.len() < total {
                match tokio::time::timeout(BODY_IDLE_TIMEOUT, stream.read_buf(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => {}
                    Ok(_) => return,
                    Err(_) => {
                        let err = Error::InvalidArgument(format!(
                            "Request body incomplete: the client sent nothing for {} s.",
                            BODY_IDLE_TIMEOUT.as_secs()
                        ));
                        let response = error::finish(&executor, ApiError(err).into_response());
                        let _ = write_response(&mut stream, response, true).await;
                        return;
                    }
                }
            }
            buf.advance(call.head_len);
            let body = buf.split_to(call.body_len).freeze();
            let response = if super::authorized(&executor, &call.headers) {
                super::execution(&executor, call.runtime_id, &call.headers, body)
                    .await
                    .unwrap_or_else(IntoResponse::into_response)
            } else {
                error::unauthorized().into_response()
            };
            let response = error::finish(&executor, response);
            let close = call.close || *shutdown.borrow();
            if !write_response(&mut stream, response, close).await || close {
                return;
            }
        }
    }
    general(app, stream, buf.freeze(), shutdown).await;
}

/// Reads until a whole head is in `buf`: `None` when the client closed, went quiet mid-head, or
/// the executor is stopping while the connection is idle.
async fn read_head(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<Head> {
    let mut deadline: Option<Instant> = None;
    loop {
        if !buf.is_empty() {
            if let Some(head) = parse(buf) {
                return Some(head);
            }
        }
        if buf.capacity() - buf.len() < READ_ROOM {
            buf.reserve(READ_ROOM);
        }
        let read = if buf.is_empty() {
            // Idle between calls: kept until the client closes or the executor stops.
            tokio::select! {
                biased;
                read = stream.read_buf(buf) => read,
                _ = shutdown.changed() => return None,
            }
        } else {
            let deadline = *deadline.get_or_insert_with(|| Instant::now() + HEAD_TIMEOUT);
            tokio::time::timeout_at(deadline.into(), stream.read_buf(buf))
                .await
                .ok()?
        };
        match read {
            Ok(n) if n > 0 => {}
            _ => return None,
        }
    }
}

/// The rest of the connection on hyper's server and the axum router, starting with `read`.
async fn general(app: Router, stream: TcpStream, read: Bytes, shutdown: watch::Receiver<bool>) {
    let mut http = http1::Builder::new();
    http.keep_alive(true);
    let service = TowerToHyperService::new(app);
    hearth_conn::server::serve_rest(&http, stream, read, service, shutdown).await;
}

/// Parses the head at the start of `buf`: `None` while incomplete (and within [`MAX_HEAD`]).
fn parse(buf: &[u8]) -> Option<Head> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let head_len = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD => return None,
        // Too large, too many headers or malformed: the general path answers it.
        _ => return Some(Head::General),
    };
    Some(execution(head_len, &parsed).map_or(Head::General, Head::Execution))
}

fn execution(head_len: usize, parsed: &httparse::Request<'_, '_>) -> Option<Call> {
    if parsed.version != Some(1) || parsed.method != Some("POST") {
        return None;
    }
    let runtime_id = execution_id(parsed.path?)?;
    let mut body_len: Option<usize> = None;
    let mut close = false;
    let mut headers = HeaderMap::with_capacity(parsed.headers.len());
    for header in parsed.headers.iter() {
        let name = HeaderName::from_bytes(header.name.as_bytes()).ok()?;
        let value = HeaderValue::from_bytes(header.value).ok()?;
        if name == http::header::CONTENT_LENGTH {
            let length: usize = value.to_str().ok()?.trim().parse().ok()?;
            if body_len.is_some_and(|known| known != length) {
                return None;
            }
            body_len = Some(length);
        } else if name == http::header::TRANSFER_ENCODING
            || name == http::header::EXPECT
            || name == http::header::UPGRADE
        {
            return None;
        } else if name == http::header::CONNECTION {
            for token in value.to_str().ok()?.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    close = true;
                } else if !token.eq_ignore_ascii_case("keep-alive") {
                    return None;
                }
            }
        }
        headers.append(name, value);
    }
    let body_len = body_len.unwrap_or(0);
    if body_len > MAX_REQUEST {
        return None;
    }
    Some(Call {
        head_len,
        body_len,
        runtime_id: runtime_id.to_string(),
        headers,
        close,
    })
}

/// The runtime id of `/v1/runtimes/{id}/executions` (or `/execution`); `None` for any other
/// path, a query string, or an id the router would decode first.
fn execution_id(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/v1/runtimes/")?;
    let id = rest
        .strip_suffix("/executions")
        .or_else(|| rest.strip_suffix("/execution"))?;
    let plain = !id.is_empty() && !id.contains(['/', '%', '?', '#']);
    plain.then_some(id)
}

/// Writes `response` whole with its length; returns whether it went out.
async fn write_response(stream: &mut TcpStream, response: Response, close: bool) -> bool {
    let (parts, body) = response.into_parts();
    // Every reply of the API is a whole body in memory: collecting it does not wait.
    let Ok(body) = body.collect().await.map(|collected| collected.to_bytes()) else {
        return false;
    };
    let mut head = Vec::with_capacity(256 + body.len().min(COPY_BODY));
    head.extend_from_slice(b"HTTP/1.1 ");
    head.extend_from_slice(parts.status.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(
        parts
            .status
            .canonical_reason()
            .unwrap_or("Unknown")
            .as_bytes(),
    );
    head.extend_from_slice(b"\r\n");
    let mut close = close;
    for (name, value) in &parts.headers {
        if name == http::header::CONTENT_LENGTH || name == http::header::TRANSFER_ENCODING {
            continue;
        }
        if name == http::header::CONNECTION {
            close |= value.as_bytes().eq_ignore_ascii_case(b"close");
            continue;
        }
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    if close {
        head.extend_from_slice(b"connection: close\r\n");
    }
    head.extend_from_slice(b"content-length: ");
    head.extend_from_slice(body.len().to_string().as_bytes());
    head.extend_from_slice(b"\r\ndate: ");
    http_date(&mut head);
    head.extend_from_slice(b"\r\n\r\n");
    let sent = if body.len() <= COPY_BODY {
        head.extend_from_slice(&body);
        stream.write_all(&head).await
    } else {
        let mut out = Bytes::from(head).chain(body);
        stream.write_all_buf(&mut out).await
    };
    sent.is_ok() && !close
}

/// Appends the current time as an HTTP date, formatted once a second per thread.
fn http_date(out: &mut Vec<u8>) {
    thread_local! {
        static CACHED: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let now = SystemTime::now();
    let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHED.with(|cached| {
        let mut cached = cached.borrow_mut();
        if cached.0 != second {
            *cached = (second, httpdate::fmt_http_date(now));
        }
        out.extend_from_slice(cached.1.as_bytes());
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(raw: &str) -> Option<Call> {
        match parse(raw.as_bytes())? {
            Head::Execution(call) => Some(call),
            Head::General => None,
        }
    }

    #[test]
    fn takes_executions_with_a_known_length() {
        let raw = "POST /v1/runtimes/fn-1/executions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\nContent-Length: 2\r\nAccept: application/json\r\n\r\n{}";
        let call = call(raw).expect("an execution");
        assert_eq!(call.runtime_id, "fn-1");
        assert_eq!(call.body_len, 2);
        assert_eq!(call.head_len, raw.len() - 2);
        assert!(!call.close);
        assert_eq!(call.headers["accept"], "application/json");
        let old = call_str("POST /v1/runtimes/a/execution HTTP/1.1\r\nConnection: close\r\n\r\n");
        assert_eq!(old.runtime_id, "a");
        assert_eq!(old.body_len, 0);
        assert!(old.close);
    }

    fn call_str(raw: &str) -> Call {
        call(raw).expect("an execution")
    }

    #[test]
    fn leaves_everything_else_to_the_general_path() {
        for raw in [
            "GET /v1/runtimes HTTP/1.1\r\n\r\n",
            "POST /v1/runtimes HTTP/1.1\r\nContent-Length: 2\r\n\r\n",
            "GET /v1/runtimes/a/executions HTTP/1.1\r\n\r\n",
            "POST /v1/runtimes/a/executions HTTP/1.0\r\nContent-Length: 2\r\n\r\n",
            "POST /v1/runtimes/a/executions?x=1 HTTP/1.1\r\n\r\n",
            "POST /v1/runtimes/a%20b/executions HTTP/1.1\r\n\r\n",
            "POST /v1/runtimes//executions HTTP/1.1\r\n\r\n",
            "POST /v1/runtimes/a/b/executions HTTP/1.1\r\n\r\n",
            "POST /v1/runtimes/a/executions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST /v1/runtimes/a/executions HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n",
            "POST /v1/runtimes/a/executions HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n",
            "POST /v1/runtimes/a/executions HTTP/1.1\r\nContent-Length: x\r\n\r\n",
            "POST /v1/runtimes/a/executions HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n",
            "POST /v1/runtimes/a/executions HTTP/1.1\r\nContent-Length: 999999999999\r\n\r\n",
            "garbage\r\n\r\n",
        ] {
            assert!(
                matches!(parse(raw.as_bytes()), Some(Head::General)),
                "{raw:?}"
            );
        }
    }

    #[test]
    fn waits_for_the_rest_of_a_head() {
        assert!(parse(b"POST /v1/runtimes/a/executions HTTP/1.1\r\nHost").is_none());
        let long = format!("POST /{} HTTP/1.1\r\n", "a".repeat(MAX_HEAD + 1));
        assert!(matches!(parse(long.as_bytes()), Some(Head::General)));
    }

    #[test]
    fn dates_are_http_dates() {
        let mut out = Vec::new();
        http_date(&mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(httpdate::parse_http_date(&text).is_ok(), "{text}");
    }
}
