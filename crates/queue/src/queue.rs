//! [`Queue`]: the handle producers, operators and workers share. It enqueues jobs and batches,
//! reads records, cancels, lists and re-drives dead letters, reports statistics and reads the
//! events stream.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use klingq_core::job::now_ms;
use klingq_core::{JobError, JobId, JobState, Priority, TraceParent, redact_url};
use redis::{Cmd, Script, Value};
use serde_json::Value as Json;

use crate::completion::{self, EventExtras, EventSubject};
use crate::config::QueueConfig;
use crate::conn::{Dedicated, ErrorCounters, Redis, SharedConn, Topology};
use crate::error::QueueError;
use crate::keys::{GROUP, Keys};
use crate::record::{BatchRecord, JobRecord, QueueStats, StoredEvent};
use crate::scripts;

/// A job to enqueue. The payload is the queue's argument type, already serialized.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: JobId,
    pub payload: String,
    pub priority: Priority,
    /// Not delivered before this time (ms since the epoch).
    pub run_at_ms: Option<u64>,
    /// Same key within its TTL: the first job's id comes back and nothing is written.
    pub idempotency_key: Option<String>,
    /// Estimated cost, added to the batch's estimate.
    pub estimated_micros: u64,
    /// Overrides the queue's maximum attempts for this job.
    pub max_attempts: Option<u32>,
    /// The span that enqueued the job: every attempt and every webhook of the job continue
    /// its trace.
    pub trace: Option<TraceParent>,
}

impl NewJob {
    /// A job carrying `args` as JSON, with a fresh id and default options.
    pub fn new<T: serde::Serialize>(args: &T) -> Result<Self, QueueError> {
        Ok(Self {
            id: JobId::new(),
            payload: serde_json::to_string(args)?,
            priority: Priority::Normal,
            run_at_ms: None,
            idempotency_key: None,
            estimated_micros: 0,
            max_attempts: None,
            trace: None,
        })
    }
}

/// The outcome of one enqueue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enqueued {
    /// The job's id: the new one, or the first job's when deduplicated.
    pub id: String,
    /// False when an idempotency key (or the same job id) matched an existing job.
    pub created: bool,
}

/// The batch an idempotent open resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenedBatch {
    /// The batch's id: the one asked for, or the first batch's when the key was seen before.
    pub id: String,
    /// False when the idempotency key already named another batch (`id` is that batch).
    pub created: bool,
}

/// The outcome of a cancel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelOutcome {
    /// Cancelled from `previous`. `cost_committed` says a provider run may already be billed.
    Cancelled {
        previous: JobState,
        cost_committed: bool,
    },
    /// Already in a terminal state: nothing changed.
    AlreadyTerminal(JobState),
}

/// The outcome of re-driving one dead job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedriveOutcome {
    Redriven,
    /// Not dead: nothing changed.
    NotDead(JobState),
}

pub(crate) struct Inner {
    pub(crate) config: QueueConfig,
    pub(crate) keys: Keys,
    /// How this process reaches Redis (shared by every clone and `for_queue` copy).
    redis: Arc<Redis>,
    pub(crate) conn: SharedConn,
    /// Transient Redis errors seen by this process, per kind.
    errors: Arc<ErrorCounters>,
    /// A key in the namespace's slot: every script names it as KEYS[1] so Cluster routes it.
    route_key: String,
    /// Retry a failed call once only (within the command timeout), for callers that answer a
    /// person or a service and should say "Redis is unavailable" instead of waiting.
    fail_fast: bool,
}

/// A connection to one queue of one namespace. Cheap to clone.
#[derive(Clone)]
pub struct Queue {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("redis", &redact_url(&self.inner.config.redis_url))
            .field("namespace", &self.inner.config.namespace)
            .field("queue", &self.inner.config.queue)
            .finish()
    }
}

