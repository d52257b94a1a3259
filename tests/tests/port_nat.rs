//! Golden packets for Meridio's destination port NAT through
//! BPF_PROG_TEST_RUN: `tm_xdp_uplink` gives a packet to a translated port of
//! a VIP the target port after the pick, `tm_tc_conduit` gives a reply from
//! that port the client's port back. Every output is compared byte for byte
//! with a frame built from scratch with the translated port (so the
//! incrementally updated checksums are checked against computed ones), and
//! the program counters must move exactly as expected.

use std::net::{Ipv4Addr, Ipv6Addr};
use tapmesh_tests::fake_hops::{our_mac, resolve, target_mac};

use tapmesh::{
    dataplane::lb::{LbWriter, TunnelSettings},
    lb::flows::{FlowSpec, VipSpec},
    lb::model::{validate, LbSpec, StreamSpec, TargetSpec, TargetVia},
    lb::port_nat::PortNatSpec,
};
use tapmesh_common::{ProgramSlot, ProgramStats, Protocol as P, Verdict};
use tapmesh_tests::{bpf::Bpf, fmt_mac, frames::*, kernel_tests_enabled};

const XDP_REDIRECT: u32 = 4;
const TC_ACT_OK: u32 = 0;
const UPLINK: &str = "tm_xdp_uplink";
const CONDUIT: &str = "tm_tc_conduit";

const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 7, 0, 0, 0, 0, 7);
const VIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// A prefix VIP: replies from any address in it are translated.
const VIP_NET: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 128);
const VIP_IN_NET: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 130);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 1);
const OTHER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 9);

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn nat(protocol: &str, port: u16, target_port: u16, vips: &[&str]) -> PortNatSpec {
    PortNatSpec {
        port,
        target_port,
        protocol: protocol.into(),
        vips: strings(vips),
    }
}

/// Stream `s-nat`: TCP 80 → 8080 on every VIP, UDP 53 → 5353 on `vip`.
/// Stream `s-plain` takes TCP 443 to `vip` and has no NAT.
fn spec() -> LbSpec {
    let flow = |name: &str, stream: &str, protocols: &[&str], ports: &[&str]| FlowSpec {
        name: name.into(),
        source_subnets: Vec::new(),
        destination_port_ranges: strings(ports),
        source_port_ranges: Vec::new(),
        protocols: strings(protocols),
        priority: 1,
        stream: stream.into(),
        vips: strings(&["vip", "vip-net", "vip6"]),
        byte_matches: Vec::new(),
    };
    let local = |stream: &str, n: u8| TargetSpec {
        stream: stream.into(),
        identifier: 1,
        via: TargetVia::Local {
            interface: format!("if{n}"),
            mac: fmt_mac(target_mac(n)),
        },
    };
    let vip = |name: &str, address: String| VipSpec {
        name: name.into(),
        address,
    };
    LbSpec {
        vips: vec![
            vip("vip", VIP.to_string()),
            vip("vip-net", format!("{VIP_NET}/25")),
            vip("vip6", VIP6.to_string()),
        ],
        streams: vec![
            StreamSpec {
                name: "s-nat".into(),
                max_targets: 1,
                table_size: None,
                port_nats: vec![
                    nat("tcp", 80, 8080, &["vip", "vip-net", "vip6"]),
                    nat("udp", 53, 5353, &["vip"]),
                ],
            },
            StreamSpec {
                name: "s-plain".into(),
                max_targets: 1,
                table_size: None,
                port_nats: Vec::new(),
            },
        ],
        flows: vec![
            flow("web", "s-nat", &["tcp", "udp"], &["53-54", "80"]),
            flow("tls", "s-plain", &["tcp"], &["443"]),
        ],
        targets: vec![local("s-nat", 1), local("s-plain", 2)],
    }
}

struct Lab {
    bpf: Bpf,
}

impl Lab {
    fn new() -> Self {
        let valid = validate(&spec()).expect("the test configuration is valid");
        let mut bpf = Bpf::load();
        LbWriter::default()
            .apply(&mut bpf.ebpf, &valid, TunnelSettings::default(), &resolve)
            .expect("writing the LB maps");
        Lab { bpf }
    }

    /// Runs `program` on `frame`: the action, the output, and the counters
    /// of `slot` must be exactly as wanted.
    fn check(
        &mut self,
        program: &str,
        slot: ProgramSlot,
        frame: &[u8],
        action: u32,
        output: &[u8],
        protocols: &[P],
    ) {
        let before = self.bpf.stats(slot);
        let run = self.bpf.run(program, frame, 1);
        let after = self.bpf.stats(slot);
        assert_eq!(run.action, action, "{program} on {}", hex(frame));
        assert_eq!(
            hex(&run.output),
            hex(output),
            "{program} output of {}",
            hex(frame)
        );
        let mut expected: ProgramStats = before;
        let verdict = if action == XDP_REDIRECT && slot == ProgramSlot::XdpUplink {
            Verdict::Redirect
        } else {
            Verdict::Pass
        };
        expected
            .verdicts
            .counter_mut(verdict)
            .count(frame.len() as u64);
        for &p in protocols {
            expected.protocols.add(p, 1);
        }
        assert_eq!(after, expected, "{program} counters");
    }
}

