//! Warm pools end to end: a real executor with pools on, real containers of the runtime images,
//! first executions served by prestarted generic containers specialised over the pool protocol
//! (`runtimes/pool-protocol.md`). Needs Docker and the images from `make images`.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use hearth_tests::executor::{json_reply, Options, TestExecutor};
use hearth_tests::runtime::{example_dir, fixture_dir, PYTHON, WASM};
use serde_json::{json, Value};

const NODE: &str = "hearth/node:v5-18";

/// An execution of the executor fixture's `identity` action, parsed.
async fn identity(ex: &TestExecutor, runtime_id: &str, params: Value) -> Result<Value> {
    let res = ex
        .post(&format!("/v1/runtimes/{runtime_id}/executions"))
        .header("accept", "application/json")
        .json(&params)
        .send()
        .await?;
    let (status, reply) = json_reply(res).await?;
    ensure!(status == 200, "execution answered {status}: {reply}");
    ensure!(reply["statusCode"] == 200, "function answered: {reply}");
    serde_json::from_str(reply["body"].as_str().unwrap_or_default())
        .with_context(|| format!("body of {reply}"))
}

fn params(source: &str, extra: Value) -> Value {
    let mut base = json!({
        "image": NODE,
        "source": source,
        "entrypoint": "index.js",
        "headers": {"x-action": "identity"},
        "timeout": 30,
    });
    if let (Some(base), Some(extra)) = (base.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            base.insert(k.clone(), v.clone());
        }
    }
    base
}

/// Whether `hostname` (a container's short id) is one of `ids`.
fn is_one_of(hostname: &str, ids: &[String]) -> bool {
    !hostname.is_empty() && ids.iter().any(|id| id.starts_with(hostname))
}

