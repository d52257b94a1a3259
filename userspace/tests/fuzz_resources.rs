//! Property tests of what control planes hand the daemon: xDS
//! `ClusterLoadAssignment`s (structured, and as mutated protobuf bytes)
//! through selection into the catalog's LB part, the cluster's etcd keys
//! and records, and networking-spp's `tap_info` values. Whatever arrives,
//! the answer is a value or a typed error, never a panic; an accepted
//! assignment always becomes a valid LB configuration. Bounded like
//! `fuzz_parsers.rs`: PROPTEST_CASES (default 256 per property); failures
//! kept in `userspace/proptest-regressions/fuzz_resources.txt` and replayed first.

use std::collections::{BTreeMap, BTreeSet};

use envoy_types::pb::envoy::config::core::v3::{
    address, socket_address, Address, Locality, Pipe, SocketAddress,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    cluster_load_assignment::{policy::DropOverload, Policy},
    lb_endpoint::HostIdentifier,
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
};
use envoy_types::pb::envoy::r#type::v3::FractionalPercent;
use envoy_types::pb::google::protobuf::UInt32Value;
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use prost::Message;
use tapmesh::catalog::{eds_part, identity::Identities, slots, ClusterBinding};
use tapmesh::cluster::record::{parse_node, parse_target, Key, Keys, NodeRecord};
use tapmesh::lb::model::{validate, TargetVia};
use tapmesh::mirror::spp::{port_interface_name, TapInfo};
use tapmesh::xds::select;

fn address_text() -> impl Strategy<Value = String> {
    prop_oneof![
        60 => any::<u8>().prop_map(|b| format!("198.51.100.{b}")),
        20 => any::<u16>().prop_map(|n| format!("2001:db8::{n:x}")),
        1 => prop::sample::select(vec!["0.0.0.0", "::", "255.255.255.255", "::ffff:1.2.3.4", ""])
            .prop_map(String::from),
        1 => "[0-9a-f.:%]{0,16}",
    ]
}

fn endpoint() -> impl Strategy<Value = LbEndpoint> {
    // Mostly what a management server sends; now and then what it must not.
    let port = prop_oneof![100 => 1u32..1000, 1 => Just(0u32), 1 => any::<u32>()];
    let weight = prop_oneof![10 => Just(None), 10 => (1u32..5).prop_map(Some), 1 => any::<u32>().prop_map(Some)];
    let health = prop_oneof![16 => 0i32..2, 4 => 2i32..6, 1 => any::<i32>()];
    let kind = prop_oneof![150 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8)];
    (address_text(), port, weight, health, kind).prop_map(|(ip, port, weight, health, kind)| {
        let address = match kind {
            0 => Some(address::Address::SocketAddress(SocketAddress {
                address: ip,
                port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
                ..Default::default()
            })),
            1 => Some(address::Address::Pipe(Pipe { path: ip, mode: 0 })),
            _ => None,
        };
        LbEndpoint {
            host_identifier: Some(HostIdentifier::Endpoint(Endpoint {
                address: Some(Address { address }),
                ..Default::default()
            })),
            health_status: health,
            load_balancing_weight: weight.map(|value| UInt32Value { value }),
            ..Default::default()
        }
    })
}

fn locality() -> impl Strategy<Value = LocalityLbEndpoints> {
    let priority = prop_oneof![60 => Just(0u32), 10 => Just(1), 1 => any::<u32>()];
    let weight = prop_oneof![
        60 => Just(None),
        30 => (1u32..4).prop_map(Some),
        1 => Just(Some(0)),
        1 => any::<u32>().prop_map(Some),
    ];
    (
        "[a-z]{1,3}",
        priority,
        weight,
        prop::collection::vec(endpoint(), 0..5),
    )
        .prop_map(
            |(zone, priority, weight, lb_endpoints)| LocalityLbEndpoints {
                locality: Some(Locality {
                    zone,
                    ..Default::default()
                }),
                lb_endpoints,
                load_balancing_weight: weight.map(|value| UInt32Value { value }),
                priority,
                ..Default::default()
            },
        )
}

