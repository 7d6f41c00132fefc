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

use std::collections::{HashMap, VecDeque};
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use apalis_core::backend::{Backend, BackendConfig};
use apalis_core::task::Task;
use apalis_core::task::builder::TaskBuilder;
use apalis_core::task::task_id::TaskId;
use apalis_core::worker::context::WorkerContext;
use futures::future::BoxFuture;
use futures::future::FutureExt;
use futures::stream::{FuturesUnordered, StreamExt};
use klingq_core::job::now_ms;
use klingq_core::{JobError, JobState, Priority};
use redis::Value;
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, oneshot, watch};

use crate::completion::{self, BuiltEvent, EventExtras, EventSubject};
use crate::conn::Dedicated;
use crate::error::QueueError;
use crate::keys::GROUP;
use crate::layer::SettleLayer;
use crate::lease::{Delivery, Lease, LeaseInner};
use crate::queue::{Queue, ScriptBatch, parse_entries, parse_streams, value_string};
use crate::scripts;

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

/// How a delivery is settled.
#[derive(Debug)]
pub(crate) enum Settle {
    Finish {
        state: JobState,
        reason: String,
        error: Option<JobError>,
        event: Option<BuiltEvent>,
        charged_micros: u64,
    },
    Retry {
        delay: Duration,
        reason: String,
        error: Option<JobError>,
    },
    Defer {
        delay: Duration,
        reason: String,
    },
    Park {
        delay: Duration,
        reason: String,
    },
}

/// Settles a delivery, retrying Redis errors for up to a lease; then forgets the entry.
/// If Redis stays away, the entry stays pending and is handed out again after its lease.
pub(crate) async fn settle(shared: &Shared, delivery: &Delivery, settle: Settle) {
    let mut args: Vec<String> = vec![
        delivery.stream.clone(),
        delivery.entry.clone(),
        shared.consumer.clone(),
        delivery.job_id.clone(),
    ];
    let (action, state, delay, reason, error, event, charged) = match settle {
        Settle::Finish {
            state,
            reason,
            error,
            event,
            charged_micros,
        } => (
            "finish",
            state.as_str(),
            Duration::ZERO,
            reason,
            error,
            event,
            charged_micros,
        ),
        Settle::Retry {
            delay,
            reason,
            error,
        } => ("retry", "", delay, reason, error, None, 0),
        Settle::Defer { delay, reason } => ("defer", "", delay, reason, None, None, 0),
        Settle::Park { delay, reason } => ("park", "", delay, reason, None, None, 0),
    };
    args.extend([
        action.to_owned(),
        state.to_owned(),
        (delay.as_millis() as u64).to_string(),
        reason,
        error_json(error.as_ref()),
    ]);
    match event {
        Some(event) => args.extend([event.id, event.event_type.to_owned(), event.body]),
        None => args.extend([String::new(), String::new(), String::new()]),
    }
    args.push(charged.to_string());
    match run_settle(shared, delivery.partition, args).await {
        Ok(reply) if reply == "lost" => {
            shared.stats.leases_lost.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(job_id = %delivery.job_id, "settle refused: another worker holds the job");
        }
        Ok(_) => {}
        Err(error) => shared.note_redis_error("settle", &error),
    }
    shared
        .held
        .lock()
        .expect("held map poisoned")
        .remove(&held_key(&delivery.stream, &delivery.entry));
}

/// Where a settle's reply goes.
type SettleReply = oneshot::Sender<Result<String, QueueError>>;

/// One settle's partition, its 13 script arguments and where its reply goes.
type SettleRequest = (usize, Vec<String>, SettleReply);

/// Runs a settle through the settler task, which folds concurrent settles into one script
/// call per partition; directly when there is no settler.
async fn run_settle(
    shared: &Shared,
    partition: usize,
    args: Vec<String>,
) -> Result<String, QueueError> {
    if let Some(settler) = shared.settler.get() {
        let (reply_to, reply) = oneshot::channel();
        if settler.send((partition, args.clone(), reply_to)).is_ok()
            && let Ok(result) = reply.await
        {
            return result;
        }
    }
    let replies = settle_batch(&shared.queue, partition, std::slice::from_ref(&args)).await?;
    Ok(replies.into_iter().next().unwrap_or_default())
}

/// Runs one settle script call for many settles of partition `p`. Every settle is safe to
/// run twice (the ownership check answers 'gone'), so retrying the call after a lost reply
/// is harmless.
async fn settle_batch(
    queue: &Queue,
    p: usize,
    settles: &[Vec<String>],
) -> Result<Vec<String>, QueueError> {
    let mut cmd = queue.script_cmd_in(&scripts::SETTLE, p);
    for args in settles {
        for arg in args {
            cmd.arg(arg);
        }
    }
    let budget = queue.config().lease_timeout();
    queue.run_scripts(&ScriptBatch::One(cmd), budget).await
}

