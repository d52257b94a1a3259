//! Issue 20: a local target's veth that cannot take native XDP redirects
//! (GRO turned off at its peer after the daemon turned it on) loses every
//! frame after the program returned; `redirect_failed` of the uplink program
//! counts each one, and nothing else does.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use tapmesh::lb::model::{LbSpec, TargetSpec, TargetVia};
use tapmesh_tests::{
    daemon::{named, packets},
    kernel_tests_enabled,
    net::{flow, send_udp_flows, stream, vip, wait_until, LbLab, UdpReceiver, CLIENT, NODE},
};

const DST: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const XDP: &str = "xdp_uplink";
/// How long to wait for datagrams that must all arrive, and (a quiet
/// period) for those that must not.
const ARRIVE: Duration = Duration::from_secs(30);
const NONE: Duration = Duration::from_secs(2);

/// `count` datagrams (one flow each) to the VIP; how many arrived
/// (waiting for all of them at most `within`).
fn datagrams(lab: &LbLab, first_port: u16, count: u16, within: Duration) -> u64 {
    let dst = SocketAddrV4::new(DST, 7000);
    let receiver = UdpReceiver::start(&lab.targets[0].netns.name, dst);
    let ports: Vec<u16> = (first_port..first_port + count).collect();
    let sent = send_udp_flows(&lab.client.name, CLIENT, &ports, dst, 1, &[0x5a; 32]);
    assert_eq!(sent, u64::from(count));
    wait_until(within, || receiver.count() >= sent);
    receiver.stop().total()
}

fn set_gro(lab: &LbLab, on: &str) {
    let t = &lab.targets[0];
    t.netns.exec(&["ethtool", "-K", &t.target_if, "gro", on]);
}

/// One test, the two cases in turn: the tracepoints see an ifindex and
/// no namespace, so two labs failing at once could count each other's
/// failures (docs/ARCHITECTURE.md, "redirect_failed").
#[test]
fn frames_a_veth_refuses_are_counted_as_redirect_failed() {
    if !kernel_tests_enabled() {
        return;
    }
    redirects_a_veth_refuses();
    frames_sent_back_out_of_the_uplink_that_a_veth_refuses();
}

fn redirects_a_veth_refuses() {
    let mut lab = LbLab::new(1, &[DST]);
    let spec = LbSpec {
        vips: vec![vip("v", &DST.to_string())],
        streams: vec![stream("s", 10)],
        flows: vec![flow("all", &["v"], "s", &["udp"])],
        targets: vec![lab.targets[0].local("s", 1)],
    };
    lab.start(Some(&spec));
    assert_eq!(datagrams(&lab, 30_000, 20, ARRIVE), 20, "GRO on: delivered");
    let status = lab.daemon().status();
    assert_eq!(named(&status, XDP, "redirect_failed"), 0);
    let redirected = packets(&status, XDP, "redirect");

    // GRO off at the peer: no NAPI there, every redirected frame is refused.
    set_gro(&lab, "off");
    assert_eq!(
        datagrams(&lab, 31_000, 40, NONE),
        0,
        "GRO off: nothing arrives"
    );
    let status = lab
        .daemon()
        .status_when(|s| named(s, XDP, "redirect_failed") >= 40);
    assert_eq!(
        named(&status, XDP, "redirect_failed"),
        40,
        "{}",
        lab.daemon().log_text()
    );
    assert_eq!(packets(&status, XDP, "redirect") - redirected, 40);

    // Back on: delivered again, and the counter stays.
    set_gro(&lab, "on");
    assert_eq!(datagrams(&lab, 32_000, 10, ARRIVE), 10);
    let status = lab.daemon().status();
    assert_eq!(named(&status, XDP, "redirect_failed"), 40);
}

/// A remote target whose node is reached back out of a veth uplink: the
/// frame goes back by redirect, not XDP_TX, whose frames wait in the peer's
/// ring until something else wakes it (found by a tester: counted as sent,
/// never seen). While the peer has no NAPI (GRO off) each refused frame is
/// counted as `redirect_failed`.
fn frames_sent_back_out_of_the_uplink_that_a_veth_refuses() {
    let mut lab = LbLab::new(1, &[DST]);
    let node = Ipv4Addr::new(198, 18, 0, 9);
    lab.add_client_address(node);
    let spec = LbSpec {
        vips: vec![vip("v", &DST.to_string())],
        streams: vec![stream("s", 10)],
        flows: vec![flow("all", &["v"], "s", &["udp"])],
        targets: vec![TargetSpec {
            stream: "s".into(),
            identifier: 1,
            via: TargetVia::Remote {
                node: node.to_string(),
            },
        }],
    };
    lab.start_with(Some(&spec), &["--node-address".into(), NODE.to_string()]);
    let gro = |on: &str| {
        lab.client
            .exec(&["ethtool", "-K", &lab.client_if, "gro", on])
    };
    // The tunnel's datagrams to the remote node, counted where they land.
    let tunnelled = |first_port: u16, count: u16, within: Duration| {
        let receiver = UdpReceiver::start(&lab.client.name, SocketAddrV4::new(node, 50103));
        let ports: Vec<u16> = (first_port..first_port + count).collect();
        let dst = SocketAddrV4::new(DST, 7000);
        send_udp_flows(&lab.client.name, CLIENT, &ports, dst, 1, &[0x5a; 32]);
        wait_until(within, || receiver.count() >= u64::from(count));
        receiver.stop().total()
    };
    // The hop is resolved before the first packet.
    lab.daemon().status_when(|s| {
        s.plugins
            .iter()
            .any(|p| p.detail.contains("next hops of 1/1 remote nodes"))
    });
    gro("on");
    assert_eq!(
        tunnelled(30_000, 20, ARRIVE),
        20,
        "GRO on: sent back and received"
    );
    let status = lab.daemon().status();
    let shown = tapmesh::cli::status::render(&status);
    assert_eq!(named(&status, XDP, "redirect_failed"), 0, "{shown}");
    assert_eq!(packets(&status, XDP, "redirect"), 20, "{shown}");
    assert_eq!(packets(&status, XDP, "tx"), 0, "{shown}");

    gro("off");
    assert_eq!(tunnelled(31_000, 40, NONE), 0, "GRO off: nothing arrives");
    let status = lab
        .daemon()
        .status_when(|s| named(s, XDP, "redirect_failed") >= 40);
    assert_eq!(named(&status, XDP, "redirect_failed"), 40);
    assert_eq!(packets(&status, XDP, "redirect"), 60);
}
