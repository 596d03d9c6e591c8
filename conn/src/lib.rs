//! Keep-alive HTTP/1.1 client connections, each driven by the task that uses it: the balancer's
//! calls to executors on its general path. (The executor's calls to runtimes and the balancer's
//! forwarded executions are written and read by hand, in `executor/src/invoke/conn.rs` and
//! `balancer/src/wire/`.)
//!
//! hyper's pooled client runs every connection in a task of its own: a call hands its request to
//! that task over a channel and sleeps until the task wakes it with the answer, and every chunk
//! of a streamed answer comes back the same way: task switches, often across threads, on every
//! call. Here the calling task polls the connection itself: while it waits for the response head
//! ([`Shelf::send`]), then inside the response body ([`Driven`]) while the answer is read. When
//! the body ends, the connection goes back on its [`Shelf`]; a body dropped before its end closes
//! it. Idle connections are not polled at all: one the peer closed in the meantime is noticed
//! when it is taken out, and a request that never left is sent again on a new connection.
//!
//! - [`Conn`]: one connection, the handle requests go in by and the state machine that moves them;
//! - [`Shelf`]: idle connections by key ([`Idle`]: an idle timeout and a cap per key);
//! - [`Driven`]: the response body that keeps its connection moving and shelves it at its end;
//! - [`Rewind`]: a server connection handed to hyper with the bytes already read from it (the
//!   balancer's and the executor's own HTTP/1.1 paths);
//! - [`server`]: the accept loop with its drain, and the hand-over to hyper's server, both shared
//!   by the balancer and the executor.

mod idle;
mod rewind;
pub mod server;

pub use idle::Idle;
pub use rewind::Rewind;

use std::future::{poll_fn, Future};
use std::hash::Hash;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, Connection, SendRequest};
use hyper::client::conn::TrySendError;
use hyper::rt::{Read, Write};

type Driver<IO, B> = Pin<Box<Connection<IO, B>>>;

/// One connection: the handle requests go in by, and the state machine that moves them (`None`
/// once it finished: dropping it fails whatever still waits on it).
pub struct Conn<IO, B>
where
    IO: Read + Write + Unpin + Send + 'static,
    B: Body + 'static,
{
    sender: SendRequest<B>,
    driver: Option<Driver<IO, B>>,
    transport: &'static str,
}

impl<IO, B> Conn<IO, B>
where
    IO: Read + Write + Unpin + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// Opens HTTP/1.1 on `io`; `transport` names what it runs over, for metrics ("tcp", "unix").
    pub async fn handshake(io: IO, transport: &'static str) -> hyper::Result<Self> {
        let (sender, driver) = http1::handshake(io).await?;
        Ok(Self {
            sender,
            driver: Some(Box::pin(driver)),
            transport,
        })
    }

    pub fn transport(&self) -> &'static str {
        self.transport
    }

    fn is_open(&self) -> bool {
        self.driver.is_some() && !self.sender.is_closed()
    }

    /// Waits until the connection takes a request, sends it and waits for the response head,
    /// moving the connection meanwhile.
    async fn round_trip(
        &mut self,
        request: Request<B>,
    ) -> Result<Response<Incoming>, TrySendError<Request<B>>> {
        let Conn { sender, driver, .. } = self;
        alongside(driver, async {
            // A closed connection fails `ready`; `try_send_request` then hands the request back.
            let _ = sender.ready().await;
            sender.try_send_request(request).await
        })
        .await
    }

    /// Runs `future` (reading a response body whole, say) while keeping the connection moving.
    pub async fn drive<F: Future>(&mut self, future: F) -> F::Output {
        alongside(&mut self.driver, future).await
    }

    /// One poll without a waker: takes in what the peer sent while nobody polled (an end of
    /// stream finishes the driver). True when the connection can take another request.
    fn refresh(&mut self) -> bool {
        if let Some(driver) = self.driver.as_mut() {
            if driver.as_mut().now_or_never().is_some() {
                self.driver = None;
            }
        }
        self.is_open()
    }
}

/// Runs `future` while polling the connection's state machine. The driver's progress (the
/// request written, the head or body read) is usually what the future waits for, so after
/// polling the driver the future is looked at again at once rather than after a wake-up.
async fn alongside<IO, B, F>(driver: &mut Option<Driver<IO, B>>, future: F) -> F::Output
where
    IO: Read + Write + Unpin + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    F: Future,
{
    let mut future = pin!(future);
    poll_fn(|cx| {
        if let Poll::Ready(out) = future.as_mut().poll(cx) {
            return Poll::Ready(out);
        }
        poll_driver(driver, cx);
        future.as_mut().poll(cx)
    })
    .await
}

