//! [`Producer`]: validated enqueue of jobs and batches, views, cancel, dead letters, events.
//!
//! Everything submitted is validated before anything is written. A batch is opened, its jobs
//! are enqueued in pipelined chunks and then it is sealed; the queue keeps its counters.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use klingq_core::cost::{micros_to_usd, usd_to_micros};
use klingq_core::{
    CostModel, FieldError, JobId, JobSpec, JobState, TraceParent, ValidationErrors, redact_url,
};
use klingq_queue::{
    BatchRecord, CancelOutcome, NewJob, Queue, QueueConfig, QueueError, RedriveOutcome,
};
use serde_json::json;
use time::OffsetDateTime;
use tracing::Instrument;

use crate::error::{BatchErrors, CappedErrors, ProducerError};
use crate::view::{
    BatchAccepted, BatchCancelResult, BatchResumeResult, BatchView, CancelResult, EventView,
    JobAccepted, JobPage, JobView, NotDead, RedriveResult,
};

/// Longest batch idempotency key, in bytes: per-job keys derived from it stay within the
/// 255 bytes a job's key may have.
pub const MAX_BATCH_IDEMPOTENCY_KEY_BYTES: usize = 200;

/// The finished jobs a batch's `max_failure_rate` waits for before it judges.
pub const DEFAULT_MIN_FINISHED: u64 = 20;

/// The provider slots a producer assumes the workers allow unless told
/// ([`Producer::with_provider_slots`]): the workers' default `provider_concurrency`.
pub const DEFAULT_PROVIDER_SLOTS: u64 = 10;

/// Jobs cancelled concurrently when cancelling a batch.
const CANCEL_CONCURRENCY: usize = 32;

/// How a batch is submitted.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BatchOptions {
    /// Where the batch's webhook deliveries go (kept in the batch's info).
    pub webhook_url: Option<String>,
    /// The batch's spending cap, in USD.
    pub budget_usd: Option<f64>,
    /// Enqueue the valid entries and report the invalid ones, instead of rejecting the batch.
    pub partial: bool,
    /// Same key within its TTL: the first batch's id comes back and nothing is written again.
    pub idempotency_key: Option<String>,
    /// Where the batch came from (`cli`, `api`), kept in its info.
    pub source: Option<String>,
    /// The caller's trace (an HTTP `traceparent`, the CLI's `TRACEPARENT`): the batch's
    /// enqueue span continues it. Each job still gets a trace of its own, linked to it.
    pub trace: Option<TraceParent>,
    /// The tenant of the batch's jobs that name none (kept in its info).
    pub tenant: Option<String>,
    /// The failure guard: pause the batch once more than this share (0: none, to 1) of its
    /// finished jobs failed for good (after `min_finished`, default 20) ...
    pub max_failure_rate: Option<f64>,
    pub min_finished: Option<u64>,
    /// ... or once more than this many failed for good.
    pub max_failed: Option<u64>,
}

/// What to re-drive from the dead letters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedriveTarget {
    Ids(Vec<String>),
    All,
}

/// The producer side of klingq over one queue. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Producer {
    queue: Queue,
    cost: CostModel,
    max_batch_jobs: usize,
    tenants: crate::tenants::TenantPolicies,
    provider_slots: u64,
}

impl Producer {
    /// A producer over `queue`. It retries a failed Redis call once (within the queue's
    /// `command_timeout_ms`), then reports Redis unavailable: its callers answer people and
    /// services, who should hear that at once rather than after 30 s.
    pub fn new(queue: Queue, cost: CostModel) -> Self {
        Self {
            queue: queue.failing_fast(),
            cost,
            max_batch_jobs: 200_000,
            tenants: crate::tenants::TenantPolicies::default(),
            provider_slots: DEFAULT_PROVIDER_SLOTS,
        }
    }

    /// The provider runs the workers allow at once (`worker.provider_concurrency`), which the
    /// batch ETA shares out between tenants (default 10, the workers' default).
    pub fn with_provider_slots(mut self, slots: u64) -> Self {
        self.provider_slots = slots;
        self
    }

    pub(crate) fn provider_slots(&self) -> u64 {
        self.provider_slots
    }

