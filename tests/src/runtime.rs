//! Runtime images as the tests see them: the table of images with their fixtures, building a
//! function with the image's own `helpers/build.sh`, and starting a server container from the
//! built archive, either fresh (the archive in `/mnt/code`) or pooled (a pool member specialised
//! with the archive over `POST /__hearth/specialise`, `runtimes/pool-protocol.md`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bollard::Docker;
use serde_json::{json, Map, Value};

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

/// The route that hands a pool member its function.
pub const SPECIALISE_PATH: &str = "/__hearth/specialise";
/// The header carrying the pool member's `OPEN_RUNTIMES_POOL_SECRET`.
pub const POOL_SECRET_HEADER: &str = "x-hearth-pool-secret";

/// A runtime container started in pool mode: no code, only `OPEN_RUNTIMES_POOL_SECRET` in its
/// env (plus the image's own), the image's default command, waiting for its function.
pub struct PoolMember {
    pub server: Server,
    pub secret: String,
}

impl PoolMember {
    /// Starts a pool member of `image` with a random secret and waits until `/__opr/health`
    /// answers. Of `options` only the limits and the network apply: a member has no function env.
    pub async fn start(docker: &Docker, image: &str, options: &ServerOptions) -> Result<Self> {
        let secret = random_secret()?;
        let mut spec = ContainerSpec::new(image).env("OPEN_RUNTIMES_POOL_SECRET", &secret);
        match &options.network {
            Some(network) => spec.network = Some(network.clone()),
            None => spec = spec.publish(3000),
        }
        spec.memory_mb = options.memory_mb;
        spec.nano_cpus = options.nano_cpus;
        let container = Container::create(docker, &spec).await?;
        container.start().await?;
        let server = Server::attach(container, options.network.as_deref()).await?;
        server.wait_healthy(Duration::from_secs(30)).await?;
        Ok(Self { server, secret })
    }

    /// `POST /__hearth/specialise` with `body`, carrying `secret` when given.
    pub async fn post(
        &self,
        secret: Option<&str>,
        body: impl Into<reqwest::Body>,
    ) -> Result<reqwest::Response> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()?;
        let mut request = client
            .post(format!("{}{SPECIALISE_PATH}", self.server.url))
            .header("content-type", "application/json")
            .body(body);
        if let Some(secret) = secret {
            request = request.header(POOL_SECRET_HEADER, secret);
        }
        request
            .send()
            .await
            .context("failed to send the specialise request")
    }

    /// Hands the member its function as the executor does; it must answer 200
    /// `{"specialised":true}`. From then on it is the runtime of that function.
    pub async fn specialise(self, env: &[(String, String)], archive: &[u8]) -> Result<Server> {
        let body = specialise_body(env, archive).to_string();
        let res = self.post(Some(&self.secret), body).await?;
        let status = res.status().as_u16();
        let text = res.text().await?;
        ensure!(
            status == 200
                && serde_json::from_str::<Value>(&text).ok() == Some(json!({"specialised": true})),
            "specialise answered {status} {text:?}; container output:\n{}",
            self.server.container.output().await.unwrap_or_default()
        );
        Ok(self.server)
    }
}

impl Server {
    /// A pooled runtime of `archive`: a pool member of `image`, specialised with the env
    /// `options` would give a fresh container. Serves what [`Server::start`] would.
    pub async fn start_pooled(
        docker: &Docker,
        image: &str,
        archive: &[u8],
        options: &ServerOptions,
    ) -> Result<Self> {
        let member = PoolMember::start(docker, image, options).await?;
        member.specialise(&options.env, archive).await
    }
}

/// The body of `POST /__hearth/specialise`: `{"env": {...}, "code": "<base64>"}`.
pub fn specialise_body(env: &[(String, String)], archive: &[u8]) -> Value {
    let env: Map<String, Value> = env
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    json!({"env": env, "code": base64(archive)})
}

/// 32 hex characters from the OS's random source.
pub fn random_secret() -> Result<String> {
    let mut bytes = [0u8; 16];
    std::io::Read::read_exact(
        &mut std::fs::File::open("/dev/urandom").context("failed to open /dev/urandom")?,
        &mut bytes,
    )
    .context("failed to read /dev/urandom")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Standard base64 with padding (RFC 4648 §4).
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::base64;

    #[test]
    fn base64_matches_rfc_4648_vectors() {
        for (input, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), want);
        }
        assert_eq!(base64(&[0xff, 0xfe, 0xfd]), "//79");
    }
}
