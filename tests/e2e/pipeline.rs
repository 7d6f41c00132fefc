//! The worker pipeline end to end: the real worker (library or process) against real Redis,
//! real SeaweedFS and the real simulator over HTTP. Each test checks what a user cares about:
//! every job ends where it should, each succeeded job was charged exactly once, its object's
//! bytes match what the simulator served, and it published exactly one event.

use std::collections::HashMap;
use std::time::Duration;

use klingq_core::{GenerationRequest, JobSpec, JobState};
use klingq_e2e::E2eServices;
use klingq_queue::{JobRecord, NewJob, Queue};
use klingq_sim::{SimConfig, SimHandle};
use klingq_testkit::proxy::TcpProxy;
use klingq_testkit::redis::{redis_url, require_shared_redis, unique_namespace};
use klingq_testkit::seaweed::ensure_seaweedfs;
use klingq_testkit::wait_for;
use sha2::{Digest, Sha256};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;

const WORKER: &str = env!("CARGO_BIN_EXE_klingq-e2e-worker");

pub(crate) struct Env {
    pub(crate) services: E2eServices,
    pub(crate) queue: Queue,
    pub(crate) sim: SimHandle,
    _proxy: Option<TcpProxy>,
}

async fn env(prefix: &str, sim_config: SimConfig, s3_via_proxy: bool) -> (Env, Option<TcpProxy>) {
    require_shared_redis().await.unwrap();
    env_on(redis_url(), prefix, sim_config, s3_via_proxy).await
}

/// The services on the Redis at `redis_url` (a cluster seed, a Sentinel URL).
pub(crate) async fn env_on(
    redis_url: String,
    prefix: &str,
    sim_config: SimConfig,
    s3_via_proxy: bool,
) -> (Env, Option<TcpProxy>) {
    env_partitioned(redis_url, prefix, sim_config, s3_via_proxy, 1).await
}

/// [`env_on`] with a namespace spread over `partitions` partitions.
pub(crate) async fn env_partitioned(
    redis_url: String,
    prefix: &str,
    sim_config: SimConfig,
    s3_via_proxy: bool,
    partitions: u32,
) -> (Env, Option<TcpProxy>) {
    let s3 = ensure_seaweedfs().await.unwrap();
    let bucket = s3.unique_bucket(prefix).await.unwrap();
    let sim = klingq_sim::start_local(sim_config).await.unwrap();
    let proxy = if s3_via_proxy {
        Some(TcpProxy::start(s3.host_port()).await.unwrap())
    } else {
        None
    };
    let s3_endpoint = match &proxy {
        Some(proxy) => format!("http://{}", proxy.addr()),
        None => s3.endpoint_url.clone(),
    };
    let services = E2eServices {
        redis_url,
        namespace: unique_namespace(prefix),
        sim_url: sim.base_url(),
        s3_endpoint,
        s3_access_key: s3.access_key.clone(),
        s3_secret_key: s3.secret_key.clone(),
        bucket,
        partitions,
    };
    let queue = Queue::connect(services.worker_settings().queue)
        .await
        .unwrap();
    (
        Env {
            services,
            queue,
            sim,
            _proxy: None,
        },
        proxy,
    )
}

fn job(prompt: &str) -> NewJob {
    let spec = JobSpec::new(GenerationRequest::new(
        "https://example.com/start.png",
        prompt,
    ));
    let mut new_job = NewJob::new(&spec).unwrap();
    new_job.estimated_micros = 700_000;
    new_job
}

/// Enqueues one job per prompt as the batch `batch` (opened and sealed here).
pub(crate) async fn enqueue_batch(env: &Env, prompts: &[String], batch: &str) -> Vec<String> {
    env.queue
        .open_batch(batch, &serde_json::json!({"source": "e2e"}), 0)
        .await
        .unwrap();
    let jobs: Vec<NewJob> = prompts.iter().map(|p| job(p)).collect();
    let ids = env
        .queue
        .enqueue_many(&jobs, Some(batch))
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    env.queue.seal_batch(batch).await.unwrap();
    ids
}

pub(crate) async fn enqueue(env: &Env, prompts: &[String]) -> Vec<String> {
    let jobs: Vec<NewJob> = prompts.iter().map(|p| job(p)).collect();
    env.queue
        .enqueue_many(&jobs, None)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect()
}

