//! What a build is: the submitted request (validated here, once), the record the store keeps and
//! the API returns, and the job message the queue carries.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

/// Where a function's source comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Source {
    /// A git repository: `url` (`https://`, `http://`, `git://`, `ssh://` or `file://`), a `ref`
    /// (branch, tag or commit; default: the remote's HEAD) and an optional `subdirectory`.
    Git {
        url: String,
        #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        subdirectory: Option<String>,
    },
    /// A `.tar.gz` (or `.tar`) already in storage, given by its storage path.
    Archive { path: String },
}

/// Lifecycle of a build. `queued` and `running` may move on; the other three are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl Status {
    pub fn is_final(self) -> bool {
        matches!(self, Status::Succeeded | Status::Failed | Status::Cancelled)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Running => "running",
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
        }
    }
}

/// What a build needs to run, as submitted (after validation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    pub source: Source,
    pub image: String,
    /// The install command handed to the image's `helpers/build.sh` (e.g. `npm install`).
    #[serde(default)]
    pub command: String,
    #[serde(default)]
    pub entrypoint: String,
    /// The function this build deploys: on success it becomes the function's current build.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub function: String,
    #[serde(default)]
    pub variables: BTreeMap<String, String>,
    /// Seconds for the build command.
    pub timeout: u64,
    pub cpus: f64,
    /// MB.
    pub memory: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cache_key: String,
    /// `v5` or `v2`.
    pub version: String,
}

/// The artifact a successful build left in storage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Artifact {
    /// Storage path, accepted as `source` by the executor's `runtimes` and `executions`.
    pub path: String,
    pub size: u64,
}

/// A build as the store keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Build {
    pub id: String,
    pub status: Status,
    pub spec: Spec,
    /// Unix seconds (float) of each step.
    pub created_at: f64,
    #[serde(default)]
    pub started_at: Option<f64>,
    #[serde(default)]
    pub finished_at: Option<f64>,
    /// Times a worker started this build (a redelivery after a crash counts).
    #[serde(default)]
    pub attempts: u32,
    #[serde(default)]
    pub artifact: Option<Artifact>,
    /// Why the build failed (or, while it waits for a retry, why the last attempt did).
    #[serde(default)]
    pub error: Option<String>,
    /// The commit a git build used.
    #[serde(default)]
    pub commit: Option<String>,
}

/// Which worker holds a running build, until when (unix seconds). Kept beside the record (the
/// holder renews it without rewriting the record, so it never overwrites a cancel): a second
/// delivery of a build whose lease is alive waits instead of building it twice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lease {
    pub holder: String,
    pub until: f64,
}

impl Build {
    /// A build just submitted.
    pub fn queued(id: String, spec: Spec, created_at: f64) -> Self {
        Self {
            id,
            status: Status::Queued,
            spec,
            created_at,
            started_at: None,
            finished_at: None,
            attempts: 0,
            artifact: None,
            error: None,
            commit: None,
        }
    }

    /// The reply of the API: the record without variable values (they may hold secrets) and
    /// without internal bookkeeping.
    pub fn to_json(&self) -> Value {
        let spec = &self.spec;
        serde_json::json!({
            "id": self.id,
            "status": self.status,
            "source": spec.source,
            "image": spec.image,
            "command": spec.command,
            "entrypoint": spec.entrypoint,
            "variables": spec.variables.keys().collect::<Vec<_>>(),
            "timeout": spec.timeout,
            "cpus": spec.cpus,
            "memory": spec.memory,
            "cacheKey": spec.cache_key,
            "function": spec.function,
            "version": spec.version,
            "createdAt": self.created_at,
            "startedAt": self.started_at,
            "finishedAt": self.finished_at,
            "duration": match (self.started_at, self.finished_at) {
                (Some(start), Some(end)) => Some(end - start),
                _ => None,
            },
            "attempts": self.attempts,
            "commit": self.commit,
            "artifact": self.artifact,
            "error": self.error,
        })
    }
}

/// The message on the queue: the build's id. Everything else (attempts included) is read from
/// the store, so a message delivered twice sees the same build.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
}

/// A function's name: `^[a-z0-9][a-z0-9-]{0,47}$` (it becomes part of a runtime id).
pub fn valid_function_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name.len() <= 48
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// A deployed function: its current build and how to run it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Function {
    pub name: String,
    pub build: String,
    /// The executor runtime of this deployment: a new one per build, so a redeploy starts
    /// fresh while calls to the old one finish.
    pub runtime_id: String,
    pub image: String,
    pub entrypoint: String,
    pub version: String,
    pub artifact: Artifact,
    /// When the build was submitted (a slower, older build never replaces a newer one).
    pub built_from: f64,
    pub deployed_at: f64,
}

/// Most a build id may be; ids are ours, so anything else is not a build.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

fn bad(message: impl Into<String>) -> Error {
    Error::InvalidArgument(message.into())
}