/// What the target behind `if<n>` receives for an IP packet (forwarded:
/// one hop less).
fn at_target(n: u8, ip: &[u8]) -> Vec<u8> {
    forwarded(&eth(ip), target_mac(n), our_mac(n))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// UDP over IPv4 with the checksum field 0 (none).
fn udp4_no_checksum(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    ipv4(src, dst, UDP, &[], &udp_header(sport, dport, b"q"))
}

#[test]
fn to_the_target_port_after_the_pick() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut lab = Lab::new();
    let v4 = [P::Ipv4];
    let cases: Vec<(&str, Vec<u8>, Vec<u8>, P)> = vec![
        (
            "tcp 80 -> 8080",
            tcp4(CLIENT, VIP, 40000, 80),
            at_target(1, &tcp4(CLIENT, VIP, 40000, 8080)),
            P::Tcp,
        ),
        (
            "udp 53 -> 5353",
            udp4(CLIENT, VIP, 40001, 53, b"query"),
            at_target(1, &udp4(CLIENT, VIP, 40001, 5353, b"query")),
            P::Udp,
        ),
        (
            "udp without checksum keeps 0",
            udp4_no_checksum(CLIENT, VIP, 40002, 53),
            at_target(1, &udp4_no_checksum(CLIENT, VIP, 40002, 5353)),
            P::Udp,
        ),
        (
            "udp 54: same flow, not translated",
            udp4(CLIENT, VIP, 40003, 54, b"x"),
            at_target(1, &udp4(CLIENT, VIP, 40003, 54, b"x")),
            P::Udp,
        ),
        (
            "udp 53 on a VIP the UDP NAT does not name",
            udp4(CLIENT, VIP_IN_NET, 40004, 53, b"x"),
            at_target(1, &udp4(CLIENT, VIP_IN_NET, 40004, 53, b"x")),
            P::Udp,
        ),
        (
            "tcp 80 to an address of a prefix VIP",
            tcp4(CLIENT, VIP_IN_NET, 40005, 80),
            at_target(1, &tcp4(CLIENT, VIP_IN_NET, 40005, 8080)),
            P::Tcp,
        ),
        (
            "tcp 443: another stream, no NAT",
            tcp4(CLIENT, VIP, 40006, 443),
            at_target(2, &tcp4(CLIENT, VIP, 40006, 443)),
            P::Tcp,
        ),
    ];
    for (name, ip, want, l4) in cases {
        println!("{name}");
        lab.check(
            UPLINK,
            ProgramSlot::XdpUplink,
            &eth(&ip),
            XDP_REDIRECT,
            &want,
            &[v4[0], l4],
        );
    }
    lab.check(
        UPLINK,
        ProgramSlot::XdpUplink,
        &eth(&tcp6(CLIENT6, VIP6, 40007, 80)),
        XDP_REDIRECT,
        &at_target(1, &tcp6(CLIENT6, VIP6, 40007, 8080)),
        &[P::Ipv6, P::Tcp],
    );
}

#[test]
fn replies_get_the_client_port_back() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut lab = Lab::new();
    let cases: Vec<(&str, Vec<u8>, Vec<u8>, P)> = vec![
        (
            "tcp 8080 -> 80",
            tcp4(VIP, CLIENT, 8080, 40000),
            tcp4(VIP, CLIENT, 80, 40000),
            P::Tcp,
        ),
        (
            "udp 5353 -> 53",
            udp4(VIP, CLIENT, 5353, 40001, b"answer"),
            udp4(VIP, CLIENT, 53, 40001, b"answer"),
            P::Udp,
        ),
        (
            "udp without checksum keeps 0",
            udp4_no_checksum(VIP, CLIENT, 5353, 40002),
            udp4_no_checksum(VIP, CLIENT, 53, 40002),
            P::Udp,
        ),
        (
            "tcp from an address of a prefix VIP",
            tcp4(VIP_IN_NET, CLIENT, 8080, 40003),
            tcp4(VIP_IN_NET, CLIENT, 80, 40003),
            P::Tcp,
        ),
        (
            "udp 5353 from a VIP the UDP NAT does not name",
            udp4(VIP_IN_NET, CLIENT, 5353, 40004, b"x"),
            udp4(VIP_IN_NET, CLIENT, 5353, 40004, b"x"),
            P::Udp,
        ),
        (
            "tcp 8080 from an address that is no VIP",
            tcp4(OTHER, CLIENT, 8080, 40005),
            tcp4(OTHER, CLIENT, 8080, 40005),
            P::Tcp,
        ),
        (
            "tcp from another port",
            tcp4(VIP, CLIENT, 8081, 40006),
            tcp4(VIP, CLIENT, 8081, 40006),
            P::Tcp,
        ),
    ];
    for (name, ip, want, l4) in cases {
        println!("{name}");
        lab.check(
            CONDUIT,
            ProgramSlot::TcConduit,
            &eth(&ip),
            TC_ACT_OK,
            &eth(&want),
            &[P::Ipv4, l4],
        );
    }
    lab.check(
        CONDUIT,
        ProgramSlot::TcConduit,
        &eth(&tcp6(VIP6, CLIENT6, 8080, 40007)),
        TC_ACT_OK,
        &eth(&tcp6(VIP6, CLIENT6, 80, 40007)),
        &[P::Ipv6, P::Tcp],
    );
}

