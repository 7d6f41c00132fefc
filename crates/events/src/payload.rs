//! Wire formats this crate owns: the `batch.completed` and `batch.paused` data (published by
//! the queue's Lua, so described here and checked against docs/schemas/), and the delivery
//! job stored in the `webhooks` queue.

use std::collections::BTreeMap;

use klingq_core::JobId;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The `data` of a `batch.completed` event, as the queue publishes it once the batch is sealed
/// and its last job is terminal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BatchCompletedData {
    pub batch_id: String,
    /// Jobs in the batch.
    pub total: u64,
    /// Jobs per final state (`succeeded`, `failed`, `cancelled`, `dead`); states with no job
    /// are left out.
    pub counts: BTreeMap<String, u64>,
    /// The batch's estimated cost, in USD.
    pub estimated_usd: f64,
    /// What the provider charged for the batch, in USD.
    pub charged_usd: f64,
}

/// The `data` of a `batch.paused` event, as the queue publishes it when a batch's failure
/// guard (`max_failure_rate`, `max_failed`) is exceeded. Counts are since the last resume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BatchPausedData {
    pub batch_id: String,
    /// Why, in words: which limit was passed and by how much.
    pub reason: String,
    /// Jobs that failed for good (moderation, invalid input, …) since the last resume.
    pub failed: u64,
    /// Jobs that finished (in any final state) since the last resume.
    pub finished: u64,
}

/// Where a delivery's endpoint came from, which decides its secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EndpointSource {
    /// The job's `webhook_url`, signed with `webhooks.secret`.
    Job,
    /// The batch's `webhook_url`, signed with `webhooks.secret`.
    Batch,
    /// A configured endpoint, signed with its own secret.
    Global,
}

/// One webhook delivery: an event for one endpoint. The job payload of the `webhooks` queue.
/// Holds no secret: secrets are looked up in the configuration at each attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct DeliveryJob {
    /// The event's stable id: the `webhook-id` header of every attempt.
    pub(crate) event_id: String,
    pub(crate) event_type: String,
    /// The job or batch the event is about.
    pub(crate) subject: String,
    pub(crate) url: String,
    pub(crate) source: EndpointSource,
    /// The global endpoint's name, to find its secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) endpoint_name: Option<String>,
    /// The compact JSON body, sent and signed byte for byte.
    pub(crate) body: String,
    /// The delivery this one replays, when it is a replay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) replay_of: Option<String>,
}

/// The stable id of an endpoint: `ep_` and 16 hex digits of the URL's SHA-256. Lets the
/// disabled list and the API name an endpoint without showing its URL's query.
pub fn endpoint_id(url: &str) -> String {
    let digest = Sha256::digest(url.as_bytes());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("ep_{hex}")
}

/// The delivery id of an event for an endpoint: a UUID (version 8) made from a hash of both,
/// so reading an event twice enqueues one delivery.
pub(crate) fn delivery_id(event_id: &str, url: &str) -> JobId {
    let mut hasher = Sha256::new();
    hasher.update(event_id.as_bytes());
    hasher.update([0]);
    hasher.update(url.as_bytes());
    let digest = hasher.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    bytes[6] = (bytes[6] & 0x0f) | 0x80;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    uuid::Uuid::from_bytes(bytes)
        .to_string()
        .parse()
        .expect("a UUID parses as a job id")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_distinct() {
        let a = delivery_id("evt_1", "https://a.example/");
        assert_eq!(a, delivery_id("evt_1", "https://a.example/"));
        assert_ne!(a, delivery_id("evt_1", "https://b.example/"));
        assert_ne!(a, delivery_id("evt_2", "https://a.example/"));
        // The separator keeps ("ab", "c") and ("a", "bc") apart.
        assert_ne!(delivery_id("ab", "c"), delivery_id("a", "bc"));
        assert_eq!(a.to_string().as_bytes()[14], b'8');
        let endpoint = endpoint_id("https://a.example/?token=x");
        assert_eq!(endpoint.len(), 19);
        assert!(endpoint.starts_with("ep_"));
    }
}
