//! End-to-end tests of the balancer: the real `hearth-balancer` served on 127.0.0.1 in front of
//! three real executors (Docker, `hearth/node:v5-18`), called as a platform calls it; and its
//! failure cases (bad input, limits, slow clients, executors down) against fake executors, which
//! need no Docker.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use futures_util::future::join_all;
use hearth_tests::balancer::{Fake, FakeExecutor, TestBalancer};
use hearth_tests::executor::{json_reply, Options, TempDir, TestExecutor, SECRET};
use hearth_tests::runtime::fixture_dir;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const NODE: &str = "hearth/node:v5-18";
const FUNCTIONS: usize = 30;
const ROUNDS: usize = 20;

fn client() -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()?)
}

async fn execute(client: &reqwest::Client, url: &str, id: &str, source: &str) -> Result<Value> {
    let res = client
        .post(format!("{url}/v1/runtimes/{id}/executions"))
        .bearer_auth(SECRET)
        .header("accept", "application/json")
        .header("x-opr-addressing-method", "anycast-efficient")
        .json(&json!({
            "image": NODE,
            "source": source,
            "entrypoint": "index.js",
            "headers": {"x-action": "echo"},
            "body": id,
            "timeout": 60,
        }))
        .send()
        .await?;
    let (status, body) = json_reply(res).await?;
    ensure!(status == 200, "execution of {id} answered {status}: {body}");
    ensure!(body["statusCode"] == 200, "{id}: {body}");
    Ok(body)
}

/// Runs `ids` through the balancer, `parallel` at a time.
async fn execute_all(
    client: &reqwest::Client,
    url: &str,
    ids: &[String],
    source: &str,
    parallel: usize,
) -> Result<()> {
    for chunk in ids.chunks(parallel) {
        let calls = chunk.iter().map(|id| execute(client, url, id, source));
        for result in join_all(calls).await {
            result?;
        }
    }
    Ok(())
}

async fn cold_starts(executors: &[&TestExecutor]) -> Result<f64> {
    let mut total = 0.0;
    for ex in executors {
        total += ex.metric("hearth_cold_starts_total").await?;
    }
    Ok(total)
}

async fn list(client: &reqwest::Client, url: &str) -> Result<Vec<Value>> {
    let res = client
        .get(format!("{url}/v1/runtimes"))
        .bearer_auth(SECRET)
        .send()
        .await?;
    let (status, body) = json_reply(res).await?;
    ensure!(status == 200, "list answered {status}: {body}");
    body.as_array().cloned().context("list is not an array")
}

/// The runtime ids an executor holds (names are `<executor name>-<runtimeId>`).
async fn held(ex: &TestExecutor) -> Result<Vec<String>> {
    let (_, body) = json_reply(ex.get("/v1/runtimes").send().await?).await?;
    let prefix = format!("{}-", ex.name);
    Ok(body
        .as_array()
        .context("list is not an array")?
        .iter()
        .filter_map(|r| {
            r["name"]
                .as_str()?
                .strip_prefix(&prefix)
                .map(str::to_string)
        })
        .collect())
}

