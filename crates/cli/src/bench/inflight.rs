//! `klingq bench inflight`: many runs generating at once, tracked by one worker.
//!
//! A generating job holds no worker task: between polls it is parked in Redis. So the worker
//! keeps its default concurrency (64) however many runs it tracks, and what a run in flight
//! costs is memory, Redis commands and provider GETs while it waits. The simulator's runs take
//! about 13 minutes (median 600 s for a 5 s clip, ×1.3 with audio), so none ends in the window.
//!
//! Cold (default): a fresh namespace, no learned generation times: polls follow the cold
//! schedule (a tenth of the run's age). `--warm`: the namespace's histogram is seeded first
//! with [`WARM_SAMPLES`] durations drawn from the simulator's own distribution, standing for a
//! deployment that has finished runs of this kind before.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use klingq_provider::GenTimeHistogram;
use klingq_queue::{NewJob, Queue};
use serde::Serialize;

use super::{
    SimProcess, allow_loopback_downloads, bench_spec, cpu_seconds, fresh_namespace,
    histogram_sum_count, peak_rss_mib, reset_peak_rss,
};
use crate::settings::Settings;

/// The worker's time per attempt in the generate step (`klingq_step_duration_seconds`).
const STEP_GENERATE: &str = "klingq_step_duration_seconds{step=\"generate\"}";

/// Samples seeded into the histogram in the warm case.
const WARM_SAMPLES: u64 = 200;
use klingq_worker::pipeline::SAMPLE_CAP;
/// Goals from the issue, reported against (not asserted).
const GOAL_PEAK_RSS_MIB: f64 = 96.0;
const GOAL_COMMANDS_PER_S_PER_RUN: f64 = 0.2;

#[derive(Debug, Args)]
pub(crate) struct InflightBenchArgs {
    /// Runs generating at once.
    #[arg(long, default_value_t = 10_000)]
    jobs: u64,
    /// Length of the measuring window, in seconds. Parked runs are polled at most
    /// `provider.poll_max_interval_secs` (60 s) apart, so the window should span several.
    #[arg(long, default_value_t = 120)]
    seconds: u64,
    /// Seed the learned generation times with 200 samples of the simulator's distribution
    /// first (a deployment that has finished runs of this kind before); without it the
    /// namespace is fresh and polls follow the cold schedule.
    #[arg(long)]
    warm: bool,
}

/// The slow simulator's latency model: the flags it is started with and, for the warm case,
/// the same distribution sampled here (crates/sim/src/latency.rs).
struct SlowSim {
    median_latency_secs: f64,
    latency_sigma: f64,
    queue_max_secs: f64,
    dispatch_secs: f64,
    tail_probability: f64,
    tail_min_secs: f64,
    tail_max_secs: f64,
}

impl SlowSim {
    const MODEL: Self = Self {
        median_latency_secs: 600.0,
        latency_sigma: 0.35,
        queue_max_secs: 1.0,
        dispatch_secs: 2.0,
        tail_probability: 0.01,
        tail_min_secs: 600.0,
        tail_max_secs: 1200.0,
    };

    fn args(&self) -> Vec<String> {
        [
            ("--median-latency-secs", self.median_latency_secs),
            ("--latency-sigma", self.latency_sigma),
            ("--queue-max-secs", self.queue_max_secs),
            ("--dispatch-secs", self.dispatch_secs),
            ("--tail-probability", self.tail_probability),
            ("--tail-min-secs", self.tail_min_secs),
            ("--tail-max-secs", self.tail_max_secs),
            ("--time-scale", 1.0),
        ]
        .into_iter()
        .flat_map(|(flag, value)| [flag.to_owned(), value.to_string()])
        .collect()
    }

