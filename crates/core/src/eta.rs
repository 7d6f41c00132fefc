//! A batch's estimated finish. With the provider's load known (its slots and every tenant's
//! jobs left, weights, caps, measured run times and costs), the estimate plays the fair share
//! forward ([`crate::eta`]'s simulation: the same start-time fair queueing by dollars the
//! queue's scheduler runs, over mean run times), so a batch whose share grows when another
//! tenant's work ends is estimated with that growth. Without it, the batch is assumed to keep
//! the slots it holds now. An estimate either way, and labelled one wherever it is shown.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use serde::{Deserialize, Serialize};

/// One tenant's load on the provider, as the fair share sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantLoad {
    pub tenant: String,
    /// Its weight (a non-positive weight counts as 1, as in the scheduler).
    pub weight: f64,
    /// Its own cap on provider runs at once (0: none).
    pub max_concurrency: u64,
    /// Jobs not finished, the running ones included.
    pub remaining: u64,
    /// Jobs holding a provider slot now.
    pub running: u64,
    /// Its runs that ended, and their summed time from create to end (ms).
    pub runs: u64,
    pub run_ms: u64,
    /// The mean estimated cost of its runs (micro-dollars), when known.
    pub mean_micros: Option<f64>,
}

/// The provider's slots and every tenant with jobs left.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ProviderLoad {
    /// Provider runs at once (the shared limit). Fewer than the runs held now counts as those.
    pub slots: u64,
    pub tenants: Vec<TenantLoad>,
}

/// What the estimate is made from.
#[derive(Debug, Clone, PartialEq)]
pub struct EtaInputs<'a> {
    /// The batch is paused: its waiting jobs are not submitted, so there is no finish time.
    pub paused: bool,
    /// Jobs not yet finished.
    pub remaining: u64,
    /// The batch's jobs holding a provider slot now (submitting or generating).
    pub running: u64,
    /// The batch's runs that ended, and their summed time from create to end (ms).
    pub runs: u64,
    pub run_ms: u64,
    /// The estimated cost of the jobs left (micro-dollars).
    pub remaining_micros: u64,
    /// Now, ms since the epoch.
    pub now_ms: u64,
    /// The batch's tenant.
    pub tenant: &'a str,
    /// The provider's load, when known.
    pub provider: Option<&'a ProviderLoad>,
}

/// An estimated finish.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchEta {
    /// Always `true`: this is an estimate.
    pub estimate: bool,
    /// Seconds until the last job is expected to finish (`None` until a run of the batch
    /// ended, or while none of its jobs holds a slot and the provider's load is unknown).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remaining_secs: Option<f64>,
    /// When, ms since the epoch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finish_at_ms: Option<u64>,
    /// The estimated spend of the jobs left, in USD.
    pub remaining_usd: f64,
    /// What the time rests on: the mean run time (s) and the slots the batch holds now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mean_run_secs: Option<f64>,
    pub slots_now: u64,
    /// `fair_share` when the provider's load was played forward, `slots_now` when the batch
    /// was assumed to keep the slots it holds.
    pub basis: EtaBasis,
}

/// What an estimate's time rests on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EtaBasis {
    /// The fair share played forward over every tenant's jobs left.
    FairShare,
    /// The slots the batch holds now, kept to the end.
    SlotsNow,
    /// The batch is paused (its failure guard tripped): no finish until it is resumed.
    Paused,
}

impl EtaBasis {
    pub fn as_str(self) -> &'static str {
        match self {
            EtaBasis::FairShare => "fair_share",
            EtaBasis::SlotsNow => "slots_now",
            EtaBasis::Paused => "paused",
        }
    }
}

