//! What users see of jobs, batches, events and errors: one set of types, serialized the same
//! way by the CLI's `--json` and the HTTP API, and described in the OpenAPI document.
//!
//! Times are RFC 3339 strings; money is USD as a number; absent nested objects are `null`.

use std::collections::BTreeMap;

use klingq_core::cost::micros_to_usd;
use klingq_core::job::format_ms;
use klingq_core::{
    Checkpoint, FieldError, JobError, JobSpec, JobState, Priority, StoredVideo, redact_url,
};
use klingq_queue::{BatchRecord, JobRecord, StoredEvent};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use utoipa::openapi::schema::{ObjectBuilder, Type};

/// A job as users see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobView {
    #[schema(format = "uuid")]
    pub id: String,
    #[schema(schema_with = state_schema)]
    pub state: JobState,
    /// The batch the job belongs to, if any.
    pub batch_id: Option<String>,
    /// Deliveries to a worker so far in this life (a re-drive starts a new life).
    pub attempts: u32,
    pub max_attempts: u32,
    /// Times the job was re-driven from the dead letters.
    pub redrives: u32,
    #[schema(schema_with = priority_schema)]
    pub priority: Priority,
    /// The customer the job is for (`default` when it named none).
    pub tenant: String,
    #[schema(format = DateTime)]
    pub created_at: String,
    #[schema(format = DateTime)]
    pub updated_at: String,
    /// When a worker first took the job.
    #[schema(format = DateTime)]
    pub started_at: Option<String>,
    /// When the job reached a terminal state.
    #[schema(format = DateTime)]
    pub finished_at: Option<String>,
    /// When a scheduled job becomes due (not-before time, retry backoff).
    #[schema(format = DateTime)]
    pub run_at: Option<String>,
    /// Why the job is in its state, in words.
    pub reason: Option<String>,
    /// The user's metadata, as given at enqueue.
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Value>,
    /// The job's webhook URL, with any query string redacted.
    pub webhook_url: Option<String>,
    pub idempotency_key: Option<String>,
    /// The generation request, as sent to the provider.
    #[schema(value_type = Option<Object>)]
    pub request: Option<Value>,
    /// Seconds of video the request bills for.
    pub duration_seconds: Option<u32>,
    pub estimated_usd: f64,
    pub charged_usd: f64,
    /// Where the job stands with the provider; `null` before it was submitted.
    pub provider: Option<ProviderView>,
    /// The stored video; `null` until it is stored.
    pub video: Option<VideoView>,
    /// Why the job failed, was cancelled or died; `null` otherwise.
    pub error: Option<ErrorView>,
    /// The id of the job's trace (W3C Trace Context, 32 hex digits): its enqueue, attempts and
    /// webhook deliveries, in a tracing backend and in the logs' `trace_id`.
    #[schema(pattern = "^[0-9a-f]{32}$")]
    pub trace_id: Option<String>,
    /// Milliseconds spent per pipeline step (`submit`, `generate`, `download`, `upload`,
    /// `publish`), as the worker recorded them.
    pub step_ms: BTreeMap<String, u64>,
    /// The states the job went through, oldest first: its creation, each state a delivery
    /// entered (with its attempt, and why when a retry was scheduled), and the state it is in.
    pub timeline: Vec<TimelineView>,
}

/// A state a job entered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TimelineView {
    #[schema(schema_with = state_schema)]
    pub state: JobState,
    #[schema(format = DateTime)]
    pub at: String,
    /// The delivery attempt it happened in; 0 before the first delivery.
    pub attempt: u32,
    /// Why, in words, when there is more to say than the state.
    pub reason: Option<String>,
}

/// The provider run of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ProviderView {
    /// The provider's run id, once the run exists.
    pub run_id: Option<String>,
    /// The run's last known status, as the provider spells it.
    pub status: Option<String>,
    #[schema(format = DateTime)]
    pub submitted_at: Option<String>,
    /// Create requests sent for this job (all under the same client reference).
    pub creates: u32,
    /// The provider's cost for the run, when it reported one.
    pub cost_usd: Option<f64>,
    /// Whether the run finished successfully.
    pub finished: bool,
}

