//! Tenants: the customers a backend service enqueues for. A job and a batch may name one;
//! without a name a job belongs to [`DEFAULT_TENANT`]. Each tenant has a [`TenantPolicy`]:
//! its weight in the provider's fair share (by dollars started), how many provider runs it
//! may hold at once, its daily budget and the highest priority its jobs get.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::job::Priority;
use crate::validation::ValidationErrors;

/// The tenant of a job that names none.
pub const DEFAULT_TENANT: &str = "default";

/// The longest tenant name, in bytes.
pub const MAX_TENANT_LEN: usize = 64;

/// The heaviest weight a tenant may have (weights are relative; this keeps the scheduler's
/// arithmetic exact).
pub const MAX_WEIGHT: f64 = 1_000.0;

/// Checks a tenant name: 1 to [`MAX_TENANT_LEN`] ASCII letters, digits, `_` or `-` (no
/// separators: names become parts of Redis keys, metric labels and URL paths). Returns the
/// rule and message of the first violation.
pub fn check_tenant_name(name: &str) -> Result<(), (&'static str, String)> {
    if name.is_empty() || name.len() > MAX_TENANT_LEN {
        return Err((
            "max_length",
            format!(
                "must be 1 to {MAX_TENANT_LEN} characters, got {}",
                name.len()
            ),
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
    {
        return Err((
            "pattern",
            format!("must be ASCII letters, digits, '_' or '-' (found {bad:?})"),
        ));
    }
    Ok(())
}

/// Pushes a violation of the tenant name at `path` onto `errors`.
pub fn validate_tenant_name(errors: &mut ValidationErrors, path: &str, name: &str) {
    if let Err((rule, message)) = check_tenant_name(name) {
        errors.push(path, rule, message);
    }
}

/// What a tenant may use. Settings file: `[tenants.NAME]` (and `[tenants.default]` for every
/// tenant without a table of its own); API: `PUT /v1/tenants/{name}`, which overrides the
/// file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantPolicy {
    /// Relative share of the provider, by dollars started (default 1).
    #[serde(default = "default_weight")]
    pub weight: f64,
    /// Provider runs the tenant may hold at once, across replicas (0: only the shared limit).
    #[serde(default)]
    pub max_concurrency: u64,
    /// Estimated spend the tenant may start per UTC day (0: none).
    #[serde(default)]
    pub daily_budget_usd: f64,
    /// The highest priority the tenant's jobs get; a job asking for more is enqueued at this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_cap: Option<Priority>,
}

fn default_weight() -> f64 {
    1.0
}

impl Default for TenantPolicy {
    fn default() -> Self {
        Self {
            weight: 1.0,
            max_concurrency: 0,
            daily_budget_usd: 0.0,
            priority_cap: None,
        }
    }
}

impl TenantPolicy {
    /// Checks the policy's numbers, naming each field.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errors = ValidationErrors::default();
        if !(self.weight.is_finite() && self.weight > 0.0 && self.weight <= MAX_WEIGHT) {
            errors.push(
                "weight",
                "range",
                format!("must be more than 0 and at most {MAX_WEIGHT}"),
            );
        }
        if !(self.daily_budget_usd.is_finite() && self.daily_budget_usd >= 0.0) {
            errors.push("daily_budget_usd", "range", "must be 0 (none) or more");
        }
        if self.max_concurrency > 100_000 {
            errors.push(
                "max_concurrency",
                "range",
                "must be 0 (only the shared limit) to 100000",
            );
        }
        errors.into_result()
    }

    /// `priority` lowered to the cap, if any.
    pub fn cap_priority(&self, priority: Priority) -> Priority {
        match self.priority_cap {
            Some(cap) if rank(priority) < rank(cap) => cap,
            _ => priority,
        }
    }
}

/// The policy that applies to `tenant`: the API's (`overrides`, set with `PUT
/// /v1/tenants/{name}`), else the settings file's (`file`, `[tenants.NAME]`), else the API's
/// or the file's `default`, else [`TenantPolicy::default`].
pub fn resolve_policy(
    tenant: &str,
    overrides: &BTreeMap<String, TenantPolicy>,
    file: &BTreeMap<String, TenantPolicy>,
) -> TenantPolicy {
    overrides
        .get(tenant)
        .or_else(|| file.get(tenant))
        .or_else(|| overrides.get(DEFAULT_TENANT))
        .or_else(|| file.get(DEFAULT_TENANT))
        .cloned()
        .unwrap_or_default()
}

/// 0 for the highest priority.
fn rank(priority: Priority) -> usize {
    Priority::ALL
        .iter()
        .position(|p| *p == priority)
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_short_and_have_no_separators() {
        assert!(check_tenant_name("acme-corp_2").is_ok());
        assert_eq!(check_tenant_name("").unwrap_err().0, "max_length");
        assert_eq!(
            check_tenant_name(&"a".repeat(65)).unwrap_err().0,
            "max_length"
        );
        for bad in ["a:b", "a b", "a/b", "a,b", "a{b}", "é", "a\nb"] {
            assert_eq!(check_tenant_name(bad).unwrap_err().0, "pattern", "{bad:?}");
        }
    }

    #[test]
    fn a_priority_cap_lowers_only_what_is_above_it() {
        let policy = TenantPolicy {
            priority_cap: Some(Priority::Normal),
            ..TenantPolicy::default()
        };
        assert_eq!(policy.cap_priority(Priority::High), Priority::Normal);
        assert_eq!(policy.cap_priority(Priority::Normal), Priority::Normal);
        assert_eq!(policy.cap_priority(Priority::Low), Priority::Low);
        assert_eq!(
            TenantPolicy::default().cap_priority(Priority::High),
            Priority::High
        );
    }

    #[test]
    fn a_policy_names_each_bad_field() {
        let policy = TenantPolicy {
            weight: 0.0,
            daily_budget_usd: -1.0,
            max_concurrency: 1_000_000,
            priority_cap: None,
        };
        let errors = policy.validate().unwrap_err();
        let paths: Vec<&str> = errors.0.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["weight", "daily_budget_usd", "max_concurrency"]);
        assert!(TenantPolicy::default().validate().is_ok());
    }
}
