//! The client's configuration: one serde struct with defaults for every field but the API key.
//!
//! Durations are written in config files as seconds (`30`, `0.005`) or as a string with a unit
//! (`"150ms"`, `"2s"`, `"10m"`, `"1h"`).

use std::fmt;
use std::time::Duration;

use klingq_core::Secret;
use serde::{Deserialize, Serialize};

use crate::poll_plan::{PolicyFieldNames, PollPolicy};

/// The model this client is built for; other Runflow video models with the same schema work too.
pub const DEFAULT_MODEL: &str = "kuaishou/kling-video/v3/pro/image-to-video";
/// Runflow's public API.
pub const DEFAULT_BASE_URL: &str = "https://api.runflow.io";

/// How runs are created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The documented runs API: create returns a run id at once, then the client polls it.
    #[default]
    Async,
    /// The marketing page's `POST /v1/run/{model}`: the connection is held until the video exists.
    Sync,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Async => "async",
            Mode::Sync => "sync",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything the Runflow client needs. Only `api_key` has no useful default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProviderConfig {
    /// API root without a trailing path; the simulator's address in tests.
    pub base_url: String,
    /// Sent as `Authorization: Bearer`; never logged, never in an error message.
    pub api_key: Secret,
    /// Model id as it appears in the URL path (it may have more than two segments).
    pub model: String,
    pub mode: Mode,
    /// Optional `callback_url` sent on async creates. Callbacks only wake a job; polling stays
    /// the source of truth.
    pub callback_url: Option<String>,
    pub timeouts: Timeouts,
    pub retry: RetryConfig,
    /// The client's own wait loop (sync mode, video URL refreshes); parked runs are timed by
    /// the `poll_*` fields below instead.
    pub poll: PollConfig,
    /// The shortest wait between two polls of one parked run, in milliseconds (at least 100);
    /// keeps one run's polls within the provider's rate limits.
    pub poll_floor_ms: u64,
    /// The longest wait between two polls of one parked run, in seconds.
    pub poll_max_interval_secs: u64,
    /// Each wait between polls is shortened by a random share of up to this much (0..1).
    pub poll_jitter: f64,
    /// Finished runs of a kind needed before their learned generation times are trusted.
    pub poll_min_samples: u64,
    /// The share of the remaining runs (by learned generation time) between two polls, 0..1
    /// exclusive: smaller means more polls and less lag.
    pub poll_step: f64,
    /// Without trusted generation times, wait this fraction of the run's age (above 0, at
    /// most 1).
    pub poll_cold_fraction: f64,
    /// After a create whose outcome is unknown found no run by `client_ref`, how long to wait
    /// before listing again and, only then, creating again. `None` means twice the first poll
    /// interval.
    #[serde(with = "duration_serde::option")]
    pub reconcile_grace: Option<Duration>,
    /// How long one job may wait for its video, from the create (or sync call) on.
    #[serde(with = "duration_serde")]
    pub deadline: Duration,
}

impl Default for ProviderConfig {
    fn default() -> Self {
        Self {
            base_url: DEFAULT_BASE_URL.to_owned(),
            api_key: Secret::default(),
            model: DEFAULT_MODEL.to_owned(),
            mode: Mode::Async,
            callback_url: None,
            timeouts: Timeouts::default(),
            retry: RetryConfig::default(),
            poll: PollConfig::default(),
            poll_floor_ms: 1_000,
            poll_max_interval_secs: 60,
            poll_jitter: 0.1,
            poll_min_samples: 5,
            poll_step: 0.1,
            poll_cold_fraction: 0.1,
            reconcile_grace: None,
            deadline: Duration::from_secs(30 * 60),
        }
    }
}

/// The settings [`ProviderConfig::poll_policy`] is built from, as validation errors name them.
const POLL_POLICY_FIELDS: PolicyFieldNames = PolicyFieldNames {
    floor: "provider.poll_floor_ms",
    max_interval: "provider.poll_max_interval_secs",
    jitter: "provider.poll_jitter",
    step: "provider.poll_step",
    cold_fraction: "provider.poll_cold_fraction",
};

impl ProviderConfig {
    /// The defaults with this API key.
    pub fn new(api_key: impl Into<Secret>) -> Self {
        Self {
            api_key: api_key.into(),
            ..Self::default()
        }
    }

