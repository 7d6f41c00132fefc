//! Validation errors that name the field path and the rule, collected all at once.

use std::fmt;

use serde::{Deserialize, Serialize};

/// One violated rule: where (`path`, e.g. `multi_prompt[2].duration`), which rule (a stable
/// machine-readable code such as `required` or `range`) and a sentence for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldError {
    /// Path of the offending field, dotted with `[index]` for array items. Empty for the root.
    pub path: String,
    /// Stable rule code: `required`, `type`, `unknown_field`, `exclusive`, `one_of`, `range`,
    /// `max_length`, `min_items`, `max_items`, `url`, `sum`, `element_kind`, `control_char`, `pattern`.
    pub rule: String,
    /// A sentence saying what is wrong and what is accepted.
    pub message: String,
}

impl FieldError {
    pub fn new(path: impl Into<String>, rule: &str, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            rule: rule.to_owned(),
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = if self.path.is_empty() {
            "(request)"
        } else {
            &self.path
        };
        write!(f, "{path}: {} [{}]", self.message, self.rule)
    }
}

/// Most errors one input (a job, a request, a batch's options) lists; the rest are counted.
/// An input of any size thus costs a bounded amount of memory to refuse.
pub const MAX_LISTED_ERRORS: usize = 100;

/// Every violation found in one input, the first [`MAX_LISTED_ERRORS`] listed and all counted;
/// never empty when returned as an error. Serialized as the list.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ValidationErrors(
    /// The listed errors.
    pub Vec<FieldError>,
    /// Errors found past the first [`MAX_LISTED_ERRORS`], counted only.
    #[serde(skip)]
    usize,
);

impl ValidationErrors {
    pub fn push(&mut self, path: impl Into<String>, rule: &str, message: impl Into<String>) {
        self.push_error(FieldError::new(path, rule, message));
    }

    /// Lists `error` while fewer than [`MAX_LISTED_ERRORS`] are listed; counts it either way.
    pub fn push_error(&mut self, error: FieldError) {
        if self.0.len() < MAX_LISTED_ERRORS {
            self.0.push(error);
        } else {
            self.1 += 1;
        }
    }

    /// Adds every error of `other`, listed or counted.
    pub fn extend(&mut self, other: ValidationErrors) {
        let unlisted = other.1;
        for error in other.0 {
            self.push_error(error);
        }
        self.1 += unlisted;
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every error found, listed or not.
    pub fn len(&self) -> usize {
        self.0.len() + self.1
    }

    /// Errors found but not listed.
    pub fn unlisted(&self) -> usize {
        self.1
    }

    pub fn iter(&self) -> impl Iterator<Item = &FieldError> {
        self.0.iter()
    }

    /// Prefixes every path, e.g. with `request` when the request is nested in a job.
    pub fn prefixed(mut self, prefix: &str) -> Self {
        for error in &mut self.0 {
            error.path = if error.path.is_empty() {
                prefix.to_owned()
            } else if error.path.starts_with('[') {
                format!("{prefix}{}", error.path)
            } else {
                format!("{prefix}.{}", error.path)
            };
        }
        self
    }

    pub fn into_result(self) -> Result<(), ValidationErrors> {
        if self.is_empty() { Ok(()) } else { Err(self) }
    }

    /// The first line of the display, without the list: `3 validation errors`.
    pub fn summary(&self) -> String {
        let n_errors = self.len();
        format!(
            "{n_errors} validation error{}",
            if n_errors == 1 { "" } else { "s" }
        )
    }
}

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.summary())?;
        for error in &self.0 {
            write!(f, "\n  {error}")?;
        }
        if self.1 > 0 {
            write!(
                f,
                "\n  ... and {} more (the first {MAX_LISTED_ERRORS} are listed)",
                self.1
            )?;
        }
        Ok(())
    }
}

impl FromIterator<FieldError> for ValidationErrors {
    fn from_iter<I: IntoIterator<Item = FieldError>>(iter: I) -> Self {
        let mut errors = Self::default();
        for error in iter {
            errors.push_error(error);
        }
        errors
    }
}

impl std::error::Error for ValidationErrors {}

/// The listed errors ([`ValidationErrors::unlisted`] counts the others).
impl IntoIterator for ValidationErrors {
    type Item = FieldError;
    type IntoIter = std::vec::IntoIter<FieldError>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_errors_are_listed_and_all_are_counted() {
        let mut errors = ValidationErrors::default();
        for n in 0..150 {
            errors.push(format!("field{n}"), "unknown_field", "is not a field");
        }
        assert_eq!(
            (errors.0.len(), errors.len(), errors.unlisted()),
            (100, 150, 50)
        );
        let mut more = ValidationErrors::default();
        more.push("x", "type", "is wrong");
        more.extend(errors.clone());
        assert_eq!((more.0.len(), more.len()), (100, 151));
        let prefixed = errors.prefixed("request");
        assert_eq!(prefixed.len(), 150);
        assert_eq!(prefixed.0[0].path, "request.field0");
        let text = prefixed.to_string();
        assert!(text.starts_with("150 validation errors\n"), "{text:.40}");
        assert!(
            text.ends_with("... and 50 more (the first 100 are listed)"),
            "{text}"
        );
        assert_eq!(text.lines().count(), 102);
        assert!(prefixed.clone().into_result().is_err());
        assert_eq!(
            serde_json::to_value(&prefixed)
                .unwrap()
                .as_array()
                .unwrap()
                .len(),
            100
        );
    }
}
