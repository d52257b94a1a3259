//! Configurations that parse but cannot work: two VIPs on one address (within
//! one source or across sources), a VIP that takes every packet or the node's
//! own address, a flow whose source subnets can never match one of its VIPs,
//! a remote target that is this node. All pure; the caller refuses the change.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::flows::{FlowSet, Vip, VipSpec};
use super::model::{LbError, LbSpec, TargetVia};
use crate::net::Prefix;

/// Who wrote a part of the LB configuration, as messages name it.
pub fn source_label(source: &str) -> String {
    match source {
        "lb" => "the LB file or admin API (lb)".into(),
        "nsp" => "the Meridio configuration (nsp)".into(),
        "eds" => "the EDS catalog (eds)".into(),
        other => format!("source {other:?}"),
    }
}

/// Checks of one validated set of VIPs and flows.
pub fn check_flow_set(set: &FlowSet) -> Result<(), LbError> {
    for vip in &set.vips {
        let everything = if vip.v6 {
            vip.prefix.len == 0
        } else {
            vip.prefix.len == 96
        };
        if everything {
            return Err(LbError::VipTakesEverything {
                vip: vip.name.clone(),
                value: written(&vip.prefix, vip.v6),
            });
        }
        if let Some(range) = not_unicast(&vip.prefix) {
            return Err(LbError::VipNotUnicast {
                vip: vip.name.clone(),
                value: written(&vip.prefix, vip.v6),
                range,
            });
        }
    }
    // IPv4 sources in the maps' space: ::ffff:0:0/96.
    let v4_space = Prefix::new(Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0), 96);
    for flow in set.flows.iter().filter(|f| !f.source_subnets.is_empty()) {
        let reaches_v4 = flow
            .source_subnets
            .iter()
            .any(|s| s.is_v4_mapped() || s.covers(&v4_space));
        let reaches_v6 = flow.source_subnets.iter().any(|s| !s.is_v4_mapped());
        for vip in set.vips.iter().filter(|v| flow.vips.contains(&v.name)) {
            let reached = if vip.v6 { reaches_v6 } else { reaches_v4 };
            if !reached {
                let (vip_family, subnet_family) = if vip.v6 {
                    ("IPv6", "IPv4")
                } else {
                    ("IPv4", "IPv6")
                };
                return Err(LbError::SubnetFamily {
                    flow: flow.name.clone(),
                    vip: vip.name.clone(),
                    vip_family,
                    subnet_family,
                });
            }
        }
    }
    Ok(())
}

/// A prefix of the maps' space as the user wrote it (IPv4 unmapped).
/// The special range a VIP prefix (in the maps' space) overlaps, if any:
/// packets there are the network's own (neighbour discovery, broadcasts,
/// multicast groups, loopback), not a service's, and a VIP would take them.
fn not_unicast(prefix: &Prefix) -> Option<&'static str> {
    let v4 = |a: [u8; 4], len: u8| Prefix::new(Ipv4Addr::from(a).to_ipv6_mapped(), 96 + len);
    let v6 = |a: &str, len: u8| Prefix::new(a.parse::<Ipv6Addr>().expect("a literal"), len);
    let ranges = [
        (v4([0, 0, 0, 0], 8), "0.0.0.0/8 (this network)"),
        (v4([127, 0, 0, 0], 8), "127.0.0.0/8 (loopback)"),
        (v4([224, 0, 0, 0], 4), "224.0.0.0/4 (multicast)"),
        (v4([240, 0, 0, 0], 4), "240.0.0.0/4 (reserved, broadcast)"),
        (v6("::", 128), "::/128 (unspecified)"),
        (v6("::1", 128), "::1/128 (loopback)"),
        (v6("fe80::", 10), "fe80::/10 (link-local)"),
        (v6("ff00::", 8), "ff00::/8 (multicast)"),
    ];
    ranges
        .into_iter()
        .find(|(range, _)| range.covers(prefix) || prefix.covers(range))
        .map(|(_, name)| name)
}

fn written(prefix: &Prefix, v6: bool) -> String {
    match prefix.addr {
        IpAddr::V6(a) if !v6 => match a.to_ipv4_mapped() {
            Some(v4) => format!("{v4}/{}", prefix.len.saturating_sub(96)),
            None => format!("{}/{}", prefix.addr, prefix.len),
        },
        addr => format!("{addr}/{}", prefix.len),
    }
}

