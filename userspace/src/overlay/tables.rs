//! The overlay's map entries: instances and service IPs compiled into
//! `OverlayTables` (common types only), with ids kept by [`Ids`]. Pure: the
//! writer is `dataplane/overlay.rs`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use tapmesh_common::overlay::{
    Instance, Instance6, Local, Local6, OverlayConfig, OverlayConfig6, INSTANCE_LOCAL,
    INSTANCE_REMOTE, SERVICE_SLOTS,
};

use super::model::{
    lowest_free, Ids, InstanceRecord, IpType, ModelError, Placement, ServiceIp, Settings,
};
use crate::dataplane::overlay::{addr6_words, addr_word, OverlayTables, ServiceTable};

impl Ids {
    /// Compiles `records` into map tables. Ids of what is gone are freed;
    /// an instance whose entry changed gets a new generation (its flows
    /// pick again).
    pub fn compile(
        &mut self,
        records: &[&InstanceRecord],
        settings: &Settings,
        cost_of: &dyn Fn(&InstanceRecord) -> u32,
    ) -> Result<OverlayTables, ModelError> {
        use tapmesh_common::overlay::MAX_SERVICES;

        let keys: BTreeSet<(String, u32)> =
            records.iter().map(|r| (r.job.clone(), r.number)).collect();
        self.instances.retain(|k, _| keys.contains(k));
        let mut tables = OverlayTables::default();
        let mut record_of: BTreeMap<u32, &InstanceRecord> = BTreeMap::new();
        for record in records {
            let key = (record.job.clone(), record.number);
            let max = settings.instance_entries;
            // An id kept from a run with larger maps is given a new one.
            let id = match self.instances.get(&key) {
                Some(&id) if id < max => id,
                _ => {
                    let used: BTreeSet<u32> = self.instances.values().copied().collect();
                    let id = lowest_free(&used, &self.cooling_instances, max)
                        .ok_or(ModelError::TooManyInstances(max))?;
                    self.instances.insert(key.clone(), id);
                    id
                }
            };
            let reply_addr = record.instance_ip().unwrap_or(record.ns_addr);
            let mut inst = Instance {
                ns_addr: addr_word(record.ns_addr),
                reply_addr: addr_word(reply_addr),
                ..Instance::default()
            };
            match &record.placement {
                Placement::Local {
                    host_ifindex,
                    host_mac,
                    mac,
                    ..
                } => {
                    inst.kind = INSTANCE_LOCAL;
                    inst.ifindex = *host_ifindex;
                    inst.dst_mac = *mac;
                    inst.src_mac = *host_mac;
                    tables.locals.insert(
                        record.ns_addr,
                        Local {
                            ifindex: *host_ifindex,
                            instance_addr: addr_word(reply_addr),
                            mac: *mac,
                            host_mac: *host_mac,
                        },
                    );
                    if let Some(ns6) = record.ns_addr_v6 {
                        tables.locals6.insert(
                            ns6,
                            Local6 {
                                ifindex: *host_ifindex,
                                instance_addr: addr6_words(record.instance_ip_v6().unwrap_or(ns6)),
                                mac: *mac,
                                host_mac: *host_mac,
                            },
                        );
                    }
                }
                Placement::Remote { node, port } => {
                    inst.kind = INSTANCE_REMOTE;
                    inst.node_addr = addr_word(*node);
                    inst.node_port = *port;
                }
            }
            // A changed entry, a service IP it no longer carries, or a slot
            // that held another instance starts a new generation: the flows
            // bound to it pick again. Service IPs added, reordered or
            // reweighted leave its flows where they are.
            let generation = self.generations.entry(id).or_insert(0);
            let unchanged = self.restored.remove(&key) == Some(id)
                || self.last.get(&id).is_some_and(|(old, sips, v6)| {
                    *old == inst
                        && sips.is_subset(&carried(&record.service_ips))
                        && *v6 == record.ns_addr_v6
                });
            if !unchanged {
                *generation = generation.wrapping_add(1);
            }
            inst.generation = *generation;
            tables.instances.insert(id, inst);
            if let Some(ns6) = record.ns_addr_v6 {
                tables.instances6.insert(
                    id,
                    Instance6 {
                        ns_addr: addr6_words(ns6),
                        reply_addr: addr6_words(record.instance_ip_v6().unwrap_or(ns6)),
                    },
                );
            }
            record_of.insert(id, record);
        }
        // Removed slots keep counting generations (the writer empties them
        // with the next one).
        for id in self.last.keys() {
            if !tables.instances.contains_key(id) {
                if let Some(g) = self.generations.get_mut(id) {
                    *g = g.wrapping_add(1);
                }
            }
        }
        self.last = tables
            .instances
            .iter()
            .map(|(&id, inst)| {
                let bare = Instance {
                    generation: 0,
                    ..*inst
                };
                let record = record_of[&id];
                (id, (bare, carried(&record.service_ips), record.ns_addr_v6))
            })
            .collect();

        // Service IPs: every instance carrying one; the first type seen
        // wins. An IPv6 service IP (`Address_v6`) is a service of its own
        // whose slots hold only the instances that have IPv6.
        let mut carriers: BTreeMap<IpAddr, (IpType, Vec<u32>)> = BTreeMap::new();
        let mut weights: BTreeMap<(IpAddr, u32), u32> = BTreeMap::new();
        for (&id, record) in &record_of {
            for sip in &record.service_ips {
                let v6 = sip.address_v6.filter(|_| record.ns_addr_v6.is_some());
                let addresses = [Some(IpAddr::V4(sip.address)), v6.map(IpAddr::V6)];
                for addr in addresses.into_iter().flatten() {
                    let entry = carriers.entry(addr).or_insert((sip.ip_type, Vec::new()));
                    if entry.0 == sip.ip_type && !entry.1.contains(&id) {
                        entry.1.push(id);
                        let w = if sip.weight == 0 {
                            record.weight
                        } else {
                            sip.weight
                        };
                        weights.insert((addr, id), w);
                    }
                }
            }
        }
        self.services.retain(|addr, _| carriers.contains_key(addr));
        for (addr, (ip_type, mut ids)) in carriers {
            let id = match self.services.get(&addr) {
                Some(&id) => id,
                None => {
                    let used: BTreeSet<u32> = self.services.values().copied().collect();
                    let id = lowest_free(&used, &self.cooling_services, MAX_SERVICES)
                        .ok_or(ModelError::TooManyServices(MAX_SERVICES))?;
                    self.services.insert(addr, id);
                    id
                }
            };
            let slots = match ip_type {
                IpType::RoundRobin => {
                    weighted_slots(&ids, |id| weights.get(&(addr, *id)).copied().unwrap_or(1))
                }
                IpType::Closest => {
                    ids.sort_by_key(|id| (cost_of(record_of[id]), *id));
                    ids.truncate(SERVICE_SLOTS as usize);
                    ids
                }
                IpType::InstanceNumber => ids.into_iter().take(1).collect(),
            };
            let table = ServiceTable {
                id,
                policy: ip_type.policy(),
                slots,
            };
            match addr {
                IpAddr::V4(v4) => tables.services.insert(v4, table),
                IpAddr::V6(v6) => tables.services6.insert(v6, table),
            };
        }
        self.cooling_instances = tables.instances.keys().copied().collect();
        self.cooling_services = self.services.values().copied().collect();
        self.restored.clear();

        let (prefix, len) = settings.service_prefix;
        let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
        tables.config = OverlayConfig {
            tunnel_mtu: settings.tunnel_mtu,
            _pad: 0,
            gateway: addr_word(settings.gateway),
            service_prefix: addr_word(Ipv4Addr::from(u32::from(prefix) & mask)),
            service_mask: addr_word(Ipv4Addr::from(mask)),
            flags: 0,
        };

        let (prefix6, mask6) = match settings.service_prefix_v6 {
            Some((prefix, len)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
                (
                    addr6_words(Ipv6Addr::from(u128::from(prefix) & mask)),
                    addr6_words(Ipv6Addr::from(mask)),
                )
            }
            None => ([0; 16], [0; 16]),
        };
        let outside6 = tables.services6.keys().any(|a| {
            let mask = u128::from_be_bytes(mask6);
            u128::from(*a) & mask != u128::from_be_bytes(prefix6) || mask == 0
        });
        tables.config6 = OverlayConfig6 {
            gateway: settings.gateway_v6.map(addr6_words).unwrap_or([0; 16]),
            service_prefix: prefix6,
            service_mask: mask6,
            flags: if outside6 {
                tapmesh_common::overlay::CONFIG_SERVICES_OUTSIDE_PREFIX
            } else {
                0
            },
        };
        Ok(tables)
    }
}

