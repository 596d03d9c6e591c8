//! Keep-alive HTTP/1.1 connections to runtimes, written and read by hand: a call's request is
//! one buffer of bytes ([`Outgoing`]), the response head is parsed once with httparse into the
//! name/value pairs the executor keeps, and the body is read whole (by length, chunked, or to
//! the close) under a size limit. Everything runs in the task that serves the API request, as a
//! single-threaded proxy would; idle connections wait on a shelf per runtime.
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

use bytes::{Buf, Bytes, BytesMut};
use hearth_conn::Idle;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use super::Target;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle connections kept per runtime (the most calls one runtime ever had in flight at once).
const MAX_IDLE_PER_RUNTIME: usize = 64;
/// An idle connection older than this is closed rather than reused (runtimes close theirs after
/// a few seconds of silence; Node's default is 5 s).
const IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// Headers a response head may carry.
const MAX_HEADERS: usize = 100;
/// Largest response head.
const MAX_HEAD: usize = 64 * 1024;
/// Free space a read leaves at least.
const READ_ROOM: usize = 8 * 1024;
/// A request body up to this size is copied behind its head and sent in one write.
const COPY_BODY: usize = 16 * 1024;

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

/// A request on its way to a runtime: the head's bytes so far, and the body.
pub struct Outgoing {
    head: Vec<u8>,
    body: Bytes,
    /// A `HEAD` request: the answer has no body, whatever its head says.
    head_only: bool,
}

impl Outgoing {
    /// A request for `path` (origin form; refused when it holds anything but visible ASCII).
    pub fn new(method: &str, path: &str) -> Result<Self, String> {
        if !path.starts_with('/') || !path.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "invalid request path {path:?}: it must start with / and hold only visible ASCII"
            ));
        }
        let mut head = Vec::with_capacity(512);
        head.extend_from_slice(method.as_bytes());
        head.push(b' ');
        head.extend_from_slice(path.as_bytes());
        head.extend_from_slice(b" HTTP/1.1\r\n");
        Ok(Self {
            head,
            body: Bytes::new(),
            head_only: method.eq_ignore_ascii_case("HEAD"),
        })
    }

    /// Adds a header; one whose name is not a token or whose value holds anything but visible
    /// ASCII, spaces and tabs is left out (returns false), so nothing can be injected.
    pub fn header(&mut self, name: &str, value: &str) -> bool {
        let token = !name.is_empty() && name.bytes().all(is_tchar);
        let text = value
            .bytes()
            .all(|b| b == b'\t' || (b' '..=b'~').contains(&b));
        if token && text {
            self.head.extend_from_slice(name.as_bytes());
            self.head.extend_from_slice(b": ");
            self.head.extend_from_slice(value.as_bytes());
            self.head.extend_from_slice(b"\r\n");
        }
        token && text
    }

    pub fn body(mut self, body: Bytes) -> Self {
        self.body = body;
        self
    }

    /// The bytes to send first: the head with `host` and the body's length, and the body too
    /// when it is small.
    fn finish(mut self, host: &str) -> (Vec<u8>, Bytes, bool) {
        self.head.extend_from_slice(b"host: ");
        self.head.extend_from_slice(host.as_bytes());
        self.head.extend_from_slice(b"\r\ncontent-length: ");
        self.head
            .extend_from_slice(self.body.len().to_string().as_bytes());
        self.head.extend_from_slice(b"\r\n\r\n");
        if self.body.len() <= COPY_BODY {
            self.head.extend_from_slice(&self.body);
            self.body = Bytes::new();
        }
        (self.head, self.body, self.head_only)
    }
}

/// RFC 9110 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// What the runtime answered, read whole.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    /// Lower-cased names, in order, repeated names repeated.
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

/// One connection to a runtime and what was read from it but not used yet.
struct Conn {
    stream: Stream,
    buf: BytesMut,
}

pub struct Pool {
    idle: Idle<Target, Conn>,
    /// Requests answered, over a Unix socket and over TCP.
    answered_unix: AtomicU64,
    answered_tcp: AtomicU64,
}

