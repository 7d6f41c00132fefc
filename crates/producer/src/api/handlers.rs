//! The route handlers. Bodies are read as bytes and parsed here, so every error, from a wrong
//! content type to a too-large body, is answered in the API's error shape.

use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use http::{HeaderMap, StatusCode, Uri, header};
use klingq_core::{TraceParent, ValidationErrors};
use serde::Deserialize;
use serde_json::Value;
use utoipa::IntoParams;

use crate::api::AppState;
use crate::api::batch_body;
use crate::api::error::ApiError;
use crate::api::openapi;
use crate::input::parse_job_value;
use crate::producer::{BatchOptions, MAX_BATCH_IDEMPOTENCY_KEY_BYTES, RedriveTarget, canonical_id};
use crate::view::{
    BatchAccepted, BatchCancelResult, BatchResumeResult, BatchView, CancelResult, ErrorBody,
    EventView, Health, JobAccepted, JobPage, JobView, RedriveRequest, RedriveResult,
};

/// Most ids one re-drive request may name.
pub(crate) const MAX_REDRIVE_IDS: usize = 1000;
/// Most items one page may have.
const MAX_PAGE: u64 = 1000;
/// Largest page offset accepted.
pub(crate) const MAX_OFFSET: u64 = 1_000_000_000;
/// Longest one blocking read of the events stream waits before checking the time again.
const EVENTS_POLL: Duration = Duration::from_secs(5);

/// The body's media type, lowercased, without parameters.
fn media_type(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
        })
}

fn is_json(media_type: Option<&str>) -> bool {
    media_type.is_some_and(|m| m == "application/json" || m.ends_with("+json"))
}

fn is_json_lines(media_type: Option<&str>) -> bool {
    matches!(
        media_type,
        Some(
            "application/x-ndjson"
                | "application/jsonl"
                | "application/x-jsonlines"
                | "application/jsonlines"
        )
    )
}

pub(super) fn body_bytes(
    body: Result<Bytes, BytesRejection>,
    limit: usize,
) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("the body is larger than {limit} bytes"),
            )
        } else {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("reading the body: {}", rejection.body_text()),
            )
        }
    })
}

pub(super) fn json_body(headers: &HeaderMap, body: &[u8]) -> Result<Value, ApiError> {
    if !is_json(media_type(headers).as_deref()) {
        return Err(ApiError::unsupported_media_type("application/json"));
    }
    serde_json::from_slice(body).map_err(|e| ApiError::bad_json(&e))
}

pub(crate) fn query<T: serde::de::DeserializeOwned>(uri: &Uri) -> Result<T, ApiError> {
    Query::<T>::try_from_uri(uri)
        .map(|Query(query)| query)
        .map_err(|rejection| {
            ApiError::field(
                "query",
                "type",
                format!("invalid query string: {}", rejection.body_text()),
            )
        })
}

pub(crate) fn path_id(
    path: Result<Path<String>, PathRejection>,
    what: &str,
) -> Result<String, ApiError> {
    let raw = path.map(|Path(id)| id).unwrap_or_default();
    canonical_id(&raw).ok_or_else(|| ApiError::not_found(format!("no {what} with id {raw}")))
}

/// The caller's W3C `traceparent` header, which the job's trace continues. An invalid one is
/// ignored, as the Trace Context specification says: the job starts a trace of its own.
fn trace_parent(headers: &HeaderMap) -> Option<TraceParent> {
    headers
        .get("traceparent")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse().ok())
}

/// The `Idempotency-Key` header, checked: visible ASCII, 1 to `max` bytes.
fn idempotency_header(headers: &HeaderMap, max: usize) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let Ok(text) = value.to_str() else {
        return Err(ApiError::field(
            "Idempotency-Key",
            "type",
            "must be visible ASCII",
        ));
    };
    if text.is_empty() || text.len() > max {
        return Err(ApiError::field(
            "Idempotency-Key",
            "max_length",
            format!("must be 1 to {max} bytes, got {}", text.len()),
        ));
    }
    Ok(Some(text.to_owned()))
}

/// Runs CPU-heavy parsing off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work).await.map_err(|error| {
        tracing::error!(%error, "parsing task failed");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the server log",
        )
    })
}

