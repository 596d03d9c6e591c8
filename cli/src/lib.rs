//! The `hearth` command: deploy a function from a folder or a git URL (through the build API,
//! with its live log), invoke it, follow a build's log, list and remove functions. It talks to
//! one endpoint (the balancer serves the executor and build APIs), with the executor's secret
//! from `--secret`, `OPR_EXECUTOR_SECRET`, or the stack's `.env`.
//!
//! Layout: [`Cli`] (the commands), [`run`] (what each does), [`Api`] (the HTTP calls and the one
//! place HTTP failures become messages that say what to do next).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use serde_json::{json, Value};

#[derive(Debug, Parser)]
#[command(name = "hearth", about = "Deploy and run functions on Hearth")]
pub struct Cli {
    /// Hearth's endpoint (the balancer).
    #[arg(
        long,
        global = true,
        env = "HEARTH_ENDPOINT",
        default_value = "http://127.0.0.1:8080"
    )]
    pub endpoint: String,
    /// The API key; default: OPR_EXECUTOR_SECRET, else the stack's .env (here or above).
    #[arg(
        long,
        global = true,
        env = "OPR_EXECUTOR_SECRET",
        hide_env_values = true
    )]
    pub secret: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build a folder or a git repository and make it the function's current version.
    Deploy {
        /// A folder, or a git URL (https://, http://, git://, ssh://, file://).
        source: String,
        /// Runtime image, e.g. hearth/node:v5-18, hearth/python:v5-3.11, hearth/wasm:v5-1.
        #[arg(long)]
        runtime: String,
        /// Function name (default: the folder's or the repository's name).
        #[arg(long)]
        name: Option<String>,
        #[arg(long, default_value = "")]
        entrypoint: String,
        /// Install command run by the image's build step (e.g. "npm install").
        #[arg(long, default_value = "")]
        command: String,
        /// Git branch, tag or commit.
        #[arg(long = "ref")]
        reference: Option<String>,
        /// Folder inside the git repository.
        #[arg(long)]
        subdirectory: Option<String>,
        /// Build timeout in seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Call a function; its response body goes to stdout, its logs and errors to stderr.
    Invoke {
        function: String,
        #[arg(long, conflicts_with = "data_file")]
        data: Option<String>,
        #[arg(long)]
        data_file: Option<PathBuf>,
        #[arg(long, default_value = "POST")]
        method: String,
        #[arg(long, default_value = "/")]
        path: String,
        /// A request header, `Name: value` (repeatable).
        #[arg(long = "header")]
        headers: Vec<String>,
    },
    /// Follow a build's log to its end.
    Logs { build: String },
    /// List deployed functions.
    Ls,
    /// Remove a function (and its runtime).
    Rm { function: String },
}

/// The endpoint, as the CLI calls it.
pub struct Api {
    endpoint: String,
    secret: String,
    http: reqwest::Client,
}

impl Api {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.endpoint.trim_end_matches('/'))
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        let response = request.bearer_auth(&self.secret).send().await.map_err(|err| {
            if err.is_connect() || err.is_timeout() {
                anyhow::anyhow!("cannot reach Hearth at {}: is the stack up (make up)? Or set --endpoint / HEARTH_ENDPOINT", self.endpoint)
            } else {
                anyhow::anyhow!("request to {} failed: {err}", self.endpoint)
            }
        })?;
        if response.status() == 401 {
            bail!("{} refused the secret: pass --secret or set OPR_EXECUTOR_SECRET to the stack's (in its .env)", self.endpoint);
        }
        Ok(response)
    }

    /// A JSON call; an error status becomes the API's message.
    async fn json(&self, request: reqwest::RequestBuilder) -> Result<Value> {
        let response = self.send(request).await?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if !status.is_success() {
            let message = body["message"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| body.to_string());
            bail!("{message} ({status})");
        }
        Ok(body)
    }

    async fn function(&self, name: &str) -> Result<Value> {
        self.json(self.http.get(self.url(&format!("/v1/functions/{name}"))))
            .await
            .map_err(|err| {
                if err.to_string().contains("(404") {
                    anyhow::anyhow!("no function named {name:?}: deploy it with `hearth deploy <dir|git-url> --runtime <image> --name {name}` (see `hearth ls`)")
                } else {
                    err
                }
            })
    }

    /// Prints a build's log lines (content only) until the build ends.
    async fn follow(&self, build: &str) -> Result<()> {
        let response = self
            .send(self.http.get(self.url(&format!("/v1/builds/{build}/logs"))))
            .await?;
        if !response.status().is_success() {
            bail!("no build {build} ({})", response.status());
        }
        let mut stream = response.bytes_stream();
        let mut pending = Vec::new();
        while let Some(chunk) = stream.next().await {
            pending.extend_from_slice(&chunk.context("the log stream broke")?);
            while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                let line = String::from_utf8_lossy(&line);
                let content = line.split_once(' ').map_or(line.as_ref(), |(_, c)| c);
                let content = content.trim_end().replace("\\n", "\n");
                for part in content.lines().filter(|l| !l.trim().is_empty()) {
                    eprintln!("  | {part}");
                }
            }
        }
        Ok(())
    }
}

