//! `RunflowClient`: the real [`VideoProvider`] over Runflow's HTTP API.
//!
//! One pooled `reqwest::Client` is built once, with the connect timeout and the bearer token as a
//! sensitive default header; each request sets its own overall timeout. Every call is counted in
//! [`ProviderStats`] and logged at debug level without secrets.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use klingq_core::{GenerationRequest, JobId};
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue};
use reqwest::{Method, RequestBuilder};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::time::Instant;
use tracing::Instrument;

use crate::classify::{
    classify_response, classify_run_end, classify_transport, classify_unreadable_success,
};
use crate::config::{Mode, ProviderConfig};
use crate::error::{ErrorClass, ErrorDetail, Operation, ProviderError};
use crate::poll_plan::PollPolicy;
use crate::provider::{ReadLimits, VideoProvider};
use crate::retry::{PollCadence, scaled, with_retries};
use crate::run::{Run, RunStatus, VideoOutput, extract_video, parse_run, parse_run_list};
use crate::stats::{CallOutcome, CallRecord, ProviderStats};

/// How far a run's `created_at` may lie before our send time and still be taken as the answer to
/// that send, for runs that carry no `metadata.attempt` (sync mode): clocks are not exact.
const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(60);

/// Runs listed per reconciliation query by `client_ref`.
const LIST_LIMIT: u32 = 50;

/// Runs listed per query by creation time (Runflow's maximum page).
const WINDOW_LIST_LIMIT: u32 = 500;

/// The Runflow API client. Cheap to share: wrap it in an `Arc`.
pub struct RunflowClient {
    http: reqwest::Client,
    config: ProviderConfig,
    /// `base_url` without a trailing slash.
    base: String,
    stats: Arc<ProviderStats>,
}

impl fmt::Debug for RunflowClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunflowClient")
            .field("base_url", &klingq_core::redact_url(&self.base))
            .field("model", &self.config.model)
            .field("mode", &self.config.mode)
            .finish_non_exhaustive()
    }
}

/// What a sync call or its reconciliation produced.
enum SyncOutcome {
    /// The façade answered 2xx with this body.
    Answered(Value),
    /// The call's outcome was unknown and this run was found by `client_ref`.
    Adopted(Box<Run>),
}

impl RunflowClient {
    /// Builds the client and its connection pool. Fails only on an unusable config.
    pub fn new(config: ProviderConfig) -> Result<Self, ProviderError> {
        Self::with_stats(config, Arc::new(ProviderStats::default()))
    }

