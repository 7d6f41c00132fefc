//! What the dashboard's job page reads, end to end: `klingq serve` and `klingq worker` as
//! processes against real Redis, SeaweedFS and the simulator. A job's view carries its
//! timeline (each state with its attempt, a retry with its reason) and step timings;
//! `GET /v1/jobs/{id}/video` hands out a fresh link that serves the stored video; the
//! deliveries list filters by job.

use std::process::Stdio;
use std::time::Duration;

use klingq_testkit::redis::{redis_url, require_shared_redis, unique_namespace};
use klingq_testkit::seaweed::ensure_seaweedfs;
use klingq_testkit::wait_for;
use serde_json::{Value, json};
use tokio::process::{Child, Command};

const WAIT: Duration = Duration::from_secs(90);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn get(client: &reqwest::Client, url: String) -> (u16, Value) {
    let response = client.get(url).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Enqueues one job through the API; its id.
async fn enqueue(client: &reqwest::Client, api: &str, prompt: &str, hook_url: &str) -> String {
    let created: Value = client
        .post(format!("{api}/v1/jobs"))
        .json(&json!({"start_image_url": "https://example.com/a.png",
            "prompt": prompt, "webhook_url": hook_url}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    created["id"].as_str().unwrap().to_owned()
}

/// The states of a job view's timeline, in order.
fn states(view: &Value) -> Vec<&str> {
    view["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| entry["state"].as_str().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jobs_page_has_its_timeline_a_playable_video_and_its_deliveries() {
    require_shared_redis().await.unwrap();
    let s3 = ensure_seaweedfs().await.unwrap();
    let bucket = s3.unique_bucket("jobpage").await.unwrap();
    let sim = klingq_sim::start_local(klingq_sim::SimConfig::fast())
        .await
        .unwrap();
    let namespace = unique_namespace("jobpage");
    let api_port = free_port();
    let api = format!("http://127.0.0.1:{api_port}");
    // Webhooks go to a port nothing listens on: each delivery exists, and keeps failing.
    let hook_url = format!("http://127.0.0.1:{}/hook", free_port());
    let spawn = |args: &[&str]| -> Child {
        Command::new(env!("CARGO_BIN_EXE_klingq"))
            .args(args)
            .env_remove("KLINGQ_CONFIG")
            .env("KLINGQ_REDIS_URL", redis_url())
            .env("KLINGQ_NAMESPACE", &namespace)
            .env("RUST_LOG", "warn")
            .env("KLINGQ_PROVIDER_BASE_URL", sim.base_url())
            .env("RUNFLOW_API_KEY", "job-page-key")
            .env("KLINGQ_S3_ENDPOINT", &s3.endpoint_url)
            .env("KLINGQ_S3_BUCKET", &bucket)
            .env("KLINGQ_S3_FORCE_PATH_STYLE", "true")
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
            .env("KLINGQ_PROMOTE_INTERVAL_MS", "50")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    };
    let _serve = spawn(&["serve", "--bind", &format!("127.0.0.1:{api_port}")]);
    let _worker = spawn(&["worker"]);
    let client = reqwest::Client::new();
    wait_for("the API to answer", WAIT, || {
        let request = client.get(format!("{api}/healthz"));
        async move {
            request
                .send()
                .await
                .ok()
                .filter(|r| r.status().is_success())
        }
    })
    .await
    .unwrap();

    // One job whose creates answer 503 six times: more than one attempt's in-call retries
    // (5), so the job is retried, then succeeds.
    let id = enqueue(&client, &api, "a page of its own [[sim:503:6]]", &hook_url).await;
    let view = wait_for("the job to succeed", WAIT, || {
        let client = client.clone();
        let url = format!("{api}/v1/jobs/{id}");
        async move {
            let (_, view) = get(&client, url).await;
            (view["state"] == "succeeded").then_some(view)
        }
    })
    .await
    .unwrap();

    // The timeline: created, the failed create's retry (with why), the steps, the outcome.
    let timeline = states(&view);
    assert_eq!(timeline.first(), Some(&"queued"), "{view:#}");
    assert_eq!(timeline.last(), Some(&"succeeded"), "{view:#}");
    let retry = view["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .find(|entry| entry["state"] == "scheduled")
        .unwrap_or_else(|| panic!("the retry is on the timeline: {view:#}"));
    assert!(
        retry["reason"]
            .as_str()
            .unwrap()
            .starts_with("submit retry 1/"),
        "{retry}"
    );
    let retry_attempt = retry["attempt"].as_u64().unwrap();
    assert!(
        view["timeline"]
            .as_array()
            .unwrap()
            .iter()
            .any(|entry| entry["attempt"].as_u64().unwrap() > retry_attempt),
        "the next attempt's states carry its number: {view:#}"
    );
    for step in ["generating", "downloading", "publishing"] {
        assert!(timeline.contains(&step), "{step} missing: {timeline:?}");
    }
    // RFC 3339 with the fraction's trailing zeros dropped: padded to milliseconds to compare.
    let times: Vec<String> = view["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| {
            let at = entry["at"].as_str().unwrap().trim_end_matches('Z');
            let (seconds, fraction) = at.split_once('.').unwrap_or((at, ""));
            format!("{seconds}.{fraction:0<3}Z")
        })
        .collect();
    assert!(
        times.windows(2).all(|pair| pair[0] <= pair[1]),
        "in time order: {times:?}"
    );
    assert!(view["step_ms"]["generate"].is_u64(), "{view:#}");

    // A fresh link to the video serves the stored bytes.
    let (status, link) = get(&client, format!("{api}/v1/jobs/{id}/video")).await;
    assert_eq!(status, 200, "{link}");
    assert!(link["expires_at"].is_string(), "a presigned link: {link}");
    let video = client
        .get(link["url"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(video.status(), 200);
    assert_eq!(video.headers()["content-type"], "video/mp4");
    let bytes = video.bytes().await.unwrap();
    assert_eq!(bytes.len() as u64, view["video"]["size"].as_u64().unwrap());
    assert_eq!(link["size"], view["video"]["size"]);
    let (status, missing) = get(
        &client,
        format!("{api}/v1/jobs/0190d0a1-0000-7000-8000-000000000000/video"),
    )
    .await;
    assert_eq!(status, 404, "{missing}");

    // The job's deliveries, and only its.
    let other_id = enqueue(&client, &api, "another", &hook_url).await;
    wait_for("the other job's delivery", WAIT, || {
        let client = client.clone();
        let url = format!("{api}/v1/webhooks/deliveries?job_id={other_id}");
        async move {
            let (_, page) = get(&client, url).await;
            (!page["deliveries"].as_array()?.is_empty()).then_some(())
        }
    })
    .await
    .unwrap();
    let (status, page) = get(&client, format!("{api}/v1/webhooks/deliveries?job_id={id}")).await;
    assert_eq!(status, 200, "{page}");
    let deliveries = page["deliveries"].as_array().unwrap();
    assert!(!deliveries.is_empty(), "{page}");
    assert!(
        deliveries.iter().all(|d| d["subject"] == id.as_str()),
        "{page:#}"
    );
    let (status, error) = get(
        &client,
        format!("{api}/v1/webhooks/deliveries?job_id=not-a-job"),
    )
    .await;
    assert_eq!(status, 422, "{error}");
    assert_eq!(error["error"]["details"][0]["path"], "job_id", "{error}");
}
