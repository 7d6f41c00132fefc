//! The apalis `Backend`: fetched deliveries become tasks; shutdown puts unstarted ones back.

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
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, watch};

use super::dead_letter::dead_letter;
use super::fetch::fetch;
use super::keeper::{keeper, release};
use super::settle::settler;
use super::{Held, Shared, WorkerHandle, WorkerOptions, WorkerStats, held_key};
use crate::conn::Dedicated;
use crate::error::QueueError;
use crate::layer::SettleLayer;
use crate::lease::{Delivery, Lease, LeaseInner};
use crate::queue::Queue;

pub(super) type FetchOutput = (Vec<Option<Dedicated>>, Result<Vec<Delivery>, QueueError>);

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
                    kept: std::sync::Mutex::default(),
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
            tokio::spawn(settler(
                self.shared.queue.clone(),
                self.shared.consumer.clone(),
                receiver,
            ));
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
