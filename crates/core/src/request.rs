//! The generation request for Kling v3 Pro image-to-video, exactly as the model page's schema
//! gives it, and its validation.
//!
//! Untrusted input goes through [`GenerationRequest::parse`], which reports every violation at
//! once (unknown fields, wrong types and broken rules), each naming the field path and the rule.
//! A request built in code is checked with [`GenerationRequest::validate`].

use std::collections::HashSet;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::validation::ValidationErrors;

/// Longest `prompt`, `negative_prompt` or shot prompt accepted, in characters.
pub const MAX_PROMPT_CHARS: usize = 2500;
/// Most shots a `multi_prompt` may have.
pub const MAX_SHOTS: usize = 6;
/// Longest total video, in seconds; also the cap on the sum of shot durations.
pub const MAX_TOTAL_SECONDS: u32 = 15;
/// Most voice ids one request may reference.
pub const MAX_VOICE_IDS: usize = 2;
/// Reference images per image element: at least one, at most three.
pub const MAX_REFERENCE_IMAGES: usize = 3;
/// The only `shot_type` the provider accepts.
pub const SHOT_TYPE_CUSTOMIZE: &str = "customize";
/// The provider's default negative prompt.
pub const DEFAULT_NEGATIVE_PROMPT: &str = "blur, distort, and low quality";
/// The provider's default classifier-free guidance scale.
pub const DEFAULT_CFG_SCALE: f64 = 0.5;

/// Every field of the request, in the schema's order.
pub const FIELDS: &[&str] = &[
    "prompt",
    "multi_prompt",
    "voice_ids",
    "elements",
    "generate_audio",
    "duration",
    "shot_type",
    "start_image_url",
    "end_image_url",
    "negative_prompt",
    "cfg_scale",
];

/// One image-to-video generation, as sent to the provider.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationRequest {
    /// Text prompt; exactly one of `prompt` and `multi_prompt` is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// Shots of a multi-shot video; exactly one of `prompt` and `multi_prompt` is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multi_prompt: Option<Vec<PromptShot>>,
    /// Voices referenced in the prompt as `<<<voice_1>>>`, at most two.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub voice_ids: Option<Vec<String>>,
    /// Characters or objects referenced in the prompt as `@Element1`, `@Element2`, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub elements: Option<Vec<Element>>,
    /// Whether the model generates native audio.
    #[serde(default = "default_true")]
    pub generate_audio: bool,
    /// Length of the video: the provider bills per second of it.
    #[serde(default)]
    pub duration: VideoDuration,
    /// Multi-shot mode; required with `multi_prompt`, and only `customize` exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shot_type: Option<String>,
    /// The first frame: an http(s) URL or a data URI.
    pub start_image_url: String,
    /// The last frame, optional: an http(s) URL or a data URI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_image_url: Option<String>,
    /// What the model should avoid.
    #[serde(default = "default_negative_prompt")]
    pub negative_prompt: String,
    /// How closely the model follows the prompt, 0 to 1.
    #[serde(default = "default_cfg_scale")]
    pub cfg_scale: f64,
}

/// One shot of a multi-shot video.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptShot {
    pub prompt: String,
    #[serde(default)]
    pub duration: VideoDuration,
}

/// An element: either an image set (frontal image plus 1-3 reference images) or a video.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Element {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frontal_image_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference_image_urls: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub video_url: Option<String>,
}

/// A duration of 3 to 15 seconds, written on the wire as a string (`"5"`), as the schema says.
/// Integers are accepted on input for convenience and written back as strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VideoDuration(u8);

impl VideoDuration {
    pub const MIN_SECONDS: u8 = 3;
    pub const MAX_SECONDS: u8 = 15;
    pub const DEFAULT: VideoDuration = VideoDuration(5);

    /// Returns the duration if `seconds` is one of the options, 3 to 15.
    pub fn new(seconds: u32) -> Option<Self> {
        (u32::from(Self::MIN_SECONDS)..=u32::from(Self::MAX_SECONDS))
            .contains(&seconds)
            .then_some(VideoDuration(seconds as u8))
    }

    pub fn seconds(self) -> u32 {
        u32::from(self.0)
    }

