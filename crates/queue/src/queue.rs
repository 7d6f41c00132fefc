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
use crate::partition::{MAX_PARTITIONS, Partitions};
use crate::record::{BatchRecord, JobRecord, QueueStats};
use crate::scripts;
use crate::wire;

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
    /// The job's tenant (`None`: `default`), kept on the job for per-tenant counts.
    pub tenant: Option<String>,
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
            tenant: None,
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
    /// The namespace's partitions; partition 0 also holds the global keys.
    pub(crate) parts: Partitions,
    /// How this process reaches Redis (shared by every clone and `for_queue` copy).
    redis: Arc<Redis>,
    pub(crate) conn: SharedConn,
    /// Transient Redis errors seen by this process, per kind.
    errors: Arc<ErrorCounters>,
    /// Per partition, a key in its slot: every script names it as KEYS[1] so Cluster routes it.
    route_keys: Arc<[String]>,
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
        if !(1..=MAX_PARTITIONS).contains(&config.partitions) {
            return Err(QueueError::PartitionsOutOfRange {
                value: config.partitions,
                max: MAX_PARTITIONS,
            });
        }
        let parts = Partitions::new(&config.namespace, config.partitions);
        let route_keys: Arc<[String]> = parts.all().map(|(_, keys)| keys.route()).collect();
        let redis = Redis::connect(&config, &route_keys[0])
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
        let queue = Self {
            inner: Arc::new(Inner {
                config,
                parts,
                conn,
                redis: Arc::new(redis),
                errors: Arc::default(),
                route_keys,
                fail_fast: false,
            }),
        };
        queue.check_partitions().await?;
        Ok(queue)
    }

    fn with(&self, config: QueueConfig, fail_fast: bool) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                parts: self.inner.parts.clone(),
                redis: self.inner.redis.clone(),
                conn: self.inner.conn.clone(),
                errors: self.inner.errors.clone(),
                route_keys: self.inner.route_keys.clone(),
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

    /// What was found at `redis_url`: mode, primaries, the namespace's slot and its owner, and
    /// the shards its partitions live on.
    pub async fn topology(&self) -> Topology {
        self.inner.redis.topology(&self.inner.route_keys).await
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
    pub(crate) async fn replicated(&self, partition: usize) -> Result<(), QueueError> {
        let config = &self.inner.config;
        let wanted = config.min_replicas_ack;
        if wanted == 0 {
            return Ok(());
        }
        let timeout_ms = config.replica_ack_timeout_ms.max(1);
        let acked = self
            .inner
            .redis
            .wait_replicas(wanted, timeout_ms, self.route_key(partition))
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

    /// The namespace's global keys (partition 0's): limits, budgets, pauses, webhook records.
    pub fn keys(&self) -> &Keys {
        self.inner.parts.global()
    }

    /// How the namespace's jobs are spread over hash tags.
    pub fn partitions(&self) -> &Partitions {
        &self.inner.parts
    }

    /// A key in partition `p`'s slot, for routing.
    pub(crate) fn route_key(&self, p: usize) -> &str {
        &self.inner.route_keys[p % self.inner.route_keys.len()]
    }

    pub fn name(&self) -> &str {
        &self.inner.config.queue
    }

    /// The shared, multiplexed, reconnecting connection.
    pub(crate) fn connection(&self) -> SharedConn {
        self.inner.conn.clone()
    }

    /// A new connection of its own to the node owning partition `p`'s slot, for blocking
    /// reads that must not stall shared traffic. After a failover or a slot move its
    /// commands fail (transient errors): open a new one.
    pub async fn dedicated_connection(
        &self,
        response_timeout: Duration,
        p: usize,
    ) -> Result<Dedicated, QueueError> {
        self.inner
            .redis
            .dedicated(response_timeout, self.route_key(p))
            .await
            .inspect_err(|error| self.record_error(error))
    }

    /// An EVALSHA of `script` in partition `p` with the prelude's arguments (prefix,
    /// retention, events length); the script's own arguments are appended by the caller.
    pub(crate) fn script_cmd_in(&self, script: &Script, p: usize) -> Cmd {
        let config = &self.inner.config;
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(script.get_hash())
            .arg(1)
            .arg(self.route_key(p))
            .arg(self.inner.parts.keys(p).prefix())
            .arg(config.retention_secs.max(1))
            .arg(config.events_max_len.max(1));
        cmd
    }

    /// A script command in partition `p` carrying `header` (see [`crate::wire`]).
    pub(crate) fn call<H: wire::Record>(&self, script: &Script, p: usize, header: &H) -> Cmd {
        let mut cmd = self.script_cmd_in(script, p);
        wire::write_header(&mut cmd, header);
        cmd
    }

    /// A script command in partition `p` carrying `header` and `items` (see [`crate::wire`]).
    pub(crate) fn call_items<'a, H: wire::Record, I: wire::Record + 'a>(
        &self,
        script: &Script,
        p: usize,
        header: &H,
        items: impl IntoIterator<Item = &'a I>,
    ) -> Cmd {
        let mut cmd = self.script_cmd_in(script, p);
        wire::write_call(&mut cmd, header, items);
        cmd
    }

    /// Loads every script (after a Redis restart or SCRIPT FLUSH emptied the cache).
    async fn load_scripts(conn: &mut SharedConn) -> Result<(), QueueError> {
        for script in scripts::all() {
            script.prepare_invoke().load_async(conn).await?;
        }
        Ok(())
    }

    /// Runs a script command, reloading the scripts once on NOSCRIPT, and again
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

    /// One enqueue script call in partition `p` for `jobs` (one script run); each job goes
    /// with the id it is stored under.
    fn enqueue_cmd(&self, p: usize, batch: &str, jobs: &[(&NewJob, String)]) -> Cmd {
        let config = &self.inner.config;
        let items: Vec<EnqueueItem<'_>> = jobs
            .iter()
            .map(|(job, id)| EnqueueItem {
                id,
                payload: &job.payload,
                prio: job.priority.as_str(),
                max_attempts: job.max_attempts.unwrap_or(config.max_attempts).max(1),
                run_at_ms: job.run_at_ms.unwrap_or(0),
                idem: job.idempotency_key.as_deref(),
                est_micros: job.estimated_micros,
                trace: job.trace.map(|t| t.to_string()),
                tenant: job.tenant.as_deref(),
            })
            .collect();
        self.call_items(
            &scripts::ENQUEUE,
            p,
            &EnqueueHeader {
                queue: &config.queue,
                idem_ttl: config.idempotency_ttl_secs.max(1),
                batch,
            },
            &items,
        )
    }

    /// The partition a new job goes to: its batch's, its idempotency key's, or its id's.
    pub fn partition_for(&self, job: &NewJob, batch: Option<&str>) -> usize {
        let parts = &self.inner.parts;
        match (batch, &job.idempotency_key) {
            (Some(batch), _) => parts.of(batch),
            (None, Some(key)) => parts.of_key(&self.inner.config.queue, key),
            (None, None) => parts.of(&job.id.to_string()),
        }
    }

    /// A fresh id for a job that will be enqueued with `batch` and `idempotency_key`: one
    /// that lives in the job's partition, so [`Queue::enqueue_many`] keeps it.
    ///
    /// An idempotency key finds its first job only within its partition: a single job's key
    /// is looked up where the key hashes, a batch job's in its batch's partition. With one
    /// partition (the default) that is the whole namespace.
    pub fn new_job_id(&self, batch: Option<&str>, idempotency_key: Option<&str>) -> JobId {
        let parts = &self.inner.parts;
        match (batch, idempotency_key) {
            (Some(batch), _) => parts.id_in(parts.of(batch)),
            (None, Some(key)) => parts.id_in(parts.of_key(&self.inner.config.queue, key)),
            (None, None) => JobId::new(),
        }
    }

    /// Enqueues one job (with its optional batch, which must be open).
    pub async fn enqueue(&self, job: &NewJob, batch: Option<&str>) -> Result<Enqueued, QueueError> {
        let mut replies = self.enqueue_many(std::slice::from_ref(job), batch).await?;
        replies
            .pop()
            .ok_or_else(|| QueueError::Protocol("enqueue returned nothing".to_owned()))
    }

    /// Enqueues many jobs, `enqueue_chunk` per script call, with a few calls pipelined per
    /// round trip, each partition's calls on their own (in a cluster they go to different
    /// shards). A job whose id does not live in its partition (see [`Queue::partition_for`])
    /// is stored under an id derived from it that does (the same one on every call, so a
    /// re-run finds it): the replies say which, in the jobs' order. [`Queue::new_job_id`]
    /// gives ids that stay.
    /// Re-running a call after a dropped connection is harmless: enqueue is idempotent per
    /// job id and idempotency key.
    pub async fn enqueue_many(
        &self,
        jobs: &[NewJob],
        batch: Option<&str>,
    ) -> Result<Vec<Enqueued>, QueueError> {
        let parts = &self.inner.parts;
        let mut by_partition: Vec<Vec<(usize, &NewJob, String)>> = vec![Vec::new(); parts.len()];
        for (index, job) in jobs.iter().enumerate() {
            let p = self.partition_for(job, batch);
            let id = job.id.to_string();
            let id = if parts.of(&id) == p {
                id
            } else {
                parts.id_like(&job.id, p).to_string()
            };
            by_partition[p].push((index, job, id));
        }
        let mut results: Vec<Option<Enqueued>> = vec![None; jobs.len()];
        for (p, placed) in by_partition.iter().enumerate() {
            if placed.is_empty() {
                continue;
            }
            let enqueued = self.enqueue_in(p, batch.unwrap_or(""), placed).await?;
            for ((index, _, _), outcome) in placed.iter().zip(enqueued) {
                results[*index] = Some(outcome);
            }
            self.replicated(p).await?;
        }
        results
            .into_iter()
            .map(|outcome| {
                outcome.ok_or_else(|| QueueError::Protocol("enqueue reply missing".to_owned()))
            })
            .collect()
    }

    async fn enqueue_in(
        &self,
        p: usize,
        batch: &str,
        placed: &[(usize, &NewJob, String)],
    ) -> Result<Vec<Enqueued>, QueueError> {
        use futures::stream::{StreamExt, TryStreamExt};
        let chunk_size = self.inner.config.enqueue_chunk.clamp(1, 2_000);
        // A few script calls in flight at once: Redis runs one while the next is sent, and
        // replies come back in order.
        let calls: Vec<_> = placed
            .chunks(chunk_size)
            .map(|chunk| {
                let jobs: Vec<(&NewJob, String)> = chunk
                    .iter()
                    .map(|(_, job, id)| (*job, id.clone()))
                    .collect();
                let call = ScriptBatch::One(self.enqueue_cmd(p, batch, &jobs));
                async move {
                    self.run_scripts::<Vec<Value>>(&call, Duration::from_secs(30))
                        .await
                }
            })
            .collect();
        let replies: Vec<Vec<Value>> = futures::stream::iter(calls)
            .buffered(3)
            .try_collect()
            .await?;
        let mut results = Vec::with_capacity(placed.len());
        for reply in replies {
            for pair in reply.chunks(2) {
                let created = matches!(pair.first(), Some(Value::Int(1)));
                let id = pair.get(1).and_then(value_string).ok_or_else(|| {
                    QueueError::Protocol("enqueue reply without an id".to_owned())
                })?;
                results.push(Enqueued { id, created });
            }
        }
        Ok(results)
    }

    /// A fresh batch id. With `hint` (e.g. the idempotency key of the batch's first job) the
    /// batch lives where the hint hashes, so a retried submission of the same jobs lands in
    /// the same partition and their keys find the first jobs.
    pub fn new_batch_id(&self, hint: Option<&str>) -> String {
        let parts = &self.inner.parts;
        match hint {
            Some(key) => parts.id_in(parts.of_key(&self.inner.config.queue, key)),
            None => JobId::new(),
        }
        .to_string()
    }

    /// Opens a batch before its jobs are enqueued. `info` is kept as the batch's description.
    pub async fn open_batch(
        &self,
        batch_id: &str,
        info: &Json,
        budget_micros: u64,
    ) -> Result<(), QueueError> {
        let p = self.inner.parts.of(batch_id);
        let _: String = self
            .run_script(self.open_batch_cmd(p, batch_id, info, budget_micros, ""))
            .await?;
        self.replicated(p).await
    }

    /// Opens a batch under a batch idempotency key, in one script: the first call within
    /// `idempotency_ttl_secs` claims the key for a new batch id; a later one opens the first
    /// batch again instead (a no-op when its record exists), so a retried submission resumes
    /// it. Safe to run twice. The batch lives in the key's partition.
    pub async fn open_batch_idempotent(
        &self,
        info: &Json,
        budget_micros: u64,
        idempotency_key: &str,
    ) -> Result<OpenedBatch, QueueError> {
        let parts = &self.inner.parts;
        let p = parts.of_key(&self.inner.config.queue, idempotency_key);
        let batch_id = parts.id_in(p).to_string();
        let id: String = self
            .run_script(self.open_batch_cmd(p, &batch_id, info, budget_micros, idempotency_key))
            .await?;
        self.replicated(p).await?;
        Ok(OpenedBatch {
            created: id == batch_id,
            id,
        })
    }

    fn open_batch_cmd(
        &self,
        p: usize,
        batch_id: &str,
        info: &Json,
        budget_micros: u64,
        idempotency_key: &str,
    ) -> Cmd {
        let config = &self.inner.config;
        self.call(
            &scripts::BATCH_OPEN,
            p,
            &BatchOpenHeader {
                batch: batch_id,
                info: info.to_string(),
                budget_micros,
                queue: &config.queue,
                idem: idempotency_key,
                idem_ttl: config.idempotency_ttl_secs.max(1),
            },
        )
    }

    /// Resumes a batch its failure guard paused: the jobs it held are submitted again, and
    /// the guard counts from now. Returns how many held jobs were woken.
    pub async fn resume_batch(&self, batch_id: &str) -> Result<u64, QueueError> {
        let p = self.inner.parts.of(batch_id);
        let cmd = self.call(&scripts::BATCH_RESUME, p, &BatchHeader { batch: batch_id });
        let woken: i64 = self.run_script(cmd).await?;
        if woken < 0 {
            return Err(QueueError::BatchNotFound(batch_id.to_owned()));
        }
        Ok(woken as u64)
    }

    /// Seals a batch once all its jobs are enqueued; it is done when they are all terminal.
    pub async fn seal_batch(&self, batch_id: &str) -> Result<u64, QueueError> {
        let p = self.inner.parts.of(batch_id);
        let cmd = self.call(&scripts::BATCH_SEAL, p, &BatchHeader { batch: batch_id });
        let total: i64 = self.run_script(cmd).await?;
        if total < 0 {
            return Err(QueueError::BatchNotFound(batch_id.to_owned()));
        }
        self.replicated(p).await?;
        Ok(total as u64)
    }

    /// The keys of the partition `id` (a job's or a batch's) lives in.
    pub(crate) fn keys_of(&self, id: &str) -> &Keys {
        let parts = &self.inner.parts;
        parts.keys(parts.of(id))
    }

    /// The job's record, or `None` if it does not exist (or has expired).
    pub async fn job(&self, job_id: &str) -> Result<Option<JobRecord>, QueueError> {
        let fields: HashMap<String, String> = self
            .query(redis::cmd("HGETALL").arg(self.keys_of(job_id).job(job_id)))
            .await?;
        Ok(JobRecord::from_hash(job_id, fields))
    }

    /// A job's state alone (one command), or `None` if it does not exist.
    pub async fn job_state(&self, job_id: &str) -> Result<Option<JobState>, QueueError> {
        let state: Option<String> = self
            .query(
                redis::cmd("HGET")
                    .arg(self.keys_of(job_id).job(job_id))
                    .arg("state"),
            )
            .await?;
        Ok(state.and_then(|s| s.parse().ok()))
    }

    /// Records of many jobs, one round trip per partition; missing ones are left out.
    pub async fn jobs(&self, job_ids: &[String]) -> Result<Vec<JobRecord>, QueueError> {
        if job_ids.is_empty() {
            return Ok(Vec::new());
        }
        let parts = &self.inner.parts;
        let mut pipes: Vec<(redis::Pipeline, Vec<usize>)> = (0..parts.len())
            .map(|_| (redis::pipe(), Vec::new()))
            .collect();
        for (index, id) in job_ids.iter().enumerate() {
            let (pipe, indexes) = &mut pipes[parts.of(id)];
            pipe.cmd("HGETALL").arg(parts.keys(parts.of(id)).job(id));
            indexes.push(index);
        }
        let mut hashes: Vec<Option<HashMap<String, String>>> = vec![None; job_ids.len()];
        for (pipe, indexes) in &pipes {
            if indexes.is_empty() {
                continue;
            }
            let replies: Vec<HashMap<String, String>> = self.query_pipe(pipe).await?;
            for (index, fields) in indexes.iter().zip(replies) {
                hashes[*index] = Some(fields);
            }
        }
        Ok(job_ids
            .iter()
            .zip(hashes)
            .filter_map(|(id, fields)| JobRecord::from_hash(id, fields?))
            .collect())
    }

    pub async fn batch(&self, batch_id: &str) -> Result<Option<BatchRecord>, QueueError> {
        let fields: HashMap<String, String> = self
            .query(redis::cmd("HGETALL").arg(self.keys_of(batch_id).batch(batch_id)))
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
        let key = self.keys_of(batch_id).batch_jobs(batch_id);
        self.query(
            redis::cmd("LRANGE")
                .arg(key)
                .arg(offset)
                .arg(offset + limit - 1),
        )
        .await
    }

    /// Batch ids, newest first (over every partition).
    pub async fn batch_ids(&self, offset: u64, limit: u64) -> Result<Vec<String>, QueueError> {
        self.newest(Keys::batches, offset, limit).await
    }

    /// Job ids of this queue, newest first (within the retention, over every partition).
    pub async fn job_ids(&self, offset: u64, limit: u64) -> Result<Vec<String>, QueueError> {
        let queue = self.inner.config.queue.clone();
        self.newest(|keys| keys.jobs_index(&queue), offset, limit)
            .await
    }

    /// Members of a sorted set kept per partition (`key` names it), highest score (newest)
    /// first, `limit` from `offset` in the merged order.
    async fn newest(
        &self,
        key: impl Fn(&Keys) -> String,
        offset: u64,
        limit: u64,
    ) -> Result<Vec<String>, QueueError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let parts = &self.inner.parts;
        if parts.len() == 1 {
            return self
                .query(
                    redis::cmd("ZREVRANGE")
                        .arg(key(parts.global()))
                        .arg(offset)
                        .arg(offset + limit - 1),
                )
                .await;
        }
        let mut merged: Vec<(String, f64)> = Vec::new();
        for (_, keys) in parts.all() {
            let page: Vec<(String, f64)> = self
                .query(
                    redis::cmd("ZREVRANGE")
                        .arg(key(keys))
                        .arg(0)
                        .arg(offset + limit - 1)
                        .arg("WITHSCORES"),
                )
                .await?;
            merged.extend(page);
        }
        merged.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| b.0.cmp(&a.0)));
        Ok(merged
            .into_iter()
            .skip(offset as usize)
            .take(limit as usize)
            .map(|(id, _)| id)
            .collect())
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
        let error = serde_json::to_string(&error)?;
        let cmd = self.call(
            &scripts::CANCEL,
            self.inner.parts.of(job_id),
            &CancelHeader {
                id: job_id,
                reason,
                error: &error,
                event_id: event.as_ref().map(|e| e.id.as_str()),
                event_type: event.as_ref().map(|e| e.event_type),
                event: event.as_ref().map(|e| e.body.as_str()),
            },
        );
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
                metadata: record
                    .payload
                    .get("metadata")
                    .filter(|m| !m.is_null())
                    .cloned(),
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
        let queue = self.inner.config.queue.clone();
        let ids = self.newest(|keys| keys.dead(&queue), offset, limit).await?;
        self.jobs(&ids).await
    }

    /// Number of dead jobs of this queue (within the retention).
    pub async fn dead_letter_count(&self) -> Result<u64, QueueError> {
        let queue = &self.inner.config.queue;
        let mut total = 0;
        for (_, keys) in self.inner.parts.all() {
            let n: u64 = self
                .query(redis::cmd("ZCARD").arg(keys.dead(queue)))
                .await?;
            total += n;
        }
        Ok(total)
    }

    /// Re-drives one dead or failed job: attempts reset, back to ready (resuming from its
    /// checkpoint), a new completion event later.
    pub async fn redrive(&self, job_id: &str) -> Result<RedriveOutcome, QueueError> {
        let cmd = self.call(
            &scripts::REDRIVE,
            self.inner.parts.of(job_id),
            &RedriveHeader {
                id: job_id,
                queue: &self.inner.config.queue,
            },
        );
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
        let queue = self.inner.config.queue.clone();
        let mut n_redriven = 0;
        loop {
            let ids: Vec<String> = self.newest(|keys| keys.dead(&queue), 0, 500).await?;
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

    /// Moves due delayed jobs to ready in every partition, in bounded steps; returns how
    /// many moved. A partition that fails (its shard failing over) does not hold up the
    /// others; its error comes back once they are done.
    pub async fn promote_due(&self) -> Result<u64, QueueError> {
        let limit = self.inner.config.promote_batch.max(1);
        let mut n_moved = 0;
        let mut failure = None;
        for p in 0..self.inner.parts.len() {
            loop {
                let cmd = self.call(
                    &scripts::PROMOTE,
                    p,
                    &PromoteHeader {
                        queue: &self.inner.config.queue,
                        limit: limit as u64,
                    },
                );
                match self.run_script::<u64>(cmd).await {
                    Ok(moved) => {
                        n_moved += moved;
                        if moved < limit as u64 {
                            break;
                        }
                    }
                    Err(error) => {
                        failure = Some(error);
                        break;
                    }
                }
            }
        }
        match failure {
            Some(error) => Err(error),
            None => Ok(n_moved),
        }
    }

    /// Queue depth over every partition: waiting, in flight, scheduled, dead, and the oldest
    /// waiting job's age.
    pub async fn stats(&self) -> Result<QueueStats, QueueError> {
        let queue = &self.inner.config.queue;
        let mut stats = QueueStats {
            queue: queue.clone(),
            ..QueueStats::default()
        };
        let now = now_ms();
        for (_, keys) in self.inner.parts.all() {
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
                *stats
                    .waiting_by_priority
                    .entry(priority.as_str().to_owned())
                    .or_default() += waiting;
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
                        stats.oldest_waiting_ms =
                            stats.oldest_waiting_ms.max(now.saturating_sub(ms));
                    }
                }
            }
            let mut pipe = redis::pipe();
            pipe.cmd("ZCARD").arg(keys.delayed(queue));
            pipe.cmd("ZCARD").arg(keys.dead(queue));
            pipe.cmd("HGET").arg(keys.stats(queue)).arg("parked");
            let (delayed, dead, parked): (u64, u64, Option<i64>) = self.query_pipe(&pipe).await?;
            // Parked jobs wait in the delayed set (or, woken, on a ready stream).
            let parked = parked.unwrap_or(0).max(0) as u64;
            stats.scheduled += delayed.saturating_sub(parked);
            stats.parked += parked;
            stats.dead += dead;
        }
        Ok(stats)
    }

    /// This queue's counters, kept by the scripts and summed over the partitions:
    /// `finished:<state>` (jobs that ended in each terminal state), `charged_micros` (spend
    /// reported by the provider) and `reserved_micros` (estimated cost reserved at submit).
    pub async fn counters(&self) -> Result<HashMap<String, u64>, QueueError> {
        let mut total: HashMap<String, u64> = HashMap::new();
        for (_, keys) in self.inner.parts.all() {
            let counters: HashMap<String, i64> = self
                .query(redis::cmd("HGETALL").arg(keys.stats(&self.inner.config.queue)))
                .await?;
            for (name, value) in counters {
                *total.entry(name).or_default() += value.max(0) as u64;
            }
        }
        Ok(total)
    }
}

