//! Per-run callbacks: a real receiver on 127.0.0.1 records what the simulator POSTs to it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{OriginalUri, State};
use axum::http::{HeaderMap, StatusCode as AxumStatus, header};
use axum::response::{IntoResponse, Response};
use hmac::{Hmac, Mac};
use klingq_sim::SimConfig;
use reqwest::StatusCode;
use serde_json::{Value, json};
use sha2::Sha256;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::common::{Harness, eventually, fast, harness, input};

const SECRET: &str = "whsec_c2ltdWxhdG9yLXRlc3Qtc2VjcmV0";

/// One request the receiver got.
#[derive(Clone, Debug)]
struct Received {
    path: String,
    headers: HeaderMap,
    body: Bytes,
    at: Instant,
}

impl Received {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("callback body is JSON")
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .map(|value| value.to_str().expect("ascii header"))
    }
}

#[derive(Default)]
struct Inner {
    received: Mutex<Vec<Received>>,
    /// Statuses to answer, in order; 200 once they are used up (or always `sticky` if set).
    answers: Mutex<VecDeque<u16>>,
    sticky: Mutex<Option<u16>>,
}

/// A tiny callback receiver on 127.0.0.1:0 that records every request and answers as told.
struct Receiver {
    base: String,
    inner: Arc<Inner>,
}

async fn record(
    State(inner): State<Arc<Inner>>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    inner.received.lock().unwrap().push(Received {
        path: uri.path().to_owned(),
        headers,
        body,
        at: Instant::now(),
    });
    let answer = inner.answers.lock().unwrap().pop_front();
    let status = answer.or(*inner.sticky.lock().unwrap()).unwrap_or(200);
    let status = AxumStatus::from_u16(status).unwrap();
    if status.is_redirection() {
        return (status, [(header::LOCATION, "/redirected")], "moved").into_response();
    }
    (status, "ok").into_response()
}

impl Receiver {
    async fn start() -> Self {
        let inner = Arc::new(Inner::default());
        let router = axum::Router::new()
            .fallback(record)
            .with_state(Arc::clone(&inner));
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Self { base, inner }
    }

    /// The URL to pass as `callback_url`, with a query string the simulator must keep.
    fn url(&self) -> String {
        format!("{}/hook?token=t0ken", self.base)
    }

    fn answer_with(&self, statuses: &[u16]) {
        self.inner.answers.lock().unwrap().extend(statuses);
    }

    fn always_answer(&self, status: u16) {
        *self.inner.sticky.lock().unwrap() = Some(status);
    }

    fn received(&self) -> Vec<Received> {
        self.inner.received.lock().unwrap().clone()
    }

    /// Waits until at least `count` requests arrived and returns them all.
    async fn wait_for(&self, count: usize) -> Vec<Received> {
        eventually(&format!("{count} callback request(s)"), || async {
            let received = self.received();
            (received.len() >= count).then_some(received)
        })
        .await
    }
}

/// Creates a run that reports to `receiver` and returns its id.
async fn create_with_callback(h: &Harness, receiver: &Receiver, prompt: &str) -> String {
    let run = h
        .create_body(json!({
            "input": input(prompt),
            "callback_url": receiver.url(),
            "client_ref": "job-7:1",
            "metadata": {"job_id": "job-7", "attempt": 1},
        }))
        .await;
    run["id"].as_str().unwrap().to_owned()
}

/// Waits until the callback counters (read over HTTP, as another test suite would) satisfy `check`.
async fn wait_stats(h: &Harness, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    eventually(what, || async {
        let stats = h.admin("/__sim/stats").await;
        check(&stats["callbacks"]).then_some(stats["callbacks"].clone())
    })
    .await
}

