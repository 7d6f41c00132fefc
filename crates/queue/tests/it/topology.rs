//! The queue on the Redis that production runs: a real 3+3 Cluster entered through a node
//! that does not own the namespace's slot, a primary killed mid-batch in a Cluster and under
//! Sentinel, and what a person reads when Redis is down.

use std::collections::HashSet;

use klingq_queue::{RedisMode, key_slot};
use klingq_testkit::cluster::RedisCluster;
use klingq_testkit::redis::free_port;
use klingq_testkit::sentinel::RedisSentinel;

use super::*;

fn topology_config(url: String, prefix: &str) -> QueueConfig {
    QueueConfig {
        redis_url: url,
        // Short leases: a job whose settle was lost with the old primary is handed on soon.
        lease_timeout_secs: 5,
        reclaim_interval_secs: 1,
        ..config(&unique_namespace(prefix))
    }
}

/// Runs `n` jobs as one batch while `disrupt` runs, and checks that every one succeeded and
/// the batch completed with the right counts. Returns the jobs' ids and what the handlers saw.
pub(super) async fn batch_survives<F, Fut>(queue: &Queue, n: u64, disrupt: F) -> (Vec<String>, Seen)
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = ()>,
{
    let seen = Seen::default();
    let worker = spawn_worker(queue, 8, &seen);
    let batch = format!("b-{}", klingq_core::JobId::new());
    queue
        .open_batch(&batch, &serde_json::json!({}), 0)
        .await
        .unwrap();
    let jobs: Vec<NewJob> = (0..n).map(|i| job(i, Behavior::Sleep(30))).collect();
    let ids = enqueue_ids(queue, &jobs, Some(&batch)).await;
    queue.seal_batch(&batch).await.unwrap();
    // Disrupt once some jobs finished and most are still to run.
    wait_for("a few jobs to finish", Duration::from_secs(30), || async {
        (u64::from(seen.total_runs()) >= n.min(10)).then_some(())
    })
    .await
    .unwrap();
    disrupt().await;
    let record = wait_batch_done(queue, &batch, Duration::from_secs(120)).await;
    worker.stop().await;
    assert_eq!(record.total, n, "{record:?}");
    assert_eq!(record.counts.get("succeeded"), Some(&n), "{record:?}");
    let records = queue.jobs(&ids).await.unwrap();
    assert_eq!(records.len() as u64, n);
    for record in &records {
        assert_eq!(record.state, JobState::Succeeded, "{}", record.id);
        assert!(seen.runs_of(&record.id) >= 1, "{} never ran", record.id);
    }
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!(unique.len() as u64, n);
    (ids, seen)
}