    /// Like [`RunflowClient::new`], counting calls into `stats` (which may carry an observer).
    pub fn with_stats(
        config: ProviderConfig,
        stats: Arc<ProviderStats>,
    ) -> Result<Self, ProviderError> {
        config
            .validate()
            .map_err(|message| ProviderError::Config { message })?;
        let mut auth = HeaderValue::from_str(&format!("Bearer {}", config.api_key.expose()))
            .map_err(|_| ProviderError::Config {
                message: "api_key contains characters not allowed in an HTTP header".to_owned(),
            })?;
        auth.set_sensitive(true);
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, auth);
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .connect_timeout(config.timeouts.connect)
            .tcp_keepalive(Duration::from_secs(60))
            .pool_idle_timeout(Duration::from_secs(60))
            // A redirected POST would be replayed as something else; never follow.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("klingq-provider/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|error| ProviderError::Config {
                message: format!("cannot build the HTTP client: {}", error.without_url()),
            })?;
        let base = config.base_url.trim_end_matches('/').to_owned();
        Ok(Self {
            http,
            config,
            base,
            stats,
        })
    }

    pub fn config(&self) -> &ProviderConfig {
        &self.config
    }

    /// The call counters of this client.
    pub fn stats(&self) -> Arc<ProviderStats> {
        Arc::clone(&self.stats)
    }

    fn model_path(&self) -> &str {
        self.config.model.trim_matches('/')
    }

    /// Sends one request and returns its JSON body, classifying every failure.
    async fn send(
        &self,
        operation: Operation,
        request: RequestBuilder,
        run_id: Option<&str>,
    ) -> Result<Value, ProviderError> {
        let started = Instant::now();
        let result = request.send().await;
        let (response, outcome) = match result {
            Ok(response) => {
                let status = response.status();
                (Ok(response), CallOutcome::Status(status.as_u16()))
            }
            Err(error) => {
                let outcome = if error.is_connect() {
                    CallOutcome::ConnectError
                } else if error.is_timeout() {
                    CallOutcome::Timeout
                } else {
                    CallOutcome::NetworkError
                };
                (Err(error), outcome)
            }
        };
        let response = match response {
            Ok(response) => response,
            Err(error) => {
                self.record(operation, outcome, started);
                return Err(classify_transport(operation, error));
            }
        };
        let status = response.status();
        let headers = response.headers().clone();
        let body = match response.bytes().await {
            Ok(body) => body,
            Err(error) => {
                let outcome = if error.is_timeout() {
                    CallOutcome::Timeout
                } else {
                    CallOutcome::NetworkError
                };
                self.record(operation, outcome, started);
                return Err(classify_transport(operation, error));
            }
        };
        self.record(operation, outcome, started);
        if !status.is_success() {
            return Err(classify_response(
                operation, status, &headers, &body, run_id,
            ));
        }
        serde_json::from_slice::<Value>(&body)
            .ok()
            .ok_or_else(|| classify_unreadable_success(operation, status, &headers, &body))
    }

    fn record(&self, operation: Operation, outcome: CallOutcome, started: Instant) {
        let elapsed = started.elapsed();
        tracing::debug!(
            operation = operation.as_str(),
            outcome = %outcome,
            elapsed_ms = elapsed.as_millis() as u64,
            "provider call"
        );
        self.stats.record(CallRecord {
            operation,
            outcome,
            elapsed,
        });
    }

    fn request(&self, method: Method, path: &str, timeout: Duration) -> RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .timeout(timeout.max(Duration::from_millis(1)))
    }

    async fn create_once(&self, body: &Value) -> Result<Run, ProviderError> {
        let path = format!("/v1/models/{}/runs", self.model_path());
        let request = self
            .request(Method::POST, &path, self.config.timeouts.create)
            .json(body);
        let answer = self.send(Operation::Create, request, None).await?;
        parse_run(&answer).ok_or_else(|| ProviderError::SubmitOutcomeUnknown {
            operation: Operation::Create,
            detail: ErrorDetail {
                status: Some(200),
                message: "create answered without a run id or status".to_owned(),
                attempts: 1,
                ..ErrorDetail::default()
            },
            source: None,
        })
    }

    async fn get_once(&self, run_id: &str, timeout: Duration) -> Result<Run, ProviderError> {
        check_run_id(run_id)?;
        let request = self.request(Method::GET, &format!("/v1/runs/{run_id}"), timeout);
        let answer = self.send(Operation::GetRun, request, Some(run_id)).await?;
        parse_run(&answer).ok_or_else(|| ProviderError::Transient {
            operation: Operation::GetRun,
            detail: ErrorDetail {
                status: Some(200),
                message: "run read answered without a run id or status".to_owned(),
                attempts: 1,
                ..ErrorDetail::default()
            },
            source: None,
        })
    }

    async fn list_once(&self, client_ref: &str) -> Result<Vec<Run>, ProviderError> {
        let request = self
            .request(Method::GET, "/v1/runs", self.config.timeouts.poll)
            .query(&[
                ("q", format!("client_ref:\"{client_ref}\"")),
                ("limit", LIST_LIMIT.to_string()),
                ("sort_by", "created_at:desc".to_owned()),
            ]);
        let answer = self.send(Operation::ListRuns, request, None).await?;
        let runs = parse_run_list(&answer).ok_or_else(|| ProviderError::Transient {
            operation: Operation::ListRuns,
            detail: ErrorDetail {
                status: Some(200),
                message: "run list answered without a list".to_owned(),
                attempts: 1,
                ..ErrorDetail::default()
            },
            source: None,
        })?;
        // The `q` filter on client_ref is not documented: filter again here.
        Ok(runs
            .into_iter()
            .filter(|run| run.client_ref.as_deref() == Some(client_ref))
            .collect())
    }

    /// Every run with this exact `client_ref`, newest first, with transient retries.
    pub async fn list_runs(&self, client_ref: &str) -> Result<Vec<Run>, ProviderError> {
        check_client_ref(client_ref)?;
        let mut runs = with_retries(&self.config.retry, Operation::ListRuns, || {
            self.list_once(client_ref)
        })
        .await?;
        runs.sort_by_key(|run| std::cmp::Reverse(run.created_at));
        Ok(runs)
    }

    async fn find_run_impl(&self, client_ref: &str) -> Result<Option<Run>, ProviderError> {
        let runs = self.list_runs(client_ref).await?;
        let rank = |run: &Run| {
            if run.status.is_success() {
                0
            } else if !run.status.is_terminal() {
                1
            } else {
                2
            }
        };
        // Newest first already; a stable sort keeps that order within each rank.
        let mut runs = runs;
        runs.sort_by_key(rank);
        Ok(runs.into_iter().next())
    }

    /// Runs created since `since`, newest first (one page of up to 500).
    async fn list_created_since(&self, since: OffsetDateTime) -> Result<Vec<Run>, ProviderError> {
        let since = since
            .format(&Rfc3339)
            .map_err(|error| ProviderError::Config {
                message: format!("cannot format a timestamp: {error}"),
            })?;
        with_retries(&self.config.retry, Operation::ListRuns, || async {
            let request = self
                .request(Method::GET, "/v1/runs", self.config.timeouts.poll)
                .query(&[
                    ("q", format!("created_at>{since}")),
                    ("limit", WINDOW_LIST_LIMIT.to_string()),
                    ("sort_by", "created_at:desc".to_owned()),
                ]);
            let answer = self.send(Operation::ListRuns, request, None).await?;
            parse_run_list(&answer).ok_or_else(|| ProviderError::Transient {
                operation: Operation::ListRuns,
                detail: ErrorDetail {
                    status: Some(200),
                    message: "run list answered without a list".to_owned(),
                    attempts: 1,
                    ..ErrorDetail::default()
                },
                source: None,
            })
        })
        .await
    }

    /// The run that answers one send. First by `client_ref` (the documented way); then, because
    /// the `q` filter on `client_ref` is undocumented and the sync façade may not record our
    /// query parameter, among the runs created around the send time.
    async fn find_run_for_send(&self, send: &SendKey<'_>) -> Result<Option<Run>, ProviderError> {
        let by_ref = self.list_runs(send.client_ref).await?;
        if let Some(run) = by_ref.into_iter().find(|run| send.matches_ref(run)) {
            return Ok(Some(run));
        }
        let window = self.list_created_since(send.not_before()).await?;
        Ok(window.into_iter().find(|run| {
            send.within_window(run) && (send.matches_ref(run) || send.matches_input(run))
        }))
    }

    /// After a create whose outcome is unknown: adopt the run if it exists; otherwise wait the
    /// grace period, look again, and only then allow a new create (as a transient error, which the
    /// retry loop acts on). If the lookup itself fails, the outcome stays unknown.
    async fn reconcile(
        &self,
        send: &SendKey<'_>,
        unknown: ProviderError,
    ) -> Result<Run, ProviderError> {
        self.stats.note_unknown_outcome();
        tracing::warn!(error = %unknown, "submit outcome unknown, looking for the run by client_ref");
        for look in 0..2 {
            if look == 1 {
                tokio::time::sleep(self.config.effective_reconcile_grace()).await;
            }
            match self.find_run_for_send(send).await {
                Ok(Some(run)) => {
                    self.stats.note_adopted();
                    tracing::info!(run_id = %run.id, status = %run.status, "adopted the run found by client_ref");
                    return Ok(run.adopted());
                }
                Ok(None) => {}
                Err(lookup_error) => return Err(still_unknown(unknown, &lookup_error)),
            }
        }
        self.stats.note_resubmitted();
        tracing::warn!("no run found by client_ref after the grace period, submitting again");
        Err(reconciled_to_nothing(unknown))
    }

    async fn create_run_impl(
        &self,
        job_id: &JobId,
        attempt: u32,
        request: &GenerationRequest,
    ) -> Result<Run, ProviderError> {
        let client_ref = job_id.to_string();
        let input = serde_json::to_value(request).map_err(|error| ProviderError::Config {
            message: format!("cannot serialize the request: {error}"),
        })?;
        let mut body = json!({
            "input": input,
            "client_ref": client_ref,
            "metadata": {"job_id": client_ref, "attempt": attempt},
        });
        if let Some(callback_url) = &self.config.callback_url {
            body["callback_url"] = json!(callback_url);
        }
        let run = with_retries(&self.config.retry, Operation::Create, || async {
            let sent_at = OffsetDateTime::now_utc();
            match self.create_once(&body).await {
                Err(error) if error.class() == ErrorClass::SubmitOutcomeUnknown => {
                    let send = SendKey {
                        client_ref: &client_ref,
                        attempt: Some(attempt),
                        sent_at,
                        input: None,
                    };
                    self.reconcile(&send, error).await
                }
                other => other,
            }
        })
        .await?;
        tracing::info!(run_id = %run.id, adopted = run.adopted, status = %run.status, "run created");
        Ok(run)
    }

    async fn get_run_impl(&self, run_id: &str) -> Result<Run, ProviderError> {
        with_retries(&self.config.retry, Operation::GetRun, || {
            self.get_once(run_id, self.config.timeouts.poll)
        })
        .await
    }

    async fn wait_for_run_impl(
        &self,
        run_id: &str,
        deadline: Instant,
    ) -> Result<Run, ProviderError> {
        let retry = &self.config.retry;
        let mut cadence = PollCadence::new(&self.config.poll);
        let mut polls = 0u32;
        let mut not_found = 0u32;
        let mut empty_reads = 0u32;
        let mut last_status = RunStatus::Queued;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                tracing::warn!(run_id, polls, status = %last_status, "deadline passed while waiting for the run");
                return Err(ProviderError::DeadlineExceeded {
                    run_id: run_id.to_owned(),
                    last_status,
                    polls,
                });
            }
            polls += 1;
            let mut at_least = Duration::ZERO;
            match self
                .get_once(run_id, self.config.timeouts.poll.min(remaining))
                .await
            {
                Ok(run) => {
                    not_found = 0;
                    if run.status != last_status {
                        tracing::debug!(run_id, status = %run.status, "run status changed");
                    }
                    last_status = run.status.clone();
                    if run.status.is_success() {
                        if run.video.is_some() {
                            return Ok(run);
                        }
                        empty_reads += 1;
                        if empty_reads > retry.output_rereads {
                            tracing::warn!(
                                run_id,
                                reads = empty_reads,
                                "run succeeded without a video url"
                            );
                            return Err(ProviderError::SucceededWithoutOutput {
                                run_id: run_id.to_owned(),
                                reads: empty_reads,
                            });
                        }
                        tracing::warn!(
                            run_id,
                            "run succeeded without a video url, reading it again"
                        );
                    } else if run.status.is_terminal() {
                        let error = classify_run_end(&run);
                        tracing::info!(run_id, error = %error, "run ended without success");
                        return Err(error);
                    }
                }
                Err(error @ ProviderError::RunNotFound { .. }) => {
                    not_found += 1;
                    if not_found > retry.not_found_retries {
                        return Err(error.with_attempts(not_found));
                    }
                    tracing::debug!(run_id, not_found, "run not found yet, polling again");
                }
                Err(error) if error.is_transient() => {
                    tracing::debug!(run_id, error = %error, "poll failed, polling again");
                    at_least = error
                        .retry_after()
                        .map(|wait| scaled(wait, retry.delay_scale))
                        .unwrap_or_default();
                }
                Err(error) => return Err(error),
            }
            let wait = cadence.next_interval().max(at_least);
            let remaining = deadline.saturating_duration_since(Instant::now());
            tokio::time::sleep(wait.min(remaining)).await;
        }
    }

    async fn refresh_video_url_impl(&self, run_id: &str) -> Result<VideoOutput, ProviderError> {
        let mut reads = 0u32;
        loop {
            let run = self.get_run_impl(run_id).await?;
            reads += 1;
            if run.status.is_success()
                && let Some(video) = run.video
            {
                return Ok(video);
            }
            if !run.status.is_terminal() {
                return Err(ProviderError::Transient {
                    operation: Operation::GetRun,
                    detail: ErrorDetail {
                        message: format!("run {run_id} is {}, it has no video yet", run.status),
                        attempts: reads,
                        ..ErrorDetail::default()
                    },
                    source: None,
                });
            }
            if !run.status.is_success() {
                return Err(classify_run_end(&run));
            }
            if reads > self.config.retry.output_rereads {
                return Err(ProviderError::SucceededWithoutOutput {
                    run_id: run_id.to_owned(),
                    reads,
                });
            }
            tokio::time::sleep(self.config.poll.initial_interval).await;
        }
    }

    async fn sync_once(
        &self,
        input: &Value,
        client_ref: &str,
        timeout: Duration,
    ) -> Result<Value, ProviderError> {
        let path = format!("/v1/run/{}", self.model_path());
        let http_request = self
            .request(Method::POST, &path, timeout)
            .query(&[("client_ref", client_ref)])
            .json(input);
        self.send(Operation::SyncRun, http_request, None).await
    }

    async fn run_sync_impl(
        &self,
        job_id: &JobId,
        attempt: u32,
        request: &GenerationRequest,
    ) -> Result<Run, ProviderError> {
        let client_ref = job_id.to_string();
        let input = serde_json::to_value(request).map_err(|error| ProviderError::Config {
            message: format!("cannot serialize the request: {error}"),
        })?;
        let deadline = Instant::now() + self.config.deadline;
        let first_sent_at = OffsetDateTime::now_utc();
        let outcome = with_retries(&self.config.retry, Operation::SyncRun, || async {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(ProviderError::Transient {
                    operation: Operation::SyncRun,
                    detail: ErrorDetail {
                        message: "the job deadline passed before the sync call".to_owned(),
                        attempts: 1,
                        ..ErrorDetail::default()
                    },
                    source: None,
                });
            }
            let sent_at = OffsetDateTime::now_utc();
            match self
                .sync_once(
                    &input,
                    &client_ref,
                    self.config.timeouts.sync.min(remaining),
                )
                .await
            {
                Ok(answer) => Ok(SyncOutcome::Answered(answer)),
                Err(error) if error.class() == ErrorClass::SubmitOutcomeUnknown => {
                    let send = SendKey {
                        client_ref: &client_ref,
                        attempt: None,
                        sent_at,
                        input: Some(&input),
                    };
                    self.reconcile(&send, error)
                        .await
                        .map(|run| SyncOutcome::Adopted(Box::new(run)))
                }
                Err(error) => Err(error),
            }
        })
        .await?;
        let run = match outcome {
            SyncOutcome::Adopted(run) if run.status.is_success() && run.video.is_some() => *run,
            SyncOutcome::Adopted(run) => self.wait_for_run_impl(&run.id, deadline).await?.adopted(),
            SyncOutcome::Answered(answer) => {
                // The façade returns no run id: look the run up (best effort), so that its URL can
                // be refreshed later and its cost is known.
                let send = SendKey {
                    client_ref: &client_ref,
                    attempt: None,
                    sent_at: first_sent_at,
                    input: Some(&input),
                };
                let found = match self.find_run_for_send(&send).await {
                    Ok(found) => found,
                    Err(error) => {
                        tracing::debug!(error = %error, "cannot look up the sync run by client_ref");
                        None
                    }
                };
                match (extract_video(&answer), found) {
                    (Some(video), Some(found)) => Run {
                        status: if found.status.is_terminal() {
                            found.status
                        } else {
                            RunStatus::Succeeded
                        },
                        video: Some(video),
                        ..found
                    },
                    (Some(video), None) => sync_only_run(&client_ref, &answer, video),
                    (None, Some(found)) => self.wait_for_run_impl(&found.id, deadline).await?,
                    (None, None) => {
                        return Err(ProviderError::SucceededWithoutOutput {
                            run_id: String::new(),
                            reads: 1,
                        });
                    }
                }
            }
        };
        tracing::info!(run_id = %run.id, attempt, adopted = run.adopted, "sync run finished");
        Ok(run)
    }
}

