//! The job handler: submit → generate (poll) → download + upload → publish, resumable at every
//! step. A checkpoint is saved through the job's [`Lease`] before each side effect, and a job
//! that is retried, recovered after a crash or re-delivered resumes from it:
//!
//! - with a provider run id, it never creates another run, it polls;
//! - with a finished run, it never polls or creates, it downloads (refreshing an expired URL);
//! - with the object in storage (verified by HEAD and its sha256), it only publishes;
//! - publishing and finishing are one Redis script (the queue's settle), so a published job is
//!   a finished job.
//!
//! A create whose outcome is unknown leaves `submitted_at_ms` set without a run id: the next
//! attempt looks the run up by `client_ref` before it may create again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use apalis_core::task::data::Data;
use klingq_core::cost::{micros_to_usd, usd_to_micros};
use klingq_core::job::now_ms;
use klingq_core::{Checkpoint, CostModel, JobError, JobId, JobSpec, JobState, StoredVideo};
use klingq_provider::{ErrorClass, Mode, ProviderError, Run, RunFailureKind, VideoProvider};
use klingq_queue::{BudgetDecision, Completion, EventExtras, JobFailure, Lease};
use klingq_storage::{RehostError, VideoStore};
use tracing::Instrument;

use crate::config::WorkerConfig;
use crate::metrics::PipelineMetrics;
use crate::slots::SlotReleaser;

/// Name of the shared limit on concurrent provider generations.
pub const PROVIDER_LIMIT: &str = "provider";
/// Name of the pause set when the provider account is out of credit.
pub const CREDIT_PAUSE: &str = "provider-credit";

/// What every job handler shares: clients, settings and counters.
pub struct Pipeline {
    pub provider: Arc<dyn VideoProvider>,
    /// Calls to the provider by operation and outcome, for `/metrics`.
    pub provider_stats: Arc<klingq_provider::ProviderStats>,
    pub store: VideoStore,
    pub config: WorkerConfig,
    pub metrics: Arc<PipelineMetrics>,
    /// Gives provider slots back, retrying in the background when Redis is away.
    pub slots: SlotReleaser,
}

/// The apalis handler of the video queue.
pub async fn handle_job(
    spec: JobSpec,
    lease: Lease,
    pipeline: Data<Arc<Pipeline>>,
) -> Result<Completion, JobFailure> {
    // One span per attempt, a child of the span that enqueued the job: every log line of the
    // job carries its id, attempt, batch and trace id.
    let span = tracing::info_span!(
        "job",
        job_id = %lease.job_id(),
        attempt = lease.attempt(),
        batch_id = lease.batch_id().unwrap_or("-"),
        otel.kind = "consumer",
        trace_id = tracing::field::Empty,
    );
    klingq_telemetry::continue_trace(&span, lease.trace_parent());
    let result = pipeline.run(&spec, &lease).instrument(span).await;
    pipeline.metrics.finished(&result);
    result
}

/// A step's span, named after the step in traces (`submit`, `generate`, `download`).
fn step_span(step: &'static str) -> tracing::Span {
    tracing::info_span!("step", otel.name = step, step)
}

/// One attempt of one job.
struct Attempt<'a> {
    pipeline: &'a Pipeline,
    spec: &'a JobSpec,
    lease: &'a Lease,
    job_id: JobId,
    checkpoint: Checkpoint,
    /// When the job must be done by (its creation + the job deadline).
    deadline: Instant,
    estimate_micros: u64,
    /// This attempt took the provider slot at submit (so generating renews it, one command,
    /// instead of taking it again).
    slot_taken: bool,
}

fn job_error(step: &str, code: &str, message: impl Into<String>, cost_committed: bool) -> JobError {
    JobError {
        step: step.to_owned(),
        code: code.to_owned(),
        message: message.into(),
        details: Vec::new(),
        cost_committed,
    }
}

impl Pipeline {
    fn cost_model(&self) -> CostModel {
        CostModel {
            usd_per_second: self.config.usd_per_second,
        }
    }

    async fn run(&self, spec: &JobSpec, lease: &Lease) -> Result<Completion, JobFailure> {
        let job_id: JobId = lease.job_id().parse().map_err(|_| {
            JobFailure::Fail(job_error(
                "queue",
                "BAD_JOB_ID",
                "the job id is not a UUID",
                false,
            ))
        })?;
        let checkpoint: Checkpoint = lease.checkpoint().map_err(|error| {
            JobFailure::Fail(job_error(
                "queue",
                "CHECKPOINT_UNREADABLE",
                format!(
                    "the saved checkpoint does not decode ({error}); resuming blind could pay twice"
                ),
                true,
            ))
        })?;
        let age = Duration::from_millis(now_ms().saturating_sub(lease.created_ms()));
        let budget = Duration::from_secs(self.config.job_deadline_secs.max(1));
        let deadline = Instant::now() + budget.saturating_sub(age);
        let mut attempt = Attempt {
            pipeline: self,
            spec,
            lease,
            job_id,
            estimate_micros: self
                .cost_model()
                .estimate_micros(spec.request.billed_seconds()),
            checkpoint,
            deadline,
            slot_taken: false,
        };
        attempt.run().await
    }
}

