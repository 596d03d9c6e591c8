//! The executor's domain: the table of runtimes and their lifecycle. Knows nothing about HTTP.
//!
//! - this file: [`Executor`] (the service), [`Runtime`] (one entry of the table), creation with
//!   single-flight cold starts, lookup with in-flight counting, deletion, listing;
//! - [`execute`]: forwarding an execution to a runtime and collecting its logs;
//! - [`build`]: builds (`command`), their captured output and the live build log;
//! - [`maintenance`]: boot-time adoption of containers, idle reaping, reconciliation;
//! - [`pool`]: warm pools of generic runtimes specialised on a function's first execution.
//!
//! Concurrency rules: the table is a `DashMap`; a `Ref` is never held across `.await` nor while
//! inserting. A runtime's in-flight counter is raised while its table entry is locked, and the
//! reaper removes entries only through `remove_if` with the counter at zero, so a runtime with
//! an execution in flight is never reaped.

pub mod build;
pub mod execute;
pub mod maintenance;
pub mod pool;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use hearth_adapters::{
    Adapter, Endpoint, RestartPolicy, RuntimeSpec, EXECUTOR_LABEL, RUNTIME_LABEL,
};
use serde::Serialize;
use tokio::sync::watch;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::invoke::{Invoker, Target, Version, SOCKET_ENV, SOCKET_IN_RUNTIME};
use crate::logs;
use crate::metrics::Metrics;
use crate::storage::Storage;

pub use build::{BuildLog, BuildReport, LogEntry};

/// Labels that let a restarted executor adopt its runtimes.
const SECRET_LABEL: &str = "hearth.secret";
const VERSION_LABEL: &str = "hearth.version";
const HOSTNAME_LABEL: &str = "hearth.hostname";
/// The port every runtime image serves on.
const RUNTIME_PORT: u16 = 3000;

/// Where a runtime is in its life.
#[derive(Debug, Clone)]
pub enum Phase {
    /// Its container is being created and started.
    Pending,
    /// Started (and, for cold starts, listening).
    Ready,
    /// Creation failed; the entry is already out of the table.
    Failed(Error),
}

/// One runtime: a container of a runtime image serving one function.
pub struct Runtime {
    pub id: String,
    /// Container name: `<executor name>-<runtime id>`.
    pub name: String,
    pub hostname: String,
    pub image: String,
    pub version: Version,
    secret: String,
    /// Unix seconds.
    created: f64,
    started: Instant,
    updated_ms: AtomicU64,
    in_flight: AtomicUsize,
    listening: AtomicBool,
    initialised: AtomicBool,
    phase: watch::Sender<Phase>,
    container: OnceLock<String>,
    /// Where it is called (set once its container runs).
    target: OnceLock<Target>,
    /// Host folder of its log files, when the adapter shares host folders (a pooled runtime
    /// gets its member's, so it is set once the container is known).
    logs_dir: OnceLock<logs::LogsDir>,
    /// Keep-warm: idle time after which it is reaped (`None`: the executor's threshold).
    idle_ttl: Option<Duration>,
    /// Keep-warm: never reaped for idleness (`keepWarm` ≥ 1 at creation).
    pinned: bool,
    /// Whether it came from a warm pool.
    pooled: AtomicBool,
    pub build_log: BuildLog,
}

impl Runtime {
    fn new(
        id: &str,
        name: String,
        image: &str,
        version: Version,
        logs_dir: Option<PathBuf>,
    ) -> Self {
        let now = unix_now();
        Self {
            id: id.to_string(),
            name,
            hostname: random_hex(16),
            image: image.to_string(),
            version,
            secret: random_hex(32),
            created: now,
            started: Instant::now(),
            updated_ms: AtomicU64::new((now * 1000.0) as u64),
            in_flight: AtomicUsize::new(0),
            listening: AtomicBool::new(false),
            initialised: AtomicBool::new(false),
            phase: watch::channel(Phase::Pending).0,
            container: OnceLock::new(),
            target: OnceLock::new(),
            logs_dir: logs_dir
                .map(|dir| OnceLock::from(logs::LogsDir::new(dir)))
                .unwrap_or_default(),
            idle_ttl: None,
            pinned: false,
            pooled: AtomicBool::new(false),
            build_log: BuildLog::default(),
        }
    }

    pub fn logs_dir(&self) -> Option<&PathBuf> {
        self.logs_dir.get().map(logs::LogsDir::path)
    }

    /// Its log folder, for reading an execution's log files.
    pub fn logs(&self) -> Option<&logs::LogsDir> {
        self.logs_dir.get()
    }

    /// Whether it has idled past its keep-warm TTL (or the executor's threshold).
    pub fn expired(&self, threshold: Duration) -> bool {
        !self.pinned && self.idle_for() > self.idle_ttl.unwrap_or(threshold)
    }

