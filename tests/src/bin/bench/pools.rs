//! Cold starts with and without warm pools, per runtime image, in one run: the executor image as
//! a container on the bench network (as in the executor bench), each sample the first execution
//! of a new function (a new runtime id) measured end to end by the client:
//! - pool: the executor with `OPR_EXECUTOR_IMAGES=<image>`; before each sample the pool is back
//!   to a ready member, so each first execution is a take + specialise;
//! - no pool: the executor with `OPR_EXECUTOR_POOL=false` (a container started on the request
//!   path);
//! - raw Docker: create + start + first 200 on `/__opr/health` for the same image and archive.
//!
//! The samples go into the JSON; [`chart`] plots them with `tests/bench/plot_cold_starts.py`.

use super::executor_bench::{
    example_params, execute_ms, stage_example, start_executor, ExecutorContainer, Staged,
    EXECUTOR_SECRET,
};
use super::*;

/// Pool members kept ready during the pooled samples.
pub(super) const POOL_MIN: &str = "2";

/// Waits until the executor's pool for `image` has a ready member and nothing being created,
/// so a sample measures a take + specialise and not a refill competing with it.
pub(super) async fn wait_pool_settled(
    client: &reqwest::Client,
    executor: &ExecutorContainer,
    image: &str,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let label = format!("image=\"{image}\"");
    loop {
        let text = client
            .get(format!("{}/metrics", executor.url))
            .bearer_auth(EXECUTOR_SECRET)
            .send()
            .await?
            .text()
            .await?;
        let value = |family: &str| -> f64 {
            text.lines()
                .filter(|l| l.starts_with(family) && l.contains(&label))
                .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
                .sum()
        };
        let min: f64 = POOL_MIN.parse().unwrap_or(1.0);
        if value("hearth_pool_idle{") >= min && value("hearth_pool_starting{") == 0.0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the pool of {image} did not fill: {text}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn summary(samples: &mut [f64]) -> Value {
    samples.sort_by(f64::total_cmp);
    json!({
        "p50_ms": percentile(samples, 50.0),
        "p90_ms": percentile(samples, 90.0),
        "max_ms": percentile(samples, 100.0),
        "samples_ms": samples,
    })
}

async fn bench_image(rt: RuntimeImage, args: &Args, network: &str) -> Result<Value> {
    let docker = connect().await?;
    let Staged {
        storage,
        runtimes,
        built,
        _dir,
    } = stage_example(&docker, rt).await?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()?;
    let params = example_params(rt);

    let mut pooled = Vec::new();
    {
        let executor = start_executor(
            network,
            &storage,
            &runtimes,
            &format!("pool-{}", rt.name),
            &[
                ("OPR_EXECUTOR_POOL", "true"),
                ("OPR_EXECUTOR_IMAGES", rt.image),
                ("OPR_EXECUTOR_POOL_MIN", POOL_MIN),
            ],
        )
        .await?;
        for i in 0..args.starts {
            wait_pool_settled(&client, &executor, rt.image).await?;
            pooled.push(execute_ms(&client, &executor.url, &format!("pooled-{i}"), &params).await?);
        }
    }
    let mut fresh = Vec::new();
    {
        let executor = start_executor(
            network,
            &storage,
            &runtimes,
            &format!("fresh-{}", rt.name),
            &[("OPR_EXECUTOR_POOL", "false")],
        )
        .await?;
        for i in 0..args.starts {
            fresh.push(execute_ms(&client, &executor.url, &format!("fresh-{i}"), &params).await?);
        }
    }
    let (mut raw, _) = raw_docker_starts(&docker, rt, &built.archive, network, args.starts).await?;
    let (pool, no_pool, docker_raw) =
        (summary(&mut pooled), summary(&mut fresh), summary(&mut raw));
    let ratio = no_pool["p50_ms"].as_f64().unwrap_or(f64::NAN)
        / docker_raw["p50_ms"].as_f64().unwrap_or(f64::NAN);
    println!(
        "pools ({:<6})          first execution p50/p90: pool {:.1}/{:.1} ms | no pool {:.0}/{:.0} ms | raw docker {:.0}/{:.0} ms | no pool / raw {:.2}",
        rt.name,
        pool["p50_ms"].as_f64().unwrap_or(f64::NAN),
        pool["p90_ms"].as_f64().unwrap_or(f64::NAN),
        no_pool["p50_ms"].as_f64().unwrap_or(f64::NAN),
        no_pool["p90_ms"].as_f64().unwrap_or(f64::NAN),
        docker_raw["p50_ms"].as_f64().unwrap_or(f64::NAN),
        docker_raw["p90_ms"].as_f64().unwrap_or(f64::NAN),
        ratio
    );
    Ok(json!({
        "image": rt.image,
        "pool": pool,
        "no_pool": no_pool,
        "raw_docker": docker_raw,
        "no_pool_over_raw": ratio,
    }))
}

pub async fn run(args: &Args, network: &str) -> Result<Value> {
    let mut out = serde_json::Map::new();
    for rt in &args.runtimes {
        out.insert(rt.name.to_string(), bench_image(*rt, args, network).await?);
    }
    Ok(Value::Object(out))
}

/// Plots the cold-start distributions of `results` (the bench's JSON) next to it, as PNG.
pub fn chart(results: &std::path::Path) {
    let script = runtime::repo_root().join("tests/bench/plot_cold_starts.py");
    let png = results.with_file_name("cold-starts.png");
    match Command::new("python3")
        .arg(&script)
        .arg(results)
        .arg(&png)
        .status()
    {
        Ok(status) if status.success() => println!("chart: {}", png.display()),
        Ok(_) | Err(_) => {
            println!("chart: not drawn (python3 with matplotlib needed: pip install matplotlib)")
        }
    }
}