impl Attempt<'_> {
    async fn run(&mut self) -> Result<Completion, JobFailure> {
        let has_run = self.checkpoint.provider.run_id.is_some();
        if Instant::now() >= self.deadline {
            return Err(JobFailure::Fail(job_error(
                "generate",
                "DEADLINE_EXCEEDED",
                format!(
                    "the job did not finish within {} s of its creation",
                    self.pipeline.config.job_deadline_secs
                ),
                has_run,
            )));
        }
        if !self.checkpoint.provider.finished {
            if self.checkpoint.provider.run_id.is_none() {
                let started = Instant::now();
                let result = self.submit().instrument(step_span("submit")).await;
                self.record_step("submit", started);
                result?;
            }
            if !self.checkpoint.provider.finished {
                let started = Instant::now();
                let result = self.generate().instrument(step_span("generate")).await;
                self.record_step("generate", started);
                result?;
            }
        }
        if self.checkpoint.video.is_none() {
            let started = Instant::now();
            let result = self.rehost().instrument(step_span("download")).await;
            self.record_step("download", started);
            result?;
        }
        self.save(JobState::Publishing, "").await?;
        let provider = &self.checkpoint.provider;
        let charged_micros = provider
            .cost_usd
            .map(usd_to_micros)
            .unwrap_or(self.estimate_micros);
        Ok(Completion {
            extras: EventExtras {
                video: self.checkpoint.video.clone(),
                duration_seconds: Some(self.spec.request.billed_seconds()),
                provider_run_id: provider.run_id.clone(),
                cost_usd: Some(micros_to_usd(charged_micros)),
            },
            charged_micros,
        })
    }

    /// Adds a step's time to the checkpoint (saved with the next state) and the histogram.
    fn record_step(&mut self, step: &str, started: Instant) {
        let elapsed = started.elapsed();
        *self.checkpoint.step_ms.entry(step.to_owned()).or_default() += elapsed.as_millis() as u64;
        self.pipeline.metrics.step_duration(step, elapsed);
    }

    async fn save(&mut self, state: JobState, reason: &str) -> Result<(), JobFailure> {
        self.lease
            .save(state, &self.checkpoint, reason)
            .await
            .map_err(JobFailure::from)
    }

    fn shutting_down(&self) -> Result<(), JobFailure> {
        if self.lease.is_shutting_down() {
            return Err(JobFailure::Defer {
                after: Duration::ZERO,
                reason: "the worker is shutting down; another worker resumes the job".to_owned(),
            });
        }
        Ok(())
    }

    /// Counts a retry of `step` and schedules it, or fails the job past the step's budget.
    fn retry_step(&mut self, step: &str, error: JobError, after: Option<Duration>) -> JobFailure {
        let budget = match step {
            "submit" => self.pipeline.config.submit_retries,
            "generate" => self.pipeline.config.generate_retries,
            _ => self.pipeline.config.download_retries,
        };
        let retries = self
            .checkpoint
            .step_retries
            .entry(step.to_owned())
            .or_default();
        *retries += 1;
        let n = *retries;
        self.pipeline.metrics.retry(step);
        if n > budget {
            return JobFailure::Fail(JobError {
                message: format!(
                    "{} (gave up after {budget} retries of {step})",
                    error.message
                ),
                ..error
            });
        }
        let after = after.unwrap_or_else(|| self.pipeline.config.retry_delay(n));
        JobFailure::Retry {
            after,
            reason: format!("{step} retry {n}/{budget}: {}", error.message),
            error: Some(error),
        }
    }

    async fn submit(&mut self) -> Result<(), JobFailure> {
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
                Err(error) => return Err(self.provider_failure("submit", error).await),
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
        let daily = usd_to_micros(self.pipeline.config.daily_budget_usd);
        match queue
            .reserve_budget(&client_ref, self.estimate_micros, daily)
            .await
            .map_err(redis_retry)?
        {
            BudgetDecision::Reserved => {}
            over => {
                let reason = match over {
                    BudgetDecision::OverDailyBudget { spent_micros } => format!(
                        "over the daily budget: ${:.2} of ${:.2} committed today",
                        micros_to_usd(spent_micros),
                        self.pipeline.config.daily_budget_usd
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
            .acquire_slot(
                PROVIDER_LIMIT,
                &client_ref,
                self.pipeline.config.limit_lease(),
                self.pipeline.config.provider_concurrency,
            )
            .await
            .map_err(redis_retry)?;
        self.slot_taken = slot.acquired;
        if !slot.acquired {
            return Err(JobFailure::Defer {
                after: Duration::from_secs(self.pipeline.config.limit_wait_secs.max(1)),
                reason: format!(
                    "waiting for a provider slot ({} of {} in use)",
                    slot.in_use, slot.cap
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
            Err(error) => Err(self.provider_failure("submit", error).await),
        }
    }

    /// Saves a run the job now owns: its id, and its output when it already succeeded.
    async fn record_run(&mut self, run: Run) -> Result<(), JobFailure> {
        let provider = &mut self.checkpoint.provider;
        if !run.id.is_empty() {
            provider.run_id = Some(run.id.clone());
        }
        provider.status = Some(run.status.to_string());
        if run.status.is_success() && run.video.is_some() && !run.id.is_empty() {
            provider.finished = true;
            provider.file_size = run.video.as_ref().and_then(|v| v.file_size);
            provider.cost_usd = run.cost_usd;
            self.pipeline.slots.release(&self.job_id.to_string()).await;
            return self.save(JobState::Downloading, "").await;
        }
        self.save(JobState::Generating, "").await
    }

    async fn generate(&mut self) -> Result<(), JobFailure> {
        self.shutting_down()?;
        let run_id = self
            .checkpoint
            .provider
            .run_id
            .clone()
            .expect("generate runs with a run id");
        let client_ref = self.job_id.to_string();
        // Hold the slot for the run: renewed when this attempt took it at submit, taken
        // again after a recovery; the run exists either way.
        self.pipeline.slots.forget(&client_ref);
        let queue = self.lease.queue();
        let lease = self.pipeline.config.limit_lease();
        let _ = if self.slot_taken {
            queue.renew_slot(PROVIDER_LIMIT, &client_ref, lease).await
        } else {
            queue
                .acquire_slot(
                    PROVIDER_LIMIT,
                    &client_ref,
                    lease,
                    self.pipeline.config.provider_concurrency,
                )
                .await
                .map(|_| ())
        };
        let deadline = tokio::time::Instant::from_std(self.deadline);
        let provider = self.pipeline.provider.clone();
        let waited = self
            .watching(provider.wait_for_run(&run_id, deadline))
            .await?;
        self.pipeline.slots.release(&client_ref).await;
        match waited {
            Ok(run) => {
                let provider = &mut self.checkpoint.provider;
                provider.finished = true;
                provider.status = Some(run.status.to_string());
                provider.file_size = run.video.as_ref().and_then(|v| v.file_size);
                provider.cost_usd = run.cost_usd;
                self.save(JobState::Downloading, "").await
            }
            Err(error) => Err(self.provider_failure("generate", error).await),
        }
    }

    /// Runs a long provider call while watching the job: a cancellation or a lost lease stops
    /// it, a shutdown hands the job over, and the job's lease and provider slot stay renewed.
    async fn watching<T>(&self, call: impl Future<Output = T>) -> Result<T, JobFailure> {
        let watch = async {
            let mut ticks: u32 = 0;
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                ticks += 1;
                if self.lease.is_shutting_down() {
                    return JobFailure::Defer {
                        after: Duration::ZERO,
                        reason: "the worker is shutting down; another worker resumes polling"
                            .to_owned(),
                    };
                }
                if self.lease.is_lost() {
                    return JobFailure::LeaseLost;
                }
                // Every 10 s: look for a cancellation (one HGET), and extend the provider slot
                // (one ZADD); the queue's keeper renews the job's lease on its own.
                if ticks.is_multiple_of(40) {
                    let queue = self.lease.queue();
                    match queue.job_state(self.lease.job_id()).await {
                        Ok(Some(JobState::Cancelled)) => return JobFailure::Cancelled,
                        Ok(None) => return JobFailure::LeaseLost,
                        _ => {}
                    }
                    let _ = queue
                        .renew_slot(
                            PROVIDER_LIMIT,
                            &self.job_id.to_string(),
                            self.pipeline.config.limit_lease(),
                        )
                        .await;
                }
            }
        };
        tokio::select! {
            output = call => Ok(output),
            stop = watch => Err(stop),
        }
    }

    /// Maps a provider error to how this attempt ends (classified once, in the provider crate).
    async fn provider_failure(&mut self, step: &str, error: ProviderError) -> JobFailure {
        let queue = self.lease.queue().clone();
        let client_ref = self.job_id.to_string();
        let mut detail = job_error(
            step,
            error.code().unwrap_or(error.class().as_str()),
            error.to_string(),
            error.cost_committed(),
        );
        detail.details = error
            .field_errors()
            .iter()
            .filter_map(|f| serde_json::to_value(f).ok())
            .collect();
        tracing::warn!(job_id = %client_ref, step, class = error.class().as_str(), %error, "provider call failed");
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
                        let failure = self.retry_step("generate", detail, None);
                        if let Err(save) = self
                            .save(JobState::Scheduled, "the provider failed the run")
                            .await
                        {
                            return save;
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
                if let Err(save) = self
                    .save(JobState::Scheduled, "out of provider credit")
                    .await
                {
                    return save;
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
                if step == "submit" {
                    // A transient create failure is known to have created nothing.
                    self.pipeline.slots.release(&client_ref).await;
                    self.checkpoint.provider.submitted_at_ms = None;
                }
                let failure = self.retry_step(step, detail, error.retry_after());
                if let Err(save) = self
                    .save(JobState::Scheduled, "provider call failed; retrying")
                    .await
                {
                    return save;
                }
                failure
            }
            (_, ErrorClass::SubmitOutcomeUnknown) => {
                // Keep `submitted_at_ms`: the next attempt looks the run up before creating.
                self.pipeline.metrics.unknown_outcome();
                let failure = self.retry_step(step, detail, None);
                if let Err(save) = self
                    .save(JobState::Scheduled, "create outcome unknown; reconciling")
                    .await
                {
                    return save;
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
                if let Err(save) = self
                    .save(JobState::Scheduled, "provider call failed; retrying")
                    .await
                {
                    return save;
                }
                failure
            }
        }
    }

    async fn rehost(&mut self) -> Result<(), JobFailure> {
        self.shutting_down()?;
        let store = &self.pipeline.store;
        let job_id = self.job_id.to_string();
        match store.head(&job_id).await {
            Ok(Some(existing)) => {
                tracing::info!(job_id, "the video is already stored; skipping the upload");
                self.checkpoint.video = Some(to_core(existing));
                return self.save(JobState::Publishing, "").await;
            }
            Ok(None) => {}
            Err(error) => {
                let detail = job_error("upload", "STORAGE_UNAVAILABLE", error.to_string(), true);
                let failure = self.retry_step("download", detail, None);
                self.save(JobState::Scheduled, "object storage unreachable; retrying")
                    .await?;
                return Err(failure);
            }
        }
        let run_id = match self.checkpoint.provider.run_id.clone() {
            Some(run_id) => run_id,
            None => match self.pipeline.provider.find_run(&job_id).await {
                Ok(Some(run)) if !run.id.is_empty() => run.id,
                Ok(_) => {
                    return Err(JobFailure::Fail(job_error(
                        "download",
                        "RUN_UNKNOWN",
                        "the run succeeded but its id cannot be found to download the video",
                        true,
                    )));
                }
                Err(error) => return Err(self.provider_failure("download", error).await),
            },
        };
        self.save(JobState::Downloading, "").await?;
        let mut refreshes = 0;
        let stored = loop {
            let video = match self.pipeline.provider.refresh_video_url(&run_id).await {
                Ok(video) => video,
                Err(error) => return Err(self.provider_failure("download", error).await),
            };
            self.lease
                .set_state(JobState::Uploading, "")
                .await
                .map_err(JobFailure::from)?;
            let expected = video.file_size.or(self.checkpoint.provider.file_size);
            match store.rehost(&job_id, video.url.expose(), expected).await {
                Ok(stored) => break stored,
                Err(error) if error.is_source_expired() && refreshes < 2 => {
                    refreshes += 1;
                    tracing::info!(
                        job_id,
                        "download url expired; reading the run for a fresh one"
                    );
                }
                Err(error) => return Err(self.rehost_failure(error).await),
            }
        };
        self.pipeline.metrics.rehosted(stored.size);
        self.checkpoint.video = Some(to_core(stored));
        self.save(JobState::Publishing, "").await
    }

    async fn rehost_failure(&mut self, error: RehostError) -> JobFailure {
        let detail = job_error("download", error.code(), error.to_string(), true);
        tracing::warn!(job_id = %self.job_id, %error, "re-hosting failed");
        if error.is_permanent() {
            return JobFailure::Fail(detail);
        }
        let failure = self.retry_step("download", detail, error.retry_after());
        if let Err(save) = self
            .save(JobState::Scheduled, "re-hosting failed; retrying")
            .await
        {
            return save;
        }
        failure
    }
}

fn to_core(stored: klingq_storage::StoredVideo) -> StoredVideo {
    StoredVideo {
        bucket: stored.bucket,
        key: stored.key,
        url: stored.url,
        size: stored.size,
        sha256: stored.sha256,
        content_type: stored.content_type,
    }
}

/// Redis trouble during a step: try the job again shortly (the queue keeps it).
fn redis_retry(error: klingq_queue::QueueError) -> JobFailure {
    JobFailure::Retry {
        after: Duration::from_secs(5),
        reason: format!("redis unavailable: {error}"),
        error: None,
    }
}