fn accepted<T: serde::Serialize>(location: String, body: T) -> Response {
    (
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        Json(body),
    )
        .into_response()
}

/// Submit one job.
///
/// The body is a job, nested (`{"request": {...}, "metadata": {...}}`) or flat (the request's
/// fields next to the job's). Everything is validated before anything is written. A retry with
/// the same `idempotency_key` gets the first job's id back (`created: false`). The key may
/// instead be sent as an `Idempotency-Key` header (1 to 255 bytes; given both ways, they must
/// be equal, else 422). The header is left out of the parameters below because that rule ties
/// it to the body, which a schema cannot say.
#[utoipa::path(
    post,
    path = "/v1/jobs",
    tag = "jobs",
    operation_id = "create_job",
    params(
        ("traceparent" = Option<String>, Header,
            description = "W3C Trace Context: the job's trace continues the caller's. An invalid value is ignored."),
    ),
    request_body(content = openapi::JobInput, content_type = "application/json"),
    responses(
        (status = 202, description = "Accepted (or found by its idempotency key).", body = JobAccepted,
            headers(("Location" = String, description = "The job's URL.")),
            links(
                ("GetJob" = (operation_id = "get_job", parameters(("id" = "$response.body#/id")),
                    description = "Read the job.")),
                ("CancelJob" = (operation_id = "cancel_job", parameters(("id" = "$response.body#/id")),
                    description = "Cancel the job.")),
            )),
        (status = 400, description = "The body is not JSON.", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token.", body = ErrorBody),
        (status = 413, description = "The body is too large.", body = ErrorBody),
        (status = 415, description = "The body is not `application/json`.", body = ErrorBody),
        (status = 422, description = "Invalid job: every violated rule, with its path.", body = ErrorBody),
        (status = 503, description = "Redis is unavailable.", body = ErrorBody),
    )
)]
pub(crate) async fn create_job(
    State(app): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_bytes(body, app.config.max_job_body_bytes)?;
    let value = json_body(&headers, &body)?;
    let header_key = idempotency_header(&headers, 255)?;
    let mut spec = parse_job_value(value).map_err(ApiError::from_validation)?;
    if let Some(key) = header_key {
        match &spec.idempotency_key {
            Some(own) if *own != key => {
                return Err(ApiError::field(
                    "idempotency_key",
                    "exclusive",
                    "differs from the Idempotency-Key header; give one or make them equal",
                ));
            }
            _ => spec.idempotency_key = Some(key),
        }
    }
    let accepted_job = app
        .producer
        .enqueue_traced(spec, trace_parent(&headers))
        .await?;
    Ok(accepted(
        format!("/v1/jobs/{}", accepted_job.id),
        accepted_job,
    ))
}

/// Options of a batch given in the query string.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct BatchQuery {
    /// The batch's webhook URL, kept in its info (at most 2,048 bytes).
    #[param(pattern = "^[hH][tT][tT][pP][sS]?://", max_length = 2048)]
    webhook_url: Option<String>,
    /// The batch's spending cap in USD.
    #[param(exclusive_minimum = 0)]
    budget_usd: Option<f64>,
    /// Enqueue the valid jobs and report the invalid ones (default false: reject the batch).
    partial: Option<bool>,
}

