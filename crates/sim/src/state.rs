//! In-memory state: runs with lazily computed status, the billing ledger, counters and fault bookkeeping.
//!
//! A run's status is computed from its creation instant on every read; only a cancellation is
//! stored. Callbacks are the one thing that cannot wait for a read: `callbacks.rs` runs a timer
//! per run that fires at the computed terminal instant.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::callbacks::Callbacks;
use crate::config::{RetryAfterMode, SimConfig};
use crate::error::{ApiError, html_error};
use crate::faults::{FaultKind, FaultScope, FaultToken};
use crate::latency::{self, PhasePlan};
use crate::signing::UrlSigner;
use crate::validate::InputSummary;
use crate::video::VideoLayout;

/// One charge in the billing ledger (`GET /__sim/charges`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Charge {
    /// The run that was billed; a run is billed at most once.
    pub run_id: Uuid,
    /// The `client_ref` given at creation, if any.
    pub client_ref: Option<String>,
    /// `metadata.job_id` given at creation, if any, so tests can count charges per job.
    pub job_id: Option<String>,
    /// Amount in US dollars.
    pub usd: f64,
    /// Amount in millionths of a dollar, exact for assertions.
    pub usd_micros: u64,
    /// Billed seconds of video.
    pub duration_secs: u32,
    /// When the run succeeded (the charge time), whether or not anyone was watching.
    #[serde(with = "time::serde::rfc3339")]
    pub charged_at: OffsetDateTime,
}

/// A run as the test-only admin API shows it (`GET /__sim/runs`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// The run id (UUIDv7), as returned by the create call.
    pub id: Uuid,
    /// The model path from the request URL.
    pub model: String,
    /// `api` for `POST /v1/models/.../runs`, `sync` for `POST /v1/run/...`.
    pub source: String,
    /// The `client_ref` given at creation, the key for reconciliation.
    pub client_ref: Option<String>,
    /// The `metadata` object given at creation.
    pub metadata: Option<Value>,
    /// The `status_code` at the time of the read.
    pub status: String,
    /// Seconds of video requested, which is also what a success is billed for.
    pub duration_secs: u32,
    /// Whether audio was requested; it makes generation 1.3 times slower.
    pub generate_audio: bool,
    /// When the run was created.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When the run became terminal (for a cancelled run, when it was cancelled); `None` while
    /// it is not.
    #[serde(with = "time::serde::rfc3339::option")]
    pub completed_at: Option<OffsetDateTime>,
    /// Simulated seconds spent queued and dispatching.
    pub queued_secs: f64,
    /// Simulated seconds of generation (before `time_scale`).
    pub running_secs: f64,
    /// Size of the run's video in bytes (served only once the run succeeded with a URL).
    pub video_size: u64,
    /// Hex SHA-256 of the run's video; present once the run succeeded with a URL.
    pub video_sha256: Option<String>,
    /// Names of the faults applied on behalf of this run (create, outcome, poll and download).
    pub faults: Vec<String>,
    /// Whether the ledger holds the charge of this run.
    pub charged: bool,
    /// `GET /v1/runs/{id}` requests for this run, including faulted ones.
    pub polls: u64,
    /// Download requests for this run's video that passed the signature check.
    pub downloads: u64,
    /// The `callback_url` given at creation, if any.
    #[serde(default)]
    pub callback_url: Option<String>,
    /// Callback deliveries of this run answered with a 2xx (2 when duplicated and both landed).
    #[serde(default)]
    pub callbacks_delivered: u64,
}

/// Request counters per endpoint, so client tests can assert exact numbers of provider calls.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// `POST /v1/models/{model}/runs` requests, whatever their outcome.
    pub creates: u64,
    /// `POST /v1/run/{model}` requests, whatever their outcome.
    pub sync_calls: u64,
    /// `GET /v1/runs/{id}` requests.
    pub polls: u64,
    /// `GET /v1/runs` requests.
    pub lists: u64,
    /// `GET /files/...` requests.
    pub downloads: u64,
    /// `GET /v1/billing/balance` requests.
    pub balance_reads: u64,
    /// `GET /v1/health` requests.
    pub health_checks: u64,
    /// Runs that exist (created by either API).
    pub runs_created: u64,
    /// Entries in the ledger.
    pub charges: u64,
    /// How many times each fault (by token name) was applied.
    pub faults_injected: BTreeMap<String, u64>,
    /// `POST /v1/admin/runs/{id}/cancellation` requests, whatever their outcome.
    #[serde(default)]
    pub cancellations: u64,
    /// Per-run callback deliveries.
    #[serde(default)]
    pub callbacks: CallbackStats,
}

