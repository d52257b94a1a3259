//! Writes the mirror maps: per source interface its rules, per tap flow its
//! VLAN set; reads the per-flow counters; registers AF_XDP ring sockets.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::RawFd;

use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray, XskMap};
use aya::Ebpf;
use tapmesh_common::map_names as n;
use tapmesh_common::mirror::{filter_bit, MirrorCounter, MirrorPort, VlanSet};

use super::{map_err, map_mut, DataplaneError};

/// What the kernel holds for mirroring.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MirrorTables {
    /// Source interface index → its rules.
    pub ports: BTreeMap<u32, MirrorPort>,
    /// Tap flow index → its VLAN set (filtered flows only).
    pub vlans: BTreeMap<u32, VlanSet>,
}

/// Remembers what it wrote, to delete what is no longer wanted.
#[derive(Default)]
pub struct MirrorWriter {
    ports: BTreeSet<u32>,
    /// Whether `ports` holds what the (possibly kept) pinned map held at start.
    seeded: bool,
    /// The `tm_mirror_bits` words written, by index.
    filter: BTreeMap<u32, u64>,
}

/// The filter words that let the kernel find `ports`.
fn filter_words(ports: impl IntoIterator<Item = u32>) -> BTreeMap<u32, u64> {
    let mut words = BTreeMap::new();
    for ifindex in ports {
        let (word, bit) = filter_bit(ifindex);
        *words.entry(word).or_insert(0) |= bit;
    }
    words
}

impl MirrorWriter {
    /// VLAN sets first (a rule never points at a set not yet written), then
    /// the ports; ports no longer in `tables` are removed last.
    pub fn apply(&mut self, ebpf: &mut Ebpf, tables: &MirrorTables) -> Result<(), DataplaneError> {
        {
            let mut vlans: aya::maps::Array<&mut MapData, VlanSet> =
                aya::maps::Array::try_from(map_mut(ebpf, n::MIRROR_VLANS)?)
                    .map_err(map_err(n::MIRROR_VLANS))?;
            for (&flow, set) in &tables.vlans {
                vlans.set(flow, *set, 0).map_err(map_err(n::MIRROR_VLANS))?;
            }
        }
        let mut ports: BpfHashMap<&mut MapData, u32, MirrorPort> =
            BpfHashMap::try_from(map_mut(ebpf, n::MIRROR_PORTS)?)
                .map_err(map_err(n::MIRROR_PORTS))?;
        if !self.seeded {
            // Entries a kept dataplane left behind are ours to remove.
            self.ports.extend(ports.keys().filter_map(Result::ok));
            self.seeded = true;
        }
        for (ifindex, port) in &tables.ports {
            ports
                .insert(ifindex, port, 0)
                .map_err(map_err(n::MIRROR_PORTS))?;
        }
        // The filter lets the kernel see new ports and stops it looking at
        // gone ones before their entries go.
        let wanted = filter_words(tables.ports.keys().copied());
        let mut stale: BTreeSet<u32> = self.filter.keys().copied().collect();
        stale.extend(filter_words(self.ports.iter().copied()).into_keys());
        {
            let mut filter: aya::maps::Array<&mut MapData, u64> =
                aya::maps::Array::try_from(map_mut(ebpf, n::MIRROR_FILTER)?)
                    .map_err(map_err(n::MIRROR_FILTER))?;
            for word in stale.iter().chain(wanted.keys()) {
                let value = wanted.get(word).copied().unwrap_or(0);
                if self.filter.get(word) != Some(&value) || !wanted.contains_key(word) {
                    filter
                        .set(*word, value, 0)
                        .map_err(map_err(n::MIRROR_FILTER))?;
                }
            }
        }
        self.filter = wanted;
        let mut ports: BpfHashMap<&mut MapData, u32, MirrorPort> =
            BpfHashMap::try_from(map_mut(ebpf, n::MIRROR_PORTS)?)
                .map_err(map_err(n::MIRROR_PORTS))?;
        for gone in self
            .ports
            .difference(&tables.ports.keys().copied().collect())
        {
            let _ = ports.remove(gone);
        }
        self.ports = tables.ports.keys().copied().collect();
        Ok(())
    }

    /// Zeroes a tap flow's counters (before its index is given to a new flow).
    pub fn reset_counter(&self, ebpf: &mut Ebpf, flow: u32) -> Result<(), DataplaneError> {
        let name = n::MIRROR_STATS;
        let mut map: PerCpuArray<&mut MapData, MirrorCounter> =
            PerCpuArray::try_from(map_mut(ebpf, name)?).map_err(map_err(name))?;
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| DataplaneError::Map {
            name,
            message: e.to_string(),
        })?;
        let zeros = aya::maps::PerCpuValues::try_from(vec![MirrorCounter::default(); cpus])
            .map_err(|e| DataplaneError::Map {
                name,
                message: e.to_string(),
            })?;
        map.set(flow, zeros, 0).map_err(map_err(name))
    }

    /// A tap flow's counters summed over CPUs.
    pub fn counter(&self, ebpf: &Ebpf, flow: u32) -> Result<MirrorCounter, DataplaneError> {
        let name = n::MIRROR_STATS;
        let map = ebpf.map(name).ok_or(DataplaneError::Map {
            name,
            message: "missing from the object".into(),
        })?;
        let map: PerCpuArray<&MapData, MirrorCounter> =
            PerCpuArray::try_from(map).map_err(map_err(name))?;
        let mut total = MirrorCounter::default();
        for cpu in map.get(&flow, 0).map_err(map_err(name))?.iter() {
            total.packets += cpu.packets;
            total.bytes += cpu.bytes;
            total.failed += cpu.failed;
        }
        Ok(total)
    }

    /// Points ring interface `ifindex` at XSKMAP slot `slot` holding socket `fd`.
    pub fn set_ring(
        &self,
        ebpf: &mut Ebpf,
        ifindex: u32,
        slot: u32,
        fd: RawFd,
    ) -> Result<(), DataplaneError> {
        {
            let mut xsks: XskMap<&mut MapData> =
                XskMap::try_from(map_mut(ebpf, n::XSKS)?).map_err(map_err(n::XSKS))?;
            xsks.set(slot, fd, 0).map_err(map_err(n::XSKS))?;
        }
        let mut rings: BpfHashMap<&mut MapData, u32, u32> =
            BpfHashMap::try_from(map_mut(ebpf, n::MIRROR_RINGS)?)
                .map_err(map_err(n::MIRROR_RINGS))?;
        rings
            .insert(ifindex, slot, 0)
            .map_err(map_err(n::MIRROR_RINGS))
    }

    pub fn remove_ring(&self, ebpf: &mut Ebpf, ifindex: u32, slot: u32) {
        if let Some(map) = ebpf.map_mut(n::MIRROR_RINGS) {
            if let Ok(mut rings) = BpfHashMap::<&mut MapData, u32, u32>::try_from(map) {
                let _ = rings.remove(&ifindex);
            }
        }
        if let Some(map) = ebpf.map_mut(n::XSKS) {
            if let Ok(mut xsks) = XskMap::<&mut MapData>::try_from(map) {
                let _ = xsks.unset(slot);
            }
        }
    }
}