/// The re-hosted video.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VideoView {
    pub bucket: String,
    pub key: String,
    /// A presigned or public URL of the video.
    pub url: String,
    pub size: u64,
    /// Hex SHA-256 of the video's bytes.
    pub sha256: String,
    pub content_type: String,
}

/// Why a job failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ErrorView {
    /// The pipeline step: `submit`, `generate`, `download`, `upload`, `publish` or `queue`.
    pub step: String,
    /// A stable code, e.g. `CONTENT_POLICY_VIOLATION`, `CANCELLED`, `UNDECODABLE_PAYLOAD`.
    pub code: String,
    pub message: String,
    /// Field errors the provider returned, when it did.
    #[schema(value_type = Vec<Object>)]
    pub details: Vec<Value>,
    /// Whether the provider cost is already committed (a run was created).
    pub cost_committed: bool,
}

impl From<StoredVideo> for VideoView {
    fn from(video: StoredVideo) -> Self {
        Self {
            bucket: video.bucket,
            key: video.key,
            url: video.url,
            size: video.size,
            sha256: video.sha256,
            content_type: video.content_type,
        }
    }
}

impl From<JobError> for ErrorView {
    fn from(error: JobError) -> Self {
        Self {
            step: error.step,
            code: error.code,
            message: error.message,
            details: error.details,
            cost_committed: error.cost_committed,
        }
    }
}

impl JobView {
    /// The view of a record read from the queue.
    pub fn from_record(mut record: JobRecord) -> Self {
        let spec = serde_json::from_value::<JobSpec>(record.payload.clone()).ok();
        let checkpoint = record
            .checkpoint
            .take()
            .and_then(|c| serde_json::from_value::<Checkpoint>(c).ok())
            .unwrap_or_default();
        let timeline = timeline(&record, &checkpoint);
        let provider = &checkpoint.provider;
        let provider = (provider.run_id.is_some()
            || provider.submitted_at_ms.is_some()
            || provider.creates > 0)
            .then(|| ProviderView {
                run_id: provider.run_id.clone(),
                status: provider.status.clone(),
                submitted_at: provider.submitted_at_ms.map(format_ms),
                creates: provider.creates,
                cost_usd: provider.cost_usd,
                finished: provider.finished,
            });
        let updated_ms = if record.updated_ms > 0 {
            record.updated_ms
        } else {
            record.created_ms
        };
        JobView {
            id: record.id,
            state: record.state,
            batch_id: record.batch_id,
            attempts: record.attempts,
            max_attempts: record.max_attempts,
            redrives: record.redrives,
            priority: record.priority,
            tenant: spec
                .as_ref()
                .map_or(klingq_core::DEFAULT_TENANT, |s| s.tenant())
                .to_owned(),
            created_at: format_ms(record.created_ms),
            updated_at: format_ms(updated_ms),
            started_at: record.started_ms.map(format_ms),
            finished_at: record.finished_ms.map(format_ms),
            run_at: record
                .run_at_ms
                .filter(|_| !record.state.is_terminal())
                .map(format_ms),
            reason: record.reason,
            metadata: spec.as_ref().and_then(|s| s.metadata.clone()),
            webhook_url: spec
                .as_ref()
                .and_then(|s| s.webhook_url.as_deref())
                .map(redact_url),
            idempotency_key: record.idempotency_key,
            request: spec
                .as_ref()
                .and_then(|s| serde_json::to_value(&s.request).ok()),
            duration_seconds: spec.as_ref().map(|s| s.request.billed_seconds()),
            estimated_usd: micros_to_usd(record.estimated_micros),
            charged_usd: micros_to_usd(record.charged_micros),
            provider,
            video: checkpoint.video.map(VideoView::from),
            error: record.error.map(ErrorView::from),
            trace_id: record.trace.map(|trace| trace.trace_id_hex()),
            step_ms: checkpoint.step_ms,
            timeline,
        }
    }
}