    /// Whether its container came from a warm pool.
    pub fn pooled(&self) -> bool {
        self.pooled.load(Ordering::Relaxed)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    fn touch(&self) {
        self.updated_ms
            .store((unix_now() * 1000.0) as u64, Ordering::Relaxed);
    }

    /// How long since the last execution ended (or the runtime was created).
    pub fn idle_for(&self) -> Duration {
        let updated = self.updated_ms.load(Ordering::Relaxed) as f64 / 1000.0;
        Duration::from_secs_f64((unix_now() - updated).max(0.0))
    }

    pub fn container_id(&self) -> Option<&str> {
        self.container.get().map(String::as_str)
    }

    fn is_pending(&self) -> bool {
        matches!(*self.phase.borrow(), Phase::Pending)
    }

    /// Waits until creation ends, at most until `deadline`.
    async fn wait_ready(&self, deadline: Instant) -> Result<()> {
        let mut rx = self.phase.subscribe();
        let outcome = {
            let wait = rx.wait_for(|phase| !matches!(phase, Phase::Pending));
            match tokio::time::timeout_at(deadline.into(), wait).await {
                Err(_) => Err(Error::RuntimeTimeout),
                Ok(Err(_)) => Err(Error::Internal(
                    "runtime creation was abandoned".to_string(),
                )),
                Ok(Ok(phase)) => match &*phase {
                    Phase::Failed(err) => Err(err.clone()),
                    _ => Ok(()),
                },
            }
        };
        outcome
    }

    /// What the list and get routes show. Never the secret.
    pub fn view(&self) -> RuntimeView {
        let status = if self.is_pending() {
            "pending".to_string()
        } else {
            format!("Up {:.2}s", self.started.elapsed().as_secs_f64())
        };
        RuntimeView {
            name: self.name.clone(),
            hostname: self.hostname.clone(),
            status,
            image: self.image.clone(),
            version: self.version.as_str(),
            created: self.created,
            updated: self.updated_ms.load(Ordering::Relaxed) as f64 / 1000.0,
            listening: u8::from(self.listening.load(Ordering::Relaxed)),
            initialised: u8::from(self.initialised.load(Ordering::Relaxed)),
        }
    }
}

/// The runtime object of the API.
#[derive(Debug, Clone, Serialize)]
pub struct RuntimeView {
    pub name: String,
    pub hostname: String,
    pub status: String,
    pub image: String,
    pub version: &'static str,
    pub created: f64,
    pub updated: f64,
    pub listening: u8,
    pub initialised: u8,
}

/// Counts one execution in flight on a runtime for as long as it lives.
pub struct InFlight(Arc<Runtime>);

impl InFlight {
    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Parameters of a runtime (the create route's, or an execution's cold-start part).
#[derive(Debug, Clone)]
pub struct RuntimeParams {
    pub runtime_id: String,
    pub image: String,
    pub entrypoint: String,
    pub source: String,
    pub destination: String,
    pub output_directory: String,
    pub variables: Vec<(String, String)>,
    pub runtime_entrypoint: String,
    pub command: String,
    pub cache_key: String,
    /// Seconds for `command`.
    pub timeout: u64,
    pub remove: bool,
    pub cpus: f64,
    pub memory: u64,
    pub version: Version,
    pub restart_policy: RestartPolicy,
    /// Keep-warm: seconds of idleness before it is reaped (0: the executor's threshold).
    pub idle_timeout: u64,
    /// Keep-warm: warm instances to keep (0 or 1; 1 means never reaped for idleness).
    pub keep_warm: u64,
}

impl RuntimeParams {
    pub fn new(runtime_id: &str, image: &str) -> Self {
        Self {
            runtime_id: runtime_id.to_string(),
            image: image.to_string(),
            entrypoint: String::new(),
            source: String::new(),
            destination: String::new(),
            output_directory: String::new(),
            variables: Vec::new(),
            runtime_entrypoint: String::new(),
            command: String::new(),
            cache_key: String::new(),
            timeout: 600,
            remove: false,
            cpus: 1.0,
            memory: 512,
            version: Version::V5,
            restart_policy: RestartPolicy::No,
            idle_timeout: 0,
            keep_warm: 0,
        }
    }
}

/// The executor service.
pub struct Executor {
    pub config: Config,
    pub adapter: Arc<dyn Adapter>,
    pub storage: Storage,
    pub invoker: Invoker,
    pub metrics: Metrics,
    runtimes: DashMap<String, Arc<Runtime>>,
    pub pools: pool::Pools,
    /// Entries in the table, kept beside it so the limit check never locks every shard.
    count: AtomicUsize,
    /// Prefix of runtime names and value of the executor label.
    pub name: String,
}

impl Executor {
    pub fn new(config: Config, adapter: Arc<dyn Adapter>, storage: Storage, name: String) -> Self {
        Self {
            pools: pool::Pools::new(config.pool_creations),
            config,
            adapter,
            storage,
            invoker: Invoker::new(),
            metrics: Metrics::default(),
            runtimes: DashMap::new(),
            count: AtomicUsize::new(0),
            name,
        }
    }

    pub fn runtime_name(&self, runtime_id: &str) -> String {
        format!("{}-{runtime_id}", self.name)
    }

