//! The executors: discovery (a static list, hostnames re-resolved to all their A records) and
//! health (active probes of `/v1/health`, passive ejection when a connection fails, readmission
//! when probes pass again).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

/// One executor, identified by its base URL (`http://10.0.0.5:80`).
#[derive(Debug)]
pub struct Upstream {
    pub url: String,
    /// `host:port` of [`Upstream::url`].
    pub authority: Arc<str>,
    pub weight: f64,
    healthy: AtomicBool,
    /// Still part of the discovered set (a removed one keeps answering its in-flight calls).
    present: AtomicBool,
    failures: AtomicU32,
    in_flight: AtomicUsize,
    /// Idle connections of the forwarding path (`wire`).
    pub conns: crate::wire::conns::Shelf,
}

impl Upstream {
    pub fn new(url: String, weight: f64) -> Self {
        let authority = url
            .strip_prefix("http://")
            .unwrap_or(&url)
            .trim_end_matches('/')
            .into();
        Self {
            authority,
            url,
            weight,
            // Optimistic: a new executor takes traffic at once; a refused connect ejects it.
            healthy: AtomicBool::new(true),
            present: AtomicBool::new(true),
            failures: AtomicU32::new(0),
            in_flight: AtomicUsize::new(0),
            conns: crate::wire::conns::Shelf::default(),
        }
    }

    pub fn is_available(&self) -> bool {
        self.healthy.load(Ordering::Relaxed) && self.present.load(Ordering::Relaxed)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts a call in flight until the guard drops.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// A failed connection: out at once. Returns true when this ejected it.
    pub fn eject(&self) -> bool {
        self.failures.fetch_add(1, Ordering::Relaxed);
        self.healthy.swap(false, Ordering::Relaxed)
    }

    /// A failed probe: out after `threshold` in a row. Returns true when this ejected it.
    pub fn probe_failed(&self, threshold: u32) -> bool {
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        failures >= threshold && self.healthy.swap(false, Ordering::Relaxed)
    }

    /// A passed probe. Returns true when this readmitted it.
    pub fn probe_passed(&self) -> bool {
        self.failures.store(0, Ordering::Relaxed);
        !self.healthy.swap(true, Ordering::Relaxed)
    }
}

pub struct InFlight(Arc<Upstream>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One configured executor entry: a fixed address or a hostname to resolve.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub weight: f64,
}

impl Target {
    /// `http://host:port`, `host:port` or `host`, each optionally `=WEIGHT`.
    pub fn parse(entry: &str) -> Option<Self> {
        let entry = entry.trim();
        let (address, weight) = match entry.rsplit_once('=') {
            Some((address, weight)) => (address, weight.trim().parse().ok()?),
            None => (entry, 1.0),
        };
        let address = address
            .strip_prefix("http://")
            .unwrap_or(address)
            .trim_end_matches('/');
        if address.is_empty() || address.contains('/') {
            return None;
        }
        let (host, port) = match address.rsplit_once(':') {
            Some((host, port)) if !host.ends_with(':') => (host, port.parse().ok()?),
            _ => (address, 80),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        (weight > 0.0).then(|| Self {
            host: host.to_string(),
            port,
            weight,
        })
    }

    /// The executors' URLs behind this entry.
    pub async fn resolve(&self) -> std::io::Result<Vec<String>> {
        if let Ok(ip) = self.host.parse::<IpAddr>() {
            return Ok(vec![url_of(SocketAddr::new(ip, self.port))]);
        }
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await?
            .collect();
        // All A records; AAAA only when there is no A (localhost has both: one executor).
        let v4: Vec<_> = addrs.iter().filter(|a| a.is_ipv4()).copied().collect();
        let mut urls: Vec<String> = if v4.is_empty() { addrs } else { v4 }
            .into_iter()
            .map(url_of)
            .collect();
        urls.sort();
        urls.dedup();
        Ok(urls)
    }
}

fn url_of(addr: SocketAddr) -> String {
    format!("http://{addr}")
}

/// The current executors. Readers clone the `Arc` of the list; discovery swaps it.
#[derive(Default)]
pub struct Pool {
    list: RwLock<Arc<Vec<Arc<Upstream>>>>,
}

impl Pool {
    pub fn all(&self) -> Arc<Vec<Arc<Upstream>>> {
        match self.list.read() {
            Ok(list) => list.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn available(&self) -> Vec<Arc<Upstream>> {
        self.all()
            .iter()
            .filter(|u| u.is_available())
            .cloned()
            .collect()
    }

    /// Replaces the set, keeping the state of executors that stay. Returns (added, removed).
    pub fn replace(&self, wanted: Vec<(String, f64)>) -> (Vec<String>, Vec<String>) {
        let current = self.all();
        let mut by_url: HashMap<&str, &Arc<Upstream>> =
            current.iter().map(|u| (u.url.as_str(), u)).collect();
        let mut next = Vec::with_capacity(wanted.len());
        let mut added = Vec::new();
        for (url, weight) in wanted {
            match by_url.remove(url.as_str()) {
                Some(kept) if kept.weight == weight => next.push(kept.clone()),
                _ => {
                    added.push(url.clone());
                    next.push(Arc::new(Upstream::new(url, weight)));
                }
            }
        }
        let removed: Vec<String> = by_url
            .values()
            .map(|u| {
                u.present.store(false, Ordering::Relaxed);
                u.url.clone()
            })
            .collect();
        if !added.is_empty() || !removed.is_empty() {
            let mut list = match self.list.write() {
                Ok(list) => list,
                Err(poisoned) => poisoned.into_inner(),
            };
            *list = Arc::new(next);
        }
        (added, removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_targets() {
        let t = Target::parse("http://10.0.0.1:8080/").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.weight), ("10.0.0.1", 8080, 1.0));
        let t = Target::parse("tasks.executor:80=2").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.weight),
            ("tasks.executor", 80, 2.0)
        );
        let t = Target::parse("executor").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("executor", 80));
        assert!(Target::parse("").is_none());
        assert!(Target::parse("a:b").is_none());
        assert!(Target::parse("a:80=0").is_none());
    }

    #[test]
    fn replace_keeps_state() {
        let pool = Pool::default();
        pool.replace(vec![("http://a".into(), 1.0), ("http://b".into(), 1.0)]);
        let a = pool.all()[0].clone();
        assert!(a.eject());
        let (added, removed) = pool.replace(vec![("http://a".into(), 1.0)]);
        assert!(added.is_empty());
        assert_eq!(removed, vec!["http://b".to_string()]);
        assert!(!pool.all()[0].is_available());
        assert!(pool.all()[0].probe_passed());
        assert_eq!(pool.available().len(), 1);
    }

    #[test]
    fn probes_eject_after_threshold() {
        let u = Upstream::new("http://a".into(), 1.0);
        assert!(!u.probe_failed(2));
        assert!(u.probe_failed(2));
        assert!(!u.probe_failed(2));
        assert!(u.probe_passed());
        assert!(!u.probe_passed());
    }
}