impl Default for Pool {
    fn default() -> Self {
        Self {
            idle: Idle::new(IDLE_TIMEOUT, MAX_IDLE_PER_RUNTIME),
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

    /// Sends `request` to `target` and reads the whole response, at most `max_body` bytes of
    /// body. A reused connection the runtime had closed is noticed before the request goes
    /// (or when writing it fails) and the request goes on a new one. The caller bounds the time.
    pub async fn send(
        &self,
        target: &Target,
        request: Outgoing,
        max_body: usize,
    ) -> Result<Answer, SendError> {
        let (head, body, head_only) = request.finish(&target.endpoint.to_string());
        let mut conn = loop {
            let Some(mut conn) = self.idle.take(target, |conn| conn.stream.is_quiet()) else {
                let mut conn = connect(target).await?;
                conn.write(&head, &body).await.map_err(|err| {
                    SendError::Connect(format!("the runtime closed the connection: {err}"))
                })?;
                break conn;
            };
            if conn.write(&head, &body).await.is_ok() {
                break conn;
            }
        };
        let (answer, reusable) = conn.read_answer(head_only, max_body).await?;
        let answered = match conn.stream {
            Stream::Unix(_) => &self.answered_unix,
            Stream::Tcp(_) => &self.answered_tcp,
        };
        answered.fetch_add(1, Ordering::Relaxed);
        if reusable && conn.buf.is_empty() {
            self.idle.put(target, conn);
        }
        Ok(answer)
    }
}

/// A response head, parsed.
struct Head {
    status: u16,
    /// Lower-cased names, in order.
    headers: Vec<(String, String)>,
    framing: Framing,
    /// The connection can carry another request after this response.
    reusable: bool,
}

/// How a response body ends.
enum Framing {
    None,
    Length(usize),
    Chunked,
    UntilClose,
}

impl Conn {
    fn new(stream: Stream) -> Self {
        Self {
            stream,
            buf: BytesMut::with_capacity(READ_ROOM),
        }
    }

    async fn write(&mut self, head: &[u8], body: &Bytes) -> std::io::Result<()> {
        if body.is_empty() {
            return self.stream.write_all(head).await;
        }
        let mut out = Buf::chain(head, &body[..]);
        self.stream.write_all_buf(&mut out).await
    }

    /// Reads more into the buffer; an error when the runtime closed.
    async fn fill(&mut self) -> Result<(), SendError> {
        if self.buf.capacity() - self.buf.len() < READ_ROOM {
            self.buf.reserve(READ_ROOM);
        }
        match self.stream.read_buf(&mut self.buf).await {
            Ok(0) => Err(SendError::Failed(
                "the runtime closed the connection before the end of its answer".into(),
            )),
            Ok(_) => Ok(()),
            Err(err) => Err(SendError::Failed(format!(
                "failed to read the answer: {err}"
            ))),
        }
    }

    /// Reads one response whole; also says whether the connection can carry another request.
    async fn read_answer(
        &mut self,
        head_only: bool,
        max_body: usize,
    ) -> Result<(Answer, bool), SendError> {
        let head = loop {
            if let Some(head) = self.parse_head(head_only)? {
                if (100..200).contains(&head.status) {
                    continue;
                }
                break head;
            }
            if self.buf.len() > MAX_HEAD {
                return Err(SendError::Failed(format!(
                    "the runtime's response head is larger than {MAX_HEAD} bytes"
                )));
            }
            self.fill().await?;
        };
        let body = match head.framing {
            Framing::None => Bytes::new(),
            Framing::Length(length) => {
                if length > max_body {
                    return Err(SendError::TooLarge);
                }
                while self.buf.len() < length {
                    if self.buf.capacity() - self.buf.len() < length - self.buf.len() {
                        self.buf.reserve(length - self.buf.len());
                    }
                    self.fill().await?;
                }
                self.buf.split_to(length).freeze()
            }
            Framing::Chunked => self.read_chunked(max_body).await?,
            Framing::UntilClose => {
                loop {
                    if self.buf.len() > max_body {
                        return Err(SendError::TooLarge);
                    }
                    if self.fill().await.is_err() {
                        break;
                    }
                }
                self.buf.split().freeze()
            }
        };
        let answer = Answer {
            status: head.status,
            headers: head.headers,
            body,
        };
        Ok((answer, head.reusable))
    }

    /// Parses a complete response head at the start of the buffer and takes it out.
    fn parse_head(&mut self, head_only: bool) -> Result<Option<Head>, SendError> {
        let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut raw);
        let head_len = match parsed.parse(&self.buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(err) => {
                return Err(SendError::Failed(format!(
                    "the runtime's response head is malformed: {err}"
                )))
            }
        };
        let status = parsed.code.unwrap_or(0);
        let mut keep_alive = parsed.version == Some(1);
        let mut length: Option<usize> = None;
        let mut chunked = false;
        // A transfer coding other than chunked last: the body ends with the connection.
        let mut encoded = false;
        let mut headers = Vec::with_capacity(parsed.headers.len());
        for header in parsed.headers.iter() {
            let name = header.name.to_ascii_lowercase();
            let value = String::from_utf8_lossy(header.value).into_owned();
            match name.as_str() {
                "content-length" => {
                    let parsed: usize = value.trim().parse().map_err(|_| {
                        SendError::Failed(format!("invalid content-length {value:?}"))
                    })?;
                    if length.is_some_and(|known| known != parsed) {
                        return Err(SendError::Failed("conflicting content-length".into()));
                    }
                    length = Some(parsed);
                }
                "transfer-encoding" => {
                    chunked = value
                        .rsplit(',')
                        .next()
                        .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
                    encoded = true;
                }
                "connection" => {
                    keep_alive &= !value
                        .split(',')
                        .any(|token| token.trim().eq_ignore_ascii_case("close"));
                }
                _ => {}
            }
            headers.push((name, value));
        }
        self.buf.advance(head_len);
        let framing = if head_only || status == 204 || status == 304 || status < 200 {
            Framing::None
        } else if chunked {
            Framing::Chunked
        } else if encoded {
            Framing::UntilClose
        } else if let Some(length) = length {
            Framing::Length(length)
        } else {
            Framing::UntilClose
        };
        Ok(Some(Head {
            status,
            headers,
            reusable: keep_alive && !matches!(framing, Framing::UntilClose),
            framing,
        }))
    }

    /// Reads and decodes a chunked body, trailers dropped.
    async fn read_chunked(&mut self, max_body: usize) -> Result<Bytes, SendError> {
        let mut body = BytesMut::new();
        loop {
            let line = self.line().await?;
            let size = line.split(|&b| b == b';').next().unwrap_or_default();
            let size = std::str::from_utf8(size)
                .ok()
                .and_then(|s| usize::from_str_radix(s.trim(), 16).ok())
                .ok_or_else(|| SendError::Failed("invalid chunk size in the answer".into()))?;
            if size == 0 {
                // Trailers, up to the empty line.
                while !self.line().await?.is_empty() {}
                return Ok(body.freeze());
            }
            if body.len() + size > max_body {
                return Err(SendError::TooLarge);
            }
            while self.buf.len() < size + 2 {
                self.fill().await?;
            }
            body.extend_from_slice(&self.buf[..size]);
            if &self.buf[size..size + 2] != b"\r\n" {
                return Err(SendError::Failed(
                    "a chunk of the answer is malformed".into(),
                ));
            }
            self.buf.advance(size + 2);
        }
    }

    /// The next CRLF-terminated line, taken out of the buffer without its end.
    async fn line(&mut self) -> Result<Bytes, SendError> {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = self.buf.split_to(end).freeze();
                self.buf.advance(2);
                return Ok(line);
            }
            if self.buf.len() > 4096 {
                return Err(SendError::Failed(
                    "a chunk line of the answer is too long".into(),
                ));
            }
            self.fill().await?;
        }
    }
}

