//! Pool mode (`runtimes/pool-protocol.md`): a server started without a function and
//! specialised once over HTTP. In process on port 0, plus the real binary for what `main`
//! owns (the pool secret leaves the environment before anything can read it).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use hearth_wasm_runtime::engine::EngineBuilder;
use hearth_wasm_runtime::server::{self, Service};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::testdata;

const SECRET: &str = "pool-secret-5c1e9a";

/// A pool member and its temp directory (function/, logs/, timings.txt); stops when dropped.
struct Member {
    url: String,
    dir: PathBuf,
    _stop: Option<oneshot::Sender<()>>,
    child: Option<Child>,
}

impl Drop for Member {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn temp_dir() -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "hearth-wasm-pool-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(dir.join("function")).unwrap();
    std::fs::create_dir_all(dir.join("logs")).unwrap();
    dir
}

/// The environment of a pool container: the image's variables and the server's paths.
fn start_env(dir: &Path) -> Vec<(String, String)> {
    let path = |p: &str| dir.join(p).display().to_string();
    [
        ("HEARTH_WASM_FUNCTION_DIR", path("function")),
        ("HEARTH_WASM_LOGS_DIR", path("logs")),
        ("HEARTH_WASM_TIMINGS_FILE", path("timings.txt")),
        ("HEARTH_WASM_MAX_INSTANCES", "4".into()),
        ("OPEN_RUNTIMES_SECRET", "open_runtime_secret".into()),
        ("OPEN_RUNTIMES_ENV", "production".into()),
        ("OPEN_RUNTIMES_HEADERS", "{}".into()),
        ("IMAGE_VAR", "from-the-image".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

async fn start() -> Member {
    let dir = temp_dir();
    let service = Service::pool(start_env(&dir), SECRET.to_string()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(server::serve(service, listener, None, async move {
        let _ = stopped.await;
    }));
    Member {
        url,
        dir,
        _stop: Some(stop),
        child: None,
    }
}

/// A tar (or tar.gz) of `files`, as the build step packs its output directory.
fn archive(files: &[(String, Vec<u8>)], gzip: bool) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    for (name, bytes) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        tar.append_data(&mut header, format!("./{name}"), &bytes[..])
            .unwrap();
    }
    let tar = tar.into_inner().unwrap();
    if !gzip {
        return tar;
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, &tar).unwrap();
    gz.finish().unwrap()
}

/// `module` from testdata/ and its precompiled artifact, as `helpers/build.sh` leaves them.
fn built(module: &str, settings: &str) -> Vec<(String, Vec<u8>)> {
    let source = testdata(module).into_bytes();
    let engine = EngineBuilder::new().pooling(false).build().unwrap();
    let artifact = engine.precompile(module, &source).unwrap();
    vec![
        (module.to_string(), source),
        (format!("{module}.cwasm"), artifact),
        (".open-runtimes".to_string(), settings.as_bytes().to_vec()),
    ]
}

fn body(env: Value, code: &[u8]) -> String {
    json!({"env": env, "code": base64::engine::general_purpose::STANDARD.encode(code)}).to_string()
}

async fn specialise(url: &str, secret: Option<&str>, body: String) -> reqwest::Response {
    let mut req = reqwest::Client::new()
        .post(format!("{url}/__hearth/specialise"))
        .header("content-type", "application/json")
        .body(body);
    if let Some(secret) = secret {
        req = req.header("x-hearth-pool-secret", secret);
    }
    req.send().await.unwrap()
}

async fn message(res: reqwest::Response) -> String {
    let value: Value = res.json().await.unwrap();
    value["message"].as_str().unwrap().to_string()
}

fn hello_body(env: Value) -> String {
    body(env, &archive(&built("hello.wat", ""), true))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_before_specialisation_only_health_and_specialise_answer() {
    let member = start().await;
    let client = reqwest::Client::new();
    let health = client
        .get(format!("{}/__opr/health", member.url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    for (method, path) in [
        (reqwest::Method::GET, "/"),
        (reqwest::Method::POST, "/anything"),
        (reqwest::Method::GET, "/__opr/timings"),
    ] {
        let res = client
            .request(method, format!("{}{path}", member.url))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 503, "{path}");
        assert_eq!(message(res).await, "Runtime is not specialised yet.");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_secret_is_required_and_specialisation_runs_once() {
    let member = start().await;
    let res = specialise(&member.url, None, hello_body(json!({}))).await;
    assert_eq!(res.status(), 401);
    assert!(message(res).await.contains("x-hearth-pool-secret"));
    let res = specialise(
        &member.url,
        Some("pool-secret-5c1e9b"),
        hello_body(json!({})),
    )
    .await;
    assert_eq!(res.status(), 401);

    let res = specialise(&member.url, Some(SECRET), hello_body(json!({}))).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().await.unwrap(), r#"{"specialised":true}"#);

    let res = specialise(&member.url, Some(SECRET), hello_body(json!({}))).await;
    assert_eq!(res.status(), 409);
    assert!(!message(res).await.is_empty());
    let res = specialise(&member.url, Some("wrong"), hello_body(json!({}))).await;
    assert_eq!(res.status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_concurrent_specialisations_run_once() {
    let member = start().await;
    let (a, b) = tokio::join!(
        specialise(&member.url, Some(SECRET), hello_body(json!({}))),
        specialise(&member.url, Some(SECRET), hello_body(json!({}))),
    );
    let mut statuses = [a.status().as_u16(), b.status().as_u16()];
    statuses.sort();
    assert_eq!(statuses, [200, 409]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_bad_bodies_are_400_and_use_up_the_member() {
    let not_base64 = json!({"env": {}, "code": "%%% not base64"}).to_string();
    let not_archive = body(json!({}), b"this is no tar archive, not even a gzip one");
    let env_not_object = json!({"env": ["A=1"], "code": ""}).to_string();
    for bad in [
        "{not json".to_string(),
        not_base64,
        not_archive,
        env_not_object,
    ] {
        let member = start().await;
        let res = specialise(&member.url, Some(SECRET), bad.clone()).await;
        assert_eq!(res.status(), 400, "{bad}");
        assert!(!message(res).await.is_empty());
        let res = specialise(&member.url, Some(SECRET), hello_body(json!({}))).await;
        assert_eq!(res.status(), 409, "{bad}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_specialised_member_serves_like_a_fresh_start() {
    let member = start().await;
    // The build's `.open-runtimes` wins over the executor's entrypoint (start.sh's order).
    let code = archive(
        &built("hello.wat", "OPEN_RUNTIMES_ENTRYPOINT=hello.wat\n"),
        true,
    );
    let env = json!({
        "OPEN_RUNTIMES_SECRET": "function-secret",
        "OPEN_RUNTIMES_ENTRYPOINT": "index.wasm",
        "OPEN_RUNTIMES_MEMORY": "64",
    });
    let took = Instant::now();
    let res = specialise(&member.url, Some(SECRET), body(env, &code)).await;
    let took = took.elapsed();
    assert_eq!(res.status(), 200);
    eprintln!("specialise (hello, precompiled, over HTTP): {took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");

    let client = reqwest::Client::new();
    let res = client
        .post(format!("{}/", member.url))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 500);
    assert!(res.text().await.unwrap().contains("x-open-runtimes-secret"));
    for _ in 0..3 {
        let res = client
            .post(format!("{}/", member.url))
            .header("x-open-runtimes-secret", "function-secret")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.text().await.unwrap(), "Hello from WebAssembly!");
    }
    let timings = client
        .get(format!("{}/__opr/timings", member.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    eprintln!("timings in the server: {}", timings.replace('\n', " "));
    assert!(timings.starts_with("extract="), "{timings}");
    assert!(timings.contains("\nload="), "{timings}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_function_env_and_build_settings_reach_the_guest() {
    let member = start().await;
    let code = archive(
        &built(
            "env.wat",
            "OPEN_RUNTIMES_ENTRYPOINT=env.wat\nBUILD_VAR=built\\ value\n",
        ),
        false,
    );
    let env = json!({"OPEN_RUNTIMES_SECRET": "", "MY_VAR": "x y", "IMAGE_VAR": "overridden"});
    let res = specialise(&member.url, Some(SECRET), body(env, &code)).await;
    assert_eq!(res.status(), 200);
    let text = reqwest::get(format!("{}/", member.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let lines: Vec<&str> = text.lines().collect();
    for expected in [
        "MY_VAR=x y",
        "BUILD_VAR=built value",
        "IMAGE_VAR=overridden",
        "OPEN_RUNTIMES_ENTRYPOINT=env.wat",
    ] {
        assert!(lines.contains(&expected), "{expected} not in {text}");
    }
    assert!(!text.contains(SECRET), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_memory_limit_comes_from_the_specialisation() {
    for (megabytes, status) in [("2", 500), ("16", 200)] {
        let member = start().await;
        let code = archive(&built("grow4m.wat", ""), true);
        let env = json!({
            "OPEN_RUNTIMES_SECRET": "",
            "OPEN_RUNTIMES_ENTRYPOINT": "grow4m.wat",
            "OPEN_RUNTIMES_MEMORY": megabytes,
        });
        let res = specialise(&member.url, Some(SECRET), body(env, &code)).await;
        assert_eq!(res.status(), 200);
        let res = reqwest::Client::new()
            .post(format!("{}/", member.url))
            .header("x-open-runtimes-log-id", "grow")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), status, "{megabytes} MB");
        if status == 200 {
            assert_eq!(res.text().await.unwrap(), "grown");
        } else {
            let errors = std::fs::read_to_string(member.dir.join("logs/grow_errors.log")).unwrap();
            assert!(errors.contains("grow4m.wat trapped"), "{errors}");
        }
    }
}

/// The real binary in pool mode on a free port (found by binding port 0 first).
async fn start_binary() -> Member {
    let dir = temp_dir();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(env!("CARGO_BIN_EXE_hearth-wasm-runtime"))
        .env_clear()
        .envs(start_env(&dir))
        .env("HEARTH_WASM_LISTEN", format!("127.0.0.1:{port}"))
        .env("OPEN_RUNTIMES_POOL_SECRET", SECRET)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let member = Member {
        url: format!("http://127.0.0.1:{port}"),
        dir,
        _stop: None,
        child: Some(child),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(res) = reqwest::get(format!("{}/__opr/health", member.url)).await {
            if res.status() == 200 {
                return member;
            }
        }
        assert!(Instant::now() < deadline, "the binary did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_binary_hides_the_pool_secret_from_the_guest() {
    let member = start_binary().await;
    let res = reqwest::get(format!("{}/", member.url)).await.unwrap();
    assert_eq!(res.status(), 503);
    let code = archive(
        &built("env.wat", "OPEN_RUNTIMES_ENTRYPOINT=env.wat\n"),
        true,
    );
    let env = json!({"OPEN_RUNTIMES_SECRET": "", "MY_VAR": "x"});
    let res = specialise(&member.url, Some(SECRET), body(env, &code)).await;
    assert_eq!(res.status(), 200);
    let text = reqwest::get(format!("{}/", member.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.lines().any(|l| l == "MY_VAR=x"), "{text}");
    assert!(
        text.lines().any(|l| l == "IMAGE_VAR=from-the-image"),
        "{text}"
    );
    assert!(!text.contains("OPEN_RUNTIMES_POOL_SECRET"), "{text}");
    assert!(!text.contains(SECRET), "{text}");
}
