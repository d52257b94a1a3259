//! The service-IP overlay: its TC and XDP paths through BPF_PROG_TEST_RUN
//! with a service table in the maps ([`rows`]), and a client container on
//! node 1 loading a service IP whose instance is on node 2 from every CPU
//! on veth ([`rates`]): through tapmesh (TC translation, UDP 50103 tunnel
//! and XDP decap), through what a Kubernetes user runs with flannel and
//! kube-proxy (nftables DNAT and kernel VXLAN), and through plain routing
//! as the floor, in the same run on the same kind of veth lab.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use super::{
    load::{self, Setup},
    timing::{measure_loop, Row},
    OUR_MAC, XDP_REDIRECT,
};
use crate::{
    bpf::Bpf,
    frames::*,
    link,
    overlay::{TwoNodes, NODE1, NODE2},
    underlay::{NODE, REMOTE_MAC, REMOTE_NODE, TUNNEL_PORT},
    Netns,
};

const TC_ACT_REDIRECT: u32 = 7;
const FLOOD: Duration = Duration::from_secs(2);
const SERVICE: &str = "203.0.113.10";
const PORT: u16 = 7000;
/// The client container, its instance IP, the RR service IP and its remote
/// instance's addresses in [`rows`].
const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 100);
const RR_SERVICE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const INSTANCE_NS: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 66);
const INSTANCE_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 102);
const PAYLOAD: [u8; 18] = [0; 18];