fn string_field(body: &serde_json::Map<String, Value>, name: &str, max: usize) -> Result<String> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) if s.len() <= max => Ok(s.clone()),
        Some(Value::String(_)) => Err(bad(format!(
            "Invalid `{name}` param: longer than {max} characters"
        ))),
        Some(_) => Err(bad(format!("Invalid `{name}` param: must be a string"))),
    }
}

fn number_field(
    body: &serde_json::Map<String, Value>,
    name: &str,
    default: f64,
    min: f64,
    max: f64,
) -> Result<f64> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(v) if (min..=max).contains(&v) => Ok(v),
            _ => Err(bad(format!(
                "Invalid `{name}` param: must be between {min} and {max}"
            ))),
        },
        Some(_) => Err(bad(format!("Invalid `{name}` param: must be a number"))),
    }
}

/// A path inside a repository or archive: relative, no `..`, no NUL.
fn check_relative(name: &str, path: &str) -> Result<()> {
    if path.starts_with('/') || path.contains('\0') || path.split('/').any(|part| part == "..") {
        return Err(bad(format!(
            "Invalid `{name}`: must be a relative path without `..`"
        )));
    }
    Ok(())
}

fn check_git_url(url: &str) -> Result<()> {
    const SCHEMES: [&str; 5] = ["https://", "http://", "git://", "ssh://", "file://"];
    if url.is_empty() || url.len() > 2048 {
        return Err(bad(
            "Invalid `source.url`: required, at most 2048 characters",
        ));
    }
    if !SCHEMES.iter().any(|scheme| url.starts_with(scheme)) {
        return Err(bad(
            "Invalid `source.url`: must start with https://, http://, git://, ssh:// or file://",
        ));
    }
    // Keeps the URL from being read as a git option or from carrying a second command line.
    if url.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(bad(
            "Invalid `source.url`: must not contain spaces or control characters",
        ));
    }
    Ok(())
}

fn check_ref(reference: &str) -> Result<()> {
    let ok = !reference.is_empty()
        && reference.len() <= 256
        && !reference.starts_with('-')
        && !reference.contains("..")
        && reference
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+".contains(c));
    if ok {
        Ok(())
    } else {
        Err(bad(
            "Invalid `source.ref`: a branch, tag or commit name (letters, digits, / . _ - +)",
        ))
    }
}

