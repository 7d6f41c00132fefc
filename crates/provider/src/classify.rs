//! The one place where provider answers and transport failures become [`ProviderError`]s.
//!
//! The rule that keeps the client from paying twice lives here: a request that can create a run
//! (`create`, `sync_run`) and got no usable answer after its body was sent is *submit outcome
//! unknown*, never plainly transient. Only a connect failure (nothing was sent) or a JSON error
//! from the API itself (it answered, so it did not create) is safe to retry as is.

use std::time::{Duration, SystemTime};

use klingq_core::FieldError;
use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, HeaderMap, RETRY_AFTER};
use serde_json::Value;

use crate::error::{ErrorDetail, Operation, ProviderError, RunFailureKind};
use crate::retry::parse_retry_after;
use crate::run::{Run, RunStatus};

/// Longest provider message kept in an error.
const MAX_MESSAGE_CHARS: usize = 500;

/// An error body as Runflow (`{code, message, errors}`), the SDK (`{error: {code, message}}`)
/// or fal (`{detail: [...]}`) writes it.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Envelope {
    /// Whether the body was a JSON object at all; proxies answer with HTML.
    pub(crate) is_json: bool,
    pub(crate) code: Option<String>,
    pub(crate) message: Option<String>,
    pub(crate) field_errors: Vec<FieldError>,
}

pub(crate) fn parse_envelope(body: &[u8]) -> Envelope {
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return Envelope::default();
    };
    if !value.is_object() {
        return Envelope::default();
    }
    let error = value.get("error").filter(|error| error.is_object());
    let text = |value: Option<&Value>| {
        value
            .and_then(Value::as_str)
            .filter(|text| !text.is_empty())
            // A provider may echo what it was sent (the Authorization header, a signed URL).
            .map(|text| truncate(&klingq_core::scrub(text), MAX_MESSAGE_CHARS))
    };
    let code = text(value.get("code"))
        .or_else(|| text(error.and_then(|error| error.get("code"))))
        .or_else(|| text(value.get("error_type")));
    let message = text(value.get("message"))
        .or_else(|| text(error.and_then(|error| error.get("message"))))
        .or_else(|| text(value.get("error")))
        .or_else(|| text(value.get("detail")));
    let mut field_errors = Vec::new();
    for key in ["errors", "detail"] {
        if let Some(items) = value.get(key).and_then(Value::as_array) {
            field_errors.extend(items.iter().filter_map(parse_field_error));
        }
    }
    Envelope {
        is_json: true,
        code,
        message,
        field_errors,
    }
}

