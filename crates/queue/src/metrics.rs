//! Metrics on `/metrics`, built with `prometheus-client` (the Prometheus project's Rust client).
//!
//! Queue metrics are read from Redis, so any process (worker or API) can export them: depth per
//! queue and state, the oldest waiting job's age, jobs finished by outcome, spend, and webhook
//! deliveries by outcome ([`QueueMetrics`]). [`Sampled`] exports values a process keeps itself
//! (its Redis errors, [`redis_errors`]), read when scraped. [`register_build_info`] adds
//! `klingq_build_info`. [`Format`] picks the exposition a scraper asks for: OpenMetrics 1.0.0
//! when its `Accept` header prefers it (Prometheus does), else Prometheus text 0.0.4; both carry
//! the same metric and label names.

use std::fmt;

use klingq_core::cost::micros_to_usd;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::error::QueueError;
use crate::queue::Queue;
use crate::record::QueueStats;

/// The exposition format of one scrape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text 0.0.4: what a scraper gets unless it asks for OpenMetrics.
    Text,
    /// OpenMetrics 1.0.0 text: counters' `TYPE` lines name the family without `_total`, an
    /// info metric is typed `info`, and the body ends with `# EOF`.
    OpenMetrics,
}

impl Format {
    /// The format an `Accept` header prefers: OpenMetrics when it accepts
    /// `application/openmetrics-text` with a quality at least that of `text/plain` (or a
    /// wildcard), else text 0.0.4.
    pub fn negotiate(accept: Option<&str>) -> Self {
        let Some(accept) = accept else {
            return Self::Text;
        };
        let mut openmetrics = 0.0_f64;
        let mut text = 0.0_f64;
        for range in accept.split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or_default().to_ascii_lowercase();
            let quality = parts
                .filter_map(|param| param.split_once('='))
                .find(|(key, _)| key.trim().eq_ignore_ascii_case("q"))
                .and_then(|(_, value)| value.trim().parse::<f64>().ok())
                .unwrap_or(1.0);
            match media.as_str() {
                "application/openmetrics-text" => openmetrics = openmetrics.max(quality),
                "text/plain" | "text/*" | "*/*" => text = text.max(quality),
                _ => {}
            }
        }
        if openmetrics > 0.0 && openmetrics >= text {
            Self::OpenMetrics
        } else {
            Self::Text
        }
    }

    /// The `Content-Type` of a body in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Text => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }

    /// One exposition of every metric of `registries`, in order.
    pub fn encode(self, registries: &[&Registry]) -> String {
        let mut out = String::new();
        for registry in registries {
            // Writing to a String fails only if a metric's own encoding does, which ours never do.
            let _ = match self {
                Self::Text => {
                    prometheus_client::encoding::prometheus_text::encode(&mut out, registry)
                }
                Self::OpenMetrics => {
                    prometheus_client::encoding::text::encode_registry(&mut out, registry)
                }
            };
        }
        if self == Self::OpenMetrics {
            let _ = prometheus_client::encoding::text::encode_eof(&mut out);
        }
        out
    }
}

/// Adds `klingq_build_info{version, role} 1`: the version of the running build and what the
/// process serves (`worker` or `api`).
pub fn register_build_info(registry: &mut Registry, role: &'static str) {
    registry.register(
        "klingq_build",
        "The running build: klingq's version, and the process's role (worker or api)",
        Info::new([("version", env!("CARGO_PKG_VERSION")), ("role", role)]),
    );
}

/// A sample's value: a count, or a measure with a fraction (seconds, dollars).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    Count(u64),
    Measure(f64),
}

/// Label pairs of one sample, in order.
pub type Labels = Vec<(&'static str, String)>;

/// One metric family whose samples are read when it is scraped: values a process keeps
/// itself (atomics, a mutex-held map), so that `/metrics` shows them as they are now.
pub struct Sampled {
    name: &'static str,
    help: String,
    kind: MetricType,
    read: Box<dyn Fn() -> Vec<(Labels, Value)> + Send + Sync>,
}

impl fmt::Debug for Sampled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sampled").field("name", &self.name).finish()
    }
}

impl Sampled {
    /// A counter family. `name` is the family's name without `_total`: the encoder adds it.
    pub fn counter(
        name: &'static str,
        help: impl Into<String>,
        read: impl Fn() -> Vec<(Labels, Value)> + Send + Sync + 'static,
    ) -> Self {
        Self {
            name,
            help: help.into(),
            kind: MetricType::Counter,
            read: Box::new(read),
        }
    }