    /// Settings for tests against a fast simulator: millisecond polls, grace and backoff.
    /// Parked runs are polled at the smallest floor validation accepts (100 ms) and at least
    /// once a second.
    pub fn for_tests(base_url: impl Into<String>, api_key: impl Into<Secret>) -> Self {
        Self {
            base_url: base_url.into(),
            api_key: api_key.into(),
            retry: RetryConfig {
                delay_scale: 0.0,
                ..RetryConfig::default()
            },
            poll: PollConfig {
                initial_interval: Duration::from_millis(5),
                fast_phase: Duration::ZERO,
                max_interval: Duration::from_millis(20),
                ..PollConfig::default()
            },
            poll_floor_ms: 100,
            poll_max_interval_secs: 1,
            reconcile_grace: Some(Duration::from_millis(20)),
            deadline: Duration::from_secs(30),
            ..Self::default()
        }
    }

    /// How parked runs are polled, from the flat `poll_*` fields.
    pub fn poll_policy(&self) -> PollPolicy {
        PollPolicy {
            floor: Duration::from_millis(self.poll_floor_ms),
            max_interval: Duration::from_secs(self.poll_max_interval_secs),
            jitter: self.poll_jitter,
            min_samples: self.poll_min_samples,
            step: self.poll_step,
            cold_fraction: self.poll_cold_fraction,
        }
    }

    /// The grace before a resubmit, with its default filled in.
    pub fn effective_reconcile_grace(&self) -> Duration {
        self.reconcile_grace
            .unwrap_or(self.poll.initial_interval * 2)
    }

    /// Checks the values the client cannot work with, naming the field.
    pub fn validate(&self) -> Result<(), String> {
        let base = self.base_url.to_ascii_lowercase();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err("base_url must be an http(s) URL".to_owned());
        }
        if self.api_key.is_empty() {
            return Err("api_key is empty".to_owned());
        }
        if self.model.trim_matches('/').is_empty() {
            return Err("model is empty".to_owned());
        }
        if self.retry.max_attempts == 0 {
            return Err("retry.max_attempts must be at least 1".to_owned());
        }
        if !(self.retry.delay_scale.is_finite() && self.retry.delay_scale >= 0.0) {
            return Err("retry.delay_scale must be a finite non-negative number".to_owned());
        }
        if !(self.poll.multiplier.is_finite() && self.poll.multiplier >= 1.0) {
            return Err("poll.multiplier must be at least 1".to_owned());
        }
        if !(0.0..1.0).contains(&self.poll.jitter) {
            return Err("poll.jitter must be within 0..1".to_owned());
        }
        if self.poll.max_interval < self.poll.initial_interval {
            return Err("poll.max_interval must be at least poll.initial_interval".to_owned());
        }
        self.poll_policy().validate_as(&POLL_POLICY_FIELDS)?;
        Ok(())
    }
}

/// Per-request timeouts. A timeout after a create was sent makes its outcome unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Timeouts {
    /// TCP and TLS connect; a connect failure is safe to retry.
    #[serde(with = "duration_serde")]
    pub connect: Duration,
    /// Whole `POST .../runs` request (the SDK's default is 30 s).
    #[serde(with = "duration_serde")]
    pub create: Duration,
    /// Whole `GET /v1/runs/{id}` or `GET /v1/runs` request.
    #[serde(with = "duration_serde")]
    pub poll: Duration,
    /// Whole sync `POST /v1/run/...` request, which holds the connection for the generation.
    #[serde(with = "duration_serde")]
    pub sync: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(10),
            create: Duration::from_secs(30),
            poll: Duration::from_secs(15),
            sync: Duration::from_secs(20 * 60),
        }
    }
}

/// In-client retries of transient failures: exponential backoff with full jitter.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// Requests per operation, the first included (Runflow documents 5).
    pub max_attempts: u32,
    /// Time budget of one operation's retries; a wait that would pass it is not taken.
    #[serde(with = "duration_serde")]
    pub max_total: Duration,
    /// Ceiling of the first backoff; each retry doubles it up to `max_delay`.
    #[serde(with = "duration_serde")]
    pub base_delay: Duration,
    #[serde(with = "duration_serde")]
    pub max_delay: Duration,
    /// Multiplies every retry wait, `Retry-After` included: 0 makes retries immediate (tests).
    pub delay_scale: f64,
    /// How many consecutive 404s a poll of a run we hold tolerates (the run may not be visible
    /// right after its create).
    pub not_found_retries: u32,
    /// How many extra reads a succeeded run without a video URL gets before it is an error.
    pub output_rereads: u32,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            max_total: Duration::from_secs(120),
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(32),
            delay_scale: 1.0,
            not_found_retries: 3,
            output_rereads: 2,
        }
    }
}

