//! Test fixtures: a real HTTP receiver that checks Standard Webhooks signatures with its own
//! implementation of the algorithm, a video worker with a trivial handler, and the webhook
//! service run as `klingq worker` would run it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use apalis::prelude::WorkerBuilderExt;
use apalis_core::worker::builder::WorkerBuilder;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use klingq_core::StoredVideo;
use klingq_events::{
    DeliveryQuery, DeliveryStatus, DeliverySummary, WebhookConfig, WebhookError, list_deliveries,
};
use klingq_queue::{
    Completion, EventExtras, JobFailure, Lease, NewJob, Queue, QueueBackend, QueueConfig,
    WorkerOptions, consumer_name,
};
use klingq_testkit::redis::{redis_url, require_shared_redis, unique_namespace};
use klingq_testkit::wait_for;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::sync::oneshot;

/// A fresh namespace on the shared Redis, with quick polling.
pub(crate) async fn video_queue(prefix: &str, tweak: impl FnOnce(&mut QueueConfig)) -> Queue {
    require_shared_redis().await.unwrap();
    let mut config = QueueConfig {
        redis_url: redis_url(),
        namespace: unique_namespace(prefix),
        promote_interval_ms: 50,
        block_timeout_ms: 200,
        ..QueueConfig::default()
    };
    tweak(&mut config);
    Queue::connect(config).await.unwrap()
}

/// A new `whsec_` secret.
pub(crate) fn new_secret() -> String {
    klingq_events::WebhookSecret::generate()
        .to_whsec()
        .expose()
        .to_owned()
}

/// A webhook configuration for tests: the loopback receiver allow-listed, fast retries.
pub(crate) fn config(secret: &str, schedule: &[&str]) -> WebhookConfig {
    WebhookConfig {
        secret: secret.into(),
        allow_cidrs: vec!["127.0.0.1/32".into()],
        retry_schedule: schedule.iter().map(|s| (*s).to_owned()).collect(),
        timeout_secs: 5,
        concurrency: 8,
        ..WebhookConfig::default()
    }
}

// ---------------------------------------------------------------------------------------
// The receiver.

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
pub(crate) struct Received {
    pub(crate) path: String,
    pub(crate) id: String,
    pub(crate) timestamp: String,
    /// The `traceparent` header.
    pub(crate) traceparent: Option<String>,
    pub(crate) body: String,
    /// How many of the path's secrets produced one of the request's signatures.
    pub(crate) n_secrets_matched: usize,
    pub(crate) at: Instant,
}

impl Received {
    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap()
    }
}

/// What the receiver answers.
#[derive(Debug, Clone)]
pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) retry_after: Option<String>,
    pub(crate) body: String,
}

impl Reply {
    pub(crate) fn status(status: u16) -> Self {
        Self {
            status,
            retry_after: None,
            body: String::new(),
        }
    }
}

type Script = Arc<dyn Fn(&str, usize) -> Reply + Send + Sync>;

struct ReceiverState {
    /// Decoded secrets per path.
    secrets: HashMap<String, Vec<Vec<u8>>>,
    received: Mutex<Vec<Received>>,
    script: Mutex<Script>,
}

/// A real HTTP server on loopback recording every request and checking its signature.
pub(crate) struct Receiver {
    pub(crate) addr: SocketAddr,
    state: Arc<ReceiverState>,
    _stop: oneshot::Sender<()>,
}

impl Receiver {
    /// Starts on `addr` (port 0 for any), verifying each path's requests with its secrets.
    pub(crate) async fn start(addr: SocketAddr, secrets: &[(&str, &[&str])]) -> Self {
        let secrets = secrets
            .iter()
            .map(|(path, texts)| {
                let keys = texts
                    .iter()
                    .map(|text| STANDARD.decode(text.trim_start_matches("whsec_")).unwrap())
                    .collect();
                ((*path).to_owned(), keys)
            })
            .collect();
        let state = Arc::new(ReceiverState {
            secrets,
            received: Mutex::new(Vec::new()),
            script: Mutex::new(Arc::new(|_, _| Reply::status(204))),
        });
        let app = axum::Router::new()
            .fallback(receive)
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        Self {
            addr,
            state,
            _stop: stop,
        }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Sets how the receiver answers: `(path, n-th request to that path from 1) -> Reply`.
    pub(crate) fn script(&self, script: impl Fn(&str, usize) -> Reply + Send + Sync + 'static) {
        *self.state.script.lock().unwrap() = Arc::new(script);
    }

    pub(crate) fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    pub(crate) fn received_at(&self, path: &str) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| r.path == path)
            .collect()
    }

    /// Waits until `path` got at least `n` requests.
    pub(crate) async fn wait_for(&self, path: &str, n: usize, timeout: Duration) -> Vec<Received> {
        wait_for(&format!("{n} requests to {path}"), timeout, || async {
            let got = self.received_at(path);
            (got.len() >= n).then_some(got)
        })
        .await
        .unwrap()
    }
}

/// Standard Webhooks verification, written here independently of the crate under test:
/// HMAC-SHA256 over `id.timestamp.body`, base64, compared with each `v1,` entry.
fn secrets_matched(keys: &[Vec<u8>], headers: &HeaderMap, body: &[u8]) -> usize {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let (id, timestamp, signatures) = (
        header("webhook-id"),
        header("webhook-timestamp"),
        header("webhook-signature"),
    );
    let Ok(sent_at) = timestamp.parse::<i64>() else {
        return 0;
    };
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    if (now - sent_at).abs() > 300 {
        return 0;
    }
    keys.iter()
        .filter(|key| {
            let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
            mac.update(format!("{id}.{timestamp}.").as_bytes());
            mac.update(body);
            let expected = format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()));
            signatures.split(' ').any(|entry| entry == expected)
        })
        .count()
}

