//! `DockerAdapter` against the real engine (needs Docker and `hearth/base:bookworm`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::TryStreamExt;
use hearth_adapters::docker::{Addressing, DockerAdapter, DockerOptions, PORT_LABEL};
use hearth_adapters::{Adapter, Error, RuntimeSpec, EXECUTOR_LABEL};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const IMAGE: &str = "hearth/base:bookworm";
const TEST_LABEL: &str = "hearth.test";

/// Removes, when dropped, every container, network and folder it named, also when the test
/// panicked half-way.
#[derive(Default)]
struct Guard {
    containers: Vec<String>,
    networks: Vec<String>,
    dirs: Vec<PathBuf>,
}

fn unique(kind: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("hearth-test-{kind}-{}-{nanos:x}-{n}", std::process::id())
}

impl Guard {
    fn container(&mut self) -> String {
        let name = unique("rt");
        self.containers.push(name.clone());
        name
    }

    fn network(&mut self) -> String {
        let name = unique("net");
        self.networks.push(name.clone());
        name
    }

    fn dir(&mut self) -> PathBuf {
        let dir = std::env::temp_dir().join(unique("logs"));
        std::fs::create_dir_all(&dir).unwrap();
        self.dirs.push(dir.clone());
        dir
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        // Drop cannot await: the CLI removes synchronously.
        let quiet = |args: &[&str]| {
            let _ = Command::new("docker")
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        };
        for name in &self.containers {
            quiet(&["rm", "-f", "-v", name]);
        }
        for name in &self.networks {
            // A network may have been created twice under one name: remove by id, all of them.
            for id in network_ids(name) {
                quiet(&["network", "rm", &id]);
            }
        }
        for dir in &self.dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn network_ids(name: &str) -> Vec<String> {
    let out = Command::new("docker")
        .args([
            "network",
            "ls",
            "--no-trunc",
            "--format",
            "{{.ID}} {{.Name}}",
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.split_once(' '))
        .filter(|(_, n)| *n == name)
        .map(|(id, _)| id.to_string())
        .collect()
}

async fn adapter(addressing: Addressing) -> DockerAdapter {
    DockerAdapter::connect(DockerOptions {
        addressing,
        call_timeout: Duration::from_secs(30),
    })
    .await
    .unwrap()
}

fn spec(name: &str, executor: &str) -> RuntimeSpec {
    RuntimeSpec {
        name: name.to_string(),
        image: IMAGE.to_string(),
        cmd: Some(vec!["sleep".into(), "infinity".into()]),
        env: vec![("HEARTH_TEST_VAR".into(), "hello world".into())],
        labels: HashMap::from([
            (TEST_LABEL.to_string(), "1".to_string()),
            (EXECUTOR_LABEL.to_string(), executor.to_string()),
        ]),
        port: 3000,
        ..RuntimeSpec::default()
    }
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// Runs a command, returning (exit code, stdout+stderr).
async fn run(adapter: &DockerAdapter, id: &str, script: &str) -> (i64, String) {
    let output = Mutex::new(Vec::new());
    let sink = |chunk: &[u8]| output.lock().unwrap().extend_from_slice(chunk);
    let exit = adapter
        .exec(
            id,
            &strings(&["bash", "-c", script]),
            Duration::from_secs(30),
            &sink,
        )
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&output.lock().unwrap()).into_owned();
    (exit.exit_code, text)
}

async fn read_all(adapter: &DockerAdapter, id: &str, path: &str) -> Result<Vec<Bytes>, Error> {
    adapter.read_file(id, path).await?.try_collect().await
}

#[tokio::test]
async fn docker_runtime_lifecycle() {
    let mut guard = Guard::default();
    let adapter = adapter(Addressing::Published).await;
    let name = guard.container();
    let executor = unique("executor");

    let t = Instant::now();
    let id = adapter.create(&spec(&name, &executor)).await.unwrap();
    eprintln!("timing: create {:?}", t.elapsed());

    let t = Instant::now();
    adapter
        .put_file(
            &id,
            "/tmp/hello.txt",
            Bytes::from_static(b"hello from put_file\n"),
        )
        .await
        .unwrap();
    eprintln!("timing: put_file (created) {:?}", t.elapsed());

    let info = adapter.inspect(&name).await.unwrap();
    assert!(!info.running);
    assert_eq!(info.endpoint, None);
    assert_eq!(info.id, id);
    assert_eq!(info.name, name);

    let t = Instant::now();
    let endpoint = adapter.start(&id).await.unwrap();
    eprintln!("timing: start {:?}", t.elapsed());
    assert_eq!(endpoint.host, "127.0.0.1");
    assert_ne!(endpoint.port, 3000);

    let t = Instant::now();
    let (code, output) = run(
        &adapter,
        &id,
        "cat /tmp/hello.txt; echo \"$HEARTH_TEST_VAR\"; echo oops >&2; exit 3",
    )
    .await;
    eprintln!("timing: exec {:?}", t.elapsed());
    assert_eq!(code, 3);
    assert!(output.contains("hello from put_file\n"), "{output}");
    assert!(output.contains("hello world\n"), "{output}");
    assert!(output.contains("oops\n"), "{output}");
    let mode = run(&adapter, &id, "stat -c %a /tmp/hello.txt").await;
    assert_eq!(mode, (0, "644\n".to_string()));

    // A file larger than one chunk, both ways, byte-exact.
    let big: Vec<u8> = (0..3 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let t = Instant::now();
    adapter
        .put_file(&id, "/tmp/big.bin", Bytes::from(big.clone()))
        .await
        .unwrap();
    eprintln!("timing: put_file 3 MiB (running) {:?}", t.elapsed());
    let t = Instant::now();
    let chunks = read_all(&adapter, &id, "/tmp/big.bin").await.unwrap();
    eprintln!(
        "timing: read_file 3 MiB {:?} in {} chunks",
        t.elapsed(),
        chunks.len()
    );
    assert!(chunks.len() > 1);
    assert!(chunks.concat() == big, "read_file changed the content");

    // A file the runtime wrote itself.
    assert_eq!(run(&adapter, &id, "seq 1 500000 > /tmp/seq.txt").await.0, 0);
    let expected: String = (1..=500_000).map(|i| format!("{i}\n")).collect();
    let read = read_all(&adapter, &id, "/tmp/seq.txt")
        .await
        .unwrap()
        .concat();
    assert!(read == expected.as_bytes(), "seq.txt differs");

    // Empty files and missing files.
    assert_eq!(run(&adapter, &id, ": > /tmp/empty").await.0, 0);
    assert!(read_all(&adapter, &id, "/tmp/empty")
        .await
        .unwrap()
        .concat()
        .is_empty());
    assert!(matches!(
        adapter.read_file(&id, "/tmp/missing.txt").await,
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        adapter.read_file(&id, "/tmp").await,
        Err(Error::Backend(_))
    ));

    let labels = [(EXECUTOR_LABEL.to_string(), executor.clone())];
    let listed = adapter.list(&labels).await.unwrap();
    assert_eq!(listed.len(), 1);
    let runtime = &listed[0];
    assert_eq!(runtime.id, id);
    assert_eq!(runtime.name, name);
    assert_eq!(runtime.image, IMAGE);
    assert!(runtime.running);
    assert_eq!(runtime.endpoint.as_ref(), Some(&endpoint));
    assert_eq!(
        runtime.labels.get(PORT_LABEL).map(String::as_str),
        Some("3000")
    );
    let age = SystemTime::now().duration_since(runtime.created).unwrap();
    assert!(age < Duration::from_secs(120), "created {age:?} ago");

    let info = adapter.inspect(&name).await.unwrap();
    assert!(info.running);
    assert_eq!(info.endpoint, Some(endpoint.clone()));
    assert_eq!(info.image, IMAGE);
    let age = SystemTime::now().duration_since(info.created).unwrap();
    assert!(age < Duration::from_secs(120), "created {age:?} ago");

    let t = Instant::now();
    adapter.stop(&id, Duration::from_secs(1)).await.unwrap();
    eprintln!(
        "timing: stop (sleep ignores SIGTERM, grace 1 s) {:?}",
        t.elapsed()
    );
    // Stopping a stopped runtime is fine (the engine answers 304).
    adapter.stop(&id, Duration::from_secs(1)).await.unwrap();
    let info = adapter.inspect(&id).await.unwrap();
    assert!(!info.running);
    assert_eq!(info.endpoint, None);
    let listed = adapter.list(&labels).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert!(!listed[0].running);

    let t = Instant::now();
    adapter.remove(&id).await.unwrap();
    eprintln!("timing: remove {:?}", t.elapsed());
    assert!(matches!(adapter.remove(&id).await, Err(Error::NotFound(_))));
    assert!(matches!(
        adapter.inspect(&id).await,
        Err(Error::NotFound(_))
    ));
    assert!(matches!(adapter.start(&id).await, Err(Error::NotFound(_))));
    assert!(adapter.list(&labels).await.unwrap().is_empty());
}

#[tokio::test]
async fn docker_create_with_a_taken_name_conflicts() {
    let mut guard = Guard::default();
    let adapter = adapter(Addressing::Published).await;
    let name = guard.container();
    let executor = unique("executor");
    adapter.create(&spec(&name, &executor)).await.unwrap();
    let err = adapter.create(&spec(&name, &executor)).await.unwrap_err();
    assert!(matches!(err, Error::Conflict(_)), "{err}");
    assert!(err.to_string().contains(&name), "{err}");

    let mut missing = spec(&guard.container(), &executor);
    missing.image = "hearth/does-not-exist:never".to_string();
    let err = adapter.create(&missing).await.unwrap_err();
    assert!(matches!(err, Error::NotFound(_)), "{err}");
}

#[tokio::test]
async fn docker_exec_timeout() {
    let mut guard = Guard::default();
    let adapter = adapter(Addressing::Published).await;
    let name = guard.container();
    let id = adapter
        .create(&spec(&name, &unique("executor")))
        .await
        .unwrap();
    adapter.start(&id).await.unwrap();

    let output = Mutex::new(Vec::new());
    let sink = |chunk: &[u8]| output.lock().unwrap().extend_from_slice(chunk);
    let t = Instant::now();
    let result = adapter
        .exec(
            &id,
            &strings(&["bash", "-c", "echo started; sleep 30"]),
            Duration::from_secs(2),
            &sink,
        )
        .await;
    let took = t.elapsed();
    assert!(matches!(result, Err(Error::Timeout(_))), "{result:?}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    // Output streamed before the timeout reached the sink.
    assert_eq!(output.lock().unwrap().as_slice(), b"started\n");
    // The runtime is still usable.
    assert_eq!(run(&adapter, &id, "echo ok").await, (0, "ok\n".to_string()));

    // Exec in a runtime that is not running.
    adapter.stop(&id, Duration::ZERO).await.unwrap();
    let sink = |_: &[u8]| {};
    let result = adapter
        .exec(&id, &strings(&["true"]), Duration::from_secs(5), &sink)
        .await;
    assert!(matches!(result, Err(Error::Conflict(_))), "{result:?}");
}

#[tokio::test]
async fn docker_limits_are_visible_in_the_container() {
    let mut guard = Guard::default();
    let adapter = adapter(Addressing::Published).await;
    let name = guard.container();
    let mut spec = spec(&name, &unique("executor"));
    spec.memory_mb = 64;
    spec.cpus = 0.5;
    spec.pids_limit = 50;
    let id = adapter.create(&spec).await.unwrap();
    adapter.start(&id).await.unwrap();
    let (code, output) = run(
        &adapter,
        &id,
        "cd /sys/fs/cgroup; if [ -f memory.max ]; then \
           cat memory.max; cut -d' ' -f1 cpu.max; cat pids.max; \
         else \
           cat memory/memory.limit_in_bytes cpu/cpu.cfs_quota_us pids/pids.max; \
         fi",
    )
    .await;
    assert_eq!(code, 0, "{output}");
    assert_eq!(output, format!("{}\n50000\n50\n", 64 * 1024 * 1024));

    let host = adapter
        .client()
        .inspect_container(&id, None)
        .await
        .unwrap()
        .host_config
        .unwrap();
    assert_eq!(host.memory, Some(64 * 1024 * 1024));
    assert_eq!(host.memory_swap, Some(64 * 1024 * 1024));
    assert_eq!(host.nano_cpus, Some(500_000_000));
    assert_eq!(host.init, None);

    // 0 means unlimited.
    let name = guard.container();
    let id = adapter
        .create(&self::spec(&name, &unique("executor")))
        .await
        .unwrap();
    let host = adapter
        .client()
        .inspect_container(&id, None)
        .await
        .unwrap()
        .host_config
        .unwrap();
    assert_eq!(host.memory.unwrap_or(0), 0);
    assert_eq!(host.nano_cpus.unwrap_or(0), 0);
    assert!(host.pids_limit.unwrap_or(0) <= 0);
}

#[tokio::test]
async fn docker_logs_dir_is_bound() {
    let mut guard = Guard::default();
    let adapter = adapter(Addressing::Published).await;
    assert!(adapter.shares_host_folders());
    let dir = guard.dir();
    let name = guard.container();
    let mut spec = spec(&name, &unique("executor"));
    spec.logs_dir = Some(dir.clone());
    let id = adapter.create(&spec).await.unwrap();
    adapter.start(&id).await.unwrap();
    let (code, output) = run(&adapter, &id, "echo logged > /mnt/logs/request.log").await;
    assert_eq!(code, 0, "{output}");
    let logged = std::fs::read_to_string(dir.join("request.log")).unwrap();
    assert_eq!(logged, "logged\n");

    let mut relative = self::spec(&guard.container(), "x");
    relative.logs_dir = Some(PathBuf::from("relative/logs"));
    assert!(matches!(
        adapter.create(&relative).await,
        Err(Error::Backend(_))
    ));
}

/// Sends `GET /` to `addr` until an HTTP answer comes (the engine's proxy accepts connections
/// before the server in the container listens).
async fn http_get(addr: &str, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let attempt = async {
            let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
            stream.write_all(b"GET / HTTP/1.0\r\n\r\n").await.ok()?;
            let mut answer = String::new();
            stream.read_to_string(&mut answer).await.ok()?;
            answer.starts_with("HTTP/").then_some(answer)
        };
        if let Some(answer) = attempt.await {
            return answer;
        }
        assert!(Instant::now() < deadline, "no HTTP answer from {addr}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn docker_published_endpoint_is_reachable() {
    let mut guard = Guard::default();
    let adapter = adapter(Addressing::Published).await;
    let name = guard.container();
    let mut spec = spec(&name, &unique("executor"));
    spec.cmd = Some(strings(&["python3", "-m", "http.server", "3000"]));
    spec.working_dir = Some("/tmp".to_string());
    let id = adapter.create(&spec).await.unwrap();
    let endpoint = adapter.start(&id).await.unwrap();
    assert_eq!(endpoint.host, "127.0.0.1");
    let t = Instant::now();
    let answer = http_get(&endpoint.to_string(), Duration::from_secs(15)).await;
    eprintln!("timing: first HTTP answer after start {:?}", t.elapsed());
    assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");
    // The endpoint survives an "executor restart": a new adapter rebuilds it from the engine.
    let again = self::adapter(Addressing::Published).await;
    assert_eq!(again.inspect(&name).await.unwrap().endpoint, Some(endpoint));
}

#[tokio::test]
async fn docker_network_addressing_and_ensure_network() {
    let mut guard = Guard::default();
    let adapter = adapter(Addressing::Network).await;
    let first = guard.network();
    let second = guard.network();

    // Twice, and concurrently: one network each.
    let (a, b, c) = tokio::join!(
        adapter.ensure_network(&first),
        adapter.ensure_network(&first),
        adapter.ensure_network(&second),
    );
    a.unwrap();
    b.unwrap();
    c.unwrap();
    adapter.ensure_network(&first).await.unwrap();
    assert_eq!(network_ids(&first).len(), 1);
    assert_eq!(network_ids(&second).len(), 1);

    let executor = unique("executor");
    let server = guard.container();
    let mut spec = spec(&server, &executor);
    spec.cmd = Some(strings(&["python3", "-m", "http.server", "3000"]));
    spec.working_dir = Some("/tmp".to_string());
    spec.networks = vec![first.clone(), second.clone()];
    let id = adapter.create(&spec).await.unwrap();
    let endpoint = adapter.start(&id).await.unwrap();
    assert_eq!(endpoint.host, server);
    assert_eq!(endpoint.port, 3000);
    let listed = adapter
        .list(&[(EXECUTOR_LABEL.to_string(), executor.clone())])
        .await
        .unwrap();
    assert_eq!(listed[0].endpoint.as_ref(), Some(&endpoint));

    let info = adapter.client().inspect_container(&id, None).await.unwrap();
    let networks = info.network_settings.unwrap().networks.unwrap();
    assert!(networks.contains_key(&first) && networks.contains_key(&second));
    assert_eq!(networks.len(), 2, "{:?}", networks.keys());
    let published = info.host_config.unwrap().port_bindings.unwrap_or_default();
    assert!(published
        .values()
        .all(|b| b.as_ref().is_none_or(|b| b.is_empty())));

    // Another runtime on the second network reaches the server by name.
    let client = guard.container();
    let mut spec = self::spec(&client, &executor);
    spec.networks = vec![second.clone()];
    let client_id = adapter.create(&spec).await.unwrap();
    adapter.start(&client_id).await.unwrap();
    let script = format!(
        "for i in $(seq 50); do \
           python3 -c \"import urllib.request as u; print(u.urlopen('http://{endpoint}/').status)\" \
             2>/dev/null && exit 0; sleep 0.2; \
         done; exit 1"
    );
    assert_eq!(
        run(&adapter, &client_id, &script).await,
        (0, "200\n".to_string())
    );
}