fn independent_signature(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// Asserts the `+00:00`, millisecond form and returns the instant.
fn callback_time(value: &Value) -> OffsetDateTime {
    let text = value.as_str().expect("timestamp string");
    assert!(text.ends_with("+00:00"), "{text}");
    assert!(!text.contains('Z'), "{text}");
    // YYYY-MM-DDTHH:MM:SS.mmm+00:00
    assert_eq!(text.len(), 29, "{text}");
    assert_eq!(&text[19..20], ".", "{text}");
    OffsetDateTime::parse(text, &Rfc3339).expect("RFC 3339")
}

fn run_time(run: &Value, field: &str) -> OffsetDateTime {
    OffsetDateTime::parse(run[field].as_str().expect("run timestamp"), &Rfc3339).unwrap()
}

/// Checks the envelope's times against the run object from `GET /v1/runs/{id}`.
fn assert_times_match_the_run(envelope: &Value, run: &Value) {
    let created = callback_time(&envelope["created_at"]);
    let completed = callback_time(&envelope["completed_at"]);
    assert_eq!(created, run_time(run, "created_at"));
    assert_eq!(completed, run_time(run, "completed_at"));
    let duration_ms = envelope["duration_ms"].as_u64().expect("duration_ms");
    assert_eq!(Some(duration_ms), run["duration_ms"].as_u64());
    assert_eq!(
        i128::from(duration_ms),
        (completed - created).whole_milliseconds()
    );
}

/// Replaces the query of every `url` field (download URLs are re-signed on every read).
fn without_url_queries(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(key, value)| {
                    let value = match (key.as_str(), value) {
                        ("url", Value::String(url)) => {
                            Value::String(url.split('?').next().unwrap().to_owned())
                        }
                        _ => without_url_queries(value),
                    };
                    (key.clone(), value)
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(without_url_queries).collect()),
        other => other.clone(),
    }
}

fn signed() -> SimConfig {
    SimConfig {
        callback_secret: Some(SECRET.to_owned()),
        ..SimConfig::fast()
    }
}

#[tokio::test]
async fn a_succeeded_run_calls_back_once_signed_without_being_polled() {
    let receiver = Receiver::start().await;
    let h = harness(signed()).await;
    let id = create_with_callback(&h, &receiver, "a lighthouse at dusk").await;

    let received = receiver.wait_for(1).await;
    // Nobody polled: the callback fired from the simulator's own timer.
    assert_eq!(h.sim.stats().polls, 0);
    let callback = &received[0];
    assert_eq!(callback.path, "/hook");
    assert_eq!(callback.header("content-type"), Some("application/json"));
    let request_id = callback.header("runflow-request-id").expect("request id");
    uuid::Uuid::parse_str(request_id).expect("request id is a UUID");
    let signature = callback.header("runflow-signature").expect("signature");
    assert_eq!(signature.len(), 64);
    assert!(
        signature
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
    );
    assert_eq!(signature, independent_signature(SECRET, &callback.body));
    assert_ne!(
        signature,
        independent_signature("whsec_other", &callback.body)
    );

    let envelope = callback.json();
    assert_eq!(envelope["event"], "run.completed");
    assert_eq!(envelope["run_id"], id.as_str());
    assert_eq!(envelope["status"], "succeeded");
    assert_eq!(
        envelope["metadata"],
        json!({"job_id": "job-7", "attempt": 1})
    );
    let keys: Vec<&str> = envelope
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let mut expected = vec![
        "completed_at",
        "created_at",
        "duration_ms",
        "event",
        "metadata",
        "output",
        "run_id",
        "status",
    ];
    let mut keys_sorted = keys.clone();
    keys_sorted.sort_unstable();
    expected.sort_unstable();
    assert_eq!(keys_sorted, expected);

    let run = h.wait_terminal(&id).await;
    assert_eq!(run["status_code"], "succeeded");
    assert_times_match_the_run(&envelope, &run);
    assert_eq!(
        without_url_queries(&envelope["output"]),
        without_url_queries(&run["output"])
    );
    let video_url = envelope["output"]["outputs"][0]["url"].as_str().unwrap();
    assert!(video_url.starts_with(&format!("{}/files/", h.sim.base_url())));
    // The charge is booked before the callback leaves.
    assert!(
        h.sim
            .charges()
            .iter()
            .any(|charge| charge.run_id.to_string() == id)
    );

    let stats = wait_stats(&h, "the delivery to be counted", |c| c["delivered"] == 1).await;
    assert_eq!(stats["scheduled"], 1);
    assert_eq!(stats["retried"], 0);
    assert_eq!(stats["failed"], 0);
    assert_eq!(stats["dropped"], 0);
    assert_eq!(stats["duplicated"], 0);
    // Scheduled once, not duplicated and delivered: no second request can follow.
    assert_eq!(receiver.received().len(), 1);
    assert_eq!(h.record(&id).unwrap().callbacks_delivered, 1);

    // The secret is redacted from the admin view of the config.
    let config = h.admin("/__sim/config").await;
    assert_eq!(config["callback_secret"], "<redacted>");
    assert!(!config.to_string().contains(SECRET));
}

