//! A private `redis-server` for `klingq demo` when nothing answers at a loopback Redis URL:
//! a child process on 127.0.0.1 (the URL's port when free), its append-only file in the
//! demo's folder, shut down when the demo ends (also on Ctrl-C and on errors).

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use reqwest::Url;

/// How long the server has to answer PING after it starts (a loaded machine is slow).
const START_DEADLINE: Duration = Duration::from_secs(30);
/// How long it has to exit after SHUTDOWN before it is killed.
const STOP_DEADLINE: Duration = Duration::from_secs(10);

/// A `redis://` URL on a loopback host (`localhost`, 127.0.0.0/8, `::1`): the only ones a
/// private server may stand in for.
pub(crate) fn loopback(url: &str) -> Option<Url> {
    let url = Url::parse(url).ok()?;
    if url.scheme() != "redis" {
        return None;
    }
    let host = url
        .host_str()?
        .trim_start_matches('[')
        .trim_end_matches(']');
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    loopback.then_some(url)
}

/// Whether anything accepts a connection at the URL's host and port (not necessarily Redis).
pub(crate) async fn answers(url: &Url) -> bool {
    let host = url
        .host_str()
        .unwrap_or("127.0.0.1")
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = url.port().unwrap_or(6379);
    matches!(
        tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::TcpStream::connect((host, port))
        )
        .await,
        Ok(Ok(_))
    )
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum StartError {
    #[error("redis-server is not installed (not found on PATH)")]
    NotInstalled,
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

/// The running server; dropping it shuts it down.
pub(crate) struct LocalRedis {
    child: Child,
    port: u16,
    /// The URL to connect to: `url` with this host and port, without credentials.
    pub(crate) url: String,
    /// Where its append-only file and log are.
    pub(crate) dir: PathBuf,
}

impl LocalRedis {
    /// Starts `redis-server` on 127.0.0.1 (at `url`'s port when it is free, else a free
    /// port) with its data in `dir`, and waits until it answers PING.
    pub(crate) async fn start(url: &Url, dir: &Path) -> Result<Self, StartError> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let absolute =
            std::path::absolute(dir).with_context(|| format!("resolving {}", dir.display()))?;
        let port = free_port(url.port().unwrap_or(6379)).context("finding a free port")?;
        let log = absolute.join("redis.log");
        let spawned = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--daemonize", "no", "--save", ""])
            // Every write kept across demo runs, as a Redis of one's own would.
            .args(["--appendonly", "yes", "--appendfsync", "everysec"])
            .arg("--dir")
            .arg(&absolute)
            .arg("--logfile")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match spawned {
            Ok(child) => child,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Err(StartError::NotInstalled);
            }
            Err(error) => {
                return Err(anyhow::Error::new(error)
                    .context("starting redis-server")
                    .into());
            }
        };
        let mut local_url = url.clone();
        // A private server has no password; a URL's would be refused ("AUTH called without
        // any password configured").
        let _ = local_url.set_username("");
        let _ = local_url.set_password(None);
        let _ = local_url.set_host(Some("127.0.0.1"));
        let _ = local_url.set_port(Some(port));
        let mut server = Self {
            child,
            port,
            url: local_url.to_string(),
            dir: dir.to_owned(),
        };
        let started = Instant::now();
        loop {
            if ping(port) {
                return Ok(server);
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                let tail = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = tail.lines().rev().take(5).collect();
                return Err(anyhow::anyhow!(
                    "redis-server exited ({status}) before answering on port {port}: {}",
                    tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
                )
                .into());
            }
            if started.elapsed() > START_DEADLINE {
                return Err(anyhow::anyhow!(
                    "redis-server did not answer PING on port {port} within {START_DEADLINE:?} (its log: {})",
                    log.display()
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub(crate) fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for LocalRedis {
    fn drop(&mut self) {
        // SHUTDOWN flushes the append-only file; a server that does not exit is killed.
        if let Ok(mut stream) = TcpStream::connect_timeout(
            &SocketAddr::from((Ipv4Addr::LOCALHOST, self.port)),
            Duration::from_secs(1),
        ) {
            let _ = stream.write_all(b"SHUTDOWN\r\n");
        }
        let deadline = Instant::now() + STOP_DEADLINE;
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `preferred` when nothing listens there, else one the system picks.
fn free_port(preferred: u16) -> std::io::Result<u16> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, preferred))
        .or_else(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
}

/// Whether a Redis answers PING on the loopback port.
fn ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(
        &SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        Duration::from_secs(1),
    ) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let mut reply = [0u8; 7];
    stream.write_all(b"PING\r\n").is_ok()
        && stream.read_exact(&mut reply).is_ok()
        && &reply == b"+PONG\r\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_loopback_urls_get_a_private_server() {
        for url in [
            "redis://127.0.0.1:6379",
            "redis://localhost/0",
            "redis://:secret@127.0.0.2:7000/1",
            "redis://[::1]:6379",
        ] {
            assert!(loopback(url).is_some(), "{url}");
        }
        for url in [
            "redis://10.0.0.5:6379",
            "redis://redis.internal:6379",
            "rediss://127.0.0.1:6379",
            "redis+sentinel://127.0.0.1:26379/mymaster",
            "not a url",
        ] {
            assert!(loopback(url).is_none(), "{url}");
        }
    }
}
