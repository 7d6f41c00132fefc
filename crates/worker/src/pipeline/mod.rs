//! The job handler: submit → generate (parked polls) → download + upload → publish, resumable
//! at every step. A checkpoint is saved through the job's [`Lease`] before each side effect,
//! and a job that is retried, recovered after a crash or re-delivered resumes from it:
//!
//! - with a provider run id, it never creates another run, it polls;
//! - with a finished run, it never polls or creates, it downloads (refreshing an expired URL);
//! - with the object in storage (verified by HEAD and its sha256), it only publishes;
//! - publishing and finishing are one Redis script (the queue's settle), so a published job is
//!   a finished job.
//!
//! A create whose outcome is unknown leaves `submitted_at_ms` set without a run id: the next
//! attempt looks the run up by `client_ref` before it may create again.
//!
//! While its run generates (async mode), a job holds no worker: after each poll that finds the
//! run still going it is *parked* in Redis ([`JobFailure::Park`]), due at its next poll, which
//! is timed from the learned distribution of generation times ([`GenTimes`]), or at once when
//! the run's callback wakes it (`submit.rs` binds the run to the job for that).
//!
//! Modules: `step` (the steps), `submit`, `generate`, `rehost`, `failure` (how a provider
//! error ends an attempt), `gen_times` (the learned generation times), `seams` (what an
//! attempt needs of the object store, its lease and the shared coordination, as traits the
//! unit tests in `tests` fake).

mod failure;
mod gen_times;
mod generate;
mod rehost;
mod seams;
mod step;
mod submit;
mod tenant_policies;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::{Duration, Instant};

use apalis_core::task::data::Data;
use klingq_core::cost::{micros_to_usd, usd_to_micros};
use klingq_core::job::now_ms;
use klingq_core::{Checkpoint, CostModel, JobError, JobId, JobSpec, JobState, StoredVideo};
use klingq_provider::VideoProvider;
use klingq_queue::{Completion, EventExtras, JobFailure, Lease};
use tracing::Instrument;

use crate::config::WorkerConfig;
use crate::metrics::PipelineMetrics;
use crate::slots::SlotReleaser;

pub use gen_times::{GenTimes, SAMPLE_CAP};
pub use seams::{Coordination, JobHandle, ObjectStore};
pub use step::Step;
pub use tenant_policies::TenantPolicies;

/// Name of the shared limit on concurrent provider generations.
pub use klingq_queue::PROVIDER_LIMIT;
/// Name of the pause set when the provider account is out of credit.
pub const CREDIT_PAUSE: &str = "provider-credit";

/// What every job handler shares: clients, settings and counters.
pub struct Pipeline {
    pub provider: Arc<dyn VideoProvider>,
    /// Calls to the provider by operation and outcome, for `/metrics`.
    pub provider_stats: Arc<klingq_provider::ProviderStats>,
    /// Where videos are re-hosted (the runtime's `VideoStore`).
    pub store: Arc<dyn ObjectStore>,
    pub config: WorkerConfig,
    pub metrics: Arc<PipelineMetrics>,
    /// Gives provider slots back, retrying in the background when Redis is away.
    pub slots: SlotReleaser,
    /// How long runs take, learned from finished runs, for timing polls.
    pub gen_times: GenTimes,
    /// The API's tenant policies, cached.
    pub tenants: TenantPolicies,
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
fn step_span(step: Step) -> tracing::Span {
    tracing::info_span!("step", otel.name = step.as_str(), step = step.as_str())
}

/// One attempt of one job.
struct Attempt<'a> {
    pipeline: &'a Pipeline,
    spec: &'a JobSpec,
    lease: &'a dyn JobHandle,
    job_id: JobId,
    checkpoint: Checkpoint,
    /// When the job must be done by (its creation + the job deadline).
    deadline: Instant,
    estimate_micros: u64,
    /// This attempt took the provider slot at submit (so generating renews it, one command,
    /// instead of taking it again).
    slot_taken: bool,
    /// This attempt created (or adopted) the run and no callback for it came first: the run
    /// has only just started, so the first poll waits instead of reading it at once.
    fresh_run: bool,
    /// The state this attempt last wrote: a step does not write it again.
    last_state: Option<JobState>,
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