    /// The settings file's tenant policies (`[tenants.NAME]`): the priority cap at enqueue
    /// and the tenant views read them under the API's.
    pub fn with_tenants(mut self, file: BTreeMap<String, klingq_core::TenantPolicy>) -> Self {
        self.tenants = crate::tenants::TenantPolicies::new(file);
        self
    }

    pub(crate) fn tenant_policies(&self) -> &crate::tenants::TenantPolicies {
        &self.tenants
    }

    /// Connects to the queue; a Redis that does not answer gives a message naming the
    /// (redacted) URL and how to start one.
    pub async fn connect(config: QueueConfig, cost: CostModel) -> Result<Self, ProducerError> {
        let url = redact_url(&config.redis_url);
        let queue = Queue::connect(config)
            .await
            .map_err(|cause| ProducerError::Unreachable { url, cause })?;
        Ok(Self::new(queue, cost))
    }

    /// Caps the jobs one batch may have.
    pub fn with_max_batch_jobs(mut self, max_batch_jobs: usize) -> Self {
        self.max_batch_jobs = max_batch_jobs.max(1);
        self
    }

    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    pub fn cost_model(&self) -> CostModel {
        self.cost
    }

    /// The estimated cost of a job, in micro-dollars: billed seconds × the rate.
    pub fn estimate_micros(&self, spec: &JobSpec) -> u64 {
        self.cost.estimate_micros(spec.request.billed_seconds())
    }

    /// Whether Redis answers.
    pub async fn ping(&self) -> Result<(), ProducerError> {
        Ok(self.queue.ping().await?)
    }

    /// Validates and enqueues one job. With an idempotency key seen before (within its TTL),
    /// the first job's id comes back with `created: false`.
    pub async fn enqueue(&self, job: JobSpec) -> Result<JobAccepted, ProducerError> {
        self.enqueue_traced(job, None).await
    }

    /// [`Producer::enqueue`] continuing the caller's trace: the job's trace is the caller's,
    /// and its attempts and webhooks are children of the enqueue span.
    pub async fn enqueue_traced(
        &self,
        job: JobSpec,
        parent: Option<TraceParent>,
    ) -> Result<JobAccepted, ProducerError> {
        job.validate().map_err(ProducerError::Invalid)?;
        let policies = self.policy_snapshot().await?;
        let mut new_job = self.new_job(&job, job.idempotency_key.clone(), None, &policies)?;
        let span = tracing::info_span!(
            "enqueue",
            job_id = %new_job.id,
            otel.kind = "producer",
            trace_id = tracing::field::Empty,
        );
        new_job.trace = Some(klingq_telemetry::continue_trace(&span, parent));
        let estimated_micros = new_job.estimated_micros;
        let enqueued = self.queue.enqueue(&new_job, None).instrument(span).await?;
        if enqueued.created {
            tracing::debug!(job = %enqueued.id, "job enqueued");
        }
        Ok(JobAccepted {
            id: enqueued.id,
            created: enqueued.created,
            estimated_usd: micros_to_usd(estimated_micros),
        })
    }

    /// Validates every entry, then enqueues the batch. Invalid entries (given as `Err`, or
    /// failing [`JobSpec::validate`]) reject the whole batch, listed by index, unless
    /// `options.partial` is set; then the valid ones are enqueued and the rest reported. A
    /// batch of more than `max_batch_jobs` entries is refused before any entry is validated.
    /// Errors are listed up to [`crate::MAX_ERROR_DETAILS`] and counted.
    pub async fn enqueue_batch(
        &self,
        jobs: Vec<Result<JobSpec, ValidationErrors>>,
        options: BatchOptions,
    ) -> Result<BatchAccepted, ProducerError> {
        let mut check = BatchCheck::new(self.max_batch_jobs).with_tenant(options.tenant.as_deref());
        let mut valid = Vec::new();
        if jobs.len() > self.max_batch_jobs {
            check.skip(jobs.len());
        } else {
            valid.reserve(jobs.len());
            for job in jobs {
                let checked = check.check(job, None);
                if check.has_invalid() && !options.partial {
                    // Refused whatever comes next: keep only the errors.
                    valid = Vec::new();
                } else {
                    valid.extend(checked);
                }
            }
        }
        let rejected = check
            .finish(&options)
            .map_err(ProducerError::InvalidBatch)?;
        self.enqueue_valid(valid, rejected, options).await
    }