/// What identifies the run one create or sync call may have made.
struct SendKey<'a> {
    client_ref: &'a str,
    /// `metadata.attempt` sent with an async create; sync calls carry no metadata.
    attempt: Option<u32>,
    /// When the request was sent, by our clock.
    sent_at: OffsetDateTime,
    /// The input of a sync call, matched against runs that echo no `client_ref`.
    input: Option<&'a Value>,
}

impl SendKey<'_> {
    fn not_before(&self) -> OffsetDateTime {
        self.sent_at - CLOCK_SKEW_ALLOWANCE
    }

    /// Whether a run could have been created by this send, judging by its creation time.
    fn within_window(&self, run: &Run) -> bool {
        run.created_at.is_none_or(|created_at| {
            created_at >= self.not_before()
                && created_at <= OffsetDateTime::now_utc() + CLOCK_SKEW_ALLOWANCE
        })
    }

    /// Same `client_ref`, and the same attempt when the run says (else created since the send).
    fn matches_ref(&self, run: &Run) -> bool {
        run.client_ref.as_deref() == Some(self.client_ref)
            && match (self.attempt, run.attempt()) {
                (Some(wanted), Some(found)) => wanted == found,
                _ => self.within_window(run),
            }
    }

    /// A run without any `client_ref` whose echoed input holds every field of ours.
    fn matches_input(&self, run: &Run) -> bool {
        let (Some(ours), None, Some(theirs)) = (self.input, &run.client_ref, &run.input) else {
            return false;
        };
        ours.as_object().is_some_and(|ours| {
            ours.iter().all(|(key, value)| {
                theirs
                    .get(key)
                    .is_some_and(|echoed| same_value(value, echoed))
            })
        })
    }
}

