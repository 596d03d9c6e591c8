//! HTTP/1.1 framing for the forwarding path: which requests it takes, the request as the
//! executor gets it, how a response body is delimited, the response head as the client gets it,
//! and a scanner that finds the end of a chunked body without decoding it.

use std::ops::Range;

use bytes::Bytes;

use crate::proxy::HOP_BY_HOP;
use crate::service::ADDRESSING;

/// Headers a request or response head may carry on this path (more: the general path).
pub const MAX_HEADERS: usize = 64;
/// A head larger than this goes to the general path, which refuses it.
pub const MAX_HEAD: usize = 64 * 1024;

/// Whether `name` is a hop-by-hop header ([`HOP_BY_HOP`]).
pub fn is_hop_by_hop(name: &str) -> bool {
    HOP_BY_HOP.iter().any(|n| n.eq_ignore_ascii_case(name))
}

/// What a complete request head asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Head {
    /// An execution this path forwards itself.
    Execution(Execution),
    /// Anything else: the general path serves it (and the rest of the connection).
    General,
}

/// An execution call: `POST /v1/runtimes/{id}/executions` on HTTP/1.1 with a body of known
/// length (held, so a refused connect can go to the next executor).
#[derive(Debug, PartialEq, Eq)]
pub struct Execution {
    /// The length of the head in the buffer.
    pub head_len: usize,
    /// Where the runtime id is in the head.
    pub id: Range<usize>,
    pub body_len: usize,
    /// The client asked to close the connection after this call.
    pub close: bool,
    /// The request as the executor gets it, from the line after `host` to the end of the head:
    /// the client's headers but `host`, hop-by-hop ones and `content-length`, then the length.
    pub forward: Vec<u8>,
    /// The request line.
    pub line: Range<usize>,
}

/// Parses the head at the start of `buf`: `None` while incomplete (and within [`MAX_HEAD`]).
pub fn request(buf: &[u8], replay_limit: u64) -> Option<Head> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let head_len = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD => return None,
        // Too large, too many headers or malformed: the general path answers it.
        _ => return Some(Head::General),
    };
    Some(execution(buf, head_len, &parsed, replay_limit).map_or(Head::General, Head::Execution))
}

fn execution(
    buf: &[u8],
    head_len: usize,
    parsed: &httparse::Request<'_, '_>,
    replay_limit: u64,
) -> Option<Execution> {
    if parsed.version != Some(1) || parsed.method != Some("POST") {
        return None;
    }
    let path = parsed.path?;
    let id = execution_id(path)?;
    let mut body_len: Option<usize> = None;
    let mut close = false;
    let mut forward = Vec::with_capacity(head_len + 32);
    for header in parsed.headers.iter() {
        let name = header.name;
        if name.eq_ignore_ascii_case("content-length") {
            let length = std::str::from_utf8(header.value)
                .ok()
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<u64>().ok())?;
            if body_len.is_some() || length > replay_limit {
                return None;
            }
            body_len = Some(usize::try_from(length).ok()?);
            continue;
        }
        if name.eq_ignore_ascii_case("connection") {
            // Only the plain values: a header named in `Connection` is for the general path.
            match header.value.trim_ascii() {
                v if v.eq_ignore_ascii_case(b"close") => close = true,
                v if v.eq_ignore_ascii_case(b"keep-alive") => {}
                _ => return None,
            }
            continue;
        }
        if name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("expect")
            || name.eq_ignore_ascii_case("upgrade")
            || (name.eq_ignore_ascii_case(ADDRESSING)
                && header.value.trim_ascii().eq_ignore_ascii_case(b"broadcast"))
        {
            return None;
        }
        if name.eq_ignore_ascii_case("host") || is_hop_by_hop(name) {
            continue;
        }
        forward.extend_from_slice(name.as_bytes());
        forward.extend_from_slice(b": ");
        forward.extend_from_slice(header.value);
        forward.extend_from_slice(b"\r\n");
    }
    let body_len = body_len.unwrap_or(0);
    forward.extend_from_slice(b"content-length: ");
    forward.extend_from_slice(body_len.to_string().as_bytes());
    forward.extend_from_slice(b"\r\n\r\n");
    let line_end = buf.windows(2).position(|w| w == b"\r\n")?;
    Some(Execution {
        head_len,
        id: offset_in(buf, id)?,
        body_len,
        close,
        forward,
        line: 0..line_end + 2,
    })
}

