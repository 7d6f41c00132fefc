//! Operator routes, for the dashboard and for scripts: queue statistics, the searchable job
//! list, batches, webhook deliveries and endpoint health.

use std::collections::{BTreeMap, HashMap};

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use http::{StatusCode, Uri};
use klingq_core::JobState;
use klingq_core::cost::micros_to_usd;
use klingq_core::job::{format_ms, now_ms};
use klingq_events::{
    DELIVERY_QUEUE, DeliveryDetail, DeliveryPage, DeliveryQuery, DeliveryStatus, ReplayOutcome,
    WebhookError,
};
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa::openapi::schema::{ObjectBuilder, Type};

use crate::api::AppState;
use crate::api::error::ApiError;
use crate::api::handlers::{MAX_OFFSET, path_id, query};
use crate::ops::{
    BatchListPage, EndpointEnabled, EndpointHealth, EndpointList, JobListItem, JobListPage,
    ProviderLimitView, SpendView, StatsView, finished_counts, usd,
};
use crate::view::{BatchView, ErrorBody};

/// Most job records one job-list call reads while filtering.
const MAX_SCANNED_JOBS: u64 = 5_000;
/// Job records read per round trip while filtering.
const SCAN_CHUNK: u64 = 200;
/// Most jobs per job-list page.
const MAX_JOB_PAGE: u64 = 500;
/// Most batches per page.
const MAX_BATCH_PAGE: u64 = 200;
/// Recent deliveries read to compute endpoint health.
const HEALTH_DELIVERIES: u64 = 500;
/// Longest search text.
const MAX_Q_CHARS: usize = 200;

fn queue_error(error: klingq_queue::QueueError) -> ApiError {
    ApiError::from(crate::error::ProducerError::Queue(error))
}

fn webhook_error(error: WebhookError) -> ApiError {
    if error.is_not_found() {
        return ApiError::not_found(error.to_string());
    }
    if error.is_conflict() {
        return ApiError::new(StatusCode::CONFLICT, "conflict", error.to_string());
    }
    match error {
        WebhookError::Queue(error) => queue_error(error),
        other => {
            tracing::error!(error = %other, "webhook request failed");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error; see the server log",
            )
        }
    }
}

fn check_page(offset: u64, limit: u64, max: u64) -> Result<(), ApiError> {
    if !(1..=max).contains(&limit) {
        return Err(ApiError::field(
            "limit",
            "range",
            format!("must be 1 to {max}, got {limit}"),
        ));
    }
    if offset > MAX_OFFSET {
        return Err(ApiError::field(
            "offset",
            "range",
            format!("must be at most {MAX_OFFSET}, got {offset}"),
        ));
    }
    Ok(())
}

/// Queue depth, outcomes, spend against the daily budget, and the provider limit.
#[utoipa::path(
    get,
    path = "/v1/stats",
    tag = "operations",
    operation_id = "stats",
    responses(
        (status = 200, description = "The numbers, read now.", body = StatsView),
        (status = 401, description = "Missing or wrong bearer token.", body = ErrorBody),
        (status = 503, description = "Redis is unavailable.", body = ErrorBody),
    )
)]
pub(crate) async fn stats(State(app): State<AppState>) -> Result<Json<StatsView>, ApiError> {
    let videos = app.producer.queue();
    let webhooks = videos.for_queue(DELIVERY_QUEUE);
    let limits = &app.limits;
    let video_stats = videos.stats().await.map_err(queue_error)?;
    let webhook_stats = webhooks.stats().await.map_err(queue_error)?;
    let counters = videos.counters().await.map_err(queue_error)?;
    let webhook_counters = webhooks.counters().await.map_err(queue_error)?;
    let spent_today = videos.spent_today_micros().await.map_err(queue_error)?;
    let (in_use, cap) = videos
        .slot_usage(&limits.provider_limit, limits.provider_max)
        .await
        .map_err(queue_error)?;
    let at_ms = now_ms();
    Ok(Json(StatsView {
        at: format_ms(at_ms),
        at_ms,
        videos: video_stats.into(),
        webhooks: webhook_stats.into(),
        finished: finished_counts(&counters),
        webhook_deliveries: finished_counts(&webhook_counters),
        spend: SpendView {
            estimated_usd: usd(&counters, "reserved_micros"),
            charged_usd: usd(&counters, "charged_micros"),
            spent_today_usd: micros_to_usd(spent_today),
            daily_budget_usd: (limits.daily_budget_usd > 0.0).then_some(limits.daily_budget_usd),
        },
        provider: ProviderLimitView {
            name: limits.provider_limit.clone(),
            in_use,
            cap,
            max: limits.provider_max,
        },
    }))
}

