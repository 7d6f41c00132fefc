//! Re-hosting through the source server into SeaweedFS: round trips, verification failures,
//! idempotence, URLs and an unreachable S3.

use std::time::Duration;

use bytes::Bytes;
use klingq_storage::{ChecksumMode, ErrorClass, RehostError, StorageError, VideoStore};
use klingq_testkit::proxy::TcpProxy;

use crate::source::{video_bytes, video_sha256};
use crate::{Harness, MIB, delete_bucket, eventually, full_error_text, new_job_id, test_config};

#[tokio::test]
async fn small_video_is_stored_with_one_put_and_metadata() {
    let harness = Harness::new(|_| {}).await;
    let job_id = new_job_id();
    let size = MIB + 123;

    let stored = harness
        .store
        .rehost(
            &job_id,
            &harness.source.url(&format!("/video/{size}")),
            Some(size),
        )
        .await
        .unwrap();

    assert_eq!(stored.key, format!("videos/{job_id}.mp4"));
    assert_eq!(
        (stored.size, stored.sha256.as_str()),
        (size, video_sha256(size).as_str())
    );
    assert_eq!(stored.content_type, "video/mp4");
    assert_eq!(
        harness.stored_sha256(&stored.key).await,
        (size, stored.sha256.clone())
    );
    let head = harness
        .store
        .head(&job_id)
        .await
        .unwrap()
        .expect("stored video");
    assert_eq!(
        (head.job_id.as_str(), head.sha256.as_str(), head.size),
        (job_id.as_str(), stored.sha256.as_str(), size)
    );
    let object = harness
        .s3()
        .head_object()
        .bucket(&harness.bucket)
        .key(&stored.key)
        .send()
        .await
        .unwrap();
    let metadata = object.metadata().expect("user metadata");
    assert_eq!(metadata.get("job-id"), Some(&job_id));
    assert_eq!(metadata.get("sha256"), Some(&stored.sha256));
    assert_eq!(object.content_type(), Some("video/mp4"));
    assert_eq!(harness.incomplete_uploads().await, 0);

    harness.cleanup().await;
}

#[tokio::test]
async fn large_video_round_trips_through_multipart() {
    let harness = Harness::new(|_| {}).await;
    let job_id = new_job_id();
    let size = 20 * 1000 * 1000;

    let stored = harness
        .store
        .rehost(
            &job_id,
            &harness.source.url(&format!("/video/{size}")),
            None,
        )
        .await
        .unwrap();

    assert_eq!(stored.sha256, video_sha256(size));
    assert_eq!(
        harness.stored_sha256(&stored.key).await,
        (size, stored.sha256.clone())
    );
    let head = harness
        .store
        .head(&job_id)
        .await
        .unwrap()
        .expect("stored video");
    assert_eq!(
        (head.sha256, head.size, head.job_id),
        (stored.sha256, size, job_id)
    );
    assert_eq!(harness.incomplete_uploads().await, 0);

    harness.cleanup().await;
}

#[tokio::test]
async fn multipart_works_with_when_required_checksums() {
    let harness = Harness::new(|config| config.checksum_mode = ChecksumMode::WhenRequired).await;
    let job_id = new_job_id();
    let size = 11 * MIB + 1;

    let stored = harness
        .store
        .rehost(
            &job_id,
            &harness.source.url(&format!("/video/{size}")),
            Some(size),
        )
        .await
        .unwrap();

    assert_eq!(
        harness.stored_sha256(&stored.key).await,
        (size, video_sha256(size))
    );
    assert!(harness.store.head(&job_id).await.unwrap().is_some());

    harness.cleanup().await;
}

#[tokio::test]
async fn upload_stream_stores_a_body_of_exactly_two_parts() {
    let harness = Harness::new(|_| {}).await;
    let job_id = new_job_id();
    let size = 10 * MIB;
    // Odd chunk sizes, so parts are cut inside chunks.
    let chunks: Vec<Result<Bytes, std::io::Error>> = (0..size)
        .step_by(1_000_003)
        .map(|start| {
            Ok(Bytes::from(video_bytes(
                start,
                (start + 1_000_003).min(size),
            )))
        })
        .collect();

    let stored = harness
        .store
        .upload_stream(&job_id, Some(size), futures::stream::iter(chunks))
        .await
        .unwrap();

    assert_eq!(
        harness.stored_sha256(&stored.key).await,
        (size, video_sha256(size))
    );

    harness.cleanup().await;
}

