//! Keep-alive HTTP/1.1 connections to runtimes, each driven by the call that uses it.
//!
//! hyper's pooled client runs every connection in a task of its own: a call hands its request to
//! that task through a channel and sleeps until the task wakes it with the answer, two task
//! switches (often across threads) per call. Here the calling task polls the connection itself
//! while it waits, so a call to a warm runtime runs start to end in the task that serves the
//! API request, as a single-threaded proxy would. Idle connections are not polled at all; one
//! the runtime closed in the meantime is noticed when it is taken out of the pool, and a request
//! that never left is sent again on a new connection.
//!
//! A runtime that also serves on a Unix socket in the folder it shares with the executor
//! ([`Target::socket`], `runtimes/socket.md`) is called there: no TCP, bridge or netfilter on
//! either side. When the socket is missing or refuses (an image without the extension, a server
//! not listening on it yet), a new connection goes over TCP instead.

use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::io::IoSlice;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::FutureExt;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, Connection, SendRequest};
use hyper::client::conn::TrySendError;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use super::Target;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle connections kept per runtime (the most calls one runtime ever had in flight at once).
const MAX_IDLE_PER_RUNTIME: usize = 64;
/// An idle connection older than this is closed rather than reused (runtimes close theirs after
/// a few seconds of silence; Node's default is 5 s).
const IDLE_TIMEOUT: Duration = Duration::from_secs(4);

type Driver = Pin<Box<Connection<TokioIo<Stream>, Full<Bytes>>>>;

/// One connection: the handle requests go in by, and the state machine that moves them (`None`
/// once it finished: dropping it fails whatever was still queued, so nothing waits on it).
struct Conn {
    sender: SendRequest<Full<Bytes>>,
    driver: Option<Driver>,
    /// Over the runtime's Unix socket (else TCP).
    unix: bool,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// Nothing was sent: the runtime refused, dropped or never accepted the connection.
    #[error("{0}")]
    Connect(String),
    #[error("the response is larger than the limit")]
    TooLarge,
    /// The request may have reached the runtime.
    #[error("{0}")]
    Failed(String),
}

/// What the runtime answered, read whole.
pub struct Answer {
    pub head: http::response::Parts,
    pub body: Bytes,
}

#[derive(Default)]
pub struct Pool {
    idle: Mutex<Shelf>,
    /// Requests answered, over a Unix socket and over TCP.
    answered_unix: AtomicU64,
    answered_tcp: AtomicU64,
}

#[derive(Default)]
struct Shelf {
    conns: HashMap<Target, Vec<Idle>>,
    /// When connections past their time were last closed (and entries of runtimes that went).
    swept: Option<Instant>,
}

impl Shelf {
    fn sweep_now_and_then(&mut self) {
        let now = Instant::now();
        if self.swept.is_some_and(|at| now - at < IDLE_TIMEOUT) {
            return;
        }
        self.swept = Some(now);
        self.conns.retain(|_, conns| {
            conns.retain(|c| now - c.since < IDLE_TIMEOUT);
            !conns.is_empty()
        });
    }
}

impl Pool {
    /// Requests answered so far: (over a Unix socket, over TCP).
    pub fn answered(&self) -> (u64, u64) {
        (
            self.answered_unix.load(Ordering::Relaxed),
            self.answered_tcp.load(Ordering::Relaxed),
        )
    }

    /// Sends `request` (origin-form URI; `host` is set here) to `target` and reads the whole
    /// response, at most `max_body` bytes of body. The caller bounds the time.
    pub async fn send(
        &self,
        target: &Target,
        mut request: Request<Full<Bytes>>,
        max_body: usize,
    ) -> Result<Answer, SendError> {
        if !request.headers().contains_key(http::header::HOST) {
            let host = http::HeaderValue::from_str(&target.endpoint.to_string())
                .map_err(|err| SendError::Connect(format!("invalid runtime address: {err}")))?;
            request.headers_mut().insert(http::header::HOST, host);
        }
        loop {
            let (mut conn, reused) = match self.checkout(target) {
                Some(conn) => (conn, true),
                None => (self.connect(target).await?, false),
            };
            let response = match conn.round_trip(request).await {
                Ok(response) => response,
                Err(mut err) => match err.take_message() {
                    // It never left: a reused connection had been closed by the runtime.
                    Some(unsent) if reused => {
                        request = unsent;
                        continue;
                    }
                    Some(_) => {
                        return Err(SendError::Connect(format!(
                            "the runtime closed the connection: {}",
                            err.into_error()
                        )))
                    }
                    None => return Err(SendError::Failed(err.into_error().to_string())),
                },
            };
            let (head, body) = response.into_parts();
            let body = conn
                .drive(Limited::new(body, max_body).collect())
                .await
                .map_err(|err| {
                    if err.is::<http_body_util::LengthLimitError>() {
                        SendError::TooLarge
                    } else {
                        SendError::Failed(format!("failed to read the response: {err}"))
                    }
                })?
                .to_bytes();
            let answered = if conn.unix {
                &self.answered_unix
            } else {
                &self.answered_tcp
            };
            answered.fetch_add(1, Ordering::Relaxed);
            self.checkin(target, conn);
            return Ok(Answer { head, body });
        }
    }

