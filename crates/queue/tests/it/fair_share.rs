//! The provider's fair share between tenants, by dollars started (`slot_acquire.lua`,
//! `slot_release.lua`): the scheduler alone, against a real Redis, with jobs that no worker
//! runs; a release stands in for a run that ended.

use std::collections::{BTreeMap, BTreeSet};

use klingq_queue::{BudgetDecision, SlotClaim, SlotWait, TenantUsage};

use super::*;

const LIMIT: &str = "provider";
const LEASE: Duration = Duration::from_secs(600);

struct Tenant {
    name: &'static str,
    micros: u64,
    weight: f64,
    max_concurrency: u64,
}

/// Enqueues `n` jobs of `tenant` and has each ask for a slot (in order); returns their ids.
async fn arrive(queue: &Queue, tenant: &Tenant, n: u64, cap: u64) -> Vec<String> {
    let jobs: Vec<NewJob> = (0..n)
        .map(|i| {
            let mut new_job = job(i, Behavior::Succeed);
            new_job.tenant = Some(tenant.name.to_owned());
            new_job.estimated_micros = tenant.micros;
            new_job
        })
        .collect();
    let ids = enqueue_ids(queue, &jobs, None).await;
    for id in &ids {
        ask(queue, tenant, id, Priority::Normal, cap).await;
    }
    ids
}

async fn ask(
    queue: &Queue,
    tenant: &Tenant,
    id: &str,
    priority: Priority,
    cap: u64,
) -> klingq_queue::SlotStatus {
    let claim = SlotClaim {
        tenant: tenant.name,
        micros: tenant.micros,
        weight: tenant.weight,
        max_concurrency: tenant.max_concurrency,
        priority,
    };
    queue
        .acquire_slot_or_wait(LIMIT, id, claim, LEASE, cap)
        .await
        .unwrap()
}

async fn holders(queue: &Queue, conn: &mut redis::aio::MultiplexedConnection) -> BTreeSet<String> {
    let list: Vec<String> = redis::cmd("ZRANGE")
        .arg(queue.keys().limit(LIMIT))
        .arg(0)
        .arg(-1)
        .query_async(conn)
        .await
        .unwrap();
    list.into_iter().collect()
}

/// Ends the oldest run (first started) until nothing waits, recording who started next.
/// Returns the runs started after `from`, in order.
async fn drain(
    queue: &Queue,
    conn: &mut redis::aio::MultiplexedConnection,
    running: &mut Vec<String>,
) -> Vec<String> {
    let mut started = Vec::new();
    let mut held = holders(queue, conn).await;
    while !running.is_empty() {
        let done = running.remove(0);
        queue.release_slot(LIMIT, &done).await.unwrap();
        held.remove(&done);
        let now = holders(queue, conn).await;
        let new: Vec<String> = now.difference(&held).cloned().collect();
        assert!(new.len() <= 1, "one release, one start: {new:?}");
        running.extend(new.iter().cloned());
        started.extend(new);
        held = now;
    }
    started
}

fn usage_of<'a>(usage: &'a [TenantUsage], name: &str) -> &'a TenantUsage {
    usage.iter().find(|u| u.tenant == name).unwrap()
}

/// The case: tenant A queues 60 clips of 15 s ($2.10), then B 30 clips of 3 s
/// ($0.42), equal weights, 4 provider slots. While both wait, each starts the same dollars
/// (within one A clip); first in, first out would start B nothing until A's last clip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_two_tenants_wait_each_starts_the_same_dollars() {
    let queue = shared_queue("fair-dollars", |_| {}).await;
    let mut conn = raw_redis(&queue).await;
    let a = Tenant {
        name: "a",
        micros: 2_100_000,
        weight: 1.0,
        max_concurrency: 0,
    };
    let b = Tenant {
        name: "b",
        micros: 420_000,
        weight: 1.0,
        max_concurrency: 0,
    };
    let a_ids = arrive(&queue, &a, 60, 4).await;
    let b_ids = arrive(&queue, &b, 30, 4).await;
    let mut running: Vec<String> = a_ids[..4].to_vec();
    assert_eq!(
        holders(&queue, &mut conn).await,
        running.iter().cloned().collect()
    );

    let started = drain(&queue, &mut conn, &mut running).await;
    assert_eq!(started.len(), 86, "every waiter started once");
    let b_set: BTreeSet<&String> = b_ids.iter().collect();
    let last_b = started.iter().rposition(|id| b_set.contains(id)).unwrap();
    let (mut dollars_a, mut dollars_b) = (0u64, 0u64);
    for id in &started[..=last_b] {
        if b_set.contains(id) {
            dollars_b += b.micros
        } else {
            dollars_a += a.micros
        }
    }
    assert_eq!(dollars_b, 30 * 420_000);
    let ratio = dollars_a as f64 / dollars_b as f64;
    assert!(
        (0.8..=1.2).contains(&ratio),
        "A ${dollars_a} vs B ${dollars_b} while both waited"
    );

    // Within a tenant, first come first served.
    let a_order: Vec<&String> = started.iter().filter(|id| !b_set.contains(id)).collect();
    assert_eq!(a_order, a_ids[4..].iter().collect::<Vec<_>>());

    let usage = queue.tenant_usage().await.unwrap();
    assert_eq!(usage_of(&usage, "a").started_micros, 60 * 2_100_000);
    assert_eq!(usage_of(&usage, "b").started_micros, 30 * 420_000);
    assert_eq!(usage_of(&usage, "a").enqueued, 60);
    assert_eq!(
        (
            usage_of(&usage, "a").in_flight,
            usage_of(&usage, "a").waiting_for_slot
        ),
        (0, 0)
    );
    queue.delete_namespace().await.unwrap();
}

