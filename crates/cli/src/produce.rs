//! The producer commands: `enqueue`, `batch submit|status|cancel`, `status`, `cancel`,
//! `dlq list|redrive` and `events tail`. Each is a thin layer over [`klingq_producer::Producer`];
//! with `--json` each prints the same JSON the HTTP API returns.
//!
//! Exit codes: 0 success, 2 invalid input (every error on stderr, and with `--json` the API's
//! error body on stdout), 1 anything else.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use klingq_core::{CostModel, ValidationErrors};
use klingq_producer::input::{json_lines, json_lines_text, parse_csv, parse_job};
use klingq_producer::view::{
    BatchView, ErrorBody, ErrorDetail, ErrorInfo, EventView, JobPage, JobView,
};
use klingq_producer::{
    BatchCheck, BatchErrors, BatchOptions, CappedErrors, MAX_ERROR_DETAILS, Producer,
    ProducerError, RedriveTarget, batch_error_details,
};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::cli::{InvalidInput, shutdown_signal};
use crate::settings::Settings;

/// At most this many errors are listed on stderr; `--json` lists up to
/// [`MAX_ERROR_DETAILS`].
const MAX_LISTED_ERRORS: usize = 200;

#[derive(Debug, Subcommand)]
pub(crate) enum ProduceCommand {
    /// Submit one job; prints its id.
    ///
    /// Either the request's flags (`--image` and `--prompt` at least), or `--json FILE` (`-`
    /// for stdin) with the job as JSON: a bare GenerationRequest, a flat job (the request's
    /// fields next to `metadata`, `webhook_url`, `idempotency_key`, `priority`, `not_before`)
    /// or a nested JobSpec (`{"request": {...}, "metadata": ...}`). `--json` also makes the
    /// output JSON.
    Enqueue(Box<EnqueueArgs>),
    /// Batches: submit a file, show one, cancel one.
    #[command(subcommand)]
    Batch(BatchCommand),
    /// Show a job.
    Status(IdArgs),
    /// Cancel a job. One already submitted to the provider stays billed.
    Cancel(IdArgs),
    /// Dead letters: jobs the queue gave up on.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Completion events.
    #[command(subcommand)]
    Events(EventsCommand),
    /// Tenants: each one's policy (weight, max concurrency, daily budget), provider runs in
    /// flight, jobs waiting for a slot, jobs per state and spend today.
    Tenants(TenantsArgs),
}

