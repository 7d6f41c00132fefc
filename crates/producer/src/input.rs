//! Untrusted input to jobs: one job as JSON (nested or flat), and batch files in JSON Lines or
//! CSV, each entry remembering its line.
//!
//! # A job as JSON
//! Two shapes are accepted, told apart by the `request` key:
//! - nested, a [`JobSpec`]: `{"request": {<GenerationRequest>}, "metadata": {...},
//!   "webhook_url": "...", "idempotency_key": "...", "priority": "high", "not_before": "<RFC 3339>"}`;
//!   paths of request errors start with `request.`;
//! - flat: the request's fields and the job's optional fields side by side,
//!   `{"start_image_url": "...", "prompt": "...", "metadata": {...}, "priority": "low"}`. A bare
//!   `GenerationRequest` is a flat job with no options.
//!
//! JSON `null` counts as absent everywhere.
//!
//! # CSV
//! The first row names the columns; each later row is one flat job. Columns are the request's
//! fields (`start_image_url`, `prompt`, `negative_prompt`, `end_image_url`, `duration`,
//! `cfg_scale`, `generate_audio`, `shot_type`, `multi_prompt`, `voice_ids`, `elements`) and the
//! job's (`metadata`, `webhook_url`, `idempotency_key`, `priority`, `not_before`). An empty
//! cell is absent. `cfg_scale` is a number; `generate_audio` is `true`/`false` (also `1`/`0`,
//! `yes`/`no`); `metadata` is a JSON object and `multi_prompt`, `voice_ids` and `elements` are
//! JSON arrays, each written as JSON inside the cell. Rows may span lines inside quotes; an
//! entry's line is the line its row starts on.

use std::cell::Cell;
use std::fmt;
use std::io::Read;

