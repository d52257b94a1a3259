//! Addresses on links.

use std::net::{IpAddr, Ipv4Addr};

use netlink_packet_route::{
    address::{AddressAttribute, AddressFlags, AddressMessage},
    AddressFamily, RouteNetlinkMessage,
};
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload};
use rtnetlink::Handle;

use super::socket::Netlink;
use super::{errno, At, NetError, Prefix};

/// Adds an address; IPv6 without DAD, and with `no_prefix_route` no connected route.
/// An address that is already there is fine.
pub(crate) async fn add(
    handle: &Handle,
    index: u32,
    prefix: Prefix,
    no_prefix_route: bool,
    at: At<'_>,
) -> Result<(), NetError> {
    let mut flags = AddressFlags::empty();
    if prefix.addr.is_ipv6() {
        flags |= AddressFlags::Nodad;
    }
    if no_prefix_route {
        flags |= AddressFlags::Noprefixroute;
    }
    let mut request = handle.address().add(index, prefix.addr, prefix.len);
    if !flags.is_empty() {
        request
            .message_mut()
            .attributes
            .push(AddressAttribute::Flags(flags));
    }
    match request.execute().await {
        Err(e) if errno(&e) != Some(libc::EEXIST) => Err(at.nl(format!("adding {prefix}"))(e)),
        _ => Ok(()),
    }
}

/// The address of an address message (IPv4: the local one).
pub(crate) fn of_message(message: &AddressMessage) -> Option<Prefix> {
    let mut found = None;
    for attribute in &message.attributes {
        match attribute {
            AddressAttribute::Local(a) => found = Some(*a),
            AddressAttribute::Address(a) if found.is_none() => found = Some(*a),
            _ => {}
        }
    }
    found.map(|addr| Prefix::new(addr, message.header.prefix_len))
}

/// The addresses of interface `index` (current namespace), in the kernel's order.
pub fn of_link(index: u32) -> Result<Vec<Prefix>, NetError> {
    Ok(all()?
        .into_iter()
        .filter(|(i, _)| *i == index)
        .map(|(_, p)| p)
        .collect())
}

/// Every address of the current namespace, with its interface index.
pub fn all() -> Result<Vec<(u32, Prefix)>, NetError> {
    let mut socket = Netlink::route().map_err(NetError::kernel("opening a netlink socket"))?;
    let mut request = AddressMessage::default();
    request.header.family = AddressFamily::Unspec;
    let mut found = Vec::new();
    socket
        .dump(RouteNetlinkMessage::GetAddress(request), |_, whole| {
            if let Ok(NetlinkMessage {
                payload: NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewAddress(m)),
                ..
            }) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(whole)
            {
                found.extend(of_message(&m).map(|p| (m.header.index, p)));
            }
        })
        .map_err(NetError::kernel("listing addresses"))?;
    Ok(found)
}

/// The first IPv4 address of an interface.
pub fn first_ipv4(ifname: &str) -> Result<Option<Ipv4Addr>, NetError> {
    let link = super::link::by_name(ifname)?;
    Ok(of_link(link.index)?.into_iter().find_map(|p| match p.addr {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(_) => None,
    }))
}
