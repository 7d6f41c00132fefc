//! The payload schemas in docs/schemas/ against payloads built from klingq-core types: a
//! strict validator (a property the schema does not declare is an error), a coverage check (a
//! property the schema declares must appear in the fullest payload), and snapshots of the
//! example payloads in docs/schemas/examples/. Any drift between the types and the files fails.

use std::collections::BTreeMap;
use std::path::PathBuf;

use klingq_core::{
    CompletionEvent, EventType, JobError, JobEventData, JobId, JobState, StoredVideo,
};
use klingq_events::{BatchCompletedData, BatchPausedData};
use serde_json::{Value, json};

/// Keywords the validator understands; a schema using another one fails the test, so the
/// files never claim a constraint nobody checks.
const KEYWORDS: &[&str] = &[
    "$schema",
    "$id",
    "$defs",
    "$ref",
    "title",
    "description",
    "type",
    "const",
    "enum",
    "properties",
    "required",
    "items",
    "additionalProperties",
    "format",
    "minimum",
];

pub(crate) fn schemas_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/schemas")
}

pub(crate) fn load_schema(event_type: &str) -> Value {
    let path = schemas_dir().join(format!("{event_type}.schema.json"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|error| panic!("reading {}: {error}", path.display()));
    serde_json::from_str(&text)
        .unwrap_or_else(|error| panic!("parsing {}: {error}", path.display()))
}

/// Validates `instance` against `schema` (whose `$ref`s resolve in `root`), strictly: objects
/// with declared properties may carry no others. Returns every violation with its path.
pub(crate) fn validate(root: &Value, schema: &Value, instance: &Value, path: &str) -> Vec<String> {
    let mut errors = Vec::new();
    let Value::Object(keywords) = schema else {
        return vec![format!("{path}: schema is not an object")];
    };
    for key in keywords.keys() {
        assert!(
            KEYWORDS.contains(&key.as_str()),
            "unsupported schema keyword {key} at {path}"
        );
    }
    if let Some(reference) = keywords.get("$ref").and_then(Value::as_str) {
        let name = reference
            .strip_prefix("#/$defs/")
            .unwrap_or_else(|| panic!("unsupported $ref {reference}"));
        let target = &root["$defs"][name];
        assert!(!target.is_null(), "dangling $ref {reference}");
        return validate(root, target, instance, path);
    }
    if let Some(expected) = keywords.get("type").and_then(Value::as_str) {
        let ok = match expected {
            "object" => instance.is_object(),
            "array" => instance.is_array(),
            "string" => instance.is_string(),
            "boolean" => instance.is_boolean(),
            "number" => instance.is_number(),
            "integer" => instance.is_i64() || instance.is_u64(),
            other => panic!("unsupported type {other}"),
        };
        if !ok {
            errors.push(format!("{path}: expected {expected}, got {instance}"));
            return errors;
        }
    }
    if let Some(expected) = keywords.get("const")
        && instance != expected
    {
        errors.push(format!("{path}: expected {expected}, got {instance}"));
    }
    if let Some(Value::Array(options)) = keywords.get("enum")
        && !options.contains(instance)
    {
        errors.push(format!("{path}: {instance} is not one of {options:?}"));
    }
    if let Some(minimum) = keywords.get("minimum").and_then(Value::as_f64)
        && instance.as_f64().is_some_and(|n| n < minimum)
    {
        errors.push(format!("{path}: {instance} is below {minimum}"));
    }
    if let (Some(format), Some(text)) = (
        keywords.get("format").and_then(Value::as_str),
        instance.as_str(),
    ) {
        let ok = match format {
            "date-time" => {
                time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
                    .is_ok()
            }
            "uuid" => text.parse::<JobId>().is_ok(),
            other => panic!("unsupported format {other}"),
        };
        if !ok {
            errors.push(format!("{path}: {text:?} is not a {format}"));
        }
    }
    if let Value::Object(object) = instance {
        for required in keywords
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let name = required.as_str().expect("required names are strings");
            if !object.contains_key(name) {
                errors.push(format!("{path}: missing required {name}"));
            }
        }
        let properties = keywords.get("properties").and_then(Value::as_object);
        for (name, value) in object {
            let child = format!("{path}.{name}");
            match (
                properties.and_then(|p| p.get(name)),
                keywords.get("additionalProperties"),
            ) {
                (Some(property), _) => errors.extend(validate(root, property, value, &child)),
                (None, Some(additional @ Value::Object(_))) => {
                    errors.extend(validate(root, additional, value, &child));
                }
                (None, _) if properties.is_some() => {
                    errors.push(format!("{child}: not declared in the schema"));
                }
                (None, _) => {}
            }
        }
    }
    if let (Some(items), Value::Array(array)) = (keywords.get("items"), instance) {
        for (index, item) in array.iter().enumerate() {
            errors.extend(validate(root, items, item, &format!("{path}[{index}]")));
        }
    }
    errors
}

