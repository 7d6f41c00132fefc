//! klingq-provider: the Runflow API client for Kling v3 Pro image-to-video, built so that a job
//! never pays twice.
//!
//! # Layout
//! - [`VideoProvider`] (`provider.rs`): the object-safe seam the worker and tests hold as
//!   `Arc<dyn VideoProvider>`.
//! - [`RunflowClient`] (`client.rs`): the real implementation, async (`POST .../runs` then poll)
//!   or sync (`POST /v1/run/...`) per [`Mode`].
//! - [`ProviderError`] (`error.rs`) and its one classifier (`classify.rs`): permanent, transient,
//!   account, submit outcome unknown, generation failed, needs reconciliation.
//! - `retry.rs`: `Retry-After`, full-jitter backoff (backon) and the poll cadence.
//! - [`next_poll`] (`poll_plan.rs`): when to poll a parked run next, from the learned
//!   generation times ([`GenTimeHistogram`]) and the [`PollPolicy`]; pure, no I/O.
//! - [`Run`] (`run.rs`): runs read from every JSON shape the sources show.
//! - [`ProviderStats`] (`stats.rs`): call counters by operation and outcome.
//!
//! # Never paying twice
//! Every create carries `client_ref` = the job id and `metadata {job_id, attempt}`. A create whose
//! outcome is unknown (sent, then timeout, reset, 502/504, 409 or a non-JSON body) is reconciled
//! by listing runs with that `client_ref`: a run found is adopted; a new create is sent only when
//! none is found again after a grace period. Reads never create.

mod classify;
mod client;
mod config;
mod error;
mod poll_plan;
mod provider;
mod retry;
mod run;
mod stats;

pub use client::RunflowClient;
pub use config::{
    DEFAULT_BASE_URL, DEFAULT_MODEL, Mode, PollConfig, ProviderConfig, RetryConfig, Timeouts,
};
pub use error::{ErrorClass, ErrorDetail, Operation, ProviderError, RunFailureKind};
pub use poll_plan::{GenTimeHistogram, PollPolicy, next_poll, next_poll_with};
pub use provider::{ReadLimits, VideoProvider};
pub use retry::parse_retry_after;
pub use run::{Run, RunFailure, RunStatus, VideoOutput};
pub use stats::{CallObserver, CallOutcome, CallRecord, ProviderStats, ReconcileCounts};
