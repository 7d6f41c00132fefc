//! How a provider error ends an attempt: classified once in the provider crate, mapped here
//! to a retry, a defer, a pause or a failure, with the checkpoint saved first.

use std::time::Duration;

use klingq_provider::{ErrorClass, ProviderError, RunFailureKind};
use klingq_queue::JobFailure;

use super::{Attempt, CREDIT_PAUSE, PROVIDER_LIMIT, Step, job_error};

impl Attempt<'_> {
    /// Maps a provider error to how this attempt ends (classified once, in the provider crate).
    pub(super) async fn provider_failure(
        &mut self,
        step: Step,
        error: ProviderError,
    ) -> JobFailure {
        let queue = self.lease.queue();
        let client_ref = self.job_id.to_string();
        let mut detail = job_error(
            step.as_str(),
            error.code().unwrap_or(error.class().as_str()),
            error.to_string(),
            error.cost_committed(),
        );
        detail.details = error
            .field_errors()
            .iter()
            .filter_map(|f| serde_json::to_value(f).ok())
            .collect();
        tracing::warn!(job_id = %client_ref, step = step.as_str(), class = error.class().as_str(), %error, "provider call failed");
        match (&error, error.class()) {
            (ProviderError::RunFailed { kind, failure, .. }, _) => {
                self.pipeline.slots.release(&client_ref).await;
                detail.code = failure
                    .code
                    .clone()
                    .unwrap_or_else(|| "RUN_FAILED".to_owned());
                detail.cost_committed = false;
                match kind {
                    RunFailureKind::Provider => {
                        // Failed runs are not billed: a new run is allowed, within its budget.
                        self.checkpoint.provider.run_id = None;
                        self.checkpoint.provider.submitted_at_ms = None;
                        self.checkpoint.provider.status = Some("failed".to_owned());
                        let failure = self.retry_step(Step::Generate, detail, None);
                        if let Err(keep) = self.keep() {
                            return keep;
                        }
                        failure
                    }
                    RunFailureKind::Moderation | RunFailureKind::Cancelled => {
                        JobFailure::Fail(detail)
                    }
                }
            }
            (_, ErrorClass::Account) => {
                self.pipeline.slots.release(&client_ref).await;
                let pause = Duration::from_secs(self.pipeline.config.credit_pause_secs.max(1));
                let _ = queue
                    .set_pause(
                        CREDIT_PAUSE,
                        pause,
                        "the provider account is out of credit (402)",
                    )
                    .await;
                self.pipeline.metrics.credit_paused();
                // No run was created: the next attempt need not look for one.
                self.checkpoint.provider.submitted_at_ms = None;
                if let Err(keep) = self.keep() {
                    return keep;
                }
                JobFailure::Defer {
                    after: pause,
                    reason: "submissions paused: the provider account is out of credit".to_owned(),
                }
            }
            (_, ErrorClass::Permanent) => {
                self.pipeline.slots.release(&client_ref).await;
                JobFailure::Fail(detail)
            }
            (_, ErrorClass::Transient) => {
                if error.status() == Some(429) {
                    let max = self.pipeline.config.provider_concurrency;
                    let period =
                        Duration::from_secs(self.pipeline.config.throttle_recovery_secs.max(1));
                    if let Ok(cap) = queue.throttle_slots(PROVIDER_LIMIT, max, period).await {
                        tracing::info!(cap, "provider throttled us: lowered the shared limit");
                    }
                }
                if step == Step::Submit {
                    // A transient create failure is known to have created nothing.
                    self.pipeline.slots.release(&client_ref).await;
                    self.checkpoint.provider.submitted_at_ms = None;
                }
                let failure = self.retry_step(step, detail, error.retry_after());
                if let Err(keep) = self.keep() {
                    return keep;
                }
                failure
            }
            (_, ErrorClass::SubmitOutcomeUnknown) => {
                // Keep `submitted_at_ms`: the next attempt looks the run up before creating.
                self.pipeline.metrics.unknown_outcome();
                let failure = self.retry_step(step, detail, None);
                if let Err(keep) = self.keep() {
                    return keep;
                }
                failure
            }
            (ProviderError::DeadlineExceeded { .. }, _) => {
                self.pipeline.slots.release(&client_ref).await;
                detail.code = "DEADLINE_EXCEEDED".to_owned();
                detail.cost_committed = true;
                JobFailure::Fail(detail)
            }
            (ProviderError::SucceededWithoutOutput { .. }, _) => {
                detail.code = "SUCCEEDED_WITHOUT_OUTPUT".to_owned();
                detail.cost_committed = true;
                JobFailure::Fail(detail)
            }
            _ => {
                let failure = self.retry_step(step, detail, error.retry_after());
                if let Err(keep) = self.keep() {
                    return keep;
                }
                failure
            }
        }
    }
}
