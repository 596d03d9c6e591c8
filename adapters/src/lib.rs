//! Where runtimes live. `trait Adapter` is everything the executor asks of a container platform:
//! create, start, stop and remove a runtime, exec a command in it with live output and a timeout,
//! hand it its code, read a file out of it, list and inspect runtimes by label, and networks.
//!
//! Layout:
//! - this file: the trait, the value types it speaks ([`RuntimeSpec`], [`RuntimeInfo`],
//!   [`Endpoint`]) and [`Error`];
//! - [`docker`]: the implementation on the Docker engine (bollard);
//! - [`swarm`]: the implementation on Docker Swarm, one service per runtime (bollard);
//! - [`fake`]: a recording in-memory fake for the executor's unit tests.
//!
//! The executor never sees bollard types: engine errors are mapped into
//! `NotFound / Conflict / Timeout / Unavailable / Backend`. Nothing here assumes the executor and
//! the runtime share a host folder: code goes in through [`Adapter::put_file`] and comes out
//! through [`Adapter::read_file`], so a Swarm implementation, where a runtime may land on another
//! node, fits the same trait. A host folder for per-request log files is an optional fast path
//! ([`RuntimeSpec::logs_dir`]) that only adapters answering [`Adapter::shares_host_folders`] take.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::stream::BoxStream;

pub mod docker;
pub mod fake;
pub mod swarm;

/// The label every container of a Hearth executor carries (value: the executor's name), so an
/// executor can find, adopt or remove its runtimes at boot.
pub const EXECUTOR_LABEL: &str = "hearth.executor";
/// The label holding the runtime id (the API's `runtimeId`).
pub const RUNTIME_LABEL: &str = "hearth.runtime-id";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}: not found")]
    NotFound(String),
    #[error("{0}: conflict")]
    Conflict(String),
    #[error("{0}: timed out")]
    Timeout(String),
    #[error("{0}: container platform unavailable")]
    Unavailable(String),
    #[error("{0}")]
    Backend(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How a platform restarts a runtime that exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RestartPolicy {
    #[default]
    No,
    Always,
    OnFailure,
    UnlessStopped,
}

impl RestartPolicy {
    /// Parses the API's names (`no`, `always`, `on-failure`, `unless-stopped`).
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "" | "no" => Some(Self::No),
            "always" => Some(Self::Always),
            "on-failure" => Some(Self::OnFailure),
            "unless-stopped" => Some(Self::UnlessStopped),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::No => "no",
            Self::Always => "always",
            Self::OnFailure => "on-failure",
            Self::UnlessStopped => "unless-stopped",
        }
    }
}

/// Everything needed to create one runtime.
#[derive(Debug, Clone, Default)]
pub struct RuntimeSpec {
    /// Unique name on the platform; also the runtime's hostname on its networks.
    pub name: String,
    pub image: String,
    /// `None`: the image's default command.
    pub cmd: Option<Vec<String>>,
    pub env: Vec<(String, String)>,
    pub labels: HashMap<String, String>,
    pub working_dir: Option<String>,
    /// CPU quota in cores (0: unlimited).
    pub cpus: f64,
    /// Memory limit in MB (0: unlimited).
    pub memory_mb: u64,
    /// Maximum number of processes (0: unlimited).
    pub pids_limit: i64,
    /// Networks to attach the runtime to (they must exist, see [`Adapter::ensure_network`]).
    pub networks: Vec<String>,
    pub restart_policy: RestartPolicy,
    /// The port the runtime serves on (3000 for runtime images).
    pub port: u16,
    /// Optional fast path: a folder of the executor's host bound at `/mnt/logs`, honoured only
    /// when [`Adapter::shares_host_folders`] is true.
    pub logs_dir: Option<PathBuf>,
}

/// Where the executor reaches a runtime's port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// What the platform says about one runtime.
#[derive(Debug, Clone)]
pub struct RuntimeInfo {
    /// Platform id (container id, service id).
    pub id: String,
    pub name: String,
    pub image: String,
    pub labels: HashMap<String, String>,
    pub running: bool,
    pub created: SystemTime,
    /// Where the runtime's port is reachable, when it is running.
    pub endpoint: Option<Endpoint>,
}

/// The end of an exec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecExit {
    pub exit_code: i64,
}

/// Receives an exec's output as it arrives (stdout and stderr interleaved).
pub type OutputSink<'a> = &'a (dyn Fn(&[u8]) + Send + Sync);

/// A container platform that runs runtimes.
#[async_trait]
pub trait Adapter: Send + Sync + 'static {
    /// Creates (does not start) a runtime. `Conflict` when the name is taken.
    async fn create(&self, spec: &RuntimeSpec) -> Result<String>;

    /// Places one file (`content`) at `path` inside a created or running runtime, creating
    /// missing parent folders is not required: the parent must exist in the image.
    async fn put_file(&self, id: &str, path: &str, content: Bytes) -> Result<()>;

    /// Starts a created runtime and returns where its port is reachable.
    async fn start(&self, id: &str) -> Result<Endpoint>;

    /// Stops a runtime, killing it after `grace`.
    async fn stop(&self, id: &str, grace: Duration) -> Result<()>;

    /// Removes a runtime (running or not) with its anonymous volumes. `NotFound` if absent.
    async fn remove(&self, id: &str) -> Result<()>;

    /// Runs `cmd` in a running runtime, streaming its output to `sink`. `Timeout` when it runs
    /// longer than `timeout` (the command is then abandoned, the runtime keeps running).
    async fn exec(
        &self,
        id: &str,
        cmd: &[String],
        timeout: Duration,
        sink: OutputSink<'_>,
    ) -> Result<ExecExit>;

    /// Streams the content of one regular file out of a runtime. `NotFound` if it is absent.
    async fn read_file(&self, id: &str, path: &str) -> Result<BoxStream<'static, Result<Bytes>>>;

    /// Runtimes carrying every given label (`key=value`), running or not.
    async fn list(&self, labels: &[(String, String)]) -> Result<Vec<RuntimeInfo>>;

    /// One runtime by id or name. `NotFound` if absent.
    async fn inspect(&self, id: &str) -> Result<RuntimeInfo>;

    /// Creates the network if it does not exist yet.
    async fn ensure_network(&self, name: &str) -> Result<()>;

    /// Whether a host folder of the executor can be bound into runtimes
    /// ([`RuntimeSpec::logs_dir`]).
    fn shares_host_folders(&self) -> bool;

    /// Whether [`Adapter::put_file`] works on a runtime that is created but not started. When
    /// false (Swarm: creating a service starts it), the executor hands execution runtimes their
    /// code over HTTP with the pool protocol (`runtimes/pool-protocol.md`) instead.
    fn places_files_before_start(&self) -> bool {
        true
    }
}
