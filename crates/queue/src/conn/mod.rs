//! Connections to Redis in its three shapes: one standalone primary, a Cluster (entered
//! through any node), or a primary found through Sentinel.
//!
//! [`Redis::connect`] parses `queue.redis_url` and `queue.redis_mode`, detects Cluster with
//! `INFO cluster` when the mode is `auto`, and opens the shared multiplexed connection
//! ([`SharedConn`]) every non-blocking command goes through. Blocking stream reads get a
//! [`Dedicated`] connection of their own, straight to the node that owns the namespace's
//! slot, so they never hold the shared connection's other traffic; when the slot moves (a
//! failover, a reshard) their reads fail with a transient error and the caller opens a new
//! one, which finds the new owner.

mod errors;
mod sentinel;
mod target;

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{
    MultipleNodeRoutingInfo, Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr,
};
use redis::{
    AsyncConnectionConfig, Cmd, ConnectionInfo, Pipeline, RedisFuture, RedisResult, Value,
};

pub(crate) use errors::ErrorCounters;
pub(crate) use errors::is_transient;
pub use errors::{ERROR_KINDS, error_kind};
pub use target::{RedisMode, TargetError};

use sentinel::Following;
use target::{Target, addr_of, is_tls, with_addr};

use crate::config::QueueConfig;
use crate::error::QueueError;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What klingq found at `queue.redis_url`: the mode and the nodes, never credentials.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Topology {
    /// `standalone`, `cluster` or `sentinel`.
    pub mode: &'static str,
    /// `host:port` of the node(s) klingq writes to: the primary, or the cluster's primaries.
    pub primaries: Vec<String>,
    /// Cluster: the slot of the namespace's hash tag, and its owner when found.
    pub namespace_slot: Option<u16>,
    pub slot_owner: Option<String>,
    /// Sentinel: the monitored service.
    pub service: Option<String>,
    pub tls: bool,
    /// `queue.partitions`.
    pub partitions: usize,
    /// Cluster: the primary owning each partition's slot, in partition order.
    pub partition_owners: Vec<String>,
}

impl std::fmt::Display for Topology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.mode)?;
        if let Some(service) = &self.service {
            write!(f, " (service {service})")?;
        }
        write!(f, ", primaries [{}]", self.primaries.join(", "))?;
        if let Some(slot) = self.namespace_slot {
            write!(f, ", namespace slot {slot}")?;
            if let Some(owner) = &self.slot_owner {
                write!(f, " on {owner}")?;
            }
        }
        if self.partitions > 1 {
            write!(f, ", {} partitions", self.partitions)?;
            let mut shards = self.partition_owners.clone();
            shards.sort();
            shards.dedup();
            if !shards.is_empty() {
                write!(f, " on {} shards", shards.len())?;
            }
        }
        if self.tls {
            write!(f, ", TLS")?;
        }
        Ok(())
    }
}

/// The shared, multiplexed, reconnecting connection. Cheap to clone.
#[derive(Clone)]
pub struct SharedConn(Shape);

#[derive(Clone)]
enum Shape {
    Standalone(ConnectionManager),
    Cluster(ClusterConnection),
    Sentinel(Following),
}

