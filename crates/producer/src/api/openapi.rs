//! The OpenAPI 3.1 document, generated from the handlers' `#[utoipa::path]` annotations and the
//! view types. The request bodies are parsed by hand (to report every error with its path), so
//! their schemas are written in `input_schema`, from the constants the parsers use, and put
//! into the document as it is built ([`document`]).

use std::borrow::Cow;

use utoipa::openapi::path::ParameterIn;
use utoipa::openapi::schema::{ObjectBuilder, Schema, SchemaType, Type};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{ComponentsBuilder, RefOr};
use utoipa::{Modify, OpenApi, PartialSchema, ToSchema};

use crate::api::callbacks::{CallbackReceived, RunflowCallback, RunflowEvent, RunflowStatus};
use crate::api::history::{HistoryPointView, HistoryView};
use crate::api::video::VideoLinkView;
use crate::api::{callbacks, handlers, history, ops, tenants, video};

mod input_schema;
use crate::ops::{
    BatchListPage, EndpointEnabled, EndpointHealth, EndpointList, JobListItem, JobListPage,
    ProviderLimitView, QueueDepth, SpendView, StatsView,
};
use crate::view::{
    BatchAccepted, BatchCancelResult, BatchResumeResult, BatchView, CancelResult, ErrorBody,
    ErrorDetail, ErrorInfo, ErrorView, EtaView, EventView, Health, JobAccepted, JobPage, JobView,
    NotDead, ProviderView, RedriveRequest, RedriveResult, TenantCounts, TenantList,
    TenantPolicyView, TenantSpend, TenantView, TimelineView, VideoView,
};
use klingq_events::{
    AttemptOutcome, AttemptRecord, DeliveryDetail, DeliveryPage, DeliveryStatus, DeliverySummary,
    EndpointSource, ReplayMode, ReplayOutcome,
};

/// The API's OpenAPI document.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "klingq",
        description = "Batch video generation queue for Kling v3 Pro image-to-video. Submit jobs \
            and batches, follow them, cancel them, re-drive dead letters and stream completion \
            events. Every route but the health checks, this document and Runflow's signed \
            callbacks (`POST /v1/provider/callbacks/runflow`) needs \
            `Authorization: Bearer <token>`. Errors are `{\"error\": {\"code\", \"message\", \
            \"details\"}}`; validation errors (422) list every violated rule with its path."
    ),
    paths(
        handlers::create_job,
        handlers::create_batch,
        handlers::get_job,
        handlers::cancel_job,
        video::job_video,
        handlers::get_batch,
        handlers::batch_jobs,
        handlers::cancel_batch,
        handlers::resume_batch,
        handlers::dead_letters,
        handlers::redrive,
        handlers::events,
        ops::stats,
        history::stats_history,
        tenants::list_tenants,
        tenants::get_tenant,
        tenants::put_tenant,
        ops::list_jobs,
        ops::list_batches,
        ops::list_deliveries,
        ops::get_delivery,
        ops::replay_delivery,
        ops::list_endpoints,
        ops::enable_endpoint,
        callbacks::runflow_callback,
        handlers::healthz,
        handlers::readyz,
        handlers::openapi_json,
    ),
    components(schemas(
        GenerationRequestSchema,
        PromptShotSchema,
        ElementSchema,
        JobInput,
        NestedJob,
        FlatJob,
        BatchInput,
        BatchObject,
        SseEvent,
        JobView,
        TimelineView,
        HistoryView,
        HistoryPointView,
        VideoLinkView,
        ProviderView,
        VideoView,
        ErrorView,
        BatchView,
        JobAccepted,
        BatchAccepted,
        CancelResult,
        BatchCancelResult,
        BatchResumeResult,
        EtaView,
        TenantList,
        TenantView,
        TenantPolicyView,
        TenantCounts,
        TenantSpend,
        RedriveRequest,
        RedriveResult,
        NotDead,
        JobPage,
        EventView,
        ErrorBody,
        ErrorInfo,
        ErrorDetail,
        Health,
        StatsView,
        QueueDepth,
        SpendView,
        ProviderLimitView,
        JobListItem,
        JobListPage,
        BatchListPage,
        EndpointHealth,
        EndpointList,
        EndpointEnabled,
        DeliveryPage,
        DeliverySummary,
        DeliveryDetail,
        DeliveryStatus,
        EndpointSource,
        AttemptRecord,
        AttemptOutcome,
        ReplayOutcome,
        ReplayMode,
        RunflowCallback,
        RunflowEvent,
        RunflowStatus,
        CallbackReceived,
    )),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    tags(
        (name = "jobs", description = "Submit, read and cancel jobs."),
        (name = "batches", description = "Submit, follow and cancel batches of jobs."),
        (name = "dead letters", description = "Jobs the queue gave up on, and re-driving them."),
        (name = "events", description = "Completion events as Server-Sent Events."),
        (name = "operations", description = "Queue depth, outcomes, spend and limits."),
        (name = "webhooks", description = "Webhook deliveries, replays and endpoint health."),
        (name = "provider", description = "Runflow's signed run callbacks; authenticated by their `Runflow-Signature`, not a bearer token."),
        (name = "health", description = "Liveness, readiness and this document; no authentication."),
    )
)]
pub struct ApiDoc;