impl Queue {
    /// Connects (standalone, Cluster or Sentinel, as `redis_mode` says or as detected) and
    /// loads the scripts. Fails if Redis does not answer.
    pub async fn connect(config: QueueConfig) -> Result<Self, QueueError> {
        let keys = Keys::new(&config.namespace);
        let route_key = keys.route();
        let redis = Redis::connect(&config, &route_key)
            .await
            .map_err(|error| match error {
                QueueError::Redis(ref redis_error) if error.is_transient() => {
                    let kind = crate::conn::error_kind(redis_error);
                    QueueError::Unavailable {
                        node: redact_url(&config.redis_url)
                            .split(',')
                            .map(|url| url.split_once("://").map_or(url, |(_, rest)| rest))
                            .collect::<Vec<_>>()
                            .join(", "),
                        kind,
                        what: crate::error::unavailable_what(kind),
                    }
                }
                other => other,
            })?;
        let mut conn = redis.shared.clone();
        Self::load_scripts(&mut conn).await?;
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                keys,
                conn,
                redis: Arc::new(redis),
                errors: Arc::default(),
                route_key,
                fail_fast: false,
            }),
        })
    }

    fn with(&self, config: QueueConfig, fail_fast: bool) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                keys: self.inner.keys.clone(),
                redis: self.inner.redis.clone(),
                conn: self.inner.conn.clone(),
                errors: self.inner.errors.clone(),
                route_key: self.inner.route_key.clone(),
                fail_fast,
            }),
        }
    }

    /// The same connection, for another queue of the namespace (e.g. webhook deliveries).
    pub fn for_queue(&self, queue: &str) -> Self {
        self.with(self.inner.config.for_queue(queue), self.inner.fail_fast)
    }

    /// The same connection, retrying a failed call once only, within about
    /// `command_timeout_ms`, instead of for up to 30 s: for producers, the API and the CLI,
    /// which answer "Redis is unavailable" at once while workers keep trying.
    pub fn failing_fast(&self) -> Self {
        self.with(self.inner.config.clone(), true)
    }

    /// What was found at `redis_url`: mode, primaries, the namespace's slot and its owner.
    pub async fn topology(&self) -> Topology {
        self.inner.redis.topology().await
    }

    pub(crate) fn redis(&self) -> &Redis {
        &self.inner.redis
    }

    /// Transient Redis errors this process has seen, per kind (`klingq_redis_errors_total`).
    pub fn redis_errors(&self) -> Vec<(&'static str, u64)> {
        self.inner.errors.snapshot()
    }

    /// A transient error, past its retry budget, as the one line a person reads.
    pub(crate) fn unavailable(&self, error: QueueError) -> QueueError {
        match &error {
            QueueError::Redis(redis_error) if error.is_transient() => {
                let kind = crate::conn::error_kind(redis_error);
                QueueError::Unavailable {
                    node: self.inner.redis.describe(),
                    kind,
                    what: crate::error::unavailable_what(kind),
                }
            }
            _ => error,
        }
    }

    /// With `min_replicas_ack` > 0: returns once that many replicas hold every write this
    /// process made so far (`WAIT`, on the connection that made them), or fails with
    /// [`QueueError::NotReplicated`] after `replica_ack_timeout_ms`. Never a silent downgrade:
    /// the caller sees the error (enqueue) or retries (checkpoint).
    pub(crate) async fn replicated(&self) -> Result<(), QueueError> {
        let config = &self.inner.config;
        let wanted = config.min_replicas_ack;
        if wanted == 0 {
            return Ok(());
        }
        let timeout_ms = config.replica_ack_timeout_ms.max(1);
        let acked = self
            .inner
            .redis
            .wait_replicas(wanted, timeout_ms)
            .await
            .map_err(|error| {
                let error = QueueError::from(error);
                self.record_error(&error);
                self.unavailable(error)
            })?;
        if acked < wanted {
            return Err(QueueError::NotReplicated {
                wanted,
                acked,
                timeout_ms,
            });
        }
        Ok(())
    }

    /// Counts a Redis error of a call made outside [`Queue::retrying`].
    pub(crate) fn record_error(&self, error: &QueueError) {
        if let QueueError::Redis(error) = error {
            self.inner.errors.record(error);
        }
    }

    pub fn config(&self) -> &QueueConfig {
        &self.inner.config
    }

    pub fn keys(&self) -> &Keys {
        &self.inner.keys
    }

    pub fn name(&self) -> &str {
        &self.inner.config.queue
    }

    /// The shared, multiplexed, reconnecting connection.
    pub(crate) fn connection(&self) -> SharedConn {
        self.inner.conn.clone()
    }

    /// A new connection of its own to the node owning the namespace's slot, for blocking
    /// reads that must not stall shared traffic. After a failover or a slot move its
    /// commands fail (transient errors): open a new one.
    pub async fn dedicated_connection(
        &self,
        response_timeout: Duration,
    ) -> Result<Dedicated, QueueError> {
        self.inner
            .redis
            .dedicated(response_timeout)
            .await
            .inspect_err(|error| self.record_error(error))
    }

    /// An EVALSHA of `script` with the prelude's arguments (prefix, retention, events length);
    /// the script's own arguments are appended by the caller.
    pub(crate) fn script_cmd(&self, script: &Script) -> Cmd {
        let config = &self.inner.config;
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(script.get_hash())
            .arg(1)
            .arg(&self.inner.route_key)
            .arg(self.inner.keys.prefix())
            .arg(config.retention_secs.max(1))
            .arg(config.events_max_len.max(1));
        cmd
    }

    /// Loads every script (after a Redis restart or SCRIPT FLUSH emptied the cache).
    async fn load_scripts(conn: &mut SharedConn) -> Result<(), QueueError> {
        for script in scripts::all() {
            script.prepare_invoke().load_async(conn).await?;
        }
        Ok(())
    }

    /// Runs a script command or pipeline, reloading the scripts once on NOSCRIPT, and again
    /// on transient errors for about `budget`. Every script is safe to run twice.
    pub(crate) async fn run_scripts<T: redis::FromRedisValue>(
        &self,
        pipe_or_cmd: &ScriptBatch,
        budget: Duration,
    ) -> Result<T, QueueError> {
        self.retrying(budget, || {
            let mut conn = self.inner.conn.clone();
            async move {
                match pipe_or_cmd.query(&mut conn).await {
                    Err(error) if error.kind() == noscript() => {
                        Self::load_scripts(&mut conn).await?;
                        Ok(pipe_or_cmd.query(&mut conn).await?)
                    }
                    other => Ok(other?),
                }
            }
        })
        .await
    }

    pub(crate) async fn run_script<T: redis::FromRedisValue>(
        &self,
        cmd: Cmd,
    ) -> Result<T, QueueError> {
        self.run_scripts(&ScriptBatch::One(cmd), Duration::from_secs(10))
            .await
    }

    /// Runs `op` again on transient Redis errors, with jittered exponential backoff, for at
    /// most about `budget`.
    pub(crate) async fn retrying<T, F, Fut>(&self, budget: Duration, op: F) -> Result<T, QueueError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, QueueError>>,
    {
        let policy = retry_policy();
        let policy = if self.inner.fail_fast {
            policy
                .with_total_delay(Some(budget.min(self.inner.config.command_timeout())))
                .with_max_times(1)
        } else {
            policy.with_total_delay(Some(budget)).without_max_times()
        };
        op.retry(policy)
            .when(|error: &QueueError| error.is_transient())
            .notify(|error: &QueueError, delay: Duration| {
                self.record_error(error);
                tracing::warn!(%error, ?delay, "redis call failed; retrying");
            })
            .await
            .map_err(|error| self.unavailable(error))
    }

    /// One enqueue script call for `jobs` (one Redis round trip, one script run).
    fn enqueue_cmd(&self, batch: &str, jobs: &[NewJob]) -> Cmd {
        let config = &self.inner.config;
        let mut cmd = self.script_cmd(&scripts::ENQUEUE);
        cmd.arg(&config.queue)
            .arg(config.idempotency_ttl_secs.max(1))
            .arg(batch);
        for job in jobs {
            cmd.arg(job.id.to_string())
                .arg(&job.payload)
                .arg(job.priority.as_str())
                .arg(job.max_attempts.unwrap_or(config.max_attempts).max(1))
                .arg(job.run_at_ms.unwrap_or(0))
                .arg(job.idempotency_key.as_deref().unwrap_or(""))
                .arg(job.estimated_micros)
                .arg(job.trace.map(|t| t.to_string()).unwrap_or_default());
        }
        cmd
    }

    /// Enqueues one job (with its optional batch, which must be open).
    pub async fn enqueue(&self, job: &NewJob, batch: Option<&str>) -> Result<Enqueued, QueueError> {
        let mut replies = self.enqueue_many(std::slice::from_ref(job), batch).await?;
        replies
            .pop()
            .ok_or_else(|| QueueError::Protocol("enqueue returned nothing".to_owned()))
    }

    /// Enqueues many jobs, `enqueue_chunk` per script call, with a few calls pipelined per
    /// round trip. Re-running a call after a dropped connection is harmless: enqueue is
    /// idempotent per job id.
    pub async fn enqueue_many(
        &self,
        jobs: &[NewJob],
        batch: Option<&str>,
    ) -> Result<Vec<Enqueued>, QueueError> {
        let mut results = Vec::with_capacity(jobs.len());
        let chunk_size = self.inner.config.enqueue_chunk.clamp(1, 2_000);
        for group in jobs.chunks(chunk_size * 4) {
            let mut pipe = redis::pipe();
            for chunk in group.chunks(chunk_size) {
                pipe.add_command(self.enqueue_cmd(batch.unwrap_or(""), chunk));
            }
            let replies: Vec<Vec<Value>> = self
                .run_scripts(&ScriptBatch::Many(pipe), Duration::from_secs(30))
                .await?;
            for reply in replies {
                for pair in reply.chunks(2) {
                    let created = matches!(pair.first(), Some(Value::Int(1)));
                    let id = pair.get(1).and_then(value_string).ok_or_else(|| {
                        QueueError::Protocol("enqueue reply without an id".to_owned())
                    })?;
                    results.push(Enqueued { id, created });
                }
            }
        }
        self.replicated().await?;
        Ok(results)
    }

    /// Opens a batch before its jobs are enqueued. `info` is kept as the batch's description.
    pub async fn open_batch(
        &self,
        batch_id: &str,
        info: &Json,
        budget_micros: u64,
    ) -> Result<(), QueueError> {
        let _: String = self
            .run_script(self.open_batch_cmd(batch_id, info, budget_micros, ""))
            .await?;
        self.replicated().await
    }

    /// Opens a batch under a batch idempotency key, in one script: the first call within
    /// `idempotency_ttl_secs` claims the key for `batch_id`; a later one opens the first
    /// batch again instead (a no-op when its record exists), so a retried submission resumes
    /// it. Safe to run twice.
    pub async fn open_batch_idempotent(
        &self,
        batch_id: &str,
        info: &Json,
        budget_micros: u64,
        idempotency_key: &str,
    ) -> Result<OpenedBatch, QueueError> {
        let id: String = self
            .run_script(self.open_batch_cmd(batch_id, info, budget_micros, idempotency_key))
            .await?;
        self.replicated().await?;
        Ok(OpenedBatch {
            created: id == batch_id,
            id,
        })
    }

    fn open_batch_cmd(
        &self,
        batch_id: &str,
        info: &Json,
        budget_micros: u64,
        idempotency_key: &str,
    ) -> Cmd {
        let config = &self.inner.config;
        let mut cmd = self.script_cmd(&scripts::BATCH_OPEN);
        cmd.arg(batch_id)
            .arg(info.to_string())
            .arg(budget_micros)
            .arg(&config.queue)
            .arg(idempotency_key)
            .arg(config.idempotency_ttl_secs.max(1));
        cmd
    }

    /// Seals a batch once all its jobs are enqueued; it is done when they are all terminal.
    pub async fn seal_batch(&self, batch_id: &str) -> Result<u64, QueueError> {
        let mut cmd = self.script_cmd(&scripts::BATCH_SEAL);
        cmd.arg(batch_id);
        let total: i64 = self.run_script(cmd).await?;
        if total < 0 {
            return Err(QueueError::BatchNotFound(batch_id.to_owned()));
        }
        self.replicated().await?;
        Ok(total as u64)
    }

    /// The job's record, or `None` if it does not exist (or has expired).
    pub async fn job(&self, job_id: &str) -> Result<Option<JobRecord>, QueueError> {
        let key = self.inner.keys.job(job_id);
        let fields: HashMap<String, String> = self
            .retrying(Duration::from_secs(5), || {
                let mut conn = self.inner.conn.clone();
                let key = key.clone();
                async move {
                    Ok(redis::cmd("HGETALL")
                        .arg(key)
                        .query_async(&mut conn)
                        .await?)
                }
            })
            .await?;
        Ok(JobRecord::from_hash(job_id, fields))
    }

    /// A job's state alone (one command), or `None` if it does not exist.
    pub async fn job_state(&self, job_id: &str) -> Result<Option<JobState>, QueueError> {
        let state: Option<String> = self
            .query(
                redis::cmd("HGET")
                    .arg(self.inner.keys.job(job_id))
                    .arg("state"),
            )
            .await?;
        Ok(state.and_then(|s| s.parse().ok()))
    }

    /// Records of many jobs in one round trip; missing ones are left out.
    pub async fn jobs(&self, job_ids: &[String]) -> Result<Vec<JobRecord>, QueueError> {
        if job_ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in job_ids {
            pipe.cmd("HGETALL").arg(self.inner.keys.job(id));
        }
        let hashes: Vec<HashMap<String, String>> = self.query_pipe(&pipe).await?;
        Ok(job_ids
            .iter()
            .zip(hashes)
            .filter_map(|(id, fields)| JobRecord::from_hash(id, fields))
            .collect())
    }

    pub async fn batch(&self, batch_id: &str) -> Result<Option<BatchRecord>, QueueError> {
        let key = self.inner.keys.batch(batch_id);
        let fields: HashMap<String, String> = self
            .retrying(Duration::from_secs(5), || {
                let mut conn = self.inner.conn.clone();
                let key = key.clone();
                async move {
                    Ok(redis::cmd("HGETALL")
                        .arg(key)
                        .query_async(&mut conn)
                        .await?)
                }
            })
            .await?;
        Ok(BatchRecord::from_hash(batch_id, fields))
    }

    /// Job ids of a batch in enqueue order, `limit` from `offset`.
    pub async fn batch_job_ids(
        &self,
        batch_id: &str,
        offset: u64,
        limit: u64,
    ) -> Result<Vec<String>, QueueError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let key = self.inner.keys.batch_jobs(batch_id);
        self.query(
            redis::cmd("LRANGE")
                .arg(key)
                .arg(offset)
                .arg(offset + limit - 1),
        )
        .await
    }

    /// Batch ids, newest first.
    pub async fn batch_ids(&self, offset: u64, limit: u64) -> Result<Vec<String>, QueueError> {
        self.newest(&self.inner.keys.batches(), offset, limit).await
    }

    /// Job ids of this queue, newest first (within the retention).
    pub async fn job_ids(&self, offset: u64, limit: u64) -> Result<Vec<String>, QueueError> {
        self.newest(
            &self.inner.keys.jobs_index(&self.inner.config.queue),
            offset,
            limit,
        )
        .await
    }

    async fn newest(&self, key: &str, offset: u64, limit: u64) -> Result<Vec<String>, QueueError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.query(
            redis::cmd("ZREVRANGE")
                .arg(key)
                .arg(offset)
                .arg(offset + limit - 1),
        )
        .await
    }

    /// Runs a pipeline of plain commands, retrying transient errors for a few seconds.
    pub(crate) async fn query_pipe<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, QueueError> {
        self.retrying(Duration::from_secs(5), || {
            let mut conn = self.inner.conn.clone();
            async move { Ok(pipe.query_async(&mut conn).await?) }
        })
        .await
    }

    pub(crate) async fn query<T: redis::FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
    ) -> Result<T, QueueError> {
        self.retrying(Duration::from_secs(5), || {
            let mut conn = self.inner.conn.clone();
            async move { Ok(cmd.query_async(&mut conn).await?) }
        })
        .await
    }

    /// Cancels a job that has not finished. A job a worker holds is cancelled at once; the
    /// worker notices at its next checkpoint. A provider run already created stays billed.
    pub async fn cancel(&self, job_id: &str, reason: &str) -> Result<CancelOutcome, QueueError> {
        let record = self
            .job(job_id)
            .await?
            // A job of another queue (a webhook delivery) is not this queue's to cancel.
            .filter(|record| record.queue == self.inner.config.queue)
            .ok_or_else(|| QueueError::NotFound(job_id.to_owned()))?;
        if record.state.is_terminal() {
            return Ok(CancelOutcome::AlreadyTerminal(record.state));
        }
        let has_run = record
            .checkpoint
            .as_ref()
            .and_then(|c| c.pointer("/provider/run_id"))
            .is_some_and(|run| !run.is_null());
        let cost_committed = has_run || record.state.is_active();
        let error = JobError {
            step: step_of(record.state).to_owned(),
            code: "CANCELLED".to_owned(),
            message: if cost_committed {
                format!("{reason}; the provider run was already created, so its cost is committed")
            } else {
                reason.to_owned()
            },
            details: Vec::new(),
            cost_committed,
        };
        let event = self.event_for(
            &record,
            JobState::Cancelled,
            Some(&error),
            EventExtras::default(),
        );
        let mut cmd = self.script_cmd(&scripts::CANCEL);
        cmd.arg(job_id)
            .arg(reason)
            .arg(serde_json::to_string(&error)?);
        push_event_args(&mut cmd, event.as_ref());
        let (outcome, previous): (String, String) = self.run_script(cmd).await?;
        let previous = previous.parse::<JobState>().ok();
        match (outcome.as_str(), previous) {
            ("cancelled", Some(previous)) => Ok(CancelOutcome::Cancelled {
                previous,
                cost_committed,
            }),
            ("terminal", Some(state)) => Ok(CancelOutcome::AlreadyTerminal(state)),
            ("missing", _) => Err(QueueError::NotFound(job_id.to_owned())),
            _ => Err(QueueError::Protocol(format!(
                "cancel replied {outcome} {previous:?}"
            ))),
        }
    }

    pub(crate) fn event_for(
        &self,
        record: &JobRecord,
        state: JobState,
        error: Option<&JobError>,
        extras: EventExtras,
    ) -> Option<completion::BuiltEvent> {
        if !self.inner.config.completion_events {
            return None;
        }
        completion::build(
            &EventSubject {
                job_id: &record.id,
                batch_id: record.batch_id.as_deref(),
                redrives: record.redrives,
                payload: &record.payload,
            },
            state,
            error,
            extras,
            now_ms(),
        )
    }

    /// Dead jobs of this queue, most recent first.
    pub async fn dead_letters(
        &self,
        offset: u64,
        limit: u64,
    ) -> Result<Vec<JobRecord>, QueueError> {
        let ids = self
            .newest(
                &self.inner.keys.dead(&self.inner.config.queue),
                offset,
                limit,
            )
            .await?;
        self.jobs(&ids).await
    }

    /// Number of dead jobs of this queue (within the retention).
    pub async fn dead_letter_count(&self) -> Result<u64, QueueError> {
        self.query(redis::cmd("ZCARD").arg(self.inner.keys.dead(&self.inner.config.queue)))
            .await
    }

    /// Re-drives one dead or failed job: attempts reset, back to ready (resuming from its
    /// checkpoint), a new completion event later.
    pub async fn redrive(&self, job_id: &str) -> Result<RedriveOutcome, QueueError> {
        let mut cmd = self.script_cmd(&scripts::REDRIVE);
        cmd.arg(job_id).arg(&self.inner.config.queue);
        let previous: String = self.run_script(cmd).await?;
        match previous.as_str() {
            "" => Err(QueueError::NotFound(job_id.to_owned())),
            "redriven" => Ok(RedriveOutcome::Redriven),
            other => Ok(RedriveOutcome::NotDead(
                other.parse().map_err(|e: String| QueueError::Protocol(e))?,
            )),
        }
    }

    /// Re-drives every dead job of this queue (in pages); returns how many.
    pub async fn redrive_all(&self) -> Result<u64, QueueError> {
        let mut n_redriven = 0;
        loop {
            let ids: Vec<String> = self
                .newest(&self.inner.keys.dead(&self.inner.config.queue), 0, 500)
                .await?;
            if ids.is_empty() {
                return Ok(n_redriven);
            }
            for id in &ids {
                if let Ok(RedriveOutcome::Redriven) = self.redrive(id).await {
                    n_redriven += 1;
                }
            }
        }
    }

    /// Moves due delayed jobs to ready, in bounded steps; returns how many moved.
    pub async fn promote_due(&self) -> Result<u64, QueueError> {
        let limit = self.inner.config.promote_batch.max(1);
        let mut n_moved = 0;
        loop {
            let mut cmd = self.script_cmd(&scripts::PROMOTE);
            cmd.arg(&self.inner.config.queue).arg(limit);
            let moved: u64 = self.run_script(cmd).await?;
            n_moved += moved;
            if moved < limit as u64 {
                return Ok(n_moved);
            }
        }
    }

    /// Queue depth: waiting, in flight, scheduled, dead, and the oldest waiting job's age.
    pub async fn stats(&self) -> Result<QueueStats, QueueError> {
        let queue = &self.inner.config.queue;
        let keys = &self.inner.keys;
        let mut stats = QueueStats {
            queue: queue.clone(),
            ..QueueStats::default()
        };
        let now = now_ms();
        for priority in Priority::ALL {
            let stream = keys.ready(queue, priority);
            let mut pipe = redis::pipe();
            pipe.cmd("XLEN").arg(&stream);
            pipe.cmd("XINFO").arg("GROUPS").arg(&stream);
            let (len, groups): (u64, Value) = match self.query_pipe(&pipe).await {
                Ok(reply) => reply,
                // No stream yet: nothing was ever enqueued at this priority.
                Err(QueueError::Redis(error)) if error.code() == Some("ERR") => continue,
                Err(error) => return Err(error),
            };
            let (pending, last_delivered) = group_info(&groups);
            let waiting = len.saturating_sub(pending);
            stats.in_flight += pending;
            stats.waiting += waiting;
            stats
                .waiting_by_priority
                .insert(priority.as_str().to_owned(), waiting);
            if waiting > 0 {
                let start = match &last_delivered {
                    Some(id) if id != "0-0" => format!("({id}"),
                    _ => "-".to_owned(),
                };
                let first: Value = self
                    .query(
                        redis::cmd("XRANGE")
                            .arg(&stream)
                            .arg(start)
                            .arg("+")
                            .arg("COUNT")
                            .arg(1),
                    )
                    .await?;
                if let Some(ms) = first_entry_ms(&first) {
                    stats.oldest_waiting_ms = stats.oldest_waiting_ms.max(now.saturating_sub(ms));
                }
            }
        }
        let mut pipe = redis::pipe();
        pipe.cmd("ZCARD").arg(keys.delayed(queue));
        pipe.cmd("ZCARD").arg(keys.dead(queue));
        let (scheduled, dead): (u64, u64) = self.query_pipe(&pipe).await?;
        stats.scheduled = scheduled;
        stats.dead = dead;
        Ok(stats)
    }

    /// Events after `cursor` (`0` or `0-0` for the start, `$` for new ones only). With
    /// `block`, waits up to that long for one on a dedicated connection.
    pub async fn read_events(
        &self,
        cursor: &str,
        count: usize,
        block: Option<Duration>,
    ) -> Result<Vec<StoredEvent>, QueueError> {
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT").arg(count.max(1));
        if let Some(block) = block {
            cmd.arg("BLOCK").arg(block.as_millis() as u64);
        }
        cmd.arg("STREAMS").arg(self.inner.keys.events()).arg(cursor);
        let reply: Value = match block {
            Some(block) => {
                let mut conn = self
                    .dedicated_connection(block + self.inner.config.command_timeout())
                    .await?;
                cmd.query_async(&mut conn).await?
            }
            None => self.query(&cmd).await?,
        };
        Ok(parse_streams(&reply)
            .into_iter()
            .flat_map(|(_stream, entries)| entries)
            .map(|(cursor, fields)| StoredEvent::from_fields(cursor, &fields))
            .collect())
    }

    /// The newest `count` events, oldest first.
    pub async fn recent_events(&self, count: usize) -> Result<Vec<StoredEvent>, QueueError> {
        let reply: Value = self
            .query(
                redis::cmd("XREVRANGE")
                    .arg(self.inner.keys.events())
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(count.max(1)),
            )
            .await?;
        let mut events: Vec<StoredEvent> = parse_entries(&reply)
            .into_iter()
            .map(|(cursor, fields)| StoredEvent::from_fields(cursor, &fields))
            .collect();
        events.reverse();
        Ok(events)
    }

    /// This queue's counters, kept by the scripts: `finished:<state>` (jobs that ended in each
    /// terminal state), `charged_micros` (spend reported by the provider) and
    /// `reserved_micros` (estimated cost reserved at submit).
    pub async fn counters(&self) -> Result<HashMap<String, u64>, QueueError> {
        self.query(redis::cmd("HGETALL").arg(self.inner.keys.stats(&self.inner.config.queue)))
            .await
    }

    /// Number of events in the stream (bounded by `events_max_len`).
    pub async fn events_len(&self) -> Result<u64, QueueError> {
        self.query(redis::cmd("XLEN").arg(self.inner.keys.events()))
            .await
    }
}