    /// One run's time from creation to completion, in ms, as the simulator draws it for a clip
    /// of `clip_secs` seconds with or without audio: queued U(0.001, queue_max), dispatching,
    /// then a long-tail run with probability `tail_probability`, else log-normal around
    /// `median × (clip/5)^0.7 × (1.3 with audio)`.
    fn sample_ms(&self, rng: &mut SplitMix, clip_secs: u32, audio: bool) -> u64 {
        let queued = 0.001 + rng.unit() * (self.queue_max_secs - 0.001).max(0.0);
        let median = self.median_latency_secs
            * (f64::from(clip_secs) / 5.0).powf(0.7)
            * if audio { 1.3 } else { 1.0 };
        let running = if rng.unit() < self.tail_probability {
            self.tail_min_secs + rng.unit() * (self.tail_max_secs - self.tail_min_secs)
        } else {
            median * (self.latency_sigma * rng.standard_normal()).exp()
        };
        ((queued + self.dispatch_secs + running) * 1000.0).round() as u64
    }
}

/// A small deterministic generator (SplitMix64), so the warm histogram is the same every run.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A standard normal sample (Box-Muller), as the simulator draws its latencies.
    fn standard_normal(&mut self) -> f64 {
        let u1 = self.unit().max(f64::EPSILON);
        let u2 = self.unit();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

#[derive(Debug, Serialize)]
struct InflightFigures {
    /// `warm` (histogram seeded) or `cold` (fresh namespace).
    histogram: &'static str,
    seeded_samples: u64,
    jobs_in_flight: u64,
    worker_concurrency: usize,
    ramp_seconds: f64,
    /// Peak RSS of the whole run up to the window (enqueue, submits, first polls).
    ramp_peak_rss_mib: f64,
    /// Peak RSS within the window (the mark reset at its start).
    peak_rss_mib: f64,
    rss_per_job_kib: f64,
    cpu_percent: f64,
    redis_commands_per_s: f64,
    redis_commands_per_s_per_run: f64,
    /// Script calls (`EVALSHA`) per second per run: round trips that carry most commands.
    redis_scripts_per_s_per_run: f64,
    /// Redis commands in the window per provider GET (each poll is one delivery of the job).
    redis_commands_per_poll: f64,
    provider_gets_per_s: f64,
    provider_gets_per_run_per_min: f64,
    /// `klingq_jobs_parked` sampled every 10 s in the window.
    parked_min: u64,
    parked_max: u64,
    /// Jobs due for a poll but not yet delivered (the ready streams), most seen in the window:
    /// above 0 for long, the worker is not keeping up with the poll schedule.
    due_undelivered_max: u64,
    /// Mean time of a poll's `generate` step in the window (the GET, the slot renewal, the
    /// park's bookkeeping before the settle).
    generate_step_mean_ms: f64,
    /// CPU of the simulator process (the provider side), % of one core.
    sim_cpu_percent: f64,
    /// Worker attempts in the window, by how they ended (a poll that found the run going
    /// ends `parked`).
    attempts_per_run_per_min: f64,
    runs_ended_by_window_end: u64,
    window_seconds: f64,
    goal_peak_rss_mib: f64,
    goal_redis_commands_per_s_per_run: f64,
}

pub(super) async fn run(args: InflightBenchArgs, settings: Settings) -> anyhow::Result<()> {
    let model = SlowSim::MODEL;
    let sim_args = model.args();
    let sim_args: Vec<&str> = sim_args.iter().map(String::as_str).collect();
    let sim = SimProcess::start(&sim_args).await?;
    let mut worker_settings = settings.worker_settings();
    worker_settings.queue.namespace = fresh_namespace("inflight");
    allow_loopback_downloads(&mut worker_settings.storage);
    worker_settings.provider.base_url = sim.base_url.clone();
    worker_settings.provider.api_key = "bench".into();
    // The point: tracking runs costs no task, so the worker keeps its configured concurrency
    // (64 by default) whatever `--jobs` is; only the provider limit must let them all run.
    worker_settings.worker.provider_concurrency = args.jobs;
    worker_settings.worker.health_bind = String::new();
    worker_settings.worker.shutdown_grace_secs = 5;
    let concurrency = worker_settings.worker.concurrency;
    let policy = worker_settings.provider.poll_policy();
    let kind = format!(
        "{}:{}s",
        worker_settings.provider.model.trim_matches('/'),
        bench_spec(0).request.billed_seconds()
    );
    let worker = klingq_worker::Worker::connect(worker_settings, Duration::from_secs(10))
        .await
        .context("starting the worker (set KLINGQ_S3_ENDPOINT, KLINGQ_S3_BUCKET and AWS_* for an S3-compatible store)")?;
    let queue = worker.queue.clone();
    let metrics = worker.pipeline.metrics.clone();
    let histogram = if args.warm { "warm" } else { "cold" };
    println!(
        "bench inflight: {} runs, worker concurrency {concurrency}, histogram {histogram}, namespace {}",
        args.jobs,
        queue.config().namespace
    );
    println!(
        "  poll policy: floor {:.1} s, max interval {:.0} s, step {}, cold fraction {}, jitter {}, trusted from {} samples",
        policy.floor.as_secs_f64(),
        policy.max_interval.as_secs_f64(),
        policy.step,
        policy.cold_fraction,
        policy.jitter,
        policy.min_samples
    );
    let seeded = if args.warm {
        seed_histogram(&queue, &model, &kind).await?
    } else {
        0
    };

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(worker.run(async {
        let _ = stopped.await;
    }));
    let measured = measure(&args, &queue, &sim, &metrics, concurrency).await;
    let _ = stop.send(());
    let stopped = run.await;
    queue.delete_namespace().await?;
    stopped??;
    let window = measured?;

    let n = args.jobs.max(1) as f64;
    let figures = InflightFigures {
        histogram,
        seeded_samples: seeded,
        jobs_in_flight: args.jobs,
        worker_concurrency: concurrency,
        ramp_seconds: window.ramp_seconds,
        ramp_peak_rss_mib: window.ramp_peak_rss_mib,
        peak_rss_mib: window.peak_rss_mib,
        rss_per_job_kib: window.peak_rss_mib * 1024.0 / n,
        cpu_percent: window.cpu_percent,
        redis_commands_per_s: window.commands_per_s,
        redis_commands_per_s_per_run: window.commands_per_s / n,
        redis_scripts_per_s_per_run: window.scripts_per_s / n,
        redis_commands_per_poll: if window.gets_per_s > 0.0 {
            window.commands_per_s / window.gets_per_s
        } else {
            0.0
        },
        provider_gets_per_s: window.gets_per_s,
        provider_gets_per_run_per_min: window.gets_per_s * 60.0 / n,
        parked_min: window.parked_min,
        parked_max: window.parked_max,
        due_undelivered_max: window.due_max,
        generate_step_mean_ms: window.generate_mean_ms,
        sim_cpu_percent: window.sim_cpu_percent,
        attempts_per_run_per_min: window.attempts_per_s * 60.0 / n,
        runs_ended_by_window_end: window.runs_ended,
        window_seconds: window.seconds,
        goal_peak_rss_mib: GOAL_PEAK_RSS_MIB,
        goal_redis_commands_per_s_per_run: GOAL_COMMANDS_PER_S_PER_RUN,
    };
    println!(
        "peak RSS {:.1} MiB in the window ({:.1} KiB per run; {:.1} MiB over the ramp), CPU {:.1} % of one core",
        figures.peak_rss_mib,
        figures.rss_per_job_kib,
        figures.ramp_peak_rss_mib,
        figures.cpu_percent
    );
    println!(
        "Redis {:.0} commands/s ({:.3} per run per second, {:.3} script calls; {:.1} commands per poll); provider {:.1} GETs/s ({:.2} per run per minute); {:.2} worker attempts per run per minute",
        figures.redis_commands_per_s,
        figures.redis_commands_per_s_per_run,
        figures.redis_scripts_per_s_per_run,
        figures.redis_commands_per_poll,
        figures.provider_gets_per_s,
        figures.provider_gets_per_run_per_min,
        figures.attempts_per_run_per_min
    );
    println!(
        "klingq_jobs_parked in the window: {}–{} of {}; due but not yet delivered: at most {}; a poll's generate step: {:.1} ms on average; simulator CPU {:.1} %; runs ended by the end of the window: {}",
        figures.parked_min,
        figures.parked_max,
        args.jobs,
        figures.due_undelivered_max,
        figures.generate_step_mean_ms,
        figures.sim_cpu_percent,
        figures.runs_ended_by_window_end
    );
    println!(
        "goals: peak RSS ≤ {GOAL_PEAK_RSS_MIB} MiB: {}; Redis ≤ {GOAL_COMMANDS_PER_S_PER_RUN} commands/s per run: {}",
        met(figures.peak_rss_mib <= GOAL_PEAK_RSS_MIB),
        met(figures.redis_commands_per_s_per_run <= GOAL_COMMANDS_PER_S_PER_RUN)
    );
    println!("{}", serde_json::to_string(&figures)?);
    Ok(())
}

fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}

