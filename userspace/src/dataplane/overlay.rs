//! Writes the service-IP overlay maps and reads their counters. The caller
//! hands over the whole wanted state; only differences reach the kernel, in
//! an order no packet can trip over: instances, then locals and their array
//! slots, then service slots, then services; removals last. The config's
//! "services outside the prefix" flag is raised before such a service is
//! written and lowered after the last one is removed.

use std::collections::BTreeMap;

use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray};
use aya::Ebpf;
use tapmesh_common::{
    map_names as n,
    overlay::{
        local_slot, Addr6, Instance, Instance6, Local, Local6, LocalSlot, OverlayConfig,
        OverlayConfig6, Service, CONFIG_SERVICES_OUTSIDE_PREFIX, LOCAL_SLOT_ONE, LOCAL_SLOT_SHARED,
        SERVICE_SLOTS,
    },
    PacketCounter,
};

use super::{map_err, map_mut, DataplaneError};

/// Key words of the maps: an IPv4 address as it lies in the packet.
pub fn addr_word(addr: std::net::Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

/// An IPv6 address as the maps hold it: four words in memory order.
pub fn addr6_words(addr: std::net::Ipv6Addr) -> Addr6 {
    let o = addr.octets();
    std::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
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
    pub config6: OverlayConfig6,
    /// An IPv6 service IP → the IPv4 service IP it is the twin of (same
    /// service: id, policy, slots).
    pub services6: BTreeMap<std::net::Ipv6Addr, std::net::Ipv4Addr>,
    pub instances6: BTreeMap<u32, Instance6>,
    pub locals6: BTreeMap<std::net::Ipv6Addr, Local6>,
}

/// Remembers what it wrote.
#[derive(Default)]
pub struct OverlayWriter {
    written: OverlayTables,
    /// `tm_ov_local_slots` as written (with `dialled` 0).
    slots: BTreeMap<u32, LocalSlot>,
    /// `tm_ov_config` as written.
    config: Option<OverlayConfig>,
}

/// `tm_ov_local_slots` for `locals`: each container in the slot of its
/// address, or the slot marked shared when several map to it.
pub fn local_slots(locals: &BTreeMap<std::net::Ipv4Addr, Local>) -> BTreeMap<u32, LocalSlot> {
    let mut slots = BTreeMap::new();
    for (addr, local) in locals {
        let addr = addr_word(*addr);
        slots
            .entry(local_slot(addr))
            .and_modify(|s: &mut LocalSlot| {
                *s = LocalSlot {
                    state: LOCAL_SLOT_SHARED,
                    ..LocalSlot::default()
                }
            })
            .or_insert(LocalSlot {
                addr,
                state: LOCAL_SLOT_ONE,
                dialled: 0,
                local: *local,
            });
    }
    slots
}

/// `config` with the flag set when a service IP of `services` lies outside its prefix.
fn flagged<'a>(
    config: &OverlayConfig,
    services: impl IntoIterator<Item = &'a std::net::Ipv4Addr>,
) -> OverlayConfig {
    let outside = services.into_iter().any(|a| {
        config.service_mask == 0 || addr_word(*a) & config.service_mask != config.service_prefix
    });
    OverlayConfig {
        flags: if outside {
            config.flags | CONFIG_SERVICES_OUTSIDE_PREFIX
        } else {
            config.flags & !CONFIG_SERVICES_OUTSIDE_PREFIX
        },
        ..*config
    }
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
            let mut instances6: Array<&mut MapData, Instance6> =
                Array::try_from(map_mut(ebpf, n::OV_INSTANCES6)?)
                    .map_err(map_err(n::OV_INSTANCES6))?;
            for (&id, inst) in &wanted.instances6 {
                if self.written.instances6.get(&id) != Some(inst) {
                    instances6
                        .set(id, *inst, 0)
                        .map_err(map_err(n::OV_INSTANCES6))?;
                }
            }
            for &id in self.written.instances6.keys() {
                if !wanted.instances6.contains_key(&id) {
                    instances6
                        .set(id, Instance6::default(), 0)
                        .map_err(map_err(n::OV_INSTANCES6))?;
                }
            }
        }
        {
            let mut locals6: BpfHashMap<&mut MapData, Addr6, Local6> =
                BpfHashMap::try_from(map_mut(ebpf, n::OV_LOCALS6)?)
                    .map_err(map_err(n::OV_LOCALS6))?;
            for (addr, local) in &wanted.locals6 {
                if self.written.locals6.get(addr) != Some(local) {
                    locals6
                        .insert(addr6_words(*addr), *local, 0)
                        .map_err(map_err(n::OV_LOCALS6))?;
                }
            }
        }
        if self.written.config6 != wanted.config6 {
            let mut config6: Array<&mut MapData, OverlayConfig6> =
                Array::try_from(map_mut(ebpf, n::OV_CONFIG6)?).map_err(map_err(n::OV_CONFIG6))?;
            config6
                .set(0, wanted.config6, 0)
                .map_err(map_err(n::OV_CONFIG6))?;
        }
        {
            let wanted_slots = local_slots(&wanted.locals);
            let mut slots: Array<&mut MapData, LocalSlot> =
                Array::try_from(map_mut(ebpf, n::OV_LOCAL_SLOTS)?)
                    .map_err(map_err(n::OV_LOCAL_SLOTS))?;
            for (&index, slot) in &wanted_slots {
                let before = self.slots.get(&index);
                if before == Some(slot) {
                    continue;
                }
                // Only a slot this writer saw empty holds a container that
                // cannot have dialled yet. Any other (a rewrite, a slot that
                // was shared, the first apply over kept pins) keeps the
                // reverse lookup on: the kernel sets the flag on new flows only.
                let fresh = self.config.is_some() && before.is_none();
                let value = LocalSlot {
                    dialled: u32::from(!fresh),
                    ..*slot
                };
                slots
                    .set(index, value, 0)
                    .map_err(map_err(n::OV_LOCAL_SLOTS))?;
            }
            for &index in self.slots.keys() {
                if !wanted_slots.contains_key(&index) {
                    slots
                        .set(index, LocalSlot::default(), 0)
                        .map_err(map_err(n::OV_LOCAL_SLOTS))?;
                }
            }
            self.slots = wanted_slots;
        }
        // Raised before a service outside the prefix is written (and kept
        // until the last one is gone); the rest of the config is written last.
        let during = flagged(
            &wanted.config,
            wanted.services.keys().chain(self.written.services.keys()),
        );
        let raised = |c: &OverlayConfig| c.flags & CONFIG_SERVICES_OUTSIDE_PREFIX != 0;
        if raised(&during) && !self.config.as_ref().is_some_and(raised) {
            self.write_config(ebpf, during)?;
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
            // Each IPv6 service IP holds its IPv4 twin's service value.
            let mut services6: BpfHashMap<&mut MapData, Addr6, Service> =
                BpfHashMap::try_from(map_mut(ebpf, n::OV_SERVICES6)?)
                    .map_err(map_err(n::OV_SERVICES6))?;
            for (addr6, twin) in &wanted.services6 {
                let Some(table) = wanted.services.get(twin) else {
                    continue;
                };
                let before = self.written.services6.get(addr6);
                if before == Some(twin) && self.written.services.get(twin) == Some(table) {
                    continue;
                }
                let value = Service {
                    id: table.id,
                    policy: table.policy,
                    slots: table.slots.len() as u8,
                    _pad: [0; 2],
                };
                services6
                    .insert(addr6_words(*addr6), value, 0)
                    .map_err(map_err(n::OV_SERVICES6))?;
            }
            for addr6 in self.written.services6.keys() {
                let kept = wanted
                    .services6
                    .get(addr6)
                    .is_some_and(|twin| wanted.services.contains_key(twin));
                if !kept {
                    let _ = services6.remove(&addr6_words(*addr6));
                }
            }
        }
        {
            let mut locals6: BpfHashMap<&mut MapData, Addr6, Local6> =
                BpfHashMap::try_from(map_mut(ebpf, n::OV_LOCALS6)?)
                    .map_err(map_err(n::OV_LOCALS6))?;
            for addr in self.written.locals6.keys() {
                if !wanted.locals6.contains_key(addr) {
                    let _ = locals6.remove(&addr6_words(*addr));
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
        self.write_config(ebpf, flagged(&wanted.config, wanted.services.keys()))?;
        self.written = wanted.clone();
        Ok(())
    }

    fn write_config(
        &mut self,
        ebpf: &mut Ebpf,
        value: OverlayConfig,
    ) -> Result<(), DataplaneError> {
        if self.config == Some(value) {
            return Ok(());
        }
        let mut config: Array<&mut MapData, OverlayConfig> =
            Array::try_from(map_mut(ebpf, n::OV_CONFIG)?).map_err(map_err(n::OV_CONFIG))?;
        config.set(0, value, 0).map_err(map_err(n::OV_CONFIG))?;
        self.config = Some(value);
        Ok(())
    }

    /// Forgets an unknown service IP's pending miss, so its next packet signals again.
    pub fn clear_pending(&self, ebpf: &mut Ebpf, service: std::net::IpAddr) {
        match service {
            std::net::IpAddr::V4(v4) => {
                if let Some(map) = ebpf.map_mut(n::OV_PENDING) {
                    if let Ok(mut pending) = BpfHashMap::<&mut MapData, u32, u64>::try_from(map) {
                        let _ = pending.remove(&addr_word(v4));
                    }
                }
            }
            std::net::IpAddr::V6(v6) => {
                if let Some(map) = ebpf.map_mut(n::OV_PENDING6) {
                    if let Ok(mut pending) = BpfHashMap::<&mut MapData, Addr6, u64>::try_from(map) {
                        let _ = pending.remove(&addr6_words(v6));
                    }
                }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn local(ifindex: u32) -> Local {
        Local {
            ifindex,
            ..Local::default()
        }
    }

    #[test]
    fn a_container_has_its_slot_and_colliding_ones_share() {
        let locals = BTreeMap::from([
            (Ipv4Addr::new(10, 19, 0, 2), local(2)),
            (Ipv4Addr::new(10, 19, 0, 3), local(3)),
            // 1024 addresses further: the slot of 10.19.0.3.
            (Ipv4Addr::new(10, 19, 4, 3), local(4)),
        ]);
        let slots = local_slots(&locals);
        assert_eq!(slots.len(), 2);
        let one = slots[&2];
        assert_eq!(
            (one.state, one.addr, one.local.ifindex, one.dialled),
            (LOCAL_SLOT_ONE, addr_word(Ipv4Addr::new(10, 19, 0, 2)), 2, 0)
        );
        assert_eq!(slots[&3].state, LOCAL_SLOT_SHARED);
        assert_eq!(slots[&3].addr, 0);
    }

    #[test]
    fn the_config_flag_says_whether_a_service_lies_outside_the_prefix() {
        let config = OverlayConfig {
            service_prefix: addr_word(Ipv4Addr::new(10, 30, 0, 0)),
            service_mask: addr_word(Ipv4Addr::new(255, 255, 0, 0)),
            ..OverlayConfig::default()
        };
        let inside = [Ipv4Addr::new(10, 30, 1, 1)];
        let outside = [Ipv4Addr::new(10, 30, 1, 1), Ipv4Addr::new(192, 0, 2, 9)];
        assert_eq!(flagged(&config, &inside).flags, 0);
        assert_eq!(
            flagged(&config, &outside).flags,
            CONFIG_SERVICES_OUTSIDE_PREFIX
        );
        // No prefix: every service is outside it.
        let none = OverlayConfig::default();
        assert_eq!(
            flagged(&none, &inside).flags,
            CONFIG_SERVICES_OUTSIDE_PREFIX
        );
        assert_eq!(flagged(&none, &[]).flags, 0);
    }
}
