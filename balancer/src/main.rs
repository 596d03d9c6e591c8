//! `hearth-balancer`: parse the configuration, start tracing, serve until SIGTERM/SIGINT.

use anyhow::Context;
use clap::Parser;
use hearth_balancer::{Balancer, Config};

fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    let workers = config.worker_threads.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    anyhow::ensure!(
        workers > 0,
        "HEARTH_BALANCER_WORKER_THREADS must be at least 1"
    );
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if std::env::var("LOG_FORMAT").as_deref() == Ok("json") {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    anyhow::ensure!(
        !config.secret.is_empty(),
        "OPR_EXECUTOR_SECRET must not be empty"
    );
    let listeners = hearth_balancer::listeners(config.listen, workers)
        .with_context(|| format!("failed to listen on {}", config.listen))?;
    let address = listeners[0].local_addr()?;
    let balancer = Balancer::new(config)?;
    tracing::info!(%address, workers, "balancer listening");
    hearth_balancer::serve_threads(balancer, listeners, shutdown_signal())?;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => return ctrl_c.await.unwrap_or_default(),
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
}
