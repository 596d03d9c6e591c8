//! The Wasm engine wrapper: compiles a guest once, then runs it per invocation in a fresh
//! instance. It knows nothing about HTTP: an [`Invocation`] is arguments, environment variables
//! and stdin bytes; an [`Outcome`] is what the guest wrote and how it ended.
//!
//! Everything that shapes the engine is set up in one place, [`EngineBuilder`]:
//! - a **pooling allocator**, so an instantiation takes a pre-reserved slot (memory, tables,
//!   instance) and copy-on-write memory images instead of fresh `mmap`s;
//! - **epoch interruption**, driven by one ticker thread per engine, so a guest that loops is
//!   stopped at its deadline without per-instruction fuel accounting;
//! - the **memory limit** of one instance, enforced by a per-store resource limiter that turns a
//!   failed `memory.grow` into a trap (the reason reaches the errors log).
//!
//! A [`Guest`] holds a pre-linked `InstancePre`, so an invocation is `Store::new` +
//! `instantiate` + `_start`, never a compilation.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use wasmtime::{
    Config, InstanceAllocationStrategy, InstancePre, Linker, Module, PoolingAllocationConfig,
    Store, StoreLimits, StoreLimitsBuilder, Trap, TypedFunc,
};

pub use crate::wasi::Env;
use crate::wasi::{self, Deadline, Exit, Output, WasiCtx};

/// Suffix of the precompiled artifact the build step writes next to a module (`x.wasm.cwasm`).
pub const PRECOMPILED_SUFFIX: &str = ".cwasm";
/// Bytes of each pooled memory kept resident between instances and reset with memset: a small
/// function's whole memory (a C guest starts with a few 64 KiB pages).
const KEEP_RESIDENT: usize = 1 << 20;
/// The same for a pooled table (a small function's table is a few entries).
const TABLE_KEEP_RESIDENT: usize = 64 << 10;
/// Idle pool slots that keep their resident pages.
const MAX_WARM_SLOTS: u32 = 64;

/// Errors of the engine wrapper. Loading errors are what the server reports as 503.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to configure the Wasm engine: {0}")]
    Engine(String),
    #[error("Failed to load entrypoint, file {0} does not exist.")]
    Missing(String),
    #[error("failed to read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("Failed to compile {name}: {reason}")]
    Compile { name: String, reason: String },
    #[error(
        "Function signature invalid. Did you forget to export a '_start' function? \
         {name} is not a WASI command module."
    )]
    NoStart { name: String },
    #[error("failed to write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Builds an [`Engine`]: the one place where allocation, interruption and limits are decided.
///
/// ```no_run
/// use std::time::Duration;
/// let engine = hearth_wasm_runtime::engine::EngineBuilder::new()
///     .memory_limit(64 << 20)
///     .max_instances(100)
///     .epoch_tick(Duration::from_millis(5))
///     .build()
///     .unwrap();
/// ```
#[derive(Debug, Clone)]
pub struct EngineBuilder {
    memory_limit: usize,
    max_instances: u32,
    epoch_tick: Duration,
    pooling: bool,
}

impl Default for EngineBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl EngineBuilder {
    /// 512 MiB per instance, 256 concurrent instances, a 5 ms epoch tick, pooling on.
    pub fn new() -> Self {
        Self {
            memory_limit: 512 << 20,
            max_instances: 256,
            epoch_tick: Duration::from_millis(5),
            pooling: true,
        }
    }

    /// Linear-memory limit of one instance in bytes; growing past it traps.
    pub fn memory_limit(mut self, bytes: usize) -> Self {
        self.memory_limit = bytes;
        self
    }

    /// How many instances may live at once (the pool's slot count). Callers must not run more
    /// invocations concurrently (the server holds a semaphore of this size).
    pub fn max_instances(mut self, count: u32) -> Self {
        self.max_instances = count.max(1);
        self
    }

    /// Granularity of deadlines: a timed-out guest stops at most one tick late.
    pub fn epoch_tick(mut self, tick: Duration) -> Self {
        self.epoch_tick = tick.max(Duration::from_millis(1));
        self
    }

    /// Use the on-demand allocator instead of the pool (only for the build step's precompile,
    /// which instantiates nothing; the compiled code is the same either way).
    pub fn pooling(mut self, on: bool) -> Self {
        self.pooling = on;
        self
    }

