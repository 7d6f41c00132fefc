//! Simulator configuration: one struct with serde defaults for embedding and clap flags for the CLI.

use serde::{Deserialize, Serialize};

use crate::error::SimError;

/// Default values shared by serde (`Default`) and clap (`default_value_t`).
mod defaults {
    pub(super) const MEDIAN_LATENCY_SECS: f64 = 120.0;
    pub(super) const LATENCY_SIGMA: f64 = 0.35;
    pub(super) const QUEUE_MAX_SECS: f64 = 30.0;
    pub(super) const DISPATCH_SECS: f64 = 2.0;
    pub(super) const TAIL_PROBABILITY: f64 = 0.01;
    pub(super) const TAIL_MIN_SECS: f64 = 600.0;
    pub(super) const TAIL_MAX_SECS: f64 = 1200.0;
    pub(super) const TIME_SCALE: f64 = 1.0;
    pub(super) const VIDEO_BYTES_PER_SECOND: u64 = 700_000;
    pub(super) const URL_TTL_SECS: u64 = 3600;
    pub(super) const RATE_USD_PER_SECOND: f64 = 0.14;
    pub(super) const BALANCE_USD: f64 = 1000.0;
    pub(super) const VALIDATION_ERROR_CODE: &str = "VALIDATION_ERROR";
    pub(super) const RETRY_AFTER_SECS: u64 = 2;
    pub(super) const SLOW_CREATE_SECS: f64 = 35.0;
    pub(super) const POLL_FAULT_COUNT: u32 = 2;
    pub(super) const DOWNLOAD_FAULT_COUNT: u32 = 1;
    pub(super) const SLOW_DOWNLOAD_BYTES_PER_SEC: u64 = 256 * 1024;
    pub(super) const CALLBACK_DELAY_MS: u64 = 0;
}

/// The longest accepted `callback_delay_ms` (an hour), so a typo cannot park callbacks forever.
const MAX_CALLBACK_DELAY_MS: u64 = 3_600_000;

/// The command-line flag of a config field, for error messages: `fail_429` → `--fail-429`.
fn flag(field: &str) -> String {
    format!("--{}", field.replace('_', "-"))
}

/// Which output shapes a succeeded run carries on the async API.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum OutputShape {
    /// Both `output.outputs[]` (normalized) and `output.video` (fal-style).
    Both,
    /// Only the normalized `output.outputs[]` list.
    Outputs,
    /// Only the fal-style `output.video` object.
    Video,
}

/// Which form of `Retry-After` a 429 carries when the fault does not pick one itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum RetryAfterMode {
    /// `Retry-After: <seconds>`.
    Seconds,
    /// `Retry-After: <HTTP-date>`.
    HttpDate,
    /// No `Retry-After` header, as the current Runflow docs describe.
    None,
    /// One of the three forms above, chosen at random per response.
    Mixed,
}