/// A new connection: over the target's Unix socket when it answers there, else over TCP.
async fn connect(target: &Target) -> Result<Conn, SendError> {
    let endpoint = &target.endpoint;
    if let Some(stream) = connect_unix(target).await {
        return Ok(Conn::new(Stream::Unix(stream)));
    }
    let address = (endpoint.host.as_str(), endpoint.port);
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address))
        .await
        .map_err(|_| SendError::Connect(format!("connecting to {endpoint} timed out")))?
        .map_err(|err| SendError::Connect(format!("failed to connect to {endpoint}: {err}")))?;
    let _ = stream.set_nodelay(true);
    // A runtime binds its socket before its port, so one whose port answered a moment after its
    // socket did not (a readiness probe during its start) has it now.
    Ok(match connect_unix(target).await {
        Some(unix) => Conn::new(Stream::Unix(unix)),
        None => Conn::new(Stream::Tcp(stream)),
    })
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

impl Stream {
    /// Whether an idle connection is still open with nothing to read: one the runtime closed,
    /// or that holds stray bytes, is not reused. Costs no system call while the socket has not
    /// been reported readable.
    fn is_quiet(&self) -> bool {
        let mut probe = [0u8; 1];
        let read = match self {
            Stream::Tcp(s) => s.try_read(&mut probe),
            Stream::Unix(s) => s.try_read(&mut probe),
        };
        matches!(read, Err(err) if err.kind() == std::io::ErrorKind::WouldBlock)
    }
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
    use http_body_util::Full;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

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

