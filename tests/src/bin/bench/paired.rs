//! Latency at one connection, with the paths taking turns request by request.
//!
//! wrk measures one path at a time, so two paths measured seconds apart see different hosts: on
//! the 2 vCPU machines here the direct path's own p99 at one connection moved between 0.55 and
//! 11 ms from one 4-second round to the next. Here each path keeps one keep-alive connection, and
//! one client thread sends one request on each in turn (the order alternating forward and back),
//! so every path sees the same moments of the host, and a stall lands on whichever request is in
//! flight, not on one path's whole round. What stays different between the paths is the paths.

use std::io::{Read, Write};
use std::net::TcpStream;

use super::*;

/// One path: where to connect and the bytes of its request.
pub(super) struct Target {
    addr: String,
    request: Vec<u8>,
}

impl Target {
    /// `url` is `http://host:port/path`; `headers` and `body` are sent as given, with `Host` and
    /// `Content-Length` added.
    pub(super) fn new(
        url: &str,
        method: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Result<Self> {
        let rest = url
            .strip_prefix("http://")
            .with_context(|| format!("not an http:// URL: {url}"))?;
        let (addr, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let mut request = format!("{method} {path} HTTP/1.1\r\nhost: {addr}\r\n");
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str(&format!("content-length: {}\r\n\r\n{body}", body.len()));
        Ok(Self {
            addr: addr.to_string(),
            request: request.into_bytes(),
        })
    }

    /// A GET as the executor calls a runtime (the same headers as `runtime_lua`).
    pub(super) fn runtime(url: &str) -> Result<Self> {
        let headers = [
            ("x-open-runtimes-secret", SECRET),
            ("x-open-runtimes-timeout", "15"),
            ("x-open-runtimes-logging", "enabled"),
        ];
        Self::new(url, "GET", &headers, "")
    }

    /// An execution of path `/` posted to the executor API (the same as `execution_lua`).
    pub(super) fn execution(url: &str, secret: &str) -> Result<Self> {
        let bearer = format!("Bearer {secret}");
        let headers = [
            ("authorization", bearer.as_str()),
            ("accept", "application/json"),
            ("content-type", "application/json"),
        ];
        Self::new(url, "POST", &headers, r#"{"path":"/"}"#)
    }
}

/// One path's latencies over the whole run and per round.
pub(super) struct Paired {
    pub(super) all: Load,
    pub(super) rounds: Vec<Load>,
    /// Every latency in ms, in the order taken: the n-th of one path and the n-th of another
    /// were taken in the same cycle.
    pub(super) samples: Vec<f64>,
}

/// How much path `b` differs from path `a`: the estimate over all samples and a 95 % interval
/// from a bootstrap over cycles (each resample takes whole cycles, both paths' requests of the
/// cycle together, so it keeps the pairing).
#[derive(Debug, Clone, Copy)]
pub(super) struct Difference {
    pub(super) estimate: f64,
    pub(super) low: f64,
    pub(super) high: f64,
}

impl Difference {
    /// `b − a` of `statistic` over the paired samples `a` and `b`.
    pub(super) fn of(a: &[f64], b: &[f64], statistic: fn(&[f64]) -> f64) -> Self {
        let n = a.len().min(b.len());
        let estimate = statistic(&b[..n]) - statistic(&a[..n]);
        // xorshift64*: enough for choosing indices, and the same every run.
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            state.wrapping_mul(0x2545_F491_4F6C_DD1D)
        };
        const RESAMPLES: usize = 400;
        let (mut ra, mut rb) = (vec![0.0; n], vec![0.0; n]);
        let mut differences: Vec<f64> = (0..RESAMPLES)
            .map(|_| {
                for k in 0..n {
                    let i = (next() % n.max(1) as u64) as usize;
                    (ra[k], rb[k]) = (a[i], b[i]);
                }
                statistic(&rb) - statistic(&ra)
            })
            .collect();
        differences.sort_by(f64::total_cmp);
        Self {
            estimate,
            low: percentile(&differences, 2.5),
            high: percentile(&differences, 97.5),
        }
    }
}

/// The statistics the bench compares, over unsorted samples in ms.
pub(super) fn p50(samples: &[f64]) -> f64 {
    percentile_of(samples, 50.0)
}

pub(super) fn p99(samples: &[f64]) -> f64 {
    percentile_of(samples, 99.0)
}

/// Requests/s of one connection: 1 / mean latency.
pub(super) fn rps(samples: &[f64]) -> f64 {
    1000.0 * samples.len() as f64 / samples.iter().sum::<f64>()
}

/// The `p` percentile of unsorted samples.
pub(super) fn percentile_of(samples: &[f64], p: f64) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_unstable_by(f64::total_cmp);
    percentile(&sorted, p)
}

/// `rounds` rounds of `round` each; in each, one request per path in turn until the round's time
/// is up. Blocking, on the calling thread: call it off any runtime that serves a path.
pub(super) fn interleaved(
    targets: &[Target],
    rounds: usize,
    round: Duration,
) -> Result<Vec<Paired>> {
    let mut conns = targets.iter().map(connect).collect::<Result<Vec<_>>>()?;
    let mut buf = vec![0u8; 64 * 1024];
    // Samples in ms, per path and round.
    let mut samples: Vec<Vec<Vec<f64>>> = vec![Vec::new(); targets.len()];
    let mut cycle = 0usize;
    for _ in 0..rounds {
        let mut this_round: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
        let end = Instant::now() + round;
        while Instant::now() < end {
            for k in 0..targets.len() {
                let i = if cycle.is_multiple_of(2) {
                    k
                } else {
                    targets.len() - 1 - k
                };
                let started = Instant::now();
                let open = exchange(&mut conns[i], &targets[i], &mut buf)?;
                let ms = started.elapsed().as_secs_f64() * 1000.0;
                this_round[i].push(ms);
                // A server that ends keep-alive (nginx after `keepalive_requests`): a new
                // connection, outside the timing, as wrk does.
                if !open {
                    conns[i] = connect(&targets[i])?;
                }
            }
            cycle += 1;
        }
        for (all, one) in samples.iter_mut().zip(this_round) {
            all.push(one);
        }
    }
    Ok(samples
        .into_iter()
        .map(|per_round| {
            let rounds = per_round.iter().map(|s| load_of(s)).collect();
            let all: Vec<f64> = per_round.concat();
            Paired {
                all: load_of(&all),
                rounds,
                samples: all,
            }
        })
        .collect())
}

fn connect(target: &Target) -> Result<TcpStream> {
    let s = TcpStream::connect(&target.addr).with_context(|| format!("connect {}", target.addr))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    Ok(s)
}

/// p50, p99 and, since one connection waits for each answer, requests/s as 1 / mean latency.
fn load_of(samples: &[f64]) -> Load {
    Load {
        p50_ms: p50(samples),
        p99_ms: p99(samples),
        rps: rps(samples),
    }
}

/// Sends the target's request and reads the whole answer (by `Content-Length`, or chunked to
/// its last chunk); anything but a 2xx is an error. False when the server closes the connection
/// after this answer.
fn exchange(conn: &mut TcpStream, target: &Target, buf: &mut [u8]) -> Result<bool> {
    conn.write_all(&target.request)
        .with_context(|| format!("write to {}", target.addr))?;
    let mut have = 0;
    loop {
        if have == buf.len() {
            bail!("answer from {} over {} bytes", target.addr, buf.len());
        }
        let n = conn
            .read(&mut buf[have..])
            .with_context(|| format!("read from {}", target.addr))?;
        if n == 0 {
            bail!(
                "{} closed the connection after {have} bytes of an answer",
                target.addr
            );
        }
        have += n;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        let head = match response.parse(&buf[..have])? {
            httparse::Status::Complete(head) => head,
            httparse::Status::Partial => continue,
        };
        let code = response.code.unwrap_or_default();
        let header = |name: &str| {
            response
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value).to_string())
        };
        let done = if let Some(length) = header("content-length") {
            have >= head + length.trim().parse::<usize>().context("content-length")?
        } else if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            {
                let body = &buf[head..have];
                body == b"0\r\n\r\n" || body.ends_with(b"\r\n0\r\n\r\n")
            }
        } else {
            bail!("answer from {} without a length", target.addr)
        };
        if !(200..300).contains(&code) {
            bail!(
                "{} answered {code}: {}",
                target.addr,
                String::from_utf8_lossy(&buf[head..have])
            );
        }
        if done {
            let close = header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
            return Ok(!close);
        }
    }
}
