//! The worker process: connect, build the clients, run the pipeline on an apalis worker over
//! the klingq backend, serve health and metrics, and shut down gracefully.

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use apalis::prelude::WorkerBuilderExt;
use apalis_core::worker::builder::WorkerBuilder;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use klingq_core::JobSpec;
use klingq_provider::{ProviderConfig, RunflowClient, VideoProvider};
use klingq_queue::{Queue, QueueBackend, QueueConfig, WorkerHandle, WorkerOptions, consumer_name};
use klingq_storage::{StorageConfig, VideoStore};
use tokio::sync::watch;

use crate::config::WorkerConfig;
use crate::metrics::PipelineMetrics;
use crate::pipeline::{GenTimes, PROVIDER_LIMIT, Pipeline, handle_job};
use crate::slots::SlotReleaser;

/// Everything a worker process needs to know.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub queue: QueueConfig,
    pub provider: ProviderConfig,
    pub storage: StorageConfig,
    pub worker: WorkerConfig,
}

/// A worker being built: the pieces tests and `klingq demo` may want to reach.
pub struct Worker {
    pub queue: Queue,
    pub pipeline: Arc<Pipeline>,
    settings: WorkerSettings,
}

impl Worker {
    /// Connects to Redis (retrying until it answers or `connect_timeout` passes), builds the
    /// provider client and the object store, and creates the bucket if it is missing.
    pub async fn connect(
        settings: WorkerSettings,
        connect_timeout: Duration,
    ) -> anyhow::Result<Self> {
        let queue = connect_queue(&settings.queue, connect_timeout).await?;
        let provider_stats = Arc::new(klingq_provider::ProviderStats::default());
        let provider: Arc<dyn VideoProvider> = Arc::new(
            RunflowClient::with_stats(settings.provider.clone(), provider_stats.clone())
                .context("building the provider client")?,
        );
        let store = VideoStore::new(settings.storage.clone())
            .await
            .context("building the object store client")?;
        if let Err(error) = store.ensure_bucket().await {
            tracing::warn!(%error, "could not make sure the bucket exists; uploads will tell");
        }
        let pipeline = Arc::new(Pipeline {
            provider,
            provider_stats,
            store: Arc::new(store),
            config: settings.worker.clone(),
            metrics: Arc::new(PipelineMetrics::default()),
            slots: SlotReleaser::new(queue.clone(), PROVIDER_LIMIT, settings.worker.limit_lease()),
            gen_times: GenTimes::default(),
        });
        Ok(Self {
            queue,
            pipeline,
            settings,
        })
    }

    /// Runs until `shutdown` resolves; then stops taking jobs, gives in-flight jobs the grace
    /// period to reach a checkpoint and hand over, puts back what is left, and returns.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let config = &self.settings.worker;
        let consumer = consumer_name("worker");
        let backend = QueueBackend::<JobSpec>::new(
            self.queue.clone(),
            WorkerOptions {
                consumer: consumer.clone(),
                concurrency: config.concurrency.max(1),
            },
        );
        let handle = backend.handle();
        let ready = Arc::new(AtomicBool::new(true));
        if !config.health_bind.is_empty() {
            let listener = tokio::net::TcpListener::bind(&config.health_bind)
                .await
                .with_context(|| format!("binding the health address {}", config.health_bind))?;
            tracing::info!(addr = %listener.local_addr()?, "health and metrics listening");
            let app = health_router(HealthState {
                queue: self.queue.clone(),
                handle: handle.clone(),
                pipeline: self.pipeline.clone(),
                ready: ready.clone(),
                provider_concurrency: config.provider_concurrency,
            });
            tokio::spawn(async move {
                if let Err(error) = axum::serve(listener, app).await {
                    tracing::error!(%error, "health server stopped");
                }
            });
        }
        let worker = WorkerBuilder::new(consumer.clone())
            .backend(backend)
            .data(self.pipeline.clone())
            .catch_panic()
            .concurrency(config.concurrency.max(1))
            .build(handle_job);
        let (stop_tx, mut stop_rx) = watch::channel(false);
        let mut signal_rx = stop_rx.clone();
        let signal = async move {
            let _ = signal_rx.wait_for(|stop| *stop).await;
            Ok::<(), std::io::Error>(())
        };
        tracing::info!(
            consumer,
            concurrency = config.concurrency,
            queue = self.queue.name(),
            "worker started"
        );
        let mut run: futures::future::BoxFuture<'static, _> = Box::pin(worker.run_until(signal));
        let ready_flag = ready.clone();
        tokio::spawn(async move {
            shutdown.await;
            ready_flag.store(false, Ordering::Relaxed);
            let _ = stop_tx.send(true);
        });
        let grace = Duration::from_secs(config.shutdown_grace_secs);
        tokio::select! {
            result = &mut run => result.context("worker stopped")?,
            _ = async {
                let _ = stop_rx.wait_for(|stop| *stop).await;
                tracing::info!(grace_secs = grace.as_secs(), in_flight = handle.running(), "shutting down: letting in-flight jobs reach a checkpoint");
                tokio::time::sleep(grace).await;
            } => {
                tracing::warn!(in_flight = handle.running(), "grace period over; handing the remaining jobs over");
            }
        }
        drop(run);
        let released = handle.release_held().await;
        tracing::info!(released, "worker stopped");
        Ok(())
    }
}

