//! A build worker: takes a job off the queue, claims the build (a lease, so a second delivery
//! does not build it twice), fetches and packs the source into storage, runs the build through
//! the executor's API while relaying its live log, stores the result, publishes it, and only then
//! acknowledges the job. Infrastructure failures are retried with backoff through the retry
//! queue and end on the dead-letter queue; the build's own failures are final at once.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use hearth_executor::storage::Storage;
use object_store::path::Path as ObjectPath;

use crate::error::{Error, Result};
use crate::executor_api::ExecutorClient;
use crate::fetch::{self, Limits};
use crate::model::{Artifact, Build, Function, Job, Lease, Source, Status};
use crate::queue::{Broker, Incoming};
use crate::store::{log_line, Store};
use crate::unix_now;

/// How a worker works.
#[derive(Clone)]
pub struct WorkerConfig {
    /// The executor's storage: sources go in, artifacts come out, by the executor's paths.
    pub storage: Arc<Storage>,
    /// Scratch space for checkouts.
    pub work_dir: PathBuf,
    pub fetch: Limits,
    /// Attempts (deliveries that started the build) before a build fails for good.
    pub max_attempts: u32,
    /// First retry delay; doubles per attempt, at most a minute.
    pub retry_delay: Duration,
    /// How long a claim holds without renewal.
    pub lease: Duration,
}

pub struct Worker {
    store: Store,
    broker: Arc<Broker>,
    executor: ExecutorClient,
    config: WorkerConfig,
    name: String,
}

/// What to tell the broker about a delivery.
enum Outcome {
    Ack,
    Requeue,
}

impl Outcome {
    /// Ack once a step that must happen before the ack succeeded; else deliver again.
    fn after<T, E>(step: std::result::Result<T, E>) -> Self {
        if step.is_ok() {
            Outcome::Ack
        } else {
            Outcome::Requeue
        }
    }
}

impl Worker {
    pub fn new(
        store: Store,
        broker: Arc<Broker>,
        executor: ExecutorClient,
        config: WorkerConfig,
    ) -> Self {
        let name = format!(
            "{}-{:08x}",
            hearth_executor::hostname_or("worker"),
            rand::random::<u32>()
        );
        Self {
            store,
            broker,
            executor,
            config,
            name,
        }
    }

    /// Handles one delivery to the end: the job is acknowledged only once its result is stored.
    pub async fn handle(self: Arc<Self>, incoming: Incoming) {
        let outcome = match &incoming.job {
            Ok(job) => self.process(job).await,
            Err(reason) => {
                tracing::warn!(%reason, "not a build job; dead-lettered");
                Outcome::after(
                    self.broker
                        .publish_dead(reason.as_bytes(), "not a build job")
                        .await,
                )
            }
        };
        let sent = match outcome {
            Outcome::Ack => incoming.ack().await,
            Outcome::Requeue => {
                // A short pause so a store or broker outage is not a hot loop.
                tokio::time::sleep(Duration::from_secs(1)).await;
                incoming.requeue().await
            }
        };
        if let Err(err) = sent {
            // The broker delivers the job again; the stored state makes that harmless.
            tracing::warn!(error = %err, "could not settle a build job");
        }
    }

