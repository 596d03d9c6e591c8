//! The server in process: a temp function directory, port 0, real HTTP.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hearth_wasm_runtime::server::{self, Config, Service};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::testdata;

/// A running server and the directory it reads; shuts down when dropped.
struct TestServer {
    url: String,
    dir: PathBuf,
    /// The same server on a Unix socket (runtimes/socket.md).
    socket: PathBuf,
    _stop: oneshot::Sender<()>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn start(module: &str, max_instances: u32) -> TestServer {
    let dir = std::env::temp_dir().join(format!(
        "hearth-wasm-test-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(dir.join("logs")).unwrap();
    std::fs::write(dir.join(module), testdata(module)).unwrap();
    let mut config = Config::new(module);
    config.function_dir = dir.clone();
    config.logs_dir = dir.join("logs");
    config.timings_file = dir.join("timings.txt");
    config.max_instances = max_instances;
    config.memory_limit = 16 << 20;
    let service: Arc<Service> = Service::load(config).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let socket = dir.join("hearth.sock");
    let unix = server::bind_unix_socket(&socket);
    assert!(unix.is_some(), "no Unix socket at {}", socket.display());
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(server::serve(service, listener, unix, async move {
        let _ = stopped.await;
    }));
    TestServer {
        url,
        dir,
        socket,
        _stop: stop,
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn log_file(dir: &Path, id: &str, kind: &str) -> String {
    let path = dir.join("logs").join(format!("{id}_{kind}.log"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| {
        let listing: Vec<_> = std::fs::read_dir(dir.join("logs"))
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
            .unwrap_or_default();
        panic!("{}: {e}; logs dir holds {listing:?}", path.display())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unix_socket_serves_the_same_requests_with_keep_alive() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = start("hello.wat", 4).await;
    // An earlier socket file at the path (a restarted container) is replaced, not an error.
    assert!(server::bind_unix_socket(&server.socket).is_some());
    let server = start("hello.wat", 4).await;
    let mut stream = tokio::net::UnixStream::connect(&server.socket)
        .await
        .unwrap();
    let request = "POST / HTTP/1.1\r\nhost: runtime\r\ncontent-length: 0\r\n\r\n";
    for _ in 0..2 {
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        while !String::from_utf8_lossy(&answer).ends_with("Hello from WebAssembly!") {
            let mut buf = [0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
                .await
                .expect("the answer came in time")
                .unwrap();
            assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&answer));
            answer.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&answer);
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("x-open-runtimes-log-id: "), "{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_requests_all_succeed() {
    let server = start("hello.wat", 16).await;
    let client = reqwest::Client::new();
    let calls = (0..100).map(|_| {
        let client = client.clone();
        let url = format!("{}/", server.url);
        tokio::spawn(async move { client.post(url).send().await?.text().await })
    });
    for call in futures_join(calls).await {
        assert_eq!(call.unwrap().unwrap(), "Hello from WebAssembly!");
    }
}

async fn futures_join<T: Send + 'static>(
    handles: impl Iterator<Item = tokio::task::JoinHandle<T>>,
) -> Vec<Result<T, tokio::task::JoinError>> {
    let mut out = Vec::new();
    for handle in handles.collect::<Vec<_>>() {
        out.push(handle.await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_looping_guest_is_a_500_and_the_server_keeps_serving() {
    let server = start("loop.wat", 4).await;
    let client = reqwest::Client::new();
    let res = client
        .post(format!("{}/", server.url))
        .header("x-open-runtimes-timeout", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 500);
    let id = res.headers()["x-open-runtimes-log-id"]
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(res.text().await.unwrap(), "");
    assert!(log_file(&server.dir, &id, "errors").contains("Execution timed out."));
    // Still serving: health and a second (also timed-out) call answer.
    let health = client
        .get(format!("{}/__opr/health", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.text().await.unwrap(), "OK");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trap_and_out_of_memory_are_500_with_the_reason_logged() {
    for (module, reason) in [("trap.wat", "unreachable"), ("grow.wat", "memory")] {
        let server = start(module, 4).await;
        let client = reqwest::Client::new();
        for _ in 0..2 {
            let res = client
                .post(format!("{}/", server.url))
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 500, "{module}");
            let id = res.headers()["x-open-runtimes-log-id"]
                .to_str()
                .unwrap()
                .to_string();
            let errors = log_file(&server.dir, &id, "errors");
            assert!(errors.contains(reason), "{module}: {errors}");
            assert!(errors.contains(module), "{module}: {errors}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_does_not_leak_between_requests() {
    let server = start("state.wat", 4).await;
    let client = reqwest::Client::new();
    for _ in 0..3 {
        let res = client
            .post(format!("{}/", server.url))
            .send()
            .await
            .unwrap();
        assert_eq!(res.text().await.unwrap(), "11");
    }
    let _ = Duration::ZERO;
}