#[tokio::test]
async fn balancer_three_executors_warm_affinity_failover() -> Result<()> {
    let storage = TempDir::new("hearth-balancer-storage")?;
    let options: Vec<Options> = (0..3)
        .map(|i| Options {
            storage: Some(storage.0.clone()),
            ..Options::named(&format!("lb{i}"))
        })
        .collect();
    let mut executors = Vec::new();
    for o in &options {
        executors.push(Some(TestExecutor::start(o.clone()).await?));
    }
    let ex = |i: usize, all: &[Option<TestExecutor>]| -> Result<String> {
        Ok(all[i].as_ref().context("executor stopped")?.url.clone())
    };
    let urls = vec![ex(0, &executors)?, ex(1, &executors)?, ex(2, &executors)?];
    let source = executors[0]
        .as_ref()
        .context("executor 0")?
        .stage_source(&fixture_dir("executor"), "fixture")?;
    let lb = TestBalancer::start(urls.clone(), SECRET, |_| {}).await?;
    lb.wait_healthy(3, Duration::from_secs(5)).await?;
    let client = client()?;
    let ids: Vec<String> = (0..FUNCTIONS).map(|i| format!("fn-{i}")).collect();

    // Warm-up: each function's first call cold-starts it on its home.
    execute_all(&client, &lb.url, &ids, &source, 6).await?;
    let refs: Vec<&TestExecutor> = executors.iter().flatten().collect();
    let before = cold_starts(&refs).await?;
    ensure!(
        before == FUNCTIONS as f64,
        "{before} cold starts for {FUNCTIONS} functions"
    );
    let mut per_executor = Vec::new();
    for e in &refs {
        per_executor.push(held(e).await?);
    }
    let counts: Vec<usize> = per_executor.iter().map(Vec::len).collect();
    ensure!(
        counts.iter().all(|&n| n > 0),
        "spread over all executors: {counts:?}"
    );

    // 20 rounds: every call reaches a warm runtime (≥ 99 %).
    let mut repeated = Vec::new();
    for _ in 0..ROUNDS {
        repeated.extend(ids.iter().cloned());
    }
    execute_all(&client, &lb.url, &repeated, &source, 10).await?;
    let cold = cold_starts(&refs).await? - before;
    let calls = (FUNCTIONS * ROUNDS) as f64;
    let warm_ratio = (calls - cold) / calls;
    eprintln!("balancer: {calls} calls, {cold} cold starts, warm ratio {warm_ratio:.4}, spread {counts:?}");
    ensure!(
        warm_ratio >= 0.99,
        "warm ratio {warm_ratio} ({cold} cold starts)"
    );

    // The list merges all executors'.
    let merged = list(&client, &lb.url).await?;
    ensure!(
        merged.len() == FUNCTIONS,
        "merged list has {}",
        merged.len()
    );

    // Delete finds its runtime wherever it is; broadcast delete too; a missing one is 404.
    let victim = &per_executor[2][0];
    let res = client
        .delete(format!("{}/v1/runtimes/{victim}", lb.url))
        .bearer_auth(SECRET)
        .send()
        .await?;
    ensure!(res.status() == 200, "delete {victim}: {}", res.status());
    ensure!(
        !held(refs[2]).await?.contains(victim),
        "{victim} still on its executor"
    );
    let victim = &per_executor[1][0];
    let res = client
        .delete(format!("{}/v1/runtimes/{victim}", lb.url))
        .bearer_auth(SECRET)
        .header("x-opr-addressing-method", "broadcast")
        .send()
        .await?;
    ensure!(res.status() == 200, "broadcast delete: {}", res.status());
    let res = client
        .get(format!("{}/v1/runtimes/{victim}", lb.url))
        .bearer_auth(SECRET)
        .send()
        .await?;
    ensure!(
        res.status() == 404,
        "deleted runtime answered {}",
        res.status()
    );
    let res = client
        .delete(format!("{}/v1/runtimes/never-made", lb.url))
        .bearer_auth(SECRET)
        .send()
        .await?;
    ensure!(res.status() == 404, "missing delete: {}", res.status());
    ensure!(
        list(&client, &lb.url).await?.len() == FUNCTIONS - 2,
        "list after deletes"
    );
    // Auth is the executors': the client's header is forwarded unchanged.
    let res = client
        .get(format!("{}/v1/runtimes", lb.url))
        .bearer_auth("wrong")
        .send()
        .await?;
    ensure!(
        res.status() == 401,
        "wrong key through the balancer: {}",
        res.status()
    );

    // Executor 1 dies: its functions cold-start elsewhere and succeed; the others stay warm.
    let on_dead: Vec<String> = held(refs[1]).await?;
    drop(refs);
    executors[1]
        .as_mut()
        .context("executor 1")?
        .stop_serving()
        .await;
    let live: Vec<&TestExecutor> = [&executors[0], &executors[2]]
        .into_iter()
        .flatten()
        .collect();
    let before = cold_starts(&live).await?;
    execute_all(&client, &lb.url, &ids, &source, 6).await?;
    let cold = cold_starts(&live).await? - before;
    // Deleted ones come back too.
    let expected = on_dead.len() + 2;
    ensure!(
        cold as usize <= expected,
        "{cold} cold starts after the failure, want at most {expected}"
    );
    ensure!(
        lb.metric("hearth_balancer_ejections_total").unwrap_or(0.0) >= 1.0,
        "no ejection"
    );
    ensure!(
        lb.balancer.pool.available().len() == 2,
        "dead executor still in rotation"
    );

    // It comes back (a new process adopting its runtimes, on a new port): back in rotation.
    let revived = TestExecutor::start(options[1].clone()).await?;
    let revived_url = revived.url.clone();
    lb.balancer
        .set_executors(&[urls[0].clone(), revived_url, urls[2].clone()])
        .await?;
    lb.wait_healthy(3, Duration::from_secs(5)).await?;
    let merged = list(&client, &lb.url).await?;
    ensure!(
        merged.len() >= FUNCTIONS,
        "list after revival: {}",
        merged.len()
    );
    execute_all(&client, &lb.url, &ids, &source, 6).await?;
    drop(revived);
    drop(executors);
    Ok(())
}