impl BatchEta {
    /// The estimate: the fair share played forward when the provider's load is known (see
    /// [`simulate`]); otherwise the running jobs end in half a mean run on average and the
    /// jobs not yet started go through the slots the batch holds now, one mean run each.
    pub fn estimate(inputs: EtaInputs<'_>) -> BatchEta {
        let remaining_usd = inputs.remaining_micros as f64 / 1e6;
        let mean_ms = (inputs.runs > 0).then(|| inputs.run_ms as f64 / inputs.runs as f64);
        let simulated = match (mean_ms, inputs.provider) {
            _ if inputs.paused && inputs.remaining > 0 => None,
            (Some(mean), Some(provider)) if inputs.remaining > 0 => {
                simulate(&inputs, mean, provider).map(|ms| (ms, EtaBasis::FairShare))
            }
            _ => None,
        };
        let time = simulated.or_else(|| {
            let basis = EtaBasis::SlotsNow;
            match mean_ms {
                _ if inputs.paused && inputs.remaining > 0 => None,
                _ if inputs.remaining == 0 => Some((0.0, basis)),
                Some(mean) if inputs.running > 0 => {
                    let running = inputs.running.min(inputs.remaining);
                    let waiting = (inputs.remaining - running) as f64;
                    Some((mean / 2.0 + waiting * mean / inputs.running as f64, basis))
                }
                _ => None,
            }
        });
        BatchEta {
            estimate: true,
            remaining_secs: time.map(|(ms, _)| (ms / 1000.0 * 10.0).round() / 10.0),
            finish_at_ms: time.map(|(ms, _)| inputs.now_ms + ms.round() as u64),
            remaining_usd: (remaining_usd * 100.0).round() / 100.0,
            mean_run_secs: mean_ms.map(|ms| (ms / 100.0).round() / 10.0),
            slots_now: inputs.running,
            basis: match time {
                Some((_, basis)) => basis,
                None if inputs.paused => EtaBasis::Paused,
                None => EtaBasis::SlotsNow,
            },
        }
    }
}

/// Upper bound on the work of one simulation (run starts × tenants); past it the batch's
/// rate so far is extrapolated.
const MAX_WORK: u64 = 4_000_000;

/// One group of like jobs in the simulation: the batch, the rest of its tenant's jobs, or
/// another tenant's.
#[derive(Debug)]
struct Stream {
    tenant: usize,
    waiting: u64,
    running: u64,
    run_ms: f64,
    total: u64,
    started: u64,
}

#[derive(Debug)]
struct SimTenant {
    weight: f64,
    cap: u64,
    micros: f64,
    running: u64,
    /// Virtual time: micro-dollars started over weight.
    vt: f64,
    streams: Vec<usize>,
}

