//! Tenants through the HTTP API: policies set by operators (validated, naming the field),
//! the priority cap applied at enqueue, per-tenant usage; a batch's tenant, failure guard,
//! ETA and resume.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::api::Server;

async fn put_json(server: &Server, path: &str, body: &Value) -> (StatusCode, Value) {
    let response = server
        .client
        .put(server.url(path))
        .bearer_auth(crate::api::TOKEN)
        .json(body)
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, response.json().await.unwrap())
}

fn job(prompt: &str) -> Value {
    json!({"start_image_url": "https://example.com/a.png", "prompt": prompt})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_set_tenant_policies_and_jobs_follow_them() {
    let server = Server::start("api-tenants").await;
    let (status, acme) = put_json(
        &server,
        "/v1/tenants/acme",
        &json!({"weight": 3, "max_concurrency": 2, "priority_cap": "normal"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{acme}");
    assert_eq!(acme["source"], "api");
    assert_eq!(acme["policy"]["weight"], 3.0);
    assert_eq!(acme["policy"]["daily_budget_usd"], 0.0);

    // Bad policies and names are refused, naming the field and the rule.
    let (status, body) = put_json(&server, "/v1/tenants/acme", &json!({"weight": 0})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["error"]["details"][0]["path"], "weight");
    assert_eq!(body["error"]["details"][0]["rule"], "range");
    let (status, body) = put_json(&server, "/v1/tenants/acme", &json!({"wieght": 1})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let (status, body) = put_json(&server, "/v1/tenants/a:b", &json!({})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["error"]["details"][0]["rule"], "pattern");

    // A job of acme asking for high priority is enqueued at its cap.
    let mut body = job("capped");
    body["tenant"] = json!("acme");
    body["priority"] = json!("high");
    let (status, accepted) = server.post_json("/v1/jobs", &body).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    let id = accepted["id"].as_str().unwrap();
    let (_, view) = server.get_json(&format!("/v1/jobs/{id}")).await;
    assert_eq!(
        (view["tenant"].as_str(), view["priority"].as_str()),
        (Some("acme"), Some("normal"))
    );
    let mut bad = job("bad tenant");
    bad["tenant"] = json!("no spaces");
    let (status, body) = server.post_json("/v1/jobs", &bad).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["error"]["details"][0]["path"], "tenant");

    // A batch of acme: its jobs carry its tenant; the guard and the ETA show on its view.
    let (status, accepted) = server
        .post_json(
            "/v1/batches",
            &json!({"jobs": [job("b1"), job("b2")], "tenant": "acme", "max_failed": 1,
                    "max_failure_rate": 0.5, "min_finished": 4}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    let batch = accepted["id"].as_str().unwrap();
    let (_, view) = server.get_json(&format!("/v1/batches/{batch}")).await;
    assert_eq!(view["paused"], false);
    assert_eq!(view["eta"]["estimate"], true);
    assert_eq!(
        view["eta"]["remaining_secs"],
        Value::Null,
        "no run measured yet"
    );
    assert!(view["eta"]["remaining_usd"].as_f64().unwrap() > 0.0);
    let (status, resumed) = server
        .post_json(&format!("/v1/batches/{batch}/resume"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (resumed["was_paused"].as_bool(), resumed["resumed"].as_u64()),
        (Some(false), Some(0))
    );
    let (status, _) = server
        .post_json(
            "/v1/batches/01a20b46-0000-7000-8000-000000000000/resume",
            &json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = server
        .post_json(
            "/v1/batches",
            &json!({"jobs": [job("x")], "max_failure_rate": 1.5}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["error"]["details"][0]["path"], "max_failure_rate");

    // Usage: three jobs of acme, none finished; a tenant never seen has zero usage.
    let (status, list) = server.get_json("/v1/tenants").await;
    assert_eq!(status, StatusCode::OK);
    let acme = list["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["tenant"] == "acme")
        .unwrap();
    assert_eq!(acme["counts"]["enqueued"], 3);
    assert_eq!(acme["counts"]["active"], 3);
    assert_eq!(acme["in_flight"], 0);
    let (status, other) = server.get_json("/v1/tenants/nobody").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (
            other["source"].as_str(),
            other["counts"]["enqueued"].as_u64()
        ),
        (Some("default"), Some(0))
    );
    server.producer.queue().delete_namespace().await.unwrap();
    server.stop().await;
}
