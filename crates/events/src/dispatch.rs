//! The dispatcher: reads the completion events stream with a consumer group and fans each
//! event out into one delivery job per subscribed endpoint on the `webhooks` queue.
//!
//! - Read: the queue's [`EventsGroup`] readers, one per partition's events stream, as
//!   consumer `<consumer>` of the group `webhooks`: first this consumer's own pending
//!   entries, then new ones (a blocking read on a dedicated connection per partition).
//! - Fan-out: the job's `webhook_url` (job payload), its batch's `webhook_url` (batch info),
//!   and the global endpoints that want the event type; one URL gets one delivery.
//! - Exactly one delivery per (event, endpoint): the delivery's job id is a hash of both, and
//!   enqueueing an existing id is a no-op, so an event read twice enqueues nothing new.
//! - Ack: `XACK` only after the deliveries are enqueued. A dispatcher that dies leaves its
//!   entries pending; another takes them with `XAUTOCLAIM` once idle for a lease.

use std::time::{Duration, Instant};

use klingq_queue::{EventsGroup, GroupEntries, NewJob, Queue, StoredEvent};
use serde_json::Value;
use tokio::sync::watch;

use crate::config::Checked;
use crate::error::WebhookError;
use crate::payload::{DeliveryJob, EndpointSource, delivery_id};

/// The consumer group of dispatchers on the events stream.
pub const DISPATCH_GROUP: &str = "webhooks";
/// Entries read (or claimed) per call.
const READ_COUNT: usize = 100;

pub(crate) struct Dispatcher {
    /// The queue whose namespace publishes the events (jobs and batches are read from it).
    pub(crate) source: Queue,
    /// The `webhooks` queue deliveries are enqueued on.
    pub(crate) deliveries: Queue,
    pub(crate) config: std::sync::Arc<Checked>,
    pub(crate) consumer: String,
}

/// Where the read loop is.
struct Cursor {
    group: EventsGroup,
    /// Reading this consumer's own pending entries (after a start or an error).
    backlog: bool,
    last_claim: Option<Instant>,
    group_ready: bool,
}

impl Dispatcher {
    /// Runs until `stop` turns true, one read loop per partition's events stream. Redis
    /// errors are logged and retried with backoff.
    pub(crate) async fn run(self, stop: watch::Receiver<bool>) {
        tracing::info!(consumer = %self.consumer, "webhook dispatcher started");
        let groups = self.source.events_groups(DISPATCH_GROUP, &self.consumer);
        futures::future::join_all(
            groups
                .into_iter()
                .map(|group| self.run_partition(group, stop.clone())),
        )
        .await;
        tracing::info!(consumer = %self.consumer, "webhook dispatcher stopped");
    }

    async fn run_partition(&self, group: EventsGroup, mut stop: watch::Receiver<bool>) {
        let mut cursor = Cursor {
            group,
            backlog: true,
            last_claim: None,
            group_ready: false,
        };
        let mut n_failures: u32 = 0;
        loop {
            if *stop.borrow() {
                break;
            }
            let outcome = tokio::select! {
                outcome = self.step(&mut cursor) => outcome,
                _ = stop.changed() => break,
            };
            match outcome {
                Ok(()) => n_failures = 0,
                Err(error) => {
                    n_failures = n_failures.saturating_add(1);
                    cursor.backlog = true;
                    cursor.group_ready = false;
                    let delay = Duration::from_millis(100)
                        .saturating_mul(1 << n_failures.min(6))
                        .min(Duration::from_secs(5));
                    tracing::warn!(
                        %error,
                        ?delay,
                        partition = cursor.group.partition(),
                        "webhook dispatch failed; retrying"
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stop.changed() => break,
                    }
                }
            }
        }
    }

    async fn step(&self, cursor: &mut Cursor) -> Result<(), WebhookError> {
        if !cursor.group_ready {
            // From the stream's start: events published before the first dispatcher ran (a
            // cancel through the API, say) are delivered too.
            cursor.group.ensure().await?;
            cursor.group_ready = true;
        }
        let reclaim_interval = self.source.config().reclaim_interval();
        if cursor
            .last_claim
            .is_none_or(|at| at.elapsed() >= reclaim_interval)
        {
            cursor.last_claim = Some(Instant::now());
            self.reclaim(&cursor.group).await?;
        }
        let entries = if cursor.backlog {
            let entries = cursor.group.read_pending(READ_COUNT).await?;
            cursor.backlog = !entries.is_empty();
            entries
        } else {
            let block = self.source.config().block_timeout();
            cursor.group.read_new(READ_COUNT, block).await?
        };
        self.dispatch(&cursor.group, &entries).await
    }