    async fn run(&self, spec: &JobSpec, lease: &dyn JobHandle) -> Result<Completion, JobFailure> {
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
            fresh_run: false,
            last_state: None,
        };
        attempt.run().await
    }
}

impl Attempt<'_> {
    async fn run(&mut self) -> Result<Completion, JobFailure> {
        let has_run = self.checkpoint.provider.run_id.is_some();
        if Instant::now() >= self.deadline {
            if has_run && !self.checkpoint.provider.finished {
                self.pipeline.slots.release(&self.job_id.to_string()).await;
            }
            return Err(JobFailure::Fail(job_error(
                Step::Generate.as_str(),
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
                let result = self.submit().instrument(step_span(Step::Submit)).await;
                self.record_step(Step::Submit, started);
                result?;
            }
            if !self.checkpoint.provider.finished {
                let started = Instant::now();
                let result = self.generate().instrument(step_span(Step::Generate)).await;
                self.record_step(Step::Generate, started);
                result?;
            }
        }
        if self.checkpoint.video.is_none() {
            let started = Instant::now();
            let result = self.rehost().instrument(step_span(Step::Download)).await;
            self.record_step(Step::Download, started);
            result?;
        }
        // The last step's timing goes with the settle that publishes the job, in one write.
        self.keep()?;
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
    fn record_step(&mut self, step: Step, started: Instant) {
        let elapsed = started.elapsed();
        *self
            .checkpoint
            .step_ms
            .entry(step.as_str().to_owned())
            .or_default() += elapsed.as_millis() as u64;
        self.pipeline.metrics.step_duration(step.as_str(), elapsed);
    }

    /// Adds `state` to the job's timeline (written with the next checkpoint write).
    fn mark(&mut self, state: JobState, reason: &str) {
        let attempt = self.lease.attempt();
        self.checkpoint.mark(state, now_ms(), attempt, Some(reason));
    }

    async fn save(&mut self, state: JobState, reason: &str) -> Result<(), JobFailure> {
        self.mark(state, reason);
        self.lease
            .save(state, &self.checkpoint, reason)
            .await
            .map_err(JobFailure::from)?;
        self.last_state = Some(state);
        Ok(())
    }

    /// Sets the job's state (keeping its checkpoint) unless this attempt just wrote it.
    async fn enter(&mut self, state: JobState) -> Result<(), JobFailure> {
        if self.last_state == Some(state) {
            return Ok(());
        }
        self.mark(state, "");
        self.lease
            .set_state(state, "")
            .await
            .map_err(JobFailure::from)?;
        self.last_state = Some(state);
        Ok(())
    }

    /// Keeps the checkpoint for the settle of a failing attempt: written with it, once.
    fn keep(&self) -> Result<(), JobFailure> {
        self.lease
            .keep_checkpoint(&self.checkpoint)
            .map_err(JobFailure::from)
    }

    /// Keeps the checkpoint and `state` for the park that ends this attempt: written with it.
    fn keep_as(&mut self, state: JobState) -> Result<(), JobFailure> {
        self.mark(state, "");
        self.lease
            .keep_progress(state, &self.checkpoint)
            .map_err(JobFailure::from)?;
        self.last_state = Some(state);
        Ok(())
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
    fn retry_step(&mut self, step: Step, error: JobError, after: Option<Duration>) -> JobFailure {
        let budget = step.retry_budget(&self.pipeline.config);
        let retries = self
            .checkpoint
            .step_retries
            .entry(step.as_str().to_owned())
            .or_default();
        *retries += 1;
        let n = *retries;
        self.pipeline.metrics.retry(step.as_str());
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
        let reason = format!("{step} retry {n}/{budget}: {}", error.message);
        self.mark(JobState::Scheduled, &reason);
        JobFailure::Retry {
            after,
            reason,
            error: Some(error),
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
