//! A batch's estimated finish: from how long its runs have taken (measured on its own
//! finished runs), how many of its jobs hold a provider slot now (its tenant's current share
//! of the provider, as the fair share gives it) and how many jobs are left. An estimate, and
//! labelled one wherever it is shown.

use serde::{Deserialize, Serialize};

/// What the estimate is made from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EtaInputs {
    /// Jobs not yet finished.
    pub remaining: u64,
    /// The batch's jobs holding a provider slot now (submitting or generating).
    pub running: u64,
    /// The batch's runs that ended, and their summed time from create to end (ms).
    pub runs: u64,
    pub run_ms: u64,
    /// The estimated cost of the jobs left (micro-dollars).
    pub remaining_micros: u64,
    /// Now, ms since the epoch.
    pub now_ms: u64,
}

/// An estimated finish.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchEta {
    /// Always `true`: this is an estimate.
    pub estimate: bool,
    /// Seconds until the last job is expected to finish (`None` until a run of the batch
    /// ended, or while none of its jobs holds a slot).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remaining_secs: Option<f64>,
    /// When, ms since the epoch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finish_at_ms: Option<u64>,
    /// The estimated spend of the jobs left, in USD.
    pub remaining_usd: f64,
    /// What the time rests on: the mean run time (s) and the slots the batch holds now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mean_run_secs: Option<f64>,
    pub slots_now: u64,
}

impl BatchEta {
    /// The estimate: the running jobs end in half a mean run on average, and the jobs not yet
    /// started go through the slots the batch holds now, one mean run each.
    pub fn estimate(inputs: EtaInputs) -> BatchEta {
        let remaining_usd = inputs.remaining_micros as f64 / 1e6;
        let mean_ms = (inputs.runs > 0).then(|| inputs.run_ms as f64 / inputs.runs as f64);
        let time = match mean_ms {
            _ if inputs.remaining == 0 => Some(0.0),
            Some(mean) if inputs.running > 0 => {
                let running = inputs.running.min(inputs.remaining);
                let waiting = (inputs.remaining - running) as f64;
                Some(mean / 2.0 + waiting * mean / inputs.running as f64)
            }
            _ => None,
        };
        BatchEta {
            estimate: true,
            remaining_secs: time.map(|ms| (ms / 1000.0 * 10.0).round() / 10.0),
            finish_at_ms: time.map(|ms| inputs.now_ms + ms.round() as u64),
            remaining_usd: (remaining_usd * 100.0).round() / 100.0,
            mean_run_secs: mean_ms.map(|ms| (ms / 100.0).round() / 10.0),
            slots_now: inputs.running,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(remaining: u64, running: u64, runs: u64, run_ms: u64) -> EtaInputs {
        EtaInputs {
            remaining,
            running,
            runs,
            run_ms,
            remaining_micros: 1_400_000,
            now_ms: 1_000,
        }
    }

    #[test]
    fn jobs_left_go_through_the_slots_held_now_at_the_mean_run_time() {
        // 10 runs of 60 s each; 4 running and 8 waiting on 4 slots: 30 s + 2 rounds of 60 s.
        let eta = BatchEta::estimate(inputs(12, 4, 10, 600_000));
        assert_eq!(eta.remaining_secs, Some(150.0));
        assert_eq!(eta.finish_at_ms, Some(151_000));
        assert_eq!(eta.mean_run_secs, Some(60.0));
        assert_eq!(eta.remaining_usd, 1.4);
        assert!(eta.estimate);
    }

    #[test]
    fn no_time_without_a_measured_run_or_a_slot_and_zero_when_done() {
        assert_eq!(BatchEta::estimate(inputs(5, 2, 0, 0)).remaining_secs, None);
        assert_eq!(
            BatchEta::estimate(inputs(5, 0, 3, 9_000)).remaining_secs,
            None
        );
        assert_eq!(
            BatchEta::estimate(inputs(0, 0, 3, 9_000)).remaining_secs,
            Some(0.0)
        );
    }
}