/// Weights 3:1 with equal costs: three starts for the heavy tenant per start of the light one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_divide_the_dollars() {
    let queue = shared_queue("fair-weights", |_| {}).await;
    let mut conn = raw_redis(&queue).await;
    let heavy = Tenant {
        name: "heavy",
        micros: 700_000,
        weight: 3.0,
        max_concurrency: 0,
    };
    let light = Tenant {
        name: "light",
        micros: 700_000,
        weight: 1.0,
        max_concurrency: 0,
    };
    let hold = arrive(&queue, &light, 2, 2).await;
    let heavy_ids = arrive(&queue, &heavy, 40, 2).await;
    let light_ids = arrive(&queue, &light, 40, 2).await;
    let mut running = hold;
    let started = drain(&queue, &mut conn, &mut running).await;
    let light_set: BTreeSet<&String> = light_ids.iter().collect();
    // While both wait (until the heavy tenant's last start), count starts.
    let last_heavy = started
        .iter()
        .rposition(|id| heavy_ids.contains(id))
        .unwrap();
    let n_light = started[..=last_heavy]
        .iter()
        .filter(|id| light_set.contains(id))
        .count();
    let n_heavy = last_heavy + 1 - n_light;
    assert_eq!(n_heavy, 40);
    let ratio = n_heavy as f64 / n_light as f64;
    assert!(
        (2.4..=3.6).contains(&ratio),
        "{n_heavy} heavy vs {n_light} light starts"
    );
    queue.delete_namespace().await.unwrap();
}

/// A tenant's max_concurrency holds even with free slots and the lowest virtual time, and
/// priorities order a tenant's own jobs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_cap_holds_and_priorities_order_its_jobs() {
    let queue = shared_queue("fair-caps", |_| {}).await;
    let mut conn = raw_redis(&queue).await;
    let capped = Tenant {
        name: "capped",
        micros: 100_000,
        weight: 1.0,
        max_concurrency: 1,
    };
    let ids = arrive(&queue, &capped, 3, 4).await;
    assert_eq!(
        holders(&queue, &mut conn).await,
        [ids[0].clone()].into_iter().collect()
    );
    let status = ask(&queue, &capped, &ids[1], Priority::Normal, 4).await;
    assert_eq!(
        (status.acquired, status.wait),
        (false, Some(SlotWait::TenantLimit))
    );

    // A later high-priority job of the tenant goes before its earlier normal ones.
    let urgent = enqueue_ids(
        &queue,
        &[{
            let mut j = job(9, Behavior::Succeed);
            j.tenant = Some("capped".to_owned());
            j
        }],
        None,
    )
    .await
    .remove(0);
    ask(&queue, &capped, &urgent, Priority::High, 4).await;
    queue.release_slot(LIMIT, &ids[0]).await.unwrap();
    assert_eq!(
        holders(&queue, &mut conn).await,
        [urgent.clone()].into_iter().collect()
    );

    // Another tenant arriving now takes the free slots the capped tenant may not.
    let other = Tenant {
        name: "other",
        micros: 100_000,
        weight: 1.0,
        max_concurrency: 0,
    };
    let other_ids = arrive(&queue, &other, 3, 4).await;
    let held = holders(&queue, &mut conn).await;
    assert_eq!(held.len(), 4, "{held:?}");
    assert!(other_ids.iter().all(|id| held.contains(id)));
    let usage = queue.tenant_usage().await.unwrap();
    assert_eq!(usage_of(&usage, "capped").in_flight, 1);
    assert_eq!(usage_of(&usage, "capped").waiting_for_slot, 2);
    assert_eq!(usage_of(&usage, "other").in_flight, 3);
    queue.delete_namespace().await.unwrap();
}

/// A tenant's daily budget refuses what would pass it, and counts only what it reserved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_budget_refuses_past_its_limit() {
    let queue = shared_queue("tenant-budget", |_| {}).await;
    let ids = enqueue_ids(
        &queue,
        &[job(0, Behavior::Succeed), job(1, Behavior::Succeed)],
        None,
    )
    .await;
    let reserve = |id: String| {
        let queue = queue.clone();
        async move {
            queue
                .reserve_budget(&id, 700_000, 0, "acme", 1_000_000)
                .await
                .unwrap()
        }
    };
    assert_eq!(reserve(ids[0].clone()).await, BudgetDecision::Reserved);
    assert_eq!(
        reserve(ids[1].clone()).await,
        BudgetDecision::OverTenantBudget {
            spent_micros: 700_000
        }
    );
    // Another tenant has its own budget.
    assert_eq!(
        queue
            .reserve_budget(&ids[1], 700_000, 0, "other", 1_000_000)
            .await
            .unwrap(),
        BudgetDecision::Reserved
    );
    let usage: BTreeMap<String, u64> = queue
        .tenant_usage()
        .await
        .unwrap()
        .into_iter()
        .map(|u| (u.tenant.clone(), u.reserved_today_micros))
        .collect();
    assert_eq!(usage.get("acme"), Some(&700_000));
    assert_eq!(usage.get("other"), Some(&700_000));
    queue.delete_namespace().await.unwrap();
}
