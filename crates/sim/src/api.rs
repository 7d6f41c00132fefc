//! Handlers of the Runflow API surface: async runs, the sync façade, listing, balance and health.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use subtle::ConstantTimeEq;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use crate::callbacks;
use crate::config::OutputShape;
use crate::error::{ApiError, FieldError, html_error};
use crate::faults::{FaultKind, FaultToken, parse_header_tokens, parse_prompt_tokens};
use crate::server::ConnHandle;
use crate::state::{
    Admission, AfterCreate, CreateRequest, Outcome, PollFault, Run, RunSource, Sim,
    State as SimState, Status, format_usd,
};
use crate::validate::{ValidationOptions, validate_input};

/// The model the simulator imitates; other model ids are accepted and behave the same.
pub(crate) const DEFAULT_MODEL: &str = "kuaishou/kling-video/v3/pro/image-to-video";

/// A fixed organisation id, as a real account would have.
const ORG_ID: &str = "0190b6c4-5a1e-7c3d-9f00-5eed0f5eed00";

pub(crate) type SharedSim = Arc<Sim>;

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0)
}

fn rfc3339(at: OffsetDateTime) -> Value {
    at.format(&Rfc3339)
        .map(Value::String)
        .unwrap_or(Value::Null)
}

/// A callback timestamp: RFC 3339 with milliseconds and a `+00:00` offset (never `Z`), as
/// Runflow freezes it so that the signed bytes stay stable.
fn callback_timestamp(at: OffsetDateTime) -> Value {
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3][offset_hour sign:mandatory]:[offset_minute]"
    );
    at.to_offset(time::UtcOffset::UTC)
        .format(format)
        .map(Value::String)
        .unwrap_or(Value::Null)
}

/// `(failure_code, failure_message, failure_stage_code)` of a run in this status.
fn failure(status: Status, outcome: Outcome) -> Option<(&'static str, &'static str, &'static str)> {
    match (status, outcome) {
        (Status::Failed, Outcome::Moderation) => Some((
            "CONTENT_POLICY_VIOLATION",
            "The content was flagged by a content checker: prompt, start_image_url.",
            "moderation",
        )),
        (Status::Failed, Outcome::OutputModeration) => Some((
            "CONTENT_POLICY_VIOLATION",
            "The generated video was flagged by a content checker.",
            "execution",
        )),
        (Status::Failed, _) => Some((
            "PROVIDER_TIMEOUT",
            "The execution provider did not finish in time.",
            "execution",
        )),
        _ => None,
    }
}

/// Checks `Authorization: Bearer <token>` against the configured key (any non-empty token if unset).
pub(crate) fn authorize(state: &SimState, headers: &HeaderMap) -> Result<(), ApiError> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| {
            value
                .strip_prefix("Bearer ")
                .or_else(|| value.strip_prefix("bearer "))
        })
        .map(str::trim)
        .filter(|token| !token.is_empty())
        .ok_or_else(ApiError::unauthorized)?;
    match &state.config.api_key {
        Some(expected) if !bool::from(expected.as_bytes().ct_eq(token.as_bytes())) => {
            Err(ApiError::unauthorized())
        }
        _ => Ok(()),
    }
}

fn parse_json(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|error| ApiError::bad_request(format!("Malformed JSON body: {error}")))
}

