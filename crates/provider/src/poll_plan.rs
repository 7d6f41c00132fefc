//! When to poll a parked run next: pure arithmetic over the learned generation times, no I/O.
//!
//! A job whose run is generating holds no worker: after each poll that finds the run still
//! going, the worker parks the job and asks [`next_poll`] how long to wait. The answer comes
//! from a [`GenTimeHistogram`] of how long finished runs of the same kind (model and clip
//! length) took, which another part of the worker keeps in Redis and hands over:
//!
//! - trusted histogram (at least [`PollPolicy::min_samples`] samples) with mass beyond the run's
//!   age: wait until the quantile `step` of the remaining distribution, so that each poll covers
//!   the same share of the runs still going. Long before the expected finish that is a long wait;
//!   around it, where many runs finish, the waits shrink to the floor.
//! - otherwise (cold start, or a run older than anything seen): wait a fixed fraction of the
//!   run's age, a geometric schedule.
//!
//! Jitter only shortens a wait (polling a little early costs one GET, late costs lag), and every
//! wait is clamped to `[floor, max_interval]`: the floor keeps one run's polls within the
//! provider's rate limits.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::duration_serde;

/// Learned generation times of one kind of run: counts of runs by how long they took from
/// creation to completion, in log-spaced buckets.
///
/// Bucket `i` covers `[BASE_MS·RATIO^i, BASE_MS·RATIO^(i+1))` milliseconds (bounds rounded to
/// whole milliseconds), i.e. each bucket is 5% wide. Bucket 0 also takes everything below one
/// second, and [`GenTimeHistogram::MAX_BUCKET`] (about 23 to 24 h) everything beyond.
/// Within a bucket, runs are taken as spread uniformly (quantiles interpolate linearly).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GenTimeHistogram {
    /// Non-zero counts, by increasing bucket.
    counts: Vec<(u32, u64)>,
    samples: u64,
}

impl GenTimeHistogram {
    /// The lower bound of bucket 1's predecessor: bucket 0 nominally starts here.
    pub const BASE_MS: u64 = 1_000;
    /// The ratio between the bounds of a bucket.
    pub const RATIO: f64 = 1.05;
    /// The last bucket: `[≈82,400 s, ≈86,500 s)`, which holds 24 h; longer runs are counted in
    /// it too.
    pub const MAX_BUCKET: u32 = 232;

    /// The bucket a run that took `ms` milliseconds is counted in.
    pub fn bucket_of(ms: u64) -> u32 {
        if ms < edge_ms(1) {
            return 0;
        }
        // A float estimate, then corrected against the integer edges so that
        // `bucket_bounds_ms(bucket_of(ms))` always contains `ms`.
        let estimate = ((ms as f64 / Self::BASE_MS as f64).ln() / Self::RATIO.ln()).floor();
        let mut bucket = estimate.clamp(0.0, f64::from(Self::MAX_BUCKET)) as u32;
        while bucket > 0 && edge_ms(bucket) > ms {
            bucket -= 1;
        }
        while bucket < Self::MAX_BUCKET && edge_ms(bucket + 1) <= ms {
            bucket += 1;
        }
        bucket
    }

    /// The milliseconds bucket `bucket` covers, `[low, high)`; bucket 0 starts at 0. Buckets
    /// beyond [`GenTimeHistogram::MAX_BUCKET`] are read as the last one.
    pub fn bucket_bounds_ms(bucket: u32) -> (u64, u64) {
        let bucket = bucket.min(Self::MAX_BUCKET);
        let low = if bucket == 0 { 0 } else { edge_ms(bucket) };
        (low, edge_ms(bucket + 1))
    }

    /// The Redis hash field of a bucket: its decimal number.
    pub fn encode_field(bucket: u32) -> String {
        bucket.to_string()
    }

