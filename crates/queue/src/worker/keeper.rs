//! The lease keeper: renews held entries, promotes due jobs and tidies up; and the release of
//! held entries a stopping worker never ran.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use klingq_core::job::now_ms;
use redis::Value;
use tokio::sync::watch;

use super::{Held, Shared, held_key};
use crate::error::QueueError;
use crate::keys::GROUP;
use crate::queue::ScriptBatch;
use crate::scripts;

/// Renews leases, promotes due jobs and tidies up, until stopped.
pub(super) async fn keeper(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let config = shared.queue.config().clone();
    let mut renew = tokio::time::interval(config.renew_interval());
    let mut promote = tokio::time::interval(config.promote_interval());
    let mut tidy = tokio::time::interval(Duration::from_secs(60));
    // The history's sample, at the start of each minute (plus a second, past clock skew).
    let now = now_ms();
    let to_next_minute = crate::history::minute_of(now) + 61_000 - now;
    let mut history = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_millis(to_next_minute),
        Duration::from_secs(60),
    );
    for timer in [&mut renew, &mut promote, &mut tidy, &mut history] {
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    }
    loop {
        tokio::select! {
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    return;
                }
            }
            _ = renew.tick() => renew_leases(&shared).await,
            _ = promote.tick() => {
                if let Err(error) = shared.queue.promote_due().await {
                    shared.note_redis_error("promote", &error);
                }
            }
            _ = history.tick() => {
                if let Err(error) = shared.queue.record_history(now_ms()).await {
                    shared.note_redis_error("history", &error);
                }
            }
            _ = tidy.tick() => {
                if let Err(error) = tidy_up(&shared).await {
                    shared.note_redis_error("tidy", &error);
                }
            }
        }
    }
}

async fn renew_leases(shared: &Shared) {
    let held: Vec<(usize, (String, String))> = shared
        .held
        .lock()
        .expect("held map poisoned")
        .values()
        .map(|held| (held.partition, (held.stream.clone(), held.entry.clone())))
        .collect();
    for (p, chunk) in by_partition(held) {
        let items: Vec<EntryItem<'_>> = chunk
            .iter()
            .map(|(stream, entry)| EntryItem { stream, entry })
            .collect();
        let cmd = shared.queue.call_items(
            &scripts::RENEW,
            p,
            &ConsumerHeader {
                consumer: &shared.consumer,
            },
            &items,
        );
        let budget = shared.queue.config().renew_interval();
        match shared
            .queue
            .run_scripts::<Vec<usize>>(&ScriptBatch::One(cmd), budget)
            .await
        {
            Ok(lost) => {
                let held = shared.held.lock().expect("held map poisoned");
                for (stream, entry) in lost.into_iter().filter_map(|i| chunk.get(i)) {
                    // Entries settled meanwhile are gone from the map: not a loss.
                    if let Some(h) = held.get(&held_key(stream, entry))
                        && !h.lost.swap(true, Ordering::Relaxed)
                    {
                        shared.stats.leases_lost.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(job_id = %h.job_id, "lease lost: another worker took the job");
                    }
                }
            }
            Err(error) => shared.note_redis_error("lease renewal", &error),
        }
    }
}

/// Drops expired ids from the indexes and removes long-idle consumers with nothing pending,
/// in every partition.
async fn tidy_up(shared: &Shared) -> Result<(), QueueError> {
    let queue = &shared.queue;
    let config = queue.config();
    let horizon = now_ms().saturating_sub(config.retention_secs * 1000);
    let mut conn = queue.connection();
    for (_, keys) in queue.partitions().all() {
        let mut pipe = redis::pipe();
        for key in [
            keys.dead(queue.name()),
            keys.jobs_index(queue.name()),
            keys.batches(),
        ] {
            pipe.cmd("ZREMRANGEBYSCORE")
                .arg(key)
                .arg("-inf")
                .arg(horizon)
                .ignore();
        }
        let _: () = pipe.query_async(&mut conn).await?;
    }
    let idle_limit_ms = (config.lease_timeout().as_millis() as u64 * 10).max(3_600_000);
    let every: Vec<usize> = (0..queue.partitions().len()).collect();
    for (_, stream) in shared.streams_of(&every) {
        let consumers: Value = match redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(&stream)
            .arg(GROUP)
            .query_async(&mut conn)
            .await
        {
            Ok(value) => value,
            Err(_) => continue,
        };
        let Value::Array(consumers) = consumers else {
            continue;
        };
        for consumer in consumers {
            let fields = crate::queue::flat_map(&consumer);
            let pending: u64 = fields
                .get("pending")
                .and_then(|p| p.parse().ok())
                .unwrap_or(1);
            let idle: u64 = fields.get("idle").and_then(|p| p.parse().ok()).unwrap_or(0);
            if let Some(name) = fields.get("name")
                && pending == 0
                && idle > idle_limit_ms
                && *name != shared.consumer
            {
                let _: Result<i64, _> = redis::cmd("XGROUP")
                    .arg("DELCONSUMER")
                    .arg(&stream)
                    .arg(GROUP)
                    .arg(name)
                    .query_async(&mut conn)
                    .await;
            }
        }
    }
    Ok(())
}

/// Held entries grouped by partition, in chunks of at most 256 (one script call each).
pub(super) fn by_partition<T>(entries: Vec<(usize, T)>) -> Vec<(usize, Vec<T>)> {
    let mut groups: HashMap<usize, Vec<T>> = HashMap::new();
    for (p, entry) in entries {
        groups.entry(p).or_default().push(entry);
    }
    let mut chunks = Vec::new();
    for (p, mut group) in groups {
        while !group.is_empty() {
            let rest = group.split_off(group.len().min(256));
            chunks.push((p, std::mem::replace(&mut group, rest)));
        }
    }
    chunks
}

pub(super) async fn release(shared: &Shared, entries: Vec<(String, Held)>) -> usize {
    let mut n_released = 0;
    let entries = entries
        .into_iter()
        .map(|(_, held)| (held.partition, held))
        .collect();
    for (p, chunk) in by_partition(entries) {
        let items: Vec<HeldItem<'_>> = chunk
            .iter()
            .map(|held| HeldItem {
                stream: &held.stream,
                entry: &held.entry,
                id: &held.job_id,
            })
            .collect();
        let cmd = shared.queue.call_items(
            &scripts::RELEASE_MANY,
            p,
            &ConsumerHeader {
                consumer: &shared.consumer,
            },
            &items,
        );
        match shared
            .queue
            .run_scripts::<usize>(&ScriptBatch::One(cmd), Duration::from_secs(5))
            .await
        {
            Ok(n) => n_released += n,
            Err(error) => shared.note_redis_error("release", &error),
        }
    }
    n_released
}

crate::wire::record! {
    /// The header of `renew.lua` and `release_many.lua`.
    struct ConsumerHeader<'a> {
        consumer: &'a str,
    }
}

crate::wire::record! {
    /// One held entry of `renew.lua`.
    struct EntryItem<'a> {
        stream: &'a str,
        entry: &'a str,
    }
}

crate::wire::record! {
    /// One held entry of `release_many.lua`.
    struct HeldItem<'a> {
        stream: &'a str,
        entry: &'a str,
        id: &'a str,
    }
}
