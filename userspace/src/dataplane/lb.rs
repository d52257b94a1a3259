//! Writes a validated LB configuration into the maps, publishing each VIP's
//! flow tables and each stream's Maglev table with one update, and keeps the
//! ids (VIP, config, stream, counters) stable across changes.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use aya::{
    maps::{lpm_trie::Key, Array, HashMap as BpfHashMap, LpmTrie, MapData, PerCpuArray},
    Ebpf,
};
use tapmesh_common::{
    lb::{
        FlowEntry, FlowMask, NodeConfig, PortData, PortKey, SourceData, SourceKey, StreamValue,
        Target, VipAddr, VipConfig, VipKey, VipValue, MAGLEV_CAPACITY, MAX_FLOWS,
        MAX_FLOWS_PER_VIP, MAX_STREAMS, MAX_TARGETS, MAX_VIPS, NO_TARGET,
    },
    map_names as n, PacketCounter,
};

use super::{batch, map_err, map_mut, DataplaneError};
use crate::lb::{
    model::{ValidLb, ValidVia},
    tables::{target_value, vip_key, vip_tables, VipTables},
};

fn array<'a, V: aya::Pod>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<Array<&'a mut MapData, V>, DataplaneError> {
    Array::try_from(map_mut(ebpf, name)?).map_err(map_err(name))
}

fn trie<'a, K: aya::Pod, V: aya::Pod>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<LpmTrie<&'a mut MapData, K, V>, DataplaneError> {
    LpmTrie::try_from(map_mut(ebpf, name)?).map_err(map_err(name))
}

/// Hands out the lowest free index below a limit, and takes it back.
#[derive(Debug, Default)]
struct Ids {
    used: BTreeSet<u32>,
}

impl Ids {
    fn take(&mut self, limit: u32, what: &'static str) -> Result<u32, DataplaneError> {
        let id = (0..limit)
            .find(|i| !self.used.contains(i))
            .ok_or(DataplaneError::Full(what))?;
        self.used.insert(id);
        Ok(id)
    }

    fn give(&mut self, id: u32) {
        self.used.remove(&id);
    }
}

/// First-fit regions of `tm_maglev`.
#[derive(Debug, Default)]
struct Regions {
    taken: BTreeMap<u32, u32>,
}

impl Regions {
    fn take(&mut self, size: u32) -> Result<u32, DataplaneError> {
        let mut at = 0u32;
        for (&base, &len) in &self.taken {
            if base - at >= size {
                break;
            }
            at = base + len;
        }
        if at.checked_add(size).is_none_or(|end| end > MAGLEV_CAPACITY) {
            return Err(DataplaneError::Full("Maglev table space"));
        }
        self.taken.insert(at, size);
        Ok(at)
    }

    fn give(&mut self, base: u32) {
        self.taken.remove(&base);
    }
}

#[derive(Debug)]
struct VipSlot {
    index: u32,
    key: VipKey,
    config_id: u32,
    tables: VipTables,
}

#[derive(Debug)]
struct StreamSlot {
    id: u32,
    base: u32,
    table: Vec<u32>,
    /// The region published before `base` and what it holds: the next
    /// table of its size goes there, written only where it differs.
    spare: Option<(u32, Vec<u32>)>,
}

/// This node's tunnel settings for remote targets and decapsulation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TunnelSettings {
    pub port: u16,
    pub address: Option<std::net::Ipv4Addr>,
}

/// The resolved next hop towards a remote node (from the neighbour resolver).
pub use crate::net::Hop;

/// Finds a local interface's index and MAC.
pub type Resolver<'a> = &'a dyn Fn(&str) -> Result<(u32, [u8; 6]), String>;

/// Counters of one LB object, summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamedCounter {
    pub name: String,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LbCounters {
    pub vips: Vec<NamedCounter>,
    pub flows: Vec<NamedCounter>,
    /// Named `<stream>/<identifier>`.
    pub targets: Vec<NamedCounter>,
}

/// The writer's memory of what is in the maps.
#[derive(Debug, Default)]
pub struct LbWriter {
    vip_ids: Ids,
    stream_ids: Ids,
    flow_ids: Ids,
    target_ids: Ids,
    regions: Regions,
    vips: BTreeMap<String, VipSlot>,
    streams: BTreeMap<String, StreamSlot>,
    flows: BTreeMap<String, u32>,
    /// (stream, identifier) → the target as written at its index (`stats_index`).
    targets: BTreeMap<(String, u32), Target>,
    /// Resolved next hops of remote nodes (copied into their targets).
    hops: BTreeMap<std::net::Ipv4Addr, Hop>,
    /// `tm_vip_slots` as written (non-empty slots only).
    slots: BTreeMap<u32, tapmesh_common::lb::VipSlot>,
}

