//! The Swarm adapter next to the Docker adapter, in one run, for the Node hello: the executor
//! image as a container, once with `OPR_EXECUTOR_ADAPTER=docker` (runtimes are containers on the
//! bench bridge network) and once with `OPR_EXECUTOR_ADAPTER=swarm` (runtimes are one-replica
//! services on an attachable overlay network the bench creates; the executor joins it besides the
//! bench network the client reaches it on). For each:
//! - cold start without a pool: the first execution of a new function, end to end (a container
//!   or a service started on the request path);
//! - cold start with a pool (`OPR_EXECUTOR_IMAGES`, the pool back to its ready members before
//!   each sample, as in `bench/pools.rs`);
//! - warm: the same hello through the executor at 1 and 32 connections (wrk), and the overhead
//!   it adds over the runtime called directly (a runtime on the bench network).
//!
//! The engine is made a single-node swarm if it is in none, and left again at the end.

use super::executor_bench::{
    example_params, execute_ms, stage_example, start_executor_for, ExecutorContainer, Staged,
    EXECUTOR_SECRET,
};
use super::*;
use hearth_tests::swarm::{docker, Cleanup};

/// Removes the bench's network (once the services' tasks are down), then leaves the swarm when
/// the bench made the engine one.
struct SwarmGuard {
    network: String,
    cleanup: Option<Cleanup>,
    joined: bool,
}

impl Drop for SwarmGuard {
    fn drop(&mut self) {
        drop(self.cleanup.take());
        if self.joined {
            let _ = docker(&["swarm", "leave", "--force"]);
        }
    }
}

fn setup() -> Result<SwarmGuard> {
    let state = docker(&["info", "--format", "{{.Swarm.LocalNodeState}}"])?;
    let joined = state != "active";
    if joined {
        docker(&["swarm", "init", "--advertise-addr", "127.0.0.1"])?;
    }
    let network = format!("hearth-bench-swarm-{}", std::process::id());
    let mut cleanup = Cleanup::default();
    cleanup.networks.push(network.clone());
    let guard = SwarmGuard {
        network: network.clone(),
        cleanup: Some(cleanup),
        joined,
    };
    docker(&[
        "network",
        "create",
        "--driver",
        "overlay",
        "--attachable",
        "--label",
        "hearth.test=1",
        &network,
    ])?;
    Ok(guard)
}

/// One adapter's numbers.
async fn bench_adapter(
    adapter: &str,
    args: &Args,
    network: &str,
    runtimes_network: &str,
    staged: &Staged,
    direct_url: &str,
) -> Result<Value> {
    let rt = runtime::NODE;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()?;
    let params = example_params(rt);
    let start = |tag: String, pool: bool| {
        let pool_env: Vec<(&str, &str)> = if pool {
            vec![
                ("OPR_EXECUTOR_POOL", "true"),
                ("OPR_EXECUTOR_IMAGES", rt.image),
                ("OPR_EXECUTOR_POOL_MIN", super::pools::POOL_MIN),
            ]
        } else {
            vec![("OPR_EXECUTOR_POOL", "false")]
        };
        let mut env = vec![("OPR_EXECUTOR_ADAPTER", adapter)];
        env.extend(pool_env);
        async move {
            start_executor_for(
                network,
                runtimes_network,
                &staged.storage,
                &staged.runtimes,
                &tag,
                &env,
            )
            .await
        }
    };

    // Without a pool: cold starts, then warm calls of the last one.
    let executor: ExecutorContainer = start(format!("{adapter}-fresh"), false).await?;
    let mut cold = Vec::new();
    for i in 0..args.starts {
        let id = format!("{adapter}-cold-{i}");
        cold.push(execute_ms(&client, &executor.url, &id, &params).await?);
    }
    let lua = execution_lua(EXECUTOR_SECRET);
    let through_url = format!(
        "{}/v1/runtimes/{adapter}-cold-{}/executions",
        executor.url,
        args.starts.saturating_sub(1)
    );
    wrk_with(&through_url, 4, 1, &lua)?;
    wrk(direct_url, 1, 1)?;
    let direct_1 = wrk(direct_url, 1, args.duration)?;
    let through_1 = wrk_with(&through_url, 1, args.duration, &lua)?;
    let through_32 = wrk_with(&through_url, 32, args.duration, &lua)?;
    drop(executor);

    // With a pool.
    let executor = start(format!("{adapter}-pool"), true).await?;
    let mut pooled = Vec::new();
    for i in 0..args.starts {
        super::pools::wait_pool_settled(&client, &executor, rt.image).await?;
        let id = format!("{adapter}-pooled-{i}");
        pooled.push(execute_ms(&client, &executor.url, &id, &params).await?);
    }
    drop(executor);

    for v in [&mut cold, &mut pooled] {
        v.sort_by(f64::total_cmp);
    }
    let added_p50 = through_1.p50_ms - direct_1.p50_ms;
    println!(
        "swarm vs docker ({adapter:<6}) cold start p50/max: no pool {:.0}/{:.0} ms | pool {:.1}/{:.1} ms | warm 1 conn p50 {:.3} ms (direct {:.3}, added {:.3}) p99 {:.3} ms | 32 conn {:.0} req/s",
        percentile(&cold, 50.0),
        percentile(&cold, 100.0),
        percentile(&pooled, 50.0),
        percentile(&pooled, 100.0),
        through_1.p50_ms,
        direct_1.p50_ms,
        added_p50,
        through_1.p99_ms,
        through_32.rps,
    );
    Ok(json!({
        "cold_no_pool_ms": {"p50": percentile(&cold, 50.0), "max": percentile(&cold, 100.0), "samples": cold},
        "cold_pool_ms": {"p50": percentile(&pooled, 50.0), "max": percentile(&pooled, 100.0), "samples": pooled},
        "warm_c1": {"through_p50_ms": through_1.p50_ms, "through_p99_ms": through_1.p99_ms,
            "direct_p50_ms": direct_1.p50_ms, "direct_p99_ms": direct_1.p99_ms, "added_p50_ms": added_p50},
        "warm_c32": {"through_rps": through_32.rps},
    }))
}

pub async fn run(args: &Args, network: &str) -> Result<Value> {
    let rt = runtime::NODE;
    let docker = connect().await?;
    let staged = stage_example(&docker, rt).await?;
    let guard = setup()?;
    // The reference: a runtime called directly on the bench network.
    let direct = Server::start(
        &docker,
        rt.image,
        &staged.built.archive,
        &server_options(rt, network),
    )
    .await?;
    let direct_url = format!("{}/", direct.url);
    let on_docker = bench_adapter("docker", args, network, network, &staged, &direct_url).await?;
    let on_swarm =
        bench_adapter("swarm", args, network, &guard.network, &staged, &direct_url).await?;
    drop(direct);
    drop(guard);
    Ok(json!({"image": rt.image, "docker": on_docker, "swarm": on_swarm}))
}
