//! The Docker Swarm implementation of [`crate::Adapter`]: every runtime is a Swarm service.
//!
//! A runtime is a replicated service with one replica, named after the runtime, carrying the
//! runtime's labels (on the service and on its task's container, so both `docker service ls`
//! and `docker ps` find it by label), its cpu, memory and pids limits, reservations of a share
//! of those limits ([`SwarmOptions::reservation`]), and its restart policy (`no` → condition
//! `none`, `always`/`unless-stopped` → `any`, `on-failure` → `on-failure`). It joins the
//! attachable overlay networks the executor shares with it ([`Adapter::ensure_network`] creates
//! them) and is reached by its service name on the first one, on its port: the service uses DNS
//! round robin (`dnsrr`), so the name resolves straight to the task and no virtual IP sits in
//! between (IPVS, with its idle-connection timeout, and missing from some kernels). The image is pinned to the local image's id, which
//! keeps the node from asking a registry for it: the images are built locally.
//!
//! Creating a service starts it, so [`Adapter::create`] is the start and [`Adapter::start`]
//! waits until the service's task runs (failing at once when Swarm gave up on it, e.g. a
//! container that exited under restart condition `none`). Files cannot be placed into a service
//! before it starts ([`Adapter::places_files_before_start`] is false): the executor hands an
//! execution runtime its code over HTTP with the pool protocol (`runtimes/pool-protocol.md`).
//! A build runtime (`tail -f /dev/null`) takes its source through [`Adapter::put_file`], which
//! waits (up to the call timeout) for the task to run.
//! [`Adapter::stop`] and [`Adapter::remove`] remove the service (a service cannot be stopped
//! and kept); `list`/`inspect` map services into [`RuntimeInfo`], running when a task runs.
//!
//! **Operations Swarm cannot do across nodes.** The Swarm API has no exec into a task and no file
//! copy into or out of one. Those operations ([`Adapter::exec`], [`Adapter::put_file`],
//! [`Adapter::read_file`], used by builds and the commands route) go to the task's container on
//! the local engine through [`DockerAdapter`]. To make that always possible, every runtime is
//! placed on the executor's own node (constraint `node.id==<this engine's node id>`, read from
//! the engine's info at connect), and an executor must run on a manager node (it creates
//! services). Being on the executor's node also makes a host folder shareable: the runtime's
//! log folder ([`RuntimeSpec::logs_dir`]) is a bind mount, as under the Docker adapter, so
//! per-request logs are read from the executor's disk and not copied out of the task. A task found on
//! another node (the constraint was changed behind the executor's back) is refused with a
//! [`Error::Backend`] that says so. Executors scale out as more replicas on more nodes, each
//! holding the runtimes of its own node; storage must then be shared (S3).

use std::collections::HashMap;
use std::time::{Duration, UNIX_EPOCH};

use async_trait::async_trait;
use bollard::models::{
    EndpointSpec, EndpointSpecModeEnum, Limit, LocalNodeState, Mount, MountType,
    NetworkAttachmentConfig, NetworkCreateRequest, ResourceObject, Service, ServiceSpec,
    ServiceSpecMode, ServiceSpecModeReplicated, Task, TaskSpec, TaskSpecContainerSpec,
    TaskSpecPlacement, TaskSpecResources, TaskSpecRestartPolicy,
    TaskSpecRestartPolicyConditionEnum, TaskState,
};
use bollard::query_parameters::{ListServicesOptionsBuilder, ListTasksOptionsBuilder};
use bollard::Docker;
use bytes::Bytes;
use futures_util::stream::BoxStream;
use tokio::sync::Mutex;

use crate::docker::{
    absolute_logs_dir, call, parse_rfc3339, port_label, Addressing, DockerAdapter, DockerOptions,
    LOGS_MOUNT, PORT_LABEL,
};
use crate::{
    Adapter, Endpoint, Error, ExecExit, OutputSink, RestartPolicy, Result, RuntimeInfo, RuntimeSpec,
};

/// The label holding the image a runtime was asked for (the service runs it by id).
pub const IMAGE_LABEL: &str = "hearth.image";
/// How long a removed runtime's container gets between SIGTERM and SIGKILL.
const REMOVE_GRACE: Duration = Duration::from_secs(1);
/// Swarm's pause before it replaces a task that exited (its own default is 5 s).
const RESTART_DELAY: Duration = Duration::from_secs(1);
/// Polling of a task's state starts here and doubles up to [`POLL_MAX`].
const POLL_MIN: Duration = Duration::from_millis(10);
const POLL_MAX: Duration = Duration::from_millis(250);