/// One `errors[]` entry: `{loc: ["input", "duration"], msg, type}` or `{field, message}`.
fn parse_field_error(item: &Value) -> Option<FieldError> {
    let path = match item.get("loc").and_then(Value::as_array) {
        Some(loc) => {
            let mut path = String::new();
            for part in loc {
                match part {
                    Value::Number(index) => path.push_str(&format!("[{index}]")),
                    Value::String(name) => {
                        if !path.is_empty() {
                            path.push('.');
                        }
                        path.push_str(name);
                    }
                    _ => {}
                }
            }
            path
        }
        None => item
            .get("field")
            .or_else(|| item.get("path"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
    };
    let message = item
        .get("msg")
        .or_else(|| item.get("message"))
        .and_then(Value::as_str)
        .map(|text| truncate(text, MAX_MESSAGE_CHARS))?;
    let rule = item
        .get("type")
        .or_else(|| item.get("code"))
        .and_then(Value::as_str)
        .unwrap_or("provider");
    Some(FieldError::new(path, rule, message))
}

fn truncate(text: &str, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        Some((index, _)) => format!("{}...", &text[..index]),
        None => text.to_owned(),
    }
}

/// Whether a failure code or message names content moderation (Runflow, fal or Kling wording).
pub(crate) fn looks_like_moderation(code: Option<&str>, message: Option<&str>) -> bool {
    const CODES: [&str; 6] = [
        "CONTENT_POLICY",
        "MODERATION",
        "CONTENT_FILTER",
        "NSFW",
        "SAFETY",
        "FLAGGED",
    ];
    const MESSAGES: [&str; 6] = [
        "content policy",
        "content checker",
        "flagged",
        "moderation",
        "risk control",
        "content security",
    ];
    let code_matches = code.is_some_and(|code| {
        let code = code.to_ascii_uppercase();
        CODES.iter().any(|needle| code.contains(needle))
    });
    let message_matches = message.is_some_and(|message| {
        let message = message.to_ascii_lowercase();
        MESSAGES.iter().any(|needle| message.contains(needle))
    });
    code_matches || message_matches
}

/// Classifies an HTTP answer that is not a success. `run_id` is the run a `get_run` asked for.
pub(crate) fn classify_response(
    operation: Operation,
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    run_id: Option<&str>,
) -> ProviderError {
    let envelope = parse_envelope(body);
    let retry_after = headers
        .get(RETRY_AFTER)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| parse_retry_after(value, SystemTime::now()));
    let message = envelope.message.clone().unwrap_or_else(|| {
        if envelope.is_json {
            status.canonical_reason().unwrap_or("error").to_lowercase()
        } else {
            non_json_summary(headers, body)
        }
    });
    let detail = ErrorDetail {
        status: Some(status.as_u16()),
        code: envelope.code.clone(),
        message,
        field_errors: envelope.field_errors,
        retry_after,
        attempts: 1,
    };
    let code = envelope.code.as_deref().unwrap_or_default();
    let creates = operation.creates_runs();
    match status.as_u16() {
        402 => ProviderError::InsufficientCredit { operation, detail },
        _ if code.eq_ignore_ascii_case("INSUFFICIENT_CREDIT") => {
            ProviderError::InsufficientCredit { operation, detail }
        }
        408 | 425 | 429 => ProviderError::Transient {
            operation,
            detail,
            source: None,
        },
        // "Usually a duplicate create or a race": the run may exist, so reconcile.
        409 if creates => ProviderError::SubmitOutcomeUnknown {
            operation,
            detail,
            source: None,
        },
        409 => ProviderError::Transient {
            operation,
            detail,
            source: None,
        },
        404 if operation == Operation::GetRun => ProviderError::RunNotFound {
            run_id: run_id.unwrap_or_default().to_owned(),
            detail,
        },
        400..=499 => ProviderError::Rejected { operation, detail },
        // A gateway timeout or a proxy's page says nothing about whether the API created the run.
        502 | 504 if creates => ProviderError::SubmitOutcomeUnknown {
            operation,
            detail,
            source: None,
        },
        500..=599 if creates && !envelope.is_json => ProviderError::SubmitOutcomeUnknown {
            operation,
            detail,
            source: None,
        },
        500..=599 => ProviderError::Transient {
            operation,
            detail,
            source: None,
        },
        // Redirects are not followed, and an informational or redirect answer to a create says
        // nothing about whether it created a run.
        _ if creates => ProviderError::SubmitOutcomeUnknown {
            operation,
            detail,
            source: None,
        },
        _ => ProviderError::Transient {
            operation,
            detail,
            source: None,
        },
    }
}

/// Classifies a success status whose body is not what the API sends (not JSON, not a run).
pub(crate) fn classify_unreadable_success(
    operation: Operation,
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
) -> ProviderError {
    let detail = ErrorDetail {
        status: Some(status.as_u16()),
        message: format!(
            "unreadable success response: {}",
            non_json_summary(headers, body)
        ),
        attempts: 1,
        ..ErrorDetail::default()
    };
    if operation.creates_runs() {
        ProviderError::SubmitOutcomeUnknown {
            operation,
            detail,
            source: None,
        }
    } else {
        ProviderError::Transient {
            operation,
            detail,
            source: None,
        }
    }
}

/// Classifies a failure below HTTP: connect errors are safe to retry; anything after the request
/// was sent leaves a create's outcome unknown.
pub(crate) fn classify_transport(operation: Operation, error: reqwest::Error) -> ProviderError {
    let error = error.without_url();
    if error.is_builder() {
        return ProviderError::Config {
            message: format!("cannot build the {operation} request: {error}"),
        };
    }
    let connect = error.is_connect();
    let message = if connect {
        "connection failed before the request was sent"
    } else if error.is_timeout() {
        "timed out waiting for the response"
    } else if error.is_body() || error.is_decode() {
        "the response body broke off"
    } else {
        "the connection closed or reset without a response"
    };
    let detail = ErrorDetail {
        message: message.to_owned(),
        attempts: 1,
        ..ErrorDetail::default()
    };
    if operation.creates_runs() && !connect {
        ProviderError::SubmitOutcomeUnknown {
            operation,
            detail,
            source: Some(error),
        }
    } else {
        ProviderError::Transient {
            operation,
            detail,
            source: Some(error),
        }
    }
}

/// The error for a run that ended without success (`failed` or `cancelled`).
pub(crate) fn classify_run_end(run: &Run) -> ProviderError {
    let failure = run.failure.clone().unwrap_or_default();
    let kind = if run.status == RunStatus::Cancelled {
        RunFailureKind::Cancelled
    } else if failure.is_moderation() {
        RunFailureKind::Moderation
    } else {
        RunFailureKind::Provider
    };
    ProviderError::RunFailed {
        run_id: run.id.clone(),
        status: run.status.clone(),
        kind,
        failure,
    }
}

