//! Jobs: ids, states, the checkpoint each state carries, and the job as users see it.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::request::GenerationRequest;
use crate::validation::ValidationErrors;

/// A job id: a UUIDv7, so ids sort by creation time. Also the provider's `client_ref`, so a run
/// can always be traced back to the job that paid for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(Uuid);

impl JobId {
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    /// The id's 16 bytes.
    pub fn to_bytes(&self) -> [u8; 16] {
        *self.0.as_bytes()
    }

    /// An id of these 16 bytes (e.g. one derived from another id).
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(Uuid::from_bytes(bytes))
    }

    /// Milliseconds since the Unix epoch at which the id was made.
    pub fn created_at_ms(&self) -> u64 {
        self.0
            .get_timestamp()
            .map(|ts| {
                let (secs, nanos) = ts.to_unix();
                secs * 1000 + u64::from(nanos) / 1_000_000
            })
            .unwrap_or_default()
    }
}

impl Default for JobId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.as_hyphenated().fmt(f)
    }
}

impl FromStr for JobId {
    type Err = uuid::Error;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(text).map(Self)
    }
}

/// A batch id, made like a job id.
pub type BatchId = JobId;

/// Every state a job passes through. `succeeded`, `failed`, `cancelled` and `dead` are terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting in the ready stream for a worker.
    Queued,
    /// Waiting for a time: a not-before time, a retry backoff, a budget or a credit pause.
    Scheduled,
    /// Creating the provider run (the checkpoint is written before the request).
    Submitting,
    /// The provider run exists; the worker polls it.
    Generating,
    /// The run succeeded; the video is being fetched.
    Downloading,
    /// The video is streaming into object storage.
    Uploading,
    /// The object is stored; the completion event is being written.
    Publishing,
    Succeeded,
    /// Ended for a permanent reason (moderation, invalid input, deadline): see the job's error.
    Failed,
    Cancelled,
    /// Given up on by the queue (attempts exhausted, undecodable, panicked): re-drivable.
    Dead,
}

impl JobState {
    pub const ALL: [JobState; 11] = [
        JobState::Queued,
        JobState::Scheduled,
        JobState::Submitting,
        JobState::Generating,
        JobState::Downloading,
        JobState::Uploading,
        JobState::Publishing,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
        JobState::Dead,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Scheduled => "scheduled",
            JobState::Submitting => "submitting",
            JobState::Generating => "generating",
            JobState::Downloading => "downloading",
            JobState::Uploading => "uploading",
            JobState::Publishing => "publishing",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
            JobState::Dead => "dead",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled | JobState::Dead
        )
    }

    /// States in which a worker holds the job (between delivery and the end of the attempt).
    pub fn is_active(self) -> bool {
        matches!(
            self,
            JobState::Submitting
                | JobState::Generating
                | JobState::Downloading
                | JobState::Uploading
                | JobState::Publishing
        )
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobState {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        JobState::ALL
            .into_iter()
            .find(|state| state.as_str() == text)
            .ok_or_else(|| format!("unknown job state {text:?}"))
    }
}

/// Delivery priority. Workers take `high` before `normal` before `low`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    High,
    #[default]
    Normal,
    Low,
}

impl Priority {
    pub const ALL: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Low];

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }
}

impl FromStr for Priority {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Priority::ALL
            .into_iter()
            .find(|p| p.as_str() == text)
            .ok_or_else(|| format!("unknown priority {text:?}: use high, normal or low"))
    }
}

/// The most bytes of user metadata a job may carry, serialized.
pub const MAX_METADATA_BYTES: usize = 16 * 1024;

/// What a backend service submits: the generation request and optional delivery settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    pub request: GenerationRequest,
    /// Any JSON object of the user's; echoed in the job record and its completion event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    #[serde(default)]
    pub priority: Priority,
    /// The job is not submitted before this time.
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub not_before: Option<OffsetDateTime>,
    /// The customer the job is for (`default` when absent): its share of the provider, its
    /// limits and its budget (see [`crate::tenant`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

impl JobSpec {
    pub fn new(request: GenerationRequest) -> Self {
        Self {
            request,
            metadata: None,
            webhook_url: None,
            idempotency_key: None,
            priority: Priority::Normal,
            not_before: None,
            tenant: None,
        }
    }

    /// The job's tenant: the one it names, or [`crate::DEFAULT_TENANT`].
    pub fn tenant(&self) -> &str {
        self.tenant
            .as_deref()
            .unwrap_or(crate::tenant::DEFAULT_TENANT)
    }

