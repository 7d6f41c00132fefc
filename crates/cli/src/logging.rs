//! Logs: human-readable by default, JSON lines with `--log-format json`; `RUST_LOG` filters.

use tracing_subscriber::EnvFilter;

/// klingq's own crates, logged at info (debug with `--verbose`); everything else at warn.
const CRATES: [&str; 9] = [
    "klingq",
    "klingq_core",
    "klingq_queue",
    "klingq_provider",
    "klingq_sim",
    "klingq_storage",
    "klingq_worker",
    "klingq_producer",
    "klingq_events",
];

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogFormat {
    #[default]
    Human,
    Json,
}

pub(crate) fn init(format: LogFormat, verbose: bool) {
    let level = if verbose { "debug" } else { "info" };
    let default = std::iter::once("warn".to_owned())
        .chain(CRATES.iter().map(|name| format!("{name}={level}")))
        .collect::<Vec<_>>()
        .join(",");
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