async fn connect_queue(config: &QueueConfig, timeout: Duration) -> anyhow::Result<Queue> {
    let started = tokio::time::Instant::now();
    let mut delay = Duration::from_millis(200);
    loop {
        match Queue::connect(config.clone()).await {
            Ok(queue) => {
                tracing::info!(redis = %queue.topology().await, "connected to redis");
                return Ok(queue);
            }
            Err(error) if started.elapsed() < timeout => {
                tracing::warn!(%error, redis = %klingq_core::redact_url(&config.redis_url), "redis not reachable yet; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(error) => {
                return Err(error).with_context(|| {
                    format!(
                        "connecting to Redis at {}",
                        klingq_core::redact_url(&config.redis_url)
                    )
                });
            }
        }
    }
}

#[derive(Clone)]
struct HealthState {
    queue: Queue,
    handle: WorkerHandle,
    pipeline: Arc<Pipeline>,
    ready: Arc<AtomicBool>,
    provider_concurrency: u64,
}

fn health_router(state: HealthState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(state): State<HealthState>) -> (StatusCode, &'static str) {
    if !state.ready.load(Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    }
    match state.queue.ping().await {
        Ok(()) => (StatusCode::OK, "ready"),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "redis unreachable"),
    }
}

async fn metrics(
    State(state): State<HealthState>,
) -> (StatusCode, [(&'static str, &'static str); 1], String) {
    let mut out = String::new();
    let webhooks = state.queue.for_queue("webhooks");
    if let Err(error) = klingq_queue::render_metrics(&state.queue, Some(&webhooks), &mut out).await
    {
        tracing::warn!(%error, "queue metrics unavailable");
    }
    state.pipeline.metrics.render(&mut out);
    let _ = writeln!(
        out,
        "# HELP klingq_provider_requests_total Requests to the provider by operation and status (HTTP status, connect_error, timeout, network_error)."
    );
    let _ = writeln!(out, "# TYPE klingq_provider_requests_total counter");
    for ((operation, outcome), count) in state.pipeline.provider_stats.snapshot() {
        let _ = writeln!(
            out,
            "klingq_provider_requests_total{{operation=\"{}\",status=\"{outcome}\"}} {count}",
            operation.as_str()
        );
    }
    let _ = writeln!(
        out,
        "# HELP klingq_worker_jobs_in_flight Jobs this worker holds now."
    );
    let _ = writeln!(out, "# TYPE klingq_worker_jobs_in_flight gauge");
    let _ = writeln!(out, "klingq_worker_jobs_in_flight {}", state.handle.held());
    klingq_queue::render_redis_errors(&state.queue, &mut out);
    let slots = &state.pipeline.slots;
    write_metric(
        &mut out,
        "klingq_provider_slot_releases_pending",
        "gauge",
        "Provider slot releases waiting for Redis to answer.",
        slots.pending(),
    );
    write_metric(
        &mut out,
        "klingq_provider_slot_releases_deferred_total",
        "counter",
        "Provider slot releases that failed at first and were retried in the background.",
        slots.deferred_total(),
    );
    if let Ok((in_use, cap)) = state
        .queue
        .slot_usage(PROVIDER_LIMIT, state.provider_concurrency)
        .await
    {
        let _ = writeln!(
            out,
            "# HELP klingq_provider_limit_in_use Provider generations in flight across replicas."
        );
        let _ = writeln!(out, "# TYPE klingq_provider_limit_in_use gauge");
        let _ = writeln!(out, "klingq_provider_limit_in_use {in_use}");
        let _ = writeln!(
            out,
            "# HELP klingq_provider_limit_cap The shared limit's current cap (adapts on 429)."
        );
        let _ = writeln!(out, "# TYPE klingq_provider_limit_cap gauge");
        let _ = writeln!(out, "klingq_provider_limit_cap {cap}");
    }
    (
        StatusCode::OK,
        [("content-type", "text/plain; version=0.0.4")],
        out,
    )
}

/// One unlabelled sample with its `HELP` and `TYPE` lines.
fn write_metric(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    value: impl std::fmt::Display,
) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    let _ = writeln!(out, "{name} {value}");
}
