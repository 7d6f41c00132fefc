//! Which Redis errors are transient, and their names in `klingq_redis_errors_total{kind}`.

use std::sync::atomic::{AtomicU64, Ordering};

use redis::{ErrorKind, RedisError, ServerErrorKind};

/// The kinds counted, in the order metrics print them.
pub const ERROR_KINDS: [&str; 13] = [
    "connection",
    "tls",
    "timeout",
    "moved",
    "ask",
    "tryagain",
    "clusterdown",
    "readonly",
    "loading",
    "masterdown",
    "noprimary",
    "busy",
    "other",
];

/// The `kind` label of a Redis error: what happened, in words an operator searches for.
pub fn error_kind(error: &RedisError) -> &'static str {
    if error.is_timeout() {
        return "timeout";
    }
    if is_tls_failure(error) {
        return "tls";
    }
    if error.is_io_error() || error.is_connection_dropped() || error.is_connection_refusal() {
        return "connection";
    }
    match error.kind() {
        ErrorKind::Server(ServerErrorKind::Moved) => "moved",
        ErrorKind::Server(ServerErrorKind::Ask) => "ask",
        ErrorKind::Server(ServerErrorKind::TryAgain) => "tryagain",
        ErrorKind::Server(ServerErrorKind::ClusterDown) => "clusterdown",
        ErrorKind::Server(ServerErrorKind::ReadOnly) => "readonly",
        ErrorKind::Server(ServerErrorKind::BusyLoading) => "loading",
        ErrorKind::Server(ServerErrorKind::MasterDown) => "masterdown",
        ErrorKind::ClusterConnectionNotFound => "connection",
        // The sentinels name no primary for the service right now: mid-failover.
        ErrorKind::MasterNameNotFoundBySentinel | ErrorKind::NoValidReplicasFoundBySentinel => {
            "noprimary"
        }
        _ if error.code() == Some("BUSY") => "busy",
        _ => "other",
    }
}

/// A TLS handshake that failed: rustls reports it as an I/O error whose text names the
/// certificate or the handshake.
fn is_tls_failure(error: &RedisError) -> bool {
    let text = error.to_string().to_ascii_lowercase();
    ["certificate", "handshake", "tls", "root cert"]
        .iter()
        .any(|word| text.contains(word))
}

/// Whether retrying the same call may succeed: the node is restarting, failing over,
/// resharding or unreachable for a moment.
pub(crate) fn is_transient(error: &RedisError) -> bool {
    error_kind(error) != "other"
}

/// Whether the connection that returned `error` should be replaced: its node is gone, or
/// no longer the primary (after a failover the old primary comes back as a replica).
pub(crate) fn drops_connection(error: &RedisError) -> bool {
    matches!(
        error_kind(error),
        "connection"
            | "timeout"
            | "readonly"
            | "masterdown"
            | "noprimary"
            | "moved"
            | "clusterdown"
    )
}

/// Transient errors seen, per kind. Shared by every clone of a queue and its `for_queue`
/// copies, so one process reports one set of counters.
#[derive(Debug, Default)]
pub(crate) struct ErrorCounters {
    counts: [AtomicU64; ERROR_KINDS.len()],
}

impl ErrorCounters {
    pub(crate) fn record(&self, error: &RedisError) {
        let kind = error_kind(error);
        let index = ERROR_KINDS
            .iter()
            .position(|k| *k == kind)
            .unwrap_or(ERROR_KINDS.len() - 1);
        self.counts[index].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> Vec<(&'static str, u64)> {
        ERROR_KINDS
            .iter()
            .zip(&self.counts)
            .map(|(kind, count)| (*kind, count.load(Ordering::Relaxed)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_and_failover_errors_are_transient() {
        for (code, kind) in [
            ("MOVED 3999 127.0.0.1:6381", "moved"),
            ("ASK 3999 127.0.0.1:6381", "ask"),
            (
                "TRYAGAIN Multiple keys request during rehashing of slot",
                "tryagain",
            ),
            ("CLUSTERDOWN The cluster is down", "clusterdown"),
            (
                "READONLY You can't write against a read only replica.",
                "readonly",
            ),
            ("LOADING Redis is loading the dataset in memory", "loading"),
            ("MASTERDOWN Link with MASTER is down", "masterdown"),
            ("BUSY Redis is busy running a script", "busy"),
        ] {
            let error = parse_error(code);
            assert_eq!(error_kind(&error), kind, "{code}");
            assert!(is_transient(&error), "{code}");
        }
        let error = parse_error("ERR wrong number of arguments");
        assert_eq!(error_kind(&error), "other");
        assert!(!is_transient(&error));
        let sentinel = RedisError::from((
            redis::ErrorKind::MasterNameNotFoundBySentinel,
            "Master with given name not found in sentinel",
        ));
        assert_eq!(error_kind(&sentinel), "noprimary");
        assert!(is_transient(&sentinel));
        let io = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert_eq!(error_kind(&io), "connection");
        assert!(drops_connection(&io));
    }

    fn parse_error(line: &str) -> RedisError {
        let reply = format!("-{line}\r\n");
        match redis::parse_redis_value(reply.as_bytes()) {
            Ok(redis::Value::ServerError(error)) => error.into(),
            other => panic!("not an error reply: {other:?}"),
        }
    }

    #[test]
    fn counters_sum_per_kind() {
        let counters = ErrorCounters::default();
        counters.record(&parse_error("MOVED 1 h:1"));
        counters.record(&parse_error("MOVED 1 h:1"));
        counters.record(&parse_error("ERR x"));
        let snapshot = counters.snapshot();
        assert!(snapshot.contains(&("moved", 2)));
        assert!(snapshot.contains(&("other", 1)));
    }
}