    /// The bucket a Redis hash field names; `None` for anything [`encode_field`] does not
    /// produce (signs, spaces, leading zeros) or a bucket beyond the last.
    ///
    /// [`encode_field`]: GenTimeHistogram::encode_field
    pub fn parse_field(field: &str) -> Option<u32> {
        if field.is_empty() || !field.bytes().all(|byte| byte.is_ascii_digit()) {
            return None;
        }
        let bucket: u32 = field.parse().ok()?;
        (bucket <= Self::MAX_BUCKET && Self::encode_field(bucket) == field).then_some(bucket)
    }

    /// A histogram from `(bucket, count)` pairs: zero counts are ignored, repeated buckets add
    /// up, buckets beyond the last are counted in it.
    pub fn from_counts(counts: impl IntoIterator<Item = (u32, u64)>) -> Self {
        let mut merged = std::collections::BTreeMap::<u32, u64>::new();
        for (bucket, count) in counts {
            if count > 0 {
                let slot = merged.entry(bucket.min(Self::MAX_BUCKET)).or_default();
                *slot = slot.saturating_add(count);
            }
        }
        let samples = merged
            .values()
            .fold(0_u64, |sum, count| sum.saturating_add(*count));
        Self {
            counts: merged.into_iter().collect(),
            samples,
        }
    }

    /// A histogram of these run durations, in milliseconds.
    pub fn from_durations_ms(durations: impl IntoIterator<Item = u64>) -> Self {
        Self::from_counts(durations.into_iter().map(|ms| (Self::bucket_of(ms), 1)))
    }

    /// The non-zero counts, by increasing bucket.
    pub fn counts(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        self.counts.iter().copied()
    }

    /// How many runs were counted.
    pub fn samples(&self) -> u64 {
        self.samples
    }

    /// The duration below which a share `q` (0..=1, clamped) of the runs finished; `None` for
    /// an empty histogram or a NaN `q`.
    pub fn quantile_ms(&self, q: f64) -> Option<u64> {
        if self.samples == 0 || q.is_nan() {
            return None;
        }
        let mass = q.clamp(0.0, 1.0) * self.samples as f64;
        Some(self.inverse(mass).round() as u64)
    }

    /// The duration below which a share `q` (0..=1, clamped) of the runs still going after
    /// `elapsed_ms` finished: the quantile of the distribution conditioned on the run's age.
    /// `None` when no run took longer than `elapsed_ms` (no mass remains), for an empty
    /// histogram or a NaN `q`. Never less than `elapsed_ms`.
    pub fn conditional_quantile_ms(&self, elapsed_ms: u64, q: f64) -> Option<u64> {
        if q.is_nan() {
            return None;
        }
        let elapsed = elapsed_ms as f64;
        let remaining = self.mass_beyond(elapsed);
        if remaining <= 0.0 {
            return None;
        }
        let mass = (self.samples as f64 - remaining) + q.clamp(0.0, 1.0) * remaining;
        Some((self.inverse(mass).round() as u64).max(elapsed_ms))
    }

    /// How many runs took longer than `ms`, counting a bucket's runs as spread uniformly.
    fn mass_beyond(&self, ms: f64) -> f64 {
        self.counts
            .iter()
            .map(|&(bucket, count)| {
                let (low, high) = bounds_f64(bucket);
                if ms <= low {
                    count as f64
                } else if ms < high {
                    count as f64 * (high - ms) / (high - low)
                } else {
                    0.0
                }
            })
            .sum()
    }

    /// The duration below which `mass` runs finished (the inverse of the cumulative counts).
    fn inverse(&self, mass: f64) -> f64 {
        let mut below = 0.0;
        for &(bucket, count) in &self.counts {
            let count = count as f64;
            let (low, high) = bounds_f64(bucket);
            if mass <= below + count {
                let within = ((mass - below) / count).clamp(0.0, 1.0);
                return low + within * (high - low);
            }
            below += count;
        }
        self.counts
            .last()
            .map_or(0.0, |&(bucket, _)| bounds_f64(bucket).1)
    }
}

