//! Tenants as the producer sees them: which policy applies to a tenant (the API's, set with
//! `PUT /v1/tenants/{name}`, over the settings file's), the priority cap applied at enqueue,
//! and each tenant's usage as users see it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use klingq_core::TenantPolicy;
use klingq_core::tenant::{DEFAULT_TENANT, check_tenant_name, resolve_policy};

use crate::error::ProducerError;
use crate::producer::Producer;
use crate::view::{TenantCounts, TenantPolicyView, TenantSpend, TenantView};

/// How long the API's policies are kept before they are read again.
const REFRESH: Duration = Duration::from_secs(10);

/// Policies by tenant name.
type Policies = Arc<BTreeMap<String, TenantPolicy>>;

/// The settings file's policies and a cache of the API's.
#[derive(Debug, Clone, Default)]
pub(crate) struct TenantPolicies {
    pub(crate) file: Policies,
    cache: Arc<Mutex<Option<(Instant, Policies)>>>,
}

/// The policies in force at one moment.
pub(crate) struct PolicySnapshot {
    overrides: Policies,
    file: Policies,
}

impl PolicySnapshot {
    pub(crate) fn policy(&self, tenant: &str) -> TenantPolicy {
        resolve_policy(tenant, &self.overrides, &self.file)
    }

    /// Where `tenant`'s policy comes from: `api`, `file` or `default`.
    fn source(&self, tenant: &str) -> &'static str {
        if self.overrides.contains_key(tenant) {
            "api"
        } else if self.file.contains_key(tenant) {
            "file"
        } else if self.overrides.contains_key(DEFAULT_TENANT) {
            "api"
        } else if self.file.contains_key(DEFAULT_TENANT) {
            "file"
        } else {
            "default"
        }
    }
}

impl TenantPolicies {
    pub(crate) fn new(file: BTreeMap<String, TenantPolicy>) -> Self {
        Self {
            file: Arc::new(file),
            cache: Arc::default(),
        }
    }

