//! The build service: builds functions from a git repository or a storage archive through a
//! durable RabbitMQ queue, and never loses one. The HTTP API stores a build, then queues it with
//! a publisher confirm; workers claim it, fetch and pack the source into storage, run the build
//! through the executor's own API (one build implementation, spread over executors by the
//! balancer) while relaying its live log, store the result, publish it, and only then ack.
//!
//! Layout:
//! - [`config`]: the service's settings (clap, env variables);
//! - [`model`]: the build request and its validation, the stored record, the job message;
//! - [`store`]: records, logs, leases and unconfirmed marks as files in the state folder;
//! - [`queue`]: the RabbitMQ topology, confirmed publishing, consuming with reconnects;
//! - [`fetch`]: git fetch under time and size limits, packing without symlink escapes;
//! - [`executor_api`]: the executor's API as a worker calls it;
//! - [`worker`]: one job from delivery to ack, retries, dead-lettering, cancellation;
//! - [`api`]: the HTTP routes.

pub mod api;
pub mod config;
pub mod error;
pub mod executor_api;
pub mod fetch;
pub mod model;
pub mod queue;
pub mod store;
pub mod worker;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

pub use config::{Config, Role};
pub use error::{Error, Result};

/// Seconds since the epoch, as the records keep time.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// Runs the service (API on `listener`, workers, or both, by `config.role`) until `shutdown`
/// completes; then stops taking work and drains builds in flight for up to the grace period.
pub async fn run(
    config: Config,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let store = store::Store::open(&config.state_dir).with_context(|| {
        format!(
            "failed to open the build store in {}",
            config.state_dir.display()
        )
    })?;
    let broker = Arc::new(queue::Broker::new(
        &config.amqp,
        queue::Topology::new(&config.queue),
    ));
    let storage = Arc::new(
        hearth_executor::storage::Storage::open(&config.storage, &config.storage_root)
            .map_err(|e| anyhow::anyhow!("failed to open storage: {e}"))?,
    );
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();

    if config.role != Role::Api {
        let executor = executor_api::ExecutorClient::new(&config.executor, &config.secret)?;
        let worker = Arc::new(worker::Worker::new(
            store.clone(),
            broker.clone(),
            executor,
            worker::WorkerConfig {
                storage: storage.clone(),
                work_dir: config.state_dir.join("work"),
                fetch: fetch::Limits {
                    timeout: Duration::from_secs(config.fetch_timeout),
                    max_bytes: config.max_source_mb * 1024 * 1024,
                },
                max_attempts: config.max_attempts.max(1),
                retry_delay: Duration::from_millis(config.retry_delay_ms),
                lease: Duration::from_secs(config.lease.max(3)),
            },
        ));
        let consumer = broker.clone();
        let stopping = stopping.clone();
        let concurrency = config.concurrency.max(1);
        tasks.spawn(async move {
            consumer
                .consume(
                    concurrency,
                    move |incoming| worker.clone().handle(incoming),
                    stopping,
                )
                .await;
        });
    }
    if config.role != Role::Worker {
        let service = Arc::new(api::Service {
            store: store.clone(),
            broker: broker.clone(),
            secret: config.secret.clone(),
            storage: storage.clone(),
            max_upload: config.max_source_mb * 1024 * 1024,
        });
        tokio::spawn(api::requeue_unpublished(service.clone()));
        let app = api::router(service);
        let mut stopping = stopping.clone();
        tasks.spawn(async move {
            let graceful = async move {
                let _ = stopping.wait_for(|s| *s).await;
            };
            if let Err(err) = axum::serve(listener, app)
                .with_graceful_shutdown(graceful)
                .await
            {
                tracing::error!(error = %err, "build API stopped");
            }
        });
    } else {
        drop(listener);
    }

    shutdown.await;
    tracing::info!("shutting down: draining builds in flight");
    let _ = stop.send(true);
    let grace = Duration::from_secs(config.shutdown_grace);
    if tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} })
        .await
        .is_err()
    {
        tracing::warn!("builds still running after the grace period; they will be redelivered");
    }
    Ok(())
}