fn state_param() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(JobState::ALL.iter().map(|s| s.as_str())))
}

/// Which jobs to list.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct JobListQuery {
    /// Only jobs in this state.
    #[param(schema_with = state_param)]
    state: Option<String>,
    /// Only jobs of this batch (listed in enqueue order).
    #[param(format = "uuid")]
    batch_id: Option<String>,
    /// Text to look for: a prefix of the job id or of its trace id, or text in its metadata
    /// (case-insensitive).
    #[param(max_length = 200)]
    q: Option<String>,
    /// Jobs to skip: the previous page's `next_offset` (default 0).
    #[param(minimum = 0, maximum = 1000000000)]
    offset: Option<u64>,
    /// Jobs per page, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u64>,
}

/// Whether a job matches the search text (already lowercased).
fn matches_text(item: &JobListItem, text: &str) -> bool {
    if item.job.id.to_ascii_lowercase().starts_with(text)
        || item
            .job
            .trace_id
            .as_deref()
            .is_some_and(|t| t.starts_with(text))
    {
        return true;
    }
    item.job
        .metadata
        .as_ref()
        .is_some_and(|m| m.to_string().to_lowercase().contains(text))
}

/// List jobs, newest first, filtered by state, batch and search text.
///
/// Without a filter this is a plain page. With one, a call reads at most 5,000 jobs and
/// returns what matched with a `next_offset` to continue from, so a search never scans the
/// whole retention at once.
#[utoipa::path(
    get,
    path = "/v1/jobs",
    tag = "jobs",
    operation_id = "list_jobs",
    params(JobListQuery),
    responses(
        (status = 200, description = "One page of jobs with their step timings.", body = JobListPage),
        (status = 401, description = "Missing or wrong bearer token.", body = ErrorBody),
        (status = 404, description = "No such batch.", body = ErrorBody),
        (status = 422, description = "Invalid filter or paging parameters.", body = ErrorBody),
        (status = 503, description = "Redis is unavailable.", body = ErrorBody),
    )
)]
pub(crate) async fn list_jobs(
    State(app): State<AppState>,
    uri: Uri,
) -> Result<Json<JobListPage>, ApiError> {
    let params: JobListQuery = query(&uri)?;
    let offset = params.offset.unwrap_or(0);
    let limit = params.limit.unwrap_or(50);
    check_page(offset, limit, MAX_JOB_PAGE)?;
    let state =
        match params.state.as_deref() {
            None => None,
            Some(text) => Some(text.parse::<JobState>().map_err(|_| {
                ApiError::field("state", "one_of", format!("unknown state {text:?}"))
            })?),
        };
    let text = match params.q.as_deref().map(str::trim) {
        Some(text) if text.chars().count() > MAX_Q_CHARS => {
            return Err(ApiError::field(
                "q",
                "max_length",
                format!("at most {MAX_Q_CHARS} characters"),
            ));
        }
        Some(text) if !text.is_empty() => Some(text.to_lowercase()),
        _ => None,
    };
    let batch = match params.batch_id.as_deref() {
        None => None,
        Some(raw) => {
            let id = crate::producer::canonical_id(raw).ok_or_else(|| {
                ApiError::field("batch_id", "format", "must be a batch id (a UUID)")
            })?;
            // A 404 for an unknown batch, rather than an empty list.
            app.producer.batch(&id).await?;
            Some(id)
        }
    };
    let queue = app.producer.queue();
    let filtered = state.is_some() || text.is_some();
    let mut items = Vec::new();
    let mut position = offset;
    let mut scanned = 0;
    let next_offset = loop {
        if items.len() as u64 >= limit {
            break Some(position);
        }
        if scanned >= MAX_SCANNED_JOBS {
            break Some(position);
        }
        let chunk = if filtered {
            SCAN_CHUNK
        } else {
            limit - items.len() as u64
        };
        let ids = match &batch {
            Some(batch) => queue.batch_job_ids(batch, position, chunk).await,
            None => queue.job_ids(position, chunk).await,
        }
        .map_err(queue_error)?;
        if ids.is_empty() {
            break None;
        }
        let records = queue.jobs(&ids).await.map_err(queue_error)?;
        let mut by_id: HashMap<String, JobListItem> = records
            .into_iter()
            .map(|record| (record.id.clone(), JobListItem::from_record(record)))
            .collect();
        let got = ids.len() as u64;
        let mut processed = 0;
        for id in &ids {
            position += 1;
            scanned += 1;
            processed += 1;
            let Some(item) = by_id.remove(id) else {
                continue;
            };
            if state.is_some_and(|state| item.job.state != state) {
                continue;
            }
            if text.as_deref().is_some_and(|t| !matches_text(&item, t)) {
                continue;
            }
            items.push(item);
            if items.len() as u64 >= limit {
                break;
            }
        }
        // Fewer ids than asked for, all looked at: the list ended.
        if got < chunk && processed == got {
            break None;
        }
    };
    Ok(Json(JobListPage {
        items,
        offset,
        limit,
        next_offset,
        scanned,
    }))
}

