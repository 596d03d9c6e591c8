//! A real executor for tests and benchmarks: the `hearth-executor` library served in-process on
//! 127.0.0.1, on the real Docker engine, its runtimes reached through ports published on
//! 127.0.0.1 and labelled `hearth.test=1`. Dropping it stops the server and removes every
//! container it made.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use flate2::write::GzEncoder;
use hearth_adapters::docker::{Addressing, DockerAdapter, DockerOptions};
use hearth_executor::{Config, Executor};
use reqwest::RequestBuilder;
use serde_json::Value;
use tokio::sync::oneshot;

pub const SECRET: &str = "executor-test-secret";

pub struct TestExecutor {
    pub url: String,
    pub executor: Arc<Executor>,
    pub name: String,
    /// Local storage root; API paths are absolute paths under it.
    pub storage: PathBuf,
    pub client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
    _dir: TempDir,
}

/// Knobs tests turn.
#[derive(Debug, Clone)]
pub struct Options {
    pub name: String,
    pub inactive_threshold: u64,
    pub maintenance_interval: u64,
    pub max_runtimes: usize,
    /// Reuse a storage folder (to restart an executor over the same state).
    pub storage: Option<PathBuf>,
    /// `OPR_EXECUTOR_CONNECTION_STORAGE` (default: local storage).
    pub storage_dsn: Option<String>,
    /// Warm pools on, with these images prestarted (`OPR_EXECUTOR_IMAGES`); empty: pools off.
    pub pool_images: Vec<String>,
    pub pool_min: usize,
    pub pool_max: usize,
    /// `OPR_EXECUTOR_RUNTIME_SOCKETS` (default on).
    pub runtime_sockets: bool,
}

impl Options {
    pub fn named(name: &str) -> Self {
        Self {
            name: format!("hearth-test-{name}-{}", std::process::id()),
            inactive_threshold: 60,
            maintenance_interval: 30,
            max_runtimes: 100,
            storage: None,
            storage_dsn: None,
            pool_images: Vec::new(),
            pool_min: 1,
            pool_max: 8,
            runtime_sockets: true,
        }
    }

    /// Warm pools on for `images`, `min` members each.
    pub fn pooled(mut self, images: &[&str], min: usize) -> Self {
        self.pool_images = images.iter().map(|i| i.to_string()).collect();
        self.pool_min = min;
        self
    }
}

/// A temporary folder removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> Result<Self> {
        let dir =
            std::env::temp_dir().join(format!("{prefix}-{}-{}", std::process::id(), rand_suffix()));
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn rand_suffix() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("{nanos:08x}")
}

