//! Plain TCP connections to one executor for the forwarding path: opened with a timeout,
//! `TCP_NODELAY` and TCP keep-alive, and shelved idle with their read buffer between calls.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::net::TcpStream;

/// Idle connections kept per executor.
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

/// Idle connections are kept apart for this many serving threads (more share slots).
const SLOTS: usize = 16;

type Slot = Mutex<Vec<(Conn, Instant)>>;

/// Idle connections to one executor, newest last, kept per serving thread
/// ([`crate::worker`]): a connection is registered with the runtime of the thread that opened
/// it, so it is only reused there.
pub struct Shelf {
    slots: [Slot; SLOTS],
}

impl Default for Shelf {
    fn default() -> Self {
        Self {
            slots: std::array::from_fn(|_| Mutex::default()),
        }
    }
}

impl std::fmt::Debug for Shelf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Shelf")
    }
}

impl Shelf {
    fn slot(&self) -> std::sync::MutexGuard<'_, Vec<(Conn, Instant)>> {
        match self.slots[crate::worker() % SLOTS].lock() {
            Ok(idle) => idle,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// This thread's newest idle connection the executor has not closed meanwhile.
    pub fn take(&self) -> Option<Conn> {
        loop {
            let (conn, since) = self.slot().pop()?;
            if since.elapsed() > IDLE_TIMEOUT {
                continue;
            }
            // An open idle connection has nothing to read; a closed one reads its end (0).
            let mut probe = [0u8; 1];
            match conn.stream.try_read(&mut probe) {
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => return Some(conn),
                _ => continue,
            }
        }
    }

    /// Shelves a connection whose last response was read to its end and nothing more.
    pub fn put(&self, mut conn: Conn) {
        conn.buf.clear();
        let mut idle = self.slot();
        if idle.len() < MAX_IDLE {
            idle.push((conn, Instant::now()));
        }
    }
}