/// Submit a batch.
///
/// The body is a JSON array of jobs (`application/json`), an object `{"jobs": [...],
/// "webhook_url", "budget_usd", "partial"}` (`application/json`), or JSON Lines, one job per
/// line (`application/x-ndjson`). Options can also be given as query parameters
/// `webhook_url`, `budget_usd` and `partial` (with the rules of the object form's fields), the
/// only way for JSON Lines; an option given both ways gets 422. The query parameters are left
/// out of the parameters below because that rule ties them to the body, which a schema cannot
/// say. A batch of more than `api.max_batch_jobs` entries is refused (422, rule
/// `max_items`, naming the limit) before any entry is validated; an entry may be at most
/// `api.max_job_body_bytes` of JSON, as one job. By default a batch with any invalid job is
/// rejected whole (422, errors by entry `index`, and `line` for JSON Lines); with `partial` the
/// valid jobs are enqueued and the invalid ones listed in `rejected`. Error lists hold the
/// first 1,000 errors: `truncated` (`rejected_truncated`) says when there were more, and
/// `total_details` (`rejected_entries`) how many. An `Idempotency-Key` header makes retries
/// return the first batch's id.
#[utoipa::path(
    post,
    path = "/v1/batches",
    tag = "batches",
    operation_id = "create_batch",
    params(
        ("Idempotency-Key" = Option<String>, Header, min_length = 1, max_length = 200,
            pattern = "^[!-~]([ -~]*[!-~])?$",
            description = "Retries with the same key return the first batch. Visible ASCII (spaces inside), no control character."),
        ("traceparent" = Option<String>, Header,
            description = "W3C Trace Context: the batch's enqueue continues the caller's trace; each job gets a trace of its own, linked to it. An invalid value is ignored."),
    ),
    request_body(content(
        (openapi::BatchInput = "application/json"),
        (String = "application/x-ndjson"),
    )),
    responses(
        (status = 202, description = "Accepted (or found by its idempotency key).", body = BatchAccepted,
            headers(("Location" = String, description = "The batch's URL.")),
            links(
                ("GetBatch" = (operation_id = "get_batch", parameters(("id" = "$response.body#/id")),
                    description = "Read the batch.")),
                ("BatchJobs" = (operation_id = "batch_jobs", parameters(("id" = "$response.body#/id")),
                    description = "List the batch's jobs.")),
                ("CancelBatch" = (operation_id = "cancel_batch", parameters(("id" = "$response.body#/id")),
                    description = "Cancel the batch.")),
            )),
        (status = 400, description = "The body is not JSON (or not UTF-8).", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token.", body = ErrorBody),
        (status = 413, description = "The body is too large.", body = ErrorBody),
        (status = 415, description = "Unsupported Content-Type.", body = ErrorBody),
        (status = 422, description = "Invalid batch: too many entries (`max_items`, naming `api.max_batch_jobs`), invalid options, or errors by entry index and path (the first 1,000; `truncated` and `total_details` count the rest).", body = ErrorBody),
        (status = 503, description = "Redis is unavailable.", body = ErrorBody),
    )
)]
pub(crate) async fn create_batch(
    State(app): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_bytes(body, app.config.max_batch_body_bytes)?;
    let from_query: BatchQuery = query(&uri)?;
    let key = idempotency_header(&headers, MAX_BATCH_IDEMPOTENCY_KEY_BYTES)?;
    let media = media_type(&headers);
    let format = if is_json_lines(media.as_deref()) {
        batch_body::Format::JsonLines
    } else if is_json(media.as_deref()) {
        batch_body::Format::Json
    } else {
        return Err(ApiError::unsupported_media_type(
            "application/json or application/x-ndjson",
        ));
    };
    let limits = batch_body::Limits {
        max_batch_jobs: app.config.max_batch_jobs,
        max_entry_bytes: app.config.max_job_body_bytes,
    };
    let trace = trace_parent(&headers);
    // The body is counted and checked entry by entry, and dropped before enqueueing.
    let checked = blocking(move || {
        batch_body::check(&body, format, limits, |from_body| {
            let mut errors = ValidationErrors::default();
            let options = BatchOptions {
                webhook_url: once(
                    &mut errors,
                    "webhook_url",
                    from_query.webhook_url,
                    from_body.webhook_url,
                ),
                budget_usd: once(
                    &mut errors,
                    "budget_usd",
                    from_query.budget_usd,
                    from_body.budget_usd,
                ),
                partial: once(
                    &mut errors,
                    "partial",
                    from_query.partial,
                    from_body.partial,
                )
                .unwrap_or(false),
                idempotency_key: key,
                source: Some("api".to_owned()),
                trace,
                tenant: from_body.tenant,
                max_failure_rate: from_body.max_failure_rate,
                min_finished: from_body.min_finished,
                max_failed: from_body.max_failed,
            };
            match errors.is_empty() {
                true => Ok(options),
                false => Err(ApiError::from_validation(errors)),
            }
        })
    })
    .await??;
    // The jobs were validated as they were parsed.
    let batch = app
        .producer
        .enqueue_valid(checked.jobs, checked.rejected, checked.options)
        .await?;
    Ok(accepted(format!("/v1/batches/{}", batch.id), batch))
}

