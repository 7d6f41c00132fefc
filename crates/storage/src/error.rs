//! Errors of the storage crate, each able to say whether a retry can help.
//!
//! [`ErrorClass`] follows the download rows of provider-api.md §6.4: an expired source URL is
//! refreshed by re-reading the provider run, transient failures (5xx, resets, short bodies, wrong
//! content type or MP4 magic, S3 outages, timeouts) are retried with backoff and count against the
//! download budget, and permanent failures (too large, bad config, S3 access denied) fail the job.

use std::error::Error as StdError;
use std::time::Duration;

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::operation::RequestId as _;

use crate::redact::RedactedUrl;

pub(crate) type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// What the caller should do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The source URL has expired (403/404/410): get a freshly signed URL from the provider, retry.
    SourceExpired,
    /// Retry with backoff (honouring `retry_after` when given); counts against the attempt budget.
    Transient,
    /// Retrying cannot help: fail the job.
    Permanent,
}

/// A failure talking to S3, or a bad storage configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    #[error("invalid storage config: {0}")]
    Config(String),
    #[error("invalid job id {job_id:?}: {reason}")]
    InvalidJobId {
        job_id: String,
        reason: &'static str,
    },
    #[error("s3 {operation} of {target} failed: {detail}")]
    S3 {
        /// The S3 API call, for example `UploadPart`.
        operation: &'static str,
        /// `bucket/key` or `bucket`.
        target: String,
        /// The HTTP status, when S3 answered at all.
        status: Option<u16>,
        /// The S3 error code, for example `SlowDown` or `AccessDenied`.
        code: Option<String>,
        detail: String,
        transient: bool,
    },
    #[error("s3 {operation} of {target} was interrupted before it finished")]
    Interrupted {
        operation: &'static str,
        target: String,
    },
}

impl StorageError {
    pub fn class(&self) -> ErrorClass {
        match self {
            StorageError::Config(_) | StorageError::InvalidJobId { .. } => ErrorClass::Permanent,
            StorageError::S3 {
                transient: true, ..
            }
            | StorageError::Interrupted { .. } => ErrorClass::Transient,
            StorageError::S3 {
                transient: false, ..
            } => ErrorClass::Permanent,
        }
    }

    pub fn is_transient(&self) -> bool {
        self.class() == ErrorClass::Transient
    }

    /// Builds an [`StorageError::S3`] from an SDK error, classifying it.
    pub(crate) fn s3<E>(
        operation: &'static str,
        target: impl Into<String>,
        error: SdkError<E, HttpResponse>,
    ) -> StorageError
    where
        E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
    {
        let target = target.into();
        let (status, code, transient) = match &error {
            SdkError::ServiceError(service) => {
                let status = raw_status(service.raw());
                let code = service.err().code().map(str::to_owned);
                let transient = is_transient_s3_failure(status, code.as_deref());
                (status, code, transient)
            }
            SdkError::ResponseError(response) => (raw_status(response.raw()), None, true),
            // Timeouts and connection failures: S3 may be back on the next attempt.
            SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) => (None, None, true),
            // Construction failures are bugs or bad config; nothing was sent.
            _ => (None, None, false),
        };
        let detail = match error.as_service_error() {
            // The full context of a service error dumps the raw response; S3's own words suffice.
            Some(service) => {
                let mut detail = format!(
                    "{}: {}",
                    service.code().unwrap_or("unknown error"),
                    service.message().unwrap_or("no message")
                );
                if let Some(request_id) = service.meta().request_id() {
                    detail.push_str(&format!(" (request id {request_id})"));
                }
                detail
            }
            None => source_chain(&error),
        };
        StorageError::S3 {
            operation,
            target,
            status,
            code,
            detail,
            transient,
        }
    }
}