/// The pipeline step a job in `state` was in.
/// Jittered exponential backoff from 50 ms to 2 s. The jitter is random per process (backon's
/// `std` feature), so replicas that lost Redis at the same moment do not retry in lockstep.
fn retry_policy() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(2))
        .with_jitter()
}

pub(crate) fn step_of(state: JobState) -> &'static str {
    match state {
        JobState::Submitting => "submit",
        JobState::Generating => "generate",
        JobState::Downloading => "download",
        JobState::Uploading => "upload",
        JobState::Publishing => "publish",
        _ => "queue",
    }
}

/// Appends the event arguments scripts take: id, type, body (empty strings for none).
pub(crate) fn push_event_args(cmd: &mut Cmd, event: Option<&completion::BuiltEvent>) {
    match event {
        Some(event) => cmd.arg(&event.id).arg(event.event_type).arg(&event.body),
        None => cmd.arg("").arg("").arg(""),
    };
}

fn noscript() -> redis::ErrorKind {
    redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
}

/// One script command or a pipeline of them.
pub(crate) enum ScriptBatch {
    One(Cmd),
    Many(redis::Pipeline),
}

impl ScriptBatch {
    async fn query<T: redis::FromRedisValue>(
        &self,
        conn: &mut SharedConn,
    ) -> redis::RedisResult<T> {
        match self {
            ScriptBatch::One(cmd) => cmd.query_async(conn).await,
            ScriptBatch::Many(pipe) => pipe.query_async(conn).await,
        }
    }
}

