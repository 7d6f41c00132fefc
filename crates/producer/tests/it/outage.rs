//! The API when Redis goes away, and its bounded event streams.

use std::time::{Duration, Instant};

use klingq_core::CostModel;
use klingq_producer::{ApiConfig, ApiState, Producer};
use klingq_testkit::redis::{RedisServer, unique_namespace};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::sync::oneshot;

use crate::config;

const TOKEN: &str = "outage-token-1";

struct Api {
    base: String,
    client: reqwest::Client,
    _stop: oneshot::Sender<()>,
}

impl Api {
    async fn start(redis_url: &str, api: ApiConfig) -> Self {
        let mut queue = config(&unique_namespace("outage"));
        queue.redis_url = redis_url.to_owned();
        queue.command_timeout_ms = 2_000;
        let producer = Producer::connect(queue, CostModel::default())
            .await
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let state = ApiState::new(
            producer,
            ApiConfig {
                tokens: vec![TOKEN.into()],
                ..api
            },
        );
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(klingq_producer::serve(listener, state, async move {
            let _ = stopped.await;
        }));
        Self {
            base,
            client: reqwest::Client::new(),
            _stop: stop,
        }
    }

    fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.client
            .get(format!("{}{path}", self.base))
            .bearer_auth(TOKEN)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_posted_while_redis_is_down_is_refused_at_once_naming_redis() {
    let mut redis = RedisServer::start().await.unwrap();
    let api = Api::start(&redis.url(), ApiConfig::default()).await;
    let job = json!({"start_image_url": "https://example.com/a.png", "prompt": "a cat"});
    let accepted = api
        .client
        .post(format!("{}/v1/jobs", api.base))
        .bearer_auth(TOKEN)
        .json(&job)
        .send()
        .await
        .unwrap();
    assert_eq!(accepted.status(), StatusCode::ACCEPTED);

    redis.stop().await.unwrap();
    for path in ["/v1/jobs", "/v1/batches"] {
        let body = if path == "/v1/jobs" {
            job.clone()
        } else {
            json!({ "jobs": [job.clone()] })
        };
        let started = Instant::now();
        let response = api
            .client
            .post(format!("{}{path}", api.base))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap();
        let took = started.elapsed();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE, "{path}");
        assert_eq!(response.headers()["retry-after"], "2");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "unavailable", "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("Redis is unavailable"),
            "{body}"
        );
        // One retry within the command timeout (2 s here), not 30 s of retries: far under
        // the 31 s this took before, with room for a loaded machine.
        assert!(took < Duration::from_secs(15), "{path} took {took:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_streams_are_capped_and_the_largest_cursor_is_accepted() {
    let redis = RedisServer::start().await.unwrap();
    let api = Api::start(
        &redis.url(),
        ApiConfig {
            max_event_streams: 2,
            ..ApiConfig::default()
        },
    )
    .await;
    let first = api.get("/v1/events").send().await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    // The largest valid stream id is a cursor like any other.
    let largest = "18446744073709551615-18446744073709551615";
    let second = api
        .get("/v1/events")
        .header("last-event-id", largest)
        .send()
        .await
        .unwrap();
    assert_eq!(second.status(), StatusCode::OK);

    let third = api.get("/v1/events?from=0").send().await.unwrap();
    assert_eq!(third.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(third.headers()["retry-after"], "2");
    let body: Value = third.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_many_event_streams", "{body}");

    // A stream that ends gives its place back.
    drop(first);
    let again =
        klingq_testkit::wait_for("a free event stream", Duration::from_secs(30), || async {
            let response = api.get("/v1/events").send().await.ok()?;
            (response.status() == StatusCode::OK).then_some(response)
        })
        .await
        .unwrap();
    drop(again);
    drop(second);

    // One past the largest is not a stream id.
    let over = api
        .get("/v1/events")
        .header("last-event-id", "18446744073709551616-0")
        .send()
        .await
        .unwrap();
    assert_eq!(over.status(), StatusCode::UNPROCESSABLE_ENTITY);
}
