//! `klingq webhook verify` for receivers, and `klingq webhooks list|show|replay|disabled|enable`
//! for operators: thin wrappers over klingq-events, where the logic and its tests live.

use std::io::Read;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use klingq_events::{DeliveryQuery, DeliveryStatus, DeliverySummary, SignedHeaders};
use klingq_queue::{Queue, QueueConfig};

/// `klingq webhook …`: tools for webhook receivers.
#[derive(Debug, Subcommand)]
pub(crate) enum WebhookCommand {
    /// Verify a received webhook (Standard Webhooks signature and a 5-minute timestamp
    /// tolerance). Reads the raw body from stdin; prints "valid" and exits 0, or prints the
    /// reason and exits 1.
    Verify(VerifyArgs),
}

#[derive(Debug, Args)]
pub(crate) struct VerifyArgs {
    /// Signing secret (`whsec_…`). Repeat it, or separate several with spaces, to accept a
    /// signature made with any of them.
    #[arg(
        long = "secret",
        env = "KLINGQ_WEBHOOK_SECRET",
        hide_env_values = true,
        required = true,
        value_delimiter = ' '
    )]
    secrets: Vec<String>,
    /// The `webhook-id` header.
    #[arg(long)]
    id: String,
    /// The `webhook-timestamp` header (Unix seconds).
    #[arg(long)]
    timestamp: String,
    /// The `webhook-signature` header (`v1,<base64>`, space-separated when several).
    #[arg(long)]
    signature: String,
    /// Judge the timestamp against this time (Unix seconds) instead of now.
    #[arg(long)]
    now: Option<i64>,
}