/// Pending count and last-delivered id of the `workers` group from an XINFO GROUPS reply.
fn group_info(reply: &Value) -> (u64, Option<String>) {
    let Value::Array(groups) = reply else {
        return (0, None);
    };
    for group in groups {
        let fields = flat_map(group);
        if fields.get("name").map(String::as_str) == Some(GROUP) {
            let pending = fields
                .get("pending")
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            return (pending, fields.get("last-delivered-id").cloned());
        }
    }
    (0, None)
}

/// Milliseconds part of the first entry id in an XRANGE reply.
fn first_entry_ms(reply: &Value) -> Option<u64> {
    let Value::Array(entries) = reply else {
        return None;
    };
    let Value::Array(entry) = entries.first()? else {
        return None;
    };
    let id = value_string(entry.first()?)?;
    id.split('-').next()?.parse().ok()
}

/// A reply's flat field/value array (or RESP3 map) as a string map.
pub(crate) fn flat_map(value: &Value) -> HashMap<String, String> {
    let mut map = HashMap::new();
    match value {
        Value::Array(items) => {
            for pair in items.chunks(2) {
                if let [key, value] = pair
                    && let (Some(key), Some(value)) = (value_string(key), value_string(value))
                {
                    map.insert(key, value);
                }
            }
        }
        Value::Map(pairs) => {
            for (key, value) in pairs {
                if let (Some(key), Some(value)) = (value_string(key), value_string(value)) {
                    map.insert(key, value);
                }
            }
        }
        _ => {}
    }
    map
}

