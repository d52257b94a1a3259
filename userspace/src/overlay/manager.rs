//! The NetManager's state and operations: registration, deploy and
//! undeploy of containers, other nodes' table entries, misses. Every
//! operation either completes or leaves nothing behind.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};

use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use super::ipam::{Ipam, IpamError, Lease};
use super::model::{
    Ids, InstanceRecord, IpType, ModelError, Placement, SavedIds, ServiceIp, Settings,
};
use super::ports::{self, PortMapping};
use crate::dataplane::DataplaneHandle;
use crate::net::{self, netns::NetnsId, veth::Veth, NetError, Prefix};

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
    #[error("{0}")]
    Conflict(String),
    #[error("{0} is not deployed on this node")]
    NotDeployed(String),
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
}

/// Settings fixed at start.
#[derive(Clone, Debug)]
pub struct ManagerSettings {
    pub container_ifname: String,
    pub mtu: u32,
    pub node_addr: Option<Ipv4Addr>,
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
}

/// What the state file holds.
#[derive(Default, Serialize, Deserialize)]
struct Persisted {
    registration: Option<Registration>,
    local: Vec<PersistedDeployment>,
    remote: BTreeMap<String, Vec<InstanceRecord>>,
    /// Instance and service ids with their generations: flows in kept
    /// conntrack maps stay bound to the same instances.
    #[serde(default)]
    ids: SavedIds,
}

#[derive(Serialize, Deserialize)]
struct PersistedDeployment {
    record: InstanceRecord,
    netns: String,
    netns_id: Option<NetnsId>,
    ports: Vec<PortMapping>,
}

#[derive(Default)]
struct State {
    registration: Option<Registration>,
    ipam: Option<Ipam>,
    local: BTreeMap<(String, u32), LocalDeployment>,
    remote: BTreeMap<String, Vec<InstanceRecord>>,
    ids: Ids,
    /// Service IPs the kernel reported unknown → how many reports.
    unresolved: BTreeMap<std::net::IpAddr, u64>,
    misses: u64,
    /// The nftables table of port mappings exists.
    ports_written: bool,
    /// Service IPs whose members the catalog names (EDS).
    feed: Feed,
}

/// Service IPs fed by the catalog: service IP → member instances (by
/// namespace address) → weight.
pub type Feed = BTreeMap<Ipv4Addr, BTreeMap<Ipv4Addr, u32>>;

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

impl State {
    fn port_table(&self) -> Vec<(Ipv4Addr, PortMapping)> {
        self.local
            .values()
            .flat_map(|d| d.ports.iter().map(|p| (d.lease.v4, *p)))
            .collect()
    }
}

/// What a deploy asks for, validated.
pub struct DeploySpec {
    pub netns: NetnsRef,
    pub job: String,
    pub number: u32,
    pub service_ips: Vec<ServiceIp>,
    pub weight: u32,
    pub ports: Vec<PortMapping>,
}

pub enum NetnsRef {
    Pid(u32),
    Path(String),
}

impl NetnsRef {
    fn open(&self) -> Result<(File, String), NmError> {
        let path = match self {
            NetnsRef::Pid(pid) => format!("/proc/{pid}/ns/net"),
            NetnsRef::Path(p) => p.clone(),
        };
        match File::open(&path) {
            Ok(f) => Ok((f, path)),
            Err(e) => Err(NmError::NoNamespace(match self {
                NetnsRef::Pid(pid) => format!("no process {pid} with a network namespace ({e})"),
                NetnsRef::Path(p) => format!("network namespace {p:?} cannot be opened ({e})"),
            })),
        }
    }
}

