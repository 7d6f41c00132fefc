//! Runflow's signed per-run callbacks: `POST /v1/provider/callbacks/runflow`.
//!
//! Runflow POSTs a run's final envelope (`{"event", "run_id", "status", "output", …}`) to the
//! `callback_url` given at creation, signed with `Runflow-Signature: <hex HMAC-SHA256(secret,
//! raw body)>`. The route takes no bearer token (Runflow cannot send one): the signature is
//! its authentication. In order:
//!
//! 1. the header is missing, repeated or not exactly 64 lowercase hex characters → 401;
//! 2. no `provider.callback_secret` configured → 404 `callbacks_not_configured`;
//! 3. the body is larger than [`MAX_CALLBACK_BODY_BYTES`] → 413 (reading stops at the limit);
//! 4. no configured secret (the whole `whsec_…` string is the key) signs the raw body → 401,
//!    compared in constant time; nothing is parsed before this;
//! 5. the body is not a JSON object with a `run_id` and a known `status` or `event` → 400;
//! 6. the queue records the callback and wakes the run's job; a Redis error → 503 with
//!    `Retry-After`, so Runflow retries.
//!
//! A callback only wakes its job (polling stays the source of truth), so the answer is 200
//! `{"received": true, "outcome"}` whatever the queue made of it: `accepted`, `duplicate`,
//! `unknown_run` (kept, and applied when a job binds the run) or `finished`. Every answer is
//! counted in `klingq_provider_callbacks_total{outcome}`. The log line names the run and the
//! outcome, never the secret, the signature or the body (its output URLs are presigned).

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::response::{IntoResponse, Response};
use hmac::{Hmac, Mac};
use http::{HeaderMap, StatusCode, header};
use klingq_core::Secret;
use klingq_queue::CallbackOutcome;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::Sha256;
use subtle::{Choice, ConstantTimeEq};
use utoipa::ToSchema;

use crate::api::AppState;
use crate::api::error::ApiError;
use crate::view::ErrorBody;

type HmacSha256 = Hmac<Sha256>;

/// The route Runflow posts callbacks to.
pub const CALLBACK_PATH: &str = "/v1/provider/callbacks/runflow";
/// Largest callback body accepted, in bytes (1 MiB).
pub const MAX_CALLBACK_BODY_BYTES: usize = 1024 * 1024;
/// The header carrying the body's signature.
pub(crate) const SIGNATURE_HEADER: &str = "runflow-signature";
/// Runflow's id of one delivery, logged when it looks like an id.
const REQUEST_ID_HEADER: &str = "runflow-request-id";
/// Longest `run_id` accepted (Runflow's are UUIDs).
const MAX_RUN_ID_BYTES: usize = 256;

/// The values of `klingq_provider_callbacks_total{outcome}`: the queue's outcomes
/// ([`CallbackOutcome::label`]), then the refusals.
pub const CALLBACK_OUTCOMES: [&str; 9] = [
    "accepted",
    "duplicate",
    "unknown_run",
    "finished",
    "bad_signature",
    "malformed",
    "too_large",
    "not_configured",
    "error",
];

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// Callbacks received by this process, by outcome: `klingq_provider_callbacks_total{outcome}`,
/// every outcome present from 0. [`ProviderCallbackMetrics::register`] adds it to `/metrics`.
#[derive(Clone)]
pub struct ProviderCallbackMetrics(Family<OutcomeLabels, Counter>);

impl Default for ProviderCallbackMetrics {
    fn default() -> Self {
        let family = Family::default();
        for outcome in CALLBACK_OUTCOMES {
            let _ = family.get_or_create(&OutcomeLabels { outcome });
        }
        Self(family)
    }
}

impl std::fmt::Debug for ProviderCallbackMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut map = f.debug_map();
        for outcome in CALLBACK_OUTCOMES {
            map.entry(&outcome, &self.get(outcome));
        }
        map.finish()
    }
}

