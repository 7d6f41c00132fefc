//! klingq's worker: the resumable video pipeline ([`pipeline`]) and the process that runs it
//! ([`runtime`]) on a stock apalis worker over klingq's Redis backend.
//!
//! The pipeline depends on the provider through the `VideoProvider` trait; the runtime is the
//! one place that picks the real client, the object store and the settings.

// `JobFailure` is the handler's contract with the queue, returned once per attempt: its size
// does not matter, and boxing it would make every handler harder to read.
#![allow(clippy::result_large_err)]

pub mod config;
pub mod metrics;
pub mod pipeline;
pub mod runtime;
pub mod slots;

pub use config::WorkerConfig;
pub use pipeline::{Pipeline, handle_job};
pub use runtime::{Worker, WorkerSettings};
pub use slots::SlotReleaser;
