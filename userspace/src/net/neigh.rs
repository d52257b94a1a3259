//! The one neighbour resolver: where an address goes (interface and next
//! hop) and the next hop's MAC, in the calling thread's namespace.
//!
//! One dump of the routes (per address family in use) and one of the
//! neighbour table per call (none in the daemon's namespace, whose table is
//! kept by [`super::neigh_table`]), whatever the number of addresses; each
//! address is then matched in memory:
//!
//! * an address the local table covers (an address of this node, a
//!   broadcast or multicast address) is left out;
//! * the longest prefix of the main table that covers it must be a unicast
//!   route with an output interface: without a gateway (on-link) the
//!   neighbour is the address itself, with one gateway it is the gateway
//!   (only [`Resolver::next_hops`] accepts that); several next hops are left
//!   to the kernel's per-packet lookup, which spreads flows over them;
//! * the neighbour entry must pass [`usable`].
//!
//! When the node has policy rules beyond the kernel's three defaults, the
//! main table may not be what a lookup uses: each address is then asked of
//! the kernel (`RTM_GETROUTE` with `RTM_F_FIB_MATCH`, the route it matched),
//! one request per address.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use netlink_packet_route::{
    neighbour::{
        NeighbourAddress, NeighbourAttribute, NeighbourExtFlags, NeighbourFlags, NeighbourMessage,
        NeighbourState,
    },
    route::{RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteScope, RouteType},
    rule::{RuleAttribute, RuleMessage},
    AddressFamily, RouteNetlinkMessage,
};
use rtnetlink::packet_core::{NetlinkBuffer, NetlinkMessage, NetlinkPayload, NlasIterator};
use rtnetlink::packet_core::{NLM_F_CREATE, NLM_F_EXCL};

use super::socket::{errno_of, Netlink};
use super::{link, NetError, Prefix};

const RTM_NEWROUTE: u16 = 24;
const RTM_NEWNEIGH: u16 = 28;
const RTM_NEWRULE: u16 = 32;
/// `struct ndmsg`, before the attributes.
const NDMSG_LEN: usize = 12;
const NDA_DST: u16 = 1;
const NDA_LLADDR: u16 = 2;
const RT_TABLE_DEFAULT: u32 = 253;
const RT_TABLE_MAIN: u32 = 254;
const RT_TABLE_LOCAL: u32 = 255;

/// The kernel's `NUD_VALID`: REACHABLE, STALE, DELAY, PROBE, PERMANENT and
/// NOARP, the states in which its link-layer address is used.
pub const NUD_VALID: u16 = 0x02 | 0x04 | 0x08 | 0x10 | 0x80 | 0x40;

/// The one rule for "neighbour resolved": a state in [`NUD_VALID`] and an
/// Ethernet (6-byte) link-layer address. It is the rule of the kernel's own
/// `bpf_fib_lookup`, the XDP path's fallback when no next hop is cached, so
/// a cached hop and the per-packet lookup agree on which neighbours count.
/// NOARP counts: such an entry carries an address the operator (or the
/// device) fixed, which is as good as PERMANENT for sending a frame.
pub fn usable(state: u16, lladdr: &[u8]) -> Option<[u8; 6]> {
    if state & NUD_VALID == 0 {
        return None;
    }
    lladdr.try_into().ok()
}

/// The resolved next hop towards a remote node: egress interface, the next
/// hop's MAC and the egress interface's MAC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hop {
    pub ifindex: u32,
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    /// The egress interface's MTU.
    pub mtu: u32,
    /// The egress interface is a veth.
    pub veth: bool,
}

impl Hop {
    /// (ifindex, dst MAC, src MAC) as a map entry holds them; none: all
    /// zero, which the programs take as "ask the FIB per packet".
    pub fn entry(hop: Option<&Hop>) -> (u32, [u8; 6], [u8; 6]) {
        hop.map_or((0, [0; 6], [0; 6]), |h| (h.ifindex, h.dst_mac, h.src_mac))
    }
}

/// A resolved neighbour: the interface, the neighbour's address (the
/// address asked for, or its gateway) and its MAC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Neighbour {
    pub ifindex: u32,
    pub address: IpAddr,
    pub mac: [u8; 6],
}

