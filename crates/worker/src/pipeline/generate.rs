//! The generate step. In async mode a job holds no worker while its run generates: each
//! delivery reads the run once (`GET /v1/runs/{id}`, the source of truth), and a run still
//! going parks the job in Redis ([`JobFailure::Park`]), due at its next poll — timed from
//! the learned generation times ([`super::GenTimes`], [`klingq_provider::next_poll`]) — or at
//! once when the run's callback wakes it. The shared provider slot stays held across the
//! parks (renewed for the wait plus a lease) and is given back the moment the run is known
//! to be over. Sync mode (a run found after a lost sync call) still waits in the task.

use std::time::{Duration, Instant};

use klingq_core::job::now_ms;
use klingq_core::{JobState, TenantPolicy};
use klingq_provider::{Mode, ProviderError, Run, next_poll};
use klingq_queue::JobFailure;

use super::{Attempt, PROVIDER_LIMIT, Step};

impl Attempt<'_> {
    pub(super) async fn generate(&mut self) -> Result<(), JobFailure> {
        self.shutting_down()?;
        let run_id = self
            .checkpoint
            .provider
            .run_id
            .clone()
            .expect("generate runs with a run id");
        if self.pipeline.provider.mode() == Mode::Sync {
            return self.wait_in_task(&run_id).await;
        }
        if self.fresh_run {
            // Created a moment ago: its first poll is timed like any other.
            return Err(self.park(None).await);
        }
        let provider = self.pipeline.provider.clone();
        let read = self.watching(provider.get_run(&run_id)).await?;
        let limits = provider.read_limits();
        let floor = provider.poll_policy().floor;
        let checkpoint = &mut self.checkpoint.provider;
        match read {
            Ok(run) if run.status.is_success() && run.video.is_some() => {
                checkpoint.not_found = 0;
                self.run_finished(&run).await;
                self.save(JobState::Downloading, "").await
            }
            Ok(run) if run.status.is_success() => {
                checkpoint.not_found = 0;
                checkpoint.empty_reads += 1;
                let reads = checkpoint.empty_reads;
                if reads > limits.output_rereads {
                    self.release_slot().await;
                    let error = ProviderError::SucceededWithoutOutput {
                        run_id: run_id.clone(),
                        reads,
                    };
                    return Err(self.provider_failure(Step::Generate, error).await);
                }
                tracing::warn!(
                    run_id,
                    reads,
                    "run succeeded without a video url; reading it again"
                );
                self.save_progress().await?;
                Err(self
                    .park_for(
                        floor,
                        "the run succeeded without naming its video; reading it again",
                    )
                    .await)
            }
            Ok(run) if run.status.is_terminal() => {
                self.release_slot().await;
                let error = provider.run_end_error(&run);
                tracing::info!(run_id, %error, "run ended without success");
                Err(self.provider_failure(Step::Generate, error).await)
            }
            Ok(run) => {
                let changed = checkpoint.not_found != 0
                    || checkpoint.status.as_deref() != Some(run.status.as_str());
                checkpoint.not_found = 0;
                checkpoint.status = Some(run.status.to_string());
                if changed {
                    self.save_progress().await?;
                }
                Err(self.park(Some(&run)).await)
            }
            Err(error @ ProviderError::RunNotFound { .. }) => {
                checkpoint.not_found += 1;
                let misses = checkpoint.not_found;
                if misses > limits.not_found_retries {
                    self.release_slot().await;
                    let error = error.with_attempts(misses);
                    return Err(self.provider_failure(Step::Generate, error).await);
                }
                self.save_progress().await?;
                Err(self.park_for(floor, "the run is not visible yet").await)
            }
            Err(error) if error.is_transient() => {
                // Reading a run we hold never pays: keep polling, later, without counting.
                let after = error.retry_after().unwrap_or(floor).max(floor);
                tracing::debug!(run_id, %error, "reading the run failed; polling again later");
                Err(self
                    .park_for(
                        after,
                        &format!("reading the run failed ({error}); polling again"),
                    )
                    .await)
            }
            Err(error) => {
                self.release_slot().await;
                Err(self.provider_failure(Step::Generate, error).await)
            }
        }
    }

    /// Records a run that succeeded with a video: the checkpoint's fields, the slot given
    /// back, the finish lag and the generation time learned.
    pub(super) async fn run_finished(&mut self, run: &Run) {
        let provider = &mut self.checkpoint.provider;
        provider.finished = true;
        provider.status = Some(run.status.to_string());
        provider.file_size = run.video.as_ref().and_then(|v| v.file_size);
        provider.cost_usd = run.cost_usd;
        self.release_slot().await;
        if let Some(completed) = run.completed_at_ms {
            let lag = Duration::from_millis(now_ms().saturating_sub(completed));
            self.pipeline.metrics.finish_lag(lag);
        }
        if let Some(duration_ms) = run.duration_ms {
            let kind = self.run_kind();
            self.pipeline
                .gen_times
                .record(self.lease.queue(), &kind, duration_ms)
                .await;
        }
    }

    /// The kind of run whose generation times are learned together: model and clip length.
    fn run_kind(&self) -> String {
        format!(
            "{}:{}s",
            self.pipeline.provider.model(),
            self.spec.request.billed_seconds()
        )
    }

    async fn release_slot(&self) {
        self.pipeline.slots.release(&self.job_id.to_string()).await;
    }

    /// Saves the checkpoint's poll bookkeeping (status, odd reads) before a park.
    async fn save_progress(&mut self) -> Result<(), JobFailure> {
        self.save(JobState::Generating, "").await
    }

    /// Parks the job until its next poll, timed from how long runs of its kind take.
    async fn park(&mut self, run: Option<&Run>) -> JobFailure {
        let started_ms = self
            .checkpoint
            .provider
            .submitted_at_ms
            .unwrap_or_else(now_ms);
        let elapsed = Duration::from_millis(now_ms().saturating_sub(started_ms));
        let kind = self.run_kind();
        let histogram = self.pipeline.gen_times.get(self.lease.queue(), &kind).await;
        let policy = self.pipeline.provider.poll_policy();
        let wait = next_poll(&policy, histogram.as_deref(), elapsed, &mut rand::rng());
        let status = run.map_or("queued", |run| run.status.as_str());
        let reason = format!(
            "parked: the run is {status}; next poll in {:.1} s",
            wait.as_secs_f64()
        );
        self.park_for(wait, &reason).await
    }

    /// Parks the job for `wait` (at most until its deadline), keeping its provider slot for
    /// the wait plus a lease.
    async fn park_for(&mut self, wait: Duration, reason: &str) -> JobFailure {
        let wait = wait.min(self.deadline.saturating_duration_since(Instant::now()));
        let lease = wait + self.pipeline.config.limit_lease();
        let client_ref = self.job_id.to_string();
        self.pipeline.slots.forget(&client_ref);
        // Renews the slot (one command), or takes it again if it lapsed (a crash between
        // polls); the run exists anyway, so a full limit does not stop the job.
        let queue = self.lease.queue();
        let renewed = match queue.renew_slot(PROVIDER_LIMIT, &client_ref, lease).await {
            Ok(renewed) => renewed,
            Err(error) => {
                tracing::debug!(%error, "renewing the provider slot failed; taking it again");
                false
            }
        };
        if !renewed
            && let Err(error) = queue
                .acquire_slot(
                    PROVIDER_LIMIT,
                    &client_ref,
                    self.slot_claim(&TenantPolicy::default()),
                    lease,
                    self.pipeline.config.provider_concurrency,
                )
                .await
        {
            tracing::debug!(%error, "taking the provider slot failed; it lapses after its lease");
        }
        JobFailure::Park {
            after: wait,
            reason: reason.to_owned(),
        }
    }

    /// Sync mode after a recovery: waits for the run in the task, holding the slot.
    async fn wait_in_task(&mut self, run_id: &str) -> Result<(), JobFailure> {
        let client_ref = self.job_id.to_string();
        self.pipeline.slots.forget(&client_ref);
        let queue = self.lease.queue();
        let lease = self.pipeline.config.limit_lease();
        let _ = if self.slot_taken {
            queue
                .renew_slot(PROVIDER_LIMIT, &client_ref, lease)
                .await
                .map(|_| ())
        } else {
            queue
                .acquire_slot(
                    PROVIDER_LIMIT,
                    &client_ref,
                    self.slot_claim(&TenantPolicy::default()),
                    lease,
                    self.pipeline.config.provider_concurrency,
                )
                .await
                .map(|_| ())
        };
        let deadline = tokio::time::Instant::from_std(self.deadline);
        let provider = self.pipeline.provider.clone();
        let waited = self
            .watching(provider.wait_for_run(run_id, deadline))
            .await?;
        match waited {
            Ok(run) => {
                self.run_finished(&run).await;
                self.save(JobState::Downloading, "").await
            }
            Err(error) => {
                self.release_slot().await;
                Err(self.provider_failure(Step::Generate, error).await)
            }
        }
    }
}
