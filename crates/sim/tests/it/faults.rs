//! Fault injection on create and poll, by prompt token, by header and by config rate.

use std::time::{Duration, SystemTime};

use klingq_sim::{RetryAfterMode, SimConfig};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::{CREATE_PATH, Harness, eventually, fast, harness, header, input};

/// Creates with a token twice: the first answer is the fault, the retry succeeds.
async fn faulted_then_recovers(h: &Harness, token: &str) -> reqwest::Response {
    let body = json!({"input": input(&format!("a fox [[sim:{token}]]"))});
    let first = h.post_create(&body).await;
    let retry = h.post_create(&body).await;
    assert_eq!(
        retry.status(),
        StatusCode::CREATED,
        "retry after {token} succeeds"
    );
    first
}

#[tokio::test]
async fn rate_limit_with_retry_after_seconds() {
    let h = fast().await;
    let response = faulted_then_recovers(&h, "429").await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&response, "retry-after").as_deref(), Some("2"));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "RATE_LIMITED");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .starts_with("Rate limit exceeded: ")
    );
    assert_eq!(h.sim.stats().runs_created, 1);
}

#[tokio::test]
async fn rate_limit_with_retry_after_http_date() {
    let h = fast().await;
    let response = faulted_then_recovers(&h, "429-date").await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    let date = httpdate::parse_http_date(&header(&response, "retry-after").unwrap()).unwrap();
    assert!(date > SystemTime::now());
    assert!(date < SystemTime::now() + Duration::from_secs(60));
}

#[tokio::test]
async fn rate_limit_without_retry_after() {
    let h = fast().await;
    let response = faulted_then_recovers(&h, "429-none").await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&response, "retry-after"), None);
}

#[tokio::test]
async fn token_counts_bound_how_often_a_create_fault_applies() {
    let h = fast().await;
    let body = json!({"input": input("count me [[sim:503:2]]")});
    assert_eq!(
        h.post_create(&body).await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        h.post_create(&body).await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(h.post_create(&body).await.status(), StatusCode::CREATED);
    assert_eq!(h.sim.stats().faults_injected["503"], 2);
}

#[tokio::test]
async fn json_and_html_server_errors_create_no_run() {
    let h = fast().await;
    let cases = [
        (
            "402",
            StatusCode::PAYMENT_REQUIRED,
            Some("INSUFFICIENT_CREDIT"),
        ),
        ("409", StatusCode::CONFLICT, Some("CONFLICT")),
        (
            "500",
            StatusCode::INTERNAL_SERVER_ERROR,
            Some("INTERNAL_ERROR"),
        ),
        (
            "503",
            StatusCode::SERVICE_UNAVAILABLE,
            Some("MODEL_UNAVAILABLE"),
        ),
        ("500-html", StatusCode::INTERNAL_SERVER_ERROR, None),
        ("502", StatusCode::BAD_GATEWAY, None),
        ("503-html", StatusCode::SERVICE_UNAVAILABLE, None),
        ("504", StatusCode::GATEWAY_TIMEOUT, None),
    ];
    for (token, status, code) in cases {
        let response = h
            .post_create(&json!({"input": input(&format!("x [[sim:{token}]]"))}))
            .await;
        assert_eq!(response.status(), status, "{token}");
        let content_type = header(&response, "content-type").unwrap();
        let text = response.text().await.unwrap();
        match code {
            Some(code) => {
                assert!(content_type.starts_with("application/json"), "{token}");
                let body: Value = serde_json::from_str(&text).unwrap();
                assert_eq!(body["code"], code, "{token}");
                assert!(body.get("errors").is_some());
            }
            None => {
                assert!(content_type.starts_with("text/html"), "{token}");
                assert!(text.contains("<html>"), "{token}");
            }
        }
    }
    assert!(h.sim.runs().is_empty());
}

#[tokio::test]
async fn gateway_timeout_after_create_leaves_a_billed_run() {
    let h = fast().await;
    let response = h
        .post_create(&json!({"input": input("[[sim:504-after-create]]"), "client_ref": "gw:1"}))
        .await;
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    let runs = h.sim.runs();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].client_ref.as_deref(), Some("gw:1"));
    let charges = eventually("the charge", || async {
        Some(h.sim.charges()).filter(|c| !c.is_empty())
    })
    .await;
    assert_eq!(charges[0].run_id, runs[0].id);
}