/// Everything that shapes the simulator's behaviour, changeable at runtime (`POST /__sim/config`).
///
/// Times named `*_secs` in the latency model are simulated seconds and are multiplied by
/// `time_scale`; `url_ttl_secs`, `slow_create_secs`, `retry_after_secs` and `callback_delay_ms`
/// are real time because they exercise real client timers. Fault rates are probabilities in
/// `0..=1`, rolled per request (the `callback_*` ones per callback, when it falls due).
#[derive(Clone, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct SimConfig {
    /// Base URL written into signed download URLs; by default the address actually bound.
    #[arg(long)]
    pub public_url: Option<String>,
    /// Exact API key accepted as `Bearer` token; when unset any non-empty token is accepted.
    #[arg(long)]
    pub api_key: Option<String>,
    /// Median simulated running time of a 5 s clip without audio.
    #[arg(long, default_value_t = defaults::MEDIAN_LATENCY_SECS)]
    pub median_latency_secs: f64,
    /// Log-normal sigma of the running time; 0 makes the latency deterministic.
    #[arg(long, default_value_t = defaults::LATENCY_SIGMA)]
    pub latency_sigma: f64,
    /// The `queued` phase lasts U(0, queue_max_secs) simulated seconds.
    #[arg(long, default_value_t = defaults::QUEUE_MAX_SECS)]
    pub queue_max_secs: f64,
    /// Length of the `dispatching` phase in simulated seconds.
    #[arg(long, default_value_t = defaults::DISPATCH_SECS)]
    pub dispatch_secs: f64,
    /// Probability that a run falls in the long tail instead of the log-normal body.
    #[arg(long, default_value_t = defaults::TAIL_PROBABILITY)]
    pub tail_probability: f64,
    /// Lower bound of a long-tail running time in simulated seconds.
    #[arg(long, default_value_t = defaults::TAIL_MIN_SECS)]
    pub tail_min_secs: f64,
    /// Upper bound of a long-tail running time in simulated seconds.
    #[arg(long, default_value_t = defaults::TAIL_MAX_SECS)]
    pub tail_max_secs: f64,
    /// Real seconds per simulated second; 0.001 turns minutes into milliseconds for tests.
    #[arg(long, default_value_t = defaults::TIME_SCALE)]
    pub time_scale: f64,
    /// Size of the generated MP4 per second of video (about 0.7 MB/s for Pro 1080p).
    #[arg(long, default_value_t = defaults::VIDEO_BYTES_PER_SECOND)]
    pub video_bytes_per_second: u64,
    /// Lifetime of signed download URLs in real seconds; 0 makes every URL expired at once.
    #[arg(long, default_value_t = defaults::URL_TTL_SECS)]
    pub url_ttl_secs: u64,
    /// Price charged per second of a succeeded video.
    #[arg(long, default_value_t = defaults::RATE_USD_PER_SECOND)]
    pub rate_usd_per_second: f64,
    /// Account concurrency cap: a create beyond this many unfinished runs gets 429.
    #[arg(long)]
    pub max_concurrent_runs: Option<u32>,
    /// Starting balance; a create whose estimated cost exceeds the live balance gets 402.
    #[arg(long, default_value_t = defaults::BALANCE_USD)]
    pub balance_usd: f64,
    /// Output shapes of a succeeded run on the async API.
    #[arg(long, value_enum, default_value_t = OutputShape::Both)]
    pub output_shape: OutputShape,
    /// The `code` of a 422 response (Runflow's exact string is undocumented).
    #[arg(long, default_value = defaults::VALIDATION_ERROR_CODE)]
    pub validation_error_code: String,
    /// Accept integer `duration` values as well as strings.
    #[arg(long)]
    pub lenient_duration: bool,
    /// Accept unknown fields in `input` instead of answering 422.
    #[arg(long)]
    pub allow_unknown_fields: bool,
    /// Form of `Retry-After` on 429s that do not choose one (config rate, concurrency cap).
    #[arg(long, value_enum, default_value_t = RetryAfterMode::Seconds)]
    pub retry_after: RetryAfterMode,
    /// Value of `Retry-After` in real seconds.
    #[arg(long, default_value_t = defaults::RETRY_AFTER_SECS)]
    pub retry_after_secs: u64,
    /// Real seconds a slow create holds its response after creating the run.
    #[arg(long, default_value_t = defaults::SLOW_CREATE_SECS)]
    pub slow_create_secs: f64,
    /// How many polls of a run a poll-fault token affects.
    #[arg(long, default_value_t = defaults::POLL_FAULT_COUNT)]
    pub poll_fault_count: u32,
    /// How many downloads of a run a download-fault token affects.
    #[arg(long, default_value_t = defaults::DOWNLOAD_FAULT_COUNT)]
    pub download_fault_count: u32,
    /// Throughput of a slow (trickling) download.
    #[arg(long, default_value_t = defaults::SLOW_DOWNLOAD_BYTES_PER_SEC)]
    pub slow_download_bytes_per_sec: u64,

    /// Rate of 429 RATE_LIMITED on create.
    #[arg(long, default_value_t = 0.0)]
    pub fail_429: f64,
    /// Rate of 402 INSUFFICIENT_CREDIT on create.
    #[arg(long, default_value_t = 0.0)]
    pub fail_402: f64,
    /// Rate of 409 CONFLICT on create.
    #[arg(long, default_value_t = 0.0)]
    pub fail_409: f64,
    /// Rate of 500/502/503/504 (JSON or HTML) on create, without creating a run.
    #[arg(long, default_value_t = 0.0)]
    pub fail_5xx: f64,
    /// Rate of lost responses on create: the run exists, the connection is dropped.
    #[arg(long, default_value_t = 0.0)]
    pub lost_response: f64,
    /// Rate of slow creates (the run exists, the response waits `slow_create_secs`).
    #[arg(long, default_value_t = 0.0)]
    pub slow_create: f64,
    /// Rate of runs failing early with CONTENT_POLICY_VIOLATION.
    #[arg(long, default_value_t = 0.0)]
    pub moderation: f64,
    /// Rate of runs failing with CONTENT_POLICY_VIOLATION after the full latency.
    #[arg(long, default_value_t = 0.0)]
    pub output_moderation: f64,
    /// Rate of runs failing with PROVIDER_TIMEOUT.
    #[arg(long, default_value_t = 0.0)]
    pub provider_timeout: f64,
    /// Rate of runs that stay `running` forever.
    #[arg(long, default_value_t = 0.0)]
    pub stuck: f64,
    /// Rate of runs that succeed with `output: {}` (billed, no URL).
    #[arg(long, default_value_t = 0.0)]
    pub no_url: f64,
    /// Rate of 5xx or connection resets on `GET /v1/runs/{id}`.
    #[arg(long, default_value_t = 0.0)]
    pub flaky_poll: f64,
    /// Rate of 404 RUN_NOT_FOUND on `GET /v1/runs/{id}` while the run is still queued or dispatching.
    #[arg(long, default_value_t = 0.0)]
    pub poll_not_found: f64,
    /// Rate of 403 "Request has expired" on downloads with a valid URL.
    #[arg(long, default_value_t = 0.0)]
    pub download_expired: f64,
    /// Rate of 5xx on downloads.
    #[arg(long, default_value_t = 0.0)]
    pub download_5xx: f64,
    /// Rate of connection resets in the middle of a download body.
    #[arg(long, default_value_t = 0.0)]
    pub download_reset: f64,
    /// Rate of short download bodies (Content-Length larger than the bytes sent).
    #[arg(long, default_value_t = 0.0)]
    pub download_short: f64,
    /// Rate of downloads served with a wrong Content-Type.
    #[arg(long, default_value_t = 0.0)]
    pub download_wrong_type: f64,
    /// Rate of downloads whose bytes are not an MP4.
    #[arg(long, default_value_t = 0.0)]
    pub download_not_mp4: f64,

    /// Secret (`whsec_…`) that signs per-run callbacks (`Runflow-Signature`: hex HMAC-SHA256 of
    /// the raw body keyed with this exact string). Without it callbacks carry no signature.
    #[arg(long, env = "KLINGQ_SIM_CALLBACK_SECRET", hide_env_values = true)]
    pub callback_secret: Option<String>,
    /// Probability that a run's callback is never sent.
    #[arg(long, default_value_t = 0.0)]
    pub callback_drop: f64,
    /// Probability that a run's callback is delivered twice (the second a moment after the first).
    #[arg(long, default_value_t = 0.0)]
    pub callback_duplicate: f64,
    /// Extra real milliseconds between a run becoming terminal and its first callback attempt.
    #[arg(long, default_value_t = defaults::CALLBACK_DELAY_MS)]
    pub callback_delay_ms: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            public_url: None,
            api_key: None,
            median_latency_secs: defaults::MEDIAN_LATENCY_SECS,
            latency_sigma: defaults::LATENCY_SIGMA,
            queue_max_secs: defaults::QUEUE_MAX_SECS,
            dispatch_secs: defaults::DISPATCH_SECS,
            tail_probability: defaults::TAIL_PROBABILITY,
            tail_min_secs: defaults::TAIL_MIN_SECS,
            tail_max_secs: defaults::TAIL_MAX_SECS,
            time_scale: defaults::TIME_SCALE,
            video_bytes_per_second: defaults::VIDEO_BYTES_PER_SECOND,
            url_ttl_secs: defaults::URL_TTL_SECS,
            rate_usd_per_second: defaults::RATE_USD_PER_SECOND,
            max_concurrent_runs: None,
            balance_usd: defaults::BALANCE_USD,
            output_shape: OutputShape::Both,
            validation_error_code: defaults::VALIDATION_ERROR_CODE.to_owned(),
            lenient_duration: false,
            allow_unknown_fields: false,
            retry_after: RetryAfterMode::Seconds,
            retry_after_secs: defaults::RETRY_AFTER_SECS,
            slow_create_secs: defaults::SLOW_CREATE_SECS,
            poll_fault_count: defaults::POLL_FAULT_COUNT,
            download_fault_count: defaults::DOWNLOAD_FAULT_COUNT,
            slow_download_bytes_per_sec: defaults::SLOW_DOWNLOAD_BYTES_PER_SEC,
            fail_429: 0.0,
            fail_402: 0.0,
            fail_409: 0.0,
            fail_5xx: 0.0,
            lost_response: 0.0,
            slow_create: 0.0,
            moderation: 0.0,
            output_moderation: 0.0,
            provider_timeout: 0.0,
            stuck: 0.0,
            no_url: 0.0,
            flaky_poll: 0.0,
            poll_not_found: 0.0,
            download_expired: 0.0,
            download_5xx: 0.0,
            download_reset: 0.0,
            download_short: 0.0,
            download_wrong_type: 0.0,
            download_not_mp4: 0.0,
            callback_secret: None,
            callback_drop: 0.0,
            callback_duplicate: 0.0,
            callback_delay_ms: defaults::CALLBACK_DELAY_MS,
        }
    }
}