/// Without any port NAT the conduit program looks nothing up and changes nothing.
#[test]
fn no_nat_no_change() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut spec = spec();
    for s in &mut spec.streams {
        s.port_nats.clear();
    }
    let valid = validate(&spec).expect("valid");
    let mut bpf = Bpf::load();
    LbWriter::default()
        .apply(&mut bpf.ebpf, &valid, TunnelSettings::default(), &resolve)
        .expect("writing the LB maps");
    let mut lab = Lab { bpf };
    lab.check(
        UPLINK,
        ProgramSlot::XdpUplink,
        &eth(&tcp4(CLIENT, VIP, 40000, 80)),
        XDP_REDIRECT,
        &at_target(1, &tcp4(CLIENT, VIP, 40000, 80)),
        &[P::Ipv4, P::Tcp],
    );
    lab.check(
        CONDUIT,
        ProgramSlot::TcConduit,
        &eth(&tcp4(VIP, CLIENT, 8080, 40000)),
        TC_ACT_OK,
        &eth(&tcp4(VIP, CLIENT, 8080, 40000)),
        &[P::Ipv4, P::Tcp],
    );
}

/// How much work the verifier does for the uplink and conduit programs
/// (printed; the conduit program must stay small, the uplink is near the
/// kernel's 1M limit, which is why the way in is not built there yet).
#[test]
fn verifier_work() {
    if !kernel_tests_enabled() {
        return;
    }
    let bpf = Bpf::load();
    for name in [UPLINK, CONDUIT] {
        let info = bpf.ebpf.program(name).expect(name).info().expect("info");
        let count = info.verified_instruction_count().unwrap_or(0);
        println!("{name}: {count} instructions verified");
        assert!(count > 0, "{name}: no count");
        // 42 405 before mirror rings copied from TC (each of a port's 8
        // rules may copy), 71 102 with them; size classes of ring records
        // had made it 155 865.
        if name == CONDUIT {
            assert!(count < 100_000, "{name}: {count}");
        }
    }
}

/// Prints what the reply translation costs per packet (BPF_PROG_TEST_RUN,
/// 200k repeats, median of 5), beside the same program with no NAT configured.
#[test]
fn reply_cost() {
    if !kernel_tests_enabled() {
        return;
    }
    let per_packet = |bpf: &mut Bpf, frame: &[u8]| {
        let mut runs: Vec<f64> = (0..5)
            .map(|_| bpf.run(CONDUIT, frame, 200_000).duration.as_nanos() as f64)
            .collect();
        runs.sort_by(f64::total_cmp);
        runs[2]
    };
    let mut lab = Lab::new();
    let hit = eth(&tcp4(VIP, CLIENT, 8080, 40000));
    let miss = eth(&tcp4(VIP, CLIENT, 8081, 40000));
    let translated = per_packet(&mut lab.bpf, &hit);
    let looked_up = per_packet(&mut lab.bpf, &miss);
    let mut spec = spec();
    for s in &mut spec.streams {
        s.port_nats.clear();
    }
    let mut bare = Bpf::load();
    LbWriter::default()
        .apply(
            &mut bare.ebpf,
            &validate(&spec).unwrap(),
            TunnelSettings::default(),
            &resolve,
        )
        .unwrap();
    let none = per_packet(&mut bare, &hit);
    println!(
        "tm_tc_conduit ns/packet: translated {translated:.1}, looked up (no match) {looked_up:.1}, no NAT configured {none:.1}"
    );
}

/// The way in's TestRun cost (repeat = 1 in a loop beside the empty
/// program) beside a flow of the same VIP without NAT, printed: what the
/// tail call, the second parse and the rewrite add.
#[test]
fn way_in_cost() {
    if !kernel_tests_enabled() {
        return;
    }
    tapmesh_tests::bench::timing::pin_to_current_cpu();
    let mut lab = Lab::new();
    let mut net = |frame: &[u8]| {
        let (path, floor) = tapmesh_tests::bench::timing::measure_loop(&mut lab.bpf, UPLINK, frame);
        path - floor
    };
    let translated = net(&eth(&tcp4(CLIENT, VIP, 40000, 80)));
    let plain = net(&eth(&tcp4(CLIENT, VIP, 40006, 443)));
    println!(
        "tm_xdp_uplink ns/packet net of the floor: tcp 80 -> 8080 through the tail {translated:.1}, tcp 443 without NAT {plain:.1}"
    );
}
