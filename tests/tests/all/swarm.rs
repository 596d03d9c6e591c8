//! Docker Swarm (needs Docker; makes this engine a single-node swarm if it is in none): the
//! Swarm adapter against the engine, and the stack end to end: `make swarm-up`, a Python
//! function deployed from a git repository with the `hearth` command and invoked, the executors
//! scaled to three and all used by the balancer, a runtime's task container removed and the
//! function served again, then `make swarm-down` leaving no service, container, network, secret
//! or config behind.
//!
//! The end-to-end test uses the working tree's stack (ports 8080 and 8081, `.env`, `data/`), so
//! it cannot run while `make up`'s stack does.

use std::collections::{BTreeSet, HashMap};
use std::process::Output;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use bytes::Bytes;
use futures_util::StreamExt;
use hearth_adapters::swarm::{SwarmAdapter, SwarmOptions};
use hearth_adapters::{Adapter, Error, RuntimeSpec};
use hearth_tests::builds::{workspace_binary, GitDaemon, GitServer};
use hearth_tests::swarm::{
    docker, ensure_swarm, eventually, exclusive, gateway, leftovers, lines, Cleanup, SwarmStack,
    API, STACK,
};

fn hearth(secret: &str, args: &[&str]) -> Result<Output> {
    Ok(
        std::process::Command::new(workspace_binary("hearth-cli", "hearth")?)
            .args(["--endpoint", API, "--secret", secret])
            .args(args)
            .env_remove("OPR_EXECUTOR_SECRET")
            .output()?,
    )
}

