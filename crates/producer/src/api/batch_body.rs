//! `POST /v1/batches` bodies, read in memory bounded by the body itself.
//!
//! The body is scanned without building it: first its layout and options, then its entries are
//! counted (a batch over `api.max_batch_jobs` is refused before any entry is parsed), then each
//! entry is parsed and checked on its own and dropped. What outlives one entry is the body, the
//! first [`crate::MAX_ERROR_DETAILS`] errors with the counts, and the position of each valid
//! entry; the jobs themselves are built, a second time, only once the batch is accepted.

use std::fmt;

use klingq_core::urls::MAX_WEBHOOK_URL_BYTES;
use klingq_core::{FieldError, JobSpec};
use serde::Deserialize;
use serde::de::{self, Deserializer as _, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::api::error::ApiError;
use crate::error::{BatchErrors, CappedErrors, ProducerError};
use crate::input::{json_lines_text, parse_job_text, utf8_text};
use crate::producer::{BatchCheck, BatchOptions};
use crate::view::ErrorDetail;

/// How the body is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// An array of jobs, or `{"jobs": [...], "webhook_url", "budget_usd", "partial",
    /// "tenant", "max_failure_rate", "min_finished", "max_failed"}`.
    Json,
    /// One job per line.
    JsonLines,
}

/// The options the body's object form gives.
#[derive(Debug, Default)]
pub(crate) struct BodyOptions {
    pub(crate) webhook_url: Option<String>,
    pub(crate) budget_usd: Option<f64>,
    pub(crate) partial: Option<bool>,
    pub(crate) tenant: Option<String>,
    pub(crate) max_failure_rate: Option<f64>,
    pub(crate) min_finished: Option<u64>,
    pub(crate) max_failed: Option<u64>,
}

/// A batch that may be enqueued: its valid jobs by entry index, the errors of the entries left
/// out (with `partial`), and its options.
pub(crate) struct Checked {
    pub(crate) jobs: Vec<(usize, JobSpec)>,
    pub(crate) rejected: BatchErrors,
    pub(crate) options: BatchOptions,
}

/// The limits a body is checked against.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// `api.max_batch_jobs`.
    pub(crate) max_batch_jobs: usize,
    /// The largest entry, in bytes of JSON: `api.max_job_body_bytes`, as for one job.
    pub(crate) max_entry_bytes: usize,
}