impl ConnectionLike for SharedConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match &mut self.0 {
            Shape::Standalone(conn) => conn.req_packed_command(cmd),
            Shape::Cluster(conn) => conn.req_packed_command(cmd),
            Shape::Sentinel(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match &mut self.0 {
            Shape::Standalone(conn) => conn.req_packed_commands(pipeline, offset, count),
            Shape::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
            Shape::Sentinel(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match &self.0 {
            Shape::Standalone(conn) => conn.get_db(),
            Shape::Cluster(conn) => conn.get_db(),
            Shape::Sentinel(conn) => conn.get_db(),
        }
    }
}

/// A connection of its own to the node owning the namespace's slot, for blocking reads.
#[derive(Clone)]
pub struct Dedicated {
    conn: MultiplexedConnection,
    node: ConnectionInfo,
    /// A second connection to the same node, opened at the first [`Dedicated::unblock`]
    /// and kept with this one (the blocked connection answers nothing until unblocked).
    control: Arc<tokio::sync::OnceCell<MultiplexedConnection>>,
}

impl Dedicated {
    /// `host:port` of the node it talks to.
    pub fn node(&self) -> String {
        addr_of(&self.node)
    }

    /// Ends a blocking read of client `client_id` on this connection's node (the node
    /// that gave out the id), from a control connection of its own.
    pub async fn unblock(&self, client_id: i64) -> RedisResult<()> {
        let control = self
            .control
            .get_or_try_init(|| async {
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(Some(CONNECT_TIMEOUT));
                redis::Client::open(self.node.clone())?
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
            })
            .await?;
        redis::cmd("CLIENT")
            .arg("UNBLOCK")
            .arg(client_id)
            .query_async(&mut control.clone())
            .await
    }

    fn new(conn: MultiplexedConnection, node: ConnectionInfo) -> Self {
        Self {
            conn,
            node,
            control: Arc::default(),
        }
    }
}

impl ConnectionLike for Dedicated {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        self.conn.req_packed_command(cmd)
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        self.conn.req_packed_commands(pipeline, offset, count)
    }

    fn get_db(&self) -> i64 {
        self.conn.get_db()
    }
}

enum Source {
    Standalone(Box<redis::Client>),
    Cluster {
        seeds: Vec<ConnectionInfo>,
        /// The slot of the namespace's own tag (partition 0, the global keys).
        slot: u16,
    },
    Sentinel(Following),
}

/// Klingq's way to Redis: the shared connection and the means to open dedicated ones.
pub(crate) struct Redis {
    pub(crate) shared: SharedConn,
    source: Source,
    tls: bool,
}

impl Redis {
    /// Connects as `queue.redis_mode` says, or as detected. `route_key` is a key of the
    /// namespace's slot (dedicated connections go to its owner).
    pub(crate) async fn connect(config: &QueueConfig, route_key: &str) -> Result<Self, QueueError> {
        let target = Target::parse(&config.redis_url, config.redis_mode)?;
        let response_timeout = config.command_timeout();
        if matches!(&target, Target::Nodes(nodes) if nodes.iter().any(is_tls))
            || matches!(&target, Target::Sentinel(s) if s.tls)
        {
            install_crypto_provider();
        }
        match target {
            Target::Sentinel(target) => {
                let following = Following::connect(&target, response_timeout).await?;
                Ok(Self {
                    shared: SharedConn(Shape::Sentinel(following.clone())),
                    source: Source::Sentinel(following),
                    tls: target.tls,
                })
            }
            Target::Nodes(seeds) => {
                let tls = seeds.iter().any(is_tls);
                let cluster = match config.redis_mode {
                    RedisMode::Cluster => true,
                    RedisMode::Standalone => false,
                    _ => detect_cluster(&seeds).await?,
                };
                if cluster {
                    let client = ClusterClient::builder(seeds.clone())
                        .connection_timeout(CONNECT_TIMEOUT)
                        .response_timeout(response_timeout)
                        .build()?;
                    let conn = client.get_async_connection().await?;
                    Ok(Self {
                        shared: SharedConn(Shape::Cluster(conn)),
                        source: Source::Cluster {
                            seeds,
                            slot: key_slot(route_key),
                        },
                        tls,
                    })
                } else {
                    let client = redis::Client::open(seeds[0].clone())?;
                    let manager_config = ConnectionManagerConfig::new()
                        .set_connection_timeout(Some(CONNECT_TIMEOUT))
                        .set_response_timeout(Some(response_timeout))
                        .set_number_of_retries(3)
                        .set_max_delay(Duration::from_secs(2));
                    let conn =
                        ConnectionManager::new_with_config(client.clone(), manager_config).await?;
                    Ok(Self {
                        shared: SharedConn(Shape::Standalone(conn)),
                        source: Source::Standalone(Box::new(client)),
                        tls,
                    })
                }
            }
        }
    }

