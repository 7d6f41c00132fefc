//! Webhook settings ([`WebhookConfig`]) and their checked form, parsed once at start-up so a
//! bad secret or CIDR stops the worker instead of failing every delivery.

use std::sync::Arc;
use std::time::Duration;

use klingq_core::{EventType, Secret, redact_url};
use serde::{Deserialize, Serialize};

use crate::signing::{WebhookSecret, parse_secrets};
use crate::ssrf::AddressPolicy;

/// How webhooks are delivered. Every field has a default; `config/default.toml` documents
/// them under `[webhooks]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookConfig {
    /// Whether this process dispatches and delivers webhooks. Turn it off on workers that
    /// should only generate video.
    pub enabled: bool,
    /// Signing secrets for per-job and per-batch URLs: `whsec_<base64>`, space-separated.
    /// All of them sign every request (rotation); receivers accept any.
    pub secret: Secret,
    /// A request that has not answered 2xx within this long failed.
    pub timeout_secs: u64,
    /// Delays before each retry, e.g. `["5s", "5m", "30m"]`: a delivery is tried once more
    /// than there are entries. Each delay gets up to ±20 % jitter.
    pub retry_schedule: Vec<String>,
    /// The longest `Retry-After` (429, 503) honoured; longer ones are cut to this.
    pub max_retry_after_secs: u64,
    /// Deliveries in flight at once in this process.
    pub concurrency: usize,
    /// Deliveries in flight at once to one endpoint in this process, so one slow endpoint
    /// cannot take every slot.
    pub per_endpoint_concurrency: usize,
    /// Refuse plain http URLs.
    pub https_only: bool,
    /// Non-public addresses (loopback, RFC 1918, link-local, ...) deliveries may reach anyway,
    /// as CIDRs. Empty by default: only public addresses are contacted.
    pub allow_cidrs: Vec<String>,
    /// Endpoints that receive every event (or the listed types), each with its own secret.
    /// Last, so a TOML rendering puts its array of tables after the plain values.
    pub endpoints: Vec<EndpointConfig>,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            secret: Secret::default(),
            timeout_secs: 15,
            retry_schedule: ["5s", "5m", "30m", "2h", "5h", "10h", "10h"]
                .map(str::to_owned)
                .to_vec(),
            max_retry_after_secs: 3600,
            concurrency: 32,
            per_endpoint_concurrency: 8,
            https_only: false,
            allow_cidrs: Vec::new(),
            endpoints: Vec::new(),
        }
    }
}

/// One global endpoint. In TOML a table (`[[webhooks.endpoints]]` with `url`, `secret`,
/// `event_types`, `name`); from the environment a bare URL, signed with `webhooks.secret`.
/// `Debug` and `Serialize` show the URL without its query (it may carry a token), as `Secret`
/// shows `[redacted]`: a printed configuration never leaks either.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "EndpointRepr")]
pub struct EndpointConfig {
    /// A label for logs and listings; the redacted URL when empty.
    pub name: String,
    #[serde(serialize_with = "serialize_redacted_url")]
    pub url: String,
    /// This endpoint's secrets (space-separated for a rotation). Empty: `webhooks.secret`.
    pub secret: Secret,
    /// The event types it receives; empty means all.
    pub event_types: Vec<EventType>,
}

impl std::fmt::Debug for EndpointConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointConfig")
            .field("name", &self.name)
            .field("url", &redact_url(&self.url))
            .field("secret", &self.secret)
            .field("event_types", &self.event_types)
            .finish()
    }
}

fn serialize_redacted_url<S: serde::Serializer>(
    url: &str,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&redact_url(url))
}

