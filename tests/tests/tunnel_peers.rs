//! Only nodes may use the tunnel: node 2 decapsulates tunnel packets from
//! a node it knows (here named by `--tunnel-peer`) and drops, counted as
//! `tunnel_unknown_node`, those from any other source, whatever they carry;
//! and it relays nothing: an inner packet for neither a VIP nor a container
//! here is dropped as `tunnel_unknown_destination`.
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
    frames::{ethernet, internet_checksum, ipv4, tunnel_frame, udp4, udp_header},
    kernel_tests_enabled, link,
    net::{lb_toml, one_target_spec},
    send_frames, Netns,
};

const VIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const NODE1: &str = "198.18.2.1";
const NODE2: &str = "198.18.2.2";
const OUTSIDER: &str = "192.0.2.66";
const COUNT: u16 = 1000;

/// Sends `COUNT` tunnel packets from `from` to node 2's tunnel port, each
/// carrying a UDP datagram for port 7000 of `to`; paced so that no queue
/// on the way overflows.
fn send_tunnelled(netns: &str, from: &'static str, to: Ipv4Addr) -> std::thread::JoinHandle<()> {
    send_edited(netns, from, CLIENT, to, |_| {})
}

/// [`send_tunnelled`], the inner packets from `source`, with `edit`
/// applied to each.
fn send_edited(
    netns: &str,
    from: &'static str,
    source: Ipv4Addr,
    to: Ipv4Addr,
    edit: fn(&mut Vec<u8>),
) -> std::thread::JoinHandle<()> {
    let netns = netns.to_string();
    std::thread::spawn(move || {
        tapmesh::net::netns::enter(&netns).expect("entering the namespace");
        let socket = UdpSocket::bind((from, 0)).expect("bind on the outer source");
        let port = tapmesh_common::DEFAULT_TUNNEL_PORT;
        for i in 0..COUNT {
            let mut inner = udp4(
                source,
                to,
                40000 + i,
                7000,
                format!("{from} {i}").as_bytes(),
            );
            edit(&mut inner);
            socket.send_to(&inner, (NODE2, port)).expect("sending");
            std::thread::sleep(Duration::from_micros(300));
        }
    })
}