    pub fn warm(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// Every runtime, oldest first.
    pub fn list(&self) -> Vec<RuntimeView> {
        let mut all: Vec<Arc<Runtime>> = self.runtimes.iter().map(|r| r.value().clone()).collect();
        all.sort_by(|a, b| a.created.total_cmp(&b.created));
        all.iter().map(|r| r.view()).collect()
    }

    pub fn get(&self, runtime_id: &str) -> Option<Arc<Runtime>> {
        self.runtimes.get(runtime_id).map(|r| r.value().clone())
    }

    /// Takes a runtime for an execution: raises its in-flight counter while its entry is locked.
    pub fn acquire(&self, runtime_id: &str) -> Option<InFlight> {
        let entry = self.runtimes.get(runtime_id)?;
        entry.in_flight.fetch_add(1, Ordering::AcqRel);
        Some(InFlight(entry.value().clone()))
    }

    /// Creates a runtime and waits until its container runs (for a build, until the build
    /// ends). `Conflict` when the id is taken.
    pub async fn create(self: &Arc<Self>, params: RuntimeParams) -> Result<Option<BuildReport>> {
        self.check_version(params.version)?;
        self.check_paths(&params)?;
        let runtime = self.reserve(&params)?;
        // Creation runs in its own task: a caller that goes away does not leave a half-made
        // container behind.
        let this = self.clone();
        let task = tokio::spawn(async move { this.bring_up(runtime, params, None).await });
        task.await
            .map_err(|err| Error::Internal(format!("runtime creation panicked: {err}")))?
    }

    /// Takes a runtime for an execution, cold-starting it with `params` when it does not exist.
    /// Concurrent callers of one new runtime share a single cold start. Returns the in-flight
    /// guard and the cold start's duration when this call waited for one.
    pub async fn acquire_or_start(
        self: &Arc<Self>,
        params: Option<&RuntimeParams>,
        runtime_id: &str,
        deadline: Instant,
    ) -> Result<(InFlight, Option<Duration>)> {
        let begun = Instant::now();
        loop {
            if let Some(guard) = self.acquire(runtime_id) {
                let runtime = guard.runtime().clone();
                let waited = runtime.is_pending();
                runtime.wait_ready(deadline).await?;
                if !runtime.listening.load(Ordering::Acquire) {
                    self.probe(&runtime, deadline).await?;
                }
                return Ok((guard, waited.then(|| begun.elapsed())));
            }
            let Some(params) = params else {
                return Err(Error::RuntimeNotFoundNoParams);
            };
            self.check_version(params.version)?;
            self.check_paths(params)?;
            let runtime = match self.reserve(params) {
                Ok(runtime) => runtime,
                // Someone else inserted it between our lookup and our insert: join theirs.
                Err(Error::RuntimeConflict) => continue,
                Err(err) => return Err(err),
            };
            let this = self.clone();
            let params = params.clone();
            // Not tied to this caller: the cold start finishes (or cleans up) on its own.
            tokio::spawn(async move {
                let _ = this.bring_up(runtime, params, Some(deadline)).await;
            });
        }
    }

    fn check_version(&self, version: Version) -> Result<()> {
        if self
            .config
            .runtime_versions
            .iter()
            .any(|v| v.trim() == version.as_str())
        {
            Ok(())
        } else {
            Err(Error::InvalidArgument(format!(
                "Invalid `version` param: {} is not enabled on this executor (OPR_EXECUTOR_RUNTIME_VERSIONS={}).",
                version.as_str(),
                self.config.runtime_versions.join(",")
            )))
        }
    }

    /// Rejects storage paths that leave the storage root before anything is created.
    fn check_paths(&self, params: &RuntimeParams) -> Result<()> {
        if !params.source.is_empty() {
            self.storage.object_path("source", &params.source)?;
        }
        if !params.destination.is_empty() {
            self.storage.object_path(
                "destination",
                &format!("{}/artifact.gz", params.destination),
            )?;
        }
        Ok(())
    }

    /// Inserts a pending entry for a new runtime, enforcing the runtime limit.
    fn reserve(&self, params: &RuntimeParams) -> Result<Arc<Runtime>> {
        if self.runtimes.contains_key(&params.runtime_id) {
            return Err(Error::RuntimeConflict);
        }
        if self.count.fetch_add(1, Ordering::AcqRel) >= self.config.max_runtimes {
            self.count.fetch_sub(1, Ordering::AcqRel);
            if !self.evict_one_idle() {
                return Err(Error::RuntimeLimit(format!(
                    "This executor already holds its maximum of {} runtimes and none is idle. Retry later or raise OPR_EXECUTOR_MAX_RUNTIMES.",
                    self.config.max_runtimes
                )));
            }
            self.count.fetch_add(1, Ordering::AcqRel);
        }
        let name = self.runtime_name(&params.runtime_id);
        let logs_dir = self
            .adapter
            .shares_host_folders()
            .then(|| self.config.runtimes_dir.join(&name).join("logs"));
        let mut runtime = Runtime::new(
            &params.runtime_id,
            name,
            &params.image,
            params.version,
            logs_dir,
        );
        runtime.idle_ttl =
            (params.idle_timeout > 0).then(|| Duration::from_secs(params.idle_timeout));
        runtime.pinned = params.keep_warm > 0;
        let runtime = Arc::new(runtime);
        match self.runtimes.entry(params.runtime_id.clone()) {
            Entry::Occupied(_) => {
                self.count.fetch_sub(1, Ordering::AcqRel);
                Err(Error::RuntimeConflict)
            }
            Entry::Vacant(slot) => {
                slot.insert(runtime.clone());
                Ok(runtime)
            }
        }
    }

    /// Removes the least recently used runtime with nothing in flight, to make room.
    fn evict_one_idle(&self) -> bool {
        let mut idle: Vec<Arc<Runtime>> = self
            .runtimes
            .iter()
            .filter(|r| r.in_flight() == 0 && !r.is_pending())
            .map(|r| r.value().clone())
            .collect();
        idle.sort_by_key(|r| std::cmp::Reverse(r.idle_for()));
        for runtime in idle {
            if self.remove_if_idle(&runtime) {
                tracing::info!(runtime = %runtime.id, "evicted the idlest runtime to make room");
                return true;
            }
        }
        false
    }

    /// Takes `runtime` out of the table if it is still the entry and has nothing in flight;
    /// its container is removed in the background.
    pub fn remove_if_idle(&self, runtime: &Arc<Runtime>) -> bool {
        let removed = self
            .runtimes
            .remove_if(&runtime.id, |_, entry| {
                Arc::ptr_eq(entry, runtime) && entry.in_flight() == 0
            })
            .is_some();
        if removed {
            self.count.fetch_sub(1, Ordering::AcqRel);
            self.spawn_cleanup(runtime.clone());
        }
        removed
    }

    /// Takes `runtime` out of the table if it is still the entry (busy or not).
    /// Whether the table still holds this very runtime (not deleted, not replaced).
    fn holds(&self, runtime: &Arc<Runtime>) -> bool {
        self.runtimes
            .get(&runtime.id)
            .is_some_and(|entry| Arc::ptr_eq(entry.value(), runtime))
    }

    fn forget(&self, runtime: &Arc<Runtime>) -> bool {
        let removed = self
            .runtimes
            .remove_if(&runtime.id, |_, entry| Arc::ptr_eq(entry, runtime))
            .is_some();
        if removed {
            self.count.fetch_sub(1, Ordering::AcqRel);
        }
        removed
    }

    fn spawn_cleanup(&self, runtime: Arc<Runtime>) {
        let adapter = self.adapter.clone();
        tokio::spawn(async move { remove_container(adapter.as_ref(), &runtime).await });
    }

    /// The delete route: removes the runtime and its container.
    pub async fn delete(&self, runtime_id: &str) -> Result<()> {
        let Some((_, runtime)) = self.runtimes.remove(runtime_id) else {
            return Err(Error::RuntimeNotFound);
        };
        self.count.fetch_sub(1, Ordering::AcqRel);
        remove_container(self.adapter.as_ref(), &runtime).await;
        Ok(())
    }

    /// Creates and starts the container of a reserved runtime. For a cold start (`deadline`
    /// set) it is ready once it listens; for a build it runs the build. On failure the entry
    /// leaves the table and the container is removed.
    async fn bring_up(
        self: Arc<Self>,
        runtime: Arc<Runtime>,
        params: RuntimeParams,
        deadline: Option<Instant>,
    ) -> Result<Option<BuildReport>> {
        let begun = Instant::now();
        let is_build = deadline.is_none() && !params.command.is_empty();
        let mut result = self
            .start_container(&runtime, &params, deadline.is_some())
            .await
            .map(|()| None);
        if result.is_ok() && !self.holds(&runtime) {
            // Deleted while its container was being made: the delete could not see the
            // container yet, so it goes here, or it would outlive its runtime.
            remove_container(self.adapter.as_ref(), &runtime).await;
            result = Err(Error::RuntimeNotFound);
        }
        if result.is_ok() {
            if let Some(deadline) = deadline.filter(|_| !runtime.listening.load(Ordering::Acquire))
            {
                // Ready only once it listens, so the waiting executions go straight through.
                result = self.probe(&runtime, deadline).await.map(|()| None);
            } else if is_build {
                runtime.phase.send_replace(Phase::Ready);
                result = self.run_build(&runtime, &params).await.map(Some);
            }
        }
        runtime.build_log.finish();
        match &result {
            Ok(_) => {
                if !is_build {
                    self.metrics.cold_start(begun.elapsed());
                }
                runtime.phase.send_replace(Phase::Ready);
                if is_build && params.remove && self.forget(&runtime) {
                    remove_container(self.adapter.as_ref(), &runtime).await;
                }
            }
            Err(err) => {
                tracing::debug!(runtime = %runtime.id, error = %err, "runtime failed to come up");
                if self.forget(&runtime) {
                    remove_container(self.adapter.as_ref(), &runtime).await;
                }
                runtime.phase.send_replace(Phase::Failed(err.clone()));
            }
        }
        if is_build {
            self.metrics.build(result.is_ok());
        }
        result
    }

    async fn start_container(
        &self,
        runtime: &Arc<Runtime>,
        params: &RuntimeParams,
        for_execution: bool,
    ) -> Result<()> {
        let source = if params.source.is_empty() {
            None
        } else {
            Some(self.storage.get("source", &params.source).await?)
        };
        if let Some(dir) = runtime.logs_dir() {
            tokio::fs::create_dir_all(dir).await.map_err(|err| {
                Error::Internal(format!("failed to create {}: {err}", dir.display()))
            })?;
        }
        let serving = for_execution || params.command.is_empty();
        if serving {
            if let Some(source) = &source {
                if self.poolable(params) && self.start_pooled(runtime, params, source).await? {
                    return Ok(());
                }
            }
            if !self.adapter.places_files_before_start() {
                return Err(Error::InvalidArgument(
                    "This executor's platform hands runtimes their code over HTTP, which needs a v5 runtime with a `source` and no `runtimeEntrypoint`.".to_string(),
                ));
            }
        }
        let spec = self.container_spec(runtime, params, for_execution);
        let id = match self.adapter.create(&spec).await {
            Err(hearth_adapters::Error::Conflict(_)) => {
                // A container not in our table holds the name: an orphan of a previous life of
                // this executor, or of an attempt deleted while its container was being made
                // (a build whose worker died), whose removal may still be under way. It goes;
                // the name is free once the engine has finished removing it.
                tracing::warn!(runtime = %runtime.name, "removing an orphan container holding the name");
                let mut tries = 0;
                loop {
                    let _ = self.adapter.remove(&runtime.name).await;
                    match self.adapter.create(&spec).await {
                        Err(hearth_adapters::Error::Conflict(_)) if tries < NAME_TRIES => {
                            tries += 1;
                            tokio::time::sleep(Duration::from_millis(250)).await;
                        }
                        other => break other?,
                    }
                }
            }
            other => other?,
        };
        let _ = runtime.container.set(id.clone());
        if let Some(source) = source {
            let path = if params.source.ends_with(".tar") {
                "/tmp/code.tar"
            } else {
                "/tmp/code.tar.gz"
            };
            self.adapter.put_file(&id, path, source).await?;
        }
        let endpoint = self.adapter.start(&id).await?;
        let _ = runtime
            .target
            .set(self.target(endpoint, runtime.logs_dir().map(PathBuf::as_path)));
        Ok(())
    }

    /// Gives the runtime a pool member (or, where files cannot be placed before start, a fresh
    /// generic container) and hands it the function over the pool protocol. `Ok(false)`: no
    /// member was ready, start a container the usual way.
    async fn start_pooled(
        &self,
        runtime: &Arc<Runtime>,
        params: &RuntimeParams,
        source: &bytes::Bytes,
    ) -> Result<bool> {
        let key = pool::PoolKey::new(&params.image, params.cpus, params.memory);
        let taken = if self.config.pool {
            self.take_member(&key)
        } else {
            None
        };
        let pooled = taken.is_some();
        let member = match taken {
            Some(member) => member,
            None if self.adapter.places_files_before_start() => return Ok(false),
            None => self.start_member(&key).await?,
        };
        let env = self.function_env(runtime, params);
        if let Err(err) = self
            .invoker
            .specialise(&member.target, &member.secret, &env, source)
            .await
        {
            self.discard_member(&member).await;
            if pooled && self.adapter.places_files_before_start() {
                tracing::warn!(runtime = %runtime.id, error = %err, "a pool member failed to specialise; starting a fresh container");
                return Ok(false);
            }
            return Err(Error::RuntimeFailed(format!(
                "failed to hand the function to its runtime: {err}"
            )));
        }
        let _ = runtime.container.set(member.container);
        let _ = runtime.target.set(member.target);
        if let Some(dir) = member.logs_dir {
            let _ = runtime.logs_dir.set(logs::LogsDir::new(dir));
        }
        runtime.pooled.store(pooled, Ordering::Relaxed);
        runtime.listening.store(true, Ordering::Release);
        Ok(true)
    }

    /// Labels from `OPR_EXECUTOR_LABELS`.
    fn configured_labels(&self) -> HashMap<String, String> {
        self.config
            .labels
            .iter()
            .filter_map(|pair| pair.split_once('='))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect()
    }

    /// The function's environment: its variables, then the runtime protocol's (which win).
    fn function_env(&self, runtime: &Runtime, params: &RuntimeParams) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = Vec::new();
        let mut set = |key: &str, value: String| {
            env.retain(|(k, _)| k != key);
            env.push((key.to_string(), value));
        };
        for (key, value) in &params.variables {
            set(key, value.clone());
        }
        match runtime.version {
            Version::V5 => {
                set("OPEN_RUNTIMES_SECRET", runtime.secret.clone());
                set("OPEN_RUNTIMES_ENTRYPOINT", params.entrypoint.clone());
                set("OPEN_RUNTIMES_HOSTNAME", runtime.hostname.clone());
                set("OPEN_RUNTIMES_CPUS", format_cpus(params.cpus));
                set("OPEN_RUNTIMES_MEMORY", params.memory.to_string());
                if !params.output_directory.is_empty() {
                    set(
                        "OPEN_RUNTIMES_OUTPUT_DIRECTORY",
                        params.output_directory.clone(),
                    );
                }
                set("CI", "true".to_string());
            }
            Version::V2 => {
                set("INTERNAL_RUNTIME_KEY", runtime.secret.clone());
                set("INTERNAL_RUNTIME_ENTRYPOINT", params.entrypoint.clone());
                set("INERNAL_EXECUTOR_HOSTNAME", self.name.clone());
                set("OPEN_RUNTIMES_CPUS", format_cpus(params.cpus));
                set("OPEN_RUNTIMES_MEMORY", params.memory.to_string());
            }
        }
        env
    }

