//! The download step: the video goes from the provider's (expiring) URL to object storage,
//! verified, unless a verified object is there already.

use klingq_core::JobState;
use klingq_queue::JobFailure;
use klingq_storage::RehostError;

use super::{Attempt, Step, job_error, to_core};

impl Attempt<'_> {
    pub(super) async fn rehost(&mut self) -> Result<(), JobFailure> {
        self.shutting_down()?;
        let store = &self.pipeline.store;
        let job_id = self.job_id.to_string();
        match store.head(&job_id).await {
            Ok(Some(existing)) => {
                tracing::info!(job_id, "the video is already stored; skipping the upload");
                self.checkpoint.video = Some(to_core(existing));
                return self.save(JobState::Publishing, "").await;
            }
            Ok(None) => {}
            Err(error) => {
                let detail = job_error("upload", "STORAGE_UNAVAILABLE", error.to_string(), true);
                let failure = self.retry_step(Step::Download, detail, None);
                self.keep()?;
                return Err(failure);
            }
        }
        let run_id = match self.checkpoint.provider.run_id.clone() {
            Some(run_id) => run_id,
            None => match self.pipeline.provider.find_run(&job_id).await {
                Ok(Some(run)) if !run.id.is_empty() => run.id,
                Ok(_) => {
                    return Err(JobFailure::Fail(job_error(
                        Step::Download.as_str(),
                        "RUN_UNKNOWN",
                        "the run succeeded but its id cannot be found to download the video",
                        true,
                    )));
                }
                Err(error) => return Err(self.provider_failure(Step::Download, error).await),
            },
        };
        if self.last_state != Some(JobState::Downloading) {
            self.save(JobState::Downloading, "").await?;
        }
        let mut refreshes = 0;
        let stored = loop {
            let video = match self.pipeline.provider.refresh_video_url(&run_id).await {
                Ok(video) => video,
                Err(error) => return Err(self.provider_failure(Step::Download, error).await),
            };
            self.enter(JobState::Uploading).await?;
            let expected = video.file_size.or(self.checkpoint.provider.file_size);
            match store.rehost(&job_id, video.url.expose(), expected).await {
                Ok(stored) => break stored,
                Err(error) if error.is_source_expired() && refreshes < 2 => {
                    refreshes += 1;
                    tracing::info!(
                        job_id,
                        "download url expired; reading the run for a fresh one"
                    );
                }
                Err(error) => return Err(self.rehost_failure(error).await),
            }
        };
        self.pipeline.metrics.rehosted(stored.size);
        self.checkpoint.video = Some(to_core(stored));
        self.save(JobState::Publishing, "").await
    }

    async fn rehost_failure(&mut self, error: RehostError) -> JobFailure {
        let detail = job_error(
            Step::Download.as_str(),
            error.code(),
            error.to_string(),
            true,
        );
        tracing::warn!(job_id = %self.job_id, %error, "re-hosting failed");
        if error.is_permanent() {
            return JobFailure::Fail(detail);
        }
        let failure = self.retry_step(Step::Download, detail, error.retry_after());
        if let Err(keep) = self.keep() {
            return keep;
        }
        failure
    }
}