    /// A new connection for blocking reads, to the node that owns `route_key`'s slot now.
    pub(crate) async fn dedicated(
        &self,
        response_timeout: Duration,
        route_key: &str,
    ) -> Result<Dedicated, QueueError> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(response_timeout));
        let client = match &self.source {
            Source::Standalone(client) => (**client).clone(),
            Source::Sentinel(following) => following.primary_client().await?,
            Source::Cluster { seeds, .. } => {
                return self
                    .slot_owner_connection(seeds, key_slot(route_key), route_key, &config)
                    .await;
            }
        };
        let conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        Ok(Dedicated::new(conn, client.get_connection_info().clone()))
    }

    /// Asks the cluster who owns `slot`, connects there, and checks with a keyed command
    /// (following a MOVED or two if the answer was already stale).
    async fn slot_owner_connection(
        &self,
        seeds: &[ConnectionInfo],
        slot: u16,
        route_key: &str,
        config: &AsyncConnectionConfig,
    ) -> Result<Dedicated, QueueError> {
        let mut shared = self.shared.clone();
        let slots: Value = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut shared)
            .await?;
        let template = &seeds[0];
        let mut node = owner_in_slots(&slots, slot)
            .map(|(host, port)| with_addr(template, &host, port))
            .unwrap_or_else(|| template.clone());
        for _ in 0..3 {
            let client = redis::Client::open(node.clone())?;
            let mut conn = client
                .get_multiplexed_async_connection_with_config(config)
                .await?;
            let probe: RedisResult<Value> = redis::cmd("EXISTS")
                .arg(route_key)
                .query_async(&mut conn)
                .await;
            match probe {
                Ok(_) => return Ok(Dedicated::new(conn, node)),
                Err(error) => match error.redirect_node() {
                    Some((addr, _)) => {
                        let (host, port) = split_addr(addr)
                            .ok_or_else(|| QueueError::Protocol(format!("MOVED to {addr:?}")))?;
                        node = with_addr(template, host, port);
                    }
                    None => return Err(error.into()),
                },
            }
        }
        Err(QueueError::Protocol(format!(
            "the owner of slot {slot} moved three times while connecting"
        )))
    }

    /// `WAIT wanted timeout_ms` on the connection that made this process's writes: in a
    /// cluster, the one to the primary owning `route_key`'s slot.
    pub(crate) async fn wait_replicas(
        &self,
        wanted: u32,
        timeout_ms: u64,
        route_key: &str,
    ) -> RedisResult<u32> {
        let mut cmd = redis::cmd("WAIT");
        cmd.arg(wanted).arg(timeout_ms);
        let reply = match (&self.source, &self.shared.0) {
            (Source::Cluster { .. }, Shape::Cluster(conn)) => {
                let route = Route::new(key_slot(route_key), SlotAddr::Master);
                conn.clone()
                    .route_command(
                        cmd,
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route)),
                    )
                    .await?
            }
            _ => cmd.query_async(&mut self.shared.clone()).await?,
        };
        Ok(redis::from_redis_value(reply)?)
    }

    /// Runs `cmd` on every primary (one in standalone and Sentinel mode); replies by node.
    /// For server-wide reads such as `INFO`, which a cluster client cannot answer as one.
    pub(crate) async fn on_each_primary(&self, cmd: Cmd) -> RedisResult<Vec<(String, Value)>> {
        match (&self.source, &self.shared.0) {
            (Source::Cluster { .. }, Shape::Cluster(conn)) => {
                let reply = conn
                    .clone()
                    .route_command(
                        cmd,
                        RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None)),
                    )
                    .await?;
                let Value::Map(pairs) = reply else {
                    return Ok(vec![(self.describe(), reply)]);
                };
                Ok(pairs
                    .into_iter()
                    .map(|(node, reply)| (text(&node).unwrap_or_default(), reply))
                    .collect())
            }
            _ => {
                let reply = cmd.query_async(&mut self.shared.clone()).await?;
                Ok(vec![(self.describe(), reply)])
            }
        }
    }

    /// Runs a command without keys (e.g. `SCAN`) on the primary owning `route_key`'s slot.
    pub(crate) async fn on_slot_owner(&self, cmd: Cmd, route_key: &str) -> RedisResult<Value> {
        match (&self.source, &self.shared.0) {
            (Source::Cluster { .. }, Shape::Cluster(conn)) => {
                let route = Route::new(key_slot(route_key), SlotAddr::Master);
                conn.clone()
                    .route_command(
                        cmd,
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route)),
                    )
                    .await
            }
            _ => cmd.query_async(&mut self.shared.clone()).await,
        }
    }

    /// Whether this is a Cluster (keys of different slots live on different nodes).
    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self.source, Source::Cluster { .. })
    }

    /// Where commands go, in a few words for an error message (no query, no credentials).
    pub(crate) fn describe(&self) -> String {
        match &self.source {
            Source::Standalone(client) => addr_of(client.get_connection_info()),
            Source::Sentinel(following) => match following.primary() {
                Some(primary) => format!("{primary} (primary of {})", following.service()),
                None => format!("the primary of {} (sentinels)", following.service()),
            },
            Source::Cluster { seeds, slot, .. } => format!(
                "the cluster node owning slot {slot} (seeds {})",
                seeds.iter().map(addr_of).collect::<Vec<_>>().join(", ")
            ),
        }
    }

    /// Mode, nodes and slots (the namespace's, and each of `route_keys`' owner), for
    /// `config show` and the start log.
    pub(crate) async fn topology(&self, route_keys: &[String]) -> Topology {
        let partitions = route_keys.len();
        match &self.source {
            Source::Standalone(client) => Topology {
                mode: "standalone",
                primaries: vec![addr_of(client.get_connection_info())],
                namespace_slot: None,
                slot_owner: None,
                service: None,
                tls: self.tls,
                partitions,
                partition_owners: Vec::new(),
            },
            Source::Sentinel(following) => Topology {
                mode: "sentinel",
                primaries: following.primary().into_iter().collect(),
                namespace_slot: None,
                slot_owner: None,
                service: Some(following.service().to_owned()),
                tls: self.tls,
                partitions,
                partition_owners: Vec::new(),
            },
            Source::Cluster { slot, .. } => {
                let mut shared = self.shared.clone();
                let slots: Option<Value> = redis::cmd("CLUSTER")
                    .arg("SLOTS")
                    .query_async(&mut shared)
                    .await
                    .ok();
                let mut primaries: Vec<String> =
                    slots.as_ref().map(primaries_in_slots).unwrap_or_default();
                primaries.sort();
                primaries.dedup();
                Topology {
                    mode: "cluster",
                    primaries,
                    namespace_slot: Some(*slot),
                    slot_owner: slots
                        .as_ref()
                        .and_then(|slots| owner_in_slots(slots, *slot))
                        .map(|(host, port)| format!("{host}:{port}")),
                    service: None,
                    tls: self.tls,
                    partitions,
                    partition_owners: route_keys
                        .iter()
                        .filter_map(|key| {
                            owner_in_slots(slots.as_ref()?, key_slot(key))
                                .map(|(host, port)| format!("{host}:{port}"))
                        })
                        .collect(),
                }
            }
        }
    }
}

