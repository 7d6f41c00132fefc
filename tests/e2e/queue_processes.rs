//! The queue across worker processes: exactly-once completion shared by two processes, and
//! recovery of a SIGKILLed worker's jobs by another within the lease timeout.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use klingq_core::JobState;
use klingq_e2e::test_counts_key;
use klingq_queue::{NewJob, Queue, QueueConfig};
use klingq_testkit::redis::{redis_url, require_shared_redis, unique_namespace};
use klingq_testkit::wait_for;
use tokio::process::{Child, Command};

const WORKER: &str = env!("CARGO_BIN_EXE_klingq-test-worker");

async fn start_worker(namespace: &str, concurrency: usize, lease_secs: u64) -> Child {
    let mut command = Command::new(WORKER);
    command.args([
        redis_url(),
        namespace.to_owned(),
        concurrency.to_string(),
        "0".to_owned(),
        lease_secs.to_string(),
    ]);
    klingq_e2e::spawn_ready(command).await
}

async fn queue(namespace: &str) -> Queue {
    require_shared_redis().await.unwrap();
    Queue::connect(QueueConfig {
        redis_url: redis_url(),
        namespace: namespace.to_owned(),
        ..QueueConfig::default()
    })
    .await
    .unwrap()
}

/// The test worker's counts per job (`started`, `completed`), read on a connection of the
/// test's own: they are its bookkeeping, not the queue's.
async fn counts(queue: &Queue, name: &str) -> HashMap<String, u64> {
    let mut conn = redis::Client::open(queue.config().redis_url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    redis::cmd("HGETALL")
        .arg(test_counts_key(queue.keys(), name))
        .query_async(&mut conn)
        .await
        .unwrap()
}

fn sleep_job(ms: u64) -> NewJob {
    NewJob::new(&serde_json::json!({ "ms": ms })).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_jobs_complete_exactly_once_across_two_worker_processes() {
    let namespace = unique_namespace("two-procs");
    let queue = queue(&namespace).await;
    let batch = klingq_core::JobId::new().to_string();
    queue
        .open_batch(&batch, &serde_json::json!({}), 0)
        .await
        .unwrap();
    let jobs: Vec<NewJob> = (0..10_000).map(|_| sleep_job(1)).collect();
    let ids: Vec<String> = queue
        .enqueue_many(&jobs, Some(&batch))
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    queue.seal_batch(&batch).await.unwrap();
    let mut first = start_worker(&namespace, 32, 10).await;
    let mut second = start_worker(&namespace, 32, 10).await;
    wait_for("the batch to be done", Duration::from_secs(120), || async {
        queue.batch(&batch).await.unwrap().filter(|b| b.done)
    })
    .await
    .unwrap();
    first.kill().await.unwrap();
    second.kill().await.unwrap();

    let completed = counts(&queue, "completed").await;
    assert_eq!(completed.len(), 10_000);
    assert!(
        ids.iter().all(|id| completed.get(id) == Some(&1)),
        "a job completed twice or never"
    );
    let record = queue.batch(&batch).await.unwrap().unwrap();
    assert_eq!(record.counts.get("succeeded"), Some(&10_000));
    // Both processes took part.
    let workers: std::collections::HashSet<String> = queue
        .jobs(&ids[..200])
        .await
        .unwrap()
        .into_iter()
        .filter_map(|r| r.worker)
        .collect();
    assert!(workers.is_empty(), "finished jobs keep no worker");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_of_a_killed_worker_finish_on_another_within_the_lease_timeout() {
    let namespace = unique_namespace("kill9");
    let queue = queue(&namespace).await;
    let lease_secs = 3;
    let mut doomed = start_worker(&namespace, 8, lease_secs).await;
    let jobs: Vec<NewJob> = (0..8).map(|_| sleep_job(4_000)).collect();
    let ids: Vec<String> = queue
        .enqueue_many(&jobs, None)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    // All eight are running in the doomed worker.
    wait_for(
        "the first worker to start all jobs",
        Duration::from_secs(20),
        || async { (counts(&queue, "started").await.len() == 8).then_some(()) },
    )
    .await
    .unwrap();
    let survivor = start_worker(&namespace, 8, lease_secs).await;
    doomed.kill().await.unwrap(); // SIGKILL
    let killed_at = Instant::now();
    wait_for(
        "every job to succeed on the survivor",
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
    let recovered_in = killed_at.elapsed();
    drop(survivor);

    let completed = counts(&queue, "completed").await;
    assert!(ids.iter().all(|id| completed.get(id) == Some(&1)));
    let started = counts(&queue, "started").await;
    assert!(
        ids.iter().all(|id| started.get(id) == Some(&2)),
        "each ran once in each worker: {started:?}"
    );
    // Lease timeout + reclaim interval (1 s) + the 4 s job + margin.
    let bound = Duration::from_secs(lease_secs + 1 + 4 + 5);
    assert!(recovered_in < bound, "took {recovered_in:?}");
    for record in queue.jobs(&ids).await.unwrap() {
        assert_eq!(record.attempts, 2, "the killed attempt counts");
    }
}
