//! The queue against a real Redis: delivery, leases, retries, dead letters, priorities,
//! idempotency, retention, cancellation, and surviving Redis failures.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use apalis::prelude::WorkerBuilderExt;
use apalis_core::task::data::Data;
use apalis_core::worker::builder::WorkerBuilder;
use klingq_core::job::now_ms;
use klingq_core::{JobState, Priority, TraceParent};
use klingq_queue::{
    CancelOutcome, Completion, EventExtras, JobFailure, Lease, LeaseError, NewJob, Queue,
    QueueBackend, QueueConfig, RedriveOutcome, WorkerHandle, WorkerOptions, consumer_name,
};
use klingq_testkit::redis::{RedisServer, redis_url, require_shared_redis, unique_namespace};
use klingq_testkit::wait_for;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Behavior {
    #[default]
    Succeed,
    Sleep(u64),
    FailTimes(u32),
    AlwaysRetry,
    Panic,
    Fail,
    DeferOnce,
    LoopUntilCancelled,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct TestJob {
    n: u64,
    #[serde(default)]
    behavior: Behavior,
}

/// What the handlers saw, per job id: how many times each ran, and in which order they started.
#[derive(Clone, Default)]
struct Seen {
    runs: Arc<Mutex<HashMap<String, u32>>>,
    order: Arc<Mutex<Vec<u64>>>,
    started_ms: Arc<Mutex<HashMap<String, u64>>>,
    /// The trace context each run of each job was handed.
    traces: Arc<Mutex<HashMap<String, Vec<Option<TraceParent>>>>>,
}

impl Seen {
    fn runs_of(&self, id: &str) -> u32 {
        self.runs.lock().unwrap().get(id).copied().unwrap_or(0)
    }
    fn total_runs(&self) -> u32 {
        self.runs.lock().unwrap().values().sum()
    }
}

async fn handler(job: TestJob, lease: Lease, seen: Data<Seen>) -> Result<Completion, JobFailure> {
    let id = lease.job_id().to_owned();
    let runs = {
        let mut runs = seen.runs.lock().unwrap();
        let count = runs.entry(id.clone()).or_default();
        *count += 1;
        *count
    };
    seen.order.lock().unwrap().push(job.n);
    seen.traces
        .lock()
        .unwrap()
        .entry(id.clone())
        .or_default()
        .push(lease.trace_parent());
    seen.started_ms.lock().unwrap().insert(id, now_ms());
    match job.behavior {
        Behavior::Succeed => {}
        Behavior::Sleep(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
        Behavior::FailTimes(times) if runs <= times => {
            return Err(JobFailure::Retry {
                after: Duration::from_millis(100),
                reason: format!("planned failure {runs}"),
                error: None,
            });
        }
        Behavior::FailTimes(_) => {}
        Behavior::AlwaysRetry => {
            return Err(JobFailure::Retry {
                after: Duration::from_millis(50),
                reason: "always".into(),
                error: None,
            });
        }
        Behavior::Panic => panic!("planned panic"),
        Behavior::Fail => {
            return Err(JobFailure::Fail(klingq_core::JobError {
                step: "generate".into(),
                code: "CONTENT_POLICY_VIOLATION".into(),
                message: "flagged".into(),
                details: vec![],
                cost_committed: false,
            }));
        }
        Behavior::DeferOnce if runs == 1 => {
            return Err(JobFailure::Defer {
                after: Duration::from_millis(100),
                reason: "over budget".into(),
            });
        }
        Behavior::DeferOnce => {}
        Behavior::LoopUntilCancelled => loop {
            match lease.set_state(JobState::Generating, "polling").await {
                Ok(()) => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(LeaseError::Cancelled) => return Err(JobFailure::Cancelled),
                Err(other) => return Err(other.into()),
            }
        },
    }
    Ok(Completion {
        extras: EventExtras {
            duration_seconds: Some(5),
            ..EventExtras::default()
        },
        charged_micros: 700_000,
    })
}

struct RunningWorker {
    handle: WorkerHandle,
    stop: Option<oneshot::Sender<()>>,
    join: tokio::task::JoinHandle<()>,
}

impl RunningWorker {
    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = self.join.await;
    }
}

fn spawn_worker(queue: &Queue, concurrency: usize, seen: &Seen) -> RunningWorker {
    spawn_worker_as(queue, consumer_name("test"), concurrency, seen)
}

fn spawn_worker_as(
    queue: &Queue,
    consumer: String,
    concurrency: usize,
    seen: &Seen,
) -> RunningWorker {
    let backend = QueueBackend::<TestJob>::new(
        queue.clone(),
        WorkerOptions {
            consumer,
            concurrency,
        },
    );
    let handle = backend.handle();
    let worker = WorkerBuilder::new(handle.consumer().to_owned())
        .backend(backend)
        .data(seen.clone())
        .catch_panic()
        .concurrency(concurrency)
        .build(handler);
    let (stop, stopped) = oneshot::channel::<()>();
    let signal = async move {
        let _ = stopped.await;
        Ok::<(), std::io::Error>(())
    };
    // Boxed outside an async block: the catch_panic layer's fn pointer trips the compiler's
    // higher-ranked Send inference inside one.
    let run: futures::future::BoxFuture<'static, _> = Box::pin(worker.run_until(signal));
    let join = tokio::spawn(async move {
        if let Err(error) = run.await {
            panic!("worker ended with an error: {error}");
        }
    });
    RunningWorker {
        handle,
        stop: Some(stop),
        join,
    }
}

fn config(namespace: &str) -> QueueConfig {
    QueueConfig {
        redis_url: redis_url(),
        namespace: namespace.to_owned(),
        promote_interval_ms: 50,
        block_timeout_ms: 200,
        ..QueueConfig::default()
    }
}

async fn shared_queue(prefix: &str, tweak: impl FnOnce(&mut QueueConfig)) -> Queue {
    require_shared_redis().await.unwrap();
    let mut config = config(&unique_namespace(prefix));
    tweak(&mut config);
    Queue::connect(config).await.unwrap()
}

fn job(n: u64, behavior: Behavior) -> NewJob {
    NewJob::new(&TestJob { n, behavior }).unwrap()
}

/// Enqueues `jobs` (into `batch`, if given) and returns their ids.
async fn enqueue_ids(queue: &Queue, jobs: &[NewJob], batch: Option<&str>) -> Vec<String> {
    queue
        .enqueue_many(jobs, batch)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect()
}

async fn wait_state(queue: &Queue, id: &str, state: JobState, timeout: Duration) {
    wait_for(&format!("job {id} to be {state}"), timeout, || async {
        let record = queue.job(id).await.unwrap()?;
        (record.state == state).then_some(())
    })
    .await
    .unwrap();
}

async fn wait_batch_done(
    queue: &Queue,
    batch: &str,
    timeout: Duration,
) -> klingq_queue::BatchRecord {
    wait_for(&format!("batch {batch} to be done"), timeout, || async {
        queue.batch(batch).await.unwrap().filter(|b| b.done)
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_is_processed_exactly_once_with_counts_and_one_batch_event() {
    let queue = shared_queue("once", |_| {}).await;
    let batch = klingq_core::JobId::new().to_string();
    queue
        .open_batch(&batch, &serde_json::json!({"source": "test"}), 0)
        .await
        .unwrap();
    let jobs: Vec<NewJob> = (0..2_000)
        .map(|n| {
            let mut new_job = job(n, Behavior::Succeed);
            new_job.estimated_micros = 700_000;
            new_job
        })
        .collect();
    let enqueued = queue.enqueue_many(&jobs, Some(&batch)).await.unwrap();
    assert!(enqueued.iter().all(|e| e.created));
    assert_eq!(queue.seal_batch(&batch).await.unwrap(), 2_000);

    let seen = Seen::default();
    let worker = spawn_worker(&queue, 32, &seen);
    let record = wait_batch_done(&queue, &batch, Duration::from_secs(60)).await;
    worker.stop().await;

    assert_eq!(seen.total_runs(), 2_000);
    assert!(enqueued.iter().all(|e| seen.runs_of(&e.id) == 1));
    assert_eq!(record.total, 2_000);
    assert_eq!(record.counts.get("succeeded"), Some(&2_000));
    assert_eq!(record.counts.len(), 1, "{:?}", record.counts);
    assert_eq!(record.estimated_micros, 1_400_000_000);
    assert_eq!(record.charged_micros, 1_400_000_000);

    let events = queue.read_events("0", 10_000, None).await.unwrap();
    let batch_events: Vec<_> = events
        .iter()
        .filter(|e| e.event_type == "batch.completed")
        .collect();
    assert_eq!(batch_events.len(), 1);
    let body: serde_json::Value = serde_json::from_str(&batch_events[0].body).unwrap();
    assert_eq!(body["data"]["counts"]["succeeded"], 2_000);
    assert_eq!(body["data"]["charged_usd"], 1_400.0);
    assert!(body["timestamp"].as_str().unwrap().ends_with('Z'));
    let job_events = events
        .iter()
        .filter(|e| e.event_type == "job.succeeded")
        .count();
    assert_eq!(job_events, 2_000);

    let stats = queue.stats().await.unwrap();
    assert_eq!(
        (stats.waiting, stats.in_flight, stats.scheduled, stats.dead),
        (0, 0, 0, 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trace_context_rides_to_every_attempt_the_record_and_the_event() {
    let queue = shared_queue("trace", |_| {}).await;
    let trace = TraceParent::new_root();
    let mut traced = job(1, Behavior::FailTimes(1));
    traced.trace = Some(trace);
    let untraced = job(2, Behavior::Succeed);
    let traced_id = queue.enqueue(&traced, None).await.unwrap().id;
    let untraced_id = queue.enqueue(&untraced, None).await.unwrap().id;

    let seen = Seen::default();
    let worker = spawn_worker(&queue, 4, &seen);
    wait_state(
        &queue,
        &traced_id,
        JobState::Succeeded,
        Duration::from_secs(20),
    )
    .await;
    wait_state(
        &queue,
        &untraced_id,
        JobState::Succeeded,
        Duration::from_secs(20),
    )
    .await;
    worker.stop().await;

    // Both attempts of the retried job continued the trace; the other job had none.
    let traces = seen.traces.lock().unwrap().clone();
    assert_eq!(traces[&traced_id], vec![Some(trace), Some(trace)]);
    assert_eq!(traces[&untraced_id], vec![None]);
    let record = queue.job(&traced_id).await.unwrap().unwrap();
    assert_eq!(record.trace, Some(trace));
    assert_eq!(queue.job(&untraced_id).await.unwrap().unwrap().trace, None);
    // The completion event carries the job's trace for its webhook deliveries.
    let events = queue.read_events("0", 10, None).await.unwrap();
    let trace_of = |id: &str| {
        events
            .iter()
            .find(|e| e.body.contains(id))
            .map(|e| e.trace)
            .unwrap_or_else(|| panic!("no event for {id}: {events:?}"))
    };
    assert_eq!(trace_of(&traced_id), Some(trace));
    assert_eq!(trace_of(&untraced_id), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_job_does_not_run_early() {
    let queue = shared_queue("delay", |_| {}).await;
    let mut new_job = job(1, Behavior::Succeed);
    let due = now_ms() + 1_500;
    new_job.run_at_ms = Some(due);
    let id = queue.enqueue(&new_job, None).await.unwrap().id;
    assert_eq!(
        queue.job(&id).await.unwrap().unwrap().state,
        JobState::Scheduled
    );
    assert_eq!(queue.stats().await.unwrap().scheduled, 1);

    let seen = Seen::default();
    let worker = spawn_worker(&queue, 4, &seen);
    wait_state(&queue, &id, JobState::Succeeded, Duration::from_secs(10)).await;
    worker.stop().await;
    let started = seen.started_ms.lock().unwrap()[&id];
    assert!(started >= due, "started {} ms early", due - started);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_return_the_first_job() {
    let queue = shared_queue("idem", |_| {}).await;
    let mut first = job(1, Behavior::Succeed);
    first.idempotency_key = Some("order-42".into());
    let mut second = job(2, Behavior::Succeed);
    second.idempotency_key = Some("order-42".into());
    let a = queue.enqueue(&first, None).await.unwrap();
    let b = queue.enqueue(&second, None).await.unwrap();
    assert!(a.created);
    assert!(!b.created);
    assert_eq!(a.id, b.id);
    assert!(queue.job(&second.id.to_string()).await.unwrap().is_none());
    // Same key inside a pipelined batch too.
    let replies = queue
        .enqueue_many(&[second.clone(), job(3, Behavior::Succeed)], None)
        .await
        .unwrap();
    assert_eq!(replies[0].id, a.id);
    assert!(!replies[0].created && replies[1].created);
    assert_eq!(queue.stats().await.unwrap().waiting, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_payload_is_dead_lettered_and_the_worker_carries_on() {
    let queue = shared_queue("poison", |_| {}).await;
    let mut poison = job(0, Behavior::Succeed);
    poison.payload = r#"{"not":"a test job"}"#.to_owned();
    let poison_id = queue.enqueue(&poison, None).await.unwrap().id;
    let good = queue
        .enqueue(&job(1, Behavior::Succeed), None)
        .await
        .unwrap()
        .id;

    let seen = Seen::default();
    let worker = spawn_worker(&queue, 4, &seen);
    wait_state(&queue, &poison_id, JobState::Dead, Duration::from_secs(10)).await;
    wait_state(&queue, &good, JobState::Succeeded, Duration::from_secs(10)).await;
    let record = queue.job(&poison_id).await.unwrap().unwrap();
    let error = record.error.unwrap();
    assert_eq!(error.code, "UNDECODABLE_PAYLOAD");
    assert!(
        error.message.contains("unknown field") || error.message.contains("missing field"),
        "{}",
        error.message
    );
    let dead = queue.dead_letters(0, 10).await.unwrap();
    assert_eq!(
        dead.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        vec![poison_id.as_str()]
    );

    // Re-driving it gives it a new life; it dies again for the same reason.
    assert_eq!(
        queue.redrive(&poison_id).await.unwrap(),
        RedriveOutcome::Redriven
    );
    wait_for(
        "the re-driven job to die again",
        Duration::from_secs(10),
        || async {
            let record = queue.job(&poison_id).await.unwrap()?;
            (record.state == JobState::Dead && record.redrives == 1).then_some(())
        },
    )
    .await
    .unwrap();
    assert_eq!(
        queue.redrive(&good).await.unwrap(),
        RedriveOutcome::NotDead(JobState::Succeeded)
    );
    worker.stop().await;
    let events = queue.read_events("0", 100, None).await.unwrap();
    let failed: Vec<_> = events
        .iter()
        .filter(|e| e.event_type == "job.failed")
        .map(|e| e.id.clone())
        .collect();
    assert_eq!(failed.len(), 2, "one event per life");
    assert_ne!(failed[0], failed[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_follow_the_handler_delay_and_end_dead_past_max_attempts() {
    let queue = shared_queue("retry", |c| c.max_attempts = 3).await;
    let flaky = queue
        .enqueue(&job(1, Behavior::FailTimes(2)), None)
        .await
        .unwrap()
        .id;
    let hopeless = queue
        .enqueue(&job(2, Behavior::AlwaysRetry), None)
        .await
        .unwrap()
        .id;
    let deferred = queue
        .enqueue(&job(3, Behavior::DeferOnce), None)
        .await
        .unwrap()
        .id;
    let seen = Seen::default();
    let worker = spawn_worker(&queue, 4, &seen);
    wait_state(&queue, &flaky, JobState::Succeeded, Duration::from_secs(10)).await;
    wait_state(&queue, &hopeless, JobState::Dead, Duration::from_secs(10)).await;
    wait_state(
        &queue,
        &deferred,
        JobState::Succeeded,
        Duration::from_secs(10),
    )
    .await;
    worker.stop().await;

    assert_eq!(seen.runs_of(&flaky), 3);
    assert_eq!(queue.job(&flaky).await.unwrap().unwrap().attempts, 3);
    assert_eq!(seen.runs_of(&hopeless), 3);
    let dead = queue.job(&hopeless).await.unwrap().unwrap();
    assert!(dead.reason.unwrap().starts_with("gave up after 3 attempts"));
    // A deferral does not use up an attempt.
    assert_eq!(seen.runs_of(&deferred), 2);
    assert_eq!(queue.job(&deferred).await.unwrap().unwrap().attempts, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_fails_one_job_and_a_permanent_error_fails_with_its_reason() {
    let queue = shared_queue("panic", |_| {}).await;
    let panicking = queue
        .enqueue(&job(1, Behavior::Panic), None)
        .await
        .unwrap()
        .id;
    let failing = queue
        .enqueue(&job(2, Behavior::Fail), None)
        .await
        .unwrap()
        .id;
    let fine: Vec<String> = futures::future::join_all((3..8).map(|n| {
        let queue = queue.clone();
        async move {
            queue
                .enqueue(&job(n, Behavior::Succeed), None)
                .await
                .unwrap()
                .id
        }
    }))
    .await;
    let seen = Seen::default();
    let worker = spawn_worker(&queue, 4, &seen);
    wait_state(&queue, &panicking, JobState::Dead, Duration::from_secs(10)).await;
    wait_state(&queue, &failing, JobState::Failed, Duration::from_secs(10)).await;
    for id in &fine {
        wait_state(&queue, id, JobState::Succeeded, Duration::from_secs(10)).await;
    }
    worker.stop().await;
    assert_eq!(
        queue
            .job(&panicking)
            .await
            .unwrap()
            .unwrap()
            .error
            .unwrap()
            .code,
        "HANDLER_PANICKED"
    );
    let failed = queue.job(&failing).await.unwrap().unwrap().error.unwrap();
    assert_eq!(
        (failed.step.as_str(), failed.code.as_str()),
        ("generate", "CONTENT_POLICY_VIOLATION")
    );
    assert!(
        queue
            .dead_letters(0, 10)
            .await
            .unwrap()
            .iter()
            .all(|r| r.id == panicking)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_records_expire_after_the_retention() {
    let queue = shared_queue("retention", |c| c.retention_secs = 1).await;
    let id = queue
        .enqueue(&job(1, Behavior::Succeed), None)
        .await
        .unwrap()
        .id;
    let seen = Seen::default();
    let worker = spawn_worker(&queue, 2, &seen);
    wait_state(&queue, &id, JobState::Succeeded, Duration::from_secs(10)).await;
    worker.stop().await;
    wait_for("the record to expire", Duration::from_secs(5), || async {
        queue.job(&id).await.unwrap().is_none().then_some(())
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn high_priority_jobs_go_first() {
    let queue = shared_queue("prio", |_| {}).await;
    for n in 0..20 {
        queue
            .enqueue(&job(n, Behavior::Succeed), None)
            .await
            .unwrap();
    }
    let mut urgent = job(99, Behavior::Succeed);
    urgent.priority = Priority::High;
    let urgent_id = queue.enqueue(&urgent, None).await.unwrap().id;
    let seen = Seen::default();
    let worker = spawn_worker(&queue, 1, &seen);
    wait_state(
        &queue,
        &urgent_id,
        JobState::Succeeded,
        Duration::from_secs(10),
    )
    .await;
    wait_for("all jobs to run", Duration::from_secs(10), || async {
        (seen.total_runs() == 21).then_some(())
    })
    .await
    .unwrap();
    worker.stop().await;
    assert_eq!(seen.order.lock().unwrap()[0], 99);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_queued_and_running_jobs() {
    let queue = shared_queue("cancel", |_| {}).await;
    let running = queue
        .enqueue(&job(1, Behavior::LoopUntilCancelled), None)
        .await
        .unwrap()
        .id;
    let mut later = job(2, Behavior::Succeed);
    later.run_at_ms = Some(now_ms() + 60_000);
    let waiting = queue.enqueue(&later, None).await.unwrap().id;

    let seen = Seen::default();
    let worker = spawn_worker(&queue, 2, &seen);
    wait_state(
        &queue,
        &running,
        JobState::Generating,
        Duration::from_secs(10),
    )
    .await;
    match queue.cancel(&running, "user asked").await.unwrap() {
        CancelOutcome::Cancelled {
            previous,
            cost_committed,
        } => {
            assert_eq!(previous, JobState::Generating);
            assert!(cost_committed);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        queue.cancel(&waiting, "user asked").await.unwrap(),
        CancelOutcome::Cancelled {
            previous: JobState::Scheduled,
            cost_committed: false
        }
    );
    assert_eq!(
        queue.cancel(&waiting, "again").await.unwrap(),
        CancelOutcome::AlreadyTerminal(JobState::Cancelled)
    );
    // The running handler notices at its next checkpoint and lets go.
    wait_for(
        "the worker to drop the cancelled job",
        Duration::from_secs(10),
        || async { (worker.handle.held() == 0).then_some(()) },
    )
    .await
    .unwrap();
    worker.stop().await;
    assert_eq!(seen.runs_of(&waiting), 0);
    assert_eq!(queue.stats().await.unwrap().scheduled, 0);
    let record = queue.job(&running).await.unwrap().unwrap();
    assert_eq!(record.state, JobState::Cancelled);
    assert!(record.error.unwrap().cost_committed);
    let events = queue.read_events("0", 10, None).await.unwrap();
    assert_eq!(
        events
            .iter()
            .filter(|e| e.event_type == "job.cancelled")
            .count(),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_lease_keeps_a_long_job_from_a_second_worker() {
    let queue = shared_queue("lease", |c| {
        c.lease_timeout_secs = 1;
        c.reclaim_interval_secs = 1;
    })
    .await;
    let seen = Seen::default();
    let first = spawn_worker(&queue, 2, &seen);
    let id = queue
        .enqueue(&job(1, Behavior::Sleep(3_500)), None)
        .await
        .unwrap()
        .id;
    wait_for(
        "the first worker to take the job",
        Duration::from_secs(5),
        || async { (first.handle.running() == 1).then_some(()) },
    )
    .await
    .unwrap();
    let second = spawn_worker(&queue, 2, &seen);
    wait_state(&queue, &id, JobState::Succeeded, Duration::from_secs(15)).await;
    second.stop().await;
    first.stop().await;
    assert_eq!(seen.runs_of(&id), 1);
    assert_eq!(queue.job(&id).await.unwrap().unwrap().attempts, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_report_waiting_scheduled_and_the_oldest_age() {
    let queue = shared_queue("stats", |_| {}).await;
    for n in 0..3 {
        queue
            .enqueue(&job(n, Behavior::Succeed), None)
            .await
            .unwrap();
    }
    for n in 0..2 {
        let mut later = job(n, Behavior::Succeed);
        later.run_at_ms = Some(now_ms() + 60_000);
        queue.enqueue(&later, None).await.unwrap();
    }
    let stats = wait_for("the oldest job to age", Duration::from_secs(5), || async {
        let stats = queue.stats().await.unwrap();
        (stats.oldest_waiting_ms >= 50).then_some(stats)
    })
    .await
    .unwrap();
    assert_eq!(
        (stats.waiting, stats.in_flight, stats.scheduled, stats.dead),
        (3, 0, 2, 0)
    );
    assert_eq!(stats.waiting_by_priority.get("normal"), Some(&3));
}

/// The history keeps one sample per minute, whatever the number of samplers, and a minute's
/// point is what finished between its sample and the next (the current minute: until now).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_counts_what_finished_in_each_minute_from_one_sample_per_minute() {
    let queue = shared_queue("history", |_| {}).await;
    let minute = klingq_queue::minute_of(now_ms()) - 10 * 60_000;
    assert!(queue.record_history(minute + 1_000).await.unwrap());
    // A second replica sampling the same minute writes nothing.
    assert!(!queue.record_history(minute + 2_000).await.unwrap());

    let jobs: Vec<NewJob> = (0..3)
        .map(|n| {
            let mut new_job = job(n, Behavior::Succeed);
            new_job.estimated_micros = 700_000;
            new_job
        })
        .collect();
    let ids = enqueue_ids(&queue, &jobs, None).await;
    let seen = Seen::default();
    let worker = spawn_worker(&queue, 4, &seen);
    for id in &ids {
        wait_state(&queue, id, JobState::Succeeded, Duration::from_secs(30)).await;
    }
    worker.stop().await;

    // The next minute's sample closes the first minute; the one after has seen nothing yet.
    let points = queue.history(5, minute + 60_000 + 5_000).await.unwrap();
    let summary: Vec<(u64, [u64; 4], u64)> = points
        .iter()
        .map(|p| (p.minute_ms, p.finished, p.charged_micros))
        .collect();
    assert_eq!(
        summary,
        [
            (minute, [3, 0, 0, 0], 2_100_000),
            (minute + 60_000, [0, 0, 0, 0], 0)
        ]
    );
    // Minutes outside the window are left out; a window of one minute is the current one.
    let points = queue.history(1, minute + 60_000 + 5_000).await.unwrap();
    assert_eq!(points.len(), 1);
    assert_eq!(points[0].minute_ms, minute + 60_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_read_just_before_a_connection_broke_start_without_waiting_a_lease() {
    require_shared_redis().await.unwrap();
    let mut config = config(&unique_namespace("orphans"));
    // Far beyond the test: only the worker's own recovery, not a lapsed lease, starts them.
    config.lease_timeout_secs = 3_600;
    let queue = Queue::connect(config).await.unwrap();
    let jobs: Vec<NewJob> = (0..5).map(|n| job(n, Behavior::Succeed)).collect();
    let ids = enqueue_ids(&queue, &jobs, None).await;
    // A read whose reply was lost when the connection broke: Redis delivered the entries to
    // the consumer (they are pending for it), and no handler ever saw them.
    let consumer = consumer_name("orphans");
    let stream = queue.keys().ready(queue.name(), Priority::Normal);
    let mut conn = raw_redis(&queue).await;
    let created: redis::RedisResult<redis::Value> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg("workers")
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut conn)
        .await;
    assert!(created.is_ok() || format!("{created:?}").contains("BUSYGROUP"));
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("workers")
        .arg(&consumer)
        .arg("COUNT")
        .arg(10)
        .arg("STREAMS")
        .arg(&stream)
        .arg(">")
        .query_async(&mut conn)
        .await
        .unwrap();

    // The same consumer connects again.
    let seen = Seen::default();
    let worker = spawn_worker_as(&queue, consumer, 8, &seen);
    wait_for(
        "the orphaned jobs to succeed",
        Duration::from_secs(60),
        || async {
            let records = queue.jobs(&ids).await.ok()?;
            records
                .iter()
                .all(|r| r.state == JobState::Succeeded)
                .then_some(())
        },
    )
    .await
    .unwrap();
    worker.stop().await;
    for id in &ids {
        assert_eq!(seen.runs_of(id), 1, "{id} ran once");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_redis_connections_do_not_stop_the_worker() {
    let server = RedisServer::start().await.unwrap();
    let mut config = config(&unique_namespace("kill"));
    config.redis_url = server.url();
    let queue = Queue::connect(config).await.unwrap();
    let jobs: Vec<NewJob> = (0..3_000).map(|n| job(n, Behavior::Sleep(2))).collect();
    let ids = enqueue_ids(&queue, &jobs, None).await;
    let seen = Seen::default();
    let worker = spawn_worker(&queue, 32, &seen);
    let client = redis::Client::open(server.url()).unwrap();
    for _ in 0..3 {
        wait_for("progress", Duration::from_secs(20), || async {
            (seen.total_runs() > 0).then_some(())
        })
        .await
        .unwrap();
        let before = seen.total_runs();
        if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
            let _: Result<i64, _> = redis::cmd("CLIENT")
                .arg("KILL")
                .arg("TYPE")
                .arg("normal")
                .query_async(&mut conn)
                .await;
        }
        wait_for(
            "progress after the kill",
            Duration::from_secs(20),
            || async {
                (seen.total_runs() > before + 100 || seen.total_runs() >= 3_000).then_some(())
            },
        )
        .await
        .unwrap();
    }
    wait_for("every job to succeed", Duration::from_secs(60), || async {
        let records = queue.jobs(&ids).await.ok()?;
        records
            .iter()
            .all(|r| r.state == JobState::Succeeded)
            .then_some(())
    })
    .await
    .unwrap();
    let redis_errors = worker
        .handle
        .stats()
        .redis_errors
        .load(std::sync::atomic::Ordering::Relaxed);
    worker.stop().await;
    let n_once = ids.iter().filter(|id| seen.runs_of(id) == 1).count();
    assert_eq!(n_once, 3_000, "every job ran exactly once");
    // The kills really cut the worker's connections, and it carried on.
    assert!(redis_errors >= 1, "the worker saw no Redis error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_does_not_end_the_worker() {
    let mut server = RedisServer::start().await.unwrap();
    let mut config = config(&unique_namespace("restart"));
    config.redis_url = server.url();
    let queue = Queue::connect(config).await.unwrap();
    let seen = Seen::default();
    let worker = spawn_worker(&queue, 4, &seen);
    let before = queue
        .enqueue(&job(1, Behavior::Succeed), None)
        .await
        .unwrap()
        .id;
    wait_state(
        &queue,
        &before,
        JobState::Succeeded,
        Duration::from_secs(10),
    )
    .await;

    // Redis goes away and comes back empty (no persistence here).
    server.restart().await.unwrap();
    let after = wait_for("enqueue to work again", Duration::from_secs(20), || async {
        queue.enqueue(&job(2, Behavior::Succeed), None).await.ok()
    })
    .await
    .unwrap()
    .id;
    wait_state(&queue, &after, JobState::Succeeded, Duration::from_secs(30)).await;
    worker.stop().await;
    assert_eq!(seen.runs_of(&after), 1);
}

/// A connection of the test's own, to look at keys no queue operation reads.
async fn raw_redis(queue: &Queue) -> redis::aio::MultiplexedConnection {
    redis::Client::open(queue.config().redis_url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_idempotency_key_opens_the_first_batch_again() {
    let queue = shared_queue("batch-idem", |config| config.idempotency_ttl_secs = 600).await;
    let info = serde_json::json!({"source": "test"});
    let opened = queue
        .open_batch_idempotent(&info, 0, "upload-1")
        .await
        .unwrap();
    assert!(opened.created);
    let first = opened.id;
    let record = queue
        .batch(&first)
        .await
        .unwrap()
        .expect("the batch is open");
    assert!(!record.sealed);
    // The key is where `Keys` says, with the idempotency TTL.
    let key = queue.keys().batch_idempotency(queue.name(), "upload-1");
    let mut conn = raw_redis(&queue).await;
    let (stored, ttl): (String, i64) = redis::pipe()
        .cmd("GET")
        .arg(&key)
        .cmd("TTL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(stored, first);
    assert!((1..=600).contains(&ttl), "ttl {ttl}");

    // A retry (or the same call again after a lost reply) gets the first batch, and opens
    // nothing new.
    let again = queue
        .open_batch_idempotent(&info, 0, "upload-1")
        .await
        .unwrap();
    assert_eq!((again.id.as_str(), again.created), (first.as_str(), false));
    assert_eq!(queue.batch_ids(0, 10).await.unwrap(), [first.as_str()]);
    // Keys are per queue; a plain open claims nothing.
    let other = queue
        .for_queue("other")
        .open_batch_idempotent(&info, 0, "upload-1")
        .await
        .unwrap();
    assert!(other.created);
    assert_ne!(other.id, first);
    let plain = klingq_core::JobId::new().to_string();
    queue.open_batch(&plain, &info, 0).await.unwrap();
    assert!(queue.batch(&plain).await.unwrap().is_some());
    assert_eq!(queue.seal_batch(&first).await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_events_group_reads_claims_and_acknowledges_each_event() {
    let queue = shared_queue("events-group", |_| {}).await;
    let jobs: Vec<NewJob> = (0..3).map(|n| job(n, Behavior::Succeed)).collect();
    let ids = enqueue_ids(&queue, &jobs, None).await;
    for id in &ids {
        queue.cancel(id, "test").await.unwrap();
    }
    let recent = queue.recent_events(2).await.unwrap();
    assert_eq!(
        recent
            .iter()
            .map(|e| e.subject.as_str())
            .collect::<Vec<_>>(),
        [ids[1].as_str(), ids[2].as_str()],
        "the newest, oldest first"
    );

    let mut groups = queue.events_groups("test-group", "first");
    assert_eq!(groups.len(), 1, "one partition, one reader");
    let mut first = groups.remove(0);
    first.ensure().await.unwrap();
    first.ensure().await.unwrap();
    assert!(first.read_pending(10).await.unwrap().is_empty());
    let read = first.read_new(10, Duration::from_millis(50)).await.unwrap();
    assert_eq!(read.events.len(), 3, "{read:?}");
    assert!(read.deleted.is_empty());
    assert_eq!(read.events[0].subject, ids[0]);
    assert_eq!(read.events[0].event_type, "job.cancelled");
    assert!(!read.events[0].body.is_empty());
    // Read, not acknowledged: pending for this consumer only.
    assert_eq!(first.read_pending(10).await.unwrap(), read);
    assert!(
        first
            .read_new(10, Duration::from_millis(50))
            .await
            .unwrap()
            .is_empty()
    );

    // Another consumer takes them over once idle (here: at once).
    let second = queue.events_groups("test-group", "second").remove(0);
    let claimed = second.claim_idle(Duration::ZERO, "0-0", 10).await.unwrap();
    assert_eq!(claimed.entries.events.len(), 3);
    assert_eq!(claimed.next, "0-0");
    assert!(first.read_pending(10).await.unwrap().is_empty());
    second.ack(&claimed.entries.cursors()[..2]).await.unwrap();
    let left = second.read_pending(10).await.unwrap();
    assert_eq!(left.events.len(), 1);

    // An entry trimmed from the stream while pending comes back deleted.
    let mut conn = raw_redis(&queue).await;
    let _: i64 = redis::cmd("XTRIM")
        .arg(queue.keys().events())
        .arg("MAXLEN")
        .arg(0)
        .query_async(&mut conn)
        .await
        .unwrap();
    let claimed = first.claim_idle(Duration::ZERO, "0-0", 10).await.unwrap();
    assert!(claimed.entries.events.is_empty(), "{claimed:?}");
    assert_eq!(claimed.entries.deleted, [left.events[0].cursor.clone()]);
    first.ack(&claimed.entries.cursors()).await.unwrap();
    assert!(first.read_pending(10).await.unwrap().is_empty());
    assert!(second.read_pending(10).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_records_keep_the_last_attempts_and_the_first_disable() {
    let queue = shared_queue("webhook-records", |config| config.retention_secs = 3_600).await;
    for n in 1..=3 {
        queue
            .push_webhook_attempt("d1", &format!("attempt {n}"), 2)
            .await
            .unwrap();
    }
    // The same record again (a retried call) is not appended twice.
    queue
        .push_webhook_attempt("d1", "attempt 3", 2)
        .await
        .unwrap();
    assert_eq!(
        queue.webhook_attempts("d1").await.unwrap(),
        ["attempt 2", "attempt 3"]
    );
    assert_eq!(
        queue
            .last_webhook_attempts(&["d1".to_owned(), "d2".to_owned()])
            .await
            .unwrap(),
        [Some("attempt 3".to_owned()), None]
    );
    let mut conn = raw_redis(&queue).await;
    let ttl: i64 = redis::cmd("TTL")
        .arg(queue.keys().webhook_attempts("d1"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!((1..=3_600).contains(&ttl), "ttl {ttl}");

    assert!(
        queue
            .disable_webhook_endpoint("ep_1", "first")
            .await
            .unwrap()
    );
    assert!(
        !queue
            .disable_webhook_endpoint("ep_1", "second")
            .await
            .unwrap()
    );
    assert_eq!(
        queue
            .disabled_webhook_endpoint("ep_1")
            .await
            .unwrap()
            .as_deref(),
        Some("first")
    );
    assert_eq!(queue.disabled_webhook_endpoints().await.unwrap(), ["first"]);
    assert!(queue.enable_webhook_endpoint("ep_1").await.unwrap());
    assert!(!queue.enable_webhook_endpoint("ep_1").await.unwrap());
    assert!(
        queue
            .disabled_webhook_endpoint("ep_1")
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_reads_count_commands_and_delete_a_namespace() {
    let queue = shared_queue("admin", |_| {}).await;
    queue.ping().await.unwrap();
    let before = queue.command_counters().await.unwrap();
    let jobs: Vec<NewJob> = (0..10).map(|n| job(n, Behavior::Succeed)).collect();
    queue.enqueue_many(&jobs, None).await.unwrap();
    let after = queue.command_counters().await.unwrap();
    assert!(after.scripts > before.scripts, "{before:?} {after:?}");
    assert!(
        after.commands >= before.commands + 10,
        "{before:?} {after:?}"
    );
    assert_eq!(queue.dead_letter_count().await.unwrap(), 0);

    let other = shared_queue("admin-other", |_| {}).await;
    other
        .enqueue(&job(0, Behavior::Succeed), None)
        .await
        .unwrap();
    assert!(queue.delete_namespace().await.unwrap() >= 10);
    let mut conn = raw_redis(&queue).await;
    let (_, left): (u64, Vec<String>) = redis::cmd("SCAN")
        .arg(0)
        .arg("MATCH")
        .arg(format!("{}:*", queue.keys().prefix()))
        .arg("COUNT")
        .arg(100_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(left.is_empty(), "{left:?}");
    // Another namespace is untouched.
    assert_eq!(other.stats().await.unwrap().waiting, 1);
}

#[path = "it/topology.rs"]
mod topology;

#[path = "it/tls.rs"]
mod tls;

#[path = "it/partitions.rs"]
mod partitions;

#[path = "it/parking.rs"]
mod parking;

#[path = "it/cost.rs"]
mod cost;

#[path = "it/fair_share.rs"]
mod fair_share;

#[path = "it/batch_guard.rs"]
mod batch_guard;
