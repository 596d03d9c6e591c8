//! Storage for function sources and build artifacts: a local folder by default, any
//! S3-compatible store through `OPR_EXECUTOR_CONNECTION_STORAGE` (both through `object_store`).
//!
//! API paths look like upstream's (`/storage/functions/hello.tar.gz`): absolute paths under the
//! storage root. A path that resolves outside the root (`..`, a symlink leaving it) is rejected.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, WriteMultipart};

use crate::error::{Error, Result};

pub struct Storage {
    store: Arc<dyn ObjectStore>,
    /// `Some(root)` for local storage: API paths are absolute paths under it.
    local_root: Option<PathBuf>,
}

impl Storage {
    /// Opens the storage named by `dsn` (`local://localhost` or `s3://…`), `root` being the
    /// folder of local storage.
    pub fn open(dsn: &str, root: &Path) -> Result<Self> {
        if dsn.is_empty() || dsn.starts_with("local://") {
            std::fs::create_dir_all(root).map_err(|err| {
                Error::Internal(format!(
                    "failed to create storage root {}: {err}",
                    root.display()
                ))
            })?;
            let root = root.canonicalize().map_err(|err| {
                Error::Internal(format!("failed to resolve {}: {err}", root.display()))
            })?;
            let store = LocalFileSystem::new_with_prefix(&root)
                .map_err(|err| Error::Internal(format!("failed to open local storage: {err}")))?;
            return Ok(Self {
                store: Arc::new(store),
                local_root: Some(root),
            });
        }
        if dsn.starts_with("s3://") {
            return Self::open_s3(dsn);
        }
        Err(Error::Internal(format!(
            "unsupported storage connection {dsn:?}: use local://localhost or s3://"
        )))
    }

    fn open_s3(dsn: &str) -> Result<Self> {
        let url = url::Url::parse(dsn)
            .map_err(|err| Error::Internal(format!("bad storage connection: {err}")))?;
        let bucket = url.path().trim_matches('/').to_string();
        let host = url
            .host_str()
            .ok_or_else(|| Error::Internal("storage connection has no host".to_string()))?;
        let mut region = "us-east-1".to_string();
        let mut insecure = false;
        for (key, value) in url.query_pairs() {
            match key.as_ref() {
                "region" => region = value.to_string(),
                "insecure" => insecure = value == "true",
                _ => {}
            }
        }
        let scheme = if insecure { "http" } else { "https" };
        let endpoint = match url.port() {
            Some(port) => format!("{scheme}://{host}:{port}"),
            None => format!("{scheme}://{host}"),
        };
        let store = AmazonS3Builder::new()
            .with_endpoint(endpoint)
            .with_allow_http(insecure)
            .with_bucket_name(bucket)
            .with_region(region)
            .with_access_key_id(url.username())
            .with_secret_access_key(url.password().unwrap_or_default())
            .build()
            .map_err(|err| Error::Internal(format!("failed to open S3 storage: {err}")))?;
        Ok(Self {
            store: Arc::new(store),
            local_root: None,
        })
    }

    /// Maps an API path to an object path, rejecting anything that leaves the storage root.
    pub fn object_path(&self, param: &str, api_path: &str) -> Result<ObjectPath> {
        let invalid = |why: &str| Error::InvalidArgument(format!("Invalid `{param}` param: {why}"));
        if api_path.contains('\0') {
            return Err(invalid("contains a NUL byte"));
        }
        let path = Path::new(api_path);
        let relative: PathBuf = match &self.local_root {
            Some(root) if path.is_absolute() => {
                let normal =
                    normalize(path).ok_or_else(|| invalid("path leaves the storage root"))?;
                let Ok(rest) = normal.strip_prefix(root) else {
                    return Err(invalid(&format!(
                        "path is outside the storage root {}",
                        root.display()
                    )));
                };
                rest.to_path_buf()
            }
            _ => normalize(&Path::new("/").join(path))
                .ok_or_else(|| invalid("path leaves the storage root"))?
                .strip_prefix("/")
                .map(Path::to_path_buf)
                .unwrap_or_default(),
        };
        if relative.as_os_str().is_empty() {
            return Err(invalid("path names the storage root itself"));
        }
        if let Some(root) = &self.local_root {
            check_no_symlink_escape(root, &relative).map_err(|why| invalid(&why))?;
        }
        let text = relative
            .to_str()
            .ok_or_else(|| invalid("path is not valid UTF-8"))?;
        ObjectPath::parse(text).map_err(|err| invalid(&err.to_string()))
    }

    /// The API path of an object (what a caller later passes back as `source`).
    pub fn api_path(&self, object: &ObjectPath) -> String {
        match &self.local_root {
            Some(root) => root.join(object.as_ref()).display().to_string(),
            None => format!("/{object}"),
        }
    }

