//! Where Redis is: `queue.redis_url` (one URL, a comma-separated list of seed nodes, or a
//! `redis+sentinel://` URL) and `queue.redis_mode`, parsed into a [`Target`] before anything
//! connects, so a wrong setting is refused with the field and the rule.

use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo, RedisConnectionInfo};
use serde::{Deserialize, Serialize};

/// How klingq talks to Redis (`queue.redis_mode`, `KLINGQ_REDIS_MODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RedisMode {
    /// A `redis+sentinel://` URL means Sentinel; otherwise the first node that answers is
    /// asked `INFO cluster`: `cluster_enabled:1` means Cluster, anything else standalone.
    #[default]
    Auto,
    /// One primary, no redirections.
    Standalone,
    /// Redis Cluster, entered through any node of the list (the configuration endpoint of
    /// a managed service in cluster mode).
    Cluster,
    /// A primary discovered through Sentinel, followed after a failover.
    Sentinel,
}

impl RedisMode {
    pub fn as_str(self) -> &'static str {
        match self {
            RedisMode::Auto => "auto",
            RedisMode::Standalone => "standalone",
            RedisMode::Cluster => "cluster",
            RedisMode::Sentinel => "sentinel",
        }
    }
}

/// A parsed `queue.redis_url`.
#[derive(Debug, Clone)]
pub(crate) enum Target {
    /// One node, or the seed nodes of a cluster.
    Nodes(Vec<ConnectionInfo>),
    /// Sentinels that name the primary of `service`.
    Sentinel(SentinelTarget),
}

#[derive(Debug, Clone)]
pub(crate) struct SentinelTarget {
    pub(crate) sentinels: Vec<ConnectionInfo>,
    pub(crate) service: String,
    /// Credentials and database of the data nodes (not the sentinels).
    pub(crate) node: RedisConnectionInfo,
    pub(crate) tls: bool,
    /// `rediss+sentinel://…#insecure`: TLS without verifying the certificates of the sentinels
    /// and the data nodes (the redis crate's `rediss://…/#insecure`, for a private CA in no
    /// trust store).
    pub(crate) insecure: bool,
}

/// A setting that cannot work, named with the rule it breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {rule}")]
pub struct TargetError {
    pub field: &'static str,
    pub rule: String,
}

fn invalid(field: &'static str, rule: impl Into<String>) -> TargetError {
    TargetError {
        field,
        rule: rule.into(),
    }
}

const SENTINEL_SCHEMES: [(&str, bool); 2] =
    [("redis+sentinel://", false), ("rediss+sentinel://", true)];

impl Target {
    /// Parses `url` for `mode`. Never echoes a password.
    pub(crate) fn parse(url: &str, mode: RedisMode) -> Result<Self, TargetError> {
        let url = url.trim();
        if url.is_empty() {
            return Err(invalid("queue.redis_url", "must not be empty"));
        }
        let sentinel = SENTINEL_SCHEMES
            .iter()
            .find(|(scheme, _)| starts_with_ignore_case(url, scheme));
        match (sentinel, mode) {
            (Some(&(scheme, tls)), RedisMode::Auto | RedisMode::Sentinel) => {
                parse_sentinel(&url[scheme.len()..], tls).map(Target::Sentinel)
            }
            (Some(_), mode) => Err(invalid(
                "queue.redis_mode",
                format!(
                    "is {} but queue.redis_url is a redis+sentinel:// URL; use auto or sentinel",
                    mode.as_str()
                ),
            )),
            (None, RedisMode::Sentinel) => Err(invalid(
                "queue.redis_url",
                "must be redis+sentinel://[user:pass@]host:port[,host:port…]/service_name when queue.redis_mode is sentinel",
            )),
            (None, mode) => {
                let nodes = url
                    .split(',')
                    .map(str::trim)
                    .filter(|part| !part.is_empty())
                    .map(parse_node)
                    .collect::<Result<Vec<_>, _>>()?;
                if nodes.len() > 1 && mode == RedisMode::Standalone {
                    return Err(invalid(
                        "queue.redis_url",
                        "lists several nodes, which only cluster mode accepts (queue.redis_mode = standalone)",
                    ));
                }
                Ok(Target::Nodes(nodes))
            }
        }
    }
}

fn starts_with_ignore_case(text: &str, prefix: &str) -> bool {
    text.len() >= prefix.len() && text[..prefix.len()].eq_ignore_ascii_case(prefix)
}

/// One `redis://` or `rediss://` node URL.
fn parse_node(url: &str) -> Result<ConnectionInfo, TargetError> {
    if !(starts_with_ignore_case(url, "redis://") || starts_with_ignore_case(url, "rediss://")) {
        return Err(invalid(
            "queue.redis_url",
            "each node must be a redis:// or rediss:// URL (or use one redis+sentinel:// URL)",
        ));
    }
    url.into_connection_info().map_err(|error| {
        invalid(
            "queue.redis_url",
            format!(
                "{} is not a valid Redis URL ({:?})",
                klingq_core::redact_url(url),
                error.kind()
            ),
        )
    })
}