    /// Enqueues a batch checked entry by entry with a [`BatchCheck`]: `jobs` are its valid
    /// entries with their index (each is validated again), `rejected` what
    /// [`BatchCheck::finish`] returned (the entries left out, with `partial`).
    pub async fn enqueue_checked(
        &self,
        jobs: Vec<(usize, JobSpec)>,
        rejected: BatchErrors,
        options: BatchOptions,
    ) -> Result<BatchAccepted, ProducerError> {
        let total = rejected.total.max(jobs.len());
        let mut errors = BatchErrors {
            batch: check_batch_options(&options, total, self.max_batch_jobs),
            total,
            ..BatchErrors::default()
        };
        for (index, spec) in &jobs {
            let found = match spec.validate() {
                Ok(()) => batch_tenant_error(options.tenant.as_deref(), spec),
                Err(found) => Some(found),
            };
            if let Some(found) = found {
                errors.invalid_entries += 1;
                errors.entries.push_entry(*index, None, found);
            }
        }
        if jobs.is_empty() && errors.batch.is_empty() {
            errors.batch.push(FieldError::new(
                "",
                "min_items",
                "no valid entry: nothing to enqueue",
            ));
        }
        if !errors.is_empty() {
            return Err(ProducerError::InvalidBatch(errors));
        }
        self.enqueue_valid(jobs, rejected, options).await
    }

    /// Enqueues jobs known to be valid (from [`BatchCheck`], or parsed by [`crate::input`]).
    pub(crate) async fn enqueue_valid(
        &self,
        valid: Vec<(usize, JobSpec)>,
        rejected: BatchErrors,
        options: BatchOptions,
    ) -> Result<BatchAccepted, ProducerError> {
        let rejected_entries = rejected.invalid_entries as u64;
        let rejected_truncated = rejected.entries.is_truncated();
        let rejected = rejected.entries.into_details();

        let mut info = json!({ "source": options.source.as_deref().unwrap_or("api") });
        if let Some(url) = &options.webhook_url {
            info["webhook_url"] = json!(url);
        }
        if let Some(budget) = options.budget_usd {
            info["budget_usd"] = json!(budget);
        }
        if let Some(tenant) = &options.tenant {
            info["tenant"] = json!(tenant);
        }
        if let Some(rate) = options.max_failure_rate {
            info["max_failure_rate"] = json!(rate);
            info["min_finished"] = json!(options.min_finished.unwrap_or(DEFAULT_MIN_FINISHED));
        }
        if let Some(failed) = options.max_failed {
            info["max_failed"] = json!(failed);
        }
        let valid: Vec<(usize, JobSpec)> = match &options.tenant {
            None => valid,
            Some(tenant) => valid
                .into_iter()
                .map(|(index, mut spec)| {
                    spec.tenant.get_or_insert_with(|| tenant.clone());
                    (index, spec)
                })
                .collect(),
        };
        let budget_micros = options.budget_usd.map(usd_to_micros).unwrap_or(0);

        // With a batch idempotency key, the batch is opened at once, claiming the key for its
        // id in the same script; a retry finds the first request's batch there and, if that
        // request stopped half-way, finishes it under the same id (per-job keys derived from
        // the batch key keep jobs single).
        let (batch_id, created) = match &options.idempotency_key {
            // Placed by its first job's key, if any: a retried submission of the same jobs
            // (without a batch key) lands in the same partition, where their keys are.
            None => {
                let hint = valid
                    .iter()
                    .find_map(|(_, spec)| spec.idempotency_key.as_deref());
                (self.queue.new_batch_id(hint), true)
            }
            Some(key) => {
                let opened = self
                    .queue
                    .open_batch_idempotent(&info, budget_micros, key)
                    .await?;
                if !opened.created
                    && let Some(record) = self.queue.batch(&opened.id).await?
                    && record.sealed
                {
                    let view = BatchView::from_record(record, None);
                    return Ok(BatchAccepted {
                        id: opened.id,
                        created: false,
                        total: view.total,
                        deduplicated: 0,
                        rejected,
                        rejected_entries,
                        rejected_truncated,
                        estimated_usd: view.estimated_usd,
                        budget_usd: view.budget_usd,
                    });
                }
                (opened.id, opened.created)
            }
        };

        let span = tracing::info_span!(
            "enqueue_batch",
            batch_id = %batch_id,
            jobs = valid.len(),
            otel.kind = "producer",
            trace_id = tracing::field::Empty,
        );
        klingq_telemetry::continue_trace(&span, options.trace);
        let policies = self.policy_snapshot().await?;
        let mut new_jobs = Vec::with_capacity(valid.len());
        let mut estimated_micros = 0u64;
        for (index, spec) in &valid {
            let key = spec.idempotency_key.clone().or_else(|| {
                options
                    .idempotency_key
                    .as_ref()
                    .map(|batch_key| format!("batch:{batch_key}:{index}"))
            });
            let mut job = self.new_job(spec, key, Some(&batch_id), &policies)?;
            job.trace = Some(klingq_telemetry::new_job_trace(&span, &job.id));
            estimated_micros += job.estimated_micros;
            new_jobs.push(job);
        }
        drop(valid);
        let (enqueued, total_in_batch) = async {
            if options.idempotency_key.is_none() {
                self.queue
                    .open_batch(&batch_id, &info, budget_micros)
                    .await?;
            }
            let enqueued = self.queue.enqueue_many(&new_jobs, Some(&batch_id)).await?;
            let total_in_batch = self.queue.seal_batch(&batch_id).await?;
            Ok::<_, ProducerError>((enqueued, total_in_batch))
        }
        .instrument(span)
        .await?;
        let deduplicated = enqueued
            .iter()
            .zip(&new_jobs)
            .filter(|(outcome, job)| !outcome.created && outcome.id != job.id.to_string())
            .count() as u64;
        tracing::debug!(
            batch = %batch_id,
            jobs = total_in_batch,
            deduplicated,
            rejected = rejected.len(),
            "batch enqueued"
        );
        Ok(BatchAccepted {
            id: batch_id,
            created,
            total: total_in_batch,
            deduplicated,
            rejected,
            rejected_entries,
            rejected_truncated,
            estimated_usd: micros_to_usd(estimated_micros),
            budget_usd: options.budget_usd,
        })
    }