/// The lower edge of bucket `bucket` (bucket 0's nominal one), in whole milliseconds.
fn edge_ms(bucket: u32) -> u64 {
    let exponent = i32::try_from(bucket).unwrap_or(i32::MAX);
    (GenTimeHistogram::BASE_MS as f64 * GenTimeHistogram::RATIO.powi(exponent)).round() as u64
}

fn bounds_f64(bucket: u32) -> (f64, f64) {
    let (low, high) = GenTimeHistogram::bucket_bounds_ms(bucket);
    (low as f64, high as f64)
}

/// How a parked run's polls are timed. Durations are written as seconds or with a unit
/// (`"500ms"`, `"1m"`), like the rest of the provider's settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PollPolicy {
    /// The shortest wait between two polls of one run; keeps the polls within the provider's
    /// rate limits. At least [`PollPolicy::MIN_FLOOR`].
    #[serde(with = "duration_serde")]
    pub floor: Duration,
    /// The longest wait between two polls of one run.
    #[serde(with = "duration_serde")]
    pub max_interval: Duration,
    /// Each wait is shortened by a random share of up to this much (0 ≤ jitter < 1).
    pub jitter: f64,
    /// Fewer finished runs than this and the histogram is not trusted (the cold rule applies).
    pub min_samples: u64,
    /// The share of the remaining probability mass between two polls (0 < step < 1): smaller
    /// means denser polls and less lag.
    pub step: f64,
    /// Without a trusted histogram, wait this fraction of the run's age (0 < fraction ≤ 1).
    pub cold_fraction: f64,
}

impl Default for PollPolicy {
    fn default() -> Self {
        Self {
            floor: Duration::from_secs(1),
            max_interval: Duration::from_secs(60),
            jitter: 0.1,
            min_samples: 5,
            step: 0.1,
            cold_fraction: 0.1,
        }
    }
}

/// The names validation errors give the policy's fields: the policy's own, or the flat
/// `provider.poll_*` settings it is built from.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PolicyFieldNames {
    pub(crate) floor: &'static str,
    pub(crate) max_interval: &'static str,
    pub(crate) jitter: &'static str,
    pub(crate) step: &'static str,
    pub(crate) cold_fraction: &'static str,
}

impl PollPolicy {
    /// The smallest floor accepted: one run is never polled more often than 10 times a second.
    pub const MIN_FLOOR: Duration = Duration::from_millis(100);

    const NAMES: PolicyFieldNames = PolicyFieldNames {
        floor: "floor",
        max_interval: "max_interval",
        jitter: "jitter",
        step: "step",
        cold_fraction: "cold_fraction",
    };

    /// Checks the values the planner cannot work with, naming the field and the rule.
    pub fn validate(&self) -> Result<(), String> {
        self.validate_as(&Self::NAMES)
    }

    pub(crate) fn validate_as(&self, names: &PolicyFieldNames) -> Result<(), String> {
        if self.floor < Self::MIN_FLOOR {
            return Err(format!(
                "{} must be at least 100 ms (the shortest wait between two polls of one run)",
                names.floor
            ));
        }
        if self.max_interval < self.floor {
            return Err(format!(
                "{} must be at least {}",
                names.max_interval, names.floor
            ));
        }
        if !(0.0..1.0).contains(&self.jitter) {
            return Err(format!("{} must be within 0..1 (0 included)", names.jitter));
        }
        if !(self.step > 0.0 && self.step < 1.0) {
            return Err(format!(
                "{} must be between 0 and 1 (both excluded)",
                names.step
            ));
        }
        if !(self.cold_fraction > 0.0 && self.cold_fraction <= 1.0) {
            return Err(format!(
                "{} must be above 0 and at most 1",
                names.cold_fraction
            ));
        }
        Ok(())
    }
}

/// How long to wait before polling again a run that is `elapsed` old and still going, with a
/// random jitter from `rng`. See [`next_poll_with`].
pub fn next_poll(
    policy: &PollPolicy,
    hist: Option<&GenTimeHistogram>,
    elapsed: Duration,
    rng: &mut impl rand::Rng,
) -> Duration {
    next_poll_with(policy, hist, elapsed, rng.random::<f64>())
}