#[derive(Debug, Clone)]
pub struct SwarmOptions {
    /// The limit of every engine call (create, inspect, list, ...).
    pub call_timeout: Duration,
    /// How long [`Adapter::start`] waits for the service's task to run.
    pub start_timeout: Duration,
    /// Share (0 to 1) of a runtime's cpu and memory limits reserved on its node. Full
    /// reservations would let a node hold only as many runtimes as it has cores, while most
    /// runtimes sit idle; none would let Swarm place work on a node that is already full.
    pub reservation: f64,
}

impl Default for SwarmOptions {
    fn default() -> Self {
        Self {
            call_timeout: Duration::from_secs(30),
            start_timeout: Duration::from_secs(60),
            reservation: 0.1,
        }
    }
}

/// Runtimes as services of the Docker Swarm the local engine manages.
pub struct SwarmAdapter {
    /// The local engine: Swarm calls, and the task containers of this node.
    docker: DockerAdapter,
    /// This engine's Swarm node, where every runtime is placed.
    node_id: String,
    options: SwarmOptions,
    /// Serialises `ensure_network` (see [`DockerAdapter`]'s).
    network_lock: Mutex<()>,
}

/// The running task of a runtime's service, as found on the local engine.
struct RunningTask {
    container: String,
}

impl SwarmAdapter {
    /// Connects to the local engine (`DOCKER_HOST`, else the default socket), which must be an
    /// active Swarm manager.
    pub async fn connect(options: SwarmOptions) -> Result<Self> {
        let docker = DockerAdapter::connect(DockerOptions {
            addressing: Addressing::Network,
            call_timeout: options.call_timeout,
        })
        .await?;
        Self::with_docker(docker, options).await
    }

    /// Uses a connected [`DockerAdapter`] for the engine (its client makes the Swarm calls).
    pub async fn with_docker(docker: DockerAdapter, options: SwarmOptions) -> Result<Self> {
        let info = call(
            options.call_timeout,
            || "failed to read the Docker engine's info".to_string(),
            docker.client().info(),
        )
        .await?;
        let swarm = info.swarm.unwrap_or_default();
        let state = swarm.local_node_state.unwrap_or(LocalNodeState::INACTIVE);
        if state != LocalNodeState::ACTIVE || swarm.control_available != Some(true) {
            return Err(Error::Unavailable(format!(
                "failed to use Docker Swarm: this engine is not an active Swarm manager (node \
                 state {state}); run the executor on a manager node (`docker swarm init` makes \
                 this engine a single-node swarm)"
            )));
        }
        let node_id = swarm
            .node_id
            .filter(|id| !id.is_empty())
            .ok_or_else(|| Error::Backend("failed to use Docker Swarm: no node id".into()))?;
        Ok(Self {
            docker,
            node_id,
            options,
            network_lock: Mutex::new(()),
        })
    }

    /// The Swarm node runtimes are placed on (this engine's).
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The local engine's adapter (task containers of this node).
    pub fn docker(&self) -> &DockerAdapter {
        &self.docker
    }

    fn client(&self) -> &Docker {
        self.docker.client()
    }

    async fn call<T>(
        &self,
        op: impl FnOnce() -> String,
        fut: impl std::future::Future<Output = Result<T, bollard::errors::Error>>,
    ) -> Result<T> {
        call(self.options.call_timeout, op, fut).await
    }

    async fn inspect_service(&self, id: &str) -> Result<Service> {
        self.call(
            || format!("failed to inspect service {id}"),
            self.client().inspect_service(id, None),
        )
        .await
    }

    /// Every task of a service (`NotFound` when the service is absent).
    async fn tasks(&self, id: &str) -> Result<Vec<Task>> {
        let filters = HashMap::from([("service", vec![id])]);
        let options = ListTasksOptionsBuilder::default().filters(&filters).build();
        self.call(
            || format!("failed to list the tasks of service {id}"),
            self.client().list_tasks(Some(options)),
        )
        .await
    }

