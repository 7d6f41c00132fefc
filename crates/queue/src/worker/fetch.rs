//! Fetching: reads of the ready streams, recovery of expired leases (`XAUTOCLAIM`) and of
//! this consumer's own unstarted entries, and the start script that counts each attempt.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use klingq_core::{JobState, Priority};
use redis::Value;

use super::backend::FetchOutput;
use super::{Shared, held_key};
use crate::conn::Dedicated;
use crate::error::QueueError;
use crate::keys::GROUP;
use crate::lease::Delivery;
use crate::queue::{ScriptBatch, parse_entries, parse_streams, value_string};
use crate::scripts;
use crate::wire::Rows;

/// One fetch: connect what is not connected, reclaim expired leases when due, read (high
/// priority first, partitions in turn from `turn`, then a blocking read on all of them),
/// then start what was read. Connections come back, `None` where one broke. A group of
/// partitions that fails (a shard failing over) is skipped: the others are still read, and
/// what they delivered is started. The result is an error only when nothing was delivered
/// and something failed (the backend then backs off).
pub(super) async fn fetch(
    shared: Arc<Shared>,
    mut conns: Vec<Option<Dedicated>>,
    count: usize,
    reclaim: bool,
    turn: usize,
) -> FetchOutput {
    let mut entries = Entries::new();
    let mut failures: Vec<QueueError> = Vec::new();
    // A new connection first looks at this consumer's own pending entries: a read whose
    // reply was lost with the old connection delivered entries nobody started.
    for group in 0..conns.len() {
        if conns[group].is_some() {
            continue;
        }
        let connected = async {
            let mut conn = connect_fetch(&shared, group).await?;
            let streams = shared.streams_of(&shared.groups[group]);
            recover_own_pending(&shared, &mut conn, &streams, count, &mut entries).await?;
            Ok::<_, QueueError>(conn)
        };
        match connected.await {
            Ok(conn) => conns[group] = Some(conn),
            Err(error) => failures.push(drop_group(&shared, &mut conns, group, error)),
        }
    }
    if !entries.is_empty() {
        tracing::info!(
            n = entries.len(),
            "recovered jobs read just before the connection broke"
        );
    } else if conns.iter().any(Option::is_some) {
        read(
            &shared,
            &mut conns,
            count,
            reclaim,
            turn,
            &mut entries,
            &mut failures,
        )
        .await;
    }
    let (deliveries, unstarted) = start(&shared, entries).await;
    for (p, error) in unstarted {
        // Read but not started: pending for this consumer and held by nobody. A new
        // connection of the partition's group recovers them at the next fetch.
        let group = shared
            .groups
            .iter()
            .position(|partitions| partitions.contains(&p))
            .unwrap_or(0);
        failures.push(drop_group(&shared, &mut conns, group, error));
    }
    let last = if deliveries.is_empty() {
        failures.pop()
    } else {
        None
    };
    for error in &failures {
        shared.note_redis_error("fetch", error);
    }
    match last {
        Some(error) => (conns, Err(error)),
        None => (conns, Ok(deliveries)),
    }
}

/// Forgets group `group`'s fetch connection after `error` (the next fetch opens another).
fn drop_group(
    shared: &Shared,
    conns: &mut [Option<Dedicated>],
    group: usize,
    error: QueueError,
) -> QueueError {
    conns[group] = None;
    shared
        .fetch_clients
        .lock()
        .expect("fetch clients poisoned")
        .remove(&group);
    error
}

async fn connect_fetch(shared: &Shared, group: usize) -> Result<Dedicated, QueueError> {
    let config = shared.queue.config();
    let mut conn = shared
        .queue
        .dedicated_connection(
            config.block_timeout() + config.command_timeout(),
            shared.groups[group][0],
        )
        .await?;
    for (_, stream) in shared.streams_of(&shared.groups[group]) {
        let created: redis::RedisResult<Value> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&stream)
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await;
        if let Err(error) = created
            && error.code() != Some("BUSYGROUP")
        {
            return Err(error.into());
        }
    }
    let client_id: i64 = redis::cmd("CLIENT")
        .arg("ID")
        .query_async(&mut conn)
        .await?;
    shared
        .fetch_clients
        .lock()
        .expect("fetch clients poisoned")
        .insert(group, (client_id, conn.clone()));
    Ok(conn)
}