/// Round-robin slots: each instance as many times as its weight, scaled
/// down to fit SERVICE_SLOTS, interleaved so turns alternate.
fn weighted_slots(ids: &[u32], weight: impl Fn(&u32) -> u32) -> Vec<u32> {
    let total: u64 = ids.iter().map(|id| u64::from(weight(id).max(1))).sum();
    let room = u64::from(SERVICE_SLOTS);
    let mut counts: Vec<(u32, u64)> = ids
        .iter()
        .map(|id| {
            let w = u64::from(weight(id).max(1));
            let n = if total <= room {
                w
            } else {
                (w * room / total).max(1)
            };
            (*id, n)
        })
        .collect();
    while counts.iter().map(|c| c.1).sum::<u64>() > room {
        if let Some(max) = counts.iter_mut().max_by_key(|c| c.1) {
            max.1 -= 1;
        }
    }
    let mut slots = Vec::new();
    let rounds = counts.iter().map(|c| c.1).max().unwrap_or(0);
    for round in 0..rounds {
        for (id, n) in &counts {
            if round < *n {
                slots.push(*id);
            }
        }
    }
    slots
}

/// The addresses (IPv4 and IPv6) an instance's service IPs give it.
fn carried(sips: &[ServiceIp]) -> BTreeSet<IpAddr> {
    sips.iter()
        .flat_map(|s| std::iter::once(IpAddr::V4(s.address)).chain(s.address_v6.map(IpAddr::V6)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::overlay::model::ServiceIp;

    fn record(
        job: &str,
        number: u32,
        ns: [u8; 4],
        local: bool,
        sips: &[(IpType, [u8; 4])],
    ) -> InstanceRecord {
        InstanceRecord {
            job: job.into(),
            number,
            ns_addr: ns.into(),
            ns_addr_v6: None,
            placement: if local {
                Placement::Local {
                    host_ifname: "tmo1".into(),
                    host_ifindex: 7,
                    host_mac: [2, 0, 0, 0, 0, 1],
                    mac: [2, 0, 0, 0, 0, 2],
                }
            } else {
                Placement::Remote {
                    node: [198, 51, 100, 2].into(),
                    port: 50103,
                }
            },
            service_ips: sips
                .iter()
                .map(|(t, a)| ServiceIp {
                    ip_type: *t,
                    address: (*a).into(),
                    address_v6: None,
                    weight: 0,
                })
                .collect(),
            weight: 1,
        }
    }

    fn settings() -> Settings {
        Settings {
            tunnel_mtu: 1472,
            gateway: [192, 0, 2, 1].into(),
            service_prefix: ([203, 0, 113, 0].into(), 24),
            gateway_v6: Some("2001:db8:1::1".parse().unwrap()),
            service_prefix_v6: Some(("2001:db8:ff::".parse().unwrap(), 48)),
            instance_entries: tapmesh_common::overlay::MAX_INSTANCES,
        }
    }

    #[test]
    fn instances_get_ids_below_the_configured_entries() {
        let a = record("app.ns.web.ns", 0, [192, 0, 2, 2], true, &[]);
        let b = record("app.ns.web.ns", 1, [192, 0, 2, 66], false, &[]);
        let small = |entries| Settings {
            instance_entries: entries,
            ..settings()
        };
        let mut ids = Ids::default();
        assert_eq!(
            ids.compile(&[&a, &b], &small(1), &|_| 0).unwrap_err(),
            ModelError::TooManyInstances(1)
        );
        // Ids kept from larger maps are given new ones that fit.
        let mut ids = Ids::default();
        ids.compile(&[&a, &b], &small(16), &|_| 0).unwrap();
        assert_eq!(ids.instance_id(&b.job, 1), Some(1));
        // a goes (its id cools down for one compile), then the maps shrink.
        ids.compile(&[&b], &small(16), &|_| 0).unwrap();
        ids.compile(&[&b], &small(1), &|_| 0).unwrap();
        assert_eq!(ids.instance_id(&b.job, 1), Some(0), "reassigned below 1");
    }

    #[test]
    fn rr_closest_and_instance_ips_compile_to_slots() {
        let rr = [203, 0, 113, 10];
        let a = record(
            "app.ns.web.ns",
            0,
            [192, 0, 2, 2],
            true,
            &[
                (IpType::RoundRobin, rr),
                (IpType::InstanceNumber, [203, 0, 113, 20]),
                (IpType::Closest, [203, 0, 113, 11]),
            ],
        );
        let b = record(
            "app.ns.web.ns",
            1,
            [192, 0, 2, 66],
            false,
            &[
                (IpType::RoundRobin, rr),
                (IpType::InstanceNumber, [203, 0, 113, 21]),
                (IpType::Closest, [203, 0, 113, 11]),
            ],
        );
        let mut ids = Ids::default();
        let cost = |r: &InstanceRecord| if r.is_local() { 0 } else { 100 };
        // The remote one first, so that only cost puts the local one first.
        let t = ids.compile(&[&b, &a], &settings(), &cost).unwrap();
        let (ia, ib) = (
            ids.instance_id(&a.job, 0).unwrap(),
            ids.instance_id(&b.job, 1).unwrap(),
        );
        assert_eq!(t.services[&rr.into()].slots, vec![ib, ia]);
        assert_eq!(
            t.services[&Ipv4Addr::from([203, 0, 113, 11])].slots,
            vec![ia, ib]
        );
        assert_eq!(
            t.services[&Ipv4Addr::from([203, 0, 113, 20])].slots,
            vec![ia]
        );
        assert_eq!(t.instances[&ia].kind, INSTANCE_LOCAL);
        assert_eq!(t.instances[&ib].node_port, 50103);
        assert_eq!(
            t.locals[&Ipv4Addr::from([192, 0, 2, 2])].instance_addr,
            addr_word([203, 0, 113, 20].into())
        );
        assert_eq!(t.config.service_mask, addr_word([255, 255, 255, 0].into()));

        // Unchanged: same generations; the local one gone: the remote one
        // keeps its id and generation, the freed slot is not in the tables.
        let g = t.instances[&ib].generation;
        let t2 = ids.compile(&[&b], &settings(), &cost).unwrap();
        assert_eq!(t2.instances[&ib].generation, g);
        assert!(!t2.instances.contains_key(&ia));
        assert_eq!(
            t2.services[&Ipv4Addr::from([203, 0, 113, 11])].slots,
            vec![ib]
        );
        // Another set of service IPs on the same instance: a new generation.
        let mut b2 = b.clone();
        b2.service_ips.pop();
        let t4 = ids.compile(&[&b2], &settings(), &cost).unwrap();
        assert!(t4.instances[&ib].generation > g);
        // Back to the first set, reordered, reweighted: nothing it carried
        // is gone, so its flows stay.
        let t2 = ids.compile(&[&b], &settings(), &cost).unwrap();
        assert_eq!(t2.instances[&ib].generation, t4.instances[&ib].generation);
        let mut b3 = b.clone();
        b3.service_ips.reverse();
        b3.service_ips[0].weight = 7;
        let t5 = ids.compile(&[&b3], &settings(), &cost).unwrap();
        assert_eq!(t5.instances[&ib].generation, t4.instances[&ib].generation);
        // A new instance reusing the slot starts a newer generation.
        let c = record("app.ns.db.ns", 0, [192, 0, 2, 3], true, &[]);
        let t3 = ids.compile(&[&b, &c], &settings(), &cost).unwrap();
        assert_eq!(ids.instance_id(&c.job, 0), Some(ia));
        assert!(t3.instances[&ia].generation > t.instances[&ia].generation);
    }

    #[test]
    fn weights_become_interleaved_slots_within_the_limit() {
        let slots = weighted_slots(&[1, 2], |id| if *id == 1 { 3 } else { 1 });
        assert_eq!(slots, vec![1, 2, 1, 1]);
        let slots = weighted_slots(&[1, 2], |id| if *id == 1 { 1000 } else { 1 });
        assert_eq!(slots.len(), SERVICE_SLOTS as usize);
        assert_eq!(slots.iter().filter(|s| **s == 2).count(), 1);
    }

    #[test]
    fn ipv6_service_ips_are_services_of_their_own_over_the_instances_with_ipv6() {
        let v6 = |t: &str| -> Ipv6Addr { t.parse().unwrap() };
        let mut a = record(
            "app.ns.web.ns",
            0,
            [192, 0, 2, 2],
            true,
            &[
                (IpType::RoundRobin, [203, 0, 113, 10]),
                (IpType::InstanceNumber, [203, 0, 113, 20]),
            ],
        );
        a.ns_addr_v6 = Some(v6("2001:db8:1::2"));
        a.service_ips[0].address_v6 = Some(v6("2001:db8:ff::10"));
        a.service_ips[1].address_v6 = Some(v6("2001:db8:ff::20"));
        let b = record(
            "app.ns.web.ns",
            1,
            [192, 0, 2, 66],
            false,
            &[(IpType::RoundRobin, [203, 0, 113, 10])],
        );
        let mut ids = Ids::default();
        let t = ids.compile(&[&a, &b], &settings(), &|_| 0).unwrap();
        let ia = ids.instance_id(&a.job, 0).unwrap();
        assert_eq!(t.services6.len(), 2);
        let rr = &t.services[&Ipv4Addr::new(203, 0, 113, 10)];
        let rr6 = &t.services6[&v6("2001:db8:ff::10")];
        assert_eq!(rr.slots.len(), 2, "both instances over IPv4");
        assert_eq!(rr6.slots, vec![ia], "only a has IPv6");
        assert_eq!(rr6.policy, rr.policy);
        assert_ne!(rr6.id, rr.id, "its own slot row, RR turn and counters");
        assert_eq!(ids.service_id(v6("2001:db8:ff::10").into()), Some(rr6.id));
        assert_eq!(t.instances6.len(), 1, "only a has IPv6");
        assert_eq!(
            t.instances6[&ia],
            Instance6 {
                ns_addr: addr6_words(v6("2001:db8:1::2")),
                reply_addr: addr6_words(v6("2001:db8:ff::20")),
            }
        );
        let local = t.locals6[&v6("2001:db8:1::2")];
        assert_eq!(local.instance_addr, addr6_words(v6("2001:db8:ff::20")));
        assert_eq!(local.ifindex, 7);
        assert_eq!(t.config6.service_prefix, addr6_words(v6("2001:db8:ff::")));
        assert_eq!(t.config6.service_mask, addr6_words(v6("ffff:ffff:ffff::")));
        assert_eq!(t.config6.gateway, addr6_words(v6("2001:db8:1::1")));
        assert_eq!(t.config6.flags, 0);
        // A new IPv6 address is a new entry: a new generation.
        let g = t.instances[&ia].generation;
        a.ns_addr_v6 = Some(v6("2001:db8:1::3"));
        let t = ids.compile(&[&a, &b], &settings(), &|_| 0).unwrap();
        assert_ne!(t.instances[&ia].generation, g);
    }

    #[test]
    fn an_id_freed_by_a_compile_is_not_reused_by_it() {
        let a = record(
            "app.ns.a.ns",
            0,
            [192, 0, 2, 2],
            true,
            &[(IpType::RoundRobin, [203, 0, 113, 10])],
        );
        let b = record(
            "app.ns.b.ns",
            0,
            [192, 0, 2, 3],
            true,
            &[(IpType::RoundRobin, [203, 0, 113, 11])],
        );
        let mut ids = Ids::default();
        let t = ids.compile(&[&a], &settings(), &|_| 0).unwrap();
        let (ia, sa) = (
            ids.instance_id(&a.job, 0).unwrap(),
            t.services[&Ipv4Addr::new(203, 0, 113, 10)].id,
        );
        // a goes and b comes in one compile: b takes other ids.
        let t = ids.compile(&[&b], &settings(), &|_| 0).unwrap();
        let ib = ids.instance_id(&b.job, 0).unwrap();
        assert_ne!(ib, ia);
        assert_ne!(t.services[&Ipv4Addr::new(203, 0, 113, 11)].id, sa);
        // One compile later the freed ids are free again.
        let t = ids.compile(&[&b, &a], &settings(), &|_| 0).unwrap();
        assert_eq!(ids.instance_id(&a.job, 0), Some(ia));
        assert_eq!(t.services[&Ipv4Addr::new(203, 0, 113, 10)].id, sa);
    }

    #[test]
    fn saved_ids_give_the_same_ids_and_generations_after_a_restart() {
        let a = record(
            "app.ns.a.ns",
            0,
            [192, 0, 2, 2],
            true,
            &[(IpType::RoundRobin, [203, 0, 113, 10])],
        );
        let b = record(
            "app.ns.b.ns",
            0,
            [192, 0, 2, 3],
            false,
            &[(IpType::RoundRobin, [203, 0, 113, 10])],
        );
        let mut ids = Ids::default();
        // b first, then a: ids a fresh start would hand out the other way round.
        ids.compile(&[&b], &settings(), &|_| 0).unwrap();
        let mut b2 = b.clone();
        b2.service_ips[0].address = [203, 0, 113, 12].into(); // one gone: a new generation
        ids.compile(&[&b2], &settings(), &|_| 0).unwrap();
        let before = ids.compile(&[&a, &b2], &settings(), &|_| 0).unwrap();
        let saved = ids.saved();
        let json = serde_json::to_string(&saved).unwrap();
        let mut restored = Ids::restore(serde_json::from_str(&json).unwrap());
        let after = restored.compile(&[&a, &b2], &settings(), &|_| 0).unwrap();
        assert_eq!(
            after.instances, before.instances,
            "same ids, same generations"
        );
        assert_eq!(after.services, before.services);
        // Later changes count on from there.
        let again = restored.compile(&[&a], &settings(), &|_| 0).unwrap();
        let ia = restored.instance_id(&a.job, 0).unwrap();
        assert_eq!(
            again.instances[&ia].generation,
            before.instances[&ia].generation
        );

        // Restored, b is gone and c comes: c may get b's id, but not its
        // generation (b's kept flows would go to c).
        let c = record("app.ns.c.ns", 0, [192, 0, 2, 4], false, &[]);
        let mut restored = Ids::restore(serde_json::from_str(&json).unwrap());
        let ib = restored.instance_id(&b.job, 0).unwrap();
        let after = restored.compile(&[&a, &c], &settings(), &|_| 0).unwrap();
        let ic = restored.instance_id(&c.job, 0).unwrap();
        assert_eq!(ic, ib, "the lowest free id");
        assert_ne!(
            after.instances[&ic].generation,
            before.instances[&ib].generation
        );
        assert_eq!(after.instances[&ia], before.instances[&ia], "a as it was");
    }
}
