//! Errors of the webhook service and of the delivery API.

use klingq_queue::QueueError;

use crate::config::ConfigError;

/// A webhook operation failed.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("queue: {0}")]
    Queue(#[from] QueueError),
    #[error("encoding: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("building the http client: {0}")]
    Client(#[source] reqwest::Error),
    #[error("delivery {0} not found")]
    DeliveryNotFound(String),
    #[error("delivery {id} is {state}: only finished deliveries can be replayed")]
    NotReplayable { id: String, state: String },
    #[error("the webhook delivery worker stopped: {0}")]
    Worker(String),
}

impl WebhookError {
    /// Whether the error is the caller's (an unknown or unfinished delivery): HTTP 404 or 409
    /// rather than 500.
    pub fn is_not_found(&self) -> bool {
        matches!(self, WebhookError::DeliveryNotFound(_))
    }

    pub fn is_conflict(&self) -> bool {
        matches!(self, WebhookError::NotReplayable { .. })
    }
}
