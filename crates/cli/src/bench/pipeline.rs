//! `klingq bench pipeline`: the real worker (in this process) against the simulator at zero
//! latency with tiny videos, re-hosted into the configured S3 store.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use klingq_queue::NewJob;
use serde::Serialize;

use super::{
    NodeShares, SimProcess, allow_loopback_downloads, batches_progress, bench_spec, cpu_seconds,
    enqueue_in_batches, fresh_namespace, peak_rss_mib,
};
use crate::settings::Settings;

#[derive(Debug, Args)]
pub(crate) struct PipelineBenchArgs {
    /// Jobs to enqueue and process.
    #[arg(long, default_value_t = 100_000)]
    jobs: u64,
    /// Jobs in flight in the worker.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Size of each video in bytes.
    #[arg(long, default_value_t = 1_000)]
    video_bytes: u64,
    /// Batches the jobs are split into (batch `i` in partition `i mod queue.partitions`).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1_000))]
    batches: u64,
}

#[derive(Debug, Serialize)]
struct PipelineFigures {
    jobs: u64,
    concurrency: usize,
    video_bytes: u64,
    enqueue_seconds: f64,
    process_seconds: f64,
    process_jobs_per_s: f64,
    succeeded: u64,
    peak_rss_mib: f64,
    cpu_percent: f64,
    redis_commands_per_job: f64,
    redis: NodeShares,
}

pub(super) async fn run(args: PipelineBenchArgs, settings: Settings) -> anyhow::Result<()> {
    // Zero latency: runs succeed as soon as they are created; tiny videos.
    let per_second = (args.video_bytes / 5).max(1).to_string();
    let sim = SimProcess::start(&[
        "--median-latency-secs",
        "0",
        "--latency-sigma",
        "0",
        "--queue-max-secs",
        "0",
        "--dispatch-secs",
        "0",
        "--tail-probability",
        "0",
        "--video-bytes-per-second",
        &per_second,
        "--balance-usd",
        "1000000000",
    ])
    .await?;
    let mut worker_settings = settings.worker_settings();
    worker_settings.queue.namespace = fresh_namespace("pipeline");
    let mut provider = klingq_provider::ProviderConfig::for_tests(sim.base_url.clone(), "bench");
    provider.deadline = Duration::from_secs(600);
    worker_settings.provider = provider;
    allow_loopback_downloads(&mut worker_settings.storage);
    worker_settings.worker.concurrency = args.concurrency;
    worker_settings.worker.provider_concurrency = args.concurrency as u64 * 4;
    worker_settings.worker.health_bind = String::new();
    worker_settings.worker.shutdown_grace_secs = 5;
    println!(
        "bench pipeline: {} jobs, concurrency {}, {} B videos, simulator {}, S3 {} bucket {}",
        args.jobs,
        args.concurrency,
        args.video_bytes,
        sim.base_url,
        worker_settings
            .storage
            .endpoint
            .as_deref()
            .unwrap_or("(AWS default)"),
        worker_settings.storage.bucket
    );
    let worker = klingq_worker::Worker::connect(worker_settings, Duration::from_secs(10))
        .await
        .context("starting the worker (set KLINGQ_S3_ENDPOINT, KLINGQ_S3_BUCKET and AWS_* for an S3-compatible store)")?;
    let queue = worker.queue.clone();
    let before_per_node = queue.command_counters_per_node().await?;
    let before = queue.command_counters().await?;
    let started = Instant::now();
    let jobs: Vec<NewJob> = (0..args.jobs)
        .map(|n| NewJob::new(&bench_spec(n)))
        .collect::<Result<_, _>>()?;
    let batches = enqueue_in_batches(
        &queue,
        jobs,
        args.batches,
        &serde_json::json!({"bench": "pipeline"}),
    )
    .await?;
    let enqueue_seconds = started.elapsed().as_secs_f64();
    println!("enqueued in {enqueue_seconds:.2} s");

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(worker.run(async {
        let _ = stopped.await;
    }));
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    let mut last_report = Instant::now();
    let succeeded = loop {
        let (terminal, succeeded, done) = batches_progress(&queue, &batches).await?;
        if done {
            break succeeded;
        }
        if last_report.elapsed() >= Duration::from_secs(5) {
            println!(
                "  {terminal} / {} done ({:.0} jobs/s so far)",
                args.jobs,
                terminal as f64 / started.elapsed().as_secs_f64()
            );
            last_report = Instant::now();
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(3600),
            "the batch did not finish within an hour"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let process_seconds = started.elapsed().as_secs_f64();
    let cpu_percent = (cpu_seconds() - cpu_before) / process_seconds * 100.0;
    let after = queue.command_counters().await?;
    let _ = stop.send(());
    run.await??;
    let figures = PipelineFigures {
        jobs: args.jobs,
        concurrency: args.concurrency,
        video_bytes: args.video_bytes,
        enqueue_seconds,
        process_seconds,
        process_jobs_per_s: args.jobs as f64 / process_seconds,
        succeeded,
        peak_rss_mib: peak_rss_mib(),
        cpu_percent,
        redis_commands_per_job: (after.commands - before.commands) as f64 / args.jobs.max(1) as f64,
        redis: NodeShares::measure(&queue, &before_per_node).await?,
    };
    println!(
        "processed {} jobs ({succeeded} succeeded) in {process_seconds:.2} s: {:.0} jobs/s; worker CPU {cpu_percent:.0} %, peak RSS {:.1} MiB, {:.1} Redis commands per job",
        args.jobs, figures.process_jobs_per_s, figures.peak_rss_mib, figures.redis_commands_per_job
    );
    println!(
        "redis profile per job: {}",
        after.profile_since(&before, args.jobs as f64)
    );
    queue.delete_namespace().await?;
    anyhow::ensure!(
        succeeded == args.jobs,
        "only {succeeded} of {} jobs succeeded",
        args.jobs
    );
    println!("{}", serde_json::to_string(&figures)?);
    Ok(())
}
