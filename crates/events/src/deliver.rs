//! One delivery attempt: check, sign, send, record, and say how the queue settles it.
//!
//! - 2xx within the timeout: delivered.
//! - `410 Gone`: the endpoint is disabled (persisted) and the delivery fails; nothing more is
//!   sent to it until an operator re-enables it.
//! - `429` or `503`: retried after `Retry-After` (capped), or on the schedule without one.
//! - Anything else, 3xx included (redirects are not followed), a timeout or a connection
//!   error: retried on the schedule; past its last entry the delivery goes dead (exhausted),
//!   listed and replayable.
//! - A refused target (SSRF guard, https only), a disabled endpoint or a missing secret: fails
//!   at once, never retried.
//! - A URL the HTTP client can never send to (longer than 2,048 bytes, a host no request line
//!   can carry, anything the client cannot build a request for): fails at once as
//!   `INVALID_URL`, never retried. Enqueue refuses such URLs; this catches older jobs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use apalis_core::task::data::Data;
use klingq_core::job::{format_ms, now_ms};
use klingq_core::{JobError, TraceParent, redact_url};
use klingq_queue::{JobFailure, Lease, Queue};
use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use tracing::Instrument;

use crate::config::Checked;
use crate::error::WebhookError;
use crate::payload::{DeliveryJob, EndpointSource, endpoint_id};
use crate::signing::{
    HEADER_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP, HEADER_TRACEPARENT, WebhookSecret,
    signature_header, unix_now,
};
use crate::ssrf::{GuardedResolver, check_url, find_refusal};
use crate::store::{self, AttemptOutcome, AttemptRecord};

/// Bytes of a response body kept on the attempt record.
pub(crate) const RESPONSE_BODY_LIMIT: usize = 1024;

/// The HTTP client every delivery uses: addresses filtered by the SSRF guard, no redirects, no
/// proxy (a proxy would resolve the target itself, past the guard), a whole-request timeout.
pub(crate) fn build_client(config: &Checked) -> Result<reqwest::Client, WebhookError> {
    reqwest::Client::builder()
        .dns_resolver(Arc::new(GuardedResolver::new(config.policy.clone())))
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(config.timeout)
        .connect_timeout(config.timeout.min(Duration::from_secs(10)))
        .https_only(config.https_only)
        .pool_idle_timeout(Duration::from_secs(60))
        .user_agent(concat!("klingq-webhooks/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(WebhookError::Client)
}

/// Shared by every delivery handler of a worker.
pub(crate) struct Deliverer {
    /// The `webhooks` queue, for attempt records and the disabled list.
    pub(crate) queue: Queue,
    pub(crate) client: reqwest::Client,
    pub(crate) config: Arc<Checked>,
    /// Deliveries in flight per endpoint id.
    in_flight: Mutex<HashMap<String, usize>>,
}

/// A slot of an endpoint's in-flight limit, given back on drop.
struct Slot<'a> {
    in_flight: &'a Mutex<HashMap<String, usize>>,
    endpoint_id: String,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut in_flight = self.in_flight.lock().expect("in-flight map poisoned");
        if let Some(count) = in_flight.get_mut(&self.endpoint_id) {
            *count -= 1;
            if *count == 0 {
                in_flight.remove(&self.endpoint_id);
            }
        }
    }
}

/// The apalis handler of the `webhooks` queue.
pub(crate) async fn handle(
    job: DeliveryJob,
    lease: Lease,
    deliverer: Data<Arc<Deliverer>>,
) -> Result<(), JobFailure> {
    // A child of the span that enqueued the event's job (a new trace for batch events); the
    // receiver gets this span as the parent of its own in the `traceparent` header.
    let span = tracing::info_span!(
        "webhook_delivery",
        delivery_id = %lease.job_id(),
        event_id = %job.event_id,
        event_type = %job.event_type,
        attempt = lease.attempt(),
        otel.kind = "client",
        trace_id = tracing::field::Empty,
    );
    let trace = klingq_telemetry::continue_trace(&span, lease.trace_parent());
    deliverer.deliver(job, &lease, trace).instrument(span).await
}

fn job_error(code: &str, message: String) -> JobError {
    JobError {
        step: "webhook".to_owned(),
        code: code.to_owned(),
        message,
        details: Vec::new(),
        cost_committed: false,
    }
}

fn fail(code: &str, message: String) -> JobFailure {
    JobFailure::Fail(job_error(code, message))
}

/// Up to ±20 % of jitter, so retries of many deliveries spread out.
fn jitter(delay: Duration) -> Duration {
    delay.mul_f64(rand::random_range(0.8..=1.2))
}

