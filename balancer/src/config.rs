//! The balancer's configuration (`HEARTH_BALANCER_*` plus the executors' shared
//! `OPR_EXECUTOR_SECRET`). Parsed once in `main`; the library never reads the environment.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "hearth-balancer",
    version,
    about = "Hearth balancer: the executor API in front of many executors"
)]
pub struct Config {
    /// Address the balancer listens on.
    #[arg(long, env = "HEARTH_BALANCER_LISTEN", default_value = "0.0.0.0:80")]
    pub listen: SocketAddr,

    /// Comma-separated executors: URLs (`http://host:port`) or `host:port`, each optionally
    /// followed by `=WEIGHT`. Hostnames are re-resolved to all their A records.
    #[arg(
        long,
        env = "HEARTH_BALANCER_EXECUTORS",
        default_value = "executor:80",
        value_delimiter = ','
    )]
    pub executors: Vec<String>,

    /// The executors' Bearer key, used for the balancer's own calls (lookups). Clients' calls
    /// are forwarded with their own `Authorization` header.
    #[arg(long, env = "OPR_EXECUTOR_SECRET", hide_env_values = true)]
    pub secret: String,

    /// Seconds between DNS re-resolutions of executor hostnames.
    #[arg(long, env = "HEARTH_BALANCER_RESOLVE_INTERVAL", default_value_t = 5.0)]
    pub resolve_interval: f64,

    /// Seconds between active health probes of every executor.
    #[arg(long, env = "HEARTH_BALANCER_PROBE_INTERVAL", default_value_t = 2.0)]
    pub probe_interval: f64,

    /// Seconds a probe or a lookup may take.
    #[arg(long, env = "HEARTH_BALANCER_PROBE_TIMEOUT", default_value_t = 2.0)]
    pub probe_timeout: f64,

    /// Seconds to open a connection to an executor.
    #[arg(long, env = "HEARTH_BALANCER_CONNECT_TIMEOUT", default_value_t = 2.0)]
    pub connect_timeout: f64,

    /// Seconds an executor may take to answer (executions, builds: keep it above the longest).
    #[arg(
        long,
        env = "HEARTH_BALANCER_UPSTREAM_TIMEOUT",
        default_value_t = 900.0
    )]
    pub upstream_timeout: f64,

    /// Seconds a client may take to send a request's headers (slow clients are cut off).
    #[arg(long, env = "HEARTH_BALANCER_HEADER_TIMEOUT", default_value_t = 10.0)]
    pub header_timeout: f64,

    /// Seconds a client may leave a request body without sending a byte.
    #[arg(
        long,
        env = "HEARTH_BALANCER_BODY_IDLE_TIMEOUT",
        default_value_t = 30.0
    )]
    pub body_idle_timeout: f64,

    /// Largest request body in bytes (a 20 MiB execution body JSON-escaped fits).
    #[arg(long, env = "HEARTH_BALANCER_MAX_BODY", default_value_t = 64 * 1024 * 1024)]
    pub max_body: u64,

    /// Request bodies up to this size are held so a request that failed to connect can be
    /// retried on the next executor; larger ones stream and are not retried.
    #[arg(long, env = "HEARTH_BALANCER_REPLAY_LIMIT", default_value_t = 1024 * 1024)]
    pub replay_limit: u64,

    /// Bounded-load factor: a new runtime goes to its home unless that executor carries more
    /// than this times the average load.
    #[arg(long, env = "HEARTH_BALANCER_LOAD_FACTOR", default_value_t = 1.25)]
    pub load_factor: f64,

    /// Consecutive failed probes that eject an executor (a refused connection ejects at once).
    #[arg(long, env = "HEARTH_BALANCER_UNHEALTHY_THRESHOLD", default_value_t = 2)]
    pub unhealthy_threshold: u32,

    /// The build service (`host:port` or `http://host:port`): `/v1/builds` goes there, so users
    /// need one endpoint. Unset: those routes are 404.
    #[arg(long, env = "HEARTH_BALANCER_BUILDS")]
    pub builds: Option<String>,

    /// Seconds the balancer waits for requests in flight at shutdown.
    #[arg(long, env = "HEARTH_BALANCER_SHUTDOWN_GRACE", default_value_t = 30.0)]
    pub shutdown_grace: f64,

    /// Serving threads (default: one per core). Each has its own listening socket on the port
    /// (`SO_REUSEPORT`), its own current-thread runtime and its own idle connections to
    /// executors, so a call never changes threads (nginx's worker model): one connection costs
    /// what one thread costs, and many spread over the cores (BENCHMARKS.md).
    #[arg(long, env = "HEARTH_BALANCER_WORKER_THREADS")]
    pub worker_threads: Option<usize>,

    /// Forward executions (`POST /v1/runtimes/{id}/executions` with a body of known length up to
    /// the replay limit) on the balancer's own HTTP/1.1 path: the head is parsed once and sent on
    /// as bytes, without building it into header maps twice (`balancer/src/wire/`). `false`:
    /// every call goes through the general hyper path.
    #[arg(long, env = "HEARTH_BALANCER_FAST_PATH", default_value_t = true, action = clap::ArgAction::Set)]
    pub fast_path: bool,
}

fn secs(value: f64) -> Duration {
    Duration::try_from_secs_f64(value).unwrap_or(Duration::ZERO)
}

impl Config {
    /// Defaults with the given executors and secret, for tests (fast probes, short timeouts).
    pub fn for_tests(executors: Vec<String>, secret: &str) -> Self {
        let mut config = Self::parse_from(["hearth-balancer", "--secret", secret]);
        config.executors = executors;
        config.resolve_interval = 1.0;
        config.probe_interval = 0.2;
        config.probe_timeout = 1.0;
        config.header_timeout = 1.0;
        config.body_idle_timeout = 2.0;
        config.shutdown_grace = 5.0;
        config
    }

    pub fn resolve_interval(&self) -> Duration {
        secs(self.resolve_interval)
    }
    pub fn probe_interval(&self) -> Duration {
        secs(self.probe_interval)
    }
    pub fn probe_timeout(&self) -> Duration {
        secs(self.probe_timeout)
    }
    pub fn connect_timeout(&self) -> Duration {
        secs(self.connect_timeout)
    }
    pub fn upstream_timeout(&self) -> Duration {
        secs(self.upstream_timeout)
    }
    pub fn header_timeout(&self) -> Duration {
        secs(self.header_timeout)
    }
    pub fn body_idle_timeout(&self) -> Duration {
        secs(self.body_idle_timeout)
    }
    pub fn shutdown_grace(&self) -> Duration {
        secs(self.shutdown_grace)
    }
}
