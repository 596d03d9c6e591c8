//! Per-request log files (`/mnt/logs/<id>_logs.log`, `<id>_errors.log`): read once, capped at
//! 5 MiB each with upstream's truncation line, and removed.
//!
//! The fast path reads them from the runtime's log folder on the executor's host; without a
//! shared folder they come out through the adapter.

use std::fs::File;
use std::io::Read;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use futures_util::StreamExt;
use hearth_adapters::Adapter;
use rustix::fs::{Mode, OFlags};

/// Most bytes of one log file returned to the caller.
pub const LOG_CAP: usize = 5 * 1024 * 1024;
const LOGS_TRUNCATED: &str = "Log file has been truncated to 5.00MB.";
const ERRORS_TRUNCATED: &str = "Error file has been truncated to 5.00MB.";
/// A log folder whose entries last changed this long before a request was sent cannot hold
/// that request's files. Far above the file system's timestamp granularity (a clock tick).
const UNCHANGED_FOR: std::time::Duration = std::time::Duration::from_secs(1);
/// Log files up to this size together are read on the calling thread (a page-cache copy of a
/// few microseconds); bigger ones in the blocking pool.
const READ_INLINE: u64 = 256 * 1024;

/// A runtime's log folder on the executor's host, opened once.
///
/// Every execution looks for two files by name. Resolving `/path/to/runtimes/<name>/logs/...`
/// from the root each time walks every component again, and in an executor container that
/// walk starts on the container's own root file system (fuse-overlayfs here: a permission
/// check per component that cost ~10 % of the executor's CPU at 32 connections). Names are
/// looked up relative to the open folder instead.
#[derive(Debug)]
pub struct LogsDir {
    path: PathBuf,
    handle: OnceLock<Arc<File>>,
}

impl LogsDir {
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            handle: OnceLock::new(),
        }
    }

    pub fn path(&self) -> &PathBuf {
        &self.path
    }

    /// The open folder; opened on first use (the folder is made just before the container).
    fn handle(&self) -> Option<Arc<File>> {
        if let Some(handle) = self.handle.get() {
            return Some(handle.clone());
        }
        let opened = Arc::new(File::open(&self.path).ok()?);
        Some(self.handle.get_or_init(|| opened).clone())
    }

    /// Reads and removes the two log files of request `id`, sent to the runtime at `sent`.
    ///
    /// Most calls log nothing and the runtime then writes no file. A folder whose entries did
    /// not change since well before `sent` (its ctime, which every file created or removed in it
    /// moves) answers that with one `fstat`; otherwise two lookups do, each of a name never
    /// seen before (a dentry and a directory scan each, ~6 % of the executor's CPU on hello).
    /// Small files are read here; large ones in one blocking task.
    pub async fn take(&self, id: &str, sent: std::time::SystemTime) -> (String, String) {
        if !valid_id(id) {
            return (String::new(), String::new());
        }
        let Some(dir) = self.handle() else {
            return (String::new(), String::new());
        };
        if unchanged_since(&dir, sent) {
            return (String::new(), String::new());
        }
        let names = [format!("{id}_logs.log"), format!("{id}_errors.log")];
        let logs = open_in(&dir, &names[0]);
        let errors = open_in(&dir, &names[1]);
        if logs.is_none() && errors.is_none() {
            return (String::new(), String::new());
        }
        let size = |f: &Option<File>| {
            f.as_ref()
                .and_then(|f| f.metadata().ok())
                .map_or(0, |m| m.len())
        };
        let inline = size(&logs) + size(&errors) <= READ_INLINE;
        let read = move || {
            let [logs_name, errors_name] = names;
            (
                read_capped_in(&dir, logs, &logs_name, LOGS_TRUNCATED),
                read_capped_in(&dir, errors, &errors_name, ERRORS_TRUNCATED),
            )
        };
        if inline {
            return read();
        }
        tokio::task::spawn_blocking(read).await.unwrap_or_default()
    }
}

/// True when the folder's entries last changed more than [`UNCHANGED_FOR`] before `sent`.
fn unchanged_since(dir: &File, sent: std::time::SystemTime) -> bool {
    let Ok(stat) = rustix::fs::fstat(dir) else {
        return false;
    };
    let Ok(sent) = sent.duration_since(std::time::UNIX_EPOCH) else {
        return false;
    };
    let (Ok(secs), Ok(nanos)) = (
        u64::try_from(stat.st_ctime),
        u32::try_from(stat.st_ctime_nsec),
    ) else {
        return false;
    };
    let changed = std::time::Duration::new(secs, nanos.min(999_999_999));
    changed + UNCHANGED_FOR < sent
}

fn open_in(dir: &File, name: &str) -> Option<File> {
    let flags = OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW;
    rustix::fs::openat(dir, name, flags, Mode::empty())
        .ok()
        .map(File::from)
}

/// Reads an opened log file (one byte past the cap, to know whether there was more) and
/// removes its name.
fn read_capped_in(dir: &File, file: Option<File>, name: &str, notice: &str) -> String {
    let Some(file) = file else {
        return String::new();
    };
    let mut buf = Vec::new();
    let read = file.take(LOG_CAP as u64 + 1).read_to_end(&mut buf);
    let _ = rustix::fs::unlinkat(dir, name, rustix::fs::AtFlags::empty());
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
        let logs_dir = LogsDir::new(dir.clone());
        let (logs, errors) = logs_dir.take("abc", std::time::SystemTime::now()).await;
        assert_eq!(logs.len(), LOG_CAP);
        assert!(errors.ends_with("\nError file has been truncated to 5.00MB."));
        assert!(errors.starts_with(&"y".repeat(LOG_CAP)));
        assert!(!dir.join("abc_logs.log").exists());
        assert!(!dir.join("abc_errors.log").exists());
        assert_eq!(
            logs_dir.take("../etc", std::time::SystemTime::now()).await,
            (String::new(), String::new())
        );
    }

    #[tokio::test]
    async fn files_written_after_a_quiet_spell_are_found() {
        let dir = std::env::temp_dir().join(format!("hearth-logs-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let logs_dir = LogsDir::new(dir.clone());
        // The folder has been quiet for longer than the shortcut's margin.
        tokio::time::sleep(UNCHANGED_FOR + std::time::Duration::from_millis(200)).await;
        let sent = std::time::SystemTime::now();
        assert_eq!(logs_dir.take("none", sent).await, Default::default());
        std::fs::write(
            dir.join("late_logs.log"),
            "written after the request was sent",
        )
        .unwrap();
        let (logs, errors) = logs_dir.take("late", sent).await;
        assert_eq!(logs, "written after the request was sent");
        assert_eq!(errors, "");
        // A request sent long after the folder's last change skips the lookups.
        std::fs::write(dir.join("old_logs.log"), "x").unwrap();
        let later = std::time::SystemTime::now() + 2 * UNCHANGED_FOR;
        assert_eq!(logs_dir.take("old", later).await, Default::default());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
