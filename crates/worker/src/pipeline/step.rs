//! The pipeline's steps, each with its own retry budget and its name in checkpoints, metrics
//! and traces.

use crate::config::WorkerConfig;

/// A step of the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Step {
    /// Creating the provider run (or finding the one an earlier attempt created).
    Submit,
    /// Waiting for the run: polls, each taken up from the parked set.
    Generate,
    /// Downloading the video and re-hosting it in object storage.
    Download,
}

impl Step {
    /// The step's name in checkpoints (`step_ms`, `step_retries`), metrics and traces.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Submit => "submit",
            Self::Generate => "generate",
            Self::Download => "download",
        }
    }

    /// How many retries the step may spend before the job fails.
    pub fn retry_budget(self, config: &WorkerConfig) -> u32 {
        match self {
            Self::Submit => config.submit_retries,
            Self::Generate => config.generate_retries,
            Self::Download => config.download_retries,
        }
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_budgets_are_the_steps_own() {
        let config = WorkerConfig {
            submit_retries: 1,
            generate_retries: 2,
            download_retries: 3,
            ..WorkerConfig::default()
        };
        let steps = [Step::Submit, Step::Generate, Step::Download];
        let names: Vec<_> = steps.iter().map(|s| s.as_str()).collect();
        assert_eq!(names, ["submit", "generate", "download"]);
        let budgets: Vec<_> = steps.iter().map(|s| s.retry_budget(&config)).collect();
        assert_eq!(budgets, [1, 2, 3]);
    }
}
