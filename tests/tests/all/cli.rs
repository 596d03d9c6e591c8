//! The `hearth` command end to end (needs Docker): a real executor behind the real balancer,
//! the build service with RabbitMQ, git repositories on 127.0.0.1, and the `hearth` binary run
//! as a user would.

use std::process::Output;

use anyhow::{ensure, Context, Result};
use hearth_tests::balancer::TestBalancer;
use hearth_tests::builds::{workspace_binary, BuildsProcess, GitServer, Rabbit, ServiceOptions};
use hearth_tests::executor::{Options, TempDir, TestExecutor, SECRET};

struct Hearth {
    endpoint: String,
    secret: String,
}

impl Hearth {
    fn run(&self, args: &[&str]) -> Result<Output> {
        let output = std::process::Command::new(workspace_binary("hearth-cli", "hearth")?)
            .args(["--endpoint", &self.endpoint, "--secret", &self.secret])
            .args(args)
            .env_remove("OPR_EXECUTOR_SECRET")
            .output()?;
        Ok(output)
    }

    /// Runs and expects success; returns stdout.
    fn ok(&self, args: &[&str]) -> Result<String> {
        let output = self.run(args)?;
        ensure!(
            output.status.success(),
            "hearth {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Runs and expects a failure whose last stderr line contains `needle`; returns that line.
    fn fails(&self, args: &[&str], needle: &str) -> Result<String> {
        let output = self.run(args)?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        let last = stderr.lines().last().unwrap_or_default().to_string();
        ensure!(
            !output.status.success(),
            "hearth {args:?} should fail: {stderr}"
        );
        ensure!(
            last.starts_with("hearth: ") && last.contains(needle),
            "hearth {args:?}: {stderr}"
        );
        Ok(last)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cli_docker_deploy_invoke_ls_rm_from_git_and_folder() -> Result<()> {
    let rabbit = Rabbit::start().await?;
    let git = GitServer::start().await?;
    let ex = TestExecutor::start(Options::named("cli")).await?;
    let state = TempDir::new("hearth-cli-state")?;
    let options = ServiceOptions::new(&ex, &rabbit, "cli", &state.0);
    let service = BuildsProcess::start(&options, "all").await?;
    let balancer = TestBalancer::start(vec![ex.url.clone()], SECRET, |c| {
        c.builds = Some(service.url.clone());
    })
    .await?;
    let hearth = Hearth {
        endpoint: balancer.url.clone(),
        secret: SECRET.to_string(),
    };
    let py = |text: &str| {
        format!("async def main(context):\n    return context.res.text('{text} ' + context.req.body_text)\n")
    };
    git.repository(
        "greeter",
        &[
            (&[("main.py", &py("hello"))], Some("v1")),
            (&[("main.py", &py("hi"))], None),
        ],
    )?;

    // From git (the name is the repository's), then invoke.
    let url = git.git_url("greeter");
    let out = hearth.ok(&[
        "deploy",
        &url,
        "--runtime",
        "hearth/python:v5-3.11",
        "--entrypoint",
        "main.py",
        "--ref",
        "v1",
    ])?;
    ensure!(out.contains("hearth invoke greeter"), "{out}");
    let body = hearth.ok(&["invoke", "greeter", "--data", "Ada"])?;
    ensure!(body == "hello Ada", "{body:?}");
    // Redeploy from main: the name now runs the new build.
    hearth.ok(&[
        "deploy",
        &url,
        "--runtime",
        "hearth/python:v5-3.11",
        "--entrypoint",
        "main.py",
    ])?;
    let body = hearth.ok(&["invoke", "greeter", "--data", "Ada"])?;
    ensure!(body == "hi Ada", "after the redeploy: {body:?}");

    // From a local folder (uploaded), with a name.
    let folder = hearth_tests::runtime::repo_root().join("runtimes/node/example");
    hearth.ok(&[
        "deploy",
        &folder.display().to_string(),
        "--runtime",
        "hearth/node:v5-18",
        "--entrypoint",
        "index.js",
        "--name",
        "hello-node",
    ])?;
    let body = hearth.ok(&["invoke", "hello-node", "--method", "GET"])?;
    ensure!(body == "Hello, World!", "{body:?}");

    let list = hearth.ok(&["ls"])?;
    ensure!(
        list.contains("greeter\thearth/python:v5-3.11")
            && list.contains("hello-node\thearth/node:v5-18"),
        "{list}"
    );
    hearth.ok(&["rm", "hello-node"])?;
    ensure!(
        !hearth.ok(&["ls"])?.contains("hello-node"),
        "removed function still listed"
    );

    // Bad input: one clear line and a non-zero exit.
    hearth.fails(
        &["invoke", "hello-node"],
        "no function named \"hello-node\"",
    )?;
    hearth.fails(
        &[
            "deploy",
            "ftp://example.test/x.git",
            "--runtime",
            "hearth/node:v5-18",
        ],
        "neither a folder nor a git URL",
    )?;
    let line = hearth.fails(
        &[
            "deploy",
            &git.git_url("missing"),
            "--runtime",
            "hearth/node:v5-18",
        ],
        "could not be read",
    )?;
    println!("cli: {line}");
    let unreachable = Hearth {
        endpoint: "http://127.0.0.1:9".into(),
        secret: SECRET.into(),
    };
    println!(
        "cli: {}",
        unreachable.fails(&["ls"], "cannot reach Hearth at http://127.0.0.1:9")?
    );
    let wrong = Hearth {
        endpoint: balancer.url.clone(),
        secret: "wrong".into(),
    };
    println!("cli: {}", wrong.fails(&["ls"], "refused the secret")?);

    hearth_builds::queue::Broker::new(
        &rabbit.url(),
        hearth_builds::queue::Topology::new(&options.queue),
    )
    .delete_topology()
    .await
    .context("queue cleanup")?;
    Ok(())
}
