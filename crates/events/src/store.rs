//! What this crate keeps in Redis beside the delivery jobs: every attempt of a delivery (a
//! capped list per delivery, expiring with the queue's retention) and the endpoints disabled
//! by `410 Gone` (a hash, kept until re-enabled). The queue stores them (its webhook records);
//! this module owns their format.

use klingq_core::redact_url;
use klingq_queue::Queue;
use serde::{Deserialize, Serialize};

use crate::error::WebhookError;
use crate::payload::endpoint_id;

/// Attempts kept per delivery (the oldest are dropped past this).
pub(crate) const MAX_ATTEMPTS_KEPT: usize = 50;

/// How one attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AttemptOutcome {
    /// A 2xx answer: delivered.
    Succeeded,
    /// No answer, a timeout, or a non-2xx answer: retried on the schedule.
    Failed,
    /// Answered `429` or `503`: retried after its `Retry-After`.
    Throttled,
    /// Answered `410 Gone`: the endpoint is disabled.
    Gone,
    /// Not sent: the URL or its addresses are refused (SSRF guard, https only), or no request
    /// can be built from the URL.
    Refused,
    /// Not sent: the endpoint is disabled or has no secret.
    Skipped,
}

/// One attempt of a delivery, as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AttemptRecord {
    /// The delivery's attempt number, 1 for the first.
    pub attempt: u32,
    /// When the request was sent, RFC 3339.
    pub at: String,
    pub outcome: AttemptOutcome,
    /// The HTTP status, when the endpoint answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_code: Option<u16>,
    /// Time from sending the request to its status (or failure).
    pub latency_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The start of the response body (at most 1 KiB, lossy UTF-8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_body: Option<String>,
    /// When the attempt is retried, after how long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_in_ms: Option<u64>,
}

/// An endpoint no longer delivered to, because it answered `410 Gone`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DisabledEndpoint {
    /// `ep_<hash of the URL>`: the id to re-enable it with.
    pub endpoint_id: String,
    /// The URL without its query.
    pub endpoint: String,
    /// When it was disabled, RFC 3339.
    pub disabled_at: String,
    pub reason: String,
    /// The delivery whose answer disabled it.
    pub delivery_id: String,
}

/// Appends an attempt to its delivery's list, keeping the last [`MAX_ATTEMPTS_KEPT`], and
/// renews the list's expiry to the queue's retention.
pub(crate) async fn record_attempt(
    queue: &Queue,
    delivery_id: &str,
    attempt: &AttemptRecord,
) -> Result<(), WebhookError> {
    queue
        .push_webhook_attempt(
            delivery_id,
            &serde_json::to_string(attempt)?,
            MAX_ATTEMPTS_KEPT,
        )
        .await?;
    Ok(())
}

/// A delivery's recorded attempts, oldest first.
pub(crate) async fn attempts(
    queue: &Queue,
    delivery_id: &str,
) -> Result<Vec<AttemptRecord>, WebhookError> {
    Ok(queue
        .webhook_attempts(delivery_id)
        .await?
        .iter()
        .filter_map(|item| serde_json::from_str(item).ok())
        .collect())
}

/// Disables an endpoint (idempotent: the first record is kept).
pub(crate) async fn disable_endpoint(
    queue: &Queue,
    url: &str,
    reason: &str,
    delivery_id: &str,
) -> Result<(), WebhookError> {
    let record = DisabledEndpoint {
        endpoint_id: endpoint_id(url),
        endpoint: redact_url(url),
        disabled_at: klingq_core::job::format_ms(klingq_core::job::now_ms()),
        reason: reason.to_owned(),
        delivery_id: delivery_id.to_owned(),
    };
    queue
        .disable_webhook_endpoint(&record.endpoint_id, &serde_json::to_string(&record)?)
        .await?;
    Ok(())
}

/// The record of a disabled endpoint, or `None` when it is enabled.
pub(crate) async fn disabled(
    queue: &Queue,
    url: &str,
) -> Result<Option<DisabledEndpoint>, WebhookError> {
    let record = queue.disabled_webhook_endpoint(&endpoint_id(url)).await?;
    Ok(record.and_then(|r| serde_json::from_str(&r).ok()))
}

/// Every disabled endpoint, most recently disabled first.
pub async fn disabled_endpoints(queue: &Queue) -> Result<Vec<DisabledEndpoint>, WebhookError> {
    let mut endpoints: Vec<DisabledEndpoint> = queue
        .disabled_webhook_endpoints()
        .await?
        .iter()
        .filter_map(|r| serde_json::from_str(r).ok())
        .collect();
    endpoints.sort_by(|a, b| b.disabled_at.cmp(&a.disabled_at));
    Ok(endpoints)
}

/// Re-enables an endpoint by its id (`ep_…`); false when it was not disabled. Deliveries that
/// failed while it was disabled can then be replayed.
pub async fn enable_endpoint(queue: &Queue, endpoint_id: &str) -> Result<bool, WebhookError> {
    Ok(queue.enable_webhook_endpoint(endpoint_id).await?)
}
