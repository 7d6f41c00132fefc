//! The schemas of what the API reads (jobs, batches, a re-drive, event cursors), written as
//! JSON Schema 2020-12 because utoipa's builders cannot say `maxContains`, `propertyNames`,
//! `prefixItems` or a recursive value. Each states exactly the rules the parsers enforce
//! (`klingq_core::request`, `klingq_core::urls`, `JobSpec::validate`, `crate::input`), so
//! data valid for the schema is accepted and data invalid for it is refused; Schemathesis
//! checks both ways in CI (`.ci/schemathesis.sh`). Where a rule is stricter here than in the
//! parser, the comment at the rule says so.

use klingq_core::job::MAX_METADATA_BYTES;
use klingq_core::request::{
    DEFAULT_NEGATIVE_PROMPT, MAX_PROMPT_CHARS, MAX_REFERENCE_IMAGES, MAX_SHOTS, MAX_TOTAL_SECONDS,
    MAX_VOICE_IDS, SHOT_TYPE_CUSTOMIZE, VideoDuration,
};
use klingq_core::urls::{MAX_DATA_URL_BYTES, MAX_MEDIA_URL_BYTES, MAX_WEBHOOK_URL_BYTES};
use serde_json::{Map, Value, json};

use crate::api::handlers::MAX_REDRIVE_IDS;

/// Control characters but newline and tab (what free text may not hold, rule `control_char`).
const TEXT_CHAR: &str = "[^\\u0000-\\u0008\\u000B-\\u001F\\u007F-\\u009F]";
/// No control character at all (identifiers and keys).
const KEY_CHAR: &str = "[^\\u0000-\\u001F\\u007F-\\u009F]";
/// Neither a control character nor white space as Rust's `str::trim` sees it: a text made of
/// white space only is empty (rule `required`).
const SOLID_CHAR: &str =
    "[^\\u0000-\\u0020\\u007F-\\u00A0\\u1680\\u2000-\\u200A\\u2028\\u2029\\u202F\\u205F\\u3000]";
/// White space as Rust's `str::trim` sees it (the Unicode `White_Space` property).
const SPACE_CHAR: &str =
    "[\\t\\n\\u000B\\f\\r \\u0085\\u00A0\\u1680\\u2000-\\u200A\\u2028\\u2029\\u202F\\u205F\\u3000]";

/// An http(s) URL. The parser accepts whatever the WHATWG URL parser reads with a host an HTTP
/// request can carry (`klingq_core::urls`); that cannot be said in a pattern, so the schema
/// states a stricter form every such parser reads the same way: a DNS name whose last label
/// starts with a letter (no IP literal, no userinfo, no punycode), an optional port, and a
/// path of URL characters that are never percent-encoded (so the length is the same once
/// encoded).
fn http_url_pattern() -> String {
    let label = "[A-Za-z0-9]+(-[A-Za-z0-9]+)*";
    let last_label = "[A-Za-z][A-Za-z0-9]*(-[A-Za-z0-9]+)*";
    format!(
        "^[hH][tT][tT][pP][sS]?://({label}\\.)*{last_label}(:[0-9]{{1,4}})?\
         /[A-Za-z0-9._~!$&()*+,;=:@/%?-]*$"
    )
}

/// A `data:` URI: printable ASCII but space, with a comma before the payload. (The parser
/// also takes non-ASCII characters; the schema keeps to ASCII so length in characters is
/// length in bytes.)
const DATA_URL_PATTERN: &str = "^[dD][aA][tT][aA]:[!-~]*,[!-~]*$";

fn http_url(max_bytes: usize, description: &str) -> Value {
    json!({
        "type": "string",
        "pattern": http_url_pattern(),
        "maxLength": max_bytes,
        "description": description,
    })
}

/// An image or video: an http(s) URL or a `data:` URI.
fn media_url(description: &str) -> Value {
    json!({
        "anyOf": [
            http_url(MAX_MEDIA_URL_BYTES, "An http(s) URL."),
            {
                "type": "string",
                "pattern": DATA_URL_PATTERN,
                "maxLength": MAX_DATA_URL_BYTES,
                "description": "A data: URI, `data:[type][;base64],payload`.",
            },
        ],
        "description": format!(
            "{description} An http(s) URL (at most {MAX_MEDIA_URL_BYTES} bytes) or a data: URI \
             (at most {MAX_DATA_URL_BYTES} bytes; the body limit `api.max_job_body_bytes` may \
             be lower)."
        ),
    })
}