fn zero_counter(ebpf: &mut Ebpf, name: &'static str, index: u32) -> Result<(), DataplaneError> {
    let mut map: PerCpuArray<&mut MapData, PacketCounter> =
        PerCpuArray::try_from(map_mut(ebpf, name)?).map_err(map_err(name))?;
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| DataplaneError::Map {
        name,
        message: e.to_string(),
    })?;
    let zeros =
        aya::maps::PerCpuValues::try_from(vec![PacketCounter::default(); cpus]).map_err(|e| {
            DataplaneError::Map {
                name,
                message: e.to_string(),
            }
        })?;
    map.set(index, zeros, 0).map_err(map_err(name))
}

fn read_counter(
    ebpf: &Ebpf,
    name: &'static str,
    index: u32,
) -> Result<PacketCounter, DataplaneError> {
    let map = ebpf.map(name).ok_or(DataplaneError::Map {
        name,
        message: "missing from the object".into(),
    })?;
    let map: PerCpuArray<&MapData, PacketCounter> =
        PerCpuArray::try_from(map).map_err(map_err(name))?;
    let mut total = PacketCounter::default();
    for cpu in map.get(&index, 0).map_err(map_err(name))?.iter() {
        total.merge(cpu);
    }
    Ok(total)
}

impl LbWriter {
    /// Makes the maps hold `valid`. Everything was validated before; what can
    /// still fail here is a full id space or a map write. Each local
    /// interface is resolved once per call.
    pub fn apply(
        &mut self,
        ebpf: &mut Ebpf,
        valid: &ValidLb,
        tunnel: TunnelSettings,
        resolve: Resolver,
    ) -> Result<(), DataplaneError> {
        let prefixes = valid.vips.iter().filter(|v| v.prefix.len < 128).count() as u16;
        self.write_node(ebpf, tunnel, prefixes)?;
        // Resolve local interfaces before touching anything, each once.
        let mut interfaces: HashMap<&str, (u32, [u8; 6])> = HashMap::new();
        let mut targets = BTreeMap::new();
        for t in &valid.targets {
            let (ifindex, our_mac) = match &t.via {
                ValidVia::Local { interface, .. } => match interfaces.get(interface.as_str()) {
                    Some(&found) => found,
                    None => {
                        let found =
                            resolve(interface).map_err(|message| DataplaneError::Attach {
                                hook: super::Hook::Xdp,
                                interface: interface.clone(),
                                message,
                            })?;
                        interfaces.insert(interface, found);
                        found
                    }
                },
                ValidVia::Remote { .. } => {
                    if tunnel.address.is_none() {
                        return Err(DataplaneError::Config(format!(
                            "target {} of stream {:?} is on another node, but this node has no tunnel address (set lb.node_address)",
                            t.identifier, t.stream
                        )));
                    }
                    (0, [0; 6])
                }
            };
            targets.insert((t.stream.clone(), t.identifier), (t, ifindex, our_mac));
        }

        // Stream ids and flow counters first, so tables can name them.
        for s in &valid.streams {
            if !self.streams.contains_key(&s.name) {
                let id = self.stream_ids.take(MAX_STREAMS, "stream ids")?;
                self.streams.insert(
                    s.name.clone(),
                    StreamSlot {
                        id,
                        base: 0,
                        table: Vec::new(),
                        spare: None,
                    },
                );
            }
        }
        for f in &valid.flows.flows {
            if !self.flows.contains_key(&f.name) {
                let id = self.flow_ids.take(MAX_FLOWS, "flow counters")?;
                zero_counter(ebpf, n::FLOW_STATS, id)?;
                self.flows.insert(f.name.clone(), id);
            }
        }

        // Targets before the tables that point at them; a target's index is
        // also its counters' index and what Maglev entries hold.
        // Changed and new targets are written in one batch; if anything
        // fails, the new ones' ids are given back.
        let mut changed = Vec::new();
        let mut failed = None;
        for (key, (t, ifindex, our_mac)) in &targets {
            let index = match self.targets.get(key) {
                Some(old) => old.stats_index,
                None => match self.new_target_id(ebpf) {
                    Ok(id) => id,
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                },
            };
            let mut value = target_value(&t.via, *ifindex, *our_mac, index);
            if let ValidVia::Remote { node } = &t.via {
                self.with_hop(&mut value, *node);
            }
            if self.targets.get(key) != Some(&value) {
                changed.push((key, value));
            }
        }
        let (indices, values): (Vec<u32>, Vec<Target>) =
            changed.iter().map(|(_, v)| (v.stats_index, *v)).unzip();
        let written = match failed {
            Some(e) => Err(e),
            None => array::<Target>(ebpf, n::TARGETS).and_then(|mut map| {
                batch::set_many(&mut map, &indices, &values).map_err(|e| DataplaneError::Map {
                    name: n::TARGETS,
                    message: e.to_string(),
                })
            }),
        };
        if let Err(e) = written {
            for (key, value) in &changed {
                if !self.targets.contains_key(*key) {
                    self.target_ids.give(value.stats_index);
                }
            }
            return Err(e);
        }
        for (key, value) in changed {
            self.targets.insert(key.clone(), value);
        }

        for s in &valid.streams {
            // Slots (identifier − 1) become target indices.
            let mut index = vec![NO_TARGET; s.max_targets as usize];
            let range = (s.name.clone(), 1)..=(s.name.clone(), s.max_targets);
            for ((_, identifier), t) in self.targets.range(range) {
                index[*identifier as usize - 1] = t.stats_index;
            }
            let table: Vec<u32> = s
                .table
                .iter()
                .map(|&slot| index.get(slot as usize).copied().unwrap_or(NO_TARGET))
                .collect();
            self.write_stream(ebpf, &s.name, &table)?;
        }
        for vip in &valid.vips {
            self.write_vip(ebpf, vip)?;
        }

        self.write_slots(ebpf, valid)?;

        // Then remove what is gone, tables first, targets last.
        let vips: BTreeSet<&str> = valid.vips.iter().map(|v| v.name.as_str()).collect();
        for name in self
            .vips
            .keys()
            .filter(|k| !vips.contains(k.as_str()))
            .cloned()
            .collect::<Vec<_>>()
        {
            self.remove_vip(ebpf, &name)?;
        }
        let streams: BTreeSet<&str> = valid.streams.iter().map(|s| s.name.as_str()).collect();
        for name in self
            .streams
            .keys()
            .filter(|k| !streams.contains(k.as_str()))
            .cloned()
            .collect::<Vec<_>>()
        {
            let slot = self.streams.remove(&name).expect("listed");
            array::<StreamValue>(ebpf, n::STREAMS)?
                .set(slot.id, StreamValue::default(), 0)
                .map_err(map_err(n::STREAMS))?;
            if !slot.table.is_empty() {
                self.regions.give(slot.base);
            }
            if let Some((base, _)) = slot.spare {
                self.regions.give(base);
            }
            self.stream_ids.give(slot.id);
        }
        let gone: Vec<_> = self
            .targets
            .keys()
            .filter(|k| !targets.contains_key(*k))
            .cloned()
            .collect();
        for key in gone {
            let value = self.targets.remove(&key).expect("listed");
            array::<Target>(ebpf, n::TARGETS)?
                .set(value.stats_index, Target::default(), 0)
                .map_err(map_err(n::TARGETS))?;
            self.target_ids.give(value.stats_index);
        }
        let flows: BTreeSet<&str> = valid.flows.flows.iter().map(|f| f.name.as_str()).collect();
        for name in self
            .flows
            .keys()
            .filter(|k| !flows.contains(k.as_str()))
            .cloned()
            .collect::<Vec<_>>()
        {
            let id = self.flows.remove(&name).expect("listed");
            self.flow_ids.give(id);
        }
        Ok(())
    }

