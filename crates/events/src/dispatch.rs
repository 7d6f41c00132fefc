//! The dispatcher: reads the completion events stream with a consumer group and fans each
//! event out into one delivery job per subscribed endpoint on the `webhooks` queue.
//!
//! - Read: `XREADGROUP GROUP webhooks <consumer>` on a dedicated connection (its BLOCK would
//!   stall shared traffic); first this consumer's own pending entries, then new ones.
//! - Fan-out: the job's `webhook_url` (job payload), its batch's `webhook_url` (batch info),
//!   and the global endpoints that want the event type; one URL gets one delivery.
//! - Exactly one delivery per (event, endpoint): the delivery's job id is a hash of both, and
//!   enqueueing an existing id is a no-op, so an event read twice enqueues nothing new.
//! - Ack: `XACK` only after the deliveries are enqueued. A dispatcher that dies leaves its
//!   entries pending; another takes them with `XAUTOCLAIM` once idle for a lease.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use klingq_queue::{NewJob, Queue};
use redis::Value as Reply;
use redis::aio::MultiplexedConnection;
use serde_json::Value;
use tokio::sync::watch;

use crate::config::Checked;
use crate::error::WebhookError;
use crate::payload::{DeliveryJob, EndpointSource, delivery_id};

/// The consumer group of dispatchers on the events stream.
pub const DISPATCH_GROUP: &str = "webhooks";
/// Entries read (or claimed) per call.
const READ_COUNT: usize = 100;

pub(crate) struct Dispatcher {
    /// The queue whose namespace publishes the events (jobs and batches are read from it).
    pub(crate) source: Queue,
    /// The `webhooks` queue deliveries are enqueued on.
    pub(crate) deliveries: Queue,
    pub(crate) config: std::sync::Arc<Checked>,
    pub(crate) consumer: String,
}

/// Where the read loop is.
struct Cursor {
    conn: Option<MultiplexedConnection>,
    /// Reading this consumer's own pending entries (after a start or an error).
    backlog: bool,
    last_claim: Option<Instant>,
    group_ready: bool,
}

