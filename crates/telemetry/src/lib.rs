//! Logs and traces for every klingq process.
//!
//! - Logs go to stderr, human-readable or as JSON lines; `RUST_LOG` filters them.
//! - Each job is one trace, from the span that enqueued it to the last webhook delivery of its
//!   events. The trace context rides in the job (a W3C `traceparent`, see
//!   [`klingq_core::TraceParent`]): the producer stores it, each worker attempt continues it
//!   ([`continue_trace`]), and each webhook delivery continues it and sends it on in a
//!   `traceparent` header. Every log line of a job's attempt carries its `trace_id`.
//! - With the `otlp` feature and an endpoint configured, spans are exported over OTLP/HTTP;
//!   every process exporting makes the job's trace one tree across processes. Without either,
//!   the trace ids still ride along (in logs, the job record and webhook headers).

#[cfg(feature = "otlp")]
mod otlp;

#[cfg(feature = "otlp")]
use std::sync::atomic::{AtomicBool, Ordering};

use klingq_core::TraceParent;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
#[cfg(feature = "otlp")]
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// klingq's own crates, logged at info (debug with `verbose`); everything else at warn.
const CRATES: [&str; 10] = [
    "klingq",
    "klingq_core",
    "klingq_queue",
    "klingq_provider",
    "klingq_sim",
    "klingq_storage",
    "klingq_worker",
    "klingq_producer",
    "klingq_events",
    "klingq_telemetry",
];

/// The environment variables the OpenTelemetry specification defines for an OTLP endpoint;
/// either one configures export when `telemetry.otlp_endpoint` is empty.
const OTEL_ENDPOINT_VARS: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
];

/// Whether spans are being exported (the OpenTelemetry layer is installed).
#[cfg(feature = "otlp")]
static EXPORTING: AtomicBool = AtomicBool::new(false);

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

/// How a process logs and traces.
#[derive(Debug, Clone, Default)]
pub struct TelemetryConfig {
    pub log_format: LogFormat,
    pub verbose: bool,
    /// The OTLP/HTTP base URL (`/v1/traces` is appended), e.g. `http://collector:4318`.
    /// Empty: the standard `OTEL_EXPORTER_OTLP_*ENDPOINT` variables, else no export.
    pub otlp_endpoint: String,
    /// The `service.name` of exported spans. Empty: `OTEL_SERVICE_NAME`, else
    /// `default_service_name`.
    pub service_name: String,
    /// The name of the process's role (`klingq-worker`, `klingq-api`, ...).
    pub default_service_name: String,
    /// Colour codes in the log lines on stderr: set it only when stderr is a terminal.
    pub ansi: bool,
    /// Without `RUST_LOG`, stderr shows warnings and errors only (`log_file` has the rest).
    pub quiet: bool,
    /// A file that also receives the logs, at the default levels whatever `RUST_LOG` says,
    /// without colour.
    pub log_file: Option<std::sync::Arc<std::fs::File>>,
}

impl TelemetryConfig {
    /// Whether an OTLP endpoint is configured, here or in the standard variables.
    pub fn export_requested(&self) -> bool {
        !self.otlp_endpoint.trim().is_empty()
            || OTEL_ENDPOINT_VARS
                .iter()
                .any(|var| std::env::var(var).is_ok_and(|v| !v.trim().is_empty()))
    }

    pub fn effective_service_name(&self) -> String {
        [
            self.service_name.clone(),
            std::env::var("OTEL_SERVICE_NAME").unwrap_or_default(),
            self.default_service_name.clone(),
        ]
        .into_iter()
        .map(|name| name.trim().to_owned())
        .find(|name| !name.is_empty())
        .unwrap_or_else(|| "klingq".to_owned())
    }
}

/// What [`init`] set up; [`Telemetry::shutdown`] exports the spans still buffered.
#[derive(Debug, Default)]
#[must_use = "dropping it without shutdown() loses the spans still buffered"]
pub struct Telemetry {
    #[cfg(feature = "otlp")]
    exporter: Option<otlp::Exporter>,
}

/// Why export could not start. Logging works regardless.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error(
        "an OTLP endpoint is configured, but this klingq was built without OTLP support \
         (build with `--features otlp`)"
    )]
    NotBuiltIn,
    #[error("starting the OTLP exporter: {0}")]
    Exporter(String),
}

