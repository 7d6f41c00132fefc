//! klingq's data model, with no I/O: the generation request and its validation, job ids and
//! states, the checkpoint a job carries, the completion event and the cost model.
//!
//! Everything here that derives serde is a wire format (stored in Redis or sent to users): add
//! fields as optional with `#[serde(default)]`, so a job written by one release reads in the
//! next and the previous.

pub mod cost;
pub mod eta;
pub mod event;
pub mod job;
pub mod request;
pub mod scrub;
pub mod secret;
pub mod tenant;
pub mod trace;
pub mod urls;
pub mod validation;

pub use cost::CostModel;
pub use eta::{BatchEta, EtaBasis, EtaInputs, ProviderLoad, TenantLoad};
pub use event::{CompletionEvent, EventType, JobEventData};
pub use job::{
    BatchId, Checkpoint, JobError, JobId, JobSpec, JobState, Priority, ProviderCheckpoint,
    StoredVideo, TimelineEntry,
};
pub use request::{Element, GenerationRequest, PromptShot, VideoDuration};
pub use scrub::scrub;
pub use secret::{Secret, SignedUrl, redact_url};
pub use tenant::{DEFAULT_TENANT, TenantPolicy};
pub use trace::TraceParent;
pub use validation::{FieldError, ValidationErrors};