    /// The job to enqueue, with an id in the partition it will live in (its batch's, its
    /// idempotency key's), so the id traced here is the one stored.
    fn new_job(
        &self,
        spec: &JobSpec,
        key: Option<String>,
        batch: Option<&str>,
        policies: &crate::tenants::PolicySnapshot,
    ) -> Result<NewJob, ProducerError> {
        // A tenant's priority cap lowers what its job asked for, in the stored job too.
        let priority = policies.policy(spec.tenant()).cap_priority(spec.priority);
        let payload = if priority == spec.priority {
            serde_json::to_string(spec)?
        } else {
            serde_json::to_string(&JobSpec {
                priority,
                ..spec.clone()
            })?
        };
        Ok(NewJob {
            id: self.queue.new_job_id(batch, key.as_deref()),
            payload,
            priority,
            run_at_ms: spec.not_before.map(epoch_ms),
            idempotency_key: key,
            estimated_micros: self.estimate_micros(spec),
            max_attempts: None,
            trace: None,
            tenant: spec.tenant.clone(),
        })
    }

    /// The job's view.
    pub async fn job(&self, id: &str) -> Result<JobView, ProducerError> {
        let id = canonical_id(id).ok_or_else(|| ProducerError::JobNotFound(id.to_owned()))?;
        let record = self
            .queue
            .job(&id)
            .await?
            // Webhook deliveries share the namespace's job records; they are not jobs here.
            .filter(|record| record.queue == self.queue.name())
            .ok_or(ProducerError::JobNotFound(id))?;
        Ok(JobView::from_record(record))
    }

    /// The batch's view.
    pub async fn batch(&self, id: &str) -> Result<BatchView, ProducerError> {
        let id = canonical_id(id).ok_or_else(|| ProducerError::BatchNotFound(id.to_owned()))?;
        let record = self
            .queue
            .batch(&id)
            .await?
            .ok_or(ProducerError::BatchNotFound(id))?;
        let load = self.load_for(&record).await?;
        Ok(BatchView::from_record(record, load.as_ref()))
    }

