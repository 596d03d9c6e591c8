//! Keep-alive HTTP/1.1 connections to runtimes, each driven by the call that uses it
//! (`hearth-conn`): a call to a warm runtime runs start to end in the task that serves the API
//! request, as a single-threaded proxy would.
//!
//! A runtime that also serves on a Unix socket in the folder it shares with the executor
//! ([`Target::socket`], `runtimes/socket.md`) is called there: no TCP, bridge or netfilter on
//! either side. When the socket is missing or refuses (an image without the extension, a server
//! not listening on it yet), a new connection goes over TCP instead.

use std::io::IoSlice;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hearth_conn::{Conn, Shelf};
use http::Request;
use http_body_util::{BodyExt, Full, Limited};
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

type RuntimeConn = Conn<TokioIo<Stream>, Full<Bytes>>;

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

pub struct Pool {
    shelf: Shelf<Target, TokioIo<Stream>, Full<Bytes>>,
    /// Requests answered, over a Unix socket and over TCP.
    answered_unix: AtomicU64,
    answered_tcp: AtomicU64,
}

impl Default for Pool {
    fn default() -> Self {
        Self {
            shelf: Shelf::new(IDLE_TIMEOUT, MAX_IDLE_PER_RUNTIME),
            answered_unix: AtomicU64::new(0),
            answered_tcp: AtomicU64::new(0),
        }
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
        let (response, mut conn) = self
            .shelf
            .send(target, request, || connect(target))
            .await
            .map_err(|err| match err {
                hearth_conn::SendError::Connect(err) => err,
                hearth_conn::SendError::Closed(err) => {
                    SendError::Connect(format!("the runtime closed the connection: {err}"))
                }
                hearth_conn::SendError::Failed(err) => SendError::Failed(err.to_string()),
            })?;
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
        let answered = match conn.transport() {
            UNIX => &self.answered_unix,
            _ => &self.answered_tcp,
        };
        answered.fetch_add(1, Ordering::Relaxed);
        self.shelf.checkin(target, conn);
        Ok(Answer { head, body })
    }
}

const UNIX: &str = "unix";

/// A new connection: over the target's Unix socket when it answers there, else over TCP.
async fn connect(target: &Target) -> Result<RuntimeConn, SendError> {
    let endpoint = &target.endpoint;
    let (stream, transport) = match connect_unix(target).await {
        Some(stream) => (Stream::Unix(stream), UNIX),
        None => {
            let address = (endpoint.host.as_str(), endpoint.port);
            let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address))
                .await
                .map_err(|_| SendError::Connect(format!("connecting to {endpoint} timed out")))?
                .map_err(|err| {
                    SendError::Connect(format!("failed to connect to {endpoint}: {err}"))
                })?;
            let _ = stream.set_nodelay(true);
            // A runtime binds its socket before its port, so one whose port answered a moment
            // after its socket did not (a readiness probe during its start) has it now.
            match connect_unix(target).await {
                Some(unix) => (Stream::Unix(unix), UNIX),
                None => (Stream::Tcp(stream), "tcp"),
            }
        }
    };
    Conn::handshake(TokioIo::new(stream), transport)
        .await
        .map_err(|err| SendError::Connect(format!("failed to open {endpoint}: {err}")))
}

/// A connection on the target's Unix socket, when it has one and it answers.
async fn connect_unix(target: &Target) -> Option<UnixStream> {
    let path = target.socket.as_ref()?;
    tokio::time::timeout(CONNECT_TIMEOUT, UnixStream::connect(path))
        .await
        .ok()
        .and_then(Result::ok)
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

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_adapters::Endpoint;
    use hyper::service::service_fn;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    /// Serves HTTP/1.1 on `stream`, answering every request with `body`.
    fn serve<S>(stream: S, body: &'static str)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let service = service_fn(move |_request| async move {
            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from(body))))
        });
        tokio::spawn(
            hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service),
        );
    }

    /// A loopback TCP runtime stand-in answering `body`; counts its connections.
    async fn tcp_server(body: &'static str) -> (Target, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                serve(stream, body);
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
    async fn a_body_over_the_limit_is_refused() {
        let (target, _) = tcp_server("0123456789").await;
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
        let listener = tokio::net::UnixListener::bind(dir.join(".hearth.sock")).unwrap();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                serve(stream, "over unix");
            }
        });
        // Its TCP port refuses: only the socket can answer.
        let target = Target::new(tcp_target(closed_port()).endpoint, Some(dir.as_path()));
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
        let (tcp, accepted) = tcp_server("over tcp").await;
        let target = Target::new(tcp.endpoint, Some(dir.as_path()));
        // No file at the path (an image without the extension).
        let pool = Pool::default();
        let answer = pool.send(&target, get(), 1024).await.unwrap();
        assert_eq!(&answer.body[..], b"over tcp");
        assert_eq!(pool.answered(), (0, 1));
        // A socket file nobody listens on (left by an earlier container): refused, then TCP.
        drop(std::os::unix::net::UnixListener::bind(dir.join(".hearth.sock")).unwrap());
        assert!(dir.join(".hearth.sock").exists());
        let fresh = Pool::default();
        let answer = fresh.send(&target, get(), 1024).await.unwrap();
        assert_eq!(&answer.body[..], b"over tcp");
        assert_eq!(fresh.answered(), (0, 1));
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
