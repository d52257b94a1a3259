//! The operator's Meridio-style configuration (trenches, conduits, streams,
//! flows, VIPs): read from a TOML file, validated as a whole, served by
//! `nsp.v1.ConfigurationManager` and turned into the LB's VIPs, streams and flows.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::Path;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::lb::flows::{FlowError, FlowSpec, VipSpec};
use crate::lb::model::{validate, LbError, LbSpec, StreamSpec};
use crate::lb::port_nat::{self, PortNatError, PortNatSpec};
use crate::names::validate_name;

/// Meridio's Stream CRD bounds max-targets to 1..=10000; it defaults to 100.
pub const MAX_MAX_TARGETS: u32 = 10_000;
pub const DEFAULT_MAX_TARGETS: u32 = 100;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NspConfig {
    pub trenches: Vec<Named>,
    pub conduits: Vec<ConduitConfig>,
    pub streams: Vec<StreamConfig>,
    pub flows: Vec<FlowConfig>,
    pub vips: Vec<VipConfig>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Named {
    pub name: String,
}

/// Objects name their trench; it may be left out when there is only one.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConduitConfig {
    pub name: String,
    #[serde(default)]
    pub trench: String,
    /// Meridio's `destinationPortNats`: every stream of the conduit
    /// translates these ports (VIPs by name, in the conduit's trench).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destination_port_nats: Vec<PortNatSpec>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamConfig {
    pub name: String,
    pub conduit: String,
    #[serde(default)]
    pub trench: String,
    #[serde(default = "default_max_targets")]
    pub max_targets: u32,
}

