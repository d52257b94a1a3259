//! Configurations that cannot work are refused, each with its reason, and
//! leave every map as it was (issue 20): a VIP of every address (the node
//! stopped answering on its uplink), a VIP holding the node's own address, a
//! remote target that is this node (100 % drop), a local target on the
//! loopback or the uplink, an IPv6 VIP in a flow whose source subnets are
//! all IPv4.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use tapmesh::lb::model::{LbSpec, TargetSpec, TargetVia};
use tapmesh_tests::{
    kernel_tests_enabled,
    maps::{differences, dump_pinned},
    net::{flow, send_udp_flows, stream, vip, wait_until, LbLab, UdpReceiver, CLIENT, NODE},
};

const DST: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);

fn datagrams_cross(lab: &LbLab) {
    let dst = SocketAddrV4::new(DST, 7000);
    let receiver = UdpReceiver::start(&lab.targets[0].netns.name, dst);
    let ports: Vec<u16> = (32_000..32_100).collect();
    let sent = send_udp_flows(&lab.client.name, CLIENT, &ports, dst, 1, &[0x5a; 32]);
    wait_until(Duration::from_secs(30), || receiver.count() >= sent);
    assert_eq!(receiver.stop().total(), 100);
}

#[test]
fn configurations_that_cannot_work_are_refused() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut lab = LbLab::new(1, &[DST]);
    let good = LbSpec {
        vips: vec![vip("v", &DST.to_string())],
        streams: vec![stream("s", 10)],
        flows: vec![flow("all", &["v"], "s", &["udp"])],
        targets: vec![lab.targets[0].local("s", 1)],
    };
    lab.start(Some(&good));
    let pins = lab
        .daemon()
        .bpffs_root
        .join(format!("v{}", tapmesh_common::SCHEMA_VERSION));
    let maps = dump_pinned(&pins);

    let with_vip = |name: &str, address: &str| {
        let mut s = good.clone();
        s.vips.push(vip(name, address));
        s.flows[0].vips.push(name.into());
        s
    };
    let mut this_node = good.clone();
    this_node.targets.push(TargetSpec {
        stream: "s".into(),
        identifier: 2,
        // The node's tunnel address: its uplink's.
        via: TargetVia::Remote {
            node: NODE.to_string(),
        },
    });
    let mut node_in_vip = this_node.clone();
    node_in_vip.targets[1].via = TargetVia::Remote {
        node: DST.to_string(),
    };
    // A local target on the loopback or on the uplink itself (found by a
    // tester: both were taken, and every packet was lost).
    let on = |interface: &str| {
        let mut s = good.clone();
        let mut t = lab.targets[0].local("s", 2);
        if let TargetVia::Local { interface: i, .. } = &mut t.via {
            *i = interface.into();
        }
        s.targets.push(t);
        s
    };
    let (on_lo, on_uplink) = (on("lo"), on(&lab.uplink));
    let mut v6_only_v4 = with_vip("v6", "2001:db8::10");
    v6_only_v4.flows[0].source_subnets = vec!["198.18.0.0/24".into()];
    let cases = [
        (
            "everything",
            with_vip("all", "0.0.0.0/0"),
            "takes every packet",
        ),
        (
            "everything v6",
            with_vip("all6", "::/0"),
            "takes every packet",
        ),
        (
            "multicast v6 (neighbour discovery)",
            with_vip("nd", "ff02::/16"),
            "overlaps ff00::/8 (multicast)",
        ),
        (
            "broadcast",
            with_vip("bc", "255.255.255.255"),
            "overlaps 240.0.0.0/4 (reserved, broadcast)",
        ),
        (
            "the node's address",
            with_vip("net", "198.18.0.0/16"),
            "holds this node's own address 198.18.0.1",
        ),
        (
            "a remote target on this node",
            this_node,
            "198.18.0.1 is this node's own tunnel address",
        ),
        (
            "a remote target's node inside a VIP",
            node_in_vip,
            &format!("its node {DST} is inside VIP \"v\""),
        ),
        (
            "a local target on the loopback",
            on_lo,
            "interface \"lo\" is the loopback",
        ),
        (
            "a local target on the uplink",
            on_uplink,
            "is an uplink (it runs tm_xdp_uplink)",
        ),
        (
            "IPv6 VIP, IPv4 sources",
            v6_only_v4,
            "flow \"all\" can never match on VIP \"v6\"",
        ),
    ];
    for (what, spec, needle) in cases {
        // A tonic status shows its message with quotes escaped.
        let message = lab.apply(&spec).expect_err(what).replace("\\\"", "\"");
        assert!(message.contains(needle), "{what}: {needle:?} in {message}");
        let diff = differences(&maps, &dump_pinned(&pins));
        assert!(diff.is_empty(), "{what}: maps changed: {diff:?}");
    }
    // The node still answers on its uplink, and the VIP still works.
    let ping = lab
        .client
        .try_exec(&["ping", "-c", "1", "-W", "2", &NODE.to_string()]);
    assert!(ping.status.success(), "the node answers a ping");
    datagrams_cross(&lab);
}