    /// Checks the request and the job's own fields, naming each path (`request.prompt`, ...).
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errors = match self.request.validate() {
            Ok(()) => ValidationErrors::default(),
            Err(errors) => errors.prefixed("request"),
        };
        if let Some(metadata) = &self.metadata {
            if !metadata.is_object() {
                errors.push("metadata", "type", "must be a JSON object");
            } else {
                let n_bytes = metadata.to_string().len();
                if n_bytes > MAX_METADATA_BYTES {
                    errors.push(
                        "metadata",
                        "max_length",
                        format!(
                            "must be at most {MAX_METADATA_BYTES} bytes as JSON, got {n_bytes}"
                        ),
                    );
                } else if let Some(path) = find_nul(metadata, "metadata") {
                    // Metadata is the user's own JSON, echoed as given: only NUL, which many
                    // receivers (C strings, PostgreSQL text) cannot store, is refused.
                    errors.push(
                        path,
                        "control_char",
                        "must not contain U+0000 (NUL), in a key or a string",
                    );
                }
            }
        }
        if let Some(url) = &self.webhook_url
            && let Err(error) = crate::urls::check_webhook_url(url)
        {
            errors.push("webhook_url", error.rule, error.message);
        }
        if let Some(tenant) = &self.tenant {
            crate::tenant::validate_tenant_name(&mut errors, "tenant", tenant);
        }
        if let Some(key) = &self.idempotency_key {
            if key.is_empty() || key.len() > 255 {
                errors.push(
                    "idempotency_key",
                    "max_length",
                    format!("must be 1 to 255 bytes, got {}", key.len()),
                );
            } else {
                crate::request::check_control_chars(&mut errors, "idempotency_key", key, false);
            }
        }
        errors.into_result()
    }
}

/// The path of the first key or string in `value` that contains NUL.
fn find_nul(value: &Value, path: &str) -> Option<String> {
    match value {
        Value::String(text) => text.contains('\0').then(|| path.to_owned()),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(index, item)| find_nul(item, &format!("{path}[{index}]"))),
        Value::Object(object) => object.iter().find_map(|(key, item)| {
            if key.contains('\0') {
                Some(format!("{path}.{}", key.replace('\0', "\\u0000")))
            } else {
                find_nul(item, &format!("{path}.{key}"))
            }
        }),
        Value::Null | Value::Bool(_) | Value::Number(_) => None,
    }
}

/// Where a job stands with the provider: written before and right after the create call.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProviderCheckpoint {
    /// The provider's run id, once known. With it, the job never creates another run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    /// When the create request was (about to be) sent, in ms since the epoch. Set without a
    /// `run_id`, it means the outcome of that request is unknown: reconcile by client_ref.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submitted_at_ms: Option<u64>,
    /// How many create requests were sent for this job (each under the same client_ref).
    #[serde(default)]
    pub creates: u32,
    /// The run's last known status as the provider spells it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// Size the provider reported for the output, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_size: Option<u64>,
    /// The provider's cost for the run, in USD, when it reported one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
    /// Set when the run finished successfully: from here on the job never polls or creates.
    #[serde(default)]
    pub finished: bool,
    /// Reads that found the run succeeded but naming no video yet.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub empty_reads: u32,
    /// Consecutive reads that found no such run (it may not be visible at once).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub not_found: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// The re-hosted video.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredVideo {
    pub bucket: String,
    pub key: String,
    /// A presigned GET URL or a public URL. Presigned URLs are secrets: never log them.
    pub url: String,
    pub size: u64,
    /// Hex sha256 of the object's bytes.
    pub sha256: String,
    pub content_type: String,
}

/// Why a job failed: the step, the provider's code and message, and field errors when any.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobError {
    /// The pipeline step that failed: `submit`, `generate`, `download`, `upload`, `publish`, or
    /// `queue` for failures of the queue itself (attempts exhausted, undecodable payload).
    pub step: String,
    /// A stable code: the provider's (`CONTENT_POLICY_VIOLATION`, `VALIDATION_ERROR`, ...) or ours.
    pub code: String,
    /// Scrubbed ([`crate::scrub`]) whenever it is written: records, events and webhooks never
    /// carry a secret or a signed URL that a provider echoed.
    #[serde(serialize_with = "crate::scrub::serialize_scrubbed")]
    pub message: String,
    /// Field errors the provider returned, when it did.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        serialize_with = "serialize_scrubbed_values"
    )]
    pub details: Vec<Value>,
    /// Whether the provider cost is already committed (a run was created and may be billed).
    #[serde(default)]
    pub cost_committed: bool,
}

