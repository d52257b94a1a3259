//! Destination port NAT of a stream (Meridio's conduit `destinationPortNats`):
//! TCP or UDP traffic to one of `vips` on `port` reaches the stream's
//! targets on `target_port`, and their replies leave from `port` again.
//! Validated here as a whole; `lb::tables` turns it into map entries.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};
use tapmesh_common::lb::MAX_PORT_NATS;

use super::flows::CompiledVip;

/// A port NAT as written (Meridio's `PortNat`; `vips` are VIP names).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortNatSpec {
    pub port: u16,
    pub target_port: u16,
    /// "tcp" or "udp" (either case).
    pub protocol: String,
    pub vips: Vec<String>,
}

/// A validated port NAT: `protocol` is the IP protocol number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidPortNat {
    pub protocol: u8,
    pub port: u16,
    pub target_port: u16,
    pub vips: Vec<String>,
}

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;

/// Each message names the stream (or conduit) and the NAT, and says what to fix.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PortNatError {
    #[error("{owner} port NAT {port}->{target_port}: protocol {protocol:?} is not translated; use \"tcp\" or \"udp\"")]
    Protocol {
        owner: String,
        port: u16,
        target_port: u16,
        protocol: String,
    },
    #[error("{owner} port NAT {port}->{target_port}: SCTP ports cannot be translated statelessly (its CRC32c covers the whole packet); use \"tcp\" or \"udp\"")]
    Sctp {
        owner: String,
        port: u16,
        target_port: u16,
    },
    #[error(
        "{owner} port NAT {port}->{target_port}: port and target_port must be 1..=65535 and differ"
    )]
    Ports {
        owner: String,
        port: u16,
        target_port: u16,
    },
    #[error("{owner} port NAT {port}->{target_port}: no VIPs; name the VIPs whose traffic it translates")]
    NoVips {
        owner: String,
        port: u16,
        target_port: u16,
    },
    #[error(
        "{owner} port NAT {port}->{target_port}: unknown VIP {vip:?}; define it or fix the name"
    )]
    UnknownVip {
        owner: String,
        port: u16,
        target_port: u16,
        vip: String,
    },
    #[error("{owner} port NATs {first} and {second} collide on VIP {vip:?}: a port is translated once and a target port is used once per VIP and protocol; merge or change them")]
    Collision {
        owner: String,
        vip: String,
        first: String,
        second: String,
    },
    #[error("VIP {vip:?}: replies from {protocol} port {target_port} cannot go back to both port {first_port} (stream {first:?}) and port {second_port} (stream {second:?}); use another target_port in one of them")]
    ReplyClash {
        vip: String,
        protocol: &'static str,
        target_port: u16,
        first: String,
        first_port: u16,
        second: String,
        second_port: u16,
    },
    #[error("the port NATs need {count} entries; at most {MAX_PORT_NATS} fit (NATs x their VIPs x the flows reaching them), remove some")]
    TooMany { count: usize },
}

fn protocol_name(p: u8) -> &'static str {
    if p == TCP {
        "tcp"
    } else {
        "udp"
    }
}

/// The checks of one NAT on its own (also the Meridio file's, for conduits).
pub fn check_one(owner: &str, nat: &PortNatSpec) -> Result<u8, PortNatError> {
    let (port, target_port) = (nat.port, nat.target_port);
    let protocol = match nat.protocol.to_ascii_lowercase().as_str() {
        "tcp" => TCP,
        "udp" => UDP,
        "sctp" => {
            return Err(PortNatError::Sctp {
                owner: owner.into(),
                port,
                target_port,
            })
        }
        _ => {
            return Err(PortNatError::Protocol {
                owner: owner.into(),
                port,
                target_port,
                protocol: nat.protocol.clone(),
            })
        }
    };
    if port == 0 || target_port == 0 || port == target_port {
        return Err(PortNatError::Ports {
            owner: owner.into(),
            port,
            target_port,
        });
    }
    if nat.vips.is_empty() {
        return Err(PortNatError::NoVips {
            owner: owner.into(),
            port,
            target_port,
        });
    }
    Ok(protocol)
}

