//! `klingq demo`: the whole system in one process on a fresh machine with Redis installed.
//! The simulator stands in for Runflow and an embedded S3 store (a local folder) for S3, unless
//! `RUNFLOW_API_KEY` and S3 settings are present; then the real services are used. A worker,
//! the API with the dashboard, webhook delivery and a local webhook receiver all run here.
//! When nothing answers at a loopback Redis URL, a private `redis-server` is started (see
//! [`crate::local_redis`]). The terminal shows the progress bar and warnings; the whole log
//! (info) goes to `<data dir>/demo.log`.

use std::collections::BTreeMap;
use std::ops::Not;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use clap::Args;
use klingq_core::cost::micros_to_usd;
use klingq_core::{CostModel, GenerationRequest, JobSpec};
use klingq_events::{SignedHeaders, WebhookSecret};
use klingq_producer::{BatchOptions, Producer};
use klingq_queue::Queue;
use tokio::sync::watch;

use crate::settings::Settings;

#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// Jobs in the sample batch.
    #[arg(long, default_value_t = 10)]
    jobs: usize,
    /// Address of the API and dashboard (falls back to a free port when taken).
    #[arg(long, default_value = "127.0.0.1:8080")]
    bind: String,
    /// Keep everything running after the batch (for the dashboard) until Ctrl-C.
    #[arg(long)]
    keep_running: bool,
    /// Folder of the demo's files: the log (`demo.log`), the embedded S3 store (`s3/`) and a
    /// private Redis's data (`redis/`).
    #[arg(long, default_value = ".klingq")]
    data_dir: PathBuf,
}

impl DemoArgs {
    /// Where the demo's whole log goes (the terminal shows warnings only).
    pub(crate) fn log_file(&self) -> PathBuf {
        self.data_dir.join("demo.log")
    }
}

/// What the demo's webhook receiver saw: verified deliveries per event type, and failures.
#[derive(Default)]
struct Received {
    by_type: BTreeMap<String, u64>,
    ids: std::collections::HashSet<String>,
    bad_signatures: u64,
}

#[derive(Clone)]
struct ReceiverState {
    secret: WebhookSecret,
    received: Arc<Mutex<Received>>,
}

async fn receive(
    State(state): State<ReceiverState>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let verified = SignedHeaders::from_headers(&headers)
        .map_err(|error| error.to_string())
        .and_then(|signed| {
            klingq_events::verify(
                std::slice::from_ref(&state.secret),
                &signed,
                &body,
                klingq_events::unix_now(),
            )
            .map_err(|error| error.to_string())
        });
    let mut received = state.received.lock().expect("receiver poisoned");
    match verified {
        Ok(()) => {
            let event: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let event_type = event["type"].as_str().unwrap_or("unknown").to_owned();
            let id = headers
                .get("webhook-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            if received.ids.insert(id) {
                *received.by_type.entry(event_type).or_default() += 1;
            }
            StatusCode::NO_CONTENT
        }
        Err(_) => {
            received.bad_signatures += 1;
            StatusCode::UNAUTHORIZED
        }
    }
}