    /// Waits up to `limit` for the service's task to run; `op` names the caller's operation.
    /// Fails at once when Swarm will not run the service again, and when the task runs on
    /// another node.
    async fn running_task(&self, id: &str, limit: Duration, op: &str) -> Result<RunningTask> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut pause = POLL_MIN;
        loop {
            let tasks = self.tasks(id).await?;
            match task_progress(&tasks) {
                Progress::Running(task) => {
                    let node = task.node_id.as_deref().unwrap_or_default();
                    if node != self.node_id {
                        return Err(Error::Backend(format!(
                            "{op}: its task runs on node {node}, not on this executor's node {}; \
                             Swarm cannot exec into a task or copy files on another node, so \
                             runtimes must stay on their executor's node",
                            self.node_id
                        )));
                    }
                    let container = task
                        .status
                        .as_ref()
                        .and_then(|s| s.container_status.as_ref())
                        .and_then(|c| c.container_id.clone())
                        .filter(|c| !c.is_empty());
                    if let Some(container) = container {
                        return Ok(RunningTask { container });
                    }
                }
                Progress::Ended(why) => {
                    return Err(Error::Backend(format!(
                        "{op}: Swarm will not run it again ({why})"
                    )))
                }
                Progress::Waiting(_) => {}
            }
            if tokio::time::Instant::now() >= deadline {
                let why = match task_progress(&tasks) {
                    Progress::Waiting(why) if !why.is_empty() => format!(" ({why})"),
                    _ => String::new(),
                };
                return Err(Error::Timeout(format!(
                    "{op}: its task was not running after {limit:?}{why}"
                )));
            }
            tokio::time::sleep(pause.min(deadline - tokio::time::Instant::now())).await;
            pause = (pause * 2).min(POLL_MAX);
        }
    }

    /// The local container of a runtime's running task, for engine operations (a runtime may
    /// have just been created: its task gets the call timeout to come up).
    async fn local_container(&self, id: &str, op: &str) -> Result<String> {
        let task = self.running_task(id, self.options.call_timeout, op).await?;
        Ok(task.container)
    }

    /// Pins an image name to the local image's id (`sha256:…`): Swarm then runs what this
    /// node holds instead of asking a registry first.
    async fn local_image_id(&self, spec: &RuntimeSpec) -> Result<String> {
        let image = &spec.image;
        let found = self
            .call(
                || {
                    format!(
                        "failed to create service {}: image {image} is not on this node",
                        spec.name
                    )
                },
                self.client().inspect_image(image),
            )
            .await?;
        found.id.filter(|id| !id.is_empty()).ok_or_else(|| {
            Error::Backend(format!(
                "failed to create service {}: image {image} has no id",
                spec.name
            ))
        })
    }

    fn info_of_service(&self, service: Service, running: bool) -> RuntimeInfo {
        let spec = service.spec.unwrap_or_default();
        let labels = spec.labels.unwrap_or_default();
        let name = spec.name.unwrap_or_default();
        let image = labels.get(IMAGE_LABEL).cloned().unwrap_or_else(|| {
            spec.task_template
                .and_then(|t| t.container_spec)
                .and_then(|c| c.image)
                .unwrap_or_default()
        });
        let endpoint = match (running, port_label(&labels)) {
            (true, Some(port)) => Some(Endpoint {
                host: name.clone(),
                port,
            }),
            _ => None,
        };
        RuntimeInfo {
            id: service.id.unwrap_or_default(),
            name,
            image,
            labels,
            running,
            created: service
                .created_at
                .as_deref()
                .and_then(parse_rfc3339)
                .unwrap_or(UNIX_EPOCH),
            endpoint,
        }
    }
}

#[async_trait]
impl Adapter for SwarmAdapter {
    async fn create(&self, spec: &RuntimeSpec) -> Result<String> {
        absolute_logs_dir(spec, "service")?;
        let image = self.local_image_id(spec).await?;
        let service = service_spec(spec, &image, &self.node_id, self.options.reservation);
        let created = self
            .call(
                || {
                    format!(
                        "failed to create service {} of image {}",
                        spec.name, spec.image
                    )
                },
                self.client().create_service(service, None),
            )
            .await?;
        created.id.filter(|id| !id.is_empty()).ok_or_else(|| {
            Error::Backend(format!(
                "failed to create service {}: the engine returned no id",
                spec.name
            ))
        })
    }

