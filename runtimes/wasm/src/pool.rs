//! Pool mode (`runtimes/pool-protocol.md`), without HTTP: a server started with
//! `OPEN_RUNTIMES_POOL_SECRET` and no code receives its function once, as a JSON body
//! `{"env": {...}, "code": "<base64 tar or tar.gz>"}`. This module checks the secret, decodes
//! the body, unpacks the archive and reads its `.open-runtimes`; [`crate::server`] maps the
//! HTTP side and then loads the function the way a fresh start does.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::Value;

/// The variable that starts the server in pool mode; read once and removed from the
/// environment by `main`.
pub const SECRET_ENV: &str = "OPEN_RUNTIMES_POOL_SECRET";
/// The file of build-time settings the build step packs next to the code.
pub const SETTINGS_FILE: &str = ".open-runtimes";
/// `.open-runtimes` lines this parser cannot read are left to bash; it gets this long.
const BASH_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a specialisation was refused. Every variant is the caller's fault (400): a pool member
/// that fails here is removed by the executor.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Invalid specialisation body: {0}")]
    Body(String),
    #[error("Invalid code: not base64 ({0}).")]
    Base64(base64::DecodeError),
    #[error("Invalid code: not a tar or tar.gz archive ({0}).")]
    Archive(String),
    #[error("Invalid {SETTINGS_FILE} file: {0}")]
    Settings(String),
}

/// A decoded specialisation request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Specialisation {
    /// What the executor would have set on a fresh container, in the body's order.
    pub env: Vec<(String, String)>,
    /// The archive bytes (tar or gzip-compressed tar).
    pub code: Vec<u8>,
}

/// Compares the pool secret in time independent of where the values differ (the length of
/// the expected secret is not hidden; it is random and of a fixed size anyway).
pub fn secret_matches(expected: &str, given: Option<&str>) -> bool {
    let Some(given) = given else {
        return false;
    };
    let (expected, given) = (expected.as_bytes(), given.as_bytes());
    if expected.len() != given.len() {
        return false;
    }
    let diff = expected
        .iter()
        .zip(given)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    std::hint::black_box(diff) == 0
}

/// Parses `{"env": {...}, "code": "<base64>"}`. Non-string env values are stringified (as
/// the executor's JSON numbers or booleans would be in a container's env).
pub fn parse(body: &[u8]) -> Result<Specialisation, Error> {
    let value: Value = serde_json::from_slice(body).map_err(|e| Error::Body(e.to_string()))?;
    let Value::Object(mut object) = value else {
        return Err(Error::Body("expected a JSON object.".into()));
    };
    let env = match object.remove("env") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Object(map)) => map
            .into_iter()
            .map(|(k, v)| match v {
                Value::String(s) => (k, s),
                other => (k, other.to_string()),
            })
            .collect(),
        Some(_) => return Err(Error::Body(r#""env" must be an object."#.into())),
    };
    let Some(Value::String(code)) = object.remove("code") else {
        return Err(Error::Body(r#""code" must be a base64 string."#.into()));
    };
    let code = base64::engine::general_purpose::STANDARD
        .decode(code.trim())
        .map_err(Error::Base64)?;
    Ok(Specialisation { env, code })
}

/// Unpacks `archive` (gzip detected by its magic bytes) into `dir`. Entries that would land
/// outside `dir` (absolute paths, `..`, links pointing out) are refused by `tar`'s
/// `unpack_in`, which fails the whole archive here.
pub fn extract(archive: &[u8], dir: &Path) -> Result<(), Error> {
    if archive.is_empty() {
        return Err(Error::Archive("the archive is empty".into()));
    }
    if !dir.is_dir() {
        std::fs::create_dir_all(dir).map_err(|e| Error::Archive(e.to_string()))?;
    }
    let reader: Box<dyn Read + '_> = if archive.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::GzDecoder::new(archive))
    } else {
        Box::new(archive)
    };
    let mut tar = tar::Archive::new(reader);
    tar.set_overwrite(true);
    // One filesystem call less per file; modification times mean nothing to a Wasm guest.
    tar.set_preserve_mtime(false);
    let entries = tar.entries().map_err(|e| Error::Archive(e.to_string()))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| Error::Archive(e.to_string()))?;
        let unpacked = entry
            .unpack_in(dir)
            .map_err(|e| Error::Archive(e.to_string()))?;
        if !unpacked {
            let path = entry.path().map(|p| p.display().to_string());
            return Err(Error::Archive(format!(
                "entry {} points outside the function directory",
                path.unwrap_or_default()
            )));
        }
    }
    Ok(())
}

/// Creates and removes a file in each of `dirs` (best effort). On overlay filesystems the
/// first write into a directory of the image copies the directory up (about a millisecond on
/// fuse-overlayfs); a pool member does it at start, not during its specialisation.
pub fn warm_up(dirs: &[&Path]) {
    for dir in dirs {
        let probe = dir.join(".hearth-warm-up");
        if std::fs::write(&probe, b"").is_ok() {
            let _ = std::fs::remove_file(&probe);
        }
    }
}

