//! The queue over TLS (`rediss://`): a TLS-only `redis-server` and a TLS-only 3+3 Cluster
//! (cluster bus and replication over TLS too), certificates from a throwaway CA. The URLs end
//! in `#insecure` (the redis crate's switch to skip verification: the test CA is in no trust
//! store); that certificates are verified otherwise is checked through the CLI, whose process
//! can be given the test CA (`crates/cli/tests/produce.rs`).

use klingq_testkit::cluster::RedisCluster;

use super::*;

/// Runs `n` jobs as one batch until it is done: every job succeeded, exactly once. The
/// worker's blocking reads run on dedicated connections: TLS too, or nothing runs.
async fn batch_completes(queue: &Queue, n: u64) {
    let (ids, seen) = super::topology::batch_survives(queue, n, || async {}).await;
    for id in &ids {
        assert_eq!(seen.runs_of(id), 1, "{id}");
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
