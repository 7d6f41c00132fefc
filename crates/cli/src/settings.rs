//! Configuration: one registry of settings (key, environment variable, default, meaning) from
//! which `config/default.toml` and the README's reference are generated. Values load in
//! layers: the registry's defaults, then a file given with `--config`, then environment
//! variables. A variable named `<VAR>_FILE` reads a secret from a file (Kubernetes secrets).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, bail};
use klingq_core::TenantPolicy;
use klingq_queue::QueueConfig;
use serde::Deserialize;
use toml::{Table, Value};

/// One setting.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Setting {
    /// Dotted path in the TOML file, e.g. `queue.lease_timeout_secs`.
    pub(crate) key: &'static str,
    /// Environment variable that overrides it.
    pub(crate) env: &'static str,
    /// Default, as a TOML literal.
    pub(crate) default: &'static str,
    /// What it means, one or two sentences.
    pub(crate) doc: &'static str,
    /// Secrets are never printed.
    pub(crate) secret: bool,
    /// Unset by default: the file shows it commented out, with `default` as an example.
    pub(crate) optional: bool,
}

const fn setting(
    key: &'static str,
    env: &'static str,
    default: &'static str,
    doc: &'static str,
) -> Setting {
    Setting {
        key,
        env,
        default,
        doc,
        secret: false,
        optional: false,
    }
}

/// A setting that is unset unless given; `example` is shown commented out.
const fn optional(
    key: &'static str,
    env: &'static str,
    example: &'static str,
    doc: &'static str,
) -> Setting {
    Setting {
        key,
        env,
        default: example,
        doc,
        secret: false,
        optional: true,
    }
}

/// A secret: unset by default, never printed.
const fn secret(key: &'static str, env: &'static str, doc: &'static str) -> Setting {
    Setting {
        key,
        env,
        default: "\"...\"",
        doc,
        secret: true,
        optional: true,
    }
}

