//! `klingq bench fairness`: how the provider's slots are shared between tenants.
//!
//! The real scheduler scripts (`slot_acquire.lua`, `slot_release.lua`) on the configured
//! Redis, driven by real enqueued jobs in a discrete-event simulation with a virtual clock (no
//! worker, no simulator): C provider slots; each run holds its slot for 60 s + 8 s per second
//! of video, ±20 % (seeded), so a 15 s clip costs five times a 3 s one and runs longer. A run
//! ending gives its slot back (`release_slot`), and the slot holders are read to see which
//! job the fair share started next.
//!
//! Printed per scenario: each tenant's dollars started while every tenant of the scenario
//! still waited, its share of them against its weighted target, what first-in-first-out
//! would have started, the Redis commands per slot decision; and, for each tenant's jobs seen
//! as one batch, how far the batch ETA (`klingq_core::BatchEta`, the estimate the batch view
//! shows) taken at 10 %, 25 %, 50 % and 75 % done lands from the batch's real finish.

use std::collections::{BTreeMap, BTreeSet};

use clap::Args;
use klingq_core::{BatchEta, EtaInputs, ProviderLoad, TenantLoad};
use klingq_queue::{NewJob, PROVIDER_LIMIT, Queue, SlotClaim};
use serde::Serialize;

use super::{bench_spec, fresh_namespace};
use crate::settings::Settings;

