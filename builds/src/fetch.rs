//! Fetching a function's source: a shallow fetch of one ref with the `git` binary (under a time
//! and size limit, never asking for credentials), then packing the checkout (or one subdirectory
//! of it) into a `.tar.gz` for the executor. Packing refuses symlinks that point outside the tree,
//! so a repository cannot smuggle a host file into a build.

use std::path::{Component, Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use crate::error::{Error, Result};

/// Bounds of one fetch.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub timeout: Duration,
    /// Most bytes of source (the checkout, without `.git`) and, twice that, of the fetch on disk.
    pub max_bytes: u64,
}

fn failed(message: impl Into<String>) -> Error {
    Error::BuildFailed(message.into())
}

/// Runs git with no prompts and no system or user configuration; returns stdout, or the last
/// lines of stderr as the error.
async fn git(args: &[&str], cwd: Option<&Path>) -> std::result::Result<String, String> {
    let mut command = Command::new("git");
    command
        .args([
            "-c",
            "advice.detachedHead=false",
            "-c",
            "core.hooksPath=/dev/null",
        ])
        .args(args)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_ASKPASS", "true")
        .env(
            "GIT_SSH_COMMAND",
            "ssh -o BatchMode=yes -o StrictHostKeyChecking=accept-new",
        )
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(cwd) = cwd {
        command.current_dir(cwd);
    }
    let output = command
        .output()
        .await
        .map_err(|e| format!("failed to run git: {e}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        let tail = lines[lines.len().saturating_sub(3)..].join(" / ");
        Err(if tail.is_empty() {
            format!("git exited with {}", output.status)
        } else {
            tail
        })
    }
}

/// Bytes of regular files under `dir` (not following symlinks), skipping `skip` names at the top.
pub fn tree_size(dir: &Path, skip: &[&str]) -> u64 {
    let mut total = 0;
    let mut stack = vec![(dir.to_path_buf(), true)];
    while let Some((folder, top)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&folder) else {
            continue;
        };
        for entry in entries.flatten() {
            if top && skip.iter().any(|s| entry.file_name() == **s) {
                continue;
            }
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                stack.push((entry.path(), false));
            } else if meta.is_file() {
                total += meta.len();
            }
        }
    }
    total
}

