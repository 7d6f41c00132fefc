//! Every Redis key klingq uses, in one place. All keys of one partition share its hash tag
//! (`{ns}` for partition 0, see [`crate::Partitions`]), so multi-key scripts stay in one
//! Redis Cluster slot.

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

    /// Batch idempotency key to the first batch's id, with the idempotency TTL. Written by
    /// `batch_open.lua` (keep the two in step).
    pub fn batch_idempotency(&self, queue: &str, key: &str) -> String {
        format!("{}:idem-batch:{queue}:{key}", self.prefix)
    }

    /// Sorted set of the holders of a shared concurrency limit (score: lease expiry in ms).
    pub fn limit(&self, name: &str) -> String {
        format!("{}:limit:{name}", self.prefix)
    }

    /// Hash of a shared limit's adaptive cap (`cap`, `recover_at`, `period`).
    pub fn limit_cap(&self, name: &str) -> String {
        format!("{}:limit:{name}:cap", self.prefix)
    }

    /// Sorted set of the jobs waiting for a slot of a shared limit (score: when they first
    /// waited); a release wakes the first. Written by `slot_acquire.lua` and
    /// `slot_release.lua` (keep the three in step).
    pub fn limit_waiters(&self, name: &str) -> String {
        format!("{}:limit:{name}:waiters", self.prefix)
    }

    /// Hash of one provider run: `job` (the job it belongs to) and `cb` (the status its last
    /// callback reported). Global (partition 0): a callback names only the run. Written by
    /// `run_bind.lua` and `run_callback.lua` (keep the three in step).
    pub fn run(&self, run_id: &str) -> String {
        format!("{}:run:{run_id}", self.prefix)
    }

    /// Hash of how long finished runs of one kind (`name`: model and clip duration) took:
    /// bucket to count, and `n`, the samples. Global (partition 0). Written by
    /// `gen_time_record.lua` (keep the two in step).
    pub fn gen_times(&self, name: &str) -> String {
        format!("{}:gentime:{name}", self.prefix)
    }

    /// Estimated spend reserved on one UTC day, in micro-dollars.
    pub fn daily_budget(&self, day: time::Date) -> String {
        format!("{}:budget:day:{}", self.prefix, day_stamp(day))
    }

    /// A pause shared by every replica (e.g. out of provider credit), with a TTL.
    pub fn pause(&self, name: &str) -> String {
        format!("{}:pause:{name}", self.prefix)
    }

    /// The key every script names as `KEYS[1]`, so Redis Cluster routes it to the
    /// namespace's slot. Nothing is stored under it.
    pub fn route(&self) -> String {
        format!("{}:route", self.prefix)
    }

    /// Hash of what the namespace was created with (`partitions`). Global: partition 0.
    pub fn meta(&self) -> String {
        format!("{}:meta", self.prefix)
    }

    /// List of one webhook delivery's attempt records, oldest first. Written by
    /// `webhook_attempt.lua` (keep the two in step).
    pub fn webhook_attempts(&self, delivery_id: &str) -> String {
        format!("{}:webhooks:attempts:{delivery_id}", self.prefix)
    }

    /// Hash of webhook endpoints disabled by `410 Gone`: endpoint id to its record.
    pub fn webhooks_disabled(&self) -> String {
        format!("{}:webhooks:disabled", self.prefix)
    }
}

/// A UTC day as `YYYYMMDD`, as the daily budget key and `budget_reserve.lua` spell it.
pub(crate) fn day_stamp(day: time::Date) -> String {
    format!(
        "{:04}{:02}{:02}",
        day.year(),
        u8::from(day.month()),
        day.day()
    )
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
            keys.batch_idempotency("videos", "k"),
            keys.limit("provider"),
            keys.limit_cap("provider"),
            keys.daily_budget(time::macros::date!(2025 - 03 - 07)),
            keys.pause("provider"),
            keys.route(),
            keys.meta(),
            keys.webhook_attempts("d"),
            keys.webhooks_disabled(),
        ] {
            assert!(key.starts_with("{klingq}:"), "{key}");
        }
        assert_eq!(
            keys.ready("videos", Priority::Low),
            "{klingq}:q:videos:ready:low"
        );
        assert_eq!(
            keys.daily_budget(time::macros::date!(2025 - 03 - 07)),
            "{klingq}:budget:day:20250307"
        );
        assert_eq!(keys.limit_cap("p"), format!("{}:cap", keys.limit("p")));
    }
}