fn default_max_targets() -> u32 {
    DEFAULT_MAX_TARGETS
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FlowConfig {
    pub name: String,
    pub trench: String,
    pub stream: String,
    pub vips: Vec<String>,
    pub protocols: Vec<String>,
    pub source_subnets: Vec<String>,
    pub destination_port_ranges: Vec<String>,
    pub source_port_ranges: Vec<String>,
    pub byte_matches: Vec<String>,
    pub priority: i32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VipConfig {
    pub name: String,
    pub address: String,
    #[serde(default)]
    pub trench: String,
}

impl From<crate::names::NameError> for NspConfigError {
    fn from(e: crate::names::NameError) -> Self {
        NspConfigError::Name(e.into())
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum NspConfigError {
    #[error("{0}")]
    Name(#[from] FlowError),
    #[error("streams {first:?} and {second:?} both become {joined:?} (stream.conduit.trench, the LB's name for a stream): rename one")]
    JoinedNamesCollide {
        /// `stream` of conduit `conduit`, as written.
        first: String,
        second: String,
        joined: String,
    },
    #[error("trench {name:?} is defined twice; names must be unique")]
    DuplicateTrench { name: String },
    #[error("{kind} {name:?} is defined twice in trench {trench:?}; names must be unique")]
    Duplicate {
        kind: &'static str,
        name: String,
        trench: String,
    },
    #[error("{kind} {name:?}: trench {trench:?} is not defined; add it under [[trenches]]{hint}")]
    UnknownTrench {
        kind: &'static str,
        name: String,
        trench: String,
        hint: &'static str,
    },
    #[error("stream {stream:?}: conduit {conduit:?} is not defined in trench {trench:?}")]
    UnknownConduit {
        stream: String,
        conduit: String,
        trench: String,
    },
    #[error("flow {flow:?}: stream {stream:?} is not defined in trench {trench:?}")]
    UnknownStream {
        flow: String,
        stream: String,
        trench: String,
    },
    #[error("flow {flow:?}: VIP {vip:?} is not defined in trench {trench:?}")]
    UnknownVip {
        flow: String,
        vip: String,
        trench: String,
    },
    #[error("stream {stream:?}: max_targets {value} is out of range; use 1..={MAX_MAX_TARGETS}")]
    MaxTargets { stream: String, value: u32 },
    #[error("conduit {conduit:?} port NAT {port}->{target_port}: VIP {vip:?} is not defined in trench {trench:?}")]
    UnknownNatVip {
        conduit: String,
        port: u16,
        target_port: u16,
        vip: String,
        trench: String,
    },
    #[error("{0}")]
    PortNat(#[from] PortNatError),
    /// What the load balancer finds wrong (a bad VIP address, port range, …).
    #[error("{0}")]
    Lb(#[from] LbError),
    #[error("{path}: {message}")]
    File { path: String, message: String },
}

/// A stream's place: stream, conduit and trench names.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct StreamPath {
    pub trench: String,
    pub conduit: String,
    pub stream: String,
}

impl StreamPath {
    /// Meridio's full name, `stream.conduit.trench`: the LB's stream name.
    pub fn full_name(&self) -> String {
        format!("{}.{}.{}", self.stream, self.conduit, self.trench)
    }
}

impl NspConfig {
    pub fn read(path: &Path) -> Result<Self, NspConfigError> {
        let file = |message: String| NspConfigError::File {
            path: path.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| file(e.to_string()))?;
        let mut config: NspConfig =
            toml::from_str(&text).map_err(|e| file(crate::config::toml_error(&text, &e)))?;
        config.fill_trenches();
        config.validate()?;
        Ok(config)
    }

    /// Objects without a trench get the only trench, if there is exactly one.
    pub fn fill_trenches(&mut self) {
        let [only] = self.trenches.as_slice() else {
            return;
        };
        let only = only.name.clone();
        let fill = |t: &mut String| {
            if t.is_empty() {
                *t = only.clone();
            }
        };
        self.conduits.iter_mut().for_each(|c| fill(&mut c.trench));
        self.streams.iter_mut().for_each(|c| fill(&mut c.trench));
        self.flows.iter_mut().for_each(|c| fill(&mut c.trench));
        self.vips.iter_mut().for_each(|c| fill(&mut c.trench));
    }

    pub fn validate(&self) -> Result<(), NspConfigError> {
        let mut trenches = HashSet::new();
        for t in &self.trenches {
            validate_name("trench name", &t.name)?;
            if !trenches.insert(t.name.as_str()) {
                return Err(NspConfigError::DuplicateTrench {
                    name: t.name.clone(),
                });
            }
        }
        let hint = if self.trenches.len() > 1 {
            " or name one of the trenches"
        } else {
            ""
        };
        let in_trench = |kind, name: &str, trench: &str| {
            if trenches.contains(trench) {
                Ok(())
            } else {
                Err(NspConfigError::UnknownTrench {
                    kind,
                    name: name.into(),
                    trench: trench.into(),
                    hint,
                })
            }
        };
        let mut conduits = HashSet::new();
        for c in &self.conduits {
            validate_name("conduit name", &c.name)?;
            in_trench("conduit", &c.name, &c.trench)?;
            if !conduits.insert((c.trench.as_str(), c.name.as_str())) {
                return Err(duplicate("conduit", &c.name, &c.trench));
            }
        }
        let mut streams = HashSet::new();
        let mut joined = std::collections::HashMap::new();
        for s in &self.streams {
            validate_name("stream name", &s.name)?;
            in_trench("stream", &s.name, &s.trench)?;
            if !conduits.contains(&(s.trench.as_str(), s.conduit.as_str())) {
                return Err(NspConfigError::UnknownConduit {
                    stream: s.name.clone(),
                    conduit: s.conduit.clone(),
                    trench: s.trench.clone(),
                });
            }
            if !(1..=MAX_MAX_TARGETS).contains(&s.max_targets) {
                return Err(NspConfigError::MaxTargets {
                    stream: s.name.clone(),
                    value: s.max_targets,
                });
            }
            if !streams.insert((s.trench.as_str(), s.name.as_str())) {
                return Err(duplicate("stream", &s.name, &s.trench));
            }
            // Names may hold dots: two streams can join to one LB name.
            let path = StreamPath {
                trench: s.trench.clone(),
                conduit: s.conduit.clone(),
                stream: s.name.clone(),
            };
            let described = format!("{} of conduit {}", s.name, s.conduit);
            if let Some(first) = joined.insert(path.full_name(), described.clone()) {
                return Err(NspConfigError::JoinedNamesCollide {
                    first,
                    second: described,
                    joined: path.full_name(),
                });
            }
        }
        let mut vips = HashSet::new();
        for v in &self.vips {
            validate_name("vip name", &v.name)?;
            in_trench("vip", &v.name, &v.trench)?;
            if !vips.insert((v.trench.as_str(), v.name.as_str())) {
                return Err(duplicate("vip", &v.name, &v.trench));
            }
        }
        for c in &self.conduits {
            let owner = format!("conduit {:?}", c.name);
            for nat in &c.destination_port_nats {
                port_nat::check_one(&owner, nat)?;
                if let Some(vip) = nat
                    .vips
                    .iter()
                    .find(|v| !vips.contains(&(c.trench.as_str(), v.as_str())))
                {
                    return Err(NspConfigError::UnknownNatVip {
                        conduit: c.name.clone(),
                        port: nat.port,
                        target_port: nat.target_port,
                        vip: vip.clone(),
                        trench: c.trench.clone(),
                    });
                }
            }
            port_nat::check_collisions(&owner, &c.destination_port_nats)?;
        }
        let mut flows = HashSet::new();
        for f in &self.flows {
            validate_name("flow name", &f.name)?;
            in_trench("flow", &f.name, &f.trench)?;
            if !flows.insert((f.trench.as_str(), f.name.as_str())) {
                return Err(duplicate("flow", &f.name, &f.trench));
            }
            if !streams.contains(&(f.trench.as_str(), f.stream.as_str())) {
                return Err(NspConfigError::UnknownStream {
                    flow: f.name.clone(),
                    stream: f.stream.clone(),
                    trench: f.trench.clone(),
                });
            }
            if let Some(vip) = f
                .vips
                .iter()
                .find(|v| !vips.contains(&(f.trench.as_str(), v.as_str())))
            {
                return Err(NspConfigError::UnknownVip {
                    flow: f.name.clone(),
                    vip: vip.clone(),
                    trench: f.trench.clone(),
                });
            }
        }
        // Addresses, ports, byte matches and table sizes: the LB's own checks.
        validate(&self.lb_spec())?;
        Ok(())
    }

    pub fn stream(&self, path: &StreamPath) -> Option<&StreamConfig> {
        self.streams
            .iter()
            .find(|s| s.trench == path.trench && s.conduit == path.conduit && s.name == path.stream)
    }

    fn stream_conduit(&self, trench: &str, stream: &str) -> Option<&str> {
        self.streams
            .iter()
            .find(|s| s.trench == trench && s.name == stream)
            .map(|s| s.conduit.as_str())
    }

    /// The addresses of the VIPs of every flow of every stream in the conduit
    /// (what a target of that conduit carries on its interface).
    pub fn conduit_vips(&self, trench: &str, conduit: &str) -> BTreeSet<String> {
        let names: BTreeSet<&str> = self
            .flows
            .iter()
            .filter(|f| {
                f.trench == trench && self.stream_conduit(trench, &f.stream) == Some(conduit)
            })
            .flat_map(|f| f.vips.iter().map(String::as_str))
            .collect();
        self.vips
            .iter()
            .filter(|v| v.trench == trench && names.contains(v.name.as_str()))
            .map(|v| v.address.clone())
            .collect()
    }

    /// The conduit's port NATs with the LB's VIP names (`vip.trench`).
    pub fn conduit_port_nats(&self, trench: &str, conduit: &str) -> Vec<PortNatSpec> {
        self.conduits
            .iter()
            .filter(|c| c.trench == trench && c.name == conduit)
            .flat_map(|c| &c.destination_port_nats)
            .map(|n| PortNatSpec {
                vips: n.vips.iter().map(|v| format!("{v}.{trench}")).collect(),
                ..n.clone()
            })
            .collect()
    }

    /// VIPs, streams and flows for the load balancer (no targets). Names are
    /// made unique across trenches: `vip.trench`, `stream.conduit.trench`, `flow.trench`.
    pub fn lb_spec(&self) -> LbSpec {
        let stream_names: BTreeMap<(&str, &str), String> = self
            .streams
            .iter()
            .map(|s| {
                let path = StreamPath {
                    trench: s.trench.clone(),
                    conduit: s.conduit.clone(),
                    stream: s.name.clone(),
                };
                ((s.trench.as_str(), s.name.as_str()), path.full_name())
            })
            .collect();
        LbSpec {
            vips: self
                .vips
                .iter()
                .map(|v| VipSpec {
                    name: format!("{}.{}", v.name, v.trench),
                    address: v.address.clone(),
                })
                .collect(),
            streams: self
                .streams
                .iter()
                .map(|s| StreamSpec {
                    name: stream_names[&(s.trench.as_str(), s.name.as_str())].clone(),
                    max_targets: s.max_targets,
                    table_size: None,
                    port_nats: self.conduit_port_nats(&s.trench, &s.conduit),
                })
                .collect(),
            flows: self
                .flows
                .iter()
                .map(|f| FlowSpec {
                    name: format!("{}.{}", f.name, f.trench),
                    source_subnets: f.source_subnets.clone(),
                    destination_port_ranges: f.destination_port_ranges.clone(),
                    source_port_ranges: f.source_port_ranges.clone(),
                    protocols: f.protocols.clone(),
                    priority: f.priority,
                    stream: stream_names
                        .get(&(f.trench.as_str(), f.stream.as_str()))
                        .cloned()
                        .unwrap_or_default(),
                    vips: f.vips.iter().map(|v| format!("{v}.{}", f.trench)).collect(),
                    byte_matches: f.byte_matches.clone(),
                })
                .collect(),
            targets: Vec::new(),
        }
    }
}

fn duplicate(kind: &'static str, name: &str, trench: &str) -> NspConfigError {
    NspConfigError::Duplicate {
        kind,
        name: name.into(),
        trench: trench.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
        [[trenches]]
        name = "trench-a"
        [[conduits]]
        name = "lb"
        [[streams]]
        name = "stream-a"
        conduit = "lb"
        max_targets = 10
        [[streams]]
        name = "stream-b"
        conduit = "lb"
        [[vips]]
        name = "vip1"
        address = "192.0.2.1/32"
        [[vips]]
        name = "vip2"
        address = "2001:db8::1/128"
        [[vips]]
        name = "unused"
        address = "192.0.2.9/32"
        [[flows]]
        name = "tcp"
        stream = "stream-a"
        vips = ["vip1", "vip2"]
        protocols = ["tcp"]
        destination_port_ranges = ["80", "8000-8080"]
        priority = 2
    "#;

    fn parse(text: &str) -> Result<NspConfig, NspConfigError> {
        let mut c: NspConfig = toml::from_str(text).unwrap();
        c.fill_trenches();
        c.validate().map(|_| c)
    }

    #[test]
    fn a_sample_becomes_lb_objects_with_unique_names() {
        let c = parse(SAMPLE).unwrap();
        let lb = c.lb_spec();
        assert_eq!(lb.vips[0].name, "vip1.trench-a");
        assert_eq!(lb.streams[0].name, "stream-a.lb.trench-a");
        assert_eq!(lb.streams[1].max_targets, DEFAULT_MAX_TARGETS);
        assert_eq!(lb.flows[0].stream, "stream-a.lb.trench-a");
        assert_eq!(lb.flows[0].vips, vec!["vip1.trench-a", "vip2.trench-a"]);
        let vips: Vec<String> = c.conduit_vips("trench-a", "lb").into_iter().collect();
        assert_eq!(vips, vec!["192.0.2.1/32", "2001:db8::1/128"]);
        assert!(c.conduit_vips("trench-a", "other").is_empty());
    }

    #[test]
    fn streams_whose_joined_names_collide_are_named() {
        let text = r#"
            [[trenches]]
            name = "trench-a"
            [[conduits]]
            name = "c"
            [[conduits]]
            name = "b.c"
            [[streams]]
            name = "a.b"
            conduit = "c"
            [[streams]]
            name = "a"
            conduit = "b.c"
        "#;
        assert_eq!(
            parse(text).unwrap_err().to_string(),
            "streams \"a.b of conduit c\" and \"a of conduit b.c\" both become \"a.b.c.trench-a\" \
             (stream.conduit.trench, the LB's name for a stream): rename one"
        );
        assert!(parse(&text.replace("name = \"a\"\n", "name = \"x\"\n")).is_ok());
    }

    #[test]
    fn conduit_port_nats_go_to_every_stream_of_the_conduit() {
        let text = SAMPLE.replacen(
            "name = \"lb\"\n",
            "name = \"lb\"\n        destination_port_nats = [{ port = 80, target_port = 8080, protocol = \"TCP\", vips = [\"vip1\", \"vip2\"] }]\n",
            1,
        );
        let c = parse(&text).unwrap();
        let lb = c.lb_spec();
        for s in &lb.streams {
            assert_eq!(s.port_nats.len(), 1, "{}", s.name);
            assert_eq!(s.port_nats[0].vips, vec!["vip1.trench-a", "vip2.trench-a"]);
            assert_eq!(
                (s.port_nats[0].port, s.port_nats[0].target_port),
                (80, 8080)
            );
        }
        let bad =
            |from: &str, to: &str| parse(&text.replacen(from, to, 1)).unwrap_err().to_string();
        assert_eq!(
            bad("\"vip1\", \"vip2\"] }", "\"vip9\"] }"),
            "conduit \"lb\" port NAT 80->8080: VIP \"vip9\" is not defined in trench \"trench-a\""
        );
        assert!(bad("\"TCP\"", "\"sctp\"").contains("SCTP ports cannot be translated"));
        assert!(
            bad("target_port = 8080", "target_port = 80").contains("must be 1..=65535 and differ")
        );
        let two = text.replacen(
            "protocol = \"TCP\", vips = [\"vip1\", \"vip2\"] }",
            "protocol = \"TCP\", vips = [\"vip1\", \"vip2\"] }, { port = 81, target_port = 8080, protocol = \"tcp\", vips = [\"vip2\"] }",
            1,
        );
        assert!(parse(&two)
            .unwrap_err()
            .to_string()
            .contains("collide on VIP \"vip2\""));
    }

    #[test]
    fn bad_references_and_values_are_named() {
        let bad = |from: &str, to: &str| {
            parse(&SAMPLE.replacen(from, to, 1))
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            bad("stream = \"stream-a\"", "stream = \"nope\""),
            "flow \"tcp\": stream \"nope\" is not defined in trench \"trench-a\""
        );
        assert!(bad("conduit = \"lb\"", "conduit = \"x\"").contains("conduit \"x\""));
        assert!(bad("max_targets = 10", "max_targets = 0").contains("use 1..=10000"));
        assert!(bad("[\"vip1\", ", "[\"vip9\", ").contains("VIP \"vip9\""));
        assert!(bad("name = \"vip2\"", "name = \"vip1\"").contains("defined twice"));
        let twice = format!("{SAMPLE}\n[[trenches]]\nname = \"trench-a\"\n");
        assert_eq!(
            parse(&twice).unwrap_err().to_string(),
            "trench \"trench-a\" is defined twice; names must be unique"
        );
        assert!(bad("\"80\"", "\"80-70\"").contains("bad port range"));
        assert!(bad("name = \"lb\"", "name = \"l b\"").contains("invalid character"));
        let two = SAMPLE.replacen(
            "[[conduits]]",
            "[[trenches]]\nname = \"t2\"\n[[conduits]]",
            1,
        );
        assert!(parse(&two)
            .unwrap_err()
            .to_string()
            .contains("or name one of the trenches"));
    }
}
