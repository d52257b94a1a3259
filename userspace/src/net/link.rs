//! Links: the one interface lookup (name → index, index → name, MAC, MTU)
//! in the calling thread's namespace, over a netlink request (not /sys:
//! /sys shows the namespace it was mounted in); and the changes plugins
//! make to links (up, MTU, delete).

use std::fs::File;

use netlink_packet_route::{
    link::{LinkAttribute, LinkExtentMask, LinkMessage},
    RouteNetlinkMessage,
};
use rtnetlink::packet_core::{NetlinkBuffer, NlasIterator};
use rtnetlink::{Handle, LinkUnspec};

use super::socket::Netlink;
use super::{errno, netlink_here, At, NetError, CURRENT};

/// What the kernel says about a link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
    /// The link-layer address, when it is 6 bytes long.
    pub address: Option<[u8; 6]>,
    /// An Ethernet link (or loopback, whose address is all zeroes).
    pub ethernet: bool,
    /// The loopback device: what is sent into it is received by the node.
    pub loopback: bool,
    /// The id of the XDP program attached to it, if any.
    pub xdp_program: Option<u32>,
    /// How that program is attached: "native", "generic", "offload" or
    /// "multiple" (the kernel's `IFLA_XDP_ATTACHED`).
    pub xdp_mode: Option<&'static str>,
    /// Its alias (`IFLA_IFALIAS`), which tapmesh sets on interfaces it owns.
    pub alias: Option<String>,
}

const RTM_NEWLINK: u16 = 16;
const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
const IFLA_IFALIAS: u16 = 20;
const IFLA_XDP: u16 = 43;
const IFLA_XDP_ATTACHED: u16 = 2;
const IFLA_XDP_PROG_ID: u16 = 4;

impl Link {
    /// Reads a link message in place: only the few attributes wanted (the
    /// full decode of a link's statistics costs more than the request).
    fn parse(bytes: &[u8]) -> Option<Self> {
        let message = NetlinkBuffer::new_checked(bytes).ok()?;
        if message.message_type() != RTM_NEWLINK {
            return None;
        }
        // struct ifinfomsg: family, pad, type (u16), index (i32), flags, change.
        let info = message.payload();
        let kind = u16::from_ne_bytes(info.get(2..4)?.try_into().ok()?);
        let mut link = Link {
            index: u32::from_ne_bytes(info.get(4..8)?.try_into().ok()?),
            name: String::new(),
            mtu: 0,
            address: None,
            ethernet: kind == libc::ARPHRD_ETHER || kind == libc::ARPHRD_LOOPBACK,
            loopback: kind == libc::ARPHRD_LOOPBACK,
            xdp_program: None,
            xdp_mode: None,
            alias: None,
        };
        for nla in NlasIterator::new(info.get(16..)?) {
            let Ok(nla) = nla else { break };
            let (kind, length) = (nla.kind(), usize::from(nla.length()));
            let whole: &[u8] = nla.into_inner();
            let value = whole.get(4..length).unwrap_or_default();
            match kind {
                IFLA_IFNAME => {
                    let name = value.split(|b| *b == 0).next().unwrap_or_default();
                    link.name = String::from_utf8_lossy(name).into_owned();
                }
                IFLA_MTU => link.mtu = u32::from_ne_bytes(value.try_into().ok()?),
                IFLA_ADDRESS => link.address = value.try_into().ok(),
                IFLA_IFALIAS => {
                    let alias = value.split(|b| *b == 0).next().unwrap_or_default();
                    link.alias = Some(String::from_utf8_lossy(alias).into_owned());
                }
                // Nested: the attach mode and the program's id (0 or absent: none).
                k if k & 0x3fff == IFLA_XDP => {
                    for inner in NlasIterator::new(value).flatten() {
                        let (kind, length) = (inner.kind(), usize::from(inner.length()));
                        let bytes: &[u8] = inner.into_inner();
                        if kind == IFLA_XDP_PROG_ID {
                            let id = bytes.get(4..length).and_then(|v| v.try_into().ok());
                            link.xdp_program = id.map(u32::from_ne_bytes).filter(|&id| id != 0);
                        } else if kind == IFLA_XDP_ATTACHED {
                            link.xdp_mode = match bytes.get(4) {
                                Some(1) => Some("native"),
                                Some(2) => Some("generic"),
                                Some(3) => Some("offload"),
                                Some(4) => Some("multiple"),
                                _ => None,
                            };
                        }
                    }
                }
                _ => {}
            }
        }
        Some(link)
    }