/// Polls the connection's state machine; drops it once it finished (the peer closed the
/// connection), which ends whatever still waits on it.
fn poll_driver<IO, B>(driver: &mut Option<Driver<IO, B>>, cx: &mut Context<'_>)
where
    IO: Read + Write + Unpin + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    if let Some(running) = driver.as_mut() {
        if running.as_mut().poll(cx).is_ready() {
            *driver = None;
        }
    }
}

/// Why [`Shelf::send`] failed.
#[derive(Debug)]
pub enum SendError<E> {
    /// `connect` failed: nothing was sent.
    Connect(E),
    /// A new connection ended before the request left: nothing was sent.
    Closed(hyper::Error),
    /// The request may have reached the peer.
    Failed(hyper::Error),
}

/// Idle connections by key (a peer): at most `max_per_key` each, none older than `idle_timeout`.
pub struct Shelf<K, IO, B>
where
    IO: Read + Write + Unpin + Send + 'static,
    B: Body + 'static,
{
    idle: Idle<K, Conn<IO, B>>,
}

impl<K, IO, B> Shelf<K, IO, B>
where
    K: Hash + Eq + Clone,
    IO: Read + Write + Unpin + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    pub fn new(idle_timeout: Duration, max_per_key: usize) -> Self {
        Self {
            idle: Idle::new(idle_timeout, max_per_key),
        }
    }

    /// Sends `request` on an idle connection of `key`, else on a new one from `connect`, and
    /// waits for the response head. A request that a reused connection never sent (the peer had
    /// closed it) goes again on a new connection. Returns the head and the connection, which
    /// the response body needs ([`Driven`]). The caller bounds the time.
    pub async fn send<E, F, Fut>(
        &self,
        key: &K,
        mut request: Request<B>,
        connect: F,
    ) -> Result<(Response<Incoming>, Conn<IO, B>), SendError<E>>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<Conn<IO, B>, E>>,
    {
        loop {
            let (mut conn, reused) = match self.checkout(key) {
                Some(conn) => (conn, true),
                None => (connect().await.map_err(SendError::Connect)?, false),
            };
            match conn.round_trip(request).await {
                Ok(response) => return Ok((response, conn)),
                Err(mut err) => match err.take_message() {
                    Some(unsent) if reused => request = unsent,
                    Some(_) => return Err(SendError::Closed(err.into_error())),
                    None => return Err(SendError::Failed(err.into_error())),
                },
            }
        }
    }

    fn checkout(&self, key: &K) -> Option<Conn<IO, B>> {
        self.idle.take(key, Conn::refresh)
    }

    /// Puts a connection whose last response was read whole back on the shelf (if it is open
    /// and there is room).
    pub fn checkin(&self, key: &K, mut conn: Conn<IO, B>) {
        if conn.refresh() {
            self.idle.put(key, conn);
        }
    }
}

/// A response body that keeps its connection moving while it is read, and puts the connection
/// back on its shelf once it ended. Dropped before its end, it closes the connection.
pub struct Driven<K, IO, B>
where
    K: Hash + Eq + Clone,
    IO: Read + Write + Unpin + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    body: Incoming,
    /// `None` once shelved, or after an error (then it is closed).
    conn: Option<Conn<IO, B>>,
    shelf: Arc<Shelf<K, IO, B>>,
    key: K,
}

impl<K, IO, B> Driven<K, IO, B>
where
    K: Hash + Eq + Clone,
    IO: Read + Write + Unpin + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    pub fn new(body: Incoming, conn: Conn<IO, B>, shelf: Arc<Shelf<K, IO, B>>, key: K) -> Self {
        Self {
            body,
            conn: Some(conn),
            shelf,
            key,
        }
    }

    fn shelve(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.shelf.checkin(&self.key, conn);
        }
    }
}

impl<K, IO, B> Body for Driven<K, IO, B>
where
    K: Hash + Eq + Clone + Unpin,
    IO: Read + Write + Unpin + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
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
                Poll::Ready(Some(Err(err)))
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

