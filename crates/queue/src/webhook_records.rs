//! What the webhook service keeps in Redis beside its delivery jobs: the attempts of each
//! delivery (a capped list per delivery, expiring with the retention) and the endpoints
//! disabled by `410 Gone` (a hash, kept until re-enabled). Records are opaque text here
//! (`klingq-events` owns their format); this module owns where they live.

use crate::error::QueueError;
use crate::queue::Queue;
use crate::scripts;

impl Queue {
    /// Appends an attempt record to its delivery's list, keeping the newest `keep`, and renews
    /// the list's expiry to the retention. One script; safe to run twice (a record equal to
    /// the list's last is not appended again).
    pub async fn push_webhook_attempt(
        &self,
        delivery_id: &str,
        record: &str,
        keep: usize,
    ) -> Result<(), QueueError> {
        let cmd = self.call(
            &scripts::WEBHOOK_ATTEMPT,
            0,
            &WebhookAttemptHeader {
                delivery: delivery_id,
                record,
                kept: keep.max(1) as u64,
            },
        );
        let _: u64 = self.run_script(cmd).await?;
        Ok(())
    }

    /// A delivery's attempt records, oldest first.
    pub async fn webhook_attempts(&self, delivery_id: &str) -> Result<Vec<String>, QueueError> {
        self.query(
            redis::cmd("LRANGE")
                .arg(self.keys().webhook_attempts(delivery_id))
                .arg(0)
                .arg(-1),
        )
        .await
    }

    /// The last attempt record of each delivery (`None`: no attempt yet), in one round trip.
    pub async fn last_webhook_attempts(
        &self,
        delivery_ids: &[String],
    ) -> Result<Vec<Option<String>>, QueueError> {
        if delivery_ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in delivery_ids {
            pipe.cmd("LINDEX")
                .arg(self.keys().webhook_attempts(id))
                .arg(-1);
        }
        self.query_pipe(&pipe).await
    }

    /// Records an endpoint as disabled, unless it already is (the first record is kept).
    /// Returns whether this call disabled it.
    pub async fn disable_webhook_endpoint(
        &self,
        endpoint_id: &str,
        record: &str,
    ) -> Result<bool, QueueError> {
        let set: u64 = self
            .query(
                redis::cmd("HSETNX")
                    .arg(self.keys().webhooks_disabled())
                    .arg(endpoint_id)
                    .arg(record),
            )
            .await?;
        Ok(set == 1)
    }

    /// The record of a disabled endpoint, or `None` when it is enabled.
    pub async fn disabled_webhook_endpoint(
        &self,
        endpoint_id: &str,
    ) -> Result<Option<String>, QueueError> {
        self.query(
            redis::cmd("HGET")
                .arg(self.keys().webhooks_disabled())
                .arg(endpoint_id),
        )
        .await
    }

    /// The records of every disabled endpoint, in no particular order.
    pub async fn disabled_webhook_endpoints(&self) -> Result<Vec<String>, QueueError> {
        self.query(redis::cmd("HVALS").arg(self.keys().webhooks_disabled()))
            .await
    }

    /// Re-enables an endpoint; false when it was not disabled.
    pub async fn enable_webhook_endpoint(&self, endpoint_id: &str) -> Result<bool, QueueError> {
        let removed: u64 = self
            .query(
                redis::cmd("HDEL")
                    .arg(self.keys().webhooks_disabled())
                    .arg(endpoint_id),
            )
            .await?;
        Ok(removed > 0)
    }
}

crate::wire::record! {
    /// `webhook_attempt.lua`'s header.
    struct WebhookAttemptHeader<'a> {
        delivery: &'a str,
        record: &'a str,
        kept: u64,
    }
}