/// A scalar reply as a string.
pub(crate) fn value_string(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
        Value::SimpleString(text) => Some(text.clone()),
        Value::Int(n) => Some(n.to_string()),
        Value::Okay => Some("OK".to_owned()),
        Value::Double(d) => Some(d.to_string()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        _ => None,
    }
}

/// Stream entries from an XREAD/XREADGROUP reply: per stream, (entry id, fields).
pub(crate) fn parse_streams(reply: &Value) -> Vec<(String, Vec<StreamEntry>)> {
    let mut streams = Vec::new();
    let items: Vec<(&Value, &Value)> = match reply {
        Value::Array(items) => items
            .iter()
            .filter_map(|item| match item {
                Value::Array(pair) if pair.len() == 2 => Some((&pair[0], &pair[1])),
                _ => None,
            })
            .collect(),
        Value::Map(pairs) => pairs.iter().map(|(k, v)| (k, v)).collect(),
        _ => Vec::new(),
    };
    for (name, entries) in items {
        let Some(name) = value_string(name) else {
            continue;
        };
        streams.push((name, parse_entries(entries)));
    }
    streams
}

/// One stream entry: its id and fields.
pub(crate) type StreamEntry = (String, HashMap<String, String>);

/// Entries of one stream: `[[id, [field, value, ...]], ...]`. Deleted entries (nil fields)
/// are kept with no fields.
pub(crate) fn parse_entries(value: &Value) -> Vec<StreamEntry> {
    let Value::Array(entries) = value else {
        return Vec::new();
    };
    entries
        .iter()
        .filter_map(|entry| match entry {
            Value::Array(parts) if !parts.is_empty() => {
                let id = value_string(&parts[0])?;
                let fields = parts.get(1).map(flat_map).unwrap_or_default();
                Some((id, fields))
            }
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use backon::BackoffBuilder;

    use super::*;

    #[test]
    fn retry_jitter_differs_between_backoffs() {
        // Two backoffs stand for two processes: a fixed seed would give both the same delays.
        let delays = || retry_policy().build().take(4).collect::<Vec<_>>();
        let first = delays();
        assert!(
            (0..8).any(|_| delays() != first),
            "every backoff waits {first:?}"
        );
    }
}