#[derive(Debug, Args)]
pub(crate) struct FairnessBenchArgs {
    /// Provider slots (runs at once).
    #[arg(long, default_value_t = 4)]
    slots: u64,
    /// One scenario: `1:1`, `3:1` or `10`; all by default.
    #[arg(long)]
    scenario: Option<String>,
    /// Seed of the run times' jitter.
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

struct TenantPlan {
    name: String,
    weight: f64,
    clips: Vec<u32>,
}

struct Scenario {
    name: &'static str,
    what: &'static str,
    tenants: Vec<TenantPlan>,
    /// Tenants that arrive after the first took the free slots (the rest wait from the start).
    late: BTreeSet<String>,
}

fn scenarios() -> Vec<Scenario> {
    let plan = |name: &str, weight: f64, clips: Vec<u32>| TenantPlan {
        name: name.to_owned(),
        weight,
        clips,
    };
    vec![
        Scenario {
            name: "1:1",
            what: "A 60 clips of 15 s, then B 30 clips of 3 s, equal weights",
            tenants: vec![plan("a", 1.0, vec![15; 60]), plan("b", 1.0, vec![3; 30])],
            late: ["b".to_owned()].into(),
        },
        Scenario {
            name: "3:1",
            what: "heavy (weight 3) and light (weight 1), 60 clips each, 5 s and 10 s mixed",
            tenants: vec![
                plan(
                    "heavy",
                    3.0,
                    (0..60).map(|i| if i % 2 == 0 { 5 } else { 10 }).collect(),
                ),
                plan(
                    "light",
                    1.0,
                    (0..60).map(|i| if i % 2 == 0 { 10 } else { 5 }).collect(),
                ),
            ],
            late: BTreeSet::new(),
        },
        Scenario {
            name: "10",
            what: "10 tenants, clips of 3 to 15 s (one length each), 30 jobs each, equal weights",
            tenants: (0..10u32)
                .map(|i| plan(&format!("t{i}"), 1.0, vec![3 + (i * 12) / 9; 30]))
                .collect(),
            late: BTreeSet::new(),
        },
    ]
}

#[derive(Debug, Serialize)]
struct TenantFigures {
    tenant: String,
    weight: f64,
    started_usd: f64,
    share: f64,
    target: f64,
    fifo_usd: f64,
}

#[derive(Debug, Serialize)]
struct EtaFigure {
    tenant: String,
    at_done: f64,
    error_pct: f64,
}

#[derive(Debug, Serialize)]
struct ScenarioFigures {
    scenario: &'static str,
    window_usd: f64,
    max_deviation_pct: f64,
    tenants: Vec<TenantFigures>,
    commands_per_decision: f64,
    decisions_per_sec: f64,
    makespan_virtual_secs: f64,
    eta: Vec<EtaFigure>,
    max_eta_error_pct: f64,
}

/// A small deterministic generator (SplitMix64): the same run times on every run.
struct Rng(u64);

impl Rng {
    fn unit(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
}

struct Job {
    tenant: usize,
    micros: u64,
    run_secs: f64,
}

pub(super) async fn run(args: FairnessBenchArgs, settings: Settings) -> anyhow::Result<()> {
    anyhow::ensure!(args.slots > 0, "--slots must be positive");
    let mut all = Vec::new();
    for scenario in scenarios() {
        if args.scenario.as_deref().is_some_and(|s| s != scenario.name) {
            continue;
        }
        let figures = run_scenario(&scenario, &args, &settings).await?;
        print_figures(&scenario, &figures);
        all.push(figures);
    }
    anyhow::ensure!(
        !all.is_empty(),
        "no scenario named that: use 1:1, 3:1 or 10"
    );
    println!("{}", serde_json::to_string(&all)?);
    Ok(())
}

async fn run_scenario(
    scenario: &Scenario,
    args: &FairnessBenchArgs,
    settings: &Settings,
) -> anyhow::Result<ScenarioFigures> {
    let mut config = settings.queue.clone();
    config.namespace = fresh_namespace(&format!("fairness-{}", scenario.name.replace(':', "-")));
    let queue = Queue::connect(config).await?;
    let mut rng = Rng(args.seed);
    // Jobs, in arrival order: each tenant's in turn (early tenants first, then late ones).
    let mut ids: Vec<String> = Vec::new();
    let mut jobs: Vec<Job> = Vec::new();
    let order: Vec<usize> = (0..scenario.tenants.len())
        .filter(|i| !scenario.late.contains(&scenario.tenants[*i].name))
        .chain(
            (0..scenario.tenants.len())
                .filter(|i| scenario.late.contains(&scenario.tenants[*i].name)),
        )
        .collect();
    for &t in &order {
        let plan = &scenario.tenants[t];
        let new_jobs: Vec<NewJob> = plan
            .clips
            .iter()
            .enumerate()
            .map(|(n, _)| {
                let mut job = NewJob::new(&bench_spec(n as u64)).expect("a spec serializes");
                job.tenant = Some(plan.name.clone());
                job
            })
            .collect();
        for enqueued in queue.enqueue_many(&new_jobs, None).await? {
            ids.push(enqueued.id);
        }
        for &secs in &plan.clips {
            let jitter = 0.8 + 0.4 * rng.unit();
            jobs.push(Job {
                tenant: t,
                micros: u64::from(secs) * 140_000,
                run_secs: (60.0 + 8.0 * f64::from(secs)) * jitter,
            });
        }
    }
    let index: BTreeMap<&str, usize> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (id.as_str(), i))
        .collect();
    let claim = |job: &Job| {
        let plan = &scenario.tenants[job.tenant];
        SlotClaim {
            tenant: &plan.name,
            micros: job.micros,
            weight: plan.weight,
            max_concurrency: 0,
            priority: klingq_core::Priority::Normal,
        }
    };
    let lease = std::time::Duration::from_secs(3600);
    let before: u64 = command_total(&queue).await?;
    let wall = std::time::Instant::now();
    let mut decisions = 0u64;
    // Arrivals: every job asks once, in order (a late tenant's after the first slots went).
    let mut now = 0.0f64;
    let mut running: Vec<(f64, usize)> = Vec::new();
    let mut starts: Vec<(f64, usize)> = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let status = queue
            .acquire_slot_or_wait(PROVIDER_LIMIT, id, claim(&jobs[i]), lease, args.slots)
            .await?;
        decisions += 1;
        if status.acquired {
            running.push((now + jobs[i].run_secs, i));
            starts.push((now, i));
        }
    }
    // Runs end in time order; each end frees a slot the fair share hands on.
    let mut finished_at = vec![0.0f64; jobs.len()];
    let mut held: BTreeSet<String> = holders(&queue).await?;
    while !running.is_empty() {
        running.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (end, done) = running.remove(0);
        now = end;
        finished_at[done] = end;
        queue.release_slot(PROVIDER_LIMIT, &ids[done]).await?;
        decisions += 1;
        held.remove(&ids[done]);
        let fresh = holders(&queue).await?;
        for id in fresh.difference(&held) {
            let i = index[id.as_str()];
            running.push((now + jobs[i].run_secs, i));
            starts.push((now, i));
        }
        held = fresh;
    }
    let elapsed = wall.elapsed().as_secs_f64();
    let commands = command_total(&queue).await?.saturating_sub(before);
    // The holders reads are the bench's own: one per release.
    let scheduler_commands = commands.saturating_sub(decisions - ids.len() as u64);
    queue.delete_namespace().await?;