    /// Reads a whole object (sources are archives of a function).
    pub async fn get(&self, param: &str, api_path: &str) -> Result<Bytes> {
        let path = self.object_path(param, api_path)?;
        let result = self.store.get(&path).await.map_err(|err| match err {
            object_store::Error::NotFound { .. } => Error::RuntimeFailed(format!(
                "Failed to read {param} {api_path}: file not found in storage."
            )),
            other => Error::Internal(format!("failed to read {api_path} from storage: {other}")),
        })?;
        result.bytes().await.map_err(|err| {
            Error::Internal(format!("failed to read {api_path} from storage: {err}"))
        })
    }

    /// Whether an object exists at the API path.
    pub async fn exists(&self, param: &str, api_path: &str) -> Result<bool> {
        let path = self.object_path(param, api_path)?;
        match self.store.head(&path).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(other) => Err(Error::Internal(format!(
                "failed to look up {api_path} in storage: {other}"
            ))),
        }
    }

    /// Whether this is a local folder (API paths are then this machine's paths).
    pub fn is_local(&self) -> bool {
        self.local_root.is_some()
    }

    /// Writes a stream to `path`, returning the number of bytes written.
    pub async fn put_stream<S, E>(&self, path: &ObjectPath, mut stream: S) -> Result<u64>
    where
        S: Stream<Item = std::result::Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let upload = self
            .store
            .put_multipart(path)
            .await
            .map_err(|err| Error::Internal(format!("failed to store {path}: {err}")))?;
        let mut writer = WriteMultipart::new(upload);
        let mut size = 0u64;
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(chunk) => {
                    size += chunk.len() as u64;
                    writer.put(chunk);
                }
                Err(err) => {
                    let _ = writer.abort().await;
                    return Err(Error::BuildFailed(format!(
                        "Failed to read the build artifact: {err}"
                    )));
                }
            }
        }
        writer
            .finish()
            .await
            .map_err(|err| Error::Internal(format!("failed to store {path}: {err}")))?;
        Ok(size)
    }
}

/// Resolves `.` and `..` lexically; `None` when `..` climbs above `/`.
fn normalize(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::RootDir => out.push("/"),
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() || out.as_os_str().is_empty() {
                    return None;
                }
            }
            Component::Normal(part) => out.push(part),
            Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// Fails when an existing prefix of `relative` under `root` is a symlink resolving outside it.
fn check_no_symlink_escape(root: &Path, relative: &Path) -> std::result::Result<(), String> {
    let mut current = root.to_path_buf();
    for component in relative.components() {
        current.push(component);
        match std::fs::symlink_metadata(&current) {
            Ok(meta) if meta.file_type().is_symlink() => {
                let target = current
                    .canonicalize()
                    .map_err(|_| "path contains a dangling symlink".to_string())?;
                if !target.starts_with(root) {
                    return Err("path leaves the storage root through a symlink".to_string());
                }
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local() -> (Storage, PathBuf) {
        let dir = std::env::temp_dir().join(format!("hearth-storage-{}", rand::random::<u64>()));
        let storage = Storage::open("local://localhost", &dir).unwrap();
        let root = dir.canonicalize().unwrap();
        (storage, root)
    }

    #[test]
    fn paths_under_the_root_map_to_objects() {
        let (storage, root) = local();
        let api = format!("{}/functions/hello.tar.gz", root.display());
        let path = storage.object_path("source", &api).unwrap();
        assert_eq!(path.as_ref(), "functions/hello.tar.gz");
        assert_eq!(storage.api_path(&path), api);
        let relative = storage.object_path("source", "functions/x.tar.gz").unwrap();
        assert_eq!(relative.as_ref(), "functions/x.tar.gz");
    }

    #[test]
    fn traversal_and_outside_paths_are_rejected() {
        let (storage, root) = local();
        for bad in [
            "/etc/passwd".to_string(),
            format!("{}/../etc/passwd", root.display()),
            "../../etc/passwd".to_string(),
            format!("{}", root.display()),
            "a\0b".to_string(),
        ] {
            let err = storage.object_path("source", &bad).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{bad}: {err:?}");
        }
    }

    #[test]
    fn symlinks_leaving_the_root_are_rejected() {
        let (storage, root) = local();
        std::os::unix::fs::symlink("/etc", root.join("escape")).unwrap();
        let err = storage
            .object_path("source", &format!("{}/escape/passwd", root.display()))
            .unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
    }

    #[tokio::test]
    async fn put_then_get_round_trips() {
        let (storage, root) = local();
        let api = format!("{}/builds/a.gz", root.display());
        let path = storage.object_path("destination", &api).unwrap();
        let chunks = vec![
            Ok::<_, std::io::Error>(Bytes::from_static(b"hello ")),
            Ok(Bytes::from_static(b"world")),
        ];
        let size = storage
            .put_stream(&path, futures_util::stream::iter(chunks))
            .await
            .unwrap();
        assert_eq!(size, 11);
        assert_eq!(storage.get("source", &api).await.unwrap(), "hello world");
        let missing = storage
            .get("source", &format!("{}/nope", root.display()))
            .await;
        assert!(matches!(missing, Err(Error::RuntimeFailed(_))));
    }
}
