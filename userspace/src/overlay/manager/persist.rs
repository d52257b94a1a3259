//! The state file: what a restart needs, and taking it back.

use std::collections::BTreeMap;
use std::fs::File;

use serde::{Deserialize, Serialize};

use super::{LocalDeployment, NetManager, NmError, Registration, State};
use crate::net::{self, netns::NetnsId, Prefix};
use crate::overlay::ipam::Ipam;
use crate::overlay::model::{Ids, InstanceRecord, Placement, SavedIds};
use crate::overlay::ports::PortMapping;

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
    /// The egress set-up in place (and whether forwarding was turned on by us).
    #[serde(default)]
    egress: Option<super::egress::EgressHeld>,
    /// The node's address the cluster was last told.
    #[serde(default)]
    node_address: Option<std::net::Ipv4Addr>,
}

#[derive(Serialize, Deserialize)]
struct PersistedDeployment {
    record: InstanceRecord,
    netns: String,
    netns_id: Option<NetnsId>,
    ports: Vec<PortMapping>,
    /// Absent in files of daemons before it: a unikernel's is the named
    /// namespace the NetManager makes for one.
    #[serde(default)]
    made_netns: Option<bool>,
}

impl NetManager {
    /// Writes what a restart needs to the state file (errors are logged:
    /// the running state is unaffected).
    pub(super) fn persist(&self, state: &State) {
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
                    made_netns: Some(d.made_netns),
                })
                .collect(),
            remote: state.remote.clone(),
            ids: state.ids.saved(),
            egress: state.egress,
            node_address: state.announced_at,
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
                tracing::warn!("NetManager state {}", crate::statefile::refused(path, &e));
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
                    "NetManager state {}",
                    crate::statefile::refused(path, &"bad subnetwork")
                );
                return;
            }
        };
        let ipam = match ipam {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!("NetManager state {}", crate::statefile::refused(path, &e));
                return;
            }
        };
        let mut state = self.state.lock().await;
        state.registration = Some(registration);
        state.ipam = Some(ipam);
        state.remote = persisted.remote;
        state.ids = Ids::restore(persisted.ids);
        state.egress = persisted.egress;
        state.announced_at = persisted.node_address;
        let (mut adopted, mut relinked) = (0, 0);
        for d in persisted.local {
            let (job, number) = (d.record.job.clone(), d.record.number);
            let addresses = (d.record.ns_addr, d.record.ns_addr_v6);
            match self.restore_deployment(&mut state, d).await {
                Ok(true) => adopted += 1,
                Ok(false) => relinked += 1,
                Err(e) => {
                    tracing::warn!(%job, instance = number, "not restored: {e}");
                    if matches!(e, NmError::NoNamespace(_)) {
                        state
                            .gone_at_start
                            .push((job, number, addresses.0, addresses.1));
                    }
                }
            }
        }
        if let Err(e) = self.apply_locked(&mut state).await {
            tracing::error!("writing the restored NetManager state: {e}");
        }
        if let Err(e) = self.sync_ports(&mut state).await {
            tracing::warn!("restoring the port mappings: {e}");
        }
        if let Err(e) = self.sync_egress(&mut state, true).await {
            tracing::warn!("restoring the container egress set-up: {e}");
        }
        self.persist(&state);
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
            host_mac,
            mac,
        } = d.record.placement.clone()
        else {
            return Err(NmError::BadRequest("not placed on this node".into()));
        };
        let ipam = state.ipam.as_mut().ok_or(NmError::NotRegistered)?;
        let lease = ipam.reserve(d.record.ns_addr)?;
        let (gateway, gateway_v6) = (ipam.gateway(), ipam.gateway_v6());
        let mut record = d.record;
        let made_netns = d.made_netns.unwrap_or_else(|| {
            d.netns
                == format!(
                    "/run/netns/{}",
                    super::unikernel::netns_name(&record.job, record.number)
                )
        });
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
                let (link, _) = self
                    // The same MACs: an LB target on this link names the
                    // container's, and the LB puts it back once the link is.
                    .create_link(
                        &netns,
                        &host_ifname,
                        lease,
                        gateway,
                        gateway_v6,
                        Some((host_mac, mac)),
                    )
                    .await?;
                record.placement = Placement::Local {
                    host_ifname: host_ifname.clone(),
                    host_ifindex: link.host_ifindex,
                    host_mac: link.host_mac,
                    mac: link.peer_mac,
                };
                if made_netns {
                    self.write_vm_nat(&netns, record.ns_addr)?;
                }
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
                made_netns,
            },
        );
        Ok(up)
    }
}