/// Jittered exponential backoff from 50 ms to 2 s. The jitter is random per process (backon's
/// `std` feature), so replicas that lost Redis at the same moment do not retry in lockstep.
fn retry_policy() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(2))
        .with_jitter()
}

/// The pipeline step a job in `state` was in.
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

wire::record! {
    /// `enqueue.lua`'s header.
    struct EnqueueHeader<'a> {
        queue: &'a str,
        idem_ttl: u64,
        batch: &'a str,
    }
}

wire::record! {
    /// One job of `enqueue.lua`.
    struct EnqueueItem<'a> {
        id: &'a str,
        payload: &'a str,
        prio: &'a str,
        max_attempts: u32,
        run_at_ms: u64,
        idem: Option<&'a str>,
        est_micros: u64,
        trace: Option<String>,
        tenant: Option<&'a str>,
    }
}

wire::record! {
    /// `batch_open.lua`'s header.
    struct BatchOpenHeader<'a> {
        batch: &'a str,
        info: String,
        budget_micros: u64,
        queue: &'a str,
        idem: &'a str,
        idem_ttl: u64,
    }
}

wire::record! {
    /// `batch_seal.lua`'s header.
    struct BatchHeader<'a> {
        batch: &'a str,
    }
}

wire::record! {
    /// `cancel.lua`'s header.
    struct CancelHeader<'a> {
        id: &'a str,
        reason: &'a str,
        error: &'a str,
        event_id: Option<&'a str>,
        event_type: Option<&'a str>,
        event: Option<&'a str>,
    }
}

wire::record! {
    /// `redrive.lua`'s header.
    struct RedriveHeader<'a> {
        id: &'a str,
        queue: &'a str,
    }
}

wire::record! {
    /// `promote.lua`'s header.
    struct PromoteHeader<'a> {
        queue: &'a str,
        limit: u64,
    }
}

fn noscript() -> redis::ErrorKind {
    redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
}

/// One script command.
pub(crate) enum ScriptBatch {
    One(Cmd),
}

impl ScriptBatch {
    async fn query<T: redis::FromRedisValue>(
        &self,
        conn: &mut SharedConn,
    ) -> redis::RedisResult<T> {
        match self {
            ScriptBatch::One(cmd) => cmd.query_async(conn).await,
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
