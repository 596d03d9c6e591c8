//! The repository's stack on Docker Swarm for the end-to-end test: `make swarm-up` in the
//! working tree, `make swarm-down` when the guard drops (also when the test fails), the `docker`
//! CLI calls the test makes, what the stack may leave behind, and the gateway address its build
//! workers reach a git daemon on.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::runtime::repo_root;

/// The Swarm tests share the engine's swarm (one may init it, `make swarm-down` may leave it):
/// each holds this for its whole run.
static SWARM: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub async fn exclusive() -> tokio::sync::MutexGuard<'static, ()> {
    SWARM.lock().await
}

/// Makes this engine a single-node swarm if it is in none (and leaves it so: later tests and
/// `make swarm-up` reuse it).
pub fn ensure_swarm() -> Result<()> {
    if docker(&["info", "--format", "{{.Swarm.LocalNodeState}}"])? != "active" {
        docker(&["swarm", "init", "--advertise-addr", "127.0.0.1"])?;
    }
    Ok(())
}

/// Removes the services and networks a test made (by name or id) when dropped.
#[derive(Default)]
pub struct Cleanup {
    pub services: Vec<String>,
    pub networks: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for service in &self.services {
            let _ = docker(&["service", "rm", service]);
        }
        for network in &self.networks {
            // The network goes once the services' tasks are down.
            for _ in 0..60 {
                if docker(&["network", "rm", network]).is_ok()
                    || docker(&["network", "inspect", network]).is_err()
                {
                    break;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
}

/// The stack's name (the Makefile's `STACK`): services are `hearth_executor`, ...
pub const STACK: &str = "hearth";
/// Where the stack's balancer answers.
pub const API: &str = "http://127.0.0.1:8080";

/// Runs `make <target>` in the repository, echoing its output; fails when make does.
pub fn make(target: &str) -> Result<()> {
    let output = Command::new("make")
        .arg(target)
        .current_dir(repo_root())
        // Not make's jobserver of a surrounding `make test`.
        .env_remove("MAKEFLAGS")
        .env_remove("MFLAGS")
        .env_remove("MAKELEVEL")
        .output()
        .with_context(|| format!("failed to run make {target}"))?;
    print!("{}", String::from_utf8_lossy(&output.stdout));
    eprint!("{}", String::from_utf8_lossy(&output.stderr));
    ensure!(output.status.success(), "make {target} failed");
    Ok(())
}

/// Runs the docker CLI; returns its trimmed stdout, fails with its stderr.
pub fn docker(args: &[&str]) -> Result<String> {
    let output = Command::new("docker")
        .args(args)
        .output()
        .context("failed to run docker")?;
    ensure!(
        output.status.success(),
        "docker {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}

/// Non-empty output lines.
pub fn lines(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}

/// The stack brought up by `make swarm-up`; `make swarm-down` runs on drop unless [`down`]
/// ran.
///
/// [`down`]: SwarmStack::down
pub struct SwarmStack {
    /// The executors' secret (from the repository's `.env`).
    pub secret: String,
    up: bool,
}

impl SwarmStack {
    pub fn up() -> Result<Self> {
        // The guard exists before make runs, so a half-made stack is removed too.
        let mut stack = Self {
            secret: String::new(),
            up: true,
        };
        make("swarm-up")?;
        let env = std::fs::read_to_string(repo_root().join(".env"))
            .context("make swarm-up wrote no .env")?;
        stack.secret = env
            .lines()
            .find_map(|l| l.strip_prefix("OPR_EXECUTOR_SECRET="))
            .context("no OPR_EXECUTOR_SECRET in .env")?
            .trim()
            .to_string();
        Ok(stack)
    }

    /// `make swarm-down`, once.
    pub fn down(&mut self) -> Result<()> {
        self.up = false;
        make("swarm-down")
    }
}

impl Drop for SwarmStack {
    fn drop(&mut self) {
        if self.up {
            if let Err(err) = self.down() {
                eprintln!("swarm: cleanup failed: {err:#}");
            }
        }
    }
}

/// Everything of the stack still on the engine: services, containers, networks, secrets and
/// configs (by the stack's label or the runtimes' `hearth.stack` label), one line each.
pub fn leftovers() -> Result<Vec<String>> {
    let stack = format!("label=com.docker.stack.namespace={STACK}");
    let runtimes = format!("label=hearth.stack={STACK}");
    let mut left = Vec::new();
    let swarm = docker(&["info", "--format", "{{.Swarm.LocalNodeState}}"])? == "active";
    let mut ask = |what: &str, args: &[&str]| -> Result<()> {
        for line in lines(&docker(args)?) {
            left.push(format!("{what} {line}"));
        }
        Ok(())
    };
    for filter in [&stack, &runtimes] {
        ask(
            "container",
            &["ps", "-a", "--filter", filter, "--format", "{{.Names}}"],
        )?;
        ask(
            "network",
            &["network", "ls", "--filter", filter, "--format", "{{.Name}}"],
        )?;
    }
    ask(
        "network",
        &[
            "network",
            "ls",
            "--filter",
            "name=^hearth-swarm$",
            "--format",
            "{{.Name}}",
        ],
    )?;
    if swarm {
        for filter in [&stack, &runtimes] {
            ask(
                "service",
                &["service", "ls", "--filter", filter, "--format", "{{.Name}}"],
            )?;
        }
        ask(
            "secret",
            &["secret", "ls", "--filter", &stack, "--format", "{{.Name}}"],
        )?;
        ask(
            "config",
            &["config", "ls", "--filter", &stack, "--format", "{{.Name}}"],
        )?;
    }
    Ok(left)
}

/// The host's address on `docker_gwbridge`, which the swarm's containers reach the host by.
pub fn gateway() -> Result<String> {
    let address = docker(&[
        "network",
        "inspect",
        "docker_gwbridge",
        "--format",
        "{{range .IPAM.Config}}{{.Gateway}}{{end}}",
    ])?;
    ensure!(!address.is_empty(), "docker_gwbridge has no gateway");
    Ok(address)
}

/// Polls `check` every half second until it returns `Some`, for up to `limit`.
pub async fn eventually<T>(
    what: &str,
    limit: Duration,
    mut check: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + limit;
    let mut last = String::new();
    loop {
        match check() {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(err) => last = format!(": {err:#}"),
        }
        if Instant::now() > deadline {
            bail!("{what}: not after {limit:?}{last}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
