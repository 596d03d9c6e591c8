//! The Docker implementation of [`crate::Adapter`], on the engine's HTTP API through bollard.
//!
//! Every engine call runs under [`DockerOptions::call_timeout`] (stop adds its grace period;
//! exec has its own timeout; a file being read may take as long as it needs, but each chunk must
//! arrive within the call timeout). Engine errors are mapped in one place, [`map_err`].
//!
//! The port a runtime serves on is kept in the [`PORT_LABEL`] label, so that an executor which
//! restarts can rebuild every runtime's [`Endpoint`] from `list`/`inspect` alone.

mod tar_stream;

use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bollard::errors::Error as DockerError;
use bollard::exec::{CreateExecOptions, StartExecResults};
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, ContainerSummary, ContainerSummaryStateEnum,
    HostConfig, NetworkConnectRequest, NetworkCreateRequest, PortBinding, RestartPolicy as Restart,
    RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, DownloadFromContainerOptionsBuilder,
    ListContainersOptionsBuilder, RemoveContainerOptionsBuilder, StopContainerOptionsBuilder,
    UploadToContainerOptionsBuilder,
};
use bollard::{body_full, Docker};
use bytes::Bytes;
use futures_util::stream::{self, BoxStream};
use futures_util::StreamExt;
use tokio::sync::Mutex;

use self::tar_stream::TarFile;
use crate::{
    Adapter, Endpoint, Error, ExecExit, OutputSink, RestartPolicy, Result, RuntimeInfo, RuntimeSpec,
};

/// The label holding the port a runtime serves on (inside the container).
pub const PORT_LABEL: &str = "hearth.port";
/// Where [`RuntimeSpec::logs_dir`] is mounted inside a runtime.
pub const LOGS_MOUNT: &str = "/mnt/logs";
/// `spec`'s logs folder, refused when relative: Docker would take a relative "path" for a named
/// volume, Swarm refuses it less helpfully. `kind` names what is being created.
pub(crate) fn absolute_logs_dir<'a>(
    spec: &'a RuntimeSpec,
    kind: &str,
) -> Result<Option<&'a std::path::Path>> {
    match &spec.logs_dir {
        Some(dir) if !dir.is_absolute() => Err(Error::Backend(format!(
            "failed to create {kind} {}: logs folder {} is not an absolute path",
            spec.name,
            dir.display()
        ))),
        dir => Ok(dir.as_deref()),
    }
}

/// The host address published ports are bound to in [`Addressing::Published`].
const LOOPBACK: &str = "127.0.0.1";
/// bollard's client-wide limit, made irrelevant by the per-call limits.
const UNBOUNDED: Duration = Duration::from_secs(24 * 3600);

/// How the executor reaches a runtime's port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Addressing {
    /// The port is published on a random port of 127.0.0.1: for an executor running on the
    /// Docker host itself (development, tests).
    #[default]
    Published,
    /// The runtime is reached by its name on the networks it shares with the executor, on its
    /// own port: for an executor running in a container. Nothing is published.
    Network,
}

#[derive(Debug, Clone)]
pub struct DockerOptions {
    pub addressing: Addressing,
    /// The limit of every engine call (create, start, inspect, ...).
    pub call_timeout: Duration,
}

impl Default for DockerOptions {
    fn default() -> Self {
        Self {
            addressing: Addressing::Published,
            call_timeout: Duration::from_secs(30),
        }
    }
}

/// Runtimes as containers of one Docker engine.
pub struct DockerAdapter {
    docker: Docker,
    options: DockerOptions,
    /// Serialises `ensure_network`: the engine accepts two networks with the same name, so two
    /// concurrent "inspect, then create" would create both.
    network_lock: Mutex<()>,
}

impl DockerAdapter {
    /// Connects to the local engine (`DOCKER_HOST`, else the default socket) and negotiates the
    /// API version (bollard speaks a newer one than engines like 20.10).
    pub async fn connect(options: DockerOptions) -> Result<Self> {
        let docker = Docker::connect_with_local_defaults()
            .map_err(|err| map_err("failed to connect to the Docker engine".into(), err))?;
        Self::with_client(docker, options).await
    }

