//! A real Redis Cluster for tests: three primaries and three replicas of `redis-server` on free
//! loopback ports, each in a folder of its own, killed when the [`RedisCluster`] drops.
//!
//! It also holds what [`crate::sentinel`] shares: starting `redis-server` processes on free
//! ports (`Processes`), and a tiny RESP client (`pipeline_over`, `command_over`) so the testkit
//! needs neither the `redis` crate nor a `redis-cli` per poll. A TLS cluster
//! ([`RedisCluster::start_tls`]) is polled through `openssl s_client` instead of a plain
//! `TcpStream`: same requests, same parser.
//!
//! Ports come from below the kernel's ephemeral range when it allows (10000..20000, so a
//! node's cluster bus, port + 10000, lies below it too): outgoing connections (the nodes'
//! own links, every client in the test) then never take a port a node needs, also when a killed
//! node is restarted on its old port. A port taken anyway between choosing it and the server
//! binding it makes the server exit, and it is started again on another one.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsString;
use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use crate::tls::TlsFiles;
use crate::wait_for;

/// Hash slots in a Redis Cluster.
pub const SLOTS: u16 = 16384;
/// Every data node (cluster or Sentinel): AOF fsynced on every write, no RDB snapshots, and a
/// replica that syncs at once instead of after the default 5 s wait for more replicas.
pub(crate) const DURABLE_DATA_ARGS: [&str; 8] = [
    "--appendonly",
    "yes",
    "--appendfsync",
    "always",
    "--save",
    "",
    "--repl-diskless-sync-delay",
    "0",
];

/// `cluster-node-timeout` of every node: a dead primary's replica takes over a few seconds
/// after it dies.
pub const NODE_TIMEOUT: Duration = Duration::from_millis(2000);
const PRIMARIES: usize = 3;
const NODES: usize = 2 * PRIMARIES;
/// Starting the nodes, joining them and waiting until they agree (a loaded 2-core machine).
const START_DEADLINE: Duration = Duration::from_secs(60);
/// Until the killed primary's replica owns its slots and every survivor says so.
const FAILOVER_DEADLINE: Duration = Duration::from_secs(60);
/// Until one `redis-server` answers PING after it was started.
const SPAWN_DEADLINE: Duration = Duration::from_secs(30);
/// Ports tried for one server before giving up.
const SPAWN_TRIES: usize = 5;
/// One exchange with one server.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// Six `redis-server --cluster-enabled yes` (3 primaries, 3 replicas, AOF fsynced on every
/// write), joined and agreeing on all 16384 slots, killed on drop.
pub struct RedisCluster {
    procs: Processes,
}