#[tokio::test]
async fn upload_stream_error_midway_aborts_the_multipart_upload() {
    let harness = Harness::new(|_| {}).await;
    let job_id = new_job_id();
    let chunks = vec![
        Ok(Bytes::from(video_bytes(0, 6 * MIB))),
        Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "peer reset",
        )),
    ];

    let error = harness
        .store
        .upload_stream(&job_id, None, futures::stream::iter(chunks))
        .await
        .unwrap_err();

    assert!(
        matches!(error, RehostError::SourceBody { received, .. } if received == 6 * MIB),
        "{error:?}"
    );
    assert!(error.is_transient());
    harness.assert_nothing_stored(&job_id).await;

    harness.cleanup().await;
}

#[tokio::test]
async fn octet_stream_is_accepted() {
    let harness = Harness::new(|_| {}).await;
    let stored = harness
        .store
        .rehost(&new_job_id(), &harness.source.url("/octet/5000"), None)
        .await
        .unwrap();
    assert_eq!(stored.sha256, video_sha256(5000));

    harness.cleanup().await;
}

#[tokio::test]
async fn wrong_content_type_is_transient_and_stores_nothing() {
    let harness = Harness::new(|_| {}).await;
    let (job_id, error) = harness
        .failed_rehost(&harness.source.url("/html/5000"), None)
        .await;
    assert!(
        matches!(error, RehostError::WrongContentType { content_type: Some(ref found) } if found == "text/html"),
        "{error:?}"
    );
    assert_eq!(error.class(), ErrorClass::Transient);
    harness.assert_nothing_stored(&job_id).await;

    harness.cleanup().await;
}

#[tokio::test]
async fn missing_ftyp_is_transient_and_stores_nothing() {
    let harness = Harness::new(|_| {}).await;
    let (job_id, error) = harness
        .failed_rehost(&harness.source.url("/notmp4/5000"), None)
        .await;
    assert!(
        matches!(error, RehostError::NotMp4 { ref found } if found == "mdat"),
        "{error:?}"
    );
    assert!(error.is_transient());
    harness.assert_nothing_stored(&job_id).await;

    harness.cleanup().await;
}

#[tokio::test]
async fn short_body_after_a_part_is_transient_and_aborts_the_upload() {
    let harness = Harness::new(|_| {}).await;
    let job_id = new_job_id();
    let (size, sent) = (12 * MIB, 11 * MIB);
    let error = harness
        .store
        .rehost(
            &job_id,
            &harness.source.url(&format!("/short/{size}/{sent}")),
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(error, RehostError::SourceBody { .. }), "{error:?}");
    assert!(error.is_transient());
    harness.assert_nothing_stored(&job_id).await;

    harness.cleanup().await;
}

#[tokio::test]
async fn reset_mid_body_is_transient_and_aborts_the_upload() {
    let harness = Harness::new(|_| {}).await;
    let job_id = new_job_id();
    let (size, sent) = (12 * MIB, 7 * MIB);
    let error = harness
        .store
        .rehost(
            &job_id,
            &harness.source.url(&format!("/reset/{size}/{sent}")),
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(error, RehostError::SourceBody { .. }), "{error:?}");
    assert!(error.is_transient());
    harness.assert_nothing_stored(&job_id).await;

    harness.cleanup().await;
}

#[tokio::test]
async fn provider_size_mismatch_is_transient() {
    let harness = Harness::new(|_| {}).await;
    let (job_id, error) = harness
        .failed_rehost(&harness.source.url("/video/5000"), Some(5001))
        .await;
    assert!(
        matches!(
            error,
            RehostError::DeclaredSizeMismatch {
                content_length: 5000,
                provider_size: 5001
            }
        ),
        "{error:?}"
    );
    assert!(error.is_transient());
    harness.assert_nothing_stored(&job_id).await;

    harness.cleanup().await;
}

