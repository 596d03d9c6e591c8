//! The one shared client to executors: keep-alive HTTP/1.1 connections, each driven by the call
//! that uses it and then by the response body it streams back (`hearth-conn`), so a call and
//! its answer stay in the task serving the client's request: no connection task, no channel hop
//! per call or per chunk. TCP keep-alive on every connection notices a vanished executor host.

use std::sync::Arc;
use std::time::Duration;

use hearth_conn::{Conn, Driven, Shelf};
use http::{HeaderValue, Request, Response, Uri};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::proxy::{BoxError, ProxyBody};

/// Idle connections kept per executor.
const MAX_IDLE_PER_HOST: usize = 256;
/// An idle connection older than this is closed rather than reused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

type Io = TokioIo<TcpStream>;

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

pub struct Client {
    connect_timeout: Duration,
    /// Idle connections by serving thread ([`crate::worker`]: a connection is registered with
    /// the runtime of the thread that opened it) and `host:port`.
    shelf: Arc<Shelf<(usize, Arc<str>), Io, ProxyBody>>,
}

impl Client {
    pub fn new(connect_timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            connect_timeout,
            shelf: Arc::new(Shelf::new(IDLE_TIMEOUT, MAX_IDLE_PER_HOST)),
        })
    }

    /// [`Client::send`] for a request with an absolute URI (`http://host:port/path`).
    pub async fn request(
        &self,
        request: Request<ProxyBody>,
    ) -> Result<Response<ProxyBody>, ClientError> {
        let (mut parts, body) = request.into_parts();
        let authority: Arc<str> = parts
            .uri
            .authority()
            .map(|a| a.as_str().into())
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
        &self,
        authority: &Arc<str>,
        mut request: Request<ProxyBody>,
    ) -> Result<Response<ProxyBody>, ClientError> {
        if !request.headers().contains_key(http::header::HOST) {
            let host = HeaderValue::from_str(authority)
                .map_err(|err| ClientError::Invalid(err.to_string()))?;
            request.headers_mut().insert(http::header::HOST, host);
        }
        let key = (crate::worker(), authority.clone());
        let (response, conn) = self
            .shelf
            .send(&key, request, || self.connect(authority))
            .await
            .map_err(|err| match err {
                hearth_conn::SendError::Connect(err) => err,
                hearth_conn::SendError::Closed(err) => {
                    ClientError::Connect(format!("the executor closed the connection: {err}"))
                }
                hearth_conn::SendError::Failed(err) => ClientError::Failed(err),
            })?;
        let (head, body) = response.into_parts();
        let body = Driven::new(body, conn, self.shelf.clone(), key);
        Ok(Response::from_parts(
            head,
            body.map_err(BoxError::from).boxed_unsync(),
        ))
    }

    async fn connect(&self, authority: &str) -> Result<Conn<Io, ProxyBody>, ClientError> {
        let stream = crate::wire::conns::connect(authority, self.connect_timeout)
            .await
            .map_err(ClientError::Connect)?;
        Conn::handshake(TokioIo::new(stream), "tcp")
            .await
            .map_err(|err| ClientError::Connect(format!("failed to open {authority}: {err}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use hyper::service::service_fn;

    /// An executor stand-in on loopback that echoes the `host` header it got.
    async fn server() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let service = service_fn(|request: Request<hyper::body::Incoming>| async move {
                    let host = request.headers()[http::header::HOST].clone();
                    Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(
                        Bytes::copy_from_slice(host.as_bytes()),
                    )))
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        format!("http://{addr}")
    }

    fn get(url: &str) -> Request<ProxyBody> {
        Request::get(format!("{url}/v1/health"))
            .body(crate::proxy::full(Bytes::new()))
            .unwrap()
    }

    #[tokio::test]
    async fn absolute_uris_go_to_their_host_with_its_host_header() {
        let url = server().await;
        let client = Client::new(Duration::from_secs(1));
        for _ in 0..2 {
            let response = client.request(get(&url)).await.unwrap();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, url.trim_start_matches("http://").as_bytes());
        }
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
