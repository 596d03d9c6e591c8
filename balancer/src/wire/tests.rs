//! The front against a loopback executor stand-in: executions on the forwarding path, the switch
//! to the general path on the same connection, pipelining, chunked answers, failures.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::config::Config;
use crate::proxy::BoxError;
use crate::service::Balancer;

type Body = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// What the stand-in answers: health, a 404 for every get (it holds no runtime), and to an execution of runtime `id`: `chunked` streams three frames,
/// `drop` closes the connection unanswered, anything else echoes what it got as JSON. It
/// counts executions.
async fn answer(
    request: Request<Incoming>,
    calls: Arc<AtomicUsize>,
) -> Result<Response<Body>, BoxError> {
    let path = request.uri().path().to_string();
    if path == "/v1/health" {
        return Ok(Response::new(
            Full::new(Bytes::from("OK")).map_err(Into::into).boxed(),
        ));
    }
    if request.method() == http::Method::GET {
        // Lookups and gets: this stand-in holds no runtime.
        let mut response = Response::new(Full::new(Bytes::from("{}")).map_err(Into::into).boxed());
        *response.status_mut() = http::StatusCode::NOT_FOUND;
        return Ok(response);
    }
    calls.fetch_add(1, Ordering::SeqCst);
    if path == "/v1/runtimes/drop/executions" {
        return Err("dropped".into());
    }
    if path == "/v1/runtimes/chunked/executions" {
        let frames =
            ["one,", "two,", "three"].map(|f| Ok::<_, BoxError>(Frame::data(Bytes::from(f))));
        let body = StreamBody::new(futures_util::stream::iter(frames));
        return Ok(Response::new(body.boxed()));
    }
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap_or("").to_string())
    };
    let seen = serde_json::json!({
        "method": request.method().as_str(),
        "path": path,
        "host": header("host"),
        "custom": header("x-custom"),
        "keep_alive": header("keep-alive"),
        "connection": header("connection"),
    });
    let body = request.into_body().collect().await?.to_bytes();
    let text = format!(
        "{{\"seen\":{seen},\"body\":{:?}}}",
        String::from_utf8_lossy(&body)
    );
    let mut response = Response::new(Full::new(Bytes::from(text)).map_err(Into::into).boxed());
    response
        .headers_mut()
        .insert("keep-alive", "timeout=5".parse()?);
    Ok(response)
}

/// An executor stand-in on loopback; returns its address and its count of calls.
async fn executor() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let calls = counted.clone();
            let service = service_fn(move |request| answer(request, calls.clone()));
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    (addr, calls)
}

/// A balancer in front of `executors`, served on loopback; returns its address.
async fn balancer(
    executors: Vec<String>,
    tune: impl FnOnce(&mut Config),
) -> (SocketAddr, Arc<Balancer>) {
    let mut config = Config::for_tests(executors, "secret");
    tune(&mut config);
    let balancer = Balancer::new(config).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(crate::run(
        balancer.clone(),
        listener,
        std::future::pending(),
    ));
    (addr, balancer)
}

fn execution(id: &str, extra: &str, body: &str) -> String {
    format!(
        "POST /v1/runtimes/{id}/executions HTTP/1.1\r\nHost: balancer\r\n{extra}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// Reads `n` whole responses (content-length or chunked) from `stream`: (status, head, body).
async fn responses(stream: &mut TcpStream, n: usize) -> Vec<(u16, String, String)> {
    let mut buf = Vec::new();
    let mut out = Vec::new();
    while out.len() < n {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut parsed = httparse::Response::new(&mut headers);
        if let Ok(httparse::Status::Complete(head_len)) = parsed.parse(&buf) {
            let status = parsed.code.unwrap();
            let head = String::from_utf8_lossy(&buf[..head_len]).to_lowercase();
            let length = parsed
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .map(|h| {
                    std::str::from_utf8(h.value)
                        .unwrap()
                        .parse::<usize>()
                        .unwrap()
                });
            let rest = &buf[head_len..];
            let whole = match length {
                Some(len) if rest.len() >= len => Some((
                    String::from_utf8_lossy(&rest[..len]).to_string(),
                    head_len + len,
                )),
                Some(_) => None,
                None => {
                    let mut chunks = super::framing::Chunks::default();
                    chunks
                        .scan(rest)
                        .unwrap()
                        .map(|end| (dechunk(&rest[..end]), head_len + end))
                }
            };
            if let Some((body, used)) = whole {
                out.push((status, head, body));
                buf.drain(..used);
                continue;
            }
        }
        let mut more = [0u8; 4096];
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut more))
            .await
            .expect("the balancer did not answer")
            .unwrap();
        assert!(
            read > 0,
            "closed after {} responses: {:?}",
            out.len(),
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&more[..read]);
    }
    out
}