/// Counts the datagrams the target gets on port 7000 of `at` until 1 s
/// passes without one.
fn receive(netns: &str, at: Ipv4Addr) -> std::thread::JoinHandle<u32> {
    let netns = netns.to_string();
    std::thread::spawn(move || {
        tapmesh::net::netns::enter(&netns).expect("entering the namespace");
        let socket = UdpSocket::bind((at, 7000)).expect("bind on the address");
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
    let (s_if, n2_up) = link(&sender, "198.18.2.1/24", &node2, "198.18.2.2/24");
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
    let got = receive(&target.name, VIP);
    std::thread::sleep(Duration::from_millis(200));
    send_tunnelled(&sender.name, OUTSIDER, VIP).join().unwrap();
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
    let got = receive(&target.name, VIP);
    std::thread::sleep(Duration::from_millis(200));
    send_tunnelled(&sender.name, NODE1, VIP).join().unwrap();
    assert_eq!(got.join().unwrap(), u32::from(COUNT), "the node's packets");
    let s2 = d2.status();
    assert_eq!(delivered(&s2), u64::from(COUNT));
    assert_eq!(
        named(&s2, "xdp_uplink", "tunnel_unknown_node"),
        u64::from(COUNT),
        "the node's packets are not counted as unknown"
    );
    for reason in [
        "no_target",
        "no_flow_match",
        "bad_tunnel_packet",
        "ttl_exceeded",
        "tunnel_unknown_destination",
    ] {
        assert_eq!(named(&s2, "xdp_uplink", reason), 0, "node 2 {reason}");
    }

    // From the node it knows, for an address that is neither a VIP nor a
    // container here: node 2 would route it on to the target (forwarding
    // is on), which would make it a relay. Nothing arrives; every packet
    // is counted.
    node2.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    node2.ip(&["route", "add", "198.18.0.0/24", "via", NODE1]);
    let routed = Ipv4Addr::new(198, 18, 21, 2);
    let got = receive(&target.name, routed);
    std::thread::sleep(Duration::from_millis(200));
    send_tunnelled(&sender.name, NODE1, routed).join().unwrap();
    assert_eq!(got.join().unwrap(), 0, "node 2 relayed the inner packets");
    let s2 = d2.status();
    assert_eq!(
        named(&s2, "xdp_uplink", "tunnel_unknown_destination"),
        u64::from(COUNT),
        "every inner packet for elsewhere is counted"
    );
    assert_eq!(delivered(&s2), u64::from(COUNT), "the LB took none of them");

    // From the node it knows, for the VIP, but the inner packet says it is
    // longer than the datagram that carries it: refused before the LB.
    let got = receive(&target.name, VIP);
    std::thread::sleep(Duration::from_millis(200));
    send_edited(&sender.name, NODE1, CLIENT, VIP, |inner| {
        let length = u16::from_be_bytes([inner[2], inner[3]]) + 1;
        inner[2..4].copy_from_slice(&length.to_be_bytes());
    })
    .join()
    .unwrap();
    assert_eq!(
        got.join().unwrap(),
        0,
        "inner packets longer than their datagram"
    );
    let s2 = d2.status();
    assert_eq!(
        named(&s2, "xdp_uplink", "bad_tunnel_packet"),
        u64::from(COUNT)
    );
    assert_eq!(delivered(&s2), u64::from(COUNT), "the LB took none of them");

    // From the node it knows, inner packets from a source no node sends
    // for: loopback, multicast. The kernel drops such martians on arrival;
    // the tunnel may not carry them past that check.
    for source in [Ipv4Addr::LOCALHOST, Ipv4Addr::new(224, 0, 0, 5)] {
        let got = receive(&target.name, VIP);
        std::thread::sleep(Duration::from_millis(200));
        send_edited(&sender.name, NODE1, source, VIP, |_| {})
            .join()
            .unwrap();
        assert_eq!(got.join().unwrap(), 0, "inner packets from {source}");
    }
    let s2 = d2.status();
    assert_eq!(
        named(&s2, "xdp_uplink", "tunnel_foreign_source"),
        2 * u64::from(COUNT)
    );

    // Frames made by hand: a tunnel packet as a node sends it (delivered),
    // then with bytes after the datagram, with a UDP length short of the IP
    // payload, with a wrong outer checksum (each refused), and with an IP
    // option (no node sends one: left to the kernel, not decapsulated).
    let (n1_mac, n2_mac) = (sender.mac(&s_if.interface), node2.mac(&n2_up.interface));
    let (node1, node2_addr) = (NODE1.parse().unwrap(), NODE2.parse().unwrap());
    let port = tapmesh_common::DEFAULT_TUNNEL_PORT;
    let inner = udp4(CLIENT, VIP, 41000, 7000, b"by hand");
    let whole = tunnel_frame(n2_mac, n1_mac, node1, node2_addr, 40000, port, &inner);
    let mut trailing = whole.clone();
    trailing.extend_from_slice(b"ZZZZ");
    let mut short_udp = trailing.clone();
    with_outer_header(&mut short_udp, |ip| {
        let total = u16::from_be_bytes([ip[2], ip[3]]) + 4;
        ip[2..4].copy_from_slice(&total.to_be_bytes());
    });
    let mut bad_checksum = whole.clone();
    bad_checksum[24] ^= 0xff;
    let udp = udp_header(40000, port, &inner);
    let option = ethernet(
        n2_mac,
        n1_mac,
        &[],
        0x0800,
        &ipv4(node1, node2_addr, 17, &[1, 1, 1, 0], &udp),
    );
    let mut frames = Vec::new();
    for frame in [whole, trailing, short_udp, bad_checksum, option] {
        frames.extend(std::iter::repeat_n(frame, 20));
    }
    let got = receive(&target.name, VIP);
    std::thread::sleep(Duration::from_millis(200));
    send_frames(&sender.name, &s_if.interface, &frames);
    assert_eq!(got.join().unwrap(), 20, "only the whole packets");
    let s2 = d2.status();
    assert_eq!(
        named(&s2, "xdp_uplink", "bad_tunnel_packet"),
        u64::from(COUNT) + 3 * 20
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Applies `edit` to the outer IPv4 header of a tunnel frame (no VLAN, no
/// options), then sets its checksum right.
fn with_outer_header(frame: &mut [u8], edit: impl FnOnce(&mut [u8])) {
    let ip = &mut frame[14..34];
    edit(ip);
    ip[10..12].copy_from_slice(&[0, 0]);
    let sum = internet_checksum(&[ip]);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
}

/// `tm_tunnel_peers` as (address, source bits).
fn peers(bpf: &tapmesh_tests::bpf::Bpf) -> Vec<(Ipv4Addr, u8)> {
    let name = tapmesh_common::map_names::TUNNEL_PEERS;
    let map: aya::maps::HashMap<_, [u8; 4], u8> =
        aya::maps::HashMap::try_from(bpf.ebpf.map(name).expect("the peers map")).unwrap();
    let mut all: Vec<(Ipv4Addr, u8)> = map
        .iter()
        .map(|e| e.expect("an entry"))
        .map(|(k, v)| (Ipv4Addr::from(k), v))
        .collect();
    all.sort();
    all
}

/// The writers name the nodes they send to, each under its own bit: the
/// LB's remote targets (1), the overlay's remote instances (2); a node
/// both name stays until neither does; a refused LB change leaves the map
/// as it was; and the uplink takes tunnel packets from exactly those nodes.
#[test]
fn the_writers_name_the_nodes_that_may_use_the_tunnel() {
    use tapmesh::dataplane::{
        lb::LbWriter,
        overlay::{OverlayTables, OverlayWriter},
    };
    use tapmesh_common::{overlay::Instance, overlay::INSTANCE_REMOTE, DropReason, ProgramSlot};
    use tapmesh_tests::{bpf::Bpf, frames::tunnel, write_lb};
    if !kernel_tests_enabled() {
        return;
    }
    const NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 7, 1);
    const LB_NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 7, 2);
    const BOTH: Ipv4Addr = Ipv4Addr::new(198, 18, 7, 3);
    let mut bpf = Bpf::load();
    let mut lb = LbWriter::default();
    let remote = |node: Ipv4Addr| TargetVia::Remote {
        node: node.to_string(),
    };
    let no_local = |_: &str| Err("no local targets here".to_string());
    let mut spec = one_target_spec(&VIP.to_string(), "s", 4, &[], remote(LB_NODE));
    spec.targets
        .push(tapmesh_tests::net::target("s", 2, remote(BOTH)));
    write_lb(&mut bpf, &mut lb, &spec, Some(NODE), &no_local);
    assert_eq!(peers(&bpf), vec![(LB_NODE, 1), (BOTH, 1)]);

    let instance = |node: Ipv4Addr| Instance {
        node_addr: node.octets(),
        node_port: 50103,
        kind: INSTANCE_REMOTE,
        ..Default::default()
    };
    let mut overlay = OverlayWriter::default();
    let mut tables = OverlayTables::default();
    tables.instances.insert(1, instance(BOTH));
    overlay
        .apply(&mut bpf.ebpf, &tables)
        .expect("overlay apply");
    assert_eq!(peers(&bpf), vec![(LB_NODE, 1), (BOTH, 3)]);

    // Only known nodes get through: the inner packet (for a VIP whose
    // targets are remote) reaches the LB from them, nothing from others.
    let inner = udp4(CLIENT, VIP, 40000, 7000, b"x");
    let before = bpf.stats(ProgramSlot::XdpUplink);
    for from in [LB_NODE, BOTH, Ipv4Addr::new(192, 0, 2, 66)] {
        bpf.run("tm_xdp_uplink", &tunnel(from, NODE, 50103, &inner), 1);
    }
    let after = bpf.stats(ProgramSlot::XdpUplink);
    let delta = |r| after.drops.get(r) - before.drops.get(r);
    assert_eq!(delta(DropReason::TargetNotLocal), 2, "from the two nodes");
    assert_eq!(delta(DropReason::TunnelUnknownNode), 1, "from the outsider");

    // A refused change (a local target, which this resolver refuses) writes nothing.
    let mut refused = spec.clone();
    refused.targets.push(tapmesh_tests::net::target(
        "s",
        3,
        TargetVia::Local {
            interface: "lo".into(),
            mac: "02:00:00:00:00:01".into(),
        },
    ));
    let valid = tapmesh::lb::model::validate(&refused).expect("valid");
    let tunnel_settings = tapmesh::dataplane::lb::TunnelSettings {
        port: 50103,
        address: Some(NODE),
    };
    assert!(lb
        .apply(&mut bpf.ebpf, &valid, tunnel_settings, &no_local)
        .is_err());
    assert_eq!(peers(&bpf), vec![(LB_NODE, 1), (BOTH, 3)]);

    // The LB's targets gone: the overlay's node stays, under its bit only.
    spec.targets.clear();
    write_lb(&mut bpf, &mut lb, &spec, Some(NODE), &no_local);
    assert_eq!(peers(&bpf), vec![(BOTH, 2)]);
    overlay
        .apply(&mut bpf.ebpf, &OverlayTables::default())
        .expect("overlay apply");
    assert_eq!(peers(&bpf), vec![]);
}

/// `tm_tunnel_slots` entry of `addr`.
fn slot(bpf: &tapmesh_tests::bpf::Bpf, addr: Ipv4Addr) -> tapmesh_common::tunnel::PeerSlot {
    use tapmesh_common::tunnel::{peer_slot, PeerSlot};
    let name = tapmesh_common::map_names::TUNNEL_SLOTS;
    let map: aya::maps::Array<_, PeerSlot> =
        aya::maps::Array::try_from(bpf.ebpf.map(name).expect("the slots map")).unwrap();
    map.get(&peer_slot(addr.octets()), 0).expect("a slot")
}

/// The uplink checks a tunnel packet's source in its `tm_tunnel_slots`
/// slot (the low 10 bits of the address): a node alone there is taken by
/// the slot, nodes sharing one are told apart through `tm_tunnel_peers`,
/// and the slots follow the nodes going.
#[test]
fn nodes_sharing_a_slot_are_told_apart() {
    use std::collections::BTreeSet;
    use tapmesh::dataplane::tunnel::{write, write_peers, TunnelSettings};
    use tapmesh_common::{
        tunnel::{PeerSlot, PEER_SLOT_ONE, PEER_SLOT_SHARED, PEER_STATIC},
        DropReason, ProgramSlot,
    };
    use tapmesh_tests::{bpf::Bpf, frames::tunnel};
    if !kernel_tests_enabled() {
        return;
    }
    const NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 7, 1);
    // A and B share slot 0x305; C has 0x306 alone, where D (no node) maps too.
    let a = Ipv4Addr::new(198, 18, 7, 5);
    let b = Ipv4Addr::new(198, 18, 3, 5);
    let c = Ipv4Addr::new(198, 18, 7, 6);
    let d = Ipv4Addr::new(198, 18, 3, 6);
    let mut bpf = Bpf::load();
    let settings = TunnelSettings {
        port: 50103,
        address: Some(NODE),
    };
    write(&mut bpf.ebpf, settings).expect("tm_tunnel");
    let set = |v: &[Ipv4Addr]| v.iter().copied().collect::<BTreeSet<_>>();
    let one = |addr: Ipv4Addr| PeerSlot {
        addr: addr.octets(),
        state: PEER_SLOT_ONE,
        _pad: [0; 3],
    };
    // Tunnel packets from each source: how many were decapsulated (the
    // inner datagram is for no VIP and no container here, so it is then
    // dropped as `tunnel_unknown_destination`) and how many were dropped as
    // from an unknown node.
    let send = |bpf: &mut Bpf, from: &[Ipv4Addr]| -> (u64, u64) {
        let inner = udp4(CLIENT, VIP, 40000, 7000, b"x");
        let before = bpf.stats(ProgramSlot::XdpUplink);
        for &source in from {
            let frame = tunnel(source, NODE, 50103, &inner);
            assert_eq!(bpf.run("tm_xdp_uplink", &frame, 1).action, 1, "dropped");
        }
        let after = bpf.stats(ProgramSlot::XdpUplink);
        let moved = |reason| after.drops.get(reason) - before.drops.get(reason);
        (
            moved(DropReason::TunnelUnknownDestination),
            moved(DropReason::TunnelUnknownNode),
        )
    };

    write_peers(&mut bpf.ebpf, PEER_STATIC, &set(&[]), &set(&[a, b, c])).expect("peers");
    let shared = PeerSlot {
        state: PEER_SLOT_SHARED,
        ..PeerSlot::default()
    };
    assert_eq!((slot(&bpf, a), slot(&bpf, c)), (shared, one(c)));
    assert_eq!(send(&mut bpf, &[a, b, c]), (3, 0));
    assert_eq!(send(&mut bpf, &[d]), (0, 1), "C's slot, not C");

    // A goes: B has the slot alone.
    write_peers(&mut bpf.ebpf, PEER_STATIC, &set(&[a, b, c]), &set(&[b, c])).expect("peers");
    assert_eq!(slot(&bpf, b), one(b));
    assert_eq!(send(&mut bpf, &[a]), (0, 1));
    assert_eq!(send(&mut bpf, &[b, c]), (2, 0));

    // All go: empty slots, nothing taken.
    write_peers(&mut bpf.ebpf, PEER_STATIC, &set(&[b, c]), &set(&[])).expect("peers");
    assert_eq!(
        (slot(&bpf, b), slot(&bpf, c)),
        (PeerSlot::default(), PeerSlot::default())
    );
    assert_eq!(send(&mut bpf, &[b, c]), (0, 2));
}
