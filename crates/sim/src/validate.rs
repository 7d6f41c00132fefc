//! Independent validation of the Kling v3 Pro image-to-video input (provider-api.md §7.2).
//!
//! This deliberately shares no types with the klingq client, so that a client bug and a simulator
//! bug cannot hide each other.

use serde_json::{Map, Value, json};

use crate::error::FieldError;

/// Fields the model accepts; anything else is unknown.
const KNOWN_FIELDS: &[&str] = &[
    "prompt",
    "multi_prompt",
    "start_image_url",
    "end_image_url",
    "duration",
    "generate_audio",
    "voice_ids",
    "elements",
    "shot_type",
    "negative_prompt",
    "cfg_scale",
];

const MAX_PROMPT_CHARS: usize = 2500;
const MAX_SHOTS: usize = 6;
const MAX_TOTAL_SECONDS: u32 = 15;
const MAX_VOICES: usize = 2;
const DEFAULT_DURATION: u32 = 5;

/// Validation switches taken from the config.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ValidationOptions {
    pub(crate) lenient_duration: bool,
    pub(crate) allow_unknown_fields: bool,
}

/// What the rest of the simulator needs from a valid input.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct InputSummary {
    /// Seconds of video that will be generated and billed.
    pub(crate) duration_secs: u32,
    pub(crate) generate_audio: bool,
    /// The prompt texts (single prompt or every shot), searched for fault tokens.
    pub(crate) prompts: Vec<String>,
}

fn loc(path: &[Value]) -> Vec<Value> {
    let mut full = vec![json!("input")];
    full.extend_from_slice(path);
    full
}

fn is_media_url(value: &str) -> bool {
    value.starts_with("http://") || value.starts_with("https://") || value.starts_with("data:")
}

/// Checks a media URL field; `required` decides whether absence is an error.
fn check_url(
    input: &Map<String, Value>,
    field: &str,
    required: bool,
    errors: &mut Vec<FieldError>,
) {
    match input.get(field) {
        None | Some(Value::Null) if required => {
            errors.push(FieldError::new(loc(&[json!(field)]), "field required"));
        }
        None | Some(Value::Null) => {}
        Some(Value::String(url)) if is_media_url(url) => {}
        Some(Value::String(url)) => errors.push(FieldError::new(
            loc(&[json!(field)]),
            format!(
                "media URL must use HTTP(S) or data URI, got '{}'",
                url.split(':').next().unwrap_or("")
            ),
        )),
        Some(_) => errors.push(FieldError::new(loc(&[json!(field)]), "must be a string")),
    }
}

/// Parses a duration value: a string "3".."15", or an integer in lenient mode.
fn parse_duration(value: &Value, lenient: bool) -> Result<u32, String> {
    let seconds = match value {
        Value::String(text) => text.parse::<u32>().ok(),
        Value::Number(number) if lenient => number.as_u64().and_then(|n| u32::try_from(n).ok()),
        Value::Number(_) => {
            return Err("duration must be a string such as \"5\", not a number".to_owned());
        }
        _ => None,
    };
    match seconds {
        Some(seconds) if (3..=MAX_TOTAL_SECONDS).contains(&seconds) => Ok(seconds),
        _ => Err("duration must be one of \"3\", \"4\", ..., \"15\"".to_owned()),
    }
}

fn check_text(
    input: &Map<String, Value>,
    field: &str,
    errors: &mut Vec<FieldError>,
) -> Option<String> {
    match input.get(field) {
        None | Some(Value::Null) => None,
        Some(Value::String(text)) => {
            if text.chars().count() > MAX_PROMPT_CHARS {
                errors.push(FieldError::new(
                    loc(&[json!(field)]),
                    format!("must be at most {MAX_PROMPT_CHARS} characters"),
                ));
            }
            Some(text.clone())
        }
        Some(_) => {
            errors.push(FieldError::new(loc(&[json!(field)]), "must be a string"));
            None
        }
    }
}

