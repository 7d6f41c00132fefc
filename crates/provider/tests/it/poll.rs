//! Waiting for runs: failures, flaky polls, missing output, deadlines and URL refresh. A poll or
//! download failure never creates another run.

use std::time::Duration;

use klingq_core::JobId;
use klingq_provider::{ErrorClass, ProviderError, RunFailureKind, RunStatus, VideoProvider};
use tokio::time::Instant;

use crate::common::{client, client_with, config, generate, request, sim};

#[tokio::test]
async fn moderation_is_a_permanent_failure_without_charge() {
    let sim = sim().await;
    let (_, provider) = client(&sim);
    let (_, result) = generate(provider.as_ref(), "a tiger [[sim:moderation]]").await;
    let error = result.unwrap_err();
    assert_eq!(error.class(), ErrorClass::Permanent);
    assert_eq!(error.code(), Some("CONTENT_POLICY_VIOLATION"));
    assert!(error.is_client_fault());
    match &error {
        ProviderError::RunFailed {
            kind,
            status,
            failure,
            ..
        } => {
            assert_eq!(*kind, RunFailureKind::Moderation);
            assert_eq!(*status, RunStatus::Failed);
            assert!(failure.message.is_some());
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(sim.charges().is_empty());
    assert_eq!(sim.stats().creates, 1);
}

#[tokio::test]
async fn provider_timeout_is_a_retryable_generation_failure_without_charge() {
    let sim = sim().await;
    let (_, provider) = client(&sim);
    let (_, result) = generate(provider.as_ref(), "a mole [[sim:provider-timeout]]").await;
    let error = result.unwrap_err();
    assert_eq!(error.class(), ErrorClass::GenerationFailed);
    assert_eq!(error.code(), Some("PROVIDER_TIMEOUT"));
    assert!(!error.cost_committed());
    assert!(sim.charges().is_empty());
    assert_eq!(sim.stats().creates, 1, "waiting never creates");
}

#[tokio::test]
async fn succeeded_without_url_is_its_own_error_after_rereads() {
    let sim = sim().await;
    let (_, provider) = client(&sim);
    let job_id = JobId::new();
    let run = provider
        .create_run(&job_id, 1, &request("a newt [[sim:no-url]]"))
        .await
        .unwrap();
    let error = provider
        .wait_for_run(&run.id, crate::common::deadline())
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            ProviderError::SucceededWithoutOutput { reads: 3, .. }
        ),
        "{error:?}"
    );
    assert_eq!(error.class(), ErrorClass::GenerationFailed);
    assert_eq!(error.code(), Some("SUCCEEDED_WITHOUT_OUTPUT"));
    assert!(error.cost_committed(), "the run was billed");
    assert_eq!(sim.charges().len(), 1);
    let record = &sim.runs()[0];
    assert_eq!(record.status, "succeeded");
    assert_eq!(sim.stats().creates, 1);
    let refresh = provider.refresh_video_url(&run.id).await.unwrap_err();
    assert!(
        matches!(refresh, ProviderError::SucceededWithoutOutput { .. }),
        "{refresh:?}"
    );
}

#[tokio::test]
async fn flaky_polls_still_succeed() {
    for token in ["flaky-poll:4", "poll-5xx:3", "poll-reset:3", "poll-404:2"] {
        let sim = sim().await;
        let (_, provider) = client(&sim);
        let (_, result) = generate(provider.as_ref(), &format!("a hare [[sim:{token}]]")).await;
        let run = result.unwrap_or_else(|error| panic!("{token}: {error}"));
        assert!(run.video.is_some(), "{token}");
        let stats = sim.stats();
        assert_eq!((stats.creates, stats.runs_created), (1, 1), "{token}");
        assert!(stats.polls >= 4, "{token}: {}", stats.polls);
        assert_eq!(sim.charges().len(), 1, "{token}");
        let record = &sim.runs()[0];
        assert!(!record.faults.is_empty(), "{token}: the fault was applied");
    }
}

