//! The SSRF guard: webhooks never reach loopback, private, link-local (the
//! cloud metadata address among them), CGNAT, multicast, unspecified or IPv6
//! ULA/link-local addresses unless `webhook.allow_cidrs` covers them.
//!
//! Every address a name resolves to is checked, IPv4-mapped IPv6 addresses
//! are folded to IPv4 first, and the HTTP client connects only through
//! [`GuardedResolver`], which hands it checked addresses — so a name that
//! resolves to something else on the second lookup (DNS rebinding) still
//! cannot reach a refused address. IP literals in URLs bypass resolvers and
//! are checked by [`check_url`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

/// An address range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    bits: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Option<Cidr> {
        let (a, b) = match s.split_once('/') {
            Some((a, b)) => (a, Some(b)),
            None => (s, None),
        };
        let net: IpAddr = a.trim().parse().ok()?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let bits = match b {
            Some(b) => b.trim().parse().ok().filter(|&n: &u8| n <= max)?,
            None => max,
        };
        Some(Cidr {
            net: fold(net),
            bits: if net.is_ipv6() && fold(net).is_ipv4() {
                bits.saturating_sub(96)
            } else {
                bits
            },
        })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, fold(ip)) {
            (IpAddr::V4(n), IpAddr::V4(a)) => prefix_eq(&n.octets(), &a.octets(), self.bits),
            (IpAddr::V6(n), IpAddr::V6(a)) => prefix_eq(&n.octets(), &a.octets(), self.bits),
            _ => false,
        }
    }
}

fn prefix_eq(a: &[u8], b: &[u8], bits: u8) -> bool {
    let full = (bits / 8) as usize;
    if a[..full] != b[..full] {
        return false;
    }
    let rest = bits % 8;
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    (a[full] & mask) == (b[full] & mask)
}

/// `::ffff:a.b.c.d` is `a.b.c.d`.
pub fn fold(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// Why an address is refused, or `None` if it is a public address.
pub fn refused_kind(ip: IpAddr) -> Option<&'static str> {
    match fold(ip) {
        IpAddr::V4(a) => v4_kind(a),
        IpAddr::V6(a) => v6_kind(a),
    }
}

fn v4_kind(a: Ipv4Addr) -> Option<&'static str> {
    let o = a.octets();
    if a.is_unspecified() || o[0] == 0 {
        Some("unspecified")
    } else if a.is_loopback() {
        Some("loopback")
    } else if a.is_private() {
        Some("private")
    } else if a.is_link_local() {
        Some("link-local")
    } else if o[0] == 100 && (64..128).contains(&o[1]) {
        Some("CGNAT")
    } else if a.is_multicast() {
        Some("multicast")
    } else if a.is_broadcast() || o[0] >= 240 {
        Some("reserved")
    } else {
        None
    }
}

fn v6_kind(a: Ipv6Addr) -> Option<&'static str> {
    let s = a.segments();
    if a.is_unspecified() {
        Some("unspecified")
    } else if a.is_loopback() {
        Some("loopback")
    } else if a.is_multicast() {
        Some("multicast")
    } else if (s[0] & 0xfe00) == 0xfc00 {
        Some("unique-local")
    } else if (s[0] & 0xffc0) == 0xfe80 {
        Some("link-local")
    } else if s[0] == 0 && s[1] == 0 && s[2] == 0 && s[3] == 0 && s[4] == 0 && s[5] == 0 {
        Some("IPv4-compatible")
    } else {
        None
    }
}

/// The policy: refused ranges, minus what `allow_cidrs` lets through.
#[derive(Debug, Clone, Default)]
pub struct Guard {
    allow: Vec<Cidr>,
}

impl Guard {
    pub fn new(allow_cidrs: &[String]) -> Guard {
        Guard {
            allow: allow_cidrs.iter().filter_map(|c| Cidr::parse(c)).collect(),
        }
    }

    /// `Err(reason)` if `ip` may not be connected to.
    pub fn check(&self, ip: IpAddr) -> Result<(), String> {
        match refused_kind(ip) {
            None => Ok(()),
            Some(_) if self.allow.iter().any(|c| c.contains(ip)) => Ok(()),
            Some(kind) => Err(format!(
                "{} is a {kind} address (add it to webhook.allow_cidrs to allow it)",
                fold(ip)
            )),
        }
    }

