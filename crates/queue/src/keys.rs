//! Every Redis key klingq uses, in one place. All keys of a namespace share the hash tag
//! `{ns}`, so multi-key scripts stay in one Redis Cluster slot.

use klingq_core::Priority;

/// The consumer group every worker of a queue joins.
pub(crate) const GROUP: &str = "workers";

/// Key names of one namespace.
#[derive(Debug, Clone)]
pub struct Keys {
    /// `{ns}`: the hash-tagged prefix of every key.
    prefix: String,
}

impl Keys {
    pub fn new(namespace: &str) -> Self {
        Self {
            prefix: format!("{{{namespace}}}"),
        }
    }

    /// The hash-tagged prefix, `{ns}`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Hash of one job: payload, state, attempts, checkpoint, timestamps, error.
    pub fn job(&self, job_id: &str) -> String {
        format!("{}:job:{job_id}", self.prefix)
    }

    /// Ready stream of a queue at a priority; consumer group [`GROUP`].
    pub fn ready(&self, queue: &str, priority: Priority) -> String {
        format!("{}:q:{queue}:ready:{}", self.prefix, priority.as_str())
    }

    /// Sorted set of job ids waiting for a time (score: due time in ms).
    pub fn delayed(&self, queue: &str) -> String {
        format!("{}:q:{queue}:delayed", self.prefix)
    }

    /// Sorted set of dead job ids (score: time of death in ms).
    pub fn dead(&self, queue: &str) -> String {
        format!("{}:q:{queue}:dead", self.prefix)
    }

    /// Idempotency key to job id, with a TTL.
    pub fn idempotency(&self, queue: &str, key: &str) -> String {
        format!("{}:idem:{queue}:{key}", self.prefix)
    }

    /// Hash of a batch's counters.
    pub fn batch(&self, batch_id: &str) -> String {
        format!("{}:batch:{batch_id}", self.prefix)
    }

    /// List of a batch's job ids, in enqueue order.
    pub fn batch_jobs(&self, batch_id: &str) -> String {
        format!("{}:batch:{batch_id}:jobs", self.prefix)
    }

    /// Hash of a queue's counters (jobs finished per state, spend).
    pub fn stats(&self, queue: &str) -> String {
        format!("{}:q:{queue}:stats", self.prefix)
    }

    /// Stream of completion events.
    pub fn events(&self) -> String {
        format!("{}:events", self.prefix)
    }

    /// Sorted set of batch ids by creation time, for listing.
    pub fn batches(&self) -> String {
        format!("{}:batches", self.prefix)
    }

    /// Sorted set of job ids by creation time per queue, for listing and search.
    pub fn jobs_index(&self, queue: &str) -> String {
        format!("{}:q:{queue}:jobs", self.prefix)
    }

    /// Free-form keys other crates need (shared limits, budgets), still under the hash tag.
    pub fn custom(&self, name: &str) -> String {
        format!("{}:{name}", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_shares_the_hash_tag() {
        let keys = Keys::new("klingq");
        for key in [
            keys.job("j"),
            keys.ready("videos", Priority::High),
            keys.delayed("videos"),
            keys.dead("videos"),
            keys.idempotency("videos", "k"),
            keys.batch("b"),
            keys.batch_jobs("b"),
            keys.events(),
            keys.batches(),
            keys.jobs_index("videos"),
            keys.custom("limit"),
        ] {
            assert!(key.starts_with("{klingq}:"), "{key}");
        }
        assert_eq!(
            keys.ready("videos", Priority::Low),
            "{klingq}:q:videos:ready:low"
        );
    }
}
