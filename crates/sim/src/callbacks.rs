//! Per-run callbacks (provider-api.md §1.5): when a run created with a `callback_url` becomes
//! terminal, the simulator POSTs the event envelope to it, signed like Runflow does.
//!
//! A run's status is computed from time on every read, so nothing would notice the terminal
//! instant by itself: every run with a `callback_url` gets a timer task that sleeps until the
//! computed end of its job (or until a cancellation wakes it), then freezes the envelope and
//! delivers it. Delivery headers: `Content-Type: application/json`, `Runflow-Request-Id: <uuid>`
//! and, when a secret is configured, `Runflow-Signature: <hex HMAC-SHA256(secret, raw body)>`.
//! A non-2xx answer, a timeout or a connection error is retried with the same body and
//! signature after 250 ms, 500 ms and 1 s, then given up. Redirects are not followed.
//!
//! The `callback_drop`, `callback_duplicate` and `callback_delay_ms` settings (and the
//! `callback-drop` / `callback-duplicate` prompt tokens) are applied when the callback falls due,
//! from the live config.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::Rng;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::api::RenderContext;
use crate::faults::FaultKind;
use crate::signing::callback_signature;
use crate::state::Sim;

/// How long one delivery attempt may take, connection included.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// Pauses before the retries of a delivery: four attempts in all.
const RETRY_DELAYS: [Duration; 3] = [
    Duration::from_millis(250),
    Duration::from_millis(500),
    Duration::from_secs(1),
];

/// How long after the first delivery (and its retries) a duplicated callback is sent again.
const DUPLICATE_GAP: Duration = Duration::from_millis(50);

/// The callback machinery shared by every run: an HTTP client and the simulator's shutdown.
pub(crate) struct Callbacks {
    client: reqwest::Client,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for Callbacks {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("Callbacks")
    }
}

impl Callbacks {
    /// A client that never follows redirects; timers and deliveries stop at `shutdown`.
    pub(crate) fn new(shutdown: CancellationToken) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(ATTEMPT_TIMEOUT)
            .timeout(ATTEMPT_TIMEOUT)
            .user_agent(concat!("klingq-sim-callbacks/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self { client, shutdown })
    }
}

/// A frozen callback, ready to send.
struct Delivery {
    run_id: Uuid,
    url: String,
    /// The callback URL without credentials, query or fragment, for logs.
    target: String,
    body: Bytes,
    signature: Option<String>,
    delay: Duration,
    duplicate: bool,
}

/// What the timer finds when it looks at the run.
enum Due {
    /// The run is not terminal yet: wait again.
    NotYet,
    /// Nothing (more) to send: the run is gone, its callback was sent, or it was dropped.
    Done,
    /// Send this.
    Send(Delivery),
}

/// Starts the callback timer of a run that was created with a `callback_url`.
pub(crate) fn schedule(sim: &Arc<Sim>, run_id: Uuid) {
    let wake = match sim.lock().run(run_id) {
        Some(run) if run.callback_url.is_some() => run.wake.clone(),
        _ => return,
    };
    let sim = Arc::clone(sim);
    let shutdown = sim.callbacks.shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = wait_and_deliver(&sim, run_id, wake) => {}
        }
    });
}

async fn wait_and_deliver(sim: &Arc<Sim>, run_id: Uuid, wake: CancellationToken) {
    loop {
        let at = {
            let state = sim.lock();
            match state.run(run_id) {
                Some(run) if !run.callback_fired => run.callback_instant(),
                _ => return,
            }
        };
        match at {
            Some(at) => tokio::select! {
                () = tokio::time::sleep_until(tokio::time::Instant::from_std(at)) => {}
                () = wake.cancelled() => {}
            },
            None => wake.cancelled().await,
        }
        match fall_due(sim, run_id) {
            Due::NotYet => tokio::time::sleep(Duration::from_millis(1)).await,
            Due::Done => return,
            Due::Send(delivery) => {
                deliver(sim, &delivery).await;
                return;
            }
        }
    }
}

/// The callback URL stripped of credentials, query and fragment, safe to log.
fn log_target(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut url) => {
            url.set_query(None);
            url.set_fragment(None);
            let _ = url.set_username("");
            let _ = url.set_password(None);
            url.to_string()
        }
        Err(_) => "<invalid url>".to_owned(),
    }
}

