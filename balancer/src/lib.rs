//! The balancer: one endpoint for the executor API in front of many executors. Each call that
//! names a runtime goes to the executor holding it, else to the function's home (weighted
//! rendezvous hashing over healthy executors, bounded load), so functions stay warm; the list
//! is merged from all executors; executors are discovered from a static list and DNS, probed
//! actively and ejected passively; errors keep the executor's JSON shape.
//!
//! Layout:
//! - [`config`]: the `HEARTH_BALANCER_*` configuration (parsed in `main`);
//! - [`service`]: the [`Balancer`]: what each route does, the location cache, the discovery and
//!   probe loops;
//! - [`routing`]: the API's routes and rendezvous hashing with bounded load;
//! - [`upstream`]: executors, their health state, discovery targets;
//! - [`wire`]: the front: each client connection's own HTTP/1.1 path, which forwards executions
//!   as bytes, then hyper's server for everything else;
//! - [`client`]: the shared client to executors, each connection driven by the call using it;
//! - [`proxy`]: bodies, hop-by-hop headers, one call to one executor;
//! - [`metrics`]: the balancer's Prometheus counters;
//! - [`error`]: the errors, and the one place they become responses.
//!
//! [`run`] serves on a listener until `shutdown` resolves, then drains calls in flight.

pub mod client;
pub mod config;
pub mod error;
pub mod metrics;
pub mod proxy;
pub mod routing;
pub mod service;
pub mod upstream;
pub mod wire;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

pub use config::Config;
pub use error::Error;
pub use service::Balancer;

/// The async runtime for `workers` threads. One thread runs everything itself (tokio's
/// current-thread scheduler): no thread but the one that polls the sockets, and about 15 % less
/// CPU per request than one worker of the multi-thread scheduler (BENCHMARKS.md).
pub fn runtime(workers: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut multi = tokio::runtime::Builder::new_multi_thread();
        multi.worker_threads(workers);
        multi
    };
    builder.enable_all().build()
}

/// Serves the API until `shutdown` resolves, then waits (up to the configured grace) for calls
/// in flight. Discovery and probes run while it serves.
pub async fn run(
    balancer: Arc<Balancer>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    balancer.refresh().await;
    let discovery = tokio::spawn(balancer.clone().discovery_loop());
    let probes = tokio::spawn(balancer.clone().probe_loop());
    let serving = balancer.clone();
    let drained = hearth_conn::server::accept_until(
        listener,
        shutdown,
        balancer.config.shutdown_grace(),
        move |stream, stopping| wire::serve(serving.clone(), stream, stopping),
    )
    .await;
    if !drained {
        tracing::warn!("calls still in flight at the end of the shutdown grace");
    }
    discovery.abort();
    probes.abort();
    Ok(())
}
