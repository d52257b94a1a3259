//! Backend addresses to LB targets: a backend on a directly connected
//! network with a resolved neighbour is a local target (its interface and
//! MAC); anything else cannot be reached from this node's XDP and is left out.
//!
//! Done in-process over rtnetlink, one dump of the routes (per address
//! family in use) and one of the neighbour table per update, whatever the
//! number of backends, on a plain blocking socket off the async workers;
//! each address is then matched in memory:
//!
//! * an address the local table covers (an address of this node, a
//!   broadcast or multicast address) is left out;
//! * the longest prefix of the main table that covers it must be a unicast
//!   route without a gateway (on-link), with an output interface;
//! * that interface must hold a neighbour entry for the address in state
//!   REACHABLE, STALE, DELAY, PROBE or PERMANENT, with a link-layer address.
//!
//! Policy rules are not consulted (the main table is what `ip route get`
//! answers from unless rules send the lookup elsewhere).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use std::net::{Ipv4Addr, Ipv6Addr};

use netlink_packet_route::{
    neighbour::{NeighbourAttribute, NeighbourMessage},
    route::{RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteScope, RouteType},
    AddressFamily, RouteNetlinkMessage,
};
use rtnetlink::packet_core::{
    NetlinkBuffer, NetlinkMessage, NetlinkPayload, NlasIterator, NLMSG_DONE, NLMSG_ERROR,
    NLM_F_DUMP, NLM_F_REQUEST,
};
use rtnetlink::sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use crate::lb::model::{LbSpec, TargetVia};

const RTM_NEWROUTE: u16 = 24;
const RTM_NEWNEIGH: u16 = 28;
/// `struct ndmsg`, before the attributes.
const NDMSG_LEN: usize = 12;
const NDA_DST: u16 = 1;
const NDA_LLADDR: u16 = 2;
const RT_TABLE_MAIN: u32 = 254;
const RT_TABLE_LOCAL: u32 = 255;

/// Neighbour states in which the link-layer address can be used.
const NUD_USABLE: u16 = 0x02 /* REACHABLE */
    | 0x04 /* STALE */
    | 0x08 /* DELAY */
    | 0x10 /* PROBE */
    | 0x80 /* PERMANENT */;

/// What a route says about the addresses it covers.
#[derive(Clone, Debug)]
struct Route {
    kind: RouteType,
    scope: RouteScope,
    oif: Option<u32>,
    /// A gateway, a `via` or several next hops: not directly connected.
    indirect: bool,
    priority: u32,
}

/// Routes of one table and family by prefix length, for longest-prefix
/// matching with one hash lookup per prefix length in use.
#[derive(Default)]
struct Table {
    /// (prefix length, masked network) → route (the lowest metric).
    routes: HashMap<(u8, u128), Route>,
    /// The prefix lengths present, longest first.
    lengths: Vec<u8>,
}

impl Table {
    fn insert(&mut self, length: u8, network: u128, route: Route) {
        let key = (length, mask(network, length));
        match self.routes.get(&key) {
            Some(old) if old.priority <= route.priority => {}
            _ => {
                self.routes.insert(key, route);
            }
        }
        if let Err(i) = self.lengths.binary_search_by(|l| length.cmp(l)) {
            self.lengths.insert(i, length);
        }
    }

    fn lookup(&self, address: u128) -> Option<&Route> {
        self.lengths
            .iter()
            .find_map(|&l| self.routes.get(&(l, mask(address, l))))
    }
}

/// The top `length` bits of `value` (addresses are left-aligned in a u128).
fn mask(value: u128, length: u8) -> u128 {
    match length {
        0 => 0,
        l if l >= 128 => value,
        l => value & !(u128::MAX >> l),
    }
}

/// An address left-aligned in 128 bits, so IPv4 prefix lengths apply as is.
fn bits(address: IpAddr) -> u128 {
    match address {
        IpAddr::V4(a) => u128::from(u32::from(a)) << 96,
        IpAddr::V6(a) => u128::from(a),
    }
}

/// The main and local routing tables, (is IPv4, table) → routes.
#[derive(Default)]
struct Routes(HashMap<(bool, u32), Table>);

/// A blocking rtnetlink socket for dumps. Plain sends and receives, and
/// neighbours read in place: a dump of thousands of neighbours costs a
/// fraction of what it does through the async `rtnetlink` connection
/// (which decodes every message and hands it over a channel).
struct Dumper {
    socket: Socket,
    sequence: u32,
    buffer: Vec<u8>,
}