/// A job's timeline: created (queued, or scheduled for later), the states its deliveries
/// entered (kept in its checkpoint), and the state it is in when that is not the last one.
fn timeline(record: &JobRecord, checkpoint: &Checkpoint) -> Vec<TimelineView> {
    let first = match record.run_at_ms {
        Some(run_at) if run_at > record.created_ms && record.attempts == 0 => JobState::Scheduled,
        _ => JobState::Queued,
    };
    let mut views = vec![TimelineView {
        state: first,
        at: format_ms(record.created_ms),
        attempt: 0,
        reason: None,
    }];
    views.extend(checkpoint.timeline.iter().map(|entry| TimelineView {
        state: entry.state,
        at: format_ms(entry.at_ms),
        attempt: entry.attempt,
        reason: entry.reason.clone(),
    }));
    let last = checkpoint.timeline.last();
    let last_state = last.map_or(first, |entry| entry.state);
    if last_state != record.state {
        let at_ms = record
            .finished_ms
            .filter(|_| record.state.is_terminal())
            .unwrap_or(record.updated_ms.max(record.created_ms));
        views.push(TimelineView {
            state: record.state,
            at: format_ms(at_ms),
            attempt: record.attempts,
            reason: record.reason.clone().filter(|r| !r.is_empty()),
        });
    }
    views
}

/// A batch as users see it. The queue keeps its counters as its jobs move.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BatchView {
    #[schema(format = "uuid")]
    pub id: String,
    /// Jobs in the batch.
    pub total: u64,
    /// Jobs per state; every state is listed, with 0 when no job is in it.
    pub counts: BTreeMap<String, u64>,
    /// Jobs in a terminal state (succeeded, failed, cancelled, dead).
    pub terminal: u64,
    /// Jobs a worker holds now (submitting through publishing).
    pub in_flight: u64,
    /// Every job is enqueued and terminal.
    pub done: bool,
    /// Every job of the batch has been enqueued.
    pub sealed: bool,
    pub estimated_usd: f64,
    pub charged_usd: f64,
    /// The batch's spending cap, if it has one.
    pub budget_usd: Option<f64>,
    /// The batch's webhook URL, with any query string redacted.
    pub webhook_url: Option<String>,
    /// The tenant of its jobs (`default` when the batch named none).
    #[schema(pattern = "^[A-Za-z0-9_-]{1,64}$")]
    pub tenant: String,
    #[schema(format = DateTime)]
    pub created_at: String,
    #[schema(format = DateTime)]
    pub finished_at: Option<String>,
    /// Its failure guard (`max_failed`, `max_failure_rate`) stopped its submissions: resume
    /// or cancel it.
    pub paused: bool,
    /// Why it paused.
    pub pause_reason: Option<String>,
    /// An estimate of when it finishes and what its remaining jobs cost.
    pub eta: EtaView,
}

/// A batch's estimated finish: from the mean time of its finished runs, the provider slots
/// it holds now (its tenant's current share) and the jobs left. An estimate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EtaView {
    /// Always true: this is an estimate.
    pub estimate: bool,
    /// Seconds until its last job is expected to finish; absent until one of its runs ended
    /// or while none of its jobs holds a provider slot.
    pub remaining_secs: Option<f64>,
    /// When it is expected to finish.
    #[schema(format = DateTime)]
    pub finish_at: Option<String>,
    /// The estimated cost of its jobs left, in USD.
    pub remaining_usd: f64,
    /// Its runs' mean time from create to end, in seconds.
    pub mean_run_secs: Option<f64>,
    /// Provider slots its jobs hold now.
    pub slots_now: u64,
    /// What the time rests on: `fair_share` (every tenant's jobs left played forward
    /// through the provider's slots, shared as the scheduler shares them), `slots_now` (the
    /// batch keeps the slots it holds now) or `paused` (no time until it is resumed).
    #[schema(pattern = "^(fair_share|slots_now|paused)$")]
    pub basis: String,
}

impl From<klingq_core::BatchEta> for EtaView {
    fn from(eta: klingq_core::BatchEta) -> Self {
        EtaView {
            estimate: eta.estimate,
            remaining_secs: eta.remaining_secs,
            finish_at: eta.finish_at_ms.map(format_ms),
            remaining_usd: eta.remaining_usd,
            mean_run_secs: eta.mean_run_secs,
            slots_now: eta.slots_now,
            basis: eta.basis.as_str().to_owned(),
        }
    }
}

