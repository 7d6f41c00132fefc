//! klingq's producer side: what users call to submit and follow work.
//!
//! [`Producer`] validates jobs and batches before anything is written, enqueues them on the
//! video queue (the payload is a [`klingq_core::JobSpec`] as JSON), reads jobs and batches as
//! [`view`] types, cancels, lists and re-drives dead letters and reads completion events.
//! [`input`] parses untrusted JSON, JSON Lines and CSV into jobs, naming each error's line and
//! field. [`api`] is the HTTP API over the same calls, with its OpenAPI document; [`ops`] holds
//! what operators see (statistics, job search, endpoint health), and the dashboard is served
//! at `/`.
//!
//! The view types are the one description of what users see: the CLI's `--json` output and
//! the API's responses are the same JSON.

pub mod api;
mod config;
mod dashboard;
mod error;
pub mod input;
pub mod ops;
mod producer;
mod tenants;
pub mod view;

pub use api::{
    ApiDoc, ApiState, CALLBACK_OUTCOMES, CALLBACK_PATH, HistoryPointView, HistoryView,
    MAX_CALLBACK_BODY_BYTES, ProviderCallbackMetrics, ServeError, VideoLink, VideoLinkView,
    VideoLinks, router, serve,
};
pub use config::ApiConfig;
pub use error::{BatchErrors, CappedErrors, MAX_ERROR_DETAILS, ProducerError};
pub use ops::StatsLimits;
pub use producer::{
    BatchCheck, BatchOptions, DEFAULT_MIN_FINISHED, DEFAULT_PROVIDER_SLOTS,
    MAX_BATCH_IDEMPOTENCY_KEY_BYTES, Producer, RedriveTarget, batch_error_details, canonical_id,
    check_batch_options, is_event_cursor,
};
pub use tenants::{MAX_TENANT_LABELS, OTHER_TENANTS, TenantMetrics};
