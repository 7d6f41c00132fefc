//! A webhook delivery shares the namespace's job records with video jobs, but it is not a job:
//! job-level reads and actions do not see it.

use klingq_core::JobState;
use klingq_producer::{ProducerError, RedriveTarget};
use klingq_queue::NewJob;
use serde_json::json;

use crate::producer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_delivery_is_not_a_job() {
    let producer = producer("kinds").await;
    let deliveries = producer.queue().for_queue("webhooks");
    let delivery = NewJob::new(&json!({"url": "https://hooks.example.com/x"})).unwrap();
    let id = delivery.id.to_string();
    deliveries.enqueue(&delivery, None).await.unwrap();

    assert!(matches!(
        producer.job(&id).await,
        Err(ProducerError::JobNotFound(_))
    ));
    assert!(matches!(
        producer.cancel_job(&id).await,
        Err(ProducerError::JobNotFound(_))
    ));
    let redriven = producer
        .redrive(RedriveTarget::Ids(vec![id.clone()]))
        .await
        .unwrap();
    assert_eq!(redriven.redriven, 0);
    assert_eq!(redriven.not_found, vec![id.clone()]);
    assert!(redriven.not_dead.is_empty());

    // The delivery is untouched: still queued, no event appended for it.
    let record = deliveries.job(&id).await.unwrap().unwrap();
    assert_eq!(record.state, JobState::Queued);
    assert!(producer.recent_events(10).await.unwrap().is_empty());
    // Its own queue still acts on it.
    assert!(matches!(
        deliveries.cancel(&id, "test").await,
        Ok(klingq_queue::CancelOutcome::Cancelled { .. })
    ));
}
