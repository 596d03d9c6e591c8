//! A recording in-memory fake of [`crate::Adapter`] for the executor's unit tests.
//!
//! It keeps containers and their files in memory, records every call ([`FakeAdapter::calls`]),
//! runs execs through a test-supplied function ([`FakeAdapter::on_exec`]), and injects faults
//! ([`FakeAdapter::fail_next`]) and delays ([`FakeAdapter::set_create_delay`],
//! [`FakeAdapter::set_exec_delay`]). Names and ids are both accepted wherever Docker accepts
//! them. It answers `false` to [`Adapter::shares_host_folders`] unless told otherwise, so code
//! paths that move files through `put_file`/`read_file` are the ones exercised by default.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::stream::{self, BoxStream, StreamExt};

use crate::{Adapter, Endpoint, Error, ExecExit, OutputSink, Result, RuntimeInfo, RuntimeSpec};

/// `read_file` yields files in chunks of this size.
pub const READ_CHUNK: usize = 16 * 1024;

/// The operation names [`FakeAdapter::fail_next`] accepts.
pub const OPS: [&str; 10] = [
    "create",
    "put_file",
    "start",
    "stop",
    "remove",
    "exec",
    "read_file",
    "list",
    "inspect",
    "ensure_network",
];

/// One call made to the fake, with the arguments tests usually check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Create { name: String, image: String },
    PutFile { id: String, path: String },
    Start { id: String },
    Stop { id: String },
    Remove { id: String },
    Exec { id: String, cmd: Vec<String> },
    ReadFile { id: String, path: String },
    List,
    Inspect { id: String },
    EnsureNetwork { name: String },
}

type ExecFn = dyn Fn(&[String]) -> (i64, Vec<u8>) + Send + Sync;

struct Container {
    id: String,
    spec: RuntimeSpec,
    running: bool,
    created: SystemTime,
    files: HashMap<String, Bytes>,
}

impl Container {
    fn endpoint(&self) -> Endpoint {
        Endpoint {
            host: format!("fake-{}", self.spec.name),
            port: self.spec.port,
        }
    }

    fn info(&self) -> RuntimeInfo {
        RuntimeInfo {
            id: self.id.clone(),
            name: self.spec.name.clone(),
            image: self.spec.image.clone(),
            labels: self.spec.labels.clone(),
            running: self.running,
            created: self.created,
            endpoint: self.running.then(|| self.endpoint()),
        }
    }
}

#[derive(Default)]
struct State {
    containers: Vec<Container>,
    next_id: u64,
    calls: Vec<Call>,
    failures: HashMap<&'static str, VecDeque<Error>>,
    networks: BTreeSet<String>,
    create_delay: Duration,
    exec_delay: Duration,
    on_exec: Option<Arc<ExecFn>>,
}

impl State {
    fn find(&self, id: &str) -> Option<&Container> {
        self.containers
            .iter()
            .find(|c| c.id == id || c.spec.name == id)
    }

    fn find_mut(&mut self, id: &str) -> Option<&mut Container> {
        self.containers
            .iter_mut()
            .find(|c| c.id == id || c.spec.name == id)
    }
}

/// An in-memory [`Adapter`]. Cheap to share behind an `Arc`.
#[derive(Default)]
pub struct FakeAdapter {
    state: Mutex<State>,
    shares_host_folders: AtomicBool,
}