/// Each VIP address belongs to one VIP of one source: refuses an address
/// two sources give (naming both), or two VIPs of one source. `parts` are
/// in the order sources are consulted; the first holds it. (Not in the
/// model's validation: the maps could hold both, the last writer winning.)
pub fn check_owners(parts: &[(&str, &LbSpec)]) -> Result<(), LbError> {
    let mut owners: HashMap<Prefix, (&str, &str)> = HashMap::new();
    for &(source, spec) in parts {
        for v in &spec.vips {
            let Ok(vip) = Vip::parse(v) else { continue };
            let prefix = vip.prefix;
            match owners.get(&prefix) {
                Some(&(owner_source, owner)) if owner_source != source => {
                    return Err(LbError::VipAddressTaken {
                        address: v.address.clone(),
                        vip: v.name.clone(),
                        claimant: source_label(source),
                        owner: owner.to_string(),
                        owner_source: source_label(owner_source),
                    });
                }
                Some(&(_, first)) => {
                    return Err(LbError::DuplicateVipAddress {
                        first: first.to_string(),
                        second: v.name.clone(),
                        address: written(&prefix, vip.v6),
                    });
                }
                None => {
                    owners.insert(prefix, (source, &v.name));
                }
            }
        }
    }
    // After the addresses: a clash of both is best named by its address.
    check_names(parts)
}

/// Each VIP, stream and flow name belongs to one source: a second source
/// using it is refused naming both (within one source, validation says
/// "defined twice").
fn check_names(parts: &[(&str, &LbSpec)]) -> Result<(), LbError> {
    let mut owners: HashMap<(&str, &str), &str> = HashMap::new();
    for &(source, spec) in parts {
        let names = spec
            .vips
            .iter()
            .map(|v| ("VIP", v.name.as_str()))
            .chain(spec.streams.iter().map(|s| ("stream", s.name.as_str())))
            .chain(spec.flows.iter().map(|f| ("flow", f.name.as_str())));
        for (kind, name) in names {
            match owners.get(&(kind, name)) {
                Some(&owner) if owner != source => {
                    return Err(LbError::NameTaken {
                        kind,
                        name: name.to_string(),
                        owner: source_label(owner),
                        claimant: source_label(source),
                    })
                }
                Some(_) => {}
                None => {
                    owners.insert((kind, name), source);
                }
            }
        }
    }
    Ok(())
}

