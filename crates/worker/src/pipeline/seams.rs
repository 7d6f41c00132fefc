//! The pipeline's seams: what a job's attempt needs of the object store, of its own hold on
//! the job and of the shared coordination in Redis, each as a narrow object-safe trait (boxed
//! futures, like `VideoProvider`), so the state machine runs against in-memory fakes in unit
//! tests. The runtime hands over the real types: [`VideoStore`], [`Lease`] and [`Queue`]; the
//! implementations below only forward to their methods of the same name.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::future::BoxFuture;
use klingq_core::{Checkpoint, JobState, TenantPolicy};
use klingq_queue::{BudgetDecision, Lease, LeaseError, Queue, QueueError, SlotClaim, SlotStatus};
use klingq_storage::{RehostError, StorageError, StoredVideo, VideoStore};

/// Where videos are re-hosted: a verified object per job.
pub trait ObjectStore: Send + Sync {
    /// The job's object when it is stored and verified (it carries its sha256), else `None`.
    fn head<'a>(
        &'a self,
        job_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<StoredVideo>, StorageError>>;

    /// Downloads `source_url` and stores it as the job's object, verified on the way;
    /// `expected_size` is the provider's `file_size`, if any.
    fn rehost<'a>(
        &'a self,
        job_id: &'a str,
        source_url: &'a str,
        expected_size: Option<u64>,
    ) -> BoxFuture<'a, Result<StoredVideo, RehostError>>;
}

/// A running attempt's hold on its job (the queue's [`Lease`]): its identity, its checkpoint
/// and the fenced writes of its progress.
pub trait JobHandle: Send + Sync {
    /// The job id (a UUID for jobs of the video queue).
    fn job_id(&self) -> &str;

    /// When the job was created, in ms since the epoch.
    fn created_ms(&self) -> u64;

    /// This delivery's attempt number (1 for the first).
    fn attempt(&self) -> u32;

    /// The checkpoint saved by earlier attempts, or the default for a fresh job.
    fn checkpoint(&self) -> Result<Checkpoint, serde_json::Error>;

    /// Saves the job's state and checkpoint; fails if the job was cancelled or another worker
    /// holds it.
    fn save<'a>(
        &'a self,
        state: JobState,
        checkpoint: &'a Checkpoint,
        reason: &'a str,
    ) -> BoxFuture<'a, Result<(), LeaseError>>;

    /// Keeps `checkpoint` to be saved with how the attempt ends (a retry, deferral or
    /// failure), in the same write: for a step that fails after changing the checkpoint.
    fn keep_checkpoint(&self, checkpoint: &Checkpoint) -> Result<(), LeaseError>;

    /// Keeps `checkpoint` and `state` for the park that ends the attempt: a step reached just
    /// before parking is written once, with the park.
    fn keep_progress(&self, state: JobState, checkpoint: &Checkpoint) -> Result<(), LeaseError>;

    /// Sets the job's state (and reason) without changing its checkpoint.
    fn set_state<'a>(
        &'a self,
        state: JobState,
        reason: &'a str,
    ) -> BoxFuture<'a, Result<(), LeaseError>>;

    /// Whether the worker is shutting down (hand the job on at the next checkpoint).
    fn is_shutting_down(&self) -> bool;

    /// Whether another worker took the job.
    fn is_lost(&self) -> bool;

    /// The shared coordination of the job's queue.
    fn queue(&self) -> &dyn Coordination;
}

/// What the pipeline shares with every other job and replica (the queue's [`Queue`]): the
/// provider limit's slots, budgets, pauses, run bindings, generation times and job states.
pub trait Coordination: Send + Sync {
    /// The reason `name` is paused, if it is.
    fn pause_reason<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<String>, QueueError>>;

