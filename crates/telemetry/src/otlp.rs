//! OTLP/HTTP export of spans (protobuf), through tracing-opentelemetry.
//!
//! The SDK's batch processor exports from its own thread with a blocking executor, so the
//! HTTP client here hands each request to the process's Tokio runtime and waits for the
//! answer: one reqwest client (the one every other klingq call uses), no second HTTP stack.

use std::time::Duration;

use bytes::Bytes;
use klingq_core::TraceParent;
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::{HttpClient, HttpError};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{
    BatchConfig, BatchConfigBuilder, BatchSpanProcessor, OTEL_BSP_MAX_EXPORT_BATCH_SIZE,
    OTEL_BSP_MAX_QUEUE_SIZE, SdkTracerProvider, Tracer,
};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::registry::LookupSpan;

use crate::{TelemetryConfig, TelemetryError};

/// The longest an export request may take; the collector being down only drops spans.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest the last export may hold up the process's exit.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// The running exporter: the tracer provider and the tracer the layer uses.
#[derive(Debug)]
pub(crate) struct Exporter {
    provider: SdkTracerProvider,
    tracer: Tracer,
}

impl Exporter {
    pub(crate) fn start(config: &TelemetryConfig) -> Result<Self, TelemetryError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            TelemetryError::Exporter("no Tokio runtime to send spans with".to_owned())
        })?;
        let client = reqwest::Client::builder()
            .timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|error| TelemetryError::Exporter(error.to_string()))?;
        let mut builder = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_timeout(EXPORT_TIMEOUT)
            .with_http_client(RuntimeClient { client, runtime });
        let endpoint = config.otlp_endpoint.trim();
        if !endpoint.is_empty() {
            builder = builder.with_endpoint(traces_url(endpoint));
        }
        let exporter = builder
            .build()
            .map_err(|error| TelemetryError::Exporter(error.to_string()))?;
        let resource = Resource::builder()
            .with_service_name(config.effective_service_name())
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(
                BatchSpanProcessor::builder(exporter)
                    .with_batch_config(batch_config())
                    .build(),
            )
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("klingq");
        Ok(Self { provider, tracer })
    }

    pub(crate) fn layer<S>(&self) -> tracing_opentelemetry::OpenTelemetryLayer<S, Tracer>
    where
        S: tracing::Subscriber + for<'span> LookupSpan<'span>,
    {
        tracing_opentelemetry::layer()
            .with_tracer(self.tracer.clone())
            .with_threads(false)
    }

    /// Exports what is buffered, then stops; gives up after [`SHUTDOWN_TIMEOUT`] so an
    /// unreachable collector cannot hold up a worker's exit past its orchestrator's grace.
    /// The processor's thread sends through the Tokio runtime, so this waits on a blocking
    /// thread, never on a runtime worker.
    pub(crate) async fn shutdown(self) {
        let provider = self.provider;
        let result =
            tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT))
                .await;
        if let Ok(Err(error)) = result {
            eprintln!("warning: exporting the last spans failed: {error}");
        }
    }
}

/// Spans buffered before the exporter drops new ones, unless `OTEL_BSP_MAX_QUEUE_SIZE` says.
/// A batch enqueue starts one trace per job at once: with the SDK's 2,048, a 100,000-job
/// batch lost 41 % of its jobs' root spans; with this, none (`docs/benchmarks.md`).
const MAX_QUEUE_SIZE: usize = 65_536;
/// Spans per export request, unless `OTEL_BSP_MAX_EXPORT_BATCH_SIZE` says (SDK: 512).
const MAX_EXPORT_BATCH_SIZE: usize = 2_048;

/// The SDK's batch settings (which read the `OTEL_BSP_*` variables), with larger buffers
/// where the variables are unset.
fn batch_config() -> BatchConfig {
    let unset = |var: &str| std::env::var(var).is_err();
    let mut config = BatchConfigBuilder::default();
    if unset(OTEL_BSP_MAX_QUEUE_SIZE) {
        config = config.with_max_queue_size(MAX_QUEUE_SIZE);
    }
    if unset(OTEL_BSP_MAX_EXPORT_BATCH_SIZE) {
        config = config.with_max_export_batch_size(MAX_EXPORT_BATCH_SIZE);
    }
    config.build()
}