/// Reads and checks a batch body. `options` turns the body's options into the batch's (and
/// checks them against the query string's) before any entry is looked at. CPU-bound: run it
/// off the async threads.
pub(crate) fn check(
    body: &[u8],
    format: Format,
    limits: Limits,
    options: impl FnOnce(BodyOptions) -> Result<BatchOptions, ApiError>,
) -> Result<Checked, ApiError> {
    let (entries, body_options) = match format {
        Format::Json => layout(body)?,
        Format::JsonLines => {
            let text = utf8_text(body).map_err(|error| {
                let mut detail = ErrorDetail::new(error.field_error());
                detail.line = Some(error.line);
                ApiError {
                    details: vec![detail],
                    total_details: 1,
                    ..ApiError::new(
                        http::StatusCode::BAD_REQUEST,
                        "bad_request",
                        format!("the body is not UTF-8: {error}"),
                    )
                }
            })?;
            (Entries::Lines(text), BodyOptions::default())
        }
    };
    let options = options(body_options)?;

    let mut check = BatchCheck::new(limits.max_batch_jobs).with_tenant(options.tenant.as_deref());
    // Positions of the valid entries; the jobs are built again if the batch is accepted.
    let mut valid: Vec<(usize, &str)> = Vec::new();
    let count = entries.count()?;
    if count > limits.max_batch_jobs {
        check.skip(count);
    } else {
        entries.for_each(|text, line| {
            let checked = check.check_parsed(parse_job_text(text, limits.max_entry_bytes), line);
            if check.has_invalid() && !options.partial {
                // The batch is refused: only the errors (capped) and counts go on.
                valid = Vec::new();
            } else if let Some((index, _)) = checked {
                valid.push((index, text));
            }
        })?;
    }
    let rejected = check
        .finish(&options)
        .map_err(|errors| ApiError::from(ProducerError::InvalidBatch(errors)))?;
    let jobs = valid
        .into_iter()
        .map(|(index, text)| parse_job_text(text, limits.max_entry_bytes).map(|job| (index, job)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(ApiError::from_validation)?;
    Ok(Checked {
        jobs,
        rejected,
        options,
    })
}

/// Where a body's entries are: the text of a JSON array, or JSON Lines.
enum Entries<'a> {
    Array(&'a str),
    Lines(&'a str),
}

impl<'a> Entries<'a> {
    /// Entries, counted without parsing them.
    fn count(&self) -> Result<usize, ApiError> {
        match self {
            Entries::Array(_) => {
                let mut count = 0;
                self.for_each(|_, _| count += 1)?;
                Ok(count)
            }
            Entries::Lines(text) => Ok(json_lines_text(text).count()),
        }
    }

    /// Calls `each` with every entry's JSON text, in order, and its line in JSON Lines.
    fn for_each(&self, mut each: impl FnMut(&'a str, Option<u64>)) -> Result<(), ApiError> {
        match self {
            Entries::Array(text) => serde_json::Deserializer::from_str(text)
                .deserialize_seq(EachEntry(|entry: &'a str| each(entry, None)))
                .map_err(|error| ApiError::bad_json(&error)),
            Entries::Lines(text) => {
                for (line, entry) in json_lines_text(text) {
                    each(entry, Some(line));
                }
                Ok(())
            }
        }
    }
}

/// Visits a JSON array, handing each element's text (borrowed, unparsed) to the closure.
struct EachEntry<F>(F);

impl<'de, F: FnMut(&'de str)> Visitor<'de> for EachEntry<F> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of jobs")
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        while let Some(entry) = seq.next_element::<&'de RawValue>()? {
            (self.0)(entry.get());
        }
        Ok(())
    }
}

/// The JSON body's layout: an array of jobs, or the object form with its options. Checks the
/// whole body is JSON first (400 otherwise), without building it.
fn layout(body: &[u8]) -> Result<(Entries<'_>, BodyOptions), ApiError> {
    let top: &RawValue = serde_json::from_slice(body).map_err(|e| ApiError::bad_json(&e))?;
    let text = top.get();
    match text.as_bytes().first() {
        Some(b'[') => Ok((Entries::Array(text), BodyOptions::default())),
        Some(b'{') => object_form(text),
        _ => Err(ApiError::field(
            "",
            "type",
            format!(
                "must be an array of jobs or an object with `jobs`, got {}",
                raw_kind(text)
            ),
        )),
    }
}

/// The object form: `jobs` (an array) and the options, each checked for its type.
fn object_form(text: &str) -> Result<(Entries<'_>, BodyOptions), ApiError> {
    let parts = serde_json::Deserializer::from_str(text)
        .deserialize_map(ObjectVisitor)
        .map_err(|error| ApiError::bad_json(&error))?;
    let mut errors = parts.errors;
    let push = |errors: &mut CappedErrors, path: &str, rule: &str, message: &str| {
        errors.push(ErrorDetail::new(FieldError::new(path, rule, message)));
    };
    let jobs = match parts.jobs {
        None => {
            push(
                &mut errors,
                "jobs",
                "required",
                "is required: the batch's jobs",
            );
            None
        }
        Some(jobs) if jobs.get().starts_with('[') => Some(jobs.get()),
        Some(_) => {
            push(&mut errors, "jobs", "type", "must be an array of jobs");
            None
        }
    };
    let mut options = BodyOptions::default();
    // Options are parsed only when short enough to be valid: a huge value costs nothing.
    match parts.webhook_url.map(RawValue::get) {
        None | Some("null") => {}
        Some(raw) if raw.len() > 6 * MAX_WEBHOOK_URL_BYTES + 2 => push(
            &mut errors,
            "webhook_url",
            "max_length",
            &format!(
                "must be at most {MAX_WEBHOOK_URL_BYTES} bytes, got {} bytes of JSON",
                raw.len()
            ),
        ),
        Some(raw) => match serde_json::from_str::<Value>(raw) {
            Ok(Value::String(url)) => options.webhook_url = Some(url),
            _ => push(&mut errors, "webhook_url", "type", "must be a string"),
        },
    }
    match parts.budget_usd.map(RawValue::get) {
        None | Some("null") => {}
        Some(raw) => match (raw.len() <= 64)
            .then(|| serde_json::from_str::<Value>(raw).ok())
            .flatten()
        {
            Some(Value::Number(number)) => options.budget_usd = number.as_f64(),
            _ => push(&mut errors, "budget_usd", "type", "must be a number"),
        },
    }
    match parts.partial.map(RawValue::get) {
        None | Some("null") => {}
        Some("true") => options.partial = Some(true),
        Some("false") => options.partial = Some(false),
        Some(_) => push(&mut errors, "partial", "type", "must be true or false"),
    }
    match parts.tenant.map(RawValue::get) {
        None | Some("null") => {}
        Some(raw) => match (raw.len() <= 512)
            .then(|| serde_json::from_str::<Value>(raw).ok())
            .flatten()
        {
            Some(Value::String(name)) => options.tenant = Some(name),
            _ => push(&mut errors, "tenant", "type", "must be a string"),
        },
    }
    let number = |raw: Option<&RawValue>| match raw.map(RawValue::get) {
        None | Some("null") => Ok(None),
        Some(raw) => match (raw.len() <= 64)
            .then(|| serde_json::from_str::<Value>(raw).ok())
            .flatten()
        {
            Some(Value::Number(number)) => Ok(Some(number)),
            _ => Err(()),
        },
    };
    match number(parts.max_failure_rate) {
        Ok(rate) => options.max_failure_rate = rate.and_then(|n| n.as_f64()),
        Err(()) => push(&mut errors, "max_failure_rate", "type", "must be a number"),
    }
    for (name, raw, slot) in [
        (
            "min_finished",
            parts.min_finished,
            &mut options.min_finished,
        ),
        ("max_failed", parts.max_failed, &mut options.max_failed),
    ] {
        match number(raw) {
            Ok(None) => {}
            Ok(Some(n)) => match n.as_u64().or_else(|| {
                n.as_f64()
                    .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < 1e15)
                    .map(|f| f as u64)
            }) {
                Some(n) => *slot = Some(n),
                None => push(
                    &mut errors,
                    name,
                    "type",
                    "must be a whole number, 0 or more",
                ),
            },
            Err(()) => push(&mut errors, name, "type", "must be a whole number"),
        }
    }
    if !errors.is_empty() {
        let n_errors = errors.total();
        let summary = format!(
            "{n_errors} validation error{}",
            if n_errors == 1 { "" } else { "s" }
        );
        return Err(ApiError::from_capped(summary, errors));
    }
    Ok((Entries::Array(jobs.unwrap_or("[]")), options))
}

/// The parts of the object form, unparsed, and the errors of its keys.
#[derive(Default)]
struct ObjectParts<'a> {
    jobs: Option<&'a RawValue>,
    webhook_url: Option<&'a RawValue>,
    budget_usd: Option<&'a RawValue>,
    partial: Option<&'a RawValue>,
    tenant: Option<&'a RawValue>,
    max_failure_rate: Option<&'a RawValue>,
    min_finished: Option<&'a RawValue>,
    max_failed: Option<&'a RawValue>,
    errors: CappedErrors,
}