/// JSON equality that lets a number match its string form (`"5"` and `5`).
fn same_value(ours: &Value, theirs: &Value) -> bool {
    match (ours, theirs) {
        (Value::String(text), Value::Number(number))
        | (Value::Number(number), Value::String(text)) => text.trim() == number.to_string(),
        _ => ours == theirs,
    }
}

/// A run known only from the sync façade's answer.
fn sync_only_run(client_ref: &str, answer: &Value, video: VideoOutput) -> Run {
    let mut run = parse_run(answer).unwrap_or(Run {
        id: String::new(),
        status: RunStatus::Succeeded,
        client_ref: None,
        metadata: None,
        input: None,
        video: None,
        cost_usd: None,
        failure: None,
        created_at: None,
        started_at: None,
        completed_at: None,
        completed_at_ms: None,
        duration_ms: None,
        adopted: false,
    });
    run.client_ref = Some(client_ref.to_owned());
    run.video = Some(video);
    run
}

/// The unknown outcome stays unknown because the lookup failed too.
fn still_unknown(unknown: ProviderError, lookup_error: &ProviderError) -> ProviderError {
    match unknown {
        ProviderError::SubmitOutcomeUnknown {
            operation,
            mut detail,
            source,
        } => {
            detail.message = format!(
                "{}; looking the run up failed: {lookup_error}",
                detail.message
            );
            ProviderError::SubmitOutcomeUnknown {
                operation,
                detail,
                source,
            }
        }
        other => other,
    }
}

