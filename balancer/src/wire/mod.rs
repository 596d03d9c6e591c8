//! The balancer's front: each client connection starts on its own HTTP/1.1 path, which forwards
//! executions (the hot call) as bytes: the request head is parsed once ([`framing`]), its lines
//! go to the executor as they came (hop-by-hop headers out, `host` set), and the response head
//! and body come back the same way over plain keep-alive connections ([`conns`]). No header maps
//! are built, and nothing is parsed twice. At the first request it does not take (any other
//! route, a streamed or large body, HTTP/1.0, `Expect`, broadcast), the connection, with what was
//! already read, goes to hyper's server and the general path ([`Balancer::handle`]) for good.
//!
//! Both paths keep the same rules: a refused connect moves the call to the next executor (the
//! body is held), nothing is retried once sent, slow clients are cut off, errors are the API's
//! JSON, and the same metrics count every call.
//!
//! - [`framing`]: what a head asks for, response framing, the chunked-body scanner;
//! - [`conns`]: connections to executors and their idle shelf.

pub mod conns;
pub mod framing;
#[cfg(test)]
mod tests;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioTimer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::error::Error;
use crate::metrics::Placement;
use crate::service::Balancer;
use crate::upstream::Upstream;
use conns::Conn;
use framing::{Chunks, Execution, Framing, Head};

/// Free space a read leaves at least.
const READ_ROOM: usize = 4 * 1024;

/// Serves one client connection until it closes, a timeout cuts it off, or `shutdown` turns
/// true (between calls).
pub async fn serve(
    balancer: Arc<Balancer>,
    mut client: TcpStream,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut buf = BytesMut::with_capacity(READ_ROOM);
    if balancer.config.fast_path {
        let timer = tokio::time::sleep(balancer.config.header_timeout());
        tokio::pin!(timer);
        loop {
            // The next head, within the header timeout (an idle keep-alive connection too).
            timer
                .as_mut()
                .reset((Instant::now() + balancer.config.header_timeout()).into());
            let head = loop {
                if !buf.is_empty() {
                    if let Some(head) = framing::request(&buf, balancer.config.replay_limit) {
                        break head;
                    }
                }
                if buf.capacity() - buf.len() < READ_ROOM {
                    buf.reserve(READ_ROOM);
                }
                tokio::select! {
                    biased;
                    read = client.read_buf(&mut buf) => match read {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    },
                    () = &mut timer => return,
                    _ = shutdown.changed(), if buf.is_empty() => return,
                }
            };
            let Head::Execution(call) = head else { break };
            // The body, held: a refused connect can send it again elsewhere.
            let total = call.head_len + call.body_len;
            if buf.len() < total {
                buf.reserve(total - buf.len());
            }
            while buf.len() < total {
                let idle = balancer.config.body_idle_timeout();
                timer.as_mut().reset((Instant::now() + idle).into());
                tokio::select! {
                    biased;
                    read = client.read_buf(&mut buf) => match read {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    },
                    () = &mut timer => {
                        let err = Error::ClientBody(format!("the client sent nothing for {idle:?}"));
                        answer_error(&mut client, err, true).await;
                        return;
                    }
                }
            }
            let head = buf.split_to(call.head_len);
            let body = buf.split_to(call.body_len);
            let keep = forward(&balancer, &head, &body, &call, &mut client).await;
            if !keep || call.close || *shutdown.borrow() {
                return;
            }
        }
    }
    general(balancer, client, buf.freeze(), shutdown).await;
}

/// The rest of the connection on hyper's server and the general path, starting with `read`.
async fn general(
    balancer: Arc<Balancer>,
    client: TcpStream,
    read: Bytes,
    shutdown: watch::Receiver<bool>,
) {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(balancer.config.header_timeout())
        .keep_alive(true);
    let service = service_fn(move |request| {
        let serving = balancer.clone();
        async move { Ok::<_, Infallible>(serving.handle(request).await) }
    });
    hearth_conn::server::serve_rest(&http, client, read, service, shutdown).await;
}

