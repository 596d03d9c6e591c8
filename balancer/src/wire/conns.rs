//! Plain TCP connections to one executor for the forwarding path: opened with a timeout,
//! `TCP_NODELAY` and TCP keep-alive, and shelved idle with their read buffer between calls.

use std::time::Duration;

use bytes::BytesMut;
use hearth_conn::Idle;
use tokio::net::TcpStream;

/// Idle connections kept per executor and serving thread.
const MAX_IDLE: usize = 256;
/// An idle connection older than this is closed rather than reused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// TCP keep-alive on every connection, so a vanished executor host is noticed.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);
/// The read buffer a connection starts with.
const BUFFER: usize = 8 * 1024;

/// Opens a TCP connection to `authority` (`host:port`) within `timeout`.
pub async fn connect(authority: &str, timeout: Duration) -> Result<TcpStream, String> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(authority))
        .await
        .map_err(|_| format!("connecting to {authority} timed out"))?
        .map_err(|err| format!("failed to connect to {authority}: {err}"))?;
    let _ = stream.set_nodelay(true);
    let keepalive = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE);
    let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
    Ok(stream)
}

/// One connection and what was read from it but not yet used.
pub struct Conn {
    pub stream: TcpStream,
    pub buf: BytesMut,
}

impl Conn {
    pub fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            buf: BytesMut::with_capacity(BUFFER),
        }
    }
}

/// Idle connections to one executor, newest last, kept per serving thread
/// ([`crate::worker`]): a connection is registered with the runtime of the thread that opened
/// it, so it is only reused there.
pub struct Shelf {
    idle: Idle<usize, Conn>,
}

impl Default for Shelf {
    fn default() -> Self {
        Self {
            idle: Idle::new(IDLE_TIMEOUT, MAX_IDLE),
        }
    }
}

impl std::fmt::Debug for Shelf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Shelf")
    }
}

impl Shelf {
    /// This thread's newest idle connection the executor has not closed meanwhile.
    pub fn take(&self) -> Option<Conn> {
        self.idle.take(&crate::worker(), |conn| {
            // An open idle connection has nothing to read; a closed one reads its end (0).
            let mut probe = [0u8; 1];
            matches!(conn.stream.try_read(&mut probe), Err(err) if err.kind() == std::io::ErrorKind::WouldBlock)
        })
    }

    /// Shelves a connection whose last response was read to its end and nothing more.
    pub fn put(&self, mut conn: Conn) {
        conn.buf.clear();
        self.idle.put(&crate::worker(), conn);
    }
}
