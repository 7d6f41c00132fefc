//! One trace per job, across processes: `klingq serve` enqueues, `klingq worker` runs the job
//! and delivers its webhook, and both export their spans over OTLP/HTTP to a collector in this
//! test. The trace context rides in the job through Redis; the webhook carries it on.
//! Real Redis, SeaweedFS, simulator, API and worker processes.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::post;
use klingq_testkit::redis::{free_port, redis_url, require_shared_redis, unique_namespace};
use klingq_testkit::seaweed::ensure_seaweedfs;
use klingq_testkit::wait_for;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value;
use prost::Message;
use serde_json::{Value, json};
use tokio::process::{Child, Command};

const WAIT: Duration = Duration::from_secs(60);
/// The caller's context on the single job: W3C's example trace.
const CALLER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

/// One span as the collector received it.
#[derive(Debug, Clone)]
struct Span {
    service: String,
    name: String,
    kind: i32,
    trace_id: String,
    span_id: String,
    parent: String,
    /// `trace_id/span_id` of each link.
    links: Vec<String>,
}

#[derive(Default)]
struct Seen {
    spans: Mutex<Vec<Span>>,
    /// Webhooks: the `traceparent` header and the body.
    hooks: Mutex<Vec<(Option<String>, Value)>>,
}

async fn collect(State(seen): State<Arc<Seen>>, body: Bytes) -> Vec<u8> {
    let request = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf request");
    let mut spans = seen.spans.lock().unwrap();
    for resource in request.resource_spans {
        let service = resource
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|kv| kv.key == "service.name")
            .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                any_value::Value::StringValue(name) => Some(name.clone()),
                _ => None,
            })
            .unwrap_or_default();
        for scope in resource.scope_spans {
            for span in scope.spans {
                spans.push(Span {
                    service: service.clone(),
                    name: span.name,
                    kind: span.kind,
                    trace_id: hex::encode(span.trace_id),
                    span_id: hex::encode(span.span_id),
                    parent: hex::encode(span.parent_span_id),
                    links: span
                        .links
                        .iter()
                        .map(|l| {
                            format!("{}/{}", hex::encode(&l.trace_id), hex::encode(&l.span_id))
                        })
                        .collect(),
                });
            }
        }
    }
    ExportTraceServiceResponse::default().encode_to_vec()
}

async fn hook(State(seen): State<Arc<Seen>>, headers: HeaderMap, body: Bytes) -> &'static str {
    let traceparent = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = serde_json::from_slice(&body).expect("a JSON webhook");
    seen.hooks.lock().unwrap().push((traceparent, body));
    "ok"
}

/// The collector (`/v1/traces`) and the webhook receiver (`/hook`) on one local server.
async fn start_receiver(seen: Arc<Seen>) -> String {
    let app = Router::new()
        .route("/v1/traces", post(collect))
        .route("/hook", post(hook))
        .with_state(seen);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    base
}

struct Processes {
    children: Vec<Child>,
    worker_log: PathBuf,
}

impl Processes {
    /// SIGTERM to each, then wait: a clean exit exports the spans still buffered.
    async fn stop(mut self) {
        for child in &mut self.children {
            if let Some(pid) = child.id() {
                let _ = std::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status();
            }
        }
        for child in &mut self.children {
            let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
                .await
                .expect("exits within 30 s after SIGTERM")
                .unwrap();
            assert!(status.success(), "{status}");
        }
    }
}

/// Sends `request` and reads its JSON answer.
async fn json_of(request: reqwest::RequestBuilder) -> Value {
    request.send().await.unwrap().json().await.unwrap()
}

