//! What operators see: queue statistics, the searchable job list, batch pages and webhook
//! endpoint health. The dashboard and `GET /v1/stats`, `GET /v1/jobs`, `GET /v1/batches` and
//! `GET /v1/webhooks/endpoints` return these types; they are described in the OpenAPI document.

use std::collections::BTreeMap;

use klingq_core::cost::micros_to_usd;
use klingq_queue::{JobRecord, QueueStats};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::view::{BatchView, JobView};

/// Limits the API reports but does not enforce: the worker's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct StatsLimits {
    /// The shared provider limit's name (the worker's `provider`).
    pub provider_limit: String,
    /// Its configured maximum (`worker.provider_concurrency`).
    pub provider_max: u64,
    /// The daily budget in USD (`worker.daily_budget_usd`); 0 for none.
    pub daily_budget_usd: f64,
}

impl Default for StatsLimits {
    fn default() -> Self {
        Self {
            provider_limit: "provider".to_owned(),
            provider_max: 10,
            daily_budget_usd: 0.0,
        }
    }
}

/// The depth of one queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct QueueDepth {
    /// The queue's name (`videos`, `webhooks`).
    pub queue: String,
    /// Ready and not yet taken by a worker.
    pub waiting: u64,
    /// Held by a worker now.
    pub in_flight: u64,
    /// Waiting for a time: not-before, retry backoff, budget.
    pub scheduled: u64,
    /// In the dead letters.
    pub dead: u64,
    /// Age of the oldest waiting job in seconds (0 when none waits).
    pub oldest_waiting_seconds: f64,
    /// Waiting jobs per priority.
    pub waiting_by_priority: BTreeMap<String, u64>,
}

impl From<QueueStats> for QueueDepth {
    fn from(stats: QueueStats) -> Self {
        Self {
            queue: stats.queue,
            waiting: stats.waiting,
            in_flight: stats.in_flight,
            scheduled: stats.scheduled,
            dead: stats.dead,
            oldest_waiting_seconds: stats.oldest_waiting_ms as f64 / 1000.0,
            waiting_by_priority: stats.waiting_by_priority,
        }
    }
}

/// Spend so far, from the queue's counters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SpendView {
    /// Estimated cost reserved when jobs were submitted.
    pub estimated_usd: f64,
    /// What the provider charged for finished jobs.
    pub charged_usd: f64,
    /// Estimated spend reserved today (UTC).
    pub spent_today_usd: f64,
    /// The daily budget; `null` when there is none.
    pub daily_budget_usd: Option<f64>,
}

/// The shared provider concurrency limit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ProviderLimitView {
    /// The limit's name.
    pub name: String,
    /// Slots held now, across every worker.
    pub in_use: u64,
    /// The live cap (lowered after throttling, back to `max` after recovery).
    pub cap: u64,
    /// The configured maximum.
    pub max: u64,
}

/// Queue depth, outcomes, spend and limits, read from Redis at once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct StatsView {
    /// When the numbers were read, RFC 3339.
    #[schema(format = DateTime)]
    pub at: String,
    /// When the numbers were read, in ms since the Unix epoch (for rates).
    pub at_ms: u64,
    /// The video queue.
    pub videos: QueueDepth,
    /// The webhook delivery queue.
    pub webhooks: QueueDepth,
    /// Video jobs that ended, by outcome (`succeeded`, `failed`, `cancelled`, `dead`); counts
    /// only grow.
    pub finished: BTreeMap<String, u64>,
    /// Webhook deliveries that ended, by outcome.
    pub webhook_deliveries: BTreeMap<String, u64>,
    pub spend: SpendView,
    pub provider: ProviderLimitView,
}

/// The outcomes the queue counts.
pub(crate) const OUTCOMES: [&str; 4] = ["succeeded", "failed", "cancelled", "dead"];

/// `finished:<outcome>` counters, every outcome listed.
pub(crate) fn finished_counts(
    counters: &std::collections::HashMap<String, u64>,
) -> BTreeMap<String, u64> {
    OUTCOMES
        .iter()
        .map(|outcome| {
            let value = counters
                .get(&format!("finished:{outcome}"))
                .copied()
                .unwrap_or(0);
            ((*outcome).to_owned(), value)
        })
        .collect()
}

pub(crate) fn usd(counters: &std::collections::HashMap<String, u64>, field: &str) -> f64 {
    micros_to_usd(counters.get(field).copied().unwrap_or(0))
}

/// A job in the job list: the job as `GET /v1/jobs/{id}` shows it (with the time it spent in
/// each pipeline step, `step_ms`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobListItem {
    #[serde(flatten)]
    pub job: JobView,
}

impl JobListItem {
    pub fn from_record(record: JobRecord) -> Self {
        Self {
            job: JobView::from_record(record),
        }
    }
}

/// One page of the job list, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobListPage {
    pub items: Vec<JobListItem>,
    pub offset: u64,
    pub limit: u64,
    /// Where the next page starts; `null` when the list ended. A filtered search reads a
    /// bounded number of jobs per call, so a short page can still have a next one.
    pub next_offset: Option<u64>,
    /// Jobs read to fill this page.
    pub scanned: u64,
}

/// One page of batches, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BatchListPage {
    pub items: Vec<BatchView>,
    pub offset: u64,
    pub limit: u64,
    /// Where the next page starts; `null` on the last page.
    pub next_offset: Option<u64>,
}

/// Delivery health of one webhook endpoint, from its recent deliveries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EndpointHealth {
    /// `ep_<hash of the URL>`.
    pub endpoint_id: String,
    /// The URL without its query.
    pub endpoint: String,
    /// Recent deliveries by status (`pending`, `delivering`, `retrying`, `succeeded`,
    /// `failed`, `exhausted`).
    pub counts: BTreeMap<String, u64>,
    /// Recent deliveries counted.
    pub total: u64,
    /// When the newest recent delivery was created.
    #[schema(format = DateTime)]
    pub last_delivery_at: Option<String>,
    /// The newest error, if any delivery failed.
    pub last_error: Option<String>,
    /// Whether deliveries to it stopped after `410 Gone`.
    pub disabled: bool,
    #[schema(format = DateTime)]
    pub disabled_at: Option<String>,
    pub disabled_reason: Option<String>,
}

/// Webhook endpoints with their delivery health.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EndpointList {
    /// Endpoints seen in recent deliveries, and every disabled one.
    pub endpoints: Vec<EndpointHealth>,
    /// Recent deliveries read to compute the health.
    pub deliveries_scanned: u64,
}

/// The outcome of re-enabling an endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EndpointEnabled {
    pub endpoint_id: String,
    /// False when it was not disabled.
    pub was_disabled: bool,
}
