//! Parked generations, waking them, provider callbacks, slot waiters and the generation-time
//! histogram, against a real Redis: a parked job keeps its state and its attempts and holds no
//! worker; a wake (from the test, a callback or a freed slot) delivers it again at once; a wake
//! that races a running handler is not lost. The scenarios about jobs run on one partition and
//! on four (the run binding and the slot waiters live in partition 0, the jobs elsewhere).

use klingq_queue::metrics::{Format, QueueMetrics};
use klingq_queue::{CallbackOutcome, SlotClaim, WakeOutcome};
use tokio::sync::Notify;

use super::*;

/// Longer than any test: a parked or deferred job delivered again was woken, not due.
const HOUR: Duration = Duration::from_secs(3_600);
/// Generous for a loaded 2-core machine.
const DEADLINE: Duration = Duration::from_secs(20);
const PARK_REASON: &str = "waiting for the provider run";
const SLOT: &str = "provider";

/// What a handler does on one delivery of a [`PlanJob`].
#[derive(Debug, Clone, Serialize, Deserialize)]
enum Act {
    /// Saves `generating` (with its run in the checkpoint) and parks for an hour.
    Park,
    /// Saves `generating` and binds `run`: a callback that came first means the run ended, and
    /// the job succeeds; otherwise it holds (when `hold`) and parks for an hour.
    Bind {
        run: String,
        hold: bool,
    },
    /// Takes the shared slot or waits for it; turned away, it defers for an hour.
    Slot,
    Succeed,
}

/// One delivery's plan: `hold` waits for the test's go ([`Probe::release`]) first.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Step {
    hold: bool,
    act: Act,
}

fn step(act: Act) -> Step {
    Step { hold: false, act }
}

fn held(act: Act) -> Step {
    Step { hold: true, act }
}

/// A job whose n-th delivery follows `plan[n - 1]` (the last step repeats).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PlanJob {
    plan: Vec<Step>,
}

/// One delivery as its handler saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Taken {
    attempt: u32,
    state: JobState,
}

/// What the handlers saw and did, per job id; and the gates holding handlers.
#[derive(Clone, Default)]
struct Probe {
    deliveries: Arc<Mutex<HashMap<String, Vec<Taken>>>>,
    /// The delivery (1-based) a handler is holding at, while it waits for its gate.
    holding: Arc<Mutex<HashMap<String, usize>>>,
    gates: Arc<Mutex<HashMap<String, Arc<Notify>>>>,
    /// What each `bind_run` returned.
    bound: Arc<Mutex<HashMap<String, Vec<Option<String>>>>>,
    /// Whether each slot attempt was granted.
    slots: Arc<Mutex<HashMap<String, Vec<bool>>>>,
}

impl Probe {
    fn taken(&self, id: &str) -> Vec<Taken> {
        self.deliveries
            .lock()
            .unwrap()
            .get(id)
            .cloned()
            .unwrap_or_default()
    }

    fn count(&self, id: &str) -> usize {
        self.taken(id).len()
    }

    fn gate(&self, id: &str) -> Arc<Notify> {
        self.gates
            .lock()
            .unwrap()
            .entry(id.to_owned())
            .or_default()
            .clone()
    }

    fn holding(&self, id: &str) -> Option<usize> {
        self.holding.lock().unwrap().get(id).copied()
    }

    /// Lets the handler holding `id` go on (or the next one to hold, at once).
    fn release(&self, id: &str) {
        self.gate(id).notify_one();
    }

    async fn hold(&self, id: &str, delivery: usize) {
        let gate = self.gate(id);
        self.holding.lock().unwrap().insert(id.to_owned(), delivery);
        gate.notified().await;
        self.holding.lock().unwrap().remove(id);
    }

    fn bound(&self, id: &str) -> Vec<Option<String>> {
        self.bound
            .lock()
            .unwrap()
            .get(id)
            .cloned()
            .unwrap_or_default()
    }