impl Dumper {
    fn new() -> std::io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Self {
            socket,
            sequence: 0,
            // The kernel fills dump datagrams up to 32 KiB.
            buffer: Vec::with_capacity(64 * 1024),
        })
    }

    /// Sends a dump request and hands each answer (its type and the whole
    /// netlink message) to `each`. One dump at a time: the kernel refuses a
    /// second one on a socket while one runs.
    fn dump(
        &mut self,
        request: RouteNetlinkMessage,
        mut each: impl FnMut(u16, &[u8]),
    ) -> std::io::Result<()> {
        let invalid = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
        self.sequence += 1;
        let mut message = NetlinkMessage::from(request);
        message.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        message.header.sequence_number = self.sequence;
        message.finalize();
        let mut bytes = vec![0; message.buffer_len()];
        message.serialize(&mut bytes);
        self.socket.send(&bytes, 0)?;
        loop {
            self.buffer.clear();
            let n = self.socket.recv(&mut self.buffer, 0)?;
            if n > self.buffer.len() {
                return Err(invalid(format!("a netlink datagram of {n} bytes")));
            }
            let mut at = 0;
            while at < n {
                let message = NetlinkBuffer::new_checked(&self.buffer[at..n])
                    .map_err(|e| invalid(e.to_string()))?;
                let length = message.length() as usize;
                let kind = message.message_type();
                let sequence = message.sequence_number();
                let payload = message.payload();
                let whole = &self.buffer[at..at + length];
                at += (length + 3) & !3;
                if sequence != self.sequence {
                    continue;
                }
                match kind {
                    NLMSG_DONE | NLMSG_ERROR => {
                        let code = payload
                            .get(..4)
                            .map(|c| i32::from_ne_bytes(c.try_into().expect("4 bytes")))
                            .unwrap_or(0);
                        if code < 0 {
                            return Err(std::io::Error::from_raw_os_error(-code));
                        }
                        if kind == NLMSG_DONE {
                            return Ok(());
                        }
                    }
                    _ => each(kind, whole),
                }
            }
        }
    }
}

impl Routes {
    /// Dumps the routes of the families wanted.
    fn dump(dumper: &mut Dumper, v4: bool, v6: bool) -> std::io::Result<Self> {
        let mut routes = Routes::default();
        for (wanted, family) in [(v4, AddressFamily::Inet), (v6, AddressFamily::Inet6)] {
            if !wanted {
                continue;
            }
            let mut request = RouteMessage::default();
            request.header.address_family = family;
            let mut bad = None;
            dumper.dump(RouteNetlinkMessage::GetRoute(request), |kind, bytes| {
                if kind != RTM_NEWROUTE {
                    return;
                }
                match NetlinkMessage::<RouteNetlinkMessage>::deserialize(bytes) {
                    Ok(NetlinkMessage {
                        payload: NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(m)),
                        ..
                    }) => routes.add(m),
                    Ok(_) => {}
                    Err(e) => bad = Some(e.to_string()),
                }
            })?;
            if let Some(e) = bad {
                tracing::debug!("a route could not be decoded: {e}");
            }
        }
        Ok(routes)
    }

    fn add(&mut self, message: RouteMessage) {
        let header = &message.header;
        let v4 = match header.address_family {
            AddressFamily::Inet => true,
            AddressFamily::Inet6 => false,
            _ => return,
        };
        // TOS- and source-specific routes, cached clones and dead next hops
        // are not what a plain lookup for the address uses.
        if header.tos != 0
            || header.source_prefix_length != 0
            || header
                .flags
                .intersects(RouteFlags::Cloned | RouteFlags::Dead)
        {
            return;
        }
        let mut table = u32::from(header.table);
        let mut network = 0u128;
        let mut oif = None;
        let mut indirect = false;
        let mut priority = 0;
        for attribute in &message.attributes {
            match attribute {
                RouteAttribute::Table(t) => table = *t,
                RouteAttribute::Destination(RouteAddress::Inet(a)) => {
                    network = bits(IpAddr::V4(*a))
                }
                RouteAttribute::Destination(RouteAddress::Inet6(a)) => {
                    network = bits(IpAddr::V6(*a))
                }
                RouteAttribute::Oif(i) => oif = Some(*i),
                RouteAttribute::Gateway(_)
                | RouteAttribute::Via(_)
                | RouteAttribute::MultiPath(_) => indirect = true,
                RouteAttribute::Priority(p) => priority = *p,
                _ => {}
            }
        }
        if table != RT_TABLE_MAIN && table != RT_TABLE_LOCAL {
            return;
        }
        let length = if v4 {
            header.destination_prefix_length.min(32)
        } else {
            header.destination_prefix_length.min(128)
        };
        let route = Route {
            kind: header.kind,
            scope: header.scope,
            oif,
            indirect,
            priority,
        };
        self.0
            .entry((v4, table))
            .or_default()
            .insert(length, network, route);
    }

    /// The interface through which `address` is directly connected.
    fn on_link(&self, address: IpAddr) -> Result<u32, String> {
        let v4 = address.is_ipv4();
        let key = bits(address);
        if let Some(r) = self
            .0
            .get(&(v4, RT_TABLE_LOCAL))
            .and_then(|t| t.lookup(key))
        {
            return Err(match r.kind {
                RouteType::Local => "an address of this node".into(),
                RouteType::Broadcast => "a broadcast address".into(),
                RouteType::Multicast => "a multicast address".into(),
                other => format!("covered by a {other:?} route of the local table"),
            });
        }
        let route = self
            .0
            .get(&(v4, RT_TABLE_MAIN))
            .and_then(|t| t.lookup(key))
            .ok_or("no route")?;
        if route.kind != RouteType::Unicast {
            return Err(format!("no route ({:?})", route.kind));
        }
        if route.indirect {
            return Err("not on a directly connected network".into());
        }
        // IPv4 connected routes have scope link; IPv6 ones scope universe.
        if matches!(route.scope, RouteScope::Host | RouteScope::NoWhere) {
            return Err(format!("a route of scope {:?}", route.scope));
        }
        route.oif.ok_or_else(|| "no interface in the route".into())
    }
}