#[tokio::test]
async fn a_failed_run_calls_back_with_run_failed_and_an_error_envelope() {
    let receiver = Receiver::start().await;
    let h = harness(signed()).await;
    let id = create_with_callback(&h, &receiver, "rejected [[sim:moderation]]").await;
    let received = receiver.wait_for(1).await;
    let envelope = received[0].json();
    assert_eq!(envelope["event"], "run.failed");
    assert_eq!(envelope["run_id"], id.as_str());
    assert_eq!(envelope["status"], "failed");
    assert_eq!(envelope["output"]["code"], "CONTENT_POLICY_VIOLATION");
    assert!(envelope["output"]["message"].is_string());
    assert_eq!(
        received[0].header("runflow-signature").unwrap(),
        independent_signature(SECRET, &received[0].body)
    );
    let run = h.wait_terminal(&id).await;
    assert_eq!(run["status_code"], "failed");
    assert_times_match_the_run(&envelope, &run);
}

#[tokio::test]
async fn a_cancelled_run_calls_back_at_once_and_the_job_is_still_billed() {
    let receiver = Receiver::start().await;
    // About 2.4 s of real running time: long enough to cancel it first.
    let h = harness(SimConfig {
        time_scale: 0.02,
        latency_sigma: 0.0,
        queue_max_secs: 0.0,
        dispatch_secs: 0.0,
        ..signed()
    })
    .await;
    let id = create_with_callback(&h, &receiver, "cancel me").await;
    let path = format!("/v1/admin/runs/{id}/cancellation");

    let too_short = h
        .post(&path)
        .json(&json!({"reason": "no"}))
        .send()
        .await
        .unwrap();
    assert_eq!(too_short.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let cancelled = h
        .post(&path)
        .json(&json!({"reason": "operator request"}))
        .send()
        .await
        .unwrap();
    assert_eq!(cancelled.status(), StatusCode::CREATED);
    let run: Value = cancelled.json().await.unwrap();
    assert_eq!(run["status_code"], "canceled");
    assert!(run["output"].is_null());
    // Already terminal: 200 and the run unchanged.
    let again = h.post(&path).send().await.unwrap();
    assert_eq!(again.status(), StatusCode::OK);
    let unknown = h
        .post(&format!(
            "/v1/admin/runs/{}/cancellation",
            uuid::Uuid::now_v7()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);

    let received = receiver.wait_for(1).await;
    let envelope = received[0].json();
    assert_eq!(envelope["event"], "run.cancelled");
    assert_eq!(envelope["run_id"], id.as_str());
    assert_eq!(envelope["status"], "canceled");
    assert!(envelope.get("output").is_some_and(Value::is_null));
    let polled = h.wait_terminal(&id).await;
    assert_eq!(polled["status_code"], "canceled");
    assert_times_match_the_run(&envelope, &polled);
    assert_eq!(run["completed_at"], polled["completed_at"]);

    // Cancelling does not stop the job: it is billed when it succeeds (no refund), and it
    // sends no second callback.
    let charges = eventually("the cancelled job's charge", || async {
        Some(h.sim.charges()).filter(|charges| !charges.is_empty())
    })
    .await;
    assert_eq!(charges[0].run_id.to_string(), id);
    assert_eq!(h.record(&id).unwrap().status, "canceled");
    let stats = wait_stats(&h, "the delivery to be counted", |c| c["delivered"] == 1).await;
    assert_eq!(stats["scheduled"], 1);
    assert_eq!(receiver.received().len(), 1);
    assert_eq!(h.sim.stats().cancellations, 4);
}

#[tokio::test]
async fn a_cancelled_stuck_run_calls_back_and_frees_its_held_sync_request() {
    let receiver = Receiver::start().await;
    let h = fast().await;
    let id = create_with_callback(&h, &receiver, "[[sim:stuck]]").await;
    let sync = {
        let request = h
            .post(crate::common::SYNC_PATH)
            .json(&input("held [[sim:stuck]]"));
        tokio::spawn(async move { request.send().await.unwrap() })
    };
    let sync_id = eventually("the sync run", || async {
        h.sim
            .runs()
            .into_iter()
            .find(|record| record.source == "sync")
            .map(|record| record.id)
    })
    .await;
    let cancel = |id: String| {
        let request = h.post(&format!("/v1/admin/runs/{id}/cancellation"));
        async move { request.send().await.unwrap().status() }
    };
    assert_eq!(cancel(id.clone()).await, StatusCode::CREATED);
    assert_eq!(cancel(sync_id.to_string()).await, StatusCode::CREATED);
    let envelope = receiver.wait_for(1).await[0].json();
    assert_eq!(envelope["event"], "run.cancelled");
    let response = sync.await.unwrap();
    assert_eq!(response.status(), StatusCode::CONFLICT);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "RUN_CANCELLED");
}

#[tokio::test]
async fn a_server_error_is_retried_with_the_same_body_signature_and_request_id() {
    let receiver = Receiver::start().await;
    receiver.answer_with(&[500, 503]);
    let h = harness(signed()).await;
    create_with_callback(&h, &receiver, "retry me").await;
    let received = receiver.wait_for(3).await;
    for attempt in &received[1..] {
        assert_eq!(attempt.body, received[0].body);
        assert_eq!(
            attempt.header("runflow-signature"),
            received[0].header("runflow-signature")
        );
        assert_eq!(
            attempt.header("runflow-request-id"),
            received[0].header("runflow-request-id")
        );
    }
    // Exponential pauses: at least 250 ms, then at least 500 ms.
    assert!(received[1].at.duration_since(received[0].at) >= Duration::from_millis(250));
    assert!(received[2].at.duration_since(received[1].at) >= Duration::from_millis(500));
    let stats = wait_stats(&h, "the delivery to be counted", |c| c["delivered"] == 1).await;
    assert_eq!(stats["retried"], 2);
    assert_eq!(stats["failed"], 0);
    assert_eq!(receiver.received().len(), 3);
}

#[tokio::test]
async fn a_receiver_that_keeps_failing_is_given_up_after_four_attempts() {
    let receiver = Receiver::start().await;
    receiver.always_answer(500);
    let h = fast().await;
    create_with_callback(&h, &receiver, "never accepted").await;
    let stats = wait_stats(&h, "the callback to be given up", |c| c["failed"] == 1).await;
    assert_eq!(stats["retried"], 3);
    assert_eq!(stats["delivered"], 0);
    assert_eq!(receiver.received().len(), 4);
}

#[tokio::test]
async fn redirects_are_not_followed() {
    let receiver = Receiver::start().await;
    receiver.answer_with(&[307]);
    let h = fast().await;
    create_with_callback(&h, &receiver, "moved").await;
    wait_stats(&h, "the delivery to be counted", |c| c["delivered"] == 1).await;
    let paths: Vec<String> = receiver
        .received()
        .into_iter()
        .map(|request| request.path)
        .collect();
    assert_eq!(paths, ["/hook", "/hook"]);
}

#[tokio::test]
async fn drop_sends_nothing_and_counts_it() {
    let receiver = Receiver::start().await;
    let h = fast().await;
    // Changed at runtime through the admin endpoint, as other suites would.
    let response = h
        .http
        .post(h.url("/__sim/config"))
        .json(&json!({"callback_drop": 1.0}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let id = create_with_callback(&h, &receiver, "lost in the mail").await;
    h.wait_record_terminal(&id).await;
    let stats = wait_stats(&h, "the drop to be counted", |c| c["dropped"] == 1).await;
    assert_eq!(stats["scheduled"], 1);
    assert_eq!(stats["delivered"], 0);
    // The drop is decided when the callback falls due, so nothing can follow it.
    assert!(receiver.received().is_empty());
    assert!(
        h.record(&id)
            .unwrap()
            .faults
            .contains(&"callback-drop".to_owned())
    );
}

#[tokio::test]
async fn duplicate_delivers_twice_with_the_same_body() {
    let receiver = Receiver::start().await;
    let h = harness(SimConfig {
        callback_duplicate: 1.0,
        ..signed()
    })
    .await;
    create_with_callback(&h, &receiver, "twice").await;
    let received = receiver.wait_for(2).await;
    assert_eq!(received[0].body, received[1].body);
    assert_eq!(
        received[0].header("runflow-signature"),
        received[1].header("runflow-signature")
    );
    assert_ne!(
        received[0].header("runflow-request-id"),
        received[1].header("runflow-request-id")
    );
    assert!(received[1].at >= received[0].at);
    let stats = wait_stats(&h, "both deliveries to be counted", |c| c["delivered"] == 2).await;
    assert_eq!(stats["duplicated"], 1);
    assert_eq!(stats["scheduled"], 1);
    assert_eq!(receiver.received().len(), 2);
}

#[tokio::test]
async fn prompt_tokens_drop_or_duplicate_single_runs() {
    let receiver = Receiver::start().await;
    let h = fast().await;
    let dropped = create_with_callback(&h, &receiver, "a [[sim:callback-drop]]").await;
    let doubled = create_with_callback(&h, &receiver, "b [[sim:callback-duplicate]]").await;
    let plain = create_with_callback(&h, &receiver, "c").await;
    let stats = wait_stats(&h, "all callbacks to settle", |c| {
        c["dropped"] == 1 && c["delivered"] == 3
    })
    .await;
    assert_eq!(stats["scheduled"], 3);
    assert_eq!(stats["duplicated"], 1);
    let run_ids: Vec<String> = receiver
        .received()
        .iter()
        .map(|request| request.json()["run_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(run_ids.iter().filter(|id| **id == doubled).count(), 2);
    assert_eq!(run_ids.iter().filter(|id| **id == plain).count(), 1);
    assert!(!run_ids.contains(&dropped));
    let faults = &h.sim.stats().faults_injected;
    assert_eq!(faults["callback-drop"], 1);
    assert_eq!(faults["callback-duplicate"], 1);
}

#[tokio::test]
async fn the_delay_holds_the_first_delivery_back() {
    let receiver = Receiver::start().await;
    let h = harness(SimConfig {
        callback_delay_ms: 400,
        ..SimConfig::fast()
    })
    .await;
    let id = create_with_callback(&h, &receiver, "[[sim:stuck]]").await;
    // A cancellation makes the run terminal at a known instant.
    let before_cancel = Instant::now();
    let response = h
        .post(&format!("/v1/admin/runs/{id}/cancellation"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let received = receiver.wait_for(1).await;
    assert!(received[0].at.duration_since(before_cancel) >= Duration::from_millis(400));
}

#[tokio::test]
async fn without_a_secret_callbacks_carry_no_signature() {
    let receiver = Receiver::start().await;
    let h = fast().await;
    create_with_callback(&h, &receiver, "unsigned").await;
    let received = receiver.wait_for(1).await;
    assert_eq!(received[0].header("runflow-signature"), None);
    assert!(received[0].header("runflow-request-id").is_some());
    assert_eq!(received[0].json()["event"], "run.completed");
}

#[tokio::test]
async fn an_unreachable_receiver_is_given_up_and_counted() {
    // A port that was just free: connections are refused.
    let port = {
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
        listener.local_addr().unwrap().port()
    };
    let h = fast().await;
    h.create_body(json!({
        "input": input("nobody home"),
        "callback_url": format!("http://127.0.0.1:{port}/hook"),
    }))
    .await;
    let stats = wait_stats(&h, "the callback to be given up", |c| c["failed"] == 1).await;
    assert_eq!(stats["retried"], 3);
}