fn assignment() -> impl Strategy<Value = ClusterLoadAssignment> {
    let drop = (
        prop_oneof![1 => Just(""), 8 => Just("overload")],
        any::<u32>(),
        prop_oneof![8 => 0i32..3, 1 => any::<i32>()],
        any::<bool>(),
    )
        .prop_map(|(category, numerator, denominator, some)| DropOverload {
            category: category.into(),
            drop_percentage: some.then_some(FractionalPercent {
                numerator,
                denominator,
            }),
        });
    (
        prop_oneof![30 => Just("web"), 1 => Just("")],
        prop::collection::vec(locality(), 0..5),
        prop_oneof![8 => Just(vec![]), 1 => prop::collection::vec(drop, 1..3)],
    )
        .prop_map(|(name, endpoints, drops)| ClusterLoadAssignment {
            cluster_name: name.into(),
            endpoints,
            policy: (!drops.is_empty()).then(|| Policy {
                drop_overloads: drops,
                ..Default::default()
            }),
            ..Default::default()
        })
}

fn binding() -> ClusterBinding {
    ClusterBinding {
        name: "web".into(),
        vip: "203.0.113.20".into(),
        service_ip: String::new(),
        protocols: vec!["tcp".into()],
        ports: vec!["443".into()],
    }
}

