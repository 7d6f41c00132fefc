//! Giving provider slots back, also when Redis is away at that moment.
//!
//! A slot of the shared provider limit is held per job (the holder is the job id) and expires
//! on its own after `worker.limit_lease_secs`. A release that fails (Redis restarting, a lost
//! connection) must not leave the slot counted until then: replicas would wait "10 of 10 in
//! use" for minutes after an outage. So a failed release is retried in the background with
//! backoff until it succeeds or the slot would have expired anyway.
//!
//! A retried release is fenced: it removes the slot only if its expiry is not past the moment
//! the release was asked for plus one lease (and a second of clock tolerance). A later attempt
//! of the same job that took the slot again has a later expiry and keeps it; in this process
//! such an acquire also drops the pending release at once ([`SlotReleaser::forget`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use klingq_core::job::now_ms;

use crate::pipeline::Coordination;

/// Clock difference between this host and Redis that a fence tolerates.
const FENCE_TOLERANCE_MS: u64 = 1_000;
const FIRST_RETRY: Duration = Duration::from_millis(200);
const MAX_RETRY: Duration = Duration::from_secs(2);

/// Releases slots of one shared limit, retrying failed releases in the background.
#[derive(Clone)]
pub struct SlotReleaser {
    inner: Arc<Inner>,
}

struct Inner {
    /// The queue's shared coordination (the `Queue` in production).
    queue: Box<dyn Coordination>,
    limit: &'static str,
    lease: Duration,
    /// Releases being retried: holder → fence.
    pending: Mutex<HashMap<String, u64>>,
    /// Releases that failed at first and were handed to a background retry.
    deferred: AtomicU64,
    /// Background retries that ended without reaching Redis (the slot expired by itself).
    abandoned: AtomicU64,
}

impl SlotReleaser {
    /// Releases slots of `limit` through `queue` (a `Queue`), whose slots expire by themselves
    /// after `lease`.
    pub fn new(queue: impl Coordination + 'static, limit: &'static str, lease: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                queue: Box::new(queue),
                limit,
                lease,
                pending: Mutex::new(HashMap::new()),
                deferred: AtomicU64::new(0),
                abandoned: AtomicU64::new(0),
            }),
        }
    }

    /// Gives `holder`'s slot back now, or, if Redis does not answer, as soon as it does.
    pub async fn release(&self, holder: &str) {
        let inner = &self.inner;
        let fence = now_ms() + inner.lease.as_millis() as u64 + FENCE_TOLERANCE_MS;
        let Err(error) = inner.queue.release_slot(inner.limit, holder).await else {
            self.forget(holder);
            return;
        };
        tracing::warn!(%error, holder, limit = inner.limit, "releasing a provider slot failed; retrying in the background");
        inner.deferred.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(holder.to_owned(), fence);
        let releaser = self.clone();
        let holder = holder.to_owned();
        tokio::spawn(async move { releaser.retry(holder, fence).await });
    }

    /// Drops a pending release of `holder`: the holder is taking its slot again.
    pub fn forget(&self, holder: &str) {
        self.lock().remove(holder);
    }

    /// Releases being retried now.
    pub fn pending(&self) -> usize {
        self.lock().len()
    }

    /// Releases that failed at first and were retried in the background, since start.
    pub fn deferred_total(&self) -> u64 {
        self.inner.deferred.load(Ordering::Relaxed)
    }

    /// Background retries given up because the slot had expired by itself, since start.
    pub fn abandoned_total(&self) -> u64 {
        self.inner.abandoned.load(Ordering::Relaxed)
    }

    async fn retry(&self, holder: String, fence: u64) {
        let inner = &self.inner;
        let mut delay = FIRST_RETRY;
        loop {
            tokio::time::sleep(delay).await;
            // Superseded (the holder took its slot again here) or done by a newer release.
            if self.lock().get(&holder) != Some(&fence) {
                return;
            }
            if now_ms() > fence {
                tracing::warn!(
                    holder,
                    limit = inner.limit,
                    "gave up releasing a provider slot: it has expired by itself"
                );
                inner.abandoned.fetch_add(1, Ordering::Relaxed);
                self.remove_if(&holder, fence);
                return;
            }
            match inner
                .queue
                .release_slot_fenced(inner.limit, &holder, fence)
                .await
            {
                Ok(removed) => {
                    tracing::info!(
                        holder,
                        limit = inner.limit,
                        removed,
                        "released a provider slot after Redis came back"
                    );
                    self.remove_if(&holder, fence);
                    return;
                }
                Err(error) => {
                    tracing::debug!(%error, holder, "releasing a provider slot failed again");
                    delay = (delay * 2).min(MAX_RETRY);
                }
            }
        }
    }

    fn remove_if(&self, holder: &str, fence: u64) {
        let mut pending = self.lock();
        if pending.get(holder) == Some(&fence) {
            pending.remove(holder);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        self.inner
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