    fn slots(&self, id: &str) -> Vec<bool> {
        self.slots
            .lock()
            .unwrap()
            .get(id)
            .cloned()
            .unwrap_or_default()
    }
}

fn park() -> JobFailure {
    JobFailure::Park {
        after: HOUR,
        reason: PARK_REASON.into(),
    }
}

async fn save_generating(lease: &Lease, run: &str) -> Result<(), JobFailure> {
    let checkpoint = serde_json::json!({ "provider": { "run_id": run } });
    Ok(lease
        .save(JobState::Generating, &checkpoint, "generating")
        .await?)
}

async fn plan_handler(
    job: PlanJob,
    lease: Lease,
    probe: Data<Probe>,
) -> Result<Completion, JobFailure> {
    let id = lease.job_id().to_owned();
    let n = {
        let mut all = probe.deliveries.lock().unwrap();
        let list = all.entry(id.clone()).or_default();
        list.push(Taken {
            attempt: lease.attempt(),
            state: lease.state_at_delivery(),
        });
        list.len()
    };
    let step = job.plan[(n - 1).min(job.plan.len() - 1)].clone();
    if step.hold {
        probe.hold(&id, n).await;
    }
    match step.act {
        Act::Park => {
            save_generating(&lease, "run-park").await?;
            return Err(park());
        }
        Act::Bind { run, hold } => {
            save_generating(&lease, &run).await?;
            let early = lease
                .queue()
                .bind_run(&id, &run, HOUR)
                .await
                .map_err(|error| JobFailure::from(LeaseError::Redis(error)))?;
            probe
                .bound
                .lock()
                .unwrap()
                .entry(id.clone())
                .or_default()
                .push(early.clone());
            if early.is_none() {
                if hold {
                    probe.hold(&id, n).await;
                }
                return Err(park());
            }
        }
        Act::Slot => {
            let status = lease
                .queue()
                .acquire_slot_or_wait(
                    SLOT,
                    &id,
                    SlotClaim::anonymous(),
                    Duration::from_secs(600),
                    1,
                )
                .await
                .map_err(|error| JobFailure::from(LeaseError::Redis(error)))?;
            probe
                .slots
                .lock()
                .unwrap()
                .entry(id.clone())
                .or_default()
                .push(status.acquired);
            if !status.acquired {
                return Err(JobFailure::Defer {
                    after: HOUR,
                    reason: "waiting for a provider slot".into(),
                });
            }
            // Succeeds holding the slot: the test gives it back.
        }
        Act::Succeed => {}
    }
    Ok(Completion {
        extras: EventExtras::default(),
        charged_micros: 0,
    })
}

fn spawn_plan_worker(queue: &Queue, concurrency: usize, probe: &Probe) -> RunningWorker {
    let backend = QueueBackend::<PlanJob>::new(
        queue.clone(),
        WorkerOptions {
            consumer: consumer_name("parking"),
            concurrency,
        },
    );
    let handle = backend.handle();
    let worker = WorkerBuilder::new(handle.consumer().to_owned())
        .backend(backend)
        .data(probe.clone())
        .catch_panic()
        .concurrency(concurrency)
        .build(plan_handler);
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
    RunningWorker {
        handle,
        stop: Some(stop),
        join,
    }
}

async fn parking_queue(prefix: &str, partitions: u32) -> Queue {
    let queue = shared_queue(prefix, |config| config.partitions = partitions).await;
    assert_eq!(queue.partitions().len(), partitions as usize);
    queue
}

/// Enqueues a job following `plan`; on a partitioned queue it lives outside partition 0
/// (where the run bindings and slot waiters live), in a partition picked by `spread`.
async fn enqueue_plan(queue: &Queue, spread: usize, plan: Vec<Step>) -> String {
    let parts = queue.partitions();
    let p = if parts.len() > 1 {
        1 + spread % (parts.len() - 1)
    } else {
        0
    };
    let mut new_job = NewJob::new(&PlanJob { plan }).unwrap();
    new_job.id = parts.id_in(p);
    let id = queue.enqueue(&new_job, None).await.unwrap().id;
    assert_eq!(parts.of(&id), p, "{id}");
    id
}

