//! Oakestra's `portMappings` ("8080:80;5353:53/udp"): a node port forwarded
//! to a container port, kept as one nftables table (`ip tapmesh_netmanager`)
//! rewritten whole, in one transaction, after every change (through
//! [`crate::net::nft`]).

use std::net::Ipv4Addr;

use crate::net::nft;

pub const TABLE: &str = "tapmesh_netmanager";

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    fn l4(self) -> nft::L4 {
        match self {
            Protocol::Tcp => nft::L4::Tcp,
            Protocol::Udp => nft::L4::Udp,
        }
    }
}

/// One mapping: node port → container port.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct PortMapping {
    pub protocol: Protocol,
    pub host_port: u16,
    pub container_port: u16,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PortError {
    #[error("portMappings {0:?}: each mapping is HOST:CONTAINER or PORT with an optional /tcp or /udp, separated by ';'")]
    Syntax(String),
    #[error("portMappings: {0} is not a port (1-65535)")]
    Port(String),
    #[error("portMappings: node port {0} ({1:?}) is given twice")]
    Twice(u16, Protocol),
}

/// Parses Oakestra's mapping list; empty text is no mapping.
pub fn parse(text: &str) -> Result<Vec<PortMapping>, PortError> {
    let port = |p: &str| {
        p.trim()
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| PortError::Port(p.trim().to_string()))
    };
    let mut out = Vec::new();
    for item in text.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        let (ports, protocol) = match item.split_once('/') {
            Some((ports, "tcp")) => (ports, Protocol::Tcp),
            Some((ports, "udp")) => (ports, Protocol::Udp),
            Some(_) => return Err(PortError::Syntax(item.into())),
            None => (item, Protocol::Tcp),
        };
        // A single port ("9080") maps the node port to the same container port.
        let (host, container) = ports.split_once(':').unwrap_or((ports, ports));
        let host_port = port(host)?;
        if out
            .iter()
            .any(|m: &PortMapping| m.protocol == protocol && m.host_port == host_port)
        {
            return Err(PortError::Twice(host_port, protocol));
        }
        out.push(PortMapping {
            protocol,
            host_port,
            container_port: port(container)?,
        });
    }
    Ok(out)
}

/// Whether a socket of the node holds `mapping`'s node port (its DNAT
/// would take that service's traffic, the node's own included): tried by
/// binding the port on every address, and letting go at once.
pub fn held_on_node(mapping: &PortMapping) -> Option<std::io::Error> {
    let any = (Ipv4Addr::UNSPECIFIED, mapping.host_port);
    let bound = match mapping.protocol {
        Protocol::Tcp => std::net::TcpListener::bind(any).map(drop),
        Protocol::Udp => std::net::UdpSocket::bind(any).map(drop),
    };
    bound
        .err()
        .filter(|e| e.kind() == std::io::ErrorKind::AddrInUse)
}

/// The nftables table that holds exactly `mappings`: a prerouting and an
/// output chain (for the node's own connections) with one DNAT rule per
/// mapping; no chains when there is none (writing it removes the table).
pub fn table(mappings: &[(Ipv4Addr, PortMapping)]) -> nft::Table {
    if mappings.is_empty() {
        return nft::Table {
            name: TABLE.into(),
            chains: Vec::new(),
        };
    }
    let rules: Vec<nft::Rule> = mappings
        .iter()
        .map(|(addr, m)| nft::Rule {
            matches: vec![
                nft::Match::DestinationLocal,
                nft::Match::DestinationPort(m.protocol.l4(), m.host_port),
            ],
            action: nft::Action::Dnat(*addr, m.container_port),
        })
        .collect();
    let chain = |name: &str, hook| nft::Chain {
        name: name.into(),
        hook,
        priority: -100,
        rules: rules.clone(),
    };
    nft::Table {
        name: TABLE.into(),
        chains: vec![
            chain("prerouting", nft::Hook::Prerouting),
            chain("output", nft::Hook::Output),
        ],
    }
}

/// The transaction [`apply`] sends, as an `nft -f` script (for logs).
pub fn script(mappings: &[(Ipv4Addr, PortMapping)]) -> String {
    table(mappings).to_string()
}

/// Writes the table in one nf_tables transaction.
pub async fn apply(mappings: &[(Ipv4Addr, PortMapping)]) -> Result<(), String> {
    let table = table(mappings);
    tracing::debug!("port mappings:\n{table}");
    tokio::task::spawn_blocking(move || nft::write(&table))
        .await
        .map_err(|e| format!("writing the port mappings: {e}"))?
        .map_err(|e| format!("port mappings: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oakestra_mappings_parse_and_bad_ones_say_why() {
        assert_eq!(
            parse("8080:80; 5353:53/udp").unwrap(),
            vec![
                PortMapping {
                    protocol: Protocol::Tcp,
                    host_port: 8080,
                    container_port: 80
                },
                PortMapping {
                    protocol: Protocol::Udp,
                    host_port: 5353,
                    container_port: 53
                },
            ]
        );
        assert_eq!(parse("").unwrap(), vec![]);
        // Oakestra's own example: one port, the same inside.
        assert_eq!(
            parse("9080").unwrap(),
            vec![PortMapping {
                protocol: Protocol::Tcp,
                host_port: 9080,
                container_port: 9080
            }]
        );
        assert_eq!(parse("53/udp").unwrap()[0].container_port, 53);
        assert!(matches!(parse("8080:"), Err(PortError::Port(_))));
        assert!(matches!(parse("8080:80/sctp"), Err(PortError::Syntax(_))));
        assert_eq!(parse("0:80"), Err(PortError::Port("0".into())));
        // One node port once per protocol.
        assert_eq!(
            parse("8081:7000/udp;8081:7001/udp"),
            Err(PortError::Twice(8081, Protocol::Udp))
        );
        assert_eq!(parse("8081:7000/udp;8081:7001").unwrap().len(), 2);
        let s = script(&[(
            Ipv4Addr::new(192, 0, 2, 2),
            parse("8080:80/udp").unwrap()[0],
        )]);
        assert!(
            s.contains("fib daddr type local udp dport 8080 dnat to 192.0.2.2:80"),
            "{s}"
        );
        assert!(script(&[]).ends_with("delete table ip tapmesh_netmanager\n"));
    }

    #[test]
    fn a_node_port_a_socket_holds_is_seen() {
        let held = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = held.local_addr().unwrap().port();
        let tcp = PortMapping {
            protocol: Protocol::Tcp,
            host_port: port,
            container_port: 80,
        };
        assert!(held_on_node(&tcp).is_some());
        drop(held);
        assert!(held_on_node(&tcp).is_none());
    }
}
