//! `X-Forwarded-For` from the reverse proxies named in `proxy.trusted_proxies`.
//!
//! Behind Caddy or nginx every connection comes from the proxy, so the caller's address is in
//! `X-Forwarded-For`. The header is believed only when the TCP peer is one of the configured
//! addresses or ranges; from anyone else it is ignored (a stranger could write anything in it).
//! With several proxies in a chain, the rightmost address that is not itself trusted is the
//! caller (each proxy appends the peer it saw). The address is used for logs and refusal
//! accounting only: it never decides what a caller may do, and the header is not forwarded
//! upstream changed.

use std::net::IpAddr;

use http::HeaderMap;

use super::{invalid, ConfigError};

/// One `proxy.trusted_proxies` entry: an address, or a CIDR range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Range {
    net: IpAddr,
    prefix: u8,
}

impl Range {
    fn parse(s: &str) -> Option<Range> {
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p.parse::<u8>().ok()?)),
            None => (s, None),
        };
        let net: IpAddr = addr.parse().ok()?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        (prefix <= max).then_some(Range { net, prefix })
    }

    fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// An IPv4 peer seen on a dual-stack socket as `::ffff:a.b.c.d` is that IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// The parsed `proxy.trusted_proxies`.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<Range>);

impl TrustedProxies {
    /// Parses the entries; the error names the one that is not an address or range.
    pub fn parse(entries: &[String]) -> Result<TrustedProxies, ConfigError> {
        entries
            .iter()
            .map(|e| {
                Range::parse(e).ok_or_else(|| {
                    invalid(
                        "proxy.trusted_proxies",
                        format!("{e:?} is not an IP address or CIDR range; write e.g. \"127.0.0.1\", \"10.0.0.0/8\" or \"fd00::/8\""),
                    )
                })
            })
            .collect::<Result<_, _>>()
            .map(TrustedProxies)
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|r| r.contains(ip))
    }

    /// The caller's address: from `X-Forwarded-For` when `peer` is trusted (the rightmost
    /// entry that is not a trusted proxy itself), else `peer`.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = canonical(peer);
        if self.0.is_empty() || !self.trusts(peer) {
            return peer;
        }
        // Every X-Forwarded-For line, in order, as one list; proxies append on the right.
        let hops: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect();
        let mut client = peer;
        for hop in hops.iter().rev() {
            match parse_hop(hop) {
                Some(ip) => {
                    client = ip;
                    if !self.trusts(ip) {
                        break;
                    }
                }
                // Garbage in the chain: stop at the last address we could believe.
                None => break,
            }
        }
        client
    }
}

/// One `X-Forwarded-For` entry: an address, possibly `[v6]:port` or `v4:port`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    if let Ok(sa) = hop.parse::<std::net::SocketAddr>() {
        return Some(canonical(sa.ip()));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(xff: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in xff {
            h.append("x-forwarded-for", v.parse().unwrap());
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_header_is_believed_only_from_a_trusted_peer() {
        let t = TrustedProxies::parse(&["127.0.0.1".into(), "10.0.0.0/8".into()]).unwrap();
        let h = headers(&["203.0.113.7"]);
        assert_eq!(t.client_ip(ip("127.0.0.1"), &h), ip("203.0.113.7"));
        assert_eq!(t.client_ip(ip("10.9.8.7"), &h), ip("203.0.113.7"));
        assert_eq!(
            t.client_ip(ip("198.51.100.1"), &h),
            ip("198.51.100.1"),
            "a stranger's header is ignored"
        );
        assert_eq!(
            TrustedProxies::default().client_ip(ip("127.0.0.1"), &h),
            ip("127.0.0.1"),
            "nothing trusted by default"
        );
        // Mapped IPv4 peers (dual-stack sockets) match IPv4 entries.
        assert_eq!(t.client_ip(ip("::ffff:127.0.0.1"), &h), ip("203.0.113.7"));
    }

    #[test]
    fn the_rightmost_untrusted_hop_is_the_caller() {
        let t = TrustedProxies::parse(&["10.0.0.0/8".into()]).unwrap();
        // The caller forged a first entry; our two proxies appended what they saw.
        let h = headers(&["1.2.3.4, 203.0.113.7", "10.1.1.1"]);
        assert_eq!(t.client_ip(ip("10.0.0.2"), &h), ip("203.0.113.7"));
        let h = headers(&["garbage, 10.1.1.1"]);
        assert_eq!(t.client_ip(ip("10.0.0.2"), &h), ip("10.1.1.1"));
        let h = headers(&["[2001:db8::1]:4711"]);
        assert_eq!(t.client_ip(ip("10.0.0.2"), &h), ip("2001:db8::1"));
        assert_eq!(
            t.client_ip(ip("10.0.0.2"), &HeaderMap::new()),
            ip("10.0.0.2")
        );
    }

    #[test]
    fn ranges_parse_and_match() {
        for bad in ["", "10.0.0.0/33", "fd00::/129", "example.com", "10.0.0/8"] {
            let e = TrustedProxies::parse(&[bad.into()])
                .unwrap_err()
                .to_string();
            assert!(e.contains("proxy.trusted_proxies"), "{e}");
        }
        let t = TrustedProxies::parse(&["fd00::/8".into(), "0.0.0.0/0".into()]).unwrap();
        assert!(t.trusts(ip("fd12::1")));
        assert!(!t.trusts(ip("fe80::1")));
        assert!(t.trusts(ip("8.8.8.8")));
    }
}
