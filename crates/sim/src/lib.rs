//! klingq-sim: an HTTP simulator of the Runflow video API for `kuaishou/kling-video/v3/pro/image-to-video`.
//!
//! It lets klingq run and be tested with no provider account. The behaviour follows
//! `shared/provider-api.md` §1 and §7. The simulator deliberately shares no wire types with the
//! klingq client: it validates on its own, so that both cannot be wrong the same way.
//!
//! # Embedding
//!
//! ```ignore
//! let sim = klingq_sim::start_local(klingq_sim::SimConfig::fast()).await?;
//! let base = sim.base_url(); // e.g. http://127.0.0.1:41234
//! // ... drive a client against `base`, then assert on sim.charges(), sim.runs(), sim.stats().
//! ```
//!
//! The `klingq sim` command flattens [`SimArgs`] into its clap arguments and calls [`run`].
//!
//! # Endpoints
//!
//! Runflow API (all but health need `Authorization: Bearer <key>`, else 401 `UNAUTHORIZED`):
//! - `POST /v1/models/{model...}/runs` with `{input, client_ref?, metadata?, callback_url?}` →
//!   201 with a Run object (`status_code: "queued"`, UUIDv7 `id`).
//! - `GET /v1/runs/{id}`: the Run; status moves `queued → dispatching → running → succeeded|failed`
//!   (or to `canceled` by the admin cancel), computed from timestamps on every read; download
//!   URLs are re-signed on every read.
//! - `GET /v1/runs?q=...&limit=...&sort_by=created_at:desc|asc` → `{data: [Run], limit, next_pq, prev_pq}`.
//!   `q` terms are joined by ` AND `: `client_ref:"..."`, `status_code:...`, `model:...`, `id:...`,
//!   `created_at>T`, `created_at<T` (RFC 3339 or `YYYY-MM-DD`).
//! - `POST /v1/run/{model...}` (e.g. `/v1/run/kuaishou/kling-video/v3/pro/image-to-video` or
//!   `/v1/run/kling-video/v3/pro/image-to-video`): the synchronous façade. Flat input body; the run is
//!   created first, the connection is held for the simulated latency, the charge is booked, then
//!   `{"video": {url, content_type, file_name, file_size}}` is sent. Moderation → 422
//!   `CONTENT_POLICY_VIOLATION`, provider timeout → 504 `PROVIDER_TIMEOUT`, stuck → never answers.
//! - `POST /v1/admin/runs/{id}/cancellation` with an optional `{"reason"}` (3–500 chars): the
//!   admin cancel (§1.8). 201 and the run, now `canceled`, on a real transition; 200 and the
//!   unchanged run when it was already terminal. The job itself goes on: a success is still
//!   billed (no refund); a held sync request answers 409 `RUN_CANCELLED`.
//! - `GET /v1/runs/statuses`, `GET /v1/auth/me`, `GET /v1/health` (no auth),
//!   `GET /v1/billing/balance` → `{balance_cents, currency: "USD"}`.
//! - `GET /files/{run_id}.mp4?exp=&sig=`: the MP4, HMAC-signed (per-simulator secret) and expiring
//!   after `url_ttl_secs`; `Range` (206, 416), `ETag`, exact `Content-Length`. Expired URLs get
//!   403 S3-style XML `AccessDenied` / `Request has expired`; bad signatures 403 `SignatureDoesNotMatch`.
//!
//! Timestamps are reported with millisecond precision; `duration_ms` is exactly
//! `completed_at - created_at`.
//!
//! # Callbacks
//!
//! A run created with a `callback_url` gets one POST when it becomes terminal (at its simulated
//! end, in real time through `time_scale`, whether or not anyone polls; at once when cancelled):
//! `{"event": "run.completed"|"run.failed"|"run.cancelled", "run_id", "status":
//! "succeeded"|"failed"|"canceled", "output": <the run's output> | {code, message} | null,
//! "duration_ms", "created_at", "completed_at", "metadata"}`, timestamps like
//! `2026-05-06T10:00:00.000+00:00`. Headers: `Content-Type: application/json`,
//! `Runflow-Request-Id: <uuid>` (the same across the retries of one delivery) and, when
//! `callback_secret` is set, `Runflow-Signature: <lowercase hex HMAC-SHA256 of the raw body keyed
//! with the secret string as given>`. Non-2xx, timeouts (5 s) and connection errors are retried
//! after 250 ms, 500 ms and 1 s (four attempts), then given up; redirects are not followed.
//! Faults: `callback_drop` / `[[sim:callback-drop]]` (never sent), `callback_duplicate` /
//! `[[sim:callback-duplicate]]` (sent twice, with distinct request ids), `callback_delay_ms`
//! (real delay before the first attempt). Counters: `GET /__sim/stats` → `callbacks`
//! `{scheduled, delivered, failed, dropped, duplicated, retried}`.
//!
//! Errors use Runflow's envelope `{code, message, errors}`: malformed JSON → 400 `BAD_REQUEST`;
//! validation → 422 `VALIDATION_ERROR` (configurable) with `errors: [{loc: ["input", "duration"], msg}]`.
//!
//! Test-only admin API (no auth): `GET /__sim/runs`, `GET /__sim/charges`, `GET /__sim/stats`,
//! `GET /__sim/config`, `POST /__sim/config` (partial JSON update; `balance_usd` also sets the
//! live balance), `POST /__sim/reset`.
//!
//! # Fault tokens
//!
//! Put `[[sim:NAME]]` or `[[sim:NAME:COUNT]]` in a prompt (or a `multi_prompt` shot), or send
//! `X-Sim-Fault: NAME[:COUNT],...` on a create. The same faults can be injected at random with the
//! config rates (rolled per request).
//!
//! Create faults apply to the first COUNT (default 1) creates carrying the same prompt text, so a
//! correct client recovers on retry:
//! - `429` (Retry-After in seconds), `429-date` (Retry-After as an HTTP-date), `429-none` (no header);
//! - `402` (`INSUFFICIENT_CREDIT`), `409` (`CONFLICT`);
//! - `500` (JSON `INTERNAL_ERROR`), `500-html`, `502` (HTML), `503` (JSON `MODEL_UNAVAILABLE`),
//!   `503-html`, `504` (HTML). None of these create a run;
//! - `504-after-create`: the run is created (and billed when it succeeds), the answer is a 504;
//! - `lost-response`: the run is created (and billed when it succeeds), then the TCP connection is
//!   closed without any HTTP response. On the sync endpoint this happens after the run finished;
//! - `slow-create`: the run is created, the response waits `slow_create_secs`;
//! - `echo-auth`: 400 `INVALID_REQUEST` whose message echoes the request's `Authorization`
//!   header, as a careless provider or proxy may (klingq must scrub it from every error text).
//!
//! Outcome faults decide how the run ends; they apply to every run with that prompt unless COUNT is given:
//! - `moderation`: fails early with `CONTENT_POLICY_VIOLATION` (stage `moderation`), not billed;
//! - `output-moderation`: fails after the full latency with `CONTENT_POLICY_VIOLATION`, not billed;
//! - `provider-timeout`: fails after the full latency with `PROVIDER_TIMEOUT`, not billed;
//! - `stuck`: stays `running` forever;
//! - `no-url`: succeeds (and is billed) with `output: {}`.
//!
//! Callback faults disturb the run's callback; like outcome faults they apply to every run with
//! that prompt unless COUNT is given: `callback-drop` (never sent), `callback-duplicate` (sent twice).
//!
//! Poll faults disturb the first COUNT (default `poll_fault_count` = 2) `GET /v1/runs/{id}` of the run:
//! `poll-5xx` (502 HTML), `poll-reset` (connection closed without response), `poll-404`
//! (404 `RUN_NOT_FOUND`), `flaky-poll` (alternating 503 JSON and reset).
//!
//! Download faults disturb the first COUNT (default `download_fault_count` = 1) downloads of the run:
//! `download-expired` (403 "Request has expired"), `download-404` (404 `NoSuchKey`),
//! `download-5xx` (503 `SlowDown`), `download-reset` (connection aborted mid-body),
//! `download-short` (body ends before `Content-Length`), `download-wrong-type`
//! (`Content-Type: text/html`), `download-not-mp4` (200 with an HTML body), `download-slow`
//! (trickles at `slow_download_bytes_per_sec`).
//!
//! Unknown tokens are rejected with 422 so that typos in tests do not pass silently.
//!
//! # Billing
//!
//! Each run that succeeds is charged `duration × rate_usd_per_second` exactly once, at its computed
//! success time, whether or not anyone polls it (the ledger settles on every read under one lock).
//! Failed runs are never charged. A create whose estimated cost exceeds the live balance gets 402.