    fn checkout(&self, target: &Target) -> Option<Conn> {
        loop {
            let mut idle = {
                let mut shelf = self
                    .idle
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                shelf.conns.get_mut(target)?.pop()?
            };
            if idle.since.elapsed() >= IDLE_TIMEOUT {
                continue;
            }
            // One poll without a waker reads what the runtime sent while the connection sat
            // idle: an end of stream finishes the driver.
            idle.conn.poll_driver_once();
            if idle.conn.is_open() {
                return Some(idle.conn);
            }
        }
    }

    fn checkin(&self, target: &Target, mut conn: Conn) {
        conn.poll_driver_once();
        if !conn.is_open() {
            return;
        }
        let mut shelf = self
            .idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        shelf.sweep_now_and_then();
        let conns = match shelf.conns.get_mut(target) {
            Some(conns) => conns,
            None => shelf.conns.entry(target.clone()).or_default(),
        };
        if conns.len() < MAX_IDLE_PER_RUNTIME {
            conns.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }

    /// A new connection: over the target's Unix socket when it answers there, else over TCP.
    async fn connect(&self, target: &Target) -> Result<Conn, SendError> {
        let endpoint = &target.endpoint;
        let unix = match &target.socket {
            Some(path) => tokio::time::timeout(CONNECT_TIMEOUT, UnixStream::connect(path))
                .await
                .ok()
                .and_then(Result::ok),
            None => None,
        };
        let stream = match unix {
            Some(stream) => Stream::Unix(stream),
            None => {
                let address = (endpoint.host.as_str(), endpoint.port);
                let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address))
                    .await
                    .map_err(|_| SendError::Connect(format!("connecting to {endpoint} timed out")))?
                    .map_err(|err| {
                        SendError::Connect(format!("failed to connect to {endpoint}: {err}"))
                    })?;
                let _ = stream.set_nodelay(true);
                Stream::Tcp(stream)
            }
        };
        let unix = matches!(stream, Stream::Unix(_));
        let (sender, driver) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|err| SendError::Connect(format!("failed to open {endpoint}: {err}")))?;
        Ok(Conn {
            sender,
            driver: Some(Box::pin(driver)),
            unix,
        })
    }
}

