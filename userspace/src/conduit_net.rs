//! Conduit plumbing for an application ("target") in its own network
//! namespace: a veth pair between the daemon's namespace and the target's,
//! addresses, GRO on the target side, and the target's VIPs with source
//! routing back through the gateway. All over rtnetlink.

use std::{
    fmt,
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    str::FromStr,
};

use futures::TryStreamExt;
use netlink_packet_route::{
    address::{AddressAttribute, AddressFlags, AddressMessage, AddressScope},
    link::{InfoData, InfoVeth, LinkAttribute},
    route::RouteAttribute,
    rule::{RuleAction, RuleAttribute, RuleMessage},
};
use rtnetlink::{Handle, IpVersion, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};

/// An address with its prefix length, e.g. 198.18.0.2/24.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    /// The longest prefix of the address family (32 or 128).
    pub fn max_prefix(&self) -> u8 {
        if self.addr.is_ipv4() {
            32
        } else {
            128
        }
    }

    /// The address with the host bits cleared.
    pub fn network(&self) -> IpAddr {
        let prefix = u32::from(self.prefix.min(self.max_prefix()));
        match self.addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - prefix).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - prefix).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
        }
    }

    fn check(&self) -> Result<(), ConduitNetError> {
        if self.prefix > self.max_prefix() {
            return Err(ConduitNetError::Invalid(format!(
                "{self}: prefix longer than {}",
                self.max_prefix()
            )));
        }
        Ok(())
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = ConduitNetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ConduitNetError::Invalid(format!("{s:?} is not an address/prefix"));
        let (addr, prefix) = s.trim().split_once('/').ok_or_else(bad)?;
        let cidr = Cidr {
            addr: addr.parse().map_err(|_| bad())?,
            prefix: prefix.parse().map_err(|_| bad())?,
        };
        cidr.check()?;
        Ok(cidr)
    }
}

/// The two ends of a conduit veth pair.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConduitLink {
    pub host_ifname: String,
    pub host_ifindex: u32,
    pub host_mac: [u8; 6],
    pub peer_ifname: String,
    pub peer_mac: [u8; 6],
}

#[derive(Debug, thiserror::Error)]
pub enum ConduitNetError {
    #[error("invalid input: {0}")]
    Invalid(String),
    #[error("opening a netlink socket in {netns}: {source}")]
    Socket {
        netns: String,
        source: std::io::Error,
    },
    #[error("interface {ifname} not found in {netns}")]
    NotFound { ifname: String, netns: String },
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
}

const CURRENT: &str = "the current namespace";
const ETHTOOL_SGRO: u32 = 0x2c;

/// Where an operation happens, for error messages.
#[derive(Clone, Copy)]
struct At<'a> {
    ifname: &'a str,
    netns: &'a str,
}

impl At<'_> {
    fn nl(self, op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> ConduitNetError {
        let (op, ifname, netns) = (op.into(), self.ifname.to_string(), self.netns.to_string());
        move |source| ConduitNetError::Netlink {
            op,
            ifname,
            netns,
            source: Box::new(source),
        }
    }

    fn os(self, op: impl Into<String>) -> impl FnOnce(std::io::Error) -> ConduitNetError {
        let (op, ifname, netns) = (op.into(), self.ifname.to_string(), self.netns.to_string());
        move |source| ConduitNetError::Os {
            op,
            ifname,
            netns,
            source,
        }
    }

    fn not_found(self) -> ConduitNetError {
        ConduitNetError::NotFound {
            ifname: self.ifname.into(),
            netns: self.netns.into(),
        }
    }
}

/// The netlink errno of an error (positive), if it is one.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(m.raw_code().abs()),
        _ => None,
    }
}

/// "net:[4026532…]" for a namespace file, for error messages.
fn describe(netns: &File) -> String {
    let fd = netns.as_raw_fd();
    std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| format!("namespace fd {fd}"))
}

fn check_ifname(name: &str) -> Result<(), ConduitNetError> {
    let ok = !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && !name.bytes().any(|b| b == b'/' || b == b':' || b <= b' ');
    if ok {
        Ok(())
    } else {
        Err(ConduitNetError::Invalid(format!(
            "{name:?} is not an interface name"
        )))
    }
}