/// An option given in the query string or in the body, not both.
fn once<T>(
    errors: &mut ValidationErrors,
    name: &str,
    query: Option<T>,
    body: Option<T>,
) -> Option<T> {
    if query.is_some() && body.is_some() {
        errors.push(
            name,
            "exclusive",
            "is given both in the query string and in the body; give it once",
        );
    }
    query.or(body)
}

pub(super) fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A serde error of a small body, as one field error.
pub(super) fn serde_field_error(error: &serde_json::Error) -> ApiError {
    let text = error.to_string();
    let rule = if text.starts_with("unknown field") {
        "unknown_field"
    } else if text.starts_with("missing field") {
        "required"
    } else {
        "type"
    };
    let path = text
        .split('`')
        .nth(1)
        .filter(|_| rule != "type")
        .unwrap_or_default()
        .to_owned();
    let message = text
        .split(" at line ")
        .next()
        .unwrap_or_default()
        .to_owned();
    ApiError::field(&path, rule, message)
}

/// Read a job.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}",
    tag = "jobs",
    operation_id = "get_job",
    params(("id" = String, Path, format = "uuid", description = "The job's id.")),
    responses(
        (status = 200, description = "The job.", body = JobView),
        (status = 401, description = "Missing or wrong bearer token.", body = ErrorBody),
        (status = 404, description = "No such job (or it expired).", body = ErrorBody),
        (status = 503, description = "Redis is unavailable.", body = ErrorBody),
    )
)]
pub(crate) async fn get_job(
    State(app): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<JobView>, ApiError> {
    let id = path_id(path, "job")?;
    Ok(Json(app.producer.job(&id).await?))
}

/// Cancel a job.
///
/// A job not yet submitted to the provider never is. A job whose provider run exists is no
/// longer tracked, and its cost is committed (`cost_committed: true`): the provider has no
/// cancel. A finished job is left as it is (`cancelled: false`).
#[utoipa::path(
    post,
    path = "/v1/jobs/{id}/cancel",
    tag = "jobs",
    operation_id = "cancel_job",
    params(("id" = String, Path, format = "uuid", description = "The job's id.")),
    responses(
        (status = 200, description = "The outcome.", body = CancelResult),
        (status = 401, description = "Missing or wrong bearer token.", body = ErrorBody),
        (status = 404, description = "No such job.", body = ErrorBody),
        (status = 503, description = "Redis is unavailable.", body = ErrorBody),
    )
)]
pub(crate) async fn cancel_job(
    State(app): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<CancelResult>, ApiError> {
    let id = path_id(path, "job")?;
    Ok(Json(app.producer.cancel_job(&id).await?))
}

/// Read a batch: counts per state, cost, and `done` once every job is terminal.
#[utoipa::path(
    get,
    path = "/v1/batches/{id}",
    tag = "batches",
    operation_id = "get_batch",
    params(("id" = String, Path, format = "uuid", description = "The batch's id.")),
    responses(
        (status = 200, description = "The batch.", body = BatchView),
        (status = 401, description = "Missing or wrong bearer token.", body = ErrorBody),
        (status = 404, description = "No such batch.", body = ErrorBody),
        (status = 503, description = "Redis is unavailable.", body = ErrorBody),
    )
)]
pub(crate) async fn get_batch(
    State(app): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<BatchView>, ApiError> {
    let id = path_id(path, "batch")?;
    Ok(Json(app.producer.batch(&id).await?))
}

/// Paging through a list.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct PageQuery {
    /// Items per page, 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u64>,
    /// Items to skip: the previous page's `next_offset` (default 0).
    #[param(minimum = 0, maximum = 1000000000)]
    offset: Option<u64>,
}

impl PageQuery {
    fn checked(uri: &Uri) -> Result<(u64, u64), ApiError> {
        let page: PageQuery = query(uri)?;
        let limit = page.limit.unwrap_or(100);
        let offset = page.offset.unwrap_or(0);
        if !(1..=MAX_PAGE).contains(&limit) {
            return Err(ApiError::field(
                "limit",
                "range",
                format!("must be 1 to {MAX_PAGE}, got {limit}"),
            ));
        }
        if offset > MAX_OFFSET {
            return Err(ApiError::field(
                "offset",
                "range",
                format!("must be at most {MAX_OFFSET}, got {offset}"),
            ));
        }
        Ok((offset, limit))
    }
}