/// Folds whatever settles are waiting (up to 128) into one script call per partition.
async fn settler(queue: Queue, mut requests: mpsc::UnboundedReceiver<SettleRequest>) {
    while let Some(first) = requests.recv().await {
        let mut waiting = vec![first];
        while waiting.len() < 128 {
            match requests.try_recv() {
                Ok(request) => waiting.push(request),
                Err(_) => break,
            }
        }
        let mut by_partition: HashMap<usize, Vec<(Vec<String>, _)>> = HashMap::new();
        for (p, args, reply_to) in waiting {
            by_partition.entry(p).or_default().push((args, reply_to));
        }
        futures::future::join_all(
            by_partition
                .into_iter()
                .map(|(p, batch)| settle_group(&queue, p, batch)),
        )
        .await;
    }
}

/// Settles one partition's waiting settles in one script call and answers each.
async fn settle_group(queue: &Queue, p: usize, batch: Vec<(Vec<String>, SettleReply)>) {
    let (args, reply_tos): (Vec<Vec<String>>, Vec<_>) = batch.into_iter().unzip();
    match settle_batch(queue, p, &args).await {
        Ok(replies) => {
            for (reply_to, reply) in reply_tos.into_iter().zip(replies) {
                let _ = reply_to.send(Ok(reply));
            }
        }
        Err(error) => {
            let message = error.to_string();
            for reply_to in reply_tos {
                let _ = reply_to.send(Err(QueueError::Protocol(message.clone())));
            }
        }
    }
}

fn error_json(error: Option<&JobError>) -> String {
    error
        .and_then(|e| serde_json::to_string(e).ok())
        .unwrap_or_default()
}

/// Builds the completion event of a delivery ending in `state`.
pub(crate) fn delivery_event(
    shared: &Shared,
    delivery: &Delivery,
    state: JobState,
    error: Option<&JobError>,
    extras: EventExtras,
) -> Option<BuiltEvent> {
    if !shared.queue.config().completion_events {
        return None;
    }
    let payload: serde_json::Value =
        serde_json::from_str(&delivery.payload).unwrap_or(serde_json::Value::Null);
    completion::build(
        &EventSubject {
            job_id: &delivery.job_id,
            batch_id: delivery.batch.as_deref(),
            redrives: delivery.redrives,
            payload: &payload,
        },
        state,
        error,
        extras,
        now_ms(),
    )
}

/// Dead-letters a delivery the queue itself gives up on (undecodable, attempts exhausted).
async fn dead_letter(shared: Arc<Shared>, delivery: Delivery, code: &str, message: String) {
    let error = JobError {
        step: "queue".to_owned(),
        code: code.to_owned(),
        message: message.clone(),
        details: Vec::new(),
        cost_committed: false,
    };
    let event = delivery_event(
        &shared,
        &delivery,
        JobState::Dead,
        Some(&error),
        EventExtras::default(),
    );
    shared.stats.dead.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(job_id = %delivery.job_id, code, %message, "job dead-lettered");
    settle(
        &shared,
        &delivery,
        Settle::Finish {
            state: JobState::Dead,
            reason: message,
            error: Some(error),
            event,
            charged_micros: 0,
        },
    )
    .await;
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

/// Held entries grouped by partition, in chunks of at most 256 (one script call each).
fn by_partition<T>(entries: Vec<(usize, T)>) -> Vec<(usize, Vec<T>)> {
    let mut groups: HashMap<usize, Vec<T>> = HashMap::new();
    for (p, entry) in entries {
        groups.entry(p).or_default().push(entry);
    }
    let mut chunks = Vec::new();
    for (p, mut group) in groups {
        while !group.is_empty() {
            let rest = group.split_off(group.len().min(256));
            chunks.push((p, std::mem::replace(&mut group, rest)));
        }
    }
    chunks
}

async fn release(shared: &Shared, entries: Vec<(String, Held)>) -> usize {
    let mut n_released = 0;
    let entries = entries
        .into_iter()
        .map(|(_, held)| (held.partition, held))
        .collect();
    for (p, chunk) in by_partition(entries) {
        let mut cmd = shared.queue.script_cmd_in(&scripts::RELEASE_MANY, p);
        cmd.arg(&shared.consumer);
        for held in &chunk {
            cmd.arg(&held.stream).arg(&held.entry).arg(&held.job_id);
        }
        match shared
            .queue
            .run_scripts::<usize>(&ScriptBatch::One(cmd), Duration::from_secs(5))
            .await
        {
            Ok(n) => n_released += n,
            Err(error) => shared.note_redis_error("release", &error),
        }
    }
    n_released
}

/// Options of one worker's backend.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Unique per process (see [`consumer_name`]): leases are checked by consumer name.
    pub consumer: String,
    /// Must equal the worker's `.concurrency(n)`: fetches never exceed free slots.
    pub concurrency: usize,
}

type FetchOutput = (Vec<Option<Dedicated>>, Result<Vec<Delivery>, QueueError>);

