//! Prometheus metrics, kept in atomics and rendered in the text exposition format at `/metrics`:
//! executions by outcome, cold starts with a duration histogram, runtimes warm, errors by type.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds (seconds) of the cold-start histogram buckets.
const COLD_START_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0,
];

#[derive(Default)]
pub struct Metrics {
    executions_ok: AtomicU64,
    executions_failed: AtomicU64,
    executions_timed_out: AtomicU64,
    cold_starts: AtomicU64,
    cold_start_buckets: [AtomicU64; 13],
    cold_start_sum_micros: AtomicU64,
    builds_ok: AtomicU64,
    builds_failed: AtomicU64,
    /// Error responses by wire type; few distinct types, so a locked vector is enough.
    errors: Mutex<Vec<(&'static str, u64)>>,
}

/// How an execution ended, from the executor's point of view.
#[derive(Debug, Clone, Copy)]
pub enum Outcome {
    /// The function answered (any status).
    Answered,
    /// The function ran out of time.
    TimedOut,
    /// The executor could not get an answer.
    Failed,
}

impl Metrics {
    pub fn execution(&self, outcome: Outcome) {
        let counter = match outcome {
            Outcome::Answered => &self.executions_ok,
            Outcome::TimedOut => &self.executions_timed_out,
            Outcome::Failed => &self.executions_failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn cold_start(&self, took: Duration) {
        self.cold_starts.fetch_add(1, Ordering::Relaxed);
        let secs = took.as_secs_f64();
        for (bound, bucket) in COLD_START_BUCKETS.iter().zip(&self.cold_start_buckets) {
            if secs <= *bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.cold_start_sum_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn build(&self, ok: bool) {
        let counter = if ok {
            &self.builds_ok
        } else {
            &self.builds_failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn error(&self, kind: &'static str) {
        let mut errors = match self.errors.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        match errors.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, n)) => *n += 1,
            None => errors.push((kind, 1)),
        }
    }

    /// The text exposition format; `warm` is the number of runtimes held right now.
    pub fn render(&self, warm: usize) -> String {
        let mut out = String::with_capacity(2048);
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let _ = writeln!(out, "# HELP hearth_executions_total Executions by outcome.");
        let _ = writeln!(out, "# TYPE hearth_executions_total counter");
        for (outcome, counter) in [
            ("answered", &self.executions_ok),
            ("timeout", &self.executions_timed_out),
            ("failed", &self.executions_failed),
        ] {
            let _ = writeln!(
                out,
                "hearth_executions_total{{outcome=\"{outcome}\"}} {}",
                load(counter)
            );
        }
        let _ = writeln!(
            out,
            "# HELP hearth_cold_starts_total Runtimes started for an execution or a create."
        );
        let _ = writeln!(out, "# TYPE hearth_cold_starts_total counter");
        let _ = writeln!(out, "hearth_cold_starts_total {}", load(&self.cold_starts));
        let _ = writeln!(out, "# HELP hearth_cold_start_seconds Time from the start of a cold start to a listening runtime.");
        let _ = writeln!(out, "# TYPE hearth_cold_start_seconds histogram");
        for (bound, bucket) in COLD_START_BUCKETS.iter().zip(&self.cold_start_buckets) {
            let _ = writeln!(
                out,
                "hearth_cold_start_seconds_bucket{{le=\"{bound}\"}} {}",
                load(bucket)
            );
        }
        let count = load(&self.cold_starts);
        let _ = writeln!(
            out,
            "hearth_cold_start_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "hearth_cold_start_seconds_sum {}",
            load(&self.cold_start_sum_micros) as f64 / 1e6
        );
        let _ = writeln!(out, "hearth_cold_start_seconds_count {count}");
        let _ = writeln!(
            out,
            "# HELP hearth_runtimes_warm Runtimes this executor holds."
        );
        let _ = writeln!(out, "# TYPE hearth_runtimes_warm gauge");
        let _ = writeln!(out, "hearth_runtimes_warm {warm}");
        let _ = writeln!(out, "# HELP hearth_builds_total Builds by result.");
        let _ = writeln!(out, "# TYPE hearth_builds_total counter");
        let _ = writeln!(
            out,
            "hearth_builds_total{{result=\"succeeded\"}} {}",
            load(&self.builds_ok)
        );
        let _ = writeln!(
            out,
            "hearth_builds_total{{result=\"failed\"}} {}",
            load(&self.builds_failed)
        );
        let _ = writeln!(out, "# HELP hearth_errors_total Error responses by type.");
        let _ = writeln!(out, "# TYPE hearth_errors_total counter");
        let errors = match self.errors.lock() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        for (kind, n) in errors {
            let _ = writeln!(out, "hearth_errors_total{{type=\"{kind}\"}} {n}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histogram() {
        let m = Metrics::default();
        m.execution(Outcome::Answered);
        m.cold_start(Duration::from_millis(150));
        m.error("runtime_not_found");
        m.error("runtime_not_found");
        let text = m.render(3);
        assert!(text.contains("hearth_executions_total{outcome=\"answered\"} 1"));
        assert!(text.contains("hearth_cold_start_seconds_bucket{le=\"0.1\"} 0"));
        assert!(text.contains("hearth_cold_start_seconds_bucket{le=\"0.2\"} 1"));
        assert!(text.contains("hearth_cold_start_seconds_count 1"));
        assert!(text.contains("hearth_runtimes_warm 3"));
        assert!(text.contains("hearth_errors_total{type=\"runtime_not_found\"} 2"));
    }
}
