//! The producer against a real Redis: the library (`library`) and the HTTP API over real HTTP
//! (`api`), Runflow's signed callbacks (`callbacks`), and the operator routes and dashboard
//! (`ops`). Each test uses its own namespace of the shared Redis.

mod api;
mod callbacks;
mod kinds;
mod library;
mod ops;
mod outage;
mod tenants;

use std::time::Duration;

use apalis::prelude::WorkerBuilderExt;
use apalis_core::worker::builder::WorkerBuilder;
use klingq_core::{CostModel, GenerationRequest, JobSpec, JobState, ProviderCheckpoint};
use klingq_producer::Producer;
use klingq_queue::{
    Completion, JobFailure, Lease, LeaseError, Queue, QueueBackend, QueueConfig, WorkerOptions,
    consumer_name,
};
use klingq_testkit::redis::{redis_url, require_shared_redis, unique_namespace};
use klingq_testkit::wait_for;
use serde_json::json;
use tokio::sync::oneshot;

fn config(namespace: &str) -> QueueConfig {
    QueueConfig {
        redis_url: redis_url(),
        namespace: namespace.to_owned(),
        promote_interval_ms: 50,
        block_timeout_ms: 200,
        max_attempts: 1,
        ..QueueConfig::default()
    }
}

/// A producer on a fresh namespace of the shared Redis.
async fn producer(prefix: &str) -> Producer {
    require_shared_redis().await.unwrap();
    Producer::connect(config(&unique_namespace(prefix)), CostModel::default())
        .await
        .unwrap()
}

/// A valid job; `n` goes into its prompt and metadata.
fn spec(n: usize) -> JobSpec {
    let mut spec = JobSpec::new(GenerationRequest::new(
        format!("https://example.com/{n}.png"),
        format!("prompt {n}"),
    ));
    spec.metadata = Some(json!({ "n": n }));
    spec
}

/// A job whose handler takes it to `generating` with a provider run and holds it until it is
/// cancelled.
fn generating_spec() -> JobSpec {
    let mut spec = spec(0);
    spec.metadata = Some(json!({ "test": "hold" }));
    spec
}

/// The test worker's handler: jobs with `metadata.test == "hold"` save a provider run id and
/// stay `generating` until cancelled; others succeed at once.
async fn handler(job: JobSpec, lease: Lease) -> Result<Completion, JobFailure> {
    let hold = job
        .metadata
        .as_ref()
        .is_some_and(|m| m["test"] == json!("hold"));
    if hold {
        let checkpoint = klingq_core::Checkpoint {
            provider: ProviderCheckpoint {
                run_id: Some("run-test-1".to_owned()),
                creates: 1,
                ..ProviderCheckpoint::default()
            },
            ..klingq_core::Checkpoint::default()
        };
        lease
            .save(JobState::Generating, &checkpoint, "polling the run")
            .await?;
        loop {
            match lease
                .set_state(JobState::Generating, "polling the run")
                .await
            {
                Ok(()) => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(LeaseError::Cancelled) => return Err(JobFailure::Cancelled),
                Err(other) => return Err(other.into()),
            }
        }
    }
    Ok(Completion {
        extras: klingq_queue::EventExtras::default(),
        charged_micros: 0,
    })
}

/// An apalis worker over the video queue's payload type, [`JobSpec`].
struct TestWorker {
    stop: Option<oneshot::Sender<()>>,
    join: tokio::task::JoinHandle<()>,
}

impl TestWorker {
    fn spawn(queue: &Queue) -> Self {
        let backend = QueueBackend::<JobSpec>::new(
            queue.clone(),
            WorkerOptions {
                consumer: consumer_name("producer-test"),
                concurrency: 4,
            },
        );
        let worker = WorkerBuilder::new(consumer_name("producer-test"))
            .backend(backend)
            .concurrency(4)
            .build(handler);
        let (stop, stopped) = oneshot::channel::<()>();
        let signal = async move {
            let _ = stopped.await;
            Ok::<(), std::io::Error>(())
        };
        let run: futures::future::BoxFuture<'static, _> = Box::pin(worker.run_until(signal));
        let join = tokio::spawn(async move {
            if let Err(error) = run.await {
                panic!("worker ended with an error: {error}");
            }
        });
        Self {
            stop: Some(stop),
            join,
        }
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = self.join.await;
    }
}

/// Waits until the job is in `state`.
async fn wait_state(producer: &Producer, id: &str, state: JobState) {
    wait_for(
        &format!("job {id} to be {state}"),
        Duration::from_secs(15),
        || async {
            let job = producer.job(id).await.ok()?;
            (job.state == state).then_some(())
        },
    )
    .await
    .unwrap();
}

/// Enqueues a payload no worker can decode (through the queue, as a bad producer would).
async fn enqueue_poison(producer: &Producer) -> String {
    let mut job = klingq_queue::NewJob::new(&json!({"not": "a job"})).unwrap();
    job.max_attempts = Some(1);
    producer.queue().enqueue(&job, None).await.unwrap().id
}