/// Entries read: (partition, stream, entry, job id).
type Entries = Vec<(usize, String, String, String)>;

/// Reads into `entries` from every connected group; a group whose read fails is dropped
/// (its error goes to `failures`) and the others go on.
async fn read(
    shared: &Shared,
    conns: &mut [Option<Dedicated>],
    count: usize,
    reclaim: bool,
    turn: usize,
    entries: &mut Entries,
    failures: &mut Vec<QueueError>,
) {
    let n_groups = conns.len();
    let order: Vec<usize> = (0..n_groups).map(|k| (turn + k) % n_groups).collect();
    if reclaim {
        for &group in &order {
            let Some(conn) = conns[group].as_mut() else {
                continue;
            };
            let streams = shared.streams_of(&shared.groups[group]);
            let wanted = count.saturating_sub(entries.len()).max(1);
            if let Err(error) = reclaim_expired(shared, conn, &streams, wanted, entries).await {
                failures.push(drop_group(shared, conns, group, error));
            }
        }
        if !entries.is_empty() {
            shared
                .stats
                .reclaimed
                .fetch_add(entries.len(), Ordering::Relaxed);
            tracing::info!(n = entries.len(), "reclaimed jobs whose lease expired");
            return;
        }
    }
    // High priority first everywhere; within a priority, every partition in turn from
    // `turn`, so that a backlog in one partition does not starve the others.
    for priority in Priority::ALL {
        for &group in &order {
            let partitions = &shared.groups[group];
            for k in 0..partitions.len() {
                let p = partitions[(turn + k) % partitions.len()];
                let Some(conn) = conns[group].as_mut() else {
                    break;
                };
                let stream = shared
                    .queue
                    .partitions()
                    .keys(p)
                    .ready(shared.queue.name(), priority);
                let wanted = count - entries.len();
                let reply: Result<Value, _> = redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg(GROUP)
                    .arg(&shared.consumer)
                    .arg("COUNT")
                    .arg(wanted)
                    .arg("STREAMS")
                    .arg(&stream)
                    .arg(">")
                    .query_async(conn)
                    .await;
                match reply {
                    Ok(reply) => collect(&[(p, stream)], &reply, entries),
                    Err(error) => {
                        failures.push(drop_group(shared, conns, group, error.into()));
                        break;
                    }
                }
                if entries.len() >= count {
                    return;
                }
            }
        }
    }
    if !entries.is_empty() || shared.is_shutting_down() {
        return;
    }
    block_on_all(shared, conns, count, entries, failures).await;
}

/// A blocking read on every connected group at once. The first group to deliver ends the
/// others' reads (`CLIENT UNBLOCK`), whose entries, if any came meanwhile, are taken too: an
/// entry read is never dropped.
async fn block_on_all(
    shared: &Shared,
    conns: &mut [Option<Dedicated>],
    count: usize,
    entries: &mut Entries,
    failures: &mut Vec<QueueError>,
) {
    let block = shared.queue.config().block_timeout().as_millis() as u64;
    let mut reads: FuturesUnordered<_> = conns
        .iter_mut()
        .enumerate()
        .filter_map(|(group, conn)| conn.as_mut().map(|conn| (group, conn)))
        .map(|(group, conn)| {
            let streams = shared.streams_of(&shared.groups[group]);
            // COUNT applies per stream: share the free slots between them.
            let per_stream = count.div_ceil(streams.len()).max(1);
            async move {
                let reply = read_group_cmd(shared, per_stream, Some(block), &streams, ">")
                    .query_async::<Value>(conn)
                    .await;
                (group, streams, reply)
            }
        })
        .collect();
    let mut failed: Vec<(usize, QueueError)> = Vec::new();
    let mut unblocked = reads.len() == 1;
    while let Some((group, streams, reply)) = reads.next().await {
        match reply {
            Ok(reply) => collect(&streams, &reply, entries),
            Err(error) => failed.push((group, error.into())),
        }
        if (!entries.is_empty() || !failed.is_empty()) && !unblocked {
            unblocked = true;
            unblock_fetches(shared, group).await;
        }
    }
    drop(reads);
    for (group, error) in failed {
        failures.push(drop_group(shared, conns, group, error));
    }
}