/// Every setting klingq reads. `config/default.toml` is rendered from this list
/// (`klingq config default`) and a test fails when the two drift.
pub(crate) const SETTINGS: &[Setting] = &[
    setting(
        "queue.redis_url",
        "KLINGQ_REDIS_URL",
        "\"redis://127.0.0.1:6379\"",
        "Redis URL: one node (`redis://[user:password@]host:port[/db]`, `rediss://` for TLS), a comma-separated list of cluster seed nodes, or `redis+sentinel://[user:password@]host:port[,host:port…]/service_name[?db=N&sentinel_password=P]` (`rediss+sentinel://` for TLS). May hold passwords: they are never logged.",
    ),
    setting(
        "queue.redis_mode",
        "KLINGQ_REDIS_MODE",
        "\"auto\"",
        "`auto` (a `redis+sentinel://` URL means Sentinel; otherwise the first node that answers is asked `INFO cluster`), `standalone`, `cluster` or `sentinel`. `klingq config show` and the worker's start log say what was found.",
    ),
    setting(
        "queue.namespace",
        "KLINGQ_NAMESPACE",
        "\"klingq\"",
        "Prefix of every Redis key, used as the Cluster hash tag `{namespace}`. Separate deployments sharing a Redis use separate namespaces.",
    ),
    setting(
        "queue.queue",
        "KLINGQ_QUEUE",
        "\"videos\"",
        "Name of the video job queue inside the namespace.",
    ),
    setting(
        "queue.partitions",
        "KLINGQ_QUEUE_PARTITIONS",
        "1",
        "Hash tags the namespace's jobs are spread over (1 to 64), so that one namespace can use several Cluster shards: a batch stays in one partition, single jobs are spread by id, limits, budgets and pauses stay global. Every process of a namespace must use the same value; it is fixed once the namespace holds jobs (a different value is refused, with how to migrate).",
    ),
    setting(
        "queue.lease_timeout_secs",
        "KLINGQ_LEASE_TIMEOUT_SECS",
        "60",
        "A job whose worker stops renewing its lease for this long (crash, kill -9, partition) is handed to another worker.",
    ),
    setting(
        "queue.reclaim_interval_secs",
        "KLINGQ_RECLAIM_INTERVAL_SECS",
        "5",
        "How often each worker looks for jobs whose lease expired.",
    ),
    setting(
        "queue.promote_interval_ms",
        "KLINGQ_PROMOTE_INTERVAL_MS",
        "250",
        "How often due jobs (retries, not-before times) move from the delayed set to the ready streams.",
    ),
    setting(
        "queue.promote_batch",
        "KLINGQ_PROMOTE_BATCH",
        "500",
        "At most this many due jobs move per script call, so a large delayed set never stalls Redis.",
    ),
    setting(
        "queue.block_timeout_ms",
        "KLINGQ_BLOCK_TIMEOUT_MS",
        "2000",
        "How long one blocking read waits for new jobs.",
    ),
    setting(
        "queue.fetch_batch",
        "KLINGQ_FETCH_BATCH",
        "256",
        "At most this many jobs per read; never more than the worker's free slots.",
    ),
    setting(
        "queue.max_attempts",
        "KLINGQ_MAX_ATTEMPTS",
        "20",
        "Deliveries per job (crashed ones count) before it goes to the dead letters.",
    ),
    setting(
        "queue.retention_secs",
        "KLINGQ_RETENTION_SECS",
        "604800",
        "Finished job records, dead letters and finished batches expire after this long (default 7 days).",
    ),
    setting(
        "queue.idempotency_ttl_secs",
        "KLINGQ_IDEMPOTENCY_TTL_SECS",
        "86400",
        "An idempotency key returns its first job's id for this long.",
    ),
    setting(
        "queue.completion_events",
        "KLINGQ_COMPLETION_EVENTS",
        "true",
        "Whether finishing a job appends a completion event to the events stream `{namespace}:events`.",
    ),
    setting(
        "queue.events_max_len",
        "KLINGQ_EVENTS_MAX_LEN",
        "100000",
        "The events stream (each partition's) is trimmed to about this many entries.",
    ),
    setting(
        "queue.command_timeout_ms",
        "KLINGQ_REDIS_COMMAND_TIMEOUT_MS",
        "10000",
        "Timeout of one Redis command.",
    ),
    setting(
        "queue.enqueue_chunk",
        "KLINGQ_ENQUEUE_CHUNK",
        "1000",
        "Jobs per script call when enqueueing a batch.",
    ),
    setting(
        "queue.min_replicas_ack",
        "KLINGQ_REDIS_MIN_REPLICAS_ACK",
        "0",
        "When > 0, an enqueue is acknowledged, and the checkpoint written before a paid provider call is trusted, only after `WAIT` confirms this many replicas hold it; a timeout is an error the caller sees (enqueue) or a retry (checkpoint). 0: replication stays asynchronous and reconciliation by `client_ref` is the guard against paying twice after a failover.",
    ),
    setting(
        "queue.replica_ack_timeout_ms",
        "KLINGQ_REDIS_REPLICA_ACK_TIMEOUT_MS",
        "1000",
        "How long `WAIT` waits for `min_replicas_ack` replicas. Keep it below `command_timeout_ms`.",
    ),
    // The provider (Runflow).
    setting(
        "provider.base_url",
        "KLINGQ_PROVIDER_BASE_URL",
        "\"https://api.runflow.io\"",
        "Runflow API root. Point it at `klingq sim` for tests and demos.",
    ),
    secret(
        "provider.api_key",
        "RUNFLOW_API_KEY",
        "Runflow API key, sent as `Authorization: Bearer`. Never logged.",
    ),
    setting(
        "provider.model",
        "KLINGQ_PROVIDER_MODEL",
        "\"kuaishou/kling-video/v3/pro/image-to-video\"",
        "Model id in the API path.",
    ),
    setting(
        "provider.mode",
        "KLINGQ_PROVIDER_MODE",
        "\"async\"",
        "`async`: the documented runs API (create, then poll). `sync`: the model page's `POST /v1/run/{model}`, holding the connection.",
    ),
    optional(
        "provider.callback_url",
        "KLINGQ_PROVIDER_CALLBACK_URL",
        "\"https://example.com/runflow-callback\"",
        "Optional `callback_url` sent on creates; polling stays the source of truth.",
    ),
    secret(
        "provider.callback_secret",
        "KLINGQ_PROVIDER_CALLBACK_SECRET",
        "Secret Runflow signs its run callbacks with (`whsec_…`, as issued; the whole string is the HMAC-SHA256 key), checked by `klingq serve` on `POST /v1/provider/callbacks/runflow` (no bearer token: the signature authenticates it). Several, space-separated, during a rotation: any one verifying is enough. Unset: the route answers 404. Never logged.",
    ),
    setting(
        "provider.deadline",
        "KLINGQ_PROVIDER_DEADLINE_SECS",
        "1800",
        "Longest wait for one run's video, in seconds.",
    ),
    // Polls of a parked generation, timed from the learned generation times.
    setting(
        "provider.poll_floor_ms",
        "KLINGQ_PROVIDER_POLL_FLOOR_MS",
        "1000",
        "Shortest wait between two polls of one run (at least 100), so thousands of runs near their finish stay within the provider's rate limits.",
    ),
    setting(
        "provider.poll_max_interval_secs",
        "KLINGQ_PROVIDER_POLL_MAX_INTERVAL_SECS",
        "60",
        "Longest wait between two polls of one run: the latest a lost callback is noticed.",
    ),
    setting(
        "provider.poll_jitter",
        "KLINGQ_PROVIDER_POLL_JITTER",
        "0.1",
        "Each wait is shortened by a random share up to this (0 to <1), so runs created together do not poll together.",
    ),
    setting(
        "provider.poll_min_samples",
        "KLINGQ_PROVIDER_POLL_MIN_SAMPLES",
        "5",
        "Finished runs of a kind (model and clip length) needed before their times decide the polls.",
    ),
    setting(
        "provider.poll_step",
        "KLINGQ_PROVIDER_POLL_STEP",
        "0.1",
        "Share of the runs still going expected to finish between two polls (0 to 1): sparse polls long before the expected finish, dense around it.",
    ),
    setting(
        "provider.poll_cold_fraction",
        "KLINGQ_PROVIDER_POLL_COLD_FRACTION",
        "0.1",
        "Before enough runs are learned (or past all of them), wait this share of the run's age (0 to 1).",
    ),
    // Object storage.
    setting(
        "storage.bucket",
        "KLINGQ_S3_BUCKET",
        "\"klingq-videos\"",
        "Bucket the videos are re-hosted in.",
    ),
    optional(
        "storage.endpoint",
        "KLINGQ_S3_ENDPOINT",
        "\"http://127.0.0.1:8333\"",
        "S3 endpoint for S3-compatible stores (SeaweedFS, MinIO, R2); unset for AWS S3. Credentials come from the standard AWS_* variables.",
    ),
    setting(
        "storage.region",
        "AWS_REGION",
        "\"us-east-1\"",
        "S3 region.",
    ),
    setting(
        "storage.key_prefix",
        "KLINGQ_S3_KEY_PREFIX",
        "\"videos/\"",
        "Object keys are `{key_prefix}{job_id}.mp4`.",
    ),
    setting(
        "storage.force_path_style",
        "KLINGQ_S3_FORCE_PATH_STYLE",
        "false",
        "Path-style URLs, as most S3-compatible stores need.",
    ),
    setting(
        "storage.checksum_mode",
        "KLINGQ_S3_CHECKSUM_MODE",
        "\"when_supported\"",
        "`when_supported` (SDK default, AWS and SeaweedFS) or `when_required` for stores that reject streamed checksum trailers.",
    ),
    setting(
        "storage.presign_ttl_secs",
        "KLINGQ_S3_PRESIGN_TTL_SECS",
        "86400",
        "Lifetime of the presigned GET URL a finished job carries.",
    ),
    optional(
        "storage.public_base_url",
        "KLINGQ_S3_PUBLIC_BASE_URL",
        "\"https://cdn.example.com\"",
        "When set, video URLs are `{public_base_url}/{key}` instead of presigned.",
    ),
    setting(
        "storage.part_size",
        "KLINGQ_S3_PART_SIZE",
        "8388608",
        "Multipart part size in bytes; files smaller than one part go in a single PUT.",
    ),
    setting(
        "storage.max_video_bytes",
        "KLINGQ_S3_MAX_VIDEO_BYTES",
        "500000000",
        "Largest video accepted from the provider.",
    ),
    setting(
        "storage.download_allow_cidrs",
        "KLINGQ_DOWNLOAD_ALLOW_CIDRS",
        "[]",
        "Video downloads (and each of at most 3 redirects) refuse private, loopback, link-local, CGNAT and other non-public addresses (SSRF guard; the job fails with `DOWNLOAD_REFUSED`) unless in these CIDRs (comma-separated). A local `klingq sim` needs `127.0.0.0/8`.",
    ),
    // The worker.
    setting(
        "worker.concurrency",
        "KLINGQ_WORKER_CONCURRENCY",
        "64",
        "Jobs in flight per worker process (they mostly wait on the provider).",
    ),
    setting(
        "worker.provider_concurrency",
        "KLINGQ_PROVIDER_CONCURRENCY",
        "10",
        "Concurrent provider generations across all replicas (the account's limit), shared in Redis; adapts down on 429.",
    ),
    setting(
        "worker.limit_lease_secs",
        "KLINGQ_PROVIDER_LIMIT_LEASE_SECS",
        "120",
        "A dead worker's provider slots come back after this long.",
    ),
    setting(
        "worker.throttle_recovery_secs",
        "KLINGQ_PROVIDER_THROTTLE_RECOVERY_SECS",
        "30",
        "After a 429 the shared limit regains one slot per period.",
    ),
    setting(
        "worker.credit_pause_secs",
        "KLINGQ_PROVIDER_CREDIT_PAUSE_SECS",
        "60",
        "After a 402 submissions pause this long, then one job probes.",
    ),
    setting(
        "worker.limit_wait_secs",
        "KLINGQ_PROVIDER_LIMIT_WAIT_SECS",
        "5",
        "How long a job waits before asking again for a full shared limit.",
    ),
    setting(
        "worker.health_bind",
        "KLINGQ_WORKER_HEALTH_BIND",
        "\"127.0.0.1:9090\"",
        "Address of /healthz, /readyz and /metrics; empty to disable.",
    ),
    setting(
        "worker.shutdown_grace_secs",
        "KLINGQ_WORKER_SHUTDOWN_GRACE_SECS",
        "25",
        "On SIGTERM, in-flight jobs get this long to reach a checkpoint; keep it below terminationGracePeriodSeconds.",
    ),
    setting(
        "worker.job_deadline_secs",
        "KLINGQ_JOB_DEADLINE_SECS",
        "1800",
        "A job not finished this long after creation fails with DEADLINE_EXCEEDED.",
    ),
    setting(
        "worker.submit_retries",
        "KLINGQ_SUBMIT_RETRIES",
        "8",
        "Retries of the submit step (each after a backoff through the delayed set).",
    ),
    setting(
        "worker.generate_retries",
        "KLINGQ_GENERATE_RETRIES",
        "2",
        "New runs after the provider failed a run for its own reasons (failed runs are not billed).",
    ),
    setting(
        "worker.download_retries",
        "KLINGQ_DOWNLOAD_RETRIES",
        "8",
        "Retries of the download and upload step.",
    ),
    setting(
        "worker.max_retry_delay_secs",
        "KLINGQ_MAX_RETRY_DELAY_SECS",
        "300",
        "Longest delay between step retries.",
    ),
    setting(
        "worker.daily_budget_usd",
        "KLINGQ_DAILY_BUDGET_USD",
        "0.0",
        "Spending cap per UTC day on estimated cost (0: none). Jobs over it wait as scheduled.",
    ),
    setting(
        "worker.budget_wait_secs",
        "KLINGQ_BUDGET_WAIT_SECS",
        "300",
        "How often a job waiting for a budget checks again.",
    ),
    setting(
        "worker.usd_per_second",
        "KLINGQ_USD_PER_SECOND",
        "0.14",
        "Price per second of video, for estimates.",
    ),
    setting(
        "api.bind",
        "KLINGQ_API_BIND",
        "\"127.0.0.1:8080\"",
        "Address `klingq serve` listens on (`--bind` overrides it).",
    ),
    secret(
        "api.tokens",
        "KLINGQ_API_TOKENS",
        "Bearer tokens the HTTP API accepts, comma-separated (or a TOML list). Without any, `klingq serve` only listens on loopback.",
    ),
    setting(
        "api.max_job_body_bytes",
        "KLINGQ_API_MAX_JOB_BODY_BYTES",
        "1048576",
        "Largest body `POST /v1/jobs` (and re-drive) accepts; larger ones get 413.",
    ),
    setting(
        "api.max_batch_body_bytes",
        "KLINGQ_API_MAX_BATCH_BODY_BYTES",
        "67108864",
        "Largest body `POST /v1/batches` accepts (64 MiB: about 100k jobs); larger ones get 413.",
    ),
    setting(
        "api.max_batch_jobs",
        "KLINGQ_API_MAX_BATCH_JOBS",
        "200000",
        "Most jobs one batch may have, from the API or `klingq batch submit`.",
    ),
    setting(
        "api.events_stream_max_secs",
        "KLINGQ_API_EVENTS_STREAM_MAX_SECS",
        "300",
        "One `GET /v1/events` response ends after this long; clients reconnect with Last-Event-ID and miss nothing.",
    ),
    setting(
        "api.max_event_streams",
        "KLINGQ_API_MAX_EVENT_STREAMS",
        "64",
        "Most `GET /v1/events` streams open at once (each holds one Redis connection); beyond it the API answers 503 with Retry-After.",
    ),
    // Webhooks.
    setting(
        "webhooks.enabled",
        "KLINGQ_WEBHOOKS_ENABLED",
        "true",
        "Whether `klingq worker` delivers webhooks (dispatcher and delivery worker).",
    ),
    secret(
        "webhooks.secret",
        "KLINGQ_WEBHOOK_SECRET",
        "Signing secret(s) for per-job and per-batch webhook URLs: `whsec_…` (base64, at least 24 bytes); several, space-separated, rotate (all sign).",
    ),
    setting(
        "webhooks.timeout_secs",
        "KLINGQ_WEBHOOK_TIMEOUT_SECS",
        "15",
        "A delivery succeeds on a 2xx within this long; 3xx counts as failure.",
    ),
    setting(
        "webhooks.retry_schedule",
        "KLINGQ_WEBHOOK_RETRY_SCHEDULE",
        "[\"5s\", \"5m\", \"30m\", \"2h\", \"5h\", \"10h\", \"10h\"]",
        "Delays between attempts (jittered); after the last, the delivery is kept as exhausted and can be replayed.",
    ),
    setting(
        "webhooks.max_retry_after_secs",
        "KLINGQ_WEBHOOK_MAX_RETRY_AFTER_SECS",
        "3600",
        "Longest Retry-After honoured on 429/503.",
    ),
    setting(
        "webhooks.concurrency",
        "KLINGQ_WEBHOOK_CONCURRENCY",
        "32",
        "Deliveries in flight per worker process.",
    ),
    setting(
        "webhooks.per_endpoint_concurrency",
        "KLINGQ_WEBHOOK_PER_ENDPOINT_CONCURRENCY",
        "8",
        "Deliveries in flight per endpoint, so one slow endpoint cannot hold the others back.",
    ),
    setting(
        "webhooks.https_only",
        "KLINGQ_WEBHOOK_HTTPS_ONLY",
        "false",
        "Refuse plain-http webhook URLs.",
    ),
    setting(
        "webhooks.allow_cidrs",
        "KLINGQ_WEBHOOK_ALLOW_CIDRS",
        "[]",
        "Private, loopback and link-local targets are refused (SSRF guard) unless in these CIDRs (comma-separated).",
    ),
    setting(
        "webhooks.endpoints",
        "KLINGQ_WEBHOOK_ENDPOINTS",
        "[]",
        "Global endpoints receiving every event. From the environment: comma-separated URLs signed with webhooks.secret; in the file: [[webhooks.endpoints]] with url, secret, event_types, name.",
    ),
    setting(
        "telemetry.otlp_endpoint",
        "KLINGQ_OTLP_ENDPOINT",
        "\"\"",
        "OTLP/HTTP (protobuf) collector to export traces to, e.g. `http://otel-collector:4318` (`/v1/traces` is appended). Empty: the standard `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT`, else no export. Needs a build with `--features otlp` (the Docker image has it); `OTEL_EXPORTER_OTLP_HEADERS` and `OTEL_BSP_*` apply.",
    ),
    setting(
        "telemetry.service_name",
        "KLINGQ_SERVICE_NAME",
        "\"\"",
        "`service.name` of exported spans. Empty: `OTEL_SERVICE_NAME`, else the command's role: `klingq-worker`, `klingq-api` (serve), `klingq-demo`, `klingq-sim`, `klingq-cli`.",
    ),
];

