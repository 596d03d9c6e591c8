//! The build service's test harness, all real: a RabbitMQ broker in a container of the stack's
//! own `hearth/rabbitmq:3` image (on a fixed loopback port, so a restart keeps it), git
//! repositories served by `git daemon` on 127.0.0.1 and as `file://`, and the `hearth-builds`
//! binary run as child processes (API, workers, or both) that a test can SIGKILL and start again.
//! Everything is removed on drop: containers (label `hearth.test=1`), processes, folders, queues.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::executor::TempDir;

pub const RABBITMQ_IMAGE: &str = "hearth/rabbitmq:3";

/// A free port on 127.0.0.1 (free when asked; good enough for a test).
pub fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

fn run(command: &mut Command) -> Result<String> {
    let output = command
        .output()
        .with_context(|| format!("failed to run {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}

/// A RabbitMQ broker in a container, published on a fixed port of 127.0.0.1.
pub struct Rabbit {
    pub id: String,
    pub port: u16,
}

impl Rabbit {
    pub async fn start() -> Result<Self> {
        let port = free_port()?;
        let id = run(Command::new("docker").args([
            "run",
            "-d",
            "--label",
            "hearth.test=1",
            "--hostname",
            "rabbit",
            "-p",
            &format!("127.0.0.1:{port}:5672"),
            RABBITMQ_IMAGE,
        ]))?;
        let rabbit = Self { id, port };
        rabbit.wait_ready(Duration::from_secs(60)).await?;
        Ok(rabbit)
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Waits until the broker accepts AMQP connections (its listener opens last at boot).
    pub async fn wait_ready(&self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            let probe = Command::new("docker")
                .args([
                    "exec",
                    &self.id,
                    "rabbitmq-diagnostics",
                    "-q",
                    "check_port_connectivity",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            if probe.map(|s| s.success()).unwrap_or(false) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "RabbitMQ did not become ready: {}",
                    run(Command::new("docker").args(["logs", "--tail", "20", &self.id]))?
                );
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// A real restart of the broker (stop, start); durable queues and persistent messages stay.
    pub async fn restart(&self) -> Result<()> {
        run(Command::new("docker").args(["restart", "-t", "10", &self.id]))?;
        self.wait_ready(Duration::from_secs(60)).await
    }

    /// Stops the broker (start it again with [`Rabbit::start_again`]).
    pub fn stop(&self) -> Result<()> {
        run(Command::new("docker").args(["stop", "-t", "10", &self.id]))?;
        Ok(())
    }

    pub async fn start_again(&self) -> Result<()> {
        run(Command::new("docker").args(["start", &self.id]))?;
        self.wait_ready(Duration::from_secs(60)).await
    }

    /// Messages ready in a queue.
    pub fn queue_depth(&self, queue: &str) -> Result<u64> {
        let list = run(Command::new("docker").args([
            "exec",
            &self.id,
            "rabbitmqctl",
            "-q",
            "list_queues",
            "name",
            "messages",
        ]))?;
        Ok(list
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .find(|(name, _)| *name == queue)
            .and_then(|(_, n)| n.trim().parse().ok())
            .unwrap_or(0))
    }
}

impl Drop for Rabbit {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rm", "-f", "-v", &self.id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// One commit of a test repository: files (path, content) and an optional tag.
pub type Commit<'a> = (&'a [(&'a str, &'a str)], Option<&'a str>);

/// `git-daemon` serving the bare repositories under `root` read-only on `address` (127.0.0.1, or
/// a gateway the stack's build workers can reach), killed on drop. The `git-daemon` program
/// itself, not `git daemon`: that runs it as a child, which killing `git` would leave running.
pub struct GitDaemon {
    pub address: String,
    pub port: u16,
    child: Child,
}

impl GitDaemon {
    pub async fn serve(root: &Path, address: &str) -> Result<Self> {
        let port = free_port()?;
        let exec_path = Command::new("git")
            .arg("--exec-path")
            .output()
            .context("failed to run git --exec-path")?;
        let exec_path = String::from_utf8_lossy(&exec_path.stdout)
            .trim()
            .to_string();
        let child = Command::new(PathBuf::from(exec_path).join("git-daemon"))
            .args([
                "--reuseaddr",
                "--export-all",
                &format!("--listen={address}"),
                &format!("--port={port}"),
                &format!("--base-path={}", root.display()),
                &root.display().to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("failed to start git-daemon")?;
        let daemon = Self {
            address: address.to_string(),
            port,
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect((address, port)).is_err() {
            if Instant::now() > deadline {
                bail!("git daemon did not listen on {address}:{port}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(daemon)
    }

    /// `git://<address>:<port>/<name>.git`
    pub fn git_url(&self, name: &str) -> String {
        format!("git://{}:{}/{name}.git", self.address, self.port)
    }
}

impl Drop for GitDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Bare git repositories under a temp folder, served read-only by `git daemon` on 127.0.0.1.
pub struct GitServer {
    pub root: PathBuf,
    daemon: GitDaemon,
    _dir: TempDir,
}

fn git(dir: &Path, args: &[&str]) -> Result<String> {
    run(Command::new("git")
        .args([
            "-c",
            "user.name=Hearth Test",
            "-c",
            "user.email=test@hearth.invalid",
            "-c",
            "init.defaultBranch=main",
            "-c",
            "commit.gpgsign=false",
        ])
        .args(args)
        .current_dir(dir))
}

impl GitServer {
    pub async fn start() -> Result<Self> {
        let dir = TempDir::new("hearth-git")?;
        let root = dir.0.join("repos");
        std::fs::create_dir_all(&root)?;
        let daemon = GitDaemon::serve(&root, "127.0.0.1").await?;
        Ok(Self {
            root,
            daemon,
            _dir: dir,
        })
    }

    /// `git://127.0.0.1:<port>/<name>.git`
    pub fn git_url(&self, name: &str) -> String {
        self.daemon.git_url(name)
    }

    /// `file:///…/<name>.git`
    pub fn file_url(&self, name: &str) -> String {
        format!("file://{}/{name}.git", self.root.display())
    }

    /// An empty bare repository.
    pub fn empty(&self, name: &str) -> Result<()> {
        git(
            &self.root,
            &["init", "-q", "--bare", &format!("{name}.git")],
        )?;
        Ok(())
    }

    /// Creates `<name>.git` from a work tree built by `commits`: each commit is a list of
    /// (path, content) files written before committing; a `Some(tag)` tags that commit. Returns
    /// the commit ids in order. Paths ending in `@link` are made symlinks to the content.
    pub fn repository(&self, name: &str, commits: &[Commit<'_>]) -> Result<Vec<String>> {
        self.empty(name)?;
        let work = self.root.join(format!("{name}.work"));
        std::fs::create_dir_all(&work)?;
        git(&work, &["init", "-q"])?;
        let mut ids = Vec::new();
        for (files, tag) in commits {
            for (path, content) in *files {
                if let Some(link) = path.strip_suffix("@link") {
                    let target = work.join(link);
                    let _ = std::fs::remove_file(&target);
                    std::os::unix::fs::symlink(content, &target)?;
                    continue;
                }
                let target = work.join(path);
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                std::fs::write(&target, content)?;
            }
            git(&work, &["add", "-A"])?;
            git(&work, &["commit", "-q", "-m", "change"])?;
            ids.push(git(&work, &["rev-parse", "HEAD"])?);
            if let Some(tag) = tag {
                git(&work, &["tag", "-a", tag, "-m", tag])?;
            }
        }
        let bare = self.root.join(format!("{name}.git"));
        git(
            &work,
            &[
                "push",
                "-q",
                "--follow-tags",
                &bare.display().to_string(),
                "main",
            ],
        )?;
        std::fs::remove_dir_all(&work)?;
        Ok(ids)
    }
}

/// The `hearth-builds` binary of this workspace.
pub fn builds_binary() -> Result<PathBuf> {
    workspace_binary("hearth-builds", "hearth-builds")
}

/// A binary of this workspace's package, next to the running test or bench (same profile).
pub fn workspace_binary(package: &str, bin: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // A test runs from target/<profile>/deps/, a binary (the bench) from target/<profile>/.
    let mut profile = exe.parent().context("no target folder")?;
    if profile.ends_with("deps") {
        profile = profile.parent().context("no target folder")?;
    }
    let binary = profile.join(bin);
    // Under cargo (tests) it is always built, so a test never runs a stale binary; the build is
    // a no-op when nothing changed.
    let under_cargo = std::env::var_os("CARGO").is_some();
    if under_cargo || !binary.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build.args(["build", "-q", "-p", package, "--bin", bin]);
        if profile.ends_with("release") {
            build.arg("--release");
        }
        run(&mut build)?;
    }
    Ok(binary)
}

/// Settings shared by the processes of one build service.
#[derive(Debug, Clone)]
pub struct ServiceOptions {
    pub secret: String,
    pub executor: String,
    pub amqp: String,
    pub queue: String,
    pub state_dir: PathBuf,
    pub storage_root: PathBuf,
    pub extra: Vec<(String, String)>,
}

impl ServiceOptions {
    /// A build service for `executor` (its storage is shared), on `rabbit`, with its own queue
    /// named after `name` and its state in `state_dir`.
    pub fn new(
        executor: &crate::executor::TestExecutor,
        rabbit: &Rabbit,
        name: &str,
        state_dir: &Path,
    ) -> Self {
        Self {
            secret: crate::executor::SECRET.to_string(),
            executor: executor.url.clone(),
            amqp: rabbit.url(),
            queue: format!("hearth.test.{name}.{}", std::process::id()),
            state_dir: state_dir.to_path_buf(),
            storage_root: executor.storage.clone(),
            extra: Vec::new(),
        }
    }
}

/// One `hearth-builds` process.
pub struct BuildsProcess {
    pub url: String,
    pub role: String,
    child: Child,
    log: PathBuf,
}

impl BuildsProcess {
    pub async fn start(options: &ServiceOptions, role: &str) -> Result<Self> {
        let port = free_port()?;
        let log = options.state_dir.join(format!("{role}-{port}.log"));
        std::fs::create_dir_all(&options.state_dir)?;
        let file = std::fs::File::create(&log)?;
        let mut command = Command::new(builds_binary()?);
        command
            .env("HEARTH_BUILDS_LISTEN", format!("127.0.0.1:{port}"))
            .env("OPR_EXECUTOR_SECRET", &options.secret)
            .env("HEARTH_BUILDS_EXECUTOR", &options.executor)
            .env("HEARTH_BUILDS_AMQP", &options.amqp)
            .env("HEARTH_BUILDS_QUEUE", &options.queue)
            .env("HEARTH_BUILDS_STATE_DIR", &options.state_dir)
            .env("HEARTH_BUILDS_STORAGE_ROOT", &options.storage_root)
            .env("HEARTH_BUILDS_ROLE", role)
            .env("HEARTH_BUILDS_RETRY_DELAY_MS", "200")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        for (key, value) in &options.extra {
            command.env(key, value);
        }
        let child = command.spawn().context("failed to start hearth-builds")?;
        let process = Self {
            url: format!("http://127.0.0.1:{port}"),
            role: role.to_string(),
            child,
            log,
        };
        if role != "worker" {
            let client = reqwest::Client::new();
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Ok(res) = client
                    .get(format!("{}/v1/health", process.url))
                    .send()
                    .await
                {
                    if res.status().is_success() {
                        break;
                    }
                }
                if Instant::now() > deadline {
                    bail!("hearth-builds did not become healthy:\n{}", process.logs());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(process)
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for BuildsProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A client of the build API.
#[derive(Clone)]
pub struct BuildsClient {
    pub url: String,
    pub secret: String,
    pub http: reqwest::Client,
}

impl BuildsClient {
    pub fn new(url: &str, secret: &str) -> Self {
        Self {
            url: url.to_string(),
            secret: secret.to_string(),
            http: reqwest::Client::new(),
        }
    }

    /// Submits a build; returns (status, reply).
    pub async fn submit(&self, body: &Value) -> Result<(u16, Value)> {
        let res = self
            .http
            .post(format!("{}/v1/builds", self.url))
            .bearer_auth(&self.secret)
            .json(body)
            .send()
            .await?;
        crate::executor::json_reply(res).await
    }

    /// Submits a build that must be accepted (202); returns its id.
    pub async fn submit_id(&self, body: &Value) -> Result<String> {
        let (status, build) = self.submit(body).await?;
        anyhow::ensure!(status == 202, "submit {body}: {status} {build}");
        build["id"]
            .as_str()
            .map(str::to_string)
            .context("no id in the submit reply")
    }

    pub async fn get(&self, id: &str) -> Result<Value> {
        let res = self
            .http
            .get(format!("{}/v1/builds/{id}", self.url))
            .bearer_auth(&self.secret)
            .send()
            .await?;
        let (status, body) = crate::executor::json_reply(res).await?;
        if status != 200 {
            bail!("GET build {id}: {status} {body}");
        }
        Ok(body)
    }

    /// Waits until the build is final (or `limit` passes) and returns it.
    pub async fn wait(&self, id: &str, limit: Duration) -> Result<Value> {
        self.wait_for(id, limit, |b| {
            matches!(
                b["status"].as_str(),
                Some("succeeded" | "failed" | "cancelled")
            )
        })
        .await
    }

    pub async fn wait_for(
        &self,
        id: &str,
        limit: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let deadline = Instant::now() + limit;
        loop {
            let build = self.get(id).await?;
            if done(&build) {
                return Ok(build);
            }
            if Instant::now() > deadline {
                bail!("build {id} did not get there in {limit:?}: {build}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn logs(&self, id: &str) -> Result<String> {
        let res = self
            .http
            .get(format!("{}/v1/builds/{id}/logs", self.url))
            .bearer_auth(&self.secret)
            .send()
            .await?;
        Ok(res.text().await?)
    }

    pub async fn cancel(&self, id: &str) -> Result<(u16, Value)> {
        let res = self
            .http
            .delete(format!("{}/v1/builds/{id}", self.url))
            .bearer_auth(&self.secret)
            .send()
            .await?;
        crate::executor::json_reply(res).await
    }
}

/// A git build request for `image`.
pub fn git_build(url: &str, reference: Option<&str>, image: &str, entrypoint: &str) -> Value {
    let mut source = serde_json::json!({"type": "git", "url": url});
    if let Some(r) = reference {
        source["ref"] = Value::String(r.to_string());
    }
    serde_json::json!({"source": source, "image": image, "entrypoint": entrypoint, "timeout": 120})
}

/// Counts of builds by status.
pub fn by_status(builds: &[Value]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for build in builds {
        *counts
            .entry(build["status"].as_str().unwrap_or("?").to_string())
            .or_default() += 1;
    }
    counts
}