/// Counters of per-run callbacks (`GET /__sim/stats` → `callbacks`).
///
/// Once every callback has settled: `delivered + failed == scheduled - dropped + duplicated`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CallbackStats {
    /// Callbacks that fell due: one per run with a `callback_url` that became terminal.
    pub scheduled: u64,
    /// Deliveries answered with a 2xx (a duplicated callback counts twice).
    pub delivered: u64,
    /// Deliveries given up after the last attempt (non-2xx, timeout or connection error).
    pub failed: u64,
    /// Callbacks never sent because of the `callback-drop` fault.
    pub dropped: u64,
    /// Callbacks sent twice because of the `callback-duplicate` fault.
    pub duplicated: u64,
    /// Attempts after the first of a delivery (each retry counts once).
    pub retried: u64,
}

/// Which API created a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RunSource {
    Api,
    Sync,
}

/// How a run ends, decided at creation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Succeed,
    NoUrl,
    Moderation,
    OutputModeration,
    ProviderTimeout,
    Stuck,
}

/// The lifecycle position of a run at some instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Status {
    Queued,
    Dispatching,
    Running,
    Succeeded,
    Failed,
    Canceled,
}

impl Status {
    pub(crate) fn code(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Dispatching => "dispatching",
            Status::Running => "running",
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::Canceled => "canceled",
        }
    }

    pub(crate) fn is_terminal(self) -> bool {
        matches!(self, Status::Succeeded | Status::Failed | Status::Canceled)
    }
}

/// One simulated run.
#[derive(Debug)]
pub(crate) struct Run {
    pub(crate) id: Uuid,
    pub(crate) model: String,
    pub(crate) source: RunSource,
    pub(crate) input: Value,
    pub(crate) client_ref: Option<String>,
    pub(crate) metadata: Option<Value>,
    pub(crate) callback_url: Option<String>,
    pub(crate) request_id: String,
    pub(crate) created_at: OffsetDateTime,
    created_instant: Instant,
    pub(crate) duration_secs: u32,
    pub(crate) generate_audio: bool,
    plan: PhasePlan,
    time_scale: f64,
    pub(crate) outcome: Outcome,
    rate_micros_per_sec: u64,
    pub(crate) video: Arc<VideoLayout>,
    video_sha256: Option<String>,
    poll_faults: Vec<(FaultKind, u32)>,
    download_faults: Vec<(FaultKind, u32)>,
    faults: Vec<String>,
    charged: bool,
    polls: u64,
    downloads: u64,
    /// Real offset from creation at which the run was cancelled, if it was.
    cancelled_offset: Option<Duration>,
    /// A `callback-drop` or `callback-duplicate` token that applies to this run's callback.
    pub(crate) callback_fault: Option<FaultKind>,
    /// Whether the callback fell due already (it is sent at most once, duplicates aside).
    pub(crate) callback_fired: bool,
    /// Cancelled when the run ends early (cancellation) or is forgotten (reset), to wake whoever
    /// waits for its end: the callback timer and a held sync request.
    pub(crate) wake: CancellationToken,
    callbacks_delivered: u64,
}

/// Truncates to whole milliseconds, the precision of every timestamp the simulator reports.
fn whole_millis(duration: Duration) -> Duration {
    Duration::from_millis(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX))
}

impl Run {
    /// Real offset from creation at which the run starts running.
    pub(crate) fn running_offset(&self) -> Duration {
        latency::real(
            self.plan.queued_secs + self.plan.dispatching_secs,
            self.time_scale,
        )
    }

    /// Real offset from creation at which the run becomes terminal; `None` when stuck.
    pub(crate) fn terminal_offset(&self) -> Option<Duration> {
        let before_running = self.plan.queued_secs + self.plan.dispatching_secs;
        let simulated = match self.outcome {
            Outcome::Stuck => return None,
            Outcome::Moderation => before_running + self.plan.running_secs.min(5.0),
            _ => self.plan.total_secs(),
        };
        Some(latency::real(simulated, self.time_scale))
    }

    /// The instant the run becomes terminal, for the sync endpoint's wait.
    pub(crate) fn terminal_instant(&self) -> Option<Instant> {
        self.terminal_offset()
            .map(|offset| self.created_instant + offset)
    }

    /// The status an API read at `now` reports: the job's, unless the run was cancelled by then.
    pub(crate) fn status_at(&self, now: Instant) -> Status {
        match self.cancelled_offset {
            Some(cancelled) if now.saturating_duration_since(self.created_instant) >= cancelled => {
                Status::Canceled
            }
            _ => self.job_status_at(now),
        }
    }

