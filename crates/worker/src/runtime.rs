//! The worker process: connect, build the clients, run the pipeline on an apalis worker over
//! the klingq backend, serve health and metrics, and shut down gracefully.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use apalis::prelude::WorkerBuilderExt;
use apalis_core::worker::builder::WorkerBuilder;
use axum::Router;
use axum::extract::State;
use axum::http::header::{ACCEPT, CONTENT_TYPE};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use klingq_core::JobSpec;
use klingq_provider::{ProviderConfig, RunflowClient, VideoProvider};
use klingq_queue::metrics::{
    Format, QueueMetrics, Sampled, Value, redis_errors, register_build_info,
};
use klingq_queue::{Queue, QueueBackend, QueueConfig, WorkerHandle, WorkerOptions, consumer_name};
use klingq_storage::{StorageConfig, VideoStore};
use prometheus_client::registry::Registry;
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
            tenants: Default::default(),
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
                pipeline: self.pipeline.clone(),
                ready: ready.clone(),
                provider_concurrency: config.provider_concurrency,
                process: Arc::new(process_registry(&self.queue, &handle, &self.pipeline)),
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
    pipeline: Arc<Pipeline>,
    ready: Arc<AtomicBool>,
    provider_concurrency: u64,
    /// Metrics of this process outside the pipeline (read when scraped).
    process: Arc<Registry>,
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

/// Queue depth and counters and the shared provider limit, read from Redis for this scrape,
/// then the pipeline's and the process's own metrics; the format the scraper asks for.
async fn metrics(State(state): State<HealthState>, headers: HeaderMap) -> Response {
    let format = Format::negotiate(headers.get(ACCEPT).and_then(|value| value.to_str().ok()));
    let mut scrape = Registry::default();
    let webhooks = state.queue.for_queue("webhooks");
    match QueueMetrics::read(&state.queue, Some(&webhooks)).await {
        Ok(queue_metrics) => queue_metrics.register(&mut scrape),
        Err(error) => tracing::warn!(%error, "queue metrics unavailable"),
    }
    if let Ok((in_use, cap)) = state
        .queue
        .slot_usage(PROVIDER_LIMIT, state.provider_concurrency)
        .await
    {
        for (name, help, value) in [
            (
                "klingq_provider_limit_in_use",
                "Provider generations in flight across replicas.",
                in_use,
            ),
            (
                "klingq_provider_limit_cap",
                "The shared limit's current cap (adapts on 429).",
                cap,
            ),
        ] {
            scrape.register_collector(Box::new(Sampled::gauge(name, help, move || {
                vec![(Vec::new(), Value::Count(value))]
            })));
        }
    }
    let body = format.encode(&[&scrape, state.pipeline.metrics.registry(), &state.process]);
    ([(CONTENT_TYPE, format.content_type())], body).into_response()
}

/// The worker process's metrics outside the pipeline, read when scraped: provider requests,
/// jobs held, Redis errors, provider slot releases, and `klingq_build_info`.
fn process_registry(queue: &Queue, handle: &WorkerHandle, pipeline: &Pipeline) -> Registry {
    let mut registry = Registry::default();
    register_build_info(&mut registry, "worker");
    let stats = pipeline.provider_stats.clone();
    registry.register_collector(Box::new(Sampled::counter(
        "klingq_provider_requests",
        "Requests to the provider by operation and status (HTTP status, connect_error, timeout, network_error).",
        move || {
            stats
                .snapshot()
                .into_iter()
                .map(|((operation, outcome), count)| {
                    (
                        vec![
                            ("operation", operation.as_str().to_owned()),
                            ("status", outcome.to_string()),
                        ],
                        Value::Count(count),
                    )
                })
                .collect()
        },
    )));
    let handle = handle.clone();
    registry.register_collector(Box::new(Sampled::gauge(
        "klingq_worker_jobs_in_flight",
        "Jobs this worker holds now.",
        move || vec![(Vec::new(), Value::Count(handle.held() as u64))],
    )));
    registry.register_collector(Box::new(redis_errors(queue)));
    let slots = pipeline.slots.clone();
    registry.register_collector(Box::new(Sampled::gauge(
        "klingq_provider_slot_releases_pending",
        "Provider slot releases waiting for Redis to answer.",
        move || vec![(Vec::new(), Value::Count(slots.pending() as u64))],
    )));
    let slots = pipeline.slots.clone();
    registry.register_collector(Box::new(Sampled::counter(
        "klingq_provider_slot_releases_deferred",
        "Provider slot releases that failed at first and were retried in the background.",
        move || vec![(Vec::new(), Value::Count(slots.deferred_total()))],
    )));
    registry
}
