//! [`VideoStore`]: re-host a provider video in S3 and look up what is already stored.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::ProvideErrorMetadata as _;
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::types::{BucketLocationConstraint, CreateBucketConfiguration};
use bytes::Bytes;
use futures::{Stream, TryStreamExt as _};
use klingq_ssrf::{AddressPolicy, GuardedResolver, Refused, check_url, find_refusal};
use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use serde::{Deserialize, Serialize};

use crate::config::{ChecksumMode, StorageConfig};
use crate::error::{BoxError, RehostError, StorageError, parse_retry_after};
use crate::redact::RedactedUrl;
use crate::upload::{
    self, META_JOB_ID, META_SHA256, UploadTarget, VIDEO_CONTENT_TYPE, object_name,
};

/// Connect timeout for S3 requests (the download has its own, in the config).
const S3_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Redirects a download follows, each hop checked by the SSRF guard; one more is refused.
pub const MAX_REDIRECTS: usize = 3;
const MAX_JOB_ID_LEN: usize = 128;

/// A video stored in S3.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredVideo {
    pub bucket: String,
    pub key: String,
    pub job_id: String,
    pub size: u64,
    /// Lowercase hex sha256 of the whole object, also stored as `x-amz-meta-sha256`.
    pub sha256: String,
    pub content_type: String,
    /// A presigned GET URL, or `{public_base_url}/{key}` when the config has a public base URL.
    pub url: String,
}

impl fmt::Debug for StoredVideo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoredVideo")
            .field("bucket", &self.bucket)
            .field("key", &self.key)
            .field("job_id", &self.job_id)
            .field("size", &self.size)
            .field("sha256", &self.sha256)
            .field("content_type", &self.content_type)
            .field("url", &RedactedUrl::new(&self.url))
            .finish()
    }
}

/// Stores videos in one bucket. Cheap to clone: the clients and config are shared.
#[derive(Clone)]
pub struct VideoStore {
    inner: Arc<Inner>,
}

struct Inner {
    config: StorageConfig,
    s3: aws_sdk_s3::Client,
    /// The download client, guarded against SSRF with `policy`.
    http: reqwest::Client,
    policy: Arc<AddressPolicy>,
}

impl fmt::Debug for VideoStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VideoStore")
            .field("bucket", &self.inner.config.bucket)
            .field("key_prefix", &self.inner.config.key_prefix)
            .finish_non_exhaustive()
    }
}

