//! `tapmesh bpf lb list` (issue 17): the pinned LB maps decoded for people,
//! read straight from the pins (with the daemon running, after it stopped
//! with keep_dataplane, and a one-line refusal when nothing is pinned).
//! Maglev shares are compared with the userspace Maglev's own table.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    process::{Command, Output},
    time::Duration,
};

use serde_json::Value;
use tapmesh::lb::{maglev::Maglev, model::LbSpec};
use tapmesh_common::SCHEMA_VERSION;
use tapmesh_tests::{
    daemon::tapmesh_bin,
    fmt_mac, kernel_tests_enabled,
    net::{flow, send_udp_flows, stream, vip, wait_until, LbLab, CLIENT},
    unique,
};

const VIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// Identifiers of the three targets (slots 0, 1, 4 of ten).
const IDS: [u32; 3] = [1, 2, 5];

fn bpf(root: &Path, netns: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = Command::new(tapmesh_bin());
    cmd.arg("bpf").args(args).arg("--bpffs-root").arg(root);
    if let Some(netns) = netns {
        cmd.args(["--netns", netns]);
    }
    cmd.output().expect("running tapmesh bpf")
}

fn json(root: &Path, netns: &str) -> Value {
    let out = bpf(root, Some(netns), &["lb", "list", "-o", "json"]);
    assert!(
        out.status.success(),
        "tapmesh bpf lb list: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|s| s.as_str().expect("string").to_string())
        .collect()
}

/// Bit, protocols, destination ports, source ports, sources, packets.
type FlowRow = (u64, Vec<String>, Vec<String>, Vec<String>, Vec<String>, u64);

#[test]
fn lb_maps_decode_with_exact_rows_and_maglev_shares() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut lab = LbLab::new(3, &[VIP]);
    let spec = LbSpec {
        vips: vec![vip("v", &VIP.to_string())],
        streams: vec![stream("s", 10)],
        flows: vec![
            tapmesh::lb::flows::FlowSpec {
                destination_port_ranges: vec!["53".into(), "5353-5360".into()],
                source_subnets: vec!["198.18.0.0/24".into(), "192.0.2.0/24".into()],
                priority: 20,
                ..flow("dns", &["v"], "s", &["udp"])
            },
            tapmesh::lb::flows::FlowSpec {
                destination_port_ranges: vec!["443".into()],
                priority: 10,
                ..flow("web", &["v"], "s", &["tcp"])
            },
            tapmesh::lb::flows::FlowSpec {
                source_port_ranges: vec!["1024-65535".into()],
                priority: 1,
                ..flow("rest", &["v"], "s", &["udp"])
            },
        ],
        targets: IDS
            .iter()
            .zip(&lab.targets)
            .map(|(&id, t)| t.local("s", id))
            .collect(),
    };
    lab.start_with(Some(&spec), &["--keep-dataplane".into()]);
    let root = lab.daemon().bpffs_root.clone();
    let node = lab.node.name.clone();

    // 50 datagrams to port 53 (flow dns), 30 to port 7000 (flow rest): 74-byte frames.
    let sent = send_udp_flows(
        &lab.client.name,
        CLIENT,
        &(40_000..40_050).collect::<Vec<_>>(),
        SocketAddrV4::new(VIP, 53),
        1,
        &[0x5a; 32],
    ) + send_udp_flows(
        &lab.client.name,
        CLIENT,
        &(41_000..41_030).collect::<Vec<_>>(),
        SocketAddrV4::new(VIP, 7000),
        1,
        &[0x5a; 32],
    );
    assert_eq!(sent, 80);
    assert!(wait_until(Duration::from_secs(30), || {
        json(&root, &node)["vips"][0]["packets"] == 80
    }));
    let listed = json(&root, &node);

    // The VIP and its flows, in priority order (bit 0 is the best flow).
    let vips = listed["vips"].as_array().unwrap();
    assert_eq!(vips.len(), 1);
    let v = &vips[0];
    assert_eq!(v["address"], "203.0.113.10/32");
    assert_eq!(
        (v["packets"].as_u64(), v["bytes"].as_u64()),
        (Some(80), Some(80 * 74))
    );
    let flows: Vec<FlowRow> = v["flows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["bit"].as_u64().unwrap(),
                strings(&f["protocols"]),
                strings(&f["dst_ports"]),
                strings(&f["src_ports"]),
                strings(&f["sources"]),
                f["packets"].as_u64().unwrap(),
            )
        })
        .collect();
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    assert_eq!(
        flows,
        vec![
            (
                0,
                s(&["udp"]),
                s(&["53", "5353-5360"]),
                s(&["any"]),
                s(&["192.0.2.0/24", "198.18.0.0/24"]),
                50
            ),
            (1, s(&["tcp"]), s(&["443"]), s(&["any"]), s(&["any"]), 0),
            (
                2,
                s(&["udp"]),
                s(&["any"]),
                s(&["1024-65535"]),
                s(&["any"]),
                30
            ),
        ]
    );
    let stream_id = v["flows"][0]["stream"].as_u64().unwrap();

    // Targets: local, on the node's veths, to the targets' MACs.
    let targets = listed["targets"].as_array().unwrap();
    assert_eq!(targets.len(), 3);
    let mut index_of_slot: BTreeMap<u64, u32> = BTreeMap::new();
    for (id, t) in IDS.iter().zip(&lab.targets) {
        let row = targets
            .iter()
            .find(|r| r["dst_mac"] == fmt_mac(t.mac))
            .unwrap_or_else(|| panic!("no target row to {}: {targets:?}", fmt_mac(t.mac)));
        assert_eq!(row["kind"], "local");
        assert_eq!(row["interface"], t.node_if.as_str());
        assert_eq!(row["node"], Value::Null);
        index_of_slot.insert(row["index"].as_u64().unwrap(), id - 1);
    }
    let target_packets: u64 = targets.iter().map(|t| t["packets"].as_u64().unwrap()).sum();
    assert_eq!(target_packets, 80);

    // Maglev shares: exactly what the userspace Maglev builds for slots 0, 1, 4.
    let maglev = Maglev::new(10, None).unwrap();
    let table = maglev.build(&IDS.map(|id| id - 1)).expect("Maglev table");
    let mut expected: BTreeMap<u32, u64> = BTreeMap::new();
    for slot in table {
        *expected.entry(slot).or_default() += 1;
    }
    let streams = listed["streams"].as_array().unwrap();
    assert_eq!(streams.len(), 1);
    let st = &streams[0];
    assert_eq!(st["id"].as_u64(), Some(stream_id));
    assert_eq!(st["table_size"].as_u64(), Some(u64::from(maglev.size())));
    assert_eq!(st["unassigned"], 0);
    let shares: BTreeMap<u32, u64> = st["shares"]
        .as_array()
        .unwrap()
        .iter()
        .map(|sh| {
            (
                index_of_slot[&sh["target"].as_u64().unwrap()],
                sh["entries"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(shares, expected);
    assert_eq!(shares.values().sum::<u64>(), u64::from(maglev.size()));

    // The text form names the same shares.
    let text = bpf(&root, Some(&node), &["lb", "list"]);
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    for sh in st["shares"].as_array().unwrap() {
        let entries = sh["entries"].as_u64().unwrap();
        let pct = format!("{:.2}%", 100.0 * entries as f64 / f64::from(maglev.size()));
        let line = format!("{:<8} {:<8} {pct}", sh["target"].as_u64().unwrap(), entries);
        assert!(text.contains(&line), "no {line:?} in:\n{text}");
    }
    for t in &lab.targets {
        assert!(text.contains(&t.node_if), "{} missing:\n{text}", t.node_if);
    }

    // Stopped with keep_dataplane: the pins alone give the same document.
    lab.stop_keeping_pins();
    assert_eq!(json(&root, &node), listed);
}

#[test]
fn no_pins_is_one_line_and_exit_2() {
    let root = Path::new("/sys/fs/bpf").join(unique("tapmesh-test-none"));
    let out = bpf(&root, None, &["lb", "list"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "tapmesh: no tapmesh pins in {}/v{SCHEMA_VERSION} (is a daemon running, or was it stopped with keep_dataplane? else check --bpffs-root)\n",
            root.display()
        )
    );
}