    /// The provider's load for a batch's ETA: read only while the batch has jobs left.
    pub async fn load_for(
        &self,
        record: &BatchRecord,
    ) -> Result<Option<klingq_core::ProviderLoad>, ProducerError> {
        if record.done || record.terminal >= record.total {
            return Ok(None);
        }
        Ok(Some(self.provider_load().await?))
    }

    /// A page of the batch's jobs, in enqueue order.
    pub async fn batch_jobs(
        &self,
        id: &str,
        offset: u64,
        limit: u64,
    ) -> Result<JobPage, ProducerError> {
        let batch = self.batch(id).await?;
        let ids = self.queue.batch_job_ids(&batch.id, offset, limit).await?;
        let next = offset + ids.len() as u64;
        let items = self.queue.jobs(&ids).await?;
        Ok(JobPage {
            items: items.into_iter().map(JobView::from_record).collect(),
            total: batch.total,
            offset,
            limit,
            next_offset: (ids.len() as u64 == limit && next < batch.total).then_some(next),
        })
    }

    /// Cancels a job. A job not yet submitted never reaches the provider; one whose provider
    /// run exists is no longer tracked and its cost stays committed (the provider has no
    /// cancel). A finished job is left as it is (`cancelled: false`).
    pub async fn cancel_job(&self, id: &str) -> Result<CancelResult, ProducerError> {
        let id = canonical_id(id).ok_or_else(|| ProducerError::JobNotFound(id.to_owned()))?;
        self.cancel_one(&id, "cancelled by the user").await
    }

    async fn cancel_one(&self, id: &str, reason: &str) -> Result<CancelResult, ProducerError> {
        match self.queue.cancel(id, reason).await {
            Ok(CancelOutcome::Cancelled {
                previous,
                cost_committed,
            }) => {
                tracing::debug!(job = %id, %previous, cost_committed, "job cancelled");
                Ok(CancelResult {
                    id: id.to_owned(),
                    cancelled: true,
                    previous_state: previous,
                    state: JobState::Cancelled,
                    cost_committed,
                })
            }
            Ok(CancelOutcome::AlreadyTerminal(state)) => Ok(CancelResult {
                id: id.to_owned(),
                cancelled: false,
                previous_state: state,
                state,
                cost_committed: false,
            }),
            Err(QueueError::NotFound(_)) => Err(ProducerError::JobNotFound(id.to_owned())),
            Err(error) => Err(error.into()),
        }
    }

    /// Cancels every unfinished job of the batch.
    /// Resumes a batch its failure guard paused: its held jobs are submitted again, and the
    /// guard counts from now.
    pub async fn resume_batch(&self, id: &str) -> Result<BatchResumeResult, ProducerError> {
        let batch = self.batch(id).await?;
        let resumed = self.queue.resume_batch(&batch.id).await?;
        Ok(BatchResumeResult {
            id: batch.id,
            was_paused: batch.paused,
            resumed,
        })
    }

    pub async fn cancel_batch(&self, id: &str) -> Result<BatchCancelResult, ProducerError> {
        let batch = self.batch(id).await?;
        let mut result = BatchCancelResult {
            id: batch.id.clone(),
            cancelled: 0,
            cost_committed: 0,
            already_terminal: 0,
        };
        const PAGE: u64 = 1000;
        let mut offset = 0;
        loop {
            let ids = self.queue.batch_job_ids(&batch.id, offset, PAGE).await?;
            if ids.is_empty() {
                break;
            }
            offset += ids.len() as u64;
            let records = self.queue.jobs(&ids).await?;
            let mut pending = Vec::new();
            for record in records {
                if record.state.is_terminal() {
                    result.already_terminal += 1;
                } else {
                    pending.push(record.id);
                }
            }
            let outcomes: Vec<_> =
                futures::stream::iter(pending)
                    .map(|job_id| async move {
                        self.cancel_one(&job_id, "the batch was cancelled").await
                    })
                    .buffer_unordered(CANCEL_CONCURRENCY)
                    .collect()
                    .await;
            for outcome in outcomes {
                match outcome {
                    Ok(outcome) if outcome.cancelled => {
                        result.cancelled += 1;
                        result.cost_committed += u64::from(outcome.cost_committed);
                    }
                    Ok(_) => result.already_terminal += 1,
                    // Expired between listing and cancelling: nothing left to stop.
                    Err(ProducerError::JobNotFound(_)) => {}
                    Err(error) => return Err(error),
                }
            }
        }
        tracing::info!(batch = %batch.id, cancelled = result.cancelled, "batch cancelled");
        Ok(result)
    }