/// The apalis backend of one queue for one worker. See the module docs.
pub struct QueueBackend<Args> {
    shared: Arc<Shared>,
    buffer: VecDeque<Task<Args>>,
    fetch: Option<BoxFuture<'static, FetchOutput>>,
    /// One fetch connection per group of partitions (`None`: to open).
    conns: Vec<Option<Dedicated>>,
    /// Which group reads first next time, so that no partition starves another.
    turn: usize,
    backoff: Option<Pin<Box<tokio::time::Sleep>>>,
    n_failures: u32,
    last_reclaim: Option<Instant>,
    keeper_started: bool,
    close: Option<BoxFuture<'static, ()>>,
    _args: PhantomData<fn() -> Args>,
}

// Nothing in the backend is structurally pinned; `Task<Args>` sits in a VecDeque.
impl<Args> Unpin for QueueBackend<Args> {}

impl<Args> QueueBackend<Args> {
    pub fn new(queue: Queue, options: WorkerOptions) -> Self {
        let (stop, _) = watch::channel(false);
        let n = queue.partitions().len();
        let groups: Vec<Vec<usize>> = if queue.redis().is_cluster() {
            (0..n).map(|p| vec![p]).collect()
        } else {
            vec![(0..n).collect()]
        };
        let n_groups = groups.len();
        Self {
            shared: Arc::new(Shared {
                queue,
                consumer: options.consumer,
                concurrency: options.concurrency.max(1),
                held: Mutex::new(HashMap::new()),
                running: AtomicUsize::new(0),
                fetch_clients: std::sync::Mutex::new(HashMap::new()),
                groups,
                worker: OnceLock::new(),
                stop,
                reclaim_cursors: Mutex::new(HashMap::new()),
                settler: OnceLock::new(),
                stats: WorkerStats::default(),
            }),
            buffer: VecDeque::new(),
            fetch: None,
            conns: vec![None; n_groups],
            turn: 0,
            backoff: None,
            n_failures: 0,
            last_reclaim: None,
            keeper_started: false,
            close: None,
            _args: PhantomData,
        }
    }

    pub fn handle(&self) -> WorkerHandle {
        WorkerHandle {
            shared: self.shared.clone(),
        }
    }

    fn free_slots(&self) -> usize {
        let running = self.shared.running.load(Ordering::Relaxed);
        let max = self.shared.queue.config().fetch_batch.max(1);
        self.shared
            .concurrency
            .saturating_sub(running + self.buffer.len())
            .clamp(1, max)
    }
}

impl<Args> Drop for QueueBackend<Args> {
    fn drop(&mut self) {
        let _ = self.shared.stop.send(true);
    }
}

impl<Args: DeserializeOwned + Send + Sync + 'static> QueueBackend<Args> {
    /// Turns deliveries into tasks; dead-letters the undecodable and the exhausted.
    fn accept(&mut self, deliveries: Vec<Delivery>) {
        for delivery in deliveries {
            self.shared.stats.fetched.fetch_add(1, Ordering::Relaxed);
            if delivery.attempts > delivery.max_attempts {
                let message = format!(
                    "gave up after {} attempts (attempts whose worker died count too)",
                    delivery.max_attempts
                );
                tokio::spawn(dead_letter(
                    self.shared.clone(),
                    delivery,
                    "ATTEMPTS_EXHAUSTED",
                    message,
                ));
                continue;
            }
            let args = match serde_json::from_str::<Args>(&delivery.payload) {
                Ok(args) => args,
                Err(error) => {
                    let message = format!("payload could not be decoded: {error}");
                    tokio::spawn(dead_letter(
                        self.shared.clone(),
                        delivery,
                        "UNDECODABLE_PAYLOAD",
                        message,
                    ));
                    continue;
                }
            };
            let lost = Arc::new(AtomicBool::new(false));
            self.shared.held.lock().expect("held map poisoned").insert(
                held_key(&delivery.stream, &delivery.entry),
                Held {
                    partition: delivery.partition,
                    stream: delivery.stream.clone(),
                    entry: delivery.entry.clone(),
                    job_id: delivery.job_id.clone(),
                    lost: lost.clone(),
                },
            );
            let attempt = delivery.attempts.saturating_sub(1) as usize;
            let max_attempts = delivery.max_attempts as usize;
            let task_id = TaskId::from_string(delivery.job_id.clone());
            let lease = Lease {
                inner: Arc::new(LeaseInner {
                    shared: self.shared.clone(),
                    delivery,
                    lost,
                }),
            };
            let task = TaskBuilder::new(args)
                .task_id(task_id)
                .attempt(attempt)
                .max_attempts(max_attempts)
                .data(lease)
                .build();
            self.buffer.push_back(task);
        }
    }

    fn start_keeper(&mut self) {
        if self.keeper_started {
            return;
        }
        self.keeper_started = true;
        let (sender, receiver) = mpsc::unbounded_channel();
        if self.shared.settler.set(sender).is_ok() {
            tokio::spawn(settler(self.shared.queue.clone(), receiver));
        }
        tokio::spawn(keeper(self.shared.clone(), self.shared.stop.subscribe()));
    }
}

