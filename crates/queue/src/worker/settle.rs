//! Settling deliveries: one script call per partition for every settle waiting, so that a
//! busy worker settles many jobs per round trip.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use klingq_core::{JobError, JobState};
use tokio::sync::{mpsc, oneshot};

use super::{Shared, held_key};
use crate::completion::BuiltEvent;
use crate::error::QueueError;
use crate::lease::{Delivery, Kept};
use crate::queue::{Queue, ScriptBatch};
use crate::scripts;

/// How a delivery is settled.
#[derive(Debug)]
pub(crate) enum Settle {
    Finish {
        state: JobState,
        reason: String,
        error: Option<JobError>,
        event: Option<BuiltEvent>,
        charged_micros: u64,
    },
    Retry {
        delay: Duration,
        reason: String,
        error: Option<JobError>,
    },
    Defer {
        delay: Duration,
        reason: String,
    },
    Park {
        delay: Duration,
        reason: String,
    },
}

/// Settles a delivery, retrying Redis errors for up to a lease; then forgets the entry.
/// If Redis stays away, the entry stays pending and is handed out again after its lease.
/// What the handler kept ([`crate::Lease::keep_checkpoint`], [`crate::Lease::keep_progress`])
/// is saved with the settle: one write instead of a checkpoint and a settle.
pub(crate) async fn settle(shared: &Shared, delivery: &Delivery, settle: Settle, kept: Kept) {
    let mut item = SettleItem {
        stream: delivery.stream.clone(),
        entry: delivery.entry.clone(),
        id: delivery.job_id.clone(),
        action: "",
        state: "",
        delay_ms: 0,
        reason: String::new(),
        error: None,
        checkpoint: None,
        event_id: None,
        event_type: None,
        event: None,
        charged_micros: 0,
    };
    let (action, delay, reason, error) = match settle {
        Settle::Finish {
            state,
            reason,
            error,
            event,
            charged_micros,
        } => {
            item.state = state.as_str();
            item.charged_micros = charged_micros;
            if let Some(event) = event {
                item.event_id = Some(event.id);
                item.event_type = Some(event.event_type);
                item.event = Some(event.body);
            }
            ("finish", Duration::ZERO, reason, error)
        }
        Settle::Retry {
            delay,
            reason,
            error,
        } => ("retry", delay, reason, error),
        Settle::Defer { delay, reason } => ("defer", delay, reason, None),
        Settle::Park { delay, reason } => {
            item.state = kept.state.map_or("", |state| state.as_str());
            ("park", delay, reason, None)
        }
    };
    item.action = action;
    item.delay_ms = delay.as_millis() as u64;
    item.reason = reason;
    item.error = error.and_then(|e| serde_json::to_string(&e).ok());
    item.checkpoint = kept.checkpoint;
    match run_settle(shared, delivery.partition, item).await {
        Ok(reply) if reply == "lost" => {
            shared.stats.leases_lost.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(job_id = %delivery.job_id, "settle refused: another worker holds the job");
        }
        Ok(_) => {}
        Err(error) => shared.note_redis_error("settle", &error),
    }
    shared
        .held
        .lock()
        .expect("held map poisoned")
        .remove(&held_key(&delivery.stream, &delivery.entry));
}

crate::wire::record! {
    /// One settle of `settle.lua` (see the script for each field).
    #[derive(Debug, Clone)]
    struct SettleItem {
        stream: String,
        entry: String,
        id: String,
        action: &'static str,
        state: &'static str,
        delay_ms: u64,
        reason: String,
        error: Option<String>,
        checkpoint: Option<String>,
        event_id: Option<String>,
        event_type: Option<&'static str>,
        event: Option<String>,
        charged_micros: u64,
    }
}

crate::wire::record! {
    /// `settle.lua`'s header.
    struct SettleHeader<'a> {
        consumer: &'a str,
    }
}

/// Where a settle's reply goes.
type SettleReply = oneshot::Sender<Result<String, QueueError>>;

/// One settle's partition, its script item and where its reply goes.
pub(super) type SettleRequest = (usize, SettleItem, SettleReply);

/// Runs a settle through the settler task, which folds concurrent settles into one script
/// call per partition; directly when there is no settler.
async fn run_settle(
    shared: &Shared,
    partition: usize,
    item: SettleItem,
) -> Result<String, QueueError> {
    if let Some(settler) = shared.settler.get() {
        let (reply_to, reply) = oneshot::channel();
        if settler.send((partition, item.clone(), reply_to)).is_ok()
            && let Ok(result) = reply.await
        {
            return result;
        }
    }
    let replies = settle_batch(
        &shared.queue,
        &shared.consumer,
        partition,
        std::slice::from_ref(&item),
    )
    .await?;
    Ok(replies.into_iter().next().unwrap_or_default())
}

/// Runs one settle script call for many settles of partition `p`. Every settle is safe to
/// run twice (the ownership check answers 'gone'), so retrying the call after a lost reply
/// is harmless.
async fn settle_batch(
    queue: &Queue,
    consumer: &str,
    p: usize,
    settles: &[SettleItem],
) -> Result<Vec<String>, QueueError> {
    let cmd = queue.call_items(&scripts::SETTLE, p, &SettleHeader { consumer }, settles);
    let budget = queue.config().lease_timeout();
    queue.run_scripts(&ScriptBatch::One(cmd), budget).await
}

/// Folds whatever settles are waiting (up to 128) into one script call per partition.
pub(super) async fn settler(
    queue: Queue,
    consumer: String,
    mut requests: mpsc::UnboundedReceiver<SettleRequest>,
) {
    while let Some(first) = requests.recv().await {
        let mut waiting = vec![first];
        while waiting.len() < 128 {
            match requests.try_recv() {
                Ok(request) => waiting.push(request),
                Err(_) => break,
            }
        }
        let mut by_partition: HashMap<usize, Vec<(SettleItem, _)>> = HashMap::new();
        for (p, item, reply_to) in waiting {
            by_partition.entry(p).or_default().push((item, reply_to));
        }
        futures::future::join_all(
            by_partition
                .into_iter()
                .map(|(p, batch)| settle_group(&queue, &consumer, p, batch)),
        )
        .await;
    }
}

/// Settles one partition's waiting settles in one script call and answers each.
async fn settle_group(
    queue: &Queue,
    consumer: &str,
    p: usize,
    batch: Vec<(SettleItem, SettleReply)>,
) {
    let (items, reply_tos): (Vec<SettleItem>, Vec<_>) = batch.into_iter().unzip();
    match settle_batch(queue, consumer, p, &items).await {
        Ok(replies) => {
            for (reply_to, reply) in reply_tos.into_iter().zip(replies) {
                let _ = reply_to.send(Ok(reply));
            }
        }
        Err(error) => {
            let message = error.to_string();
            for reply_to in reply_tos {
                let _ = reply_to.send(Err(QueueError::Protocol(message.clone())));
            }
        }
    }
}
