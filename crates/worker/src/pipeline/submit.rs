//! The submit step: looks for a run an earlier attempt created, checks the credit pause, the
//! budgets and the shared provider slot, then creates the run (checkpointed first).

use std::time::Duration;

use klingq_core::JobState;
use klingq_core::TenantPolicy;
use klingq_core::cost::{micros_to_usd, usd_to_micros};
use klingq_core::job::now_ms;
use klingq_provider::{Mode, Run};
use klingq_queue::{BudgetDecision, JobFailure, SlotClaim, SlotWait};

use super::{Attempt, CREDIT_PAUSE, PROVIDER_LIMIT, Step, redis_retry};

/// How long a job of a paused batch waits before it looks again (a resume wakes it first).
const BATCH_PAUSED_WAIT: Duration = Duration::from_secs(3600);

/// How long a run stays bound to its job past the job's deadline.
const RUN_BINDING_SLACK: Duration = Duration::from_secs(3600);

impl Attempt<'_> {
    pub(super) async fn submit(&mut self) -> Result<(), JobFailure> {
        self.shutting_down()?;
        let provider = &self.pipeline.provider;
        let queue = self.lease.queue();
        let client_ref = self.job_id.to_string();
        if let Some(submitted_at) = self.checkpoint.provider.submitted_at_ms {
            // An earlier attempt sent (or was about to send) a create: look before paying.
            match provider.find_run(&client_ref).await {
                Ok(Some(run)) if !run.id.is_empty() => {
                    tracing::info!(job_id = %client_ref, run_id = %run.id, "adopted the run an earlier attempt created");
                    self.pipeline.metrics.adopted();
                    return self.record_run(run).await;
                }
                Ok(_) => {
                    let grace = Duration::from_secs(10);
                    let waited = Duration::from_millis(now_ms().saturating_sub(submitted_at));
                    if waited < grace {
                        return Err(JobFailure::Defer {
                            after: grace - waited,
                            reason:
                                "an earlier create may still appear; looking again before creating"
                                    .to_owned(),
                        });
                    }
                }
                Err(error) => return Err(self.provider_failure(Step::Submit, error).await),
            }
        }
        if let Some(reason) = queue
            .pause_reason(CREDIT_PAUSE)
            .await
            .map_err(redis_retry)?
        {
            return Err(JobFailure::Defer {
                after: Duration::from_secs(self.pipeline.config.credit_pause_secs.max(1)),
                reason: format!("submissions are paused: {reason}"),
            });
        }
        let tenant = self.spec.tenant();
        let policy = self
            .pipeline
            .tenants
            .policy(queue, &self.pipeline.config.tenants, tenant)
            .await;
        let daily = usd_to_micros(self.pipeline.config.daily_budget_usd);
        match queue
            .reserve_budget(
                &client_ref,
                self.estimate_micros,
                daily,
                tenant,
                usd_to_micros(policy.daily_budget_usd),
            )
            .await
            .map_err(redis_retry)?
        {
            BudgetDecision::Reserved => {}
            BudgetDecision::BatchPaused => {
                // Held by the batch until a resume wakes it (or a cancel ends it); the long
                // wait is only a fallback.
                let reason = "its batch is paused by its failure guard: resume or cancel the batch";
                // A slot the fair share gave this job while it waited goes to the next.
                self.pipeline.slots.release(&client_ref).await;
                self.lease
                    .set_state(JobState::Scheduled, reason)
                    .await
                    .map_err(JobFailure::from)?;
                return Err(JobFailure::Defer {
                    after: BATCH_PAUSED_WAIT,
                    reason: reason.to_owned(),
                });
            }
            over => {
                let reason = match over {
                    BudgetDecision::OverDailyBudget { spent_micros } => format!(
                        "over the daily budget: ${:.2} of ${:.2} committed today",
                        micros_to_usd(spent_micros),
                        self.pipeline.config.daily_budget_usd
                    ),
                    BudgetDecision::OverTenantBudget { spent_micros } => format!(
                        "over tenant {tenant}'s daily budget: ${:.2} of ${:.2} committed today",
                        micros_to_usd(spent_micros),
                        policy.daily_budget_usd
                    ),
                    _ => "over the batch budget".to_owned(),
                };
                let after = Duration::from_secs(self.pipeline.config.budget_wait_secs.max(1));
                self.lease
                    .set_state(JobState::Scheduled, &reason)
                    .await
                    .map_err(JobFailure::from)?;
                return Err(JobFailure::Defer { after, reason });
            }
        }
        self.pipeline.slots.forget(&client_ref);
        let slot = queue
            .acquire_slot_or_wait(
                PROVIDER_LIMIT,
                &client_ref,
                self.slot_claim(&policy),
                self.pipeline.config.limit_lease(),
                self.pipeline.config.provider_concurrency,
            )
            .await
            .map_err(redis_retry)?;
        self.slot_taken = slot.acquired;
        if !slot.acquired {
            let why = match slot.wait {
                Some(SlotWait::TenantLimit) => format!(
                    "tenant {tenant} holds its {} provider slots",
                    policy.max_concurrency
                ),
                Some(SlotWait::OtherTenantsTurn) => {
                    "other tenants are further below their share".to_owned()
                }
                _ => format!("{} of {} in use", slot.in_use, slot.cap),
            };
            return Err(JobFailure::Defer {
                after: Duration::from_secs(self.pipeline.config.limit_wait_secs.max(1)),
                reason: format!(
                    "waiting for a provider slot ({why}; the fair share gives it one and wakes it)"
                ),
            });
        }
        // The checkpoint that makes a retry look before it creates: saved before the request.
        self.checkpoint.provider.submitted_at_ms = Some(now_ms());
        self.checkpoint.provider.creates += 1;
        self.save(JobState::Submitting, "creating the provider run")
            .await?;
        let attempt = self.checkpoint.provider.creates;
        let created = match provider.mode() {
            Mode::Async => {
                provider
                    .create_run(&self.job_id, attempt, &self.spec.request)
                    .await
            }
            Mode::Sync => {
                let call = provider.run_sync(&self.job_id, attempt, &self.spec.request);
                self.watching(call).await?
            }
        };
        match created {
            Ok(run) => {
                if run.adopted {
                    self.pipeline.metrics.adopted();
                }
                self.record_run(run).await
            }
            Err(error) => Err(self.provider_failure(Step::Submit, error).await),
        }
    }

    /// What this job asks the shared provider limit for: its tenant's share, by its cost.
    pub(super) fn slot_claim<'p>(&'p self, policy: &TenantPolicy) -> SlotClaim<'p> {
        SlotClaim {
            tenant: self.spec.tenant(),
            micros: self.estimate_micros,
            weight: policy.weight,
            max_concurrency: policy.max_concurrency,
            priority: self.spec.priority,
        }
    }

    /// Saves a run the job now owns: its id, and its output when it already succeeded. Then
    /// binds the run to the job, so the run's callback wakes it; a callback that came before
    /// (the create's answer was slow or lost) is read here and makes the job poll at once.
    async fn record_run(&mut self, run: Run) -> Result<(), JobFailure> {
        let provider = &mut self.checkpoint.provider;
        if !run.id.is_empty() {
            provider.run_id = Some(run.id.clone());
        }
        provider.status = Some(run.status.to_string());
        if run.status.is_success() && run.video.is_some() && !run.id.is_empty() {
            self.run_finished(&run).await;
            return self.save(JobState::Downloading, "").await;
        }
        if run.id.is_empty() || self.pipeline.provider.mode() == Mode::Sync {
            return self.save(JobState::Generating, "").await;
        }
        let ttl =
            Duration::from_secs(self.pipeline.config.job_deadline_secs.max(1)) + RUN_BINDING_SLACK;
        match self
            .lease
            .queue()
            .bind_run(&self.job_id.to_string(), &run.id, ttl)
            .await
        {
            Ok(Some(status)) => {
                tracing::info!(run_id = %run.id, status, "the run's callback came before its create's answer; polling now");
                self.fresh_run = false;
            }
            Ok(None) => self.fresh_run = !run.status.is_terminal(),
            // Without the binding the callback cannot find the job: polling still does.
            Err(error) => {
                tracing::warn!(%error, run_id = %run.id, "binding the run for its callback failed; polls will find its end");
                self.fresh_run = false;
            }
        }
        if self.fresh_run {
            // The job parks next: the run id and `generating` are written with the park, in
            // one write. A crash before it finds the run by `client_ref` (the create's
            // checkpoint says one was sent) and adopts it.
            self.keep_as(JobState::Generating)
        } else {
            self.save(JobState::Generating, "").await
        }
    }
}
