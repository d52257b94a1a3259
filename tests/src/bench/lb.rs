//! The uplink's paths with an LB configuration in the maps: parsing and
//! passing (repeated runs), and the VIP paths that rewrite the packet (MAC
//! rewrite, tag strip, encapsulation, decapsulation; single runs inside the
//! underlay namespace).

use std::net::Ipv4Addr;

use tapmesh::{
    dataplane::lb::{LbWriter, TunnelSettings},
    lb::flows::{FlowSpec, VipSpec},
    lb::model::{validate, LbSpec, StreamSpec, TargetSpec, TargetVia},
    lb::port_nat::PortNatSpec,
};

use super::{
    timing::{measure, measure_loop, row, Row, REPEAT},
    OUR_MAC, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX,
};
use crate::{
    bpf::Bpf,
    fmt_mac,
    frames::*,
    underlay::{Underlay, NODE, REMOTE_MAC, REMOTE_NODE, TUNNEL_PORT},
};

/// The row the LB target applies to: Katran's path (in and out of the uplink).
pub const LB_ENCAP_ROW: &str = "XDP uplink: VIP hit → remote target (UDP encap, resolved next hop, back out of the uplink: XDP_TX)";

/// Port NAT's way in, beside the plain local target row above it.
pub const PORT_NAT_ROW: &str =
    "XDP uplink: VIP hit → port NAT (tail call: tcp 443 → 8443, checksum) → local target";

pub const VIP_LOCAL: Ipv4Addr = Ipv4Addr::new(20, 0, 0, 1);
const VIP_REMOTE: Ipv4Addr = Ipv4Addr::new(20, 0, 0, 20);
const TARGET_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xaa, 1];

struct Path {
    name: &'static str,
    program: &'static str,
    floor: &'static str,
    frame: Vec<u8>,
    /// Expected return value, checked on a single run first.
    action: u32,
}

