//! Errors of queue operations, and what a handler returns to say how its attempt ended.

use std::time::Duration;

use klingq_core::JobError;

/// A queue operation failed.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
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
    /// Whether retrying the same call may succeed (a connection drop, a timeout).
    pub fn is_transient(&self) -> bool {
        match self {
            QueueError::Redis(error) => {
                error.is_io_error()
                    || error.is_timeout()
                    || error.is_connection_dropped()
                    || error.is_connection_refusal()
                    || matches!(
                        error.kind(),
                        redis::ErrorKind::Server(redis::ServerErrorKind::BusyLoading)
                            | redis::ErrorKind::Server(redis::ServerErrorKind::TryAgain)
                            | redis::ErrorKind::Server(redis::ServerErrorKind::ClusterDown)
                            | redis::ErrorKind::Server(redis::ServerErrorKind::MasterDown)
                            | redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
                    )
                    || error.code() == Some("BUSY")
            }
            _ => false,
        }
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
