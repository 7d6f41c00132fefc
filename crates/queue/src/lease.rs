//! [`Lease`]: a running handler's hold on its job. Through it the handler reads the job's
//! checkpoint and saves progress; a save succeeds only while this worker still holds the job,
//! which fences off a worker that stalled past its lease from doing another side effect.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use apalis_core::task::Task;
use apalis_core::task::from_request::FromRequest;
use klingq_core::{JobState, TraceParent};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{LeaseError, QueueError};
use crate::queue::Queue;
use crate::scripts;
use crate::worker::Shared;

/// What the queue knows of one delivery.
#[derive(Debug, Clone)]
pub(crate) struct Delivery {
    /// The partition of the job and its stream.
    pub(crate) partition: usize,
    pub(crate) stream: String,
    pub(crate) entry: String,
    pub(crate) job_id: String,
    pub(crate) attempts: u32,
    pub(crate) max_attempts: u32,
    pub(crate) payload: String,
    pub(crate) batch: Option<String>,
    pub(crate) redrives: u32,
    pub(crate) checkpoint: Option<String>,
    pub(crate) created_ms: u64,
    pub(crate) state: JobState,
    pub(crate) trace: Option<TraceParent>,
}

pub(crate) struct LeaseInner {
    pub(crate) shared: Arc<Shared>,
    pub(crate) delivery: Delivery,
    /// Set by the keeper when another consumer took the entry.
    pub(crate) lost: Arc<AtomicBool>,
    /// What to save with the settle ([`Lease::keep_checkpoint`], [`Lease::keep_progress`]).
    pub(crate) kept: std::sync::Mutex<Kept>,
}

/// A state and checkpoint a handler left to be saved with its settle.
#[derive(Debug, Default)]
pub(crate) struct Kept {
    /// The state a park leaves the job in (other settles name their own).
    pub(crate) state: Option<JobState>,
    /// The checkpoint (JSON).
    pub(crate) checkpoint: Option<String>,
}

/// A handler's hold on its job; extract it in a handler as an argument (`lease: Lease`).
#[derive(Clone)]
pub struct Lease {
    pub(crate) inner: Arc<LeaseInner>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("job_id", &self.inner.delivery.job_id)
            .field("entry", &self.inner.delivery.entry)
            .field("attempt", &self.inner.delivery.attempts)
            .finish()
    }
}

impl Lease {
    pub fn job_id(&self) -> &str {
        &self.inner.delivery.job_id
    }

    /// This delivery's attempt number, 1 for the first (crashed deliveries count).
    pub fn attempt(&self) -> u32 {
        self.inner.delivery.attempts
    }

    pub fn max_attempts(&self) -> u32 {
        self.inner.delivery.max_attempts
    }

    pub fn batch_id(&self) -> Option<&str> {
        self.inner.delivery.batch.as_deref()
    }

    /// Times the job was re-driven from dead letters: its life number.
    pub fn redrives(&self) -> u32 {
        self.inner.delivery.redrives
    }

    /// The state the job was in when delivered (where the last attempt left it).
    pub fn state_at_delivery(&self) -> JobState {
        self.inner.delivery.state
    }

    pub fn created_ms(&self) -> u64 {
        self.inner.delivery.created_ms
    }

    /// The span that enqueued the job, when it was enqueued with one: the parent of every
    /// attempt's span.
    pub fn trace_parent(&self) -> Option<TraceParent> {
        self.inner.delivery.trace
    }

    /// The job's payload as stored (JSON).
    pub fn payload_json(&self) -> &str {
        &self.inner.delivery.payload
    }

    /// The checkpoint saved by earlier attempts, or the default for a fresh job. A checkpoint
    /// that no longer decodes is an error: resuming blind could pay twice.
    pub fn checkpoint<T: DeserializeOwned + Default>(&self) -> Result<T, serde_json::Error> {
        match &self.inner.delivery.checkpoint {
            Some(text) => serde_json::from_str(text),
            None => Ok(T::default()),
        }
    }

    /// The queue, for reading records and for other crates' keys (shared limits, budgets).
    pub fn queue(&self) -> &Queue {
        &self.inner.shared.queue
    }

    /// This worker's consumer name.
    pub fn consumer(&self) -> &str {
        &self.inner.shared.consumer
    }

