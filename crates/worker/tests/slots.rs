//! Provider slots come back after a Redis outage (a real, persistent `redis-server` that is
//! killed and restarted), without waiting for their leases to run out.

use std::time::Duration;

use klingq_queue::{Queue, QueueConfig, SlotClaim};
use klingq_testkit::redis::{RedisServer, unique_namespace};
use klingq_testkit::wait_for;
use klingq_worker::SlotReleaser;
use klingq_worker::pipeline::PROVIDER_LIMIT;

/// Far longer than the test: a slot that is still counted was not released.
const LEASE: Duration = Duration::from_secs(900);

#[tokio::test]
async fn releases_that_fail_during_an_outage_are_done_when_redis_returns() {
    let mut redis = RedisServer::start_persistent().await.unwrap();
    let queue = Queue::connect(QueueConfig {
        redis_url: redis.url(),
        namespace: unique_namespace("slots"),
        ..QueueConfig::default()
    })
    .await
    .unwrap();
    let mut holders: Vec<String> = (0..10).map(|i| format!("job-{i}")).collect();
    holders.push("again".to_owned());
    for holder in &holders {
        let slot = queue
            .acquire_slot(PROVIDER_LIMIT, holder, SlotClaim::anonymous(), LEASE, 11)
            .await
            .unwrap();
        assert!(slot.acquired);
    }
    assert_eq!(queue.slot_usage(PROVIDER_LIMIT, 11).await.unwrap().0, 11);

    redis.stop().await.unwrap();
    let releaser = SlotReleaser::new(queue.clone(), PROVIDER_LIMIT, LEASE);
    let releases = holders.iter().map(|holder| releaser.release(holder));
    futures::future::join_all(releases).await;
    assert_eq!(
        releaser.pending(),
        11,
        "every release failed while Redis was down"
    );
    assert_eq!(releaser.deferred_total(), 11);
    // A later attempt of this job takes its slot again: its pending release is dropped here
    // (a retry already in flight may still land: the fence below is what keeps the slot).
    releaser.forget("again");

    redis.restart().await.unwrap();
    // The later attempt's slot outlasts the released one's fence, so the fenced release keeps
    // it whether it lands before or after this acquire.
    let again = wait_for(
        "the slot to be taken again",
        Duration::from_secs(60),
        || {
            let queue = queue.clone();
            async move {
                queue
                    .acquire_slot(
                        PROVIDER_LIMIT,
                        "again",
                        SlotClaim::anonymous(),
                        LEASE * 2,
                        11,
                    )
                    .await
                    .ok()
            }
        },
    )
    .await
    .unwrap();
    assert!(again.acquired);
    // The restarted Redis reloaded the slots from its append-only file.
    let usage = wait_for(
        "the released slots to be gone",
        Duration::from_secs(60),
        || {
            let queue = queue.clone();
            async move {
                let (in_use, _) = queue.slot_usage(PROVIDER_LIMIT, 11).await.ok()?;
                (in_use <= 1).then_some(in_use)
            }
        },
    )
    .await
    .unwrap();
    assert_eq!(usage, 1, "the slot taken again is still held");
    wait_for("no release pending", Duration::from_secs(30), || {
        let pending = releaser.pending();
        async move { (pending == 0).then_some(()) }
    })
    .await
    .unwrap();
    assert_eq!(releaser.abandoned_total(), 0);
    // The slot taken again survived: releasing it now removes exactly one.
    assert!(
        queue
            .release_slot_fenced(PROVIDER_LIMIT, "again", u64::MAX / 2)
            .await
            .unwrap()
    );
}

#[tokio::test]
async fn a_fenced_release_keeps_a_slot_taken_after_the_fence() {
    let redis = RedisServer::start().await.unwrap();
    let queue = Queue::connect(QueueConfig {
        redis_url: redis.url(),
        namespace: unique_namespace("fence"),
        ..QueueConfig::default()
    })
    .await
    .unwrap();
    queue
        .acquire_slot(PROVIDER_LIMIT, "job", SlotClaim::anonymous(), LEASE, 4)
        .await
        .unwrap();
    let now = klingq_core::job::now_ms();
    // The slot expires about now + LEASE, past a fence of now: kept.
    assert!(
        !queue
            .release_slot_fenced(PROVIDER_LIMIT, "job", now)
            .await
            .unwrap()
    );
    assert_eq!(queue.slot_usage(PROVIDER_LIMIT, 4).await.unwrap().0, 1);
    // A fence past its expiry: removed.
    let fence = now + LEASE.as_millis() as u64 + 60_000;
    assert!(
        queue
            .release_slot_fenced(PROVIDER_LIMIT, "job", fence)
            .await
            .unwrap()
    );
    assert_eq!(queue.slot_usage(PROVIDER_LIMIT, 4).await.unwrap().0, 0);
    // Nothing to release: nothing removed.
    assert!(
        !queue
            .release_slot_fenced(PROVIDER_LIMIT, "job", fence)
            .await
            .unwrap()
    );
}
