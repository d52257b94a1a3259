//! Container links: the veth pair, its addresses and routes, and its
//! removal.

use std::fs::File;
use std::net::Ipv4Addr;

use super::{LocalDeployment, NetManager, NmError};
use crate::net::{self, veth::Veth, Prefix};
use crate::overlay::ipam::Lease;
use crate::overlay::model::Placement;

/// The host side's name: stable for a job and instance, within 15 bytes.
pub(super) fn host_ifname(job: &str, number: u32) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (job, number).hash(&mut h);
    format!("tmo{:08x}", h.finish() as u32)
}

/// A container's default routes from before its deploy.
pub(super) struct Replaced(Vec<netlink_packet_route::route::RouteMessage>);

impl Replaced {
    /// Puts them back, once the container's link (and so our routes) is gone.
    pub(super) async fn restore(self, netns: &File) {
        net::route::restore_routes(netns, self.0).await
    }
}

impl NetManager {
    pub(super) async fn create_link(
        &self,
        netns: &File,
        host: &str,
        lease: Lease,
        gateway: Ipv4Addr,
        gateway_v6: Option<std::net::Ipv6Addr>,
        macs: Option<([u8; 6], [u8; 6])>,
    ) -> Result<(Veth, Replaced), NmError> {
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
            macs,
        )
        .await?;
        // The container's own default routes, which ours replace: a rollback puts them back.
        let replaced = match net::route::default_routes(netns).await {
            Ok(r) => Replaced(r),
            Err(e) => {
                let _ = net::link::delete(host).await;
                return Err(e.into());
            }
        };
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
            replaced.restore(netns).await;
            return Err(e.into());
        }
        Ok((link, replaced))
    }

    pub(super) async fn remove_link(&self, deployment: &LocalDeployment) {
        if let Placement::Local { host_ifname, .. } = &deployment.record.placement {
            let _ = self.dataplane.detach_container(host_ifname).await;
            // Gone with its namespace, or a link of that name that is not it.
            if !deployment.link_alive() {
                return;
            }
            if let Err(e) = net::link::delete(host_ifname).await {
                tracing::warn!(interface = %host_ifname, netns = %deployment.netns, "removing the container veth: {e}");
            }
        }
    }
}
