//! Writes the service-IP overlay maps and reads their counters. The caller
//! hands over the whole wanted state; only differences reach the kernel, in
//! an order no packet can trip over: instances, then slots, then services;
//! removals last.

use std::collections::BTreeMap;

use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray};
use aya::Ebpf;
use tapmesh_common::{
    map_names as n,
    overlay::{Instance, Local, OverlayConfig, Service, SERVICE_SLOTS},
    PacketCounter,
};

use super::{map_err, map_mut, DataplaneError};

/// Key words of the maps: an IPv4 address as it lies in the packet.
pub fn addr_word(addr: std::net::Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

/// One service IP: its id, policy and instance ids in slot order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceTable {
    pub id: u32,
    pub policy: u8,
    pub slots: Vec<u32>,
}

/// Everything the overlay maps hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OverlayTables {
    pub config: OverlayConfig,
    pub services: BTreeMap<std::net::Ipv4Addr, ServiceTable>,
    pub instances: BTreeMap<u32, Instance>,
    pub locals: BTreeMap<std::net::Ipv4Addr, Local>,
}

/// Remembers what it wrote.
#[derive(Default)]
pub struct OverlayWriter {
    written: OverlayTables,
}

impl OverlayWriter {
    pub fn apply(&mut self, ebpf: &mut Ebpf, wanted: &OverlayTables) -> Result<(), DataplaneError> {
        for service in wanted.services.values() {
            if service.slots.len() > SERVICE_SLOTS as usize {
                return Err(DataplaneError::Config(format!(
                    "service {} has {} slots, at most {SERVICE_SLOTS}",
                    service.id,
                    service.slots.len()
                )));
            }
        }
        {
            let mut instances: Array<&mut MapData, Instance> =
                Array::try_from(map_mut(ebpf, n::OV_INSTANCES)?)
                    .map_err(map_err(n::OV_INSTANCES))?;
            for (&id, inst) in &wanted.instances {
                if self.written.instances.get(&id) != Some(inst) {
                    instances
                        .set(id, *inst, 0)
                        .map_err(map_err(n::OV_INSTANCES))?;
                }
            }
        }
        {
            let mut locals: BpfHashMap<&mut MapData, u32, Local> =
                BpfHashMap::try_from(map_mut(ebpf, n::OV_LOCALS)?)
                    .map_err(map_err(n::OV_LOCALS))?;
            for (addr, local) in &wanted.locals {
                if self.written.locals.get(addr) != Some(local) {
                    locals
                        .insert(addr_word(*addr), *local, 0)
                        .map_err(map_err(n::OV_LOCALS))?;
                }
            }
        }
        {
            let mut slots: Array<&mut MapData, u32> =
                Array::try_from(map_mut(ebpf, n::OV_SLOTS)?).map_err(map_err(n::OV_SLOTS))?;
            for service in wanted.services.values() {
                let before = self.written.services.values().find(|s| s.id == service.id);
                if before.map(|b| &b.slots) == Some(&service.slots) {
                    continue;
                }
                for (i, &instance) in service.slots.iter().enumerate() {
                    slots
                        .set(service.id * SERVICE_SLOTS + i as u32, instance, 0)
                        .map_err(map_err(n::OV_SLOTS))?;
                }
            }
        }
        {
            let mut services: BpfHashMap<&mut MapData, u32, Service> =
                BpfHashMap::try_from(map_mut(ebpf, n::OV_SERVICES)?)
                    .map_err(map_err(n::OV_SERVICES))?;
            for (addr, table) in &wanted.services {
                if self.written.services.get(addr) == Some(table) {
                    continue;
                }
                let value = Service {
                    id: table.id,
                    policy: table.policy,
                    slots: table.slots.len() as u8,
                    _pad: [0; 2],
                };
                services
                    .insert(addr_word(*addr), value, 0)
                    .map_err(map_err(n::OV_SERVICES))?;
            }
            for addr in self.written.services.keys() {
                if !wanted.services.contains_key(addr) {
                    let _ = services.remove(&addr_word(*addr));
                }
            }
        }
        {
            let mut locals: BpfHashMap<&mut MapData, u32, Local> =
                BpfHashMap::try_from(map_mut(ebpf, n::OV_LOCALS)?)
                    .map_err(map_err(n::OV_LOCALS))?;
            for addr in self.written.locals.keys() {
                if !wanted.locals.contains_key(addr) {
                    let _ = locals.remove(&addr_word(*addr));
                }
            }
        }
        {
            // Removed instances: their slot is emptied with a new generation,
            // so conntrack entries naming them pick again.
            let mut instances: Array<&mut MapData, Instance> =
                Array::try_from(map_mut(ebpf, n::OV_INSTANCES)?)
                    .map_err(map_err(n::OV_INSTANCES))?;
            for (&id, old) in &self.written.instances {
                if !wanted.instances.contains_key(&id) {
                    let empty = Instance {
                        generation: old.generation.wrapping_add(1),
                        ..Instance::default()
                    };
                    instances
                        .set(id, empty, 0)
                        .map_err(map_err(n::OV_INSTANCES))?;
                }
            }
        }
        if self.written.config != wanted.config {
            let mut config: Array<&mut MapData, OverlayConfig> =
                Array::try_from(map_mut(ebpf, n::OV_CONFIG)?).map_err(map_err(n::OV_CONFIG))?;
            config
                .set(0, wanted.config, 0)
                .map_err(map_err(n::OV_CONFIG))?;
        }
        self.written = wanted.clone();
        Ok(())
    }

    /// Forgets an unknown service IP's pending miss, so its next packet signals again.
    pub fn clear_pending(&self, ebpf: &mut Ebpf, service: std::net::Ipv4Addr) {
        if let Some(map) = ebpf.map_mut(n::OV_PENDING) {
            if let Ok(mut pending) = BpfHashMap::<&mut MapData, u32, u64>::try_from(map) {
                let _ = pending.remove(&addr_word(service));
            }
        }
    }

    /// Packets and bytes per service id and per instance id, summed over CPUs.
    pub fn counters(
        &self,
        ebpf: &Ebpf,
    ) -> Result<(BTreeMap<u32, PacketCounter>, BTreeMap<u32, PacketCounter>), DataplaneError> {
        let read = |name: &'static str, ids: Vec<u32>| {
            let map = ebpf.map(name).ok_or(DataplaneError::Map {
                name,
                message: "missing from the object".into(),
            })?;
            let stats: PerCpuArray<&MapData, PacketCounter> =
                PerCpuArray::try_from(map).map_err(map_err(name))?;
            let mut out = BTreeMap::new();
            for id in ids {
                let per_cpu = stats.get(&id, 0).map_err(map_err(name))?;
                let mut total = PacketCounter::default();
                for c in per_cpu.iter() {
                    total.merge(c);
                }
                out.insert(id, total);
            }
            Ok::<_, DataplaneError>(out)
        };
        let services = read(
            n::OV_SERVICE_STATS,
            self.written.services.values().map(|s| s.id).collect(),
        )?;
        let instances = read(
            n::OV_INSTANCE_STATS,
            self.written.instances.keys().copied().collect(),
        )?;
        Ok((services, instances))
    }
}
