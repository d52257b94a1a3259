//! Load-balancing configuration: VIPs, flows, streams and targets as written
//! ([`LbSpec`]), and the whole configuration validated ([`ValidLb`]), with each
//! VIP's flows compiled and each stream's Maglev table built.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tapmesh_common::lb::{MAX_BYTE_MATCHES, MAX_FLOWS_PER_VIP, MAX_STREAMS, MAX_VIPS};

use super::maglev::{self, Maglev, MaglevError};
use super::port_nat::{self, PortNatError, PortNatSpec, ValidPortNat};
use crate::lb::flows::{compile, CompiledVip, FlowError, FlowSet, FlowSpec, VipSpec};
use crate::names::validate_name;

// The flow compiler enforces the per-VIP flow limit; it must be the kernel's.
const _: () = assert!(crate::lb::flows::MAX_FLOWS_PER_VIP == MAX_FLOWS_PER_VIP as usize);

/// A load-balancing configuration as written.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LbSpec {
    pub vips: Vec<VipSpec>,
    pub streams: Vec<StreamSpec>,
    pub flows: Vec<FlowSpec>,
    pub targets: Vec<TargetSpec>,
}

/// A stream: a Maglev table over `max_targets` target slots.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamSpec {
    pub name: String,
    pub max_targets: u32,
    /// A prime >= 100 * max_targets; default: the smallest such prime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table_size: Option<u32>,
    /// Destination ports its targets receive on another port (Meridio's conduit port NAT).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub port_nats: Vec<PortNatSpec>,
}

/// A target of a stream; `identifier` (1..=max_targets) picks its Maglev slot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetSpec {
    pub stream: String,
    pub identifier: u32,
    pub via: TargetVia,
}

/// How a target is reached: an interface on this node, or another node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum TargetVia {
    Local {
        interface: String,
        mac: String,
    },
    /// IPv4 address of the node.
    Remote {
        node: String,
    },
}