fn looks_like_commit(reference: &str) -> bool {
    (4..=40).contains(&reference.len()) && reference.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Fetches `reference` (default: the remote's HEAD) of `url` into `dir` (emptied first) and
/// checks it out. Returns the commit. Every failure is a [`Error::BuildFailed`] with the reason.
pub async fn fetch_git(
    url: &str,
    reference: Option<&str>,
    dir: &Path,
    limits: Limits,
) -> Result<String> {
    let work = async {
        let _ = tokio::fs::remove_dir_all(dir).await;
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| Error::Store(format!("failed to create {}: {e}", dir.display())))?;
        let refs = git(&["ls-remote", "--", url], None).await.map_err(|e| {
            failed(format!(
                "repository {url} could not be read (unknown repository or no access): {e}"
            ))
        })?;
        if refs.trim().is_empty() {
            return Err(failed(format!(
                "repository {url} is empty: it has no branch or tag to build"
            )));
        }
        git(&["init", "-q"], Some(dir))
            .await
            .map_err(|e| Error::Store(format!("git init failed: {e}")))?;
        let wanted = match reference {
            None => "HEAD".to_string(),
            Some(r) => {
                let listed = refs.lines().any(|line| {
                    let name = line.split('\t').nth(1).unwrap_or_default();
                    name == format!("refs/heads/{r}")
                        || name == format!("refs/tags/{r}")
                        || name == r
                });
                if !listed && !looks_like_commit(r) {
                    return Err(failed(format!(
                        "unknown ref {r:?} in {url}: no such branch or tag"
                    )));
                }
                r.to_string()
            }
        };
        let shallow = git(
            &[
                "fetch",
                "-q",
                "--depth",
                "1",
                "--no-tags",
                "--",
                url,
                &wanted,
            ],
            Some(dir),
        )
        .await;
        if let Err(shallow_err) = shallow {
            if !looks_like_commit(&wanted) {
                return Err(failed(format!(
                    "failed to fetch {wanted:?} from {url}: {shallow_err}"
                )));
            }
            // Servers that refuse a commit id in a shallow fetch still serve it from a full one.
            git(
                &[
                    "fetch",
                    "-q",
                    "--no-tags",
                    "--",
                    url,
                    "+refs/heads/*:refs/remotes/origin/*",
                    "+refs/tags/*:refs/tags/*",
                ],
                Some(dir),
            )
            .await
            .map_err(|e| failed(format!("failed to fetch {url}: {e}")))?;
            git(&["checkout", "-q", "--detach", &wanted, "--"], Some(dir))
                .await
                .map_err(|_| {
                    failed(format!(
                        "unknown ref {wanted:?} in {url}: no such branch, tag or commit"
                    ))
                })?;
        } else {
            git(&["checkout", "-q", "--detach", "FETCH_HEAD"], Some(dir))
                .await
                .map_err(|e| failed(format!("failed to check out {wanted:?}: {e}")))?;
        }
        let commit = git(&["rev-parse", "HEAD"], Some(dir))
            .await
            .map_err(|e| failed(format!("failed to read the fetched commit: {e}")))?;
        Ok(commit.trim().to_string())
    };
    // The fetch is watched: over time or over twice the size limit on disk, it is stopped.
    let watch = async {
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let folder = dir.to_path_buf();
            let size = tokio::task::spawn_blocking(move || tree_size(&folder, &[]))
                .await
                .unwrap_or_default();
            if size > limits.max_bytes.saturating_mul(2) {
                return size;
            }
        }
    };
    let result = tokio::select! {
        result = tokio::time::timeout(limits.timeout, work) => match result {
            Ok(result) => result,
            Err(_) => Err(failed(format!("fetching {url} timed out after {} s", limits.timeout.as_secs()))),
        },
        size = watch => Err(failed(format!(
            "source of {url} is over the size limit: {size} bytes fetched, the limit is {} bytes",
            limits.max_bytes
        ))),
    };
    if result.is_err() {
        let _ = tokio::fs::remove_dir_all(dir).await;
    }
    result
}