/// Another node's instance, from a table update.
pub struct RemoteSpec {
    pub number: u32,
    pub ns_addr: Ipv4Addr,
    pub ns_addr_v6: Option<std::net::Ipv6Addr>,
    pub node: Ipv4Addr,
    pub port: u16,
    pub service_ips: Vec<ServiceIp>,
    pub weight: u32,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Deployed {
    #[serde(rename = "serviceName")]
    pub service_name: String,
    #[serde(rename = "nsAddress")]
    pub ns_address: String,
    #[serde(rename = "nsAddressv6")]
    pub ns_address_v6: String,
}

/// One line of `tapmesh status` per service IP and instance.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Snapshot {
    pub registration: Option<Registration>,
    pub instances: Vec<InstanceView>,
    pub services: Vec<ServiceView>,
    pub unresolved: Vec<String>,
    pub misses: u64,
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

pub struct NetManager {
    dataplane: DataplaneHandle,
    settings: ManagerSettings,
    state: Mutex<State>,
}

fn host_ifname(job: &str, number: u32) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (job, number).hash(&mut h);
    format!("tmo{:08x}", h.finish() as u32)
}

impl NetManager {
    pub fn new(dataplane: DataplaneHandle, settings: ManagerSettings) -> Self {
        Self {
            dataplane,
            settings,
            state: Mutex::new(State::default()),
        }
    }

