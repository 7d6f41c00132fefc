//! The pipeline's counters and histograms (`prometheus-client` metrics in the pipeline's own
//! registry), exported on the worker's `/metrics`.

use std::collections::BTreeMap;
use std::time::Duration;

use klingq_queue::metrics::Format;
use klingq_queue::{Completion, JobFailure};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Upper bounds of the step duration histogram, in seconds.
const BUCKETS: [f64; 12] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
];

/// Upper bounds of the finish lag histogram, in seconds.
const LAG_BUCKETS: [f64; 12] = [
    0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0,
];

/// How a handler attempt ended: the values of `klingq_job_attempts_total{outcome}`.
const OUTCOMES: [&str; 7] = [
    "succeeded",
    "failed",
    "retried",
    "deferred",
    "parked",
    "cancelled",
    "lease_lost",
];

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StepLabels {
    step: String,
}

fn step_histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

/// Counters of one worker process.
#[derive(Debug)]
pub struct PipelineMetrics {
    attempts: Family<OutcomeLabels, Counter>,
    retries: Family<StepLabels, Counter>,
    steps: Family<StepLabels, Histogram, fn() -> Histogram>,
    finish_lag: Histogram,
    adopted: Counter,
    unknown_outcomes: Counter,
    credit_pauses: Counter,
    bytes_rehosted: Counter,
    registry: Registry,
}

impl Default for PipelineMetrics {
    fn default() -> Self {
        let attempts = Family::<OutcomeLabels, Counter>::default();
        let retries = Family::<StepLabels, Counter>::default();
        let steps = Family::new_with_constructor(step_histogram as fn() -> Histogram);
        let finish_lag = Histogram::new(LAG_BUCKETS);
        let adopted = Counter::default();
        let unknown_outcomes = Counter::default();
        let credit_pauses = Counter::default();
        let bytes_rehosted = Counter::default();
        let mut registry = Registry::default();
        registry.register(
            "klingq_job_attempts",
            "Handler attempts by how they ended",
            attempts.clone(),
        );
        registry.register(
            "klingq_step_retries",
            "Step retries scheduled, by step",
            retries.clone(),
        );
        registry.register(
            "klingq_step_duration_seconds",
            "Time spent in each pipeline step per attempt",
            steps.clone(),
        );
        registry.register(
            "klingq_provider_finish_lag_seconds",
            "Time from a run's completion at the provider to the job learning of it (a callback or a poll)",
            finish_lag.clone(),
        );
        registry.register(
            "klingq_provider_runs_adopted",
            "Runs found by client_ref and adopted instead of created again",
            adopted.clone(),
        );
        registry.register(
            "klingq_provider_unknown_outcomes",
            "Creates whose outcome was unknown",
            unknown_outcomes.clone(),
        );
        registry.register(
            "klingq_provider_credit_pauses",
            "Times submissions paused for lack of credit",
            credit_pauses.clone(),
        );
        registry.register(
            "klingq_bytes_rehosted",
            "Video bytes stored in object storage",
            bytes_rehosted.clone(),
        );
        Self {
            attempts,
            retries,
            steps,
            finish_lag,
            adopted,
            unknown_outcomes,
            credit_pauses,
            bytes_rehosted,
            registry,
        }
    }
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
        self.attempts
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    pub(crate) fn retry(&self, step: &str) {
        self.retries
            .get_or_create(&StepLabels {
                step: step.to_owned(),
            })
            .inc();
    }

    pub(crate) fn step_duration(&self, step: &str, elapsed: Duration) {
        self.steps
            .get_or_create(&StepLabels {
                step: step.to_owned(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Time from a run's completion at the provider to the job learning of it.
    pub(crate) fn finish_lag(&self, lag: Duration) {
        self.finish_lag.observe(lag.as_secs_f64());
    }

    pub(crate) fn adopted(&self) {
        self.adopted.inc();
    }

    pub(crate) fn unknown_outcome(&self) {
        self.unknown_outcomes.inc();
    }

    pub(crate) fn credit_paused(&self) {
        self.credit_pauses.inc();
    }

    pub(crate) fn rehosted(&self, bytes: u64) {
        self.bytes_rehosted.inc_by(bytes);
    }

    /// Attempts by how they ended, for tests and the dashboard.
    pub fn attempts_by_outcome(&self) -> BTreeMap<&'static str, u64> {
        OUTCOMES
            .into_iter()
            .filter_map(|outcome| {
                let counter = self.attempts.get(&OutcomeLabels { outcome })?;
                Some((outcome, counter.get()))
            })
            .collect()
    }

    /// The registry holding these metrics, to encode with the process's others.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Appends this process's pipeline metrics in the Prometheus text format (0.0.4).
    pub fn render(&self, out: &mut String) {
        out.push_str(&Format::Text.encode(&[&self.registry]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_buckets_and_outcomes_as_before() {
        let metrics = PipelineMetrics::default();
        metrics.finished(&Ok(Completion::default()));
        metrics.finished(&Err(JobFailure::LeaseLost));
        metrics.retry("download");
        metrics.step_duration("generate", Duration::from_millis(700));
        metrics.finish_lag(Duration::from_millis(1500));
        metrics.rehosted(1000);
        metrics.rehosted(24);
        let mut text = String::new();
        metrics.render(&mut text);
        for line in [
            "# TYPE klingq_job_attempts_total counter",
            "klingq_job_attempts_total{outcome=\"succeeded\"} 1",
            "klingq_job_attempts_total{outcome=\"lease_lost\"} 1",
            "klingq_step_retries_total{step=\"download\"} 1",
            "# TYPE klingq_step_duration_seconds histogram",
            "klingq_step_duration_seconds_bucket{step=\"generate\",le=\"0.5\"} 0",
            "klingq_step_duration_seconds_bucket{step=\"generate\",le=\"1\"} 1",
            "klingq_step_duration_seconds_bucket{step=\"generate\",le=\"900\"} 1",
            "klingq_step_duration_seconds_bucket{step=\"generate\",le=\"+Inf\"} 1",
            "klingq_step_duration_seconds_count{step=\"generate\"} 1",
            "klingq_provider_finish_lag_seconds_bucket{le=\"1\"} 0",
            "klingq_provider_finish_lag_seconds_bucket{le=\"2\"} 1",
            "klingq_provider_finish_lag_seconds_bucket{le=\"120\"} 1",
            "klingq_provider_finish_lag_seconds_sum 1.5",
            "klingq_provider_finish_lag_seconds_count 1",
            "# TYPE klingq_bytes_rehosted_total counter",
            "klingq_bytes_rehosted_total 1024",
            "klingq_provider_runs_adopted_total 0",
            "klingq_provider_unknown_outcomes_total 0",
            "klingq_provider_credit_pauses_total 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from:\n{text}"
            );
        }
        let buckets = |name: &str| {
            text.lines()
                .filter(|l| l.starts_with(&format!("{name}_bucket")))
                .count()
        };
        assert_eq!(buckets("klingq_step_duration_seconds"), BUCKETS.len() + 1);
        assert_eq!(
            buckets("klingq_provider_finish_lag_seconds"),
            LAG_BUCKETS.len() + 1
        );
        assert_eq!(
            metrics.attempts_by_outcome(),
            BTreeMap::from([("lease_lost", 1), ("succeeded", 1)])
        );
    }
}
