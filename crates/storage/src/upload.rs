//! The streaming core: verify a body chunk by chunk and store it with bounded memory.
//!
//! Bytes are cut into parts of `part_size`. A body that ends before the first part is full is
//! stored with one `PutObject` after every check has passed. Otherwise a multipart upload starts
//! with the first full part; while part N uploads in a spawned task, part N+1 fills, so at most
//! two parts are in memory. The final checks (length, magic) run before
//! `CompleteMultipartUpload`; any failure aborts the upload, and so does dropping the future
//! (the drop guard spawns the abort), so no incomplete upload is left behind.

use std::pin::pin;

use aws_sdk_s3::Client;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart, MetadataDirective,
};
use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt as _};
use sha2::{Digest as _, Sha256};
use tokio::task::JoinHandle;

use crate::error::{BoxError, RehostError, StorageError};

/// The content type every stored video gets.
pub(crate) const VIDEO_CONTENT_TYPE: &str = "video/mp4";
/// User-metadata keys (sent as `x-amz-meta-sha256` and `x-amz-meta-job-id`).
pub(crate) const META_SHA256: &str = "sha256";
pub(crate) const META_JOB_ID: &str = "job-id";

/// Where and how to store one video.
pub(crate) struct UploadTarget<'a> {
    pub(crate) client: &'a Client,
    pub(crate) bucket: &'a str,
    pub(crate) key: &'a str,
    pub(crate) job_id: &'a str,
    /// Whether to ask for CRC32 part checksums (the `when_supported` checksum mode).
    pub(crate) part_checksums: bool,
    pub(crate) part_size: usize,
    pub(crate) max_bytes: u64,
}

/// Size and sha256 (hex) of a stored body.
pub(crate) struct Uploaded {
    pub(crate) size: u64,
    pub(crate) sha256: String,
}

/// Verifies and stores `body`, whose length must be `expected_len` when given.
pub(crate) async fn upload_verified<S, E>(
    target: &UploadTarget<'_>,
    expected_len: Option<u64>,
    body: S,
) -> Result<Uploaded, RehostError>
where
    S: Stream<Item = Result<Bytes, E>>,
    E: Into<BoxError>,
{
    // Owned here, not in `stream_to_s3`, so that both an error and a drop of this future
    // reach the abort.
    let mut multipart = None;
    let result = stream_to_s3(target, expected_len, body, &mut multipart).await;
    if result.is_err()
        && let Some(upload) = multipart.as_mut()
    {
        upload.abort().await;
    }
    result
}

async fn stream_to_s3<S, E>(
    target: &UploadTarget<'_>,
    expected_len: Option<u64>,
    body: S,
    multipart: &mut Option<MultipartUpload>,
) -> Result<Uploaded, RehostError>
where
    S: Stream<Item = Result<Bytes, E>>,
    E: Into<BoxError>,
{
    let part_size = target.part_size;
    let mut check = BodyCheck::new(expected_len, target.max_bytes)?;
    // A body announced as smaller than a part gets a buffer of exactly its size.
    let first_capacity = expected_len.map_or(part_size, |len| {
        usize::try_from(len).unwrap_or(part_size).min(part_size)
    });
    let mut buffer = BytesMut::with_capacity(first_capacity);
    let mut body = pin!(body);
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|source| RehostError::SourceBody {
            received: check.received,
            source: source.into(),
        })?;
        check.update(&chunk)?;
        let mut rest = &chunk[..];
        while !rest.is_empty() {
            if buffer.capacity() == 0 {
                buffer.reserve(part_size);
            }
            let take = rest.len().min(part_size - buffer.len());
            buffer.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if buffer.len() == part_size {
                if multipart.is_none() {
                    *multipart = Some(MultipartUpload::create(target).await?);
                }
                let upload = multipart.as_mut().expect("created above");
                // Wait for the previous part before taking the buffer, so that at most two
                // parts exist: the one uploading and the one filling.
                upload.wait_in_flight().await?;
                upload.start_part(std::mem::take(&mut buffer).freeze());
            }
        }
    }
    let uploaded = check.finish()?;
    match multipart {
        None => {
            put_object(target, buffer.freeze(), &uploaded).await?;
        }
        Some(upload) => {
            upload.wait_in_flight().await?;
            if !buffer.is_empty() {
                upload.start_part(buffer.freeze());
            }
            upload.complete().await?;
            add_sha256_metadata(target, &uploaded).await?;
        }
    }
    Ok(uploaded)
}

