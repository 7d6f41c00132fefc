//! Reads and chores about the Redis server rather than the queue: whether it answers (health
//! checks), its command counters (benchmarks count commands per job) and removing a whole
//! namespace (benchmarks clean up after themselves).

use crate::error::QueueError;
use crate::queue::Queue;

/// Commands the Redis server has run since it started (or since `CONFIG RESETSTAT`), from
/// `INFO commandstats`. Benchmarks read it before and after a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommandCounters {
    /// Every command the server executed, counting those scripts ran.
    pub commands: u64,
    /// Script calls (`EVALSHA`, `EVAL`): one per script run.
    pub scripts: u64,
}

impl CommandCounters {
    /// Sums the per-command call counts of an `INFO commandstats` reply.
    fn parse(info: &str) -> Self {
        let mut counters = CommandCounters::default();
        for line in info.lines() {
            let Some((name, rest)) = line.split_once(':') else {
                continue;
            };
            let Some(calls) = rest
                .split(',')
                .find_map(|field| field.strip_prefix("calls="))
                .and_then(|calls| calls.parse::<u64>().ok())
            else {
                continue;
            };
            counters.commands += calls;
            if matches!(name, "cmdstat_evalsha" | "cmdstat_eval") {
                counters.scripts += calls;
            }
        }
        counters
    }
}

impl Queue {
    /// Whether Redis answers now: one `PING`, not retried (health checks ask again).
    pub async fn ping(&self) -> Result<(), QueueError> {
        let mut conn = self.connection();
        let pong: Result<String, QueueError> = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(QueueError::from);
        pong.inspect_err(|error| self.record_error(error))?;
        Ok(())
    }

    /// The server's command counters, for benchmarks (commands per job): the sum over every
    /// primary of a cluster.
    pub async fn command_counters(&self) -> Result<CommandCounters, QueueError> {
        let mut total = CommandCounters::default();
        for (_, counters) in self.command_counters_per_node().await? {
            total.commands += counters.commands;
            total.scripts += counters.scripts;
        }
        Ok(total)
    }

    /// Command counters of each primary (`host:port`), sorted by node: how a cluster's
    /// shards share the work.
    pub async fn command_counters_per_node(
        &self,
    ) -> Result<Vec<(String, CommandCounters)>, QueueError> {
        let replies = self
            .retrying(std::time::Duration::from_secs(10), || async {
                let mut cmd = redis::cmd("INFO");
                cmd.arg("commandstats");
                Ok(self.redis().on_each_primary(cmd).await?)
            })
            .await?;
        let mut counters = replies
            .into_iter()
            .map(|(node, reply)| {
                let info: String = redis::from_redis_value(reply)
                    .map_err(|error| QueueError::Protocol(format!("INFO from {node}: {error}")))?;
                Ok((node, CommandCounters::parse(&info)))
            })
            .collect::<Result<Vec<_>, QueueError>>()?;
        counters.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(counters)
    }

    /// Deletes every key of this queue's namespace (all its queues, batches, events and
    /// limits, in every partition), in steps of `SCAN` and `UNLINK`; returns how many were
    /// deleted. For benchmarks and tests that made a namespace of their own: nothing can be
    /// recovered.
    pub async fn delete_namespace(&self) -> Result<u64, QueueError> {
        let mut n_deleted = 0;
        for (_, keys) in self.partitions().all() {
            let pattern = format!("{}:*", keys.prefix());
            let mut cursor: u64 = 0;
            loop {
                let (next, found) = self.scan_page(keys, cursor, &pattern).await?;
                if !found.is_empty() {
                    let unlinked: u64 = self.query(redis::cmd("UNLINK").arg(&found)).await?;
                    n_deleted += unlinked;
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(n_deleted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_counters_sum_every_command_and_count_scripts() {
        let info = "# Commandstats\r\n\
            cmdstat_xadd:calls=10,usec=50,usec_per_call=5.00,rejected_calls=0,failed_calls=0\r\n\
            cmdstat_evalsha:calls=3,usec=90,usec_per_call=30.00,rejected_calls=0,failed_calls=0\r\n\
            cmdstat_eval:calls=1,usec=9,usec_per_call=9.00\r\n\
            not a stat line\r\n";
        assert_eq!(
            CommandCounters::parse(info),
            CommandCounters {
                commands: 14,
                scripts: 4
            }
        );
    }
}
