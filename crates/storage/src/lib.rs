//! Re-hosts provider videos in S3: the download streams straight into a verified upload.
//!
//! # Layout
//! - [`config`]: [`StorageConfig`], the serde-loaded settings with their defaults.
//! - [`store`]: [`VideoStore`], the S3 and HTTP clients, and the public operations
//!   ([`VideoStore::rehost`], [`VideoStore::upload_stream`], [`VideoStore::head`], ...).
//! - `upload`: the streaming core. It verifies the body (size, length, MP4 magic, sha256) chunk
//!   by chunk and sends it as one `PutObject` (small videos) or a multipart upload whose
//!   incomplete state is aborted on any failure, including cancellation.
//! - [`error`]: [`StorageError`] and [`RehostError`], which classify themselves with
//!   [`ErrorClass`] so the pipeline can pick refresh, retry or fail.
//! - [`redact`]: [`RedactedUrl`], the only way a source or presigned URL reaches a log or an error.
//!
//! # Memory
//! At most two parts are held at a time: the part being uploaded and the part being filled.
//! A video smaller than one part is buffered whole and stored with a single `PutObject`.
//!
//! # Metadata
//! Every stored object carries `x-amz-meta-job-id` and `x-amz-meta-sha256` (hex of the whole
//! body). A multipart upload learns the sha256 only at the end, so it is completed first and then
//! copied onto itself with the metadata added; [`VideoStore::head`] treats an object without a
//! sha256 as not (yet) re-hosted.

pub mod config;
pub mod error;
pub mod redact;
pub mod store;
mod upload;

pub use config::{ChecksumMode, SecretString, StorageConfig};
pub use error::{ErrorClass, RehostError, StorageError};
pub use redact::RedactedUrl;
pub use store::{StoredVideo, VideoStore};