use klingq_core::{GenerationRequest, JobSpec, Priority, ValidationErrors};
use serde::de::{DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// The job's own fields, next to the request's.
pub const JOB_FIELDS: &[&str] = &[
    "metadata",
    "webhook_url",
    "idempotency_key",
    "priority",
    "not_before",
    "tenant",
];

/// The request's fields, as CSV columns.
pub const REQUEST_FIELDS: &[&str] = klingq_core::request::FIELDS;

/// Parses one job (nested or flat), reporting every violation with its path and rule.
pub fn parse_job(value: &Value) -> Result<JobSpec, ValidationErrors> {
    let Some(object) = value.as_object() else {
        return Err(not_an_object(value));
    };
    let flat_request = (!object.contains_key("request")).then(|| {
        Value::Object(
            object
                .iter()
                .filter(|(key, _)| !JOB_FIELDS.contains(&key.as_str()))
                .map(|(key, value)| (key.clone(), value.clone()))
                .collect(),
        )
    });
    parse_object(object, flat_request)
}

/// [`parse_job`] of a value given away: a flat job's request fields are moved, not copied.
pub fn parse_job_value(value: Value) -> Result<JobSpec, ValidationErrors> {
    let Value::Object(mut object) = value else {
        return Err(not_an_object(&value));
    };
    if object.contains_key("request") {
        return parse_object(&object, None);
    }
    let mut job_part = Map::new();
    for field in JOB_FIELDS {
        if let Some((key, value)) = object.remove_entry(*field) {
            job_part.insert(key, value);
        }
    }
    parse_object(&job_part, Some(Value::Object(object)))
}

fn not_an_object(value: &Value) -> ValidationErrors {
    let mut errors = ValidationErrors::default();
    errors.push(
        "",
        "type",
        format!("must be a JSON object, got {}", kind(value)),
    );
    errors
}

/// A job from its object: nested when `flat_request` is `None` (the request under
/// `request`), else flat, with the request's fields in `flat_request` and the job's in
/// `object`.
fn parse_object(
    object: &Map<String, Value>,
    flat_request: Option<Value>,
) -> Result<JobSpec, ValidationErrors> {
    let mut errors = ValidationErrors::default();
    let request = if let (None, Some(nested)) = (&flat_request, object.get("request")) {
        for key in object.keys() {
            if key != "request" && !JOB_FIELDS.contains(&key.as_str()) {
                errors.push(
                    key.clone(),
                    "unknown_field",
                    format!(
                        "is not a field of a job; known fields: request, {}",
                        JOB_FIELDS.join(", ")
                    ),
                );
            }
        }
        GenerationRequest::parse(nested).map_err(|e| e.prefixed("request"))
    } else {
        let request_part = flat_request.unwrap_or_else(|| Value::Object(Map::new()));
        GenerationRequest::parse(&request_part).map_err(|mut errors| {
            for error in &mut errors.0 {
                if error.rule == "unknown_field" {
                    error.message = format!(
                        "{}, or of the job: {}",
                        error.message,
                        JOB_FIELDS.join(", ")
                    );
                }
            }
            errors
        })
    };
    let request = match request {
        Ok(request) => Some(request),
        Err(request_errors) => {
            errors.extend(request_errors);
            None
        }
    };

    let field = |name: &str| object.get(name).filter(|v| !v.is_null());
    let string_field = |errors: &mut ValidationErrors, name: &str| match field(name) {
        None => None,
        Some(Value::String(text)) => Some(text.clone()),
        Some(other) => {
            errors.push(
                name,
                "type",
                format!("must be a string, got {}", kind(other)),
            );
            None
        }
    };
    let metadata = match field("metadata") {
        None => None,
        Some(value @ Value::Object(_)) => Some(value.clone()),
        Some(other) => {
            errors.push(
                "metadata",
                "type",
                format!("must be a JSON object, got {}", kind(other)),
            );
            None
        }
    };
    let webhook_url = string_field(&mut errors, "webhook_url");
    let idempotency_key = string_field(&mut errors, "idempotency_key");
    let priority = match string_field(&mut errors, "priority") {
        None => Priority::Normal,
        Some(text) => text.parse::<Priority>().unwrap_or_else(|message| {
            errors.push("priority", "one_of", message);
            Priority::Normal
        }),
    };
    let not_before = string_field(&mut errors, "not_before").and_then(|text| {
        match OffsetDateTime::parse(&text, &Rfc3339) {
            Ok(time) => Some(time),
            Err(error) => {
                errors.push(
                    "not_before",
                    "format",
                    format!("must be an RFC 3339 date-time such as 2026-01-31T12:00:00Z: {error}"),
                );
                None
            }
        }
    });
    let has_request = request.is_some();
    let spec = JobSpec {
        // A placeholder only serves to check the job's own fields; its errors are dropped.
        request: request.unwrap_or_else(|| GenerationRequest::new("", "")),
        metadata,
        webhook_url,
        idempotency_key,
        priority,
        not_before,
        tenant: string_field(&mut errors, "tenant"),
    };
    if let Err(own) = spec.validate() {
        own.into_iter()
            .filter(|e| e.path != "request" && !e.path.starts_with("request."))
            .for_each(|e| errors.push_error(e));
    }
    if errors.is_empty() && has_request {
        Ok(spec)
    } else {
        Err(errors)
    }
}

/// One entry of a batch file: the line it starts on (1-based) and the job or its errors.
#[derive(Debug, Clone, PartialEq)]
pub struct FileEntry {
    pub line: u64,
    pub entry: Result<JobSpec, ValidationErrors>,
}

/// A batch file's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileFormat {
    JsonLines,
    Csv,
}

/// A batch file that cannot be read as a whole (as opposed to some of its entries).
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("reading the batch file: {0}")]
    Io(#[from] std::io::Error),
    #[error("line {line}: {message}")]
    Header { line: u64, message: String },
    #[error("line {line}: {message}")]
    Csv { line: u64, message: String },
}

/// Parses JSON Lines: one job (nested or flat) per line; blank lines are skipped.
pub fn parse_json_lines(text: &str) -> Vec<FileEntry> {
    json_lines(text, usize::MAX).collect()
}