    pub fn build(self) -> Result<Engine, Error> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        if self.pooling {
            let mut pool = PoolingAllocationConfig::default();
            pool.total_core_instances(self.max_instances)
                .total_memories(self.max_instances)
                .total_tables(self.max_instances)
                .max_memories_per_module(1)
                .max_tables_per_module(1)
                // Reset a slot's memory and table with memset (of the pages the guest dirtied,
                // found with PAGEMAP_SCAN where the kernel has it) instead of madvise: no page
                // faults on the next request and no TLB shootdown across the server's threads,
                // which cost more than the guest itself for small functions.
                .linear_memory_keep_resident(KEEP_RESIDENT)
                .table_keep_resident(TABLE_KEEP_RESIDENT)
                .pagemap_scan(wasmtime::Enabled::Auto)
                // What that keeps costs memory while idle: at most this many slots stay warm
                // (each ≤ 1 MiB of memory pages the guest touched + 64 KiB of table, so about
                // 68 MiB in all at worst); more
                // concurrent instances than that are reset with madvise as before.
                .max_unused_warm_slots(MAX_WARM_SLOTS);
            config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        }
        let engine = wasmtime::Engine::new(&config).map_err(|e| Error::Engine(format!("{e:#}")))?;
        let mut linker = Linker::new(&engine);
        wasi::add_to_linker(&mut linker).map_err(|e| Error::Engine(format!("{e:#}")))?;
        let ticker = Ticker::start(engine.clone(), self.epoch_tick);
        Ok(Engine {
            inner: Arc::new(Inner {
                engine,
                linker,
                max_instances: self.max_instances,
                epoch_tick: self.epoch_tick,
                _ticker: ticker,
            }),
            memory_limit: self.memory_limit,
        })
    }
}

/// A configured wasmtime engine plus the WASI linker. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
    /// Per instance; kept outside `Inner` because the pooled allocator does not depend on it,
    /// so one prebuilt engine serves any limit (see [`Engine::with_memory_limit`]).
    memory_limit: usize,
}

struct Inner {
    engine: wasmtime::Engine,
    linker: Linker<State>,
    max_instances: u32,
    epoch_tick: Duration,
    _ticker: Ticker,
}

/// Store data of one invocation.
pub(crate) struct State {
    pub(crate) wasi: WasiCtx,
    limits: StoreLimits,
}

impl Engine {
    /// The same engine (shared pool, ticker and linker) with another per-instance memory limit
    /// for the guests loaded through it. A pool member builds its engine before it knows its
    /// function's `OPEN_RUNTIMES_MEMORY`; this keeps that work off the specialisation.
    pub fn with_memory_limit(&self, bytes: usize) -> Engine {
        Engine {
            inner: self.inner.clone(),
            memory_limit: bytes,
        }
    }

    /// The memory limit of one instance in bytes.
    pub fn memory_limit(&self) -> usize {
        self.memory_limit
    }

    /// How many instances may live at once (fixed when the engine is built).
    pub fn max_instances(&self) -> u32 {
        self.inner.max_instances
    }

    /// Compiles `bytes` (binary or text format) into the artifact [`Engine::load`] accepts.
    pub fn precompile(&self, name: &str, bytes: &[u8]) -> Result<Vec<u8>, Error> {
        self.inner
            .engine
            .precompile_module(bytes)
            .map_err(|e| Error::Compile {
                name: name.to_string(),
                reason: format!("{e:#}"),
            })
    }

