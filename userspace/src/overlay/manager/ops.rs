//! The operations of the REST API: register, deploy, undeploy, other
//! nodes' tables, the catalog's feed, misses and the stop.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use serde::Serialize;

use super::links::host_ifname;
use super::{Feed, LocalDeployment, NetManager, NmError, Registration, ServiceIp};
use crate::net::{self, netns::NetnsId, Prefix};
use crate::overlay::cluster::{Cluster, DeployNotice, SubnetReply};
use crate::overlay::ipam::Ipam;
use crate::overlay::model::{InstanceRecord, IpType, Placement};
use crate::overlay::ports::{PortMapping, Protocol};

/// Unknown service IPs kept for `status` (beyond: counted, not listed).
const MAX_UNRESOLVED: usize = 1024;
/// How long a full list keeps an address not reported again.
const UNRESOLVED_KEPT: Duration = Duration::from_secs(60);

/// How long `/register` waits for the cluster's subnet.
const SUBNET_WAIT: Duration = Duration::from_secs(8);

/// What a deploy asks for, validated.
pub struct DeploySpec {
    pub netns: NetnsRef,
    pub job: String,
    pub number: u32,
    pub service_ips: Vec<ServiceIp>,
    pub weight: u32,
    pub ports: Vec<PortMapping>,
    /// The namespace was made for this instance: undeploy deletes it.
    pub made_netns: bool,
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
    /// Registers the node. Without a subnet (in the request or the
    /// configuration) an Oakestra-mode NetManager asks the cluster for one
    /// over MQTT and waits for it a while; it is taken whenever it comes.
    pub async fn register(
        self: &Arc<Self>,
        client_id: String,
        cluster_address: String,
        subnetwork: Option<String>,
        subnetwork_v6: Option<String>,
    ) -> Result<(), NmError> {
        let mut state = self.state.lock().await;
        if let Some(r) = &state.registration {
            if r.client_id != client_id {
                return Err(NmError::AlreadyRegistered(r.client_id.clone()));
            }
            // Said again, a subnet must be the one in use: another, or one
            // of a family the node was registered without, is no change
            // this answer may hide.
            let other = |asked: &Option<String>, held: &str| {
                asked.as_deref().is_some_and(|a| {
                    !a.is_empty()
                        && a.parse::<Prefix>().map(|p| p.network().to_string()).ok()
                            != held.parse::<Prefix>().map(|p| p.network().to_string()).ok()
                })
            };
            let held_v6 = r.subnetwork_v6.clone().unwrap_or_default();
            if other(&subnetwork, &r.subnetwork) || other(&subnetwork_v6, &held_v6) {
                return Err(NmError::BadRequest(format!(
                    "{client_id} is registered with subnetwork {}{}; a node's subnet does not change while it is registered",
                    r.subnetwork,
                    r.subnetwork_v6.as_deref().map(|s| format!(" and {s}")).unwrap_or_default()
                )));
            }
            let waiting = state.ipam.is_none();
            drop(state);
            if waiting {
                if let Some(c) = self.cluster() {
                    self.ask_subnet(&c).await?;
                }
            }
            return Ok(());
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
        // What a cluster's answer may not take, a subnet sent here may not
        // either (the configured fallback is the operator's own choice).
        let taken = self.taken(&state);
        for (text, lengths, v4, field) in [
            (&subnetwork, 8..=30, true, "subnetwork"),
            (&subnetwork_v6, 64..=124, false, "subnetwork_v6"),
        ] {
            let sent = parse(text.clone(), None, v4)?;
            if let Some(why) = sent.and_then(|p| unusable_subnet(p, lengths, &taken)) {
                return Err(NmError::BadRequest(format!(
                    "{field} {}: {why}",
                    sent.expect("checked")
                )));
            }
        }
        let subnet = parse(subnetwork, self.settings.subnetwork, true)?;
        let subnet_v6 = parse(subnetwork_v6, self.settings.subnetwork_v6, false)?;
        if subnet.is_none() && !self.settings.oakestra {
            return Err(NmError::BadRequest(
                "no subnetwork: send \"subnetwork\" (e.g. 10.18.0.0/26), set netmanager.subnetwork, or set netmanager.oakestra to ask the cluster".into(),
            ));
        }
        if let Some(subnet) = subnet {
            state.ipam = Some(Ipam::new(subnet, subnet_v6)?);
        }
        state.registration = Some(Registration {
            client_id: client_id.clone(),
            cluster_address: cluster_address.clone(),
            subnetwork: subnet.map(|c| c.to_string()).unwrap_or_default(),
            subnetwork_v6: subnet_v6.map(|c| c.to_string()),
        });
        drop(state);
        if subnet.is_some() {
            self.apply().await?;
        }
        if self.settings.oakestra {
            let cluster = self.start_cluster(&client_id, &cluster_address);
            if let (None, Some(c)) = (subnet, cluster) {
                self.ask_subnet(&c).await?;
            }
        }
        Ok(())
    }

    /// Asks the cluster for this node's subnet and waits for the answer as
    /// long as the Node Engine waits for `/register` (10 s). An answer this
    /// node refused is an error naming why, as Oakestra's NetManager does
    /// not start with an unusable subnet; a registration again asks again.
    /// No answer in time is no error: deploys say so until it comes.
    async fn ask_subnet(&self, c: &Cluster) -> Result<(), NmError> {
        // The last refusal stands (deploys meanwhile name it) until an
        // answer to this request comes.
        let before = self.state.lock().await.subnet_refusals;
        c.request_subnet().await;
        let deadline = tokio::time::Instant::now() + SUBNET_WAIT;
        while tokio::time::Instant::now() < deadline {
            let state = self.state.lock().await;
            if state.ipam.is_some() {
                return Ok(());
            }
            if state.subnet_refusals != before {
                let why = state.subnet_refused.clone().unwrap_or_default();
                return Err(NmError::SubnetRefused(why));
            }
            drop(state);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    pub(crate) fn cluster(&self) -> Option<Arc<Cluster>> {
        self.cluster.lock().expect("lock").clone()
    }

    /// Connects to the cluster's broker (the configured one, else the
    /// registration's cluster address).
    fn start_cluster(
        self: &Arc<Self>,
        client_id: &str,
        cluster_address: &str,
    ) -> Option<Arc<Cluster>> {
        let (host, port) = match &self.settings.mqtt_broker {
            Some(b) => match b
                .rsplit_once(':')
                .and_then(|(h, p)| Some((h, p.parse().ok()?)))
            {
                Some((h, p)) => (h.to_string(), p),
                None => {
                    tracing::error!("netmanager.mqtt_broker {b:?} is not host:port");
                    return None;
                }
            },
            None if cluster_address.is_empty() => {
                tracing::error!(
                    "netmanager: no cluster_address and no netmanager.mqtt_broker: no MQTT"
                );
                return None;
            }
            None => (cluster_address.to_string(), self.settings.mqtt_port),
        };
        let mut slot = self.cluster.lock().expect("lock");
        if let Some(c) = slot.as_ref() {
            return Some(c.clone());
        }
        tracing::info!(%host, port, "netmanager: Oakestra mode, cluster broker");
        let c = Cluster::start(
            self.clone(),
            client_id,
            &host,
            port,
            CancellationToken::new(),
        );
        *slot = Some(c.clone());
        Some(c)
    }

    /// After a restart: the cluster again, interests in the jobs deployed
    /// here and their tables (and the subnet if it never came).
    pub async fn resume_cluster(self: &Arc<Self>) {
        if !self.settings.oakestra {
            return;
        }
        let (registration, jobs, waiting) = {
            let state = self.state.lock().await;
            let jobs: BTreeSet<String> = state.local.keys().map(|(j, _)| j.clone()).collect();
            (state.registration.clone(), jobs, state.ipam.is_none())
        };
        let Some(r) = registration else { return };
        let Some(c) = self.start_cluster(&r.client_id, &r.cluster_address) else {
            return;
        };
        if waiting {
            c.request_subnet().await;
        }
        let gone = std::mem::take(&mut self.state.lock().await.gone_at_start);
        for (job, number, v4, v6) in gone {
            tracing::info!(%job, instance = number, "netmanager: telling the cluster it is undeployed (its namespace was gone at start)");
            c.undeployed(self.notice_at(&job, number, "UNDEPLOYED", v4, v6))
                .await;
        }
        // Their tables are asked for once connected (`Cluster::subscribe_all`).
        for job in jobs {
            c.add_interest(&job).await;
        }
        // The address moved while no daemon ran: the cluster still sends
        // this node's instances' traffic to the old one.
        let announced = self.state.lock().await.announced_at;
        if announced.is_some() && self.node_addr().is_some() && announced != self.node_addr() {
            tracing::info!(before = ?announced, now = ?self.node_addr(), "netmanager: the node's address moved while the daemon was down");
            // Not awaited: the start does not wait for the broker.
            let me = self.clone();
            tokio::spawn(async move { me.address_moved().await });
        }
    }

    /// The cluster's answer to the subnet request: a /26 (and a /120 for
    /// IPv6) starting at the given address, unless already given one.
    pub async fn assign_subnet(&self, reply: SubnetReply) -> Result<(), NmError> {
        let mut state = self.state.lock().await;
        if state.ipam.is_some() || state.registration.is_none() {
            tracing::info!(address = %reply.address, "netmanager: subnet offered when none was asked for; ignored");
            return Ok(());
        }
        let taken = self.taken(&state);
        let (v4, v6) = match cluster_subnet(&reply, &taken) {
            Ok(subnets) => subnets,
            Err(why) => {
                state.subnet_refused = Some(why.clone());
                state.subnet_refusals += 1;
                return Err(NmError::BadRequest(format!("{why}; waiting for another")));
            }
        };
        state.subnet_refused = None;
        state.ipam = Some(Ipam::new(v4, v6)?);
        if let Some(r) = state.registration.as_mut() {
            r.subnetwork = v4.to_string();
            r.subnetwork_v6 = v6.map(|c| c.to_string());
        }
        tracing::info!(subnet = %v4, "netmanager: subnet from the cluster");
        if let Err(e) = self.apply_locked(&mut state).await {
            state.ipam = None;
            return Err(e);
        }
        Ok(())
    }

    /// What a container subnet must stay clear of: the networks of the
    /// node's address (its underlay), the broker's address and the
    /// service IP ranges.
    fn taken(&self, state: &super::State) -> Vec<(Prefix, String)> {
        let mut taken = Vec::new();
        if let Some(node) = self.node_addr() {
            taken.push((Prefix::host(node), "the node's address".to_string()));
            let networks = net::addr::all().unwrap_or_default();
            for (_, p) in networks.into_iter().filter(|(_, p)| p.addr == node) {
                taken.push((p.network(), "the node's network".to_string()));
            }
        }
        let broker = state.registration.as_ref().and_then(|r| {
            let host = r.cluster_address.trim_start_matches('[');
            host.split(']').next()?.parse::<std::net::IpAddr>().ok()
        });
        if let Some(b) = broker {
            taken.push((Prefix::host(b), "the MQTT broker's address".to_string()));
        }
        let (v4, len) = self.settings.service_prefix;
        taken.push((
            Prefix::new(v4, len).network(),
            "the service IPs".to_string(),
        ));
        let (v6, len) = self.settings.service_prefix_v6;
        taken.push((
            Prefix::new(v6, len).network(),
            "the service IPs".to_string(),
        ));
        taken
    }

    /// Jobs deployed here or whose tables are held.
    pub async fn held_jobs(&self) -> Vec<String> {
        let state = self.state.lock().await;
        let local = state.local.keys().map(|(j, _)| j.clone());
        let jobs: BTreeSet<String> = local.chain(state.remote.keys().cloned()).collect();
        jobs.into_iter().collect()
    }

    /// Per job: whether it runs here, and the packets its instances counted
    /// (an interest stays while either says it is used).
    pub async fn job_usage(&self) -> BTreeMap<String, (bool, u64)> {
        let snapshot = self.snapshot().await;
        let mut out: BTreeMap<String, (bool, u64)> = BTreeMap::new();
        for i in snapshot.instances {
            out.entry(i.job).or_default().1 += i.packets;
        }
        let mut state = self.state.lock().await;
        // Packets from a remote job's instances count too: a job that only
        // sends here (one-way flows) is in use, and its table is what lets
        // them in (an instance IP no table names is refused).
        let mut jobs_of: BTreeMap<std::net::IpAddr, BTreeSet<String>> = BTreeMap::new();
        for (job, records) in &state.remote {
            for r in records {
                let addrs = [Some(r.ns_addr.into()), r.instance_ip().map(Into::into)]
                    .into_iter()
                    .chain([
                        r.ns_addr_v6.map(Into::into),
                        r.instance_ip_v6().map(Into::into),
                    ]);
                for a in addrs.flatten() {
                    jobs_of.entry(a).or_default().insert(job.clone());
                }
            }
        }
        let wanted = jobs_of.keys().copied().collect();
        match self.dataplane.overlay_sources_seen(&wanted).await {
            Ok(seen) => {
                let used: BTreeSet<String> = seen
                    .iter()
                    .flat_map(|a| jobs_of[a].iter().cloned())
                    .collect();
                for job in used {
                    *state.arrivals.entry(job).or_default() += 1;
                }
            }
            Err(e) => tracing::debug!("reading the tunnel's arrivals: {e}"),
        }
        for (job, n) in &state.arrivals {
            out.entry(job.clone()).or_default().1 += n;
        }
        for (job, _) in state.local.keys() {
            out.entry(job.clone()).or_default().0 = true;
        }
        out
    }

    /// Replaces the catalog's service IPs; on failure the maps keep the last good ones.
    /// Refuses `feed` where the dataplane would refuse its write as things
    /// stand (a service IP inside a VIP): compiled as [`Self::set_feed`]
    /// would, on a copy of the ids, and nothing written. Unregistered,
    /// nothing would be written: nothing to refuse.
    pub async fn check_feed(&self, feed: &Feed) -> Result<(), NmError> {
        let mut state = self.state.lock().await;
        if state.registration.is_none() {
            return Ok(());
        }
        let before = std::mem::replace(&mut state.feed, feed.clone());
        let settings = self.settings_for(&state);
        let owned = self.records(&state);
        state.feed = before;
        let records: Vec<&InstanceRecord> = owned.iter().collect();
        let tables = state
            .ids
            .clone()
            .compile(&records, &settings, &|r| self.cost_of(r))?;
        self.dataplane.check_overlay(&tables).await?;
        Ok(())
    }

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
        self.forget_dead(&spec).await?;
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
            if p.protocol == Protocol::Udp && p.host_port == self.settings.node_port {
                return Err(NmError::Conflict(format!(
                    "node port {} (Udp) is the tunnel's (lb.tunnel_port)",
                    p.host_port
                )));
            }
            if let Some(e) = crate::overlay::ports::held_on_node(p) {
                return Err(NmError::Conflict(format!(
                    "node port {} ({:?}) is held by a service of the node ({e})",
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
        let no_subnet = match &state.subnet_refused {
            Some(why) => NmError::SubnetRefused(why.clone()),
            None => NmError::NoSubnet,
        };
        let ipam = state.ipam.as_mut().ok_or(no_subnet)?;
        let lease = ipam.allocate()?;
        let (gateway, gateway_v6) = (ipam.gateway(), ipam.gateway_v6());
        let mut record = InstanceRecord {
            job: spec.job.clone(),
            number: spec.number,
            ns_addr: lease.v4,
            ns_addr_v6: lease.v6,
            // Set once the link exists; claims do not look at it.
            placement: Placement::Remote {
                node: Ipv4Addr::UNSPECIFIED,
                port: 0,
            },
            service_ips: spec.service_ips,
            weight: spec.weight,
        };
        let spec_ips = record.service_ips.clone();
        // What it will carry: its own service IPs and those the cluster's
        // table lists for it (even a table older than this deploy).
        let mut carrying = record.clone();
        let listed = state
            .remote
            .get(&spec.job)
            .and_then(|l| l.iter().find(|t| t.number == spec.number));
        super::with_listed(
            &mut carrying,
            listed.map(|t| t.service_ips.as_slice()).unwrap_or(&[]),
        );
        let mut claimed = self.claimants(&state);
        claimed.push(carrying.clone());
        let why = self.reserved(&state, &carrying, false).or_else(|| {
            super::claims::conflict(&claimed, |r| {
                r.job == record.job && r.number == record.number
            })
        });
        if let Some(why) = why {
            if let Some(ipam) = state.ipam.as_mut() {
                ipam.release(lease);
            }
            return Err(NmError::Conflict(why));
        }
        let host = host_ifname(&spec.job, spec.number);
        let created = self
            .create_link(&netns, &host, lease, gateway, gateway_v6, None)
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
        record.placement = Placement::Local {
            host_ifname: host.clone(),
            host_ifindex: link.host_ifindex,
            host_mac: link.host_mac,
            mac: link.peer_mac,
        };
        state.local.insert(
            key.clone(),
            LocalDeployment {
                record,
                lease,
                netns: netns_path,
                netns_id,
                ports: spec.ports,
                made_netns: spec.made_netns,
            },
        );
        let attached = self.dataplane.attach_container(&host).await;
        let applied = match attached {
            Ok(()) => match self.apply_locked(&mut state).await {
                Ok(()) => match self.sync_ports(&mut state).await {
                    Ok(()) => self.sync_egress(&mut state, false).await,
                    Err(e) => Err(e),
                },
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
            let _ = self.sync_egress(&mut state, false).await;
            self.persist(&state);
            return Err(e);
        }
        // Its notice tells the cluster the node's address, unless an
        // earlier one (not yet reported as moved) stands.
        if state.announced_at.is_none() {
            state.announced_at = self.node_addr();
        }
        self.persist(&state);
        drop(state);
        tracing::info!(job = %spec.job, instance = spec.number, address = %lease.v4, interface = %host, "deployed");
        // Replies find an instance through its instance IP (its source on
        // the way out); in Oakestra mode the cluster's table brings it.
        if !self.settings.oakestra {
            let instance_ip = spec_ips
                .iter()
                .find(|s| s.ip_type == IpType::InstanceNumber);
            if instance_ip.is_none() {
                tracing::warn!(job = %spec.job, instance = spec.number, "no InstanceNumber service IP: replies to what it sends to instances on other nodes cannot reach it");
            } else if lease.v6.is_some() && instance_ip.is_some_and(|s| s.address_v6.is_none()) {
                tracing::warn!(job = %spec.job, instance = spec.number, "its instance IP has no Address_v6: replies to what it sends over IPv6 to instances on other nodes cannot reach it");
            }
        }
        if let Some(c) = self.cluster() {
            // As Oakestra: tell the cluster, then follow the job's table.
            c.deployed(self.notice(&spec.job, spec.number, "DEPLOYED", &lease))
                .await;
            c.add_interest(&spec.job).await;
            c.query_job(&spec.job, true).await;
        }
        Ok(Deployed {
            service_name: spec.job,
            ns_address: lease.v4.to_string(),
            ns_address_v6: lease.v6.map(|a| a.to_string()).unwrap_or_default(),
        })
    }

    /// The numbers of `job`'s instances deployed on this node.
    pub async fn local_instances(&self, job: &str) -> Result<Vec<u32>, NmError> {
        let state = self.state.lock().await;
        if state.registration.is_none() {
            return Err(NmError::NotRegistered);
        }
        Ok(state
            .local
            .keys()
            .filter(|(j, _)| j == job)
            .map(|&(_, n)| n)
            .collect())
    }

    pub async fn undeploy(&self, job: &str, number: u32) -> Result<(), NmError> {
        let mut state = self.state.lock().await;
        if state.registration.is_none() {
            return Err(NmError::NotRegistered);
        }
        let deployment = self.remove_locked(&mut state, job, number, false).await?;
        drop(state);
        tracing::info!(job, instance = number, "undeployed");
        if let Some(c) = self.cluster() {
            c.undeployed(self.notice(job, number, "UNDEPLOYED", &deployment.lease))
                .await;
        }
        Ok(())
    }

    /// Undeploys the instances that `spec` would replace if their veth is
    /// gone: the same job and number (a restarted container), or the one
    /// deployed in its namespace. A veth dies with its namespace, and only
    /// then can the kernel give the namespace's identity to a new one; or
    /// its link was deleted. Either way it is no container here any more.
    /// Nothing is undone for a deploy that is refused at once: a namespace
    /// that does not open, or one a live instance holds.
    async fn forget_dead(&self, spec: &DeploySpec) -> Result<(), NmError> {
        let Ok((_, _, id)) = spec.netns.open() else {
            return Ok(());
        };
        let state = self.state.lock().await;
        let held = |d: &LocalDeployment| d.netns_id == Some(id);
        if state.local.values().any(|d| held(d) && d.link_alive()) {
            return Ok(());
        }
        let key = (spec.job.clone(), spec.number);
        let dead = state
            .local
            .iter()
            .filter(|(k, d)| (**k == key || held(d)) && !d.link_alive())
            .map(|(k, d)| (k.clone(), held(d)))
            .collect();
        self.forget(state, dead).await
    }

    /// [`NetManager::forget_dead`] for a unikernel's instance, before its
    /// namespace is made again.
    pub(super) async fn forget_dead_instance(&self, job: &str, number: u32) -> Result<(), NmError> {
        let state = self.state.lock().await;
        let key = (job.to_string(), number);
        let dead = match state.local.get(&key) {
            Some(d) if !d.link_alive() => vec![(key, false)],
            _ => Vec::new(),
        };
        self.forget(state, dead).await
    }

    /// Undeploys `dead` ((job, number), whether its namespace identity is
    /// the new deploy's) and tells the cluster.
    async fn forget(
        &self,
        mut state: tokio::sync::MutexGuard<'_, super::State>,
        dead: Vec<((String, u32), bool)>,
    ) -> Result<(), NmError> {
        let mut gone = Vec::new();
        let mut failed = Ok(());
        for ((job, number), shared) in dead {
            tracing::warn!(
                job,
                instance = number,
                "its container veth is gone and a new deploy takes its place: undeployed"
            );
            match self.remove_locked(&mut state, &job, number, shared).await {
                Ok(d) => gone.push((job, number, d.lease)),
                Err(e) => {
                    failed = Err(e);
                    break;
                }
            }
        }
        drop(state);
        if let Some(c) = self.cluster() {
            for (job, number, lease) in gone {
                c.undeployed(self.notice(&job, number, "UNDEPLOYED", &lease))
                    .await;
            }
        }
        // Those undeployed are told either way.
        failed
    }

    /// Removes a local instance: maps, port mappings, its link, the
    /// namespace made for it (unless `namespace_gone`: its identity may
    /// be a new namespace's now), its lease.
    async fn remove_locked(
        &self,
        state: &mut super::State,
        job: &str,
        number: u32,
        namespace_gone: bool,
    ) -> Result<LocalDeployment, NmError> {
        let key = (job.to_string(), number);
        let Some(deployment) = state.local.remove(&key) else {
            return Err(NmError::NotDeployed(format!("{job} instance {number}")));
        };
        // Maps first: no packet is sent to the interface about to go.
        if let Err(e) = self.apply_locked(state).await {
            state.local.insert(key, deployment);
            return Err(e);
        }
        if let Err(e) = self.sync_ports(state).await {
            tracing::warn!("port mappings of {job} instance {number} not removed: {e}");
        }
        self.remove_link(&deployment).await;
        // Only the namespace made for it: one of that name made since is another.
        let same = !namespace_gone
            && deployment.netns_id.is_some()
            && File::open(&deployment.netns)
                .ok()
                .and_then(|f| NetnsId::of(&f).ok())
                == deployment.netns_id;
        if deployment.made_netns && namespace_gone {
            tracing::warn!("network namespace {} of {job} instance {number} not deleted: its veth is gone, so it may be gone too and its identity another's", deployment.netns);
        } else if deployment.made_netns && !same {
            tracing::warn!("network namespace {} of {job} instance {number} not deleted: it is not the one made for it", deployment.netns);
        }
        if deployment.made_netns && same {
            let name = std::path::Path::new(&deployment.netns)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if let Err(e) = net::netns::delete_named(&name) {
                tracing::warn!(
                    "network namespace {} of {job} instance {number} not deleted: {e}",
                    deployment.netns
                );
            }
        }
        if let Some(ipam) = state.ipam.as_mut() {
            ipam.release(deployment.lease);
        }
        if let Err(e) = self.sync_egress(state, false).await {
            tracing::warn!("container egress after the last undeploy: {e}");
        }
        self.persist(state);
        Ok(deployment)
    }

    fn notice(
        &self,
        job: &str,
        number: u32,
        status: &str,
        lease: &crate::overlay::ipam::Lease,
    ) -> DeployNotice {
        self.notice_at(job, number, status, lease.v4, lease.v6)
    }

    /// [`Self::notice`] for an instance whose lease is gone.
    fn notice_at(
        &self,
        job: &str,
        number: u32,
        status: &str,
        v4: std::net::Ipv4Addr,
        v6: Option<std::net::Ipv6Addr>,
    ) -> DeployNotice {
        DeployNotice {
            appname: job.to_string(),
            status: status.to_string(),
            instance_number: number,
            nsip: v4.to_string(),
            nsipv6: v6.map(|a| a.to_string()).unwrap_or_default(),
            host_ip: self.node_addr().map(|a| a.to_string()).unwrap_or_default(),
            host_port: self.settings.node_port.to_string(),
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
        let mut numbers = BTreeSet::new();
        if let Some(r) = records.iter().find(|r| !numbers.insert(r.number)) {
            return Err(NmError::BadRequest(format!(
                "{job} instance {} is listed twice",
                r.number
            )));
        }
        let local_node = self.node_addr();
        for r in &records {
            // This node's own instance listed at another address (the node's
            // before it moved) is still the local one.
            let echo = state
                .local
                .get(&(r.job.clone(), r.number))
                .is_some_and(|d| d.record.ns_addr == r.ns_addr);
            let elsewhere = !echo
                && !matches!(r.placement, Placement::Remote { node, .. } if Some(node) == local_node);
            if let Some(why) = self.reserved(&state, r, elsewhere) {
                return Err(NmError::Conflict(why));
            }
        }
        let before = if records.is_empty() {
            state.arrivals.remove(&job);
            state.remote.remove(&job)
        } else {
            state.remote.insert(job.clone(), records)
        };
        let restore = |state: &mut super::State, before| {
            match before {
                Some(old) => state.remote.insert(job.clone(), old),
                None => state.remote.remove(&job),
            };
        };
        // Echoes of this node's own instances are not placed, and claim
        // through the local deployment they add service IPs to.
        if let Some(why) = super::claims::conflict(&self.claimants(&state), |r| r.job == job) {
            restore(&mut state, before);
            return Err(NmError::Conflict(why));
        }
        if let Err(e) = self.apply_locked(&mut state).await {
            restore(&mut state, before);
            return Err(e);
        }
        Ok(())
    }

    /// The kernel met an address in the service prefix it does not know: a
    /// container's destination, or the inner source of a tunnel packet for
    /// a container here (an instance IP whose node no table names).
    /// Oakestra mode: the cluster is asked (the packet was dropped; the next
    /// ones flow once the table is in).
    /// `stranger`: the inner source of a tunnel packet from a node no table
    /// names (anyone may send one): logged at debug, asked on a budget of
    /// its own.
    pub async fn miss(&self, service: std::net::IpAddr, stranger: bool) {
        let first = {
            let mut state = self.state.lock().await;
            state.misses += 1;
            let now = std::time::Instant::now();
            // Bounded: a node sending from many addresses cannot grow it;
            // when full, addresses not reported for a while make room.
            if !state.unresolved.contains_key(&service) && state.unresolved.len() >= MAX_UNRESOLVED
            {
                state
                    .unresolved
                    .retain(|_, (_, last)| now.duration_since(*last) < UNRESOLVED_KEPT);
            }
            let listed = state.unresolved.len();
            match state.unresolved.get_mut(&service) {
                Some((n, last)) => {
                    *n += 1;
                    *last = now;
                    false
                }
                None if listed < MAX_UNRESOLVED => {
                    state.unresolved.insert(service, (1, now));
                    true
                }
                None => false,
            }
        };
        // A miss is a destination no table holds, or a tunnelled source in
        // the service prefix no table places on a node: an address either way.
        if first && !stranger {
            tracing::info!(address = %service, "unknown service-prefix address (waiting for a table entry)");
        } else {
            tracing::debug!(address = %service, "unknown service-prefix address again");
        }
        match self.cluster() {
            Some(c) if stranger => c.query_stranger(service).await,
            Some(c) => c.query_ip(service).await,
            None => {}
        }
    }

    /// Removes every container link and port mapping (daemon stop), unless
    /// they are kept with the dataplane. The state file stays either way: a
    /// restart takes the containers back.
    pub async fn shutdown(&self) {
        if let Some(c) = self.cluster.lock().expect("lock").take() {
            c.stop();
        }
        let mut state = self.state.lock().await;
        if self.settings.keep_links {
            tracing::info!(
                containers = state.local.len(),
                "container links and port mappings left in place (keep_dataplane)"
            );
            return;
        }
        let deployments = std::mem::take(&mut state.local);
        for d in deployments.values() {
            self.remove_link(d).await;
        }
        if let Err(e) = self.sync_ports(&mut state).await {
            tracing::warn!("removing the port mappings: {e}");
        }
        if let Err(e) = self.sync_egress(&mut state, false).await {
            tracing::warn!("removing the container egress set-up: {e}");
        }
        // The deployments stay in the state file (a restart relinks them);
        // the egress set-up is recorded as gone.
        state.local = deployments;
        self.persist(&state);
    }
}

/// The container subnets of a subnet answer (a first address is a /26,
/// an IPv6 one a /120), or why they cannot be this node's.
fn cluster_subnet(
    reply: &SubnetReply,
    taken: &[(Prefix, String)],
) -> Result<(Prefix, Option<Prefix>), String> {
    let prefix = |text: &str, len: u8| -> Result<Option<Prefix>, String> {
        if text.is_empty() {
            return Ok(None);
        }
        let text = if text.contains('/') {
            text.to_string()
        } else {
            format!("{text}/{len}")
        };
        text.parse::<Prefix>()
            .map(Some)
            .map_err(|e| format!("cluster subnet {text:?}: {e}"))
    };
    let Some(v4) = prefix(&reply.address, 26)?.filter(|p| p.addr.is_ipv4()) else {
        return Err(format!("cluster subnet {:?} is not IPv4", reply.address));
    };
    let v6 = prefix(&reply.addressv6, 120)?.filter(|p| p.addr.is_ipv6());
    if let Some(why) = unusable_subnet(v4, 16..=30, taken) {
        return Err(format!("cluster subnet {:?}: {why}", reply.address));
    }
    if let Some(why) = v6.and_then(|p| unusable_subnet(p, 64..=124, taken)) {
        return Err(format!("cluster subnet {:?}: {why}", reply.addressv6));
    }
    Ok((v4, v6))
}

/// Why `subnet` cannot be this node's container subnet, if it cannot:
/// Oakestra hands out a /26 (IPv6 /120) of its own pool. A wider one, a
/// special range, or one over an address the node needs would take that
/// address away: a /24 holding the broker's address put it on a
/// container's gateway, and the node lost the cluster.
fn unusable_subnet(
    subnet: Prefix,
    lengths: std::ops::RangeInclusive<u8>,
    taken: &[(Prefix, String)],
) -> Option<String> {
    use std::net::IpAddr;
    let net = subnet.network();
    if !lengths.contains(&net.len) {
        return Some(format!(
            "a /{} (a node's container subnet is a /{} to /{})",
            net.len,
            lengths.start(),
            lengths.end()
        ));
    }
    let special = match net.addr {
        IpAddr::V4(a) => {
            a.octets()[0] == 0
                || a.is_loopback()
                || a.is_link_local()
                || a.is_multicast()
                || a.octets()[0] >= 240
        }
        IpAddr::V6(a) => {
            a.is_unspecified()
                || a.is_loopback()
                || a.is_multicast()
                || a.is_unicast_link_local()
                || a.to_ipv4_mapped().is_some()
        }
    };
    if special {
        return Some("a special-purpose range, not for containers".into());
    }
    taken
        .iter()
        .find(|(p, _)| p.is_ipv4() == net.is_ipv4() && (net.covers(p) || p.covers(&net)))
        .map(|(p, what)| format!("overlaps {what} ({p})"))
}

#[cfg(test)]
mod subnet_tests {
    use super::*;

    #[test]
    fn a_cluster_subnet_must_not_take_what_the_node_needs() {
        let p = |t: &str| t.parse::<Prefix>().unwrap();
        let taken = [
            (p("198.51.100.2/32"), "the node's address".to_string()),
            (p("198.51.100.0/24"), "the node's network".to_string()),
            (p("203.0.113.0/24"), "the service IPs".to_string()),
        ];
        let why = |t: &str| unusable_subnet(p(t), 16..=30, &taken);
        assert_eq!(why("192.0.2.64/26"), None);
        assert_eq!(
            why("0.0.0.0/0").unwrap(),
            "a /0 (a node's container subnet is a /16 to /30)"
        );
        assert_eq!(
            why("0.0.0.0/26").unwrap(),
            "a special-purpose range, not for containers"
        );
        assert_eq!(
            why("198.51.100.0/24").unwrap(),
            "overlaps the node's address (198.51.100.2/32)"
        );
        assert_eq!(
            why("198.51.100.64/26").unwrap(),
            "overlaps the node's network (198.51.100.0/24)"
        );
        assert_eq!(
            why("203.0.113.0/26").unwrap(),
            "overlaps the service IPs (203.0.113.0/24)"
        );
        assert!(why("224.0.0.0/26").is_some());
        assert!(why("127.0.0.0/26").is_some());
        let v6 = |t: &str| unusable_subnet(p(t), 64..=124, &taken);
        assert_eq!(v6("2001:db8:1::/120"), None);
        assert!(v6("fe80::/120").is_some());
        assert!(v6("::ffff:192.0.2.0/120").is_some());
        assert!(v6("2001:db8::/48").is_some());
    }
}
