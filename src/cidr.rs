//! Address ranges (`webhook.allow_cidrs`): parsed by the config, used by
//! the webhook guard. A leaf, so the config needs no runtime module.

use std::net::IpAddr;

/// An address range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    bits: u8,
}

impl Cidr {
    /// `"10.0.0.0/8"`, `"fd00::/8"`, or an address alone (a /32 or /128).
    /// An IPv4-mapped network (`::ffff:10.0.0.0/104`) is its IPv4 network;
    /// its prefix must be at least 96, or it would not be one.
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let bad =
            |why: &str| format!("{s:?} is not a CIDR like \"10.0.0.0/8\" or \"fd00::/8\": {why}");
        let (a, b) = match s.split_once('/') {
            Some((a, b)) => (a, Some(b)),
            None => (s, None),
        };
        let net: IpAddr = a.trim().parse().map_err(|_| bad("not an IP address"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let bits = match b {
            Some(b) => b
                .trim()
                .parse()
                .ok()
                .filter(|&n: &u8| n <= max)
                .ok_or_else(|| bad(&format!("the prefix must be 0-{max}")))?,
            None => max,
        };
        if net.is_ipv6() && fold(net).is_ipv4() {
            if bits < 96 {
                return Err(bad(
                    "an IPv4-mapped network (::ffff:a.b.c.d) needs a prefix of 96 or more; \
                     write the IPv4 network instead",
                ));
            }
            return Ok(Cidr {
                net: fold(net),
                bits: bits - 96,
            });
        }
        Ok(Cidr { net, bits })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, fold(ip)) {
            (IpAddr::V4(n), IpAddr::V4(a)) => prefix_eq(&n.octets(), &a.octets(), self.bits),
            (IpAddr::V6(n), IpAddr::V6(a)) => prefix_eq(&n.octets(), &a.octets(), self.bits),
            _ => false,
        }
    }
}

pub fn prefix_eq(a: &[u8], b: &[u8], bits: u8) -> bool {
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
