//! Runs as the client sees them, read by hand from every JSON shape the sources show.
//!
//! Runflow's JSON stays private to this crate: the parsers below turn it into our own types and
//! tolerate the drift seen between snapshots (status spellings, output shapes, cost as a string
//! or a number, failure details as `failure_*` fields or an `error` object).

use std::fmt;

use klingq_core::SignedUrl;
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// A run's `status_code`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RunStatus {
    Queued,
    Dispatching,
    Running,
    Succeeded,
    Failed,
    /// Spelled `canceled` (newer docs) or `cancelled` (older docs); both are accepted.
    Cancelled,
    /// Batch or multi-output runs; treated like `succeeded` for ending the wait.
    PartialSucceeded,
    /// A status this client does not know; treated as still in progress.
    Other(String),
}

impl RunStatus {
    pub fn parse(text: &str) -> Self {
        match text.trim().to_ascii_lowercase().as_str() {
            "queued" | "pending" => RunStatus::Queued,
            "dispatching" => RunStatus::Dispatching,
            "running" | "in_progress" | "processing" => RunStatus::Running,
            "succeeded" | "completed" | "success" => RunStatus::Succeeded,
            "failed" | "error" => RunStatus::Failed,
            "canceled" | "cancelled" => RunStatus::Cancelled,
            "partial_succeeded" => RunStatus::PartialSucceeded,
            _ => RunStatus::Other(text.to_owned()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            RunStatus::Queued => "queued",
            RunStatus::Dispatching => "dispatching",
            RunStatus::Running => "running",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "canceled",
            RunStatus::PartialSucceeded => "partial_succeeded",
            RunStatus::Other(text) => text,
        }
    }

    /// Whether the run will not change any more.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            RunStatus::Succeeded
                | RunStatus::Failed
                | RunStatus::Cancelled
                | RunStatus::PartialSucceeded
        )
    }

    /// Whether the run produced output (and was billed).
    pub fn is_success(&self) -> bool {
        matches!(self, RunStatus::Succeeded | RunStatus::PartialSucceeded)
    }
}

impl fmt::Display for RunStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The generated video as the provider describes it. The URL is presigned and short-lived:
/// download it at once, and re-read the run for a fresh one when it has expired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VideoOutput {
    pub url: SignedUrl,
    pub file_size: Option<u64>,
    pub content_type: Option<String>,
}

/// Why a run failed, from `failure_code`/`failure_message`/`failure_stage_code` or `error{}`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunFailure {
    pub code: Option<String>,
    pub message: Option<String>,
    /// `dispatch`, `execution`, `moderation`, ...
    pub stage: Option<String>,
}

impl RunFailure {
    /// Whether the failure is content moderation, on input or output.
    pub fn is_moderation(&self) -> bool {
        crate::classify::looks_like_moderation(self.code.as_deref(), self.message.as_deref())
            || self
                .stage
                .as_deref()
                .is_some_and(|stage| stage.eq_ignore_ascii_case("moderation"))
    }
}

impl fmt::Display for RunFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.code, &self.message) {
            (Some(code), Some(message)) => write!(f, "{code}: {message}")?,
            (Some(code), None) => f.write_str(code)?,
            (None, Some(message)) => f.write_str(message)?,
            (None, None) => f.write_str("no failure details")?,
        }
        if let Some(stage) = &self.stage {
            write!(f, " (stage {stage})")?;
        }
        Ok(())
    }
}

/// One run of the model.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    /// The provider's run id (a UUIDv7). Empty only for a sync-mode result whose run could not be
    /// looked up afterwards.
    pub id: String,
    pub status: RunStatus,
    /// Our job id, echoed by the provider; the key of reconciliation.
    pub client_ref: Option<String>,
    /// `metadata` as sent at create (`job_id`, `attempt`).
    pub metadata: Option<Value>,
    /// The model input as the provider echoes it; matched against ours when a sync run carries
    /// no `client_ref`.
    pub input: Option<Value>,
    /// The video, once the run succeeded and the output names one.
    pub video: Option<VideoOutput>,
    /// The provider's `cost`, in USD.
    pub cost_usd: Option<f64>,
    pub failure: Option<RunFailure>,
    pub created_at: Option<OffsetDateTime>,
    pub started_at: Option<OffsetDateTime>,
    /// `completed_at` (the SDK's `finished_at`), RFC 3339 with `Z` or an offset.
    pub completed_at: Option<OffsetDateTime>,
    /// [`Run::completed_at`] in milliseconds since the Unix epoch.
    pub completed_at_ms: Option<u64>,
    /// The provider's `duration_ms`: creation to completion. Derived from `created_at` and
    /// `completed_at` when the run does not carry it.
    pub duration_ms: Option<u64>,
    /// Set when this run was found by `client_ref` after a create whose outcome was unknown,
    /// instead of being returned by the create itself.
    pub adopted: bool,
}