impl TestExecutor {
    pub async fn start(options: Options) -> Result<Self> {
        let dir = TempDir::new("hearth-executor")?;
        let storage = options
            .storage
            .clone()
            .unwrap_or_else(|| dir.0.join("storage"));
        std::fs::create_dir_all(&storage)?;
        let storage = storage.canonicalize()?;
        let mut config = Config::for_tests(SECRET, storage.clone(), dir.0.join("runtimes"));
        config.name = options.name.clone();
        config.inactive_threshold = options.inactive_threshold;
        config.maintenance_interval = options.maintenance_interval;
        config.max_runtimes = options.max_runtimes;
        if let Some(dsn) = &options.storage_dsn {
            config.storage = dsn.clone();
        }
        config.pool = !options.pool_images.is_empty();
        config.images = options.pool_images.clone();
        config.pool_min = options.pool_min;
        config.pool_max = options.pool_max;
        config.runtime_sockets = options.runtime_sockets;
        let adapter = DockerAdapter::connect(DockerOptions {
            addressing: Addressing::Published,
            call_timeout: Duration::from_secs(60),
        })
        .await?;
        let executor = hearth_executor::prepare(config, Arc::new(adapter)).await?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let (stop, stopped) = oneshot::channel::<()>();
        let serving = executor.clone();
        let server = tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.await;
            };
            if let Err(err) = hearth_executor::run(serving, listener, shutdown).await {
                eprintln!("executor stopped with an error: {err:#}");
            }
        });
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()?;
        Ok(Self {
            url,
            executor,
            name: options.name,
            storage,
            client,
            stop: Some(stop),
            server: Some(server),
            _dir: dir,
        })
    }

    /// Stops serving (graceful) but leaves the runtimes running, as a killed executor would.
    pub async fn stop_serving(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            let _ = server.await;
        }
    }

    /// The host folder of this executor's runtime folders (`OPR_EXECUTOR_RUNTIMES_DIR`).
    pub fn runtimes_dir(&self) -> PathBuf {
        self._dir.0.join("runtimes")
    }

    pub fn get(&self, path: &str) -> RequestBuilder {
        self.client
            .get(format!("{}{path}", self.url))
            .bearer_auth(SECRET)
    }

    pub fn post(&self, path: &str) -> RequestBuilder {
        self.client
            .post(format!("{}{path}", self.url))
            .bearer_auth(SECRET)
    }

    pub fn delete(&self, path: &str) -> RequestBuilder {
        self.client
            .delete(format!("{}{path}", self.url))
            .bearer_auth(SECRET)
    }

    /// Packs a fixture folder as `<storage>/functions/<name>.tar.gz`; returns its API path.
    pub fn stage_source(&self, fixture: &Path, name: &str) -> Result<String> {
        let path = self
            .storage
            .join("functions")
            .join(format!("{name}.tar.gz"));
        std::fs::create_dir_all(path.parent().context("no parent")?)?;
        let file = std::fs::File::create(&path)?;
        let mut builder = tar::Builder::new(GzEncoder::new(file, flate2::Compression::fast()));
        builder.append_dir_all(".", fixture)?;
        builder.into_inner()?.finish()?;
        Ok(path.display().to_string())
    }

    /// Ids of this executor's containers (running or not).
    pub fn containers(&self) -> Vec<String> {
        let output = std::process::Command::new("docker")
            .args([
                "ps",
                "-aq",
                "--filter",
                &format!("label=hearth.executor={}", self.name),
            ])
            .output();
        output
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Sum of every sample of a metric family whose labels contain `filter` (`""`: all).
    pub async fn metric_sum(&self, name: &str, filter: &str) -> Result<f64> {
        let text = self.get("/metrics").send().await?.text().await?;
        Ok(text
            .lines()
            .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(filter))
            .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
            .sum())
    }

    /// Waits until `hearth_pool_idle` for `image` reaches `count`.
    pub async fn wait_pool(&self, image: &str, count: f64, limit: Duration) -> Result<()> {
        let deadline = std::time::Instant::now() + limit;
        loop {
            let idle = self
                .metric_sum("hearth_pool_idle", &format!("image=\"{image}\""))
                .await?;
            if idle >= count {
                return Ok(());
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "the pool of {image} holds {idle} members after {limit:?} (want {count})"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A counter or gauge from `/metrics`.
    pub async fn metric(&self, name: &str) -> Result<f64> {
        let text = self.get("/metrics").send().await?.text().await?;
        text.lines()
            .find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|rest| rest.trim().parse().ok())
            })
            .with_context(|| format!("no metric {name}"))
    }
}

impl Drop for TestExecutor {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        remove_by_label(&format!("hearth.executor={}", self.name));
        if self.executor.config.pool {
            // A pool creation already sent to Docker may land after the removal above.
            for _ in 0..4 {
                std::thread::sleep(Duration::from_millis(500));
                remove_by_label(&format!("hearth.executor={}", self.name));
            }
        }
    }
}

/// Removes every container and Swarm service carrying `label` (`key=value`).
pub fn remove_by_label(label: &str) {
    // Swarm runtimes are services (outside a swarm this lists nothing).
    let services = std::process::Command::new("docker")
        .args(["service", "ls", "-q", "--filter", &format!("label={label}")])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    let services: Vec<&str> = services.lines().collect();
    if !services.is_empty() {
        let _ = std::process::Command::new("docker")
            .args(["service", "rm"])
            .args(&services)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
    let ids = std::process::Command::new("docker")
        .args(["ps", "-aq", "--filter", &format!("label={label}")])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    let ids: Vec<&str> = ids.lines().collect();
    if !ids.is_empty() {
        let _ = std::process::Command::new("docker")
            .args(["rm", "-f", "-v"])
            .args(&ids)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// A parsed `multipart/form-data` execution reply: part name → bytes.
pub async fn parse_multipart(
    content_type: &str,
    body: bytes::Bytes,
) -> Result<std::collections::HashMap<String, bytes::Bytes>> {
    let boundary = multer::parse_boundary(content_type)?;
    let stream = futures_util::stream::once(async move { Ok::<_, std::io::Error>(body) });
    let mut multipart = multer::Multipart::new(stream, boundary);
    let mut parts = std::collections::HashMap::new();
    while let Some(field) = multipart.next_field().await? {
        let name = field.name().unwrap_or_default().to_string();
        parts.insert(name, field.bytes().await?);
    }
    Ok(parts)
}

/// The JSON of a response, with its status.
pub async fn json_reply(res: reqwest::Response) -> Result<(u16, Value)> {
    let status = res.status().as_u16();
    let text = res.text().await?;
    let value = serde_json::from_str(&text).with_context(|| {
        format!(
            "status {status}, not JSON: {}",
            &text[..text.len().min(300)]
        )
    })?;
    Ok((status, value))
}
