//! Golden packets through BPF_PROG_TEST_RUN: each frame's verdict and the
//! exact counters it moves, for the XDP uplink and both TC programs.

use tapmesh_common::{DropReason as D, ProgramSlot, ProgramStats, Protocol as P};
use tapmesh_tests::{bpf::Bpf, frames::*, kernel_tests_enabled};

#[derive(Clone, Debug)]
enum Expect {
    Pass(Vec<P>),
    Drop(D),
}

struct Case {
    name: String,
    frame: Vec<u8>,
    expect: Expect,
}

fn case(name: impl Into<String>, frame: Vec<u8>, expect: Expect) -> Case {
    Case {
        name: name.into(),
        frame,
        expect,
    }
}

fn eth4(payload: Vec<u8>) -> Vec<u8> {
    ethernet(MAC_B, MAC_A, &[], 0x0800, &payload)
}

fn eth6(payload: Vec<u8>) -> Vec<u8> {
    ethernet(MAC_B, MAC_A, &[], 0x86dd, &payload)
}

/// An extension header of `len8` 8-byte units beyond the first 8.
fn ext(next: u8, len8: u8) -> Vec<u8> {
    let mut e = vec![next, len8];
    e.resize(8 + 8 * len8 as usize, 0);
    e
}

fn frag6(next: u8, offset: u16, more: bool) -> Vec<u8> {
    let field = (offset << 3) | u16::from(more);
    let mut f = vec![next, 0];
    f.extend_from_slice(&field.to_be_bytes());
    f.extend_from_slice(&[0, 0, 0, 7]);
    f
}