/// Why an address has no usable neighbour.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unresolved {
    /// It cannot be reached that way (the text says why).
    Route(String),
    /// The route is known, the neighbour table has no entry for its next hop.
    NoEntry { ifindex: u32, address: IpAddr },
    /// The entry exists but is not usable (yet): its state.
    Waiting {
        ifindex: u32,
        address: IpAddr,
        state: u16,
    },
}

impl std::fmt::Display for Unresolved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unresolved::Route(why) => f.write_str(why),
            Unresolved::NoEntry { ifindex, address } => {
                write!(f, "no neighbour entry for {address} on interface {ifindex}")
            }
            Unresolved::Waiting {
                ifindex,
                address,
                state,
            } => write!(
                f,
                "neighbour {address} on interface {ifindex} not resolved (state {state:#x})"
            ),
        }
    }
}

/// What a route says about the addresses it covers.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Route {
    kind: RouteType,
    scope: RouteScope,
    oif: Option<u32>,
    gateway: Option<IpAddr>,
    /// Several next hops.
    multipath: bool,
    priority: u32,
}

impl Route {
    /// The route of a message, with its table, prefix and length.
    fn of(message: &RouteMessage) -> Option<(u32, Prefix, Route)> {
        let header = &message.header;
        let v4 = match header.address_family {
            AddressFamily::Inet => true,
            AddressFamily::Inet6 => false,
            _ => return None,
        };
        // TOS- and source-specific routes, cached clones and dead next hops
        // are not what a plain lookup for the address uses.
        if header.tos != 0
            || header.source_prefix_length != 0
            || header
                .flags
                .intersects(RouteFlags::Cloned | RouteFlags::Dead)
        {
            return None;
        }
        let mut table = u32::from(header.table);
        let mut destination: IpAddr = if v4 {
            Ipv4Addr::UNSPECIFIED.into()
        } else {
            Ipv6Addr::UNSPECIFIED.into()
        };
        let mut route = Route {
            kind: header.kind,
            scope: header.scope,
            oif: None,
            gateway: None,
            multipath: false,
            priority: 0,
        };
        for attribute in &message.attributes {
            match attribute {
                RouteAttribute::Table(t) => table = *t,
                RouteAttribute::Destination(RouteAddress::Inet(a)) => destination = (*a).into(),
                RouteAttribute::Destination(RouteAddress::Inet6(a)) => destination = (*a).into(),
                RouteAttribute::Oif(i) => route.oif = Some(*i),
                RouteAttribute::Gateway(RouteAddress::Inet(a)) => route.gateway = Some((*a).into()),
                RouteAttribute::Gateway(RouteAddress::Inet6(a)) => {
                    route.gateway = Some((*a).into())
                }
                // A gateway of the other family: not one we can resolve here.
                RouteAttribute::Via(_) | RouteAttribute::MultiPath(_) => route.multipath = true,
                RouteAttribute::Priority(p) => route.priority = *p,
                _ => {}
            }
        }
        let prefix = Prefix::new(destination, header.destination_prefix_length).network();
        Some((table, prefix, route))
    }

    /// The interface and neighbour address for `address` through this route.
    fn next_hop(&self, address: IpAddr, gateways: bool) -> Result<(u32, IpAddr), String> {
        if self.kind != RouteType::Unicast {
            return Err(format!("no route ({:?})", self.kind));
        }
        if self.multipath {
            return Err("a route with several next hops".into());
        }
        let neighbour = match self.gateway {
            Some(_) if !gateways => return Err("not on a directly connected network".into()),
            Some(gateway) => gateway,
            None => address,
        };
        // IPv4 connected routes have scope link; IPv6 ones scope universe.
        if matches!(self.scope, RouteScope::Host | RouteScope::NoWhere) {
            return Err(format!("a route of scope {:?}", self.scope));
        }
        let oif = self.oif.ok_or("no interface in the route")?;
        Ok((oif, neighbour))
    }
}

/// Routes of one table and family by prefix length, for longest-prefix
/// matching with one hash lookup per prefix length in use.
#[derive(Clone, Default, PartialEq, Eq)]
struct Table {
    /// Network → route (the lowest metric).
    routes: HashMap<Prefix, Route>,
    /// The prefix lengths present, longest first.
    lengths: Vec<u8>,
}