#[derive(Deserialize)]
#[serde(untagged)]
enum EndpointRepr {
    Url(String),
    Table(EndpointTable),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointTable {
    #[serde(default)]
    name: String,
    url: String,
    #[serde(default)]
    secret: Secret,
    #[serde(default)]
    event_types: Vec<EventType>,
}

impl From<EndpointRepr> for EndpointConfig {
    fn from(repr: EndpointRepr) -> Self {
        match repr {
            EndpointRepr::Url(url) => Self {
                name: String::new(),
                url,
                secret: Secret::default(),
                event_types: Vec::new(),
            },
            EndpointRepr::Table(table) => Self {
                name: table.name,
                url: table.url,
                secret: table.secret,
                event_types: table.event_types,
            },
        }
    }
}

/// A configuration value that cannot be used. Never carries a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid webhook configuration: {0}")]
pub struct ConfigError(pub String);

/// An endpoint with its secrets decoded.
#[derive(Debug, Clone)]
pub(crate) struct GlobalEndpoint {
    pub(crate) name: String,
    pub(crate) url: String,
    pub(crate) secrets: Vec<WebhookSecret>,
    pub(crate) event_types: Vec<EventType>,
}

impl GlobalEndpoint {
    pub(crate) fn wants(&self, event_type: &str) -> bool {
        self.event_types.is_empty() || self.event_types.iter().any(|t| t.as_str() == event_type)
    }
}

/// The configuration, checked and decoded.
#[derive(Debug, Clone)]
pub(crate) struct Checked {
    pub(crate) enabled: bool,
    /// Secrets of per-job and per-batch URLs.
    pub(crate) secrets: Vec<WebhookSecret>,
    pub(crate) endpoints: Vec<GlobalEndpoint>,
    pub(crate) timeout: Duration,
    pub(crate) schedule: Vec<Duration>,
    pub(crate) max_retry_after: Duration,
    pub(crate) concurrency: usize,
    pub(crate) per_endpoint_concurrency: usize,
    pub(crate) https_only: bool,
    pub(crate) policy: Arc<AddressPolicy>,
}

impl WebhookConfig {
    /// Checks and decodes every value: secrets, URLs, the schedule and the allow-list.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.check().map(|_| ())
    }

