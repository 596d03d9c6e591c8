//! `hearth-wasm-runtime`: the server of the `hearth/wasm` image, and (`precompile FILE...`) the
//! build step that compiles modules ahead of time into `FILE.cwasm`.

use anyhow::{Context, Result};
use clap::Parser;
use hearth_wasm_runtime::config::Args;
use hearth_wasm_runtime::engine::EngineBuilder;
use hearth_wasm_runtime::server::{self, Service};

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
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
    let listen = args.listen.clone();
    let config = args.into_config(std::env::vars().collect());
    let service = tokio::task::spawn_blocking(move || Service::load(config)).await??;
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("failed to listen on {listen}"))?;
    println!("HTTP server successfully started!");
    server::serve(service, listener, shutdown()).await?;
    Ok(())
}

/// Completes on SIGTERM (docker stop) or Ctrl-C.
async fn shutdown() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
