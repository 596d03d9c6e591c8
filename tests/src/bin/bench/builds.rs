//! The build service's numbers (`--builds`, on by default), all real: RabbitMQ in a container, a
//! Python function in a git repository served by `git daemon` on 127.0.0.1, the release
//! `hearth-builds` binary, an in-process executor. In one run:
//! - queue overhead: submit → a worker has it running (the service's own timestamps), builds
//!   submitted one at a time so none waits behind another;
//! - a small Python function built from git end to end (submit → succeeded, seen by the client)
//!   vs its build command run directly in a container of the same image (`docker run` with the
//!   same archive and command the executor uses).

use std::time::Instant;

use super::*;
use hearth_tests::builds::{BuildsClient, BuildsProcess, GitServer, Rabbit, ServiceOptions};
use hearth_tests::executor::{Options, TempDir, TestExecutor, SECRET as EXECUTOR_SECRET};

const IMAGE: &str = "hearth/python:v5-3.11";
const RUNS: usize = 10;

pub async fn run() -> Result<Value> {
    let rabbit = Rabbit::start().await?;
    let git = GitServer::start().await?;
    git.repository(
        "py-fn",
        &[(
            &[
                (
                    "main.py",
                    "async def main(context):\n    return context.res.text('built from git')\n",
                ),
                ("requirements.txt", ""),
            ],
            None,
        )],
    )?;
    let ex = TestExecutor::start(Options::named("bench-builds")).await?;
    let state = TempDir::new("hearth-bench-builds")?;
    let options = ServiceOptions::new(&ex, &rabbit, "bench", &state.0);
    let service = BuildsProcess::start(&options, "all").await?;
    let api = BuildsClient::new(&service.url, EXECUTOR_SECRET);
    let request = json!({
        "source": {"type": "git", "url": git.git_url("py-fn"), "ref": "main"},
        "image": IMAGE,
        "entrypoint": "main.py",
        "command": "pip install -r requirements.txt",
    });

    let mut overhead = Vec::new();
    let mut end_to_end = Vec::new();
    let mut archive = String::new();
    for _ in 0..RUNS {
        let begun = Instant::now();
        let id = api.submit_id(&request).await?;
        let build = api.wait(&id, Duration::from_secs(300)).await?;
        end_to_end.push(begun.elapsed().as_secs_f64() * 1000.0);
        anyhow::ensure!(
            build["status"] == "succeeded",
            "bench build failed: {build}"
        );
        let queued = build["createdAt"].as_f64().unwrap_or_default();
        let started = build["startedAt"].as_f64().unwrap_or_default();
        overhead.push((started - queued) * 1000.0);
        archive = format!("{}/builds/{id}/source.tar.gz", ex.storage.display());
    }

    // The same build command, run straight in a container of the image with the same archive.
    let mut direct = Vec::new();
    let command = "tar -zxf /tmp/code.tar.gz -C /mnt/code && bash helpers/build.sh 'pip install -r requirements.txt'";
    for _ in 0..RUNS {
        let begun = Instant::now();
        let status = Command::new("docker")
            .args(["run", "--rm", "--label", "hearth.test=1", "-v"])
            .arg(format!("{archive}:/tmp/code.tar.gz:ro"))
            .args([IMAGE, "bash", "-c", command])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()?;
        anyhow::ensure!(status.success(), "direct build failed");
        direct.push(begun.elapsed().as_secs_f64() * 1000.0);
    }
    hearth_builds::queue::Broker::new(
        &rabbit.url(),
        hearth_builds::queue::Topology::new(&options.queue),
    )
    .delete_topology()
    .await?;

    for list in [&mut overhead, &mut end_to_end, &mut direct] {
        list.sort_by(f64::total_cmp);
    }
    let (o50, o99) = (percentile(&overhead, 50.0), percentile(&overhead, 99.0));
    let (e50, d50) = (percentile(&end_to_end, 50.0), percentile(&direct, 50.0));
    println!("builds: queue overhead (submit -> running) p50 {o50:.1} ms, p99 {o99:.1} ms ({RUNS} builds; target p50 <= 300 ms)");
    println!(
        "builds: python function from git, submit -> succeeded p50 {e50:.0} ms; its build command in `docker run` p50 {d50:.0} ms; difference {:.0} ms",
        e50 - d50
    );
    Ok(json!({
        "runs": RUNS,
        "queue_overhead_ms": {"p50": o50, "p99": o99},
        "git_build_ms": {"p50": e50, "p99": percentile(&end_to_end, 99.0)},
        "direct_build_ms": {"p50": d50, "p99": percentile(&direct, 99.0)},
    }))
}
