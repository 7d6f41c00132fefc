//! What a job costs Redis, and the guarantees the cheaper scripts keep: commands per no-op
//! job counted by a private Redis, steps counted in a batch when their delivery ends, a
//! failure's checkpoint written with its settle, and a worker fenced off once another
//! worker started its job.

use std::sync::Arc;
use std::time::Duration;

use apalis::prelude::WorkerBuilderExt;
use apalis_core::task::data::Data;
use apalis_core::worker::builder::WorkerBuilder;
use klingq_core::JobState;
use klingq_queue::{
    Completion, JobFailure, Lease, LeaseError, NewJob, Queue, QueueBackend, WorkerOptions,
    consumer_name,
};
use klingq_testkit::redis::{RedisServer, unique_namespace};
use klingq_testkit::wait_for;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, oneshot};

use super::{config, raw_redis, shared_queue, wait_batch_done, wait_state};

#[derive(Debug, Clone, Serialize, Deserialize)]
enum Step {
    /// Succeeds at once.
    Noop,
    /// Saves `downloading`, waits for the test's go, then succeeds.
    SaveThenWait,
    /// Keeps a checkpoint and retries (first attempt), then succeeds.
    KeepThenRetry,
    /// Waits for the test's go, then tries to save and reports what the save said.
    WaitThenSave,
    /// Saves `generating` and parks for a minute (first attempt), then succeeds.
    SaveThenPark,
    /// Keeps `generating` and its checkpoint for the park (first attempt), then succeeds.
    KeepThenPark,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CostJob {
    step: Step,
}

#[derive(Clone, Default)]
struct Control {
    go: Arc<Notify>,
    saved: Arc<std::sync::Mutex<Vec<Result<(), String>>>>,
}

async fn cost_handler(
    job: CostJob,
    lease: Lease,
    control: Data<Control>,
) -> Result<Completion, JobFailure> {
    match job.step {
        Step::Noop => {}
        Step::SaveThenWait => {
            lease
                .save(
                    JobState::Downloading,
                    &serde_json::json!({"at": "download"}),
                    "",
                )
                .await?;
            control.go.notified().await;
        }
        Step::KeepThenRetry if lease.attempt() == 1 => {
            lease
                .keep_checkpoint(&serde_json::json!({"kept": lease.attempt()}))
                .unwrap();
            return Err(JobFailure::Retry {
                after: Duration::from_millis(50),
                reason: "planned".into(),
                error: None,
            });
        }
        Step::KeepThenRetry => {}
        Step::SaveThenPark if lease.state_at_delivery() == JobState::Queued => {
            lease
                .save(JobState::Generating, &serde_json::json!({"run": "r"}), "")
                .await?;
            return Err(JobFailure::Park {
                after: Duration::from_secs(60),
                reason: "the run is generating".into(),
            });
        }
        Step::KeepThenPark if lease.state_at_delivery() == JobState::Queued => {
            lease
                .keep_progress(JobState::Generating, &serde_json::json!({"run": "r"}))
                .unwrap();
            return Err(JobFailure::Park {
                after: Duration::from_secs(60),
                reason: "the run is generating".into(),
            });
        }
        Step::SaveThenPark | Step::KeepThenPark => {}
        Step::WaitThenSave => {
            control.go.notified().await;
            let saved = lease
                .save(JobState::Uploading, &serde_json::json!({}), "")
                .await;
            control
                .saved
                .lock()
                .unwrap()
                .push(saved.as_ref().map(|_| ()).map_err(LeaseError::to_string));
            saved?;
        }
    }
    Ok(Completion::default())
}

struct CostWorker {
    stop: oneshot::Sender<()>,
    join: tokio::task::JoinHandle<()>,
}

impl CostWorker {
    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.join.await;
    }
}

fn spawn(queue: &Queue, consumer: String, concurrency: usize, control: &Control) -> CostWorker {
    let backend = QueueBackend::<CostJob>::new(
        queue.clone(),
        WorkerOptions {
            consumer: consumer.clone(),
            concurrency,
        },
    );
    let worker = WorkerBuilder::new(consumer)
        .backend(backend)
        .data(control.clone())
        .concurrency(concurrency)
        .build(cost_handler);
    let (stop, stopped) = oneshot::channel::<()>();
    let signal = async move {
        let _ = stopped.await;
        Ok::<(), std::io::Error>(())
    };
    let run: futures::future::BoxFuture<'static, _> = Box::pin(worker.run_until(signal));
    let join = tokio::spawn(async move {
        run.await.expect("the worker ends without an error");
    });
    CostWorker { stop, join }
}

