//! The OpenAPI 3.1 document, generated from the handlers' `#[utoipa::path]` annotations and the
//! view types. The request bodies are parsed by hand (to report every error with its path), so
//! their schemas are built here, next to the constants the parser uses.

use std::borrow::Cow;

use klingq_core::job::MAX_METADATA_BYTES;
use klingq_core::request::{
    MAX_PROMPT_CHARS, MAX_REFERENCE_IMAGES, MAX_SHOTS, MAX_VOICE_IDS, SHOT_TYPE_CUSTOMIZE,
};
use klingq_core::urls::{MAX_DATA_URL_BYTES, MAX_MEDIA_URL_BYTES, MAX_WEBHOOK_URL_BYTES};
use utoipa::openapi::path::ParameterIn;
use utoipa::openapi::schema::{
    AdditionalProperties, AnyOfBuilder, ArrayBuilder, KnownFormat, ObjectBuilder, OneOfBuilder,
    Ref, Schema, SchemaFormat, SchemaType, Type,
};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{ComponentsBuilder, RefOr};
use utoipa::{Modify, OpenApi, PartialSchema, ToSchema};

use crate::api::callbacks::{CallbackReceived, RunflowCallback, RunflowEvent, RunflowStatus};
use crate::api::history::{HistoryPointView, HistoryView};
use crate::api::video::VideoLinkView;
use crate::api::{callbacks, handlers, history, ops, video};
use crate::ops::{
    BatchListPage, EndpointEnabled, EndpointHealth, EndpointList, JobListItem, JobListPage,
    ProviderLimitView, QueueDepth, SpendView, StatsView,
};
use crate::view::{
    BatchAccepted, BatchCancelResult, BatchView, CancelResult, ErrorBody, ErrorDetail, ErrorInfo,
    ErrorView, EventView, Health, JobAccepted, JobPage, JobView, NotDead, ProviderView,
    RedriveRequest, RedriveResult, TimelineView, VideoView,
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
        handlers::dead_letters,
        handlers::redrive,
        handlers::events,
        ops::stats,
        history::stats_history,
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
        VideoLinkView,
        HistoryView,
        HistoryPointView,
        ProviderView,
        VideoView,
        ErrorView,
        BatchView,
        JobAccepted,
        BatchAccepted,
        CancelResult,
        BatchCancelResult,
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

/// The document as JSON, built once.
pub(crate) fn document() -> &'static str {
    static DOCUMENT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DOCUMENT.get_or_init(|| {
        let mut document =
            serde_json::to_value(ApiDoc::openapi()).expect("the OpenAPI document serializes");
        fix_link_keys(&mut document);
        serde_json::to_string_pretty(&document).expect("the OpenAPI document serializes")
    })
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

fn types(types: &[Type]) -> SchemaType {
    types.iter().cloned().collect()
}

fn nullable(kind: Type) -> ObjectBuilder {
    ObjectBuilder::new().schema_type(types(&[kind, Type::Null]))
}

fn reference(name: &str) -> RefOr<Schema> {
    RefOr::Ref(Ref::from_schema_name(name))
}

fn null() -> ObjectBuilder {
    ObjectBuilder::new().schema_type(Type::Null)
}

/// An http(s) or data: URL, case-insensitively.
const IMAGE_URL_PATTERN: &str = "^([hH][tT][tT][pP][sS]?://|[dD][aA][tT][aA]:)";
const HTTP_URL_PATTERN: &str = "^[hH][tT][tT][pP][sS]?://";
/// Free text: no control character but newline and tab (the server refuses `U+0000`-`U+001F`
/// and `U+007F`-`U+009F` otherwise, rule `control_char`).
const TEXT_PATTERN: &str = "^[^\\u0000-\\u0008\\u000B-\\u001F\\u007F-\\u009F]*$";
/// An identifier or key: no control character at all.
const KEY_PATTERN: &str = "^[^\\u0000-\\u001F\\u007F-\\u009F]*$";

fn url(description: &str) -> ObjectBuilder {
    nullable(Type::String)
        .pattern(Some(IMAGE_URL_PATTERN))
        .description(Some(format!(
            "{description} An http(s) URL (at most {MAX_MEDIA_URL_BYTES} bytes) or a data: URI \
             (at most {MAX_DATA_URL_BYTES} bytes)."
        )))
}

fn prompt(description: &str) -> ObjectBuilder {
    nullable(Type::String)
        .max_length(Some(MAX_PROMPT_CHARS))
        .pattern(Some(TEXT_PATTERN))
        .description(Some(description))
}

fn webhook_url(description: &str) -> ObjectBuilder {
    nullable(Type::String)
        .pattern(Some(HTTP_URL_PATTERN))
        .max_length(Some(MAX_WEBHOOK_URL_BYTES))
        .description(Some(format!(
            "{description} An http(s) URL the HTTP client can send to, at most \
             {MAX_WEBHOOK_URL_BYTES} bytes."
        )))
}

fn duration() -> RefOr<Schema> {
    AnyOfBuilder::new()
        .item(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .description(Some("Seconds as a string, \"3\" to \"15\".")),
        )
        .item(
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .minimum(Some(3))
                .maximum(Some(15)),
        )
        .item(null())
        .description(Some(
            "Length of the video in seconds, 3 to 15 (default 5); the provider bills per second.",
        ))
        .into()
}

/// An array, or the same array written as JSON inside a string, or null.
fn list(
    items: RefOr<Schema>,
    min: Option<usize>,
    max: Option<usize>,
    description: &str,
) -> RefOr<Schema> {
    AnyOfBuilder::new()
        .item(
            ArrayBuilder::new()
                .items(items)
                .min_items(min)
                .max_items(max),
        )
        .item(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .description(Some("The array written as JSON.")),
        )
        .item(null())
        .description(Some(description))
        .into()
}

fn request_properties(builder: ObjectBuilder) -> ObjectBuilder {
    builder
        .property(
            "start_image_url",
            ObjectBuilder::new()
                .schema_type(Type::String)
                .min_length(Some(1))
                .pattern(Some(IMAGE_URL_PATTERN))
                .description(Some(format!(
                    "The first frame: an http(s) URL (at most {MAX_MEDIA_URL_BYTES} bytes) or a \
                     data: URI (at most {MAX_DATA_URL_BYTES} bytes)."
                ))),
        )
        .property(
            "prompt",
            prompt("Text prompt; exactly one of `prompt` and `multi_prompt` is given."),
        )
        .property(
            "multi_prompt",
            list(
                reference("PromptShot"),
                Some(1),
                Some(MAX_SHOTS),
                "Shots of a multi-shot video (durations add up to at most 15 s); needs \
                 `shot_type: customize`.",
            ),
        )
        .property(
            "voice_ids",
            list(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .pattern(Some(KEY_PATTERN))
                    .into(),
                None,
                Some(MAX_VOICE_IDS),
                "Voices referenced in the prompt as `<<<voice_1>>>`.",
            ),
        )
        .property(
            "elements",
            list(
                reference("Element"),
                None,
                None,
                "Characters or objects referenced as `@Element1`...; at most one is a video.",
            ),
        )
        .property(
            "generate_audio",
            nullable(Type::Boolean).description(Some("Native audio (default true).")),
        )
        .property("duration", duration())
        .property(
            "shot_type",
            ObjectBuilder::new()
                .schema_type(types(&[Type::String, Type::Null]))
                .enum_values(Some([
                    serde_json::Value::from(SHOT_TYPE_CUSTOMIZE),
                    serde_json::Value::Null,
                ]))
                .description(Some("Multi-shot mode; required with `multi_prompt`.")),
        )
        .property("end_image_url", url("The last frame, optional."))
        .property(
            "negative_prompt",
            prompt("What the model should avoid (default \"blur, distort, and low quality\")."),
        )
        .property(
            "cfg_scale",
            nullable(Type::Number)
                .minimum(Some(0))
                .maximum(Some(1))
                .description(Some(
                    "How closely the model follows the prompt (default 0.5).",
                )),
        )
}

fn job_properties(builder: ObjectBuilder) -> ObjectBuilder {
    builder
        .property(
            "metadata",
            nullable(Type::Object).description(Some(format!(
                "Any JSON object of yours (at most {MAX_METADATA_BYTES} bytes as JSON), echoed \
                 in the job and its completion event."
            ))),
        )
        .property(
            "webhook_url",
            webhook_url("Where the job's completion event is delivered."),
        )
        .property(
            "idempotency_key",
            nullable(Type::String)
                .min_length(Some(1))
                .max_length(Some(255))
                .pattern(Some(KEY_PATTERN))
                .description(Some(
                    "The same key within 24 h returns the first job instead of a new one.",
                )),
        )
        .property(
            "priority",
            ObjectBuilder::new()
                .schema_type(types(&[Type::String, Type::Null]))
                .enum_values(Some(
                    ["high", "normal", "low"]
                        .into_iter()
                        .map(serde_json::Value::from)
                        .chain([serde_json::Value::Null]),
                ))
                .description(Some(
                    "Workers take high before normal before low (default normal).",
                )),
        )
        .property(
            "not_before",
            nullable(Type::String)
                .format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime)))
                .description(Some(
                    "The job is not submitted before this time (RFC 3339).",
                )),
        )
}

