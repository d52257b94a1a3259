//! VIPs kept clear of the overlay's service IPs and remote nodes. The two
//! are written by different plugins into one uplink program, which matches
//! VIPs first: a service IP inside a VIP is balanced on the uplink but
//! translated from containers, and a node inside a VIP makes whoever sends
//! from the VIP's address a tunnel peer. Only a new overlap is refused, so
//! a removal always passes.

use std::collections::BTreeSet;
use std::net::IpAddr;

use tapmesh_common::lb::VipKey;

use super::{overlay::OverlayTables, DataplaneError};

/// The overlay's addresses a VIP must not hold, with what each is.
pub fn overlay_addresses(t: &OverlayTables) -> BTreeSet<(IpAddr, &'static str)> {
    let services = t.services.keys().map(|a| (IpAddr::V4(*a), "service IP"));
    let services6 = t.services6.keys().map(|a| (IpAddr::V6(*a), "service IP"));
    let nodes = super::overlay::remote_nodes(t)
        .into_iter()
        .map(|a| (IpAddr::V4(a), "remote node"));
    services.chain(services6).chain(nodes).collect()
}

/// Whether the VIP prefix `key` (IPv4 as mapped IPv6) holds `addr`.
pub fn holds(key: &VipKey, addr: IpAddr) -> bool {
    let octets = match addr {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    };
    let len = key.prefix_len.min(128);
    let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
    u128::from_be_bytes(key.addr) & mask == u128::from_be_bytes(octets) & mask
}

/// Refuses a VIP of `vips` holding one of `addresses`, unless that pair
/// is in `before` (written already: not made by this change).
pub fn check<'a>(
    vips: impl IntoIterator<Item = (&'a str, &'a VipKey)> + Clone,
    addresses: &BTreeSet<(IpAddr, &'static str)>,
    before: impl Fn(&str, &VipKey, IpAddr) -> bool,
) -> Result<(), DataplaneError> {
    for (addr, kind) in addresses {
        for (name, key) in vips.clone() {
            if holds(key, *addr) && !before(name, key, *addr) {
                return Err(DataplaneError::Overlap(format!(
                    "the overlay's {kind} {addr} lies inside VIP {name:?}: the uplink would \
                     balance what the overlay carries; keep VIPs and the overlay's addresses apart"
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(addr: IpAddr, len: u32) -> VipKey {
        let (addr, len) = match addr {
            IpAddr::V4(a) => (a.to_ipv6_mapped().octets(), len + 96),
            IpAddr::V6(a) => (a.octets(), len),
        };
        VipKey {
            prefix_len: len,
            addr,
        }
    }

    #[test]
    fn a_prefix_holds_what_its_bits_cover_and_no_other_family() {
        let v = key("203.0.113.0".parse().unwrap(), 24);
        assert!(holds(&v, "203.0.113.77".parse().unwrap()));
        assert!(!holds(&v, "203.0.114.1".parse().unwrap()));
        assert!(!holds(&v, "2001:db8::1".parse().unwrap()));
        let host = key("2001:db8::1".parse().unwrap(), 128);
        assert!(holds(&host, "2001:db8::1".parse().unwrap()));
        assert!(!holds(&host, "2001:db8::2".parse().unwrap()));
    }

    #[test]
    fn only_an_overlap_not_written_before_is_refused() {
        let v = key("203.0.113.10".parse().unwrap(), 32);
        let addrs: BTreeSet<(IpAddr, &str)> = [("203.0.113.10".parse().unwrap(), "service IP")]
            .into_iter()
            .collect();
        let err = check([("web", &v)], &addrs, |_, _, _| false).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the overlay's service IP 203.0.113.10 lies inside VIP \"web\": the uplink would \
             balance what the overlay carries; keep VIPs and the overlay's addresses apart"
        );
        assert!(check([("web", &v)], &addrs, |_, _, _| true).is_ok());
        let other = key("198.51.100.0".parse().unwrap(), 24);
        assert!(check([("other", &other)], &addrs, |_, _, _| false).is_ok());
    }
}