/// List a batch's jobs, in enqueue order, a page at a time.
#[utoipa::path(
    get,
    path = "/v1/batches/{id}/jobs",
    tag = "batches",
    operation_id = "batch_jobs",
    params(("id" = String, Path, format = "uuid", description = "The batch's id."), PageQuery),
    responses(
        (status = 200, description = "One page; `next_offset` is null on the last.", body = JobPage),
        (status = 401, description = "Missing or wrong bearer token.", body = ErrorBody),
        (status = 404, description = "No such batch.", body = ErrorBody),
        (status = 422, description = "Invalid paging parameters.", body = ErrorBody),
        (status = 503, description = "Redis is unavailable.", body = ErrorBody),
    )
)]
pub(crate) async fn batch_jobs(
    State(app): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    uri: Uri,
) -> Result<Json<JobPage>, ApiError> {
    let (offset, limit) = PageQuery::checked(&uri)?;
    let id = path_id(path, "batch")?;
    Ok(Json(app.producer.batch_jobs(&id, offset, limit).await?))
}

/// Cancel every unfinished job of a batch.
#[utoipa::path(
    post,
    path = "/v1/batches/{id}/cancel",
    tag = "batches",
    operation_id = "cancel_batch",
    params(("id" = String, Path, format = "uuid", description = "The batch's id.")),
    responses(
        (status = 200, description = "How many jobs were cancelled.", body = BatchCancelResult),
        (status = 401, description = "Missing or wrong bearer token.", body = ErrorBody),
        (status = 404, description = "No such batch.", body = ErrorBody),
        (status = 503, description = "Redis is unavailable.", body = ErrorBody),
    )
)]
pub(crate) async fn cancel_batch(
    State(app): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<BatchCancelResult>, ApiError> {
    let id = path_id(path, "batch")?;
    Ok(Json(app.producer.cancel_batch(&id).await?))
}

/// Resume a batch its failure guard paused.
///
/// Its held jobs are submitted again now, and the guard (`max_failed`, `max_failure_rate`)
/// counts from here. A batch that is not paused is left as it is.
#[utoipa::path(
    post,
    path = "/v1/batches/{id}/resume",
    tag = "batches",
    operation_id = "resume_batch",
    params(("id" = String, Path, format = "uuid", description = "The batch's id.")),
    responses(
        (status = 200, description = "The batch runs again.", body = BatchResumeResult),
        (status = 401, description = "Missing or wrong bearer token.", body = ErrorBody),
        (status = 404, description = "No such batch.", body = ErrorBody),
        (status = 503, description = "Redis is unavailable.", body = ErrorBody),
    )
)]
pub(crate) async fn resume_batch(
    State(app): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<BatchResumeResult>, ApiError> {
    let id = path_id(path, "batch")?;
    Ok(Json(app.producer.resume_batch(&id).await?))
}

/// List dead jobs, most recent first.
#[utoipa::path(
    get,
    path = "/v1/dead-letters",
    tag = "dead letters",
    operation_id = "dead_letters",
    params(PageQuery),
    responses(
        (status = 200, description = "One page of dead jobs.", body = JobPage),
        (status = 401, description = "Missing or wrong bearer token.", body = ErrorBody),
        (status = 422, description = "Invalid paging parameters.", body = ErrorBody),
        (status = 503, description = "Redis is unavailable.", body = ErrorBody),
    )
)]
pub(crate) async fn dead_letters(
    State(app): State<AppState>,
    uri: Uri,
) -> Result<Json<JobPage>, ApiError> {
    let (offset, limit) = PageQuery::checked(&uri)?;
    Ok(Json(app.producer.dead_letters(offset, limit).await?))
}