/// Meridio's rule within one conduit: per VIP and protocol, every `port`
/// and every `target_port` is used once (neither twice, nor one as the other).
pub fn check_collisions(owner: &str, nats: &[PortNatSpec]) -> Result<(), PortNatError> {
    let mut used: HashMap<(&str, String, u16), usize> = HashMap::new();
    for (i, nat) in nats.iter().enumerate() {
        let protocol = nat.protocol.to_ascii_lowercase();
        let mut own = HashSet::new();
        for vip in &nat.vips {
            for port in [nat.port, nat.target_port] {
                let key = (vip.as_str(), protocol.clone(), port);
                match used.get(&key) {
                    Some(&j) if j != i => {
                        return Err(PortNatError::Collision {
                            owner: owner.into(),
                            vip: vip.clone(),
                            first: describe(&nats[j]),
                            second: describe(nat),
                        })
                    }
                    _ => {}
                }
                own.insert(key);
            }
        }
        for key in own {
            used.insert(key, i);
        }
    }
    Ok(())
}

fn describe(nat: &PortNatSpec) -> String {
    format!(
        "{} {}->{}",
        nat.protocol.to_ascii_lowercase(),
        nat.port,
        nat.target_port
    )
}

/// Every stream's NATs checked, by stream name. `vip_addresses` maps VIP
/// names to their addresses (replies are told apart by address).
pub fn validate(
    streams: &[(String, Vec<PortNatSpec>)],
    vip_addresses: &HashMap<&str, String>,
) -> Result<BTreeMap<String, Vec<ValidPortNat>>, PortNatError> {
    let mut out = BTreeMap::new();
    // (VIP address, protocol, target port) → (stream, port): one way back.
    let mut replies: HashMap<(&str, u8, u16), (&str, u16, &str)> = HashMap::new();
    for (stream, nats) in streams {
        if nats.is_empty() {
            continue;
        }
        let owner = format!("stream {stream:?}");
        let protocols = nats
            .iter()
            .map(|nat| check_one(&owner, nat))
            .collect::<Result<Vec<u8>, _>>()?;
        check_collisions(&owner, nats)?;
        let mut valid = Vec::with_capacity(nats.len());
        for (nat, protocol) in nats.iter().zip(protocols) {
            for vip in &nat.vips {
                let Some(address) = vip_addresses.get(vip.as_str()) else {
                    return Err(PortNatError::UnknownVip {
                        owner,
                        port: nat.port,
                        target_port: nat.target_port,
                        vip: vip.clone(),
                    });
                };
                let key = (address.as_str(), protocol, nat.target_port);
                match replies.get(&key) {
                    Some(&(first, first_port, _)) if first_port != nat.port => {
                        return Err(PortNatError::ReplyClash {
                            vip: vip.clone(),
                            protocol: protocol_name(protocol),
                            target_port: nat.target_port,
                            first: first.into(),
                            first_port,
                            second: stream.clone(),
                            second_port: nat.port,
                        })
                    }
                    _ => {
                        replies.insert(key, (stream.as_str(), nat.port, vip.as_str()));
                    }
                }
            }
            valid.push(ValidPortNat {
                protocol,
                port: nat.port,
                target_port: nat.target_port,
                vips: nat.vips.clone(),
            });
        }
        out.insert(stream.clone(), valid);
    }
    Ok(out)
}

/// For flow `flow` of `vip`: the (protocol, port, target port) translated.
pub fn of_flow<'a>(
    nats: &'a BTreeMap<String, Vec<ValidPortNat>>,
    vip: &'a CompiledVip,
    stream: &str,
) -> impl Iterator<Item = &'a ValidPortNat> + 'a {
    nats.get(stream)
        .into_iter()
        .flatten()
        .filter(move |n| n.vips.contains(&vip.name))
}

