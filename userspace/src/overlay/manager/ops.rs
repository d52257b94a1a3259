//! The operations of the REST API: register, deploy, undeploy, other
//! nodes' tables, the catalog's feed, misses and the stop.

use std::fs::File;
use std::net::Ipv4Addr;

use serde::Serialize;

use super::links::host_ifname;
use super::{Feed, LocalDeployment, NetManager, NmError, Registration, ServiceIp};
use crate::net::{self, netns::NetnsId, Prefix};
use crate::overlay::ipam::Ipam;
use crate::overlay::model::{InstanceRecord, IpType, Placement};
use crate::overlay::ports::PortMapping;

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
    /// Opens the namespace; refuses a file that is not a network namespace
    /// and the host's own (the daemon's or the initial one): the host is
    /// never a container.
    fn open(&self) -> Result<(File, String, NetnsId), NmError> {
        let path = match self {
            NetnsRef::Pid(pid) => format!("/proc/{pid}/ns/net"),
            NetnsRef::Path(p) => p.clone(),
        };
        let what = match self {
            NetnsRef::Pid(pid) => format!("pid {pid}"),
            NetnsRef::Path(p) => format!("netns {p:?}"),
        };
        let file = File::open(&path).map_err(|e| {
            NmError::NoNamespace(match self {
                NetnsRef::Pid(pid) => format!("no process {pid} with a network namespace ({e})"),
                NetnsRef::Path(p) => format!("network namespace {p:?} cannot be opened ({e})"),
            })
        })?;
        let id = NetnsId::of_namespace(&file).map_err(|e| {
            NmError::NotANamespace(format!("{what} is not a network namespace: {e}"))
        })?;
        let host = if Some(id) == NetnsId::own() {
            Some("the daemon's network namespace")
        } else if Some(id) == NetnsId::init() {
            Some("the host's initial network namespace")
        } else if Some(id) == NetnsId::started_in() {
            Some("the host's network namespace, where the daemon was started")
        } else {
            None
        };
        if let Some(whose) = host {
            return Err(NmError::HostNamespace(format!(
                "{what} is in {whose} ({}): a container needs a namespace of its own",
                id.describe()
            )));
        }
        Ok((file, path, id))
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

impl NetManager {
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
        let (netns, netns_path, id) = spec.netns.open()?;
        if let Some((job, number)) = state
            .local
            .iter()
            .find(|(_, d)| d.netns_id == Some(id))
            .map(|(k, _)| k)
        {
            return Err(NmError::Conflict(format!(
                "network namespace {} ({netns_path}) already holds {job} instance {number}; one container per namespace",
                id.describe()
            )));
        }
        let netns_id = Some(id);
        let ipam = state.ipam.as_mut().ok_or(NmError::NotRegistered)?;
        let lease = ipam.allocate()?;
        let (gateway, gateway_v6) = (ipam.gateway(), ipam.gateway_v6());
        let host = host_ifname(&spec.job, spec.number);
        let created = self
            .create_link(&netns, &host, lease, gateway, gateway_v6)
            .await;
        let (link, replaced) = match created {
            Ok(created) => created,
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
            replaced.restore(&netns).await;
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
