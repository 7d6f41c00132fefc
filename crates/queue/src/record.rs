//! Job and batch records as read back from Redis.

use std::collections::{BTreeMap, HashMap};

use klingq_core::{JobError, JobState, Priority, TraceParent};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A job as the queue stores it. `payload` is the queue's argument type as JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    pub queue: String,
    pub state: JobState,
    pub priority: Priority,
    /// Deliveries so far in this life, including those whose worker died.
    pub attempts: u32,
    pub max_attempts: u32,
    /// Times the job was re-driven from dead letters.
    pub redrives: u32,
    pub batch_id: Option<String>,
    pub idempotency_key: Option<String>,
    pub payload: Value,
    /// The handler's checkpoint, as it last saved it.
    pub checkpoint: Option<Value>,
    /// Why the job is in its state (waiting for a time, dead after N attempts, ...).
    pub reason: Option<String>,
    pub error: Option<JobError>,
    /// The consumer holding the job now, while a worker runs it.
    pub worker: Option<String>,
    pub created_ms: u64,
    pub updated_ms: u64,
    pub started_ms: Option<u64>,
    pub finished_ms: Option<u64>,
    /// When a scheduled job becomes due.
    pub run_at_ms: Option<u64>,
    pub estimated_micros: u64,
    pub charged_micros: u64,
    /// The span that enqueued the job; its trace id finds the job's trace in a tracing
    /// backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<TraceParent>,
}

impl JobRecord {
    /// Builds a record from the job hash; `None` for an empty (missing) hash.
    pub(crate) fn from_hash(id: &str, mut fields: HashMap<String, String>) -> Option<Self> {
        let state = fields.get("state")?.parse::<JobState>().ok()?;
        let number = |fields: &HashMap<String, String>, name: &str| {
            fields
                .get(name)
                .and_then(|v| v.parse::<i64>().ok())
                .map(|v| v.max(0) as u64)
        };
        let text = |fields: &mut HashMap<String, String>, name: &str| {
            fields.remove(name).filter(|value| !value.is_empty())
        };
        Some(JobRecord {
            id: id.to_owned(),
            state,
            priority: fields
                .get("prio")
                .and_then(|p| p.parse().ok())
                .unwrap_or_default(),
            attempts: number(&fields, "attempts").unwrap_or(0) as u32,
            max_attempts: number(&fields, "max_attempts").unwrap_or(0) as u32,
            redrives: number(&fields, "redrives").unwrap_or(0) as u32,
            created_ms: number(&fields, "created_ms").unwrap_or(0),
            updated_ms: number(&fields, "updated_ms").unwrap_or(0),
            started_ms: number(&fields, "started_ms"),
            finished_ms: number(&fields, "finished_ms"),
            run_at_ms: number(&fields, "run_at_ms"),
            estimated_micros: number(&fields, "est_micros").unwrap_or(0),
            charged_micros: number(&fields, "charged_micros").unwrap_or(0),
            queue: text(&mut fields, "q").unwrap_or_default(),
            batch_id: text(&mut fields, "batch"),
            idempotency_key: text(&mut fields, "idem"),
            payload: text(&mut fields, "payload")
                .and_then(|p| serde_json::from_str(&p).ok())
                .unwrap_or(Value::Null),
            checkpoint: text(&mut fields, "checkpoint").and_then(|c| serde_json::from_str(&c).ok()),
            reason: text(&mut fields, "reason"),
            error: text(&mut fields, "error").and_then(|e| serde_json::from_str(&e).ok()),
            worker: text(&mut fields, "worker"),
            trace: text(&mut fields, "trace").and_then(|t| t.parse().ok()),
        })
    }
}

/// A batch's counters as the queue keeps them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchRecord {
    pub id: String,
    /// Jobs enqueued into the batch.
    pub total: u64,
    /// Jobs per state; states with no job are left out.
    pub counts: BTreeMap<String, u64>,
    /// Jobs in a terminal state.
    pub terminal: u64,
    /// Sealed (every job enqueued) and every job terminal.
    pub done: bool,
    /// Whether every job of the batch has been enqueued.
    pub sealed: bool,
    pub estimated_micros: u64,
    pub charged_micros: u64,
    /// Spending cap for the batch, 0 when none.
    pub budget_micros: u64,
    /// What the producer attached (webhook URL, user fields), as JSON.
    pub info: Value,
    pub created_ms: u64,
    pub finished_ms: Option<u64>,
    /// Its failure guard stopped its submissions; a resume or a cancel decides the rest.
    pub paused: bool,
    /// Why it paused (the failures counted against the guard).
    pub pause_reason: Option<String>,
    /// Its runs that ended, and their summed time from create to end (ms): its ETA's basis.
    pub runs: u64,
    pub run_ms: u64,
}