fn or_null(schema: Value) -> Value {
    json!({"anyOf": [schema, {"type": "null"}]})
}

/// A prompt: 1 to [`MAX_PROMPT_CHARS`] characters, not only white space, no control character
/// but newline and tab.
fn prompt(description: &str) -> Value {
    json!({
        "type": "string",
        "maxLength": MAX_PROMPT_CHARS,
        "pattern": format!("^{TEXT_CHAR}*{SOLID_CHAR}{TEXT_CHAR}*$"),
        "description": description,
    })
}

/// The numbers `low..=high` as the parser reads a duration string: trimmed, then a `u32`
/// (an optional `+`, leading zeros).
fn duration_string_pattern(low: u32, high: u32) -> String {
    let numbers: Vec<String> = (low..=high).map(|n| n.to_string()).collect();
    format!("^{SPACE_CHAR}*\\+?0*({}){SPACE_CHAR}*$", numbers.join("|"))
}

/// A duration of `low..=high` seconds: a string or an integer; absent or null means 5 s,
/// which is allowed only when 5 is in the range.
fn duration(low: u32, high: u32) -> Value {
    let mut options = vec![
        json!({"type": "string", "pattern": duration_string_pattern(low, high)}),
        json!({"type": "integer", "minimum": low, "maximum": high}),
    ];
    if (low..=high).contains(&VideoDuration::DEFAULT.seconds()) {
        options.push(json!({"type": "null"}));
    }
    json!({"anyOf": options})
}

const MIN_SECONDS: u32 = VideoDuration::MIN_SECONDS as u32;
const MAX_SECONDS: u32 = VideoDuration::MAX_SECONDS as u32;

/// A shot whose duration is `low..=high` seconds.
fn shot(low: u32, high: u32) -> Value {
    let mut required = vec!["prompt"];
    if !(low..=high).contains(&VideoDuration::DEFAULT.seconds()) {
        required.push("duration");
    }
    json!({
        "type": "object",
        "additionalProperties": false,
        "properties": {
            "prompt": prompt("What happens in this shot."),
            "duration": duration(low, high),
        },
        "required": required,
    })
}

/// Every list of shots whose durations add up to at most [`MAX_TOTAL_SECONDS`]: for each
/// number of shots, each choice of the first shots' durations, and the range left for the
/// last. (More than five shots cannot fit: each is at least 3 s.)
fn multi_prompt() -> Value {
    let mut options = Vec::new();
    for n_shots in 1..=MAX_SHOTS as u32 {
        let mut prefixes: Vec<Vec<u32>> = vec![Vec::new()];
        for _ in 1..n_shots {
            prefixes = prefixes
                .into_iter()
                .flat_map(|prefix| {
                    (MIN_SECONDS..=MAX_SECONDS).map(move |seconds| {
                        let mut next = prefix.clone();
                        next.push(seconds);
                        next
                    })
                })
                .collect();
        }
        for prefix in prefixes {
            let used: u32 = prefix.iter().sum();
            let room = MAX_TOTAL_SECONDS.saturating_sub(used).min(MAX_SECONDS);
            if room < MIN_SECONDS {
                continue;
            }
            let mut items: Vec<Value> = prefix.iter().map(|&s| shot(s, s)).collect();
            items.push(shot(MIN_SECONDS, room));
            options.push(json!({
                "prefixItems": items,
                "items": false,
                "minItems": n_shots,
            }));
        }
    }
    json!({
        "type": "array",
        "minItems": 1,
        "maxItems": MAX_SHOTS,
        "anyOf": options,
        "description": format!(
            "Shots of a multi-shot video, 1 to {MAX_SHOTS}, their durations adding up to at \
             most {MAX_TOTAL_SECONDS} s (each 3 to 15 s, default 5): `anyOf` lists every \
             combination."
        ),
    })
}