    /// Where a runtime at `endpoint` with its log folder at `logs_dir` (on this side) is called:
    /// over the Unix socket in that folder when sockets are on (`runtimes/socket.md`).
    fn target(&self, endpoint: Endpoint, logs_dir: Option<&std::path::Path>) -> Target {
        Target::new(endpoint, logs_dir.filter(|_| self.config.runtime_sockets))
    }

    /// The variable asking a runtime with a shared log folder to serve on a socket there too.
    fn socket_env(&self, shares_logs_dir: bool) -> Option<(String, String)> {
        (shares_logs_dir && self.config.runtime_sockets)
            .then(|| (SOCKET_ENV.to_string(), SOCKET_IN_RUNTIME.to_string()))
    }

    fn container_spec(
        &self,
        runtime: &Runtime,
        params: &RuntimeParams,
        for_execution: bool,
    ) -> RuntimeSpec {
        let mut env = self.function_env(runtime, params);
        env.extend(self.socket_env(runtime.logs_dir().is_some()));
        let cmd = if !params.runtime_entrypoint.is_empty() {
            Some(vec![
                "bash".to_string(),
                "-c".to_string(),
                params.runtime_entrypoint.clone(),
            ])
        } else if !params.command.is_empty() && !for_execution {
            // A build container idles until the build command is executed in it.
            Some(vec![
                "tail".to_string(),
                "-f".to_string(),
                "/dev/null".to_string(),
            ])
        } else {
            // The image's own command starts its server (it finds the code in /tmp).
            None
        };
        let mut labels = self.configured_labels();
        labels.insert(EXECUTOR_LABEL.to_string(), self.name.clone());
        labels.insert(RUNTIME_LABEL.to_string(), runtime.id.clone());
        labels.insert(SECRET_LABEL.to_string(), runtime.secret.clone());
        labels.insert(
            VERSION_LABEL.to_string(),
            runtime.version.as_str().to_string(),
        );
        labels.insert(HOSTNAME_LABEL.to_string(), runtime.hostname.clone());
        RuntimeSpec {
            name: runtime.name.clone(),
            image: params.image.clone(),
            cmd,
            env,
            labels,
            working_dir: None,
            cpus: params.cpus,
            memory_mb: params.memory,
            pids_limit: self.config.pids_limit,
            networks: self.config.networks.clone(),
            restart_policy: params.restart_policy,
            port: RUNTIME_PORT,
            logs_dir: runtime.logs_dir().cloned(),
        }
    }

