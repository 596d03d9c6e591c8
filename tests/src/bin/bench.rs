//! `make bench`: prints Hearth's numbers and writes them as JSON to `target/bench/results.json`.
//!
//! Runtime images: for each image's `example/` hello function called directly (as the executor
//! calls it: secret, timeout and logging headers), warm latency p50/p99 and requests/s at 1 and
//! 32 connections (wrk), and the time from container start to the first 200 on `/__opr/health`.
//! Runtimes sit on a bridge network the benchmark creates and are called by their address there,
//! as an executor on that network calls them.
//!
//! Executor (`--executor`, on by default): the executor image in a container on the same network,
//! so both paths are container to container: warm hello through the executor vs direct to the
//! runtime (added p50/p99 at one connection, the two paths taking turns request by request:
//! `bench/paired.rs`; requests/s at 32 connections, CPU per execution), the same load
//! through Debian's nginx on the host and in a container on that network (the reference proxies),
//! cold start through the executor vs the raw Docker time (create + start + first healthy) for
//! the same image, and the executor's RSS with 50 warm runtimes.
//!
//! Balancer (`--balancer`, on by default): balancer vs nginx vs direct to one warm executor
//! (`bench/balancer.rs`).
//!
//! Pools (`--pools`, on by default): first executions of new functions through the executor with
//! a warm pool, without one, and the raw Docker start, per image (`bench/pools.rs`), plotted to
//! `target/bench/cold-starts.png`.
//!
//! Swarm (`--swarm`, on by default): cold starts (with and without a pool) and warm overhead of
//! the Node hello under the Swarm adapter next to the Docker adapter (`bench/swarm.rs`); the
//! engine is made a single-node swarm for it if it is in none.
//!
//! Usage: `bench [--runtimes node,python] [--duration SECS] [--starts N] [--executor true|false]
//! [--balancer true|false] [--builds true|false] [--pools true|false] [--swarm true|false]
//! [--baseline IMAGE] [--balancer-rounds N]`; `--baseline` adds an executor of another image (an
//! earlier build) to the executor section's 32-connection rounds, for a before/after in the same
//! run; `--balancer-rounds` sets how many rounds the balancer section takes (5 by default).

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hearth_tests::docker::{connect, Network};
use hearth_tests::runtime::{self, example_dir, RuntimeImage, Server, ServerOptions};
use serde_json::{json, Value};

const SECRET: &str = "bench-secret-key";

const USAGE: &str = "usage: bench [--runtimes node,python,wasm] [--duration SECS] [--starts N] \
[--executor true|false] [--balancer true|false] [--builds true|false] [--pools true|false] \
[--swarm true|false] [--baseline EXECUTOR_IMAGE] [--balancer-rounds N]";

struct Args {
    runtimes: Vec<RuntimeImage>,
    duration: u64,
    starts: usize,
    executor: bool,
    balancer: bool,
    builds: bool,
    pools: bool,
    swarm: bool,
    /// An executor image to measure beside `hearth/executor:latest` in the executor section.
    baseline: Option<String>,
    /// Rounds of the balancer section's loads (direct, balancer, nginx in turn).
    balancer_rounds: usize,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        runtimes: runtime::ALL.to_vec(),
        duration: 5,
        starts: 10,
        executor: true,
        balancer: true,
        builds: true,
        pools: true,
        swarm: true,
        baseline: None,
        balancer_rounds: 5,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--help" || flag == "-h" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let value = it
            .next()
            .with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
        match flag.as_str() {
            "--runtimes" => {
                args.runtimes = value
                    .split(',')
                    .filter(|name| !name.is_empty())
                    .map(|name| {
                        runtime::ALL
                            .iter()
                            .find(|rt| rt.name == name)
                            .copied()
                            .with_context(|| format!("unknown runtime {name}"))
                    })
                    .collect::<Result<_>>()?;
            }
            "--duration" => args.duration = value.parse().context("--duration")?,
            "--starts" => args.starts = value.parse().context("--starts")?,
            "--executor" => args.executor = value.parse().context("--executor")?,
            "--balancer" => args.balancer = value.parse().context("--balancer")?,
            "--builds" => args.builds = value.parse().context("--builds")?,
            "--pools" => args.pools = value.parse().context("--pools")?,
            "--swarm" => args.swarm = value.parse().context("--swarm")?,
            "--baseline" => args.baseline = Some(value.to_string()),
            "--balancer-rounds" => {
                args.balancer_rounds = value.parse().context("--balancer-rounds")?;
                if args.balancer_rounds == 0 {
                    bail!("--balancer-rounds must be at least 1");
                }
            }
            other => bail!("unknown flag {other}\n{USAGE}"),
        }
    }
    Ok(args)
}

/// One wrk run: latency percentiles in ms and requests/s.
#[derive(Debug, Clone, Copy)]
struct Load {
    p50_ms: f64,
    p99_ms: f64,
    rps: f64,
}

/// wrk settings that call a runtime as the executor does.
fn runtime_lua() -> String {
    format!(
        "wrk.method = \"GET\"\n\
         wrk.headers[\"x-open-runtimes-secret\"] = \"{SECRET}\"\n\
         wrk.headers[\"x-open-runtimes-timeout\"] = \"15\"\n\
         wrk.headers[\"x-open-runtimes-logging\"] = \"enabled\"\n"
    )
}

/// wrk settings that post an execution (path `/`) to the executor API with `secret`.
fn execution_lua(secret: &str) -> String {
    format!(
        "wrk.method = \"POST\"\n\
         wrk.headers[\"authorization\"] = \"Bearer {secret}\"\n\
         wrk.headers[\"accept\"] = \"application/json\"\n\
         wrk.headers[\"content-type\"] = \"application/json\"\n\
         wrk.body = '{{\"path\":\"/\"}}'\n"
    )
}

