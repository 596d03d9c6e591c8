//! Request parameters, read the same way from JSON, multipart forms and urlencoded forms, then
//! validated into typed values with the spec's limits. Every rejection names the parameter.

use std::collections::HashMap;

use bytes::Bytes;
use http::HeaderMap;
use serde_json::Value;

use crate::error::{Error, Result};

/// One parameter as it arrived.
#[derive(Debug, Clone)]
pub enum Field {
    Json(Value),
    /// A form value (multipart text part or urlencoded pair).
    Text(String),
    /// A multipart part that is not valid UTF-8 (only `body` may be binary).
    Binary(Bytes),
}

#[derive(Debug, Default)]
pub struct Fields(HashMap<String, Field>);

fn invalid(name: &str, why: &str) -> Error {
    Error::InvalidArgument(format!("Invalid `{name}` param: {why}"))
}

impl Fields {
    /// Reads the request body according to its content type.
    pub async fn parse(headers: &HeaderMap, body: Bytes) -> Result<Self> {
        let content_type = headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        if body.is_empty() {
            return Ok(Self::default());
        }
        if content_type.starts_with("multipart/form-data") {
            return Self::parse_multipart(&content_type, body).await;
        }
        if content_type.starts_with("application/x-www-form-urlencoded") {
            let fields = url::form_urlencoded::parse(&body)
                .map(|(k, v)| (k.into_owned(), Field::Text(v.into_owned())))
                .collect();
            return Ok(Self(fields));
        }
        // JSON is the default, as upstream clients send it.
        let value: Value = serde_json::from_slice(&body).map_err(|err| {
            Error::InvalidArgument(format!("Request body is not valid JSON: {err}"))
        })?;
        let Value::Object(map) = value else {
            return Err(Error::InvalidArgument(
                "Request body must be a JSON object.".to_string(),
            ));
        };
        Ok(Self(
            map.into_iter().map(|(k, v)| (k, Field::Json(v))).collect(),
        ))
    }

    async fn parse_multipart(content_type: &str, body: Bytes) -> Result<Self> {
        let boundary = multer::parse_boundary(content_type)
            .map_err(|err| Error::InvalidArgument(format!("Invalid multipart body: {err}")))?;
        let stream = futures_util::stream::once(async move { Ok::<_, std::io::Error>(body) });
        let mut multipart = multer::Multipart::new(stream, boundary);
        let mut fields = HashMap::new();
        while let Some(part) = multipart
            .next_field()
            .await
            .map_err(|err| Error::InvalidArgument(format!("Invalid multipart body: {err}")))?
        {
            let Some(name) = part.name().map(str::to_string) else {
                continue;
            };
            let bytes = part
                .bytes()
                .await
                .map_err(|err| Error::InvalidArgument(format!("Invalid multipart body: {err}")))?;
            let field = match String::from_utf8(bytes.to_vec()) {
                Ok(text) => Field::Text(text),
                Err(_) => Field::Binary(bytes),
            };
            fields.insert(name, field);
        }
        Ok(Self(fields))
    }

    fn get(&self, name: &str) -> Option<&Field> {
        match self.0.get(name) {
            None | Some(Field::Json(Value::Null)) => None,
            other => other,
        }
    }

    /// A string of at most `max` characters.
    pub fn string(&self, name: &str, max: usize) -> Result<Option<String>> {
        let value = match self.get(name) {
            None => return Ok(None),
            Some(Field::Json(Value::String(s))) | Some(Field::Text(s)) => s.clone(),
            Some(Field::Json(_)) => return Err(invalid(name, "Value must be a valid string")),
            Some(Field::Binary(_)) => return Err(invalid(name, "Value must be valid UTF-8 text")),
        };
        if value.chars().count() > max {
            return Err(invalid(
                name,
                &format!("Value must be a valid string and no longer than {max} chars"),
            ));
        }
        Ok(Some(value))
    }

    /// A required non-empty string.
    pub fn required(&self, name: &str, max: usize) -> Result<String> {
        match self.string(name, max)? {
            Some(value) if !value.is_empty() => Ok(value),
            _ => Err(Error::InvalidArgument(format!(
                "Param \"{name}\" is not optional."
            ))),
        }
    }

