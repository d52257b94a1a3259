//! The one place that talks to the kernel's network configuration: links,
//! addresses, routes, rules, neighbours, ethtool, namespaces, qdiscs and
//! nftables. Plugins call these functions; none of them opens a netlink
//! socket, calls an ioctl or spawns `ip`/`nft` itself.
//!
//! * [`Prefix`] is the one prefix type (addresses with a length, VIPs,
//!   pools, flows' source subnets).
//! * [`link`] is the one interface lookup (name → index, index → name, MAC,
//!   MTU), over netlink in the calling thread's namespace.
//! * [`neigh`] is the one neighbour resolver and the one rule for
//!   "resolved" ([`neigh::usable`]), used by the catalog (backends on a
//!   connected network) and the LB (next hops towards remote nodes).
//! * [`neigh_table`] keeps the daemon namespace's neighbour table, followed
//!   through notifications, so resolving thousands of backends needs no dump.
//! * [`watch`] follows the kernel's link, route and neighbour notifications
//!   (the LB's next hops follow them instead of polling).
//! * [`nft`] writes nftables tables through nf_tables netlink, one table per
//!   transaction.
//! * [`sysctl`] reads and writes the network sysctls (IPv4 forwarding).
//!
//! Reads and dumps use a blocking socket ([`socket`]); changes from async
//! code go through `rtnetlink`'s handle. Both carry netlink-packet-route's
//! message types.

pub mod addr;
pub mod bridge;
pub mod ethtool;
pub mod link;
pub mod neigh;
pub mod neigh_table;
pub mod netns;
pub mod nft;
pub mod peer;
pub mod prefix;
pub mod qdisc;
pub mod route;
pub(crate) mod socket;
pub mod sysctl;
pub mod tap;
pub mod veth;
pub mod watch;

use std::{fs::File, os::fd::AsRawFd};

pub use link::Link;
pub use neigh::Hop;
pub use prefix::{Prefix, PrefixError};

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("invalid input: {0}")]
    Invalid(String),
    #[error("opening a netlink socket in {netns}: {source}")]
    Socket {
        netns: String,
        source: std::io::Error,
    },
    #[error("interface {ifname} not found in {netns}")]
    NotFound { ifname: String, netns: String },
    #[error("interface {0:?} does not exist")]
    NoInterface(String),
    #[error("interface {0:?} has no Ethernet address")]
    NotEthernet(String),
    #[error("{op} on {ifname} in {netns}: {source}")]
    Netlink {
        op: String,
        ifname: String,
        netns: String,
        source: Box<rtnetlink::Error>,
    },
    #[error("{op} on {ifname} in {netns}: {source}")]
    Os {
        op: String,
        ifname: String,
        netns: String,
        source: std::io::Error,
    },
    #[error("{op}: {source}")]
    Kernel { op: String, source: std::io::Error },
    /// A container without the host's view of namespaces.
    #[error("the namespace of the veth peer of {ifname} (nsid {nsid}) is not visible here (neither in /run/netns nor held by a process in /proc); mount the host's /run/netns and share the host's pid namespace (the DaemonSet's hostPID)")]
    PeerNamespaceUnseen { ifname: String, nsid: i32 },
}

impl NetError {
    pub(crate) fn kernel(op: impl Into<String>) -> impl FnOnce(std::io::Error) -> NetError {
        let op = op.into();
        move |source| NetError::Kernel { op, source }
    }
}

pub(crate) const CURRENT: &str = "the current namespace";

/// Where an operation happens, for error messages.
#[derive(Clone, Copy)]
pub(crate) struct At<'a> {
    pub ifname: &'a str,
    pub netns: &'a str,
}

impl<'a> At<'a> {
    pub fn here(ifname: &'a str) -> Self {
        Self {
            ifname,
            netns: CURRENT,
        }
    }

    pub fn nl(self, op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetError {
        let (op, ifname, netns) = (op.into(), self.ifname.to_string(), self.netns.to_string());
        move |source| NetError::Netlink {
            op,
            ifname,
            netns,
            source: Box::new(source),
        }
    }

    pub fn os(self, op: impl Into<String>) -> impl FnOnce(std::io::Error) -> NetError {
        let (op, ifname, netns) = (op.into(), self.ifname.to_string(), self.netns.to_string());
        move |source| NetError::Os {
            op,
            ifname,
            netns,
            source,
        }
    }

    pub fn not_found(self) -> NetError {
        NetError::NotFound {
            ifname: self.ifname.into(),
            netns: self.netns.into(),
        }
    }
}

/// The netlink errno of an error (positive), if it is one.
pub(crate) fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(m.raw_code().abs()),
        _ => None,
    }
}

