//! `klingq bench utilization`: does klingq keep the provider busy?
//!
//! N jobs through a provider limit of C (`worker.provider_concurrency`) against the simulator
//! (a separate process) where every run takes exactly G seconds from create to completion.
//! The best any client can do is ⌈N / C⌉ × G; the measured makespan runs from the first
//! create at the provider to the last job's `succeeded`, so utilisation = ideal / measured.
//! What stretches it: the time from a run's completion to the next create on its slot (the
//! job learning of the end, giving the slot back, the waiting job woken, delivered and
//! creating), and the last wave's re-host. The lag per job is its `finished_ms` minus its
//! run's `completed_at`: learning of the end plus download, upload and publish.
//!
//! `--callbacks on`: the simulator signs and POSTs each run's callback to the API served in
//! this process (`POST /v1/provider/callbacks/runflow`), which wakes the parked job.
//! `--callbacks lost`: it drops every callback (`--callback-drop 1`): polling alone, on a fresh
//! namespace's learned times (cold for the first wave, learned from it for the next).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, ValueEnum};
use klingq_core::job::now_ms;
use klingq_queue::{NewJob, Queue};
use serde::Serialize;

use super::{
    SimProcess, SimStats, Spread, allow_loopback_downloads, batches_progress, bench_spec,
    enqueue_in_batches, fresh_namespace, histogram_sum_count, rfc3339_ms, summary,
};
use crate::settings::Settings;

use klingq_producer::CALLBACK_PATH;
/// The simulator's queued phase when `--queue-max-secs` is 0 (crates/sim/src/latency.rs).
const SIM_MIN_QUEUED_SECS: f64 = 0.001;
/// Goals from the issue, reported against (not asserted).
const GOAL_UTILIZATION_CALLBACKS: f64 = 0.97;
const GOAL_MEDIAN_LAG_SECS: f64 = 1.0;
const GOAL_UTILIZATION_POLLING: f64 = 0.93;