    /// The status of the underlying job, which a cancellation does not stop: billing follows it.
    pub(crate) fn job_status_at(&self, now: Instant) -> Status {
        let elapsed = now.saturating_duration_since(self.created_instant);
        if let Some(terminal) = self.terminal_offset()
            && elapsed >= terminal
        {
            return match self.outcome {
                Outcome::Succeed | Outcome::NoUrl => Status::Succeeded,
                _ => Status::Failed,
            };
        }
        if elapsed >= self.running_offset() {
            Status::Running
        } else if elapsed >= latency::real(self.plan.queued_secs, self.time_scale) {
            Status::Dispatching
        } else {
            Status::Queued
        }
    }

    /// Offset from `created_at` to the reported `completed_at`, in whole milliseconds: the
    /// cancellation if there was one, else the job's end; `None` for a stuck, uncancelled run.
    pub(crate) fn end_offset(&self) -> Option<Duration> {
        self.cancelled_offset
            .or_else(|| self.terminal_offset())
            .map(whole_millis)
    }

    /// Offset from `created_at` to the reported `started_at`, in whole milliseconds.
    pub(crate) fn start_offset(&self) -> Duration {
        whole_millis(self.running_offset())
    }

    /// Whether the run was running before it was cancelled (so it reports a `started_at`).
    pub(crate) fn started_before_cancel(&self) -> bool {
        self.cancelled_offset
            .is_some_and(|cancelled| cancelled >= self.running_offset())
    }

    /// `completed_at` as reported at `now`: `None` while the run is not terminal.
    pub(crate) fn completed_at(&self, now: Instant) -> Option<OffsetDateTime> {
        if !self.status_at(now).is_terminal() {
            return None;
        }
        self.end_offset().map(|offset| self.created_at + offset)
    }

    /// The real instant at which the callback timer should look at the run again: the
    /// cancellation or the job's end; `None` when neither is ever due (stuck and uncancelled).
    pub(crate) fn callback_instant(&self) -> Option<Instant> {
        self.cancelled_offset
            .or_else(|| self.terminal_offset())
            .map(|offset| self.created_instant + offset)
    }

    pub(crate) fn cost_micros(&self) -> u64 {
        self.rate_micros_per_sec
            .saturating_mul(u64::from(self.duration_secs))
    }

    pub(crate) fn rate_micros_per_sec(&self) -> u64 {
        self.rate_micros_per_sec
    }

    /// Whether a succeeded run carries a downloadable video.
    pub(crate) fn has_video(&self) -> bool {
        self.outcome == Outcome::Succeed
    }

    fn note_fault(&mut self, kind: &str) {
        if !self.faults.iter().any(|name| name == kind) {
            self.faults.push(kind.to_owned());
        }
    }
}

/// The input of a create, after validation.
#[derive(Debug)]
pub(crate) struct CreateRequest {
    pub(crate) model: String,
    pub(crate) source: RunSource,
    pub(crate) input: Value,
    pub(crate) summary: InputSummary,
    pub(crate) client_ref: Option<String>,
    pub(crate) metadata: Option<Value>,
    pub(crate) callback_url: Option<String>,
    pub(crate) tokens: Vec<FaultToken>,
}

/// What the create handler does after the run exists.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum AfterCreate {
    /// Answer normally.
    Respond,
    /// Drop the connection without answering.
    Lost,
    /// Answer after this real delay.
    Slow(Duration),
    /// Answer 504 from the "gateway", although the run exists.
    GatewayTimeout,
}

/// The decision on a create request.
#[derive(Debug)]
pub(crate) enum Admission {
    Rejected(Response),
    Created { run_id: Uuid, after: AfterCreate },
}

/// A fault to apply to one `GET /v1/runs/{id}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PollFault {
    ServerError(StatusCode, bool),
    Reset,
    NotFound,
}

/// Everything the state knows; guarded by one mutex that is never held across an await.
#[derive(Debug)]
pub(crate) struct State {
    pub(crate) config: SimConfig,
    runs: HashMap<Uuid, Run>,
    order: Vec<Uuid>,
    unsettled: Vec<Uuid>,
    charges: Vec<Charge>,
    balance_micros: i64,
    pub(crate) stats: Stats,
    token_hits: HashMap<(FaultKind, u64), u32>,
}

/// The current UTC time truncated to whole milliseconds, the precision the API reports.
fn now_utc_millis() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(now.nanosecond() / 1_000_000 * 1_000_000)
        .unwrap_or(now)
}

fn usd_to_micros(usd: f64) -> i64 {
    (usd * 1_000_000.0).round() as i64
}

/// Formats an amount like Runflow's `cost` string: at least two decimals, `"0.70"`, `"0.336"`.
pub(crate) fn format_usd(micros: u64) -> String {
    let fraction = format!("{:06}", micros % 1_000_000);
    let trimmed = fraction.trim_end_matches('0');
    let decimals = if trimmed.len() < 2 {
        &fraction[..2]
    } else {
        trimmed
    };
    format!("{}.{decimals}", micros / 1_000_000)
}

