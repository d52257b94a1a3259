//! `tapmesh bpf … list`: the pinned maps read back and decoded for people,
//! with no daemon needed (the pins are the truth the programs see). Numbers
//! are the maps' ids and indices; names live only in the daemon.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use aya::maps::{
    lpm_trie::Key, Array, HashMap as BpfHashMap, LpmTrie, Map, MapData, MapError, PerCpuArray,
};
use serde::Serialize;
use tapmesh_common::{
    lb::{
        FlowEntry, FlowMask, PortData, PortIntervals, SourceData, StreamValue, Target, VipAddr,
        VipConfig, VipValue, LOOKUP_DST_PORTS, LOOKUP_SOURCES, LOOKUP_SRC_PORTS, MAX_FLOWS_PER_VIP,
        MAX_STREAMS, NO_TARGET, PORT_INTERVALS, TARGET_LOCAL, TARGET_REMOTE,
    },
    map_names as n,
    mirror::{MirrorCounter, MirrorPort, VlanSet, DIRECTION_IN, DIRECTION_OUT},
    overlay as ov, PacketCounter, SCHEMA_VERSION,
};

/// Why the pins could not be read; each says what to check.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("no tapmesh pins in {0} (is a daemon running, or was it stopped with keep_dataplane? else check --bpffs-root)")]
    NoPins(PathBuf),
    #[error("reading pinned map {name}: {message}")]
    Map { name: &'static str, message: String },
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> InspectError {
    move |e| InspectError::Map {
        name,
        message: e.to_string(),
    }
}

/// The pin directory of this schema under `root`, if a dataplane pinned there.
pub fn pin_dir(root: &Path) -> Result<PathBuf, InspectError> {
    let dir = root.join(format!("v{SCHEMA_VERSION}"));
    if dir.join(n::STATS).exists() {
        Ok(dir)
    } else {
        Err(InspectError::NoPins(dir))
    }
}

fn open(dir: &Path, name: &'static str) -> Result<Map, InspectError> {
    let data = MapData::from_pin(dir.join(name)).map_err(map_err(name))?;
    Map::from_map_data(data).map_err(map_err(name))
}

fn array<V: aya::Pod>(dir: &Path, name: &'static str) -> Result<Array<MapData, V>, InspectError> {
    Array::try_from(open(dir, name)?).map_err(map_err(name))
}

fn hash<K: aya::Pod, V: aya::Pod>(
    dir: &Path,
    name: &'static str,
) -> Result<BpfHashMap<MapData, K, V>, InspectError> {
    BpfHashMap::try_from(open(dir, name)?).map_err(map_err(name))
}

fn trie<K: aya::Pod, V: aya::Pod>(
    dir: &Path,
    name: &'static str,
) -> Result<LpmTrie<MapData, K, V>, InspectError> {
    LpmTrie::try_from(open(dir, name)?).map_err(map_err(name))
}

/// A per-CPU packet counter map, summed over CPUs on read.
struct Counters(PerCpuArray<MapData, PacketCounter>, &'static str);

impl Counters {
    fn open(dir: &Path, name: &'static str) -> Result<Self, InspectError> {
        Ok(Self(
            PerCpuArray::try_from(open(dir, name)?).map_err(map_err(name))?,
            name,
        ))
    }

    /// An index past the map (an entry kept from maps resized smaller)
    /// reads as zero rather than failing the whole listing.
    fn get(&self, index: u32) -> Result<(u64, u64), InspectError> {
        if index >= self.0.len() {
            return Ok((0, 0));
        }
        let values = self.0.get(&index, 0).map_err(map_err(self.1))?;
        Ok(values
            .iter()
            .fold((0, 0), |(p, b), c| (p + c.packets, b + c.bytes)))
    }
}

/// Address of a 16-byte map field: IPv4-mapped ones as IPv4.
fn addr(bytes: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(bytes);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// `addr/len` from a 16-byte address and its 128-bit prefix length.
fn prefix(bytes: [u8; 16], len: u32) -> String {
    match addr(bytes) {
        IpAddr::V4(a) if len >= 96 => format!("{a}/{}", len - 96),
        _ => format!("{}/{len}", Ipv6Addr::from(bytes)),
    }
}

fn mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn interface(ifindex: u32) -> Option<String> {
    (ifindex != 0)
        .then(|| crate::net::link::name(ifindex))
        .flatten()
}

#[derive(Debug, Serialize)]
pub struct LbMaps {
    pub vips: Vec<Vip>,
    pub streams: Vec<Stream>,
    pub targets: Vec<TargetRow>,
}

#[derive(Debug, Serialize)]
pub struct Vip {
    pub address: String,
    pub index: u32,
    pub config: u32,
    pub packets: u64,
    pub bytes: u64,
    /// In priority order (the kernel takes the lowest matching bit).
    pub flows: Vec<Flow>,
}

#[derive(Debug, Serialize)]
pub struct Flow {
    pub bit: u32,
    pub stream: u32,
    pub protocols: Vec<&'static str>,
    pub dst_ports: Vec<String>,
    pub src_ports: Vec<String>,
    pub sources: Vec<String>,
    pub byte_matches: u32,
    pub counter: u32,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct Stream {
    pub id: u32,
    pub table_base: u32,
    pub table_size: u32,
    /// Maglev entries per target index, by target index.
    pub shares: Vec<Share>,
    /// Entries with no target (`u32::MAX`).
    pub unassigned: u32,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Share {
    pub target: u32,
    pub entries: u32,
}

#[derive(Debug, Serialize)]
pub struct TargetRow {
    pub index: u32,
    pub kind: &'static str,
    pub ifindex: u32,
    pub interface: Option<String>,
    pub dst_mac: String,
    pub src_mac: String,
    pub node: Option<String>,
    pub packets: u64,
    pub bytes: u64,
}

const PROTOCOLS: [&str; 5] = ["tcp", "udp", "sctp", "icmp", "other"];

/// Every port's flow mask, from a config's intervals or its LPM trie entries.
fn port_masks(
    dir: &Path,
    config_id: u32,
    inline: &PortIntervals,
    lookup: bool,
    name: &'static str,
) -> Result<Vec<u64>, InspectError> {
    let mut masks = vec![0u64; 65536];
    if lookup {
        // Paint shorter prefixes first so a longer match wins, as in the trie.
        let mut entries: Vec<(u32, u16, u64)> = Vec::new();
        for item in trie::<PortData, FlowMask>(dir, name)?.iter() {
            let (key, mask): (Key<PortData>, FlowMask) = item.map_err(map_err(name))?;
            let data = key.data();
            if u32::from_be_bytes(data.config_id) == config_id {
                let len = key.prefix_len().saturating_sub(32).min(16);
                entries.push((len, u16::from_be_bytes(data.port), mask.mask));
            }
        }
        entries.sort();
        for (len, port, mask) in entries {
            let span = 1usize << (16 - len);
            let start = usize::from(port) & !(span - 1);
            masks[start..start + span].fill(mask);
        }
    } else {
        let count = (inline.count as usize).min(PORT_INTERVALS);
        for i in 0..count {
            let start = usize::from(inline.starts[i]);
            let end = if i + 1 < count {
                usize::from(inline.starts[i + 1])
            } else {
                65536
            };
            if start < end {
                masks[start..end].fill(inline.masks[i]);
            }
        }
    }
    Ok(masks)
}

/// The ranges of indices (ports, VLANs) whose mask has `bit`: "any" when all of them.
fn ranges(masks: &[u64], bit: u32) -> Vec<String> {
    let mut out = Vec::new();
    let mut start = None;
    for (port, m) in masks.iter().enumerate() {
        let on = m & (1 << bit) != 0;
        match (on, start) {
            (true, None) => start = Some(port),
            (false, Some(s)) => {
                out.push((s, port - 1));
                start = None;
            }
            _ => {}
        }
    }
    let last = masks.len().saturating_sub(1);
    if let Some(s) = start {
        out.push((s, last));
    }
    if out == [(0, last)] {
        return vec!["any".into()];
    }
    out.into_iter()
        .map(|(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            }
        })
        .collect()
}

/// The source prefixes of `bit`, without those inside another of them.
fn sources(entries: &[(u32, [u8; 16], u64)], bit: u32) -> Vec<String> {
    let mine: Vec<(u32, u128)> = entries
        .iter()
        .filter(|(_, _, m)| m & (1 << bit) != 0)
        .map(|(len, a, _)| (*len, u128::from_be_bytes(*a)))
        .collect();
    let covers = |outer: (u32, u128), inner: (u32, u128)| {
        outer.0 <= inner.0 && (outer.0 == 0 || (outer.1 ^ inner.1) >> (128 - outer.0) == 0)
    };
    let mut out: Vec<(u32, u128)> = mine
        .iter()
        .copied()
        .filter(|&p| !mine.iter().any(|&o| o != p && covers(o, p)))
        .collect();
    out.sort();
    out.dedup();
    if out.iter().any(|&(len, _)| len == 0) {
        return vec!["any".into()];
    }
    out.into_iter()
        .map(|(len, a)| prefix(a.to_be_bytes(), len))
        .collect()
}

/// The VIPs with their flows, the streams with their Maglev shares, the targets.
pub fn lb(dir: &Path) -> Result<LbMaps, InspectError> {
    let mut vip_keys: Vec<([u8; 16], u32, VipValue)> = Vec::new();
    for item in hash::<VipAddr, VipValue>(dir, n::VIP_HOSTS)?.iter() {
        let (k, v) = item.map_err(map_err(n::VIP_HOSTS))?;
        vip_keys.push((k.addr, 128, v));
    }
    for item in trie::<VipAddr, VipValue>(dir, n::VIPS)?.iter() {
        let (k, v) = item.map_err(map_err(n::VIPS))?;
        vip_keys.push((k.data().addr, k.prefix_len(), v));
    }
    vip_keys.sort_by_key(|(_, _, v)| v.vip_index);

    let configs = array::<VipConfig>(dir, n::VIP_CONFIGS)?;
    let flows = array::<FlowEntry>(dir, n::FLOWS)?;
    let vip_stats = Counters::open(dir, n::VIP_STATS)?;
    let flow_stats = Counters::open(dir, n::FLOW_STATS)?;
    let mut source_entries: BTreeMap<u32, Vec<(u32, [u8; 16], u64)>> = BTreeMap::new();
    for item in trie::<SourceData, FlowMask>(dir, n::SOURCES)?.iter() {
        let (k, m) = item.map_err(map_err(n::SOURCES))?;
        let data = k.data();
        source_entries
            .entry(u32::from_be_bytes(data.config_id))
            .or_default()
            .push((k.prefix_len().saturating_sub(32), data.addr, m.mask));
    }

    let mut vips = Vec::new();
    for (address, len, value) in vip_keys {
        let config = configs
            .get(&value.config_id, 0)
            .map_err(map_err(n::VIP_CONFIGS))?;
        let dst = port_masks(
            dir,
            value.config_id,
            &config.dst_ports,
            config.lookups & LOOKUP_DST_PORTS != 0,
            n::DST_PORTS,
        )?;
        let src = port_masks(
            dir,
            value.config_id,
            &config.src_ports,
            config.lookups & LOOKUP_SRC_PORTS != 0,
            n::SRC_PORTS,
        )?;
        let no_sources = Vec::new();
        let config_sources = source_entries.get(&value.config_id).unwrap_or(&no_sources);
        let mut rows = Vec::new();
        for bit in 0..config.flow_count.min(MAX_FLOWS_PER_VIP) {
            let entry = flows
                .get(&(value.config_id * MAX_FLOWS_PER_VIP + bit), 0)
                .map_err(map_err(n::FLOWS))?;
            let protocols = PROTOCOLS
                .iter()
                .zip(config.protocol_masks)
                .filter(|(_, m)| m & (1 << bit) != 0)
                .map(|(p, _)| *p)
                .collect();
            let sources = if config.lookups & LOOKUP_SOURCES != 0 {
                sources(config_sources, bit)
            } else if config.sources_all & (1 << bit) != 0 {
                vec!["any".into()]
            } else {
                Vec::new()
            };
            let (packets, bytes) = flow_stats.get(entry.stats_index)?;
            rows.push(Flow {
                bit,
                stream: entry.stream_id,
                protocols,
                dst_ports: ranges(&dst, bit),
                src_ports: ranges(&src, bit),
                sources,
                byte_matches: entry.byte_match_count,
                counter: entry.stats_index,
                packets,
                bytes,
            });
        }
        let (packets, bytes) = vip_stats.get(value.vip_index)?;
        vips.push(Vip {
            address: prefix(address, len),
            index: value.vip_index,
            config: value.config_id,
            packets,
            bytes,
            flows: rows,
        });
    }

    let maglev = array::<u32>(dir, n::MAGLEV)?;
    let mut streams = Vec::new();
    for (id, value) in array::<StreamValue>(dir, n::STREAMS)?.iter().enumerate() {
        let value = value.map_err(map_err(n::STREAMS))?;
        if value.table_size == 0 {
            continue;
        }
        let mut counts: BTreeMap<u32, u32> = BTreeMap::new();
        let mut unassigned = 0;
        for i in value.table_base..value.table_base.saturating_add(value.table_size) {
            match maglev.get(&i, 0).map_err(map_err(n::MAGLEV))? {
                NO_TARGET => unassigned += 1,
                t => *counts.entry(t).or_default() += 1,
            }
        }
        streams.push(Stream {
            id: id as u32,
            table_base: value.table_base,
            table_size: value.table_size,
            shares: counts
                .into_iter()
                .map(|(target, entries)| Share { target, entries })
                .collect(),
            unassigned,
        });
    }
    debug_assert!(streams.len() <= MAX_STREAMS as usize);

    let target_stats = Counters::open(dir, n::TARGET_STATS)?;
    let mut targets = Vec::new();
    for (index, t) in array::<Target>(dir, n::TARGETS)?.iter().enumerate() {
        let t = t.map_err(map_err(n::TARGETS))?;
        let kind = match t.kind {
            TARGET_LOCAL => "local",
            TARGET_REMOTE => "remote",
            _ => continue,
        };
        let (packets, bytes) = target_stats.get(t.stats_index)?;
        targets.push(TargetRow {
            index: index as u32,
            kind,
            ifindex: t.ifindex,
            interface: interface(t.ifindex),
            dst_mac: mac(t.dst_mac),
            src_mac: mac(t.src_mac),
            node: (t.kind == TARGET_REMOTE).then(|| addr(t.node_addr).to_string()),
            packets,
            bytes,
        });
    }
    Ok(LbMaps {
        vips,
        streams,
        targets,
    })
}

#[derive(Debug, Serialize)]
pub struct OverlayMaps {
    pub services: Vec<OvService>,
    pub instances: Vec<OvInstance>,
}

#[derive(Debug, Serialize)]
pub struct OvService {
    pub address: String,
    pub id: u32,
    pub policy: &'static str,
    /// Instance ids in slot order.
    pub instances: Vec<u32>,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct OvInstance {
    pub id: u32,
    pub kind: &'static str,
    pub ns_address: String,
    pub ns_address6: Option<String>,
    pub instance_address: String,
    pub node: Option<String>,
    pub ifindex: u32,
    pub interface: Option<String>,
    pub generation: u32,
    pub packets: u64,
    pub bytes: u64,
}

fn policy(p: u8) -> &'static str {
    match p {
        ov::POLICY_ROUND_ROBIN => "round-robin",
        ov::POLICY_CLOSEST => "closest",
        ov::POLICY_INSTANCE => "instance",
        _ => "?",
    }
}

/// The service IPs (IPv4 and IPv6) with their instances, and every instance.
pub fn overlay(dir: &Path) -> Result<OverlayMaps, InspectError> {
    let slots = array::<u32>(dir, n::OV_SLOTS)?;
    let service_stats = Counters::open(dir, n::OV_SERVICE_STATS)?;
    let mut found: Vec<(IpAddr, ov::Service)> = Vec::new();
    for item in hash::<[u8; 4], ov::Service>(dir, n::OV_SERVICES)?.iter() {
        let (k, s) = item.map_err(map_err(n::OV_SERVICES))?;
        found.push((IpAddr::V4(Ipv4Addr::from(k)), s));
    }
    for item in hash::<[u8; 16], ov::Service>(dir, n::OV_SERVICES6)?.iter() {
        let (k, s) = item.map_err(map_err(n::OV_SERVICES6))?;
        found.push((IpAddr::V6(Ipv6Addr::from(k)), s));
    }
    found.sort_by_key(|(a, _)| *a);
    let mut services = Vec::new();
    for (address, s) in found {
        let instances = (0..u32::from(s.slots).min(ov::SERVICE_SLOTS))
            .map(|i| {
                slots
                    .get(&(s.id * ov::SERVICE_SLOTS + i), 0)
                    .map_err(map_err(n::OV_SLOTS))
            })
            .collect::<Result<_, _>>()?;
        let (packets, bytes) = service_stats.get(s.id)?;
        services.push(OvService {
            address: address.to_string(),
            id: s.id,
            policy: policy(s.policy),
            instances,
            packets,
            bytes,
        });
    }
    let instance_stats = Counters::open(dir, n::OV_INSTANCE_STATS)?;
    let v6 = array::<ov::Instance6>(dir, n::OV_INSTANCES6)?;
    let mut instances = Vec::new();
    for (id, i) in array::<ov::Instance>(dir, n::OV_INSTANCES)?
        .iter()
        .enumerate()
    {
        let i = i.map_err(map_err(n::OV_INSTANCES))?;
        let kind = match i.kind {
            ov::INSTANCE_LOCAL => "local",
            ov::INSTANCE_REMOTE => "remote",
            _ => continue,
        };
        let id = id as u32;
        let i6 = v6.get(&id, 0).map_err(map_err(n::OV_INSTANCES6))?;
        let (packets, bytes) = instance_stats.get(id)?;
        instances.push(OvInstance {
            id,
            kind,
            ns_address: Ipv4Addr::from(i.ns_addr).to_string(),
            ns_address6: (i6.ns_addr != [0; 16]).then(|| Ipv6Addr::from(i6.ns_addr).to_string()),
            instance_address: Ipv4Addr::from(i.reply_addr).to_string(),
            node: (i.kind == ov::INSTANCE_REMOTE)
                .then(|| format!("{}:{}", Ipv4Addr::from(i.node_addr), i.node_port)),
            ifindex: i.ifindex,
            interface: interface(i.ifindex),
            generation: i.generation,
            packets,
            bytes,
        });
    }
    Ok(OverlayMaps {
        services,
        instances,
    })
}

#[derive(Debug, Serialize)]
pub struct MirrorMaps {
    pub rules: Vec<MirrorRuleRow>,
    pub rings: Vec<RingRow>,
}

#[derive(Debug, Serialize)]
pub struct MirrorRuleRow {
    pub source_ifindex: u32,
    pub source: Option<String>,
    pub flow: u32,
    pub dest_ifindex: u32,
    pub dest: Option<String>,
    /// The mirror ring slot its copies go to through the ring buffer (none:
    /// a clone to `dest`).
    pub ring: Option<u32>,
    pub direction: &'static str,
    /// VLAN ranges, or "all".
    pub vlans: Vec<String>,
    pub packets: u64,
    pub bytes: u64,
    pub failed: u64,
}

#[derive(Debug, Serialize)]
pub struct RingRow {
    pub ifindex: u32,
    pub interface: Option<String>,
    pub slot: u32,
}

fn vlan_ranges(set: &VlanSet) -> Vec<String> {
    let masks: Vec<u64> = (0..4096u16).map(|v| u64::from(set.contains(v))).collect();
    match ranges(&masks, 0) {
        any if any == ["any"] => vec!["all".into()],
        some => some,
    }
}

/// Every tap rule per source interface with its counters, and the rings.
pub fn mirror(dir: &Path) -> Result<MirrorMaps, InspectError> {
    let vlans = array::<VlanSet>(dir, n::MIRROR_VLANS)?;
    let stats: PerCpuArray<MapData, MirrorCounter> =
        PerCpuArray::try_from(open(dir, n::MIRROR_STATS)?).map_err(map_err(n::MIRROR_STATS))?;
    let mut rules = Vec::new();
    for item in hash::<u32, MirrorPort>(dir, n::MIRROR_PORTS)?.iter() {
        let (ifindex, port) = item.map_err(map_err(n::MIRROR_PORTS))?;
        for rule in port.rules.iter().take(port.count as usize) {
            let direction = match (
                rule.directions & DIRECTION_IN != 0,
                rule.directions & DIRECTION_OUT != 0,
            ) {
                (true, true) => "BOTH",
                (true, false) => "IN",
                (false, true) => "OUT",
                _ => "-",
            };
            let vlans = if rule.vlan_filtered != 0 {
                vlan_ranges(&vlans.get(&rule.flow, 0).map_err(map_err(n::MIRROR_VLANS))?)
            } else {
                vec!["all".into()]
            };
            let c = stats
                .get(&rule.flow, 0)
                .map_err(map_err(n::MIRROR_STATS))?
                .iter()
                .fold((0, 0, 0), |(p, b, f), c| {
                    (p + c.packets, b + c.bytes, f + c.failed)
                });
            rules.push(MirrorRuleRow {
                source_ifindex: ifindex,
                source: interface(ifindex),
                flow: rule.flow,
                dest_ifindex: rule.dest_ifindex,
                dest: interface(rule.dest_ifindex),
                ring: rule.ring.checked_sub(1).map(u32::from),
                direction,
                vlans,
                packets: c.0,
                bytes: c.1,
                failed: c.2,
            });
        }
    }
    rules.sort_by_key(|r| (r.source_ifindex, r.flow));
    let mut rings = Vec::new();
    for item in hash::<u32, u32>(dir, n::MIRROR_RINGS)?.iter() {
        let (ifindex, slot) = item.map_err(map_err(n::MIRROR_RINGS))?;
        rings.push(RingRow {
            ifindex,
            interface: interface(ifindex),
            slot,
        });
    }
    rings.sort_by_key(|r| r.ifindex);
    Ok(MirrorMaps { rules, rings })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_come_back_from_intervals() {
        let mut p = PortIntervals::default();
        // [0,80): none; [80,81): bit 0; [81,443): none; [443,444): bits 0,1; rest: bit 1.
        for (i, (start, mask)) in [(0, 0), (80, 1), (81, 0), (443, 3), (444, 2)]
            .into_iter()
            .enumerate()
        {
            p.starts[i] = start;
            p.masks[i] = mask;
        }
        p.count = 5;
        let masks = port_masks(Path::new("/nonexistent"), 0, &p, false, n::DST_PORTS).unwrap();
        assert_eq!(ranges(&masks, 0), ["80", "443"]);
        assert_eq!(ranges(&masks, 1), ["443-65535"]);
        assert!(ranges(&masks, 2).is_empty());
        let all = vec![1u64; 65536];
        assert_eq!(ranges(&all, 0), ["any"]);
    }

    #[test]
    fn sources_drop_prefixes_inside_others() {
        let v4 = |a: [u8; 4]| Ipv4Addr::from(a).to_ipv6_mapped().octets();
        let entries = [
            (104, v4([10, 0, 0, 0]), 1),
            (112, v4([10, 1, 0, 0]), 3),
            (120, v4([192, 0, 2, 0]), 2),
        ];
        assert_eq!(sources(&entries, 0), ["10.0.0.0/8"]);
        assert_eq!(sources(&entries, 1), ["10.1.0.0/16", "192.0.2.0/24"]);
    }
}
