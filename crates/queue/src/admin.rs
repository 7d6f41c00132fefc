//! Reads and chores about the Redis server rather than the queue: whether it answers (health
//! checks), its command counters (benchmarks count commands per job) and removing a whole
//! namespace (benchmarks clean up after themselves).

use std::collections::BTreeMap;

use crate::error::QueueError;
use crate::queue::Queue;

/// Commands the Redis server has run since it started (or since `CONFIG RESETSTAT`), from
/// `INFO commandstats`. Benchmarks read it before and after a run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommandCounters {
    /// Every command the server executed, counting those scripts ran.
    pub commands: u64,
    /// Script calls (`EVALSHA`, `EVAL`): one per script run.
    pub scripts: u64,
    /// Calls per command (`hset`, `xadd`, `client|id`, …).
    pub per_command: BTreeMap<String, u64>,
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
            if let Some(command) = name.strip_prefix("cmdstat_") {
                *counters.per_command.entry(command.to_owned()).or_default() += calls;
            }
        }
        counters
    }

    /// Adds another node's counters (a cluster's primaries summed).
    pub fn add(&mut self, other: &CommandCounters) {
        self.commands += other.commands;
        self.scripts += other.scripts;
        for (command, calls) in &other.per_command {
            *self.per_command.entry(command.clone()).or_default() += calls;
        }
    }

    /// The commands run since `before`, most first, each divided by `per` (jobs, say), as
    /// `hset 3.00, hmget 2.03, …`: the profile of what a unit of work costs Redis. Commands
    /// under 0.005 per unit are left out.
    pub fn profile_since(&self, before: &CommandCounters, per: f64) -> String {
        let mut rows: Vec<(String, f64)> = self
            .per_command
            .iter()
            .map(|(command, calls)| {
                let earlier = before.per_command.get(command).copied().unwrap_or(0);
                (
                    command.clone(),
                    calls.saturating_sub(earlier) as f64 / per.max(1.0),
                )
            })
            .filter(|(_, n)| *n >= 0.005)
            .collect();
        rows.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        rows.iter()
            .map(|(command, n)| format!("{command} {n:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
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
            total.add(&counters);
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
                scripts: 4,
                per_command: [("xadd", 10), ("evalsha", 3), ("eval", 1)]
                    .into_iter()
                    .map(|(c, n)| (c.to_owned(), n))
                    .collect(),
            }
        );
        let before = CommandCounters::parse("cmdstat_xadd:calls=4\r\n");
        assert_eq!(
            CommandCounters::parse(info).profile_since(&before, 2.0),
            "xadd 3.00, evalsha 1.50, eval 0.50"
        );
    }
}