/// How the process exports traces (`[telemetry]`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct TelemetrySettings {
    pub(crate) otlp_endpoint: String,
    pub(crate) service_name: String,
}

/// All of klingq's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Settings {
    pub(crate) queue: QueueConfig,
    pub(crate) provider: klingq_provider::ProviderConfig,
    pub(crate) storage: klingq_storage::StorageConfig,
    pub(crate) worker: klingq_worker::WorkerConfig,
    pub(crate) api: klingq_producer::ApiConfig,
    pub(crate) webhooks: klingq_events::WebhookConfig,
    pub(crate) telemetry: TelemetrySettings,
    /// `[tenants.NAME]` tables: each tenant's policy (`[tenants.default]` for the rest).
    #[serde(default)]
    pub(crate) tenants: BTreeMap<String, TenantPolicy>,
}

impl Settings {
    pub(crate) fn worker_settings(&self) -> klingq_worker::WorkerSettings {
        klingq_worker::WorkerSettings {
            queue: self.queue.clone(),
            provider: self.provider.clone(),
            storage: self.storage.clone(),
            worker: self.worker.clone(),
        }
    }
}

/// Renders `config/default.toml` from the registry: every setting, commented.
pub(crate) fn render_default_toml() -> String {
    let mut out = String::from(
        "# klingq configuration: every setting with its default.\n\
         # Generated from the settings registry (`klingq config default`); a test checks it.\n\
         # Load order: these defaults, then the file given with --config, then environment\n\
         # variables (named on each setting). `<VAR>_FILE` reads a value from a file.\n",
    );
    let mut section = "";
    for setting in SETTINGS {
        let (table, name) = setting
            .key
            .rsplit_once('.')
            .expect("settings are table.key");
        if table != section {
            out.push_str(&format!("\n[{table}]\n"));
            section = table;
        }
        out.push_str(&format!("# {} (env: {})\n", setting.doc, setting.env));
        if setting.optional {
            out.push_str(&format!("# {name} = {}\n", setting.default));
        } else {
            out.push_str(&format!("{name} = {}\n", setting.default));
        }
    }
    out.push_str(TENANTS_EXAMPLE);
    out
}