impl Table {
    fn insert(&mut self, prefix: Prefix, route: Route) {
        match self.routes.get(&prefix) {
            Some(old) if old.priority <= route.priority => {}
            _ => {
                self.routes.insert(prefix, route);
            }
        }
        if let Err(i) = self.lengths.binary_search_by(|l| prefix.len.cmp(l)) {
            self.lengths.insert(i, prefix.len);
        }
    }

    fn lookup(&self, address: IpAddr) -> Option<&Route> {
        self.lengths
            .iter()
            .find_map(|&l| self.routes.get(&Prefix::new(address, l).network()))
    }
}

/// How addresses are routed: the main and local tables in memory, or the
/// kernel asked per address (when policy rules may send lookups elsewhere).
enum Routes {
    Tables(Tables),
    AskKernel,
}

/// Decodes a whole route netlink message.
fn decode(bytes: &[u8]) -> Option<RouteNetlinkMessage> {
    match NetlinkMessage::<RouteNetlinkMessage>::deserialize(bytes) {
        Ok(NetlinkMessage {
            payload: NetlinkPayload::InnerMessage(m),
            ..
        }) => Some(m),
        _ => None,
    }
}

/// True for the kernel's own rules: 0 → local, 32766 → main, 32767 → default.
fn default_rule(rule: &RuleMessage) -> bool {
    let mut priority = 0;
    let mut table = u32::from(rule.header.table);
    for attribute in &rule.attributes {
        match attribute {
            RuleAttribute::Priority(p) => priority = *p,
            RuleAttribute::Table(t) => table = *t,
            RuleAttribute::Protocol(_) | RuleAttribute::SuppressPrefixLen(_) => {}
            RuleAttribute::FwMark(0) | RuleAttribute::FwMask(_) => {}
            _ => return false,
        }
    }
    rule.header.src_len == 0
        && rule.header.dst_len == 0
        && matches!(
            (priority, table),
            (0, RT_TABLE_LOCAL) | (32766, RT_TABLE_MAIN) | (32767, RT_TABLE_DEFAULT)
        )
}

/// The interface and neighbour address of each address, or why it has none.
/// The main and local tables by (IPv4, table id).
type Tables = HashMap<(bool, u32), Table>;
type Routed = Vec<Result<(u32, IpAddr), String>>;
/// Wanted neighbours: (interface, address) → state and link-layer address
/// when the table has an entry.
type Entries = HashMap<(u32, IpAddr), Option<(u16, Vec<u8>)>>;
/// Each address's (interface name, MAC), or why it has none.
pub type OnLink = Vec<Result<(String, [u8; 6]), String>>;
/// Addresses [`Resolver::on_link_cached`] resolved, with the routes and
/// the neighbour table's generation ([`super::neigh_table::generation`])
/// they were resolved under.
#[derive(Default)]
pub struct OnLinkCache {
    routes: Option<Tables>,
    neighbours: u64,
    /// Sorted by address.
    found: Vec<(IpAddr, (u32, [u8; 6]))>,
    asked: usize,
}

impl OnLinkCache {
    /// How many addresses the last call resolved (not taken from here).
    pub fn asked(&self) -> usize {
        self.asked
    }
}

/// (interface index, MAC) results with the interface's name, looked up
/// once per interface (a rename shows at the next resolve).
fn named(resolved: impl Iterator<Item = Result<(u32, [u8; 6]), String>>) -> OnLink {
    let mut names: HashMap<u32, Result<String, String>> = HashMap::new();
    resolved
        .map(|r| {
            let (ifindex, mac) = r?;
            let name = names.entry(ifindex).or_insert_with(|| {
                link::name(ifindex).ok_or_else(|| format!("interface {ifindex} is gone"))
            });
            name.clone().map(|name| (name, mac))
        })
        .collect()
}

/// An address's interface index and MAC, or why it has none.
type Found = Result<(u32, [u8; 6]), String>;