impl<Args: DeserializeOwned + Send + Sync + 'static> Backend for QueueBackend<Args> {
    type Task = Task<Args>;
    type Error = QueueError;

    fn poll_ready(
        &mut self,
        _cx: &mut Context<'_>,
        worker: &WorkerContext,
    ) -> Poll<Result<(), Self::Error>> {
        let _ = self.shared.worker.set(worker.clone());
        self.start_keeper();
        Poll::Ready(Ok(()))
    }

    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        _worker: &WorkerContext,
    ) -> Poll<Option<Result<Self::Task, Self::Error>>> {
        loop {
            if let Some(task) = self.buffer.pop_front() {
                return Poll::Ready(Some(Ok(task)));
            }
            if let Some(sleep) = &mut self.backoff {
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                self.backoff = None;
            }
            if self.fetch.is_none() {
                let reclaim_due = self
                    .last_reclaim
                    .is_none_or(|t| t.elapsed() >= self.shared.queue.config().reclaim_interval());
                if reclaim_due {
                    self.last_reclaim = Some(Instant::now());
                }
                self.turn = self.turn.wrapping_add(1);
                self.fetch = Some(
                    fetch(
                        self.shared.clone(),
                        std::mem::take(&mut self.conns),
                        self.free_slots(),
                        reclaim_due,
                        self.turn,
                    )
                    .boxed(),
                );
            }
            let fetch = self.fetch.as_mut().expect("fetch set above");
            let (conns, result) = match fetch.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(output) => output,
            };
            self.fetch = None;
            self.conns = conns;
            match result {
                Ok(deliveries) => {
                    self.n_failures = 0;
                    self.accept(deliveries);
                }
                Err(error) => {
                    // `fetch` dropped the connection that failed.
                    self.shared.note_redis_error("fetch", &error);
                    self.n_failures += 1;
                    let delay = Duration::from_millis(50 * 2u64.pow(self.n_failures.min(7)))
                        .min(Duration::from_secs(5));
                    self.backoff = Some(Box::pin(tokio::time::sleep(delay)));
                }
            }
        }
    }

    fn poll_close(
        &mut self,
        cx: &mut Context<'_>,
        _worker: &WorkerContext,
    ) -> Poll<Result<(), Self::Error>> {
        if self.close.is_none() {
            let shared = self.shared.clone();
            let fetch = self.fetch.take();
            let buffered: Vec<String> = self
                .buffer
                .drain(..)
                .filter_map(|task| {
                    task.ctx().data().get::<Lease>().map(|lease| {
                        let delivery = &lease.inner.delivery;
                        held_key(&delivery.stream, &delivery.entry)
                    })
                })
                .collect();
            self.close = Some(
                async move {
                    let fetch_clients: Vec<(i64, Dedicated)> = shared
                        .fetch_clients
                        .lock()
                        .expect("fetch clients poisoned")
                        .values()
                        .cloned()
                        .collect();
                    if let Some(fetch) = fetch {
                        for (client_id, conn) in fetch_clients {
                            // On another connection to the same node: the fetch
                            // connection itself is blocked.
                            let _ = conn.unblock(client_id).await;
                        }
                        // Entries the last read returned were started (attempt counted):
                        // they are released below with the buffered ones.
                        if let (_, Ok(deliveries)) = fetch.await {
                            let mut held = shared.held.lock().expect("held map poisoned");
                            for delivery in deliveries {
                                held.insert(
                                    held_key(&delivery.stream, &delivery.entry),
                                    Held {
                                        partition: delivery.partition,
                                        entry: delivery.entry,
                                        stream: delivery.stream,
                                        job_id: delivery.job_id,
                                        lost: Arc::new(AtomicBool::new(false)),
                                    },
                                );
                            }
                        }
                    }
                    let mut to_release: Vec<(String, Held)> = Vec::new();
                    {
                        let mut held = shared.held.lock().expect("held map poisoned");
                        for entry in buffered {
                            if let Some(h) = held.remove(&entry) {
                                to_release.push((entry, h));
                            }
                        }
                        // Entries fetched by the interrupted read and never buffered.
                        let running_entries = shared.running.load(Ordering::Relaxed);
                        if running_entries == 0 {
                            to_release.extend(held.drain());
                        }
                    }
                    let n_released = release(&shared, to_release).await;
                    if n_released > 0 {
                        tracing::info!(n_released, "released unstarted jobs on shutdown");
                    }
                    let _ = shared.stop.send(true);
                }
                .boxed(),
            );
        }
        let close = self.close.as_mut().expect("close set above");
        close.as_mut().poll(cx).map(Ok)
    }
}

impl<Args: DeserializeOwned + Send + Sync + 'static> BackendConfig for QueueBackend<Args> {
    type Args = Args;
    type Id = String;
    type Kind = apalis_core::backend::finalize::Ephemeral;
    type Config = crate::config::QueueConfig;
    type Layer = SettleLayer;

    fn config(&self) -> &Self::Config {
        self.shared.queue.config()
    }

    fn middleware(&mut self, _worker: &mut WorkerContext) -> Self::Layer {
        SettleLayer::new(self.shared.clone())
    }
}

