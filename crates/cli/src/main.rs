//! The `klingq` binary: parse the command line, set up logging, run the command.

mod bench;
mod cli;
mod demo;
mod embedded_s3;
mod local_redis;
mod logging;
mod produce;
mod progress;
mod serve;
mod settings;
mod video_links;
mod webhooks;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    // Secrets that reach the process other than through klingq's settings (the AWS SDK reads
    // its own): the error scrubber removes them from every text too.
    for name in [
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "RUNFLOW_API_KEY",
    ] {
        if let Ok(value) = std::env::var(name) {
            klingq_core::scrub::register_secret(&value);
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: starting the async runtime: {error}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async {
        // Inside the runtime: the span exporter sends through it.
        let settings = settings::load(args.config.as_deref());
        let (telemetry, problem) =
            klingq_telemetry::init(&logging::config(&args, settings.as_ref().ok()));
        if let Some(problem) = problem {
            tracing::warn!("{problem}; spans are not exported");
        }
        let result = cli::run(args, settings).await;
        telemetry.shutdown().await;
        match result {
            Ok(code) => code,
            Err(error) => {
                eprintln!("error: {error:#}");
                ExitCode::from(cli::exit_code_of(&error))
            }
        }
    })
}