fn dechunk(mut raw: &[u8]) -> String {
    let mut out = String::new();
    loop {
        let line = raw.windows(2).position(|w| w == b"\r\n").unwrap();
        let size = usize::from_str_radix(std::str::from_utf8(&raw[..line]).unwrap(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.push_str(std::str::from_utf8(&raw[line + 2..line + 2 + size]).unwrap());
        raw = &raw[line + 4 + size..];
    }
}

/// Waits until the peer closes `stream` (what it sent meanwhile is returned).
async fn closed(stream: &mut TcpStream) -> String {
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest))
        .await
        .expect("the balancer kept the connection open")
        .unwrap();
    String::from_utf8_lossy(&rest).to_string()
}

#[tokio::test]
async fn executions_go_as_bytes_and_the_connection_then_moves_to_the_general_path() {
    let (executor, calls) = executor().await;
    let (addr, balancer) = balancer(vec![format!("http://{executor}")], |_| {}).await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    // Two executions pipelined in one write, hop-by-hop headers that must not go on.
    let extra =
        "Connection: keep-alive\r\nKeep-Alive: timeout=9\r\nTE: trailers\r\nX-Custom: 1\r\n";
    let two = execution("fn-a", extra, "{\"path\":\"/a\"}") + &execution("fn-b", "", "");
    stream.write_all(two.as_bytes()).await.unwrap();
    let answers = responses(&mut stream, 2).await;
    let (status, head, body) = &answers[0];
    assert_eq!(*status, 200, "{body}");
    assert!(!head.contains("keep-alive"), "{head}");
    let seen: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(seen["seen"]["host"], executor.to_string());
    assert_eq!(seen["seen"]["custom"], "1");
    assert_eq!(seen["seen"]["keep_alive"], serde_json::Value::Null);
    assert_eq!(seen["seen"]["path"], "/v1/runtimes/fn-a/executions");
    assert_eq!(seen["body"], "{\"path\":\"/a\"}");
    let seen: serde_json::Value = serde_json::from_str(&answers[1].2).unwrap();
    assert_eq!(seen["seen"]["path"], "/v1/runtimes/fn-b/executions");
    // A chunked answer comes back whole, and the connection goes on.
    stream
        .write_all(execution("chunked", "", "").as_bytes())
        .await
        .unwrap();
    let answers = responses(&mut stream, 1).await;
    assert!(
        answers[0].1.contains("transfer-encoding: chunked"),
        "{}",
        answers[0].1
    );
    assert_eq!(answers[0].2, "one,two,three");
    // Another route: hyper serves the rest of this connection, executions included.
    let get = "GET /v1/runtimes/fn-a HTTP/1.1\r\nHost: balancer\r\n\r\n";
    let after = execution("fn-c", "", "{}");
    stream.write_all(get.as_bytes()).await.unwrap();
    stream.write_all(after.as_bytes()).await.unwrap();
    let answers = responses(&mut stream, 2).await;
    assert_eq!(answers[0].0, 404, "{}", answers[0].2);
    let seen: serde_json::Value = serde_json::from_str(&answers[1].2).unwrap();
    assert_eq!(seen["seen"]["path"], "/v1/runtimes/fn-c/executions");
    // Executions place their runtime, and the executor saw every call once.
    let metrics = balancer.metrics.render(1, 1);
    assert!(
        metrics.contains(&format!(
            "executor=\"http://{executor}\",outcome=\"2xx\"}} 4"
        )),
        "{metrics}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 4);
    // `Connection: close` is honoured.
    let mut fresh = TcpStream::connect(addr).await.unwrap();
    fresh
        .write_all(execution("fn-d", "Connection: close\r\n", "").as_bytes())
        .await
        .unwrap();
    let answers = responses(&mut fresh, 1).await;
    assert!(
        answers[0].1.contains("connection: close"),
        "{}",
        answers[0].1
    );
    assert_eq!(closed(&mut fresh).await, "");
}

#[tokio::test]
async fn failures_are_the_apis_errors() {
    let (executor, calls) = executor().await;
    let (addr, _balancer) = balancer(vec![format!("http://{executor}")], |config| {
        config.body_idle_timeout = 0.3;
        config.probe_interval = 60.0;
    })
    .await;
    // The executor drops the call: a 502, sent once, and the connection stays usable.
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let before = calls.load(Ordering::SeqCst);
    stream
        .write_all(execution("drop", "", "{}").as_bytes())
        .await
        .unwrap();
    let answers = responses(&mut stream, 1).await;
    assert_eq!(answers[0].0, 502, "{}", answers[0].2);
    assert!(
        answers[0].2.contains("balancer_upstream_failed"),
        "{}",
        answers[0].2
    );
    assert_eq!(calls.load(Ordering::SeqCst) - before, 1);
    stream
        .write_all(execution("fn-a", "", "{}").as_bytes())
        .await
        .unwrap();
    assert_eq!(responses(&mut stream, 1).await[0].0, 200);
    // A body that stops coming: 400 after the body idle timeout, then closed.
    let stalled = "POST /v1/runtimes/fn-a/executions HTTP/1.1\r\nContent-Length: 10\r\n\r\n{\"pa";
    stream.write_all(stalled.as_bytes()).await.unwrap();
    let rest = closed(&mut stream).await;
    assert!(rest.starts_with("HTTP/1.1 400"), "{rest}");
    assert!(rest.contains("execution_bad_request"), "{rest}");
}

#[tokio::test]
async fn a_refused_connect_moves_the_execution_to_the_next_executor() {
    let (live, _calls) = executor().await;
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let (addr, balancer) = balancer(
        vec![format!("http://{dead}"), format!("http://{live}")],
        |config| config.probe_interval = 60.0,
    )
    .await;
    // A runtime whose home is the dead executor.
    let dead_url = format!("http://{dead}");
    while balancer.pool.all().len() < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let all = balancer.pool.all();
    let id = (0..)
        .map(|i| format!("fn-{i}"))
        .find(|id| crate::routing::ranked(id, &all)[0].url == dead_url)
        .unwrap();
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(execution(&id, "", "{}").as_bytes())
        .await
        .unwrap();
    let answers = responses(&mut stream, 1).await;
    assert_eq!(answers[0].0, 200, "{}", answers[0].2);
    let metrics = balancer.metrics.render(1, 2);
    assert!(
        metrics.contains("outcome=\"connect_error\"} 1"),
        "{metrics}"
    );
}

/// `main`'s way of serving: one thread per listening socket (`SO_REUSEPORT`), each with its own
/// runtime and idle executor connections; every connection is served, whichever thread took it,
/// and shutdown ends every thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serving_threads_share_the_port_and_all_stop_at_shutdown() {
    let (executor, calls) = executor().await;
    let config = Config::for_tests(vec![format!("http://{executor}")], "secret");
    let balancer = Balancer::new(config).unwrap();
    let listeners = crate::listeners("127.0.0.1:0".parse().unwrap(), 3).unwrap();
    let addr = listeners[0].local_addr().unwrap();
    assert!(listeners.iter().all(|l| l.local_addr().unwrap() == addr));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = std::thread::spawn(move || {
        crate::serve_threads(balancer, listeners, async move {
            let _ = stopped.await;
        })
    });
    // Sixteen keep-alive clients, three executions each, then a route of the general path.
    let clients = (0..16).map(|i| async move {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        for round in 0..3 {
            let body = format!("{{\"client\":{i},\"round\":{round}}}");
            let call = execution(&format!("fn-{i}"), "", &body);
            stream.write_all(call.as_bytes()).await.unwrap();
            let answers = responses(&mut stream, 1).await;
            assert_eq!(answers[0].0, 200, "{}", answers[0].2);
            let seen: serde_json::Value = serde_json::from_str(&answers[0].2).unwrap();
            assert_eq!(seen["body"], body);
        }
        let get = "GET /nowhere HTTP/1.1\r\nHost: balancer\r\n\r\n";
        stream.write_all(get.as_bytes()).await.unwrap();
        let answers = responses(&mut stream, 1).await;
        assert_eq!(answers[0].0, 404, "{}", answers[0].2);
    });
    futures_util::future::join_all(clients).await;
    assert_eq!(calls.load(Ordering::SeqCst), 48);
    stop.send(()).unwrap();
    let joined = tokio::task::spawn_blocking(move || serving.join().unwrap());
    let result = tokio::time::timeout(Duration::from_secs(10), joined)
        .await
        .expect("a serving thread did not stop")
        .unwrap();
    assert!(result.is_ok(), "{result:?}");
    // Every socket is closed: nothing accepts on the port any more.
    assert!(TcpStream::connect(addr).await.is_err());
}