impl BatchRecord {
    pub(crate) fn from_hash(id: &str, fields: HashMap<String, String>) -> Option<Self> {
        if fields.is_empty() {
            return None;
        }
        let number = |name: &str| {
            fields
                .get(name)
                .and_then(|v| v.parse::<i64>().ok())
                .map(|v| v.max(0) as u64)
        };
        let counts = fields
            .iter()
            .filter_map(|(key, value)| {
                let state = key.strip_prefix("n:")?;
                let count = value.parse::<i64>().ok()?;
                (count > 0).then(|| (state.to_owned(), count as u64))
            })
            .collect();
        Some(BatchRecord {
            id: id.to_owned(),
            total: number("total").unwrap_or(0),
            counts,
            terminal: number("terminal").unwrap_or(0),
            done: fields.get("done").is_some_and(|d| d == "1"),
            sealed: fields.get("sealed").is_some_and(|d| d == "1"),
            estimated_micros: number("est_micros").unwrap_or(0),
            charged_micros: number("charged_micros").unwrap_or(0),
            budget_micros: number("budget_micros").unwrap_or(0),
            info: fields
                .get("info")
                .and_then(|i| serde_json::from_str(i).ok())
                .unwrap_or(Value::Null),
            created_ms: number("created_ms").unwrap_or(0),
            finished_ms: number("finished_ms"),
            paused: fields.get("paused").is_some_and(|d| d == "1"),
            pause_reason: fields
                .get("pause_reason")
                .filter(|r| !r.is_empty())
                .cloned(),
            runs: number("runs").unwrap_or(0),
            run_ms: number("run_ms").unwrap_or(0),
        })
    }

    /// The batch's tenant (`default` when it names none).
    pub fn tenant(&self) -> &str {
        self.info
            .get("tenant")
            .and_then(Value::as_str)
            .unwrap_or(klingq_core::DEFAULT_TENANT)
    }

    /// The batch's estimated finish and remaining spend, now: with `provider` (every
    /// tenant's load, [`crate::Queue::provider_load`]) the fair share is played forward;
    /// without it the batch is assumed to keep the slots it holds.
    pub fn eta(
        &self,
        now_ms: u64,
        provider: Option<&klingq_core::ProviderLoad>,
    ) -> klingq_core::BatchEta {
        let remaining = self.total.saturating_sub(self.terminal);
        let running = ["submitting", "generating"]
            .iter()
            .filter_map(|state| self.counts.get(*state))
            .sum();
        let remaining_micros = self
            .estimated_micros
            .saturating_mul(remaining)
            .checked_div(self.total)
            .unwrap_or(0);
        klingq_core::BatchEta::estimate(klingq_core::EtaInputs {
            remaining,
            running,
            runs: self.runs,
            run_ms: self.run_ms,
            remaining_micros,
            now_ms,
            tenant: self.tenant(),
            provider,
            paused: self.paused,
        })
    }
}

/// Queue depth for metrics and autoscaling.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct QueueStats {
    pub queue: String,
    /// Ready and not yet delivered.
    pub waiting: u64,
    /// Delivered to a worker and not settled.
    pub in_flight: u64,
    /// Waiting for a time (not-before, retry backoff, budget, a provider slot); parked
    /// generations are counted in `parked`, not here.
    pub scheduled: u64,
    /// Generations waiting in Redis for their provider run, holding no worker: due at their
    /// next poll, or at once when the run's callback arrives.
    #[serde(default)]
    pub parked: u64,
    pub dead: u64,
    /// Age of the oldest waiting job, in ms (0 when none waits).
    pub oldest_waiting_ms: u64,
    /// Waiting per priority.
    pub waiting_by_priority: BTreeMap<String, u64>,
}

/// One entry of the events stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredEvent {
    /// The stream entry id (`<ms>-<seq>`): the cursor to resume from.
    pub cursor: String,
    /// The event's stable id.
    pub id: String,
    #[serde(rename = "type")]
    pub event_type: String,
    /// The event body, as published (compact JSON).
    pub body: String,
    /// What the event is about: a job id (`job.*`) or a batch id (`batch.completed`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub subject: String,
    /// The trace of the job the event is about (none for batch events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<TraceParent>,
}

impl StoredEvent {
    /// The event of a stream entry's fields (missing fields are empty).
    pub(crate) fn from_fields(cursor: String, fields: &HashMap<String, String>) -> Self {
        let field = |name: &str| fields.get(name).cloned().unwrap_or_default();
        StoredEvent {
            id: field("id"),
            event_type: field("type"),
            body: field("event"),
            subject: field("subject"),
            trace: fields.get("trace").and_then(|t| t.parse().ok()),
            cursor,
        }
    }
}
