//! Reading and replaying deliveries, for `klingq webhooks list|show|replay` and the HTTP
//! routes `GET /v1/webhooks/deliveries`, `GET /v1/webhooks/deliveries/{id}` and
//! `POST /v1/webhooks/deliveries/{id}/replay`. Every function takes any [`Queue`] of the
//! namespace; URLs are shown without their query, and event bodies are not shown (they may
//! hold presigned video URLs).

use std::collections::HashMap;

use klingq_core::job::format_ms;
use klingq_core::{JobId, JobState, redact_url};
use klingq_queue::{JobRecord, NewJob, Queue, RedriveOutcome};
use serde::{Deserialize, Serialize};

use crate::error::WebhookError;
use crate::payload::{DeliveryJob, EndpointSource, endpoint_id};
use crate::store::{self, AttemptRecord};

/// The queue holding delivery jobs, in the same namespace as the video queue.
pub const DELIVERY_QUEUE: &str = "webhooks";

/// Most deliveries returned per page.
pub const MAX_PAGE: u64 = 500;
/// Most delivery records a filtered listing reads before it returns a partial page.
const MAX_SCANNED: u64 = 10_000;

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryStatus {
    /// Waiting for its first attempt.
    Pending,
    /// An attempt is running.
    Delivering,
    /// Failed at least once; waiting for its next attempt.
    Retrying,
    Succeeded,
    /// Ended without retrying: gone (410), refused, disabled endpoint, no secret.
    Failed,
    /// Every scheduled attempt failed. Replayable.
    Exhausted,
}

/// One delivery: an event for one endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeliverySummary {
    /// The delivery id (a UUID).
    pub id: String,
    pub status: DeliveryStatus,
    /// The event id: the `webhook-id` header.
    pub event_id: String,
    pub event_type: String,
    /// The job or batch the event is about.
    pub subject: String,
    /// The endpoint URL without its query.
    pub endpoint: String,
    /// `ep_<hash of the URL>`, to re-enable an endpoint disabled by `410 Gone`.
    pub endpoint_id: String,
    pub source: EndpointSource,
    /// Attempts made (in this life of the delivery).
    pub attempts: u32,
    pub max_attempts: u32,
    /// The status code of the last answer, when there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_status_code: Option<u16>,
    /// Why the last attempt failed, or why the delivery ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When the next attempt is due, RFC 3339, while retrying.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<String>,
    pub created_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// The delivery this one replays, when it is a replay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay_of: Option<String>,
}

/// A delivery with every recorded attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeliveryDetail {
    #[serde(flatten)]
    pub delivery: DeliverySummary,
    /// Oldest first; the last 50 are kept.
    pub attempts_log: Vec<AttemptRecord>,
}

/// Which deliveries to list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeliveryQuery {
    /// Only deliveries in this status; all when absent.
    #[serde(default)]
    pub status: Option<DeliveryStatus>,
    /// Only deliveries of events about this job (or batch); all when absent.
    #[serde(default)]
    pub subject: Option<String>,
    /// Where to continue: a page's `next_offset`.
    #[serde(default)]
    pub offset: u64,
    /// At most this many (1 to 500).
    #[serde(default = "default_limit")]
    pub limit: u64,
}

fn default_limit() -> u64 {
    50
}

impl Default for DeliveryQuery {
    fn default() -> Self {
        Self {
            status: None,
            subject: None,
            offset: 0,
            limit: default_limit(),
        }
    }
}

/// A page of deliveries, newest first (exhausted ones by time of exhaustion).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeliveryPage {
    pub deliveries: Vec<DeliverySummary>,
    /// Pass as `offset` for the next page; absent on the last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_offset: Option<u64>,
}

/// How a replay was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReplayMode {
    /// An exhausted delivery went back on the queue under its own id, attempts reset.
    Redriven,
    /// A finished delivery was copied into a new one (same event id, same body).
    Copied,
}

/// The outcome of a replay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReplayOutcome {
    /// The delivery that will carry the event again.
    pub delivery_id: String,
    /// The delivery replayed.
    pub replay_of: String,
    pub mode: ReplayMode,
}

