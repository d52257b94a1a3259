//! The far end of a veth. A native XDP redirect into a veth is received by
//! its peer only while the peer's NAPI runs (GRO on, or an XDP program
//! there); otherwise the kernel drops every frame at the redirect (the near
//! end does not advertise `ndo_xdp_xmit`), counted only in the receiving
//! driver's own statistics. The peer is often in another namespace, which the
//! near end names by an nsid: the namespace is found by asking the kernel
//! the nsid of each namespace file (`/run/netns/*`, `/proc/*/ns/net`).

use std::fs::File;
use std::os::fd::AsRawFd;

use netlink_packet_route::{
    link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage},
    nsid::{NsidAttribute, NsidMessage},
    RouteNetlinkMessage,
};
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload};

use super::socket::Netlink;
use super::{ethtool, At, NetError};

/// What the kernel says of a link that matters for redirects into it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkFacts {
    pub veth: bool,
    /// The peer's index in its namespace (a veth's `IFLA_LINK`).
    pub peer_index: Option<u32>,
    /// The peer's namespace as this one names it; None: this namespace.
    pub peer_nsid: Option<i32>,
}

fn decode(whole: &[u8]) -> Option<RouteNetlinkMessage> {
    match NetlinkMessage::<RouteNetlinkMessage>::deserialize(whole)
        .ok()?
        .payload
    {
        NetlinkPayload::InnerMessage(m) => Some(m),
        _ => None,
    }
}

/// Facts of the link with index `index` in the current namespace.
pub fn facts(index: u32) -> Result<LinkFacts, NetError> {
    let mut request = LinkMessage::default();
    request.header.index = index;
    let mut socket = Netlink::route().map_err(NetError::kernel("opening a netlink socket"))?;
    let mut found = None;
    socket
        .request_with(RouteNetlinkMessage::GetLink(request), 0, |_, whole| {
            if let Some(RouteNetlinkMessage::NewLink(m)) = decode(whole) {
                found = Some(m);
            }
        })
        .map_err(NetError::kernel(format!("reading link {index}")))?;
    let message = found.ok_or_else(|| NetError::NoInterface(index.to_string()))?;
    let mut facts = LinkFacts::default();
    for attribute in message.attributes {
        match attribute {
            LinkAttribute::LinkInfo(infos) => {
                facts.veth = infos
                    .iter()
                    .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth)));
            }
            LinkAttribute::Link(peer) => facts.peer_index = Some(peer),
            LinkAttribute::LinkNetNsId(id) => facts.peer_nsid = Some(id),
            _ => {}
        }
    }
    Ok(facts)
}

/// The nsid the current namespace gives the namespace of `file` (-1: none).
fn nsid_of(socket: &mut Netlink, file: &File) -> Option<i32> {
    let mut request = NsidMessage::default();
    request
        .attributes
        .push(NsidAttribute::Fd(file.as_raw_fd() as u32));
    let mut id = None;
    socket
        .request_with(RouteNetlinkMessage::GetNsId(request), 0, |_, whole| {
            if let Some(RouteNetlinkMessage::NewNsId(m)) = decode(whole) {
                id = m.attributes.iter().find_map(|a| match a {
                    NsidAttribute::Id(id) => Some(*id),
                    _ => None,
                });
            }
        })
        .ok()?;
    id.filter(|&id| id >= 0)
}

/// The namespace the current one names `nsid`.
pub fn namespace_of(nsid: i32) -> Option<File> {
    let mut socket = Netlink::route().ok()?;
    let named = std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path());
    let processes = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .map(|e| e.path().join("ns/net"));
    let mut seen = std::collections::HashSet::new();
    for path in named.chain(processes) {
        let Ok(file) = File::open(&path) else {
            continue;
        };
        let Ok(id) = super::netns::NetnsId::of(&file) else {
            continue;
        };
        if seen.insert(id) && nsid_of(&mut socket, &file) == Some(nsid) {
            return Some(file);
        }
    }
    None
}

/// The peer of veth `ifname` when it is in the current namespace too:
/// what is sent out of `ifname` comes in there.
pub fn local_peer(ifname: &str) -> Option<String> {
    let link = super::link::by_name(ifname).ok()?;
    let facts = facts(link.index).ok()?;
    match (facts.veth, facts.peer_index, facts.peer_nsid) {
        (true, Some(peer), None) => super::link::by_index(peer).ok().map(|l| l.name),
        _ => None,
    }
}

/// The MAC of veth `ifname`'s peer, wherever it is; None when `ifname` is
/// not a veth or its peer's namespace is not in sight.
pub fn peer_mac(ifname: &str) -> Option<[u8; 6]> {
    let (netns, peer_index) = peer_in_sight(ifname)?;
    super::netns::run_in(&netns, || super::link::by_index(peer_index).ok()?.address)
        .ok()
        .flatten()
}

/// The namespace and index of veth `ifname`'s peer; None when `ifname` is
/// not a veth or its peer's namespace is not in sight.
fn peer_in_sight(ifname: &str) -> Option<(File, u32)> {
    let link = super::link::by_name(ifname).ok()?;
    let facts = facts(link.index).ok()?;
    let (true, Some(peer_index)) = (facts.veth, facts.peer_index) else {
        return None;
    };
    let netns = match facts.peer_nsid {
        None => File::open("/proc/thread-self/ns/net").ok()?,
        Some(nsid) => namespace_of(nsid)?,
    };
    Some((netns, peer_index))
}

/// The peer of veth `ifname` (current namespace) when it cannot receive
/// what a native XDP program sends out of `ifname` (XDP_TX, a redirect):
/// neither a native XDP program nor GRO there, so no NAPI. None when
/// `ifname` is not a veth, its peer can, or its namespace is not in sight.
pub fn unready_peer(ifname: &str) -> Option<String> {
    let (netns, peer_index) = peer_in_sight(ifname)?;
    let (peer, gro) = super::netns::run_in(&netns, || {
        let peer = super::link::by_index(peer_index).ok()?;
        let gro = ethtool::gro_on(&peer.name).ok()?;
        Some((peer, gro))
    })
    .ok()
    .flatten()?;
    (!gro && peer.xdp_mode != Some("native")).then_some(peer.name)
}

/// Makes `ifname` (current namespace) a working native-XDP redirect
/// target: when it is a veth, GRO goes on at its peer, wherever it is.
/// Ok(None) when it is not a veth; Ok(Some(peer)) names the peer set.
pub fn prepare_redirect_target(ifname: &str) -> Result<Option<String>, NetError> {
    let link = super::link::by_name(ifname)?;
    let facts = facts(link.index)?;
    let (true, Some(peer_index)) = (facts.veth, facts.peer_index) else {
        return Ok(None);
    };
    let here = || File::open("/proc/thread-self/ns/net");
    let netns = match facts.peer_nsid {
        None => here().map_err(At::here(ifname).os("opening this namespace"))?,
        Some(nsid) => namespace_of(nsid).ok_or_else(|| NetError::PeerNamespaceUnseen {
            ifname: ifname.into(),
            nsid,
        })?,
    };
    let peer = super::netns::run_in(&netns, || super::link::by_index(peer_index))
        .map_err(At::here(ifname).os("entering its peer's namespace"))??;
    ethtool::enable_gro(
        &netns,
        At {
            ifname: &peer.name,
            netns: "its peer's namespace",
        },
    )?;
    Ok(Some(peer.name))
}
