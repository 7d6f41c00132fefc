//! Building the completion event a job publishes when it reaches a terminal state.

use klingq_core::event::job_event_id;
use klingq_core::job::format_ms;
use klingq_core::{CompletionEvent, EventType, JobError, JobEventData, JobId, JobState};
use serde_json::Value;

/// What a finished handler adds to its completion event beyond what the queue knows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventExtras {
    pub video: Option<klingq_core::StoredVideo>,
    pub duration_seconds: Option<u32>,
    pub provider_run_id: Option<String>,
    pub cost_usd: Option<f64>,
}

/// The facts of a job the event needs, as the queue holds them.
#[derive(Debug, Clone)]
pub(crate) struct EventSubject<'a> {
    pub(crate) job_id: &'a str,
    pub(crate) batch_id: Option<&'a str>,
    pub(crate) redrives: u32,
    /// The job's `metadata` (if any), echoed in the event.
    pub(crate) metadata: Option<Value>,
}

/// The `metadata` field of a job's payload (JSON), read without decoding the rest: the
/// handler decoded the payload already, and only this field goes into the event.
pub(crate) fn metadata_of(payload: &str) -> Option<Value> {
    #[derive(serde::Deserialize)]
    struct Fields<'a> {
        #[serde(borrow, default)]
        metadata: Option<&'a serde_json::value::RawValue>,
    }
    let raw = serde_json::from_str::<Fields<'_>>(payload).ok()?.metadata?;
    serde_json::from_str::<Value>(raw.get())
        .ok()
        .filter(|m| !m.is_null())
}

/// A built event: its stable id, type and compact JSON body.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct BuiltEvent {
    pub(crate) id: String,
    pub(crate) event_type: &'static str,
    pub(crate) body: String,
}

/// Builds the completion event for a job ending in `state`, or `None` for a non-terminal state
/// or a payload that is not a klingq job.
pub(crate) fn build(
    subject: &EventSubject<'_>,
    state: JobState,
    error: Option<&JobError>,
    extras: EventExtras,
    now_ms: u64,
) -> Option<BuiltEvent> {
    let event_type = EventType::for_terminal_state(state)?;
    let job_id: JobId = subject.job_id.parse().ok()?;
    let batch_id = subject.batch_id.and_then(|b| b.parse().ok());
    let metadata = subject.metadata.clone();
    let event = CompletionEvent {
        id: job_event_id(&job_id, subject.redrives),
        event_type,
        timestamp: format_ms(now_ms),
        data: JobEventData {
            job_id,
            batch_id,
            state,
            metadata,
            video: extras.video,
            duration_seconds: extras.duration_seconds,
            provider_run_id: extras.provider_run_id,
            cost_usd: extras.cost_usd,
            error: error.cloned(),
        },
    };
    let body = serde_json::to_string(&event).ok()?;
    Some(BuiltEvent {
        id: event.id,
        event_type: event_type.as_str(),
        body,
    })
}