    /// Its MAC, if it is an Ethernet link.
    pub fn mac(&self) -> Result<[u8; 6], NetError> {
        match (self.ethernet, self.address) {
            (true, Some(mac)) => Ok(mac),
            _ => Err(NetError::NotEthernet(self.name.clone())),
        }
    }
}

fn get(mut request: LinkMessage, what: &str) -> Result<Link, NetError> {
    request
        .attributes
        .push(LinkAttribute::ExtMask(vec![LinkExtentMask::SkipStats]));
    let missing = || NetError::NoInterface(what.to_string());
    let mut socket = Netlink::route().map_err(NetError::kernel("opening a netlink socket"))?;
    let mut found = None;
    let asked = socket.request_with(RouteNetlinkMessage::GetLink(request), 0, |_, whole| {
        found = found.take().or_else(|| Link::parse(whole));
    });
    match asked {
        Ok(()) => found.ok_or_else(missing),
        Err(e) if super::socket::errno_of(&e) == Some(libc::ENODEV) => Err(missing()),
        Err(e) => Err(NetError::kernel(format!("looking up interface {what}"))(e)),
    }
}

/// The link named `name`.
pub fn by_name(name: &str) -> Result<Link, NetError> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
        return Err(NetError::NoInterface(name.into()));
    }
    let mut request = LinkMessage::default();
    request.attributes.push(LinkAttribute::IfName(name.into()));
    get(request, name)
}

/// The link with index `index`.
pub fn by_index(index: u32) -> Result<Link, NetError> {
    if index == 0 {
        return Err(NetError::NoInterface("0".into()));
    }
    let mut request = LinkMessage::default();
    request.header.index = index;
    get(request, &index.to_string())
}

