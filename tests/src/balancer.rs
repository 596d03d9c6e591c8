//! The real balancer (`hearth-balancer`) served in-process on 127.0.0.1 in front of test
//! executors, and a fake executor for the failure cases that need no Docker. Dropping either
//! stops it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use hearth_balancer::{Balancer, Config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

pub struct TestBalancer {
    pub url: String,
    pub balancer: Arc<Balancer>,
    stop: Option<oneshot::Sender<()>>,
}

impl TestBalancer {
    /// Serves a balancer over `executors` (URLs) with test timings (fast probes, 1 s header
    /// timeout); `tune` adjusts the config first.
    pub async fn start(
        executors: Vec<String>,
        secret: &str,
        tune: impl FnOnce(&mut Config),
    ) -> Result<Self> {
        let mut config = Config::for_tests(executors, secret);
        tune(&mut config);
        let balancer = Balancer::new(config)?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let (stop, stopped) = oneshot::channel::<()>();
        let serving = balancer.clone();
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.await;
            };
            if let Err(err) = hearth_balancer::run(serving, listener, shutdown).await {
                eprintln!("balancer stopped with an error: {err:#}");
            }
        });
        Ok(Self {
            url,
            balancer,
            stop: Some(stop),
        })
    }

    /// The balancer's own metric (first line starting with `name`).
    pub fn metric(&self, name: &str) -> Option<f64> {
        let text = self.balancer.metrics.render(0, 0);
        text.lines().find_map(|l| {
            l.strip_prefix(name)
                .and_then(|rest| rest.trim().parse().ok())
        })
    }

    /// Waits until `n` executors are healthy.
    pub async fn wait_healthy(&self, n: usize, within: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + within;
        while self.balancer.pool.available().len() != n {
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "{} healthy executors, want {n}",
                self.balancer.pool.available().len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }
}

impl Drop for TestBalancer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// How a [`FakeExecutor`] treats each connection.
#[derive(Debug, Clone, Copy)]
pub enum Fake {
    /// Answers `200 OK` to anything (a healthy executor's `/v1/health`).
    Healthy,
    /// Answers health probes, then reads a call and drops the connection: a crash mid-request.
    DropsCalls,
}

/// A minimal HTTP/1.1 server standing in for an executor.
pub struct FakeExecutor {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl FakeExecutor {
    pub async fn start(behaviour: Fake, addr: &str) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            // Connections live in the set: stopping the fake closes them all, like a crash.
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((mut stream, _)) = listener.accept().await {
                connections.spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let Ok(n) = stream.read(&mut buf).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        let head = String::from_utf8_lossy(&buf[..n]);
                        let health = head.starts_with("GET /v1/health");
                        if matches!(behaviour, Fake::DropsCalls) && !health {
                            return;
                        }
                        let reply = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nOK";
                        if stream.write_all(reply.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Ok(Self { addr, task })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for FakeExecutor {
    fn drop(&mut self) {
        self.task.abort();
    }
}
