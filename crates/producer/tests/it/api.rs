//! The HTTP API over real HTTP against a running server and a real Redis: every route, auth,
//! validation errors per rule, idempotent retries, pagination, SSE resume, body limits.

use std::time::Duration;

use futures::StreamExt;
use klingq_core::JobState;
use klingq_producer::{ApiConfig, ApiState, Producer, ServeError};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::sync::oneshot;

use crate::{TestWorker, enqueue_poison, generating_spec, producer, wait_state};

pub(crate) const TOKEN: &str = "test-token-1";
const JOB_BODY_LIMIT: usize = 64 * 1024;

pub(crate) struct Server {
    pub(crate) base: String,
    pub(crate) client: reqwest::Client,
    pub(crate) producer: Producer,
    stop: Option<oneshot::Sender<()>>,
    join: tokio::task::JoinHandle<Result<(), ServeError>>,
}

impl Server {
    pub(crate) async fn start(prefix: &str) -> Self {
        let producer = producer(prefix).await;
        let config = ApiConfig {
            tokens: vec!["other-token".into(), TOKEN.into()],
            max_job_body_bytes: JOB_BODY_LIMIT,
            ..ApiConfig::default()
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let state = ApiState::new(producer.clone(), config);
        let (stop, stopped) = oneshot::channel::<()>();
        let join = tokio::spawn(klingq_producer::serve(listener, state, async move {
            let _ = stopped.await;
        }));
        Self {
            base,
            client: reqwest::Client::new(),
            producer,
            stop: Some(stop),
            join,
        }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub(crate) fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.get(self.url(path)).bearer_auth(TOKEN)
    }

    pub(crate) fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.post(self.url(path)).bearer_auth(TOKEN)
    }

    pub(crate) async fn post_json(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        let response = self.post(path).json(body).send().await.unwrap();
        let status = response.status();
        (status, response.json().await.unwrap())
    }

    pub(crate) async fn get_json(&self, path: &str) -> (StatusCode, Value) {
        let response = self.get(path).send().await.unwrap();
        let status = response.status();
        (status, response.json().await.unwrap())
    }

    pub(crate) async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), self.join)
            .await
            .expect("the server stops within 10 s")
            .unwrap()
            .unwrap();
    }
}

fn job(n: usize) -> Value {
    json!({"start_image_url": format!("https://example.com/{n}.png"), "prompt": format!("prompt {n}"), "metadata": {"n": n}})
}

