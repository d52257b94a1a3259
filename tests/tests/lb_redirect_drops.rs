//! Issue 20: a local target's veth that cannot take native XDP redirects
//! (GRO turned off at its peer after the daemon turned it on) loses every
//! frame after the program returned; `redirect_failed` of the uplink program
//! counts each one, and nothing else does.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use tapmesh::lb::model::LbSpec;
use tapmesh_tests::{
    daemon::{named, packets},
    kernel_tests_enabled,
    net::{flow, send_udp_flows, stream, vip, wait_until, LbLab, UdpReceiver, CLIENT},
};

const DST: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const XDP: &str = "xdp_uplink";

/// `count` datagrams (one flow each) to the VIP; how many arrived.
fn datagrams(lab: &LbLab, first_port: u16, count: u16) -> u64 {
    let dst = SocketAddrV4::new(DST, 7000);
    let receiver = UdpReceiver::start(&lab.targets[0].netns.name, dst);
    let ports: Vec<u16> = (first_port..first_port + count).collect();
    let sent = send_udp_flows(&lab.client.name, CLIENT, &ports, dst, 1, &[0x5a; 32]);
    assert_eq!(sent, u64::from(count));
    wait_until(Duration::from_secs(2), || receiver.count() >= sent);
    receiver.stop().total()
}

fn set_gro(lab: &LbLab, on: &str) {
    let t = &lab.targets[0];
    t.netns.exec(&["ethtool", "-K", &t.target_if, "gro", on]);
}

#[test]
fn redirects_a_veth_refuses_are_counted_as_redirect_failed() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut lab = LbLab::new(1, &[DST]);
    let spec = LbSpec {
        vips: vec![vip("v", &DST.to_string())],
        streams: vec![stream("s", 10)],
        flows: vec![flow("all", &["v"], "s", &["udp"])],
        targets: vec![lab.targets[0].local("s", 1)],
    };
    lab.start(Some(&spec));
    assert_eq!(datagrams(&lab, 30_000, 20), 20, "GRO on: delivered");
    let status = lab.daemon().status();
    assert_eq!(named(&status, XDP, "redirect_failed"), 0);
    let redirected = packets(&status, XDP, "redirect");

    // GRO off at the peer: no NAPI there, every redirected frame is refused.
    set_gro(&lab, "off");
    assert_eq!(datagrams(&lab, 31_000, 40), 0, "GRO off: nothing arrives");
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
    assert_eq!(datagrams(&lab, 32_000, 10), 10);
    let status = lab.daemon().status();
    assert_eq!(named(&status, XDP, "redirect_failed"), 40);
}
