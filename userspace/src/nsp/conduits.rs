//! Conduit connections: one veth per (application namespace, conduit), its
//! addresses from the node's conduit pools and the conduit's VIPs on it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

use crate::net::{netns::NetnsId, veth::Veth, Prefix};

/// One application namespace connected to one conduit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connection {
    pub netns: NetnsId,
    /// The process that last connected (to find the namespace again).
    pub pid: i32,
    /// Its uid (what `nsp.limits.conduits_per_uid` counts).
    #[serde(default)]
    pub uid: u32,
    pub trench: String,
    pub conduit: String,
    pub block: u32,
    pub link: Veth,
    pub local: Vec<Prefix>,
    pub gateways: Vec<Prefix>,
    pub vips: Vec<Prefix>,
    /// Policy routing table in the application namespace for VIP-sourced traffic.
    pub table: u32,
}

impl Connection {
    pub fn local_ips(&self) -> Vec<String> {
        let mut ips: Vec<String> = self.local.iter().map(Prefix::to_string).collect();
        ips.sort();
        ips
    }

    pub fn gateway_addrs(&self) -> Vec<IpAddr> {
        self.gateways.iter().map(|c| c.addr).collect()
    }
}

/// Address pools: each connection takes a block of four addresses (a /30 and
/// a /126): the node side is the block's first host, the application the second.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pools {
    pub v4: Option<(Ipv4Addr, u8)>,
    pub v6: Option<(Ipv6Addr, u8)>,
}

impl Pools {
    /// How many blocks the pools hold (the smaller pool decides).
    pub fn blocks(&self) -> u32 {
        let v4 = self.v4.map(|(_, p)| 1u64 << (32 - p.min(30)) >> 2);
        let v6 = self.v6.map(|(_, p)| 1u64 << (128 - p.clamp(96, 126)) >> 2);
        [v4, v6]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(0)
            .min(u64::from(u32::MAX)) as u32
    }

    /// (gateways, local addresses) of block `n`.
    pub fn block(&self, n: u32) -> (Vec<Prefix>, Vec<Prefix>) {
        let (mut gateways, mut local) = (Vec::new(), Vec::new());
        if let Some((base, _)) = self.v4 {
            let at = |k: u32| IpAddr::V4(Ipv4Addr::from(u32::from(base) + 4 * n + k));
            gateways.push(Prefix::new(at(1), 30));
            local.push(Prefix::new(at(2), 30));
        }
        if let Some((base, _)) = self.v6 {
            let at = |k: u32| {
                IpAddr::V6(Ipv6Addr::from(
                    u128::from(base) + 4 * u128::from(n) + u128::from(k),
                ))
            };
            gateways.push(Prefix::new(at(1), 126));
            local.push(Prefix::new(at(2), 126));
        }
        (gateways, local)
    }

    /// The lowest block no connection uses.
    pub fn free_block(&self, used: impl Iterator<Item = u32>) -> Option<u32> {
        let used: std::collections::BTreeSet<u32> = used.collect();
        (0..self.blocks()).find(|b| !used.contains(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_hand_out_node_and_application_addresses() {
        let pools = Pools {
            v4: Some(("198.18.0.0".parse().unwrap(), 28)),
            v6: Some(("2001:db8:1::".parse().unwrap(), 64)),
        };
        assert_eq!(pools.blocks(), 4);
        let (gw, local) = pools.block(1);
        assert_eq!(gw[0].to_string(), "198.18.0.5/30");
        assert_eq!(local[0].to_string(), "198.18.0.6/30");
        assert_eq!(gw[1].to_string(), "2001:db8:1::5/126");
        assert_eq!(local[1].to_string(), "2001:db8:1::6/126");
        assert_eq!(pools.free_block([0, 2].into_iter()), Some(1));
        assert_eq!(pools.free_block([0, 1, 2, 3].into_iter()), None);
    }
}