/// The unknown outcome was settled: no run exists, so a new create is safe (a transient error).
fn reconciled_to_nothing(unknown: ProviderError) -> ProviderError {
    match unknown {
        ProviderError::SubmitOutcomeUnknown {
            operation,
            mut detail,
            source,
        } => {
            detail.message = format!("{}; no run found by client_ref", detail.message);
            ProviderError::Transient {
                operation,
                detail,
                source,
            }
        }
        other => other,
    }
}

/// Run ids go into a URL path: accept only the characters ids are made of.
fn check_run_id(run_id: &str) -> Result<(), ProviderError> {
    let valid = !run_id.is_empty()
        && run_id.len() <= 128
        && run_id
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_');
    if valid {
        Ok(())
    } else {
        Err(ProviderError::Rejected {
            operation: Operation::GetRun,
            detail: ErrorDetail {
                code: Some("INVALID_RUN_ID".to_owned()),
                message: "run id must be 1 to 128 letters, digits, '-' or '_'".to_owned(),
                ..ErrorDetail::default()
            },
        })
    }
}

/// Client refs go into a quoted `q` term.
fn check_client_ref(client_ref: &str) -> Result<(), ProviderError> {
    if client_ref.is_empty() || client_ref.contains(['"', '\\']) {
        return Err(ProviderError::Rejected {
            operation: Operation::ListRuns,
            detail: ErrorDetail {
                code: Some("INVALID_CLIENT_REF".to_owned()),
                message: "client_ref must be non-empty and hold no quote or backslash".to_owned(),
                ..ErrorDetail::default()
            },
        });
    }
    Ok(())
}