/// Paging through batches.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct BatchListQuery {
    /// Batches to skip: the previous page's `next_offset` (default 0).
    #[param(minimum = 0, maximum = 1000000000)]
    offset: Option<u64>,
    /// Batches per page, 1 to 200 (default 20).
    #[param(minimum = 1, maximum = 200)]
    limit: Option<u64>,
}

/// List batches, newest first, with their progress and spend.
#[utoipa::path(
    get,
    path = "/v1/batches",
    tag = "batches",
    operation_id = "list_batches",
    params(BatchListQuery),
    responses(
        (status = 200, description = "One page of batches.", body = BatchListPage),
        (status = 401, description = "Missing or wrong bearer token.", body = ErrorBody),
        (status = 422, description = "Invalid paging parameters.", body = ErrorBody),
        (status = 503, description = "Redis is unavailable.", body = ErrorBody),
    )
)]
pub(crate) async fn list_batches(
    State(app): State<AppState>,
    uri: Uri,
) -> Result<Json<BatchListPage>, ApiError> {
    let params: BatchListQuery = query(&uri)?;
    let offset = params.offset.unwrap_or(0);
    let limit = params.limit.unwrap_or(20);
    check_page(offset, limit, MAX_BATCH_PAGE)?;
    let queue = app.producer.queue();
    let ids = queue.batch_ids(offset, limit).await.map_err(queue_error)?;
    let full = ids.len() as u64 == limit;
    let records: Vec<_> = futures::stream::iter(ids)
        .map(|id| async move { queue.batch(&id).await })
        .buffered(16)
        .collect()
        .await;
    let mut items = Vec::with_capacity(records.len());
    // One read of the provider's load serves every batch of the page.
    let mut load: Option<klingq_core::ProviderLoad> = None;
    for record in records {
        if let Some(record) = record.map_err(queue_error)? {
            if load.is_none() {
                load = app.producer.load_for(&record).await?;
            }
            items.push(BatchView::from_record(record, load.as_ref()));
        }
    }
    Ok(Json(BatchListPage {
        items,
        offset,
        limit,
        next_offset: full.then_some(offset + limit),
    }))
}

fn delivery_status_param() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some([
            "pending",
            "delivering",
            "retrying",
            "succeeded",
            "failed",
            "exhausted",
        ]))
}

/// Which deliveries to list.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct DeliveriesQuery {
    /// Only deliveries in this status.
    #[param(schema_with = delivery_status_param)]
    status: Option<DeliveryStatus>,
    /// Only deliveries of events about this job (its id; a batch id gives the batch's own
    /// events).
    #[param(format = "uuid")]
    job_id: Option<String>,
    /// Where to continue: a page's `next_offset` (default 0).
    #[param(minimum = 0, maximum = 1000000000)]
    offset: Option<u64>,
    /// Deliveries per page, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u64>,
}

