//! The server side the balancer and the executor share: the accept loop that drains its
//! connections on shutdown ([`accept_until`]), and the hand-over of a connection from a
//! hand-written HTTP/1.1 path to hyper's server, with the bytes already read ([`serve_rest`]).

use std::future::Future;
use std::pin::pin;
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Incoming};
use hyper::server::conn::http1;
use hyper::service::HttpService;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use crate::Rewind;

/// Accepts connections until `shutdown` resolves and serves each in a task of its own with
/// `serve(stream, stopping)`; `stopping` turns true at shutdown, when a connection should end
/// after its call in flight. Then waits for every connection to end, up to `grace`; returns
/// whether all did.
pub async fn accept_until<F, Fut>(
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
    serve: F,
) -> bool
where
    F: Fn(TcpStream, watch::Receiver<bool>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (stop, stopping) = watch::channel(false);
    // Every connection holds a sender; when the last is gone, all have ended.
    let (live, mut drained) = mpsc::channel::<()>(1);
    let mut shutdown = pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Answers are written whole; do not let Nagle hold the last segment back.
        let _ = stream.set_nodelay(true);
        let connection = serve(stream, stopping.clone());
        let live = live.clone();
        tokio::spawn(async move {
            connection.await;
            drop(live);
        });
    }
    drop(listener);
    let _ = stop.send(true);
    drop(live);
    tokio::time::timeout(grace, drained.recv()).await.is_ok()
}

/// Serves the rest of a connection on hyper's HTTP/1.1 server, starting with `read` (what the
/// hand-written path had read of it); at `shutdown`, ends it gracefully.
pub async fn serve_rest<S>(
    http: &http1::Builder,
    stream: TcpStream,
    read: Bytes,
    service: S,
    mut shutdown: watch::Receiver<bool>,
) where
    S: HttpService<Incoming>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::ResBody: 'static,
    <S::ResBody as Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let io = TokioIo::new(Rewind::new(read, stream));
    let mut connection = pin!(http.serve_connection(io, service));
    let ended = tokio::select! {
        ended = connection.as_mut() => ended,
        _ = shutdown.changed() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(err) = ended {
        tracing::debug!(error = %err, "client connection ended with an error");
    }
}