/// Runs `f` on a short-lived thread that has entered `netns`.
fn in_netns<T: Send>(netns: &File, f: impl FnOnce() -> T + Send) -> std::io::Result<T> {
    let fd = netns.as_raw_fd();
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on this thread only, with a descriptor the caller keeps open.
            if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(f())
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("namespace thread panicked")))
    })
}

/// A netlink connection in the current namespace, served on the current
/// runtime until the handle is dropped.
fn netlink_here() -> Result<Handle, ConduitNetError> {
    let socket_error = |source| ConduitNetError::Socket {
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
fn netlink_in(netns: &File) -> Result<Handle, ConduitNetError> {
    let socket_error = |source| ConduitNetError::Socket {
        netns: describe(netns),
        source,
    };
    let runtime = tokio::runtime::Handle::try_current()
        .map_err(|e| socket_error(std::io::Error::other(e)))?;
    let (connection, handle, _) = in_netns(netns, || {
        let _entered = runtime.enter();
        rtnetlink::new_connection()
    })
    .and_then(|r| r)
    .map_err(socket_error)?;
    runtime.spawn(connection);
    Ok(handle)
}

/// Index and MAC address of a link, by name.
async fn link_info(handle: &Handle, at: At<'_>) -> Result<(u32, [u8; 6]), ConduitNetError> {
    let mut links = handle.link().get().match_name(at.ifname).execute();
    let message = match links.try_next().await {
        Ok(Some(m)) => m,
        Ok(None) => return Err(at.not_found()),
        Err(e) if errno(&e) == Some(libc::ENODEV) => return Err(at.not_found()),
        Err(e) => return Err(at.nl("looking up")(e)),
    };
    let mut mac = [0u8; 6];
    for attribute in &message.attributes {
        if let LinkAttribute::Address(bytes) = attribute {
            if bytes.len() == 6 {
                mac.copy_from_slice(bytes);
            }
        }
    }
    Ok((message.header.index, mac))
}

async fn set_up(handle: &Handle, at: At<'_>) -> Result<(), ConduitNetError> {
    let message = LinkUnspec::new_with_name(at.ifname).up().build();
    handle
        .link()
        .set(message)
        .execute()
        .await
        .map_err(at.nl("setting up"))
}

/// Adds an address; IPv6 without DAD, and with `no_prefix_route` no connected route.
/// An address that is already there is fine.
async fn add_address(
    handle: &Handle,
    index: u32,
    cidr: Cidr,
    no_prefix_route: bool,
    at: At<'_>,
) -> Result<(), ConduitNetError> {
    let mut flags = AddressFlags::empty();
    if cidr.addr.is_ipv6() {
        flags |= AddressFlags::Nodad;
    }
    if no_prefix_route {
        flags |= AddressFlags::Noprefixroute;
    }
    let mut request = handle.address().add(index, cidr.addr, cidr.prefix);
    if !flags.is_empty() {
        request
            .message_mut()
            .attributes
            .push(AddressAttribute::Flags(flags));
    }
    match request.execute().await {
        Err(e) if errno(&e) != Some(libc::EEXIST) => Err(at.nl(format!("adding {cidr}"))(e)),
        _ => Ok(()),
    }
}

/// One `ethtool_value` ioctl (`cmd`, `data`) on `ifname`; returns the value
/// the kernel left in it (the answer of a GET).
fn ethtool_value(ifname: &str, cmd: u32, data: u32) -> std::io::Result<u32> {
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    // SAFETY: a plain socket; the descriptor is owned at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut value = EthtoolValue { cmd, data };
    // SAFETY: ifreq is plain data; all zeroes is valid.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in request.ifr_name.iter_mut().zip(ifname.as_bytes()) {
        *dst = *src as libc::c_char;
    }
    request.ifr_ifru.ifru_data = (&mut value as *mut EthtoolValue).cast();
    // SAFETY: the request points at a live ethtool_value; the name is NUL-terminated
    // (callers checked it shorter than IFNAMSIZ).
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCETHTOOL as _, &mut request) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(value.data)
}

/// GRO on for the peer inside `netns` (a veth only receives native-XDP
/// redirected frames while its NAPI runs, which GRO turns on).
fn enable_gro(netns: &File, at: At<'_>) -> Result<(), ConduitNetError> {
    let name = at.ifname.to_string();
    let result = in_netns(netns, move || {
        ethtool_value(&name, ETHTOOL_SGRO, 1).map(|_| ())
    });
    result.and_then(|r| r).map_err(at.os("enabling GRO"))
}

