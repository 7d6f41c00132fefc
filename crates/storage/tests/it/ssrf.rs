//! The download's SSRF guard: sources and redirect hops at non-public addresses are refused
//! (`DOWNLOAD_REFUSED`, permanent) without connecting, unless `download_allow_cidrs` admits
//! them; nothing is stored for a refused download.

use std::time::Duration;

use klingq_storage::{ErrorClass, RehostError};

use crate::source::{SourceServer, video_sha256};
use crate::{Harness, full_error_text, new_job_id};

/// A refusal must come back at once: a guard that connected first would wait on the connect
/// timeout (set long below) or fail with a different error.
const PROMPTLY: Duration = Duration::from_secs(5);

fn allow(cidrs: &[&str]) -> impl FnOnce(&mut klingq_storage::StorageConfig) {
    let cidrs: Vec<String> = cidrs.iter().map(|c| (*c).to_owned()).collect();
    move |config| {
        config.download_allow_cidrs = cidrs;
        config.download_connect_timeout = Duration::from_secs(60);
    }
}

/// Re-hosts `url` for a fresh job, expecting a refusal; checks what every refusal must be and
/// returns the job id and the reason.
async fn refused(harness: &Harness, url: &str) -> (String, String) {
    let (job_id, error) = tokio::time::timeout(PROMPTLY, harness.failed_rehost(url, None))
        .await
        .unwrap_or_else(|_| panic!("{url}: not refused promptly"));
    let RehostError::DownloadRefused { reason, .. } = &error else {
        panic!("{url}: expected a refusal, got {error:?}");
    };
    assert_eq!(error.class(), ErrorClass::Permanent, "{url}");
    assert_eq!(error.code(), "DOWNLOAD_REFUSED", "{url}");
    let text = full_error_text(&error);
    assert!(!text.contains("topsecret"), "{url}: {text}");
    (job_id, reason.clone())
}

#[tokio::test]
async fn loopback_source_without_an_allow_list_is_refused_and_nothing_is_stored() {
    let harness = Harness::new(allow(&[])).await;
    let port = harness.source.port();

    // An IP literal, refused before sending.
    let url = harness
        .source
        .url("/video/1000?X-Amz-Signature=topsecret&X-Amz-Credential=k");
    let (job_id, reason) = refused(&harness, &url).await;
    assert!(
        reason.contains("127.0.0.1 is loopback and not allow-listed"),
        "{reason}"
    );
    harness.assert_nothing_stored(&job_id).await;

    // A name resolving to loopback, refused by the resolver.
    let url = format!("http://localhost:{port}/video/1000?X-Amz-Signature=topsecret");
    let (job_id, reason) = refused(&harness, &url).await;
    assert!(reason.contains("resolves to"), "{reason}");
    assert!(reason.contains("loopback"), "{reason}");
    harness.assert_nothing_stored(&job_id).await;

    assert_eq!(harness.source.connections(), 0, "the source was contacted");
    harness.cleanup().await;
}

#[tokio::test]
async fn ipv6_loopback_and_metadata_addresses_are_refused_without_connecting() {
    let harness = Harness::new(allow(&[])).await;
    let port = harness.source.port();
    for (url, why) in [
        (format!("http://[::1]:{port}/video/1000"), "loopback"),
        (
            "http://169.254.169.254/latest/meta-data/iam/security-credentials/".to_owned(),
            "link-local",
        ),
        (
            "http://[::ffff:169.254.169.254]/latest/meta-data/".to_owned(),
            "link-local",
        ),
        (
            "http://[64:ff9b::a9fe:a9fe]/latest/meta-data/".to_owned(),
            "link-local",
        ),
        ("http://[2002:a9fe:a9fe::1]/".to_owned(), "link-local"),
        (
            "http://[fd00:ec2::254]/latest/meta-data/".to_owned(),
            "unique-local",
        ),
        (
            "http://100.100.100.200/latest/meta-data/".to_owned(),
            "carrier-grade NAT",
        ),
        ("http://10.0.0.1/v.mp4?sig=topsecret".to_owned(), "private"),
        ("http://2130706433/v.mp4".to_owned(), "loopback"),
        ("file:///etc/passwd".to_owned(), "not http or https"),
    ] {
        let (job_id, reason) = refused(&harness, &url).await;
        assert!(reason.contains(why), "{url}: {reason}");
        harness.assert_nothing_stored(&job_id).await;
    }
    assert_eq!(harness.source.connections(), 0, "the source was contacted");
    harness.cleanup().await;
}

