//! `hearth-executor`: parse the configuration, start tracing, serve the API until SIGTERM/SIGINT.

use anyhow::Context;
use clap::Parser;
use hearth_executor::config::Config;

/// mimalloc rather than glibc's malloc: every execution allocates and frees a few dozen small
/// buffers, often on different worker threads.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut config = Config::parse();
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
    // Docker or Swarm (`OPR_EXECUTOR_ADAPTER`); may name the executor after its replica.
    let adapter = hearth_executor::connect_adapter(&mut config).await?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("failed to listen on {}", config.listen))?;
    let executor = hearth_executor::prepare(config, adapter).await?;
    tracing::info!(address = %listener.local_addr()?, "executor listening");
    hearth_executor::run(executor, listener, shutdown_signal()).await
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