    fn from_json(value: &Value) -> Result<Self, String> {
        let seconds = match value {
            Value::String(text) => text.trim().parse::<u32>().ok(),
            // An integer, written `5` or `5.0` (JSON Schema's `integer` takes both).
            Value::Number(number) => number
                .as_u64()
                .or_else(|| {
                    number
                        .as_f64()
                        .filter(|seconds| seconds.fract() == 0.0 && (0.0..=1e9).contains(seconds))
                        .map(|seconds| seconds as u64)
                })
                .and_then(|n| u32::try_from(n).ok()),
            _ => {
                return Err(format!(
                    "must be a string \"3\" to \"15\", got {}",
                    kind(value)
                ));
            }
        };
        seconds
            .and_then(Self::new)
            .ok_or_else(|| format!("must be one of \"3\" to \"15\" seconds, got {value}"))
    }
}

impl Default for VideoDuration {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl fmt::Display for VideoDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl Serialize for VideoDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for VideoDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        VideoDuration::from_json(&value).map_err(serde::de::Error::custom)
    }
}

fn default_true() -> bool {
    true
}

fn default_negative_prompt() -> String {
    DEFAULT_NEGATIVE_PROMPT.to_owned()
}

fn default_cfg_scale() -> f64 {
    DEFAULT_CFG_SCALE
}

impl GenerationRequest {
    /// A request with one prompt and the schema's defaults for everything else.
    pub fn new(start_image_url: impl Into<String>, prompt: impl Into<String>) -> Self {
        Self {
            prompt: Some(prompt.into()),
            multi_prompt: None,
            voice_ids: None,
            elements: None,
            generate_audio: true,
            duration: VideoDuration::DEFAULT,
            shot_type: None,
            start_image_url: start_image_url.into(),
            end_image_url: None,
            negative_prompt: default_negative_prompt(),
            cfg_scale: DEFAULT_CFG_SCALE,
        }
    }

    /// The seconds of video this request bills for.
    pub fn billed_seconds(&self) -> u32 {
        self.duration.seconds()
    }

    /// Parses untrusted JSON, reporting every unknown field, wrong type and broken rule.
    pub fn parse(value: &Value) -> Result<Self, ValidationErrors> {
        let mut errors = ValidationErrors::default();
        let Some(object) = value.as_object() else {
            errors.push(
                "",
                "type",
                format!("must be a JSON object, got {}", kind(value)),
            );
            return Err(errors);
        };
        for key in object.keys() {
            if !FIELDS.contains(&key.as_str()) {
                errors.push(
                    key.clone(),
                    "unknown_field",
                    format!(
                        "is not a field of the request; known fields: {}",
                        FIELDS.join(", ")
                    ),
                );
            }
        }
        let mut reader = Reader {
            object,
            prefix: String::new(),
            errors: &mut errors,
            failed: HashSet::new(),
        };
        let request = GenerationRequest {
            prompt: reader.string("prompt"),
            multi_prompt: reader.shots("multi_prompt"),
            voice_ids: reader.string_list("voice_ids"),
            elements: reader.elements("elements"),
            generate_audio: reader.bool("generate_audio").unwrap_or(true),
            duration: reader.duration("duration").unwrap_or_default(),
            shot_type: reader.string("shot_type"),
            start_image_url: reader.string("start_image_url").unwrap_or_default(),
            end_image_url: reader.string("end_image_url"),
            negative_prompt: reader
                .string("negative_prompt")
                .unwrap_or_else(default_negative_prompt),
            cfg_scale: reader.number("cfg_scale").unwrap_or(DEFAULT_CFG_SCALE),
        };
        let failed = reader.failed;
        request.check_rules(&mut errors, &failed);
        errors.into_result().map(|()| request)
    }

