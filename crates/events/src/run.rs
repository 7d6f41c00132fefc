//! [`run_webhooks`]: the dispatcher and the delivery worker, run together inside
//! `klingq worker` until shutdown.

use std::sync::Arc;

use apalis::prelude::WorkerBuilderExt;
use apalis_core::worker::builder::WorkerBuilder;
use futures::future::BoxFuture;
use klingq_queue::{Queue, QueueBackend, WorkerOptions, consumer_name};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api::DELIVERY_QUEUE;
use crate::config::{Checked, WebhookConfig};
use crate::deliver::{self, Deliverer, build_client};
use crate::dispatch::Dispatcher;
use crate::error::WebhookError;
use crate::payload::DeliveryJob;

/// Runs webhook delivery until `shutdown` completes: a dispatcher fanning completion events
/// out into delivery jobs, and a worker on the `webhooks` queue sending them.
///
/// `queue` is the video queue (any queue of the namespace works: events, jobs and batches are
/// namespace-wide). Deliveries run on their own queue, connection and worker, so a slow or
/// dead endpoint never slows video jobs; retries wait in the queue's delayed set, not in a
/// worker slot. Fails at once on an invalid configuration (bad secret, CIDR or schedule).
/// Several processes may run it: they share the consumer group and the queue.
pub async fn run_webhooks(
    queue: Queue,
    config: WebhookConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WebhookError> {
    let checked = Arc::new(config.check()?);
    if !checked.enabled {
        tracing::info!("webhooks disabled on this worker");
        shutdown.await;
        return Ok(());
    }
    if checked.secrets.is_empty() {
        tracing::warn!(
            "webhooks.secret is empty: deliveries to per-job and per-batch urls will fail unsigned"
        );
    }
    let mut delivery_config = queue.config().for_queue(DELIVERY_QUEUE);
    // A delivery finishing must not publish a completion event of its own.
    delivery_config.completion_events = false;
    let deliveries = Queue::connect(delivery_config).await?;
    let client = build_client(&checked)?;
    let deliverer = Arc::new(Deliverer::new(deliveries.clone(), client, checked.clone()));

    let (stop, stopped) = watch::channel(false);
    let dispatcher = Dispatcher {
        source: queue,
        deliveries: deliveries.clone(),
        config: checked.clone(),
        consumer: consumer_name("webhooks-dispatch"),
    };
    let dispatch_task = tokio::spawn(dispatcher.run(stopped.clone()));
    let mut worker_task = spawn_worker(deliveries, deliverer, &checked, stopped);
    tracing::info!(
        n_global_endpoints = checked.endpoints.len(),
        concurrency = checked.concurrency,
        "webhook delivery started"
    );

    let outcome = tokio::select! {
        () = shutdown => Ok(()),
        joined = &mut worker_task => Err(WebhookError::Worker(match joined {
            Ok(Ok(())) => "it ended before shutdown".to_owned(),
            Ok(Err(error)) => error,
            Err(error) => error.to_string(),
        })),
    };
    let _ = stop.send(true);
    if outcome.is_ok() {
        match worker_task.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "webhook worker ended with an error"),
            Err(error) => tracing::warn!(%error, "webhook worker task failed"),
        }
    }
    if let Err(error) = dispatch_task.await {
        tracing::warn!(%error, "webhook dispatcher task failed");
    }
    tracing::info!("webhook delivery stopped");
    outcome
}

/// Starts the delivery worker; it stops when `stopped` turns true, letting attempts in flight
/// finish (each is bounded by the request timeout).
fn spawn_worker(
    deliveries: Queue,
    deliverer: Arc<Deliverer>,
    config: &Checked,
    mut stopped: watch::Receiver<bool>,
) -> JoinHandle<Result<(), String>> {
    let consumer = consumer_name("webhooks");
    let backend = QueueBackend::<DeliveryJob>::new(
        deliveries,
        WorkerOptions {
            consumer: consumer.clone(),
            concurrency: config.concurrency,
        },
    );
    let worker = WorkerBuilder::new(consumer)
        .backend(backend)
        .data(deliverer)
        .catch_panic()
        .concurrency(config.concurrency)
        .build(deliver::handle);
    let signal = async move {
        let _ = stopped.wait_for(|stop| *stop).await;
        Ok::<(), std::io::Error>(())
    };
    // Boxed outside an async block: the catch_panic layer's fn pointer trips the compiler's
    // higher-ranked Send inference inside one.
    let run: BoxFuture<'static, _> = Box::pin(worker.run_until(signal));
    tokio::spawn(async move { run.await.map_err(|error| error.to_string()) })
}
