//! Sync mode (`POST /v1/run/{model}?client_ref=<job id>`): the happy path, plain retries, and an
//! unknown outcome reconciled by client_ref before any second call.

use klingq_core::JobId;
use klingq_provider::{ErrorClass, Mode, RunflowClient, VideoProvider};
use klingq_sim::SimHandle;

use crate::common::{client_with, config, request, sim};

fn sync_client(sim: &SimHandle) -> RunflowClient {
    let mut config = config(sim);
    config.mode = Mode::Sync;
    client_with(config)
}

#[tokio::test]
async fn sync_happy_path_returns_the_video_and_charges_once() {
    let sim = sim().await;
    let client = sync_client(&sim);
    assert_eq!(client.mode(), Mode::Sync);
    let job_id = JobId::new();
    let run = client
        .run_sync(&job_id, 1, &request("a sync otter"))
        .await
        .unwrap();
    let video = run.video.clone().unwrap();
    assert_eq!(video.content_type.as_deref(), Some("video/mp4"));
    assert!(run.status.is_success());
    assert!(!run.adopted);
    let stats = sim.stats();
    // One sync call, and one lookup by client_ref to learn the run id.
    assert_eq!((stats.sync_calls, stats.creates, stats.lists), (1, 0, 1));
    let charges = sim.charges();
    assert_eq!(charges.len(), 1);
    assert_eq!(
        run.id,
        charges[0].run_id.to_string(),
        "the run id was found by client_ref"
    );
    assert_eq!(
        charges[0].client_ref.as_deref(),
        Some(job_id.to_string().as_str())
    );
    let status = reqwest::get(video.url.expose()).await.unwrap().status();
    assert_eq!(status, reqwest::StatusCode::OK);
}

#[tokio::test]
async fn sync_lost_response_is_reconciled_by_client_ref_without_a_second_call() {
    let sim = sim().await;
    let client = sync_client(&sim);
    let job_id = JobId::new();
    let run = client
        .run_sync(&job_id, 1, &request("a sync badger [[sim:lost-response]]"))
        .await
        .unwrap();
    assert!(run.adopted);
    assert!(run.video.is_some());
    let stats = sim.stats();
    assert_eq!(
        (stats.sync_calls, stats.runs_created, stats.lists),
        (1, 1, 1)
    );
    assert_eq!(sim.charges().len(), 1);
    assert_eq!(run.id, sim.charges()[0].run_id.to_string());
    assert_eq!(run.client_ref.as_deref(), Some(job_id.to_string().as_str()));
    let counts = client.stats().reconcile_counts();
    assert_eq!(
        (counts.unknown_outcomes, counts.adopted, counts.resubmitted),
        (1, 1, 0)
    );
}

#[tokio::test]
async fn sync_rate_limit_is_retried_and_proxy_errors_reconciled_first() {
    let sim = sim().await;
    let client = sync_client(&sim);
    client
        .run_sync(&JobId::new(), 1, &request("a sync elk [[sim:429]]"))
        .await
        .unwrap();
    let stats = sim.stats();
    assert_eq!(
        (stats.sync_calls, stats.runs_created, stats.lists),
        (2, 1, 1)
    );

    let sim = crate::common::sim().await;
    let client = sync_client(&sim);
    client
        .run_sync(&JobId::new(), 1, &request("a sync emu [[sim:502]]"))
        .await
        .unwrap();
    let stats = sim.stats();
    // Two looks that find nothing (each by client_ref, then by creation time) before the
    // second call, then one lookup by client_ref for the run id.
    assert_eq!(
        (stats.sync_calls, stats.runs_created, stats.lists),
        (2, 1, 5)
    );
    assert_eq!(sim.charges().len(), 1);
}

#[tokio::test]
async fn sync_moderation_is_permanent_and_free() {
    let sim = sim().await;
    let client = sync_client(&sim);
    let error = client
        .run_sync(
            &JobId::new(),
            1,
            &request("a sync shark [[sim:moderation]]"),
        )
        .await
        .unwrap_err();
    assert_eq!(error.class(), ErrorClass::Permanent);
    assert_eq!(error.code(), Some("CONTENT_POLICY_VIOLATION"));
    assert_eq!(sim.stats().sync_calls, 1);
    assert!(sim.charges().is_empty());
}
