//! Async-mode creates under every create-time fault: retried, reconciled or refused, and never
//! charged twice.

use std::time::Duration;

use klingq_core::{JobId, VideoDuration};
use klingq_provider::{CallOutcome, ErrorClass, Operation, ProviderError, VideoProvider};

use crate::common::{client, client_with, config, generate, request, sim};

#[tokio::test]
async fn rate_limited_create_is_retried_and_charged_once() {
    for token in ["429", "429-date", "429-none"] {
        let sim = sim().await;
        let (client, provider) = client(&sim);
        let (job_id, run) = generate(provider.as_ref(), &format!("a fox [[sim:{token}]]")).await;
        let run = run.unwrap_or_else(|error| panic!("{token}: {error}"));
        assert!(!run.adopted, "{token}");
        assert!(run.video.is_some());
        let stats = sim.stats();
        assert_eq!(
            (stats.creates, stats.runs_created, stats.lists),
            (2, 1, 0),
            "{token}"
        );
        let charges = sim.charges();
        assert_eq!(charges.len(), 1, "{token}");
        assert_eq!(
            charges[0].client_ref.as_deref(),
            Some(job_id.to_string().as_str())
        );
        assert_eq!(charges[0].run_id.to_string(), run.id);
        let calls = client.stats();
        assert_eq!(
            calls.count(Operation::Create, CallOutcome::Status(429)),
            1,
            "{token}"
        );
        assert_eq!(calls.calls(Operation::Create), 2, "{token}");
        assert_eq!(calls.reconcile_counts().unknown_outcomes, 0);
    }
}

#[tokio::test]
async fn create_metadata_carries_job_and_attempt() {
    let sim = sim().await;
    let (_, provider) = client(&sim);
    let job_id = JobId::new();
    let run = provider
        .create_run(&job_id, 3, &request("metadata check"))
        .await
        .unwrap();
    assert_eq!(run.client_ref.as_deref(), Some(job_id.to_string().as_str()));
    assert_eq!(run.attempt(), Some(3));
    let record = &sim.runs()[0];
    assert_eq!(
        record.client_ref.as_deref(),
        Some(job_id.to_string().as_str())
    );
    let metadata = record.metadata.as_ref().unwrap();
    assert_eq!(metadata["job_id"], job_id.to_string());
    assert_eq!(metadata["attempt"], 3);
}

#[tokio::test]
async fn lost_response_on_create_adopts_the_run_without_a_second_create() {
    let sim = sim().await;
    let (client, provider) = client(&sim);
    let (job_id, run) = generate(provider.as_ref(), "a heron [[sim:lost-response]]").await;
    let run = run.unwrap();
    let stats = sim.stats();
    assert_eq!((stats.creates, stats.runs_created, stats.lists), (1, 1, 1));
    let charges = sim.charges();
    assert_eq!(charges.len(), 1);
    assert_eq!(
        charges[0].client_ref.as_deref(),
        Some(job_id.to_string().as_str())
    );
    let counts = client.stats().reconcile_counts();
    assert_eq!(
        (counts.unknown_outcomes, counts.adopted, counts.resubmitted),
        (1, 1, 0)
    );
    assert_eq!(
        client
            .stats()
            .count(Operation::Create, CallOutcome::NetworkError),
        1
    );
    assert_eq!(run.id, charges[0].run_id.to_string());
}

#[tokio::test]
async fn adopted_flag_is_set_on_the_created_run() {
    let sim = sim().await;
    let (_, provider) = client(&sim);
    let run = provider
        .create_run(&JobId::new(), 1, &request("[[sim:lost-response]]"))
        .await
        .unwrap();
    assert!(run.adopted);
    assert_eq!(sim.stats().creates, 1);
}

#[tokio::test]
async fn gateway_timeout_after_create_adopts_the_run() {
    let sim = sim().await;
    let (_, provider) = client(&sim);
    let (_, run) = generate(provider.as_ref(), "an owl [[sim:504-after-create]]").await;
    run.unwrap();
    let stats = sim.stats();
    assert_eq!((stats.creates, stats.runs_created, stats.lists), (1, 1, 1));
    assert_eq!(sim.charges().len(), 1);
}

#[tokio::test]
async fn create_timeout_after_send_adopts_the_slow_run() {
    let sim = sim().await;
    let mut config = config(&sim);
    // The simulator holds a slow create for two seconds.
    config.timeouts.create = Duration::from_millis(800);
    let client = client_with(config);
    let job_id = JobId::new();
    let run = client
        .create_run(&job_id, 1, &request("a slow create [[sim:slow-create]]"))
        .await
        .unwrap();
    assert!(run.adopted);
    assert_eq!(
        client
            .stats()
            .count(Operation::Create, CallOutcome::Timeout),
        1
    );
    client
        .wait_for_run(&run.id, crate::common::deadline())
        .await
        .unwrap();
    let stats = sim.stats();
    assert_eq!((stats.creates, stats.runs_created, stats.lists), (1, 1, 1));
    assert_eq!(sim.charges().len(), 1);
}