/// What `found` (sorted by address) holds for each of `addresses`.
fn sorted_lookup<T: Copy>(found: &[(IpAddr, T)], addresses: &[IpAddr]) -> Vec<Option<T>> {
    addresses
        .iter()
        .map(|a| {
            let at = found.binary_search_by_key(a, |&(f, _)| f).ok()?;
            Some(found[at].1)
        })
        .collect()
}

/// Each node's next hop and its neighbour's address, or why it has none.
pub type NextHops = Vec<Result<(Hop, IpAddr), Unresolved>>;

/// A netlink socket for resolving, one per caller and call.
pub struct Resolver {
    socket: Netlink,
}

impl Resolver {
    pub fn new() -> Result<Self, NetError> {
        Ok(Self {
            socket: Netlink::route().map_err(NetError::kernel("opening a netlink socket"))?,
        })
    }

    fn routes(&mut self, v4: bool, v6: bool) -> std::io::Result<Routes> {
        let families = [(v4, AddressFamily::Inet), (v6, AddressFamily::Inet6)];
        let mut only_defaults = true;
        for (_, family) in families.iter().filter(|(wanted, _)| *wanted) {
            let mut request = RuleMessage::default();
            request.header.family = *family;
            self.socket
                .dump(RouteNetlinkMessage::GetRule(request), |kind, bytes| {
                    if kind != RTM_NEWRULE || !only_defaults {
                        return;
                    }
                    if let Some(RouteNetlinkMessage::NewRule(rule)) = decode(bytes) {
                        only_defaults &= default_rule(&rule);
                    }
                })?;
        }
        if !only_defaults {
            return Ok(Routes::AskKernel);
        }
        let mut tables = Tables::new();
        for (_, family) in families.iter().filter(|(wanted, _)| *wanted) {
            let mut request = RouteMessage::default();
            request.header.address_family = *family;
            self.socket
                .dump(RouteNetlinkMessage::GetRoute(request), |kind, bytes| {
                    if kind != RTM_NEWROUTE {
                        return;
                    }
                    let Some(RouteNetlinkMessage::NewRoute(m)) = decode(bytes) else {
                        return;
                    };
                    if let Some((table, prefix, route)) = Route::of(&m) {
                        if table == RT_TABLE_MAIN || table == RT_TABLE_LOCAL {
                            tables
                                .entry((prefix.is_ipv4(), table))
                                .or_default()
                                .insert(prefix, route);
                        }
                    }
                })?;
        }
        Ok(Routes::Tables(tables))
    }

    /// The route the kernel matched for `address`.
    fn ask(&mut self, address: IpAddr) -> Result<Route, String> {
        let mut request = RouteMessage::default();
        request.header.address_family = match address {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        };
        request.header.destination_prefix_length = Prefix::host(address).len;
        request.header.flags = RouteFlags::FibMatch;
        request
            .attributes
            .push(RouteAttribute::Destination(match address {
                IpAddr::V4(a) => RouteAddress::Inet(a),
                IpAddr::V6(a) => RouteAddress::Inet6(a),
            }));
        let answers = self
            .socket
            .request(RouteNetlinkMessage::GetRoute(request), 0)
            .map_err(|e| format!("no route ({e})"))?;
        answers
            .iter()
            .find_map(|m| match m {
                RouteNetlinkMessage::NewRoute(m) => Route::of(m).map(|(_, _, r)| r),
                _ => None,
            })
            .ok_or_else(|| "no route".to_string())
    }

    /// Interface and neighbour address of each address.
    fn route_all(&mut self, addresses: &[IpAddr], gateways: bool) -> Result<Routed, NetError> {
        let routes = self.routes_for(addresses)?;
        self.route_with(&routes, addresses, gateways)
    }

    /// The rules and routes that decide where `addresses` go.
    fn routes_for(&mut self, addresses: &[IpAddr]) -> Result<Routes, NetError> {
        let v4 = addresses.iter().any(IpAddr::is_ipv4);
        let v6 = addresses.iter().any(IpAddr::is_ipv6);
        self.routes(v4, v6)
            .map_err(NetError::kernel("dumping the rules and routes"))
    }