impl RedisCluster {
    /// Starts the six nodes, joins them with `redis-cli --cluster create` and waits until every
    /// node reports `cluster_state:ok`, all slots are assigned, every node sees the same
    /// primaries, replicas and slots, and every replica's link to its primary is up.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(None).await
    }

    /// The same cluster speaking TLS only (a throwaway CA, see [`TlsFiles`]): clients, the
    /// cluster bus (`--tls-cluster yes`, bus port = TLS port + 10000) and replication
    /// (`--tls-replication yes`). [`RedisCluster::seed_url`] and [`RedisCluster::node_urls`]
    /// are `rediss://127.0.0.1:PORT/#insecure` URLs.
    pub async fn start_tls() -> anyhow::Result<Self> {
        Self::start_with(Some(Arc::new(TlsFiles::generate()?))).await
    }

    async fn start_with(tls: Option<Arc<TlsFiles>>) -> anyhow::Result<Self> {
        let procs = Processes::new("cluster")?.with_tls(tls.clone());
        for _ in 0..NODES {
            procs
                .start("node", true, |port, dir| {
                    cluster_node_args(port, dir, tls.as_deref())
                })
                .await?;
        }
        let cluster = Self { procs };
        let ports = cluster.procs.live_ports();
        let mut create = Command::new("redis-cli");
        if let Some(tls) = &tls {
            create.args(tls.redis_cli_args());
        }
        create.args(["--cluster", "create"]);
        create.args(ports.iter().map(|port| format!("127.0.0.1:{port}")));
        create
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let output = tokio::time::timeout(START_DEADLINE, create.output())
            .await
            .map_err(|_| anyhow!("redis-cli --cluster create took over {START_DEADLINE:?}"))?
            .context("running redis-cli --cluster create")?;
        if !output.status.success() {
            bail!(
                "redis-cli --cluster create failed ({}): {}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        cluster.wait_healthy(START_DEADLINE).await?;
        Ok(cluster)
    }

    /// A node to enter the cluster through (the first one alive).
    pub fn seed_url(&self) -> String {
        let port = self.procs.live_ports().first().copied().unwrap_or_default();
        self.url(port)
    }

    /// Every node alive, primaries and replicas.
    pub fn node_urls(&self) -> Vec<String> {
        self.procs
            .live_ports()
            .into_iter()
            .map(|port| self.url(port))
            .collect()
    }

    /// For [`RedisCluster::start_tls`]: `rediss://127.0.0.1:PORT` of the first node alive, which
    /// verifies the certificates (a client must trust [`TlsFiles::ca_file`], e.g. through
    /// `SSL_CERT_FILE`, which the redis crate's rustls roots are loaded from). `None` for a plain
    /// cluster.
    pub fn verified_seed_url(&self) -> Option<String> {
        let port = self.procs.live_ports().first().copied().unwrap_or_default();
        self.procs
            .tls
            .as_ref()
            .map(|_| format!("rediss://127.0.0.1:{port}"))
    }

    /// The CA and certificates of a cluster started with [`RedisCluster::start_tls`].
    pub fn tls_files(&self) -> Option<&TlsFiles> {
        self.procs.tls.as_deref()
    }

    /// `redis://127.0.0.1:PORT`, or `rediss://127.0.0.1:PORT/#insecure` for a TLS cluster (the
    /// redis crate's fragment for not verifying the certificate: the test CA is in no root
    /// store; it needs the redis crate's `tls-rustls-insecure` feature, see
    /// [`RedisCluster::verified_seed_url`] for a URL that does not).
    fn url(&self, port: u16) -> String {
        match self.procs.tls {
            Some(_) => format!("rediss://127.0.0.1:{port}/#insecure"),
            None => url(port),
        }
    }

    /// The ports of the primaries alive that own slots now.
    pub async fn primary_ports(&self) -> anyhow::Result<Vec<u16>> {
        let views = self.views().await?;
        let (_, view) = views.first().context("no cluster node answers")?;
        Ok(view
            .iter()
            .filter(|node| node.is_master() && !node.is_failing() && !node.slots.is_empty())
            .map(|node| node.port)
            .filter(|port| self.procs.is_live(*port))
            .collect())
    }

    /// The port of the primary that owns `slot` now: of the primaries the nodes alive name for
    /// it, the one with the highest config epoch (how the cluster itself settles it).
    pub async fn owner_of_slot(&self, slot: u16) -> anyhow::Result<u16> {
        self.views()
            .await?
            .iter()
            .flat_map(|(_, view)| view.iter())
            .filter(|node| node.is_master() && node.owns(slot))
            .max_by_key(|node| node.epoch)
            .map(|node| node.port)
            .with_context(|| format!("no node names an owner of slot {slot}"))
    }

    /// A primary alive that does not own `slot`: entering the cluster through it gives `MOVED`.
    pub async fn url_not_owning(&self, slot: u16) -> anyhow::Result<String> {
        let owner = self.owner_of_slot(slot).await?;
        self.primary_ports()
            .await?
            .into_iter()
            .find(|port| *port != owner)
            .map(|port| self.url(port))
            .with_context(|| format!("no primary other than 127.0.0.1:{owner} is alive"))
    }

    /// SIGKILLs the primary owning `slot` (as a crash would: no save) and returns its port.
    pub async fn kill_primary_of_slot(&self, slot: u16) -> anyhow::Result<u16> {
        let owner = self.owner_of_slot(slot).await?;
        self.kill_node(owner).await?;
        Ok(owner)
    }

    /// SIGKILLs one node.
    pub async fn kill_node(&self, port: u16) -> anyhow::Result<()> {
        self.procs.kill(port).await
    }

    /// Waits (up to 60 s) until a node other than `old_port` is the primary for `slot`, every
    /// node alive says so and reports `cluster_state:ok`, and that node answers `ROLE` as a
    /// master. Returns its port.
    pub async fn wait_failover(&self, slot: u16, old_port: u16) -> anyhow::Result<u16> {
        wait_until(
            &format!("slot {slot} to fail over from 127.0.0.1:{old_port}"),
            FAILOVER_DEADLINE,
            || self.failed_over(slot, old_port),
        )
        .await
    }

    /// Starts a killed node again on its port, with its folder (`nodes.conf`, AOF): a primary
    /// that was failed over comes back as a replica of its successor. Waits until the whole
    /// cluster is healthy again, that node's replication link included.
    pub async fn restart_node(&self, port: u16) -> anyhow::Result<()> {
        self.procs.restart(port).await?;
        self.wait_healthy(FAILOVER_DEADLINE).await
    }

    /// `total_commands_processed` of every node alive (`INFO stats`), by port.
    pub async fn commands_per_node(&self) -> anyhow::Result<Vec<(u16, u64)>> {
        let mut counts = Vec::new();
        for port in self.procs.live_ports() {
            let info = self
                .procs
                .command(port, &["INFO", "stats"])
                .await?
                .into_text()?;
            let count = info_field(&info, "total_commands_processed")
                .and_then(|count| count.parse().ok())
                .with_context(|| format!("no total_commands_processed from 127.0.0.1:{port}"))?;
            counts.push((port, count));
        }
        Ok(counts)
    }

    /// `CONFIG RESETSTAT` on every node alive.
    pub async fn reset_stats(&self) -> anyhow::Result<()> {
        for port in self.procs.live_ports() {
            self.procs.command(port, &["CONFIG", "RESETSTAT"]).await?;
        }
        Ok(())
    }

    /// `CLUSTER NODES` of every node alive.
    async fn views(&self) -> anyhow::Result<Vec<(u16, Vec<ClusterNode>)>> {
        let mut views = Vec::new();
        for port in self.procs.live_ports() {
            let text = self
                .procs
                .command(port, &["CLUSTER", "NODES"])
                .await?
                .into_text()?;
            views.push((port, parse_cluster_nodes(&text)?));
        }
        Ok(views)
    }

    async fn wait_healthy(&self, timeout: Duration) -> anyhow::Result<()> {
        wait_until(
            "every cluster node to be up and agree on the slots",
            timeout,
            || self.healthy(),
        )
        .await
    }

    /// `Ok` when all six nodes are alive, report `cluster_state:ok` with every slot assigned and
    /// served, see the same three primaries (with their slots) and three replicas (one per
    /// primary) without failure flags, and every replica's link to its primary is up; else why
    /// not.
    async fn healthy(&self) -> Result<(), String> {
        let live = self.procs.live_ports();
        if live.len() != NODES {
            return Err(format!("{} of {NODES} nodes alive", live.len()));
        }
        let mut agreed: Option<(u16, Topology)> = None;
        for port in live {
            let replies = self
                .procs
                .pipeline(
                    port,
                    &[
                        &["CLUSTER", "INFO"],
                        &["CLUSTER", "NODES"],
                        &["INFO", "replication"],
                    ],
                )
                .await
                .map_err(|e| format!("{e:#}"))?;
            let [info, nodes, replication] = texts(replies).map_err(|e| format!("{e:#}"))?;
            for (field, want) in [
                ("cluster_state", "ok"),
                ("cluster_slots_assigned", "16384"),
                ("cluster_slots_ok", "16384"),
                ("cluster_known_nodes", "6"),
            ] {
                let seen = info_field(&info, field).unwrap_or("nothing");
                if seen != want {
                    return Err(format!("127.0.0.1:{port} reports {field}:{seen}"));
                }
            }
            let view = parse_cluster_nodes(&nodes).map_err(|e| format!("{e:#}"))?;
            if let Some(node) = view
                .iter()
                .find(|node| node.is_failing() || node.flags.iter().any(|f| f == "handshake"))
            {
                return Err(format!("127.0.0.1:{port} sees {node:?}"));
            }
            if let Some(node) = view.iter().find(|node| !node.connected) {
                return Err(format!("127.0.0.1:{port} has no link to {node:?}"));
            }
            let topology = Topology::of(&view).map_err(|e| format!("127.0.0.1:{port}: {e}"))?;
            if topology.is_replica(port)
                && info_field(&replication, "master_link_status") != Some("up")
            {
                return Err(format!("127.0.0.1:{port}: replication link not up yet"));
            }
            match &agreed {
                None => agreed = Some((port, topology)),
                Some((first, seen)) if *seen != topology => {
                    return Err(format!(
                        "127.0.0.1:{first} sees {seen:?}, 127.0.0.1:{port} sees {topology:?}"
                    ));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// The new owner of `slot` once every node alive names the same primary other than
    /// `old_port`, reports `cluster_state:ok`, and that primary answers `ROLE` as a master.
    async fn failed_over(&self, slot: u16, old_port: u16) -> Result<u16, String> {
        let mut owner = None;
        for port in self.procs.live_ports() {
            let replies = self
                .procs
                .pipeline(port, &[&["CLUSTER", "INFO"], &["CLUSTER", "NODES"]])
                .await
                .map_err(|e| format!("{e:#}"))?;
            let [info, nodes] = texts(replies).map_err(|e| format!("{e:#}"))?;
            let state = info_field(&info, "cluster_state").unwrap_or("nothing");
            if state != "ok" {
                return Err(format!("127.0.0.1:{port} reports cluster_state:{state}"));
            }
            let view = parse_cluster_nodes(&nodes).map_err(|e| format!("{e:#}"))?;
            let named = view
                .iter()
                .find(|node| node.is_master() && !node.is_failing() && node.owns(slot))
                .map(|node| node.port);
            match (named, owner) {
                (None, _) => return Err(format!("127.0.0.1:{port} names no owner of {slot}")),
                (Some(named), _) if named == old_port => {
                    return Err(format!("127.0.0.1:{port} still names 127.0.0.1:{old_port}"));
                }
                (Some(named), Some(first)) if named != first => {
                    return Err(format!(
                        "nodes name 127.0.0.1:{first} and 127.0.0.1:{named}"
                    ));
                }
                (Some(named), _) => owner = Some(named),
            }
        }
        let owner = owner.ok_or("no node alive")?;
        match role_over(self.procs.tls.as_deref(), owner).await {
            Ok(role) if role == "master" => Ok(owner),
            Ok(role) => Err(format!("127.0.0.1:{owner} answers ROLE {role}")),
            Err(e) => Err(format!("{e:#}")),
        }
    }
}

fn url(port: u16) -> String {
    format!("redis://127.0.0.1:{port}")
}

/// With `tls`, the node serves TLS only, on `port` (the plain port is closed), and speaks TLS on
/// the cluster bus and for replication too.
fn cluster_node_args(
    port: u16,
    dir: &Path,
    tls: Option<&TlsFiles>,
) -> anyhow::Result<Vec<OsString>> {
    let mut args: Vec<OsString> = match tls {
        None => vec!["--port".into(), port.to_string().into()],
        Some(tls) => {
            let mut args = tls.server_args(port);
            args.extend(["--tls-cluster", "yes", "--tls-replication", "yes"].map(OsString::from));
            args
        }
    };
    args.extend(["--bind", "127.0.0.1", "--dir"].map(OsString::from));
    args.push(dir.into());
    args.extend(
        [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            &NODE_TIMEOUT.as_millis().to_string(),
        ]
        .map(OsString::from),
    );
    args.extend(DURABLE_DATA_ARGS.map(OsString::from));
    Ok(args)
}

/// The hash slot of `key` (Redis Cluster spec): CRC16/XMODEM of the hash tag (what lies between
/// the first `{` and the next `}`, when not empty), else of the whole key, modulo 16384.
pub fn slot_of(key: &str) -> u16 {
    let key = key.as_bytes();
    let hashed = key
        .iter()
        .position(|b| *b == b'{')
        .and_then(|open| {
            let tag = &key[open + 1..];
            tag.iter()
                .position(|b| *b == b'}')
                .filter(|close| *close > 0)
                .map(|close| &tag[..close])
        })
        .unwrap_or(key);
    crc16_xmodem(hashed) % SLOTS
}

fn crc16_xmodem(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for byte in bytes {
        crc ^= u16::from(*byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// One line of `CLUSTER NODES`.
#[derive(Debug)]
struct ClusterNode {
    id: String,
    port: u16,
    flags: Vec<String>,
    master_id: Option<String>,
    epoch: u64,
    connected: bool,
    /// Inclusive ranges; importing/migrating entries (`[…]`) are left out.
    slots: Vec<(u16, u16)>,
}

impl ClusterNode {
    fn is_master(&self) -> bool {
        self.flags.iter().any(|f| f == "master")
    }

    fn is_failing(&self) -> bool {
        self.flags
            .iter()
            .any(|f| matches!(f.as_str(), "fail" | "fail?" | "noaddr"))
    }

    fn owns(&self, slot: u16) -> bool {
        self.slots
            .iter()
            .any(|(first, last)| (*first..=*last).contains(&slot))
    }
}

/// `<id> <ip:port@cport[,hostname]> <flags> <master> <ping-sent> <pong-recv> <config-epoch>
/// <link-state> <slot> <slot> …`
fn parse_cluster_nodes(text: &str) -> anyhow::Result<Vec<ClusterNode>> {
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [id, addr, flags, master, _, _, epoch, link, slots @ ..] = fields.as_slice() else {
                bail!("unexpected CLUSTER NODES line {line:?}");
            };
            let port = addr
                .split(['@', ','])
                .next()
                .and_then(|host_port| host_port.rsplit(':').next())
                .and_then(|port| port.parse().ok())
                .with_context(|| format!("no port in CLUSTER NODES line {line:?}"))?;
            let slots = slots
                .iter()
                .filter(|slot| !slot.starts_with('['))
                .map(|slot| {
                    let (first, last) = slot.split_once('-').unwrap_or((slot, slot));
                    Ok((first.parse()?, last.parse()?))
                })
                .collect::<anyhow::Result<_>>()
                .with_context(|| format!("bad slots in CLUSTER NODES line {line:?}"))?;
            Ok(ClusterNode {
                id: (*id).to_owned(),
                port,
                flags: flags.split(',').map(str::to_owned).collect(),
                master_id: (*master != "-").then(|| (*master).to_owned()),
                epoch: epoch.parse().context("config epoch")?,
                connected: *link == "connected",
                slots,
            })
        })
        .collect()
}

/// What a node sees: primaries with their slots, replicas with their primary (by port).
#[derive(Debug, PartialEq, Eq)]
struct Topology {
    primaries: BTreeMap<u16, Vec<(u16, u16)>>,
    replicas: BTreeMap<u16, u16>,
}

impl Topology {
    /// Fails unless there are three primaries covering all slots and one replica each.
    fn of(view: &[ClusterNode]) -> Result<Self, String> {
        let port_of: HashMap<&str, u16> = view
            .iter()
            .map(|node| (node.id.as_str(), node.port))
            .collect();
        let mut topology = Topology {
            primaries: BTreeMap::new(),
            replicas: BTreeMap::new(),
        };
        for node in view {
            if node.is_master() {
                let mut slots = node.slots.clone();
                slots.sort_unstable();
                topology.primaries.insert(node.port, slots);
            } else {
                let master = node
                    .master_id
                    .as_deref()
                    .and_then(|id| port_of.get(id))
                    .ok_or_else(|| format!("replica {node:?} has no known primary"))?;
                topology.replicas.insert(node.port, *master);
            }
        }
        let covered: u32 = topology
            .primaries
            .values()
            .flatten()
            .map(|(first, last)| u32::from(last - first) + 1)
            .sum();
        let served: BTreeSet<u16> = topology.replicas.values().copied().collect();
        let primaries: BTreeSet<u16> = topology.primaries.keys().copied().collect();
        if primaries.len() != PRIMARIES
            || covered != u32::from(SLOTS)
            || topology.replicas.len() != PRIMARIES
            || served != primaries
        {
            return Err(format!("not 3 primaries with a replica each: {topology:?}"));
        }
        Ok(topology)
    }

    fn is_replica(&self, port: u16) -> bool {
        self.replicas.contains_key(&port)
    }
}

/// The first element of `ROLE` (`master`, `slave` or `sentinel`), over TLS when `tls`.
pub(crate) async fn role_over(tls: Option<&TlsFiles>, port: u16) -> anyhow::Result<String> {
    match command_over(tls, port, &["ROLE"]).await? {
        Reply::Array(items) => items
            .into_iter()
            .next()
            .context("empty ROLE reply")?
            .into_text(),
        other => bail!("unexpected ROLE reply {other:?}"),
    }
}

/// The value of `field` in an `INFO` reply.
pub(crate) fn info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines().find_map(|line| {
        line.strip_prefix(field)
            .and_then(|rest| rest.strip_prefix(':'))
            .map(str::trim)
    })
}

/// Polls `check` (see [`wait_for`]) until it returns `Ok`; on timeout the error also says
/// what `check` saw last.
pub(crate) async fn wait_until<T, F, Fut>(
    what: &str,
    timeout: Duration,
    mut check: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let last = RefCell::new(String::from("nothing yet"));
    wait_for(what, timeout, || {
        let checked = check();
        let last = &last;
        async move {
            match checked.await {
                Ok(value) => Some(value),
                Err(why) => {
                    *last.borrow_mut() = why;
                    None
                }
            }
        }
    })
    .await
    .map_err(|e| anyhow!("{e}; last seen: {}", last.borrow()))
}

/// `redis-server` processes of one topology, by port, each in a folder of its own under one
/// temporary folder; all killed, and the folder removed, on drop.
pub(crate) struct Processes {
    root: PathBuf,
    servers: Mutex<BTreeMap<u16, Server>>,
    /// The servers speak TLS only, with these files (kept as long as the servers may restart).
    tls: Option<Arc<TlsFiles>>,
}

struct Server {
    dir: PathBuf,
    args: Vec<OsString>,
    /// `None` once killed.
    child: Option<Child>,
}

enum Spawned {
    Ready(Child),
    Exited(String),
}

impl Processes {
    pub(crate) fn new(kind: &str) -> anyhow::Result<Self> {
        let root = std::env::temp_dir().join(format!(
            "klingq-{kind}-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        Ok(Self {
            root,
            servers: Mutex::new(BTreeMap::new()),
            tls: None,
        })
    }

    /// Talks to the servers over TLS with `tls` (when `Some`): their arguments must make them
    /// serve TLS only, on the port they are given.
    pub(crate) fn with_tls(mut self, tls: Option<Arc<TlsFiles>>) -> Self {
        self.tls = tls;
        self
    }

    /// [`command_over`] to one of these servers (over TLS if they speak it).
    pub(crate) async fn command(&self, port: u16, args: &[&str]) -> anyhow::Result<Reply> {
        command_over(self.tls.as_deref(), port, args).await
    }

    /// [`pipeline_over`] to one of these servers (over TLS if they speak it).
    pub(crate) async fn pipeline(
        &self,
        port: u16,
        commands: &[&[&str]],
    ) -> anyhow::Result<Vec<Reply>> {
        pipeline_over(self.tls.as_deref(), port, commands).await
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<u16, Server>> {
        self.servers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts `redis-server ARGS` (from `args(port, folder)`, which may also write a config file
    /// there) on a free port, and its bus port (+10000) free too when `bus`; waits until it
    /// answers PING. Another port is tried when the server exits first (its port was taken
    /// meanwhile).
    pub(crate) async fn start(
        &self,
        name: &str,
        bus: bool,
        args: impl Fn(u16, &Path) -> anyhow::Result<Vec<OsString>>,
    ) -> anyhow::Result<u16> {
        let mut exits = Vec::new();
        for _ in 0..SPAWN_TRIES {
            let taken: BTreeSet<u16> = self.lock().keys().copied().collect();
            let port = pick_port(bus, &taken)?;
            let dir = self.root.join(format!("{name}-{port}"));
            std::fs::create_dir_all(&dir)?;
            let args = args(port, &dir)?;
            match spawn(port, &dir, &args, self.tls.as_deref()).await? {
                Spawned::Ready(child) => {
                    let server = Server {
                        dir,
                        args,
                        child: Some(child),
                    };
                    self.lock().insert(port, server);
                    return Ok(port);
                }
                Spawned::Exited(why) => {
                    exits.push(format!("port {port}: {why}"));
                    let _ = std::fs::remove_dir_all(&dir);
                }
            }
        }
        bail!("redis-server ({name}) did not start: {}", exits.join("; "))
    }

    /// Ports of the servers alive, in order.
    pub(crate) fn live_ports(&self) -> Vec<u16> {
        self.lock()
            .iter()
            .filter(|(_, server)| server.child.is_some())
            .map(|(port, _)| *port)
            .collect()
    }

    pub(crate) fn is_live(&self, port: u16) -> bool {
        self.lock()
            .get(&port)
            .is_some_and(|server| server.child.is_some())
    }

    /// SIGKILLs the server on `port` and waits until it is gone.
    pub(crate) async fn kill(&self, port: u16) -> anyhow::Result<()> {
        let child = self
            .lock()
            .get_mut(&port)
            .and_then(|server| server.child.take());
        let mut child = child.with_context(|| format!("no server alive on port {port}"))?;
        child
            .kill()
            .await
            .with_context(|| format!("killing redis-server on port {port}"))
    }

    /// Starts a killed server again, same port, folder and arguments.
    pub(crate) async fn restart(&self, port: u16) -> anyhow::Result<()> {
        let (dir, args) = match self.lock().get(&port) {
            Some(server) if server.child.is_none() => (server.dir.clone(), server.args.clone()),
            Some(_) => bail!("the server on port {port} is alive"),
            None => bail!("no server was started on port {port}"),
        };
        match spawn(port, &dir, &args, self.tls.as_deref()).await? {
            Spawned::Ready(child) => {
                if let Some(server) = self.lock().get_mut(&port) {
                    server.child = Some(child);
                }
                Ok(())
            }
            Spawned::Exited(why) => bail!("redis-server did not restart on port {port}: {why}"),
        }
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        let servers = std::mem::take(
            self.servers
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner),
        );
        let mut children: Vec<Child> = servers.into_values().filter_map(|s| s.child).collect();
        for child in &mut children {
            let _ = child.start_kill();
        }
        // Reap them (a SIGKILLed process is gone within milliseconds) so none writes into the
        // folder while it is removed.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < deadline
            && children
                .iter_mut()
                .any(|child| matches!(child.try_wait(), Ok(None)))
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// A port that is free now, with `port + 10000` free too when `bus`. Below the kernel's
/// ephemeral range when it starts at 30000 or above (see the module docs), else any free port
/// whose bus port fits.
fn pick_port(bus: bool, taken: &BTreeSet<u16>) -> anyhow::Result<u16> {
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let free = |port: u16| TcpListener::bind(("127.0.0.1", port)).is_ok();
    for _ in 0..10_000 {
        let port = if ephemeral_start >= 30_000 {
            rand::random_range(10_000..20_000)
        } else {
            crate::redis::free_port()
        };
        if port < 55_535 && !taken.contains(&port) && free(port) && (!bus || free(port + 10_000)) {
            return Ok(port);
        }
    }
    bail!("no free loopback port (with a free bus port: {bus})")
}

/// Starts `redis-server ARGS` in `dir` (its output goes to `dir/redis.log`) and waits until it
/// answers PING on `port` (over TLS with `tls`), or exits.
async fn spawn(
    port: u16,
    dir: &Path,
    args: &[OsString],
    tls: Option<&TlsFiles>,
) -> anyhow::Result<Spawned> {
    let log_path = dir.join("redis.log");
    let log = File::options()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let child = Command::new("redis-server")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .context("starting redis-server (install it: apt-get install redis-server)")?;
    let child = RefCell::new(child);
    let exited: Option<ExitStatus> = wait_for(
        &format!("redis-server on port {port} to answer PING"),
        SPAWN_DEADLINE,
        || {
            let child = &child;
            async move {
                if let Ok(Some(status)) = child.borrow_mut().try_wait() {
                    return Some(Some(status));
                }
                let pong = command_over(tls, port, &["PING"]).await.is_ok();
                pong.then_some(None)
            }
        },
    )
    .await
    .with_context(|| log_tail(&log_path))?;
    Ok(match exited {
        None => Spawned::Ready(child.into_inner()),
        Some(status) => Spawned::Exited(format!("exited ({status}): {}", log_tail(&log_path))),
    })
}

fn log_tail(path: &Path) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    format!(
        "{} ends with: {}",
        path.display(),
        lines[lines.len().saturating_sub(5)..].join(" | ")
    )
}

/// A RESP2 reply. Error replies at the top level are errors of [`command_over`] and
/// [`pipeline_over`].
#[derive(Debug)]
pub(crate) enum Reply {
    /// A simple or bulk string.
    Text(String),
    Int(#[allow(dead_code, reason = "only read in tests and shown in errors")] i64),
    Nil,
    Array(Vec<Reply>),
    /// An error nested in an array.
    Error(String),
}

impl Reply {
    pub(crate) fn into_text(self) -> anyhow::Result<String> {
        match self {
            Reply::Text(text) => Ok(text),
            other => bail!("expected a string reply, got {other:?}"),
        }
    }

    pub(crate) fn into_texts(self) -> anyhow::Result<Vec<String>> {
        match self {
            Reply::Array(items) => items.into_iter().map(Reply::into_text).collect(),
            other => bail!("expected an array of strings, got {other:?}"),
        }
    }
}

fn texts<const N: usize>(replies: Vec<Reply>) -> anyhow::Result<[String; N]> {
    let texts = replies
        .into_iter()
        .map(Reply::into_text)
        .collect::<anyhow::Result<Vec<_>>>()?;
    texts
        .try_into()
        .map_err(|texts: Vec<String>| anyhow!("expected {N} replies, got {}", texts.len()))
}

/// Sends one command to `127.0.0.1:port` on a connection of its own, over TLS when `tls`.
pub(crate) async fn command_over(
    tls: Option<&TlsFiles>,
    port: u16,
    args: &[&str],
) -> anyhow::Result<Reply> {
    let mut replies = pipeline_over(tls, port, &[args]).await?;
    replies.pop().context("no reply")
}

/// Sends `commands` on one connection and reads their replies; an error reply is an error.
/// Over TLS when `tls` (through `openssl s_client`, one process per call).
pub(crate) async fn pipeline_over(
    tls: Option<&TlsFiles>,
    port: u16,
    commands: &[&[&str]],
) -> anyhow::Result<Vec<Reply>> {
    let names = commands
        .iter()
        .map(|args| args.join(" "))
        .collect::<Vec<_>>()
        .join("; ");
    let mut request = Vec::new();
    for args in commands {
        request.extend(format!("*{}\r\n", args.len()).as_bytes());
        for arg in *args {
            request.extend(format!("${}\r\n", arg.len()).as_bytes());
            request.extend(arg.as_bytes());
            request.extend(b"\r\n");
        }
    }
    let exchange = async {
        match tls {
            None => {
                let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
                stream.write_all(&request).await?;
                read_replies(&mut stream, commands.len()).await
            }
            Some(tls) => {
                // Killed on drop, also when the exchange times out.
                let mut client = tls.connect(port)?;
                let mut input = client.stdin.take().context("no stdin")?;
                let mut output = client.stdout.take().context("no stdout")?;
                input.write_all(&request).await?;
                let replies = read_replies(&mut output, commands.len()).await;
                let _ = client.start_kill();
                let _ = client.wait().await;
                replies
            }
        }
    };
    let replies: Vec<Reply> = tokio::time::timeout(COMMAND_TIMEOUT, exchange)
        .await
        .map_err(|_| anyhow!("no reply within {COMMAND_TIMEOUT:?}"))
        .and_then(|replies| replies)
        .with_context(|| format!("127.0.0.1:{port}: {names}"))?;
    if let Some(Reply::Error(error)) = replies.iter().find(|r| matches!(r, Reply::Error(_))) {
        bail!("127.0.0.1:{port} answered {names}: {error}");
    }
    Ok(replies)
}

/// Reads `count` replies from `stream`.
async fn read_replies(
    stream: &mut (impl AsyncRead + Unpin),
    count: usize,
) -> anyhow::Result<Vec<Reply>> {
    let mut buffer = Vec::new();
    let mut replies = Vec::new();
    let mut start = 0;
    while replies.len() < count {
        match parse_reply(&buffer[start..])? {
            Some((reply, used)) => {
                start += used;
                replies.push(reply);
            }
            None => {
                if stream.read_buf(&mut buffer).await? == 0 {
                    bail!("connection closed");
                }
            }
        }
    }
    Ok(replies)
}

/// One reply from the start of `buffer` and the bytes it took, or `None` if incomplete.
fn parse_reply(buffer: &[u8]) -> anyhow::Result<Option<(Reply, usize)>> {
    let Some(end) = buffer.windows(2).position(|pair| pair == b"\r\n") else {
        return Ok(None);
    };
    if end == 0 {
        bail!("empty RESP line");
    }
    let line = std::str::from_utf8(&buffer[1..end])?;
    let after = end + 2;
    let parsed = match buffer[0] {
        b'+' => (Reply::Text(line.to_owned()), after),
        b'-' => (Reply::Error(line.to_owned()), after),
        b':' => (Reply::Int(line.parse()?), after),
        b'$' => match usize::try_from(line.parse::<i64>()?) {
            Err(_) => (Reply::Nil, after),
            Ok(len) if buffer.len() < after + len + 2 => return Ok(None),
            Ok(len) => {
                let text = String::from_utf8_lossy(&buffer[after..after + len]).into_owned();
                (Reply::Text(text), after + len + 2)
            }
        },
        b'*' => match usize::try_from(line.parse::<i64>()?) {
            Err(_) => (Reply::Nil, after),
            Ok(count) => {
                let mut items = Vec::with_capacity(count.min(1024));
                let mut at = after;
                for _ in 0..count {
                    let Some((item, used)) = parse_reply(&buffer[at..])? else {
                        return Ok(None);
                    };
                    items.push(item);
                    at += used;
                }
                (Reply::Array(items), at)
            }
        },
        other => bail!("unexpected RESP type {:?}", char::from(other)),
    };
    Ok(Some(parsed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_cluster_keyslot() {
        // Each checked once with `redis-cli cluster keyslot KEY` on redis-server 7.0.15.
        for (key, slot) in [
            ("{klingq}:x", 6281),
            ("klingq", 6281),
            ("foo", 12182),
            ("123456789", 12739),
            ("{user1000}.following", 3443),
            ("foo{}{bar}", 8363),
            ("foo{{bar}}zap", 4015),
            ("foo{bar}{zap}", 5061),
            ("", 0),
            ("{}", 15257),
        ] {
            assert_eq!(slot_of(key), slot, "slot of {key:?}");
        }
    }

    #[test]
    fn crc16_xmodem_check_value() {
        assert_eq!(crc16_xmodem(b"123456789"), 0x31C3);
    }

    #[test]
    fn parses_cluster_nodes() {
        let text = "\
07c37dfeb235213a872192d90877d0cd55635b91 127.0.0.1:30004@31004,host slave e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 0 1426238317239 4 connected
67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 127.0.0.1:30002@31002 master - 0 1426238316232 2 connected 5461-10922 [5461->-abc]
e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 127.0.0.1:30001@31001 myself,master - 0 0 1 connected 0-5460 16383
6ec23923021cf3ffec47632106199cb7f496ce01 127.0.0.1:30005@31005 master,fail - 1426238316232 1426238315000 5 disconnected
";
        let nodes = parse_cluster_nodes(text).unwrap();
        assert_eq!(nodes.len(), 4);
        assert_eq!(nodes[0].port, 30004);
        assert!(!nodes[0].is_master());
        assert_eq!(nodes[1].slots, vec![(5461, 10922)]);
        assert_eq!(nodes[2].slots, vec![(0, 5460), (16383, 16383)]);
        assert!(nodes[2].owns(16383) && !nodes[2].owns(5461));
        assert!(nodes[3].is_failing() && !nodes[3].connected);
    }

    #[test]
    fn parses_nested_and_partial_replies() {
        let full = b"*3\r\n$9\r\n127.0.0.1\r\n:5\r\n*-1\r\n+OK\r\n";
        let (reply, used) = parse_reply(full).unwrap().unwrap();
        assert_eq!(used, full.len() - 5);
        let Reply::Array(items) = reply else {
            panic!("not an array")
        };
        assert!(matches!(&items[0], Reply::Text(t) if t == "127.0.0.1"));
        assert!(matches!(items[1], Reply::Int(5)));
        assert!(matches!(items[2], Reply::Nil));
        for cut in 0..full.len() - 5 {
            assert!(parse_reply(&full[..cut]).unwrap().is_none(), "cut at {cut}");
        }
    }
}