#[tokio::test]
async fn a_run_that_stays_missing_needs_reconciliation() {
    let sim = sim().await;
    let (_, provider) = client(&sim);
    let (_, result) = generate(provider.as_ref(), "a ghost [[sim:poll-404:10]]").await;
    let error = result.unwrap_err();
    assert_eq!(error.class(), ErrorClass::NeedsReconciliation);
    assert!(
        matches!(error, ProviderError::RunNotFound { .. }),
        "{error:?}"
    );
    // The first poll and three tolerated retries.
    assert_eq!(sim.stats().polls, 4);
    assert_eq!(sim.stats().creates, 1);
}

#[tokio::test]
async fn a_stuck_run_hits_the_deadline_without_a_resubmit() {
    let sim = sim().await;
    let (_, provider) = client(&sim);
    let run = provider
        .create_run(&JobId::new(), 1, &request("a sloth [[sim:stuck]]"))
        .await
        .unwrap();
    let error = provider
        .wait_for_run(&run.id, Instant::now() + Duration::from_millis(500))
        .await
        .unwrap_err();
    assert_eq!(error.class(), ErrorClass::NeedsReconciliation);
    assert!(error.cost_committed());
    match &error {
        ProviderError::DeadlineExceeded {
            last_status, polls, ..
        } => {
            assert!(!last_status.is_terminal(), "{last_status}");
            assert!(*polls >= 1);
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(sim.stats().creates, 1);
}

#[tokio::test]
async fn an_expired_download_url_is_refreshed_by_rereading_the_run() {
    let sim = sim().await;
    let (_, provider) = client(&sim);
    let (_, result) = generate(provider.as_ref(), "a puffin [[sim:download-expired]]").await;
    let run = result.unwrap();
    let video = run.video.clone().unwrap();
    assert_eq!(video.content_type.as_deref(), Some("video/mp4"));
    let http = reqwest::Client::new();
    let first = http.get(video.url.expose()).send().await.unwrap();
    assert_eq!(first.status(), reqwest::StatusCode::FORBIDDEN);

    let polls_before = sim.stats().polls;
    let fresh = provider.refresh_video_url(&run.id).await.unwrap();
    assert_eq!(sim.stats().polls, polls_before + 1);
    let second = http.get(fresh.url.expose()).send().await.unwrap();
    assert_eq!(second.status(), reqwest::StatusCode::OK);
    let bytes = second.bytes().await.unwrap();
    assert_eq!(Some(bytes.len() as u64), fresh.file_size);
    assert_eq!(&bytes[4..8], b"ftyp");
    let stats = sim.stats();
    assert_eq!((stats.creates, stats.downloads), (1, 2));
    assert_eq!(sim.charges().len(), 1);
}

#[tokio::test]
async fn get_run_of_an_unknown_id_is_not_found() {
    let sim = sim().await;
    let client = client_with(config(&sim));
    let error = client
        .get_run("0190a5f0-0000-7000-8000-000000000001")
        .await
        .unwrap_err();
    assert_eq!(error.class(), ErrorClass::NeedsReconciliation);
    assert_eq!(error.status(), Some(404));
    assert_eq!(error.code(), Some("RUN_NOT_FOUND"));
    let error = client.get_run("../v1/runs").await.unwrap_err();
    assert_eq!(error.class(), ErrorClass::Permanent);
    assert_eq!(
        sim.stats().polls,
        1,
        "an invalid id is refused before any request"
    );
}

#[tokio::test]
async fn find_run_prefers_the_succeeded_run_of_a_job() {
    let sim = sim().await;
    let (_, provider) = client(&sim);
    let job_id = JobId::new();
    let failed = provider
        .create_run(&job_id, 1, &request("a yak [[sim:moderation]]"))
        .await
        .unwrap();
    assert!(
        provider
            .wait_for_run(&failed.id, crate::common::deadline())
            .await
            .is_err()
    );
    let good = provider
        .create_run(&job_id, 2, &request("a yak"))
        .await
        .unwrap();
    provider
        .wait_for_run(&good.id, crate::common::deadline())
        .await
        .unwrap();
    let found = provider
        .find_run(&job_id.to_string())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.id, good.id);
    assert_eq!(found.attempt(), Some(2));
    assert!(
        provider
            .find_run(&JobId::new().to_string())
            .await
            .unwrap()
            .is_none()
    );
}
