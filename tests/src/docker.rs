//! Containers for tests and benchmarks, straight on the Docker engine through bollard.
//!
//! Every container carries the `hearth.test=1` label and lives in a [`Container`] guard that
//! removes it (with its anonymous volumes) when dropped, also when a test fails half-way.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bollard::models::{ContainerCreateBody, HostConfig, PortBinding};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, DownloadFromContainerOptionsBuilder, LogsOptionsBuilder,
    UploadToContainerOptionsBuilder, WaitContainerOptionsBuilder,
};
use bollard::{body_full, Docker};
use futures_util::{StreamExt, TryStreamExt};

/// The label that marks everything a test or benchmark creates.
pub const TEST_LABEL: &str = "hearth.test";

/// Connects to the local engine, negotiating the API version (the engine here speaks 1.41).
pub async fn connect() -> Result<Docker> {
    let docker = Docker::connect_with_local_defaults().context("failed to connect to Docker")?;
    docker
        .negotiate_version()
        .await
        .context("failed to negotiate the Docker API version")
}

/// What a test container looks like.
#[derive(Debug, Clone, Default)]
pub struct ContainerSpec {
    pub image: String,
    pub cmd: Option<Vec<String>>,
    pub env: Vec<(String, String)>,
    pub working_dir: Option<String>,
    /// Container port to publish on a random port of 127.0.0.1.
    pub publish: Option<u16>,
    pub memory_mb: Option<i64>,
    pub nano_cpus: Option<i64>,
    /// A network (created by the test) to attach the container to.
    pub network: Option<String>,
}

impl ContainerSpec {
    pub fn new(image: &str) -> Self {
        Self {
            image: image.to_string(),
            ..Self::default()
        }
    }

    pub fn cmd(mut self, args: &[&str]) -> Self {
        self.cmd = Some(args.iter().map(|s| s.to_string()).collect());
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    pub fn publish(mut self, port: u16) -> Self {
        self.publish = Some(port);
        self
    }
}

/// A created container, removed with `docker rm -f -v` when dropped.
pub struct Container {
    pub docker: Docker,
    pub id: String,
}

impl Container {
    /// Creates (does not start) a container labelled `hearth.test=1`.
    pub async fn create(docker: &Docker, spec: &ContainerSpec) -> Result<Self> {
        let mut labels = HashMap::new();
        labels.insert(TEST_LABEL.to_string(), "1".to_string());
        let mut host_config = HostConfig {
            memory: spec.memory_mb.map(|mb| mb * 1024 * 1024),
            nano_cpus: spec.nano_cpus,
            network_mode: spec.network.clone(),
            ..HostConfig::default()
        };
        let mut exposed = None;
        if let Some(port) = spec.publish {
            let key = format!("{port}/tcp");
            let mut bindings = HashMap::new();
            bindings.insert(
                key.clone(),
                Some(vec![PortBinding {
                    host_ip: Some("127.0.0.1".to_string()),
                    host_port: Some(String::new()),
                }]),
            );
            host_config.port_bindings = Some(bindings);
            exposed = Some(vec![key]);
        }
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            cmd: spec.cmd.clone(),
            env: Some(spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            working_dir: spec.working_dir.clone(),
            labels: Some(labels),
            exposed_ports: exposed,
            host_config: Some(host_config),
            ..ContainerCreateBody::default()
        };
        let created = docker
            .create_container(Some(CreateContainerOptionsBuilder::default().build()), body)
            .await
            .with_context(|| format!("failed to create a container of {}", spec.image))?;
        Ok(Self {
            docker: docker.clone(),
            id: created.id,
        })
    }

    pub async fn start(&self) -> Result<()> {
        self.docker
            .start_container(&self.id, None)
            .await
            .with_context(|| format!("failed to start container {}", self.id))
    }