/// How many `tm_port_nats` entries the configuration needs (a NAT per flow
/// of each of its VIPs that leads to its stream); refused past the limit.
pub fn check_count(
    nats: &BTreeMap<String, Vec<ValidPortNat>>,
    vips: &[CompiledVip],
) -> Result<(), PortNatError> {
    let forward: usize = vips
        .iter()
        .flat_map(|v| {
            v.flows
                .iter()
                .map(move |f| of_flow(nats, v, &f.stream).count())
        })
        .sum();
    let replies: usize = nats.values().flatten().map(|n| n.vips.len()).sum();
    let count = forward.max(replies);
    if count > MAX_PORT_NATS as usize {
        return Err(PortNatError::TooMany { count });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nat(protocol: &str, port: u16, target_port: u16, vips: &[&str]) -> PortNatSpec {
        PortNatSpec {
            port,
            target_port,
            protocol: protocol.into(),
            vips: vips.iter().map(|v| v.to_string()).collect(),
        }
    }

    fn run(streams: Vec<(&str, Vec<PortNatSpec>)>) -> Result<(), String> {
        let addresses: HashMap<&str, String> = [("v1", "192.0.2.1"), ("v2", "192.0.2.2")]
            .into_iter()
            .map(|(n, a)| (n, a.to_string()))
            .collect();
        let streams: Vec<(String, Vec<PortNatSpec>)> = streams
            .into_iter()
            .map(|(s, n)| (s.to_string(), n))
            .collect();
        validate(&streams, &addresses)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn meridio_collisions_and_bad_values_are_refused_by_name() {
        assert_eq!(
            run(vec![(
                "s",
                vec![nat("TCP", 80, 8080, &["v1"]), nat("udp", 80, 8080, &["v1"])]
            )]),
            Ok(())
        );
        let e = run(vec![(
            "s",
            vec![
                nat("tcp", 80, 8080, &["v1"]),
                nat("tcp", 81, 8080, &["v2", "v1"]),
            ],
        )])
        .unwrap_err();
        assert_eq!(e, "stream \"s\" port NATs tcp 80->8080 and tcp 81->8080 collide on VIP \"v1\": a port is translated once and a target port is used once per VIP and protocol; merge or change them");
        // One NAT's port is another's target port.
        assert!(run(vec![(
            "s",
            vec![
                nat("tcp", 80, 8080, &["v1"]),
                nat("tcp", 8080, 9090, &["v1"])
            ]
        )])
        .unwrap_err()
        .contains("collide"));
        // On different VIPs they do not collide.
        assert_eq!(
            run(vec![(
                "s",
                vec![nat("tcp", 80, 8080, &["v1"]), nat("tcp", 81, 8080, &["v2"])]
            )]),
            Ok(())
        );
        assert!(run(vec![("s", vec![nat("sctp", 80, 8080, &["v1"])])])
            .unwrap_err()
            .contains("CRC32c"));
        assert!(run(vec![("s", vec![nat("icmp", 80, 8080, &["v1"])])])
            .unwrap_err()
            .contains("use \"tcp\" or \"udp\""));
        assert!(run(vec![("s", vec![nat("tcp", 80, 80, &["v1"])])])
            .unwrap_err()
            .contains("must be 1..=65535 and differ"));
        assert!(run(vec![("s", vec![nat("tcp", 0, 80, &["v1"])])])
            .unwrap_err()
            .contains("must be 1..=65535"));
        assert!(run(vec![("s", vec![nat("tcp", 80, 81, &[])])])
            .unwrap_err()
            .contains("no VIPs"));
        assert!(run(vec![("s", vec![nat("tcp", 80, 81, &["v9"])])])
            .unwrap_err()
            .contains("unknown VIP \"v9\""));
    }

    #[test]
    fn replies_need_one_way_back_across_streams() {
        // The same translation in two streams is one reply entry.
        assert_eq!(
            run(vec![
                ("a", vec![nat("tcp", 80, 8080, &["v1"])]),
                ("b", vec![nat("tcp", 80, 8080, &["v1"])]),
            ]),
            Ok(())
        );
        let e = run(vec![
            ("a", vec![nat("tcp", 80, 8080, &["v1"])]),
            ("b", vec![nat("tcp", 81, 8080, &["v1"])]),
        ])
        .unwrap_err();
        assert_eq!(e, "VIP \"v1\": replies from tcp port 8080 cannot go back to both port 80 (stream \"a\") and port 81 (stream \"b\"); use another target_port in one of them");
    }
}
