//! The SSRF guard: every address an outbound request of klingq connects to on someone else's
//! behalf must be publicly routable, unless an operator allow-listed it. Webhook deliveries
//! (URLs from users) and video downloads (URLs from the provider's answers) both use it.
//!
//! Three checks together cover every connection of a client built with them:
//! - [`GuardedResolver`], the client's DNS resolver, drops every address the policy refuses
//!   and fails when none is left. hyper connects only to the addresses a resolver hands it, so
//!   DNS rebinding (a name answering public, then private) gains nothing: each connection's
//!   addresses are the ones just checked.
//! - [`check_url`] refuses IP-literal hosts (`http://127.0.0.1/`, `http://[::1]/`,
//!   `http://2130706433/`), which never reach a resolver, and schemes other than http(s).
//!   Call it before sending.
//! - [`redirect_policy`] runs [`check_url`]'s checks on every redirect hop (at most
//!   `max_hops`); the hop's host name, if any, then goes through the resolver again.
//!
//! Such a client must use no proxy (`ClientBuilder::no_proxy`): a proxy resolves the target
//! itself, past the resolver.
//!
//! Refused ranges: loopback, private (RFC 1918), link-local (the cloud metadata address
//! 169.254.169.254), carrier-grade NAT, unique-local, multicast, documentation, benchmarking
//! and other reserved ranges; IPv4-mapped, IPv4-compatible, NAT64 and 6to4 IPv6 addresses are
//! judged by the IPv4 address inside. See [`non_public_reason`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, LazyLock};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use reqwest::Url;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// A target that must not be contacted. Retrying cannot help until the allow-list changes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("refused {target}: {reason}")]
pub struct Refused {
    /// The host, or the URL without its query and user info.
    pub target: String,
    pub reason: String,
}

/// Which non-public addresses may still be contacted (operator-configured CIDRs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddressPolicy {
    allow: Vec<IpNet>,
}

impl AddressPolicy {
    /// Parses comma- or space-separated CIDRs (`10.1.0.0/16`, `::1/128`); a bare address
    /// means just that address.
    pub fn parse<S: AsRef<str>>(cidrs: &[S]) -> Result<Self, String> {
        let mut allow = Vec::new();
        for item in cidrs
            .iter()
            .flat_map(|s| s.as_ref().split([',', ' ']))
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            let net = match item.parse::<IpNet>() {
                Ok(net) => net,
                Err(_) => item
                    .parse::<IpAddr>()
                    .map(IpNet::from)
                    .map_err(|_| format!("{item:?} is not a CIDR (e.g. 10.0.0.0/8)"))?,
            };
            allow.push(net.trunc());
        }
        Ok(Self { allow })
    }

    /// Ok when `ip` is public or allow-listed; otherwise the reason it is refused.
    pub fn check(&self, ip: IpAddr) -> Result<(), &'static str> {
        let ip = ip.to_canonical();
        match non_public_reason(ip) {
            None => Ok(()),
            Some(_) if self.allow.iter().any(|net| net.contains(&ip)) => Ok(()),
            Some(reason) => Err(reason),
        }
    }
}

/// Why `ip` is not a public unicast address, or `None` when it is. IPv4-mapped,
/// IPv4-compatible, NAT64 and 6to4 IPv6 addresses are judged by the IPv4 address inside.
pub fn non_public_reason(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => v4_reason(v4),
        IpAddr::V6(v6) => v6_reason(v6),
    }
}

static V4_RANGES: LazyLock<Vec<(Ipv4Net, &'static str)>> = LazyLock::new(|| {
    [
        ("0.0.0.0/8", "unspecified (this network)"),
        ("10.0.0.0/8", "private (RFC 1918)"),
        ("100.64.0.0/10", "carrier-grade NAT (RFC 6598)"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local (cloud metadata)"),
        ("172.16.0.0/12", "private (RFC 1918)"),
        ("192.0.0.0/24", "IETF protocol assignments"),
        ("192.0.2.0/24", "documentation (TEST-NET-1)"),
        ("192.88.99.0/24", "6to4 relay anycast"),
        ("192.168.0.0/16", "private (RFC 1918)"),
        ("198.18.0.0/15", "benchmarking"),
        ("198.51.100.0/24", "documentation (TEST-NET-2)"),
        ("203.0.113.0/24", "documentation (TEST-NET-3)"),
        ("224.0.0.0/4", "multicast"),
        ("255.255.255.255/32", "broadcast"),
        ("240.0.0.0/4", "reserved"),
    ]
    .into_iter()
    .map(|(net, reason)| (net.parse().expect("valid IPv4 range"), reason))
    .collect()
});