fn serialize_scrubbed_values<S: serde::Serializer>(
    values: &[Value],
    serializer: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeSeq as _;
    let mut seq = serializer.serialize_seq(Some(values.len()))?;
    for value in values {
        seq.serialize_element(&crate::scrub::scrub_json(value))?;
    }
    seq.end()
}

/// The checkpoint a job carries between attempts; each field says how far it got.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    #[serde(default)]
    pub provider: ProviderCheckpoint,
    /// Set once the object is in storage and verified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub video: Option<StoredVideo>,
    /// Retries spent per step (`submit`, `generate`, `download`, ...), each against its own budget.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub step_retries: BTreeMap<String, u32>,
    /// Time spent per step in ms, for the job record and the dashboard.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub step_ms: BTreeMap<String, u64>,
    /// The states the job's deliveries entered, oldest first, with their attempt: written with
    /// the checkpoint (no write of its own), at most [`Checkpoint::TIMELINE_CAP`] entries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub timeline: Vec<TimelineEntry>,
}

/// A state a job entered during a delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimelineEntry {
    pub state: JobState,
    /// When, in ms since the Unix epoch.
    pub at_ms: u64,
    /// The delivery attempt it happened in.
    pub attempt: u32,
    /// Why, in words (scrubbed), when there is more to say than the state.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "serialize_scrubbed_option"
    )]
    pub reason: Option<String>,
}

fn serialize_scrubbed_option<S: serde::Serializer>(
    value: &Option<String>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match value {
        Some(text) => serializer.serialize_some(&crate::scrub::scrub(text)),
        None => serializer.serialize_none(),
    }
}

impl Checkpoint {
    /// Timeline entries kept: the first (how the job started) and the newest.
    pub const TIMELINE_CAP: usize = 40;

    /// Adds a state the job entered, unless it repeats the last entry (a parked run's polls,
    /// one per delivery, stay one `generating` entry).
    pub fn mark(&mut self, state: JobState, at_ms: u64, attempt: u32, reason: Option<&str>) {
        let reason = reason.filter(|r| !r.is_empty()).map(str::to_owned);
        if let Some(last) = self.timeline.last()
            && last.state == state
            && last.reason == reason
        {
            return;
        }
        self.timeline.push(TimelineEntry {
            state,
            at_ms,
            attempt,
            reason,
        });
        if self.timeline.len() > Self::TIMELINE_CAP {
            self.timeline.remove(1);
        }
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    let now = OffsetDateTime::now_utc();
    (now.unix_timestamp_nanos() / 1_000_000) as u64
}

/// Formats epoch milliseconds as RFC 3339.
pub fn format_ms(ms: u64) -> String {
    let nanos = i128::from(ms) * 1_000_000;
    OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_timeline_skips_repeats_keeps_its_first_entry_and_scrubs_reasons() {
        let mut checkpoint = Checkpoint::default();
        checkpoint.mark(JobState::Submitting, 1, 1, Some("creating the run"));
        checkpoint.mark(JobState::Generating, 2, 1, Some(""));
        // A parked run's next poll, in the next delivery: the same state, not a new entry.
        checkpoint.mark(JobState::Generating, 3, 2, None);
        assert_eq!(checkpoint.timeline.len(), 2);
        assert_eq!(checkpoint.timeline[1].reason, None);
        for n in 0..100 {
            let state = if n % 2 == 0 {
                JobState::Scheduled
            } else {
                JobState::Submitting
            };
            checkpoint.mark(state, 10 + n, 3 + n as u32, None);
        }
        assert_eq!(checkpoint.timeline.len(), Checkpoint::TIMELINE_CAP);
        assert_eq!(checkpoint.timeline[0].at_ms, 1, "the first entry stays");
        assert_eq!(checkpoint.timeline.last().unwrap().at_ms, 109);

        crate::scrub::register_secret("timeline-secret-value");
        let mut checkpoint = Checkpoint::default();
        checkpoint.mark(
            JobState::Scheduled,
            1,
            1,
            Some("submit retry 1/8: key timeline-secret-value refused"),
        );
        let json = serde_json::to_string(&checkpoint).unwrap();
        assert!(!json.contains("timeline-secret-value"), "{json}");
        let back: Checkpoint = serde_json::from_str(&json).unwrap();
        assert_eq!(back.timeline[0].state, JobState::Scheduled);
    }

    #[test]
    fn job_ids_sort_by_time_and_parse_back() {
        let first = JobId::new();
        let second = JobId::new();
        assert!(first < second);
        assert_eq!(first.to_string().parse::<JobId>().unwrap(), first);
        let age = now_ms().abs_diff(first.created_at_ms());
        assert!(age < 60_000, "{age}");
    }

    #[test]
    fn states_round_trip_and_classify() {
        for state in JobState::ALL {
            assert_eq!(state.as_str().parse::<JobState>().unwrap(), state);
            assert_eq!(
                serde_json::to_value(state).unwrap(),
                serde_json::json!(state.as_str())
            );
            assert!(!(state.is_terminal() && state.is_active()));
        }
        assert_eq!(JobState::ALL.iter().filter(|s| s.is_terminal()).count(), 4);
    }

    #[test]
    fn job_spec_checks_its_own_fields() {
        let mut spec = JobSpec::new(GenerationRequest::new("https://e.com/a.png", ""));
        spec.metadata = Some(serde_json::json!([1]));
        spec.webhook_url = Some("ftp://x".into());
        spec.idempotency_key = Some(String::new());
        let errors = spec.validate().unwrap_err();
        let paths: Vec<_> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            vec![
                "request.prompt",
                "metadata",
                "webhook_url",
                "idempotency_key"
            ]
        );
        spec.metadata = Some(serde_json::json!({"k": "v".repeat(MAX_METADATA_BYTES)}));
        let errors = spec.validate().unwrap_err();
        assert!(
            errors
                .iter()
                .any(|e| e.path == "metadata" && e.rule == "max_length")
        );
    }

