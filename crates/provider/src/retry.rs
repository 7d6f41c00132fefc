//! Waiting between attempts: `Retry-After`, exponential backoff with full jitter driven by
//! `backon`, and the cadence of polls while a run is generating.

use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime};

use backon::Retryable;
use rand::Rng;
use tokio::time::Instant;

use crate::classify::clamp_retry_after;
use crate::config::{PollConfig, RetryConfig};
use crate::error::{Operation, ProviderError};

/// Parses a `Retry-After` value, delta-seconds or HTTP-date (RFC 9110), relative to `now`, and
/// clamps it to [1 s, 10 min]. A date in the past gives the minimum; garbage gives `None`.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if value.is_empty() {
        return None;
    }
    let delay = if value.bytes().all(|byte| byte.is_ascii_digit()) {
        Duration::from_secs(value.parse::<u64>().unwrap_or(u64::MAX))
    } else {
        let at = httpdate::parse_http_date(value).ok()?;
        at.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(clamp_retry_after(delay))
}

/// Exponential backoff with full jitter: the n-th wait is uniform in
/// `[0, min(max_delay, base_delay × 2ⁿ)]`, and there are `max_attempts - 1` of them.
#[derive(Debug, Clone)]
pub(crate) struct FullJitter {
    base: Duration,
    max: Duration,
    retries_left: u32,
    exponent: u32,
}

impl FullJitter {
    pub(crate) fn new(config: &RetryConfig) -> Self {
        Self {
            base: config.base_delay,
            max: config.max_delay.max(config.base_delay),
            retries_left: config.max_attempts.saturating_sub(1),
            exponent: 0,
        }
    }

    /// The upper bound of the n-th wait (0-based).
    pub(crate) fn ceiling(base: Duration, max: Duration, n: u32) -> Duration {
        base.saturating_mul(1u32 << n.min(30)).min(max.max(base))
    }
}

impl Iterator for FullJitter {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        if self.retries_left == 0 {
            return None;
        }
        self.retries_left -= 1;
        let ceiling = Self::ceiling(self.base, self.max, self.exponent);
        self.exponent = self.exponent.saturating_add(1);
        Some(ceiling.mul_f64(rand::rng().random_range(0.0..=1.0)))
    }
}

/// Multiplies a wait by the configured scale without panicking.
pub(crate) fn scaled(delay: Duration, scale: f64) -> Duration {
    Duration::try_from_secs_f64(delay.as_secs_f64() * scale).unwrap_or(Duration::MAX)
}

/// The wait before the next attempt: the provider's `Retry-After` if it sent one, else the
/// backoff's; `None` when the attempts or the time budget are spent.
fn next_wait(
    config: &RetryConfig,
    error: &ProviderError,
    backoff: Option<Duration>,
    started: Instant,
) -> Option<Duration> {
    let backoff = backoff?;
    let wait = scaled(error.retry_after().unwrap_or(backoff), config.delay_scale);
    (started.elapsed().saturating_add(wait) <= config.max_total).then_some(wait)
}

/// Runs `call` until it succeeds, fails with a non-transient error, or the attempts or the time
/// budget run out. The error returned carries the number of attempts made.
pub(crate) async fn with_retries<T, F, Fut>(
    config: &RetryConfig,
    operation: Operation,
    mut call: F,
) -> Result<T, ProviderError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ProviderError>>,
{
    let attempts = AtomicU32::new(0);
    let started = Instant::now();
    let result = (|| {
        attempts.fetch_add(1, Ordering::Relaxed);
        call()
    })
    .retry(FullJitter::new(config))
    .sleep(tokio::time::sleep)
    .when(ProviderError::is_transient)
    .adjust(|error, backoff| next_wait(config, error, backoff, started))
    .notify(|error, wait| {
        tracing::debug!(
            operation = operation.as_str(),
            wait_ms = wait.as_millis() as u64,
            error = %error,
            "retrying provider call"
        );
    })
    .await;
    result.map_err(|error| error.with_attempts(attempts.load(Ordering::Relaxed)))
}

