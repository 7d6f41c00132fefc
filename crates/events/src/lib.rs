//! klingq's completion notifications: durable, signed, SSRF-safe webhooks.
//!
//! # How an event reaches an endpoint
//! 1. The queue appends a completion event to the stream `{ns}:events` when a job ends
//!    (`job.succeeded`, `job.failed`, `job.cancelled`) and once when a batch completes
//!    (`batch.completed`). Its body is compact JSON `{id, type, timestamp, data}`.
//! 2. The dispatcher ([`run_webhooks`]) reads the stream with the consumer group `webhooks`
//!    and enqueues one delivery per subscribed endpoint on the durable queue `webhooks`: the
//!    job's `webhook_url`, its batch's `webhook_url`, and the configured global endpoints.
//! 3. The delivery worker signs the body as Standard Webhooks prescribes (`webhook-id`,
//!    `webhook-timestamp`, `webhook-signature`) and POSTs it byte for byte. 2xx is success;
//!    `410 Gone` disables the endpoint; `429`/`503` wait for `Retry-After`; anything else is
//!    retried on the schedule (5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h with jitter), then
//!    kept as exhausted: listed and replayable ([`list_deliveries`], [`replay_delivery`]).
//!
//! The body is sent exactly as the queue published it, so it carries the event `id` beside
//! `type`, `timestamp` and `data` (Standard Webhooks allows extra fields); the `id` equals the
//! `webhook-id` header. Schemas: `docs/schemas/`.
//!
//! # Security
//! Every address a delivery connects to passes the SSRF guard ([`ssrf`]): only public
//! addresses, unless allow-listed by CIDR. Secrets are never logged; URLs in logs and
//! listings lose their query.
//!
//! # For receivers
//! [`verify`] checks a request: any `v1` signature matching any secret, compared in constant
//! time, with a timestamp within five minutes. See `README-webhooks.md`.

mod api;
mod config;
mod deliver;
mod dispatch;
mod error;
mod payload;
mod run;
pub mod signing;
pub mod ssrf;
mod store;

pub use api::{
    DELIVERY_QUEUE, DeliveryDetail, DeliveryPage, DeliveryQuery, DeliveryStatus, DeliverySummary,
    MAX_PAGE, ReplayMode, ReplayOutcome, get_delivery, list_deliveries, replay_delivery,
};
pub use config::{ConfigError, EndpointConfig, WebhookConfig, parse_duration};
pub use dispatch::DISPATCH_GROUP;
pub use error::WebhookError;
pub use payload::{BatchCompletedData, BatchPausedData, EndpointSource, endpoint_id};
pub use run::run_webhooks;
pub use signing::{
    SecretError, SignedHeaders, VerifyError, WebhookSecret, parse_secrets, sign, signature_header,
    unix_now, verify, verify_with_text_secrets,
};
pub use ssrf::{AddressPolicy, Refused, check_url};
pub use store::{
    AttemptOutcome, AttemptRecord, DisabledEndpoint, disabled_endpoints, enable_endpoint,
};