    async fn put_file(&self, id: &str, path: &str, content: Bytes) -> Result<()> {
        let op = format!("failed to put {path} into service {id}");
        let container = self.local_container(id, &op).await?;
        self.docker.put_file(&container, path, content).await
    }

    async fn start(&self, id: &str) -> Result<Endpoint> {
        let service = self.inspect_service(id).await?;
        let op = format!("failed to start service {id}");
        self.running_task(id, self.options.start_timeout, &op)
            .await?;
        let info = self.info_of_service(service, true);
        info.endpoint
            .ok_or_else(|| Error::Backend(format!("{op}: its port label is missing")))
    }

    async fn stop(&self, id: &str, grace: Duration) -> Result<()> {
        // A service cannot be stopped and kept: its container gets `grace` to stop, then the
        // service goes (else Swarm would replace the task).
        let op = format!("failed to stop service {id}");
        match self.running_task(id, Duration::ZERO, &op).await {
            Ok(task) => match self.docker.stop(&task.container, grace).await {
                Ok(()) | Err(Error::NotFound(_)) => {}
                Err(err) => return Err(err),
            },
            Err(Error::NotFound(_)) => return Err(Error::NotFound(op)),
            Err(_) => {}
        }
        self.remove(id).await
    }

    async fn remove(&self, id: &str) -> Result<()> {
        self.call(
            || format!("failed to remove service {id}"),
            self.client().delete_service(id),
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
        let op = format!("failed to exec {program} in service {id}");
        let container = self.local_container(id, &op).await?;
        self.docker.exec(&container, cmd, timeout, sink).await
    }

    async fn read_file(&self, id: &str, path: &str) -> Result<BoxStream<'static, Result<Bytes>>> {
        let op = format!("failed to read {path} from service {id}");
        let container = self.local_container(id, &op).await?;
        self.docker.read_file(&container, path).await
    }

    async fn list(&self, labels: &[(String, String)]) -> Result<Vec<RuntimeInfo>> {
        let mut options = ListServicesOptionsBuilder::default().status(true);
        if !labels.is_empty() {
            let filters: HashMap<String, Vec<String>> = HashMap::from([(
                "label".to_string(),
                labels.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            )]);
            options = options.filters(&filters);
        }
        let services = self
            .call(
                || "failed to list services".to_string(),
                self.client().list_services(Some(options.build())),
            )
            .await?;
        Ok(services
            .into_iter()
            .map(|service| {
                let running = service
                    .service_status
                    .as_ref()
                    .and_then(|s| s.running_tasks)
                    .unwrap_or(0)
                    > 0;
                self.info_of_service(service, running)
            })
            .collect())
    }

    async fn inspect(&self, id: &str) -> Result<RuntimeInfo> {
        let service = self.inspect_service(id).await?;
        let running = matches!(task_progress(&self.tasks(id).await?), Progress::Running(_));
        Ok(self.info_of_service(service, running))
    }

    async fn ensure_network(&self, name: &str) -> Result<()> {
        let _guard = self.network_lock.lock().await;
        let found = self
            .call(
                || format!("failed to inspect network {name}"),
                self.client().inspect_network(name, None),
            )
            .await;
        match found {
            Ok(network) if network.scope.as_deref() == Some("swarm") => return Ok(()),
            Ok(network) => {
                return Err(Error::Backend(format!(
                    "network {name} is a {} network of this engine only, but Swarm services \
                     need an overlay network: remove it (`make down` removes the compose \
                     stack's) or name another one in OPR_EXECUTOR_NETWORK",
                    network.driver.as_deref().unwrap_or("local")
                )))
            }
            Err(Error::NotFound(_)) => {}
            Err(err) => return Err(err),
        }
        let request = NetworkCreateRequest {
            name: name.to_string(),
            driver: Some("overlay".to_string()),
            attachable: Some(true),
            ..NetworkCreateRequest::default()
        };
        let created = self
            .call(
                || format!("failed to create network {name}"),
                self.client().create_network(request),
            )
            .await;
        match created {
            Ok(_) | Err(Error::Conflict(_)) => Ok(()),
            Err(err) => Err(err),
        }
    }

    fn shares_host_folders(&self) -> bool {
        // Every runtime runs on this executor's node (see the module's documentation).
        true
    }

    fn places_files_before_start(&self) -> bool {
        false
    }
}

