//! URLs users give (images, videos, webhooks), checked at enqueue the way the HTTP client will
//! read them, so a URL that can never be fetched or delivered to is refused at once instead of
//! being retried on a schedule.
//!
//! The client (reqwest) parses a URL with the `url` crate (WHATWG URL), then turns it into the
//! request line with the `http` crate's `Uri`. The `url` crate accepts hosts that `Uri` does
//! not (`https://x"onmouseover=…//e.com/` has the host `x"onmouseover=…`): such a request can
//! never be built. So an http(s) URL is accepted when the `url` crate parses it with a host
//! made of the characters an RFC 3986 authority allows (what `Uri` accepts), and it is at most
//! a length limit long, before and after the parser's encoding. The webhook delivery tests
//! check that every URL accepted here builds a request.
//!
//! A URL with whitespace or a control character is refused too: the WHATWG parser silently
//! drops tabs and newlines and trims the ends, so the URL used would not be the one given.

/// Longest webhook URL, in bytes.
pub const MAX_WEBHOOK_URL_BYTES: usize = 2048;
/// Longest http(s) URL of an image or a video, in bytes. Longer than a webhook's: presigned
/// object-store URLs with session tokens often pass 2 KB.
pub const MAX_MEDIA_URL_BYTES: usize = 8 * 1024;
/// Longest `data:` URI of an image or a video, in bytes (a 7.5 MB file in base64). The API's
/// body limits (`api.max_job_body_bytes`) may be lower.
pub const MAX_DATA_URL_BYTES: usize = 10 * 1024 * 1024;

/// Why a URL is refused: the rule (`url` or `max_length`) and a sentence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlError {
    pub rule: &'static str,
    pub message: String,
}

impl UrlError {
    fn url(message: impl Into<String>) -> Self {
        Self {
            rule: "url",
            message: message.into(),
        }
    }

    fn too_long(max: usize, got: usize, what: &str) -> Self {
        Self {
            rule: "max_length",
            message: format!("must be at most {max} bytes{what}, got {got}"),
        }
    }
}

impl std::fmt::Display for UrlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} [{}]", self.message, self.rule)
    }
}

/// A webhook URL: http(s), with a host the HTTP client can send to, at most
/// [`MAX_WEBHOOK_URL_BYTES`].
pub fn check_webhook_url(text: &str) -> Result<(), UrlError> {
    check_http_url(text, MAX_WEBHOOK_URL_BYTES)
        .map_err(|error| with_context(error, "must be an http(s) URL with a host"))
}

/// An image or video URL: http(s) as for [`check_webhook_url`] but at most
/// [`MAX_MEDIA_URL_BYTES`], or a `data:` URI (`data:[type][;base64],payload`) of at most
/// [`MAX_DATA_URL_BYTES`].
pub fn check_media_url(text: &str) -> Result<(), UrlError> {
    let context = "must be an http(s) URL with a host, or a data: URI";
    if starts_with_ignore_case(text, "data:") {
        if text.len() > MAX_DATA_URL_BYTES {
            return Err(UrlError::too_long(
                MAX_DATA_URL_BYTES,
                text.len(),
                " as a data: URI",
            ));
        }
        if let Some(bad) = text.chars().find(|c| c.is_whitespace() || c.is_control()) {
            return Err(UrlError::url(format!(
                "{context}: the data: URI contains {}",
                describe_char(bad)
            )));
        }
        if !text.contains(',') {
            return Err(UrlError::url(format!(
                "{context}: a data: URI needs a comma before its payload"
            )));
        }
        return Ok(());
    }
    check_http_url(text, MAX_MEDIA_URL_BYTES).map_err(|error| with_context(error, context))
}

fn with_context(error: UrlError, context: &str) -> UrlError {
    match error.rule {
        "url" => UrlError::url(format!("{context}: {}", error.message)),
        _ => error,
    }
}