/// A validated configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidLb {
    pub flows: FlowSet,
    /// In `flows.vips` order.
    pub vips: Vec<CompiledVip>,
    /// In spec order.
    pub streams: Vec<ValidStream>,
    /// In spec order.
    pub targets: Vec<ValidTarget>,
    /// Port NATs by stream name (streams without any are absent).
    pub port_nats: BTreeMap<String, Vec<ValidPortNat>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidStream {
    pub name: String,
    pub max_targets: u32,
    /// Maglev table over the slots (identifier - 1) of the stream's targets;
    /// shared, not copied, on its way to the maps (1 000 003 entries at most).
    pub table: Arc<Vec<u32>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidTarget {
    pub stream: String,
    pub identifier: u32,
    pub via: ValidVia,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ValidVia {
    Local { interface: String, mac: [u8; 6] },
    Remote { node: Ipv4Addr },
}

impl From<crate::names::NameError> for LbError {
    fn from(e: crate::names::NameError) -> Self {
        LbError::Flow(e.into())
    }
}

/// Validation error; each message names the object and says what to fix.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum LbError {
    /// VIP and flow errors (they name the VIP or flow), and bad stream names.
    #[error(transparent)]
    Flow(#[from] FlowError),
    #[error(transparent)]
    PortNat(#[from] PortNatError),
    #[error("{count} VIPs are defined; at most {MAX_VIPS} are supported, remove some")]
    TooManyVips { count: usize },
    #[error("{count} streams are defined; at most {MAX_STREAMS} are supported, remove some")]
    TooManyStreams { count: usize },
    #[error("{count} targets are defined; dataplane.target_entries is {capacity}: raise it, or remove some")]
    TooManyTargets { count: usize, capacity: u32 },
    #[error(
        "{count} flows are defined; dataplane.flow_entries is {capacity}: raise it, or remove some"
    )]
    TooManyFlows { count: usize, capacity: u32 },
    #[error("flow {flow:?} has {count} byte_matches; at most {MAX_BYTE_MATCHES} are supported, remove some")]
    TooManyByteMatches { flow: String, count: usize },
    #[error("stream {stream:?} is defined twice; stream names must be unique")]
    DuplicateStream { stream: String },
    #[error("stream {stream:?}: {source}")]
    Maglev { stream: String, source: MaglevError },
    #[error("the streams' Maglev tables need {total} entries in all; dataplane.maglev_entries is {capacity}: raise it, or lower max_targets or table_size")]
    MaglevCapacity { total: u64, capacity: u32 },
    #[error(
        "flow {flow:?} stream: unknown stream {stream:?}; define it under streams or fix the name"
    )]
    UnknownFlowStream { flow: String, stream: String },
    #[error("target {identifier} of stream {stream:?}: unknown stream; define it under streams or fix the name")]
    UnknownTargetStream { stream: String, identifier: u32 },
    #[error("target {identifier} of stream {stream:?}: identifier out of range; use 1..={max_targets} (the stream's max_targets)")]
    IdentifierOutOfRange {
        stream: String,
        identifier: u32,
        max_targets: u32,
    },
    #[error("target {identifier} of stream {stream:?} is defined twice; identifiers must be unique within a stream")]
    DuplicateTarget { stream: String, identifier: u32 },
    #[error("target {identifier} of stream {stream:?} interface: bad name {value:?}: {reason}; use 1-15 characters without '/', ':' or spaces")]
    BadInterface {
        stream: String,
        identifier: u32,
        value: String,
        reason: &'static str,
    },
    #[error("target {identifier} of stream {stream:?} mac: bad MAC {value:?}: {reason}; use a unicast address such as \"02:00:00:00:00:01\"")]
    BadMac {
        stream: String,
        identifier: u32,
        value: String,
        reason: &'static str,
    },
    #[error("VIPs {first:?} and {second:?} both have the address {address}; a VIP address belongs to one VIP, remove one or give it another address")]
    DuplicateVipAddress {
        first: String,
        second: String,
        address: String,
    },
    #[error("VIP {vip:?} address {address}: {owner_source} already has it as VIP {owner:?}, so {claimant} cannot have it as VIP {vip:?}; each VIP address belongs to one source, remove it from one of them")]
    VipAddressTaken {
        address: String,
        vip: String,
        claimant: String,
        owner: String,
        owner_source: String,
    },
    #[error("{kind} {name:?}: {owner} already has a {kind} of that name, so {claimant} cannot have one; each name belongs to one source, rename it in one of them")]
    NameTaken {
        kind: &'static str,
        name: String,
        owner: String,
        claimant: String,
    },
    #[error("VIP {vip:?} address {value:?} takes every packet to this node, its own traffic included; use the prefix the VIPs are in, such as \"203.0.113.0/24\"")]
    VipTakesEverything { vip: String, value: String },
    #[error("VIP {vip:?} address {value:?} overlaps {range}: those packets are the network's own (neighbour discovery, broadcasts, groups), not a service's, and the VIP would take them; use a unicast address such as \"203.0.113.10\"")]
    VipNotUnicast {
        vip: String,
        value: String,
        range: &'static str,
    },
    #[error("VIP {vip:?} address {value:?} holds this node's own address {node}; the node would stop answering, use a prefix without it")]
    VipHoldsNode {
        vip: String,
        value: String,
        node: Ipv4Addr,
    },
    #[error("target {identifier} of stream {stream:?}: its node {node} is inside VIP {vip:?}; a node's address is no VIP (the tunnel would trust whoever sends from the VIP's address), name the node by its own address")]
    NodeIsVip {
        stream: String,
        identifier: u32,
        node: String,
        vip: String,
    },
    #[error("tunnel peer {peer} (lb.tunnel_peers) is inside VIP {vip:?}; a node's address is no VIP (the tunnel would trust whoever sends from the VIP's address)")]
    PeerIsVip { peer: Ipv4Addr, vip: String },
    #[error("flow {flow:?} can never match on VIP {vip:?}: the VIP is {vip_family} and every source subnet is {subnet_family}; add an {vip_family} source subnet or take the VIP out of the flow")]
    SubnetFamily {
        flow: String,
        vip: String,
        vip_family: &'static str,
        subnet_family: &'static str,
    },
    #[error("target {identifier} of stream {stream:?} node: {node} is this node's own tunnel address; a target on this node is local (its interface and MAC)")]
    TargetIsThisNode {
        stream: String,
        identifier: u32,
        node: Ipv4Addr,
    },
    #[error("target {identifier} of stream {stream:?} node: bad node address {value:?}: {reason}; use the node's IPv4 address such as \"192.0.2.10\" (IPv6 nodes are not supported yet)")]
    BadNode {
        stream: String,
        identifier: u32,
        value: String,
        reason: &'static str,
    },
}

/// The Maglev tables of the last validation, by stream, with their builder.
/// A stream whose `max_targets` and `table_size` are the same again reuses
/// the builder (its base table is a full Maglev fill, a few ms for 1000
/// targets); with the same active slots too, it gets its table back.
#[derive(Debug, Default)]
pub struct Tables {
    built: HashMap<String, Built>,
    capacity: Capacity,
}

pub use crate::config::LbCapacity as Capacity;

/// A stream's Maglev table (target slot per entry), shared, not copied.
type SharedTable = Arc<Vec<u32>>;

#[derive(Debug)]
struct Built {
    table_size: Option<u32>,
    maglev: Arc<Maglev>,
    /// Sorted.
    active: Vec<u32>,
    table: Arc<Vec<u32>>,
}

