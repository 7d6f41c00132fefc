//! Queue metrics in the Prometheus text format, read from Redis so any process (worker or API)
//! can export them: depth per queue and state, the oldest waiting job's age, jobs finished by
//! outcome, spend, and webhook deliveries by outcome.

use std::fmt::Write;

use klingq_core::cost::micros_to_usd;

use crate::error::QueueError;
use crate::queue::Queue;

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Appends the metrics of the video queue and, when given, the webhook delivery queue.
pub async fn render_metrics(
    videos: &Queue,
    webhooks: Option<&Queue>,
    out: &mut String,
) -> Result<(), QueueError> {
    let queues: Vec<&Queue> = std::iter::once(videos).chain(webhooks).collect();
    let mut stats = Vec::with_capacity(queues.len());
    for queue in &queues {
        stats.push(queue.stats().await?);
    }
    header(
        out,
        "klingq_queue_jobs",
        "gauge",
        "Jobs per queue and state: waiting (ready, not delivered), in_flight (held by a worker), scheduled (waiting for a time), dead.",
    );
    for stat in &stats {
        for (state, value) in [
            ("waiting", stat.waiting),
            ("in_flight", stat.in_flight),
            ("scheduled", stat.scheduled),
            ("dead", stat.dead),
        ] {
            let _ = writeln!(
                out,
                "klingq_queue_jobs{{queue=\"{}\",state=\"{state}\"}} {value}",
                stat.queue
            );
        }
    }
    header(
        out,
        "klingq_jobs_parked",
        "gauge",
        "Generations waiting in Redis for their provider run, holding no worker slot.",
    );
    for stat in &stats {
        let _ = writeln!(
            out,
            "klingq_jobs_parked{{queue=\"{}\"}} {}",
            stat.queue, stat.parked
        );
    }
    header(
        out,
        "klingq_queue_oldest_waiting_seconds",
        "gauge",
        "Age of the oldest job waiting for a worker.",
    );
    for stat in &stats {
        let _ = writeln!(
            out,
            "klingq_queue_oldest_waiting_seconds{{queue=\"{}\"}} {}",
            stat.queue,
            stat.oldest_waiting_ms as f64 / 1000.0
        );
    }
    let counters = videos.counters().await?;
    header(
        out,
        "klingq_jobs_finished_total",
        "counter",
        "Video jobs that reached a terminal state, by outcome.",
    );
    for outcome in ["succeeded", "failed", "cancelled", "dead"] {
        let value = counters
            .get(&format!("finished:{outcome}"))
            .copied()
            .unwrap_or(0);
        let _ = writeln!(
            out,
            "klingq_jobs_finished_total{{outcome=\"{outcome}\"}} {value}"
        );
    }
    header(
        out,
        "klingq_spend_usd_total",
        "counter",
        "Spend in USD: estimated (reserved at submit) and charged (reported by the provider when jobs finished).",
    );
    for (kind, field) in [
        ("estimated", "reserved_micros"),
        ("charged", "charged_micros"),
    ] {
        let value = micros_to_usd(counters.get(field).copied().unwrap_or(0));
        let _ = writeln!(out, "klingq_spend_usd_total{{kind=\"{kind}\"}} {value}");
    }
    header(
        out,
        "klingq_webhook_deliveries_total",
        "counter",
        "Webhook deliveries that ended, by outcome (dead = retries exhausted).",
    );
    let webhook_counters = match webhooks {
        Some(queue) => queue.counters().await?,
        None => Default::default(),
    };
    for outcome in ["succeeded", "failed", "dead", "cancelled"] {
        let value = webhook_counters
            .get(&format!("finished:{outcome}"))
            .copied()
            .unwrap_or(0);
        let _ = writeln!(
            out,
            "klingq_webhook_deliveries_total{{outcome=\"{outcome}\"}} {value}"
        );
    }
    Ok(())
}

/// Appends `klingq_redis_errors_total{kind}`: the transient Redis errors this process met and
/// survived (retried, reconnected), per kind. Needs no Redis: it is there while Redis is down.
pub fn render_redis_errors(queue: &Queue, out: &mut String) {
    header(
        out,
        "klingq_redis_errors_total",
        "counter",
        &format!(
            "Redis errors this process met (and survived), by kind: {}.",
            crate::conn::ERROR_KINDS.join(", ")
        ),
    );
    for (kind, count) in queue.redis_errors() {
        let _ = writeln!(out, "klingq_redis_errors_total{{kind=\"{kind}\"}} {count}");
    }
}
