//! Tenants in Redis: the policies operators set through the API (`{ns}:tenants`, overriding
//! the settings file's) and each tenant's usage, read from the counters the scripts keep
//! (enqueued, re-driven and finished per outcome in each partition's stats hash, provider
//! slots and dollars started in the shared limit's fair-share hash, spend per UTC day).

use std::collections::BTreeMap;

use klingq_core::TenantPolicy;

use crate::error::QueueError;
use crate::keys::day_stamp;
use crate::queue::Queue;

/// The shared limit whose fair share and in-flight counts the usage reports.
pub const PROVIDER_LIMIT: &str = "provider";

/// The outcomes a tenant's finished jobs are counted under.
pub const TENANT_OUTCOMES: [&str; 4] = ["succeeded", "failed", "cancelled", "dead"];

/// What one tenant uses now and used today.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TenantUsage {
    pub tenant: String,
    /// Jobs enqueued, ever (within the counters' life).
    pub enqueued: u64,
    /// Jobs re-driven after dying or failing.
    pub redriven: u64,
    /// Jobs finished per outcome (`succeeded`, `failed`, `cancelled`, `dead`).
    pub finished: BTreeMap<String, u64>,
    /// Provider runs the tenant holds now, across replicas.
    pub in_flight: u64,
    /// The tenant's jobs waiting for a provider slot.
    pub waiting_for_slot: u64,
    /// Estimated micro-dollars of the runs the tenant started at the provider.
    pub started_micros: u64,
    /// The tenant's runs that ended, and their summed time from create to end (ms).
    pub runs: u64,
    pub run_ms: u64,
    /// Estimated spend reserved today (UTC), against the tenant's daily budget.
    pub reserved_today_micros: u64,
    /// What the provider charged for the tenant's jobs that finished today (UTC).
    pub charged_today_micros: u64,
}

impl TenantUsage {
    /// Jobs neither finished nor dead: enqueued plus re-driven, less finished.
    pub fn active(&self) -> u64 {
        (self.enqueued + self.redriven).saturating_sub(self.finished.values().sum())
    }
}

impl Queue {
    /// The tenant policies operators set through the API (name to policy). An entry that no
    /// longer parses (written by another release) is skipped with a warning.
    pub async fn tenant_policies(&self) -> Result<BTreeMap<String, TenantPolicy>, QueueError> {
        let raw: BTreeMap<String, String> = self
            .query(redis::cmd("HGETALL").arg(self.keys().tenants()))
            .await?;
        let mut policies = BTreeMap::new();
        for (name, json) in raw {
            match serde_json::from_str::<TenantPolicy>(&json) {
                Ok(policy) => {
                    policies.insert(name, policy);
                }
                Err(error) => {
                    tracing::warn!(tenant = name, %error, "a stored tenant policy does not parse; the file's applies")
                }
            }
        }
        Ok(policies)
    }

    /// Sets the policy of `name` for every process (they read it within their cache time).
    pub async fn set_tenant_policy(
        &self,
        name: &str,
        policy: &TenantPolicy,
    ) -> Result<(), QueueError> {
        let json = serde_json::to_string(policy)?;
        let _: i64 = self
            .query(
                redis::cmd("HSET")
                    .arg(self.keys().tenants())
                    .arg(name)
                    .arg(json),
            )
            .await?;
        Ok(())
    }

    /// Removes the API's policy of `name` (the settings file's applies again); whether there
    /// was one.
    pub async fn remove_tenant_policy(&self, name: &str) -> Result<bool, QueueError> {
        let removed: i64 = self
            .query(redis::cmd("HDEL").arg(self.keys().tenants()).arg(name))
            .await?;
        Ok(removed == 1)
    }

    /// Every tenant that has had a job, with its usage, by name.
    pub async fn tenant_usage(&self) -> Result<Vec<TenantUsage>, QueueError> {
        let queue = &self.config().queue;
        let day = day_stamp(time::OffsetDateTime::now_utc().date());
        let mut by_name: BTreeMap<String, TenantUsage> = BTreeMap::new();
        let entry = |by_name: &mut BTreeMap<String, TenantUsage>, name: &str| {
            by_name
                .entry(name.to_owned())
                .or_insert_with(|| TenantUsage {
                    tenant: name.to_owned(),
                    ..TenantUsage::default()
                })
                .tenant
                .clone()
        };
        for (_, keys) in self.partitions().all() {
            let mut pipe = redis::pipe();
            pipe.cmd("HGETALL").arg(keys.stats(queue));
            pipe.cmd("HGETALL").arg(keys.tenant_charged(&day));
            let (stats, charged): (BTreeMap<String, i64>, BTreeMap<String, i64>) =
                self.query_pipe(&pipe).await?;
            for (field, value) in stats {
                let Some(rest) = field.strip_prefix("t:") else {
                    continue;
                };
                let Some((tenant, counter)) = rest.split_once(':') else {
                    continue;
                };
                let value = value.max(0) as u64;
                let name = entry(&mut by_name, tenant);
                let usage = by_name.get_mut(&name).expect("just inserted");
                match counter {
                    "enqueued" => usage.enqueued += value,
                    "redriven" => usage.redriven += value,
                    "runs" => usage.runs += value,
                    "run_ms" => usage.run_ms += value,
                    other => {
                        if let Some(outcome) = other.strip_prefix("finished:") {
                            *usage.finished.entry(outcome.to_owned()).or_default() += value;
                        }
                    }
                }
            }
            for (tenant, micros) in charged {
                let name = entry(&mut by_name, &tenant);
                by_name
                    .get_mut(&name)
                    .expect("just inserted")
                    .charged_today_micros += micros.max(0) as u64;
            }
        }
        let keys = self.keys();
        let mut pipe = redis::pipe();
        pipe.cmd("HGETALL").arg(keys.limit_fair(PROVIDER_LIMIT));
        pipe.cmd("HGETALL").arg(keys.tenant_day(&day));
        let (fair, reserved): (BTreeMap<String, String>, BTreeMap<String, i64>) =
            self.query_pipe(&pipe).await?;
        for (field, value) in fair {
            let Some((kind, tenant)) = field.split_once(':') else {
                continue;
            };
            let value: u64 = value.parse::<i64>().unwrap_or(0).max(0) as u64;
            match kind {
                "inflight" => {
                    let name = entry(&mut by_name, tenant);
                    by_name.get_mut(&name).expect("just inserted").in_flight = value;
                }
                "started" => {
                    let name = entry(&mut by_name, tenant);
                    by_name
                        .get_mut(&name)
                        .expect("just inserted")
                        .started_micros = value;
                }
                _ => {}
            }
        }
        for (tenant, micros) in reserved {
            let name = entry(&mut by_name, &tenant);
            by_name
                .get_mut(&name)
                .expect("just inserted")
                .reserved_today_micros = micros.max(0) as u64;
        }
        let names: Vec<String> = by_name.keys().cloned().collect();
        let mut pipe = redis::pipe();
        for name in &names {
            pipe.cmd("ZCARD")
                .arg(keys.limit_waiting(PROVIDER_LIMIT, name));
        }
        if !names.is_empty() {
            let waiting: Vec<u64> = self.query_pipe(&pipe).await?;
            for (name, n) in names.iter().zip(waiting) {
                by_name.get_mut(name).expect("listed").waiting_for_slot = n;
            }
        }
        Ok(by_name.into_values().collect())
    }
}
