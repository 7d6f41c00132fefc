//! The command line: global options and subcommands, and exit codes (0 success, 2 invalid
//! input, 1 anything else).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::logging::LogFormat;
use crate::{bench, demo, produce, serve, settings, webhooks};

#[derive(Debug, Parser)]
#[command(
    name = "klingq",
    version,
    about = "Batch video generation queue for Kling v3 Pro: pays once per video, never loses a job."
)]
pub(crate) struct Cli {
    /// Configuration file (TOML); overrides config/default.toml's defaults, and environment
    /// variables override it.
    #[arg(long, global = true, env = "KLINGQ_CONFIG")]
    pub(crate) config: Option<PathBuf>,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    pub(crate) log_format: LogFormat,
    /// More logging.
    #[arg(long, short, global = true)]
    pub(crate) verbose: bool,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Benchmarks that print what they measured and end with one JSON line.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Configuration: print the defaults or the effective settings.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Run a worker: pull jobs, generate, re-host in S3, publish. Scale out with replicas.
    Worker,
    /// Run the Runflow simulator (for tests and demos; no account needed).
    Sim(Box<klingq_sim::SimArgs>),
    #[command(flatten)]
    Produce(produce::ProduceCommand),
    /// Serve the HTTP API until SIGTERM or SIGINT.
    Serve(serve::ServeArgs),
    /// Verify a webhook delivery's signature (for webhook consumers).
    #[command(subcommand)]
    Webhook(webhooks::WebhookCommand),
    /// List and replay webhook deliveries; list and re-enable disabled endpoints.
    #[command(subcommand)]
    Webhooks(webhooks::WebhooksCommand),
    /// Run the whole system in this process on a sample batch: simulator, embedded S3, worker,
    /// API and dashboard, webhooks. Needs only Redis.
    Demo(demo::DemoArgs),
}

/// Resolves on SIGTERM or SIGINT.
pub(crate) async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    tracing::info!("shutdown signal received");
}

#[derive(Debug, Subcommand)]
pub(crate) enum ConfigCommand {
    /// Print config/default.toml as generated from the settings registry.
    Default,
    /// Print the effective settings (defaults, file, environment), secrets redacted.
    Show,
    /// Print the configuration reference (Markdown) the README carries.
    Reference,
}

/// An error caused by the user's input: exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct InvalidInput(pub(crate) String);

pub(crate) fn exit_code_of(error: &anyhow::Error) -> u8 {
    if error.chain().any(|cause| cause.is::<InvalidInput>()) {
        2
    } else {
        1
    }
}

/// Runs the command. `settings` is the configuration as loaded once at startup; commands
/// that need it report its error.
pub(crate) async fn run(
    cli: Cli,
    settings: anyhow::Result<settings::Settings>,
) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Bench(command) => {
            let settings = settings?;
            bench::run(command, settings).await?;
        }
        Command::Config(ConfigCommand::Default) => print!("{}", settings::render_default_toml()),
        Command::Config(ConfigCommand::Reference) => {
            println!("{}", settings::REFERENCE_START);
            print!("{}", settings::render_reference_markdown());
            println!("{}", settings::REFERENCE_END);
        }
        Command::Config(ConfigCommand::Show) => {
            print!("{}", settings::effective_toml(cli.config.as_deref())?);
            let settings = settings?;
            // What is at queue.redis_url, as a comment: the file stays valid TOML.
            let found = tokio::time::timeout(
                std::time::Duration::from_secs(10),
                klingq_queue::Queue::connect(settings.queue.clone()),
            )
            .await;
            match found {
                Ok(Ok(queue)) => println!("\n# redis: {}", queue.topology().await),
                Ok(Err(error)) => println!("\n# redis: not reachable: {error}"),
                Err(_) => println!("\n# redis: not reachable within 10 s"),
            }
        }
        Command::Worker => {
            let settings = settings?;
            let worker = klingq_worker::Worker::connect(
                settings.worker_settings(),
                std::time::Duration::from_secs(30),
            )
            .await?;
            // Webhook delivery runs beside the pipeline and stops after it has drained.
            let (stop_webhooks, webhooks_stopped) = tokio::sync::watch::channel(false);
            let webhooks = tokio::spawn(klingq_events::run_webhooks(
                worker.queue.clone(),
                settings.webhooks.clone(),
                async move {
                    let mut stopped = webhooks_stopped;
                    let _ = stopped.wait_for(|stop| *stop).await;
                },
            ));
            let result = worker.run(shutdown_signal()).await;
            let _ = stop_webhooks.send(true);
            webhooks.await??;
            result?;
        }
        Command::Webhook(command) => return webhooks::run_webhook(command).await,
        Command::Webhooks(command) => webhooks::run_webhooks(command, settings?.queue).await?,
        Command::Demo(args) => {
            return demo::run(args, settings?).await;
        }
        Command::Sim(args) => {
            klingq_sim::run(*args, async {
                shutdown_signal().await;
            })
            .await?;
        }
        Command::Produce(command) => {
            return produce::run(command, settings?).await;
        }
        Command::Serve(args) => serve::run(args, settings?).await?,
    }
    Ok(ExitCode::SUCCESS)
}