#[tokio::test]
async fn lost_response_drops_the_connection_but_the_run_exists_and_is_charged() {
    let h = fast().await;
    let body = json!({
        "input": input("a heron [[sim:lost-response]]"),
        "client_ref": "job-7:1",
        "metadata": {"job_id": "job-7"},
    });
    let result = h.post(CREATE_PATH).json(&body).send().await;
    let error = result.expect_err("no HTTP response arrives");
    assert!(!error.is_timeout());
    assert!(error.status().is_none());

    // The client can reconcile through the list API.
    let page: Value = h
        .get("/v1/runs")
        .query(&[("q", "client_ref:\"job-7:1\"")])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let found = page["data"].as_array().unwrap();
    assert_eq!(found.len(), 1);
    let id = found[0]["id"].as_str().unwrap();
    assert_eq!(h.wait_terminal(id).await["status_code"], "succeeded");
    let charges = h.sim.charges();
    assert_eq!(charges.len(), 1);
    assert_eq!(charges[0].job_id.as_deref(), Some("job-7"));
    assert_eq!(h.record(id).unwrap().faults, ["lost-response"]);

    // The token applies once per prompt, so a blind retry creates a second, paid run.
    assert_eq!(h.post_create(&body).await.status(), StatusCode::CREATED);
    assert_eq!(h.sim.runs().len(), 2);
}

#[tokio::test]
async fn lost_response_by_config_rate() {
    let h = harness(SimConfig {
        lost_response: 1.0,
        ..SimConfig::fast()
    })
    .await;
    for _ in 0..3 {
        assert!(
            h.post(CREATE_PATH)
                .json(&json!({"input": input("lost")}))
                .send()
                .await
                .is_err()
        );
    }
    assert_eq!(h.sim.runs().len(), 3);
    assert_eq!(h.sim.stats().faults_injected["lost-response"], 3);
}

#[tokio::test]
async fn slow_create_exceeds_the_client_timeout_yet_creates_the_run() {
    let h = harness(SimConfig {
        slow_create_secs: 30.0,
        ..SimConfig::fast()
    })
    .await;
    let result = h
        .post(CREATE_PATH)
        .timeout(Duration::from_millis(500))
        .json(&json!({"input": input("slow [[sim:slow-create]]"), "client_ref": "slow:1"}))
        .send()
        .await;
    assert!(result.expect_err("the client gives up").is_timeout());
    assert_eq!(h.sim.runs()[0].client_ref.as_deref(), Some("slow:1"));
}

#[tokio::test]
async fn slow_create_answers_after_the_delay() {
    let h = harness(SimConfig {
        slow_create_secs: 0.05,
        slow_create: 1.0,
        ..SimConfig::fast()
    })
    .await;
    let run = h
        .create_body(json!({"input": input("slow but fine")}))
        .await;
    assert_eq!(run["status_code"], "queued");
}