    /// Uses a client the caller built (e.g. for a remote engine), negotiating its API version.
    pub async fn with_client(docker: Docker, options: DockerOptions) -> Result<Self> {
        let timeout = options.call_timeout;
        // bollard's own limit (2 min by default) would cut a long `stop`: every call here runs
        // under its own limit instead.
        let docker = docker.with_timeout(UNBOUNDED);
        let docker = call(
            timeout,
            || "failed to negotiate the Docker API version".into(),
            docker.negotiate_version(),
        )
        .await?;
        Ok(Self {
            docker,
            options,
            network_lock: Mutex::new(()),
        })
    }

    /// The bollard client, for callers that need engine calls the trait does not cover.
    pub fn client(&self) -> &Docker {
        &self.docker
    }

    pub fn options(&self) -> &DockerOptions {
        &self.options
    }

    /// A stable name for the replica running in `container` (this process's own container,
    /// found by its hostname): `<project>-<service>-<number>` for a compose replica,
    /// `<stack>-<service>-<slot>` for a Swarm task. `None` outside such a container. A replica
    /// that is recreated keeps the name, so it adopts the runtimes its predecessor left.
    pub async fn replica_name(&self, container: &str) -> Option<String> {
        let info = self.inspect_raw(container).await.ok()?;
        replica_name_of(info.config?.labels.as_ref()?)
    }

    async fn call<T>(
        &self,
        op: impl FnOnce() -> String,
        fut: impl Future<Output = Result<T, DockerError>>,
    ) -> Result<T> {
        call(self.options.call_timeout, op, fut).await
    }

    async fn inspect_raw(&self, id: &str) -> Result<ContainerInspectResponse> {
        self.call(
            || format!("failed to inspect container {id}"),
            self.docker.inspect_container(id, None),
        )
        .await
    }

    fn host_config(&self, spec: &RuntimeSpec) -> Result<HostConfig> {
        let mut host = HostConfig {
            restart_policy: Some(Restart {
                name: Some(match spec.restart_policy {
                    RestartPolicy::No => RestartPolicyNameEnum::NO,
                    RestartPolicy::Always => RestartPolicyNameEnum::ALWAYS,
                    RestartPolicy::OnFailure => RestartPolicyNameEnum::ON_FAILURE,
                    RestartPolicy::UnlessStopped => RestartPolicyNameEnum::UNLESS_STOPPED,
                }),
                maximum_retry_count: None,
            }),
            network_mode: spec.networks.first().cloned(),
            ..HostConfig::default()
        };
        if spec.cpus > 0.0 {
            host.nano_cpus = Some((spec.cpus * 1e9).round() as i64);
        }
        if spec.memory_mb > 0 {
            let bytes =
                i64::try_from(spec.memory_mb.saturating_mul(1024 * 1024)).unwrap_or(i64::MAX);
            host.memory = Some(bytes);
            // Equal to `memory`: no swap on top of it.
            host.memory_swap = Some(bytes);
        }
        if spec.pids_limit > 0 {
            host.pids_limit = Some(spec.pids_limit);
        }
        if let Some(dir) = absolute_logs_dir(spec, "container")? {
            host.binds = Some(vec![format!("{}:{LOGS_MOUNT}:rw", dir.display())]);
        }
        if self.options.addressing == Addressing::Published {
            host.port_bindings = Some(HashMap::from([(
                port_key(spec.port),
                Some(vec![PortBinding {
                    host_ip: Some(LOOPBACK.to_string()),
                    // Empty: the engine picks a free port.
                    host_port: Some(String::new()),
                }]),
            )]));
        }
        Ok(host)
    }