    /// Resolves `host` and keeps the allowed addresses; `Err` says why none is left.
    pub async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| format!("cannot resolve {host}: {e}"))?
            .collect();
        let mut ok = Vec::new();
        let mut why = Vec::new();
        for a in addrs {
            match self.check(a.ip()) {
                Ok(()) => ok.push(SocketAddr::new(fold(a.ip()), a.port())),
                Err(e) => why.push(e),
            }
        }
        if ok.is_empty() {
            if why.is_empty() {
                return Err(format!("{host} resolves to no address"));
            }
            return Err(format!("{host}: {}", why.join("; ")));
        }
        Ok(ok)
    }
}

/// Checks a URL before any connection: scheme, and the host if it is an IP
/// literal (those never go through the resolver).
pub fn check_url(guard: &Guard, url: &reqwest::Url) -> Result<(), String> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("scheme {:?} is not http or https", url.scheme()));
    }
    match url.host() {
        Some(url::Host::Ipv4(a)) => guard.check(IpAddr::V4(a)),
        Some(url::Host::Ipv6(a)) => guard.check(IpAddr::V6(a)),
        Some(url::Host::Domain(_)) => Ok(()),
        None => Err("the URL has no host".into()),
    }
}

/// The HTTP client's resolver: only checked addresses are ever connected to.
#[derive(Debug, Clone)]
pub struct GuardedResolver(pub Arc<Guard>);

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let guard = self.0.clone();
        Box::pin(async move {
            let addrs = guard
                .resolve(name.as_str(), 0)
                .await
                .map_err(|e| -> Box<dyn std::error::Error + Send + Sync> { e.into() })?;
            let it: reqwest::dns::Addrs = Box::new(addrs.into_iter());
            Ok(it)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn refused_ranges() {
        let g = Guard::default();
        for bad in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.5.4",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "224.0.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "::1",
            "::",
            "fc00::1",
            "fd12::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
        ] {
            assert!(g.check(ip(bad)).is_err(), "{bad} should be refused");
        }
        for good in [
            "93.184.216.34",
            "8.8.8.8",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "100.128.0.1",
            "172.32.0.1",
        ] {
            assert!(g.check(ip(good)).is_ok(), "{good} should be allowed");
        }
    }

    #[test]
    fn allow_cidrs_open_holes_and_mapped_addresses_fold() {
        let g = Guard::new(&["127.0.0.1/32".into(), "fd00::/8".into()]);
        assert!(g.check(ip("127.0.0.1")).is_ok());
        assert!(
            g.check(ip("::ffff:127.0.0.1")).is_ok(),
            "folded to 127.0.0.1"
        );
        assert!(g.check(ip("127.0.0.2")).is_err());
        assert!(g.check(ip("fd12::1")).is_ok());
        assert!(g.check(ip("fc00::1")).is_err());
        let msg = g.check(ip("169.254.169.254")).unwrap_err();
        assert!(
            msg.contains("link-local") && msg.contains("allow_cidrs"),
            "{msg}"
        );
    }

    #[test]
    fn cidr_parsing() {
        assert!(Cidr::parse("10.0.0.0/8")
            .unwrap()
            .contains(ip("10.200.1.1")));
        assert!(!Cidr::parse("10.0.0.0/8").unwrap().contains(ip("11.0.0.1")));
        assert!(Cidr::parse("192.168.0.0/33").is_none());
        assert!(Cidr::parse("nope").is_none());
        assert!(Cidr::parse("::ffff:10.0.0.0/104")
            .unwrap()
            .contains(ip("10.1.1.1")));
    }

    #[test]
    fn ip_literals_in_urls_are_checked() {
        let g = Guard::default();
        let u = |s: &str| reqwest::Url::parse(s).unwrap();
        assert!(check_url(&g, &u("http://169.254.169.254/latest/meta-data")).is_err());
        assert!(check_url(&g, &u("http://[::ffff:127.0.0.1]:8080/x")).is_err());
        assert!(check_url(&g, &u("http://10.1.2.3/")).is_err());
        assert!(check_url(&g, &u("https://example.com/")).is_ok());
        assert!(check_url(&g, &u("ftp://example.com/")).is_err());
    }

    #[tokio::test]
    async fn names_that_resolve_to_loopback_are_refused() {
        let g = Guard::default();
        let e = g.resolve("localhost", 80).await.unwrap_err();
        assert!(e.contains("loopback"), "{e}");
    }
}
