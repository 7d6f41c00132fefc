//! The queue over TLS (`rediss://`): a TLS-only `redis-server`, a TLS-only 3+3 Cluster
//! (cluster bus and replication over TLS too) and a TLS-only Sentinel setup
//! (`rediss+sentinel://`: sentinels, data nodes, replication and the sentinels' own links all
//! TLS), certificates from a throwaway CA. The URLs end in `#insecure` (the redis crate's
//! switch to skip verification: the test CA is in no trust store); that certificates are
//! verified otherwise is checked through a process given the test CA (`SSL_CERT_FILE`): the
//! CLI (`crates/cli/tests/produce.rs`), standalone and Sentinel.

use klingq_queue::QueueError;
use klingq_testkit::cluster::RedisCluster;
use klingq_testkit::sentinel::RedisSentinel;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_follows_a_sentinel_failover_over_tls() {
    let sentinel = RedisSentinel::start_tls().await.unwrap();
    let url = sentinel.url();
    assert!(
        url.starts_with("rediss+sentinel://127.0.0.1:") && url.ends_with("/mymaster#insecure"),
        "{url}"
    );

    // Certificates are verified unless the URL says #insecure: the test CA is trusted nowhere
    // in this process, so the handshake with the sentinels fails, and says so.
    let mut untrusted = tls_config(sentinel.verified_url().unwrap(), "tls-sentinel-untrusted");
    untrusted.command_timeout_ms = 2_000;
    let refused = tokio::time::timeout(Duration::from_secs(30), Queue::connect(untrusted))
        .await
        .expect("connecting with an untrusted CA hung");
    match refused {
        Err(error @ QueueError::Unavailable { kind: "tls", .. }) => {
            assert!(
                error.to_string().contains("TLS handshake failed"),
                "{error}"
            );
        }
        Err(other) => panic!("not a TLS failure: {other:?}"),
        Ok(_) => panic!("connected through sentinels whose certificate nobody trusts"),
    }

    // Every port speaks TLS only: a job that runs proves TLS to the sentinels (asked for the
    // primary) and to the primary (the shared and the blocking connections).
    let queue = Queue::connect(QueueConfig {
        // Short leases: a job whose settle was lost with the old primary is handed on soon.
        lease_timeout_secs: 5,
        reclaim_interval_secs: 1,
        // Acknowledged means on the replica too (replication over TLS).
        min_replicas_ack: 1,
        ..tls_config(url, "tls-sentinel")
    })
    .await
    .unwrap();
    let topology = queue.topology().await;
    assert_eq!(topology.mode, "sentinel", "{topology}");
    assert!(topology.tls, "{topology}");
    assert_eq!(topology.service.as_deref(), Some("mymaster"), "{topology}");
    let first = sentinel.primary_port().await.unwrap();
    assert_eq!(topology.primaries, [format!("127.0.0.1:{first}")]);

    // The primary is killed mid-batch: the queue asks the sentinels again, over TLS, and
    // follows the promoted replica, over TLS; no job is lost.
    let (ids, _) = super::topology::batch_survives(&queue, 200, || async {
        let old = sentinel.kill_primary().await.unwrap();
        assert_eq!(old, first);
        let new = sentinel.wait_failover(old).await.unwrap();
        assert_ne!(old, new);
    })
    .await;
    assert_eq!(ids.len(), 200);
    let now = sentinel.primary_port().await.unwrap();
    assert_ne!(now, first);
    assert_eq!(
        queue.topology().await.primaries,
        [format!("127.0.0.1:{now}")],
        "the queue follows the new primary"
    );
    let errors: u64 = queue.redis_errors().iter().map(|(_, n)| n).sum();
    assert!(
        errors > 0,
        "the failover was not seen: {:?}",
        queue.redis_errors()
    );
}