    // The window: from the last tenant's arrival to the first tenant's last start.
    let n = scenario.tenants.len();
    let mut last_start = vec![0usize; n];
    for (k, (_, i)) in starts.iter().enumerate() {
        last_start[jobs[*i].tenant] = k;
    }
    let first_arrival_of_late = order
        .iter()
        .position(|t| scenario.late.contains(&scenario.tenants[*t].name));
    let window_start = match first_arrival_of_late {
        // Starts before the late tenants arrived: the early tenants took the free slots.
        Some(_) => starts.iter().take_while(|(t, _)| *t == 0.0).count(),
        None => 0,
    };
    let window_end = last_start.iter().copied().min().unwrap_or(0);
    let mut started = vec![0u64; n];
    for (_, i) in &starts[window_start..=window_end] {
        started[jobs[*i].tenant] += jobs[*i].micros;
    }
    // First in, first out over the same window length (in dollars): arrival order.
    let window_total: u64 = started.iter().sum();
    let mut fifo = vec![0u64; n];
    let mut spent = 0;
    for (i, job) in jobs.iter().enumerate().skip(window_start) {
        if spent >= window_total {
            break;
        }
        let _ = i;
        fifo[job.tenant] += job.micros;
        spent += job.micros;
    }
    let weights: f64 = scenario.tenants.iter().map(|t| t.weight).sum();
    let tenants: Vec<TenantFigures> = scenario
        .tenants
        .iter()
        .enumerate()
        .map(|(t, plan)| TenantFigures {
            tenant: plan.name.clone(),
            weight: plan.weight,
            started_usd: started[t] as f64 / 1e6,
            share: started[t] as f64 / window_total.max(1) as f64,
            target: plan.weight / weights,
            fifo_usd: fifo[t] as f64 / 1e6,
        })
        .collect();
    let max_deviation_pct = tenants
        .iter()
        .map(|t| ((t.share - t.target) / t.target).abs() * 100.0)
        .fold(0.0, f64::max);

    // ETA: each tenant's jobs as one batch, sampled when a fraction of it is done, from what
    // the batch view would read then: every tenant's jobs left, runs held, runs ended and
    // their time, mean cost started.
    let mut start_of = vec![f64::INFINITY; jobs.len()];
    for (s, i) in &starts {
        start_of[*i] = *s;
    }
    let load_at = |at: f64| ProviderLoad {
        slots: args.slots,
        tenants: scenario
            .tenants
            .iter()
            .enumerate()
            .map(|(t, plan)| {
                let mine = (0..jobs.len()).filter(|i| jobs[*i].tenant == t);
                let (mut remaining, mut running, mut runs, mut run_ms) = (0, 0, 0, 0.0);
                let (mut started, mut started_micros) = (0u64, 0u64);
                for i in mine {
                    let begun = start_of[i] <= at;
                    if begun {
                        started += 1;
                        started_micros += jobs[i].micros;
                    }
                    if finished_at[i] <= at {
                        runs += 1;
                        run_ms += (finished_at[i] - start_of[i]) * 1000.0;
                    } else {
                        remaining += 1;
                        running += u64::from(begun);
                    }
                }
                TenantLoad {
                    tenant: plan.name.clone(),
                    weight: plan.weight,
                    max_concurrency: 0,
                    remaining,
                    running,
                    runs,
                    run_ms: run_ms as u64,
                    mean_micros: (started > 0).then(|| started_micros as f64 / started as f64),
                }
            })
            .collect(),
    };
    let mut eta = Vec::new();
    for (t, plan) in scenario.tenants.iter().enumerate() {
        let mine: Vec<usize> = (0..jobs.len()).filter(|i| jobs[*i].tenant == t).collect();
        let real_finish = mine.iter().map(|i| finished_at[*i]).fold(0.0, f64::max);
        let mut ends: Vec<f64> = mine.iter().map(|i| finished_at[*i]).collect();
        ends.sort_by(f64::total_cmp);
        for fraction in [0.10, 0.25, 0.50, 0.75] {
            let k = ((fraction * mine.len() as f64).ceil() as usize).max(1);
            let at = ends[k - 1];
            let provider = load_at(at);
            let own = &provider.tenants[t];
            let estimate = BatchEta::estimate(EtaInputs {
                remaining: own.remaining,
                running: own.running,
                runs: own.runs,
                run_ms: own.run_ms,
                remaining_micros: 0,
                now_ms: 0,
                tenant: &plan.name,
                provider: Some(&provider),
                paused: false,
            });
            if let Some(secs) = estimate.remaining_secs
                && real_finish > at
            {
                eta.push(EtaFigure {
                    tenant: plan.name.clone(),
                    at_done: fraction,
                    error_pct: ((secs - (real_finish - at)) / (real_finish - at)) * 100.0,
                });
            }
        }
    }
    let max_eta_error_pct = eta.iter().map(|e| e.error_pct.abs()).fold(0.0, f64::max);
    Ok(ScenarioFigures {
        scenario: scenario.name,
        window_usd: window_total as f64 / 1e6,
        max_deviation_pct,
        tenants,
        commands_per_decision: scheduler_commands as f64 / decisions.max(1) as f64,
        decisions_per_sec: decisions as f64 / elapsed.max(1e-9),
        makespan_virtual_secs: now,
        eta,
        max_eta_error_pct,
    })
}