    fn get() -> Outgoing {
        Outgoing::new("GET", "/").unwrap()
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

    /// A loopback server answering every request with the raw bytes `answer` (and closing after
    /// it when `close`); returns the target and the requests it saw.
    async fn raw_server(
        answer: &'static [u8],
        close: bool,
    ) -> (Target, Arc<std::sync::Mutex<Vec<String>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                let log = log.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let n = stream.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        let text = String::from_utf8_lossy(&buf).to_string();
                        let Some(end) = text.find("\r\n\r\n") else {
                            continue;
                        };
                        let length = text[..end]
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length: "))
                            .map_or(0, |l| l.parse::<usize>().unwrap());
                        if buf.len() < end + 4 + length {
                            continue;
                        }
                        log.lock().unwrap().push(text);
                        buf.clear();
                        stream.write_all(answer).await.unwrap();
                        if close {
                            return;
                        }
                    }
                });
            }
        });
        (tcp_target(port), seen)
    }

    #[tokio::test]
    async fn chunked_answers_are_decoded_and_the_connection_kept() {
        let (target, seen) = raw_server(
            b"HTTP/1.1 201 Created\r\nX-One: a\r\nx-one: b\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: x\r\n\r\n",
            false,
        )
        .await;
        let pool = Pool::default();
        for _ in 0..2 {
            let answer = pool.send(&target, get(), 1024).await.unwrap();
            assert_eq!(answer.status, 201);
            assert_eq!(&answer.body[..], b"hello world");
            let ones: Vec<_> = answer
                .headers
                .iter()
                .filter(|(n, _)| n == "x-one")
                .collect();
            assert_eq!(ones.len(), 2);
        }
        assert_eq!(seen.lock().unwrap().len(), 2);
        let err = pool.send(&target, get(), 8).await.err().unwrap();
        assert!(matches!(err, SendError::TooLarge), "{err}");
    }

    #[tokio::test]
    async fn head_answers_have_no_body_and_close_ends_the_body() {
        let (target, _) = raw_server(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", false).await;
        let pool = Pool::default();
        let answer = pool
            .send(&target, Outgoing::new("HEAD", "/").unwrap(), 1024)
            .await
            .unwrap();
        assert!(answer.body.is_empty());
        let (target, _) = raw_server(b"HTTP/1.1 200 OK\r\n\r\nuntil close", true).await;
        let answer = pool.send(&target, get(), 1024).await.unwrap();
        assert_eq!(&answer.body[..], b"until close");
    }

    #[tokio::test]
    async fn a_connection_the_runtime_closed_is_not_reused() {
        // Answers with a length, then closes: the shelved connection is dead when taken out.
        let (target, seen) =
            raw_server(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", true).await;
        let pool = Pool::default();
        for _ in 0..3 {
            let answer = pool.send(&target, get(), 1024).await.unwrap();
            assert_eq!(&answer.body[..], b"ok");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(seen.lock().unwrap().len(), 3);
    }

    #[test]
    fn headers_that_could_inject_are_left_out() {
        let mut request = get();
        assert!(request.header("x-ok", "a value\twith tab"));
        assert!(!request.header("x-bad", "a\r\nx-injected: 1"));
        assert!(!request.header("bad name", "v"));
        assert!(!request.header("x-utf8", "é"));
        let (head, _, _) = request.body(Bytes::from_static(b"{}")).finish("rt:3000");
        let text = String::from_utf8(head).unwrap();
        assert_eq!(
            text,
            "GET / HTTP/1.1\r\nx-ok: a value\twith tab\r\nhost: rt:3000\r\ncontent-length: 2\r\n\r\n{}"
        );
        assert!(Outgoing::new("GET", "/a b").is_err());
        assert!(Outgoing::new("GET", "/é").is_err());
    }
}