/// Installs the process's logging and, when an endpoint is configured, OTLP export. Call once,
/// inside the Tokio runtime (the exporter sends through it). Logging is installed even when
/// export fails; the error says why it did.
pub fn init(config: &TelemetryConfig) -> (Telemetry, Option<TelemetryError>) {
    let level = if config.verbose {
        tracing::Level::DEBUG
    } else {
        tracing::Level::INFO
    };
    // The redis crate's cluster client logs a warning per failed reconnect, dozens a second
    // during a failover; klingq's own "redis call failed; retrying" lines say what matters.
    let default = ["warn", "redis=error"]
        .into_iter()
        .map(str::to_owned)
        .chain(CRATES.iter().map(|name| format!("{name}={level}")))
        .collect::<Vec<_>>()
        .join(",");
    // RUST_LOG filters the logs only: spans are exported whatever it says.
    let terminal_default = if config.quiet {
        "warn,redis=error"
    } else {
        &default
    };
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(terminal_default));
    let logs = match config.log_format {
        LogFormat::Human => tracing_subscriber::fmt::layer()
            .with_ansi(config.ansi)
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let file_logs = config.log_file.clone().map(|file| {
        let layer = match config.log_format {
            LogFormat::Human => tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(file)
                .boxed(),
            LogFormat::Json => tracing_subscriber::fmt::layer()
                .json()
                .flatten_event(true)
                .with_writer(file)
                .boxed(),
        };
        layer.with_filter(EnvFilter::new(&default))
    });
    let registry = tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(file_logs);

    #[cfg(feature = "otlp")]
    {
        let (exporter, error) = if config.export_requested() {
            match otlp::Exporter::start(config) {
                Ok(exporter) => (Some(exporter), None),
                Err(error) => (None, Some(error)),
            }
        } else {
            (None, None)
        };
        let spans = Targets::new().with_targets(CRATES.iter().map(|name| (*name, level)));
        let layer = exporter
            .as_ref()
            .map(|exporter| exporter.layer().with_filter(spans));
        if registry.with(layer).try_init().is_ok() && exporter.is_some() {
            EXPORTING.store(true, Ordering::SeqCst);
        }
        (Telemetry { exporter }, error)
    }
    #[cfg(not(feature = "otlp"))]
    {
        let _ = registry.try_init();
        let error = config
            .export_requested()
            .then_some(TelemetryError::NotBuiltIn);
        (Telemetry::default(), error)
    }
}

impl Telemetry {
    /// Exports what is buffered and stops exporting. Call before the process exits.
    pub async fn shutdown(self) {
        #[cfg(feature = "otlp")]
        if let Some(exporter) = self.exporter {
            EXPORTING.store(false, Ordering::SeqCst);
            exporter.shutdown().await;
        }
    }
}

/// Makes `span` continue the trace of `parent` (a new trace when `None`) and returns the
/// `traceparent` that names `span`, to send on (a webhook header, a job's stored context).
///
/// Declare the span with `trace_id = tracing::field::Empty`: the trace id is recorded there,
/// so every log line inside the span carries it. Call before the span is entered.
///
/// Without export, no span id of ours exists anywhere, so the parent is passed on as it is
/// (a new root when there is none).
pub fn continue_trace(span: &tracing::Span, parent: Option<TraceParent>) -> TraceParent {
    #[cfg(feature = "otlp")]
    if EXPORTING.load(Ordering::Relaxed)
        && let Some(own) = otlp::continue_trace(span, parent)
    {
        span.record("trace_id", own.trace_id_hex());
        return own;
    }
    let own = parent.unwrap_or_else(TraceParent::new_root);
    span.record("trace_id", own.trace_id_hex());
    own
}

/// A new trace for one job of a batch: the job's own trace, whose root span (exported when
/// export is on) links to `batch`, the span of the request that enqueued the batch.
pub fn new_job_trace(batch: &tracing::Span, job_id: &dyn std::fmt::Display) -> TraceParent {
    #[cfg(feature = "otlp")]
    if EXPORTING.load(Ordering::Relaxed)
        && let Some(own) = otlp::linked_root(batch, job_id)
    {
        return own;
    }
    let _ = (batch, job_id);
    TraceParent::new_root()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_export_the_parent_is_passed_on() {
        let span = tracing::info_span!("test", trace_id = tracing::field::Empty);
        let parent = TraceParent::new_root();
        assert_eq!(continue_trace(&span, Some(parent)), parent);
        let root = continue_trace(&span, None);
        assert_ne!(root.trace_id(), parent.trace_id());
        assert_ne!(new_job_trace(&span, &"job").trace_id(), root.trace_id());
    }

    #[test]
    fn the_service_name_comes_from_the_setting_then_the_default() {
        let mut config = TelemetryConfig {
            default_service_name: "klingq-worker".to_owned(),
            ..TelemetryConfig::default()
        };
        if std::env::var("OTEL_SERVICE_NAME").is_err() {
            assert_eq!(config.effective_service_name(), "klingq-worker");
        }
        config.service_name = "videos-worker".to_owned();
        assert_eq!(config.effective_service_name(), "videos-worker");
        config.otlp_endpoint = "http://127.0.0.1:4318".to_owned();
        assert!(config.export_requested());
    }
}
