//! Integration tests of klingq-storage against a real SeaweedFS and a local HTTP source.
//!
//! Each test gets its own bucket on the shared SeaweedFS from `klingq_testkit::seaweed`, and its
//! own source server (see `source`). Failures are checked for their class and for what they
//! leave behind: no object and no incomplete multipart upload.

mod rehost;
mod source;
mod ssrf;

use std::time::Duration;

use aws_sdk_s3::Client;
use klingq_storage::{StorageConfig, VideoStore};
use klingq_testkit::seaweed::{S3Endpoint, ensure_seaweedfs};
use sha2::{Digest as _, Sha256};

use crate::source::SourceServer;

const MIB: u64 = 1024 * 1024;

/// A store on a fresh bucket, plus a source server.
pub(crate) struct Harness {
    pub(crate) endpoint: S3Endpoint,
    pub(crate) bucket: String,
    pub(crate) store: VideoStore,
    pub(crate) source: SourceServer,
}

impl Harness {
    /// Re-hosts `url` for a fresh job id, expecting it to fail; returns the id and the error.
    pub(crate) async fn failed_rehost(
        &self,
        url: &str,
        expected_size: Option<u64>,
    ) -> (String, klingq_storage::RehostError) {
        let job_id = new_job_id();
        let error = self
            .store
            .rehost(&job_id, url, expected_size)
            .await
            .unwrap_err();
        (job_id, error)
    }

    /// A fresh bucket and a store with 5 MiB parts; `customize` may change the config further.
    pub(crate) async fn new(customize: impl FnOnce(&mut StorageConfig)) -> Harness {
        let endpoint = ensure_seaweedfs().await.expect("SeaweedFS for tests");
        let bucket = endpoint
            .unique_bucket("storage-it")
            .await
            .expect("creating the test bucket");
        let mut config = test_config(&endpoint, &bucket);
        customize(&mut config);
        let store = VideoStore::new(config).await.expect("building the store");
        Harness {
            endpoint,
            bucket,
            store,
            source: SourceServer::start().await,
        }
    }

    /// Deletes the test's bucket. SeaweedFS gives every bucket a volume of its own, so tests
    /// that leaked buckets would soon exhaust the server's volume slots.
    pub(crate) async fn cleanup(self) {
        delete_bucket(self.s3(), &self.bucket).await;
    }

    pub(crate) fn s3(&self) -> &Client {
        self.store.s3_client()
    }

    /// Asserts that the job left no object and no incomplete multipart upload in the bucket.
    pub(crate) async fn assert_nothing_stored(&self, job_id: &str) {
        assert_eq!(
            self.incomplete_uploads().await,
            0,
            "incomplete multipart uploads left behind"
        );
        assert_eq!(self.object_count().await, 0, "objects left behind");
        assert!(self.store.head(job_id).await.expect("head").is_none());
    }

    pub(crate) async fn incomplete_uploads(&self) -> usize {
        let listing = self
            .s3()
            .list_multipart_uploads()
            .bucket(&self.bucket)
            .send()
            .await
            .expect("listing uploads");
        listing.uploads().len()
    }

    pub(crate) async fn object_count(&self) -> usize {
        let listing = self
            .s3()
            .list_objects_v2()
            .bucket(&self.bucket)
            .send()
            .await
            .expect("listing objects");
        listing.contents().len()
    }

    /// Downloads `key` with the S3 client and returns its size and hex sha256.
    pub(crate) async fn stored_sha256(&self, key: &str) -> (u64, String) {
        let object = self
            .s3()
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .expect("get object");
        let mut body = object.body;
        let (mut size, mut sha256) = (0u64, Sha256::new());
        while let Some(chunk) = body.try_next().await.expect("reading the object") {
            size += chunk.len() as u64;
            sha256.update(&chunk);
        }
        (size, hex::encode(sha256.finalize()))
    }
}

/// Aborts the bucket's multipart uploads, deletes its objects, then the bucket.
pub(crate) async fn delete_bucket(s3: &Client, bucket: &str) {
    let uploads = s3
        .list_multipart_uploads()
        .bucket(bucket)
        .send()
        .await
        .expect("listing uploads");
    for upload in uploads.uploads() {
        s3.abort_multipart_upload()
            .bucket(bucket)
            .key(upload.key().unwrap_or_default())
            .upload_id(upload.upload_id().unwrap_or_default())
            .send()
            .await
            .expect("aborting an upload");
    }
    let objects = s3
        .list_objects_v2()
        .bucket(bucket)
        .send()
        .await
        .expect("listing objects");
    for object in objects.contents() {
        s3.delete_object()
            .bucket(bucket)
            .key(object.key().unwrap_or_default())
            .send()
            .await
            .expect("deleting an object");
    }
    s3.delete_bucket()
        .bucket(bucket)
        .send()
        .await
        .expect("deleting the bucket");
}

pub(crate) fn test_config(endpoint: &S3Endpoint, bucket: &str) -> StorageConfig {
    let mut config = StorageConfig::new(bucket);
    config.endpoint = Some(endpoint.endpoint_url.clone());
    config.region = endpoint.region.clone();
    config.force_path_style = true;
    config.access_key_id = Some(klingq_storage::SecretString::new(
        endpoint.access_key.clone(),
    ));
    config.secret_access_key = Some(klingq_storage::SecretString::new(
        endpoint.secret_key.clone(),
    ));
    config.part_size = 5 * MIB as usize;
    // The source server is on loopback, which the SSRF guard refuses unless allow-listed.
    config.download_allow_cidrs = vec!["127.0.0.0/8".to_owned(), "::1/128".to_owned()];
    config
}

pub(crate) fn new_job_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// The error's messages along its `source()` chain, plus its `Debug` form.
pub(crate) fn full_error_text(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = format!("{error:?}");
    let mut current = Some(error);
    while let Some(error) = current {
        text.push_str(&format!(" | {error}"));
        current = error.source();
    }
    text
}

/// Polls `condition` every 50 ms until it holds, panicking after 30 s.
pub(crate) async fn eventually<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