    /// A page of dead jobs, most recent first.
    pub async fn dead_letters(&self, offset: u64, limit: u64) -> Result<JobPage, ProducerError> {
        let records = self.queue.dead_letters(offset, limit).await?;
        let total = self.queue.dead_letter_count().await?;
        let next = offset + limit;
        Ok(JobPage {
            items: records.into_iter().map(JobView::from_record).collect(),
            total,
            offset,
            limit,
            next_offset: (next < total).then_some(next),
        })
    }

    /// Re-drives dead jobs: each gets a new life (attempts reset) and goes back to the queue.
    pub async fn redrive(&self, target: RedriveTarget) -> Result<RedriveResult, ProducerError> {
        let mut result = RedriveResult::default();
        match target {
            RedriveTarget::All => result.redriven = self.queue.redrive_all().await?,
            RedriveTarget::Ids(ids) => {
                for id in ids {
                    let Some(canonical) = canonical_id(&id) else {
                        result.not_found.push(id);
                        continue;
                    };
                    match self.queue.redrive(&canonical).await {
                        Ok(RedriveOutcome::Redriven) => {
                            result.redriven += 1;
                            result.ids.push(canonical);
                        }
                        Ok(RedriveOutcome::NotDead(state)) => result.not_dead.push(NotDead {
                            id: canonical,
                            state,
                        }),
                        Err(QueueError::NotFound(_)) => result.not_found.push(id),
                        Err(error) => return Err(error.into()),
                    }
                }
            }
        }
        if result.redriven > 0 {
            tracing::info!(redriven = result.redriven, "dead jobs re-driven");
        }
        Ok(result)
    }

    /// Completion events after the cursor `from` (`0` for the oldest retained). With `wait`,
    /// waits up to that long for the first one.
    pub async fn events(
        &self,
        from: &str,
        count: usize,
        wait: Option<Duration>,
    ) -> Result<Vec<EventView>, ProducerError> {
        // A zero BLOCK would wait forever.
        let wait = wait.map(|w| w.max(Duration::from_millis(1)));
        Ok(self
            .queue
            .read_events(from, count, wait)
            .await?
            .into_iter()
            .map(EventView::from)
            .collect())
    }

    /// The newest `count` events, oldest first.
    pub async fn recent_events(&self, count: usize) -> Result<Vec<EventView>, ProducerError> {
        Ok(self
            .queue
            .recent_events(count)
            .await?
            .into_iter()
            .map(EventView::from)
            .collect())
    }

    /// Whether `cursor` is an event cursor of this namespace: `0`, one stream id, or one per
    /// partition.
    pub fn accepts_event_cursor(&self, cursor: &str) -> bool {
        is_event_cursor(cursor)
            && klingq_queue::EventCursor::parse(cursor, self.queue.partitions().len()).is_ok()
    }

    /// The cursor of the newest event (`0-0` when there is none): reading after it gives
    /// only events that come later.
    pub async fn latest_event_cursor(&self) -> Result<String, ProducerError> {
        Ok(self
            .recent_events(1)
            .await?
            .pop()
            .map(|event| event.cursor)
            .unwrap_or_else(|| "0-0".to_owned()))
    }
}