fn well_formed() -> Vec<Case> {
    let udp = udp_v4(V4_A, V4_B, 1000, 53, b"hello");
    let mut later_fragment = ipv4(V4_A, V4_B, UDP, &[], &[0u8; 16]);
    later_fragment[6..8].copy_from_slice(&0x0010u16.to_be_bytes()); // offset 16 bytes
    let mut first_fragment = ipv4(V4_A, V4_B, UDP, &[], &udp);
    first_fragment[6..8].copy_from_slice(&0x2000u16.to_be_bytes()); // more fragments
    let mut padded = eth4(ipv4(V4_A, V4_B, UDP, &[], &udp_v4(V4_A, V4_B, 1, 2, b"")));
    padded.resize(60, 0);
    let mut arp = vec![0u8; 28];
    arp[..8].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    vec![
        case(
            "udp over ipv4",
            eth4(ipv4(V4_A, V4_B, UDP, &[], &udp)),
            Expect::Pass(vec![P::Ipv4, P::Udp]),
        ),
        case(
            "tcp syn",
            tcp4_frame(40000, 80),
            Expect::Pass(vec![P::Ipv4, P::Tcp]),
        ),
        case(
            "tcp with options",
            eth4(ipv4(V4_A, V4_B, TCP, &[], &tcp_v4(V4_A, V4_B, 1, 2, 3))),
            Expect::Pass(vec![P::Ipv4, P::Tcp]),
        ),
        case(
            "ipv4 with options",
            eth4(ipv4(V4_A, V4_B, UDP, &[1, 1, 1, 0, 1, 1, 1, 0], &udp)),
            Expect::Pass(vec![P::Ipv4, P::Udp]),
        ),
        case(
            "icmp echo",
            eth4(ipv4(V4_A, V4_B, ICMP, &[], &icmp_echo(1, 1, b"ping"))),
            Expect::Pass(vec![P::Ipv4, P::Icmp]),
        ),
        case(
            "sctp",
            eth4(ipv4(
                V4_A,
                V4_B,
                SCTP,
                &[],
                &[0, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4],
            )),
            Expect::Pass(vec![P::Ipv4, P::Sctp]),
        ),
        case(
            "gre (unknown l4)",
            eth4(ipv4(V4_A, V4_B, 47, &[], &[0; 8])),
            Expect::Pass(vec![P::Ipv4, P::OtherL4]),
        ),
        case(
            "802.1q tagged udp",
            ethernet(
                MAC_B,
                MAC_A,
                &[100],
                0x0800,
                &ipv4(V4_A, V4_B, UDP, &[], &udp),
            ),
            Expect::Pass(vec![P::VlanTagged, P::Ipv4, P::Udp]),
        ),
        case(
            "qinq tagged tcp",
            ethernet(
                MAC_B,
                MAC_A,
                &[100, 200],
                0x0800,
                &ipv4(V4_A, V4_B, TCP, &[], &tcp_v4(V4_A, V4_B, 1, 2, 0)),
            ),
            Expect::Pass(vec![P::VlanTagged, P::Ipv4, P::Tcp]),
        ),
        case(
            "ipv4 first fragment",
            eth4(first_fragment),
            Expect::Pass(vec![P::Ipv4, P::Fragment, P::Udp]),
        ),
        case(
            "ipv4 later fragment",
            eth4(later_fragment),
            Expect::Pass(vec![P::Ipv4, P::Fragment]),
        ),
        case(
            "ethernet padding after a short packet",
            padded,
            Expect::Pass(vec![P::Ipv4, P::Udp]),
        ),
        case(
            "arp",
            ethernet([0xff; 6], MAC_A, &[], 0x0806, &arp),
            Expect::Pass(vec![P::NonIp]),
        ),
        case(
            "udp over ipv6",
            eth6(ipv6(V6_A, V6_B, UDP, &[], &udp_header(1, 2, b"x"))),
            Expect::Pass(vec![P::Ipv6, P::Udp]),
        ),
        case(
            "ipv6 hop-by-hop, routing, destination options, tcp",
            eth6(ipv6(
                V6_A,
                V6_B,
                0,
                &[ext(43, 0), ext(60, 1), ext(TCP, 0)].concat(),
                &tcp_v4(V4_A, V4_B, 1, 2, 0),
            )),
            Expect::Pass(vec![P::Ipv6, P::Tcp]),
        ),
        case(
            "ipv6 first fragment",
            eth6(ipv6(
                V6_A,
                V6_B,
                44,
                &frag6(UDP, 0, true),
                &udp_header(1, 2, b"x"),
            )),
            Expect::Pass(vec![P::Ipv6, P::Fragment, P::Udp]),
        ),
        case(
            "ipv6 later fragment",
            eth6(ipv6(V6_A, V6_B, 44, &frag6(UDP, 8, false), &[0; 16])),
            Expect::Pass(vec![P::Ipv6, P::Fragment]),
        ),
        case(
            "ipv6 atomic fragment",
            eth6(ipv6(
                V6_A,
                V6_B,
                44,
                &frag6(UDP, 0, false),
                &udp_header(1, 2, b"x"),
            )),
            Expect::Pass(vec![P::Ipv6, P::Udp]),
        ),
        case(
            "ipv6 later fragment whose next header is destination options",
            eth6(ipv6(V6_A, V6_B, 44, &frag6(60, 8, true), &[0; 24])),
            Expect::Pass(vec![P::Ipv6, P::Fragment]),
        ),
        case(
            "ipv6 authentication header, udp",
            eth6(ipv6(
                V6_A,
                V6_B,
                51,
                &{
                    // AH: length in 4-byte units minus 2; 4 units = 16 bytes.
                    let mut ah = vec![UDP, 2];
                    ah.resize(16, 0);
                    ah
                },
                &udp_header(1, 2, b"x"),
            )),
            Expect::Pass(vec![P::Ipv6, P::Udp]),
        ),
        case(
            "icmpv6 echo",
            eth6(ipv6(V6_A, V6_B, ICMPV6, &[], &[128, 0, 0, 0, 0, 1, 0, 1])),
            Expect::Pass(vec![P::Ipv6, P::Icmpv6]),
        ),
        case(
            "ipv6 no next header",
            eth6(ipv6(V6_A, V6_B, 59, &[], &[])),
            Expect::Pass(vec![P::Ipv6, P::OtherL4]),
        ),
    ]
}