/// Refuses what this node's own tunnel address makes unworkable: a remote
/// target on it (the packets would loop back and be dropped), a VIP
/// holding it (the node would stop answering); and a remote target's node
/// or a named tunnel peer (`peers`) inside a VIP (whoever sends from the
/// VIP's address would be trusted as a node).
pub fn check_node(
    spec: &LbSpec,
    node: Option<Ipv4Addr>,
    peers: &[Ipv4Addr],
) -> Result<(), LbError> {
    // The VIP (name and address as given) that holds an IPv4 address.
    let vips: Vec<(&VipSpec, Vip)> = spec
        .vips
        .iter()
        .filter_map(|v| Some((v, Vip::parse(v).ok()?)))
        .collect();
    let holding = |a: Ipv4Addr| {
        let mapped = IpAddr::V6(a.to_ipv6_mapped());
        vips.iter()
            .find(|(_, v)| !v.v6 && v.prefix.contains(mapped))
            .map(|(spec, _)| *spec)
    };
    for t in &spec.targets {
        let TargetVia::Remote { node: n } = &t.via else {
            continue;
        };
        let Some(vip) = n.parse().ok().and_then(holding) else {
            continue;
        };
        return Err(LbError::NodeIsVip {
            stream: t.stream.clone(),
            identifier: t.identifier,
            node: n.clone(),
            vip: vip.name.clone(),
        });
    }
    if let Some((peer, vip)) = peers.iter().find_map(|&p| Some((p, holding(p)?))) {
        return Err(LbError::PeerIsVip {
            peer,
            vip: vip.name.clone(),
        });
    }
    let Some(node) = node else { return Ok(()) };
    for t in &spec.targets {
        if let TargetVia::Remote { node: n } = &t.via {
            if n.parse::<Ipv4Addr>().ok() == Some(node) {
                return Err(LbError::TargetIsThisNode {
                    stream: t.stream.clone(),
                    identifier: t.identifier,
                    node,
                });
            }
        }
    }
    if let Some(v) = holding(node) {
        return Err(LbError::VipHoldsNode {
            vip: v.name.clone(),
            value: v.address.clone(),
            node,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lb::flows::FlowSpec;
    use crate::lb::model::{validate, StreamSpec, TargetSpec};

    fn vip(name: &str, address: &str) -> VipSpec {
        VipSpec {
            name: name.into(),
            address: address.into(),
        }
    }

    fn spec(vips: Vec<VipSpec>, subnets: &[&str]) -> LbSpec {
        LbSpec {
            flows: vec![FlowSpec {
                name: "f".into(),
                stream: "s".into(),
                vips: vips.iter().map(|v| v.name.clone()).collect(),
                source_subnets: subnets.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            }],
            vips,
            streams: vec![StreamSpec {
                name: "s".into(),
                max_targets: 4,
                table_size: None,
                port_nats: Vec::new(),
            }],
            targets: vec![],
        }
    }

    #[test]
    fn two_vips_on_one_address_are_refused_whatever_the_spelling() {
        let s = spec(
            vec![vip("a", "203.0.113.10"), vip("b", "203.0.113.10/32")],
            &[],
        );
        assert_eq!(
            check_owners(&[("lb", &s)]).unwrap_err(),
            LbError::DuplicateVipAddress {
                first: "a".into(),
                second: "b".into(),
                address: "203.0.113.10/32".into()
            }
        );
        let s = spec(
            vec![vip("a", "2001:db8::/64"), vip("b", "2001:db8::1/64")],
            &[],
        );
        assert!(matches!(
            check_owners(&[("lb", &s)]),
            Err(LbError::DuplicateVipAddress { .. })
        ));
        // Nested prefixes are distinct VIPs (longest prefix wins in the maps).
        let s = spec(
            vec![vip("a", "203.0.113.0/24"), vip("b", "203.0.113.10")],
            &[],
        );
        check_owners(&[("lb", &s)]).unwrap();
    }

    #[test]
    fn a_name_two_sources_give_is_refused_naming_both() {
        let admin = spec(vec![vip("vip2.trench-a", "198.51.100.50")], &[]);
        let meridio = spec(vec![vip("vip2.trench-a", "203.0.113.11")], &[]);
        match check_owners(&[("lb", &admin), ("nsp", &meridio)]).unwrap_err() {
            LbError::NameTaken {
                kind,
                name,
                owner,
                claimant,
            } => {
                assert_eq!((kind, name.as_str()), ("VIP", "vip2.trench-a"));
                assert_eq!(owner, source_label("lb"));
                assert_eq!(claimant, source_label("nsp"));
            }
            other => panic!("{other}"),
        }
    }

    #[test]
    fn a_vip_on_a_special_range_is_refused() {
        for (address, range) in [
            ("224.0.0.0/4", "224.0.0.0/4 (multicast)"),
            ("239.1.2.3", "224.0.0.0/4 (multicast)"),
            ("255.255.255.255", "240.0.0.0/4 (reserved, broadcast)"),
            ("127.0.0.1", "127.0.0.0/8 (loopback)"),
            ("0.0.0.0", "0.0.0.0/8 (this network)"),
            ("0.0.0.0/1", "0.0.0.0/8 (this network)"),
            ("ff02::/16", "ff00::/8 (multicast)"),
            ("ff02::1", "ff00::/8 (multicast)"),
            ("fe80::1", "fe80::/10 (link-local)"),
            ("::", "::/128 (unspecified)"),
            ("::1", "::1/128 (loopback)"),
        ] {
            let s = spec(vec![vip("odd", address)], &[]);
            match validate(&s).unwrap_err() {
                LbError::VipNotUnicast { range: r, .. } => assert_eq!(r, range, "{address}"),
                other => panic!("{address}: {other}"),
            }
        }
        for unicast in [
            "203.0.113.10",
            "198.51.100.16/28",
            "2001:db8::1",
            "2001:db8::/64",
        ] {
            validate(&spec(vec![vip("fine", unicast)], &[])).unwrap();
        }
    }

    #[test]
    fn a_vip_of_everything_is_refused() {
        for (address, written) in [("0.0.0.0/0", "0.0.0.0/0"), ("::/0", "::/0")] {
            let s = spec(vec![vip("all", address)], &[]);
            assert_eq!(
                validate(&s).unwrap_err(),
                LbError::VipTakesEverything {
                    vip: "all".into(),
                    value: written.into()
                },
                "{address}"
            );
        }
        // Wide, but of unicast addresses only.
        validate(&spec(vec![vip("quarter", "128.0.0.0/2")], &[])).unwrap();
    }

    #[test]
    fn a_flow_whose_subnets_never_match_a_vip_is_refused() {
        let s = spec(vec![vip("v6", "2001:db8::1")], &["192.0.2.0/24"]);
        let e = validate(&s).unwrap_err();
        assert_eq!(
            e,
            LbError::SubnetFamily {
                flow: "f".into(),
                vip: "v6".into(),
                vip_family: "IPv6",
                subnet_family: "IPv4"
            }
        );
        assert!(e.to_string().contains("add an IPv6 source subnet"), "{e}");
        let s = spec(vec![vip("v4", "192.0.2.1")], &["2001:db8::/32"]);
        assert!(matches!(
            validate(&s),
            Err(LbError::SubnetFamily {
                vip_family: "IPv4",
                ..
            })
        ));
        // Either family present, "any" (all /0) or ::/0 reach both.
        for ok in [
            &["192.0.2.0/24", "2001:db8::/32"][..],
            &["0.0.0.0/0"],
            &["::/0", "192.0.2.0/24"],
        ] {
            let s = spec(vec![vip("v4", "192.0.2.1"), vip("v6", "2001:db8::1")], ok);
            validate(&s).unwrap_or_else(|e| panic!("{ok:?}: {e}"));
        }
    }

    #[test]
    fn each_address_belongs_to_one_source_and_the_message_names_both() {
        let file = spec(vec![vip("vip1", "203.0.113.10")], &[]);
        let meridio = spec(vec![vip("vip1.trench-a", "203.0.113.10/32")], &[]);
        let e = check_owners(&[("lb", &file), ("nsp", &meridio)]).unwrap_err();
        let text = e.to_string();
        for needle in ["vip1", "vip1.trench-a", "(lb)", "(nsp)", "203.0.113.10/32"] {
            assert!(text.contains(needle), "{needle:?} in {text}");
        }
        let mut other = spec(vec![vip("eds.web", "203.0.113.20")], &[]);
        other.streams[0].name = "eds.s".into();
        other.flows[0].name = "eds.f".into();
        other.flows[0].stream = "eds.s".into();
        check_owners(&[("lb", &file), ("eds", &other)]).unwrap();
    }

    #[test]
    fn this_nodes_address_is_neither_a_remote_target_nor_inside_a_vip() {
        let node: Ipv4Addr = "198.51.100.1".parse().unwrap();
        let mut s = spec(vec![vip("v", "203.0.113.10")], &[]);
        s.targets.push(TargetSpec {
            stream: "s".into(),
            identifier: 2,
            via: TargetVia::Remote {
                node: "198.51.100.1".into(),
            },
        });
        assert_eq!(
            check_node(&s, Some(node), &[]).unwrap_err(),
            LbError::TargetIsThisNode {
                stream: "s".into(),
                identifier: 2,
                node
            }
        );
        check_node(&s, None, &[]).unwrap();
        s.targets.clear();
        check_node(&s, Some(node), &[]).unwrap();
        s.vips.push(vip("net", "198.51.100.0/24"));
        assert!(matches!(
            check_node(&s, Some(node), &[]),
            Err(LbError::VipHoldsNode { .. })
        ));
    }

    #[test]
    fn a_remote_targets_node_inside_a_vip_is_refused_with_or_without_a_tunnel() {
        let mut s = spec(vec![vip("v", "203.0.113.16/28")], &[]);
        s.targets.push(TargetSpec {
            stream: "s".into(),
            identifier: 1,
            via: TargetVia::Remote {
                node: "198.51.100.2".into(),
            },
        });
        check_node(&s, None, &[]).unwrap();
        s.targets[0].via = TargetVia::Remote {
            node: "203.0.113.20".into(),
        };
        let refused = LbError::NodeIsVip {
            stream: "s".into(),
            identifier: 1,
            node: "203.0.113.20".into(),
            vip: "v".into(),
        };
        assert_eq!(check_node(&s, None, &[]).unwrap_err(), refused);
        let node = Some("198.51.100.1".parse().unwrap());
        assert_eq!(check_node(&s, node, &[]).unwrap_err(), refused);
        // A named tunnel peer, the same.
        s.targets.clear();
        let peer = "203.0.113.17".parse().unwrap();
        check_node(&s, None, &["198.51.100.2".parse().unwrap()]).unwrap();
        assert_eq!(
            check_node(&s, None, &[peer]).unwrap_err(),
            LbError::PeerIsVip {
                peer,
                vip: "v".into()
            }
        );
    }
}