#[tokio::test]
async fn json_server_errors_on_create_are_retried_without_a_lookup() {
    for token in ["500", "503"] {
        let sim = sim().await;
        let (client, provider) = client(&sim);
        let (_, run) = generate(provider.as_ref(), &format!("a lynx [[sim:{token}]]")).await;
        run.unwrap_or_else(|error| panic!("{token}: {error}"));
        let stats = sim.stats();
        assert_eq!(
            (stats.creates, stats.runs_created, stats.lists),
            (2, 1, 0),
            "{token}"
        );
        assert_eq!(sim.charges().len(), 1, "{token}");
        assert_eq!(
            client.stats().reconcile_counts().unknown_outcomes,
            0,
            "{token}"
        );
    }
}

#[tokio::test]
async fn proxy_errors_and_conflicts_on_create_are_reconciled_before_a_resubmit() {
    for token in ["502", "504", "500-html", "503-html", "409"] {
        let sim = sim().await;
        let (client, provider) = client(&sim);
        let (_, run) = generate(provider.as_ref(), &format!("a crane [[sim:{token}]]")).await;
        let run = run.unwrap_or_else(|error| panic!("{token}: {error}"));
        assert!(!run.adopted, "{token}");
        let stats = sim.stats();
        // Two looks (right away and after the grace period), each by client_ref and then by
        // creation time, before the second create.
        assert_eq!(
            (stats.creates, stats.runs_created, stats.lists),
            (2, 1, 4),
            "{token}"
        );
        assert_eq!(sim.charges().len(), 1, "{token}");
        let counts = client.stats().reconcile_counts();
        assert_eq!(
            (counts.unknown_outcomes, counts.adopted, counts.resubmitted),
            (1, 0, 1),
            "{token}"
        );
    }
}

#[tokio::test]
async fn insufficient_credit_is_an_account_error_without_retries() {
    let sim = sim().await;
    let (_, provider) = client(&sim);
    let error = provider
        .create_run(&JobId::new(), 1, &request("a wolf [[sim:402]]"))
        .await
        .unwrap_err();
    assert_eq!(error.class(), ErrorClass::Account);
    assert_eq!(error.code(), Some("INSUFFICIENT_CREDIT"));
    assert_eq!(error.status(), Some(402));
    assert_eq!(error.attempts(), 1);
    assert!(matches!(
        error,
        ProviderError::InsufficientCredit {
            operation: Operation::Create,
            ..
        }
    ));
    let stats = sim.stats();
    assert_eq!((stats.creates, stats.runs_created), (1, 0));

    sim.set_balance_usd(0.10);
    let error = provider
        .create_run(&JobId::new(), 1, &request("a poor wolf"))
        .await
        .unwrap_err();
    assert_eq!(error.class(), ErrorClass::Account);
    assert!(sim.charges().is_empty());
}

#[tokio::test]
async fn validation_errors_are_permanent_and_carry_field_errors() {
    let sim = sim().await;
    let (_, provider) = client(&sim);
    let mut bad = request("a seal");
    bad.cfg_scale = 2.0;
    bad.duration = VideoDuration::new(15).unwrap();
    let error = provider
        .create_run(&JobId::new(), 1, &bad)
        .await
        .unwrap_err();
    assert_eq!(error.class(), ErrorClass::Permanent);
    assert_eq!(error.status(), Some(422));
    assert_eq!(error.code(), Some("VALIDATION_ERROR"));
    assert!(
        error
            .field_errors()
            .iter()
            .any(|field| field.path == "input.cfg_scale"),
        "{:?}",
        error.field_errors()
    );
    assert_eq!(sim.stats().creates, 1);
}

#[tokio::test]
async fn create_retries_stop_at_the_attempt_cap() {
    let sim = sim().await;
    let (_, provider) = client(&sim);
    let error = provider
        .create_run(&JobId::new(), 1, &request("a bee [[sim:429:10]]"))
        .await
        .unwrap_err();
    assert_eq!(error.class(), ErrorClass::Transient);
    assert_eq!(error.attempts(), 5);
    assert_eq!(error.code(), Some("RATE_LIMITED"));
    assert_eq!(error.retry_after(), Some(Duration::from_secs(2)));
    let stats = sim.stats();
    assert_eq!((stats.creates, stats.runs_created), (5, 0));
}
