//! `klingq bench …`: benchmarks that print what they measured and end with one JSON line.
//!
//! One file per benchmark; what several share (the simulator process, RSS and CPU readings,
//! batches, Redis command shares, sim timestamps) lives here.

mod enqueue;
mod fairness;
mod inflight;
mod pipeline;
mod queue;
mod rehost;
mod utilization;

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Subcommand;
use klingq_queue::{NewJob, Queue};
use serde::Serialize;

use crate::settings::Settings;

#[derive(Debug, Subcommand)]
pub(crate) enum BenchCommand {
    /// Queue overhead: enqueue N no-op jobs as one batch, then process them with C concurrent
    /// handlers through an apalis worker on klingq's backend, in this process.
    Queue(queue::QueueBenchArgs),
    /// Re-host: videos of the given sizes from the simulator (a separate process) streamed into
    /// the configured S3 store, against a plain streamed download of the same bytes.
    Rehost(rehost::RehostBenchArgs),
    /// In flight: N runs generating at once, tracked by one worker of default concurrency
    /// (parked in Redis between polls) against a slow simulator: peak RSS, CPU, Redis commands
    /// per second per run and provider GETs per run per minute.
    Inflight(inflight::InflightBenchArgs),
    /// Enqueue: N valid jobs as one batch through the library (`Producer::enqueue_batch`), then
    /// N more through the HTTP API (`POST /v1/batches`, JSON Lines) served in this process.
    Enqueue(enqueue::EnqueueBenchArgs),
    /// Pipeline: N jobs through the real worker (in this process) against the simulator (a
    /// separate process) at zero latency with tiny videos, re-hosted into the configured S3 store.
    Pipeline(pipeline::PipelineBenchArgs),
    /// Utilization: N jobs through a provider limit of C against the simulator (a separate
    /// process) where every run takes exactly G seconds, with its callbacks delivered or all
    /// lost: ideal makespan / measured, and the lag from a run's completion to its job's
    /// `succeeded`.
    Utilization(utilization::UtilizationBenchArgs),
    /// Fairness: the provider's slots shared between tenants by dollars started, the real
    /// scheduler scripts on Redis driven in virtual time (scenarios 1:1, 3:1 and 10 tenants),
    /// with the batch ETA's error against each tenant's real finish.
    Fairness(fairness::FairnessBenchArgs),
}