fn status_of(record: &JobRecord) -> DeliveryStatus {
    match record.state {
        JobState::Succeeded => DeliveryStatus::Succeeded,
        JobState::Failed | JobState::Cancelled => DeliveryStatus::Failed,
        JobState::Dead => DeliveryStatus::Exhausted,
        JobState::Queued if record.worker.is_some() => DeliveryStatus::Delivering,
        state if state.is_active() => DeliveryStatus::Delivering,
        _ if record.attempts > 0 => DeliveryStatus::Retrying,
        _ => DeliveryStatus::Pending,
    }
}

fn summary_of(record: &JobRecord, last: Option<&AttemptRecord>) -> Option<DeliverySummary> {
    if record.queue != DELIVERY_QUEUE {
        return None;
    }
    let job: DeliveryJob = serde_json::from_value(record.payload.clone()).ok()?;
    let status = status_of(record);
    Some(DeliverySummary {
        id: record.id.clone(),
        status,
        event_id: job.event_id,
        event_type: job.event_type,
        subject: job.subject,
        endpoint: redact_url(&job.url),
        endpoint_id: endpoint_id(&job.url),
        source: job.source,
        attempts: record.attempts,
        max_attempts: record.max_attempts,
        last_status_code: last.and_then(|a| a.status_code),
        last_error: match status {
            DeliveryStatus::Succeeded => None,
            _ => last
                .and_then(|a| a.error.clone())
                .or_else(|| record.error.as_ref().map(|e| e.message.clone())),
        },
        next_attempt_at: match status {
            DeliveryStatus::Retrying | DeliveryStatus::Pending => record.run_at_ms.map(format_ms),
            _ => None,
        },
        created_at: format_ms(record.created_ms),
        finished_at: record.finished_ms.map(format_ms),
        replay_of: job.replay_of,
    })
}

/// The last recorded attempt of each delivery, in one round trip.
async fn last_attempts(
    queue: &Queue,
    records: &[JobRecord],
) -> Result<HashMap<String, AttemptRecord>, WebhookError> {
    if records.is_empty() {
        return Ok(HashMap::new());
    }
    let ids: Vec<String> = records.iter().map(|record| record.id.clone()).collect();
    let lasts = queue.last_webhook_attempts(&ids).await?;
    Ok(records
        .iter()
        .zip(lasts)
        .filter_map(|(record, last)| {
            let attempt = serde_json::from_str(last.as_deref()?).ok()?;
            Some((record.id.clone(), attempt))
        })
        .collect())
}

async fn summaries(
    queue: &Queue,
    records: &[JobRecord],
) -> Result<Vec<DeliverySummary>, WebhookError> {
    let lasts = last_attempts(queue, records).await?;
    Ok(records
        .iter()
        .filter_map(|record| summary_of(record, lasts.get(&record.id)))
        .collect())
}

/// Deliveries, newest first, optionally of one status. Exhausted deliveries are listed from
/// the dead-letter index; other filters scan recent deliveries (at most 10,000 per call, then
/// a partial page with a `next_offset`).
pub async fn list_deliveries(
    queue: &Queue,
    query: &DeliveryQuery,
) -> Result<DeliveryPage, WebhookError> {
    let deliveries = queue.for_queue(DELIVERY_QUEUE);
    let limit = query.limit.clamp(1, MAX_PAGE);
    if query.status == Some(DeliveryStatus::Exhausted) && query.subject.is_none() {
        let records = deliveries.dead_letters(query.offset, limit).await?;
        let full = records.len() as u64 == limit;
        return Ok(DeliveryPage {
            deliveries: summaries(&deliveries, &records).await?,
            next_offset: full.then_some(query.offset + limit),
        });
    }
    let mut page = Vec::new();
    let mut offset = query.offset;
    loop {
        if page.len() as u64 >= limit {
            return Ok(DeliveryPage {
                deliveries: page,
                next_offset: Some(offset),
            });
        }
        if offset - query.offset >= MAX_SCANNED {
            return Ok(DeliveryPage {
                deliveries: page,
                next_offset: Some(offset),
            });
        }
        let chunk = if query.status.is_none() && query.subject.is_none() {
            limit - page.len() as u64
        } else {
            200
        };
        let ids = deliveries.job_ids(offset, chunk).await?;
        if ids.is_empty() {
            return Ok(DeliveryPage {
                deliveries: page,
                next_offset: None,
            });
        }
        let records = deliveries.jobs(&ids).await?;
        let mut by_id: HashMap<String, DeliverySummary> = summaries(&deliveries, &records)
            .await?
            .into_iter()
            .map(|s| (s.id.clone(), s))
            .collect();
        for id in &ids {
            offset += 1;
            if let Some(summary) = by_id.remove(id)
                && query.status.is_none_or(|status| status == summary.status)
                && query
                    .subject
                    .as_deref()
                    .is_none_or(|subject| subject == summary.subject)
            {
                page.push(summary);
                if page.len() as u64 >= limit {
                    break;
                }
            }
        }
    }
}