/// The runtime id of `/v1/runtimes/{id}/executions` (or `/execution`), query aside.
fn execution_id(path: &str) -> Option<&str> {
    let path = path.split('?').next().unwrap_or(path);
    let rest = path.strip_prefix("/v1/runtimes/")?;
    let (id, action) = rest.split_once('/')?;
    (!id.is_empty() && matches!(action, "executions" | "execution")).then_some(id)
}

/// Where `part` (a slice of `buf`) starts and ends in `buf`.
fn offset_in(buf: &[u8], part: &str) -> Option<Range<usize>> {
    let start = (part.as_ptr() as usize).checked_sub(buf.as_ptr() as usize)?;
    (start + part.len() <= buf.len()).then_some(start..start + part.len())
}

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// Until the executor closes the connection.
    UntilClose,
}

/// A complete response head from an executor.
#[derive(Debug)]
pub struct Response {
    pub head_len: usize,
    pub status: u16,
    pub framing: Framing,
    /// The connection can carry another request after this response.
    pub reusable: bool,
    /// The head as the client gets it (hop-by-hop headers out, framing and `close` put back).
    pub head: Vec<u8>,
}

/// Parses the response head at the start of `buf`: `Ok(None)` while incomplete; interim (1xx)
/// responses are skipped by the caller through [`Response::head_len`] with [`Framing::Empty`].
pub fn response(buf: &[u8], close: bool) -> Result<Option<Response>, String> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut headers);
    let head_len = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD => return Ok(None),
        Ok(httparse::Status::Partial) => return Err("the response head is too large".into()),
        Err(err) => return Err(format!("invalid response head: {err}")),
    };
    let status = parsed.code.unwrap_or(0);
    let mut length = None;
    let mut chunked = false;
    // The transfer codings as sent, all `Transfer-Encoding` lines joined: the body is passed on
    // as it came, so the client gets them as they were (a coding other than chunked last: the
    // body ends with the connection).
    let mut codings: Vec<u8> = Vec::new();
    let mut upstream_close = parsed.version != Some(1);
    let mut head = Vec::with_capacity(head_len + 32);
    head.extend_from_slice(b"HTTP/1.1 ");
    head.extend_from_slice(status.to_string().as_bytes());
    head.push(b' ');
    head.extend_from_slice(parsed.reason.unwrap_or("").as_bytes());
    head.extend_from_slice(b"\r\n");
    for header in parsed.headers.iter() {
        let name = header.name;
        if name.eq_ignore_ascii_case("transfer-encoding") {
            let value = header.value.trim_ascii();
            chunked = value.len() >= 7 && value[value.len() - 7..].eq_ignore_ascii_case(b"chunked");
            if !codings.is_empty() {
                codings.extend_from_slice(b", ");
            }
            codings.extend_from_slice(value);
            continue;
        }
        if name.eq_ignore_ascii_case("connection") {
            upstream_close |= header
                .value
                .split(|b| *b == b',')
                .any(|v| v.trim_ascii().eq_ignore_ascii_case(b"close"));
            continue;
        }
        if name.eq_ignore_ascii_case("content-length") {
            let value = std::str::from_utf8(header.value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or("invalid content-length in the response")?;
            if length.is_some_and(|l| l != value) {
                return Err("conflicting content-length in the response".into());
            }
            length = Some(value);
            // Written after the loop, only where it frames the body the client gets.
            continue;
        }
        if is_hop_by_hop(name) {
            continue;
        }
        head.extend_from_slice(name.as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(header.value);
        head.extend_from_slice(b"\r\n");
    }
    // A transfer coding overrides a length (RFC 9112 §6.3): the length is not passed on then.
    let encoded = !codings.is_empty();
    let framing = match (status, encoded, length) {
        (100..=199 | 204 | 304, _, _) => Framing::Empty,
        (_, true, _) if chunked => Framing::Chunked,
        (_, false, Some(n)) => Framing::Length(n),
        _ => Framing::UntilClose,
    };
    match (framing, length) {
        (Framing::Length(n), _) | (Framing::Empty, Some(n)) => {
            head.extend_from_slice(b"content-length: ");
            head.extend_from_slice(n.to_string().as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        _ => {}
    }
    if status == 101 {
        return Err("the executor switched protocols on an execution".into());
    }
    if encoded && framing != Framing::Empty {
        head.extend_from_slice(b"transfer-encoding: ");
        head.extend_from_slice(&codings);
        head.extend_from_slice(b"\r\n");
    }
    if close || framing == Framing::UntilClose {
        head.extend_from_slice(b"connection: close\r\n");
    }
    head.extend_from_slice(b"\r\n");
    Ok(Some(Response {
        head_len,
        status,
        framing,
        reusable: !upstream_close && framing != Framing::UntilClose,
        head,
    }))
}

/// An error answer on this path: the API's JSON error as a whole HTTP/1.1 response.
pub fn error_response(status: u16, reason: &str, body: &Bytes, close: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(160 + body.len());
    out.extend_from_slice(format!("HTTP/1.1 {status} {reason}\r\n").as_bytes());
    out.extend_from_slice(b"content-type: application/json; charset=utf-8\r\n");
    out.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

/// Finds where a chunked body ends, fed the bytes as they come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunks {
    /// In a chunk-size line: the size so far, whether it has a digit, in an extension.
    Size {
        size: u64,
        digits: bool,
        ext: bool,
    },
    SizeLf {
        size: u64,
    },
    Data(u64),
    DataCr,
    DataLf,
    /// In the trailer section; `start` when at the start of a line.
    Trailer {
        start: bool,
    },
    TrailerLf {
        start: bool,
    },
    Done,
}

impl Default for Chunks {
    fn default() -> Self {
        Self::Size {
            size: 0,
            digits: false,
            ext: false,
        }
    }
}

impl Chunks {
    /// Scans `bytes`: `Ok(Some(n))` when the body ends after its first `n` bytes.
    pub fn scan(&mut self, bytes: &[u8]) -> Result<Option<usize>, &'static str> {
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            *self = match *self {
                Self::Size { size, digits, ext } => match b {
                    b'\r' if digits => Self::SizeLf { size },
                    _ if ext => Self::Size { size, digits, ext },
                    b';' | b' ' | b'\t' if digits => Self::Size {
                        size,
                        digits,
                        ext: true,
                    },
                    _ => {
                        let digit = (b as char).to_digit(16).ok_or("invalid chunk size")?;
                        let size = size
                            .checked_mul(16)
                            .and_then(|s| s.checked_add(u64::from(digit)))
                            .ok_or("chunk size overflow")?;
                        Self::Size {
                            size,
                            digits: true,
                            ext,
                        }
                    }
                },
                Self::SizeLf { size } if b == b'\n' => match size {
                    0 => Self::Trailer { start: true },
                    n => Self::Data(n),
                },
                Self::Data(n) => {
                    let take = usize::try_from(n)
                        .unwrap_or(usize::MAX)
                        .min(bytes.len() - i);
                    i += take;
                    let left = n - take as u64;
                    *self = if left == 0 {
                        Self::DataCr
                    } else {
                        Self::Data(left)
                    };
                    continue;
                }
                Self::DataCr if b == b'\r' => Self::DataLf,
                Self::DataLf if b == b'\n' => Self::default(),
                Self::Trailer { start } => match b {
                    b'\r' => Self::TrailerLf { start },
                    _ => Self::Trailer { start: false },
                },
                Self::TrailerLf { start } if b == b'\n' => {
                    if start {
                        *self = Self::Done;
                        return Ok(Some(i + 1));
                    }
                    Self::Trailer { start: true }
                }
                Self::Done => return Ok(Some(i)),
                _ => return Err("invalid chunked framing"),
            };
            i += 1;
        }
        Ok((*self == Self::Done).then_some(bytes.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXEC: &[u8] = b"POST /v1/runtimes/fn-1/executions HTTP/1.1\r\nHost: lb\r\nAuthorization: Bearer k\r\nConnection: keep-alive\r\nContent-Length: 11\r\n\r\n{\"path\":\"/\"}";

    #[test]
    fn takes_executions_with_a_held_body() {
        let Some(Head::Execution(e)) = request(EXEC, 1024) else {
            panic!("not an execution");
        };
        assert_eq!(&EXEC[e.id.clone()], b"fn-1");
        assert_eq!(e.body_len, 11);
        assert!(!e.close);
        assert_eq!(
            &EXEC[e.line.clone()],
            b"POST /v1/runtimes/fn-1/executions HTTP/1.1\r\n"
        );
        assert_eq!(
            String::from_utf8(e.forward).unwrap(),
            "Authorization: Bearer k\r\ncontent-length: 11\r\n\r\n"
        );
        assert_eq!(e.head_len, EXEC.len() - 12);
    }

    #[test]
    fn leaves_everything_else_to_the_general_path() {
        let cases: [&[u8]; 9] = [
            b"GET /v1/runtimes/a HTTP/1.1\r\n\r\n",
            b"POST /v1/runtimes HTTP/1.1\r\n\r\n",
            b"POST /v1/runtimes/a/executions HTTP/1.0\r\n\r\n",
            b"POST /v1/runtimes/a/executions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST /v1/runtimes/a/executions HTTP/1.1\r\nContent-Length: 2000\r\n\r\n",
            b"POST /v1/runtimes/a/executions HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
            b"POST /v1/runtimes/a/executions HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
            b"POST /v1/runtimes/a/executions HTTP/1.1\r\nx-opr-addressing-method: broadcast\r\n\r\n",
            b"POST /v1/runtimes//executions HTTP/1.1\r\n\r\n",
        ];
        for case in cases {
            assert_eq!(
                request(case, 1024),
                Some(Head::General),
                "{}",
                String::from_utf8_lossy(case)
            );
        }
        assert_eq!(request(b"garbage\r\n\r\n", 1024), Some(Head::General));
        assert_eq!(request(b"POST /v1/runtimes/a/exec", 1024), None);
    }

    #[test]
    fn response_heads_keep_end_to_end_headers() {
        let raw = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nkeep-alive: timeout=5\r\ncontent-length: 2\r\n\r\n{}";
        let r = response(raw, false).unwrap().unwrap();
        assert_eq!(r.framing, Framing::Length(2));
        assert!(r.reusable);
        assert_eq!(
            String::from_utf8(r.head).unwrap(),
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n"
        );
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
        let r = response(raw, true).unwrap().unwrap();
        assert_eq!(r.framing, Framing::Chunked);
        assert!(!r.reusable);
        assert!(String::from_utf8(r.head)
            .unwrap()
            .ends_with("transfer-encoding: chunked\r\nconnection: close\r\n\r\n"));
        let r = response(b"HTTP/1.1 200 OK\r\n\r\n", false)
            .unwrap()
            .unwrap();
        assert_eq!(r.framing, Framing::UntilClose);
        assert!(!r.reusable);
        assert!(response(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", false).is_err());
        for (raw, framing, head) in [
            // Chunked with a length too: chunked frames the body, the length is not passed on.
            (
                &b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nTransfer-Encoding: chunked\r\nx-a: 1\r\n\r\n"[..],
                Framing::Chunked,
                "HTTP/1.1 200 OK\r\nx-a: 1\r\ntransfer-encoding: chunked\r\n\r\n",
            ),
            // Another transfer coding: until the close, no length either; the coding goes on,
            // so the client knows the bytes are gzip.
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nTransfer-Encoding: gzip\r\n\r\n",
                Framing::UntilClose,
                "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\nconnection: close\r\n\r\n",
            ),
            // Codings over two lines, chunked last: chunked framing, both codings passed on.
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n",
                Framing::Chunked,
                "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
            ),
        ] {
            let r = response(raw, false).unwrap().unwrap();
            assert_eq!(r.framing, framing);
            assert_eq!(String::from_utf8(r.head).unwrap(), head);
        }
        assert!(response(b"HTTP/1.1 200 OK\r\n", false).unwrap().is_none());
    }

    #[test]
    fn finds_the_end_of_chunked_bodies_fed_in_pieces() {
        let body = b"5;ext=1\r\nhello\r\n10\r\n0123456789abcdef\r\n0\r\nx-trailer: 1\r\n\r\nNEXT";
        let end = body.len() - 4;
        for split in 0..body.len() {
            let mut chunks = Chunks::default();
            let (a, b) = body.split_at(split);
            let found = match chunks.scan(a).unwrap() {
                Some(n) => n,
                None => split + chunks.scan(b).unwrap().unwrap(),
            };
            assert_eq!(found, end, "split at {split}");
        }
        let mut chunks = Chunks::default();
        assert_eq!(chunks.scan(b"0\r\n\r\n").unwrap(), Some(5));
        assert!(Chunks::default().scan(b"zz\r\n").is_err());
        assert!(Chunks::default().scan(b"2\r\nabX").is_err());
    }
}