impl VideoStore {
    /// Validates `config` and builds the S3 and HTTP clients. Nothing is sent yet.
    pub async fn new(config: StorageConfig) -> Result<VideoStore, StorageError> {
        config.validate()?;
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(config.region.clone()))
            .retry_config(RetryConfig::standard().with_max_attempts(config.s3_max_attempts))
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(S3_CONNECT_TIMEOUT)
                    .operation_attempt_timeout(config.s3_attempt_timeout)
                    .build(),
            );
        if let Some(endpoint) = &config.endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        if let (Some(access_key_id), Some(secret_access_key)) =
            (&config.access_key_id, &config.secret_access_key)
        {
            loader = loader.credentials_provider(Credentials::new(
                access_key_id.expose(),
                secret_access_key.expose(),
                None,
                None,
                "klingq-storage-config",
            ));
        }
        let shared = loader.load().await;
        let (request_checksums, response_checksums) = match config.checksum_mode {
            ChecksumMode::WhenSupported => (
                RequestChecksumCalculation::WhenSupported,
                ResponseChecksumValidation::WhenSupported,
            ),
            ChecksumMode::WhenRequired => (
                RequestChecksumCalculation::WhenRequired,
                ResponseChecksumValidation::WhenRequired,
            ),
        };
        let s3_config = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(config.force_path_style)
            .request_checksum_calculation(request_checksums)
            .response_checksum_validation(response_checksums)
            .build();
        // The SSRF guard: the resolver drops non-public addresses of every connection (so DNS
        // rebinding gains nothing), each redirect hop is checked, and no proxy (which would
        // resolve the target itself, past the guard) is used. IP literals are checked in
        // `rehost` before sending.
        let policy = Arc::new(config.download_policy()?);
        let http = reqwest::Client::builder()
            .dns_resolver(Arc::new(GuardedResolver::new(policy.clone())))
            .redirect(klingq_ssrf::redirect_policy(policy.clone(), MAX_REDIRECTS))
            .no_proxy()
            .connect_timeout(config.download_connect_timeout)
            .read_timeout(config.download_idle_timeout)
            .user_agent(concat!("klingq-storage/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|error| {
                StorageError::Config(format!("building the download client: {error}"))
            })?;
        Ok(VideoStore {
            inner: Arc::new(Inner {
                config,
                s3: aws_sdk_s3::Client::from_conf(s3_config),
                http,
                policy,
            }),
        })
    }

    pub fn config(&self) -> &StorageConfig {
        &self.inner.config
    }

    /// The underlying S3 client, for operations this crate does not wrap.
    pub fn s3_client(&self) -> &aws_sdk_s3::Client {
        &self.inner.s3
    }

    /// The object key of a job's video: `{key_prefix}{job_id}.mp4`.
    pub fn key_for(&self, job_id: &str) -> String {
        format!("{}{job_id}.mp4", self.inner.config.key_prefix)
    }

    /// Creates the bucket unless it exists (for demos and tests; production buckets are provisioned).
    pub async fn ensure_bucket(&self) -> Result<(), StorageError> {
        let config = &self.inner.config;
        match self
            .inner
            .s3
            .head_bucket()
            .bucket(&config.bucket)
            .send()
            .await
        {
            Ok(_) => return Ok(()),
            Err(error)
                if error
                    .as_service_error()
                    .is_some_and(|error| error.is_not_found()) => {}
            Err(error) => return Err(StorageError::s3("HeadBucket", &config.bucket, error)),
        }
        let mut request = self.inner.s3.create_bucket().bucket(&config.bucket);
        if config.region != "us-east-1" {
            request = request.create_bucket_configuration(
                CreateBucketConfiguration::builder()
                    .location_constraint(BucketLocationConstraint::from(config.region.as_str()))
                    .build(),
            );
        }
        match request.send().await {
            Ok(_) => {
                tracing::info!(bucket = %config.bucket, "bucket created");
                Ok(())
            }
            Err(error) if error.code() == Some("BucketAlreadyOwnedByYou") => Ok(()),
            Err(error) => Err(StorageError::s3("CreateBucket", &config.bucket, error)),
        }
    }

    /// Downloads `source_url` and stores it under [`VideoStore::key_for`]`(job_id)`, verifying it
    /// on the way (see the crate docs). `expected_size` is the provider's `file_size`, if any.
    ///
    /// Storing the same job again overwrites the object with the same bytes, so retries are safe.
    ///
    /// A source (or redirect hop) at a non-public address outside `download_allow_cidrs` is
    /// never contacted: [`RehostError::DownloadRefused`], permanent.
    pub async fn rehost(
        &self,
        job_id: &str,
        source_url: &str,
        expected_size: Option<u64>,
    ) -> Result<StoredVideo, RehostError> {
        validate_job_id(job_id)?;
        let config = &self.inner.config;
        let url = RedactedUrl::new(source_url);
        tracing::debug!(job_id, source = %url, "re-host started");
        let refused = |refused: Refused| {
            tracing::warn!(job_id, target = %refused.target, reason = %refused.reason, "download refused by the SSRF guard");
            RehostError::DownloadRefused {
                target: refused.target,
                reason: refused.reason,
            }
        };
        // IP literals never reach the resolver: check them (and the scheme) before sending.
        check_url(source_url, &self.inner.policy, false).map_err(refused)?;
        let response = match self.inner.http.get(source_url).send().await {
            Ok(response) => response,
            Err(error) => {
                return Err(match find_refusal(&error) {
                    Some(refusal) => refused(refusal.clone()),
                    None => RehostError::SourceRequest {
                        url: url.clone(),
                        source: error.without_url(),
                    },
                });
            }
        };

        let status = response.status().as_u16();
        if status != 200 {
            let retry_after = response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|value| value.to_str().ok())
                .and_then(|value| parse_retry_after(value, SystemTime::now()));
            return Err(RehostError::SourceStatus {
                url,
                status,
                retry_after,
            });
        }
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|value| value.to_str().ok());
        match content_type.map(media_type).as_deref() {
            Some(VIDEO_CONTENT_TYPE) => {}
            // §6.6: some CDNs serve MP4s as octet-stream; the ftyp check still applies.
            Some("application/octet-stream") => {
                tracing::warn!(job_id, source = %url, "source sent application/octet-stream, accepting as mp4");
            }
            _ => {
                return Err(RehostError::WrongContentType {
                    content_type: content_type.map(str::to_owned),
                });
            }
        }
        let content_length = response
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse::<u64>().ok());
        if let (Some(content_length), Some(provider_size)) = (content_length, expected_size)
            && content_length != provider_size
        {
            return Err(RehostError::DeclaredSizeMismatch {
                content_length,
                provider_size,
            });
        }
        let expected_len = content_length.or(expected_size);
        if expected_len.is_none() {
            tracing::warn!(job_id, source = %url, "source sent no content-length, only the size limit applies");
        }

        let deadline = download_deadline(config, expected_len);
        let body = response.bytes_stream().map_err(reqwest::Error::without_url);
        match tokio::time::timeout(deadline, self.upload_stream(job_id, expected_len, body)).await {
            Ok(result) => result,
            Err(_elapsed) => Err(RehostError::Timeout { after: deadline }),
        }
    }

    /// The verified streaming core of [`VideoStore::rehost`], for bodies that do not come from
    /// an HTTP GET. `expected_len`, when given, is the exact length the body must have.
    pub async fn upload_stream<S, E>(
        &self,
        job_id: &str,
        expected_len: Option<u64>,
        body: S,
    ) -> Result<StoredVideo, RehostError>
    where
        S: Stream<Item = Result<Bytes, E>>,
        E: Into<BoxError>,
    {
        validate_job_id(job_id)?;
        let config = &self.inner.config;
        let key = self.key_for(job_id);
        let target = UploadTarget {
            client: &self.inner.s3,
            bucket: &config.bucket,
            key: &key,
            job_id,
            part_checksums: config.checksum_mode == ChecksumMode::WhenSupported,
            part_size: config.part_size,
            max_bytes: config.max_video_bytes,
        };
        let uploaded = upload::upload_verified(&target, expected_len, body).await?;
        tracing::info!(job_id, key = %key, size = uploaded.size, sha256 = %uploaded.sha256, "video stored");
        let url = self.url_for(&key).await?;
        Ok(StoredVideo {
            bucket: config.bucket.clone(),
            key,
            job_id: job_id.to_owned(),
            size: uploaded.size,
            sha256: uploaded.sha256,
            content_type: VIDEO_CONTENT_TYPE.to_owned(),
            url,
        })
    }

    /// The stored video of `job_id`, or `None` if there is no object with a valid sha256.
    ///
    /// An object without sha256 metadata is a multipart upload interrupted between completing
    /// and adding its metadata; it counts as absent, so the caller uploads again.
    pub async fn head(&self, job_id: &str) -> Result<Option<StoredVideo>, StorageError> {
        validate_job_id(job_id)?;
        let config = &self.inner.config;
        let key = self.key_for(job_id);
        let output = match self
            .inner
            .s3
            .head_object()
            .bucket(&config.bucket)
            .key(&key)
            .send()
            .await
        {
            Ok(output) => output,
            Err(error)
                if error
                    .as_service_error()
                    .is_some_and(|error| error.is_not_found()) =>
            {
                return Ok(None);
            }
            Err(error) => {
                return Err(StorageError::s3(
                    "HeadObject",
                    object_name(&config.bucket, &key),
                    error,
                ));
            }
        };
        let metadata = output.metadata();
        let sha256 = metadata
            .and_then(|metadata| metadata.get(META_SHA256))
            .filter(|sha256| is_sha256_hex(sha256));
        let Some(sha256) = sha256 else {
            tracing::debug!(job_id, key = %key, "stored object has no valid sha256 metadata, treating it as absent");
            return Ok(None);
        };
        let stored_job_id = metadata
            .and_then(|metadata| metadata.get(META_JOB_ID))
            .map_or(job_id, String::as_str);
        Ok(Some(StoredVideo {
            bucket: config.bucket.clone(),
            job_id: stored_job_id.to_owned(),
            size: output
                .content_length()
                .and_then(|size| u64::try_from(size).ok())
                .unwrap_or_default(),
            sha256: sha256.clone(),
            content_type: output
                .content_type()
                .unwrap_or(VIDEO_CONTENT_TYPE)
                .to_owned(),
            url: self.url_for(&key).await?,
            key,
        }))
    }

    /// A URL to hand out for `key`: `{public_base_url}/{key}`, or a presigned GET URL valid for
    /// `presign_ttl`. Never log it unredacted.
    pub async fn url_for(&self, key: &str) -> Result<String, StorageError> {
        let config = &self.inner.config;
        if let Some(base) = &config.public_base_url {
            return Ok(format!("{}/{key}", base.trim_end_matches('/')));
        }
        let presigning = PresigningConfig::expires_in(config.presign_ttl)
            .map_err(|error| StorageError::Config(format!("presign_ttl: {error}")))?;
        let request = self
            .inner
            .s3
            .get_object()
            .bucket(&config.bucket)
            .key(key)
            .presigned(presigning)
            .await
            .map_err(|error| {
                StorageError::s3(
                    "presigning GetObject",
                    object_name(&config.bucket, key),
                    error,
                )
            })?;
        Ok(request.uri().to_owned())
    }
}