/// A stable model UUID derived from the model path.
fn model_uuid(model: &str) -> Uuid {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(model.as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

/// Everything needed to render runs with freshly signed URLs.
pub(crate) struct RenderContext<'a> {
    sim: &'a Sim,
    base_url: String,
    ttl_secs: u64,
    output_shape: OutputShape,
    now: Instant,
    unix_now: u64,
}

impl<'a> RenderContext<'a> {
    pub(crate) fn new(sim: &'a Sim, state: &SimState, now: Instant) -> Self {
        Self {
            sim,
            base_url: sim.public_base(state),
            ttl_secs: state.config.url_ttl_secs,
            output_shape: state.config.output_shape,
            now,
            unix_now: unix_now(),
        }
    }

    /// A freshly signed download URL for a run's video.
    pub(crate) fn video_url(&self, run_id: Uuid) -> String {
        self.sim
            .signer
            .url(&self.base_url, run_id, self.unix_now + self.ttl_secs)
    }

    /// The fal-style `video` file object.
    pub(crate) fn video_object(&self, run: &Run) -> Value {
        json!({
            "url": self.video_url(run.id),
            "content_type": "video/mp4",
            "file_name": "out.mp4",
            "file_size": run.video.size(),
        })
    }

    fn output(&self, run: &Run) -> Value {
        if !run.has_video() {
            return json!({});
        }
        let url = self.video_url(run.id);
        let size = run.video.size();
        let outputs = json!([{
            "type": "video",
            "url": url,
            "content_type": "video/mp4",
            "file_name": "out.mp4",
            "file_size": size,
        }]);
        let video = json!({"url": url, "content_type": "video/mp4", "file_name": "out.mp4", "file_size": size});
        match self.output_shape {
            OutputShape::Both => json!({"outputs": outputs, "video": video}),
            OutputShape::Outputs => json!({"outputs": outputs}),
            OutputShape::Video => json!({"video": video}),
        }
    }

    /// The Run object of the documented async API (provider-api.md §1.4).
    pub(crate) fn run_json(&self, run: &Run) -> Value {
        let status = run.status_at(self.now);
        let started = match status {
            Status::Running | Status::Succeeded | Status::Failed => true,
            Status::Canceled => run.started_before_cancel(),
            Status::Queued | Status::Dispatching => false,
        };
        let started_at = started.then(|| rfc3339(run.created_at + run.start_offset()));
        // `completed_at - created_at == duration_ms` exactly, as in the callback envelope.
        let end_offset = run.end_offset().filter(|_| status.is_terminal());
        let completed_at = end_offset.map(|offset| rfc3339(run.created_at + offset));
        let duration_ms = end_offset.map(|offset| offset.as_millis() as u64);
        let failure = failure(status, run.outcome);
        let failure_code = failure.map(|(code, _, _)| code);
        let failure_message = failure.map(|(_, message, _)| message);
        let failure_stage = failure.map(|(_, _, stage)| stage);
        let succeeded = status == Status::Succeeded;
        let cost = run.cost_micros();
        json!({
            "id": run.id,
            "model_id": model_uuid(&run.model),
            "model": run.model,
            "target_type": "model",
            "org_id": ORG_ID,
            "status_code": status.code(),
            "source_code": match run.source { RunSource::Api => "api", RunSource::Sync => "sync" },
            "input": run.input,
            "output": if succeeded { self.output(run) } else { Value::Null },
            "context": {},
            "duration_ms": duration_ms,
            "cost": succeeded.then(|| format_usd(cost)),
            "cost_breakdown": if succeeded {
                json!({"unit": "second", "quantity": run.duration_secs, "unit_price": format_usd(run.rate_micros_per_sec())})
            } else {
                json!({})
            },
            "batch_id": null,
            "client_ref": run.client_ref,
            "request_id": run.request_id,
            "created_at": rfc3339(run.created_at),
            "started_at": started_at,
            "completed_at": completed_at,
            "finished_at": completed_at,
            "callback_url": run.callback_url,
            "metadata": run.metadata,
            "has_logs": false,
            "has_node_runs": false,
            "links": {"self": format!("/v1/runs/{}", run.id)},
            "failure_code": failure_code,
            "failure_message": failure_message,
            "failure_stage_code": failure_stage,
            "error": failure_code.map(|code| json!({"code": code, "message": failure_message})),
            "node_runs": [],
        })
    }

    /// The callback event envelope of a terminal run (provider-api.md §1.5), frozen now.
    pub(crate) fn callback_envelope(&self, run: &Run) -> Value {
        let status = run.status_at(self.now);
        let (event, output) = match status {
            Status::Succeeded => ("run.completed", self.output(run)),
            Status::Canceled => ("run.cancelled", Value::Null),
            _ => (
                "run.failed",
                failure(status, run.outcome)
                    .map(|(code, message, _)| json!({"code": code, "message": message}))
                    .unwrap_or(Value::Null),
            ),
        };
        let end_offset = run.end_offset().unwrap_or_default();
        json!({
            "event": event,
            "run_id": run.id,
            "status": status.code(),
            "output": output,
            "duration_ms": end_offset.as_millis() as u64,
            "created_at": callback_timestamp(run.created_at),
            "completed_at": callback_timestamp(run.created_at + end_offset),
            "metadata": run.metadata,
        })
    }
}

/// Reads the optional string field of the create wrapper.
fn optional_string(
    wrapper: &Map<String, Value>,
    field: &str,
    errors: &mut Vec<FieldError>,
) -> Option<String> {
    match wrapper.get(field) {
        None | Some(Value::Null) => None,
        Some(Value::String(text)) => Some(text.clone()),
        Some(_) => {
            errors.push(FieldError::new(vec![json!(field)], "must be a string"));
            None
        }
    }
}

/// Validates an input and collects the fault tokens from its prompts and the `X-Sim-Fault` header.
fn prepare_create(
    state_options: (ValidationOptions, String),
    model: String,
    source: RunSource,
    input: Value,
    headers: &HeaderMap,
    mut errors: Vec<FieldError>,
) -> Result<CreateRequest, ApiError> {
    let (options, validation_code) = state_options;
    let summary = match validate_input(&input, options) {
        Ok(summary) => Some(summary),
        Err(mut input_errors) => {
            errors.append(&mut input_errors);
            None
        }
    };
    let mut tokens: Vec<FaultToken> = Vec::new();
    if let Some(summary) = &summary {
        for prompt in &summary.prompts {
            match parse_prompt_tokens(prompt) {
                Ok(mut found) => tokens.append(&mut found),
                Err(message) => errors.push(FieldError::new(
                    vec![json!("input"), json!("prompt")],
                    message,
                )),
            }
        }
    }
    if let Some(value) = headers
        .get("x-sim-fault")
        .and_then(|value| value.to_str().ok())
    {
        match parse_header_tokens(value) {
            Ok(mut found) => tokens.append(&mut found),
            Err(message) => {
                return Err(ApiError::bad_request(format!(
                    "invalid X-Sim-Fault header: {message}"
                )));
            }
        }
    }
    match summary {
        Some(summary) if errors.is_empty() => Ok(CreateRequest {
            model,
            source,
            input,
            summary,
            client_ref: None,
            metadata: None,
            callback_url: None,
            tokens,
        }),
        _ => Err(ApiError::validation(&validation_code, errors)),
    }
}

/// Ends the request by closing the TCP connection without any HTTP response.
async fn drop_connection(connection: Option<Extension<ConnHandle>>) -> Response {
    match connection {
        Some(Extension(connection)) => {
            connection.kill();
            std::future::pending().await
        }
        // Without the simulator's own accept loop there is no socket to close.
        None => html_error(StatusCode::BAD_GATEWAY),
    }
}

fn validation_settings(state: &SimState) -> (ValidationOptions, String) {
    (
        ValidationOptions {
            lenient_duration: state.config.lenient_duration,
            allow_unknown_fields: state.config.allow_unknown_fields,
        },
        state.config.validation_error_code.clone(),
    )
}

/// `POST /v1/models/{model...}/runs`: create an async run.
pub(crate) async fn create_run(
    State(sim): State<SharedSim>,
    Path(path): Path<String>,
    connection: Option<Extension<ConnHandle>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let settings = {
        let mut state = sim.lock();
        state.stats.creates += 1;
        if let Err(error) = authorize(&state, &headers) {
            return error.into_response();
        }
        validation_settings(&state)
    };
    let Some(model) = path.strip_suffix("/runs").filter(|model| !model.is_empty()) else {
        return ApiError::not_found().into_response();
    };
    let body = match parse_json(&body) {
        Ok(body) => body,
        Err(error) => return error.into_response(),
    };
    let Value::Object(mut wrapper) = body else {
        return ApiError::validation(
            &settings.1,
            vec![FieldError::new(vec![json!("body")], "must be an object")],
        )
        .into_response();
    };
    let mut errors = Vec::new();
    let client_ref = optional_string(&wrapper, "client_ref", &mut errors);
    let callback_url = optional_string(&wrapper, "callback_url", &mut errors);
    if let Some(url) = &callback_url
        && !(url.starts_with("http://") || url.starts_with("https://"))
    {
        errors.push(FieldError::new(
            vec![json!("callback_url")],
            "must be an http(s) URL",
        ));
    }
    let metadata = match wrapper.remove("metadata") {
        None | Some(Value::Null) => None,
        Some(value @ Value::Object(_)) => Some(value),
        Some(_) => {
            errors.push(FieldError::new(
                vec![json!("metadata")],
                "must be an object or null",
            ));
            None
        }
    };
    let Some(input) = wrapper.remove("input") else {
        errors.push(FieldError::new(vec![json!("input")], "field required"));
        return ApiError::validation(&settings.1, errors).into_response();
    };
    let mut request = match prepare_create(
        settings,
        model.to_owned(),
        RunSource::Api,
        input,
        &headers,
        errors,
    ) {
        Ok(request) => request,
        Err(error) => return error.into_response(),
    };
    request.client_ref = client_ref;
    request.metadata = metadata;
    request.callback_url = callback_url;
    if let Some(echo) = echo_auth(&request.tokens, &headers) {
        return echo;
    }

    let (admission, body) = {
        let mut state = sim.lock();
        let now = Instant::now();
        let admission = state.admit(request, now);
        let body = match &admission {
            Admission::Created { run_id, .. } => state
                .run(*run_id)
                .map(|run| RenderContext::new(&sim, &state, now).run_json(run)),
            Admission::Rejected(_) => None,
        };
        (admission, body)
    };
    match admission {
        Admission::Rejected(response) => response,
        Admission::Created { run_id, after } => {
            tracing::debug!(%run_id, ?after, "sim created run");
            callbacks::schedule(&sim, run_id);
            let created = (StatusCode::CREATED, Json(body.unwrap_or(Value::Null)));
            match after {
                AfterCreate::Respond => created.into_response(),
                AfterCreate::Slow(delay) => {
                    tokio::time::sleep(delay).await;
                    created.into_response()
                }
                AfterCreate::GatewayTimeout => html_error(StatusCode::GATEWAY_TIMEOUT),
                AfterCreate::Lost => drop_connection(connection).await,
            }
        }
    }
}

/// `POST /v1/run/{model...}`: the synchronous façade, holding the connection until the run ends.
/// The flat body has no room for a `client_ref`; klingq sends it as a query parameter
/// (`?client_ref=`), which the simulator records so a lost response can be reconciled.
pub(crate) async fn run_sync(
    State(sim): State<SharedSim>,
    Path(model): Path<String>,
    Query(params): Query<HashMap<String, String>>,
    connection: Option<Extension<ConnHandle>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let settings = {
        let mut state = sim.lock();
        state.stats.sync_calls += 1;
        if let Err(error) = authorize(&state, &headers) {
            return error.into_response();
        }
        validation_settings(&state)
    };
    let input = match parse_json(&body) {
        Ok(input) => input,
        Err(error) => return error.into_response(),
    };
    let request = match prepare_create(
        settings,
        model,
        RunSource::Sync,
        input,
        &headers,
        Vec::new(),
    ) {
        Ok(mut request) => {
            request.client_ref = params.get("client_ref").cloned();
            request
        }
        Err(error) => return error.into_response(),
    };
    if let Some(echo) = echo_auth(&request.tokens, &headers) {
        return echo;
    }
    let (admission, terminal, wake) = {
        let mut state = sim.lock();
        let admission = state.admit(request, Instant::now());
        let run = match &admission {
            Admission::Created { run_id, .. } => state.run(*run_id),
            Admission::Rejected(_) => None,
        };
        let terminal = run.and_then(Run::terminal_instant);
        let wake = run.map(|run| run.wake.clone()).unwrap_or_default();
        (admission, terminal, wake)
    };
    let (run_id, after) = match admission {
        Admission::Rejected(response) => return response,
        Admission::Created { run_id, after } => (run_id, after),
    };
    match terminal {
        Some(terminal) => tokio::select! {
            () = tokio::time::sleep_until(tokio::time::Instant::from_std(terminal)) => {}
            // A cancellation (or a reset) ends the wait early.
            () = wake.cancelled() => {}
        },
        // A stuck run never answers, unless cancelled; a lost response on it drops the
        // connection at once.
        None if after == AfterCreate::Lost => return drop_connection(connection).await,
        None => wake.cancelled().await,
    }
    if let AfterCreate::Slow(delay) = after {
        tokio::time::sleep(delay).await;
    }
    // Settle before answering, so the charge exists even if the response is lost.
    let response = {
        let mut state = sim.lock();
        let now = Instant::now();
        state.settle(now);
        let context = RenderContext::new(&sim, &state, now);
        match state.run(run_id) {
            None => ApiError::run_not_found().into_response(),
            Some(run) if run.status_at(now) == Status::Canceled => ApiError::new(
                StatusCode::CONFLICT,
                "RUN_CANCELLED",
                "The run was cancelled.",
            )
            .into_response(),
            Some(run) => match run.outcome {
                Outcome::Succeed => {
                    Json(json!({"video": context.video_object(run)})).into_response()
                }
                Outcome::NoUrl => Json(json!({})).into_response(),
                Outcome::Moderation | Outcome::OutputModeration => {
                    let mut error = ApiError::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "CONTENT_POLICY_VIOLATION",
                        "The content was flagged by a content checker.",
                    );
                    error.errors = Some(vec![FieldError::new(
                        vec![json!("input"), json!("prompt")],
                        "The content was flagged by a content checker.",
                    )]);
                    error.into_response()
                }
                Outcome::ProviderTimeout | Outcome::Stuck => ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "PROVIDER_TIMEOUT",
                    "The execution provider did not finish in time.",
                )
                .into_response(),
            },
        }
    };
    match after {
        AfterCreate::Lost => drop_connection(connection).await,
        AfterCreate::GatewayTimeout => html_error(StatusCode::GATEWAY_TIMEOUT),
        AfterCreate::Respond | AfterCreate::Slow(_) => response,
    }
}

