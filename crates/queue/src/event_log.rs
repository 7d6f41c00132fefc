//! Reading the completion events of every partition as one log: each partition has its own
//! stream, and an [`EventCursor`] holds a position in each.
//!
//! - Forward reads ([`Queue::read_events`]) read after each partition's position, merge by
//!   stream id (time order across partitions) and advance a partition's position only over
//!   events handed out, so nothing is skipped or given twice, whatever the mix.
//! - A blocking read waits on every partition at once (one `XREAD` on a single node; one per
//!   partition, on dedicated connections, in a cluster) and then reads as above.
//! - [`Queue::recent_events`] gives the newest events with cursors that resume right after
//!   each of them.

use std::fmt;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use redis::Value;

use crate::error::QueueError;
use crate::queue::{Queue, parse_entries, parse_streams};
use crate::record::StoredEvent;

/// A stream entry id, `<ms>-<seq>`.
type StreamId = (u64, u64);

/// A position in the events of every partition. Written as one stream id (`<ms>-<seq>`)
/// with one partition, and as one id per partition joined by `,` with several.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventCursor(Vec<StreamId>);

impl EventCursor {
    /// The start of every partition's stream.
    pub fn start(partitions: usize) -> Self {
        Self(vec![(0, 0); partitions.max(1)])
    }

    /// Parses a cursor of a namespace with `partitions` partitions: `0`, one id (the same
    /// position in every partition: after that time), or one id per partition.
    pub fn parse(text: &str, partitions: usize) -> Result<Self, QueueError> {
        let partitions = partitions.max(1);
        let bad = || QueueError::BadCursor {
            cursor: text.chars().take(200).collect(),
            partitions,
        };
        let ids = text
            .split(',')
            .map(|part| parse_id(part.trim()).ok_or_else(bad))
            .collect::<Result<Vec<_>, _>>()?;
        match ids.len() {
            1 => Ok(Self(vec![ids[0]; partitions])),
            n if n == partitions => Ok(Self(ids)),
            _ => Err(bad()),
        }
    }

    /// Hands out `events` (in order) from this position: each gets the cursor right after
    /// it.
    fn advance_over(&mut self, events: Vec<Read>) -> Vec<StoredEvent> {
        events
            .into_iter()
            .map(|(p, id, mut event)| {
                self.0[p] = id;
                event.cursor = self.to_string();
                event
            })
            .collect()
    }

    fn id(&self, p: usize) -> String {
        let (ms, seq) = self.0[p];
        format!("{ms}-{seq}")
    }
}

impl fmt::Display for EventCursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (p, (ms, seq)) in self.0.iter().enumerate() {
            if p > 0 {
                f.write_str(",")?;
            }
            write!(f, "{ms}-{seq}")?;
        }
        Ok(())
    }
}

/// `<ms>-<seq>` or `<ms>` (sequence 0).
fn parse_id(text: &str) -> Option<StreamId> {
    let valid = |part: &str| !part.is_empty() && part.len() <= 20;
    match text.split_once('-') {
        Some((ms, seq)) if valid(ms) && valid(seq) => Some((ms.parse().ok()?, seq.parse().ok()?)),
        None if valid(text) => Some((text.parse().ok()?, 0)),
        _ => None,
    }
}

/// The id just before `id`.
fn before((ms, seq): StreamId) -> StreamId {
    match (ms, seq) {
        (_, 1..) => (ms, seq - 1),
        (1.., 0) => (ms - 1, u64::MAX),
        _ => (0, 0),
    }
}

/// One event read from partition `.0`.
type Read = (usize, StreamId, StoredEvent);

impl Queue {
    /// Events after `cursor` (an [`EventCursor`]: `0` for the start, `$` for only those to
    /// come), merged over the partitions in time order. With `block`, waits up to that long for one. Each event's
    /// `cursor` resumes right after it.
    pub async fn read_events(
        &self,
        cursor: &str,
        count: usize,
        block: Option<Duration>,
    ) -> Result<Vec<StoredEvent>, QueueError> {
        let n = self.partitions().len();
        let mut position = if cursor.trim() == "$" {
            self.latest_position().await?
        } else {
            EventCursor::parse(cursor, n)?
        };
        let count = count.max(1);
        let mut events = self.read_after(&position, count).await?;
        if events.is_empty()
            && let Some(block) = block
        {
            self.wait_for_events(&position, block).await?;
            events = self.read_after(&position, count).await?;
        }
        Ok(position.advance_over(events))
    }

    /// Up to `count` events after `position`, oldest first over every partition.
    async fn read_after(
        &self,
        position: &EventCursor,
        count: usize,
    ) -> Result<Vec<Read>, QueueError> {
        let mut events = Vec::new();
        for (p, keys) in self.partitions().all() {
            let reply: Value = self
                .query(
                    redis::cmd("XREAD")
                        .arg("COUNT")
                        .arg(count)
                        .arg("STREAMS")
                        .arg(keys.events())
                        .arg(position.id(p)),
                )
                .await?;
            for (_, entries) in parse_streams(&reply) {
                collect(p, entries, &mut events);
            }
        }
        events.sort_by_key(|(p, id, _)| (*id, *p));
        events.truncate(count);
        Ok(events)
    }