#[tokio::test]
async fn pools_first_execution_uses_a_prestarted_container_and_refills() -> Result<()> {
    let ex = TestExecutor::start(Options::named("pool-first").pooled(&[NODE], 1)).await?;
    let source = ex.stage_source(&fixture_dir("executor"), "fixture")?;
    ex.wait_pool(NODE, 1.0, Duration::from_secs(60)).await?;
    let before = ex.containers();
    ensure!(before.len() == 1, "one pool member: {before:?}");

    let got = identity(&ex, "first", params(&source, json!({}))).await?;
    ensure!(
        is_one_of(got["hostname"].as_str().unwrap_or_default(), &before),
        "served by {} which was not prestarted ({before:?})",
        got["hostname"]
    );
    ensure!(got["poolSecretVisible"] == false, "{got}");
    ensure!(
        ex.metric_sum("hearth_pool_takes_total", "hit").await? == 1.0,
        "not a pool hit"
    );
    // Same limits as a fresh runtime of the default shape (1 cpu, 512 MB).
    ensure!(got["cpus"] == "1" && got["memory"] == "512", "{got}");
    ensure!(
        got["memoryLimit"].as_str() == Some("536870912"),
        "memory limit {}",
        got["memoryLimit"]
    );
    ensure!(
        got["cpuQuota"]
            .as_str()
            .unwrap_or_default()
            .starts_with("100000"),
        "cpu quota {}",
        got["cpuQuota"]
    );
    // Warm from now on: the same container again.
    let again = identity(&ex, "first", params(&source, json!({}))).await?;
    ensure!(again["hostname"] == got["hostname"], "{again}");

    // The pool refills in the background with new members (its minimum, plus one for the
    // last minute's demand).
    ex.wait_pool(NODE, 2.0, Duration::from_secs(60)).await?;
    let after = ex.containers();
    ensure!(
        after.len() == 3 && after.iter().filter(|id| !before.contains(id)).count() == 2,
        "runtime + two new members: {after:?} (before {before:?})"
    );

    // Another shape is another pool: the first call misses (fresh start), the demand grows
    // that pool, and the next function of that shape is served from it with its limits.
    let small = json!({"cpus": 0.5, "memory": 256});
    let miss = identity(&ex, "small-1", params(&source, small.clone())).await?;
    ensure!(miss["memory"] == "256", "{miss}");
    let key = "memory=\"256\"";
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while ex.metric_sum("hearth_pool_idle", key).await? < 1.0 {
        ensure!(
            std::time::Instant::now() < deadline,
            "the 256 MB pool did not grow"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let prestarted = ex.containers();
    let hit = identity(&ex, "small-2", params(&source, small)).await?;
    ensure!(
        is_one_of(hit["hostname"].as_str().unwrap_or_default(), &prestarted),
        "{hit}"
    );
    ensure!(
        hit["memoryLimit"].as_str() == Some("268435456"),
        "memory limit after specialisation: {}",
        hit["memoryLimit"]
    );
    ensure!(
        hit["cpuQuota"]
            .as_str()
            .unwrap_or_default()
            .starts_with("50000"),
        "cpu quota after specialisation: {}",
        hit["cpuQuota"]
    );
    Ok(())
}

#[tokio::test]
async fn pools_burst_of_twenty_functions_with_their_own_env_and_secrets() -> Result<()> {
    let ex = TestExecutor::start(Options::named("pool-burst").pooled(&[NODE], 4)).await?;
    let source = ex.stage_source(&fixture_dir("executor"), "fixture")?;
    ex.wait_pool(NODE, 4.0, Duration::from_secs(90)).await?;
    let calls = (0..20).map(|i| {
        let ex = &ex;
        let p = params(
            &source,
            json!({"variables": {"CUSTOM_VAR": format!("fn-{i}")}}),
        );
        async move { identity(ex, &format!("burst-{i}"), p).await }
    });
    let replies = futures_util::future::join_all(calls).await;
    let mut secrets = HashSet::new();
    let mut hosts = HashSet::new();
    for (i, reply) in replies.into_iter().enumerate() {
        let reply = reply.with_context(|| format!("function {i}"))?;
        ensure!(
            reply["custom"] == format!("fn-{i}"),
            "function {i}: {reply}"
        );
        ensure!(reply["poolSecretVisible"] == false, "{reply}");
        secrets.insert(reply["secret"].as_str().unwrap_or_default().to_string());
        hosts.insert(reply["hostname"].as_str().unwrap_or_default().to_string());
    }
    ensure!(secrets.len() == 20, "secrets are not per function");
    ensure!(hosts.len() == 20, "functions shared a container");
    ensure!(
        ex.metric_sum("hearth_pool_takes_total", "hit").await? >= 4.0,
        "the prestarted members were not used"
    );
    Ok(())
}

#[tokio::test]
async fn pools_python_and_wasm_are_served_from_their_pools() -> Result<()> {
    let ex =
        TestExecutor::start(Options::named("pool-langs").pooled(&[PYTHON.image, WASM.image], 1))
            .await?;
    for image in [PYTHON, WASM] {
        ex.wait_pool(image.image, 1.0, Duration::from_secs(60))
            .await?;
    }
    for image in [PYTHON, WASM] {
        let source = ex.stage_source(&example_dir(&image), &format!("hello-{}", image.name))?;
        let hits = ex.metric_sum("hearth_pool_takes_total", "hit").await?;
        let res = ex
            .post(&format!("/v1/runtimes/hello-{}/executions", image.name))
            .header("accept", "application/json")
            .json(&json!({
                "image": image.image,
                "source": source,
                "entrypoint": image.example_entry,
            }))
            .send()
            .await?;
        let (status, reply) = json_reply(res).await?;
        ensure!(
            status == 200 && reply["statusCode"] == 200,
            "{}: {reply}",
            image.name
        );
        ensure!(
            !reply["body"].as_str().unwrap_or_default().is_empty(),
            "{}: {reply}",
            image.name
        );
        ensure!(
            ex.metric_sum("hearth_pool_takes_total", "hit").await? == hits + 1.0,
            "{} was not served from its pool",
            image.name
        );
    }
    Ok(())
}

#[tokio::test]
async fn pools_keep_warm_ttl_and_pin() -> Result<()> {
    let mut options = Options::named("keep-warm");
    options.inactive_threshold = 1;
    options.maintenance_interval = 1;
    let ex = TestExecutor::start(options).await?;
    let source = ex.stage_source(&fixture_dir("executor"), "fixture")?;
    identity(&ex, "default", params(&source, json!({}))).await?;
    identity(&ex, "pinned", params(&source, json!({"keepWarm": 1}))).await?;
    identity(
        &ex,
        "long-ttl",
        params(&source, json!({"idleTimeout": 600})),
    )
    .await?;
    // Bad keep-warm values are refused with a reason.
    let res = ex
        .post("/v1/runtimes/bad/executions")
        .json(&params(&source, json!({"keepWarm": 3})))
        .send()
        .await?;
    let (status, body) = json_reply(res).await?;
    ensure!(
        status == 400
            && body["message"]
                .as_str()
                .unwrap_or_default()
                .contains("keepWarm"),
        "{status} {body}"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let ids: Vec<String> = ex.executor.list().into_iter().map(|r| r.name).collect();
        if !ids.iter().any(|n| n.ends_with("-default")) {
            ensure!(
                ids.iter().any(|n| n.ends_with("-pinned"))
                    && ids.iter().any(|n| n.ends_with("-long-ttl")),
                "keep-warm runtimes were reaped: {ids:?}"
            );
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "the default runtime was never reaped"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

#[tokio::test]
async fn pools_are_removed_when_the_executor_stops() -> Result<()> {
    let mut ex = TestExecutor::start(Options::named("pool-stop").pooled(&[NODE], 2)).await?;
    ex.wait_pool(NODE, 2.0, Duration::from_secs(60)).await?;
    ensure!(ex.containers().len() == 2);
    ex.stop_serving().await;
    let left = ex.containers();
    ensure!(
        left.is_empty(),
        "idle members outlived the executor: {left:?}"
    );
    Ok(())
}