impl ProviderCallbackMetrics {
    /// The known outcome `outcome` names; an unknown one counts as `error`.
    fn label(outcome: &str) -> &'static str {
        CALLBACK_OUTCOMES
            .into_iter()
            .find(|known| *known == outcome)
            .unwrap_or(CALLBACK_OUTCOMES[CALLBACK_OUTCOMES.len() - 1])
    }

    pub(crate) fn count(&self, outcome: &str) {
        self.0
            .get_or_create(&OutcomeLabels {
                outcome: Self::label(outcome),
            })
            .inc();
    }

    /// Callbacks counted with `outcome` (one of [`CALLBACK_OUTCOMES`]).
    pub fn get(&self, outcome: &str) -> u64 {
        CALLBACK_OUTCOMES
            .into_iter()
            .find(|known| *known == outcome)
            .and_then(|outcome| self.0.get(&OutcomeLabels { outcome }))
            .map_or(0, |counter| counter.get())
    }

    /// Adds `klingq_provider_callbacks_total` to `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "klingq_provider_callbacks",
            format!(
                "Runflow run callbacks this API process answered, by outcome: {}",
                CALLBACK_OUTCOMES.join(", ")
            ),
            self.0.clone(),
        );
    }

    /// `klingq_provider_callbacks_total` alone in the Prometheus text format (0.0.4).
    pub fn render(&self, out: &mut String) {
        let mut registry = Registry::default();
        self.register(&mut registry);
        out.push_str(&klingq_queue::metrics::Format::Text.encode(&[&registry]));
    }
}

/// Why a signature was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BadSignature {
    /// No `Runflow-Signature` header.
    Missing,
    /// Not exactly one header of 64 lowercase hex characters.
    Malformed,
    /// No configured secret signs the body so.
    Mismatch,
}

impl BadSignature {
    fn message(self) -> &'static str {
        match self {
            Self::Missing => "missing Runflow-Signature header",
            Self::Malformed => {
                "malformed Runflow-Signature header: expected one value of 64 lowercase hex characters"
            }
            Self::Mismatch => "the Runflow-Signature does not match the body",
        }
    }

    fn reason(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Malformed => "malformed",
            Self::Mismatch => "mismatch",
        }
    }
}

/// The callback secrets, keyed once. `Debug` shows only how many there are.
#[derive(Clone, Default)]
pub(crate) struct CallbackKeys(Vec<HmacSha256>);

impl std::fmt::Debug for CallbackKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CallbackKeys({} [redacted])", self.0.len())
    }
}

impl CallbackKeys {
    /// Keys each non-empty secret, its whole string as the HMAC key (as Runflow's guide does).
    pub(crate) fn new(secrets: &[Secret]) -> Self {
        Self(
            secrets
                .iter()
                .filter(|secret| !secret.is_empty())
                .map(|secret| {
                    HmacSha256::new_from_slice(secret.expose().as_bytes())
                        .expect("HMAC takes keys of any length")
                })
                .collect(),
        )
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The header's signature, when it has the one accepted form: 64 lowercase hex characters.
    pub(crate) fn parse_signature(header: Option<&[u8]>) -> Result<[u8; 32], BadSignature> {
        let header = header.ok_or(BadSignature::Missing)?;
        if header.len() != 64
            || !header
                .iter()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(BadSignature::Malformed);
        }
        let mut signature = [0u8; 32];
        hex::decode_to_slice(header, &mut signature).map_err(|_| BadSignature::Malformed)?;
        Ok(signature)
    }

    /// Whether any key signs `body` with `signature`. Every key is tried, and each comparison
    /// takes constant time.
    pub(crate) fn verify(&self, signature: &[u8; 32], body: &[u8]) -> Result<(), BadSignature> {
        let matched = self.0.iter().fold(Choice::from(0), |matched, key| {
            let mut mac = key.clone();
            mac.update(body);
            matched | mac.finalize().into_bytes().as_slice().ct_eq(signature)
        });
        if bool::from(matched) {
            Ok(())
        } else {
            Err(BadSignature::Mismatch)
        }
    }

    /// [`Self::parse_signature`], then [`Self::verify`].
    #[cfg(test)]
    pub(crate) fn check(&self, header: Option<&[u8]>, body: &[u8]) -> Result<(), BadSignature> {
        self.verify(&Self::parse_signature(header)?, body)
    }
}

/// A callback's `event`. Both spellings of the cancel event are understood.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub(crate) enum RunflowEvent {
    #[serde(rename = "run.completed")]
    Completed,
    #[serde(rename = "run.failed")]
    Failed,
    #[serde(rename = "run.cancelled")]
    Cancelled,
    #[serde(rename = "run.canceled")]
    Canceled,
    #[serde(rename = "run.partial_succeeded")]
    PartialSucceeded,
}