fn retry_after_value(
    mode: RetryAfterMode,
    seconds: u64,
    rng: &mut impl Rng,
) -> Option<HeaderValue> {
    let mode = match mode {
        RetryAfterMode::Mixed => match rng.random_range(0..3) {
            0 => RetryAfterMode::Seconds,
            1 => RetryAfterMode::HttpDate,
            _ => RetryAfterMode::None,
        },
        other => other,
    };
    match mode {
        RetryAfterMode::Seconds => HeaderValue::from_str(&seconds.to_string()).ok(),
        RetryAfterMode::HttpDate => {
            // A date has one-second resolution, so round up to not shorten the wait.
            let at = std::time::SystemTime::now() + Duration::from_secs(seconds + 1);
            HeaderValue::from_str(&httpdate::fmt_http_date(at)).ok()
        }
        RetryAfterMode::None | RetryAfterMode::Mixed => None,
    }
}

fn rate_limited(message: &str, retry_after: Option<HeaderValue>) -> Response {
    let error = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "RATE_LIMITED",
        format!("Rate limit exceeded: {message}"),
    );
    match retry_after {
        Some(value) => error
            .with_header(header::RETRY_AFTER, value)
            .into_response(),
        None => error.into_response(),
    }
}

fn insufficient_credit() -> Response {
    ApiError::new(
        StatusCode::PAYMENT_REQUIRED,
        "INSUFFICIENT_CREDIT",
        "Insufficient credit to start this run. Top up your balance.",
    )
    .into_response()
}

/// The response of a create-time rejection fault.
fn rejection(kind: FaultKind, config: &SimConfig, rng: &mut impl Rng) -> Response {
    let seconds = config.retry_after_secs;
    match kind {
        FaultKind::RateLimited => rate_limited(
            "too many requests",
            retry_after_value(RetryAfterMode::Seconds, seconds, rng),
        ),
        FaultKind::RateLimitedDate => rate_limited(
            "too many requests",
            retry_after_value(RetryAfterMode::HttpDate, seconds, rng),
        ),
        FaultKind::RateLimitedBare => rate_limited("too many requests", None),
        FaultKind::InsufficientCredit => insufficient_credit(),
        FaultKind::Conflict => ApiError::new(
            StatusCode::CONFLICT,
            "CONFLICT",
            "A conflicting request is in progress. Refetch and retry.",
        )
        .into_response(),
        FaultKind::ServerError => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "INTERNAL_ERROR",
            "An internal error occurred.",
        )
        .into_response(),
        FaultKind::Unavailable => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "MODEL_UNAVAILABLE",
            "The model is temporarily unavailable. Retry or pick a sibling model.",
        )
        .into_response(),
        FaultKind::ServerErrorHtml => html_error(StatusCode::INTERNAL_SERVER_ERROR),
        FaultKind::BadGateway => html_error(StatusCode::BAD_GATEWAY),
        FaultKind::UnavailableHtml => html_error(StatusCode::SERVICE_UNAVAILABLE),
        _ => html_error(StatusCode::GATEWAY_TIMEOUT),
    }
}

const CONFIG_5XX: [FaultKind; 6] = [
    FaultKind::ServerError,
    FaultKind::ServerErrorHtml,
    FaultKind::BadGateway,
    FaultKind::Unavailable,
    FaultKind::UnavailableHtml,
    FaultKind::GatewayTimeout,
];

fn prompt_key(prompts: &[String]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    prompts.hash(&mut hasher);
    hasher.finish()
}

impl State {
    pub(crate) fn new(config: SimConfig) -> Self {
        let balance_micros = usd_to_micros(config.balance_usd);
        Self {
            config,
            runs: HashMap::new(),
            order: Vec::new(),
            unsettled: Vec::new(),
            charges: Vec::new(),
            balance_micros,
            stats: Stats::default(),
            token_hits: HashMap::new(),
        }
    }

    /// Forgets every run, charge and counter, and restores the configured balance.
    pub(crate) fn reset(&mut self) {
        // Wake the callback timers so they find their run gone and end.
        for run in self.runs.values() {
            run.wake.cancel();
        }
        *self = Self::new(self.config.clone());
    }

    pub(crate) fn set_balance_usd(&mut self, usd: f64) {
        self.balance_micros = usd_to_micros(usd);
    }

    pub(crate) fn balance_micros(&self) -> i64 {
        self.balance_micros
    }

    fn count_fault(&mut self, kind: &str) {
        *self
            .stats
            .faults_injected
            .entry(kind.to_owned())
            .or_default() += 1;
    }