/// The document as JSON for a namespace with `partitions` partitions (the event cursor's
/// shape depends on it), built once per partition count.
pub(crate) fn document(partitions: usize) -> std::sync::Arc<str> {
    static DOCUMENTS: std::sync::Mutex<Vec<(usize, std::sync::Arc<str>)>> =
        std::sync::Mutex::new(Vec::new());
    let mut documents = DOCUMENTS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((_, document)) = documents.iter().find(|(n, _)| *n == partitions) {
        return document.clone();
    }
    let document: std::sync::Arc<str> = build_document(partitions).into();
    documents.push((partitions, document.clone()));
    document
}

fn build_document(partitions: usize) -> String {
    let mut document =
        serde_json::to_value(ApiDoc::openapi()).expect("the OpenAPI document serializes");
    fix_link_keys(&mut document);
    if let Some(schemas) = document
        .pointer_mut("/components/schemas")
        .and_then(|schemas| schemas.as_object_mut())
    {
        for (name, schema) in input_schema::schemas() {
            schemas.insert(name.to_owned(), schema);
        }
    }
    state_parameter_rules(&mut document, partitions);
    serde_json::to_string_pretty(&document).expect("the OpenAPI document serializes")
}

/// The event cursor's parameters (`from`, `Last-Event-ID`), whose shape depends on the
/// partition count.
fn state_parameter_rules(document: &mut serde_json::Value, partitions: usize) {
    let Some(paths) = document.get_mut("paths").and_then(|p| p.as_object_mut()) else {
        return;
    };
    let cursor = input_schema::cursor_pattern(partitions);
    for (path, item) in paths.iter_mut() {
        let operations = item
            .as_object_mut()
            .into_iter()
            .flat_map(|item| item.values_mut());
        let parameters = operations
            .filter_map(|operation| operation.get_mut("parameters")?.as_array_mut())
            .flat_map(|parameters| parameters.iter_mut());
        for parameter in parameters {
            let name = parameter["name"].as_str().unwrap_or_default().to_owned();
            let schema = match (path.as_str(), name.as_str()) {
                ("/v1/events", "Last-Event-ID") => {
                    serde_json::json!({"type": "string", "pattern": cursor})
                }
                ("/v1/events", "from") => {
                    serde_json::json!({"type": ["string", "null"], "pattern": cursor})
                }
                _ => continue,
            };
            parameter["schema"] = schema;
        }
    }
}

/// utoipa 5 writes a link's `operationId` and `operationRef` in snake case; OpenAPI spells
/// them in camel case.
fn fix_link_keys(document: &mut serde_json::Value) {
    let Some(paths) = document.get_mut("paths").and_then(|p| p.as_object_mut()) else {
        return;
    };
    let operations = paths
        .values_mut()
        .filter_map(|item| item.as_object_mut())
        .flat_map(|item| item.values_mut());
    let responses = operations
        .filter_map(|operation| operation.get_mut("responses")?.as_object_mut())
        .flat_map(|responses| responses.values_mut());
    let links = responses
        .filter_map(|response| response.get_mut("links")?.as_object_mut())
        .flat_map(|links| links.values_mut())
        .filter_map(|link| link.as_object_mut());
    for link in links {
        for (from, to) in [
            ("operation_id", "operationId"),
            ("operation_ref", "operationRef"),
        ] {
            if let Some(value) = link.remove(from) {
                link.insert(to.to_owned(), value);
            }
        }
    }
}

