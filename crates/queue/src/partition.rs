//! Partitions: one namespace's jobs spread over N hash tags, so that N partitions can live on
//! N shards of a Redis Cluster.
//!
//! - Partition 0 is the namespace's own tag `{ns}`: with one partition (the default) every
//!   key is where it always was. It also holds what is global: shared limits and their
//!   adaptive caps, budgets, pauses, webhook records and the namespace's meta record.
//! - Partition `p > 0` has a tag `{ns:p<p>.<k>}` chosen so that its slot lies `p / N` of the
//!   slot space after partition 0's. Slots spread evenly this way land on different shards of
//!   a cluster whose shards own equal ranges (as `redis-cli --cluster create` and managed
//!   services lay them out).
//! - A job lives in the partition its id hashes to ([`Partitions::of`]), always. Where the
//!   partition is chosen otherwise (a batch's jobs live with their batch; a job with an
//!   idempotency key lives where the key hashes, so a retry finds it), the queue draws the
//!   job's id to fall in that partition. So a job, its batch and its idempotency key share a
//!   slot, and every script touching them runs in one.

use std::sync::Arc;

use klingq_core::JobId;

use crate::conn::key_slot;
use crate::error::QueueError;
use crate::keys::Keys;
use crate::queue::Queue;

/// The most partitions a namespace may have.
pub const MAX_PARTITIONS: u32 = 64;

const SLOTS: u32 = 16_384;

/// The partitions of one namespace. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Partitions {
    parts: Arc<[Keys]>,
}

impl Partitions {
    /// `n` partitions (at least 1) of `namespace`.
    pub fn new(namespace: &str, n: u32) -> Self {
        let n = n.clamp(1, MAX_PARTITIONS);
        let base = u32::from(key_slot(&format!("{{{namespace}}}")));
        let parts: Vec<Keys> = (0..n)
            .map(|p| {
                if p == 0 {
                    return Keys::new(namespace);
                }
                let target = (base + p * SLOTS / n) % SLOTS;
                let tag = (0u32..)
                    .map(|k| format!("{namespace}:p{p}.{k}"))
                    .find(|tag| u32::from(key_slot(&format!("{{{tag}}}"))) == target)
                    .expect("every slot has a tag");
                Keys::new(&tag)
            })
            .collect();
        Self {
            parts: parts.into(),
        }
    }

