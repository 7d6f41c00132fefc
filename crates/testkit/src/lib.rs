//! Test-only helpers shared by every crate's integration tests: real services on free loopback
//! ports (a private `redis-server`, SeaweedFS), a TCP proxy that can cut a service off, and
//! polling a condition with a deadline instead of sleeping.

pub mod cluster;
pub mod proxy;
pub mod redis;
pub mod seaweed;
pub mod sentinel;
pub mod tls;

pub use cluster::RedisCluster;
pub use sentinel::RedisSentinel;
pub use tls::TlsFiles;

use std::time::Duration;

/// Polls `check` every 20 ms until it returns `Some`, or fails after `timeout` naming `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