/// A request to the balancer on a raw connection; returns what came back before it closed.
async fn raw(url: &str, request: &[u8], wait: Duration) -> Result<String> {
    let addr = url.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.write_all(request).await?;
    let mut out = Vec::new();
    tokio::time::timeout(wait, stream.read_to_end(&mut out))
        .await
        .context("the balancer kept the connection open")??;
    Ok(String::from_utf8_lossy(&out).to_string())
}

fn error_of(body: &Value, status: u16, kind: &str) -> Result<()> {
    ensure!(
        body["type"] == kind,
        "type {} (want {kind}): {body}",
        body["type"]
    );
    ensure!(body["code"] == status, "{body}");
    ensure!(
        body["message"].is_string() && body["version"].is_string(),
        "{body}"
    );
    Ok(())
}

#[tokio::test]
async fn balancer_bad_input_limits_and_unhealthy_executors() -> Result<()> {
    let healthy = FakeExecutor::start(Fake::Healthy, "127.0.0.1:0").await?;
    let lb = TestBalancer::start(vec![healthy.url()], SECRET, |c| {
        c.max_body = 1024 * 1024;
    })
    .await?;
    lb.wait_healthy(1, Duration::from_secs(5)).await?;
    let client = client()?;

    let res = client.get(format!("{}/v1/health", lb.url)).send().await?;
    ensure!(res.status() == 200 && res.text().await? == "OK", "health");
    // Unknown routes are answered by the balancer in the executor's shape.
    for (method, path) in [
        ("GET", "/v1/nope"),
        ("PUT", "/v1/runtimes"),
        ("GET", "/v1/runtimes/a/b"),
    ] {
        let res = client
            .request(method.parse()?, format!("{}{path}", lb.url))
            .bearer_auth(SECRET)
            .send()
            .await?;
        let (status, body) = json_reply(res).await?;
        ensure!(status == 404, "{method} {path}: {status}");
        error_of(&body, 404, "general_route_not_found")?;
    }
    // Oversized bodies: refused from the Content-Length, before any executor sees them.
    let res = client
        .post(format!("{}/v1/runtimes/x/executions", lb.url))
        .bearer_auth(SECRET)
        .body(vec![b'a'; 2 * 1024 * 1024])
        .send()
        .await?;
    let (status, body) = json_reply(res).await?;
    ensure!(status == 413, "oversized: {status} {body}");
    error_of(&body, 413, "execution_bad_request")?;
    // Metrics need the key.
    let res = client.get(format!("{}/metrics", lb.url)).send().await?;
    ensure!(res.status() == 401, "metrics without key: {}", res.status());
    let text = client
        .get(format!("{}/metrics", lb.url))
        .bearer_auth(SECRET)
        .send()
        .await?
        .text()
        .await?;
    ensure!(
        text.contains("hearth_balancer_upstream_seconds_count"),
        "{text}"
    );

    // Slow clients: silent, or headers never finished → cut off after the 1 s header timeout.
    let started = std::time::Instant::now();
    raw(&lb.url, b"", Duration::from_secs(5)).await?;
    raw(
        &lb.url,
        b"GET /v1/health HTTP/1.1\r\nHost: x\r\n",
        Duration::from_secs(5),
    )
    .await?;
    // A body that stops coming: cut off after the 2 s body idle timeout with a clear error.
    let head = "POST /v1/runtimes HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"runtimeId\"";
    let reply = raw(&lb.url, head.as_bytes(), Duration::from_secs(8)).await?;
    ensure!(reply.starts_with("HTTP/1.1 400"), "stalled body: {reply}");
    ensure!(
        started.elapsed() < Duration::from_secs(12),
        "slow clients took {:?}",
        started.elapsed()
    );

    // An executor that dies mid-request: that request fails with a clear 502, not retried.
    let crashing = FakeExecutor::start(Fake::DropsCalls, "127.0.0.1:0").await?;
    lb.balancer.set_executors(&[crashing.url()]).await?;
    lb.wait_healthy(1, Duration::from_secs(5)).await?;
    let res = client
        .get(format!("{}/v1/runtimes/x", lb.url))
        .bearer_auth(SECRET)
        .send()
        .await?;
    let (status, body) = json_reply(res).await?;
    ensure!(status == 502, "mid-request crash: {status} {body}");
    error_of(&body, 502, "balancer_upstream_failed")?;

    // Nothing healthy: 503 with the reason. Then it comes back on the same port: readmitted.
    let addr = healthy.addr;
    lb.balancer.set_executors(&[healthy.url()]).await?;
    lb.wait_healthy(1, Duration::from_secs(5)).await?;
    drop(healthy);
    let res = client
        .get(format!("{}/v1/runtimes/x", lb.url))
        .bearer_auth(SECRET)
        .send()
        .await?;
    let (status, body) = json_reply(res).await?;
    ensure!(status == 503, "executor down: {status} {body}");
    error_of(&body, 503, "balancer_unavailable")?;
    lb.wait_healthy(0, Duration::from_secs(5)).await?;
    let res = client
        .post(format!("{}/v1/runtimes/x/executions", lb.url))
        .bearer_auth(SECRET)
        .json(&json!({}))
        .send()
        .await?;
    let (status, body) = json_reply(res).await?;
    ensure!(status == 503, "none healthy: {status} {body}");
    error_of(&body, 503, "balancer_unavailable")?;
    ensure!(
        body["message"]
            .as_str()
            .unwrap_or("")
            .contains("failing health checks"),
        "{body}"
    );
    let res = client.get(format!("{}/v1/health", lb.url)).send().await?;
    ensure!(
        res.status() == 503,
        "health with none healthy: {}",
        res.status()
    );
    let back = FakeExecutor::start(Fake::Healthy, &addr.to_string()).await?;
    lb.wait_healthy(1, Duration::from_secs(5)).await?;
    ensure!(
        lb.metric("hearth_balancer_readmissions_total")
            .unwrap_or(0.0)
            >= 1.0,
        "not counted as a readmission"
    );
    let res = client.get(format!("{}/v1/health", lb.url)).send().await?;
    ensure!(
        res.status() == 200,
        "health after readmission: {}",
        res.status()
    );
    drop(back);
    drop(crashing);
    Ok(())
}