static V6_RANGES: LazyLock<Vec<(Ipv6Net, &'static str)>> = LazyLock::new(|| {
    [
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("64:ff9b:1::/48", "local-use NAT64"),
        ("100::/64", "discard-only"),
        ("2001::/32", "Teredo tunnelling"),
        ("2001:db8::/32", "documentation"),
        ("2001::/23", "IETF protocol assignments"),
        ("3fff::/20", "documentation"),
        ("fc00::/7", "unique-local"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local (deprecated)"),
        ("ff00::/8", "multicast"),
    ]
    .into_iter()
    .map(|(net, reason)| (net.parse().expect("valid IPv6 range"), reason))
    .collect()
});

fn v4_reason(ip: Ipv4Addr) -> Option<&'static str> {
    V4_RANGES
        .iter()
        .find(|(net, _)| net.contains(&ip))
        .map(|(_, reason)| *reason)
}

fn v6_reason(ip: Ipv6Addr) -> Option<&'static str> {
    if let Some(reason) = V6_RANGES
        .iter()
        .find(|(net, _)| net.contains(&ip))
        .map(|(_, reason)| *reason)
    {
        return Some(reason);
    }
    let segments = ip.segments();
    let octets = ip.octets();
    let embedded =
        |at: usize| Ipv4Addr::new(octets[at], octets[at + 1], octets[at + 2], octets[at + 3]);
    // ::ffff:a.b.c.d (IPv4-mapped): the IPv4 address is what a dual-stack socket reaches.
    if let Some(v4) = ip.to_ipv4_mapped() {
        return v4_reason(v4);
    }
    // ::a.b.c.d (IPv4-compatible, deprecated): never public.
    if segments[..6].iter().all(|s| *s == 0) {
        return Some(v4_reason(embedded(12)).unwrap_or("IPv4-compatible (deprecated)"));
    }
    // 64:ff9b::a.b.c.d (well-known NAT64 prefix) reaches the IPv4 address inside.
    if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return v4_reason(embedded(12));
    }
    // 2002:aabb:ccdd::/48 (6to4) tunnels to the IPv4 address in bits 16..48.
    if segments[0] == 0x2002 {
        return v4_reason(embedded(2));
    }
    None
}

/// Checks what can be checked without DNS: scheme (http or https; https only when
/// `https_only`), a host, and an IP-literal host's address. Returns the parsed URL.
pub fn check_url(url: &str, policy: &AddressPolicy, https_only: bool) -> Result<Url, Refused> {
    let parsed = Url::parse(url).map_err(|error| Refused {
        target: redact(url),
        reason: format!("not a valid URL: {error}"),
    })?;
    check_parsed(&parsed, policy, https_only)?;
    Ok(parsed)
}

/// [`check_url`] of a parsed URL.
pub fn check_parsed(url: &Url, policy: &AddressPolicy, https_only: bool) -> Result<(), Refused> {
    let refused = |reason: String| Refused {
        target: redact(url.as_str()),
        reason,
    };
    match url.scheme() {
        "https" => {}
        "http" if !https_only => {}
        "http" => {
            return Err(refused(
                "only https URLs are allowed (https_only)".to_owned(),
            ));
        }
        other => return Err(refused(format!("scheme {other:?} is not http or https"))),
    }
    // The URL parser normalizes IP literals (`http://2130706433/` is `127.0.0.1`), and hyper
    // connects to a literal without asking the resolver: this is the check for them.
    let host = match url.host_str() {
        Some(host) if !host.is_empty() => host,
        _ => return Err(refused("the URL has no host".to_owned())),
    };
    let ip = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .ok();
    if let Some(ip) = ip
        && let Err(reason) = policy.check(ip)
    {
        return Err(refused(format!("{ip} is {reason} and not allow-listed")));
    }
    Ok(())
}

/// A redirect policy that follows at most `max_hops` redirects and runs [`check_parsed`] on
/// each hop's URL (http or https, IP literals checked; host names are checked by the
/// [`GuardedResolver`] when the hop connects). A refused hop fails the request with a
/// [`Refused`] in its source chain (see [`find_refusal`]).
pub fn redirect_policy(policy: Arc<AddressPolicy>, max_hops: usize) -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(move |attempt| {
        // `previous` holds the original URL and every hop followed so far.
        if attempt.previous().len() > max_hops {
            let target = redact(attempt.url().as_str());
            return attempt.error(Refused {
                target,
                reason: format!("more than {max_hops} redirects"),
            });
        }
        match check_parsed(attempt.url(), &policy, false) {
            Ok(()) => attempt.follow(),
            Err(refused) => {
                let hop = attempt.previous().len();
                attempt.error(Refused {
                    reason: format!("{} (redirect {hop})", refused.reason),
                    ..refused
                })
            }
        }
    })
}

