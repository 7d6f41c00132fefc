//! The client's error: one enum whose variants say what the pipeline must do next.
//!
//! Which variant a failure becomes is decided in one place, `classify.rs`. Nothing here ever
//! holds the API key, and provider URLs only appear redacted.

use std::fmt;
use std::time::Duration;

use klingq_core::FieldError;

use crate::run::{RunFailure, RunStatus};

/// The provider call an error or a counter belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Operation {
    /// `POST /v1/models/{model}/runs`.
    Create,
    /// `POST /v1/run/{model}` (sync mode).
    SyncRun,
    /// `GET /v1/runs/{id}`.
    GetRun,
    /// `GET /v1/runs?q=...`.
    ListRuns,
}

impl Operation {
    pub const ALL: [Operation; 4] = [
        Operation::Create,
        Operation::SyncRun,
        Operation::GetRun,
        Operation::ListRuns,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Create => "create",
            Operation::SyncRun => "sync_run",
            Operation::GetRun => "get_run",
            Operation::ListRuns => "list_runs",
        }
    }

    /// Whether a request of this kind can create (and bill) a run.
    pub fn creates_runs(self) -> bool {
        matches!(self, Operation::Create | Operation::SyncRun)
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the caller should do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// Retrying cannot help (bad input, bad key, moderation, cancelled): fail the job.
    Permanent,
    /// Retry the same step later (429, 5xx, network); the client already retried within its budget.
    Transient,
    /// The account cannot pay (402 `INSUFFICIENT_CREDIT`): pause every submission and requeue this
    /// job without spending one of its attempts.
    Account,
    /// A create was sent and no answer came: a run may exist and may be billed. Look it up by
    /// `client_ref` before any new create.
    SubmitOutcomeUnknown,
    /// The run ended without a usable video. A new run may be created within the job's budget of
    /// generations; [`ProviderError::cost_committed`] says whether this one was billed.
    GenerationFailed,
    /// The client lost sight of a run it holds (deadline passed, run not found): keep watching it
    /// later; never create a new one blindly.
    NeedsReconciliation,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Permanent => "permanent",
            ErrorClass::Transient => "transient",
            ErrorClass::Account => "account",
            ErrorClass::SubmitOutcomeUnknown => "submit_outcome_unknown",
            ErrorClass::GenerationFailed => "generation_failed",
            ErrorClass::NeedsReconciliation => "needs_reconciliation",
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the provider (or the transport) said, and how hard the client tried.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ErrorDetail {
    /// HTTP status, when a response came.
    pub status: Option<u16>,
    /// The provider's stable `code` (`RATE_LIMITED`, `VALIDATION_ERROR`, ...).
    pub code: Option<String>,
    /// The provider's message, or ours when the transport failed. Never holds a secret.
    pub message: String,
    /// Field errors from `errors[]` (422) or fal-style `detail[]`.
    pub field_errors: Vec<FieldError>,
    /// The provider's `Retry-After`, clamped to [1 s, 10 min].
    pub retry_after: Option<Duration>,
    /// Requests made for the operation, the first included.
    pub attempts: u32,
}

impl fmt::Display for ErrorDetail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.status, &self.code) {
            (Some(status), Some(code)) => write!(f, "{status} {code}: ")?,
            (Some(status), None) => write!(f, "{status}: ")?,
            (None, Some(code)) => write!(f, "{code}: ")?,
            (None, None) => {}
        }
        f.write_str(&self.message)?;
        for field_error in &self.field_errors {
            write!(f, "; {field_error}")?;
        }
        if self.attempts > 1 {
            write!(f, " (after {} attempts)", self.attempts)?;
        }
        Ok(())
    }
}

/// Why a run ended without a video.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RunFailureKind {
    /// The input or the output was flagged; the same input will be flagged again.
    Moderation,
    /// Someone cancelled the run (admin only on Runflow).
    Cancelled,
    /// Anything else: provider timeouts, dispatch failures, unknown codes. Failed runs are not
    /// billed, so a new run is acceptable.
    Provider,
}