#[tokio::test]
async fn header_tokens_work_like_prompt_tokens() {
    let h = fast().await;
    let response = h
        .post(CREATE_PATH)
        .header("x-sim-fault", "429-none")
        .json(&json!({"input": input("header")}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    let bad = h
        .post(CREATE_PATH)
        .header("x-sim-fault", "bogus")
        .json(&json!({"input": input("h")}))
        .send()
        .await;
    assert_eq!(bad.unwrap().status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn config_rates_inject_create_errors() {
    let h = harness(SimConfig {
        fail_429: 1.0,
        retry_after: RetryAfterMode::None,
        ..SimConfig::fast()
    })
    .await;
    let response = h.post_create(&json!({"input": input("rate")})).await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&response, "retry-after"), None);

    h.sim
        .update_config(&json!({"fail_429": 0.0, "fail_5xx": 1.0}))
        .unwrap();
    for _ in 0..5 {
        let status = h
            .post_create(&json!({"input": input("5xx")}))
            .await
            .status();
        assert!(status.is_server_error(), "{status}");
    }
    h.sim
        .update_config(&json!({"fail_5xx": 0.0, "fail_402": 1.0}))
        .unwrap();
    assert_eq!(
        h.post_create(&json!({"input": input("402")}))
            .await
            .status(),
        StatusCode::PAYMENT_REQUIRED
    );
    assert!(h.sim.runs().is_empty());
}

#[tokio::test]
async fn concurrency_limit_rejects_creates_beyond_the_cap() {
    let h = harness(SimConfig {
        max_concurrent_runs: Some(1),
        ..SimConfig::fast()
    })
    .await;
    let stuck = h.create(input("forever [[sim:stuck]]")).await;
    let response = h.post_create(&json!({"input": input("second")})).await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&response, "retry-after").as_deref(), Some("2"));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "RATE_LIMITED");
    let status = h.record(&stuck).unwrap().status;
    assert!(status != "succeeded" && status != "failed", "{status}");
    h.sim
        .update_config(&json!({"max_concurrent_runs": 2}))
        .unwrap();
    h.create(input("now allowed")).await;
}

#[tokio::test]
async fn moderation_fails_the_run_with_content_policy_violation() {
    let h = fast().await;
    let run = h
        .wait_terminal(&h.create(input("[[sim:moderation]]")).await)
        .await;
    assert_eq!(run["status_code"], "failed");
    assert_eq!(run["failure_code"], "CONTENT_POLICY_VIOLATION");
    assert_eq!(run["failure_stage_code"], "moderation");
    assert!(run["failure_message"].as_str().unwrap().contains("prompt"));
    assert_eq!(run["error"]["code"], "CONTENT_POLICY_VIOLATION");
    assert!(run["output"].is_null());
    assert!(run["cost"].is_null());
}

#[tokio::test]
async fn output_moderation_and_provider_timeout_fail_late() {
    let h = fast().await;
    let late = h
        .wait_terminal(&h.create(input("[[sim:output-moderation]]")).await)
        .await;
    assert_eq!(late["failure_code"], "CONTENT_POLICY_VIOLATION");
    assert_eq!(late["failure_stage_code"], "execution");
    let timeout = h
        .wait_terminal(&h.create(input("[[sim:provider-timeout]]")).await)
        .await;
    assert_eq!(timeout["status_code"], "failed");
    assert_eq!(timeout["failure_code"], "PROVIDER_TIMEOUT");
    assert_eq!(timeout["error"]["code"], "PROVIDER_TIMEOUT");
}

#[tokio::test]
async fn outcome_tokens_apply_to_every_run_unless_counted() {
    let h = fast().await;
    for _ in 0..2 {
        let run = h
            .wait_terminal(&h.create(input("always [[sim:provider-timeout]]")).await)
            .await;
        assert_eq!(run["status_code"], "failed");
    }
    let first = h
        .wait_terminal(&h.create(input("once [[sim:provider-timeout:1]]")).await)
        .await;
    assert_eq!(first["status_code"], "failed");
    let second = h
        .wait_terminal(&h.create(input("once [[sim:provider-timeout:1]]")).await)
        .await;
    assert_eq!(second["status_code"], "succeeded");
}