/// `error: source: source ...`, the messages without the `Debug` dumps `DisplayErrorContext` adds.
fn source_chain(error: &(dyn StdError + 'static)) -> String {
    let mut chain = error.to_string();
    let mut source = error.source();
    while let Some(error) = source {
        chain.push_str(": ");
        chain.push_str(&error.to_string());
        source = error.source();
    }
    chain
}

fn raw_status(raw: &HttpResponse) -> Option<u16> {
    Some(raw.status().as_u16())
}

fn is_transient_s3_failure(status: Option<u16>, code: Option<&str>) -> bool {
    const TRANSIENT_CODES: &[&str] = &[
        "SlowDown",
        "RequestTimeout",
        "InternalError",
        "ServiceUnavailable",
        "RequestTimeTooSkewed",
        "BadDigest",
        "NoSuchUpload",
        "OperationAborted",
    ];
    code.is_some_and(|code| TRANSIENT_CODES.contains(&code))
        || status.is_some_and(|status| status >= 500 || status == 408 || status == 429)
}

/// [`RehostError::code`] of a download the SSRF guard refused.
pub const DOWNLOAD_REFUSED: &str = "DOWNLOAD_REFUSED";
/// [`RehostError::code`] of every other re-host failure.
pub const REHOST_FAILED: &str = "REHOST_FAILED";

/// A failure to download, verify or store one video.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RehostError {
    /// The SSRF guard refused the source URL or a redirect hop: its address (literal or
    /// resolved) is not public and not in `download_allow_cidrs`, it is not http(s), or the
    /// source redirected more than [`crate::store::MAX_REDIRECTS`] times. Nothing was sent
    /// to a refused address. Permanent: only a changed allow-list (or provider) helps.
    #[error("download refused (SSRF guard): {target}: {reason}")]
    DownloadRefused {
        /// The host, or the URL without its query and user info.
        target: String,
        reason: String,
    },
    #[error("source {url} answered HTTP {status}")]
    SourceStatus {
        url: RedactedUrl,
        status: u16,
        /// The source's `Retry-After`, clamped to 1 s..=10 min.
        retry_after: Option<Duration>,
    },
    /// The request could not be sent or its response headers not read (connect, TLS, timeout).
    #[error("request to source {url} failed")]
    SourceRequest {
        url: RedactedUrl,
        /// Stripped of its URL, so its message cannot leak the query string.
        #[source]
        source: reqwest::Error,
    },
    /// Reading the body failed midway: connection reset, truncated body, idle timeout.
    #[error("reading the source body failed after {received} bytes")]
    SourceBody {
        received: u64,
        #[source]
        source: BoxError,
    },
    #[error("source content type is {content_type:?}, expected video/mp4")]
    WrongContentType { content_type: Option<String> },
    #[error("body is not an MP4: bytes 4..8 are {found:?}, expected \"ftyp\"")]
    NotMp4 { found: String },
    /// Content-Length and the provider's file_size disagree, so the download was not started.
    #[error(
        "source Content-Length is {content_length} bytes but the provider reported {provider_size}"
    )]
    DeclaredSizeMismatch {
        content_length: u64,
        provider_size: u64,
    },
    #[error("length mismatch: received {received} bytes, expected {expected}")]
    LengthMismatch { expected: u64, received: u64 },
    #[error("video too large: {size} bytes or more, the limit is {limit}")]
    TooLarge { size: u64, limit: u64 },
    #[error("re-hosting did not finish within {} s", .after.as_secs())]
    Timeout { after: Duration },
    #[error("storing the video failed")]
    Storage(#[from] StorageError),
}

impl RehostError {
    pub fn class(&self) -> ErrorClass {
        match self {
            RehostError::DownloadRefused { .. } => ErrorClass::Permanent,
            RehostError::SourceStatus { status, .. } => match status {
                403 | 404 | 410 => ErrorClass::SourceExpired,
                408 | 429 | 500..=599 => ErrorClass::Transient,
                _ => ErrorClass::Permanent,
            },
            // An unusable URL or a redirect loop will not fix itself.
            RehostError::SourceRequest { source, .. }
                if source.is_builder() || source.is_redirect() =>
            {
                ErrorClass::Permanent
            }
            RehostError::SourceRequest { .. }
            | RehostError::SourceBody { .. }
            | RehostError::WrongContentType { .. }
            | RehostError::NotMp4 { .. }
            | RehostError::DeclaredSizeMismatch { .. }
            | RehostError::LengthMismatch { .. }
            | RehostError::Timeout { .. } => ErrorClass::Transient,
            RehostError::TooLarge { .. } => ErrorClass::Permanent,
            RehostError::Storage(storage) => storage.class(),
        }
    }

