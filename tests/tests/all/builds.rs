//! The build service end to end, all real (needs Docker): RabbitMQ in a container, git
//! repositories served by `git daemon` on 127.0.0.1 and as `file://`, the `hearth-builds` binary
//! as child processes, and a real executor building in real runtime containers.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use hearth_tests::builds::{
    by_status, git_build, BuildsClient, BuildsProcess, GitServer, Rabbit, ServiceOptions,
};
use hearth_tests::executor::{json_reply, Options, TempDir, TestExecutor, SECRET};
use serde_json::{json, Value};

const NODE: &str = "hearth/node:v5-18";
const PYTHON: &str = "hearth/python:v5-3.11";
const LONG: Duration = Duration::from_secs(180);

/// Runs a built artifact through the executor (cold start with it as `source`) and returns the
/// function's body.
async fn invoke(
    ex: &TestExecutor,
    runtime_id: &str,
    image: &str,
    artifact: &str,
    entrypoint: &str,
) -> Result<String> {
    let res = ex
        .post(&format!("/v1/runtimes/{runtime_id}/executions"))
        .header("accept", "application/json")
        .json(&json!({"image": image, "source": artifact, "entrypoint": entrypoint, "timeout": 60}))
        .send()
        .await?;
    let (status, body) = json_reply(res).await?;
    ensure!(
        status == 200 && body["statusCode"] == 200,
        "execution answered {status}: {body}"
    );
    Ok(body["body"].as_str().unwrap_or_default().to_string())
}

fn artifact(build: &Value) -> Result<String> {
    ensure!(
        build["status"] == "succeeded",
        "build did not succeed: {build}"
    );
    build["artifact"]["path"]
        .as_str()
        .map(str::to_string)
        .context("no artifact path")
}

fn node_function(text: &str) -> String {
    format!("module.exports = async (context) => context.res.text('{text}');\n")
}

struct Stack {
    ex: TestExecutor,
    options: ServiceOptions,
    _state: TempDir,
}