    async fn process(&self, job: &Job) -> Outcome {
        let build = match self.store.get(&job.id).await {
            Ok(build) => build,
            Err(Error::NotFound) => {
                tracing::warn!(build = %job.id, "job for an unknown build; dead-lettered");
                let payload = serde_json::to_vec(job).unwrap_or_default();
                return Outcome::after(self.broker.publish_dead(&payload, "unknown build").await);
            }
            Err(err) => {
                tracing::warn!(build = %job.id, error = %err, "build store unavailable");
                return Outcome::Requeue;
            }
        };
        if build.status.is_final() {
            return Outcome::Ack;
        }
        // Another delivery of this build may be running (a duplicate message, or ours before a
        // broker reconnect): wait for its result or for its lease to lapse.
        let holder = format!("{}-{:08x}", self.name, rand::random::<u32>());
        loop {
            match self.store.try_lease(&job.id, &self.lease(&holder)).await {
                Ok(true) => break,
                Ok(false) => {}
                Err(_) => return Outcome::Requeue,
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            match self.store.get(&job.id).await {
                Ok(b) if b.status.is_final() => return Outcome::Ack,
                Ok(_) => {}
                Err(_) => return Outcome::Requeue,
            }
        }
        // The record may have moved on while we waited for the lease.
        let build = match self.store.get(&job.id).await {
            Ok(b) if b.status.is_final() => {
                self.store.drop_lease(&job.id).await;
                return Outcome::Ack;
            }
            Ok(b) => b,
            Err(_) => {
                self.store.drop_lease(&job.id).await;
                return Outcome::Requeue;
            }
        };
        let outcome = self.attempt(job, build, &holder).await;
        self.store.drop_lease(&job.id).await;
        outcome
    }

    /// A claim by `holder` from now for the configured lease time.
    fn lease(&self, holder: &str) -> Lease {
        Lease {
            holder: holder.to_string(),
            until: unix_now() + self.config.lease.as_secs_f64(),
        }
    }

    async fn renew(&self, id: &str, holder: &str) -> Result<()> {
        self.store.put_lease(id, &self.lease(holder)).await
    }

    async fn log(&self, id: &str, line: &str) {
        if let Err(err) = self.store.append_log(id, &log_line(line)).await {
            tracing::warn!(build = %id, error = %err, "could not write the build log");
        }
    }

    async fn attempt(&self, job: &Job, build: Build, holder: &str) -> Outcome {
        let id = build.id.clone();
        if build.attempts >= self.config.max_attempts {
            let reason = format!(
                "gave up after {} attempts: {}",
                build.attempts,
                build
                    .error
                    .as_deref()
                    .unwrap_or("the worker stopped during each attempt")
            );
            return self.give_up(job, &reason).await;
        }
        let claimed = self
            .store
            .update(&id, |b| {
                if !b.status.is_final() {
                    b.status = Status::Running;
                    b.attempts += 1;
                    b.started_at = Some(unix_now());
                }
            })
            .await;
        let build = match claimed {
            Ok(b) if b.status == Status::Running => b,
            Ok(_) => return Outcome::Ack, // cancelled just now
            Err(_) => return Outcome::Requeue,
        };
        self.log(
            &id,
            &format!("Build attempt {} on worker {}.", build.attempts, self.name),
        )
        .await;

        // The build runs while a watcher renews the lease and looks for a cancel.
        let (cancel, cancelled) = tokio::sync::watch::channel(false);
        let watch = async {
            let mut ticks = 0u32;
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                ticks += 1;
                if ticks.is_multiple_of(8) {
                    let _ = self.renew(&id, holder).await;
                }
                if let Ok(b) = self.store.get(&id).await {
                    if b.status == Status::Cancelled {
                        let _ = cancel.send(true);
                    }
                }
            }
        };
        let result = tokio::select! {
            result = self.run(&build, cancelled) => result,
            never = watch => never,
        };
        match result {
            Err(Error::Cancelled) => {
                self.log(&id, "Build cancelled.").await;
                Outcome::after(self.finish(&id, |b| b.finished_at = Some(unix_now())).await)
            }
            Ok((artifact, commit)) => {
                self.log(
                    &id,
                    &format!(
                        "Build succeeded: {} ({} bytes).",
                        artifact.path, artifact.size
                    ),
                )
                .await;
                let spec = &build.spec;
                if !spec.function.is_empty() {
                    let function = Function {
                        name: spec.function.clone(),
                        build: id.clone(),
                        runtime_id: format!("fn-{}-{}", spec.function, &id[..id.len().min(12)]),
                        image: spec.image.clone(),
                        entrypoint: spec.entrypoint.clone(),
                        version: spec.version.clone(),
                        artifact: artifact.clone(),
                        built_from: build.created_at,
                        deployed_at: unix_now(),
                    };
                    if let Err(err) = self.store.deploy(&function).await {
                        tracing::warn!(build = %id, error = %err, "could not record the deployment");
                        return Outcome::Requeue;
                    }
                    self.log(&id, &format!("Deployed as function {}.", spec.function))
                        .await;
                }
                self.complete(&id, |b| {
                    b.status = Status::Succeeded;
                    b.artifact = Some(artifact);
                    b.commit = commit.or(b.commit.take());
                    b.error = None;
                })
                .await
            }
            Err(err) if !err.is_retryable() => {
                self.log(&id, &format!("Build failed: {err}")).await;
                self.complete(&id, |b| {
                    b.status = Status::Failed;
                    b.error = Some(err.to_string());
                })
                .await
            }
            Err(err) => {
                if build.attempts >= self.config.max_attempts {
                    return self
                        .give_up(
                            job,
                            &format!("gave up after {} attempts: {err}", build.attempts),
                        )
                        .await;
                }
                let delay = self
                    .config
                    .retry_delay
                    .saturating_mul(1 << (build.attempts - 1).min(6))
                    .min(Duration::from_secs(60));
                tracing::warn!(build = %id, attempt = build.attempts, error = %err, retry_in = ?delay, "build attempt failed; retrying");
                self.log(
                    &id,
                    &format!(
                        "Attempt {} failed: {err}. Retrying in {:.1} s.",
                        build.attempts,
                        delay.as_secs_f64()
                    ),
                )
                .await;
                let requeued = self
                    .store
                    .update(&id, |b| {
                        if !b.status.is_final() {
                            b.status = Status::Queued;
                            b.error = Some(format!("attempt {} failed: {err}", b.attempts));
                        }
                    })
                    .await;
                if requeued.is_err() {
                    return Outcome::Requeue;
                }
                Outcome::after(self.broker.publish_retry(job, delay).await)
            }
        }
    }