    pub(crate) fn check(&self) -> Result<Checked, ConfigError> {
        let secrets = parse_secrets(self.secret.expose())
            .map_err(|error| ConfigError(format!("webhooks.secret: {error}")))?;
        let mut endpoints = Vec::new();
        for (index, endpoint) in self.endpoints.iter().enumerate() {
            let label = format!("webhooks.endpoints[{index}]");
            let own = parse_secrets(endpoint.secret.expose())
                .map_err(|error| ConfigError(format!("{label}.secret: {error}")))?;
            let secrets = if own.is_empty() { secrets.clone() } else { own };
            if secrets.is_empty() {
                return Err(ConfigError(format!(
                    "{label} ({}) has no secret, and webhooks.secret is empty",
                    redact_url(&endpoint.url)
                )));
            }
            // The rule per-job and per-batch URLs follow at enqueue.
            klingq_core::urls::check_webhook_url(&endpoint.url).map_err(|error| {
                ConfigError(format!(
                    "{label}.url {}: {}",
                    redact_url(&endpoint.url),
                    error.message
                ))
            })?;
            endpoints.push(GlobalEndpoint {
                name: if endpoint.name.is_empty() {
                    redact_url(&endpoint.url)
                } else {
                    endpoint.name.clone()
                },
                url: endpoint.url.clone(),
                secrets,
                event_types: endpoint.event_types.clone(),
            });
        }
        let schedule = self
            .retry_schedule
            .iter()
            .map(|text| {
                parse_duration(text)
                    .map_err(|error| ConfigError(format!("webhooks.retry_schedule: {error}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let policy = AddressPolicy::parse(&self.allow_cidrs)
            .map_err(|error| ConfigError(format!("webhooks.allow_cidrs: {error}")))?;
        if self.timeout_secs == 0 {
            return Err(ConfigError(
                "webhooks.timeout_secs must be at least 1".to_owned(),
            ));
        }
        Ok(Checked {
            enabled: self.enabled,
            secrets,
            endpoints,
            timeout: Duration::from_secs(self.timeout_secs),
            schedule,
            max_retry_after: Duration::from_secs(self.max_retry_after_secs),
            concurrency: self.concurrency.max(1),
            per_endpoint_concurrency: self.per_endpoint_concurrency.max(1),
            https_only: self.https_only,
            policy: Arc::new(policy),
        })
    }
}

/// Parses `250ms`, `5s`, `5m`, `2h`, `1d`, or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (e.g. 500ms, 5s, 5m, 2h)"))?;
    let seconds = match unit.trim() {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        "d" => value * 86400.0,
        other => return Err(format!("{text:?} has an unknown unit {other:?}")),
    };
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(format!("{text:?} is not a duration"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_svix_schedule() {
        let checked = WebhookConfig::default().check().unwrap();
        let schedule: Vec<u64> = checked.schedule.iter().map(Duration::as_secs).collect();
        assert_eq!(schedule, [5, 300, 1800, 7200, 18000, 36000, 36000]);
        assert_eq!(checked.timeout, Duration::from_secs(15));
        assert!(checked.secrets.is_empty());
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("100ms"), Ok(Duration::from_millis(100)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn endpoints_come_as_tables_or_bare_urls() {
        let secret = crate::WebhookSecret::generate().to_whsec();
        let config: WebhookConfig = serde_json::from_value(serde_json::json!({
            "secret": secret.expose(),
            "endpoints": [
                "https://hooks.example.com/a",
                {"url": "https://b.example.com/x?token=t", "event_types": ["batch.completed"]}
            ]
        }))
        .unwrap();
        let checked = config.check().unwrap();
        assert_eq!(checked.endpoints.len(), 2);
        assert!(checked.endpoints[0].wants("job.failed"));
        assert!(!checked.endpoints[1].wants("job.failed"));
        assert!(checked.endpoints[1].wants("batch.completed"));
        assert_eq!(
            checked.endpoints[1].name,
            "https://b.example.com/x?[redacted]"
        );
    }

    #[test]
    fn reads_and_prints_as_the_settings_file_does() {
        let secret = crate::WebhookSecret::generate().to_whsec();
        let text = format!(
            "secret = \"{}\"\nallow_cidrs = [\"10.0.0.0/8\"]\n\n[[endpoints]]\nurl = \"https://a.example/x?token=t\"\nevent_types = [\"job.failed\"]\n\n[[endpoints]]\nname = \"ops\"\nurl = \"https://b.example/\"\n",
            secret.expose()
        );
        let config: WebhookConfig = toml::from_str(&text).unwrap();
        assert_eq!(config.endpoints.len(), 2);
        assert_eq!(config.endpoints[0].event_types, [EventType::JobFailed]);
        assert_eq!(config.timeout_secs, 15);
        config.validate().unwrap();
        let shown = toml::to_string_pretty(&config).unwrap();
        assert!(shown.contains("[[endpoints]]"), "{shown}");
        assert!(
            !shown.contains("token=t") && !shown.contains(secret.expose()),
            "{shown}"
        );
    }

    #[test]
    fn endpoint_urls_follow_the_rule_of_job_webhook_urls() {
        let secret = crate::WebhookSecret::generate().to_whsec();
        let with_url = |url: &str| WebhookConfig {
            secret: secret.clone(),
            endpoints: vec![EndpointConfig::from(EndpointRepr::Url(url.to_owned()))],
            ..WebhookConfig::default()
        };
        with_url("https://hooks.example.com/a").validate().unwrap();
        for (url, expected) in [
            (
                "https://x\"onmouseover=alert(1)//e.com/",
                "an HTTP request cannot carry",
            ),
            ("ftp://hooks.example.com/", "not http:// or https://"),
        ] {
            let error = with_url(url).validate().unwrap_err().to_string();
            assert!(
                error.contains("webhooks.endpoints[0].url") && error.contains(expected),
                "{error}"
            );
        }
        let long = format!("https://hooks.example.com/{}", "a".repeat(2048));
        let error = with_url(&long).validate().unwrap_err().to_string();
        assert!(error.contains("at most 2048 bytes"), "{error}");
    }

    #[test]
    fn bad_values_are_named_without_secrets() {
        let bad_secret = WebhookConfig {
            secret: Secret::new("whsec_dG9vc2hvcnQ="),
            ..WebhookConfig::default()
        };
        let error = bad_secret.validate().unwrap_err().to_string();
        assert!(
            error.contains("webhooks.secret") && error.contains("at least 24"),
            "{error}"
        );
        assert!(!error.contains("dG9vc2hvcnQ"), "{error}");
        let no_secret = WebhookConfig {
            endpoints: vec![EndpointConfig::from(EndpointRepr::Url(
                "https://a.example/".into(),
            ))],
            ..WebhookConfig::default()
        };
        assert!(
            no_secret
                .validate()
                .unwrap_err()
                .to_string()
                .contains("no secret")
        );
        let bad_cidr = WebhookConfig {
            allow_cidrs: vec!["10.0.0.0/40".into()],
            ..WebhookConfig::default()
        };
        assert!(
            bad_cidr
                .validate()
                .unwrap_err()
                .to_string()
                .contains("allow_cidrs")
        );
    }
}