    /// Writes `<path>.cwasm` next to the `.wasm`/`.wat` file at `path`.
    pub fn precompile_file(&self, path: &Path) -> Result<PathBuf, Error> {
        let bytes = std::fs::read(path).map_err(|source| Error::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let artifact = self.precompile(&display_name(path), &bytes)?;
        let out = precompiled_path(path);
        std::fs::write(&out, artifact).map_err(|source| Error::Write {
            path: out.clone(),
            source,
        })?;
        Ok(out)
    }

    /// Loads the guest at `path`: its precompiled artifact when the build step left a usable
    /// one, else the `.wasm`/`.wat` file compiled now. Either way this happens once per server.
    pub fn load(&self, path: &Path) -> Result<Guest, Error> {
        let name = display_name(path);
        if !path.is_file() {
            return Err(Error::Missing(name));
        }
        let artifact = precompiled_path(path);
        let module = match self.deserialize(&artifact) {
            Some(module) => module,
            None => {
                let bytes = std::fs::read(path).map_err(|source| Error::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                Module::new(&self.inner.engine, &bytes).map_err(|e| Error::Compile {
                    name: name.clone(),
                    reason: format!("{e:#}"),
                })?
            }
        };
        self.prepare(name, &module)
    }

    /// Compiles a module from bytes in memory (tests and benchmarks).
    pub fn load_bytes(&self, name: &str, bytes: &[u8]) -> Result<Guest, Error> {
        let module = Module::new(&self.inner.engine, bytes).map_err(|e| Error::Compile {
            name: name.to_string(),
            reason: format!("{e:#}"),
        })?;
        self.prepare(name.to_string(), &module)
    }

    fn deserialize(&self, artifact: &Path) -> Option<Module> {
        if !artifact.is_file() {
            return None;
        }
        // SAFETY: wasmtime requires that the file holds an artifact produced by
        // `Engine::precompile_module` and is not modified while mapped. The build step
        // (`hearth-wasm-runtime precompile`, same binary, same `EngineBuilder` settings) wrote
        // it into the function archive, which start.sh extracted into a directory only this
        // server reads. wasmtime itself rejects an artifact from another version or an
        // incompatible configuration; then we fall back to compiling the source.
        #[allow(unsafe_code)]
        let loaded = unsafe { Module::deserialize_file(&self.inner.engine, artifact) };
        match loaded {
            Ok(module) => Some(module),
            Err(err) => {
                tracing::warn!(
                    artifact = %artifact.display(),
                    error = %format!("{err:#}"),
                    "precompiled module unusable, compiling the source"
                );
                None
            }
        }
    }

    fn prepare(&self, name: String, module: &Module) -> Result<Guest, Error> {
        let has_start = module
            .get_export("_start")
            .and_then(|e| {
                e.func()
                    .map(|f| f.params().len() == 0 && f.results().len() == 0)
            })
            .unwrap_or(false);
        if !has_start {
            return Err(Error::NoStart { name });
        }
        let compile = |e: wasmtime::Error| Error::Compile {
            name: name.clone(),
            reason: format!("{e:#}"),
        };
        let mut linker = self.inner.linker.clone();
        // Imports outside our WASI subset link, and trap only if the guest calls them.
        linker
            .define_unknown_imports_as_traps(module)
            .map_err(compile)?;
        let pre = linker.instantiate_pre(module).map_err(compile)?;
        Ok(Guest {
            engine: self.clone(),
            pre,
            name,
        })
    }

    /// The wasmtime engine (for embedders that need the raw handle).
    pub fn wasmtime(&self) -> &wasmtime::Engine {
        &self.inner.engine
    }
}

/// A compiled, pre-linked guest, ready to be instantiated per invocation.
#[derive(Clone)]
pub struct Guest {
    engine: Engine,
    pre: InstancePre<State>,
    name: String,
}

/// The input of one run: WASI arguments, environment, stdin and an optional time limit.
#[derive(Debug, Default)]
pub struct Invocation {
    pub args: Vec<String>,
    pub env: Env,
    pub stdin: Bytes,
    pub timeout: Option<Duration>,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// `_start` returned or the guest called `proc_exit(0)`.
    Success,
    /// `proc_exit` with a non-zero code: the guest reports a failure.
    Exit(i32),
    /// The time limit passed (epoch interruption, or a sleep that would outlive it).
    Timeout,
    /// A trap, including an out-of-memory `memory.grow`; the text is wasmtime's reason.
    Trap(String),
}

/// What a run produced: the status and everything the guest wrote.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub status: Status,
    pub output: Output,
}

impl Guest {
    /// Name of the module (its file name), used in error reports.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs the guest once in a fresh instance. Blocking: call it from a blocking thread. A
    /// guest failure is an [`Outcome`], never a panic or an error of this call.
    pub fn run(&self, invocation: Invocation) -> Outcome {
        let inner = &self.engine.inner;
        let memory_limit = self.engine.memory_limit;
        let deadline = invocation.timeout.map(|t| Instant::now() + t);
        let mut args = vec![self.name.clone()];
        args.extend(invocation.args);
        let wasi = WasiCtx::new(args, invocation.env, invocation.stdin, Deadline(deadline));
        let limits = StoreLimitsBuilder::new()
            .memory_size(memory_limit)
            .trap_on_grow_failure(true)
            .build();
        let mut store = Store::new(&inner.engine, State { wasi, limits });
        store.limiter(|state| &mut state.limits);
        let ticks = match invocation.timeout {
            // Round up so a 1 s limit is never cut short by the tick.
            Some(timeout) => (timeout.as_micros() / inner.epoch_tick.as_micros().max(1)) as u64 + 1,
            None => u64::MAX / 4,
        };
        store.set_epoch_deadline(ticks);
        store.epoch_deadline_trap();

        let result = self
            .pre
            .instantiate(&mut store)
            .and_then(|instance| instance.get_typed_func::<(), ()>(&mut store, "_start"))
            .and_then(|start: TypedFunc<(), ()>| start.call(&mut store, ()));
        let status = match result {
            Ok(()) => Status::Success,
            Err(err) => classify(&err),
        };
        let output = store.into_data().wasi.finish();
        Outcome { status, output }
    }
}

fn classify(err: &wasmtime::Error) -> Status {
    if let Some(exit) = err.downcast_ref::<Exit>() {
        return match exit {
            Exit::Code(0) => Status::Success,
            Exit::Code(code) => Status::Exit(*code),
            Exit::Timeout => Status::Timeout,
        };
    }
    if let Some(Trap::Interrupt) = err.downcast_ref::<Trap>() {
        return Status::Timeout;
    }
    Status::Trap(format!("{err:?}"))
}

fn display_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// `x.wasm` → `x.wasm.cwasm`.
pub fn precompiled_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(PRECOMPILED_SUFFIX);
    PathBuf::from(name)
}

/// Increments the engine's epoch every tick until dropped.
struct Ticker {
    stop: Arc<AtomicBool>,
}

impl Ticker {
    fn start(engine: wasmtime::Engine, tick: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let spawned = thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    thread::sleep(tick);
                    engine.increment_epoch();
                }
            });
        if let Err(err) = spawned {
            // Without the ticker deadlines only fire inside host sleeps; say so loudly.
            tracing::error!(error = %err, "failed to start the epoch ticker thread");
        }
        Self { stop }
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