#[tokio::test]
async fn unsized_body_is_checked_against_the_provider_size() {
    let harness = Harness::new(|_| {}).await;
    let (job_id, error) = harness
        .failed_rehost(&harness.source.url("/unsized/5000"), Some(6000))
        .await;
    assert!(
        matches!(
            error,
            RehostError::LengthMismatch {
                expected: 6000,
                received: 5000
            }
        ),
        "{error:?}"
    );
    assert!(error.is_transient());
    harness.assert_nothing_stored(&job_id).await;

    harness.cleanup().await;
}

#[tokio::test]
async fn declared_size_over_the_limit_is_permanent() {
    let harness = Harness::new(|config| config.max_video_bytes = 6 * MIB).await;
    let job_id = new_job_id();
    let size = 6 * MIB + 1;
    let error = harness
        .store
        .rehost(
            &job_id,
            &harness.source.url(&format!("/video/{size}")),
            None,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            RehostError::TooLarge {
                size: 6_291_457,
                ..
            }
        ),
        "{error:?}"
    );
    assert!(error.is_permanent());
    harness.assert_nothing_stored(&job_id).await;

    harness.cleanup().await;
}

#[tokio::test]
async fn streamed_size_over_the_limit_is_permanent_and_aborts_the_upload() {
    let harness = Harness::new(|config| config.max_video_bytes = 12 * MIB).await;
    let job_id = new_job_id();
    let error = harness
        .store
        .rehost(
            &job_id,
            &harness.source.url(&format!("/unsized/{}", 40 * MIB)),
            None,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(error, RehostError::TooLarge { limit, .. } if limit == 12 * MIB),
        "{error:?}"
    );
    assert!(error.is_permanent());
    harness.assert_nothing_stored(&job_id).await;

    harness.cleanup().await;
}

#[tokio::test]
async fn expired_source_statuses_ask_for_a_fresh_url() {
    let harness = Harness::new(|_| {}).await;
    let job_id = new_job_id();
    for status in [403, 404, 410] {
        let url = harness
            .source
            .url(&format!("/status/{status}?X-Amz-Signature=topsecret"));
        let error = harness.store.rehost(&job_id, &url, None).await.unwrap_err();
        assert!(
            matches!(error, RehostError::SourceStatus { status: s, .. } if s == status),
            "{error:?}"
        );
        assert!(error.is_source_expired(), "{status}");
        let text = full_error_text(&error);
        assert!(
            !text.contains("topsecret") && text.contains("/status/"),
            "{text}"
        );
    }
    harness.assert_nothing_stored(&job_id).await;

    harness.cleanup().await;
}

#[tokio::test]
async fn overloaded_source_is_transient_with_retry_after() {
    let harness = Harness::new(|_| {}).await;
    let error = harness
        .store
        .rehost(&new_job_id(), &harness.source.url("/status/503"), None)
        .await
        .unwrap_err();
    assert!(error.is_transient());
    assert_eq!(error.retry_after(), Some(Duration::from_secs(7)));

    harness.cleanup().await;
}

#[tokio::test]
async fn unreachable_source_is_transient_and_its_url_is_redacted() {
    let harness = Harness::new(|_| {}).await;
    let closed_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{closed_port}/v.mp4?X-Amz-Signature=topsecret");
    let error = harness
        .store
        .rehost(&new_job_id(), &url, None)
        .await
        .unwrap_err();
    assert!(
        matches!(error, RehostError::SourceRequest { .. }),
        "{error:?}"
    );
    assert!(error.is_transient());
    let text = full_error_text(&error);
    assert!(!text.contains("topsecret"), "{text}");

    harness.cleanup().await;
}