    /// Waits until the runtime answers HTTP, failing fast when its container has exited.
    async fn probe(&self, runtime: &Arc<Runtime>, deadline: Instant) -> Result<()> {
        let Some(target) = runtime.target.get() else {
            return Err(Error::RuntimeFailed("runtime has no address".to_string()));
        };
        loop {
            let slice = (Instant::now() + Duration::from_millis(500)).min(deadline);
            if self.invoker.wait_listening(target, slice).await {
                runtime.listening.store(true, Ordering::Release);
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::RuntimeTimeout);
            }
            if let Some(id) = runtime.container_id() {
                match self.adapter.inspect(id).await {
                    Ok(info) if !info.running => {
                        return Err(Error::RuntimeFailed(
                            "Runtime exited before it was ready to serve. Check its entrypoint and code."
                                .to_string(),
                        ))
                    }
                    Err(hearth_adapters::Error::NotFound(_)) => {
                        return Err(Error::RuntimeFailed("Runtime container vanished.".to_string()))
                    }
                    _ => {}
                }
            }
        }
    }

    /// Called when a runtime stopped answering: drops it from the table if its container is
    /// gone. Returns true when it was dropped.
    pub async fn drop_if_dead(&self, runtime: &Arc<Runtime>) -> bool {
        let alive = match runtime.container_id() {
            Some(id) => matches!(self.adapter.inspect(id).await, Ok(info) if info.running),
            None => false,
        };
        if alive {
            return false;
        }
        if self.forget(runtime) {
            tracing::warn!(runtime = %runtime.id, "runtime container is gone; dropped it");
            remove_container(self.adapter.as_ref(), runtime).await;
        }
        true
    }

