//! Warm pools: prestarted generic runtime containers, one pool per image and resource shape,
//! specialised on a function's first execution with the pool protocol
//! (`runtimes/pool-protocol.md`) instead of starting a container on the request path.
//!
//! - A member is created with only `OPEN_RUNTIMES_POOL_SECRET` in its env and no code, with the
//!   limits of its pool's shape, and joins the pool once it answers `/__opr/health`.
//! - [`Executor::take_member`] pops a ready member (and records the demand); the container then
//!   belongs to one function until it is removed like any runtime.
//! - [`Executor::pool_loop`] refills in the background: target per pool = its configured minimum
//!   plus the cold starts of the last minute, at most `OPR_EXECUTOR_POOL_MAX`; idle members above
//!   the target are removed after [`SHRINK_AFTER`]; all idle members together hold at most
//!   `OPR_EXECUTOR_POOL_MEMORY_MB` (by their limits); at most `OPR_EXECUTOR_POOL_CREATIONS`
//!   containers are being created at a time.
//! - Members carry the executor label and [`POOL_LABEL`] but no runtime id, so a restarted
//!   executor removes them (and runtimes specialised from them) at boot like any stale container.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hearth_adapters::{RestartPolicy, RuntimeSpec, EXECUTOR_LABEL};
use tokio::sync::{Notify, Semaphore};

use super::{random_hex, Executor, RUNTIME_PORT};
use crate::error::{Error, Result};
use crate::invoke::Target;

/// Marks a container as a pool member (value: the pool's image).
pub const POOL_LABEL: &str = "hearth.pool";
/// How long demand is remembered for the reactive part of a pool's size.
const DEMAND_WINDOW: Duration = Duration::from_secs(60);
/// An idle member above its pool's target is removed once it has waited this long.
const SHRINK_AFTER: Duration = Duration::from_secs(30);
/// A pool whose member failed to start waits this long before trying again.
const FAILURE_BACKOFF: Duration = Duration::from_secs(5);
/// Refills wait this long after a take, so they do not slow the execution it serves.
const REFILL_DELAY: Duration = Duration::from_millis(150);
/// How long a new member may take to answer its health probe.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A pool's image and resource shape: members are interchangeable only within one key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub image: String,
    /// CPUs in thousandths (f64 is not hashable).
    pub millicpus: u64,
    pub memory_mb: u64,
}

impl PoolKey {
    pub fn new(image: &str, cpus: f64, memory_mb: u64) -> Self {
        Self {
            image: image.to_string(),
            millicpus: (cpus * 1000.0).round() as u64,
            memory_mb,
        }
    }

    fn cpus(&self) -> f64 {
        self.millicpus as f64 / 1000.0
    }
}

/// A started, healthy, never specialised container.
#[derive(Debug, Clone)]
pub struct Member {
    pub container: String,
    pub name: String,
    pub target: Target,
    pub secret: String,
    pub logs_dir: Option<PathBuf>,
    idle_since: Instant,
}

#[derive(Default)]
struct PoolState {
    idle: VecDeque<Member>,
    starting: usize,
    /// Cold starts that asked this pool for a member, for the reactive size.
    demand: VecDeque<Instant>,
    min: usize,
    failed_at: Option<Instant>,
}

impl PoolState {
    fn target(&self, max: usize) -> usize {
        (self.min + self.demand.len()).min(max.max(self.min))
    }
}

/// Every pool of one executor.
pub struct Pools {
    pools: Mutex<HashMap<PoolKey, PoolState>>,
    creations: Arc<Semaphore>,
    refill: Notify,
    hits: AtomicUsize,
    misses: AtomicUsize,
}