impl SimConfig {
    /// A configuration for tests: millisecond latencies, tiny videos and no long tail.
    pub fn fast() -> Self {
        Self {
            time_scale: 0.001,
            tail_probability: 0.0,
            video_bytes_per_second: 2_000,
            slow_create_secs: 2.0,
            ..Self::default()
        }
    }

    /// Checks ranges; the simulator refuses a configuration that fails this.
    pub fn validate(&self) -> Result<(), SimError> {
        let rates = [
            ("fail_429", self.fail_429),
            ("fail_402", self.fail_402),
            ("fail_409", self.fail_409),
            ("fail_5xx", self.fail_5xx),
            ("lost_response", self.lost_response),
            ("slow_create", self.slow_create),
            ("moderation", self.moderation),
            ("output_moderation", self.output_moderation),
            ("provider_timeout", self.provider_timeout),
            ("stuck", self.stuck),
            ("no_url", self.no_url),
            ("flaky_poll", self.flaky_poll),
            ("poll_not_found", self.poll_not_found),
            ("download_expired", self.download_expired),
            ("download_5xx", self.download_5xx),
            ("download_reset", self.download_reset),
            ("download_short", self.download_short),
            ("download_wrong_type", self.download_wrong_type),
            ("download_not_mp4", self.download_not_mp4),
            ("tail_probability", self.tail_probability),
            ("callback_drop", self.callback_drop),
            ("callback_duplicate", self.callback_duplicate),
        ];
        for (name, rate) in rates {
            if !(0.0..=1.0).contains(&rate) {
                return Err(SimError::InvalidConfig(format!(
                    "{name} ({}) must be a probability within 0..=1, got {rate}",
                    flag(name)
                )));
            }
        }
        let non_negative = [
            ("median_latency_secs", self.median_latency_secs),
            ("latency_sigma", self.latency_sigma),
            ("queue_max_secs", self.queue_max_secs),
            ("dispatch_secs", self.dispatch_secs),
            ("tail_min_secs", self.tail_min_secs),
            ("tail_max_secs", self.tail_max_secs),
            ("time_scale", self.time_scale),
            ("rate_usd_per_second", self.rate_usd_per_second),
            ("slow_create_secs", self.slow_create_secs),
            ("balance_usd", self.balance_usd.abs()),
        ];
        for (name, value) in non_negative {
            if !value.is_finite() || value < 0.0 {
                return Err(SimError::InvalidConfig(format!(
                    "{name} ({}) must be a finite non-negative number, got {value}",
                    flag(name)
                )));
            }
        }
        if self.tail_max_secs < self.tail_min_secs {
            return Err(SimError::InvalidConfig(
                "tail_max_secs must be >= tail_min_secs".to_owned(),
            ));
        }
        if self.slow_download_bytes_per_sec == 0 {
            return Err(SimError::InvalidConfig(
                "slow_download_bytes_per_sec must be positive".to_owned(),
            ));
        }
        if self.callback_secret.as_deref().is_some_and(str::is_empty) {
            return Err(SimError::InvalidConfig(
                "callback_secret (--callback-secret) must not be empty; omit it to send unsigned callbacks"
                    .to_owned(),
            ));
        }
        if self.callback_delay_ms > MAX_CALLBACK_DELAY_MS {
            return Err(SimError::InvalidConfig(format!(
                "callback_delay_ms (--callback-delay-ms) must be at most {MAX_CALLBACK_DELAY_MS}, got {}",
                self.callback_delay_ms
            )));
        }
        if let Some(url) = &self.public_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(SimError::InvalidConfig(
                "public_url must be an http(s) URL".to_owned(),
            ));
        }
        Ok(())
    }

    /// Applies a partial JSON update (only the keys present change) and validates the result.
    pub fn merged(&self, patch: &serde_json::Value) -> Result<Self, SimError> {
        let serde_json::Value::Object(patch) = patch else {
            return Err(SimError::InvalidConfig(
                "config patch must be a JSON object".to_owned(),
            ));
        };
        let mut current = serde_json::to_value(self).map_err(|error| {
            SimError::InvalidConfig(format!("cannot serialize config: {error}"))
        })?;
        if let serde_json::Value::Object(fields) = &mut current {
            for (key, value) in patch {
                fields.insert(key.clone(), value.clone());
            }
        }
        let merged: Self = serde_json::from_value(current)
            .map_err(|error| SimError::InvalidConfig(error.to_string()))?;
        merged.validate()?;
        Ok(merged)
    }

    /// The config as JSON with the API key and the callback secret redacted, for
    /// `GET /__sim/config` and logs.
    pub(crate) fn redacted_json(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(self).unwrap_or(serde_json::Value::Null);
        for field in ["api_key", "callback_secret"] {
            if let Some(secret) = value.get_mut(field)
                && !secret.is_null()
            {
                *secret = serde_json::Value::String("<redacted>".to_owned());
            }
        }
        value
    }
}