impl Tables {
    /// Validations from now on check the tables against `capacity`.
    pub fn set_capacity(&mut self, capacity: Capacity) {
        self.capacity = capacity;
    }

    /// The builder and, when `active` is the same, the table of stream `s`.
    fn get(&self, s: &StreamSpec, active: &[u32]) -> Option<(&Arc<Maglev>, Option<&SharedTable>)> {
        let b = self
            .built
            .get(&s.name)
            .filter(|b| b.maglev.max_targets() == s.max_targets && b.table_size == s.table_size)?;
        Some((&b.maglev, (b.active == active).then_some(&b.table)))
    }
}

/// Validates a whole configuration; the first error found is returned.
pub fn validate(spec: &LbSpec) -> Result<ValidLb, LbError> {
    validate_with(spec, &mut Tables::default())
}

/// [`validate`], reusing the tables of `tables` that still fit and keeping
/// this configuration's tables there.
pub fn validate_with(spec: &LbSpec, tables: &mut Tables) -> Result<ValidLb, LbError> {
    // Counts first: they bound the work below.
    let count = |n: usize, max: u32| (n > max as usize).then_some(n);
    if let Some(count) = count(spec.vips.len(), MAX_VIPS) {
        return Err(LbError::TooManyVips { count });
    }
    if let Some(count) = count(spec.streams.len(), MAX_STREAMS) {
        return Err(LbError::TooManyStreams { count });
    }
    let capacity = tables.capacity.target_entries;
    if let Some(count) = count(spec.targets.len(), capacity) {
        return Err(LbError::TooManyTargets { count, capacity });
    }

    let flows = FlowSet::parse(&spec.vips, &spec.flows)?;
    super::checks::check_flow_set(&flows)?;
    let capacity = tables.capacity.flow_entries;
    if let Some(count) = count(flows.flows.len(), capacity) {
        return Err(LbError::TooManyFlows { count, capacity });
    }
    for f in &flows.flows {
        if f.byte_matches.len() > MAX_BYTE_MATCHES {
            return Err(LbError::TooManyByteMatches {
                flow: f.name.clone(),
                count: f.byte_matches.len(),
            });
        }
    }

    // Streams: name -> index; table sizes checked (and bounded) before any is built.
    let mut stream_index = HashMap::new();
    let mut total = 0u64;
    for (i, s) in spec.streams.iter().enumerate() {
        validate_name("stream name", &s.name)?;
        if stream_index.insert(s.name.as_str(), i).is_some() {
            return Err(LbError::DuplicateStream {
                stream: s.name.clone(),
            });
        }
        let size = s
            .table_size
            .unwrap_or_else(|| maglev::default_table_size(s.max_targets));
        maglev::validate_table_size(s.max_targets, size).map_err(|source| LbError::Maglev {
            stream: s.name.clone(),
            source,
        })?;
        total += u64::from(size);
    }
    if total > u64::from(tables.capacity.maglev_entries) {
        return Err(LbError::MaglevCapacity {
            total,
            capacity: tables.capacity.maglev_entries,
        });
    }

    if let Some(f) = flows
        .flows
        .iter()
        .find(|f| !stream_index.contains_key(f.stream.as_str()))
    {
        return Err(LbError::UnknownFlowStream {
            flow: f.name.clone(),
            stream: f.stream.clone(),
        });
    }

    let mut slots: Vec<Vec<u32>> = vec![Vec::new(); spec.streams.len()];
    let mut targets = Vec::with_capacity(spec.targets.len());
    // A stream's targets usually come together: one lookup for each run.
    let mut last: Option<(&str, usize)> = None;
    for t in &spec.targets {
        let (stream, identifier) = (t.stream.clone(), t.identifier);
        let found = match last {
            Some((name, i)) if name == t.stream => Some(i),
            _ => stream_index.get(t.stream.as_str()).copied(),
        };
        let Some(i) = found else {
            return Err(LbError::UnknownTargetStream { stream, identifier });
        };
        last = Some((t.stream.as_str(), i));
        let max_targets = spec.streams[i].max_targets;
        if !(1..=max_targets).contains(&identifier) {
            return Err(LbError::IdentifierOutOfRange {
                stream,
                identifier,
                max_targets,
            });
        }
        let via = match &t.via {
            TargetVia::Local { interface, mac } => {
                if let Err(reason) = check_interface(interface) {
                    return Err(LbError::BadInterface {
                        stream,
                        identifier,
                        value: interface.clone(),
                        reason,
                    });
                }
                match parse_mac(mac) {
                    Ok(mac) => ValidVia::Local {
                        interface: interface.clone(),
                        mac,
                    },
                    Err(reason) => {
                        return Err(LbError::BadMac {
                            stream,
                            identifier,
                            value: mac.clone(),
                            reason,
                        })
                    }
                }
            }
            TargetVia::Remote { node } => match parse_node(node) {
                Ok(node) => ValidVia::Remote { node },
                Err(reason) => {
                    return Err(LbError::BadNode {
                        stream,
                        identifier,
                        value: node.clone(),
                        reason,
                    })
                }
            },
        };
        slots[i].push(identifier - 1);
        targets.push(ValidTarget {
            stream,
            identifier,
            via,
        });
    }

    for (s, active) in spec.streams.iter().zip(&mut slots) {
        active.sort_unstable();
        if let Some(pair) = active.windows(2).find(|pair| pair[0] == pair[1]) {
            return Err(LbError::DuplicateTarget {
                stream: s.name.clone(),
                identifier: pair[0] + 1,
            });
        }
    }

    let vips = compile(&flows)?;
    let vip_addresses: HashMap<&str, String> = spec
        .vips
        .iter()
        .map(|v| (v.name.as_str(), v.address.clone()))
        .collect();
    let nat_specs: Vec<(String, Vec<PortNatSpec>)> = spec
        .streams
        .iter()
        .map(|s| (s.name.clone(), s.port_nats.clone()))
        .collect();
    let port_nats = port_nat::validate(&nat_specs, &vip_addresses)?;
    port_nat::check_count(&port_nats, &vips)?;

    let mut streams = Vec::with_capacity(spec.streams.len());
    let mut built = HashMap::with_capacity(spec.streams.len());
    for (s, active) in spec.streams.iter().zip(slots) {
        let maglev_error = |source| LbError::Maglev {
            stream: s.name.clone(),
            source,
        };
        let (maglev, table) = match tables.get(s, &active) {
            Some((maglev, Some(table))) => (maglev.clone(), table.clone()),
            Some((maglev, None)) => (
                maglev.clone(),
                Arc::new(maglev.build(&active).map_err(maglev_error)?),
            ),
            None => {
                let maglev = Maglev::new(s.max_targets, s.table_size).map_err(maglev_error)?;
                let table = maglev.build(&active).map_err(maglev_error)?;
                (Arc::new(maglev), Arc::new(table))
            }
        };
        streams.push(ValidStream {
            name: s.name.clone(),
            max_targets: s.max_targets,
            table: table.clone(),
        });
        built.insert(
            s.name.clone(),
            Built {
                table_size: s.table_size,
                maglev,
                active,
                table,
            },
        );
    }
    tables.built = built;

    Ok(ValidLb {
        flows,
        vips,
        streams,
        targets,
        port_nats,
    })
}

