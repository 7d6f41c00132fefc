//! Input validation: one case per rule of provider-api.md §7.2, each answered 422 with its `loc`.

use klingq_sim::SimConfig;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::{CREATE_PATH, Harness, SYNC_PATH, fast, harness};

fn base() -> Value {
    json!({"prompt": "a calm sea", "start_image_url": "https://example.com/sea.png"})
}

fn with(changes: Value) -> Value {
    let mut input = base();
    for (key, value) in changes.as_object().unwrap() {
        if value.is_null() {
            input.as_object_mut().unwrap().remove(key);
        } else {
            input[key] = value.clone();
        }
    }
    input
}

fn multi(shots: Value) -> Value {
    with(json!({"prompt": null, "multi_prompt": shots, "shot_type": "customize"}))
}

/// Sends the input and returns the `loc` of every reported error, asserting the 422 envelope.
async fn rejected(h: &Harness, input: Value) -> Vec<Value> {
    let response = h.post_create(&json!({"input": input})).await;
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "VALIDATION_ERROR");
    assert!(body["message"].is_string());
    body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|error| {
            assert!(error["msg"].is_string());
            error["loc"].clone()
        })
        .collect()
}

async fn accepted(h: &Harness, input: Value) {
    let response = h.post_create(&json!({"input": input})).await;
    let status = response.status();
    assert_eq!(
        status,
        StatusCode::CREATED,
        "{}",
        response.text().await.unwrap()
    );
}

#[tokio::test]
async fn start_image_url_is_required() {
    let h = fast().await;
    assert_eq!(
        rejected(&h, with(json!({"start_image_url": null}))).await,
        [json!(["input", "start_image_url"])]
    );
}

#[tokio::test]
async fn start_image_url_must_be_http_or_data_uri() {
    let h = fast().await;
    let locs = rejected(&h, with(json!({"start_image_url": "runflow://assets/1"}))).await;
    assert_eq!(locs, [json!(["input", "start_image_url"])]);
    accepted(
        &h,
        with(json!({"start_image_url": "data:image/png;base64,iVBORw0KGgo="})),
    )
    .await;
    accepted(
        &h,
        with(json!({"start_image_url": "http://example.com/a.png"})),
    )
    .await;
    let locs = rejected(
        &h,
        with(json!({"end_image_url": "ftp://example.com/a.png"})),
    )
    .await;
    assert_eq!(locs, [json!(["input", "end_image_url"])]);
}

#[tokio::test]
async fn exactly_one_of_prompt_and_multi_prompt() {
    let h = fast().await;
    assert_eq!(
        rejected(&h, with(json!({"prompt": null}))).await,
        [json!(["input", "prompt"])]
    );
    let both = with(json!({"multi_prompt": [{"prompt": "one"}], "shot_type": "customize"}));
    assert_eq!(rejected(&h, both).await, [json!(["input", "prompt"])]);
}

#[tokio::test]
async fn duration_must_be_a_string_between_3_and_15() {
    let h = fast().await;
    assert_eq!(
        rejected(&h, with(json!({"duration": 5}))).await,
        [json!(["input", "duration"])]
    );
    assert_eq!(
        rejected(&h, with(json!({"duration": "16"}))).await,
        [json!(["input", "duration"])]
    );
    assert_eq!(
        rejected(&h, with(json!({"duration": "2"}))).await,
        [json!(["input", "duration"])]
    );
    assert_eq!(
        rejected(&h, with(json!({"duration": "five"}))).await,
        [json!(["input", "duration"])]
    );
    accepted(&h, with(json!({"duration": "3"}))).await;
    accepted(&h, with(json!({"duration": "15"}))).await;
}

#[tokio::test]
async fn integer_duration_is_accepted_in_lenient_mode() {
    let h = harness(SimConfig {
        lenient_duration: true,
        ..SimConfig::fast()
    })
    .await;
    accepted(&h, with(json!({"duration": 7}))).await;
    assert_eq!(h.sim.runs()[0].duration_secs, 7);
}