impl std::fmt::Debug for SimConfig {
    /// Prints the config as JSON with the secrets redacted, so logging it never leaks them.
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "SimConfig {}", self.redacted_json())
    }
}

/// Command-line arguments of `klingq sim`: where to listen plus the whole [`SimConfig`].
#[derive(Clone, Debug, clap::Args)]
pub struct SimArgs {
    /// TCP port to listen on.
    #[arg(long, default_value_t = 8089)]
    pub port: u16,
    /// Interface to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Behaviour of the simulated provider.
    #[command(flatten)]
    pub config: SimConfig,
}

impl Default for SimArgs {
    fn default() -> Self {
        Self {
            port: 8089,
            host: "127.0.0.1".to_owned(),
            config: SimConfig::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: SimArgs,
    }

    #[test]
    fn clap_defaults_match_serde_defaults() {
        let cli = Cli::try_parse_from(["klingq-sim"]).unwrap();
        assert_eq!(cli.args.config, SimConfig::default());
        assert_eq!(cli.args.port, 8089);
        assert_eq!(cli.args.host, "127.0.0.1");
        let from_json: SimConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(from_json, SimConfig::default());
    }

    #[test]
    fn flags_set_fields() {
        let cli = Cli::try_parse_from([
            "klingq-sim",
            "--port",
            "0",
            "--fail-429",
            "0.1",
            "--fail-5xx",
            "0.05",
            "--lost-response",
            "0.02",
            "--moderation",
            "0.01",
            "--download-reset",
            "0.02",
            "--flaky-poll",
            "0.1",
            "--max-concurrent-runs",
            "3",
            "--api-key",
            "rf_live_x",
            "--time-scale",
            "0.001",
            "--output-shape",
            "video",
            "--retry-after",
            "http-date",
            "--lenient-duration",
            "--balance-usd",
            "5",
        ])
        .unwrap();
        let config = cli.args.config;
        assert_eq!(cli.args.port, 0);
        assert_eq!(config.fail_429, 0.1);
        assert_eq!(config.fail_5xx, 0.05);
        assert_eq!(config.lost_response, 0.02);
        assert_eq!(config.download_reset, 0.02);
        assert_eq!(config.flaky_poll, 0.1);
        assert_eq!(config.max_concurrent_runs, Some(3));
        assert_eq!(config.output_shape, OutputShape::Video);
        assert_eq!(config.retry_after, RetryAfterMode::HttpDate);
        assert!(config.lenient_duration);
        assert_eq!(config.balance_usd, 5.0);
        assert!(config.validate().is_ok());
    }

    #[test]
    fn debug_output_redacts_the_api_key() {
        let config = SimConfig {
            api_key: Some("rf_live_secret".to_owned()),
            ..SimConfig::default()
        };
        let printed = format!("{config:?}");
        assert!(!printed.contains("rf_live_secret"));
        assert!(printed.contains("<redacted>"));
    }

    #[test]
    fn callback_flags_set_fields_and_the_secret_never_prints() {
        let cli = Cli::try_parse_from([
            "klingq-sim",
            "--callback-secret",
            "whsec_do_not_print",
            "--callback-drop",
            "0.25",
            "--callback-duplicate",
            "0.5",
            "--callback-delay-ms",
            "150",
        ])
        .unwrap();
        let config = cli.args.config.clone();
        assert_eq!(
            config.callback_secret.as_deref(),
            Some("whsec_do_not_print")
        );
        assert_eq!(config.callback_drop, 0.25);
        assert_eq!(config.callback_duplicate, 0.5);
        assert_eq!(config.callback_delay_ms, 150);
        assert!(config.validate().is_ok());
        assert!(!format!("{config:?}").contains("whsec_do_not_print"));
        assert!(!format!("{:?}", cli.args).contains("whsec_do_not_print"));
        assert_eq!(config.redacted_json()["callback_secret"], "<redacted>");
    }

    #[test]
    fn callback_settings_are_validated_with_the_flag_named() {
        let error = SimConfig {
            callback_drop: 1.5,
            ..SimConfig::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(error.contains("--callback-drop"), "{error}");
        assert!(error.contains("0..=1"), "{error}");
        let error = SimConfig::default()
            .merged(&serde_json::json!({"callback_duplicate": -0.1}))
            .unwrap_err()
            .to_string();
        assert!(error.contains("--callback-duplicate"), "{error}");
        let error = SimConfig {
            callback_secret: Some(String::new()),
            ..SimConfig::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(error.contains("--callback-secret"), "{error}");
        let error = SimConfig {
            callback_delay_ms: 3_600_001,
            ..SimConfig::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(error.contains("--callback-delay-ms"), "{error}");
        assert!(
            SimConfig::default()
                .merged(&serde_json::json!({"callback_delay_ms": -1}))
                .is_err()
        );
    }

    #[test]
    fn merge_changes_only_the_given_keys() {
        let merged = SimConfig::default()
            .merged(&serde_json::json!({"stuck": 0.5}))
            .unwrap();
        assert_eq!(merged.stuck, 0.5);
        assert_eq!(merged.time_scale, 1.0);
        assert!(
            SimConfig::default()
                .merged(&serde_json::json!({"stuck": 2}))
                .is_err()
        );
        assert!(
            SimConfig::default()
                .merged(&serde_json::json!([1]))
                .is_err()
        );
    }
}
