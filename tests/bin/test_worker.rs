//! A queue worker process for end-to-end queue tests: it runs an apalis worker on klingq's
//! backend whose handler sleeps, then records the completion in Redis. Tests start several,
//! kill some with SIGKILL, and check every job completed exactly once.
//!
//! The handler counts starts and completions per job in the test-only hashes
//! `{ns}:test:started` and `{ns}:test:completed` ([`test_counts_key`]), on a connection of its
//! own: they are the test's bookkeeping, not the queue's.
//!
//! Usage: `klingq-test-worker REDIS_URL NAMESPACE CONCURRENCY JOB_MS LEASE_SECS`

use std::time::Duration;

use apalis::prelude::WorkerBuilderExt;
use apalis_core::task::data::Data;
use apalis_core::worker::builder::WorkerBuilder;
use klingq_e2e::test_counts_key;
use klingq_queue::{
    JobFailure, Lease, Queue, QueueBackend, QueueConfig, WorkerOptions, consumer_name,
};
use redis::aio::MultiplexedConnection;
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct SleepJob {
    ms: u64,
}

async fn handle(
    job: SleepJob,
    lease: Lease,
    conn: Data<MultiplexedConnection>,
) -> Result<(), JobFailure> {
    let keys = lease.queue().keys();
    let mut conn = (*conn).clone();
    let started = test_counts_key(keys, "started");
    let _: Result<i64, _> = redis::cmd("HINCRBY")
        .arg(&started)
        .arg(lease.job_id())
        .arg(1)
        .query_async(&mut conn)
        .await;
    tokio::time::sleep(Duration::from_millis(job.ms)).await;
    let completed = test_counts_key(keys, "completed");
    redis::cmd("HINCRBY")
        .arg(&completed)
        .arg(lease.job_id())
        .arg(1)
        .query_async::<i64>(&mut conn)
        .await
        .map_err(|error| JobFailure::Retry {
            after: Duration::from_millis(100),
            reason: error.to_string(),
            error: None,
        })?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, redis_url, namespace, concurrency, job_ms, lease_secs] = args.as_slice() else {
        anyhow::bail!(
            "usage: klingq-test-worker REDIS_URL NAMESPACE CONCURRENCY JOB_MS LEASE_SECS"
        );
    };
    let _ = job_ms;
    let concurrency: usize = concurrency.parse()?;
    let queue = Queue::connect(QueueConfig {
        redis_url: redis_url.clone(),
        namespace: namespace.clone(),
        lease_timeout_secs: lease_secs.parse()?,
        reclaim_interval_secs: 1,
        block_timeout_ms: 200,
        promote_interval_ms: 50,
        ..QueueConfig::default()
    })
    .await?;
    let conn = redis::Client::open(redis_url.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    let backend = QueueBackend::<SleepJob>::new(
        queue,
        WorkerOptions {
            consumer: consumer_name("e2e"),
            concurrency,
        },
    );
    let worker = WorkerBuilder::new("e2e")
        .backend(backend)
        .data(conn)
        .catch_panic()
        .concurrency(concurrency)
        .build(handle);
    let signal = async {
        tokio::signal::ctrl_c().await?;
        Ok::<(), std::io::Error>(())
    };
    println!("ready");
    worker.run_until(signal).await?;
    Ok(())
}