fn malformed() -> Vec<Case> {
    let udp_frame = eth4(ipv4(
        V4_A,
        V4_B,
        UDP,
        &[],
        &udp_v4(V4_A, V4_B, 1, 2, b"data"),
    ));
    let mut cases = Vec::new();

    let mut bad_version = udp_frame.clone();
    bad_version[14] = 0x55;
    cases.push(case(
        "ipv4 version 5",
        bad_version,
        Expect::Drop(D::BadIpv4Version),
    ));
    for ihl in 0..5u8 {
        let mut f = udp_frame.clone();
        f[14] = 0x40 | ihl;
        cases.push(case(
            format!("ipv4 ihl {ihl}"),
            f,
            Expect::Drop(D::BadIpv4HeaderLength),
        ));
    }
    let mut f = udp_frame.clone();
    f[14] = 0x4f; // 60-byte header, but the packet is 32 bytes long
    cases.push(case(
        "ipv4 ihl 15 in a short packet",
        f,
        Expect::Drop(D::BadIpv4TotalLength),
    ));
    let mut f = udp_frame.clone();
    set_ipv4_total_length(&mut f, 14, 19);
    cases.push(case(
        "ipv4 total length below the header",
        f,
        Expect::Drop(D::BadIpv4TotalLength),
    ));
    let mut f = udp_frame.clone();
    set_ipv4_total_length(&mut f, 14, 200);
    cases.push(case(
        "ipv4 total length beyond the frame",
        f,
        Expect::Drop(D::TruncatedIpv4),
    ));

    let mut f = eth4(ipv4(V4_A, V4_B, TCP, &[], &tcp_v4(V4_A, V4_B, 1, 2, 0)));
    f[14 + 20 + 12] = 0x40;
    cases.push(case(
        "tcp data offset 4",
        f,
        Expect::Drop(D::BadTcpHeaderLength),
    ));
    let mut f = eth4(ipv4(V4_A, V4_B, TCP, &[], &tcp_v4(V4_A, V4_B, 1, 2, 0)));
    f[14 + 20 + 12] = 0xf0;
    cases.push(case(
        "tcp data offset beyond the packet",
        f,
        Expect::Drop(D::TruncatedTcp),
    ));
    let mut f = udp_frame.clone();
    f[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&4u16.to_be_bytes());
    cases.push(case("udp length 4", f, Expect::Drop(D::BadUdpLength)));
    let mut f = udp_frame.clone();
    f[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&100u16.to_be_bytes());
    cases.push(case(
        "udp length beyond the ip payload",
        f,
        Expect::Drop(D::BadUdpLength),
    ));

    let mut f = eth6(ipv6(V6_A, V6_B, UDP, &[], &udp_header(1, 2, b"x")));
    f[14] = 0x40;
    cases.push(case("ipv6 version 4", f, Expect::Drop(D::BadIpv6Version)));
    let mut f = eth6(ipv6(V6_A, V6_B, UDP, &[], &udp_header(1, 2, b"x")));
    set_ipv6_payload_length(&mut f, 14, 500);
    cases.push(case(
        "ipv6 payload length beyond the frame",
        f,
        Expect::Drop(D::TruncatedIpv6),
    ));
    let chain: Vec<u8> = (0..7)
        .flat_map(|i| ext(if i == 6 { UDP } else { 60 }, 0))
        .collect();
    cases.push(case(
        "seven ipv6 extension headers",
        eth6(ipv6(V6_A, V6_B, 60, &chain, &udp_header(1, 2, b"x"))),
        Expect::Drop(D::TooManyIpv6Extensions),
    ));
    let mut hbh = ext(UDP, 0);
    hbh[1] = 9; // claims 80 bytes; the packet has 8 + 9
    cases.push(case(
        "ipv6 extension longer than the payload",
        eth6(ipv6(V6_A, V6_B, 0, &hbh, &udp_header(1, 2, b"x"))),
        Expect::Drop(D::TruncatedIpv6Extension),
    ));
    cases.extend(truncations());
    cases
}