    /// Interface and neighbour address of each address by `routes`.
    fn route_with(
        &mut self,
        routes: &Routes,
        addresses: &[IpAddr],
        gateways: bool,
    ) -> Result<Routed, NetError> {
        Ok(addresses
            .iter()
            .map(|&address| match routes {
                Routes::Tables(tables) => {
                    let v4 = address.is_ipv4();
                    if let Some(r) = tables
                        .get(&(v4, RT_TABLE_LOCAL))
                        .and_then(|t| t.lookup(address))
                    {
                        return Err(match r.kind {
                            RouteType::Local => "an address of this node".into(),
                            RouteType::Broadcast => "a broadcast address".into(),
                            RouteType::Multicast => "a multicast address".into(),
                            other => format!("covered by a {other:?} route of the local table"),
                        });
                    }
                    tables
                        .get(&(v4, RT_TABLE_MAIN))
                        .and_then(|t| t.lookup(address))
                        .ok_or_else(|| "no route".to_string())?
                        .next_hop(address, gateways)
                }
                Routes::AskKernel => match self.ask(address)? {
                    r if r.kind == RouteType::Local => Err("an address of this node".into()),
                    r => r.next_hop(address, gateways),
                },
            })
            .collect())
    }

    /// Dumps the neighbour table (only interface `only`'s entries when given)
    /// and records the state and link-layer address of each wanted
    /// (interface, address). Entries are read in place.
    fn neighbours(
        &mut self,
        family: AddressFamily,
        only: Option<u32>,
        wanted: &mut Entries,
    ) -> std::io::Result<()> {
        let mut request = NeighbourMessage::default();
        request.header.family = family;
        if let Some(index) = only {
            // A filter the kernel applies (when it does not, every entry comes).
            request.attributes.push(NeighbourAttribute::IfIndex(index));
        }
        self.socket
            .dump(RouteNetlinkMessage::GetNeighbour(request), |kind, bytes| {
                if kind != RTM_NEWNEIGH {
                    return;
                }
                if let Some((ifindex, address, state, lladdr)) = parse_neighbour(bytes) {
                    if let Some(slot) = wanted.get_mut(&(ifindex, address)) {
                        *slot = Some((state, lladdr.to_vec()));
                    }
                }
            })
    }

    /// The neighbour of each address, by the one rule.
    fn resolve(
        &mut self,
        addresses: &[IpAddr],
        gateways: bool,
    ) -> Result<Vec<Result<Neighbour, Unresolved>>, NetError> {
        let routed = self.route_all(addresses, gateways)?;
        self.neighbours_of(routed)
    }

    /// The neighbour of each routed address, by the one rule.
    fn neighbours_of(
        &mut self,
        routed: Routed,
    ) -> Result<Vec<Result<Neighbour, Unresolved>>, NetError> {
        let mut wanted: Entries = routed
            .iter()
            .filter_map(|r| r.as_ref().ok().map(|&key| (key, None)))
            .collect();
        if !wanted.is_empty() {
            let interfaces: BTreeSet<u32> = wanted.keys().map(|(oif, _)| *oif).collect();
            let only = (interfaces.len() == 1)
                .then(|| interfaces.first().copied())
                .flatten();
            let v4 = wanted.keys().any(|(_, a)| a.is_ipv4());
            let v6 = wanted.keys().any(|(_, a)| a.is_ipv6());
            let family = match (v4, v6) {
                (true, false) => AddressFamily::Inet,
                (false, true) => AddressFamily::Inet6,
                _ => AddressFamily::Unspec,
            };
            // The kept table; a miss is dumped for, as the kernel creates
            // some entries (NOARP, INCOMPLETE) without a notification.
            let all_kept = super::neigh_table::with(|entries| {
                let mut all = true;
                for (key, slot) in wanted.iter_mut() {
                    *slot = entries.get(key).cloned();
                    all &= slot.is_some();
                }
                all
            });
            if all_kept != Some(true) {
                self.neighbours(family, only, &mut wanted)
                    .map_err(NetError::kernel("dumping the neighbours"))?;
            }
        }
        Ok(routed
            .into_iter()
            .map(|r| {
                let (ifindex, address) = r.map_err(Unresolved::Route)?;
                match &wanted[&(ifindex, address)] {
                    None => Err(Unresolved::NoEntry { ifindex, address }),
                    Some((state, lladdr)) => match usable(*state, lladdr) {
                        Some(mac) => Ok(Neighbour {
                            ifindex,
                            address,
                            mac,
                        }),
                        None => Err(Unresolved::Waiting {
                            ifindex,
                            address,
                            state: *state,
                        }),
                    },
                }
            })
            .collect())
    }

