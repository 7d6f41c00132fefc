//! What can go wrong on the producer side, and the invalid entries of a rejected batch.

use std::fmt;

use klingq_core::{FieldError, ValidationErrors};
use klingq_queue::QueueError;

/// A producer operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ProducerError {
    /// The job is invalid; nothing was written.
    #[error("invalid job: {0}")]
    Invalid(ValidationErrors),
    /// The batch (or some of its entries) is invalid; nothing was written.
    #[error("{0}")]
    InvalidBatch(BatchErrors),
    #[error("no job with id {0}")]
    JobNotFound(String),
    #[error("no batch with id {0}")]
    BatchNotFound(String),
    /// Redis did not answer when connecting. `url` is redacted.
    #[error(
        "cannot reach Redis at {url} ({cause}). Start one (`redis-server --daemonize yes`, or \
         `docker run -d -p 6379:6379 redis:7`) or point the Redis URL setting \
         (KLINGQ_REDIS_URL, queue.redis_url) at a running server"
    )]
    Unreachable { url: String, cause: QueueError },
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("encoding a job payload: {0}")]
    Encode(#[from] serde_json::Error),
}

impl ProducerError {
    /// Whether the caller's input caused the error (bad request, unknown id).
    pub fn is_invalid_input(&self) -> bool {
        matches!(
            self,
            ProducerError::Invalid(_) | ProducerError::InvalidBatch(_)
        )
    }
}

/// The errors of one batch entry, by its 0-based index in the submitted list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryErrors {
    pub index: usize,
    pub errors: ValidationErrors,
}

/// Why a batch was rejected: errors of the batch's options, and of each invalid entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchErrors {
    /// Errors of the options (webhook URL, budget, idempotency key) or of the batch as a whole.
    pub batch: Vec<FieldError>,
    /// Every invalid entry, in order.
    pub entries: Vec<EntryErrors>,
    /// Entries submitted.
    pub total: usize,
}

impl BatchErrors {
    /// Number of field errors over the batch and its entries.
    pub fn len(&self) -> usize {
        self.batch.len() + self.entries.iter().map(|e| e.errors.len()).sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.batch.is_empty() && self.entries.is_empty()
    }
}

impl fmt::Display for BatchErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.entries.is_empty() {
            write!(f, "invalid batch; nothing was enqueued")?;
        } else {
            write!(
                f,
                "{} of {} entries are invalid; nothing was enqueued",
                self.entries.len(),
                self.total
            )?;
        }
        for error in &self.batch {
            write!(f, "\n  {error}")?;
        }
        for entry in &self.entries {
            for error in entry.errors.iter() {
                write!(f, "\n  entry {}: {error}", entry.index)?;
            }
        }
        Ok(())
    }
}