/// `path` with `.` and `..` resolved lexically, or `None` when it climbs above its start.
fn normalize(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::Normal(part) => out.push(part),
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// Packs `root` (without a top-level `.git`) into `archive` as a gzipped tar. Symlinks stay
/// symlinks when they point inside `root`; one pointing outside fails the build. Over
/// `max_bytes` of file content fails the build.
pub async fn pack(root: PathBuf, archive: PathBuf, max_bytes: u64) -> Result<u64> {
    tokio::task::spawn_blocking(move || pack_blocking(&root, &archive, max_bytes))
        .await
        .map_err(|e| Error::Store(format!("packing task failed: {e}")))?
}

fn pack_blocking(root: &Path, archive: &Path, max_bytes: u64) -> Result<u64> {
    let io = |op: &str, path: &Path, e: std::io::Error| {
        Error::Store(format!("failed to {op} {}: {e}", path.display()))
    };
    if let Some(parent) = archive.parent() {
        std::fs::create_dir_all(parent).map_err(|e| io("create", parent, e))?;
    }
    let tmp = archive.with_extension(format!("tmp{}", rand::random::<u32>()));
    let file = std::fs::File::create(&tmp).map_err(|e| io("create", &tmp, e))?;
    let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(
        file,
        flate2::Compression::fast(),
    ));
    tar.follow_symlinks(false);
    let mut total = 0u64;
    let mut stack = vec![PathBuf::new()];
    let result = (|| -> Result<()> {
        while let Some(relative) = stack.pop() {
            let folder = root.join(&relative);
            let mut entries: Vec<_> = std::fs::read_dir(&folder)
                .map_err(|e| io("read", &folder, e))?
                .flatten()
                .collect();
            entries.sort_by_key(|e| e.file_name());
            for entry in entries {
                let name = relative.join(entry.file_name());
                if relative.as_os_str().is_empty() && entry.file_name() == ".git" {
                    continue;
                }
                let path = entry.path();
                let meta = std::fs::symlink_metadata(&path).map_err(|e| io("read", &path, e))?;
                if meta.file_type().is_symlink() {
                    let target = std::fs::read_link(&path).map_err(|e| io("read", &path, e))?;
                    let inside =
                        !target.is_absolute() && normalize(&relative.join(&target)).is_some();
                    if !inside {
                        return Err(failed(format!(
                            "symlink {} points outside the repository (to {}): refused",
                            name.display(),
                            target.display()
                        )));
                    }
                    tar.append_path_with_name(&path, &name)
                        .map_err(|e| io("pack", &path, e))?;
                } else if meta.is_dir() {
                    tar.append_dir(&name, &path)
                        .map_err(|e| io("pack", &path, e))?;
                    stack.push(name);
                } else if meta.is_file() {
                    total += meta.len();
                    if total > max_bytes {
                        return Err(failed(format!(
                            "source is over the size limit of {max_bytes} bytes"
                        )));
                    }
                    tar.append_path_with_name(&path, &name)
                        .map_err(|e| io("pack", &path, e))?;
                }
            }
        }
        let encoder = tar.into_inner().map_err(|e| io("finish", &tmp, e))?;
        let file = encoder.finish().map_err(|e| io("finish", &tmp, e))?;
        file.sync_all().map_err(|e| io("sync", &tmp, e))?;
        std::fs::rename(&tmp, archive).map_err(|e| io("rename", &tmp, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map(|()| total)
}

/// The folder to pack: `checkout/<subdirectory>`, which must be a folder inside the checkout.
pub fn subfolder(checkout: &Path, subdirectory: Option<&str>) -> Result<PathBuf> {
    let Some(sub) = subdirectory else {
        return Ok(checkout.to_path_buf());
    };
    let base = checkout
        .canonicalize()
        .map_err(|e| Error::Store(format!("failed to resolve {}: {e}", checkout.display())))?;
    let folder = base
        .join(sub)
        .canonicalize()
        .ok()
        .filter(|f| f.starts_with(&base) && f.is_dir());
    folder.ok_or_else(|| {
        failed(format!(
            "subdirectory {sub:?} does not exist in the repository"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlinks_inside_are_kept_and_outside_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("src");
        std::fs::create_dir_all(root.join("lib")).unwrap();
        std::fs::write(root.join("lib/a.js"), "a").unwrap();
        std::os::unix::fs::symlink("lib/a.js", root.join("index.js")).unwrap();
        std::os::unix::fs::symlink("../a.js", root.join("lib/up.js")).unwrap();
        let archive = dir.path().join("out.tar.gz");
        pack_blocking(&root, &archive, 1 << 20).unwrap();
        assert!(archive.exists());

        std::os::unix::fs::symlink("../../../etc/passwd", root.join("lib/evil")).unwrap();
        let err = pack_blocking(&root, &archive, 1 << 20).unwrap_err();
        assert!(err.to_string().contains("points outside"), "{err}");
        std::fs::remove_file(root.join("lib/evil")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("abs")).unwrap();
        assert!(pack_blocking(&root, &archive, 1 << 20).is_err());
    }

    #[test]
    fn size_limit_holds() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("big"), vec![0u8; 4096]).unwrap();
        let err = pack_blocking(dir.path(), &dir.path().join("x/out.tgz"), 1000).unwrap_err();
        assert!(err.to_string().contains("size limit"), "{err}");
    }

    #[test]
    fn subfolders_stay_inside() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("fn")).unwrap();
        assert!(subfolder(dir.path(), Some("fn")).is_ok());
        assert!(subfolder(dir.path(), Some("missing")).is_err());
        assert!(subfolder(dir.path(), Some("../")).is_err());
    }
}