    /// Waits for the container to exit and returns its exit code.
    pub async fn wait(&self, limit: Duration) -> Result<i64> {
        let options = WaitContainerOptionsBuilder::default()
            .condition("not-running")
            .build();
        let mut stream = self.docker.wait_container(&self.id, Some(options));
        match tokio::time::timeout(limit, stream.next()).await {
            Err(_) => bail!("container {} still running after {limit:?}", self.id),
            Ok(None) => bail!("wait stream of {} ended without a result", self.id),
            Ok(Some(Ok(status))) => Ok(status.status_code),
            // bollard reports a non-zero exit as an error carrying the code.
            Ok(Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. }))) => {
                Ok(code)
            }
            Ok(Some(Err(err))) => Err(err).context("failed to wait for the container"),
        }
    }

    /// stdout and stderr of the container so far, interleaved.
    pub async fn output(&self) -> Result<String> {
        let options = LogsOptionsBuilder::default()
            .stdout(true)
            .stderr(true)
            .build();
        let chunks: Vec<_> = self
            .docker
            .logs(&self.id, Some(options))
            .try_collect()
            .await
            .context("failed to read container output")?;
        Ok(chunks.iter().map(|c| c.to_string()).collect())
    }

    /// Copies a tar archive into `dest` (a folder that exists in the image).
    pub async fn put_tar(&self, dest: &str, tar: Vec<u8>) -> Result<()> {
        let options = UploadToContainerOptionsBuilder::default()
            .path(dest)
            .build();
        self.docker
            .upload_to_container(&self.id, Some(options), body_full(tar.into()))
            .await
            .with_context(|| format!("failed to upload into {dest} of {}", self.id))
    }

    /// Copies one file (given as bytes) into the container.
    pub async fn put_file(&self, dest_dir: &str, name: &str, content: &[u8]) -> Result<()> {
        self.put_tar(dest_dir, tar_of_file(name, content)?).await
    }

    /// Reads one file out of the container.
    pub async fn read_file(&self, path: &str) -> Result<Vec<u8>> {
        let options = DownloadFromContainerOptionsBuilder::default()
            .path(path)
            .build();
        let chunks: Vec<_> = self
            .docker
            .download_from_container(&self.id, Some(options))
            .try_collect()
            .await
            .with_context(|| format!("failed to download {path} from {}", self.id))?;
        let tar_bytes: Vec<u8> = chunks.concat();
        let mut archive = tar::Archive::new(tar_bytes.as_slice());
        let mut entries = archive.entries()?;
        let Some(entry) = entries.next() else {
            bail!("{path} came back as an empty archive")
        };
        let mut entry = entry?;
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut out)?;
        Ok(out)
    }

    /// Runs a command in the running container: (exit code, stdout, stderr).
    pub async fn exec(&self, cmd: &[&str]) -> Result<(i64, String, String)> {
        use bollard::exec::{CreateExecOptions, StartExecResults};
        let exec = self
            .docker
            .create_exec(
                &self.id,
                CreateExecOptions {
                    cmd: Some(cmd.iter().map(|s| s.to_string()).collect()),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    ..CreateExecOptions::default()
                },
            )
            .await
            .context("failed to create exec")?;
        let mut stdout = String::new();
        let mut stderr = String::new();
        if let StartExecResults::Attached { mut output, .. } =
            self.docker.start_exec(&exec.id, None).await?
        {
            while let Some(chunk) = output.next().await {
                match chunk? {
                    bollard::container::LogOutput::StdErr { message } => {
                        stderr.push_str(&String::from_utf8_lossy(&message))
                    }
                    other => stdout.push_str(&other.to_string()),
                }
            }
        }
        let inspect = self.docker.inspect_exec(&exec.id).await?;
        Ok((inspect.exit_code.unwrap_or(-1), stdout, stderr))
    }

    /// The container's address on `network`.
    pub async fn ip_on(&self, network: &str) -> Result<String> {
        let info = self.docker.inspect_container(&self.id, None).await?;
        info.network_settings
            .and_then(|n| n.networks)
            .and_then(|mut nets| nets.remove(network))
            .and_then(|n| n.ip_address)
            .filter(|ip| !ip.is_empty())
            .with_context(|| format!("{} has no address on {network}", self.id))
    }

    /// The 127.0.0.1 port that `port` is published on.
    pub async fn host_port(&self, port: u16) -> Result<u16> {
        let info = self.docker.inspect_container(&self.id, None).await?;
        let key = format!("{port}/tcp");
        let published = info
            .network_settings
            .and_then(|n| n.ports)
            .and_then(|mut ports| ports.remove(&key))
            .flatten()
            .and_then(|bindings| bindings.into_iter().find_map(|b| b.host_port))
            .with_context(|| format!("port {port} of {} is not published", self.id))?;
        published
            .parse()
            .with_context(|| format!("bad published port {published}"))
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        // Drop cannot await; the CLI is the simplest reliable way to remove synchronously.
        let _ = std::process::Command::new("docker")
            .args(["rm", "-f", "-v", &self.id])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// A tar archive holding one regular file.
pub fn tar_of_file(name: &str, content: &[u8]) -> Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(content.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    builder.append_data(&mut header, name, content)?;
    Ok(builder.into_inner()?)
}

/// A tar archive of a host folder's content (paths relative to the folder).
pub fn tar_of_dir(dir: &std::path::Path) -> Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    builder.follow_symlinks(false);
    builder
        .append_dir_all(".", dir)
        .with_context(|| format!("failed to pack {}", dir.display()))?;
    Ok(builder.into_inner()?)
}

/// A bridge network created for a test or benchmark (label `hearth.test=1`), removed on drop.
pub struct Network {
    pub name: String,
}

impl Network {
    pub async fn create(docker: &Docker, prefix: &str) -> Result<Self> {
        let name = format!("{prefix}-{}", std::process::id());
        let mut labels = HashMap::new();
        labels.insert(TEST_LABEL.to_string(), "1".to_string());
        docker
            .create_network(bollard::models::NetworkCreateRequest {
                name: name.clone(),
                labels: Some(labels),
                ..Default::default()
            })
            .await
            .with_context(|| format!("failed to create network {name}"))?;
        Ok(Self { name })
    }
}

impl Drop for Network {
    /// Removes the network, retrying for up to 10 s: a container removed just before (a runtime
    /// an executor created late, an endpoint the engine is still releasing) can hold it a moment.
    fn drop(&mut self) {
        let docker = |args: &[&str]| {
            std::process::Command::new("docker")
                .args(args)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|status| status.success())
        };
        for _ in 0..20 {
            if docker(&["network", "rm", &self.name])
                || !docker(&["network", "inspect", &self.name])
            {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
    }
}
