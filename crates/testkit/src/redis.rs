//! Redis for tests: the shared server (127.0.0.1:6379 or `KLINGQ_TEST_REDIS_URL`) with a
//! unique namespace per test, or a private `redis-server` on a free port for tests that stop,
//! restart or break it.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

use crate::tls::TlsFiles;
use crate::wait_for;

/// The shared Redis tests use when they need not stop it.
pub fn redis_url() -> String {
    std::env::var("KLINGQ_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// A namespace no other test uses, so tests share one Redis without seeing each other.
pub fn unique_namespace(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("test-{prefix}-{}-{nanos:x}", std::process::id())
}

/// A free TCP port on loopback (free when asked; bind it soon).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("no free loopback port")
}

/// A private `redis-server` on a free port, killed on drop.
pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
    /// Whether it keeps an append-only file (fsync on every write) across restarts.
    aof: bool,
    /// It serves TLS only, with these files.
    tls: Option<TlsFiles>,
}

impl RedisServer {
    /// Starts one and waits until it answers PING.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(false).await
    }

    /// Starts one that keeps its data in an append-only file, fsynced on every write, so a
    /// kill and [`RedisServer::restart`] keep every acknowledged write (as production's AOF
    /// Redis does).
    pub async fn start_persistent() -> anyhow::Result<Self> {
        Self::start_with(true).await
    }

    /// Starts one that serves TLS only (`--port 0 --tls-port PORT`, a throwaway CA and a
    /// certificate for `127.0.0.1`, see [`TlsFiles`]; clients need no certificate) and waits
    /// until it answers PING over TLS. Its [`RedisServer::url`] is
    /// `rediss://127.0.0.1:PORT/#insecure`.
    pub async fn start_tls() -> anyhow::Result<Self> {
        Self::start_with_tls(false, Some(TlsFiles::generate()?)).await
    }

    async fn start_with(aof: bool) -> anyhow::Result<Self> {
        Self::start_with_tls(aof, None).await
    }

    async fn start_with_tls(aof: bool, tls: Option<TlsFiles>) -> anyhow::Result<Self> {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("klingq-redis-{port}-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let mut server = Self {
            port,
            dir,
            child: None,
            aof,
            tls,
        };
        server.spawn().await?;
        Ok(server)
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let mut command = Command::new("redis-server");
        match &self.tls {
            None => command.args(["--port", &self.port.to_string()]),
            Some(tls) => command.args(tls.server_args(self.port)),
        };
        let child = command
            .args(["--bind", "127.0.0.1", "--save", ""])
            .args(if self.aof {
                ["--appendonly", "yes", "--appendfsync", "always"]
            } else {
                ["--appendonly", "no", "--appendfsync", "everysec"]
            })
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting redis-server (install it: apt-get install redis-server)")?;
        self.child = Some(child);
        let port = self.port;
        match &self.tls {
            None => {
                wait_for(
                    "redis-server to answer",
                    Duration::from_secs(10),
                    || async move { ping(port).await.then_some(()) },
                )
                .await
            }
            Some(tls) => {
                wait_for(
                    "redis-server to answer over TLS",
                    Duration::from_secs(10),
                    || async move {
                        crate::cluster::command_over(Some(tls), port, &["PING"])
                            .await
                            .ok()
                            .map(drop)
                    },
                )
                .await
            }
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT`; for [`RedisServer::start_tls`] `rediss://127.0.0.1:PORT/#insecure`
    /// (the redis crate's fragment for not verifying the certificate: the test CA is in no root
    /// store). The redis crate honours it only with its `tls-rustls-insecure` feature, else
    /// connecting fails ("Cannot create insecure client without tls-rustls-insecure feature");
    /// [`RedisServer::verified_url`] needs no feature.
    pub fn url(&self) -> String {
        match self.tls {
            None => format!("redis://127.0.0.1:{}", self.port),
            Some(_) => format!("rediss://127.0.0.1:{}/#insecure", self.port),
        }
    }

    /// For [`RedisServer::start_tls`]: `rediss://127.0.0.1:PORT`, which verifies the certificate
    /// (a client must trust [`TlsFiles::ca_file`], e.g. through `SSL_CERT_FILE`, which the redis
    /// crate's rustls roots are loaded from). `None` for a plain server.
    pub fn verified_url(&self) -> Option<String> {
        self.tls
            .as_ref()
            .map(|_| format!("rediss://127.0.0.1:{}", self.port))
    }

    /// The CA and certificate of a server started with [`RedisServer::start_tls`].
    pub fn tls_files(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    /// Kills the server (as a crash would: no save).
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await?;
        }
        Ok(())
    }

    /// Starts it again on the same port (empty, unless started with
    /// [`RedisServer::start_persistent`]).
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop().await?;
        self.spawn().await
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether a Redis answers PING on the port.
async fn ping(port: u16) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    if stream.write_all(b"PING\r\n").await.is_err() {
        return false;
    }
    let mut reply = [0u8; 7];
    matches!(
        tokio::time::timeout(Duration::from_secs(1), stream.read_exact(&mut reply)).await,
        Ok(Ok(_))
    ) && &reply == b"+PONG\r\n"
}

/// Fails with a clear message when the shared Redis is not reachable.
pub async fn require_shared_redis() -> anyhow::Result<()> {
    let url = redis_url();
    let port = url
        .rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').split('/').next())
        .and_then(|p| p.parse::<u16>().ok())
        .unwrap_or(6379);
    if !ping(port).await {
        bail!(
            "no Redis answers at {url}: start one (redis-server --daemonize yes) or set KLINGQ_TEST_REDIS_URL"
        );
    }
    Ok(())
}