    /// Writes the final state (unless a cancel got there first) and then tells the world.
    async fn complete(&self, id: &str, change: impl FnOnce(&mut Build)) -> Outcome {
        let finished = self.finish(id, change).await;
        if let Ok(build) = &finished {
            if let Err(err) = self.broker.publish_event(build).await {
                tracing::warn!(build = %id, error = %err, "could not publish the build's result");
            }
        }
        Outcome::after(finished)
    }

    async fn finish(&self, id: &str, change: impl FnOnce(&mut Build)) -> Result<Build> {
        self.store
            .update(id, |b| {
                if b.status != Status::Cancelled {
                    change(b);
                }
                b.finished_at = Some(unix_now());
            })
            .await
            .inspect_err(|err| tracing::warn!(build = %id, error = %err, "could not store the build's result"))
    }

    async fn give_up(&self, job: &Job, reason: &str) -> Outcome {
        tracing::error!(build = %job.id, %reason, "build dead-lettered");
        self.log(&job.id, &format!("Build failed: {reason}")).await;
        let payload = serde_json::to_vec(job).unwrap_or_default();
        if self.broker.publish_dead(&payload, reason).await.is_err() {
            return Outcome::Requeue;
        }
        let reason = reason.to_string();
        self.complete(&job.id, |b| {
            b.status = Status::Failed;
            b.error = Some(reason);
        })
        .await
    }