struct ObjectVisitor;

impl<'de> Visitor<'de> for ObjectVisitor {
    type Value = ObjectParts<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object with `jobs`")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ObjectParts<'de>, A::Error> {
        let mut parts = ObjectParts::default();
        while let Some(key) = map.next_key::<Key>()? {
            let (name, slot) = match key {
                Key::Jobs => ("jobs", &mut parts.jobs),
                Key::WebhookUrl => ("webhook_url", &mut parts.webhook_url),
                Key::BudgetUsd => ("budget_usd", &mut parts.budget_usd),
                Key::Partial => ("partial", &mut parts.partial),
                Key::Tenant => ("tenant", &mut parts.tenant),
                Key::MaxFailureRate => ("max_failure_rate", &mut parts.max_failure_rate),
                Key::MinFinished => ("min_finished", &mut parts.min_finished),
                Key::MaxFailed => ("max_failed", &mut parts.max_failed),
                Key::Other(name) => {
                    map.next_value::<IgnoredAny>()?;
                    parts.errors.push(ErrorDetail::new(FieldError::new(
                        name,
                        "unknown_field",
                        "is not a field of a batch; known fields: jobs, webhook_url, \
                         budget_usd, partial, tenant, max_failure_rate, min_finished, \
                         max_failed",
                    )));
                    continue;
                }
            };
            let value = map.next_value::<&'de RawValue>()?;
            if slot.replace(value).is_some() {
                parts.errors.push(ErrorDetail::new(FieldError::new(
                    name,
                    "exclusive",
                    "is given more than once",
                )));
            }
        }
        Ok(parts)
    }
}

/// A key of the object form, read without keeping it unless it is unknown (then at most 100
/// characters of it, for the error).
enum Key {
    Jobs,
    WebhookUrl,
    BudgetUsd,
    Partial,
    Tenant,
    MaxFailureRate,
    MinFinished,
    MaxFailed,
    Other(String),
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;

        impl Visitor<'_> for KeyVisitor {
            type Value = Key;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a field name")
            }

            fn visit_str<E: de::Error>(self, key: &str) -> Result<Key, E> {
                Ok(match key {
                    "jobs" => Key::Jobs,
                    "webhook_url" => Key::WebhookUrl,
                    "budget_usd" => Key::BudgetUsd,
                    "partial" => Key::Partial,
                    "tenant" => Key::Tenant,
                    "max_failure_rate" => Key::MaxFailureRate,
                    "min_finished" => Key::MinFinished,
                    "max_failed" => Key::MaxFailed,
                    other => Key::Other(other.chars().take(100).collect()),
                })
            }
        }

        deserializer.deserialize_str(KeyVisitor)
    }
}

/// What a JSON text is, from its first character.
fn raw_kind(text: &str) -> &'static str {
    match text.as_bytes().first() {
        Some(b'"') => "a string",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        Some(b'{') => "an object",
        Some(b'[') => "an array",
        _ => "a number",
    }
}