    /// Checks every rule of the schema on a request built in code.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errors = ValidationErrors::default();
        self.check_rules(&mut errors, &HashSet::new());
        errors.into_result()
    }

    /// Checks the rules, skipping fields in `failed` (their type was already wrong).
    fn check_rules(&self, errors: &mut ValidationErrors, failed: &HashSet<String>) {
        let ok = |field: &str| !failed.contains(field);

        match (&self.prompt, &self.multi_prompt) {
            (Some(_), Some(_)) => errors.push(
                "prompt",
                "exclusive",
                "give exactly one of prompt and multi_prompt, not both",
            ),
            (None, None) if ok("prompt") && ok("multi_prompt") => errors.push(
                "prompt",
                "required",
                "give exactly one of prompt and multi_prompt",
            ),
            _ => {}
        }
        if let Some(prompt) = &self.prompt {
            check_prompt(errors, "prompt", prompt);
        }
        if let Some(shots) = &self.multi_prompt {
            // With a broken shot left out, counting and summing would report nonsense.
            let complete = ok("multi_prompt");
            if complete && (shots.is_empty() || shots.len() > MAX_SHOTS) {
                errors.push(
                    "multi_prompt",
                    if shots.is_empty() {
                        "min_items"
                    } else {
                        "max_items"
                    },
                    format!("must have 1 to {MAX_SHOTS} shots, got {}", shots.len()),
                );
            }
            for (index, shot) in shots.iter().enumerate() {
                check_prompt(
                    errors,
                    &format!("multi_prompt[{index}].prompt"),
                    &shot.prompt,
                );
            }
            let total: u32 = shots.iter().map(|shot| shot.duration.seconds()).sum();
            if complete && total > MAX_TOTAL_SECONDS {
                errors.push(
                    "multi_prompt",
                    "sum",
                    format!(
                        "shot durations must add up to at most {MAX_TOTAL_SECONDS} seconds, got {total}"
                    ),
                );
            }
            if self.shot_type.is_none() && ok("shot_type") {
                errors.push(
                    "shot_type",
                    "required",
                    "is required with multi_prompt; use \"customize\"",
                );
            }
        }
        if let Some(shot_type) = &self.shot_type
            && shot_type != SHOT_TYPE_CUSTOMIZE
        {
            errors.push(
                "shot_type",
                "one_of",
                format!("must be \"{SHOT_TYPE_CUSTOMIZE}\", got {shot_type:?}"),
            );
        }
        if let Some(voice_ids) = &self.voice_ids {
            if voice_ids.len() > MAX_VOICE_IDS {
                errors.push(
                    "voice_ids",
                    "max_items",
                    format!("at most {MAX_VOICE_IDS} voice ids, got {}", voice_ids.len()),
                );
            }
            for (index, voice_id) in voice_ids.iter().enumerate() {
                let path = format!("voice_ids[{index}]");
                if voice_id.trim().is_empty() {
                    errors.push(path, "required", "must not be empty");
                } else {
                    check_control_chars(errors, &path, voice_id, false);
                }
            }
        }
        if let Some(elements) = &self.elements {
            check_elements(errors, elements);
        }
        if ok("start_image_url") {
            if self.start_image_url.is_empty() {
                errors.push(
                    "start_image_url",
                    "required",
                    "is required: the URL of the first frame",
                );
            } else {
                check_url(errors, "start_image_url", &self.start_image_url);
            }
        }
        if let Some(url) = &self.end_image_url {
            check_url(errors, "end_image_url", url);
        }
        if self.negative_prompt.chars().count() > MAX_PROMPT_CHARS {
            errors.push(
                "negative_prompt",
                "max_length",
                format!(
                    "must be at most {MAX_PROMPT_CHARS} characters, got {}",
                    self.negative_prompt.chars().count()
                ),
            );
        }
        check_control_chars(errors, "negative_prompt", &self.negative_prompt, true);
        if !(0.0..=1.0).contains(&self.cfg_scale) || !self.cfg_scale.is_finite() {
            errors.push(
                "cfg_scale",
                "range",
                format!("must be between 0 and 1, got {}", self.cfg_scale),
            );
        }
    }
}

fn check_prompt(errors: &mut ValidationErrors, path: &str, prompt: &str) {
    let n_chars = prompt.chars().count();
    if prompt.trim().is_empty() {
        errors.push(path, "required", "must not be empty");
    } else if n_chars > MAX_PROMPT_CHARS {
        errors.push(
            path,
            "max_length",
            format!("must be at most {MAX_PROMPT_CHARS} characters, got {n_chars}"),
        );
    }
    check_control_chars(errors, path, prompt, true);
}

