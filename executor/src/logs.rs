//! Per-request log files (`/mnt/logs/<id>_logs.log`, `<id>_errors.log`): read once, capped at
//! 5 MiB each with upstream's truncation line, and removed.
//!
//! The fast path reads them from the runtime's log folder on the executor's host; without a
//! shared folder they come out through the adapter.

use std::path::Path;

use futures_util::StreamExt;
use hearth_adapters::Adapter;

/// Most bytes of one log file returned to the caller.
pub const LOG_CAP: usize = 5 * 1024 * 1024;
const LOGS_TRUNCATED: &str = "Log file has been truncated to 5.00MB.";
const ERRORS_TRUNCATED: &str = "Error file has been truncated to 5.00MB.";

/// Reads and removes the two log files of request `id` from a host folder.
///
/// Most calls log nothing and the runtime then writes no file: two `stat`s answer that without
/// a trip through the blocking pool. Files that exist are read in one blocking task.
pub async fn take_from_dir(dir: &Path, id: &str) -> (String, String) {
    if !valid_id(id) {
        return (String::new(), String::new());
    }
    let logs = dir.join(format!("{id}_logs.log"));
    let errors = dir.join(format!("{id}_errors.log"));
    if !logs.exists() && !errors.exists() {
        return (String::new(), String::new());
    }
    let read = tokio::task::spawn_blocking(move || {
        (
            read_capped(&logs, LOGS_TRUNCATED),
            read_capped(&errors, ERRORS_TRUNCATED),
        )
    });
    read.await.unwrap_or_default()
}

fn read_capped(path: &Path, notice: &str) -> String {
    use std::io::Read;
    let Ok(file) = std::fs::File::open(path) else {
        return String::new();
    };
    let mut buf = Vec::new();
    // Read one byte past the cap to know whether there was more.
    let read = file.take(LOG_CAP as u64 + 1).read_to_end(&mut buf);
    let _ = std::fs::remove_file(path);
    if read.is_err() {
        return String::new();
    }
    finish(buf, notice)
}

/// Reads the two log files of request `id` through the adapter and removes them in the
/// background.
pub async fn take_via_adapter(
    adapter: &dyn Adapter,
    container: &str,
    id: &str,
) -> (String, String) {
    if !valid_id(id) {
        return (String::new(), String::new());
    }
    let logs = read_capped_via(adapter, container, &format!("/mnt/logs/{id}_logs.log")).await;
    let errors = read_capped_via(adapter, container, &format!("/mnt/logs/{id}_errors.log")).await;
    (
        logs.map(|b| finish(b, LOGS_TRUNCATED)).unwrap_or_default(),
        errors
            .map(|b| finish(b, ERRORS_TRUNCATED))
            .unwrap_or_default(),
    )
}

async fn read_capped_via(adapter: &dyn Adapter, container: &str, path: &str) -> Option<Vec<u8>> {
    let mut stream = adapter.read_file(container, path).await.ok()?;
    let mut buf = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.ok()?;
        buf.extend_from_slice(&chunk);
        if buf.len() > LOG_CAP {
            break;
        }
    }
    Some(buf)
}

fn finish(mut buf: Vec<u8>, notice: &str) -> String {
    if buf.len() > LOG_CAP {
        buf.truncate(LOG_CAP);
        let mut text = String::from_utf8_lossy(&buf).into_owned();
        text.push('\n');
        text.push_str(notice);
        return text;
    }
    String::from_utf8(buf)
        .unwrap_or_else(|err| String::from_utf8_lossy(err.as_bytes()).into_owned())
}

/// Log ids come from the runtime's response header: never let one name another path.
fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_caps_and_removes() {
        let dir = std::env::temp_dir().join(format!("hearth-logs-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("abc_logs.log"), "x".repeat(LOG_CAP)).unwrap();
        std::fs::write(dir.join("abc_errors.log"), "y".repeat(LOG_CAP + 10)).unwrap();
        let (logs, errors) = take_from_dir(&dir, "abc").await;
        assert_eq!(logs.len(), LOG_CAP);
        assert!(errors.ends_with("\nError file has been truncated to 5.00MB."));
        assert!(errors.starts_with(&"y".repeat(LOG_CAP)));
        assert!(!dir.join("abc_logs.log").exists());
        assert!(!dir.join("abc_errors.log").exists());
        assert_eq!(
            take_from_dir(&dir, "../etc").await,
            (String::new(), String::new())
        );
    }
}