impl BatchView {
    /// The view of `record`; its ETA plays the fair share forward over `provider`, when
    /// given ([`crate::Producer::provider_load`]).
    pub fn from_record(record: BatchRecord, provider: Option<&klingq_core::ProviderLoad>) -> Self {
        let eta = EtaView::from(record.eta(klingq_core::job::now_ms(), provider));
        let mut counts: BTreeMap<String, u64> = JobState::ALL
            .iter()
            .map(|state| (state.as_str().to_owned(), 0))
            .collect();
        for (state, count) in record.counts {
            counts.insert(state, count);
        }
        let in_flight = JobState::ALL
            .iter()
            .filter(|state| state.is_active())
            .map(|state| counts.get(state.as_str()).copied().unwrap_or(0))
            .sum();
        BatchView {
            id: record.id,
            total: record.total,
            counts,
            terminal: record.terminal,
            in_flight,
            done: record.done,
            sealed: record.sealed,
            estimated_usd: micros_to_usd(record.estimated_micros),
            charged_usd: micros_to_usd(record.charged_micros),
            budget_usd: (record.budget_micros > 0).then(|| micros_to_usd(record.budget_micros)),
            webhook_url: record
                .info
                .get("webhook_url")
                .and_then(Value::as_str)
                .map(redact_url),
            tenant: record
                .info
                .get("tenant")
                .and_then(Value::as_str)
                .unwrap_or(klingq_core::DEFAULT_TENANT)
                .to_owned(),
            created_at: format_ms(record.created_ms),
            finished_at: record.finished_ms.map(format_ms),
            paused: record.paused,
            pause_reason: record.pause_reason,
            eta,
        }
    }

    /// Jobs in `state`.
    pub fn count(&self, state: JobState) -> u64 {
        self.counts.get(state.as_str()).copied().unwrap_or(0)
    }
}

/// A job was accepted (or an earlier one with the same idempotency key was found).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobAccepted {
    #[schema(format = "uuid")]
    pub id: String,
    /// False when the idempotency key matched an earlier job, whose id this is.
    pub created: bool,
    pub estimated_usd: f64,
}

/// A batch was accepted (or an earlier one with the same idempotency key was found).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BatchAccepted {
    #[schema(format = "uuid")]
    pub id: String,
    /// False when the idempotency key matched an earlier batch, whose id this is.
    pub created: bool,
    /// Jobs in the batch.
    pub total: u64,
    /// Valid entries whose own idempotency key matched an earlier job (not added again).
    pub deduplicated: u64,
    /// Errors of the invalid entries left out (only with `partial`): the first 1,000.
    pub rejected: Vec<ErrorDetail>,
    /// Invalid entries left out (only with `partial`).
    #[serde(default)]
    #[schema(required = true)]
    pub rejected_entries: u64,
    /// Whether `rejected` lists only the first 1,000 errors of the entries left out.
    #[serde(default)]
    #[schema(required = true)]
    pub rejected_truncated: bool,
    /// Estimated cost of the batch's jobs.
    pub estimated_usd: f64,
    pub budget_usd: Option<f64>,
}

/// The outcome of cancelling one job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CancelResult {
    #[schema(format = "uuid")]
    pub id: String,
    /// False when the job had already finished: nothing changed.
    pub cancelled: bool,
    /// The state the job was in.
    #[schema(schema_with = state_schema)]
    pub previous_state: JobState,
    /// The state it is in now.
    #[schema(schema_with = state_schema)]
    pub state: JobState,
    /// True when a provider run already exists: the run is not stopped (the provider has no
    /// cancel) and its cost is committed; klingq only stops tracking it.
    pub cost_committed: bool,
}

/// The outcome of cancelling a batch's unfinished jobs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BatchCancelResult {
    #[schema(format = "uuid")]
    pub id: String,
    /// Jobs cancelled now.
    pub cancelled: u64,
    /// Of those, jobs whose provider run already existed (cost committed).
    pub cost_committed: u64,
    /// Jobs that had already finished.
    pub already_terminal: u64,
}