/// Dumps the neighbour table (only interface `only`'s entries when given)
/// and fills in the MAC of each wanted (interface, address) whose entry is
/// usable. Entries are read in place; only the wanted ones are kept.
fn neighbours(
    dumper: &mut Dumper,
    family: AddressFamily,
    only: Option<u32>,
    wanted: &mut HashMap<(u32, IpAddr), Option<String>>,
) -> std::io::Result<()> {
    let mut request = NeighbourMessage::default();
    request.header.family = family;
    if let Some(index) = only {
        // A filter the kernel applies (when it does not, every entry comes).
        request.attributes.push(NeighbourAttribute::IfIndex(index));
    }
    dumper.dump(RouteNetlinkMessage::GetNeighbour(request), |kind, bytes| {
        if kind != RTM_NEWNEIGH {
            return;
        }
        let Ok(message) = NetlinkBuffer::new_checked(bytes) else {
            return;
        };
        let ndmsg = message.payload();
        if ndmsg.len() < NDMSG_LEN {
            return;
        }
        let ifindex = u32::from_ne_bytes(ndmsg[4..8].try_into().expect("4 bytes"));
        let state = u16::from_ne_bytes(ndmsg[8..10].try_into().expect("2 bytes"));
        if state & NUD_USABLE == 0 {
            return;
        }
        let (mut address, mut lladdr) = (None, None);
        for nla in NlasIterator::new(&ndmsg[NDMSG_LEN..]) {
            let Ok(nla) = nla else { break };
            match (nla.kind(), nla.value()) {
                (NDA_DST, v) if v.len() == 4 => {
                    address = Some(IpAddr::V4(Ipv4Addr::from(
                        <[u8; 4]>::try_from(v).expect("4 bytes"),
                    )))
                }
                (NDA_DST, v) if v.len() == 16 => {
                    address = Some(IpAddr::V6(Ipv6Addr::from(
                        <[u8; 16]>::try_from(v).expect("16 bytes"),
                    )))
                }
                (NDA_LLADDR, v) if !v.is_empty() && v.len() <= 32 => {
                    let mut bytes = [0u8; 32];
                    bytes[..v.len()].copy_from_slice(v);
                    lladdr = Some((bytes, v.len()))
                }
                _ => {}
            }
        }
        let (Some(address), Some((bytes, length))) = (address, lladdr) else {
            return;
        };
        let lladdr = &bytes[..length];
        if let Some(slot) = wanted.get_mut(&(ifindex, address)) {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            let mut mac = String::with_capacity(lladdr.len() * 3);
            for (i, b) in lladdr.iter().enumerate() {
                if i > 0 {
                    mac.push(':');
                }
                mac.push(char::from(HEX[usize::from(b >> 4)]));
                mac.push(char::from(HEX[usize::from(b & 0xf)]));
            }
            *slot = Some(mac);
        }
    })
}

