//! Webhook delivery end to end: real Redis, a real video worker producing completion events,
//! the dispatcher and delivery worker, and real HTTP receivers.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use klingq_core::TraceParent;
use klingq_core::job::now_ms;
use klingq_events::{
    AttemptOutcome, DeliveryQuery, DeliveryStatus, EndpointConfig, ReplayMode, disabled_endpoints,
    enable_endpoint, endpoint_id, get_delivery, list_deliveries, replay_delivery,
};
use klingq_testkit::wait_for;

use crate::schema::assert_valid;
use crate::support::{
    Ending, Receiver, Reply, all_deliveries, config, new_secret, spawn_video_worker,
    spawn_webhooks, video_job, video_queue, wait_delivery,
};

/// A connection of the test's own, for what no queue operation does (rewinding a consumer
/// group, reading its pending summary).
async fn raw_redis(queue: &klingq_queue::Queue) -> redis::aio::MultiplexedConnection {
    redis::Client::open(queue.config().redis_url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

const WAIT: Duration = Duration::from_secs(30);

fn loopback() -> std::net::SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_job_batch_and_global_endpoints_signed_and_once() {
    let queue = video_queue("wh-all", |_| {}).await;
    let (old_secret, new_secret_) = (new_secret(), new_secret());
    let global_secret = new_secret();
    let batch_only_secret = new_secret();
    let receiver = Receiver::start(
        loopback(),
        &[
            ("/job", &[&old_secret, &new_secret_]),
            ("/batch", &[&old_secret, &new_secret_]),
            ("/global", &[&global_secret]),
            ("/batches-only", &[&batch_only_secret]),
        ],
    )
    .await;
    let mut webhook_config = config(&format!("{old_secret} {new_secret_}"), &["100ms"]);
    webhook_config.endpoints = vec![
        EndpointConfig {
            name: "ops".into(),
            url: receiver.url("/global"),
            secret: global_secret.as_str().into(),
            event_types: vec![],
        },
        EndpointConfig {
            name: "finance".into(),
            url: receiver.url("/batches-only"),
            secret: batch_only_secret.as_str().into(),
            event_types: vec![klingq_core::EventType::BatchCompleted],
        },
    ];
    let webhooks = spawn_webhooks(&queue, webhook_config);

    let batch = klingq_core::JobId::new().to_string();
    queue
        .open_batch(
            &batch,
            &serde_json::json!({"webhook_url": receiver.url("/batch")}),
            0,
        )
        .await
        .unwrap();
    let job_url = receiver.url("/job");
    let mut jobs = vec![
        video_job(Some(&job_url), Ending::Succeed),
        video_job(Some(&job_url), Ending::Succeed),
        video_job(Some(&job_url), Ending::Succeed),
        video_job(Some(&job_url), Ending::Fail),
        video_job(Some(&job_url), Ending::Fail),
    ];
    let mut to_cancel = video_job(Some(&job_url), Ending::Succeed);
    to_cancel.run_at_ms = Some(now_ms() + 3_600_000);
    jobs.push(to_cancel);
    let enqueued = queue.enqueue_many(&jobs, Some(&batch)).await.unwrap();
    queue.seal_batch(&batch).await.unwrap();
    queue.cancel(&enqueued[5].id, "user asked").await.unwrap();
    let standalone = queue
        .enqueue(&video_job(None, Ending::Succeed), None)
        .await
        .unwrap();
    let video_worker = spawn_video_worker(&queue);

    let at_job = receiver.wait_for("/job", 6, WAIT).await;
    let at_batch = receiver.wait_for("/batch", 7, WAIT).await;
    let at_global = receiver.wait_for("/global", 8, WAIT).await;
    let at_batches_only = receiver.wait_for("/batches-only", 1, WAIT).await;
    // Everything is delivered; now make the dispatcher read every event again: no event may
    // produce a second delivery.
    // Rewinding a consumer group is no queue operation: this test alone needs it.
    let stream = queue.keys().events();
    let mut conn = raw_redis(&queue).await;
    redis::cmd("XGROUP")
        .arg("SETID")
        .arg(&stream)
        .arg(klingq_events::DISPATCH_GROUP)
        .arg("0")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let last_id = queue.recent_events(1).await.unwrap()[0].cursor.clone();
    wait_for("the dispatcher to re-read every event", WAIT, || {
        let mut conn = conn.clone();
        let (stream, last_id) = (stream.clone(), last_id.clone());
        async move {
            let groups: Vec<std::collections::HashMap<String, redis::Value>> = redis::cmd("XINFO")
                .arg("GROUPS")
                .arg(&stream)
                .query_async(&mut conn)
                .await
                .ok()?;
            let group = groups.first()?;
            let last = match group.get("last-delivered-id")? {
                redis::Value::BulkString(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                redis::Value::SimpleString(text) => text.clone(),
                _ => return None,
            };
            let pending = match group.get("pending")? {
                redis::Value::Int(n) => *n,
                _ => return None,
            };
            (last == last_id && pending == 0).then_some(())
        }
    })
    .await
    .unwrap();
    let deliveries = all_deliveries(&queue).await;
    webhooks.stop().await.unwrap();
    video_worker.stop().await;

    assert_eq!(deliveries.len(), 6 + 7 + 8 + 1, "{deliveries:#?}");
    assert!(
        deliveries
            .iter()
            .all(|d| d.status == DeliveryStatus::Succeeded && d.attempts == 1),
        "{deliveries:#?}"
    );
    let received = receiver.received();
    assert_eq!(received.len(), 22, "a re-read event was delivered again");
    let published: std::collections::HashMap<String, String> = queue
        .read_events("0", 1_000, None)
        .await
        .unwrap()
        .into_iter()
        .map(|event| (event.id, event.body))
        .collect();
    for request in &received {
        let expected = if matches!(request.path.as_str(), "/job" | "/batch") {
            2
        } else {
            1
        };
        assert_eq!(
            request.n_secrets_matched, expected,
            "{} {}: signature does not verify with every active secret",
            request.path, request.id
        );
        let body = request.json();
        assert_eq!(body["id"], request.id, "webhook-id is the event id");
        assert!(!request.timestamp.is_empty());
        assert_valid(body["type"].as_str().unwrap(), &body);
        // The body is the stream's compact JSON, byte for byte.
        assert_eq!(published.get(&request.id), Some(&request.body));
    }
    let types = |requests: &[crate::support::Received]| -> BTreeMap<String, usize> {
        let mut types = BTreeMap::new();
        for request in requests {
            *types
                .entry(request.json()["type"].as_str().unwrap().to_owned())
                .or_default() += 1;
        }
        types
    };
    let distinct = |requests: &[crate::support::Received]| {
        requests
            .iter()
            .map(|r| r.id.clone())
            .collect::<HashSet<_>>()
            .len()
    };
    assert_eq!(
        types(&at_job),
        BTreeMap::from([
            ("job.succeeded".to_owned(), 3),
            ("job.failed".to_owned(), 2),
            ("job.cancelled".to_owned(), 1)
        ])
    );
    assert_eq!(distinct(&at_job), 6);
    assert_eq!(types(&at_batch)["batch.completed"], 1);
    assert_eq!(distinct(&at_batch), 7);
    assert_eq!(types(&at_global)["batch.completed"], 1);
    assert_eq!(types(&at_global)["job.succeeded"], 4);
    assert_eq!(distinct(&at_global), 8);
    assert!(
        at_global
            .iter()
            .any(|r| r.json()["data"]["job_id"] == standalone.id.as_str())
    );
    assert_eq!(
        types(&at_batches_only),
        BTreeMap::from([("batch.completed".to_owned(), 1)])
    );
    // Jobs enqueued without a trace, and batch events, still name a (new) trace per delivery.
    for request in at_global.iter().chain(&at_batches_only) {
        let header = request.traceparent.as_deref().unwrap_or_default();
        assert!(header.parse::<TraceParent>().is_ok(), "{request:?}");
    }
    let completed = at_batch
        .iter()
        .find(|r| r.json()["type"] == "batch.completed")
        .unwrap()
        .json();
    assert_eq!(completed["data"]["batch_id"], batch.as_str());
    assert_eq!(completed["data"]["total"], 6);
    assert_eq!(
        completed["data"]["counts"],
        serde_json::json!({"succeeded": 3, "failed": 2, "cancelled": 1})
    );
    assert_eq!(completed["data"]["charged_usd"], 2.1);
    let detail = get_delivery(&queue, &deliveries[0].id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(detail.attempts_log.len(), 1);
    assert_eq!(detail.attempts_log[0].status_code, Some(204));
    assert_eq!(detail.attempts_log[0].outcome, AttemptOutcome::Succeeded);
}

/// A batch whose failure guard trips tells its webhook, and the endpoints that subscribe to
/// `batch.paused`, once, signed, with a body its schema describes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_batch_sends_batch_paused_to_its_webhook_and_subscribers() {
    let queue = video_queue("wh-paused", |_| {}).await;
    let secret = new_secret();
    let ops_secret = new_secret();
    let receiver = Receiver::start(
        loopback(),
        &[("/batch", &[&secret]), ("/paused-only", &[&ops_secret])],
    )
    .await;
    let mut webhook_config = config(&secret, &["100ms"]);
    webhook_config.endpoints = vec![EndpointConfig {
        name: "ops".into(),
        url: receiver.url("/paused-only"),
        secret: ops_secret.as_str().into(),
        event_types: vec![klingq_core::EventType::BatchPaused],
    }];
    let webhooks = spawn_webhooks(&queue, webhook_config);
    let batch = klingq_core::JobId::new().to_string();
    queue
        .open_batch(
            &batch,
            &serde_json::json!({"webhook_url": receiver.url("/batch"), "max_failed": 1}),
            0,
        )
        .await
        .unwrap();
    let jobs = vec![video_job(None, Ending::Fail), video_job(None, Ending::Fail)];
    queue.enqueue_many(&jobs, Some(&batch)).await.unwrap();
    let video_worker = spawn_video_worker(&queue);

    // Two job.failed events and the pause reach the batch's URL; only the pause the
    // subscriber's.
    let at_batch = receiver.wait_for("/batch", 3, WAIT).await;
    let at_ops = receiver.wait_for("/paused-only", 1, WAIT).await;
    video_worker.stop().await;
    webhooks.stop().await.unwrap();
    let paused: Vec<_> = at_batch
        .iter()
        .filter(|r| r.json()["type"] == "batch.paused")
        .collect();
    assert_eq!(paused.len(), 1, "{at_batch:?}");
    assert_eq!(at_ops.len(), 1);
    assert_eq!(at_ops[0].id, paused[0].id, "one event, two endpoints");
    for request in [paused[0], &at_ops[0]] {
        assert_eq!(
            request.n_secrets_matched, 1,
            "signed with the endpoint's secret"
        );
        let body = request.json();
        assert_valid("batch.paused", &body);
        assert_eq!(body["id"], request.id);
    }
    let body = paused[0].json();
    assert_eq!(body["data"]["batch_id"], batch.as_str());
    assert_eq!(body["data"]["failed"], 2);
    assert_eq!(body["data"]["finished"], 2);
    assert_eq!(
        body["data"]["reason"],
        "2 jobs failed, more than max_failed 1"
    );
    assert!(queue.batch(&batch).await.unwrap().unwrap().paused);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_arrives_after_the_receiver_was_down_for_a_while() {
    let queue = video_queue("wh-down", |_| {}).await;
    let secret = new_secret();
    let port = klingq_testkit::redis::free_port();
    let url = format!("http://127.0.0.1:{port}/hook");
    let webhooks = spawn_webhooks(
        &queue,
        config(
            &secret,
            &[
                "100ms", "100ms", "200ms", "300ms", "500ms", "1s", "1s", "1s", "1s", "1s", "1s",
                "1s",
            ],
        ),
    );
    let video_worker = spawn_video_worker(&queue);
    let mut ids = Vec::new();
    let mut traces = HashMap::new();
    for _ in 0..3 {
        let mut job = video_job(Some(&url), Ending::Succeed);
        let trace = TraceParent::new_root();
        job.trace = Some(trace);
        let id = queue.enqueue(&job, None).await.unwrap().id;
        traces.insert(id.clone(), trace);
        ids.push(id);
    }
    // Nobody listens yet: every delivery fails and is retried.
    wait_for("every delivery to fail twice", WAIT, || async {
        let deliveries = all_deliveries(&queue).await;
        (deliveries.len() == 3 && deliveries.iter().all(|d| d.attempts >= 2)).then_some(())
    })
    .await
    .unwrap();
    let receiver = Receiver::start(
        format!("127.0.0.1:{port}").parse().unwrap(),
        &[("/hook", &[&secret])],
    )
    .await;
    receiver.wait_for("/hook", 3, WAIT).await;
    let mut delivered = Vec::new();
    for id in &ids {
        delivered.push(wait_delivery(&queue, id, &url, DeliveryStatus::Succeeded, WAIT).await);
    }
    webhooks.stop().await.unwrap();
    video_worker.stop().await;

    let received = receiver.received();
    assert!(received.iter().all(|r| r.n_secrets_matched == 1));
    let subjects: HashSet<String> = received
        .iter()
        .map(|r| r.json()["data"]["job_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(subjects, ids.iter().cloned().collect());
    // After retries, each delivery still continues its job's trace, as a child span.
    for request in &received {
        let job_id = request.json()["data"]["job_id"]
            .as_str()
            .unwrap()
            .to_owned();
        let header: TraceParent = request
            .traceparent
            .as_deref()
            .unwrap_or_else(|| panic!("no traceparent on {request:?}"))
            .parse()
            .unwrap();
        assert_eq!(header.trace_id(), traces[&job_id].trace_id());
    }
    for delivery in delivered {
        let detail = get_delivery(&queue, &delivery.id).await.unwrap().unwrap();
        let log = &detail.attempts_log;
        assert!(log.len() >= 3, "{log:#?}");
        let (last, failed) = log.split_last().unwrap();
        assert_eq!(last.outcome, AttemptOutcome::Succeeded);
        for attempt in failed {
            assert_eq!(attempt.outcome, AttemptOutcome::Failed, "{attempt:?}");
            assert_eq!(attempt.status_code, None);
            assert!(attempt.retry_in_ms.is_some());
            assert!(attempt.error.as_deref().is_some_and(|e| !e.is_empty()));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_disables_the_endpoint_until_it_is_re_enabled() {
    let queue = video_queue("wh-gone", |_| {}).await;
    let secret = new_secret();
    let receiver = Receiver::start(loopback(), &[("/gone", &[&secret])]).await;
    receiver.script(|_, _| Reply::status(410));
    let url = receiver.url("/gone");
    let webhooks = spawn_webhooks(&queue, config(&secret, &["100ms", "100ms"]));
    let video_worker = spawn_video_worker(&queue);

    let first = queue
        .enqueue(&video_job(Some(&url), Ending::Succeed), None)
        .await
        .unwrap()
        .id;
    let gone = wait_delivery(&queue, &first, &url, DeliveryStatus::Failed, WAIT).await;
    assert_eq!(gone.attempts, 1, "410 is not retried");
    assert_eq!(gone.last_status_code, Some(410));
    let disabled = disabled_endpoints(&queue).await.unwrap();
    assert_eq!(disabled.len(), 1);
    assert_eq!(disabled[0].endpoint_id, endpoint_id(&url));
    assert_eq!(disabled[0].delivery_id, gone.id);

    let second = queue
        .enqueue(&video_job(Some(&url), Ending::Succeed), None)
        .await
        .unwrap()
        .id;
    let skipped = wait_delivery(&queue, &second, &url, DeliveryStatus::Failed, WAIT).await;
    assert!(
        skipped
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("disabled")),
        "{skipped:?}"
    );
    assert_eq!(
        receiver.received().len(),
        1,
        "a disabled endpoint got another request"
    );

    assert!(enable_endpoint(&queue, &gone.endpoint_id).await.unwrap());
    assert!(disabled_endpoints(&queue).await.unwrap().is_empty());
    receiver.script(|_, _| Reply::status(200));
    let replay = replay_delivery(&queue, &skipped.id).await.unwrap();
    assert_eq!(replay.mode, ReplayMode::Copied);
    assert_eq!(replay.replay_of, skipped.id);
    let replayed = wait_for("the replay to succeed", WAIT, || async {
        let detail = get_delivery(&queue, &replay.delivery_id).await.unwrap()?;
        (detail.delivery.status == DeliveryStatus::Succeeded).then_some(detail)
    })
    .await
    .unwrap();
    webhooks.stop().await.unwrap();
    video_worker.stop().await;

    assert_eq!(
        replayed.delivery.replay_of.as_deref(),
        Some(skipped.id.as_str())
    );
    assert_eq!(replayed.delivery.event_id, skipped.event_id);
    let received = receiver.received();
    assert_eq!(received.len(), 2);
    assert_eq!(received[1].id, skipped.event_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_errors_exhaust_the_delivery_and_a_replay_delivers_it() {
    let queue = video_queue("wh-500", |_| {}).await;
    let secret = new_secret();
    let receiver = Receiver::start(loopback(), &[("/flaky", &[&secret])]).await;
    receiver.script(|_, _| Reply {
        status: 500,
        retry_after: None,
        body: "x".repeat(2048),
    });
    let url = receiver.url("/flaky");
    let webhooks = spawn_webhooks(&queue, config(&secret, &["100ms", "100ms"]));
    let video_worker = spawn_video_worker(&queue);
    let job = queue
        .enqueue(&video_job(Some(&url), Ending::Succeed), None)
        .await
        .unwrap()
        .id;

    let exhausted = wait_for("the delivery to be exhausted", WAIT, || async {
        let page = list_deliveries(
            &queue,
            &DeliveryQuery {
                status: Some(DeliveryStatus::Exhausted),
                ..DeliveryQuery::default()
            },
        )
        .await
        .unwrap();
        page.deliveries.into_iter().find(|d| d.subject == job)
    })
    .await
    .unwrap();
    assert_eq!((exhausted.attempts, exhausted.max_attempts), (3, 3));
    assert_eq!(exhausted.last_status_code, Some(500));
    assert!(
        exhausted
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("500"))
    );
    let detail = get_delivery(&queue, &exhausted.id).await.unwrap().unwrap();
    assert_eq!(detail.attempts_log.len(), 3);
    for (n, attempt) in detail.attempts_log.iter().enumerate() {
        assert_eq!(attempt.attempt, n as u32 + 1);
        assert_eq!(attempt.status_code, Some(500));
        assert_eq!(attempt.response_body.as_deref().map(str::len), Some(1024));
    }
    assert_eq!(
        detail.attempts_log[2].retry_in_ms, None,
        "the last attempt schedules nothing"
    );
    assert_eq!(receiver.received().len(), 3);

    receiver.script(|_, _| Reply::status(200));
    let replay = replay_delivery(&queue, &exhausted.id).await.unwrap();
    assert_eq!(replay.mode, ReplayMode::Redriven);
    assert_eq!(replay.delivery_id, exhausted.id);
    wait_delivery(&queue, &job, &url, DeliveryStatus::Succeeded, WAIT).await;
    assert!(matches!(
        replay_delivery(&queue, "00000000-0000-7000-8000-000000000000").await,
        Err(error) if error.is_not_found()
    ));
    webhooks.stop().await.unwrap();
    video_worker.stop().await;

    let received = receiver.received();
    assert_eq!(received.len(), 4);
    assert!(
        received
            .iter()
            .all(|r| r.id == exhausted.event_id && r.n_secrets_matched == 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttled_deliveries_wait_for_retry_after() {
    let queue = video_queue("wh-429", |_| {}).await;
    let secret = new_secret();
    let receiver = Receiver::start(
        loopback(),
        &[("/throttled", &[&secret]), ("/busy", &[&secret])],
    )
    .await;
    receiver.script(|path, nth| match (path, nth) {
        ("/throttled", 1) => Reply {
            status: 429,
            retry_after: Some("2".into()),
            body: String::new(),
        },
        ("/busy", 1) => Reply {
            status: 503,
            retry_after: Some("1".into()),
            body: String::new(),
        },
        _ => Reply::status(200),
    });
    // The schedule alone would retry after 50 ms.
    let webhooks = spawn_webhooks(&queue, config(&secret, &["50ms", "50ms", "50ms"]));
    let video_worker = spawn_video_worker(&queue);
    let throttled_url = receiver.url("/throttled");
    let busy_url = receiver.url("/busy");
    let throttled = queue
        .enqueue(&video_job(Some(&throttled_url), Ending::Succeed), None)
        .await
        .unwrap()
        .id;
    let busy = queue
        .enqueue(&video_job(Some(&busy_url), Ending::Succeed), None)
        .await
        .unwrap()
        .id;
    let cases = [
        (throttled, throttled_url, "/throttled", 429, 2000),
        (busy, busy_url, "/busy", 503, 1000),
    ];
    for (job, url, path, status, delay_ms) in cases {
        let delivery = wait_delivery(&queue, &job, &url, DeliveryStatus::Succeeded, WAIT).await;
        let log = get_delivery(&queue, &delivery.id)
            .await
            .unwrap()
            .unwrap()
            .attempts_log;
        assert_eq!(log.len(), 2, "{log:#?}");
        assert_eq!(log[0].outcome, AttemptOutcome::Throttled);
        assert_eq!(log[0].status_code, Some(status));
        assert_eq!(
            log[0].retry_in_ms,
            Some(delay_ms),
            "Retry-After sets the delay exactly"
        );
        assert_eq!(log[1].outcome, AttemptOutcome::Succeeded);
        let requests = receiver.received_at(path);
        assert_eq!(requests.len(), 2);
        let gap = requests[1].at.duration_since(requests[0].at);
        assert!(
            gap >= Duration::from_millis(delay_ms - 50),
            "retried after {gap:?}"
        );
    }
    webhooks.stop().await.unwrap();
    video_worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_targets_are_refused_unless_allow_listed() {
    let queue = video_queue("wh-ssrf", |_| {}).await;
    let secret = new_secret();
    let receiver = Receiver::start(loopback(), &[]).await;
    let port = receiver.addr.port();
    let mut no_allow_list = config(&secret, &["100ms"]);
    no_allow_list.allow_cidrs.clear();
    let webhooks = spawn_webhooks(&queue, no_allow_list);
    let video_worker = spawn_video_worker(&queue);
    // None of these may be contacted: the literals are refused before connecting, and the
    // name is refused by the resolver.
    let targets = [
        (format!("http://127.0.0.1:{port}/a"), "loopback"),
        (format!("http://[::1]:{port}/b"), "loopback"),
        ("http://10.0.0.1/c".to_owned(), "private"),
        (
            "http://169.254.169.254/latest/meta-data/".to_owned(),
            "link-local",
        ),
        (format!("http://[::ffff:127.0.0.1]:{port}/d"), "loopback"),
        (format!("http://localhost:{port}/e"), "resolves to"),
    ];
    let mut jobs = Vec::new();
    for (url, _) in &targets {
        jobs.push(
            queue
                .enqueue(&video_job(Some(url), Ending::Succeed), None)
                .await
                .unwrap()
                .id,
        );
    }
    for ((url, why), job) in targets.iter().zip(&jobs) {
        let endpoint = klingq_core::redact_url(url);
        let refused = wait_delivery(&queue, job, &endpoint, DeliveryStatus::Failed, WAIT).await;
        assert_eq!(refused.attempts, 1, "{url}: a refusal is not retried");
        let error = refused.last_error.unwrap_or_default();
        assert!(
            error.contains("refused") && error.contains(why),
            "{url}: {error}"
        );
        let detail = get_delivery(&queue, &refused.id).await.unwrap().unwrap();
        assert_eq!(detail.attempts_log[0].outcome, AttemptOutcome::Refused);
    }
    webhooks.stop().await.unwrap();
    video_worker.stop().await;
    assert!(receiver.received().is_empty(), "{:?}", receiver.received());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_dispatcher_s_events_are_taken_over() {
    let queue = video_queue("wh-claim", |config| {
        config.lease_timeout_secs = 1;
        config.reclaim_interval_secs = 1;
    })
    .await;
    let secret = new_secret();
    let receiver = Receiver::start(loopback(), &[("/hook", &[&secret])]).await;
    let url = receiver.url("/hook");
    let video_worker = spawn_video_worker(&queue);
    let job = queue
        .enqueue(&video_job(Some(&url), Ending::Succeed), None)
        .await
        .unwrap()
        .id;
    wait_for("the job to finish", WAIT, || async {
        let record = queue.job(&job).await.unwrap()?;
        record.state.is_terminal().then_some(())
    })
    .await
    .unwrap();
    // A dispatcher reads the event and dies before acknowledging it.
    let mut dead = queue
        .events_groups(klingq_events::DISPATCH_GROUP, "dead-dispatcher")
        .remove(0);
    dead.ensure().await.unwrap();
    let read = dead.read_new(100, Duration::from_millis(10)).await.unwrap();
    assert_eq!(read.events.len(), 1, "{read:?}");
    drop(dead);
    let stream = queue.keys().events();
    let conn = raw_redis(&queue).await;

    let webhooks = spawn_webhooks(&queue, config(&secret, &["100ms"]));
    let received = receiver.wait_for("/hook", 1, WAIT).await;
    assert_eq!(received[0].json()["data"]["job_id"], job.as_str());
    wait_for("the event to be acknowledged", WAIT, || {
        let mut conn = conn.clone();
        let stream = stream.clone();
        async move {
            let pending: (u64, redis::Value, redis::Value, redis::Value) = redis::cmd("XPENDING")
                .arg(&stream)
                .arg(klingq_events::DISPATCH_GROUP)
                .query_async(&mut conn)
                .await
                .ok()?;
            (pending.0 == 0).then_some(())
        }
    })
    .await
    .unwrap();
    webhooks.stop().await.unwrap();
    video_worker.stop().await;
    assert_eq!(receiver.received().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn urls_the_client_cannot_send_to_fail_at_once() {
    let queue = video_queue("wh-invalid-url", |_| {}).await;
    let secret = new_secret();
    // With a retry schedule, a delivery that were retried would take a second attempt.
    let webhooks = spawn_webhooks(&queue, config(&secret, &["100ms", "100ms"]));
    let video_worker = spawn_video_worker(&queue);
    // Enqueued past the producer's validation, as a job stored by an older release would be.
    let targets = [
        // The URL parser accepts this host; no HTTP request line can carry it.
        "https://x\"onmouseover=alert(1)//e.com/".to_owned(),
        format!("https://hooks.example.com/{}", "a".repeat(900 * 1024)),
    ];
    let mut jobs = Vec::new();
    for url in &targets {
        jobs.push(
            queue
                .enqueue(&video_job(Some(url), Ending::Succeed), None)
                .await
                .unwrap()
                .id,
        );
    }
    for (url, job) in targets.iter().zip(&jobs) {
        let endpoint = klingq_core::redact_url(url);
        let failed = wait_delivery(&queue, job, &endpoint, DeliveryStatus::Failed, WAIT).await;
        assert_eq!(failed.attempts, 1, "{url:.60}: not retried");
        let detail = get_delivery(&queue, &failed.id).await.unwrap().unwrap();
        assert_eq!(detail.attempts_log.len(), 1);
        assert_eq!(detail.attempts_log[0].outcome, AttemptOutcome::Refused);
        let error = detail.attempts_log[0].error.clone().unwrap_or_default();
        assert!(
            error.contains("cannot be delivered to"),
            "{url:.60}: {error:.300}"
        );
        assert!(
            error.len() < 1024,
            "{url:.60}: the error names the rule, not the URL"
        );
    }
    webhooks.stop().await.unwrap();
    video_worker.stop().await;
}