    /// Where a container's port is reachable, from its inspect answer (`None` when it is not
    /// running or its port is unknown).
    fn endpoint_of(&self, info: &ContainerInspectResponse) -> Option<Endpoint> {
        let running = info.state.as_ref().and_then(|s| s.running).unwrap_or(false);
        if !running {
            return None;
        }
        let labels = info.config.as_ref().and_then(|c| c.labels.as_ref());
        let port = labels.and_then(port_label)?;
        match self.options.addressing {
            Addressing::Network => Some(Endpoint {
                host: container_name(info.name.as_deref()?),
                port,
            }),
            Addressing::Published => {
                let bindings = info
                    .network_settings
                    .as_ref()?
                    .ports
                    .as_ref()?
                    .get(&port_key(port))?
                    .as_ref()?;
                let published = bindings
                    .iter()
                    .filter(|b| b.host_ip.as_deref().is_none_or(|ip| ip == LOOPBACK))
                    .find_map(|b| b.host_port.as_deref()?.parse().ok())?;
                Some(Endpoint {
                    host: LOOPBACK.to_string(),
                    port: published,
                })
            }
        }
    }

    fn info_of_inspect(&self, id: &str, info: ContainerInspectResponse) -> RuntimeInfo {
        let endpoint = self.endpoint_of(&info);
        let config = info.config.unwrap_or_default();
        RuntimeInfo {
            id: info.id.unwrap_or_else(|| id.to_string()),
            name: info.name.as_deref().map(container_name).unwrap_or_default(),
            image: config.image.unwrap_or_default(),
            labels: config.labels.unwrap_or_default(),
            running: info.state.and_then(|s| s.running).unwrap_or(false),
            created: info
                .created
                .as_deref()
                .and_then(parse_rfc3339)
                .unwrap_or(UNIX_EPOCH),
            endpoint,
        }
    }

    fn info_of_summary(&self, summary: ContainerSummary) -> RuntimeInfo {
        let labels = summary.labels.unwrap_or_default();
        let running = summary.state == Some(ContainerSummaryStateEnum::RUNNING);
        let name = summary
            .names
            .as_ref()
            .and_then(|names| names.first())
            .map(|n| container_name(n))
            .unwrap_or_default();
        let endpoint = match (running, port_label(&labels)) {
            (true, Some(port)) => match self.options.addressing {
                Addressing::Network => Some(Endpoint {
                    host: name.clone(),
                    port,
                }),
                Addressing::Published => summary
                    .ports
                    .iter()
                    .flatten()
                    .filter(|p| p.private_port == port)
                    .filter(|p| p.ip.as_deref().is_none_or(|ip| ip == LOOPBACK))
                    .find_map(|p| p.public_port)
                    .map(|published| Endpoint {
                        host: LOOPBACK.to_string(),
                        port: published,
                    }),
            },
            _ => None,
        };
        let created = summary
            .created
            .and_then(|secs| u64::try_from(secs).ok())
            .map(|secs| UNIX_EPOCH + Duration::from_secs(secs))
            .unwrap_or(UNIX_EPOCH);
        RuntimeInfo {
            id: summary.id.unwrap_or_default(),
            name,
            image: summary.image.unwrap_or_default(),
            labels,
            running,
            created,
            endpoint,
        }
    }
}

#[async_trait]
impl Adapter for DockerAdapter {
    async fn create(&self, spec: &RuntimeSpec) -> Result<String> {
        let name = &spec.name;
        let mut labels = spec.labels.clone();
        labels.insert(PORT_LABEL.to_string(), spec.port.to_string());
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            cmd: spec.cmd.clone(),
            env: Some(spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            labels: Some(labels),
            working_dir: spec.working_dir.clone(),
            exposed_ports: Some(vec![port_key(spec.port)]),
            host_config: Some(self.host_config(spec)?),
            ..ContainerCreateBody::default()
        };
        let options = CreateContainerOptionsBuilder::default().name(name).build();
        let created = self
            .call(
                || format!("failed to create container {name} of image {}", spec.image),
                self.docker.create_container(Some(options), body),
            )
            .await?;
        let id = created.id;
        for network in spec.networks.iter().skip(1) {
            let request = NetworkConnectRequest {
                container: id.clone(),
                endpoint_config: None,
            };
            let connected = self
                .call(
                    || format!("failed to connect container {name} to network {network}"),
                    self.docker.connect_network(network, request),
                )
                .await;
            if let Err(err) = connected {
                // Half-made runtimes are not left behind.
                if let Err(cleanup) = self.remove(&id).await {
                    tracing::warn!(container = %name, error = %cleanup, "failed to remove a half-created container");
                }
                return Err(err);
            }
        }
        Ok(id)
    }