/// The outcome of resuming a batch its failure guard paused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BatchResumeResult {
    #[schema(format = "uuid")]
    pub id: String,
    /// Whether it was paused (a resume of a running batch changes nothing).
    pub was_paused: bool,
    /// Held jobs submitted again now.
    pub resumed: u64,
}

/// Re-drive some dead jobs, or all of them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RedriveRequest {
    /// Ids of dead jobs to re-drive.
    #[serde(default)]
    #[schema(max_items = 1000)]
    pub ids: Option<Vec<String>>,
    /// Re-drive every dead job; exclusive with `ids`.
    #[serde(default)]
    pub all: Option<bool>,
}

/// The outcome of a re-drive.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RedriveResult {
    /// Jobs given a new life.
    pub redriven: u64,
    /// Ids re-driven (empty with `all`).
    pub ids: Vec<String>,
    /// Ids that were not dead, with their state.
    pub not_dead: Vec<NotDead>,
    /// Ids with no job.
    pub not_found: Vec<String>,
}

/// A job that was not re-driven because it is not dead.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NotDead {
    pub id: String,
    #[schema(schema_with = state_schema)]
    pub state: JobState,
}

/// One page of jobs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobPage {
    pub items: Vec<JobView>,
    /// Jobs in the whole list.
    pub total: u64,
    pub offset: u64,
    pub limit: u64,
    /// The offset of the next page; `null` on the last page.
    pub next_offset: Option<u64>,
}

/// One completion event from the events stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EventView {
    /// The stream position (`<ms>-<seq>`): resume after it with `from` or `Last-Event-ID`.
    pub cursor: String,
    /// The event's stable id (`evt_<job id>_<life>`): the same event seen twice has one id.
    pub id: String,
    /// `job.succeeded`, `job.failed`, `job.cancelled` or `batch.completed`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// The event body, as webhooks carry it: `{id, type, timestamp, data}`.
    #[schema(value_type = Object)]
    pub event: Value,
}

impl From<StoredEvent> for EventView {
    fn from(event: StoredEvent) -> Self {
        let body = serde_json::from_str(&event.body).unwrap_or(Value::String(event.body));
        EventView {
            cursor: event.cursor,
            id: event.id,
            event_type: event.event_type,
            event: body,
        }
    }
}

/// An error response: `{"error": {"code", "message", "details"}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorInfo,
}

/// What went wrong.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ErrorInfo {
    /// A stable code: `validation_failed`, `unauthorized`, `not_found`, `payload_too_large`,
    /// `unsupported_media_type`, `method_not_allowed`, `unavailable`, `internal`.
    pub code: String,
    pub message: String,
    /// The field errors, for `validation_failed` (the first 1,000); empty otherwise.
    pub details: Vec<ErrorDetail>,
    /// Whether `details` lists only the first of `total_details` errors.
    #[serde(default)]
    #[schema(required = true)]
    pub truncated: bool,
    /// Every field error found, listed in `details` or not.
    #[serde(default)]
    #[schema(required = true)]
    pub total_details: u64,
}

impl ErrorInfo {
    /// An error with the listed `details` out of `total_details` found.
    pub fn new(
        code: impl Into<String>,
        message: impl Into<String>,
        details: Vec<ErrorDetail>,
        total_details: usize,
    ) -> Self {
        let total_details = total_details.max(details.len());
        Self {
            code: code.into(),
            message: message.into(),
            truncated: total_details > details.len(),
            total_details: total_details as u64,
            details,
        }
    }
}

/// One violated rule, naming the batch entry (when in a batch) and the field path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// 0-based index of the batch entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<u64>,
    /// 1-based line of the entry in a JSON Lines body or file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<u64>,
    /// Dotted path of the field, with `[i]` for array items; empty for the whole entry.
    pub path: String,
    /// A stable rule code: `required`, `type`, `unknown_field`, `exclusive`, `one_of`, `range`,
    /// `max_length`, `min_items`, `max_items`, `url`, `sum`, `element_kind`, `control_char`,
    /// `format`, `json`, `utf8`, `batch_tenant` (a batch's entry naming another tenant).
    pub rule: String,
    pub message: String,
}