/// Each base frame cut at every header boundary (and one byte into each
/// header), once with the IP length left as it was (so the IP layer reports
/// the cut) and once with the IP length fitted to the cut (so the layer
/// that was cut reports it).
fn truncations() -> Vec<Case> {
    struct Base {
        name: &'static str,
        frame: Vec<u8>,
        /// (start offset, reason when cut inside) per header, outermost first.
        headers: Vec<(usize, D)>,
        /// Offset of the IP header and its version.
        l3: (usize, u8),
    }
    let tcp = tcp_v4(V4_A, V4_B, 1, 2, 2);
    let bases = vec![
        Base {
            name: "qinq tcp",
            frame: ethernet(
                MAC_B,
                MAC_A,
                &[10, 20],
                0x0800,
                &ipv4(V4_A, V4_B, TCP, &[0; 4], &tcp),
            ),
            headers: vec![
                (14, D::TruncatedVlan),
                (18, D::TruncatedVlan),
                (22, D::TruncatedIpv4),
                (22 + 24, D::TruncatedTcp),
            ],
            l3: (22, 4),
        },
        Base {
            name: "udp",
            frame: eth4(ipv4(
                V4_A,
                V4_B,
                UDP,
                &[],
                &udp_v4(V4_A, V4_B, 1, 2, b"payload"),
            )),
            headers: vec![(14, D::TruncatedIpv4), (34, D::TruncatedUdp)],
            l3: (14, 4),
        },
        Base {
            name: "icmp",
            frame: eth4(ipv4(V4_A, V4_B, ICMP, &[], &icmp_echo(7, 1, b"payload"))),
            headers: vec![(14, D::TruncatedIpv4), (34, D::TruncatedIcmp)],
            l3: (14, 4),
        },
        Base {
            name: "sctp",
            frame: eth4(ipv4(V4_A, V4_B, SCTP, &[], &[0u8; 16])),
            headers: vec![(14, D::TruncatedIpv4), (34, D::TruncatedSctp)],
            l3: (14, 4),
        },
        Base {
            name: "ipv6 hop-by-hop udp",
            frame: eth6(ipv6(
                V6_A,
                V6_B,
                0,
                &ext(UDP, 0),
                &udp_header(1, 2, b"payload"),
            )),
            headers: vec![
                (14, D::TruncatedIpv6),
                (54, D::TruncatedIpv6Extension),
                (62, D::TruncatedUdp),
            ],
            l3: (14, 6),
        },
    ];
    let mut cases = Vec::new();
    for base in bases {
        let full = base.frame.len();
        let mut cuts: Vec<usize> = base
            .headers
            .iter()
            .flat_map(|(at, _)| [*at, at + 1])
            .collect();
        cuts.retain(|&c| c >= 14 && c < full);
        for cut in cuts {
            // The innermost header starting at or before the cut is the one cut short.
            let (_, inner) = *base
                .headers
                .iter()
                .rev()
                .find(|(at, _)| *at <= cut)
                .unwrap();
            let (l3, version) = base.l3;
            let mut frame = base.frame[..cut].to_vec();
            let ip_layer = if version == 4 {
                D::TruncatedIpv4
            } else {
                D::TruncatedIpv6
            };
            let fixed_len_ok = cut >= l3 + if version == 4 { 20 } else { 40 };
            let as_is = if cut <= l3 || matches!(inner, D::TruncatedVlan) {
                inner
            } else if fixed_len_ok {
                ip_layer
            } else {
                inner
            };
            cases.push(case(
                format!("{} cut at {cut}", base.name),
                frame.clone(),
                Expect::Drop(as_is),
            ));
            if fixed_len_ok && !matches!(inner, D::TruncatedIpv4 | D::TruncatedIpv6) {
                if version == 4 {
                    let ihl = usize::from(frame[l3] & 0x0f) * 4;
                    if cut - l3 < ihl {
                        continue;
                    }
                    set_ipv4_total_length(&mut frame, l3, (cut - l3) as u16);
                } else {
                    set_ipv6_payload_length(&mut frame, l3, (cut - l3 - 40) as u16);
                }
                cases.push(case(
                    format!("{} cut at {cut}, ip length fitted", base.name),
                    frame,
                    Expect::Drop(inner),
                ));
            }
        }
    }
    cases
}

