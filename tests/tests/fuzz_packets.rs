//! Differential packet fuzzing of `tm_xdp_uplink`: frames through
//! BPF_PROG_TEST_RUN against the reference of `tapmesh_tests::uplink_ref`
//! (the parser's drop reasons, tunnel rules, `CompiledVip::classify`, the
//! flow hash and Maglev). Compared per frame: the action, the output bytes
//! (unless dropped), the drop reason, the protocol counters and which VIP,
//! flow and target counters moved. A difference fails the test and the
//! frame is saved (hex and pcap under the target directory's
//! `tmp/fuzz-failures/`) and printed.
//!
//! The corpus in `tests/fuzz/corpus/` is replayed first (each file names the
//! verdict it must get; together they cover every drop reason the uplink
//! can give here). Then `TAPMESH_FUZZ_CASES` (default 2000) generated and
//! mutated frames from `TAPMESH_FUZZ_SEED`, or fewer if
//! `TAPMESH_FUZZ_SECONDS` ends first; `cargo xtask fuzz` runs longer.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, Ipv6Addr},
    time::Instant,
};
use tapmesh_tests::fake_hops::{resolve, target_mac};

use rand::{rngs::StdRng, Rng};
use tapmesh::{
    dataplane::lb::{Hop, LbCounters, LbWriter, TunnelSettings},
    lb::flows::{FlowSpec, VipSpec},
    lb::model::{validate, LbSpec, StreamSpec, TargetSpec, TargetVia},
};
use tapmesh_common::{
    tunnel::PEER_STATIC, DropReason as D, ProgramSlot, ProgramStats, Protocol as P, Verdict,
};
use tapmesh_tests::{
    bpf::Bpf,
    fmt_mac,
    frames::*,
    fuzz::{self, hex},
    kernel_tests_enabled,
    underlay::{NODE, REMOTE_MAC, REMOTE_NODE, TUNNEL_PORT},
    uplink_ref::{Node, Outcome, XDP_DROP, XDP_PASS, XDP_REDIRECT},
};

const UPLINK: &str = "tm_xdp_uplink";

const VIP4: Ipv4Addr = Ipv4Addr::new(20, 0, 0, 1);
const VIP4_EMPTY: Ipv4Addr = Ipv4Addr::new(20, 0, 0, 30);
const VIP4_NET: Ipv4Addr = Ipv4Addr::new(20, 0, 1, 0);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 1);
const VIP6_NET: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x200, 0, 0, 0, 0, 0);
/// A node that may use the tunnel without a target there (`tunnel_peers`).
const STATIC_PEER: Ipv4Addr = Ipv4Addr::new(198, 18, 5, 3);
/// A host that is not a node.
const STRANGER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 66);
const HOP_IFINDEX: u32 = 200;
const HOP_MTU: u32 = 1500;
const HOP_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xee, 0xc8];

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[derive(Default, Clone)]
struct F {
    name: &'static str,
    vips: &'static [&'static str],
    stream: &'static str,
    priority: i32,
    protocols: &'static [&'static str],
    dst: &'static [&'static str],
    src: &'static [&'static str],
    sources: &'static [&'static str],
    bytes: &'static [&'static str],
}

/// 20 single ports: 41 intervals, more than the config holds (LPM tries).
const BIG_PORTS: [&str; 20] = [
    "1000", "1002", "1004", "1006", "1008", "1010", "1012", "1014", "1016", "1018", "1020", "1022",
    "1024", "1026", "1028", "1030", "1032", "1034", "1036", "1038",
];

