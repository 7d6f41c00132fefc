//! `klingq bench queue`: queue overhead alone, no-op jobs through an apalis worker on klingq's
//! backend in this process (provider and storage not involved).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use apalis::prelude::WorkerBuilderExt;
use apalis_core::task::data::Data;
use apalis_core::worker::builder::WorkerBuilder;
use clap::Args;
use klingq_queue::{JobFailure, NewJob, Queue, QueueBackend, WorkerOptions, consumer_name};
use serde::{Deserialize, Serialize};

use super::{NodeShares, batches_progress, enqueue_in_batches, peak_rss_mib};
use crate::settings::Settings;

#[derive(Debug, Args)]
pub(crate) struct QueueBenchArgs {
    /// Jobs to enqueue and process.
    #[arg(long, default_value_t = 100_000)]
    jobs: u64,
    /// Concurrent handlers.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Batches the jobs are split into. A batch lives in one partition: with
    /// `queue.partitions` > 1, give as many batches as partitions so every partition (and
    /// shard) gets its share; batch `i` goes to partition `i mod partitions`.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1_000))]
    batches: u64,
    /// Namespace to use (default: a fresh `bench-…` one, deleted afterwards).
    #[arg(long)]
    namespace: Option<String>,
    /// Keep the benchmark's keys in Redis afterwards.
    #[arg(long)]
    keep: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct NoopJob {
    n: u64,
}

async fn noop(_job: NoopJob, done: Data<Arc<AtomicU64>>) -> Result<(), JobFailure> {
    done.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

#[derive(Debug, Serialize)]
struct QueueBenchFigures {
    jobs: u64,
    concurrency: usize,
    partitions: usize,
    batches: u64,
    enqueue_seconds: f64,
    enqueue_jobs_per_s: f64,
    process_seconds: f64,
    process_jobs_per_s: f64,
    peak_rss_mib: f64,
    redis_commands_per_job: f64,
    redis_scripts_per_job: f64,
    redis: NodeShares,
}

pub(super) async fn run(args: QueueBenchArgs, settings: Settings) -> anyhow::Result<()> {
    let mut config = settings.queue;
    let owned_namespace = args.namespace.is_none();
    config.namespace = args.namespace.unwrap_or_else(|| {
        format!(
            "bench-{}-{}",
            std::process::id(),
            klingq_core::job::now_ms()
        )
    });
    let queue = Queue::connect(config.clone()).await.with_context(|| {
        format!(
            "connecting to Redis at {}",
            klingq_core::redact_url(&config.redis_url)
        )
    })?;
    let partitions = queue.partitions().len();
    println!(
        "bench queue: {} no-op jobs in {} batch(es), concurrency {}, {partitions} partition(s), namespace {}",
        args.jobs, args.batches, args.concurrency, config.namespace
    );

    let before_per_node = queue.command_counters_per_node().await?;
    let before = queue.command_counters().await?;
    let enqueue_started = Instant::now();
    let jobs: Vec<NewJob> = (0..args.jobs)
        .map(|n| NewJob::new(&NoopJob { n }))
        .collect::<Result<_, _>>()?;
    let batches = enqueue_in_batches(
        &queue,
        jobs,
        args.batches,
        &serde_json::json!({"bench": "queue"}),
    )
    .await?;
    let enqueue_seconds = enqueue_started.elapsed().as_secs_f64();
    let after_enqueue = queue.command_counters().await?;
    println!(
        "enqueued {} jobs in {enqueue_seconds:.2} s: {:.0} jobs/s",
        args.jobs,
        args.jobs as f64 / enqueue_seconds
    );

    let done = Arc::new(AtomicU64::new(0));
    let backend = QueueBackend::<NoopJob>::new(
        queue.clone(),
        WorkerOptions {
            consumer: consumer_name("bench"),
            concurrency: args.concurrency,
        },
    );
    let worker = WorkerBuilder::new("bench")
        .backend(backend)
        .data(done.clone())
        .catch_panic()
        .concurrency(args.concurrency)
        .build(noop);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        let _ = stopped.await;
        Ok::<(), std::io::Error>(())
    };
    let run: futures::future::BoxFuture<'static, _> = Box::pin(worker.run_until(signal));
    let process_started = Instant::now();
    let worker_task = tokio::spawn(run);
    let mut last_report = Instant::now();
    loop {
        let (terminal, _, all_done) = batches_progress(&queue, &batches).await?;
        if all_done {
            break;
        }
        if last_report.elapsed() >= Duration::from_secs(2) {
            println!(
                "  {terminal} / {} done ({:.0} jobs/s so far)",
                args.jobs,
                terminal as f64 / process_started.elapsed().as_secs_f64()
            );
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let process_seconds = process_started.elapsed().as_secs_f64();
    let _ = stop.send(());
    worker_task.await?.context("worker")?;
    let after = queue.command_counters().await?;
    println!(
        "processed {} jobs in {process_seconds:.2} s: {:.0} jobs/s (handler calls: {})",
        args.jobs,
        args.jobs as f64 / process_seconds,
        done.load(Ordering::Relaxed)
    );
    let n_jobs = args.jobs.max(1) as f64;
    let figures = QueueBenchFigures {
        jobs: args.jobs,
        concurrency: args.concurrency,
        partitions,
        batches: args.batches,
        enqueue_seconds,
        enqueue_jobs_per_s: args.jobs as f64 / enqueue_seconds,
        process_seconds,
        process_jobs_per_s: args.jobs as f64 / process_seconds,
        peak_rss_mib: peak_rss_mib(),
        redis_commands_per_job: (after.commands - before.commands) as f64 / n_jobs,
        redis_scripts_per_job: (after.scripts - before.scripts) as f64 / n_jobs,
        redis: NodeShares::measure(&queue, &before_per_node).await?,
    };
    println!(
        "redis: {:.1} commands per job ({:.1} at enqueue, counting those scripts run), {:.2} script calls per job",
        figures.redis_commands_per_job,
        (after_enqueue.commands - before.commands) as f64 / n_jobs,
        figures.redis_scripts_per_job
    );
    println!(
        "redis profile per job: {}",
        after.profile_since(&before, n_jobs)
    );
    println!("peak RSS: {:.1} MiB", figures.peak_rss_mib);
    if owned_namespace && !args.keep {
        queue.delete_namespace().await?;
    }
    println!("{}", serde_json::to_string(&figures)?);
    Ok(())
}
