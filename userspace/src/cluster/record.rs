//! What the cluster keeps in etcd, under the configured prefix:
//!
//! | key | value | bound to |
//! |---|---|---|
//! | `nodes/<node>` | [`NodeRecord`] (JSON) | the node's lease |
//! | `targets/<trench>/<node>/<target key>` | [`TargetRecord`] (JSON) | the owner's lease |
//! | `ids/<trench>/<stream>/<identifier>` | `<node>/<target key>`: who holds the identifier | the holder's lease |
//!
//! Pure: keys, values and their parsing; anything else under the prefix is
//! foreign and skipped.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::net::Prefix;
use crate::nsp::config::StreamPath;
use crate::nsp::registry::Target;

/// A node as the others see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    /// Where other nodes send tunnel packets for this node's targets.
    pub tunnel_addresses: Vec<Ipv4Addr>,
    /// Conduit address pools (`nsp.conduit_prefix_v4/v6`).
    pub conduit_prefixes: Vec<String>,
    /// Container subnetworks (`netmanager.subnetwork`, `subnetwork_v6`).
    pub container_subnets: Vec<String>,
    /// Pod CIDRs this node serves.
    pub pod_cidrs: Vec<String>,
    pub version: String,
}

impl NodeRecord {
    fn prefix_texts(&self) -> impl Iterator<Item = &String> + Clone {
        self.conduit_prefixes
            .iter()
            .chain(&self.container_subnets)
            .chain(&self.pod_cidrs)
    }

    /// Every prefix whose addresses the node serves (a parsed record's all parse).
    pub fn prefixes(&self) -> Vec<Prefix> {
        self.prefix_texts().filter_map(|p| p.parse().ok()).collect()
    }
}

/// A target of a node's registry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetRecord {
    pub node: String,
    pub target: Target,
    /// On a conduit of its node: the node delivers what is tunnelled to it.
    pub served: bool,
}

/// A parsed key under the prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Key {
    Node(String),
    /// Under `targets/<trench>/<node>/<key>`: a record under another
    /// trench is another key, never the one it imitates.
    Target {
        trench: String,
        node: String,
        key: String,
    },
    Id,
}

/// Keys under one prefix (ends with '/').
#[derive(Clone, Debug)]
pub struct Keys {
    pub prefix: String,
}

impl Keys {
    pub fn node(&self, name: &str) -> String {
        format!("{}nodes/{name}", self.prefix)
    }

    /// The target's key; `None` for targets without a stream (FRONTEND).
    pub fn target(&self, node: &str, target: &Target) -> Option<String> {
        let trench = &target.stream.as_ref()?.trench;
        Some(format!(
            "{}targets/{trench}/{node}/{}",
            self.prefix,
            target.key()
        ))
    }

    pub fn id(&self, stream: &StreamPath, id: u32) -> String {
        format!(
            "{}ids/{}/{}/{id}",
            self.prefix,
            stream.trench,
            stream.full_name()
        )
    }

    pub fn ids(&self) -> String {
        format!("{}ids/", self.prefix)
    }

    /// What `key` is; `None`: not ours (foreign or malformed).
    pub fn parse(&self, key: &[u8]) -> Option<Key> {
        let key = std::str::from_utf8(key).ok()?.strip_prefix(&self.prefix)?;
        if let Some(name) = key.strip_prefix("nodes/") {
            return (!name.is_empty() && !name.contains('/')).then(|| Key::Node(name.into()));
        }
        if let Some(rest) = key.strip_prefix("targets/") {
            let (trench, rest) = rest.split_once('/')?;
            let (node, key) = rest.split_once('/')?;
            return (!trench.is_empty() && !node.is_empty() && !key.is_empty()).then(|| {
                Key::Target {
                    trench: trench.into(),
                    node: node.into(),
                    key: key.into(),
                }
            });
        }
        key.starts_with("ids/").then_some(Key::Id)
    }
}

/// The owner string of an identifier claim.
pub fn claim_owner(node: &str, target: &Target) -> String {
    format!("{node}/{}", target.key())
}