/// A VIP of each kind (IPv4/IPv6 host and prefix), flows using every
/// classification feature, more byte-match candidates than the kernel tries,
/// a port table too big for the config (LPM tries), local, remote and no targets.
fn spec() -> LbSpec {
    let v4 = &["v4"][..];
    let mut flows = vec![
        F {
            name: "web",
            vips: v4,
            stream: "s1",
            priority: 100,
            protocols: &["tcp"],
            dst: &["80", "443"],
            ..F::default()
        },
        F {
            name: "dns",
            vips: v4,
            stream: "s2",
            priority: 90,
            protocols: &["udp"],
            dst: &["53"],
            bytes: &["udp[10:1] & 0x80 = 0"],
            ..F::default()
        },
        F {
            name: "dns-any",
            vips: v4,
            stream: "s1",
            priority: 85,
            protocols: &["udp"],
            dst: &["53"],
            ..F::default()
        },
        F {
            name: "cidr",
            vips: v4,
            stream: "s2",
            priority: 80,
            sources: &["10.1.0.0/16"],
            ..F::default()
        },
        F {
            name: "src-range",
            vips: v4,
            stream: "s1",
            priority: 70,
            protocols: &["udp"],
            src: &["5000-5099"],
            ..F::default()
        },
        F {
            name: "sctp",
            vips: v4,
            stream: "s2",
            priority: 60,
            protocols: &["sctp"],
            ..F::default()
        },
        F {
            name: "icmp",
            vips: v4,
            stream: "s1",
            priority: 50,
            protocols: &["icmp"],
            ..F::default()
        },
        F {
            name: "bigports",
            vips: v4,
            stream: "s1",
            priority: 20,
            protocols: &["tcp", "udp"],
            dst: &BIG_PORTS,
            ..F::default()
        },
        F {
            name: "remote",
            vips: v4,
            stream: "s-remote",
            priority: 10,
            protocols: &["tcp"],
            dst: &["9000"],
            ..F::default()
        },
        F {
            name: "empty",
            vips: &["v4", "v4-empty"],
            stream: "s-empty",
            priority: 5,
            protocols: &["tcp"],
            dst: &["9001"],
            ..F::default()
        },
        F {
            name: "empty-any",
            vips: &["v4-empty"],
            stream: "s-empty",
            ..F::default()
        },
        F {
            name: "net-any",
            vips: &["v4-net"],
            stream: "s1",
            priority: 1,
            ..F::default()
        },
        F {
            name: "net-udp",
            vips: &["v4-net"],
            stream: "s-remote",
            priority: 2,
            protocols: &["udp"],
            dst: &["9999"],
            ..F::default()
        },
        F {
            name: "web6",
            vips: &["v6"],
            stream: "s1",
            priority: 10,
            protocols: &["tcp"],
            dst: &["80"],
            ..F::default()
        },
        F {
            name: "udp6",
            vips: &["v6"],
            stream: "s2",
            priority: 5,
            protocols: &["udp"],
            ..F::default()
        },
        F {
            name: "icmp6",
            vips: &["v6"],
            stream: "s1",
            priority: 4,
            protocols: &["icmp"],
            ..F::default()
        },
        F {
            name: "src6",
            vips: &["v6"],
            stream: "s-remote",
            priority: 3,
            sources: &["2001:db8:7::/48"],
            ..F::default()
        },
        F {
            name: "net6",
            vips: &["v6-net"],
            stream: "s-remote",
            ..F::default()
        },
    ];
    // Five byte-match flows on one port, then one without: a payload that
    // matches none has a fifth candidate left (too_many_candidates).
    const MANY: [&str; 5] = [
        "udp[8:1] = 1",
        "udp[8:1] = 2",
        "udp[8:1] = 3",
        "udp[8:1] = 4",
        "udp[8:1] = 5",
    ];
    const NAMES: [&str; 5] = ["m1", "m2", "m3", "m4", "m5"];
    for i in 0..5 {
        flows.push(F {
            name: NAMES[i],
            vips: v4,
            stream: if i % 2 == 0 { "s1" } else { "s2" },
            priority: 40 - i as i32,
            protocols: &["udp"],
            dst: &["7000"],
            bytes: std::slice::from_ref(&MANY[i]),
            ..F::default()
        });
    }
    flows.push(F {
        name: "m-any",
        vips: v4,
        stream: "s2",
        priority: 30,
        protocols: &["udp"],
        dst: &["7000"],
        ..F::default()
    });
    let vips = [
        ("v4", VIP4.to_string()),
        ("v4-empty", VIP4_EMPTY.to_string()),
        ("v4-net", format!("{VIP4_NET}/24")),
        ("v6", VIP6.to_string()),
        ("v6-net", format!("{VIP6_NET}/120")),
    ];
    let stream = |name: &str, max_targets: u32| StreamSpec {
        name: name.into(),
        max_targets,
        table_size: None,
        port_nats: Vec::new(),
    };
    let local = |stream: &str, identifier: u32, n: u8| TargetSpec {
        stream: stream.into(),
        identifier,
        via: TargetVia::Local {
            interface: format!("if{n}"),
            mac: fmt_mac(target_mac(n)),
        },
    };
    LbSpec {
        vips: vips
            .iter()
            .map(|(n, a)| VipSpec {
                name: n.to_string(),
                address: a.clone(),
            })
            .collect(),
        streams: vec![
            stream("s1", 3),
            stream("s2", 1),
            stream("s-remote", 1),
            stream("s-empty", 2),
        ],
        flows: flows
            .iter()
            .map(|f| FlowSpec {
                name: f.name.into(),
                source_subnets: strings(f.sources),
                destination_port_ranges: strings(f.dst),
                source_port_ranges: strings(f.src),
                protocols: strings(f.protocols),
                priority: f.priority,
                stream: f.stream.into(),
                vips: strings(f.vips),
                byte_matches: strings(f.bytes),
            })
            .collect(),
        targets: vec![
            local("s1", 1, 1),
            local("s1", 2, 2),
            local("s1", 3, 3),
            local("s2", 1, 4),
            TargetSpec {
                stream: "s-remote".into(),
                identifier: 1,
                via: TargetVia::Remote {
                    node: REMOTE_NODE.to_string(),
                },
            },
        ],
    }
}

