//! The build store: one JSON file per build under `<state>/builds/`, replaced atomically (write,
//! fsync, rename), and one log file per build under `<state>/logs/`. Build state survives a
//! restart of the service, and the API and every worker process that mounts the same state
//! folder see the same builds.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::model::{valid_function_name, valid_id, Build, Function, Lease};

#[derive(Debug, Clone)]
pub struct Store {
    builds: PathBuf,
    logs: PathBuf,
    leases: PathBuf,
    unconfirmed: PathBuf,
    functions: PathBuf,
}

fn store_error(op: &str, path: &Path, err: impl std::fmt::Display) -> Error {
    Error::Store(format!("failed to {op} {}: {err}", path.display()))
}

impl Store {
    /// Opens (creating if needed) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Store> {
        let store = Store {
            builds: dir.join("builds"),
            logs: dir.join("logs"),
            leases: dir.join("leases"),
            unconfirmed: dir.join("unconfirmed"),
            functions: dir.join("functions"),
        };
        for folder in [
            &store.builds,
            &store.logs,
            &store.leases,
            &store.unconfirmed,
            &store.functions,
        ] {
            std::fs::create_dir_all(folder).map_err(|e| store_error("create", folder, e))?;
        }
        Ok(store)
    }

    fn record_path(&self, id: &str) -> Result<PathBuf> {
        if !valid_id(id) {
            return Err(Error::NotFound);
        }
        Ok(self.builds.join(format!("{id}.json")))
    }

    /// The build's log file (it may not exist yet).
    pub fn log_path(&self, id: &str) -> Result<PathBuf> {
        if !valid_id(id) {
            return Err(Error::NotFound);
        }
        Ok(self.logs.join(format!("{id}.log")))
    }

    /// Writes the record durably: a reader sees the old or the new one, never half of either.
    pub async fn put(&self, build: &Build) -> Result<()> {
        let path = self.record_path(&build.id)?;
        let bytes =
            serde_json::to_vec_pretty(build).map_err(|e| store_error("encode", &path, e))?;
        write_atomic(path, bytes).await
    }

    fn lease_path(&self, id: &str) -> Result<PathBuf> {
        if !valid_id(id) {
            return Err(Error::NotFound);
        }
        Ok(self.leases.join(format!("{id}.json")))
    }

    /// Takes or renews the lease of a build.
    pub async fn put_lease(&self, id: &str, lease: &Lease) -> Result<()> {
        let path = self.lease_path(id)?;
        let bytes = serde_json::to_vec(lease).map_err(|e| store_error("encode", &path, e))?;
        write_atomic(path, bytes).await
    }

    fn function_path(&self, name: &str) -> Result<PathBuf> {
        if !valid_function_name(name) {
            return Err(Error::NotFound);
        }
        Ok(self.functions.join(format!("{name}.json")))
    }

    /// The function, or [`Error::NotFound`].
    pub async fn function(&self, name: &str) -> Result<Function> {
        let path = self.function_path(name)?;
        read_json(&path).await
    }

    /// Makes `function` the current deployment of its name, unless a newer build already is.
    pub async fn deploy(&self, function: &Function) -> Result<()> {
        match self.function(&function.name).await {
            Ok(current) if current.built_from > function.built_from => return Ok(()),
            Ok(_) | Err(Error::NotFound) => {}
            Err(err) => return Err(err),
        }
        let path = self.function_path(&function.name)?;
        let bytes =
            serde_json::to_vec_pretty(function).map_err(|e| store_error("encode", &path, e))?;
        write_atomic(path, bytes).await
    }

    pub async fn functions(&self) -> Result<Vec<Function>> {
        let mut functions = Vec::new();
        for name in json_names(&self.functions).await? {
            if let Ok(function) = self.function(&name).await {
                functions.push(function);
            }
        }
        functions.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(functions)
    }

    /// Forgets a function (its builds stay).
    pub async fn remove_function(&self, name: &str) -> Result<Function> {
        let function = self.function(name).await?;
        let path = self.function_path(name)?;
        tokio::fs::remove_file(&path)
            .await
            .map_err(|e| store_error("remove", &path, e))?;
        Ok(function)
    }

    /// Takes the build's lease if nobody holds a live one: the lease file is created exclusively,
    /// so of two workers racing for one build exactly one wins. A lapsed lease is taken over.
    pub async fn try_lease(&self, id: &str, lease: &Lease) -> Result<bool> {
        let path = self.lease_path(id)?;
        let bytes = serde_json::to_vec(lease).map_err(|e| store_error("encode", &path, e))?;
        // Written whole to a private file, then linked into place: the link fails if a lease is
        // there, and a lease that is there is always complete.
        let tmp = path.with_extension(format!("claim.{}", rand::random::<u32>()));
        write_atomic(tmp.clone(), bytes).await?;
        let mut won = false;
        for _ in 0..2 {
            match tokio::fs::hard_link(&tmp, &path).await {
                Ok(()) => {
                    won = true;
                    break;
                }
                Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {
                    let live = self
                        .lease(id)
                        .await
                        .is_some_and(|held| held.until > crate::unix_now());
                    if live {
                        break;
                    }
                    // Lapsed: take it over.
                    let _ = tokio::fs::remove_file(&path).await;
                }
                Err(err) => {
                    let _ = tokio::fs::remove_file(&tmp).await;
                    return Err(store_error("link", &path, err));
                }
            }
        }
        let _ = tokio::fs::remove_file(&tmp).await;
        Ok(won)
    }

    /// The build's lease, if any (an unreadable one counts as none).
    pub async fn lease(&self, id: &str) -> Option<Lease> {
        let bytes = tokio::fs::read(self.lease_path(id).ok()?).await.ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Marks a build as stored but not yet confirmed by the broker; [`Store::confirmed`] clears
    /// it. Builds still marked at boot are queued again, so a crash between the two loses nothing.
    pub async fn unconfirmed(&self, id: &str) -> Result<()> {
        let path = self.unconfirmed.join(id);
        if !valid_id(id) {
            return Err(Error::NotFound);
        }
        write_atomic(path, Vec::new()).await
    }

    pub async fn confirmed(&self, id: &str) {
        if valid_id(id) {
            let _ = tokio::fs::remove_file(self.unconfirmed.join(id)).await;
        }
    }

    /// Builds marked [`Store::unconfirmed`].
    pub async fn unconfirmed_ids(&self) -> Vec<String> {
        let mut ids = Vec::new();
        if let Ok(mut dir) = tokio::fs::read_dir(&self.unconfirmed).await {
            while let Ok(Some(entry)) = dir.next_entry().await {
                if let Some(name) = entry.file_name().to_str().filter(|n| valid_id(n)) {
                    ids.push(name.to_string());
                }
            }
        }
        ids
    }

    pub async fn drop_lease(&self, id: &str) {
        if let Ok(path) = self.lease_path(id) {
            let _ = tokio::fs::remove_file(path).await;
        }
    }

    /// The build, or [`Error::NotFound`].
    pub async fn get(&self, id: &str) -> Result<Build> {
        let path = self.record_path(id)?;
        read_json(&path).await
    }

    /// Forgets a build that was never accepted.
    pub async fn remove(&self, id: &str) -> Result<()> {
        let path = self.record_path(id)?;
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(err) => Err(store_error("remove", &path, err)),
        }
    }

    /// Every build (unordered).
    pub async fn list(&self) -> Result<Vec<Build>> {
        let mut builds = Vec::new();
        for id in json_names(&self.builds).await? {
            match self.get(&id).await {
                Ok(build) => builds.push(build),
                Err(Error::NotFound) => {}
                Err(err) => return Err(err),
            }
        }
        Ok(builds)
    }

    /// Reads, changes and writes a record. Returns the record as written.
    pub async fn update(&self, id: &str, change: impl FnOnce(&mut Build)) -> Result<Build> {
        let mut build = self.get(id).await?;
        change(&mut build);
        self.put(&build).await?;
        Ok(build)
    }

    /// Appends lines (each ending in `\n`) to the build's log.
    pub async fn append_log(&self, id: &str, text: &str) -> Result<()> {
        use tokio::io::AsyncWriteExt;
        let path = self.log_path(id)?;
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .await
            .map_err(|e| store_error("open", &path, e))?;
        file.write_all(text.as_bytes())
            .await
            .map_err(|e| store_error("append to", &path, e))?;
        file.flush()
            .await
            .map_err(|e| store_error("flush", &path, e))
    }
}

