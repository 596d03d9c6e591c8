//! Keeping the table true to the platform: adoption at boot, idle reaping, reconciliation.
//!
//! At boot every container labelled with this executor's name is either adopted (running, with
//! the labels needed to talk to it) or removed (pool members and runtimes specialised from them
//! carry no runtime id, so they are removed). Each maintenance pass reaps runtimes idle longer
//! than their keep-warm TTL or the inactive threshold (never one with an execution in flight,
//! never one pinned with `keepWarm`), drops entries whose
//! container vanished, and removes containers of this executor that no entry owns.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use hearth_adapters::{EXECUTOR_LABEL, RUNTIME_LABEL};

use super::{remove_container, Executor, Runtime, HOSTNAME_LABEL, SECRET_LABEL, VERSION_LABEL};
use crate::error::Result;
use crate::invoke::Version;

impl Executor {
    fn own_label(&self) -> Vec<(String, String)> {
        vec![(EXECUTOR_LABEL.to_string(), self.name.clone())]
    }

    /// Adopts this executor's running runtimes and removes the rest. Returns (adopted, removed).
    pub async fn adopt_at_boot(&self) -> Result<(usize, usize)> {
        let found = self.adapter.list(&self.own_label()).await?;
        let (mut adopted, mut removed) = (0, 0);
        for info in found {
            let runtime_id = info.labels.get(RUNTIME_LABEL).cloned().unwrap_or_default();
            let secret = info.labels.get(SECRET_LABEL).cloned().unwrap_or_default();
            let version = info
                .labels
                .get(VERSION_LABEL)
                .and_then(|v| Version::parse(v))
                .unwrap_or(Version::V5);
            if !info.running
                || runtime_id.is_empty()
                || secret.is_empty()
                || self.get(&runtime_id).is_some()
            {
                match self.adapter.remove(&info.id).await {
                    Ok(()) | Err(hearth_adapters::Error::NotFound(_)) => removed += 1,
                    Err(err) => {
                        tracing::warn!(container = %info.name, error = %err, "failed to remove a stale runtime")
                    }
                }
                continue;
            }
            let logs_dir = self
                .adapter
                .shares_host_folders()
                .then(|| self.config.runtimes_dir.join(&info.name).join("logs"));
            let mut runtime = Runtime::new(
                &runtime_id,
                info.name.clone(),
                &info.image,
                version,
                logs_dir,
            );
            runtime.secret = secret;
            if let Some(hostname) = info.labels.get(HOSTNAME_LABEL) {
                runtime.hostname = hostname.clone();
            }
            if let Ok(age) = info.created.duration_since(UNIX_EPOCH) {
                runtime.created = age.as_secs_f64();
            }
            self.adopt(runtime, info.id.clone(), info.endpoint.clone());
            adopted += 1;
        }
        Ok((adopted, removed))
    }

    /// One maintenance pass. Returns the number of runtimes reaped or dropped.
    pub async fn maintain(&self) -> usize {
        let threshold = self.config.inactive_threshold();
        let mut changed = 0;
        for runtime in self.snapshot() {
            if runtime.is_pending() || runtime.in_flight() > 0 {
                continue;
            }
            if runtime.expired(threshold) && self.remove_if_idle(&runtime) {
                tracing::debug!(runtime = %runtime.id, "reaped idle runtime");
                changed += 1;
            }
        }
        changed + self.reconcile().await
    }

    /// Drops entries whose container is gone and removes containers no entry owns.
    async fn reconcile(&self) -> usize {
        let Ok(found) = self.adapter.list(&self.own_label()).await else {
            return 0;
        };
        let mut changed = 0;
        let running: HashSet<&str> = found
            .iter()
            .filter(|info| info.running)
            .map(|info| info.id.as_str())
            .collect();
        for runtime in self.snapshot() {
            if runtime.is_pending() {
                continue;
            }
            let Some(container) = runtime.container_id() else {
                continue;
            };
            if !running.contains(container) && self.forget(&runtime) {
                tracing::warn!(runtime = %runtime.id, "runtime container is gone; dropped it");
                remove_container(self.adapter.as_ref(), &runtime).await;
                changed += 1;
            }
        }
        let mut owned: HashSet<String> = self
            .snapshot()
            .iter()
            .filter_map(|r| r.container_id().map(str::to_string))
            .collect();
        // Idle pool members belong to the pools.
        owned.extend(self.pools.member_ids());
        for info in &found {
            // A container this young may belong to a creation whose entry is still on its way.
            let young = info
                .created
                .elapsed()
                .map(|age| age < std::time::Duration::from_secs(60))
                .unwrap_or(true);
            let id = info
                .labels
                .get(RUNTIME_LABEL)
                .map(String::as_str)
                .unwrap_or("");
            if !owned.contains(&info.id) && !young && self.get(id).is_none() {
                tracing::warn!(container = %info.name, "removing an orphan runtime container");
                if self.adapter.remove(&info.id).await.is_ok() {
                    changed += 1;
                }
            }
        }
        changed
    }

    /// Runs maintenance passes until `shutdown` resolves.
    pub async fn maintenance_loop(self: Arc<Self>, shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut shutdown = shutdown;
        let mut ticker = tokio::time::interval(self.config.maintenance_interval());
        ticker.tick().await;
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    self.maintain().await;
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}