pub(crate) async fn run(args: DemoArgs, mut settings: Settings) -> anyhow::Result<ExitCode> {
    // Ctrl-C or SIGTERM at any point ends the demo through its stop path (a private Redis is
    // shut down when `run` returns).
    let (interrupt_tx, interrupted) = watch::channel(false);
    tokio::spawn(async move {
        crate::cli::shutdown_signal().await;
        let _ = interrupt_tx.send(true);
    });
    if settings.queue.namespace == "klingq" {
        settings.queue.namespace = "klingq-demo".to_owned();
    }
    let redis_url = klingq_core::redact_url(&settings.queue.redis_url);
    let mut local_redis = None;
    if let Some(url) = crate::local_redis::loopback(&settings.queue.redis_url)
        && !crate::local_redis::answers(&url).await
    {
        let dir = args.data_dir.join("redis");
        match crate::local_redis::LocalRedis::start(&url, &dir).await {
            Ok(local) => {
                println!(
                    "klingq demo: no Redis at {redis_url}: started a private redis-server on 127.0.0.1:{}, data under {} (it stops when the demo does)",
                    local.port(),
                    local.dir.display()
                );
                settings.queue.redis_url = local.url.clone();
                local_redis = Some(local);
            }
            Err(crate::local_redis::StartError::NotInstalled) => {
                eprintln!(
                    "error: no Redis at {redis_url}, and redis-server is not installed to start a private one."
                );
                eprintln!(
                    "install it (`apt-get install redis-server` or `brew install redis`) and run the demo again,"
                );
                eprintln!("or point KLINGQ_REDIS_URL at a Redis.");
                return Ok(ExitCode::from(2));
            }
            Err(crate::local_redis::StartError::Failed(error)) => {
                return Err(error.context(format!("no Redis at {redis_url}")));
            }
        }
    }
    let result = demo(args, settings, interrupted).await;
    drop(local_redis);
    result
}