/// Where a service's tasks stand.
#[derive(Debug)]
enum Progress<'a> {
    /// A task runs (and is meant to).
    Running(&'a Task),
    /// Swarm will bring a task up (or there is no task yet): the newest task's status message.
    Waiting(String),
    /// No task is meant to run any more (restart condition `none`, or attempts used up): why
    /// the newest one ended.
    Ended(String),
}

fn task_progress(tasks: &[Task]) -> Progress<'_> {
    let meant_to_run = |t: &&Task| t.desired_state == Some(TaskState::RUNNING);
    let state = |t: &Task| t.status.as_ref().and_then(|s| s.state);
    if let Some(task) = tasks
        .iter()
        .filter(meant_to_run)
        .find(|t| state(t) == Some(TaskState::RUNNING))
    {
        return Progress::Running(task);
    }
    let newest = tasks.iter().max_by_key(|t| {
        t.created_at
            .as_deref()
            .and_then(parse_rfc3339)
            .unwrap_or(UNIX_EPOCH)
    });
    let Some(newest) = newest else {
        return Progress::Waiting(String::new());
    };
    let status = newest.status.clone().unwrap_or_default();
    let mut why = status.state.map(|s| s.to_string()).unwrap_or_default();
    for detail in [status.err, status.message].into_iter().flatten() {
        if !detail.is_empty() {
            why = format!("{why}: {detail}");
            break;
        }
    }
    if tasks.iter().any(|t| meant_to_run(&t)) {
        Progress::Waiting(why)
    } else {
        Progress::Ended(format!("its last task is {why}"))
    }
}

/// The service for one runtime, running `image` (the local image's id) on `node_id`.
fn service_spec(spec: &RuntimeSpec, image: &str, node_id: &str, reservation: f64) -> ServiceSpec {
    let mut labels = spec.labels.clone();
    labels.insert(PORT_LABEL.to_string(), spec.port.to_string());
    labels.insert(IMAGE_LABEL.to_string(), spec.image.clone());
    let reservation = reservation.clamp(0.0, 1.0);
    let mut limits = Limit::default();
    let mut reservations = ResourceObject::default();
    if spec.cpus > 0.0 {
        let nanos = (spec.cpus * 1e9).round() as i64;
        limits.nano_cpus = Some(nanos);
        reservations.nano_cpus = Some((nanos as f64 * reservation).round() as i64);
    }
    if spec.memory_mb > 0 {
        let bytes = i64::try_from(spec.memory_mb.saturating_mul(1024 * 1024)).unwrap_or(i64::MAX);
        limits.memory_bytes = Some(bytes);
        reservations.memory_bytes = Some((bytes as f64 * reservation).round() as i64);
    }
    if spec.pids_limit > 0 {
        limits.pids = Some(spec.pids_limit);
    }
    let condition = match spec.restart_policy {
        RestartPolicy::No => TaskSpecRestartPolicyConditionEnum::NONE,
        RestartPolicy::Always | RestartPolicy::UnlessStopped => {
            TaskSpecRestartPolicyConditionEnum::ANY
        }
        RestartPolicy::OnFailure => TaskSpecRestartPolicyConditionEnum::ON_FAILURE,
    };
    let nanos = |d: Duration| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX);
    ServiceSpec {
        name: Some(spec.name.clone()),
        labels: Some(labels.clone()),
        task_template: Some(TaskSpec {
            container_spec: Some(TaskSpecContainerSpec {
                image: Some(image.to_string()),
                labels: Some(labels),
                // Swarm's `Command` replaces the image's entrypoint, `Args` its command: the
                // latter is what Docker's `Cmd` (and the spec's `cmd`) means.
                args: spec.cmd.clone(),
                env: Some(spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
                dir: spec.working_dir.clone(),
                mounts: spec.logs_dir.as_ref().map(|dir| {
                    vec![Mount {
                        target: Some(LOGS_MOUNT.to_string()),
                        source: Some(dir.display().to_string()),
                        typ: Some(MountType::BIND),
                        read_only: Some(false),
                        ..Mount::default()
                    }]
                }),
                stop_grace_period: Some(nanos(REMOVE_GRACE)),
                ..TaskSpecContainerSpec::default()
            }),
            resources: Some(TaskSpecResources {
                limits: Some(limits),
                reservations: Some(reservations),
                ..TaskSpecResources::default()
            }),
            restart_policy: Some(TaskSpecRestartPolicy {
                condition: Some(condition),
                delay: Some(nanos(RESTART_DELAY)),
                ..TaskSpecRestartPolicy::default()
            }),
            placement: Some(TaskSpecPlacement {
                constraints: Some(vec![format!("node.id=={node_id}")]),
                ..TaskSpecPlacement::default()
            }),
            networks: Some(
                spec.networks
                    .iter()
                    .map(|network| NetworkAttachmentConfig {
                        target: Some(network.clone()),
                        ..NetworkAttachmentConfig::default()
                    })
                    .collect(),
            ),
            ..TaskSpec::default()
        }),
        mode: Some(ServiceSpecMode {
            replicated: Some(ServiceSpecModeReplicated { replicas: Some(1) }),
            ..ServiceSpecMode::default()
        }),
        endpoint_spec: Some(EndpointSpec {
            mode: Some(EndpointSpecModeEnum::DNSRR),
            ports: None,
        }),
        ..ServiceSpec::default()
    }
}

