//! Runflow's signed run callbacks (`POST /v1/provider/callbacks/runflow`) over real HTTP
//! against a running server and a real Redis: signatures (and rotation), body limit, parsing,
//! the queue's outcomes, the exemption from bearer tokens, the metric and the OpenAPI entry.
//! Signatures are computed here independently, with hmac and sha2.

use std::time::Duration;

use hmac::{Hmac, Mac};
use klingq_core::{CostModel, JobState};
use klingq_producer::{ApiConfig, ApiState, CALLBACK_OUTCOMES, Producer, ServeError};
use klingq_testkit::redis::{RedisServer, unique_namespace};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sha2::Sha256;
use tokio::sync::oneshot;

use crate::{producer, spec};

const PATH: &str = klingq_producer::CALLBACK_PATH;
const TOKEN: &str = "callback-test-token";
const OLD_SECRET: &str = "whsec_b2xkIHNlY3JldCBvZiB0aGUgdGVzdHM";
const NEW_SECRET: &str = "whsec_bmV3IHNlY3JldCBvZiB0aGUgdGVzdHM";
const MIB: usize = 1024 * 1024;

/// Lowercase hex HMAC-SHA256 of `body`, keyed with the whole secret string.
fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

fn envelope(event: &str, run_id: &str, status: Option<&str>) -> Vec<u8> {
    let mut body = json!({
        "event": event,
        "run_id": run_id,
        "output": {"outputs": [{"type": "video", "url": "https://files.example.com/v.mp4?X-Amz-Signature=presigned"}]},
        "duration_ms": 102_345,
        "created_at": "2026-05-06T10:00:00.000+00:00",
        "completed_at": "2026-05-06T10:01:42.000+00:00",
        "metadata": null,
        "a_field_runflow_adds_later": {"x": 1},
    });
    if let Some(status) = status {
        body["status"] = json!(status);
    }
    serde_json::to_vec(&body).unwrap()
}

/// An API server with tokens, the given callback secrets and a `/metrics` route rendering the
/// callback counters as `klingq serve` does.
struct CallbackServer {
    base: String,
    client: reqwest::Client,
    producer: Producer,
    /// Every response body seen, to check no secret leaks into one.
    bodies: Vec<String>,
    stop: Option<oneshot::Sender<()>>,
    join: tokio::task::JoinHandle<Result<(), ServeError>>,
}