fn check_elements(errors: &mut ValidationErrors, elements: &[Element]) {
    let mut n_video_elements = 0;
    for (index, element) in elements.iter().enumerate() {
        let path = format!("elements[{index}]");
        let has_image_part =
            element.frontal_image_url.is_some() || element.reference_image_urls.is_some();
        match (&element.video_url, has_image_part) {
            (Some(video_url), false) => {
                n_video_elements += 1;
                check_url(errors, &format!("{path}.video_url"), video_url);
            }
            (Some(_), true) => errors.push(
                path,
                "element_kind",
                "is either a video (video_url) or an image set (frontal_image_url and \
                 reference_image_urls), not both",
            ),
            (None, false) => errors.push(
                path,
                "element_kind",
                "needs video_url, or frontal_image_url with 1 to 3 reference_image_urls",
            ),
            (None, true) => {
                match &element.frontal_image_url {
                    Some(url) => check_url(errors, &format!("{path}.frontal_image_url"), url),
                    None => errors.push(
                        format!("{path}.frontal_image_url"),
                        "required",
                        "an image element needs a frontal image",
                    ),
                }
                let references = element.reference_image_urls.as_deref().unwrap_or_default();
                if references.is_empty() || references.len() > MAX_REFERENCE_IMAGES {
                    errors.push(
                        format!("{path}.reference_image_urls"),
                        if references.is_empty() { "min_items" } else { "max_items" },
                        format!(
                            "an image element needs 1 to {MAX_REFERENCE_IMAGES} reference images, got {}",
                            references.len()
                        ),
                    );
                }
                for (ref_index, url) in references.iter().enumerate() {
                    check_url(
                        errors,
                        &format!("{path}.reference_image_urls[{ref_index}]"),
                        url,
                    );
                }
            }
        }
    }
    if n_video_elements > 1 {
        errors.push(
            "elements",
            "max_items",
            format!("at most one element may be a video, got {n_video_elements}"),
        );
    }
}

/// Accepts an http(s) URL the HTTP client can fetch, or a `data:[type][;base64],payload` URI,
/// each within its length limit ([`crate::urls::check_media_url`]).
fn check_url(errors: &mut ValidationErrors, path: &str, url: &str) {
    if let Err(error) = crate::urls::check_media_url(url) {
        errors.push(path, error.rule, error.message);
    }
}

/// Whether `url` is an http(s) URL with a host or a `data:` URI with a payload, within the
/// length limits ([`crate::urls::check_media_url`]).
pub fn is_acceptable_url(url: &str) -> bool {
    crate::urls::check_media_url(url).is_ok()
}