/// The built `klingq` with `args`, in `namespace` on the shared Redis, exporting spans to
/// `collector` every 100 ms (rather than every 5 s), logging warnings only: logs are filtered,
/// spans are exported regardless.
fn klingq(args: &[&str], namespace: &str, collector: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_klingq"));
    command
        .args(args)
        .env_remove("KLINGQ_CONFIG")
        .env("KLINGQ_REDIS_URL", redis_url())
        .env("KLINGQ_NAMESPACE", namespace)
        .env("KLINGQ_OTLP_ENDPOINT", collector)
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

fn span<'a>(spans: &'a [Span], what: &str, test: impl Fn(&Span) -> bool) -> &'a Span {
    spans
        .iter()
        .find(|s| test(s))
        .unwrap_or_else(|| panic!("no span {what} among {spans:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_job_is_one_trace_from_enqueue_to_webhook_across_processes() {
    require_shared_redis().await.unwrap();
    let s3 = ensure_seaweedfs().await.unwrap();
    let bucket = s3.unique_bucket("trace").await.unwrap();
    let sim = klingq_sim::start_local(klingq_sim::SimConfig::fast())
        .await
        .unwrap();
    let seen = Arc::new(Seen::default());
    let receiver = start_receiver(seen.clone()).await;
    let namespace = unique_namespace("trace");
    let api_port = free_port();
    let api = format!("http://127.0.0.1:{api_port}");
    let dir = std::env::temp_dir().join(format!("klingq-trace-{namespace}"));
    std::fs::create_dir_all(&dir).unwrap();
    let worker_log = dir.join("worker.log");

    let command = |args: &[&str]| {
        let mut command = klingq(args, &namespace, &receiver);
        command
            .env_remove("OTEL_SERVICE_NAME")
            .env("KLINGQ_PROVIDER_BASE_URL", sim.base_url())
            .env("RUNFLOW_API_KEY", "trace-key")
            .env("KLINGQ_S3_ENDPOINT", &s3.endpoint_url)
            .env("KLINGQ_S3_BUCKET", &bucket)
            .env("KLINGQ_S3_FORCE_PATH_STYLE", "true")
            // The simulator serves its videos on loopback (refused by the SSRF guard otherwise).
            .env("KLINGQ_DOWNLOAD_ALLOW_CIDRS", "127.0.0.0/8")
            .env("AWS_ACCESS_KEY_ID", &s3.access_key)
            .env("AWS_SECRET_ACCESS_KEY", &s3.secret_key)
            .env("AWS_REGION", &s3.region)
            .env(
                "KLINGQ_WEBHOOK_SECRET",
                "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            )
            .env("KLINGQ_WEBHOOK_ALLOW_CIDRS", "127.0.0.1/32")
            .env("KLINGQ_WORKER_HEALTH_BIND", "")
            .env("KLINGQ_BLOCK_TIMEOUT_MS", "200")
            .env("KLINGQ_PROMOTE_INTERVAL_MS", "50");
        command
    };
    let serve = command(&["serve", "--bind", &format!("127.0.0.1:{api_port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The worker's JSON logs, at info, to check they carry the trace id.
    let worker = command(&["worker", "--log-format", "json"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&worker_log).unwrap())
        .spawn()
        .unwrap();
    let processes = Processes {
        children: vec![serve, worker],
        worker_log,
    };
    let client = reqwest::Client::new();
    wait_for("the API to answer", WAIT, || {
        let client = client.clone();
        let url = format!("{api}/healthz");
        async move {
            client
                .get(url)
                .send()
                .await
                .ok()
                .filter(|r| r.status().is_success())
        }
    })
    .await
    .unwrap();

    // One job continuing the caller's trace, and a batch of two.
    let hook_url = format!("{receiver}/hook");
    let single = json_of(
        client
            .post(format!("{api}/v1/jobs"))
            .header("traceparent", format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01"))
            .json(
                &json!({"start_image_url": "https://example.com/a.png", "prompt": "traced",
                "webhook_url": hook_url}),
            ),
    )
    .await;
    let batch = json_of(
        client
            .post(format!("{api}/v1/batches?webhook_url={hook_url}"))
            .json(&json!([
                {"start_image_url": "https://example.com/b.png", "prompt": "batch one"},
                {"start_image_url": "https://example.com/c.png", "prompt": "batch two"},
            ])),
    )
    .await;
    let page = json_of(client.get(format!(
        "{api}/v1/batches/{}/jobs",
        batch["id"].as_str().unwrap()
    )))
    .await;
    let mut jobs = vec![single["id"].as_str().unwrap().to_owned()];
    jobs.extend(
        page["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["id"].as_str().unwrap().to_owned()),
    );
    assert_eq!(jobs.len(), 3, "{page}");

    // Each job's succeeded webhook arrives with a traceparent.
    let hooks = wait_for("a job.succeeded webhook per job", WAIT, || {
        let seen = seen.clone();
        let jobs = jobs.clone();
        async move {
            let hooks = seen.hooks.lock().unwrap().clone();
            let done: HashSet<&str> = hooks
                .iter()
                .filter(|(_, body)| body["type"] == "job.succeeded")
                .filter_map(|(_, body)| body["data"]["job_id"].as_str())
                .collect();
            jobs.iter()
                .all(|id| done.contains(id.as_str()))
                .then_some(hooks)
        }
    })
    .await
    .unwrap();
    let mut traces = Vec::new();
    for id in &jobs {
        let view = json_of(client.get(format!("{api}/v1/jobs/{id}"))).await;
        assert_eq!(view["state"], "succeeded", "{view}");
        traces.push(view["trace_id"].as_str().unwrap().to_owned());
    }
    assert_eq!(
        traces[0], CALLER_TRACE,
        "the single job continues the caller's trace"
    );
    assert_eq!(traces.iter().collect::<HashSet<_>>().len(), 3, "{traces:?}");

    // Every process's spans reach the collector once it has flushed.
    let spans = wait_for("each job's spans at the collector", WAIT, || {
        let seen = seen.clone();
        let traces = traces.clone();
        async move {
            let spans = seen.spans.lock().unwrap().clone();
            traces
                .iter()
                .all(|trace| {
                    let names: HashSet<&str> = spans
                        .iter()
                        .filter(|s| &s.trace_id == trace)
                        .map(|s| s.name.as_str())
                        .collect();
                    [
                        "enqueue",
                        "job",
                        "submit",
                        "generate",
                        "download",
                        "webhook_delivery",
                    ]
                    .iter()
                    .all(|name| names.contains(name))
                })
                .then_some(spans)
        }
    })
    .await
    .unwrap();

    let batch_span = span(&spans, "enqueue_batch", |s| {
        s.name == "enqueue_batch" && s.service == "klingq-api"
    });
    for (n, (id, trace)) in jobs.iter().zip(&traces).enumerate() {
        let in_trace: Vec<Span> = spans
            .iter()
            .filter(|s| &s.trace_id == trace)
            .cloned()
            .collect();
        // The API's enqueue span: a child of the caller's span for the single job; the root
        // of its own trace, linked to the batch's enqueue, for a batch job.
        let enqueue = span(&in_trace, "enqueue", |s| s.name == "enqueue");
        assert_eq!(enqueue.service, "klingq-api");
        assert_eq!(enqueue.kind, 4, "producer"); // SPAN_KIND_PRODUCER
        if n == 0 {
            assert_eq!(enqueue.parent, CALLER_SPAN);
        } else {
            assert!(enqueue.parent.is_empty(), "{enqueue:?}");
            assert_eq!(
                enqueue.links,
                vec![format!("{}/{}", batch_span.trace_id, batch_span.span_id)]
            );
        }
        // The worker's attempts (a parked generation is taken up again in a new one) are the
        // enqueue span's children, and every step is one of the attempts'.
        let attempts: Vec<&Span> = in_trace.iter().filter(|s| s.name == "job").collect();
        assert!(!attempts.is_empty(), "no attempt span for job {id}");
        for attempt in &attempts {
            assert_eq!(attempt.service, "klingq-worker");
            assert_eq!(attempt.parent, enqueue.span_id, "job {id}");
        }
        for step in ["submit", "generate", "download"] {
            let step_span = span(&in_trace, step, |s| s.name == step);
            assert!(
                attempts.iter().any(|a| a.span_id == step_span.parent),
                "{step} of {id}: its parent is none of the job's attempts"
            );
        }
        // The webhook delivery continues the job's trace, and its header names that span.
        let delivery = span(&in_trace, "webhook_delivery", |s| {
            s.name == "webhook_delivery"
        });
        assert_eq!(delivery.service, "klingq-worker");
        assert_eq!(delivery.parent, enqueue.span_id);
        let header = hooks
            .iter()
            .find(|(_, body)| {
                body["type"] == "job.succeeded" && body["data"]["job_id"] == id.as_str()
            })
            .and_then(|(traceparent, _)| traceparent.clone())
            .expect("the webhook has a traceparent header");
        assert_eq!(header, format!("00-{trace}-{}-01", delivery.span_id));
    }

    // The worker's log lines of a job carry its trace id.
    let logs = std::fs::read_to_string(&processes.worker_log).unwrap();
    let traced_lines = logs
        .lines()
        .filter(|line| line.contains(&format!("\"trace_id\":\"{}\"", traces[0])))
        .count();
    assert!(traced_lines > 0, "no log line with the trace id:\n{logs}");

    processes.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_collector_costs_spans_not_jobs() {
    require_shared_redis().await.unwrap();
    let namespace = unique_namespace("trace-down");
    let dir = std::env::temp_dir().join(format!("klingq-trace-down-{namespace}"));
    // Nothing listens there: every export fails.
    let collector = format!("http://127.0.0.1:{}", free_port());
    let output = klingq(
        &["demo", "--jobs", "3", "--bind", "127.0.0.1:0", "--data-dir"],
        &namespace,
        &collector,
    )
    .arg(dir.join("s3"))
    .env_remove("RUNFLOW_API_KEY")
    .output()
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{}\n{stdout}\n{stderr}",
        output.status
    );
    assert!(stdout.contains("3 of 3 succeeded"), "{stdout}");
    // The failed exports are reported.
    assert!(stderr.contains("export failed"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}
