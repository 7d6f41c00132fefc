//! A URL wrapper that keeps query strings and credentials out of logs and error messages.
//!
//! Provider download URLs and our presigned GET URLs carry their signature in the query
//! (`X-Amz-Signature=...`), and some carry user info. [`RedactedUrl`] keeps only the scheme,
//! host, port and path, and marks a dropped query with `?…`.

use std::fmt;

/// A URL reduced to `scheme://host[:port]/path`, safe to log.
///
/// It never stores the query or user info, so no formatting of it can leak them.
#[derive(Clone, PartialEq, Eq)]
pub struct RedactedUrl {
    redacted: String,
}

impl RedactedUrl {
    /// Redacts `url`; a string that does not parse as a URL becomes `<invalid url>`.
    pub fn new(url: &str) -> RedactedUrl {
        let redacted = match reqwest::Url::parse(url) {
            Ok(parsed) => {
                let mut redacted =
                    format!("{}://{}", parsed.scheme(), parsed.host_str().unwrap_or(""));
                if let Some(port) = parsed.port() {
                    redacted.push_str(&format!(":{port}"));
                }
                redacted.push_str(parsed.path());
                if parsed.query().is_some() {
                    redacted.push_str("?…");
                }
                redacted
            }
            Err(_) => "<invalid url>".to_owned(),
        };
        RedactedUrl { redacted }
    }

    /// The redacted form, the same as the `Display` output.
    pub fn as_str(&self) -> &str {
        &self.redacted
    }
}

impl fmt::Display for RedactedUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted)
    }
}

impl fmt::Debug for RedactedUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.redacted, f)
    }
}

#[cfg(test)]
mod tests {
    use super::RedactedUrl;

    #[test]
    fn drops_query_and_user_info() {
        let url = RedactedUrl::new(
            "https://user:pw@cdn.example.com:8443/outputs/a.mp4?X-Amz-Signature=abc&X-Amz-Credential=k",
        );
        assert_eq!(
            url.to_string(),
            "https://cdn.example.com:8443/outputs/a.mp4?…"
        );
        assert_eq!(
            format!("{url:?}"),
            "\"https://cdn.example.com:8443/outputs/a.mp4?…\""
        );
    }

    #[test]
    fn keeps_plain_urls_and_hides_garbage() {
        assert_eq!(
            RedactedUrl::new("http://127.0.0.1/v.mp4").as_str(),
            "http://127.0.0.1/v.mp4"
        );
        assert_eq!(
            RedactedUrl::new("not a url ?sig=1").as_str(),
            "<invalid url>"
        );
    }
}