/// Accepts a JSON array, or a string holding a JSON array (Runflow labels these fields "string").
fn as_list(value: &Value) -> Option<Vec<Value>> {
    match value {
        Value::Array(items) => Some(items.clone()),
        Value::String(text) => match serde_json::from_str::<Value>(text) {
            Ok(Value::Array(items)) => Some(items),
            _ => None,
        },
        _ => None,
    }
}

fn check_multi_prompt(
    value: &Value,
    lenient: bool,
    prompts: &mut Vec<String>,
    errors: &mut Vec<FieldError>,
) -> Option<u32> {
    let Value::Array(shots) = value else {
        errors.push(FieldError::new(
            loc(&[json!("multi_prompt")]),
            "must be a list",
        ));
        return None;
    };
    if shots.is_empty() || shots.len() > MAX_SHOTS {
        errors.push(FieldError::new(
            loc(&[json!("multi_prompt")]),
            format!("must contain between 1 and {MAX_SHOTS} shots"),
        ));
    }
    let mut total = 0;
    let mut all_valid = true;
    for (index, shot) in shots.iter().enumerate() {
        let Value::Object(shot) = shot else {
            errors.push(FieldError::new(
                loc(&[json!("multi_prompt"), json!(index)]),
                "must be an object",
            ));
            all_valid = false;
            continue;
        };
        match shot.get("prompt") {
            Some(Value::String(text)) if text.chars().count() <= MAX_PROMPT_CHARS => {
                prompts.push(text.clone());
            }
            Some(Value::String(_)) => {
                errors.push(FieldError::new(
                    loc(&[json!("multi_prompt"), json!(index), json!("prompt")]),
                    format!("must be at most {MAX_PROMPT_CHARS} characters"),
                ));
                all_valid = false;
            }
            None | Some(Value::Null) => {
                errors.push(FieldError::new(
                    loc(&[json!("multi_prompt"), json!(index), json!("prompt")]),
                    "field required",
                ));
                all_valid = false;
            }
            Some(_) => {
                errors.push(FieldError::new(
                    loc(&[json!("multi_prompt"), json!(index), json!("prompt")]),
                    "must be a string",
                ));
                all_valid = false;
            }
        }
        let duration = match shot.get("duration") {
            None | Some(Value::Null) => Ok(DEFAULT_DURATION),
            Some(value) => parse_duration(value, lenient),
        };
        match duration {
            Ok(seconds) => total += seconds,
            Err(message) => {
                errors.push(FieldError::new(
                    loc(&[json!("multi_prompt"), json!(index), json!("duration")]),
                    message,
                ));
                all_valid = false;
            }
        }
        for key in shot.keys() {
            if key != "prompt" && key != "duration" {
                errors.push(FieldError::new(
                    loc(&[json!("multi_prompt"), json!(index), json!(key)]),
                    "extra fields not permitted",
                ));
            }
        }
    }
    if total > MAX_TOTAL_SECONDS {
        errors.push(FieldError::new(
            loc(&[json!("multi_prompt")]),
            format!("the shot durations add up to {total} s, more than {MAX_TOTAL_SECONDS} s"),
        ));
        all_valid = false;
    }
    all_valid.then_some(total)
}

