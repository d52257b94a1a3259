//! Unikernels (Oakestra's `/unikernel/deploy`): the NetManager makes the
//! named namespace `<serviceName>.instance.<n>` the Node Engine starts the
//! VM in, deploys into it like a container (veth, addresses, routes, TC,
//! tables, notices), and adds what the VM needs there, as Oakestra's
//! NetManager does: bridge `virbr0` 192.168.1.1/30 with the TAP device
//! `tap0` (the VM's card), and NAT between the veth and the VM at
//! 192.168.1.2 (new connections in: DNAT to the VM; out: SNAT to the
//! instance's address). Forwarding is on inside that namespace.

use std::fs::File;
use std::net::Ipv4Addr;

use super::{DeploySpec, Deployed, NetManager, NetnsRef, NmError};
use crate::net::{self, nft, Prefix};
use crate::overlay::model::ServiceIp;
use crate::overlay::ports::PortMapping;

pub const BRIDGE: &str = "virbr0";
pub const TAP: &str = "tap0";
pub const BRIDGE_ADDRESS: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 1);
/// Where the VM is (Oakestra's unikernel address).
pub const VM_ADDRESS: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 2);
/// The NAT table inside the unikernel's namespace.
pub const TABLE: &str = "tapmesh_unikernel";

/// The named namespace of a unikernel instance (the Node Engine's task id).
pub fn netns_name(job: &str, number: u32) -> String {
    format!("{job}.instance.{number}")
}

/// The NAT inside the namespace: `iif veth dnat to VM`, `oif veth snat to ADDRESS`.
pub fn nat_table(veth_index: u32, address: Ipv4Addr) -> nft::Table {
    let chain = |name: &str, hook, priority, rule| nft::Chain {
        name: name.into(),
        hook,
        priority,
        rules: vec![rule],
    };
    nft::Table {
        name: TABLE.into(),
        chains: vec![
            chain(
                "prerouting",
                nft::Hook::Prerouting,
                -100,
                nft::Rule {
                    matches: vec![nft::Match::InputInterface(veth_index)],
                    action: nft::Action::DnatAddress(VM_ADDRESS),
                },
            ),
            chain(
                "postrouting",
                nft::Hook::Postrouting,
                100,
                nft::Rule {
                    matches: vec![nft::Match::OutputInterface(veth_index)],
                    action: nft::Action::Snat(address),
                },
            ),
        ],
    }
}

impl NetManager {
    pub async fn deploy_unikernel(
        &self,
        job: String,
        number: u32,
        service_ips: Vec<ServiceIp>,
        weight: u32,
        ports: Vec<PortMapping>,
    ) -> Result<Deployed, NmError> {
        if self.state.lock().await.registration.is_none() {
            return Err(NmError::NotRegistered);
        }
        // A dead one of the same job and number goes with the namespace made for it.
        self.forget_dead_instance(&job, number).await?;
        let name = netns_name(&job, number);
        let path = match net::netns::add_named(&name) {
            Ok(p) => p,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(NmError::Conflict(format!(
                    "network namespace {name} already exists: undeploy the unikernel first"
                )))
            }
            Err(e) => {
                return Err(NmError::Network(net::NetError::Kernel {
                    op: format!("creating network namespace {name}"),
                    source: e,
                }))
            }
        };
        let spec = DeploySpec {
            netns: NetnsRef::Path(path.display().to_string()),
            job: job.clone(),
            number,
            service_ips,
            weight,
            ports,
            made_netns: true,
        };
        let deployed = match self.deploy(spec).await {
            Ok(d) => d,
            Err(e) => {
                let _ = net::netns::delete_named(&name);
                return Err(e);
            }
        };
        if let Err(e) = self.set_up_vm_side(&path, &deployed).await {
            // Deletes the namespace too.
            let _ = self.undeploy(&job, number).await;
            return Err(e);
        }
        tracing::info!(%job, instance = number, netns = %name, "unikernel network ready");
        Ok(deployed)
    }

    async fn set_up_vm_side(
        &self,
        path: &std::path::Path,
        deployed: &Deployed,
    ) -> Result<(), NmError> {
        let netns = File::open(path).map_err(|e| {
            NmError::NoNamespace(format!("unikernel namespace {}: {e}", path.display()))
        })?;
        let address: Ipv4Addr = deployed
            .ns_address
            .parse()
            .map_err(|_| NmError::BadRequest(format!("address {}", deployed.ns_address)))?;
        in_namespace(&netns, || {
            net::tap::add_persistent(TAP)?;
            net::sysctl::set_ipv4_forwarding(true)
        })?;
        self.write_vm_nat(&netns, address)?;
        net::bridge::add_in(
            &netns,
            BRIDGE,
            Prefix {
                addr: BRIDGE_ADDRESS.into(),
                len: 30,
            },
            &[TAP],
        )
        .await?;
        Ok(())
    }

    /// Writes the VM's NAT for the veth now in `netns`: at deploy, and
    /// again after a relink (its rules name the veth by index).
    pub(super) fn write_vm_nat(&self, netns: &File, address: Ipv4Addr) -> Result<(), NmError> {
        let ifname = self.settings.container_ifname.clone();
        in_namespace(netns, || {
            let veth = net::link::by_name(&ifname)?;
            nft::write(&nat_table(veth.index, address))
        })
    }

    /// Undeploys a unikernel; [`Self::undeploy`] deletes the namespace
    /// made for it (and only a namespace made here, whatever its name).
    pub async fn undeploy_unikernel(&self, job: &str, number: u32) -> Result<(), NmError> {
        self.undeploy(job, number).await
    }
}

/// Runs `f` inside `netns`.
fn in_namespace<T>(
    netns: &File,
    f: impl FnOnce() -> Result<T, net::NetError> + Send,
) -> Result<T, NmError>
where
    T: Send,
{
    let in_ns = net::netns::run_in(netns, f).map_err(|e| {
        NmError::Network(net::NetError::Kernel {
            op: "entering the unikernel namespace".into(),
            source: e,
        })
    })?;
    Ok(in_ns?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vm_is_reached_by_dnat_and_leaves_by_snat() {
        let text = nat_table(7, Ipv4Addr::new(192, 0, 2, 5)).to_string();
        assert!(
            text.contains("type nat hook prerouting priority dstnat; policy accept;\n    iif 7 dnat to 192.168.1.2\n"),
            "{text}"
        );
        assert!(
            text.contains("type nat hook postrouting priority srcnat; policy accept;\n    oif 7 snat to 192.0.2.5\n"),
            "{text}"
        );
        assert_eq!(netns_name("app.ns.web.ns", 3), "app.ns.web.ns.instance.3");
    }
}