async fn record(queue: &Queue, id: &str) -> klingq_queue::JobRecord {
    queue
        .job(id)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("no record for {id}"))
}

/// The job's score in its partition's delayed set, if it is there.
async fn delayed_at(
    queue: &Queue,
    conn: &mut redis::aio::MultiplexedConnection,
    id: &str,
) -> Option<u64> {
    let parts = queue.partitions();
    redis::cmd("ZSCORE")
        .arg(parts.keys(parts.of(id)).delayed(queue.name()))
        .arg(id)
        .query_async::<Option<u64>>(conn)
        .await
        .unwrap()
}

/// Waits until the job's `delivery`-th delivery has settled into the delayed set.
async fn wait_delayed(
    queue: &Queue,
    conn: &redis::aio::MultiplexedConnection,
    probe: &Probe,
    id: &str,
    delivery: usize,
) {
    wait_for(
        &format!("job {id} to wait in the delayed set after delivery {delivery}"),
        DEADLINE,
        || async {
            let mut conn = conn.clone();
            (probe.count(id) == delivery && delayed_at(queue, &mut conn, id).await.is_some())
                .then_some(())
        },
    )
    .await
    .unwrap();
}

async fn wait_holding(probe: &Probe, id: &str, delivery: usize) {
    wait_for(
        &format!("job {id}'s handler to hold at delivery {delivery}"),
        DEADLINE,
        || async { (probe.holding(id) == Some(delivery)).then_some(()) },
    )
    .await
    .unwrap();
}

async fn wait_deliveries(probe: &Probe, id: &str, deliveries: usize) {
    wait_for(
        &format!("job {id} to be delivered {deliveries} times"),
        DEADLINE,
        || async { (probe.count(id) >= deliveries).then_some(()) },
    )
    .await
    .unwrap();
}

/// The value of `klingq_jobs_parked` for the queue in the metrics text.
async fn parked_gauge(queue: &Queue) -> u64 {
    let mut registry = prometheus_client::registry::Registry::default();
    QueueMetrics::read(queue, None)
        .await
        .unwrap()
        .register(&mut registry);
    let out = Format::Text.encode(&[&registry]);
    assert!(
        out.contains("# TYPE klingq_jobs_parked gauge"),
        "no parked gauge in:\n{out}"
    );
    let prefix = format!("klingq_jobs_parked{{queue=\"{}\"}} ", queue.name());
    let values: Vec<u64> = out
        .lines()
        .filter_map(|line| line.strip_prefix(prefix.as_str()))
        .map(|value| value.parse().unwrap())
        .collect();
    assert_eq!(values.len(), 1, "one parked gauge for the queue in:\n{out}");
    values[0]
}