/// The kernel side (a private copy of the object, maps written as the
/// daemon writes them) and the reference node with the same configuration.
struct Lab {
    bpf: Bpf,
    writer: LbWriter,
    node: Node,
}

impl Lab {
    fn new() -> Self {
        let valid = validate(&spec()).expect("the fuzz configuration is valid");
        let mut bpf = Bpf::load();
        let mut writer = LbWriter::default();
        let tunnel = TunnelSettings {
            port: TUNNEL_PORT,
            address: Some(NODE),
        };
        tapmesh::dataplane::tunnel::write(&mut bpf.ebpf, tunnel).expect("writing tm_tunnel");
        let statics = BTreeSet::from([STATIC_PEER]);
        tapmesh::dataplane::tunnel::write_peers(
            &mut bpf.ebpf,
            PEER_STATIC,
            &BTreeSet::new(),
            &statics,
        )
        .expect("writing tm_tunnel_peers");
        writer
            .apply(&mut bpf.ebpf, &valid, tunnel, &resolve)
            .expect("writing the LB maps");
        let hop = Hop {
            ifindex: HOP_IFINDEX,
            dst_mac: REMOTE_MAC,
            src_mac: HOP_MAC,
            mtu: HOP_MTU,
            veth: false,
        };
        writer
            .set_hops(&mut bpf.ebpf, BTreeMap::from([(REMOTE_NODE, hop)]))
            .expect("writing the remote hop");
        let interfaces = (1..=4u8)
            .map(|n| (format!("if{n}"), resolve(&format!("if{n}")).unwrap()))
            .collect();
        let node = Node {
            lb: valid,
            node_addr: NODE,
            tunnel_port: TUNNEL_PORT,
            peers: BTreeSet::from([REMOTE_NODE, STATIC_PEER]),
            interfaces,
            hops: BTreeMap::from([(REMOTE_NODE, (HOP_IFINDEX, REMOTE_MAC, HOP_MAC, HOP_MTU))]),
        };
        Lab { bpf, writer, node }
    }

    fn counters(&self) -> LbCounters {
        self.writer
            .counters(&self.bpf.ebpf)
            .expect("reading the LB counters")
    }

    /// The kernel's outcome for `frame`, read as the reference states it.
    fn kernel(&mut self, frame: &[u8]) -> Result<Outcome, String> {
        let before = self.bpf.stats(ProgramSlot::XdpUplink);
        let lb_before = self.counters();
        let run = self.bpf.try_run(UPLINK, frame, 1)?;
        let after = self.bpf.stats(ProgramSlot::XdpUplink);
        let lb_after = self.counters();
        let mut problems = Vec::new();
        let verdict = match run.action {
            XDP_DROP => Verdict::Drop,
            XDP_PASS => Verdict::Pass,
            XDP_REDIRECT => Verdict::Redirect,
            3 => Verdict::Tx,
            _ => Verdict::Aborted,
        };
        let moved = |v: Verdict| {
            let (a, b) = (after.verdicts.get(v), before.verdicts.get(v));
            (a.packets - b.packets, a.bytes - b.bytes)
        };
        for &v in Verdict::ALL {
            let want = if v == verdict {
                (1, frame.len() as u64)
            } else {
                (0, 0)
            };
            if moved(v) != want {
                problems.push(format!(
                    "verdict counter {} moved {:?}, want {want:?}",
                    v.name(),
                    moved(v)
                ));
            }
        }
        let drops: Vec<D> = D::ALL
            .iter()
            .flat_map(|&r| {
                std::iter::repeat_n(r, (after.drops.get(r) - before.drops.get(r)) as usize)
            })
            .collect();
        if drops.len() > 1 || (drops.is_empty() == (run.action == XDP_DROP)) {
            problems.push(format!(
                "drop reasons counted: {drops:?} for action {}",
                run.action
            ));
        }
        let protocols = protocols_moved(&before, &after);
        let mut lb = Vec::new();
        let mut lb_bytes = 0;
        for (kind, b, a) in [
            ("vip", &lb_before.vips, &lb_after.vips),
            ("flow", &lb_before.flows, &lb_after.flows),
            ("target", &lb_before.targets, &lb_after.targets),
        ] {
            for (c, old) in a.iter().zip(b) {
                let d = (c.packets - old.packets, c.bytes - old.bytes);
                if d != (0, 0) {
                    if d.0 != 1 || (lb_bytes != 0 && d.1 != lb_bytes) {
                        problems.push(format!("{kind}:{} moved {d:?}", c.name));
                    }
                    lb_bytes = d.1;
                    lb.push(format!("{kind}:{}", c.name));
                }
            }
        }
        if !problems.is_empty() {
            return Err(problems.join("; "));
        }
        Ok(Outcome {
            action: run.action,
            drop: drops.first().copied(),
            output: (run.action != XDP_DROP).then_some(run.output),
            protocols,
            lb,
            lb_bytes,
        })
    }