    /// The failure code a job records: [`DOWNLOAD_REFUSED`] for a refused download, else
    /// [`REHOST_FAILED`].
    pub fn code(&self) -> &'static str {
        match self {
            RehostError::DownloadRefused { .. } => DOWNLOAD_REFUSED,
            _ => REHOST_FAILED,
        }
    }

    /// 403/404/410 from the source: the caller should re-read the provider run for a fresh URL.
    pub fn is_source_expired(&self) -> bool {
        self.class() == ErrorClass::SourceExpired
    }

    pub fn is_transient(&self) -> bool {
        self.class() == ErrorClass::Transient
    }

    pub fn is_permanent(&self) -> bool {
        self.class() == ErrorClass::Permanent
    }

    /// How long the source asked us to wait, if it sent `Retry-After`.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            RehostError::SourceStatus { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// Parses `Retry-After` as delay-seconds or an HTTP-date, clamped to 1 s..=10 min (§6.5).
pub(crate) fn parse_retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    let delay = match value.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => httpdate::parse_http_date(value)
            .ok()?
            .duration_since(now)
            .unwrap_or_default(),
    };
    Some(delay.clamp(Duration::from_secs(1), Duration::from_secs(600)))
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;

    fn status(status: u16) -> RehostError {
        RehostError::SourceStatus {
            url: RedactedUrl::new("https://cdn.example/v.mp4?sig=x"),
            status,
            retry_after: None,
        }
    }

    #[test]
    fn source_statuses_classify() {
        for expired in [403, 404, 410] {
            assert!(status(expired).is_source_expired(), "{expired}");
        }
        for transient in [408, 429, 500, 502, 503, 504] {
            assert!(status(transient).is_transient(), "{transient}");
        }
        for permanent in [400, 401, 204, 206] {
            assert!(status(permanent).is_permanent(), "{permanent}");
        }
        assert!(!status(403).to_string().contains("sig=x"));
    }

    #[test]
    fn verification_failures_classify() {
        assert!(RehostError::TooLarge { size: 2, limit: 1 }.is_permanent());
        assert!(
            RehostError::NotMp4 {
                found: String::new()
            }
            .is_transient()
        );
        assert!(RehostError::WrongContentType { content_type: None }.is_transient());
        assert!(
            RehostError::LengthMismatch {
                expected: 2,
                received: 1
            }
            .is_transient()
        );
        assert!(
            RehostError::DeclaredSizeMismatch {
                content_length: 2,
                provider_size: 1
            }
            .is_transient()
        );
        assert!(RehostError::from(StorageError::Config(String::new())).is_permanent());
        assert_eq!(
            RehostError::TooLarge { size: 2, limit: 1 }.code(),
            REHOST_FAILED
        );
    }

    #[test]
    fn refused_downloads_are_permanent_and_named() {
        let refused = RehostError::DownloadRefused {
            target: "http://127.0.0.1/v.mp4?[redacted]".to_owned(),
            reason: "127.0.0.1 is loopback and not allow-listed".to_owned(),
        };
        assert!(refused.is_permanent());
        assert!(!refused.is_source_expired());
        assert_eq!(refused.code(), "DOWNLOAD_REFUSED");
        assert_eq!(
            refused.to_string(),
            "download refused (SSRF guard): http://127.0.0.1/v.mp4?[redacted]: 127.0.0.1 is \
             loopback and not allow-listed"
        );
    }

    #[test]
    fn s3_failures_classify() {
        assert!(is_transient_s3_failure(Some(503), Some("SlowDown")));
        assert!(is_transient_s3_failure(Some(500), None));
        assert!(is_transient_s3_failure(Some(400), Some("RequestTimeout")));
        assert!(!is_transient_s3_failure(Some(403), Some("AccessDenied")));
        assert!(!is_transient_s3_failure(Some(404), Some("NoSuchBucket")));
    }

    #[test]
    fn retry_after_parses_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after("0", now), Some(Duration::from_secs(1)));
        assert_eq!(
            parse_retry_after("86400", now),
            Some(Duration::from_secs(600))
        );
        let in_30s = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            parse_retry_after(&in_30s, now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