/// The key of a held entry: entry ids are unique per stream only.
pub(crate) fn held_key(stream: &str, entry: &str) -> String {
    format!("{stream} {entry}")
}

/// One fetch: connect what is not connected, reclaim expired leases when due, read (high
/// priority first, partitions in turn from `turn`, then a blocking read on all of them),
/// then start what was read. Connections come back, `None` where one broke. A group of
/// partitions that fails (a shard failing over) is skipped: the others are still read, and
/// what they delivered is started. The result is an error only when nothing was delivered
/// and something failed (the backend then backs off).
async fn fetch(
    shared: Arc<Shared>,
    mut conns: Vec<Option<Dedicated>>,
    count: usize,
    reclaim: bool,
    turn: usize,
) -> FetchOutput {
    let mut entries = Entries::new();
    let mut failures: Vec<QueueError> = Vec::new();
    // A new connection first looks at this consumer's own pending entries: a read whose
    // reply was lost with the old connection delivered entries nobody started.
    for group in 0..conns.len() {
        if conns[group].is_some() {
            continue;
        }
        let connected = async {
            let mut conn = connect_fetch(&shared, group).await?;
            let streams = shared.streams_of(&shared.groups[group]);
            recover_own_pending(&shared, &mut conn, &streams, count, &mut entries).await?;
            Ok::<_, QueueError>(conn)
        };
        match connected.await {
            Ok(conn) => conns[group] = Some(conn),
            Err(error) => failures.push(drop_group(&shared, &mut conns, group, error)),
        }
    }
    if !entries.is_empty() {
        tracing::info!(
            n = entries.len(),
            "recovered jobs read just before the connection broke"
        );
    } else if conns.iter().any(Option::is_some) {
        read(
            &shared,
            &mut conns,
            count,
            reclaim,
            turn,
            &mut entries,
            &mut failures,
        )
        .await;
    }
    let (deliveries, unstarted) = start(&shared, entries).await;
    for (p, error) in unstarted {
        // Read but not started: pending for this consumer and held by nobody. A new
        // connection of the partition's group recovers them at the next fetch.
        let group = shared
            .groups
            .iter()
            .position(|partitions| partitions.contains(&p))
            .unwrap_or(0);
        failures.push(drop_group(&shared, &mut conns, group, error));
    }
    let last = if deliveries.is_empty() {
        failures.pop()
    } else {
        None
    };
    for error in &failures {
        shared.note_redis_error("fetch", error);
    }
    match last {
        Some(error) => (conns, Err(error)),
        None => (conns, Ok(deliveries)),
    }
}

/// Forgets group `group`'s fetch connection after `error` (the next fetch opens another).
fn drop_group(
    shared: &Shared,
    conns: &mut [Option<Dedicated>],
    group: usize,
    error: QueueError,
) -> QueueError {
    conns[group] = None;
    shared
        .fetch_clients
        .lock()
        .expect("fetch clients poisoned")
        .remove(&group);
    error
}

async fn connect_fetch(shared: &Shared, group: usize) -> Result<Dedicated, QueueError> {
    let config = shared.queue.config();
    let mut conn = shared
        .queue
        .dedicated_connection(
            config.block_timeout() + config.command_timeout(),
            shared.groups[group][0],
        )
        .await?;
    for (_, stream) in shared.streams_of(&shared.groups[group]) {
        let created: redis::RedisResult<Value> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&stream)
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await;
        if let Err(error) = created
            && error.code() != Some("BUSYGROUP")
        {
            return Err(error.into());
        }
    }
    let client_id: i64 = redis::cmd("CLIENT")
        .arg("ID")
        .query_async(&mut conn)
        .await?;
    shared
        .fetch_clients
        .lock()
        .expect("fetch clients poisoned")
        .insert(group, (client_id, conn.clone()));
    Ok(conn)
}

/// Entries read: (partition, stream, entry, job id).
type Entries = Vec<(usize, String, String, String)>;