/// Refuses control characters in free text: everything Unicode calls a control (`U+0000` to
/// `U+001F`, `U+007F` to `U+009F`) except, with `allow_newline_and_tab`, newline and tab.
/// Reports the first one, with its position in characters.
pub(crate) fn check_control_chars(
    errors: &mut ValidationErrors,
    path: &str,
    text: &str,
    allow_newline_and_tab: bool,
) {
    let found = text
        .chars()
        .enumerate()
        .find(|(_, c)| c.is_control() && !(allow_newline_and_tab && (*c == '\n' || *c == '\t')));
    if let Some((position, c)) = found {
        let allowed = if allow_newline_and_tab {
            "control characters other than newline and tab"
        } else {
            "control characters"
        };
        errors.push(
            path,
            "control_char",
            format!(
                "must not contain {allowed}; found U+{:04X} at character {position}",
                c as u32
            ),
        );
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Reads typed fields out of a JSON object, recording type errors and which fields failed.
struct Reader<'a> {
    object: &'a Map<String, Value>,
    /// Path of the object being read, prepended to its fields' paths.
    prefix: String,
    errors: &'a mut ValidationErrors,
    failed: HashSet<String>,
}

impl Reader<'_> {
    fn path(&self, field: &str) -> String {
        if self.prefix.is_empty() {
            field.to_owned()
        } else {
            format!("{}.{field}", self.prefix)
        }
    }

    /// The field's value, treating JSON null as absent.
    fn get(&self, field: &str) -> Option<&Value> {
        self.object.get(field).filter(|value| !value.is_null())
    }

    /// Records a type error for `field` (relative to this reader's object).
    fn fail(&mut self, field: &str, message: String) {
        let path = self.path(field);
        self.failed.insert(path.clone());
        self.errors.push(path, "type", message);
    }

    fn string(&mut self, field: &str) -> Option<String> {
        match self.get(field)? {
            Value::String(text) => Some(text.clone()),
            other => {
                let message = format!("must be a string, got {}", kind(other));
                self.fail(field, message);
                None
            }
        }
    }

    fn bool(&mut self, field: &str) -> Option<bool> {
        match self.get(field)? {
            Value::Bool(flag) => Some(*flag),
            other => {
                let message = format!("must be true or false, got {}", kind(other));
                self.fail(field, message);
                None
            }
        }
    }

    fn number(&mut self, field: &str) -> Option<f64> {
        match self.get(field)? {
            Value::Number(number) => number.as_f64(),
            other => {
                let message = format!("must be a number, got {}", kind(other));
                self.fail(field, message);
                None
            }
        }
    }

    fn duration(&mut self, field: &str) -> Option<VideoDuration> {
        let value = self.get(field)?.clone();
        match VideoDuration::from_json(&value) {
            Ok(duration) => Some(duration),
            Err(message) => {
                self.failed.insert(field.to_owned());
                self.errors.push(field, "one_of", message);
                None
            }
        }
    }

    fn array(&mut self, field: &str) -> Option<Vec<Value>> {
        match self.get(field)? {
            Value::Array(items) => Some(items.clone()),
            // The model page lists some arrays as "string": accept a JSON-encoded array.
            Value::String(text) if text.trim_start().starts_with('[') => {
                match serde_json::from_str::<Vec<Value>>(text) {
                    Ok(items) => Some(items),
                    Err(_) => {
                        self.fail(field, "must be an array".to_owned());
                        None
                    }
                }
            }
            other => {
                let message = format!("must be an array, got {}", kind(other));
                self.fail(field, message);
                None
            }
        }
    }

    fn string_list(&mut self, field: &str) -> Option<Vec<String>> {
        let items = self.array(field)?;
        let mut strings = Vec::with_capacity(items.len());
        for (index, item) in items.iter().enumerate() {
            match item {
                Value::String(text) => strings.push(text.clone()),
                other => {
                    let message = format!("must be a string, got {}", kind(other));
                    self.fail(&format!("{field}[{index}]"), message);
                }
            }
        }
        Some(strings)
    }

    fn shots(&mut self, field: &str) -> Option<Vec<PromptShot>> {
        let items = self.array(field)?;
        let n_errors_before = self.errors.len();
        let mut shots = Vec::with_capacity(items.len());
        for (index, item) in items.iter().enumerate() {
            let path = format!("{field}[{index}]");
            let Some(object) = item.as_object() else {
                self.fail(&path, format!("must be an object, got {}", kind(item)));
                continue;
            };
            for key in object.keys() {
                if key != "prompt" && key != "duration" {
                    self.errors.push(
                        format!("{path}.{key}"),
                        "unknown_field",
                        "is not a field of a shot; known fields: prompt, duration",
                    );
                }
            }
            let prompt = match object.get("prompt") {
                Some(Value::String(text)) => text.clone(),
                None | Some(Value::Null) => {
                    self.errors.push(
                        format!("{path}.prompt"),
                        "required",
                        "every shot needs a prompt",
                    );
                    continue;
                }
                Some(other) => {
                    let message = format!("must be a string, got {}", kind(other));
                    self.fail(&format!("{path}.prompt"), message);
                    continue;
                }
            };
            let duration = match object.get("duration").filter(|value| !value.is_null()) {
                None => VideoDuration::DEFAULT,
                Some(value) => match VideoDuration::from_json(value) {
                    Ok(duration) => duration,
                    Err(message) => {
                        self.errors
                            .push(format!("{path}.duration"), "one_of", message);
                        continue;
                    }
                },
            };
            shots.push(PromptShot { prompt, duration });
        }
        if self.errors.len() > n_errors_before {
            self.failed.insert(field.to_owned());
        }
        Some(shots)
    }

    fn elements(&mut self, field: &str) -> Option<Vec<Element>> {
        let items = self.array(field)?;
        let mut elements = Vec::with_capacity(items.len());
        for (index, item) in items.iter().enumerate() {
            let path = format!("{field}[{index}]");
            let Some(object) = item.as_object() else {
                self.fail(&path, format!("must be an object, got {}", kind(item)));
                continue;
            };
            let mut element_reader = Reader {
                object,
                prefix: path.clone(),
                errors: self.errors,
                failed: HashSet::new(),
            };
            for key in object.keys() {
                if !["frontal_image_url", "reference_image_urls", "video_url"]
                    .contains(&key.as_str())
                {
                    element_reader.errors.push(
                        format!("{path}.{key}"),
                        "unknown_field",
                        "is not a field of an element; known fields: frontal_image_url, \
                         reference_image_urls, video_url",
                    );
                }
            }
            let element = Element {
                frontal_image_url: element_reader.string("frontal_image_url"),
                reference_image_urls: element_reader.string_list("reference_image_urls"),
                video_url: element_reader.string("video_url"),
            };
            // An element with a wrongly typed field is left out of the rule checks.
            if element_reader.failed.is_empty() {
                elements.push(element);
            }
        }
        Some(elements)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn rules(value: Value) -> Vec<(String, String)> {
        match GenerationRequest::parse(&value) {
            Ok(_) => Vec::new(),
            Err(errors) => errors.into_iter().map(|e| (e.path, e.rule)).collect(),
        }
    }

    fn pair(path: &str, rule: &str) -> (String, String) {
        (path.to_owned(), rule.to_owned())
    }

    #[test]
    fn minimal_request_gets_schema_defaults() {
        let request = GenerationRequest::parse(&json!({
            "prompt": "a cat", "start_image_url": "https://example.com/cat.png"
        }))
        .unwrap();
        assert!(request.generate_audio);
        assert_eq!(request.duration.seconds(), 5);
        assert_eq!(request.negative_prompt, DEFAULT_NEGATIVE_PROMPT);
        assert_eq!(request.cfg_scale, 0.5);
        assert_eq!(request.shot_type, None);
        let wire = serde_json::to_value(&request).unwrap();
        assert_eq!(wire["duration"], json!("5"));
        assert_eq!(
            request,
            GenerationRequest::new("https://example.com/cat.png", "a cat")
        );
    }

    #[test]
    fn every_violation_is_reported_with_its_path_and_rule() {
        let errors = rules(json!({
            "prompt": "x".repeat(2501),
            "multi_prompt": [{"prompt": "a"}],
            "duration": "16",
            "cfg_scale": 1.5,
            "voice_ids": ["a", "b", "c"],
            "shot_type": "intelligence",
            "negative_prompt": "n".repeat(2501),
            "colour": "blue",
        }));
        for expected in [
            pair("colour", "unknown_field"),
            pair("duration", "one_of"),
            pair("prompt", "exclusive"),
            pair("prompt", "max_length"),
            pair("shot_type", "one_of"),
            pair("voice_ids", "max_items"),
            pair("start_image_url", "required"),
            pair("negative_prompt", "max_length"),
            pair("cfg_scale", "range"),
        ] {
            assert!(
                errors.contains(&expected),
                "missing {expected:?} in {errors:?}"
            );
        }
        assert_eq!(errors.len(), 9, "{errors:?}");
    }

    #[test]
    fn prompt_or_multi_prompt_is_required() {
        assert_eq!(
            rules(json!({"start_image_url": "https://e.com/a.png"})),
            vec![pair("prompt", "required")]
        );
    }

    #[test]
    fn multi_prompt_rules() {
        let shot = |d: &str| json!({"prompt": "p", "duration": d});
        assert_eq!(
            rules(json!({"start_image_url": "https://e.com/a.png", "multi_prompt": [shot("5")]})),
            vec![pair("shot_type", "required")]
        );
        assert_eq!(
            rules(
                json!({"start_image_url": "https://e.com/a.png", "shot_type": "customize",
                "multi_prompt": [shot("5"), shot("5"), shot("6")]})
            ),
            vec![pair("multi_prompt", "sum")]
        );
        assert_eq!(
            rules(
                json!({"start_image_url": "https://e.com/a.png", "shot_type": "customize",
                "multi_prompt": vec![shot("3"); 7]})
            ),
            vec![
                pair("multi_prompt", "max_items"),
                pair("multi_prompt", "sum")
            ]
        );
        assert_eq!(
            rules(
                json!({"start_image_url": "https://e.com/a.png", "shot_type": "customize",
                "multi_prompt": []})
            ),
            vec![pair("multi_prompt", "min_items")]
        );
        assert_eq!(
            rules(
                json!({"start_image_url": "https://e.com/a.png", "shot_type": "customize",
                "multi_prompt": [{"duration": "3"}, {"prompt": "p", "duration": 2}]})
            ),
            vec![
                pair("multi_prompt[0].prompt", "required"),
                pair("multi_prompt[1].duration", "one_of")
            ]
        );
        assert!(
            rules(
                json!({"start_image_url": "https://e.com/a.png", "shot_type": "customize",
                "multi_prompt": [shot("5"), shot("10")]})
            )
            .is_empty()
        );
    }

    #[test]
    fn element_rules() {
        let base = |elements: Value| json!({"start_image_url": "https://e.com/a.png", "prompt": "p", "elements": elements});
        assert!(
            rules(base(json!([
                {"frontal_image_url": "https://e.com/f.png", "reference_image_urls": ["https://e.com/r.png"]},
                {"video_url": "https://e.com/v.mp4"}
            ])))
            .is_empty()
        );
        assert_eq!(
            rules(base(
                json!([{"video_url": "https://e.com/1.mp4"}, {"video_url": "https://e.com/2.mp4"}])
            )),
            vec![pair("elements", "max_items")]
        );
        assert_eq!(
            rules(base(json!([{"frontal_image_url": "https://e.com/f.png"}]))),
            vec![pair("elements[0].reference_image_urls", "min_items")]
        );
        assert_eq!(
            rules(base(json!([{"frontal_image_url": "https://e.com/f.png",
                "reference_image_urls": ["https://e.com/1.png", "https://e.com/2.png", "https://e.com/3.png", "https://e.com/4.png"]}]))),
            vec![pair("elements[0].reference_image_urls", "max_items")]
        );
        assert_eq!(
            rules(base(
                json!([{"reference_image_urls": ["https://e.com/1.png"]}])
            )),
            vec![pair("elements[0].frontal_image_url", "required")]
        );
        assert_eq!(
            rules(base(
                json!([{"video_url": "https://e.com/v.mp4", "frontal_image_url": "https://e.com/f.png"}])
            )),
            vec![pair("elements[0]", "element_kind")]
        );
        assert_eq!(
            rules(base(json!([{}]))),
            vec![pair("elements[0]", "element_kind")]
        );
    }

    #[test]
    fn url_rules() {
        assert!(is_acceptable_url("https://example.com/a.png"));
        assert!(is_acceptable_url("HTTP://example.com"));
        assert!(is_acceptable_url("data:image/png;base64,iVBORw0KGgo="));
        assert!(!is_acceptable_url("ftp://example.com/a.png"));
        assert!(!is_acceptable_url("https:///a.png"));
        assert!(!is_acceptable_url("example.com/a.png"));
        assert!(!is_acceptable_url("data:image/png;base64"));
        assert!(!is_acceptable_url("https://exa mple.com/a.png"));
        assert_eq!(
            rules(
                json!({"start_image_url": "file:///etc/passwd", "prompt": "p", "end_image_url": "x"})
            ),
            vec![pair("start_image_url", "url"), pair("end_image_url", "url")]
        );
    }

    #[test]
    fn urls_the_http_client_cannot_send_to_are_refused() {
        let base = |start: &str| json!({"start_image_url": start, "prompt": "p"});
        assert_eq!(
            rules(base("https://x\"onmouseover=alert(1)//e.com/")),
            vec![pair("start_image_url", "url")]
        );
        let long = format!(
            "https://e.com/{}",
            "a".repeat(crate::urls::MAX_MEDIA_URL_BYTES)
        );
        assert_eq!(
            rules(base(&long)),
            vec![pair("start_image_url", "max_length")]
        );
        assert_eq!(
            rules(
                json!({"start_image_url": "https://e.com/a.png", "prompt": "p",
                "end_image_url": "https://e.com/a b.png",
                "elements": [{"video_url": "https://e.com:70000/v.mp4"}]})
            ),
            vec![
                pair("elements[0].video_url", "url"),
                pair("end_image_url", "url")
            ]
        );
    }

    #[test]
    fn control_characters_are_refused_in_text_except_newline_and_tab() {
        let request = |fields: Value| {
            let mut value = json!({"start_image_url": "https://e.com/a.png"});
            value
                .as_object_mut()
                .unwrap()
                .extend(fields.as_object().unwrap().clone());
            rules(value)
        };
        assert!(request(json!({"prompt": "line one\n\tline two"})).is_empty());
        assert_eq!(
            request(json!({"prompt": "a\u{0}b"})),
            vec![pair("prompt", "control_char")]
        );
        assert_eq!(
            request(
                json!({"prompt": "p", "negative_prompt": "blur\r\n", "voice_ids": ["v\t1", "v2"]})
            ),
            vec![
                pair("voice_ids[0]", "control_char"),
                pair("negative_prompt", "control_char")
            ]
        );
        assert_eq!(
            request(json!({"shot_type": "customize",
                "multi_prompt": [{"prompt": "ok"}, {"prompt": "esc \u{1b}[31m"}]})),
            vec![pair("multi_prompt[1].prompt", "control_char")]
        );
        let errors = GenerationRequest::parse(&json!({
            "start_image_url": "https://e.com/a.png", "prompt": "ab\u{7f}"
        }))
        .unwrap_err();
        assert_eq!(
            errors.0[0].message,
            "must not contain control characters other than newline and tab; found U+007F at \
             character 2"
        );
    }

    #[test]
    fn types_are_checked_once_per_field() {
        assert_eq!(
            rules(
                json!({"start_image_url": 3, "prompt": ["p"], "generate_audio": "yes",
                "cfg_scale": "0.5", "voice_ids": [1]})
            ),
            vec![
                pair("prompt", "type"),
                pair("voice_ids[0]", "type"),
                pair("generate_audio", "type"),
                pair("start_image_url", "type"),
                pair("cfg_scale", "type"),
            ]
        );
        assert_eq!(rules(json!([1, 2])), vec![pair("", "type")]);
    }

    #[test]
    fn durations_accept_strings_and_integers_and_write_strings() {
        for (input, seconds) in [
            (json!("3"), 3),
            (json!(15), 15),
            (json!("10"), 10),
            (json!(7.0), 7),
            (json!(" +05 "), 5),
        ] {
            let request = GenerationRequest::parse(&json!({
                "prompt": "p", "start_image_url": "https://e.com/a.png", "duration": input
            }))
            .unwrap();
            assert_eq!(request.billed_seconds(), seconds);
        }
        for bad in [
            json!("2"),
            json!(16),
            json!("five"),
            json!(5.5),
            json!(16.0),
            json!(-3.0),
            json!(true),
        ] {
            let errors = rules(json!({
                "prompt": "p", "start_image_url": "https://e.com/a.png", "duration": bad
            }));
            assert_eq!(errors, vec![pair("duration", "one_of")]);
        }
    }

    #[test]
    fn typed_requests_validate_the_same_rules() {
        let mut request = GenerationRequest::new("https://e.com/a.png", "p");
        assert!(request.validate().is_ok());
        request.cfg_scale = -0.1;
        request.multi_prompt = Some(vec![PromptShot {
            prompt: "s".into(),
            duration: VideoDuration::DEFAULT,
        }]);
        let errors = request.validate().unwrap_err();
        let found: Vec<_> = errors.iter().map(|e| e.rule.as_str()).collect();
        assert_eq!(found, vec!["exclusive", "required", "range"]);
    }

    #[test]
    fn round_trips_through_serde() {
        let request = GenerationRequest::parse(&json!({
            "prompt": "p", "start_image_url": "https://e.com/a.png", "duration": 7,
            "voice_ids": ["v1"], "elements": [{"video_url": "https://e.com/v.mp4"}],
            "end_image_url": "data:image/png;base64,AAAA", "generate_audio": false
        }))
        .unwrap();
        let text = serde_json::to_string(&request).unwrap();
        let back: GenerationRequest = serde_json::from_str(&text).unwrap();
        assert_eq!(back, request);
    }
}
