//! The build service's configuration: clap derive with an env variable on every field, parsed
//! once in `main` (tests build it with [`Config::for_tests`]).

use std::net::SocketAddr;
use std::path::PathBuf;

/// What this process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// The HTTP API and workers.
    All,
    /// Only the HTTP API.
    Api,
    /// Only workers.
    Worker,
}

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "hearth-builds",
    about = "Hearth's build service: build functions from git or archives through a RabbitMQ queue"
)]
pub struct Config {
    /// Address of the HTTP API.
    #[arg(long, env = "HEARTH_BUILDS_LISTEN", default_value = "0.0.0.0:80")]
    pub listen: SocketAddr,
    /// The API key (the executor's secret): the API checks it, workers send it to the executor.
    #[arg(long, env = "OPR_EXECUTOR_SECRET", hide_env_values = true)]
    pub secret: String,
    /// The executor API that runs builds (the balancer in the stack).
    #[arg(
        long,
        env = "HEARTH_BUILDS_EXECUTOR",
        default_value = "http://balancer:80"
    )]
    pub executor: String,
    /// The AMQP broker.
    #[arg(
        long,
        env = "HEARTH_BUILDS_AMQP",
        default_value = "amqp://rabbitmq:5672/%2f"
    )]
    pub amqp: String,
    /// Base name of the queues (`<q>`, `<q>.retry`, `<q>.dead`) and of the events exchange.
    #[arg(long, env = "HEARTH_BUILDS_QUEUE", default_value = "hearth.builds")]
    pub queue: String,
    /// Where build records, logs and leases live; every process of one service shares it.
    #[arg(
        long,
        env = "HEARTH_BUILDS_STATE_DIR",
        default_value = "/var/lib/hearth-builds"
    )]
    pub state_dir: PathBuf,
    /// Where storage paths live here for local storage; the executor must see the same paths.
    #[arg(long, env = "HEARTH_BUILDS_STORAGE_ROOT", default_value = "/storage")]
    pub storage_root: PathBuf,
    /// The executor's storage (`local://localhost` or `s3://key:secret@host:port/bucket?region=…`):
    /// sources and artifacts go where the executor reads them.
    #[arg(
        long,
        env = "OPR_EXECUTOR_CONNECTION_STORAGE",
        default_value = "local://localhost",
        hide_env_values = true
    )]
    pub storage: String,
    #[arg(long, env = "HEARTH_BUILDS_ROLE", value_enum, default_value = "all")]
    pub role: Role,
    /// Builds one worker process runs at once (also its prefetch).
    #[arg(long, env = "HEARTH_BUILDS_CONCURRENCY", default_value_t = 2)]
    pub concurrency: u16,
    /// Largest source, fetched or packed, in MB.
    #[arg(long, env = "HEARTH_BUILDS_MAX_SOURCE_MB", default_value_t = 100)]
    pub max_source_mb: u64,
    /// Seconds a git fetch may take.
    #[arg(long, env = "HEARTH_BUILDS_FETCH_TIMEOUT", default_value_t = 120)]
    pub fetch_timeout: u64,
    /// Attempts before a build that keeps failing on infrastructure is dead-lettered.
    #[arg(long, env = "HEARTH_BUILDS_MAX_ATTEMPTS", default_value_t = 5)]
    pub max_attempts: u32,
    /// First retry delay in ms (doubles per attempt, at most a minute).
    #[arg(long, env = "HEARTH_BUILDS_RETRY_DELAY_MS", default_value_t = 1000)]
    pub retry_delay_ms: u64,
    /// Seconds a worker's claim on a build lasts without renewal (it renews every 2 s).
    #[arg(long, env = "HEARTH_BUILDS_LEASE", default_value_t = 10)]
    pub lease: u64,
    /// Seconds to let builds in flight finish on shutdown; unfinished ones are redelivered.
    #[arg(long, env = "HEARTH_BUILDS_SHUTDOWN_GRACE", default_value_t = 30)]
    pub shutdown_grace: u64,
}

impl Config {
    /// A configuration for tests: everything local, small limits.
    pub fn for_tests(
        secret: &str,
        executor: &str,
        amqp: &str,
        queue: &str,
        state_dir: PathBuf,
        storage_root: PathBuf,
    ) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            secret: secret.to_string(),
            executor: executor.to_string(),
            amqp: amqp.to_string(),
            queue: queue.to_string(),
            state_dir,
            storage_root,
            storage: "local://localhost".to_string(),
            role: Role::All,
            concurrency: 2,
            max_source_mb: 100,
            fetch_timeout: 60,
            max_attempts: 5,
            retry_delay_ms: 200,
            lease: 10,
            shutdown_grace: 30,
        }
    }
}