    #[test]
    fn webhook_urls_keys_and_metadata_are_checked_as_delivered_and_stored() {
        let rules = |spec: &JobSpec| -> Vec<(String, String)> {
            match spec.validate() {
                Ok(()) => Vec::new(),
                Err(errors) => errors.into_iter().map(|e| (e.path, e.rule)).collect(),
            }
        };
        let pair = |path: &str, rule: &str| (path.to_owned(), rule.to_owned());
        let mut spec = JobSpec::new(GenerationRequest::new("https://e.com/a.png", "p"));
        spec.webhook_url = Some(format!("https://hooks.e.com/{}", "a".repeat(900 * 1024)));
        assert_eq!(rules(&spec), vec![pair("webhook_url", "max_length")]);
        spec.webhook_url = Some("https://x\"onmouseover=alert(1)//e.com/".to_owned());
        assert_eq!(rules(&spec), vec![pair("webhook_url", "url")]);
        spec.webhook_url = Some("data:text/plain,x".to_owned());
        assert_eq!(rules(&spec), vec![pair("webhook_url", "url")]);
        spec.webhook_url = Some(format!("https://hooks.e.com/{}", "a".repeat(2000)));
        assert_eq!(rules(&spec), vec![]);

        spec.idempotency_key = Some("key\n1".to_owned());
        spec.metadata =
            Some(serde_json::json!({"ok": "tab\tand\nnewline", "a": {"b": ["x", "y\u{0}"]}}));
        assert_eq!(
            rules(&spec),
            vec![
                pair("metadata.a.b[1]", "control_char"),
                pair("idempotency_key", "control_char")
            ]
        );
        spec.idempotency_key = None;
        spec.metadata = Some(serde_json::json!({"k\u{0}": 1}));
        assert_eq!(
            rules(&spec),
            vec![pair("metadata.k\\u0000", "control_char")]
        );
        spec.metadata = Some(serde_json::json!({"escape": "\u{1b}[0m"}));
        assert_eq!(rules(&spec), vec![]);
    }

    #[test]
    fn formats_epoch_ms() {
        assert_eq!(format_ms(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_ms(1_500), "1970-01-01T00:00:01.5Z");
    }
}

#[cfg(test)]
mod scrub_tests {
    use super::*;

    #[test]
    fn a_job_error_is_scrubbed_when_written() {
        crate::Secret::new("sk_live_written_never_0001");
        let error = JobError {
            step: "submit".to_owned(),
            code: "INVALID_REQUEST".to_owned(),
            message: "echo: Bearer sk_live_written_never_0001 and https://b.example/v.mp4?X-Amz-Signature=s".to_owned(),
            details: vec![serde_json::json!({"msg": "key sk_live_written_never_0001"})],
            cost_committed: false,
        };
        let written = serde_json::to_string(&error).unwrap();
        assert!(!written.contains("sk_live_written_never_0001"), "{written}");
        assert!(!written.contains("X-Amz-Signature"), "{written}");
        assert!(
            written.contains("https://b.example/v.mp4?[redacted]"),
            "{written}"
        );
    }
}