fn non_json_summary(headers: &HeaderMap, body: &[u8]) -> String {
    let content_type = headers
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("no content type");
    format!("non-JSON body ({content_type}, {} bytes)", body.len())
}

/// Clamps a Retry-After to [1 s, 10 min].
pub(crate) fn clamp_retry_after(delay: Duration) -> Duration {
    delay.clamp(Duration::from_secs(1), Duration::from_secs(600))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorClass;
    use reqwest::header::HeaderValue;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(
                reqwest::header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    fn class_of(operation: Operation, status: u16, body: &str) -> ErrorClass {
        let json = headers(&[("content-type", "application/json")]);
        classify_response(
            operation,
            StatusCode::from_u16(status).unwrap(),
            &json,
            body.as_bytes(),
            Some("r1"),
        )
        .class()
    }

    #[test]
    fn http_answers_classify_per_the_table() {
        use ErrorClass::*;
        use Operation::*;
        let json = r#"{"code":"X","message":"m","errors":null}"#;
        let html = "<html><body>502 Bad Gateway</body></html>";
        let table: &[(Operation, u16, &str, ErrorClass)] = &[
            (Create, 400, json, Permanent),
            (
                Create,
                401,
                r#"{"code":"UNAUTHORIZED","message":"no"}"#,
                Permanent,
            ),
            (Create, 403, json, Permanent),
            (
                Create,
                404,
                r#"{"code":"NOT_FOUND","message":"no model"}"#,
                Permanent,
            ),
            (Create, 422, json, Permanent),
            (
                Create,
                402,
                r#"{"code":"INSUFFICIENT_CREDIT","message":"top up"}"#,
                Account,
            ),
            (
                Create,
                429,
                r#"{"code":"INSUFFICIENT_CREDIT","message":"kling puts billing on 429"}"#,
                Account,
            ),
            (
                Create,
                429,
                r#"{"code":"RATE_LIMITED","message":"slow down"}"#,
                Transient,
            ),
            (Create, 429, "", Transient),
            (
                Create,
                500,
                r#"{"code":"INTERNAL_ERROR","message":"oops"}"#,
                Transient,
            ),
            (
                Create,
                503,
                r#"{"code":"MODEL_UNAVAILABLE","message":"down"}"#,
                Transient,
            ),
            (Create, 500, html, SubmitOutcomeUnknown),
            (Create, 503, html, SubmitOutcomeUnknown),
            (Create, 502, html, SubmitOutcomeUnknown),
            (Create, 504, html, SubmitOutcomeUnknown),
            (
                Create,
                504,
                r#"{"code":"PROVIDER_TIMEOUT","message":"slow"}"#,
                SubmitOutcomeUnknown,
            ),
            (
                Create,
                409,
                r#"{"code":"CONFLICT","message":"race"}"#,
                SubmitOutcomeUnknown,
            ),
            (Create, 302, "", SubmitOutcomeUnknown),
            (
                SyncRun,
                422,
                r#"{"code":"CONTENT_POLICY_VIOLATION","message":"flagged"}"#,
                Permanent,
            ),
            (SyncRun, 502, html, SubmitOutcomeUnknown),
            (
                SyncRun,
                503,
                r#"{"code":"MODEL_UNAVAILABLE","message":"down"}"#,
                Transient,
            ),
            (
                GetRun,
                404,
                r#"{"code":"RUN_NOT_FOUND","message":"no"}"#,
                NeedsReconciliation,
            ),
            (GetRun, 502, html, Transient),
            (GetRun, 504, html, Transient),
            (GetRun, 409, json, Transient),
            (GetRun, 401, json, Permanent),
            (ListRuns, 404, json, Permanent),
            (ListRuns, 500, html, Transient),
        ];
        for (operation, status, body, expected) in table {
            assert_eq!(
                class_of(*operation, *status, body),
                *expected,
                "{operation} {status} {body}"
            );
        }
    }

    #[test]
    fn errors_carry_code_message_fields_and_retry_after() {
        let body = br#"{"code":"VALIDATION_ERROR","message":"Input validation failed.",
            "errors":[{"loc":["input","multi_prompt",0,"duration"],"msg":"bad duration","type":"value_error"}]}"#;
        let error = classify_response(
            Operation::Create,
            StatusCode::UNPROCESSABLE_ENTITY,
            &HeaderMap::new(),
            body,
            None,
        );
        assert_eq!(error.code(), Some("VALIDATION_ERROR"));
        assert_eq!(error.status(), Some(422));
        assert_eq!(error.field_errors().len(), 1);
        assert_eq!(
            error.field_errors()[0].path,
            "input.multi_prompt[0].duration"
        );
        assert_eq!(error.field_errors()[0].rule, "value_error");
        assert!(error.is_client_fault());
        assert!(error.to_string().contains("bad duration"), "{error}");

        let error = classify_response(
            Operation::Create,
            StatusCode::TOO_MANY_REQUESTS,
            &headers(&[("retry-after", "7")]),
            br#"{"code":"RATE_LIMITED","message":"Rate limit exceeded: x"}"#,
            None,
        );
        assert_eq!(error.retry_after(), Some(Duration::from_secs(7)));
        assert_eq!(error.code(), Some("RATE_LIMITED"));

        let error = classify_response(
            Operation::Create,
            StatusCode::TOO_MANY_REQUESTS,
            &headers(&[(
                "retry-after",
                &httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(90)),
            )]),
            b"",
            None,
        );
        let retry_after = error.retry_after().unwrap();
        assert!(
            retry_after > Duration::from_secs(85) && retry_after <= Duration::from_secs(90),
            "{retry_after:?}"
        );

        // fal-style bodies and the SDK's nested error object.
        let error = classify_response(
            Operation::Create,
            StatusCode::UNPROCESSABLE_ENTITY,
            &HeaderMap::new(),
            br#"{"detail":[{"loc":["body","prompt"],"msg":"The content was flagged by a content checker.","type":"content_policy_violation"}]}"#,
            None,
        );
        assert_eq!(error.field_errors()[0].rule, "content_policy_violation");
        let envelope =
            parse_envelope(br#"{"error":{"code":"PERMISSION_DENIED","message":"nope"}}"#);
        assert_eq!(envelope.code.as_deref(), Some("PERMISSION_DENIED"));
        assert_eq!(envelope.message.as_deref(), Some("nope"));
        assert!(!parse_envelope(b"<html></html>").is_json);
    }

    #[test]
    fn run_endings_classify_by_failure() {
        let run = |status: &str, failure: serde_json::Value| {
            let mut value = serde_json::json!({"id": "r1", "status_code": status});
            value
                .as_object_mut()
                .unwrap()
                .extend(failure.as_object().unwrap().clone());
            crate::run::parse_run(&value).unwrap()
        };
        let moderation = classify_run_end(&run(
            "failed",
            serde_json::json!({"failure_code": "CONTENT_POLICY_VIOLATION"}),
        ));
        assert_eq!(moderation.class(), ErrorClass::Permanent);
        assert_eq!(moderation.code(), Some("CONTENT_POLICY_VIOLATION"));
        let flagged = classify_run_end(&run(
            "failed",
            serde_json::json!({"error": {"message": "triggered content risk control"}}),
        ));
        assert_eq!(flagged.class(), ErrorClass::Permanent);
        let timeout = classify_run_end(&run(
            "failed",
            serde_json::json!({"failure_code": "PROVIDER_TIMEOUT", "failure_stage_code": "dispatch"}),
        ));
        assert_eq!(timeout.class(), ErrorClass::GenerationFailed);
        assert!(!timeout.cost_committed());
        let cancelled = classify_run_end(&run("cancelled", serde_json::json!({})));
        assert_eq!(cancelled.class(), ErrorClass::Permanent);
        assert_eq!(cancelled.code(), Some("RUN_CANCELLED"));
    }

    /// A server that reads one request and then closes without answering.
    async fn closing_server() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let mut buffer = [0u8; 4096];
                let _ = socket.read(&mut buffer).await;
                let _ = socket.shutdown().await;
            }
        });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn transport_failures_classify_by_whether_anything_was_sent() {
        let http = reqwest::Client::new();
        // Nothing listens on a port whose listener was dropped: connect refused, nothing sent.
        let refused = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}", listener.local_addr().unwrap())
        };
        let error = http.post(&refused).send().await.unwrap_err();
        assert_eq!(
            classify_transport(Operation::Create, error).class(),
            ErrorClass::Transient
        );

        let closing = closing_server().await;
        let error = http.post(&closing).body("{}").send().await.unwrap_err();
        let create = classify_transport(Operation::Create, error);
        assert_eq!(create.class(), ErrorClass::SubmitOutcomeUnknown);
        assert!(create.cost_committed());
        let error = http.get(&closing).send().await.unwrap_err();
        assert_eq!(
            classify_transport(Operation::GetRun, error).class(),
            ErrorClass::Transient
        );

        // A timeout after the request was sent.
        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let silent_url = format!("http://{}", silent.local_addr().unwrap());
        let error = http
            .post(&silent_url)
            .timeout(Duration::from_millis(50))
            .body("{}")
            .send()
            .await
            .unwrap_err();
        let create = classify_transport(Operation::SyncRun, error);
        assert_eq!(create.class(), ErrorClass::SubmitOutcomeUnknown);
        assert!(create.to_string().contains("timed out"), "{create}");
        assert!(
            !create.to_string().contains("127.0.0.1"),
            "no URL in messages: {create}"
        );
        drop(silent);
    }
}