/// List webhook deliveries, newest first (exhausted ones by time of exhaustion).
///
/// A `job_id` filter, or a status filter other than `exhausted`, reads at most 10,000 recent
/// deliveries per call and returns a partial page with a `next_offset`. Event bodies are not
/// shown.
#[utoipa::path(
    get,
    path = "/v1/webhooks/deliveries",
    tag = "webhooks",
    operation_id = "list_deliveries",
    params(DeliveriesQuery),
    responses(
        (status = 200, description = "One page of deliveries.", body = DeliveryPage),
        (status = 401, description = "Missing or wrong bearer token.", body = ErrorBody),
        (status = 422, description = "Invalid filter or paging parameters.", body = ErrorBody),
        (status = 503, description = "Redis is unavailable.", body = ErrorBody),
    )
)]
pub(crate) async fn list_deliveries(
    State(app): State<AppState>,
    uri: Uri,
) -> Result<Json<DeliveryPage>, ApiError> {
    let params: DeliveriesQuery = query(&uri)?;
    let offset = params.offset.unwrap_or(0);
    let limit = params.limit.unwrap_or(50);
    check_page(offset, limit, klingq_events::MAX_PAGE)?;
    let subject = match params.job_id.as_deref() {
        None => None,
        Some(raw) => Some(
            crate::producer::canonical_id(raw)
                .ok_or_else(|| ApiError::field("job_id", "format", "must be a job id (a UUID)"))?,
        ),
    };
    let request = DeliveryQuery {
        status: params.status,
        subject,
        offset,
        limit,
    };
    let page = klingq_events::list_deliveries(app.producer.queue(), &request)
        .await
        .map_err(webhook_error)?;
    Ok(Json(page))
}

/// Read one webhook delivery with every recorded attempt.
#[utoipa::path(
    get,
    path = "/v1/webhooks/deliveries/{id}",
    tag = "webhooks",
    operation_id = "get_delivery",
    params(("id" = String, Path, format = "uuid", description = "The delivery's id.")),
    responses(
        (status = 200, description = "The delivery.", body = DeliveryDetail),
        (status = 401, description = "Missing or wrong bearer token.", body = ErrorBody),
        (status = 404, description = "No such delivery (or it expired).", body = ErrorBody),
        (status = 503, description = "Redis is unavailable.", body = ErrorBody),
    )
)]
pub(crate) async fn get_delivery(
    State(app): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<DeliveryDetail>, ApiError> {
    let id = path_id(path, "delivery")?;
    klingq_events::get_delivery(app.producer.queue(), &id)
        .await
        .map_err(webhook_error)?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no delivery with id {id}")))
}

/// Send a finished delivery's event again, with the same `webhook-id` and body.
///
/// An exhausted delivery goes back on the queue under its own id (attempts reset); a
/// succeeded or failed one is copied into a new delivery. A delivery still pending or
/// retrying is a conflict (409).
#[utoipa::path(
    post,
    path = "/v1/webhooks/deliveries/{id}/replay",
    tag = "webhooks",
    operation_id = "replay_delivery",
    params(("id" = String, Path, format = "uuid", description = "The delivery's id.")),
    responses(
        (status = 202, description = "The event will be delivered again.", body = ReplayOutcome),
        (status = 401, description = "Missing or wrong bearer token.", body = ErrorBody),
        (status = 404, description = "No such delivery.", body = ErrorBody),
        (status = 409, description = "The delivery has not finished.", body = ErrorBody),
        (status = 503, description = "Redis is unavailable.", body = ErrorBody),
    )
)]
pub(crate) async fn replay_delivery(
    State(app): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = path_id(path, "delivery")?;
    let outcome = klingq_events::replay_delivery(app.producer.queue(), &id)
        .await
        .map_err(webhook_error)?;
    Ok((StatusCode::ACCEPTED, Json(outcome)).into_response())
}