/// The index of interface `name`, if it exists: the kernel's own
/// name-to-index call (one ioctl, a tenth of a netlink request), for the
/// checks that run on every reconcile.
pub fn index(name: &str) -> Option<u32> {
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: a NUL-terminated name; the call only reads it.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// The name of interface `index`, if it exists.
pub fn name(index: u32) -> Option<String> {
    by_index(index).ok().map(|l| l.name)
}

/// The index and MAC of an Ethernet (or loopback) interface.
pub fn mac(name: &str) -> Result<(u32, [u8; 6]), NetError> {
    let link = by_name(name)?;
    Ok((link.index, link.mac()?))
}

/// Every link.
pub fn all() -> Result<Vec<Link>, NetError> {
    let mut socket = Netlink::route().map_err(NetError::kernel("opening a netlink socket"))?;
    let mut links = Vec::new();
    socket
        .dump(
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            |_, whole| links.extend(Link::parse(whole)),
        )
        .map_err(NetError::kernel("listing links"))?;
    Ok(links)
}

/// Looks a link up by name in `netns` (the current namespace when `None`),
/// reporting a missing one as not found there.
pub(crate) fn find(netns: Option<&File>, at: At<'_>) -> Result<Link, NetError> {
    let found = match netns {
        None => by_name(at.ifname),
        Some(netns) => super::netns::run_in(netns, || by_name(at.ifname))
            .map_err(at.os("entering the namespace"))?,
    };
    match found {
        Err(NetError::NoInterface(_)) => Err(at.not_found()),
        other => other,
    }
}

/// Whether a link of that name exists in the current namespace; an error
/// when netlink could not tell (callers must not take that as "gone").
pub async fn exists(name: &str) -> Result<bool, NetError> {
    super::check_ifname(name)?;
    match by_name(name) {
        Ok(_) => Ok(true),
        Err(NetError::NoInterface(_)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Names of the links in the current namespace that start with `prefix`.
pub async fn with_prefix(prefix: &str) -> Result<Vec<String>, NetError> {
    Ok(all()?
        .into_iter()
        .map(|l| l.name)
        .filter(|n| n.starts_with(prefix))
        .collect())
}

pub(crate) async fn set_up(handle: &Handle, at: At<'_>) -> Result<(), NetError> {
    let message = LinkUnspec::new_with_name(at.ifname).up().build();
    handle
        .link()
        .set(message)
        .execute()
        .await
        .map_err(at.nl("setting up"))
}

/// Sets the alias of an interface (what `ip link` shows as "alias").
pub(crate) async fn set_alias(handle: &Handle, at: At<'_>, alias: &str) -> Result<(), NetError> {
    let mut message = LinkUnspec::new_with_name(at.ifname).build();
    message
        .attributes
        .push(LinkAttribute::IfAlias(alias.to_string()));
    handle
        .link()
        .set(message)
        .execute()
        .await
        .map_err(at.nl("setting its alias"))
}

/// Sets the MTU of an interface in the current namespace.
pub async fn set_mtu(ifname: &str, mtu: u32) -> Result<(), NetError> {
    let at = At::here(ifname);
    let handle = netlink_here()?;
    let message = LinkUnspec::new_with_name(ifname).mtu(mtu).build();
    handle
        .link()
        .set(message)
        .execute()
        .await
        .map_err(at.nl(format!("setting MTU {mtu}")))
}

/// Deletes a link of the current namespace (a veth's peer goes with it).
/// Not finding it is Ok.
pub async fn delete(ifname: &str) -> Result<(), NetError> {
    super::check_ifname(ifname)?;
    let at = At {
        ifname,
        netns: CURRENT,
    };
    let index = match find(None, at) {
        Ok(link) => link.index,
        Err(NetError::NotFound { .. }) => return Ok(()),
        Err(e) => return Err(e),
    };
    let handle = netlink_here()?;
    match handle.link().del(index).execute().await {
        Err(e) if errno(&e) != Some(libc::ENODEV) => Err(at.nl("deleting")(e)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_has_index_and_zero_mac_and_missing_interfaces_are_named() {
        let (index, mac) = mac("lo").expect("lo exists in every namespace");
        assert_eq!(Some(index), super::index("lo"));
        assert_eq!(mac, [0; 6]);
        assert_eq!(name(index).as_deref(), Some("lo"));
        let e = super::mac("tm-no-such0").unwrap_err();
        assert_eq!(e.to_string(), "interface \"tm-no-such0\" does not exist");
        assert!(super::mac("").is_err());
        assert!(super::mac("name-longer-than-15").is_err());
        assert!(by_index(0).is_err());
    }

    #[test]
    fn ethernet_macs_match_sysfs() {
        let Ok(dir) = std::fs::read_dir("/sys/class/net") else {
            return;
        };
        let read = |path: std::path::PathBuf| std::fs::read_to_string(path).unwrap_or_default();
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if read(entry.path().join("type")).trim() != "1" {
                continue;
            }
            let (index, mac) = mac(&name).expect("an Ethernet interface");
            let want = read(entry.path().join("address"));
            let got = mac.map(|b| format!("{b:02x}")).join(":");
            assert_eq!(got, want.trim(), "{name}");
            assert_eq!(read(entry.path().join("ifindex")).trim(), index.to_string());
            let link = by_index(index).unwrap();
            assert_eq!(link.name, name);
            assert_eq!(read(entry.path().join("mtu")).trim(), link.mtu.to_string());
        }
    }
}
