//! Shared helpers: start a simulator and talk to it like a client would.

use std::future::Future;
use std::time::{Duration, Instant};

use klingq_sim::{RunRecord, SimConfig, SimHandle};
use serde_json::{Value, json};

pub(crate) const KEY: &str = "rf_live_test";
pub(crate) const CREATE_PATH: &str = "/v1/models/kuaishou/kling-video/v3/pro/image-to-video/runs";
pub(crate) const SYNC_PATH: &str = "/v1/run/kuaishou/kling-video/v3/pro/image-to-video";

/// How long any condition may take before a test fails.
const DEADLINE: Duration = Duration::from_secs(20);

pub(crate) struct Harness {
    pub(crate) sim: SimHandle,
    pub(crate) http: reqwest::Client,
}

pub(crate) async fn harness(config: SimConfig) -> Harness {
    let sim = klingq_sim::start_local(config)
        .await
        .expect("simulator starts");
    let http = reqwest::Client::builder().build().expect("client builds");
    Harness { sim, http }
}

/// A simulator with millisecond latencies and tiny videos.
pub(crate) async fn fast() -> Harness {
    harness(SimConfig::fast()).await
}

/// A minimal valid input.
pub(crate) fn input(prompt: &str) -> Value {
    json!({"prompt": prompt, "start_image_url": "https://example.com/start.png"})
}

/// Polls `check` until it yields a value, failing the test after the deadline.
pub(crate) async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(started.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

impl Harness {
    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.sim.base_url())
    }

    pub(crate) fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.post(self.url(path)).bearer_auth(KEY)
    }

    pub(crate) fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.get(self.url(path)).bearer_auth(KEY)
    }

    /// Sends a create with a full wrapper body.
    pub(crate) async fn post_create(&self, body: &Value) -> reqwest::Response {
        self.post(CREATE_PATH)
            .json(body)
            .send()
            .await
            .expect("create request is answered")
    }

    /// Creates a run and returns the Run object, asserting 201.
    pub(crate) async fn create_body(&self, body: Value) -> Value {
        let response = self.post_create(&body).await;
        let status = response.status();
        let text = response.text().await.expect("create body");
        assert_eq!(
            status,
            reqwest::StatusCode::CREATED,
            "create failed: {text}"
        );
        serde_json::from_str(&text).expect("run json")
    }

    /// Creates a run from an input and returns its id.
    pub(crate) async fn create(&self, input: Value) -> String {
        let run = self.create_body(json!({"input": input})).await;
        run["id"].as_str().expect("run id").to_owned()
    }

    pub(crate) async fn get_run(&self, id: &str) -> reqwest::Response {
        self.get(&format!("/v1/runs/{id}"))
            .send()
            .await
            .expect("poll is answered")
    }

    /// Polls the run until its status is terminal (tolerating poll faults) and returns it.
    pub(crate) async fn wait_terminal(&self, id: &str) -> Value {
        eventually("a terminal run", || async {
            let response = self.get(&format!("/v1/runs/{id}")).send().await.ok()?;
            if !response.status().is_success() {
                return None;
            }
            let run: Value = response.json().await.ok()?;
            matches!(
                run["status_code"].as_str(),
                Some("succeeded" | "failed" | "canceled")
            )
            .then_some(run)
        })
        .await
    }

    /// Waits until the admin view shows the run as terminal, without polling the Runflow API.
    pub(crate) async fn wait_record_terminal(&self, id: &str) -> RunRecord {
        eventually("a terminal run record", || async {
            self.record(id).filter(|record| {
                matches!(record.status.as_str(), "succeeded" | "failed" | "canceled")
            })
        })
        .await
    }

    pub(crate) fn record(&self, id: &str) -> Option<RunRecord> {
        self.sim
            .runs()
            .into_iter()
            .find(|record| record.id.to_string() == id)
    }

    pub(crate) async fn admin(&self, path: &str) -> Value {
        self.http
            .get(self.url(path))
            .send()
            .await
            .expect("admin answers")
            .json()
            .await
            .expect("admin json")
    }
}

/// The `Retry-After`, `Content-Type` or other header of a response as a string.
pub(crate) fn header(response: &reqwest::Response, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned)
}
