//! Runtime images as the tests see them: the table of images with their fixtures, building a
//! function with the image's own `helpers/build.sh`, and starting a server container from the
//! built archive.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bollard::Docker;

use crate::docker::{tar_of_dir, Container, ContainerSpec};

/// One runtime image and the fixtures that exercise it.
#[derive(Debug, Clone, Copy)]
pub struct RuntimeImage {
    /// Short name, also the fixture folder under `tests/fixtures/`.
    pub name: &'static str,
    pub image: &'static str,
    /// Install command of the conformance fixture (uses a local package only).
    pub install: &'static str,
    /// Entrypoints inside the conformance fixture.
    pub entry: &'static str,
    pub no_export: &'static str,
    pub syntax_error: &'static str,
    /// Entrypoint of the v2 fixture (`tests/fixtures/<name>-v2/`).
    pub v2_entry: &'static str,
    /// Entrypoint of `runtimes/<name>/example/`.
    pub example_entry: &'static str,
}

pub const NODE: RuntimeImage = RuntimeImage {
    name: "node",
    image: "hearth/node:v5-18",
    install: "npm install",
    entry: "tests.js",
    no_export: "no-export.js",
    syntax_error: "syntax-error.js",
    v2_entry: "index.js",
    example_entry: "index.js",
};

pub const PYTHON: RuntimeImage = RuntimeImage {
    name: "python",
    image: "hearth/python:v5-3.11",
    install: "pip install -r requirements.txt",
    entry: "tests.py",
    no_export: "no_export.py",
    syntax_error: "syntax_error.py",
    v2_entry: "main.py",
    example_entry: "main.py",
};

pub const WASM: RuntimeImage = RuntimeImage {
    name: "wasm",
    image: "hearth/wasm:v5-1",
    // The build step's clang: the function plus the vendored local library, for wasm32-wasi.
    install: "clang --target=wasm32-wasi -O2 -Ivendor/hearth-local-dep -o tests.wasm tests.c \
              vendor/hearth-local-dep/hello.c -lm",
    entry: "tests.wasm",
    no_export: "no-export.wat",
    syntax_error: "syntax-error.wat",
    v2_entry: "index.wasm",
    example_entry: "hello.wat",
};

/// Every runtime image the suite covers.
pub const ALL: &[RuntimeImage] = &[NODE, PYTHON, WASM];

/// The repository root (this crate lives in `tests/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

pub fn fixture_dir(name: &str) -> PathBuf {
    repo_root().join("tests").join("fixtures").join(name)
}

pub fn example_dir(runtime: &RuntimeImage) -> PathBuf {
    repo_root()
        .join("runtimes")
        .join(runtime.name)
        .join("example")
}

/// A finished build: the archive `helpers/build.sh` left in `/mnt/code/code.tar.gz`.
pub struct Built {
    pub archive: Vec<u8>,
    pub output: String,
}

/// Builds `source` with the image's `helpers/build.sh`, as the executor does: the source in
/// `/mnt/code`, `OPEN_RUNTIMES_ENTRYPOINT` set when `entrypoint` is non-empty.
pub async fn build(
    docker: &Docker,
    image: &str,
    source: &Path,
    entrypoint: &str,
    install: &str,
) -> Result<Built> {
    let mut spec = ContainerSpec::new(image).cmd(&["bash", "helpers/build.sh", install]);
    if !entrypoint.is_empty() {
        spec = spec.env("OPEN_RUNTIMES_ENTRYPOINT", entrypoint);
    }
    let container = Container::create(docker, &spec).await?;
    container.put_tar("/mnt/code", tar_of_dir(source)?).await?;
    container.start().await?;
    let code = container.wait(Duration::from_secs(300)).await?;
    let output = container.output().await?;
    if code != 0 {
        bail!(
            "build of {} in {image} exited with {code}:\n{output}",
            source.display()
        );
    }
    let archive = container.read_file("/mnt/code/code.tar.gz").await?;
    Ok(Built { archive, output })
}

/// A running runtime server container with its HTTP base URL.
pub struct Server {
    pub container: Container,
    pub url: String,
}

