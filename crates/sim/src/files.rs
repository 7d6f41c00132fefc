//! `GET /files/{run_id}.mp4?exp=&sig=`: presigned, expiring, range-capable video downloads with faults.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use uuid::Uuid;

use crate::api::{SharedSim, unix_now};
use crate::error::s3_error;
use crate::faults::FaultKind;
use crate::state::Status;
use crate::video::{self, StreamEnd, VideoLayout};

/// A parsed `Range` header against a file of known size.
#[derive(Debug, PartialEq, Eq)]
enum RangeRequest {
    /// No usable range: send the whole file.
    Full,
    /// Inclusive byte range.
    Partial(u64, u64),
    /// The range cannot be satisfied: 416.
    Unsatisfiable,
}

/// Parses a single-range `bytes=` header; multiple ranges are answered with the whole file.
fn parse_range(value: Option<&str>, size: u64) -> RangeRequest {
    let Some(spec) = value.and_then(|value| value.trim().strip_prefix("bytes=")) else {
        return RangeRequest::Full;
    };
    if spec.contains(',') {
        return RangeRequest::Full;
    }
    let Some((start, end)) = spec.split_once('-') else {
        return RangeRequest::Unsatisfiable;
    };
    let (start, end) = (start.trim(), end.trim());
    let parsed = if start.is_empty() {
        match end.parse::<u64>() {
            Ok(0) | Err(_) => return RangeRequest::Unsatisfiable,
            Ok(suffix) => (size.saturating_sub(suffix), size.saturating_sub(1)),
        }
    } else {
        let Ok(start) = start.parse::<u64>() else {
            return RangeRequest::Unsatisfiable;
        };
        let end = if end.is_empty() {
            size.saturating_sub(1)
        } else {
            match end.parse::<u64>() {
                Ok(end) if end >= start => end.min(size.saturating_sub(1)),
                _ => return RangeRequest::Unsatisfiable,
            }
        };
        (start, end)
    };
    if size == 0 || parsed.0 >= size {
        RangeRequest::Unsatisfiable
    } else {
        RangeRequest::Partial(parsed.0, parsed.1)
    }
}

fn expired() -> Response {
    s3_error(StatusCode::FORBIDDEN, "AccessDenied", "Request has expired")
}

fn no_such_key() -> Response {
    s3_error(
        StatusCode::NOT_FOUND,
        "NoSuchKey",
        "The specified key does not exist.",
    )
}

fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

/// Serves the video bytes, honouring `Range` and applying a body-level fault.
fn serve(
    layout: Arc<VideoLayout>,
    etag: String,
    request_headers: &HeaderMap,
    fault: Option<FaultKind>,
    slow_bytes_per_sec: u64,
) -> Response {
    let size = layout.size();
    if request_headers
        .get(header::IF_NONE_MATCH)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| {
            value
                .split(',')
                .any(|tag| tag.trim() == etag || tag.trim() == "*")
        })
    {
        return (
            StatusCode::NOT_MODIFIED,
            [(header::ETAG, header_value(&etag))],
        )
            .into_response();
    }
    let range = parse_range(
        request_headers
            .get(header::RANGE)
            .and_then(|value| value.to_str().ok()),
        size,
    );
    let (status, start, end_inclusive) = match range {
        RangeRequest::Full if size == 0 => (StatusCode::OK, 0, 0),
        RangeRequest::Full => (StatusCode::OK, 0, size - 1),
        RangeRequest::Partial(start, end) => (StatusCode::PARTIAL_CONTENT, start, end),
        RangeRequest::Unsatisfiable => {
            return (
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(
                    header::CONTENT_RANGE,
                    header_value(&format!("bytes */{size}")),
                )],
            )
                .into_response();
        }
    };
    let length = if size == 0 {
        0
    } else {
        end_inclusive - start + 1
    };
    // Faulty bodies stop halfway; a reset aborts the connection, a short body just ends early.
    let cut = start + (length / 2).min(256 * 1024);
    let (send_until, ending) = match fault {
        Some(FaultKind::DownloadReset) => (cut, StreamEnd::Reset),
        Some(FaultKind::DownloadShort) => (cut, StreamEnd::Short),
        _ => (start + length, StreamEnd::Complete),
    };
    let pace = (fault == Some(FaultKind::DownloadSlow)).then_some(slow_bytes_per_sec);
    let content_type = if fault == Some(FaultKind::DownloadWrongType) {
        "text/html; charset=utf-8"
    } else {
        "video/mp4"
    };
    let body = Body::from_stream(video::stream(layout, start, send_until, ending, pace));
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CONTENT_LENGTH, header_value(&length.to_string()));
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    headers.insert(header::ETAG, header_value(&etag));
    if status == StatusCode::PARTIAL_CONTENT {
        headers.insert(
            header::CONTENT_RANGE,
            header_value(&format!("bytes {start}-{end_inclusive}/{size}")),
        );
    }
    response
}