impl VideoProvider for RunflowClient {
    fn mode(&self) -> Mode {
        self.config.mode
    }

    fn model(&self) -> &str {
        self.model_path()
    }

    fn poll_policy(&self) -> PollPolicy {
        self.config.poll_policy()
    }

    fn read_limits(&self) -> ReadLimits {
        ReadLimits {
            not_found_retries: self.config.retry.not_found_retries,
            output_rereads: self.config.retry.output_rereads,
        }
    }

    fn create_run<'a>(
        &'a self,
        job_id: &'a JobId,
        attempt: u32,
        request: &'a GenerationRequest,
    ) -> BoxFuture<'a, Result<Run, ProviderError>> {
        let span = tracing::info_span!("provider_create", job_id = %job_id, attempt);
        Box::pin(
            self.create_run_impl(job_id, attempt, request)
                .instrument(span),
        )
    }

    fn find_run<'a>(
        &'a self,
        client_ref: &'a str,
    ) -> BoxFuture<'a, Result<Option<Run>, ProviderError>> {
        Box::pin(self.find_run_impl(client_ref))
    }

    fn get_run<'a>(&'a self, run_id: &'a str) -> BoxFuture<'a, Result<Run, ProviderError>> {
        Box::pin(self.get_run_impl(run_id))
    }

    fn wait_for_run<'a>(
        &'a self,
        run_id: &'a str,
        deadline: Instant,
    ) -> BoxFuture<'a, Result<Run, ProviderError>> {
        let span = tracing::info_span!("provider_wait", run_id);
        Box::pin(self.wait_for_run_impl(run_id, deadline).instrument(span))
    }

    fn run_sync<'a>(
        &'a self,
        job_id: &'a JobId,
        attempt: u32,
        request: &'a GenerationRequest,
    ) -> BoxFuture<'a, Result<Run, ProviderError>> {
        let span = tracing::info_span!("provider_sync", job_id = %job_id, attempt);
        Box::pin(
            self.run_sync_impl(job_id, attempt, request)
                .instrument(span),
        )
    }

    fn refresh_video_url<'a>(
        &'a self,
        run_id: &'a str,
    ) -> BoxFuture<'a, Result<VideoOutput, ProviderError>> {
        Box::pin(self.refresh_video_url_impl(run_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(value: Value) -> Run {
        parse_run(&value).unwrap()
    }

    #[test]
    fn a_send_matches_its_own_run_only() {
        let sent_at = OffsetDateTime::now_utc();
        let created = |offset_secs: i64| {
            (sent_at + time::Duration::seconds(offset_secs))
                .format(&Rfc3339)
                .unwrap()
        };
        let send = SendKey {
            client_ref: "job-1",
            attempt: Some(2),
            sent_at,
            input: None,
        };
        let same_attempt = run(
            json!({"id": "a", "status_code": "queued", "client_ref": "job-1",
            "metadata": {"attempt": 2}, "created_at": created(0)}),
        );
        let old_attempt = run(
            json!({"id": "b", "status_code": "failed", "client_ref": "job-1",
            "metadata": {"attempt": 1}, "created_at": created(-10)}),
        );
        let other_job = run(
            json!({"id": "c", "status_code": "queued", "client_ref": "job-2",
            "metadata": {"attempt": 2}, "created_at": created(0)}),
        );
        let no_metadata_recent = run(
            json!({"id": "d", "status_code": "queued", "client_ref": "job-1",
            "created_at": created(1)}),
        );
        let no_metadata_old = run(
            json!({"id": "e", "status_code": "failed", "client_ref": "job-1",
            "created_at": created(-3600)}),
        );
        assert!(send.matches_ref(&same_attempt));
        assert!(!send.matches_ref(&old_attempt));
        assert!(!send.matches_ref(&other_job));
        assert!(send.matches_ref(&no_metadata_recent));
        assert!(!send.matches_ref(&no_metadata_old));
    }

    #[test]
    fn a_sync_send_matches_an_unreferenced_run_by_its_input() {
        let sent_at = OffsetDateTime::now_utc();
        let input =
            serde_json::to_value(GenerationRequest::new("https://e.com/a.png", "a cat")).unwrap();
        let send = SendKey {
            client_ref: "job-1",
            attempt: None,
            sent_at,
            input: Some(&input),
        };
        let mut echoed = input.clone();
        echoed["duration"] = json!(5);
        echoed["extra_default"] = json!(true);
        let created_at = sent_at.format(&Rfc3339).unwrap();
        let same_input = run(
            json!({"id": "a", "status_code": "succeeded", "input": echoed, "created_at": created_at}),
        );
        let mut other = input.clone();
        other["prompt"] = json!("a dog");
        let other_input = run(
            json!({"id": "b", "status_code": "succeeded", "input": other, "created_at": created_at}),
        );
        let someone_elses = run(
            json!({"id": "c", "status_code": "succeeded", "input": input,
            "client_ref": "job-9", "created_at": created_at}),
        );
        let too_old = run(
            json!({"id": "d", "status_code": "succeeded", "input": input,
            "created_at": (sent_at - time::Duration::hours(1)).format(&Rfc3339).unwrap()}),
        );
        assert!(send.within_window(&same_input) && send.matches_input(&same_input));
        assert!(!send.matches_input(&other_input));
        assert!(
            !send.matches_input(&someone_elses),
            "a run with another client_ref is never adopted"
        );
        assert!(!send.within_window(&too_old));
        let async_send = SendKey {
            input: None,
            ..send
        };
        assert!(
            !async_send.matches_input(&same_input),
            "async sends match by client_ref only"
        );
    }

    #[test]
    fn client_debug_hides_the_key_and_bad_configs_are_refused() {
        let client = RunflowClient::new(ProviderConfig::new("rf_live_hidden")).unwrap();
        let shown = format!("{client:?}");
        assert!(!shown.contains("rf_live_hidden"), "{shown}");
        let error = RunflowClient::new(ProviderConfig::default()).unwrap_err();
        assert_eq!(error.class(), ErrorClass::Permanent);
        let error = RunflowClient::new(ProviderConfig {
            base_url: "ftp://x".to_owned(),
            ..ProviderConfig::new("k")
        })
        .unwrap_err();
        assert!(error.to_string().contains("base_url"), "{error}");
        assert!(check_run_id("0190a5f0-0000-7000-8000-000000000001").is_ok());
        assert!(check_run_id("../etc").is_err());
        assert!(check_client_ref("a\"b").is_err());
    }
}
