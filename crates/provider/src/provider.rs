//! The `VideoProvider` seam: what the worker needs from a video API, object-safe so that tests
//! and the worker can hold an `Arc<dyn VideoProvider>`.

use futures::future::BoxFuture;
use klingq_core::{GenerationRequest, JobId};
use tokio::time::Instant;

use crate::config::Mode;
use crate::error::ProviderError;
use crate::poll_plan::PollPolicy;
use crate::run::{Run, VideoOutput};

/// How many odd reads one poll of a run tolerates before they are an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadLimits {
    /// Consecutive 404s of a run we hold (it may not be visible right after its create).
    pub not_found_retries: u32,
    /// Extra reads of a succeeded run that names no video yet.
    pub output_rereads: u32,
}

/// A paid video-generation API.
///
/// The contract every implementation keeps: a create carries `client_ref` = the job id, and a
/// create whose outcome is unknown is reconciled by that `client_ref` before anything is created
/// again. Reads (`get_run`, `wait_for_run`, `refresh_video_url`) never create runs.
///
/// The pipeline's use, async mode: persist "submitting", `create_run`, persist the run id at once,
/// `wait_for_run`, download (calling `refresh_video_url` when the URL expired). Sync mode:
/// persist "submitting", `run_sync`, download. A job resumed with a run id only waits; one resumed
/// in "submitting" without a run id calls `find_run` first.
pub trait VideoProvider: Send + Sync {
    /// How this provider creates runs; the pipeline picks `create_run` or `run_sync` by it.
    fn mode(&self) -> Mode;

    /// The model runs are created with (generation times are learned per model).
    fn model(&self) -> &str;

    /// How a parked run's polls are timed (async mode).
    fn poll_policy(&self) -> PollPolicy;

    /// How many odd reads one poll tolerates (async mode, one read per delivery).
    fn read_limits(&self) -> ReadLimits;

    /// The error a run that ended without success is (failed, cancelled, moderated), for a
    /// caller that read the run itself with [`VideoProvider::get_run`].
    fn run_end_error(&self, run: &Run) -> ProviderError {
        crate::classify::classify_run_end(run)
    }

    /// Creates a run (async mode) with `client_ref` = `job_id` and `metadata {job_id, attempt}`.
    /// Transient failures are retried within the retry budget; an unknown outcome is reconciled
    /// by `client_ref` (the run found is returned with `adopted` set). Returns as soon as the run
    /// exists, usually `queued`.
    fn create_run<'a>(
        &'a self,
        job_id: &'a JobId,
        attempt: u32,
        request: &'a GenerationRequest,
    ) -> BoxFuture<'a, Result<Run, ProviderError>>;

    /// The most relevant run with this exact `client_ref` (succeeded, else in progress, else the
    /// newest failed one), or `None`.
    fn find_run<'a>(
        &'a self,
        client_ref: &'a str,
    ) -> BoxFuture<'a, Result<Option<Run>, ProviderError>>;

    /// One read of a run, with transient retries. 404 gives [`ProviderError::RunNotFound`].
    fn get_run<'a>(&'a self, run_id: &'a str) -> BoxFuture<'a, Result<Run, ProviderError>>;

    /// Polls a run until it is terminal or `deadline` passes. `Ok` only for a succeeded run that
    /// names a video; a failed, cancelled or output-less run is an error that says which.
    /// Transient poll errors keep polling; a 404 is tolerated a few times.
    fn wait_for_run<'a>(
        &'a self,
        run_id: &'a str,
        deadline: Instant,
    ) -> BoxFuture<'a, Result<Run, ProviderError>>;

    /// Sync mode: one call that returns when the video exists, with `?client_ref=<job id>`.
    /// An unknown outcome is reconciled by `client_ref` before any new call; a run found that way
    /// is polled to its end. Waits at most the configured job deadline.
    fn run_sync<'a>(
        &'a self,
        job_id: &'a JobId,
        attempt: u32,
        request: &'a GenerationRequest,
    ) -> BoxFuture<'a, Result<Run, ProviderError>>;

    /// Re-reads a succeeded run for a freshly signed video URL (the provider re-signs on every
    /// read). Use it when a download gets 403/404/410; never create a new run for that.
    fn refresh_video_url<'a>(
        &'a self,
        run_id: &'a str,
    ) -> BoxFuture<'a, Result<VideoOutput, ProviderError>>;
}