/// Reads into `entries` from every connected group; a group whose read fails is dropped
/// (its error goes to `failures`) and the others go on.
async fn read(
    shared: &Shared,
    conns: &mut [Option<Dedicated>],
    count: usize,
    reclaim: bool,
    turn: usize,
    entries: &mut Entries,
    failures: &mut Vec<QueueError>,
) {
    let n_groups = conns.len();
    let order: Vec<usize> = (0..n_groups).map(|k| (turn + k) % n_groups).collect();
    if reclaim {
        for &group in &order {
            let Some(conn) = conns[group].as_mut() else {
                continue;
            };
            let streams = shared.streams_of(&shared.groups[group]);
            let wanted = count.saturating_sub(entries.len()).max(1);
            if let Err(error) = reclaim_expired(shared, conn, &streams, wanted, entries).await {
                failures.push(drop_group(shared, conns, group, error));
            }
        }
        if !entries.is_empty() {
            shared
                .stats
                .reclaimed
                .fetch_add(entries.len(), Ordering::Relaxed);
            tracing::info!(n = entries.len(), "reclaimed jobs whose lease expired");
            return;
        }
    }
    // High priority first everywhere; within a priority, every partition in turn from
    // `turn`, so that a backlog in one partition does not starve the others.
    for priority in Priority::ALL {
        for &group in &order {
            let partitions = &shared.groups[group];
            for k in 0..partitions.len() {
                let p = partitions[(turn + k) % partitions.len()];
                let Some(conn) = conns[group].as_mut() else {
                    break;
                };
                let stream = shared
                    .queue
                    .partitions()
                    .keys(p)
                    .ready(shared.queue.name(), priority);
                let wanted = count - entries.len();
                let reply: Result<Value, _> = redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg(GROUP)
                    .arg(&shared.consumer)
                    .arg("COUNT")
                    .arg(wanted)
                    .arg("STREAMS")
                    .arg(&stream)
                    .arg(">")
                    .query_async(conn)
                    .await;
                match reply {
                    Ok(reply) => collect(&[(p, stream)], &reply, entries),
                    Err(error) => {
                        failures.push(drop_group(shared, conns, group, error.into()));
                        break;
                    }
                }
                if entries.len() >= count {
                    return;
                }
            }
        }
    }
    if !entries.is_empty() || shared.is_shutting_down() {
        return;
    }
    block_on_all(shared, conns, count, entries, failures).await;
}

/// A blocking read on every connected group at once. The first group to deliver ends the
/// others' reads (`CLIENT UNBLOCK`), whose entries, if any came meanwhile, are taken too: an
/// entry read is never dropped.
async fn block_on_all(
    shared: &Shared,
    conns: &mut [Option<Dedicated>],
    count: usize,
    entries: &mut Entries,
    failures: &mut Vec<QueueError>,
) {
    let block = shared.queue.config().block_timeout().as_millis() as u64;
    let mut reads: FuturesUnordered<_> = conns
        .iter_mut()
        .enumerate()
        .filter_map(|(group, conn)| conn.as_mut().map(|conn| (group, conn)))
        .map(|(group, conn)| {
            let streams = shared.streams_of(&shared.groups[group]);
            // COUNT applies per stream: share the free slots between them.
            let per_stream = count.div_ceil(streams.len()).max(1);
            async move {
                let reply = read_group_cmd(shared, per_stream, Some(block), &streams, ">")
                    .query_async::<Value>(conn)
                    .await;
                (group, streams, reply)
            }
        })
        .collect();
    let mut failed: Vec<(usize, QueueError)> = Vec::new();
    let mut unblocked = reads.len() == 1;
    while let Some((group, streams, reply)) = reads.next().await {
        match reply {
            Ok(reply) => collect(&streams, &reply, entries),
            Err(error) => failed.push((group, error.into())),
        }
        if (!entries.is_empty() || !failed.is_empty()) && !unblocked {
            unblocked = true;
            unblock_fetches(shared, group).await;
        }
    }
    drop(reads);
    for (group, error) in failed {
        failures.push(drop_group(shared, conns, group, error));
    }
}

/// Ends the blocking reads of every fetch connection but `except`'s, from a control
/// connection to each one's own node.
async fn unblock_fetches(shared: &Shared, except: usize) {
    let clients: Vec<(i64, Dedicated)> = shared
        .fetch_clients
        .lock()
        .expect("fetch clients poisoned")
        .iter()
        .filter(|(group, _)| **group != except)
        .map(|(_, client)| client.clone())
        .collect();
    for (client_id, conn) in clients {
        if let Err(error) = conn.unblock(client_id).await {
            // The read then ends at its block timeout: later, not wrong.
            tracing::debug!(%error, "could not unblock a fetch");
        }
    }
}

/// This consumer's pending entries that no handler here holds: delivered by a read whose
/// reply was lost when the connection broke (the entries are pending for this consumer, and
/// without this they would wait a whole lease for another worker's `XAUTOCLAIM`).
async fn recover_own_pending(
    shared: &Shared,
    conn: &mut Dedicated,
    streams: &[(usize, String)],
    count: usize,
    entries: &mut Entries,
) -> Result<(), QueueError> {
    // `0`: this consumer's pending entries rather than new ones. COUNT applies per stream,
    // and all of them are taken: one left out would wait for a whole lease.
    let reply: Value = read_group_cmd(shared, count, None, streams, "0")
        .query_async(conn)
        .await?;
    let mut pending = Entries::new();
    collect(streams, &reply, &mut pending);
    let held = shared.held.lock().expect("held map poisoned");
    entries.extend(
        pending
            .into_iter()
            .filter(|(_, stream, entry, _)| !held.contains_key(&held_key(stream, entry))),
    );
    Ok(())
}