    /// Pauses `name` for every replica for `ttl`.
    fn set_pause<'a>(
        &'a self,
        name: &'a str,
        ttl: Duration,
        reason: &'a str,
    ) -> BoxFuture<'a, Result<(), QueueError>>;

    /// Reserves a job's estimated cost against the daily, tenant and batch budgets.
    fn reserve_budget<'a>(
        &'a self,
        job_id: &'a str,
        micros: u64,
        daily_limit_micros: u64,
        tenant: &'a str,
        tenant_daily_micros: u64,
    ) -> BoxFuture<'a, Result<BudgetDecision, QueueError>>;

    /// Takes back a lapsed slot of a run that exists (renews a held one), if one is free.
    fn acquire_slot<'a>(
        &'a self,
        name: &'a str,
        holder: &'a str,
        claim: SlotClaim<'a>,
        lease: Duration,
        max: u64,
    ) -> BoxFuture<'a, Result<SlotStatus, QueueError>>;

    /// Takes or renews a slot in fair order between tenants; a holder turned away waits for
    /// the fair share to give it one.
    fn acquire_slot_or_wait<'a>(
        &'a self,
        name: &'a str,
        holder: &'a str,
        claim: SlotClaim<'a>,
        lease: Duration,
        max: u64,
    ) -> BoxFuture<'a, Result<SlotStatus, QueueError>>;

    /// The tenant policies operators set through the API.
    fn tenant_policies(&self) -> BoxFuture<'_, Result<BTreeMap<String, TenantPolicy>, QueueError>>;

    /// Extends a slot `holder` already has.
    fn renew_slot<'a>(
        &'a self,
        name: &'a str,
        holder: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<bool, QueueError>>;

    /// Gives a slot back, and wakes the first waiter for it.
    fn release_slot<'a>(
        &'a self,
        name: &'a str,
        holder: &'a str,
    ) -> BoxFuture<'a, Result<(), QueueError>>;

    /// Gives a slot back unless its expiry lies past `fence_ms`; whether one was removed.
    fn release_slot_fenced<'a>(
        &'a self,
        name: &'a str,
        holder: &'a str,
        fence_ms: u64,
    ) -> BoxFuture<'a, Result<bool, QueueError>>;

    /// Lowers the shared cap after the provider throttled us; the new cap.
    fn throttle_slots<'a>(
        &'a self,
        name: &'a str,
        max: u64,
        recovery_period: Duration,
    ) -> BoxFuture<'a, Result<u64, QueueError>>;

    /// Binds a run to its job for the run's callback; the status of a callback that came
    /// first, if one did.
    fn bind_run<'a>(
        &'a self,
        job_id: &'a str,
        run_id: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Option<String>, QueueError>>;

    /// The generation-time histogram of a kind of run, as `(bucket field, count)` pairs.
    fn gen_times<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Vec<(String, u64)>, QueueError>>;

    /// Counts a finished run in the bucket `bucket` of its kind's histogram.
    fn record_gen_time<'a>(
        &'a self,
        name: &'a str,
        bucket: &'a str,
        cap: u64,
    ) -> BoxFuture<'a, Result<(), QueueError>>;

    /// A job's state, `None` when the job is gone.
    fn job_state<'a>(
        &'a self,
        job_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<JobState>, QueueError>>;
}

impl ObjectStore for VideoStore {
    fn head<'a>(
        &'a self,
        job_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<StoredVideo>, StorageError>> {
        Box::pin(VideoStore::head(self, job_id))
    }

    fn rehost<'a>(
        &'a self,
        job_id: &'a str,
        source_url: &'a str,
        expected_size: Option<u64>,
    ) -> BoxFuture<'a, Result<StoredVideo, RehostError>> {
        Box::pin(VideoStore::rehost(self, job_id, source_url, expected_size))
    }
}

impl JobHandle for Lease {
    fn job_id(&self) -> &str {
        Lease::job_id(self)
    }

    fn created_ms(&self) -> u64 {
        Lease::created_ms(self)
    }

    fn attempt(&self) -> u32 {
        Lease::attempt(self)
    }

    fn checkpoint(&self) -> Result<Checkpoint, serde_json::Error> {
        Lease::checkpoint(self)
    }

