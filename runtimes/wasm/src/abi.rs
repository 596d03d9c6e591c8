//! The guest ABI on the HTTP side: how a request becomes environment variables and stdin, and
//! how the guest's stdout becomes a response. See the crate docs for the contract as a guest
//! author sees it; this module is its one implementation.

use serde_json::{Map, Value};

/// The request as the guest sees it (after the server removed `x-open-runtimes-*` headers and
/// applied the enforced ones).
#[derive(Debug, Clone, Default)]
pub struct GuestRequest {
    pub method: String,
    pub scheme: String,
    pub host: String,
    pub port: u16,
    pub path: String,
    pub query_string: String,
    /// Lower-cased names, in arrival order; a repeated header is one entry joined by `, `.
    pub headers: Vec<(String, String)>,
}

impl GuestRequest {
    /// `url` as Open Runtimes reports it: the default port of the scheme is left out.
    pub fn url(&self) -> String {
        let default = matches!(
            (self.scheme.as_str(), self.port),
            ("http", 80) | ("https", 443)
        );
        let port = if default {
            String::new()
        } else {
            format!(":{}", self.port)
        };
        let query = if self.query_string.is_empty() {
            String::new()
        } else {
            format!("?{}", self.query_string)
        };
        format!("{}://{}{port}{}{query}", self.scheme, self.host, self.path)
    }

    /// `query` as Open Runtimes parses it: split on `&`, then on the first `=`.
    pub fn query(&self) -> Map<String, Value> {
        let mut map = Map::new();
        for pair in self.query_string.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            map.insert(key.to_string(), Value::String(value.to_string()));
        }
        map
    }

    /// The environment variables describing the request (they win over user variables).
    pub fn env(&self) -> Vec<(String, String)> {
        let headers: Map<String, Value> = self
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        let mut env = vec![
            ("REQUEST_METHOD".to_string(), self.method.clone()),
            ("REQUEST_URL".to_string(), self.url()),
            ("REQUEST_SCHEME".to_string(), self.scheme.clone()),
            ("REQUEST_HOST".to_string(), self.host.clone()),
            ("REQUEST_PORT".to_string(), self.port.to_string()),
            ("REQUEST_PATH".to_string(), self.path.clone()),
            (
                "REQUEST_QUERY_STRING".to_string(),
                self.query_string.clone(),
            ),
            (
                "REQUEST_QUERY".to_string(),
                Value::Object(self.query()).to_string(),
            ),
            (
                "REQUEST_HEADERS".to_string(),
                Value::Object(headers).to_string(),
            ),
        ];
        for (name, value) in &self.headers {
            env.push((cgi_name(name), value.clone()));
        }
        env
    }
}

/// `x-custom-header` → `HTTP_X_CUSTOM_HEADER` (the CGI convention).
pub fn cgi_name(header: &str) -> String {
    let mut name = String::with_capacity(header.len() + 5);
    name.push_str("HTTP_");
    name.extend(header.chars().map(|c| match c {
        '-' => '_',
        c => c.to_ascii_uppercase(),
    }));
    name
}

/// Merges `layers` in order: a later layer's variable replaces an earlier one of the same name.
pub fn merge_env(layers: &[&[(String, String)]]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut index = std::collections::HashMap::new();
    for layer in layers {
        for (key, value) in layer.iter() {
            match index.get(key) {
                Some(&i) => out[i] = (key.clone(), value.clone()),
                None => {
                    index.insert(key.clone(), out.len());
                    out.push((key.clone(), value.clone()));
                }
            }
        }
    }
    out
}

/// The response a guest wrote to stdout: header lines, an empty line, the body bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestResponse {
    pub status: u16,
    /// Names lower-cased, in the guest's order; `status` is not among them.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// Why stdout is not a response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    #[error("Return statement missing. return context.res.empty() if no response is expected.")]
    Missing,
    #[error(
        "Invalid response: {0}. Write header lines, an empty line, then the body (an empty \
         first line means no headers)."
    )]
    Invalid(String),
}

/// Parses stdout. Header lines end with `\n` (a `\r` before it is dropped); `status: <code>`
/// sets the status (default 200); the body is everything after the first empty line.
pub fn parse_response(stdout: &[u8]) -> Result<GuestResponse, ResponseError> {
    if stdout.is_empty() {
        return Err(ResponseError::Missing);
    }
    let mut status = 200u16;
    let mut headers = Vec::new();
    let mut rest = stdout;
    loop {
        let Some(end) = rest.iter().position(|&b| b == b'\n') else {
            return Err(ResponseError::Invalid(
                "no empty line ends the header lines".into(),
            ));
        };
        let line = &rest[..end];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        rest = &rest[end + 1..];
        if line.is_empty() {
            break;
        }
        let line = std::str::from_utf8(line)
            .map_err(|_| ResponseError::Invalid("a header line is not UTF-8".into()))?;
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| ResponseError::Invalid(format!("header line {line:?} has no ':'")))?;
        let name = name.trim().to_ascii_lowercase();
        let value = value.trim().to_string();
        if name == "status" {
            // "404" or "404 Not Found" (CGI style).
            let code = value.split_whitespace().next().unwrap_or("");
            status = code
                .parse()
                .ok()
                .filter(|c| (100..=999).contains(c))
                .ok_or_else(|| ResponseError::Invalid(format!("status {value:?}")))?;
        } else {
            headers.push((name, value));
        }
    }
    Ok(GuestResponse {
        status,
        headers,
        body: rest.to_vec(),
    })
}

/// The 8000-character cut of one `log`/`error` line.
pub fn cut_log_line(line: &str) -> String {
    const LIMIT: usize = 8000;
    match line.char_indices().nth(LIMIT) {
        Some((at, _)) => format!(
            "{}... Log truncated due to size limit ({LIMIT} characters)",
            &line[..at]
        ),
        None => line.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_head_and_binary_body() {
        let got = parse_response(b"Status: 404 Not Found\r\nX-A: b\r\n\r\n\x00\xff\n").unwrap();
        assert_eq!(got.status, 404);
        assert_eq!(got.headers, vec![("x-a".to_string(), "b".to_string())]);
        assert_eq!(got.body, b"\x00\xff\n");
    }

    #[test]
    fn empty_first_line_means_no_headers() {
        let got = parse_response(b"\nHello").unwrap();
        assert_eq!((got.status, got.body.as_slice()), (200, &b"Hello"[..]));
        assert_eq!(parse_response(b""), Err(ResponseError::Missing));
        assert!(matches!(
            parse_response(b"Hello"),
            Err(ResponseError::Invalid(_))
        ));
    }

    #[test]
    fn url_and_query_rules() {
        let req = GuestRequest {
            scheme: "https".into(),
            host: "h".into(),
            port: 443,
            path: "/p".into(),
            query_string: "a=1&b=&c==d&h".into(),
            ..Default::default()
        };
        assert_eq!(req.url(), "https://h/p?a=1&b=&c==d&h");
        assert_eq!(
            Value::Object(req.query()),
            serde_json::json!({"a": "1", "b": "", "c": "=d", "h": ""})
        );
    }

    #[test]
    fn cuts_long_lines() {
        let line = cut_log_line(&"A".repeat(9000));
        assert!(line.starts_with(&"A".repeat(8000)));
        assert!(line.ends_with("(8000 characters)"));
        assert_eq!(cut_log_line("short"), "short");
    }
}
