//! End-to-end tests of the executor: the real `hearth-executor` served on 127.0.0.1, real
//! containers of the runtime images, called over HTTP as a platform calls it. Needs Docker and
//! the images from `make images`. Every test's executor removes its containers when dropped.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use hearth_tests::executor::{json_reply, parse_multipart, Options, TestExecutor, SECRET};
use hearth_tests::runtime::{example_dir, fixture_dir};
use serde_json::{json, Value};

const NODE: &str = "hearth/node:v5-18";

/// Asserts the spec's error body.
fn error_shape(body: &Value, status: u16, kind: &str) -> Result<()> {
    ensure!(
        body["type"] == kind,
        "type {} (want {kind}): {body}",
        body["type"]
    );
    ensure!(body["code"] == status, "code {}: {body}", body["code"]);
    ensure!(body["message"].is_string(), "no message: {body}");
    ensure!(body["version"].is_string(), "no version: {body}");
    Ok(())
}

async fn expect_error(res: reqwest::Response, status: u16, kind: &str) -> Result<Value> {
    let (got, body) = json_reply(res).await?;
    ensure!(got == status, "status {got} (want {status}): {body}");
    error_shape(&body, status, kind)?;
    Ok(body)
}

/// An execution with a JSON reply.
async fn execute(ex: &TestExecutor, runtime_id: &str, params: Value) -> Result<Value> {
    let res = ex
        .post(&format!("/v1/runtimes/{runtime_id}/executions"))
        .header("accept", "application/json")
        .json(&params)
        .send()
        .await?;
    let (status, body) = json_reply(res).await?;
    ensure!(status == 200, "execution answered {status}: {body}");
    Ok(body)
}

/// Cold-start parameters for the executor fixture.
fn fixture_params(source: &str, action: &str) -> Value {
    json!({
        "image": NODE,
        "source": source,
        "entrypoint": "index.js",
        "headers": {"x-action": action},
        "timeout": 30,
    })
}

fn with(mut base: Value, extra: Value) -> Value {
    if let (Some(base), Some(extra)) = (base.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            base.insert(k.clone(), v.clone());
        }
    }
    base
}

#[tokio::test]
async fn executor_routes_auth_and_bad_input() -> Result<()> {
    let ex = TestExecutor::start(Options::named("routes")).await?;
    let res = ex
        .client
        .get(format!("{}/v1/health", ex.url))
        .send()
        .await?;
    ensure!(res.status() == 200 && res.text().await? == "OK", "health");

    let res = ex
        .client
        .get(format!("{}/v1/runtimes", ex.url))
        .send()
        .await?;
    let body = expect_error(res, 401, "general_unauthorized").await?;
    ensure!(body["message"] == "Missing executor key", "{body}");
    let res = ex
        .client
        .get(format!("{}/v1/runtimes", ex.url))
        .bearer_auth("wrong")
        .send()
        .await?;
    expect_error(res, 401, "general_unauthorized").await?;
    let res = ex
        .client
        .post(format!("{}/v1/runtimes/x/commands", ex.url))
        .json(&json!({"command": "id"}))
        .send()
        .await?;
    expect_error(res, 401, "general_unauthorized").await?;

    let body = expect_error(
        ex.get("/v1/nope").send().await?,
        404,
        "general_route_not_found",
    )
    .await?;
    ensure!(body["message"] == "Not Found", "{body}");
    expect_error(
        ex.client
            .put(format!("{}/v1/runtimes", ex.url))
            .bearer_auth(SECRET)
            .send()
            .await?,
        404,
        "general_route_not_found",
    )
    .await?;

    let (status, list) = json_reply(ex.get("/v1/runtimes").send().await?).await?;
    ensure!(status == 200 && list == json!([]), "empty list: {list}");
    expect_error(
        ex.get("/v1/runtimes/missing").send().await?,
        404,
        "runtime_not_found",
    )
    .await?;
    expect_error(
        ex.delete("/v1/runtimes/missing").send().await?,
        404,
        "runtime_not_found",
    )
    .await?;
    let body = expect_error(
        ex.post("/v1/runtimes/missing/executions")
            .json(&json!({}))
            .send()
            .await?,
        404,
        "runtime_not_found",
    )
    .await?;
    ensure!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("provide runtime-related parameters"),
        "{body}"
    );

    // Malformed and wrongly typed input.
    let res = ex
        .post("/v1/runtimes")
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await?;
    expect_error(res, 400, "general_argument_invalid").await?;
    for bad in [
        json!({"image": NODE}),
        json!({"runtimeId": "a", "image": NODE, "timeout": "abc"}),
        json!({"runtimeId": "a", "image": NODE, "memory": -1}),
        json!({"runtimeId": "a", "image": NODE, "cpus": "lots"}),
        json!({"runtimeId": "a".repeat(65), "image": NODE}),
        json!({"runtimeId": "../evil", "image": NODE}),
        json!({"runtimeId": "a", "image": NODE, "variables": [1, 2]}),
        json!({"runtimeId": "a", "image": NODE, "version": "v9"}),
        json!({"runtimeId": "a", "image": NODE, "remove": "maybe"}),
        json!({"runtimeId": "a", "image": NODE, "command": "x".repeat(1025)}),
        json!({"runtimeId": "a", "image": NODE, "command": "true", "cacheKey": "../x"}),
        json!({"runtimeId": "a", "image": NODE, "source": "/etc/passwd"}),
        json!({"runtimeId": "a", "image": NODE, "source": "../../etc/passwd"}),
        json!({"runtimeId": "a", "image": NODE, "command": "true", "destination": "/tmp/../etc"}),
    ] {
        let res = ex.post("/v1/runtimes").json(&bad).send().await?;
        expect_error(res, 400, "general_argument_invalid")
            .await
            .with_context(|| format!("{bad}"))?;
    }
    for bad in [
        json!({"method": "FOO", "image": NODE, "source": "x"}),
        json!({"timeout": "soon"}),
        json!({"headers": "not json"}),
        json!({"logging": "perhaps"}),
        json!({"path": "x".repeat(2049)}),
    ] {
        let res = ex
            .post("/v1/runtimes/some-id/executions")
            .json(&bad)
            .send()
            .await?;
        expect_error(res, 400, "general_argument_invalid")
            .await
            .with_context(|| format!("{bad}"))?;
    }
    let res = ex
        .post("/v1/runtimes/some-id/executions")
        .json(&json!({"body": "x".repeat(20 * 1024 * 1024 + 1)}))
        .send()
        .await?;
    // The rest of that body is never read: the answer says the connection ends.
    ensure!(
        res.headers()
            .get("connection")
            .is_some_and(|v| v == "close"),
        "413 without connection: close: {:?}",
        res.headers()
    );
    expect_error(res, 413, "execution_bad_request").await?;

    ensure!(
        ex.containers().is_empty(),
        "bad input left containers behind"
    );
    Ok(())
}

