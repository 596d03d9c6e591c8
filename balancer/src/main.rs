//! `hearth-balancer`: parse the configuration, start tracing, serve until SIGTERM/SIGINT.

use anyhow::Context;
use clap::Parser;
use hearth_balancer::{Balancer, Config};

fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    let workers = config.worker_threads.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, |cores| (cores.get() / 2).max(1))
    });
    anyhow::ensure!(
        workers > 0,
        "HEARTH_BALANCER_WORKER_THREADS must be at least 1"
    );
    hearth_balancer::runtime(workers)
        .context("failed to start the async runtime")?
        .block_on(serve(config, workers))
}

async fn serve(config: Config, workers: usize) -> anyhow::Result<()> {
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
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("failed to listen on {}", config.listen))?;
    let balancer = Balancer::new(config)?;
    tracing::info!(address = %listener.local_addr()?, workers, "balancer listening");
    hearth_balancer::run(balancer, listener, shutdown_signal()).await?;
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