/// Declared properties (following `$ref`s) that `instance` does not carry.
fn uncovered(root: &Value, schema: &Value, instance: &Value, path: &str) -> Vec<String> {
    if let Some(reference) = schema.get("$ref").and_then(Value::as_str) {
        let name = reference.trim_start_matches("#/$defs/");
        return uncovered(root, &root["$defs"][name], instance, path);
    }
    let mut missing = Vec::new();
    if let (Some(properties), Value::Object(object)) = (
        schema.get("properties").and_then(Value::as_object),
        instance,
    ) {
        for (name, property) in properties {
            let child = format!("{path}.{name}");
            match object.get(name) {
                Some(value) => missing.extend(uncovered(root, property, value, &child)),
                None => missing.push(child),
            }
        }
    }
    missing
}

/// Asserts that `body` validates strictly against its type's schema file.
pub(crate) fn assert_valid(event_type: &str, body: &Value) {
    let schema = load_schema(event_type);
    let errors = validate(&schema, &schema, body, "$");
    assert!(
        errors.is_empty(),
        "{event_type} body {body} violates its schema: {errors:#?}"
    );
}

fn job_id(n: u8) -> JobId {
    format!("01936f6e-1234-7abc-8def-0123456789{n:02x}")
        .parse()
        .unwrap()
}

fn video() -> StoredVideo {
    StoredVideo {
        bucket: "videos".into(),
        key: "2026/11/24/01936f6e-1234-7abc-8def-012345678901.mp4".into(),
        url: "https://s3.example.com/videos/2026/11/24/01936f6e-1234-7abc-8def-012345678901.mp4?X-Amz-Signature=…".into(),
        size: 7_340_032,
        sha256: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into(),
        content_type: "video/mp4".into(),
    }
}

fn job_error(code: &str, cost_committed: bool) -> JobError {
    JobError {
        step: if code == "CANCELLED" {
            "generate"
        } else {
            "submit"
        }
        .into(),
        code: code.into(),
        message: match code {
            "CANCELLED" => {
                "user asked; the provider run was already created, so its cost is committed"
            }
            _ => "the prompt was flagged by the provider's content policy",
        }
        .into(),
        details: if code == "CANCELLED" {
            vec![]
        } else {
            vec![json!({"field": "prompt", "reason": "flagged"})]
        },
        cost_committed,
    }
}

/// A completion event with every field of its data set: the fullest body of the type.
fn fullest(event_type: EventType, state: JobState) -> CompletionEvent {
    CompletionEvent {
        id: format!("evt_{}_0", job_id(1)),
        event_type,
        timestamp: "2026-11-24T10:15:30.250Z".into(),
        data: JobEventData {
            job_id: job_id(1),
            batch_id: Some(job_id(2)),
            state,
            metadata: Some(json!({"customer": "c_42", "scene": 7})),
            video: Some(video()),
            duration_seconds: Some(5),
            provider_run_id: Some("run_8f2c".into()),
            cost_usd: Some(0.7),
            error: Some(job_error("CONTENT_POLICY_VIOLATION", false)),
        },
    }
}

/// A webhook body in wire order, for examples whose data has no core event type.
#[derive(serde::Serialize)]
struct Body<T> {
    id: String,
    #[serde(rename = "type")]
    event_type: &'static str,
    timestamp: &'static str,
    data: T,
}