impl Run {
    /// `metadata.attempt`, as sent at create.
    pub fn attempt(&self) -> Option<u32> {
        self.metadata
            .as_ref()
            .and_then(|metadata| metadata.get("attempt"))
            .and_then(Value::as_u64)
            .and_then(|attempt| u32::try_from(attempt).ok())
    }

    pub(crate) fn adopted(mut self) -> Self {
        self.adopted = true;
        self
    }
}

/// Reads a Run object; `None` when it has no id or no status.
pub(crate) fn parse_run(value: &Value) -> Option<Run> {
    let object = value.as_object()?;
    let id = string_field(value, "id").or_else(|| string_field(value, "run_id"))?;
    let status = string_field(value, "status_code").or_else(|| string_field(value, "status"))?;
    let status = RunStatus::parse(&status);
    let failure = parse_failure(value);
    let created_at = timestamp(value, "created_at");
    let completed_at = timestamp(value, "completed_at").or_else(|| timestamp(value, "finished_at"));
    let duration_ms = object
        .get("duration_ms")
        .and_then(duration_millis)
        .or_else(|| millis_between(created_at?, completed_at?));
    Some(Run {
        id,
        status,
        client_ref: string_field(value, "client_ref"),
        metadata: object.get("metadata").filter(|m| !m.is_null()).cloned(),
        input: object
            .get("input")
            .filter(|input| input.is_object())
            .cloned(),
        video: extract_video(value),
        cost_usd: object.get("cost").and_then(number_or_string),
        failure,
        created_at,
        started_at: timestamp(value, "started_at"),
        completed_at,
        completed_at_ms: completed_at.and_then(unix_millis),
        duration_ms,
        adopted: false,
    })
}

/// Reads a list of runs: `{data: [...]}`, `{runs: [...]}`, `{items: [...]}` or a bare array.
/// Entries that are not runs are skipped; `None` when the body is no list at all.
pub(crate) fn parse_run_list(value: &Value) -> Option<Vec<Run>> {
    let items = match value {
        Value::Array(items) => items,
        Value::Object(object) => ["data", "runs", "items", "results"]
            .iter()
            .find_map(|key| object.get(*key).and_then(Value::as_array))?,
        _ => return None,
    };
    Some(items.iter().filter_map(parse_run).collect())
}

fn parse_failure(value: &Value) -> Option<RunFailure> {
    let error = value.get("error").filter(|error| error.is_object());
    let failure = RunFailure {
        code: string_field(value, "failure_code")
            .or_else(|| error.and_then(|error| string_field(error, "code"))),
        message: string_field(value, "failure_message")
            .or_else(|| error.and_then(|error| string_field(error, "message")))
            .or_else(|| {
                value
                    .get("error")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            }),
        stage: string_field(value, "failure_stage_code")
            .or_else(|| string_field(value, "failure_stage")),
    };
    let failure = RunFailure {
        message: failure.message.as_deref().map(klingq_core::scrub),
        ..failure
    };
    (failure != RunFailure::default()).then_some(failure)
}

/// Finds the video in a run or a sync response, in the order the sources suggest:
/// `output.outputs[].url` (type video), `output.video.url`, `output.video_url`, `output.url`,
/// `output.output_url`, the same under `output.output`, then the top-level `video` (sync endpoint).
pub(crate) fn extract_video(value: &Value) -> Option<VideoOutput> {
    let output = value.get("output");
    let nested = output.and_then(|output| output.get("output"));
    output
        .and_then(video_in_output)
        .or_else(|| nested.and_then(video_in_output))
        .or_else(|| video_object(value.get("video")?))
        .or_else(|| non_empty_str(value.get("video_url")?).map(bare_video))
}

