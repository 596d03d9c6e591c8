//! A local S3-compatible server for storage tests: moto's (`pip install "moto[server]"`, which
//! `.ci/run` installs) on 127.0.0.1, stopped on drop.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};

pub struct S3Server {
    child: std::process::Child,
    pub url: String,
}

impl S3Server {
    pub async fn start() -> Result<Self> {
        let port = crate::builds::free_port()?;
        let child = std::process::Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("moto_server is missing: pip install \"moto[server]\"")?;
        let server = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while reqwest::get(&server.url).await.is_err() {
            ensure!(Instant::now() < deadline, "moto_server did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(server)
    }

    /// Creates a bucket; returns its URL.
    pub async fn bucket(&self, name: &str) -> Result<String> {
        let bucket = format!("{}/{name}", self.url);
        let res = reqwest::Client::new().put(&bucket).send().await?;
        ensure!(res.status().is_success(), "bucket {name}: {}", res.status());
        Ok(bucket)
    }

    /// The storage connection (`OPR_EXECUTOR_CONNECTION_STORAGE`) for a bucket of this server.
    pub fn dsn(&self, bucket: &str) -> String {
        let host = self.url.trim_start_matches("http://");
        format!("s3://key:secret@{host}/{bucket}?region=us-east-1&insecure=true")
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
