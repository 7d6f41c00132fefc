//! Shared setup: a fast simulator on a free port and a client configured for it.

use std::sync::Arc;
use std::time::Duration;

use klingq_core::{GenerationRequest, JobId};
use klingq_provider::{ProviderConfig, RunflowClient, VideoProvider};
use klingq_sim::{SimConfig, SimHandle};
use tokio::time::Instant;

pub(crate) const API_KEY: &str = "rf_live_klingq_test_key";

/// A simulator with millisecond latencies and tiny videos.
pub(crate) async fn sim() -> SimHandle {
    klingq_sim::start_local(SimConfig::fast())
        .await
        .expect("start the simulator")
}

/// The test config: zero retry delays, millisecond polls and grace.
pub(crate) fn config(sim: &SimHandle) -> ProviderConfig {
    ProviderConfig::for_tests(sim.base_url(), API_KEY)
}

pub(crate) fn client_with(config: ProviderConfig) -> RunflowClient {
    RunflowClient::new(config).expect("build the client")
}

/// The client as the worker holds it, plus its concrete type for the counters.
pub(crate) fn client(sim: &SimHandle) -> (Arc<RunflowClient>, Arc<dyn VideoProvider>) {
    let client = Arc::new(client_with(config(sim)));
    let provider: Arc<dyn VideoProvider> = client.clone();
    (client, provider)
}

pub(crate) fn request(prompt: &str) -> GenerationRequest {
    GenerationRequest::new("https://example.com/start.png", prompt)
}

pub(crate) fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(30)
}

/// Creates a run for a new job and waits for it, as the pipeline does in async mode.
pub(crate) async fn generate(
    provider: &dyn VideoProvider,
    prompt: &str,
) -> (
    JobId,
    Result<klingq_provider::Run, klingq_provider::ProviderError>,
) {
    let job_id = JobId::new();
    let run = match provider.create_run(&job_id, 1, &request(prompt)).await {
        Ok(run) => run,
        Err(error) => return (job_id, Err(error)),
    };
    (job_id, provider.wait_for_run(&run.id, deadline()).await)
}