/// "net:[4026532…]" for a namespace file, for error messages.
pub(crate) fn describe(netns: &File) -> String {
    let fd = netns.as_raw_fd();
    std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| format!("namespace fd {fd}"))
}

/// An address as `Display` writes it; an IPv4 one without the formatter
/// (10 000 backends are named at every EDS update).
pub fn address_text(address: std::net::IpAddr) -> String {
    let std::net::IpAddr::V4(v4) = address else {
        return address.to_string();
    };
    let mut text = String::with_capacity(15);
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            text.push('.');
        }
        if octet >= 100 {
            text.push(char::from(b'0' + octet / 100));
        }
        if octet >= 10 {
            text.push(char::from(b'0' + octet / 10 % 10));
        }
        text.push(char::from(b'0' + octet % 10));
    }
    text
}

/// `mac` as configurations write it: `02:00:5e:00:53:01`.
pub fn mac_text(mac: [u8; 6]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(17);
    for (i, byte) in mac.into_iter().enumerate() {
        if i > 0 {
            text.push(':');
        }
        text.push(char::from(HEX[usize::from(byte >> 4)]));
        text.push(char::from(HEX[usize::from(byte & 0xf)]));
    }
    text
}

/// Refuses what the kernel would not take as an interface name.
pub fn check_ifname(name: &str) -> Result<(), NetError> {
    let ok = !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && !name.bytes().any(|b| b == b'/' || b == b':' || b <= b' ');
    if ok {
        Ok(())
    } else {
        Err(NetError::Invalid(format!(
            "{name:?} is not an interface name"
        )))
    }
}

/// A netlink connection in the current namespace, served on the current
/// runtime until the handle is dropped.
pub(crate) fn netlink_here() -> Result<rtnetlink::Handle, NetError> {
    let socket_error = |source| NetError::Socket {
        netns: CURRENT.into(),
        source,
    };
    let runtime = tokio::runtime::Handle::try_current()
        .map_err(|e| socket_error(std::io::Error::other(e)))?;
    let _entered = runtime.enter();
    let (connection, handle, _) = rtnetlink::new_connection().map_err(socket_error)?;
    runtime.spawn(connection);
    Ok(handle)
}

/// A netlink connection whose socket lives in `netns` (a socket keeps the
/// namespace it was made in), served on the current runtime.
pub(crate) fn netlink_in(netns: &File) -> Result<rtnetlink::Handle, NetError> {
    let socket_error = |source| NetError::Socket {
        netns: describe(netns),
        source,
    };
    let runtime = tokio::runtime::Handle::try_current()
        .map_err(|e| socket_error(std::io::Error::other(e)))?;
    let (connection, handle, _) = netns::run_in(netns, || {
        let _entered = runtime.enter();
        rtnetlink::new_connection()
    })
    .and_then(|r| r)
    .map_err(socket_error)?;
    runtime.spawn(connection);
    Ok(handle)
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_address_reads_as_display_writes_it() {
        for text in [
            "0.0.0.0",
            "9.10.99.100",
            "198.18.0.1",
            "255.255.255.255",
            "2001:db8::1",
            "::ffff:198.18.0.1",
        ] {
            let address: std::net::IpAddr = text.parse().unwrap();
            assert_eq!(super::address_text(address), address.to_string());
        }
        for i in 0..=255u8 {
            let address = std::net::IpAddr::from([i, i.wrapping_mul(7), 0, 255 - i]);
            assert_eq!(super::address_text(address), address.to_string());
        }
    }

    #[test]
    fn a_mac_reads_as_configurations_write_it() {
        for mac in [[0u8; 6], [0x02, 0x00, 0x5e, 0x0a, 0x53, 0xff], [0xff; 6]] {
            let expected = mac.map(|b| format!("{b:02x}")).join(":");
            assert_eq!(super::mac_text(mac), expected);
        }
        assert_eq!(
            super::mac_text([0x02, 0x00, 0x5e, 0x0a, 0x53, 0xff]),
            "02:00:5e:0a:53:ff"
        );
    }
}
