//! Builds: the create route's `command` runs inside the runtime under `script` (so tools see a
//! terminal and output arrives as it is written); every chunk is timestamped as it arrives, kept
//! (capped at 1,000,000 bytes) for the reply, and published to live log-stream readers.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::watch;

use super::{random_hex, unix_now, Executor, Runtime, RuntimeParams};
use crate::error::{Error, Result};

/// Most bytes of build output kept and returned.
pub const BUILD_OUTPUT_CAP: usize = 1_000_000;
const TRUNCATED_NOTICE: &str = "Build output truncated: it exceeded 1000000 bytes.";
/// Where a build leaves its artifact inside the runtime.
const ARTIFACT: &str = "/mnt/code/code.tar.gz";

/// One chunk of build output.
#[derive(Debug, Clone, Serialize)]
pub struct LogEntry {
    pub timestamp: String,
    pub content: String,
}

/// The reply of a build.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildReport {
    pub output: Vec<LogEntry>,
    pub start_time: f64,
    pub duration: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

#[derive(Default)]
struct LogState {
    entries: Vec<LogEntry>,
    bytes: usize,
    truncated: bool,
    /// Bytes of an unfinished UTF-8 sequence carried to the next chunk.
    pending: Vec<u8>,
}

/// A build's output: appended by the build, read by the reply and by log-stream readers.
pub struct BuildLog {
    state: Mutex<LogState>,
    /// (entries so far, finished); readers wait on changes.
    progress: watch::Sender<(usize, bool)>,
}

impl Default for BuildLog {
    fn default() -> Self {
        Self {
            state: Mutex::new(LogState::default()),
            progress: watch::channel((0, false)).0,
        }
    }
}

impl BuildLog {
    fn lock(&self) -> std::sync::MutexGuard<'_, LogState> {
        match self.state.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Appends a chunk of raw output.
    pub fn push(&self, chunk: &[u8]) {
        let count = {
            let mut state = self.lock();
            if state.truncated {
                return;
            }
            let mut bytes = std::mem::take(&mut state.pending);
            bytes.extend_from_slice(chunk);
            // Keep an incomplete trailing UTF-8 sequence for the next chunk.
            let valid = match std::str::from_utf8(&bytes) {
                Ok(_) => bytes.len(),
                Err(err) if err.error_len().is_none() => err.valid_up_to(),
                Err(_) => bytes.len(),
            };
            state.pending = bytes.split_off(valid);
            let mut text = String::from_utf8_lossy(&bytes).replace("\r\n", "\n");
            if text.is_empty() {
                return;
            }
            let room = BUILD_OUTPUT_CAP.saturating_sub(state.bytes);
            if text.len() > room {
                let mut cut = room;
                while !text.is_char_boundary(cut) {
                    cut -= 1;
                }
                text.truncate(cut);
                state.truncated = true;
            }
            state.bytes += text.len();
            let timestamp = timestamp_now();
            if !text.is_empty() {
                state.entries.push(LogEntry {
                    timestamp: timestamp.clone(),
                    content: text,
                });
            }
            if state.truncated {
                state.entries.push(LogEntry {
                    timestamp,
                    content: format!("\n{TRUNCATED_NOTICE}"),
                });
            }
            state.entries.len()
        };
        self.progress.send_modify(|p| p.0 = count);
    }

    /// Marks the build as ended; readers drain and stop.
    pub fn finish(&self) {
        let count = self.lock().entries.len();
        self.progress.send_modify(|p| *p = (count, true));
    }

    pub fn entries(&self) -> Vec<LogEntry> {
        self.lock().entries.clone()
    }

    /// The entries from index `from` on, and whether the build has ended.
    pub fn since(&self, from: usize) -> (Vec<LogEntry>, bool) {
        let finished = self.progress.borrow().1;
        let state = self.lock();
        let entries = state
            .entries
            .get(from..)
            .map(<[LogEntry]>::to_vec)
            .unwrap_or_default();
        (entries, finished)
    }

    pub fn subscribe(&self) -> watch::Receiver<(usize, bool)> {
        self.progress.subscribe()
    }

