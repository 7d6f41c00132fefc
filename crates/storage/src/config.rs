//! Storage settings: where videos go, how they are uploaded and how downloads are bounded.
//!
//! Durations are given in whole seconds in config files (fields ending in `_secs`).

use std::fmt;
use std::time::Duration;

use klingq_ssrf::AddressPolicy;
use serde::{Deserialize, Deserializer};

use crate::error::StorageError;

const MIB: usize = 1024 * 1024;
/// S3's minimum size for every part but the last.
const MIN_PART_SIZE: usize = 5 * MIB;
/// S3's maximum part size.
const MAX_PART_SIZE: usize = 5 * 1024 * MIB;
/// S3's maximum number of parts in one multipart upload.
const MAX_PARTS: u64 = 10_000;
/// S3's limit for a single `CopyObject`, which adds the sha256 metadata after a multipart upload.
const MAX_COPY_BYTES: u64 = 5 * 1024 * 1024 * 1024;
/// SigV4 presigned URLs live at most 7 days.
const MAX_PRESIGN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// Everything [`crate::VideoStore`] needs. Only `bucket` has no default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// Custom endpoint for S3-compatible stores (SeaweedFS, MinIO, R2); `None` means AWS.
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default = "default_region")]
    pub region: String,
    pub bucket: String,
    /// Prepended to `{job_id}.mp4` to form the object key.
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
    /// Path-style addressing (`endpoint/bucket/key`), which most S3-compatible stores need.
    #[serde(default)]
    pub force_path_style: bool,
    #[serde(default)]
    pub checksum_mode: ChecksumMode,
    /// Lifetime of the presigned GET URLs handed out when `public_base_url` is unset.
    #[serde(
        default = "default_presign_ttl",
        rename = "presign_ttl_secs",
        deserialize_with = "secs"
    )]
    pub presign_ttl: Duration,
    /// When set, video URLs are `{public_base_url}/{key}` instead of presigned URLs (CDN in front).
    #[serde(default)]
    pub public_base_url: Option<String>,
    /// Multipart part size in bytes; also the largest video stored with a single `PutObject`.
    /// Memory per upload is about twice this.
    #[serde(default = "default_part_size")]
    pub part_size: usize,
    /// Larger videos are rejected permanently, whether announced by Content-Length or streamed.
    #[serde(default = "default_max_video_bytes")]
    pub max_video_bytes: u64,
    /// Static credentials; when both are unset the standard AWS chain applies (environment,
    /// profile files, web identity, ECS and EC2 metadata).
    #[serde(default)]
    pub access_key_id: Option<SecretString>,
    #[serde(default)]
    pub secret_access_key: Option<SecretString>,
    #[serde(
        default = "default_connect_timeout",
        rename = "download_connect_timeout_secs",
        deserialize_with = "secs"
    )]
    pub download_connect_timeout: Duration,
    /// The longest the source may stay silent (headers or body) before the download fails.
    #[serde(
        default = "default_idle_timeout",
        rename = "download_idle_timeout_secs",
        deserialize_with = "secs"
    )]
    pub download_idle_timeout: Duration,
    /// The whole re-host must finish within `max(download_timeout_floor, size / download_min_bytes_per_sec)`.
    #[serde(
        default = "default_timeout_floor",
        rename = "download_timeout_floor_secs",
        deserialize_with = "secs"
    )]
    pub download_timeout_floor: Duration,
    #[serde(default = "default_min_bytes_per_sec")]
    pub download_min_bytes_per_sec: u64,
    /// CIDRs (`10.0.0.0/8`, `::1/128`; an entry may hold several, comma-separated) of
    /// non-public addresses downloads may still connect to. Empty (the default): a source URL,
    /// or any redirect hop, resolving to a loopback, private, link-local, CGNAT or other
    /// non-public address is refused (the SSRF guard). A local simulator needs `127.0.0.0/8`.
    #[serde(default)]
    pub download_allow_cidrs: Vec<String>,
    /// Attempts per S3 request, including the first (the SDK's standard retry with backoff).
    #[serde(default = "default_s3_max_attempts")]
    pub s3_max_attempts: u32,
    /// Upper bound on one S3 request attempt, so a black-holed endpoint cannot stall a job.
    #[serde(
        default = "default_s3_attempt_timeout",
        rename = "s3_attempt_timeout_secs",
        deserialize_with = "secs"
    )]
    pub s3_attempt_timeout: Duration,
}