/// The errors of a batch's options and size (none when it may go ahead); entries are checked
/// by [`Producer::enqueue_batch`]. Callers can use it to fail fast before connecting.
pub fn check_batch_options(
    options: &BatchOptions,
    total: usize,
    max_batch_jobs: usize,
) -> Vec<FieldError> {
    let mut errors = ValidationErrors::default();
    if total == 0 {
        errors.push("", "min_items", "a batch needs at least one job");
    }
    if total > max_batch_jobs {
        errors.push(
            "",
            "max_items",
            format!(
                "a batch may have at most {} jobs, got {total}",
                max_batch_jobs
            ),
        );
    }
    if let Some(url) = &options.webhook_url {
        // The job's own rule for webhook URLs, applied to the batch's.
        let mut probe = JobSpec::new(klingq_core::GenerationRequest::new(
            "https://example.com/probe.png",
            "probe",
        ));
        probe.webhook_url = Some(url.clone());
        if let Err(found) = probe.validate() {
            errors.extend(found);
        }
    }
    if let Some(tenant) = &options.tenant {
        klingq_core::tenant::validate_tenant_name(&mut errors, "tenant", tenant);
    }
    if let Some(rate) = options.max_failure_rate
        && !(rate.is_finite() && (0.0..=1.0).contains(&rate))
    {
        errors.push(
            "max_failure_rate",
            "range",
            format!("must be 0 (none) to 1, got {rate}"),
        );
    }
    if let Some(min) = options.min_finished
        && !(1..=1_000_000).contains(&min)
    {
        errors.push(
            "min_finished",
            "range",
            format!("must be 1 to 1000000, got {min}"),
        );
    }
    if options.max_failed == Some(0) {
        errors.push("max_failed", "range", "must be 1 or more");
    }
    if let Some(budget) = options.budget_usd
        && !(budget.is_finite() && budget > 0.0)
    {
        errors.push(
            "budget_usd",
            "range",
            format!("must be a positive number of USD, got {budget}"),
        );
    }
    if let Some(key) = &options.idempotency_key {
        if key.is_empty() || key.len() > MAX_BATCH_IDEMPOTENCY_KEY_BYTES {
            errors.push(
                "idempotency_key",
                "max_length",
                format!(
                    "must be 1 to {MAX_BATCH_IDEMPOTENCY_KEY_BYTES} bytes, got {}",
                    key.len()
                ),
            );
        } else if let Some(c) = key.chars().find(|c| c.is_control()) {
            errors.push(
                "idempotency_key",
                "control_char",
                format!(
                    "must not contain control characters; found U+{:04X}",
                    c as u32
                ),
            );
        }
    }
    errors.0
}

/// Checks a batch's entries one at a time, in order, keeping only counts and the first
/// [`crate::MAX_ERROR_DETAILS`] errors: the caller decides what to keep of the valid jobs, so
/// a batch of any size can be checked, and refused, in bounded memory. Entries past
/// `max_batch_jobs` are counted, not validated; callers that can count first call
/// [`BatchCheck::skip`] instead, so an oversized batch is refused before any validation.
#[derive(Debug, Clone)]
pub struct BatchCheck {
    max_batch_jobs: usize,
    tenant: Option<String>,
    entries: usize,
    valid: usize,
    errors: BatchErrors,
}

impl BatchCheck {
    pub fn new(max_batch_jobs: usize) -> Self {
        Self {
            max_batch_jobs: max_batch_jobs.max(1),
            tenant: None,
            entries: 0,
            valid: 0,
            errors: BatchErrors::default(),
        }
    }

    /// The batch's tenant (`BatchOptions::tenant`): an entry naming another is invalid
    /// (`tenant`, rule `batch_tenant`).
    pub fn with_tenant(mut self, tenant: Option<&str>) -> Self {
        self.tenant = tenant.map(str::to_owned);
        self
    }

    /// The batch limit this check applies.
    pub fn max_batch_jobs(&self) -> usize {
        self.max_batch_jobs
    }

    /// Entries seen so far.
    pub fn entries(&self) -> usize {
        self.entries
    }

    /// Whether an entry was invalid: without `partial`, the batch will be refused.
    pub fn has_invalid(&self) -> bool {
        self.errors.invalid_entries > 0
    }

    /// Checks the next entry (its index is the number of entries before it; `line` is where
    /// it starts in a file). Returns the job with its index when it is valid; records the
    /// errors (listed up to the cap, all counted) when not. Past the batch limit it only
    /// counts.
    pub fn check(
        &mut self,
        entry: Result<JobSpec, ValidationErrors>,
        line: Option<u64>,
    ) -> Option<(usize, JobSpec)> {
        self.check_parsed(entry.and_then(|spec| spec.validate().map(|()| spec)), line)
    }