/// `[user:pass@]host:port[,host:port…]/service_name[?db=N&sentinel_username=U&sentinel_password=P][#insecure]`
fn parse_sentinel(rest: &str, tls: bool) -> Result<SentinelTarget, TargetError> {
    // The fragment first: left in, it would end up in the service name (or a parameter).
    let (rest, fragment) = rest.split_once('#').unwrap_or((rest, ""));
    let insecure = match fragment {
        "" => false,
        "insecure" if tls => true,
        "insecure" => {
            return Err(invalid(
                "queue.redis_url",
                "#insecure (TLS without verifying certificates) needs a rediss+sentinel:// URL",
            ));
        }
        _ => {
            return Err(invalid(
                "queue.redis_url",
                "only #insecure is supported as URL fragment",
            ));
        }
    };
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, service) = rest.split_once('/').ok_or_else(|| {
        invalid(
            "queue.redis_url",
            "a redis+sentinel:// URL ends with /service_name (the name the sentinels monitor)",
        )
    })?;
    let service = service.trim_end_matches('/');
    if service.is_empty() || service.contains('/') {
        return Err(invalid(
            "queue.redis_url",
            "a redis+sentinel:// URL ends with /service_name (the name the sentinels monitor)",
        ));
    }
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => (Some(userinfo), hosts),
        None => (None, authority),
    };
    let mut db = "0".to_owned();
    let mut sentinel_userinfo = String::new();
    let mut sentinel_user = None;
    let mut sentinel_password = None;
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "db" => {
                if value.parse::<u16>().is_err() {
                    return Err(invalid("queue.redis_url", "db must be a database number"));
                }
                db = value.to_owned();
            }
            "sentinel_username" => sentinel_user = Some(value),
            "sentinel_password" => sentinel_password = Some(value),
            other => {
                return Err(invalid(
                    "queue.redis_url",
                    format!(
                        "unknown parameter {other:?} (known: db, sentinel_username, sentinel_password)"
                    ),
                ));
            }
        }
    }
    if sentinel_user.is_some() || sentinel_password.is_some() {
        sentinel_userinfo = format!(
            "{}:{}@",
            sentinel_user.unwrap_or_default(),
            sentinel_password.unwrap_or_default()
        );
    }
    let scheme = if tls { "rediss" } else { "redis" };
    let fragment = if insecure { "/#insecure" } else { "" };
    let sentinels = hosts
        .split(',')
        .map(str::trim)
        .filter(|host| !host.is_empty())
        .map(|host| {
            format!("{scheme}://{sentinel_userinfo}{host}{fragment}")
                .as_str()
                .into_connection_info()
                .map_err(|_| {
                    invalid(
                        "queue.redis_url",
                        format!("sentinel address {host:?} is not host:port"),
                    )
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if sentinels.is_empty() {
        return Err(invalid(
            "queue.redis_url",
            "a redis+sentinel:// URL names at least one sentinel host:port",
        ));
    }
    let userinfo = userinfo.map(|u| format!("{u}@")).unwrap_or_default();
    let node = format!("redis://{userinfo}localhost/{db}")
        .as_str()
        .into_connection_info()
        .map_err(|_| invalid("queue.redis_url", "the user:password part is not valid"))?
        .redis_settings()
        .clone();
    Ok(SentinelTarget {
        sentinels,
        service: service.to_owned(),
        node,
        tls,
        insecure,
    })
}

/// `host:port` of a connection, for logs and errors (never credentials).
pub(crate) fn addr_of(info: &ConnectionInfo) -> String {
    match info.addr() {
        ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => {
            format!("{host}:{port}")
        }
        ConnectionAddr::Unix(path) => path.display().to_string(),
        _ => "redis".to_owned(),
    }
}

/// `info` with its address replaced by `host:port`, keeping TLS, credentials and database.
pub(crate) fn with_addr(info: &ConnectionInfo, host: &str, port: u16) -> ConnectionInfo {
    let addr = match info.addr() {
        ConnectionAddr::TcpTls {
            insecure,
            tls_params,
            ..
        } => ConnectionAddr::TcpTls {
            host: host.to_owned(),
            port,
            insecure: *insecure,
            tls_params: tls_params.clone(),
        },
        _ => ConnectionAddr::Tcp(host.to_owned(), port),
    };
    info.clone().set_addr(addr)
}

pub(crate) fn is_tls(info: &ConnectionInfo) -> bool {
    matches!(info.addr(), ConnectionAddr::TcpTls { .. })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(url: &str, mode: RedisMode) -> Vec<String> {
        match Target::parse(url, mode).unwrap() {
            Target::Nodes(nodes) => nodes.iter().map(addr_of).collect(),
            Target::Sentinel(_) => panic!("sentinel"),
        }
    }

    #[test]
    fn seed_lists_and_single_urls() {
        assert_eq!(
            nodes("redis://127.0.0.1:6379", RedisMode::Auto),
            ["127.0.0.1:6379"]
        );
        assert_eq!(
            nodes(
                "redis://:pw@10.0.0.1:7000, rediss://10.0.0.2:7001",
                RedisMode::Cluster
            ),
            ["10.0.0.1:7000", "10.0.0.2:7001"]
        );
        let error = Target::parse("redis://a:1,redis://b:2", RedisMode::Standalone).unwrap_err();
        assert_eq!(error.field, "queue.redis_url");
        assert!(error.rule.contains("only cluster mode"), "{error}");
        let error = Target::parse("http://a:1", RedisMode::Auto).unwrap_err();
        assert!(error.rule.contains("redis://"), "{error}");
    }

    #[test]
    fn sentinel_urls() {
        let Target::Sentinel(target) = Target::parse(
            "redis+sentinel://app:s%3Fcret@10.0.0.1:26379,10.0.0.2:26380/mymaster?db=2&sentinel_password=sp",
            RedisMode::Auto,
        )
        .unwrap() else {
            panic!("not sentinel")
        };
        assert_eq!(target.service, "mymaster");
        assert_eq!(
            target.sentinels.iter().map(addr_of).collect::<Vec<_>>(),
            ["10.0.0.1:26379", "10.0.0.2:26380"]
        );
        assert_eq!(target.node.db(), 2);
        assert_eq!(target.node.username(), Some("app"));
        assert_eq!(target.node.password(), Some("s?cret"));
        assert_eq!(target.sentinels[0].redis_settings().password(), Some("sp"));
        assert!(!target.tls);
        let Target::Sentinel(target) =
            Target::parse("rediss+sentinel://h:1/svc", RedisMode::Sentinel).unwrap()
        else {
            panic!("not sentinel")
        };
        assert!(target.tls && is_tls(&target.sentinels[0]));
        assert!(!target.insecure);
        assert!(matches!(
            target.sentinels[0].addr(),
            ConnectionAddr::TcpTls {
                insecure: false,
                ..
            }
        ));
    }

    #[test]
    fn insecure_sentinel_urls() {
        let Target::Sentinel(target) = Target::parse(
            "rediss+sentinel://h:1,h:2/svc?db=3#insecure",
            RedisMode::Auto,
        )
        .unwrap() else {
            panic!("not sentinel")
        };
        assert_eq!(target.service, "svc");
        assert_eq!(target.node.db(), 3);
        assert!(target.tls && target.insecure);
        for sentinel in &target.sentinels {
            assert!(
                matches!(
                    sentinel.addr(),
                    ConnectionAddr::TcpTls { insecure: true, .. }
                ),
                "{sentinel:?}"
            );
        }
        let Target::Sentinel(target) =
            Target::parse("rediss+sentinel://h:1/svc#insecure", RedisMode::Sentinel).unwrap()
        else {
            panic!("not sentinel")
        };
        assert_eq!(target.service, "svc");
        assert!(target.insecure);
        let error =
            Target::parse("redis+sentinel://h:1/svc#insecure", RedisMode::Auto).unwrap_err();
        assert!(error.rule.contains("rediss+sentinel://"), "{error}");
        let error = Target::parse("rediss+sentinel://h:1/svc#other", RedisMode::Auto).unwrap_err();
        assert!(error.rule.contains("#insecure"), "{error}");
    }

    #[test]
    fn mode_and_url_must_agree() {
        let error = Target::parse("redis://h:1", RedisMode::Sentinel).unwrap_err();
        assert_eq!(error.field, "queue.redis_url");
        let error = Target::parse("redis+sentinel://h:1/svc", RedisMode::Cluster).unwrap_err();
        assert_eq!(error.field, "queue.redis_mode");
        let error = Target::parse("redis+sentinel://h:1", RedisMode::Auto).unwrap_err();
        assert!(error.rule.contains("service_name"), "{error}");
        let error =
            Target::parse("redis+sentinel://:hunter2@h:1/svc?x=1", RedisMode::Auto).unwrap_err();
        assert!(!error.to_string().contains("hunter2"));
    }

    #[test]
    fn addresses_are_replaced_keeping_tls() {
        let seed = "rediss://:pw@seed:7000/0".into_connection_info().unwrap();
        let node = with_addr(&seed, "10.0.0.9", 7005);
        assert_eq!(addr_of(&node), "10.0.0.9:7005");
        assert!(is_tls(&node));
        assert_eq!(node.redis_settings().password(), Some("pw"));
    }
}