fn example_request() -> serde_json::Value {
    serde_json::json!({
        "start_image_url": "https://example.com/cat.png",
        "prompt": "a cat walks across a sunlit room",
        "duration": "5",
        "generate_audio": true
    })
}

fn example_flat_job(n: u32) -> serde_json::Value {
    serde_json::json!({
        "start_image_url": format!("https://example.com/{n}.png"),
        "prompt": "a slow dolly shot through a rainy street at night",
        "duration": "5",
        "metadata": {"customer": "acme", "row": n},
        "priority": "normal"
    })
}

fn closed(builder: ObjectBuilder) -> ObjectBuilder {
    builder.additional_properties(Some(AdditionalProperties::<Schema>::FreeForm(false)))
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

schema!(
    /// The generation request (Kling v3 Pro image-to-video).
    GenerationRequestSchema,
    "GenerationRequest",
    closed(request_properties(ObjectBuilder::new().schema_type(Type::Object)))
        .required("start_image_url")
        .examples([example_request()])
        .description(Some(
            "One image-to-video generation, as the provider's schema gives it. Exactly one of \
             `prompt` and `multi_prompt`. `null` counts as absent.",
        ))
        .into()
);

schema!(
    /// One shot of a multi-shot video.
    PromptShotSchema,
    "PromptShot",
    closed(
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .property(
                "prompt",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .max_length(Some(MAX_PROMPT_CHARS))
                    .pattern(Some(TEXT_PATTERN)),
            )
            .property("duration", duration())
            .required("prompt")
    )
    .into()
);

schema!(
    /// An element: a video, or a frontal image with reference images.
    ElementSchema,
    "Element",
    closed(
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .property("frontal_image_url", url("The element's frontal image."))
            .property(
                "reference_image_urls",
                list(
                    ObjectBuilder::new().schema_type(Type::String).into(),
                    None,
                    Some(MAX_REFERENCE_IMAGES),
                    "1 to 3 reference images, with `frontal_image_url`.",
                ),
            )
            .property("video_url", url("A video element, alone."))
    )
    .into()
);

schema!(
    /// A job in the nested shape.
    NestedJob,
    "Job",
    closed(job_properties(
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .property("request", reference("GenerationRequest"))
    ))
    .required("request")
    .examples([serde_json::json!({
        "request": example_request(),
        "metadata": {"customer": "acme", "row": 1},
        "priority": "high"
    })])
    .description(Some(
        "A job: the generation request under `request`, and the job's optional fields.",
    ))
    .into()
);

schema!(
    /// A job in the flat shape.
    FlatJob,
    "FlatJob",
    closed(job_properties(request_properties(
        ObjectBuilder::new().schema_type(Type::Object)
    )))
    .required("start_image_url")
    .examples([example_flat_job(1)])
    .description(Some(
        "A job with the request's fields and the job's optional fields side by side; a bare \
         GenerationRequest is a FlatJob.",
    ))
    .into()
);

schema!(
    /// A job in either shape.
    JobInput,
    "JobInput",
    OneOfBuilder::new()
        .item(reference("Job"))
        .item(reference("FlatJob"))
        .description(Some(
            "A job, nested (`{\"request\": {...}, \"metadata\": ...}`) or flat (the request's \
             fields next to the job's). Errors name paths in the shape given.",
        ))
        .into()
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

schema!(
    /// A batch with options, in the object form.
    BatchObject,
    "BatchObject",
    closed(
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .property(
                "jobs",
                ArrayBuilder::new()
                    .items(reference("JobInput"))
                    .min_items(Some(1)),
            )
            .property(
                "webhook_url",
                webhook_url("The batch's webhook URL, kept in its info."),
            )
            .property(
                "budget_usd",
                nullable(Type::Number)
                    .exclusive_minimum(Some(0))
                    .description(Some("The batch's spending cap in USD.")),
            )
            .property(
                "partial",
                nullable(Type::Boolean).description(Some(
                    "Enqueue the valid jobs and report the invalid ones, instead of rejecting \
                     the batch (default false).",
                )),
            )
            .required("jobs")
    )
    .into()
);

schema!(
    /// A batch: an array of jobs, or an object with the jobs and options.
    BatchInput,
    "BatchInput",
    OneOfBuilder::new()
        .item(
            ArrayBuilder::new()
                .items(reference("JobInput"))
                .min_items(Some(1)),
        )
        .item(reference("BatchObject"))
        .examples([
            serde_json::json!([example_flat_job(1), example_flat_job(2)]),
            serde_json::json!({"jobs": [example_flat_job(3)], "budget_usd": 10.0, "partial": true}),
        ])
        .into()
);