fn check(bpf: &mut Bpf, program: &str, slot: ProgramSlot, pass: u32, drop: u32, cases: &[Case]) {
    let mut failures = Vec::new();
    let tc = program.starts_with("tm_tc");
    for c in cases.iter().filter(|c| !tc || skb_runner_accepts(&c.frame)) {
        let before = bpf.stats(slot);
        let run = bpf.run(program, &c.frame, 1);
        let after = bpf.stats(slot);
        let mut want = before;
        let bytes = c.frame.len() as u64;
        let want_action = match &c.expect {
            Expect::Pass(protocols) => {
                want.verdicts.pass.count(bytes);
                for &p in protocols {
                    want.protocols.add(p, 1);
                }
                pass
            }
            Expect::Drop(reason) => {
                want.verdicts.drop.count(bytes);
                want.drops.add(*reason, 1);
                drop
            }
        };
        if run.action != want_action || after != want {
            failures.push(format!(
                "{program}: {}: action {} (want {want_action}), expected {:?}; counters moved: {}",
                c.name,
                run.action,
                c.expect,
                describe(&before, &after)
            ));
        }
        if run.output != c.frame {
            failures.push(format!("{program}: {}: the packet was modified", c.name));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// The kernel's skb test runner refuses frames of ETH_HLEN bytes or fewer and
/// untagged IPv4/IPv6 frames shorter than the fixed IP header; those cuts are
/// covered by the XDP run of the same parser.
fn skb_runner_accepts(frame: &[u8]) -> bool {
    match (frame.len(), u16::from_be_bytes([frame[12], frame[13]])) {
        (0..=14, _) => false,
        (len, 0x0800) => len >= 14 + 20,
        (len, 0x86dd) => len >= 14 + 40,
        _ => true,
    }
}

fn describe(before: &ProgramStats, after: &ProgramStats) -> String {
    let mut moved = Vec::new();
    for &r in D::ALL {
        let d = after.drops.get(r) - before.drops.get(r);
        if d != 0 {
            moved.push(format!("{}+{d}", r.name()));
        }
    }
    for &p in P::ALL {
        let d = after.protocols.get(p) - before.protocols.get(p);
        if d != 0 {
            moved.push(format!("{}+{d}", p.name()));
        }
    }
    moved.join(" ")
}

fn all_cases() -> Vec<Case> {
    let mut cases = well_formed();
    cases.extend(malformed());
    cases
}

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;

#[test]
fn xdp_uplink_golden_packets() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut bpf = Bpf::load();
    let cases = all_cases();
    assert!(cases.len() > 60, "the table shrank: {}", cases.len());
    check(
        &mut bpf,
        "tm_xdp_uplink",
        ProgramSlot::XdpUplink,
        XDP_PASS,
        XDP_DROP,
        &cases,
    );
}

#[test]
fn tc_ingress_golden_packets() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut bpf = Bpf::load();
    check(
        &mut bpf,
        "tm_tc_ingress",
        ProgramSlot::TcIngress,
        TC_ACT_OK,
        TC_ACT_SHOT,
        &all_cases(),
    );
}

#[test]
fn tc_egress_golden_packets() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut bpf = Bpf::load();
    check(
        &mut bpf,
        "tm_tc_egress",
        ProgramSlot::TcEgress,
        TC_ACT_OK,
        TC_ACT_SHOT,
        &all_cases(),
    );
}

#[test]
fn the_floor_program_passes_everything() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut bpf = Bpf::load();
    let run = bpf.run("tm_xdp_floor", &tcp4_frame(1, 2), 1);
    assert_eq!(run.action, XDP_PASS);
}