/// `Retry-After` as seconds or an HTTP date.
pub(crate) fn parse_retry_after(
    value: &HeaderValue,
    now: std::time::SystemTime,
) -> Option<Duration> {
    let text = value.to_str().ok()?.trim();
    if let Ok(seconds) = text.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let when = httpdate::parse_http_date(text).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

/// An error's message and its sources, joined, without the request URL (it may hold a token).
fn describe(error: reqwest::Error, timeout: Duration) -> String {
    if error.is_timeout() {
        return format!("timed out after {} s", timeout.as_secs());
    }
    let error = error.without_url();
    let mut parts = vec![error.to_string()];
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        let text = cause.to_string();
        if !parts.iter().any(|p| p == &text) {
            parts.push(text);
        }
        source = cause.source();
    }
    parts.join(": ")
}

async fn read_capped(mut response: reqwest::Response) -> Option<String> {
    let mut body = Vec::new();
    while body.len() < RESPONSE_BODY_LIMIT {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let room = RESPONSE_BODY_LIMIT - body.len();
                body.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            _ => break,
        }
    }
    (!body.is_empty()).then(|| String::from_utf8_lossy(&body).into_owned())
}

impl Deliverer {
    pub(crate) fn new(queue: Queue, client: reqwest::Client, config: Arc<Checked>) -> Self {
        Self {
            queue,
            client,
            config,
            in_flight: Mutex::new(HashMap::new()),
        }
    }