impl Pools {
    pub fn new(creations: usize) -> Self {
        Self {
            pools: Mutex::new(HashMap::new()),
            creations: Arc::new(Semaphore::new(creations.max(1))),
            refill: Notify::new(),
            hits: AtomicUsize::new(0),
            misses: AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<PoolKey, PoolState>> {
        match self.pools.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Sets a pool's configured minimum (creating the pool).
    pub fn set_min(&self, key: PoolKey, min: usize) {
        self.lock().entry(key).or_default().min = min;
        self.refill.notify_one();
    }

    /// Container ids of idle members (owned by the pools, not orphans).
    pub fn member_ids(&self) -> Vec<String> {
        self.lock()
            .values()
            .flat_map(|p| p.idle.iter().map(|m| m.container.clone()))
            .collect()
    }

    /// (image, cpus, memory, idle, starting) per pool, for metrics and tests.
    pub fn sizes(&self) -> Vec<(PoolKey, usize, usize)> {
        self.lock()
            .iter()
            .map(|(k, p)| (k.clone(), p.idle.len(), p.starting))
            .collect()
    }

    /// The pools' part of `/metrics`.
    pub fn render_metrics(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(out, "# HELP hearth_pool_takes_total First executions by whether a warm pool member served them.");
        let _ = writeln!(out, "# TYPE hearth_pool_takes_total counter");
        let _ = writeln!(
            out,
            "hearth_pool_takes_total{{result=\"hit\"}} {}",
            self.hits()
        );
        let _ = writeln!(
            out,
            "hearth_pool_takes_total{{result=\"miss\"}} {}",
            self.misses()
        );
        let _ = writeln!(
            out,
            "# HELP hearth_pool_idle Ready, never specialised pool members."
        );
        let _ = writeln!(out, "# TYPE hearth_pool_idle gauge");
        let _ = writeln!(
            out,
            "# HELP hearth_pool_starting Pool members being created."
        );
        let _ = writeln!(out, "# TYPE hearth_pool_starting gauge");
        for (key, idle, starting) in self.sizes() {
            let labels = format!(
                "image=\"{}\",cpus=\"{}\",memory=\"{}\"",
                key.image,
                key.cpus(),
                key.memory_mb
            );
            let _ = writeln!(out, "hearth_pool_idle{{{labels}}} {idle}");
            let _ = writeln!(out, "hearth_pool_starting{{{labels}}} {starting}");
        }
        out
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::Relaxed)
    }

    pub fn misses(&self) -> usize {
        self.misses.load(Ordering::Relaxed)
    }
}

impl Executor {
    /// Whether a runtime with these parameters can come from a pool (or, on an adapter that
    /// cannot place files before start, must be handed its code over HTTP).
    pub(super) fn poolable(&self, params: &super::RuntimeParams) -> bool {
        params.version == crate::invoke::Version::V5
            && params.runtime_entrypoint.is_empty()
            && !params.source.is_empty()
    }

    /// Pops a ready member of the pool for `key`, recording the demand either way.
    pub fn take_member(&self, key: &PoolKey) -> Option<Member> {
        let member = {
            let mut pools = self.pools.lock();
            let pool = pools.entry(key.clone()).or_default();
            pool.demand.push_back(Instant::now());
            pool.idle.pop_front()
        };
        if member.is_some() {
            self.pools.hits.fetch_add(1, Ordering::Relaxed);
        } else {
            self.pools.misses.fetch_add(1, Ordering::Relaxed);
        }
        self.pools.refill.notify_one();
        member
    }

    /// Creates and starts one generic member of `key`'s shape and waits until it answers.
    pub async fn start_member(&self, key: &PoolKey) -> Result<Member> {
        let name = format!("{}-pool-{}", self.name, random_hex(10));
        let secret = random_hex(32);
        let logs_dir = self
            .adapter
            .shares_host_folders()
            .then(|| self.config.runtimes_dir.join(&name).join("logs"));
        if let Some(dir) = &logs_dir {
            tokio::fs::create_dir_all(dir).await.map_err(|err| {
                Error::Internal(format!("failed to create {}: {err}", dir.display()))
            })?;
        }
        let mut labels = self.configured_labels();
        labels.insert(EXECUTOR_LABEL.to_string(), self.name.clone());
        labels.insert(POOL_LABEL.to_string(), key.image.clone());
        let spec = RuntimeSpec {
            name: name.clone(),
            image: key.image.clone(),
            cmd: None,
            env: [("OPEN_RUNTIMES_POOL_SECRET".to_string(), secret.clone())]
                .into_iter()
                .chain(self.socket_env(logs_dir.is_some()))
                .collect(),
            labels,
            working_dir: None,
            cpus: key.cpus(),
            memory_mb: key.memory_mb,
            pids_limit: self.config.pids_limit,
            networks: self.config.networks.clone(),
            restart_policy: RestartPolicy::No,
            port: RUNTIME_PORT,
            logs_dir: logs_dir.clone(),
        };
        let container = self.adapter.create(&spec).await?;
        let started = async {
            let endpoint = self.adapter.start(&container).await?;
            let target = self.target(endpoint, logs_dir.as_deref());
            if !self
                .invoker
                .wait_listening(&target, Instant::now() + READY_TIMEOUT)
                .await
            {
                return Err(Error::RuntimeTimeout);
            }
            Ok(target)
        };
        match started.await {
            Ok(target) => Ok(Member {
                container,
                name,
                target,
                secret,
                logs_dir,
                idle_since: Instant::now(),
            }),
            Err(err) => {
                self.remove_member_container(&container, logs_dir.as_ref())
                    .await;
                Err(err)
            }
        }
    }

    async fn remove_member_container(&self, container: &str, logs_dir: Option<&PathBuf>) {
        match self.adapter.remove(container).await {
            Ok(()) | Err(hearth_adapters::Error::NotFound(_)) => {}
            Err(err) => {
                tracing::warn!(container = %container, error = %err, "failed to remove a pool member")
            }
        }
        if let Some(parent) = logs_dir.and_then(|dir| dir.parent()) {
            let _ = tokio::fs::remove_dir_all(parent).await;
        }
    }

    /// Removes a member that will not be used (failed specialisation, shrinking, shutdown).
    pub async fn discard_member(&self, member: &Member) {
        self.remove_member_container(&member.container, member.logs_dir.as_ref())
            .await;
    }

    /// Declares the pools of `OPR_EXECUTOR_IMAGES` (default shape, configured minimum).
    pub fn declare_boot_pools(&self) {
        if !self.config.pool {
            return;
        }
        let defaults = super::RuntimeParams::new("", "");
        for image in self.config.images.iter().map(|i| i.trim()) {
            if !image.is_empty() {
                self.pools.set_min(
                    PoolKey::new(image, defaults.cpus, defaults.memory),
                    self.config.pool_min,
                );
            }
        }
    }

    /// One refill/shrink pass over every pool: starts the creations that are due (in the
    /// background, bounded) and removes members above target that idled long enough.
    fn pool_pass(self: &Arc<Self>) {
        let max = self.config.pool_max;
        let budget = self.config.pool_memory_mb;
        let now = Instant::now();
        let mut to_start = Vec::new();
        let mut to_remove = Vec::new();
        {
            let mut pools = self.pools.lock();
            let mut held: u64 = pools
                .iter()
                .map(|(k, p)| k.memory_mb * (p.idle.len() + p.starting) as u64)
                .sum();
            for (key, pool) in pools.iter_mut() {
                while pool
                    .demand
                    .front()
                    .is_some_and(|t| now.duration_since(*t) > DEMAND_WINDOW)
                {
                    pool.demand.pop_front();
                }
                let target = pool.target(max);
                let have = pool.idle.len() + pool.starting;
                if have < target {
                    if pool
                        .failed_at
                        .is_some_and(|t| now.duration_since(t) < FAILURE_BACKOFF)
                    {
                        continue;
                    }
                    for _ in have..target {
                        if held + key.memory_mb > budget {
                            break;
                        }
                        held += key.memory_mb;
                        pool.starting += 1;
                        to_start.push(key.clone());
                    }
                } else if pool.idle.len() > target {
                    // Oldest idle first; one per pass, so a pool shrinks gradually.
                    if pool
                        .idle
                        .back()
                        .is_some_and(|m| now.duration_since(m.idle_since) > SHRINK_AFTER)
                    {
                        if let Some(member) = pool.idle.pop_back() {
                            held -= key.memory_mb;
                            to_remove.push(member);
                        }
                    }
                }
            }
        }
        for key in to_start {
            let this = self.clone();
            let permits = self.pools.creations.clone();
            tokio::spawn(async move {
                let Ok(_permit) = permits.acquire_owned().await else {
                    return;
                };
                let started = this.start_member(&key).await;
                let mut pools = this.pools.lock();
                let pool = pools.entry(key.clone()).or_default();
                pool.starting = pool.starting.saturating_sub(1);
                match started {
                    Ok(member) => {
                        pool.failed_at = None;
                        pool.idle.push_back(member);
                    }
                    Err(err) => {
                        pool.failed_at = Some(Instant::now());
                        tracing::warn!(image = %key.image, error = %err, "failed to start a pool member");
                    }
                }
            });
        }
        for member in to_remove {
            let this = self.clone();
            tokio::spawn(async move { this.discard_member(&member).await });
        }
    }

    /// Keeps the pools filled until `shutdown`, then removes the idle members.
    pub async fn pool_loop(self: Arc<Self>, shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut shutdown = shutdown;
        if self.config.pool {
            loop {
                self.pool_pass();
                tokio::select! {
                    _ = self.pools.refill.notified() => {
                        // A take notifies: let the first execution it serves finish before
                        // container creations compete with it for the CPU.
                        tokio::time::sleep(REFILL_DELAY).await;
                    }
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = shutdown.changed() => break,
                }
            }
        }
        self.drain_pools().await;
    }

    /// Removes every idle member (shutdown).
    pub async fn drain_pools(&self) {
        let members: Vec<Member> = {
            let mut pools = self.pools.lock();
            pools
                .values_mut()
                .flat_map(|p| std::mem::take(&mut p.idle))
                .collect()
        };
        for member in &members {
            self.discard_member(member).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_target_is_the_minimum_plus_recent_demand_capped() {
        let mut state = PoolState {
            min: 1,
            ..Default::default()
        };
        assert_eq!(state.target(8), 1);
        for _ in 0..3 {
            state.demand.push_back(Instant::now());
        }
        assert_eq!(state.target(8), 4);
        for _ in 0..10 {
            state.demand.push_back(Instant::now());
        }
        assert_eq!(state.target(8), 8);
        state.min = 10;
        assert_eq!(
            state.target(8),
            10,
            "the configured minimum wins over the cap"
        );
    }

    #[test]
    fn keys_compare_shapes() {
        assert_eq!(PoolKey::new("a", 1.0, 512), PoolKey::new("a", 1.0, 512));
        assert_ne!(PoolKey::new("a", 0.5, 512), PoolKey::new("a", 1.0, 512));
        assert_ne!(PoolKey::new("a", 1.0, 256), PoolKey::new("a", 1.0, 512));
    }
}