/// Plays the fair share forward: every tenant's jobs left start, one mean run each, in the
/// order the scheduler would give them slots (the lowest virtual time of dollars started over
/// weight among the tenants that wait and are below their own cap; within the batch's tenant
/// its jobs and the others' alternate in proportion). The jobs running now end spread over
/// one mean run. Returns the ms until the batch's last job ends.
///
/// A tenant with no measured run gets the run time the measured tenants' runs predict for
/// its cost (a line fitted through their mean cost and mean time, weighted by runs), or their
/// mean when they do not span two costs.
fn simulate(inputs: &EtaInputs<'_>, batch_mean_ms: f64, provider: &ProviderLoad) -> Option<f64> {
    let mut loads: Vec<TenantLoad> = provider.tenants.clone();
    let own = match loads.iter().position(|t| t.tenant == inputs.tenant) {
        Some(own) => own,
        None => {
            loads.push(TenantLoad {
                tenant: inputs.tenant.to_owned(),
                weight: 1.0,
                max_concurrency: 0,
                remaining: inputs.remaining,
                running: inputs.running,
                runs: inputs.runs,
                run_ms: inputs.run_ms,
                mean_micros: (inputs.remaining > 0)
                    .then(|| inputs.remaining_micros as f64 / inputs.remaining as f64),
            });
            loads.len() - 1
        }
    };
    let run_time = RunTimeModel::fit(&loads, batch_mean_ms);
    let known_micros: Vec<f64> = loads.iter().filter_map(|t| t.mean_micros).collect();
    let fallback_micros = if known_micros.is_empty() {
        1.0
    } else {
        known_micros.iter().sum::<f64>() / known_micros.len() as f64
    };

    let mut tenants = Vec::with_capacity(loads.len());
    let mut streams: Vec<Stream> = Vec::with_capacity(loads.len() + 1);
    let batch_running = inputs.running.min(inputs.remaining);
    let batch_waiting = inputs.remaining - batch_running;
    for (i, load) in loads.iter().enumerate() {
        let micros = load
            .mean_micros
            .filter(|m| *m > 0.0)
            .unwrap_or(fallback_micros);
        let tenant_mean = run_time.predict(load, micros);
        let mut own_streams = Vec::new();
        let (waiting, running) = (
            load.remaining.saturating_sub(load.running),
            load.running.min(load.remaining),
        );
        if i == own {
            own_streams.push(streams.len());
            streams.push(Stream {
                tenant: i,
                waiting: batch_waiting,
                running: batch_running,
                run_ms: batch_mean_ms,
                total: inputs.remaining,
                started: 0,
            });
            let rest_waiting = waiting.saturating_sub(batch_waiting);
            let rest_running = running.saturating_sub(batch_running);
            if rest_waiting + rest_running > 0 {
                own_streams.push(streams.len());
                streams.push(Stream {
                    tenant: i,
                    waiting: rest_waiting,
                    running: rest_running,
                    run_ms: if load.runs > 0 {
                        tenant_mean
                    } else {
                        batch_mean_ms
                    },
                    total: rest_waiting + rest_running,
                    started: 0,
                });
            }
        } else if waiting + running > 0 {
            own_streams.push(streams.len());
            streams.push(Stream {
                tenant: i,
                waiting,
                running,
                run_ms: tenant_mean,
                total: waiting + running,
                started: 0,
            });
        }
        tenants.push(SimTenant {
            weight: if load.weight > 0.0 { load.weight } else { 1.0 },
            cap: load.max_concurrency,
            micros,
            running: 0,
            vt: 0.0,
            streams: own_streams,
        });
    }
    let batch = tenants[own].streams[0];

    // The runs held now end spread over one mean run each.
    let mut ends: BinaryHeap<Reverse<(u64, usize)>> = BinaryHeap::new();
    let mut in_use = 0u64;
    for (s, stream) in streams.iter().enumerate() {
        let n = stream.running;
        for k in 0..n {
            let end = stream.run_ms * (k as f64 + 0.5) / n as f64;
            ends.push(Reverse((end.round() as u64, s)));
        }
        tenants[stream.tenant].running += n;
        in_use += n;
    }
    let slots = provider.slots.max(in_use);
    if slots == 0 {
        return None;
    }
    let mut sim = Sim {
        tenants,
        streams,
        ends,
        in_use,
        slots,
        v: 0.0,
        starts: 0,
    };
    let max_starts = (MAX_WORK / sim.tenants.len().max(1) as u64).max(1_000);
    sim.grant(0);
    while let Some(Reverse((now, s))) = sim.ends.pop() {
        sim.streams[s].running -= 1;
        sim.tenants[sim.streams[s].tenant].running -= 1;
        sim.in_use -= 1;
        let b = &sim.streams[batch];
        if b.waiting == 0 && b.running == 0 {
            return Some(now as f64);
        }
        if sim.starts >= max_starts {
            // Extrapolate the batch's rate of starts so far.
            let b = &sim.streams[batch];
            let started = b.started.max(1) as f64;
            return Some(now as f64 + b.waiting as f64 * now as f64 / started + b.run_ms);
        }
        sim.grant(now);
    }
    None
}

struct Sim {
    tenants: Vec<SimTenant>,
    streams: Vec<Stream>,
    ends: BinaryHeap<Reverse<(u64, usize)>>,
    in_use: u64,
    slots: u64,
    /// The virtual start of the last run started.
    v: f64,
    starts: u64,
}

impl Sim {
    /// Hands the free slots out in fair order at `now`.
    fn grant(&mut self, now: u64) {
        while self.in_use < self.slots {
            let picked = self
                .tenants
                .iter()
                .enumerate()
                .filter(|(_, t)| {
                    (t.cap == 0 || t.running < t.cap)
                        && t.streams.iter().any(|s| self.streams[*s].waiting > 0)
                })
                .min_by(|(_, a), (_, b)| a.vt.max(self.v).total_cmp(&b.vt.max(self.v)))
                .map(|(i, _)| i);
            let Some(t) = picked else { return };
            let tenant = &mut self.tenants[t];
            let Some(s) = tenant
                .streams
                .iter()
                .copied()
                .filter(|s| self.streams[*s].waiting > 0)
                .min_by(|a, b| {
                    let done = |s: &Stream| s.started as f64 / s.total.max(1) as f64;
                    done(&self.streams[*a]).total_cmp(&done(&self.streams[*b]))
                })
            else {
                return;
            };
            let start = tenant.vt.max(self.v);
            tenant.vt = start + tenant.micros / tenant.weight;
            tenant.running += 1;
            self.v = start;
            let stream = &mut self.streams[s];
            stream.waiting -= 1;
            stream.running += 1;
            stream.started += 1;
            self.in_use += 1;
            self.starts += 1;
            self.ends
                .push(Reverse((now + stream.run_ms.round() as u64, s)));
        }
    }
}