    async fn put_file(&self, id: &str, path: &str, content: Bytes) -> Result<()> {
        let (folder, file) = split_path(path).ok_or_else(|| {
            Error::Backend(format!(
                "failed to put {path} into container {id}: not an absolute file path"
            ))
        })?;
        let archive = tar_of_file(file, &content).map_err(|err| {
            Error::Backend(format!("failed to pack {path} for container {id}: {err}"))
        })?;
        let options = UploadToContainerOptionsBuilder::default()
            .path(folder)
            .build();
        self.call(
            || format!("failed to put {path} into container {id}"),
            self.docker
                .upload_to_container(id, Some(options), body_full(archive.into())),
        )
        .await
    }

    async fn start(&self, id: &str) -> Result<Endpoint> {
        self.call(
            || format!("failed to start container {id}"),
            self.docker.start_container(id, None),
        )
        .await?;
        let info = self.inspect_raw(id).await?;
        self.endpoint_of(&info).ok_or_else(|| {
            let state = info.state.as_ref();
            let exit = state.and_then(|s| s.exit_code).unwrap_or_default();
            let error = state.and_then(|s| s.error.clone()).unwrap_or_default();
            Error::Backend(format!(
                "failed to start container {id}: it is not running after start \
                 (exit code {exit}{}{error}), or its port is unknown",
                if error.is_empty() { "" } else { ", " }
            ))
        })
    }

    async fn stop(&self, id: &str, grace: Duration) -> Result<()> {
        let seconds = i32::try_from(grace.as_secs()).unwrap_or(i32::MAX);
        let options = StopContainerOptionsBuilder::default().t(seconds).build();
        // The engine answers once the container is down, after up to `grace`.
        let limit = grace.saturating_add(self.options.call_timeout);
        call(
            limit,
            || format!("failed to stop container {id}"),
            self.docker.stop_container(id, Some(options)),
        )
        .await
    }

    async fn remove(&self, id: &str) -> Result<()> {
        let options = RemoveContainerOptionsBuilder::default()
            .force(true)
            .v(true)
            .build();
        self.call(
            || format!("failed to remove container {id}"),
            self.docker.remove_container(id, Some(options)),
        )
        .await
    }

