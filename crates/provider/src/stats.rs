//! Counters of provider calls by operation and outcome, plus an optional observer, so the worker
//! can export metrics without this crate knowing about any metrics library.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::error::Operation;

/// How one HTTP call to the provider ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CallOutcome {
    /// A response with this status arrived.
    Status(u16),
    /// Connecting failed; nothing was sent.
    ConnectError,
    /// The request timed out after it was sent.
    Timeout,
    /// The connection closed or reset, or the body broke off.
    NetworkError,
}

impl fmt::Display for CallOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallOutcome::Status(status) => write!(f, "{status}"),
            CallOutcome::ConnectError => f.write_str("connect_error"),
            CallOutcome::Timeout => f.write_str("timeout"),
            CallOutcome::NetworkError => f.write_str("network_error"),
        }
    }
}

/// One finished provider call, as passed to the observer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallRecord {
    pub operation: Operation,
    pub outcome: CallOutcome,
    pub elapsed: Duration,
}

/// Called after every provider call, e.g. to feed a Prometheus counter and histogram.
pub type CallObserver = Arc<dyn Fn(&CallRecord) + Send + Sync>;

/// Reconciliation events worth alerting on: each is a moment the client could have paid twice.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReconcileCounts {
    /// Creates (async or sync) whose outcome was unknown.
    pub unknown_outcomes: u64,
    /// Runs found by `client_ref` and adopted instead of creating again.
    pub adopted: u64,
    /// Creates sent again because no run was found after the grace period.
    pub resubmitted: u64,
}

/// Call counters shared by one client; cheap to read at any time.
#[derive(Default)]
pub struct ProviderStats {
    calls: Mutex<BTreeMap<(Operation, CallOutcome), u64>>,
    unknown_outcomes: AtomicU64,
    adopted: AtomicU64,
    resubmitted: AtomicU64,
    observer: Option<CallObserver>,
}

impl fmt::Debug for ProviderStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProviderStats")
            .field("calls", &self.snapshot())
            .field("reconcile", &self.reconcile_counts())
            .finish()
    }
}

impl ProviderStats {
    /// Counters that also report every call to `observer`.
    pub fn with_observer(observer: CallObserver) -> Self {
        Self {
            observer: Some(observer),
            ..Self::default()
        }
    }

    /// Every (operation, outcome) pair seen so far with its count.
    pub fn snapshot(&self) -> BTreeMap<(Operation, CallOutcome), u64> {
        self.calls
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Calls of one operation, whatever their outcome.
    pub fn calls(&self, operation: Operation) -> u64 {
        self.snapshot()
            .iter()
            .filter(|((op, _), _)| *op == operation)
            .map(|(_, count)| count)
            .sum()
    }

    /// Calls of one operation with one outcome.
    pub fn count(&self, operation: Operation, outcome: CallOutcome) -> u64 {
        self.snapshot()
            .get(&(operation, outcome))
            .copied()
            .unwrap_or(0)
    }

    pub fn reconcile_counts(&self) -> ReconcileCounts {
        ReconcileCounts {
            unknown_outcomes: self.unknown_outcomes.load(Ordering::Relaxed),
            adopted: self.adopted.load(Ordering::Relaxed),
            resubmitted: self.resubmitted.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn record(&self, record: CallRecord) {
        *self
            .calls
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .entry((record.operation, record.outcome))
            .or_default() += 1;
        if let Some(observer) = &self.observer {
            observer(&record);
        }
    }

    pub(crate) fn note_unknown_outcome(&self) {
        self.unknown_outcomes.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn note_adopted(&self) {
        self.adopted.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn note_resubmitted(&self) {
        self.resubmitted.fetch_add(1, Ordering::Relaxed);
    }
}