/// The interval between polls of one run: `initial_interval` during `fast_phase`, then growing
/// by `multiplier` per poll up to `max_interval`, each with ±`jitter`.
#[derive(Debug, Clone)]
pub(crate) struct PollCadence {
    config: PollConfig,
    started: Instant,
    current: Duration,
}

impl PollCadence {
    pub(crate) fn new(config: &PollConfig) -> Self {
        Self {
            config: *config,
            started: Instant::now(),
            current: config.initial_interval,
        }
    }

    pub(crate) fn next_interval(&mut self) -> Duration {
        if self.started.elapsed() >= self.config.fast_phase {
            self.current =
                scaled(self.current, self.config.multiplier).min(self.config.max_interval);
        }
        let jitter = self.config.jitter;
        let factor = if jitter > 0.0 {
            rand::rng().random_range(1.0 - jitter..=1.0 + jitter)
        } else {
            1.0
        };
        scaled(self.current, factor).max(Duration::from_millis(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorDetail;
    use std::sync::Mutex;

    fn transient(retry_after: Option<Duration>) -> ProviderError {
        ProviderError::Transient {
            operation: Operation::GetRun,
            detail: ErrorDetail {
                status: Some(503),
                retry_after,
                ..ErrorDetail::default()
            },
            source: None,
        }
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("5", now), Some(Duration::from_secs(5)));
        assert_eq!(
            parse_retry_after(" 120 ", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("0", now),
            Some(Duration::from_secs(1)),
            "clamped up"
        );
        assert_eq!(
            parse_retry_after("86400", now),
            Some(Duration::from_secs(600)),
            "clamped down"
        );
        assert_eq!(
            parse_retry_after("99999999999999999999999", now),
            Some(Duration::from_secs(600))
        );
        let in_30s = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            parse_retry_after(&in_30s, now),
            Some(Duration::from_secs(30))
        );
        let past = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(parse_retry_after(&past, now), Some(Duration::from_secs(1)));
        let far = httpdate::fmt_http_date(now + Duration::from_secs(7200));
        assert_eq!(parse_retry_after(&far, now), Some(Duration::from_secs(600)));
        for garbage in ["", "soon", "-5", "1.5", "Wed, 99 Foo 2026"] {
            assert_eq!(parse_retry_after(garbage, now), None, "{garbage}");
        }
    }

    #[test]
    fn full_jitter_stays_under_its_ceilings() {
        let config = RetryConfig {
            max_attempts: 8,
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(10),
            ..RetryConfig::default()
        };
        for _ in 0..200 {
            let waits: Vec<_> = FullJitter::new(&config).collect();
            assert_eq!(waits.len(), 7);
            for (n, wait) in waits.iter().enumerate() {
                let ceiling = FullJitter::ceiling(config.base_delay, config.max_delay, n as u32);
                assert!(*wait <= ceiling, "wait {n} = {wait:?} > {ceiling:?}");
            }
        }
        let ceilings: Vec<_> = (0..6)
            .map(|n| FullJitter::ceiling(Duration::from_secs(1), Duration::from_secs(10), n))
            .collect();
        let secs: Vec<_> = ceilings.iter().map(Duration::as_secs).collect();
        assert_eq!(secs, [1, 2, 4, 8, 10, 10]);
        assert_eq!(
            FullJitter::new(&RetryConfig {
                max_attempts: 1,
                ..config
            })
            .count(),
            0
        );
    }

    #[tokio::test(start_paused = true)]
    async fn retries_back_off_within_bounds_on_paused_time() {
        let config = RetryConfig {
            max_attempts: 5,
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(4),
            max_total: Duration::from_secs(600),
            ..RetryConfig::default()
        };
        let calls = Mutex::new(Vec::new());
        let error = with_retries(&config, Operation::GetRun, || {
            calls.lock().unwrap().push(Instant::now());
            async { Err::<(), _>(transient(None)) }
        })
        .await
        .unwrap_err();
        let calls = calls.into_inner().unwrap();
        assert_eq!(calls.len(), 5);
        assert_eq!(error.attempts(), 5);
        assert!(error.is_transient());
        for (n, pair) in calls.windows(2).enumerate() {
            let gap = pair[1] - pair[0];
            let ceiling = FullJitter::ceiling(config.base_delay, config.max_delay, n as u32);
            assert!(
                gap <= ceiling + Duration::from_millis(1),
                "gap {n} = {gap:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_overrides_backoff_and_total_budget_stops_early() {
        let config = RetryConfig {
            max_attempts: 5,
            max_total: Duration::from_secs(7),
            ..RetryConfig::default()
        };
        let calls = Mutex::new(Vec::new());
        let error = with_retries(&config, Operation::GetRun, || {
            calls.lock().unwrap().push(Instant::now());
            async { Err::<(), _>(transient(Some(Duration::from_secs(3)))) }
        })
        .await
        .unwrap_err();
        let calls = calls.into_inner().unwrap();
        // Waits of 3 s each: a third would pass the 7 s budget.
        assert_eq!(calls.len(), 3);
        assert_eq!(error.attempts(), 3);
        assert_eq!(error.retry_after(), Some(Duration::from_secs(3)));
        for pair in calls.windows(2) {
            assert_eq!(pair[1] - pair[0], Duration::from_secs(3));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn zero_scale_makes_retries_immediate_and_permanent_errors_stop_at_once() {
        let config = RetryConfig {
            delay_scale: 0.0,
            ..RetryConfig::default()
        };
        let started = Instant::now();
        let n_calls = AtomicU32::new(0);
        let result = with_retries(&config, Operation::GetRun, || {
            let n = n_calls.fetch_add(1, Ordering::Relaxed);
            async move {
                if n < 3 {
                    Err(transient(Some(Duration::from_secs(600))))
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(result.unwrap(), 3);
        assert_eq!(started.elapsed(), Duration::ZERO);

        let n_calls = AtomicU32::new(0);
        let error = with_retries(&config, Operation::Create, || {
            n_calls.fetch_add(1, Ordering::Relaxed);
            async {
                Err::<(), _>(ProviderError::Rejected {
                    operation: Operation::Create,
                    detail: ErrorDetail {
                        status: Some(422),
                        ..ErrorDetail::default()
                    },
                })
            }
        })
        .await
        .unwrap_err();
        assert_eq!(n_calls.load(Ordering::Relaxed), 1);
        assert_eq!(error.attempts(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn poll_cadence_starts_fast_then_grows_to_its_cap() {
        let config = PollConfig {
            initial_interval: Duration::from_secs(2),
            fast_phase: Duration::from_secs(30),
            multiplier: 1.5,
            max_interval: Duration::from_secs(15),
            jitter: 0.2,
        };
        let mut cadence = PollCadence::new(&config);
        let mut waits = Vec::new();
        while Instant::now() - cadence.started < Duration::from_secs(600) {
            let wait = cadence.next_interval();
            waits.push((cadence.started.elapsed(), wait));
            tokio::time::sleep(wait).await;
        }
        for (elapsed, wait) in &waits {
            assert!(
                *wait >= Duration::from_secs_f64(2.0 * 0.8) - Duration::from_millis(1),
                "{wait:?}"
            );
            assert!(
                *wait <= Duration::from_secs_f64(15.0 * 1.2) + Duration::from_millis(1),
                "{wait:?}"
            );
            if *elapsed < Duration::from_secs(30) {
                assert!(
                    *wait <= Duration::from_secs_f64(2.4) + Duration::from_millis(1),
                    "{elapsed:?} {wait:?}"
                );
            }
        }
        let late = waits.last().unwrap().1;
        assert!(late >= Duration::from_secs(12), "{late:?}");
        // Sixty-some polls in ten minutes instead of three hundred at a fixed 2 s.
        assert!(waits.len() < 70, "{}", waits.len());
    }
}
