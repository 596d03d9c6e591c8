//! The one shared client to executors: keep-alive HTTP/1.1 connections, each driven by the call
//! that uses it and then by the response body it streams back.
//!
//! hyper's pooled client runs every connection in a task of its own: a call hands its request to
//! that task over a channel, and every chunk of the answer comes back the same way, a task switch
//! (often across threads) each time. Here the task serving the client's request polls the
//! executor connection itself: while it waits for the response head, then inside the response
//! body ([`Driven`]) while the answer streams to the client. When the body ends, the connection
//! goes back on the shelf; a body dropped before its end closes it. Idle connections are not
//! polled at all: one the executor closed in the meantime is noticed when it is taken out, and a
//! request that never left is sent again on a new connection.

use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::FutureExt;
use http::{HeaderValue, Request, Response, Uri};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, Connection, SendRequest};
use hyper::client::conn::TrySendError;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::proxy::{BoxError, ProxyBody};

/// Idle connections kept per executor.
const MAX_IDLE_PER_HOST: usize = 256;
/// An idle connection older than this is closed rather than reused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// TCP keep-alive on every connection, so a vanished executor host is noticed.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

type Driver = Pin<Box<Connection<TokioIo<TcpStream>, ProxyBody>>>;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing was sent: the executor refused, dropped or never accepted the connection.
    #[error("{0}")]
    Connect(String),
    /// The request may have reached the executor.
    #[error("{0}")]
    Failed(#[source] hyper::Error),
    #[error("invalid request: {0}")]
    Invalid(String),
}

impl ClientError {
    pub fn is_connect(&self) -> bool {
        matches!(self, Self::Connect(_))
    }
}

/// One connection: the handle requests go in by, and the state machine that moves them (`None`
/// once it finished).
struct Conn {
    sender: SendRequest<ProxyBody>,
    driver: Option<Driver>,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

pub struct Client {
    connect_timeout: Duration,
    /// Idle connections by `host:port`.
    idle: Mutex<HashMap<String, Vec<Idle>>>,
}

impl Client {
    pub fn new(connect_timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            connect_timeout,
            idle: Mutex::new(HashMap::new()),
        })
    }

    /// [`Client::send`] for a request with an absolute URI (`http://host:port/path`).
    pub async fn request(
        self: &Arc<Self>,
        request: Request<ProxyBody>,
    ) -> Result<Response<ProxyBody>, ClientError> {
        let (mut parts, body) = request.into_parts();
        let authority = parts
            .uri
            .authority()
            .map(|a| a.as_str().to_string())
            .ok_or_else(|| ClientError::Invalid(format!("no host in {}", parts.uri)))?;
        let origin = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        parts.uri = Uri::try_from(origin).map_err(|err| ClientError::Invalid(err.to_string()))?;
        self.send(&authority, Request::from_parts(parts, body))
            .await
    }

    /// Sends `request` (origin-form URI; `host` is set here when missing) to `authority`
    /// (`host:port`) and returns the response head; its body streams from the connection, which
    /// goes back on the shelf when the body ends. The caller bounds the time to the head.
    pub async fn send(
        self: &Arc<Self>,
        authority: &str,
        mut request: Request<ProxyBody>,
    ) -> Result<Response<ProxyBody>, ClientError> {
        if !request.headers().contains_key(http::header::HOST) {
            let host = HeaderValue::from_str(authority)
                .map_err(|err| ClientError::Invalid(err.to_string()))?;
            request.headers_mut().insert(http::header::HOST, host);
        }
        loop {
            let (mut conn, reused) = match self.checkout(authority) {
                Some(conn) => (conn, true),
                None => (self.connect(authority).await?, false),
            };
            let response = match conn.round_trip(request).await {
                Ok(response) => response,
                Err(mut err) => match err.take_message() {
                    // It never left: a reused connection had been closed by the executor.
                    Some(unsent) if reused => {
                        request = unsent;
                        continue;
                    }
                    Some(_) => {
                        return Err(ClientError::Connect(format!(
                            "the executor closed the connection: {}",
                            err.into_error()
                        )))
                    }
                    None => return Err(ClientError::Failed(err.into_error())),
                },
            };
            let (head, body) = response.into_parts();
            let body = Driven {
                body,
                conn: Some(conn),
                client: self.clone(),
                authority: authority.to_string(),
            };
            return Ok(Response::from_parts(head, body.boxed_unsync()));
        }
    }

    fn checkout(&self, authority: &str) -> Option<Conn> {
        loop {
            let mut idle = {
                let mut shelf = self
                    .idle
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                shelf.get_mut(authority)?.pop()?
            };
            if idle.since.elapsed() >= IDLE_TIMEOUT {
                continue;
            }
            // One poll without a waker reads what the executor sent while the connection sat
            // idle: an end of stream finishes the driver.
            idle.conn.poll_driver_once();
            if idle.conn.is_open() {
                return Some(idle.conn);
            }
        }
    }

    fn checkin(&self, authority: &str, mut conn: Conn) {
        conn.poll_driver_once();
        if !conn.is_open() {
            return;
        }
        let mut shelf = self
            .idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = Instant::now();
        let conns = match shelf.get_mut(authority) {
            Some(conns) => conns,
            None => shelf.entry(authority.to_string()).or_default(),
        };
        conns.retain(|c| now - c.since < IDLE_TIMEOUT);
        if conns.len() < MAX_IDLE_PER_HOST {
            conns.push(Idle { conn, since: now });
        }
    }

    async fn connect(&self, authority: &str) -> Result<Conn, ClientError> {
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(authority))
            .await
            .map_err(|_| ClientError::Connect(format!("connecting to {authority} timed out")))?
            .map_err(|err| {
                ClientError::Connect(format!("failed to connect to {authority}: {err}"))
            })?;
        let _ = stream.set_nodelay(true);
        let keepalive = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE);
        let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
        let (sender, driver) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|err| ClientError::Connect(format!("failed to open {authority}: {err}")))?;
        Ok(Conn {
            sender,
            driver: Some(Box::pin(driver)),
        })
    }
}