impl FakeAdapter {
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the lock leaves consistent data behind: every
        // critical section below completes its updates before anything can panic.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records `call`, then fails with an injected error if one is queued for `op`.
    fn enter(&self, op: &'static str, call: Call) -> Result<()> {
        let mut state = self.state();
        state.calls.push(call);
        match state.failures.get_mut(op).and_then(VecDeque::pop_front) {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.state().calls.clone()
    }

    pub fn clear_calls(&self) {
        self.state().calls.clear();
    }

    /// Sets what execs do: `f(cmd)` returns the exit code and the output sent to the sink.
    /// Without it, execs succeed silently.
    pub fn on_exec(&self, f: impl Fn(&[String]) -> (i64, Vec<u8>) + Send + Sync + 'static) {
        self.state().on_exec = Some(Arc::new(f));
    }

    /// Makes the next call of `op` (one of [`OPS`], e.g. `"start"`) fail with `err`. Calls
    /// queue up: two `fail_next("exec", ..)` fail the next two execs.
    pub fn fail_next(&self, op: &'static str, err: Error) {
        assert!(OPS.contains(&op), "unknown fake adapter operation {op:?}");
        self.state().failures.entry(op).or_default().push_back(err);
    }

    /// Makes every `create` wait `d` before taking the name (to widen race windows).
    pub fn set_create_delay(&self, d: Duration) {
        self.state().create_delay = d;
    }

    /// Makes every exec wait `d` before it answers; an exec whose timeout is shorter fails with
    /// `Timeout` after its timeout.
    pub fn set_exec_delay(&self, d: Duration) {
        self.state().exec_delay = d;
    }

    /// Places a file into a container as if the runtime had written it. `false` if the
    /// container does not exist.
    pub fn set_file(&self, id: &str, path: &str, bytes: impl Into<Bytes>) -> bool {
        match self.state().find_mut(id) {
            Some(container) => {
                container.files.insert(path.to_string(), bytes.into());
                true
            }
            None => false,
        }
    }

    /// A file of a container (as placed by `put_file` or [`FakeAdapter::set_file`]).
    pub fn file(&self, id: &str, path: &str) -> Option<Bytes> {
        self.state().find(id)?.files.get(path).cloned()
    }

    /// The spec a container was created with.
    pub fn spec(&self, id: &str) -> Option<RuntimeSpec> {
        Some(self.state().find(id)?.spec.clone())
    }

    /// Whether a container is running; `None` if it does not exist.
    pub fn is_running(&self, id: &str) -> Option<bool> {
        Some(self.state().find(id)?.running)
    }

    /// Flips a container's running state behind the executor's back (a crash, a restart).
    /// `false` if the container does not exist.
    pub fn set_running(&self, id: &str, running: bool) -> bool {
        match self.state().find_mut(id) {
            Some(container) => {
                container.running = running;
                true
            }
            None => false,
        }
    }

    /// Names of all containers, in creation order.
    pub fn names(&self) -> Vec<String> {
        let state = self.state();
        state
            .containers
            .iter()
            .map(|c| c.spec.name.clone())
            .collect()
    }

    /// Networks made by `ensure_network`.
    pub fn networks(&self) -> Vec<String> {
        self.state().networks.iter().cloned().collect()
    }

    pub fn set_shares_host_folders(&self, shares: bool) {
        self.shares_host_folders.store(shares, Ordering::Relaxed);
    }
}

fn not_found(op: &str, id: &str) -> Error {
    Error::NotFound(format!("failed to {op} container {id}"))
}

#[async_trait]
impl Adapter for FakeAdapter {
    async fn create(&self, spec: &RuntimeSpec) -> Result<String> {
        self.enter(
            "create",
            Call::Create {
                name: spec.name.clone(),
                image: spec.image.clone(),
            },
        )?;
        let delay = self.state().create_delay;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let mut state = self.state();
        if state.find(&spec.name).is_some() {
            return Err(Error::Conflict(format!(
                "failed to create container {}: the name is taken",
                spec.name
            )));
        }
        state.next_id += 1;
        let id = format!("fake-id-{}", state.next_id);
        state.containers.push(Container {
            id: id.clone(),
            spec: spec.clone(),
            running: false,
            created: SystemTime::now(),
            files: HashMap::new(),
        });
        Ok(id)
    }

    async fn put_file(&self, id: &str, path: &str, content: Bytes) -> Result<()> {
        let call = Call::PutFile {
            id: id.to_string(),
            path: path.to_string(),
        };
        self.enter("put_file", call)?;
        let mut state = self.state();
        let container = state
            .find_mut(id)
            .ok_or_else(|| not_found("put a file into", id))?;
        container.files.insert(path.to_string(), content);
        Ok(())
    }

    async fn start(&self, id: &str) -> Result<Endpoint> {
        self.enter("start", Call::Start { id: id.to_string() })?;
        let mut state = self.state();
        let container = state.find_mut(id).ok_or_else(|| not_found("start", id))?;
        container.running = true;
        Ok(container.endpoint())
    }

