//! The one scrubber every error text passes through before it reaches a record, an event, a
//! webhook or a log: a provider (or a proxy, or a receiver) may echo what we sent it, such as
//! the `Authorization` header, into its error body.
//!
//! [`scrub`] removes
//! - every secret the process knows: each [`crate::Secret`] registers its value when it is
//!   made (API keys, API tokens, webhook and callback secrets), and [`register_secret`] adds
//!   others (the AWS secret key from the environment);
//! - bearer tokens and `Authorization` header values, whatever they are;
//! - the query string of every URL (presigned S3 and provider download URLs carry their
//!   signature there);
//!
//! and caps the text at [`MAX_TEXT_CHARS`] characters.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::sync::{LazyLock, RwLock};

/// Longest error text kept, in characters.
pub const MAX_TEXT_CHARS: usize = 2_000;
/// What stands where a secret was.
pub const REDACTED: &str = "[redacted]";
/// Values shorter than this are not treated as secrets (they would match ordinary words).
const MIN_SECRET_LEN: usize = 8;
/// At most this many distinct secrets are remembered.
const MAX_SECRETS: usize = 4_096;

static SECRETS: LazyLock<RwLock<BTreeSet<String>>> = LazyLock::new(Default::default);

/// Registers a secret value: from now on [`scrub`] removes it from every text. Values shorter
/// than 8 bytes are ignored. A Standard Webhooks secret (`whsec_<base64>`) registers its key
/// part as well.
pub fn register_secret(value: &str) {
    let value = value.trim();
    if value.len() < MIN_SECRET_LEN {
        return;
    }
    let mut secrets = SECRETS.write().unwrap_or_else(|e| e.into_inner());
    if secrets.len() >= MAX_SECRETS || secrets.contains(value) {
        return;
    }
    secrets.insert(value.to_owned());
    if let Some(key) = value.strip_prefix("whsec_")
        && key.len() >= MIN_SECRET_LEN
    {
        secrets.insert(key.to_owned());
    }
}

/// `text` without known secrets, bearer tokens, `Authorization` values and URL query strings,
/// cut to [`MAX_TEXT_CHARS`] characters.
pub fn scrub(text: &str) -> String {
    let mut out = Cow::Borrowed(text);
    {
        let secrets = SECRETS.read().unwrap_or_else(|e| e.into_inner());
        // Longest first, so a secret that contains another is removed whole.
        let mut ordered: Vec<&String> = secrets
            .iter()
            .filter(|s| out.contains(s.as_str()))
            .collect();
        ordered.sort_by_key(|s| std::cmp::Reverse(s.len()));
        for secret in ordered {
            out = Cow::Owned(out.replace(secret.as_str(), REDACTED));
        }
    }
    let out = redact_after_keywords(&out);
    let out = strip_url_queries(&out);
    truncate(out)
}

/// Whether `text` is unchanged by [`scrub`].
pub fn is_clean(text: &str) -> bool {
    scrub(text) == text
}

/// Replaces the value after `bearer `, `basic ` and `authorization:` / `"authorization":"`
/// (any case) with [`REDACTED`].
fn redact_after_keywords(text: &str) -> String {
    const KEYWORDS: [&str; 4] = ["bearer ", "basic ", "authorization:", "authorization\":"];
    let lower = text.to_ascii_lowercase();
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut at = 0;
    while at < text.len() {
        let Some((keyword_at, keyword)) = KEYWORDS
            .iter()
            .filter_map(|k| lower[at..].find(k).map(|i| (at + i, *k)))
            .min_by_key(|(i, _)| *i)
        else {
            break;
        };
        let mut value_start = keyword_at + keyword.len();
        // Skip spaces and an opening quote after `authorization:`.
        while let Some(c) = text[value_start..].chars().next() {
            if c == ' ' || c == '"' || c == '\'' {
                value_start += c.len_utf8();
            } else {
                break;
            }
        }
        // An `Authorization: Bearer x` value is handled by the `bearer ` keyword after it.
        let rest_lower = &lower[value_start..];
        if keyword.starts_with("authorization")
            && (rest_lower.starts_with("bearer ") || rest_lower.starts_with("basic "))
        {
            at = value_start;
            continue;
        }
        // A bearer or basic credential is one word; an `Authorization` value runs to the end
        // of the header (or the JSON string).
        let header = keyword.starts_with("authorization");
        let value_end = text[value_start..]
            .find(|c: char| {
                matches!(c, '"' | '\'' | ',' | ';' | '}' | ']' | '\r' | '\n')
                    || (!header && c.is_whitespace())
            })
            .map_or(text.len(), |i| value_start + i);
        if value_end > value_start && &text[value_start..value_end] != REDACTED {
            out.push_str(&text[copied..value_start]);
            out.push_str(REDACTED);
            copied = value_end;
        }
        at = value_end.max(value_start).max(keyword_at + 1);
    }
    out.push_str(&text[copied..]);
    out
}