/// `GET /v1/runs/{id}`: the run with a freshly signed URL, unless a poll fault applies.
pub(crate) async fn get_run(
    State(sim): State<SharedSim>,
    Path(id): Path<String>,
    connection: Option<Extension<ConnHandle>>,
    headers: HeaderMap,
) -> Response {
    let outcome = {
        let mut state = sim.lock();
        state.stats.polls += 1;
        if let Err(error) = authorize(&state, &headers) {
            return error.into_response();
        }
        let now = Instant::now();
        state.settle(now);
        match Uuid::parse_str(&id)
            .ok()
            .filter(|run_id| state.run(*run_id).is_some())
        {
            None => Err(PollFault::NotFound),
            Some(run_id) => match state.poll_fault(run_id, now) {
                Some(fault) => Err(fault),
                None => Ok(state
                    .run(run_id)
                    .map(|run| RenderContext::new(&sim, &state, now).run_json(run))
                    .unwrap_or(Value::Null)),
            },
        }
    };
    match outcome {
        Ok(body) => Json(body).into_response(),
        Err(PollFault::NotFound) => ApiError::run_not_found().into_response(),
        Err(PollFault::Reset) => drop_connection(connection).await,
        Err(PollFault::ServerError(status, true)) => html_error(status),
        Err(PollFault::ServerError(status, false)) => {
            let code = if status == StatusCode::SERVICE_UNAVAILABLE {
                "SERVICE_UNAVAILABLE"
            } else {
                "INTERNAL_ERROR"
            };
            ApiError::new(
                status,
                code,
                "The service is temporarily unavailable. Retry with backoff.",
            )
            .into_response()
        }
    }
}