    /// One attempt: source into storage, build through the executor. A cancel stops the fetch
    /// at once; a build already sent to the executor is stopped by removing its runtime, again
    /// and again until the executor answers (a create still in flight may land after a first
    /// remove).
    async fn run(
        &self,
        build: &Build,
        cancelled: tokio::sync::watch::Receiver<bool>,
    ) -> Result<(Artifact, Option<String>)> {
        let id = &build.id;
        let spec = &build.spec;
        let storage = &self.config.storage;
        let folder = storage.api_path(&ObjectPath::from(format!("builds/{id}")));
        if storage.is_local() {
            clear_artifacts(Path::new(&folder)).await;
        }
        let mut cancel_seen = cancelled.clone();
        let (source, commit) = tokio::select! {
            prepared = self.prepare_source(build) => prepared?,
            _ = cancel_seen.wait_for(|c| *c) => return Err(Error::Cancelled),
        };
        let runtime = runtime_id(id);
        self.executor.delete_runtime(&runtime).await?;
        let command = format!(
            "tar -zxf /tmp/code.tar.gz -C /mnt/code && bash helpers/build.sh {}",
            shell_quote(&spec.command)
        );
        let mut body = json!({
            "runtimeId": runtime,
            "image": spec.image,
            "source": source,
            "destination": folder,
            "entrypoint": spec.entrypoint,
            "variables": spec.variables,
            "command": command,
            "timeout": spec.timeout,
            "cpus": spec.cpus,
            "memory": spec.memory,
            "version": spec.version,
            "remove": true,
        });
        if !spec.cache_key.is_empty() {
            body["cacheKey"] = json!(spec.cache_key);
        }
        // The log stream is opened first: the executor waits for the runtime to appear.
        let (lines, mut received) = tokio::sync::mpsc::unbounded_channel();
        let follow_for = Duration::from_secs(spec.timeout + 120);
        let executor = self.executor.clone();
        let follow = {
            let runtime = runtime.clone();
            tokio::spawn(async move { executor.follow_logs(&runtime, follow_for, lines).await })
        };
        let store = self.store.clone();
        let log_id = id.clone();
        let writer = tokio::spawn(async move {
            while let Some(line) = received.recv().await {
                let _ = store.append_log(&log_id, &line).await;
            }
        });
        let post = self
            .executor
            .build(&body, Duration::from_secs(spec.timeout + 300));
        tokio::pin!(post);
        let mut stopping = false;
        let result = loop {
            tokio::select! {
                result = &mut post => break result,
                _ = cancel_seen.wait_for(|c| *c), if !stopping => stopping = true,
                _ = tokio::time::sleep(Duration::from_millis(500)), if stopping => {}
            }
            let _ = self.executor.delete_runtime(&runtime).await;
        };
        let result = if stopping {
            Err(Error::Cancelled)
        } else {
            result
        };
        // The executor ends the stream within a second of the build; don't wait for more.
        if tokio::time::timeout(Duration::from_secs(3), follow)
            .await
            .is_err()
        {
            tracing::debug!(build = %id, "log stream did not end in time");
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
        result.map(|artifact| (artifact, commit))
    }

    /// The source as a storage path for the executor: a git checkout packed into the build's
    /// folder, or the archive itself. Returns the path and, from git, the commit.
    async fn prepare_source(&self, build: &Build) -> Result<(String, Option<String>)> {
        let spec = &build.spec;
        let id = &build.id;
        Ok(match &spec.source {
            Source::Git {
                url,
                reference,
                subdirectory,
            } => {
                let checkout = self.config.work_dir.join(id);
                self.log(
                    id,
                    &format!(
                        "Fetching {url} at {}.",
                        reference.as_deref().unwrap_or("HEAD")
                    ),
                )
                .await;
                let commit =
                    fetch::fetch_git(url, reference.as_deref(), &checkout, self.config.fetch)
                        .await?;
                let root = fetch::subfolder(&checkout, subdirectory.as_deref());
                let packed_file = self.config.work_dir.join(format!("{id}.tar.gz"));
                let packed = match root {
                    Ok(root) => {
                        fetch::pack(root, packed_file.clone(), self.config.fetch.max_bytes).await
                    }
                    Err(err) => Err(err),
                };
                let _ = tokio::fs::remove_dir_all(&checkout).await;
                let stored = match packed {
                    Ok(bytes) => self
                        .store_source(id, &packed_file)
                        .await
                        .map(|path| (bytes, path)),
                    Err(err) => Err(err),
                };
                let _ = tokio::fs::remove_file(&packed_file).await;
                let (bytes, archive) = stored?;
                self.log(
                    id,
                    &format!("Fetched commit {commit} ({bytes} bytes of source)."),
                )
                .await;
                (archive, Some(commit))
            }
            Source::Archive { path } => {
                let storage = &self.config.storage;
                let found = storage
                    .exists("source.path", path)
                    .await
                    .map_err(|e| match e {
                        hearth_executor::error::Error::InvalidArgument(why) => {
                            Error::BuildFailed(format!("archive {path}: {why}"))
                        }
                        other => Error::Store(other.to_string()),
                    })?;
                if !found {
                    return Err(Error::BuildFailed(format!(
                        "archive {path} not found in storage"
                    )));
                }
                (path.clone(), None)
            }
        })
    }

    /// Puts a packed source into storage as `builds/<id>/source.tar.gz`; returns its path.
    async fn store_source(&self, id: &str, file: &Path) -> Result<String> {
        let bytes = tokio::fs::read(file)
            .await
            .map_err(|e| Error::Store(format!("failed to read {}: {e}", file.display())))?;
        let object = ObjectPath::from(format!("builds/{id}/source.tar.gz"));
        let chunk = futures_util::stream::once(async move {
            Ok::<_, std::io::Error>(bytes::Bytes::from(bytes))
        });
        self.config
            .storage
            .put_stream(&object, Box::pin(chunk))
            .await
            .map_err(|e| Error::Store(format!("failed to store the source: {e}")))?;
        Ok(self.config.storage.api_path(&object))
    }
}

/// The executor runtime a build runs in: one per build, so a redelivery replaces it.
pub fn runtime_id(build_id: &str) -> String {
    format!("build-{build_id}")
}

/// Removes artifacts an interrupted attempt left (the executor names them `<random>.gz`).
async fn clear_artifacts(folder: &Path) {
    let Ok(mut entries) = tokio::fs::read_dir(folder).await else {
        return;
    };
    while let Ok(Some(entry)) = entries.next_entry().await {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".gz") && name != "source.tar.gz" {
            let _ = tokio::fs::remove_file(entry.path()).await;
        }
    }
}

fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_quoted_for_the_shell() {
        assert_eq!(shell_quote("npm install"), "'npm install'");
        assert_eq!(shell_quote("echo 'x'"), r"'echo '\''x'\'''");
    }
}
