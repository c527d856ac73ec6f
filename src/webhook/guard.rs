//! The SSRF guard: webhooks never reach loopback, private, link-local (the
//! cloud metadata address among them), CGNAT, multicast, unspecified or IPv6
//! ULA/link-local addresses unless `webhook.allow_cidrs` covers them, nor the
//! reserved, documentation and benchmarking ranges, nor a cloud metadata
//! address. An IPv6 address that carries an IPv4 address to a gateway
//! (NAT64, 6to4, Teredo) is judged by the IPv4 address inside.
//!
//! Every address a name resolves to is checked, IPv4-mapped IPv6 addresses
//! are folded to IPv4 first, and the HTTP client connects only through
//! [`GuardedResolver`], which hands it checked addresses — so a name that
//! resolves to something else on the second lookup (DNS rebinding) still
//! cannot reach a refused address. IP literals in URLs bypass resolvers and
//! are checked by [`check_url`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

pub use crate::cidr::{fold, prefix_eq, Cidr};

/// Why an address is refused, or `None` if it is a public address.
pub fn refused_kind(ip: IpAddr) -> Option<String> {
    match fold(ip) {
        IpAddr::V4(a) => v4_kind(a).map(String::from),
        IpAddr::V6(a) => match embedded_v4(a) {
            // An address that carries an IPv4 address to a gateway that will
            // connect to it: judged by that IPv4 address.
            Some((form, v4)) => v4_kind(v4).map(|k| format!("{k} address ({v4}) in {form}")),
            None => v6_kind(a).map(String::from),
        },
    }
}

fn v4_kind(a: Ipv4Addr) -> Option<&'static str> {
    let o = a.octets();
    let within = |net: [u8; 4], bits: u8| prefix_eq(&net, &o, bits);
    if a.is_unspecified() || o[0] == 0 {
        Some("unspecified")
    } else if a.is_loopback() {
        Some("loopback")
    } else if a.is_private() {
        Some("private")
    } else if a.is_link_local() {
        Some("link-local")
    } else if within([100, 64, 0, 0], 10) {
        Some("CGNAT")
    } else if a.is_multicast() {
        Some("multicast")
    } else if a.is_broadcast() || o[0] >= 240 {
        Some("reserved")
    } else if within([192, 0, 0, 0], 24) {
        Some("IETF protocol assignment")
    } else if within([198, 18, 0, 0], 15) {
        Some("benchmarking")
    } else if within([192, 0, 2, 0], 24)
        || within([198, 51, 100, 0], 24)
        || within([203, 0, 113, 0], 24)
    {
        Some("documentation")
    } else if o == [168, 63, 129, 16] {
        // Azure's wire server and metadata endpoint: a public-looking address.
        Some("cloud metadata")
    } else {
        None
    }
}

/// The IPv4 address inside an IPv6 address that a gateway would connect to:
/// NAT64 (`64:ff9b::/96`, RFC 6052), 6to4 (`2002::/16`), Teredo (`2001::/32`,
/// the client address, stored inverted) and IPv4-translated (`::ffff:0:0:0/96`).
fn embedded_v4(a: Ipv6Addr) -> Option<(&'static str, Ipv4Addr)> {
    let s = a.segments();
    let v4 = |hi: u16, lo: u16| Ipv4Addr::from(((hi as u32) << 16) | lo as u32);
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        Some(("a NAT64 address", v4(s[6], s[7])))
    } else if s[0] == 0x2002 {
        Some(("a 6to4 address", v4(s[1], s[2])))
    } else if s[0] == 0x2001 && s[1] == 0 {
        Some(("a Teredo address", v4(!s[6], !s[7])))
    } else if s[..6] == [0, 0, 0, 0, 0xffff, 0] {
        Some(("an IPv4-translated address", v4(s[6], s[7])))
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
    } else if (s[0] & 0xffc0) == 0xfec0 {
        Some("site-local")
    } else if s[..6] == [0; 6] {
        Some("IPv4-compatible")
    } else if s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1 {
        // 64:ff9b:1::/48, NAT64 for local use (RFC 8215): private by definition.
        Some("local-use NAT64")
    } else if s[0] == 0x2001 && s[1] == 0xdb8 {
        Some("documentation")
    } else if s[..4] == [0x100, 0, 0, 0] {
        Some("discard-only")
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
            allow: allow_cidrs
                .iter()
                .filter_map(|c| Cidr::parse(c).ok())
                .collect(),
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
        let addrs: Vec<SocketAddr> = super::dns::lookup(host, port)
            .await
            .map_err(|e| format!("cannot resolve {host}: {e}"))?;
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
            // NAT64, 6to4, Teredo and IPv4-translated forms of refused addresses
            "64:ff9b::a9fe:a9fe",
            "64:ff9b::127.0.0.1",
            "64:ff9b::10.0.0.1",
            "64:ff9b:1::8.8.8.8",
            "2002:a9fe:a9fe::1",
            "2002:7f00:1::",
            "2002:c0a8:101::1",
            "2001:0:4136:e378:8000:63bf:5601:5601", // Teredo, client 169.254.169.254 inverted
            "::ffff:0:a9fe:a9fe",
            // ranges the guard missed before
            "fec0::1",
            "feff::1",
            "198.18.0.1",
            "198.19.255.255",
            "192.0.0.1",
            "192.0.0.170",
            "168.63.129.16",
            "192.0.2.1",
            "198.51.100.7",
            "203.0.113.9",
            "2001:db8::1",
            "100::1",
        ] {
            assert!(g.check(ip(bad)).is_err(), "{bad} should be refused");
        }
        let m = g.check(ip("64:ff9b::a9fe:a9fe")).unwrap_err();
        assert!(
            m.contains("link-local") && m.contains("169.254.169.254") && m.contains("NAT64"),
            "{m}"
        );
        for good in [
            "93.184.216.34",
            "8.8.8.8",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "100.128.0.1",
            "172.32.0.1",
            "64:ff9b::8.8.8.8",
            "2002:0808:0808::1",
            "198.20.0.1",
            "192.0.1.1",
            "168.63.129.17",
            "2001:4860:4860::8888",
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
        assert!(Cidr::parse("192.168.0.0/33").is_err());
        assert!(Cidr::parse("nope").is_err());
        assert!(Cidr::parse("::ffff:10.0.0.0/104")
            .unwrap()
            .contains(ip("10.1.1.1")));
        assert!(!Cidr::parse("::ffff:10.0.0.0/104")
            .unwrap()
            .contains(ip("11.1.1.1")));
        // Once silently an IPv4 /0: everything allowed.
        let e = Cidr::parse("::ffff:10.0.0.0/64").unwrap_err();
        assert!(e.contains("::ffff:10.0.0.0/64") && e.contains("96"), "{e}");
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