/// `XREADGROUP` for this consumer on `streams`, each from `from` (`>`: new entries, `0`: its
/// own pending ones), blocking for `block` ms when given.
fn read_group_cmd(
    shared: &Shared,
    count: usize,
    block: Option<u64>,
    streams: &[(usize, String)],
    from: &str,
) -> redis::Cmd {
    let mut cmd = redis::cmd("XREADGROUP");
    cmd.arg("GROUP")
        .arg(GROUP)
        .arg(&shared.consumer)
        .arg("COUNT")
        .arg(count);
    if let Some(block) = block {
        cmd.arg("BLOCK").arg(block);
    }
    cmd.arg("STREAMS");
    for (_, stream) in streams {
        cmd.arg(stream);
    }
    for _ in streams {
        cmd.arg(from);
    }
    cmd
}

/// The entries of a read of `streams` (whose partitions it names).
fn collect(streams: &[(usize, String)], reply: &Value, entries: &mut Entries) {
    for (stream, stream_entries) in parse_streams(reply) {
        let Some((p, _)) = streams.iter().find(|(_, name)| *name == stream) else {
            continue;
        };
        for (entry, fields) in stream_entries {
            if let Some(job_id) = fields.get("id") {
                entries.push((*p, stream.clone(), entry, job_id.clone()));
            }
        }
    }
}

async fn reclaim_expired(
    shared: &Shared,
    conn: &mut Dedicated,
    streams: &[(usize, String)],
    count: usize,
    entries: &mut Entries,
) -> Result<(), QueueError> {
    let lease_ms = shared.queue.config().lease_timeout().as_millis() as u64;
    for (p, stream) in streams {
        let Some(wanted) = count.checked_sub(entries.len()).filter(|n| *n > 0) else {
            return Ok(());
        };
        let cursor = shared
            .reclaim_cursors
            .lock()
            .expect("cursor map poisoned")
            .get(stream)
            .cloned()
            .unwrap_or_else(|| "0-0".to_owned());
        let reply: Value = redis::cmd("XAUTOCLAIM")
            .arg(stream)
            .arg(GROUP)
            .arg(&shared.consumer)
            .arg(lease_ms)
            .arg(&cursor)
            .arg("COUNT")
            .arg(wanted)
            .query_async(conn)
            .await?;
        let Value::Array(parts) = reply else {
            continue;
        };
        let next = parts
            .first()
            .and_then(value_string)
            .unwrap_or_else(|| "0-0".to_owned());
        shared
            .reclaim_cursors
            .lock()
            .expect("cursor map poisoned")
            .insert(stream.clone(), next);
        let claimed = parts.get(1).map(parse_entries).unwrap_or_default();
        let held = shared.held.lock().expect("held map poisoned");
        for (entry, fields) in claimed {
            // Our own entries come back when renewals lapsed (Redis was away): they still run here.
            if held.contains_key(&held_key(stream, &entry)) {
                continue;
            }
            if let Some(job_id) = fields.get("id") {
                entries.push((*p, stream.clone(), entry, job_id.clone()));
            }
        }
    }
    Ok(())
}

/// Values per started entry in the start script's reply.
const START_FIELDS: usize = 12;

/// Runs the start script on read entries, one call per partition: counts attempts and
/// reads the jobs. Returns what started, and each partition whose call failed.
async fn start(shared: &Shared, entries: Entries) -> (Vec<Delivery>, Vec<(usize, QueueError)>) {
    let mut by_partition: HashMap<usize, Vec<(String, String, String)>> = HashMap::new();
    for (p, stream, entry, job_id) in entries {
        by_partition
            .entry(p)
            .or_default()
            .push((stream, entry, job_id));
    }
    let mut deliveries = Vec::new();
    let mut failed = Vec::new();
    for (p, entries) in by_partition {
        if let Err(error) = start_in(shared, p, &entries, &mut deliveries).await {
            failed.push((p, error));
        }
    }
    (deliveries, failed)
}

async fn start_in(
    shared: &Shared,
    p: usize,
    entries: &[(String, String, String)],
    deliveries: &mut Vec<Delivery>,
) -> Result<(), QueueError> {
    let mut cmd = shared.queue.script_cmd_in(&scripts::START, p);
    cmd.arg(&shared.consumer);
    // Entry ids are unique per stream; with the job id they name one entry.
    let stream_of: HashMap<(&str, &str), &str> = entries
        .iter()
        .map(|(stream, entry, job_id)| ((entry.as_str(), job_id.as_str()), stream.as_str()))
        .collect();
    for (stream, entry, job_id) in entries {
        cmd.arg(stream).arg(entry).arg(job_id);
    }
    let reply: Vec<Value> = shared
        .queue
        .run_scripts(&ScriptBatch::One(cmd), Duration::from_secs(10))
        .await?;
    for row in reply.chunks(START_FIELDS) {
        let text = |i: usize| row.get(i).and_then(value_string).unwrap_or_default();
        let number = |i: usize| text(i).parse::<u64>().unwrap_or(0);
        let entry = text(0);
        let job_id = text(1);
        let Some(stream) = stream_of.get(&(entry.as_str(), job_id.as_str())) else {
            continue;
        };
        let non_empty = |s: String| (!s.is_empty()).then_some(s);
        deliveries.push(Delivery {
            partition: p,
            stream: (*stream).to_owned(),
            entry,
            job_id,
            attempts: number(2) as u32,
            max_attempts: number(3) as u32,
            payload: text(4),
            batch: non_empty(text(5)),
            redrives: number(6) as u32,
            checkpoint: non_empty(text(7)),
            created_ms: number(8),
            state: text(9).parse().unwrap_or(JobState::Queued),
            // A job enqueued without one (or by an older release) starts a trace per attempt.
            trace: text(11).parse().ok(),
        });
    }
    Ok(())
}