#[tokio::test]
async fn cfg_scale_must_be_between_0_and_1() {
    let h = fast().await;
    assert_eq!(
        rejected(&h, with(json!({"cfg_scale": 1.5}))).await,
        [json!(["input", "cfg_scale"])]
    );
    assert_eq!(
        rejected(&h, with(json!({"cfg_scale": -0.1}))).await,
        [json!(["input", "cfg_scale"])]
    );
    assert_eq!(
        rejected(&h, with(json!({"cfg_scale": "0.5"}))).await,
        [json!(["input", "cfg_scale"])]
    );
    accepted(&h, with(json!({"cfg_scale": 0}))).await;
    accepted(&h, with(json!({"cfg_scale": 1.0}))).await;
}

#[tokio::test]
async fn shot_type_must_be_customize() {
    let h = fast().await;
    let locs = rejected(&h, with(json!({"shot_type": "intelligence"}))).await;
    assert_eq!(locs, [json!(["input", "shot_type"])]);
    accepted(&h, with(json!({"shot_type": "customize"}))).await;
}

#[tokio::test]
async fn shot_type_is_required_with_multi_prompt() {
    let h = fast().await;
    let input = with(json!({"prompt": null, "multi_prompt": [{"prompt": "one"}]}));
    assert_eq!(rejected(&h, input).await, [json!(["input", "shot_type"])]);
}

#[tokio::test]
async fn multi_prompt_has_one_to_six_shots() {
    let h = fast().await;
    assert_eq!(
        rejected(&h, multi(json!([]))).await,
        [json!(["input", "multi_prompt"])]
    );
    let seven: Vec<Value> = (0..7)
        .map(|i| json!({"prompt": format!("shot {i}"), "duration": "3"}))
        .collect();
    let locs = rejected(&h, multi(json!(seven))).await;
    assert!(locs.contains(&json!(["input", "multi_prompt"])));
    let six: Vec<Value> = (0..6)
        .map(|i| json!({"prompt": format!("shot {i}"), "duration": "3"}))
        .collect();
    // Six shots of 3 s exceed 15 s in total, so keep five of them for the accepted case.
    assert_eq!(
        rejected(&h, multi(json!(six.clone()))).await,
        [json!(["input", "multi_prompt"])]
    );
    accepted(&h, multi(json!(six[..5]))).await;
}

#[tokio::test]
async fn every_shot_needs_a_prompt_and_a_valid_duration() {
    let h = fast().await;
    let locs = rejected(&h, multi(json!([{"duration": "5"}]))).await;
    assert_eq!(locs, [json!(["input", "multi_prompt", 0, "prompt"])]);
    let locs = rejected(
        &h,
        multi(json!([{"prompt": "a"}, {"prompt": "b", "duration": 4}])),
    )
    .await;
    assert_eq!(locs, [json!(["input", "multi_prompt", 1, "duration"])]);
}

#[tokio::test]
async fn shot_durations_add_up_to_at_most_15() {
    let h = fast().await;
    let locs = rejected(
        &h,
        multi(json!([{"prompt": "a", "duration": "10"}, {"prompt": "b", "duration": "6"}])),
    )
    .await;
    assert_eq!(locs, [json!(["input", "multi_prompt"])]);
    accepted(
        &h,
        multi(json!([{"prompt": "a", "duration": "10"}, {"prompt": "b", "duration": "5"}])),
    )
    .await;
    assert_eq!(h.sim.runs()[0].duration_secs, 15);
}

#[tokio::test]
async fn at_most_two_voice_ids() {
    let h = fast().await;
    let locs = rejected(&h, with(json!({"voice_ids": ["v1", "v2", "v3"]}))).await;
    assert_eq!(locs, [json!(["input", "voice_ids"])]);
    accepted(&h, with(json!({"voice_ids": ["v1", "v2"]}))).await;
}

