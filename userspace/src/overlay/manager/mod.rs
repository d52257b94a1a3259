//! The NetManager's state and operations: registration, deploy and
//! undeploy of containers, other nodes' table entries, misses. Every
//! operation either completes or leaves nothing behind. Here: the state and
//! how it becomes map entries; the operations, container links, nftables
//! port mappings, the state file and the views live in the files below.

mod claims;
mod egress;
mod holding;
mod links;
mod ops;
mod persist;
mod ports;
pub mod unikernel;
mod views;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use super::cluster::{AddressChange, Cluster};
use super::ipam::{Ipam, IpamError, Lease};
use super::model::{Ids, InstanceRecord, IpType, ModelError, Placement, ServiceIp, Settings};
use super::ports::PortMapping;
use crate::dataplane::DataplaneHandle;
use crate::net::{netns::NetnsId, NetError, Prefix};

pub use ops::{DeploySpec, Deployed, NetnsRef, RemoteSpec};
pub use views::{InstanceView, ListedMember, ListedService, ServiceView, Snapshot};

#[derive(Debug, thiserror::Error)]
pub enum NmError {
    #[error("not registered: POST /register first")]
    NotRegistered,
    #[error("already registered as {0:?}; a node registers once")]
    AlreadyRegistered(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NoNamespace(String),
    /// A netns path that is not a network namespace.
    #[error("{0}")]
    NotANamespace(String),
    /// The daemon's own or the initial network namespace: never a container.
    #[error("{0}")]
    HostNamespace(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0} is not deployed on this node")]
    NotDeployed(String),
    #[error("no subnet yet: the cluster has not answered the subnet request (is its MQTT broker reachable?)")]
    NoSubnet,
    #[error("no subnet yet: the cluster's answer was refused ({0})")]
    SubnetRefused(String),
    #[error(transparent)]
    Ipam(#[from] IpamError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("container networking: {0}")]
    Network(#[from] NetError),
    #[error("dataplane: {0}")]
    Dataplane(#[from] crate::dataplane::DataplaneError),
    #[error("{0}")]
    Ports(String),
    /// Masquerade or forwarding for container egress could not be set.
    #[error("{0}")]
    Egress(String),
}

/// Settings fixed at start (the node's address is the dataplane's tunnel
/// endpoint, which may move: [`NetManager::address_moved`]).
#[derive(Clone, Debug)]
pub struct ManagerSettings {
    pub container_ifname: String,
    pub mtu: u32,
    pub service_prefix: (Ipv4Addr, u8),
    pub service_prefix_v6: (std::net::Ipv6Addr, u8),
    pub subnetwork: Option<Prefix>,
    pub subnetwork_v6: Option<Prefix>,
    pub node_costs: BTreeMap<Ipv4Addr, u32>,
    pub default_node_cost: u32,
    /// The registration, deployments and other nodes' tables are kept here
    /// across restarts.
    pub state_file: Option<std::path::PathBuf>,
    /// Leave containers' links and port mappings in place at stop
    /// (`dataplane.keep_dataplane`): they keep working while the daemon is down.
    pub keep_links: bool,
    /// Oakestra mode: the cluster service manager (MQTT) assigns the subnet
    /// and the tables.
    pub oakestra: bool,
    /// The broker as "host:port"; else the registration's cluster_address
    /// and `mqtt_port`.
    pub mqtt_broker: Option<String>,
    pub mqtt_port: u16,
    /// The tunnel port other nodes send to (`host_port` in notices).
    pub node_port: u16,
    /// Masquerade the containers' subnet and turn IPv4 forwarding on while
    /// containers are deployed (Oakestra mode's default).
    pub masquerade: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Registration {
    pub client_id: String,
    pub cluster_address: String,
    pub subnetwork: String,
    pub subnetwork_v6: Option<String>,
}

struct LocalDeployment {
    record: InstanceRecord,
    lease: Lease,
    netns: String,
    /// The namespace `netns` named at deploy, to recognise it at a restart.
    netns_id: Option<NetnsId>,
    ports: Vec<PortMapping>,
    /// The namespace was made here (a unikernel's): undeploy deletes it.
    made_netns: bool,
}

impl LocalDeployment {
    /// Its host-side veth still exists under the index it was made with.
    fn link_alive(&self) -> bool {
        match &self.record.placement {
            Placement::Local {
                host_ifname,
                host_ifindex,
                ..
            } => crate::net::link::index(host_ifname) == Some(*host_ifindex),
            Placement::Remote { .. } => false,
        }
    }
}

#[derive(Default)]
struct State {
    registration: Option<Registration>,
    /// The node's address the cluster was last told for this node's
    /// instances (deploy notices, address reports); kept in the state file.
    announced_at: Option<Ipv4Addr>,
    ipam: Option<Ipam>,
    local: BTreeMap<(String, u32), LocalDeployment>,
    remote: BTreeMap<String, Vec<InstanceRecord>>,
    ids: Ids,
    /// Service IPs the kernel reported unknown → (how many reports, when
    /// the last came).
    unresolved: BTreeMap<std::net::IpAddr, (u64, std::time::Instant)>,
    misses: u64,
    /// Remote job → how many times its addresses were seen arriving
    /// through the tunnel ([`NetManager::job_usage`]).
    arrivals: BTreeMap<String, u64>,
    /// The nftables table of port mappings exists.
    ports_written: bool,
    /// The egress set-up is in place.
    egress: Option<egress::EgressHeld>,
    /// Service IPs whose members the catalog names (EDS).
    feed: Feed,
    /// Why the cluster's last subnet was refused (none taken yet).
    subnet_refused: Option<String>,
    /// Subnet answers refused so far (a registration waits for the next).
    subnet_refusals: u64,
    /// Deployments of the state file whose namespace was gone at start:
    /// the cluster is told once connected, as for a veth that died live.
    gone_at_start: Vec<(String, u32, Ipv4Addr, Option<std::net::Ipv6Addr>)>,
}

/// Service IPs fed by the catalog: service IP → member instances (by
/// namespace address) → weight.
pub type Feed = BTreeMap<Ipv4Addr, BTreeMap<Ipv4Addr, u32>>;

pub struct NetManager {
    dataplane: DataplaneHandle,
    settings: ManagerSettings,
    state: Mutex<State>,
    /// The MQTT side (Oakestra mode, from registration on).
    cluster: std::sync::Mutex<Option<std::sync::Arc<Cluster>>>,
    /// Packets to unknown service IPs, waiting for the cluster's table.
    held: std::sync::Arc<std::sync::Mutex<crate::overlay::held::HeldPackets>>,
}

impl NetManager {
    /// Oakestra mode (`netmanager.oakestra`).
    pub fn oakestra(&self) -> bool {
        self.settings.oakestra
    }

    pub fn new(dataplane: DataplaneHandle, settings: ManagerSettings) -> Self {
        Self {
            dataplane,
            settings,
            state: Mutex::new(State::default()),
            cluster: std::sync::Mutex::new(None),
            held: Default::default(),
        }
    }

    /// Where other nodes reach this one (`host_ip`), as of now.
    pub fn node_addr(&self) -> Option<Ipv4Addr> {
        self.dataplane.tunnel().address
    }

    /// The node's tunnel address moved: the tables are compiled again (the
    /// cluster's echo of our own instances is told apart by the address)
    /// and, in Oakestra mode, every local instance is reported at the new
    /// address (`service/address-changed`, one message each, as Oakestra's
    /// NetManager does), so the cluster tells the nodes that follow them.
    pub async fn address_moved(&self) {
        let mut state = self.state.lock().await;
        if let Err(e) = self.apply_locked(&mut state).await {
            tracing::warn!("netmanager: tables after the address moved: {e}");
        }
        let local: Vec<(String, u32)> = state.local.keys().cloned().collect();
        drop(state);
        let Some(c) = self.cluster() else { return };
        // No address, nothing to tell: the cluster would hand out "".
        let Some(address) = self.node_addr() else {
            return;
        };
        let host_ip = address.to_string();
        tracing::info!(%host_ip, instances = local.len(), "netmanager: reporting the node's new address");
        let connected = c.reconnect().await;
        for (job, number) in local {
            c.address_changed(AddressChange {
                appname: job,
                status: "",
                instance_number: number,
                nsip: "",
                nsipv6: "",
                host_port: self.settings.node_port.to_string(),
                host_ip: host_ip.clone(),
            })
            .await;
        }
        // Saved as told only once a connection took the reports: a daemon
        // stopped before that reports again at its next start.
        if connected {
            let mut state = self.state.lock().await;
            state.announced_at = Some(address);
            self.persist(&state);
        }
    }

    fn settings_for(&self, state: &State) -> Settings {
        Settings {
            tunnel_mtu: self.settings.mtu.min(u32::from(u16::MAX)) as u16,
            gateway: state
                .ipam
                .as_ref()
                .map(|i| i.gateway())
                .unwrap_or(Ipv4Addr::UNSPECIFIED),
            service_prefix: self.settings.service_prefix,
            gateway_v6: state.ipam.as_ref().and_then(|i| i.gateway_v6()),
            service_prefix_v6: Some(self.settings.service_prefix_v6),
            instance_entries: self.dataplane.instance_entries(),
        }
    }

    /// Every instance this node routes to: local deployments (with the
    /// service IPs the cluster's table gives them), then other nodes' (own
    /// deployments echoed by the cluster are skipped), each with the service
    /// IPs the catalog's feed gives it.
    fn records(&self, state: &State) -> Vec<InstanceRecord> {
        self.placed(state)
            .into_iter()
            .map(|mut r| {
                for (sip, members) in &state.feed {
                    if let Some(&weight) = members.get(&r.ns_addr) {
                        r.service_ips.push(ServiceIp {
                            ip_type: IpType::RoundRobin,
                            address: *sip,
                            address_v6: None,
                            weight: weight.max(1),
                        });
                    }
                }
                r
            })
            .collect()
    }

    /// Every claim on an address: the placed instances and the other
    /// nodes' entries a local deployment of the same instance hides, which
    /// come into force when it is undeployed.
    fn claimants(&self, state: &State) -> Vec<InstanceRecord> {
        let local_node = self.node_addr();
        let mut all = self.placed(state);
        all.extend(
            state
                .remote
                .values()
                .flatten()
                .filter(|r| {
                    state.local.contains_key(&(r.job.clone(), r.number))
                        && !matches!(r.placement, Placement::Remote { node, .. } if Some(node) == local_node)
                })
                .cloned(),
        );
        all
    }

    /// Why an address of `r` cannot be what it says on this node: a service
    /// IP in the container subnets or the node's address; for an instance
    /// placed `elsewhere`, a namespace address there too.
    fn reserved(&self, state: &State, r: &InstanceRecord, elsewhere: bool) -> Option<String> {
        use std::net::IpAddr;
        let node = self.node_addr().map(IpAddr::V4);
        let subnets: Vec<Prefix> = state
            .ipam
            .iter()
            .flat_map(|i| [Some(i.subnet()), i.subnet_v6()])
            .flatten()
            .collect();
        let why = |addr: IpAddr| {
            if Some(addr) == node {
                return Some("is this node's address".to_string());
            }
            subnets
                .iter()
                .find(|p| p.contains(addr))
                .map(|p| format!("is in this node's container subnet {}", p.network()))
        };
        let sips = r
            .service_ips
            .iter()
            .flat_map(|s| [Some(IpAddr::V4(s.address)), s.address_v6.map(IpAddr::V6)]);
        for addr in sips.flatten() {
            if let Some(why) = why(addr) {
                return Some(format!(
                    "service IP {addr} of {} instance {} {why}",
                    r.job, r.number
                ));
            }
        }
        if elsewhere {
            let own = [Some(IpAddr::V4(r.ns_addr)), r.ns_addr_v6.map(IpAddr::V6)];
            for addr in own.into_iter().flatten() {
                if let Some(why) = why(addr) {
                    return Some(format!(
                        "namespace_ip {addr} of {} instance {} {why}",
                        r.job, r.number
                    ));
                }
            }
        }
        None
    }

    /// [`Self::records`] without the catalog's feed: what deploys and
    /// tables claim.
    fn placed(&self, state: &State) -> Vec<InstanceRecord> {
        let local_node = self.node_addr();
        let locals: Vec<InstanceRecord> = state
            .local
            .values()
            .map(|d| {
                let mut r = d.record.clone();
                let listed = state
                    .remote
                    .get(&r.job)
                    .and_then(|list| list.iter().find(|t| t.number == r.number));
                with_listed(
                    &mut r,
                    listed.map(|t| t.service_ips.as_slice()).unwrap_or(&[]),
                );
                r
            })
            .collect();
        locals
            .iter()
            .chain(state.remote.values().flatten().filter(|r| {
                !matches!(r.placement, Placement::Remote { node, .. } if Some(node) == local_node)
                    && !state.local.contains_key(&(r.job.clone(), r.number))
            }))
            .cloned()
            .collect()
    }

    /// An instance's cost for Closest: 0 here, else its node's
    /// (`netmanager.node_costs`, or `default_node_cost`).
    fn cost_of(&self, r: &InstanceRecord) -> u32 {
        match r.placement {
            Placement::Local { .. } => 0,
            Placement::Remote { node, .. } => self
                .settings
                .node_costs
                .get(&node)
                .copied()
                .unwrap_or(self.settings.default_node_cost),
        }
    }

    /// Compiles the state and writes it; on failure the maps keep what they had.
    async fn apply_locked(&self, state: &mut State) -> Result<(), NmError> {
        let settings = self.settings_for(state);
        let owned = self.records(state);
        let records: Vec<&InstanceRecord> = owned.iter().collect();
        let tables = state
            .ids
            .compile(&records, &settings, &|r| self.cost_of(r))?;
        // New nodes get their neighbour entry before packets go their way;
        // after the write, the `lb` plugin's follower (told by the
        // dataplane) resolves their next hops and keeps them current.
        let written = self.dataplane.overlay_remote_nodes().await;
        let nodes: BTreeSet<Ipv4Addr> = records
            .iter()
            .filter_map(|r| match r.placement {
                Placement::Remote { node, .. } => Some(node),
                Placement::Local { .. } => None,
            })
            .filter(|node| !written.contains(node))
            .collect();
        if !nodes.is_empty() {
            let nodes = nodes.clone();
            let _ = tokio::task::spawn_blocking(move || keep_neighbours(&nodes)).await;
        }
        self.dataplane.apply_overlay(&tables).await?;
        self.persist(state);
        let known: Vec<std::net::IpAddr> = state
            .unresolved
            .keys()
            .filter(|a| match a {
                std::net::IpAddr::V4(v4) => tables.services.contains_key(v4),
                std::net::IpAddr::V6(v6) => tables.services6.contains_key(v6),
            })
            .copied()
            .collect();
        for addr in known {
            state.unresolved.remove(&addr);
            self.dataplane.clear_overlay_pending(addr).await;
        }
        let named = (tables.services.keys().map(|&a| a.into()))
            .chain(tables.services6.keys().map(|&a| a.into()))
            .collect();
        self.tables_written(state, named, nodes);
        Ok(())
    }

    async fn apply(&self) -> Result<(), NmError> {
        let mut state = self.state.lock().await;
        self.apply_locked(&mut state).await
    }
}

/// A local instance's service IPs with those the cluster's table lists for
/// it: added, or completing one it has with its IPv6 address.
fn with_listed(record: &mut InstanceRecord, listed: &[ServiceIp]) {
    for sip in listed {
        let known = record
            .service_ips
            .iter_mut()
            .find(|s| s.ip_type == sip.ip_type && s.address == sip.address);
        match known {
            Some(s) if s.address_v6.is_none() => s.address_v6 = sip.address_v6,
            Some(_) => {}
            None => record.service_ips.push(sip.clone()),
        }
    }
}

/// Gives the next hop of each remote node a *managed* neighbour entry when
/// it has none (the kernel then keeps it resolved): the tunnel drops what
/// it would send to a hop whose neighbour is unresolved (ebpf/src/tunnel.rs).
fn keep_neighbours(nodes: &BTreeSet<Ipv4Addr>) {
    use crate::net::neigh::{add_managed, Resolver, Unresolved};
    let addresses: Vec<std::net::IpAddr> = nodes.iter().map(|&n| n.into()).collect();
    let resolved = match Resolver::new().and_then(|mut r| r.next_hops(&addresses)) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!("remote nodes' next hops: {e}");
            return;
        }
    };
    for (node, result) in nodes.iter().zip(resolved) {
        if let Err(Unresolved::NoEntry { ifindex, address }) = result {
            match add_managed(ifindex, address) {
                Ok(true) => {
                    tracing::info!(%node, hop = %address, ifindex, "managed neighbour entry added")
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(%node, "{e}"),
            }
        }
    }
}

#[cfg(test)]
mod listed_tests {
    use super::*;
    use crate::overlay::model::Placement;

    #[test]
    fn a_table_completes_a_service_ip_with_its_ipv6_address_and_adds_the_rest() {
        let sip = |t, a: [u8; 4], v6: Option<&str>| ServiceIp {
            ip_type: t,
            address: a.into(),
            address_v6: v6.map(|s| s.parse().unwrap()),
            weight: 0,
        };
        let mut r = InstanceRecord {
            job: "j".into(),
            number: 0,
            ns_addr: Ipv4Addr::new(192, 0, 2, 17),
            ns_addr_v6: None,
            placement: Placement::Remote {
                node: Ipv4Addr::UNSPECIFIED,
                port: 0,
            },
            service_ips: vec![
                sip(IpType::InstanceNumber, [203, 0, 113, 14], None),
                sip(
                    IpType::RoundRobin,
                    [203, 0, 113, 10],
                    Some("2001:db8:ff::10"),
                ),
            ],
            weight: 1,
        };
        with_listed(
            &mut r,
            &[
                sip(
                    IpType::InstanceNumber,
                    [203, 0, 113, 14],
                    Some("2001:db8:ff::14"),
                ),
                sip(
                    IpType::RoundRobin,
                    [203, 0, 113, 10],
                    Some("2001:db8:ff::99"),
                ),
                sip(IpType::Closest, [203, 0, 113, 11], None),
            ],
        );
        assert_eq!(
            r.service_ips,
            [
                sip(
                    IpType::InstanceNumber,
                    [203, 0, 113, 14],
                    Some("2001:db8:ff::14")
                ),
                // The deploy's own IPv6 address stays.
                sip(
                    IpType::RoundRobin,
                    [203, 0, 113, 10],
                    Some("2001:db8:ff::10")
                ),
                sip(IpType::Closest, [203, 0, 113, 11], None),
            ]
        );
    }
}