    /// The difference between kernel and reference for `frame`, if any
    /// (frames shorter than an Ethernet header cannot be run).
    fn differ(&mut self, frame: &[u8]) -> Option<String> {
        if frame.len() < 14 {
            return None;
        }
        let mut want = self.node.uplink(frame);
        want.lb.sort();
        want.protocols.sort_by_key(|p| *p as u32);
        let got = match self.kernel(frame) {
            Ok(mut got) => {
                got.lb.sort();
                got.protocols.sort_by_key(|p| *p as u32);
                got
            }
            Err(problem) => return Some(format!("kernel: {problem}")),
        };
        (got != want).then(|| describe(&got, &want))
    }
}

fn protocols_moved(before: &ProgramStats, after: &ProgramStats) -> Vec<P> {
    P::ALL
        .iter()
        .flat_map(|&p| {
            std::iter::repeat_n(
                p,
                (after.protocols.get(p) - before.protocols.get(p)) as usize,
            )
        })
        .collect()
}

fn describe(got: &Outcome, want: &Outcome) -> String {
    let mut out = Vec::new();
    if (got.action, got.drop) != (want.action, want.drop) {
        out.push(format!(
            "kernel: action {} {:?}, reference: action {} {:?}",
            got.action, got.drop, want.action, want.drop
        ));
    }
    if got.output != want.output {
        let h = |o: &Option<Vec<u8>>| o.as_deref().map_or("-".into(), hex);
        out.push(format!(
            "output\n  kernel    {}\n  reference {}",
            h(&got.output),
            h(&want.output)
        ));
    }
    if got.protocols != want.protocols {
        out.push(format!(
            "protocols: kernel {:?}, reference {:?}",
            got.protocols, want.protocols
        ));
    }
    if (&got.lb, got.lb_bytes) != (&want.lb, want.lb_bytes) {
        out.push(format!(
            "LB counters: kernel {:?} ({} B), reference {:?} ({} B)",
            got.lb, got.lb_bytes, want.lb, want.lb_bytes
        ));
    }
    out.join("\n")
}

/// What a corpus file says of an outcome.
fn verdict_name(o: &Outcome) -> String {
    match (o.action, o.drop) {
        (_, Some(reason)) => reason.name().to_string(),
        (XDP_PASS, _) => "pass".into(),
        (XDP_REDIRECT, _) => "redirect".into(),
        (a, _) => format!("action {a}"),
    }
}

// ---------------------------------------------------------------------------
// Frames

const CLIENT: Ipv4Addr = V4_A;
const CLIENT_NET10: Ipv4Addr = Ipv4Addr::new(10, 1, 2, 3);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 7, 0, 0, 0, 0, 0x11);

fn pick<T: Copy>(rng: &mut StdRng, from: &[T]) -> T {
    from[rng.random_range(0..from.len())]
}

fn port(rng: &mut StdRng) -> u16 {
    let p = pick(
        rng,
        &[
            53,
            80,
            443,
            1000,
            1002,
            1038,
            1039,
            5000,
            5099,
            7000,
            9000,
            9001,
            9999,
            TUNNEL_PORT,
            0,
        ],
    );
    match rng.random_range(0..6) {
        0 => rng.random(),
        1 => p.wrapping_add(1),
        2 => p.wrapping_sub(1),
        _ => p,
    }
}

fn payload(rng: &mut StdRng) -> Vec<u8> {
    let mut p = fuzz::random_bytes(rng, 24);
    if let Some(first) = p.first_mut() {
        // The byte-match flows look at the first payload byte (1..5) and the DNS flag byte.
        if rng.random_bool(0.6) {
            *first = rng.random_range(0..7);
        }
    }
    p
}

fn l4_v4(rng: &mut StdRng, src: Ipv4Addr, dst: Ipv4Addr) -> (u8, Vec<u8>) {
    match rng.random_range(0..7) {
        0 | 1 => (UDP, udp_v4(src, dst, port(rng), port(rng), &payload(rng))),
        2 | 3 => (
            TCP,
            tcp_v4(src, dst, port(rng), port(rng), rng.random_range(0..3)),
        ),
        4 => {
            let mut s = sctp4(src, dst, port(rng), port(rng));
            (SCTP, s.split_off(20))
        }
        5 => (ICMP, icmp_echo(rng.random(), 1, &payload(rng))),
        _ => (pick(rng, &[47, 50, 58, 255]), fuzz::random_bytes(rng, 16)),
    }
}

fn addr4(rng: &mut StdRng) -> Ipv4Addr {
    let in_net = Ipv4Addr::new(20, 0, 1, rng.random());
    pick(
        rng,
        &[
            VIP4,
            VIP4,
            VIP4,
            VIP4_EMPTY,
            in_net,
            Ipv4Addr::new(20, 0, 0, 2),
            NODE,
            V4_B,
        ],
    )
}

fn src4(rng: &mut StdRng) -> Ipv4Addr {
    pick(
        rng,
        &[
            CLIENT,
            CLIENT,
            CLIENT_NET10,
            Ipv4Addr::new(10, 2, 0, 1),
            REMOTE_NODE,
            STATIC_PEER,
            STRANGER,
        ],
    )
}

