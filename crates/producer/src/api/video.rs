//! `GET /v1/jobs/{id}/video`: a URL to play a job's stored video from, handed out fresh on
//! every call (a presigned URL lives `storage.presign_ttl_secs`; the one stored with the job
//! may have expired). The producer knows nothing of storage: whoever builds the API (the
//! `klingq` binary) plugs an object store in through [`VideoLinks`].

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use futures::future::BoxFuture;
use http::StatusCode;
use klingq_core::job::format_ms;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::AppState;
use super::error::ApiError;
use super::handlers::path_id;
use crate::view::ErrorBody;

/// A link to a stored object, as the object store hands it out. The URL is a secret when it
/// is presigned: it is returned to the caller and never logged.
#[derive(Clone)]
pub struct VideoLink {
    pub url: String,
    /// When a presigned URL stops working, in ms since the Unix epoch; `None` for a public URL.
    pub expires_at_ms: Option<u64>,
}

impl std::fmt::Debug for VideoLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VideoLink")
            .field("url", &"<redacted>")
            .field("expires_at_ms", &self.expires_at_ms)
            .finish()
    }
}

/// Hands out links to stored videos (the `klingq` binary's object store).
pub trait VideoLinks: Send + Sync {
    /// A link to the object `key` in `bucket`; the error is a message safe to show.
    fn link<'a>(
        &'a self,
        bucket: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, Result<VideoLink, String>>;
}

/// Where a job's video can be played from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VideoLinkView {
    /// A presigned URL (valid until `expires_at`) or the public URL of the video.
    #[schema(format = "uri")]
    pub url: String,
    /// When a presigned URL stops working; `null` for a public URL.
    #[schema(format = DateTime)]
    pub expires_at: Option<String>,
    pub content_type: String,
    /// Bytes.
    pub size: u64,
}

pub(crate) type SharedVideoLinks = Option<Arc<dyn VideoLinks>>;

/// A link to play a job's video.
///
/// A fresh link on every call: a presigned URL valid for the storage's `presign_ttl_secs`, or
/// the public URL when storage has a `public_base_url`.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/video",
    tag = "jobs",
    operation_id = "get_job_video",
    params(("id" = String, Path, format = "uuid", description = "The job's id.")),
    responses(
        (status = 200, description = "Where to play the video from.", body = VideoLinkView),
        (status = 401, description = "Missing or wrong bearer token.", body = ErrorBody),
        (status = 404, description = "No such job, or it has no stored video (yet).", body = ErrorBody),
        (status = 503, description = "Redis or the object store is unavailable, or this server has no object store configured.", body = ErrorBody),
    )
)]
pub(crate) async fn job_video(
    State(app): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<VideoLinkView>, ApiError> {
    let id = path_id(path, "job")?;
    let job = app.producer.job(&id).await?;
    let Some(video) = job.video else {
        return Err(ApiError::not_found(format!(
            "job {id} has no stored video (it is {})",
            job.state
        )));
    };
    let Some(links) = &app.video_links else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_object_store",
            "this server has no object store configured to hand out video links",
        ));
    };
    let link = links
        .link(&video.bucket, &video.key)
        .await
        .map_err(|message| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "object_store_unavailable",
                message,
            )
        })?;
    Ok(Json(VideoLinkView {
        url: link.url,
        expires_at: link.expires_at_ms.map(format_ms),
        content_type: video.content_type,
        size: video.size,
    }))
}