#[tokio::test]
async fn elements_are_either_a_video_or_an_image_set() {
    let h = fast().await;
    let both =
        json!([{"video_url": "https://e.com/v.mp4", "frontal_image_url": "https://e.com/f.png"}]);
    assert_eq!(
        rejected(&h, with(json!({"elements": both}))).await,
        [json!(["input", "elements", 0])]
    );
    let no_refs = json!([{"frontal_image_url": "https://e.com/f.png"}]);
    let locs = rejected(&h, with(json!({"elements": no_refs}))).await;
    assert_eq!(
        locs,
        [json!(["input", "elements", 0, "reference_image_urls"])]
    );
    let four_refs = json!([{"frontal_image_url": "https://e.com/f.png", "reference_image_urls": ["https://e.com/1.png", "https://e.com/2.png", "https://e.com/3.png", "https://e.com/4.png"]}]);
    let locs = rejected(&h, with(json!({"elements": four_refs}))).await;
    assert_eq!(
        locs,
        [json!(["input", "elements", 0, "reference_image_urls"])]
    );
    let no_frontal = json!([{"reference_image_urls": ["https://e.com/1.png"]}]);
    let locs = rejected(&h, with(json!({"elements": no_frontal}))).await;
    assert_eq!(locs, [json!(["input", "elements", 0, "frontal_image_url"])]);
    let good = json!([
        {"frontal_image_url": "https://e.com/f.png", "reference_image_urls": ["https://e.com/1.png"]},
        {"video_url": "https://e.com/v.mp4"},
    ]);
    accepted(&h, with(json!({"elements": good}))).await;
}

#[tokio::test]
async fn at_most_one_video_element() {
    let h = fast().await;
    let two = json!([{"video_url": "https://e.com/a.mp4"}, {"video_url": "https://e.com/b.mp4"}]);
    assert_eq!(
        rejected(&h, with(json!({"elements": two}))).await,
        [json!(["input", "elements"])]
    );
}

#[tokio::test]
async fn prompt_and_negative_prompt_are_at_most_2500_chars() {
    let h = fast().await;
    let long = "é".repeat(2501);
    assert_eq!(
        rejected(&h, with(json!({"prompt": long}))).await,
        [json!(["input", "prompt"])]
    );
    assert_eq!(
        rejected(&h, with(json!({"negative_prompt": long}))).await,
        [json!(["input", "negative_prompt"])]
    );
    // The limit counts characters, not bytes.
    accepted(&h, with(json!({"prompt": "é".repeat(2500)}))).await;
}

#[tokio::test]
async fn unknown_fields_are_rejected_unless_allowed() {
    let h = fast().await;
    let locs = rejected(&h, with(json!({"image_url": "https://e.com/a.png"}))).await;
    assert_eq!(locs, [json!(["input", "image_url"])]);
    h.sim
        .update_config(&json!({"allow_unknown_fields": true}))
        .unwrap();
    accepted(&h, with(json!({"image_url": "https://e.com/a.png"}))).await;
}

#[tokio::test]
async fn several_problems_are_reported_together() {
    let h = fast().await;
    let locs = rejected(&h, json!({"duration": 5, "cfg_scale": 2})).await;
    assert!(locs.contains(&json!(["input", "start_image_url"])));
    assert!(locs.contains(&json!(["input", "prompt"])));
    assert!(locs.contains(&json!(["input", "duration"])));
    assert!(locs.contains(&json!(["input", "cfg_scale"])));
}

#[tokio::test]
async fn wrapper_fields_are_checked() {
    let h = fast().await;
    let response = h
        .post_create(&json!({"prompt": "flat body on the async API"}))
        .await;
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["errors"][0]["loc"], json!(["input"]));
    let response = h
        .post_create(&json!({"input": base(), "metadata": "not an object"}))
        .await;
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let response = h
        .post_create(&json!({"input": base(), "callback_url": "mailto:x"}))
        .await;
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test]
async fn malformed_json_is_a_bad_request() {
    let h = fast().await;
    for path in [CREATE_PATH, SYNC_PATH] {
        let response = h
            .post(path)
            .header("content-type", "application/json")
            .body("{\"input\": ")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["code"], "BAD_REQUEST");
        assert!(body["errors"].is_null());
    }
}

#[tokio::test]
async fn the_validation_error_code_is_configurable() {
    let h = harness(SimConfig {
        validation_error_code: "INVALID_INPUT".to_owned(),
        ..SimConfig::fast()
    })
    .await;
    let response = h
        .post_create(&json!({"input": with(json!({"duration": "99"}))}))
        .await;
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "INVALID_INPUT");
}

#[tokio::test]
async fn rejected_requests_create_no_run_and_no_charge() {
    let h = fast().await;
    rejected(&h, with(json!({"duration": 5}))).await;
    rejected(&h, with(json!({"prompt": "bad token [[sim:nonsense]]"}))).await;
    assert!(h.sim.runs().is_empty());
    assert!(h.sim.charges().is_empty());
    assert_eq!(h.sim.stats().creates, 2);
}