fn video_in_output(output: &Value) -> Option<VideoOutput> {
    if let Some(outputs) = output.get("outputs").and_then(Value::as_array) {
        let is_video = |entry: &&Value| {
            let kind = entry.get("type").and_then(Value::as_str);
            let content_type = entry.get("content_type").and_then(Value::as_str);
            kind.is_some_and(|kind| kind.eq_ignore_ascii_case("video"))
                || content_type.is_some_and(|ct| ct.starts_with("video/"))
        };
        if let Some(found) = outputs.iter().filter(is_video).find_map(video_object) {
            return Some(found);
        }
    }
    if let Some(found) = output.get("video").and_then(video_object) {
        return Some(found);
    }
    ["video_url", "url", "output_url"]
        .iter()
        .find_map(|key| non_empty_str(output.get(*key)?))
        .map(|url| VideoOutput {
            url: SignedUrl::new(url),
            file_size: output.get("file_size").and_then(number_u64),
            content_type: string_field(output, "content_type"),
        })
}

/// A fal-style File object `{url, content_type, file_size}`, or a bare URL string.
fn video_object(value: &Value) -> Option<VideoOutput> {
    if let Some(url) = non_empty_str(value) {
        return Some(bare_video(url));
    }
    let url = non_empty_str(value.get("url")?)?;
    Some(VideoOutput {
        url: SignedUrl::new(url),
        file_size: value.get("file_size").and_then(number_u64),
        content_type: string_field(value, "content_type"),
    })
}

fn bare_video(url: &str) -> VideoOutput {
    VideoOutput {
        url: SignedUrl::new(url),
        file_size: None,
        content_type: None,
    }
}

fn non_empty_str(value: &Value) -> Option<&str> {
    value
        .as_str()
        .map(str::trim)
        .filter(|text| !text.is_empty())
}

fn string_field(value: &Value, key: &str) -> Option<String> {
    match value.get(key)? {
        Value::String(text) if !text.is_empty() => Some(text.clone()),
        Value::Number(number) => Some(number.to_string()),
        _ => None,
    }
}

fn number_or_string(value: &Value) -> Option<f64> {
    match value {
        Value::Number(number) => number.as_f64(),
        Value::String(text) => text.trim().trim_start_matches('$').parse::<f64>().ok(),
        _ => None,
    }
    .filter(|amount| amount.is_finite())
}

fn number_u64(value: &Value) -> Option<u64> {
    match value {
        Value::Number(number) => number.as_u64(),
        Value::String(text) => text.trim().parse().ok(),
        _ => None,
    }
}

fn timestamp(value: &Value, key: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(value.get(key)?.as_str()?.trim(), &Rfc3339).ok()
}

/// A millisecond count: an integer, a non-negative finite number (rounded) or a numeric string.
fn duration_millis(value: &Value) -> Option<u64> {
    number_u64(value).or_else(|| {
        number_or_string(value)
            .filter(|ms| *ms >= 0.0 && *ms < u64::MAX as f64)
            .map(|ms| ms.round() as u64)
    })
}

/// Milliseconds since the Unix epoch; `None` before it.
pub(crate) fn unix_millis(at: OffsetDateTime) -> Option<u64> {
    u64::try_from(at.unix_timestamp_nanos() / 1_000_000).ok()
}