/// The secret from the flag or env, else `OPR_EXECUTOR_SECRET=` in `.env` here or in a parent.
fn find_secret(given: Option<String>) -> Result<String> {
    if let Some(secret) = given.filter(|s| !s.is_empty()) {
        return Ok(secret);
    }
    let mut dir = std::env::current_dir().ok();
    while let Some(folder) = dir {
        if let Ok(text) = std::fs::read_to_string(folder.join(".env")) {
            if let Some(secret) = text
                .lines()
                .find_map(|l| l.strip_prefix("OPR_EXECUTOR_SECRET="))
            {
                return Ok(secret.trim().to_string());
            }
        }
        dir = folder.parent().map(Path::to_path_buf);
    }
    bail!("no secret: pass --secret, set OPR_EXECUTOR_SECRET, or run from the stack's folder (its .env has it)")
}

/// A function name from a folder or repository name: lowercase, letters, digits and `-`.
fn default_name(source: &str) -> String {
    let last = source
        .trim_end_matches('/')
        .rsplit(['/', ':'])
        .next()
        .unwrap_or_default();
    let last = last.strip_suffix(".git").unwrap_or(last);
    let name: String = last
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    name.trim_matches('-').chars().take(48).collect()
}

pub async fn run(cli: Cli) -> Result<()> {
    let api = Api {
        endpoint: cli.endpoint.clone(),
        secret: find_secret(cli.secret.clone())?,
        http: reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()?,
    };
    match cli.command {
        Command::Deploy {
            source,
            runtime,
            name,
            entrypoint,
            command,
            reference,
            subdirectory,
            timeout,
        } => {
            let folder = Path::new(&source);
            let name = name.unwrap_or_else(|| {
                let base = if folder.is_dir() {
                    folder
                        .canonicalize()
                        .ok()
                        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                        .unwrap_or_default()
                } else {
                    source.clone()
                };
                default_name(&base)
            });
            if !hearth_builds::model::valid_function_name(&name) {
                bail!("invalid function name {name:?}: lowercase letters, digits and -, at most 48 (pass --name)");
            }
            let source_json = if folder.is_dir() {
                if reference.is_some() || subdirectory.is_some() {
                    bail!("--ref and --subdirectory are for git URLs; {source} is a folder");
                }
                let archive = std::env::temp_dir()
                    .join(format!("hearth-deploy-{}.tar.gz", std::process::id()));
                let packed = hearth_builds::fetch::pack(
                    folder.to_path_buf(),
                    archive.clone(),
                    100 * 1024 * 1024,
                )
                .await;
                let packed = packed.map_err(|err| anyhow::anyhow!("cannot pack {source}: {err}"));
                let bytes = packed
                    .and_then(|_| std::fs::read(&archive).context("cannot read the packed folder"));
                let _ = std::fs::remove_file(&archive);
                let bytes = bytes?;
                eprintln!("Uploading {source} ({} bytes packed)…", bytes.len());
                let uploaded = api
                    .json(api.http.post(api.url("/v1/uploads")).body(bytes))
                    .await?;
                json!({"type": "archive", "path": uploaded["path"]})
            } else if ["https://", "http://", "git://", "ssh://", "file://"]
                .iter()
                .any(|s| source.starts_with(s))
            {
                let mut git = json!({"type": "git", "url": source});
                if let Some(reference) = &reference {
                    git["ref"] = json!(reference);
                }
                if let Some(sub) = &subdirectory {
                    git["subdirectory"] = json!(sub);
                }
                git
            } else {
                bail!("{source} is neither a folder nor a git URL (https://, http://, git://, ssh://, file://)");
            };
            let request = json!({
                "source": source_json, "image": runtime, "entrypoint": entrypoint,
                "command": command, "timeout": timeout, "function": name,
            });
            let build = api
                .json(api.http.post(api.url("/v1/builds")).json(&request))
                .await?;
            let id = build["id"]
                .as_str()
                .context("the build API answered without an id")?
                .to_string();
            eprintln!("Building {name} (build {id}) on {runtime}…");
            let begun = Instant::now();
            api.follow(&id).await?;
            let build = api
                .json(api.http.get(api.url(&format!("/v1/builds/{id}"))))
                .await?;
            match build["status"].as_str() {
                Some("succeeded") => {
                    eprintln!(
                        "Deployed {name} in {:.1} s (build {id}{}).",
                        begun.elapsed().as_secs_f64(),
                        build["commit"]
                            .as_str()
                            .map(|c| format!(", commit {}", &c[..c.len().min(12)]))
                            .unwrap_or_default()
                    );
                    println!("hearth invoke {name}");
                    Ok(())
                }
                Some(status) => bail!(
                    "build {id} {status}: {} (full log: hearth logs {id})",
                    build["error"].as_str().unwrap_or("no reason given")
                ),
                None => bail!("build {id} has no status"),
            }
        }
        Command::Invoke {
            function,
            data,
            data_file,
            method,
            path,
            headers,
        } => {
            let deployed = api.function(&function).await?;
            let body = match (data, data_file) {
                (Some(data), _) => data,
                (None, Some(file)) => std::fs::read_to_string(&file)
                    .with_context(|| format!("cannot read {}", file.display()))?,
                (None, None) => String::new(),
            };
            let mut header_map = serde_json::Map::new();
            for header in &headers {
                let (key, value) = header
                    .split_once(':')
                    .with_context(|| format!("--header {header:?} is not `Name: value`"))?;
                header_map.insert(key.trim().to_ascii_lowercase(), json!(value.trim()));
            }
            let runtime_id = deployed["runtimeId"]
                .as_str()
                .context("the function has no runtime id")?;
            let request = json!({
                "image": deployed["image"], "source": deployed["artifact"]["path"],
                "entrypoint": deployed["entrypoint"], "version": deployed["version"],
                "body": body, "method": method.to_ascii_uppercase(), "path": path,
                "headers": header_map, "timeout": 30,
            });
            let reply = api
                .json(
                    api.http
                        .post(api.url(&format!("/v1/runtimes/{runtime_id}/executions")))
                        .header("accept", "application/json")
                        .json(&request),
                )
                .await?;
            for (field, label) in [("logs", "log"), ("errors", "error")] {
                for line in reply[field].as_str().unwrap_or_default().lines() {
                    eprintln!("[{label}] {line}");
                }
            }
            print!("{}", reply["body"].as_str().unwrap_or_default());
            let status = reply["statusCode"].as_u64().unwrap_or(0);
            if status >= 400 {
                bail!("{function} answered {status}");
            }
            Ok(())
        }
        Command::Logs { build } => api.follow(&build).await,
        Command::Ls => {
            let list = api.json(api.http.get(api.url("/v1/functions"))).await?;
            let functions = list["functions"].as_array().cloned().unwrap_or_default();
            if functions.is_empty() {
                eprintln!("No functions yet: hearth deploy <dir|git-url> --runtime <image>");
            }
            for f in functions {
                println!(
                    "{}\t{}\t{}\tbuild {}",
                    f["name"].as_str().unwrap_or("?"),
                    f["image"].as_str().unwrap_or("?"),
                    f["entrypoint"].as_str().unwrap_or(""),
                    f["build"].as_str().unwrap_or("?")
                );
            }
            Ok(())
        }
        Command::Rm { function } => {
            let deployed = api.function(&function).await?;
            api.json(
                api.http
                    .delete(api.url(&format!("/v1/functions/{function}"))),
            )
            .await?;
            if let Some(runtime) = deployed["runtimeId"].as_str() {
                // The runtime may be gone already (reaped when idle): that is fine.
                let _ = api
                    .send(api.http.delete(api.url(&format!("/v1/runtimes/{runtime}"))))
                    .await;
            }
            eprintln!("Removed {function}.");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_folders_and_repositories() {
        assert_eq!(
            default_name("https://example.test/team/Hello_World.git"),
            "hello-world"
        );
        assert_eq!(default_name("/home/me/fns/resize/"), "resize");
        assert_eq!(default_name("git@host:team/thumbs.git"), "thumbs");
    }
}
