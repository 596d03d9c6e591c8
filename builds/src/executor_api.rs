//! The executor, as a build worker calls it: its own API (`POST /v1/runtimes` with `command`,
//! `destination` and `remove`), as upstream's callers do, so builds run in one place and spread
//! over executors through the balancer. The live log comes from the runtime's log stream.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::model::Artifact;

#[derive(Clone)]
pub struct ExecutorClient {
    base: String,
    secret: String,
    http: reqwest::Client,
}

fn unreachable(op: &str, err: reqwest::Error) -> Error {
    Error::Executor(format!("failed to {op} on the executor: {err}"))
}

impl ExecutorClient {
    pub fn new(base: &str, secret: &str) -> Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| Error::Executor(format!("failed to make an HTTP client: {e}")))?;
        Ok(Self {
            base: base.trim_end_matches('/').to_string(),
            secret: secret.to_string(),
            http,
        })
    }

    /// Removes a runtime; a runtime that is not there is fine.
    pub async fn delete_runtime(&self, runtime_id: &str) -> Result<()> {
        let response = self
            .http
            .delete(format!("{}/v1/runtimes/{runtime_id}", self.base))
            .bearer_auth(&self.secret)
            .timeout(Duration::from_secs(60))
            .send()
            .await
            .map_err(|e| unreachable("remove a build runtime", e))?;
        match response.status().as_u16() {
            200..=299 | 404 => Ok(()),
            status => Err(Error::Executor(format!(
                "the executor answered {status} to removing runtime {runtime_id}: {}",
                response.text().await.unwrap_or_default()
            ))),
        }
    }

    /// Runs a build (`body` is the create request) and returns its artifact. A failing build is
    /// [`Error::BuildFailed`] with the executor's last line; an executor that fails on its side
    /// or cannot be reached is [`Error::Executor`].
    pub async fn build(&self, body: &Value, timeout: Duration) -> Result<Artifact> {
        let response = self
            .http
            .post(format!("{}/v1/runtimes", self.base))
            .bearer_auth(&self.secret)
            .header("accept", "application/json")
            .json(body)
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| unreachable("run a build", e))?;
        let status = response.status();
        let reply: Value = response.json().await.map_err(|e| {
            Error::Executor(format!(
                "the executor's build reply ({status}) is not JSON: {e}"
            ))
        })?;
        if status.is_success() {
            let path = reply["path"].as_str().unwrap_or_default().to_string();
            let size = reply["size"].as_u64().unwrap_or_default();
            if path.is_empty() {
                return Err(Error::Executor(
                    "the executor's build reply has no artifact path".into(),
                ));
            }
            return Ok(Artifact { path, size });
        }
        let kind = reply["type"].as_str().unwrap_or("unknown");
        let message = reply["message"].as_str().unwrap_or_default();
        if status.is_client_error() && status.as_u16() != 409 {
            // The output is in the build log; the reason is the executor's last line.
            let last = message
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or(kind);
            return Err(Error::BuildFailed(format!("{kind}: {last}")));
        }
        Err(Error::Executor(format!(
            "the executor answered {status} ({kind}) to a build: {message}"
        )))
    }

    /// Follows a runtime's build log, sending each line (with its `\n`) to `sink`, until the
    /// stream ends.
    pub async fn follow_logs(
        &self,
        runtime_id: &str,
        timeout: Duration,
        sink: tokio::sync::mpsc::UnboundedSender<String>,
    ) {
        let request = self
            .http
            .get(format!("{}/v1/runtimes/{runtime_id}/logs", self.base))
            .query(&[("timeout", timeout.as_secs().to_string())])
            .bearer_auth(&self.secret)
            .timeout(timeout + Duration::from_secs(5));
        let Ok(response) = request.send().await else {
            return;
        };
        if !response.status().is_success() {
            return;
        }
        let mut stream = response.bytes_stream();
        let mut pending = Vec::new();
        while let Some(Ok(chunk)) = stream.next().await {
            pending.extend_from_slice(&chunk);
            while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                let _ = sink.send(String::from_utf8_lossy(&line).into_owned());
            }
        }
        if !pending.is_empty() {
            pending.push(b'\n');
            let _ = sink.send(String::from_utf8_lossy(&pending).into_owned());
        }
    }
}