/// When the S3 client computes request checksums and validates response checksums.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChecksumMode {
    /// The SDK default: CRC32 on every upload. Right for AWS and SeaweedFS.
    #[default]
    WhenSupported,
    /// Only where the API requires one, for stores that reject the SDK's checksum trailers.
    WhenRequired,
}

/// A credential that never appears in `Debug` output.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct SecretString(String);

impl SecretString {
    pub fn new(secret: impl Into<String>) -> SecretString {
        SecretString(secret.into())
    }

    /// The secret itself; pass it on, never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

impl StorageConfig {
    /// The defaults for everything but the bucket.
    pub fn new(bucket: impl Into<String>) -> StorageConfig {
        StorageConfig {
            endpoint: None,
            region: default_region(),
            bucket: bucket.into(),
            key_prefix: default_key_prefix(),
            force_path_style: false,
            checksum_mode: ChecksumMode::default(),
            presign_ttl: default_presign_ttl(),
            public_base_url: None,
            part_size: default_part_size(),
            max_video_bytes: default_max_video_bytes(),
            access_key_id: None,
            secret_access_key: None,
            download_connect_timeout: default_connect_timeout(),
            download_idle_timeout: default_idle_timeout(),
            download_timeout_floor: default_timeout_floor(),
            download_min_bytes_per_sec: default_min_bytes_per_sec(),
            download_allow_cidrs: Vec::new(),
            s3_max_attempts: default_s3_max_attempts(),
            s3_attempt_timeout: default_s3_attempt_timeout(),
        }
    }

    /// Checks the limits S3 imposes, so a bad config fails at start-up rather than mid-upload.
    pub fn validate(&self) -> Result<(), StorageError> {
        let invalid = |message: String| Err(StorageError::Config(message));
        if self.bucket.is_empty() {
            return invalid("bucket is empty".to_owned());
        }
        if self.key_prefix.starts_with('/') {
            return invalid(format!(
                "key_prefix must not start with '/': {:?}",
                self.key_prefix
            ));
        }
        if !(MIN_PART_SIZE..=MAX_PART_SIZE).contains(&self.part_size) {
            return invalid(format!(
                "part_size is {} bytes; S3 needs {MIN_PART_SIZE}..={MAX_PART_SIZE}",
                self.part_size
            ));
        }
        let max_multipart = (self.part_size as u64).saturating_mul(MAX_PARTS);
        if self.max_video_bytes == 0 || self.max_video_bytes > max_multipart.min(MAX_COPY_BYTES) {
            return invalid(format!(
                "max_video_bytes is {}; it must be positive and at most {} (10000 parts, 5 GiB copy limit)",
                self.max_video_bytes,
                max_multipart.min(MAX_COPY_BYTES)
            ));
        }
        if self.presign_ttl.is_zero() || self.presign_ttl > MAX_PRESIGN_TTL {
            return invalid(format!(
                "presign_ttl is {} s; it must be 1..={} s",
                self.presign_ttl.as_secs(),
                MAX_PRESIGN_TTL.as_secs()
            ));
        }
        if self.access_key_id.is_some() != self.secret_access_key.is_some() {
            return invalid("set both access_key_id and secret_access_key, or neither".to_owned());
        }
        if self.download_min_bytes_per_sec == 0 || self.s3_max_attempts == 0 {
            return invalid(
                "download_min_bytes_per_sec and s3_max_attempts must be positive".to_owned(),
            );
        }
        self.download_policy()?;
        Ok(())
    }