impl CallbackServer {
    async fn start(producer: Producer, secrets: &str) -> Self {
        let config: ApiConfig = serde_json::from_value(json!({
            "tokens": [TOKEN],
            "callback_secrets": secrets,
        }))
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let state = ApiState::new(producer.clone(), config);
        let metrics = state.callback_metrics();
        let state = state.with_public_routes(axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let metrics = metrics.clone();
                async move {
                    let mut out = String::new();
                    metrics.render(&mut out);
                    out
                }
            }),
        ));
        let (stop, stopped) = oneshot::channel::<()>();
        let join = tokio::spawn(klingq_producer::serve(listener, state, async move {
            let _ = stopped.await;
        }));
        Self {
            base,
            client: reqwest::Client::new(),
            producer,
            bodies: Vec::new(),
            stop: Some(stop),
            join,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Posts `body` to the callback route with `signature` (none: no header), no token.
    async fn post(&mut self, signature: Option<&str>, body: Vec<u8>) -> (StatusCode, Value) {
        let mut request = self
            .client
            .post(self.url(PATH))
            .header("content-type", "application/json")
            .header("runflow-request-id", "req_0123")
            .body(body);
        if let Some(signature) = signature {
            request = request.header("runflow-signature", signature);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        if status == StatusCode::UNAUTHORIZED {
            assert!(
                !response.headers().contains_key("www-authenticate"),
                "the callback route asks for no bearer token"
            );
        }
        let text = response.text().await.unwrap();
        self.bodies.push(text.clone());
        let value = serde_json::from_str(&text)
            .unwrap_or_else(|error| panic!("not JSON ({error}): {text:?}"));
        (status, value)
    }

    /// Posts `body` signed with `secret`.
    async fn signed(&mut self, secret: &str, body: Vec<u8>) -> (StatusCode, Value) {
        let signature = sign(secret, &body);
        self.post(Some(&signature), body).await
    }

    /// Posts a signed callback and expects 200 with `outcome`.
    async fn expect_outcome(&mut self, body: Vec<u8>, outcome: &str) {
        let (status, answer) = self.signed(NEW_SECRET, body).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!(answer, json!({"received": true, "outcome": outcome}));
    }

    /// `klingq_provider_callbacks_total` by outcome, read from `/metrics`.
    async fn counts(&self) -> Vec<(String, u64)> {
        let text = self
            .client
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(text.contains("# TYPE klingq_provider_callbacks_total counter"));
        CALLBACK_OUTCOMES
            .iter()
            .map(|outcome| {
                let prefix = format!("klingq_provider_callbacks_total{{outcome=\"{outcome}\"}} ");
                let value = text
                    .lines()
                    .find_map(|line| line.strip_prefix(&prefix))
                    .unwrap_or_else(|| panic!("{outcome} missing from {text}"));
                ((*outcome).to_owned(), value.parse().unwrap())
            })
            .collect()
    }

    async fn count(&self, outcome: &str) -> u64 {
        self.counts()
            .await
            .into_iter()
            .find(|(name, _)| name == outcome)
            .unwrap()
            .1
    }

    async fn stop(mut self) {
        for body in &self.bodies {
            for secret in [OLD_SECRET, NEW_SECRET, "whsec_"] {
                assert!(!body.contains(secret), "a secret in a response: {body}");
            }
        }
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

const TTL: Duration = Duration::from_secs(3600);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_callbacks_reach_the_queue_with_its_outcome() {
    let producer = producer("callbacks-outcomes").await;
    let mut server =
        CallbackServer::start(producer.clone(), &format!("{OLD_SECRET} {NEW_SECRET}")).await;
    assert!(
        server.counts().await.iter().all(|(_, count)| *count == 0),
        "every outcome is there from the start, at 0"
    );
    let queue = server.producer.queue().clone();

    // A run nobody bound: kept, and handed to the job that binds it.
    server
        .expect_outcome(
            envelope("run.completed", "run-early", Some("succeeded")),
            "unknown_run",
        )
        .await;
    // The same status again: a duplicate.
    server
        .expect_outcome(
            envelope("run.completed", "run-early", Some("succeeded")),
            "duplicate",
        )
        .await;
    let early_job = producer.enqueue(spec(1)).await.unwrap().id;
    assert_eq!(
        queue.bind_run(&early_job, "run-early", TTL).await.unwrap(),
        Some("succeeded".to_owned()),
        "the binding finds the callback that came first"
    );

    // A job waiting in the delayed set (a not-before time) is woken by its run's callback.
    let mut later = spec(2);
    later.not_before = Some(time::OffsetDateTime::now_utc() + time::Duration::hours(1));
    let waiting = producer.enqueue(later).await.unwrap().id;
    assert_eq!(
        producer.job(&waiting).await.unwrap().state,
        JobState::Scheduled
    );
    assert_eq!(
        queue.bind_run(&waiting, "run-waiting", TTL).await.unwrap(),
        None
    );
    server
        .expect_outcome(envelope("run.failed", "run-waiting", None), "accepted")
        .await;
    assert_eq!(
        producer.job(&waiting).await.unwrap().state,
        JobState::Queued,
        "the callback made the job ready"
    );
    // Reported again: a duplicate, which wakes the job again at most.
    server
        .expect_outcome(
            envelope("run.failed", "run-waiting", Some("failed")),
            "duplicate",
        )
        .await;

    // A finished job's run.
    let done = producer.enqueue(spec(3)).await.unwrap().id;
    producer.cancel_job(&done).await.unwrap();
    queue.bind_run(&done, "run-done", TTL).await.unwrap();
    server
        .expect_outcome(
            envelope("run.completed", "run-done", Some("succeeded")),
            "finished",
        )
        .await;

    // Both spellings of cancellation, in the event and in the status, mean `canceled`.
    for (n, event, status) in [
        (4, "run.cancelled", None),
        (5, "run.canceled", None),
        (6, "run.cancelled", Some("cancelled")),
        (7, "run.canceled", Some("canceled")),
    ] {
        let run = format!("run-cancel-{n}");
        server
            .expect_outcome(envelope(event, &run, status), "unknown_run")
            .await;
        let job = producer.enqueue(spec(n)).await.unwrap().id;
        assert_eq!(
            queue.bind_run(&job, &run, TTL).await.unwrap().as_deref(),
            Some("canceled"),
            "{event} {status:?}"
        );
    }
    // A queued job (on its ready stream): woken, i.e. accepted.
    let queued = producer.enqueue(spec(8)).await.unwrap().id;
    queue.bind_run(&queued, "run-queued", TTL).await.unwrap();
    server
        .expect_outcome(
            envelope("run.partial_succeeded", "run-queued", None),
            "accepted",
        )
        .await;

    // The secret being rotated out still verifies.
    let body = envelope("run.completed", "run-old-secret", Some("succeeded"));
    let (status, answer) = server.signed(OLD_SECRET, body).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["outcome"], "unknown_run");

    let counts = server.counts().await;
    let expected = [
        ("accepted", 2),
        ("duplicate", 2),
        ("unknown_run", 6),
        ("finished", 1),
        ("bad_signature", 0),
        ("malformed", 0),
        ("too_large", 0),
        ("not_configured", 0),
        ("error", 0),
    ];
    assert_eq!(
        counts,
        expected
            .iter()
            .map(|(outcome, count)| ((*outcome).to_owned(), *count))
            .collect::<Vec<_>>()
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_signatures_are_refused_before_anything_changes() {
    let producer = producer("callbacks-signatures").await;
    let mut server = CallbackServer::start(producer.clone(), NEW_SECRET).await;
    let body = envelope("run.completed", "run-forged", Some("succeeded"));
    let good = sign(NEW_SECRET, &body);
    let refused = [
        Some(sign("whsec_someone_else", &body)),
        Some(sign(&NEW_SECRET["whsec_".len()..], &body)),
        None,
        Some(good.to_uppercase()),
        Some(good[..63].to_owned()),
        Some(format!("{good}0")),
        Some(format!("sha256={good}")),
        Some("0".repeat(64)),
        // Signed for another body.
        Some(sign(NEW_SECRET, b"{}")),
    ];
    for signature in &refused {
        let (status, error) = server.post(signature.as_deref(), body.clone()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{signature:?}");
        assert_eq!(error["error"]["code"], "bad_signature", "{signature:?}");
    }
    assert_eq!(server.count("bad_signature").await, refused.len() as u64);
    // Nothing was recorded for the run.
    let job = producer.enqueue(spec(1)).await.unwrap().id;
    assert_eq!(
        producer
            .queue()
            .bind_run(&job, "run-forged", TTL)
            .await
            .unwrap(),
        None
    );
    // The same body with its right signature is taken.
    let (status, answer) = server.post(Some(&good), body).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer["outcome"], "accepted");

    // Signed, but not a callback: 400, counted as malformed.
    let malformed: [&[u8]; 5] = [
        b"garbage, signed",
        b"[1, 2]",
        br#"{"event":"run.completed","status":"succeeded"}"#,
        br#"{"run_id":"r","event":"run.started"}"#,
        br#"{"run_id":42,"status":"failed"}"#,
    ];
    for body in malformed {
        let (status, error) = server.signed(NEW_SECRET, body.to_vec()).await;
        assert_eq!(
            status,
            StatusCode::BAD_REQUEST,
            "{}",
            String::from_utf8_lossy(body)
        );
        assert!(
            ["invalid_json", "invalid_callback"]
                .contains(&error["error"]["code"].as_str().unwrap()),
            "{error}"
        );
    }
    assert_eq!(server.count("malformed").await, malformed.len() as u64);
    assert_eq!(server.count("bad_signature").await, refused.len() as u64);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_one_mib_are_refused_and_counted() {
    let producer = producer("callbacks-size").await;
    let mut server = CallbackServer::start(producer, NEW_SECRET).await;
    // Exactly 1 MiB: a valid callback padded with spaces.
    let mut body = envelope("run.completed", "run-big", Some("succeeded"));
    body.resize(MIB, b' ');
    let (status, answer) = server.signed(NEW_SECRET, body.clone()).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["outcome"], "unknown_run");
    // One byte more, correctly signed: 413.
    body.push(b' ');
    let (status, error) = server.signed(NEW_SECRET, body).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(error["error"]["code"], "payload_too_large");
    // Sent without a Content-Length, in chunks: still cut at the limit.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = vec![
        Ok(vec![b' '; MIB / 2]),
        Ok(vec![b' '; MIB / 2]),
        Ok(vec![b' ']),
    ];
    let response = server
        .client
        .post(server.url(PATH))
        .header("runflow-signature", "0".repeat(64))
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(server.count("too_large").await, 2);
    assert_eq!(server.count("unknown_run").await, 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_route_needs_no_token_while_the_others_still_do() {
    let producer = producer("callbacks-auth").await;
    let mut server = CallbackServer::start(producer, NEW_SECRET).await;
    // No token, and a wrong one, are both fine on the callback route.
    server
        .expect_outcome(
            envelope("run.completed", "run-auth", Some("succeeded")),
            "unknown_run",
        )
        .await;
    let body = envelope("run.failed", "run-auth-2", Some("failed"));
    let response = server
        .client
        .post(server.url(PATH))
        .bearer_auth("not-a-token")
        .header("runflow-signature", sign(NEW_SECRET, &body))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // Other routes still need the token.
    for auth in [None, Some("wrong")] {
        let mut request = server.client.get(server.url("/v1/jobs"));
        if let Some(token) = auth {
            request = request.bearer_auth(token);
        }
        assert_eq!(
            request.send().await.unwrap().status(),
            StatusCode::UNAUTHORIZED,
            "{auth:?}"
        );
    }
    let response = server
        .client
        .get(server.url("/v1/jobs"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // Other methods on the callback route are not routes.
    let response = server.client.get(server.url(PATH)).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);

    // The OpenAPI document describes the route as taking no bearer token.
    let document: Value = server
        .client
        .get(server.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let operation = &document["paths"][PATH]["post"];
    assert_eq!(operation["security"], json!([]), "{operation}");
    assert_eq!(document["security"], json!([{"bearer": []}]));
    let signature = operation["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "Runflow-Signature")
        .unwrap();
    assert_eq!(signature["in"], "header");
    assert_eq!(signature["required"], true);
    assert_eq!(signature["schema"]["pattern"], "^[0-9a-f]{64}$");
    for code in ["200", "400", "401", "404", "413", "503"] {
        assert!(operation["responses"][code].is_object(), "{code}");
    }
    assert!(
        operation["responses"]["503"]["headers"]["Retry-After"].is_object(),
        "{operation}"
    );
    let events = &document["components"]["schemas"]["RunflowEvent"]["enum"];
    for event in [
        "run.completed",
        "run.failed",
        "run.cancelled",
        "run.canceled",
        "run.partial_succeeded",
    ] {
        assert!(
            events.as_array().unwrap().contains(&json!(event)),
            "{event}"
        );
    }
    let statuses = &document["components"]["schemas"]["RunflowStatus"]["enum"];
    assert!(statuses.as_array().unwrap().contains(&json!("cancelled")));
    assert!(statuses.as_array().unwrap().contains(&json!("canceled")));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_secret_callbacks_are_not_configured() {
    let producer = producer("callbacks-off").await;
    let mut server = CallbackServer::start(producer, "  ").await;
    let (status, error) = server
        .signed("", envelope("run.completed", "run-off", Some("succeeded")))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error["error"]["code"], "callbacks_not_configured");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("provider.callback_secret"),
        "{error}"
    );
    // Without its signature header a request is refused as unauthenticated first.
    let (status, _) = server.post(None, b"{}".to_vec()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(server.count("not_configured").await, 1);
    assert_eq!(server.count("bad_signature").await, 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_while_redis_is_down_asks_runflow_to_retry() {
    let mut redis = RedisServer::start().await.unwrap();
    let mut queue = crate::config(&unique_namespace("callbacks-outage"));
    queue.redis_url = redis.url();
    queue.command_timeout_ms = 2_000;
    let producer = Producer::connect(queue, CostModel::default())
        .await
        .unwrap();
    let mut server = CallbackServer::start(producer, NEW_SECRET).await;
    let body = envelope("run.completed", "run-outage", Some("succeeded"));
    server.expect_outcome(body.clone(), "unknown_run").await;

    redis.stop().await.unwrap();
    let signature = sign(NEW_SECRET, &body);
    let response = server
        .client
        .post(server.url(PATH))
        .header("runflow-signature", &signature)
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.headers().contains_key("retry-after"));
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "unavailable");
    assert_eq!(server.count("error").await, 1);

    // Once Redis is back (empty: it kept nothing), Runflow's retry is taken.
    redis.restart().await.unwrap();
    let answer = klingq_testkit::wait_for(
        "the callback to be taken again",
        Duration::from_secs(20),
        || {
            let request = server
                .client
                .post(server.url(PATH))
                .header("runflow-signature", &signature)
                .body(body.clone());
            async move {
                let response = request.send().await.ok()?;
                (response.status() == StatusCode::OK).then_some(())?;
                response.json::<Value>().await.ok()
            }
        },
    )
    .await
    .unwrap();
    assert_eq!(answer["received"], true);
    server.stop().await;
}