/// Re-drive dead jobs: `{"ids": [...]}` or `{"all": true}`.
///
/// Each job gets a new life (attempts reset) and goes back to the queue; it publishes a new
/// completion event when it finishes. Failed jobs can be re-driven by id too (for example
/// `DOWNLOAD_REFUSED` after fixing the allow-list): a job resumes from its checkpoint, so a
/// provider run it already paid for is downloaded, not paid again. `all` takes dead jobs only.
#[utoipa::path(
    post,
    path = "/v1/dead-letters/redrive",
    tag = "dead letters",
    operation_id = "redrive",
    request_body(content = RedriveRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "What was re-driven.", body = RedriveResult),
        (status = 400, description = "The body is not JSON.", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token.", body = ErrorBody),
        (status = 413, description = "The body is too large.", body = ErrorBody),
        (status = 415, description = "The body is not `application/json`.", body = ErrorBody),
        (status = 422, description = "Neither or both of `ids` and `all`, or too many ids.", body = ErrorBody),
        (status = 503, description = "Redis is unavailable.", body = ErrorBody),
    )
)]
pub(crate) async fn redrive(
    State(app): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<RedriveResult>, ApiError> {
    let body = body_bytes(body, app.config.max_job_body_bytes)?;
    let value = json_body(&headers, &body)?;
    if !value.is_object() {
        return Err(ApiError::field(
            "",
            "type",
            format!("must be a JSON object, got {}", json_kind(&value)),
        ));
    }
    let request: RedriveRequest =
        serde_json::from_value(value).map_err(|e| serde_field_error(&e))?;
    let target = match (request.ids, request.all) {
        (Some(ids), None | Some(false)) if !ids.is_empty() => {
            if ids.len() > MAX_REDRIVE_IDS {
                return Err(ApiError::field(
                    "ids",
                    "max_items",
                    format!("at most {MAX_REDRIVE_IDS} ids, got {}", ids.len()),
                ));
            }
            RedriveTarget::Ids(ids)
        }
        (None, Some(true)) => RedriveTarget::All,
        (Some(ids), Some(true)) if !ids.is_empty() => {
            return Err(ApiError::field(
                "all",
                "exclusive",
                "give either `ids` or `all: true`, not both",
            ));
        }
        _ => {
            return Err(ApiError::field(
                "ids",
                "required",
                "give `ids` (a non-empty list) or `all: true`",
            ));
        }
    };
    Ok(Json(app.producer.redrive(target).await?))
}

/// Where to start reading events.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct EventsQuery {
    /// Start after this stream cursor (`0` for every retained event); the `Last-Event-ID`
    /// header wins over it. Default: only events that come later.
    #[param(pattern = "^[0-9]{1,20}(-[0-9]{1,20})?(,[0-9]{1,20}(-[0-9]{1,20})?){0,63}$")]
    from: Option<String>,
}