/// A JSON record, or [`Error::NotFound`].
async fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    match tokio::fs::read(path).await {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| store_error("decode", path, e)),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Err(Error::NotFound),
        Err(err) => Err(store_error("read", path, err)),
    }
}

/// The names (without `.json`) of the records in a folder.
async fn json_names(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    let mut entries = tokio::fs::read_dir(dir)
        .await
        .map_err(|e| store_error("list", dir, e))?;
    while let Some(entry) = entries
        .next_entry()
        .await
        .map_err(|e| store_error("list", dir, e))?
    {
        if let Some(name) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.strip_suffix(".json"))
        {
            names.push(name.to_string());
        }
    }
    Ok(names)
}

async fn write_atomic(path: PathBuf, bytes: Vec<u8>) -> Result<()> {
    tokio::task::spawn_blocking(move || {
        let tmp = path.with_extension(format!("json.{}.tmp", rand::random::<u32>()));
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            store_error("write", &path, e)
        })
    })
    .await
    .map_err(|e| Error::Store(format!("store task failed: {e}")))?
}

/// One log line in the executor's format: `<ISO-8601 ms timestamp> <content, newlines as \n>`.
pub fn log_line(content: &str) -> String {
    let timestamp = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.3f+00:00");
    format!("{timestamp} {}\n", content.trim_end().replace('\n', "\\n"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Spec, Status};

    fn build(id: &str) -> Build {
        let body = serde_json::json!({
            "source": {"type": "archive", "path": "/storage/a.tar.gz"},
            "image": "hearth/node:v5-18",
        });
        Build::queued(id.into(), Spec::from_request(&body).unwrap(), 1.0)
    }

    #[tokio::test]
    async fn records_survive_a_reopen_and_updates_replace_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.put(&build("b1")).await.unwrap();
        store
            .update("b1", |b| b.status = Status::Running)
            .await
            .unwrap();
        let reopened = Store::open(dir.path()).unwrap();
        assert_eq!(reopened.get("b1").await.unwrap().status, Status::Running);
        assert_eq!(reopened.list().await.unwrap().len(), 1);
        assert!(matches!(reopened.get("nope").await, Err(Error::NotFound)));
        assert!(matches!(
            reopened.get("../etc/passwd").await,
            Err(Error::NotFound)
        ));
    }

    #[tokio::test]
    async fn one_of_two_racing_workers_gets_the_lease_and_a_lapsed_one_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let lease = |holder: &str, until: f64| Lease {
            holder: holder.into(),
            until,
        };
        let later = crate::unix_now() + 60.0;
        let (first, second) = (lease("a", later), lease("b", later));
        let (a, b) = tokio::join!(
            store.try_lease("b1", &first),
            store.try_lease("b1", &second)
        );
        assert!(a.unwrap() ^ b.unwrap());
        store.put_lease("b2", &lease("gone", 1.0)).await.unwrap();
        assert!(store.try_lease("b2", &lease("c", later)).await.unwrap());
        assert_eq!(store.lease("b2").await.unwrap().holder, "c");
    }

    #[tokio::test]
    async fn logs_append() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.append_log("b1", &log_line("one\ntwo")).await.unwrap();
        store.append_log("b1", &log_line("three")).await.unwrap();
        let text = std::fs::read_to_string(store.log_path("b1").unwrap()).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].ends_with(" one\\ntwo"), "{text}");
    }
}
