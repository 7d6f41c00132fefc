//! Logs and traces: human-readable logs by default, JSON lines with `--log-format json`
//! (`RUST_LOG` filters them); spans exported over OTLP when an endpoint is configured and the
//! binary is built with `--features otlp`. See klingq-telemetry. Colour only on a terminal
//! and without `NO_COLOR`, for every command. `klingq demo` shows warnings only on the terminal
//! and writes its whole log to a file (see [`crate::demo::DemoArgs::log_file`]).

use std::io::IsTerminal;
use std::sync::Arc;

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
        ansi: colour(std::io::stderr().is_terminal()),
        quiet: matches!(cli.command, Command::Demo(_)),
        log_file: match &cli.command {
            Command::Demo(args) => open_log_file(&args.log_file()),
            _ => None,
        },
    }
}

/// Colour codes when the stream is a terminal and `NO_COLOR` is unset or empty
/// (<https://no-color.org>).
pub(crate) fn colour(terminal: bool) -> bool {
    terminal && std::env::var_os("NO_COLOR").is_none_or(|value| value.is_empty())
}

/// The file, created or emptied; a warning on stderr (logging is not set up yet) when it
/// cannot be, and then no file.
fn open_log_file(path: &std::path::Path) -> Option<Arc<std::fs::File>> {
    let opened = path
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| std::fs::File::create(path));
    match opened {
        Ok(file) => Some(Arc::new(file)),
        Err(error) => {
            eprintln!(
                "warning: cannot write the log to {}: {error}",
                path.display()
            );
            None
        }
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