impl RunflowEvent {
    /// The run status the event reports.
    fn status(self) -> RunflowStatus {
        match self {
            Self::Completed => RunflowStatus::Succeeded,
            Self::Failed => RunflowStatus::Failed,
            Self::Cancelled | Self::Canceled => RunflowStatus::Canceled,
            Self::PartialSucceeded => RunflowStatus::PartialSucceeded,
        }
    }
}

/// A callback's `status` (the run's final `status_code`). Both spellings of the cancel status
/// are understood; the queue is given `canceled`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum RunflowStatus {
    Succeeded,
    Failed,
    Canceled,
    Cancelled,
    PartialSucceeded,
}

impl RunflowStatus {
    /// The status as the queue records it (US spelling of `canceled`).
    fn normalized(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Canceled | Self::Cancelled => "canceled",
            Self::PartialSucceeded => "partial_succeeded",
        }
    }
}

/// The callback Runflow sends (its event envelope, frozen at delivery time). Only `run_id` and
/// the status are read: `status` when it is a known status, else the one `event` implies.
/// Unknown fields are ignored.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub(crate) struct RunflowCallback {
    /// `run.completed`, `run.failed`, `run.cancelled` (also `run.canceled`) or
    /// `run.partial_succeeded`.
    #[schema(nullable = false)]
    pub(crate) event: Option<RunflowEvent>,
    /// The run's id, as the create returned it.
    #[schema(min_length = 1, max_length = 256)]
    pub(crate) run_id: String,
    /// The run's final status; `canceled` and `cancelled` both mean cancelled.
    #[schema(nullable = false)]
    pub(crate) status: Option<RunflowStatus>,
    /// The normalized output on success (presigned, time-limited URLs), an error envelope on
    /// failure, `null` when cancelled. Not read: the job re-reads its run.
    #[schema(value_type = Option<Object>)]
    pub(crate) output: Option<Value>,
    #[schema(nullable = false)]
    pub(crate) duration_ms: Option<u64>,
    #[schema(nullable = false)]
    pub(crate) created_at: Option<String>,
    #[schema(nullable = false)]
    pub(crate) completed_at: Option<String>,
    /// The metadata given at creation.
    #[schema(value_type = Option<Object>)]
    pub(crate) metadata: Option<Value>,
}

/// The answer to a callback the API took.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub(crate) struct CallbackReceived {
    /// Always `true`.
    pub(crate) received: bool,
    /// `accepted` (the run's job was woken), `duplicate` (this status was reported before),
    /// `unknown_run` (no job has bound the run yet: the callback is kept for a day and applied
    /// when one does) or `finished` (the run's job has finished already).
    #[schema(example = "accepted")]
    pub(crate) outcome: String,
}

/// What a verified body says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ParsedCallback {
    pub(crate) run_id: String,
    /// Normalized: `succeeded`, `failed`, `canceled` or `partial_succeeded`.
    pub(crate) status: &'static str,
}

fn malformed(message: &str) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_callback", message)
}

/// Parses a verified body.
pub(crate) fn parse_callback(body: &[u8]) -> Result<ParsedCallback, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| ApiError::bad_json(&e))?;
    let Value::Object(fields) = value else {
        return Err(malformed("the callback is not a JSON object"));
    };
    let run_id = match fields.get("run_id") {
        Some(Value::String(id))
            if !id.is_empty()
                && id.len() <= MAX_RUN_ID_BYTES
                && !id.chars().any(|c| c.is_control() || c.is_whitespace()) =>
        {
            id.clone()
        }
        _ => {
            return Err(malformed(
                "run_id must be a string of 1 to 256 characters, without spaces or control characters",
            ));
        }
    };
    let known = |key: &str| fields.get(key).cloned();
    let status = known("status")
        .and_then(|status| RunflowStatus::deserialize(status).ok())
        .or_else(|| {
            known("event")
                .and_then(|event| RunflowEvent::deserialize(event).ok())
                .map(RunflowEvent::status)
        })
        .ok_or_else(|| {
            malformed(
                "neither status (succeeded, failed, canceled, cancelled, partial_succeeded) nor \
                 event (run.completed, run.failed, run.cancelled, run.canceled, \
                 run.partial_succeeded) names the run's end",
            )
        })?;
    Ok(ParsedCallback {
        run_id,
        status: status.normalized(),
    })
}

