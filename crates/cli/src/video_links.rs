//! The API's video links (`GET /v1/jobs/{id}/video`) from the object store the worker re-hosts
//! videos in: a fresh presigned URL per call, or the public URL.

use std::sync::Arc;

use futures::future::BoxFuture;
use klingq_core::job::now_ms;
use klingq_producer::{ApiState, VideoLink, VideoLinks};
use klingq_storage::{StorageConfig, VideoStore};

struct StoreLinks(VideoStore);

impl VideoLinks for StoreLinks {
    fn link<'a>(
        &'a self,
        bucket: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, Result<VideoLink, String>> {
        Box::pin(async move {
            let config = self.0.config();
            if bucket != config.bucket {
                return Err(format!(
                    "the video is in bucket {bucket:?}; this server's storage is bucket {:?}",
                    config.bucket
                ));
            }
            let expires_at_ms = config
                .public_base_url
                .is_none()
                .then(|| now_ms() + config.presign_ttl.as_millis() as u64);
            // The error names the object, never a URL.
            let url = self
                .0
                .url_for(key)
                .await
                .map_err(|error| error.to_string())?;
            Ok(VideoLink { url, expires_at_ms })
        })
    }
}

/// `state` handing out video links from `storage`; without links (the store's client cannot
/// be built from the settings) when that fails, which the route then answers with 503.
pub(crate) async fn with_video_links(state: ApiState, storage: StorageConfig) -> ApiState {
    match VideoStore::new(storage).await {
        Ok(store) => state.with_video_links(Arc::new(StoreLinks(store))),
        Err(error) => {
            tracing::warn!(%error, "no object store for video links: GET /v1/jobs/{{id}}/video answers 503");
            state
        }
    }
}