async fn stack(rabbit: &Rabbit, name: &str, extra: &[(&str, &str)]) -> Result<Stack> {
    // Runtimes stay until the test ends: on a loaded machine a build test outlasts the default
    // 60 s idle threshold, and the end check counts the execution runtimes.
    let ex = TestExecutor::start(Options {
        inactive_threshold: 3600,
        ..Options::named(name)
    })
    .await?;
    let state = TempDir::new("hearth-builds-state")?;
    let mut options = ServiceOptions::new(&ex, rabbit, name, &state.0);
    options.extra = extra
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Ok(Stack {
        ex,
        options,
        _state: state,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn builds_docker_git_by_branch_tag_commit_then_execute() -> Result<()> {
    let rabbit = Rabbit::start().await?;
    let git = GitServer::start().await?;
    let s = stack(&rabbit, "builds", &[("HEARTH_BUILDS_MAX_SOURCE_MB", "1")]).await?;
    let service = BuildsProcess::start(&s.options, "all").await?;
    let api = BuildsClient::new(&service.url, SECRET);
    let mut submitted = Vec::new();

    // A Node function with history: v1 (tagged), then v2 on main.
    let commits = git.repository(
        "node-fn",
        &[
            (
                &[
                    ("index.js", &node_function("v1 from git")),
                    ("package.json", "{\"name\":\"fn\",\"version\":\"1.0.0\"}"),
                ],
                Some("v1.0"),
            ),
            (&[("index.js", &node_function("v2 from git"))], None),
        ],
    )?;
    for (reference, url, expected) in [
        (Some("main"), git.git_url("node-fn"), "v2 from git"),
        (Some("v1.0"), git.git_url("node-fn"), "v1 from git"),
        (
            Some(commits[0].as_str()),
            git.file_url("node-fn"),
            "v1 from git",
        ),
        (None, git.file_url("node-fn"), "v2 from git"),
    ] {
        let (status, build) = api
            .submit(&git_build(&url, reference, NODE, "index.js"))
            .await?;
        ensure!(
            status == 202 && build["status"] == "queued",
            "submit: {status} {build}"
        );
        let id = build["id"].as_str().context("no id")?.to_string();
        submitted.push(id.clone());
        let build = api.wait(&id, LONG).await?;
        let path = artifact(&build)?;
        ensure!(
            build["commit"].as_str().is_some_and(|c| c.len() == 40),
            "no commit: {build}"
        );
        let body = invoke(
            &s.ex,
            &format!("git-{}", submitted.len()),
            NODE,
            &path,
            "index.js",
        )
        .await?;
        ensure!(
            body == expected,
            "ref {reference:?} of {url}: body {body:?}, want {expected:?}"
        );
        println!(
            "builds: node from {url} at {reference:?} -> {body:?} (artifact {} bytes)",
            build["artifact"]["size"]
        );
    }

    // A Python function in a subdirectory, with history, by tag, branch and commit.
    let py =
        |text: &str| format!("async def main(context):\n    return context.res.text('{text}')\n");
    let py_commits = git.repository(
        "py-fn",
        &[
            (
                &[
                    ("fn/main.py", &py("python v1")),
                    ("README.md", "a function"),
                ],
                Some("v1"),
            ),
            (&[("fn/main.py", &py("python v2"))], None),
        ],
    )?;
    let mut id = String::new();
    for (reference, url, expected) in [
        ("v1", git.file_url("py-fn"), "python v1"),
        ("main", git.git_url("py-fn"), "python v2"),
        (py_commits[0].as_str(), git.git_url("py-fn"), "python v1"),
    ] {
        let mut request = git_build(&url, Some(reference), PYTHON, "main.py");
        request["source"]["subdirectory"] = json!("fn");
        id = api.submit_id(&request).await?;
        submitted.push(id.clone());
        let build = api.wait(&id, LONG).await?;
        let runtime = format!("py-git-{}", submitted.len());
        let body = invoke(&s.ex, &runtime, PYTHON, &artifact(&build)?, "main.py").await?;
        ensure!(
            body == expected,
            "python at {reference}: {body:?}, want {expected:?}"
        );
        println!("builds: python from {url} at {reference} -> {body:?}");
    }

    // The log holds the fetch, the build's own output, and the result, in the executor's format.
    let log = api.logs(&id).await?;
    ensure!(
        log.contains("Fetching git://127.0.0.1")
            && log.contains("Build command execution started.")
            && log.contains("Build succeeded"),
        "log: {log}"
    );
    ensure!(
        log.lines()
            .all(|l| l.len() > 24 && l.as_bytes()[4] == b'-' && l.as_bytes()[23] == b'+'),
        "line format: {log}"
    );

    // An archive already in storage, submitted through the balancer: one endpoint for all.
    let balancer =
        hearth_tests::balancer::TestBalancer::start(vec![s.ex.url.clone()], SECRET, |c| {
            c.builds = Some(service.url.clone());
        })
        .await?;
    let via_balancer = BuildsClient::new(&balancer.url, SECRET);
    let archive = s.ex.stage_source(
        &hearth_tests::runtime::repo_root().join("runtimes/node/example"),
        "archive-fn",
    )?;
    let id = via_balancer.submit_id(&json!({"source": {"type": "archive", "path": archive}, "image": NODE, "entrypoint": "index.js"})).await?;
    submitted.push(id.clone());
    let build = via_balancer.wait(&id, LONG).await?;
    ensure!(
        build == api.get(&id).await?,
        "the balancer shows the build service's record"
    );
    let body = invoke(&s.ex, "archive", NODE, &artifact(&build)?, "index.js").await?;
    ensure!(body == "Hello, World!", "archive body {body:?}");
    let res = via_balancer
        .http
        .get(format!("{}/v1/builds", balancer.url))
        .send()
        .await?;
    ensure!(
        res.status() == 401,
        "the build service's auth holds through the balancer"
    );

    // Failures, each final with a clear reason.
    git.empty("empty")?;
    git.repository(
        "big",
        &[(
            &[
                ("index.js", &node_function("big")),
                ("blob.bin", &"x".repeat(1_500_000)),
            ],
            None,
        )],
    )?;
    git.repository(
        "escape",
        &[(
            &[
                ("index.js", &node_function("x")),
                ("secret@link", "../../../../etc/passwd"),
            ],
            None,
        )],
    )?;
    let failing = [
        (
            git_build(&git.git_url("missing"), Some("main"), NODE, "index.js"),
            "could not be read",
        ),
        (
            git_build(
                &git.git_url("node-fn"),
                Some("no-such-branch"),
                NODE,
                "index.js",
            ),
            "unknown ref",
        ),
        (
            git_build(
                &git.git_url("node-fn"),
                Some("0123456789abcdef0123456789abcdef01234567"),
                NODE,
                "index.js",
            ),
            "unknown ref",
        ),
        (
            git_build(&git.git_url("empty"), None, NODE, "index.js"),
            "is empty",
        ),
        (
            git_build(&git.git_url("big"), None, NODE, "index.js"),
            "size limit",
        ),
        (
            git_build(&git.git_url("escape"), None, NODE, "index.js"),
            "points outside",
        ),
        (
            json!({"source": {"type": "git", "url": git.git_url("node-fn")}, "image": NODE, "command": "echo about to fail; exit 3"}),
            "exited with code 3",
        ),
        (
            json!({"source": {"type": "git", "url": git.git_url("node-fn")}, "image": NODE, "command": "sleep 30", "timeout": 2}),
            "timed out",
        ),
        (
            json!({"source": {"type": "git", "url": git.git_url("node-fn")}, "image": "hearth/no-such-image:1"}),
            "runtime_failed",
        ),
        (
            json!({"source": {"type": "archive", "path": format!("{}/functions/nope.tar.gz", s.ex.storage.display())}, "image": NODE}),
            "not found",
        ),
    ];
    for (request, reason) in failing {
        let id = api.submit_id(&request).await?;
        submitted.push(id.clone());
        let build = api.wait(&id, LONG).await?;
        let error = build["error"].as_str().unwrap_or_default();
        ensure!(
            build["status"] == "failed" && error.contains(reason),
            "{request}: want failed with {reason:?}: {build}"
        );
        ensure!(
            build["attempts"] == 1,
            "a build failure is not retried: {build}"
        );
        println!("builds: failure {reason:?} -> {error}");
    }

    // A live log stream ends within a second of the build's end.
    let (_, build) = api.submit(&json!({"source": {"type": "git", "url": git.git_url("node-fn")}, "image": NODE, "command": "for i in 1 2 3; do echo tick $i; sleep 0.5; done"})).await?;
    let id = build["id"].as_str().context("no id")?.to_string();
    submitted.push(id.clone());
    let streamed = api.logs(&id).await?;
    let closed = Instant::now();
    let build = api.get(&id).await?;
    ensure!(
        build["status"] == "succeeded" && streamed.contains("tick 3"),
        "{build} {streamed}"
    );
    let finished = build["finishedAt"].as_f64().unwrap_or_default();
    let now = hearth_builds::unix_now();
    ensure!(
        now - finished < 1.0 + closed.elapsed().as_secs_f64(),
        "stream closed {:.2}s after the build",
        now - finished
    );

    // Cancel a running build: it ends cancelled and its runtime is gone.
    let id = api.submit_id(&json!({"source": {"type": "git", "url": git.git_url("node-fn")}, "image": NODE, "command": "sleep 60"})).await?;
    submitted.push(id.clone());
    let log_seen = api
        .wait_for(&id, LONG, |b| b["status"] == "running")
        .await?;
    ensure!(log_seen["attempts"] == 1, "{log_seen}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (status, build) = api.cancel(&id).await?;
    ensure!(
        status == 200 && build["status"] == "cancelled",
        "{status} {build}"
    );
    // The worker stops the build where it runs, then logs the cancel (asynchronously).
    let deadline = Instant::now() + Duration::from_secs(15);
    while !api.logs(&id).await?.contains("Build cancelled.") {
        ensure!(
            Instant::now() < deadline,
            "the worker did not stop the build"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let res = s.ex.get(&format!("/v1/runtimes/build-{id}")).send().await?;
    ensure!(
        res.status() == 404,
        "the cancelled build's runtime is still there"
    );
    let (status, body) = api.cancel(&id).await?;
    ensure!(
        status == 409 && body["type"] == "build_conflict",
        "{status} {body}"
    );

    // Bad input gets the spec's error body.
    let (status, body) = api
        .submit(&json!({"source": {"type": "git", "url": "ftp://x"}, "image": NODE}))
        .await?;
    ensure!(
        status == 400
            && body["type"] == "build_bad_request"
            && body["message"]
                .as_str()
                .unwrap_or_default()
                .contains("source.url"),
        "{status} {body}"
    );
    let res = api
        .http
        .post(format!("{}/v1/builds", api.url))
        .bearer_auth(SECRET)
        .body("{not json")
        .send()
        .await?;
    let (status, body) = json_reply(res).await?;
    ensure!(
        status == 400
            && body["message"]
                .as_str()
                .unwrap_or_default()
                .contains("not valid JSON"),
        "{status} {body}"
    );
    let res = api
        .http
        .get(format!("{}/v1/builds", api.url))
        .send()
        .await?;
    ensure!(res.status() == 401, "no key: {}", res.status());
    let huge = json!({"source": {"type": "git", "url": "https://x/y"}, "image": NODE, "pad": "x".repeat(2 << 20)});
    let (status, body) = api.submit(&huge).await?;
    ensure!(
        status == 413 && body["type"] == "build_bad_request",
        "{status} {body}"
    );
    let res = api
        .http
        .get(format!("{}/v1/builds/deadbeef", api.url))
        .bearer_auth(SECRET)
        .send()
        .await?;
    ensure!(res.status() == 404, "unknown build: {}", res.status());
    let res = api
        .http
        .get(format!("{}/v1/nothing", api.url))
        .bearer_auth(SECRET)
        .send()
        .await?;
    ensure!(res.status() == 404, "unknown route: {}", res.status());

    // Every build submitted finished, and the list agrees.
    let res = api
        .http
        .get(format!("{}/v1/builds?limit=1000", api.url))
        .bearer_auth(SECRET)
        .send()
        .await?;
    let (_, list) = json_reply(res).await?;
    let builds = list["builds"].as_array().context("no list")?.clone();
    let counts = by_status(&builds);
    println!(
        "builds: submitted {}, by status {counts:?}",
        submitted.len()
    );
    ensure!(
        builds.len() == submitted.len(),
        "{} listed, {} submitted",
        builds.len(),
        submitted.len()
    );
    ensure!(
        !counts.contains_key("queued") && !counts.contains_key("running"),
        "{counts:?}"
    );
    let names = std::process::Command::new("docker")
        .args(["ps", "-a", "--format", "{{.Names}} {{.Status}}", "--filter"])
        .arg(format!("label=hearth.executor={}", s.ex.name))
        .output()?;
    let names = String::from_utf8_lossy(&names.stdout);
    let build_runtimes = names.lines().filter(|l| l.contains("-build-")).count();
    ensure!(
        build_runtimes == 0 && names.lines().count() == 8,
        "runtimes left (want the 8 executions, no build runtime): {names}\nbuilds: {submitted:?}\n{}",
        service.logs()
    );
    hearth_builds::queue::Broker::new(
        &rabbit.url(),
        hearth_builds::queue::Topology::new(&s.options.queue),
    )
    .delete_topology()
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn builds_docker_survive_worker_kill_broker_restart_and_service_restart() -> Result<()> {
    let rabbit = Rabbit::start().await?;
    let git = GitServer::start().await?;
    let s = stack(
        &rabbit,
        "faults",
        &[
            ("HEARTH_BUILDS_LEASE", "4"),
            ("HEARTH_BUILDS_CONCURRENCY", "2"),
        ],
    )
    .await?;
    git.repository(
        "node-fn",
        &[(&[("index.js", &node_function("survivor"))], None)],
    )?;
    let mut api_process = BuildsProcess::start(&s.options, "api").await?;
    let api = BuildsClient::new(&api_process.url, SECRET);
    let mut submitted: Vec<String> = Vec::new();
    let submit = |command: &str| json!({"source": {"type": "git", "url": git.git_url("node-fn")}, "image": NODE, "entrypoint": "index.js", "command": command});

    // A worker SIGKILLed in the middle of a build: the job is redelivered and the build succeeds.
    let mut worker = BuildsProcess::start(&s.options, "worker").await?;
    let id = api.submit_id(&submit("sleep 5")).await?;
    submitted.push(id.clone());
    api.wait_for(&id, LONG, |b| b["status"] == "running")
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    worker.kill();
    let killed_at = Instant::now();
    let mut worker = BuildsProcess::start(&s.options, "worker").await?;
    let build = api.wait(&id, LONG).await?;
    ensure!(
        build["status"] == "succeeded" && build["attempts"] == 2,
        "after the kill: {build}"
    );
    let body = invoke(&s.ex, "after-kill", NODE, &artifact(&build)?, "index.js").await?;
    ensure!(body == "survivor", "{body}");
    println!(
        "builds: worker killed mid-build; redelivered and built in {:.1}s",
        killed_at.elapsed().as_secs_f64()
    );

    // A job delivered twice (here: published again by hand) builds once: the second delivery
    // waits on the first one's lease, and a delivery of a finished build changes nothing.
    let broker = hearth_builds::queue::Broker::new(
        &rabbit.url(),
        hearth_builds::queue::Topology::new(&s.options.queue),
    );
    let twice = api.submit_id(&submit("sleep 3")).await?;
    submitted.push(twice.clone());
    let again = hearth_builds::model::Job { id: twice.clone() };
    broker.publish_job(&again).await?;
    let first = api.wait(&twice, LONG).await?;
    ensure!(
        first["status"] == "succeeded" && first["attempts"] == 1,
        "duplicate delivery: {first}"
    );
    broker.publish_job(&again).await?;
    broker
        .publish_job(&hearth_builds::model::Job { id: id.clone() })
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure!(
        api.get(&twice).await? == first,
        "a finished build changed on redelivery"
    );
    ensure!(
        rabbit.queue_depth(&s.options.queue)? == 0,
        "duplicates left in the queue"
    );
    println!("builds: a job delivered 3 times built once");

    // RabbitMQ restarted with builds queued (no worker running): none is lost.
    worker.kill();
    let mut queued = Vec::new();
    for _ in 0..5 {
        queued.push(api.submit_id(&submit("")).await?);
    }
    submitted.extend(queued.iter().cloned());
    let depth = rabbit.queue_depth(&s.options.queue)?;
    ensure!(depth == 5, "{depth} jobs in the queue before the restart");
    rabbit.restart().await?;
    let depth = rabbit.queue_depth(&s.options.queue)?;
    ensure!(depth == 5, "{depth} jobs in the queue after the restart");
    let _worker = BuildsProcess::start(&s.options, "worker").await?;
    for id in &queued {
        let build = api.wait(id, LONG).await?;
        ensure!(
            build["status"] == "succeeded",
            "after the broker restart: {build}"
        );
    }
    // The API reconnects by itself, too.
    let id = api.submit_id(&submit("")).await?;
    submitted.push(id.clone());
    ensure!(
        api.wait(&id, LONG).await?["status"] == "succeeded",
        "build after the restart"
    );
    println!("builds: broker restarted with 5 builds queued; 5 of 5 built");

    // Infrastructure failures are retried with backoff, then dead-lettered.
    let mut unreachable = s.options.clone();
    unreachable.queue = format!("{}.dlq", s.options.queue);
    unreachable
        .extra
        .push(("HEARTH_BUILDS_EXECUTOR".into(), "http://127.0.0.1:9".into()));
    unreachable
        .extra
        .push(("HEARTH_BUILDS_MAX_ATTEMPTS".into(), "3".into()));
    let dlq_api_process = BuildsProcess::start(&unreachable, "all").await?;
    let dlq_api = BuildsClient::new(&dlq_api_process.url, SECRET);
    let dlq_id = dlq_api.submit_id(&submit("")).await?;
    submitted.push(dlq_id.clone());
    let build = dlq_api.wait(&dlq_id, LONG).await?;
    let error = build["error"].as_str().unwrap_or_default();
    ensure!(
        build["status"] == "failed"
            && build["attempts"] == 3
            && error.contains("gave up after 3 attempts"),
        "{build}"
    );
    let dead = rabbit.queue_depth(&format!("{}.dead", unreachable.queue))?;
    ensure!(dead == 1, "{dead} jobs dead-lettered");
    let log = dlq_api.logs(&dlq_id).await?;
    ensure!(
        log.contains("Retrying in 0.2 s") && log.contains("Retrying in 0.4 s"),
        "backoff: {log}"
    );
    println!(
        "builds: executor unreachable -> 3 attempts with backoff, then dead-lettered: {error}"
    );
    drop(dlq_api_process);

    // The build service restarted: every build's status is still there.
    let before: Vec<Value> = futures_util::future::try_join_all(
        submitted
            .iter()
            .filter(|i| **i != dlq_id)
            .map(|id| api.get(id)),
    )
    .await?;
    api_process.kill();
    let api_process = BuildsProcess::start(&s.options, "api").await?;
    let api = BuildsClient::new(&api_process.url, SECRET);
    for old in &before {
        let now = api.get(old["id"].as_str().unwrap_or_default()).await?;
        ensure!(&now == old, "after the restart: {now} (was {old})");
    }
    let finished = before.iter().filter(|b| b["status"] == "succeeded").count();
    println!(
        "builds: submitted {}, finished {} (+1 dead-lettered)",
        before.len(),
        finished
    );
    ensure!(
        finished == before.len(),
        "submitted {} vs finished {finished}",
        before.len()
    );

    // The broker down at submit time: a clear 503, and no build left behind without an id;
    // once it is back, the API and the worker carry on by themselves.
    let total = |api: BuildsClient| async move {
        let res = api
            .http
            .get(format!("{}/v1/builds?limit=1000", api.url))
            .bearer_auth(SECRET)
            .send()
            .await?;
        let (_, list) = json_reply(res).await?;
        Ok::<_, anyhow::Error>(list["total"].clone())
    };
    let known = total(api.clone()).await?;
    rabbit.stop()?;
    let (status, body) = api.submit(&submit("")).await?;
    ensure!(
        status == 503 && body["type"] == "build_queue_unavailable",
        "{status} {body}"
    );
    ensure!(
        total(api.clone()).await? == known,
        "a refused build was kept"
    );
    rabbit.start_again().await?;
    let id = api.submit_id(&submit("")).await?;
    ensure!(
        api.wait(&id, LONG).await?["status"] == "succeeded",
        "after the broker came back"
    );
    println!("builds: broker down at submit -> 503 {}", body["message"]);

    for queue in [&s.options.queue, &unreachable.queue] {
        hearth_builds::queue::Broker::new(
            &rabbit.url(),
            hearth_builds::queue::Topology::new(queue),
        )
        .delete_topology()
        .await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn builds_docker_s3_storage_from_git_and_upload() -> Result<()> {
    let s3 = hearth_tests::s3::S3Server::start().await?;
    let bucket = s3.bucket("hearth-builds").await?;
    let rabbit = Rabbit::start().await?;
    let git = GitServer::start().await?;
    git.repository(
        "node-fn",
        &[(&[("index.js", &node_function("from s3"))], None)],
    )?;
    let mut ex_options = Options::named("builds-s3");
    ex_options.storage_dsn = Some(s3.dsn("hearth-builds"));
    let ex = TestExecutor::start(ex_options).await?;
    let state = TempDir::new("hearth-builds-s3")?;
    let mut options = ServiceOptions::new(&ex, &rabbit, "s3", &state.0);
    options.extra.push((
        "OPR_EXECUTOR_CONNECTION_STORAGE".into(),
        s3.dsn("hearth-builds"),
    ));
    let service = BuildsProcess::start(&options, "all").await?;
    let api = BuildsClient::new(&service.url, SECRET);

    // From git: the packed source and the artifact both live in the bucket.
    let id = api
        .submit_id(&git_build(&git.git_url("node-fn"), None, NODE, "index.js"))
        .await?;
    let build = api.wait(&id, LONG).await?;
    let path = artifact(&build)?;
    ensure!(path.starts_with(&format!("/builds/{id}/")), "{path}");
    let http = reqwest::Client::new();
    for object in [format!("/builds/{id}/source.tar.gz"), path.clone()] {
        let res = http.get(format!("{bucket}{object}")).send().await?;
        ensure!(res.status().is_success(), "{object} is not in the bucket");
    }
    ensure!(
        invoke(&ex, "s3-git", NODE, &path, "index.js").await? == "from s3",
        "git body"
    );

    // An upload goes to the bucket too, and builds as an archive source.
    let staging = TempDir::new("hearth-upload")?;
    let archive = staging.0.join("example.tar.gz");
    hearth_builds::fetch::pack(
        hearth_tests::runtime::repo_root().join("runtimes/node/example"),
        archive.clone(),
        1 << 20,
    )
    .await?;
    let res = http
        .post(format!("{}/v1/uploads", service.url))
        .bearer_auth(SECRET)
        .body(std::fs::read(&archive)?)
        .send()
        .await?;
    let (status, upload) = json_reply(res).await?;
    ensure!(status == 201, "upload: {status} {upload}");
    let uploaded = upload["path"].as_str().context("no path")?.to_string();
    ensure!(uploaded.starts_with("/uploads/"), "{uploaded}");
    let id = api.submit_id(&json!({"source": {"type": "archive", "path": uploaded}, "image": NODE, "entrypoint": "index.js"})).await?;
    let build = api.wait(&id, LONG).await?;
    ensure!(
        invoke(&ex, "s3-upload", NODE, &artifact(&build)?, "index.js").await? == "Hello, World!",
        "upload body"
    );

    // Not a gzip, and a missing archive: clear refusals.
    let res = http
        .post(format!("{}/v1/uploads", service.url))
        .bearer_auth(SECRET)
        .body("plain text")
        .send()
        .await?;
    let (status, body) = json_reply(res).await?;
    ensure!(
        status == 400
            && body["message"]
                .as_str()
                .unwrap_or_default()
                .contains(".tar.gz"),
        "{status} {body}"
    );
    let (_, build) = api
        .submit(
            &json!({"source": {"type": "archive", "path": "/uploads/none.tar.gz"}, "image": NODE}),
        )
        .await?;
    let build = api
        .wait(build["id"].as_str().context("no id")?, LONG)
        .await?;
    ensure!(
        build["status"] == "failed"
            && build["error"]
                .as_str()
                .unwrap_or_default()
                .contains("not found"),
        "{build}"
    );
    hearth_builds::queue::Broker::new(
        &rabbit.url(),
        hearth_builds::queue::Topology::new(&options.queue),
    )
    .delete_topology()
    .await?;
    Ok(())
}