/// rustls has two crypto providers compiled in here (the AWS SDK brings aws-lc-rs,
/// reqwest ring); TLS connections need one chosen for the process.
fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Whether the first seed that answers runs in cluster mode (`INFO cluster`). A managed
/// service that refuses `INFO` is asked `CLUSTER SLOTS` instead.
async fn detect_cluster(seeds: &[ConnectionInfo]) -> Result<bool, QueueError> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(CONNECT_TIMEOUT));
    let mut last_error = None;
    for seed in seeds {
        let client = redis::Client::open(seed.clone())?;
        let mut conn = match client
            .get_multiplexed_async_connection_with_config(&config)
            .await
        {
            Ok(conn) => conn,
            Err(error) => {
                last_error = Some(error);
                continue;
            }
        };
        let info: RedisResult<String> = redis::cmd("INFO")
            .arg("cluster")
            .query_async(&mut conn)
            .await;
        return Ok(match info {
            Ok(info) => info.lines().any(|line| line.trim() == "cluster_enabled:1"),
            Err(_) => redis::cmd("CLUSTER")
                .arg("SLOTS")
                .query_async::<Value>(&mut conn)
                .await
                .is_ok(),
        });
    }
    Err(last_error
        .map(QueueError::from)
        .unwrap_or_else(|| QueueError::Protocol("no Redis node given".to_owned())))
}