#[tokio::test]
async fn stuck_runs_stay_running_while_others_finish() {
    let h = fast().await;
    let stuck = h.create(input("[[sim:stuck]]")).await;
    let normal = h.create(input("normal")).await;
    // Give the normal run ten times its own latency: the stuck one must still be running.
    let normal_run = h.wait_terminal(&normal).await;
    let waited_ms = normal_run["duration_ms"].as_u64().unwrap() * 10;
    tokio::time::sleep(Duration::from_millis(waited_ms)).await;
    let run: Value = h.get_run(&stuck).await.json().await.unwrap();
    assert_eq!(run["status_code"], "running");
    assert!(run["completed_at"].is_null());
}

#[tokio::test]
async fn succeeded_without_url_has_an_empty_output() {
    let h = fast().await;
    let run = h
        .wait_terminal(&h.create(input("[[sim:no-url]]")).await)
        .await;
    assert_eq!(run["status_code"], "succeeded");
    assert_eq!(run["output"], json!({}));
    assert_eq!(h.sim.charges().len(), 1);
}

#[tokio::test]
async fn run_failures_by_config_rate() {
    let h = harness(SimConfig {
        moderation: 1.0,
        ..SimConfig::fast()
    })
    .await;
    let run = h
        .wait_terminal(&h.create(input("moderated by rate")).await)
        .await;
    assert_eq!(run["failure_code"], "CONTENT_POLICY_VIOLATION");
    h.sim
        .update_config(&json!({"moderation": 0.0, "no_url": 1.0}))
        .unwrap();
    let run = h
        .wait_terminal(&h.create(input("no url by rate")).await)
        .await;
    assert_eq!(run["output"], json!({}));
}

#[tokio::test]
async fn poll_5xx_answers_the_first_polls_with_html_errors() {
    let h = fast().await;
    let id = h.create(input("[[sim:poll-5xx]]")).await;
    for _ in 0..2 {
        let response = h.get_run(&id).await;
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        assert!(
            header(&response, "content-type")
                .unwrap()
                .starts_with("text/html")
        );
    }
    assert_eq!(h.get_run(&id).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn poll_reset_drops_the_connection_of_the_first_polls() {
    let h = fast().await;
    let id = h.create(input("[[sim:poll-reset:1]]")).await;
    assert!(h.get(&format!("/v1/runs/{id}")).send().await.is_err());
    assert_eq!(h.get_run(&id).await.status(), StatusCode::OK);
    assert_eq!(h.record(&id).unwrap().polls, 2);
}

#[tokio::test]
async fn poll_404_imitates_eventual_consistency_right_after_create() {
    let h = fast().await;
    let id = h.create(input("[[sim:poll-404]]")).await;
    for _ in 0..2 {
        let response = h.get_run(&id).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_eq!(
            response.json::<Value>().await.unwrap()["code"],
            "RUN_NOT_FOUND"
        );
    }
    assert_eq!(h.get_run(&id).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn flaky_poll_alternates_5xx_and_resets_then_recovers() {
    let h = fast().await;
    let id = h.create(input("[[sim:flaky-poll]]")).await;
    assert_eq!(
        h.get_run(&id).await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert!(h.get(&format!("/v1/runs/{id}")).send().await.is_err());
    assert_eq!(h.wait_terminal(&id).await["status_code"], "succeeded");
}

#[tokio::test]
async fn flaky_polls_by_config_rate() {
    let h = harness(SimConfig {
        flaky_poll: 1.0,
        ..SimConfig::fast()
    })
    .await;
    let id = h.create(input("flaky rate")).await;
    for _ in 0..4 {
        // Either the connection is dropped, or a 5xx arrives.
        if let Ok(response) = h.get(&format!("/v1/runs/{id}")).send().await {
            assert!(response.status().is_server_error());
        }
    }
    h.sim.update_config(&json!({"flaky_poll": 0.0, "poll_not_found": 1.0, "time_scale": 1.0, "dispatch_secs": 1000.0}))
        .unwrap();
    let queued = h.create(input("still queued")).await;
    assert_eq!(h.get_run(&queued).await.status(), StatusCode::NOT_FOUND);
}