/// Adds the bearer security scheme, makes optional header parameters plain strings
/// (utoipa writes an `Option` header as nullable, but a header is absent, never null), and
/// states that Runflow's callback route takes no bearer token (`security: []`: it is
/// authenticated by its signature).
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi
            .components
            .get_or_insert_with(|| ComponentsBuilder::new().build());
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
        if let Some(callback) = openapi
            .paths
            .paths
            .get_mut(callbacks::CALLBACK_PATH)
            .and_then(|item| item.post.as_mut())
        {
            callback.security = Some(Vec::new());
        }
        for item in openapi.paths.paths.values_mut() {
            let operations = [
                &mut item.get,
                &mut item.post,
                &mut item.put,
                &mut item.delete,
                &mut item.patch,
            ];
            for operation in operations.into_iter().flatten() {
                for parameter in operation.parameters.iter_mut().flatten() {
                    if parameter.parameter_in != ParameterIn::Header {
                        continue;
                    }
                    if let Some(RefOr::T(Schema::Object(object))) = &mut parameter.schema
                        && let SchemaType::Array(kinds) = &object.schema_type
                    {
                        let kinds: Vec<Type> = kinds
                            .iter()
                            .filter(|k| **k != Type::Null)
                            .cloned()
                            .collect();
                        if let [kind] = kinds.as_slice() {
                            object.schema_type = SchemaType::Type(kind.clone());
                        }
                    }
                }
            }
        }
    }
}

macro_rules! schema {
    ($(#[$doc:meta])* $type:ident, $name:literal, $body:expr) => {
        $(#[$doc])*
        pub(crate) struct $type;

        impl PartialSchema for $type {
            fn schema() -> RefOr<Schema> {
                $body
            }
        }

        impl ToSchema for $type {
            fn name() -> Cow<'static, str> {
                Cow::Borrowed($name)
            }
        }
    };
}

macro_rules! placeholder {
    ($(#[$doc:meta])* $type:ident, $name:literal) => {
        $(#[$doc])*
        ///
        /// Registered under its name; its schema is written in `input_schema` and put in
        /// the served document by [`document`].
        pub(crate) struct $type;

        impl PartialSchema for $type {
            fn schema() -> RefOr<Schema> {
                ObjectBuilder::new().into()
            }
        }

        impl ToSchema for $type {
            fn name() -> Cow<'static, str> {
                Cow::Borrowed($name)
            }
        }
    };
}

placeholder!(
    /// The generation request (Kling v3 Pro image-to-video).
    GenerationRequestSchema,
    "GenerationRequest"
);
placeholder!(
    /// One shot of a multi-shot video.
    PromptShotSchema,
    "PromptShot"
);
placeholder!(
    /// An element: a video, or a frontal image with reference images.
    ElementSchema,
    "Element"
);
placeholder!(
    /// A job in the nested shape.
    NestedJob,
    "Job"
);
placeholder!(
    /// A job in the flat shape.
    FlatJob,
    "FlatJob"
);
placeholder!(
    /// A job in either shape.
    JobInput,
    "JobInput"
);
placeholder!(
    /// A batch with options, in the object form.
    BatchObject,
    "BatchObject"
);
placeholder!(
    /// A batch: an array of jobs, or an object with the jobs and options.
    BatchInput,
    "BatchInput"
);

schema!(
    /// One Server-Sent Event of `GET /v1/events`.
    SseEvent,
    "SseEvent",
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .property(
            "id",
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some("^[0-9]+-[0-9]+(,[0-9]+-[0-9]+)*$"))
                .description(Some(
                    "The stream cursor (one stream id per partition, comma-separated, when \
                     `queue.partitions` > 1); send it back as `Last-Event-ID` to resume after it.",
                )),
        )
        .property(
            "event",
            ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some([
                    "job.succeeded",
                    "job.failed",
                    "job.cancelled",
                    "batch.completed",
                ])),
        )
        .property(
            "data",
            ObjectBuilder::new()
                .schema_type(Type::String)
                .content_media_type("application/json")
                .description(Some(
                    "The event as webhooks carry it: `{id, type, timestamp, data}`, as JSON.",
                )),
        )
        .required("id")
        .required("event")
        .required("data")
        .description(Some("An SSE frame: `id:`, `event:` and `data:` lines."))
        .into()
);