/// The variables of `dir/.open-runtimes`, as `set -a; source .open-runtimes` would set them
/// on top of `env`. The file is written with bash's `printf 'KEY=%q\n'`; those lines are read
/// here, anything else (a line this parser does not know) is sourced by a bash subprocess.
/// No file: no variables.
pub fn settings(dir: &Path, env: &[(String, String)]) -> Result<Vec<(String, String)>, Error> {
    let path = dir.join(SETTINGS_FILE);
    let text = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(Error::Settings(err.to_string())),
    };
    match std::str::from_utf8(&text).ok().and_then(parse_settings) {
        Some(vars) => Ok(vars),
        None => source_with_bash(&path, env),
    }
}

/// `KEY=value` lines with `printf %q` quoting; `None` when a line needs a shell.
fn parse_settings(text: &str) -> Option<Vec<(String, String)>> {
    let mut vars = Vec::new();
    for line in text.lines() {
        let line = line.trim_start();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line.split_once('=')?;
        let mut chars = key.chars();
        let first_ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
        if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return None;
        }
        vars.push((key.to_string(), unquote(value)?));
    }
    Some(vars)
}

/// Removes bash quoting from one word as `printf %q` writes it: `\x`, `'...'`, `$'...'`, and
/// unquoted characters that need no shell. `None` for anything a shell would expand.
fn unquote(word: &str) -> Option<String> {
    let mut out: Vec<u8> = Vec::with_capacity(word.len());
    let mut chars = word.chars().peekable();
    let mut buf = [0u8; 4];
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                let next = chars.next()?;
                out.extend_from_slice(next.encode_utf8(&mut buf).as_bytes());
            }
            '\'' => loop {
                match chars.next()? {
                    '\'' => break,
                    c => out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes()),
                }
            },
            '$' if chars.peek() == Some(&'\'') => {
                chars.next();
                ansi_c(&mut chars, &mut out)?;
            }
            c if c.is_alphanumeric() || "_-.,/:@%+=^".contains(c) => {
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
            _ => return None,
        }
    }
    String::from_utf8(out).ok()
}

/// The body of a `$'...'` word after its opening quote, up to and including the closing one.
fn ansi_c(chars: &mut std::iter::Peekable<std::str::Chars<'_>>, out: &mut Vec<u8>) -> Option<()> {
    let mut buf = [0u8; 4];
    loop {
        let c = chars.next()?;
        if c == '\'' {
            return Some(());
        }
        if c != '\\' {
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            continue;
        }
        let byte = match chars.next()? {
            'a' => 0x07,
            'b' => 0x08,
            'e' | 'E' => 0x1b,
            'f' => 0x0c,
            'n' => b'\n',
            'r' => b'\r',
            't' => b'\t',
            'v' => 0x0b,
            c @ ('\\' | '\'' | '"' | '?') => c as u8,
            c @ '0'..='7' => {
                let mut value = c.to_digit(8)?;
                for _ in 0..2 {
                    match chars.peek().and_then(|c| c.to_digit(8)) {
                        Some(d) => {
                            value = value * 8 + d;
                            chars.next();
                        }
                        None => break,
                    }
                }
                u8::try_from(value).ok()?
            }
            'x' => {
                let mut value = None;
                for _ in 0..2 {
                    match chars.peek().and_then(|c| c.to_digit(16)) {
                        Some(d) => {
                            value = Some(value.unwrap_or(0) * 16 + d);
                            chars.next();
                        }
                        None => break,
                    }
                }
                u8::try_from(value?).ok()?
            }
            // \cX, \u, \U and the rest: let bash decide.
            _ => return None,
        };
        out.push(byte);
    }
}

