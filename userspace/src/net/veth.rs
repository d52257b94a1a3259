//! Veth pairs: a container's or application's link into its namespace, and
//! the local pairs of mirror rings.

use std::{fs::File, os::fd::AsRawFd};

use netlink_packet_route::link::{InfoData, InfoVeth};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth};

use super::{
    addr, check_ifname, describe, ethtool, link, netlink_here, netlink_in, At, NetError, Prefix,
};

/// The two ends of a veth pair whose peer lives in another namespace.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Veth {
    pub host_ifname: String,
    pub host_ifindex: u32,
    pub host_mac: [u8; 6],
    pub peer_ifname: String,
    pub peer_mac: [u8; 6],
}

/// A random locally administered unicast MAC.
fn random_mac() -> [u8; 6] {
    let mut mac: [u8; 6] = rand::random();
    mac[0] = (mac[0] & 0xfc) | 0x02;
    mac
}

/// Creates a veth pair: `host_ifname` stays in the current namespace with the
/// `gateways` addresses, `peer_ifname` is created in `netns` with the `local`
/// addresses; both up, MTU `mtu` on both, IPv6 addresses without DAD. In
/// `netns` GRO is switched on for the peer (so that it receives native-XDP
/// redirected frames) and `lo` is set up. `macs` (host, peer) gives a pair
/// made again the MACs it had, so what was written for the old one (an LB
/// target's MAC) still holds; otherwise both are random. On failure nothing
/// is left behind.
pub async fn create(
    netns: &File,
    host_ifname: &str,
    peer_ifname: &str,
    gateways: &[Prefix],
    local: &[Prefix],
    mtu: u32,
    macs: Option<([u8; 6], [u8; 6])>,
) -> Result<Veth, NetError> {
    let (host_mac, peer_mac) = macs.unwrap_or_else(|| (random_mac(), random_mac()));
    check_ifname(host_ifname)?;
    check_ifname(peer_ifname)?;
    for prefix in gateways.iter().chain(local) {
        prefix
            .check()
            .map_err(|e| NetError::Invalid(format!("{prefix}: {e}")))?;
    }
    let ns_name = describe(netns);
    let host_at = At::here(host_ifname);
    let host = netlink_here()?;

    // The peer is created in `netns` directly: one atomic request. Both MACs
    // are set here: an address the kernel picks may be replaced by udev
    // (MACAddressPolicy) after we read it, and the dataplane keeps the peer's.
    let peer = LinkMessageBuilder::<LinkUnspec>::new()
        .name(peer_ifname)
        .address(peer_mac.to_vec())
        .mtu(mtu)
        .setns_by_fd(netns.as_raw_fd())
        .build();
    let message = LinkVeth::new(host_ifname, peer_ifname)
        .address(host_mac.to_vec())
        .mtu(mtu)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .build();
    host.link()
        .add(message)
        .execute()
        .await
        .map_err(host_at.nl(format!("creating veth (peer {peer_ifname} in {ns_name})")))?;

    let created = match link::find(None, host_at) {
        Ok(found) => found,
        Err(e) => {
            let _ = link::delete(host_ifname).await;
            return Err(e);
        }
    };
    let (host_ifindex, host_mac) = (created.index, created.address.unwrap_or_default());
    let configured = configure(
        &host,
        netns,
        host_ifindex,
        host_at,
        At {
            ifname: peer_ifname,
            netns: &ns_name,
        },
        gateways,
        local,
    )
    .await;
    match configured {
        Ok(peer_mac) => Ok(Veth {
            host_ifname: host_ifname.into(),
            host_ifindex,
            host_mac,
            peer_ifname: peer_ifname.into(),
            peer_mac,
        }),
        Err(e) => {
            if let Err(undo) = host.link().del(host_ifindex).execute().await {
                tracing::warn!("deleting {host_ifname} after a failed create: {undo}");
            }
            Err(e)
        }
    }
}

/// Addresses, up, GRO: everything after the veth pair exists. Returns the peer MAC.
async fn configure(
    host: &Handle,
    netns: &File,
    host_ifindex: u32,
    host_at: At<'_>,
    peer_at: At<'_>,
    gateways: &[Prefix],
    local: &[Prefix],
) -> Result<[u8; 6], NetError> {
    for &prefix in gateways {
        addr::add(host, host_ifindex, prefix, false, host_at).await?;
    }
    link::set_up(host, host_at).await?;

    let peer = netlink_in(netns)?;
    let found = link::find(Some(netns), peer_at)?;
    let (peer_index, peer_mac) = (found.index, found.address.unwrap_or_default());
    for &prefix in local {
        addr::add(&peer, peer_index, prefix, false, peer_at).await?;
    }
    // GRO after up: switched on while the link is down, the kernel turns on
    // NAPI at open but does not mark the host end as a redirect target.
    link::set_up(&peer, peer_at).await?;
    ethtool::enable_gro(netns, peer_at)?;
    link::set_up(
        &peer,
        At {
            ifname: "lo",
            netns: peer_at.netns,
        },
    )
    .await?;
    Ok(peer_mac)
}

/// A veth pair in the current namespace, both ends up (a mirror ring's
/// interfaces), without IPv6: the kernel's own packets (router
/// solicitations, MLD, DAD) would reach the ring as copies. Returns their
/// indices; on failure nothing is left. Both ends get `alias`, by which
/// their owner knows them again.
pub async fn create_local_pair(
    name: &str,
    peer: &str,
    alias: &str,
) -> Result<(u32, u32), NetError> {
    check_ifname(name)?;
    check_ifname(peer)?;
    let handle = netlink_here()?;
    handle
        .link()
        .add(LinkVeth::new(name, peer).build())
        .execute()
        .await
        .map_err(At::here(name).nl(format!("creating veth (peer {peer})")))?;
    let result = async {
        for end in [name, peer] {
            // A read-only /proc/sys: the ring works, with the kernel's chatter.
            if let Err(e) = super::sysctl::disable_ipv6(end) {
                tracing::warn!("{e}; the kernel's own IPv6 packets on {end} reach the ring");
            }
        }
        link::set_alias(&handle, At::here(name), alias).await?;
        link::set_alias(&handle, At::here(peer), alias).await?;
        link::set_up(&handle, At::here(name)).await?;
        link::set_up(&handle, At::here(peer)).await?;
        let a = link::find(None, At::here(name))?.index;
        let b = link::find(None, At::here(peer))?.index;
        Ok((a, b))
    }
    .await;
    if result.is_err() {
        let _ = link::delete(name).await;
    }
    result
}