    fn text(&self) -> String {
        self.lock()
            .entries
            .iter()
            .map(|e| e.content.as_str())
            .collect()
    }
}

/// `2026-01-01T00:00:00.000+00:00`, as upstream prints build log timestamps.
pub fn timestamp_now() -> String {
    chrono::Utc::now()
        .format("%Y-%m-%dT%H:%M:%S%.3f+00:00")
        .to_string()
}

impl Executor {
    /// Runs the build command in the started runtime and, with `destination`, stores its
    /// artifact.
    pub(super) async fn run_build(
        &self,
        runtime: &Arc<Runtime>,
        params: &RuntimeParams,
    ) -> Result<BuildReport> {
        let start_time = unix_now();
        let begun = Instant::now();
        let container = runtime
            .container_id()
            .ok_or_else(|| Error::Internal("build runtime has no container".to_string()))?;
        let cmd = [
            "script".to_string(),
            "--quiet".to_string(),
            "--return".to_string(),
            "--flush".to_string(),
            "--command".to_string(),
            params.command.clone(),
            "/dev/null".to_string(),
        ];
        let log = &runtime.build_log;
        let sink = |chunk: &[u8]| log.push(chunk);
        let timeout = Duration::from_secs(params.timeout.max(1));
        let exit = self.adapter.exec(container, &cmd, timeout, &sink).await;
        match exit {
            Ok(exit) if exit.exit_code == 0 => {}
            Ok(exit) => {
                return Err(Error::BuildFailed(format!(
                    "{}\nBuild command exited with code {}.",
                    log.text().trim_end(),
                    exit.exit_code
                )))
            }
            Err(hearth_adapters::Error::Timeout(_)) => {
                return Err(Error::BuildFailed(format!(
                    "{}\nBuild timed out after {} seconds.",
                    log.text().trim_end(),
                    params.timeout
                )))
            }
            Err(err) => {
                return Err(Error::RuntimeFailed(format!(
                    "Failed to run the build: {err}"
                )))
            }
        }

        let (size, path) = if params.destination.is_empty() {
            (None, None)
        } else {
            let name = format!(
                "{}/{}.gz",
                params.destination.trim_end_matches('/'),
                random_hex(20)
            );
            let object = self.storage.object_path("destination", &name)?;
            let stream = match self.adapter.read_file(container, ARTIFACT).await {
                Ok(stream) => stream,
                Err(hearth_adapters::Error::NotFound(_)) => {
                    return Err(Error::BuildFailed(format!(
                        "{}\nBuild archive {ARTIFACT} was not created. The build command must leave it (the image's helpers/build.sh does).",
                        log.text().trim_end()
                    )))
                }
                Err(err) => return Err(err.into()),
            };
            let size = self.storage.put_stream(&object, stream).await?;
            (Some(size), Some(self.storage.api_path(&object)))
        };
        Ok(BuildReport {
            output: log.entries(),
            start_time,
            duration: begun.elapsed().as_secs_f64(),
            size,
            path,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_is_capped_with_a_notice() {
        let log = BuildLog::default();
        log.push(&vec![b'a'; 600_000]);
        log.push(&vec![b'b'; 600_000]);
        log.push(b"more");
        let text = log.text();
        assert!(text.ends_with(TRUNCATED_NOTICE));
        assert_eq!(text.len(), BUILD_OUTPUT_CAP + 1 + TRUNCATED_NOTICE.len());
    }

    #[test]
    fn utf8_split_across_chunks_survives() {
        let log = BuildLog::default();
        let emoji = "👋".as_bytes();
        log.push(&emoji[..2]);
        log.push(&emoji[2..]);
        log.push(b"ok\r\n");
        assert_eq!(log.text(), "👋ok\n");
    }

    #[tokio::test]
    async fn readers_see_entries_and_the_end() {
        let log = Arc::new(BuildLog::default());
        let mut rx = log.subscribe();
        log.push(b"one");
        rx.changed().await.unwrap();
        assert_eq!(log.since(0).0.len(), 1);
        log.finish();
        rx.changed().await.unwrap();
        let (rest, finished) = log.since(1);
        assert!(rest.is_empty() && finished);
    }
}