    pub fn len(&self) -> usize {
        self.parts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// The keys of partition 0, which also holds the namespace's global keys.
    pub fn global(&self) -> &Keys {
        &self.parts[0]
    }

    /// The keys of partition `p`.
    pub fn keys(&self, p: usize) -> &Keys {
        &self.parts[p % self.parts.len()]
    }

    /// Every partition's keys, in order.
    pub fn all(&self) -> impl ExactSizeIterator<Item = (usize, &Keys)> {
        self.parts.iter().enumerate()
    }

    /// The partition a job (or batch) id lives in.
    pub fn of(&self, id: &str) -> usize {
        self.bucket(id.as_bytes())
    }

    /// The partition of an idempotency key of `queue` (a job or batch claiming it lives there).
    pub fn of_key(&self, queue: &str, key: &str) -> usize {
        let mut bytes = Vec::with_capacity(queue.len() + key.len() + 1);
        bytes.extend_from_slice(queue.as_bytes());
        bytes.push(0);
        bytes.extend_from_slice(key.as_bytes());
        self.bucket(&bytes)
    }

    /// A fresh id that lives in partition `p`.
    pub fn id_in(&self, p: usize) -> JobId {
        loop {
            let id = JobId::new();
            if self.of(&id.to_string()) == p % self.len() {
                return id;
            }
        }
    }

    /// An id derived from `id` that lives in partition `p`: the same for the same `id` and
    /// `p` on every call (its last four bytes changed), so a re-run enqueue finds its job.
    pub fn id_like(&self, id: &JobId, p: usize) -> JobId {
        let base = id.to_bytes();
        for k in 0u32.. {
            let mut bytes = base;
            for (byte, salt) in bytes[12..].iter_mut().zip(k.to_be_bytes()) {
                *byte ^= salt;
            }
            let candidate = JobId::from_bytes(bytes);
            if self.of(&candidate.to_string()) == p % self.len() {
                return candidate;
            }
        }
        unreachable!("some salt lands in every partition")
    }

    /// FNV-1a, stable across releases and processes (the partition of a stored job must not
    /// change).
    fn bucket(&self, bytes: &[u8]) -> usize {
        if self.parts.len() == 1 {
            return 0;
        }
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in bytes {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        (hash % self.parts.len() as u64) as usize
    }
}

impl Queue {
    /// Records the namespace's partition count when it has none, and refuses another count
    /// while the namespace holds anything (jobs, streams, batches, idempotency keys) under
    /// either count: jobs would be left unread and retries would miss their first job. A
    /// namespace without a record (from before partitions) that holds anything has one.
    pub(crate) async fn check_partitions(&self) -> Result<(), QueueError> {
        let namespace = &self.config().namespace;
        let configured = self.partitions().len() as u32;
        let meta = self.keys().meta();
        let recorded: Option<u32> = self
            .query(redis::cmd("HGET").arg(&meta).arg("partitions"))
            .await?;
        let recorded = match recorded {
            Some(n) => n,
            None => {
                // Only a count other than 1 needs to know whether the namespace is in use.
                let legacy = configured != 1
                    && self
                        .holds_anything(&Partitions::new(namespace, 1), &meta)
                        .await?;
                let n = if legacy { 1 } else { configured };
                let mut pipe = redis::pipe();
                pipe.cmd("HSETNX")
                    .arg(&meta)
                    .arg("partitions")
                    .arg(n)
                    .ignore();
                pipe.cmd("HGET").arg(&meta).arg("partitions");
                let (first,): (Option<u32>,) = self.query_pipe(&pipe).await?;
                first.unwrap_or(n)
            }
        };
        if recorded == configured {
            return Ok(());
        }
        for layout in [
            Partitions::new(namespace, recorded),
            self.partitions().clone(),
        ] {
            if self.holds_anything(&layout, &meta).await? {
                return Err(QueueError::PartitionsMismatch {
                    namespace: namespace.clone(),
                    recorded,
                    configured,
                });
            }
        }
        // Nothing is stored under either count: the namespace takes the new one.
        tracing::info!(
            namespace,
            recorded,
            configured,
            "namespace holds nothing: its partition count changes"
        );
        let _: () = self
            .query(
                redis::cmd("HSET")
                    .arg(&meta)
                    .arg("partitions")
                    .arg(configured),
            )
            .await?;
        Ok(())
    }

    /// Whether any partition of `layout` holds a key other than `meta`.
    async fn holds_anything(&self, layout: &Partitions, meta: &str) -> Result<bool, QueueError> {
        for (_, keys) in layout.all() {
            let pattern = format!("{}:*", keys.prefix());
            let mut cursor = 0;
            loop {
                let (next, found) = self.scan_page(keys, cursor, &pattern).await?;
                if found.iter().any(|key| key != meta) {
                    return Ok(true);
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(false)
    }

    /// One `SCAN` step for keys matching `pattern`, on the node owning `keys`' slot.
    pub(crate) async fn scan_page(
        &self,
        keys: &Keys,
        cursor: u64,
        pattern: &str,
    ) -> Result<(u64, Vec<String>), QueueError> {
        let route = keys.route();
        let reply = self
            .retrying(std::time::Duration::from_secs(10), || async {
                let mut cmd = redis::cmd("SCAN");
                cmd.arg(cursor)
                    .arg("MATCH")
                    .arg(pattern)
                    .arg("COUNT")
                    .arg(10_000);
                Ok(self.redis().on_slot_owner(cmd, &route).await?)
            })
            .await?;
        redis::from_redis_value(reply)
            .map_err(|error| QueueError::Protocol(format!("SCAN: {error}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_partition_is_the_namespace_itself() {
        let parts = Partitions::new("klingq", 1);
        assert_eq!(parts.len(), 1);
        assert_eq!(parts.global().prefix(), "{klingq}");
        assert_eq!(parts.of("anything"), 0);
        assert_eq!(parts.of_key("videos", "k"), 0);
    }

    #[test]
    fn partitions_spread_evenly_over_the_slot_space() {
        let parts = Partitions::new("klingq", 6);
        let slots: Vec<u32> = parts
            .all()
            .map(|(_, keys)| u32::from(key_slot(&keys.job("x"))))
            .collect();
        assert_eq!(parts.global().prefix(), "{klingq}");
        for (p, slot) in slots.iter().enumerate() {
            let expected = (slots[0] + p as u32 * SLOTS / 6) % SLOTS;
            assert_eq!(*slot, expected, "partition {p}");
        }
        // Three equal shards (0-5460, 5461-10922, 10923-16383) hold two partitions each.
        let mut per_shard = [0; 3];
        for slot in &slots {
            per_shard[(*slot as usize * 3) / SLOTS as usize] += 1;
        }
        assert_eq!(per_shard, [2, 2, 2], "{slots:?}");
        // Stable: the same tags every time.
        let again = Partitions::new("klingq", 6);
        assert!(
            parts
                .all()
                .zip(again.all())
                .all(|(a, b)| a.1.prefix() == b.1.prefix())
        );
    }

    #[test]
    fn ids_are_spread_and_drawn_into_a_partition() {
        let parts = Partitions::new("ns", 4);
        let mut seen = [0; 4];
        for _ in 0..400 {
            seen[parts.of(&JobId::new().to_string())] += 1;
        }
        assert!(seen.iter().all(|n| *n > 50), "{seen:?}");
        for p in 0..4 {
            assert_eq!(parts.of(&parts.id_in(p).to_string()), p);
            let id = JobId::new();
            let like = parts.id_like(&id, p);
            assert_eq!(parts.of(&like.to_string()), p);
            assert_eq!(like, parts.id_like(&id, p), "the same every time");
        }
        assert_eq!(parts.of_key("videos", "k1"), parts.of_key("videos", "k1"));
        assert_ne!(
            (0..20)
                .map(|i| parts.of_key("videos", &format!("k{i}")))
                .max(),
            Some(0)
        );
    }
}