async fn demo(
    args: DemoArgs,
    mut settings: Settings,
    interrupted: watch::Receiver<bool>,
) -> anyhow::Result<ExitCode> {
    let redis_url = klingq_core::redact_url(&settings.queue.redis_url);
    let queue = match Queue::connect(settings.queue.clone()).await {
        Ok(queue) => queue,
        Err(error) => {
            eprintln!("error: Redis is not reachable at {redis_url}: {error}");
            eprintln!(
                "start one with `redis-server --daemonize yes` (or `docker run -p 6379:6379 redis:7`),"
            );
            eprintln!("or point KLINGQ_REDIS_URL at yours, then run the demo again.");
            return Ok(ExitCode::from(2));
        }
    };
    let real_provider = !settings.provider.api_key.is_empty();
    let real_storage =
        settings.storage.endpoint.is_some() || std::env::var_os("AWS_ACCESS_KEY_ID").is_some();
    let use_real = real_provider && real_storage;
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };

    // The API's address comes first: the simulator's callbacks go to it.
    let listener = match tokio::net::TcpListener::bind(&args.bind).await {
        Ok(listener) => listener,
        Err(_) => tokio::net::TcpListener::bind("127.0.0.1:0").await?,
    };
    let api_url = format!("http://{}", listener.local_addr()?);
    let mut callback_secrets = Vec::new();

    // The provider and the store: simulated, or real when configured.
    let mut _sim = None;
    let mut _s3 = None;
    if use_real {
        println!(
            "klingq demo: RUNFLOW_API_KEY and S3 settings found: using the real Runflow API at {} and bucket {} (this costs money: {} × ${:.2})",
            settings.provider.base_url,
            settings.storage.bucket,
            args.jobs,
            micros_to_usd(
                CostModel {
                    usd_per_second: settings.worker.usd_per_second
                }
                .estimate_micros(5)
            )
        );
    } else {
        // Signed callbacks, as Runflow sends them, wake the parked generations.
        let callback_secret = format!("whsec_demo_{}", klingq_core::JobId::new());
        let sim = klingq_sim::start_local(klingq_sim::SimConfig {
            time_scale: 0.02,
            tail_probability: 0.0,
            video_bytes_per_second: 100_000,
            callback_secret: Some(callback_secret.clone()),
            ..klingq_sim::SimConfig::default()
        })
        .await
        .context("starting the simulator")?;
        callback_secrets.push(klingq_core::Secret::new(callback_secret));
        let s3_dir = args.data_dir.join("s3");
        let s3 = crate::embedded_s3::start(&s3_dir).await?;
        let mut provider = klingq_provider::ProviderConfig::for_tests(sim.base_url(), "demo-key");
        provider.deadline = Duration::from_secs(120);
        provider.callback_url = Some(format!("{api_url}{}", klingq_producer::CALLBACK_PATH));
        settings.provider = provider;
        settings.storage.endpoint = Some(s3.endpoint.clone());
        settings.storage.force_path_style = true;
        settings.storage.checksum_mode = klingq_storage::ChecksumMode::WhenRequired;
        settings.storage.access_key_id = Some(klingq_storage::SecretString::new(&s3.access_key));
        settings.storage.secret_access_key =
            Some(klingq_storage::SecretString::new(&s3.secret_key));
        // The simulator serves its videos on loopback, which the download's SSRF guard
        // refuses unless allow-listed.
        settings.storage.download_allow_cidrs = vec!["127.0.0.0/8".to_owned(), "::1".to_owned()];
        println!(
            "klingq demo: no RUNFLOW_API_KEY and S3 settings: using the simulator ({}) and an embedded S3 store in {}",
            sim.base_url(),
            s3_dir.display()
        );
        _sim = Some(sim);
        _s3 = Some(s3);
    }

    // A local receiver for the batch's webhooks, verifying every signature.
    let secret = WebhookSecret::generate();
    let received = Arc::new(Mutex::new(Received::default()));
    let receiver_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let receiver_url = format!("http://{}/webhooks", receiver_listener.local_addr()?);
    let receiver = Router::new()
        .route("/webhooks", post(receive))
        .with_state(ReceiverState {
            secret: secret.clone(),
            received: received.clone(),
        });
    tokio::spawn(async move {
        let _ = axum::serve(receiver_listener, receiver).await;
    });
    let mut webhooks = settings.webhooks.clone();
    webhooks.secret = secret.to_whsec();
    webhooks.allow_cidrs = vec!["127.0.0.1/32".to_owned()];

    // The worker, webhook delivery and the API with the dashboard.
    settings.worker.health_bind = String::new();
    let worker =
        klingq_worker::Worker::connect(settings.worker_settings(), Duration::from_secs(10)).await?;
    let worker_task = tokio::spawn(worker.run(stopped()));
    let webhook_task = tokio::spawn(klingq_events::run_webhooks(
        queue.clone(),
        webhooks,
        stopped(),
    ));
    let cost = CostModel {
        usd_per_second: settings.worker.usd_per_second,
    };
    let producer = Producer::new(queue.clone(), cost)
        .with_tenants(settings.tenants.clone())
        .with_provider_slots(settings.worker.provider_concurrency);
    let mut api_config = settings.api.clone();
    api_config.tokens.clear();
    if !callback_secrets.is_empty() {
        api_config.callback_secrets = callback_secrets;
    }
    let state = crate::serve::api_state_for(producer.clone(), api_config, &settings.worker);
    let state = crate::video_links::with_video_links(state, settings.storage.clone()).await;
    let api_task = tokio::spawn(klingq_producer::serve(listener, state, stopped()));
    println!("dashboard and API: {api_url}/  (metrics: {api_url}/metrics)");

    // The sample batch.
    let jobs: Vec<_> = (0..args.jobs)
        .map(|n| {
            let mut request = GenerationRequest::new(
                format!("https://picsum.photos/seed/klingq-{n}/1280/720"),
                format!(
                    "a slow dolly shot through a sunlit greenhouse, take {}",
                    n + 1
                ),
            );
            request.duration = klingq_core::VideoDuration::DEFAULT;
            let mut spec = JobSpec::new(request);
            spec.metadata = Some(serde_json::json!({"demo": true, "take": n + 1}));
            Ok(spec)
        })
        .collect();
    let accepted = producer
        .enqueue_batch(
            jobs,
            BatchOptions {
                webhook_url: Some(receiver_url.clone()),
                source: Some("demo".to_owned()),
                ..BatchOptions::default()
            },
        )
        .await
        .map_err(|error| anyhow::anyhow!("enqueueing the sample batch: {error}"))?;
    let batch_id = accepted.id.clone();
    println!("enqueued batch {batch_id} with {} jobs", args.jobs);

    let progress = tokio::time::timeout(
        Duration::from_secs(600),
        crate::progress::wait_for_batch(&producer, &batch_id, 0.5, false),
    );
    let mut interrupt = interrupted.clone();
    let batch = tokio::select! {
        batch = progress => batch
            .map_err(|_| anyhow::anyhow!("the batch did not finish in 10 minutes"))?
            .map_err(|error| anyhow::anyhow!("reading the batch: {error}"))?,
        _ = interrupt.wait_for(|stop| *stop) => {
            println!("interrupted: stopping");
            let _ = stop_tx.send(true);
            let _ = worker_task.await;
            let _ = webhook_task.await;
            let _ = api_task.await;
            return Ok(ExitCode::from(130));
        }
    };
    // Webhooks are asynchronous: give the last ones a moment.
    let deadline = Instant::now() + Duration::from_secs(15);
    while received
        .lock()
        .expect("receiver poisoned")
        .by_type
        .contains_key("batch.completed")
        .not()
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let page = producer
        .batch_jobs(&batch_id, 0, 1_000)
        .await
        .map_err(|error| anyhow::anyhow!("listing the batch's jobs: {error}"))?;
    println!();
    println!(
        "{:<36}  {:<10}  {:<49}  {:>9}  {:<16}  {:>6}",
        "job", "state", "s3 key", "bytes", "sha256", "cost"
    );
    for job in &page.items {
        let video = job.video.as_ref();
        println!(
            "{:<36}  {:<10}  {:<49}  {:>9}  {:<16}  {:>6}",
            job.id,
            job.state,
            video.map(|v| v.key.as_str()).unwrap_or("-"),
            video
                .map(|v| v.size.to_string())
                .unwrap_or_else(|| "-".to_owned()),
            video
                .map(|v| &v.sha256[..16.min(v.sha256.len())])
                .unwrap_or("-"),
            format!("${:.2}", job.charged_usd),
        );
    }
    let (webhook_summary, bad_signatures) = {
        let received = received.lock().expect("receiver poisoned");
        let summary = received
            .by_type
            .iter()
            .map(|(t, n)| format!("{t} × {n}"))
            .collect::<Vec<_>>()
            .join(", ");
        (summary, received.bad_signatures)
    };
    println!();
    println!(
        "batch {batch_id}: {} of {} succeeded, spend ${:.2} (estimated ${:.2})",
        batch.counts.get("succeeded").copied().unwrap_or(0),
        batch.total,
        batch.charged_usd,
        batch.estimated_usd
    );
    println!(
        "webhooks received and verified: {webhook_summary} (bad signatures: {bad_signatures})"
    );
    println!("where to look:");
    println!("  dashboard       {api_url}/");
    println!(
        "  API             {api_url}/v1/batches/{batch_id}   (OpenAPI: {api_url}/openapi.json)"
    );
    println!(
        "  events stream   {} in Redis (`klingq events tail` with KLINGQ_NAMESPACE={})",
        queue.keys().events(),
        settings.queue.namespace
    );
    println!(
        "  videos          bucket {} under {}",
        settings.storage.bucket,
        if use_real {
            "S3".to_owned()
        } else {
            args.data_dir.join("s3").display().to_string()
        }
    );
    if args.log_file().exists() {
        println!(
            "  log             {} (info; the terminal shows warnings, RUST_LOG overrides)",
            args.log_file().display()
        );
    }
    if args.keep_running {
        println!("running until Ctrl-C");
        let mut interrupt = interrupted.clone();
        let _ = interrupt.wait_for(|stop| *stop).await;
    }
    let _ = stop_tx.send(true);
    let _ = worker_task.await;
    let _ = webhook_task.await;
    let _ = api_task.await;
    let all_succeeded = batch.counts.get("succeeded").copied().unwrap_or(0) == batch.total;
    Ok(if all_succeeded {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
