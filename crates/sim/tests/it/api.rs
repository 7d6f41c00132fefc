//! The async runs API: run objects, lifecycle, listing, auth, admin endpoints and latency.

use klingq_sim::{OutputShape, SimConfig};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::{CREATE_PATH, Harness, KEY, eventually, fast, harness, input};

#[tokio::test]
async fn create_returns_a_queued_run_with_uuid_v7_and_echoed_fields() {
    let h = harness(SimConfig {
        time_scale: 1.0,
        ..SimConfig::fast()
    })
    .await;
    let run = h
        .create_body(json!({
            "input": input("a lighthouse"),
            "client_ref": "job-1:1",
            "metadata": {"job_id": "job-1"},
            "callback_url": "https://example.com/hook",
        }))
        .await;
    assert_eq!(run["status_code"], "queued");
    let id = uuid::Uuid::parse_str(run["id"].as_str().unwrap()).unwrap();
    assert_eq!(id.get_version_num(), 7);
    assert_eq!(run["client_ref"], "job-1:1");
    assert_eq!(run["metadata"], json!({"job_id": "job-1"}));
    assert_eq!(run["callback_url"], "https://example.com/hook");
    assert_eq!(run["input"]["prompt"], "a lighthouse");
    assert_eq!(run["model"], klingq_sim::DEFAULT_MODEL);
    assert!(run["output"].is_null());
    assert!(run["cost"].is_null());
    assert!(run["failure_code"].is_null());
    assert!(run["created_at"].as_str().unwrap().ends_with('Z'));
}

/// Polls until the run has left `queued` (at least 1 ms of simulated queueing) and returns it.
async fn past_queued(h: &Harness, id: &str) -> Value {
    eventually("the run to leave the queue", || async {
        let run: Value = h.get_run(id).await.json().await.ok()?;
        (run["status_code"] != "queued").then_some(run)
    })
    .await
}

#[tokio::test]
async fn a_run_moves_through_every_phase_to_succeeded_with_cost_and_both_output_shapes() {
    let h = harness(SimConfig {
        time_scale: 1.0,
        queue_max_secs: 0.0,
        dispatch_secs: 1000.0,
        ..SimConfig::fast()
    })
    .await;
    let dispatching = h.create(input("phase one")).await;
    let run = past_queued(&h, &dispatching).await;
    assert_eq!(run["status_code"], "dispatching");

    h.sim.update_config(&json!({"dispatch_secs": 0.0})).unwrap();
    let running = h.create(input("phase two")).await;
    let run = past_queued(&h, &running).await;
    assert_eq!(run["status_code"], "running");
    assert!(run["started_at"].is_string());

    let h = fast().await;
    let id = h
        .create(
            json!({"prompt": "done", "start_image_url": "https://e.com/a.png", "duration": "10"}),
        )
        .await;
    let run = h.wait_terminal(&id).await;
    assert_eq!(run["status_code"], "succeeded");
    assert_eq!(run["cost"], "1.40");
    assert!(run["duration_ms"].as_u64().is_some());
    assert!(run["completed_at"].is_string());
    let outputs = &run["output"]["outputs"];
    assert_eq!(outputs[0]["type"], "video");
    assert_eq!(outputs[0]["content_type"], "video/mp4");
    assert_eq!(outputs[0]["file_size"], 20_000);
    assert_eq!(run["output"]["video"]["url"], outputs[0]["url"]);
    assert_eq!(run["output"]["video"]["file_name"], "out.mp4");
}

#[tokio::test]
async fn output_shape_is_configurable() {
    let h = harness(SimConfig {
        output_shape: OutputShape::Video,
        ..SimConfig::fast()
    })
    .await;
    let run = h.wait_terminal(&h.create(input("video only")).await).await;
    assert!(run["output"]["outputs"].is_null());
    assert!(run["output"]["video"]["url"].is_string());

    h.sim
        .update_config(&json!({"output_shape": "outputs"}))
        .unwrap();
    let run = h
        .wait_terminal(&h.create(input("outputs only")).await)
        .await;
    assert!(run["output"]["video"].is_null());
    assert!(run["output"]["outputs"][0]["url"].is_string());
}

