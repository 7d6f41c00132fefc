//! Errors of queue operations, and what a handler returns to say how its attempt ended.

use std::time::Duration;

use klingq_core::JobError;

/// A queue operation failed.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// `queue.min_replicas_ack` replicas did not confirm a write in time. The write is on
    /// the primary and may still be lost in a failover: retry (it is idempotent).
    #[error(
        "only {acked} of {wanted} Redis replicas confirmed the write within {timeout_ms} ms (queue.min_replicas_ack); retry"
    )]
    NotReplicated {
        wanted: u32,
        acked: u32,
        timeout_ms: u64,
    },
    /// A setting names no Redis klingq can use (mode and URL disagree, a bad URL).
    #[error(transparent)]
    Target(#[from] crate::conn::TargetError),
    /// Redis did not answer, or answered "not now" (failing over, loading, resharding), for
    /// the whole retry budget. Its text is one line for a person: which node, what to check.
    #[error(
        "Redis unavailable at {node}: {what}. Check that it runs and is reachable from here, and queue.redis_url (KLINGQ_REDIS_URL) and queue.redis_mode"
    )]
    Unavailable {
        node: String,
        /// The `kind` label of `klingq_redis_errors_total`.
        kind: &'static str,
        what: &'static str,
    },
    /// `queue.partitions` out of range.
    #[error("queue.partitions (KLINGQ_QUEUE_PARTITIONS) must be between 1 and {max}, not {value}")]
    PartitionsOutOfRange { value: u32, max: u32 },
    /// The namespace is in use under another number of partitions: starting with this one
    /// would leave jobs unread and split idempotency keys.
    #[error(
        "namespace {namespace:?} is in use with {recorded} partition(s) but queue.partitions (KLINGQ_QUEUE_PARTITIONS) is {configured}. Set it to {recorded}; to change it, use the new count with a new namespace (queue.namespace, KLINGQ_NAMESPACE), switch producers over, and keep workers on the old one until `klingq status` shows nothing waiting or running there"
    )]
    PartitionsMismatch {
        namespace: String,
        recorded: u32,
        configured: u32,
    },
    /// An events cursor that is not one (or names another number of partitions).
    #[error(
        "{cursor:?} is not an event cursor: give 0, one stream id such as 1700000000000-0, or {partitions} comma-separated ids (one per partition)"
    )]
    BadCursor { cursor: String, partitions: usize },
    #[error("job {0} not found")]
    NotFound(String),
    #[error("batch {0} not found")]
    BatchNotFound(String),
    #[error("encoding job payload: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("unexpected reply from redis: {0}")]
    Protocol(String),
}

impl QueueError {
    /// Whether retrying the same call may succeed (a connection drop, a timeout, a failover,
    /// a slot move).
    pub fn is_transient(&self) -> bool {
        match self {
            QueueError::Redis(error) => crate::conn::is_transient(error),
            QueueError::Unavailable { .. } | QueueError::NotReplicated { .. } => true,
            _ => false,
        }
    }
}

/// What a transient error means, in words (never the raw reply).
pub(crate) fn unavailable_what(kind: &str) -> &'static str {
    match kind {
        "connection" => "connection refused or lost",
        "tls" => {
            "the TLS handshake failed (is the server's certificate trusted here, and does the URL name its host?)"
        }
        "timeout" => "no answer within queue.command_timeout_ms",
        "moved" | "ask" | "tryagain" => "the namespace's slot is moving between nodes",
        "clusterdown" => "the cluster is down (a failover in progress?)",
        "readonly" => "the node is a replica now (a failover in progress?)",
        "masterdown" => "the replica lost its primary (a failover in progress?)",
        "noprimary" => {
            "the sentinels name no primary for the service (a failover in progress, or a wrong service name?)"
        }
        "loading" => "the node is still loading its data",
        "busy" => "a script is still running",
        _ => "it answered with an error",
    }
}

/// How a handler's attempt ended, when it did not succeed. Return it (boxed) from a handler;
/// the queue's layer settles the job accordingly. Any other error is retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum JobFailure {
    /// Try again after `after`; counts as an attempt. Past the maximum, the job is dead.
    #[error("retry in {after:?}: {reason}")]
    Retry {
        after: Duration,
        reason: String,
        /// What went wrong, kept on the record (and reported if the job ends dead).
        error: Option<JobError>,
    },
    /// Wait for `after` without counting an attempt: a budget, a credit pause, a shutdown.
    #[error("deferred for {after:?}: {reason}")]
    Defer { after: Duration, reason: String },
    /// The job waits for something outside (its provider run) without holding a worker: it
    /// keeps its state (a generation stays `generating`) and waits in the delayed set,
    /// counted as parked, without counting an attempt; it is taken up again after `after`,
    /// or at once when [`crate::Queue::wake`] wakes it.
    #[error("parked for {after:?}: {reason}")]
    Park { after: Duration, reason: String },
    /// End the job as `failed`, for a permanent reason.
    #[error("failed: {} ({}): {}", .0.step, .0.code, .0.message)]
    Fail(JobError),
    /// The job was cancelled while running; it is already settled.
    #[error("cancelled while running")]
    Cancelled,
    /// Another worker holds the job now (this one stalled past its lease); do nothing more.
    #[error("lease lost: another worker holds the job")]
    LeaseLost,
}

/// A handler's checkpoint write failed.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("the job was cancelled")]
    Cancelled,
    #[error("lease lost: another worker holds the job")]
    Lost,
    #[error("the job is gone (finished or expired)")]
    Gone,
    #[error("redis unavailable while saving a checkpoint: {0}")]
    Redis(#[from] QueueError),
    #[error("encoding checkpoint: {0}")]
    Encode(#[from] serde_json::Error),
}

impl From<LeaseError> for JobFailure {
    fn from(error: LeaseError) -> Self {
        match error {
            LeaseError::Cancelled => JobFailure::Cancelled,
            LeaseError::Lost | LeaseError::Gone => JobFailure::LeaseLost,
            // Not the job's fault, and not an attempt: wait for a replica to come back.
            LeaseError::Redis(error @ QueueError::NotReplicated { .. }) => JobFailure::Defer {
                after: Duration::from_secs(2),
                reason: format!("checkpoint not confirmed by replicas: {error}"),
            },
            LeaseError::Redis(error) => JobFailure::Retry {
                after: Duration::from_secs(5),
                reason: format!("checkpoint not saved: {error}"),
                error: None,
            },
            LeaseError::Encode(error) => JobFailure::Fail(JobError {
                step: "queue".to_owned(),
                code: "CHECKPOINT_ENCODING".to_owned(),
                message: error.to_string(),
                details: Vec::new(),
                cost_committed: false,
            }),
        }
    }
}
