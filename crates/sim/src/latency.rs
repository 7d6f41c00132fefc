//! Latency model: uniform queueing, then a log-normal running time scaled by duration and audio.

use std::time::Duration;

use rand::Rng;

use crate::config::SimConfig;

/// The shortest simulated queueing time.
const MIN_QUEUED_SECS: f64 = 0.001;

/// The simulated phases of one run, in simulated seconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct PhasePlan {
    pub(crate) queued_secs: f64,
    pub(crate) dispatching_secs: f64,
    pub(crate) running_secs: f64,
}

impl PhasePlan {
    /// Total simulated seconds from creation to completion.
    pub(crate) fn total_secs(&self) -> f64 {
        self.queued_secs + self.dispatching_secs + self.running_secs
    }
}

/// The median running time for a clip: `median × (duration/5)^0.7 × (1.3 with audio)`.
pub(crate) fn running_median_secs(
    config: &SimConfig,
    duration_secs: u32,
    generate_audio: bool,
) -> f64 {
    let duration_factor = (f64::from(duration_secs) / 5.0).powf(0.7);
    let audio_factor = if generate_audio { 1.3 } else { 1.0 };
    config.median_latency_secs * duration_factor * audio_factor
}

/// A standard normal sample (Box-Muller), so no distribution crate is needed.
fn standard_normal(rng: &mut impl Rng) -> f64 {
    let u1: f64 = rng.random_range(f64::EPSILON..1.0);
    let u2: f64 = rng.random_range(0.0..1.0);
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Draws the phases of a new run.
pub(crate) fn plan(
    config: &SimConfig,
    duration_secs: u32,
    generate_audio: bool,
    rng: &mut impl Rng,
) -> PhasePlan {
    // A run is always `queued` at the instant of its creation, so the create response says so.
    let queued_secs = if config.queue_max_secs > MIN_QUEUED_SECS {
        rng.random_range(MIN_QUEUED_SECS..=config.queue_max_secs)
    } else {
        MIN_QUEUED_SECS
    };
    let median = running_median_secs(config, duration_secs, generate_audio);
    let running_secs = if config.tail_probability > 0.0 && rng.random_bool(config.tail_probability)
    {
        rng.random_range(config.tail_min_secs..=config.tail_max_secs)
    } else {
        median * (config.latency_sigma * standard_normal(rng)).exp()
    };
    PhasePlan {
        queued_secs,
        dispatching_secs: config.dispatch_secs,
        running_secs,
    }
}

/// Converts simulated seconds into real time.
pub(crate) fn real(simulated_secs: f64, time_scale: f64) -> Duration {
    let seconds = simulated_secs * time_scale;
    if seconds.is_finite() && seconds > 0.0 {
        Duration::from_secs_f64(seconds)
    } else {
        Duration::ZERO
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_scales_with_duration_and_audio() {
        let config = SimConfig {
            median_latency_secs: 100.0,
            ..SimConfig::default()
        };
        assert!((running_median_secs(&config, 5, false) - 100.0).abs() < 1e-9);
        assert!((running_median_secs(&config, 5, true) - 130.0).abs() < 1e-9);
        let ten = running_median_secs(&config, 10, false);
        assert!((ten - 100.0 * 2f64.powf(0.7)).abs() < 1e-9);
    }

    #[test]
    fn zero_sigma_and_no_tail_is_deterministic() {
        let config = SimConfig {
            median_latency_secs: 90.0,
            latency_sigma: 0.0,
            tail_probability: 0.0,
            queue_max_secs: 0.0,
            ..SimConfig::default()
        };
        let plan = plan(&config, 5, false, &mut rand::rng());
        assert_eq!(plan.queued_secs, MIN_QUEUED_SECS);
        assert!((plan.running_secs - 90.0).abs() < 1e-9);
    }

    #[test]
    fn log_normal_sample_median_is_near_the_configured_median() {
        let config = SimConfig {
            tail_probability: 0.0,
            ..SimConfig::default()
        };
        let mut rng = rand::rng();
        let mut samples: Vec<f64> = (0..2001)
            .map(|_| plan(&config, 5, false, &mut rng).running_secs)
            .collect();
        samples.sort_by(f64::total_cmp);
        let median = samples[1000];
        assert!((100.0..140.0).contains(&median), "sample median {median}");
    }

    #[test]
    fn time_scale_converts_to_real_durations() {
        assert_eq!(real(120.0, 0.001), Duration::from_millis(120));
        assert_eq!(real(-1.0, 1.0), Duration::ZERO);
    }
}