#[tokio::test]
async fn executor_build_then_execute() -> Result<()> {
    let ex = TestExecutor::start(Options::named("build")).await?;
    let source = ex.stage_source(&fixture_dir("executor"), "fixture")?;
    let destination = ex.storage.join("builds").display().to_string();

    // The live log stream, opened before the build starts.
    let logs = {
        let client = ex.client.clone();
        let url = format!("{}/v1/runtimes/build-1/logs?timeout=120", ex.url);
        tokio::spawn(async move {
            let res = client.get(url).bearer_auth(SECRET).send().await?;
            let text = res.text().await?;
            Ok::<_, anyhow::Error>((text, Instant::now()))
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let res = ex
        .post("/v1/runtimes")
        .json(&json!({
            "runtimeId": "build-1",
            "image": NODE,
            "source": source,
            "destination": destination,
            "entrypoint": "index.js",
            "command": "tar -zxf /tmp/code.tar.gz -C /mnt/code && bash helpers/build.sh \"\"",
            "remove": true,
            "timeout": 120,
        }))
        .send()
        .await?;
    let (status, report) = json_reply(res).await?;
    let build_done = Instant::now();
    ensure!(status == 201, "build answered {status}: {report}");
    let output = report["output"].as_array().context("no output")?;
    let text: String = output
        .iter()
        .map(|e| e["content"].as_str().unwrap_or_default())
        .collect();
    ensure!(text.contains("Build finished."), "output: {text}");
    ensure!(
        output[0]["timestamp"]
            .as_str()
            .unwrap_or_default()
            .ends_with("+00:00"),
        "timestamp {}",
        output[0]["timestamp"]
    );
    let path = report["path"].as_str().context("no path")?.to_string();
    ensure!(
        path.starts_with(&destination) && path.ends_with(".gz"),
        "path {path}"
    );
    let size = std::fs::metadata(&path)?.len();
    ensure!(
        report["size"] == size && size > 0,
        "size {} vs {size}",
        report["size"]
    );

    let (stream, stream_end) = logs.await??;
    ensure!(
        stream_end.saturating_duration_since(build_done) < Duration::from_secs(1),
        "log stream ended {:?} after the build",
        stream_end.saturating_duration_since(build_done)
    );
    ensure!(stream.contains("Build finished."), "stream: {stream}");
    let first = stream.lines().next().unwrap_or_default();
    ensure!(
        first.len() > 30 && first.as_bytes()[4] == b'-',
        "stream line {first:?}"
    );

    // `remove`: nothing left behind.
    let (_, list) = json_reply(ex.get("/v1/runtimes").send().await?).await?;
    ensure!(list == json!([]), "list after remove: {list}");
    ensure!(ex.containers().is_empty(), "containers left after remove");

    // The artifact runs, cold-started through executions.
    let reply = execute(&ex, "fn-1", fixture_params(&path, "hello")).await?;
    ensure!(
        reply["statusCode"] == 200 && reply["body"] == "Hello from Hearth",
        "{reply}"
    );
    ensure!(
        reply["coldStartDuration"].as_f64().unwrap_or(0.0) > 0.0,
        "cold start not reported: {reply}"
    );
    let warm = execute(&ex, "fn-1", fixture_params(&path, "hello")).await?;
    ensure!(
        warm["coldStartDuration"] == 0.0,
        "warm call reported a cold start: {warm}"
    );
    Ok(())
}

#[tokio::test]
async fn executor_failing_build() -> Result<()> {
    let ex = TestExecutor::start(Options::named("failbuild")).await?;
    let res = ex
        .post("/v1/runtimes")
        .json(&json!({
            "runtimeId": "fail-1",
            "image": NODE,
            "command": "echo before-fail; exit 3",
            "remove": true,
        }))
        .send()
        .await?;
    let body = expect_error(res, 400, "build_failed").await?;
    let message = body["message"].as_str().unwrap_or_default();
    ensure!(message.contains("before-fail"), "{message}");
    ensure!(
        message.ends_with("Build command exited with code 3."),
        "{message}"
    );
    let res = ex
        .post("/v1/runtimes")
        .json(&json!({"runtimeId": "fail-2", "image": NODE, "command": "sleep 10", "timeout": 1}))
        .send()
        .await?;
    let body = expect_error(res, 400, "build_failed").await?;
    ensure!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("timed out"),
        "{body}"
    );
    let res = ex
        .post("/v1/runtimes")
        .json(&json!({"runtimeId": "fail-3", "image": "hearth/does-not-exist:1"}))
        .send()
        .await?;
    expect_error(res, 400, "runtime_failed").await?;
    ensure!(ex.containers().is_empty(), "failed builds left containers");
    let (_, list) = json_reply(ex.get("/v1/runtimes").send().await?).await?;
    ensure!(list == json!([]), "list after failures: {list}");
    Ok(())
}

#[tokio::test]
async fn executor_execution_shapes() -> Result<()> {
    let ex = TestExecutor::start(Options::named("shapes")).await?;
    let source = ex.stage_source(&fixture_dir("executor"), "fixture")?;
    let base = fixture_params(&source, "echo");

    // Path without a leading slash, method and body.
    let reply = execute(
        &ex,
        "shapes",
        with(
            base.clone(),
            json!({"path": "some/path?x=1", "method": "POST", "body": "hi there"}),
        ),
    )
    .await?;
    let body: Value = serde_json::from_str(reply["body"].as_str().unwrap_or_default())?;
    ensure!(
        body["path"] == "/some/path" && body["query"]["x"] == "1",
        "{body}"
    );
    ensure!(
        body["method"] == "POST" && body["body"] == "hi there",
        "{body}"
    );
    ensure!(
        reply["startTime"].as_f64().is_some() && reply["duration"].as_f64().is_some(),
        "{reply}"
    );

    // Multipart by default: exact bytes of a binary body.
    let res = ex
        .post("/v1/runtimes/shapes/executions")
        .json(&with(
            base.clone(),
            json!({"headers": {"x-action": "binary"}}),
        ))
        .send()
        .await?;
    let content_type = res
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    ensure!(
        content_type.starts_with("multipart/form-data"),
        "content-type {content_type}"
    );
    let parts = parse_multipart(&content_type, res.bytes().await?).await?;
    let want: Vec<u8> = (0..=255u8).collect();
    ensure!(
        parts.get("body").map(|b| b.as_ref()) == Some(want.as_slice()),
        "binary body differs"
    );
    ensure!(
        parts.get("statusCode").map(|b| b.as_ref()) == Some(b"200".as_slice()),
        "statusCode part"
    );
    let headers: Value = serde_json::from_slice(parts.get("headers").context("no headers part")?)?;
    ensure!(
        headers["content-type"].is_string(),
        "headers part {headers}"
    );

    // The same binary with JSON: a clear 400.
    let res = ex
        .post("/v1/runtimes/shapes/executions")
        .header("accept", "application/json")
        .json(&with(
            base.clone(),
            json!({"headers": {"x-action": "binary"}}),
        ))
        .send()
        .await?;
    let err = expect_error(res, 400, "execution_bad_json").await?;
    ensure!(
        err["message"]
            .as_str()
            .unwrap_or_default()
            .contains("JSON response does not allow binaries"),
        "{err}"
    );

    // A multipart request is read like JSON.
    let form = reqwest::multipart::Form::new()
        .text("method", "PUT")
        .text("body", "from a form")
        .text("headers", r#"{"x-action":"echo"}"#);
    let res = ex
        .post("/v1/runtimes/shapes/executions")
        .header("accept", "application/json")
        .multipart(form)
        .send()
        .await?;
    let (status, reply) = json_reply(res).await?;
    ensure!(status == 200, "form execution {status}: {reply}");
    let body: Value = serde_json::from_str(reply["body"].as_str().unwrap_or_default())?;
    ensure!(
        body["method"] == "PUT" && body["body"] == "from a form",
        "{body}"
    );

    // HEAD.
    let reply = execute(&ex, "shapes", with(base.clone(), json!({"method": "HEAD"}))).await?;
    ensure!(
        reply["statusCode"] == 200 && reply["body"] == "",
        "HEAD: {reply}"
    );

    // The function's timeout: outer 200, inner 500.
    let started = Instant::now();
    let reply = execute(
        &ex,
        "shapes",
        with(
            base.clone(),
            json!({"path": "/?ms=5000", "headers": {"x-action": "sleep"}, "timeout": 1}),
        ),
    )
    .await?;
    ensure!(reply["statusCode"] == 500, "timeout: {reply}");
    ensure!(
        reply["errors"]
            .as_str()
            .unwrap_or_default()
            .contains("Execution timed out."),
        "{reply}"
    );
    ensure!(
        started.elapsed() < Duration::from_secs(4),
        "timeout took {:?}",
        started.elapsed()
    );

    // Logs: 1 MiB and 5 MiB exact, 15 MiB truncated; logging off.
    for (size, exact) in [(1 << 20, true), (5 << 20, true), (15 << 20, false)] {
        let reply = execute(
            &ex,
            "shapes",
            with(
                base.clone(),
                json!({"headers": {"x-action": "logs"}, "body": size.to_string()}),
            ),
        )
        .await?;
        let logs = reply["logs"].as_str().unwrap_or_default();
        if exact {
            ensure!(
                logs.len() == size,
                "{size} bytes of logs came back as {}",
                logs.len()
            );
        } else {
            let notice = "\nLog file has been truncated to 5.00MB.";
            ensure!(logs.ends_with(notice), "15 MiB not truncated");
            ensure!(
                logs.len() == (5 << 20) + notice.len(),
                "truncated to {}",
                logs.len()
            );
        }
    }
    let reply = execute(
        &ex,
        "shapes",
        with(
            base.clone(),
            json!({"headers": {"x-action": "logs"}, "body": "1024", "logging": false}),
        ),
    )
    .await?;
    ensure!(
        reply["logs"] == "" && reply["errors"] == "",
        "logging false: {reply}"
    );

    // Repeated response headers keep arrays from format 0.11.0.
    let reply = execute(
        &ex,
        "shapes",
        with(base.clone(), json!({"headers": {"x-action": "headers"}})),
    )
    .await?;
    ensure!(reply["headers"]["x-one"] == "v", "{reply}");
    for hop in ["connection", "keep-alive", "transfer-encoding"] {
        ensure!(
            reply["headers"].get(hop).is_none(),
            "hop-by-hop {hop} returned: {reply}"
        );
    }
    ensure!(
        reply["headers"]
            .as_object()
            .is_some_and(|h| h.keys().all(|k| !k.starts_with("x-open-runtimes-"))),
        "x-open-runtimes-* leaked: {reply}"
    );

    // Commands: success, failure, timeout, unknown runtime.
    let (status, out) = json_reply(
        ex.post("/v1/runtimes/shapes/commands")
            .json(&json!({"command": "echo hi"}))
            .send()
            .await?,
    )
    .await?;
    ensure!(
        status == 200 && out["output"] == "hi\n",
        "command: {status} {out}"
    );
    expect_error(
        ex.post("/v1/runtimes/shapes/commands")
            .json(&json!({"command": "exit 2"}))
            .send()
            .await?,
        500,
        "command_failed",
    )
    .await?;
    let body = expect_error(
        ex.post("/v1/runtimes/shapes/commands")
            .json(&json!({"command": "sleep 5", "timeout": 1}))
            .send()
            .await?,
        500,
        "command_timeout",
    )
    .await?;
    ensure!(body["message"] == "Operation timed out.", "{body}");
    expect_error(
        ex.post("/v1/runtimes/nope/commands")
            .json(&json!({"command": "true"}))
            .send()
            .await?,
        404,
        "runtime_not_found",
    )
    .await?;

    // The list never shows secrets.
    let (_, list) = json_reply(ex.get("/v1/runtimes").send().await?).await?;
    let entry = list
        .as_array()
        .and_then(|l| l.first())
        .context("runtime not listed")?
        .clone();
    for key in [
        "name",
        "hostname",
        "status",
        "image",
        "version",
        "created",
        "updated",
        "listening",
        "initialised",
    ] {
        ensure!(
            entry.get(key).is_some(),
            "runtime object lacks {key}: {entry}"
        );
    }
    ensure!(
        entry["status"]
            .as_str()
            .unwrap_or_default()
            .starts_with("Up "),
        "status {entry}"
    );
    let container = ex.containers().first().cloned().context("no container")?;
    let env = std::process::Command::new("docker")
        .args([
            "inspect",
            "-f",
            "{{range .Config.Env}}{{println .}}{{end}}",
            &container,
        ])
        .output()?;
    let secret = String::from_utf8_lossy(&env.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("OPEN_RUNTIMES_SECRET=").map(str::to_string))
        .context("runtime has no secret")?;
    let listed = list.to_string() + &ex.get("/v1/runtimes/shapes").send().await?.text().await?;
    ensure!(
        !listed.contains(&secret) && !listed.contains("secret"),
        "a secret is listed: {listed}"
    );
    Ok(())
}

#[tokio::test]
async fn executor_limits_and_init_time() -> Result<()> {
    let ex = TestExecutor::start(Options::named("limits")).await?;
    let source = ex.stage_source(&fixture_dir("executor"), "fixture")?;
    let reply = execute(
        &ex,
        "limited",
        with(
            fixture_params(&source, "limits"),
            json!({"cpus": 0.5, "memory": 256}),
        ),
    )
    .await?;
    let body: Value = serde_json::from_str(reply["body"].as_str().unwrap_or_default())?;
    ensure!(body["cpus"] == "0.5" && body["memory"] == "256", "{body}");
    let memory_limit = body["memoryLimit"].as_str().unwrap_or_default();
    ensure!(
        memory_limit == (256u64 << 20).to_string(),
        "memory limit {memory_limit}"
    );
    let quota = body["cpuQuota"].as_str().unwrap_or_default();
    ensure!(quota.starts_with("50000"), "cpu quota {quota}");

    // Module initialisation of 1.5 s is part of the first execution's duration.
    let reply = execute(
        &ex,
        "slow-init",
        with(
            fixture_params(&source, "hello"),
            json!({"entrypoint": "slow-init.js"}),
        ),
    )
    .await?;
    ensure!(reply["body"] == "initialised", "{reply}");
    let duration = reply["duration"].as_f64().unwrap_or_default();
    ensure!(
        duration >= 1.4,
        "initialisation not counted: duration {duration}"
    );
    Ok(())
}

#[tokio::test]
async fn executor_single_flight_cold_start() -> Result<()> {
    let ex = TestExecutor::start(Options::named("flight")).await?;
    let source = ex.stage_source(&fixture_dir("executor"), "fixture")?;
    let params = fixture_params(&source, "hello");
    let calls = (0..20).map(|_| execute(&ex, "together", params.clone()));
    let replies = futures_util::future::join_all(calls).await;
    for reply in replies {
        let reply = reply?;
        ensure!(reply["body"] == "Hello from Hearth", "{reply}");
    }
    ensure!(
        ex.containers().len() == 1,
        "containers: {:?}",
        ex.containers()
    );
    ensure!(
        ex.metric("hearth_cold_starts_total").await? == 1.0,
        "more than one cold start"
    );
    Ok(())
}

#[tokio::test]
async fn executor_busy_runtime_is_not_reaped() -> Result<()> {
    let mut options = Options::named("reap");
    options.inactive_threshold = 1;
    options.maintenance_interval = 1;
    let ex = TestExecutor::start(options).await?;
    let source = ex.stage_source(&fixture_dir("executor"), "fixture")?;
    let reply = execute(
        &ex,
        "busy",
        with(
            fixture_params(&source, "sleep"),
            json!({"path": "/?ms=4000", "timeout": 20}),
        ),
    )
    .await?;
    ensure!(
        reply["statusCode"] == 200 && reply["body"] == "slept 4000",
        "{reply}"
    );
    // Idle now: reaped within a few maintenance passes.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ex.containers().is_empty() {
        ensure!(Instant::now() < deadline, "idle runtime was not reaped");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, list) = json_reply(ex.get("/v1/runtimes").send().await?).await?;
    ensure!(list == json!([]), "{list}");
    Ok(())
}

#[tokio::test]
async fn executor_adopts_runtimes_after_restart() -> Result<()> {
    let options = Options::named("restart");
    let mut first = TestExecutor::start(options.clone()).await?;
    let source = first.stage_source(&fixture_dir("executor"), "fixture")?;
    execute(&first, "kept", fixture_params(&source, "hello")).await?;
    first.stop_serving().await;

    let mut again = options.clone();
    again.storage = Some(first.storage.clone());
    let second = TestExecutor::start(again).await?;
    let (_, list) = json_reply(second.get("/v1/runtimes").send().await?).await?;
    ensure!(
        list.as_array().map(Vec::len) == Some(1),
        "adopted list: {list}"
    );
    ensure!(
        list[0]["status"]
            .as_str()
            .unwrap_or_default()
            .starts_with("Up "),
        "{list}"
    );
    let reply = execute(&second, "kept", json!({"headers": {"x-action": "hello"}})).await?;
    ensure!(reply["body"] == "Hello from Hearth", "{reply}");
    ensure!(
        second.metric("hearth_cold_starts_total").await? == 0.0,
        "adoption cold-started"
    );
    ensure!(
        second.containers().len() == 1,
        "duplicates: {:?}",
        second.containers()
    );
    Ok(())
}

#[tokio::test]
async fn executor_killed_runtime_cold_starts_again() -> Result<()> {
    let ex = TestExecutor::start(Options::named("killed")).await?;
    let source = ex.stage_source(&fixture_dir("executor"), "fixture")?;
    let params = fixture_params(&source, "hello");
    execute(&ex, "victim", params.clone()).await?;
    let container = ex.containers().first().cloned().context("no container")?;
    std::process::Command::new("docker")
        .args(["kill", &container])
        .output()?;
    let reply = execute(&ex, "victim", params.clone()).await?;
    ensure!(reply["body"] == "Hello from Hearth", "{reply}");
    let now = ex.containers();
    ensure!(
        now.len() == 1 && now[0] != container,
        "containers after restart: {now:?}"
    );

    // Without cold-start parameters the caller learns what happened.
    std::process::Command::new("docker")
        .args(["kill", &now[0]])
        .output()?;
    let res = ex
        .post("/v1/runtimes/victim/executions")
        .json(&json!({"headers": {"x-action": "hello"}}))
        .send()
        .await?;
    let (status, body) = json_reply(res).await?;
    ensure!(
        (400..500).contains(&status),
        "killed runtime without params: {status} {body}"
    );
    Ok(())
}

/// Hearth's socket extension (`runtimes/socket.md`): every image serves on the Unix socket in its
/// shared log folder and the executor calls it there, over no TCP at all (the readiness probe
/// included); with `OPR_EXECUTOR_RUNTIME_SOCKETS=false` no socket is made and calls take TCP.
#[tokio::test]
async fn executor_calls_runtimes_over_their_unix_socket() -> Result<()> {
    use std::io::{Read, Write};
    for sockets in [true, false] {
        let mut options = Options::named(if sockets { "sockets" } else { "tcp-only" });
        options.runtime_sockets = sockets;
        let ex = TestExecutor::start(options).await?;
        for rt in hearth_tests::runtime::ALL {
            let source = ex.stage_source(&example_dir(rt), rt.name)?;
            let params =
                json!({"image": rt.image, "source": source, "entrypoint": rt.example_entry});
            for _ in 0..3 {
                let reply = execute(&ex, rt.name, params.clone()).await?;
                ensure!(reply["statusCode"] == 200, "{}: {reply}", rt.name);
            }
            let socket = ex
                .runtimes_dir()
                .join(format!("{}-{}", ex.name, rt.name))
                .join("logs/.hearth.sock");
            ensure!(
                socket.exists() == sockets,
                "{}: socket there: {} (sockets {sockets})",
                rt.name,
                socket.exists()
            );
            if sockets {
                // The runtime itself answers there (health needs no secret).
                let mut stream = std::os::unix::net::UnixStream::connect(&socket)?;
                stream.set_read_timeout(Some(Duration::from_secs(10)))?;
                stream.write_all(
                    b"GET /__opr/health HTTP/1.1\r\nhost: runtime\r\nconnection: close\r\n\r\n",
                )?;
                let mut answer = String::new();
                stream.read_to_string(&mut answer)?;
                ensure!(
                    answer.starts_with("HTTP/1.1 200") && answer.ends_with("OK"),
                    "{}: {answer}",
                    rt.name
                );
            }
        }
        let unix = ex
            .metric(r#"hearth_runtime_requests_total{transport="unix"}"#)
            .await?;
        let tcp = ex
            .metric(r#"hearth_runtime_requests_total{transport="tcp"}"#)
            .await?;
        if sockets {
            // Three executions and a readiness probe per runtime.
            ensure!(unix >= 12.0 && tcp == 0.0, "unix {unix}, tcp {tcp}");
        } else {
            ensure!(unix == 0.0 && tcp >= 12.0, "unix {unix}, tcp {tcp}");
        }
    }
    Ok(())
}

#[tokio::test]
async fn executor_v2_runtime() -> Result<()> {
    let ex = TestExecutor::start(Options::named("v2")).await?;
    let source = ex.stage_source(&fixture_dir("node-v2"), "v2")?;
    let reply = execute(
        &ex,
        "legacy",
        json!({
            "image": NODE,
            "source": source,
            "entrypoint": "index.js",
            "version": "v2",
            "body": "payload-value",
            "headers": {"x-test-header": "header-value"},
            "variables": {"test-variable": "ignored-by-v2-call"},
        }),
    )
    .await?;
    ensure!(reply["statusCode"] == 200, "{reply}");
    let body: Value = serde_json::from_str(reply["body"].as_str().unwrap_or_default())?;
    ensure!(
        body["payload"] == "payload-value" && body["header"] == "header-value",
        "{body}"
    );
    ensure!(
        reply["logs"]
            .as_str()
            .unwrap_or_default()
            .contains("v2 log"),
        "{reply}"
    );
    ensure!(
        reply["errors"]
            .as_str()
            .unwrap_or_default()
            .contains("v2 error"),
        "{reply}"
    );
    Ok(())
}

#[tokio::test]
async fn executor_runtime_limit() -> Result<()> {
    let mut options = Options::named("limit");
    options.max_runtimes = 1;
    let ex = TestExecutor::start(options).await?;
    let source = ex.stage_source(&fixture_dir("executor"), "fixture")?;
    // One busy runtime: a second one cannot be made room for.
    let busy = {
        let params = with(
            fixture_params(&source, "sleep"),
            json!({"path": "/?ms=3000"}),
        );
        let ex_url = ex.url.clone();
        let client = ex.client.clone();
        tokio::spawn(async move {
            client
                .post(format!("{ex_url}/v1/runtimes/first/executions"))
                .bearer_auth(SECRET)
                .header("accept", "application/json")
                .json(&params)
                .send()
                .await
        })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while ex.executor.get("first").is_none_or(|r| r.in_flight() == 0) {
        ensure!(Instant::now() < deadline, "first runtime never got busy");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let res = ex
        .post("/v1/runtimes/second/executions")
        .json(&fixture_params(&source, "hello"))
        .send()
        .await?;
    let body = expect_error(res, 503, "runtime_limit").await?;
    ensure!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("OPR_EXECUTOR_MAX_RUNTIMES"),
        "{body}"
    );
    busy.await??;
    // Once idle, the first runtime makes room for the second.
    let reply = execute(&ex, "second", fixture_params(&source, "hello")).await?;
    ensure!(reply["body"] == "Hello from Hearth", "{reply}");
    ensure!(
        ex.containers().len() == 1,
        "containers {:?}",
        ex.containers()
    );
    Ok(())
}

#[tokio::test]
async fn executor_s3_storage() -> Result<()> {
    let s3 = hearth_tests::s3::S3Server::start().await?;
    let client = reqwest::Client::new();
    let bucket = format!("{}/hearth-test", s3.url);
    ensure!(
        client.put(&bucket).send().await?.status().is_success(),
        "bucket"
    );
    // The source goes into the bucket; the executor reads it from there.
    let staging = TestExecutor::start(Options::named("s3-staging")).await?;
    let local = staging.stage_source(&fixture_dir("executor"), "fixture")?;
    let res = client
        .put(format!("{bucket}/functions/fixture.tar.gz"))
        .body(std::fs::read(&local)?)
        .send()
        .await?;
    ensure!(res.status().is_success(), "upload: {}", res.status());

    let mut options = Options::named("s3");
    let host = s3.url.trim_start_matches("http://");
    options.storage_dsn = Some(format!(
        "s3://key:secret@{host}/hearth-test?region=us-east-1&insecure=true"
    ));
    let ex = TestExecutor::start(options).await?;
    let res = ex
        .post("/v1/runtimes")
        .json(&json!({
            "runtimeId": "s3-build",
            "image": NODE,
            "source": "/functions/fixture.tar.gz",
            "destination": "/builds",
            "entrypoint": "index.js",
            "command": "tar -zxf /tmp/code.tar.gz -C /mnt/code && bash helpers/build.sh \"\"",
            "remove": true,
        }))
        .send()
        .await?;
    let (status, report) = json_reply(res).await?;
    ensure!(status == 201, "build from S3: {status} {report}");
    let path = report["path"].as_str().context("no path")?.to_string();
    ensure!(
        path.starts_with("/builds/") && path.ends_with(".gz"),
        "{path}"
    );
    let stored = client.get(format!("{bucket}{path}")).send().await?;
    ensure!(stored.status().is_success(), "artifact not in the bucket");
    ensure!(
        stored.bytes().await?.len() as u64 == report["size"],
        "artifact size"
    );

    let reply = execute(&ex, "s3-fn", fixture_params(&path, "hello")).await?;
    ensure!(reply["body"] == "Hello from Hearth", "{reply}");
    let res = ex
        .post("/v1/runtimes/s3-missing/executions")
        .json(&fixture_params("/functions/none.tar.gz", "hello"))
        .send()
        .await?;
    let body = expect_error(res, 400, "runtime_failed").await?;
    ensure!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("not found"),
        "{body}"
    );
    Ok(())
}

/// Reads one response off a raw connection: status line and headers (lower-cased names) and
/// the body by its length.
async fn read_raw_response(
    stream: &mut tokio::net::TcpStream,
    buf: &mut Vec<u8>,
) -> Result<(String, Vec<(String, String)>, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8(buf[..end].to_vec())?;
            let mut lines = head.split("\r\n");
            let status = lines.next().unwrap_or_default().to_string();
            let headers: Vec<(String, String)> = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
                .collect();
            let length: usize = headers
                .iter()
                .find(|(n, _)| n == "content-length")
                .map(|(_, v)| v.parse())
                .context("no content-length")??;
            while buf.len() < end + 4 + length {
                let mut chunk = [0u8; 8192];
                let n = stream.read(&mut chunk).await?;
                ensure!(n > 0, "closed inside a body");
                buf.extend_from_slice(&chunk[..n]);
            }
            let body = buf[end + 4..end + 4 + length].to_vec();
            buf.drain(..end + 4 + length);
            return Ok((status, headers, body));
        }
        let mut chunk = [0u8; 8192];
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
            .await
            .context("no response within 10 s")??;
        ensure!(n > 0, "the executor closed the connection");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The executor's own HTTP/1.1 path (`api/wire.rs`) on one raw keep-alive connection:
/// executions answered there (pipelined too), the key checked, and the connection handed to
/// hyper and the router at the first other route, where executions still work.
#[tokio::test]
async fn executor_own_http_path_keeps_alive_and_hands_over() -> Result<()> {
    use tokio::io::AsyncWriteExt;
    let ex = TestExecutor::start(Options::named("wire")).await?;
    let address = ex.url.trim_start_matches("http://").to_string();
    let mut stream = tokio::net::TcpStream::connect(&address).await?;
    let mut buf = Vec::new();
    let execution = |auth: bool| {
        let auth = if auth {
            format!("Authorization: Bearer {SECRET}\r\n")
        } else {
            String::new()
        };
        format!(
            "POST /v1/runtimes/missing/executions HTTP/1.1\r\nHost: {address}\r\n{auth}Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{{}}"
        )
    };
    // Two executions in one write, then one without the key.
    stream
        .write_all(format!("{}{}{}", execution(true), execution(true), execution(false)).as_bytes())
        .await?;
    for want in [
        "runtime_not_found",
        "runtime_not_found",
        "general_unauthorized",
    ] {
        let (status, headers, body) = read_raw_response(&mut stream, &mut buf).await?;
        let body: Value = serde_json::from_slice(&body)?;
        ensure!(body["type"] == want, "{status}: {body}");
        let code = if want == "general_unauthorized" {
            401
        } else {
            404
        };
        ensure!(status.starts_with(&format!("HTTP/1.1 {code} ")), "{status}");
        ensure!(
            headers.iter().any(|(n, _)| n == "date"),
            "no date: {headers:?}"
        );
        ensure!(
            !headers.iter().any(|(n, _)| n == "connection"),
            "keep-alive is the default: {headers:?}"
        );
    }
    // Another route: hyper and the router take the connection over, executions included.
    stream
        .write_all(format!("GET /v1/health HTTP/1.1\r\nHost: {address}\r\n\r\n").as_bytes())
        .await?;
    let (status, _, body) = read_raw_response(&mut stream, &mut buf).await?;
    ensure!(
        status.starts_with("HTTP/1.1 200") && body == b"OK",
        "{status}"
    );
    stream.write_all(execution(true).as_bytes()).await?;
    let (status, _, body) = read_raw_response(&mut stream, &mut buf).await?;
    let body: Value = serde_json::from_slice(&body)?;
    ensure!(
        status.starts_with("HTTP/1.1 404") && body["type"] == "runtime_not_found",
        "{status}: {body}"
    );
    // `Connection: close` is honoured on the own path.
    let mut closing = tokio::net::TcpStream::connect(&address).await?;
    let request = execution(true).replace("Host:", "Connection: close\r\nHost:");
    closing.write_all(request.as_bytes()).await?;
    let mut rest = Vec::new();
    let (status, headers, _) = read_raw_response(&mut closing, &mut rest).await?;
    ensure!(status.starts_with("HTTP/1.1 404"), "{status}");
    ensure!(
        headers
            .iter()
            .any(|(n, v)| n == "connection" && v == "close"),
        "{headers:?}"
    );
    let mut after = [0u8; 16];
    let n = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read(&mut closing, &mut after),
    )
    .await??;
    ensure!(n == 0, "the connection stayed open after Connection: close");
    Ok(())
}