/// A DNS resolver that drops every address the policy refuses, and fails when none is left.
#[derive(Debug, Clone)]
pub struct GuardedResolver {
    policy: Arc<AddressPolicy>,
}

impl GuardedResolver {
    pub fn new(policy: Arc<AddressPolicy>) -> Self {
        Self { policy }
    }
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let resolved: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut refusal = None;
            let allowed: Vec<SocketAddr> = resolved
                .into_iter()
                .filter(|addr| match policy.check(addr.ip()) {
                    Ok(()) => true,
                    Err(reason) => {
                        refusal.get_or_insert((addr.ip(), reason));
                        false
                    }
                })
                .collect();
            if allowed.is_empty() {
                let reason = match refusal {
                    Some((ip, reason)) => {
                        format!("it resolves to {ip}, which is {reason} and not allow-listed")
                    }
                    None => "it resolves to no address".to_owned(),
                };
                return Err(Box::new(Refused {
                    target: host,
                    reason,
                }) as _);
            }
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}

/// The [`Refused`] somewhere in an error's source chain, if a guard refused the connection.
pub fn find_refusal<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a Refused> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(error) = current {
        if let Some(refused) = error.downcast_ref::<Refused>() {
            return Some(refused);
        }
        current = error.source();
    }
    None
}

