//! A connection to the primary Sentinel names, that asks again after a failover.
//!
//! The redis crate's `SentinelClient` finds the primary once; its connections keep talking to
//! that address. [`Following`] holds one multiplexed connection to the current primary and
//! drops it when a command fails in a way that says the node is gone or demoted (a lost
//! connection, a timeout, `READONLY`, `LOADING`, `MASTERDOWN`); the next command asks the
//! sentinels again. The queue's callers already retry transient errors with backoff, so a
//! failover costs them a few retries, never an error past their budget.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{AsyncConnectionConfig, Cmd, Pipeline, RedisError, RedisFuture, RedisResult, Value};

use super::errors::drops_connection;
use super::target::{SentinelTarget, addr_of};

/// The current primary's connection, with a generation so one failure drops it once.
#[derive(Clone)]
struct Current {
    generation: u64,
    conn: MultiplexedConnection,
    client: redis::Client,
}

struct Shared {
    sentinel: tokio::sync::Mutex<SentinelClient>,
    current: Mutex<Option<Current>>,
    /// Serializes rediscovery: one task asks the sentinels, the others wait for its answer.
    discovering: tokio::sync::Mutex<u64>,
    response_timeout: Duration,
    service: String,
}

/// A reconnecting connection to the primary of a Sentinel-monitored service. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Following {
    shared: Arc<Shared>,
}

impl Following {
    pub(crate) async fn connect(
        target: &SentinelTarget,
        response_timeout: Duration,
    ) -> RedisResult<Self> {
        let mut node =
            SentinelNodeConnectionInfo::default().set_redis_connection_info(target.node.clone());
        if target.tls {
            // The data nodes as the sentinels: verified, unless the URL ends in #insecure.
            node = node.set_tls_mode(if target.insecure {
                redis::TlsMode::Insecure
            } else {
                redis::TlsMode::Secure
            });
        }
        let sentinel = SentinelClient::build(
            target.sentinels.clone(),
            target.service.clone(),
            Some(node),
            SentinelServerType::Master,
        )?;
        let following = Self {
            shared: Arc::new(Shared {
                sentinel: tokio::sync::Mutex::new(sentinel),
                current: Mutex::new(None),
                discovering: tokio::sync::Mutex::new(0),
                response_timeout,
                service: target.service.clone(),
            }),
        };
        following.current().await?;
        Ok(following)
    }

    pub(crate) fn service(&self) -> &str {
        &self.shared.service
    }

    /// `host:port` of the primary in use, if connected.
    pub(crate) fn primary(&self) -> Option<String> {
        self.shared
            .current
            .lock()
            .expect("sentinel state poisoned")
            .as_ref()
            .map(|current| addr_of(current.client.get_connection_info()))
    }

    /// A client for the current primary (asked of the sentinels if none is known), for
    /// dedicated connections.
    pub(crate) async fn primary_client(&self) -> RedisResult<redis::Client> {
        Ok(self.current().await?.client)
    }

    async fn current(&self) -> RedisResult<Current> {
        if let Some(current) = self.known() {
            return Ok(current);
        }
        let mut generation = self.shared.discovering.lock().await;
        if let Some(current) = self.known() {
            return Ok(current);
        }
        let client = self.shared.sentinel.lock().await.async_get_client().await?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(self.shared.response_timeout));
        let conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        // The sentinels may still name the old primary for a moment after it died or was
        // demoted: only a node that says it is a master is used.
        let mut probe = conn.clone();
        let role: Value = redis::cmd("ROLE").query_async(&mut probe).await?;
        if !is_master(&role) {
            return Err(RedisError::from((
                redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly),
                "the node the sentinels name is not a primary yet",
            )));
        }
        *generation += 1;
        let current = Current {
            generation: *generation,
            conn,
            client,
        };
        tracing::info!(
            service = %self.shared.service,
            primary = %addr_of(current.client.get_connection_info()),
            "redis sentinel: connected to the primary"
        );
        *self.shared.current.lock().expect("sentinel state poisoned") = Some(current.clone());
        Ok(current)
    }

    fn known(&self) -> Option<Current> {
        self.shared
            .current
            .lock()
            .expect("sentinel state poisoned")
            .clone()
    }

    /// Forgets the connection of `generation` (not a newer one another task made).
    fn drop_generation(&self, generation: u64) {
        let mut current = self.shared.current.lock().expect("sentinel state poisoned");
        if current.as_ref().is_some_and(|c| c.generation == generation) {
            tracing::warn!(service = %self.shared.service, "redis sentinel: primary lost; asking the sentinels again");
            *current = None;
        }
    }

    fn settle<T>(&self, generation: u64, result: RedisResult<T>) -> RedisResult<T> {
        if let Err(error) = &result
            && drops_connection(error)
        {
            self.drop_generation(generation);
        }
        result
    }
}

fn is_master(role: &Value) -> bool {
    match role {
        Value::Array(parts) => {
            matches!(
                parts.first(),
                Some(Value::BulkString(bytes)) if bytes.as_slice() == b"master"
            ) || matches!(parts.first(), Some(Value::SimpleString(s)) if s == "master")
        }
        _ => false,
    }
}

impl ConnectionLike for Following {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let current = self.current().await?;
            let mut conn = current.conn;
            let result = conn.req_packed_command(cmd).await;
            self.settle(current.generation, result)
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let current = self.current().await?;
            let mut conn = current.conn;
            let result = conn.req_packed_commands(pipeline, offset, count).await;
            self.settle(current.generation, result)
        })
    }

    fn get_db(&self) -> i64 {
        self.known().map(|c| c.conn.get_db()).unwrap_or_default()
    }
}