/// One execution to the executor holding its runtime (else its home); a refused connect tries
/// the next. Returns whether the client connection can carry another call.
async fn forward(
    balancer: &Balancer,
    head: &[u8],
    body: &[u8],
    call: &Execution,
    client: &mut TcpStream,
) -> bool {
    // The head parsed as UTF-8 text up to here (httparse checks the path).
    let Ok(id) = std::str::from_utf8(&head[call.id.clone()]) else {
        return answer_error(client, Error::RouteNotFound, call.close).await;
    };
    let config = &balancer.config;
    let mut skip: Vec<String> = Vec::new();
    loop {
        let (upstream, placement) = match balancer.locate(id, &skip).await {
            Ok(found) => found,
            Err(err) => return answer_error(client, err, call.close).await,
        };
        balancer.metrics.placement(placement);
        if placement != Placement::Cached {
            // Known at once, as on the general path.
            balancer.remember(id, &upstream);
        }
        let mut request = Vec::with_capacity(
            call.line.len() + upstream.authority.len() + call.forward.len() + body.len() + 8,
        );
        request.extend_from_slice(&head[call.line.clone()]);
        request.extend_from_slice(b"host: ");
        request.extend_from_slice(upstream.authority.as_bytes());
        request.extend_from_slice(b"\r\n");
        request.extend_from_slice(&call.forward);
        request.extend_from_slice(body);
        let _in_flight = upstream.start();
        let started = Instant::now();
        let timeout = config.upstream_timeout();
        let exchanged = tokio::time::timeout(
            timeout,
            exchange(&upstream, &request, call.close, config.connect_timeout()),
        )
        .await;
        balancer.metrics.latency(started.elapsed());
        let (conn, response) = match exchanged {
            Err(_) => {
                balancer.metrics.request(&upstream.url, "timeout");
                let err = Error::Timeout {
                    executor: upstream.url.clone(),
                    secs: timeout.as_secs_f64(),
                };
                return answer_error(client, err, call.close).await;
            }
            Ok(Err(Exchange::Connect(reason))) => {
                balancer.metrics.request(&upstream.url, "connect_error");
                balancer.eject(&upstream, &reason);
                balancer.forget(id);
                balancer.metrics.retry();
                skip.push(upstream.url.clone());
                continue;
            }
            Ok(Err(Exchange::Failed(reason))) => {
                balancer.metrics.request(&upstream.url, "upstream_error");
                let err = Error::Upstream {
                    executor: upstream.url.clone(),
                    reason,
                };
                return answer_error(client, err, call.close).await;
            }
            Ok(Ok(answer)) => answer,
        };
        let outcome = match response.status {
            200..=399 => "2xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        balancer.metrics.request(&upstream.url, outcome);
        return relay(&upstream, conn, response, client).await;
    }
}

/// Why an exchange with an executor failed.
enum Exchange {
    /// Nothing was taken by the executor: the call can go elsewhere.
    Connect(String),
    /// The request went out: never sent again.
    Failed(String),
}

/// Sends `request` on an idle connection (or a new one when there is none, or the idle one
/// fails the write) and reads the response head.
async fn exchange(
    upstream: &Upstream,
    request: &[u8],
    close: bool,
    connect_timeout: std::time::Duration,
) -> Result<(Conn, framing::Response), Exchange> {
    let mut reused = upstream.conns.take();
    if let Some(conn) = reused.as_mut() {
        if conn.stream.write_all(request).await.is_err() {
            reused = None;
        }
    }
    let mut conn = match reused {
        Some(conn) => conn,
        None => {
            let stream = conns::connect(&upstream.authority, connect_timeout)
                .await
                .map_err(Exchange::Connect)?;
            let mut conn = Conn::new(stream);
            conn.stream.write_all(request).await.map_err(|err| {
                Exchange::Connect(format!("the executor closed the connection: {err}"))
            })?;
            conn
        }
    };
    loop {
        match framing::response(&conn.buf, close).map_err(Exchange::Failed)? {
            Some(response) if (100..200).contains(&response.status) => {
                conn.buf.advance(response.head_len);
                continue;
            }
            Some(response) => return Ok((conn, response)),
            None => {}
        }
        if conn.buf.capacity() - conn.buf.len() < READ_ROOM {
            conn.buf.reserve(READ_ROOM);
        }
        match conn.stream.read_buf(&mut conn.buf).await {
            Ok(0) => {
                return Err(Exchange::Failed(
                    "the executor closed the connection before answering".into(),
                ))
            }
            Ok(_) => {}
            Err(err) => {
                return Err(Exchange::Failed(format!(
                    "failed to read the answer: {err}"
                )))
            }
        }
    }
}

/// Sends the response head and body to the client as the executor sends them; shelves the
/// connection when the body ended cleanly. Returns whether the client connection stays open.
async fn relay(
    upstream: &Upstream,
    mut conn: Conn,
    response: framing::Response,
    client: &mut TcpStream,
) -> bool {
    conn.buf.advance(response.head_len);
    let mut out = response.head;
    match response.framing {
        Framing::Empty => {
            if client.write_all(&out).await.is_err() {
                return false;
            }
        }
        Framing::Length(length) => {
            let mut left = length;
            loop {
                let take = conn
                    .buf
                    .len()
                    .min(usize::try_from(left).unwrap_or(usize::MAX));
                out.extend_from_slice(&conn.buf[..take]);
                conn.buf.advance(take);
                left -= take as u64;
                if client.write_all(&out).await.is_err() {
                    return false;
                }
                out.clear();
                if left == 0 {
                    break;
                }
                if !read_more(&mut conn).await {
                    return false;
                }
            }
        }
        Framing::Chunked => {
            let mut chunks = Chunks::default();
            loop {
                let Ok(end) = chunks.scan(&conn.buf) else {
                    return false;
                };
                let take = end.unwrap_or(conn.buf.len());
                out.extend_from_slice(&conn.buf[..take]);
                conn.buf.advance(take);
                if client.write_all(&out).await.is_err() {
                    return false;
                }
                out.clear();
                if end.is_some() {
                    break;
                }
                if !read_more(&mut conn).await {
                    return false;
                }
            }
        }
        Framing::UntilClose => {
            out.extend_from_slice(&conn.buf);
            conn.buf.clear();
            while client.write_all(&out).await.is_ok() {
                out.clear();
                if !read_more(&mut conn).await {
                    break;
                }
                out.extend_from_slice(&conn.buf);
                conn.buf.clear();
            }
            return false;
        }
    }
    if response.reusable && conn.buf.is_empty() {
        upstream.conns.put(conn);
    }
    true
}

/// Reads more of a response body; false when the executor closed or failed.
async fn read_more(conn: &mut Conn) -> bool {
    if conn.buf.capacity() - conn.buf.len() < READ_ROOM {
        conn.buf.reserve(READ_ROOM);
    }
    matches!(conn.stream.read_buf(&mut conn.buf).await, Ok(n) if n > 0)
}

/// Answers with the API's JSON error; returns whether the connection stays open.
async fn answer_error(client: &mut TcpStream, err: Error, close: bool) -> bool {
    let (status, body) = err.into_parts();
    let reason = status.canonical_reason().unwrap_or("");
    let out = framing::error_response(status.as_u16(), reason, &body, close);
    client.write_all(&out).await.is_ok() && !close
}