#[tokio::test]
async fn stalled_source_hits_the_idle_timeout_and_aborts_the_upload() {
    let harness =
        Harness::new(|config| config.download_idle_timeout = Duration::from_secs(1)).await;
    let job_id = new_job_id();
    let (size, sent) = (12 * MIB, 6 * MIB);
    let error = harness
        .store
        .rehost(
            &job_id,
            &harness.source.url(&format!("/stall/{size}/{sent}")),
            None,
        )
        .await
        .unwrap_err();
    // The source stalls after 6 MiB; on a loaded machine the idle timeout may even fire before
    // the headers arrive. Either way it is a timeout of the source, transient, storing nothing.
    assert!(
        matches!(
            error,
            RehostError::SourceBody { .. } | RehostError::SourceRequest { .. }
        ),
        "{error:?}"
    );
    assert!(
        full_error_text(&error).to_lowercase().contains("time"),
        "{}",
        full_error_text(&error)
    );
    assert!(error.is_transient());
    harness.assert_nothing_stored(&job_id).await;

    harness.cleanup().await;
}

#[tokio::test]
async fn cancelled_rehost_aborts_its_multipart_upload() {
    let harness = Harness::new(|_| {}).await;
    let job_id = new_job_id();
    let (size, sent) = (12 * MIB, 6 * MIB);
    let store = harness.store.clone();
    let url = harness.source.url(&format!("/stall/{size}/{sent}"));
    let rehost = tokio::spawn({
        let job_id = job_id.clone();
        async move { store.rehost(&job_id, &url, None).await }
    });

    eventually("the multipart upload has started", || async {
        harness.incomplete_uploads().await == 1
    })
    .await;
    rehost.abort();

    eventually("the multipart upload is aborted", || async {
        harness.incomplete_uploads().await == 0
    })
    .await;
    harness.assert_nothing_stored(&job_id).await;

    harness.cleanup().await;
}

#[tokio::test]
async fn a_rehost_cancelled_before_s3_named_its_upload_still_aborts_it() {
    // S3 creates the upload, but its answer (the only place its id is) is held back until
    // the re-host has been cancelled.
    let harness = Harness::new(|_| {}).await;
    let proxy = TcpProxy::start(harness.endpoint.host_port()).await.unwrap();
    let mut config = test_config(&harness.endpoint, &harness.bucket);
    config.endpoint = Some(proxy.http_url());
    let store = VideoStore::new(config).await.unwrap();
    let job_id = new_job_id();
    let url = harness.source.url(&format!("/video/{}", 12 * MIB));
    proxy.hold_replies(true);
    let rehost = tokio::spawn({
        let job_id = job_id.clone();
        async move { store.rehost(&job_id, &url, None).await }
    });
    // Listed through the harness's own client, not through the proxy.
    eventually("S3 has created the upload", || async {
        harness.incomplete_uploads().await == 1
    })
    .await;
    rehost.abort();
    let _ = rehost.await;
    proxy.hold_replies(false);

    eventually("the multipart upload is aborted", || async {
        harness.incomplete_uploads().await == 0
    })
    .await;
    harness.assert_nothing_stored(&job_id).await;

    harness.cleanup().await;
}

#[tokio::test]
async fn repeated_rehost_is_harmless() {
    let harness = Harness::new(|_| {}).await;
    let job_id = new_job_id();
    let size = 6 * MIB;
    let url = harness.source.url(&format!("/video/{size}"));

    let first = harness
        .store
        .rehost(&job_id, &url, Some(size))
        .await
        .unwrap();
    let second = harness
        .store
        .rehost(&job_id, &url, Some(size))
        .await
        .unwrap();
    // A failed attempt afterwards leaves the stored video intact.
    let failed = harness
        .store
        .rehost(&job_id, &harness.source.url("/notmp4/5000"), None)
        .await;

    assert!(failed.is_err());
    assert_eq!(
        (first.key.as_str(), first.sha256.as_str()),
        (second.key.as_str(), second.sha256.as_str())
    );
    assert_eq!(harness.object_count().await, 1);
    assert_eq!(harness.incomplete_uploads().await, 0);
    assert_eq!(
        harness.stored_sha256(&first.key).await,
        (size, first.sha256.clone())
    );
    assert_eq!(
        harness
            .store
            .head(&job_id)
            .await
            .unwrap()
            .expect("stored")
            .sha256,
        first.sha256
    );

    harness.cleanup().await;
}