/// Turns off TX VLAN offload on `ifname` (current namespace), so the kernel
/// writes an offloaded VLAN tag into the frame before it leaves: a veth's
/// XDP side would otherwise see the frame without its tag.
pub fn tx_vlan_offload_off(ifname: &str) -> Result<(), ConduitNetError> {
    const ETHTOOL_GFLAGS: u32 = 0x25;
    const ETHTOOL_SFLAGS: u32 = 0x26;
    const ETH_FLAG_TXVLAN: u32 = 1 << 7;
    check_ifname(ifname)?;
    let at = At {
        ifname,
        netns: CURRENT,
    };
    let flags = ethtool_value(ifname, ETHTOOL_GFLAGS, 0).map_err(at.os("reading offload flags"))?;
    ethtool_value(ifname, ETHTOOL_SFLAGS, flags & !ETH_FLAG_TXVLAN)
        .map(|_| ())
        .map_err(at.os("turning off TX VLAN offload"))
}

/// Creates a veth pair: `host_ifname` stays in the current namespace with the
/// `gateways` addresses, `peer_ifname` is created in `netns` with the `local`
/// addresses; both up, MTU `mtu` on both, IPv6 addresses without DAD. In
/// `netns` GRO is switched on for the peer (so that it receives native-XDP
/// redirected frames) and `lo` is set up. On failure nothing is left behind.
pub async fn create(
    netns: &File,
    host_ifname: &str,
    peer_ifname: &str,
    gateways: &[Cidr],
    local: &[Cidr],
    mtu: u32,
) -> Result<ConduitLink, ConduitNetError> {
    check_ifname(host_ifname)?;
    check_ifname(peer_ifname)?;
    for cidr in gateways.iter().chain(local) {
        cidr.check()?;
    }
    let ns_name = describe(netns);
    let host_at = At {
        ifname: host_ifname,
        netns: CURRENT,
    };
    let host = netlink_here()?;

    // The peer is created in `netns` directly: one atomic request. Both MACs
    // are set here: an address the kernel picks may be replaced by udev
    // (MACAddressPolicy) after we read it, and the dataplane keeps the peer's.
    let peer = LinkMessageBuilder::<LinkUnspec>::new()
        .name(peer_ifname)
        .address(random_mac().to_vec())
        .mtu(mtu)
        .setns_by_fd(netns.as_raw_fd())
        .build();
    let message = LinkVeth::new(host_ifname, peer_ifname)
        .address(random_mac().to_vec())
        .mtu(mtu)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .build();
    host.link()
        .add(message)
        .execute()
        .await
        .map_err(host_at.nl(format!("creating veth (peer {peer_ifname} in {ns_name})")))?;

    let (host_ifindex, host_mac) = match link_info(&host, host_at).await {
        Ok(found) => found,
        Err(e) => {
            let _ = delete(host_ifname).await;
            return Err(e);
        }
    };
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
        Ok(peer_mac) => Ok(ConduitLink {
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

/// A random locally administered unicast MAC.
fn random_mac() -> [u8; 6] {
    let mut mac: [u8; 6] = rand::random();
    mac[0] = (mac[0] & 0xfc) | 0x02;
    mac
}

/// Addresses, up, GRO: everything after the veth pair exists. Returns the peer MAC.
async fn configure(
    host: &Handle,
    netns: &File,
    host_ifindex: u32,
    host_at: At<'_>,
    peer_at: At<'_>,
    gateways: &[Cidr],
    local: &[Cidr],
) -> Result<[u8; 6], ConduitNetError> {
    for &cidr in gateways {
        add_address(host, host_ifindex, cidr, false, host_at).await?;
    }
    set_up(host, host_at).await?;

    let peer = netlink_in(netns)?;
    let (peer_index, peer_mac) = link_info(&peer, peer_at).await?;
    for &cidr in local {
        add_address(&peer, peer_index, cidr, false, peer_at).await?;
    }
    // GRO after up: switched on while the link is down, the kernel turns on
    // NAPI at open but does not mark the host end as a redirect target.
    set_up(&peer, peer_at).await?;
    enable_gro(netns, peer_at)?;
    set_up(
        &peer,
        At {
            ifname: "lo",
            netns: peer_at.netns,
        },
    )
    .await?;
    Ok(peer_mac)
}

/// The address of an address message (IPv4: the local one).
fn address_of(message: &AddressMessage) -> Option<Cidr> {
    let mut found = None;
    for attribute in &message.attributes {
        match attribute {
            AddressAttribute::Local(a) => found = Some(*a),
            AddressAttribute::Address(a) if found.is_none() => found = Some(*a),
            _ => {}
        }
    }
    found.map(|addr| Cidr {
        addr,
        prefix: message.header.prefix_len,
    })
}

/// The table of a rule (the 32-bit attribute when there is one).
fn rule_table(rule: &RuleMessage) -> u32 {
    rule.attributes
        .iter()
        .find_map(|a| match a {
            RuleAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(rule.header.table))
}

/// The `from` prefix of a rule that `set_vips` made for `table`, if it is one.
fn our_rule_source(rule: &RuleMessage, table: u32) -> Option<Cidr> {
    let priority = rule.attributes.iter().find_map(|a| match a {
        RuleAttribute::Priority(p) => Some(*p),
        _ => None,
    });
    if priority != Some(table) || rule_table(rule) != table {
        return None;
    }
    rule.attributes.iter().find_map(|a| match a {
        RuleAttribute::Source(addr) => Some(Cidr {
            addr: *addr,
            prefix: rule.header.src_len,
        }),
        _ => None,
    })
}

/// The rule key of a VIP: its prefix with host bits cleared.
fn rule_source(vip: &Cidr) -> Cidr {
    Cidr {
        addr: vip.network(),
        prefix: vip.prefix,
    }
}

/// Makes the peer interface in `netns` carry exactly `vips` (besides its
/// `local` addresses): IPv4 without a connected route, IPv6 also without DAD.
/// For each VIP a rule `from <vip> lookup <table>` (priority `table`), and in
/// `table` a default route via the gateway of each family that has VIPs.
/// VIPs, rules and routes no longer wanted are removed. Idempotent.
pub async fn set_vips(
    netns: &File,
    peer_ifname: &str,
    local: &[Cidr],
    vips: &[Cidr],
    gateways: &[IpAddr],
    table: u32,
) -> Result<(), ConduitNetError> {
    check_ifname(peer_ifname)?;
    // 0 is no table; 253..=255 are default, main and local.
    if table == 0 || (253..=255).contains(&table) {
        return Err(ConduitNetError::Invalid(format!(
            "table {table} is reserved"
        )));
    }
    let gateway_v4 = gateways.iter().find_map(|g| match g {
        IpAddr::V4(a) => Some(*a),
        IpAddr::V6(_) => None,
    });
    let gateway_v6 = gateways.iter().find_map(|g| match g {
        IpAddr::V6(a) => Some(*a),
        IpAddr::V4(_) => None,
    });
    for vip in vips {
        vip.check()?;
        let has_gateway = if vip.addr.is_ipv4() {
            gateway_v4.is_some()
        } else {
            gateway_v6.is_some()
        };
        if !has_gateway {
            return Err(ConduitNetError::Invalid(format!(
                "VIP {vip}: no gateway of its address family"
            )));
        }
    }

    let ns_name = describe(netns);
    let at = At {
        ifname: peer_ifname,
        netns: &ns_name,
    };
    let handle = netlink_in(netns)?;
    let (index, _) = link_info(&handle, at).await?;

    // Current addresses: universe scope only (link-local ones are the kernel's).
    let present: Vec<(Cidr, AddressMessage)> = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect::<Vec<_>>()
        .await
        .map_err(at.nl("listing addresses"))?
        .into_iter()
        .filter(|m| m.header.scope == AddressScope::Universe)
        .filter_map(|m| address_of(&m).map(|c| (c, m)))
        .collect();

    // Current rules of ours.
    let mut rules = Vec::new();
    for version in [IpVersion::V4, IpVersion::V6] {
        let dumped: Vec<RuleMessage> = handle
            .rule()
            .get(version)
            .execute()
            .try_collect()
            .await
            .map_err(at.nl("listing rules"))?;
        rules.extend(
            dumped
                .into_iter()
                .filter_map(|r| our_rule_source(&r, table).map(|s| (s, r))),
        );
    }
    let wanted_rules: Vec<Cidr> = vips.iter().map(rule_source).collect();

    // Remove what is no longer wanted: rules first, then addresses.
    for (source, rule) in &rules {
        if !wanted_rules.contains(source) {
            match handle.rule().del(rule.clone()).execute().await {
                Err(e) if errno(&e) != Some(libc::ENOENT) => {
                    return Err(at.nl(format!("deleting rule from {source}"))(e))
                }
                _ => {}
            }
        }
    }
    for (cidr, message) in &present {
        if !local.contains(cidr) && !vips.contains(cidr) {
            match handle.address().del(message.clone()).execute().await {
                Err(e) if errno(&e) != Some(libc::EADDRNOTAVAIL) => {
                    return Err(at.nl(format!("deleting {cidr}"))(e))
                }
                _ => {}
            }
        }
    }

    // Add what is missing: addresses, routes, then rules.
    for vip in vips {
        if !present.iter().any(|(c, _)| c == vip) {
            add_address(&handle, index, *vip, true, at).await?;
        }
    }
    // Per family: a default route via its gateway while it has VIPs, else none.
    for (v4, gateway) in [
        (true, gateway_v4.map(IpAddr::V4)),
        (false, gateway_v6.map(IpAddr::V6)),
    ] {
        let mut route = if v4 {
            RouteMessageBuilder::<Ipv4Addr>::new()
                .table_id(table)
                .build()
        } else {
            RouteMessageBuilder::<Ipv6Addr>::new()
                .table_id(table)
                .build()
        };
        match gateway {
            Some(gw) if vips.iter().any(|v| v.addr.is_ipv4() == v4) => {
                route.attributes.push(RouteAttribute::Gateway(gw.into()));
                route.attributes.push(RouteAttribute::Oif(index));
                let op = format!("adding default via {gw} to table {table}");
                let added = handle.route().add(route).replace().execute().await;
                added.map_err(at.nl(op))?;
            }
            _ => match handle.route().del(route).execute().await {
                Err(e) if !matches!(errno(&e), Some(libc::ESRCH | libc::ENOENT)) => {
                    let op = format!("deleting the default route of table {table}");
                    return Err(at.nl(op)(e));
                }
                _ => {}
            },
        }
    }
    for source in &wanted_rules {
        if rules.iter().any(|(s, _)| s == source) {
            continue;
        }
        let request = handle
            .rule()
            .add()
            .table_id(table)
            .priority(table)
            .action(RuleAction::ToTable);
        let result = match source.addr {
            IpAddr::V4(a) => request.v4().source_prefix(a, source.prefix).execute().await,
            IpAddr::V6(a) => request.v6().source_prefix(a, source.prefix).execute().await,
        };
        match result {
            Err(e) if errno(&e) != Some(libc::EEXIST) => {
                let op = format!("adding rule from {source} lookup {table}");
                return Err(at.nl(op)(e));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Deletes the host side (the kernel deletes the peer with it). Not finding it is Ok.
pub async fn delete(host_ifname: &str) -> Result<(), ConduitNetError> {
    check_ifname(host_ifname)?;
    let at = At {
        ifname: host_ifname,
        netns: CURRENT,
    };
    let handle = netlink_here()?;
    let index = match link_info(&handle, at).await {
        Ok((index, _)) => index,
        Err(ConduitNetError::NotFound { .. }) => return Ok(()),
        Err(e) => return Err(e),
    };
    match handle.link().del(index).execute().await {
        Err(e) if errno(&e) != Some(libc::ENODEV) => Err(at.nl("deleting")(e)),
        _ => Ok(()),
    }
}

/// Whether a link of that name exists in the current namespace; an error
/// when netlink could not tell (callers must not take that as "gone").
pub async fn exists(host_ifname: &str) -> Result<bool, ConduitNetError> {
    check_ifname(host_ifname)?;
    let handle = netlink_here()?;
    let at = At {
        ifname: host_ifname,
        netns: CURRENT,
    };
    match link_info(&handle, at).await {
        Ok(_) => Ok(true),
        Err(ConduitNetError::NotFound { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Names of the links in the current namespace that start with `prefix`.
pub async fn links_with_prefix(prefix: &str) -> Result<Vec<String>, ConduitNetError> {
    let handle = netlink_here()?;
    let mut links = handle.link().get().execute();
    let mut names = Vec::new();
    loop {
        match links.try_next().await {
            Ok(Some(message)) => {
                for attribute in &message.attributes {
                    if let LinkAttribute::IfName(name) = attribute {
                        if name.starts_with(prefix) {
                            names.push(name.clone());
                        }
                    }
                }
            }
            Ok(None) => return Ok(names),
            Err(e) => {
                let at = At {
                    ifname: prefix,
                    netns: CURRENT,
                };
                return Err(at.nl("listing links")(e));
            }
        }
    }
}

/// A veth pair in the current namespace, both ends up (a mirror ring's
/// interfaces). Returns their indices; on failure nothing is left.
pub async fn create_local_pair(name: &str, peer: &str) -> Result<(u32, u32), ConduitNetError> {
    check_ifname(name)?;
    check_ifname(peer)?;
    let handle = netlink_here()?;
    let at = |ifname| At {
        ifname,
        netns: CURRENT,
    };
    handle
        .link()
        .add(LinkVeth::new(name, peer).build())
        .execute()
        .await
        .map_err(at(name).nl(format!("creating veth (peer {peer})")))?;
    let result = async {
        set_up(&handle, at(name)).await?;
        set_up(&handle, at(peer)).await?;
        let (a, _) = link_info(&handle, at(name)).await?;
        let (b, _) = link_info(&handle, at(peer)).await?;
        Ok((a, b))
    }
    .await;
    if result.is_err() {
        let _ = delete(name).await;
    }
    result
}

/// Routes of a container behind a point-to-point veth: in `netns` each
/// gateway on-link through `peer_ifname` and the default route of its family
/// via it; in the current namespace each of `local` through `host_ifindex`.
pub async fn add_container_routes(
    netns: &File,
    peer_ifname: &str,
    host_ifindex: u32,
    gateways: &[IpAddr],
    local: &[IpAddr],
) -> Result<(), ConduitNetError> {
    use netlink_packet_route::route::RouteScope;

    let ns_name = describe(netns);
    let peer_at = At {
        ifname: peer_ifname,
        netns: &ns_name,
    };
    let peer = netlink_in(netns)?;
    let (peer_index, _) = link_info(&peer, peer_at).await?;
    for gw in gateways {
        let (on_link, default) = match gw {
            IpAddr::V4(a) => (
                RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(*a, 32)
                    .output_interface(peer_index)
                    .scope(RouteScope::Link)
                    .build(),
                RouteMessageBuilder::<Ipv4Addr>::new()
                    .gateway(*a)
                    .output_interface(peer_index)
                    .build(),
            ),
            IpAddr::V6(a) => (
                RouteMessageBuilder::<Ipv6Addr>::new()
                    .destination_prefix(*a, 128)
                    .output_interface(peer_index)
                    .build(),
                RouteMessageBuilder::<Ipv6Addr>::new()
                    .gateway(*a)
                    .output_interface(peer_index)
                    .build(),
            ),
        };
        peer.route()
            .add(on_link)
            .replace()
            .execute()
            .await
            .map_err(peer_at.nl(format!("adding the route to {gw}")))?;
        peer.route()
            .add(default)
            .replace()
            .execute()
            .await
            .map_err(peer_at.nl(format!("adding the default route via {gw}")))?;
    }
    let host = netlink_here()?;
    for addr in local {
        let route = match addr {
            IpAddr::V4(a) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(*a, 32)
                .output_interface(host_ifindex)
                .scope(RouteScope::Link)
                .build(),
            IpAddr::V6(a) => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(*a, 128)
                .output_interface(host_ifindex)
                .build(),
        };
        host.route().add(route).replace().execute().await.map_err(
            At {
                ifname: "host side",
                netns: CURRENT,
            }
            .nl(format!("adding the route to {addr}")),
        )?;
    }
    Ok(())
}

/// Sets the MTU of an interface in the current namespace.
pub async fn set_mtu(ifname: &str, mtu: u32) -> Result<(), ConduitNetError> {
    let at = At {
        ifname,
        netns: CURRENT,
    };
    let handle = netlink_here()?;
    let message = LinkUnspec::new_with_name(ifname).mtu(mtu).build();
    handle
        .link()
        .set(message)
        .execute()
        .await
        .map_err(at.nl(format!("setting MTU {mtu}")))
}
