//! End-to-end tests of klingq: real processes against real Redis, SeaweedFS and the simulator.
//! The tests are in `e2e/`; `bin/` holds helper processes they start. This library holds what
//! both share: the settings of a worker under test, and the keys of the test worker's counts.

use std::time::Duration;

use klingq_provider::ProviderConfig;
use klingq_queue::{Keys, QueueConfig};
use klingq_storage::{SecretString, StorageConfig};
use klingq_worker::{WorkerConfig, WorkerSettings};

/// Where a worker under test finds its services.
#[derive(Debug, Clone)]
pub struct E2eServices {
    pub redis_url: String,
    pub namespace: String,
    pub sim_url: String,
    pub s3_endpoint: String,
    pub s3_access_key: String,
    pub s3_secret_key: String,
    pub bucket: String,
    /// `queue.partitions` of the namespace.
    pub partitions: u32,
}

impl E2eServices {
    /// Passes the services to a worker process through the environment.
    pub fn to_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("E2E_REDIS_URL", self.redis_url.clone()),
            ("E2E_NAMESPACE", self.namespace.clone()),
            ("E2E_SIM_URL", self.sim_url.clone()),
            ("E2E_S3_ENDPOINT", self.s3_endpoint.clone()),
            ("E2E_S3_ACCESS_KEY", self.s3_access_key.clone()),
            ("E2E_S3_SECRET_KEY", self.s3_secret_key.clone()),
            ("E2E_BUCKET", self.bucket.clone()),
            ("E2E_PARTITIONS", self.partitions.to_string()),
        ]
    }

    pub fn from_env() -> anyhow::Result<Self> {
        let var =
            |name: &str| std::env::var(name).map_err(|_| anyhow::anyhow!("{name} is not set"));
        Ok(Self {
            redis_url: var("E2E_REDIS_URL")?,
            namespace: var("E2E_NAMESPACE")?,
            sim_url: var("E2E_SIM_URL")?,
            s3_endpoint: var("E2E_S3_ENDPOINT")?,
            s3_access_key: var("E2E_S3_ACCESS_KEY")?,
            s3_secret_key: var("E2E_S3_SECRET_KEY")?,
            bucket: var("E2E_BUCKET")?,
            partitions: var("E2E_PARTITIONS")?.parse()?,
        })
    }

    /// A worker's settings for tests: short leases and delays, no health server.
    pub fn worker_settings(&self) -> WorkerSettings {
        let mut storage = StorageConfig::new(&self.bucket);
        storage.endpoint = Some(self.s3_endpoint.clone());
        storage.force_path_style = true;
        storage.access_key_id = Some(SecretString::new(&self.s3_access_key));
        storage.secret_access_key = Some(SecretString::new(&self.s3_secret_key));
        storage.download_idle_timeout = Duration::from_secs(5);
        // The simulator serves its videos on loopback, which the SSRF guard refuses unless
        // allow-listed.
        storage.download_allow_cidrs = vec!["127.0.0.0/8".to_owned(), "::1".to_owned()];
        let mut provider = ProviderConfig::for_tests(&self.sim_url, "e2e-key");
        provider.deadline = Duration::from_secs(120);
        WorkerSettings {
            queue: QueueConfig {
                redis_url: self.redis_url.clone(),
                namespace: self.namespace.clone(),
                partitions: self.partitions,
                lease_timeout_secs: 3,
                reclaim_interval_secs: 1,
                block_timeout_ms: 200,
                promote_interval_ms: 50,
                ..QueueConfig::default()
            },
            provider,
            storage,
            worker: WorkerConfig {
                concurrency: 64,
                health_bind: String::new(),
                shutdown_grace_secs: 5,
                credit_pause_secs: 1,
                limit_wait_secs: 1,
                budget_wait_secs: 1,
                max_retry_delay_secs: 1,
                job_deadline_secs: 300,
                ..WorkerConfig::default()
            },
        }
    }
}

/// Starts a helper process and waits until it prints `ready` (its first line); its further
/// output is drained so it never blocks. Killed when dropped.
pub async fn spawn_ready(mut command: tokio::process::Command) -> tokio::process::Child {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("starting a helper process");
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut lines = BufReader::new(stdout).lines();
    let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("the helper process did not start in time")
        .expect("reading the helper's output");
    assert_eq!(first.as_deref(), Some("ready"));
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    child
}

/// The test-only hash where `klingq-test-worker` counts per job what it `what`s (`started`,
/// `completed`): `{ns}:test:<what>`, under the namespace's hash tag but no key of klingq's.
pub fn test_counts_key(keys: &Keys, what: &str) -> String {
    format!("{}:test:{what}", keys.prefix())
}