    /// [`BatchCheck::check`] of an entry from a parser of [`crate::input`] (`parse_job`,
    /// `parse_job_text`, `json_lines`, `parse_csv`), which validated it already.
    pub fn check_parsed(
        &mut self,
        entry: Result<JobSpec, ValidationErrors>,
        line: Option<u64>,
    ) -> Option<(usize, JobSpec)> {
        let index = self.entries;
        self.entries += 1;
        if self.entries > self.max_batch_jobs {
            return None;
        }
        let entry =
            entry.and_then(
                |spec| match batch_tenant_error(self.tenant.as_deref(), &spec) {
                    Some(errors) => Err(errors),
                    None => Ok(spec),
                },
            );
        match entry {
            Ok(spec) => {
                self.valid += 1;
                Some((index, spec))
            }
            Err(errors) => {
                self.errors.invalid_entries += 1;
                self.errors.entries.push_entry(index, line, errors);
                None
            }
        }
    }

    /// Counts `n` entries without validating them (the batch is over its limit).
    pub fn skip(&mut self, n: usize) {
        self.entries += n;
    }

    /// The verdict. `Err` when the batch is refused: its size (then entries are not listed),
    /// its options, an invalid entry without `options.partial`, or no valid entry. Otherwise
    /// the errors of the entries left out, for [`Producer::enqueue_checked`].
    pub fn finish(self, options: &BatchOptions) -> Result<BatchErrors, BatchErrors> {
        let mut errors = self.errors;
        errors.total = self.entries;
        errors.batch = check_batch_options(options, self.entries, self.max_batch_jobs);
        if self.entries > self.max_batch_jobs {
            errors.entries = CappedErrors::new();
            errors.invalid_entries = 0;
            return Err(errors);
        }
        if !errors.batch.is_empty() || (errors.invalid_entries > 0 && !options.partial) {
            return Err(errors);
        }
        if self.valid == 0 {
            errors.batch.push(FieldError::new(
                "",
                "min_items",
                "no valid entry: nothing to enqueue",
            ));
            return Err(errors);
        }
        Ok(errors)
    }
}

/// A batch's entry naming a tenant other than the batch's: rule `batch_tenant` at `tenant`.
fn batch_tenant_error(batch: Option<&str>, spec: &JobSpec) -> Option<ValidationErrors> {
    let (batch, own) = (batch?, spec.tenant.as_deref()?);
    (own != batch).then(|| {
        let mut errors = ValidationErrors::default();
        errors.push(
            "tenant",
            "batch_tenant",
            format!("the batch is for tenant {batch:?}; this job names {own:?}"),
        );
        errors
    })
}

/// The canonical spelling of a job or batch id, or `None` if it is not one.
pub fn canonical_id(id: &str) -> Option<String> {
    id.trim().parse::<JobId>().ok().map(|id| id.to_string())
}

/// Whether `cursor` reads as an event cursor: `0`, a stream id (`<ms>-<seq>` or `<ms>`), or
/// (with `queue.partitions` > 1) one id per partition, comma-separated. Whether it fits this
/// namespace's partitions is [`Producer::accepts_event_cursor`].
pub fn is_event_cursor(cursor: &str) -> bool {
    // Each part is a u64, as Redis stream ids are (the largest, `18446744073709551615-…`,
    // is valid too).
    let number = |s: &str| s.bytes().all(|b| b.is_ascii_digit()) && s.parse::<u64>().is_ok();
    let id = |part: &str| {
        let mut parts = part.splitn(2, '-');
        parts.next().is_some_and(number) && parts.next().is_none_or(number)
    };
    let ids: Vec<&str> = cursor.split(',').collect();
    ids.len() <= klingq_queue::MAX_PARTITIONS as usize && ids.into_iter().all(id)
}

fn epoch_ms(time: OffsetDateTime) -> u64 {
    u64::try_from(time.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

/// The errors of a rejected batch as details: the batch's own, then its entries' by index;
/// the first [`crate::MAX_ERROR_DETAILS`] of them listed, all counted.
pub fn batch_error_details(errors: &BatchErrors) -> CappedErrors {
    errors.details()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_cursors_are_checked() {
        let id = JobId::new().to_string();
        assert_eq!(canonical_id(&id.to_uppercase()), Some(id));
        assert_eq!(canonical_id("job-1"), None);
        for good in ["0", "0-0", "1700000000000-3", "1-0,2-3,4"] {
            assert!(is_event_cursor(good), "{good}");
        }
        for bad in [
            "",
            "-",
            "1-",
            "a-1",
            "1-2-3",
            "$",
            "12345678901234567890123",
            "1-0,",
            "1-0,x",
        ] {
            assert!(!is_event_cursor(bad), "{bad}");
        }
    }
}
