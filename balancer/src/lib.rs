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
//! [`serve_threads`] serves on one thread per core, each with its own listening socket and
//! runtime (what `main` runs); [`run`] serves on one listener in the caller's runtime (tests).
//! Both serve until `shutdown` resolves, then drain calls in flight.

pub mod client;
pub mod config;
pub mod error;
pub mod metrics;
pub mod proxy;
pub mod routing;
pub mod service;
pub mod upstream;
pub mod wire;

use std::cell::Cell;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;

pub use config::Config;
pub use error::Error;
pub use service::Balancer;

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// The serving thread this runs on ([`serve_threads`]): 0 on the first and off serving threads.
/// Idle connections to executors are kept per serving thread, so a call never picks up a
/// connection another thread's runtime polls.
pub fn worker() -> usize {
    WORKER.with(Cell::get)
}

/// The async runtime of one serving thread: tokio's current-thread scheduler, no thread but the
/// one that polls the sockets (about 15 % less CPU per request than one worker of the
/// multi-thread scheduler, BENCHMARKS.md).
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// `workers` listening sockets on `addr`, all bound with `SO_REUSEPORT`, so the kernel spreads
/// new connections over them (the port of the first when `addr` asks for any port).
pub fn listeners(addr: SocketAddr, workers: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    let mut addr = addr;
    let mut sockets = Vec::with_capacity(workers);
    for _ in 0..workers.max(1) {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        let listener: std::net::TcpListener = socket.into();
        addr = listener.local_addr()?;
        sockets.push(listener);
    }
    Ok(sockets)
}

/// Serves on one thread per listener (from [`listeners`]), each with its own current-thread
/// runtime and its own idle connections to executors, so a call, its client connection and its
/// executor connection stay on one thread (nginx's worker model). The first listener is served
/// on the calling thread, which also runs discovery and probes and waits for `shutdown`; then
/// every thread drains its calls in flight.
pub fn serve_threads(
    balancer: Arc<Balancer>,
    listeners: Vec<std::net::TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let main = runtime()?;
    // The executors are known before any thread accepts a call.
    main.block_on(balancer.refresh());
    let (stop, stopping) = watch::channel(false);
    let mut listeners = listeners.into_iter();
    let first = listeners
        .next()
        .ok_or_else(|| std::io::Error::other("no listener to serve on"))?;
    let mut threads = Vec::new();
    for (i, listener) in listeners.enumerate() {
        let balancer = balancer.clone();
        let mut stopping = stopping.clone();
        let thread = std::thread::Builder::new()
            .name(format!("balancer-{}", i + 1))
            .spawn(move || -> Result<(), Error> {
                WORKER.with(|w| w.set(i + 1));
                runtime()?.block_on(async move {
                    let listener = TcpListener::from_std(listener)?;
                    let shutdown = async move {
                        let _ = stopping.wait_for(|stop| *stop).await;
                    };
                    serve(balancer, listener, shutdown).await;
                    Ok(())
                })
            })?;
        threads.push(thread);
    }
    let served = main.block_on(async move {
        let listener = TcpListener::from_std(first)?;
        let shutdown = async move {
            shutdown.await;
            let _ = stop.send(true);
        };
        run_loops(balancer, listener, shutdown).await
    });
    for thread in threads {
        match thread.join() {
            Ok(result) => result?,
            Err(_) => return Err(std::io::Error::other("a serving thread panicked").into()),
        }
    }
    served
}

/// Serves the API on one listener until `shutdown` resolves, then waits (up to the configured
/// grace) for calls in flight. Discovery and probes run while it serves.
pub async fn run(
    balancer: Arc<Balancer>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    balancer.refresh().await;
    run_loops(balancer, listener, shutdown).await
}

/// [`run`] after the first refresh.
async fn run_loops(
    balancer: Arc<Balancer>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let discovery = tokio::spawn(balancer.clone().discovery_loop());
    let probes = tokio::spawn(balancer.clone().probe_loop());
    serve(balancer, listener, shutdown).await;
    discovery.abort();
    probes.abort();
    Ok(())
}

/// Accepts and serves connections until `shutdown`, then drains them.
async fn serve(
    balancer: Arc<Balancer>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
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
}