pub(crate) async fn run(command: BenchCommand, settings: Settings) -> anyhow::Result<()> {
    match command {
        BenchCommand::Queue(args) => queue::run(args, settings).await,
        BenchCommand::Rehost(args) => rehost::run(args, settings).await,
        BenchCommand::Inflight(args) => inflight::run(args, settings).await,
        BenchCommand::Enqueue(args) => enqueue::run(args, settings).await,
        BenchCommand::Pipeline(args) => pipeline::run(args, settings).await,
        BenchCommand::Utilization(args) => utilization::run(args, settings).await,
        BenchCommand::Fairness(args) => fairness::run(args, settings).await,
    }
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

/// The valid request every benchmark job carries: a 5-second clip with audio (the defaults).
fn bench_spec(n: u64) -> klingq_core::JobSpec {
    klingq_core::JobSpec::new(klingq_core::GenerationRequest::new(
        "https://example.com/start.png",
        format!("bench job {n}"),
    ))
}

/// A fresh namespace for one run of a benchmark: `bench-<name>-<pid>-<ms>`.
fn fresh_namespace(name: &str) -> String {
    format!(
        "bench-{name}-{}-{}",
        std::process::id(),
        klingq_core::job::now_ms()
    )
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

/// Resets the peak-RSS mark (Linux: `/proc/self/clear_refs`), so the next peak is a step's own.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// CPU seconds this process has used (user + system), from /proc/self/stat.
fn cpu_seconds() -> f64 {
    std::fs::read_to_string("/proc/self/stat").map_or(0.0, |stat| stat_cpu_seconds(&stat))
}

/// User + system CPU seconds of a `/proc/<pid>/stat` line (at 100 clock ticks per second).
fn stat_cpu_seconds(stat: &str) -> f64 {
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

/// A `klingq sim` child process on a free loopback port, killed on drop.
struct SimProcess {
    child: tokio::process::Child,
    base_url: String,
    http: reqwest::Client,
}

impl SimProcess {
    async fn start(args: &[&str]) -> anyhow::Result<Self> {
        Self::start_with_env(args, &[]).await
    }

    /// Starts the simulator with `args` and environment variables `env` (for secrets, which
    /// would show in the process list as arguments).
    async fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = tokio::process::Command::new(std::env::current_exe()?)
            .arg("sim")
            .args(["--port", &port.to_string()])
            .args(args)
            .envs(env.iter().copied())
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
                return Ok(Self {
                    child,
                    base_url,
                    http,
                });
            }
            if started.elapsed() > Duration::from_secs(30) {
                anyhow::bail!("the simulator did not answer within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `GET {path}` on the simulator (with the bench's bearer token) as JSON.
    async fn get_json(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        let url = format!("{}{path}", self.base_url);
        let value = self
            .http
            .get(&url)
            .bearer_auth("bench")
            .send()
            .await
            .with_context(|| format!("GET {path} on the simulator"))?
            .error_for_status()?
            .json()
            .await?;
        Ok(value)
    }

    /// CPU seconds the simulator process has used (user + system), from /proc.
    fn cpu_seconds(&self) -> f64 {
        self.child
            .id()
            .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
            .map_or(0.0, |stat| stat_cpu_seconds(&stat))
    }

    /// The simulator's request counters (`GET /__sim/stats`).
    async fn stats(&self) -> anyhow::Result<SimStats> {
        let stats = self.get_json("/__sim/stats").await?;
        let number = |value: &serde_json::Value| value.as_u64().unwrap_or(0);
        let callbacks = &stats["callbacks"];
        Ok(SimStats {
            creates: number(&stats["creates"]),
            polls: number(&stats["polls"]),
            lists: number(&stats["lists"]),
            callbacks_scheduled: number(&callbacks["scheduled"]),
            callbacks_delivered: number(&callbacks["delivered"]),
            callbacks_failed: number(&callbacks["failed"]),
            callbacks_dropped: number(&callbacks["dropped"]),
            callbacks_duplicated: number(&callbacks["duplicated"]),
            callbacks_retried: number(&callbacks["retried"]),
        })
    }
}

impl Drop for SimProcess {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// The simulator's counters a benchmark reports.
#[derive(Debug, Clone, Copy, Default, Serialize)]
struct SimStats {
    /// `POST /v1/models/{model}/runs`.
    creates: u64,
    /// `GET /v1/runs/{id}`.
    polls: u64,
    /// `GET /v1/runs` (reconciliation by `client_ref`).
    lists: u64,
    callbacks_scheduled: u64,
    callbacks_delivered: u64,
    callbacks_failed: u64,
    callbacks_dropped: u64,
    callbacks_duplicated: u64,
    callbacks_retried: u64,
}

/// The `_sum` and `_count` of the worker's histogram `name` (with its labels, as rendered:
/// `klingq_step_duration_seconds{step="generate"}`), from its Prometheus text.
fn histogram_sum_count(
    metrics: &klingq_worker::metrics::PipelineMetrics,
    name: &str,
) -> (f64, f64) {
    let mut text = String::new();
    metrics.render(&mut text);
    let (base, labels) = name.split_at(name.find('{').unwrap_or(name.len()));
    let value = |suffix: &str| {
        let series = format!("{base}{suffix}{labels} ");
        text.lines()
            .find_map(|line| line.strip_prefix(&series))
            .and_then(|rest| rest.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (value("_sum"), value("_count"))
}

/// The simulator serves its videos on loopback, which the download's SSRF guard refuses unless
/// allow-listed.
fn allow_loopback_downloads(storage: &mut klingq_storage::StorageConfig) {
    storage.download_allow_cidrs.push("127.0.0.0/8".to_owned());
}

/// Milliseconds since the Unix epoch of an RFC 3339 timestamp as the simulator writes them
/// (`2026-05-06T10:00:00.123Z` or `…+00:00`); `None` for anything else.
fn rfc3339_ms(text: &str) -> Option<u64> {
    let (date, rest) = text.split_once('T')?;
    let mut ymd = date.splitn(3, '-');
    let year: i64 = ymd.next()?.parse().ok()?;
    let month: i64 = ymd.next()?.parse().ok()?;
    let day: i64 = ymd.next()?.parse().ok()?;
    let offset_at = rest.find(['Z', 'z', '+', '-']).unwrap_or(rest.len());
    let (clock, zone) = rest.split_at(offset_at);
    let mut hms = clock.splitn(3, ':');
    let hour: i64 = hms.next()?.parse().ok()?;
    let minute: i64 = hms.next()?.parse().ok()?;
    let seconds = hms.next()?;
    let (whole, fraction) = seconds.split_once('.').unwrap_or((seconds, ""));
    let second: i64 = whole.parse().ok()?;
    let millis: i64 = if fraction.is_empty() {
        0
    } else {
        let digits: String = fraction.chars().chain("000".chars()).take(3).collect();
        digits.parse().ok()?
    };
    let offset_minutes: i64 = match zone {
        "" | "Z" | "z" => 0,
        _ => {
            let sign = if zone.starts_with('-') { -1 } else { 1 };
            let (h, m) = zone[1..].split_once(':')?;
            sign * (h.parse::<i64>().ok()? * 60 + m.parse::<i64>().ok()?)
        }
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let ms = ((days * 24 + hour) * 60 + minute - offset_minutes) * 60_000 + second * 1000 + millis;
    u64::try_from(ms).ok()
}

/// Median, 95th percentile and maximum of `values` (nearest rank), 0 when empty.
fn summary(values: &[f64]) -> Spread {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    sorted.sort_by(f64::total_cmp);
    let rank = |q: f64| -> f64 {
        if sorted.is_empty() {
            return 0.0;
        }
        let index = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
        sorted[index]
    };
    Spread {
        median: rank(0.5),
        p95: rank(0.95),
        max: sorted.last().copied().unwrap_or(0.0),
    }
}

/// Median, p95 and maximum of a measured quantity.
#[derive(Debug, Clone, Copy, Serialize)]
struct Spread {
    median: f64,
    p95: f64,
    max: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_timestamps_read_as_epoch_milliseconds() {
        assert_eq!(rfc3339_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            rfc3339_ms("2026-05-06T10:00:00.123Z"),
            Some(1_778_061_600_123)
        );
        assert_eq!(
            rfc3339_ms("2026-05-06T10:00:00.123+00:00"),
            Some(1_778_061_600_123)
        );
        assert_eq!(
            rfc3339_ms("2026-05-06T12:00:00.1+02:00"),
            Some(1_778_061_600_100)
        );
        assert_eq!(rfc3339_ms("2024-02-29T23:59:59Z"), Some(1_709_251_199_000));
        assert_eq!(rfc3339_ms("yesterday"), None);
    }

    #[test]
    fn summary_takes_nearest_ranks() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        let spread = summary(&values);
        assert_eq!(spread.median, 50.0);
        assert_eq!(spread.p95, 95.0);
        assert_eq!(spread.max, 100.0);
        assert_eq!(summary(&[]).max, 0.0);
    }
}