/// The example payloads published in docs/schemas/examples/, built from core types and
/// rendered in wire order.
fn examples() -> BTreeMap<&'static str, String> {
    let succeeded = CompletionEvent {
        id: format!("evt_{}_0", job_id(1)),
        event_type: EventType::JobSucceeded,
        timestamp: "2026-11-24T10:15:30.250Z".into(),
        data: JobEventData {
            job_id: job_id(1),
            batch_id: Some(job_id(2)),
            state: JobState::Succeeded,
            metadata: Some(json!({"customer": "c_42", "scene": 7})),
            video: Some(video()),
            duration_seconds: Some(5),
            provider_run_id: Some("run_8f2c".into()),
            cost_usd: Some(0.7),
            error: None,
        },
    };
    let failed = CompletionEvent {
        id: format!("evt_{}_0", job_id(3)),
        event_type: EventType::JobFailed,
        timestamp: "2026-11-24T10:16:02.004Z".into(),
        data: JobEventData {
            job_id: job_id(3),
            batch_id: Some(job_id(2)),
            state: JobState::Failed,
            metadata: Some(json!({"customer": "c_42", "scene": 8})),
            video: None,
            duration_seconds: None,
            provider_run_id: None,
            cost_usd: None,
            error: Some(job_error("CONTENT_POLICY_VIOLATION", false)),
        },
    };
    let cancelled = CompletionEvent {
        id: format!("evt_{}_0", job_id(4)),
        event_type: EventType::JobCancelled,
        timestamp: "2026-11-24T10:16:40.100Z".into(),
        data: JobEventData {
            job_id: job_id(4),
            batch_id: None,
            state: JobState::Cancelled,
            metadata: None,
            video: None,
            duration_seconds: None,
            provider_run_id: None,
            cost_usd: None,
            error: Some(job_error("CANCELLED", true)),
        },
    };
    let batch = Body {
        id: format!("evt_batch_{}_0", job_id(2)),
        event_type: "batch.completed",
        timestamp: "2026-11-24T10:16:02.010Z",
        data: BatchCompletedData {
            batch_id: job_id(2).to_string(),
            total: 3,
            counts: [("succeeded".to_owned(), 2), ("failed".to_owned(), 1)].into(),
            estimated_usd: 2.1,
            charged_usd: 1.4,
        },
    };
    let paused = Body {
        id: format!("evt_batch_{}_paused_0", job_id(2)),
        event_type: "batch.paused",
        timestamp: "2026-11-24T10:16:01.500Z",
        data: BatchPausedData {
            batch_id: job_id(2).to_string(),
            reason: "3 jobs failed, more than max_failed 2".into(),
            failed: 3,
            finished: 5,
        },
    };
    let pretty = |value: &dyn erased::Render| value.render();
    BTreeMap::from([
        ("job.succeeded", pretty(&succeeded)),
        ("job.failed", pretty(&failed)),
        ("job.cancelled", pretty(&cancelled)),
        ("batch.completed", pretty(&batch)),
        ("batch.paused", pretty(&paused)),
    ])
}

mod erased {
    //! Pretty JSON of differently typed bodies through one trait object.

    pub(super) trait Render {
        fn render(&self) -> String;
    }

    impl<T: serde::Serialize> Render for T {
        fn render(&self) -> String {
            format!("{}\n", serde_json::to_string_pretty(self).unwrap())
        }
    }
}

#[test]
fn schemas_match_payloads_built_from_core_types() {
    let fullest_bodies = [
        (
            "job.succeeded",
            fullest(EventType::JobSucceeded, JobState::Succeeded),
        ),
        (
            "job.failed",
            fullest(EventType::JobFailed, JobState::Failed),
        ),
        ("job.failed", fullest(EventType::JobFailed, JobState::Dead)),
        (
            "job.cancelled",
            fullest(EventType::JobCancelled, JobState::Cancelled),
        ),
    ];
    for (event_type, event) in fullest_bodies {
        let body = serde_json::to_value(&event).unwrap();
        assert_valid(event_type, &body);
        let schema = load_schema(event_type);
        let missing = uncovered(&schema, &schema, &body, "$");
        assert!(
            missing.is_empty(),
            "{event_type}.schema.json declares properties core never sends: {missing:?}"
        );
        assert_eq!(event.event_type.as_str(), event_type);
    }
    for event_type in ["batch.completed", "batch.paused"] {
        let batch: Value = serde_json::from_str(&examples()[event_type]).unwrap();
        assert_valid(event_type, &batch);
        let schema = load_schema(event_type);
        assert_eq!(
            uncovered(&schema, &schema, &batch, "$"),
            Vec::<String>::new(),
            "{event_type}"
        );
    }
    // Minimal bodies (every optional field absent) validate too.
    let mut minimal = fullest(EventType::JobSucceeded, JobState::Succeeded);
    minimal.data = JobEventData {
        batch_id: None,
        metadata: None,
        video: None,
        duration_seconds: None,
        provider_run_id: None,
        cost_usd: None,
        error: None,
        ..minimal.data
    };
    assert_valid("job.succeeded", &serde_json::to_value(&minimal).unwrap());
    // And the validator does catch drift: an undeclared field, a wrong state.
    let mut drifted = serde_json::to_value(&minimal).unwrap();
    drifted["data"]["new_field"] = json!(1);
    drifted["data"]["state"] = json!("failed");
    let errors = validate(
        &load_schema("job.succeeded"),
        &load_schema("job.succeeded"),
        &drifted,
        "$",
    );
    assert_eq!(errors.len(), 2, "{errors:?}");
}

#[test]
fn example_payloads_are_up_to_date() {
    let dir = schemas_dir().join("examples");
    let update = std::env::var_os("KLINGQ_UPDATE_SNAPSHOTS").is_some();
    for (event_type, rendered) in examples() {
        assert_valid(event_type, &serde_json::from_str(&rendered).unwrap());
        let path = dir.join(format!("{event_type}.json"));
        if update {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, &rendered).unwrap();
            continue;
        }
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        assert_eq!(
            on_disk,
            rendered,
            "{} drifted from the payload built from core types: rerun with KLINGQ_UPDATE_SNAPSHOTS=1 and review the diff",
            path.display()
        );
    }
}