/// The entries of JSON Lines, parsed one at a time as the iterator is read (see
/// [`parse_job_text`]; a line longer than `max_entry_bytes` is an invalid entry).
pub fn json_lines(text: &str, max_entry_bytes: usize) -> impl Iterator<Item = FileEntry> + '_ {
    json_lines_text(text).map(move |(line, entry)| FileEntry {
        line,
        entry: parse_job_text(entry, max_entry_bytes),
    })
}

/// The entries of JSON Lines as text, with their 1-based line: the non-blank lines.
pub fn json_lines_text(text: &str) -> impl Iterator<Item = (u64, &str)> + '_ {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(index, line)| (index as u64 + 1, line))
}

/// Most JSON values (objects, arrays, strings, numbers, ...) one job written as JSON may
/// hold. A job has a few dozen; metadata at its 16 KB limit has at most about 8,000. The
/// bound keeps a parsed entry's memory within a small multiple of its text.
pub const MAX_ENTRY_VALUES: usize = 20_000;

/// Parses one job written as JSON text (a batch entry, a JSON Lines line): at most
/// `max_bytes` long and [`MAX_ENTRY_VALUES`] values, checked before or while parsing, so an
/// entry never takes much more memory than its text. Invalid JSON is an entry error (`json`).
pub fn parse_job_text(text: &str, max_bytes: usize) -> Result<JobSpec, ValidationErrors> {
    let mut errors = ValidationErrors::default();
    if text.len() > max_bytes {
        errors.push(
            "",
            "max_length",
            format!(
                "a job may be at most {max_bytes} bytes of JSON, got {}",
                text.len()
            ),
        );
        return Err(errors);
    }
    let left = Cell::new(MAX_ENTRY_VALUES);
    let exceeded = Cell::new(false);
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let parsed = BoundedValue {
        left: &left,
        exceeded: &exceeded,
    }
    .deserialize(&mut deserializer)
    .and_then(|value| deserializer.end().map(|()| value));
    match parsed {
        Ok(value) => parse_job_value(value),
        Err(_) if exceeded.get() => {
            errors.push(
                "",
                "max_items",
                format!("a job may hold at most {MAX_ENTRY_VALUES} JSON values"),
            );
            Err(errors)
        }
        Err(error) => {
            let message = error
                .to_string()
                .replace(" at line 1 column ", " at column ");
            errors.push("", "json", format!("is not valid JSON: {message}"));
            Err(errors)
        }
    }
}

/// A JSON value built while counting its values down from `left`; parsing fails (setting
/// `exceeded`) when none are left.
struct BoundedValue<'a> {
    left: &'a Cell<usize>,
    exceeded: &'a Cell<bool>,
}

impl BoundedValue<'_> {
    fn take<E: serde::de::Error>(&self) -> Result<(), E> {
        match self.left.get() {
            0 => {
                self.exceeded.set(true);
                Err(E::custom("too many JSON values"))
            }
            n => {
                self.left.set(n - 1);
                Ok(())
            }
        }
    }

    fn child(&self) -> Self {
        Self {
            left: self.left,
            exceeded: self.exceeded,
        }
    }
}