    fn forget(&self) {
        *self.cache.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

impl Producer {
    /// The policies in force now (the API's read at most every 10 s).
    pub(crate) async fn policy_snapshot(&self) -> Result<PolicySnapshot, ProducerError> {
        let policies = self.tenant_policies();
        let cached = policies
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let overrides = match cached {
            Some((read_at, overrides)) if read_at.elapsed() < REFRESH => overrides,
            _ => {
                let fresh = Arc::new(self.queue().tenant_policies().await?);
                *policies.cache.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some((Instant::now(), fresh.clone()));
                fresh
            }
        };
        Ok(PolicySnapshot {
            overrides,
            file: policies.file.clone(),
        })
    }

    /// Every tenant that has had a job, and every tenant with a policy, by name.
    pub async fn tenants(&self) -> Result<Vec<TenantView>, ProducerError> {
        let snapshot = self.policy_snapshot().await?;
        let mut usage: BTreeMap<String, klingq_queue::TenantUsage> = self
            .queue()
            .tenant_usage()
            .await?
            .into_iter()
            .map(|u| (u.tenant.clone(), u))
            .collect();
        for name in snapshot.overrides.keys().chain(snapshot.file.keys()) {
            usage
                .entry(name.clone())
                .or_insert_with(|| klingq_queue::TenantUsage {
                    tenant: name.clone(),
                    ..Default::default()
                });
        }
        Ok(usage.into_values().map(|u| view(&snapshot, u)).collect())
    }

    /// One tenant (zero usage when it never had a job).
    pub async fn tenant(&self, name: &str) -> Result<TenantView, ProducerError> {
        check_name(name)?;
        let snapshot = self.policy_snapshot().await?;
        let usage = self
            .queue()
            .tenant_usage()
            .await?
            .into_iter()
            .find(|u| u.tenant == name)
            .unwrap_or_else(|| klingq_queue::TenantUsage {
                tenant: name.to_owned(),
                ..Default::default()
            });
        Ok(view(&snapshot, usage))
    }

    /// Sets `name`'s policy for every process (they apply it within 10 s).
    pub async fn set_tenant_policy(
        &self,
        name: &str,
        policy: TenantPolicy,
    ) -> Result<TenantView, ProducerError> {
        check_name(name)?;
        policy.validate().map_err(ProducerError::Invalid)?;
        self.queue().set_tenant_policy(name, &policy).await?;
        self.tenant_policies().forget();
        self.tenant(name).await
    }
}

fn check_name(name: &str) -> Result<(), ProducerError> {
    check_tenant_name(name).map_err(|(rule, message)| {
        let mut errors = klingq_core::ValidationErrors::default();
        errors.push("name", rule, message);
        ProducerError::Invalid(errors)
    })
}

fn usd(micros: u64) -> f64 {
    klingq_core::cost::micros_to_usd(micros)
}

fn view(snapshot: &PolicySnapshot, usage: klingq_queue::TenantUsage) -> TenantView {
    let finished = |state: &str| usage.finished.get(state).copied().unwrap_or(0);
    TenantView {
        policy: TenantPolicyView::from(snapshot.policy(&usage.tenant)),
        source: snapshot.source(&usage.tenant).to_owned(),
        counts: TenantCounts {
            enqueued: usage.enqueued,
            succeeded: finished("succeeded"),
            failed: finished("failed"),
            cancelled: finished("cancelled"),
            dead: finished("dead"),
            active: usage.active(),
        },
        in_flight: usage.in_flight,
        waiting_for_slot: usage.waiting_for_slot,
        started_usd: usd(usage.started_micros),
        spend_today: TenantSpend {
            estimated_usd: usd(usage.reserved_today_micros),
            charged_usd: usd(usage.charged_today_micros),
        },
        tenant: usage.tenant,
    }
}

/// Tenants with a label of their own in the API's metrics; the rest are summed under
/// [`OTHER_TENANTS`].
pub const MAX_TENANT_LABELS: usize = 20;

/// The `tenant` label of the tenants past [`MAX_TENANT_LABELS`], summed (a tenant named
/// `_other` is summed there too when there is such a remainder).
pub const OTHER_TENANTS: &str = "_other";

/// The API's per-tenant metrics of one scrape, read from Redis:
/// `klingq_tenant_in_flight{tenant}`, `klingq_tenant_jobs{tenant,state}` (state `active`,
/// `succeeded`, `failed`, `cancelled`, `dead`) and
/// `klingq_tenant_spend_today_usd{tenant,kind}` (kind `estimated`, `charged`), for the
/// [`MAX_TENANT_LABELS`] most active tenants (by provider runs in flight, then jobs enqueued)
/// and the rest summed under `tenant="_other"`.
#[derive(Debug)]
pub struct TenantMetrics {
    families: Vec<klingq_queue::metrics::Sampled>,
}

impl TenantMetrics {
    /// Adds these metrics to `registry` (a scrape's own).
    pub fn register(self, registry: &mut prometheus_client::registry::Registry) {
        for family in self.families {
            registry.register_collector(Box::new(family));
        }
    }
}

impl Producer {
    /// The provider's load now, as the batch ETA plays the fair share forward: the live cap
    /// of the shared provider limit (the configured slots, lowered while the provider
    /// throttles) and every tenant with jobs left, with its policy in force, the runs it
    /// holds, its runs' measured times and its mean cost started.
    pub async fn provider_load(&self) -> Result<klingq_core::ProviderLoad, ProducerError> {
        let queue = self.queue();
        let (usage, policies, (_, slots)) = tokio::try_join!(
            async { Ok::<_, ProducerError>(queue.tenant_usage().await?) },
            self.policy_snapshot(),
            async {
                Ok::<_, ProducerError>(
                    queue
                        .slot_usage(klingq_queue::PROVIDER_LIMIT, self.provider_slots())
                        .await?,
                )
            },
        )?;
        let tenants = usage
            .into_iter()
            .filter(|u| u.active() > 0)
            .map(|u| {
                let policy = policies.policy(&u.tenant);
                let started = u.runs + u.in_flight;
                klingq_core::TenantLoad {
                    weight: policy.weight,
                    max_concurrency: policy.max_concurrency,
                    remaining: u.active(),
                    running: u.in_flight,
                    runs: u.runs,
                    run_ms: u.run_ms,
                    mean_micros: (started > 0 && u.started_micros > 0)
                        .then(|| u.started_micros as f64 / started as f64),
                    tenant: u.tenant,
                }
            })
            .collect();
        Ok(klingq_core::ProviderLoad { slots, tenants })
    }

    /// Reads every tenant's usage for one scrape of `/metrics`.
    pub async fn tenant_metrics(&self) -> Result<TenantMetrics, ProducerError> {
        Ok(tenant_metrics(self.queue().tenant_usage().await?))
    }
}

/// The most active `max` tenants and, when there are more, the rest summed under
/// [`OTHER_TENANTS`] (last).
pub(crate) fn top_tenants(
    mut usage: Vec<klingq_queue::TenantUsage>,
    max: usize,
) -> Vec<klingq_queue::TenantUsage> {
    if usage.len() <= max {
        usage.sort_by(|a, b| a.tenant.cmp(&b.tenant));
        return usage;
    }
    // A real tenant named `_other` joins the sum, so that no label set appears twice.
    let (mut rest, mut named): (Vec<_>, Vec<_>) =
        usage.into_iter().partition(|u| u.tenant == OTHER_TENANTS);
    named.sort_by(|a, b| {
        b.in_flight
            .cmp(&a.in_flight)
            .then(b.enqueued.cmp(&a.enqueued))
            .then_with(|| a.tenant.cmp(&b.tenant))
    });
    rest.extend(named.split_off(max.min(named.len())));
    named.sort_by(|a, b| a.tenant.cmp(&b.tenant));
    let mut other = klingq_queue::TenantUsage {
        tenant: OTHER_TENANTS.to_owned(),
        ..Default::default()
    };
    for u in rest {
        other.enqueued += u.enqueued;
        other.redriven += u.redriven;
        for (outcome, n) in u.finished {
            *other.finished.entry(outcome).or_default() += n;
        }
        other.in_flight += u.in_flight;
        other.waiting_for_slot += u.waiting_for_slot;
        other.started_micros += u.started_micros;
        other.runs += u.runs;
        other.run_ms += u.run_ms;
        other.reserved_today_micros += u.reserved_today_micros;
        other.charged_today_micros += u.charged_today_micros;
    }
    named.push(other);
    named
}

fn tenant_metrics(usage: Vec<klingq_queue::TenantUsage>) -> TenantMetrics {
    use klingq_queue::metrics::{Labels, Sampled, Value};
    let tenants = top_tenants(usage, MAX_TENANT_LABELS);
    let label = |tenant: &str, more: Option<(&'static str, &str)>| -> Labels {
        std::iter::once(("tenant", tenant.to_owned()))
            .chain(more.map(|(key, value)| (key, value.to_owned())))
            .collect()
    };
    let in_flight: Vec<(Labels, Value)> = tenants
        .iter()
        .map(|u| (label(&u.tenant, None), Value::Count(u.in_flight)))
        .collect();
    let jobs: Vec<(Labels, Value)> = tenants
        .iter()
        .flat_map(|u| {
            let finished = |state: &str| u.finished.get(state).copied().unwrap_or(0);
            [
                ("active", u.active()),
                ("succeeded", finished("succeeded")),
                ("failed", finished("failed")),
                ("cancelled", finished("cancelled")),
                ("dead", finished("dead")),
            ]
            .map(|(state, n)| (label(&u.tenant, Some(("state", state))), Value::Count(n)))
        })
        .collect();
    let spend: Vec<(Labels, Value)> = tenants
        .iter()
        .flat_map(|u| {
            [
                ("estimated", u.reserved_today_micros),
                ("charged", u.charged_today_micros),
            ]
            .map(|(kind, micros)| {
                (
                    label(&u.tenant, Some(("kind", kind))),
                    Value::Measure(usd(micros)),
                )
            })
        })
        .collect();
    TenantMetrics {
        families: vec![
            Sampled::gauge(
                "klingq_tenant_in_flight",
                "Provider runs each tenant holds now, across replicas (the 20 most active tenants; the rest summed under tenant=\"_other\").",
                move || in_flight.clone(),
            ),
            Sampled::gauge(
                "klingq_tenant_jobs",
                "Each tenant's jobs by state: active (not finished), succeeded, failed, cancelled, dead (the 20 most active tenants; the rest under tenant=\"_other\").",
                move || jobs.clone(),
            ),
            Sampled::gauge(
                "klingq_tenant_spend_today_usd",
                "Each tenant's spend today (UTC) in USD: estimated (reserved at submit) and charged (by the provider) (the 20 most active tenants; the rest under tenant=\"_other\").",
                move || spend.clone(),
            ),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(tenant: &str, in_flight: u64, enqueued: u64) -> klingq_queue::TenantUsage {
        klingq_queue::TenantUsage {
            tenant: tenant.to_owned(),
            enqueued,
            in_flight,
            finished: [("succeeded".to_owned(), 1)].into(),
            charged_today_micros: 1_000_000,
            ..Default::default()
        }
    }

    #[test]
    fn few_tenants_keep_their_labels() {
        let top = top_tenants(vec![usage("b", 0, 1), usage("a", 2, 1)], 20);
        let names: Vec<&str> = top.iter().map(|u| u.tenant.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
    }

    #[test]
    fn the_least_active_are_summed_under_other() {
        let mut all = vec![
            usage("busy", 5, 1),
            usage("big", 0, 100),
            usage("small", 0, 2),
            usage("tiny", 0, 1),
            usage("_other", 9, 9),
        ];
        all.reverse();
        let top = top_tenants(all, 2);
        let names: Vec<&str> = top.iter().map(|u| u.tenant.as_str()).collect();
        assert_eq!(names, ["big", "busy", "_other"]);
        let other = &top[2];
        // small, tiny and the tenant named `_other`.
        assert_eq!(
            (other.in_flight, other.enqueued, other.charged_today_micros),
            (9, 12, 3_000_000)
        );
        assert_eq!(other.finished["succeeded"], 3);
    }

    #[test]
    fn metrics_have_one_series_per_label_set() {
        let all: Vec<_> = (0..30)
            .map(|n| usage(&format!("t{n:02}"), n % 3, n))
            .collect();
        let mut registry = prometheus_client::registry::Registry::default();
        tenant_metrics(all).register(&mut registry);
        let text = klingq_queue::metrics::Format::Text.encode(&[&registry]);
        let in_flight: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("klingq_tenant_in_flight{"))
            .collect();
        assert_eq!(in_flight.len(), MAX_TENANT_LABELS + 1, "{text}");
        let total: u64 = (0..30).map(|n| n % 3).sum();
        let sum: u64 = in_flight
            .iter()
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum();
        assert_eq!(sum, total);
        assert!(
            text.contains("klingq_tenant_jobs{tenant=\"_other\",state=\"succeeded\"} "),
            "{text}"
        );
        assert!(
            text.contains("klingq_tenant_spend_today_usd{tenant=\"t29\",kind=\"charged\"} 1"),
            "{text}"
        );
        let jobs = text
            .lines()
            .filter(|l| l.starts_with("klingq_tenant_jobs{"))
            .count();
        assert_eq!(jobs, (MAX_TENANT_LABELS + 1) * 5);
    }
}
