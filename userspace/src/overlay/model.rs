//! What the NetManager knows: instances (local deployments and other nodes'
//! table entries) and the service IPs they carry, with the ids they keep
//! across compiles; `tables.rs` compiles them into map entries.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use tapmesh_common::overlay::{Instance, POLICY_CLOSEST, POLICY_INSTANCE, POLICY_ROUND_ROBIN};

/// How a service IP picks among the instances carrying it.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum IpType {
    RoundRobin,
    Closest,
    InstanceNumber,
}

impl IpType {
    /// Oakestra's spellings: "RR", "Closest", "InstanceNumber" / "instance_ip".
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "RR" | "RoundRobin" => Some(IpType::RoundRobin),
            "Closest" => Some(IpType::Closest),
            "InstanceNumber" | "instance_ip" => Some(IpType::InstanceNumber),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            IpType::RoundRobin => "RR",
            IpType::Closest => "Closest",
            IpType::InstanceNumber => "InstanceNumber",
        }
    }

    pub(super) fn policy(self) -> u8 {
        match self {
            IpType::RoundRobin => POLICY_ROUND_ROBIN,
            IpType::Closest => POLICY_CLOSEST,
            IpType::InstanceNumber => POLICY_INSTANCE,
        }
    }
}

/// One service IP an instance carries.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ServiceIp {
    pub ip_type: IpType,
    pub address: Ipv4Addr,
    pub address_v6: Option<Ipv6Addr>,
    /// Round-robin share through this address; 0: the instance's weight.
    pub weight: u32,
}

/// Where an instance runs.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Placement {
    /// On this node, behind its host-side veth.
    Local {
        host_ifname: String,
        host_ifindex: u32,
        host_mac: [u8; 6],
        mac: [u8; 6],
    },
    /// On another node, through the tunnel.
    Remote { node: Ipv4Addr, port: u16 },
}

/// An instance of a job ("app.appns.service.servicens", instance number).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InstanceRecord {
    pub job: String,
    pub number: u32,
    pub ns_addr: Ipv4Addr,
    pub ns_addr_v6: Option<Ipv6Addr>,
    pub placement: Placement,
    pub service_ips: Vec<ServiceIp>,
    /// Share of round-robin turns (1 = one slot).
    pub weight: u32,
}

impl InstanceRecord {
    /// Its instance IP (the InstanceNumber service IP), if it has one.
    pub fn instance_ip(&self) -> Option<Ipv4Addr> {
        self.service_ips
            .iter()
            .find(|s| s.ip_type == IpType::InstanceNumber)
            .map(|s| s.address)
    }

    /// Its IPv6 instance IP, if it has one.
    pub fn instance_ip_v6(&self) -> Option<Ipv6Addr> {
        self.service_ips
            .iter()
            .find(|s| s.ip_type == IpType::InstanceNumber)
            .and_then(|s| s.address_v6)
    }

    pub fn is_local(&self) -> bool {
        matches!(self.placement, Placement::Local { .. })
    }
}

/// Stable ids for instances and services across compiles, and the
/// generation of each instance slot.
#[derive(Clone, Default)]
pub struct Ids {
    pub(super) instances: BTreeMap<(String, u32), u32>,
    /// IPv4 and IPv6 service IPs share one id space (slot rows, RR turns, counters).
    pub(super) services: BTreeMap<IpAddr, u32>,
    pub(super) generations: BTreeMap<u32, u32>,
    /// Each instance as last compiled (generation 0) with the addresses
    /// its service IPs give it and its IPv6 address.
    pub(super) last: BTreeMap<u32, (Instance, BTreeSet<IpAddr>, Option<Ipv6Addr>)>,
    /// Ids in use at the last compile: an id freed now is not handed out
    /// again before the writer has emptied it (no packet sees a new
    /// instance or service under an old one's id).
    pub(super) cooling_instances: BTreeSet<u32>,
    pub(super) cooling_services: BTreeSet<u32>,
    /// Instances restored from a saved state keep their generation at the
    /// first compile (flows in kept conntrack maps stay bound), if they keep
    /// their id: another instance given a restored id starts a new one.
    pub(super) restored: BTreeMap<(String, u32), u32>,
}

/// What of [`Ids`] a restart keeps.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedIds {
    pub instances: Vec<(String, u32, u32)>,
    pub services: Vec<(IpAddr, u32)>,
    pub generations: Vec<(u32, u32)>,
}

pub(super) fn lowest_free(
    used: &BTreeSet<u32>,
    cooling: &BTreeSet<u32>,
    limit: u32,
) -> Option<u32> {
    (0..limit).find(|i| !used.contains(i) && !cooling.contains(i))
}

/// Why the tables could not be compiled.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ModelError {
    #[error("no room for more than {0} instances (dataplane.instance_entries)")]
    TooManyInstances(u32),
    #[error("no room for more than {0} service IPs")]
    TooManyServices(u32),
}

/// The settings the compiled tables carry.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    pub tunnel_mtu: u16,
    pub gateway: Ipv4Addr,
    pub service_prefix: (Ipv4Addr, u8),
    /// The containers' IPv6 gateway (the source of "packet too big").
    pub gateway_v6: Option<Ipv6Addr>,
    pub service_prefix_v6: Option<(Ipv6Addr, u8)>,
    /// Entries of the instance maps (`dataplane.instance_entries`).
    pub instance_entries: u32,
}

impl Ids {
    /// The id of a service IP (for counters).
    pub fn service_id(&self, addr: IpAddr) -> Option<u32> {
        self.services.get(&addr).copied()
    }

    pub fn saved(&self) -> SavedIds {
        SavedIds {
            instances: self
                .instances
                .iter()
                .map(|((job, number), id)| (job.clone(), *number, *id))
                .collect(),
            services: self.services.iter().map(|(a, id)| (*a, *id)).collect(),
            generations: self.generations.iter().map(|(id, g)| (*id, *g)).collect(),
        }
    }

    /// Ids as a saved state left them: the same instances and service IPs
    /// get the same ids, and generations go on from where they were.
    pub fn restore(saved: SavedIds) -> Self {
        let instances: BTreeMap<(String, u32), u32> = saved
            .instances
            .into_iter()
            .map(|(job, number, id)| ((job, number), id))
            .collect();
        Self {
            restored: instances.clone(),
            instances,
            services: saved.services.into_iter().collect(),
            generations: saved.generations.into_iter().collect(),
            ..Self::default()
        }
    }

    pub fn instance_id(&self, job: &str, number: u32) -> Option<u32> {
        self.instances.get(&(job.to_string(), number)).copied()
    }
}
