//! The completion event: one per finished job, the body webhooks carry.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::job::{BatchId, JobError, JobId, JobState, StoredVideo};

/// What happened. Serialized as `job.succeeded`, `job.failed`, `job.cancelled`,
/// `batch.completed`, `batch.paused`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventType {
    #[serde(rename = "job.succeeded")]
    JobSucceeded,
    /// A job that failed permanently or went to the dead-letter place (`data.state` says which).
    #[serde(rename = "job.failed")]
    JobFailed,
    #[serde(rename = "job.cancelled")]
    JobCancelled,
    #[serde(rename = "batch.completed")]
    BatchCompleted,
    /// A batch's failure guard (`max_failure_rate`, `max_failed`) stopped its submissions.
    #[serde(rename = "batch.paused")]
    BatchPaused,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::JobSucceeded => "job.succeeded",
            EventType::JobFailed => "job.failed",
            EventType::JobCancelled => "job.cancelled",
            EventType::BatchCompleted => "batch.completed",
            EventType::BatchPaused => "batch.paused",
        }
    }

    /// The event a job ending in `state` publishes; none for non-terminal states.
    pub fn for_terminal_state(state: JobState) -> Option<EventType> {
        match state {
            JobState::Succeeded => Some(EventType::JobSucceeded),
            JobState::Failed | JobState::Dead => Some(EventType::JobFailed),
            JobState::Cancelled => Some(EventType::JobCancelled),
            _ => None,
        }
    }
}

/// A completion event, shaped as a Standard Webhooks body: `{id, type, timestamp, data}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionEvent {
    /// Stable per job and life (`evt_<job id>_<redrives>`): a consumer that sees it twice has
    /// seen the same event twice.
    pub id: String,
    #[serde(rename = "type")]
    pub event_type: EventType,
    /// When the job finished, RFC 3339.
    pub timestamp: String,
    pub data: JobEventData,
}

/// What a job completion event carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobEventData {
    pub job_id: JobId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_id: Option<BatchId>,
    pub state: JobState,
    /// The user's metadata, as given at enqueue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub video: Option<StoredVideo>,
    /// Seconds of video generated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_seconds: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_run_id: Option<String>,
    /// What the provider charged (or, without its figure, our estimate), in USD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<JobError>,
}

/// The stable event id of a job's completion in its `redrives`-th life.
pub fn job_event_id(job_id: &JobId, redrives: u32) -> String {
    format!("evt_{job_id}_{redrives}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_serializes_as_a_standard_webhooks_body() {
        let job_id: JobId = "01936f6e-1234-7abc-8def-0123456789ab".parse().unwrap();
        let event = CompletionEvent {
            id: job_event_id(&job_id, 0),
            event_type: EventType::JobSucceeded,
            timestamp: "2026-11-24T00:00:00Z".into(),
            data: JobEventData {
                job_id,
                batch_id: None,
                state: JobState::Succeeded,
                metadata: Some(serde_json::json!({"user": 7})),
                video: None,
                duration_seconds: Some(5),
                provider_run_id: Some("run-1".into()),
                cost_usd: Some(0.7),
                error: None,
            },
        };
        let text = serde_json::to_string(&event).unwrap();
        assert_eq!(
            text,
            r#"{"id":"evt_01936f6e-1234-7abc-8def-0123456789ab_0","type":"job.succeeded","timestamp":"2026-11-24T00:00:00Z","data":{"job_id":"01936f6e-1234-7abc-8def-0123456789ab","state":"succeeded","metadata":{"user":7},"duration_seconds":5,"provider_run_id":"run-1","cost_usd":0.7}}"#
        );
        let back: CompletionEvent = serde_json::from_str(&text).unwrap();
        assert_eq!(back, event);
        assert_eq!(
            EventType::for_terminal_state(JobState::Dead),
            Some(EventType::JobFailed)
        );
        assert_eq!(EventType::for_terminal_state(JobState::Generating), None);
    }
}