mod admin;
mod api;
mod callbacks;
mod config;
mod error;
mod faults;
mod files;
mod latency;
mod server;
mod signing;
mod state;
mod validate;
mod video;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use crate::config::{OutputShape, RetryAfterMode, SimArgs, SimConfig};
pub use crate::error::SimError;
pub use crate::state::{CallbackStats, Charge, RunRecord, Stats};

use crate::callbacks::Callbacks;
use crate::state::Sim;

/// The model the simulator is named after; any other model path behaves the same way.
pub const DEFAULT_MODEL: &str = api::DEFAULT_MODEL;

/// A running simulator; it shuts down when dropped or on [`SimHandle::shutdown`].
#[derive(Debug)]
pub struct SimHandle {
    sim: Arc<Sim>,
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl SimHandle {
    /// The address actually bound.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://host:port` of the bound listener, to use as the client's API base URL.
    pub fn base_url(&self) -> String {
        self.sim.bound_url.clone()
    }

    /// The billing ledger, settled up to now.
    pub fn charges(&self) -> Vec<Charge> {
        self.sim.charges()
    }

    /// Every run with its status, video size and hash, and applied faults (hashes videos on demand).
    pub fn runs(&self) -> Vec<RunRecord> {
        self.sim.run_records()
    }

    /// Request, fault and callback counters.
    pub fn stats(&self) -> Stats {
        self.sim.stats()
    }

    /// The live configuration.
    pub fn config(&self) -> SimConfig {
        self.sim.lock().config.clone()
    }

    /// Replaces the configuration; the live balance is kept (see [`SimHandle::set_balance_usd`]).
    pub fn set_config(&self, config: SimConfig) -> Result<(), SimError> {
        config.validate()?;
        self.sim.lock().config = config;
        Ok(())
    }

    /// Applies a partial JSON update, as `POST /__sim/config` does (including `balance_usd`).
    pub fn update_config(&self, patch: &serde_json::Value) -> Result<SimConfig, SimError> {
        let mut state = self.sim.lock();
        let config = state.config.merged(patch)?;
        if let Some(balance) = patch.get("balance_usd").and_then(serde_json::Value::as_f64) {
            state.set_balance_usd(balance);
        }
        state.config = config.clone();
        Ok(config)
    }

    /// Sets the live balance.
    pub fn set_balance_usd(&self, usd: f64) {
        self.sim.lock().set_balance_usd(usd);
    }

    /// The live balance after settling finished runs.
    pub fn balance_usd(&self) -> f64 {
        let mut state = self.sim.lock();
        state.settle(std::time::Instant::now());
        state.balance_micros() as f64 / 1_000_000.0
    }

    /// Forgets all runs, charges and counters and restores the configured balance.
    pub fn reset(&self) {
        self.sim.lock().reset();
    }

    /// Stops accepting, gives open connections a short grace, and waits for the server to end.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Starts a simulator on an already bound listener (tests pass `127.0.0.1:0`).
pub async fn start(config: SimConfig, listener: TcpListener) -> Result<SimHandle, SimError> {
    config.validate()?;
    let addr = listener.local_addr()?;
    let bound_url = format!("http://{addr}");
    let shutdown = CancellationToken::new();
    let callbacks = Callbacks::new(shutdown.child_token())
        .map_err(|error| SimError::Io(std::io::Error::other(error.without_url())))?;
    let sim = Arc::new(Sim::new(config, bound_url, callbacks));
    let router = server::router(Arc::clone(&sim));
    let task = tokio::spawn(server::serve(listener, router, shutdown.clone()));
    Ok(SimHandle {
        sim,
        addr,
        shutdown,
        task: Some(task),
    })
}

/// Starts a simulator on a free port of 127.0.0.1.
pub async fn start_local(config: SimConfig) -> Result<SimHandle, SimError> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    start(config, listener).await
}

/// Binds `args.host:args.port`, serves until `shutdown` completes, then stops (the `klingq sim` entry point).
pub async fn run(
    args: SimArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind((args.host.as_str(), args.port))
        .await
        .map_err(|error| {
            anyhow::anyhow!(
                "cannot bind simulator to {}:{}: {error}",
                args.host,
                args.port
            )
        })?;
    let handle = start(args.config, listener).await?;
    tracing::info!(url = %handle.base_url(), "sim listening");
    shutdown.await;
    tracing::info!("sim shutting down");
    handle.shutdown().await;
    Ok(())
}