fn wrk(url: &str, connections: u32, duration: u64) -> Result<Load> {
    wrk_with(url, connections, duration, &runtime_lua())
}

fn wrk_with(url: &str, connections: u32, duration: u64, lua: &str) -> Result<Load> {
    let script = std::env::temp_dir().join(format!("hearth-bench-{}.lua", std::process::id()));
    std::fs::write(&script, lua)?;
    let threads = connections.clamp(1, 2).to_string();
    let output = Command::new("wrk")
        .args([
            "-t",
            &threads,
            "-c",
            &connections.to_string(),
            "-d",
            &format!("{duration}s"),
            "--latency",
            "-s",
        ])
        .arg(&script)
        .arg(url)
        .output()
        .context("failed to run wrk (apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    if !output.status.success() {
        bail!(
            "wrk failed: {text}{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    if text.contains("Non-2xx") {
        bail!("wrk saw non-2xx answers:\n{text}");
    }
    let percentile = |label: &str| -> Result<f64> {
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with(label))
            .with_context(|| format!("no {label} in wrk output:\n{text}"))?;
        let value = line
            .split_whitespace()
            .nth(1)
            .with_context(|| format!("bad line {line}"))?;
        parse_duration_ms(value)
    };
    let rps = text
        .lines()
        .find(|l| l.starts_with("Requests/sec:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no Requests/sec in wrk output:\n{text}"))?;
    Ok(Load {
        p50_ms: percentile("50%")?,
        p99_ms: percentile("99%")?,
        rps,
    })
}