/// One `q` term of `GET /v1/runs`.
#[derive(Debug, PartialEq)]
enum Filter {
    Equals(String, String),
    CreatedAfter(OffsetDateTime),
    CreatedBefore(OffsetDateTime),
}

fn parse_timestamp(text: &str) -> Option<OffsetDateTime> {
    if let Ok(at) = OffsetDateTime::parse(text, &Rfc3339) {
        return Some(at);
    }
    let date = time::Date::parse(
        text,
        time::macros::format_description!("[year]-[month]-[day]"),
    )
    .ok()?;
    Some(date.midnight().assume_utc())
}

fn unquote(text: &str) -> String {
    let text = text.trim();
    text.strip_prefix('"')
        .and_then(|inner| inner.strip_suffix('"'))
        .unwrap_or(text)
        .to_owned()
}

/// Parses the minimal `q` syntax: terms joined by ` AND `; `field:value`, `created_at>t`, `created_at<t`.
fn parse_query(q: &str) -> Result<Vec<Filter>, String> {
    let mut filters = Vec::new();
    for term in q.split(" AND ").flat_map(|part| part.split(" and ")) {
        let term = term.trim();
        if term.is_empty() {
            continue;
        }
        let comparison = term.find(['>', '<']);
        let colon = term.find(':');
        let filter = match (comparison, colon) {
            (Some(at), colon) if colon.is_none_or(|colon| at < colon) => {
                let (field, value) = (&term[..at], &term[at + 1..]);
                if field.trim() != "created_at" {
                    return Err(format!("unsupported comparison filter: {term}"));
                }
                let at_time = parse_timestamp(&unquote(value))
                    .ok_or_else(|| format!("invalid timestamp in filter: {term}"))?;
                if term.as_bytes()[at] == b'>' {
                    Filter::CreatedAfter(at_time)
                } else {
                    Filter::CreatedBefore(at_time)
                }
            }
            (_, Some(at)) => {
                let field = term[..at].trim();
                if !["client_ref", "status_code", "model", "id"].contains(&field) {
                    return Err(format!("unsupported filter field: {field}"));
                }
                Filter::Equals(field.to_owned(), unquote(&term[at + 1..]))
            }
            _ => return Err(format!("cannot parse filter term: {term}")),
        };
        filters.push(filter);
    }
    Ok(filters)
}

