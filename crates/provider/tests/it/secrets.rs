//! The API key never reaches a log line, an error message or a Debug output.

use klingq_core::JobId;
use klingq_provider::{ErrorClass, ProviderConfig, VideoProvider};

use crate::capture::Captured;
use crate::common::{client_with, config, generate, request, sim};

const SECRET: &str = "rf_live_SECRET_do_not_log_4242";

#[tokio::test]
async fn api_key_never_appears_in_logs_errors_or_debug() {
    let captured = Captured::global();
    let sim = sim().await;
    sim.update_config(&serde_json::json!({"api_key": "rf_live_the_right_key"}))
        .unwrap();
    let mut wrong = config(&sim);
    wrong.api_key = SECRET.into();
    let client = client_with(wrong.clone());
    let error = client
        .create_run(&JobId::new(), 1, &request("a key test"))
        .await
        .unwrap_err();
    assert_eq!(error.class(), ErrorClass::Permanent);
    assert_eq!(error.status(), Some(401));
    let shown = format!(
        "{error} {error:?} {client:?} {wrong:?} {}",
        serde_json::to_string(&wrong).unwrap()
    );
    assert!(!shown.contains(SECRET), "{shown}");

    // A full run with the right key logs plenty, and still never the key.
    sim.update_config(&serde_json::json!({"api_key": SECRET}))
        .unwrap();
    let client = client_with(ProviderConfig {
        api_key: SECRET.into(),
        ..config(&sim)
    });
    let (_, run) = generate(
        &client,
        "a logged run [[sim:lost-response]] [[sim:flaky-poll]]",
    )
    .await;
    run.unwrap();
    let logs = captured.text();
    assert!(logs.contains("provider call"), "the capture works: {logs}");
    assert!(logs.contains("adopted the run"), "{logs}");
    assert!(!logs.contains(SECRET), "{logs}");
    // The capture holds every test's logs: none of them shows the shared test key either.
    assert!(!logs.contains(crate::common::API_KEY), "{logs}");
    assert!(!logs.contains("Bearer"), "{logs}");
}

#[tokio::test]
async fn a_provider_that_echoes_the_authorization_header_does_not_leak_the_key() {
    const ECHOED: &str = "rf_live_ECHOED_by_a_careless_provider_77";
    let captured = Captured::global();
    let sim = sim().await;
    sim.update_config(&serde_json::json!({"api_key": ECHOED}))
        .unwrap();
    let client = client_with(ProviderConfig {
        api_key: ECHOED.into(),
        ..config(&sim)
    });
    let error = client
        .create_run(&JobId::new(), 1, &request("echo me [[sim:echo-auth]]"))
        .await
        .unwrap_err();
    assert_eq!(error.class(), ErrorClass::Permanent);
    assert_eq!(error.status(), Some(400));
    let shown = format!("{error} {error:?}");
    assert!(
        shown.contains("Authorization: Bearer [redacted]"),
        "the echo is there, scrubbed: {shown}"
    );
    assert!(!shown.contains(ECHOED), "{shown}");
    let logs = captured.text();
    assert!(!logs.contains(ECHOED), "{logs}");
}