/// The checks that run while the body streams: size limit, length, MP4 magic; plus the sha256.
struct BodyCheck {
    expected_len: Option<u64>,
    max_bytes: u64,
    received: u64,
    head: [u8; 8],
    sha256: Sha256,
}

impl BodyCheck {
    fn new(expected_len: Option<u64>, max_bytes: u64) -> Result<BodyCheck, RehostError> {
        if let Some(len) = expected_len
            && len > max_bytes
        {
            return Err(RehostError::TooLarge {
                size: len,
                limit: max_bytes,
            });
        }
        Ok(BodyCheck {
            expected_len,
            max_bytes,
            received: 0,
            head: [0; 8],
            sha256: Sha256::new(),
        })
    }

    fn update(&mut self, chunk: &[u8]) -> Result<(), RehostError> {
        let before = self.received;
        self.received += chunk.len() as u64;
        if self.received > self.max_bytes {
            return Err(RehostError::TooLarge {
                size: self.received,
                limit: self.max_bytes,
            });
        }
        if let Some(expected) = self.expected_len
            && self.received > expected
        {
            return Err(RehostError::LengthMismatch {
                expected,
                received: self.received,
            });
        }
        if before < 8 {
            let start = before as usize;
            let n = chunk.len().min(8 - start);
            self.head[start..start + n].copy_from_slice(&chunk[..n]);
            if start + n == 8 {
                self.check_magic()?;
            }
        }
        self.sha256.update(chunk);
        Ok(())
    }

    fn check_magic(&self) -> Result<(), RehostError> {
        if self.received < 8 || &self.head[4..8] != b"ftyp" {
            let seen = &self.head[4.min(self.received as usize)..8.min(self.received as usize)];
            return Err(RehostError::NotMp4 {
                found: seen.escape_ascii().to_string(),
            });
        }
        Ok(())
    }

    fn finish(self) -> Result<Uploaded, RehostError> {
        if let Some(expected) = self.expected_len
            && self.received != expected
        {
            return Err(RehostError::LengthMismatch {
                expected,
                received: self.received,
            });
        }
        self.check_magic()?;
        Ok(Uploaded {
            size: self.received,
            sha256: hex::encode(self.sha256.finalize()),
        })
    }
}

async fn put_object(
    target: &UploadTarget<'_>,
    body: Bytes,
    uploaded: &Uploaded,
) -> Result<(), StorageError> {
    target
        .client
        .put_object()
        .bucket(target.bucket)
        .key(target.key)
        .content_type(VIDEO_CONTENT_TYPE)
        .content_length(body.len() as i64)
        .metadata(META_JOB_ID, target.job_id)
        .metadata(META_SHA256, &uploaded.sha256)
        .body(ByteStream::from(body))
        .send()
        .await
        .map_err(|error| {
            StorageError::s3("PutObject", object_name(target.bucket, target.key), error)
        })?;
    Ok(())
}

/// Copies the completed object onto itself to add the sha256, which is known only at the end.
async fn add_sha256_metadata(
    target: &UploadTarget<'_>,
    uploaded: &Uploaded,
) -> Result<(), StorageError> {
    target
        .client
        .copy_object()
        .bucket(target.bucket)
        .key(target.key)
        .copy_source(encode_copy_source(target.bucket, target.key))
        .metadata_directive(MetadataDirective::Replace)
        .content_type(VIDEO_CONTENT_TYPE)
        .metadata(META_JOB_ID, target.job_id)
        .metadata(META_SHA256, &uploaded.sha256)
        .send()
        .await
        .map_err(|error| {
            StorageError::s3("CopyObject", object_name(target.bucket, target.key), error)
        })?;
    Ok(())
}

/// An open multipart upload with at most one part in flight.
///
/// Unless completed or aborted, dropping it spawns a task that aborts it.
struct MultipartUpload {
    client: Client,
    bucket: String,
    key: String,
    upload_id: String,
    part_checksums: bool,
    parts: Vec<CompletedPart>,
    in_flight: Option<JoinHandle<Result<CompletedPart, StorageError>>>,
    next_part_number: i32,
    /// Completed or aborted: nothing is left to clean up.
    finished: bool,
}