impl ErrorDetail {
    pub fn new(field: FieldError) -> Self {
        Self {
            index: None,
            line: None,
            path: field.path,
            rule: field.rule,
            message: field.message,
        }
    }

    pub fn at(index: usize, field: FieldError) -> Self {
        Self {
            index: Some(index as u64),
            ..Self::new(field)
        }
    }
}

/// `{"status": "ok"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Health {
    pub status: String,
}

fn state_schema() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(JobState::ALL.iter().map(|s| s.as_str())))
}

fn priority_schema() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(Priority::ALL.iter().map(|p| p.as_str())))
}

/// A tenant: its policy in force, where that comes from, and what it uses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TenantView {
    pub tenant: String,
    pub policy: TenantPolicyView,
    /// Where the policy comes from: `api` (`PUT /v1/tenants/{name}`), `file`
    /// (`[tenants.NAME]` or `[tenants.default]`) or `default`.
    pub source: String,
    pub counts: TenantCounts,
    /// Provider runs it holds now, across replicas.
    pub in_flight: u64,
    /// Its jobs waiting for a provider slot.
    pub waiting_for_slot: u64,
    /// Estimated dollars of the runs it started at the provider.
    pub started_usd: f64,
    pub spend_today: TenantSpend,
}

/// A tenant's policy: its share of the provider and its limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TenantPolicyView {
    /// Relative share of the provider, by dollars started (more than 0, at most 1000;
    /// default 1).
    #[serde(default = "default_weight")]
    #[schema(exclusive_minimum = 0, maximum = 1000)]
    pub weight: f64,
    /// Provider runs it may hold at once across replicas (0: only the shared limit).
    #[serde(default, deserialize_with = "whole_number")]
    #[schema(minimum = 0, maximum = 100000)]
    pub max_concurrency: u64,
    /// Estimated spend it may start per UTC day, in USD (0: none).
    #[serde(default)]
    #[schema(minimum = 0)]
    pub daily_budget_usd: f64,
    /// The highest priority its jobs get (none: no cap).
    #[serde(default)]
    #[schema(schema_with = optional_priority_schema)]
    pub priority_cap: Option<Priority>,
}

fn default_weight() -> f64 {
    1.0
}

/// A whole number, written as an integer or as a float with no fraction (`10.0`), as JSON
/// Schema's `integer` allows.
fn whole_number<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    let number = serde_json::Number::deserialize(deserializer)?;
    number
        .as_u64()
        .or_else(|| {
            number
                .as_f64()
                .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f <= 9.0e15)
                .map(|f| f as u64)
        })
        .ok_or_else(|| serde::de::Error::custom(format!("must be a whole number, got {number}")))
}

fn optional_priority_schema() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::SchemaType::from_iter([
            Type::String,
            Type::Null,
        ]))
        .enum_values(Some(
            Priority::ALL
                .iter()
                .map(|p| serde_json::Value::from(p.as_str()))
                .chain([serde_json::Value::Null]),
        ))
}

impl From<klingq_core::TenantPolicy> for TenantPolicyView {
    fn from(policy: klingq_core::TenantPolicy) -> Self {
        TenantPolicyView {
            weight: policy.weight,
            max_concurrency: policy.max_concurrency,
            daily_budget_usd: policy.daily_budget_usd,
            priority_cap: policy.priority_cap,
        }
    }
}

impl From<TenantPolicyView> for klingq_core::TenantPolicy {
    fn from(view: TenantPolicyView) -> Self {
        klingq_core::TenantPolicy {
            weight: view.weight,
            max_concurrency: view.max_concurrency,
            daily_budget_usd: view.daily_budget_usd,
            priority_cap: view.priority_cap,
        }
    }
}

/// A tenant's jobs: enqueued, finished per outcome, and not yet finished (`active`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TenantCounts {
    pub enqueued: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub cancelled: u64,
    pub dead: u64,
    pub active: u64,
}

/// What a tenant spent today (UTC): estimated at submit, and charged by the provider.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TenantSpend {
    pub estimated_usd: f64,
    pub charged_usd: f64,
}

/// Every tenant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TenantList {
    pub tenants: Vec<TenantView>,
}