/// An IPv4 packet: options, fragments and ICMP errors now and then.
fn packet4(rng: &mut StdRng) -> Vec<u8> {
    let (src, dst) = (src4(rng), addr4(rng));
    if rng.random_ratio(1, 8) {
        // An ICMP error about a packet the VIP sent (swapped).
        let (proto, l4) = l4_v4(rng, dst, src);
        let quoted = ipv4(dst, src, proto, &[], &l4);
        let router = pick(rng, &[Ipv4Addr::new(198, 18, 9, 9), CLIENT]);
        // Now and then sent to another address than the quoted source.
        let to = if rng.random_ratio(1, 4) {
            addr4(rng)
        } else {
            dst
        };
        let mut error = icmp4_frag_needed(router, to, &quoted);
        let cut = rng.random_range(21..=error.len());
        if rng.random_ratio(1, 3) {
            error.truncate(cut);
            let total = error.len() as u16;
            error[2..4].copy_from_slice(&total.to_be_bytes());
        }
        error[20] = pick(rng, &[3, 11, 12, 0, 5]);
        return error;
    }
    let (proto, l4) = l4_v4(rng, src, dst);
    let options: &[u8] = if rng.random_ratio(1, 8) {
        &[1, 1, 1, 0]
    } else {
        &[]
    };
    let mut p = ipv4(src, dst, proto, options, &l4);
    if rng.random_ratio(1, 6) {
        let at = 20 + options.len();
        let cut = rng.random_range(0..=l4.len() / 8) * 8;
        let (offset, more) = pick(rng, &[(0u16, true), (cut as u16, false), (8, true)]);
        let body = if offset == 0 {
            l4[..cut.max(8).min(l4.len())].to_vec()
        } else {
            l4[cut.min(l4.len())..].to_vec()
        };
        p = fragment4(src, dst, proto, rng.random(), offset, more, &body);
        let _ = at;
    }
    p
}

fn addr6(rng: &mut StdRng) -> Ipv6Addr {
    let mut net = VIP6_NET.octets();
    net[15] = rng.random();
    pick(
        rng,
        &[
            VIP6,
            VIP6,
            Ipv6Addr::from(net),
            V6_B,
            VIP4.to_ipv6_mapped(),
            Ipv4Addr::new(20, 0, 1, 9).to_ipv6_mapped(),
        ],
    )
}