    /// Whether a counted token still applies to this prompt; consumes one use when it does.
    fn consume(&mut self, token: FaultToken, key: u64, default_count: Option<u32>) -> bool {
        let limit = token.count.or(default_count);
        let hits = self.token_hits.entry((token.kind, key)).or_default();
        match limit {
            Some(limit) if *hits >= limit => false,
            _ => {
                *hits = hits.saturating_add(1);
                true
            }
        }
    }

    /// Charges every run that has succeeded by `now` and is not yet charged, exactly once.
    pub(crate) fn settle(&mut self, now: Instant) {
        let pending = std::mem::take(&mut self.unsettled);
        for run_id in pending {
            let Some(run) = self.runs.get_mut(&run_id) else {
                continue;
            };
            // A cancellation does not stop the job, and billing follows the job (§1.8).
            if run.job_status_at(now) != Status::Succeeded {
                self.unsettled.push(run_id);
                continue;
            }
            if run.charged {
                continue;
            }
            run.charged = true;
            let usd_micros = run.cost_micros();
            let charged_at =
                run.created_at + whole_millis(run.terminal_offset().unwrap_or_default());
            let job_id = run
                .metadata
                .as_ref()
                .and_then(|metadata| match metadata.get("job_id") {
                    Some(Value::String(job_id)) => Some(job_id.clone()),
                    Some(Value::Number(job_id)) => Some(job_id.to_string()),
                    _ => None,
                });
            let charge = Charge {
                run_id,
                client_ref: run.client_ref.clone(),
                job_id,
                usd: usd_micros as f64 / 1_000_000.0,
                usd_micros,
                duration_secs: run.duration_secs,
                charged_at,
            };
            self.balance_micros -= i64::try_from(usd_micros).unwrap_or(i64::MAX);
            self.charges.push(charge);
            self.stats.charges += 1;
        }
    }