pub(crate) struct InProcessWorker {
    stop: oneshot::Sender<()>,
    join: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl InProcessWorker {
    async fn start(env: &Env) -> Self {
        Self::start_with(env.services.worker_settings()).await
    }

    /// A worker with settings of the test's own (a health port, replica acknowledgements).
    pub(crate) async fn start_with(settings: klingq_worker::WorkerSettings) -> Self {
        let worker = klingq_worker::Worker::connect(settings, Duration::from_secs(10))
            .await
            .unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let join = tokio::spawn(worker.run(async {
            let _ = stopped.await;
        }));
        Self { stop, join }
    }

    pub(crate) async fn stop(self) {
        let _ = self.stop.send(());
        self.join.await.unwrap().unwrap();
    }
}

async fn start_process(env: &Env) -> Child {
    let mut command = Command::new(WORKER);
    command.envs(env.services.to_env());
    klingq_e2e::spawn_ready(command).await
}

pub(crate) async fn wait_terminal(
    queue: &Queue,
    ids: &[String],
    timeout: Duration,
) -> Vec<JobRecord> {
    wait_for("every job to end", timeout, || async {
        let records = queue.jobs(ids).await.ok()?;
        (records.len() == ids.len() && records.iter().all(|r| r.state.is_terminal()))
            .then_some(records)
    })
    .await
    .unwrap()
}

/// Every job succeeded, was charged exactly once, its object's bytes are the simulator's,
/// and it published exactly one success event; its checkpoint has the generation's time.
pub(crate) async fn assert_all_succeeded_once(env: &Env, records: &[JobRecord]) {
    assert_paid_once_and_stored(env, records).await;
    for record in records {
        let checkpoint = record.checkpoint.as_ref().unwrap();
        assert!(
            checkpoint["step_ms"]["generate"].is_u64(),
            "step timings are recorded: {checkpoint}"
        );
    }
}

/// [`assert_all_succeeded_once`] without the step timings, which a checkpoint lost with a
/// failed Redis primary takes with it (the job resumes and pays nothing more, but the time
/// its generation took before is not known any more).
pub(crate) async fn assert_paid_once_and_stored(env: &Env, records: &[JobRecord]) {
    let runs: HashMap<String, klingq_sim::RunRecord> = env
        .sim
        .runs()
        .into_iter()
        .map(|run| (run.id.to_string(), run))
        .collect();
    let mut charges_per_job: HashMap<String, u32> = HashMap::new();
    for charge in env.sim.charges() {
        *charges_per_job
            .entry(charge.client_ref.clone().unwrap_or_default())
            .or_default() += 1;
    }
    let http = reqwest::Client::new();
    for record in records {
        assert_eq!(
            record.state,
            JobState::Succeeded,
            "{}: {:?} {:?}",
            record.id,
            record.reason,
            record.error
        );
        assert_eq!(
            charges_per_job.get(&record.id),
            Some(&1),
            "job {} charged {:?} times",
            record.id,
            charges_per_job.get(&record.id)
        );
        let checkpoint = record.checkpoint.as_ref().unwrap();
        let run_id = checkpoint["provider"]["run_id"].as_str().unwrap();
        let video = &checkpoint["video"];
        let served = runs[run_id].video_sha256.clone().unwrap();
        assert_eq!(video["sha256"].as_str().unwrap(), served);
        let bytes = http
            .get(video["url"].as_str().unwrap())
            .send()
            .await
            .unwrap()
            .error_for_status()
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(
            hex::encode(Sha256::digest(&bytes)),
            served,
            "stored bytes differ"
        );
        assert_eq!(
            video["key"].as_str().unwrap(),
            format!("videos/{}.mp4", record.id)
        );
    }
    assert_eq!(
        env.sim.charges().len(),
        records.len(),
        "one charge per job, no more"
    );
    let events = env.queue.read_events("0", 100_000, None).await.unwrap();
    let mut events_per_job: HashMap<String, u32> = HashMap::new();
    for event in events.iter().filter(|e| e.event_type == "job.succeeded") {
        let body: serde_json::Value = serde_json::from_str(&event.body).unwrap();
        *events_per_job
            .entry(body["data"]["job_id"].as_str().unwrap().to_owned())
            .or_default() += 1;
        assert!(body["data"]["video"]["sha256"].is_string());
        assert_eq!(body["data"]["cost_usd"], 0.7);
    }
    for record in records {
        assert_eq!(
            events_per_job.get(&record.id),
            Some(&1),
            "events of {}",
            record.id
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_fifty_jobs() {
    let (env, _) = env("happy", SimConfig::fast(), false).await;
    let ids = enqueue(
        &env,
        &(0..50)
            .map(|n| format!("a calm lake, take {n}"))
            .collect::<Vec<_>>(),
    )
    .await;
    let worker = InProcessWorker::start(&env).await;
    let records = wait_terminal(&env.queue, &ids, Duration::from_secs(90)).await;
    worker.stop().await;
    assert_all_succeeded_once(&env, &records).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_recover_without_paying_twice() {
    let (env, _) = env("faults", SimConfig::fast(), false).await;
    let prompts: Vec<String> = [
        "[[sim:lost-response]]",
        "[[sim:504-after-create]]",
        "[[sim:429]]",
        "[[sim:503]]",
        "[[sim:download-reset]]",
        "[[sim:download-expired]]",
        "[[sim:download-short]]",
        "[[sim:flaky-poll]]",
    ]
    .iter()
    .enumerate()
    .map(|(n, token)| format!("scene {n} {token}"))
    .collect();
    let ids = enqueue(&env, &prompts).await;
    let worker = InProcessWorker::start(&env).await;
    let records = wait_terminal(&env.queue, &ids, Duration::from_secs(120)).await;
    worker.stop().await;
    assert_all_succeeded_once(&env, &records).await;
    let stats = env.sim.stats();
    for fault in [
        "lost-response",
        "504-after-create",
        "download-reset",
        "download-expired",
    ] {
        assert!(
            stats.faults_injected.get(fault).copied().unwrap_or(0) >= 1,
            "{fault} was not exercised: {:?}",
            stats.faults_injected
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_unreachable_for_a_while_then_back() {
    let (env, proxy) = env("s3down", SimConfig::fast(), true).await;
    let proxy = proxy.unwrap();
    let worker = InProcessWorker::start(&env).await;
    proxy.set_down(true);
    let ids = enqueue(
        &env,
        &(0..5)
            .map(|n| format!("storage outage {n}"))
            .collect::<Vec<_>>(),
    )
    .await;
    // The uploads fail and are retried through the delayed set while S3 is away.
    wait_for("an upload retry", Duration::from_secs(60), || async {
        let records = env.queue.jobs(&ids).await.ok()?;
        records
            .iter()
            .any(|r| {
                r.checkpoint
                    .as_ref()
                    .is_some_and(|c| c["step_retries"]["download"].as_u64().unwrap_or(0) >= 1)
            })
            .then_some(())
    })
    .await
    .unwrap();
    proxy.set_down(false);
    let records = wait_terminal(&env.queue, &ids, Duration::from_secs(120)).await;
    worker.stop().await;
    assert_all_succeeded_once(&env, &records).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moderation_fails_the_job_with_the_provider_code_and_no_charge() {
    let (env, _) = env("moderation", SimConfig::fast(), false).await;
    let ids = enqueue(&env, &["a flagged scene [[sim:moderation]]".to_owned()]).await;
    let worker = InProcessWorker::start(&env).await;
    let records = wait_terminal(&env.queue, &ids, Duration::from_secs(60)).await;
    worker.stop().await;
    let record = &records[0];
    assert_eq!(record.state, JobState::Failed);
    let error = record.error.as_ref().unwrap();
    assert_eq!(error.code, "CONTENT_POLICY_VIOLATION");
    assert_eq!(error.step, "generate");
    assert!(!error.cost_committed);
    assert!(env.sim.charges().is_empty());
    let events = env.queue.read_events("0", 100, None).await.unwrap();
    assert_eq!(
        events
            .iter()
            .filter(|e| e.event_type == "job.failed")
            .count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_error_that_echoes_the_api_key_is_scrubbed_from_record_and_event() {
    let (env, _) = env("echo-auth", SimConfig::fast(), false).await;
    let ids = enqueue(&env, &["an echoing provider [[sim:echo-auth]]".to_owned()]).await;
    let worker = InProcessWorker::start(&env).await;
    let records = wait_terminal(&env.queue, &ids, Duration::from_secs(60)).await;
    worker.stop().await;
    let record = &records[0];
    assert_eq!(record.state, JobState::Failed);
    let error = record.error.as_ref().unwrap();
    assert_eq!(error.code, "INVALID_REQUEST");
    assert!(
        error.message.contains("Authorization: Bearer [redacted]"),
        "{}",
        error.message
    );
    assert!(!error.message.contains("e2e-key"), "{}", error.message);
    let events = env.queue.read_events("0", 100, None).await.unwrap();
    let failed: Vec<_> = events
        .iter()
        .filter(|e| e.event_type == "job.failed")
        .collect();
    assert_eq!(failed.len(), 1);
    assert!(failed[0].body.contains("[redacted]"), "{}", failed[0].body);
    assert!(!failed[0].body.contains("e2e-key"), "{}", failed[0].body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_credit_pauses_submissions_until_credit_returns() {
    let (env, _) = env("credit", SimConfig::fast(), false).await;
    env.sim.set_balance_usd(0.0);
    let ids = enqueue(
        &env,
        &(0..4).map(|n| format!("credit {n}")).collect::<Vec<_>>(),
    )
    .await;
    let worker = InProcessWorker::start(&env).await;
    wait_for("submissions to pause", Duration::from_secs(30), || async {
        env.queue
            .pause_reason(klingq_worker::pipeline::CREDIT_PAUSE)
            .await
            .ok()
            .flatten()
    })
    .await
    .unwrap();
    // Jobs wait; none fails for it.
    let waiting = env.queue.jobs(&ids).await.unwrap();
    assert!(
        waiting.iter().all(|r| !r.state.is_terminal()),
        "{:?}",
        waiting.iter().map(|r| r.state).collect::<Vec<_>>()
    );
    env.sim.set_balance_usd(1_000.0);
    let records = wait_terminal(&env.queue, &ids, Duration::from_secs(60)).await;
    worker.stop().await;
    assert_all_succeeded_once(&env, &records).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_generating_then_restart_pays_once() {
    let sim_config = SimConfig {
        time_scale: 0.03,
        ..SimConfig::fast()
    };
    let (env, _) = env("kill9", sim_config, false).await;
    let ids = enqueue(
        &env,
        &(0..6)
            .map(|n| format!("long scene {n}"))
            .collect::<Vec<_>>(),
    )
    .await;
    let mut doomed = start_process(&env).await;
    wait_for(
        "all runs to be generating",
        Duration::from_secs(30),
        || async {
            let records = env.queue.jobs(&ids).await.ok()?;
            records
                .iter()
                .all(|r| r.state == JobState::Generating)
                .then_some(())
        },
    )
    .await
    .unwrap();
    doomed.kill().await.unwrap();
    let runs_before = env.sim.runs().len();
    let mut survivor = start_process(&env).await;
    let records = wait_terminal(&env.queue, &ids, Duration::from_secs(120)).await;
    survivor.kill().await.unwrap();
    assert_eq!(
        env.sim.runs().len(),
        runs_before,
        "the restarted worker created no run"
    );
    assert_all_succeeded_once(&env, &records).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_zero_and_the_rest_finish_on_restart() {
    let sim_config = SimConfig {
        time_scale: 0.03,
        ..SimConfig::fast()
    };
    let (env, _) = env("sigterm", sim_config, false).await;
    let ids = enqueue(
        &env,
        &(0..6).map(|n| format!("graceful {n}")).collect::<Vec<_>>(),
    )
    .await;
    let child = start_process(&env).await;
    wait_for("runs to be generating", Duration::from_secs(30), || async {
        let records = env.queue.jobs(&ids).await.ok()?;
        records
            .iter()
            .any(|r| r.state == JobState::Generating)
            .then_some(())
    })
    .await
    .unwrap();
    let pid = child.id().unwrap();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let output = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("the worker did not exit after SIGTERM")
        .unwrap();
    assert_eq!(output.status.code(), Some(0));
    // Nothing lost: every job is either done or waiting to resume.
    let records = env.queue.jobs(&ids).await.unwrap();
    assert_eq!(records.len(), ids.len());
    let mut restarted = start_process(&env).await;
    let records = wait_terminal(&env.queue, &ids, Duration::from_secs(120)).await;
    restarted.kill().await.unwrap();
    assert_all_succeeded_once(&env, &records).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budgets_hold_jobs_over_them_as_scheduled() {
    let (env, _) = env("budget", SimConfig::fast(), false).await;
    // A batch budget of $1.40 pays for two 5-second jobs at $0.14/s; the other two must wait.
    let batch = klingq_core::JobId::new().to_string();
    env.queue
        .open_batch(&batch, &serde_json::json!({}), 1_400_000)
        .await
        .unwrap();
    let jobs: Vec<NewJob> = (0..4).map(|n| job(&format!("budgeted {n}"))).collect();
    let ids: Vec<String> = env
        .queue
        .enqueue_many(&jobs, Some(&batch))
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    env.queue.seal_batch(&batch).await.unwrap();
    let worker = InProcessWorker::start(&env).await;
    let records = wait_for(
        "two jobs done and two held by the budget",
        Duration::from_secs(60),
        || async {
            let records = env.queue.jobs(&ids).await.ok()?;
            let succeeded = records
                .iter()
                .filter(|r| r.state == JobState::Succeeded)
                .count();
            let held = records
                .iter()
                .filter(|r| {
                    r.state == JobState::Scheduled
                        && r.reason
                            .as_deref()
                            .is_some_and(|reason| reason.contains("batch budget"))
                })
                .count();
            (succeeded == 2 && held == 2).then_some(records)
        },
    )
    .await
    .unwrap();
    worker.stop().await;
    assert_eq!(
        env.sim.charges().len(),
        2,
        "jobs over the budget were never submitted"
    );
    assert!(
        records.iter().all(|r| r.error.is_none()),
        "waiting is not failing"
    );
}

/// Parses Prometheus text into (name with labels, value), failing on a malformed sample line.
fn parse_prometheus(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| {
            let (name, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad sample line {line:?}"));
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}"));
            (name.to_owned(), value)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_metrics_parse_and_carry_every_named_metric() {
    let (env, _) = env("metrics", SimConfig::fast(), false).await;
    let port = klingq_testkit::redis::free_port();
    let mut settings = env.services.worker_settings();
    settings.worker.health_bind = format!("127.0.0.1:{port}");
    let worker = InProcessWorker::start_with(settings).await;
    let ids = enqueue(
        &env,
        &(0..3).map(|n| format!("measured {n}")).collect::<Vec<_>>(),
    )
    .await;
    wait_terminal(&env.queue, &ids, Duration::from_secs(60)).await;
    let http = reqwest::Client::new();
    let ready = http
        .get(format!("http://127.0.0.1:{port}/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let text = http
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // Prometheus asks for OpenMetrics, and gets it.
    let open = http
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .header(
            "accept",
            "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.3",
        )
        .send()
        .await
        .unwrap();
    assert!(
        open.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text; version=1.0.0")
    );
    let open = open.text().await.unwrap();
    worker.stop().await;
    assert!(open.ends_with("# EOF\n"), "{open}");
    assert!(
        open.contains("# TYPE klingq_job_attempts counter\n"),
        "{open}"
    );
    assert!(!text.contains("# EOF"), "{text}");
    let samples = parse_prometheus(&text);
    assert!(
        samples.iter().any(|(sample, value)| *sample
            == format!(
                "klingq_build_info{{version=\"{}\",role=\"worker\"}}",
                env!("CARGO_PKG_VERSION")
            )
            && *value == 1.0),
        "klingq_build_info missing from:\n{text}"
    );
    for name in [
        "klingq_queue_jobs{queue=\"videos\",state=\"waiting\"}",
        "klingq_queue_oldest_waiting_seconds{queue=\"videos\"}",
        "klingq_jobs_finished_total{outcome=\"succeeded\"}",
        "klingq_step_duration_seconds_count{step=\"generate\"}",
        "klingq_spend_usd_total{kind=\"charged\"}",
        "klingq_spend_usd_total{kind=\"estimated\"}",
        "klingq_webhook_deliveries_total{outcome=\"succeeded\"}",
        "klingq_provider_limit_cap",
        "klingq_bytes_rehosted_total",
        "klingq_provider_slot_releases_pending",
        "klingq_provider_slot_releases_deferred_total",
        "klingq_redis_errors_total{kind=\"connection\"}",
        "klingq_redis_errors_total{kind=\"moved\"}",
        "klingq_redis_errors_total{kind=\"clusterdown\"}",
        "klingq_redis_errors_total{kind=\"noprimary\"}",
        "klingq_jobs_parked{queue=\"videos\"}",
        "klingq_provider_finish_lag_seconds_count",
    ] {
        assert!(
            samples.iter().any(|(sample, _)| sample == name),
            "{name} missing from:\n{text}"
        );
    }
    let value = |name: &str| {
        samples
            .iter()
            .find(|(s, _)| s == name)
            .map(|(_, v)| *v)
            .unwrap()
    };
    assert_eq!(
        value("klingq_jobs_finished_total{outcome=\"succeeded\"}"),
        3.0
    );
    assert!((value("klingq_spend_usd_total{kind=\"charged\"}") - 2.1).abs() < 1e-9);
    // Every finished run's completion was learned once, by a poll or a callback.
    assert_eq!(value("klingq_provider_finish_lag_seconds_count"), 3.0);
    assert_eq!(value("klingq_jobs_parked{queue=\"videos\"}"), 0.0);
    assert!(
        samples.iter().any(|(s, v)| s
            .starts_with("klingq_provider_requests_total{operation=\"create\"")
            && *v >= 3.0),
        "provider requests missing:\n{text}"
    );
}