/// Test 1: a generation parks three times and is woken each time: it stays `generating`,
/// uses no attempt, is counted as parked (stat and gauge) only while it waits, and waits in the
/// delayed set without being counted as scheduled.
async fn parks_keep_state_and_attempts(partitions: u32) {
    let queue = parking_queue("park-cycles", partitions).await;
    let mut conn = raw_redis(&queue).await;
    // A job scheduled for later, so that the scheduled count shows what it leaves out.
    let mut later = NewJob::new(&PlanJob {
        plan: vec![step(Act::Succeed)],
    })
    .unwrap();
    later.run_at_ms = Some(now_ms() + HOUR.as_millis() as u64);
    let later = queue.enqueue(&later, None).await.unwrap().id;
    let id = enqueue_plan(
        &queue,
        0,
        vec![
            step(Act::Park),
            held(Act::Park),
            held(Act::Park),
            held(Act::Succeed),
        ],
    )
    .await;
    let probe = Probe::default();
    let worker = spawn_plan_worker(&queue, 2, &probe);

    for cycle in 1..=3 {
        wait_delayed(&queue, &conn, &probe, &id, cycle).await;
        let parked = record(&queue, &id).await;
        assert_eq!(parked.state, JobState::Generating, "cycle {cycle}");
        assert_eq!(parked.attempts, 0, "cycle {cycle}: a park uses no attempt");
        assert_eq!(parked.worker, None, "cycle {cycle}");
        assert_eq!(parked.reason.as_deref(), Some(PARK_REASON), "cycle {cycle}");
        let due = parked
            .run_at_ms
            .expect("a parked job is due at its next poll");
        assert!(due > now_ms() + 50 * 60 * 1_000, "cycle {cycle}: due {due}");
        assert_eq!(
            delayed_at(&queue, &mut conn, &id).await,
            Some(due),
            "cycle {cycle}"
        );
        let stats = queue.stats().await.unwrap();
        assert_eq!(
            (
                stats.parked,
                stats.scheduled,
                stats.waiting,
                stats.in_flight
            ),
            (1, 1, 0, 0),
            "cycle {cycle}: {stats:?}"
        );
        assert_eq!(parked_gauge(&queue).await, 1, "cycle {cycle}");

        assert_eq!(
            queue.wake(&id, "the run ended").await.unwrap(),
            WakeOutcome::Woken,
            "cycle {cycle}"
        );
        // Delivered again at once (not in an hour), and taken out of the parked count.
        wait_holding(&probe, &id, cycle + 1).await;
        let taken = probe.taken(&id);
        assert_eq!(
            taken[cycle],
            Taken {
                attempt: 1,
                state: JobState::Generating
            },
            "cycle {cycle}: {taken:?}"
        );
        let running = record(&queue, &id).await;
        assert_eq!(running.state, JobState::Generating, "cycle {cycle}");
        assert_eq!(running.attempts, 1, "cycle {cycle}");
        assert!(running.worker.is_some(), "cycle {cycle}");
        assert_eq!(delayed_at(&queue, &mut conn, &id).await, None);
        let stats = queue.stats().await.unwrap();
        assert_eq!(
            (stats.parked, stats.scheduled, stats.in_flight),
            (0, 1, 1),
            "cycle {cycle}: {stats:?}"
        );
        assert_eq!(parked_gauge(&queue).await, 0, "cycle {cycle}");
        probe.release(&id);
    }

    wait_state(&queue, &id, JobState::Succeeded, DEADLINE).await;
    let done = record(&queue, &id).await;
    assert_eq!(done.attempts, 1, "three parks, one attempt");
    assert_eq!(probe.count(&id), 4);
    assert_eq!(
        worker
            .handle
            .stats()
            .parked
            .load(std::sync::atomic::Ordering::Relaxed),
        3
    );
    worker.stop().await;
    let stats = queue.stats().await.unwrap();
    assert_eq!((stats.parked, stats.scheduled), (0, 1), "{stats:?}");
    assert_eq!(probe.count(&later), 0);
    queue.delete_namespace().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_generation_keeps_its_state_and_attempts() {
    parks_keep_state_and_attempts(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_generation_keeps_its_state_and_attempts_in_four_partitions() {
    parks_keep_state_and_attempts(4).await;
}

/// Test 2: what a wake finds: a job on its ready stream (queued), a parked one (woken and
/// delivered again at once), one a handler holds (flagged: its park then makes it ready at
/// once), a finished one and an unknown one (gone).
async fn wake_outcomes(partitions: u32) {
    let queue = parking_queue("wake", partitions).await;
    let conn = raw_redis(&queue).await;
    let parked = enqueue_plan(&queue, 0, vec![step(Act::Park), step(Act::Succeed)]).await;
    let running = enqueue_plan(&queue, 1, vec![held(Act::Park), step(Act::Succeed)]).await;
    // No worker yet: both wait on their ready streams.
    for id in [&parked, &running] {
        assert_eq!(
            queue.wake(id, "too early").await.unwrap(),
            WakeOutcome::Queued
        );
    }
    let probe = Probe::default();
    let worker = spawn_plan_worker(&queue, 2, &probe);

    // Parked, then woken: delivered again long before its hour.
    wait_delayed(&queue, &conn, &probe, &parked, 1).await;
    assert_eq!(queue.stats().await.unwrap().parked, 1);
    assert_eq!(
        queue.wake(&parked, "the run ended").await.unwrap(),
        WakeOutcome::Woken
    );
    wait_deliveries(&probe, &parked, 2).await;
    wait_state(&queue, &parked, JobState::Succeeded, DEADLINE).await;
    assert_eq!(probe.count(&parked), 2);
    assert_eq!(record(&queue, &parked).await.attempts, 1);
    assert_eq!(
        queue.wake(&parked, "late").await.unwrap(),
        WakeOutcome::Gone
    );

    // Held by a handler: flagged; the handler's park then goes to the ready stream at once.
    wait_holding(&probe, &running, 1).await;
    assert_eq!(
        queue.wake(&running, "the run ended").await.unwrap(),
        WakeOutcome::Flagged
    );
    probe.release(&running);
    wait_deliveries(&probe, &running, 2).await;
    wait_state(&queue, &running, JobState::Succeeded, DEADLINE).await;
    assert_eq!(
        probe.taken(&running),
        [
            Taken {
                attempt: 1,
                state: JobState::Queued
            },
            Taken {
                attempt: 1,
                state: JobState::Generating
            }
        ]
    );
    assert_eq!(
        queue.wake(&running, "late").await.unwrap(),
        WakeOutcome::Gone
    );

    let unknown = queue
        .partitions()
        .id_in(queue.partitions().len() - 1)
        .to_string();
    assert_eq!(
        queue.wake(&unknown, "nobody").await.unwrap(),
        WakeOutcome::Gone
    );
    assert!(queue.job(&unknown).await.unwrap().is_none());
    worker.stop().await;
    let stats = queue.stats().await.unwrap();
    assert_eq!(
        (
            stats.parked,
            stats.scheduled,
            stats.waiting,
            stats.in_flight
        ),
        (0, 0, 0, 0),
        "{stats:?}"
    );
    queue.delete_namespace().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wake_readies_a_parked_job_and_flags_a_running_one() {
    wake_outcomes(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wake_readies_a_parked_job_and_flags_a_running_one_in_four_partitions() {
    wake_outcomes(4).await;
}

/// Test 3: provider callbacks: one before the binding is kept and handed to the binding; one
/// after wakes the parked job (or flags the running one); a repeat is a duplicate; one for a
/// finished job says so. Statuses are opaque strings.
async fn callbacks(partitions: u32) {
    let queue = parking_queue("callbacks", partitions).await;
    let mut conn = raw_redis(&queue).await;
    let probe = Probe::default();
    let worker = spawn_plan_worker(&queue, 2, &probe);

    // The callback comes before any job bound its run: kept, and handed to the binding.
    assert_eq!(
        queue
            .provider_callback("run-early", "canceled")
            .await
            .unwrap(),
        CallbackOutcome::Unknown
    );
    assert_eq!(
        queue
            .provider_callback("run-early", "canceled")
            .await
            .unwrap(),
        CallbackOutcome::Duplicate { job_id: None }
    );
    // Kept for a day (klingq_queue::EARLY_CALLBACK_TTL), then forgotten.
    let ttl: i64 = redis::cmd("TTL")
        .arg(queue.keys().run("run-early"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        (86_000..=86_400).contains(&ttl),
        "an early callback is kept for a day: ttl {ttl}"
    );
    let early = enqueue_plan(
        &queue,
        0,
        vec![step(Act::Bind {
            run: "run-early".into(),
            hold: false,
        })],
    )
    .await;
    wait_state(&queue, &early, JobState::Succeeded, DEADLINE).await;
    assert_eq!(probe.bound(&early), [Some("canceled".to_owned())]);
    assert_eq!(probe.count(&early), 1, "it never parked");

    // Bound first, then the callback: the parked job is woken and delivered again.
    let bound = enqueue_plan(
        &queue,
        1,
        vec![
            step(Act::Bind {
                run: "run-late".into(),
                hold: false,
            }),
            step(Act::Succeed),
        ],
    )
    .await;
    wait_delayed(&queue, &conn, &probe, &bound, 1).await;
    assert_eq!(probe.bound(&bound), [None]);
    // The binding is global (partition 0), the job in its own partition.
    let binding: Option<String> = redis::cmd("HGET")
        .arg(queue.keys().run("run-late"))
        .arg("job")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(binding.as_deref(), Some(bound.as_str()));
    assert_eq!(queue.stats().await.unwrap().parked, 1);
    assert_eq!(
        queue
            .provider_callback("run-late", "succeeded")
            .await
            .unwrap(),
        CallbackOutcome::Woken {
            job_id: bound.clone()
        }
    );
    wait_deliveries(&probe, &bound, 2).await;
    wait_state(&queue, &bound, JobState::Succeeded, DEADLINE).await;
    assert_eq!(probe.count(&bound), 2);
    assert_eq!(
        queue
            .provider_callback("run-late", "succeeded")
            .await
            .unwrap(),
        CallbackOutcome::Duplicate {
            job_id: Some(bound.clone())
        }
    );
    assert_eq!(
        queue
            .provider_callback("run-late", "canceled")
            .await
            .unwrap(),
        CallbackOutcome::Finished {
            job_id: bound.clone()
        }
    );
    assert_eq!(
        queue
            .provider_callback("run-early", "succeeded")
            .await
            .unwrap(),
        CallbackOutcome::Finished {
            job_id: early.clone()
        }
    );

    // The callback races the handler between its binding and its park: not lost.
    let racing = enqueue_plan(
        &queue,
        2,
        vec![
            step(Act::Bind {
                run: "run-racing".into(),
                hold: true,
            }),
            step(Act::Succeed),
        ],
    )
    .await;
    wait_holding(&probe, &racing, 1).await;
    assert_eq!(probe.bound(&racing), [None]);
    assert_eq!(
        queue
            .provider_callback("run-racing", "succeeded")
            .await
            .unwrap(),
        CallbackOutcome::Woken {
            job_id: racing.clone()
        }
    );
    probe.release(&racing);
    wait_deliveries(&probe, &racing, 2).await;
    wait_state(&queue, &racing, JobState::Succeeded, DEADLINE).await;
    assert_eq!(record(&queue, &racing).await.attempts, 1);

    worker.stop().await;
    let stats = queue.stats().await.unwrap();
    assert_eq!((stats.parked, stats.scheduled), (0, 0), "{stats:?}");
    queue.delete_namespace().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_callbacks_wake_their_job_whichever_comes_first() {
    callbacks(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_callbacks_wake_their_job_whichever_comes_first_in_four_partitions() {
    callbacks(4).await;
}

/// Test 4: a parked job cancelled leaves the parked count and the delayed set, and never runs
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_parked_job_leaves_the_count_and_does_not_run_again() {
    let queue = parking_queue("park-cancel", 1).await;
    let mut conn = raw_redis(&queue).await;
    let id = enqueue_plan(&queue, 0, vec![step(Act::Park)]).await;
    let probe = Probe::default();
    let worker = spawn_plan_worker(&queue, 1, &probe);
    wait_delayed(&queue, &conn, &probe, &id, 1).await;
    assert_eq!(queue.stats().await.unwrap().parked, 1);

    assert_eq!(
        queue.cancel(&id, "user asked").await.unwrap(),
        CancelOutcome::Cancelled {
            previous: JobState::Generating,
            cost_committed: true
        }
    );
    let stats = queue.stats().await.unwrap();
    assert_eq!((stats.parked, stats.scheduled), (0, 0), "{stats:?}");
    assert_eq!(parked_gauge(&queue).await, 0);
    assert_eq!(delayed_at(&queue, &mut conn, &id).await, None);
    assert_eq!(record(&queue, &id).await.state, JobState::Cancelled);
    assert_eq!(
        queue.wake(&id, "the run ended").await.unwrap(),
        WakeOutcome::Gone
    );

    // A job enqueued after it runs; the cancelled one does not.
    let sentinel = enqueue_plan(&queue, 0, vec![step(Act::Succeed)]).await;
    wait_state(&queue, &sentinel, JobState::Succeeded, DEADLINE).await;
    worker.stop().await;
    assert_eq!(probe.count(&id), 1);
    assert_eq!(record(&queue, &id).await.state, JobState::Cancelled);
    assert_eq!(queue.stats().await.unwrap().parked, 0);
    queue.delete_namespace().await.unwrap();
}

async fn waiters(queue: &Queue, conn: &mut redis::aio::MultiplexedConnection) -> Vec<String> {
    redis::cmd("ZRANGE")
        .arg(queue.keys().limit_waiting(SLOT, "default"))
        .arg(0)
        .arg(-1)
        .query_async(conn)
        .await
        .unwrap()
}

async fn slot_holders(queue: &Queue, conn: &mut redis::aio::MultiplexedConnection) -> Vec<String> {
    redis::cmd("ZRANGE")
        .arg(queue.keys().limit(SLOT))
        .arg(0)
        .arg(-1)
        .query_async(conn)
        .await
        .unwrap()
}

/// Test 5: a job turned away from a full limit waits for it; the release wakes it at once
/// (not at the end of its deferral); a cancelled waiter hands the wake on to the next.
async fn slot_waiters(partitions: u32) {
    let queue = parking_queue("slot-waiters", partitions).await;
    let mut conn = raw_redis(&queue).await;
    let probe = Probe::default();
    let worker = spawn_plan_worker(&queue, 2, &probe);

    let a = enqueue_plan(&queue, 0, vec![step(Act::Slot)]).await;
    wait_state(&queue, &a, JobState::Succeeded, DEADLINE).await;
    assert_eq!(probe.slots(&a), [true]);
    assert_eq!(slot_holders(&queue, &mut conn).await, [a.as_str()]);

    // Turned away: registered as a waiter, deferred for an hour.
    let b = enqueue_plan(&queue, 1, vec![step(Act::Slot)]).await;
    wait_delayed(&queue, &conn, &probe, &b, 1).await;
    assert_eq!(probe.slots(&b), [false]);
    assert_eq!(waiters(&queue, &mut conn).await, [b.as_str()]);
    assert_eq!(record(&queue, &b).await.state, JobState::Scheduled);
    let stats = queue.stats().await.unwrap();
    assert_eq!((stats.scheduled, stats.parked), (1, 0), "{stats:?}");

    queue.release_slot(SLOT, &a).await.unwrap();
    wait_state(&queue, &b, JobState::Succeeded, DEADLINE).await;
    assert_eq!(probe.slots(&b), [false, true]);
    assert_eq!(
        record(&queue, &b).await.attempts,
        1,
        "a deferral uses no attempt"
    );
    assert!(waiters(&queue, &mut conn).await.is_empty());
    assert_eq!(slot_holders(&queue, &mut conn).await, [b.as_str()]);

    // Two waiters; the first is cancelled: the release skips it and wakes the second.
    let c = enqueue_plan(&queue, 2, vec![step(Act::Slot)]).await;
    let d = enqueue_plan(&queue, 3, vec![step(Act::Slot)]).await;
    wait_delayed(&queue, &conn, &probe, &c, 1).await;
    wait_delayed(&queue, &conn, &probe, &d, 1).await;
    let order = waiters(&queue, &mut conn).await;
    let mut sorted = order.clone();
    sorted.sort();
    let mut expected = vec![c.clone(), d.clone()];
    expected.sort();
    assert_eq!(sorted, expected);
    let (first, second) = (&order[0], &order[1]);
    assert!(matches!(
        queue.cancel(first, "user asked").await.unwrap(),
        CancelOutcome::Cancelled {
            previous: JobState::Scheduled,
            ..
        }
    ));
    queue.release_slot(SLOT, &b).await.unwrap();
    wait_state(&queue, second, JobState::Succeeded, DEADLINE).await;
    assert_eq!(probe.slots(second), [false, true]);
    assert_eq!(probe.slots(first), [false]);
    assert_eq!(record(&queue, first).await.state, JobState::Cancelled);
    assert!(waiters(&queue, &mut conn).await.is_empty());
    assert_eq!(slot_holders(&queue, &mut conn).await, [second.as_str()]);
    worker.stop().await;
    queue.delete_namespace().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_slot_wakes_its_first_live_waiter() {
    slot_waiters(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_slot_wakes_its_first_live_waiter_in_four_partitions() {
    slot_waiters(4).await;
}

/// Test 6: the generation-time histogram counts per bucket and halves past its cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generation_times_accumulate_and_halve_past_the_cap() {
    let queue = parking_queue("gen-times", 1).await;
    let mut conn = raw_redis(&queue).await;
    let name = "kling-v2:5s";
    let sorted = |mut counts: Vec<(String, u64)>| {
        counts.sort();
        counts
    };
    let pairs = |counts: &[(&str, u64)]| -> Vec<(String, u64)> {
        counts.iter().map(|(b, n)| ((*b).to_owned(), *n)).collect()
    };
    let samples = || {
        let key = queue.keys().gen_times(name);
        let mut conn = conn.clone();
        async move {
            redis::cmd("HGET")
                .arg(key)
                .arg("n")
                .query_async::<Option<u64>>(&mut conn)
                .await
                .unwrap()
        }
    };
    assert!(queue.gen_times(name).await.unwrap().is_empty());
    for _ in 0..5 {
        queue.record_gen_time(name, "60", 10).await.unwrap();
        queue.record_gen_time(name, "90", 10).await.unwrap();
    }
    // At the cap, nothing is halved yet.
    assert_eq!(
        sorted(queue.gen_times(name).await.unwrap()),
        pairs(&[("60", 5), ("90", 5)])
    );
    assert_eq!(samples().await, Some(10));
    // One past the cap: every count halved (rounded down), zeros dropped.
    queue.record_gen_time(name, "120", 10).await.unwrap();
    assert_eq!(
        sorted(queue.gen_times(name).await.unwrap()),
        pairs(&[("60", 2), ("90", 2)])
    );
    assert_eq!(samples().await, Some(4));
    queue.record_gen_time(name, "60", 10).await.unwrap();
    assert_eq!(
        sorted(queue.gen_times(name).await.unwrap()),
        pairs(&[("60", 3), ("90", 2)])
    );
    assert_eq!(samples().await, Some(5));
    // Another kind of run has a histogram of its own.
    queue
        .record_gen_time("kling-v2:10s", "60", 10)
        .await
        .unwrap();
    assert_eq!(
        queue.gen_times("kling-v2:10s").await.unwrap(),
        pairs(&[("60", 1)])
    );
    assert_eq!(
        sorted(queue.gen_times(name).await.unwrap()),
        pairs(&[("60", 3), ("90", 2)])
    );
    let fields: HashMap<String, u64> = redis::cmd("HGETALL")
        .arg(queue.keys().gen_times(name))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(fields.len(), 3, "{fields:?}");
    queue.delete_namespace().await.unwrap();
}