/// `base` with the OTLP/HTTP traces path, unless it already ends with it (as the standard
/// variables do: the signal-specific one is used as is).
fn traces_url(base: &str) -> String {
    let base = base.trim_end_matches('/');
    if base.ends_with("/v1/traces") {
        base.to_owned()
    } else {
        format!("{base}/v1/traces")
    }
}

/// Sends the exporter's requests on the process's Tokio runtime.
#[derive(Debug)]
struct RuntimeClient {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

/// Longest collector answer read; collectors answer with a small status message.
const MAX_RESPONSE_BYTES: usize = 1 << 20;

#[async_trait::async_trait]
impl HttpClient for RuntimeClient {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, HttpError> {
        let client = self.client.clone();
        let request = reqwest::Request::try_from(request)?;
        let task = self.runtime.spawn(async move {
            let mut response = client.execute(request).await?;
            let status = response.status();
            let headers = std::mem::take(response.headers_mut());
            let mut body = Vec::new();
            while let Some(chunk) = response.chunk().await? {
                if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
                    break;
                }
                body.extend_from_slice(&chunk);
            }
            let mut answer = http::Response::new(Bytes::from(body));
            *answer.status_mut() = status;
            *answer.headers_mut() = headers;
            Ok::<_, reqwest::Error>(answer)
        });
        match task.await {
            Ok(answer) => Ok(answer?),
            Err(join) => Err(Box::new(join)),
        }
    }
}

fn span_context(parent: TraceParent) -> SpanContext {
    SpanContext::new(
        TraceId::from_bytes(parent.trace_id()),
        SpanId::from_bytes(parent.span_id()),
        if parent.is_sampled() {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        },
        true,
        TraceState::default(),
    )
}

/// The `traceparent` naming `span` (building its OpenTelemetry span if not yet built).
fn own_traceparent(span: &tracing::Span) -> Option<TraceParent> {
    let context = span.context();
    let own = context.span().span_context().clone();
    if !own.is_valid() {
        return None;
    }
    TraceParent::from_ids(
        own.trace_id().to_bytes(),
        own.span_id().to_bytes(),
        own.is_sampled(),
    )
}

pub(crate) fn continue_trace(
    span: &tracing::Span,
    parent: Option<TraceParent>,
) -> Option<TraceParent> {
    let context = match parent {
        Some(parent) => Context::new().with_remote_span_context(span_context(parent)),
        // A root: not a child of whatever span happens to be current.
        None => Context::new(),
    };
    span.set_parent(context).ok()?;
    own_traceparent(span)
}

pub(crate) fn linked_root(
    batch: &tracing::Span,
    job_id: &dyn std::fmt::Display,
) -> Option<TraceParent> {
    let link = batch.context().span().span_context().clone();
    let span = tracing::info_span!("enqueue", job_id = %job_id, otel.kind = "producer");
    span.set_parent(Context::new()).ok()?;
    if link.is_valid() {
        span.add_link(link);
    }
    // The span ends (and is exported) when dropped here: its work, the enqueue, is the
    // batch's, which the link points to.
    own_traceparent(&span)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_traces_path_is_appended_once() {
        assert_eq!(traces_url("http://c:4318"), "http://c:4318/v1/traces");
        assert_eq!(traces_url("http://c:4318/"), "http://c:4318/v1/traces");
        assert_eq!(
            traces_url("http://c:4318/v1/traces"),
            "http://c:4318/v1/traces"
        );
    }

    #[test]
    fn a_traceparent_becomes_a_remote_span_context() {
        let parent = TraceParent::new_root();
        let context = span_context(parent);
        assert!(context.is_remote());
        assert!(context.is_sampled());
        assert_eq!(context.trace_id().to_bytes(), parent.trace_id());
        assert_eq!(context.span_id().to_bytes(), parent.span_id());
    }
}
