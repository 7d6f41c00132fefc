//! The tenant policies a worker applies: the API's (in Redis, read at most once per refresh
//! period by each process) over the settings file's (`WorkerConfig::tenants`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use klingq_core::TenantPolicy;
use klingq_core::tenant::resolve_policy;

use super::Coordination;

/// How often a process reads the API's policies again.
const REFRESH: Duration = Duration::from_secs(10);

type Overrides = Arc<BTreeMap<String, TenantPolicy>>;

/// This process's view of the API's tenant policies.
#[derive(Debug, Default)]
pub struct TenantPolicies {
    cache: Mutex<Option<(Instant, Overrides)>>,
}

impl TenantPolicies {
    /// The policy of `tenant`: the API's, else the file's, else the `default` tenant's. With
    /// Redis away, the last policies read (or the file's) apply.
    pub async fn policy(
        &self,
        queue: &dyn Coordination,
        file: &BTreeMap<String, TenantPolicy>,
        tenant: &str,
    ) -> TenantPolicy {
        let cached = self.lock().clone();
        let overrides = match cached {
            Some((read_at, overrides)) if read_at.elapsed() < REFRESH => overrides,
            stale => match queue.tenant_policies().await {
                Ok(fresh) => {
                    let fresh = Arc::new(fresh);
                    *self.lock() = Some((Instant::now(), fresh.clone()));
                    fresh
                }
                Err(error) => {
                    tracing::debug!(%error, "reading the tenant policies failed; the last ones apply");
                    stale.map(|(_, overrides)| overrides).unwrap_or_default()
                }
            },
        };
        resolve_policy(tenant, &overrides, file)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(Instant, Overrides)>> {
        self.cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