    async fn stop(&self, id: &str, _grace: Duration) -> Result<()> {
        self.enter("stop", Call::Stop { id: id.to_string() })?;
        let mut state = self.state();
        let container = state.find_mut(id).ok_or_else(|| not_found("stop", id))?;
        container.running = false;
        Ok(())
    }

    async fn remove(&self, id: &str) -> Result<()> {
        self.enter("remove", Call::Remove { id: id.to_string() })?;
        let mut state = self.state();
        let before = state.containers.len();
        state.containers.retain(|c| c.id != id && c.spec.name != id);
        if state.containers.len() == before {
            return Err(not_found("remove", id));
        }
        Ok(())
    }

    async fn exec(
        &self,
        id: &str,
        cmd: &[String],
        timeout: Duration,
        sink: OutputSink<'_>,
    ) -> Result<ExecExit> {
        let call = Call::Exec {
            id: id.to_string(),
            cmd: cmd.to_vec(),
        };
        self.enter("exec", call)?;
        let (delay, on_exec) = {
            let state = self.state();
            match state.find(id) {
                None => return Err(not_found("exec in", id)),
                Some(c) if !c.running => {
                    return Err(Error::Conflict(format!(
                        "failed to exec in container {id}: it is not running"
                    )))
                }
                Some(_) => (state.exec_delay, state.on_exec.clone()),
            }
        };
        if delay >= timeout {
            tokio::time::sleep(timeout).await;
            return Err(Error::Timeout(format!(
                "failed to exec in container {id} after {timeout:?}"
            )));
        }
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let (exit_code, output) = match on_exec {
            Some(f) => f(cmd),
            None => (0, Vec::new()),
        };
        if !output.is_empty() {
            sink(&output);
        }
        Ok(ExecExit { exit_code })
    }

    async fn read_file(&self, id: &str, path: &str) -> Result<BoxStream<'static, Result<Bytes>>> {
        let call = Call::ReadFile {
            id: id.to_string(),
            path: path.to_string(),
        };
        self.enter("read_file", call)?;
        let state = self.state();
        let container = state
            .find(id)
            .ok_or_else(|| not_found("read a file from", id))?;
        let content =
            container.files.get(path).cloned().ok_or_else(|| {
                Error::NotFound(format!("failed to read {path} from container {id}"))
            })?;
        let chunks: Vec<Result<Bytes>> = (0..content.len())
            .step_by(READ_CHUNK)
            .map(|start| Ok(content.slice(start..(start + READ_CHUNK).min(content.len()))))
            .collect();
        Ok(stream::iter(chunks).boxed())
    }

    async fn list(&self, labels: &[(String, String)]) -> Result<Vec<RuntimeInfo>> {
        self.enter("list", Call::List)?;
        let state = self.state();
        Ok(state
            .containers
            .iter()
            .filter(|c| {
                labels
                    .iter()
                    .all(|(k, v)| c.spec.labels.get(k).is_some_and(|value| value == v))
            })
            .map(Container::info)
            .collect())
    }

    async fn inspect(&self, id: &str) -> Result<RuntimeInfo> {
        self.enter("inspect", Call::Inspect { id: id.to_string() })?;
        let state = self.state();
        Ok(state
            .find(id)
            .ok_or_else(|| not_found("inspect", id))?
            .info())
    }

    async fn ensure_network(&self, name: &str) -> Result<()> {
        let call = Call::EnsureNetwork {
            name: name.to_string(),
        };
        self.enter("ensure_network", call)?;
        self.state().networks.insert(name.to_string());
        Ok(())
    }