    /// Applies faults, limits and balance to a create request, and creates the run if admitted.
    pub(crate) fn admit(&mut self, request: CreateRequest, now: Instant) -> Admission {
        let mut rng = rand::rng();
        let key = prompt_key(&request.summary.prompts);
        let config = self.config.clone();

        let mut create_fault = None;
        for token in request
            .tokens
            .iter()
            .filter(|token| token.kind.scope() == FaultScope::Create)
        {
            if self.consume(*token, key, Some(1)) {
                create_fault = Some(token.kind);
                break;
            }
        }
        let mut rate_limit_from_config = false;
        if create_fault.is_none() {
            create_fault = if rng.random_bool(config.fail_429) {
                rate_limit_from_config = true;
                Some(FaultKind::RateLimited)
            } else if rng.random_bool(config.fail_402) {
                Some(FaultKind::InsufficientCredit)
            } else if rng.random_bool(config.fail_409) {
                Some(FaultKind::Conflict)
            } else if rng.random_bool(config.fail_5xx) {
                Some(CONFIG_5XX[rng.random_range(0..CONFIG_5XX.len())])
            } else if rng.random_bool(config.lost_response) {
                Some(FaultKind::LostResponse)
            } else if rng.random_bool(config.slow_create) {
                Some(FaultKind::SlowCreate)
            } else {
                None
            };
        }

        let after = match create_fault {
            Some(FaultKind::LostResponse) => AfterCreate::Lost,
            Some(FaultKind::SlowCreate) => {
                AfterCreate::Slow(Duration::from_secs_f64(config.slow_create_secs))
            }
            Some(FaultKind::GatewayTimeoutAfterCreate) => AfterCreate::GatewayTimeout,
            Some(kind) => {
                self.count_fault(kind.name());
                let response = if rate_limit_from_config {
                    rate_limited(
                        "too many requests",
                        retry_after_value(config.retry_after, config.retry_after_secs, &mut rng),
                    )
                } else {
                    rejection(kind, &config, &mut rng)
                };
                return Admission::Rejected(response);
            }
            None => AfterCreate::Respond,
        };

        if let Some(limit) = config.max_concurrent_runs {
            let active = self
                .runs
                .values()
                .filter(|run| !run.status_at(now).is_terminal())
                .count();
            if active >= usize::try_from(limit).unwrap_or(usize::MAX) {
                self.count_fault("concurrency-limit");
                return Admission::Rejected(rate_limited(
                    &format!("concurrency limit of {limit} running runs reached"),
                    retry_after_value(config.retry_after, config.retry_after_secs, &mut rng),
                ));
            }
        }

        self.settle(now);
        let rate_micros_per_sec =
            u64::try_from(usd_to_micros(config.rate_usd_per_second)).unwrap_or(0);
        let estimate = rate_micros_per_sec.saturating_mul(u64::from(request.summary.duration_secs));
        if self.balance_micros < i64::try_from(estimate).unwrap_or(i64::MAX) {
            self.count_fault("insufficient-balance");
            return Admission::Rejected(insufficient_credit());
        }

        let mut outcome_token = None;
        let mut callback_fault = None;
        let mut poll_faults = Vec::new();
        let mut download_faults = Vec::new();
        for token in &request.tokens {
            match token.kind.scope() {
                FaultScope::Outcome
                    if outcome_token.is_none() && self.consume(*token, key, None) =>
                {
                    outcome_token = Some(token.kind);
                }
                FaultScope::Callback
                    if callback_fault.is_none() && self.consume(*token, key, None) =>
                {
                    callback_fault = Some(token.kind);
                }
                FaultScope::Poll => {
                    poll_faults.push((token.kind, token.count.unwrap_or(config.poll_fault_count)));
                }
                FaultScope::Download => download_faults.push((
                    token.kind,
                    token.count.unwrap_or(config.download_fault_count),
                )),
                _ => {}
            }
        }
        let outcome = match outcome_token {
            Some(FaultKind::Moderation) => Outcome::Moderation,
            Some(FaultKind::OutputModeration) => Outcome::OutputModeration,
            Some(FaultKind::ProviderTimeout) => Outcome::ProviderTimeout,
            Some(FaultKind::Stuck) => Outcome::Stuck,
            Some(FaultKind::NoUrl) => Outcome::NoUrl,
            _ if rng.random_bool(config.moderation) => Outcome::Moderation,
            _ if rng.random_bool(config.output_moderation) => Outcome::OutputModeration,
            _ if rng.random_bool(config.provider_timeout) => Outcome::ProviderTimeout,
            _ if rng.random_bool(config.stuck) => Outcome::Stuck,
            _ if rng.random_bool(config.no_url) => Outcome::NoUrl,
            _ => Outcome::Succeed,
        };

        let run_id = Uuid::now_v7();
        let summary = &request.summary;
        let plan = latency::plan(
            &config,
            summary.duration_secs,
            summary.generate_audio,
            &mut rng,
        );
        let mut run = Run {
            id: run_id,
            model: request.model,
            source: request.source,
            input: request.input,
            client_ref: request.client_ref,
            metadata: request.metadata,
            callback_url: request.callback_url,
            request_id: format!("req_{}", Uuid::now_v7().simple()),
            created_at: now_utc_millis(),
            created_instant: now,
            duration_secs: summary.duration_secs,
            generate_audio: summary.generate_audio,
            plan,
            time_scale: config.time_scale,
            outcome,
            rate_micros_per_sec,
            video: Arc::new(VideoLayout::new(
                run_id,
                summary.duration_secs,
                config.video_bytes_per_second,
            )),
            video_sha256: None,
            poll_faults,
            download_faults,
            faults: Vec::new(),
            charged: false,
            polls: 0,
            downloads: 0,
            cancelled_offset: None,
            callback_fault,
            callback_fired: false,
            wake: CancellationToken::new(),
            callbacks_delivered: 0,
        };
        let outcome_name = match outcome {
            Outcome::Succeed => None,
            Outcome::NoUrl => Some(FaultKind::NoUrl),
            Outcome::Moderation => Some(FaultKind::Moderation),
            Outcome::OutputModeration => Some(FaultKind::OutputModeration),
            Outcome::ProviderTimeout => Some(FaultKind::ProviderTimeout),
            Outcome::Stuck => Some(FaultKind::Stuck),
        };
        for kind in create_fault.into_iter().chain(outcome_name) {
            run.note_fault(kind.name());
            self.count_fault(kind.name());
        }
        if matches!(outcome, Outcome::Succeed | Outcome::NoUrl) {
            self.unsettled.push(run_id);
        }
        self.runs.insert(run_id, run);
        self.order.push(run_id);
        self.stats.runs_created += 1;
        Admission::Created { run_id, after }
    }

    pub(crate) fn run(&self, run_id: Uuid) -> Option<&Run> {
        self.runs.get(&run_id)
    }

    pub(crate) fn run_mut(&mut self, run_id: Uuid) -> Option<&mut Run> {
        self.runs.get_mut(&run_id)
    }

    /// Cancels a run that is not terminal yet (the admin cancellation): `None` when the run
    /// does not exist, `Some(false)` when it was already terminal and nothing changed.
    /// The job itself goes on (and is billed if it succeeds); the callback timer is woken.
    pub(crate) fn cancel(&mut self, run_id: Uuid, now: Instant) -> Option<bool> {
        let run = self.runs.get_mut(&run_id)?;
        if run.status_at(now).is_terminal() {
            return Some(false);
        }
        run.cancelled_offset = Some(now.saturating_duration_since(run.created_instant));
        run.wake.cancel();
        Some(true)
    }

