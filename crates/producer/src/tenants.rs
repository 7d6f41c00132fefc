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

/// The settings file's policies and a cache of the API's.
#[derive(Debug, Clone, Default)]
pub(crate) struct TenantPolicies {
    pub(crate) file: Arc<BTreeMap<String, TenantPolicy>>,
    cache: Arc<Mutex<Option<(Instant, Arc<BTreeMap<String, TenantPolicy>>)>>>,
}

/// The policies in force at one moment.
pub(crate) struct PolicySnapshot {
    overrides: Arc<BTreeMap<String, TenantPolicy>>,
    file: Arc<BTreeMap<String, TenantPolicy>>,
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