#[derive(Debug, Args)]
pub(crate) struct UtilizationBenchArgs {
    /// Jobs, enqueued as one batch.
    #[arg(long, default_value_t = 30)]
    jobs: u64,
    /// The shared provider limit (`worker.provider_concurrency`): runs at once.
    #[arg(long, default_value_t = 10)]
    provider_concurrency: u64,
    /// Every run's time from create to completion at the simulator, in seconds.
    #[arg(long, default_value_t = 40.0)]
    generation_secs: f64,
    /// `on`: the simulator delivers each run's signed callback; `lost`: it drops every one
    /// (`--callback-drop 1`), so polling alone finds the runs' ends.
    #[arg(long, value_enum, default_value_t = CallbackMode::On)]
    callbacks: CallbackMode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum CallbackMode {
    On,
    Lost,
}

#[derive(Debug, Serialize)]
struct UtilizationFigures {
    callbacks: CallbackMode,
    jobs: u64,
    provider_concurrency: u64,
    worker_concurrency: usize,
    generation_secs: f64,
    /// The runs' `duration_ms` as the simulator reports them (should all be G × 1000).
    run_duration_ms_min: u64,
    run_duration_ms_max: u64,
    ideal_makespan_seconds: f64,
    /// From the first create at the provider to the last job's `succeeded`.
    makespan_seconds: f64,
    utilization: f64,
    /// From the enqueue to the last job's `succeeded`.
    makespan_from_enqueue_seconds: f64,
    utilization_from_enqueue: f64,
    /// Job `finished_ms` − its run's `completed_at`.
    lag_seconds: Spread,
    /// Run completion → the job reading the run's end (the worker's
    /// `klingq_provider_finish_lag_seconds`, mean).
    detect_lag_mean_seconds: f64,
    /// A run's completion → the next create on the slot it held (waves after the first).
    handoff_seconds: Spread,
    first_wave_create_spread_seconds: f64,
    succeeded: u64,
    runs_created: u64,
    provider_gets_per_job: f64,
    /// GETs per run of the first wave (nothing learned yet: the cold schedule) and of the
    /// later ones (timed from the first wave's generation times).
    gets_per_run_first_wave: f64,
    gets_per_run_later_waves: f64,
    provider: SimStats,
    /// The API's answers to the callbacks, by outcome.
    api_callbacks: BTreeMap<&'static str, u64>,
    /// Worker attempts by how they ended (a poll that found the run going ends `parked`, a
    /// wait for a provider slot `deferred`).
    worker_attempts: BTreeMap<&'static str, u64>,
    redis_commands_per_job: f64,
    goal_utilization: f64,
    goal_median_lag_seconds: Option<f64>,
}

pub(super) async fn run(args: UtilizationBenchArgs, settings: Settings) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.jobs > 0 && args.provider_concurrency > 0,
        "--jobs and --provider-concurrency must be positive"
    );
    anyhow::ensure!(
        args.generation_secs.is_finite() && args.generation_secs >= 0.01,
        "--generation-secs must be at least 0.01"
    );
    // The simulator draws a run's time as queued + dispatching + running, with running =
    // median × (clip / 5)^0.7 × (1.3 with audio) × e^(sigma·z) (crates/sim/src/latency.rs).
    // With sigma 0, no tail, no dispatching and `--queue-max-secs 0` (a fixed 1 ms queued
    // phase), the median below makes the total G + 0.5 ms, which the simulator reports in
    // whole milliseconds (truncated): exactly G.
    let request = bench_spec(0).request;
    let clip_factor = (f64::from(request.billed_seconds()) / 5.0).powf(0.7)
        * if request.generate_audio { 1.3 } else { 1.0 };
    let median = (args.generation_secs - SIM_MIN_QUEUED_SECS + 0.0005) / clip_factor;
    let secret = format!("whsec_bench_{}", klingq_core::JobId::new());
    let median_arg = median.to_string();
    let drop_arg = match args.callbacks {
        CallbackMode::On => "0",
        CallbackMode::Lost => "1",
    };
    let sim = SimProcess::start_with_env(
        &[
            "--median-latency-secs",
            &median_arg,
            "--latency-sigma",
            "0",
            "--queue-max-secs",
            "0",
            "--dispatch-secs",
            "0",
            "--tail-probability",
            "0",
            "--time-scale",
            "1",
            "--video-bytes-per-second",
            "200",
            "--balance-usd",
            "1000000000",
            "--callback-drop",
            drop_arg,
        ],
        &[("KLINGQ_SIM_CALLBACK_SECRET", secret.as_str())],
    )
    .await?;

    let mut worker_settings = settings.worker_settings();
    worker_settings.queue.namespace = fresh_namespace("utilization");
    allow_loopback_downloads(&mut worker_settings.storage);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let api_url = format!("http://{}", listener.local_addr()?);
    worker_settings.provider.base_url = sim.base_url.clone();
    worker_settings.provider.api_key = "bench".into();
    worker_settings.provider.mode = klingq_provider::Mode::Async;
    worker_settings.provider.callback_url = Some(format!("{api_url}{CALLBACK_PATH}"));
    worker_settings.worker.provider_concurrency = args.provider_concurrency;
    worker_settings.worker.health_bind = String::new();
    worker_settings.worker.shutdown_grace_secs = 5;
    let worker_concurrency = worker_settings.worker.concurrency;
    let policy = worker_settings.provider.poll_policy();
    let worker = klingq_worker::Worker::connect(worker_settings, Duration::from_secs(10))
        .await
        .context("starting the worker (set KLINGQ_S3_ENDPOINT, KLINGQ_S3_BUCKET and AWS_* for an S3-compatible store)")?;
    let queue = worker.queue.clone();
    let metrics = worker.pipeline.metrics.clone();

    // The API in this process, verifying the simulator's signature.
    let cost = klingq_core::CostModel {
        usd_per_second: settings.worker.usd_per_second,
    };
    let producer = klingq_producer::Producer::new(queue.clone(), cost);
    let mut api_config = settings.api.clone();
    api_config.tokens.clear();
    api_config.callback_secrets = vec![klingq_core::Secret::new(secret)];
    let state = crate::serve::api_state(producer, api_config);
    let callback_metrics = state.callback_metrics();
    let (api_stop, api_stopped) = tokio::sync::oneshot::channel::<()>();
    let api = tokio::spawn(klingq_producer::serve(listener, state, async {
        let _ = api_stopped.await;
    }));

    println!(
        "bench utilization: {} jobs, provider concurrency {}, every run {} s (sim --median-latency-secs {median_arg}: 5 s clip with audio), callbacks {}, worker concurrency {worker_concurrency}, namespace {}",
        args.jobs,
        args.provider_concurrency,
        args.generation_secs,
        match args.callbacks {
            CallbackMode::On => "on (signed, to the API in this process)",
            CallbackMode::Lost => "lost (the simulator drops every one: polling alone)",
        },
        queue.config().namespace
    );
    println!(
        "  poll policy: floor {:.1} s, max interval {:.0} s, step {}, cold fraction {}, jitter {}, trusted from {} samples (fresh namespace: nothing learned yet)",
        policy.floor.as_secs_f64(),
        policy.max_interval.as_secs_f64(),
        policy.step,
        policy.cold_fraction,
        policy.jitter,
        policy.min_samples
    );

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(worker.run(async {
        let _ = stopped.await;
    }));
    let measured = measure(&args, &queue).await;
    let _ = stop.send(());
    let stopped = run.await;
    let _ = api_stop.send(());
    let _ = api.await;
    let outcome = match measured {
        Ok(measured) => report(&args, &sim, &queue, measured).await,
        Err(error) => Err(error),
    };
    queue.delete_namespace().await?;
    stopped??;
    let mut figures = outcome?;
    figures.worker_concurrency = worker_concurrency;
    figures.detect_lag_mean_seconds = mean_finish_lag(&metrics);
    figures.worker_attempts = metrics.attempts_by_outcome();
    figures.api_callbacks = klingq_producer::CALLBACK_OUTCOMES
        .iter()
        .map(|outcome| (*outcome, callback_metrics.get(outcome)))
        .filter(|(_, count)| *count > 0)
        .collect();
    print_summary(&figures);
    println!("{}", serde_json::to_string(&figures)?);
    anyhow::ensure!(
        figures.succeeded == args.jobs,
        "only {} of {} jobs succeeded",
        figures.succeeded,
        args.jobs
    );
    Ok(())
}