#[cfg(test)]
mod tests {
    use bollard::models::TaskStatus;

    use super::*;

    fn runtime() -> RuntimeSpec {
        RuntimeSpec {
            name: "hearth-executor-1-fn".into(),
            image: "hearth/python:v5-3.11".into(),
            cmd: Some(vec!["tail".into(), "-f".into(), "/dev/null".into()]),
            env: vec![("OPEN_RUNTIMES_SECRET".into(), "s".into())],
            labels: HashMap::from([("hearth.executor".into(), "hearth-executor-1".into())]),
            working_dir: None,
            cpus: 0.5,
            memory_mb: 512,
            pids_limit: 1024,
            networks: vec!["hearth-runtimes".into(), "other".into()],
            restart_policy: RestartPolicy::No,
            port: 3000,
            logs_dir: Some("/tmp/logs".into()),
        }
    }

    #[test]
    fn maps_a_runtime_to_one_pinned_replica() {
        let spec = service_spec(&runtime(), "sha256:abc", "node1", 0.1);
        assert_eq!(spec.name.as_deref(), Some("hearth-executor-1-fn"));
        assert_eq!(
            spec.mode.unwrap().replicated.unwrap().replicas,
            Some(1),
            "one replica"
        );
        assert_eq!(
            spec.endpoint_spec.unwrap().mode,
            Some(EndpointSpecModeEnum::DNSRR)
        );
        let labels = spec.labels.unwrap();
        assert_eq!(labels["hearth.executor"], "hearth-executor-1");
        assert_eq!(labels[PORT_LABEL], "3000");
        assert_eq!(labels[IMAGE_LABEL], "hearth/python:v5-3.11");
        let task = spec.task_template.unwrap();
        let container = task.container_spec.unwrap();
        assert_eq!(container.image.as_deref(), Some("sha256:abc"));
        assert_eq!(
            container.labels.as_ref(),
            Some(&labels),
            "labels on the task too"
        );
        assert_eq!(container.command, None, "the image's entrypoint stays");
        assert_eq!(
            container.args,
            Some(vec!["tail".into(), "-f".into(), "/dev/null".into()])
        );
        assert_eq!(container.env, Some(vec!["OPEN_RUNTIMES_SECRET=s".into()]));
        let mounts = container.mounts.unwrap();
        assert_eq!(mounts.len(), 1, "the logs folder only");
        assert_eq!(mounts[0].source.as_deref(), Some("/tmp/logs"));
        assert_eq!(mounts[0].target.as_deref(), Some("/mnt/logs"));
        assert_eq!(mounts[0].typ, Some(MountType::BIND));
        assert_eq!(
            task.placement.unwrap().constraints,
            Some(vec!["node.id==node1".into()])
        );
        let networks: Vec<_> = task
            .networks
            .unwrap()
            .into_iter()
            .map(|n| n.target.unwrap())
            .collect();
        assert_eq!(networks, ["hearth-runtimes", "other"]);
        let resources = task.resources.unwrap();
        let limits = resources.limits.unwrap();
        assert_eq!(limits.nano_cpus, Some(500_000_000));
        assert_eq!(limits.memory_bytes, Some(512 * 1024 * 1024));
        assert_eq!(limits.pids, Some(1024));
        let reservations = resources.reservations.unwrap();
        assert_eq!(reservations.nano_cpus, Some(50_000_000));
        assert_eq!(
            reservations.memory_bytes,
            Some((512.0 * 1024.0 * 1024.0 * 0.1_f64).round() as i64)
        );
        assert_eq!(
            task.restart_policy.unwrap().condition,
            Some(TaskSpecRestartPolicyConditionEnum::NONE)
        );
    }