    /// A free target index, its counters zeroed.
    fn new_target_id(&mut self, ebpf: &mut Ebpf) -> Result<u32, DataplaneError> {
        let id = self.target_ids.take(MAX_TARGETS, "target counters")?;
        if let Err(e) = zero_counter(ebpf, n::TARGET_STATS, id) {
            self.target_ids.give(id);
            return Err(e);
        }
        Ok(id)
    }

    fn write_node(
        &mut self,
        ebpf: &mut Ebpf,
        tunnel: TunnelSettings,
        vip_prefixes: u16,
    ) -> Result<(), DataplaneError> {
        let node = match tunnel.address {
            Some(addr) => NodeConfig {
                tunnel_port: tunnel.port,
                vip_prefixes,
                addr_v4: addr.octets(),
            },
            None => NodeConfig {
                vip_prefixes,
                ..NodeConfig::default()
            },
        };
        array::<NodeConfig>(ebpf, n::NODE)?
            .set(0, node, 0)
            .map_err(map_err(n::NODE))
    }

    /// Points each host VIP's slot at it (several in one slot: the hash map
    /// decides). VIPs being removed lose their slot first.
    fn write_slots(&mut self, ebpf: &mut Ebpf, valid: &ValidLb) -> Result<(), DataplaneError> {
        use tapmesh_common::lb::{vip_slot, VipSlot, SLOT_ONE, SLOT_SHARED};
        let mut slots: BTreeMap<u32, VipSlot> = BTreeMap::new();
        for vip in &valid.vips {
            let key = vip_key(&vip.prefix);
            if key.prefix_len != 128 {
                continue;
            }
            let index = self.vips[&vip.name].index;
            slots
                .entry(vip_slot(&key.addr))
                .and_modify(|s| s.state = SLOT_SHARED)
                .or_insert(VipSlot {
                    addr: key.addr,
                    vip_index: index,
                    state: SLOT_ONE,
                });
        }
        let mut map = array::<VipSlot>(ebpf, n::VIP_SLOTS)?;
        for (slot, value) in &slots {
            if self.slots.get(slot) != Some(value) {
                map.set(*slot, *value, 0).map_err(map_err(n::VIP_SLOTS))?;
            }
        }
        for slot in self.slots.keys().filter(|k| !slots.contains_key(k)) {
            map.set(*slot, VipSlot::default(), 0)
                .map_err(map_err(n::VIP_SLOTS))?;
        }
        self.slots = slots;
        Ok(())
    }

