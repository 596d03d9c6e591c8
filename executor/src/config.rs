//! The executor's configuration: the Open Runtimes Executor's env variables with their defaults,
//! plus Hearth's own knobs (all `OPR_EXECUTOR_*`). Parsed once in `main`; the library never reads
//! the environment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

/// Which container platform runs the runtimes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AdapterKind {
    /// Containers on the local Docker engine.
    Docker,
    /// One Docker Swarm service per runtime (the executor must run on a manager node).
    Swarm,
}

/// How the executor reaches its runtimes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Addressing {
    /// Runtime port published on 127.0.0.1 (executor on the host, as in tests).
    Published,
    /// Runtime reached by its name on the shared network (executor in a container).
    Network,
}

#[derive(Debug, Clone, Parser)]
#[command(
    name = "hearth-executor",
    version,
    about = "Hearth executor (Open Runtimes Executor API)"
)]
pub struct Config {
    /// Bearer key every route but `/v1/health` requires.
    #[arg(long, env = "OPR_EXECUTOR_SECRET", hide_env_values = true)]
    pub secret: String,

    /// `development` adds detail (the full cause) to error messages.
    #[arg(long, env = "OPR_EXECUTOR_ENV", default_value = "production")]
    pub env: String,

    /// Address the API listens on.
    #[arg(long, env = "OPR_EXECUTOR_LISTEN", default_value = "0.0.0.0:80")]
    pub listen: SocketAddr,

    /// Comma-separated Docker networks runtimes join (created if missing); the first is used to
    /// reach them with `network` addressing.
    #[arg(
        long,
        env = "OPR_EXECUTOR_NETWORK",
        default_value = "hearth-runtimes",
        value_delimiter = ','
    )]
    pub networks: Vec<String>,

    #[arg(
        long,
        env = "OPR_EXECUTOR_ADDRESSING",
        value_enum,
        default_value = "network"
    )]
    pub addressing: Addressing,

    /// Seconds without executions after which a runtime is removed.
    #[arg(long, env = "OPR_EXECUTOR_INACTIVE_THRESHOLD", default_value_t = 60)]
    pub inactive_threshold: u64,

    /// Seconds between maintenance passes (idle reaping, reconciliation with Docker).
    #[arg(long, env = "OPR_EXECUTOR_MAINTENANCE_INTERVAL", default_value_t = 30)]
    pub maintenance_interval: u64,

    /// Comma-separated protocol versions runtimes may use (`v5`, `v2`).
    #[arg(
        long,
        env = "OPR_EXECUTOR_RUNTIME_VERSIONS",
        default_value = "v5",
        value_delimiter = ','
    )]
    pub runtime_versions: Vec<String>,

    /// Storage for sources and artifacts: `local://localhost` (the folder `storage_root`) or
    /// `s3://KEY:SECRET@HOST[:PORT]/BUCKET?region=REGION[&insecure=true]`.
    #[arg(
        long,
        env = "OPR_EXECUTOR_CONNECTION_STORAGE",
        default_value = "local://localhost"
    )]
    pub storage: String,

    /// Root of local storage; `source`/`destination` paths are absolute paths under it.
    #[arg(long, env = "OPR_EXECUTOR_STORAGE_ROOT", default_value = "/storage")]
    pub storage_root: PathBuf,

    /// Attempts to reach a runtime that refuses connections after it was healthy.
    #[arg(long, env = "OPR_EXECUTOR_RETRY_ATTEMPTS", default_value_t = 5)]
    pub retry_attempts: u32,

    #[arg(long, env = "OPR_EXECUTOR_RETRY_DELAY_MS", default_value_t = 500)]
    pub retry_delay_ms: u64,

    /// Comma-separated images to check at boot.
    #[arg(
        long,
        env = "OPR_EXECUTOR_IMAGES",
        default_value = "",
        value_delimiter = ','
    )]
    pub images: Vec<String>,

    /// Host folder for per-runtime log folders, bound into runtimes at `/mnt/logs`. When the
    /// executor runs in a container, mount it at the same path as on the host.
    #[arg(
        long,
        env = "OPR_EXECUTOR_RUNTIMES_DIR",
        default_value = "/tmp/hearth-executor"
    )]
    pub runtimes_dir: PathBuf,

    /// Name of this executor: prefixes its runtimes' names and labels them, so several
    /// executors can share one Docker engine. Defaults to the host name.
    #[arg(long, env = "OPR_EXECUTOR_NAME", default_value = "")]
    pub name: String,

    /// Comma-separated `key=value` labels added to every runtime container (e.g. `team=a`).
    #[arg(
        long,
        env = "OPR_EXECUTOR_LABELS",
        default_value = "",
        value_delimiter = ','
    )]
    pub labels: Vec<String>,

    /// Most runtimes this executor holds at once.
    #[arg(long, env = "OPR_EXECUTOR_MAX_RUNTIMES", default_value_t = 100)]
    pub max_runtimes: usize,

    /// Process limit of every runtime container.
    #[arg(long, env = "OPR_EXECUTOR_PIDS_LIMIT", default_value_t = 1024)]
    pub pids_limit: i64,

    /// Seconds to let in-flight requests finish on shutdown.
    #[arg(long, env = "OPR_EXECUTOR_SHUTDOWN_GRACE", default_value_t = 30)]
    pub shutdown_grace: u64,

    /// Threads serving the API and the calls to runtimes (default: half the cores, at least
    /// one). The executor shares its host with the runtimes that do the actual work; on 2 cores
    /// one thread gave ~10 % more executions per second at less CPU each than two (BENCHMARKS.md).
    #[arg(long, env = "OPR_EXECUTOR_WORKER_THREADS")]
    pub worker_threads: Option<usize>,

    /// Call runtimes over a Unix socket in the log folder they share with the executor
    /// (`runtimes/socket.md`): no TCP, bridge or netfilter on that leg. Runtimes whose image does
    /// not serve the socket are called over TCP. `false`: always TCP.
    #[arg(long, env = "OPR_EXECUTOR_RUNTIME_SOCKETS", default_value_t = true, action = clap::ArgAction::Set)]
    pub runtime_sockets: bool,

    /// Serve executions on the executor's own HTTP/1.1 path (`api::wire`): the request head
    /// parsed once, the reply written whole, no router or middleware. Every other route, and
    /// any request that path does not take, goes to hyper and axum as before. `false`: all
    /// requests go to hyper and axum.
    #[arg(long, env = "OPR_EXECUTOR_FAST_PATH", default_value_t = true, action = clap::ArgAction::Set)]
    pub fast_path: bool,

    /// Container platform for runtimes: `docker` or `swarm`.
    #[arg(
        long,
        env = "OPR_EXECUTOR_ADAPTER",
        value_enum,
        default_value = "docker"
    )]
    pub adapter: AdapterKind,

    /// Warm pools: prestarted generic runtimes per image and resource shape, specialised on a
    /// function's first execution (`runtimes/pool-protocol.md`). `false` turns them off.
    #[arg(long, env = "OPR_EXECUTOR_POOL", default_value_t = true, action = clap::ArgAction::Set)]
    pub pool: bool,

    /// Idle pool members kept per image listed in `OPR_EXECUTOR_IMAGES` (default shape), at least.
    #[arg(long, env = "OPR_EXECUTOR_POOL_MIN", default_value_t = 1)]
    pub pool_min: usize,

    /// Most idle members of one pool (the reactive part grows with the last minute's cold
    /// starts up to this).
    #[arg(long, env = "OPR_EXECUTOR_POOL_MAX", default_value_t = 8)]
    pub pool_max: usize,

    /// Most memory (MB, by the members' limits) that idle pool members may hold in all.
    #[arg(long, env = "OPR_EXECUTOR_POOL_MEMORY_MB", default_value_t = 4096)]
    pub pool_memory_mb: u64,

    /// Most pool containers being created at a time.
    #[arg(long, env = "OPR_EXECUTOR_POOL_CREATIONS", default_value_t = 2)]
    pub pool_creations: usize,
}