    fn save<'a>(
        &'a self,
        state: JobState,
        checkpoint: &'a Checkpoint,
        reason: &'a str,
    ) -> BoxFuture<'a, Result<(), LeaseError>> {
        Box::pin(Lease::save(self, state, checkpoint, reason))
    }

    fn keep_checkpoint(&self, checkpoint: &Checkpoint) -> Result<(), LeaseError> {
        Ok(Lease::keep_checkpoint(self, checkpoint)?)
    }

    fn keep_progress(&self, state: JobState, checkpoint: &Checkpoint) -> Result<(), LeaseError> {
        Ok(Lease::keep_progress(self, state, checkpoint)?)
    }

    fn set_state<'a>(
        &'a self,
        state: JobState,
        reason: &'a str,
    ) -> BoxFuture<'a, Result<(), LeaseError>> {
        Box::pin(Lease::set_state(self, state, reason))
    }

    fn is_shutting_down(&self) -> bool {
        Lease::is_shutting_down(self)
    }

    fn is_lost(&self) -> bool {
        Lease::is_lost(self)
    }

    fn queue(&self) -> &dyn Coordination {
        Lease::queue(self)
    }
}

impl Coordination for Queue {
    fn pause_reason<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<String>, QueueError>> {
        Box::pin(Queue::pause_reason(self, name))
    }

    fn set_pause<'a>(
        &'a self,
        name: &'a str,
        ttl: Duration,
        reason: &'a str,
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(Queue::set_pause(self, name, ttl, reason))
    }

    fn reserve_budget<'a>(
        &'a self,
        job_id: &'a str,
        micros: u64,
        daily_limit_micros: u64,
        tenant: &'a str,
        tenant_daily_micros: u64,
    ) -> BoxFuture<'a, Result<BudgetDecision, QueueError>> {
        Box::pin(Queue::reserve_budget(
            self,
            job_id,
            micros,
            daily_limit_micros,
            tenant,
            tenant_daily_micros,
        ))
    }

    fn acquire_slot<'a>(
        &'a self,
        name: &'a str,
        holder: &'a str,
        claim: SlotClaim<'a>,
        lease: Duration,
        max: u64,
    ) -> BoxFuture<'a, Result<SlotStatus, QueueError>> {
        Box::pin(Queue::acquire_slot(self, name, holder, claim, lease, max))
    }

    fn acquire_slot_or_wait<'a>(
        &'a self,
        name: &'a str,
        holder: &'a str,
        claim: SlotClaim<'a>,
        lease: Duration,
        max: u64,
    ) -> BoxFuture<'a, Result<SlotStatus, QueueError>> {
        Box::pin(Queue::acquire_slot_or_wait(
            self, name, holder, claim, lease, max,
        ))
    }

    fn tenant_policies(&self) -> BoxFuture<'_, Result<BTreeMap<String, TenantPolicy>, QueueError>> {
        Box::pin(Queue::tenant_policies(self))
    }

    fn renew_slot<'a>(
        &'a self,
        name: &'a str,
        holder: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<bool, QueueError>> {
        Box::pin(Queue::renew_slot(self, name, holder, lease))
    }

    fn release_slot<'a>(
        &'a self,
        name: &'a str,
        holder: &'a str,
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(Queue::release_slot(self, name, holder))
    }

    fn release_slot_fenced<'a>(
        &'a self,
        name: &'a str,
        holder: &'a str,
        fence_ms: u64,
    ) -> BoxFuture<'a, Result<bool, QueueError>> {
        Box::pin(Queue::release_slot_fenced(self, name, holder, fence_ms))
    }

    fn throttle_slots<'a>(
        &'a self,
        name: &'a str,
        max: u64,
        recovery_period: Duration,
    ) -> BoxFuture<'a, Result<u64, QueueError>> {
        Box::pin(Queue::throttle_slots(self, name, max, recovery_period))
    }

    fn bind_run<'a>(
        &'a self,
        job_id: &'a str,
        run_id: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Option<String>, QueueError>> {
        Box::pin(Queue::bind_run(self, job_id, run_id, ttl))
    }

    fn gen_times<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Vec<(String, u64)>, QueueError>> {
        Box::pin(Queue::gen_times(self, name))
    }

    fn record_gen_time<'a>(
        &'a self,
        name: &'a str,
        bucket: &'a str,
        cap: u64,
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(Queue::record_gen_time(self, name, bucket, cap))
    }

    fn job_state<'a>(
        &'a self,
        job_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<JobState>, QueueError>> {
        Box::pin(Queue::job_state(self, job_id))
    }
}
