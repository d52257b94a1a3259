//! Only nodes may use the tunnel: node 2 decapsulates tunnel packets from
//! a node it knows (here named by `--tunnel-peer`) and drops, counted as
//! `tunnel_unknown_node`, those from any other source, whatever they carry.
//!
//! ```text
//! sender ════ node2 ── target
//! .2.1 (+ 192.0.2.66)  .2.2 .21.1  .21.2 (+ VIP on lo)      (198.18.x.y)
//! ```

use std::{
    net::{Ipv4Addr, UdpSocket},
    time::Duration,
};

use tapmesh::lb::model::TargetVia;
use tapmesh_tests::{
    daemon::{named, Daemon},
    frames::udp4,
    kernel_tests_enabled, link,
    net::{lb_toml, one_target_spec},
    Netns,
};

const VIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const NODE1: &str = "198.18.2.1";
const NODE2: &str = "198.18.2.2";
const OUTSIDER: &str = "192.0.2.66";
const COUNT: u16 = 1000;

/// Sends `COUNT` tunnel packets from `from` to node 2's tunnel port, each
/// carrying a UDP datagram for the VIP's port 7000; paced so that no queue
/// on the way overflows.
fn send_tunnelled(netns: &str, from: &'static str) -> std::thread::JoinHandle<()> {
    let netns = netns.to_string();
    std::thread::spawn(move || {
        tapmesh::net::netns::enter(&netns).expect("entering the namespace");
        let socket = UdpSocket::bind((from, 0)).expect("bind on the outer source");
        let port = tapmesh_common::DEFAULT_TUNNEL_PORT;
        for i in 0..COUNT {
            let inner = udp4(
                CLIENT,
                VIP,
                40000 + i,
                7000,
                format!("{from} {i}").as_bytes(),
            );
            socket.send_to(&inner, (NODE2, port)).expect("sending");
            std::thread::sleep(Duration::from_micros(300));
        }
    })
}

/// Counts the datagrams the target gets on the VIP until 1 s passes without one.
fn receive(netns: &str) -> std::thread::JoinHandle<u32> {
    let netns = netns.to_string();
    std::thread::spawn(move || {
        tapmesh::net::netns::enter(&netns).expect("entering the namespace");
        let socket = UdpSocket::bind((VIP, 7000)).expect("bind on the VIP");
        socket
            .set_read_timeout(Some(Duration::from_secs(1)))
            .unwrap();
        let mut buf = [0u8; 256];
        let mut got = 0;
        while socket.recv_from(&mut buf).is_ok() {
            got += 1;
        }
        got
    })
}

#[test]
fn tunnel_packets_from_a_node_it_does_not_know_reach_nothing() {
    if !kernel_tests_enabled() {
        return;
    }
    let sender = Netns::new("s");
    let node2 = Netns::new("n2");
    let target = Netns::new("t");
    let (_s_if, n2_up) = link(&sender, "198.18.2.1/24", &node2, "198.18.2.2/24");
    let (n2_down, t_if) = link(&node2, "198.18.21.1/24", &target, "198.18.21.2/24");
    sender.ip(&["addr", "add", &format!("{OUTSIDER}/32"), "dev", "lo"]);
    node2.ip(&["route", "add", &format!("{OUTSIDER}/32"), "via", NODE1]);
    target.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"]);
    target.ip(&["route", "add", "default", "via", "198.18.21.1"]);
    // Native XDP redirect into a veth needs NAPI on the receiving side.
    target.exec(&["ethtool", "-K", &t_if.interface, "gro", "on"]);

    let dir = std::env::temp_dir().join(tapmesh_tests::unique("tmpeer"));
    std::fs::create_dir_all(&dir).unwrap();
    let via = TargetVia::Local {
        interface: n2_down.interface.clone(),
        mac: tapmesh_tests::fmt_mac(target.mac(&t_if.interface)),
    };
    let spec = one_target_spec(&VIP.to_string(), "web", 4, &["udp"], via);
    let lb = dir.join("node2.toml");
    std::fs::write(&lb, lb_toml(&spec)).expect("writing the LB file");
    let d2 = Daemon::start(
        &node2.name,
        &[
            "--uplink",
            &n2_up.interface,
            "--node-address",
            NODE2,
            "--tunnel-peer",
            NODE1,
            "--lb-config",
            lb.to_str().unwrap(),
        ],
    );

    // From an outsider: nothing reaches the target, every packet is counted.
    let got = receive(&target.name);
    std::thread::sleep(Duration::from_millis(200));
    send_tunnelled(&sender.name, OUTSIDER).join().unwrap();
    assert_eq!(got.join().unwrap(), 0, "spoofed packets reached the target");
    let s2 = d2.status();
    assert_eq!(
        named(&s2, "xdp_uplink", "tunnel_unknown_node"),
        u64::from(COUNT),
        "every spoofed packet is counted"
    );
    let delivered = |s: &tapmesh::admin::proto::StatusResponse| {
        s.targets
            .iter()
            .find(|t| t.name == "web/1")
            .map_or(0, |t| t.packets)
    };
    assert_eq!(delivered(&s2), 0, "the LB saw no spoofed packet");

    // From the node it knows: every packet reaches the target.
    let got = receive(&target.name);
    std::thread::sleep(Duration::from_millis(200));
    send_tunnelled(&sender.name, NODE1).join().unwrap();
    assert_eq!(got.join().unwrap(), u32::from(COUNT), "the node's packets");
    let s2 = d2.status();
    assert_eq!(delivered(&s2), u64::from(COUNT));
    assert_eq!(
        named(&s2, "xdp_uplink", "tunnel_unknown_node"),
        u64::from(COUNT),
        "the node's packets are not counted as unknown"
    );
    for reason in ["no_target", "no_flow_match", "bad_tunnel_packet"] {
        assert_eq!(named(&s2, "xdp_uplink", reason), 0, "node 2 {reason}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