/// The cadence of `GET /v1/runs/{id}` while waiting: fast at first, then slower.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PollConfig {
    /// Interval while the run is young.
    #[serde(with = "duration_serde")]
    pub initial_interval: Duration,
    /// How long the initial interval is kept before it starts growing.
    #[serde(with = "duration_serde")]
    pub fast_phase: Duration,
    /// Growth of the interval per poll after the fast phase.
    pub multiplier: f64,
    #[serde(with = "duration_serde")]
    pub max_interval: Duration,
    /// Relative jitter on each interval: 0.2 means ±20%.
    pub jitter: f64,
}

impl Default for PollConfig {
    fn default() -> Self {
        Self {
            initial_interval: Duration::from_secs(2),
            fast_phase: Duration::from_secs(30),
            multiplier: 1.5,
            max_interval: Duration::from_secs(15),
            jitter: 0.2,
        }
    }
}

/// Serde for durations: seconds as a number, or a string with a `ms`, `s`, `m` or `h` unit.
pub(crate) mod duration_serde {
    use std::time::Duration;

    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(
        value: &Duration,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.serialize_f64(value.as_secs_f64())
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Duration, D::Error> {
        let value = serde_json::Value::deserialize(deserializer)?;
        parse(&value).map_err(D::Error::custom)
    }

    pub(crate) fn parse(value: &serde_json::Value) -> Result<Duration, String> {
        let seconds = match value {
            serde_json::Value::Number(number) => number.as_f64(),
            serde_json::Value::String(text) => {
                let text = text.trim();
                let (number, unit) = match text.find(|c: char| c.is_ascii_alphabetic()) {
                    Some(index) => text.split_at(index),
                    None => (text, "s"),
                };
                let factor = match unit.trim() {
                    "ms" => 0.001,
                    "s" => 1.0,
                    "m" => 60.0,
                    "h" => 3600.0,
                    other => {
                        return Err(format!(
                            "unknown duration unit {other:?}: use ms, s, m or h"
                        ));
                    }
                };
                number.trim().parse::<f64>().ok().map(|n| n * factor)
            }
            _ => None,
        };
        match seconds {
            Some(seconds) if seconds.is_finite() && seconds >= 0.0 => {
                Ok(Duration::from_secs_f64(seconds))
            }
            _ => Err(format!(
                "invalid duration {value}: use seconds or a string such as \"150ms\""
            )),
        }
    }

    pub(crate) mod option {
        use std::time::Duration;

        use serde::de::Error as _;
        use serde::{Deserialize, Deserializer, Serializer};

        pub(crate) fn serialize<S: Serializer>(
            value: &Option<Duration>,
            serializer: S,
        ) -> Result<S::Ok, S::Error> {
            match value {
                Some(duration) => serializer.serialize_f64(duration.as_secs_f64()),
                None => serializer.serialize_none(),
            }
        }

        pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
            deserializer: D,
        ) -> Result<Option<Duration>, D::Error> {
            let value = serde_json::Value::deserialize(deserializer)?;
            if value.is_null() {
                return Ok(None);
            }
            super::parse(&value).map(Some).map_err(D::Error::custom)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn defaults_match_the_contract() {
        let config = ProviderConfig::default();
        assert_eq!(config.base_url, "https://api.runflow.io");
        assert_eq!(config.model, "kuaishou/kling-video/v3/pro/image-to-video");
        assert_eq!(config.mode, Mode::Async);
        assert_eq!(config.timeouts.connect, Duration::from_secs(10));
        assert_eq!(config.timeouts.create, Duration::from_secs(30));
        assert_eq!(config.timeouts.poll, Duration::from_secs(15));
        assert_eq!(config.timeouts.sync, Duration::from_secs(1200));
        assert_eq!(config.retry.max_attempts, 5);
        assert_eq!(config.retry.max_total, Duration::from_secs(120));
        assert_eq!(config.deadline, Duration::from_secs(1800));
        assert_eq!(config.effective_reconcile_grace(), Duration::from_secs(4));
        assert!(config.validate().is_err(), "no api key");
        assert!(ProviderConfig::new("k").validate().is_ok());
    }

    #[test]
    fn deserializes_partial_config_with_duration_forms() {
        let config: ProviderConfig = serde_json::from_value(json!({
            "base_url": "http://127.0.0.1:9",
            "api_key": "rf_live_x",
            "mode": "sync",
            "timeouts": {"create": "150ms", "sync": "20m"},
            "poll": {"initial_interval": 0.005},
            "reconcile_grace": "1s",
        }))
        .unwrap();
        assert_eq!(config.mode, Mode::Sync);
        assert_eq!(config.timeouts.create, Duration::from_millis(150));
        assert_eq!(config.timeouts.connect, Duration::from_secs(10));
        assert_eq!(config.timeouts.sync, Duration::from_secs(1200));
        assert_eq!(config.poll.initial_interval, Duration::from_millis(5));
        assert_eq!(config.reconcile_grace, Some(Duration::from_secs(1)));
        assert_eq!(config.api_key.expose(), "rf_live_x");
        let dumped = serde_json::to_string(&config).unwrap();
        assert!(!dumped.contains("rf_live_x"), "{dumped}");
        assert!(
            serde_json::from_value::<ProviderConfig>(json!({"timeouts": {"poll": "5 fortnights"}}))
                .is_err()
        );
        assert!(serde_json::from_value::<ProviderConfig>(json!({"bogus": 1})).is_err());
    }

    #[test]
    fn poll_policy_fields_default_deserialize_and_validate() {
        let config = ProviderConfig::new("k");
        assert_eq!(config.poll_policy(), PollPolicy::default());
        let config: ProviderConfig = serde_json::from_value(json!({
            "api_key": "k",
            "poll_floor_ms": 250,
            "poll_max_interval_secs": 30,
            "poll_jitter": 0.0,
            "poll_min_samples": 20,
            "poll_step": 0.05,
            "poll_cold_fraction": 0.2,
        }))
        .unwrap();
        let policy = config.poll_policy();
        assert_eq!(policy.floor, Duration::from_millis(250));
        assert_eq!(policy.max_interval, Duration::from_secs(30));
        assert_eq!(policy.jitter, 0.0);
        assert_eq!(policy.min_samples, 20);
        assert_eq!(policy.step, 0.05);
        assert_eq!(policy.cold_fraction, 0.2);
        assert_eq!(
            config.poll,
            PollConfig::default(),
            "the poll table is apart"
        );
        assert!(config.validate().is_ok());
        // The table form is not a thing: the fields are flat.
        assert!(
            serde_json::from_value::<ProviderConfig>(json!({"poll": {"floor_ms": 5}})).is_err()
        );

        let cases = [
            (
                json!({"poll_floor_ms": 99}),
                "provider.poll_floor_ms must be at least 100 ms",
            ),
            (
                json!({"poll_floor_ms": 2_000, "poll_max_interval_secs": 1}),
                "provider.poll_max_interval_secs must be at least provider.poll_floor_ms",
            ),
            (
                json!({"poll_jitter": 1.0}),
                "provider.poll_jitter must be within 0..1",
            ),
            (
                json!({"poll_step": 0.0}),
                "provider.poll_step must be between 0 and 1",
            ),
            (
                json!({"poll_step": 1.0}),
                "provider.poll_step must be between 0 and 1",
            ),
            (
                json!({"poll_cold_fraction": 0.0}),
                "provider.poll_cold_fraction must be above 0",
            ),
            (
                json!({"poll_cold_fraction": 1.01}),
                "provider.poll_cold_fraction must be above 0",
            ),
        ];
        for (mut fields, message) in cases {
            fields["api_key"] = json!("k");
            let config: ProviderConfig = serde_json::from_value(fields.clone()).unwrap();
            let error = config.validate().unwrap_err();
            assert!(error.starts_with(message), "{fields}: {error}");
        }
        assert!(serde_json::from_value::<ProviderConfig>(json!({"poll_floor_ms": -1})).is_err());
    }

    #[test]
    fn test_settings_validate_and_poll_fast() {
        let config = ProviderConfig::for_tests("http://127.0.0.1:9", "k");
        assert_eq!(config.validate(), Ok(()));
        let policy = config.poll_policy();
        assert_eq!(policy.floor, PollPolicy::MIN_FLOOR);
        assert_eq!(policy.max_interval, Duration::from_secs(1));
    }
}