/// The tenant tables, as an example (tenants have no defaults to list).
const TENANTS_EXAMPLE: &str = "
# [tenants.NAME]: one tenant's share of the provider and its limits; [tenants.default]
# applies to every tenant without a table of its own. `PUT /v1/tenants/{name}` overrides
# these for every process. Names: 1 to 64 ASCII letters, digits, '_' or '-'.
# [tenants.default]
# weight = 1.0            # relative share of the provider, by dollars started
# max_concurrency = 0     # provider runs at once across replicas (0: only the shared limit)
# daily_budget_usd = 0.0  # estimated spend per UTC day (0: none)
# priority_cap = \"high\"   # the highest priority its jobs get (high, normal, low)
";

/// Renders the configuration reference (a Markdown table per section) for the README.
pub(crate) fn render_reference_markdown() -> String {
    let mut out = String::new();
    let mut section = "";
    for setting in SETTINGS {
        let (table, name) = setting
            .key
            .rsplit_once('.')
            .expect("settings are table.key");
        if table != section {
            out.push_str(&format!(
                "\n**[{table}]**\n\n| setting | environment | default | meaning |\n|---|---|---|---|\n"
            ));
            section = table;
        }
        let default = if setting.secret {
            "(secret, unset)".to_owned()
        } else if setting.optional {
            "(unset)".to_owned()
        } else {
            format!("`{}`", setting.default)
        };
        out.push_str(&format!(
            "| `{name}` | `{}` | {default} | {} |\n",
            setting.env,
            setting.doc.replace('|', "\\|")
        ));
    }
    out
}