fn image_element() -> Value {
    json!({
        "type": "object",
        "additionalProperties": false,
        "properties": {
            "frontal_image_url": media_url("The element's frontal image."),
            "reference_image_urls": {
                "type": "array",
                "items": media_url("A reference image."),
                "minItems": 1,
                "maxItems": MAX_REFERENCE_IMAGES,
            },
            "video_url": {"type": "null"},
        },
        "required": ["frontal_image_url", "reference_image_urls"],
        "description": format!(
            "An image element: a frontal image and 1 to {MAX_REFERENCE_IMAGES} reference images."
        ),
    })
}

fn video_element() -> Value {
    json!({
        "type": "object",
        "additionalProperties": false,
        "properties": {
            "video_url": media_url("The element's video."),
            "frontal_image_url": {"type": "null"},
            "reference_image_urls": {"type": "null"},
        },
        "required": ["video_url"],
        "description": "A video element: a video alone.",
    })
}

fn reference(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

/// The request's fields but `prompt`, `multi_prompt` and `shot_type`.
fn common_request_properties() -> Map<String, Value> {
    let properties = json!({
        "start_image_url": media_url("The first frame."),
        "voice_ids": or_null(json!({
            "type": "array",
            "items": {
                "type": "string",
                "pattern": format!("^{KEY_CHAR}*{SOLID_CHAR}{KEY_CHAR}*$"),
            },
            "maxItems": MAX_VOICE_IDS,
            "description": "Voices referenced in the prompt as `<<<voice_1>>>`.",
        })),
        "elements": or_null(json!({
            "type": "array",
            "items": reference("Element"),
            "contains": reference("VideoElement"),
            "minContains": 0,
            "maxContains": 1,
            "description": "Characters or objects referenced as `@Element1`...; at most one \
                is a video.",
        })),
        "generate_audio": {
            "type": ["boolean", "null"],
            "description": "Native audio (default true).",
        },
        "duration": {
            "anyOf": duration(MIN_SECONDS, MAX_SECONDS)["anyOf"].clone(),
            "description": "Length of the video in seconds, 3 to 15, as a string (\"5\") or \
                an integer (default 5); the provider bills per second.",
        },
        "end_image_url": or_null(media_url("The last frame, optional.")),
        "negative_prompt": {
            "type": ["string", "null"],
            "maxLength": MAX_PROMPT_CHARS,
            "pattern": format!("^{TEXT_CHAR}*$"),
            "description": format!(
                "What the model should avoid (default \"{DEFAULT_NEGATIVE_PROMPT}\")."
            ),
        },
        "cfg_scale": {
            "type": ["number", "null"],
            "minimum": 0,
            "maximum": 1,
            "description": "How closely the model follows the prompt (default 0.5).",
        },
    });
    match properties {
        Value::Object(map) => map,
        _ => unreachable!("a JSON object"),
    }
}

/// The request with one `prompt`, or with `multi_prompt` and `shot_type: customize`.
fn request_variant(multi: bool) -> Map<String, Value> {
    let mut properties = common_request_properties();
    if multi {
        properties.insert("prompt".into(), json!({"type": "null"}));
        properties.insert("multi_prompt".into(), reference("MultiPrompt"));
        properties.insert(
            "shot_type".into(),
            json!({"const": SHOT_TYPE_CUSTOMIZE, "description": "Multi-shot mode."}),
        );
    } else {
        properties.insert("prompt".into(), prompt("Text prompt."));
        properties.insert("multi_prompt".into(), json!({"type": "null"}));
        properties.insert(
            "shot_type".into(),
            json!({"enum": [SHOT_TYPE_CUSTOMIZE, null], "description": "Multi-shot mode."}),
        );
    }
    properties
}

fn required(multi: bool) -> Value {
    if multi {
        json!(["start_image_url", "multi_prompt", "shot_type"])
    } else {
        json!(["start_image_url", "prompt"])
    }
}

fn closed_object(properties: Map<String, Value>, required: Value, description: &str) -> Value {
    json!({
        "type": "object",
        "additionalProperties": false,
        "properties": properties,
        "required": required,
        "description": description,
    })
}

/// A JSON value with no NUL (U+0000) in any string or key: what metadata may hold.
fn metadata_value() -> Value {
    let no_nul = json!({"pattern": "^[^\\u0000]*$"});
    json!({
        "anyOf": [
            {"type": "string", "pattern": "^[^\\u0000]*$"},
            {"type": ["number", "boolean", "null"]},
            {"type": "array", "items": reference("MetadataValue")},
            {
                "type": "object",
                "propertyNames": no_nul,
                "additionalProperties": reference("MetadataValue"),
            },
        ],
        "description": "Any JSON value without U+0000 (NUL) in a string or key.",
    })
}

fn job_properties() -> Map<String, Value> {
    let properties = json!({
        "metadata": {
            "type": ["object", "null"],
            "propertyNames": {"pattern": "^[^\\u0000]*$"},
            "additionalProperties": reference("MetadataValue"),
            "description": format!(
                "Any JSON object of yours (at most {MAX_METADATA_BYTES} bytes as JSON, no \
                 U+0000 in a string or key), echoed in the job and its completion event."
            ),
        },
        "webhook_url": or_null(http_url(
            MAX_WEBHOOK_URL_BYTES,
            &format!(
                "Where the job's completion event is delivered: an http(s) URL, at most \
                 {MAX_WEBHOOK_URL_BYTES} bytes."
            ),
        )),
        "idempotency_key": {
            "type": ["string", "null"],
            "minLength": 1,
            "maxLength": 255,
            "pattern": format!("^{KEY_CHAR}*$"),
            "description": "1 to 255 bytes, no control character. The same key within 24 h \
                returns the first job instead of a new one.",
        },
        "priority": {
            "enum": ["high", "normal", "low", null],
            "description": "Workers take high before normal before low (default normal).",
        },
        "not_before": {
            "type": ["string", "null"],
            "format": "date-time",
            "description": "The job is not submitted before this time (RFC 3339).",
        },
        "tenant": {
            "type": ["string", "null"],
            "minLength": 1,
            "maxLength": klingq_core::tenant::MAX_TENANT_LEN,
            "pattern": "^[A-Za-z0-9_-]+$",
            "description": "The customer the job is for (`default` when absent): its fair \
                share of the provider, its limits and its daily budget.",
        },
    });
    match properties {
        Value::Object(map) => map,
        _ => unreachable!("a JSON object"),
    }
}

fn example_request() -> Value {
    json!({
        "start_image_url": "https://example.com/cat.png",
        "prompt": "a cat walks across a sunlit room",
        "duration": "5",
        "generate_audio": true
    })
}

fn example_flat_job(n: u32) -> Value {
    json!({
        "start_image_url": format!("https://example.com/{n}.png"),
        "prompt": "a slow dolly shot through a rainy street at night",
        "duration": "5",
        "metadata": {"customer": "acme", "row": n},
        "priority": "normal"
    })
}

fn flat_job_variant(multi: bool) -> Value {
    let mut properties = request_variant(multi);
    properties.extend(job_properties());
    closed_object(
        properties,
        required(multi),
        if multi {
            "A flat job with `multi_prompt`."
        } else {
            "A flat job with `prompt`."
        },
    )
}

/// The input schemas by component name.
pub(super) fn schemas() -> Vec<(&'static str, Value)> {
    let request = |multi: bool| {
        closed_object(
            request_variant(multi),
            required(multi),
            if multi {
                "A multi-shot request."
            } else {
                "A single-prompt request."
            },
        )
    };
    let mut nested_job = job_properties();
    nested_job.insert("request".into(), reference("GenerationRequest"));
    let batch_object = json!({
        "type": "object",
        "additionalProperties": false,
        "properties": {
            "jobs": {"type": "array", "items": reference("JobInput"), "minItems": 1},
            "webhook_url": or_null(http_url(
                MAX_WEBHOOK_URL_BYTES,
                "The batch's webhook URL, kept in its info.",
            )),
            "budget_usd": {
                "type": ["number", "null"],
                "exclusiveMinimum": 0,
                "description": "The batch's spending cap in USD.",
            },
            "partial": {
                "type": ["boolean", "null"],
                "description": "Enqueue the valid jobs and report the invalid ones, instead of \
                    rejecting the batch (default false).",
            },
            "tenant": {
                "type": ["string", "null"],
                "minLength": 1,
                "maxLength": klingq_core::tenant::MAX_TENANT_LEN,
                "pattern": "^[A-Za-z0-9_-]+$",
                "description": "The tenant of the batch's jobs that name none (`default` when \
                    absent): its share of the provider, its limits and budget.",
            },
            "max_failure_rate": {
                "type": ["number", "null"],
                "minimum": 0,
                "maximum": 1,
                "description": "Pause the batch once more than this share (0: none) of its finished jobs \
                    failed for good (moderation, invalid input; not transient failures), \
                    judged after `min_finished` jobs finished.",
            },
            "min_finished": {
                "type": ["integer", "null"],
                "minimum": 1,
                "maximum": 1_000_000,
                "description": "Finished jobs `max_failure_rate` waits for (default 20).",
            },
            "max_failed": {
                "type": ["integer", "null"],
                "minimum": 1,
                "description": "Pause the batch once more than this many of its jobs failed for \
                    good.",
            },
        },
        "required": ["jobs"],
        // A job naming a tenant other than the batch's is refused (`batch_tenant`); JSON
        // Schema cannot compare the two, so it states the stricter form: a batch naming a
        // tenant has jobs that name none.
        "if": {"properties": {"tenant": {"type": "string"}}, "required": ["tenant"]},
        "then": {"properties": {"jobs": {"items": {"properties": {"tenant": {"type": "null"}}}}}},
        "description": "A batch with its options. A job may name the batch's tenant or none; \
            naming another is refused (rule `batch_tenant`).",
    });
    vec![
        (
            "GenerationRequest",
            json!({
                "oneOf": [request(false), request(true)],
                "examples": [example_request()],
                "description": "One image-to-video generation, as the provider's schema gives \
                    it: exactly one of `prompt` and `multi_prompt` (which needs `shot_type: \
                    customize`). `null` counts as absent.",
            }),
        ),
        ("MultiPrompt", multi_prompt()),
        (
            "PromptShot",
            json!({
                "allOf": [shot(MIN_SECONDS, MAX_SECONDS)],
                "description": "One shot of a multi-shot video (its duration 3 to 15 s, \
                    default 5).",
            }),
        ),
        (
            "Element",
            json!({
                "oneOf": [reference("ImageElement"), reference("VideoElement")],
                "description": "An element: a video, or a frontal image with reference images.",
            }),
        ),
        ("ImageElement", image_element()),
        ("VideoElement", video_element()),
        ("MetadataValue", metadata_value()),
        (
            "Job",
            json!({
                "type": "object",
                "additionalProperties": false,
                "properties": nested_job,
                "required": ["request"],
                "examples": [{
                    "request": example_request(),
                    "metadata": {"customer": "acme", "row": 1},
                    "priority": "high"
                }],
                "description": "A job: the generation request under `request`, and the job's \
                    optional fields.",
            }),
        ),
        (
            "FlatJob",
            json!({
                "oneOf": [flat_job_variant(false), flat_job_variant(true)],
                "examples": [example_flat_job(1)],
                "description": "A job with the request's fields and the job's optional fields \
                    side by side; a bare GenerationRequest is a FlatJob.",
            }),
        ),
        (
            "JobInput",
            json!({
                "oneOf": [reference("Job"), reference("FlatJob")],
                "description": "A job, nested (`{\"request\": {...}, \"metadata\": ...}`) or \
                    flat (the request's fields next to the job's). Errors name paths in the \
                    shape given.",
            }),
        ),
        ("BatchObject", batch_object),
        (
            "BatchInput",
            json!({
                "oneOf": [
                    {"type": "array", "items": reference("JobInput"), "minItems": 1},
                    reference("BatchObject"),
                ],
                "examples": [
                    [example_flat_job(1), example_flat_job(2)],
                    {"jobs": [example_flat_job(3)], "budget_usd": 10.0, "partial": true},
                ],
            }),
        ),
        (
            "RedriveRequest",
            json!({
                "oneOf": [
                    {
                        "type": "object",
                        "additionalProperties": false,
                        "properties": {
                            "ids": {
                                "type": "array",
                                "items": {"type": "string"},
                                "minItems": 1,
                                "maxItems": MAX_REDRIVE_IDS,
                            },
                            "all": {"enum": [false, null]},
                        },
                        "required": ["ids"],
                    },
                    {
                        "type": "object",
                        "additionalProperties": false,
                        "properties": {
                            "ids": {"type": "null"},
                            "all": {"const": true},
                        },
                        "required": ["all"],
                    },
                ],
                "description": format!(
                    "Re-drive some dead jobs (`ids`, 1 to {MAX_REDRIVE_IDS}) or all of them \
                     (`all: true`), not both."
                ),
            }),
        ),
    ]
}

/// A decimal `u64` as the parser reads one: 1 to 20 digits, at most `u64::MAX`.
fn u64_pattern() -> String {
    let max = u64::MAX.to_string();
    let digits: Vec<u32> = max.chars().filter_map(|c| c.to_digit(10)).collect();
    let mut options = vec![format!("[0-9]{{1,{}}}", digits.len() - 1)];
    for (index, digit) in digits.iter().enumerate() {
        if *digit > 0 {
            let rest = digits.len() - index - 1;
            let lower = if *digit == 1 {
                "0".to_owned()
            } else {
                format!("[0-{}]", digit - 1)
            };
            options.push(format!("{}{lower}[0-9]{{{rest}}}", &max[..index]));
        }
    }
    options.push(max);
    format!("({})", options.join("|"))
}

/// An event cursor of a namespace with `partitions` partitions: one stream id (`<ms>-<seq>`
/// or `<ms>`), or one per partition joined by `,`.
pub(super) fn cursor_pattern(partitions: usize) -> String {
    let number = u64_pattern();
    let id = format!("{number}(-{number})?");
    if partitions <= 1 {
        format!("^{id}$")
    } else {
        format!("^{id}((,{id}){{{}}})?$", partitions - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The durations (integer bounds) each `anyOf` option of `multi_prompt` allows per shot.
    fn options() -> Vec<Vec<(u64, u64)>> {
        multi_prompt()["anyOf"]
            .as_array()
            .unwrap()
            .iter()
            .map(|option| {
                option["prefixItems"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|shot| {
                        let integer = &shot["properties"]["duration"]["anyOf"][1];
                        (
                            integer["minimum"].as_u64().unwrap(),
                            integer["maximum"].as_u64().unwrap(),
                        )
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn multi_prompt_options_allow_exactly_the_durations_that_fit() {
        let options = options();
        let mut lists: Vec<Vec<u64>> = vec![Vec::new()];
        for _ in 0..MAX_SHOTS {
            lists = lists
                .into_iter()
                .flat_map(|list| {
                    (3..=15).map(move |seconds| {
                        let mut next = list.clone();
                        next.push(seconds);
                        next
                    })
                })
                .filter(|list| list.iter().sum::<u64>() <= 18)
                .collect();
            for list in &lists {
                let fits = list.iter().sum::<u64>() <= u64::from(MAX_TOTAL_SECONDS);
                let matches = options
                    .iter()
                    .filter(|ranges| {
                        ranges.len() == list.len()
                            && ranges
                                .iter()
                                .zip(list)
                                .all(|((low, high), seconds)| (low..=high).contains(&seconds))
                    })
                    .count();
                assert_eq!(matches, usize::from(fits), "{list:?}");
            }
        }
    }

    #[test]
    fn cursor_patterns_follow_the_partition_count() {
        assert_eq!(
            u64_pattern().matches('|').count(),
            // One option below 20 digits, one per non-zero digit of u64::MAX, and u64::MAX.
            u64::MAX.to_string().chars().filter(|c| *c != '0').count() + 1
        );
        assert!(cursor_pattern(1).ends_with(")?$"));
        assert!(cursor_pattern(4).contains("){3})?$"));
    }
}
