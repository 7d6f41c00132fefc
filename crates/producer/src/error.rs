//! What can go wrong on the producer side, and the invalid entries of a rejected batch.

use std::fmt;

use klingq_core::{FieldError, ValidationErrors};
use klingq_queue::QueueError;

use crate::view::ErrorDetail;

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
        "cannot reach Redis at {url} ({}). Start one (`redis-server --daemonize yes`, or \
         `docker run -d -p 6379:6379 redis:7`) or point the Redis URL setting \
         (KLINGQ_REDIS_URL, queue.redis_url) at a running server",
        unreachable_reason(.cause)
    )]
    Unreachable { url: String, cause: QueueError },
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("encoding a job payload: {0}")]
    Encode(#[from] serde_json::Error),
}

/// Why Redis could not be reached, without repeating the node the message names already.
fn unreachable_reason(cause: &QueueError) -> String {
    match cause {
        QueueError::Unavailable { what, .. } => (*what).to_owned(),
        other => other.to_string(),
    }
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

/// Most field errors listed for one request (the rest are counted): an answer, a message or a
/// `--json` error body stays small however many entries are wrong.
pub const MAX_ERROR_DETAILS: usize = 1000;

/// A list of errors that keeps the first [`MAX_ERROR_DETAILS`] and counts every one: the one
/// shape of a long error list in the library, the API (`details`, `truncated`,
/// `total_details`) and the CLI.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CappedErrors {
    details: Vec<ErrorDetail>,
    total: usize,
}

impl CappedErrors {
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts one error, keeping it while fewer than [`MAX_ERROR_DETAILS`] are kept.
    pub fn push(&mut self, detail: ErrorDetail) {
        self.total += 1;
        if self.details.len() < MAX_ERROR_DETAILS {
            self.details.push(detail);
        }
    }

    /// Counts the errors of one entry (`index`, and its `line` in a file), keeping the first.
    pub fn push_entry(&mut self, index: usize, line: Option<u64>, errors: ValidationErrors) {
        self.count_unlisted(errors.unlisted());
        for error in errors {
            let mut detail = ErrorDetail::at(index, error);
            detail.line = line;
            self.push(detail);
        }
    }

    /// Counts `n` more errors that are not listed.
    pub fn count_unlisted(&mut self, n: usize) {
        self.total += n;
    }

    /// The errors kept, in order: at most [`MAX_ERROR_DETAILS`].
    pub fn details(&self) -> &[ErrorDetail] {
        &self.details
    }

    pub fn details_mut(&mut self) -> &mut [ErrorDetail] {
        &mut self.details
    }

    pub fn into_details(self) -> Vec<ErrorDetail> {
        self.details
    }

    /// Every error counted, listed or not.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Whether some errors are counted but not listed.
    pub fn is_truncated(&self) -> bool {
        self.total > self.details.len()
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }
}

/// The errors of one input, as details without an index.
impl From<ValidationErrors> for CappedErrors {
    fn from(errors: ValidationErrors) -> Self {
        let mut capped = Self::new();
        capped.count_unlisted(errors.unlisted());
        for error in errors {
            capped.push(ErrorDetail::new(error));
        }
        capped
    }
}

impl FromIterator<ErrorDetail> for CappedErrors {
    fn from_iter<I: IntoIterator<Item = ErrorDetail>>(iter: I) -> Self {
        let mut errors = Self::new();
        for detail in iter {
            errors.push(detail);
        }
        errors
    }
}

/// Why a batch was rejected: errors of the batch's options and size, and of its invalid
/// entries (the first [`MAX_ERROR_DETAILS`], each by index, all counted).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchErrors {
    /// Errors of the options (webhook URL, budget, idempotency key) or of the batch as a whole.
    pub batch: Vec<FieldError>,
    /// The invalid entries' errors, by entry index (and line, from a file).
    pub entries: CappedErrors,
    /// Invalid entries.
    pub invalid_entries: usize,
    /// Entries submitted.
    pub total: usize,
}

impl BatchErrors {
    /// Number of field errors over the batch and its entries, listed or not.
    pub fn len(&self) -> usize {
        self.batch.len() + self.entries.total()
    }

    pub fn is_empty(&self) -> bool {
        self.batch.is_empty() && self.entries.is_empty()
    }

    /// The first line of the display: what is wrong, without the list.
    pub fn summary(&self) -> String {
        if self.invalid_entries == 0 {
            "invalid batch; nothing was enqueued".to_owned()
        } else {
            format!(
                "{} of {} entries are invalid; nothing was enqueued",
                self.invalid_entries, self.total
            )
        }
    }

    /// Every error as a detail: the batch's own first (no index), then the entries', capped at
    /// [`MAX_ERROR_DETAILS`] listed and all counted.
    pub fn details(&self) -> CappedErrors {
        let mut details: CappedErrors = self.batch.iter().cloned().map(ErrorDetail::new).collect();
        let listed = self.entries.details();
        for detail in listed {
            details.push(detail.clone());
        }
        details.count_unlisted(self.entries.total() - listed.len());
        details
    }
}

impl fmt::Display for BatchErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.summary())?;
        for error in &self.batch {
            write!(f, "\n  {error}")?;
        }
        for detail in self.entries.details() {
            let path = if detail.path.is_empty() {
                "(entry)"
            } else {
                &detail.path
            };
            let place = match (detail.line, detail.index) {
                (Some(line), _) => format!("line {line}"),
                (None, Some(index)) => format!("entry {index}"),
                (None, None) => "batch".to_owned(),
            };
            write!(
                f,
                "\n  {place}: {path}: {} [{}]",
                detail.message, detail.rule
            )?;
        }
        if self.entries.is_truncated() {
            write!(
                f,
                "\n  ... and {} more errors (the first {MAX_ERROR_DETAILS} are listed)",
                self.entries.total() - self.entries.details().len()
            )?;
        }
        Ok(())
    }
}
