//! Container egress, as Oakestra's NetManager sets it up for its bridge:
//! IPv4 forwarding on, and the containers' subnet masqueraded behind the
//! node's address on the way out of the node. One nftables table (`ip
//! tapmesh_egress`), written whole in one transaction like the port mappings.
//! Oakestra masquerades by output interface (the default route's and any
//! en*/eth*/wl*); here by destination: everything leaving the subnet, so a
//! node with other uplinks needs no list, and container-to-container traffic
//! on the node keeps its addresses.

use crate::net::{nft, Prefix};

pub const TABLE: &str = "tapmesh_egress";

/// The table masquerading `subnet` (IPv4); without a subnet, none (writing
/// it removes the table). UDP to `tunnel_port` leaving the subnet is
/// dropped instead: masqueraded, a container's datagram would reach other
/// nodes from this node's address, which their tunnel trusts.
pub fn table(subnet: Option<Prefix>, tunnel_port: u16) -> nft::Table {
    let Some((std::net::IpAddr::V4(addr), len)) = subnet.map(|s| {
        let n = s.network();
        (n.addr, n.len)
    }) else {
        return nft::Table {
            name: TABLE.into(),
            chains: Vec::new(),
        };
    };
    nft::Table {
        name: TABLE.into(),
        chains: vec![nft::Chain {
            name: "postrouting".into(),
            hook: nft::Hook::Postrouting,
            priority: 100,
            rules: vec![
                nft::Rule {
                    matches: vec![
                        nft::Match::SourceIn(addr, len),
                        nft::Match::DestinationNotIn(addr, len),
                        nft::Match::DestinationPort(nft::L4::Udp, tunnel_port),
                    ],
                    action: nft::Action::Drop,
                },
                nft::Rule {
                    matches: vec![
                        nft::Match::SourceIn(addr, len),
                        nft::Match::DestinationNotIn(addr, len),
                    ],
                    action: nft::Action::Masquerade,
                },
            ],
        }],
    }
}

/// Writes the table (none: removes it) in one nf_tables transaction.
pub async fn apply(subnet: Option<Prefix>, tunnel_port: u16) -> Result<(), String> {
    let table = table(subnet, tunnel_port);
    tracing::debug!("container egress:\n{table}");
    tokio::task::spawn_blocking(move || nft::write(&table))
        .await
        .map_err(|e| format!("writing the masquerade table: {e}"))?
        .map_err(|e| format!("masquerade for container egress: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_subnet_is_masqueraded_when_it_leaves() {
        let subnet: Prefix = "192.0.2.64/26".parse().unwrap();
        assert_eq!(
            table(Some(subnet), 50103).to_string(),
            "table ip tapmesh_egress\ndelete table ip tapmesh_egress\ntable ip tapmesh_egress {\n  \
             chain postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n    \
             ip saddr 192.0.2.64/26 ip daddr != 192.0.2.64/26 udp dport 50103 drop\n    \
             ip saddr 192.0.2.64/26 ip daddr != 192.0.2.64/26 masquerade\n  }\n}\n"
        );
        assert!(table(None, 50103).chains.is_empty());
    }
}