impl Dispatcher {
    /// Runs until `stop` turns true. Redis errors are logged and retried with backoff.
    pub(crate) async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut cursor = Cursor {
            conn: None,
            backlog: true,
            last_claim: None,
            group_ready: false,
        };
        let mut n_failures: u32 = 0;
        tracing::info!(consumer = %self.consumer, "webhook dispatcher started");
        loop {
            if *stop.borrow() {
                break;
            }
            let outcome = tokio::select! {
                outcome = self.step(&mut cursor) => outcome,
                _ = stop.changed() => break,
            };
            match outcome {
                Ok(()) => n_failures = 0,
                Err(error) => {
                    n_failures = n_failures.saturating_add(1);
                    cursor.conn = None;
                    cursor.backlog = true;
                    cursor.group_ready = false;
                    let delay = Duration::from_millis(100)
                        .saturating_mul(1 << n_failures.min(6))
                        .min(Duration::from_secs(5));
                    tracing::warn!(%error, ?delay, "webhook dispatch failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stop.changed() => break,
                    }
                }
            }
        }
        tracing::info!(consumer = %self.consumer, "webhook dispatcher stopped");
    }

    async fn step(&self, cursor: &mut Cursor) -> Result<(), WebhookError> {
        let stream = self.source.keys().events();
        if !cursor.group_ready {
            self.ensure_group(&stream).await?;
            cursor.group_ready = true;
        }
        let reclaim_interval = self.source.config().reclaim_interval();
        if cursor
            .last_claim
            .is_none_or(|at| at.elapsed() >= reclaim_interval)
        {
            cursor.last_claim = Some(Instant::now());
            self.reclaim(&stream).await?;
        }
        let block = self.source.config().block_timeout();
        if cursor.conn.is_none() {
            cursor.conn = Some(
                self.source
                    .dedicated_connection(block + self.source.config().command_timeout())
                    .await?,
            );
        }
        let conn = cursor.conn.as_mut().expect("connection set above");
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(DISPATCH_GROUP)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(READ_COUNT);
        if !cursor.backlog {
            cmd.arg("BLOCK").arg(block.as_millis() as u64);
        }
        cmd.arg("STREAMS")
            .arg(&stream)
            .arg(if cursor.backlog { "0" } else { ">" });
        let reply: Reply = cmd.query_async(conn).await?;
        let entries = read_reply_entries(&reply);
        if cursor.backlog && entries.is_empty() {
            cursor.backlog = false;
        }
        self.dispatch(&stream, &entries).await
    }

    async fn ensure_group(&self, stream: &str) -> Result<(), WebhookError> {
        let mut conn = self.source.connection();
        // From the stream's start: events published before the first dispatcher ran (a cancel
        // through the API, say) are delivered too.
        let created: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(stream)
            .arg(DISPATCH_GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await;
        match created {
            Err(error) if error.code() != Some("BUSYGROUP") => Err(error.into()),
            _ => Ok(()),
        }
    }

    /// Takes over entries another dispatcher left pending for a whole lease.
    async fn reclaim(&self, stream: &str) -> Result<(), WebhookError> {
        let min_idle = self.source.config().lease_timeout().as_millis() as u64;
        let mut start = "0-0".to_owned();
        // A bounded number of rounds per call, so a huge backlog does not starve new events.
        for _ in 0..10 {
            let mut conn = self.source.connection();
            let reply: Reply = redis::cmd("XAUTOCLAIM")
                .arg(stream)
                .arg(DISPATCH_GROUP)
                .arg(&self.consumer)
                .arg(min_idle)
                .arg(&start)
                .arg("COUNT")
                .arg(READ_COUNT)
                .query_async(&mut conn)
                .await?;
            let Reply::Array(parts) = reply else {
                break;
            };
            let next = parts
                .first()
                .and_then(text)
                .unwrap_or_else(|| "0-0".to_owned());
            let claimed = parts.get(1).map(entries_of).unwrap_or_default();
            if !claimed.is_empty() {
                tracing::info!(
                    n_entries = claimed.len(),
                    "webhook dispatcher took over pending events"
                );
            }
            // Entries trimmed from the stream come back without fields (Redis 6) or as
            // deleted ids (Redis 7); `dispatch` acknowledges both, sending nothing.
            let mut deleted: Vec<Entry> = match parts.get(2) {
                Some(Reply::Array(ids)) => ids
                    .iter()
                    .filter_map(text)
                    .map(|id| Entry {
                        id,
                        fields: HashMap::new(),
                    })
                    .collect(),
                _ => Vec::new(),
            };
            if !deleted.is_empty() {
                tracing::warn!(
                    n_entries = deleted.len(),
                    "pending webhook events were trimmed before dispatch"
                );
            }
            deleted.extend(claimed);
            self.dispatch(stream, &deleted).await?;
            if next == "0-0" {
                break;
            }
            start = next;
        }
        Ok(())
    }

    /// Enqueues the deliveries of `entries`, then acknowledges them.
    async fn dispatch(&self, stream: &str, entries: &[Entry]) -> Result<(), WebhookError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut jobs = Vec::new();
        for entry in entries {
            jobs.extend(self.fan_out(entry).await?);
        }
        if !jobs.is_empty() {
            let enqueued = self.deliveries.enqueue_many(&jobs, None).await?;
            let n_new = enqueued.iter().filter(|e| e.created).count();
            tracing::debug!(
                n_events = entries.len(),
                n_deliveries = jobs.len(),
                n_new,
                "webhook events dispatched"
            );
        }
        let ids: Vec<String> = entries.iter().map(|e| e.id.clone()).collect();
        self.ack(stream, &ids).await
    }

    async fn ack(&self, stream: &str, ids: &[String]) -> Result<(), WebhookError> {
        let mut conn = self.source.connection();
        redis::cmd("XACK")
            .arg(stream)
            .arg(DISPATCH_GROUP)
            .arg(ids)
            .query_async::<()>(&mut conn)
            .await?;
        Ok(())
    }

    /// The deliveries of one event: one per distinct subscribed URL.
    async fn fan_out(&self, entry: &Entry) -> Result<Vec<NewJob>, WebhookError> {
        let field = |name: &str| entry.fields.get(name).filter(|v| !v.is_empty()).cloned();
        let (Some(event_id), Some(body)) = (field("id"), field("event")) else {
            // A deleted or foreign entry: nothing to deliver.
            return Ok(Vec::new());
        };
        let event_type = field("type").unwrap_or_default();
        let subject = field("subject").unwrap_or_default();
        // The job's trace, which its deliveries continue.
        let trace = field("trace").and_then(|trace| trace.parse().ok());
        let mut targets: Vec<(String, EndpointSource, Option<String>)> = Vec::new();
        let url_in = |value: &Value| {
            value
                .get("webhook_url")
                .and_then(Value::as_str)
                .map(str::trim)
                .filter(|url| !url.is_empty())
                .map(str::to_owned)
        };
        let mut batch_id = None;
        if event_type.starts_with("job.") && !subject.is_empty() {
            if let Some(record) = self.source.job(&subject).await? {
                if record.queue == crate::api::DELIVERY_QUEUE {
                    // A delivery's own event (only an operator's cancel of a delivery can make
                    // one): announcing it would send webhooks about webhooks.
                    return Ok(Vec::new());
                }
                if let Some(url) = url_in(&record.payload) {
                    targets.push((url, EndpointSource::Job, None));
                }
                batch_id = record.batch_id;
            }
            if batch_id.is_none() {
                // The job record expired (a dispatcher down for longer than the retention):
                // the event itself still names its batch.
                batch_id = serde_json::from_str::<Value>(&body).ok().and_then(|event| {
                    event
                        .pointer("/data/batch_id")
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                });
            }
        } else if event_type == "batch.completed" && !subject.is_empty() {
            batch_id = Some(subject.clone());
        }
        if let Some(batch_id) = batch_id
            && let Some(batch) = self.source.batch(&batch_id).await?
            && let Some(url) = url_in(&batch.info)
        {
            targets.push((url, EndpointSource::Batch, None));
        }
        for endpoint in &self.config.endpoints {
            if endpoint.wants(&event_type) {
                targets.push((
                    endpoint.url.clone(),
                    EndpointSource::Global,
                    Some(endpoint.name.clone()),
                ));
            }
        }
        let mut seen = std::collections::HashSet::new();
        targets.retain(|(url, _, _)| seen.insert(url.clone()));
        let max_attempts = self.config.schedule.len() as u32 + 1;
        targets
            .into_iter()
            .map(|(url, source, endpoint_name)| {
                let delivery = DeliveryJob {
                    event_id: event_id.clone(),
                    event_type: event_type.clone(),
                    subject: subject.clone(),
                    url,
                    source,
                    endpoint_name,
                    body: body.clone(),
                    replay_of: None,
                };
                let mut job = NewJob::new(&delivery)?;
                job.id = delivery_id(&delivery.event_id, &delivery.url);
                job.max_attempts = Some(max_attempts);
                job.trace = trace;
                Ok(job)
            })
            .collect()
    }
}