/// `scheme://host/path` of a URL, without user info, query or fragment (a dropped query is
/// marked `?[redacted]`): signed URLs carry their signature in the query.
fn redact(url: &str) -> String {
    let without_query = url.split(['?', '#']).next().unwrap_or_default();
    let (scheme, rest) = match without_query.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, without_query),
    };
    let (authority, path) = match rest.find('/') {
        Some(index) => rest.split_at(index),
        None => (rest, ""),
    };
    let host = authority.rsplit('@').next().unwrap_or_default();
    let query = if without_query.len() < url.len() {
        "?[redacted]"
    } else {
        ""
    };
    match scheme {
        Some(scheme) => format!("{scheme}://{host}{path}{query}"),
        None => format!("{host}{path}{query}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(ip: &str) -> Option<&'static str> {
        non_public_reason(ip.parse().unwrap())
    }

    #[test]
    fn classifies_addresses() {
        let table: &[(&str, Option<&str>)] = &[
            ("127.0.0.1", Some("loopback")),
            ("127.255.0.9", Some("loopback")),
            ("10.0.0.1", Some("private (RFC 1918)")),
            ("172.16.5.4", Some("private (RFC 1918)")),
            ("172.31.255.255", Some("private (RFC 1918)")),
            ("192.168.1.1", Some("private (RFC 1918)")),
            ("169.254.169.254", Some("link-local (cloud metadata)")),
            ("100.64.0.1", Some("carrier-grade NAT (RFC 6598)")),
            ("100.127.255.254", Some("carrier-grade NAT (RFC 6598)")),
            ("0.0.0.0", Some("unspecified (this network)")),
            ("224.0.0.251", Some("multicast")),
            ("255.255.255.255", Some("broadcast")),
            ("240.0.0.1", Some("reserved")),
            ("192.0.2.10", Some("documentation (TEST-NET-1)")),
            ("198.51.100.7", Some("documentation (TEST-NET-2)")),
            ("203.0.113.200", Some("documentation (TEST-NET-3)")),
            ("198.18.0.1", Some("benchmarking")),
            ("::1", Some("loopback")),
            ("::", Some("unspecified")),
            ("fc00::1", Some("unique-local")),
            ("fd12:3456::1", Some("unique-local")),
            ("fe80::1", Some("link-local")),
            ("ff02::1", Some("multicast")),
            ("2001:db8::1", Some("documentation")),
            ("::ffff:127.0.0.1", Some("loopback")),
            ("::ffff:10.0.0.1", Some("private (RFC 1918)")),
            (
                "::ffff:169.254.169.254",
                Some("link-local (cloud metadata)"),
            ),
            ("::127.0.0.1", Some("loopback")),
            ("::8.8.8.8", Some("IPv4-compatible (deprecated)")),
            ("64:ff9b::a9fe:a9fe", Some("link-local (cloud metadata)")),
            ("64:ff9b::6440:1", Some("carrier-grade NAT (RFC 6598)")),
            ("2002:7f00:1::", Some("loopback")),
            ("2002:a9fe:a9fe::1", Some("link-local (cloud metadata)")),
            // Public addresses pass.
            ("8.8.8.8", None),
            ("1.1.1.1", None),
            ("100.63.255.255", None),
            ("172.32.0.1", None),
            ("169.253.0.1", None),
            ("2606:4700:4700::1111", None),
            ("::ffff:8.8.8.8", None),
            ("64:ff9b::808:808", None),
            ("2002:808:808::1", None),
        ];
        for (ip, expected) in table {
            assert_eq!(reason(ip), *expected, "{ip}");
        }
    }

    #[test]
    fn allow_list_admits_only_its_ranges() {
        let policy = AddressPolicy::parse(&["127.0.0.1/32, 10.1.0.0/16", "fd00::1"]).unwrap();
        assert_eq!(policy.check("127.0.0.1".parse().unwrap()), Ok(()));
        assert_eq!(policy.check("::ffff:127.0.0.1".parse().unwrap()), Ok(()));
        assert_eq!(policy.check("127.0.0.2".parse().unwrap()), Err("loopback"));
        assert_eq!(policy.check("10.1.2.3".parse().unwrap()), Ok(()));
        assert_eq!(
            policy.check("10.2.0.1".parse().unwrap()),
            Err("private (RFC 1918)")
        );
        assert_eq!(policy.check("fd00::1".parse().unwrap()), Ok(()));
        assert_eq!(policy.check("::1".parse().unwrap()), Err("loopback"));
        assert_eq!(policy.check("8.8.8.8".parse().unwrap()), Ok(()));
        assert!(AddressPolicy::parse(&["10.0.0.0/33"]).is_err());
        assert!(AddressPolicy::parse(&["localhost"]).is_err());
        assert_eq!(
            AddressPolicy::parse::<&str>(&[]).unwrap(),
            AddressPolicy::default()
        );
    }

    #[test]
    fn urls_are_checked_before_any_connection() {
        let none = AddressPolicy::default();
        for url in [
            "http://127.0.0.1:8080/hook",
            "http://[::1]/",
            "http://10.0.0.1/",
            "http://169.254.169.254/latest/meta-data/",
            "http://[::ffff:127.0.0.1]/",
            "http://[::ffff:a9fe:a9fe]/",
            "http://[64:ff9b::7f00:1]/",
            "http://[2002:7f00:1::1]/",
            "http://100.100.100.200/",
            "http://2130706433/",
            "http://0x7f.1/",
            "http://0/",
        ] {
            let error = check_url(url, &none, false).unwrap_err();
            assert!(error.reason.contains("not allow-listed"), "{url}: {error}");
        }
        for (url, why) in [
            ("ftp://example.com/", "is not http or https"),
            ("file:///etc/passwd", "is not http or https"),
            ("http://example.com/", "only https"),
            ("not a url", "not a valid URL"),
        ] {
            let error = check_url(url, &none, true).unwrap_err();
            assert!(error.reason.contains(why), "{url}: {error}");
        }
        check_url("https://example.com/hook?token=1", &none, true).unwrap();
        check_url("http://localhost:1/", &none, false).unwrap();
        let error = check_url("http://u:pw@10.0.0.1/v.mp4?token=secret", &none, false).unwrap_err();
        assert_eq!(error.target, "http://10.0.0.1/v.mp4?[redacted]");
        assert!(!error.to_string().contains("secret"), "{error}");
        let loopback = AddressPolicy::parse(&["127.0.0.1/32"]).unwrap();
        check_url("http://127.0.0.1:9/", &loopback, false).unwrap();
    }

    #[tokio::test]
    async fn resolver_filters_what_dns_returns() {
        let guarded = GuardedResolver::new(Arc::new(AddressPolicy::default()));
        let error = match guarded.resolve("localhost".parse().unwrap()).await {
            Ok(addrs) => panic!("localhost resolved to {:?}", addrs.collect::<Vec<_>>()),
            Err(error) => error,
        };
        let refused = find_refusal(error.as_ref()).expect("a refusal");
        assert_eq!(refused.target, "localhost");
        assert!(refused.reason.contains("loopback"), "{refused}");

        let allowed =
            GuardedResolver::new(Arc::new(AddressPolicy::parse(&["127.0.0.1/32"]).unwrap()));
        let addrs: Vec<SocketAddr> = allowed
            .resolve("localhost".parse().unwrap())
            .await
            .unwrap()
            .collect();
        assert!(!addrs.is_empty());
        assert!(
            addrs.iter().all(|a| a.ip() == IpAddr::from([127, 0, 0, 1])),
            "{addrs:?}"
        );
    }
}
