//! `hearth-wasm-runtime`: the server of the `hearth/wasm` image, and (`precompile FILE...`) the
//! build step that compiles modules ahead of time into `FILE.cwasm`.

use anyhow::{Context, Result};
use clap::Parser;
use hearth_wasm_runtime::config::Args;
use hearth_wasm_runtime::engine::EngineBuilder;
use hearth_wasm_runtime::pool;
use hearth_wasm_runtime::server::{self, Service};

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    // Read and drop the pool secret while this is the only thread (no runtime yet): neither
    // the function nor any process the server starts may see it.
    let pool_secret = std::env::var(pool::SECRET_ENV).unwrap_or_default();
    std::env::remove_var(pool::SECRET_ENV);
    let args = Args::parse();
    if let Some((cmd, files)) = args.command.split_first() {
        anyhow::ensure!(cmd == "precompile", "unknown command {cmd:?}");
        let engine = EngineBuilder::new().pooling(false).build()?;
        for file in files {
            let out = engine.precompile_file(file.as_ref())?;
            println!("precompiled {file} -> {}", out.display());
        }
        return Ok(());
    }
    let runtime = tokio::runtime::Runtime::new().context("failed to start the async runtime")?;
    runtime.block_on(run(args, pool_secret))
}

async fn run(args: Args, pool_secret: String) -> Result<()> {
    let listen = args.listen.clone();
    let socket = args.socket.clone();
    let env: Vec<(String, String)> = std::env::vars().collect();
    // Pool mode (runtimes/pool-protocol.md) starts with the engine only, no code.
    let service = tokio::task::spawn_blocking(move || match pool_secret.as_str() {
        "" => anyhow::Ok(Service::load(args.into_config(env))?),
        _ => anyhow::Ok(Service::pool(env, pool_secret)?),
    })
    .await??;
    // The socket first: once the port answers, the executor finds it there.
    let unix = (!socket.is_empty())
        .then(|| server::bind_unix_socket(socket.as_ref()))
        .flatten();
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("failed to listen on {listen}"))?;
    println!("HTTP server successfully started!");
    server::serve(service, listener, unix, shutdown()).await?;
    Ok(())
}

/// Completes on SIGTERM (docker stop) or Ctrl-C.
async fn shutdown() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        },
        Err(_) => drop(tokio::signal::ctrl_c().await),
    }
}