    pub async fn register(
        &self,
        client_id: String,
        cluster_address: String,
        subnetwork: Option<String>,
        subnetwork_v6: Option<String>,
    ) -> Result<(), NmError> {
        let mut state = self.state.lock().await;
        if let Some(r) = &state.registration {
            return if r.client_id == client_id {
                Ok(())
            } else {
                Err(NmError::AlreadyRegistered(r.client_id.clone()))
            };
        }
        if client_id.trim().is_empty() {
            return Err(NmError::BadRequest("client_id is empty".into()));
        }
        let parse = |text: Option<String>,
                     fallback: Option<Prefix>,
                     v4: bool|
         -> Result<Option<Prefix>, NmError> {
            match text {
                Some(t) => match t.parse::<Prefix>() {
                    Ok(c) if c.addr.is_ipv4() == v4 => Ok(Some(c)),
                    _ => Err(NmError::BadRequest(format!(
                        "subnetwork{} {t:?} is not an {} prefix",
                        if v4 { "" } else { "_v6" },
                        if v4 { "IPv4" } else { "IPv6" }
                    ))),
                },
                None => Ok(fallback),
            }
        };
        let subnet = parse(subnetwork, self.settings.subnetwork, true)?.ok_or_else(|| {
            NmError::BadRequest(
                "no subnetwork: send \"subnetwork\" (e.g. 10.18.0.0/26) or set netmanager.subnetwork".into(),
            )
        })?;
        let subnet_v6 = parse(subnetwork_v6, self.settings.subnetwork_v6, false)?;
        let ipam = Ipam::new(subnet, subnet_v6)?;
        state.registration = Some(Registration {
            client_id,
            cluster_address,
            subnetwork: subnet.to_string(),
            subnetwork_v6: subnet_v6.map(|c| c.to_string()),
        });
        state.ipam = Some(ipam);
        drop(state);
        self.apply().await
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
        }
    }

    /// Every instance this node routes to: local deployments, then other
    /// nodes' (own deployments echoed by the cluster are skipped), each with
    /// the service IPs the catalog's feed gives it.
    fn records(&self, state: &State) -> Vec<InstanceRecord> {
        let local_node = self.settings.node_addr;
        state
            .local
            .values()
            .map(|d| &d.record)
            .chain(state.remote.values().flatten().filter(|r| {
                !matches!(r.placement, Placement::Remote { node, .. } if Some(node) == local_node)
                    && !state.local.contains_key(&(r.job.clone(), r.number))
            }))
            .map(|r| {
                let mut r = r.clone();
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

    /// Replaces the catalog's service IPs; on failure the maps keep the last good ones.
    pub async fn set_feed(&self, feed: Feed) -> Result<(), NmError> {
        let mut state = self.state.lock().await;
        let before = std::mem::replace(&mut state.feed, feed);
        if state.registration.is_none() {
            return Ok(());
        }
        if let Err(e) = self.apply_locked(&mut state).await {
            state.feed = before;
            return Err(e);
        }
        Ok(())
    }

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

    /// Compiles the state and writes it; on failure the maps keep what they had.
    async fn apply_locked(&self, state: &mut State) -> Result<(), NmError> {
        let settings = self.settings_for(state);
        let owned = self.records(state);
        let records: Vec<&InstanceRecord> = owned.iter().collect();
        let costs = &self.settings.node_costs;
        let default_cost = self.settings.default_node_cost;
        let cost_of = |r: &InstanceRecord| match r.placement {
            Placement::Local { .. } => 0,
            Placement::Remote { node, .. } => costs.get(&node).copied().unwrap_or(default_cost),
        };
        let tables = state.ids.compile(&records, &settings, &cost_of)?;
        let nodes: BTreeSet<Ipv4Addr> = records
            .iter()
            .filter_map(|r| match r.placement {
                Placement::Remote { node, .. } => Some(node),
                Placement::Local { .. } => None,
            })
            .collect();
        if !nodes.is_empty() {
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
        Ok(())
    }

    async fn apply(&self) -> Result<(), NmError> {
        let mut state = self.state.lock().await;
        self.apply_locked(&mut state).await
    }

    pub async fn deploy(&self, spec: DeploySpec) -> Result<Deployed, NmError> {
        let mut state = self.state.lock().await;
        if state.registration.is_none() {
            return Err(NmError::NotRegistered);
        }
        let key = (spec.job.clone(), spec.number);
        if state.local.contains_key(&key) {
            return Err(NmError::Conflict(format!(
                "{} instance {} is already deployed; undeploy it first",
                spec.job, spec.number
            )));
        }
        if let Some(ip) = spec
            .service_ips
            .iter()
            .find(|s| s.ip_type == IpType::InstanceNumber)
        {
            let taken = state
                .local
                .values()
                .map(|d| &d.record)
                .chain(state.remote.values().flatten())
                .find(|r| r.instance_ip() == Some(ip.address) && (r.job.clone(), r.number) != key);
            if let Some(other) = taken {
                return Err(NmError::Conflict(format!(
                    "instance IP {} already belongs to {} instance {}",
                    ip.address, other.job, other.number
                )));
            }
        }
        for p in &spec.ports {
            let taken = state
                .port_table()
                .into_iter()
                .any(|(_, q)| q.protocol == p.protocol && q.host_port == p.host_port);
            if taken {
                return Err(NmError::Conflict(format!(
                    "node port {} ({:?}) is already mapped to another container",
                    p.host_port, p.protocol
                )));
            }
        }
        let (netns, netns_path) = spec.netns.open()?;
        let netns_id = NetnsId::of(&netns).ok();
        let ipam = state.ipam.as_mut().ok_or(NmError::NotRegistered)?;
        let lease = ipam.allocate()?;
        let (gateway, gateway_v6) = (ipam.gateway(), ipam.gateway_v6());
        let host = host_ifname(&spec.job, spec.number);
        let created = self
            .create_link(&netns, &host, lease, gateway, gateway_v6)
            .await;
        let link = match created {
            Ok(link) => link,
            Err(e) => {
                if let Some(ipam) = state.ipam.as_mut() {
                    ipam.release(lease);
                }
                return Err(e);
            }
        };
        let record = InstanceRecord {
            job: spec.job.clone(),
            number: spec.number,
            ns_addr: lease.v4,
            ns_addr_v6: lease.v6,
            placement: Placement::Local {
                host_ifname: host.clone(),
                host_ifindex: link.host_ifindex,
                host_mac: link.host_mac,
                mac: link.peer_mac,
            },
            service_ips: spec.service_ips,
            weight: spec.weight,
        };
        state.local.insert(
            key.clone(),
            LocalDeployment {
                record,
                lease,
                netns: netns_path,
                netns_id,
                ports: spec.ports,
            },
        );
        let attached = self.dataplane.attach_container(&host).await;
        let applied = match attached {
            Ok(()) => match self.apply_locked(&mut state).await {
                Ok(()) => self.sync_ports(&mut state).await,
                Err(e) => Err(e),
            },
            Err(e) => Err(e.into()),
        };
        if let Err(e) = applied {
            state.local.remove(&key);
            let _ = self.dataplane.detach_container(&host).await;
            let _ = net::link::delete(&host).await;
            if let Some(ipam) = state.ipam.as_mut() {
                ipam.release(lease);
            }
            let _ = self.apply_locked(&mut state).await;
            let _ = self.sync_ports(&mut state).await;
            return Err(e);
        }
        tracing::info!(job = %spec.job, instance = spec.number, address = %lease.v4, interface = %host, "deployed");
        Ok(Deployed {
            service_name: spec.job,
            ns_address: lease.v4.to_string(),
            ns_address_v6: lease.v6.map(|a| a.to_string()).unwrap_or_default(),
        })
    }

    async fn create_link(
        &self,
        netns: &File,
        host: &str,
        lease: Lease,
        gateway: Ipv4Addr,
        gateway_v6: Option<std::net::Ipv6Addr>,
    ) -> Result<Veth, NmError> {
        let mut gateways = vec![Prefix::host(gateway)];
        let mut local = vec![Prefix::host(lease.v4)];
        if let (Some(gw6), Some(v6)) = (gateway_v6, lease.v6) {
            gateways.push(Prefix::host(gw6));
            local.push(Prefix::host(v6));
        }
        let link = net::veth::create(
            netns,
            host,
            &self.settings.container_ifname,
            &gateways,
            &local,
            self.settings.mtu,
        )
        .await?;
        let routed = net::route::add_container_routes(
            netns,
            &self.settings.container_ifname,
            link.host_ifindex,
            &gateways.iter().map(|c| c.addr).collect::<Vec<_>>(),
            &local.iter().map(|c| c.addr).collect::<Vec<_>>(),
        )
        .await;
        // The host side takes what the uplink takes: a container that raises
        // its own MTU still reaches TC, which answers "fragmentation needed".
        let host_mtu = net::link::set_mtu(host, self.settings.mtu + 28).await;
        if let Err(e) = routed.and(host_mtu) {
            let _ = net::link::delete(host).await;
            return Err(e.into());
        }
        Ok(link)
    }

    pub async fn undeploy(&self, job: &str, number: u32) -> Result<(), NmError> {
        let mut state = self.state.lock().await;
        if state.registration.is_none() {
            return Err(NmError::NotRegistered);
        }
        let key = (job.to_string(), number);
        let Some(deployment) = state.local.remove(&key) else {
            return Err(NmError::NotDeployed(format!("{job} instance {number}")));
        };
        // Maps first: no packet is sent to the interface about to go.
        if let Err(e) = self.apply_locked(&mut state).await {
            state.local.insert(key, deployment);
            return Err(e);
        }
        if let Err(e) = self.sync_ports(&mut state).await {
            tracing::warn!("port mappings of {job} instance {number} not removed: {e}");
        }
        self.remove_link(&deployment).await;
        if let Some(ipam) = state.ipam.as_mut() {
            ipam.release(deployment.lease);
        }
        tracing::info!(job, instance = number, "undeployed");
        Ok(())
    }

    /// Makes the nftables port mappings match the deployments (nft is only
    /// run when some deployment has, or had, mappings).
    async fn sync_ports(&self, state: &mut State) -> Result<(), NmError> {
        let table = state.port_table();
        if table.is_empty() && !state.ports_written {
            return Ok(());
        }
        ports::apply(&table).await.map_err(NmError::Ports)?;
        state.ports_written = !table.is_empty();
        Ok(())
    }

    async fn remove_link(&self, deployment: &LocalDeployment) {
        if let Placement::Local { host_ifname, .. } = &deployment.record.placement {
            let _ = self.dataplane.detach_container(host_ifname).await;
            if let Err(e) = net::link::delete(host_ifname).await {
                tracing::warn!(interface = %host_ifname, netns = %deployment.netns, "removing the container veth: {e}");
            }
        }
    }

    /// Replaces the instances of `job` on other nodes (an empty list removes them).
    pub async fn update_table(
        &self,
        job: String,
        instances: Vec<RemoteSpec>,
    ) -> Result<(), NmError> {
        let mut state = self.state.lock().await;
        let records: Vec<InstanceRecord> = instances
            .into_iter()
            .map(|r| InstanceRecord {
                job: job.clone(),
                number: r.number,
                ns_addr: r.ns_addr,
                ns_addr_v6: r.ns_addr_v6,
                placement: Placement::Remote {
                    node: r.node,
                    port: r.port,
                },
                service_ips: r.service_ips,
                weight: r.weight,
            })
            .collect();
        let before = if records.is_empty() {
            state.remote.remove(&job)
        } else {
            state.remote.insert(job.clone(), records)
        };
        if let Err(e) = self.apply_locked(&mut state).await {
            match before {
                Some(old) => state.remote.insert(job, old),
                None => state.remote.remove(&job),
            };
            return Err(e);
        }
        Ok(())
    }

    /// The kernel met a destination in the service prefix it does not know.
    pub async fn miss(&self, service: std::net::IpAddr) {
        let mut state = self.state.lock().await;
        state.misses += 1;
        *state.unresolved.entry(service).or_insert(0) += 1;
        tracing::info!(%service, "unknown service IP (waiting for a table entry)");
    }

    pub async fn snapshot(&self) -> Snapshot {
        let (services, instances) = self.dataplane.overlay_counters().await.unwrap_or_default();
        let state = self.state.lock().await;
        let mut snap = Snapshot {
            registration: state.registration.clone(),
            misses: state.misses,
            unresolved: state.unresolved.keys().map(|a| a.to_string()).collect(),
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

    /// Writes what a restart needs to the state file (errors are logged:
    /// the running state is unaffected).
    fn persist(&self, state: &State) {
        let Some(path) = &self.settings.state_file else {
            return;
        };
        let persisted = Persisted {
            registration: state.registration.clone(),
            local: state
                .local
                .values()
                .map(|d| PersistedDeployment {
                    record: d.record.clone(),
                    netns: d.netns.clone(),
                    netns_id: d.netns_id,
                    ports: d.ports.clone(),
                })
                .collect(),
            remote: state.remote.clone(),
            ids: state.ids.saved(),
        };
        if let Err(e) = crate::statefile::save(path, &persisted) {
            tracing::error!("persisting the NetManager state to {}: {e}", path.display());
        }
    }

    /// Takes back what an earlier daemon left in the state file: the
    /// registration, other nodes' tables and each deployment whose container
    /// namespace still exists. A container whose link is still up keeps it
    /// (a kept dataplane, or a crash); one whose link is gone gets a new one
    /// with the same addresses. A deployment whose namespace is gone is
    /// dropped. Nothing here fails the start; what is dropped is logged.
    pub async fn restore(&self) {
        let Some(path) = &self.settings.state_file else {
            return;
        };
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                tracing::warn!("NetManager state {}: {e}; starting empty", path.display());
                return;
            }
        };
        let persisted: Persisted = match serde_json::from_slice(&bytes) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(
                    "NetManager state {} is not readable ({e}); starting empty",
                    path.display()
                );
                return;
            }
        };
        let Some(registration) = persisted.registration else {
            return;
        };
        let subnet = registration.subnetwork.parse::<Prefix>();
        let subnet_v6 = registration
            .subnetwork_v6
            .as_deref()
            .map(str::parse::<Prefix>)
            .transpose();
        let ipam = match (subnet, subnet_v6) {
            (Ok(v4), Ok(v6)) => Ipam::new(v4, v6),
            _ => {
                tracing::warn!(
                    "NetManager state {}: bad subnetwork; starting empty",
                    path.display()
                );
                return;
            }
        };
        let ipam = match ipam {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!("NetManager state {}: {e}; starting empty", path.display());
                return;
            }
        };
        let mut state = self.state.lock().await;
        state.registration = Some(registration);
        state.ipam = Some(ipam);
        state.remote = persisted.remote;
        state.ids = Ids::restore(persisted.ids);
        let (mut adopted, mut relinked) = (0, 0);
        for d in persisted.local {
            let (job, number) = (d.record.job.clone(), d.record.number);
            match self.restore_deployment(&mut state, d).await {
                Ok(true) => adopted += 1,
                Ok(false) => relinked += 1,
                Err(e) => tracing::warn!(%job, instance = number, "not restored: {e}"),
            }
        }
        if let Err(e) = self.apply_locked(&mut state).await {
            tracing::error!("writing the restored NetManager state: {e}");
        }
        if let Err(e) = self.sync_ports(&mut state).await {
            tracing::warn!("restoring the port mappings: {e}");
        }
        tracing::info!(adopted, relinked, "NetManager state restored");
    }

    /// One deployment of the state file: true when its link was still up.
    async fn restore_deployment(
        &self,
        state: &mut State,
        d: PersistedDeployment,
    ) -> Result<bool, NmError> {
        let Placement::Local {
            host_ifname,
            host_ifindex,
            ..
        } = d.record.placement.clone()
        else {
            return Err(NmError::BadRequest("not placed on this node".into()));
        };
        let ipam = state.ipam.as_mut().ok_or(NmError::NotRegistered)?;
        let lease = ipam.reserve(d.record.ns_addr)?;
        let (gateway, gateway_v6) = (ipam.gateway(), ipam.gateway_v6());
        let mut record = d.record;
        let up = net::link::index(&host_ifname) == Some(host_ifindex);
        let restored = async {
            if !up {
                let netns = File::open(&d.netns)
                    .ok()
                    .filter(|f| d.netns_id.is_none() || NetnsId::of(f).ok() == d.netns_id)
                    .ok_or_else(|| {
                        NmError::NoNamespace(format!("its network namespace {} is gone", d.netns))
                    })?;
                // A link of that name that is not ours (another index) goes.
                let _ = net::link::delete(&host_ifname).await;
                let link = self
                    .create_link(&netns, &host_ifname, lease, gateway, gateway_v6)
                    .await?;
                record.placement = Placement::Local {
                    host_ifname: host_ifname.clone(),
                    host_ifindex: link.host_ifindex,
                    host_mac: link.host_mac,
                    mac: link.peer_mac,
                };
            }
            self.dataplane.attach_container(&host_ifname).await?;
            Ok::<(), NmError>(())
        }
        .await;
        if let Err(e) = restored {
            if !up {
                let _ = net::link::delete(&host_ifname).await;
            }
            if let Some(ipam) = state.ipam.as_mut() {
                ipam.release(lease);
            }
            return Err(e);
        }
        state.local.insert(
            (record.job.clone(), record.number),
            LocalDeployment {
                record,
                lease,
                netns: d.netns,
                netns_id: d.netns_id,
                ports: d.ports,
            },
        );
        Ok(up)
    }

    /// Removes every container link and port mapping (daemon stop), unless
    /// they are kept with the dataplane. The state file stays either way: a
    /// restart takes the containers back.
    pub async fn shutdown(&self) {
        let mut state = self.state.lock().await;
        if self.settings.keep_links {
            tracing::info!(
                containers = state.local.len(),
                "container links and port mappings left in place (keep_dataplane)"
            );
            return;
        }
        let deployments: Vec<LocalDeployment> =
            std::mem::take(&mut state.local).into_values().collect();
        for d in &deployments {
            self.remove_link(d).await;
        }
        if let Err(e) = self.sync_ports(&mut state).await {
            tracing::warn!("removing the port mappings: {e}");
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