/// wrk prints durations as `81.00us`, `1.20ms` or `2.00s`.
fn parse_duration_ms(value: &str) -> Result<f64> {
    let (number, factor) = if let Some(n) = value.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = value.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = value.strip_suffix('s') {
        (n, 1000.0)
    } else {
        bail!("unknown duration {value}")
    };
    Ok(number.parse::<f64>().context("duration number")? * factor)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// One image's starts, and its server kept running for the load rounds.
struct Started {
    rt: RuntimeImage,
    server: Server,
    starts: Vec<f64>,
    docker_starts: Vec<f64>,
    one: Vec<Load>,
    many: Vec<Load>,
}

/// Builds the image's example, measures start to healthy, and leaves one server running.
async fn start_runtime(rt: RuntimeImage, args: &Args, network: &str) -> Result<Started> {
    let docker = connect().await?;
    let built = runtime::build(&docker, rt.image, &example_dir(&rt), rt.example_entry, "")
        .await
        .with_context(|| format!("failed to build the {} example", rt.name))?;
    let options = ServerOptions {
        network: Some(network.to_string()),
        ..ServerOptions::default()
    }
    .env("OPEN_RUNTIMES_SECRET", SECRET)
    .env("OPEN_RUNTIMES_ENTRYPOINT", rt.example_entry);

    // Start to healthy: from the start call to the first 200 on /__opr/health; the Docker
    // start call alone is measured too, to show what the runtime itself adds.
    let mut starts = Vec::new();
    let mut docker_starts = Vec::new();
    for _ in 0..args.starts {
        let container = runtime::prepare(&docker, rt.image, &built.archive, &options).await?;
        let started = Instant::now();
        container.start().await?;
        docker_starts.push(started.elapsed().as_secs_f64() * 1000.0);
        let server = Server::attach(container, Some(network)).await?;
        server.wait_healthy(Duration::from_secs(30)).await?;
        starts.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    starts.sort_by(f64::total_cmp);
    docker_starts.sort_by(f64::total_cmp);

    let server = Server::start(&docker, rt.image, &built.archive, &options).await?;
    // Warm up the function (first load) and the connection path.
    wrk(&format!("{}/", server.url), 4, 1)?;
    Ok(Started {
        rt,
        server,
        starts,
        docker_starts,
        one: Vec::new(),
        many: Vec::new(),
    })
}

/// Hello at 1 and 32 connections, `ROUNDS` times, the images taking turns within each round: a
/// slow spell of the host hits every image alike. Each figure is the median of its rounds.
fn load_rounds(started: &mut [Started], duration: u64) -> Result<()> {
    for _ in 0..ROUNDS {
        for image in started.iter_mut() {
            let url = format!("{}/", image.server.url);
            image.one.push(wrk(&url, 1, duration)?);
            image.many.push(wrk(&url, 32, duration)?);
        }
    }
    Ok(())
}

fn report_runtime(image: &Started) -> Value {
    let (one, many) = (median_load(&image.one), median_load(&image.many));
    let (starts, docker_starts) = (&image.starts, &image.docker_starts);
    println!(
        "{:<22} hello 1 conn: p50 {:.3} ms p99 {:.3} ms {:>6.0} req/s | 32 conn: p50 {:.3} ms p99 {:.3} ms {:>6.0} req/s | start→healthy p50 {:.0} ms max {:.0} ms (docker start call alone p50 {:.0} ms)",
        image.rt.image,
        one.p50_ms,
        one.p99_ms,
        one.rps,
        many.p50_ms,
        many.p99_ms,
        many.rps,
        percentile(starts, 50.0),
        percentile(starts, 100.0),
        percentile(docker_starts, 50.0),
    );
    let rounds = |loads: &[Load]| -> Vec<Value> {
        loads
            .iter()
            .map(|l| json!({"p50_ms": l.p50_ms, "p99_ms": l.p99_ms, "rps": l.rps}))
            .collect()
    };
    json!({
        "image": image.rt.image,
        "hello_c1": {"p50_ms": one.p50_ms, "p99_ms": one.p99_ms, "rps": one.rps, "rounds": rounds(&image.one)},
        "hello_c32": {"p50_ms": many.p50_ms, "p99_ms": many.p99_ms, "rps": many.rps, "rounds": rounds(&image.many)},
        "start_to_healthy_ms": {"p50": percentile(starts, 50.0), "max": percentile(starts, 100.0), "samples": starts},
        "docker_start_call_ms": {"p50": percentile(docker_starts, 50.0), "samples": docker_starts},
    })
}

/// Rounds of load per image (the runtime images) and per path (the balancer bench).
const ROUNDS: usize = 3;

/// Each figure's median over the rounds.
/// The median of `values` (NaN when empty).
fn median_of(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn median_load(rounds: &[Load]) -> Load {
    let median = |f: fn(&Load) -> f64| median_of(&rounds.iter().map(f).collect::<Vec<_>>());
    Load {
        p50_ms: median(|l| l.p50_ms),
        p99_ms: median(|l| l.p99_ms),
        rps: median(|l| l.rps),
    }
}

/// The Wasm runtime's per-request cost without HTTP: a fresh instance of a no-op guest from the
/// pre-linked module on the pooling allocator, `_start` called, the instance dropped. In process,
/// with the same `EngineBuilder` the server uses.
fn bench_wasm_instantiation() -> Result<Value> {
    use hearth_wasm_runtime::engine::{EngineBuilder, Invocation, Status};
    const RUNS: usize = 20_000;
    let engine = EngineBuilder::new().max_instances(4).build()?;
    let path = runtime::repo_root().join("runtimes/wasm/testdata/noop.wat");
    let wat = std::fs::read(&path).with_context(|| format!("failed to read {}", path.display()))?;
    let guest = engine.load_bytes("noop.wat", &wat)?;
    for _ in 0..1_000 {
        guest.run(Invocation::default());
    }
    let mut samples = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let started = Instant::now();
        let outcome = guest.run(Invocation::default());
        samples.push(started.elapsed().as_secs_f64() * 1e6);
        if outcome.status != Status::Success {
            bail!("no-op guest failed: {:?}", outcome.status);
        }
    }
    samples.sort_by(f64::total_cmp);
    let (p50, p99) = (percentile(&samples, 50.0), percentile(&samples, 99.0));
    println!(
        "{:<22} instantiate+run no-op guest (in process, pooling): p50 {p50:.1} µs p99 {p99:.1} µs ({RUNS} runs)",
        runtime::WASM.image
    );
    Ok(json!({"image": runtime::WASM.image, "p50_us": p50, "p99_us": p99, "runs": RUNS}))
}

/// One line setting each runtime's warm hello against Node's, from the same run.
fn compare_with_node(results: &[Value]) {
    let find = |image: &str| results.iter().find(|r| r["image"] == image);
    let Some(node) = find(runtime::NODE.image) else {
        return;
    };
    for result in results.iter().filter(|r| r["image"] != runtime::NODE.image) {
        println!(
            "{:<22} vs {}: hello p50 (1 conn) {:.3} vs {:.3} ms | req/s (32 conn) {:.0} vs {:.0}",
            result["image"].as_str().unwrap_or("?"),
            runtime::NODE.image,
            result["hello_c1"]["p50_ms"].as_f64().unwrap_or(f64::NAN),
            node["hello_c1"]["p50_ms"].as_f64().unwrap_or(f64::NAN),
            result["hello_c32"]["rps"].as_f64().unwrap_or(f64::NAN),
            node["hello_c32"]["rps"].as_f64().unwrap_or(f64::NAN),
        );
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = parse_args()?;
    println!(
        "Hearth benchmark: runtime images, hello called directly with logging enabled ({} s per load, {} starts)",
        args.duration, args.starts
    );
    // Runtimes are reached on a network of our own, by address: no docker-proxy in the path.
    let network = Network::create(&connect().await?, "hearth-bench").await?;
    let instantiation: Option<Value> =
        if args.runtimes.iter().any(|rt| rt.name == runtime::WASM.name) {
            Some(tokio::task::spawn_blocking(bench_wasm_instantiation).await??)
        } else {
            None
        };
    let mut started = Vec::new();
    for rt in &args.runtimes {
        started.push(start_runtime(*rt, &args, &network.name).await?);
    }
    load_rounds(&mut started, args.duration)?;
    let results: Vec<Value> = started.iter().map(report_runtime).collect();
    drop(started);
    compare_with_node(&results);
    let executor = if args.executor {
        Some(executor_bench::run(&args, &network.name).await?)
    } else {
        None
    };
    let balancer = if args.balancer {
        Some(balancer::run(&args).await?)
    } else {
        None
    };
    let pools = if args.pools {
        Some(pools::run(&args, &network.name).await?)
    } else {
        None
    };
    let swarm = if args.swarm {
        Some(swarm::run(&args, &network.name).await?)
    } else {
        None
    };
    let builds = if args.builds {
        Some(builds::run().await?)
    } else {
        None
    };
    let out_dir = runtime::repo_root().join("target").join("bench");
    std::fs::create_dir_all(&out_dir)?;
    let path = out_dir.join("results.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&json!({
            "runtimes": results,
            "wasm_instantiation": instantiation,
            "executor": executor,
            "balancer": balancer,
            "builds": builds,
            "pools": pools,
            "swarm": swarm,
        }))?,
    )?;
    println!("JSON: {}", path.display());
    if args.pools {
        pools::chart(&path);
    }
    Ok(())
}

/// How the benchmark starts a runtime of `rt` by itself on `network` (as an executor would).
fn server_options(rt: RuntimeImage, network: &str) -> ServerOptions {
    ServerOptions {
        network: Some(network.to_string()),
        ..ServerOptions::default()
    }
    .env("OPEN_RUNTIMES_SECRET", SECRET)
    .env("OPEN_RUNTIMES_ENTRYPOINT", rt.example_entry)
}