/// A refused callback: its metric outcome and its answer.
struct Refused {
    outcome: &'static str,
    error: ApiError,
}

impl Refused {
    fn new(outcome: &'static str, error: ApiError) -> Self {
        Self { outcome, error }
    }
}

/// The delivery id Runflow sent, when it looks like one (it is logged).
fn request_id(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(REQUEST_ID_HEADER)
        .and_then(|value| value.to_str().ok())
        .filter(|id| {
            id.len() <= 128
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        })
}

/// Receive a Runflow run callback.
///
/// Runflow calls this when a run ends (the `callback_url` given at creation). It takes no
/// bearer token, even when the API's tokens are configured: the `Runflow-Signature` header,
/// the lowercase hex HMAC-SHA256 of the raw body keyed with a `provider.callback_secret`
/// (several during a rotation; any one verifying is enough), authenticates it. The signature
/// is checked before the body is parsed. The callback only wakes the run's job, which then
/// re-reads the run; every taken callback is answered 200 with the queue's outcome, so
/// Runflow stops retrying. Without `provider.callback_secret` the route answers 404
/// `callbacks_not_configured`. Counted in `klingq_provider_callbacks_total{outcome}`.
#[utoipa::path(
    post,
    path = "/v1/provider/callbacks/runflow",
    tag = "provider",
    operation_id = "runflow_callback",
    security(()),
    params(
        ("Runflow-Signature" = String, Header, pattern = "^[0-9a-f]{64}$", min_length = 64, max_length = 64,
            description = "Lowercase hex HMAC-SHA256 of the raw body, keyed with the whole `whsec_…` secret."),
        ("Runflow-Request-Id" = Option<String>, Header,
            description = "Runflow's id of this delivery; logged."),
    ),
    request_body(content = RunflowCallback, content_type = "application/json",
        description = "At most 1 MiB. Unknown fields are ignored."),
    responses(
        (status = 200, description = "Taken: `accepted`, `duplicate`, `unknown_run` or `finished`.", body = CallbackReceived),
        (status = 400, description = "Signed, but not a JSON object with a `run_id` and a known `status` or `event` (`invalid_json`, `invalid_callback`).", body = ErrorBody),
        (status = 401, description = "Missing, malformed (not 64 lowercase hex characters) or wrong `Runflow-Signature` (`bad_signature`).", body = ErrorBody),
        (status = 404, description = "No `provider.callback_secret` is configured (`callbacks_not_configured`).", body = ErrorBody),
        (status = 413, description = "The body is larger than 1 MiB (`payload_too_large`).", body = ErrorBody),
        (status = 503, description = "Redis is unavailable; retry after `Retry-After` seconds (`unavailable`).", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait."))),
    )
)]
pub(crate) async fn runflow_callback(
    State(app): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let request_id = request_id(&headers);
    match receive(&app, &headers, body).await {
        Ok((callback, outcome)) => {
            let label = outcome.label();
            app.callback_metrics.count(label);
            let job_id = match &outcome {
                CallbackOutcome::Woken { job_id } | CallbackOutcome::Finished { job_id } => {
                    Some(job_id.as_str())
                }
                CallbackOutcome::Duplicate { job_id } => job_id.as_deref(),
                CallbackOutcome::Unknown => None,
            };
            tracing::info!(
                run_id = %callback.run_id,
                status = callback.status,
                outcome = label,
                job_id,
                request_id,
                "provider callback"
            );
            Json(CallbackReceived {
                received: true,
                outcome: label.to_owned(),
            })
            .into_response()
        }
        Err(refused) => {
            app.callback_metrics.count(refused.outcome);
            tracing::info!(
                outcome = refused.outcome,
                status = refused.error.status.as_u16(),
                request_id,
                "provider callback refused"
            );
            let mut response = refused.error.into_response();
            // The route is not a bearer-token route: no challenge.
            response.headers_mut().remove(header::WWW_AUTHENTICATE);
            response
        }
    }
}