/// Cuts the query (and fragment) of every `http://` or `https://` URL in `text`.
fn strip_url_queries(text: &str) -> String {
    let lower = text.to_ascii_lowercase();
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut at = 0;
    while let Some(found) = ["http://", "https://"]
        .iter()
        .filter_map(|scheme| lower[at..].find(scheme))
        .min()
    {
        let start = at + found;
        let end = text[start..]
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '<' | '>' | '`'))
            .map_or(text.len(), |i| start + i);
        let url = &text[start..end];
        if let Some(query) = url.find(['?', '#']) {
            out.push_str(&text[copied..start + query]);
            out.push_str("?[redacted]");
            copied = end;
        }
        at = end.max(start + 1);
    }
    out.push_str(&text[copied..]);
    out
}

fn truncate(text: String) -> String {
    match text.char_indices().nth(MAX_TEXT_CHARS) {
        None => text,
        Some((cut, _)) => format!("{}… [truncated]", &text[..cut]),
    }
}

/// Serializes a string field through [`scrub`] (`#[serde(serialize_with = ...)]`).
pub fn serialize_scrubbed<S: serde::Serializer>(
    text: &str,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&scrub(text))
}

/// Scrubs every string inside a JSON value.
pub fn scrub_json(value: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::String(text) => Value::String(scrub(text)),
        Value::Array(items) => Value::Array(items.iter().map(scrub_json).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(key, value)| (key.clone(), scrub_json(value)))
                .collect(),
        ),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_secrets_are_removed() {
        register_secret("rf_live_0123456789abcdef");
        let text =
            r#"{"message":"bad key rf_live_0123456789abcdef","echo":"rf_live_0123456789abcdef"}"#;
        let scrubbed = scrub(text);
        assert!(!scrubbed.contains("rf_live_0123456789abcdef"), "{scrubbed}");
        assert!(scrubbed.contains("bad key [redacted]"));
    }

    #[test]
    fn webhook_secrets_lose_their_key_part_too() {
        register_secret("whsec_c2VjcmV0LXNlY3JldC1zZWNyZXQ=");
        assert_eq!(
            scrub("key c2VjcmV0LXNlY3JldC1zZWNyZXQ= leaked"),
            "key [redacted] leaked"
        );
    }

    #[test]
    fn short_values_are_not_secrets() {
        register_secret("abc");
        assert_eq!(scrub("abc def"), "abc def");
    }

    #[test]
    fn bearer_tokens_and_authorization_values_are_removed() {
        assert_eq!(
            scrub("echo: Authorization: Bearer sk-unknown-token-1 rejected"),
            "echo: Authorization: Bearer [redacted] rejected"
        );
        assert_eq!(
            scrub(r#"{"headers":{"authorization":"Token abc123456789"}}"#),
            r#"{"headers":{"authorization":"[redacted]"}}"#
        );
        assert_eq!(
            scrub("Authorization: Digest user=x, realm=y\nnext line"),
            "Authorization: [redacted], realm=y\nnext line"
        );
        assert_eq!(scrub("basic dXNlcjpwYXNz"), "basic [redacted]");
    }

    #[test]
    fn url_queries_are_cut() {
        assert_eq!(
            scrub(
                "GET https://bucket.s3.amazonaws.com/v.mp4?X-Amz-Signature=abc&X-Amz-Credential=k failed"
            ),
            "GET https://bucket.s3.amazonaws.com/v.mp4?[redacted] failed"
        );
        assert_eq!(
            scrub(r#"url "http://x/y#frag" and http://z/ok"#),
            r#"url "http://x/y?[redacted]" and http://z/ok"#
        );
    }

    #[test]
    fn long_texts_are_capped() {
        let scrubbed = scrub(&"é".repeat(10_000));
        assert_eq!(
            scrubbed.chars().count(),
            MAX_TEXT_CHARS + "… [truncated]".chars().count()
        );
    }

    #[test]
    fn clean_text_is_unchanged() {
        let text = "the provider failed the run: PROVIDER_TIMEOUT (stage 2)";
        assert!(is_clean(text));
    }
}