/// A path timed with repeat = 1: the first call's return value and output are checked.
struct Rewrite {
    name: &'static str,
    frame: Vec<u8>,
    action: u32,
    output: Vec<u8>,
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Two VIPs: `web` (tcp 80/443 and udp 53 flows, three local targets per
/// stream; the tcp stream translates 443 → 8443) and `far` (one flow, its
/// one target on another node).
fn lb_spec() -> LbSpec {
    let flow =
        |name: &str, priority: i32, vip: &str, stream: &str, protocols: &[&str], dst: &[&str]| {
            FlowSpec {
                name: name.into(),
                priority,
                vips: strings(&[vip]),
                stream: stream.into(),
                protocols: strings(protocols),
                destination_port_ranges: strings(dst),
                ..Default::default()
            }
        };
    let stream = |name: &str, max_targets: u32| StreamSpec {
        name: name.into(),
        max_targets,
        table_size: None,
        port_nats: Vec::new(),
    };
    let mut http = stream("http", 3);
    http.port_nats.push(PortNatSpec {
        port: 443,
        target_port: 8443,
        protocol: "tcp".into(),
        vips: strings(&["web"]),
    });
    let mut targets = Vec::new();
    for (s, base) in [("http", 1u8), ("dns", 1)] {
        for id in 0..3u8 {
            targets.push(TargetSpec {
                stream: s.into(),
                identifier: u32::from(id) + 1,
                // Every local target has the same MACs: the first call's output is known.
                via: TargetVia::Local {
                    interface: format!("if{}", base + id),
                    mac: fmt_mac(TARGET_MAC),
                },
            });
        }
    }
    targets.push(TargetSpec {
        stream: "far".into(),
        identifier: 1,
        via: TargetVia::Remote {
            node: REMOTE_NODE.to_string(),
        },
    });
    LbSpec {
        vips: vec![
            VipSpec {
                name: "web".into(),
                address: VIP_LOCAL.to_string(),
            },
            VipSpec {
                name: "far".into(),
                address: VIP_REMOTE.to_string(),
            },
        ],
        streams: vec![http, stream("dns", 3), stream("far", 1)],
        flows: vec![
            flow("http", 10, "web", "http", &["tcp"], &["80", "443"]),
            flow("dns", 5, "web", "dns", &["udp"], &["53"]),
            flow("far", 0, "far", "far", &[], &[]),
        ],
        targets,
    }
}

pub fn load(bpf: &mut Bpf) -> LbWriter {
    let valid = validate(&lb_spec()).expect("bench LB configuration");
    let resolve = |_: &str| -> Result<(u32, [u8; 6]), String> { Ok((101, OUR_MAC)) };
    let mut writer = LbWriter::default();
    let tunnel = TunnelSettings {
        port: TUNNEL_PORT,
        address: Some(NODE),
    };
    tapmesh::dataplane::tunnel::write(&mut bpf.ebpf, tunnel).expect("writing tm_tunnel");
    writer
        .apply(&mut bpf.ebpf, &valid, tunnel, &resolve)
        .expect("writing the LB maps");
    writer
}

/// The expected output of the encapsulation of `frame` (untagged), with the
/// UDP source port the kernel chose (its flow hash; checked for range here).
fn encapsulated(frame: &[u8], src_mac: [u8; 6], sport: u16) -> Vec<u8> {
    assert!(
        (0xc000..=0xffff).contains(&sport),
        "tunnel source port {sport:#x}"
    );
    tunnel_frame(
        REMOTE_MAC,
        src_mac,
        NODE,
        REMOTE_NODE,
        sport,
        TUNNEL_PORT,
        ip_packet(frame),
    )
}

/// UDP from the client (port 1000) to `dst`, 18 bytes of payload, untagged.
pub fn vip_frame(dst: Ipv4Addr, port: u16) -> Vec<u8> {
    eth(&udp4(V4_A, dst, 1000, port, &[0; 18]))
}

/// Frames for `compare_vip`: to the local target, plain, tagged and by port NAT.
pub fn compare_frames() -> Vec<(&'static str, Vec<u8>)> {
    let payload = [0u8; 18];
    vec![
        ("VIP hit → local target", vip_frame(VIP_LOCAL, 53)),
        (
            "802.1Q VIP hit → local target",
            eth_tagged(&[100], &udp4(V4_A, VIP_LOCAL, 1000, 53, &payload)),
        ),
        (
            "VIP hit → port NAT → local target",
            eth(&tcp4(V4_A, VIP_LOCAL, 1000, 443)),
        ),
    ]
}

/// `frame` as forwarded to a local target: its MACs, VLAN tags dropped,
/// one hop less.
fn to_target(frame: &[u8]) -> Vec<u8> {
    forwarded(frame, TARGET_MAC, OUR_MAC)
}

/// The paths that leave the packet unchanged (or rewrite it the same way
/// every time), timed with repeated runs and written to `table` against the
/// floors of their hooks.
pub fn repeated_rows(
    bpf: &mut Bpf,
    table: &mut String,
    repeated: &str,
    xdp_floor: f64,
    tc_floor: f64,
) {
    let v6_tcp = ethernet(
        MAC_B,
        MAC_A,
        &[],
        0x86dd,
        &ipv6(V6_A, V6_B, TCP, &[], &tcp_v4(V4_A, V4_B, 1, 2, 0)),
    );
    let mut bad_ihl = udp4_frame(1, 2, b"x");
    bad_ihl[14] = 0x43;
    let vip_miss = vip_frame(Ipv4Addr::new(20, 0, 0, 2), 53);
    // A VIP's address, a port no flow takes.
    let no_flow = vip_frame(VIP_LOCAL, 54);
    let paths = [
        Path {
            name: "XDP uplink: IPv4/UDP, parse + count, pass",
            program: "tm_xdp_uplink",
            floor: "tm_xdp_floor",
            frame: udp4_frame(1000, 53, &[0; 18]),
            action: XDP_PASS,
        },
        Path {
            name: "XDP uplink: IPv6/TCP, parse + count, pass",
            program: "tm_xdp_uplink",
            floor: "tm_xdp_floor",
            frame: v6_tcp.clone(),
            action: XDP_PASS,
        },
        Path {
            name: "XDP uplink: QinQ IPv4/TCP, pass",
            program: "tm_xdp_uplink",
            floor: "tm_xdp_floor",
            frame: ethernet(
                MAC_B,
                MAC_A,
                &[1, 2],
                0x0800,
                &ipv4(V4_A, V4_B, TCP, &[], &tcp_v4(V4_A, V4_B, 1, 2, 0)),
            ),
            action: XDP_PASS,
        },
        Path {
            name: "XDP uplink: bad IHL, drop",
            program: "tm_xdp_uplink",
            floor: "tm_xdp_floor",
            frame: bad_ihl,
            action: XDP_DROP,
        },
        Path {
            name: "XDP uplink: VIP miss, pass",
            program: "tm_xdp_uplink",
            floor: "tm_xdp_floor",
            frame: vip_miss.clone(),
            action: XDP_PASS,
        },
        Path {
            name: "XDP uplink: VIP hit, no flow matches, drop",
            program: "tm_xdp_uplink",
            floor: "tm_xdp_floor",
            frame: no_flow.clone(),
            action: XDP_DROP,
        },
        Path {
            name: "TC ingress: IPv4/UDP, pass",
            program: "tm_tc_ingress",
            floor: "tm_tc_floor",
            frame: udp4_frame(1000, 53, &[0; 18]),
            action: 0,
        },
        Path {
            name: "TC egress: IPv6/TCP, pass",
            program: "tm_tc_egress",
            floor: "tm_tc_floor",
            frame: v6_tcp,
            action: 0,
        },
    ];

    for p in &paths {
        let first = bpf.run(p.program, &p.frame, 1);
        // Each leaves the packet as it was.
        let want = &p.frame;
        assert_eq!(
            first.action, p.action,
            "{}: unexpected return value",
            p.name
        );
        assert_eq!(first.output, *want, "{}: unexpected output", p.name);
        let raw = measure(bpf, p.program, &p.frame);
        let last = bpf.run(p.program, &p.frame, REPEAT);
        assert_eq!(
            (last.action, &last.output),
            (p.action, want),
            "{}: differs after {REPEAT} repeats",
            p.name
        );
        let floor = if p.floor == "tm_xdp_floor" {
            xdp_floor
        } else {
            tc_floor
        };
        row(table, p.name, repeated, raw, floor);
    }
}

/// The rewriting paths, timed with repeat = 1 in a loop (to be called on a
/// thread inside `underlay`).
pub fn rewrite_rows(bpf: &mut Bpf, writer: &mut LbWriter, underlay: &Underlay) -> Vec<Row> {
    let payload = [0u8; 18];
    let to_local = vip_frame(VIP_LOCAL, 53);
    let vip_miss = vip_frame(Ipv4Addr::new(20, 0, 0, 2), 53);
    let (tma_index, tma_mac) = (underlay.index, underlay.mac);
    let to_local_tagged = eth_tagged(&[100], &udp4(V4_A, VIP_LOCAL, 1000, 53, &payload));
    let to_remote = vip_frame(VIP_REMOTE, 53);
    let tunneled = tunnel(REMOTE_NODE, NODE, TUNNEL_PORT, ip_packet(&to_local));
    let first = bpf.run("tm_xdp_uplink", &to_remote, 1);
    let sport = u16::from_be_bytes([first.output[34], first.output[35]]);
    let rewrites = [
        Rewrite {
            name: "XDP uplink: VIP miss, pass",
            frame: vip_miss.clone(),
            action: XDP_PASS,
            output: vip_miss.clone(),
        },
        Rewrite {
            name: "XDP uplink: VIP hit → local target (MAC rewrite + redirect)",
            frame: to_local.clone(),
            action: XDP_REDIRECT,
            output: to_target(&to_local),
        },
        Rewrite {
            name: PORT_NAT_ROW,
            frame: eth(&tcp4(V4_A, VIP_LOCAL, 1000, 443)),
            action: XDP_REDIRECT,
            output: to_target(&eth(&tcp4(V4_A, VIP_LOCAL, 1000, 8443))),
        },
        Rewrite {
            name: "XDP uplink: 802.1Q VIP hit → local target (tag strip + MAC rewrite + redirect)",
            frame: to_local_tagged.clone(),
            action: XDP_REDIRECT,
            output: to_target(&to_local_tagged),
        },
        Rewrite {
            name: "XDP uplink: VIP hit → remote target (UDP encap + FIB lookup)",
            frame: to_remote.clone(),
            action: XDP_REDIRECT,
            output: encapsulated(&to_remote, tma_mac, sport),
        },
        Rewrite {
            name: "XDP uplink: tunnel packet → decap → local target",
            frame: tunneled.clone(),
            action: XDP_REDIRECT,
            output: to_target(&to_local),
        },
    ];
    let mut rows = Vec::new();
    for r in &rewrites {
        let first = bpf.run("tm_xdp_uplink", &r.frame, 1);
        assert_eq!(
            first.action, r.action,
            "{}: unexpected return value",
            r.name
        );
        assert_eq!(first.output, r.output, "{}: unexpected output", r.name);
        let (raw, floor) = measure_loop(bpf, "tm_xdp_uplink", &r.frame);
        rows.push((r.name, raw, floor));
    }
    // The same encapsulation with the next hop the daemon resolved (no FIB lookup).
    writer
        .set_hops(
            &mut bpf.ebpf,
            crate::underlay::remote_hop(tma_index, tma_mac),
        )
        .expect("writing the next hop");
    let name = "XDP uplink: VIP hit → remote target (UDP encap, resolved next hop)";
    let first = bpf.run("tm_xdp_uplink", &to_remote, 1);
    assert_eq!(
        first.action, XDP_REDIRECT,
        "{name}: unexpected return value"
    );
    assert_eq!(
        first.output,
        encapsulated(&to_remote, tma_mac, sport),
        "{name}: unexpected output"
    );
    let (raw, floor) = measure_loop(bpf, "tm_xdp_uplink", &to_remote);
    rows.push((name, raw, floor));
    // The usual case: in on the uplink, and out of it to the other node (XDP_TX).
    bpf.ingress_ifindex = tma_index;
    let name = LB_ENCAP_ROW;
    let first = bpf.run("tm_xdp_uplink", &to_remote, 1);
    assert_eq!(first.action, XDP_TX, "{name}: unexpected return value");
    assert_eq!(
        first.output,
        encapsulated(&to_remote, tma_mac, sport),
        "{name}: unexpected output"
    );
    let (raw, floor) = measure_loop(bpf, "tm_xdp_uplink", &to_remote);
    rows.push((name, raw, floor));
    bpf.ingress_ifindex = 0;
    rows
}