impl<K, IO, B> Drop for Driven<K, IO, B>
where
    K: Hash + Eq + Clone,
    IO: Read + Write + Unpin + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
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
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::TokioIo;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    type TestShelf = Shelf<u16, TokioIo<TcpStream>, Full<Bytes>>;

    /// How the loopback server answers (default: sized bodies, connections kept).
    #[derive(Clone, Copy, Default)]
    struct Answers {
        /// In two chunks, the second a moment later (the body must keep its connection moving).
        chunked: bool,
        /// Close each connection after its first answer, without saying so.
        close_after: bool,
    }

    /// A loopback HTTP/1.1 server answering every request with `body`; counts its connections.
    async fn server(body: &'static str, answers: Answers) -> (u16, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(answer(stream, body, answers));
            }
        });
        (port, accepted)
    }

    async fn answer(mut stream: TcpStream, body: &'static str, answers: Answers) {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        while let Ok(n) = stream.read(&mut chunk).await {
            if n == 0 {
                return;
            }
            buf.extend_from_slice(&chunk[..n]);
            while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                buf.drain(..end + 4);
                let (first, rest) = body.split_at(body.len() / 2);
                let head = if answers.chunked {
                    format!(
                        "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{first}\r\n",
                        first.len()
                    )
                } else {
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    )
                };
                if stream.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                if answers.chunked {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    let tail = format!("{:x}\r\n{rest}\r\n0\r\n\r\n", rest.len());
                    if stream.write_all(tail.as_bytes()).await.is_err() {
                        return;
                    }
                }
                if answers.close_after {
                    return;
                }
            }
        }
    }

    async fn connect(port: u16) -> std::io::Result<Conn<TokioIo<TcpStream>, Full<Bytes>>> {
        let stream = TcpStream::connect(("127.0.0.1", port)).await?;
        Conn::handshake(TokioIo::new(stream), "tcp")
            .await
            .map_err(std::io::Error::other)
    }

    fn get() -> Request<Full<Bytes>> {
        Request::get("/")
            .header("host", "test")
            .body(Full::new(Bytes::new()))
            .unwrap()
    }

    /// One call: its body read through [`Driven`], which shelves the connection at the end.
    async fn call(shelf: &Arc<TestShelf>, port: u16) -> String {
        let (response, conn) = shelf.send(&port, get(), || connect(port)).await.unwrap();
        let body = Driven::new(response.into_body(), conn, shelf.clone(), port);
        let bytes = body.collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    fn shelf() -> Arc<TestShelf> {
        Arc::new(Shelf::new(Duration::from_secs(10), 8))
    }

    #[tokio::test]
    async fn streamed_and_sized_bodies_leave_the_connection_for_the_next_call() {
        for chunked in [false, true] {
            let answers = Answers {
                chunked,
                ..Answers::default()
            };
            let (port, accepted) = server("hello world", answers).await;
            let shelf = shelf();
            for _ in 0..4 {
                assert_eq!(call(&shelf, port).await, "hello world");
            }
            assert_eq!(accepted.load(Ordering::SeqCst), 1, "chunked {chunked}");
        }
    }

    #[tokio::test]
    async fn a_connection_the_peer_closed_is_replaced_and_the_request_sent_again() {
        let answers = Answers {
            close_after: true,
            ..Answers::default()
        };
        let (port, accepted) = server("again", answers).await;
        let shelf = shelf();
        for _ in 0..3 {
            assert_eq!(call(&shelf, port).await, "again");
            // Let the close reach this side before the next call takes the connection.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_body_dropped_half_read_closes_its_connection() {
        let answers = Answers {
            chunked: true,
            ..Answers::default()
        };
        let (port, accepted) = server("hello world", answers).await;
        let shelf = shelf();
        let (response, conn) = shelf.send(&port, get(), || connect(port)).await.unwrap();
        drop(Driven::new(response.into_body(), conn, shelf.clone(), port));
        assert_eq!(call(&shelf, port).await, "hello world");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn concurrent_calls_open_their_own_connections_and_shelve_them_all() {
        let (port, accepted) = server("many", Answers::default()).await;
        let shelf = shelf();
        let calls: Vec<_> = (0..6)
            .map(|_| {
                let shelf = shelf.clone();
                tokio::spawn(async move { call(&shelf, port).await })
            })
            .collect();
        for c in calls {
            assert_eq!(c.await.unwrap(), "many");
        }
        let opened = accepted.load(Ordering::SeqCst);
        assert!((1..=6).contains(&opened));
        for _ in 0..4 {
            call(&shelf, port).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), opened);
    }

    #[tokio::test]
    async fn a_failed_connect_is_returned_as_such() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let err = shelf()
            .send(&port, get(), || connect(port))
            .await
            .err()
            .unwrap();
        assert!(matches!(err, SendError::Connect(_)), "{err:?}");
    }
}