/// The consumer that started the job's current delivery (the job hash's `worker`), if any.
async fn started_by(conn: &redis::aio::MultiplexedConnection, job_key: &str) -> Option<String> {
    let worker: Option<String> = redis::cmd("HGET")
        .arg(job_key)
        .arg("worker")
        .query_async(&mut conn.clone())
        .await
        .unwrap();
    worker.filter(|w| !w.is_empty())
}

/// The batch counts every job in `state`, and nothing else.
fn assert_counts(record: &klingq_queue::BatchRecord, state: &str, n: u64) {
    assert_eq!(
        record.counts,
        std::collections::BTreeMap::from([(state.to_owned(), n)]),
        "batch counts"
    );
}

fn job(step: Step) -> NewJob {
    NewJob::new(&CostJob { step }).unwrap()
}

async fn open_batch(queue: &Queue, jobs: &[NewJob]) -> (String, Vec<String>) {
    let batch = klingq_core::JobId::new().to_string();
    queue
        .open_batch(&batch, &serde_json::json!({}), 0)
        .await
        .unwrap();
    let ids = queue
        .enqueue_many(jobs, Some(&batch))
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    queue.seal_batch(&batch).await.unwrap();
    (batch, ids)
}

/// The README's figure: a no-op job (enqueued in a batch, processed, its completion event
/// and batch counters written) costs at most 12 Redis commands, counted by a Redis of its
/// own (`INFO commandstats`, every command a script runs included).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_no_op_job_costs_at_most_twelve_redis_commands() {
    let redis = RedisServer::start().await.unwrap();
    let mut config = config(&unique_namespace("cost"));
    config.redis_url = redis.url();
    let queue = Queue::connect(config).await.unwrap();
    const JOBS: u64 = 2_000;
    let before = queue.command_counters().await.unwrap();
    let jobs: Vec<NewJob> = (0..JOBS).map(|_| job(Step::Noop)).collect();
    let (batch, _) = open_batch(&queue, &jobs).await;
    let control = Control::default();
    let worker = spawn(&queue, consumer_name("cost"), 32, &control);
    let record = wait_batch_done(&queue, &batch, Duration::from_secs(120)).await;
    worker.stop().await;
    let after = queue.command_counters().await.unwrap();
    assert_eq!(record.counts.get("succeeded"), Some(&JOBS));
    let per_job = (after.commands - before.commands) as f64 / JOBS as f64;
    println!("{per_job:.2} Redis commands per no-op job");
    assert!(per_job <= 12.0, "{per_job:.2} commands per job");
}

/// A running job's steps show on its record at once; its batch counts it in the state its
/// last delivery ended in until this one ends (one counter write per delivery, not per step).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_shows_on_the_job_at_once_and_in_its_batch_when_the_delivery_ends() {
    let queue = shared_queue("cost-steps", |_| {}).await;
    let (batch, ids) = open_batch(&queue, &[job(Step::SaveThenWait)]).await;
    let control = Control::default();
    let worker = spawn(&queue, consumer_name("steps"), 1, &control);
    wait_state(
        &queue,
        &ids[0],
        JobState::Downloading,
        Duration::from_secs(20),
    )
    .await;
    let record = queue.batch(&batch).await.unwrap().unwrap();
    // Still counted where its delivery started: not under `downloading`.
    assert_counts(&record, "queued", 1);
    control.go.notify_one();
    let record = wait_batch_done(&queue, &batch, Duration::from_secs(20)).await;
    worker.stop().await;
    assert_counts(&record, "succeeded", 1);
    let job = queue.job(&ids[0]).await.unwrap().unwrap();
    assert_eq!(job.checkpoint, Some(serde_json::json!({"at": "download"})));
}