    /// (interface name, MAC) of each address on a directly connected
    /// network (a backend this node's XDP can hand packets to).
    pub fn on_link(&mut self, addresses: &[IpAddr]) -> Result<OnLink, NetError> {
        let resolved = self.resolve(addresses, false)?;
        Ok(named(resolved.into_iter().map(|r| {
            r.map(|n| (n.ifindex, n.mac)).map_err(|e| e.to_string())
        })))
    }

    /// [`Self::on_link`], taking what `cache` holds for addresses resolved
    /// before while the routes and the neighbours' MACs stay as they were:
    /// an update of 10 000 backends then resolves only the new ones. Without
    /// the kept neighbour table (another namespace) or with policy rules,
    /// it resolves every address, as `on_link` does.
    pub fn on_link_cached(
        &mut self,
        addresses: &[IpAddr],
        cache: &mut OnLinkCache,
    ) -> Result<OnLink, NetError> {
        let routes = self.routes_for(addresses)?;
        let generation = super::neigh_table::with(|_| super::neigh_table::generation());
        let (Routes::Tables(tables), Some(generation)) = (&routes, generation) else {
            *cache = OnLinkCache {
                asked: addresses.len(),
                ..Default::default()
            };
            let routed = self.route_with(&routes, addresses, false)?;
            let resolved = self.neighbours_of(routed)?;
            return Ok(named(resolved.into_iter().map(|r| {
                r.map(|n| (n.ifindex, n.mac)).map_err(|e| e.to_string())
            })));
        };
        if cache.routes.as_ref() != Some(tables) || cache.neighbours != generation {
            cache.found.clear();
            cache.routes = Some(tables.clone());
            cache.neighbours = generation;
        }
        let hits = sorted_lookup(&cache.found, addresses);
        let misses: Vec<IpAddr> = addresses
            .iter()
            .zip(&hits)
            .filter(|(_, hit)| hit.is_none())
            .map(|(a, _)| *a)
            .collect();
        cache.asked = misses.len();
        let routed = self.route_with(&routes, &misses, false)?;
        let resolved = self.neighbours_of(routed)?;
        let missed: Vec<(IpAddr, Found)> = misses
            .into_iter()
            .zip(resolved)
            .map(|(a, r)| (a, r.map(|n| (n.ifindex, n.mac)).map_err(|e| e.to_string())))
            .collect();
        let mut next_miss = missed.iter();
        let out = named(hits.into_iter().map(|hit| match hit {
            Some(hit) => Ok(hit),
            None => next_miss.next().expect("a result per miss").1.clone(),
        }));
        // Only what resolved is kept: an address without a usable entry
        // may get one the kernel does not announce (NOARP), and is asked
        // again. A change while the misses were read starts over.
        let now = super::neigh_table::with(|_| super::neigh_table::generation());
        if now == Some(generation) {
            let before = cache.found.len();
            cache
                .found
                .extend(missed.into_iter().filter_map(|(a, r)| Some((a, r.ok()?))));
            if cache.found.len() > before {
                cache.found.sort_unstable_by_key(|(a, _)| *a);
                cache.found.dedup_by_key(|(a, _)| *a);
            }
        } else {
            *cache = OnLinkCache {
                asked: cache.asked,
                ..Default::default()
            };
        }
        Ok(out)
    }