    /// A gauge family.
    pub fn gauge(
        name: &'static str,
        help: impl Into<String>,
        read: impl Fn() -> Vec<(Labels, Value)> + Send + Sync + 'static,
    ) -> Self {
        Self {
            name,
            help: help.into(),
            kind: MetricType::Gauge,
            read: Box::new(read),
        }
    }
}

impl Collector for Sampled {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let samples = (self.read)();
        let mut family = encoder.encode_descriptor(self.name, &self.help, None, self.kind)?;
        for (labels, value) in &samples {
            let sample = family.encode_family(labels)?;
            match (self.kind, *value) {
                (MetricType::Counter, Value::Count(n)) => ConstCounter::new(n).encode(sample)?,
                (MetricType::Counter, Value::Measure(x)) => ConstCounter::new(x).encode(sample)?,
                (_, Value::Count(n)) => ConstGauge::new(n).encode(sample)?,
                (_, Value::Measure(x)) => ConstGauge::new(x).encode(sample)?,
            }
        }
        Ok(())
    }
}

fn labels<const N: usize>(pairs: [(&'static str, &str); N]) -> Labels {
    pairs
        .into_iter()
        .map(|(key, value)| (key, value.to_owned()))
        .collect()
}

/// The queue metrics of one scrape, read from Redis: of the video queue and, when given, of
/// the webhook delivery queue. Register it in the scrape's [`Registry`] with
/// [`QueueMetrics::register`].
#[derive(Debug)]
pub struct QueueMetrics {
    families: Vec<Sampled>,
}

impl QueueMetrics {
    /// Reads the queues' depths and counters.
    pub async fn read(videos: &Queue, webhooks: Option<&Queue>) -> Result<Self, QueueError> {
        let queues: Vec<&Queue> = std::iter::once(videos).chain(webhooks).collect();
        let mut stats: Vec<QueueStats> = Vec::with_capacity(queues.len());
        for queue in &queues {
            stats.push(queue.stats().await?);
        }
        let counters = videos.counters().await?;
        let webhook_counters = match webhooks {
            Some(queue) => queue.counters().await?,
            None => Default::default(),
        };
        let finished = |counters: &std::collections::HashMap<String, u64>, outcome: &str| {
            counters
                .get(&format!("finished:{outcome}"))
                .copied()
                .unwrap_or(0)
        };
        let gauge = |name, help, samples: Vec<(Labels, Value)>| {
            Sampled::gauge(name, help, move || samples.clone())
        };
        let counter = |name, help, samples: Vec<(Labels, Value)>| {
            Sampled::counter(name, help, move || samples.clone())
        };
        let mut families = Vec::new();
        families.push(gauge(
            "klingq_queue_jobs",
            "Jobs per queue and state: waiting (ready, not delivered), in_flight (held by a worker), scheduled (waiting for a time), dead.",
            stats
                .iter()
                .flat_map(|stat| {
                    [
                        ("waiting", stat.waiting),
                        ("in_flight", stat.in_flight),
                        ("scheduled", stat.scheduled),
                        ("dead", stat.dead),
                    ]
                    .map(|(state, value)| {
                        (
                            labels([("queue", stat.queue.as_str()), ("state", state)]),
                            Value::Count(value),
                        )
                    })
                })
                .collect(),
        ));
        families.push(gauge(
            "klingq_jobs_parked",
            "Generations waiting in Redis for their provider run, holding no worker slot.",
            stats
                .iter()
                .map(|stat| {
                    (
                        labels([("queue", stat.queue.as_str())]),
                        Value::Count(stat.parked),
                    )
                })
                .collect(),
        ));
        families.push(gauge(
            "klingq_queue_oldest_waiting_seconds",
            "Age of the oldest job waiting for a worker.",
            stats
                .iter()
                .map(|stat| {
                    (
                        labels([("queue", stat.queue.as_str())]),
                        Value::Measure(stat.oldest_waiting_ms as f64 / 1000.0),
                    )
                })
                .collect(),
        ));
        families.push(counter(
            "klingq_jobs_finished",
            "Video jobs that reached a terminal state, by outcome.",
            ["succeeded", "failed", "cancelled", "dead"]
                .map(|outcome| {
                    (
                        labels([("outcome", outcome)]),
                        Value::Count(finished(&counters, outcome)),
                    )
                })
                .to_vec(),
        ));
        families.push(counter(
            "klingq_spend_usd",
            "Spend in USD: estimated (reserved at submit) and charged (reported by the provider when jobs finished).",
            [
                ("estimated", "reserved_micros"),
                ("charged", "charged_micros"),
            ]
            .map(|(kind, field)| {
                (
                    labels([("kind", kind)]),
                    Value::Measure(micros_to_usd(counters.get(field).copied().unwrap_or(0))),
                )
            })
            .to_vec(),
        ));
        families.push(counter(
            "klingq_webhook_deliveries",
            "Webhook deliveries that ended, by outcome (dead = retries exhausted).",
            ["succeeded", "failed", "dead", "cancelled"]
                .map(|outcome| {
                    (
                        labels([("outcome", outcome)]),
                        Value::Count(finished(&webhook_counters, outcome)),
                    )
                })
                .to_vec(),
        ));
        Ok(Self { families })
    }

    /// Adds these metrics to `registry` (a scrape's own).
    pub fn register(self, registry: &mut Registry) {
        for family in self.families {
            registry.register_collector(Box::new(family));
        }
    }
}

/// `klingq_redis_errors_total{kind}`: the transient Redis errors this process met and survived
/// (retried, reconnected) on `queue`'s connection, per kind, every kind present from 0; read
/// when scraped. Needs no Redis: it is there while Redis is down.
pub fn redis_errors(queue: &Queue) -> Sampled {
    let queue = queue.clone();
    Sampled::counter(
        "klingq_redis_errors",
        format!(
            "Redis errors this process met (and survived), by kind: {}.",
            crate::conn::ERROR_KINDS.join(", ")
        ),
        move || {
            queue
                .redis_errors()
                .into_iter()
                .map(|(kind, count)| (labels([("kind", kind)]), Value::Count(count)))
                .collect()
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_gets_openmetrics_and_others_text() {
        let prometheus = "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2";
        assert_eq!(Format::negotiate(Some(prometheus)), Format::OpenMetrics);
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text; version=1.0.0")),
            Format::OpenMetrics
        );
        for accept in [
            None,
            Some(""),
            Some("*/*"),
            Some("text/plain"),
            Some("text/plain;version=0.0.4;q=0.9,application/openmetrics-text;q=0.5"),
            Some("application/openmetrics-text;q=0"),
            Some("application/json"),
        ] {
            assert_eq!(Format::negotiate(accept), Format::Text, "{accept:?}");
        }
        assert!(
            Format::Text
                .content_type()
                .starts_with("text/plain; version=0.0.4")
        );
        assert!(
            Format::OpenMetrics
                .content_type()
                .starts_with("application/openmetrics-text; version=1.0.0")
        );
    }

    #[test]
    fn counters_keep_their_total_names_in_both_formats() {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Sampled::counter(
            "klingq_things",
            "Things.",
            || vec![(labels([("kind", "a")]), Value::Count(3))],
        )));
        registry.register_collector(Box::new(Sampled::gauge("klingq_level", "Level.", || {
            vec![(Vec::new(), Value::Measure(0.5))]
        })));
        register_build_info(&mut registry, "worker");
        let version = env!("CARGO_PKG_VERSION");

        let text = Format::Text.encode(&[&registry]);
        assert!(
            text.contains("# TYPE klingq_things_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("klingq_things_total{kind=\"a\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE klingq_level gauge\nklingq_level 0.5\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE klingq_build_info gauge\n"), "{text}");
        assert!(
            text.contains(&format!(
                "klingq_build_info{{version=\"{version}\",role=\"worker\"}} 1\n"
            )),
            "{text}"
        );
        assert!(!text.contains("# EOF"), "{text}");

        let open = Format::OpenMetrics.encode(&[&registry, &Registry::default()]);
        assert!(open.contains("# TYPE klingq_things counter\n"), "{open}");
        assert!(
            open.contains("klingq_things_total{kind=\"a\"} 3\n"),
            "{open}"
        );
        assert!(open.contains("# TYPE klingq_build info\n"), "{open}");
        assert!(open.ends_with("# EOF\n"), "{open}");
        assert_eq!(open.matches("# EOF").count(), 1, "{open}");
    }
}