async fn holders(queue: &Queue) -> anyhow::Result<BTreeSet<String>> {
    Ok(queue
        .slot_holders(PROVIDER_LIMIT)
        .await?
        .into_iter()
        .collect())
}

async fn command_total(queue: &Queue) -> anyhow::Result<u64> {
    Ok(queue
        .command_counters_per_node()
        .await?
        .iter()
        .map(|(_, c)| c.commands)
        .sum())
}

fn print_figures(scenario: &Scenario, f: &ScenarioFigures) {
    println!("scenario {}: {}", scenario.name, scenario.what);
    println!(
        "  while all waited: ${:.2} started; largest deviation from the weighted share {:.1} %",
        f.window_usd, f.max_deviation_pct
    );
    println!(
        "  {:<8} {:>6} {:>10} {:>7} {:>7} {:>10}",
        "tenant", "weight", "started", "share", "target", "FIFO"
    );
    for t in &f.tenants {
        println!(
            "  {:<8} {:>6} {:>10} {:>6.1}% {:>6.1}% {:>10}",
            t.tenant,
            t.weight,
            format!("${:.2}", t.started_usd),
            t.share * 100.0,
            t.target * 100.0,
            format!("${:.2}", t.fifo_usd)
        );
    }
    println!(
        "  scheduler: {:.1} Redis commands per slot decision, {:.0} decisions/s (wall); makespan {:.0} s (virtual)",
        f.commands_per_decision, f.decisions_per_sec, f.makespan_virtual_secs
    );
    let worst = |fraction: f64| {
        f.eta
            .iter()
            .filter(|e| (e.at_done - fraction).abs() < 1e-9)
            .map(|e| e.error_pct.abs())
            .fold(0.0, f64::max)
    };
    println!(
        "  batch ETA vs real finish (worst tenant): at 10 % done {:.0} %, 25 % {:.0} %, 50 % {:.0} %, 75 % {:.0} %",
        worst(0.10),
        worst(0.25),
        worst(0.50),
        worst(0.75)
    );
}

#[cfg(test)]
mod tests {
    //! The figures docs/benchmarks.md and the README state, on the real scheduler scripts
    //! (a real Redis) in virtual time: deterministic (seeded run times), no wall clock.
    use super::*;

    async fn figures(scenario: &str) -> ScenarioFigures {
        let mut settings = crate::settings::load_with(None, |_| None).unwrap();
        settings.queue.redis_url = klingq_testkit::redis::redis_url();
        let args = FairnessBenchArgs {
            slots: 4,
            scenario: Some(scenario.to_owned()),
            seed: 7,
        };
        let scenario = scenarios()
            .into_iter()
            .find(|s| s.name == scenario)
            .unwrap();
        run_scenario(&scenario, &args, &settings).await.unwrap()
    }

    #[tokio::test]
    async fn dollars_are_shared_by_weight_and_the_batch_eta_holds_within_a_quarter() {
        for scenario in ["1:1", "3:1", "10"] {
            let f = figures(scenario).await;
            assert!(
                f.max_deviation_pct <= 20.0,
                "{scenario}: dollars started {:.1} % off the weighted share",
                f.max_deviation_pct
            );
            // Every tenant's batch, sampled at 10, 25, 50 and 75 % done.
            let samples = f.eta.len();
            assert!(
                samples >= 4 * f.tenants.len() - 1,
                "{scenario}: {samples} samples"
            );
            for e in &f.eta {
                assert!(
                    e.error_pct.abs() <= 25.0,
                    "{scenario}: {}'s ETA at {:.0} % done off by {:.0} %",
                    e.tenant,
                    e.at_done * 100.0,
                    e.error_pct
                );
            }
        }
    }
}