async fn receive(
    app: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(ParsedCallback, CallbackOutcome), Refused> {
    let bad_signature = |bad: BadSignature| {
        tracing::debug!(reason = bad.reason(), "provider callback signature refused");
        Refused::new(
            "bad_signature",
            ApiError::new(StatusCode::UNAUTHORIZED, "bad_signature", bad.message()),
        )
    };
    let mut values = headers.get_all(SIGNATURE_HEADER).iter();
    let header = values.next().map(|value| value.as_bytes());
    if header.is_some() && values.next().is_some() {
        return Err(bad_signature(BadSignature::Malformed));
    }
    let signature = CallbackKeys::parse_signature(header).map_err(bad_signature)?;
    if app.callback_keys.is_empty() {
        return Err(Refused::new(
            "not_configured",
            ApiError::new(
                StatusCode::NOT_FOUND,
                "callbacks_not_configured",
                "provider callbacks are not configured on this server: set \
                 provider.callback_secret (KLINGQ_PROVIDER_CALLBACK_SECRET)",
            ),
        ));
    }
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Refused::new(
                "too_large",
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    format!("the body is larger than {MAX_CALLBACK_BODY_BYTES} bytes"),
                ),
            )
        } else {
            Refused::new(
                "malformed",
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    format!("reading the body: {}", rejection.body_text()),
                ),
            )
        }
    })?;
    app.callback_keys
        .verify(&signature, &body)
        .map_err(bad_signature)?;
    let callback = parse_callback(&body).map_err(|error| Refused::new("malformed", error))?;
    let outcome = app
        .producer
        .queue()
        .provider_callback(&callback.run_id, callback.status)
        .await
        .map_err(|error| {
            tracing::warn!(%error, run_id = %callback.run_id, "provider callback not recorded: redis unavailable");
            Refused::new(
                "error",
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "the queue's Redis is unavailable; retry later",
                ),
            )
        })?;
    Ok((callback, outcome))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign(secret: &str, body: &[u8]) -> String {
        let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(body);
        hex::encode(mac.finalize().into_bytes())
    }

    fn keys(secrets: &[&str]) -> CallbackKeys {
        CallbackKeys::new(&secrets.iter().map(|s| Secret::new(*s)).collect::<Vec<_>>())
    }

    const BODY: &[u8] = br#"{"event":"run.completed","run_id":"r1","status":"succeeded"}"#;

    #[test]
    fn a_signature_by_any_configured_secret_verifies() {
        let keys = keys(&["whsec_old", "whsec_new"]);
        for secret in ["whsec_old", "whsec_new"] {
            let signature = sign(secret, BODY);
            assert_eq!(keys.check(Some(signature.as_bytes()), BODY), Ok(()));
        }
        let other = sign("whsec_other", BODY);
        assert_eq!(
            keys.check(Some(other.as_bytes()), BODY),
            Err(BadSignature::Mismatch)
        );
    }

    #[test]
    fn the_whole_secret_string_is_the_key() {
        // Not the base64 part after `whsec_`, not its decoding: the string as issued.
        let keys = keys(&["whsec_c2VjcmV0"]);
        let good = sign("whsec_c2VjcmV0", BODY);
        assert_eq!(keys.check(Some(good.as_bytes()), BODY), Ok(()));
        for wrong in [sign("c2VjcmV0", BODY), sign("secret", BODY)] {
            assert_eq!(
                keys.check(Some(wrong.as_bytes()), BODY),
                Err(BadSignature::Mismatch)
            );
        }
    }

    #[test]
    fn the_signature_covers_every_byte_of_the_body() {
        let keys = keys(&["whsec_a"]);
        let signature = sign("whsec_a", BODY);
        let mut changed = BODY.to_vec();
        changed.push(b' ');
        assert_eq!(
            keys.check(Some(signature.as_bytes()), &changed),
            Err(BadSignature::Mismatch)
        );
        assert_eq!(
            keys.check(Some(signature.as_bytes()), b""),
            Err(BadSignature::Mismatch)
        );
        let empty = sign("whsec_a", b"");
        assert_eq!(keys.check(Some(empty.as_bytes()), b""), Ok(()));
    }

    #[test]
    fn only_64_lowercase_hex_characters_are_a_signature() {
        let keys = keys(&["whsec_a"]);
        let good = sign("whsec_a", BODY);
        assert_eq!(
            keys.check(None, BODY),
            Err(BadSignature::Missing),
            "missing"
        );
        let malformed = [
            good.to_uppercase(),
            good[..63].to_owned(),
            format!("{good}0"),
            format!(" {}", &good[1..]),
            format!("{}g", &good[..63]),
            format!("sha256={good}"),
            String::new(),
            "0".repeat(128),
        ];
        for header in &malformed {
            assert_eq!(
                keys.check(Some(header.as_bytes()), BODY),
                Err(BadSignature::Malformed),
                "{header:?}"
            );
        }
        // Well-formed but wrong: all zeros.
        assert_eq!(
            keys.check(Some("0".repeat(64).as_bytes()), BODY),
            Err(BadSignature::Mismatch)
        );
        // Non-UTF-8 header bytes.
        let mut bytes = good.clone().into_bytes();
        bytes[0] = 0xff;
        assert_eq!(keys.check(Some(&bytes), BODY), Err(BadSignature::Malformed));
    }

    #[test]
    fn without_secrets_nothing_verifies() {
        let keys = keys(&["", ""]);
        assert!(keys.is_empty());
        let signature = sign("", BODY);
        assert_eq!(
            keys.check(Some(signature.as_bytes()), BODY),
            Err(BadSignature::Mismatch)
        );
        assert!(!format!("{:?}", self::keys(&["whsec_x"])).contains("whsec"));
    }

    #[test]
    fn status_comes_from_status_else_from_event_in_either_spelling() {
        let cases = [
            (
                r#"{"run_id":"r","status":"succeeded","event":"run.failed"}"#,
                "succeeded",
            ),
            (r#"{"run_id":"r","status":"cancelled"}"#, "canceled"),
            (r#"{"run_id":"r","status":"canceled"}"#, "canceled"),
            (
                r#"{"run_id":"r","status":"partial_succeeded"}"#,
                "partial_succeeded",
            ),
            (r#"{"run_id":"r","event":"run.cancelled"}"#, "canceled"),
            (
                r#"{"run_id":"r","event":"run.canceled","status":null}"#,
                "canceled",
            ),
            (r#"{"run_id":"r","event":"run.completed"}"#, "succeeded"),
            (
                r#"{"run_id":"r","event":"run.failed","status":"weird"}"#,
                "failed",
            ),
            (
                r#"{"run_id":"r","event":"run.partial_succeeded","output":{"x":1},"new_field":[1]}"#,
                "partial_succeeded",
            ),
        ];
        for (body, status) in cases {
            let parsed = parse_callback(body.as_bytes()).unwrap();
            assert_eq!(parsed.run_id, "r", "{body}");
            assert_eq!(parsed.status, status, "{body}");
        }
    }

    #[test]
    fn bodies_without_a_run_or_an_end_are_refused() {
        let long = format!(r#"{{"run_id":"{}","status":"failed"}}"#, "r".repeat(257));
        for body in [
            "",
            "not json",
            "[]",
            "\"run\"",
            r#"{"status":"succeeded"}"#,
            r#"{"run_id":"","status":"succeeded"}"#,
            r#"{"run_id":7,"status":"succeeded"}"#,
            r#"{"run_id":"a b","status":"succeeded"}"#,
            r#"{"run_id":"a\nb","status":"succeeded"}"#,
            long.as_str(),
            r#"{"run_id":"r"}"#,
            r#"{"run_id":"r","status":"running"}"#,
            r#"{"run_id":"r","event":"run.started"}"#,
        ] {
            let error = parse_callback(body.as_bytes()).unwrap_err();
            assert_eq!(error.status, StatusCode::BAD_REQUEST, "{body}");
        }
    }

    #[test]
    fn every_outcome_is_rendered_from_zero() {
        let metrics = ProviderCallbackMetrics::default();
        metrics.count("duplicate");
        metrics.count("duplicate");
        metrics.count("bad_signature");
        let mut out = String::new();
        metrics.render(&mut out);
        assert!(out.starts_with("# HELP klingq_provider_callbacks_total "));
        assert!(out.contains("# TYPE klingq_provider_callbacks_total counter\n"));
        for outcome in CALLBACK_OUTCOMES {
            let expected = match outcome {
                "duplicate" => 2,
                "bad_signature" => 1,
                _ => 0,
            };
            assert!(
                out.contains(&format!(
                    "klingq_provider_callbacks_total{{outcome=\"{outcome}\"}} {expected}\n"
                )),
                "{outcome}: {out}"
            );
        }
        for outcome in ["accepted", "duplicate", "unknown_run", "finished"] {
            assert!(CALLBACK_OUTCOMES.contains(&outcome));
        }
        assert_eq!(
            CallbackOutcome::Unknown.label(),
            "unknown_run",
            "the queue's labels are the metric's"
        );
    }
}