/// [`next_poll`] with the jitter drawn by the caller: `jitter_sample` in `[0, 1]` (clamped)
/// shortens the wait by `jitter × jitter_sample` of it; 0 keeps the planned wait.
///
/// - Trusted histogram (`samples ≥ min_samples`) with runs beyond `elapsed`: wait until the
///   quantile `step` of the runs still going after `elapsed`.
/// - Otherwise: wait `elapsed × cold_fraction`.
///
/// The result is clamped to `[floor, max_interval]` (the floor wins if they cross).
pub fn next_poll_with(
    policy: &PollPolicy,
    hist: Option<&GenTimeHistogram>,
    elapsed: Duration,
    jitter_sample: f64,
) -> Duration {
    let elapsed_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
    let learned = hist
        .filter(|hist| hist.samples() >= policy.min_samples)
        .and_then(|hist| hist.conditional_quantile_ms(elapsed_ms, policy.step));
    let planned_secs = match learned {
        Some(target_ms) => target_ms.saturating_sub(elapsed_ms) as f64 / 1000.0,
        None => elapsed.as_secs_f64() * policy.cold_fraction,
    };
    let jitter = if policy.jitter.is_finite() {
        policy.jitter.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let sample = if jitter_sample.is_finite() {
        jitter_sample.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let wait_secs = planned_secs * (1.0 - jitter * sample);
    // NaN (a policy that was never validated) ends at `max_interval`, then at least the floor.
    let wait_secs = wait_secs
        .min(policy.max_interval.as_secs_f64())
        .max(policy.floor.as_secs_f64());
    Duration::try_from_secs_f64(wait_secs).unwrap_or(policy.floor)
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    type H = GenTimeHistogram;

    const SECOND: Duration = Duration::from_secs(1);

    fn secs(seconds: f64) -> Duration {
        Duration::from_secs_f64(seconds)
    }

    /// The default policy without jitter: every wait is exact.
    fn exact() -> PollPolicy {
        PollPolicy {
            jitter: 0.0,
            ..PollPolicy::default()
        }
    }

    #[test]
    fn buckets_round_trip_and_are_monotonic() {
        let mut previous_high = 0;
        for bucket in 0..=H::MAX_BUCKET {
            let (low, high) = H::bucket_bounds_ms(bucket);
            assert!(low < high, "bucket {bucket}: [{low}, {high})");
            assert_eq!(
                low,
                previous_high,
                "bucket {bucket} starts where {} ends",
                bucket.saturating_sub(1)
            );
            previous_high = high;
            assert_eq!(H::bucket_of(low), bucket, "low edge of {bucket}");
            assert_eq!(H::bucket_of(high - 1), bucket, "last ms of {bucket}");
            if bucket < H::MAX_BUCKET {
                assert_eq!(H::bucket_of(high), bucket + 1, "high edge of {bucket}");
            }
            if bucket > 0 {
                // 5% wide, give or take the rounding to whole milliseconds.
                let width = high as f64 / low as f64;
                assert!(
                    (width - 1.05).abs() < 0.001,
                    "bucket {bucket} is {width}× wide"
                );
            }
            assert_eq!(H::parse_field(&H::encode_field(bucket)), Some(bucket));
        }
        let mut last = 0;
        let increasing = (0..200_000)
            .step_by(7)
            .chain((200_000..100_000_000).step_by(99_991));
        for ms in increasing {
            let bucket = H::bucket_of(ms);
            let (low, high) = H::bucket_bounds_ms(bucket);
            assert!(
                low <= ms && (ms < high || bucket == H::MAX_BUCKET),
                "{ms} in {bucket}"
            );
            assert!(bucket >= last, "{ms} in {bucket}, after {last}");
            last = bucket;
        }
        assert_eq!(last, H::MAX_BUCKET);
        assert_eq!(H::bucket_bounds_ms(0), (0, 1_050));
        assert_eq!(H::bucket_of(0), 0);
        assert_eq!(H::bucket_of(999), 0);
        assert_eq!(H::bucket_of(1_000), 0);
        assert_eq!(H::bucket_of(1_050), 1);
        assert_eq!(H::bucket_of(40_000), 75);
        assert_eq!(H::bucket_bounds_ms(75), (38_833, 40_774));
        let day = 24 * 3_600_000;
        assert_eq!(H::bucket_of(day), H::MAX_BUCKET);
        let (low, high) = H::bucket_bounds_ms(H::MAX_BUCKET);
        assert!(
            low <= day && day < high,
            "24 h in the last bucket [{low}, {high})"
        );
        assert_eq!(H::bucket_of(u64::MAX), H::MAX_BUCKET);
        assert_eq!(H::bucket_bounds_ms(H::MAX_BUCKET + 9), (low, high));
    }

    #[test]
    fn fields_parse_only_what_encode_writes() {
        assert_eq!(H::encode_field(75), "75");
        assert_eq!(H::parse_field("0"), Some(0));
        assert_eq!(H::parse_field("232"), Some(232));
        for bad in [
            "",
            "233",
            "-1",
            "+5",
            " 5",
            "5 ",
            "05",
            "5.0",
            "x",
            "99999999999",
        ] {
            assert_eq!(H::parse_field(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn counts_merge_and_skip_zeros() {
        let hist = H::from_counts([(10, 3), (4, 0), (10, 2), (2, 1), (900, 4)]);
        assert_eq!(hist.samples(), 10);
        assert_eq!(
            hist.counts().collect::<Vec<_>>(),
            vec![(2, 1), (10, 5), (H::MAX_BUCKET, 4)]
        );
        let empty = H::from_counts([(3, 0)]);
        assert_eq!(empty.samples(), 0);
        assert_eq!(empty.quantile_ms(0.5), None);
        assert_eq!(empty.conditional_quantile_ms(0, 0.5), None);
    }

    fn mid(low: u64, high: u64) -> u64 {
        ((low + high) as f64 / 2.0).round() as u64
    }

    #[test]
    fn quantiles_interpolate_within_buckets() {
        // Bucket 75 is [38_833, 40_774), bucket 80 is [49_561, 52_039).
        let hist = H::from_counts([(75, 4), (80, 4)]);
        let (low75, high75) = H::bucket_bounds_ms(75);
        let (low80, high80) = H::bucket_bounds_ms(80);
        assert_eq!(hist.quantile_ms(0.0), Some(low75));
        assert_eq!(hist.quantile_ms(0.25), Some(mid(low75, high75)));
        assert_eq!(hist.quantile_ms(0.5), Some(high75));
        assert_eq!(hist.quantile_ms(0.75), Some(mid(low80, high80)));
        assert_eq!(hist.quantile_ms(1.0), Some(high80));
        assert_eq!(hist.quantile_ms(7.0), Some(high80), "q is clamped");
        assert_eq!(hist.quantile_ms(f64::NAN), None);
        // Monotonic in q.
        let mut previous = 0;
        for step in 0..=100 {
            let value = hist.quantile_ms(f64::from(step) / 100.0).unwrap();
            assert!(value >= previous, "q {step}%");
            previous = value;
        }
    }

    #[test]
    fn conditional_quantiles_condition_on_the_age() {
        let hist = H::from_counts([(75, 4), (80, 4)]);
        let (low75, high75) = H::bucket_bounds_ms(75);
        let (low80, high80) = H::bucket_bounds_ms(80);
        // From 0 it is the plain quantile.
        assert_eq!(
            hist.conditional_quantile_ms(0, 0.25),
            hist.quantile_ms(0.25)
        );
        // Between the buckets: only the second one remains.
        assert_eq!(
            hist.conditional_quantile_ms(45_000, 0.5),
            Some(mid(low80, high80))
        );
        assert_eq!(hist.conditional_quantile_ms(45_000, 0.0), Some(45_000));
        // Halfway into the first bucket: 2 runs there and 4 beyond remain (6). A quarter of
        // them (1.5 runs) finish three quarters into the rest of the first bucket; half of
        // them (3 runs) a quarter into the second bucket.
        let mid75 = mid(low75, high75);
        let within = |low: u64, high: u64, share: f64| {
            (low as f64 + share * (high - low) as f64).round() as u64
        };
        let quarter = hist.conditional_quantile_ms(mid75, 0.25).unwrap();
        assert!(
            quarter.abs_diff(within(low75, high75, 0.875)) <= 1,
            "{quarter}"
        );
        let half = hist.conditional_quantile_ms(mid75, 0.5).unwrap();
        assert!(half.abs_diff(within(low80, high80, 0.25)) <= 1, "{half}");
        // Beyond all mass: nothing to condition on.
        assert_eq!(hist.conditional_quantile_ms(high80, 0.1), None);
        assert_eq!(hist.conditional_quantile_ms(3_600_000, 0.1), None);
        assert_eq!(hist.conditional_quantile_ms(high80 - 1, 0.5), Some(high80));
    }

    #[test]
    fn policy_defaults_and_validation() {
        let policy = PollPolicy::default();
        assert_eq!(policy.floor, SECOND);
        assert_eq!(policy.max_interval, Duration::from_secs(60));
        assert_eq!(
            (policy.jitter, policy.step, policy.cold_fraction),
            (0.1, 0.1, 0.1)
        );
        assert_eq!(policy.min_samples, 5);
        assert_eq!(policy.validate(), Ok(()));
        let cases: [(PollPolicy, &str); 9] = [
            (
                PollPolicy {
                    floor: Duration::from_millis(99),
                    ..policy
                },
                "floor must be at least 100 ms",
            ),
            (
                PollPolicy {
                    max_interval: Duration::from_millis(999),
                    ..policy
                },
                "max_interval must be at least floor",
            ),
            (
                PollPolicy {
                    jitter: 1.0,
                    ..policy
                },
                "jitter must be within 0..1",
            ),
            (
                PollPolicy {
                    jitter: -0.1,
                    ..policy
                },
                "jitter must be within 0..1",
            ),
            (
                PollPolicy {
                    step: 0.0,
                    ..policy
                },
                "step must be between 0 and 1",
            ),
            (
                PollPolicy {
                    step: 1.0,
                    ..policy
                },
                "step must be between 0 and 1",
            ),
            (
                PollPolicy {
                    step: f64::NAN,
                    ..policy
                },
                "step must be between 0 and 1",
            ),
            (
                PollPolicy {
                    cold_fraction: 0.0,
                    ..policy
                },
                "cold_fraction must be above 0",
            ),
            (
                PollPolicy {
                    cold_fraction: 1.5,
                    ..policy
                },
                "cold_fraction must be above 0",
            ),
        ];
        for (bad, message) in cases {
            let error = bad.validate().unwrap_err();
            assert!(error.starts_with(message), "{error}");
        }
        assert_eq!(
            PollPolicy {
                floor: Duration::from_millis(100),
                jitter: 0.0,
                cold_fraction: 1.0,
                ..policy
            }
            .validate(),
            Ok(())
        );
    }

    #[test]
    fn policy_deserializes_with_defaults() {
        let policy: PollPolicy =
            serde_json::from_value(serde_json::json!({"floor": "250ms", "step": 0.2})).unwrap();
        assert_eq!(policy.floor, Duration::from_millis(250));
        assert_eq!(policy.step, 0.2);
        assert_eq!(policy.max_interval, Duration::from_secs(60));
        assert!(serde_json::from_value::<PollPolicy>(serde_json::json!({"flor": 1})).is_err());
    }

    #[test]
    fn a_run_finishing_at_40_s_is_seen_within_one_floor() {
        let hist = H::from_durations_ms([40_000; 20]);
        let policy = exact();
        let first = next_poll_with(&policy, Some(&hist), Duration::ZERO, 0.0);
        assert!(
            first >= secs(36.0) && first <= secs(40.0),
            "first poll at {first:?}"
        );
        // Full jitter only brings it earlier, by at most 10%.
        let jittered = next_poll_with(&PollPolicy::default(), Some(&hist), Duration::ZERO, 1.0);
        assert!(
            jittered < first && jittered >= first.mul_f64(0.9),
            "{jittered:?}"
        );

        let finish = secs(40.0);
        let mut at = first;
        let mut polls = 1;
        while at < finish {
            let wait = next_poll_with(&policy, Some(&hist), at, 0.0);
            assert!(wait >= policy.floor, "{wait:?}");
            assert!(
                wait <= policy.floor + Duration::from_millis(250),
                "dense near the finish: {wait:?} at {at:?}"
            );
            at += wait;
            polls += 1;
        }
        assert!(at - finish <= policy.floor, "seen {:?} late", at - finish);
        assert!(polls <= 3, "{polls} polls");
    }

    #[test]
    fn untrusted_or_exhausted_histograms_fall_back_to_the_cold_rule() {
        let policy = exact();
        let few = H::from_durations_ms([40_000; 4]);
        assert_eq!(
            next_poll_with(&policy, Some(&few), secs(20.0), 0.0),
            secs(2.0)
        );
        let many = H::from_durations_ms([40_000; 5]);
        assert!(next_poll_with(&policy, Some(&many), secs(20.0), 0.0) > secs(15.0));
        // Older than every run seen: no mass left, so the age rule applies.
        assert_eq!(many.conditional_quantile_ms(50_000, policy.step), None);
        assert_eq!(
            next_poll_with(&policy, Some(&many), secs(50.0), 0.0),
            secs(5.0)
        );
        assert_eq!(next_poll_with(&policy, None, secs(50.0), 0.0), secs(5.0));
    }

    #[test]
    fn cold_start_grows_geometrically_within_floor_and_max() {
        let policy = exact();
        let mut at = Duration::ZERO;
        let mut waits = Vec::new();
        while at < Duration::from_secs(1_200) {
            let wait = next_poll_with(&policy, None, at, 0.0);
            waits.push((at, wait));
            at += wait;
        }
        for &(at, wait) in &waits {
            assert!(
                wait >= policy.floor && wait <= policy.max_interval,
                "{wait:?} at {at:?}"
            );
            let expected = at
                .mul_f64(policy.cold_fraction)
                .clamp(policy.floor, policy.max_interval);
            assert!(
                wait.abs_diff(expected) < Duration::from_micros(10),
                "{wait:?} at {at:?}"
            );
        }
        // The floor while young, ×1.1 per poll from 10 s on, then the maximum.
        assert_eq!(waits[0].1, SECOND);
        assert_eq!(waits[9], (secs(9.0), SECOND));
        let growing: Vec<_> = waits
            .iter()
            .filter(|(at, _)| *at > secs(10.5) && *at < secs(590.0))
            .collect();
        assert!(growing.len() > 30, "{}", growing.len());
        for pair in growing.windows(2) {
            let ratio = pair[1].1.as_secs_f64() / pair[0].1.as_secs_f64();
            assert!((ratio - 1.1).abs() < 1e-6, "{ratio}");
        }
        assert_eq!(waits.last().unwrap().1, policy.max_interval);
        // Jitter only shortens.
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..1_000 {
            let wait = next_poll(&PollPolicy::default(), None, secs(100.0), &mut rng);
            assert!(wait >= secs(9.0) && wait <= secs(10.0), "{wait:?}");
        }
        // A policy that was never validated still answers within the floor.
        let odd = PollPolicy {
            cold_fraction: f64::NAN,
            max_interval: Duration::ZERO,
            ..policy
        };
        assert_eq!(next_poll_with(&odd, None, secs(5.0), 0.0), policy.floor);
    }

    /// A log-normal duration in milliseconds (Box-Muller).
    fn log_normal_ms(rng: &mut StdRng, median_ms: f64, sigma: f64) -> u64 {
        let u1: f64 = 1.0 - rng.random::<f64>();
        let u2: f64 = rng.random::<f64>();
        let normal = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
        (median_ms * (sigma * normal).exp()).round() as u64
    }

    struct Outcome {
        mean_polls: f64,
        p99_polls: usize,
        max_polls: usize,
        mean_lag: Duration,
        max_lag: Duration,
    }

    /// Polls runs of these durations from their creation on, like the parked worker does, and
    /// measures GETs per run and the lag between finish and the poll that sees it.
    fn simulate(
        policy: &PollPolicy,
        hist: Option<&H>,
        finishes: &[u64],
        rng: &mut StdRng,
    ) -> Outcome {
        let mut polls = Vec::with_capacity(finishes.len());
        let mut total_lag = Duration::ZERO;
        let mut max_lag = Duration::ZERO;
        for &finish_ms in finishes {
            let finish = Duration::from_millis(finish_ms);
            let mut at = Duration::ZERO;
            let mut count = 0;
            loop {
                at += next_poll(policy, hist, at, rng);
                count += 1;
                if at >= finish {
                    break;
                }
            }
            total_lag += at - finish;
            max_lag = max_lag.max(at - finish);
            polls.push(count);
        }
        polls.sort_unstable();
        Outcome {
            mean_polls: polls.iter().sum::<usize>() as f64 / polls.len() as f64,
            p99_polls: polls[polls.len() * 99 / 100],
            max_polls: *polls.last().unwrap(),
            mean_lag: total_lag / u32::try_from(finishes.len()).unwrap(),
            max_lag,
        }
    }

    #[test]
    fn learned_schedule_polls_little_and_sees_runs_early() {
        let median_ms = 180_000.0;
        let sigma = 0.4;
        let mut rng = StdRng::seed_from_u64(0x006b_6c69_6e67);
        let learned =
            H::from_durations_ms((0..2_000).map(|_| log_normal_ms(&mut rng, median_ms, sigma)));
        let finishes: Vec<u64> = (0..5_000)
            .map(|_| log_normal_ms(&mut rng, median_ms, sigma))
            .collect();
        let policy = PollPolicy::default();

        let warm = simulate(&policy, Some(&learned), &finishes, &mut rng);
        let cold = simulate(&policy, None, &finishes, &mut rng);
        println!(
            "learned: {:.2} polls/run (p99 {}, max {}), mean lag {:.2} s ({:.2}% of the median), max lag {:.2} s",
            warm.mean_polls,
            warm.p99_polls,
            warm.max_polls,
            warm.mean_lag.as_secs_f64(),
            warm.mean_lag.as_secs_f64() * 100_000.0 / median_ms,
            warm.max_lag.as_secs_f64(),
        );
        println!(
            "cold:    {:.2} polls/run (p99 {}, max {}), mean lag {:.2} s ({:.2}% of the median), max lag {:.2} s",
            cold.mean_polls,
            cold.p99_polls,
            cold.max_polls,
            cold.mean_lag.as_secs_f64(),
            cold.mean_lag.as_secs_f64() * 100_000.0 / median_ms,
            cold.max_lag.as_secs_f64(),
        );
        assert!(warm.mean_polls < 15.0, "{} polls per run", warm.mean_polls);
        assert!(
            warm.mean_lag.as_secs_f64() * 1000.0 < 0.08 * median_ms,
            "mean lag {:?}",
            warm.mean_lag
        );
        // The learned schedule beats the age rule on GETs without losing on lag by much.
        assert!(
            warm.mean_polls < cold.mean_polls / 2.0,
            "{} vs {}",
            warm.mean_polls,
            cold.mean_polls
        );
        assert!(warm.max_lag <= policy.max_interval, "{:?}", warm.max_lag);
    }
}
