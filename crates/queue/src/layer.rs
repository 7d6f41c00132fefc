//! The backend's tower layer: it sees each task before user middleware and its final result
//! after (panics already turned into `AbortError` by `catch_panic`), and settles the job.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use apalis_core::error::{AbortError, BoxDynError};
use apalis_core::task::Task;
use futures::future::BoxFuture;
use klingq_core::{JobError, JobState};
use tower::{Layer, Service};

use crate::completion::EventExtras;
use crate::error::JobFailure;
use crate::lease::Lease;
use crate::worker::{Settle, Shared, delivery_event, settle};

/// What a successful handler reports: extras for the completion event and the cost charged.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Completion {
    pub extras: EventExtras,
    /// What the provider charged for this job, in micro-dollars (added to its batch).
    pub charged_micros: u64,
}

/// A handler's success value, as the queue reads it.
pub trait Outcome {
    fn completion(&self) -> Completion {
        Completion::default()
    }
}

impl Outcome for () {}

impl Outcome for Completion {
    fn completion(&self) -> Completion {
        self.clone()
    }
}

/// Settles every task its service runs. Installed by the backend on every worker.
#[derive(Clone)]
pub struct SettleLayer {
    shared: Arc<Shared>,
}

impl SettleLayer {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

impl<S> Layer<S> for SettleLayer {
    type Service = SettleService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SettleService {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// See [`SettleLayer`].
#[derive(Clone)]
pub struct SettleService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S, Args, R> Service<Task<Args>> for SettleService<S>
where
    S: Service<Task<Args>, Response = R>,
    S::Error: Into<BoxDynError>,
    S::Future: Send + 'static,
    R: Outcome + Send + Sync + 'static,
{
    type Response = R;
    type Error = BoxDynError;
    type Future = BoxFuture<'static, Result<R, BoxDynError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, task: Task<Args>) -> Self::Future {
        let lease = task.ctx().data().get::<Lease>().cloned();
        let shared = self.shared.clone();
        shared.running.fetch_add(1, Ordering::Relaxed);
        let future = self.inner.call(task);
        Box::pin(async move {
            let result = future.await.map_err(Into::into);
            if let Some(lease) = lease {
                settle_result(&shared, &lease, &result).await;
            }
            shared.running.fetch_sub(1, Ordering::Relaxed);
            result
        })
    }
}

/// Maps a handler's result to how its job is settled.
async fn settle_result<R: Outcome>(
    shared: &Shared,
    lease: &Lease,
    result: &Result<R, BoxDynError>,
) {
    let delivery = &lease.inner.delivery;
    let action = match result {
        Ok(outcome) => {
            let completion = outcome.completion();
            shared.stats.succeeded.fetch_add(1, Ordering::Relaxed);
            let event = delivery_event(
                shared,
                delivery,
                JobState::Succeeded,
                None,
                completion.extras,
            );
            Settle::Finish {
                state: JobState::Succeeded,
                reason: String::new(),
                error: None,
                event,
                charged_micros: completion.charged_micros,
            }
        }
        Err(error) => match classify(error.as_ref(), lease) {
            Some(action) => action,
            // Cancelled or taken by another worker: it is not ours to settle.
            None => {
                shared
                    .held
                    .lock()
                    .expect("held map poisoned")
                    .remove(&crate::worker::held_key(&delivery.stream, &delivery.entry));
                return;
            }
        },
    };
    let action = match action {
        Settle::Retry { reason, error, .. } if lease.attempt() >= lease.max_attempts() => {
            let error = error.unwrap_or_else(|| JobError {
                step: "queue".to_owned(),
                code: "ATTEMPTS_EXHAUSTED".to_owned(),
                message: reason.clone(),
                details: Vec::new(),
                cost_committed: false,
            });
            let reason = format!("gave up after {} attempts: {reason}", lease.attempt());
            dead(shared, lease, reason, error)
        }
        other => other,
    };
    match &action {
        Settle::Finish { state, .. } if *state == JobState::Failed => {
            shared.stats.failed.fetch_add(1, Ordering::Relaxed);
        }
        Settle::Retry { .. } => {
            shared.stats.retried.fetch_add(1, Ordering::Relaxed);
        }
        Settle::Defer { .. } => {
            shared.stats.deferred.fetch_add(1, Ordering::Relaxed);
        }
        Settle::Park { .. } => {
            shared.stats.parked.fetch_add(1, Ordering::Relaxed);
        }
        _ => {}
    }
    settle(shared, delivery, action, lease.take_kept()).await;
}

fn dead(shared: &Shared, lease: &Lease, reason: String, error: JobError) -> Settle {
    shared.stats.dead.fetch_add(1, Ordering::Relaxed);
    let event = delivery_event(
        shared,
        &lease.inner.delivery,
        JobState::Dead,
        Some(&error),
        EventExtras::default(),
    );
    Settle::Finish {
        state: JobState::Dead,
        reason,
        error: Some(error),
        event,
        charged_micros: 0,
    }
}

/// How an error settles the job; `None` when it is not this worker's to settle.
fn classify(
    error: &(dyn std::error::Error + Send + Sync + 'static),
    lease: &Lease,
) -> Option<Settle> {
    if let Some(failure) = error.downcast_ref::<JobFailure>() {
        return match failure {
            JobFailure::Retry {
                after,
                reason,
                error,
            } => Some(Settle::Retry {
                delay: *after,
                reason: reason.clone(),
                error: error.clone(),
            }),
            JobFailure::Defer { after, reason } => Some(Settle::Defer {
                delay: *after,
                reason: reason.clone(),
            }),
            JobFailure::Park { after, reason } => Some(Settle::Park {
                delay: *after,
                reason: reason.clone(),
            }),
            JobFailure::Fail(job_error) => {
                let shared = &lease.inner.shared;
                let event = delivery_event(
                    shared,
                    &lease.inner.delivery,
                    JobState::Failed,
                    Some(job_error),
                    EventExtras::default(),
                );
                Some(Settle::Finish {
                    state: JobState::Failed,
                    reason: job_error.message.clone(),
                    error: Some(job_error.clone()),
                    event,
                    charged_micros: 0,
                })
            }
            JobFailure::Cancelled | JobFailure::LeaseLost => None,
        };
    }
    if error.downcast_ref::<AbortError>().is_some() {
        // `catch_panic` turns a panic into an AbortError: the job is poison until a fix.
        let message = error.to_string();
        let error = JobError {
            step: "queue".to_owned(),
            code: if message.contains("Panic") {
                "HANDLER_PANICKED".to_owned()
            } else {
                "ABORTED".to_owned()
            },
            message: message.clone(),
            details: Vec::new(),
            cost_committed: false,
        };
        return Some(dead(&lease.inner.shared, lease, message, error));
    }
    Some(Settle::Retry {
        delay: retry_backoff(lease.attempt()),
        reason: error.to_string(),
        error: None,
    })
}

/// Exponential backoff with full jitter for errors the handler did not classify: 1 s doubling
/// per attempt, capped at 10 minutes.
fn retry_backoff(attempt: u32) -> Duration {
    let ceiling_ms = 1_000u64
        .saturating_mul(1 << attempt.saturating_sub(1).min(20))
        .min(600_000);
    Duration::from_millis(rand::random_range(ceiling_ms / 2..=ceiling_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_backoff_grows_and_is_capped() {
        for _ in 0..100 {
            let first = retry_backoff(1);
            assert!(first >= Duration::from_millis(500) && first <= Duration::from_secs(1));
            let fifth = retry_backoff(5);
            assert!(fifth >= Duration::from_secs(8) && fifth <= Duration::from_secs(16));
            assert!(retry_backoff(40) <= Duration::from_secs(600));
        }
    }
}
