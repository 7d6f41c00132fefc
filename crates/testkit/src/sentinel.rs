//! A real Redis Sentinel setup for tests: a primary (AOF fsynced on every write), its replica and
//! three sentinels (quorum 2) on free loopback ports, each in a folder of its own (Sentinel
//! rewrites its config file), all killed when the [`RedisSentinel`] drops.
//! [`RedisSentinel::start_tls`] starts the same speaking TLS only: to clients, between the
//! sentinels, from the sentinels to the data nodes, and for replication.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};

use crate::cluster::{
    DURABLE_DATA_ARGS, Processes, Reply, info_field, pipeline_over, role_over, wait_until,
};
use crate::tls::TlsFiles;

/// The name the sentinels monitor the primary under.
pub const MASTER_NAME: &str = "mymaster";
/// `down-after-milliseconds`: how long the primary must be unreachable to count as down.
pub const DOWN_AFTER: Duration = Duration::from_millis(2000);
/// `failover-timeout`.
pub const FAILOVER_TIMEOUT: Duration = Duration::from_millis(5000);
const SENTINELS: usize = 3;
/// Starting everything and waiting until the sentinels know each other (a loaded 2-core
/// machine).
const START_DEADLINE: Duration = Duration::from_secs(60);
/// Until the sentinels name the promoted replica.
const FAILOVER_DEADLINE: Duration = Duration::from_secs(60);

/// A primary, a replica and three sentinels monitoring them as [`MASTER_NAME`].
pub struct RedisSentinel {
    procs: Processes,
    /// The primary and the replica, as started.
    data_ports: [u16; 2],
    sentinel_ports: Vec<u16>,
    /// Everything speaks TLS only, with these files.
    tls: Option<Arc<TlsFiles>>,
}