impl<'de> DeserializeSeed<'de> for BoundedValue<'_> {
    type Value = Value;

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for BoundedValue<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Value, E> {
        self.take()?;
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Value, E> {
        self.take()?;
        Ok(Value::from(v))
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Value, E> {
        self.take()?;
        Ok(Value::from(v))
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Value, E> {
        self.take()?;
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Value, E> {
        self.take()?;
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Value, E> {
        self.take()?;
        Ok(Value::String(v))
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Value, E> {
        self.take()?;
        Ok(Value::Null)
    }

    fn visit_none<E: serde::de::Error>(self) -> Result<Value, E> {
        self.visit_unit()
    }

    fn visit_some<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        self.take()?;
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(self.child())? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        self.take()?;
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            self.take()?;
            let value = map.next_value_seed(self.child())?;
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

/// Bytes that are not UTF-8, where they start: the 1-based line and the byte offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: not valid UTF-8 (at byte offset {byte_offset})")]
pub struct NotUtf8 {
    pub line: u64,
    pub byte_offset: usize,
}

impl NotUtf8 {
    /// Where `error` found the first invalid byte of `bytes`.
    pub fn locate(bytes: &[u8], error: &std::str::Utf8Error) -> Self {
        let valid = &bytes[..error.valid_up_to()];
        Self {
            line: 1 + valid.iter().filter(|b| **b == b'\n').count() as u64,
            byte_offset: error.valid_up_to(),
        }
    }

    /// The error as a field error (rule `utf8`) of the whole input.
    pub fn field_error(&self) -> klingq_core::FieldError {
        klingq_core::FieldError::new(
            "",
            "utf8",
            format!(
                "is not valid UTF-8: the bytes at offset {} (line {}) are not text",
                self.byte_offset, self.line
            ),
        )
    }
}

/// The input as text, or where it stops being UTF-8.
pub fn utf8_text(bytes: &[u8]) -> Result<&str, NotUtf8> {
    std::str::from_utf8(bytes).map_err(|error| NotUtf8::locate(bytes, &error))
}

/// Parses CSV with a header row (see the module docs for the mapping).
pub fn parse_csv(reader: impl Read) -> Result<Vec<FileEntry>, FileError> {
    let mut csv = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(false)
        .trim(csv::Trim::Headers)
        .from_reader(reader);
    let headers = csv.headers().map_err(|error| csv_error(&error, 1))?.clone();
    let mut columns = Vec::with_capacity(headers.len());
    for (index, name) in headers.iter().enumerate() {
        let name = name.trim_start_matches('\u{feff}');
        if !REQUEST_FIELDS.contains(&name) && !JOB_FIELDS.contains(&name) {
            return Err(FileError::Header {
                line: 1,
                message: format!(
                    "column {} `{name}` is not a field: use {} or {}",
                    index + 1,
                    REQUEST_FIELDS.join(", "),
                    JOB_FIELDS.join(", ")
                ),
            });
        }
        if columns.contains(&name.to_owned()) {
            return Err(FileError::Header {
                line: 1,
                message: format!("column `{name}` appears twice"),
            });
        }
        columns.push(name.to_owned());
    }
    let mut entries = Vec::new();
    let mut record = csv::StringRecord::new();
    loop {
        let line = csv.position().line();
        match csv.read_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {}
            Err(error) => return Err(csv_error(&error, line)),
        }
        let line = record.position().map(|p| p.line()).unwrap_or(line);
        if record.iter().all(|cell| cell.trim().is_empty()) {
            continue;
        }
        let mut object = Map::new();
        let mut cell_errors = ValidationErrors::default();
        for (name, cell) in columns.iter().zip(record.iter()) {
            if cell.is_empty() {
                continue;
            }
            let value = match name.as_str() {
                "cfg_scale" => cell
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .and_then(serde_json::Number::from_f64)
                    .map(Value::Number)
                    .unwrap_or_else(|| Value::String(cell.to_owned())),
                "generate_audio" => match cell.trim().to_ascii_lowercase().as_str() {
                    "true" | "1" | "yes" => Value::Bool(true),
                    "false" | "0" | "no" => Value::Bool(false),
                    _ => Value::String(cell.to_owned()),
                },
                "metadata" => match serde_json::from_str::<Value>(cell) {
                    Ok(value) => value,
                    Err(error) => {
                        cell_errors.push(
                            "metadata",
                            "type",
                            format!("must be a JSON object written as JSON: {error}"),
                        );
                        continue;
                    }
                },
                _ => Value::String(cell.to_owned()),
            };
            object.insert(name.clone(), value);
        }
        let entry = match parse_job_value(Value::Object(object)) {
            Ok(spec) if cell_errors.is_empty() => Ok(spec),
            Ok(_) => Err(cell_errors),
            Err(mut errors) => {
                errors.extend(cell_errors);
                Err(errors)
            }
        };
        entries.push(FileEntry { line, entry });
    }
    Ok(entries)
}

fn csv_error(error: &csv::Error, line: u64) -> FileError {
    let line = error.position().map(|p| p.line()).unwrap_or(line);
    let message = match error.kind() {
        csv::ErrorKind::UnequalLengths {
            expected_len, len, ..
        } => format!("has {len} cells; the header has {expected_len}"),
        csv::ErrorKind::Utf8 { .. } => "is not valid UTF-8".to_owned(),
        _ => error.to_string(),
    };
    FileError::Csv { line, message }
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn rules(value: Value) -> Vec<(String, String)> {
        match parse_job(&value) {
            Ok(_) => Vec::new(),
            Err(errors) => errors.into_iter().map(|e| (e.path, e.rule)).collect(),
        }
    }

    fn pair(path: &str, rule: &str) -> (String, String) {
        (path.to_owned(), rule.to_owned())
    }

    #[test]
    fn flat_and_nested_jobs_parse_to_the_same_spec() {
        let flat = parse_job(&json!({
            "start_image_url": "https://e.com/a.png", "prompt": "a cat",
            "metadata": {"user": 7}, "priority": "high", "not_before": "2030-01-01T00:00:00Z"
        }))
        .unwrap();
        let nested = parse_job(&json!({
            "request": {"start_image_url": "https://e.com/a.png", "prompt": "a cat"},
            "metadata": {"user": 7}, "priority": "high", "not_before": "2030-01-01T00:00:00Z"
        }))
        .unwrap();
        assert_eq!(flat, nested);
        assert_eq!(flat.priority, Priority::High);
        assert!(flat.not_before.is_some());
        let bare = parse_job(&json!({"start_image_url": "https://e.com/a.png", "prompt": "p"}));
        assert!(bare.unwrap().metadata.is_none());
    }

    #[test]
    fn every_error_names_its_path_in_either_shape() {
        assert_eq!(
            rules(
                json!({"request": {"start_image_url": "https://e.com/a.png"},
                "metadata": [1], "priority": "urgent", "colour": 1})
            ),
            vec![
                pair("colour", "unknown_field"),
                pair("request.prompt", "required"),
                pair("metadata", "type"),
                pair("priority", "one_of"),
            ]
        );
        assert_eq!(
            rules(
                json!({"start_image_url": "ftp://x", "prompt": "p", "webhook_url": "nope",
                "idempotency_key": "", "not_before": "tomorrow", "colour": 1})
            ),
            vec![
                pair("colour", "unknown_field"),
                pair("start_image_url", "url"),
                pair("not_before", "format"),
                pair("webhook_url", "url"),
                pair("idempotency_key", "max_length"),
            ]
        );
        assert_eq!(rules(json!("a string")), vec![pair("", "type")]);
        assert_eq!(
            rules(json!({"request": null})),
            vec![pair("request", "type")]
        );
    }

    #[test]
    fn json_lines_keep_line_numbers_and_skip_blank_lines() {
        let text = "{\"start_image_url\": \"https://e.com/a.png\", \"prompt\": \"p\"}\n\n{oops\n{\"prompt\": \"p\"}\n";
        let entries = parse_json_lines(text);
        let lines: Vec<_> = entries.iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![1, 3, 4]);
        assert!(entries[0].entry.is_ok());
        let json_error = entries[1].entry.clone().unwrap_err();
        assert_eq!(json_error.0[0].rule, "json");
        let missing = entries[2].entry.clone().unwrap_err();
        assert_eq!(missing.0[0].path, "start_image_url");
    }

    #[test]
    fn job_text_is_parsed_within_its_size_and_value_limits() {
        let good = r#"{"start_image_url": "https://e.com/a.png", "prompt": "p"}"#;
        assert!(parse_job_text(good, 1024).is_ok());
        let rule = |result: Result<JobSpec, ValidationErrors>| {
            let errors = result.unwrap_err();
            (errors.0[0].path.clone(), errors.0[0].rule.clone())
        };
        assert_eq!(rule(parse_job_text(good, 10)), pair("", "max_length"));
        assert_eq!(rule(parse_job_text("{oops", 1024)), pair("", "json"));
        assert_eq!(
            rule(parse_job_text(&format!("{good} x"), 1024)),
            pair("", "json")
        );
        // 25,000 numbers in 50 KB: refused while parsing, before they are all built.
        let many = format!(
            r#"{{"start_image_url": "https://e.com/a.png", "prompt": "p", "metadata": {{"n": [{}]}}}}"#,
            vec!["0"; 25_000].join(",")
        );
        assert_eq!(
            rule(parse_job_text(&many, usize::MAX)),
            pair("", "max_items")
        );
        // 9,000 (18 KB) are parsed, then checked as a job.
        let fewer = many.replace(&vec!["0"; 25_000].join(","), &vec!["0"; 9_000].join(","));
        assert_eq!(
            parse_job_text(&fewer, usize::MAX)
                .map_err(|e| e.0[0].clone())
                .err()
                .map(|e| (e.path, e.rule)),
            Some(pair("metadata", "max_length"))
        );
    }

    #[test]
    fn text_that_is_not_utf8_is_located() {
        assert_eq!(utf8_text(b"ab\ncd"), Ok("ab\ncd"));
        let error = utf8_text(b"ab\ncd\n\xffe").unwrap_err();
        assert_eq!(
            error,
            NotUtf8 {
                line: 3,
                byte_offset: 6
            }
        );
        assert_eq!(
            error.to_string(),
            "line 3: not valid UTF-8 (at byte offset 6)"
        );
        assert_eq!(error.field_error().rule, "utf8");
        let lines = json_lines(&"x".repeat(20), 10).collect::<Vec<_>>();
        assert_eq!(lines[0].entry.clone().unwrap_err().0[0].rule, "max_length");
    }

    #[test]
    fn csv_maps_columns_to_fields() {
        let text = "start_image_url,prompt,duration,cfg_scale,generate_audio,metadata,priority,voice_ids\n\
            https://e.com/a.png,\"a cat, walking\",10,0.7,no,\"{\"\"user\"\": 1}\",low,\"[\"\"v1\"\"]\"\n\
            https://e.com/b.png,,,,,,,\n\
            https://e.com/c.png,p,,abc,maybe,{bad,,\n";
        let entries = parse_csv(text.as_bytes()).unwrap();
        assert_eq!(entries.len(), 3);
        let first = entries[0].entry.clone().unwrap();
        assert_eq!(first.request.prompt.as_deref(), Some("a cat, walking"));
        assert_eq!(first.request.billed_seconds(), 10);
        assert_eq!(first.request.cfg_scale, 0.7);
        assert!(!first.request.generate_audio);
        assert_eq!(first.metadata, Some(json!({"user": 1})));
        assert_eq!(first.priority, Priority::Low);
        assert_eq!(first.request.voice_ids, Some(vec!["v1".to_owned()]));
        assert_eq!(entries[1].line, 3);
        let second = entries[1].entry.clone().unwrap_err();
        assert_eq!(second.0[0].path, "prompt");
        let third: Vec<_> = entries[2]
            .entry
            .clone()
            .unwrap_err()
            .into_iter()
            .map(|e| (e.path, e.rule))
            .collect();
        assert_eq!(
            third,
            vec![
                pair("generate_audio", "type"),
                pair("cfg_scale", "type"),
                pair("metadata", "type")
            ]
        );
    }

    #[test]
    fn csv_rejects_unknown_columns_and_ragged_rows() {
        let error = parse_csv("start_image_url,colour\nx,y\n".as_bytes()).unwrap_err();
        assert!(
            error.to_string().starts_with("line 1: column 2 `colour`"),
            "{error}"
        );
        let error = parse_csv("start_image_url,prompt\nx,y\nx\n".as_bytes()).unwrap_err();
        assert_eq!(error.to_string(), "line 3: has 1 cells; the header has 2");
    }
}