    async fn exec(
        &self,
        id: &str,
        cmd: &[String],
        timeout: Duration,
        sink: OutputSink<'_>,
    ) -> Result<ExecExit> {
        let program = cmd.first().map(String::as_str).unwrap_or_default();
        let op = || format!("failed to exec {program} in container {id}");
        let run = async {
            let config = CreateExecOptions {
                cmd: Some(cmd.to_vec()),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                ..CreateExecOptions::default()
            };
            let exec = self
                .docker
                .create_exec(id, config)
                .await
                .map_err(|err| map_err(op(), err))?;
            let started = self
                .docker
                .start_exec(&exec.id, None)
                .await
                .map_err(|err| map_err(op(), err))?;
            if let StartExecResults::Attached { mut output, .. } = started {
                while let Some(chunk) = output.next().await {
                    let chunk = chunk.map_err(|err| map_err(op(), err))?;
                    sink(&chunk.into_bytes());
                }
            }
            // The output ends when the process does, but the engine may record the exit code
            // a moment later.
            loop {
                let inspect = self
                    .docker
                    .inspect_exec(&exec.id)
                    .await
                    .map_err(|err| map_err(op(), err))?;
                match (inspect.running, inspect.exit_code) {
                    (Some(true), _) | (_, None) => {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    (_, Some(exit_code)) => return Ok(ExecExit { exit_code }),
                }
            }
        };
        match tokio::time::timeout(timeout, run).await {
            Ok(result) => result,
            // Docker cannot kill an exec: the command is abandoned, the runtime keeps running.
            Err(_) => Err(Error::Timeout(format!("{} after {timeout:?}", op()))),
        }
    }

    async fn read_file(&self, id: &str, path: &str) -> Result<BoxStream<'static, Result<Bytes>>> {
        let op = format!("failed to read {path} from container {id}");
        let options = DownloadFromContainerOptionsBuilder::default()
            .path(path)
            .build();
        let body = self
            .docker
            .download_from_container(id, Some(options))
            .boxed();
        // Every chunk must come within the call timeout, the whole file may take longer.
        let idle = self.options.call_timeout;
        let state = (body, TarFile::new(), op, false);
        let mut stream = stream::try_unfold(state, move |(mut body, mut tar, op, ended)| {
            async move {
                if ended {
                    return Ok(None);
                }
                loop {
                    if tar.is_done() {
                        // Only the one file is wanted: the rest of the archive is dropped.
                        return Ok(None);
                    }
                    let next = tokio::time::timeout(idle, body.next())
                        .await
                        .map_err(|_| Error::Timeout(op.clone()))?;
                    let Some(chunk) = next else {
                        return match tar.finish() {
                            Ok(true) => Ok(None),
                            // Docker answers 404 for a missing file; an empty archive means
                            // the same.
                            Ok(false) => Err(Error::NotFound(op)),
                            Err(err) => Err(Error::Backend(format!("{op}: {err}"))),
                        };
                    };
                    let chunk = chunk.map_err(|err| map_err(op.clone(), err))?;
                    let mut out = Vec::new();
                    tar.push(chunk, &mut out)
                        .map_err(|err| Error::Backend(format!("{op}: {err}")))?;
                    if !out.is_empty() {
                        let bytes = if out.len() == 1 {
                            out.pop().unwrap_or_default()
                        } else {
                            Bytes::from(out.concat())
                        };
                        let ended = tar.is_done();
                        return Ok(Some((bytes, (body, tar, op, ended))));
                    }
                }
            }
        })
        .boxed();
        // The first chunk is awaited here so that a missing file (or container) is reported by
        // `read_file` itself rather than by the stream.
        match stream.next().await {
            None => Ok(stream::empty().boxed()),
            Some(Err(err)) => Err(err),
            Some(Ok(first)) => Ok(stream::once(async move { Ok(first) }).chain(stream).boxed()),
        }
    }

    async fn list(&self, labels: &[(String, String)]) -> Result<Vec<RuntimeInfo>> {
        let mut options = ListContainersOptionsBuilder::default().all(true);
        if !labels.is_empty() {
            let filters: HashMap<String, Vec<String>> = HashMap::from([(
                "label".to_string(),
                labels.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            )]);
            options = options.filters(&filters);
        }
        let options = options.build();
        let containers = self
            .call(
                || "failed to list containers".to_string(),
                self.docker.list_containers(Some(options)),
            )
            .await?;
        Ok(containers
            .into_iter()
            .map(|c| self.info_of_summary(c))
            .collect())
    }

    async fn inspect(&self, id: &str) -> Result<RuntimeInfo> {
        let info = self.inspect_raw(id).await?;
        Ok(self.info_of_inspect(id, info))
    }

    async fn ensure_network(&self, name: &str) -> Result<()> {
        let _guard = self.network_lock.lock().await;
        let found = self
            .call(
                || format!("failed to inspect network {name}"),
                self.docker.inspect_network(name, None),
            )
            .await;
        match found {
            Ok(_) => return Ok(()),
            Err(Error::NotFound(_)) => {}
            Err(err) => return Err(err),
        }
        let request = NetworkCreateRequest {
            name: name.to_string(),
            driver: Some("bridge".to_string()),
            attachable: Some(true),
            ..NetworkCreateRequest::default()
        };
        let created = self
            .call(
                || format!("failed to create network {name}"),
                self.docker.create_network(request),
            )
            .await;
        match created {
            // Another process created it meanwhile.
            Ok(_) | Err(Error::Conflict(_)) => Ok(()),
            Err(err) => Err(err),
        }
    }

    fn shares_host_folders(&self) -> bool {
        true
    }
}

