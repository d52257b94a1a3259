//! A refused LB change leaves every map as it was, byte for byte (every
//! pinned tapmesh map, counters included), and the traffic it would have
//! changed keeps flowing. Issue 20: a refused `lb apply` used to write the
//! prefix-VIP count in `tm_node` before the targets' interfaces were looked
//! up, so after the refusal a prefix VIP that `lb list` still showed lost
//! every packet.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use tapmesh::{
    admin::{
        connect,
        proto::{admin_client::AdminClient, ListLbRequest},
    },
    lb::model::{LbSpec, TargetSpec, TargetVia},
};
use tapmesh_tests::{
    kernel_tests_enabled,
    maps::{differences, dump_pinned},
    net::{flow, send_udp_flows, stream, vip, wait_until, LbLab, UdpReceiver, CLIENT},
};
use tonic::{transport::Channel, Code};

const PREFIX: &str = "203.0.113.0/24";
const DST: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const NO_SUCH_IF: &str = "tmnosuch0";

/// 200 datagrams (200 flows) to an address of the prefix VIP: all arrive.
fn datagrams_cross(lab: &LbLab, when: &str) {
    let dst = SocketAddrV4::new(DST, 7000);
    let receiver = UdpReceiver::start(&lab.targets[0].netns.name, dst);
    let ports: Vec<u16> = (30_000..30_200).collect();
    let sent = send_udp_flows(&lab.client.name, CLIENT, &ports, dst, 1, &[0x5a; 32]);
    assert_eq!(sent, 200);
    wait_until(Duration::from_secs(30), || receiver.count() >= sent);
    assert_eq!(
        receiver.stop().total(),
        sent,
        "{when}: every datagram to the prefix VIP arrives"
    );
}

fn unknown_local(identifier: u32) -> TargetSpec {
    TargetSpec {
        stream: "s".into(),
        identifier,
        via: TargetVia::Local {
            interface: NO_SUCH_IF.into(),
            mac: "02:00:00:00:00:07".into(),
        },
    }
}

#[test]
fn refused_changes_leave_every_map_as_it_was_and_the_prefix_vip_keeps_working() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut lab = LbLab::new(1, &[DST]);
    let good = LbSpec {
        vips: vec![vip("net", PREFIX)],
        streams: vec![stream("s", 10)],
        flows: vec![flow("all", &["net"], "s", &["udp"])],
        targets: vec![lab.targets[0].local("s", 1)],
    };
    lab.start(Some(&good));
    datagrams_cross(&lab, "before");
    let pins = lab
        .daemon()
        .bpffs_root
        .join(format!("v{}", tapmesh_common::SCHEMA_VERSION));

    // The prefix VIP replaced by a host VIP (the count in `tm_node` would
    // drop to 0), with a target on an interface the node does not have.
    let mut to_host = good.clone();
    to_host.vips = vec![vip("host", &DST.to_string())];
    to_host.flows = vec![flow("all", &["host"], "s", &["udp"])];
    to_host.targets.push(unknown_local(2));
    // A second prefix VIP (the count would go to 2), same target.
    let mut second = good.clone();
    second.vips.push(vip("net2", "198.51.100.0/24"));
    second.flows[0].vips.push("net2".into());
    second.targets.push(unknown_local(2));
    // The prefix VIP removed, a new target on another node (the node's
    // tunnel address is its uplink's) beside one on an unknown interface:
    // nothing of the remote target may be written either.
    let mut remote = to_host.clone();
    remote.targets = vec![
        TargetSpec {
            stream: "s".into(),
            identifier: 3,
            via: TargetVia::Remote {
                node: "198.18.0.9".into(),
            },
        },
        unknown_local(2),
    ];
    let cases: Vec<(&str, LbSpec, Code, &str)> = vec![
        (
            "apply: prefix VIP to host VIP, unknown interface",
            to_host,
            Code::InvalidArgument,
            NO_SUCH_IF,
        ),
        (
            "apply: a second prefix VIP, unknown interface",
            second,
            Code::InvalidArgument,
            NO_SUCH_IF,
        ),
        (
            "apply: prefix VIP removed, a remote target and an unknown interface",
            remote,
            Code::InvalidArgument,
            NO_SUCH_IF,
        ),
    ];

    let socket = lab.daemon().socket.clone();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        let mut c = connect(&socket).await.expect("admin socket");
        let listing = |mut c: AdminClient<Channel>| async move {
            c.list_lb(ListLbRequest {})
                .await
                .expect("list")
                .into_inner()
                .config
        };
        let before = listing(c.clone()).await;
        let maps = dump_pinned(&pins);
        assert!(maps.len() > 20, "every pinned map: {:?}", maps.keys());
        for (what, spec, code, needle) in cases {
            let status = c
                .apply_lb(tapmesh::admin::lb_config(spec))
                .await
                .expect_err(what);
            assert_eq!(status.code(), code, "{what}: {}", status.message());
            assert!(
                status.message().contains(needle),
                "{what}: the message names {needle:?}: {}",
                status.message()
            );
            let diff = differences(&maps, &dump_pinned(&pins));
            assert!(diff.is_empty(), "{what}: maps changed: {diff:?}");
            assert_eq!(
                listing(c.clone()).await,
                before,
                "{what}: the configuration changed"
            );
        }
        // One target on an unknown interface, through set_target.
        let wire = tapmesh::admin::lb_config(LbSpec {
            targets: vec![unknown_local(4)],
            ..Default::default()
        })
        .targets
        .remove(0);
        let status = c.set_target(wire).await.expect_err("set_target");
        assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
        assert!(
            status.message().contains(NO_SUCH_IF),
            "{}",
            status.message()
        );
        let diff = differences(&maps, &dump_pinned(&pins));
        assert!(diff.is_empty(), "set_target: maps changed: {diff:?}");
    });
    datagrams_cross(&lab, "after the refused changes");
}