    /// Updates the callback counters, unless the run was forgotten by a reset meanwhile.
    pub(crate) fn count_callback(&mut self, run_id: Uuid, update: impl FnOnce(&mut CallbackStats)) {
        if self.runs.contains_key(&run_id) {
            update(&mut self.stats.callbacks);
        }
    }

    /// Counts a callback delivery answered with a 2xx, if the run still exists (not reset).
    pub(crate) fn note_callback_delivered(&mut self, run_id: Uuid) {
        if let Some(run) = self.runs.get_mut(&run_id) {
            run.callbacks_delivered += 1;
            self.stats.callbacks.delivered += 1;
        }
    }

    /// Applies a callback fault to a run's record and the fault counters.
    pub(crate) fn note_callback_fault(&mut self, run_id: Uuid, kind: FaultKind) {
        if let Some(run) = self.runs.get_mut(&run_id) {
            run.note_fault(kind.name());
        }
        self.count_fault(kind.name());
    }

    /// Runs in creation order.
    pub(crate) fn runs_in_order(&self) -> impl DoubleEndedIterator<Item = &Run> {
        self.order.iter().filter_map(|run_id| self.runs.get(run_id))
    }

    pub(crate) fn charges(&self) -> &[Charge] {
        &self.charges
    }

    /// Counts a poll of a run and decides whether it is disturbed.
    pub(crate) fn poll_fault(&mut self, run_id: Uuid, now: Instant) -> Option<PollFault> {
        let config = self.config.clone();
        let mut rng = rand::rng();
        let run = self.runs.get_mut(&run_id)?;
        run.polls += 1;
        let polls = run.polls;
        let from_token = run
            .poll_faults
            .iter_mut()
            .find(|(_, remaining)| *remaining > 0)
            .map(|(kind, remaining)| {
                *remaining -= 1;
                *kind
            });
        let fault = match from_token {
            Some(FaultKind::FlakyPoll) if polls % 2 == 1 => Some((
                FaultKind::FlakyPoll,
                PollFault::ServerError(StatusCode::SERVICE_UNAVAILABLE, false),
            )),
            Some(FaultKind::FlakyPoll) => Some((FaultKind::FlakyPoll, PollFault::Reset)),
            Some(FaultKind::Poll5xx) => Some((
                FaultKind::Poll5xx,
                PollFault::ServerError(StatusCode::BAD_GATEWAY, true),
            )),
            Some(FaultKind::PollReset) => Some((FaultKind::PollReset, PollFault::Reset)),
            Some(FaultKind::Poll404) => Some((FaultKind::Poll404, PollFault::NotFound)),
            _ => {
                let just_created =
                    matches!(run.status_at(now), Status::Queued | Status::Dispatching);
                if just_created && rng.random_bool(config.poll_not_found) {
                    Some((FaultKind::Poll404, PollFault::NotFound))
                } else if rng.random_bool(config.flaky_poll) {
                    if rng.random_bool(0.5) {
                        let status = [
                            StatusCode::INTERNAL_SERVER_ERROR,
                            StatusCode::BAD_GATEWAY,
                            StatusCode::SERVICE_UNAVAILABLE,
                        ][rng.random_range(0..3)];
                        Some((
                            FaultKind::FlakyPoll,
                            PollFault::ServerError(status, rng.random_bool(0.5)),
                        ))
                    } else {
                        Some((FaultKind::FlakyPoll, PollFault::Reset))
                    }
                } else {
                    None
                }
            }
        };
        let (kind, fault) = fault?;
        run.note_fault(kind.name());
        self.count_fault(kind.name());
        Some(fault)
    }

    /// Counts a download of a run's video and decides whether it is disturbed.
    pub(crate) fn download_fault(&mut self, run_id: Uuid) -> Option<FaultKind> {
        let config = self.config.clone();
        let mut rng = rand::rng();
        let run = self.runs.get_mut(&run_id)?;
        run.downloads += 1;
        let from_token = run
            .download_faults
            .iter_mut()
            .find(|(_, remaining)| *remaining > 0)
            .map(|(kind, remaining)| {
                *remaining -= 1;
                *kind
            });
        let fault = from_token.or_else(|| {
            [
                (config.download_expired, FaultKind::DownloadExpired),
                (config.download_5xx, FaultKind::Download5xx),
                (config.download_reset, FaultKind::DownloadReset),
                (config.download_short, FaultKind::DownloadShort),
                (config.download_wrong_type, FaultKind::DownloadWrongType),
                (config.download_not_mp4, FaultKind::DownloadNotMp4),
            ]
            .into_iter()
            .find(|(rate, _)| rng.random_bool(*rate))
            .map(|(_, kind)| kind)
        })?;
        run.note_fault(fault.name());
        self.count_fault(fault.name());
        Some(fault)
    }