    /// The next hop towards each node (directly or through a gateway), with
    /// the egress interface's MAC, and the neighbour's address.
    pub fn next_hops(&mut self, nodes: &[IpAddr]) -> Result<NextHops, NetError> {
        let resolved = self.resolve(nodes, true)?;
        let mut links: HashMap<u32, Option<([u8; 6], u32, bool)>> = HashMap::new();
        Ok(resolved
            .into_iter()
            .map(|r| {
                let n = r?;
                let link = links.entry(n.ifindex).or_insert_with(|| {
                    let l = link::by_index(n.ifindex).ok()?;
                    // Unknown: taken as a veth (a redirect works on both).
                    let veth = super::peer::facts(n.ifindex).map_or(true, |f| f.veth);
                    Some((l.mac().ok()?, l.mtu, veth))
                });
                let (src_mac, mtu, veth) = link.ok_or_else(|| {
                    Unresolved::Route(format!("interface {} has no Ethernet address", n.ifindex))
                })?;
                let hop = Hop {
                    ifindex: n.ifindex,
                    dst_mac: n.mac,
                    src_mac,
                    mtu,
                    veth,
                };
                Ok((hop, n.address))
            })
            .collect())
    }
}

/// (interface, address, state, link-layer address) of a neighbour message,
/// read in place.
pub(crate) fn parse_neighbour(bytes: &[u8]) -> Option<(u32, IpAddr, u16, &[u8])> {
    let message = NetlinkBuffer::new_checked(bytes).ok()?;
    let ndmsg = message.payload();
    if ndmsg.len() < NDMSG_LEN {
        return None;
    }
    let ifindex = u32::from_ne_bytes(ndmsg[4..8].try_into().expect("4 bytes"));
    let state = u16::from_ne_bytes(ndmsg[8..10].try_into().expect("2 bytes"));
    let (mut address, mut lladdr) = (None, &[][..]);
    for nla in NlasIterator::new(&ndmsg[NDMSG_LEN..]) {
        let Ok(nla) = nla else { break };
        let (kind, length) = (nla.kind(), usize::from(nla.length()));
        let whole: &[u8] = nla.into_inner();
        let value = whole.get(4..length).unwrap_or_default();
        match (kind, value) {
            (NDA_DST, v) if v.len() == 4 => {
                address = Some(IpAddr::V4(<[u8; 4]>::try_from(v).expect("4 bytes").into()))
            }
            (NDA_DST, v) if v.len() == 16 => {
                address = Some(IpAddr::V6(
                    <[u8; 16]>::try_from(v).expect("16 bytes").into(),
                ))
            }
            (NDA_LLADDR, v) => lladdr = v,
            _ => {}
        }
    }
    Some((ifindex, address?, state, lladdr))
}

/// A neighbour message for `address` on `ifindex`, in no state.
fn entry_for(ifindex: u32, address: IpAddr) -> NeighbourMessage {
    let mut message = NeighbourMessage::default();
    message.header.family = match address {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    };
    message.header.ifindex = ifindex;
    message.header.state = NeighbourState::None;
    message
        .attributes
        .push(NeighbourAttribute::Destination(match address {
            IpAddr::V4(a) => NeighbourAddress::Inet(a),
            IpAddr::V6(a) => NeighbourAddress::Inet6(a),
        }));
    message
}

/// Adds a *managed* neighbour entry (the kernel keeps it resolved) for
/// `address` on `ifindex`. An entry that exists stays as it is: false.
pub fn add_managed(ifindex: u32, address: IpAddr) -> Result<bool, NetError> {
    let mut message = entry_for(ifindex, address);
    message
        .attributes
        .push(NeighbourAttribute::ExtFlags(NeighbourExtFlags::Managed));
    let mut socket = Netlink::route().map_err(NetError::kernel("opening a netlink socket"))?;
    match socket.request(
        RouteNetlinkMessage::NewNeighbour(message),
        NLM_F_CREATE | NLM_F_EXCL,
    ) {
        Ok(_) => Ok(true),
        Err(e) if errno_of(&e) == Some(libc::EEXIST) => Ok(false),
        Err(e) => Err(NetError::kernel(format!(
            "adding a managed neighbour entry for {address} on interface {ifindex}"
        ))(e)),
    }
}

