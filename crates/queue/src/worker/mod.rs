//! [`QueueBackend`]: the apalis 1.0 `Backend` that delivers this queue's jobs to a worker.
//!
//! - Fetch: `XREADGROUP` on a dedicated connection (a BLOCK would stall every command behind it
//!   on a shared one), never more entries than the worker has free slots, high priority first.
//! - Start: one script counts the attempt of every fetched entry before any handler runs, so an
//!   attempt whose worker dies still counts.
//! - Lease: the entry's idle time in the stream's pending list. A keeper task renews every held
//!   entry each `lease_timeout / 3`, checking ownership, and flags entries another worker took.
//! - Recovery: every `reclaim_interval`, `XAUTOCLAIM` takes entries idle for a whole lease.
//! - Promotion: the keeper moves due delayed jobs to ready in bounded steps.
//! - Errors: a Redis error never reaches apalis (it would end the worker): the backend drops
//!   the fetch connection, backs off and reconnects; handlers in flight keep running.
//! - Shutdown: `poll_close` unblocks a pending read and puts fetched-but-unstarted entries back.

mod backend;
mod dead_letter;
mod fetch;
mod keeper;
mod settle;

pub use backend::QueueBackend;
pub(crate) use dead_letter::delivery_event;
use keeper::release;
use settle::SettleRequest;
pub(crate) use settle::{Settle, settle};

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use apalis_core::worker::context::WorkerContext;
use klingq_core::Priority;
use klingq_core::job::now_ms;
use tokio::sync::{mpsc, watch};

use crate::conn::Dedicated;
use crate::error::QueueError;
use crate::queue::Queue;

/// A unique consumer name for this process: host, pid, start time and a random suffix.
pub fn consumer_name(prefix: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "host".to_owned());
    let suffix: u32 = rand::random();
    format!(
        "{prefix}-{host}-{}-{}-{suffix:08x}",
        std::process::id(),
        now_ms()
    )
}

/// An entry this worker holds: fetched, maybe running, not yet settled.
#[derive(Debug, Clone)]
pub(crate) struct Held {
    pub(crate) partition: usize,
    pub(crate) stream: String,
    pub(crate) entry: String,
    pub(crate) job_id: String,
    pub(crate) lost: Arc<AtomicBool>,
}

/// State shared by the backend, its keeper, its layer and every lease.
pub(crate) struct Shared {
    pub(crate) queue: Queue,
    pub(crate) consumer: String,
    /// The worker's handler concurrency: fetches never exceed the free slots.
    pub(crate) concurrency: usize,
    /// Entry id → what it is; renewed by the keeper until settled.
    pub(crate) held: Mutex<HashMap<String, Held>>,
    /// Handlers running now (between the layer's call and its settle).
    pub(crate) running: AtomicUsize,
    /// Each fetch connection's client id and node, so shutdown can unblock its read.
    pub(crate) fetch_clients: std::sync::Mutex<HashMap<usize, (i64, Dedicated)>>,
    /// Partitions read together on one fetch connection: all of them on one node, each on
    /// its own in a cluster (a command's keys must share a slot there).
    groups: Vec<Vec<usize>>,
    pub(crate) worker: OnceLock<WorkerContext>,
    /// Stops the keeper.
    pub(crate) stop: watch::Sender<bool>,
    /// XAUTOCLAIM cursors per stream.
    reclaim_cursors: Mutex<HashMap<String, String>>,
    /// Settle script calls waiting to be pipelined by the settler task.
    settler: OnceLock<mpsc::UnboundedSender<SettleRequest>>,
    pub(crate) stats: WorkerStats,
}

/// Counters of one worker, for metrics.
#[derive(Debug, Default)]
pub struct WorkerStats {
    pub fetched: AtomicUsize,
    pub reclaimed: AtomicUsize,
    pub succeeded: AtomicUsize,
    pub failed: AtomicUsize,
    pub retried: AtomicUsize,
    pub deferred: AtomicUsize,
    /// Jobs that gave their slot back to wait for their provider run in Redis.
    pub parked: AtomicUsize,
    pub dead: AtomicUsize,
    pub leases_lost: AtomicUsize,
    pub redis_errors: AtomicUsize,
}

impl Shared {
    pub(crate) fn is_shutting_down(&self) -> bool {
        self.worker.get().is_some_and(|w| w.is_shutting_down()) || *self.stop.borrow()
    }

    /// The ready streams of `partitions`, high priority first: (partition, stream).
    fn streams_of(&self, partitions: &[usize]) -> Vec<(usize, String)> {
        let parts = self.queue.partitions();
        Priority::ALL
            .iter()
            .flat_map(|priority| {
                partitions
                    .iter()
                    .map(move |p| (*p, parts.keys(*p).ready(self.queue.name(), *priority)))
            })
            .collect()
    }

    fn note_redis_error(&self, what: &str, error: &QueueError) {
        self.stats.redis_errors.fetch_add(1, Ordering::Relaxed);
        self.queue.record_error(error);
        tracing::warn!(consumer = %self.consumer, %error, "{what} failed");
    }
}

/// A handle on a running worker's queue state, kept by the process after the worker stops.
#[derive(Clone)]
pub struct WorkerHandle {
    shared: Arc<Shared>,
}

impl WorkerHandle {
    pub fn consumer(&self) -> &str {
        &self.shared.consumer
    }

    /// Entries this worker holds now (fetched or running, not settled).
    pub fn held(&self) -> usize {
        self.shared.held.lock().expect("held map poisoned").len()
    }

    /// Handlers running now.
    pub fn running(&self) -> usize {
        self.shared.running.load(Ordering::Relaxed)
    }

    pub fn stats(&self) -> &WorkerStats {
        &self.shared.stats
    }

    /// Puts every entry still held back on the ready streams, without counting an attempt:
    /// for a shutdown whose grace period ran out. Jobs resume from their checkpoints.
    pub async fn release_held(&self) -> usize {
        let held: Vec<(String, Held)> = self
            .shared
            .held
            .lock()
            .expect("held map poisoned")
            .drain()
            .collect();
        release(&self.shared, held).await
    }
}

/// Options of one worker's backend.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Unique per process (see [`consumer_name`]): leases are checked by consumer name.
    pub consumer: String,
    /// Must equal the worker's `.concurrency(n)`: fetches never exceed free slots.
    pub concurrency: usize,
}

/// The key of a held entry: entry ids are unique per stream only.
pub(crate) fn held_key(stream: &str, entry: &str) -> String {
    format!("{stream} {entry}")
}