    /// The admin view of every run; `video_sha256` is filled from the cache.
    pub(crate) fn records(&self, now: Instant) -> Vec<RunRecord> {
        self.runs_in_order()
            .map(|run| {
                let status = run.status_at(now);
                let served = status == Status::Succeeded && run.has_video();
                RunRecord {
                    id: run.id,
                    model: run.model.clone(),
                    source: match run.source {
                        RunSource::Api => "api",
                        RunSource::Sync => "sync",
                    }
                    .to_owned(),
                    client_ref: run.client_ref.clone(),
                    metadata: run.metadata.clone(),
                    status: status.code().to_owned(),
                    duration_secs: run.duration_secs,
                    generate_audio: run.generate_audio,
                    created_at: run.created_at,
                    completed_at: run.completed_at(now),
                    queued_secs: run.plan.queued_secs + run.plan.dispatching_secs,
                    running_secs: run.plan.running_secs,
                    video_size: run.video.size(),
                    video_sha256: if served {
                        run.video_sha256.clone()
                    } else {
                        None
                    },
                    faults: run.faults.clone(),
                    charged: run.charged,
                    polls: run.polls,
                    downloads: run.downloads,
                    callback_url: run.callback_url.clone(),
                    callbacks_delivered: run.callbacks_delivered,
                }
            })
            .collect()
    }

    /// Videos whose hash is needed but not cached yet.
    pub(crate) fn missing_hashes(&self, now: Instant) -> Vec<(Uuid, Arc<VideoLayout>)> {
        self.runs
            .values()
            .filter(|run| {
                run.video_sha256.is_none()
                    && run.has_video()
                    && run.status_at(now) == Status::Succeeded
            })
            .map(|run| (run.id, Arc::clone(&run.video)))
            .collect()
    }

    pub(crate) fn store_hash(&mut self, run_id: Uuid, sha256_hex: String) {
        if let Some(run) = self.runs.get_mut(&run_id) {
            run.video_sha256 = Some(sha256_hex);
        }
    }
}

/// The shared simulator: state plus the immutable parts every handler needs.
#[derive(Debug)]
pub(crate) struct Sim {
    state: Mutex<State>,
    pub(crate) signer: UrlSigner,
    /// `http://host:port` of the bound listener, used unless `public_url` is configured.
    pub(crate) bound_url: String,
    /// The HTTP client and shutdown signal of callback deliveries.
    pub(crate) callbacks: Callbacks,
}

impl Sim {
    pub(crate) fn new(config: SimConfig, bound_url: String, callbacks: Callbacks) -> Self {
        Self {
            state: Mutex::new(State::new(config)),
            signer: UrlSigner::random(),
            bound_url,
            callbacks,
        }
    }

    /// Locks the state; a poisoned lock is recovered because every update is self-contained.
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The base URL written into signed download URLs.
    pub(crate) fn public_base(&self, state: &State) -> String {
        state
            .config
            .public_url
            .as_deref()
            .map(|url| url.trim_end_matches('/').to_owned())
            .unwrap_or_else(|| self.bound_url.clone())
    }

    /// The admin view of every run, hashing any video not hashed yet (outside the lock).
    pub(crate) fn run_records(&self) -> Vec<RunRecord> {
        let missing = {
            let mut state = self.lock();
            state.settle(Instant::now());
            state.missing_hashes(Instant::now())
        };
        let hashed: Vec<_> = missing
            .into_iter()
            .map(|(run_id, video)| (run_id, video.sha256_hex()))
            .collect();
        let mut state = self.lock();
        for (run_id, sha256_hex) in hashed {
            state.store_hash(run_id, sha256_hex);
        }
        let now = Instant::now();
        state.settle(now);
        state.records(now)
    }

    pub(crate) fn charges(&self) -> Vec<Charge> {
        let mut state = self.lock();
        state.settle(Instant::now());
        state.charges().to_vec()
    }

    pub(crate) fn stats(&self) -> Stats {
        let mut state = self.lock();
        state.settle(Instant::now());
        state.stats.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usd_strings_keep_two_decimals_at_least() {
        assert_eq!(format_usd(700_000), "0.70");
        assert_eq!(format_usd(1_400_000), "1.40");
        assert_eq!(format_usd(336_000), "0.336");
        assert_eq!(format_usd(2_000_000), "2.00");
        assert_eq!(format_usd(0), "0.00");
    }
}