#[tokio::test]
async fn redirect_from_an_allowed_source_to_a_refused_address_is_refused() {
    // Only the source's own address is allowed; the rest of loopback is not.
    let harness = Harness::new(allow(&["127.0.0.1/32"])).await;
    let port = harness.source.port();
    for (to, why) in [
        (format!("127.0.0.2:{port}"), "127.0.0.2 is loopback"),
        (format!("%5B::1%5D:{port}"), "::1 is loopback"),
        (
            "169.254.169.254".to_owned(),
            "169.254.169.254 is link-local",
        ),
        (
            "%5B::ffff:169.254.169.254%5D".to_owned(),
            "169.254.169.254 is link-local",
        ),
    ] {
        let before = harness.source.connections();
        let url = harness
            .source
            .url(&format!("/to/{to}/video/1000?X-Amz-Signature=topsecret"));
        let (job_id, reason) = refused(&harness, &url).await;
        assert!(reason.contains(why), "{to}: {reason}");
        assert!(reason.contains("(redirect 1)"), "{to}: {reason}");
        assert_eq!(
            harness.source.connections() - before,
            1,
            "{to}: only the allowed first hop connects"
        );
        harness.assert_nothing_stored(&job_id).await;
    }
    harness.cleanup().await;
}

#[tokio::test]
async fn redirect_to_a_name_resolving_to_a_refused_address_is_refused() {
    // The source is on 127.0.0.2, the only allowed address; `localhost` resolves to 127.0.0.1
    // (and ::1), so the resolver refuses the redirect's host when the hop connects.
    let harness = Harness::new(allow(&["127.0.0.2/32"])).await;
    let source = SourceServer::start_at("127.0.0.2").await;
    let beside = SourceServer::start().await;
    let url = source.url(&format!(
        "/to/localhost:{}/video/1000?X-Amz-Signature=topsecret",
        beside.port()
    ));
    let (job_id, reason) = refused(&harness, &url).await;
    assert!(reason.contains("resolves to"), "{reason}");
    assert!(reason.contains("loopback"), "{reason}");
    assert_eq!(source.connections(), 1);
    assert_eq!(beside.connections(), 0, "the refused hop was contacted");
    harness.assert_nothing_stored(&job_id).await;

    // The same source serves directly.
    let job_id = new_job_id();
    let stored = harness
        .store
        .rehost(&job_id, &source.url("/video/1000"), Some(1000))
        .await
        .unwrap();
    assert_eq!(stored.sha256, video_sha256(1000));
    harness.cleanup().await;
}

#[tokio::test]
async fn redirect_chain_longer_than_three_is_refused() {
    let harness = Harness::new(|_| {}).await;

    let job_id = new_job_id();
    let stored = harness
        .store
        .rehost(
            &job_id,
            &harness.source.url("/redirect/3/video/1000"),
            Some(1000),
        )
        .await
        .expect("three redirects are followed");
    assert_eq!(stored.sha256, video_sha256(1000));
    assert_eq!(harness.source.connections(), 4);

    let url = harness
        .source
        .url("/redirect/4/video/1000?X-Amz-Signature=topsecret");
    let (job_id, reason) = refused(&harness, &url).await;
    assert!(reason.contains("more than 3 redirects"), "{reason}");
    assert_eq!(
        harness.source.connections(),
        4 + 4,
        "the fifth hop was contacted"
    );
    assert!(harness.store.head(&job_id).await.unwrap().is_none());
    harness.cleanup().await;
}

#[tokio::test]
async fn allow_list_covering_loopback_downloads_by_address_and_by_name() {
    let harness = Harness::new(allow(&["127.0.0.0/8", "::1"])).await;
    let port = harness.source.port();
    for url in [
        harness.source.url("/video/4096?X-Amz-Signature=x"),
        format!("http://localhost:{port}/video/4096"),
        harness.source.url("/redirect/1/video/4096"),
    ] {
        let stored = harness
            .store
            .rehost(&new_job_id(), &url, Some(4096))
            .await
            .unwrap_or_else(|error| panic!("{url}: {error:?}"));
        assert_eq!(stored.sha256, video_sha256(4096), "{url}");
    }
    harness.cleanup().await;
}