impl MultipartUpload {
    async fn create(target: &UploadTarget<'_>) -> Result<MultipartUpload, StorageError> {
        let mut request = target
            .client
            .create_multipart_upload()
            .bucket(target.bucket)
            .key(target.key)
            .content_type(VIDEO_CONTENT_TYPE)
            .metadata(META_JOB_ID, target.job_id);
        if target.part_checksums {
            request = request.checksum_algorithm(ChecksumAlgorithm::Crc32);
        }
        // The request runs in a task of its own: if the re-host is cancelled while it is in
        // flight, S3 may create the upload all the same, and only its answer names it. The task
        // hands the answer over, or, when nobody is waiting any more, aborts the upload itself.
        let (answer, answered) = tokio::sync::oneshot::channel();
        let (client, bucket, key) = (
            target.client.clone(),
            target.bucket.to_owned(),
            target.key.to_owned(),
        );
        tokio::spawn(async move {
            if let Err(Ok(output)) = answer.send(request.send().await)
                && let Some(upload_id) = output.upload_id()
            {
                abort_upload(client, bucket, key, upload_id.to_owned(), None).await;
            }
        });
        let output = answered
            .await
            .map_err(|_| StorageError::S3 {
                operation: "CreateMultipartUpload",
                target: object_name(target.bucket, target.key),
                status: None,
                code: None,
                detail: "the request's task ended without an answer".to_owned(),
                transient: true,
            })?
            .map_err(|error| {
                StorageError::s3(
                    "CreateMultipartUpload",
                    object_name(target.bucket, target.key),
                    error,
                )
            })?;
        let Some(upload_id) = output.upload_id() else {
            return Err(StorageError::S3 {
                operation: "CreateMultipartUpload",
                target: object_name(target.bucket, target.key),
                status: None,
                code: None,
                detail: "the response has no upload id".to_owned(),
                transient: true,
            });
        };
        tracing::debug!(key = target.key, "multipart upload created");
        Ok(MultipartUpload {
            client: target.client.clone(),
            bucket: target.bucket.to_owned(),
            key: target.key.to_owned(),
            upload_id: upload_id.to_owned(),
            part_checksums: target.part_checksums,
            parts: Vec::new(),
            in_flight: None,
            next_part_number: 1,
            finished: false,
        })
    }

    /// Waits for the part in flight, if any, and records it.
    async fn wait_in_flight(&mut self) -> Result<(), StorageError> {
        let Some(task) = self.in_flight.take() else {
            return Ok(());
        };
        match task.await {
            Ok(part) => {
                self.parts.push(part?);
                Ok(())
            }
            Err(join_error) if join_error.is_panic() => {
                std::panic::resume_unwind(join_error.into_panic())
            }
            Err(_) => Err(StorageError::Interrupted {
                operation: "UploadPart",
                target: object_name(&self.bucket, &self.key),
            }),
        }
    }

    /// Starts uploading `body` as the next part; call [`Self::wait_in_flight`] first.
    fn start_part(&mut self, body: Bytes) {
        debug_assert!(self.in_flight.is_none());
        let part_number = self.next_part_number;
        self.next_part_number += 1;
        let client = self.client.clone();
        let (bucket, key, upload_id) = (
            self.bucket.clone(),
            self.key.clone(),
            self.upload_id.clone(),
        );
        let part_checksums = self.part_checksums;
        self.in_flight = Some(tokio::spawn(async move {
            let mut request = client
                .upload_part()
                .bucket(&bucket)
                .key(&key)
                .upload_id(upload_id)
                .part_number(part_number)
                .content_length(body.len() as i64)
                .body(ByteStream::from(body));
            if part_checksums {
                request = request.checksum_algorithm(ChecksumAlgorithm::Crc32);
            }
            let output = request.send().await.map_err(|error| {
                StorageError::s3("UploadPart", object_name(&bucket, &key), error)
            })?;
            let mut part = CompletedPart::builder()
                .part_number(part_number)
                .set_e_tag(output.e_tag().map(str::to_owned));
            if part_checksums {
                part = part.set_checksum_crc32(output.checksum_crc32().map(str::to_owned));
            }
            Ok(part.build())
        }));
    }

    async fn complete(&mut self) -> Result<(), StorageError> {
        self.wait_in_flight().await?;
        self.client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(&self.key)
            .upload_id(&self.upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(self.parts.clone()))
                    .build(),
            )
            .send()
            .await
            .map_err(|error| {
                StorageError::s3(
                    "CompleteMultipartUpload",
                    object_name(&self.bucket, &self.key),
                    error,
                )
            })?;
        self.finished = true;
        tracing::debug!(key = %self.key, parts = self.parts.len(), "multipart upload completed");
        Ok(())
    }

    /// Aborts the upload (after the part in flight settles); failures are logged, not returned.
    async fn abort(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        abort_upload(
            self.client.clone(),
            self.bucket.clone(),
            self.key.clone(),
            self.upload_id.clone(),
            self.in_flight.take(),
        )
        .await;
    }
}