    fn shares_host_folders(&self) -> bool {
        self.shares_host_folders.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::TryStreamExt;

    fn spec(name: &str) -> RuntimeSpec {
        RuntimeSpec {
            name: name.to_string(),
            image: "hearth/node:v5-18".to_string(),
            port: 3000,
            labels: HashMap::from([("hearth.executor".to_string(), "e1".to_string())]),
            ..RuntimeSpec::default()
        }
    }

    async fn read_all(fake: &FakeAdapter, id: &str, path: &str) -> Result<(usize, Vec<u8>)> {
        let chunks: Vec<Bytes> = fake.read_file(id, path).await?.try_collect().await?;
        Ok((chunks.len(), chunks.concat()))
    }

    #[tokio::test]
    async fn runs_a_runtime_through_its_life() {
        let fake = FakeAdapter::new();
        let id = fake.create(&spec("rt-a")).await.unwrap();
        fake.put_file(&id, "/tmp/code.tar.gz", Bytes::from_static(b"code"))
            .await
            .unwrap();
        assert!(!fake.inspect("rt-a").await.unwrap().running);
        assert_eq!(fake.inspect(&id).await.unwrap().endpoint, None);

        let endpoint = fake.start(&id).await.unwrap();
        assert_eq!(
            endpoint,
            Endpoint {
                host: "fake-rt-a".into(),
                port: 3000
            }
        );
        let info = fake.inspect("rt-a").await.unwrap();
        assert!(info.running);
        assert_eq!(info.id, id);
        assert_eq!(info.endpoint, Some(endpoint));

        fake.stop(&id, Duration::from_secs(1)).await.unwrap();
        assert_eq!(fake.is_running(&id), Some(false));
        fake.remove("rt-a").await.unwrap();
        assert!(matches!(fake.remove(&id).await, Err(Error::NotFound(_))));
        assert!(matches!(fake.inspect(&id).await, Err(Error::NotFound(_))));

        assert_eq!(
            fake.calls(),
            vec![
                Call::Create {
                    name: "rt-a".into(),
                    image: "hearth/node:v5-18".into()
                },
                Call::PutFile {
                    id: id.clone(),
                    path: "/tmp/code.tar.gz".into()
                },
                Call::Inspect { id: "rt-a".into() },
                Call::Inspect { id: id.clone() },
                Call::Start { id: id.clone() },
                Call::Inspect { id: "rt-a".into() },
                Call::Stop { id: id.clone() },
                Call::Remove { id: "rt-a".into() },
                Call::Remove { id: id.clone() },
                Call::Inspect { id: id.clone() },
            ]
        );
    }

    #[tokio::test]
    async fn a_taken_name_conflicts_and_unknown_ids_are_not_found() {
        let fake = FakeAdapter::new();
        fake.create(&spec("rt-a")).await.unwrap();
        assert!(matches!(
            fake.create(&spec("rt-a")).await,
            Err(Error::Conflict(_))
        ));
        assert!(matches!(fake.start("nope").await, Err(Error::NotFound(_))));
        assert!(matches!(
            fake.stop("nope", Duration::ZERO).await,
            Err(Error::NotFound(_))
        ));
        assert!(matches!(
            fake.put_file("nope", "/x", Bytes::new()).await,
            Err(Error::NotFound(_))
        ));
        assert!(matches!(
            fake.read_file("nope", "/x").await,
            Err(Error::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn concurrent_creates_of_one_name_make_one_runtime() {
        let fake = Arc::new(FakeAdapter::new());
        fake.set_create_delay(Duration::from_millis(20));
        let spec = spec("rt-a");
        let (a, b) = tokio::join!(fake.create(&spec), fake.create(&spec));
        assert_eq!(a.is_ok() as u8 + b.is_ok() as u8, 1);
        assert_eq!(fake.names(), vec!["rt-a".to_string()]);
    }

    #[tokio::test]
    async fn files_come_back_in_chunks() {
        let fake = FakeAdapter::new();
        let id = fake.create(&spec("rt-a")).await.unwrap();
        let big: Vec<u8> = (0..READ_CHUNK * 2 + 10).map(|i| i as u8).collect();
        assert!(fake.set_file(&id, "/tmp/big", big.clone()));
        let (chunks, content) = read_all(&fake, &id, "/tmp/big").await.unwrap();
        assert_eq!(chunks, 3);
        assert_eq!(content, big);

        fake.put_file(&id, "/tmp/small", Bytes::from_static(b"hi"))
            .await
            .unwrap();
        assert_eq!(
            read_all(&fake, &id, "/tmp/small").await.unwrap(),
            (1, b"hi".to_vec())
        );
        assert_eq!(fake.file(&id, "/tmp/small").as_deref(), Some(&b"hi"[..]));
        assert!(matches!(
            fake.read_file(&id, "/tmp/missing").await,
            Err(Error::NotFound(_))
        ));
        assert!(!fake.set_file("nope", "/x", Bytes::new()));
    }

    #[tokio::test]
    async fn execs_run_the_given_function() {
        let fake = FakeAdapter::new();
        let id = fake.create(&spec("rt-a")).await.unwrap();
        let cmd = vec!["bash".to_string(), "-c".to_string(), "build".to_string()];
        let sink = |_: &[u8]| {};
        // Not running yet.
        assert!(matches!(
            fake.exec(&id, &cmd, Duration::from_secs(1), &sink).await,
            Err(Error::Conflict(_))
        ));
        fake.start(&id).await.unwrap();
        let exit = fake.exec(&id, &cmd, Duration::from_secs(1), &sink).await;
        assert_eq!(exit.unwrap().exit_code, 0);

        fake.on_exec(|cmd| (7, format!("ran {}", cmd.join(" ")).into_bytes()));
        let output = Mutex::new(Vec::new());
        let sink = |chunk: &[u8]| output.lock().unwrap().extend_from_slice(chunk);
        let exit = fake.exec(&id, &cmd, Duration::from_secs(1), &sink).await;
        assert_eq!(exit.unwrap().exit_code, 7);
        assert_eq!(output.lock().unwrap().as_slice(), b"ran bash -c build");
        assert!(fake.calls().contains(&Call::Exec {
            id: id.clone(),
            cmd: cmd.clone()
        }));
    }

    #[tokio::test(start_paused = true)]
    async fn slow_execs_time_out() {
        let fake = FakeAdapter::new();
        let id = fake.create(&spec("rt-a")).await.unwrap();
        fake.start(&id).await.unwrap();
        fake.set_exec_delay(Duration::from_secs(10));
        let cmd = vec!["sleep".to_string()];
        let sink = |_: &[u8]| {};
        assert!(matches!(
            fake.exec(&id, &cmd, Duration::from_secs(1), &sink).await,
            Err(Error::Timeout(_))
        ));
        let exit = fake.exec(&id, &cmd, Duration::from_secs(20), &sink).await;
        assert_eq!(exit.unwrap().exit_code, 0);
    }

    #[tokio::test]
    async fn injected_failures_fire_once_each() {
        let fake = FakeAdapter::new();
        fake.fail_next("start", Error::Unavailable("docker down".into()));
        fake.fail_next("start", Error::Timeout("slow".into()));
        let id = fake.create(&spec("rt-a")).await.unwrap();
        assert!(matches!(fake.start(&id).await, Err(Error::Unavailable(_))));
        assert!(matches!(fake.start(&id).await, Err(Error::Timeout(_))));
        assert!(fake.start(&id).await.is_ok());
        // A failed call is still recorded.
        let starts = fake
            .calls()
            .iter()
            .filter(|c| matches!(c, Call::Start { .. }))
            .count();
        assert_eq!(starts, 3);
    }

    #[tokio::test]
    async fn lists_by_label_and_tracks_networks() {
        let fake = FakeAdapter::new();
        fake.create(&spec("rt-a")).await.unwrap();
        let mut other = spec("rt-b");
        other
            .labels
            .insert("hearth.executor".to_string(), "e2".to_string());
        fake.create(&other).await.unwrap();
        let e1 = [("hearth.executor".to_string(), "e1".to_string())];
        let listed = fake.list(&e1).await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].name, "rt-a");
        assert_eq!(fake.list(&[]).await.unwrap().len(), 2);

        assert!(fake.set_running("rt-b", true));
        let running = fake.list(&[]).await.unwrap();
        assert!(running.iter().any(|r| r.name == "rt-b" && r.running));

        fake.ensure_network("hearth").await.unwrap();
        fake.ensure_network("hearth").await.unwrap();
        assert_eq!(fake.networks(), vec!["hearth".to_string()]);
        assert!(!fake.shares_host_folders());
        fake.set_shares_host_folders(true);
        assert!(fake.shares_host_folders());
    }
}
