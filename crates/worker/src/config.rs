//! Worker settings. Every field has a default; `config/default.toml` documents them.

use std::collections::BTreeMap;
use std::time::Duration;

use klingq_core::TenantPolicy;

use serde::{Deserialize, Serialize};

/// How a worker process runs its pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// Jobs in flight per process. They mostly wait on the provider, so this can be high.
    pub concurrency: usize,
    /// Concurrent provider generations across all replicas (the account's limit), shared in
    /// Redis. It adapts down on 429 and recovers one slot per `throttle_recovery_secs`.
    pub provider_concurrency: u64,
    /// A slot held by a worker that stopped renewing it returns after this long.
    pub limit_lease_secs: u64,
    pub throttle_recovery_secs: u64,
    /// After a 402 (out of credit), submissions pause for this long, then one job probes.
    pub credit_pause_secs: u64,
    /// How long a job waits before checking again when the shared limit is full.
    pub limit_wait_secs: u64,
    /// Address of `/healthz` and `/readyz` (and `/metrics`). Empty to disable.
    pub health_bind: String,
    /// On SIGTERM/SIGINT, in-flight jobs get this long to reach a checkpoint and hand over.
    pub shutdown_grace_secs: u64,
    /// A job that has not finished this long after it was created fails (`DEADLINE_EXCEEDED`).
    pub job_deadline_secs: u64,
    /// Retries per step, each against its own budget, through the queue's delayed set.
    pub submit_retries: u32,
    /// New runs after the provider failed a run for its own reasons (failed runs are free).
    pub generate_retries: u32,
    pub download_retries: u32,
    /// Longest delay between step retries (exponential from 2 s, with jitter).
    pub max_retry_delay_secs: u64,
    /// Spending cap per UTC day in USD, on estimated cost at submit; 0 for none. Jobs over it
    /// wait (`scheduled`), they do not fail.
    pub daily_budget_usd: f64,
    /// How often a job waiting for a budget checks again.
    pub budget_wait_secs: u64,
    /// USD per second of video, for estimates (Kling v3 Pro on Runflow: 0.14).
    pub usd_per_second: f64,
    /// The settings file's tenant policies (`[tenants.NAME]`); the API's override them.
    pub tenants: BTreeMap<String, TenantPolicy>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            concurrency: 64,
            provider_concurrency: 10,
            limit_lease_secs: 120,
            throttle_recovery_secs: 30,
            credit_pause_secs: 60,
            limit_wait_secs: 5,
            health_bind: "127.0.0.1:9090".to_owned(),
            shutdown_grace_secs: 25,
            job_deadline_secs: 30 * 60,
            submit_retries: 8,
            generate_retries: 2,
            download_retries: 8,
            max_retry_delay_secs: 300,
            daily_budget_usd: 0.0,
            budget_wait_secs: 300,
            usd_per_second: 0.14,
            tenants: BTreeMap::new(),
        }
    }
}

impl WorkerConfig {
    pub fn limit_lease(&self) -> Duration {
        Duration::from_secs(self.limit_lease_secs.max(1))
    }

    /// Delay before retry number `n` (1-based) of a step: 2 s doubling, full jitter over the
    /// upper half, capped.
    pub fn retry_delay(&self, n: u32) -> Duration {
        let ceiling = 2_000u64
            .saturating_mul(1 << n.saturating_sub(1).min(16))
            .min(self.max_retry_delay_secs.max(1) * 1000);
        Duration::from_millis(rand::random_range(ceiling / 2..=ceiling))
    }
}