impl Spec {
    /// Validates a submitted body. Unknown fields are ignored, as the executor does.
    pub fn from_request(body: &Value) -> Result<Spec> {
        let Value::Object(body) = body else {
            return Err(bad("The request body must be a JSON object"));
        };
        let source = match body.get("source") {
            Some(Value::Object(source)) => source,
            Some(_) => return Err(bad("Invalid `source` param: must be an object")),
            None => return Err(bad("Missing `source` param: {\"type\": \"git\", \"url\": ...} or {\"type\": \"archive\", \"path\": ...}")),
        };
        let kind = string_field(source, "type", 16)?;
        let source = match kind.as_str() {
            "git" => {
                let url = string_field(source, "url", 2048)?;
                check_git_url(&url)?;
                let reference = string_field(source, "ref", 256)?;
                if !reference.is_empty() {
                    check_ref(&reference)?;
                }
                let subdirectory = string_field(source, "subdirectory", 1024)?;
                let subdirectory = subdirectory.trim_matches('/').to_string();
                if !subdirectory.is_empty() {
                    check_relative("source.subdirectory", &subdirectory)?;
                }
                Source::Git {
                    url,
                    reference: (!reference.is_empty()).then_some(reference),
                    subdirectory: (!subdirectory.is_empty()).then_some(subdirectory),
                }
            }
            "archive" => {
                let path = string_field(source, "path", 2048)?;
                if !path.starts_with('/') {
                    return Err(bad("Invalid `source.path`: an absolute storage path (e.g. /storage/functions/hello.tar.gz)"));
                }
                check_relative("source.path", path.trim_start_matches('/'))?;
                if !(path.ends_with(".tar.gz")
                    || path.ends_with(".tgz")
                    || path.ends_with(".tar")
                    || path.ends_with(".gz"))
                {
                    return Err(bad(
                        "Invalid `source.path`: must be a .tar.gz or .tar archive",
                    ));
                }
                Source::Archive { path }
            }
            "" => return Err(bad("Missing `source.type`: git or archive")),
            other => {
                return Err(bad(format!(
                    "Invalid `source.type` {other:?}: git or archive"
                )))
            }
        };
        let image = string_field(body, "image", 128)?;
        if image.is_empty() {
            return Err(bad(
                "Missing `image` param: the runtime image, e.g. hearth/node:v5-18",
            ));
        }
        let command = string_field(body, "command", 1024)?;
        let entrypoint = string_field(body, "entrypoint", 256)?;
        let variables = match body.get("variables") {
            None | Some(Value::Null) => BTreeMap::new(),
            Some(Value::Object(vars)) => vars
                .iter()
                .map(|(k, v)| match v {
                    Value::String(s) => Ok((k.clone(), s.clone())),
                    Value::Number(n) => Ok((k.clone(), n.to_string())),
                    Value::Bool(b) => Ok((k.clone(), b.to_string())),
                    _ => Err(bad(format!(
                        "Invalid `variables` param: `{k}` must be a string"
                    ))),
                })
                .collect::<Result<_>>()?,
            Some(_) => return Err(bad("Invalid `variables` param: must be an object")),
        };
        let timeout = number_field(body, "timeout", 600.0, 1.0, 3600.0)?;
        if timeout.fract() != 0.0 {
            return Err(bad("Invalid `timeout` param: must be an integer"));
        }
        let cpus = number_field(body, "cpus", 1.0, 0.1, 64.0)?;
        let memory = number_field(body, "memory", 512.0, 64.0, 65536.0)?;
        let cache_key = string_field(body, "cacheKey", 128)?;
        if !cache_key.is_empty() {
            let mut bytes = cache_key.bytes();
            let first_ok = bytes.next().is_some_and(|b| b.is_ascii_alphanumeric());
            if !first_ok
                || !bytes.all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
                || cache_key.contains("..")
            {
                return Err(bad(
                    "Invalid `cacheKey` param: ^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
                ));
            }
        }
        let function = string_field(body, "function", 48)?;
        if !function.is_empty() && !valid_function_name(&function) {
            return Err(bad("Invalid `function` param: lowercase letters, digits and -, starting with a letter or digit, at most 48"));
        }
        let version = string_field(body, "version", 8)?;
        let version = match version.as_str() {
            "" | "v5" => "v5".to_string(),
            "v2" => "v2".to_string(),
            other => return Err(bad(format!("Invalid `version` param {other:?}: v5 or v2"))),
        };
        Ok(Spec {
            source,
            image,
            command,
            entrypoint,
            function,
            variables,
            timeout: timeout as u64,
            cpus,
            memory: memory as u64,
            cache_key,
            version,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn git(extra: Value) -> Value {
        let mut body = json!({"source": {"type": "git", "url": "https://example.test/fn.git", "ref": "main"}, "image": "hearth/node:v5-18"});
        if let (Value::Object(body), Value::Object(extra)) = (&mut body, extra) {
            body.extend(extra);
        }
        body
    }

    #[test]
    fn a_git_request_gets_the_defaults() {
        let spec = Spec::from_request(&git(json!({}))).unwrap();
        assert_eq!(spec.timeout, 600);
        assert_eq!(spec.memory, 512);
        assert_eq!(spec.version, "v5");
        assert!(matches!(spec.source, Source::Git { reference: Some(ref r), .. } if r == "main"));
    }

    #[test]
    fn bad_requests_are_refused_with_a_reason() {
        for (body, needle) in [
            (json!([]), "JSON object"),
            (json!({"image": "x"}), "Missing `source`"),
            (
                json!({"source": {"type": "svn"}, "image": "x"}),
                "git or archive",
            ),
            (
                json!({"source": {"type": "git", "url": "--upload-pack=evil"}, "image": "x"}),
                "must start with",
            ),
            (
                json!({"source": {"type": "git", "url": "https://x/y z"}, "image": "x"}),
                "spaces",
            ),
            (
                git(json!({"source": {"type": "git", "url": "https://x/y", "ref": "-x"}})),
                "source.ref",
            ),
            (
                git(
                    json!({"source": {"type": "git", "url": "https://x/y", "subdirectory": "../up"}}),
                ),
                "subdirectory",
            ),
            (
                json!({"source": {"type": "archive", "path": "/storage/../etc/passwd.tar"}, "image": "x"}),
                "source.path",
            ),
            (
                json!({"source": {"type": "archive", "path": "relative.tar.gz"}, "image": "x"}),
                "absolute",
            ),
            (
                json!({"source": {"type": "git", "url": "https://x/y"}}),
                "Missing `image`",
            ),
            (git(json!({"timeout": 0})), "timeout"),
            (git(json!({"timeout": 1.5})), "integer"),
            (git(json!({"memory": "lots"})), "memory"),
            (git(json!({"cacheKey": "../x"})), "cacheKey"),
            (git(json!({"variables": {"A": {}}})), "variables"),
            (git(json!({"version": "v9"})), "version"),
            (git(json!({"command": "x".repeat(1025)})), "command"),
        ] {
            let err = Spec::from_request(&body).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{body}: {err}");
            assert!(err.to_string().contains(needle), "{body}: {err}");
        }
    }

    #[test]
    fn the_reply_hides_variable_values() {
        let spec = Spec::from_request(&git(json!({"variables": {"TOKEN": "s3cret"}}))).unwrap();
        let build = Build::queued("b1".into(), spec, 1.0);
        let text = build.to_json().to_string();
        assert!(text.contains("TOKEN") && !text.contains("s3cret"), "{text}");
    }

    #[test]
    fn ids_are_checked() {
        assert!(valid_id("0123abcd"));
        assert!(!valid_id("../x") && !valid_id(""));
    }
}