/// Milliseconds from `start` to `end`; `None` when `end` is before `start`.
fn millis_between(start: OffsetDateTime, end: OffsetDateTime) -> Option<u64> {
    u64::try_from((end - start).whole_milliseconds()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn url_of(value: Value) -> Option<String> {
        extract_video(&value).map(|video| video.url.expose().to_owned())
    }

    #[test]
    fn reads_every_output_shape() {
        let url = "https://cdn.example/v.mp4?sig=abc";
        let cases = [
            json!({"output": {"outputs": [
                {"type": "image", "url": "https://cdn.example/poster.png"},
                {"type": "video", "url": url, "file_size": 10, "content_type": "video/mp4"}]}}),
            json!({"output": {"outputs": [{"content_type": "video/mp4", "url": url}]}}),
            json!({"output": {"video": {"url": url, "file_size": 10}}}),
            json!({"output": {"video": url}}),
            json!({"output": {"video_url": url}}),
            json!({"output": {"url": url}}),
            json!({"output": {"output_url": url}}),
            json!({"output": {"output": {"outputs": [{"type": "video", "url": url}]}}}),
            json!({"output": {"output": {"video": {"url": url}}}}),
            json!({"video": {"url": url, "content_type": "video/mp4", "file_size": 10}}),
            json!({"video": url}),
            json!({"video_url": url}),
        ];
        for case in cases {
            assert_eq!(url_of(case.clone()).as_deref(), Some(url), "{case}");
        }
        for empty in [
            json!({}),
            json!({"output": {}}),
            json!({"output": null}),
            json!({"output": {"outputs": []}}),
            json!({"output": {"outputs": [{"type": "image", "url": "https://x/y.png"}]}}),
            json!({"output": {"video": {"url": ""}}}),
        ] {
            assert_eq!(url_of(empty.clone()), None, "{empty}");
        }
        let video = extract_video(&json!({"output": {"outputs": [
            {"type": "video", "url": url, "file_size": "8431922", "content_type": "video/mp4"}]}}))
        .unwrap();
        assert_eq!(video.file_size, Some(8_431_922));
        assert_eq!(video.content_type.as_deref(), Some("video/mp4"));
        assert!(!format!("{video:?}").contains("sig=abc"));
    }

    #[test]
    fn reads_a_documented_run() {
        let run = parse_run(&json!({
            "id": "0190a5f0-0000-7000-8000-000000000001",
            "status_code": "succeeded",
            "client_ref": "job-1",
            "metadata": {"job_id": "job-1", "attempt": 2},
            "output": {"outputs": [{"type": "video", "url": "https://x/v.mp4", "file_size": 5}]},
            "cost": "0.70",
            "created_at": "2026-05-06T10:00:00.000+00:00",
            "completed_at": "2026-05-06T10:01:42Z",
            "duration_ms": 102345,
        }))
        .unwrap();
        assert_eq!(run.status, RunStatus::Succeeded);
        assert_eq!(run.cost_usd, Some(0.70));
        assert_eq!(run.attempt(), Some(2));
        assert_eq!(run.video.unwrap().file_size, Some(5));
        assert!(run.created_at.is_some() && run.completed_at.is_some());
        assert_eq!(run.duration_ms, Some(102_345));
        assert_eq!(run.completed_at_ms, Some(1_778_061_702_000));
        assert!(!run.adopted);
        assert_eq!(
            parse_run(&json!({"id": "r", "cost": 1.4, "status_code": "queued"}))
                .unwrap()
                .cost_usd,
            Some(1.4)
        );
        assert!(parse_run(&json!({"status_code": "queued"})).is_none());
    }

    #[test]
    fn reads_completion_in_either_spelling() {
        // 2026-05-06T10:01:42.500Z
        let completed_ms = 1_778_061_702_500;
        for run in [
            json!({"id": "r", "status_code": "succeeded", "duration_ms": 102_500,
                "created_at": "2026-05-06T10:00:00Z", "completed_at": "2026-05-06T10:01:42.500Z"}),
            json!({"id": "r", "status_code": "succeeded", "duration_ms": 102_500,
                "created_at": "2026-05-06T10:00:00Z", "finished_at": "2026-05-06T10:01:42.500+00:00"}),
            json!({"id": "r", "status_code": "succeeded", "duration_ms": 102_500,
                "completed_at": "2026-05-06T12:01:42.500+02:00"}),
            json!({"id": "r", "status_code": "succeeded", "duration_ms": 102_500,
                "completed_at": "not a time", "finished_at": "2026-05-06T10:01:42.500Z"}),
        ] {
            let parsed = parse_run(&run).unwrap();
            assert_eq!(parsed.completed_at_ms, Some(completed_ms), "{run}");
            assert_eq!(parsed.duration_ms, Some(102_500), "{run}");
        }
        let going = parse_run(&json!({"id": "r", "status_code": "running",
            "created_at": "2026-05-06T10:00:00Z", "completed_at": null, "duration_ms": null}))
        .unwrap();
        assert_eq!((going.completed_at_ms, going.duration_ms), (None, None));
    }

    #[test]
    fn derives_the_duration_when_missing() {
        let derived = |created: &str, completed: &str| {
            parse_run(&json!({"id": "r", "status_code": "succeeded",
                "created_at": created, "completed_at": completed}))
            .unwrap()
            .duration_ms
        };
        assert_eq!(
            derived("2026-05-06T10:00:00.000+00:00", "2026-05-06T10:03:01.250Z"),
            Some(181_250)
        );
        // Offsets are honoured; the SDK's spelling too.
        assert_eq!(
            derived("2026-05-06T11:00:00+01:00", "2026-05-06T10:00:40Z"),
            Some(40_000)
        );
        let finished = parse_run(&json!({"id": "r", "status_code": "succeeded",
            "created_at": "2026-05-06T10:00:00Z", "finished_at": "2026-05-06T10:00:05Z"}))
        .unwrap();
        assert_eq!(finished.duration_ms, Some(5_000));
        // Completion before creation (clock trouble) derives nothing.
        assert_eq!(
            derived("2026-05-06T10:00:05Z", "2026-05-06T10:00:00Z"),
            None
        );
        // The provider's own value wins over the derivation, in any numeric form.
        for given in [json!(7_000), json!(7_000.0), json!("7000")] {
            let run = parse_run(&json!({"id": "r", "status_code": "succeeded",
                "created_at": "2026-05-06T10:00:00Z", "completed_at": "2026-05-06T10:00:40Z",
                "duration_ms": given}))
            .unwrap();
            assert_eq!(run.duration_ms, Some(7_000), "{given}");
        }
        // Nothing to derive from.
        let bare = parse_run(&json!({"id": "r", "status_code": "succeeded",
            "completed_at": "2026-05-06T10:00:40Z"}))
        .unwrap();
        assert_eq!(bare.duration_ms, None);
        assert!(bare.completed_at_ms.is_some());
    }

    #[test]
    fn reads_failures_from_either_place() {
        let run = parse_run(&json!({"id": "r", "status_code": "failed",
            "failure_code": "CONTENT_POLICY_VIOLATION", "failure_message": "flagged",
            "failure_stage_code": "moderation"}))
        .unwrap();
        let failure = run.failure.unwrap();
        assert!(failure.is_moderation());
        assert_eq!(
            failure.to_string(),
            "CONTENT_POLICY_VIOLATION: flagged (stage moderation)"
        );
        let run = parse_run(&json!({"id": "r", "status_code": "failed",
            "error": {"code": "PROVIDER_TIMEOUT", "message": "slow"}}))
        .unwrap();
        let failure = run.failure.unwrap();
        assert_eq!(failure.code.as_deref(), Some("PROVIDER_TIMEOUT"));
        assert!(!failure.is_moderation());
        assert!(
            parse_run(&json!({"id": "r", "status_code": "queued", "error": null}))
                .unwrap()
                .failure
                .is_none()
        );
    }

    #[test]
    fn statuses_accept_both_spellings() {
        assert_eq!(RunStatus::parse("canceled"), RunStatus::Cancelled);
        assert_eq!(RunStatus::parse("cancelled"), RunStatus::Cancelled);
        for terminal in [
            "succeeded",
            "failed",
            "canceled",
            "cancelled",
            "partial_succeeded",
        ] {
            assert!(RunStatus::parse(terminal).is_terminal(), "{terminal}");
        }
        for going in ["queued", "dispatching", "running", "warming_up"] {
            assert!(!RunStatus::parse(going).is_terminal(), "{going}");
        }
        assert!(RunStatus::parse("partial_succeeded").is_success());
    }

    #[test]
    fn reads_run_lists() {
        let run = json!({"id": "r", "status_code": "queued"});
        for list in [json!({"data": [run]}), json!({"runs": [run]}), json!([run])] {
            assert_eq!(parse_run_list(&list).unwrap().len(), 1, "{list}");
        }
        assert_eq!(parse_run_list(&json!({"data": []})).unwrap().len(), 0);
        assert!(parse_run_list(&json!({"message": "hi"})).is_none());
    }
}