    /// A changed table goes to the stream's spare region when that has its
    /// size (only entries that differ are written), else to a new region;
    /// one write of the stream entry publishes it, and the region it
    /// replaces becomes the spare.
    fn write_stream(
        &mut self,
        ebpf: &mut Ebpf,
        name: &str,
        table: &[u32],
    ) -> Result<(), DataplaneError> {
        let slot = self.streams.get_mut(name).expect("stream id assigned");
        if slot.table == table {
            return Ok(());
        }
        let (id, spare) = (slot.id, slot.spare.take());
        let size = table.len() as u32;
        let (base, held) = match spare {
            Some((base, held)) if held.len() == table.len() => (base, Some(held)),
            other => {
                if let Some((base, _)) = other {
                    self.regions.give(base);
                }
                (self.take_region(size)?, None)
            }
        };
        let (indices, values): (Vec<u32>, Vec<u32>) = table
            .iter()
            .enumerate()
            .filter(|&(i, entry)| held.as_ref().is_none_or(|h| h[i] != *entry))
            .map(|(i, entry)| (base + i as u32, *entry))
            .unzip();
        let published = array::<u32>(ebpf, n::MAGLEV)
            .and_then(|mut map| {
                batch::set_many(&mut map, &indices, &values).map_err(|e| DataplaneError::Map {
                    name: n::MAGLEV,
                    message: e.to_string(),
                })
            })
            .and_then(|()| {
                let value = StreamValue {
                    table_base: base,
                    table_size: size,
                };
                array::<StreamValue>(ebpf, n::STREAMS)?
                    .set(id, value, 0)
                    .map_err(map_err(n::STREAMS))
            });
        if let Err(e) = published {
            // What the region holds is no longer known.
            self.regions.give(base);
            return Err(e);
        }
        let slot = self.streams.get_mut(name).expect("stream id assigned");
        if !slot.table.is_empty() {
            slot.spare = Some((slot.base, std::mem::take(&mut slot.table)));
        }
        slot.base = base;
        slot.table = table.to_vec();
        Ok(())
    }

    /// A region of `size` entries; when none is free, the spare regions are
    /// given up first.
    fn take_region(&mut self, size: u32) -> Result<u32, DataplaneError> {
        match self.regions.take(size) {
            Err(DataplaneError::Full(_)) => {
                for slot in self.streams.values_mut() {
                    if let Some((base, _)) = slot.spare.take() {
                        self.regions.give(base);
                    }
                }
                self.regions.take(size)
            }
            other => other,
        }
    }