impl Conn {
    fn is_open(&self) -> bool {
        self.driver.is_some() && !self.sender.is_closed()
    }

    /// Waits until the connection takes a request, sends it and waits for the response head.
    async fn round_trip(
        &mut self,
        request: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, TrySendError<Request<ProxyBody>>> {
        let Conn { sender, driver } = self;
        let mut sent = pin!(async {
            // A closed connection fails `ready`; `try_send_request` then hands the request back.
            let _ = sender.ready().await;
            sender.try_send_request(request).await
        });
        poll_fn(|cx| {
            if let Poll::Ready(out) = sent.as_mut().poll(cx) {
                return Poll::Ready(out);
            }
            self::poll_driver(driver, cx);
            // The driver's progress (the request written, the head read) is usually what the
            // call waits for: look again now rather than after a wake-up.
            sent.as_mut().poll(cx)
        })
        .await
    }

    fn poll_driver_once(&mut self) {
        if let Some(driver) = self.driver.as_mut() {
            if driver.as_mut().now_or_never().is_some() {
                self.driver = None;
            }
        }
    }
}

/// Polls the connection's state machine; drops it once it finished (the executor closed the
/// connection), which ends whatever still waits on it.
fn poll_driver(driver: &mut Option<Driver>, cx: &mut Context<'_>) {
    if let Some(running) = driver.as_mut() {
        if running.as_mut().poll(cx).is_ready() {
            *driver = None;
        }
    }
}

/// A response body that keeps its connection moving while it streams, and shelves the
/// connection once it ended.
struct Driven {
    body: Incoming,
    /// `None` once shelved (or after an error: then it is closed).
    conn: Option<Conn>,
    client: Arc<Client>,
    authority: String,
}

impl Driven {
    fn shelve(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.client.checkin(&self.authority, conn);
        }
    }
}

impl Body for Driven {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let mut polled = Pin::new(&mut this.body).poll_frame(cx);
        if polled.is_pending() {
            if let Some(conn) = this.conn.as_mut() {
                poll_driver(&mut conn.driver, cx);
            }
            polled = Pin::new(&mut this.body).poll_frame(cx);
        }
        match polled {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                this.shelve();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(err))) => {
                this.conn = None;
                Poll::Ready(Some(Err(err.into())))
            }
            Poll::Ready(Some(Ok(frame))) => {
                if this.body.is_end_stream() {
                    this.shelve();
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Driven {
    fn drop(&mut self) {
        // An empty body may never be polled (hyper's server skips it): it is complete all the
        // same, so the connection is reusable. A body left half-read closes it.
        if self.body.is_end_stream() {
            self.shelve();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A loopback HTTP/1.1 server answering every request with `body` (in two chunks when
    /// `chunked`); counts connections; with `close_after`, closes each after its first answer.
    async fn server(
        body: &'static str,
        chunked: bool,
        close_after: bool,
    ) -> (String, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    loop {
                        let Ok(n) = stream.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            let (a, b) = body.split_at(body.len() / 2);
                            let answer = if chunked {
                                format!(
                                    "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n",
                                    a.len()
                                )
                            } else {
                                format!(
                                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                                    body.len()
                                )
                            };
                            if stream.write_all(answer.as_bytes()).await.is_err() {
                                return;
                            }
                            if chunked {
                                // The rest a moment later: the body must keep the connection moving.
                                tokio::time::sleep(Duration::from_millis(20)).await;
                                let rest = format!("{:x}\r\n{b}\r\n0\r\n\r\n", b.len());
                                if stream.write_all(rest.as_bytes()).await.is_err() {
                                    return;
                                }
                            }
                            if close_after {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (format!("http://{addr}"), accepted)
    }

    fn get(url: &str) -> Request<ProxyBody> {
        Request::get(format!("{url}/v1/health"))
            .body(crate::proxy::full(Bytes::new()))
            .unwrap()
    }

    async fn text(response: Response<ProxyBody>) -> String {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn streams_bodies_and_reuses_the_connection() {
        for chunked in [false, true] {
            let (url, accepted) = server("hello world", chunked, false).await;
            let client = Client::new(Duration::from_secs(1));
            for _ in 0..4 {
                let response = client.request(get(&url)).await.unwrap();
                assert_eq!(response.status(), 200);
                assert_eq!(text(response).await, "hello world");
            }
            assert_eq!(accepted.load(Ordering::SeqCst), 1, "chunked {chunked}");
        }
    }

    #[tokio::test]
    async fn a_connection_the_executor_closed_is_replaced() {
        let (url, accepted) = server("again", false, true).await;
        let client = Client::new(Duration::from_secs(1));
        for _ in 0..3 {
            assert_eq!(
                text(client.request(get(&url)).await.unwrap()).await,
                "again"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_body_dropped_half_read_closes_its_connection() {
        let (url, accepted) = server("hello world", true, false).await;
        let client = Client::new(Duration::from_secs(1));
        drop(client.request(get(&url)).await.unwrap());
        assert_eq!(
            text(client.request(get(&url)).await.unwrap()).await,
            "hello world"
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn nothing_listening_is_a_connect_error() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let client = Client::new(Duration::from_secs(1));
        let err = client
            .request(get(&format!("http://127.0.0.1:{port}")))
            .await
            .err()
            .unwrap();
        assert!(err.is_connect(), "{err}");
    }
}
