//! Oakestra's `portMappings` ("8080:80;5353:53/udp"): a node port forwarded
//! to a container port, kept as one nftables table (`ip tapmesh_netmanager`)
//! rewritten whole, in one transaction, after every change.

use std::net::Ipv4Addr;

pub const TABLE: &str = "tapmesh_netmanager";

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
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
    #[error("portMappings {0:?}: each mapping is HOST:CONTAINER with an optional /tcp or /udp, separated by ';'")]
    Syntax(String),
    #[error("portMappings: {0} is not a port (1-65535)")]
    Port(String),
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
        let (host, container) = ports
            .split_once(':')
            .ok_or_else(|| PortError::Syntax(item.into()))?;
        out.push(PortMapping {
            protocol,
            host_port: port(host)?,
            container_port: port(container)?,
        });
    }
    Ok(out)
}

/// The nftables script that makes the table hold exactly `mappings`
/// (an empty list removes the table).
pub fn script(mappings: &[(Ipv4Addr, PortMapping)]) -> String {
    let mut s = format!("table ip {TABLE}\ndelete table ip {TABLE}\n");
    if mappings.is_empty() {
        return s;
    }
    s += &format!("table ip {TABLE} {{\n");
    let rules: String = mappings
        .iter()
        .map(|(addr, m)| {
            format!(
                "    fib daddr type local {} dport {} dnat to {addr}:{}\n",
                m.protocol.name(),
                m.host_port,
                m.container_port
            )
        })
        .collect();
    s += "  chain prerouting {\n    type nat hook prerouting priority dstnat; policy accept;\n";
    s += &rules;
    s += "  }\n  chain output {\n    type nat hook output priority -100; policy accept;\n";
    s += &rules;
    s += "  }\n}\n";
    s
}

/// Runs `nft -f -` with the script.
pub async fn apply(mappings: &[(Ipv4Addr, PortMapping)]) -> Result<(), String> {
    use tokio::io::AsyncWriteExt;
    let text = script(mappings);
    let mut child = tokio::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("running nft (install nftables for portMappings): {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(text.as_bytes())
            .await
            .map_err(|e| format!("writing to nft: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| format!("waiting for nft: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "nft refused the port mappings: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
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
        assert!(matches!(parse("8080"), Err(PortError::Syntax(_))));
        assert!(matches!(parse("8080:80/sctp"), Err(PortError::Syntax(_))));
        assert_eq!(parse("0:80"), Err(PortError::Port("0".into())));
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
}