/// The README's generated section sits between these markers.
pub(crate) const REFERENCE_START: &str =
    "<!-- settings-reference:start (generated by `klingq config reference`) -->";
pub(crate) const REFERENCE_END: &str = "<!-- settings-reference:end -->";

/// Loads the settings: defaults, then `file`, then the environment.
pub(crate) fn load(file: Option<&Path>) -> anyhow::Result<Settings> {
    load_with(file, |name| std::env::var(name).ok())
}

pub(crate) fn load_with(
    file: Option<&Path>,
    env: impl Fn(&str) -> Option<String>,
) -> anyhow::Result<Settings> {
    let mut table = merged_table(file, env)?;
    move_callback_secret(&mut table);
    let mut settings: Settings = Value::Table(table)
        .try_into()
        .context("invalid configuration")?;
    for (name, policy) in &settings.tenants {
        if let Err((_, message)) = klingq_core::tenant::check_tenant_name(name) {
            bail!("invalid configuration: tenant name [tenants.{name}] {message}");
        }
        if let Err(errors) = policy.validate() {
            let first = errors.iter().next().map_or_else(String::new, |e| {
                format!("tenants.{name}.{} {} ({})", e.path, e.message, e.rule)
            });
            bail!("invalid configuration: {first}");
        }
    }
    settings.worker.tenants = settings.tenants.clone();
    Ok(settings)
}