    pub fn integer(&self, name: &str) -> Result<Option<i64>> {
        match self.get(name) {
            None => Ok(None),
            Some(Field::Json(Value::Number(n))) => n
                .as_i64()
                .map(Some)
                .ok_or_else(|| invalid(name, "Value must be a valid integer")),
            Some(Field::Json(Value::String(s))) | Some(Field::Text(s)) => s
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| invalid(name, "Value must be a valid integer")),
            Some(_) => Err(invalid(name, "Value must be a valid integer")),
        }
    }

    /// An integer within `min..=max`, or `default`.
    pub fn integer_in(&self, name: &str, default: i64, min: i64, max: i64) -> Result<i64> {
        let value = self.integer(name)?.unwrap_or(default);
        if value < min || value > max {
            return Err(invalid(
                name,
                &format!("Value must be an integer between {min} and {max}"),
            ));
        }
        Ok(value)
    }

    pub fn float_in(&self, name: &str, default: f64, min: f64, max: f64) -> Result<f64> {
        let value = match self.get(name) {
            None => default,
            Some(Field::Json(Value::Number(n))) => n
                .as_f64()
                .ok_or_else(|| invalid(name, "Value must be a valid number"))?,
            Some(Field::Json(Value::String(s))) | Some(Field::Text(s)) => s
                .trim()
                .parse()
                .map_err(|_| invalid(name, "Value must be a valid number"))?,
            Some(_) => return Err(invalid(name, "Value must be a valid number")),
        };
        if !value.is_finite() || value < min || value > max {
            return Err(invalid(
                name,
                &format!("Value must be a number between {min} and {max}"),
            ));
        }
        Ok(value)
    }

    pub fn boolean(&self, name: &str, default: bool) -> Result<bool> {
        match self.get(name) {
            None => Ok(default),
            Some(Field::Json(Value::Bool(b))) => Ok(*b),
            Some(Field::Json(Value::String(s))) | Some(Field::Text(s)) => {
                match s.trim().to_ascii_lowercase().as_str() {
                    "true" | "1" => Ok(true),
                    "false" | "0" | "" => Ok(false),
                    _ => Err(invalid(name, "Value must be a valid boolean")),
                }
            }
            Some(Field::Json(Value::Number(n))) if n.as_i64() == Some(0) => Ok(false),
            Some(Field::Json(Value::Number(n))) if n.as_i64() == Some(1) => Ok(true),
            Some(_) => Err(invalid(name, "Value must be a valid boolean")),
        }
    }

    /// An object of string values (other values are stringified), given as an object or as a
    /// JSON string holding one (forms).
    pub fn object(&self, name: &str) -> Result<Vec<(String, String)>> {
        let map = match self.get(name) {
            None => return Ok(Vec::new()),
            Some(Field::Json(Value::Object(map))) => map.clone(),
            Some(Field::Json(Value::Array(a))) if a.is_empty() => return Ok(Vec::new()),
            Some(Field::Json(Value::String(s))) | Some(Field::Text(s)) => {
                if s.trim().is_empty() {
                    return Ok(Vec::new());
                }
                match serde_json::from_str::<Value>(s) {
                    Ok(Value::Object(map)) => map,
                    Ok(Value::Array(a)) if a.is_empty() => return Ok(Vec::new()),
                    _ => return Err(invalid(name, "Value must be a valid object")),
                }
            }
            Some(_) => return Err(invalid(name, "Value must be a valid object")),
        };
        Ok(map
            .into_iter()
            .map(|(k, v)| {
                let v = match v {
                    Value::String(s) => s,
                    Value::Null => String::new(),
                    other => other.to_string(),
                };
                (k, v)
            })
            .collect())
    }

    /// Raw bytes (the execution `body`): a string, or a binary multipart part.
    pub fn bytes(&self, name: &str, max: usize) -> Result<Bytes> {
        let bytes = match self.get(name) {
            None => Bytes::new(),
            Some(Field::Json(Value::String(s))) | Some(Field::Text(s)) => Bytes::from(s.clone()),
            Some(Field::Binary(b)) => b.clone(),
            Some(Field::Json(_)) => return Err(invalid(name, "Value must be a valid string")),
        };
        if bytes.len() > max {
            return Err(Error::TooLarge(format!(
                "Invalid `{name}` param: Value must be no larger than {max} bytes"
            )));
        }
        Ok(bytes)
    }
}

/// `^[A-Za-z0-9][A-Za-z0-9._-]{0,max-1}$`: ids and cache keys, which name containers and folders.
pub fn check_key(name: &str, value: &str, max: usize) -> Result<()> {
    let mut chars = value.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !first_ok || !rest_ok || value.len() > max || value.contains("..") {
        return Err(invalid(
            name,
            &format!(
                "Value must start with a letter or digit and contain only letters, digits, '.', '_' and '-', at most {max} chars"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(body: &str) -> Fields {
        let headers = HeaderMap::new();
        futures_util::FutureExt::now_or_never(Fields::parse(
            &headers,
            Bytes::from(body.to_string()),
        ))
        .unwrap()
        .unwrap()
    }

    #[test]
    fn typed_values_and_errors() {
        let f = json(r#"{"a":"x","n":5,"s":"7","b":true,"o":{"k":1,"s":"v"},"bad":[1]}"#);
        assert_eq!(f.string("a", 10).unwrap().as_deref(), Some("x"));
        assert!(f.string("a", 0).is_err());
        assert!(f.string("n", 10).is_err());
        assert_eq!(f.integer("n").unwrap(), Some(5));
        assert_eq!(f.integer("s").unwrap(), Some(7));
        assert!(f.integer("a").is_err());
        assert!(f.boolean("b", false).unwrap());
        assert!(f.boolean("a", false).is_err());
        let mut o = f.object("o").unwrap();
        o.sort();
        assert_eq!(o, vec![("k".into(), "1".into()), ("s".into(), "v".into())]);
        assert!(f.object("bad").is_err());
        assert!(f.required("missing", 10).is_err());
        assert!(f.integer_in("n", 1, 1, 3).is_err());
    }

    #[test]
    fn keys_reject_traversal() {
        assert!(check_key("cacheKey", "abc-1.2_x", 128).is_ok());
        for bad in ["../x", "", ".hidden", "a/b", "a..b", "a b"] {
            assert!(check_key("cacheKey", bad, 128).is_err(), "{bad}");
        }
    }

    #[test]
    fn non_object_json_is_rejected() {
        let headers = HeaderMap::new();
        let parsed =
            futures_util::FutureExt::now_or_never(Fields::parse(&headers, Bytes::from("[1]")));
        assert!(parsed.unwrap().is_err());
    }
}