    /// Inserts an adopted runtime (boot-time reconciliation).
    fn adopt(&self, runtime: Runtime, container: String, endpoint: Option<Endpoint>) {
        let _ = runtime.container.set(container);
        if let Some(endpoint) = endpoint {
            let target = self.target(endpoint, runtime.logs_dir().map(PathBuf::as_path));
            let _ = runtime.target.set(target);
        }
        runtime.phase.send_replace(Phase::Ready);
        let id = runtime.id.clone();
        if self.runtimes.insert(id, Arc::new(runtime)).is_none() {
            self.count.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// The commands route: `bash -c <command>` in the runtime, its output returned.
    pub async fn command(
        &self,
        runtime_id: &str,
        command: &str,
        timeout: Duration,
    ) -> Result<String> {
        const CAP: usize = 1_000_000;
        let guard = self.acquire(runtime_id).ok_or(Error::RuntimeNotFound)?;
        let container = guard
            .runtime()
            .container_id()
            .ok_or(Error::RuntimeNotFound)?
            .to_string();
        let output = std::sync::Mutex::new(Vec::new());
        let sink = |chunk: &[u8]| {
            let mut out = match output.lock() {
                Ok(out) => out,
                Err(poisoned) => poisoned.into_inner(),
            };
            let room = CAP.saturating_sub(out.len());
            out.extend_from_slice(&chunk[..chunk.len().min(room)]);
        };
        let cmd = ["bash".to_string(), "-c".to_string(), command.to_string()];
        let exit = self.adapter.exec(&container, &cmd, timeout, &sink).await;
        let text = match output.into_inner() {
            Ok(out) => String::from_utf8_lossy(&out).into_owned(),
            Err(poisoned) => String::from_utf8_lossy(&poisoned.into_inner()).into_owned(),
        };
        match exit {
            Ok(exit) if exit.exit_code == 0 => Ok(text),
            Ok(exit) => Err(Error::CommandFailed(format!(
                "Command exited with code {}: {}",
                exit.exit_code,
                text.trim_end()
            ))),
            Err(hearth_adapters::Error::Timeout(_)) => Err(Error::CommandTimeout),
            Err(hearth_adapters::Error::NotFound(_)) => Err(Error::RuntimeNotFound),
            Err(err) => Err(Error::CommandFailed(err.to_string())),
        }
    }

    /// Every runtime, for maintenance and shutdown.
    pub fn snapshot(&self) -> Vec<Arc<Runtime>> {
        self.runtimes.iter().map(|r| r.value().clone()).collect()
    }

    /// Total executions in flight.
    pub fn in_flight_total(&self) -> usize {
        self.runtimes.iter().map(|r| r.in_flight()).sum()
    }
}

/// Attempts to take a runtime's name back from a container being removed (250 ms apart).
const NAME_TRIES: u32 = 20;

async fn remove_container(adapter: &dyn Adapter, runtime: &Runtime) {
    if let Some(id) = runtime.container_id() {
        match adapter.remove(id).await {
            Ok(()) | Err(hearth_adapters::Error::NotFound(_)) => {}
            Err(err) => {
                tracing::warn!(runtime = %runtime.id, error = %err, "failed to remove runtime container")
            }
        }
    }
    if let Some(dir) = runtime.logs_dir() {
        if let Some(parent) = dir.parent() {
            let _ = tokio::fs::remove_dir_all(parent).await;
        }
    }
}

fn format_cpus(cpus: f64) -> String {
    if cpus.fract() == 0.0 {
        format!("{}", cpus as i64)
    } else {
        format!("{cpus}")
    }
}

pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

pub fn random_hex(len: usize) -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..len)
        .map(|_| char::from_digit(rng.random_range(0..16), 16).unwrap_or('0'))
        .collect()
}

#[cfg(test)]
mod tests {
    //! The lifecycle against the recording fake adapter: what the executor asks of the platform.

