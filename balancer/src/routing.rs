//! Where a call goes: the routes of the executor API, and the home of a runtime by weighted
//! rendezvous hashing over available executors with a bounded-load fallback.

use std::sync::Arc;

use http::Method;

use crate::upstream::Upstream;

/// The executor API's routes, as the balancer needs to tell them apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `GET /v1/health`: answered by the balancer.
    Health,
    /// `GET /metrics`: the balancer's own.
    Metrics,
    /// `GET /v1/runtimes`: merged from every executor.
    List,
    /// `POST /v1/runtimes`: the runtime id is in the body.
    Create,
    /// `/v1/builds…`, `/v1/functions…`, `/v1/uploads`: the build service's API, passed through.
    Builds,
    /// Everything addressed to one runtime: get, delete, executions, logs, commands.
    Runtime {
        id: String,
        action: Action,
    },
    NotFound,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Get,
    Delete,
    Execute,
    Logs,
    Command,
}

impl Route {
    pub fn parse(method: &Method, path: &str) -> Self {
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        match (method, segments.as_slice()) {
            (&Method::GET, ["v1", "health"]) => Self::Health,
            (&Method::GET, ["metrics"]) => Self::Metrics,
            (&Method::GET, ["v1", "runtimes"]) => Self::List,
            (&Method::POST, ["v1", "runtimes"]) => Self::Create,
            (_, ["v1", "builds" | "functions" | "uploads", ..]) => Self::Builds,
            (method, ["v1", "runtimes", id, rest @ ..]) if !id.is_empty() => {
                let action = match (method, rest) {
                    (&Method::GET, []) => Action::Get,
                    (&Method::DELETE, []) => Action::Delete,
                    (&Method::POST, ["executions" | "execution"]) => Action::Execute,
                    (&Method::GET, ["logs"]) => Action::Logs,
                    (&Method::POST, ["commands"]) => Action::Command,
                    _ => return Self::NotFound,
                };
                Self::Runtime {
                    id: (*id).to_string(),
                    action,
                }
            }
            _ => Self::NotFound,
        }
    }
}

/// A stable 64-bit hash (FNV-1a, then a mixer): the same on every balancer replica.
fn hash(key: &str, node: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes().chain([0xff]).chain(node.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Weighted rendezvous score: `-w / ln(u)` with `u` uniform in (0, 1).
fn score(key: &str, upstream: &Upstream) -> f64 {
    let u = ((hash(key, &upstream.url) >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    -upstream.weight / u.ln()
}

/// Executors in the order `key` prefers them.
pub fn ranked(key: &str, upstreams: &[Arc<Upstream>]) -> Vec<Arc<Upstream>> {
    let mut scored: Vec<(f64, &Arc<Upstream>)> =
        upstreams.iter().map(|u| (score(key, u), u)).collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0));
    scored.into_iter().map(|(_, u)| u.clone()).collect()
}

/// The home of a new runtime: the first in rendezvous order whose load stays within `factor`
/// times its weighted share of the calls in flight (then the least loaded).
pub fn home(key: &str, upstreams: &[Arc<Upstream>], factor: f64) -> Option<Arc<Upstream>> {
    let ranked = ranked(key, upstreams);
    let total: usize = upstreams.iter().map(|u| u.in_flight()).sum();
    let weights: f64 = upstreams.iter().map(|u| u.weight).sum();
    let fits = |u: &Arc<Upstream>| {
        let cap = (factor * (total + 1) as f64 * u.weight / weights).ceil();
        (u.in_flight() + 1) as f64 <= cap
    };
    ranked.iter().find(|u| fits(u)).cloned().or_else(|| {
        ranked
            .iter()
            .min_by(|a, b| {
                (a.in_flight() as f64 / a.weight).total_cmp(&(b.in_flight() as f64 / b.weight))
            })
            .cloned()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(n: usize) -> Vec<Arc<Upstream>> {
        (0..n)
            .map(|i| Arc::new(Upstream::new(format!("http://10.0.0.{i}:80"), 1.0)))
            .collect()
    }

    #[test]
    fn parses_routes() {
        assert_eq!(Route::parse(&Method::GET, "/v1/health"), Route::Health);
        assert_eq!(Route::parse(&Method::GET, "/v1/runtimes"), Route::List);
        assert_eq!(Route::parse(&Method::POST, "/v1/runtimes"), Route::Create);
        assert_eq!(
            Route::parse(&Method::POST, "/v1/runtimes/fn1/execution"),
            Route::Runtime {
                id: "fn1".into(),
                action: Action::Execute
            }
        );
        assert_eq!(
            Route::parse(&Method::DELETE, "/v1/runtimes/fn1"),
            Route::Runtime {
                id: "fn1".into(),
                action: Action::Delete
            }
        );
        assert_eq!(Route::parse(&Method::PUT, "/v1/runtimes"), Route::NotFound);
        assert_eq!(
            Route::parse(&Method::GET, "/v1/runtimes/a/b"),
            Route::NotFound
        );
        assert_eq!(Route::parse(&Method::GET, "/v1/nope"), Route::NotFound);
    }

    #[test]
    fn rendezvous_is_stable_and_spread() {
        let ups = pool(3);
        let mut counts = [0usize; 3];
        for i in 0..3000 {
            let key = format!("function-{i}");
            let first = home(&key, &ups, 1.25).unwrap();
            assert_eq!(first.url, home(&key, &ups, 1.25).unwrap().url);
            let idx = ups.iter().position(|u| u.url == first.url).unwrap();
            counts[idx] += 1;
        }
        for c in counts {
            assert!((800..1200).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn removing_one_moves_only_its_keys() {
        let ups = pool(3);
        let fewer = vec![ups[0].clone(), ups[1].clone()];
        for i in 0..500 {
            let key = format!("f{i}");
            let before = home(&key, &ups, 10.0).unwrap();
            let after = home(&key, &fewer, 10.0).unwrap();
            if before.url != ups[2].url {
                assert_eq!(before.url, after.url);
            }
        }
    }

    #[test]
    fn weights_bias_the_share() {
        let mut ups = pool(2);
        ups[1] = Arc::new(Upstream::new("http://10.0.0.9:80".into(), 3.0));
        let heavy = (0..4000)
            .filter(|i| home(&format!("k{i}"), &ups, 100.0).unwrap().url == ups[1].url)
            .count();
        assert!((2700..3300).contains(&heavy), "{heavy}");
    }

    #[test]
    fn bounded_load_skips_a_busy_home() {
        let ups = pool(3);
        let key = "hot";
        let first = home(key, &ups, 1.25).unwrap();
        let _busy: Vec<_> = (0..10).map(|_| first.start()).collect();
        let next = home(key, &ups, 1.25).unwrap();
        assert_ne!(first.url, next.url);
    }
}
