//! klingq's job queue on Redis, and its backend for apalis 1.0 workers.
//!
//! This is the only crate that knows Redis key names ([`Keys`]). Producers use [`Queue`] to
//! enqueue jobs and batches, read records, cancel, list dead letters and re-drive them; the
//! webhook service reads the events stream through an [`EventsGroup`] and keeps its records
//! through `Queue` too, so no other crate sends Redis commands. Workers
//! run a stock apalis `WorkerBuilder` over [`QueueBackend`]; handlers take a [`Lease`] to read
//! their checkpoint and save progress, and end an attempt with `Ok` ([`Completion`]) or a
//! [`JobFailure`] saying whether to retry, defer, fail or stop.
//!
//! # Layout in Redis
//! See [`Keys`] and ARCHITECTURE.md. One job is a hash; a delivery is an entry in a ready
//! stream (one per priority) read by the consumer group `workers`; a delay is a member of a
//! sorted set; a dead job is a member of the dead set; state changes that touch several keys
//! run as Lua scripts (`src/lua/`), so a job, its batch counters and its completion event
//! always agree.

mod admin;
mod completion;
mod config;
mod conn;
mod error;
mod event_log;
mod events_group;
mod history;
mod keys;
mod layer;
mod lease;
mod limits;
pub mod metrics;
mod partition;
mod queue;
mod record;
mod runs;
mod scripts;
mod tenants;
mod webhook_records;
mod wire;
mod worker;

pub use admin::CommandCounters;
pub use completion::EventExtras;
pub use config::QueueConfig;
pub use conn::{
    Dedicated, ERROR_KINDS, RedisMode, SharedConn, TargetError, Topology, error_kind, key_slot,
};
pub use error::{JobFailure, LeaseError, QueueError};
pub use event_log::EventCursor;
pub use events_group::{ClaimedEntries, EventsGroup, GroupEntries};
pub use history::{HISTORY_MINUTES, HISTORY_OUTCOMES, HistoryPoint, minute_of};
pub use keys::Keys;
pub use layer::{Completion, Outcome, SettleLayer, SettleService};
pub use lease::Lease;
pub use limits::{BudgetDecision, SlotClaim, SlotStatus, SlotWait};
pub use partition::{MAX_PARTITIONS, Partitions};
pub use queue::{CancelOutcome, Enqueued, NewJob, OpenedBatch, Queue, RedriveOutcome};
pub use record::{BatchRecord, JobRecord, QueueStats, StoredEvent};
pub use runs::{CallbackOutcome, EARLY_CALLBACK_TTL, WakeOutcome};
pub use tenants::{PROVIDER_LIMIT, TENANT_OUTCOMES, TenantUsage};
pub use worker::{QueueBackend, WorkerHandle, WorkerOptions, WorkerStats, consumer_name};