/// `provider.callback_secret` is read by the API (`klingq serve` checks Runflow's callbacks),
/// not by the provider client: it moves to the API's `callback_secrets` before the tables
/// become config structs (`[provider]` is the provider crate's `ProviderConfig`, which refuses
/// unknown fields).
fn move_callback_secret(table: &mut Table) {
    let secret = table
        .get_mut("provider")
        .and_then(Value::as_table_mut)
        .and_then(|provider| provider.remove("callback_secret"));
    if let Some(secret) = secret {
        set(table, "api.callback_secrets", secret);
    }
}

/// Defaults, then the file, then the environment, as one TOML table.
fn merged_table(
    file: Option<&Path>,
    env: impl Fn(&str) -> Option<String>,
) -> anyhow::Result<Table> {
    let mut table: Table =
        toml::from_str(&render_default_toml()).expect("registry renders valid TOML");
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        let overrides: Table = toml::from_str(&text)
            .with_context(|| format!("parsing config file {}", path.display()))?;
        merge(&mut table, overrides, "")?;
    }
    for setting in SETTINGS {
        let raw = match env(setting.env) {
            Some(value) => value,
            None => match env(&format!("{}_FILE", setting.env)) {
                Some(path) => std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {}_FILE ({path})", setting.env))?
                    .trim_end()
                    .to_owned(),
                None => continue,
            },
        };
        let current = lookup(&table, setting.key)
            .cloned()
            .unwrap_or(Value::String(String::new()));
        let value = parse_like(&current, &raw).with_context(|| {
            format!(
                "{}: {} is not a valid value for {}",
                setting.env,
                if setting.secret { "[redacted]" } else { &raw },
                setting.key
            )
        })?;
        set(&mut table, setting.key, value);
    }
    Ok(table)
}

fn merge(base: &mut Table, overrides: Table, prefix: &str) -> anyhow::Result<()> {
    for (key, value) in overrides {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match (base.get_mut(&key), value) {
            (Some(Value::Table(base_table)), Value::Table(table)) => {
                merge(base_table, table, &path)?
            }
            (Some(_), value) => {
                base.insert(key, value);
            }
            (None, value) if known_prefix(&path) => {
                base.insert(key, value);
            }
            (None, _) => bail!("unknown setting {path} in the config file"),
        }
    }
    Ok(())
}

/// Whether `path` is a setting (or a table of settings) the registry or the config structs know,
/// though unset by default.
fn known_prefix(path: &str) -> bool {
    SETTINGS.iter().any(|s| s.key == path)
        || [
            "provider.timeouts",
            "provider.retry",
            "provider.poll",
            "provider.reconcile_grace",
            "storage.access_key_id",
            "storage.secret_access_key",
            "tenants",
        ]
        .iter()
        .any(|p| path == *p || path.starts_with(&format!("{p}.")))
}

