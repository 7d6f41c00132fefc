//! Redaction: secrets and signed URLs that must never reach a log or an error message.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A secret string (API key, webhook secret, token). `Debug` and `Display` print `[redacted]`;
/// the value is reached only through [`Secret::expose`], which makes every use easy to find.
/// Every secret registers its value with the scrubber ([`crate::scrub`]) when it is made, so
/// an error text that echoes it loses it.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        let value = value.into();
        crate::scrub::register_secret(&value);
        Self(value)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() {
            "[empty]"
        } else {
            "[redacted]"
        })
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self::new(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Self::new(value)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Secret::new)
    }
}

/// Serializes as `[redacted]`, so a config dump never carries the value.
impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("[redacted]")
    }
}

/// A URL that may carry credentials in its query (presigned S3 or provider download URLs).
/// `Display` shows scheme, host and path only; the query, fragment and userinfo are cut.
#[derive(Clone, PartialEq, Eq)]
pub struct SignedUrl(String);

impl SignedUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SignedUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}

impl fmt::Debug for SignedUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SignedUrl({})", redact_url(&self.0))
    }
}

/// Cuts the query, fragment and userinfo from a URL, for logs and error messages.
pub fn redact_url(url: &str) -> String {
    // A list of Redis seed nodes, or a Sentinel URL naming several hosts: each part alone.
    if url.contains(',')
        && url
            .get(..5)
            .is_some_and(|s| s.eq_ignore_ascii_case("redis"))
    {
        return url
            .split(',')
            .map(|part| redact_one(part.trim()))
            .collect::<Vec<_>>()
            .join(",");
    }
    redact_one(url)
}

fn redact_one(url: &str) -> String {
    if url.len() > 5 && url[..5].eq_ignore_ascii_case("data:") {
        return "data:[redacted]".to_owned();
    }
    let without_query = url.split(['?', '#']).next().unwrap_or_default();
    let (scheme, rest) = match without_query.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, without_query),
    };
    let (authority, path) = match rest.find('/') {
        Some(index) => rest.split_at(index),
        None => (rest, ""),
    };
    let host = authority.rsplit('@').next().unwrap_or_default();
    let redacted_query = if without_query.len() < url.len() {
        "?[redacted]"
    } else {
        ""
    };
    match scheme {
        Some(scheme) => format!("{scheme}://{host}{path}{redacted_query}"),
        None => format!("{host}{path}{redacted_query}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let secret = Secret::new("rf_live_abc");
        assert_eq!(format!("{secret} {secret:?}"), "[redacted] [redacted]");
        assert_eq!(serde_json::to_string(&secret).unwrap(), "\"[redacted]\"");
        assert_eq!(secret.expose(), "rf_live_abc");
    }

    #[test]
    fn url_lists_lose_every_password() {
        assert_eq!(
            redact_url("redis://:pw1@a:7000,rediss://u:pw2@b:7001/0"),
            "redis://a:7000,rediss://b:7001/0"
        );
        assert_eq!(
            redact_url("redis+sentinel://app:pw@s1:26379,s2:26379/mymaster?sentinel_password=x"),
            "redis+sentinel://s1:26379,s2:26379/mymaster?[redacted]"
        );
    }

    #[test]
    fn urls_lose_query_and_userinfo() {
        assert_eq!(
            redact_url("https://user:pw@s3.example.com/b/k.mp4?X-Amz-Signature=abc#f"),
            "https://s3.example.com/b/k.mp4?[redacted]"
        );
        assert_eq!(redact_url("http://h:9000"), "http://h:9000");
        assert_eq!(redact_url("data:image/png;base64,AAAA"), "data:[redacted]");
        let url = SignedUrl::new("http://sim/files/r.mp4?exp=1&sig=deadbeef");
        assert!(!format!("{url} {url:?}").contains("deadbeef"));
    }
}