/// `GET /files/{run_id}.mp4?exp=...&sig=...`.
pub(crate) async fn download(
    State(sim): State<SharedSim>,
    Path(file): Path<String>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    sim.lock().stats.downloads += 1;
    let Some(run_id) = file
        .strip_suffix(".mp4")
        .and_then(|id| Uuid::parse_str(id).ok())
    else {
        return no_such_key();
    };
    let (Some(exp), Some(signature)) = (
        params.get("exp").and_then(|exp| exp.parse::<u64>().ok()),
        params.get("sig"),
    ) else {
        return s3_error(
            StatusCode::FORBIDDEN,
            "AccessDenied",
            "Query-string authentication requires the exp and sig parameters",
        );
    };
    if !sim.signer.verify(run_id, exp, signature) {
        return s3_error(
            StatusCode::FORBIDDEN,
            "SignatureDoesNotMatch",
            "The request signature we calculated does not match the signature you provided.",
        );
    }
    if unix_now() >= exp {
        return expired();
    }
    let (layout, fault, slow_rate) = {
        let mut state = sim.lock();
        let now = Instant::now();
        state.settle(now);
        let available = state
            .run(run_id)
            .is_some_and(|run| run.has_video() && run.status_at(now) == Status::Succeeded);
        if !available {
            return no_such_key();
        }
        let fault = state.download_fault(run_id);
        let Some(run) = state.run(run_id) else {
            return no_such_key();
        };
        (
            Arc::clone(&run.video),
            fault,
            state.config.slow_download_bytes_per_sec,
        )
    };
    let etag = format!("\"{}-{:x}\"", run_id.simple(), layout.size());
    match fault {
        Some(FaultKind::DownloadExpired) => expired(),
        Some(FaultKind::Download404) => no_such_key(),
        Some(FaultKind::Download5xx) => s3_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "SlowDown",
            "Please reduce your request rate.",
        ),
        Some(FaultKind::DownloadNotMp4) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "video/mp4")],
            "<html><body><h1>Video processing</h1><p>Please try again later.</p></body></html>",
        )
            .into_response(),
        other => serve(layout, etag, &headers, other, slow_rate),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ranges() {
        assert_eq!(parse_range(None, 100), RangeRequest::Full);
        assert_eq!(
            parse_range(Some("bytes=0-9"), 100),
            RangeRequest::Partial(0, 9)
        );
        assert_eq!(
            parse_range(Some("bytes=90-"), 100),
            RangeRequest::Partial(90, 99)
        );
        assert_eq!(
            parse_range(Some("bytes=90-500"), 100),
            RangeRequest::Partial(90, 99)
        );
        assert_eq!(
            parse_range(Some("bytes=-10"), 100),
            RangeRequest::Partial(90, 99)
        );
        assert_eq!(
            parse_range(Some("bytes=-500"), 100),
            RangeRequest::Partial(0, 99)
        );
        assert_eq!(
            parse_range(Some("bytes=100-"), 100),
            RangeRequest::Unsatisfiable
        );
        assert_eq!(
            parse_range(Some("bytes=9-3"), 100),
            RangeRequest::Unsatisfiable
        );
        assert_eq!(
            parse_range(Some("bytes=-0"), 100),
            RangeRequest::Unsatisfiable
        );
        assert_eq!(parse_range(Some("bytes=0-1,5-6"), 100), RangeRequest::Full);
        assert_eq!(parse_range(Some("items=0-1"), 100), RangeRequest::Full);
    }
}