impl Config {
    pub fn development(&self) -> bool {
        self.env == "development"
    }

    pub fn inactive_threshold(&self) -> Duration {
        Duration::from_secs(self.inactive_threshold)
    }

    pub fn maintenance_interval(&self) -> Duration {
        Duration::from_secs(self.maintenance_interval.max(1))
    }

    pub fn retry_delay(&self) -> Duration {
        Duration::from_millis(self.retry_delay_ms)
    }

    /// A configuration for tests: an executor on the host reaching runtimes through ports
    /// published on 127.0.0.1, its runtimes labelled `hearth.test=1`.
    pub fn for_tests(secret: &str, storage_root: PathBuf, runtimes_dir: PathBuf) -> Self {
        Self {
            secret: secret.to_string(),
            env: "development".to_string(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            networks: Vec::new(),
            addressing: Addressing::Published,
            inactive_threshold: 60,
            maintenance_interval: 30,
            runtime_versions: vec!["v5".to_string(), "v2".to_string()],
            storage: "local://localhost".to_string(),
            storage_root,
            retry_attempts: 5,
            retry_delay_ms: 500,
            images: Vec::new(),
            runtimes_dir,
            name: "hearth-test".to_string(),
            labels: vec!["hearth.test=1".to_string()],
            max_runtimes: 100,
            pids_limit: 1024,
            shutdown_grace: 5,
            worker_threads: None,
            runtime_sockets: true,
            fast_path: true,
            adapter: AdapterKind::Docker,
            pool: false,
            pool_min: 1,
            pool_max: 8,
            pool_memory_mb: 4096,
            pool_creations: 2,
        }
    }
}