async fn receive(
    State(state): State<Arc<ReceiverState>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_owned();
    let keys = state.secrets.get(&path).cloned().unwrap_or_default();
    let n_secrets_matched = secrets_matched(&keys, &headers, &body);
    let received = Received {
        path: path.clone(),
        id: headers
            .get("webhook-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned(),
        timestamp: headers
            .get("webhook-timestamp")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned(),
        traceparent: headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        body: String::from_utf8_lossy(&body).into_owned(),
        n_secrets_matched,
        at: Instant::now(),
    };
    let nth = {
        let mut all = state.received.lock().unwrap();
        all.push(received);
        all.iter().filter(|r| r.path == path).count()
    };
    let script = state.script.lock().unwrap().clone();
    let reply = script(&path, nth);
    let mut response = (StatusCode::from_u16(reply.status).unwrap(), reply.body).into_response();
    if let Some(after) = reply.retry_after {
        response
            .headers_mut()
            .insert("retry-after", after.parse().unwrap());
    }
    response
}

// ---------------------------------------------------------------------------------------
// The video worker.

/// How a test video job ends.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Ending {
    #[default]
    Succeed,
    Fail,
}

/// A video job as the queue stores it: like `JobSpec`, it carries an optional `webhook_url`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct VideoJob {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) webhook_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) metadata: Option<serde_json::Value>,
    #[serde(default)]
    pub(crate) ending: Ending,
}

pub(crate) fn video_job(webhook_url: Option<&str>, ending: Ending) -> NewJob {
    NewJob::new(&VideoJob {
        webhook_url: webhook_url.map(str::to_owned),
        metadata: Some(serde_json::json!({"customer": "c_42"})),
        ending,
    })
    .unwrap()
}

async fn video_handler(job: VideoJob, lease: Lease) -> Result<Completion, JobFailure> {
    match job.ending {
        Ending::Succeed => Ok(Completion {
            extras: EventExtras {
                video: Some(StoredVideo {
                    bucket: "videos".into(),
                    key: format!("{}.mp4", lease.job_id()),
                    url: format!("https://s3.example.com/videos/{}.mp4", lease.job_id()),
                    size: 1024,
                    sha256: "00".repeat(32),
                    content_type: "video/mp4".into(),
                }),
                duration_seconds: Some(5),
                provider_run_id: Some("run-1".into()),
                cost_usd: Some(0.7),
            },
            charged_micros: 700_000,
        }),
        Ending::Fail => Err(JobFailure::Fail(klingq_core::JobError {
            step: "generate".into(),
            code: "CONTENT_POLICY_VIOLATION".into(),
            message: "flagged".into(),
            details: vec![],
            cost_committed: false,
        })),
    }
}

/// A running worker (video or webhooks) and how to stop it.
pub(crate) struct Running<T> {
    stop: Option<oneshot::Sender<()>>,
    join: tokio::task::JoinHandle<T>,
}

impl<T> Running<T> {
    pub(crate) async fn stop(mut self) -> T {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.join.await.unwrap()
    }
}

pub(crate) fn spawn_video_worker(queue: &Queue) -> Running<()> {
    let backend = QueueBackend::<VideoJob>::new(
        queue.clone(),
        WorkerOptions {
            consumer: consumer_name("video"),
            concurrency: 4,
        },
    );
    let worker = WorkerBuilder::new(consumer_name("video"))
        .backend(backend)
        .catch_panic()
        .concurrency(4)
        .build(video_handler);
    let (stop, stopped) = oneshot::channel::<()>();
    let signal = async move {
        let _ = stopped.await;
        Ok::<(), std::io::Error>(())
    };
    let run: futures::future::BoxFuture<'static, _> = Box::pin(worker.run_until(signal));
    let join = tokio::spawn(async move {
        run.await.unwrap();
    });
    Running {
        stop: Some(stop),
        join,
    }
}

/// Runs the webhook service as `klingq worker` would.
pub(crate) fn spawn_webhooks(
    queue: &Queue,
    config: WebhookConfig,
) -> Running<Result<(), WebhookError>> {
    let (stop, stopped) = oneshot::channel::<()>();
    let join = tokio::spawn(klingq_events::run_webhooks(
        queue.clone(),
        config,
        async move {
            let _ = stopped.await;
        },
    ));
    Running {
        stop: Some(stop),
        join,
    }
}

// ---------------------------------------------------------------------------------------
// Reading deliveries.

/// Every delivery of the namespace.
pub(crate) async fn all_deliveries(queue: &Queue) -> Vec<DeliverySummary> {
    let mut all = Vec::new();
    let mut query = DeliveryQuery {
        limit: 500,
        ..DeliveryQuery::default()
    };
    loop {
        let page = list_deliveries(queue, &query).await.unwrap();
        all.extend(page.deliveries);
        match page.next_offset {
            Some(offset) => query.offset = offset,
            None => return all,
        }
    }
}

/// Waits for the delivery of the event about `subject` to `endpoint` (redacted URL) to reach
/// `status`.
pub(crate) async fn wait_delivery(
    queue: &Queue,
    subject: &str,
    endpoint: &str,
    status: DeliveryStatus,
    timeout: Duration,
) -> DeliverySummary {
    wait_for(
        &format!("the delivery of {subject} to {endpoint} to be {status:?}"),
        timeout,
        || async {
            all_deliveries(queue)
                .await
                .into_iter()
                .find(|d| d.subject == subject && d.endpoint == endpoint && d.status == status)
        },
    )
    .await
    .unwrap()
}