/// `starts` raw Docker starts of `rt` with `archive`, no executor: (create + start + first
/// healthy, create alone), in ms. Each container is removed when measured.
async fn raw_docker_starts(
    docker: &bollard::Docker,
    rt: RuntimeImage,
    archive: &[u8],
    network: &str,
    starts: usize,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let options = server_options(rt, network);
    let (mut total, mut create) = (Vec::new(), Vec::new());
    for _ in 0..starts {
        let started = Instant::now();
        let container = runtime::prepare(docker, rt.image, archive, &options).await?;
        create.push(started.elapsed().as_secs_f64() * 1000.0);
        container.start().await?;
        let server = Server::attach(container, Some(network)).await?;
        server.wait_healthy(Duration::from_secs(30)).await?;
        total.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    Ok((total, create))
}

/// Balancer vs nginx vs direct (a folder cargo does not take for a binary).
#[path = "bench/balancer.rs"]
mod balancer;
#[path = "bench/paired.rs"]
mod paired;

/// Cold starts with and without warm pools vs raw Docker, per runtime image.
#[path = "bench/pools.rs"]
mod pools;

/// The Swarm adapter next to the Docker adapter: cold starts and warm overhead.
#[path = "bench/swarm.rs"]
mod swarm;

/// The build queue's overhead and a git build vs its command run directly.
#[path = "bench/builds.rs"]
mod builds;

mod executor_bench {
    //! The executor's numbers, from the executor image run as a container on the bench network.

    use super::*;
    use hearth_tests::docker::Container;
    use hearth_tests::executor::{remove_by_label, TempDir};

    pub(super) const EXECUTOR_SECRET: &str = "bench-executor-secret";

    /// The executor container; its runtimes are removed with it.
    pub(super) struct ExecutorContainer {
        pub container: Container,
        pub name: String,
        pub url: String,
    }

    impl Drop for ExecutorContainer {
        fn drop(&mut self) {
            // The executor first (or its pools would refill behind our back), then its runtimes.
            let _ = Command::new("docker")
                .args(["rm", "-f", "-v", &self.container.id])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
            remove_by_label(&format!("hearth.executor={}", self.name));
            // A pool creation the executor had already sent to Docker may land after that.
            for _ in 0..4 {
                std::thread::sleep(Duration::from_millis(500));
                remove_by_label(&format!("hearth.executor={}", self.name));
            }
        }
    }

    /// The executor image on the bench network; `env` adds or overrides its variables.
    pub(super) async fn start_executor(
        network: &str,
        storage: &std::path::Path,
        runtimes: &std::path::Path,
        tag: &str,
        env: &[(&str, &str)],
    ) -> Result<ExecutorContainer> {
        start_executor_for(network, network, storage, runtimes, tag, env).await
    }

    /// [`start_executor`] with its runtimes on `runtimes_network` (e.g. a Swarm overlay network),
    /// which the executor joins besides the bench network the client reaches it on.
    pub(super) async fn start_executor_for(
        network: &str,
        runtimes_network: &str,
        storage: &std::path::Path,
        runtimes: &std::path::Path,
        tag: &str,
        env: &[(&str, &str)],
    ) -> Result<ExecutorContainer> {
        let image = "hearth/executor:latest";
        start_executor_from(
            image,
            network,
            runtimes_network,
            storage,
            runtimes,
            tag,
            env,
        )
        .await
    }

    /// [`start_executor_for`] from another image than `hearth/executor:latest`.
    async fn start_executor_from(
        image: &str,
        network: &str,
        runtimes_network: &str,
        storage: &std::path::Path,
        runtimes: &std::path::Path,
        tag: &str,
        env: &[(&str, &str)],
    ) -> Result<ExecutorContainer> {
        let name = format!("hearth-bench-executor-{tag}-{}", std::process::id());
        let extra: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let output = Command::new("docker")
            .args(["create", "--label", "hearth.test=1", "--network", network])
            .args(["-v", "/var/run/docker.sock:/var/run/docker.sock"])
            .arg("-v")
            .arg(format!("{}:/storage", storage.display()))
            .arg("-v")
            .arg(format!("{0}:{0}", runtimes.display()))
            .args(["-e", &format!("OPR_EXECUTOR_SECRET={EXECUTOR_SECRET}")])
            .args(["-e", &format!("OPR_EXECUTOR_NETWORK={runtimes_network}")])
            .args(["-e", &format!("OPR_EXECUTOR_NAME={name}")])
            .args([
                "-e",
                &format!("OPR_EXECUTOR_RUNTIMES_DIR={}", runtimes.display()),
            ])
            .args(["-e", "OPR_EXECUTOR_LABELS=hearth.test=1"])
            .args(["-e", "OPR_EXECUTOR_MAX_RUNTIMES=200"])
            .args(["-e", "OPR_EXECUTOR_INACTIVE_THRESHOLD=3600"])
            .args(extra.iter().flat_map(|e| ["-e", e.as_str()]))
            .arg(image)
            .output()
            .context("failed to create the executor container (make executor-image)")?;
        if !output.status.success() {
            bail!(
                "docker create failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let id = String::from_utf8_lossy(&output.stdout).trim().to_string();
        let docker = connect().await?;
        let container = Container { docker, id };
        container.start().await?;
        // Joined once running, and retried: right after the last task on an attachable overlay
        // network went (the previous executor's services), the engine tears the network's local
        // state down and an attach fails for a moment with "network ... not found".
        if runtimes_network != network {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let joined = Command::new("docker")
                    .args(["network", "connect", runtimes_network, &container.id])
                    .output()?;
                if joined.status.success() {
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "docker network connect {runtimes_network} failed: {}",
                        String::from_utf8_lossy(&joined.stderr)
                    );
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        let ip = container.ip_on(network).await?;
        let url = format!("http://{ip}:80");
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while client.get(format!("{url}/v1/health")).send().await.is_err() {
            if Instant::now() > deadline {
                bail!(
                    "executor not healthy: {}",
                    container.output().await.unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(ExecutorContainer {
            container,
            name,
            url,
        })
    }

    /// Busy CPU time of the whole host, all cores, in ns (`/proc/stat`: everything but idle and
    /// iowait).
    fn host_busy_ns() -> Option<u64> {
        let text = std::fs::read_to_string("/proc/stat").ok()?;
        let fields: Vec<u64> = text
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .take(8)
            .map(|v| v.parse().ok())
            .collect::<Option<_>>()?;
        let ticks = fields.iter().sum::<u64>() - fields.get(3)? - fields.get(4)?;
        // USER_HZ is 100 on Linux.
        Some(ticks * 10_000_000)
    }

    /// The container of the runtime `warm` that the executor called `executor_name` started.
    async fn runtime_container_id(docker: &bollard::Docker, executor_name: &str) -> Result<String> {
        let name = format!("{executor_name}-warm");
        let info = docker
            .inspect_container(&name, None)
            .await
            .with_context(|| format!("no runtime container {name}"))?;
        info.id.context("runtime container without an id")
    }

    /// CPU time a container has used (cgroup v1 or v2), in ns.
    fn cpu_ns(id: &str) -> Option<u64> {
        let v1 = format!("/sys/fs/cgroup/cpuacct/docker/{id}/cpuacct.usage");
        if let Ok(text) = std::fs::read_to_string(v1) {
            return text.trim().parse().ok();
        }
        let v2 = format!("/sys/fs/cgroup/system.slice/docker-{id}.scope/cpu.stat");
        let text = std::fs::read_to_string(v2).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("usage_usec "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|us| us * 1000)
    }

    /// `hearth-bench/nginx` (`make bench` builds it) on `network` in front of `upstream`; the
    /// container and the URL of its port 80.
    async fn start_nginx_container(
        docker: &bollard::Docker,
        network: &str,
        upstream: &str,
    ) -> Result<(Container, String)> {
        let conf = balancer::nginx_conf("/tmp", upstream, "80");
        let spec = hearth_tests::docker::ContainerSpec {
            network: Some(network.to_string()),
            ..hearth_tests::docker::ContainerSpec::new("hearth-bench/nginx:latest")
        }
        .env("NGINX_CONF", &conf)
        .cmd(&[
            "sh",
            "-c",
            "printf '%s' \"$NGINX_CONF\" > /tmp/nginx.conf && exec nginx -c /tmp/nginx.conf",
        ]);
        let container = Container::create(docker, &spec)
            .await
            .context("no nginx image for the bench (make bench builds hearth-bench/nginx)")?;
        container.start().await?;
        let url = format!("http://{}:80", container.ip_on(network).await?);
        balancer::wait_up(&url, "/__opr/health").await?;
        Ok((container, format!("{url}/")))
    }

    /// User and system CPU time of a container (cgroup v1 `cpuacct.stat`, in ticks).
    fn cpu_split(id: &str) -> Option<(u64, u64)> {
        let text =
            std::fs::read_to_string(format!("/sys/fs/cgroup/cpuacct/docker/{id}/cpuacct.stat"))
                .ok()?;
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        Some((field("user ")?, field("system ")?))
    }

    pub(super) async fn execute(
        client: &reqwest::Client,
        url: &str,
        runtime_id: &str,
        params: &Value,
    ) -> Result<Value> {
        let res = client
            .post(format!("{url}/v1/runtimes/{runtime_id}/executions"))
            .bearer_auth(EXECUTOR_SECRET)
            .header("accept", "application/json")
            .json(params)
            .send()
            .await?;
        let status = res.status();
        let body: Value = res.json().await?;
        if !status.is_success() || body["statusCode"] != 200 {
            bail!("execution failed: {status} {body}");
        }
        Ok(body)
    }

    /// [`execute`], timed end to end by the client: the milliseconds it took.
    pub(super) async fn execute_ms(
        client: &reqwest::Client,
        url: &str,
        runtime_id: &str,
        params: &Value,
    ) -> Result<f64> {
        let started = Instant::now();
        execute(client, url, runtime_id, params).await?;
        Ok(started.elapsed().as_secs_f64() * 1000.0)
    }

    /// The execution parameters of the example [`stage_example`] staged for `rt`.
    pub(super) fn example_params(rt: RuntimeImage) -> Value {
        json!({
            "image": rt.image,
            "source": "/storage/functions/hello.tar.gz",
            "entrypoint": rt.example_entry,
        })
    }

    /// An executor's folders with `rt`'s example, built once with the image's build step, staged
    /// as the storage archive `/storage/functions/hello.tar.gz`.
    pub(super) struct Staged {
        pub storage: std::path::PathBuf,
        pub runtimes: std::path::PathBuf,
        pub built: runtime::Built,
        pub _dir: TempDir,
    }

    pub(super) async fn stage_example(
        docker: &bollard::Docker,
        rt: RuntimeImage,
    ) -> Result<Staged> {
        let dir = TempDir::new("hearth-bench")?;
        let storage = dir.0.join("storage");
        let runtimes = dir.0.join("runtimes");
        std::fs::create_dir_all(storage.join("functions"))?;
        std::fs::create_dir_all(&runtimes)?;
        let built =
            runtime::build(docker, rt.image, &example_dir(&rt), rt.example_entry, "").await?;
        std::fs::write(storage.join("functions/hello.tar.gz"), &built.archive)?;
        Ok(Staged {
            storage,
            runtimes,
            built,
            _dir: dir,
        })
    }

    pub async fn run(args: &Args, network: &str) -> Result<Value> {
        let rt = runtime::NODE;
        let docker = connect().await?;
        let Staged {
            storage,
            runtimes,
            built,
            _dir,
        } = stage_example(&docker, rt).await?;
        // Pools off: these are the numbers of a container started on the request path.
        let executor = start_executor(
            network,
            &storage,
            &runtimes,
            "plain",
            &[("OPR_EXECUTOR_POOL", "false")],
        )
        .await?;
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()?;
        let params = example_params(rt);

        // Cold starts through the executor (a new runtime each) vs raw Docker for the same image,
        // taking turns, so a slow spell of the engine hits both alike.
        let (mut cold, mut raw, mut raw_create) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..args.starts {
            cold.push(execute_ms(&client, &executor.url, &format!("cold-{i}"), &params).await?);
            let (total, create) =
                raw_docker_starts(&docker, rt, &built.archive, network, 1).await?;
            raw.extend(total);
            raw_create.extend(create);
        }
        let options = server_options(rt, network);
        for v in [&mut cold, &mut raw, &mut raw_create] {
            v.sort_by(f64::total_cmp);
        }

        // Warm overhead: the same hello, through the executor and direct to a runtime.
        execute(&client, &executor.url, "warm", &params).await?;
        // The same, through an executor that calls its runtime over TCP
        // (`OPR_EXECUTOR_RUNTIME_SOCKETS=false`): what the socket leg (runtimes/socket.md) gives.
        let tcp_executor = start_executor(
            network,
            &storage,
            &runtimes,
            "tcp",
            &[
                ("OPR_EXECUTOR_POOL", "false"),
                ("OPR_EXECUTOR_RUNTIME_SOCKETS", "false"),
            ],
        )
        .await?;
        execute(&client, &tcp_executor.url, "warm", &params).await?;
        // An earlier build of the executor (`--baseline`), for a before/after in one run.
        let baseline = match &args.baseline {
            Some(image) => {
                let env = [("OPR_EXECUTOR_POOL", "false")];
                let started =
                    start_executor_from(image, network, network, &storage, &runtimes, "base", &env)
                        .await?;
                execute(&client, &started.url, "warm", &params).await?;
                Some(started)
            }
            None => None,
        };
        let baseline_url = baseline
            .as_ref()
            .map(|b| format!("{}/v1/runtimes/warm/executions", b.url));
        let direct_server = Server::start(&docker, rt.image, &built.archive, &options).await?;
        let direct_url = format!("{}/", direct_server.url);
        let lua = execution_lua(EXECUTOR_SECRET);
        let plain = runtime_lua();
        let through_url = format!("{}/v1/runtimes/warm/executions", executor.url);
        let tcp_url = format!("{}/v1/runtimes/warm/executions", tcp_executor.url);
        // The references for the throughput target: a plain nginx proxy in front of the same
        // runtime on the host, and the same nginx in a container on the runtime's network, where
        // the executor runs (both of its TCP legs then cross the Docker bridge, as the
        // executor's client leg does).
        let nginx_dir = TempDir::new("hearth-bench-nginx")?;
        let nginx_port = hearth_tests::builds::free_port()?;
        let upstream = direct_server
            .url
            .trim_start_matches("http://")
            .trim_end_matches('/');
        let nginx = balancer::start_nginx(&nginx_dir.0, upstream, nginx_port)?;
        let nginx_base = format!("http://127.0.0.1:{nginx_port}");
        balancer::wait_up(&nginx_base, "/__opr/health").await?;
        let nginx_url = format!("{nginx_base}/");
        let (boxed_nginx, boxed_url) = start_nginx_container(&docker, network, upstream).await?;
        for (url, script) in [
            (&through_url, &lua),
            (&tcp_url, &lua),
            (&direct_url, &plain),
            (&nginx_url, &plain),
            (&boxed_url, &plain),
        ] {
            wrk_with(url, 4, 1, script)?;
        }

        // One connection: direct and through the executor taking turns request by request
        // (`paired.rs`), so both see the same moments of the host; figures over all rounds.
        let targets = vec![
            paired::Target::runtime(&direct_url)?,
            paired::Target::execution(&through_url, EXECUTOR_SECRET)?,
        ];
        let round = Duration::from_secs(args.duration * 2);
        let measured =
            tokio::task::spawn_blocking(move || paired::interleaved(&targets, ROUNDS, round))
                .await??;
        let (direct_1, through_1) = (measured[0].all, measured[1].all);
        let no_proxy = || None;
        let executor_cpu = || cpu_ns(&executor.container.id);
        let tcp_cpu = || cpu_ns(&tcp_executor.container.id);
        let nginx_cpu = || Some(nginx.cpu_ns());
        let boxed_cpu = || cpu_ns(&boxed_nginx.id);
        // Each path: its URL, its wrk script, and the CPU (ns) its proxy has used so far.
        type CpuNs<'a> = &'a dyn Fn() -> Option<u64>;
        let baseline_cpu = || cpu_ns(&baseline.as_ref()?.container.id);
        let mut paths: Vec<(&str, &String, CpuNs)> = vec![
            (&direct_url, &plain, &no_proxy),
            (&through_url, &lua, &executor_cpu),
            (&tcp_url, &lua, &tcp_cpu),
            (&nginx_url, &plain, &nginx_cpu),
            (&boxed_url, &plain, &boxed_cpu),
        ];
        if let Some(url) = &baseline_url {
            wrk_with(url, 4, 1, &lua)?;
            paths.push((url, &lua, &baseline_cpu));
        }
        // The runtime container each path ends at: direct and both nginx call the bench's own
        // server; each executor, the runtime it started for "warm".
        let direct_runtime = direct_server.container.id.clone();
        let mut runtime_ids = vec![
            direct_runtime.clone(),
            runtime_container_id(&docker, &executor.name).await?,
            runtime_container_id(&docker, &tcp_executor.name).await?,
            direct_runtime.clone(),
            direct_runtime.clone(),
        ];
        if let Some(b) = &baseline {
            runtime_ids.push(runtime_container_id(&docker, &b.name).await?);
        }
        let mut loads: Vec<Vec<Load>> = vec![Vec::new(); paths.len()];
        let mut cpus: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
        // Where the host's CPU went per request, µs: the whole host (all cores, busy time) and
        // the runtime container; what is neither the runtime nor the proxy is wrk and the rest.
        let mut host_cpus: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
        let mut runtime_cpus: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
        let mut system_shares = Vec::new();
        for _ in 0..ROUNDS {
            for (i, (url, script, cpu)) in paths.iter().enumerate() {
                let split_before = cpu_split(&executor.container.id);
                let before = cpu();
                let (host_before, runtime_before) = (host_busy_ns(), cpu_ns(&runtime_ids[i]));
                let load = wrk_with(url, 32, args.duration, script)?;
                let requests = load.rps * args.duration as f64;
                let per_request = |a: Option<u64>, b: Option<u64>| match (a, b) {
                    (Some(a), Some(b)) if b >= a => (b - a) as f64 / 1000.0 / requests,
                    _ => f64::NAN,
                };
                cpus[i].push(per_request(before, cpu()));
                host_cpus[i].push(per_request(host_before, host_busy_ns()));
                runtime_cpus[i].push(per_request(runtime_before, cpu_ns(&runtime_ids[i])));
                loads[i].push(load);
                // How much of the executor's CPU is the kernel's (network stack, scheduler).
                if i == 1 {
                    if let (Some((u0, s0)), Some((u1, s1))) =
                        (split_before, cpu_split(&executor.container.id))
                    {
                        if u1 + s1 > u0 + s0 {
                            system_shares.push((s1 - s0) as f64 / ((u1 + s1) - (u0 + s0)) as f64);
                        }
                    }
                }
            }
        }
        drop(boxed_nginx);
        drop(nginx);
        drop(tcp_executor);
        let through_shares: Vec<f64> = loads[1]
            .iter()
            .zip(&loads[0])
            .map(|(through, direct)| 100.0 * through.rps / direct.rps)
            .collect();
        let medians: Vec<Load> = loads.iter().map(|rounds| median_load(rounds)).collect();
        let cpu_medians: Vec<f64> = cpus.iter().map(|rounds| median_of(rounds)).collect();
        let (direct_32, through_32, through_tcp_32, nginx_32, boxed_32) = (
            &medians[0],
            &medians[1],
            &medians[2],
            &medians[3],
            &medians[4],
        );
        let (executor_cpu_us, tcp_executor_cpu_us, nginx_cpu_us, boxed_cpu_us) = (
            cpu_medians[1],
            cpu_medians[2],
            cpu_medians[3],
            cpu_medians[4],
        );
        let baseline_32 = baseline.as_ref().map(|_| {
            let shares: Vec<f64> = loads[5]
                .iter()
                .zip(&loads[0])
                .map(|(through, direct)| 100.0 * through.rps / direct.rps)
                .collect();
            (medians[5].rps, cpu_medians[5], shares)
        });
        drop(baseline);
        let executor_system_share = median_of(&system_shares);
        let host_medians: Vec<f64> = host_cpus.iter().map(|r| median_of(r)).collect();
        let runtime_medians: Vec<f64> = runtime_cpus.iter().map(|r| median_of(r)).collect();
        // The ceiling for any proxy on this host: at 85 % of direct's req/s, all cores together
        // give `budget` µs per request; the runtime and everything else (wrk, the kernel's
        // share outside the two containers) take what they took through the executor, and the
        // proxy may use only what is left.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let budget = cores * 1e6 / (0.85 * direct_32.rps);
        let others = |i: usize| host_medians[i] - runtime_medians[i] - cpu_medians[i];
        let left_for_proxy = budget - runtime_medians[1] - others(1);

        // RSS with 50 warm runtimes (the cold-start ones and "warm" count).
        let have = args.starts + 1;
        for i in have..50 {
            execute(&client, &executor.url, &format!("fill-{i}"), &params).await?;
        }
        let list: Value = client
            .get(format!("{}/v1/runtimes", executor.url))
            .bearer_auth(EXECUTOR_SECRET)
            .send()
            .await?
            .json()
            .await?;
        let warm = list.as_array().map(Vec::len).unwrap_or_default();
        let (_, status, _) = executor.container.exec(&["cat", "/proc/1/status"]).await?;
        let rss_kb: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .context("no VmRSS")?;

        let added_p50 = through_1.p50_ms - direct_1.p50_ms;
        let added_p99 = through_1.p99_ms - direct_1.p99_ms;
        println!(
            "executor (node hello)   warm 1 conn: direct p50 {:.3} ms p99 {:.3} ms | through executor p50 {:.3} ms p99 {:.3} ms | added p50 {:.3} ms p99 {:.3} ms",
            direct_1.p50_ms, direct_1.p99_ms, through_1.p50_ms, through_1.p99_ms, added_p50, added_p99
        );
        println!(
            "executor (node hello)   warm 32 conn: direct {:.0} req/s | through executor {:.0} req/s ({:.0} %; rounds {}), executor CPU {:.0} µs/request ({:.0} % in the kernel)",
            direct_32.rps,
            through_32.rps,
            100.0 * through_32.rps / direct_32.rps,
            through_shares.iter().map(|s| format!("{s:.0} %")).collect::<Vec<_>>().join(" / "),
            executor_cpu_us,
            100.0 * executor_system_share
        );
        println!(
            "executor (node hello)   warm 32 conn: executor calling its runtime over TCP (OPR_EXECUTOR_RUNTIME_SOCKETS=false) {:.0} req/s ({:.0} % of direct), executor CPU {:.0} µs/request",
            through_tcp_32.rps,
            100.0 * through_tcp_32.rps / direct_32.rps,
            tcp_executor_cpu_us,
        );
        if let (Some(image), Some((rps, cpu, shares))) = (&args.baseline, &baseline_32) {
            println!(
                "executor (node hello)   warm 32 conn: baseline executor {image} {rps:.0} req/s ({:.0} % of direct; rounds {}), executor CPU {cpu:.0} µs/request",
                100.0 * rps / direct_32.rps,
                shares.iter().map(|s| format!("{s:.0} %")).collect::<Vec<_>>().join(" / "),
            );
        }
        println!(
            "executor (node hello)   warm 32 conn: nginx in front of the same runtime {:.0} req/s ({:.0} % of direct), nginx CPU {:.0} µs/request: the reference for any proxy here",
            nginx_32.rps,
            100.0 * nginx_32.rps / direct_32.rps,
            nginx_cpu_us,
        );
        println!(
            "executor (node hello)   warm 32 conn: nginx in a container on the runtime's network (as the executor runs) {:.0} req/s ({:.0} % of direct), nginx CPU {:.0} µs/request",
            boxed_32.rps,
            100.0 * boxed_32.rps / direct_32.rps,
            boxed_cpu_us,
        );
        let busy = |i: usize| 100.0 * host_medians[i] * medians[i].rps / 1e6 / cores;
        println!(
            "executor (node hello)   warm 32 conn, CPU per request on the whole host (µs): direct {:.0} = runtime {:.0} + wrk and the rest {:.0} (host {:.0} % busy) | through the executor {:.0} = runtime {:.0} + executor {:.0} + wrk and the rest {:.0} (host {:.0} % busy) | nginx on the host {:.0} = runtime {:.0} + nginx {:.0} + the rest {:.0}",
            host_medians[0], runtime_medians[0], host_medians[0] - runtime_medians[0], busy(0),
            host_medians[1], runtime_medians[1], cpu_medians[1], others(1), busy(1),
            host_medians[3], runtime_medians[3], cpu_medians[3], others(3),
        );
        println!(
            "executor (node hello)   warm 32 conn, the ceiling: 85 % of direct is {:.0} req/s, for which {cores:.0} cores give {budget:.0} µs per request; the runtime and the rest took {:.0} µs through the executor, which leaves {left_for_proxy:.0} µs for any proxy (the executor used {:.0}, {:.0} of it in the kernel; nginx on the host {:.0})",
            0.85 * direct_32.rps,
            runtime_medians[1] + others(1),
            executor_cpu_us,
            executor_cpu_us * executor_system_share,
            nginx_cpu_us,
        );
        println!(
            "executor (node hello)   cold start: through executor p50 {:.0} ms max {:.0} ms | raw docker (create+start+healthy) p50 {:.0} ms (create {:.0} ms) | ratio {:.2}",
            percentile(&cold, 50.0),
            percentile(&cold, 100.0),
            percentile(&raw, 50.0),
            percentile(&raw_create, 50.0),
            percentile(&cold, 50.0) / percentile(&raw, 50.0)
        );
        println!(
            "executor                RSS with {warm} warm runtimes: {:.1} MB",
            rss_kb / 1024.0
        );
        drop(direct_server);
        drop(executor);
        Ok(json!({
            "warm_c1": {"direct_p50_ms": direct_1.p50_ms, "direct_p99_ms": direct_1.p99_ms,
                "through_p50_ms": through_1.p50_ms, "through_p99_ms": through_1.p99_ms,
                "added_p50_ms": added_p50, "added_p99_ms": added_p99},
            "rounds": ROUNDS, "through_share_rounds": through_shares,
            "warm_c32": {"direct_rps": direct_32.rps, "through_rps": through_32.rps, "nginx_rps": nginx_32.rps, "executor_cpu_us_per_request": executor_cpu_us,
                "executor_system_share": executor_system_share, "nginx_cpu_us_per_request": nginx_cpu_us,
                "nginx_container_rps": boxed_32.rps, "nginx_container_cpu_us_per_request": boxed_cpu_us,
                "through_tcp_rps": through_tcp_32.rps, "tcp_executor_cpu_us_per_request": tcp_executor_cpu_us,
                "baseline": baseline_32.as_ref().map(|(rps, cpu, shares)| json!({"image": args.baseline, "rps": rps, "cpu_us_per_request": cpu, "share_rounds": shares})),
                "rps_rounds": loads.iter().map(|rounds| rounds.iter().map(|l| l.rps).collect::<Vec<_>>()).collect::<Vec<_>>(),
                "cpu_us_rounds": cpus,
                "host_cpu_us_per_request": host_medians, "runtime_cpu_us_per_request": runtime_medians,
                "host_cpu_us_rounds": host_cpus, "runtime_cpu_us_rounds": runtime_cpus,
                "ceiling": {"cores": cores, "budget_us_per_request_at_85_percent": budget,
                    "left_for_proxy_us": left_for_proxy}},
            "cold_start_ms": {"through_p50": percentile(&cold, 50.0), "through_max": percentile(&cold, 100.0),
                "raw_docker_p50": percentile(&raw, 50.0), "raw_create_p50": percentile(&raw_create, 50.0),
                "through_samples": cold, "raw_samples": raw},
            "rss_mb_50_warm": rss_kb / 1024.0,
            "warm_runtimes": warm,
        }))
    }
}