    /// Waits up to `block` for an event after `position` in any partition.
    async fn wait_for_events(
        &self,
        position: &EventCursor,
        block: Duration,
    ) -> Result<(), QueueError> {
        let timeout = block + self.config().command_timeout();
        let block_ms = (block.as_millis() as u64).max(1);
        let parts = self.partitions();
        // One node holds every partition: one read waits on all of them.
        let groups: Vec<Vec<usize>> = if self.redis().is_cluster() {
            (0..parts.len()).map(|p| vec![p]).collect()
        } else {
            vec![(0..parts.len()).collect()]
        };
        let mut waits: FuturesUnordered<_> = groups
            .into_iter()
            .map(|group| async move {
                let mut conn = self.dedicated_connection(timeout, group[0]).await?;
                let mut cmd = redis::cmd("XREAD");
                cmd.arg("COUNT")
                    .arg(1)
                    .arg("BLOCK")
                    .arg(block_ms)
                    .arg("STREAMS");
                for p in &group {
                    cmd.arg(parts.keys(*p).events());
                }
                for p in &group {
                    cmd.arg(position.id(*p));
                }
                let reply: Value = cmd.query_async(&mut conn).await.map_err(|error| {
                    let error = QueueError::from(error);
                    self.record_error(&error);
                    error
                })?;
                Ok::<bool, QueueError>(!parse_streams(&reply).is_empty())
            })
            .collect();
        // The first partition with news ends the wait; the other reads change nothing.
        while let Some(found) = waits.next().await {
            if found? {
                return Ok(());
            }
        }
        Ok(())
    }

    /// The newest `count` events over every partition, oldest first. Each event's `cursor`
    /// resumes right after it (a partition whose events are all older than the ones
    /// returned resumes after its newest).
    pub async fn recent_events(&self, count: usize) -> Result<Vec<StoredEvent>, QueueError> {
        let count = count.max(1);
        let n = self.partitions().len();
        let mut events = Vec::new();
        let mut newest_read: Vec<Option<StreamId>> = vec![None; n];
        for (p, keys) in self.partitions().all() {
            let reply: Value = self
                .query(
                    redis::cmd("XREVRANGE")
                        .arg(keys.events())
                        .arg("+")
                        .arg("-")
                        .arg("COUNT")
                        .arg(count),
                )
                .await?;
            let before = events.len();
            collect(p, parse_entries(&reply), &mut events);
            newest_read[p] = events.get(before).map(|(_, id, _)| *id);
        }
        events.sort_by_key(|(p, id, _)| std::cmp::Reverse((*id, *p)));
        events.truncate(count);
        events.reverse();
        let mut position = EventCursor::start(n);
        for (p, start) in position.0.iter_mut().enumerate() {
            *start = match events.iter().find(|(q, _, _)| *q == p) {
                Some((_, oldest, _)) => before(*oldest),
                None => newest_read[p].unwrap_or((0, 0)),
            };
        }
        Ok(position.advance_over(events))
    }

    /// The position after the newest event (the start when there is none).
    async fn latest_position(&self) -> Result<EventCursor, QueueError> {
        let n = self.partitions().len();
        match self.recent_events(1).await?.pop() {
            Some(event) => EventCursor::parse(&event.cursor, n),
            None => Ok(EventCursor::start(n)),
        }
    }

    /// Number of events in the streams (each bounded by `events_max_len`).
    pub async fn events_len(&self) -> Result<u64, QueueError> {
        let mut total = 0;
        for (_, keys) in self.partitions().all() {
            let n: u64 = self.query(redis::cmd("XLEN").arg(keys.events())).await?;
            total += n;
        }
        Ok(total)
    }
}

fn collect(p: usize, entries: Vec<crate::queue::StreamEntry>, events: &mut Vec<Read>) {
    for (cursor, fields) in entries {
        if let Some(id) = parse_id(&cursor) {
            events.push((p, id, StoredEvent::from_fields(cursor, &fields)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_parse_and_print() {
        assert_eq!(EventCursor::parse("0", 1).unwrap().to_string(), "0-0");
        assert_eq!(
            EventCursor::parse("17-3", 3).unwrap().to_string(),
            "17-3,17-3,17-3"
        );
        assert_eq!(
            EventCursor::parse("1-0,2-5,3", 3).unwrap().to_string(),
            "1-0,2-5,3-0"
        );
        for bad in [
            "",
            "x",
            "1-",
            "-1",
            "1-0,2-0",
            "1-0,,2-0",
            "123456789012345678901-0",
        ] {
            assert!(EventCursor::parse(bad, 3).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_id_before() {
        assert_eq!(before((5, 2)), (5, 1));
        assert_eq!(before((5, 0)), (4, u64::MAX));
        assert_eq!(before((0, 0)), (0, 0));
    }
}