/// Seeds `kind`'s generation-time histogram with [`WARM_SAMPLES`] durations drawn from the
/// simulator's distribution, as the worker records finished runs; returns the samples it holds.
async fn seed_histogram(queue: &Queue, model: &SlowSim, kind: &str) -> anyhow::Result<u64> {
    let request = bench_spec(0).request;
    let mut rng = SplitMix(0x6b6c_696e_6771);
    for _ in 0..WARM_SAMPLES {
        let ms = model.sample_ms(&mut rng, request.billed_seconds(), request.generate_audio);
        let field = GenTimeHistogram::encode_field(GenTimeHistogram::bucket_of(ms));
        queue.record_gen_time(kind, &field, SAMPLE_CAP).await?;
    }
    let counts = queue.gen_times(kind).await?;
    let learned =
        GenTimeHistogram::from_counts(counts.iter().filter_map(|(field, count)| {
            GenTimeHistogram::parse_field(field).map(|b| (b, *count))
        }));
    let quantile = |q: f64| learned.quantile_ms(q).unwrap_or(0) as f64 / 1000.0;
    println!(
        "  warm: seeded {} samples of the simulator's distribution into {kind} (p10 {:.0} s, median {:.0} s, p90 {:.0} s): a deployment that has finished runs of this kind before",
        learned.samples(),
        quantile(0.1),
        quantile(0.5),
        quantile(0.9)
    );
    Ok(learned.samples())
}

