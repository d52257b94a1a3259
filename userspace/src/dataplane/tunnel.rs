//! This node's tunnel endpoint (`tm_tunnel`), shared by the load balancer
//! and the overlay: worked out once from the configuration and written once,
//! when the dataplane starts.

use aya::{maps::Array, Ebpf};
use tapmesh_common::{map_names as n, tunnel::TunnelConfig};

use super::{map_err, map_mut, DataplaneError};
use crate::config::Config;

/// This node's tunnel settings for remote targets, remote instances and
/// decapsulation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TunnelSettings {
    pub port: u16,
    /// The node's underlay address; `None`: the tunnel is off.
    pub address: Option<std::net::Ipv4Addr>,
}

impl TunnelSettings {
    /// `lb.tunnel_port`, and `lb.node_address` or else the first IPv4
    /// address of the first uplink.
    pub fn of(config: &Config) -> Self {
        let uplink = config.dataplane.uplinks.first();
        let address = config
            .lb
            .node_address
            .or_else(|| uplink.and_then(|u| crate::net::addr::first_ipv4(u).ok().flatten()));
        Self {
            port: config.lb.tunnel_port,
            address,
        }
    }

    /// The map value: the tunnel is off without an address.
    pub fn config(&self) -> TunnelConfig {
        match self.address {
            Some(addr) => TunnelConfig {
                node_addr: addr.octets(),
                port: self.port,
                _pad: 0,
            },
            None => TunnelConfig::default(),
        }
    }
}

/// Writes `tm_tunnel`: the one writer of the tunnel endpoint.
pub fn write(ebpf: &mut Ebpf, settings: TunnelSettings) -> Result<(), DataplaneError> {
    let mut map: Array<_, TunnelConfig> =
        Array::try_from(map_mut(ebpf, n::TUNNEL)?).map_err(map_err(n::TUNNEL))?;
    map.set(0, settings.config(), 0).map_err(map_err(n::TUNNEL))
}