/// How to start a server container.
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    pub env: Vec<(String, String)>,
    /// Use the image's default command (v2) instead of `helpers/start.sh`.
    pub default_cmd: bool,
    pub memory_mb: Option<i64>,
    pub nano_cpus: Option<i64>,
    /// Reach the server by its address on this network instead of a published port (no
    /// docker-proxy in the path).
    pub network: Option<String>,
}

impl ServerOptions {
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }
}

/// Creates (does not start) a server container of `image` with `archive` as
/// `/mnt/code/code.tar.gz` and port 3000 published on 127.0.0.1.
pub async fn prepare(
    docker: &Docker,
    image: &str,
    archive: &[u8],
    options: &ServerOptions,
) -> Result<Container> {
    let mut spec = ContainerSpec::new(image);
    match &options.network {
        Some(network) => spec.network = Some(network.clone()),
        None => spec = spec.publish(3000),
    }
    if !options.default_cmd {
        spec = spec.cmd(&["bash", "helpers/start.sh", "bash helpers/server.sh"]);
    }
    spec.env = options.env.clone();
    spec.memory_mb = options.memory_mb;
    spec.nano_cpus = options.nano_cpus;
    let container = Container::create(docker, &spec).await?;
    container
        .put_file("/mnt/code", "code.tar.gz", archive)
        .await?;
    Ok(container)
}

impl Server {
    /// Starts a container of `image` with `archive` as `/mnt/code/code.tar.gz`, waits until
    /// `/__opr/health` answers 200.
    pub async fn start(
        docker: &Docker,
        image: &str,
        archive: &[u8],
        options: &ServerOptions,
    ) -> Result<Self> {
        let server = Self::launch(docker, image, archive, options).await?;
        server.wait_healthy(Duration::from_secs(30)).await?;
        Ok(server)
    }

    /// Creates and starts the container without waiting for health.
    pub async fn launch(
        docker: &Docker,
        image: &str,
        archive: &[u8],
        options: &ServerOptions,
    ) -> Result<Self> {
        let container = prepare(docker, image, archive, options).await?;
        container.start().await?;
        Self::attach(container, options.network.as_deref()).await
    }

    /// Wraps a started container, finding its address on `network` or its published port.
    pub async fn attach(container: Container, network: Option<&str>) -> Result<Self> {
        let url = match network {
            Some(network) => format!("http://{}:3000", container.ip_on(network).await?),
            None => format!("http://127.0.0.1:{}", container.host_port(3000).await?),
        };
        Ok(Self { container, url })
    }

    /// Polls `/__opr/health` with a short backoff until it answers 200.
    pub async fn wait_healthy(&self, limit: Duration) -> Result<Duration> {
        let started = Instant::now();
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()?;
        let mut delay = Duration::from_millis(1);
        let health = format!("{}/__opr/health", self.url);
        loop {
            if let Ok(res) = client.get(&health).send().await {
                if res.status().is_success() {
                    return Ok(started.elapsed());
                }
            }
            if started.elapsed() > limit {
                let output = self.container.output().await.unwrap_or_default();
                bail!("runtime not healthy after {limit:?}; container output:\n{output}");
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(5));
        }
    }

    /// The content of `/mnt/logs/<id>_logs.log` and `_errors.log` ("" when absent).
    pub async fn log_files(&self, id: &str) -> Result<(String, String)> {
        let logs = self.cat(&format!("/mnt/logs/{id}_logs.log")).await?;
        let errors = self.cat(&format!("/mnt/logs/{id}_errors.log")).await?;
        Ok((logs, errors))
    }

    async fn cat(&self, path: &str) -> Result<String> {
        let (code, out, _) = self
            .container
            .exec(&["cat", path])
            .await
            .with_context(|| format!("failed to read {path}"))?;
        Ok(if code == 0 { out } else { String::new() })
    }

    /// Names of the files in `/mnt/logs`.
    pub async fn log_dir(&self) -> Result<Vec<String>> {
        let (_, out, _) = self.container.exec(&["ls", "-1", "/mnt/logs"]).await?;
        Ok(out.lines().map(str::to_string).collect())
    }
}