    fn try_slot(&self, endpoint_id: &str) -> Option<Slot<'_>> {
        let mut in_flight = self.in_flight.lock().expect("in-flight map poisoned");
        let count = in_flight.entry(endpoint_id.to_owned()).or_default();
        if *count >= self.config.per_endpoint_concurrency {
            return None;
        }
        *count += 1;
        Some(Slot {
            in_flight: &self.in_flight,
            endpoint_id: endpoint_id.to_owned(),
        })
    }

    /// The secrets that sign a delivery, or the code and reason it cannot be signed.
    fn secrets_for(&self, job: &DeliveryJob) -> Result<&[WebhookSecret], (&'static str, String)> {
        match job.source {
            EndpointSource::Job | EndpointSource::Batch if self.config.secrets.is_empty() => Err((
                "NO_SECRET",
                "webhooks.secret is empty: per-job and per-batch URLs cannot be signed".to_owned(),
            )),
            EndpointSource::Job | EndpointSource::Batch => Ok(&self.config.secrets),
            EndpointSource::Global => self
                .config
                .endpoints
                .iter()
                .find(|e| {
                    e.url == job.url && job.endpoint_name.as_deref().is_none_or(|n| n == e.name)
                })
                .or_else(|| self.config.endpoints.iter().find(|e| e.url == job.url))
                .map(|e| e.secrets.as_slice())
                .ok_or_else(|| {
                    (
                        "ENDPOINT_REMOVED",
                        format!("endpoint {} is no longer configured", redact_url(&job.url)),
                    )
                }),
        }
    }

    async fn record(&self, delivery_id: &str, attempt: AttemptRecord) {
        if let Err(error) = store::record_attempt(&self.queue, delivery_id, &attempt).await {
            tracing::warn!(delivery_id, %error, "recording a webhook attempt failed");
        }
    }

    /// Records an attempt that sent nothing, and fails the delivery.
    async fn refuse(
        &self,
        delivery_id: &str,
        attempt: u32,
        outcome: AttemptOutcome,
        failure: JobFailure,
    ) -> Result<(), JobFailure> {
        let message = match &failure {
            JobFailure::Fail(error) => error.message.clone(),
            other => other.to_string(),
        };
        tracing::warn!(delivery_id, reason = %message, "webhook delivery not sent");
        self.record(
            delivery_id,
            AttemptRecord {
                attempt,
                at: format_ms(now_ms()),
                outcome,
                status_code: None,
                latency_ms: 0,
                error: Some(message),
                response_body: None,
                retry_in_ms: None,
            },
        )
        .await;
        Err(failure)
    }

    /// The delay before retrying after attempt `attempt` (1-based), from the schedule.
    fn scheduled_delay(&self, attempt: u32) -> Duration {
        let schedule = &self.config.schedule;
        let index = (attempt.max(1) as usize - 1).min(schedule.len().saturating_sub(1));
        schedule.get(index).copied().map(jitter).unwrap_or_default()
    }

    pub(crate) async fn deliver(
        &self,
        job: DeliveryJob,
        lease: &Lease,
        trace: TraceParent,
    ) -> Result<(), JobFailure> {
        let delivery_id = lease.job_id().to_owned();
        let attempt = lease.attempt();
        let last_attempt = attempt >= lease.max_attempts();
        let endpoint = redact_url(&job.url);

        match store::disabled(&self.queue, &job.url).await {
            Ok(Some(disabled)) => {
                let failure = fail(
                    "ENDPOINT_DISABLED",
                    format!(
                        "endpoint {endpoint} ({}) is disabled since {}: {}",
                        disabled.endpoint_id, disabled.disabled_at, disabled.reason
                    ),
                );
                return self
                    .refuse(&delivery_id, attempt, AttemptOutcome::Skipped, failure)
                    .await;
            }
            Ok(None) => {}
            Err(error) => {
                return Err(JobFailure::Defer {
                    after: jitter(Duration::from_secs(5)),
                    reason: format!("reading the disabled endpoints failed: {error}"),
                });
            }
        }
        let secrets = match self.secrets_for(&job) {
            Ok(secrets) => secrets,
            Err((code, reason)) => {
                return self
                    .refuse(
                        &delivery_id,
                        attempt,
                        AttemptOutcome::Skipped,
                        fail(code, reason),
                    )
                    .await;
            }
        };
        // The rule enqueue applies; a job stored before it existed may still break it.
        if let Err(error) = klingq_core::urls::check_webhook_url(&job.url) {
            let failure = fail(
                "INVALID_URL",
                format!("the webhook URL cannot be delivered to: {}", error.message),
            );
            return self
                .refuse(&delivery_id, attempt, AttemptOutcome::Refused, failure)
                .await;
        }
        let url = match check_url(&job.url, &self.config.policy, self.config.https_only) {
            Ok(url) => url,
            Err(refused) => {
                let failure = fail("TARGET_REFUSED", refused.to_string());
                return self
                    .refuse(&delivery_id, attempt, AttemptOutcome::Refused, failure)
                    .await;
            }
        };
        let Some(_slot) = self.try_slot(&endpoint_id(&job.url)) else {
            return Err(JobFailure::Defer {
                after: jitter(Duration::from_secs(1)),
                reason: format!("endpoint {endpoint} has its most deliveries in flight"),
            });
        };

        let timestamp = unix_now();
        let signature = signature_header(secrets, &job.event_id, timestamp, job.body.as_bytes());
        let sent_at = format_ms(now_ms());
        let started = Instant::now();
        let result = self
            .client
            .post(url)
            .header(CONTENT_TYPE, "application/json")
            .header(HEADER_ID, &job.event_id)
            .header(HEADER_TIMESTAMP, timestamp.to_string())
            .header(HEADER_SIGNATURE, signature)
            .header(HEADER_TRACEPARENT, trace.to_string())
            .body(job.body.clone())
            .send()
            .await;
        let mut record = AttemptRecord {
            attempt,
            at: sent_at,
            outcome: AttemptOutcome::Failed,
            status_code: None,
            latency_ms: 0,
            error: None,
            response_body: None,
            retry_in_ms: None,
        };

        let (reason, code, retry_in) = match result {
            Err(error) => {
                record.latency_ms = started.elapsed().as_millis() as u64;
                if let Some(refused) = find_refusal(&error) {
                    let failure = fail("TARGET_REFUSED", refused.to_string());
                    return self
                        .refuse(&delivery_id, attempt, AttemptOutcome::Refused, failure)
                        .await;
                }
                // No request could be built from the URL: nothing was sent, and nothing ever
                // will be.
                if error.is_builder() {
                    let failure = fail(
                        "INVALID_URL",
                        format!(
                            "the HTTP client cannot send to this URL: {}",
                            describe(error, self.config.timeout)
                        ),
                    );
                    return self
                        .refuse(&delivery_id, attempt, AttemptOutcome::Refused, failure)
                        .await;
                }
                let code = if error.is_timeout() {
                    "TIMEOUT"
                } else {
                    "CONNECTION_FAILED"
                };
                (
                    describe(error, self.config.timeout),
                    code.to_owned(),
                    self.scheduled_delay(attempt),
                )
            }
            Ok(response) => {
                let status = response.status();
                record.latency_ms = started.elapsed().as_millis() as u64;
                record.status_code = Some(status.as_u16());
                let retry_after = response
                    .headers()
                    .get(RETRY_AFTER)
                    .and_then(|v| parse_retry_after(v, std::time::SystemTime::now()));
                record.response_body = read_capped(response).await;
                if status.is_success() {
                    record.outcome = AttemptOutcome::Succeeded;
                    tracing::debug!(
                        delivery_id,
                        event_id = %job.event_id,
                        %endpoint,
                        status = status.as_u16(),
                        latency_ms = record.latency_ms,
                        "webhook delivered"
                    );
                    self.record(&delivery_id, record).await;
                    return Ok(());
                }
                if status == StatusCode::GONE {
                    record.outcome = AttemptOutcome::Gone;
                    let reason = format!("answered 410 Gone to event {}", job.event_id);
                    record.error = Some(format!("{reason}; endpoint disabled"));
                    self.record(&delivery_id, record).await;
                    if let Err(error) =
                        store::disable_endpoint(&self.queue, &job.url, &reason, &delivery_id).await
                    {
                        // Not disabled yet: try again, the next answer will say 410 again.
                        return Err(JobFailure::Retry {
                            after: jitter(Duration::from_secs(5)),
                            reason: format!("disabling endpoint {endpoint} failed: {error}"),
                            error: None,
                        });
                    }
                    tracing::warn!(
                        delivery_id,
                        %endpoint,
                        endpoint_id = %endpoint_id(&job.url),
                        "webhook endpoint answered 410 gone: disabled"
                    );
                    return Err(fail(
                        "ENDPOINT_GONE",
                        format!("endpoint {endpoint} answered 410 Gone: disabled"),
                    ));
                }
                let throttled = matches!(
                    status,
                    StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
                );
                let delay = match retry_after {
                    Some(after) if throttled => after.min(self.config.max_retry_after),
                    _ => self.scheduled_delay(attempt),
                };
                if throttled {
                    record.outcome = AttemptOutcome::Throttled;
                }
                let reason = if status.is_redirection() {
                    format!("answered {status} (redirects are not followed)")
                } else {
                    format!("answered {status}")
                };
                (reason, format!("HTTP_{}", status.as_u16()), delay)
            }
        };
        record.error = Some(reason.clone());
        if !last_attempt {
            record.retry_in_ms = Some(retry_in.as_millis() as u64);
        }
        tracing::info!(
            delivery_id,
            event_id = %job.event_id,
            %endpoint,
            attempt,
            reason = %reason,
            "webhook attempt failed"
        );
        if last_attempt {
            tracing::warn!(delivery_id, %endpoint, attempt, "webhook delivery exhausted");
        }
        self.record(&delivery_id, record).await;
        Err(JobFailure::Retry {
            after: retry_in,
            reason: reason.clone(),
            error: Some(job_error(&code, reason)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let now = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let value = |text: &str| HeaderValue::from_str(text).unwrap();
        assert_eq!(
            parse_retry_after(&value("120"), now),
            Some(Duration::from_secs(120))
        );
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            parse_retry_after(&value(&later), now),
            Some(Duration::from_secs(30))
        );
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(
            parse_retry_after(&value(&earlier), now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after(&value("soon"), now), None);
    }

    /// Whether reqwest can build a request for `text`: it parses the URL with `url`, then
    /// parses the URL's text as the request line's `http::Uri` (reqwest's `try_uri`); a
    /// failure there is a builder error, and nothing is sent.
    fn client_can_send(text: &str) -> bool {
        reqwest::Url::parse(text).is_ok_and(|url| url.as_str().parse::<http::Uri>().is_ok())
    }

    #[test]
    fn every_url_enqueue_accepts_is_one_the_client_can_send_to() {
        let mut corpus = vec![
            "https://example.com/hook".to_owned(),
            "https://user:pw@example.com:8443/a/b?x=1&y=2#frag".to_owned(),
            "https://[2001:db8::1]:8080/hook".to_owned(),
            "https://bücher.example/ä?ö=ü".to_owned(),
            "https://x\"onmouseover=alert(1)//e.com/".to_owned(),
            "https://e.com/%zz?%".to_owned(),
        ];
        for byte in 0x21u8..0x7f {
            let c = char::from(byte);
            corpus.extend([
                format!("https://a{c}b.example.com/p"),
                format!("https://e.com/p{c}q"),
                format!("https://e.com/p?q={c}&r"),
                format!("https://e.com/p#{c}"),
                format!("https://u{c}v:w{c}x@e.com/"),
            ]);
        }
        let mut refused_by_the_client = 0;
        for url in &corpus {
            let accepted = klingq_core::urls::check_webhook_url(url).is_ok();
            if accepted {
                assert!(
                    client_can_send(url),
                    "accepted at enqueue but not sendable: {url}"
                );
            }
            if reqwest::Url::parse(url).is_ok() && !client_can_send(url) {
                refused_by_the_client += 1;
                assert!(!accepted, "{url}");
            }
        }
        // The corpus holds URLs the parser reads but the client cannot send.
        assert!(refused_by_the_client >= 4, "{refused_by_the_client}");
    }

    #[test]
    fn jitter_stays_within_a_fifth() {
        for _ in 0..200 {
            let delay = jitter(Duration::from_secs(10));
            assert!(delay >= Duration::from_secs(8) && delay <= Duration::from_secs(12));
        }
    }
}