/// A value that is not what its key says it holds.
#[derive(Debug, PartialEq, Eq)]
pub struct BadValue(pub String);

pub fn parse_node(name: &str, value: &[u8]) -> Result<NodeRecord, BadValue> {
    let record: NodeRecord =
        serde_json::from_slice(value).map_err(|e| BadValue(format!("not a node record: {e}")))?;
    if record.name != name {
        return Err(BadValue(format!(
            "names node {:?} under the key of {name:?}",
            record.name
        )));
    }
    if let Some(bad) = record.prefix_texts().find(|p| p.parse::<Prefix>().is_err()) {
        return Err(BadValue(format!("{bad:?} is not a prefix")));
    }
    // Its targets are written to the LB maps with this address as their
    // node: one no node can have would refuse the whole view there.
    if let Some(bad) = record
        .tunnel_addresses
        .iter()
        .find(|a| a.is_unspecified() || a.is_loopback() || a.is_multicast() || a.is_broadcast())
    {
        return Err(BadValue(format!(
            "tunnel address {bad} is not a unicast address a node can have"
        )));
    }
    Ok(record)
}

pub fn parse_target(
    trench: &str,
    node: &str,
    key: &str,
    value: &[u8],
) -> Result<TargetRecord, BadValue> {
    let record: TargetRecord =
        serde_json::from_slice(value).map_err(|e| BadValue(format!("not a target record: {e}")))?;
    let in_trench = record
        .target
        .stream
        .as_ref()
        .is_some_and(|s| s.trench == trench);
    if record.node != node || record.target.key() != key || !in_trench {
        return Err(BadValue(
            "its node, target or stream does not match its key".into(),
        ));
    }
    crate::nsp::registry::well_formed(&record.target).map_err(|e| BadValue(e.to_string()))?;
    Ok(record)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::nsp::registry::{Kind, Status, IDENTIFIER};

    /// A target of stream s.c.t (identifier 3); the view's tests use it too.
    pub(in crate::cluster) fn target() -> Target {
        Target {
            ips: vec!["169.254.100.2/30".into()],
            context: [(IDENTIFIER.to_string(), "3".to_string())].into(),
            status: Status::Enabled,
            kind: Kind::Default,
            stream: Some(StreamPath {
                trench: "t".into(),
                conduit: "c".into(),
                stream: "s".into(),
            }),
        }
    }

    #[test]
    fn a_node_record_with_an_address_no_node_can_have_is_bad() {
        for address in ["0.0.0.0", "127.0.0.1", "224.0.0.1", "255.255.255.255"] {
            let value = format!(
                r#"{{"name":"evil","tunnel_addresses":["{address}"],"conduit_prefixes":[],"container_subnets":[],"pod_cidrs":[],"version":"x"}}"#
            );
            let e = parse_node("evil", value.as_bytes()).unwrap_err();
            assert!(e.0.contains("not a unicast address"), "{address}: {e:?}");
        }
        let good = r#"{"name":"n2","tunnel_addresses":["198.51.100.2"],"conduit_prefixes":[],"container_subnets":[],"pod_cidrs":[],"version":"x"}"#;
        parse_node("n2", good.as_bytes()).unwrap();
    }

    #[test]
    fn keys_round_trip_and_foreign_keys_are_not_ours() {
        let keys = Keys {
            prefix: "/tapmesh/v1/".into(),
        };
        let t = target();
        let k = keys.target("n2", &t).unwrap();
        assert_eq!(k, "/tapmesh/v1/targets/t/n2/169.254.100.2/30-Default-s.c.t");
        assert_eq!(
            keys.parse(k.as_bytes()),
            Some(Key::Target {
                trench: "t".into(),
                node: "n2".into(),
                key: t.key()
            })
        );
        assert_eq!(
            keys.parse(keys.node("n1").as_bytes()),
            Some(Key::Node("n1".into()))
        );
        assert_eq!(
            keys.id(t.stream.as_ref().unwrap(), 3),
            "/tapmesh/v1/ids/t/s.c.t/3"
        );
        for foreign in [
            &b"/other/nodes/n1"[..],
            b"/tapmesh/v1/nodes/",
            b"/tapmesh/v1/nodes/a/b",
            b"/tapmesh/v1/targets/t/n2",
            b"/tapmesh/v1/targets//n2/k",
            b"/tapmesh/v1/whatever",
            b"/tapmesh/v1/\xff",
        ] {
            assert_eq!(keys.parse(foreign), None, "{foreign:?}");
        }
    }

    #[test]
    fn values_must_match_their_keys() {
        let t = target();
        let record = TargetRecord {
            node: "n2".into(),
            target: t.clone(),
            served: true,
        };
        let bytes = serde_json::to_vec(&record).unwrap();
        assert_eq!(parse_target("t", "n2", &t.key(), &bytes), Ok(record));
        assert!(parse_target("t", "n3", &t.key(), &bytes).is_err());
        assert!(parse_target("t", "n2", "other", &bytes).is_err());
        assert!(parse_target("other", "n2", &t.key(), &bytes).is_err());
        assert!(parse_target("t", "n2", &t.key(), b"{garbage").is_err());
        // Targets no registry would hold.
        let bad = |change: &dyn Fn(&mut Target)| {
            let mut t = target();
            change(&mut t);
            let record = TargetRecord {
                node: "n2".into(),
                target: t.clone(),
                served: true,
            };
            let bytes = serde_json::to_vec(&record).unwrap();
            parse_target("t", "n2", &t.key(), &bytes).unwrap_err().0
        };
        let id = |v: &'static str| {
            move |t: &mut Target| {
                t.context.insert(IDENTIFIER.into(), v.into());
            }
        };
        assert_eq!(bad(&id("0")), "identifier \"0\" is not a number from 1");
        assert_eq!(bad(&id("x")), "identifier \"x\" is not a number from 1");
        assert!(bad(&|t| t.ips = vec!["300.1.1.1/32".into()]).contains("not a CIDR"));
        assert!(bad(&|t| t.ips.clear()).contains("no ips"));
        assert!(bad(&|t| t.ips = vec!["b/32".into(), "a/32".into()]).contains("not a CIDR"));
        assert_eq!(
            bad(&|t| t.ips = vec!["198.51.100.2/32".into(), "192.0.2.1/32".into()]),
            "ips [\"198.51.100.2/32\", \"192.0.2.1/32\"] are not as a registry keeps them: sorted CIDRs, each once"
        );
        let node = NodeRecord {
            name: "n1".into(),
            tunnel_addresses: vec![Ipv4Addr::new(198, 51, 100, 1)],
            conduit_prefixes: vec![],
            container_subnets: vec![],
            pod_cidrs: vec![],
            version: "x".into(),
        };
        let bytes = serde_json::to_vec(&node).unwrap();
        assert_eq!(parse_node("n1", &bytes), Ok(node.clone()));
        assert!(parse_node("n2", &bytes).unwrap_err().0.contains("\"n1\""));
        let served = NodeRecord {
            pod_cidrs: vec!["198.18.18.0/24".into()],
            container_subnets: vec!["2001:db8:18::/64".into()],
            ..node.clone()
        };
        let bytes = serde_json::to_vec(&served).unwrap();
        let parsed = parse_node("n1", &bytes).unwrap();
        let texts: Vec<String> = parsed.prefixes().iter().map(|p| p.to_string()).collect();
        assert_eq!(texts, ["2001:db8:18::/64", "198.18.18.0/24"]);
        let corrupt = NodeRecord {
            pod_cidrs: vec!["198.18.18.0/24".into(), "pods".into()],
            ..node
        };
        let bytes = serde_json::to_vec(&corrupt).unwrap();
        assert_eq!(
            parse_node("n1", &bytes).unwrap_err().0,
            "\"pods\" is not a prefix"
        );
    }
}