/// An IPv6 packet: extension headers, fragments and ICMPv6 errors now and then.
fn packet6(rng: &mut StdRng) -> Vec<u8> {
    let src = pick(rng, &[CLIENT6, V6_A, CLIENT.to_ipv6_mapped()]);
    let dst = addr6(rng);
    let (mut next, l4) = match rng.random_range(0..6) {
        0 | 1 => (UDP, udp_header(port(rng), port(rng), &payload(rng))),
        2 => {
            let t = tcp_v4(CLIENT, VIP4, port(rng), port(rng), rng.random_range(0..2));
            (TCP, t)
        }
        3 => {
            let quoted_src = if rng.random_ratio(1, 4) {
                addr6(rng)
            } else {
                dst
            };
            let inner = udp6(quoted_src, src, port(rng), port(rng), b"quoted");
            let mut m = vec![pick(rng, &[1u8, 2, 3, 4, 128]), 0, 0, 0, 0, 0, 5, 0];
            m.extend_from_slice(&inner[..rng.random_range(0..=inner.len())]);
            (ICMPV6, m)
        }
        4 => (
            SCTP,
            sctp4(CLIENT, VIP4, port(rng), port(rng)).split_off(20),
        ),
        _ => (ICMPV6, icmp_echo(1, 1, b"x")),
    };
    let mut ext = Vec::new();
    for _ in 0..rng.random_range(0..=7u32).saturating_sub(4) {
        let kind = pick(rng, &[0u8, 43, 60, 44, 51]);
        let mut h = match kind {
            44 => {
                let (offset, more) = pick(rng, &[(0u16, true), (1, false), (0, false)]);
                let mut f = vec![next, 0];
                f.extend_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
                f.extend_from_slice(&[0, 0, 0, 9]);
                f
            }
            51 => vec![next, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            _ => {
                let mut e = vec![next, 0];
                e.resize(8, 0);
                e
            }
        };
        h.extend_from_slice(&ext);
        ext = h;
        next = kind;
    }
    ipv6(src, dst, next, &ext, &l4)
}

/// A frame: an IPv4 or IPv6 packet, in the tunnel or not, tagged or not;
/// or not IP at all.
fn generate(rng: &mut StdRng) -> Vec<u8> {
    let ip = match rng.random_range(0..10) {
        0..=4 => packet4(rng),
        5..=7 => packet6(rng),
        8 => {
            let inner = if rng.random_bool(0.6) {
                packet4(rng)
            } else {
                packet6(rng)
            };
            let from = pick(rng, &[REMOTE_NODE, REMOTE_NODE, STATIC_PEER, STRANGER]);
            let sport = rng.random();
            let mut t = udp4(from, NODE, sport, TUNNEL_PORT, &inner);
            if rng.random_ratio(1, 10) {
                t = ipv4(
                    from,
                    NODE,
                    UDP,
                    &[1, 1, 1, 0],
                    &udp_v4(from, NODE, sport, TUNNEL_PORT, &inner),
                );
            }
            if rng.random_ratio(1, 8) {
                // Outer lengths that carry less than the inner packet, the
                // rest after the outer packet.
                let ihl = usize::from(t[0] & 0x0f) * 4;
                let short = rng.random_range(1..=inner.len());
                let udp_len = (t.len() - ihl - short) as u16;
                t[ihl + 4..ihl + 6].copy_from_slice(&udp_len.to_be_bytes());
                let total = (t.len() - short) as u16;
                set_ipv4_total_length(&mut t, 0, total);
            }
            t
        }
        _ => {
            let mut arp = vec![0u8; 28];
            arp[..8].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
            return ethernet([0xff; 6], MAC_A, &[], 0x0806, &arp);
        }
    };
    let vlans: &[u16] = pick(rng, &[&[][..], &[], &[], &[7], &[100, 200]]);
    let mut frame = eth_tagged(vlans, &ip);
    if rng.random_ratio(1, 10) {
        frame.resize(frame.len().max(60) + rng.random_range(0..8), 0);
    }
    frame
}

// ---------------------------------------------------------------------------
// The corpus: frames that cover every drop reason the uplink can give here

fn tunnel_from(from: Ipv4Addr, inner: &[u8]) -> Vec<u8> {
    tunnel(from, NODE, TUNNEL_PORT, inner)
}

/// An IPv4 packet with TTL 1 (its header checksum made anew).
fn last_hop(mut ip: Vec<u8>) -> Vec<u8> {
    ip[8] = 1;
    ip[10..12].fill(0);
    let sum = internet_checksum(&[&ip[..20]]);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    ip
}

fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let udp = |dport: u16, data: &[u8]| eth(&udp4(CLIENT, VIP4, 40000, dport, data));
    let set = |mut f: Vec<u8>, at: usize, bytes: &[u8]| {
        f[at..at + bytes.len()].copy_from_slice(bytes);
        f
    };
    let v6 = |next: u8, ext: &[u8], l4: &[u8]| eth(&ipv6(CLIENT6, VIP6, next, ext, l4));
    let later = eth(&fragment4(CLIENT, VIP4, UDP, 9, 16, false, &[0; 16]));
    vec![
        (
            "truncated-vlan",
            "a tag cut short",
            eth_tagged(&[7], &udp4(CLIENT, VIP4, 1, 2, b""))[..16].to_vec(),
        ),
        (
            "truncated-ipv4",
            "IPv4 header cut short",
            udp(80, b"x")[..30].to_vec(),
        ),
        (
            "truncated-ipv4-total",
            "total length past the frame",
            set(udp(80, b"x"), 16, &[0x01, 0x00]),
        ),
        (
            "bad-ipv4-version",
            "version 5",
            set(udp(80, b"x"), 14, &[0x55]),
        ),
        (
            "bad-ipv4-header-length",
            "IHL 4",
            set(udp(80, b"x"), 14, &[0x44]),
        ),
        (
            "bad-ipv4-total-length",
            "total length 19",
            set(udp(80, b"x"), 16, &[0, 19]),
        ),
        (
            "truncated-ipv6",
            "IPv6 header cut short",
            v6(UDP, &[], &udp_header(1, 53, b"x"))[..50].to_vec(),
        ),
        (
            "bad-ipv6-version",
            "version 4 under the IPv6 ether type",
            set(v6(UDP, &[], &udp_header(1, 53, b"x")), 14, &[0x40]),
        ),
        (
            "truncated-ipv6-extension",
            "a hop-by-hop header longer than the packet",
            v6(0, &[UDP, 3, 0, 0, 0, 0, 0, 0], &udp_header(1, 53, b"x")),
        ),
        (
            "too-many-ipv6-extensions",
            "seven destination options headers",
            v6(60, &[[60u8, 0, 0, 0, 0, 0, 0, 0]; 7].concat(), &[0; 8]),
        ),
        ("truncated-tcp", "TCP header cut short", {
            let mut p = ipv4(
                CLIENT,
                VIP4,
                TCP,
                &[],
                &tcp_v4(CLIENT, VIP4, 1, 80, 0)[..12],
            );
            p.truncate(32);
            eth(&p)
        }),
        ("bad-tcp-header-length", "data offset 4", {
            let mut t = tcp_v4(CLIENT, VIP4, 1, 80, 0);
            t[12] = 0x40;
            eth(&ipv4(CLIENT, VIP4, TCP, &[], &t))
        }),
        (
            "truncated-udp",
            "UDP header cut short",
            eth(&ipv4(CLIENT, VIP4, UDP, &[], &[0, 1, 0, 53])),
        ),
        (
            "bad-udp-length",
            "UDP length past the IP packet",
            set(udp(53, b"x"), 38, &[0, 99]),
        ),
        (
            "truncated-sctp",
            "SCTP header cut short",
            eth(&ipv4(CLIENT, VIP4, SCTP, &[], &[0, 1, 0, 2, 0, 0])),
        ),
        (
            "truncated-icmp",
            "ICMP header cut short",
            eth(&ipv4(CLIENT, VIP4, ICMP, &[], &[8, 0, 0, 0])),
        ),
        ("no-flow-match", "UDP to port 2 of the VIP", udp(2, b"x")),
        (
            "too-many-candidates",
            "five byte-match candidates fail",
            udp(7000, &[9, 9]),
        ),
        (
            "no-target",
            "a stream without targets",
            eth(&tcp4(CLIENT, VIP4, 1, 9001)),
        ),
        (
            "target-not-local",
            "through the tunnel to a remote target",
            tunnel_from(REMOTE_NODE, &tcp4(CLIENT, VIP4, 1, 9000)),
        ),
        (
            "bad-tunnel-packet",
            "inner version 0",
            tunnel_from(REMOTE_NODE, &[0; 20]),
        ),
        (
            "tunnel-unknown-node",
            "from a host that is not a node",
            tunnel_from(STRANGER, &udp4(CLIENT, VIP4, 1, 80, b"x")),
        ),
        (
            "tunnel-foreign-source",
            "from a node, an inner packet from loopback",
            tunnel_from(REMOTE_NODE, &udp4(Ipv4Addr::LOCALHOST, VIP4, 1, 80, b"x")),
        ),
        (
            "tunnel-foreign-source-v6-mapped",
            "from a node, an IPv6 inner packet from an IPv4-mapped address",
            tunnel_from(
                REMOTE_NODE,
                &udp6(CLIENT.to_ipv6_mapped(), VIP6, 1, 80, b"x"),
            ),
        ),
        (
            "too-big-for-tunnel",
            "to the remote target, too big once encapsulated",
            eth(&udp6(
                CLIENT6,
                "2001:db8:200::7".parse().unwrap(),
                1,
                2,
                &[0; 1450],
            )),
        ),
        (
            "pass-arp",
            "not IP",
            ethernet([0xff; 6], MAC_A, &[], 0x0806, &[0; 28]),
        ),
        (
            "pass-non-vip",
            "UDP to another address",
            eth(&udp4(CLIENT, V4_B, 1, 80, b"x")),
        ),
        (
            "redirect-local",
            "TCP 80 to a local target",
            eth(&tcp4(CLIENT, VIP4, 40000, 80)),
        ),
        (
            "ttl-exceeded",
            "TCP 80 to a local target with TTL 1",
            eth(&last_hop(tcp4(CLIENT, VIP4, 40000, 80))),
        ),
        (
            "ttl-exceeded-tunnel",
            "decapsulated with TTL 1",
            tunnel_from(STATIC_PEER, &last_hop(tcp4(CLIENT, VIP4, 40000, 443))),
        ),
        (
            "redirect-remote",
            "TCP 9000 to the remote target",
            eth(&tcp4(CLIENT, VIP4, 40000, 9000)),
        ),
        (
            "redirect-tunnel",
            "decapsulated, then to a local target",
            tunnel_from(STATIC_PEER, &tcp4(CLIENT, VIP4, 40000, 443)),
        ),
        (
            "redirect-v6-prefix",
            "IPv6 prefix VIP to the remote target",
            eth(&udp6(
                CLIENT6,
                "2001:db8:200::7".parse().unwrap(),
                1,
                2,
                b"x",
            )),
        ),
        (
            "pass-v6-mapped",
            "IPv6 to ::ffff:20.0.0.1 is not the IPv4 VIP",
            eth(&udp6(CLIENT6, VIP4.to_ipv6_mapped(), 1, 53, b"x")),
        ),
        (
            "udp-first-fragment",
            "a first fragment to a port-restricted flow only",
            eth(&fragment4(
                CLIENT,
                VIP4,
                UDP,
                7,
                0,
                true,
                &udp_v4(CLIENT, VIP4, 40000, 1002, &[0; 16])[..16],
            )),
        ),
        ("udp-later-fragment", "a later fragment", later),
    ]
}