fn lookup<'a>(table: &'a Table, key: &str) -> Option<&'a Value> {
    let mut parts = key.split('.');
    let mut current = table.get(parts.next()?)?;
    for part in parts {
        current = current.as_table()?.get(part)?;
    }
    Some(current)
}

fn set(table: &mut Table, key: &str, value: Value) {
    let mut parts: Vec<&str> = key.split('.').collect();
    let name = parts.pop().expect("settings have a name");
    let mut current = table;
    for part in parts {
        current = match current
            .entry(part.to_owned())
            .or_insert_with(|| Value::Table(Table::new()))
        {
            Value::Table(next) => next,
            _ => return,
        };
    }
    current.insert(name.to_owned(), value);
}

/// The effective settings as TOML, with secrets redacted, for `klingq config show`.
pub(crate) fn effective_toml(file: Option<&Path>) -> anyhow::Result<String> {
    let settings = load(file)?;
    let mut table = merged_table(file, |name| std::env::var(name).ok())?;
    for setting in SETTINGS {
        if setting.secret && lookup(&table, setting.key).is_some() {
            set(
                &mut table,
                setting.key,
                Value::String("[redacted]".to_owned()),
            );
        }
    }
    set(
        &mut table,
        "queue.redis_url",
        Value::String(klingq_core::redact_url(&settings.queue.redis_url)),
    );
    Ok(toml::to_string_pretty(&table)?)
}