/// Ends the blocking reads of every fetch connection but `except`'s, from a control
/// connection to each one's own node.
async fn unblock_fetches(shared: &Shared, except: usize) {
    let clients: Vec<(i64, Dedicated)> = shared
        .fetch_clients
        .lock()
        .expect("fetch clients poisoned")
        .iter()
        .filter(|(group, _)| **group != except)
        .map(|(_, client)| client.clone())
        .collect();
    for (client_id, conn) in clients {
        if let Err(error) = conn.unblock(client_id).await {
            // The read then ends at its block timeout: later, not wrong.
            tracing::debug!(%error, "could not unblock a fetch");
        }
    }
}

/// This consumer's pending entries that no handler here holds: delivered by a read whose
/// reply was lost when the connection broke (the entries are pending for this consumer, and
/// without this they would wait a whole lease for another worker's `XAUTOCLAIM`).
async fn recover_own_pending(
    shared: &Shared,
    conn: &mut Dedicated,
    streams: &[(usize, String)],
    count: usize,
    entries: &mut Entries,
) -> Result<(), QueueError> {
    // `0`: this consumer's pending entries rather than new ones. COUNT applies per stream,
    // and all of them are taken: one left out would wait for a whole lease.
    let reply: Value = read_group_cmd(shared, count, None, streams, "0")
        .query_async(conn)
        .await?;
    let mut pending = Entries::new();
    collect(streams, &reply, &mut pending);
    let held = shared.held.lock().expect("held map poisoned");
    entries.extend(
        pending
            .into_iter()
            .filter(|(_, stream, entry, _)| !held.contains_key(&held_key(stream, entry))),
    );
    Ok(())
}

/// `XREADGROUP` for this consumer on `streams`, each from `from` (`>`: new entries, `0`: its
/// own pending ones), blocking for `block` ms when given.
fn read_group_cmd(
    shared: &Shared,
    count: usize,
    block: Option<u64>,
    streams: &[(usize, String)],
    from: &str,
) -> redis::Cmd {
    let mut cmd = redis::cmd("XREADGROUP");
    cmd.arg("GROUP")
        .arg(GROUP)
        .arg(&shared.consumer)
        .arg("COUNT")
        .arg(count);
    if let Some(block) = block {
        cmd.arg("BLOCK").arg(block);
    }
    cmd.arg("STREAMS");
    for (_, stream) in streams {
        cmd.arg(stream);
    }
    for _ in streams {
        cmd.arg(from);
    }
    cmd
}

/// The entries of a read of `streams` (whose partitions it names).
fn collect(streams: &[(usize, String)], reply: &Value, entries: &mut Entries) {
    for (stream, stream_entries) in parse_streams(reply) {
        let Some((p, _)) = streams.iter().find(|(_, name)| *name == stream) else {
            continue;
        };
        for (entry, fields) in stream_entries {
            if let Some(job_id) = fields.get("id") {
                entries.push((*p, stream.clone(), entry, job_id.clone()));
            }
        }
    }
}