fn matches(run: &Run, status: Status, filters: &[Filter]) -> bool {
    filters.iter().all(|filter| match filter {
        Filter::Equals(field, value) => match field.as_str() {
            "client_ref" => run.client_ref.as_deref() == Some(value.as_str()),
            "status_code" => status.code() == value,
            "model" => run.model == *value,
            _ => run.id.to_string() == *value,
        },
        Filter::CreatedAfter(at) => run.created_at > *at,
        Filter::CreatedBefore(at) => run.created_at < *at,
    })
}

/// `GET /v1/runs?q=...&limit=...&sort_by=created_at:desc`.
pub(crate) async fn list_runs(
    State(sim): State<SharedSim>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let mut state = sim.lock();
    state.stats.lists += 1;
    if let Err(error) = authorize(&state, &headers) {
        return error.into_response();
    }
    let filters = match parse_query(params.get("q").map(String::as_str).unwrap_or("")) {
        Ok(filters) => filters,
        Err(message) => return ApiError::bad_request(message).into_response(),
    };
    let limit = match params.get("limit").map(|limit| limit.parse::<usize>()) {
        None => 50,
        Some(Ok(limit)) if (1..=500).contains(&limit) => limit,
        Some(_) => {
            let code = state.config.validation_error_code.clone();
            return ApiError::validation(
                &code,
                vec![FieldError::new(
                    vec![json!("query"), json!("limit")],
                    "limit must be between 1 and 500",
                )],
            )
            .into_response();
        }
    };
    let ascending = match params.get("sort_by").map(String::as_str) {
        None | Some("created_at:desc") => false,
        Some("created_at:asc") => true,
        Some(other) => {
            return ApiError::bad_request(format!("unsupported sort_by: {other}")).into_response();
        }
    };
    let now = Instant::now();
    state.settle(now);
    let context = RenderContext::new(&sim, &state, now);
    let selected: Vec<&Run> = if ascending {
        state
            .runs_in_order()
            .filter(|run| matches(run, run.status_at(now), &filters))
            .take(limit)
            .collect()
    } else {
        state
            .runs_in_order()
            .rev()
            .filter(|run| matches(run, run.status_at(now), &filters))
            .take(limit)
            .collect()
    };
    let data: Vec<Value> = selected
        .into_iter()
        .map(|run| context.run_json(run))
        .collect();
    Json(json!({"data": data, "limit": limit, "next_pq": null, "prev_pq": null})).into_response()
}