/// The overlay's paths with a service table in the maps: a client container
/// (192.0.2.2, instance IP 203.0.113.100) sends to an RR service IP whose one
/// instance is on the remote node (next hop resolved); the replies come back
/// through the tunnel.
pub fn rows(bpf: &mut Bpf, tma_index: u32, tma_mac: [u8; 6]) -> Vec<Row> {
    use tapmesh::dataplane::overlay::{
        addr6_words, addr_word, OverlayTables, OverlayWriter, ServiceTable,
    };
    use tapmesh_common::overlay::*;
    let (client, client_ip, service) = (CLIENT, CLIENT_IP, RR_SERVICE);
    let (instance_ns, instance_ip) = (INSTANCE_NS, INSTANCE_IP);
    let mut tables = OverlayTables::default();
    let tunnel = tapmesh::dataplane::tunnel::TunnelSettings {
        port: TUNNEL_PORT,
        address: Some(NODE),
    };
    tapmesh::dataplane::tunnel::write(&mut bpf.ebpf, tunnel).expect("writing tm_tunnel");
    tables.config = OverlayConfig {
        tunnel_mtu: 1472,
        _pad: 0,
        gateway: addr_word(Ipv4Addr::new(192, 0, 2, 1)),
        service_prefix: addr_word(Ipv4Addr::new(203, 0, 113, 0)),
        service_mask: addr_word(Ipv4Addr::new(255, 255, 255, 0)),
        flags: 0,
    };
    tables.services.insert(
        service,
        ServiceTable {
            id: 0,
            policy: POLICY_ROUND_ROBIN,
            slots: vec![1],
        },
    );
    tables.instances.insert(
        1,
        Instance {
            ns_addr: addr_word(instance_ns),
            reply_addr: addr_word(instance_ip),
            node_addr: addr_word(REMOTE_NODE),
            node_port: TUNNEL_PORT,
            kind: INSTANCE_REMOTE,
            generation: 1,
            ifindex: tma_index,
            dst_mac: REMOTE_MAC,
            src_mac: tma_mac,
            ..Instance::default()
        },
    );
    tables.locals.insert(
        client,
        Local {
            ifindex: 1,
            instance_addr: addr_word(client_ip),
            mac: MAC_A,
            host_mac: OUR_MAC,
        },
    );
    // A second service IP whose instance is a container on this node.
    let local_service = Ipv4Addr::new(203, 0, 113, 20);
    let local_ns = Ipv4Addr::new(192, 0, 2, 3);
    tables.services.insert(
        local_service,
        ServiceTable {
            id: 1,
            policy: POLICY_ROUND_ROBIN,
            slots: vec![2],
        },
    );
    tables.instances.insert(
        2,
        Instance {
            ns_addr: addr_word(local_ns),
            reply_addr: addr_word(Ipv4Addr::new(203, 0, 113, 103)),
            kind: INSTANCE_LOCAL,
            generation: 1,
            ifindex: 1,
            dst_mac: MAC_B,
            src_mac: OUR_MAC,
            ..Instance::default()
        },
    );
    // IPv6 (dual stack): the RR service's IPv6 address, its remote
    // instance's IPv6 addresses and the client's.
    let v6 = |s: &str| -> std::net::Ipv6Addr { s.parse().expect("IPv6 address") };
    let (service6, client6, client_ip6) = (
        v6("2001:db8:ff::10"),
        v6("2001:db8:1::2"),
        v6("2001:db8:ff::100"),
    );
    let (instance_ns6, instance_ip6) = (v6("2001:db8:2::66"), v6("2001:db8:ff::102"));
    tables.config6 = OverlayConfig6 {
        gateway: addr6_words(v6("2001:db8:1::1")),
        service_prefix: addr6_words(v6("2001:db8:ff::")),
        service_mask: addr6_words(v6("ffff:ffff:ffff::")),
        flags: 0,
    };
    tables.services6.insert(
        service6,
        ServiceTable {
            id: 2,
            policy: POLICY_ROUND_ROBIN,
            slots: vec![1],
        },
    );
    tables.instances6.insert(
        1,
        Instance6 {
            ns_addr: addr6_words(instance_ns6),
            reply_addr: addr6_words(instance_ip6),
        },
    );
    tables.locals6.insert(
        client6,
        Local6 {
            ifindex: 1,
            instance_addr: addr6_words(client_ip6),
            mac: MAC_A,
            host_mac: OUR_MAC,
        },
    );
    let mut writer = OverlayWriter::default();
    writer
        .apply(&mut bpf.ebpf, &tables)
        .expect("writing the overlay tables");
    let payload = PAYLOAD;
    // From the client container to the host end of its veth.
    let from_client = |ip: &[u8]| ethernet(OUR_MAC, MAC_A, &[], 0x0800, ip);
    let request = from_client(&udp4(client, service, 40000, 7000, &payload));

    let mut rows = Vec::new();
    let outside = Ipv4Addr::new(198, 51, 100, 9);
    let to_outside = from_client(&udp4(client, outside, 40000, 53, &payload));
    let to_local = from_client(&udp4(client, local_service, 40000, 7000, &payload));
    assert_eq!(
        bpf.run("tm_tc_service", &to_outside, 1).action,
        0,
        "not a service IP: TC_ACT_OK"
    );
    let (raw, floor) = measure_loop(bpf, "tm_tc_service", &to_outside);
    rows.push(("TC service: not a service IP, pass", raw, floor));
    // What every packet into a container pays at its veth's egress: the
    // check of where a service-prefix source came from.
    let into_container = |src: Ipv4Addr| {
        ethernet(
            MAC_A,
            OUR_MAC,
            &[],
            0x0800,
            &udp4(src, client, 53, 40000, &payload),
        )
    };
    for (src, action, row) in [
        (outside, 0, "TC container veth egress (tm_tc_tap_in): source outside the service prefix, pass"),
        (
            Ipv4Addr::new(203, 0, 113, 77),
            2,
            "TC container veth egress (tm_tc_tap_in): service-prefix source, not the overlay's delivery, drop",
        ),
    ] {
        let frame = into_container(src);
        assert_eq!(bpf.run("tm_tc_tap_in", &frame, 1).action, action, "{row}");
        let (raw, floor) = measure_loop(bpf, "tm_tc_tap_in", &frame);
        rows.push((row, raw, floor));
    }
    let first = bpf.run("tm_tc_service", &to_local, 1);
    assert_eq!(
        first.action, TC_ACT_REDIRECT,
        "TC service → local: unexpected return value"
    );
    assert_eq!(
        (&first.output[0..6], &first.output[30..34]),
        (&MAC_B[..], &local_ns.octets()[..]),
        "TC service → local: MAC or destination"
    );
    let (raw, floor) = measure_loop(bpf, "tm_tc_service", &to_local);
    rows.push(("TC service: UDP to an RR service IP → conntrack hit, translate, redirect to a local container", raw, floor));
    let first = bpf.run("tm_tc_service", &request, 1);
    assert_eq!(
        first.action, TC_ACT_REDIRECT,
        "TC service: unexpected return value"
    );
    let out = &first.output;
    assert_eq!(
        out.len(),
        request.len() + 28,
        "TC service: not encapsulated"
    );
    assert_eq!(
        (&out[0..6], &out[30..34], &out[36..38]),
        (
            &REMOTE_MAC[..],
            &REMOTE_NODE.octets()[..],
            &TUNNEL_PORT.to_be_bytes()[..]
        )
    );
    assert_eq!(
        (&out[42 + 12..42 + 16], &out[42 + 16..42 + 20]),
        (&client_ip.octets()[..], &instance_ns.octets()[..]),
        "inner addresses"
    );
    let (raw, floor) = measure_loop(bpf, "tm_tc_service", &request);
    rows.push(("TC service: UDP to an RR service IP → conntrack hit, translate, UDP encap, redirect (next hop from the kernel's FIB)", raw, floor));
    // The daemon resolves remote nodes' next hops and the writer copies
    // them into their instances: no FIB lookup from here on.
    writer
        .set_hops(
            &mut bpf.ebpf,
            crate::underlay::remote_hop(tma_index, tma_mac),
        )
        .expect("writing the next hop");
    assert_eq!(
        bpf.run("tm_tc_service", &request, 1).output,
        first.output,
        "TC service, resolved next hop: output"
    );
    let (raw, floor) = measure_loop(bpf, "tm_tc_service", &request);
    rows.push(("TC service: UDP to an RR service IP → conntrack hit, translate, UDP encap, redirect (resolved next hop)", raw, floor));
    // A datagram in two fragments (IP id 0x1234): the first carries the UDP
    // header and binds the flow, the later one follows its binding.
    let datagram = udp_v4(client, service, 40002, 7000, &[7u8; 48]);
    let fragment = |offset: u16, more: bool, bytes: &[u8]| {
        from_client(&fragment4(
            client, service, UDP, 0x1234, offset, more, bytes,
        ))
    };
    let first_fragment = fragment(0, true, &datagram[..32]);
    let later_fragment = fragment(32, false, &datagram[32..]);
    for (name, frame) in [
        (
            "TC service: first IPv4 fragment to an RR service IP → bind, record the datagram, translate, UDP encap, redirect",
            &first_fragment,
        ),
        (
            "TC service: later IPv4 fragment (no ports) → the datagram's binding, translate, UDP encap, redirect",
            &later_fragment,
        ),
    ] {
        rows.push(tc_encap_row(bpf, name, frame, &client_ip.octets(), &instance_ns.octets()));
    }
    for (name, frame, source) in decap_frames() {
        rows.push(xdp_decap_row(bpf, name, &frame, &source.octets()));
    }

    // IPv6: a request (whole, then in two fragments) and the reply.
    // UDP over IPv6; these paths never check the checksum (they adjust it).
    let udp6 = |sport: u16, dport: u16, data: &[u8]| {
        udp_v4(
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            sport,
            dport,
            data,
        )
    };
    let request6 = ethernet(
        OUR_MAC,
        MAC_A,
        &[],
        0x86dd,
        &ipv6(client6, service6, UDP, &[], &udp6(40000, 7000, &payload)),
    );
    let datagram6 = udp6(40002, 7000, &[7u8; 48]);
    let fragment6 = |offset: u16, more: bool, bytes: &[u8]| {
        let offset_flags = offset << 3 | u16::from(more);
        let mut header = vec![UDP, 0];
        header.extend_from_slice(&offset_flags.to_be_bytes());
        header.extend_from_slice(&0x1234_5678u32.to_be_bytes());
        ethernet(
            OUR_MAC,
            MAC_A,
            &[],
            0x86dd,
            &ipv6(client6, service6, 44, &header, bytes),
        )
    };
    let first6 = fragment6(0, true, &datagram6[..32]);
    let later6 = fragment6(4, false, &datagram6[32..]);
    for (name, frame) in [
        (
            "TC service: IPv6 UDP to an RR service IP → conntrack hit, translate, UDP encap, redirect (resolved next hop)",
            &request6,
        ),
        (
            "TC service: IPv6 first fragment to an RR service IP → bind, record the datagram, translate, UDP encap, redirect",
            &first6,
        ),
        (
            "TC service: IPv6 later fragment (no ports) → the datagram's binding, translate, UDP encap, redirect",
            &later6,
        ),
    ] {
        rows.push(tc_encap_row(bpf, name, frame, &client_ip6.octets(), &instance_ns6.octets()));
    }
    let reply6_inner = ipv6(
        instance_ip6,
        client6,
        UDP,
        &[],
        &udp6(7000, 40000, &payload),
    );
    let reply6 = eth(&udp4(REMOTE_NODE, NODE, 0xc125, TUNNEL_PORT, &reply6_inner));
    let name = "XDP uplink: IPv6 tunnel reply → decap, reverse translation → container";
    rows.push(xdp_decap_row(bpf, name, &reply6, &service6.octets()));
    rows
}