/// `klingq webhooks …`: delivery records of the namespace.
#[derive(Debug, Subcommand)]
pub(crate) enum WebhooksCommand {
    /// List deliveries, newest first.
    List {
        /// Only deliveries in this status: pending, delivering, retrying, succeeded, failed,
        /// exhausted.
        #[arg(long, value_parser = parse_status)]
        status: Option<DeliveryStatus>,
        #[arg(long, default_value_t = 50)]
        limit: u64,
        /// Continue from a previous page's next offset.
        #[arg(long, default_value_t = 0)]
        offset: u64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one delivery and every recorded attempt (JSON).
    Show { id: String },
    /// Send finished deliveries again, with the same webhook-id and body: an exhausted one is
    /// re-driven, a succeeded or failed one is copied into a new delivery.
    Replay {
        /// Delivery ids.
        #[arg(required_unless_present = "all_exhausted")]
        ids: Vec<String>,
        /// Replay every exhausted delivery.
        #[arg(long, conflicts_with = "ids")]
        all_exhausted: bool,
    },
    /// List endpoints disabled because they answered 410 Gone.
    Disabled {
        #[arg(long)]
        json: bool,
    },
    /// Re-enable an endpoint disabled by 410 Gone (its `ep_…` id, from `disabled`).
    Enable { endpoint_id: String },
}

fn parse_status(text: &str) -> Result<DeliveryStatus, String> {
    serde_json::from_value(serde_json::Value::String(text.to_owned())).map_err(|_| {
        format!(
            "unknown status {text:?}: use pending, delivering, retrying, succeeded, failed or exhausted"
        )
    })
}

/// Runs `klingq webhook …`.
pub(crate) async fn run_webhook(command: WebhookCommand) -> anyhow::Result<ExitCode> {
    match command {
        WebhookCommand::Verify(args) => {
            let body = tokio::task::spawn_blocking(|| {
                let mut body = Vec::new();
                std::io::stdin().read_to_end(&mut body).map(|_| body)
            })
            .await?
            .context("reading the body from stdin")?;
            let headers = SignedHeaders {
                id: &args.id,
                timestamp: &args.timestamp,
                signature: &args.signature,
            };
            let now = args.now.unwrap_or_else(klingq_events::unix_now);
            match klingq_events::verify_with_text_secrets(&args.secrets, &headers, &body, now) {
                Ok(()) => {
                    println!("valid");
                    Ok(ExitCode::SUCCESS)
                }
                Err(reason) => {
                    eprintln!("invalid: {reason}");
                    Ok(ExitCode::from(1))
                }
            }
        }
    }
}

/// Runs `klingq webhooks …` against the namespace of `queue_config`.
pub(crate) async fn run_webhooks(
    command: WebhooksCommand,
    queue_config: QueueConfig,
) -> anyhow::Result<()> {
    let queue = Queue::connect(queue_config)
        .await
        .context("connecting to redis")?;
    match command {
        WebhooksCommand::List {
            status,
            limit,
            offset,
            json,
        } => {
            let query = DeliveryQuery {
                status,
                subject: None,
                offset,
                limit,
            };
            let page = klingq_events::list_deliveries(&queue, &query).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&page)?);
            } else {
                for delivery in &page.deliveries {
                    println!("{}", line(delivery));
                }
                if let Some(next) = page.next_offset {
                    println!("more: --offset {next}");
                }
            }
        }
        WebhooksCommand::Show { id } => {
            let detail = klingq_events::get_delivery(&queue, &id)
                .await?
                .with_context(|| format!("delivery {id} not found"))?;
            println!("{}", serde_json::to_string_pretty(&detail)?);
        }
        WebhooksCommand::Replay { ids, all_exhausted } => {
            let ids = if all_exhausted {
                exhausted_ids(&queue).await?
            } else {
                ids
            };
            let mut n_failed = 0;
            for id in &ids {
                match klingq_events::replay_delivery(&queue, id).await {
                    Ok(outcome) => println!(
                        "{id}: replayed as {} ({:?})",
                        outcome.delivery_id, outcome.mode
                    ),
                    Err(error) => {
                        n_failed += 1;
                        eprintln!("{id}: {error}");
                    }
                }
            }
            if n_failed > 0 {
                anyhow::bail!("{n_failed} of {} replays failed", ids.len());
            }
        }
        WebhooksCommand::Disabled { json } => {
            let endpoints = klingq_events::disabled_endpoints(&queue).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&endpoints)?);
            } else {
                for endpoint in endpoints {
                    println!(
                        "{}  {}  since {}  {}",
                        endpoint.endpoint_id,
                        endpoint.endpoint,
                        endpoint.disabled_at,
                        endpoint.reason
                    );
                }
            }
        }
        WebhooksCommand::Enable { endpoint_id } => {
            if klingq_events::enable_endpoint(&queue, &endpoint_id).await? {
                println!("{endpoint_id}: enabled");
            } else {
                anyhow::bail!("endpoint {endpoint_id} is not disabled");
            }
        }
    }
    Ok(())
}

/// Every exhausted delivery's id (read before any is replayed, since replaying moves them).
async fn exhausted_ids(queue: &Queue) -> anyhow::Result<Vec<String>> {
    let mut ids = Vec::new();
    let mut query = DeliveryQuery {
        status: Some(DeliveryStatus::Exhausted),
        subject: None,
        offset: 0,
        limit: klingq_events::MAX_PAGE,
    };
    loop {
        let page = klingq_events::list_deliveries(queue, &query).await?;
        ids.extend(page.deliveries.into_iter().map(|d| d.id));
        match page.next_offset {
            Some(next) => query.offset = next,
            None => return Ok(ids),
        }
    }
}

fn line(delivery: &DeliverySummary) -> String {
    let status = serde_json::to_value(delivery.status)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    format!(
        "{}  {status:<10}  {}/{}  {:<15}  {}  {}  {}",
        delivery.id,
        delivery.attempts,
        delivery.max_attempts,
        delivery.event_type,
        delivery.endpoint,
        delivery
            .last_status_code
            .map_or_else(|| "-".to_owned(), |code| code.to_string()),
        delivery.last_error.as_deref().unwrap_or(""),
    )
}