fn check_elements(value: &Value, errors: &mut Vec<FieldError>) {
    let Some(elements) = as_list(value) else {
        errors.push(FieldError::new(loc(&[json!("elements")]), "must be a list"));
        return;
    };
    let mut video_elements = 0;
    for (index, element) in elements.iter().enumerate() {
        let here = |field: Option<&str>| {
            let mut path = vec![json!("elements"), json!(index)];
            path.extend(field.map(|field| json!(field)));
            loc(&path)
        };
        let Value::Object(element) = element else {
            errors.push(FieldError::new(here(None), "must be an object"));
            continue;
        };
        let has_video = element.get("video_url").is_some_and(|v| !v.is_null());
        let has_images = element
            .get("frontal_image_url")
            .is_some_and(|v| !v.is_null())
            || element
                .get("reference_image_urls")
                .is_some_and(|v| !v.is_null());
        if has_video && has_images {
            errors.push(FieldError::new(
                here(None),
                "an element is either a video_url or frontal_image_url with reference_image_urls, not both",
            ));
            continue;
        }
        if has_video {
            video_elements += 1;
            match element.get("video_url") {
                Some(Value::String(url)) if is_media_url(url) => {}
                _ => errors.push(FieldError::new(
                    here(Some("video_url")),
                    "must be an http(s) or data URL",
                )),
            }
            continue;
        }
        match element.get("frontal_image_url") {
            Some(Value::String(url)) if is_media_url(url) => {}
            None | Some(Value::Null) => {
                errors.push(FieldError::new(
                    here(Some("frontal_image_url")),
                    "field required",
                ));
            }
            _ => errors.push(FieldError::new(
                here(Some("frontal_image_url")),
                "must be an http(s) or data URL",
            )),
        }
        match element.get("reference_image_urls") {
            Some(Value::Array(urls)) if (1..=3).contains(&urls.len()) => {
                let all_urls = urls
                    .iter()
                    .all(|url| url.as_str().is_some_and(is_media_url));
                if !all_urls {
                    errors.push(FieldError::new(
                        here(Some("reference_image_urls")),
                        "every reference image must be an http(s) or data URL",
                    ));
                }
            }
            None | Some(Value::Null) => {
                errors.push(FieldError::new(
                    here(Some("reference_image_urls")),
                    "field required",
                ));
            }
            _ => errors.push(FieldError::new(
                here(Some("reference_image_urls")),
                "must be a list of 1 to 3 image URLs",
            )),
        }
    }
    if video_elements > 1 {
        errors.push(FieldError::new(
            loc(&[json!("elements")]),
            "a request can only have one element with a video",
        ));
    }
}