    #[test]
    fn maps_restart_policies_and_unlimited_resources() {
        let condition = |policy| {
            let spec = RuntimeSpec {
                restart_policy: policy,
                ..runtime()
            };
            service_spec(&spec, "i", "n", 0.1)
                .task_template
                .unwrap()
                .restart_policy
                .unwrap()
                .condition
                .unwrap()
        };
        use TaskSpecRestartPolicyConditionEnum as C;
        assert_eq!(condition(RestartPolicy::No), C::NONE);
        assert_eq!(condition(RestartPolicy::Always), C::ANY);
        assert_eq!(condition(RestartPolicy::UnlessStopped), C::ANY);
        assert_eq!(condition(RestartPolicy::OnFailure), C::ON_FAILURE);

        let unlimited = RuntimeSpec {
            cpus: 0.0,
            memory_mb: 0,
            pids_limit: 0,
            cmd: None,
            ..runtime()
        };
        let task = service_spec(&unlimited, "i", "n", 0.1)
            .task_template
            .unwrap();
        assert_eq!(
            task.container_spec.unwrap().args,
            None,
            "the image's command"
        );
        let resources = task.resources.unwrap();
        assert_eq!(resources.limits, Some(Limit::default()));
        assert_eq!(resources.reservations, Some(ResourceObject::default()));
    }

    #[test]
    fn the_spec_serialises_as_the_engine_expects() {
        let json = serde_json::to_value(service_spec(&runtime(), "sha256:abc", "n1", 0.1)).unwrap();
        assert_eq!(json["TaskTemplate"]["ContainerSpec"]["Image"], "sha256:abc");
        assert_eq!(json["TaskTemplate"]["RestartPolicy"]["Condition"], "none");
        assert_eq!(json["TaskTemplate"]["Resources"]["Limits"]["Pids"], 1024);
        assert_eq!(
            json["TaskTemplate"]["Networks"][0]["Target"],
            "hearth-runtimes"
        );
        assert_eq!(json["EndpointSpec"]["Mode"], "dnsrr");
        assert_eq!(json["Mode"]["Replicated"]["Replicas"], 1);
    }

    fn task(desired: TaskState, state: TaskState, created: &str, err: Option<&str>) -> Task {
        Task {
            desired_state: Some(desired),
            created_at: Some(created.into()),
            node_id: Some("n1".into()),
            status: Some(TaskStatus {
                state: Some(state),
                err: err.map(String::from),
                message: Some("started".into()),
                ..TaskStatus::default()
            }),
            ..Task::default()
        }
    }

    #[test]
    fn reads_task_progress() {
        use TaskState as S;
        assert!(matches!(task_progress(&[]), Progress::Waiting(w) if w.is_empty()));
        let pending = task(S::RUNNING, S::PENDING, "2024-01-01T00:00:02Z", None);
        assert!(
            matches!(task_progress(std::slice::from_ref(&pending)), Progress::Waiting(w) if w == "pending: started")
        );
        let running = task(S::RUNNING, S::RUNNING, "2024-01-01T00:00:01Z", None);
        assert!(matches!(
            task_progress(&[pending.clone(), running]),
            Progress::Running(_)
        ));
        // Restart condition `none`: the failed task is the last.
        let failed = task(
            S::SHUTDOWN,
            S::FAILED,
            "2024-01-01T00:00:03Z",
            Some("task: non-zero exit (1)"),
        );
        assert!(matches!(
            task_progress(std::slice::from_ref(&failed)),
            Progress::Ended(w) if w == "its last task is failed: task: non-zero exit (1)"
        ));
        // Restart condition `any`: a replacement is coming.
        assert!(matches!(
            task_progress(&[failed, pending]),
            Progress::Waiting(w) if w.starts_with("failed")
        ));
        // A task that still runs but is being shut down does not count.
        let leaving = task(S::SHUTDOWN, S::RUNNING, "2024-01-01T00:00:01Z", None);
        assert!(matches!(task_progress(&[leaving]), Progress::Ended(_)));
    }
}