fn split_addr(addr: &str) -> Option<(&str, u16)> {
    let (host, port) = addr.rsplit_once(':')?;
    Some((host, port.parse().ok()?))
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

fn int(value: &Value) -> Option<i64> {
    match value {
        Value::Int(n) => Some(*n),
        other => text(other)?.parse().ok(),
    }
}

/// `host:port` of a node entry of `CLUSTER SLOTS`: `[host, port, id, …]`.
fn node_of(entry: &Value) -> Option<(String, u16)> {
    let Value::Array(parts) = entry else {
        return None;
    };
    let host = text(parts.first()?)?;
    let port = u16::try_from(int(parts.get(1)?)?).ok()?;
    // An empty or "?" host means "the address you reached me at": unknown here.
    (!host.is_empty() && host != "?").then_some((host, port))
}

/// The primary owning `slot` in a `CLUSTER SLOTS` reply.
fn owner_in_slots(slots: &Value, slot: u16) -> Option<(String, u16)> {
    let Value::Array(ranges) = slots else {
        return None;
    };
    ranges.iter().find_map(|range| {
        let Value::Array(parts) = range else {
            return None;
        };
        let start = int(parts.first()?)?;
        let end = int(parts.get(1)?)?;
        (start <= i64::from(slot) && i64::from(slot) <= end)
            .then(|| node_of(parts.get(2)?))
            .flatten()
    })
}

fn primaries_in_slots(slots: &Value) -> Vec<String> {
    let Value::Array(ranges) = slots else {
        return Vec::new();
    };
    ranges
        .iter()
        .filter_map(|range| match range {
            Value::Array(parts) => node_of(parts.get(2)?).map(|(h, p)| format!("{h}:{p}")),
            _ => None,
        })
        .collect()
}

/// The Redis Cluster slot of `key`: CRC16 (XMODEM) of its hash tag, modulo 16384.
pub fn key_slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let tagged = bytes
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let close = bytes[open + 1..].iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &bytes[open + 1..open + 1 + close])
        })
        .unwrap_or(bytes);
    crc16(tagged) % 16384
}

fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in bytes {
        crc ^= u16::from(byte) << 8;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis() {
        // Values from `redis-cli cluster keyslot`.
        assert_eq!(key_slot("foo"), 12182);
        assert_eq!(key_slot("{user1000}.following"), key_slot("user1000"));
        assert_eq!(key_slot("{}x"), key_slot("{}x"));
        assert_eq!(crc16(b"123456789"), 0x31C3);
    }

    #[test]
    fn owners_come_from_cluster_slots() {
        let node = |host: &str, port: i64| {
            Value::Array(vec![
                Value::BulkString(host.as_bytes().to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let slots = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                node("10.0.0.1", 7000),
                node("10.0.0.4", 7003),
            ]),
            Value::Array(vec![
                Value::Int(5461),
                Value::Int(16383),
                node("10.0.0.2", 7001),
            ]),
        ]);
        assert_eq!(
            owner_in_slots(&slots, 5460),
            Some(("10.0.0.1".to_owned(), 7000))
        );
        assert_eq!(
            owner_in_slots(&slots, 5461),
            Some(("10.0.0.2".to_owned(), 7001))
        );
        assert_eq!(
            primaries_in_slots(&slots),
            ["10.0.0.1:7000", "10.0.0.2:7001"]
        );
    }
}