/// Run time for a tenant: its own measured mean, else what the measured tenants predict for
/// its cost.
struct RunTimeModel {
    /// `time = intercept + slope × micros`, when the measured tenants span two costs.
    line: Option<(f64, f64)>,
    mean: f64,
}

impl RunTimeModel {
    fn fit(loads: &[TenantLoad], fallback_ms: f64) -> RunTimeModel {
        let points: Vec<(f64, f64, f64)> = loads
            .iter()
            .filter(|t| t.runs > 0)
            .filter_map(|t| {
                t.mean_micros
                    .map(|m| (m, t.run_ms as f64 / t.runs as f64, t.runs as f64))
            })
            .collect();
        let runs: u64 = loads.iter().map(|t| t.runs).sum();
        let mean = if runs > 0 {
            loads.iter().map(|t| t.run_ms).sum::<u64>() as f64 / runs as f64
        } else {
            fallback_ms
        };
        let weight: f64 = points.iter().map(|p| p.2).sum();
        let line = (points.len() >= 2).then(|| {
            let mx = points.iter().map(|p| p.0 * p.2).sum::<f64>() / weight;
            let my = points.iter().map(|p| p.1 * p.2).sum::<f64>() / weight;
            let sxx: f64 = points.iter().map(|p| p.2 * (p.0 - mx).powi(2)).sum();
            let sxy: f64 = points.iter().map(|p| p.2 * (p.0 - mx) * (p.1 - my)).sum();
            (sxx > 0.0 && sxy >= 0.0).then(|| {
                let slope = sxy / sxx;
                (my - slope * mx, slope)
            })
        });
        RunTimeModel {
            line: line.flatten(),
            mean,
        }
    }