/// Linux interface name rules (`dev_valid_name`).
fn check_interface(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        Err("empty")
    } else if name.len() > 15 {
        Err("longer than 15 bytes")
    } else if name == "." || name == ".." {
        Err("reserved name")
    } else if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        Err("invalid character")
    } else {
        Ok(())
    }
}

/// Parses "aa:bb:cc:dd:ee:ff" (either case); rejects zero and multicast.
pub(crate) fn parse_mac(s: &str) -> Result<[u8; 6], &'static str> {
    let mut mac = [0u8; 6];
    // The usual form, "aa:bb:cc:dd:ee:ff", without splitting (10 000 targets
    // are checked at every change); anything else takes the long way, which
    // names what is wrong.
    let hex = |c: u8| char::from(c).to_digit(16);
    let b = s.as_bytes();
    if b.len() == 17 && (2..17).step_by(3).all(|i| b[i] == b':') {
        let mut ok = true;
        for (i, byte) in mac.iter_mut().enumerate() {
            match (hex(b[3 * i]), hex(b[3 * i + 1])) {
                (Some(h), Some(l)) => *byte = (h * 16 + l) as u8,
                _ => ok = false,
            }
        }
        if ok {
            return check_mac(mac);
        }
        mac = [0; 6];
    }
    let mut parts = s.split(':');
    for b in &mut mac {
        let part = parts.next().ok_or("needs 6 bytes")?;
        if part.len() != 2 || !part.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err("each byte needs 2 hex digits");
        }
        *b = u8::from_str_radix(part, 16).map_err(|_| "each byte needs 2 hex digits")?;
    }
    if parts.next().is_some() {
        Err("needs 6 bytes")
    } else {
        check_mac(mac)
    }
}

fn check_mac(mac: [u8; 6]) -> Result<[u8; 6], &'static str> {
    if mac == [0; 6] {
        Err("all-zero address")
    } else if mac[0] & 1 != 0 {
        Err("multicast or broadcast address")
    } else {
        Ok(mac)
    }
}

