//! The queue over TLS (`rediss://`): a TLS-only `redis-server` and a TLS-only 3+3 Cluster
//! (cluster bus and replication over TLS too), certificates from a throwaway CA. The URLs end
//! in `#insecure` (the redis crate's switch to skip verification: the test CA is in no trust
//! store); that certificates are verified otherwise is checked through the CLI, whose process
//! can be given the test CA (`crates/cli/tests/produce.rs`).

use klingq_testkit::cluster::RedisCluster;

use super::*;

/// Enqueues `n` jobs as one batch, runs a worker until the batch is done, and checks that every
/// job succeeded exactly once.
async fn batch_completes(queue: &Queue, n: u64) {
    let batch = klingq_core::JobId::new().to_string();
    queue
        .open_batch(&batch, &serde_json::json!({"source": "tls"}), 0)
        .await
        .unwrap();
    let jobs: Vec<NewJob> = (0..n).map(|i| job(i, Behavior::Succeed)).collect();
    let ids: Vec<String> = queue
        .enqueue_many(&jobs, Some(&batch))
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(queue.seal_batch(&batch).await.unwrap(), n);

    // The worker's blocking reads run on dedicated connections: TLS too, or nothing runs.
    let seen = Seen::default();
    let worker = spawn_worker(queue, 4, &seen);
    let record = wait_batch_done(queue, &batch, Duration::from_secs(60)).await;
    worker.stop().await;
    assert_eq!(record.total, n, "{record:?}");
    assert_eq!(record.counts.get("succeeded"), Some(&n), "{record:?}");
    for id in &ids {
        assert_eq!(seen.runs_of(id), 1, "{id}");
    }
    let records = queue.jobs(&ids).await.unwrap();
    assert_eq!(records.len() as u64, n);
    for record in records {
        assert_eq!(record.state, JobState::Succeeded, "{}", record.id);
    }
}

fn tls_config(url: String, prefix: &str) -> QueueConfig {
    QueueConfig {
        redis_url: url,
        ..config(&unique_namespace(prefix))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_works_over_tls_on_a_standalone_redis() {
    let server = RedisServer::start_tls().await.unwrap();
    assert!(server.url().starts_with("rediss://127.0.0.1:"));
    let queue = Queue::connect(tls_config(server.url(), "tls"))
        .await
        .unwrap();
    let topology = queue.topology().await;
    assert_eq!(topology.mode, "standalone", "{topology}");
    assert!(topology.tls, "{topology}");

    // One job on its own, then a batch.
    let id = queue
        .enqueue(&job(0, Behavior::Succeed), None)
        .await
        .unwrap()
        .id;
    let seen = Seen::default();
    let worker = spawn_worker(&queue, 2, &seen);
    wait_state(&queue, &id, JobState::Succeeded, Duration::from_secs(30)).await;
    worker.stop().await;
    assert_eq!(seen.runs_of(&id), 1);
    batch_completes(&queue, 5).await;

    // The TLS port speaks no plain RESP: a redis:// URL to it fails, and does not hang.
    let mut plain = tls_config(format!("redis://127.0.0.1:{}", server.port()), "tls-plain");
    plain.command_timeout_ms = 2_000;
    let refused = tokio::time::timeout(Duration::from_secs(30), Queue::connect(plain))
        .await
        .expect("a plain connection to the TLS port hung");
    assert!(
        refused.is_err(),
        "a plain connection to the TLS port succeeded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_works_over_tls_on_a_cluster() {
    let cluster = RedisCluster::start_tls().await.unwrap();
    assert!(cluster.seed_url().starts_with("rediss://127.0.0.1:"));
    let queue = Queue::connect(tls_config(cluster.seed_url(), "tls-cluster"))
        .await
        .unwrap();
    let topology = queue.topology().await;
    assert_eq!(topology.mode, "cluster", "{topology}");
    assert!(topology.tls, "{topology}");
    assert_eq!(topology.primaries.len(), 3, "{topology}");
    batch_completes(&queue, 20).await;
}