#[derive(Debug, Args)]
pub(crate) struct TenantsArgs {
    /// JSON output (`{"tenants": [...]}`, as `GET /v1/tenants`).
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct EnqueueArgs {
    /// The first frame: an http(s) URL or a data: URI.
    #[arg(long, value_name = "URL")]
    image: Option<String>,
    /// The text prompt.
    #[arg(long, value_name = "TEXT")]
    prompt: Option<String>,
    /// Seconds of video, 3 to 15 (default 5).
    #[arg(long, value_name = "N")]
    duration: Option<u32>,
    /// Generate no audio.
    #[arg(long)]
    no_audio: bool,
    /// The last frame.
    #[arg(long, value_name = "URL")]
    end_image: Option<String>,
    /// What the model should avoid.
    #[arg(long, value_name = "TEXT")]
    negative_prompt: Option<String>,
    /// How closely the model follows the prompt, 0 to 1 (default 0.5).
    #[arg(long, value_name = "X")]
    cfg_scale: Option<f64>,
    /// Where the completion event is delivered.
    #[arg(long, value_name = "URL")]
    webhook: Option<String>,
    /// A JSON object of yours, echoed in the job and its completion event.
    #[arg(long, value_name = "JSON")]
    metadata: Option<String>,
    /// The same key within 24 h returns the first job's id instead of a new job.
    #[arg(long, value_name = "KEY")]
    idempotency_key: Option<String>,
    /// high, normal or low (default normal).
    #[arg(long, value_name = "PRIORITY")]
    priority: Option<String>,
    /// Not submitted before this time (RFC 3339).
    #[arg(long, value_name = "TIME")]
    not_before: Option<String>,
    /// The customer the job is for (default: `default`): its share of the provider, limits
    /// and budget.
    #[arg(long, value_name = "NAME")]
    tenant: Option<String>,
    /// JSON output; with FILE (`-` for stdin), the job itself comes from FILE as JSON.
    #[arg(long, value_name = "FILE", num_args = 0..=1)]
    json: Option<Option<PathBuf>>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum BatchCommand {
    /// Submit a batch file; prints the batch id.
    ///
    /// JSON Lines (one job per line, in any shape `enqueue --json` takes) or CSV (a header row
    /// naming the columns: the request's fields, `metadata` as a JSON object, `webhook_url`,
    /// `idempotency_key`, `priority`, `not_before`; empty cells are absent). A file with any
    /// invalid line is rejected whole, every error named by line and field, unless
    /// `--partial`.
    Submit(SubmitArgs),
    /// Show a batch: jobs per state, cost, done.
    Status(IdArgs),
    /// Cancel every unfinished job of a batch.
    Cancel(IdArgs),
    /// Resume a batch its failure guard paused (`max_failed`, `max_failure_rate`): its held
    /// jobs are submitted again and the guard counts from now.
    Resume(IdArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Format {
    Jsonl,
    Csv,
}

#[derive(Debug, Args)]
pub(crate) struct SubmitArgs {
    /// The batch file (`-` for stdin).
    file: PathBuf,
    /// File format (default: from the extension, `.csv` or else JSON Lines; for stdin, from
    /// the first character).
    #[arg(long, value_enum)]
    format: Option<Format>,
    /// The batch's webhook URL.
    #[arg(long, value_name = "URL")]
    webhook: Option<String>,
    /// The batch's spending cap in USD.
    #[arg(long, value_name = "USD")]
    budget_usd: Option<f64>,
    /// Enqueue the valid lines and report the invalid ones, instead of rejecting the file.
    #[arg(long)]
    partial: bool,
    /// The same key within 24 h returns the first batch's id instead of a new batch.
    #[arg(long, value_name = "KEY")]
    idempotency_key: Option<String>,
    /// The tenant of the batch's jobs that name none (default: `default`).
    #[arg(long, value_name = "NAME")]
    tenant: Option<String>,
    /// Pause the batch once more than this share (0 to 1) of its finished jobs failed for good
    /// (moderation, invalid input), judged after --min-finished jobs.
    #[arg(long, value_name = "RATE")]
    max_failure_rate: Option<f64>,
    /// Finished jobs --max-failure-rate waits for (default 20).
    #[arg(long, value_name = "N")]
    min_finished: Option<u64>,
    /// Pause the batch once more than N of its jobs failed for good.
    #[arg(long, value_name = "N")]
    max_failed: Option<u64>,
    /// Show progress until every job is finished, then a summary.
    #[arg(long)]
    wait: bool,
    /// Seconds between progress checks with `--wait`.
    #[arg(long, value_name = "SECS", default_value_t = 1.0)]
    interval: f64,
    /// JSON output: the accepted batch as one line; with `--wait`, the finished batch as a
    /// second line.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct IdArgs {
    /// The id.
    id: String,
    /// JSON output.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
pub(crate) enum DlqCommand {
    /// List dead jobs, most recent first.
    List(DlqListArgs),
    /// Give dead jobs a new life: the ids given, or all of them.
    Redrive(RedriveArgs),
}

#[derive(Debug, Args)]
pub(crate) struct DlqListArgs {
    /// Jobs to show.
    #[arg(long, default_value_t = 50)]
    limit: u64,
    /// Jobs to skip.
    #[arg(long, default_value_t = 0)]
    offset: u64,
    /// JSON output.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("target").required(true).args(["ids", "all"]))]
pub(crate) struct RedriveArgs {
    /// Ids of dead jobs.
    ids: Vec<String>,
    /// Every dead job.
    #[arg(long)]
    all: bool,
    /// JSON output.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
pub(crate) enum EventsCommand {
    /// Print the latest completion events; with `--follow`, keep printing new ones.
    Tail(TailArgs),
}

#[derive(Debug, Args)]
pub(crate) struct TailArgs {
    /// Keep printing events as they come, until interrupted.
    #[arg(long, short)]
    follow: bool,
    /// How many of the latest events to print first.
    #[arg(long, short = 'n', default_value_t = 20)]
    count: usize,
    /// Start after this cursor instead (`0` for every retained event).
    #[arg(long, value_name = "CURSOR")]
    from: Option<String>,
    /// JSON output: one event per line.
    #[arg(long)]
    json: bool,
}

pub(crate) async fn run(
    command: ProduceCommand,
    settings: Settings,
) -> anyhow::Result<std::process::ExitCode> {
    let cost = CostModel {
        usd_per_second: settings.worker.usd_per_second,
    };
    // Input is checked before connecting, so a bad file fails fast with exit code 2.
    match command {
        ProduceCommand::Enqueue(args) => enqueue(*args, &settings, cost).await?,
        ProduceCommand::Batch(BatchCommand::Submit(args)) => submit(args, &settings, cost).await?,
        ProduceCommand::Batch(BatchCommand::Status(args)) => {
            let producer = connect(&settings, cost).await?;
            let batch = producer.batch(&args.id).await?;
            if args.json {
                print_json(&batch)?;
            } else {
                print!("{}", batch_table(&batch));
            }
        }
        ProduceCommand::Batch(BatchCommand::Cancel(args)) => {
            let producer = connect(&settings, cost).await?;
            let result = producer.cancel_batch(&args.id).await?;
            if args.json {
                print_json(&result)?;
            } else {
                println!(
                    "batch {}: cancelled {} jobs ({} already finished)",
                    result.id, result.cancelled, result.already_terminal
                );
                if result.cost_committed > 0 {
                    println!(
                        "{} of them had a provider run already: their cost is committed",
                        result.cost_committed
                    );
                }
            }
        }
        ProduceCommand::Tenants(args) => {
            let producer = connect(&settings, cost).await?;
            let tenants = producer.tenants().await?;
            if args.json {
                print_json(&klingq_producer::view::TenantList { tenants })?;
            } else {
                print!("{}", tenants_table(&tenants));
            }
        }
        ProduceCommand::Batch(BatchCommand::Resume(args)) => {
            let producer = connect(&settings, cost).await?;
            let result = producer.resume_batch(&args.id).await?;
            if args.json {
                print_json(&result)?;
            } else if result.was_paused {
                println!(
                    "batch {}: resumed, {} held jobs submitted again",
                    result.id, result.resumed
                );
            } else {
                println!("batch {}: not paused; nothing to resume", result.id);
            }
        }
        ProduceCommand::Status(args) => {
            let producer = connect(&settings, cost).await?;
            let job = producer.job(&args.id).await?;
            if args.json {
                print_json(&job)?;
            } else {
                print!("{}", job_text(&job));
            }
        }
        ProduceCommand::Cancel(args) => {
            let producer = connect(&settings, cost).await?;
            let result = producer.cancel_job(&args.id).await?;
            if args.json {
                print_json(&result)?;
            } else if !result.cancelled {
                println!(
                    "job {} already {}: nothing to cancel",
                    result.id, result.state
                );
            } else if result.cost_committed {
                println!(
                    "job {} cancelled (was {}); its provider run already exists, so its cost \
                     is committed: klingq stops tracking it",
                    result.id, result.previous_state
                );
            } else {
                println!(
                    "job {} cancelled (was {}); nothing was spent",
                    result.id, result.previous_state
                );
            }
        }
        ProduceCommand::Dlq(DlqCommand::List(args)) => {
            let producer = connect(&settings, cost).await?;
            let page = producer.dead_letters(args.offset, args.limit).await?;
            if args.json {
                print_json(&page)?;
            } else {
                print!("{}", dead_letters_table(&page));
            }
        }
        ProduceCommand::Dlq(DlqCommand::Redrive(args)) => {
            let producer = connect(&settings, cost).await?;
            let target = if args.all {
                RedriveTarget::All
            } else {
                RedriveTarget::Ids(args.ids)
            };
            let result = producer.redrive(target).await?;
            if args.json {
                print_json(&result)?;
            } else {
                println!("re-drove {} dead jobs", result.redriven);
                for not_dead in &result.not_dead {
                    println!("  {}: not dead ({})", not_dead.id, not_dead.state);
                }
                for id in &result.not_found {
                    println!("  {id}: no such job");
                }
            }
        }
        ProduceCommand::Events(EventsCommand::Tail(args)) => tail(args, &settings, cost).await?,
    }
    Ok(std::process::ExitCode::SUCCESS)
}

async fn connect(settings: &Settings, cost: CostModel) -> anyhow::Result<Producer> {
    Ok(Producer::connect(settings.queue.clone(), cost)
        .await?
        .with_max_batch_jobs(settings.api.max_batch_jobs)
        .with_tenants(settings.tenants.clone())
        .with_provider_slots(settings.worker.provider_concurrency))
}

fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    serde_json::to_writer(&mut stdout, value)?;
    writeln!(stdout)?;
    Ok(())
}

/// Invalid input: with `--json`, the API's error body on stdout; the error (exit code 2) on
/// stderr either way.
fn invalid(json: bool, message: String, details: Vec<ErrorDetail>) -> anyhow::Error {
    invalid_capped(json, message, details.into_iter().collect())
}

/// [`invalid`] with a capped list: `--json` lists the first [`MAX_ERROR_DETAILS`] errors, with
/// `truncated` and `total_details`.
fn invalid_capped(json: bool, message: String, details: CappedErrors) -> anyhow::Error {
    if json {
        let total = details.total();
        let body = ErrorBody {
            error: ErrorInfo::new(
                "validation_failed",
                message.lines().next().unwrap_or_default(),
                details.into_details(),
                total,
            ),
        };
        if let Err(error) = print_json(&body) {
            return error;
        }
    }
    InvalidInput(message).into()
}

/// How many errors a list stands for.
#[derive(Debug, Clone, Copy)]
enum Total {
    /// Exactly this many.
    Exactly(usize),
    /// More than the list holds, uncounted.
    More,
}

/// Lists field errors, one a line, at most [`MAX_LISTED_ERRORS`], then says how many more
/// there are.
fn list_errors(out: &mut String, lines: impl Iterator<Item = String>, total: Total) {
    let mut n_listed = 0;
    let mut n_seen = 0;
    for line in lines {
        n_seen += 1;
        if n_listed < MAX_LISTED_ERRORS {
            out.push_str("\n  ");
            out.push_str(&line);
            n_listed += 1;
        }
    }
    let json_lists = if n_seen > n_listed {
        format!("--json lists the first {}", n_seen.min(MAX_ERROR_DETAILS))
    } else {
        format!("the first {MAX_ERROR_DETAILS} are listed with --json")
    };
    match total {
        Total::Exactly(total) if total > n_listed => out.push_str(&format!(
            "\n  ... and {} more errors, {total} in all ({json_lists})",
            total - n_listed
        )),
        Total::Exactly(_) => {}
        Total::More => out.push_str(&format!("\n  ... and more errors ({json_lists})")),
    }
}

/// The flag that sets a request field, for messages.
fn flag_of(path: &str) -> Option<&'static str> {
    Some(match path {
        "start_image_url" => "--image",
        "prompt" => "--prompt",
        "duration" => "--duration",
        "end_image_url" => "--end-image",
        "negative_prompt" => "--negative-prompt",
        "cfg_scale" => "--cfg-scale",
        "webhook_url" => "--webhook",
        "metadata" => "--metadata",
        "idempotency_key" => "--idempotency-key",
        "priority" => "--priority",
        "not_before" => "--not-before",
        "tenant" => "--tenant",
        _ => return None,
    })
}

async fn enqueue(args: EnqueueArgs, settings: &Settings, cost: CostModel) -> anyhow::Result<()> {
    let json = args.json.is_some();
    let (value, from_flags) = match &args.json {
        Some(Some(path)) => {
            if args.image.is_some()
                || args.prompt.is_some()
                || args.duration.is_some()
                || args.no_audio
                || args.end_image.is_some()
                || args.negative_prompt.is_some()
                || args.cfg_scale.is_some()
                || args.webhook.is_some()
                || args.metadata.is_some()
                || args.idempotency_key.is_some()
                || args.priority.is_some()
                || args.not_before.is_some()
                || args.tenant.is_some()
            {
                return Err(invalid(
                    json,
                    "give the job either as --json FILE or with flags, not both".to_owned(),
                    Vec::new(),
                ));
            }
            let text = read_input(path, json)?;
            let value: Value = serde_json::from_str(&text).map_err(|error| {
                invalid(
                    json,
                    format!("{} is not valid JSON: {error}", path.display()),
                    Vec::new(),
                )
            })?;
            (value, false)
        }
        _ => (job_from_flags(&args, json)?, true),
    };
    let spec = parse_job(&value).map_err(|errors| {
        let mut message = format!("invalid job: {}", count(errors.len(), "error"));
        list_errors(
            &mut message,
            errors.iter().map(|error| match flag_of(&error.path) {
                Some(flag) if from_flags => format!("{flag}: {} [{}]", error.message, error.rule),
                _ => error.to_string(),
            }),
            Total::Exactly(errors.len()),
        );
        invalid_capped(json, message, errors.into())
    })?;
    let producer = connect(settings, cost).await?;
    let accepted = match producer
        .enqueue_traced(spec, crate::logging::env_trace_parent())
        .await
    {
        Err(ProducerError::Invalid(errors)) => {
            return Err(invalid_capped(
                json,
                format!("invalid job: {errors}"),
                errors.into(),
            ));
        }
        other => other?,
    };
    if json {
        print_json(&accepted)?;
    } else {
        println!("{}", accepted.id);
        if !accepted.created {
            eprintln!("note: an earlier job has this idempotency key; this is its id");
        }
    }
    Ok(())
}

fn job_from_flags(args: &EnqueueArgs, json: bool) -> anyhow::Result<Value> {
    let mut object = Map::new();
    let mut put = |key: &str, value: Option<Value>| {
        if let Some(value) = value {
            object.insert(key.to_owned(), value);
        }
    };
    put(
        "start_image_url",
        Some(Value::from(args.image.clone().unwrap_or_default())),
    );
    put("prompt", args.prompt.clone().map(Value::from));
    put("duration", args.duration.map(Value::from));
    put(
        "generate_audio",
        args.no_audio.then_some(Value::Bool(false)),
    );
    put("end_image_url", args.end_image.clone().map(Value::from));
    put(
        "negative_prompt",
        args.negative_prompt.clone().map(Value::from),
    );
    put("cfg_scale", args.cfg_scale.map(Value::from));
    put("webhook_url", args.webhook.clone().map(Value::from));
    put(
        "idempotency_key",
        args.idempotency_key.clone().map(Value::from),
    );
    put("priority", args.priority.clone().map(Value::from));
    put("not_before", args.not_before.clone().map(Value::from));
    put("tenant", args.tenant.clone().map(Value::from));
    if let Some(text) = &args.metadata {
        let metadata: Value = serde_json::from_str(text).map_err(|error| {
            let mut errors = ValidationErrors::default();
            errors.push(
                "metadata",
                "type",
                format!("must be a JSON object written as JSON: {error}"),
            );
            invalid(
                json,
                format!("invalid job: 1 error\n  --metadata: must be a JSON object written as JSON: {error} [type]"),
                errors.into_iter().map(ErrorDetail::new).collect(),
            )
        })?;
        put("metadata", Some(metadata));
    }
    Ok(Value::Object(object))
}

/// The input's text. Bytes that are not UTF-8 are invalid input (exit code 2), named by line
/// and byte offset.
fn read_input(path: &Path, json: bool) -> anyhow::Result<String> {
    let bytes = if path == Path::new("-") {
        let mut bytes = Vec::new();
        std::io::stdin()
            .read_to_end(&mut bytes)
            .context("reading stdin")?;
        bytes
    } else {
        std::fs::read(path).map_err(|error| {
            if error.kind() == std::io::ErrorKind::NotFound {
                anyhow::Error::from(InvalidInput(format!("{}: no such file", path.display())))
            } else {
                anyhow::Error::new(error).context(format!("reading {}", path.display()))
            }
        })?
    };
    String::from_utf8(bytes).map_err(|error| {
        let not_utf8 =
            klingq_producer::input::NotUtf8::locate(error.as_bytes(), &error.utf8_error());
        let mut detail = ErrorDetail::new(not_utf8.field_error());
        detail.line = Some(not_utf8.line);
        invalid(
            json,
            format!(
                "{}: line {}: not valid UTF-8 at byte offset {}: is it a text file?",
                path.display(),
                not_utf8.line,
                not_utf8.byte_offset
            ),
            vec![detail],
        )
    })
}

fn count(n: usize, noun: &str) -> String {
    format!("{n} {noun}{}", if n == 1 { "" } else { "s" })
}

async fn submit(args: SubmitArgs, settings: &Settings, cost: CostModel) -> anyhow::Result<()> {
    let text = read_input(&args.file, args.json)?;
    let format = args.format.unwrap_or_else(|| {
        let is_csv = if args.file == Path::new("-") {
            !text.trim_start().starts_with('{')
        } else {
            args.file
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("csv"))
        };
        if is_csv { Format::Csv } else { Format::Jsonl }
    });
    let file = args.file.display().to_string();
    let options = BatchOptions {
        webhook_url: args.webhook.clone(),
        budget_usd: args.budget_usd,
        partial: args.partial,
        idempotency_key: args.idempotency_key.clone(),
        source: Some("cli".to_owned()),
        trace: crate::logging::env_trace_parent(),
        tenant: args.tenant.clone(),
        max_failure_rate: args.max_failure_rate,
        min_finished: args.min_finished,
        max_failed: args.max_failed,
    };

    // Everything is checked before connecting, so a bad file is exit code 2 even with Redis
    // down. A file over the batch limit is refused before any line is parsed; lines are
    // parsed one at a time and only the first errors are kept.
    let max_batch_jobs = settings.api.max_batch_jobs;
    let mut check = BatchCheck::new(max_batch_jobs).with_tenant(options.tenant.as_deref());
    let mut jobs = Vec::new();
    let mut keep = |check: &BatchCheck, checked: Option<(usize, klingq_core::JobSpec)>| {
        if check.has_invalid() && !args.partial {
            jobs = Vec::new();
        } else {
            jobs.extend(checked);
        }
    };
    match format {
        Format::Jsonl => {
            let n_entries = json_lines_text(&text).count();
            if n_entries > max_batch_jobs {
                check.skip(n_entries);
            } else {
                for entry in json_lines(&text, settings.api.max_job_body_bytes) {
                    let checked = check.check_parsed(entry.entry, Some(entry.line));
                    keep(&check, checked);
                }
            }
        }
        Format::Csv => {
            let entries = parse_csv(text.as_bytes())
                .map_err(|error| invalid(args.json, format!("{file}: {error}"), Vec::new()))?;
            if entries.len() > max_batch_jobs {
                check.skip(entries.len());
            } else {
                for entry in entries {
                    let checked = check.check_parsed(entry.entry, Some(entry.line));
                    keep(&check, checked);
                }
            }
        }
    }
    drop(text);
    let reject = |errors: BatchErrors| {
        let details = batch_error_details(&errors);
        let mut message = if errors.invalid_entries == 0 {
            format!("{file}: invalid batch; nothing was enqueued")
        } else {
            let n_invalid = errors.invalid_entries;
            format!(
                "{file}: {n_invalid} of {} {} invalid; nothing was enqueued",
                count(errors.total, "line"),
                if n_invalid == 1 { "is" } else { "are" }
            )
        };
        list_errors(
            &mut message,
            details.details().iter().map(describe_detail),
            Total::Exactly(details.total()),
        );
        invalid_capped(args.json, message, details)
    };
    let rejected = check.finish(&options).map_err(reject)?;

    let producer = connect(settings, cost).await?;
    let accepted = match producer.enqueue_checked(jobs, rejected, options).await {
        Ok(accepted) => accepted,
        Err(ProducerError::InvalidBatch(errors)) => return Err(reject(errors)),
        Err(error) => return Err(error.into()),
    };
    if accepted.rejected_entries > 0 {
        let mut message = format!(
            "warning: {file}: skipped {} (enqueued {})",
            count(accepted.rejected_entries as usize, "invalid line"),
            accepted.total
        );
        let total = match accepted.rejected_truncated {
            true => Total::More,
            false => Total::Exactly(accepted.rejected.len()),
        };
        list_errors(
            &mut message,
            accepted.rejected.iter().map(describe_detail),
            total,
        );
        eprintln!("{message}");
    }
    if args.json {
        print_json(&accepted)?;
    } else {
        println!("{}", accepted.id);
        if !accepted.created {
            eprintln!("note: an earlier batch has this idempotency key; this is its id");
        }
    }
    std::io::stdout().flush()?;
    if args.wait {
        let batch =
            crate::progress::wait_for_batch(&producer, &accepted.id, args.interval, args.json)
                .await?;
        if args.json {
            print_json(&batch)?;
        } else {
            print!("{}", batch_table(&batch));
        }
    }
    Ok(())
}

fn describe_detail(detail: &ErrorDetail) -> String {
    let place = match (detail.line, detail.index) {
        (Some(line), _) => format!("line {line}: "),
        (None, Some(index)) => format!("entry {index}: "),
        (None, None) => String::new(),
    };
    let path = if detail.path.is_empty() {
        "(line)"
    } else {
        &detail.path
    };
    format!("{place}{path}: {} [{}]", detail.message, detail.rule)
}

fn batch_table(batch: &BatchView) -> String {
    let mut out = format!(
        "batch {}{}\n",
        batch.id,
        if batch.done { " (done)" } else { "" }
    );
    out.push_str(&format!("{:<12} {:>8}\n", "state", "jobs"));
    for (state, n) in &batch.counts {
        if *n > 0 {
            out.push_str(&format!("{state:<12} {n:>8}\n"));
        }
    }
    out.push_str(&format!("{:<12} {:>8}\n", "total", batch.total));
    out.push_str(&format!(
        "{:<12} {:>8}\n",
        "estimated",
        format!("${:.2}", batch.estimated_usd)
    ));
    out.push_str(&format!(
        "{:<12} {:>8}\n",
        "charged",
        format!("${:.2}", batch.charged_usd)
    ));
    if let Some(budget) = batch.budget_usd {
        out.push_str(&format!(
            "{:<12} {:>8}\n",
            "budget",
            format!("${budget:.2}")
        ));
    }
    out.push_str(&format!("created      {}\n", batch.created_at));
    if let Some(finished) = &batch.finished_at {
        out.push_str(&format!("finished     {finished}\n"));
    } else {
        out.push_str(&format!("{}\n", eta_text(&batch.eta)));
    }
    if batch.paused {
        out.push_str(&format!(
            "PAUSED       {} (klingq batch resume {} or klingq batch cancel {})\n",
            batch
                .pause_reason
                .as_deref()
                .unwrap_or("by its failure guard"),
            batch.id,
            batch.id
        ));
    }
    out
}

fn tenants_table(tenants: &[klingq_producer::view::TenantView]) -> String {
    let mut out = format!(
        "{:<20} {:>6} {:>5} {:>8} {:>7} {:>7} {:>9} {:>6} {:>11} {:>11}\n",
        "tenant",
        "weight",
        "max",
        "inflight",
        "waiting",
        "active",
        "succeeded",
        "failed",
        "est. today",
        "charged"
    );
    for t in tenants {
        let max = if t.policy.max_concurrency == 0 {
            "-".to_owned()
        } else {
            t.policy.max_concurrency.to_string()
        };
        out.push_str(&format!(
            "{:<20} {:>6} {:>5} {:>8} {:>7} {:>7} {:>9} {:>6} {:>11} {:>11}\n",
            t.tenant,
            t.policy.weight,
            max,
            t.in_flight,
            t.waiting_for_slot,
            t.counts.active,
            t.counts.succeeded,
            t.counts.failed,
            format!("${:.2}", t.spend_today.estimated_usd),
            format!("${:.2}", t.spend_today.charged_usd),
        ));
    }
    if tenants.is_empty() {
        out.push_str("(no tenant has had a job yet)\n");
    }
    out
}

/// A batch's estimate in one line, labelled as one.
pub(crate) fn eta_text(eta: &klingq_producer::view::EtaView) -> String {
    match (eta.remaining_secs, &eta.finish_at) {
        (Some(secs), Some(at)) => format!(
            "eta          ~{} (estimate{}: at {at}), ~${:.2} left",
            human_secs(secs),
            match eta.basis.as_str() {
                "fair_share" => ", from every tenant's jobs left and the fair share",
                _ => ", at the provider slots it holds now",
            },
            eta.remaining_usd
        ),
        _ if eta.basis == "paused" => format!(
            "eta          none while paused (resume it to go on), ~${:.2} left",
            eta.remaining_usd
        ),
        _ => format!(
            "eta          estimating (after its first run ends), ~${:.2} left",
            eta.remaining_usd
        ),
    }
}

fn human_secs(secs: f64) -> String {
    let secs = secs.round() as u64;
    match secs {
        0..=119 => format!("{secs}s"),
        120..=7199 => format!("{}m", secs / 60),
        _ => format!("{}h{:02}m", secs / 3600, secs % 3600 / 60),
    }
}

fn job_text(job: &JobView) -> String {
    let mut out = String::new();
    let mut line = |key: &str, value: &str| out.push_str(&format!("{key:<13} {value}\n"));
    line("id", &job.id);
    line("state", job.state.as_str());
    if let Some(reason) = &job.reason {
        line("reason", reason);
    }
    if let Some(batch) = &job.batch_id {
        line("batch", batch);
    }
    if let Some(trace) = &job.trace_id {
        line("trace", trace);
    }
    line(
        "attempts",
        &format!("{} of {}", job.attempts, job.max_attempts),
    );
    line("created", &job.created_at);
    line("updated", &job.updated_at);
    if let Some(finished) = &job.finished_at {
        line("finished", finished);
    }
    line(
        "cost",
        &format!(
            "${:.2} charged, ~${:.2} estimated",
            job.charged_usd, job.estimated_usd
        ),
    );
    if let Some(provider) = &job.provider {
        line(
            "provider run",
            provider.run_id.as_deref().unwrap_or("(being created)"),
        );
    }
    if let Some(video) = &job.video {
        line("video", &format!("s3://{}/{}", video.bucket, video.key));
        line("video url", &video.url);
        line(
            "size",
            &format!("{} bytes, sha256 {}", video.size, video.sha256),
        );
    }
    if let Some(error) = &job.error {
        line(
            "error",
            &format!("{} at {}: {}", error.code, error.step, error.message),
        );
    }
    if let Some(metadata) = &job.metadata {
        line("metadata", &metadata.to_string());
    }
    out
}

fn dead_letters_table(page: &JobPage) -> String {
    if page.items.is_empty() {
        return "no dead jobs\n".to_owned();
    }
    let mut out = format!(
        "{:<36}  {:>8}  {:<22}  {}\n",
        "id", "attempts", "error", "reason"
    );
    for job in &page.items {
        let code = job.error.as_ref().map(|e| e.code.as_str()).unwrap_or("-");
        out.push_str(&format!(
            "{:<36}  {:>8}  {:<22}  {}\n",
            job.id,
            job.attempts,
            code,
            job.reason.as_deref().unwrap_or("")
        ));
    }
    if let Some(next) = page.next_offset {
        out.push_str(&format!(
            "{} of {} shown; more with --offset {next}\n",
            page.items.len(),
            page.total
        ));
    }
    out
}

async fn tail(args: TailArgs, settings: &Settings, cost: CostModel) -> anyhow::Result<()> {
    if let Some(from) = &args.from
        && !klingq_producer::is_event_cursor(from)
    {
        return Err(invalid(
            args.json,
            format!("--from {from}: not an event cursor (such as 1700000000000-0, or 0)"),
            Vec::new(),
        ));
    }
    let producer = connect(settings, cost).await?;
    let (mut cursor, first) = match &args.from {
        Some(from) => (
            from.clone(),
            producer.events(from, args.count.max(1), None).await?,
        ),
        None => {
            let recent = producer.recent_events(args.count.max(1)).await?;
            let cursor = match recent.last() {
                Some(last) => last.cursor.clone(),
                None => producer.latest_event_cursor().await?,
            };
            (cursor, recent)
        }
    };
    for event in &first {
        print_event(event, args.json)?;
        cursor = event.cursor.clone();
    }
    if !args.follow {
        return Ok(());
    }
    let stop = shutdown_signal();
    tokio::pin!(stop);
    loop {
        let events = tokio::select! {
            events = producer.events(&cursor, 100, Some(Duration::from_secs(5))) => events?,
            () = &mut stop => return Ok(()),
        };
        for event in &events {
            print_event(event, args.json)?;
            cursor = event.cursor.clone();
        }
    }
}

fn print_event(event: &EventView, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(event);
    }
    let data = &event.event["data"];
    let text = |key: &str| data[key].as_str().unwrap_or("-").to_owned();
    let mut line = format!(
        "{}  {:<16}  job {}  {}",
        event.cursor,
        event.event_type,
        text("job_id"),
        text("state")
    );
    if let Some(batch) = data["batch_id"].as_str() {
        line.push_str(&format!("  batch {batch}"));
    }
    if let Some(code) = data["error"]["code"].as_str() {
        line.push_str(&format!("  {code}"));
    }
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}")?;
    stdout.flush()?;
    Ok(())
}