/// Drop reasons the uplink can give with this configuration and no FIB
/// (the remote hop is resolved): all of them must be in the corpus.
/// (`truncated_ethernet` cannot be tested: BPF_PROG_TEST_RUN refuses XDP
/// frames shorter than an Ethernet header, and no driver hands one up.)
const COVERED: &[D] = &[
    D::TruncatedVlan,
    D::TruncatedIpv4,
    D::BadIpv4Version,
    D::BadIpv4HeaderLength,
    D::BadIpv4TotalLength,
    D::TruncatedIpv6,
    D::BadIpv6Version,
    D::TruncatedIpv6Extension,
    D::TooManyIpv6Extensions,
    D::TruncatedTcp,
    D::BadTcpHeaderLength,
    D::TruncatedUdp,
    D::BadUdpLength,
    D::TruncatedSctp,
    D::TruncatedIcmp,
    D::NoFlowMatch,
    D::TooManyCandidates,
    D::NoTarget,
    D::TargetNotLocal,
    D::BadTunnelPacket,
    D::TunnelUnknownNode,
    D::TunnelForeignSource,
    D::TooBigForTunnel,
    D::TtlExceeded,
];

/// `TAPMESH_FUZZ_WRITE_CORPUS=1` (re)writes the seed files from [`seeds`],
/// each with the reference's verdict.
fn write_seeds(lab: &Lab) {
    for (name, about, frame) in seeds() {
        let verdict = verdict_name(&lab.node.uplink(&frame));
        fuzz::write_entry(&fuzz::corpus_dir(), name, about, &verdict, &frame);
    }
}