    fn predict(&self, load: &TenantLoad, micros: f64) -> f64 {
        if load.runs > 0 {
            return load.run_ms as f64 / load.runs as f64;
        }
        match self.line {
            Some((intercept, slope)) => (intercept + slope * micros).max(1.0),
            None => self.mean,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(remaining: u64, running: u64, runs: u64, run_ms: u64) -> EtaInputs<'static> {
        EtaInputs {
            remaining,
            running,
            runs,
            run_ms,
            remaining_micros: 1_400_000,
            now_ms: 1_000,
            tenant: "default",
            provider: None,
            paused: false,
        }
    }

    #[test]
    fn a_paused_batch_has_no_finish_time() {
        let provider = ProviderLoad {
            slots: 4,
            tenants: vec![load("default", 12, 0, 10, 60_000)],
        };
        let eta = BatchEta::estimate(EtaInputs {
            paused: true,
            provider: Some(&provider),
            ..inputs(12, 0, 10, 600_000)
        });
        assert_eq!((eta.remaining_secs, eta.basis), (None, EtaBasis::Paused));
        assert_eq!(eta.remaining_usd, 1.4);
    }

    fn load(tenant: &str, remaining: u64, running: u64, runs: u64, mean_ms: u64) -> TenantLoad {
        TenantLoad {
            tenant: tenant.to_owned(),
            weight: 1.0,
            max_concurrency: 0,
            remaining,
            running,
            runs,
            run_ms: runs * mean_ms,
            mean_micros: Some(1_400_000.0),
        }
    }

    #[test]
    fn jobs_left_go_through_the_slots_held_now_at_the_mean_run_time() {
        // 10 runs of 60 s each; 4 running and 8 waiting on 4 slots: 30 s + 2 rounds of 60 s.
        let eta = BatchEta::estimate(inputs(12, 4, 10, 600_000));
        assert_eq!(eta.remaining_secs, Some(150.0));
        assert_eq!(eta.finish_at_ms, Some(151_000));
        assert_eq!(eta.mean_run_secs, Some(60.0));
        assert_eq!(eta.remaining_usd, 1.4);
        assert_eq!(eta.basis, EtaBasis::SlotsNow);
        assert!(eta.estimate);
    }

    #[test]
    fn no_time_without_a_measured_run_or_a_slot_and_zero_when_done() {
        assert_eq!(BatchEta::estimate(inputs(5, 2, 0, 0)).remaining_secs, None);
        assert_eq!(
            BatchEta::estimate(inputs(5, 0, 3, 9_000)).remaining_secs,
            None
        );
        assert_eq!(
            BatchEta::estimate(inputs(0, 0, 3, 9_000)).remaining_secs,
            Some(0.0)
        );
    }

    #[test]
    fn alone_on_the_provider_the_simulation_agrees_with_the_slots_held() {
        // 4 slots, 4 running (ending at 7.5, 22.5, 37.5, 52.5 s), 8 waiting: the last two
        // rounds of 60 s follow the last of the running ones' slots.
        let provider = ProviderLoad {
            slots: 4,
            tenants: vec![load("default", 12, 4, 10, 60_000)],
        };
        let eta = BatchEta::estimate(EtaInputs {
            provider: Some(&provider),
            ..inputs(12, 4, 10, 600_000)
        });
        assert_eq!(eta.basis, EtaBasis::FairShare);
        assert_eq!(eta.remaining_secs, Some(172.5));
    }

    #[test]
    fn the_share_grows_when_the_other_tenant_runs_out() {
        // 4 slots; A's batch holds 2, B holds 2 and has 2 more; A has 20 left in all. While
        // B waits A gets half; once B is done A gets all four: sooner than at 2 slots to the end.
        let provider = ProviderLoad {
            slots: 4,
            tenants: vec![load("a", 20, 2, 5, 60_000), load("b", 4, 2, 5, 60_000)],
        };
        let with = BatchEta::estimate(EtaInputs {
            tenant: "a",
            provider: Some(&provider),
            ..inputs(20, 2, 5, 300_000)
        });
        let without = BatchEta::estimate(EtaInputs {
            tenant: "a",
            ..inputs(20, 2, 5, 300_000)
        });
        let (with, without) = (
            with.remaining_secs.unwrap(),
            without.remaining_secs.unwrap(),
        );
        assert!(
            with < without * 0.8,
            "{with} s with the share, {without} s without"
        );
        // 24 jobs of 60 s on 4 slots: about six rounds.
        assert!((330.0..=420.0).contains(&with), "{with}");
    }

    #[test]
    fn weights_and_caps_hold_in_the_simulation() {
        let mut heavy = load("heavy", 40, 0, 4, 60_000);
        heavy.weight = 3.0;
        let light = load("light", 40, 0, 4, 60_000);
        let provider = ProviderLoad {
            slots: 4,
            tenants: vec![heavy, light],
        };
        let eta = |tenant: &str, provider: &ProviderLoad| {
            BatchEta::estimate(EtaInputs {
                tenant,
                provider: Some(provider),
                ..inputs(40, 0, 4, 240_000)
            })
            .remaining_secs
            .unwrap()
        };
        // Heavy gets three slots of four while both wait: done in about 40 / 3 rounds.
        let h = eta("heavy", &provider);
        assert!((780.0..=900.0).contains(&h), "{h}");
        // Capped at one run at once, heavy takes 40 rounds whatever its weight.
        let mut capped = provider.clone();
        capped.tenants[0].max_concurrency = 1;
        assert_eq!(eta("heavy", &capped), 2400.0);
    }

    #[test]
    fn a_tenant_never_measured_gets_the_run_time_its_cost_predicts() {
        let mut cheap = load("cheap", 1, 0, 10, 84_000);
        cheap.mean_micros = Some(420_000.0);
        let mut dear = load("dear", 1, 0, 10, 180_000);
        dear.mean_micros = Some(2_100_000.0);
        let mut new = load("new", 1, 0, 0, 0);
        new.mean_micros = Some(1_260_000.0);
        let model = RunTimeModel::fit(&[cheap, dear], 1.0);
        let predicted = model.predict(&new, 1_260_000.0);
        assert!((predicted - 132_000.0).abs() < 1.0, "{predicted}");
    }
}