/// A provider or transport failure, classified. See [`ProviderError::class`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProviderError {
    /// The provider refused the request and would refuse it again (400, 401, 403, 404 on
    /// create, 422, moderation at submit time).
    #[error("provider rejected {operation}: {detail}")]
    Rejected {
        operation: Operation,
        detail: ErrorDetail,
    },
    /// 402 `INSUFFICIENT_CREDIT`: no run was created.
    #[error("provider account has insufficient credit on {operation}: {detail}")]
    InsufficientCredit {
        operation: Operation,
        detail: ErrorDetail,
    },
    /// Rate limited, unavailable or a network failure where it is known that nothing was
    /// created; also a create whose unknown outcome was reconciled to "no run exists".
    #[error("transient provider failure on {operation}: {detail}")]
    Transient {
        operation: Operation,
        detail: ErrorDetail,
        #[source]
        source: Option<reqwest::Error>,
    },
    /// A create was sent and no usable answer came (timeout after send, reset, 502/504, 409,
    /// non-JSON body), and reconciliation could not settle whether a run exists.
    #[error("outcome of {operation} is unknown, a run may exist: {detail}")]
    SubmitOutcomeUnknown {
        operation: Operation,
        detail: ErrorDetail,
        #[source]
        source: Option<reqwest::Error>,
    },
    /// The run ended `failed` or `cancelled`.
    #[error("run {run_id} ended {status}: {failure}")]
    RunFailed {
        run_id: String,
        status: RunStatus,
        kind: RunFailureKind,
        failure: RunFailure,
    },
    /// The run succeeded (and was billed) but no read of it named a video URL.
    #[error("run {run_id} succeeded without a video url after {reads} reads")]
    SucceededWithoutOutput { run_id: String, reads: u32 },
    /// The job's deadline passed while the run was still going.
    #[error("deadline passed while run {run_id} was {last_status}")]
    DeadlineExceeded {
        run_id: String,
        last_status: RunStatus,
        polls: u32,
    },
    /// The provider keeps answering 404 for a run id we hold.
    #[error("run {run_id} not found: {detail}")]
    RunNotFound { run_id: String, detail: ErrorDetail },
    /// The configuration is unusable; no request was sent.
    #[error("invalid provider config: {message}")]
    Config { message: String },
}

impl ProviderError {
    /// What the caller should do about it.
    pub fn class(&self) -> ErrorClass {
        match self {
            ProviderError::Rejected { .. } | ProviderError::Config { .. } => ErrorClass::Permanent,
            ProviderError::InsufficientCredit { .. } => ErrorClass::Account,
            ProviderError::Transient { .. } => ErrorClass::Transient,
            ProviderError::SubmitOutcomeUnknown { .. } => ErrorClass::SubmitOutcomeUnknown,
            ProviderError::RunFailed { kind, .. } => match kind {
                RunFailureKind::Moderation | RunFailureKind::Cancelled => ErrorClass::Permanent,
                RunFailureKind::Provider => ErrorClass::GenerationFailed,
            },
            ProviderError::SucceededWithoutOutput { .. } => ErrorClass::GenerationFailed,
            ProviderError::DeadlineExceeded { .. } | ProviderError::RunNotFound { .. } => {
                ErrorClass::NeedsReconciliation
            }
        }
    }

    /// Whether retrying the same step later may succeed.
    pub fn is_transient(&self) -> bool {
        self.class() == ErrorClass::Transient
    }

    /// Whether the failure is the caller's or the input's fault (4xx other than 402/429, moderation).
    pub fn is_client_fault(&self) -> bool {
        match self {
            ProviderError::Rejected { .. } | ProviderError::Config { .. } => true,
            ProviderError::RunFailed { kind, .. } => *kind == RunFailureKind::Moderation,
            _ => false,
        }
    }