/// `POST /v1/admin/runs/{id}/cancellation` with an optional `{"reason": "..."}` (3–500 chars):
/// the admin-only cancel (provider-api.md §1.8). 201 with the run on a real transition, 200 with
/// the unchanged run when it was already terminal. The job goes on and is billed if it succeeds;
/// the run's callback (`run.cancelled`) is sent at once.
pub(crate) async fn cancel_run(
    State(sim): State<SharedSim>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut state = sim.lock();
    state.stats.cancellations += 1;
    if let Err(error) = authorize(&state, &headers) {
        return error.into_response();
    }
    if !body.iter().all(u8::is_ascii_whitespace) {
        let reason = match parse_json(&body) {
            Ok(Value::Object(mut wrapper)) => wrapper.remove("reason"),
            Ok(_) => {
                let code = state.config.validation_error_code.clone();
                return ApiError::validation(
                    &code,
                    vec![FieldError::new(vec![json!("body")], "must be an object")],
                )
                .into_response();
            }
            Err(error) => return error.into_response(),
        };
        let valid = match &reason {
            None | Some(Value::Null) => true,
            Some(Value::String(reason)) => (3..=500).contains(&reason.chars().count()),
            Some(_) => false,
        };
        if !valid {
            let code = state.config.validation_error_code.clone();
            return ApiError::validation(
                &code,
                vec![FieldError::new(
                    vec![json!("body"), json!("reason")],
                    "reason must be a string of 3 to 500 characters",
                )],
            )
            .into_response();
        }
    }
    let now = Instant::now();
    state.settle(now);
    let Some(run_id) = Uuid::parse_str(&id)
        .ok()
        .filter(|run_id| state.run(*run_id).is_some())
    else {
        return ApiError::run_not_found().into_response();
    };
    let changed = state.cancel(run_id, now).unwrap_or(false);
    if changed {
        tracing::debug!(%run_id, "sim cancelled run");
    }
    let body = state
        .run(run_id)
        .map(|run| RenderContext::new(&sim, &state, now).run_json(run))
        .unwrap_or(Value::Null);
    let status = if changed {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    (status, Json(body)).into_response()
}

/// `GET /v1/runs/statuses`.
pub(crate) async fn statuses(State(sim): State<SharedSim>, headers: HeaderMap) -> Response {
    if let Err(error) = authorize(&sim.lock(), &headers) {
        return error.into_response();
    }
    Json(json!([
        "queued",
        "dispatching",
        "running",
        "succeeded",
        "failed",
        "canceled",
        "partial_succeeded"
    ]))
    .into_response()
}

/// `GET /v1/health`: no authentication, like a load balancer probe.
pub(crate) async fn health(State(sim): State<SharedSim>) -> Response {
    sim.lock().stats.health_checks += 1;
    Json(json!({"status": "ok"})).into_response()
}

/// `GET /v1/auth/me`: the account behind the key.
pub(crate) async fn auth_me(State(sim): State<SharedSim>, headers: HeaderMap) -> Response {
    if let Err(error) = authorize(&sim.lock(), &headers) {
        return error.into_response();
    }
    Json(json!({"id": ORG_ID, "org_id": ORG_ID, "name": "klingq simulator"})).into_response()
}

/// `GET /v1/billing/balance` → `{"balance_cents", "currency"}` after settling finished runs.
pub(crate) async fn balance(State(sim): State<SharedSim>, headers: HeaderMap) -> Response {
    let mut state = sim.lock();
    state.stats.balance_reads += 1;
    if let Err(error) = authorize(&state, &headers) {
        return error.into_response();
    }
    state.settle(Instant::now());
    let cents = state.balance_micros().div_euclid(10_000);
    Json(json!({"balance_cents": cents, "currency": "USD"})).into_response()
}

/// Any other path: the Runflow 404 envelope.
pub(crate) async fn fallback() -> Response {
    ApiError::not_found().into_response()
}

/// The `echo-auth` fault: a careless provider (or a proxy in front of it) that echoes the
/// request's `Authorization` header into its error body, as some do.
fn echo_auth(tokens: &[FaultToken], headers: &HeaderMap) -> Option<Response> {
    if !tokens.iter().any(|token| token.kind == FaultKind::EchoAuth) {
        return None;
    }
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    Some(
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
            format!("could not process the request sent with Authorization: {authorization}"),
        )
        .into_response(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_reconciliation_queries() {
        let filters = parse_query(
            "client_ref:\"job-1:2\" AND status_code:succeeded AND created_at>2026-04-01",
        )
        .unwrap();
        assert_eq!(
            filters[0],
            Filter::Equals("client_ref".to_owned(), "job-1:2".to_owned())
        );
        assert_eq!(
            filters[1],
            Filter::Equals("status_code".to_owned(), "succeeded".to_owned())
        );
        assert!(matches!(filters[2], Filter::CreatedAfter(_)));
        let rfc = parse_query("created_at>2026-04-01T10:00:00Z").unwrap();
        assert!(matches!(rfc[0], Filter::CreatedAfter(_)));
        assert!(parse_query("colour:blue").is_err());
        assert!(parse_query("created_at>yesterday").is_err());
    }
}