fn fail(name: &str, frame: &[u8], why: &str) -> String {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-failures");
    let path = fuzz::save_failure(&dir, name, why, frame);
    format!(
        "{name}: {why}\n  frame {}\n  saved {}",
        hex(frame),
        path.display()
    )
}

#[test]
fn corpus_replays_with_the_reference() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut lab = Lab::new();
    if std::env::var_os("TAPMESH_FUZZ_WRITE_CORPUS").is_some() {
        write_seeds(&lab);
    }
    let corpus = fuzz::read_corpus(&fuzz::corpus_dir());
    let mut failures = Vec::new();
    let mut seen = BTreeSet::new();
    for entry in &corpus {
        let want = lab.node.uplink(&entry.frame);
        if verdict_name(&want) != entry.expect {
            failures.push(format!(
                "{}: the reference says {}, the file {}",
                entry.name,
                verdict_name(&want),
                entry.expect
            ));
        }
        if let Some(why) = lab.differ(&entry.frame) {
            failures.push(fail(&format!("corpus-{}", entry.name), &entry.frame, &why));
        }
        seen.extend(want.drop.map(|r| r.name()));
    }
    let missing: Vec<_> = COVERED
        .iter()
        .filter(|r| !seen.contains(r.name()))
        .map(|r| r.name())
        .collect();
    assert!(
        missing.is_empty(),
        "the corpus has no frame for {missing:?}"
    );
    assert!(
        failures.is_empty(),
        "{} of {} corpus frames differ:\n{}",
        failures.len(),
        corpus.len(),
        failures.join("\n")
    );
}

#[test]
fn random_and_mutated_frames_match_the_reference() {
    if !kernel_tests_enabled() {
        return;
    }
    let settings = fuzz::settings(2000);
    let seed = settings.seed;
    let deadline = settings
        .seconds
        .map(|s| Instant::now() + std::time::Duration::from_secs(s));
    let mut lab = Lab::new();
    let corpus = fuzz::read_corpus(&fuzz::corpus_dir());
    let mut rng = fuzz::rng(seed);
    let mut failures = Vec::new();
    let mut verdicts: BTreeMap<String, u64> = BTreeMap::new();
    let start = Instant::now();
    let mut cases = 0u64;
    for case in 0..settings.cases {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        cases += 1;
        let mut frame = match rng.random_range(0..10) {
            0..=1 => corpus[rng.random_range(0..corpus.len())].frame.clone(),
            2 => fuzz::random_bytes(&mut rng, 80),
            _ => generate(&mut rng),
        };
        if rng.random_bool(0.5) {
            fuzz::mutate(&mut rng, &mut frame);
        }
        // The kernel runs nothing shorter than an Ethernet header.
        if frame.len() < 14 {
            frame.resize(14, 0);
        }
        *verdicts
            .entry(verdict_name(&lab.node.uplink(&frame)))
            .or_default() += 1;
        if let Some(why) = lab.differ(&frame) {
            failures.push(fail(&format!("seed{seed:x}-case{case}"), &frame, &why));
            if failures.len() >= 10 {
                break;
            }
        }
    }
    let elapsed = start.elapsed();
    eprintln!(
        "fuzz: {cases} frames (seed {seed:#x}) in {:.2} s, {:.0} frames/s; verdicts {verdicts:?}",
        elapsed.as_secs_f64(),
        cases as f64 / elapsed.as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{} frames differ (seed {seed:#x}):\n{}",
        failures.len(),
        failures.join("\n\n")
    );
    // Not vacuous: the run reached every kind of outcome.
    if cases >= 2000 {
        for v in [
            "pass",
            "redirect",
            "no_flow_match",
            "tunnel_unknown_node",
            "truncated_ipv4",
        ] {
            assert!(verdicts.contains_key(v), "no frame got {v}: {verdicts:?}");
        }
    }
}