    /// Whether the provider may have billed for this (a run exists or may exist and may succeed).
    pub fn cost_committed(&self) -> bool {
        matches!(
            self,
            ProviderError::SubmitOutcomeUnknown { .. }
                | ProviderError::SucceededWithoutOutput { .. }
                | ProviderError::DeadlineExceeded { .. }
                | ProviderError::RunNotFound { .. }
        )
    }

    /// The provider's detail, for the variants that came from an HTTP exchange.
    pub fn detail(&self) -> Option<&ErrorDetail> {
        match self {
            ProviderError::Rejected { detail, .. }
            | ProviderError::InsufficientCredit { detail, .. }
            | ProviderError::Transient { detail, .. }
            | ProviderError::SubmitOutcomeUnknown { detail, .. }
            | ProviderError::RunNotFound { detail, .. } => Some(detail),
            _ => None,
        }
    }

    pub(crate) fn detail_mut(&mut self) -> Option<&mut ErrorDetail> {
        match self {
            ProviderError::Rejected { detail, .. }
            | ProviderError::InsufficientCredit { detail, .. }
            | ProviderError::Transient { detail, .. }
            | ProviderError::SubmitOutcomeUnknown { detail, .. }
            | ProviderError::RunNotFound { detail, .. } => Some(detail),
            _ => None,
        }
    }

    /// The operation that failed, for the HTTP variants.
    pub fn operation(&self) -> Option<Operation> {
        match self {
            ProviderError::Rejected { operation, .. }
            | ProviderError::InsufficientCredit { operation, .. }
            | ProviderError::Transient { operation, .. }
            | ProviderError::SubmitOutcomeUnknown { operation, .. } => Some(*operation),
            ProviderError::RunNotFound { .. } => Some(Operation::GetRun),
            _ => None,
        }
    }

    /// The provider's (or the run's) stable error code, or one of ours for local conditions.
    pub fn code(&self) -> Option<&str> {
        match self {
            ProviderError::RunFailed { failure, kind, .. } => {
                failure.code.as_deref().or(match kind {
                    RunFailureKind::Cancelled => Some("RUN_CANCELLED"),
                    _ => Some("RUN_FAILED"),
                })
            }
            ProviderError::SucceededWithoutOutput { .. } => Some("SUCCEEDED_WITHOUT_OUTPUT"),
            ProviderError::DeadlineExceeded { .. } => Some("DEADLINE_EXCEEDED"),
            ProviderError::Config { .. } => Some("INVALID_CONFIG"),
            other => other.detail().and_then(|detail| detail.code.as_deref()),
        }
    }

    /// The HTTP status, when a response came.
    pub fn status(&self) -> Option<u16> {
        self.detail().and_then(|detail| detail.status)
    }

    /// The provider's `Retry-After`, clamped to [1 s, 10 min].
    pub fn retry_after(&self) -> Option<Duration> {
        self.detail().and_then(|detail| detail.retry_after)
    }

    /// Field errors the provider returned.
    pub fn field_errors(&self) -> &[FieldError] {
        self.detail()
            .map(|detail| detail.field_errors.as_slice())
            .unwrap_or_default()
    }

    /// Requests made for the failed operation (polls for the waiting variants).
    pub fn attempts(&self) -> u32 {
        match self {
            ProviderError::SucceededWithoutOutput { reads, .. } => *reads,
            ProviderError::DeadlineExceeded { polls, .. } => *polls,
            other => other.detail().map(|detail| detail.attempts).unwrap_or(0),
        }
    }

    /// The run the error is about, when there is one.
    pub fn run_id(&self) -> Option<&str> {
        match self {
            ProviderError::RunFailed { run_id, .. }
            | ProviderError::SucceededWithoutOutput { run_id, .. }
            | ProviderError::DeadlineExceeded { run_id, .. }
            | ProviderError::RunNotFound { run_id, .. } => Some(run_id),
            _ => None,
        }
    }

    /// The error with the number of attempts it took recorded in its detail.
    pub fn with_attempts(mut self, attempts: u32) -> Self {
        if let Some(detail) = self.detail_mut() {
            detail.attempts = detail.attempts.max(attempts);
        }
        self
    }
}