/// Renews leases, promotes due jobs and tidies up, until stopped.
async fn keeper(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let config = shared.queue.config().clone();
    let mut renew = tokio::time::interval(config.renew_interval());
    let mut promote = tokio::time::interval(config.promote_interval());
    let mut tidy = tokio::time::interval(Duration::from_secs(60));
    for timer in [&mut renew, &mut promote, &mut tidy] {
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    }
    loop {
        tokio::select! {
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    return;
                }
            }
            _ = renew.tick() => renew_leases(&shared).await,
            _ = promote.tick() => {
                if let Err(error) = shared.queue.promote_due().await {
                    shared.note_redis_error("promote", &error);
                }
            }
            _ = tidy.tick() => {
                if let Err(error) = tidy_up(&shared).await {
                    shared.note_redis_error("tidy", &error);
                }
            }
        }
    }
}

async fn renew_leases(shared: &Shared) {
    let held: Vec<(usize, (String, String))> = shared
        .held
        .lock()
        .expect("held map poisoned")
        .values()
        .map(|held| (held.partition, (held.stream.clone(), held.entry.clone())))
        .collect();
    for (p, chunk) in by_partition(held) {
        let mut cmd = shared.queue.script_cmd_in(&scripts::RENEW, p);
        cmd.arg(&shared.consumer);
        for (stream, entry) in &chunk {
            cmd.arg(stream).arg(entry);
        }
        let budget = shared.queue.config().renew_interval();
        match shared
            .queue
            .run_scripts::<Vec<usize>>(&ScriptBatch::One(cmd), budget)
            .await
        {
            Ok(lost) => {
                let held = shared.held.lock().expect("held map poisoned");
                for (stream, entry) in lost.into_iter().filter_map(|i| chunk.get(i)) {
                    // Entries settled meanwhile are gone from the map: not a loss.
                    if let Some(h) = held.get(&held_key(stream, entry))
                        && !h.lost.swap(true, Ordering::Relaxed)
                    {
                        shared.stats.leases_lost.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(job_id = %h.job_id, "lease lost: another worker took the job");
                    }
                }
            }
            Err(error) => shared.note_redis_error("lease renewal", &error),
        }
    }
}

/// Drops expired ids from the indexes and removes long-idle consumers with nothing pending,
/// in every partition.
async fn tidy_up(shared: &Shared) -> Result<(), QueueError> {
    let queue = &shared.queue;
    let config = queue.config();
    let horizon = now_ms().saturating_sub(config.retention_secs * 1000);
    let mut conn = queue.connection();
    for (_, keys) in queue.partitions().all() {
        let mut pipe = redis::pipe();
        for key in [
            keys.dead(queue.name()),
            keys.jobs_index(queue.name()),
            keys.batches(),
        ] {
            pipe.cmd("ZREMRANGEBYSCORE")
                .arg(key)
                .arg("-inf")
                .arg(horizon)
                .ignore();
        }
        let _: () = pipe.query_async(&mut conn).await?;
    }
    let idle_limit_ms = (config.lease_timeout().as_millis() as u64 * 10).max(3_600_000);
    let every: Vec<usize> = (0..queue.partitions().len()).collect();
    for (_, stream) in shared.streams_of(&every) {
        let consumers: Value = match redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(&stream)
            .arg(GROUP)
            .query_async(&mut conn)
            .await
        {
            Ok(value) => value,
            Err(_) => continue,
        };
        let Value::Array(consumers) = consumers else {
            continue;
        };
        for consumer in consumers {
            let fields = crate::queue::flat_map(&consumer);
            let pending: u64 = fields
                .get("pending")
                .and_then(|p| p.parse().ok())
                .unwrap_or(1);
            let idle: u64 = fields.get("idle").and_then(|p| p.parse().ok()).unwrap_or(0);
            if let Some(name) = fields.get("name")
                && pending == 0
                && idle > idle_limit_ms
                && *name != shared.consumer
            {
                let _: Result<i64, _> = redis::cmd("XGROUP")
                    .arg("DELCONSUMER")
                    .arg(&stream)
                    .arg(GROUP)
                    .arg(name)
                    .query_async(&mut conn)
                    .await;
            }
        }
    }
    Ok(())
}
