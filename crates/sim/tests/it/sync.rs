//! The synchronous façade `POST /v1/run/...`: held connection, video object, billing before the answer.

use klingq_sim::SimConfig;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::{SYNC_PATH, fast, harness, header, input};

#[tokio::test]
async fn sync_run_answers_with_a_video_object_and_is_billed_before_the_answer() {
    let h = fast().await;
    let response = h
        .post(SYNC_PATH)
        .json(&input("a sync clip"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    // The charge is booked before the response is written.
    let charges = h.sim.charges();
    assert_eq!(charges.len(), 1);
    let video = &body["video"];
    assert_eq!(video["content_type"], "video/mp4");
    assert_eq!(video["file_name"], "out.mp4");
    assert_eq!(video["file_size"], 10_000);
    let runs = h.sim.runs();
    assert_eq!(runs[0].source, "sync");
    assert_eq!(runs[0].status, "succeeded");
    assert_eq!(runs[0].model, klingq_sim::DEFAULT_MODEL);
    let bytes = h
        .http
        .get(video["url"].as_str().unwrap())
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(bytes.len(), 10_000);
    assert_eq!(h.sim.stats().sync_calls, 1);
    assert_eq!(h.sim.stats().creates, 0);
}

#[tokio::test]
async fn the_path_without_kuaishou_works_too() {
    let h = fast().await;
    let response = h
        .post("/v1/run/kling-video/v3/pro/image-to-video")
        .json(&input("short path"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(h.sim.runs()[0].model, "kling-video/v3/pro/image-to-video");
}

#[tokio::test]
async fn sync_validation_uses_the_same_rules() {
    let h = fast().await;
    let response = h
        .post(SYNC_PATH)
        .json(&json!({"prompt": "p", "image_url": "https://e.com/a.png"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body: Value = response.json().await.unwrap();
    let locs: Vec<&Value> = body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|error| &error["loc"])
        .collect();
    assert!(locs.contains(&&json!(["input", "start_image_url"])));
    assert!(locs.contains(&&json!(["input", "image_url"])));
    let unauthorized = h
        .http
        .post(h.url(SYNC_PATH))
        .json(&input("no key"))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthorized.status(), StatusCode::UNAUTHORIZED);
    assert!(h.sim.runs().is_empty());
}

#[tokio::test]
async fn sync_lost_response_after_the_run_finished_is_still_billed() {
    let h = fast().await;
    let result = h
        .post(SYNC_PATH)
        .json(&input("a sync heron [[sim:lost-response]]"))
        .send()
        .await;
    assert!(result.is_err());
    let runs = h.sim.runs();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].status, "succeeded");
    assert_eq!(h.sim.charges().len(), 1);
}

#[tokio::test]
async fn sync_failures_map_to_error_envelopes() {
    let h = fast().await;
    let response = h
        .post(SYNC_PATH)
        .json(&input("[[sim:moderation]]"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        response.json::<Value>().await.unwrap()["code"],
        "CONTENT_POLICY_VIOLATION"
    );
    let response = h
        .post(SYNC_PATH)
        .json(&input("[[sim:provider-timeout]]"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(
        response.json::<Value>().await.unwrap()["code"],
        "PROVIDER_TIMEOUT"
    );
    let response = h
        .post(SYNC_PATH)
        .json(&input("[[sim:no-url]]"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.json::<Value>().await.unwrap(), json!({}));
    let response = h
        .post(SYNC_PATH)
        .json(&input("[[sim:429-date]]"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(header(&response, "retry-after").is_some());
    let response = h
        .post(SYNC_PATH)
        .json(&input("[[sim:504-after-create]]"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(
        header(&response, "content-type")
            .unwrap()
            .starts_with("text/html")
    );
    // Only no-url and 504-after-create succeeded, so only they are billed.
    assert_eq!(h.sim.charges().len(), 2);
}

#[tokio::test]
async fn sync_runs_hold_the_connection_for_the_simulated_latency() {
    let h = harness(SimConfig {
        median_latency_secs: 100.0,
        latency_sigma: 0.0,
        queue_max_secs: 0.0,
        dispatch_secs: 0.0,
        ..SimConfig::fast()
    })
    .await;
    let response = h.post(SYNC_PATH).json(&json!({"prompt": "p", "start_image_url": "https://e.com/a.png", "generate_audio": false})).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // The answer only comes once the run is terminal, i.e. after its simulated 100 s (0.1 s real).
    let record = &h.sim.runs()[0];
    assert_eq!(record.status, "succeeded");
    assert!((record.running_secs - 100.0).abs() < 1e-6);
}
