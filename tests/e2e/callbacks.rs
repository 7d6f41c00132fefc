//! Runflow's callbacks end to end: the simulator signs and sends a callback when a run ends,
//! `klingq serve`'s route (in this process) verifies it and wakes the parked job, and the
//! worker reads the run before acting. Where the polls are set a minute apart, a job that
//! finishes well within the test's deadline was woken by its callback, not by a poll. Lost, duplicated and badly signed callbacks change nothing but the speed: polling
//! stays the safety net, and every job still pays once and is re-hosted.

use std::time::Duration;

use klingq_core::{CostModel, JobState, Secret};
use klingq_producer::{ApiConfig, ApiState, Producer, ProviderCallbackMetrics};
use klingq_sim::SimConfig;
use klingq_testkit::redis::{redis_url, require_shared_redis};
use klingq_testkit::wait_for;
use tokio::sync::oneshot;

use crate::pipeline::{
    Env, InProcessWorker, assert_all_succeeded_once, enqueue, env_partitioned, wait_terminal,
};

const SECRET: &str = "whsec_e2e_callbacks";

/// The API in this process, serving the callback route with `secret`.
struct Api {
    url: String,
    metrics: ProviderCallbackMetrics,
    _stop: oneshot::Sender<()>,
}

async fn start_api(env: &Env, secret: &str) -> Api {
    let producer = Producer::new(env.queue.clone(), CostModel::default());
    let config = ApiConfig {
        callback_secrets: vec![Secret::new(secret)],
        ..ApiConfig::default()
    };
    let state = ApiState::new(producer, config);
    let metrics = state.callback_metrics();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "http://{}/v1/provider/callbacks/runflow",
        listener.local_addr().unwrap()
    );
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(klingq_producer::serve(listener, state, async {
        let _ = stopped.await;
    }));
    Api {
        url,
        metrics,
        _stop: stop,
    }
}

/// Services, the API and a worker whose polls of a parked run are `poll_floor` apart at the
/// least; callbacks from the simulator go to the API.
async fn setup(
    prefix: &str,
    sim: SimConfig,
    api_secret: &str,
    poll_floor: Duration,
    partitions: u32,
) -> (Env, Api, InProcessWorker) {
    require_shared_redis().await.unwrap();
    let (env, _) = env_partitioned(redis_url(), prefix, sim, false, partitions).await;
    let api = start_api(&env, api_secret).await;
    let mut settings = env.services.worker_settings();
    settings.provider.callback_url = Some(api.url.clone());
    settings.provider.poll_floor_ms = poll_floor.as_millis() as u64;
    settings.provider.poll_max_interval_secs = poll_floor.as_secs().max(1);
    settings.provider.deadline = Duration::from_secs(600);
    settings.worker.job_deadline_secs = 600;
    let worker = InProcessWorker::start_with(settings).await;
    (env, api, worker)
}

fn signed_sim() -> SimConfig {
    SimConfig {
        callback_secret: Some(SECRET.to_owned()),
        ..SimConfig::fast()
    }
}

fn prompts(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix} {i}")).collect()
}

/// A minute between polls: a job done within the deadline below was woken by its callback.
const SLOW_POLLS: Duration = Duration::from_secs(60);
/// Well below [`SLOW_POLLS`], and generous for a loaded two-core machine.
const WOKEN_DEADLINE: Duration = Duration::from_secs(40);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_wake_parked_generations_long_before_their_next_poll() {
    let (env, api, worker) = setup("cb-wake", signed_sim(), SECRET, SLOW_POLLS, 3).await;
    let ids = enqueue(&env, &prompts("woken by its callback", 12)).await;
    let records = wait_terminal(&env.queue, &ids, WOKEN_DEADLINE).await;
    assert_all_succeeded_once(&env, &records).await;
    assert_eq!(api.metrics.get("accepted"), 12, "{:?}", api.metrics);
    assert_eq!(api.metrics.get("bad_signature"), 0, "{:?}", api.metrics);
    // Each run was read once after its callback (plus, at most, one early poll).
    let polls = env.sim.stats().polls;
    assert!(polls <= 24, "{polls} polls for 12 runs");
    assert_eq!(env.queue.stats().await.unwrap().parked, 0);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_and_duplicated_callbacks_still_end_every_job_paid_once() {
    let sim = SimConfig {
        callback_delay_ms: 300,
        ..signed_sim()
    };
    let (env, api, worker) = setup("cb-faults", sim, SECRET, Duration::from_millis(200), 1).await;
    let mut prompts = prompts("lost callback [[sim:callback-drop]]", 8);
    prompts.extend((0..8).map(|i| format!("twice called back {i} [[sim:callback-duplicate]]")));
    prompts.extend((0..4).map(|i| format!("called back once {i}")));
    let ids = enqueue(&env, &prompts).await;
    let records = wait_terminal(&env.queue, &ids, Duration::from_secs(120)).await;
    assert_all_succeeded_once(&env, &records).await;
    let callbacks = env.sim.stats().callbacks;
    assert_eq!(callbacks.dropped, 8, "{callbacks:?}");
    assert_eq!(callbacks.duplicated, 8, "{callbacks:?}");
    // Every callback sent was answered 200: accepted, a duplicate, or about a finished job
    // (a run polled to its end before its delayed callback came).
    wait_for(
        "the callbacks to settle",
        Duration::from_secs(30),
        || async {
            let callbacks = env.sim.stats().callbacks;
            (callbacks.delivered == 20).then_some(())
        },
    )
    .await
    .unwrap();
    let answered: u64 = ["accepted", "duplicate", "finished"]
        .iter()
        .map(|outcome| api.metrics.get(outcome))
        .sum();
    // 4 sent once, 8 sent twice, 8 never.
    assert_eq!(answered, 4 + 2 * 8, "{:?}", api.metrics);
    assert!(api.metrics.get("duplicate") >= 4, "{:?}", api.metrics);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_before_the_create_answer_is_kept_and_applied_when_the_run_is_bound() {
    // The create's answer takes 2 s; the run ends (and its callback comes) long before.
    let (env, api, worker) = setup("cb-early", signed_sim(), SECRET, SLOW_POLLS, 1).await;
    let ids = enqueue(
        &env,
        &["its answer came late [[sim:slow-create]]".to_owned()],
    )
    .await;
    let records = wait_terminal(&env.queue, &ids, WOKEN_DEADLINE).await;
    assert_all_succeeded_once(&env, &records).await;
    assert_eq!(api.metrics.get("unknown_run"), 1, "{:?}", api.metrics);
    assert_eq!(api.metrics.get("accepted"), 0, "{:?}", api.metrics);
    assert_eq!(env.sim.stats().creates, 1);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn badly_signed_callbacks_change_nothing_and_polling_ends_the_jobs() {
    let (env, api, worker) = setup(
        "cb-badsig",
        signed_sim(),
        "whsec_not_what_the_sim_signs_with",
        Duration::from_millis(200),
        1,
    )
    .await;
    let ids = enqueue(&env, &prompts("signed with another secret", 5)).await;
    let records = wait_terminal(&env.queue, &ids, Duration::from_secs(120)).await;
    assert_all_succeeded_once(&env, &records).await;
    wait_for("the refused callbacks", Duration::from_secs(30), || async {
        (api.metrics.get("bad_signature") >= 5).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(api.metrics.get("accepted"), 0, "{:?}", api.metrics);
    for record in &records {
        assert_eq!(record.state, JobState::Succeeded);
    }
    worker.stop().await;
}
