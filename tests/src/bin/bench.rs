//! `make bench`: prints Hearth's numbers and writes them as JSON to `target/bench/results.json`.
//!
//! Runtime images: for each image's `example/` hello function called directly (as the executor
//! calls it: secret, timeout and logging headers), warm latency p50/p99 and requests/s at 1 and
//! 32 connections (wrk), and the time from container start to the first 200 on `/__opr/health`.
//! Runtimes sit on a bridge network the benchmark creates and are called by their address there,
//! as an executor on that network calls them.
//!
//! Usage: `bench [--runtimes node,python] [--duration SECS] [--starts N]`

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hearth_tests::docker::{connect, Network};
use hearth_tests::runtime::{self, example_dir, RuntimeImage, Server, ServerOptions};
use serde_json::{json, Value};

const SECRET: &str = "bench-secret-key";

struct Args {
    runtimes: Vec<RuntimeImage>,
    duration: u64,
    starts: usize,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        runtimes: runtime::ALL.to_vec(),
        duration: 5,
        starts: 10,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--runtimes" => {
                args.runtimes = value
                    .split(',')
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
            other => bail!("unknown flag {other}"),
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

fn wrk(url: &str, connections: u32, duration: u64) -> Result<Load> {
    let script = std::env::temp_dir().join("hearth-bench-headers.lua");
    std::fs::write(
        &script,
        format!(
            "wrk.method = \"GET\"\n\
             wrk.headers[\"x-open-runtimes-secret\"] = \"{SECRET}\"\n\
             wrk.headers[\"x-open-runtimes-timeout\"] = \"15\"\n\
             wrk.headers[\"x-open-runtimes-logging\"] = \"enabled\"\n"
        ),
    )?;
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

async fn bench_runtime(rt: RuntimeImage, args: &Args, network: &str) -> Result<Value> {
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
    let url = format!("{}/", server.url);
    // Warm up the function (first load) and the connection path.
    wrk(&url, 4, 1)?;
    let one = wrk(&url, 1, args.duration)?;
    let many = wrk(&url, 32, args.duration)?;

    println!(
        "{:<22} hello 1 conn: p50 {:.3} ms p99 {:.3} ms {:>6.0} req/s | 32 conn: p50 {:.3} ms p99 {:.3} ms {:>6.0} req/s | start→healthy p50 {:.0} ms max {:.0} ms (docker start call alone p50 {:.0} ms)",
        rt.image,
        one.p50_ms,
        one.p99_ms,
        one.rps,
        many.p50_ms,
        many.p99_ms,
        many.rps,
        percentile(&starts, 50.0),
        percentile(&starts, 100.0),
        percentile(&docker_starts, 50.0),
    );
    Ok(json!({
        "image": rt.image,
        "hello_c1": {"p50_ms": one.p50_ms, "p99_ms": one.p99_ms, "rps": one.rps},
        "hello_c32": {"p50_ms": many.p50_ms, "p99_ms": many.p99_ms, "rps": many.rps},
        "start_to_healthy_ms": {"p50": percentile(&starts, 50.0), "max": percentile(&starts, 100.0), "samples": starts},
        "docker_start_call_ms": {"p50": percentile(&docker_starts, 50.0), "samples": docker_starts},
    }))
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
    let mut results = Vec::new();
    for rt in &args.runtimes {
        results.push(bench_runtime(*rt, &args, &network.name).await?);
    }
    let out_dir = runtime::repo_root().join("target").join("bench");
    std::fs::create_dir_all(&out_dir)?;
    let path = out_dir.join("results.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&json!({"runtimes": results}))?,
    )?;
    println!("JSON: {}", path.display());
    Ok(())
}