    /// Takes over entries another dispatcher left pending for a whole lease.
    async fn reclaim(&self, group: &EventsGroup) -> Result<(), WebhookError> {
        let min_idle = self.source.config().lease_timeout();
        let mut start = "0-0".to_owned();
        // A bounded number of rounds per call, so a huge backlog does not starve new events.
        for _ in 0..10 {
            let claimed = group.claim_idle(min_idle, &start, READ_COUNT).await?;
            if !claimed.entries.events.is_empty() {
                tracing::info!(
                    n_entries = claimed.entries.events.len(),
                    "webhook dispatcher took over pending events"
                );
            }
            // Entries trimmed from the stream come back without their event; `dispatch`
            // acknowledges them, sending nothing.
            if !claimed.entries.deleted.is_empty() {
                tracing::warn!(
                    n_entries = claimed.entries.deleted.len(),
                    "pending webhook events were trimmed before dispatch"
                );
            }
            self.dispatch(group, &claimed.entries).await?;
            if claimed.next == "0-0" {
                break;
            }
            start = claimed.next;
        }
        Ok(())
    }

    /// Enqueues the deliveries of `entries`, then acknowledges them.
    async fn dispatch(
        &self,
        group: &EventsGroup,
        entries: &GroupEntries,
    ) -> Result<(), WebhookError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut jobs = Vec::new();
        for event in &entries.events {
            jobs.extend(self.fan_out(event).await?);
        }
        if !jobs.is_empty() {
            let enqueued = self.deliveries.enqueue_many(&jobs, None).await?;
            let n_new = enqueued.iter().filter(|e| e.created).count();
            tracing::debug!(
                n_events = entries.events.len(),
                n_deliveries = jobs.len(),
                n_new,
                "webhook events dispatched"
            );
        }
        group.ack(&entries.cursors()).await?;
        Ok(())
    }

    /// The deliveries of one event: one per distinct subscribed URL.
    async fn fan_out(&self, event: &StoredEvent) -> Result<Vec<NewJob>, WebhookError> {
        let (event_id, event_type, subject, body) =
            (&event.id, &event.event_type, &event.subject, &event.body);
        // The job's trace, which its deliveries continue.
        let trace = event.trace;
        let mut targets: Vec<(String, EndpointSource, Option<String>)> = Vec::new();
        let url_in = |value: &Value| {
            value
                .get("webhook_url")
                .and_then(Value::as_str)
                .map(str::trim)
                .filter(|url| !url.is_empty())
                .map(str::to_owned)
        };
        let mut batch_id = None;
        if event_type.starts_with("job.") && !subject.is_empty() {
            if let Some(record) = self.source.job(subject).await? {
                if record.queue == crate::api::DELIVERY_QUEUE {
                    // A delivery's own event (only an operator's cancel of a delivery can make
                    // one): announcing it would send webhooks about webhooks.
                    return Ok(Vec::new());
                }
                if let Some(url) = url_in(&record.payload) {
                    targets.push((url, EndpointSource::Job, None));
                }
                batch_id = record.batch_id;
            }
            if batch_id.is_none() {
                // The job record expired (a dispatcher down for longer than the retention):
                // the event itself still names its batch.
                batch_id = serde_json::from_str::<Value>(body).ok().and_then(|event| {
                    event
                        .pointer("/data/batch_id")
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                });
            }
        } else if event_type.starts_with("batch.") && !subject.is_empty() {
            batch_id = Some(subject.clone());
        }
        if let Some(batch_id) = batch_id
            && let Some(batch) = self.source.batch(&batch_id).await?
            && let Some(url) = url_in(&batch.info)
        {
            targets.push((url, EndpointSource::Batch, None));
        }
        for endpoint in &self.config.endpoints {
            if endpoint.wants(event_type) {
                targets.push((
                    endpoint.url.clone(),
                    EndpointSource::Global,
                    Some(endpoint.name.clone()),
                ));
            }
        }
        let mut seen = std::collections::HashSet::new();
        targets.retain(|(url, _, _)| seen.insert(url.clone()));
        let max_attempts = self.config.schedule.len() as u32 + 1;
        targets
            .into_iter()
            .map(|(url, source, endpoint_name)| {
                let delivery = DeliveryJob {
                    event_id: event_id.clone(),
                    event_type: event_type.clone(),
                    subject: subject.clone(),
                    url,
                    source,
                    endpoint_name,
                    body: body.clone(),
                    replay_of: None,
                };
                let mut job = NewJob::new(&delivery)?;
                job.id = delivery_id(&delivery.event_id, &delivery.url);
                job.max_attempts = Some(max_attempts);
                job.trace = trace;
                Ok(job)
            })
            .collect()
    }
}