/// What the run leaves for the report: the batch, when it was enqueued, Redis commands used.
struct Measured {
    batch: String,
    enqueued_ms: u64,
    redis_commands: u64,
}

/// Enqueues the jobs as one batch and waits until every one has finished.
async fn measure(args: &UtilizationBenchArgs, queue: &Queue) -> anyhow::Result<Measured> {
    let before = queue.command_counters().await?;
    let enqueued_ms = now_ms();
    let jobs: Vec<NewJob> = (0..args.jobs)
        .map(|n| NewJob::new(&bench_spec(n)))
        .collect::<Result<_, _>>()?;
    let batches =
        enqueue_in_batches(queue, jobs, 1, &serde_json::json!({"bench": "utilization"})).await?;
    let waves = args.jobs.div_ceil(args.provider_concurrency);
    let limit = Duration::from_secs_f64(waves as f64 * args.generation_secs * 4.0 + 300.0);
    let started = Instant::now();
    let mut last_report = Instant::now();
    loop {
        let (terminal, succeeded, done) = batches_progress(queue, &batches).await?;
        if done {
            break;
        }
        if last_report.elapsed() >= Duration::from_secs(10) {
            println!(
                "  {terminal} / {} finished ({succeeded} succeeded) after {:.0} s",
                args.jobs,
                started.elapsed().as_secs_f64()
            );
            last_report = Instant::now();
        }
        anyhow::ensure!(
            started.elapsed() < limit,
            "the batch did not finish within {:.0} s",
            limit.as_secs_f64()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = queue.command_counters().await?;
    Ok(Measured {
        batch: batches.into_iter().next().context("no batch")?,
        enqueued_ms,
        redis_commands: after.commands.saturating_sub(before.commands),
    })
}

/// One run at the simulator, matched to its job by `client_ref`.
struct RunTimes {
    job_id: String,
    /// `GET /v1/runs/{id}` of this run by the worker.
    polls: u64,
    created_ms: u64,
    completed_ms: u64,
    duration_ms: u64,
}

/// Reads the jobs and the simulator's runs and works out the figures.
async fn report(
    args: &UtilizationBenchArgs,
    sim: &SimProcess,
    queue: &Queue,
    measured: Measured,
) -> anyhow::Result<UtilizationFigures> {
    // The counters first: reading the runs below is counted as polls too.
    let provider = sim.stats().await?;
    let records = sim.get_json("/__sim/runs").await?;
    let records = records.as_array().context("GET /__sim/runs: not a list")?;
    let mut runs = Vec::with_capacity(records.len());
    for record in records {
        let id = record["id"].as_str().context("a run without an id")?;
        let run = sim.get_json(&format!("/v1/runs/{id}")).await?;
        let field = |name: &str| {
            run[name]
                .as_str()
                .and_then(rfc3339_ms)
                .with_context(|| format!("run {id}: no {name}: {}", run[name]))
        };
        runs.push(RunTimes {
            job_id: run["client_ref"].as_str().unwrap_or_default().to_owned(),
            // From the listing, read before this GET counted as one more.
            polls: record["polls"].as_u64().unwrap_or(0),
            created_ms: field("created_at")?,
            completed_ms: field("completed_at")?,
            duration_ms: run["duration_ms"]
                .as_u64()
                .with_context(|| format!("run {id}: no duration_ms"))?,
        });
    }
    let ids = queue
        .batch_job_ids(&measured.batch, 0, args.jobs.max(1))
        .await?;
    let jobs = queue.jobs(&ids).await?;
    let finished: HashMap<&str, u64> = jobs
        .iter()
        .filter(|job| job.state == klingq_core::JobState::Succeeded)
        .filter_map(|job| Some((job.id.as_str(), job.finished_ms?)))
        .collect();
    let succeeded = finished.len() as u64;

    let expected_ms = (args.generation_secs * 1000.0).round() as u64;
    let run_duration_ms_min = runs.iter().map(|r| r.duration_ms).min().unwrap_or(0);
    let run_duration_ms_max = runs.iter().map(|r| r.duration_ms).max().unwrap_or(0);
    if run_duration_ms_min.abs_diff(expected_ms) > 1
        || run_duration_ms_max.abs_diff(expected_ms) > 1
    {
        println!(
            "WARNING: the runs took {run_duration_ms_min}–{run_duration_ms_max} ms, not {expected_ms} ms: the ideal makespan below is off"
        );
    }
    let first_create = runs.iter().map(|r| r.created_ms).min().unwrap_or(0);
    let last_finish = finished.values().copied().max().unwrap_or(0);
    let waves = args.jobs.div_ceil(args.provider_concurrency);
    let ideal = waves as f64 * args.generation_secs;
    let makespan = last_finish.saturating_sub(first_create) as f64 / 1000.0;
    let makespan_from_enqueue = last_finish.saturating_sub(measured.enqueued_ms) as f64 / 1000.0;
    let lags: Vec<f64> = runs
        .iter()
        .filter_map(|run| {
            let finished = *finished.get(run.job_id.as_str())?;
            Some((finished as f64 - run.completed_ms as f64) / 1000.0)
        })
        .collect();
    // With equal run times, the i-th create (i ≥ C) takes the slot of the (i − C)-th
    // completion.
    let mut creates: Vec<u64> = runs.iter().map(|r| r.created_ms).collect();
    let mut completions: Vec<u64> = runs.iter().map(|r| r.completed_ms).collect();
    creates.sort_unstable();
    completions.sort_unstable();
    let concurrency = args.provider_concurrency as usize;
    let handoffs: Vec<f64> = (concurrency..creates.len())
        .map(|i| (creates[i] as f64 - completions[i - concurrency] as f64) / 1000.0)
        .collect();
    let first_wave = &creates[..concurrency.min(creates.len())];
    let mut by_creation: Vec<&RunTimes> = runs.iter().collect();
    by_creation.sort_by_key(|run| run.created_ms);
    let mean_polls = |runs: &[&RunTimes]| {
        runs.iter().map(|run| run.polls as f64).sum::<f64>() / runs.len().max(1) as f64
    };
    let (first, later) = by_creation.split_at(concurrency.min(by_creation.len()));
    let gets_per_run_first_wave = mean_polls(first);
    let gets_per_run_later_waves = mean_polls(later);
    let first_wave_spread = match (first_wave.first(), first_wave.last()) {
        (Some(first), Some(last)) => (last - first) as f64 / 1000.0,
        _ => 0.0,
    };
    Ok(UtilizationFigures {
        callbacks: args.callbacks,
        jobs: args.jobs,
        provider_concurrency: args.provider_concurrency,
        worker_concurrency: 0,
        generation_secs: args.generation_secs,
        run_duration_ms_min,
        run_duration_ms_max,
        ideal_makespan_seconds: ideal,
        makespan_seconds: makespan,
        utilization: ideal / makespan.max(f64::EPSILON),
        makespan_from_enqueue_seconds: makespan_from_enqueue,
        utilization_from_enqueue: ideal / makespan_from_enqueue.max(f64::EPSILON),
        lag_seconds: summary(&lags),
        detect_lag_mean_seconds: 0.0,
        handoff_seconds: summary(&handoffs),
        first_wave_create_spread_seconds: first_wave_spread,
        succeeded,
        runs_created: runs.len() as u64,
        provider_gets_per_job: provider.polls as f64 / args.jobs as f64,
        gets_per_run_first_wave,
        gets_per_run_later_waves,
        provider,
        api_callbacks: BTreeMap::new(),
        worker_attempts: BTreeMap::new(),
        redis_commands_per_job: measured.redis_commands as f64 / args.jobs as f64,
        goal_utilization: match args.callbacks {
            CallbackMode::On => GOAL_UTILIZATION_CALLBACKS,
            CallbackMode::Lost => GOAL_UTILIZATION_POLLING,
        },
        goal_median_lag_seconds: (args.callbacks == CallbackMode::On)
            .then_some(GOAL_MEDIAN_LAG_SECS),
    })
}

/// The mean of the worker's `klingq_provider_finish_lag_seconds` (sum / count).
fn mean_finish_lag(metrics: &klingq_worker::metrics::PipelineMetrics) -> f64 {
    let (sum, count) = histogram_sum_count(metrics, "klingq_provider_finish_lag_seconds");
    if count > 0.0 { sum / count } else { 0.0 }
}

fn print_summary(f: &UtilizationFigures) {
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    println!(
        "runs: {} created, each {}–{} ms from create to completion (wanted {:.0} ms); {} of {} jobs succeeded",
        f.runs_created,
        f.run_duration_ms_min,
        f.run_duration_ms_max,
        f.generation_secs * 1000.0,
        f.succeeded,
        f.jobs
    );
    println!(
        "makespan {:.2} s from the first create ({:.2} s from the enqueue); ideal ⌈{}/{}⌉ × {} s = {:.0} s: utilisation {:.3} ({:.3} from the enqueue)",
        f.makespan_seconds,
        f.makespan_from_enqueue_seconds,
        f.jobs,
        f.provider_concurrency,
        f.generation_secs,
        f.ideal_makespan_seconds,
        f.utilization,
        f.utilization_from_enqueue
    );
    println!(
        "lag from a run's completion to its job's succeeded: median {:.3} s, p95 {:.3} s, max {:.3} s (of which learning of the end: mean {:.3} s)",
        f.lag_seconds.median, f.lag_seconds.p95, f.lag_seconds.max, f.detect_lag_mean_seconds
    );
    println!(
        "slot handoff (a completion to the next create on its slot): median {:.3} s, max {:.3} s; first wave created over {:.3} s",
        f.handoff_seconds.median, f.handoff_seconds.max, f.first_wave_create_spread_seconds
    );
    println!(
        "provider: {} creates, {} GETs ({:.2} per job: {:.1} per run of the first wave, {:.1} of the later ones), {} lists; callbacks scheduled {}, delivered {}, dropped {}, failed {}, duplicated {}, retried {}",
        f.provider.creates,
        f.provider.polls,
        f.provider_gets_per_job,
        f.gets_per_run_first_wave,
        f.gets_per_run_later_waves,
        f.provider.lists,
        f.provider.callbacks_scheduled,
        f.provider.callbacks_delivered,
        f.provider.callbacks_dropped,
        f.provider.callbacks_failed,
        f.provider.callbacks_duplicated,
        f.provider.callbacks_retried
    );
    println!(
        "API callback answers: {:?}; worker attempts: {:?}; Redis {:.1} commands per job",
        f.api_callbacks, f.worker_attempts, f.redis_commands_per_job
    );
    match f.goal_median_lag_seconds {
        Some(goal_lag) => println!(
            "goals (callbacks on): utilisation ≥ {}: {}; median lag ≤ {goal_lag} s: {}",
            f.goal_utilization,
            verdict(f.utilization >= f.goal_utilization),
            verdict(f.lag_seconds.median <= goal_lag)
        ),
        None => println!(
            "goal (polling alone): utilisation ≥ {}: {}",
            f.goal_utilization,
            verdict(f.utilization >= f.goal_utilization)
        ),
    }
}