/// The `(path, rule)` pairs of an error body.
fn rules(body: &Value) -> Vec<(String, String)> {
    body["error"]["details"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["path"].as_str().unwrap().to_owned(),
                d["rule"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_open_and_every_other_route_needs_a_token() {
    let server = Server::start("api-auth").await;
    let client = &server.client;
    for path in [
        "/healthz",
        "/readyz",
        "/openapi.json",
        "/",
        "/dashboard/app.js",
        "/dashboard/style.css",
    ] {
        let response = client.get(server.url(path)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
    }
    let document: Value = client
        .get(server.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(document["openapi"], "3.1.0");
    assert!(document["components"]["securitySchemes"]["bearer"].is_object());
    assert_eq!(
        document["paths"]["/v1/jobs"]["post"]["responses"]["202"]["links"]["GetJob"]["operationId"],
        "get_job"
    );
    let id = "01a20b46-0000-7000-8000-000000000000";
    let routes = [
        ("POST", "/v1/jobs".to_owned()),
        ("POST", "/v1/batches".to_owned()),
        ("GET", format!("/v1/jobs/{id}")),
        ("POST", format!("/v1/jobs/{id}/cancel")),
        ("GET", format!("/v1/jobs/{id}/video")),
        ("GET", format!("/v1/batches/{id}")),
        ("GET", format!("/v1/batches/{id}/jobs")),
        ("POST", format!("/v1/batches/{id}/cancel")),
        ("POST", format!("/v1/batches/{id}/resume")),
        ("GET", "/v1/dead-letters".to_owned()),
        ("POST", "/v1/dead-letters/redrive".to_owned()),
        ("GET", "/v1/events".to_owned()),
        ("GET", "/v1/jobs".to_owned()),
        ("GET", "/v1/batches".to_owned()),
        ("GET", "/v1/stats".to_owned()),
        ("GET", "/v1/stats/history".to_owned()),
        ("GET", "/v1/tenants".to_owned()),
        ("GET", "/v1/tenants/acme".to_owned()),
        ("PUT", "/v1/tenants/acme".to_owned()),
        ("GET", "/v1/webhooks/deliveries".to_owned()),
        ("GET", format!("/v1/webhooks/deliveries/{id}")),
        ("POST", format!("/v1/webhooks/deliveries/{id}/replay")),
        ("GET", "/v1/webhooks/endpoints".to_owned()),
        (
            "POST",
            "/v1/webhooks/endpoints/ep_0123456789abcdef/enable".to_owned(),
        ),
    ];
    for (method, path) in &routes {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        for auth in [
            None,
            Some("Bearer wrong"),
            Some("Basic dGVzdA=="),
            Some(TOKEN),
        ] {
            let mut request = client.request(method.clone(), server.url(path));
            if let Some(auth) = auth {
                request = request.header("authorization", auth);
            }
            let response = request.send().await.unwrap();
            assert_eq!(
                response.status(),
                StatusCode::UNAUTHORIZED,
                "{method} {path} {auth:?}"
            );
            assert!(response.headers().contains_key("www-authenticate"));
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["error"]["code"], "unauthorized");
        }
    }
    // Both configured tokens work; the scheme is case-insensitive.
    for auth in ["Bearer other-token", "bearer test-token-1"] {
        let response = client
            .get(server.url("/v1/dead-letters"))
            .header("authorization", auth)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{auth}");
    }
    let response = server.get("/v1/nothing-here").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let response = server
        .client
        .delete(server.url("/v1/jobs"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(response.headers()["allow"], "POST,GET,HEAD");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_are_created_read_and_cancelled() {
    let server = Server::start("api-jobs").await;
    let response = server.post("/v1/jobs").json(&job(1)).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let accepted: Value = response.json().await.unwrap();
    let id = accepted["id"].as_str().unwrap().to_owned();
    assert_eq!(location, format!("/v1/jobs/{id}"));
    assert_eq!(accepted["created"], true);
    assert_eq!(accepted["estimated_usd"], 0.7);

    let (status, view) = server.get_json(&location).await;
    assert_eq!(status, StatusCode::OK);
    for key in [
        "id",
        "state",
        "batch_id",
        "attempts",
        "created_at",
        "updated_at",
        "metadata",
        "provider",
        "video",
        "error",
    ] {
        assert!(view.get(key).is_some(), "{key} missing in {view}");
    }
    assert_eq!(view["state"], "queued");
    assert_eq!(view["metadata"], json!({"n": 1}));
    assert_eq!(view["provider"], Value::Null);

    // The nested shape is accepted too.
    let nested = json!({"request": {"start_image_url": "https://e.com/a.png", "prompt": "p"}, "priority": "high"});
    let (status, _) = server.post_json("/v1/jobs", &nested).await;
    assert_eq!(status, StatusCode::ACCEPTED);

    let (status, cancelled) = server
        .post_json(&format!("{location}/cancel"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(cancelled["cancelled"], true);
    assert_eq!(cancelled["previous_state"], "queued");
    assert_eq!(cancelled["cost_committed"], false);
    let (_, again) = server
        .post_json(&format!("{location}/cancel"), &json!({}))
        .await;
    assert_eq!(again["cancelled"], false);
    assert_eq!(again["state"], "cancelled");
    let (_, view) = server.get_json(&location).await;
    assert_eq!(view["error"]["code"], "CANCELLED");

    // A generating job: cancelled, no longer tracked, cost committed.
    let generating = server.producer.enqueue(generating_spec()).await.unwrap().id;
    let worker = TestWorker::spawn(server.producer.queue());
    wait_state(&server.producer, &generating, JobState::Generating).await;
    let (_, view) = server.get_json(&format!("/v1/jobs/{generating}")).await;
    assert_eq!(view["provider"]["run_id"], "run-test-1");
    let (_, cancelled) = server
        .post_json(&format!("/v1/jobs/{generating}/cancel"), &json!({}))
        .await;
    assert_eq!(cancelled["previous_state"], "generating");
    assert_eq!(cancelled["cost_committed"], true);
    worker.stop().await;

    for path in [
        "/v1/jobs/01a20b46-0000-7000-8000-000000000000",
        "/v1/jobs/not-a-uuid",
        "/v1/jobs/01a20b46-0000-7000-8000-000000000000/cancel",
    ] {
        let response = if path.ends_with("cancel") {
            server.post(path).send().await.unwrap()
        } else {
            server.get(path).send().await.unwrap()
        };
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "not_found");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validation_errors_list_every_rule_with_its_path() {
    let server = Server::start("api-rules").await;
    let url = "https://e.com/a.png";
    let cases = [
        (
            json!({"prompt": "p"}),
            vec![("start_image_url", "required")],
        ),
        (
            json!({"start_image_url": url, "prompt": 7, "generate_audio": "yes"}),
            vec![("prompt", "type"), ("generate_audio", "type")],
        ),
        (
            json!({"start_image_url": url, "prompt": "p", "colour": "blue"}),
            vec![("colour", "unknown_field")],
        ),
        (
            json!({"start_image_url": url, "prompt": "p", "multi_prompt": [{"prompt": "a"}], "shot_type": "customize"}),
            vec![("prompt", "exclusive")],
        ),
        (
            json!({"start_image_url": url, "prompt": "p", "duration": "16", "priority": "urgent"}),
            vec![("duration", "one_of"), ("priority", "one_of")],
        ),
        (
            json!({"start_image_url": url, "prompt": "p", "cfg_scale": 1.5}),
            vec![("cfg_scale", "range")],
        ),
        (
            json!({"start_image_url": url, "prompt": "x".repeat(2501)}),
            vec![("prompt", "max_length")],
        ),
        (
            json!({"start_image_url": url, "shot_type": "customize", "multi_prompt": []}),
            vec![("multi_prompt", "min_items")],
        ),
        (
            json!({"start_image_url": url, "prompt": "p", "voice_ids": ["a", "b", "c"]}),
            vec![("voice_ids", "max_items")],
        ),
        (
            json!({"start_image_url": "file:///etc/passwd", "prompt": "p", "webhook_url": "ftp://x"}),
            vec![("start_image_url", "url"), ("webhook_url", "url")],
        ),
        (
            json!({"start_image_url": url, "shot_type": "customize",
                "multi_prompt": [{"prompt": "a", "duration": "10"}, {"prompt": "b", "duration": "10"}]}),
            vec![("multi_prompt", "sum")],
        ),
        (
            json!({"start_image_url": url, "prompt": "p", "elements": [{}]}),
            vec![("elements[0]", "element_kind")],
        ),
        (
            json!({"start_image_url": url, "prompt": "p", "not_before": "tomorrow"}),
            vec![("not_before", "format")],
        ),
        (
            json!({"request": {"start_image_url": url, "prompt": ""}, "metadata": [1]}),
            vec![("request.prompt", "required"), ("metadata", "type")],
        ),
        // URLs the HTTP client cannot send to, or longer than their limit.
        (
            json!({"start_image_url": url, "prompt": "p",
                "webhook_url": "https://x\"onmouseover=alert(1)//e.com/"}),
            vec![("webhook_url", "url")],
        ),
        (
            json!({"start_image_url": url, "prompt": "p",
                "webhook_url": format!("https://hooks.e.com/{}", "a".repeat(60_000))}),
            vec![("webhook_url", "max_length")],
        ),
        (
            json!({"start_image_url": "https://x`y.com/a.png", "prompt": "p",
                "end_image_url": format!("https://e.com/{}", "a".repeat(9000))}),
            vec![("start_image_url", "url"), ("end_image_url", "max_length")],
        ),
        // Control characters in text, but newline and tab.
        (
            json!({"start_image_url": url, "prompt": "a\u{0}b", "negative_prompt": "x\ny\tz"}),
            vec![("prompt", "control_char")],
        ),
        (
            json!({"start_image_url": url, "prompt": "p", "metadata": {"note": "nul\u{0}"},
                "idempotency_key": "k\u{7}"}),
            vec![
                ("metadata.note", "control_char"),
                ("idempotency_key", "control_char"),
            ],
        ),
    ];
    for (body, expected) in cases {
        let (status, error) = server.post_json("/v1/jobs", &body).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(error["error"]["code"], "validation_failed");
        let expected: Vec<_> = expected
            .into_iter()
            .map(|(p, r)| (p.to_owned(), r.to_owned()))
            .collect();
        assert_eq!(rules(&error), expected, "{body}");
        for detail in error["error"]["details"].as_array().unwrap() {
            assert!(!detail["message"].as_str().unwrap().is_empty());
        }
    }
    // One job lists its first 100 errors and counts the rest.
    let mut many = job(1);
    for n in 0..300 {
        many[format!("extra{n}")] = json!(n);
    }
    let (status, error) = server.post_json("/v1/jobs", &many).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(error["error"]["message"], "300 validation errors");
    assert_eq!(error["error"]["details"].as_array().unwrap().len(), 100);
    assert_eq!(error["error"]["truncated"], true);
    assert_eq!(error["error"]["total_details"], 300);
    // The header's key must agree with the body's.
    let mut keyed = job(1);
    keyed["idempotency_key"] = json!("a");
    let response = server
        .post("/v1/jobs")
        .header("idempotency-key", "b")
        .json(&keyed)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        server
            .producer
            .queue()
            .job_ids(0, 10)
            .await
            .unwrap()
            .is_empty()
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_posts_with_an_idempotency_key_return_the_same_id() {
    let server = Server::start("api-idem").await;
    let send_job = |key: &'static str, n: usize| {
        server
            .post("/v1/jobs")
            .header("idempotency-key", key)
            .json(&job(n))
            .send()
    };
    let first: Value = send_job("order-1", 1).await.unwrap().json().await.unwrap();
    let retry = send_job("order-1", 2).await.unwrap();
    assert_eq!(retry.status(), StatusCode::ACCEPTED);
    let retry: Value = retry.json().await.unwrap();
    assert_eq!(first["id"], retry["id"]);
    assert_eq!(
        (first["created"].clone(), retry["created"].clone()),
        (json!(true), json!(false))
    );
    let other: Value = send_job("order-2", 1).await.unwrap().json().await.unwrap();
    assert_ne!(first["id"], other["id"]);

    let batch = json!([job(1), job(2)]);
    let send_batch = || {
        server
            .post("/v1/batches")
            .header("idempotency-key", "upload-1")
            .json(&batch)
            .send()
    };
    let first: Value = send_batch().await.unwrap().json().await.unwrap();
    let retry = send_batch().await.unwrap();
    assert_eq!(retry.status(), StatusCode::ACCEPTED);
    let retry: Value = retry.json().await.unwrap();
    assert_eq!(first["id"], retry["id"]);
    assert_eq!(retry["created"], false);
    assert_eq!(retry["total"], 2);
    assert_eq!(
        server
            .producer
            .queue()
            .batch_ids(0, 10)
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        server.producer.queue().job_ids(0, 10).await.unwrap().len(),
        4
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traceparent_header_starts_the_job_s_trace_and_each_batch_job_has_its_own() {
    let server = Server::start("api-trace").await;
    let caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let post_job = |traceparent: Option<&'static str>, n: usize| {
        let mut request = server.post("/v1/jobs").json(&job(n));
        if let Some(value) = traceparent {
            request = request.header("traceparent", value);
        }
        request.send()
    };
    let trace_of = |id: Value| {
        let server = &server;
        async move {
            let (status, view) = server
                .get_json(&format!("/v1/jobs/{}", id.as_str().unwrap()))
                .await;
            assert_eq!(status, StatusCode::OK);
            view["trace_id"].as_str().unwrap().to_owned()
        }
    };
    let is_trace_id = |id: &str| {
        id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) && id != "0".repeat(32)
    };

    // The caller's trace continues into the job.
    let traced: Value = post_job(Some(caller), 1)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        trace_of(traced["id"].clone()).await,
        "4bf92f3577b34da6a3ce929d0e0e4736"
    );
    // An operator finds the job from a trace id seen in a tracing backend.
    let (_, found) = server.get_json("/v1/jobs?q=4bf92f3577b3").await;
    let found: Vec<&Value> = found["items"].as_array().unwrap().iter().collect();
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0]["id"], traced["id"]);
    // No header, or an invalid one (ignored, as Trace Context says): a trace of its own.
    let mut own = Vec::new();
    for header in [None, Some("00-zz-not-a-trace-01")] {
        let response = post_job(header, 2).await.unwrap();
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        let body: Value = response.json().await.unwrap();
        let trace_id = trace_of(body["id"].clone()).await;
        assert!(is_trace_id(&trace_id), "{trace_id}");
        assert_ne!(trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        own.push(trace_id);
    }
    assert_ne!(own[0], own[1]);

    // A batch: every job is a trace of its own, whatever the request's trace.
    let response = server
        .post("/v1/batches")
        .header("traceparent", caller)
        .json(&json!([job(1), job(2), job(3)]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let batch: Value = response.json().await.unwrap();
    let (_, page) = server
        .get_json(&format!(
            "/v1/batches/{}/jobs",
            batch["id"].as_str().unwrap()
        ))
        .await;
    let traces: std::collections::HashSet<String> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|view| view["trace_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(traces.len(), 3, "{page}");
    assert!(
        traces
            .iter()
            .all(|t| is_trace_id(t) && !t.starts_with("4bf92f35"))
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_in_every_form_with_pagination_and_cancel() {
    let server = Server::start("api-batches").await;
    // A JSON array.
    let jobs: Vec<Value> = (0..5).map(job).collect();
    let response = server.post("/v1/batches").json(&jobs).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let accepted: Value = response.json().await.unwrap();
    let id = accepted["id"].as_str().unwrap().to_owned();
    assert_eq!(location, format!("/v1/batches/{id}"));
    assert_eq!(accepted["total"], 5);
    assert_eq!(accepted["estimated_usd"], 3.5);

    let (status, batch) = server.get_json(&location).await;
    assert_eq!(status, StatusCode::OK);
    for key in [
        "id",
        "total",
        "counts",
        "done",
        "estimated_usd",
        "charged_usd",
    ] {
        assert!(batch.get(key).is_some(), "{key} missing in {batch}");
    }
    assert_eq!(batch["counts"]["queued"], 5);
    assert_eq!(batch["done"], false);

    // Pages of 2: 2, 2, 1, each job once, in order.
    let mut seen = Vec::new();
    let mut offset = Some(0);
    while let Some(at) = offset {
        let (status, page) = server
            .get_json(&format!("{location}/jobs?limit=2&offset={at}"))
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(page["total"], 5);
        for item in page["items"].as_array().unwrap() {
            seen.push(item["metadata"]["n"].as_u64().unwrap());
            assert_eq!(item["batch_id"], json!(id));
        }
        offset = page["next_offset"].as_u64();
    }
    assert_eq!(seen, vec![0, 1, 2, 3, 4]);
    for bad in [
        "limit=0",
        "limit=1001",
        "offset=-1",
        "limit=abc",
        "colour=red",
    ] {
        let response = server
            .get(&format!("{location}/jobs?{bad}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY, "{bad}");
    }
    let response = server
        .get("/v1/batches/01a20b46-0000-7000-8000-000000000000/jobs")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);

    // The object form with options.
    let (status, accepted) = server
        .post_json(
            "/v1/batches",
            &json!({"jobs": [job(1)], "webhook_url": "https://hooks.example.com/b", "budget_usd": 5}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    assert_eq!(accepted["budget_usd"], 5.0);
    let (_, batch) = server
        .get_json(&format!("/v1/batches/{}", accepted["id"].as_str().unwrap()))
        .await;
    assert_eq!(batch["webhook_url"], "https://hooks.example.com/b");
    assert_eq!(batch["budget_usd"], 5.0);

    // JSON Lines with options in the query string.
    let lines = format!("{}\n\n{}\n", job(1), job(2));
    let response = server
        .post("/v1/batches?budget_usd=2.5&webhook_url=https://hooks.example.com/c")
        .header("content-type", "application/x-ndjson")
        .body(lines)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let accepted: Value = response.json().await.unwrap();
    assert_eq!(accepted["total"], 2);
    assert_eq!(accepted["budget_usd"], 2.5);

    // Options given twice are an error.
    let response = server
        .post("/v1/batches?budget_usd=2")
        .json(&json!({"jobs": [job(1)], "budget_usd": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);

    // Cancelling the first batch cancels its unfinished jobs.
    let (status, result) = server
        .post_json(&format!("{location}/cancel"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(result["cancelled"], 5);
    let (_, batch) = server.get_json(&location).await;
    assert_eq!(batch["done"], true);
    assert_eq!(batch["counts"]["cancelled"], 5);
    assert!(batch["finished_at"].is_string());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_batches_are_rejected_whole_unless_partial() {
    let server = Server::start("api-invalid").await;
    let jobs =
        json!([job(0), {"start_image_url": "https://e.com/a.png", "prompt": ""}, job(2), "nope"]);
    let (status, error) = server.post_json("/v1/batches", &jobs).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let details = error["error"]["details"].as_array().unwrap();
    let found: Vec<_> = details
        .iter()
        .map(|d| {
            (
                d["index"].as_u64().unwrap(),
                d["path"].as_str().unwrap(),
                d["rule"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(found, vec![(1, "prompt", "required"), (3, "", "type")]);
    assert!(
        server
            .producer
            .queue()
            .job_ids(0, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        server
            .producer
            .queue()
            .batch_ids(0, 10)
            .await
            .unwrap()
            .is_empty()
    );

    // JSON Lines errors also name the line.
    let lines = format!("{}\n\n{{oops\n{}\n", job(0), job(1));
    let response = server
        .post("/v1/batches")
        .header("content-type", "application/x-ndjson")
        .body(lines.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let error: Value = response.json().await.unwrap();
    let detail = &error["error"]["details"][0];
    assert_eq!(
        (
            detail["index"].clone(),
            detail["line"].clone(),
            detail["rule"].clone()
        ),
        (json!(1), json!(3), json!("json"))
    );
    assert!(
        server
            .producer
            .queue()
            .job_ids(0, 10)
            .await
            .unwrap()
            .is_empty()
    );

    // With partial, the valid ones go in and the rest are reported.
    let response = server
        .post("/v1/batches?partial=true")
        .header("content-type", "application/x-ndjson")
        .body(lines)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let accepted: Value = response.json().await.unwrap();
    assert_eq!(accepted["total"], 2);
    assert_eq!(accepted["rejected"][0]["line"], 3);
    let (status, accepted) = server
        .post_json("/v1/batches", &json!({"jobs": jobs, "partial": true}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(accepted["total"], 2);
    assert_eq!(accepted["rejected"].as_array().unwrap().len(), 2);

    for (body, rule) in [
        (json!([]), "min_items"),
        (json!({}), "required"),
        (json!({"jobs": [job(0)], "extra": 1}), "unknown_field"),
        (json!({"jobs": "x"}), "type"),
        (json!(7), "type"),
        (json!({"jobs": [job(0)], "budget_usd": -1}), "range"),
    ] {
        let (status, error) = server.post_json("/v1/batches", &body).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(rules(&error)[0].1, rule, "{body}: {error}");
    }
    server.stop().await;
}

/// Posts `body` to `/v1/batches` and returns the status, the answer's size in bytes and the
/// answer.
async fn post_batch(
    server: &Server,
    content_type: &str,
    body: String,
) -> (StatusCode, usize, Value) {
    let response = server
        .post("/v1/batches")
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status();
    let bytes = response.bytes().await.unwrap();
    (status, bytes.len(), serde_json::from_slice(&bytes).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_invalid_batches_get_small_answers_naming_the_limit() {
    let server = Server::start("api-huge").await;
    let limit = klingq_producer::ApiConfig::default().max_batch_jobs;
    assert_eq!(limit, 200_000);
    let array = |n: usize| format!("[{}]", vec!["{}"; n].join(","));
    let lines = |n: usize| "{}\n".repeat(n);

    // 1,000,000 empty objects (3 MB, within the 64 MB body limit): refused for its size,
    // before any entry is validated; the answer names the limit and the count.
    for (content_type, body) in [
        ("application/json", array(1_000_000)),
        ("application/x-ndjson", lines(1_000_000)),
    ] {
        let body_bytes = body.len();
        let (status, size, answer) = post_batch(&server, content_type, body).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{content_type}");
        assert!(
            size < 1024,
            "{content_type}: {size} bytes for a {body_bytes}-byte body"
        );
        let error = &answer["error"];
        assert_eq!(error["details"].as_array().unwrap().len(), 1, "{answer}");
        assert_eq!(
            rules(&answer),
            vec![(String::new(), "max_items".to_owned())]
        );
        let message = error["details"][0]["message"].as_str().unwrap();
        assert_eq!(message, "a batch may have at most 200000 jobs, got 1000000");
        assert_eq!(error["truncated"], false);
        assert_eq!(error["total_details"], 1);
    }

    // 200,000 empty objects, within the limit: two errors each, the first 1,000 listed.
    for (content_type, body) in [
        ("application/json", array(limit)),
        ("application/x-ndjson", lines(limit)),
    ] {
        let (status, size, answer) = post_batch(&server, content_type, body).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{content_type}");
        assert!(size < 256 * 1024, "{content_type}: {size} bytes");
        let error = &answer["error"];
        assert_eq!(
            error["message"],
            "200000 of 200000 entries are invalid; nothing was enqueued"
        );
        let details = error["details"].as_array().unwrap();
        assert_eq!(details.len(), 1000);
        assert_eq!(error["truncated"], true);
        assert_eq!(error["total_details"], 400_000);
        let last = &details[999];
        assert_eq!(
            (last["index"].clone(), last["path"].clone()),
            (json!(499), json!("start_image_url"))
        );
        if content_type == "application/x-ndjson" {
            assert_eq!(last["line"], 500);
        }
    }

    // A partial batch lists the first 1,000 errors of the entries it leaves out.
    let mut entries = vec!["{}".to_owned(); 1500];
    entries.push(job(1).to_string());
    let (status, _, accepted) = post_batch(
        &server,
        "application/json",
        json!({"jobs": entries.iter().map(|e| serde_json::from_str::<Value>(e).unwrap()).collect::<Vec<_>>(), "partial": true}).to_string(),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    assert_eq!(accepted["total"], 1);
    assert_eq!(accepted["rejected"].as_array().unwrap().len(), 1000);
    assert_eq!(accepted["rejected_entries"], 1500);
    assert_eq!(accepted["rejected_truncated"], true);

    // Errors of the object form itself are capped too, and its options are checked without
    // being read in full.
    let mut object = serde_json::Map::new();
    for n in 0..5000 {
        object.insert(format!("extra{n}"), json!(0));
    }
    object.insert("jobs".to_owned(), json!([job(1)]));
    let (status, size, answer) = post_batch(
        &server,
        "application/json",
        Value::Object(object).to_string(),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(size < 256 * 1024, "{size} bytes");
    assert_eq!(answer["error"]["details"].as_array().unwrap().len(), 1000);
    assert_eq!(answer["error"]["total_details"], 5000);
    let huge_hook = json!({"jobs": [job(1)], "webhook_url": format!("https://hooks.e.com/{}", "a".repeat(900 * 1024))});
    let (status, size, answer) =
        post_batch(&server, "application/json", huge_hook.to_string()).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(size < 1024, "{size} bytes");
    assert_eq!(
        rules(&answer),
        vec![("webhook_url".to_owned(), "max_length".to_owned())]
    );
    // An entry larger than one job's body limit is an entry error, not parsed.
    let mut big = job(2);
    big["metadata"] = json!({"blob": "x".repeat(JOB_BODY_LIMIT)});
    let (status, _, answer) = post_batch(
        &server,
        "application/json",
        json!([job(1), big]).to_string(),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        rules(&answer),
        vec![(String::new(), "max_length".to_owned())]
    );
    assert_eq!(answer["error"]["details"][0]["index"], 1);

    assert!(
        server
            .producer
            .queue()
            .batch_ids(0, 10)
            .await
            .unwrap()
            .len()
            == 1
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_fields_bad_bodies_and_large_bodies_are_refused() {
    let server = Server::start("api-bodies").await;
    let (status, error) = server
        .post_json(
            "/v1/dead-letters/redrive",
            &json!({"ids": [], "everything": true}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        rules(&error),
        vec![("everything".to_owned(), "unknown_field".to_owned())]
    );
    for (path, content_type) in [
        ("/v1/jobs", "text/plain"),
        ("/v1/batches", "text/csv"),
        ("/v1/dead-letters/redrive", "text/plain"),
    ] {
        let response = server
            .post(path)
            .header("content-type", content_type)
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.status(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "{path}"
        );
        let response = server
            .post(path)
            .header("content-type", "application/json")
            .body("{not json")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{path}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_json");
    }
    let mut big = job(1);
    big["prompt"] = json!("x".repeat(JOB_BODY_LIMIT + 1));
    let response = server.post("/v1/jobs").json(&big).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "payload_too_large");
    // The batch route has its own, larger limit.
    let response = server
        .post("/v1/batches")
        .json(&json!([big]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        server
            .producer
            .queue()
            .job_ids(0, 10)
            .await
            .unwrap()
            .is_empty()
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_and_redriven() {
    let server = Server::start("api-dlq").await;
    let poison = enqueue_poison(&server.producer).await;
    let worker = TestWorker::spawn(server.producer.queue());
    wait_state(&server.producer, &poison, JobState::Dead).await;
    worker.stop().await;
    let (status, page) = server.get_json("/v1/dead-letters?limit=10").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page["total"], 1);
    assert_eq!(page["items"][0]["id"], json!(poison));
    assert_eq!(page["items"][0]["error"]["code"], "UNDECODABLE_PAYLOAD");
    assert_eq!(page["next_offset"], Value::Null);
    let (status, result) = server
        .post_json(
            "/v1/dead-letters/redrive",
            &json!({"ids": [poison, "01a20b46-0000-7000-8000-000000000000"]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(result["redriven"], 1);
    assert_eq!(result["not_found"].as_array().unwrap().len(), 1);
    let (_, page) = server.get_json("/v1/dead-letters").await;
    assert_eq!(page["total"], 0);
    let (status, result) = server
        .post_json("/v1/dead-letters/redrive", &json!({"all": true}))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(result["redriven"], 0);
    for body in [
        json!({}),
        json!({"all": false}),
        json!({"ids": []}),
        json!({"ids": ["a"], "all": true}),
        json!([1]),
    ] {
        let (status, _) = server.post_json("/v1/dead-letters/redrive", &body).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    }
    server.stop().await;
}

/// Reads SSE frames until `count` events arrived; returns `(id, event, data)` of each.
async fn read_events(response: reqwest::Response, count: usize) -> Vec<(String, String, Value)> {
    let mut stream = response.bytes_stream();
    let mut buffer = String::new();
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while events.len() < count {
        let chunk = tokio::time::timeout_at(deadline, stream.next())
            .await
            .expect("events arrive in time")
            .expect("the stream stays open")
            .unwrap();
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find("\n\n") {
            let frame: String = buffer.drain(..end + 2).collect();
            let (mut id, mut event, mut data) = (String::new(), String::new(), String::new());
            for line in frame.lines() {
                if let Some(value) = line
                    .strip_prefix("id: ")
                    .or_else(|| line.strip_prefix("id:"))
                {
                    id = value.to_owned();
                } else if let Some(value) = line
                    .strip_prefix("event: ")
                    .or_else(|| line.strip_prefix("event:"))
                {
                    event = value.to_owned();
                } else if let Some(value) = line
                    .strip_prefix("data: ")
                    .or_else(|| line.strip_prefix("data:"))
                {
                    data.push_str(value);
                }
            }
            if !id.is_empty() {
                events.push((id, event, serde_json::from_str(&data).unwrap()));
            }
        }
    }
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_stream_as_sse_and_resume_after_last_event_id() {
    let server = Server::start("api-events").await;
    // Completion events come from cancelling jobs.
    let mut ids = Vec::new();
    for n in 0..3 {
        let (_, accepted) = server.post_json("/v1/jobs", &job(n)).await;
        let id = accepted["id"].as_str().unwrap().to_owned();
        server
            .post_json(&format!("/v1/jobs/{id}/cancel"), &json!({}))
            .await;
        ids.push(id);
    }
    let response = server.get("/v1/events?from=0").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let events = read_events(response, 3).await;
    let seen: Vec<_> = events
        .iter()
        .map(|(_, _, data)| data["data"]["job_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(seen, ids);
    assert!(
        events
            .iter()
            .all(|(_, event, data)| event == "job.cancelled" && data["type"] == "job.cancelled")
    );

    // Resuming after the first event gives the second and third, then new ones.
    let response = server
        .get("/v1/events")
        .header("last-event-id", &events[0].0)
        .send()
        .await
        .unwrap();
    let resumed = read_events(response, 2).await;
    assert_eq!(resumed, events[1..].to_vec());

    // Without a cursor, only events after the connection come.
    let response = server.get("/v1/events").send().await.unwrap();
    let (_, accepted) = server.post_json("/v1/jobs", &job(9)).await;
    let late = accepted["id"].as_str().unwrap().to_owned();
    server
        .post_json(&format!("/v1/jobs/{late}/cancel"), &json!({}))
        .await;
    let fresh = read_events(response, 1).await;
    assert_eq!(fresh[0].2["data"]["job_id"], json!(late));

    for bad in ["nope", "1-x", "99999999999999999999-0"] {
        let response = server
            .get("/v1/events")
            .header("last-event-id", bad)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY, "{bad}");
    }
    let response = server.get("/v1/events?from=$").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);

    // A stream still open does not hold up shutdown.
    let open = server.get("/v1/events?from=0").send().await.unwrap();
    server.stop().await;
    drop(open);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tokens_the_server_only_listens_on_loopback() {
    let producer = producer("api-open").await;
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let state = ApiState::new(producer.clone(), ApiConfig::default());
    let error = klingq_producer::serve(listener, state, async {})
        .await
        .unwrap_err();
    assert!(matches!(error, ServeError::NoTokens(_)), "{error}");
    assert!(error.to_string().contains("KLINGQ_API_TOKENS"));

    // On loopback it serves, without authentication.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    let state = ApiState::new(producer, ApiConfig::default());
    let join = tokio::spawn(klingq_producer::serve(listener, state, async move {
        let _ = stopped.await;
    }));
    let response = reqwest::get(format!("{base}/v1/dead-letters"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let _ = stop.send(());
    join.await.unwrap().unwrap();
}
