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
    /// Re-host: videos of the given sizes from the simulator (a separate process) streamed into
    /// the configured S3 store, against a plain streamed download of the same bytes.
    Rehost(RehostBenchArgs),
    /// In flight: N jobs generating at once in one worker against a slow simulator: peak RSS,
    /// CPU and Redis commands per second per job.
    Inflight(InflightBenchArgs),
    /// Enqueue: N valid jobs as one batch through the library (`Producer::enqueue_batch`), then
    /// N more through the HTTP API (`POST /v1/batches`, JSON Lines) served in this process.
    Enqueue(EnqueueBenchArgs),
    /// Pipeline: N jobs through the real worker (in this process) against the simulator (a
    /// separate process) at zero latency with tiny videos, re-hosted into the configured S3 store.
    Pipeline(PipelineBenchArgs),
}

#[derive(Debug, Args)]
pub(crate) struct EnqueueBenchArgs {
    /// Jobs per batch.
    #[arg(long, default_value_t = 100_000)]
    jobs: u64,
}

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

#[derive(Debug, Args)]
pub(crate) struct RehostBenchArgs {
    /// Video sizes in MB (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,50,500")]
    size_mb: Vec<u64>,
}

#[derive(Debug, Args)]
pub(crate) struct InflightBenchArgs {
    /// Jobs in flight at once.
    #[arg(long, default_value_t = 1_000)]
    jobs: u64,
    /// Length of the measuring window, in seconds.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
}

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