impl Drop for MultipartUpload {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let cleanup = abort_upload(
            self.client.clone(),
            self.bucket.clone(),
            self.key.clone(),
            self.upload_id.clone(),
            self.in_flight.take(),
        );
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(cleanup);
            }
            Err(_) => {
                tracing::warn!(key = %self.key, "incomplete multipart upload left behind: no runtime to abort it")
            }
        }
    }
}

async fn abort_upload(
    client: Client,
    bucket: String,
    key: String,
    upload_id: String,
    in_flight: Option<JoinHandle<Result<CompletedPart, StorageError>>>,
) {
    // A part still uploading could otherwise land after the abort and keep storage allocated.
    if let Some(task) = in_flight {
        let _ = task.await;
    }
    match client
        .abort_multipart_upload()
        .bucket(&bucket)
        .key(&key)
        .upload_id(upload_id)
        .send()
        .await
    {
        Ok(_) => tracing::debug!(key = %key, "multipart upload aborted"),
        Err(error) => {
            let error = StorageError::s3("AbortMultipartUpload", object_name(&bucket, &key), error);
            tracing::warn!(error = %error, "incomplete multipart upload left behind");
        }
    }
}

pub(crate) fn object_name(bucket: &str, key: &str) -> String {
    format!("{bucket}/{key}")
}

/// `bucket/key` for `x-amz-copy-source`, percent-encoded except for unreserved characters and `/`.
fn encode_copy_source(bucket: &str, key: &str) -> String {
    let mut encoded = String::with_capacity(bucket.len() + key.len() + 1);
    for byte in object_name(bucket, key).bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~/".contains(&byte) {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mp4_head() -> Vec<u8> {
        let mut head = vec![0, 0, 0, 0x18];
        head.extend_from_slice(b"ftypisom");
        head
    }

    #[test]
    fn magic_may_arrive_one_byte_at_a_time() {
        let body = mp4_head();
        let mut check = BodyCheck::new(Some(body.len() as u64), 100).unwrap();
        for byte in &body {
            check.update(std::slice::from_ref(byte)).unwrap();
        }
        let uploaded = check.finish().unwrap();
        assert_eq!(uploaded.size, 12);
        assert_eq!(uploaded.sha256, hex::encode(Sha256::digest(&body)));
    }

    #[test]
    fn wrong_magic_and_tiny_bodies_are_not_mp4() {
        let mut check = BodyCheck::new(None, 100).unwrap();
        let error = check.update(b"<html><body>").unwrap_err();
        assert!(
            matches!(error, RehostError::NotMp4 { ref found } if found == "l><b"),
            "{error:?}"
        );
        let mut check = BodyCheck::new(None, 100).unwrap();
        check.update(b"\0\0\0").unwrap();
        assert!(matches!(check.finish(), Err(RehostError::NotMp4 { .. })));
    }

    #[test]
    fn limits_and_lengths_are_enforced_while_streaming() {
        assert!(matches!(
            BodyCheck::new(Some(101), 100),
            Err(RehostError::TooLarge {
                size: 101,
                limit: 100
            })
        ));
        let mut check = BodyCheck::new(None, 10).unwrap();
        assert!(matches!(
            check.update(&[0; 11]),
            Err(RehostError::TooLarge { .. })
        ));
        let mut check = BodyCheck::new(Some(12), 100).unwrap();
        check.update(&mp4_head()).unwrap();
        assert!(matches!(
            check.update(b"x"),
            Err(RehostError::LengthMismatch {
                expected: 12,
                received: 13
            })
        ));
        let mut check = BodyCheck::new(Some(20), 100).unwrap();
        check.update(&mp4_head()).unwrap();
        assert!(matches!(
            check.finish(),
            Err(RehostError::LengthMismatch {
                expected: 20,
                received: 12
            })
        ));
    }

    #[test]
    fn copy_source_is_percent_encoded() {
        assert_eq!(
            encode_copy_source("b", "videos/a b+c.mp4"),
            "b/videos/a%20b%2Bc.mp4"
        );
    }
}
