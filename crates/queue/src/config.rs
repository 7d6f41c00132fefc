//! Queue settings. Every field has a default; `config/default.toml` documents them.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::conn::RedisMode;

/// How one queue behaves. Times are whole seconds or milliseconds, as the names say.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueConfig {
    /// Redis URL, e.g. `redis://127.0.0.1:6379/0`. May carry a password: never log it raw.
    pub redis_url: String,
    /// `auto` (detect Cluster with `INFO cluster`, Sentinel from a `redis+sentinel://` URL),
    /// `standalone`, `cluster` or `sentinel`.
    pub redis_mode: RedisMode,
    /// Prefix of every key, used as the Redis Cluster hash tag: `{namespace}:...`.
    pub namespace: String,
    /// The queue's name inside the namespace.
    pub queue: String,
    /// Hash tags the namespace's jobs are spread over (1 to 64), so that they can live on as
    /// many Cluster shards. Fixed when the namespace is created.
    pub partitions: u32,
    /// A job whose worker stops renewing its lease for this long is handed to another worker.
    pub lease_timeout_secs: u64,
    /// How often a worker looks for jobs whose lease expired (kill -9, partition).
    pub reclaim_interval_secs: u64,
    /// How often due jobs move from the delayed set to the ready streams.
    pub promote_interval_ms: u64,
    /// At most this many due jobs are promoted per script call.
    pub promote_batch: usize,
    /// How long one blocking read waits for new jobs before looping.
    pub block_timeout_ms: u64,
    /// At most this many jobs are fetched per read (never more than free handler slots).
    pub fetch_batch: usize,
    /// Deliveries per job, counting those whose worker died, before it goes to dead letters.
    pub max_attempts: u32,
    /// Finished job records, dead letters and finished batches expire after this long.
    pub retention_secs: u64,
    /// An idempotency key maps to its first job for this long.
    pub idempotency_ttl_secs: u64,
    /// Whether finishing a job appends a completion event to the events stream.
    pub completion_events: bool,
    /// The events stream is trimmed to about this many entries.
    pub events_max_len: u64,
    /// Timeout of one Redis command (the blocking read gets `block_timeout_ms` on top).
    pub command_timeout_ms: u64,
    /// Jobs per pipelined round trip when enqueueing a batch.
    pub enqueue_chunk: usize,
    /// When > 0, an enqueue is acknowledged, and a checkpoint trusted before a paid call,
    /// only once this many replicas confirm it (`WAIT`).
    pub min_replicas_ack: u32,
    /// How long `WAIT` waits for `min_replicas_ack` replicas (less than `command_timeout_ms`).
    pub replica_ack_timeout_ms: u64,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            redis_url: "redis://127.0.0.1:6379".to_owned(),
            redis_mode: RedisMode::Auto,
            namespace: "klingq".to_owned(),
            queue: "videos".to_owned(),
            partitions: 1,
            lease_timeout_secs: 60,
            reclaim_interval_secs: 5,
            promote_interval_ms: 250,
            promote_batch: 500,
            block_timeout_ms: 2_000,
            fetch_batch: 256,
            max_attempts: 20,
            retention_secs: 7 * 24 * 3600,
            idempotency_ttl_secs: 24 * 3600,
            completion_events: true,
            events_max_len: 100_000,
            command_timeout_ms: 10_000,
            enqueue_chunk: 1_000,
            min_replicas_ack: 0,
            replica_ack_timeout_ms: 1_000,
        }
    }
}

impl QueueConfig {
    pub fn lease_timeout(&self) -> Duration {
        Duration::from_secs(self.lease_timeout_secs.max(1))
    }

    /// Leases are renewed three times per timeout, so one lost renewal costs nothing.
    pub fn renew_interval(&self) -> Duration {
        self.lease_timeout() / 3
    }

    pub fn reclaim_interval(&self) -> Duration {
        Duration::from_secs(self.reclaim_interval_secs.max(1))
    }

    pub fn promote_interval(&self) -> Duration {
        Duration::from_millis(self.promote_interval_ms.max(10))
    }

    pub fn block_timeout(&self) -> Duration {
        Duration::from_millis(self.block_timeout_ms.max(10))
    }

    pub fn command_timeout(&self) -> Duration {
        Duration::from_millis(self.command_timeout_ms.max(100))
    }

    /// A copy for another queue of the same namespace (e.g. webhook deliveries).
    pub fn for_queue(&self, queue: &str) -> Self {
        Self {
            queue: queue.to_owned(),
            ..self.clone()
        }
    }
}
