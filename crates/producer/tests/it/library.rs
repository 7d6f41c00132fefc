//! The library: validation before writes, partial batches, idempotency, cancel, batch counts,
//! dead letters and events.

use klingq_core::{CostModel, JobState, ValidationErrors, VideoDuration};
use klingq_producer::{
    BatchCheck, BatchOptions, MAX_ERROR_DETAILS, Producer, ProducerError, RedriveTarget,
    batch_error_details,
};
use klingq_queue::QueueConfig;
use klingq_testkit::redis::{require_shared_redis, unique_namespace};

use crate::{TestWorker, config, enqueue_poison, generating_spec, producer, spec, wait_state};

fn bad(path: &str, rule: &str) -> ValidationErrors {
    let mut errors = ValidationErrors::default();
    errors.push(path, rule, "is wrong");
    errors
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_with_a_bad_entry_is_rejected_whole_and_writes_nothing() {
    let producer = producer("reject").await;
    let mut invalid = spec(2);
    invalid.request.cfg_scale = 3.0;
    invalid.webhook_url = Some("ftp://nope".into());
    let jobs = vec![
        Ok(spec(0)),
        Err(bad("prompt", "required")),
        Ok(invalid),
        Ok(spec(3)),
    ];
    let options = BatchOptions {
        budget_usd: Some(-1.0),
        ..BatchOptions::default()
    };
    let Err(ProducerError::InvalidBatch(errors)) = producer.enqueue_batch(jobs, options).await
    else {
        panic!("the batch was accepted");
    };
    assert_eq!(errors.total, 4);
    let batch_rules: Vec<_> = errors
        .batch
        .iter()
        .map(|e| (e.path.as_str(), e.rule.as_str()))
        .collect();
    assert_eq!(batch_rules, vec![("budget_usd", "range")]);
    let entries: Vec<_> = errors
        .entries
        .details()
        .iter()
        .map(|e| (e.index.unwrap(), e.path.clone(), e.rule.clone()))
        .collect();
    assert_eq!(
        entries,
        vec![
            (1, "prompt".to_owned(), "required".to_owned()),
            (2, "request.cfg_scale".to_owned(), "range".to_owned()),
            (2, "webhook_url".to_owned(), "url".to_owned()),
        ]
    );
    assert_eq!(errors.invalid_entries, 2);
    assert!(!errors.entries.is_truncated());
    let queue = producer.queue();
    assert!(queue.batch_ids(0, 10).await.unwrap().is_empty());
    assert!(queue.job_ids(0, 10).await.unwrap().is_empty());
    assert_eq!(queue.stats().await.unwrap().waiting, 0);

    // An empty batch and a bad single job write nothing either.
    assert!(matches!(
        producer
            .enqueue_batch(Vec::new(), BatchOptions::default())
            .await,
        Err(ProducerError::InvalidBatch(_))
    ));
    let mut bad_job = spec(9);
    bad_job.request.prompt = Some(String::new());
    let Err(ProducerError::Invalid(errors)) = producer.enqueue(bad_job).await else {
        panic!("the job was accepted");
    };
    assert_eq!(errors.0[0].path, "request.prompt");
    assert!(queue.job_ids(0, 10).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_batches_enqueue_the_valid_entries_and_report_the_rest() {
    let producer = producer("partial").await;
    let jobs = vec![Ok(spec(0)), Err(bad("duration", "one_of")), Ok(spec(2))];
    let options = BatchOptions {
        partial: true,
        webhook_url: Some("https://hooks.example.com/batch?token=abc".into()),
        budget_usd: Some(10.0),
        ..BatchOptions::default()
    };
    let accepted = producer.enqueue_batch(jobs, options).await.unwrap();
    assert!(accepted.created);
    assert_eq!(accepted.total, 2);
    assert_eq!(accepted.rejected.len(), 1);
    assert_eq!(accepted.rejected[0].index, Some(1));
    assert_eq!(accepted.rejected[0].path, "duration");
    assert_eq!(accepted.rejected_entries, 1);
    assert!(!accepted.rejected_truncated);
    assert_eq!(accepted.estimated_usd, 1.4);
    let batch = producer.batch(&accepted.id).await.unwrap();
    assert_eq!(batch.total, 2);
    assert_eq!(batch.budget_usd, Some(10.0));
    assert_eq!(
        batch.webhook_url.as_deref(),
        Some("https://hooks.example.com/batch?[redacted]")
    );
    // Nothing valid at all is still a rejection.
    let none_valid = producer
        .enqueue_batch(
            vec![Err(bad("prompt", "required"))],
            BatchOptions {
                partial: true,
                ..BatchOptions::default()
            },
        )
        .await;
    assert!(matches!(none_valid, Err(ProducerError::InvalidBatch(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_lists_keep_the_first_thousand_and_count_the_rest() {
    let producer = producer("capped").await;
    // 3,000 entries with two errors each: 6,000 errors, 1,000 listed.
    let two_errors = || {
        let mut errors = bad("prompt", "required");
        errors.push("start_image_url", "required", "is wrong");
        errors
    };
    let jobs: Vec<_> = (0..3000).map(|_| Err(two_errors())).collect();
    let Err(ProducerError::InvalidBatch(errors)) =
        producer.enqueue_batch(jobs, BatchOptions::default()).await
    else {
        panic!("the batch was accepted");
    };
    assert_eq!(errors.total, 3000);
    assert_eq!(errors.invalid_entries, 3000);
    assert_eq!(errors.entries.details().len(), MAX_ERROR_DETAILS);
    assert_eq!(errors.entries.total(), 6000);
    assert!(errors.entries.is_truncated());
    assert_eq!(errors.len(), 6000);
    let last = errors.entries.details().last().unwrap();
    assert_eq!(
        (last.index, last.path.as_str()),
        (Some(499), "start_image_url")
    );
    let details = batch_error_details(&errors);
    assert_eq!((details.details().len(), details.total()), (1000, 6000));
    // The message lists what is kept, and says how many more there are.
    let message = errors.to_string();
    assert_eq!(message.lines().count(), 1 + MAX_ERROR_DETAILS + 1);
    assert!(
        message.starts_with("3000 of 3000 entries are invalid"),
        "{message:.100}"
    );
    assert!(message.ends_with("... and 5000 more errors (the first 1000 are listed)"));

    // With `partial`, the entries left out are capped the same way.
    let mut jobs: Vec<_> = (0..1500).map(|_| Err(two_errors())).collect();
    jobs.push(Ok(spec(0)));
    let options = BatchOptions {
        partial: true,
        ..BatchOptions::default()
    };
    let accepted = producer.enqueue_batch(jobs, options).await.unwrap();
    assert_eq!(accepted.total, 1);
    assert_eq!(accepted.rejected.len(), MAX_ERROR_DETAILS);
    assert_eq!(accepted.rejected_entries, 1500);
    assert!(accepted.rejected_truncated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_over_its_limit_is_refused_before_its_entries_are_validated() {
    let producer = producer("limit").await.with_max_batch_jobs(10);
    let jobs: Vec<_> = (0..25).map(|_| Err(bad("prompt", "required"))).collect();
    let Err(ProducerError::InvalidBatch(errors)) =
        producer.enqueue_batch(jobs, BatchOptions::default()).await
    else {
        panic!("the batch was accepted");
    };
    let batch_rules: Vec<_> = errors
        .batch
        .iter()
        .map(|e| (e.path.as_str(), e.rule.as_str(), e.message.as_str()))
        .collect();
    assert_eq!(
        batch_rules,
        vec![("", "max_items", "a batch may have at most 10 jobs, got 25")]
    );
    assert!(errors.entries.is_empty(), "entries are not validated");
    assert_eq!(errors.total, 25);

    // The check a file or body reader uses, counting first: the same verdict.
    let mut check = BatchCheck::new(10);
    check.skip(25);
    let refused = check.finish(&BatchOptions::default()).unwrap_err();
    assert_eq!(refused.batch, errors.batch);
    // Checked one at a time, entries past the limit are counted, not validated.
    let mut check = BatchCheck::new(10);
    for _ in 0..25 {
        assert!(check.check(Err(bad("prompt", "required")), None).is_none());
    }
    let refused = check.finish(&BatchOptions::default()).unwrap_err();
    assert_eq!(refused.batch, errors.batch);
    assert!(refused.entries.is_empty());
    assert!(producer.queue().job_ids(0, 10).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_return_the_first_job_and_batch() {
    let producer = producer("idem").await;
    let mut job = spec(0);
    job.idempotency_key = Some("order-7".into());
    let first = producer.enqueue(job.clone()).await.unwrap();
    job.request.prompt = Some("a different prompt".into());
    let second = producer.enqueue(job).await.unwrap();
    assert!(first.created);
    assert!(!second.created);
    assert_eq!(first.id, second.id);

    let options = BatchOptions {
        idempotency_key: Some("upload-42".into()),
        ..BatchOptions::default()
    };
    let jobs = || (0..3).map(|n| Ok(spec(n))).collect::<Vec<_>>();
    let first = producer
        .enqueue_batch(jobs(), options.clone())
        .await
        .unwrap();
    let again = producer.enqueue_batch(jobs(), options).await.unwrap();
    assert!(first.created);
    assert!(!again.created);
    assert_eq!(first.id, again.id);
    assert_eq!(again.total, 3);
    assert_eq!(producer.batch(&first.id).await.unwrap().total, 3);
    assert_eq!(producer.queue().batch_ids(0, 10).await.unwrap().len(), 1);
    // Jobs of a keyed batch carry keys derived from it, so a resumed batch adds none twice.
    let page = producer.batch_jobs(&first.id, 0, 10).await.unwrap();
    let keys: Vec<_> = page
        .items
        .iter()
        .map(|j| j.idempotency_key.clone().unwrap())
        .collect();
    assert_eq!(
        keys,
        vec![
            "batch:upload-42:0",
            "batch:upload-42:1",
            "batch:upload-42:2"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_batch_stopped_half_way_is_finished_by_its_retry() {
    let producer = producer("idem-resume").await;
    let queue = producer.queue();
    // The first request opened the batch under its key, enqueued one job and stopped.
    let opened = queue
        .open_batch_idempotent(&serde_json::json!({"source": "api"}), 0, "upload-43")
        .await
        .unwrap();
    assert!(opened.created);
    let first_id = opened.id;
    let mut first_job = klingq_queue::NewJob::new(&spec(0)).unwrap();
    first_job.idempotency_key = Some("batch:upload-43:0".into());
    queue.enqueue(&first_job, Some(&first_id)).await.unwrap();

    let options = BatchOptions {
        idempotency_key: Some("upload-43".into()),
        ..BatchOptions::default()
    };
    let jobs = || (0..3).map(|n| Ok(spec(n))).collect::<Vec<_>>();
    // Two retries at once still make one batch.
    let (a, b) = tokio::join!(
        producer.enqueue_batch(jobs(), options.clone()),
        producer.enqueue_batch(jobs(), options.clone())
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!((a.id.as_str(), a.created), (first_id.as_str(), false));
    assert_eq!((b.id.as_str(), b.created), (first_id.as_str(), false));
    let batch = producer.batch(&first_id).await.unwrap();
    assert_eq!(batch.total, 3);
    assert_eq!(queue.batch_ids(0, 10).await.unwrap(), [first_id.as_str()]);
    // Once sealed, a retry answers from the batch without writing.
    let again = producer.enqueue_batch(jobs(), options).await.unwrap();
    assert_eq!((again.id.as_str(), again.total), (first_id.as_str(), 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_counts_cost_and_done_follow_its_jobs() {
    let producer = producer("counts").await;
    let jobs = [5, 10, 15]
        .into_iter()
        .map(|seconds| {
            let mut job = spec(seconds as usize);
            job.request.duration = VideoDuration::new(seconds).unwrap();
            Ok(job)
        })
        .collect();
    let accepted = producer
        .enqueue_batch(jobs, BatchOptions::default())
        .await
        .unwrap();
    assert_eq!(accepted.estimated_usd, 4.2);
    let batch = producer.batch(&accepted.id).await.unwrap();
    assert_eq!(batch.total, 3);
    assert_eq!(batch.count(JobState::Queued), 3);
    assert_eq!(batch.counts.len(), JobState::ALL.len());
    assert_eq!(batch.estimated_usd, 4.2);
    assert!(!batch.done);
    assert!(batch.finished_at.is_none());

    let page = producer.batch_jobs(&accepted.id, 0, 2).await.unwrap();
    assert_eq!(page.items.len(), 2);
    assert_eq!(page.next_offset, Some(2));
    let last = producer.batch_jobs(&accepted.id, 2, 2).await.unwrap();
    assert_eq!(last.items.len(), 1);
    assert_eq!(last.next_offset, None);
    let first_job = &page.items[0];
    assert_eq!(first_job.batch_id.as_deref(), Some(accepted.id.as_str()));
    assert_eq!(first_job.duration_seconds, Some(5));
    assert_eq!(first_job.estimated_usd, 0.7);

    let cancelled = producer.cancel_job(&first_job.id).await.unwrap();
    assert!(cancelled.cancelled);
    assert_eq!(cancelled.previous_state, JobState::Queued);
    assert!(!cancelled.cost_committed);
    let again = producer.cancel_job(&first_job.id).await.unwrap();
    assert!(!again.cancelled);
    assert_eq!(again.state, JobState::Cancelled);
    assert_eq!(
        producer
            .batch(&accepted.id)
            .await
            .unwrap()
            .count(JobState::Cancelled),
        1
    );

    let result = producer.cancel_batch(&accepted.id).await.unwrap();
    assert_eq!((result.cancelled, result.already_terminal), (2, 1));
    let batch = producer.batch(&accepted.id).await.unwrap();
    assert!(batch.done);
    assert_eq!(batch.count(JobState::Cancelled), 3);
    assert_eq!(batch.terminal, 3);
    assert!(batch.finished_at.is_some());
    assert!(matches!(
        producer.batch("01a20b46-0000-7000-8000-000000000000").await,
        Err(ProducerError::BatchNotFound(_))
    ));
    assert!(matches!(
        producer.job("not-an-id").await,
        Err(ProducerError::JobNotFound(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_generating_job_stops_tracking_it_and_commits_its_cost() {
    let producer = producer("generating").await;
    let id = producer.enqueue(generating_spec()).await.unwrap().id;
    let worker = TestWorker::spawn(producer.queue());
    wait_state(&producer, &id, JobState::Generating).await;
    let view = producer.job(&id).await.unwrap();
    assert_eq!(
        view.provider.and_then(|p| p.run_id).as_deref(),
        Some("run-test-1")
    );
    let result = producer.cancel_job(&id).await.unwrap();
    assert!(result.cancelled);
    assert_eq!(result.previous_state, JobState::Generating);
    assert!(result.cost_committed);
    let job = producer.job(&id).await.unwrap();
    assert_eq!(job.state, JobState::Cancelled);
    let error = job.error.unwrap();
    assert_eq!(error.code, "CANCELLED");
    assert!(error.cost_committed);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_and_redriven() {
    let producer = producer("dlq").await;
    let poison = enqueue_poison(&producer).await;
    let good = producer.enqueue(spec(1)).await.unwrap().id;
    let worker = TestWorker::spawn(producer.queue());
    wait_state(&producer, &poison, JobState::Dead).await;
    wait_state(&producer, &good, JobState::Succeeded).await;
    worker.stop().await;

    let page = producer.dead_letters(0, 10).await.unwrap();
    assert_eq!(page.total, 1);
    assert_eq!(page.next_offset, None);
    assert_eq!(page.items[0].id, poison);
    assert_eq!(
        page.items[0].error.as_ref().unwrap().code,
        "UNDECODABLE_PAYLOAD"
    );
    assert!(page.items[0].request.is_none());

    let missing = "01a20b46-0000-7000-8000-000000000001".to_owned();
    let result = producer
        .redrive(RedriveTarget::Ids(vec![
            poison.clone(),
            good.clone(),
            missing.clone(),
        ]))
        .await
        .unwrap();
    assert_eq!(result.redriven, 1);
    assert_eq!(result.ids, vec![poison.clone()]);
    assert_eq!(result.not_dead.len(), 1);
    assert_eq!(result.not_dead[0].state, JobState::Succeeded);
    assert_eq!(result.not_found, vec![missing]);
    let job = producer.job(&poison).await.unwrap();
    assert_eq!(job.redrives, 1);
    assert_eq!(job.state, JobState::Queued);
    assert_eq!(producer.dead_letters(0, 10).await.unwrap().total, 0);

    // Dead again, then every dead job at once.
    let worker = TestWorker::spawn(producer.queue());
    wait_for_dead(&producer, &poison).await;
    worker.stop().await;
    let all = producer.redrive(RedriveTarget::All).await.unwrap();
    assert_eq!(all.redriven, 1);
}

async fn wait_for_dead(producer: &klingq_producer::Producer, id: &str) {
    wait_state(producer, id, JobState::Dead).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_read_from_a_cursor() {
    let producer = producer("events").await;
    assert_eq!(producer.latest_event_cursor().await.unwrap(), "0-0");
    let mut ids = Vec::new();
    for n in 0..3 {
        let id = producer.enqueue(spec(n)).await.unwrap().id;
        producer.cancel_job(&id).await.unwrap();
        ids.push(id);
    }
    let all = producer.events("0", 100, None).await.unwrap();
    assert_eq!(all.len(), 3);
    for (event, id) in all.iter().zip(&ids) {
        assert_eq!(event.event_type, "job.cancelled");
        assert_eq!(event.event["data"]["job_id"], serde_json::json!(id));
        assert_eq!(
            event.event["data"]["metadata"]["n"],
            event.event["data"]["metadata"]["n"]
        );
    }
    let after_first = producer.events(&all[0].cursor, 100, None).await.unwrap();
    assert_eq!(after_first, all[1..].to_vec());
    assert_eq!(producer.latest_event_cursor().await.unwrap(), all[2].cursor);
    assert_eq!(producer.recent_events(2).await.unwrap(), all[1..].to_vec());
    // Waiting for the next one returns when it comes.
    let waiting = {
        let producer = producer.clone();
        let cursor = all[2].cursor.clone();
        tokio::spawn(async move {
            producer
                .events(&cursor, 10, Some(std::time::Duration::from_secs(10)))
                .await
                .unwrap()
        })
    };
    let id = producer.enqueue(spec(9)).await.unwrap().id;
    producer.cancel_job(&id).await.unwrap();
    let next = waiting.await.unwrap();
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].event["data"]["job_id"], serde_json::json!(id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_views_carry_the_request_metadata_and_times() {
    let producer = producer("view").await;
    let mut job = spec(4);
    job.webhook_url = Some("https://hooks.example.com/x?sig=secret".into());
    job.not_before = Some(time::OffsetDateTime::now_utc() + time::Duration::hours(1));
    let id = producer.enqueue(job).await.unwrap().id;
    let view = producer.job(&id).await.unwrap();
    assert_eq!(view.state, JobState::Scheduled);
    assert!(view.run_at.is_some());
    assert_eq!(view.metadata, Some(serde_json::json!({"n": 4})));
    assert_eq!(
        view.webhook_url.as_deref(),
        Some("https://hooks.example.com/x?[redacted]")
    );
    assert_eq!(view.request.as_ref().unwrap()["prompt"], "prompt 4");
    assert!(view.provider.is_none() && view.video.is_none() && view.error.is_none());
    let json = serde_json::to_value(&view).unwrap();
    for key in [
        "id",
        "state",
        "batch_id",
        "attempts",
        "created_at",
        "updated_at",
        "metadata",
        "provider",
        "video",
        "error",
    ] {
        assert!(json.get(key).is_some(), "{key} missing in {json}");
    }
    time::OffsetDateTime::parse(
        json["created_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_retried_without_a_batch_key_finds_its_jobs_keys_over_partitions() {
    require_shared_redis().await.unwrap();
    let producer = Producer::connect(
        QueueConfig {
            partitions: 4,
            ..config(&unique_namespace("idem-parts"))
        },
        CostModel::default(),
    )
    .await
    .unwrap();
    // Per-job keys, no batch key: the retry is placed by its first job's key, where the
    // first submission's jobs and keys are.
    let jobs = || {
        (0..5)
            .map(|n| {
                let mut job = spec(n);
                job.idempotency_key = Some(format!("order-{n}"));
                Ok(job)
            })
            .collect::<Vec<_>>()
    };
    let first = producer
        .enqueue_batch(jobs(), BatchOptions::default())
        .await
        .unwrap();
    assert_eq!((first.total, first.deduplicated), (5, 0));
    let retry = producer
        .enqueue_batch(jobs(), BatchOptions::default())
        .await
        .unwrap();
    assert_ne!(retry.id, first.id);
    assert_eq!((retry.total, retry.deduplicated), (0, 5));
    assert_eq!(producer.queue().job_ids(0, 100).await.unwrap().len(), 5);
}
