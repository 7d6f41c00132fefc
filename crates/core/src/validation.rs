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
    /// `max_length`, `min_items`, `max_items`, `url`, `sum`, `element_kind`.
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

/// Every violation found in one input; never empty when returned as an error.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ValidationErrors(pub Vec<FieldError>);

impl ValidationErrors {
    pub fn push(&mut self, path: impl Into<String>, rule: &str, message: impl Into<String>) {
        self.0.push(FieldError::new(path, rule, message));
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
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
        if self.0.is_empty() { Ok(()) } else { Err(self) }
    }
}

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n_errors = self.0.len();
        write!(
            f,
            "{n_errors} validation error{}",
            if n_errors == 1 { "" } else { "s" }
        )?;
        for error in &self.0 {
            write!(f, "\n  {error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ValidationErrors {}

impl IntoIterator for ValidationErrors {
    type Item = FieldError;
    type IntoIter = std::vec::IntoIter<FieldError>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}