pub(crate) async fn run(command: BenchCommand, settings: Settings) -> anyhow::Result<()> {
    match command {
        BenchCommand::Queue(args) => queue_bench(args, settings).await,
        BenchCommand::Rehost(args) => rehost_bench(args, settings).await,
        BenchCommand::Inflight(args) => inflight_bench(args, settings).await,
        BenchCommand::Enqueue(args) => enqueue_bench(args, settings).await,
        BenchCommand::Pipeline(args) => pipeline_bench(args, settings).await,
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

/// What Redis was, and how its primaries shared the commands of a run (a Cluster's shards).
#[derive(Debug, Serialize)]
struct NodeShares {
    mode: &'static str,
    /// Each primary's share of the run's commands, busiest first.
    shares: Vec<(String, f64)>,
    busiest_share: f64,
}

impl NodeShares {
    async fn measure(
        queue: &Queue,
        before: &[(String, klingq_queue::CommandCounters)],
    ) -> anyhow::Result<Self> {
        let after = queue.command_counters_per_node().await?;
        let mut used: Vec<(String, u64)> = after
            .iter()
            .map(|(node, counters)| {
                let earlier = before
                    .iter()
                    .find(|(n, _)| n == node)
                    .map_or(0, |(_, c)| c.commands);
                (node.clone(), counters.commands.saturating_sub(earlier))
            })
            .collect();
        used.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
        let total = used.iter().map(|(_, n)| n).sum::<u64>().max(1) as f64;
        let shares: Vec<(String, f64)> = used
            .into_iter()
            .map(|(node, n)| (node, n as f64 / total))
            .collect();
        let shares_text: Vec<String> = shares
            .iter()
            .map(|(node, share)| format!("{node} {:.1} %", share * 100.0))
            .collect();
        let mode = queue.topology().await.mode;
        println!(
            "redis {mode}: commands per primary: {}",
            shares_text.join(", ")
        );
        Ok(Self {
            mode,
            busiest_share: shares.first().map_or(1.0, |(_, share)| *share),
            shares,
        })
    }
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
    println!("peak RSS: {:.1} MiB", figures.peak_rss_mib);
    if owned_namespace && !args.keep {
        queue.delete_namespace().await?;
    }
    println!("{}", serde_json::to_string(&figures)?);
    Ok(())
}

/// Enqueues `jobs` split round-robin over `n_batches` batches (batch `i` in partition
/// `i mod partitions`, so every partition gets its share); returns the batch ids.
async fn enqueue_in_batches(
    queue: &Queue,
    jobs: Vec<NewJob>,
    n_batches: u64,
    info: &serde_json::Value,
) -> anyhow::Result<Vec<String>> {
    let partitions = queue.partitions().len();
    let n_batches = n_batches.max(1) as usize;
    let mut split: Vec<Vec<NewJob>> = (0..n_batches).map(|_| Vec::new()).collect();
    for (n, job) in jobs.into_iter().enumerate() {
        split[n % n_batches].push(job);
    }
    let mut batches = Vec::with_capacity(n_batches);
    for (i, jobs) in split.into_iter().enumerate() {
        let batch = queue.partitions().id_in(i % partitions).to_string();
        queue.open_batch(&batch, info, 0).await?;
        queue.enqueue_many(&jobs, Some(&batch)).await?;
        queue.seal_batch(&batch).await?;
        batches.push(batch);
    }
    Ok(batches)
}

/// How far `batches` are: jobs finished, jobs succeeded, whether all are done.
async fn batches_progress(queue: &Queue, batches: &[String]) -> anyhow::Result<(u64, u64, bool)> {
    let (mut terminal, mut succeeded, mut done) = (0, 0, true);
    for batch in batches {
        let record = queue.batch(batch).await?.context("a batch vanished")?;
        terminal += record.terminal;
        succeeded += record.counts.get("succeeded").copied().unwrap_or(0);
        done &= record.done;
    }
    Ok((terminal, succeeded, done))
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

/// A `klingq sim` child process on a free loopback port, killed on drop.
struct SimProcess {
    child: tokio::process::Child,
    base_url: String,
}

impl SimProcess {
    async fn start(args: &[&str]) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = tokio::process::Command::new(std::env::current_exe()?)
            .arg("sim")
            .args(["--port", &port.to_string()])
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting the simulator")?;
        let base_url = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let started = Instant::now();
        loop {
            if let Ok(response) = http.get(format!("{base_url}/v1/health")).send().await
                && response.status().is_success()
            {
                return Ok(Self { child, base_url });
            }
            if started.elapsed() > Duration::from_secs(30) {
                anyhow::bail!("the simulator did not answer within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for SimProcess {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// The simulator serves its videos on loopback, which the download's SSRF guard refuses unless
/// allow-listed.
fn allow_loopback_downloads(storage: &mut klingq_storage::StorageConfig) {
    storage.download_allow_cidrs.push("127.0.0.0/8".to_owned());
}

/// Resets the peak-RSS mark (Linux: `/proc/self/clear_refs`), so the next peak is a step's own.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

#[derive(Debug, Serialize)]
struct RehostFigures {
    size_mb: u64,
    rehost_seconds: f64,
    rehost_mb_per_s: f64,
    rehost_peak_rss_mib: f64,
    ceiling_seconds: f64,
    ceiling_mb_per_s: f64,
    ceiling_peak_rss_mib: f64,
}

async fn rehost_bench(args: RehostBenchArgs, settings: Settings) -> anyhow::Result<()> {
    let mut storage = settings.storage.clone();
    allow_loopback_downloads(&mut storage);
    let store = klingq_storage::VideoStore::new(storage)
        .await
        .context("building the S3 client (set KLINGQ_S3_ENDPOINT, KLINGQ_S3_BUCKET and AWS_* for an S3-compatible store)")?;
    store.ensure_bucket().await.context("creating the bucket")?;
    let http = reqwest::Client::new();
    let mut all = Vec::new();
    for size_mb in &args.size_mb {
        let bytes = size_mb * 1_000_000;
        // A 5-second video of the wanted size.
        let per_second = (bytes / 5).to_string();
        let sim = SimProcess::start(&[
            "--time-scale",
            "0.001",
            "--video-bytes-per-second",
            &per_second,
        ])
        .await?;
        let url = sim_video_url(&http, &sim.base_url).await?;

        reset_peak_rss();
        let started = Instant::now();
        let mut response = http.get(&url).send().await?.error_for_status()?;
        let mut received = 0u64;
        while let Some(chunk) = response.chunk().await? {
            received += chunk.len() as u64;
        }
        let ceiling_seconds = started.elapsed().as_secs_f64();
        let ceiling_peak_rss_mib = peak_rss_mib();

        reset_peak_rss();
        let job_id = klingq_core::JobId::new().to_string();
        let started = Instant::now();
        let stored = store
            .rehost(&job_id, &url, None)
            .await
            .map_err(|error| anyhow::anyhow!("re-host failed: {error}"))?;
        let rehost_seconds = started.elapsed().as_secs_f64();
        let rehost_peak_rss_mib = peak_rss_mib();
        anyhow::ensure!(
            stored.size == received,
            "stored {} bytes, served {received}",
            stored.size
        );
        let megabytes = received as f64 / 1_000_000.0;
        let figures = RehostFigures {
            size_mb: *size_mb,
            rehost_seconds,
            rehost_mb_per_s: megabytes / rehost_seconds,
            rehost_peak_rss_mib,
            ceiling_seconds,
            ceiling_mb_per_s: megabytes / ceiling_seconds,
            ceiling_peak_rss_mib,
        };
        println!(
            "{size_mb} MB: re-host {:.0} MB/s ({:.2} s, peak RSS {:.1} MiB); plain streamed download {:.0} MB/s (peak RSS {:.1} MiB)",
            figures.rehost_mb_per_s,
            figures.rehost_seconds,
            figures.rehost_peak_rss_mib,
            figures.ceiling_mb_per_s,
            figures.ceiling_peak_rss_mib
        );
        all.push(figures);
    }
    println!("{}", serde_json::to_string(&all)?);
    Ok(())
}

/// Creates a run on the simulator, waits for it, and returns its video URL.
async fn sim_video_url(http: &reqwest::Client, base_url: &str) -> anyhow::Result<String> {
    let model = klingq_provider::DEFAULT_MODEL;
    let run: serde_json::Value = http
        .post(format!("{base_url}/v1/models/{model}/runs"))
        .bearer_auth("bench")
        .json(&serde_json::json!({
            "input": {"prompt": "bench", "start_image_url": "https://example.com/a.png"},
            "client_ref": klingq_core::JobId::new().to_string(),
        }))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let id = run["id"].as_str().context("run id")?.to_owned();
    let started = Instant::now();
    loop {
        let run: serde_json::Value = http
            .get(format!("{base_url}/v1/runs/{id}"))
            .bearer_auth("bench")
            .send()
            .await?
            .json()
            .await?;
        if run["status_code"] == "succeeded" {
            let url = run["output"]["video"]["url"]
                .as_str()
                .or_else(|| run["output"]["outputs"][0]["url"].as_str())
                .context("video url")?;
            return Ok(url.to_owned());
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(60),
            "the run did not finish"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[derive(Debug, Serialize)]
struct InflightFigures {
    jobs_in_flight: u64,
    peak_rss_mib: f64,
    rss_per_job_kib: f64,
    cpu_percent: f64,
    redis_commands_per_s: f64,
    redis_commands_per_s_per_job: f64,
    window_seconds: f64,
}

/// CPU seconds this process has used (user + system), from /proc/self/stat.
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: f64 = fields
        .get(11)
        .and_then(|u| u.parse::<f64>().ok())
        .unwrap_or(0.0)
        + fields
            .get(12)
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(0.0);
    ticks / 100.0
}

async fn inflight_bench(args: InflightBenchArgs, settings: Settings) -> anyhow::Result<()> {
    // Runs that take about ten minutes: every job stays in `generating` during the window.
    let sim = SimProcess::start(&[
        "--median-latency-secs",
        "600",
        "--queue-max-secs",
        "1",
        "--time-scale",
        "1",
    ])
    .await?;
    let mut worker_settings = settings.worker_settings();
    worker_settings.queue.namespace = format!("bench-inflight-{}", klingq_core::job::now_ms());
    allow_loopback_downloads(&mut worker_settings.storage);
    worker_settings.provider.base_url = sim.base_url.clone();
    worker_settings.provider.api_key = "bench".into();
    worker_settings.worker.concurrency = args.jobs as usize;
    worker_settings.worker.provider_concurrency = args.jobs;
    worker_settings.worker.health_bind = String::new();
    worker_settings.worker.shutdown_grace_secs = 5;
    let worker = klingq_worker::Worker::connect(worker_settings, Duration::from_secs(10)).await?;
    let queue = worker.queue.clone();
    let batch = klingq_core::JobId::new().to_string();
    queue
        .open_batch(&batch, &serde_json::json!({"bench": "inflight"}), 0)
        .await?;
    let jobs: Vec<NewJob> = (0..args.jobs)
        .map(|n| {
            let spec = klingq_core::JobSpec::new(klingq_core::GenerationRequest::new(
                "https://example.com/start.png",
                format!("in-flight bench {n}"),
            ));
            NewJob::new(&spec)
        })
        .collect::<Result<_, _>>()?;
    queue.enqueue_many(&jobs, Some(&batch)).await?;
    queue.seal_batch(&batch).await?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(worker.run(async {
        let _ = stopped.await;
    }));
    let started = Instant::now();
    loop {
        let record = queue.batch(&batch).await?.context("the batch vanished")?;
        let generating = record.counts.get("generating").copied().unwrap_or(0);
        if generating >= args.jobs {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(300),
            "only {generating} of {} jobs reached generating",
            args.jobs
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "{} jobs in flight after {:.1} s; measuring for {} s",
        args.jobs,
        started.elapsed().as_secs_f64(),
        args.seconds
    );
    let before = queue.command_counters().await?;
    let cpu_before = cpu_seconds();
    let window = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    let window_seconds = window.elapsed().as_secs_f64();
    let cpu_percent = (cpu_seconds() - cpu_before) / window_seconds * 100.0;
    let after = queue.command_counters().await?;
    let peak = peak_rss_mib();
    let commands_per_s = (after.commands - before.commands) as f64 / window_seconds;
    let figures = InflightFigures {
        jobs_in_flight: args.jobs,
        peak_rss_mib: peak,
        rss_per_job_kib: peak * 1024.0 / args.jobs as f64,
        cpu_percent,
        redis_commands_per_s: commands_per_s,
        redis_commands_per_s_per_job: commands_per_s / args.jobs as f64,
        window_seconds,
    };
    println!(
        "peak RSS {:.1} MiB ({:.1} KiB per job), CPU {:.1} %, Redis {:.0} commands/s ({:.3} per job per second)",
        figures.peak_rss_mib,
        figures.rss_per_job_kib,
        figures.cpu_percent,
        figures.redis_commands_per_s,
        figures.redis_commands_per_s_per_job
    );
    let _ = stop.send(());
    run.await??;
    queue.delete_namespace().await?;
    println!("{}", serde_json::to_string(&figures)?);
    Ok(())
}

fn bench_spec(n: u64) -> klingq_core::JobSpec {
    klingq_core::JobSpec::new(klingq_core::GenerationRequest::new(
        "https://example.com/start.png",
        format!("bench job {n}"),
    ))
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

async fn enqueue_bench(args: EnqueueBenchArgs, settings: Settings) -> anyhow::Result<()> {
    let mut config = settings.queue.clone();
    config.namespace = format!(
        "bench-enqueue-{}-{}",
        std::process::id(),
        klingq_core::job::now_ms()
    );
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

async fn pipeline_bench(args: PipelineBenchArgs, settings: Settings) -> anyhow::Result<()> {
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
    worker_settings.queue.namespace = format!(
        "bench-pipeline-{}-{}",
        std::process::id(),
        klingq_core::job::now_ms()
    );
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
    queue.delete_namespace().await?;
    anyhow::ensure!(
        succeeded == args.jobs,
        "only {succeeded} of {} jobs succeeded",
        args.jobs
    );
    println!("{}", serde_json::to_string(&figures)?);
    Ok(())
}