/// Parses an environment value as the type of the setting's current value.
fn parse_like(current: &Value, raw: &str) -> anyhow::Result<Value> {
    Ok(match current {
        Value::Integer(_) => Value::Integer(raw.trim().parse()?),
        Value::Float(_) => Value::Float(raw.trim().parse()?),
        Value::Boolean(_) => Value::Boolean(match raw.trim() {
            "1" | "true" | "yes" | "on" => true,
            "0" | "false" | "no" | "off" => false,
            other => bail!("expected true or false, got {other:?}"),
        }),
        Value::Array(_) => Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| Value::String(s.to_owned()))
                .collect(),
        ),
        _ => Value::String(raw.to_owned()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_toml_matches_the_registry() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/default.toml");
        let on_disk = std::fs::read_to_string(path).expect("config/default.toml exists");
        assert_eq!(
            on_disk,
            render_default_toml(),
            "config/default.toml drifted from the settings registry: run `cargo run -p klingq -- config default > config/default.toml`"
        );
    }

    #[test]
    fn readme_reference_matches_the_registry() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md");
        let readme = std::fs::read_to_string(path).expect("README.md exists");
        let start = readme
            .find(REFERENCE_START)
            .expect("README has the reference start marker")
            + REFERENCE_START.len();
        let end = readme
            .find(REFERENCE_END)
            .expect("README has the reference end marker");
        assert_eq!(
            readme[start..end].trim(),
            render_reference_markdown().trim(),
            "the README's configuration reference drifted from the settings registry: run \
             `cargo run -p klingq -- config reference` and paste it between the markers"
        );
    }

    #[test]
    fn defaults_deserialize_and_match_the_structs() {
        let settings = load_with(None, |_| None).unwrap();
        assert_eq!(settings.queue, QueueConfig::default());
        assert_eq!(settings.api, klingq_producer::ApiConfig::default());
        assert_eq!(settings.worker, klingq_worker::WorkerConfig::default());
        assert_eq!(
            settings.provider.base_url,
            klingq_provider::DEFAULT_BASE_URL
        );
        assert_eq!(settings.storage.bucket, "klingq-videos");
        assert!(settings.storage.endpoint.is_none());
        assert!(settings.provider.api_key.is_empty());
    }

    #[test]
    fn every_setting_is_overridable_from_the_environment_and_unique() {
        let defaults: Table = toml::from_str(&render_default_toml()).unwrap();
        let mut envs = std::collections::HashSet::new();
        for setting in SETTINGS {
            assert!(envs.insert(setting.env), "{} used twice", setting.env);
            assert_eq!(
                lookup(&defaults, setting.key).is_some(),
                !setting.optional,
                "{}",
                setting.key
            );
        }
        let settings = load_with(None, |name| match name {
            "KLINGQ_NAMESPACE" => Some("prod".into()),
            "KLINGQ_LEASE_TIMEOUT_SECS" => Some("90".into()),
            "KLINGQ_COMPLETION_EVENTS" => Some("false".into()),
            "KLINGQ_S3_ENDPOINT" => Some("http://127.0.0.1:18333".into()),
            "RUNFLOW_API_KEY" => Some("rf_live_secret".into()),
            "KLINGQ_PROVIDER_MODE" => Some("sync".into()),
            "KLINGQ_WORKER_CONCURRENCY" => Some("8".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(settings.queue.namespace, "prod");
        assert_eq!(settings.queue.lease_timeout_secs, 90);
        assert!(!settings.queue.completion_events);
        assert_eq!(
            settings.storage.endpoint.as_deref(),
            Some("http://127.0.0.1:18333")
        );
        assert_eq!(settings.provider.api_key.expose(), "rf_live_secret");
        assert_eq!(settings.provider.mode, klingq_provider::Mode::Sync);
        assert_eq!(settings.worker.concurrency, 8);
    }

    #[test]
    fn the_callback_secret_reaches_the_api_not_the_provider_client() {
        let settings = load_with(None, |name| {
            (name == "KLINGQ_PROVIDER_CALLBACK_SECRET").then(|| "whsec_old whsec_new".into())
        })
        .unwrap();
        let secrets: Vec<&str> = settings
            .api
            .callback_secrets
            .iter()
            .map(|secret| secret.expose())
            .collect();
        assert_eq!(secrets, ["whsec_old", "whsec_new"]);
        assert!(!format!("{settings:?}").contains("whsec_"));
        let dir = std::env::temp_dir().join(format!("klingq-callback-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("callback.toml");
        std::fs::write(&file, "[provider]\ncallback_secret = \"whsec_file\"\n").unwrap();
        let settings = load_with(Some(&file), |_| None).unwrap();
        assert_eq!(settings.api.callback_secrets.len(), 1);
        assert_eq!(settings.api.callback_secrets[0].expose(), "whsec_file");
        assert!(
            load_with(None, |_| None)
                .unwrap()
                .api
                .callback_secrets
                .is_empty()
        );
    }

    #[test]
    fn bad_values_name_the_variable_and_the_setting() {
        let error = load_with(None, |name| {
            (name == "KLINGQ_MAX_ATTEMPTS").then(|| "many".into())
        })
        .unwrap_err();
        assert!(
            format!("{error:#}")
                .contains("KLINGQ_MAX_ATTEMPTS: many is not a valid value for queue.max_attempts")
        );
    }

    #[test]
    fn tenant_tables_reach_the_worker_and_bad_ones_name_the_field() {
        let dir = std::env::temp_dir().join(format!("klingq-tenants-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.toml");
        std::fs::write(
            &good,
            "[tenants.default]\nmax_concurrency = 2\n[tenants.acme]\nweight = 3.0\n\
             daily_budget_usd = 50.0\npriority_cap = \"normal\"\n",
        )
        .unwrap();
        let settings = load_with(Some(&good), |_| None).unwrap();
        let acme = &settings.worker.tenants["acme"];
        assert_eq!((acme.weight, acme.daily_budget_usd), (3.0, 50.0));
        assert_eq!(acme.priority_cap, Some(klingq_core::Priority::Normal));
        assert_eq!(settings.worker.tenants["default"].max_concurrency, 2);
        assert_eq!(settings.worker.tenants["default"].weight, 1.0);
        for (text, expected) in [
            ("[tenants.acme]\nweight = 0.0\n", "tenants.acme.weight"),
            ("[tenants.\"a b\"]\nweight = 1.0\n", "[tenants.a b]"),
            ("[tenants.acme]\nwieght = 1.0\n", "wieght"),
        ] {
            let bad = dir.join("bad-tenant.toml");
            std::fs::write(&bad, text).unwrap();
            let error = format!("{:#}", load_with(Some(&bad), |_| None).unwrap_err());
            assert!(error.contains(expected), "{error}");
        }
    }

    #[test]
    fn config_files_override_defaults_and_unknown_keys_fail() {
        let dir = std::env::temp_dir().join(format!("klingq-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.toml");
        std::fs::write(&good, "[queue]\nmax_attempts = 5\n").unwrap();
        assert_eq!(
            load_with(Some(&good), |_| None).unwrap().queue.max_attempts,
            5
        );
        let bad = dir.join("bad.toml");
        std::fs::write(&bad, "[queue]\nmax_atempts = 5\n").unwrap();
        let error = load_with(Some(&bad), |_| None).unwrap_err();
        assert!(format!("{error:#}").contains("unknown setting queue.max_atempts"));
    }

    #[test]
    fn download_allow_list_is_empty_by_default_and_read_from_the_environment() {
        let defaults = load_with(None, |_| None).unwrap();
        assert!(defaults.storage.download_allow_cidrs.is_empty());
        let settings = load_with(None, |name| {
            (name == "KLINGQ_DOWNLOAD_ALLOW_CIDRS").then(|| "127.0.0.0/8, ::1".into())
        })
        .unwrap();
        assert_eq!(
            settings.storage.download_allow_cidrs,
            ["127.0.0.0/8", "::1"]
        );
        settings.storage.validate().unwrap();
    }
}