/// Runs the `hearth` command and expects success; returns stdout.
fn hearth_ok(secret: &str, args: &[&str]) -> Result<String> {
    let output = hearth(secret, args)?;
    ensure!(
        output.status.success(),
        "hearth {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The balancer's `/metrics`.
async fn metrics(secret: &str) -> Result<String> {
    let response = reqwest::Client::new()
        .get(format!("{API}/metrics"))
        .bearer_auth(secret)
        .send()
        .await?;
    ensure!(
        response.status().is_success(),
        "/metrics: {}",
        response.status()
    );
    Ok(response.text().await?)
}

/// Executors the balancer sent calls to (the `executor` label of its request counter).
fn executors_called(metrics: &str) -> BTreeSet<String> {
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix("hearth_balancer_requests_total{executor=\""))
        .filter_map(|rest| rest.split('"').next())
        .map(String::from)
        .collect()
}

/// The id (12 characters) of the container serving `runtime`: its hostname, through the
/// commands route.
async fn task_container(client: &reqwest::Client, secret: &str, runtime: &str) -> Result<String> {
    let response = client
        .post(format!("{API}/v1/runtimes/{runtime}/commands"))
        .bearer_auth(secret)
        .json(&serde_json::json!({ "command": "cat /etc/hostname", "timeout": 30 }))
        .send()
        .await?;
    let status = response.status();
    let reply: serde_json::Value = response.json().await?;
    ensure!(status.is_success(), "commands: {status} {reply}");
    let id = reply["output"]
        .as_str()
        .unwrap_or_default()
        .trim()
        .to_string();
    ensure!(
        id.len() == 12 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "not a container id: {reply}"
    );
    Ok(id)
}

/// The Swarm adapter on its own: a build-style runtime (`tail -f /dev/null`) as a service, files
/// in and out and an exec through its task's container, limits, labels, list and inspect,
/// removal; a runtime that exits at once fails `start` with Swarm's reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swarm_adapter_runs_runtimes_as_services() -> Result<()> {
    let _swarm = exclusive().await;
    ensure_swarm()?;
    let adapter = SwarmAdapter::connect(SwarmOptions::default()).await?;
    let unique = format!("{}-{}", std::process::id(), rand_suffix());
    let network = format!("hearth-test-net-{unique}");
    let name = format!("hearth-test-{unique}");
    let mut cleanup = Cleanup::default();
    cleanup.networks.push(network.clone());
    adapter.ensure_network(&network).await?;
    adapter.ensure_network(&network).await?;
    ensure!(
        docker(&[
            "network",
            "inspect",
            &network,
            "--format",
            "{{.Driver}} {{.Attachable}}"
        ])? == "overlay true",
        "not an attachable overlay network"
    );

    // The log folder: a host folder bound into the task (it runs on this node).
    let logs_dir = std::env::temp_dir().join(format!("hearth-test-logs-{unique}"));
    std::fs::create_dir_all(&logs_dir)?;
    let spec = RuntimeSpec {
        name: name.clone(),
        image: "hearth/base:bookworm".into(),
        logs_dir: Some(logs_dir.clone()),
        cmd: Some(vec!["tail".into(), "-f".into(), "/dev/null".into()]),
        env: vec![("GREETING".into(), "hi".into())],
        labels: HashMap::from([
            ("hearth.test".into(), "1".into()),
            ("hearth.runtime-id".into(), unique.clone()),
        ]),
        cpus: 0.5,
        memory_mb: 256,
        pids_limit: 128,
        networks: vec![network.clone()],
        port: 3000,
        ..RuntimeSpec::default()
    };
    let id = adapter.create(&spec).await?;
    cleanup.services.push(id.clone());
    ensure!(
        matches!(adapter.create(&spec).await, Err(Error::Conflict(_))),
        "a taken name is a conflict"
    );
    // A file can go in as soon as the task runs, before `start` was called.
    adapter
        .put_file(&id, "/tmp/hello.txt", Bytes::from_static(b"hello swarm"))
        .await?;
    let endpoint = adapter.start(&id).await?;
    ensure!(endpoint.host == name && endpoint.port == 3000, "{endpoint}");

    let output = std::sync::Mutex::new(Vec::new());
    let sink = |chunk: &[u8]| output.lock().unwrap().extend_from_slice(chunk);
    let cmd: Vec<String> = [
        "bash",
        "-c",
        "cat /tmp/hello.txt; echo \" $GREETING\"; echo logged > /mnt/logs/x_logs.log; exit 3",
    ]
    .map(String::from)
    .to_vec();
    let exit = adapter
        .exec(&id, &cmd, Duration::from_secs(30), &sink)
        .await?;
    let text = String::from_utf8(output.into_inner().unwrap())?;
    ensure!(
        exit.exit_code == 3 && text == "hello swarm hi\n",
        "{exit:?} {text:?}"
    );
    let logged = std::fs::read_to_string(logs_dir.join("x_logs.log"));
    ensure!(
        logged.as_deref().ok() == Some("logged\n"),
        "the task's /mnt/logs is the host's log folder: {logged:?}"
    );
    let mut stream = adapter.read_file(&id, "/tmp/hello.txt").await?;
    let mut read = Vec::new();
    while let Some(chunk) = stream.next().await {
        read.extend_from_slice(&chunk?);
    }
    ensure!(read == b"hello swarm", "{read:?}");
    ensure!(
        matches!(
            adapter.read_file(&id, "/tmp/missing").await,
            Err(Error::NotFound(_))
        ),
        "a missing file is not found"
    );

    let listed = adapter
        .list(&[("hearth.runtime-id".into(), unique.clone())])
        .await?;
    ensure!(listed.len() == 1, "{listed:?}");
    let info = &listed[0];
    ensure!(
        info.id == id
            && info.name == name
            && info.image == "hearth/base:bookworm"
            && info.running
            && info.endpoint.as_ref() == Some(&endpoint)
            && info.labels.get("hearth.test").map(String::as_str) == Some("1"),
        "{info:?}"
    );
    let by_name = adapter.inspect(&name).await?;
    ensure!(by_name.id == id && by_name.running, "{by_name:?}");

    // The task's container: the labels, the limits, on the runtimes' network.
    let container = docker(&[
        "ps",
        "-q",
        "--filter",
        &format!("label=hearth.runtime-id={unique}"),
    ])?;
    let facts = docker(&[
        "inspect",
        &container,
        "--format",
        "{{.HostConfig.NanoCpus}} {{.HostConfig.Memory}} {{.HostConfig.PidsLimit}} {{index .Config.Labels \"hearth.test\"}}",
    ])?;
    ensure!(
        facts == format!("500000000 {} 128 1", 256 * 1024 * 1024),
        "{facts}"
    );

    adapter.remove(&id).await?;
    // Only now: the engine's archive calls fail on a task whose bind source is gone.
    let _ = std::fs::remove_dir_all(&logs_dir);
    ensure!(
        matches!(adapter.remove(&id).await, Err(Error::NotFound(_))),
        "removed twice"
    );
    ensure!(
        matches!(adapter.inspect(&id).await, Err(Error::NotFound(_))),
        "inspect after remove"
    );

    // Restart condition `none`: a runtime whose command cannot start, and one that exits, are
    // not waited for: `start` says what Swarm says.
    let unstartable = RuntimeSpec {
        name: format!("{name}-bad"),
        cmd: Some(vec!["/no/such/program".into()]),
        logs_dir: None,
        ..spec.clone()
    };
    let bad = adapter.create(&unstartable).await?;
    cleanup.services.push(bad.clone());
    match adapter.start(&bad).await {
        Err(Error::Backend(message)) => ensure!(
            message.contains("will not run it again") && message.contains("/no/such/program"),
            "{message}"
        ),
        other => anyhow::bail!("start of a runtime that cannot start: {other:?}"),
    }
    let exiting = RuntimeSpec {
        name: format!("{name}-exits"),
        cmd: Some(vec!["bash".into(), "-c".into(), "exit 7".into()]),
        logs_dir: None,
        ..spec.clone()
    };
    let exits = adapter.create(&exiting).await?;
    cleanup.services.push(exits.clone());
    // It may be seen running for a moment; then it is not, and stays so.
    let _ = adapter.start(&exits).await;
    let mut running = true;
    for _ in 0..100 {
        running = adapter.inspect(&exits).await?.running;
        if !running {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(!running, "a runtime that exited still counts as running");
    match adapter.start(&exits).await {
        Err(Error::Backend(message)) => ensure!(message.contains("exit (7)"), "{message}"),
        other => anyhow::bail!("start of a runtime that exited: {other:?}"),
    }
    println!("swarm: the adapter ran, exec'd, copied, listed and removed a runtime service");
    Ok(())
}

fn rand_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("{nanos:x}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swarm_stack_deploy_invoke_scale_recover_down() -> Result<()> {
    let _swarm = exclusive().await;
    let mut stack = SwarmStack::up()?;
    let secret = stack.secret.clone();

    // A Python function in a git repository the stack's build workers can reach.
    let git = GitServer::start().await?;
    let py =
        "async def main(context):\n    return context.res.text('hello ' + context.req.body_text)\n";
    git.repository("greeter", &[(&[("main.py", py)], None)])?;
    let daemon = GitDaemon::serve(&git.root, &gateway()?).await?;
    let url = daemon.git_url("greeter");
    let out = hearth_ok(
        &secret,
        &[
            "deploy",
            &url,
            "--runtime",
            "hearth/python:v5-3.11",
            "--entrypoint",
            "main.py",
        ],
    )?;
    ensure!(out.contains("hearth invoke greeter"), "{out}");
    println!("swarm: deployed greeter from {url} (a build runtime as a Swarm service)");

    let body = hearth_ok(&secret, &["invoke", "greeter", "--data", "Ada"])?;
    ensure!(body == "hello Ada", "{body:?}");
    println!("swarm: invoked greeter");

    // Three executors, all used: distinct runtime ids go to their homes across executors.
    docker(&["service", "scale", "-d", &format!("{STACK}_executor=3")])?;
    eventually("three executors running", Duration::from_secs(120), || {
        let replicas = docker(&[
            "service",
            "ls",
            "--filter",
            &format!("name={STACK}_executor"),
            "--format",
            "{{.Replicas}}",
        ])?;
        Ok((replicas == "3/3").then_some(()))
    })
    .await?;
    let healthy = "hearth_balancer_executors{state=\"healthy\"} 3";
    for _ in 0..120 {
        if metrics(&secret).await?.contains(healthy) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let text = metrics(&secret).await?;
    ensure!(
        text.contains(healthy),
        "the balancer does not see three executors:\n{text}"
    );
    let client = reqwest::Client::new();
    for i in 0..40 {
        let status = client
            .get(format!("{API}/v1/runtimes/swarm-spread-{i}"))
            .bearer_auth(&secret)
            .send()
            .await?
            .status();
        ensure!(status == 404, "GET of an unknown runtime: {status}");
    }
    // Each executor task's address on the stack's network got calls.
    let executors = lines(&docker(&[
        "ps",
        "-q",
        "--filter",
        &format!("label=com.docker.swarm.service.name={STACK}_executor"),
    ])?);
    ensure!(executors.len() == 3, "executor containers: {executors:?}");
    let mut inspect = vec![
        "inspect",
        "--format",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}",
    ];
    inspect.extend(executors.iter().map(String::as_str));
    let addresses = lines(&docker(&inspect)?);
    let called = executors_called(&metrics(&secret).await?);
    for address in &addresses {
        ensure!(
            address
                .split_whitespace()
                .any(|ip| called.iter().any(|url| url.contains(&format!("//{ip}:")))),
            "the executor at {address} got no call; the balancer called {called:?}"
        );
    }
    println!("swarm: the balancer used all three executors: {called:?}");

    // A runtime's task container removed behind Hearth's back: the next calls are served again.
    let function: serde_json::Value = client
        .get(format!("{API}/v1/functions/greeter"))
        .bearer_auth(&secret)
        .send()
        .await?
        .json()
        .await?;
    let runtime = function["runtimeId"]
        .as_str()
        .context("the function has no runtimeId")?
        .to_string();
    // The runtime may be a specialised pool member, whose labels are the pool's: ask the
    // runtime itself (an exec through the Swarm adapter) which container it is.
    let removed = task_container(&client, &secret, &runtime).await?;
    docker(&["rm", "-f", &removed])?;
    let secret_again = secret.clone();
    let attempts = std::sync::atomic::AtomicU32::new(0);
    let body = eventually(
        "greeter served again after its container was removed",
        Duration::from_secs(120),
        || {
            attempts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let output = hearth(&secret_again, &["invoke", "greeter", "--data", "Bob"])?;
            let body = String::from_utf8_lossy(&output.stdout).into_owned();
            Ok(output.status.success().then_some(body))
        },
    )
    .await?;
    ensure!(body == "hello Bob", "{body:?}");
    let serving = task_container(&client, &secret, &runtime).await?;
    ensure!(
        serving != removed,
        "still served by the removed container {removed}"
    );
    ensure!(
        !docker(&["ps", "-q", "--filter", &format!("id={serving}")])?.is_empty(),
        "container {serving} is not running"
    );
    println!(
        "swarm: runtime {runtime} served again after its task container {removed} was removed \
         (invocations until then: {})",
        attempts.into_inner()
    );

    drop(daemon);
    stack.down()?;
    let left = leftovers()?;
    ensure!(left.is_empty(), "make swarm-down left {left:?}");
    println!("swarm: make swarm-down left nothing behind");
    Ok(())
}