/// One stream entry: its id and fields (none when the entry was deleted).
#[derive(Debug, Clone, PartialEq)]
struct Entry {
    id: String,
    fields: HashMap<String, String>,
}

/// A scalar reply as text.
fn text(value: &Reply) -> Option<String> {
    match value {
        Reply::BulkString(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
        Reply::SimpleString(text) => Some(text.clone()),
        Reply::VerbatimString { text, .. } => Some(text.clone()),
        Reply::Int(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A flat field/value array (or RESP3 map) as a map; nil gives an empty map.
fn fields_of(value: &Reply) -> HashMap<String, String> {
    let mut fields = HashMap::new();
    match value {
        Reply::Array(items) => {
            for pair in items.chunks(2) {
                if let [key, value] = pair
                    && let (Some(key), Some(value)) = (text(key), text(value))
                {
                    fields.insert(key, value);
                }
            }
        }
        Reply::Map(pairs) => {
            for (key, value) in pairs {
                if let (Some(key), Some(value)) = (text(key), text(value)) {
                    fields.insert(key, value);
                }
            }
        }
        _ => {}
    }
    fields
}

/// `[[id, fields], ...]`, tolerating nil fields and nil entries.
fn entries_of(value: &Reply) -> Vec<Entry> {
    let Reply::Array(entries) = value else {
        return Vec::new();
    };
    entries
        .iter()
        .filter_map(|entry| match entry {
            Reply::Array(parts) if !parts.is_empty() => Some(Entry {
                id: text(&parts[0])?,
                fields: parts.get(1).map(fields_of).unwrap_or_default(),
            }),
            _ => None,
        })
        .collect()
}

/// The entries of an XREADGROUP reply on one stream (RESP2 array or RESP3 map; nil on
/// timeout).
fn read_reply_entries(reply: &Reply) -> Vec<Entry> {
    match reply {
        Reply::Array(streams) => streams
            .iter()
            .filter_map(|stream| match stream {
                Reply::Array(pair) if pair.len() == 2 => Some(entries_of(&pair[1])),
                _ => None,
            })
            .flatten()
            .collect(),
        Reply::Map(pairs) => pairs.iter().flat_map(|(_, v)| entries_of(v)).collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(text: &str) -> Reply {
        Reply::BulkString(text.as_bytes().to_vec())
    }

    #[test]
    fn replies_parse_with_deleted_entries() {
        let reply = Reply::Array(vec![Reply::Array(vec![
            bulk("{ns}:events"),
            Reply::Array(vec![
                Reply::Array(vec![
                    bulk("1-0"),
                    Reply::Array(vec![
                        bulk("id"),
                        bulk("evt_1"),
                        bulk("type"),
                        bulk("job.failed"),
                    ]),
                ]),
                Reply::Array(vec![bulk("2-0"), Reply::Nil]),
            ]),
        ])]);
        let entries = read_reply_entries(&reply);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].fields["id"], "evt_1");
        assert_eq!(entries[1].id, "2-0");
        assert!(entries[1].fields.is_empty());
        assert!(read_reply_entries(&Reply::Nil).is_empty());
    }
}