    use super::*;
    use hearth_adapters::fake::{Call, FakeAdapter};

    fn executor(fake: Arc<FakeAdapter>) -> (Arc<Executor>, PathBuf) {
        let dir = std::env::temp_dir().join(format!("hearth-unit-{}", random_hex(8)));
        let mut config = Config::for_tests("secret", dir.join("storage"), dir.join("runtimes"));
        config.name = "unit".to_string();
        config.max_runtimes = 2;
        let storage = Storage::open(&config.storage, &config.storage_root).unwrap();
        let root = config.storage_root.canonicalize().unwrap();
        (
            Arc::new(Executor::new(config, fake, storage, "unit".to_string())),
            root,
        )
    }

    #[tokio::test]
    async fn create_starts_a_labelled_container_with_the_source_and_secret() {
        let fake = Arc::new(FakeAdapter::new());
        let (ex, root) = executor(fake.clone());
        std::fs::create_dir_all(root.join("functions")).unwrap();
        std::fs::write(root.join("functions/f.tar.gz"), b"archive").unwrap();
        let mut params = RuntimeParams::new("rt-1", "hearth/node:v5-18");
        params.source = root.join("functions/f.tar.gz").display().to_string();
        params.variables = vec![
            ("OPEN_RUNTIMES_SECRET".into(), "user-value".into()),
            ("A".into(), "1".into()),
        ];
        ex.create(params.clone()).await.unwrap();

        let runtime = ex.get("rt-1").unwrap();
        let id = runtime.container_id().unwrap().to_string();
        let spec = fake.spec(&id).unwrap();
        assert_eq!(spec.name, "unit-rt-1");
        assert_eq!(
            spec.labels.get(EXECUTOR_LABEL).map(String::as_str),
            Some("unit")
        );
        assert_eq!(
            spec.labels.get("hearth.test").map(String::as_str),
            Some("1")
        );
        // System variables win over the user's, and appear once.
        let secrets: Vec<_> = spec
            .env
            .iter()
            .filter(|(k, _)| k == "OPEN_RUNTIMES_SECRET")
            .collect();
        assert_eq!(secrets.len(), 1);
        assert_ne!(secrets[0].1, "user-value");
        assert!(spec.env.contains(&("A".to_string(), "1".to_string())));
        assert_eq!(fake.file(&id, "/tmp/code.tar.gz").unwrap(), "archive");
        assert_eq!(spec.pids_limit, 1024);

        // The same id again: conflict, nothing new created.
        let err = ex.create(params).await.unwrap_err();
        assert!(matches!(err, Error::RuntimeConflict));
        let creates = fake
            .calls()
            .iter()
            .filter(|c| matches!(c, Call::Create { .. }))
            .count();
        assert_eq!(creates, 1);

        ex.delete("rt-1").await.unwrap();
        assert!(fake
            .calls()
            .iter()
            .any(|c| matches!(c, Call::Remove { .. })));
        assert!(matches!(
            ex.delete("rt-1").await,
            Err(Error::RuntimeNotFound)
        ));
        assert!(ex.list().is_empty());
    }

