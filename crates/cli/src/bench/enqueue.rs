//! `klingq bench enqueue`: one batch of valid jobs through the producer library, then through
//! the HTTP API served in this process.

use std::time::Instant;

use clap::Args;
use serde::Serialize;

use super::{bench_spec, fresh_namespace, peak_rss_mib};
use crate::settings::Settings;

#[derive(Debug, Args)]
pub(crate) struct EnqueueBenchArgs {
    /// Jobs per batch.
    #[arg(long, default_value_t = 100_000)]
    jobs: u64,
}

#[derive(Debug, Serialize)]
struct EnqueueFigures {
    jobs: u64,
    library_seconds: f64,
    library_jobs_per_s: f64,
    http_seconds: f64,
    http_jobs_per_s: f64,
    http_body_mib: f64,
    peak_rss_mib: f64,
    redis_commands_per_job: f64,
}

pub(super) async fn run(args: EnqueueBenchArgs, settings: Settings) -> anyhow::Result<()> {
    let mut config = settings.queue.clone();
    config.namespace = fresh_namespace("enqueue");
    let cost = klingq_core::CostModel {
        usd_per_second: settings.worker.usd_per_second,
    };
    let max_batch_jobs = (args.jobs as usize).max(1);
    let producer = klingq_producer::Producer::connect(config.clone(), cost)
        .await
        .map_err(|error| anyhow::anyhow!("connecting to Redis: {error}"))?
        .with_max_batch_jobs(max_batch_jobs);
    let queue = producer.queue().clone();
    println!(
        "bench enqueue: {} valid jobs per batch, namespace {}",
        args.jobs, config.namespace
    );

    // Through the library: validation, cost estimate, idempotency and the enqueue scripts.
    let specs: Vec<_> = (0..args.jobs).map(|n| Ok(bench_spec(n))).collect();
    let before = queue.command_counters().await?;
    let started = Instant::now();
    let accepted = producer
        .enqueue_batch(specs, klingq_producer::BatchOptions::default())
        .await
        .map_err(|error| anyhow::anyhow!("enqueue_batch: {error}"))?;
    let library_seconds = started.elapsed().as_secs_f64();
    let after = queue.command_counters().await?;
    anyhow::ensure!(accepted.total == args.jobs, "accepted {}", accepted.total);
    println!(
        "library: {} jobs in {library_seconds:.2} s: {:.0} jobs/s",
        args.jobs,
        args.jobs as f64 / library_seconds
    );

    // Through the HTTP API: the same jobs as JSON Lines, parsed and validated by the server.
    let mut api_config = settings.api.clone();
    api_config.tokens.clear();
    api_config.max_batch_jobs = max_batch_jobs;
    let mut body = String::with_capacity(args.jobs as usize * 96);
    for n in 0..args.jobs {
        body.push_str(&serde_json::to_string(&serde_json::json!({
            "start_image_url": "https://example.com/start.png",
            "prompt": format!("bench job {n}"),
        }))?);
        body.push('\n');
    }
    api_config.max_batch_body_bytes = api_config.max_batch_body_bytes.max(body.len() + 1024);
    let state = crate::serve::api_state(producer.clone(), api_config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/v1/batches", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let api = tokio::spawn(klingq_producer::serve(listener, state, async {
        let _ = stopped.await;
    }));
    let body_mib = body.len() as f64 / (1024.0 * 1024.0);
    let http = reqwest::Client::new();
    let started = Instant::now();
    let response = http
        .post(&url)
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .await?;
    let status = response.status();
    let answer: serde_json::Value = response.json().await?;
    let http_seconds = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        status.is_success() && answer["total"] == args.jobs,
        "POST /v1/batches answered {status}: {answer}"
    );
    println!(
        "HTTP API: {} jobs ({body_mib:.1} MiB of JSON Lines) in {http_seconds:.2} s: {:.0} jobs/s",
        args.jobs,
        args.jobs as f64 / http_seconds
    );
    let _ = stop.send(());
    let _ = api.await;
    let figures = EnqueueFigures {
        jobs: args.jobs,
        library_seconds,
        library_jobs_per_s: args.jobs as f64 / library_seconds,
        http_seconds,
        http_jobs_per_s: args.jobs as f64 / http_seconds,
        http_body_mib: body_mib,
        peak_rss_mib: peak_rss_mib(),
        redis_commands_per_job: (after.commands - before.commands) as f64 / args.jobs.max(1) as f64,
    };
    println!(
        "redis: {:.1} commands per job; peak RSS {:.1} MiB",
        figures.redis_commands_per_job, figures.peak_rss_mib
    );
    queue.delete_namespace().await?;
    println!("{}", serde_json::to_string(&figures)?);
    Ok(())
}