impl RedisSentinel {
    /// Starts the primary and its replica and waits until the replica is in sync; then starts
    /// the sentinels and waits until every one names the primary, knows the replica (link up)
    /// and knows the other two sentinels.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(None).await
    }

    /// The same speaking TLS only (a throwaway CA, see [`TlsFiles`]; clients need no
    /// certificate): the data nodes serve TLS only and replicate over TLS
    /// (`--tls-replication yes`), the sentinels serve TLS only and speak TLS to the data nodes
    /// and to each other (`tls-replication yes` in `sentinel.conf`). [`RedisSentinel::url`] is
    /// `rediss+sentinel://…/mymaster#insecure`, [`RedisSentinel::verified_url`] the same
    /// without `#insecure`.
    pub async fn start_tls() -> anyhow::Result<Self> {
        Self::start_with(Some(Arc::new(TlsFiles::generate()?))).await
    }

    async fn start_with(tls: Option<Arc<TlsFiles>>) -> anyhow::Result<Self> {
        let procs = Processes::new("sentinel")?.with_tls(tls.clone());
        let files = tls.as_deref();
        let primary = procs
            .start("primary", false, |port, dir| {
                Ok(data_args(port, dir, None, files))
            })
            .await?;
        let replica = procs
            .start("replica", false, |port, dir| {
                Ok(data_args(port, dir, Some(primary), files))
            })
            .await?;
        // Sentinels learn the replica from the primary's INFO, which they ask at once and then
        // every 10 s: started after the sync, they know it at once.
        wait_until(
            "the replica to sync with the primary",
            START_DEADLINE,
            || replicating(files, primary, replica),
        )
        .await?;
        let mut sentinel_ports = Vec::new();
        for _ in 0..SENTINELS {
            let port = procs
                .start("sentinel", false, |port, dir| {
                    sentinel_args(port, dir, primary, files)
                })
                .await?;
            sentinel_ports.push(port);
        }
        let sentinel = Self {
            procs,
            data_ports: [primary, replica],
            sentinel_ports,
            tls,
        };
        wait_until(
            "the sentinels to know the primary, its replica and each other",
            START_DEADLINE,
            || sentinel.settled(primary, replica),
        )
        .await?;
        Ok(sentinel)
    }

    /// `redis+sentinel://127.0.0.1:S1,127.0.0.1:S2,127.0.0.1:S3/mymaster`; for
    /// [`RedisSentinel::start_tls`] `rediss+sentinel://…/mymaster#insecure` (TLS to the
    /// sentinels and to the primary, certificates not verified: the test CA is in no trust
    /// store).
    pub fn url(&self) -> String {
        match self.tls {
            None => format!("redis+sentinel://{}/{MASTER_NAME}", self.hosts()),
            Some(_) => format!("rediss+sentinel://{}/{MASTER_NAME}#insecure", self.hosts()),
        }
    }

    /// For [`RedisSentinel::start_tls`]: `rediss+sentinel://…/mymaster`, which verifies the
    /// certificates of the sentinels and of the primary (a client must trust
    /// [`TlsFiles::ca_file`], e.g. through `SSL_CERT_FILE`, which the redis crate's rustls roots
    /// are loaded from). `None` for a plain setup.
    pub fn verified_url(&self) -> Option<String> {
        self.tls
            .as_ref()
            .map(|_| format!("rediss+sentinel://{}/{MASTER_NAME}", self.hosts()))
    }

    /// The CA and certificates of a setup started with [`RedisSentinel::start_tls`].
    pub fn tls_files(&self) -> Option<&TlsFiles> {
        self.tls.as_deref()
    }

    /// `127.0.0.1:S1,127.0.0.1:S2,127.0.0.1:S3`
    fn hosts(&self) -> String {
        self.sentinel_ports
            .iter()
            .map(|port| format!("127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn sentinel_ports(&self) -> Vec<u16> {
        self.sentinel_ports.clone()
    }

    /// The primary's port, as the first sentinel that answers names it.
    pub async fn primary_port(&self) -> anyhow::Result<u16> {
        let mut errors = Vec::new();
        for sentinel in &self.sentinel_ports {
            match primary_named_by(self.tls.as_deref(), *sentinel).await {
                Ok(port) => return Ok(port),
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
        bail!("no sentinel names the primary: {}", errors.join("; "))
    }

    /// `redis://127.0.0.1:PORT` of the current primary (`rediss://127.0.0.1:PORT/#insecure`
    /// for [`RedisSentinel::start_tls`]).
    pub async fn primary_url(&self) -> anyhow::Result<String> {
        let port = self.primary_port().await?;
        Ok(match self.tls {
            None => format!("redis://127.0.0.1:{port}"),
            Some(_) => format!("rediss://127.0.0.1:{port}/#insecure"),
        })
    }

    /// SIGKILLs the current primary (as a crash would: no save) and returns its port.
    pub async fn kill_primary(&self) -> anyhow::Result<u16> {
        let port = self.primary_port().await?;
        if !self.data_ports.contains(&port) {
            bail!("the sentinels name 127.0.0.1:{port}, not a server started here");
        }
        self.procs.kill(port).await?;
        Ok(port)
    }

    /// Waits (up to 60 s) until every sentinel names the same primary other than `old` and that
    /// node answers `ROLE` as a master. Returns its port.
    pub async fn wait_failover(&self, old: u16) -> anyhow::Result<u16> {
        wait_until(
            &format!("the sentinels to promote a replica of 127.0.0.1:{old}"),
            FAILOVER_DEADLINE,
            || self.failed_over(old),
        )
        .await
    }

    /// Starts a killed data node again on its port (as an operator or an orchestrator would):
    /// the sentinels turn it into a replica of the current primary. Waits (up to 60 s) until it
    /// is in sync with that primary.
    pub async fn restart_node(&self, port: u16) -> anyhow::Result<()> {
        self.procs.restart(port).await?;
        let primary = self.primary_port().await?;
        wait_until(
            &format!("127.0.0.1:{port} to replicate 127.0.0.1:{primary}"),
            FAILOVER_DEADLINE,
            || replicating(self.tls.as_deref(), primary, port),
        )
        .await?;
        Ok(())
    }

    async fn settled(&self, primary: u16, replica: u16) -> Result<(), String> {
        replicating(self.tls.as_deref(), primary, replica).await?;
        for sentinel in &self.sentinel_ports {
            let replies = self
                .procs
                .pipeline(
                    *sentinel,
                    &[
                        &["SENTINEL", "get-master-addr-by-name", MASTER_NAME],
                        &["SENTINEL", "master", MASTER_NAME],
                        &["SENTINEL", "replicas", MASTER_NAME],
                    ],
                )
                .await
                .map_err(|e| format!("{e:#}"))?;
            let [addr, master, replicas]: [Reply; 3] = replies
                .try_into()
                .map_err(|_| "expected 3 replies".to_owned())?;
            let named = addr_port(addr).map_err(|e| format!("{e:#}"))?;
            if named != primary {
                return Err(format!("sentinel {sentinel} names 127.0.0.1:{named}"));
            }
            let master = fields(master).map_err(|e| format!("{e:#}"))?;
            for (field, want) in [
                ("flags", "master"),
                ("num-other-sentinels", "2"),
                ("num-slaves", "1"),
            ] {
                let seen = master.get(field).map_or("nothing", String::as_str);
                if seen != want {
                    return Err(format!("sentinel {sentinel}: {field} {seen}"));
                }
            }
            let Reply::Array(replicas) = replicas else {
                return Err(format!(
                    "sentinel {sentinel}: unexpected replicas {replicas:?}"
                ));
            };
            let known = replicas
                .into_iter()
                .map(fields)
                .collect::<anyhow::Result<Vec<_>>>()
                .map_err(|e| format!("{e:#}"))?;
            let ready = known.iter().any(|r| {
                r.get("port") == Some(&replica.to_string())
                    && r.get("flags").map(String::as_str) == Some("slave")
                    && r.get("master-link-status").map(String::as_str) == Some("ok")
            });
            if !ready {
                return Err(format!("sentinel {sentinel} sees replicas {known:?}"));
            }
        }
        Ok(())
    }

    async fn failed_over(&self, old: u16) -> Result<u16, String> {
        let mut agreed = None;
        for sentinel in self.procs.live_ports() {
            if !self.sentinel_ports.contains(&sentinel) {
                continue;
            }
            let named = primary_named_by(self.tls.as_deref(), sentinel)
                .await
                .map_err(|e| format!("{e:#}"))?;
            match agreed {
                _ if named == old => {
                    return Err(format!("sentinel {sentinel} still names 127.0.0.1:{old}"));
                }
                Some(first) if first != named => {
                    return Err(format!(
                        "sentinels name 127.0.0.1:{first} and 127.0.0.1:{named}"
                    ));
                }
                _ => agreed = Some(named),
            }
        }
        let primary = agreed.ok_or("no sentinel alive")?;
        match role_over(self.tls.as_deref(), primary).await {
            Ok(role) if role == "master" => Ok(primary),
            Ok(role) => Err(format!("127.0.0.1:{primary} answers ROLE {role}")),
            Err(e) => Err(format!("{e:#}")),
        }
    }
}

/// A primary or (with `replica_of`) a replica, AOF fsynced on every write, no RDB snapshots.
/// With `tls`, it serves TLS only, on `port`, and replicates over TLS.
fn data_args(
    port: u16,
    dir: &Path,
    replica_of: Option<u16>,
    tls: Option<&TlsFiles>,
) -> Vec<OsString> {
    let mut args: Vec<OsString> = match tls {
        None => vec!["--port".into(), port.to_string().into()],
        Some(tls) => {
            let mut args = tls.server_args(port);
            args.extend(["--tls-replication", "yes"].map(OsString::from));
            args
        }
    };
    args.extend(["--bind", "127.0.0.1", "--dir"].map(OsString::from));
    args.push(dir.into());
    args.extend(DURABLE_DATA_ARGS.map(OsString::from));
    if let Some(primary) = replica_of {
        args.extend(["--replicaof", "127.0.0.1", &primary.to_string()].map(OsString::from));
    }
    args
}

/// Writes `dir/sentinel.conf` (Sentinel rewrites it, so each has its own) and returns
/// `[CONF, --sentinel]`. With `tls`, the sentinel serves TLS only, on `port`, and speaks TLS to
/// the data nodes and the other sentinels (`tls-replication yes`), trusting the test CA.
fn sentinel_args(
    port: u16,
    dir: &Path,
    primary: u16,
    tls: Option<&TlsFiles>,
) -> anyhow::Result<Vec<OsString>> {
    let conf = dir.join("sentinel.conf");
    let down_after = DOWN_AFTER.as_millis();
    let failover_timeout = FAILOVER_TIMEOUT.as_millis();
    let listen = match tls {
        None => format!("port {port}\n"),
        Some(tls) => format!(
            "port 0\n\
             tls-port {port}\n\
             tls-cert-file {cert}\n\
             tls-key-file {key}\n\
             tls-ca-cert-file {ca}\n\
             tls-auth-clients no\n\
             tls-replication yes\n",
            cert = tls.cert_file().display(),
            key = tls.key_file().display(),
            ca = tls.ca_file().display(),
        ),
    };
    std::fs::write(
        &conf,
        format!(
            "{listen}\
             bind 127.0.0.1\n\
             dir {dir}\n\
             sentinel monitor {MASTER_NAME} 127.0.0.1 {primary} 2\n\
             sentinel down-after-milliseconds {MASTER_NAME} {down_after}\n\
             sentinel failover-timeout {MASTER_NAME} {failover_timeout}\n",
            dir = dir.display()
        ),
    )
    .with_context(|| format!("writing {}", conf.display()))?;
    Ok(vec![conf.into(), "--sentinel".into()])
}

/// `Ok` once the primary has the replica online and the replica's link is up.
async fn replicating(tls: Option<&TlsFiles>, primary: u16, replica: u16) -> Result<(), String> {
    let info = |port| async move {
        pipeline_over(tls, port, &[&["INFO", "replication"]])
            .await
            .and_then(|mut replies| replies.pop().context("no reply")?.into_text())
            .map_err(|e| format!("{e:#}"))
    };
    let primary_info = info(primary).await?;
    let connected = info_field(&primary_info, "connected_slaves");
    let online = info_field(&primary_info, "slave0").is_some_and(|s| s.contains("state=online"));
    if connected != Some("1") || !online {
        return Err(format!(
            "primary: connected_slaves:{connected:?}, slave0 online: {online}"
        ));
    }
    let replica_info = info(replica).await?;
    let link = info_field(&replica_info, "master_link_status");
    if link != Some("up") {
        return Err(format!("replica: master_link_status:{link:?}"));
    }
    Ok(())
}

/// The port a sentinel names for [`MASTER_NAME`].
async fn primary_named_by(tls: Option<&TlsFiles>, sentinel: u16) -> anyhow::Result<u16> {
    let reply = pipeline_over(
        tls,
        sentinel,
        &[&["SENTINEL", "get-master-addr-by-name", MASTER_NAME]],
    )
    .await?
    .pop()
    .context("no reply")?;
    addr_port(reply).with_context(|| format!("sentinel {sentinel}"))
}

/// The port of a `[host, port]` reply.
fn addr_port(reply: Reply) -> anyhow::Result<u16> {
    match reply.into_texts()?.as_slice() {
        [_, port] => port.parse().context("port"),
        other => bail!("unexpected address {other:?}"),
    }
}

/// A flat `[field, value, …]` reply as a map.
fn fields(reply: Reply) -> anyhow::Result<HashMap<String, String>> {
    let texts = reply.into_texts()?;
    Ok(texts
        .chunks_exact(2)
        .map(|pair| (pair[0].clone(), pair[1].clone()))
        .collect())
}