/// `set -a; source FILE` in bash with `env` as its environment; the variables it added or
/// changed. Only for files the parser above cannot read.
fn source_with_bash(path: &Path, env: &[(String, String)]) -> Result<Vec<(String, String)>, Error> {
    const SCRIPT: &str = r#"set -eo pipefail; set -a; source "$1" 1>&2; env -0"#;
    let mut child = Command::new("bash")
        .args(["-c", SCRIPT, "bash"])
        .arg(path)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| Error::Settings(format!("failed to start bash: {e}")))?;
    let mut stdout = child
        .stdout
        .take()
        .ok_or_else(|| Error::Settings("bash has no stdout".into()))?;
    let reader = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        stdout.read_to_end(&mut bytes).map(|_| bytes)
    });
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() < BASH_TIMEOUT => {
                std::thread::sleep(Duration::from_millis(1))
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Settings("sourcing it timed out".into()));
            }
            Err(err) => return Err(Error::Settings(format!("failed to wait for bash: {err}"))),
        }
    };
    let output = reader
        .join()
        .map_err(|_| Error::Settings("failed to read bash's output".into()))?
        .map_err(|e| Error::Settings(format!("failed to read bash's output: {e}")))?;
    if !status.success() {
        return Err(Error::Settings(format!("sourcing it failed ({status})")));
    }
    let before: std::collections::HashMap<&str, &str> =
        env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut vars = Vec::new();
    for item in output.split(|b| *b == 0).filter(|i| !i.is_empty()) {
        let item = String::from_utf8_lossy(item);
        let Some((key, value)) = item.split_once('=') else {
            continue;
        };
        // Bash's own bookkeeping, not the file's.
        if matches!(key, "_" | "SHLVL" | "PWD" | "OLDPWD") {
            continue;
        }
        if before.get(key) != Some(&value) {
            vars.push((key.to_string(), value.to_string()));
        }
    }
    Ok(vars)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_by_value() {
        assert!(secret_matches("abc", Some("abc")));
        assert!(!secret_matches("abc", Some("abd")));
        assert!(!secret_matches("abc", Some("ab")));
        assert!(!secret_matches("abc", None));
    }

    #[test]
    fn printf_q_output_is_unquoted() {
        for (quoted, plain) in [
            ("index.wasm", "index.wasm"),
            ("''", ""),
            (r"my\ file.wasm", "my file.wasm"),
            (r"it\'s", "it's"),
            (r"\$HOME\;\ \`x\`", "$HOME; `x`"),
            ("$'a\\nb\\tc'", "a\nb\tc"),
            ("$'\\001\\x41\\''", "\u{1}A'"),
            ("'single quoted $x'", "single quoted $x"),
            ("héllo", "héllo"),
        ] {
            assert_eq!(unquote(quoted).as_deref(), Some(plain), "{quoted}");
        }
        for shell in ["$HOME", "a b", "`id`", "\"x\"", "~/x", "a;b", "$'\\cA'"] {
            assert_eq!(unquote(shell), None, "{shell}");
        }
    }

    #[test]
    fn settings_lines_need_a_shell_only_when_unusual() {
        let vars = parse_settings("OPEN_RUNTIMES_ENTRYPOINT=my\\ app.wasm\n\n# c\nX=''\n");
        assert_eq!(
            vars,
            Some(vec![
                ("OPEN_RUNTIMES_ENTRYPOINT".into(), "my app.wasm".into()),
                ("X".into(), String::new()),
            ])
        );
        assert_eq!(parse_settings("export X=1\n"), None);
        assert_eq!(parse_settings("1X=1\n"), None);
    }

    #[test]
    fn bash_sources_what_the_parser_cannot_read() {
        let dir = std::env::temp_dir().join(format!("hearth-pool-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join(SETTINGS_FILE),
            "export A=\"${BASE}-x\"\nB=$'\\cA'\n",
        )
        .unwrap();
        let env = vec![("BASE".to_string(), "base".to_string())];
        let vars = settings(&dir, &env).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(vars.contains(&("A".into(), "base-x".into())), "{vars:?}");
        assert!(vars.contains(&("B".into(), "\u{1}".into())), "{vars:?}");
        assert!(!vars.iter().any(|(k, _)| k == "BASE"), "{vars:?}");
    }

    #[test]
    fn bodies_are_checked() {
        let ok = parse(br#"{"env":{"A":"1","N":2},"code":"aGk="}"#).unwrap();
        assert_eq!(
            ok.env,
            vec![("A".into(), "1".into()), ("N".into(), "2".into())]
        );
        assert_eq!(ok.code, b"hi");
        assert!(matches!(parse(b"nope"), Err(Error::Body(_))));
        assert!(matches!(parse(br#"{"env":[]}"#), Err(Error::Body(_))));
        assert!(matches!(parse(br#"{"code":"!!"}"#), Err(Error::Base64(_))));
    }

    #[test]
    fn archives_cannot_escape_the_directory() {
        let dir = std::env::temp_dir().join(format!("hearth-pool-extract-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // A hand-made header: tar::Builder refuses to write `..` paths itself.
        let mut header = tar::Header::new_gnu();
        header.as_gnu_mut().unwrap().name[..9].copy_from_slice(b"../escape");
        header.set_size(2);
        header.set_mode(0o644);
        header.set_cksum();
        let mut archive = tar::Builder::new(Vec::new());
        archive.append(&header, &b"hi"[..]).unwrap();
        let bytes = archive.into_inner().unwrap();
        assert!(matches!(extract(&bytes, &dir), Err(Error::Archive(_))));
        assert!(!dir.parent().unwrap().join("escape").exists());
        assert!(matches!(
            extract(b"not a tar at all", &dir),
            Err(Error::Archive(_))
        ));
        assert!(matches!(extract(b"", &dir), Err(Error::Archive(_))));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