/// List webhook endpoints with their delivery health.
///
/// Counts come from the 500 most recent deliveries; every endpoint disabled by `410 Gone` is
/// listed too, with `disabled: true`.
#[utoipa::path(
    get,
    path = "/v1/webhooks/endpoints",
    tag = "webhooks",
    operation_id = "list_endpoints",
    responses(
        (status = 200, description = "The endpoints, the most recently used first.", body = EndpointList),
        (status = 401, description = "Missing or wrong bearer token.", body = ErrorBody),
        (status = 503, description = "Redis is unavailable.", body = ErrorBody),
    )
)]
pub(crate) async fn list_endpoints(
    State(app): State<AppState>,
) -> Result<Json<EndpointList>, ApiError> {
    let queue = app.producer.queue();
    let page = klingq_events::list_deliveries(
        queue,
        &DeliveryQuery {
            status: None,
            subject: None,
            offset: 0,
            limit: HEALTH_DELIVERIES,
        },
    )
    .await
    .map_err(webhook_error)?;
    let disabled = klingq_events::disabled_endpoints(queue)
        .await
        .map_err(webhook_error)?;
    let mut order: Vec<String> = Vec::new();
    let mut by_id: BTreeMap<String, EndpointHealth> = BTreeMap::new();
    for delivery in &page.deliveries {
        let health = by_id
            .entry(delivery.endpoint_id.clone())
            .or_insert_with(|| {
                order.push(delivery.endpoint_id.clone());
                EndpointHealth {
                    endpoint_id: delivery.endpoint_id.clone(),
                    endpoint: delivery.endpoint.clone(),
                    counts: BTreeMap::new(),
                    total: 0,
                    last_delivery_at: Some(delivery.created_at.clone()),
                    last_error: None,
                    disabled: false,
                    disabled_at: None,
                    disabled_reason: None,
                }
            });
        let status = serde_json::to_value(delivery.status)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        *health.counts.entry(status).or_default() += 1;
        health.total += 1;
        if health.last_error.is_none() {
            health.last_error.clone_from(&delivery.last_error);
        }
    }
    for record in disabled {
        let health = by_id.entry(record.endpoint_id.clone()).or_insert_with(|| {
            order.push(record.endpoint_id.clone());
            EndpointHealth {
                endpoint_id: record.endpoint_id.clone(),
                endpoint: record.endpoint.clone(),
                counts: BTreeMap::new(),
                total: 0,
                last_delivery_at: None,
                last_error: None,
                disabled: false,
                disabled_at: None,
                disabled_reason: None,
            }
        });
        health.disabled = true;
        health.disabled_at = Some(record.disabled_at);
        health.disabled_reason = Some(record.reason);
    }
    let endpoints = order
        .iter()
        .filter_map(|id| by_id.remove(id))
        .collect::<Vec<_>>();
    Ok(Json(EndpointList {
        endpoints,
        deliveries_scanned: page.deliveries.len() as u64,
    }))
}

/// Re-enable an endpoint disabled by `410 Gone`; deliveries that failed meanwhile can then be
/// replayed.
#[utoipa::path(
    post,
    path = "/v1/webhooks/endpoints/{id}/enable",
    tag = "webhooks",
    operation_id = "enable_endpoint",
    params(("id" = String, Path, pattern = "^ep_[0-9a-f]{16}$", description = "The endpoint's id.")),
    responses(
        (status = 200, description = "Enabled (or it was not disabled).", body = EndpointEnabled),
        (status = 401, description = "Missing or wrong bearer token.", body = ErrorBody),
        (status = 404, description = "Not an endpoint id.", body = ErrorBody),
        (status = 503, description = "Redis is unavailable.", body = ErrorBody),
    )
)]
pub(crate) async fn enable_endpoint(
    State(app): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<EndpointEnabled>, ApiError> {
    let raw = path.map(|Path(id)| id).unwrap_or_default();
    let valid = raw.len() == 19
        && raw.starts_with("ep_")
        && raw[3..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !valid {
        return Err(ApiError::not_found(format!("no endpoint with id {raw}")));
    }
    let was_disabled = klingq_events::enable_endpoint(app.producer.queue(), &raw)
        .await
        .map_err(webhook_error)?;
    if was_disabled {
        tracing::info!(endpoint_id = %raw, "webhook endpoint re-enabled");
    }
    Ok(Json(EndpointEnabled {
        endpoint_id: raw,
        was_disabled,
    }))
}
