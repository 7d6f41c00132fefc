//! [`EventsGroup`]: one consumer of the completion events stream in a consumer group of its
//! own (the webhook dispatcher's `webhooks`), so every event is handled once by the group
//! even with several consumers, and an event a dead consumer held is taken over.
//!
//! - Read: this consumer's own pending entries first (after a start or an error), then new
//!   ones with a blocking `XREADGROUP` on a dedicated connection (its `BLOCK` would stall
//!   shared traffic), kept between reads.
//! - Take over: `XAUTOCLAIM` of entries idle for longer than a lease.
//! - Ack: `XACK` once the consumer is done with them; until then they stay pending.
//!
//! Entries trimmed from the stream while pending have no event any more: they come back in
//! [`GroupEntries::deleted`], to be acknowledged.

use std::collections::HashMap;
use std::time::Duration;

use redis::{Cmd, Value};

use crate::conn::Dedicated;
use crate::error::QueueError;
use crate::queue::{Queue, parse_entries, parse_streams, value_string};
use crate::record::StoredEvent;

/// Entries read or claimed from the events stream.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GroupEntries {
    /// Events, in stream order.
    pub events: Vec<StoredEvent>,
    /// Stream ids of entries without an event: trimmed from the stream while pending (or
    /// not written by klingq). There is nothing to handle; acknowledge them.
    pub deleted: Vec<String>,
}

impl GroupEntries {
    pub fn is_empty(&self) -> bool {
        self.events.is_empty() && self.deleted.is_empty()
    }

    /// Stream ids of every entry, events and deleted ones: what to acknowledge.
    pub fn cursors(&self) -> Vec<String> {
        self.events
            .iter()
            .map(|event| event.cursor.clone())
            .chain(self.deleted.iter().cloned())
            .collect()
    }

    fn push(&mut self, cursor: String, fields: &HashMap<String, String>) {
        let event = StoredEvent::from_fields(cursor, fields);
        if event.id.is_empty() || event.body.is_empty() {
            self.deleted.push(event.cursor);
        } else {
            self.events.push(event);
        }
    }
}

/// Entries taken over from other consumers by [`EventsGroup::claim_idle`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClaimedEntries {
    pub entries: GroupEntries,
    /// Where the next claim starts; `0-0` once the whole pending list was scanned.
    pub next: String,
}

/// One consumer of the events stream in a consumer group. Its blocking reads keep a
/// dedicated connection, dropped after an error (the next read opens another).
pub struct EventsGroup {
    queue: Queue,
    /// The partition whose events stream this reads.
    partition: usize,
    stream: String,
    group: String,
    consumer: String,
    blocking: Option<Dedicated>,
}

impl std::fmt::Debug for EventsGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventsGroup")
            .field("partition", &self.partition)
            .field("stream", &self.stream)
            .field("group", &self.group)
            .field("consumer", &self.consumer)
            .finish()
    }
}

impl Queue {
    /// `consumer` of each partition's events stream in the consumer group `group`, one
    /// reader per partition (in partition order). Nothing is read or created before
    /// [`EventsGroup::ensure`].
    pub fn events_groups(&self, group: &str, consumer: &str) -> Vec<EventsGroup> {
        self.partitions()
            .all()
            .map(|(partition, keys)| EventsGroup {
                queue: self.clone(),
                partition,
                stream: keys.events(),
                group: group.to_owned(),
                consumer: consumer.to_owned(),
                blocking: None,
            })
            .collect()
    }
}

impl EventsGroup {
    pub fn group(&self) -> &str {
        &self.group
    }

    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// The partition whose events this reads.
    pub fn partition(&self) -> usize {
        self.partition
    }

    /// Creates the group (and the stream) unless it exists. A new group starts at the
    /// stream's start, so events published before its first consumer ran are read too.
    pub async fn ensure(&self) -> Result<(), QueueError> {
        let created: Result<(), QueueError> = self
            .queue
            .query(
                redis::cmd("XGROUP")
                    .arg("CREATE")
                    .arg(&self.stream)
                    .arg(&self.group)
                    .arg("0")
                    .arg("MKSTREAM"),
            )
            .await;
        match created {
            Err(QueueError::Redis(error)) if error.code() == Some("BUSYGROUP") => Ok(()),
            other => other,
        }
    }

    /// Up to `count` of this consumer's own pending entries: delivered to it before (by a
    /// read whose reply was lost, or before a restart under the same name) and not yet
    /// acknowledged. Empty once the backlog is done.
    pub async fn read_pending(&self, count: usize) -> Result<GroupEntries, QueueError> {
        let reply: Value = self.queue.query(&self.read_cmd(count, None, "0")).await?;
        Ok(entries_of_read(&reply))
    }