/// Stream completion events (Server-Sent Events).
///
/// Each event has `id:` = the stream cursor, `event:` = its type (`job.succeeded`,
/// `job.failed`, `job.cancelled`, `batch.completed`) and `data:` = the event body as webhooks
/// carry it. Reconnect with `Last-Event-ID` to resume exactly after the last event seen. A
/// response ends after `api.events_stream_max_secs`; EventSource clients reconnect by
/// themselves.
#[utoipa::path(
    get,
    path = "/v1/events",
    tag = "events",
    operation_id = "events",
    params(
        EventsQuery,
        ("Last-Event-ID" = Option<String>, Header, pattern = "^[0-9]{1,20}(-[0-9]{1,20})?(,[0-9]{1,20}(-[0-9]{1,20})?){0,63}$",
            description = "Resume after this cursor (the last `id:` received)."),
    ),
    responses(
        (status = 200, description = "An event stream.", content_type = "text/event-stream", body = openapi::SseEvent),
        (status = 401, description = "Missing or wrong bearer token.", body = ErrorBody),
        (status = 422, description = "Invalid cursor.", body = ErrorBody),
        (status = 503, description = "Redis is unavailable, or `api.max_event_streams` streams are open; retry after `Retry-After` seconds.", body = ErrorBody),
    )
)]
pub(crate) async fn events(
    State(app): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let from_query: EventsQuery = query(&uri)?;
    let last_event_id = match headers.get("last-event-id") {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .filter(|v| app.producer.accepts_event_cursor(v))
                .ok_or_else(|| {
                    ApiError::field(
                        "Last-Event-ID",
                        "format",
                        "must be an event cursor such as 1700000000000-0 (one id per partition, comma-separated, when queue.partitions > 1)",
                    )
                })?
                .to_owned(),
        ),
    };
    if let Some(from) = &from_query.from
        && !app.producer.accepts_event_cursor(from)
    {
        return Err(ApiError::field(
            "from",
            "format",
            "must be an event cursor such as 1700000000000-0 (one id per partition, comma-separated, when queue.partitions > 1), or 0",
        ));
    }
    // Each open stream holds a Redis connection for its blocking reads: a bounded number.
    let permit = app.event_streams.clone().try_acquire_owned().map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_event_streams",
            format!(
                "{} event streams are open, the most this server allows (api.max_event_streams); retry later",
                app.config.max_event_streams
            ),
        )
    })?;
    let cursor = match last_event_id.or(from_query.from) {
        Some(cursor) => cursor,
        None => app.producer.latest_event_cursor().await?,
    };
    let deadline =
        tokio::time::Instant::now() + Duration::from_secs(app.config.events_stream_max_secs.max(1));
    let state = EventsState {
        app,
        cursor,
        buffered: std::collections::VecDeque::new(),
        _permit: permit,
    };
    let stream = futures::stream::unfold(state, move |mut state| async move {
        loop {
            if let Some(event) = state.buffered.pop_front() {
                let body = serde_json::to_string(&event.event).unwrap_or_default();
                let sse = Event::default()
                    .id(event.cursor.clone())
                    .event(event.event_type.clone())
                    .data(body);
                return Some((Ok(sse), state));
            }
            let now = tokio::time::Instant::now();
            if now >= deadline || state.app.shutdown.is_cancelled() {
                return None;
            }
            let wait = (deadline - now).min(EVENTS_POLL);
            let read = state.app.producer.events(&state.cursor, 100, Some(wait));
            let events: Vec<EventView> = tokio::select! {
                result = read => match result {
                    Ok(events) => events,
                    Err(error) => {
                        tracing::warn!(%error, "reading events failed; ending the stream");
                        return None;
                    }
                },
                () = state.app.shutdown.cancelled() => return None,
            };
            if let Some(last) = events.last() {
                state.cursor = last.cursor.clone();
            }
            state.buffered.extend(events);
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

struct EventsState {
    app: AppState,
    cursor: String,
    buffered: std::collections::VecDeque<EventView>,
    /// Released when the stream ends or the client goes away.
    _permit: tokio::sync::OwnedSemaphorePermit,
}

/// Liveness: the process answers.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "health",
    operation_id = "healthz",
    security(()),
    responses((status = 200, description = "Alive.", body = Health))
)]
pub(crate) async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".to_owned(),
    })
}

/// Readiness: Redis answers.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    operation_id = "readyz",
    security(()),
    responses(
        (status = 200, description = "Ready.", body = Health),
        (status = 503, description = "Redis does not answer.", body = ErrorBody),
    )
)]
pub(crate) async fn readyz(State(app): State<AppState>) -> Result<Json<Health>, ApiError> {
    match tokio::time::timeout(Duration::from_secs(2), app.producer.ping()).await {
        Ok(Ok(())) => Ok(Json(Health {
            status: "ok".to_owned(),
        })),
        Ok(Err(error)) => {
            tracing::warn!(%error, "readiness check failed");
            Err(unavailable())
        }
        Err(_) => Err(unavailable()),
    }
}

fn unavailable() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "Redis does not answer",
    )
}

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "health",
    operation_id = "openapi",
    security(()),
    responses((status = 200, description = "The OpenAPI 3.1 document.", body = Object))
)]
pub(crate) async fn openapi_json(State(app): State<AppState>) -> Response {
    let partitions = app.producer.queue().partitions().len();
    (
        [(header::CONTENT_TYPE, "application/json")],
        openapi::document(partitions).to_string(),
    )
        .into_response()
}

/// Unknown paths.
pub(crate) async fn not_found(uri: Uri) -> ApiError {
    ApiError::not_found(format!("no route for {}", uri.path()))
}

/// Known paths, other methods.
pub(crate) async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method; see /openapi.json",
    )
}
