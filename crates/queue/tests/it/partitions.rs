//! A namespace spread over several partitions: batches stay whole, single jobs spread, what is
//! global stays global, every reader sees every partition, and a namespace keeps the count it
//! holds jobs under.

use std::collections::{HashMap, HashSet};

use klingq_queue::{BudgetDecision, QueueError, key_slot};
use klingq_testkit::cluster::RedisCluster;

use super::*;

async fn partitioned_queue(prefix: &str, partitions: u32) -> Queue {
    shared_queue(prefix, |config| {
        config.partitions = partitions;
        config.idempotency_ttl_secs = 600;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_partitions_keep_batches_whole_and_what_is_global_global() {
    let queue = partitioned_queue("parts", 4).await;
    let parts = queue.partitions().clone();
    assert_eq!(parts.len(), 4);

    // Single jobs spread by id.
    let singles: Vec<NewJob> = (0..40).map(|n| job(n, Behavior::Succeed)).collect();
    let single_ids = enqueue_ids(&queue, &singles, None).await;
    let used: HashSet<usize> = single_ids.iter().map(|id| parts.of(id)).collect();
    assert!(used.len() >= 3, "single jobs spread: {used:?}");

    // A batch lives in one partition: every job id is drawn into it.
    let batch = klingq_core::JobId::new().to_string();
    queue
        .open_batch(&batch, &serde_json::json!({}), 0)
        .await
        .unwrap();
    let batch_jobs: Vec<NewJob> = (100..120).map(|n| job(n, Behavior::Succeed)).collect();
    let batch_ids = enqueue_ids(&queue, &batch_jobs, Some(&batch)).await;
    assert!(batch_ids.iter().all(|id| parts.of(id) == parts.of(&batch)));
    // An id moved into the batch's partition is derived from the caller's: the same call
    // again finds the jobs it wrote.
    let again = queue.enqueue_many(&batch_jobs, Some(&batch)).await.unwrap();
    assert_eq!(
        again
            .iter()
            .map(|e| (e.id.as_str(), e.created))
            .collect::<Vec<_>>(),
        batch_ids
            .iter()
            .map(|id| (id.as_str(), false))
            .collect::<Vec<_>>()
    );
    queue.seal_batch(&batch).await.unwrap();
    // A batch placed by its first job's key lands where a retry's would.
    let hinted = queue.new_batch_id(Some("first-key"));
    assert_eq!(parts.of(&hinted), parts.of_key(queue.name(), "first-key"));

    // An idempotency key finds its first job from any candidate id.
    let mut keyed = job(200, Behavior::Succeed);
    keyed.idempotency_key = Some("order-7".into());
    let first = queue.enqueue(&keyed, None).await.unwrap();
    for _ in 0..5 {
        keyed.id = klingq_core::JobId::new();
        let again = queue.enqueue(&keyed, None).await.unwrap();
        assert_eq!(
            (again.id.as_str(), again.created),
            (first.id.as_str(), false)
        );
    }
    assert_eq!(parts.of(&first.id), parts.of_key(queue.name(), "order-7"));

    // The daily budget is one, whatever partition a job lives in; a reservation counts once.
    let elsewhere = single_ids
        .iter()
        .find(|id| parts.of(id) != 0)
        .expect("a job outside partition 0");
    let before = queue.spent_today_micros().await.unwrap();
    for _ in 0..2 {
        assert_eq!(
            queue
                .reserve_budget(elsewhere, 1_000, 0, "default", 0)
                .await
                .unwrap(),
            BudgetDecision::Reserved
        );
    }
    assert_eq!(queue.spent_today_micros().await.unwrap(), before + 1_000);
    // Reserved once, it stays reserved on a full day (as a partition-0 job does).
    let spent = queue.spent_today_micros().await.unwrap();
    assert_eq!(
        queue
            .reserve_budget(elsewhere, 1_000, spent, "default", 0)
            .await
            .unwrap(),
        BudgetDecision::Reserved
    );
    assert_eq!(queue.spent_today_micros().await.unwrap(), spent);
    let over = queue.spent_today_micros().await.unwrap() + 1;
    let other = single_ids
        .iter()
        .find(|id| parts.of(id) != 0 && *id != elsewhere)
        .unwrap();
    assert!(matches!(
        queue
            .reserve_budget(other, over, over, "default", 0)
            .await
            .unwrap(),
        BudgetDecision::OverDailyBudget { .. }
    ));

    // One worker drains every partition.
    let total = single_ids.len() + batch_ids.len() + 1;
    let stats = queue.stats().await.unwrap();
    assert_eq!(stats.waiting as usize, total, "{stats:?}");
    let seen = Seen::default();
    let worker = spawn_worker(&queue, 8, &seen);
    let record = wait_batch_done(&queue, &batch, Duration::from_secs(60)).await;
    assert_eq!(record.counts.get("succeeded"), Some(&20));
    wait_for("every job to succeed", Duration::from_secs(60), || async {
        let counters = queue.counters().await.unwrap();
        (counters.get("finished:succeeded").copied() == Some(total as u64)).then_some(())
    })
    .await
    .unwrap();
    worker.stop().await;
    for id in single_ids.iter().chain(&batch_ids) {
        assert_eq!(seen.runs_of(id), 1, "{id}");
    }
    let stats = queue.stats().await.unwrap();
    assert_eq!((stats.waiting, stats.in_flight), (0, 0));
    assert_eq!(queue.job_ids(0, 1_000).await.unwrap().len(), total);
    assert_eq!(queue.batch_ids(0, 10).await.unwrap(), [batch.as_str()]);

    // Events of every partition read as one log, resumable from any event's cursor.
    let events = queue.read_events("0", 10_000, None).await.unwrap();
    assert_eq!(events.len(), total + 1, "every job's event and the batch's");
    assert_eq!(queue.events_len().await.unwrap() as usize, total + 1);
    let subjects: HashSet<&str> = events.iter().map(|e| e.subject.as_str()).collect();
    assert_eq!(subjects.len(), total + 1);
    let cursor = &events[9].cursor;
    assert_eq!(cursor.split(',').count(), 4, "{cursor}");
    let rest = queue.read_events(cursor, 10_000, None).await.unwrap();
    assert_eq!(
        rest.iter().map(|e| &e.id).collect::<Vec<_>>(),
        events[10..].iter().map(|e| &e.id).collect::<Vec<_>>()
    );
    // In small pages too: nothing skipped, nothing twice.
    let mut paged = Vec::new();
    let mut at = "0".to_owned();
    loop {
        let page = queue.read_events(&at, 7, None).await.unwrap();
        let Some(last) = page.last() else { break };
        at = last.cursor.clone();
        paged.extend(page.into_iter().map(|e| e.id));
    }
    assert_eq!(
        paged,
        events.iter().map(|e| e.id.clone()).collect::<Vec<_>>()
    );
    // The newest events resume right after themselves.
    let recent = queue.recent_events(3).await.unwrap();
    assert_eq!(
        recent.iter().map(|e| &e.id).collect::<Vec<_>>(),
        events[events.len() - 3..]
            .iter()
            .map(|e| &e.id)
            .collect::<Vec<_>>()
    );
    assert!(
        queue
            .read_events(&recent[2].cursor, 10, None)
            .await
            .unwrap()
            .is_empty()
    );
    let after_first = queue
        .read_events(&recent[0].cursor, 10, None)
        .await
        .unwrap();
    assert_eq!(after_first.len(), 2);
    // A blocking read wakes for an event in any partition.
    let waiter = {
        let queue = queue.clone();
        let at = recent[2].cursor.clone();
        tokio::spawn(async move {
            queue
                .read_events(&at, 10, Some(Duration::from_secs(30)))
                .await
                .unwrap()
        })
    };
    let late = enqueue_ids(&queue, &[job(300, Behavior::Succeed)], None).await;
    queue.cancel(&late[0], "test").await.unwrap();
    let woke = waiter.await.unwrap();
    assert_eq!(woke.len(), 1);
    assert_eq!(woke[0].subject, late[0]);
    assert!(matches!(
        queue.read_events("1-0,2-0", 10, None).await,
        Err(QueueError::BadCursor { .. })
    ));

    // Listing and deleting see every partition.
    assert!(queue.delete_namespace().await.unwrap() > total as u64);
    assert!(queue.job(&single_ids[0]).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_in_one_partition_does_not_starve_the_others() {
    let queue = partitioned_queue("parts-fair", 4).await;
    let parts = queue.partitions().clone();
    // A big batch in partition 0, then single jobs in the other partitions.
    let batch = parts.id_in(0).to_string();
    queue
        .open_batch(&batch, &serde_json::json!({}), 0)
        .await
        .unwrap();
    let backlog: Vec<NewJob> = (0..120).map(|n| job(n, Behavior::Succeed)).collect();
    enqueue_ids(&queue, &backlog, Some(&batch)).await;
    queue.seal_batch(&batch).await.unwrap();
    let singles: Vec<NewJob> = (0..9)
        .map(|i| {
            let mut single = job(1_000 + i, Behavior::Succeed);
            single.id = parts.id_in(1 + i as usize % 3);
            single
        })
        .collect();
    enqueue_ids(&queue, &singles, None).await;
    let seen = Seen::default();
    let worker = spawn_worker(&queue, 2, &seen);
    wait_batch_done(&queue, &batch, Duration::from_secs(60)).await;
    wait_for(
        "the single jobs to run",
        Duration::from_secs(30),
        || async { (seen.order.lock().unwrap().len() >= 129).then_some(()) },
    )
    .await
    .unwrap();
    worker.stop().await;
    let order = seen.order.lock().unwrap().clone();
    let last_single = order.iter().rposition(|n| *n >= 1_000).unwrap();
    // Taking turns, the other partitions' jobs all ran while the batch was still draining.
    assert!(
        last_single < 80,
        "the last single job ran {last_single}th: {order:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_keeps_its_partition_count_while_it_holds_jobs() {
    require_shared_redis().await.unwrap();
    let namespace = unique_namespace("parts-fixed");
    let with = |partitions: u32| QueueConfig {
        partitions,
        ..config(&namespace)
    };
    let queue = Queue::connect(with(2)).await.unwrap();
    enqueue_ids(&queue, &[job(1, Behavior::Succeed)], None).await;
    let refused = Queue::connect(with(3)).await.unwrap_err();
    let message = refused.to_string();
    assert!(
        matches!(
            refused,
            QueueError::PartitionsMismatch {
                recorded: 2,
                configured: 3,
                ..
            }
        ),
        "{message}"
    );
    for needle in [
        "KLINGQ_QUEUE_PARTITIONS",
        "queue.namespace",
        "in use with 2",
        &namespace,
    ] {
        assert!(message.contains(needle), "{message}");
    }
    assert!(matches!(
        Queue::connect(with(0)).await.unwrap_err(),
        QueueError::PartitionsOutOfRange { value: 0, .. }
    ));
    // Emptied, the namespace takes the new count.
    queue.delete_namespace().await.unwrap();
    let regrown = Queue::connect(with(3)).await.unwrap();
    enqueue_ids(&regrown, &[job(2, Behavior::Succeed)], None).await;
    assert!(Queue::connect(with(2)).await.is_err());

    // A namespace from before partitions (no record) holds one.
    let legacy = unique_namespace("parts-legacy");
    let old = Queue::connect(config(&legacy)).await.unwrap();
    enqueue_ids(&old, &[job(3, Behavior::Succeed)], None).await;
    let mut conn = raw_redis(&old).await;
    let _: i64 = redis::cmd("DEL")
        .arg(old.keys().meta())
        .query_async(&mut conn)
        .await
        .unwrap();
    let refused = Queue::connect(QueueConfig {
        partitions: 4,
        ..config(&legacy)
    })
    .await
    .unwrap_err();
    assert!(
        matches!(refused, QueueError::PartitionsMismatch { recorded: 1, .. }),
        "{refused}"
    );
    old.delete_namespace().await.unwrap();
    regrown.delete_namespace().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_partitions_spread_one_namespace_over_three_shards() {
    let cluster = RedisCluster::start().await.unwrap();
    let queue = Queue::connect(QueueConfig {
        redis_url: cluster.seed_url(),
        partitions: 6,
        ..config(&unique_namespace("parts-cluster"))
    })
    .await
    .unwrap();
    let mut per_owner: HashMap<u16, usize> = HashMap::new();
    for (_, keys) in queue.partitions().all() {
        let owner = cluster
            .owner_of_slot(key_slot(&keys.route()))
            .await
            .unwrap();
        *per_owner.entry(owner).or_default() += 1;
    }
    assert_eq!(per_owner.len(), 3, "{per_owner:?}");
    assert!(per_owner.values().all(|n| *n == 2), "{per_owner:?}");
    let topology = queue.topology().await.to_string();
    assert!(topology.contains("6 partitions on 3 shards"), "{topology}");

    cluster.reset_stats().await.unwrap();
    let jobs: Vec<NewJob> = (0..300).map(|n| job(n, Behavior::Succeed)).collect();
    let ids = enqueue_ids(&queue, &jobs, None).await;
    let seen = Seen::default();
    let worker = spawn_worker(&queue, 16, &seen);
    wait_for("every job to succeed", Duration::from_secs(120), || async {
        let counters = queue.counters().await.unwrap();
        (counters.get("finished:succeeded").copied() == Some(ids.len() as u64)).then_some(())
    })
    .await
    .unwrap();
    worker.stop().await;
    assert!(ids.iter().all(|id| seen.runs_of(id) == 1));
    let events = queue.read_events("0", 1_000, None).await.unwrap();
    assert_eq!(events.len(), ids.len());
    // Every shard carried a share of the work; none carried most of it.
    let per_node: Vec<(u16, u64)> = cluster
        .commands_per_node()
        .await
        .unwrap()
        .into_iter()
        .filter(|(port, _)| per_owner.contains_key(port))
        .collect();
    let total: u64 = per_node.iter().map(|(_, n)| n).sum();
    for (node, n) in &per_node {
        assert!(
            *n * 100 <= total * 60 && *n * 100 >= total * 10,
            "node {node} ran {n} of {total} commands: {per_node:?}"
        );
    }
}