    #[tokio::test]
    async fn a_failed_build_leaves_nothing_behind() {
        let fake = Arc::new(FakeAdapter::new());
        fake.on_exec(|_| (2, b"compiling...\r\nfailed\r\n".to_vec()));
        let (ex, _) = executor(fake.clone());
        let mut params = RuntimeParams::new("b-1", "hearth/node:v5-18");
        params.command = "npm install".to_string();
        let err = ex.create(params).await.unwrap_err();
        let Error::BuildFailed(message) = err else {
            panic!("{err:?}")
        };
        assert!(message.contains("compiling...\nfailed"), "{message}");
        assert!(
            message.ends_with("Build command exited with code 2."),
            "{message}"
        );
        assert!(ex.list().is_empty());
        assert!(fake.names().is_empty(), "{:?}", fake.names());
        let exec = fake.calls().into_iter().find_map(|c| match c {
            Call::Exec { cmd, .. } => Some(cmd),
            _ => None,
        });
        assert_eq!(exec.unwrap()[0], "script");
    }

    #[tokio::test]
    async fn a_successful_build_stores_its_artifact() {
        let fake = Arc::new(FakeAdapter::new());
        let (ex, root) = executor(fake.clone());
        let fake_for_exec = fake.clone();
        fake.on_exec(move |_| {
            for name in fake_for_exec.names() {
                fake_for_exec.set_file(&name, "/mnt/code/code.tar.gz", "built");
            }
            (0, b"Build finished.\n".to_vec())
        });
        let mut params = RuntimeParams::new("b-2", "hearth/node:v5-18");
        params.command = "build".to_string();
        params.destination = root.join("builds").display().to_string();
        params.remove = true;
        let report = ex.create(params).await.unwrap().unwrap();
        let path = report.path.unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"built");
        assert_eq!(report.size, Some(5));
        assert!(ex.list().is_empty(), "remove: true keeps nothing");
        assert!(fake.names().is_empty());
    }

    #[tokio::test]
    async fn the_limit_evicts_the_idlest_and_refuses_when_all_are_busy() {
        let fake = Arc::new(FakeAdapter::new());
        let (ex, _) = executor(fake.clone());
        ex.create(RuntimeParams::new("one", "img")).await.unwrap();
        ex.create(RuntimeParams::new("two", "img")).await.unwrap();
        // Both busy: a third is refused.
        let busy_one = ex.acquire("one").unwrap();
        let busy_two = ex.acquire("two").unwrap();
        let err = ex
            .create(RuntimeParams::new("three", "img"))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::RuntimeLimit(_)), "{err:?}");
        // One idle again: it makes room, the busy one stays.
        drop(busy_one);
        ex.create(RuntimeParams::new("three", "img")).await.unwrap();
        assert!(ex.get("one").is_none());
        assert!(ex.get("two").is_some());
        assert_eq!(ex.warm(), 2);
        drop(busy_two);
    }

    #[tokio::test]
    async fn the_reaper_skips_busy_runtimes_and_adoption_restores_the_table() {
        let fake = Arc::new(FakeAdapter::new());
        let (ex, _) = executor(fake.clone());
        ex.create(RuntimeParams::new("busy", "img")).await.unwrap();
        ex.create(RuntimeParams::new("idle", "img")).await.unwrap();
        let guard = ex.acquire("busy").unwrap();
        for runtime in ex.snapshot() {
            runtime.updated_ms.store(0, Ordering::Relaxed);
        }
        ex.maintain().await;
        assert!(ex.get("busy").is_some(), "a busy runtime was reaped");
        assert!(ex.get("idle").is_none(), "an idle runtime was kept");
        drop(guard);
        // The reaped container is removed in the background.
        for _ in 0..100 {
            if fake.names().len() == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(fake.names().len(), 1);

        // A new executor over the same platform adopts the running container.
        let (again, _) = executor(fake.clone());
        let (adopted, removed) = again.adopt_at_boot().await.unwrap();
        assert_eq!((adopted, removed), (1, 0));
        let runtime = again.get("busy").unwrap();
        assert!(!runtime.is_pending());
        assert_eq!(runtime.secret, ex.get("busy").unwrap().secret);
    }
}