/// An http(s) URL the HTTP client can send a request to, at most `max_bytes` long.
fn check_http_url(text: &str, max_bytes: usize) -> Result<(), UrlError> {
    // Checked before parsing, so a huge value costs nothing more.
    if text.len() > max_bytes {
        return Err(UrlError::too_long(max_bytes, text.len(), ""));
    }
    if let Some(bad) = text.chars().find(|c| c.is_whitespace() || c.is_control()) {
        return Err(UrlError::url(format!("it contains {}", describe_char(bad))));
    }
    // The parser reads `https:///x` as `https://x/`: insist on an authority as written.
    let rest = if starts_with_ignore_case(text, "https://") {
        &text[8..]
    } else if starts_with_ignore_case(text, "http://") {
        &text[7..]
    } else {
        return Err(UrlError::url("the scheme is not http:// or https://"));
    };
    let authority = rest.split(['/', '?', '#', '\\']).next().unwrap_or_default();
    let written_host = authority.rsplit('@').next().unwrap_or_default();
    if written_host.is_empty() || written_host.starts_with(':') {
        return Err(UrlError::url("it has no host"));
    }
    let parsed = url::Url::parse(text).map_err(|error| UrlError::url(error.to_string()))?;
    let host = parsed.host_str().unwrap_or_default();
    if host.is_empty() {
        return Err(UrlError::url("it has no host"));
    }
    if let Some(bad) = host.chars().find(|c| !is_authority_char(*c)) {
        return Err(UrlError::url(format!(
            "its host {host:?} contains {}, which an HTTP request cannot carry",
            describe_char(bad)
        )));
    }
    let encoded = parsed.as_str().len();
    if encoded > max_bytes {
        return Err(UrlError::too_long(max_bytes, encoded, " once encoded"));
    }
    Ok(())
}

/// Characters of an RFC 3986 host: unreserved, sub-delims, `%` of a percent-encoding, and the
/// brackets and colons of an IPv6 literal. The `http` crate refuses any other in an authority.
fn is_authority_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-._~!$&'()*+,;=%[]:".contains(c)
}

fn starts_with_ignore_case(text: &str, prefix: &str) -> bool {
    text.len() >= prefix.len()
        && text.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
}

/// `a space`, `U+0000`, `'"'`.
pub(crate) fn describe_char(c: char) -> String {
    match c {
        ' ' => "a space".to_owned(),
        c if c.is_control() || c.is_whitespace() => format!("the character U+{:04X}", c as u32),
        c => format!("{c:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(result: Result<(), UrlError>) -> Option<&'static str> {
        result.err().map(|error| error.rule)
    }

    #[test]
    fn http_urls_are_read_as_the_client_reads_them() {
        for good in [
            "https://example.com/a.png",
            "HTTP://Example.com",
            "https://user:p@ss@e.com:8443/a?q={x}|^`#frag",
            "https://[2001:db8::1]/hook",
            "https://ÉXAMPLE.com/ü",
            "http://a_b.example.com/",
        ] {
            assert_eq!(check_webhook_url(good), Ok(()), "{good}");
        }
        for bad in [
            "https://x\"onmouseover=alert(1)//e.com/",
            "https://x{y}.com/",
            "https://x`y.com/",
            "https://e.com:99999/",
            "https://exa mple.com/",
            "https://e.com/a\tb",
            "https://e.com/a\nb",
            "https://e.com/\u{0}",
            " https://e.com/",
            "https:///a.png",
            "https://:80/",
            "ftp://e.com/",
            "e.com/a",
            "data:text/plain,x",
        ] {
            assert_eq!(rule(check_webhook_url(bad)), Some("url"), "{bad}");
        }
    }

    #[test]
    fn lengths_are_limited_before_and_after_encoding() {
        let long = format!("https://e.com/{}", "a".repeat(MAX_WEBHOOK_URL_BYTES));
        let error = check_webhook_url(&long).unwrap_err();
        assert_eq!(error.rule, "max_length");
        assert!(error.message.contains("2048"), "{error}");
        // 700 characters of two bytes each: 1,400 bytes as given, 4,200 percent-encoded.
        let encoded = format!("https://e.com/{}", "é".repeat(700));
        assert!(encoded.len() <= MAX_WEBHOOK_URL_BYTES);
        let error = check_webhook_url(&encoded).unwrap_err();
        assert!(error.message.contains("once encoded"), "{error}");
        assert_eq!(check_media_url(&encoded), Ok(()));
        let media = format!("https://e.com/{}", "a".repeat(MAX_MEDIA_URL_BYTES));
        assert_eq!(rule(check_media_url(&media)), Some("max_length"));
    }

    #[test]
    fn media_urls_may_be_data_uris() {
        assert_eq!(
            check_media_url("data:image/png;base64,iVBORw0KGgo="),
            Ok(())
        );
        assert_eq!(check_media_url("DATA:,x"), Ok(()));
        assert_eq!(rule(check_media_url("data:image/png;base64")), Some("url"));
        assert_eq!(rule(check_media_url("data:image/png, x")), Some("url"));
        let huge = format!("data:image/png;base64,{}", "A".repeat(MAX_DATA_URL_BYTES));
        assert_eq!(rule(check_media_url(&huge)), Some("max_length"));
        assert_eq!(rule(check_media_url("file:///etc/passwd")), Some("url"));
    }
}
