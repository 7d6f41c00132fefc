//! `GET /v1/stats/history`: what happened in each of the last minutes (jobs finished per
//! outcome, spend charged), from the per-minute samples the workers keep in Redis, so charts
//! are full when a page opens.

use axum::Json;
use axum::extract::State;
use http::Uri;
use klingq_core::cost::micros_to_usd;
use klingq_core::job::{format_ms, now_ms};
use klingq_queue::{HISTORY_MINUTES, HistoryPoint};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::error::ApiError;
use super::handlers::query;
use crate::error::ProducerError;
use crate::view::ErrorBody;

/// Which minutes to read.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct HistoryQuery {
    /// Minutes to read, ending with the current one: 1 to 1440 (default 60).
    #[param(minimum = 1, maximum = 1440)]
    minutes: Option<u64>,
}

/// What happened in one minute.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HistoryPointView {
    /// The minute's start, RFC 3339.
    #[schema(format = DateTime)]
    pub at: String,
    /// The minute's start, in ms since the Unix epoch.
    pub at_ms: u64,
    /// Jobs that finished in the minute, by outcome.
    pub succeeded: u64,
    pub failed: u64,
    pub cancelled: u64,
    pub dead: u64,
    /// Spend the provider reported in the minute, USD.
    pub charged_usd: f64,
}

/// The last minutes, oldest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HistoryView {
    /// Seconds per point: 60.
    pub interval_secs: u64,
    /// Minutes of history kept.
    pub retention_minutes: u64,
    /// One point per minute that has a sample at its start and its end (the last point is the
    /// current minute, so far); a minute no worker sampled has no point.
    pub points: Vec<HistoryPointView>,
}

impl From<HistoryPoint> for HistoryPointView {
    fn from(point: HistoryPoint) -> Self {
        let [succeeded, failed, cancelled, dead] = point.finished;
        Self {
            at: format_ms(point.minute_ms),
            at_ms: point.minute_ms,
            succeeded,
            failed,
            cancelled,
            dead,
            charged_usd: micros_to_usd(point.charged_micros),
        }
    }
}

/// Jobs finished and spend, per minute.
///
/// Workers sample the queue's counters at the start of every minute (one sample per minute
/// whatever the number of replicas); a point is the difference between a minute's sample and
/// the next. Kept for a day.
#[utoipa::path(
    get,
    path = "/v1/stats/history",
    tag = "operations",
    operation_id = "stats_history",
    params(HistoryQuery),
    responses(
        (status = 200, description = "The minutes, oldest first.", body = HistoryView),
        (status = 401, description = "Missing or wrong bearer token.", body = ErrorBody),
        (status = 422, description = "`minutes` out of range.", body = ErrorBody),
        (status = 503, description = "Redis is unavailable.", body = ErrorBody),
    )
)]
pub(crate) async fn stats_history(
    State(app): State<AppState>,
    uri: Uri,
) -> Result<Json<HistoryView>, ApiError> {
    let params: HistoryQuery = query(&uri)?;
    let minutes = params.minutes.unwrap_or(60);
    if !(1..=HISTORY_MINUTES).contains(&minutes) {
        return Err(ApiError::field(
            "minutes",
            "range",
            format!("must be 1 to {HISTORY_MINUTES}, got {minutes}"),
        ));
    }
    let points = app
        .producer
        .queue()
        .history(minutes, now_ms())
        .await
        .map_err(ProducerError::Queue)?;
    Ok(Json(HistoryView {
        interval_secs: 60,
        retention_minutes: HISTORY_MINUTES,
        points: points.into_iter().map(HistoryPointView::from).collect(),
    }))
}