    /// Writes the VIP's tables under its other config id, then flips the VIP entry.
    fn write_vip(
        &mut self,
        ebpf: &mut Ebpf,
        vip: &crate::flows::CompiledVip,
    ) -> Result<(), DataplaneError> {
        let key = vip_key(&vip.prefix);
        let (index, config_id) = match self.vips.get(&vip.name) {
            Some(slot) => (slot.index, slot.config_id ^ 1),
            None => {
                let index = self.vip_ids.take(MAX_VIPS, "VIP ids")?;
                zero_counter(ebpf, n::VIP_STATS, index)?;
                (index, 2 * index)
            }
        };
        let streams = &self.streams;
        let flows = &self.flows;
        let tables = vip_tables(
            vip,
            config_id,
            |s| streams.get(s).map_or(u32::MAX, |slot| slot.id),
            |f| flows.get(f).copied().unwrap_or(0),
        );
        if let Some(slot) = self.vips.get(&vip.name) {
            let mut old = slot.tables.clone();
            retarget(&mut old, config_id);
            if old == tables && slot.key == key {
                return Ok(());
            }
        }
        write_tables(ebpf, config_id, &tables)?;
        set_vip(
            ebpf,
            &key,
            VipValue {
                vip_index: index,
                config_id,
            },
        )?;
        if let Some(old) = self.vips.remove(&vip.name) {
            if old.key != key {
                remove_vip_key(ebpf, &old.key)?;
            }
            clear_tables(ebpf, &old.tables)?;
        }
        self.vips.insert(
            vip.name.clone(),
            VipSlot {
                index,
                key,
                config_id,
                tables,
            },
        );
        Ok(())
    }

    fn remove_vip(&mut self, ebpf: &mut Ebpf, name: &str) -> Result<(), DataplaneError> {
        let Some(slot) = self.vips.remove(name) else {
            return Ok(());
        };
        remove_vip_key(ebpf, &slot.key)?;
        clear_tables(ebpf, &slot.tables)?;
        self.vip_ids.give(slot.index);
        Ok(())
    }

    fn with_hop(&self, target: &mut Target, node: std::net::Ipv4Addr) {
        let hop = self.hops.get(&node);
        target.ifindex = hop.map_or(0, |h| h.ifindex);
        target.dst_mac = hop.map_or([0; 6], |h| h.dst_mac);
        target.src_mac = hop.map_or([0; 6], |h| h.src_mac);
    }

    /// Replaces the known next hops and rewrites the remote targets whose hop
    /// changed (a node without one goes back to a FIB lookup per packet).
    pub fn set_hops(
        &mut self,
        ebpf: &mut Ebpf,
        hops: BTreeMap<std::net::Ipv4Addr, Hop>,
    ) -> Result<(), DataplaneError> {
        self.hops = hops;
        let keys: Vec<_> = self.targets.keys().cloned().collect();
        for key in keys {
            let mut value = self.targets[&key];
            if value.kind != tapmesh_common::lb::TARGET_REMOTE {
                continue;
            }
            let a = &value.node_addr;
            let node = std::net::Ipv4Addr::new(a[12], a[13], a[14], a[15]);
            self.with_hop(&mut value, node);
            if self.targets[&key] != value {
                array::<Target>(ebpf, n::TARGETS)?
                    .set(value.stats_index, value, 0)
                    .map_err(map_err(n::TARGETS))?;
                self.targets.insert(key, value);
            }
        }
        Ok(())
    }

    /// Per-VIP, per-flow and per-target counters, summed over CPUs.
    pub fn counters(&self, ebpf: &Ebpf) -> Result<LbCounters, DataplaneError> {
        let mut out = LbCounters::default();
        let named = |name: String, c: PacketCounter| NamedCounter {
            name,
            packets: c.packets,
            bytes: c.bytes,
        };
        for (name, slot) in &self.vips {
            out.vips.push(named(
                name.clone(),
                read_counter(ebpf, n::VIP_STATS, slot.index)?,
            ));
        }
        for (name, id) in &self.flows {
            out.flows
                .push(named(name.clone(), read_counter(ebpf, n::FLOW_STATS, *id)?));
        }
        for ((stream, identifier), target) in &self.targets {
            let c = read_counter(ebpf, n::TARGET_STATS, target.stats_index)?;
            out.targets.push(named(format!("{stream}/{identifier}"), c));
        }
        Ok(out)
    }
}