    /// The SSRF guard's allow-list of downloads, parsed from `download_allow_cidrs`.
    pub fn download_policy(&self) -> Result<AddressPolicy, StorageError> {
        AddressPolicy::parse(&self.download_allow_cidrs)
            .map_err(|error| StorageError::Config(format!("download_allow_cidrs: {error}")))
    }
}

fn default_region() -> String {
    "us-east-1".to_owned()
}

fn default_key_prefix() -> String {
    "videos/".to_owned()
}

fn default_presign_ttl() -> Duration {
    Duration::from_secs(24 * 3600)
}

fn default_part_size() -> usize {
    8 * MIB
}

fn default_max_video_bytes() -> u64 {
    500 * 1000 * 1000
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_idle_timeout() -> Duration {
    Duration::from_secs(60)
}

fn default_timeout_floor() -> Duration {
    Duration::from_secs(120)
}

fn default_min_bytes_per_sec() -> u64 {
    1_000_000
}

fn default_s3_max_attempts() -> u32 {
    3
}

fn default_s3_attempt_timeout() -> Duration {
    Duration::from_secs(120)
}

fn secs<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    u64::deserialize(deserializer).map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_json(json: &str) -> StorageConfig {
        serde_json::from_str(json).expect("config parses")
    }

    #[test]
    fn defaults_fill_everything_but_the_bucket() {
        let config = from_json(r#"{"bucket":"b"}"#);
        assert_eq!(config.region, "us-east-1");
        assert_eq!(config.key_prefix, "videos/");
        assert_eq!(config.part_size, 8 * MIB);
        assert_eq!(config.max_video_bytes, 500_000_000);
        assert_eq!(config.checksum_mode, ChecksumMode::WhenSupported);
        assert_eq!(config.download_idle_timeout, Duration::from_secs(60));
        assert!(config.download_allow_cidrs.is_empty());
        assert_eq!(config.download_policy().unwrap(), AddressPolicy::default());
        assert!(config.validate().is_ok());
        assert!(serde_json::from_str::<StorageConfig>("{}").is_err());
    }

    #[test]
    fn durations_are_seconds_and_secrets_are_redacted() {
        let config = from_json(
            r#"{"bucket":"b","presign_ttl_secs":60,"checksum_mode":"when_required",
                "access_key_id":"AKIDEXAMPLE","secret_access_key":"s3cr3t"}"#,
        );
        assert_eq!(config.presign_ttl, Duration::from_secs(60));
        assert_eq!(config.checksum_mode, ChecksumMode::WhenRequired);
        let debug = format!("{config:?}");
        assert!(
            !debug.contains("s3cr3t") && !debug.contains("AKIDEXAMPLE"),
            "{debug}"
        );
    }

    #[test]
    fn validation_enforces_s3_limits() {
        let mut config = StorageConfig::new("b");
        config.part_size = MIB;
        assert!(config.validate().is_err());
        config.part_size = 5 * MIB;
        config.max_video_bytes = 6 * 1024 * 1024 * 1024;
        assert!(config.validate().is_err());
        config.max_video_bytes = 1000;
        config.access_key_id = Some(SecretString::new("a"));
        assert!(config.validate().is_err());
    }

    #[test]
    fn download_allow_list_is_checked() {
        let mut config = StorageConfig::new("b");
        config.download_allow_cidrs = vec!["127.0.0.0/8, ::1".to_owned(), "10.0.0.0/8".to_owned()];
        assert!(config.validate().is_ok());
        let policy = config.download_policy().unwrap();
        assert!(policy.check("127.0.0.5".parse().unwrap()).is_ok());
        assert!(policy.check("::1".parse().unwrap()).is_ok());
        assert!(policy.check("169.254.169.254".parse().unwrap()).is_err());
        config.download_allow_cidrs = vec!["127.0.0.0/33".to_owned()];
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("download_allow_cidrs"), "{error}");
    }
}
