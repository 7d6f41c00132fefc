//! Tenants end to end: the real worker, real Redis, SeaweedFS and the simulator. The issue's
//! case: tenant A queues 60 clips of 15 s ($2.10 each), then tenant B 30 clips of 3 s ($0.42
//! each), equal weights, 4 provider slots. While both wait, each starts the same dollars at
//! the provider (first in, first out would start B nothing until A's last clip). Counts, not
//! timings: the order runs were created in, from each job's checkpoint.

use std::time::Duration;

use klingq_core::{CostModel, GenerationRequest, JobSpec, JobState, VideoDuration};
use klingq_producer::Producer;
use klingq_queue::{NewJob, SlotClaim};
use klingq_sim::SimConfig;
use klingq_testkit::redis::{redis_url, require_shared_redis};
use klingq_testkit::wait_for;
use tokio::io::AsyncBufReadExt;

use crate::pipeline::{Env, InProcessWorker, env_on};

const SLOTS: u64 = 4;

fn clip(tenant: &str, seconds: u32, n: usize) -> NewJob {
    let mut request = GenerationRequest::new(
        "https://example.com/start.png",
        format!("{tenant} clip {n}"),
    );
    request.duration = VideoDuration::new(seconds).unwrap();
    let mut spec = JobSpec::new(request);
    spec.tenant = Some(tenant.to_owned());
    let mut new_job = NewJob::new(&spec).unwrap();
    new_job.tenant = spec.tenant.clone();
    new_job.estimated_micros = u64::from(seconds) * 140_000;
    new_job
}

async fn enqueue(env: &Env, tenant: &str, seconds: u32, n: usize) -> Vec<String> {
    enqueue_into(env, tenant, seconds, n, None).await
}

async fn enqueue_into(
    env: &Env,
    tenant: &str,
    seconds: u32,
    n: usize,
    batch: Option<&str>,
) -> Vec<String> {
    let jobs: Vec<NewJob> = (0..n).map(|i| clip(tenant, seconds, i)).collect();
    enqueue_jobs(env, &jobs, batch).await
}

