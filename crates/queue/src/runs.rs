//! Provider runs and the jobs they belong to: the binding a callback follows to its job,
//! callbacks kept until their run is bound, and waking a job that waits in the delayed set.
//!
//! A callback names only the run, so the binding lives with the global keys (partition 0);
//! the job it wakes lives in its own partition. The two steps are ordered so that no callback
//! is lost to a race: the job binds its run and reads any callback that came first in one
//! script; a callback records itself and reads the binding in one script, then wakes the job,
//! and a wake that finds the job held by a worker flags it, so the job's next park or defer
//! is made ready at once instead.

use std::time::Duration;

use crate::error::QueueError;
use crate::queue::Queue;
use crate::scripts;

/// How long a callback for a run that no job has bound yet is kept (the create's answer was
/// slow or lost, and the job binds the run when it finds it).
pub const EARLY_CALLBACK_TTL: Duration = Duration::from_secs(24 * 3600);

/// What became of a provider callback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallbackOutcome {
    /// The job was waiting and is ready now (or was flagged while a worker held it).
    Woken { job_id: String },
    /// The same status was reported for this run before; the job was woken again anyway.
    Duplicate { job_id: Option<String> },
    /// No job has bound the run (yet): the callback is kept and applied when one does.
    Unknown,
    /// The job bound to the run has finished already.
    Finished { job_id: String },
}

impl CallbackOutcome {
    /// The metric label of the outcome.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Woken { .. } => "accepted",
            Self::Duplicate { .. } => "duplicate",
            Self::Unknown => "unknown_run",
            Self::Finished { .. } => "finished",
        }
    }
}

/// What a wake did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WakeOutcome {
    /// The job left the delayed set and is ready now.
    Woken,
    /// A worker holds the job: its next park or defer is made ready at once.
    Flagged,
    /// The job is on its ready stream already.
    Queued,
    /// The job is finished or gone.
    Gone,
}

impl Queue {
    /// Binds `run_id` to `job_id` for `ttl`, and returns the status a callback reported for
    /// the run before the binding, if one did.
    pub async fn bind_run(
        &self,
        job_id: &str,
        run_id: &str,
        ttl: Duration,
    ) -> Result<Option<String>, QueueError> {
        let cmd = self.call(
            &scripts::RUN_BIND,
            0,
            &RunBindHeader {
                run: run_id,
                job: job_id,
                ttl_secs: ttl.as_secs().max(1),
            },
        );
        let status: String = self.run_script(cmd).await?;
        Ok((!status.is_empty()).then_some(status))
    }

    /// Records a provider callback reporting `status` for `run_id` and wakes the run's job.
    /// Idempotent: a duplicate wakes the job again, which costs it one poll at most.
    pub async fn provider_callback(
        &self,
        run_id: &str,
        status: &str,
    ) -> Result<CallbackOutcome, QueueError> {
        let cmd = self.call(
            &scripts::RUN_CALLBACK,
            0,
            &RunCallbackHeader {
                run: run_id,
                status,
                ttl_secs: EARLY_CALLBACK_TTL.as_secs(),
            },
        );
        let (job_id, duplicate): (String, i64) = self.run_script(cmd).await?;
        if job_id.is_empty() {
            return Ok(if duplicate == 1 {
                CallbackOutcome::Duplicate { job_id: None }
            } else {
                CallbackOutcome::Unknown
            });
        }
        let woke = self
            .wake(&job_id, "the provider reported the run ended")
            .await?;
        Ok(match (duplicate == 1, woke) {
            (true, _) => CallbackOutcome::Duplicate {
                job_id: Some(job_id),
            },
            (false, WakeOutcome::Gone) => CallbackOutcome::Finished { job_id },
            (false, _) => CallbackOutcome::Woken { job_id },
        })
    }

    /// Counts a finished run of kind `name` (model and clip duration) in `bucket` of its
    /// generation-time histogram, halving the counts past `cap` samples.
    pub async fn record_gen_time(
        &self,
        name: &str,
        bucket: &str,
        cap: u64,
    ) -> Result<(), QueueError> {
        let cmd = self.call(
            &scripts::GEN_TIME_RECORD,
            0,
            &GenTimeHeader {
                name,
                bucket,
                cap: cap.max(2),
            },
        );
        let _: i64 = self.run_script(cmd).await?;
        Ok(())
    }

    /// The generation-time histogram of runs of kind `name`: (bucket, count) pairs.
    pub async fn gen_times(&self, name: &str) -> Result<Vec<(String, u64)>, QueueError> {
        let all: std::collections::HashMap<String, u64> = self
            .query(redis::cmd("HGETALL").arg(self.keys().gen_times(name)))
            .await?;
        Ok(all.into_iter().filter(|(field, _)| field != "n").collect())
    }

    /// Makes a job that waits in the delayed set ready now (see [`WakeOutcome`]).
    pub async fn wake(&self, job_id: &str, reason: &str) -> Result<WakeOutcome, QueueError> {
        let p = self.partitions().of(job_id);
        let cmd = self.call(&scripts::WAKE, p, &WakeHeader { id: job_id, reason });
        let outcome: String = self.run_script(cmd).await?;
        Ok(match outcome.as_str() {
            "woken" => WakeOutcome::Woken,
            "flagged" => WakeOutcome::Flagged,
            "queued" => WakeOutcome::Queued,
            _ => WakeOutcome::Gone,
        })
    }
}

crate::wire::record! {
    /// `run_bind.lua`'s header.
    struct RunBindHeader<'a> {
        run: &'a str,
        job: &'a str,
        ttl_secs: u64,
    }
}

crate::wire::record! {
    /// `run_callback.lua`'s header.
    struct RunCallbackHeader<'a> {
        run: &'a str,
        status: &'a str,
        ttl_secs: u64,
    }
}

crate::wire::record! {
    /// `gen_time_record.lua`'s header.
    struct GenTimeHeader<'a> {
        name: &'a str,
        bucket: &'a str,
        cap: u64,
    }
}

crate::wire::record! {
    /// `wake.lua`'s header.
    struct WakeHeader<'a> {
        id: &'a str,
        reason: &'a str,
    }
}