/// Parses a node's IPv4 unicast address.
fn parse_node(s: &str) -> Result<Ipv4Addr, &'static str> {
    let ip: Ipv4Addr = match s.parse() {
        Ok(ip) => ip,
        Err(_) if s.parse::<Ipv6Addr>().is_ok() => {
            return Err("IPv6 node addresses are not supported yet")
        }
        Err(_) => return Err("not an IPv4 address"),
    };
    if ip.is_unspecified() {
        Err("unspecified address")
    } else if ip.is_loopback() {
        Err("loopback address")
    } else if ip.is_multicast() || ip.is_broadcast() {
        Err("multicast or broadcast address")
    } else {
        Ok(ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tapmesh_common::lb::{MAGLEV_CAPACITY, MAX_TARGETS};

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    fn vip(name: &str, address: &str) -> VipSpec {
        VipSpec {
            name: name.into(),
            address: address.into(),
        }
    }

    fn stream(name: &str, max_targets: u32) -> StreamSpec {
        StreamSpec {
            name: name.into(),
            max_targets,
            table_size: None,
            port_nats: Vec::new(),
        }
    }

    fn local(stream: &str, identifier: u32, interface: &str, mac: &str) -> TargetSpec {
        TargetSpec {
            stream: stream.into(),
            identifier,
            via: TargetVia::Local {
                interface: interface.into(),
                mac: mac.into(),
            },
        }
    }

    fn remote(stream: &str, identifier: u32, node: &str) -> TargetSpec {
        TargetSpec {
            stream: stream.into(),
            identifier,
            via: TargetVia::Remote { node: node.into() },
        }
    }

    fn flow(name: &str, vips: &[&str], stream: &str) -> FlowSpec {
        FlowSpec {
            name: name.into(),
            vips: s(vips),
            stream: stream.into(),
            ..Default::default()
        }
    }

    /// 2 VIPs (v4, v6), 2 streams, 4 flows (one with a byte match), 3 local + 2 remote targets.
    fn realistic() -> LbSpec {
        let http = FlowSpec {
            priority: 10,
            protocols: s(&["tcp"]),
            destination_port_ranges: s(&["80", "443"]),
            ..flow("http", &["vip4", "vip6"], "web")
        };
        let http_alt = FlowSpec {
            priority: 5,
            protocols: s(&["tcp"]),
            destination_port_ranges: s(&["8000-8080"]),
            source_subnets: s(&["10.0.0.0/8"]),
            ..flow("http-alt", &["vip4"], "web")
        };
        let dns = FlowSpec {
            priority: 10,
            protocols: s(&["udp"]),
            destination_port_ranges: s(&["53"]),
            // DNS queries only (QR bit clear).
            byte_matches: s(&["udp[10:1] & 0x80 = 0"]),
            ..flow("dns", &["vip4", "vip6"], "dns")
        };
        let rest = FlowSpec {
            source_subnets: s(&["2001:db8:1::/48"]),
            ..flow("rest", &["vip6"], "dns")
        };
        LbSpec {
            vips: vec![vip("vip4", "20.0.0.1"), vip("vip6", "2001:db8::/64")],
            streams: vec![stream("web", 4), stream("dns", 3)],
            flows: vec![http, http_alt, dns, rest],
            targets: vec![
                local("web", 1, "veth1", "02:00:00:00:00:01"),
                local("web", 2, "veth2", "02:00:00:00:00:02"),
                remote("web", 4, "192.0.2.4"),
                local("dns", 1, "veth3", "02:00:00:00:00:03"),
                remote("dns", 3, "192.0.2.3"),
            ],
        }
    }

    fn distinct(table: &[u32]) -> Vec<u32> {
        let mut v = table.to_vec();
        v.sort_unstable();
        v.dedup();
        v
    }

    #[test]
    fn reused_tables_equal_fresh_builds() {
        let mut tables = Tables::default();
        let mut spec = realistic();
        fn rename(s: &mut LbSpec, from: &str, to: &str) {
            let names = s.streams.iter_mut().map(|x| &mut x.name);
            let flows = s.flows.iter_mut().map(|f| &mut f.stream);
            let targets = s.targets.iter_mut().map(|t| &mut t.stream);
            for name in names.chain(flows).chain(targets) {
                if name == from {
                    *name = to.into();
                }
            }
        }
        let edits: [fn(&mut LbSpec); 8] = [
            |_| {},
            |s| {
                s.targets
                    .retain(|t| (t.stream.as_str(), t.identifier) != ("web", 2))
            },
            |s| {
                s.targets.reverse();
                s.targets
                    .push(local("web", 2, "veth2", "02:00:00:00:00:02"));
            },
            |s| s.streams[0].max_targets = 5,
            |s| s.streams[1].table_size = Some(311),
            // Each stream takes the other's name (and cached table's key).
            |s| {
                rename(s, "web", "tmp");
                rename(s, "dns", "web");
                rename(s, "tmp", "dns");
            },
            |s| s.targets.retain(|t| t.stream != "web"),
            |s| s.streams[0].max_targets = 0,
        ];
        for (step, edit) in edits.iter().enumerate() {
            edit(&mut spec);
            let reused = validate_with(&spec, &mut tables);
            // (assert!, not assert_eq!: the tables would fill the screen.)
            assert!(
                reused == validate(&spec),
                "step {step}: not what a fresh build gives"
            );
            if let Ok(lb) = reused {
                let mut names: Vec<_> = tables.built.keys().cloned().collect();
                names.sort();
                let mut want: Vec<_> = lb.streams.iter().map(|s| s.name.clone()).collect();
                want.sort();
                assert_eq!(names, want, "step {step}: only this configuration's tables");
            }
        }
        // The last edit was refused; the tables kept are still the good ones.
        assert_eq!(tables.built.len(), 2);
        spec.streams[0].max_targets = 4;
        assert!(validate_with(&spec, &mut tables) == validate(&spec));
    }

    #[test]
    fn realistic_spec_validates() {
        let lb = validate(&realistic()).unwrap();
        let names: Vec<_> = lb.vips.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["vip4", "vip6"]);
        assert_eq!(lb.vips[0].flows.len(), 3);
        assert_eq!(lb.vips[1].flows.len(), 3);
        let web = &lb.streams[0];
        let dns = &lb.streams[1];
        assert_eq!((web.name.as_str(), web.max_targets), ("web", 4));
        // Smallest primes >= 400 and >= 300.
        assert_eq!((web.table.len(), dns.table.len()), (401, 307));
        assert_eq!(distinct(&web.table), [0, 1, 3], "only active slots");
        assert_eq!(distinct(&dns.table), [0, 2], "only active slots");
        assert_eq!(lb.targets.len(), 5);
        assert_eq!(
            lb.targets[0].via,
            ValidVia::Local {
                interface: "veth1".into(),
                mac: [2, 0, 0, 0, 0, 1]
            }
        );
        assert_eq!(
            lb.targets[4],
            ValidTarget {
                stream: "dns".into(),
                identifier: 3,
                via: ValidVia::Remote {
                    node: Ipv4Addr::new(192, 0, 2, 3)
                }
            }
        );
    }

    #[test]
    fn stream_without_targets_has_empty_table() {
        let mut spec = realistic();
        spec.targets.retain(|t| t.stream != "dns");
        spec.streams[1].table_size = Some(311);
        let lb = validate(&spec).unwrap();
        assert_eq!(*lb.streams[1].table, vec![maglev::NO_TARGET; 311]);
    }

    fn err(spec: &LbSpec) -> LbError {
        validate(spec).unwrap_err()
    }

    #[test]
    fn limits() {
        let mut spec = LbSpec {
            vips: (0..=MAX_VIPS)
                .map(|i| vip(&format!("v{i}"), "20.0.0.1"))
                .collect(),
            ..Default::default()
        };
        assert_eq!(err(&spec), LbError::TooManyVips { count: 257 });
        spec.vips.pop();
        assert!(validate(&spec).is_ok(), "256 VIPs are fine");

        let spec = LbSpec {
            streams: (0..=MAX_STREAMS)
                .map(|i| stream(&format!("s{i}"), 1))
                .collect(),
            ..Default::default()
        };
        assert_eq!(err(&spec), LbError::TooManyStreams { count: 1025 });

        let spec = LbSpec {
            targets: vec![remote("s", 1, "192.0.2.1"); MAX_TARGETS as usize + 1],
            ..Default::default()
        };
        assert_eq!(
            err(&spec),
            LbError::TooManyTargets {
                count: 16_385,
                capacity: 16_384
            }
        );

        // 5 streams of 1_000_003 entries each > 2^22.
        let spec = LbSpec {
            streams: (0..5).map(|i| stream(&format!("s{i}"), 10_000)).collect(),
            ..Default::default()
        };
        assert_eq!(
            err(&spec),
            LbError::MaglevCapacity {
                total: 5 * 1_000_003,
                capacity: MAGLEV_CAPACITY
            }
        );
    }

    #[test]
    fn flow_limits() {
        let mut spec = realistic();
        spec.flows[2].byte_matches = s(&["udp[0:1] = 1"; 5]);
        assert_eq!(
            err(&spec),
            LbError::TooManyByteMatches {
                flow: "dns".into(),
                count: 5
            }
        );
        spec.flows[2].byte_matches.pop();
        assert!(validate(&spec).is_ok(), "4 byte matches are fine");

        let mut spec = realistic();
        spec.flows = (0..=MAX_FLOWS_PER_VIP)
            .map(|i| flow(&format!("f{i}"), &["vip4"], "web"))
            .collect();
        let e = err(&spec);
        assert_eq!(
            e,
            LbError::Flow(FlowError::TooManyFlows {
                vip: "vip4".into(),
                count: 65
            })
        );
        assert!(e.to_string().contains("VIP \"vip4\" has 65 flows"), "{e}");
    }

    #[test]
    fn flow_errors_pass_through() {
        let mut spec = realistic();
        spec.flows[1].protocols = s(&["gre"]);
        assert_eq!(
            err(&spec),
            LbError::Flow(FlowError::UnknownProtocol {
                flow: "http-alt".into(),
                value: "gre".into()
            })
        );
        let mut spec = realistic();
        spec.flows[0].vips.push("nope".into());
        assert!(matches!(
            err(&spec),
            LbError::Flow(FlowError::UnknownVip { .. })
        ));
    }

    #[test]
    fn stream_errors() {
        let mut spec = realistic();
        spec.streams[1].name = "bad name".into();
        let e = err(&spec);
        assert_eq!(
            e,
            LbError::Flow(FlowError::BadName {
                field: "stream name".into(),
                value: "bad name".into(),
                reason: "invalid character"
            })
        );
        assert!(e.to_string().starts_with("stream name: bad name"), "{e}");

        let mut spec = realistic();
        spec.streams[1].name = "web".into();
        assert_eq!(
            err(&spec),
            LbError::DuplicateStream {
                stream: "web".into()
            }
        );

        for (max_targets, table_size, source) in [
            (0, None, MaglevError::MaxTargets(0)),
            (10_001, None, MaglevError::MaxTargets(10_001)),
            (
                3,
                Some(200),
                MaglevError::SizeTooSmall {
                    size: 200,
                    max_targets: 3,
                    min: 300,
                },
            ),
            (
                3,
                Some(300),
                MaglevError::SizeNotPrime {
                    size: 300,
                    suggestion: 307,
                },
            ),
        ] {
            let mut spec = realistic();
            spec.streams[1].max_targets = max_targets;
            spec.streams[1].table_size = table_size;
            let e = err(&spec);
            assert_eq!(
                e,
                LbError::Maglev {
                    stream: "dns".into(),
                    source
                }
            );
            assert!(e.to_string().starts_with("stream \"dns\": "), "{e}");
        }

        let mut spec = realistic();
        spec.flows[3].stream = "nope".into();
        let e = err(&spec);
        assert_eq!(
            e,
            LbError::UnknownFlowStream {
                flow: "rest".into(),
                stream: "nope".into()
            }
        );
        assert_eq!(
            e.to_string(),
            "flow \"rest\" stream: unknown stream \"nope\"; define it under streams or fix the name"
        );
    }

    #[test]
    fn target_errors() {
        let mut spec = realistic();
        spec.targets.push(remote("nope", 1, "192.0.2.9"));
        assert_eq!(
            err(&spec),
            LbError::UnknownTargetStream {
                stream: "nope".into(),
                identifier: 1
            }
        );

        for id in [0, 5] {
            let mut spec = realistic();
            spec.targets.push(remote("web", id, "192.0.2.9"));
            let e = err(&spec);
            assert_eq!(
                e,
                LbError::IdentifierOutOfRange {
                    stream: "web".into(),
                    identifier: id,
                    max_targets: 4
                }
            );
            assert!(e.to_string().contains("use 1..=4"), "{e}");
        }

        let mut spec = realistic();
        spec.targets
            .push(local("web", 2, "veth9", "02:00:00:00:00:09"));
        assert_eq!(
            err(&spec),
            LbError::DuplicateTarget {
                stream: "web".into(),
                identifier: 2
            }
        );
        // The same identifier in another stream is fine.
        let mut spec = realistic();
        spec.targets
            .push(local("dns", 2, "veth9", "02:00:00:00:00:09"));
        assert!(validate(&spec).is_ok());
    }

    fn target_err(via: TargetVia) -> LbError {
        let mut spec = realistic();
        spec.targets.push(TargetSpec {
            stream: "dns".into(),
            identifier: 2,
            via,
        });
        err(&spec)
    }

    #[test]
    fn bad_macs_and_interfaces() {
        for (mac, reason) in [
            ("02:00:00:00:00", "needs 6 bytes"),
            ("02:00:00:00:00:01:02", "needs 6 bytes"),
            ("02-00-00-00-00-01", "each byte needs 2 hex digits"),
            ("2:00:00:00:00:01", "each byte needs 2 hex digits"),
            ("02:00:00:00:00:0g", "each byte needs 2 hex digits"),
            ("+2:00:00:00:00:01", "each byte needs 2 hex digits"),
            ("", "each byte needs 2 hex digits"),
            ("00:00:00:00:00:00", "all-zero address"),
            ("01:00:5e:00:00:01", "multicast or broadcast address"),
            ("ff:ff:ff:ff:ff:ff", "multicast or broadcast address"),
        ] {
            let e = target_err(TargetVia::Local {
                interface: "veth9".into(),
                mac: mac.into(),
            });
            assert_eq!(
                e,
                LbError::BadMac {
                    stream: "dns".into(),
                    identifier: 2,
                    value: mac.into(),
                    reason
                },
                "{mac:?}"
            );
        }
        assert_eq!(parse_mac("0A:bC:00:00:00:01"), Ok([10, 0xbc, 0, 0, 0, 1]));

        for (name, reason) in [
            ("", "empty"),
            ("a234567890123456", "longer than 15 bytes"),
            ("..", "reserved name"),
            ("eth0:1", "invalid character"),
            ("a b", "invalid character"),
            ("a/b", "invalid character"),
        ] {
            let e = target_err(TargetVia::Local {
                interface: name.into(),
                mac: "02:00:00:00:00:09".into(),
            });
            assert_eq!(
                e,
                LbError::BadInterface {
                    stream: "dns".into(),
                    identifier: 2,
                    value: name.into(),
                    reason
                },
                "{name:?}"
            );
        }
        assert_eq!(check_interface("a23456789012345"), Ok(()));
    }

    #[test]
    fn bad_nodes() {
        for (node, reason) in [
            ("2001:db8::1", "IPv6 node addresses are not supported yet"),
            ("192.0.2", "not an IPv4 address"),
            ("node-a", "not an IPv4 address"),
            ("0.0.0.0", "unspecified address"),
            ("127.0.0.1", "loopback address"),
            ("224.0.0.1", "multicast or broadcast address"),
            ("255.255.255.255", "multicast or broadcast address"),
        ] {
            let e = target_err(TargetVia::Remote { node: node.into() });
            assert_eq!(
                e,
                LbError::BadNode {
                    stream: "dns".into(),
                    identifier: 2,
                    value: node.into(),
                    reason
                },
                "{node:?}"
            );
        }
        let e = target_err(TargetVia::Remote {
            node: "2001:db8::1".into(),
        });
        assert!(
            e.to_string().contains("IPv6 nodes are not supported yet"),
            "{e}"
        );
    }

    const TOML: &str = r#"
[[vips]]
name = "vip1"
address = "20.0.0.1"

[[streams]]
name = "s1"
max_targets = 10

[[flows]]
name = "f1"
vips = ["vip1"]
stream = "s1"
protocols = ["tcp"]
destination_port_ranges = ["80"]

[[targets]]
stream = "s1"
identifier = 1
via = { local = { interface = "veth1", mac = "02:00:00:00:00:01" } }

[[targets]]
stream = "s1"
identifier = 2
via = { remote = { node = "192.0.2.2" } }
"#;

    #[test]
    fn toml_round_trip() {
        let spec: LbSpec = toml::from_str(TOML).unwrap();
        assert_eq!(spec.vips, [vip("vip1", "20.0.0.1")]);
        assert_eq!(spec.streams, [stream("s1", 10)]);
        assert_eq!(
            spec.flows,
            [FlowSpec {
                protocols: s(&["tcp"]),
                destination_port_ranges: s(&["80"]),
                ..flow("f1", &["vip1"], "s1")
            }]
        );
        assert_eq!(
            spec.targets,
            [
                local("s1", 1, "veth1", "02:00:00:00:00:01"),
                remote("s1", 2, "192.0.2.2")
            ]
        );
        let text = toml::to_string(&spec).unwrap();
        assert_eq!(toml::from_str::<LbSpec>(&text).unwrap(), spec, "{text}");
        let lb = validate(&spec).unwrap();
        assert_eq!(lb.streams[0].table.len(), 1009);
        assert_eq!(distinct(&lb.streams[0].table), [0, 1]);

        // The realistic spec survives a round trip too (table_size included).
        let mut spec = realistic();
        spec.streams[0].table_size = Some(401);
        let text = toml::to_string(&spec).unwrap();
        assert_eq!(toml::from_str::<LbSpec>(&text).unwrap(), spec, "{text}");
        assert_eq!(toml::from_str::<LbSpec>("").unwrap(), LbSpec::default());
    }

    #[test]
    fn toml_rejects_unknown_fields() {
        for bad in [
            "[[streamz]]\nname = \"s\"",
            "[[streams]]\nname = \"s\"\nmax_targets = 1\nsize = 101",
            "[[targets]]\nstream = \"s\"\nidentifier = 1\nvia = { remote = { node = \"1.2.3.4\", port = 1 } }",
            "[[targets]]\nstream = \"s\"\nidentifier = 1\nvia = { tunnel = { node = \"1.2.3.4\" } }",
        ] {
            assert!(toml::from_str::<LbSpec>(bad).is_err(), "{bad}");
        }
        assert!(
            toml::from_str::<LbSpec>("[[streams]]\nname = \"s\"").is_err(),
            "max_targets is required"
        );
    }
}
