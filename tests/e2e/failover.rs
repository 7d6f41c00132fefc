//! Pay-once across a Redis failover: the real worker runs a batch through the simulator
//! (with faults) while the primary holding the namespace is killed with SIGKILL and its
//! replica takes over, in a Cluster entered through a node that owns none of klingq's slots
//! (with the namespace in 1 and in 6 partitions), and under Sentinel. Every job succeeds, each is charged once, every S3 object matches.

use std::collections::HashSet;
use std::time::Duration;

use klingq_core::JobState;
use klingq_queue::key_slot;
use klingq_sim::SimConfig;
use klingq_testkit::cluster::RedisCluster;
use klingq_testkit::sentinel::RedisSentinel;
use klingq_testkit::wait_for;

use crate::pipeline::{
    Env, InProcessWorker, assert_all_succeeded_once, assert_paid_once_and_stored, enqueue_batch,
    env_on, env_partitioned, wait_terminal,
};

const JOBS: usize = 16;

fn sim_config() -> SimConfig {
    SimConfig {
        // Generations last a few seconds, so the kill lands while runs are in flight.
        time_scale: 0.02,
        fail_429: 0.1,
        fail_5xx: 0.05,
        lost_response: 0.1,
        flaky_poll: 0.1,
        ..SimConfig::fast()
    }
}

/// Runs the batch `batch` with the worker in this process while `fail_over` kills the
/// primary; the batch completes with every job in it.
async fn survives_a_failover<F, Fut>(env: Env, min_replicas_ack: u32, batch: &str, fail_over: F)
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = ()>,
{
    if let Ok(filter) = std::env::var("KLINGQ_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
    let prompts: Vec<String> = (0..JOBS).map(|n| format!("failover scene {n}")).collect();
    let ids = enqueue_batch(&env, &prompts, batch).await;
    let mut settings = env.services.worker_settings();
    settings.queue.min_replicas_ack = min_replicas_ack;
    let worker = InProcessWorker::start_with(settings).await;
    wait_for("runs to be generating", Duration::from_secs(60), || async {
        let records = env.queue.jobs(&ids).await.ok()?;
        (records
            .iter()
            .filter(|r| r.state == JobState::Generating)
            .count()
            >= JOBS / 4)
            .then_some(())
    })
    .await
    .unwrap();
    fail_over().await;
    let finished = wait_for("every job to end", Duration::from_secs(180), || async {
        let records = env.queue.jobs(&ids).await.ok()?;
        records.iter().all(|r| r.state.is_terminal()).then_some(())
    })
    .await;
    if finished.is_err() {
        let records = env.queue.jobs(&ids).await.unwrap();
        let states: Vec<String> = records
            .iter()
            .map(|r| {
                format!(
                    "{} {} {:?} attempts={}",
                    r.id, r.state, r.reason, r.attempts
                )
            })
            .collect();
        panic!("jobs did not end:\n{}", states.join("\n"));
    }
    let records = wait_terminal(&env.queue, &ids, Duration::from_secs(5)).await;
    worker.stop().await;
    let record = env.queue.batch(batch).await.unwrap().expect("the batch");
    assert!(record.done, "{record:?}");
    assert_eq!(record.total, JOBS as u64);
    if min_replicas_ack > 0 {
        // Every checkpoint was on a replica before the job went on: none was lost.
        assert_all_succeeded_once(&env, &records).await;
    } else {
        // Replication is asynchronous: a checkpoint written just before the kill may be gone
        // with its step timings; the job still pays once and ends stored.
        assert_paid_once_and_stored(&env, &records).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_primary_killed_mid_batch_every_job_succeeds_and_pays_once() {
    cluster_failover(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_partitions_on_three_shards_primary_killed_every_job_succeeds_and_pays_once() {
    cluster_failover(6).await;
}

/// The cluster failover run with the namespace over `partitions` partitions, entered through
/// a node that owns none of its slots; the primary killed owns the batch's partition.
async fn cluster_failover(partitions: u32) {
    let cluster = RedisCluster::start().await.unwrap();
    let (mut env, _) = env_partitioned(
        cluster.seed_url(),
        "failover-cluster",
        sim_config(),
        false,
        partitions,
    )
    .await;
    let layout = env.queue.partitions().clone();
    let slots: Vec<u16> = layout
        .all()
        .map(|(_, keys)| key_slot(&keys.route()))
        .collect();
    let mut owners = HashSet::new();
    for slot in &slots {
        owners.insert(cluster.owner_of_slot(*slot).await.unwrap());
    }
    if partitions > 1 {
        assert_eq!(
            owners.len(),
            3,
            "the partitions span every shard: {owners:?}"
        );
    }
    // A node that owns none of the namespace's slots (a replica, when every primary owns one).
    env.services.redis_url = cluster
        .node_urls()
        .into_iter()
        .find(|url| !owners.contains(&port_of(url)))
        .expect("a node owning none of the slots");
    // The batch lives in one partition. With several, one on another shard than partition
    // 0: the global keys (the shared provider limit, budgets) stay on a shard that keeps
    // running while the batch's shard fails over (the chaos run kills partition 0's).
    let global_owner = cluster.owner_of_slot(slots[0]).await.unwrap();
    let mut batch_partition = 0;
    for (p, slot) in slots.iter().enumerate().skip(1) {
        if cluster.owner_of_slot(*slot).await.unwrap() != global_owner {
            batch_partition = p;
            break;
        }
    }
    assert_eq!(batch_partition == 0, partitions == 1);
    let batch = layout.id_in(batch_partition).to_string();
    let slot = slots[layout.of(&batch)];
    // Acknowledged means on a replica: the killed primary comes back (as an orchestrator
    // restarts it) and replicates its successor, so new writes can be confirmed again.
    survives_a_failover(env, 1, &batch, || async {
        let old = cluster.kill_primary_of_slot(slot).await.unwrap();
        cluster.wait_failover(slot, old).await.unwrap();
        cluster.restart_node(old).await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_mid_batch_every_job_succeeds_and_pays_once() {
    let sentinel = RedisSentinel::start().await.unwrap();
    let (env, _) = env_on(sentinel.url(), "failover-sentinel", sim_config(), false).await;
    // Replication stays asynchronous (the default): reconciliation by `client_ref` is what
    // keeps a checkpoint lost with the old primary from paying twice.
    let batch = env.queue.new_batch_id(None);
    survives_a_failover(env, 0, &batch, || async {
        let old = sentinel.kill_primary().await.unwrap();
        sentinel.wait_failover(old).await.unwrap();
    })
    .await;
}

fn port_of(url: &str) -> u16 {
    url.rsplit(':').next().unwrap().parse().unwrap()
}