/// The name of interface `index` (in this thread's namespace, which is the
/// netlink socket's).
fn interface_name(index: u32) -> Result<String, String> {
    let mut name = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `name` has the IF_NAMESIZE bytes if_indextoname writes at most.
    let found = unsafe { libc::if_indextoname(index, name.as_mut_ptr()) };
    if found.is_null() {
        return Err(format!(
            "interface {index}: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name into `name`.
    let name = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
    Ok(name.to_string_lossy().into_owned())
}

type Resolved = BTreeMap<String, Result<(String, String), String>>;

/// (interface, MAC) of each address, or why it cannot be a local target.
fn resolve_all(addresses: BTreeSet<String>) -> Result<Resolved, String> {
    let parsed: Vec<(String, Option<IpAddr>)> = addresses
        .into_iter()
        .map(|a| {
            let ip = a.parse::<IpAddr>().ok();
            (a, ip)
        })
        .collect();
    let v4 = parsed.iter().any(|(_, a)| matches!(a, Some(IpAddr::V4(_))));
    let v6 = parsed.iter().any(|(_, a)| matches!(a, Some(IpAddr::V6(_))));
    let failed = |e: std::io::Error| format!("dumping the routes and neighbours: {e}");
    let mut dumper = Dumper::new().map_err(failed)?;
    let routes = Routes::dump(&mut dumper, v4, v6).map_err(failed)?;

    // Address → its interface, or why it is not directly connected.
    let on_link: Vec<(String, Result<(IpAddr, u32), String>)> = parsed
        .into_iter()
        .map(|(text, address)| {
            let r = match address {
                None => Err("not an IP address".to_string()),
                Some(a) => routes.on_link(a).map(|oif| (a, oif)),
            };
            (text, r)
        })
        .collect();
    let mut wanted: HashMap<(u32, IpAddr), Option<String>> = on_link
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok().map(|&(a, oif)| ((oif, a), None)))
        .collect();
    if !wanted.is_empty() {
        let interfaces: BTreeSet<u32> = wanted.keys().map(|(oif, _)| *oif).collect();
        let only = (interfaces.len() == 1)
            .then(|| interfaces.first().copied())
            .flatten();
        let family = match (v4, v6) {
            (true, false) => AddressFamily::Inet,
            (false, true) => AddressFamily::Inet6,
            _ => AddressFamily::Unspec,
        };
        neighbours(&mut dumper, family, only, &mut wanted).map_err(failed)?;
    }

    let mut names: HashMap<u32, Result<String, String>> = HashMap::new();
    Ok(on_link
        .into_iter()
        .map(|(text, r)| {
            let resolved = r.and_then(|(address, oif)| {
                let mac = wanted[&(oif, address)]
                    .clone()
                    .ok_or_else(|| format!("no resolved neighbour on interface {oif}"))?;
                let name = names.entry(oif).or_insert_with(|| interface_name(oif));
                name.clone().map(|name| (name, mac))
            });
            (text, resolved)
        })
        .collect())
}

/// Turns the placeholder targets (`Remote { node: <backend address> }`) into
/// local ones, dropping those that cannot be reached.
pub async fn targets(spec: &mut LbSpec) {
    let addresses: BTreeSet<String> = spec
        .targets
        .iter()
        .filter_map(|t| match &t.via {
            TargetVia::Remote { node } => Some(node.clone()),
            TargetVia::Local { .. } => None,
        })
        .collect();
    if addresses.is_empty() {
        return;
    }
    let wanted = addresses.clone();
    let resolved = tokio::task::spawn_blocking(move || resolve_all(wanted))
        .await
        .unwrap_or_else(|e| Err(format!("the resolver failed: {e}")));
    let resolved = match resolved {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!("backends cannot be resolved: {e}");
            addresses.into_iter().map(|a| (a, Err(e.clone()))).collect()
        }
    };
    spec.targets.retain_mut(|t| {
        let TargetVia::Remote { node } = &t.via else {
            return true;
        };
        match &resolved[node] {
            Ok((interface, mac)) => {
                t.via = TargetVia::Local {
                    interface: interface.clone(),
                    mac: mac.clone(),
                };
                true
            }
            Err(why) => {
                tracing::debug!(backend = %node, "left out: {why}");
                false
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_prefix_wins_and_lowest_metric_per_prefix() {
        let route = |oif, priority| Route {
            kind: RouteType::Unicast,
            scope: RouteScope::Link,
            oif: Some(oif),
            indirect: false,
            priority,
        };
        let a = |s: &str| bits(s.parse().unwrap());
        let mut t = Table::default();
        t.insert(
            0,
            0,
            Route {
                indirect: true,
                ..route(1, 0)
            },
        );
        t.insert(20, a("198.18.16.0"), route(2, 100));
        t.insert(20, a("198.18.16.0"), route(3, 50));
        t.insert(24, a("198.18.17.0"), route(4, 0));
        assert_eq!(t.lengths, vec![24, 20, 0]);
        assert_eq!(t.lookup(a("198.18.17.9")).unwrap().oif, Some(4));
        assert_eq!(t.lookup(a("198.18.18.9")).unwrap().oif, Some(3));
        assert!(t.lookup(a("10.0.0.1")).unwrap().indirect);
        let mut t6 = Table::default();
        t6.insert(64, a("2001:db8:1::"), route(5, 256));
        assert_eq!(t6.lookup(a("2001:db8:1::7")).unwrap().oif, Some(5));
        assert!(t6.lookup(a("2001:db8:2::7")).is_none());
    }
}
