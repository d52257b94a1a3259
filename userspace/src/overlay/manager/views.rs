//! What the NetManager shows: `tapmesh status` and the catalog's listing.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use serde::Serialize;

use super::{NetManager, Registration};
use crate::overlay::model::{IpType, Placement};

/// A service IP as `tapmesh catalog list` shows it.
#[derive(Clone, Debug)]
pub struct ListedService {
    pub address: Ipv4Addr,
    pub ip_type: IpType,
    /// From the catalog's feed (EDS) rather than deployments and tables.
    pub fed: bool,
    pub members: Vec<ListedMember>,
}

#[derive(Clone, Debug)]
pub struct ListedMember {
    pub ns_addr: Ipv4Addr,
    pub weight: u32,
    /// "local (tmo…)" or "node:port"; for a fed member no instance has: why.
    pub location: String,
    pub known: bool,
}

/// One line of `tapmesh status` per service IP and instance.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Snapshot {
    pub registration: Option<Registration>,
    pub instances: Vec<InstanceView>,
    pub services: Vec<ServiceView>,
    pub unresolved: Vec<String>,
    pub misses: u64,
    /// Packets to unknown service IPs kept for the cluster's answer.
    pub held: HeldView,
}

/// What became of the packets held for unknown service IPs.
#[derive(Clone, Debug, Default, Serialize)]
pub struct HeldView {
    /// Waiting now.
    pub waiting: usize,
    pub kept: u64,
    /// Sent again once their address was known.
    pub sent: u64,
    /// Not kept (no room) or never named in time.
    pub dropped: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct InstanceView {
    pub job: String,
    pub number: u32,
    pub ns_address: String,
    pub location: String,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ServiceView {
    pub address: String,
    pub ip_type: String,
    pub instances: usize,
    pub packets: u64,
    pub bytes: u64,
}

impl NetManager {
    /// Service IPs with their members, for the catalog's listing.
    pub async fn listing(&self) -> Vec<ListedService> {
        let state = self.state.lock().await;
        let records = self.records(&state);
        let mut out: BTreeMap<Ipv4Addr, ListedService> = BTreeMap::new();
        for r in &records {
            for sip in &r.service_ips {
                let entry = out.entry(sip.address).or_insert_with(|| ListedService {
                    address: sip.address,
                    ip_type: sip.ip_type,
                    fed: state.feed.contains_key(&sip.address),
                    members: Vec::new(),
                });
                entry.members.push(ListedMember {
                    ns_addr: r.ns_addr,
                    weight: if sip.weight == 0 {
                        r.weight
                    } else {
                        sip.weight
                    },
                    location: match &r.placement {
                        // The namespace deleted under a deployed container
                    // takes the veth with it; until it is undeployed.
                    Placement::Local {
                        host_ifname,
                        host_ifindex,
                        ..
                    } if crate::net::link::name(*host_ifindex).as_ref() != Some(host_ifname) => {
                        format!("local ({host_ifname} is gone: was its namespace deleted? undeploy it)")
                    }
                    Placement::Local { host_ifname, .. } => format!("local ({host_ifname})"),
                        Placement::Remote { node, port } => format!("{node}:{port}"),
                    },
                    known: true,
                });
            }
        }
        for (sip, members) in &state.feed {
            let entry = out.entry(*sip).or_insert_with(|| ListedService {
                address: *sip,
                ip_type: IpType::RoundRobin,
                fed: true,
                members: Vec::new(),
            });
            for (addr, weight) in members {
                if !records.iter().any(|r| r.ns_addr == *addr) {
                    entry.members.push(ListedMember {
                        ns_addr: *addr,
                        weight: *weight,
                        location: "no deployed or known instance has this address".into(),
                        known: false,
                    });
                }
            }
        }
        out.into_values().collect()
    }

    pub async fn snapshot(&self) -> Snapshot {
        let (services, instances) = self.dataplane.overlay_counters().await.unwrap_or_default();
        let state = self.state.lock().await;
        let mut snap = Snapshot {
            registration: state.registration.clone(),
            misses: state.misses,
            unresolved: state.unresolved.keys().map(|a| a.to_string()).collect(),
            held: self.held_view(),
            ..Default::default()
        };
        let owned = self.records(&state);
        let records = owned.iter();
        let mut by_service: BTreeMap<IpAddr, (IpType, usize)> = BTreeMap::new();
        for r in records {
            let Some(id) = state.ids.instance_id(&r.job, r.number) else {
                continue;
            };
            let c = instances.get(&id).copied().unwrap_or_default();
            snap.instances.push(InstanceView {
                job: r.job.clone(),
                number: r.number,
                ns_address: r.ns_addr.to_string(),
                location: match &r.placement {
                    // The namespace deleted under a deployed container
                    // takes the veth with it; until it is undeployed.
                    Placement::Local {
                        host_ifname,
                        host_ifindex,
                        ..
                    } if crate::net::link::name(*host_ifindex).as_ref() != Some(host_ifname) => {
                        format!(
                            "local ({host_ifname} is gone: was its namespace deleted? undeploy it)"
                        )
                    }
                    Placement::Local { host_ifname, .. } => format!("local ({host_ifname})"),
                    Placement::Remote { node, port } => format!("{node}:{port}"),
                },
                packets: c.packets,
                bytes: c.bytes,
            });
            for s in &r.service_ips {
                by_service
                    .entry(IpAddr::V4(s.address))
                    .or_insert((s.ip_type, 0))
                    .1 += 1;
                if let Some(v6) = s.address_v6.filter(|_| r.ns_addr_v6.is_some()) {
                    by_service.entry(IpAddr::V6(v6)).or_insert((s.ip_type, 0)).1 += 1;
                }
            }
        }
        for (addr, (ip_type, n)) in by_service {
            let c = state
                .ids
                .service_id(addr)
                .and_then(|id| services.get(&id).copied())
                .unwrap_or_default();
            snap.services.push(ServiceView {
                address: addr.to_string(),
                ip_type: ip_type.name().into(),
                instances: n,
                packets: c.packets,
                bytes: c.bytes,
            });
        }
        snap
    }
}
