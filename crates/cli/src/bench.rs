//! `klingq bench …`: benchmarks that print what they measured and end with one JSON line.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use apalis::prelude::WorkerBuilderExt;
use apalis_core::task::data::Data;
use apalis_core::worker::builder::WorkerBuilder;
use clap::{Args, Subcommand};
use klingq_queue::{JobFailure, NewJob, Queue, QueueBackend, WorkerOptions, consumer_name};
use serde::{Deserialize, Serialize};

use crate::settings::Settings;

#[derive(Debug, Subcommand)]
pub(crate) enum BenchCommand {
    /// Queue overhead: enqueue N no-op jobs as one batch, then process them with C concurrent
    /// handlers through an apalis worker on klingq's backend, in this process.
    Queue(QueueBenchArgs),
}

#[derive(Debug, Args)]
pub(crate) struct QueueBenchArgs {
    /// Jobs to enqueue and process.
    #[arg(long, default_value_t = 100_000)]
    jobs: u64,
    /// Concurrent handlers.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Namespace to use (default: a fresh `bench-…` one, deleted afterwards).
    #[arg(long)]
    namespace: Option<String>,
    /// Keep the benchmark's keys in Redis afterwards.
    #[arg(long)]
    keep: bool,
}

pub(crate) async fn run(command: BenchCommand, settings: Settings) -> anyhow::Result<()> {
    match command {
        BenchCommand::Queue(args) => queue_bench(args, settings).await,
    }
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
    enqueue_seconds: f64,
    enqueue_jobs_per_s: f64,
    process_seconds: f64,
    process_jobs_per_s: f64,
    peak_rss_mib: f64,
    redis_commands_per_job: f64,
    redis_scripts_per_job: f64,
}

async fn queue_bench(args: QueueBenchArgs, settings: Settings) -> anyhow::Result<()> {
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
    let mut redis = queue.connection();
    println!(
        "bench queue: {} no-op jobs, concurrency {}, namespace {}",
        args.jobs, args.concurrency, config.namespace
    );

    let before = redis_counters(&mut redis).await?;
    let enqueue_started = Instant::now();
    let batch = klingq_core::JobId::new().to_string();
    queue
        .open_batch(&batch, &serde_json::json!({"bench": "queue"}), 0)
        .await?;
    let jobs: Vec<NewJob> = (0..args.jobs)
        .map(|n| NewJob::new(&NoopJob { n }))
        .collect::<Result<_, _>>()?;
    queue.enqueue_many(&jobs, Some(&batch)).await?;
    queue.seal_batch(&batch).await?;
    drop(jobs);
    let enqueue_seconds = enqueue_started.elapsed().as_secs_f64();
    let after_enqueue = redis_counters(&mut redis).await?;
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
        let record = queue.batch(&batch).await?.context("the batch vanished")?;
        if record.done {
            break;
        }
        if last_report.elapsed() >= Duration::from_secs(2) {
            println!(
                "  {} / {} done ({:.0} jobs/s so far)",
                record.terminal,
                args.jobs,
                record.terminal as f64 / process_started.elapsed().as_secs_f64()
            );
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let process_seconds = process_started.elapsed().as_secs_f64();
    let _ = stop.send(());
    worker_task.await?.context("worker")?;
    let after = redis_counters(&mut redis).await?;
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
        enqueue_seconds,
        enqueue_jobs_per_s: args.jobs as f64 / enqueue_seconds,
        process_seconds,
        process_jobs_per_s: args.jobs as f64 / process_seconds,
        peak_rss_mib: peak_rss_mib(),
        redis_commands_per_job: (after.commands - before.commands) as f64 / n_jobs,
        redis_scripts_per_job: (after.scripts - before.scripts) as f64 / n_jobs,
    };
    println!(
        "redis: {:.1} commands per job ({:.1} at enqueue, counting those scripts run), {:.2} script calls per job",
        figures.redis_commands_per_job,
        (after_enqueue.commands - before.commands) as f64 / n_jobs,
        figures.redis_scripts_per_job
    );
    println!("peak RSS: {:.1} MiB", figures.peak_rss_mib);
    if owned_namespace && !args.keep {
        delete_namespace(&mut redis, queue.keys().prefix()).await?;
    }
    println!("{}", serde_json::to_string(&figures)?);
    Ok(())
}

struct RedisCounters {
    /// Every command Redis executed, including those scripts ran.
    commands: u64,
    /// Script calls (EVALSHA/EVAL): one per round trip of a script.
    scripts: u64,
}

/// Sums Redis' per-command call counts.
async fn redis_counters(
    redis: &mut redis::aio::ConnectionManager,
) -> anyhow::Result<RedisCounters> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(redis)
        .await?;
    let mut counters = RedisCounters {
        commands: 0,
        scripts: 0,
    };
    for line in info.lines() {
        let Some((name, rest)) = line.split_once(':') else {
            continue;
        };
        let Some(count) = rest
            .split(',')
            .find_map(|field| field.strip_prefix("calls="))
            .and_then(|c| c.parse::<u64>().ok())
        else {
            continue;
        };
        counters.commands += count;
        if matches!(name, "cmdstat_evalsha" | "cmdstat_eval") {
            counters.scripts += count;
        }
    }
    Ok(counters)
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map(|kib| kib / 1024.0)
        .unwrap_or(0.0)
}

/// Deletes every key of a benchmark namespace.
async fn delete_namespace(
    redis: &mut redis::aio::ConnectionManager,
    prefix: &str,
) -> anyhow::Result<()> {
    let pattern = format!("{prefix}:*");
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(redis)
            .await?;
        if !keys.is_empty() {
            let _: i64 = redis::cmd("UNLINK").arg(&keys).query_async(redis).await?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}
