//! A batch's failure guard: permanent failures past `max_failed` (or `max_failure_rate` after
//! `min_finished`) pause the batch once, with one `batch.paused` event; a paused batch holds
//! its jobs at submit (the budget reservation); a resume wakes them and counts anew.

use klingq_queue::BudgetDecision;

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_past_the_guard_pause_the_batch_and_a_resume_wakes_what_it_held() {
    let queue = shared_queue("batch-guard", |_| {}).await;
    let batch = klingq_core::JobId::new().to_string();
    queue
        .open_batch(&batch, &serde_json::json!({"max_failed": 2}), 0)
        .await
        .unwrap();
    // Three permanent failures (one past max_failed 2) and one transient death, which the
    // guard does not count; then two jobs that would be submitted.
    let failing: Vec<NewJob> = (0..3).map(|n| job(n, Behavior::Fail)).collect();
    let failing_ids = enqueue_ids(&queue, &failing, Some(&batch)).await;
    let held = enqueue_ids(
        &queue,
        &[job(10, Behavior::Succeed), job(11, Behavior::Succeed)],
        Some(&batch),
    )
    .await;
    // (This test's handlers never reserve, so they run these two anyway: holding them at
    // submit is the video pipeline's, tested end to end in tests/e2e/tenants.rs.)
    let seen = Seen::default();
    let worker = spawn_worker(&queue, 4, &seen);
    for id in &failing_ids {
        wait_state(&queue, id, JobState::Failed, Duration::from_secs(30)).await;
    }
    let record = wait_for("the batch paused", Duration::from_secs(30), || async {
        queue.batch(&batch).await.unwrap().filter(|b| b.paused)
    })
    .await
    .unwrap();
    worker.stop().await;
    assert_eq!(
        record.pause_reason.as_deref(),
        Some("3 jobs failed, more than max_failed 2")
    );
    let events = queue.recent_events(50).await.unwrap();
    let paused: Vec<_> = events
        .iter()
        .filter(|e| e.event_type == "batch.paused")
        .collect();
    assert_eq!(paused.len(), 1, "one event per pause");
    assert_eq!(paused[0].subject, batch);
    let body: serde_json::Value = serde_json::from_str(&paused[0].body).unwrap();
    assert_eq!(body["data"]["failed"], 3);

    // A paused batch's job is held at submit, and counted among the held.
    for id in &held {
        assert_eq!(
            queue
                .reserve_budget(id, 700_000, 0, "default", 0)
                .await
                .unwrap(),
            BudgetDecision::BatchPaused
        );
    }
    // A resume lifts the pause and wakes them (they are on their ready streams already,
    // unless a worker deferred them: then they are made ready).
    queue.resume_batch(&batch).await.unwrap();
    let record = queue.batch(&batch).await.unwrap().unwrap();
    assert!(!record.paused);
    assert_eq!(record.pause_reason, None);
    for id in &held {
        assert_eq!(
            queue
                .reserve_budget(id, 700_000, 0, "default", 0)
                .await
                .unwrap(),
            BudgetDecision::Reserved
        );
    }
    // The guard counts from the resume: one more failure does not pause it again.
    let more = enqueue_ids(&queue, &[job(20, Behavior::Fail)], Some(&batch)).await;
    let worker = spawn_worker(&queue, 4, &seen);
    wait_state(&queue, &more[0], JobState::Failed, Duration::from_secs(30)).await;
    for id in &held {
        wait_state(&queue, id, JobState::Succeeded, Duration::from_secs(30)).await;
    }
    worker.stop().await;
    assert!(!queue.batch(&batch).await.unwrap().unwrap().paused);
    assert!(matches!(
        queue.resume_batch("no-such-batch").await,
        Err(klingq_queue::QueueError::BatchNotFound(_))
    ));
    queue.delete_namespace().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_rate_needs_its_minimum_sample() {
    let queue = shared_queue("batch-guard-rate", |_| {}).await;
    let batch = klingq_core::JobId::new().to_string();
    queue
        .open_batch(
            &batch,
            &serde_json::json!({"max_failure_rate": 0.3, "min_finished": 10}),
            0,
        )
        .await
        .unwrap();
    // 4 failures among the first 9 finished (44 %): under the minimum sample, no pause.
    let mut jobs: Vec<NewJob> = (0..4).map(|n| job(n, Behavior::Fail)).collect();
    jobs.extend((4..9).map(|n| job(n, Behavior::Succeed)));
    let ids = enqueue_ids(&queue, &jobs, Some(&batch)).await;
    let seen = Seen::default();
    let worker = spawn_worker(&queue, 4, &seen);
    wait_for("nine finished", Duration::from_secs(30), || async {
        let records = queue.jobs(&ids).await.unwrap();
        records.iter().all(|r| r.state.is_terminal()).then_some(())
    })
    .await
    .unwrap();
    assert!(!queue.batch(&batch).await.unwrap().unwrap().paused);
    // The tenth finished job (a success) makes the sample: 4 of 10 > 0.3.
    let tenth = enqueue_ids(&queue, &[job(9, Behavior::Succeed)], Some(&batch)).await;
    wait_state(
        &queue,
        &tenth[0],
        JobState::Succeeded,
        Duration::from_secs(30),
    )
    .await;
    let record = wait_for("the batch paused", Duration::from_secs(30), || async {
        queue.batch(&batch).await.unwrap().filter(|b| b.paused)
    })
    .await
    .unwrap();
    worker.stop().await;
    assert_eq!(
        record.pause_reason.as_deref(),
        Some("4 of 10 finished jobs failed, more than max_failure_rate 0.3")
    );
    queue.delete_namespace().await.unwrap();
}