    /// Up to `count` new entries, waiting up to `block` for the first one on the dedicated
    /// connection. Empty when none came.
    pub async fn read_new(
        &mut self,
        count: usize,
        block: Duration,
    ) -> Result<GroupEntries, QueueError> {
        let cmd = self.read_cmd(count, Some(block), ">");
        let conn = match &mut self.blocking {
            Some(conn) => conn,
            None => {
                let timeout = block + self.queue.config().command_timeout();
                let conn = self
                    .queue
                    .dedicated_connection(timeout, self.partition)
                    .await?;
                self.blocking.insert(conn)
            }
        };
        match cmd.query_async::<Value>(conn).await {
            Ok(reply) => Ok(entries_of_read(&reply)),
            Err(error) => {
                // A broken connection, or one to a node that no longer owns the slot.
                self.blocking = None;
                let error = QueueError::from(error);
                self.queue.record_error(&error);
                Err(error)
            }
        }
    }

    /// Takes over up to `count` entries other consumers left pending for at least
    /// `min_idle`, scanning the pending list from `start` (`0-0` for its beginning).
    pub async fn claim_idle(
        &self,
        min_idle: Duration,
        start: &str,
        count: usize,
    ) -> Result<ClaimedEntries, QueueError> {
        let reply: Value = self
            .queue
            .query(
                redis::cmd("XAUTOCLAIM")
                    .arg(&self.stream)
                    .arg(&self.group)
                    .arg(&self.consumer)
                    .arg(min_idle.as_millis() as u64)
                    .arg(start)
                    .arg("COUNT")
                    .arg(count.max(1)),
            )
            .await?;
        let Value::Array(parts) = reply else {
            return Err(QueueError::Protocol(format!(
                "XAUTOCLAIM replied {reply:?}"
            )));
        };
        let mut claimed = ClaimedEntries {
            next: parts
                .first()
                .and_then(value_string)
                .unwrap_or_else(|| "0-0".to_owned()),
            ..ClaimedEntries::default()
        };
        for (cursor, fields) in parts.get(1).map(parse_entries).unwrap_or_default() {
            claimed.entries.push(cursor, &fields);
        }
        // Redis 7 names the pending entries it found trimmed from the stream (and removes
        // them from the pending list); Redis 6.2 returns them without fields.
        if let Some(Value::Array(ids)) = parts.get(2) {
            claimed
                .entries
                .deleted
                .extend(ids.iter().filter_map(value_string));
        }
        Ok(claimed)
    }

    /// Acknowledges entries: the group is done with them.
    pub async fn ack(&self, cursors: &[String]) -> Result<(), QueueError> {
        if cursors.is_empty() {
            return Ok(());
        }
        let _: u64 = self
            .queue
            .query(
                redis::cmd("XACK")
                    .arg(&self.stream)
                    .arg(&self.group)
                    .arg(cursors),
            )
            .await?;
        Ok(())
    }

    /// `XREADGROUP` for this consumer from `from` (`>`: new entries, `0`: its own pending
    /// ones), blocking for `block` when given.
    fn read_cmd(&self, count: usize, block: Option<Duration>, from: &str) -> Cmd {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.group)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(count.max(1));
        if let Some(block) = block {
            // A zero BLOCK would wait forever.
            cmd.arg("BLOCK").arg((block.as_millis() as u64).max(1));
        }
        cmd.arg("STREAMS").arg(&self.stream).arg(from);
        cmd
    }
}

/// The entries of an `XREADGROUP` reply (nil on timeout).
fn entries_of_read(reply: &Value) -> GroupEntries {
    let mut entries = GroupEntries::default();
    for (_stream, stream_entries) in parse_streams(reply) {
        for (cursor, fields) in stream_entries {
            entries.push(cursor, &fields);
        }
    }
    entries
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(text: &str) -> Value {
        Value::BulkString(text.as_bytes().to_vec())
    }

    #[test]
    fn reads_split_events_from_deleted_entries() {
        let reply = Value::Array(vec![Value::Array(vec![
            bulk("{ns}:events"),
            Value::Array(vec![
                Value::Array(vec![
                    bulk("1-0"),
                    Value::Array(vec![
                        bulk("id"),
                        bulk("evt_1"),
                        bulk("type"),
                        bulk("job.failed"),
                        bulk("subject"),
                        bulk("job_1"),
                        bulk("event"),
                        bulk("{}"),
                    ]),
                ]),
                Value::Array(vec![bulk("2-0"), Value::Nil]),
            ]),
        ])]);
        let entries = entries_of_read(&reply);
        assert_eq!(entries.events.len(), 1);
        assert_eq!(entries.events[0].id, "evt_1");
        assert_eq!(entries.events[0].subject, "job_1");
        assert_eq!(entries.events[0].cursor, "1-0");
        assert_eq!(entries.deleted, ["2-0"]);
        assert_eq!(entries.cursors(), ["1-0", "2-0"]);
        assert!(entries_of_read(&Value::Nil).is_empty());
    }
}