/// Validates a model input object and summarizes it, or lists every problem found.
pub(crate) fn validate_input(
    input: &Value,
    options: ValidationOptions,
) -> Result<InputSummary, Vec<FieldError>> {
    let Value::Object(input) = input else {
        return Err(vec![FieldError::new(
            vec![json!("input")],
            "must be an object",
        )]);
    };
    let mut errors = Vec::new();
    let mut prompts = Vec::new();

    check_url(input, "start_image_url", true, &mut errors);
    check_url(input, "end_image_url", false, &mut errors);

    let prompt = check_text(input, "prompt", &mut errors);
    check_text(input, "negative_prompt", &mut errors);
    let multi_prompt = input.get("multi_prompt").filter(|value| !value.is_null());
    let mut multi_total = None;
    match (&prompt, multi_prompt) {
        (Some(_), Some(_)) => errors.push(FieldError::new(
            loc(&[json!("prompt")]),
            "either prompt or multi_prompt must be provided, but not both",
        )),
        (None, None) if input.get("prompt").is_none_or(Value::is_null) => {
            errors.push(FieldError::new(
                loc(&[json!("prompt")]),
                "either prompt or multi_prompt must be provided",
            ));
        }
        _ => {}
    }
    if let Some(prompt) = prompt {
        prompts.push(prompt);
    }
    if let Some(shots) = multi_prompt {
        multi_total =
            check_multi_prompt(shots, options.lenient_duration, &mut prompts, &mut errors);
    }

    let duration = match input.get("duration") {
        None | Some(Value::Null) => None,
        Some(value) => match parse_duration(value, options.lenient_duration) {
            Ok(seconds) => Some(seconds),
            Err(message) => {
                errors.push(FieldError::new(loc(&[json!("duration")]), message));
                None
            }
        },
    };

    match input.get("shot_type") {
        None | Some(Value::Null) if multi_prompt.is_some() => errors.push(FieldError::new(
            loc(&[json!("shot_type")]),
            "shot_type is required when multi_prompt is provided",
        )),
        None | Some(Value::Null) => {}
        Some(Value::String(shot_type)) if shot_type == "customize" => {}
        Some(_) => errors.push(FieldError::new(
            loc(&[json!("shot_type")]),
            "shot_type must be \"customize\"",
        )),
    }

    match input.get("cfg_scale") {
        None | Some(Value::Null) => {}
        Some(Value::Number(number))
            if number.as_f64().is_some_and(|v| (0.0..=1.0).contains(&v)) => {}
        Some(_) => errors.push(FieldError::new(
            loc(&[json!("cfg_scale")]),
            "cfg_scale must be a number between 0 and 1",
        )),
    }

    let generate_audio = match input.get("generate_audio") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(flag)) => *flag,
        Some(_) => {
            errors.push(FieldError::new(
                loc(&[json!("generate_audio")]),
                "must be a boolean",
            ));
            true
        }
    };

    match input.get("voice_ids") {
        None | Some(Value::Null) => {}
        Some(value) => match as_list(value) {
            Some(voices) if voices.len() > MAX_VOICES => errors.push(FieldError::new(
                loc(&[json!("voice_ids")]),
                format!("at most {MAX_VOICES} voices are allowed per task"),
            )),
            Some(voices) if voices.iter().all(Value::is_string) => {}
            _ => errors.push(FieldError::new(
                loc(&[json!("voice_ids")]),
                "must be a list of strings",
            )),
        },
    }

    if let Some(elements) = input.get("elements").filter(|value| !value.is_null()) {
        check_elements(elements, &mut errors);
    }

    if !options.allow_unknown_fields {
        for key in input.keys() {
            if !KNOWN_FIELDS.contains(&key.as_str()) {
                errors.push(FieldError::new(
                    loc(&[json!(key)]),
                    "extra fields not permitted",
                ));
            }
        }
    }

    if !errors.is_empty() {
        return Err(errors);
    }
    let duration_secs = duration.or(multi_total).unwrap_or(DEFAULT_DURATION);
    Ok(InputSummary {
        duration_secs,
        generate_audio,
        prompts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const STRICT: ValidationOptions = ValidationOptions {
        lenient_duration: false,
        allow_unknown_fields: false,
    };

    fn valid() -> Value {
        json!({"prompt": "a cat", "start_image_url": "https://example.com/cat.png"})
    }

    fn error_locs(input: Value) -> Vec<Vec<Value>> {
        validate_input(&input, STRICT)
            .unwrap_err()
            .into_iter()
            .map(|error| error.loc)
            .collect()
    }

    #[test]
    fn minimal_input_defaults_to_five_seconds_with_audio() {
        let summary = validate_input(&valid(), STRICT).unwrap();
        assert_eq!(summary.duration_secs, 5);
        assert!(summary.generate_audio);
        assert_eq!(summary.prompts, vec!["a cat".to_owned()]);
    }

    #[test]
    fn multi_prompt_duration_is_the_sum_of_shots_when_duration_is_absent() {
        let input = json!({
            "start_image_url": "data:image/png;base64,AAAA",
            "shot_type": "customize",
            "multi_prompt": [{"prompt": "one", "duration": "4"}, {"prompt": "two"}],
        });
        assert_eq!(validate_input(&input, STRICT).unwrap().duration_secs, 9);
    }

    #[test]
    fn integer_duration_is_rejected_unless_lenient() {
        let mut input = valid();
        input["duration"] = json!(5);
        assert_eq!(
            error_locs(input.clone()),
            vec![vec![json!("input"), json!("duration")]]
        );
        let lenient = ValidationOptions {
            lenient_duration: true,
            ..STRICT
        };
        assert_eq!(validate_input(&input, lenient).unwrap().duration_secs, 5);
    }

    #[test]
    fn unknown_fields_are_rejected_unless_allowed() {
        let mut input = valid();
        input["image_url"] = json!("https://example.com/x.png");
        assert_eq!(
            error_locs(input.clone()),
            vec![vec![json!("input"), json!("image_url")]]
        );
        let allow = ValidationOptions {
            allow_unknown_fields: true,
            ..STRICT
        };
        assert!(validate_input(&input, allow).is_ok());
    }

    #[test]
    fn string_encoded_lists_are_accepted() {
        let mut input = valid();
        input["voice_ids"] = json!("[\"v1\",\"v2\"]");
        input["elements"] = json!("[{\"video_url\":\"https://example.com/a.mp4\"}]");
        assert!(validate_input(&input, STRICT).is_ok());
    }
}