/// Freezes the envelope of a run that became terminal and applies the callback faults, once.
fn fall_due(sim: &Sim, run_id: Uuid) -> Due {
    let mut state = sim.lock();
    let now = Instant::now();
    // Settle first, so the charge of a succeeded run exists before its callback arrives.
    state.settle(now);
    let Some(run) = state.run(run_id) else {
        return Due::Done;
    };
    if run.callback_fired {
        return Due::Done;
    }
    if !run.status_at(now).is_terminal() {
        return Due::NotYet;
    }
    let Some(url) = run.callback_url.clone() else {
        return Due::Done;
    };
    let envelope = RenderContext::new(sim, &state, now).callback_envelope(run);
    let token = run.callback_fault;
    let config = &state.config;
    let mut rng = rand::rng();
    let dropped = token == Some(FaultKind::CallbackDrop) || rng.random_bool(config.callback_drop);
    let duplicate = !dropped
        && (token == Some(FaultKind::CallbackDuplicate)
            || rng.random_bool(config.callback_duplicate));
    let body = Bytes::from(serde_json::to_vec(&envelope).unwrap_or_default());
    let signature = config
        .callback_secret
        .as_deref()
        .map(|secret| callback_signature(secret, &body));
    let delay = Duration::from_millis(config.callback_delay_ms);
    if let Some(run) = state.run_mut(run_id) {
        run.callback_fired = true;
    }
    state.stats.callbacks.scheduled += 1;
    if dropped {
        state.stats.callbacks.dropped += 1;
        state.note_callback_fault(run_id, FaultKind::CallbackDrop);
        tracing::debug!(%run_id, "sim dropped a callback on purpose");
        return Due::Done;
    }
    if duplicate {
        state.stats.callbacks.duplicated += 1;
        state.note_callback_fault(run_id, FaultKind::CallbackDuplicate);
    }
    Due::Send(Delivery {
        run_id,
        target: log_target(&url),
        url,
        body,
        signature,
        delay,
        duplicate,
    })
}

/// Sends a callback after the configured delay, and a second time when duplicated.
async fn deliver(sim: &Sim, delivery: &Delivery) {
    if !delivery.delay.is_zero() {
        tokio::time::sleep(delivery.delay).await;
    }
    send_with_retries(sim, delivery, 1).await;
    if delivery.duplicate {
        tokio::time::sleep(DUPLICATE_GAP).await;
        send_with_retries(sim, delivery, 2).await;
    }
}

/// One delivery: up to four attempts with the same body, signature and request id.
async fn send_with_retries(sim: &Sim, delivery: &Delivery, copy: u32) {
    let run_id = delivery.run_id;
    let target = delivery.target.as_str();
    let request_id = Uuid::now_v7().to_string();
    let attempts = RETRY_DELAYS.len() + 1;
    for attempt in 1..=attempts {
        if let Some(pause) = attempt
            .checked_sub(2)
            .and_then(|index| RETRY_DELAYS.get(index))
        {
            tokio::time::sleep(*pause).await;
            sim.lock()
                .count_callback(run_id, |stats| stats.retried += 1);
        }
        let mut request = sim
            .callbacks
            .client
            .post(&delivery.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("Runflow-Request-Id", &request_id)
            .body(delivery.body.clone());
        if let Some(signature) = &delivery.signature {
            request = request.header("Runflow-Signature", signature);
        }
        match request.send().await {
            Ok(response) => {
                let status = response.status();
                // Read the (ignored) answer so the connection can be reused.
                let _ = response.bytes().await;
                tracing::debug!(
                    %run_id,
                    status = status.as_u16(),
                    attempt,
                    copy,
                    %target,
                    "sim callback answered"
                );
                if status.is_success() {
                    sim.lock().note_callback_delivered(run_id);
                    return;
                }
            }
            Err(error) => {
                // `without_url` keeps the query string (which may hold a token) out of the log.
                let error = error.without_url();
                tracing::debug!(
                    %run_id,
                    attempt,
                    copy,
                    %target,
                    error = %error,
                    "sim callback attempt failed"
                );
            }
        }
    }
    tracing::debug!(%run_id, attempts, copy, %target, "sim callback given up");
    sim.lock().count_callback(run_id, |stats| stats.failed += 1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_targets_carry_no_credentials_or_query() {
        assert_eq!(
            log_target("https://user:pw@example.com:8443/hook?token=abc#frag"),
            "https://example.com:8443/hook"
        );
        assert_eq!(log_target("not a url"), "<invalid url>");
    }
}