    /// Whether another worker took the job (this one stalled past its lease).
    pub fn is_lost(&self) -> bool {
        self.inner.lost.load(Ordering::Relaxed)
    }

    /// Whether the worker is shutting down: reach a checkpoint and return
    /// [`crate::JobFailure::Defer`] to hand the job on.
    pub fn is_shutting_down(&self) -> bool {
        self.inner.shared.is_shutting_down()
    }

    /// Saves the job's state and checkpoint. Call it before every side effect: it fails if
    /// the job was cancelled or another worker holds it (the worker's keeper renews leases).
    pub async fn save<C: Serialize>(
        &self,
        state: JobState,
        checkpoint: &C,
        reason: &str,
    ) -> Result<(), LeaseError> {
        let checkpoint = serde_json::to_string(checkpoint)?;
        self.write(state, &checkpoint, reason).await
    }

    /// Keeps `checkpoint` to be saved with how this attempt ends (a retry, deferral, park or
    /// failure), in the same write as the settle: for a handler that changed its checkpoint
    /// and then fails. It fences nothing: call [`Lease::save`] before a side effect.
    pub fn keep_checkpoint<C: Serialize>(&self, checkpoint: &C) -> Result<(), serde_json::Error> {
        let checkpoint = serde_json::to_string(checkpoint)?;
        self.inner.kept.lock().expect("kept poisoned").checkpoint = Some(checkpoint);
        Ok(())
    }

    /// Like [`Lease::keep_checkpoint`], and a park settling this attempt leaves the job in
    /// `state`: a step reached just before parking is written once, with the park.
    pub fn keep_progress<C: Serialize>(
        &self,
        state: JobState,
        checkpoint: &C,
    ) -> Result<(), serde_json::Error> {
        self.keep_checkpoint(checkpoint)?;
        self.inner.kept.lock().expect("kept poisoned").state = Some(state);
        Ok(())
    }

    /// What was kept for the settle, taken.
    pub(crate) fn take_kept(&self) -> Kept {
        std::mem::take(&mut *self.inner.kept.lock().expect("kept poisoned"))
    }

    /// Sets the job's state (and reason) without changing its checkpoint.
    pub async fn set_state(&self, state: JobState, reason: &str) -> Result<(), LeaseError> {
        self.write(state, "", reason).await
    }

    async fn write(
        &self,
        state: JobState,
        checkpoint: &str,
        reason: &str,
    ) -> Result<(), LeaseError> {
        if self.is_lost() {
            return Err(LeaseError::Lost);
        }
        let delivery = &self.inner.delivery;
        let shared = &self.inner.shared;
        let cmd = shared.queue.call(
            &scripts::CHECKPOINT,
            delivery.partition,
            &CheckpointHeader {
                stream: &delivery.stream,
                entry: &delivery.entry,
                consumer: &shared.consumer,
                id: &delivery.job_id,
                state: state.as_str(),
                checkpoint,
                reason,
            },
        );
        // Retry for most of a lease: past that, another worker may take the job anyway.
        let budget = shared.queue.config().lease_timeout() / 2;
        let reply: String = shared
            .queue
            .run_scripts(
                &crate::queue::ScriptBatch::One(cmd),
                budget.max(Duration::from_secs(1)),
            )
            .await
            .map_err(|error: QueueError| LeaseError::Redis(error))?;
        match reply.as_str() {
            // Trusted (a paid call may follow) only once replicated, when asked for.
            "ok" => Ok(shared.queue.replicated(delivery.partition).await?),
            "cancelled" => Err(LeaseError::Cancelled),
            "lost" => {
                self.inner.lost.store(true, Ordering::Relaxed);
                Err(LeaseError::Lost)
            }
            _ => Err(LeaseError::Gone),
        }
    }
}

crate::wire::record! {
    /// `checkpoint.lua`'s header.
    struct CheckpointHeader<'a> {
        stream: &'a str,
        entry: &'a str,
        consumer: &'a str,
        id: &'a str,
        state: &'a str,
        checkpoint: &'a str,
        reason: &'a str,
    }
}

impl<Args: Sync> FromRequest<Task<Args>> for Lease {
    type Error = apalis_core::task::data::MissingDataError;

    async fn from_request(task: &Task<Args>) -> Result<Self, Self::Error> {
        task.ctx().data().get_checked::<Lease>().cloned()
    }
}