/// Asks the kernel to resolve `address` on `ifindex` once, as a packet
/// for it would (`NTF_USE`): an ordinary entry is made if there is none, and
/// one that failed is probed again. Unlike a managed entry, nothing stays
/// that the kernel would not age out.
pub fn solicit(ifindex: u32, address: IpAddr) -> Result<(), NetError> {
    let mut message = entry_for(ifindex, address);
    message.header.flags = NeighbourFlags::Use;
    let mut socket = Netlink::route().map_err(NetError::kernel("opening a netlink socket"))?;
    socket
        .request(RouteNetlinkMessage::NewNeighbour(message), NLM_F_CREATE)
        .map(|_| ())
        .map_err(NetError::kernel(format!(
            "asking to resolve {address} on interface {ifindex}"
        )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorted_lookup_finds_what_a_search_finds_in_any_order() {
        let ip = |i: u32| IpAddr::from(std::net::Ipv4Addr::from(0xc612_0000 + i));
        // Every third address of 0..300 is known.
        let found: Vec<(IpAddr, u32)> = (0..300).step_by(3).map(|i| (ip(i), i)).collect();
        let naive = |asked: &[IpAddr]| -> Vec<Option<u32>> {
            asked
                .iter()
                .map(|a| found.iter().find(|(f, _)| f == a).map(|&(_, v)| v))
                .collect()
        };
        let in_order: Vec<IpAddr> = (0..310).map(ip).collect();
        let sparse: Vec<IpAddr> = (0..310).step_by(41).map(ip).collect();
        let mut shuffled = in_order.clone();
        shuffled.reverse();
        shuffled.swap(3, 200);
        let repeated = vec![ip(3), ip(3), ip(0), ip(299), ip(297), ip(297), ip(6)];
        for asked in [in_order, sparse, shuffled, repeated, Vec::new()] {
            assert_eq!(sorted_lookup(&found, &asked), naive(&asked), "{asked:?}");
        }
        assert_eq!(sorted_lookup::<u32>(&[], &[ip(1)]), vec![None]);
    }

    #[test]
    fn resolved_means_a_valid_state_and_an_ethernet_address() {
        let mac = [2, 0, 0, 0, 0, 1];
        // REACHABLE, STALE, DELAY, PROBE, PERMANENT, NOARP.
        for state in [0x02, 0x04, 0x08, 0x10, 0x80, 0x40] {
            assert_eq!(usable(state, &mac), Some(mac), "state {state:#x}");
        }
        // NONE, INCOMPLETE, FAILED.
        for state in [0x00, 0x01, 0x20] {
            assert_eq!(usable(state, &mac), None, "state {state:#x}");
        }
        assert_eq!(usable(0x80, &[]), None, "no link-layer address");
        assert_eq!(usable(0x80, &[1; 20]), None, "not Ethernet");
    }

    #[test]
    fn longest_prefix_wins_and_lowest_metric_per_prefix() {
        let route = |oif, priority| Route {
            kind: RouteType::Unicast,
            scope: RouteScope::Link,
            oif: Some(oif),
            gateway: None,
            multipath: false,
            priority,
        };
        let p = |s: &str| s.parse::<Prefix>().unwrap();
        let a = |s: &str| s.parse::<IpAddr>().unwrap();
        let mut t = Table::default();
        t.insert(
            p("0.0.0.0/0"),
            Route {
                gateway: Some(a("198.18.0.1")),
                ..route(1, 0)
            },
        );
        t.insert(p("198.18.16.0/20"), route(2, 100));
        t.insert(p("198.18.16.0/20"), route(3, 50));
        t.insert(p("198.18.17.0/24"), route(4, 0));
        assert_eq!(t.lengths, vec![24, 20, 0]);
        assert_eq!(t.lookup(a("198.18.17.9")).unwrap().oif, Some(4));
        assert_eq!(t.lookup(a("198.18.18.9")).unwrap().oif, Some(3));
        let default = t.lookup(a("10.0.0.1")).unwrap();
        assert_eq!(
            default.next_hop(a("10.0.0.1"), true),
            Ok((1, a("198.18.0.1")))
        );
        assert!(default.next_hop(a("10.0.0.1"), false).is_err());
        let multipath = Route {
            multipath: true,
            ..route(1, 0)
        };
        assert!(multipath.next_hop(a("10.0.0.1"), true).is_err());
        let mut t6 = Table::default();
        t6.insert(p("2001:db8:1::/64"), route(5, 256));
        assert_eq!(t6.lookup(a("2001:db8:1::7")).unwrap().oif, Some(5));
        assert!(t6.lookup(a("2001:db8:2::7")).is_none());
    }
}