#[tokio::test]
async fn any_multi_segment_model_path_is_accepted() {
    let h = fast().await;
    let response = h
        .post("/v1/models/acme/some/deep/model/runs")
        .json(&json!({"input": input("other model")}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let run: Value = response.json().await.unwrap();
    assert_eq!(run["model"], "acme/some/deep/model");

    let response = h
        .post("/v1/models/acme/model")
        .json(&json!({"input": input("x")}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn unknown_run_ids_are_run_not_found() {
    let h = fast().await;
    for id in ["0190b6c4-5a1e-7c3d-9f00-000000000000", "not-a-uuid"] {
        let response = h.get_run(id).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["code"], "RUN_NOT_FOUND");
    }
}

#[tokio::test]
async fn auth_requires_a_bearer_token() {
    let h = fast().await;
    let body = json!({"input": input("auth")});
    let missing = h
        .http
        .post(h.url(CREATE_PATH))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        missing.json::<Value>().await.unwrap()["code"],
        "UNAUTHORIZED"
    );
    let basic = h
        .http
        .post(h.url(CREATE_PATH))
        .header("authorization", "Basic abc")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(basic.status(), StatusCode::UNAUTHORIZED);
    let empty = h
        .http
        .post(h.url(CREATE_PATH))
        .header("authorization", "Bearer ")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(empty.status(), StatusCode::UNAUTHORIZED);
    let poll = h.http.get(h.url("/v1/runs")).send().await.unwrap();
    assert_eq!(poll.status(), StatusCode::UNAUTHORIZED);
    let any = h
        .http
        .post(h.url(CREATE_PATH))
        .bearer_auth("anything")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(any.status(), StatusCode::CREATED);
    assert_eq!(h.sim.stats().runs_created, 1);
}

#[tokio::test]
async fn a_configured_api_key_must_match_exactly() {
    let h = harness(SimConfig {
        api_key: Some(KEY.to_owned()),
        ..SimConfig::fast()
    })
    .await;
    let body = json!({"input": input("key")});
    let wrong = h
        .http
        .post(h.url(CREATE_PATH))
        .bearer_auth("rf_live_other")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    let right = h.post(CREATE_PATH).json(&body).send().await.unwrap();
    assert_eq!(right.status(), StatusCode::CREATED);
    let config = h.admin("/__sim/config").await;
    assert_eq!(config["api_key"], "<redacted>");
}

#[tokio::test]
async fn health_needs_no_auth_and_balance_reports_cents() {
    let h = harness(SimConfig {
        balance_usd: 12.5,
        ..SimConfig::fast()
    })
    .await;
    let health = h.http.get(h.url("/v1/health")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let balance: Value = h
        .get("/v1/billing/balance")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(balance, json!({"balance_cents": 1250, "currency": "USD"}));
    let me = h.get("/v1/auth/me").send().await.unwrap();
    assert_eq!(me.status(), StatusCode::OK);
    let statuses: Value = h
        .get("/v1/runs/statuses")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(statuses.as_array().unwrap().contains(&json!("succeeded")));
}

async fn list(h: &Harness, query: &[(&str, &str)]) -> Vec<Value> {
    let response = h.get("/v1/runs").query(query).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let page: Value = response.json().await.unwrap();
    page["data"].as_array().unwrap().clone()
}

#[tokio::test]
async fn list_filters_by_client_ref_status_and_created_at() {
    let h = fast().await;
    let first = h
        .create_body(json!({"input": input("one"), "client_ref": "job-a:1"}))
        .await;
    let second = h
        .create_body(json!({"input": input("two [[sim:stuck]]"), "client_ref": "job-b:1"}))
        .await;
    h.wait_terminal(first["id"].as_str().unwrap()).await;

    let by_ref = list(&h, &[("q", "client_ref:\"job-b:1\"")]).await;
    assert_eq!(by_ref.len(), 1);
    assert_eq!(by_ref[0]["id"], second["id"]);

    let succeeded = list(&h, &[("q", "status_code:succeeded")]).await;
    assert_eq!(succeeded.len(), 1);
    assert_eq!(succeeded[0]["id"], first["id"]);

    let combined = list(
        &h,
        &[("q", "client_ref:\"job-a:1\" AND status_code:running")],
    )
    .await;
    assert!(combined.is_empty());

    let created = first["created_at"].as_str().unwrap();
    let after_first = list(&h, &[("q", &format!("created_at>{created}"))]).await;
    assert!(after_first.iter().all(|run| run["id"] != first["id"]));
    assert_eq!(list(&h, &[("q", "created_at>2999-01-01")]).await.len(), 0);

    let newest = list(&h, &[("limit", "1")]).await;
    assert_eq!(newest.len(), 1);
    assert_eq!(newest[0]["id"], second["id"]);
    let oldest = list(&h, &[("limit", "1"), ("sort_by", "created_at:asc")]).await;
    assert_eq!(oldest[0]["id"], first["id"]);

    let bad = h
        .get("/v1/runs")
        .query(&[("q", "colour:blue")])
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    let bad_limit = h
        .get("/v1/runs")
        .query(&[("limit", "0")])
        .send()
        .await
        .unwrap();
    assert_eq!(bad_limit.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(h.sim.stats().lists, 9);
}

#[tokio::test]
async fn latency_scales_with_duration_and_audio() {
    let config = SimConfig {
        median_latency_secs: 100.0,
        latency_sigma: 0.0,
        tail_probability: 0.0,
        queue_max_secs: 0.0,
        ..SimConfig::fast()
    };
    let h = harness(config).await;
    let base = h.create(json!({"prompt": "a", "start_image_url": "https://e.com/a.png", "generate_audio": false})).await;
    let long = h
        .create(json!({"prompt": "b", "start_image_url": "https://e.com/a.png", "generate_audio": false, "duration": "10"}))
        .await;
    let audio = h
        .create(json!({"prompt": "c", "start_image_url": "https://e.com/a.png"}))
        .await;
    let running = |id: &str| h.record(id).unwrap().running_secs;
    assert!((running(&base) - 100.0).abs() < 1e-6);
    assert!((running(&long) - 100.0 * 2f64.powf(0.7)).abs() < 1e-6);
    assert!((running(&audio) - 130.0).abs() < 1e-6);
    // With time_scale 0.001 the simulated minutes pass in milliseconds.
    assert_eq!(h.wait_terminal(&long).await["status_code"], "succeeded");
}

#[tokio::test]
async fn stats_count_each_endpoint_exactly() {
    let h = fast().await;
    let id = h.create(input("counted")).await;
    let run = h.wait_terminal(&id).await;
    let polls = h.sim.stats().polls;
    assert!(polls >= 1);
    h.get("/v1/runs").send().await.unwrap();
    let url = run["output"]["video"]["url"].as_str().unwrap();
    h.http.get(url).send().await.unwrap().bytes().await.unwrap();
    let stats = h.sim.stats();
    assert_eq!(stats.creates, 1);
    assert_eq!(stats.polls, polls);
    assert_eq!(stats.lists, 1);
    assert_eq!(stats.downloads, 1);
    assert_eq!(stats.sync_calls, 0);
    assert_eq!(stats.runs_created, 1);
    let over_http = h.admin("/__sim/stats").await;
    assert_eq!(over_http["creates"], 1);
}

#[tokio::test]
async fn admin_config_accepts_partial_updates_and_rejects_bad_values() {
    let h = fast().await;
    let response = h
        .http
        .post(h.url("/__sim/config"))
        .json(&json!({"fail_429": 1.0}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(h.sim.config().fail_429, 1.0);
    assert_eq!(h.sim.config().time_scale, 0.001);
    let response = h.post_create(&json!({"input": input("limited")})).await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);

    for bad in [
        json!({"fail_429": 1.5}),
        json!({"no_such_knob": 1}),
        json!({"time_scale": "fast"}),
    ] {
        let response = h
            .http
            .post(h.url("/__sim/config"))
            .json(&bad)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{bad}");
    }
    assert_eq!(h.sim.config().fail_429, 1.0);
}

#[tokio::test]
async fn reset_forgets_runs_charges_and_counters() {
    let h = fast().await;
    let id = h.create(input("to forget")).await;
    h.wait_terminal(&id).await;
    assert_eq!(h.sim.charges().len(), 1);
    let response = h.http.post(h.url("/__sim/reset")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(h.sim.charges().is_empty());
    assert!(h.sim.runs().is_empty());
    assert_eq!(h.sim.stats().creates, 0);
    assert_eq!(h.get_run(&id).await.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn admin_runs_lists_runs_with_metadata_and_faults() {
    let h = fast().await;
    let id = h
        .create_body(json!({"input": input("listed [[sim:no-url]]"), "client_ref": "r1", "metadata": {"job_id": "j1"}}))
        .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    h.wait_record_terminal(&id).await;
    let runs = h.admin("/__sim/runs").await;
    let run = &runs[0];
    assert_eq!(run["id"], id);
    assert_eq!(run["client_ref"], "r1");
    assert_eq!(run["metadata"]["job_id"], "j1");
    assert_eq!(run["status"], "succeeded");
    assert_eq!(run["duration_secs"], 5);
    assert_eq!(run["faults"], json!(["no-url"]));
    assert_eq!(run["source"], "api");
}

#[tokio::test]
async fn shutdown_stops_the_server() {
    let h = fast().await;
    let url = h.url("/v1/health");
    h.http.get(&url).send().await.unwrap();
    h.sim.shutdown().await;
    let fresh = reqwest::Client::new();
    assert!(fresh.get(&url).send().await.is_err());
}

#[tokio::test]
async fn the_cli_entry_point_binds_serves_and_stops_on_the_shutdown_future() {
    let args = klingq_sim::SimArgs {
        port: 0,
        ..klingq_sim::SimArgs::default()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(klingq_sim::run(args, async move {
        let _ = stopped.await;
    }));
    stop.send(()).unwrap();
    server
        .await
        .unwrap()
        .expect("run ends cleanly after shutdown");

    let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let busy = klingq_sim::SimArgs {
        port: taken.local_addr().unwrap().port(),
        ..klingq_sim::SimArgs::default()
    };
    let error = klingq_sim::run(busy, async {})
        .await
        .expect_err("a busy port is an error");
    assert!(error.to_string().contains("cannot bind simulator"));
}