/// Lowercase `type/subtype` of a Content-Type value, without parameters.
fn media_type(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

/// `max(download_timeout_floor, size / download_min_bytes_per_sec)`, with the size limit standing
/// in for an unknown size.
fn download_deadline(config: &StorageConfig, expected_len: Option<u64>) -> Duration {
    let size = expected_len.unwrap_or(config.max_video_bytes);
    let at_min_rate = Duration::from_secs(size.div_ceil(config.download_min_bytes_per_sec));
    config.download_timeout_floor.max(at_min_rate)
}

/// Job ids become object keys and metadata values: 1..=128 of `[A-Za-z0-9._-]`, no leading dot.
fn validate_job_id(job_id: &str) -> Result<(), StorageError> {
    let reason = if job_id.is_empty() || job_id.len() > MAX_JOB_ID_LEN {
        Some("must be 1 to 128 characters")
    } else if !job_id
        .bytes()
        .all(|byte| byte.is_ascii_alphanumeric() || b"._-".contains(&byte))
    {
        Some("may contain only ASCII letters, digits, '.', '_' and '-'")
    } else if job_id.starts_with('.') {
        Some("must not start with '.'")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(StorageError::InvalidJobId {
            job_id: job_id.chars().take(MAX_JOB_ID_LEN).collect(),
            reason,
        }),
        None => Ok(()),
    }
}

fn is_sha256_hex(value: &str) -> bool {
    value.len() == 64 && value.bytes().all(|byte| byte.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_are_safe_key_components() {
        assert!(validate_job_id("01J9Z3-job_1.retry").is_ok());
        for bad in ["", ".hidden", "a/b", "../x", "a b", "é", &"x".repeat(129)] {
            assert!(validate_job_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn media_type_ignores_parameters_and_case() {
        assert_eq!(media_type("Video/MP4; charset=binary"), "video/mp4");
        assert_eq!(media_type("text/html"), "text/html");
    }

    #[test]
    fn deadline_scales_with_size() {
        let config = StorageConfig::new("b");
        assert_eq!(
            download_deadline(&config, Some(10)),
            Duration::from_secs(120)
        );
        assert_eq!(
            download_deadline(&config, Some(300_000_000)),
            Duration::from_secs(300)
        );
        assert_eq!(download_deadline(&config, None), Duration::from_secs(500));
    }

    #[test]
    fn stored_video_debug_hides_the_signature() {
        let video = StoredVideo {
            bucket: "b".into(),
            key: "videos/j.mp4".into(),
            job_id: "j".into(),
            size: 1,
            sha256: "0".repeat(64),
            content_type: VIDEO_CONTENT_TYPE.into(),
            url: "http://s3/b/videos/j.mp4?X-Amz-Signature=deadbeef".into(),
        };
        assert!(!format!("{video:?}").contains("deadbeef"));
    }
}