/// Enqueues `jobs` (into `batch`), returning their ids.
async fn enqueue_jobs(env: &Env, jobs: &[NewJob], batch: Option<&str>) -> Vec<String> {
    env.queue
        .enqueue_many(jobs, batch)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tenants_waiting_start_equal_dollars_at_the_provider() {
    require_shared_redis().await.unwrap();
    let (env, _) = env_on(redis_url(), "tenants-fair", SimConfig::fast(), false).await;
    let mut settings = env.services.worker_settings();
    settings.worker.provider_concurrency = SLOTS;
    // Another tenant holds every slot while A and B queue up, so both wait from the start
    // (as they would behind a busy account); its slots are then given back one by one.
    let blockers: Vec<String> = (0..SLOTS).map(|i| format!("blocker-{i}")).collect();
    for blocker in &blockers {
        let claim = SlotClaim {
            tenant: "z",
            ..SlotClaim::anonymous()
        };
        let status = env
            .queue
            .acquire_slot_or_wait("provider", blocker, claim, Duration::from_secs(600), SLOTS)
            .await
            .unwrap();
        assert!(status.acquired);
    }
    // A's clips are one batch, whose ETA is read while both tenants share the provider.
    let a_batch = klingq_core::JobId::new().to_string();
    env.queue
        .open_batch(&a_batch, &serde_json::json!({"tenant": "a"}), 0)
        .await
        .unwrap();
    let a = enqueue_into(&env, "a", 15, 60, Some(&a_batch)).await;
    env.queue.seal_batch(&a_batch).await.unwrap();
    let b = enqueue(&env, "b", 3, 30).await;
    let worker = InProcessWorker::start_with(settings).await;
    wait_for(
        "A and B waiting for a slot",
        Duration::from_secs(60),
        || async {
            let usage = env.queue.tenant_usage().await.ok()?;
            let waiting = |name: &str| {
                usage
                    .iter()
                    .find(|u| u.tenant == name)
                    .map_or(0, |u| u.waiting_for_slot)
            };
            (waiting("a") == 60 && waiting("b") == 30).then_some(())
        },
    )
    .await
    .unwrap();
    // The scheduler's decisions, in the order it made them: each grant charges its tenant's
    // dollars started (HINCRBY on the fair-share hash, inside the script), which Redis's
    // MONITOR shows in execution order. The order runs reach the provider differs by the
    // worker's few ms to deliver a woken job, several grants apart when runs take 0.1 s.
    let fair_key = env.queue.keys().limit_fair("provider");
    let mut monitor = tokio::process::Command::new("redis-cli")
        .arg("-u")
        .arg(redis_url())
        .arg("monitor")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("redis-cli runs");
    let mut lines = tokio::io::BufReader::new(monitor.stdout.take().unwrap()).lines();
    assert_eq!(lines.next_line().await.unwrap().as_deref(), Some("OK"));
    let b_total = 30 * 420_000u64;
    let grants = tokio::spawn(async move {
        let needle = format!("\"HINCRBY\" \"{fair_key}\" \"started:");
        let mut order = String::new();
        let mut b = 0u64;
        while let Ok(Some(line)) = lines.next_line().await {
            let Some(at) = line.find(&needle) else {
                continue;
            };
            let rest = &line[at + needle.len()..];
            match rest.chars().next() {
                Some('a') => order.push('A'),
                Some('b') => {
                    order.push('B');
                    b += 420_000;
                    if b >= b_total {
                        break;
                    }
                }
                _ => {}
            }
        }
        order
    });
    for blocker in &blockers {
        env.queue.release_slot("provider", blocker).await.unwrap();
    }
    // Once a run of A's ended, its batch's ETA plays the fair share forward over both
    // tenants' jobs left (the API's batch view).
    let producer =
        Producer::new(env.queue.clone(), CostModel::default()).with_provider_slots(SLOTS);
    let eta = wait_for(
        "A's batch estimated from the fair share",
        Duration::from_secs(120),
        || async {
            let view = producer.batch(&a_batch).await.ok()?;
            (view.eta.basis == "fair_share").then_some(view.eta)
        },
    )
    .await
    .unwrap();
    assert!(eta.estimate);
    assert!(eta.remaining_secs.is_some_and(|s| s > 0.0), "{eta:?}");
    assert!(eta.remaining_usd > 0.0, "{eta:?}");
    let ids: Vec<String> = a.iter().chain(&b).cloned().collect();
    let records = wait_for("all 90 clips done", Duration::from_secs(300), || async {
        let records = env.queue.jobs(&ids).await.ok()?;
        records
            .iter()
            .all(|r| r.state == JobState::Succeeded)
            .then_some(records)
    })
    .await
    .unwrap();
    worker.stop().await;

    // The order runs were created in at the provider, for the message (the simulator's run
    // ids are UUIDv7, ordered by creation): A's are the 15 s clips, B's the 3 s ones.
    assert_eq!(records.len(), 90);
    let mut runs = env.sim.runs();
    runs.sort_by_key(|run| run.id);
    let order: String = runs
        .iter()
        .map(|run| if run.duration_secs == 3 { 'B' } else { 'A' })
        .collect();
    // While both waited: up to the slot B's last clip was given.
    let granted = tokio::time::timeout(Duration::from_secs(60), grants)
        .await
        .expect("the grants were read")
        .unwrap();
    drop(monitor);
    let dollars_a = granted.matches('A').count() as u64 * 2_100_000;
    let dollars_b = granted.matches('B').count() as u64 * 420_000;
    assert_eq!(dollars_b, b_total, "grants: {granted}");
    let ratio = dollars_a as f64 / dollars_b as f64;
    assert!(
        (0.8..=1.2).contains(&ratio),
        "while both waited A started ${:.2} and B ${:.2} (slots given in order: {granted}; runs created in order: {order})",
        dollars_a as f64 / 1e6,
        dollars_b as f64 / 1e6
    );
    // Paid once each, and the usage agrees.
    assert_eq!(env.sim.charges().len(), 90);
    let usage = env.queue.tenant_usage().await.unwrap();
    let a_usage = usage.iter().find(|u| u.tenant == "a").unwrap();
    assert_eq!(a_usage.finished.get("succeeded"), Some(&60));
    assert_eq!((a_usage.active(), a_usage.in_flight), (0, 0));
    assert_eq!(a_usage.started_micros, 60 * 2_100_000);
    // Every run was timed for the tenant (the ETA's run time for other batches).
    assert_eq!(a_usage.runs, 60);
    assert!(a_usage.run_ms > 0);
    env.queue.delete_namespace().await.unwrap();
}

/// A batch whose jobs keep failing for good stops spending: past `max_failed` it pauses with
/// one `batch.paused` event, the jobs that come after are held at submit (no run created),
/// and a resume submits them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_past_its_failure_guard_pauses_and_a_resume_finishes_it() {
    require_shared_redis().await.unwrap();
    let (env, _) = env_on(redis_url(), "batch-guard", SimConfig::fast(), false).await;
    let batch = klingq_core::JobId::new().to_string();
    env.queue
        .open_batch(&batch, &serde_json::json!({"max_failed": 2}), 0)
        .await
        .unwrap();
    let moderated: Vec<NewJob> = (0..3)
        .map(|i| clip("default", 5, i))
        .map(|mut job| {
            let mut spec: JobSpec = serde_json::from_str(&job.payload).unwrap();
            spec.tenant = None;
            spec.request.prompt = Some(format!("refused {} [[sim:moderation]]", job.id));
            job.payload = serde_json::to_string(&spec).unwrap();
            job.tenant = None;
            job
        })
        .collect();
    let moderated_ids = enqueue_jobs(&env, &moderated, Some(&batch)).await;
    let worker = InProcessWorker::start_with(env.services.worker_settings()).await;
    for id in &moderated_ids {
        wait_for(
            "a moderated job failed",
            Duration::from_secs(60),
            || async {
                let record = env.queue.job(id).await.ok()??;
                (record.state == JobState::Failed).then_some(())
            },
        )
        .await
        .unwrap();
    }
    let paused = wait_for("the batch paused", Duration::from_secs(30), || async {
        env.queue.batch(&batch).await.ok()?.filter(|b| b.paused)
    })
    .await
    .unwrap();
    assert_eq!(
        paused.pause_reason.as_deref(),
        Some("3 jobs failed, more than max_failed 2")
    );
    let runs_before = env.sim.runs().len();
    let producer = Producer::new(env.queue.clone(), CostModel::default());

    // Jobs that come after are held: scheduled, with the reason, and nothing created.
    let later: Vec<NewJob> = (0..4).map(|i| clip("default", 5, 10 + i)).collect();
    let later_ids = enqueue_jobs(&env, &later, Some(&batch)).await;
    env.queue.seal_batch(&batch).await.unwrap();
    wait_for("the later jobs held", Duration::from_secs(60), || async {
        let records = env.queue.jobs(&later_ids).await.ok()?;
        records
            .iter()
            .all(|r| {
                r.state == JobState::Scheduled
                    && r.reason
                        .as_deref()
                        .is_some_and(|reason| reason.contains("paused"))
            })
            .then_some(())
    })
    .await
    .unwrap();
    assert_eq!(
        env.sim.runs().len(),
        runs_before,
        "a paused batch creates no run"
    );
    let events = env.queue.recent_events(100).await.unwrap();
    assert_eq!(
        events
            .iter()
            .filter(|e| e.event_type == "batch.paused")
            .count(),
        1
    );

    // Paused, the batch has no finish time, only its spend left.
    let view = producer.batch(&batch).await.unwrap();
    assert!(view.paused);
    assert_eq!(
        (view.eta.basis.as_str(), view.eta.remaining_secs),
        ("paused", None)
    );

    // A resume submits them at once (not at the end of their hour-long wait).
    assert_eq!(env.queue.resume_batch(&batch).await.unwrap(), 4);
    let done = wait_for("the batch done", Duration::from_secs(60), || async {
        env.queue.batch(&batch).await.ok()?.filter(|b| b.done)
    })
    .await
    .unwrap();
    worker.stop().await;
    assert_eq!(done.counts.get("succeeded"), Some(&4));
    assert_eq!(done.counts.get("failed"), Some(&3));
    // Every run it created was timed, for its ETA; a done batch has nothing left.
    assert_eq!(done.runs, 7);
    assert!(done.run_ms > 0);
    let eta = done.eta(klingq_core::job::now_ms(), None);
    assert_eq!((eta.remaining_secs, eta.remaining_usd), (Some(0.0), 0.0));
    env.queue.delete_namespace().await.unwrap();
}