/// Runs one engine call under `limit`, mapping its errors.
pub(crate) async fn call<T>(
    limit: Duration,
    op: impl FnOnce() -> String,
    fut: impl Future<Output = Result<T, DockerError>>,
) -> Result<T> {
    match tokio::time::timeout(limit, fut).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(err)) => Err(map_err(op(), err)),
        Err(_) => Err(Error::Timeout(format!("{} after {limit:?}", op()))),
    }
}

/// The one place engine errors become [`Error`]s. `op` names the operation and its object
/// ("failed to start container hearth-abc"). A 304 (already started/stopped) never gets here:
/// bollard counts it as success.
pub fn map_err(op: String, err: DockerError) -> Error {
    match err {
        DockerError::DockerResponseServerError {
            status_code: 404, ..
        } => Error::NotFound(op),
        DockerError::DockerResponseServerError {
            status_code: 409,
            message,
        } => Error::Conflict(format!("{op} ({message})")),
        DockerError::RequestTimeoutError => Error::Timeout(op),
        err @ (DockerError::IOError { .. }
        | DockerError::HyperResponseError { .. }
        | DockerError::HyperLegacyError { .. }
        | DockerError::SocketNotFoundError(_)
        | DockerError::UnsupportedURISchemeError { .. }) => {
            Error::Unavailable(format!("{op} ({err})"))
        }
        err => Error::Backend(format!("{op}: {err}")),
    }
}

fn port_key(port: u16) -> String {
    format!("{port}/tcp")
}

pub(crate) fn port_label(labels: &HashMap<String, String>) -> Option<u16> {
    labels.get(PORT_LABEL)?.parse().ok()
}

/// See [`DockerAdapter::replica_name`]: from compose's or Swarm's labels on a container.
fn replica_name_of(labels: &HashMap<String, String>) -> Option<String> {
    let label = |key: &str| labels.get(key).filter(|v| !v.is_empty());
    let name = if let (Some(project), Some(service), Some(number)) = (
        label("com.docker.compose.project"),
        label("com.docker.compose.service"),
        label("com.docker.compose.container-number"),
    ) {
        format!("{project}-{service}-{number}")
    } else {
        // Task names are `<service>.<slot>.<task id>` (`<service>.<node id>.<task id>` for
        // global services).
        let service = label("com.docker.swarm.service.name")?;
        let task = label("com.docker.swarm.task.name")?;
        let slot = task
            .strip_prefix(service.as_str())?
            .strip_prefix('.')?
            .split('.')
            .next()
            .filter(|slot| !slot.is_empty())?;
        format!("{service}-{slot}")
    };
    // Runtimes are named after their executor and reached by that name: keep it a hostname.
    Some(
        name.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .collect(),
    )
}

/// Docker reports names as `/name`.
fn container_name(name: &str) -> String {
    name.strip_prefix('/').unwrap_or(name).to_string()
}

/// `/usr/code/code.tar.gz` → (`/usr/code`, `code.tar.gz`); `/x` → (`/`, `x`).
fn split_path(path: &str) -> Option<(&str, &str)> {
    let (folder, file) = path.rsplit_once('/')?;
    if !path.starts_with('/') || file.is_empty() || file == "." || file == ".." {
        return None;
    }
    Some((if folder.is_empty() { "/" } else { folder }, file))
}

/// A tar archive holding one regular file (mode 0644).
fn tar_of_file(name: &str, content: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::with_capacity(content.len() + 2048));
    let mut header = tar::Header::new_gnu();
    header.set_size(content.len() as u64);
    header.set_mode(0o644);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    header.set_mtime(now);
    header.set_cksum();
    builder.append_data(&mut header, name, content)?;
    builder.into_inner()
}