/// A connection to a runtime: TCP, or the Unix socket in its shared folder.
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Tcp(s) => s.is_write_vectored(),
            Stream::Unix(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

impl Conn {
    fn is_open(&self) -> bool {
        self.driver.is_some() && !self.sender.is_closed()
    }

    /// Waits until the connection takes a request, sends it and waits for the response head.
    async fn round_trip(
        &mut self,
        request: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, TrySendError<Request<Full<Bytes>>>> {
        let Conn { sender, driver, .. } = self;
        drive_with(driver, ready_then_send(sender, request)).await
    }

    /// Runs `future` while keeping the connection moving.
    async fn drive<F: Future>(&mut self, future: F) -> F::Output {
        drive_with(&mut self.driver, future).await
    }

    fn poll_driver_once(&mut self) {
        if let Some(driver) = self.driver.as_mut() {
            if driver.as_mut().now_or_never().is_some() {
                self.driver = None;
            }
        }
    }
}

async fn ready_then_send(
    sender: &mut SendRequest<Full<Bytes>>,
    request: Request<Full<Bytes>>,
) -> Result<Response<Incoming>, TrySendError<Request<Full<Bytes>>>> {
    // A closed connection fails `ready`; `try_send_request` then hands the request back unsent.
    let _ = sender.ready().await;
    sender.try_send_request(request).await
}

/// Polls `future` and the connection's driver together in this task until `future` ends. The
/// driver may end first (the runtime closed the connection): it is dropped, which ends
/// `future` with what the driver left it or with an error.
async fn drive_with<F: Future>(driver: &mut Option<Driver>, future: F) -> F::Output {
    let mut future = pin!(future);
    poll_fn(|cx| {
        if let Poll::Ready(out) = future.as_mut().poll(cx) {
            return Poll::Ready(out);
        }
        if let Some(running) = driver.as_mut() {
            if running.as_mut().poll(cx).is_ready() {
                *driver = None;
            }
        }
        // The driver's progress (bytes written, a response read) is usually what the future
        // waits for: look again now rather than after a wake-up.
        future.as_mut().poll(cx)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_adapters::Endpoint;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, UnixListener};

    /// Answers every request on `stream` with `body`; with `close_after`, closes after the
    /// first answer without saying so.
    async fn answer<S: AsyncRead + AsyncWrite + Unpin>(
        mut stream: S,
        body: &'static str,
        close_after: bool,
    ) {
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
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                if stream.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
                if close_after {
                    return;
                }
            }
        }
    }

    /// A loopback HTTP/1.1 server answering every GET with `body`; counts the connections it
    /// accepted and, with `close_after`, closes each one after its first answer without saying so.
    async fn server(body: &'static str, close_after: bool) -> (Target, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(answer(stream, body, close_after));
            }
        });
        (tcp_target(port), accepted)
    }

    fn tcp_target(port: u16) -> Target {
        Target::new(
            Endpoint {
                host: "127.0.0.1".to_string(),
                port,
            },
            None,
        )
    }

    /// A port nothing listens on.
    fn closed_port() -> u16 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    }

    /// A folder of its own for a test's socket.
    fn socket_dir(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("hearth-conn-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn get() -> Request<Full<Bytes>> {
        Request::get("/").body(Full::new(Bytes::new())).unwrap()
    }

    #[tokio::test]
    async fn reuses_a_kept_alive_connection() {
        let (target, accepted) = server("hello", false).await;
        let pool = Pool::default();
        for _ in 0..5 {
            let answer = pool.send(&target, get(), 1024).await.unwrap();
            assert_eq!(answer.head.status, 200);
            assert_eq!(&answer.body[..], b"hello");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_connection_the_runtime_closed_is_replaced() {
        let (target, accepted) = server("again", true).await;
        let pool = Pool::default();
        for _ in 0..3 {
            let answer = pool.send(&target, get(), 1024).await.unwrap();
            assert_eq!(&answer.body[..], b"again");
            // Let the close reach this side before the next call takes the connection.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn concurrent_calls_open_connections_of_their_own() {
        let (target, accepted) = server("many", false).await;
        let pool = Arc::new(Pool::default());
        let calls: Vec<_> = (0..8)
            .map(|_| {
                let (pool, target) = (pool.clone(), target.clone());
                tokio::spawn(async move { pool.send(&target, get(), 1024).await.unwrap() })
            })
            .collect();
        for call in calls {
            assert_eq!(&call.await.unwrap().body[..], b"many");
        }
        let opened = accepted.load(Ordering::SeqCst);
        assert!((1..=8).contains(&opened));
        // All of them went back on the shelf: the next round opens nothing new.
        for _ in 0..4 {
            pool.send(&target, get(), 1024).await.unwrap();
        }
        assert_eq!(accepted.load(Ordering::SeqCst), opened);
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_refused() {
        let (target, _) = server("0123456789", false).await;
        let pool = Pool::default();
        let err = pool.send(&target, get(), 4).await.err().unwrap();
        assert!(matches!(err, SendError::TooLarge), "{err}");
    }

    #[tokio::test]
    async fn nothing_listening_is_a_connect_error() {
        let err = Pool::default()
            .send(&tcp_target(closed_port()), get(), 1024)
            .await
            .err()
            .unwrap();
        assert!(matches!(err, SendError::Connect(_)), "{err}");
    }

    #[tokio::test]
    async fn a_runtime_serving_a_unix_socket_is_called_there() {
        let dir = socket_dir("unix");
        let listener = UnixListener::bind(dir.join(".hearth.sock")).unwrap();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                tokio::spawn(answer(stream, "over unix", false));
            }
        });
        // Its TCP port refuses: only the socket can answer.
        let mut target = tcp_target(closed_port());
        target.socket = Some(dir.join(".hearth.sock"));
        let pool = Pool::default();
        for _ in 0..3 {
            let answer = pool.send(&target, get(), 1024).await.unwrap();
            assert_eq!(&answer.body[..], b"over unix");
        }
        assert_eq!(pool.answered(), (3, 0));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_missing_or_dead_socket_falls_back_to_tcp() {
        let dir = socket_dir("fallback");
        let (mut target, accepted) = server("over tcp", true).await;
        let pool = Pool::default();
        // No file at the path (an image without the extension).
        target.socket = Some(dir.join(".hearth.sock"));
        let answer = pool.send(&target, get(), 1024).await.unwrap();
        assert_eq!(&answer.body[..], b"over tcp");
        // A socket file nobody listens on (left by an earlier container): refused, then TCP.
        drop(std::os::unix::net::UnixListener::bind(dir.join(".hearth.sock")).unwrap());
        assert!(dir.join(".hearth.sock").exists());
        tokio::time::sleep(Duration::from_millis(20)).await;
        let answer = pool.send(&target, get(), 1024).await.unwrap();
        assert_eq!(&answer.body[..], b"over tcp");
        assert_eq!(pool.answered(), (0, 2));
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