/// The IPv4 tunnel packets of [`rows`]' decapsulation rows, with their
/// names and the inner source the container must see: a reply (translated
/// back to the service IP) and a request (delivered as it is).
pub fn decap_frames() -> [(&'static str, Vec<u8>, Ipv4Addr); 2] {
    let reply_inner = udp4(INSTANCE_IP, CLIENT, 7000, 40000, &PAYLOAD);
    // A new flow from the remote instance (its node owns its address; no
    // conntrack entry, so nothing is translated back).
    let other = INSTANCE_IP;
    let other_inner = udp4(other, CLIENT, 7001, 40001, &PAYLOAD);
    [
        (
            "XDP uplink: tunnel reply → decap, reverse translation → container",
            eth(&udp4(REMOTE_NODE, NODE, 0xc123, TUNNEL_PORT, &reply_inner)),
            RR_SERVICE,
        ),
        (
            "XDP uplink: tunnel request → decap → container (no translation)",
            eth(&udp4(REMOTE_NODE, NODE, 0xc124, TUNNEL_PORT, &other_inner)),
            other,
        ),
    ]
}

/// An uplink row whose tunnel packet is decapsulated and redirected to the
/// container (MAC_A) with the inner source `source` (IPv4 or IPv6).
fn xdp_decap_row(bpf: &mut Bpf, name: &'static str, frame: &[u8], source: &[u8]) -> Row {
    let first = bpf.run("tm_xdp_uplink", frame, 1);
    assert_eq!(
        first.action, XDP_REDIRECT,
        "{name}: unexpected return value"
    );
    assert_eq!(
        first.output.len(),
        frame.len() - 28,
        "{name}: not decapsulated"
    );
    // The source sits at 14 + 12 (IPv4) or 14 + 8 (IPv6).
    let at = if source.len() == 4 { 26 } else { 22 };
    assert_eq!(
        (&first.output[0..6], &first.output[at..at + source.len()]),
        (&MAC_A[..], source),
        "{name}: MAC or source"
    );
    let (raw, floor) = measure_loop(bpf, "tm_xdp_uplink", frame);
    (name, raw, floor)
}

/// A TC service row whose packet leaves encapsulated to the remote node with
/// the inner source and destination `inner_src`, `inner_dst` (IPv4 or IPv6).
fn tc_encap_row(
    bpf: &mut Bpf,
    name: &'static str,
    frame: &[u8],
    inner_src: &[u8],
    inner_dst: &[u8],
) -> Row {
    let first = bpf.run("tm_tc_service", frame, 1);
    assert_eq!(
        first.action, TC_ACT_REDIRECT,
        "{name}: unexpected return value"
    );
    let out = &first.output;
    assert_eq!(out.len(), frame.len() + 28, "{name}: not encapsulated");
    // The inner header starts at 42; its source at 12 (IPv4) or 8 (IPv6).
    let src = 42 + if inner_src.len() == 4 { 12 } else { 8 };
    let dst = src + inner_src.len();
    assert_eq!(
        (
            &out[30..34],
            &out[src..dst],
            &out[dst..dst + inner_dst.len()]
        ),
        (&REMOTE_NODE.octets()[..], inner_src, inner_dst),
        "{name}: outer destination or inner addresses"
    );
    let (raw, floor) = measure_loop(bpf, "tm_tc_service", frame);
    (name, raw, floor)
}

fn tapmesh_lab() -> Setup {
    let nodes = TwoNodes::start();
    nodes.node1.register("192.0.2.0/26");
    nodes.node2.register("192.0.2.64/26");
    let client = Netns::new("obc");
    let server = Netns::new("obs");
    let c_ns = nodes.node1.deploy(
        &client,
        "bench.ns.client.ns",
        0,
        &[("InstanceNumber", "203.0.113.100")],
    );
    let sips: &[(&str, &str)] = &[("RR", SERVICE), ("InstanceNumber", "203.0.113.102")];
    let s_ns = nodes.node2.deploy(&server, "bench.ns.web.ns", 0, sips);
    nodes
        .node1
        .table("bench.ns.web.ns", &[(0, &s_ns, NODE2, sips)]);
    nodes.node2.table(
        "bench.ns.client.ns",
        &[(0, &c_ns, NODE1, &[("InstanceNumber", "203.0.113.100")])],
    );
    load::install_sink(&server, PORT);
    Setup {
        client,
        server,
        to: service(),
        keep: vec![Box::new(nodes)],
    }
}

fn service() -> SocketAddrV4 {
    SocketAddrV4::new(SERVICE.parse().expect("address"), PORT)
}

/// Client and server behind their nodes' veths. `Kernel::Overlay`: VXLAN 42
/// between the nodes and nftables DNAT of the service IP on node 1 (the
/// flannel + kube-proxy data path); `Kernel::Routed`: the other node's
/// container subnet routed through its underlay address, the client sending
/// to the server's own address (no translation, no tunnel: the floor).
fn kernel_lab(kind: Kernel) -> Setup {
    let n1 = Netns::new("okn1");
    let n2 = Netns::new("okn2");
    let client = Netns::new("okc");
    let server = Netns::new("oks");
    let (u1, u2) = link(&n1, "198.18.3.1/24", &n2, "198.18.3.2/24");
    let _ = link(&client, "192.0.2.2/26", &n1, "192.0.2.1/26");
    let _ = link(&server, "192.0.2.66/26", &n2, "192.0.2.65/26");
    client.ip(&["route", "add", "default", "via", "192.0.2.1"]);
    server.ip(&["route", "add", "default", "via", "192.0.2.65"]);
    for (n, local, remote, vx, peer_vx, other) in [
        (
            &n1,
            "198.18.3.1",
            "198.18.3.2",
            "198.18.4.1/30",
            "198.18.4.2",
            "192.0.2.64/26",
        ),
        (
            &n2,
            "198.18.3.2",
            "198.18.3.1",
            "198.18.4.2/30",
            "198.18.4.1",
            "192.0.2.0/26",
        ),
    ] {
        n.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        if kind == Kernel::Routed {
            n.ip(&["route", "add", other, "via", remote]);
            continue;
        }
        let dev = if n.name == n1.name {
            u1.interface.clone()
        } else {
            u2.interface.clone()
        };
        n.ip(&[
            "link", "add", "vx42", "type", "vxlan", "id", "42", "local", local, "remote", remote,
            "dstport", "4789", "dev", &dev,
        ]);
        n.ip(&["addr", "add", vx, "dev", "vx42"]);
        n.ip(&["link", "set", "vx42", "mtu", "1450", "up"]);
        n.ip(&["route", "add", other, "via", peer_vx]);
    }
    load::install_sink(&server, PORT);
    if kind == Kernel::Routed {
        let to = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 66), PORT);
        return Setup {
            client,
            server,
            to,
            keep: vec![Box::new(n1), Box::new(n2)],
        };
    }
    load::nft(
        &n1,
        "table ip bench {\n  chain pre {\n    type nat hook prerouting priority dstnat; policy accept;\n    \
         ip daddr 203.0.113.10 udp dport 7000 dnat to 192.0.2.66\n  }\n}\n",
    );
    Setup {
        client,
        server,
        to: service(),
        keep: vec![Box::new(n1), Box::new(n2)],
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kernel {
    Overlay,
    Routed,
}

/// The "Service-IP overlay on veth" section of BENCHMARKS.md.
pub fn rates() -> String {
    let labs = [
        tapmesh_lab(),
        kernel_lab(Kernel::Overlay),
        kernel_lab(Kernel::Routed),
        load::alone(PORT, true),
    ];
    let mut out = String::new();
    let _ = writeln!(out, "## Service-IP overlay on veth\n");
    let _ = writeln!(
        out,
        "A client container on node 1 sends to a service IP whose instance is on node 2: one \
         load per CPU (pinned, each its own flow, 18-byte payloads), {} s after a warm-up, each \
         path {} times interleaved with the others (the median run by CPU per packet is shown); \
         the server's namespace counts and drops what arrives (nftables, prerouting). On veth \
         each hop's receive side runs in softirq on the sending CPU, so every CPU is busy with \
         load and data path together: CPU ns/packet is all CPUs' busy time (user, system, irq, \
         softirq; /proc/stat) over delivered packets, and a cheaper path delivers more. tapmesh: \
         TC translation + UDP 50103 encapsulation on the container's veth, XDP decapsulation on \
         node 2's uplink. Kernel: nftables DNAT on node 1 + kernel VXLAN between the nodes \
         (flannel + kube-proxy's data path). Floor: the same two nodes routing the client's \
         packets to the server's own address (no translation, no tunnel), what any path costs at \
         least. The load alone: the client's packets \
         counted and dropped as they reach node 1 (nftables, netdev ingress), what every path \
         pays before its own work; the data paths' own cost is what they take beyond it. Lost: \
         sent but never counted at the sink.\n",
        FLOOD.as_secs(),
        load::ROUNDS
    );
    load::compare(
        &mut out,
        &labs,
        FLOOD,
        [
            "tapmesh (TC + UDP tunnel + XDP)",
            "nftables DNAT + kernel VXLAN",
            "floor: plain routing, no translation or tunnel",
        ],
        2.0,
    );
    out
}
