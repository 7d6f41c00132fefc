//! Jobs the queue itself gives up on (undecodable payloads, attempts exhausted), and the
//! completion event of a delivery.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use klingq_core::job::now_ms;
use klingq_core::{JobError, JobState};

use super::Shared;
use super::settle::{Settle, settle};
use crate::completion::{self, BuiltEvent, EventExtras, EventSubject};
use crate::lease::{Delivery, Kept};

/// Builds the completion event of a delivery ending in `state`.
pub(crate) fn delivery_event(
    shared: &Shared,
    delivery: &Delivery,
    state: JobState,
    error: Option<&JobError>,
    extras: EventExtras,
) -> Option<BuiltEvent> {
    if !shared.queue.config().completion_events {
        return None;
    }
    completion::build(
        &EventSubject {
            job_id: &delivery.job_id,
            batch_id: delivery.batch.as_deref(),
            redrives: delivery.redrives,
            metadata: completion::metadata_of(&delivery.payload),
        },
        state,
        error,
        extras,
        now_ms(),
    )
}

/// Dead-letters a delivery the queue itself gives up on (undecodable, attempts exhausted).
pub(super) async fn dead_letter(
    shared: Arc<Shared>,
    delivery: Delivery,
    code: &str,
    message: String,
) {
    let error = JobError {
        step: "queue".to_owned(),
        code: code.to_owned(),
        message: message.clone(),
        details: Vec::new(),
        cost_committed: false,
    };
    let event = delivery_event(
        &shared,
        &delivery,
        JobState::Dead,
        Some(&error),
        EventExtras::default(),
    );
    shared.stats.dead.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(job_id = %delivery.job_id, code, %message, "job dead-lettered");
    settle(
        &shared,
        &delivery,
        Settle::Finish {
            state: JobState::Dead,
            reason: message,
            error: Some(error),
            event,
            charged_micros: 0,
        },
        Kept::default(),
    )
    .await;
}