/// Host VIPs go to the hash map and `tm_vip_values` (where their slot leads),
/// prefixes to the LPM trie; each is one write, so a new config is published at once.
fn set_vip(ebpf: &mut Ebpf, key: &VipKey, value: VipValue) -> Result<(), DataplaneError> {
    if key.prefix_len == 128 {
        array::<VipValue>(ebpf, n::VIP_VALUES)?
            .set(value.vip_index, value, 0)
            .map_err(map_err(n::VIP_VALUES))?;
        let mut hosts: BpfHashMap<_, VipAddr, VipValue> =
            BpfHashMap::try_from(map_mut(ebpf, n::VIP_HOSTS)?).map_err(map_err(n::VIP_HOSTS))?;
        hosts
            .insert(VipAddr::from(key), value, 0)
            .map_err(map_err(n::VIP_HOSTS))
    } else {
        let mut vips: LpmTrie<_, VipAddr, VipValue> = trie(ebpf, n::VIPS)?;
        vips.insert(&Key::new(key.prefix_len, VipAddr::from(key)), value, 0)
            .map_err(map_err(n::VIPS))
    }
}

fn remove_vip_key(ebpf: &mut Ebpf, key: &VipKey) -> Result<(), DataplaneError> {
    if key.prefix_len == 128 {
        let mut hosts: BpfHashMap<_, VipAddr, VipValue> =
            BpfHashMap::try_from(map_mut(ebpf, n::VIP_HOSTS)?).map_err(map_err(n::VIP_HOSTS))?;
        hosts
            .remove(&VipAddr::from(key))
            .map_err(map_err(n::VIP_HOSTS))
    } else {
        let mut vips: LpmTrie<_, VipAddr, VipValue> = trie(ebpf, n::VIPS)?;
        vips.remove(&Key::new(key.prefix_len, VipAddr::from(key)))
            .map_err(map_err(n::VIPS))
    }
}

/// The same tables as if written under `config_id` (to compare configurations).
fn retarget(t: &mut VipTables, config_id: u32) {
    let id = config_id.to_be_bytes();
    for (k, _) in t.dst_ports.iter_mut().chain(t.src_ports.iter_mut()) {
        k.config_id = id;
    }
    for (k, _) in t.sources.iter_mut() {
        k.config_id = id;
    }
}

fn port_key(k: &PortKey) -> Key<PortData> {
    Key::new(k.prefix_len, PortData::from(k))
}

fn source_key(k: &SourceKey) -> Key<SourceData> {
    Key::new(k.prefix_len, SourceData::from(k))
}

fn write_tables(ebpf: &mut Ebpf, config_id: u32, t: &VipTables) -> Result<(), DataplaneError> {
    use tapmesh_common::lb::{LOOKUP_DST_PORTS, LOOKUP_SOURCES, LOOKUP_SRC_PORTS};
    let searched = |bit: u32| t.config.lookups & bit != 0;
    for (name, entries, bit) in [
        (n::DST_PORTS, &t.dst_ports, LOOKUP_DST_PORTS),
        (n::SRC_PORTS, &t.src_ports, LOOKUP_SRC_PORTS),
    ] {
        if !searched(bit) {
            continue;
        }
        let mut map: LpmTrie<_, PortData, FlowMask> = trie(ebpf, name)?;
        for (k, v) in entries {
            map.insert(&port_key(k), *v, 0).map_err(map_err(name))?;
        }
    }
    if searched(LOOKUP_SOURCES) {
        let mut sources: LpmTrie<_, SourceData, FlowMask> = trie(ebpf, n::SOURCES)?;
        for (k, v) in &t.sources {
            sources
                .insert(&source_key(k), *v, 0)
                .map_err(map_err(n::SOURCES))?;
        }
    }
    let mut flows = array::<FlowEntry>(ebpf, n::FLOWS)?;
    for (bit, f) in t.flows.iter().enumerate() {
        flows
            .set(config_id * MAX_FLOWS_PER_VIP + bit as u32, *f, 0)
            .map_err(map_err(n::FLOWS))?;
    }
    array::<VipConfig>(ebpf, n::VIP_CONFIGS)?
        .set(config_id, t.config, 0)
        .map_err(map_err(n::VIP_CONFIGS))
}

/// Removes a configuration no VIP entry points at any more.
fn clear_tables(ebpf: &mut Ebpf, t: &VipTables) -> Result<(), DataplaneError> {
    for (name, entries) in [(n::DST_PORTS, &t.dst_ports), (n::SRC_PORTS, &t.src_ports)] {
        let mut map: LpmTrie<_, PortData, FlowMask> = trie(ebpf, name)?;
        for (k, _) in entries {
            let _ = map.remove(&port_key(k));
        }
    }
    let mut sources: LpmTrie<_, SourceData, FlowMask> = trie(ebpf, n::SOURCES)?;
    for (k, _) in &t.sources {
        let _ = sources.remove(&source_key(k));
    }
    Ok(())
}
