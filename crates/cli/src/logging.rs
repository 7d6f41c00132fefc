//! Logs and traces: human-readable logs by default, JSON lines with `--log-format json`
//! (`RUST_LOG` filters them); spans exported over OTLP when an endpoint is configured and the
//! binary is built with `--features otlp`. See klingq-telemetry.

use klingq_telemetry::TelemetryConfig;

use crate::cli::{Cli, Command};
use crate::settings::Settings;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogFormat {
    #[default]
    Human,
    Json,
}

/// The process's telemetry settings. A configuration that does not load only means no export
/// here; the command that needs it reports the error.
pub(crate) fn config(cli: &Cli, settings: Option<&Settings>) -> TelemetryConfig {
    let telemetry = settings
        .map(|settings| settings.telemetry.clone())
        .unwrap_or_default();
    TelemetryConfig {
        log_format: match cli.log_format {
            LogFormat::Human => klingq_telemetry::LogFormat::Human,
            LogFormat::Json => klingq_telemetry::LogFormat::Json,
        },
        verbose: cli.verbose,
        otlp_endpoint: telemetry.otlp_endpoint,
        service_name: telemetry.service_name,
        default_service_name: service_role(&cli.command).to_owned(),
    }
}

/// The `service.name` a command exports its spans under, unless configured.
fn service_role(command: &Command) -> &'static str {
    match command {
        Command::Worker => "klingq-worker",
        Command::Serve(_) => "klingq-api",
        Command::Demo(_) => "klingq-demo",
        Command::Sim(_) => "klingq-sim",
        Command::Bench(_) => "klingq-bench",
        _ => "klingq-cli",
    }
}

/// The caller's trace for the producer commands: the `TRACEPARENT` environment variable, as
/// OpenTelemetry specifies for processes started by a traced parent. Invalid values are
/// ignored (the job starts a trace of its own).
pub(crate) fn env_trace_parent() -> Option<klingq_core::TraceParent> {
    std::env::var("TRACEPARENT").ok()?.parse().ok()
}