async fn reclaim_expired(
    shared: &Shared,
    conn: &mut Dedicated,
    streams: &[(usize, String)],
    count: usize,
    entries: &mut Entries,
) -> Result<(), QueueError> {
    let lease_ms = shared.queue.config().lease_timeout().as_millis() as u64;
    for (p, stream) in streams {
        let Some(wanted) = count.checked_sub(entries.len()).filter(|n| *n > 0) else {
            return Ok(());
        };
        let cursor = shared
            .reclaim_cursors
            .lock()
            .expect("cursor map poisoned")
            .get(stream)
            .cloned()
            .unwrap_or_else(|| "0-0".to_owned());
        let reply: Value = redis::cmd("XAUTOCLAIM")
            .arg(stream)
            .arg(GROUP)
            .arg(&shared.consumer)
            .arg(lease_ms)
            .arg(&cursor)
            .arg("COUNT")
            .arg(wanted)
            .query_async(conn)
            .await?;
        let Value::Array(parts) = reply else {
            continue;
        };
        let next = parts
            .first()
            .and_then(value_string)
            .unwrap_or_else(|| "0-0".to_owned());
        shared
            .reclaim_cursors
            .lock()
            .expect("cursor map poisoned")
            .insert(stream.clone(), next);
        let claimed = parts.get(1).map(parse_entries).unwrap_or_default();
        let held = shared.held.lock().expect("held map poisoned");
        for (entry, fields) in claimed {
            // Our own entries come back when renewals lapsed (Redis was away): they still run here.
            if held.contains_key(&held_key(stream, &entry)) {
                continue;
            }
            if let Some(job_id) = fields.get("id") {
                entries.push((*p, stream.clone(), entry, job_id.clone()));
            }
        }
    }
    Ok(())
}

/// Runs the start script on read entries, one call per partition: counts attempts and
/// reads the jobs. Returns what started, and each partition whose call failed.
async fn start(shared: &Shared, entries: Entries) -> (Vec<Delivery>, Vec<(usize, QueueError)>) {
    let mut by_partition: HashMap<usize, Vec<(String, String, String)>> = HashMap::new();
    for (p, stream, entry, job_id) in entries {
        by_partition
            .entry(p)
            .or_default()
            .push((stream, entry, job_id));
    }
    let mut deliveries = Vec::new();
    let mut failed = Vec::new();
    for (p, entries) in by_partition {
        if let Err(error) = start_in(shared, p, &entries, &mut deliveries).await {
            failed.push((p, error));
        }
    }
    (deliveries, failed)
}

crate::wire::record! {
    /// `start.lua`'s header.
    struct StartHeader<'a> {
        consumer: &'a str,
    }
}

crate::wire::record! {
    /// One entry of `start.lua`.
    struct StartItem<'a> {
        stream: &'a str,
        entry: &'a str,
        id: &'a str,
    }
}

async fn start_in(
    shared: &Shared,
    p: usize,
    entries: &[(String, String, String)],
    deliveries: &mut Vec<Delivery>,
) -> Result<(), QueueError> {
    let items: Vec<StartItem<'_>> = entries
        .iter()
        .map(|(stream, entry, id)| StartItem { stream, entry, id })
        .collect();
    let cmd = shared.queue.call_items(
        &scripts::START,
        p,
        &StartHeader {
            consumer: &shared.consumer,
        },
        &items,
    );
    // Entry ids are unique per stream; with the job id they name one entry.
    let stream_of: HashMap<(&str, &str), &str> = items
        .iter()
        .map(|item| ((item.entry, item.id), item.stream))
        .collect();
    let reply: Value = shared
        .queue
        .run_scripts(&ScriptBatch::One(cmd), Duration::from_secs(10))
        .await?;
    let rows = Rows::parse(reply)?;
    for row in rows.iter() {
        let entry = row.text("entry");
        let job_id = row.text("id");
        let Some(stream) = stream_of.get(&(entry.as_str(), job_id.as_str())) else {
            continue;
        };
        deliveries.push(Delivery {
            partition: p,
            stream: (*stream).to_owned(),
            entry,
            job_id,
            attempts: row.number("attempts") as u32,
            max_attempts: row.number("max_attempts") as u32,
            payload: row.text("payload"),
            batch: row.opt("batch"),
            redrives: row.number("redrives") as u32,
            checkpoint: row.opt("checkpoint"),
            created_ms: row.number("created_ms"),
            state: row.text("state").parse().unwrap_or(JobState::Queued),
            // A job enqueued without one (or by an older release) starts a trace per attempt.
            trace: row.text("trace").parse().ok(),
        });
    }
    Ok(())
}
