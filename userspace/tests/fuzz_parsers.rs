//! Property tests of the parsers of untrusted input: the daemon's config
//! file, LB and Meridio files (flow specs included), NetManager port
//! mappings and REST bodies. Whatever the input, a parser answers with a
//! value or an error, never a panic; the REST API answers a client's
//! mistake with 4xx. Bounded: PROPTEST_CASES (default 256 per property) in
//! `cargo xtask test`; failures are kept in `userspace/proptest-regressions/`
//! and replayed first on every run.

use std::sync::Arc;

use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use tapmesh::config::Config;
use tapmesh::lb::model::{validate, LbSpec};
use tapmesh::nsp::config::NspConfig;

/// TOML-ish text: fragments of real files, mutated and joined.
fn tomlish() -> impl Strategy<Value = String> {
    let pieces = prop::sample::select(vec![
        "[[vips]]\n",
        "[[streams]]\n",
        "[[flows]]\n",
        "[[targets]]\n",
        "[daemon]\n",
        "[dataplane]\n",
        "[lb]\n",
        "[nsp]\n",
        "[nsp.limits]\n",
        "[netmanager]\n",
        "[[trenches]]\n",
        "[[conduits]]\n",
        "name = \"a\"\n",
        "address = \"203.0.113.10/32\"\n",
        "address = \"2001:db8::/33\"\n",
        "vips = [\"a\"]\n",
        "stream = \"a\"\n",
        "protocols = [\"tcp\", \"udp\"]\n",
        "destination_port_ranges = [\"80-\", \"1-65535\"]\n",
        "source_port_ranges = [\"0\"]\n",
        "source_subnets = [\"0.0.0.0/0\"]\n",
        "max_targets = 4294967295\n",
        "identifier = 0\n",
        "priority = -1\n",
        "via = { local = { interface = \"x\", mac = \"zz\" } }\n",
        "via = { remote = { node = \"198.18.2.2\" } }\n",
        "conduit = \"a\"\n",
        "trench = \"a\"\n",
        "uplinks = [\"eth0\"]\n",
        "entry_timeout = \"1ns\"\n",
        "ips_per_target = 0\n",
        "tunnel_port = 0\n",
        "\"\n",
        "[",
        "=",
        "\u{feff}",
        "é",
    ]);
    (prop::collection::vec(pieces, 0..24), any::<String>()).prop_map(|(parts, noise)| {
        let mut text = parts.concat();
        let at = noise.len() % (text.len() + 1);
        if text.is_char_boundary(at) {
            text.insert_str(at, &noise.chars().take(8).collect::<String>());
        }
        text
    })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(256),
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/proptest-regressions/fuzz_parsers.txt"
        )))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn config_files_never_panic(text in tomlish()) {
        if let Ok(config) = Config::from_toml(&text) {
            let _ = config.validate();
        }
    }

    #[test]
    fn lb_files_and_flow_specs_never_panic(text in tomlish()) {
        if let Ok(spec) = toml::from_str::<LbSpec>(&text) {
            let _ = validate(&spec);
        }
    }

    #[test]
    fn meridio_files_never_panic(text in tomlish()) {
        if let Ok(mut config) = toml::from_str::<NspConfig>(&text) {
            config.fill_trenches();
            let _ = config.validate();
            let _ = validate(&config.lb_spec());
        }
    }

    #[test]
    fn port_mappings_never_panic(text in "[0-9:;/a-z,-]{0,40}") {
        let _ = tapmesh::overlay::ports::parse(&text);
    }

    #[test]
    fn netmanager_bodies_get_4xx(body in netmanager_body(), path in prop::sample::select(vec![
        "/container/deploy", "/docker/deploy", "/container/undeploy", "/docker/undeploy",
    ])) {
        let status = runtime().block_on(post(path, body));
        prop_assert!((400..500).contains(&status), "{path}: {status}");
    }
}

/// JSON-ish bodies: fields of the real requests with random values, or noise.
fn netmanager_body() -> impl Strategy<Value = Vec<u8>> {
    let value = prop_oneof![
        Just("null".to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|n| format!("{n:?}")),
        "[a-zA-Z0-9./:_-]{0,20}".prop_map(|s| format!("{s:?}")),
        Just("[{\"IpType\": \"RR\", \"Address\": \"203.0.113.1\"}]".to_string()),
        Just("{}".to_string()),
    ];
    let field = prop::sample::select(vec![
        "pid",
        "netns",
        "serviceName",
        "appName",
        "instanceNumber",
        "portMappings",
        "serviceIp",
        "weight",
        "client_id",
    ]);
    prop_oneof![
        prop::collection::vec((field, value), 0..6).prop_map(|fields| {
            let inner: Vec<String> = fields.iter().map(|(k, v)| format!("{k:?}: {v}")).collect();
            format!("{{{}}}", inner.join(", ")).into_bytes()
        }),
        prop::collection::vec(any::<u8>(), 0..64),
    ]
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// One request to a NetManager that is not registered and has no dataplane:
/// nothing a body says can reach the kernel.
async fn post(path: &str, body: Vec<u8>) -> u16 {
    use tower::ServiceExt;
    let settings = tapmesh::overlay::manager::ManagerSettings {
        container_ifname: "tmsvc0".into(),
        mtu: 1450,
        service_prefix: ("10.30.0.0".parse().unwrap(), 16),
        service_prefix_v6: ("fdff::".parse().unwrap(), 16),
        subnetwork: None,
        subnetwork_v6: None,
        node_costs: Default::default(),
        default_node_cost: 10,
        state_file: None,
        keep_links: false,
        oakestra: false,
        mqtt_broker: None,
        mqtt_port: 10003,
        node_port: 50103,
        masquerade: false,
    };
    let nm = Arc::new(tapmesh::overlay::manager::NetManager::new(
        Default::default(),
        settings,
    ));
    let request = axum::http::Request::post(path)
        .header("content-type", "application/json")
        .body(axum::body::Body::from(body))
        .expect("request");
    let response = tapmesh::overlay::api::router(nm)
        .oneshot(request)
        .await
        .expect("infallible");
    response.status().as_u16()
}