/// Parses the engine's RFC 3339 timestamps (`2024-05-01T10:20:30.123456789Z`, or with an
/// offset). bollard leaves them as strings unless its `time`/`chrono` features are on.
pub fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    let bytes = text.as_bytes();
    if bytes.len() < 20 || bytes[4] != b'-' || bytes[7] != b'-' || bytes[13] != b':' {
        return None;
    }
    let num = |range: std::ops::Range<usize>| -> Option<i64> { text.get(range)?.parse().ok() };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    let mut rest = &text[19..];
    let mut nanos: u32 = 0;
    if let Some(fraction) = rest.strip_prefix('.') {
        let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
        let kept = &fraction[..digits.min(9)];
        nanos = format!("{kept:0<9}").parse().ok()?;
        rest = &fraction[digits..];
    }
    let offset = match rest.as_bytes().first()? {
        b'Z' | b'z' => 0,
        sign @ (b'+' | b'-') => {
            let hours: i64 = rest.get(1..3)?.parse().ok()?;
            let minutes: i64 = rest.get(4..6)?.parse().ok()?;
            let value = hours * 3600 + minutes * 60;
            if *sign == b'+' {
                value
            } else {
                -value
            }
        }
        _ => return None,
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset;
    let secs = u64::try_from(secs).ok()?;
    Some(UNIX_EPOCH + Duration::new(secs, nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_engine_timestamps() {
        let at = |s| {
            parse_rfc3339(s)
                .unwrap()
                .duration_since(UNIX_EPOCH)
                .unwrap()
        };
        assert_eq!(at("1970-01-01T00:00:00Z"), Duration::ZERO);
        assert_eq!(
            at("2024-05-01T10:20:30.123456789Z"),
            Duration::new(1_714_558_830, 123_456_789)
        );
        assert_eq!(
            at("2024-05-01T12:20:30.5+02:00"),
            Duration::new(1_714_558_830, 500_000_000)
        );
        assert_eq!(at("2000-02-29T00:00:00Z"), Duration::from_secs(951_782_400));
        assert!(parse_rfc3339("0001-01-01T00:00:00Z").is_none());
        assert!(parse_rfc3339("yesterday").is_none());
    }

    #[test]
    fn splits_paths() {
        assert_eq!(
            split_path("/usr/code/code.tar.gz"),
            Some(("/usr/code", "code.tar.gz"))
        );
        assert_eq!(split_path("/x"), Some(("/", "x")));
        assert_eq!(split_path("x"), None);
        assert_eq!(split_path("/usr/"), None);
        assert_eq!(split_path("relative/x"), None);
    }

    #[test]
    fn maps_engine_errors() {
        let server = |status_code| DockerError::DockerResponseServerError {
            status_code,
            message: "boom".into(),
        };
        let op = || "failed to start container c".to_string();
        assert!(matches!(map_err(op(), server(404)), Error::NotFound(m) if m == op()));
        assert!(matches!(map_err(op(), server(409)), Error::Conflict(_)));
        assert!(matches!(map_err(op(), server(500)), Error::Backend(_)));
        assert!(matches!(
            map_err(op(), DockerError::RequestTimeoutError),
            Error::Timeout(_)
        ));
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert!(matches!(
            map_err(op(), DockerError::IOError { err: io }),
            Error::Unavailable(m) if m.starts_with("failed to start container c")
        ));
    }

    #[test]
    fn names_replicas_after_compose_or_swarm() {
        let labels = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let compose = labels(&[
            ("com.docker.compose.project", "hearth"),
            ("com.docker.compose.service", "executor"),
            ("com.docker.compose.container-number", "2"),
        ]);
        assert_eq!(
            replica_name_of(&compose).as_deref(),
            Some("hearth-executor-2")
        );
        let swarm = labels(&[
            ("com.docker.swarm.service.name", "hearth_executor"),
            ("com.docker.swarm.task.name", "hearth_executor.3.x1y2z3"),
        ]);
        assert_eq!(
            replica_name_of(&swarm).as_deref(),
            Some("hearth-executor-3")
        );
        assert_eq!(replica_name_of(&labels(&[("a", "b")])), None);
        let odd = labels(&[
            ("com.docker.swarm.service.name", "hearth_executor"),
            ("com.docker.swarm.task.name", "other.1.x"),
        ]);
        assert_eq!(replica_name_of(&odd), None);
    }

    #[test]
    fn packs_one_file() {
        let archive = tar_of_file("a.txt", b"hello").unwrap();
        let mut tar = TarFile::new();
        let mut out = Vec::new();
        tar.push(Bytes::from(archive), &mut out).unwrap();
        assert_eq!(out.concat(), b"hello");
    }
}
