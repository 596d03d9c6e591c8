//! The executor: the Open Runtimes Executor HTTP API (`/v1/runtimes`, executions, builds, logs,
//! commands, health, metrics) on top of an [`hearth_adapters::Adapter`]. It cold-starts runtime
//! containers of the images in `runtimes/`, guards each with its own secret, forwards calls over
//! the runtime protocol (v5 and legacy v2), and returns status, headers, body, logs and errors.
//!
//! Layout:
//! - [`config`]: the `OPR_EXECUTOR_*` configuration (parsed in `main`);
//! - [`api`]: routes, auth, parameters and reply shapes (the only module that knows axum);
//! - [`runtimes`]: the domain: the runtime table, cold starts, executions, builds, maintenance;
//! - [`invoke`]: the runtime protocol client (v5, v2, readiness probe);
//! - [`storage`]: sources and artifacts on a local folder or S3;
//! - [`logs`]: per-request log files; [`metrics`]: Prometheus counters;
//! - [`error`]: the error kinds of the API.
//!
//! [`run`] serves the API on a listener until `shutdown` resolves, then drains. Each client
//! connection starts on [`api::wire`], the executor's own HTTP/1.1 path for executions.

pub mod api;
pub mod config;
pub mod error;
pub mod invoke;
pub mod logs;
pub mod metrics;
pub mod runtimes;
pub mod storage;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hearth_adapters::Adapter;
use tokio::net::TcpListener;

pub use config::Config;
pub use runtimes::Executor;

/// Builds the executor service: opens storage, ensures networks, adopts running runtimes.
pub async fn prepare(config: Config, adapter: Arc<dyn Adapter>) -> anyhow::Result<Arc<Executor>> {
    let storage = storage::Storage::open(&config.storage, &config.storage_root)?;
    for network in &config.networks {
        if !network.is_empty() {
            adapter.ensure_network(network).await?;
        }
    }
    let name = if config.name.is_empty() {
        hostname()
    } else {
        config.name.clone()
    };
    let executor = Arc::new(Executor::new(config, adapter, storage, name));
    let (adopted, removed) = executor.adopt_at_boot().await?;
    tracing::info!(executor = %executor.name, adopted, removed, "reconciled runtimes at boot");
    for image in executor.config.images.iter().filter(|i| !i.is_empty()) {
        tracing::info!(image = %image, pool = executor.config.pool, "image listed in OPR_EXECUTOR_IMAGES");
    }
    executor.declare_boot_pools();
    Ok(executor)
}

/// Serves the API until `shutdown` resolves, then waits (up to the configured grace) for
/// executions in flight. Runtimes keep running: the next executor adopts them.
pub async fn run(
    executor: Arc<Executor>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let maintenance = tokio::spawn(executor.clone().maintenance_loop(stop_rx.clone()));
    let pools = tokio::spawn(executor.clone().pool_loop(stop_rx));
    let app = api::router(executor.clone());
    let grace = Duration::from_secs(executor.config.shutdown_grace);
    // Idle connections close at shutdown; one with a call in flight closes after its reply.
    let serving = executor.clone();
    let drained =
        hearth_conn::server::accept_until(listener, shutdown, grace, move |stream, stopping| {
            api::wire::serve(serving.clone(), app.clone(), stream, stopping)
        })
        .await;
    if !drained {
        tracing::warn!("client connections still open at the end of the shutdown grace");
    }
    let _ = stop_tx.send(true);
    let _ = maintenance.await;
    // Idle pool members go with the executor (a restarted one would remove them anyway).
    let _ = pools.await;
    // Executions the connections' drain did not wait for (a client that went away mid-call).
    let deadline = Instant::now() + grace;
    while executor.in_flight_total() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Connects the container platform `config.adapter` names (the local Docker engine, or the
/// Swarm it manages). When `config.name` is empty and the executor runs as a compose or Swarm
/// replica, it is named after the replica (`hearth-executor-2`), so a recreated replica
/// adopts the runtimes of the one it replaces; elsewhere [`prepare`] takes the hostname.
pub async fn connect_adapter(config: &mut Config) -> anyhow::Result<Arc<dyn Adapter>> {
    use anyhow::Context;
    use hearth_adapters::docker::{Addressing, DockerAdapter, DockerOptions};
    use hearth_adapters::swarm::{SwarmAdapter, SwarmOptions};

    let call_timeout = Duration::from_secs(30);
    let own_container = hostname();
    let (adapter, replica): (Arc<dyn Adapter>, _) = match config.adapter {
        config::AdapterKind::Docker => {
            let addressing = match config.addressing {
                config::Addressing::Published => Addressing::Published,
                config::Addressing::Network => Addressing::Network,
            };
            let docker = DockerAdapter::connect(DockerOptions {
                addressing,
                call_timeout,
            })
            .await
            .context("failed to connect to Docker")?;
            let replica = docker.replica_name(&own_container).await;
            (Arc::new(docker), replica)
        }
        config::AdapterKind::Swarm => {
            anyhow::ensure!(
                config.addressing == config::Addressing::Network,
                "OPR_EXECUTOR_ADDRESSING=published does not work with OPR_EXECUTOR_ADAPTER=swarm: \
                 Swarm runtimes are reached by service name on their overlay network"
            );
            let swarm = SwarmAdapter::connect(SwarmOptions {
                call_timeout,
                ..SwarmOptions::default()
            })
            .await
            .context("failed to connect to Docker Swarm")?;
            let replica = swarm.docker().replica_name(&own_container).await;
            (Arc::new(swarm), replica)
        }
    };
    if config.name.is_empty() {
        if let Some(name) = replica {
            config.name = name;
        }
    }
    Ok(adapter)
}

fn hostname() -> String {
    hostname_or("hearth-executor")
}

/// This machine's (or container's) hostname, or `fallback` when it cannot be read.
pub fn hostname_or(fallback: &str) -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| fallback.to_string())
}