/// A parked job is counted in its batch in the state its steps reached (`generating`),
/// whether a checkpoint wrote it or the park did (`keep_progress`: one write), and leaves
/// it when woken and finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_job_counts_in_its_batch_in_the_state_it_reached() {
    let queue = shared_queue("cost-park", |_| {}).await;
    let (batch, ids) =
        open_batch(&queue, &[job(Step::SaveThenPark), job(Step::KeepThenPark)]).await;
    let control = Control::default();
    let worker = spawn(&queue, consumer_name("park"), 2, &control);
    wait_for("the jobs to park", Duration::from_secs(20), || async {
        (queue.stats().await.unwrap().parked == 2).then_some(())
    })
    .await
    .unwrap();
    let record = queue.batch(&batch).await.unwrap().unwrap();
    assert_counts(&record, "generating", 2);
    for id in &ids {
        let job = queue.job(id).await.unwrap().unwrap();
        assert_eq!(job.state, JobState::Generating);
        assert_eq!(job.checkpoint, Some(serde_json::json!({"run": "r"})));
        queue.wake(id, "the run ended").await.unwrap();
    }
    let record = wait_batch_done(&queue, &batch, Duration::from_secs(20)).await;
    worker.stop().await;
    assert_counts(&record, "succeeded", 2);
}

/// A failing attempt's checkpoint is written by its settle (one write): the retry sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_saves_its_kept_checkpoint_with_its_settle() {
    let queue = shared_queue("cost-keep", |_| {}).await;
    let (batch, ids) = open_batch(&queue, &[job(Step::KeepThenRetry)]).await;
    let control = Control::default();
    let worker = spawn(&queue, consumer_name("keep"), 1, &control);
    let record = wait_batch_done(&queue, &batch, Duration::from_secs(20)).await;
    worker.stop().await;
    assert_counts(&record, "succeeded", 1);
    let job = queue.job(&ids[0]).await.unwrap().unwrap();
    assert_eq!(job.attempts, 2);
    assert_eq!(job.checkpoint, Some(serde_json::json!({"kept": 1})));
}

/// Once another worker has started a job (its lease expired and was reclaimed), the first
/// worker can neither save nor settle it: the job runs to its end once, on the second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_job_another_worker_started_can_no_longer_save_or_settle_it() {
    let queue = shared_queue("cost-fence", |config| {
        config.lease_timeout_secs = 5;
        config.reclaim_interval_secs = 1;
    })
    .await;
    let (batch, ids) = open_batch(&queue, &[job(Step::WaitThenSave)]).await;
    let first = Control::default();
    let a = spawn(&queue, consumer_name("first"), 1, &first);
    let mut conn = raw_redis(&queue).await;
    let job_key = queue.keys().job(&ids[0]);
    let first_consumer = wait_for(
        "the first worker to start the job",
        Duration::from_secs(20),
        || started_by(&conn, &job_key),
    )
    .await
    .unwrap();
    // The first worker stalls: its entry is made to look idle for longer than a lease, so the
    // second worker's reclaim takes it over (as it would after a real stall).
    let entry: String = redis::cmd("HGET")
        .arg(&job_key)
        .arg("entry")
        .query_async(&mut conn)
        .await
        .unwrap();
    let stream = queue
        .keys()
        .ready(queue.name(), klingq_core::Priority::Normal);
    let _: redis::Value = redis::cmd("XCLAIM")
        .arg(&stream)
        .arg("workers")
        .arg(&first_consumer)
        .arg(0)
        .arg(&entry)
        .arg("IDLE")
        .arg(3_600_000)
        .arg("JUSTID")
        .query_async(&mut conn)
        .await
        .unwrap();
    let second = Control::default();
    let b = spawn(&queue, consumer_name("second"), 1, &second);
    wait_for(
        "the second worker to start the job",
        Duration::from_secs(20),
        || async {
            started_by(&conn, &job_key)
                .await
                .filter(|worker| *worker != first_consumer)
        },
    )
    .await
    .unwrap();
    // The first worker wakes and tries to go on: refused.
    first.go.notify_one();
    wait_for(
        "the first worker's save to answer",
        Duration::from_secs(20),
        || async { first.saved.lock().unwrap().first().cloned() },
    )
    .await
    .unwrap()
    .expect_err("the stale worker's save is refused");
    second.go.notify_one();
    let record = wait_batch_done(&queue, &batch, Duration::from_secs(20)).await;
    a.stop().await;
    b.stop().await;
    assert_counts(&record, "succeeded", 1);
    assert_eq!(second.saved.lock().unwrap().as_slice(), &[Ok(())]);
    let job = queue.job(&ids[0]).await.unwrap().unwrap();
    assert_eq!(job.attempts, 2);
    let events = queue.read_events("0", 100, None).await.unwrap();
    assert_eq!(
        events
            .iter()
            .filter(|e| e.event_type == "job.succeeded")
            .count(),
        1
    );
}