struct Window {
    ramp_seconds: f64,
    ramp_peak_rss_mib: f64,
    peak_rss_mib: f64,
    cpu_percent: f64,
    commands_per_s: f64,
    scripts_per_s: f64,
    gets_per_s: f64,
    attempts_per_s: f64,
    parked_min: u64,
    parked_max: u64,
    due_max: u64,
    generate_mean_ms: f64,
    sim_cpu_percent: f64,
    runs_ended: u64,
    seconds: f64,
}

/// Enqueues the jobs, waits until every run is generating and its job parked, then measures
/// over the window.
async fn measure(
    args: &InflightBenchArgs,
    queue: &Queue,
    sim: &SimProcess,
    metrics: &klingq_worker::metrics::PipelineMetrics,
    concurrency: usize,
) -> anyhow::Result<Window> {
    let batch = klingq_core::JobId::new().to_string();
    queue
        .open_batch(&batch, &serde_json::json!({"bench": "inflight"}), 0)
        .await?;
    let jobs: Vec<NewJob> = (0..args.jobs)
        .map(|n| NewJob::new(&bench_spec(n)))
        .collect::<Result<_, _>>()?;
    queue.enqueue_many(&jobs, Some(&batch)).await?;
    queue.seal_batch(&batch).await?;
    drop(jobs);
    let started = Instant::now();
    let mut last_report = Instant::now();
    // Every run created and every job parked, but for those being polled at this instant
    // (delivered or due on the ready stream): with thousands of runs some poll is always going.
    loop {
        let record = queue.batch(&batch).await?.context("the batch vanished")?;
        let generating = record.counts.get("generating").copied().unwrap_or(0);
        let stats = queue.stats().await?;
        let polling = stats.in_flight + stats.waiting;
        if generating >= args.jobs && stats.parked + polling >= args.jobs {
            println!(
                "{} runs generating after {:.1} s, {} jobs parked and {polling} being polled; measuring for {} s",
                args.jobs,
                started.elapsed().as_secs_f64(),
                stats.parked,
                args.seconds
            );
            break;
        }
        if last_report.elapsed() >= Duration::from_secs(10) {
            println!(
                "  {generating} / {} generating, {} parked ({:.0} s)",
                args.jobs,
                stats.parked,
                started.elapsed().as_secs_f64()
            );
            last_report = Instant::now();
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(900),
            "only {generating} of {} runs generating ({} parked) after 900 s (worker concurrency {concurrency})",
            args.jobs,
            stats.parked
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let ramp_seconds = started.elapsed().as_secs_f64();
    let ramp_peak_rss_mib = peak_rss_mib();
    reset_peak_rss();

    let attempts = |metrics: &klingq_worker::metrics::PipelineMetrics| -> u64 {
        metrics.attempts_by_outcome().values().sum()
    };
    let before = queue.command_counters().await?;
    let sim_before = sim.stats().await?;
    let attempts_before = attempts(metrics);
    let generate_before = histogram_sum_count(metrics, STEP_GENERATE);
    let sim_cpu_before = sim.cpu_seconds();
    let cpu_before = cpu_seconds();
    let window = Instant::now();
    let end = window + Duration::from_secs(args.seconds);
    let (mut parked_min, mut parked_max, mut due_max) = (u64::MAX, 0, 0);
    loop {
        let stats = queue.stats().await?;
        parked_min = parked_min.min(stats.parked);
        parked_max = parked_max.max(stats.parked);
        due_max = due_max.max(stats.waiting);
        let now = Instant::now();
        if now >= end {
            break;
        }
        tokio::time::sleep((end - now).min(Duration::from_secs(10))).await;
    }
    let seconds = window.elapsed().as_secs_f64();
    let cpu_percent = (cpu_seconds() - cpu_before) / seconds * 100.0;
    let sim_cpu_percent = (sim.cpu_seconds() - sim_cpu_before) / seconds * 100.0;
    let generate_after = histogram_sum_count(metrics, STEP_GENERATE);
    let generate_polls = generate_after.1 - generate_before.1;
    let generate_mean_ms = if generate_polls > 0.0 {
        (generate_after.0 - generate_before.0) / generate_polls * 1000.0
    } else {
        0.0
    };
    let after = queue.command_counters().await?;
    let sim_after = sim.stats().await?;
    let attempts_after = attempts(metrics);
    let peak = peak_rss_mib();
    let record = queue.batch(&batch).await?.context("the batch vanished")?;
    let generating = record.counts.get("generating").copied().unwrap_or(0);
    println!(
        "redis profile per second of the window: {}",
        after.profile_since(&before, seconds)
    );
    Ok(Window {
        ramp_seconds,
        ramp_peak_rss_mib,
        peak_rss_mib: peak,
        cpu_percent,
        commands_per_s: after.commands.saturating_sub(before.commands) as f64 / seconds,
        scripts_per_s: after.scripts.saturating_sub(before.scripts) as f64 / seconds,
        gets_per_s: sim_after.polls.saturating_sub(sim_before.polls) as f64 / seconds,
        attempts_per_s: attempts_after.saturating_sub(attempts_before) as f64 / seconds,
        parked_min,
        parked_max,
        due_max,
        generate_mean_ms,
        sim_cpu_percent,
        runs_ended: args.jobs.saturating_sub(generating),
        seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warm_samples_follow_the_simulators_distribution() {
        let model = SlowSim::MODEL;
        let mut rng = SplitMix(7);
        let mut samples: Vec<u64> = (0..4001)
            .map(|_| model.sample_ms(&mut rng, 5, true))
            .collect();
        samples.sort_unstable();
        // Median: 600 s × 1.3 (audio) running, plus 2 s dispatching and ~0.5 s queued.
        let median = samples[2000] as f64 / 1000.0;
        assert!((760.0..805.0).contains(&median), "median {median}");
        let mut rng = SplitMix(7);
        let unit: Vec<f64> = (0..10_000).map(|_| rng.unit()).collect();
        assert!(unit.iter().all(|u| (0.0..1.0).contains(u)));
        let mean = unit.iter().sum::<f64>() / unit.len() as f64;
        assert!((0.48..0.52).contains(&mean), "mean {mean}");
    }
}