/// The failover surfaced as transient errors, counted by kind (`klingq_redis_errors_total`).
fn assert_failover_seen(queue: &Queue) {
    let errors: u64 = queue.redis_errors().iter().map(|(_, n)| n).sum();
    assert!(
        errors > 0,
        "the failover was not seen: {:?}",
        queue.redis_errors()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_entered_through_a_node_that_owns_none_of_the_namespace_works() {
    let cluster = RedisCluster::start().await.unwrap();
    let namespace = unique_namespace("cluster");
    let slot = key_slot(&format!("{{{namespace}}}"));
    let owner = cluster.owner_of_slot(slot).await.unwrap();
    let wrong_node = cluster.url_not_owning(slot).await.unwrap();
    // A dead seed first: the next one is used.
    let url = format!("redis://127.0.0.1:{},{wrong_node}", free_port());
    let queue = Queue::connect(QueueConfig {
        redis_url: url,
        ..config(&namespace)
    })
    .await
    .unwrap();
    let topology = queue.topology().await;
    assert_eq!(topology.mode, "cluster");
    assert_eq!(topology.namespace_slot, Some(slot));
    assert_eq!(topology.slot_owner, Some(format!("127.0.0.1:{owner}")));
    assert_eq!(topology.primaries.len(), 3, "{topology}");

    batch_survives(&queue, 40, || async {}).await;
    let events = queue.read_events("0", 1_000, None).await.unwrap();
    assert_eq!(
        events
            .iter()
            .filter(|e| e.event_type == "job.succeeded")
            .count(),
        40
    );
    assert_eq!(
        events
            .iter()
            .filter(|e| e.event_type == "batch.completed")
            .count(),
        1
    );
    // The blocking reads went to the slot's owner: the job streams live there.
    let per_node = cluster.commands_per_node().await.unwrap();
    let busiest = per_node.iter().max_by_key(|(_, n)| *n).unwrap();
    assert_eq!(busiest.0, owner, "{per_node:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_primary_of_the_namespace_mid_batch_loses_no_job() {
    let cluster = RedisCluster::start().await.unwrap();
    let mut config = topology_config(cluster.seed_url(), "cluster-failover");
    // Acknowledged means on a replica too.
    config.min_replicas_ack = 1;
    let slot = key_slot(&format!("{{{}}}", config.namespace));
    let queue = Queue::connect(config).await.unwrap();
    batch_survives(&queue, 200, || async {
        let old = cluster.kill_primary_of_slot(slot).await.unwrap();
        let new = cluster.wait_failover(slot, old).await.unwrap();
        assert_ne!(old, new);
    })
    .await;
    assert_failover_seen(&queue);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_mid_batch_loses_no_job() {
    let sentinel = RedisSentinel::start().await.unwrap();
    let mut config = topology_config(sentinel.url(), "sentinel-failover");
    config.min_replicas_ack = 1;
    let queue = Queue::connect(config).await.unwrap();
    let topology = queue.topology().await;
    assert_eq!(topology.mode, "sentinel");
    assert_eq!(topology.service.as_deref(), Some("mymaster"));
    let first = sentinel.primary_port().await.unwrap();
    assert_eq!(topology.primaries, [format!("127.0.0.1:{first}")]);
    batch_survives(&queue, 200, || async {
        let old = sentinel.kill_primary().await.unwrap();
        let new = sentinel.wait_failover(old).await.unwrap();
        assert_ne!(old, new);
    })
    .await;
    let now = sentinel.primary_port().await.unwrap();
    assert_eq!(
        queue.topology().await.primaries,
        [format!("127.0.0.1:{now}")],
        "the queue follows the new primary"
    );
    assert_failover_seen(&queue);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_reads_as_one_line_naming_the_node_and_what_to_check() {
    let mut server = RedisServer::start().await.unwrap();
    let mut config = config(&unique_namespace("down"));
    config.redis_url = server.url();
    config.command_timeout_ms = 500;
    let queue = Queue::connect(config.clone()).await.unwrap().failing_fast();
    server.stop().await.unwrap();
    let error = queue.job("nope").await.unwrap_err();
    let text = error.to_string();
    assert!(
        text.starts_with(&format!("Redis unavailable at 127.0.0.1:{}", server.port())),
        "{text}"
    );
    assert!(text.contains("KLINGQ_REDIS_URL"), "{text}");
    assert!(!text.contains('\n'), "{text}");
    // Connecting to nothing says the same.
    let error = Queue::connect(config).await.unwrap_err().to_string();
    assert!(
        error.starts_with("Redis unavailable at 127.0.0.1:"),
        "{error}"
    );
    // A mode that contradicts the URL is refused before anything connects.
    let error = Queue::connect(QueueConfig {
        redis_url: "redis://:hunter2@127.0.0.1:1".to_owned(),
        redis_mode: RedisMode::Sentinel,
        ..QueueConfig::default()
    })
    .await
    .unwrap_err()
    .to_string();
    assert!(
        error.starts_with("queue.redis_url: must be redis+sentinel://"),
        "{error}"
    );
    assert!(!error.contains("hunter2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enqueue_no_replica_confirms_is_an_error_the_caller_sees() {
    // A primary without replicas: WAIT 1 can never be satisfied.
    let server = RedisServer::start().await.unwrap();
    let mut config = config(&unique_namespace("no-replica"));
    config.redis_url = server.url();
    config.min_replicas_ack = 1;
    config.replica_ack_timeout_ms = 100;
    let queue = Queue::connect(config).await.unwrap();
    let job = job(1, Behavior::Succeed);
    let error = queue.enqueue(&job, None).await.unwrap_err();
    assert!(
        matches!(
            error,
            klingq_queue::QueueError::NotReplicated {
                wanted: 1,
                acked: 0,
                timeout_ms: 100
            }
        ),
        "{error:?}"
    );
    assert!(
        error
            .to_string()
            .starts_with("only 0 of 1 Redis replicas confirmed the write within 100 ms"),
        "{error}"
    );
    // The write itself is on the primary: retrying the same job creates nothing new.
    let again = queue.enqueue(&job, None).await.unwrap_err();
    assert!(matches!(
        again,
        klingq_queue::QueueError::NotReplicated { .. }
    ));
    assert_eq!(queue.stats().await.unwrap().waiting, 1);
}