/// One delivery with its attempts; `None` when unknown (or expired, or not a delivery).
pub async fn get_delivery(
    queue: &Queue,
    delivery_id: &str,
) -> Result<Option<DeliveryDetail>, WebhookError> {
    let deliveries = queue.for_queue(DELIVERY_QUEUE);
    let Some(record) = deliveries.job(delivery_id).await? else {
        return Ok(None);
    };
    let attempts_log = store::attempts(&deliveries, delivery_id).await?;
    Ok(
        summary_of(&record, attempts_log.last()).map(|delivery| DeliveryDetail {
            delivery,
            attempts_log,
        }),
    )
}

/// Sends a finished delivery's event again, with the same `webhook-id` and body. An exhausted
/// delivery is re-driven under its own id (attempts reset); a succeeded or failed one is
/// copied into a new delivery. A delivery still pending or retrying is a conflict. A replay to
/// an endpoint disabled by `410 Gone` fails at once: re-enable the endpoint first.
pub async fn replay_delivery(
    queue: &Queue,
    delivery_id: &str,
) -> Result<ReplayOutcome, WebhookError> {
    let deliveries = queue.for_queue(DELIVERY_QUEUE);
    let not_found = || WebhookError::DeliveryNotFound(delivery_id.to_owned());
    let record = deliveries.job(delivery_id).await?.ok_or_else(not_found)?;
    if record.queue != DELIVERY_QUEUE {
        return Err(not_found());
    }
    match record.state {
        JobState::Dead => match deliveries.redrive(delivery_id).await? {
            RedriveOutcome::Redriven => Ok(ReplayOutcome {
                delivery_id: delivery_id.to_owned(),
                replay_of: delivery_id.to_owned(),
                mode: ReplayMode::Redriven,
            }),
            RedriveOutcome::NotDead(state) => Err(WebhookError::NotReplayable {
                id: delivery_id.to_owned(),
                state: state.to_string(),
            }),
        },
        JobState::Succeeded | JobState::Failed | JobState::Cancelled => {
            let mut job: DeliveryJob =
                serde_json::from_value(record.payload.clone()).map_err(|_| not_found())?;
            job.replay_of = Some(delivery_id.to_owned());
            let mut new_job = NewJob::new(&job)?;
            new_job.id = JobId::new();
            new_job.max_attempts = Some(record.max_attempts.max(1));
            // The replay belongs to the same job's trace as the delivery it copies.
            new_job.trace = record.trace;
            let enqueued = deliveries.enqueue(&new_job, None).await?;
            tracing::info!(
                delivery_id,
                replay = %enqueued.id,
                endpoint = %redact_url(&job.url),
                "webhook delivery replayed"
            );
            Ok(ReplayOutcome {
                delivery_id: enqueued.id,
                replay_of: delivery_id.to_owned(),
                mode: ReplayMode::Copied,
            })
        }
        state => Err(WebhookError::NotReplayable {
            id: delivery_id.to_owned(),
            state: state.to_string(),
        }),
    }
}