#[tokio::test]
async fn presigned_url_downloads_the_object() {
    let harness = Harness::new(|config| config.presign_ttl = Duration::from_secs(300)).await;
    let size = 300_000;
    let stored = harness
        .store
        .rehost(
            &new_job_id(),
            &harness.source.url(&format!("/video/{size}")),
            None,
        )
        .await
        .unwrap();

    assert!(stored.url.contains("X-Amz-Signature="));
    assert!(!format!("{stored:?}").contains("X-Amz-Signature="));
    let response = reqwest::get(&stored.url).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = response.bytes().await.unwrap();
    assert_eq!(body.len() as u64, size);
    assert_eq!(
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&body)),
        stored.sha256
    );

    harness.cleanup().await;
}

#[tokio::test]
async fn public_base_url_replaces_presigning() {
    let harness = Harness::new(|config| {
        config.public_base_url = Some("https://cdn.example.com/media/".into())
    })
    .await;
    let job_id = new_job_id();
    let stored = harness
        .store
        .rehost(&job_id, &harness.source.url("/video/5000"), None)
        .await
        .unwrap();
    assert_eq!(
        stored.url,
        format!("https://cdn.example.com/media/videos/{job_id}.mp4")
    );

    harness.cleanup().await;
}

#[tokio::test]
async fn head_of_a_missing_video_is_none_and_bad_job_ids_are_rejected() {
    let harness = Harness::new(|_| {}).await;
    assert!(harness.store.head(&new_job_id()).await.unwrap().is_none());
    let error = harness.store.head("../etc/passwd").await.unwrap_err();
    assert!(
        matches!(error, StorageError::InvalidJobId { .. }),
        "{error:?}"
    );
    let error = harness
        .store
        .rehost("a/b", &harness.source.url("/video/5000"), None)
        .await
        .unwrap_err();
    assert!(error.is_permanent(), "{error:?}");

    harness.cleanup().await;
}

#[tokio::test]
async fn ensure_bucket_creates_a_missing_bucket_once() {
    let harness = Harness::new(|_| {}).await;
    let bucket = format!("storage-it-ensure-{}", uuid::Uuid::now_v7().simple());
    let store = VideoStore::new(test_config(&harness.endpoint, &bucket))
        .await
        .unwrap();
    store.ensure_bucket().await.unwrap();
    store.ensure_bucket().await.unwrap();
    let stored = store
        .rehost(&new_job_id(), &harness.source.url("/video/5000"), None)
        .await
        .unwrap();
    assert_eq!(stored.bucket, bucket);

    delete_bucket(store.s3_client(), &bucket).await;
    harness.cleanup().await;
}

#[tokio::test]
async fn unreachable_s3_is_transient_then_recovers() {
    let harness = Harness::new(|_| {}).await;
    let proxy = TcpProxy::start(harness.endpoint.host_port()).await.unwrap();
    let mut config = test_config(&harness.endpoint, &harness.bucket);
    config.endpoint = Some(proxy.http_url());
    config.s3_max_attempts = 2;
    let store = VideoStore::new(config).await.unwrap();
    let job_id = new_job_id();
    let url = harness.source.url("/video/5000");

    // A first request leaves a pooled connection through the proxy, which set_down must cut.
    assert!(store.head(&job_id).await.unwrap().is_none());
    proxy.set_down(true);
    let error = store.rehost(&job_id, &url, None).await.unwrap_err();
    assert!(
        matches!(
            error,
            RehostError::Storage(StorageError::S3 {
                operation: "PutObject",
                ..
            })
        ),
        "{error:?}"
    );
    assert!(error.is_transient(), "{error:?}");
    let message = std::error::Error::source(&error)
        .expect("the S3 error")
        .to_string();
    assert!(
        message.starts_with(&format!("s3 PutObject of {}/videos/", harness.bucket)),
        "{message}"
    );
    assert!(
        !message.contains("DispatchFailure("),
        "a Debug dump in the message: {message}"
    );
    let error = store.head(&job_id).await.unwrap_err();
    assert!(error.is_transient(), "{error:?}");

    proxy.set_down(false);
    let stored = store.rehost(&job_id, &url, None).await.unwrap();
    assert_eq!(stored.sha256, video_sha256(5000));
    assert!(store.head(&job_id).await.unwrap().is_some());

    harness.cleanup().await;
}