/// JSON-ish values: records of the right shape with odd fields, or noise.
fn jsonish() -> impl Strategy<Value = Vec<u8>> {
    let value = prop_oneof![
        Just("null".to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        Just("true".to_string()),
        "[a-z0-9./:-]{0,12}".prop_map(|s| format!("{s:?}")),
        Just("[\"198.18.2.1\"]".to_string()),
        Just("[\"not an address\"]".to_string()),
        Just("{}".to_string()),
        Just("[]".to_string()),
    ];
    let field = prop::sample::select(vec![
        "name",
        "tunnel_addresses",
        "conduit_prefixes",
        "container_subnets",
        "pod_cidrs",
        "version",
        "node",
        "target",
        "served",
        "service_port",
        "source_port",
        "mirror_in",
        "mirror_out",
    ]);
    prop_oneof![
        prop::collection::vec((field, value), 0..8).prop_map(|fields| {
            let inner: Vec<String> = fields.iter().map(|(k, v)| format!("{k:?}: {v}")).collect();
            format!("{{{}}}", inner.join(", ")).into_bytes()
        }),
        prop::collection::vec(any::<u8>(), 0..48),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(256),
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/proptest-regressions/fuzz_resources.txt"
        )))),
        ..ProptestConfig::default()
    })]

    /// An accepted assignment becomes the catalog's LB part: one target per
    /// Maglev slot, distinct identifiers within the stream, and (the
    /// backends resolved to an interface) a configuration the LB accepts.
    #[test]
    fn eds_assignments_become_valid_lb_parts(cla in assignment()) {
        let Ok(endpoints) = select(&cla) else {
            return Ok(());
        };
        let weights: Vec<u32> = endpoints.endpoints.iter().map(|e| e.weight).collect();
        prop_assert!(weights.iter().all(|&w| w >= 1), "{weights:?}");
        let bindings = BTreeMap::from([("web".to_string(), binding())]);
        let clusters = BTreeMap::from([("web".to_string(), std::sync::Arc::new(endpoints))]);
        let mut identities = Identities::default();
        let mut part = eds_part(&bindings, &clusters, &mut identities);
        prop_assert_eq!(
            &part,
            &eds_part(&bindings, &clusters, &mut identities),
            "the same endpoints again keep every identifier"
        );
        let slots: u32 = slots(&weights).iter().sum();
        prop_assert_eq!(part.targets.len() as u32, slots);
        let ids: BTreeSet<u32> = part.targets.iter().map(|t| t.identifier).collect();
        prop_assert_eq!(ids.len(), part.targets.len(), "identifiers repeat");
        let max = part.streams[0].max_targets;
        prop_assert!(ids.iter().all(|&id| (1..=max).contains(&id)), "{ids:?} beyond {max}");
        for t in &mut part.targets {
            t.via = TargetVia::Local { interface: "eth1".into(), mac: "02:00:00:00:00:01".into() };
        }
        if let Err(e) = validate(&part) {
            return Err(TestCaseError::fail(format!("an accepted assignment made an invalid LB part: {e}")));
        }
    }

    /// Protobuf bytes as a management server might send them, mutated:
    /// they decode or not, and selection answers either way.
    #[test]
    fn eds_bytes_never_panic(
        cla in assignment(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = cla.encode_to_vec();
        if !bytes.is_empty() {
            for (at, value) in edits {
                let at = at.index(bytes.len());
                bytes[at] = value;
            }
            bytes.truncate(cut.index(bytes.len() + 1));
        }
        if let Ok(decoded) = ClusterLoadAssignment::decode(bytes.as_slice()) {
            if let Err(e) = select(&decoded) {
                prop_assert_eq!(&e.cluster, &decoded.cluster_name);
            }
        }
    }

    /// etcd keys under the cluster prefix: ours parse to what made them,
    /// anything else is foreign; node records round-trip and a record
    /// under another node's key is refused.
    #[test]
    fn cluster_keys_and_records_never_panic(
        key in prop::collection::vec(any::<u8>(), 0..40),
        tail in "[a-z0-9/._-]{0,16}",
        name in "[a-z0-9._-]{1,12}",
        value in jsonish(),
    ) {
        let keys = Keys { prefix: "/tapmesh/v1/".into() };
        let _ = keys.parse(&key);
        for kind in ["nodes/", "targets/", "ids/", ""] {
            let _ = keys.parse(format!("/tapmesh/v1/{kind}{tail}").as_bytes());
        }
        prop_assert_eq!(keys.parse(keys.node(&name).as_bytes()), Some(Key::Node(name.clone())));
        let _ = parse_node(&name, &value);
        let _ = parse_target(&name, &name, &tail, &value);
        let record = NodeRecord {
            name: name.clone(),
            tunnel_addresses: vec!["198.18.2.1".parse().unwrap()],
            conduit_prefixes: vec!["198.19.1.0/24".into()],
            container_subnets: vec![],
            pod_cidrs: vec![format!("10.244.{}.0/24", name.len())],
            version: "0.1.0".into(),
        };
        let bytes = serde_json::to_vec(&record).unwrap();
        prop_assert_eq!(parse_node(&name, &bytes), Ok(record.clone()));
        let other = format!("{name}x");
        prop_assert!(parse_node(&other, &bytes).is_err());
        // A prefix that does not parse makes the record a bad value.
        let odd = NodeRecord { container_subnets: vec![tail.clone()], ..record.clone() };
        let bytes = serde_json::to_vec(&odd).unwrap();
        match tail.parse::<tapmesh::net::Prefix>() {
            Ok(_) => prop_assert_eq!(parse_node(&name, &bytes), Ok(odd)),
            Err(_) => prop_assert_eq!(
                parse_node(&name, &bytes).unwrap_err().0,
                format!("{tail:?} is not a prefix")
            ),
        }
    }

    /// networking-spp's `tap_info` values and port ids.
    #[test]
    fn spp_values_never_panic(value in jsonish(), port in any::<String>()) {
        if let Ok(info) = serde_json::from_slice::<TapInfo>(&value) {
            let ids = info.mirror_ids();
            prop_assert_eq!(info.direction().is_ok(), !ids.is_empty());
            prop_assert!(ids.len() <= 2);
        }
        let name = port_interface_name(&port);
        prop_assert!(name.starts_with("tap") && name.chars().count() <= 14);
    }
}
