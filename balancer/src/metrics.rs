//! The balancer's Prometheus counters: requests by executor and outcome, warm hits (calls sent
//! to the executor known to hold their runtime), ejections and readmissions, upstream latency.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use std::time::Duration;

const BOUNDS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0,
];

/// How a runtime call found its executor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// The location cache knew it.
    Cached,
    /// A lookup across executors found it.
    Found,
    /// Nobody holds it: its home (rendezvous, bounded load).
    Home,
}

#[derive(Default)]
pub struct Metrics {
    requests: DashMap<(String, &'static str), AtomicU64>,
    placements: [AtomicU64; 3],
    ejections: AtomicU64,
    readmissions: AtomicU64,
    retries: AtomicU64,
    latency_buckets: [AtomicU64; BOUNDS.len()],
    latency_count: AtomicU64,
    latency_sum_us: AtomicU64,
}

impl Metrics {
    pub fn request(&self, executor: &str, outcome: &'static str) {
        // The key is built only for the first call of a kind; then a shared-lock lookup.
        let key = (executor.to_string(), outcome);
        if let Some(counter) = self.requests.get(&key) {
            counter.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.requests
            .entry(key)
            .or_default()
            .fetch_add(1, Ordering::Relaxed);
    }

    pub fn placement(&self, placement: Placement) {
        self.placements[placement as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn ejection(&self) {
        self.ejections.fetch_add(1, Ordering::Relaxed);
    }

    pub fn readmission(&self) {
        self.readmissions.fetch_add(1, Ordering::Relaxed);
    }

    pub fn retry(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    pub fn latency(&self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        for (bound, bucket) in BOUNDS.iter().zip(&self.latency_buckets) {
            // One bucket per call; render sums them into Prometheus' cumulative ones.
            if secs <= *bound {
                bucket.fetch_add(1, Ordering::Relaxed);
                break;
            }
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn render(&self, healthy: usize, total: usize) -> String {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP hearth_balancer_requests_total Calls to executors by executor and outcome."
        );
        let _ = writeln!(out, "# TYPE hearth_balancer_requests_total counter");
        let mut rows: Vec<_> = self
            .requests
            .iter()
            .map(|entry| (entry.key().clone(), load(entry.value())))
            .collect();
        rows.sort();
        for ((executor, outcome), n) in rows {
            let _ = writeln!(
                out,
                "hearth_balancer_requests_total{{executor=\"{executor}\",outcome=\"{outcome}\"}} {n}"
            );
        }
        let _ = writeln!(out, "# HELP hearth_balancer_placements_total Runtime calls by how their executor was chosen.");
        let _ = writeln!(out, "# TYPE hearth_balancer_placements_total counter");
        for (name, i) in [("cached", 0), ("found", 1), ("home", 2)] {
            let _ = writeln!(
                out,
                "hearth_balancer_placements_total{{placement=\"{name}\"}} {}",
                load(&self.placements[i])
            );
        }
        let warm = load(&self.placements[0]) + load(&self.placements[1]);
        let all = warm + load(&self.placements[2]);
        let ratio = if all == 0 {
            0.0
        } else {
            warm as f64 / all as f64
        };
        let _ = writeln!(out, "# HELP hearth_balancer_warm_hit_ratio Share of runtime calls sent to an executor holding the runtime.");
        let _ = writeln!(out, "# TYPE hearth_balancer_warm_hit_ratio gauge");
        let _ = writeln!(out, "hearth_balancer_warm_hit_ratio {ratio}");
        let _ = writeln!(
            out,
            "# HELP hearth_balancer_ejections_total Executors taken out of rotation."
        );
        let _ = writeln!(out, "# TYPE hearth_balancer_ejections_total counter");
        let _ = writeln!(
            out,
            "hearth_balancer_ejections_total {}",
            load(&self.ejections)
        );
        let _ = writeln!(
            out,
            "# HELP hearth_balancer_readmissions_total Executors put back after passing probes."
        );
        let _ = writeln!(out, "# TYPE hearth_balancer_readmissions_total counter");
        let _ = writeln!(
            out,
            "hearth_balancer_readmissions_total {}",
            load(&self.readmissions)
        );
        let _ = writeln!(out, "# HELP hearth_balancer_retries_total Calls retried on another executor after a failed connect.");
        let _ = writeln!(out, "# TYPE hearth_balancer_retries_total counter");
        let _ = writeln!(out, "hearth_balancer_retries_total {}", load(&self.retries));
        let _ = writeln!(
            out,
            "# HELP hearth_balancer_executors Executors known and healthy."
        );
        let _ = writeln!(out, "# TYPE hearth_balancer_executors gauge");
        let _ = writeln!(
            out,
            "hearth_balancer_executors{{state=\"healthy\"}} {healthy}"
        );
        let _ = writeln!(out, "hearth_balancer_executors{{state=\"known\"}} {total}");
        let _ = writeln!(out, "# HELP hearth_balancer_upstream_seconds Time from sending a call to an executor to its response headers.");
        let _ = writeln!(out, "# TYPE hearth_balancer_upstream_seconds histogram");
        let mut cumulative = 0;
        for (bound, bucket) in BOUNDS.iter().zip(&self.latency_buckets) {
            cumulative += load(bucket);
            let _ = writeln!(
                out,
                "hearth_balancer_upstream_seconds_bucket{{le=\"{bound}\"}} {cumulative}"
            );
        }
        let count = load(&self.latency_count);
        let _ = writeln!(
            out,
            "hearth_balancer_upstream_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "hearth_balancer_upstream_seconds_sum {}",
            load(&self.latency_sum_us) as f64 / 1e6
        );
        let _ = writeln!(out, "hearth_balancer_upstream_seconds_count {count}");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders() {
        let m = Metrics::default();
        m.request("http://a", "2xx");
        m.placement(Placement::Cached);
        m.placement(Placement::Home);
        m.latency(Duration::from_millis(2));
        let text = m.render(1, 2);
        assert!(text
            .contains("hearth_balancer_requests_total{executor=\"http://a\",outcome=\"2xx\"} 1"));
        assert!(text.contains("hearth_balancer_warm_hit_ratio 0.5"));
        assert!(text.contains("hearth_balancer_upstream_seconds_bucket{le=\"0.0025\"} 1"));
        assert!(text.contains("hearth_balancer_upstream_seconds_count 1"));
    }
}
