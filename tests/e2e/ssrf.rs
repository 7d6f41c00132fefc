//! The download's SSRF guard end to end: the real worker, with the production default (no
//! allow-list), refuses the simulator's loopback video URL after the run was paid. The job
//! fails with `DOWNLOAD_REFUSED`, keeps its run id and finished run in the checkpoint (so
//! resuming it polls nothing and creates nothing), and nothing was downloaded or stored. An
//! operator who then allow-lists the address and re-drives the job gets the video without
//! paying again.

use std::time::Duration;

use klingq_core::{GenerationRequest, JobSpec, JobState};
use klingq_e2e::E2eServices;
use klingq_queue::{NewJob, Queue};
use klingq_sim::SimConfig;
use klingq_storage::VideoStore;
use klingq_testkit::redis::{redis_url, require_shared_redis, unique_namespace};
use klingq_testkit::seaweed::ensure_seaweedfs;
use klingq_testkit::wait_for;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_video_url_fails_the_paid_job_with_download_refused_and_keeps_the_run() {
    require_shared_redis().await.unwrap();
    let s3 = ensure_seaweedfs().await.unwrap();
    let bucket = s3.unique_bucket("ssrf").await.unwrap();
    let sim = klingq_sim::start_local(SimConfig::fast()).await.unwrap();
    let services = E2eServices {
        redis_url: redis_url(),
        namespace: unique_namespace("ssrf"),
        sim_url: sim.base_url(),
        s3_endpoint: s3.endpoint_url.clone(),
        s3_access_key: s3.access_key.clone(),
        s3_secret_key: s3.secret_key.clone(),
        bucket,
        partitions: 1,
    };
    let fixed_settings = services.worker_settings();
    let mut settings = fixed_settings.clone();
    // The production default: the simulator's loopback download URL is not allow-listed.
    settings.storage.download_allow_cidrs.clear();
    let storage = settings.storage.clone();
    let queue = Queue::connect(settings.queue.clone()).await.unwrap();

    let spec = JobSpec::new(GenerationRequest::new(
        "https://example.com/start.png",
        "a lighthouse at dusk",
    ));
    let mut job = NewJob::new(&spec).unwrap();
    job.estimated_micros = 700_000;
    let id = queue.enqueue(&job, None).await.unwrap().id;

    let record = run_until_terminal(settings, &queue, &id).await;

    assert_eq!(
        record.state,
        JobState::Failed,
        "{:?} {:?}",
        record.reason,
        record.error
    );
    let error = record.error.as_ref().unwrap();
    assert_eq!(error.code, "DOWNLOAD_REFUSED", "{error:?}");
    assert_eq!(error.step, "download");
    assert!(error.cost_committed, "the run was paid for");
    assert!(
        error.message.contains("loopback") && error.message.contains("not allow-listed"),
        "{}",
        error.message
    );
    assert!(
        !error.message.contains("sig="),
        "the signed URL leaked: {}",
        error.message
    );
    assert_eq!(record.attempts, 1, "a refusal is not retried");

    // Paid once, and the checkpoint keeps the run: resuming the job would neither create nor
    // poll a run, only download again.
    let charges = sim.charges();
    assert_eq!(charges.len(), 1, "{charges:?}");
    let checkpoint = record.checkpoint.as_ref().unwrap();
    assert_eq!(
        checkpoint["provider"]["run_id"].as_str(),
        Some(charges[0].run_id.to_string().as_str()),
        "{checkpoint}"
    );
    assert_eq!(checkpoint["provider"]["finished"], true, "{checkpoint}");
    assert!(checkpoint["video"].is_null(), "{checkpoint}");

    // Nothing was fetched from the refused address, and nothing was stored.
    assert_eq!(sim.stats().downloads, 0);
    let store = VideoStore::new(storage).await.unwrap();
    assert!(store.head(&id).await.unwrap().is_none());

    let events = queue.read_events("0", 100, None).await.unwrap();
    let failed: Vec<_> = events
        .iter()
        .filter(|e| e.event_type == "job.failed")
        .collect();
    assert_eq!(failed.len(), 1);
    assert!(
        failed[0].body.contains("DOWNLOAD_REFUSED"),
        "{}",
        failed[0].body
    );

    // The operator allow-lists the simulator's address and re-drives the failed job: it
    // downloads the run it already paid for.
    assert_eq!(
        queue.redrive(&id).await.unwrap(),
        klingq_queue::RedriveOutcome::Redriven
    );
    let record = run_until_terminal(fixed_settings, &queue, &id).await;
    assert_eq!(record.state, JobState::Succeeded, "{:?}", record.error);
    assert_eq!(sim.charges().len(), 1, "re-driving did not pay again");
    assert!(store.head(&id).await.unwrap().is_some());
}

/// Runs a worker with `settings` until job `id` is terminal; returns its record.
async fn run_until_terminal(
    settings: klingq_worker::WorkerSettings,
    queue: &Queue,
    id: &str,
) -> klingq_queue::JobRecord {
    let worker = klingq_worker::Worker::connect(settings, Duration::from_secs(10))
        .await
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(worker.run(async {
        let _ = stopped.await;
    }));
    let record = wait_for("the job to end", Duration::from_secs(60), || async {
        let record = queue.job(id).await.ok()??;
        record.state.is_terminal().then_some(record)
    })
    .await
    .unwrap();
    let _ = stop.send(());
    running.await.unwrap().unwrap();
    record
}
