//! The execution reply: JSON or `multipart/form-data`, chosen by `Accept` as upstream does, with
//! response headers shaped by `x-executor-response-format`.

use axum::http::header::CONTENT_TYPE;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, Bytes, BytesMut};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::Error;
use crate::runtimes::execute::ExecutionResult;
use crate::runtimes::random_hex;

/// True when the client asked for JSON (`application/json…` or `application/*`).
pub fn wants_json(headers: &HeaderMap) -> bool {
    headers
        .get_all(http::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|entry| entry.trim().to_ascii_lowercase())
        .any(|entry| entry.starts_with("application/json") || entry.starts_with("application/*"))
}

/// Response headers as an object: repeated names keep the last value below format 0.11.0 and
/// become arrays from 0.11.0 on.
pub fn headers_object(headers: &[(String, String)], keep_arrays: bool) -> Value {
    let mut map = Map::new();
    for (name, value) in headers {
        match map.get_mut(name) {
            Some(existing) if keep_arrays => match existing {
                Value::Array(values) => values.push(Value::String(value.clone())),
                other => {
                    let first = other.take();
                    *other = Value::Array(vec![first, Value::String(value.clone())]);
                }
            },
            _ => {
                map.insert(name.clone(), Value::String(value.clone()));
            }
        }
    }
    Value::Object(map)
}

/// Whether `x-executor-response-format` asks for 0.11.0 or later.
pub fn keeps_arrays(headers: &HeaderMap) -> bool {
    let format = headers
        .get("x-executor-response-format")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("0.10.0");
    let parts: Vec<u64> = format
        .trim()
        .split('.')
        .map(|p| p.parse().unwrap_or(0))
        .collect();
    let major = parts.first().copied().unwrap_or(0);
    let minor = parts.get(1).copied().unwrap_or(0);
    major > 0 || minor >= 11
}

/// The JSON reply, keys in the (sorted) order they always had.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct JsonReply<'a> {
    body: &'a str,
    cold_start_duration: f64,
    duration: f64,
    errors: &'a str,
    headers: &'a Value,
    logs: &'a str,
    start_time: f64,
    status_code: u16,
}

pub fn render(result: ExecutionResult, request_headers: &HeaderMap) -> Result<Response, Error> {
    let headers = headers_object(&result.headers, keeps_arrays(request_headers));
    if wants_json(request_headers) {
        let body = std::str::from_utf8(&result.body).map_err(|_| {
            Error::ExecutionBadJson(
                "Execution resulted in binary response, but JSON response does not allow binaries. Use \"Accept: multipart/form-data\" header to support binaries."
                    .to_string(),
            )
        })?;
        // Serialised straight from the result: no copy of the body, logs or errors.
        let reply = JsonReply {
            body,
            cold_start_duration: result.cold_start,
            duration: result.duration,
            errors: &result.errors,
            headers: &headers,
            logs: &result.logs,
            start_time: result.start_time,
            status_code: result.status_code,
        };
        let json = serde_json::to_vec(&reply)
            .map_err(|err| Error::Internal(format!("failed to render the reply: {err}")))?;
        return Ok(([(CONTENT_TYPE, "application/json; charset=utf-8")], json).into_response());
    }
    let boundary = format!("----HearthBoundary{}", random_hex(24));
    let mut out = BytesMut::with_capacity(result.body.len() + result.logs.len() + 1024);
    let text_part = |out: &mut BytesMut, name: &str, value: &[u8], content_type: Option<&str>| {
        out.put_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n")
                .as_bytes(),
        );
        if let Some(content_type) = content_type {
            out.put_slice(format!("Content-Type: {content_type}\r\n").as_bytes());
        }
        out.put_slice(b"\r\n");
        out.put_slice(value);
        out.put_slice(b"\r\n");
    };
    text_part(
        &mut out,
        "statusCode",
        result.status_code.to_string().as_bytes(),
        None,
    );
    text_part(
        &mut out,
        "headers",
        headers.to_string().as_bytes(),
        Some("application/json"),
    );
    text_part(
        &mut out,
        "body",
        &result.body,
        Some("application/octet-stream"),
    );
    text_part(&mut out, "logs", result.logs.as_bytes(), None);
    text_part(&mut out, "errors", result.errors.as_bytes(), None);
    text_part(
        &mut out,
        "duration",
        result.duration.to_string().as_bytes(),
        None,
    );
    text_part(
        &mut out,
        "startTime",
        result.start_time.to_string().as_bytes(),
        None,
    );
    text_part(
        &mut out,
        "coldStartDuration",
        result.cold_start.to_string().as_bytes(),
        None,
    );
    out.put_slice(format!("--{boundary}--\r\n").as_bytes());
    let content_type = format!("multipart/form-data; boundary={boundary}");
    Ok(([(CONTENT_TYPE, content_type)], Bytes::from(out)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn accept_negotiation() {
        let mut h = HeaderMap::new();
        assert!(!wants_json(&h));
        for (accept, json) in [
            ("application/json", true),
            ("text/html, application/*;q=0.9", true),
            ("*/*", false),
            ("text/plain", false),
            ("application/xml", false),
            ("multipart/form-data", false),
        ] {
            h.insert(http::header::ACCEPT, accept.parse().unwrap());
            assert_eq!(wants_json(&h), json, "{accept}");
        }
    }

    #[test]
    fn repeated_headers_by_format() {
        let headers = vec![
            ("set-cookie".to_string(), "a=1".to_string()),
            ("set-cookie".to_string(), "b=2".to_string()),
            ("x-one".to_string(), "v".to_string()),
        ];
        assert_eq!(
            headers_object(&headers, false),
            json!({"set-cookie": "b=2", "x-one": "v"})
        );
        assert_eq!(
            headers_object(&headers, true),
            json!({"set-cookie": ["a=1", "b=2"], "x-one": "v"})
        );
        let mut h = HeaderMap::new();
        assert!(!keeps_arrays(&h));
        h.insert("x-executor-response-format", "0.11.0".parse().unwrap());
        assert!(keeps_arrays(&h));
        h.insert("x-executor-response-format", "0.10.9".parse().unwrap());
        assert!(!keeps_arrays(&h));
    }
}
