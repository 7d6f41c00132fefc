//! The pipeline's counters, rendered in the Prometheus text format on `/metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use klingq_queue::{Completion, JobFailure};

/// Upper bounds of the step duration histogram, in seconds.
const BUCKETS: [f64; 12] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
];

/// Upper bounds of the finish lag histogram, in seconds.
const LAG_BUCKETS: [f64; 12] = [
    0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0,
];

#[derive(Debug, Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, bounds: &[f64], seconds: f64) {
        for (bound, count) in bounds.iter().zip(self.counts.iter_mut()) {
            if seconds <= *bound {
                *count += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str, bounds: &[f64]) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (bound, count) in bounds.iter().zip(self.counts.iter()) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {count}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

/// Counters of one worker process.
#[derive(Debug, Default)]
pub struct PipelineMetrics {
    finished: Mutex<BTreeMap<&'static str, u64>>,
    retries: Mutex<BTreeMap<String, u64>>,
    steps: Mutex<BTreeMap<String, Histogram>>,
    finish_lag: Mutex<Histogram>,
    adopted: AtomicU64,
    unknown_outcomes: AtomicU64,
    credit_pauses: AtomicU64,
    bytes_rehosted: AtomicU64,
}

impl PipelineMetrics {
    pub(crate) fn finished(&self, result: &Result<Completion, JobFailure>) {
        let outcome = match result {
            Ok(_) => "succeeded",
            Err(JobFailure::Fail(_)) => "failed",
            Err(JobFailure::Retry { .. }) => "retried",
            Err(JobFailure::Defer { .. }) => "deferred",
            Err(JobFailure::Park { .. }) => "parked",
            Err(JobFailure::Cancelled) => "cancelled",
            Err(JobFailure::LeaseLost) => "lease_lost",
        };
        *self
            .finished
            .lock()
            .expect("metrics poisoned")
            .entry(outcome)
            .or_default() += 1;
    }

    pub(crate) fn retry(&self, step: &str) {
        *self
            .retries
            .lock()
            .expect("metrics poisoned")
            .entry(step.to_owned())
            .or_default() += 1;
    }

    pub(crate) fn step_duration(&self, step: &str, elapsed: Duration) {
        let mut steps = self.steps.lock().expect("metrics poisoned");
        let histogram = steps.entry(step.to_owned()).or_default();
        histogram.observe(&BUCKETS, elapsed.as_secs_f64());
    }

    /// Time from a run's completion at the provider to the job learning of it.
    pub(crate) fn finish_lag(&self, lag: Duration) {
        self.finish_lag
            .lock()
            .expect("metrics poisoned")
            .observe(&LAG_BUCKETS, lag.as_secs_f64());
    }

    pub(crate) fn adopted(&self) {
        self.adopted.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn unknown_outcome(&self) {
        self.unknown_outcomes.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn credit_paused(&self) {
        self.credit_pauses.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn rehosted(&self, bytes: u64) {
        self.bytes_rehosted.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Attempts by how they ended, for tests and the dashboard.
    pub fn attempts_by_outcome(&self) -> BTreeMap<&'static str, u64> {
        self.finished.lock().expect("metrics poisoned").clone()
    }

    /// Appends this process's pipeline metrics in the Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP klingq_job_attempts_total Handler attempts by how they ended."
        );
        let _ = writeln!(out, "# TYPE klingq_job_attempts_total counter");
        for (outcome, count) in self.finished.lock().expect("metrics poisoned").iter() {
            let _ = writeln!(
                out,
                "klingq_job_attempts_total{{outcome=\"{outcome}\"}} {count}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP klingq_step_retries_total Step retries scheduled, by step."
        );
        let _ = writeln!(out, "# TYPE klingq_step_retries_total counter");
        for (step, count) in self.retries.lock().expect("metrics poisoned").iter() {
            let _ = writeln!(out, "klingq_step_retries_total{{step=\"{step}\"}} {count}");
        }
        let _ = writeln!(
            out,
            "# HELP klingq_step_duration_seconds Time spent in each pipeline step per attempt."
        );
        let _ = writeln!(out, "# TYPE klingq_step_duration_seconds histogram");
        for (step, histogram) in self.steps.lock().expect("metrics poisoned").iter() {
            histogram.render(
                out,
                "klingq_step_duration_seconds",
                &format!("step=\"{step}\""),
                &BUCKETS,
            );
        }
        let _ = writeln!(
            out,
            "# HELP klingq_provider_finish_lag_seconds Time from a run's completion at the provider to the job learning of it (a callback or a poll)."
        );
        let _ = writeln!(out, "# TYPE klingq_provider_finish_lag_seconds histogram");
        self.finish_lag.lock().expect("metrics poisoned").render(
            out,
            "klingq_provider_finish_lag_seconds",
            "",
            &LAG_BUCKETS,
        );
        for (name, help, value) in [
            (
                "klingq_provider_runs_adopted_total",
                "Runs found by client_ref and adopted instead of created again.",
                &self.adopted,
            ),
            (
                "klingq_provider_unknown_outcomes_total",
                "Creates whose outcome was unknown.",
                &self.unknown_outcomes,
            ),
            (
                "klingq_provider_credit_pauses_total",
                "Times submissions paused for lack of credit.",
                &self.credit_pauses,
            ),
            (
                "klingq_bytes_rehosted_total",
                "Video bytes stored in object storage.",
                &self.bytes_rehosted,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            let _ = writeln!(out, "{name} {}", value.load(Ordering::Relaxed));
        }
    }
}
