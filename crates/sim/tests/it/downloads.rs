//! Video downloads: exact bytes, signatures, expiry, ranges, download faults and large files.

use futures::StreamExt;
use klingq_sim::SimConfig;
use reqwest::StatusCode;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::common::{Harness, fast, harness, header, input};

/// Creates a run, waits for success and returns (run id, video URL, file_size).
async fn succeeded_video(h: &Harness, prompt: &str) -> (String, String, u64) {
    let id = h.create(input(prompt)).await;
    let run = h.wait_terminal(&id).await;
    assert_eq!(run["status_code"], "succeeded");
    let video = &run["output"]["video"];
    (
        id,
        video["url"].as_str().unwrap().to_owned(),
        video["file_size"].as_u64().unwrap(),
    )
}

async fn fresh_url(h: &Harness, id: &str) -> String {
    let run: Value = h.get_run(id).await.json().await.unwrap();
    run["output"]["video"]["url"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn serves_the_exact_deterministic_mp4() {
    let h = fast().await;
    let (id, url, size) = succeeded_video(&h, "a river").await;
    let response = h.http.get(&url).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        header(&response, "content-type").as_deref(),
        Some("video/mp4")
    );
    assert_eq!(header(&response, "content-length"), Some(size.to_string()));
    assert_eq!(header(&response, "accept-ranges").as_deref(), Some("bytes"));
    assert!(header(&response, "etag").is_some());
    let bytes = response.bytes().await.unwrap();
    assert_eq!(bytes.len() as u64, size);
    assert_eq!(size, 10_000);
    assert_eq!(&bytes[4..8], b"ftyp");
    assert_eq!(&bytes[8..12], b"isom");
    let record = h.record(&id).unwrap();
    assert_eq!(record.video_size, size);
    assert_eq!(
        record.video_sha256.as_deref(),
        Some(hex::encode(Sha256::digest(&bytes)).as_str())
    );
    let again = h
        .http
        .get(fresh_url(&h, &id).await)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(again, bytes);
    let listed = h.admin("/__sim/runs").await;
    assert_eq!(listed[0]["video_sha256"], record.video_sha256.unwrap());
}

#[tokio::test]
async fn range_requests_return_partial_content() {
    let h = fast().await;
    let (_, url, size) = succeeded_video(&h, "ranges").await;
    let whole = h
        .http
        .get(&url)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();

    let response = h
        .http
        .get(&url)
        .header("range", "bytes=100-199")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        header(&response, "content-range"),
        Some(format!("bytes 100-199/{size}"))
    );
    assert_eq!(header(&response, "content-length").as_deref(), Some("100"));
    assert_eq!(response.bytes().await.unwrap(), whole[100..200]);

    let response = h
        .http
        .get(&url)
        .header("range", "bytes=9000-")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(response.bytes().await.unwrap(), whole[9000..]);

    let response = h
        .http
        .get(&url)
        .header("range", "bytes=-16")
        .send()
        .await
        .unwrap();
    assert_eq!(response.bytes().await.unwrap(), whole[whole.len() - 16..]);

    let response = h
        .http
        .get(&url)
        .header("range", format!("bytes={size}-"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(
        header(&response, "content-range"),
        Some(format!("bytes */{size}"))
    );
}

#[tokio::test]
async fn matching_etag_gives_not_modified() {
    let h = fast().await;
    let (_, url, _) = succeeded_video(&h, "etag").await;
    let first = h.http.get(&url).send().await.unwrap();
    let etag = header(&first, "etag").unwrap();
    let second = h
        .http
        .get(&url)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(second.status(), StatusCode::NOT_MODIFIED);
}

#[tokio::test]
async fn expired_urls_get_s3_access_denied_and_rereads_re_sign() {
    let h = harness(SimConfig {
        url_ttl_secs: 0,
        ..SimConfig::fast()
    })
    .await;
    let (id, url, _) = succeeded_video(&h, "expiring").await;
    let response = h.http.get(&url).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        header(&response, "content-type").as_deref(),
        Some("application/xml")
    );
    let body = response.text().await.unwrap();
    assert!(body.contains("<Code>AccessDenied</Code>"));
    assert!(body.contains("Request has expired"));

    h.sim.update_config(&json!({"url_ttl_secs": 3600})).unwrap();
    let renewed = fresh_url(&h, &id).await;
    assert_ne!(renewed, url);
    assert_eq!(
        h.http.get(&renewed).send().await.unwrap().status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn tampered_or_unsigned_urls_are_forbidden() {
    let h = fast().await;
    let (id, url, _) = succeeded_video(&h, "signed").await;
    let (prefix, signature) = url.rsplit_once("sig=").unwrap();
    let flipped = if signature.starts_with('0') { "1" } else { "0" };
    let tampered = format!("{prefix}sig={flipped}{}", &signature[1..]);
    let response = h.http.get(&tampered).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert!(
        response
            .text()
            .await
            .unwrap()
            .contains("SignatureDoesNotMatch")
    );

    let later = url.replace("exp=", "exp=9");
    assert_eq!(
        h.http.get(&later).send().await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
    let unsigned = h
        .http
        .get(h.url(&format!("/files/{id}.mp4")))
        .send()
        .await
        .unwrap();
    assert_eq!(unsigned.status(), StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn urls_use_the_configured_public_url() {
    let h = harness(SimConfig {
        public_url: Some("https://cdn.example.test/".to_owned()),
        ..SimConfig::fast()
    })
    .await;
    let id = h.create(input("public")).await;
    let run = h.wait_terminal(&id).await;
    let url = run["output"]["video"]["url"].as_str().unwrap();
    assert!(
        url.starts_with(&format!("https://cdn.example.test/files/{id}.mp4?exp=")),
        "{url}"
    );
}

/// Downloads once and expects the given fault, then once more and expects the full video.
async fn fault_then_ok(h: &Harness, token: &str) -> reqwest::Response {
    let (id, url, size) = succeeded_video(h, &format!("a kite [[sim:{token}]]")).await;
    let faulted = h.http.get(&url).send().await;
    let recovered = h.http.get(fresh_url(h, &id).await).send().await.unwrap();
    assert_eq!(recovered.status(), StatusCode::OK, "{token}");
    assert_eq!(
        header(&recovered, "content-type").as_deref(),
        Some("video/mp4")
    );
    assert_eq!(
        recovered.bytes().await.unwrap().len() as u64,
        size,
        "{token}"
    );
    assert_eq!(h.record(&id).unwrap().faults, [token]);
    faulted.expect("the faulted download gets response headers")
}

#[tokio::test]
async fn download_expired_fault() {
    let h = fast().await;
    let response = fault_then_ok(&h, "download-expired").await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert!(
        response
            .text()
            .await
            .unwrap()
            .contains("Request has expired")
    );
}

#[tokio::test]
async fn download_404_and_5xx_faults() {
    let h = fast().await;
    let response = fault_then_ok(&h, "download-404").await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert!(response.text().await.unwrap().contains("NoSuchKey"));
    let response = fault_then_ok(&h, "download-5xx").await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn download_reset_aborts_mid_body() {
    let h = fast().await;
    let response = fault_then_ok(&h, "download-reset").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        header(&response, "content-length").as_deref(),
        Some("10000")
    );
    let mut received = 0;
    let mut stream = response.bytes_stream();
    let mut failed = false;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(chunk) => received += chunk.len(),
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    assert!(failed, "the body must end in an error");
    assert!(received < 10_000);
}

#[tokio::test]
async fn download_short_sends_fewer_bytes_than_content_length() {
    let h = fast().await;
    let response = fault_then_ok(&h, "download-short").await;
    assert_eq!(
        header(&response, "content-length").as_deref(),
        Some("10000")
    );
    assert!(response.bytes().await.is_err());
}

#[tokio::test]
async fn download_wrong_type_and_not_mp4_faults() {
    let h = fast().await;
    let response = fault_then_ok(&h, "download-wrong-type").await;
    assert!(
        header(&response, "content-type")
            .unwrap()
            .starts_with("text/html")
    );
    let response = fault_then_ok(&h, "download-not-mp4").await;
    assert_eq!(
        header(&response, "content-type").as_deref(),
        Some("video/mp4")
    );
    let bytes = response.bytes().await.unwrap();
    assert_ne!(&bytes[4..8], b"ftyp");
}

#[tokio::test]
async fn download_slow_trickles_but_completes() {
    let h = harness(SimConfig {
        slow_download_bytes_per_sec: 200_000,
        ..SimConfig::fast()
    })
    .await;
    let response = fault_then_ok(&h, "download-slow").await;
    assert_eq!(response.bytes().await.unwrap().len(), 10_000);
}

#[tokio::test]
async fn download_fault_counts_are_sticky_per_run() {
    let h = fast().await;
    let (id, _, _) = succeeded_video(&h, "twice [[sim:download-404:2]]").await;
    for expected in [StatusCode::NOT_FOUND, StatusCode::NOT_FOUND, StatusCode::OK] {
        let response = h.http.get(fresh_url(&h, &id).await).send().await.unwrap();
        assert_eq!(response.status(), expected);
    }
    assert_eq!(h.record(&id).unwrap().downloads, 3);
}

#[tokio::test]
async fn download_faults_by_config_rate() {
    let h = harness(SimConfig {
        download_reset: 1.0,
        ..SimConfig::fast()
    })
    .await;
    let (_, url, _) = succeeded_video(&h, "always reset").await;
    for _ in 0..2 {
        let response = h.http.get(&url).send().await.unwrap();
        assert!(response.bytes().await.is_err());
    }
    h.sim
        .update_config(&json!({"download_reset": 0.0, "download_wrong_type": 1.0}))
        .unwrap();
    let response = h.http.get(&url).send().await.unwrap();
    assert!(
        header(&response, "content-type")
            .unwrap()
            .starts_with("text/html")
    );
}

/// Peak resident memory of this test process in KiB, where the platform reports it.
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[tokio::test]
async fn a_500_mb_video_streams_with_bounded_memory() {
    let h = harness(SimConfig {
        video_bytes_per_second: 100_000_000,
        ..SimConfig::fast()
    })
    .await;
    let (_, url, size) = succeeded_video(&h, "a long flight").await;
    assert_eq!(size, 500_000_000);
    let before = peak_rss_kib();
    let response = h.http.get(&url).send().await.unwrap();
    assert_eq!(header(&response, "content-length"), Some(size.to_string()));
    let mut stream = response.bytes_stream();
    let mut received = 0u64;
    let mut head = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        if head.len() < 8 {
            head.extend_from_slice(&chunk[..chunk.len().min(8)]);
        }
        received += chunk.len() as u64;
    }
    assert_eq!(received, size);
    assert_eq!(&head[4..8], b"ftyp");
    if let (Some(before), Some(after)) = (before, peak_rss_kib()) {
        // Streaming keeps growth near a few MB; buffering the file would add 500 MB. The margin
        // absorbs other tests of this process (a panicking test symbolizes its backtrace).
        assert!(
            after.saturating_sub(before) < 200 * 1024,
            "peak RSS grew by {} KiB",
            after - before
        );
    }
}
