//! Golden packets for the VIP load-balancing path of `tm_xdp_uplink` through
//! BPF_PROG_TEST_RUN: the return code, the exact output bytes, and exactly
//! which counters moved (program verdicts, drop reasons and protocols, and the
//! per-VIP, per-flow and per-target counters of `LbWriter::counters`).
//!
//! Every test loads a private copy of the object and fills its maps with
//! `LbWriter::apply` from one LB configuration ([`spec`]). Streams that a test
//! tells apart by their output get a single local target each, whose MACs say
//! which stream was picked. The multi-target stream is checked against a
//! reference of the kernel's flow hash and the stream's Maglev table.
//!
//! Remote targets need the kernel's FIB and neighbour table: those tests run
//! the program from a thread inside a network namespace the test creates (and
//! deletes on drop, also on panic).

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr},
};
use tapmesh_tests::fake_hops::{our_mac, resolve, target_mac};

use tapmesh::{
    dataplane::lb::{LbCounters, LbWriter, TunnelSettings},
    lb::flows::{FlowSpec, VipSpec},
    lb::model::{validate, LbSpec, StreamSpec, TargetSpec, TargetVia, ValidLb},
};
use tapmesh_common::{DropReason as D, ProgramSlot, ProgramStats, Protocol as P, Verdict};
use tapmesh_tests::{
    bpf::Bpf,
    fmt_mac,
    frames::*,
    kernel_tests_enabled,
    underlay::{Underlay, NODE, REMOTE_MAC, REMOTE_NODE, TUNNEL_PORT},
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;
const UPLINK: &str = "tm_xdp_uplink";

const CLIENT: Ipv4Addr = V4_A;
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 7, 0, 0, 0, 0, 0x11);
/// A router reporting an ICMP error.
const ROUTER: Ipv4Addr = Ipv4Addr::new(198, 18, 9, 9);
const ROUTER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 9, 0, 0, 0, 0, 9);

/// The VIP carrying one flow per classification feature.
const VIP4: Ipv4Addr = Ipv4Addr::new(20, 0, 0, 1);
/// A VIP whose stream has three local targets.
const VIP_MULTI: Ipv4Addr = Ipv4Addr::new(20, 0, 0, 10);
/// An IPv6 VIP on the same three-target stream.
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 1);
/// VIPs whose stream's only target is on another node.
const VIP_REMOTE: Ipv4Addr = Ipv4Addr::new(20, 0, 0, 20);
const VIP6_REMOTE: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x20);
/// A VIP whose stream has no target.
const VIP_EMPTY: Ipv4Addr = Ipv4Addr::new(20, 0, 0, 30);

// ---------------------------------------------------------------------------
// The configuration

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

struct FlowDef {
    name: &'static str,
    priority: i32,
    vips: &'static [&'static str],
    stream: &'static str,
    protocols: &'static [&'static str],
    dst: &'static [&'static str],
    src: &'static [&'static str],
    sources: &'static [&'static str],
    bytes: &'static [&'static str],
}

const ANY: FlowDef = FlowDef {
    name: "",
    priority: 0,
    vips: &["vip4"],
    stream: "",
    protocols: &[],
    dst: &[],
    src: &[],
    sources: &[],
    bytes: &[],
};

/// The streams with one local target: (stream, interface number).
const SINGLE: &[(&str, u8)] = &[
    ("s-bytes", 1),
    ("s-udp2000", 2),
    ("s-cidr", 3),
    ("s-hi", 4),
    ("s-lo", 5),
    ("s-dst", 6),
    ("s-src", 7),
    ("s-sctp", 8),
    ("s-icmp", 9),
];

/// The three targets of `s-multi`: (identifier, interface number).
const MULTI: &[(u32, u8)] = &[(1, 11), (2, 12), (3, 13)];

fn spec() -> LbSpec {
    let flows = [
        // Byte match on the first 4 payload bytes (offsets count from the UDP header).
        FlowDef {
            name: "bytes",
            priority: 90,
            stream: "s-bytes",
            protocols: &["udp"],
            dst: &["2000"],
            bytes: &["udp[8:4] = 0xcafebabe"],
            ..ANY
        },
        FlowDef {
            name: "udp-2000",
            priority: 80,
            stream: "s-udp2000",
            protocols: &["udp"],
            dst: &["2000"],
            ..ANY
        },
        FlowDef {
            name: "src-cidr",
            priority: 70,
            stream: "s-cidr",
            protocols: &["tcp"],
            sources: &["10.1.0.0/16"],
            ..ANY
        },
        FlowDef {
            name: "prio-hi",
            priority: 60,
            stream: "s-hi",
            protocols: &["tcp"],
            dst: &["80"],
            ..ANY
        },
        FlowDef {
            name: "prio-lo",
            priority: 50,
            stream: "s-lo",
            protocols: &["tcp"],
            dst: &["80-90"],
            ..ANY
        },
        FlowDef {
            name: "dst-range",
            priority: 40,
            stream: "s-dst",
            protocols: &["udp"],
            dst: &["1000-1999"],
            ..ANY
        },
        FlowDef {
            name: "src-range",
            priority: 30,
            stream: "s-src",
            protocols: &["udp"],
            src: &["5000-5099"],
            ..ANY
        },
        FlowDef {
            name: "sctp-only",
            priority: 20,
            stream: "s-sctp",
            protocols: &["sctp"],
            ..ANY
        },
        FlowDef {
            name: "icmp",
            priority: 10,
            stream: "s-icmp",
            protocols: &["icmp"],
            ..ANY
        },
        FlowDef {
            name: "spread",
            vips: &["vip-multi", "vip6"],
            stream: "s-multi",
            ..ANY
        },
        FlowDef {
            name: "to-remote",
            vips: &["vip-remote", "vip6-remote"],
            stream: "s-remote",
            ..ANY
        },
        FlowDef {
            name: "to-empty",
            vips: &["vip-empty"],
            stream: "s-empty",
            ..ANY
        },
    ];
    let vips = [
        ("vip4", VIP4.to_string()),
        ("vip-multi", VIP_MULTI.to_string()),
        ("vip6", VIP6.to_string()),
        ("vip-remote", VIP_REMOTE.to_string()),
        ("vip6-remote", VIP6_REMOTE.to_string()),
        ("vip-empty", VIP_EMPTY.to_string()),
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
    let mut streams: Vec<StreamSpec> = SINGLE.iter().map(|(s, _)| stream(s, 1)).collect();
    streams.extend([
        stream("s-multi", 3),
        stream("s-remote", 1),
        stream("s-empty", 2),
    ]);
    let mut targets: Vec<TargetSpec> = SINGLE.iter().map(|(s, n)| local(s, 1, *n)).collect();
    targets.extend(MULTI.iter().map(|(id, n)| local("s-multi", *id, *n)));
    targets.push(TargetSpec {
        stream: "s-remote".into(),
        identifier: 1,
        via: TargetVia::Remote {
            node: REMOTE_NODE.to_string(),
        },
    });
    LbSpec {
        vips: vips
            .iter()
            .map(|(n, a)| VipSpec {
                name: n.to_string(),
                address: a.clone(),
            })
            .collect(),
        streams,
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
        targets,
    }
}

/// A loaded object with the configuration written into its maps.
struct Lab {
    bpf: Bpf,
    writer: LbWriter,
    valid: ValidLb,
}

impl Lab {
    fn new() -> Self {
        let valid = validate(&spec()).expect("the test configuration is valid");
        let mut bpf = Bpf::load();
        let mut writer = LbWriter::default();
        let tunnel = TunnelSettings {
            port: TUNNEL_PORT,
            address: Some(NODE),
        };
        tapmesh::dataplane::tunnel::write(&mut bpf.ebpf, tunnel).expect("writing tm_tunnel");
        writer
            .apply(&mut bpf.ebpf, &valid, tunnel, &resolve)
            .expect("writing the LB maps");
        Lab { bpf, writer, valid }
    }

    fn counters(&self) -> LbCounters {
        self.writer
            .counters(&self.bpf.ebpf)
            .expect("reading the LB counters")
    }

    /// Runs the uplink once and checks everything; returns what went wrong.
    fn check(&mut self, name: &str, frame: &[u8], want: &Expect) -> Vec<String> {
        let before = self.bpf.stats(ProgramSlot::XdpUplink);
        let lb_before = self.counters();
        let run = self.bpf.run(UPLINK, frame, 1);
        let after = self.bpf.stats(ProgramSlot::XdpUplink);
        let lb_after = self.counters();

        let mut failures = Vec::new();
        if run.action != want.action {
            failures.push(format!(
                "{name}: action {} (want {})",
                run.action, want.action
            ));
        }
        if let Some(output) = &want.output {
            if run.output != *output {
                failures.push(format!(
                    "{name}: output differs\n  got  {}\n  want {}",
                    hex(&run.output),
                    hex(output)
                ));
            }
        }
        let mut expected = before;
        let verdict = match want.action {
            XDP_DROP => Verdict::Drop,
            XDP_PASS => Verdict::Pass,
            XDP_TX => Verdict::Tx,
            XDP_REDIRECT => Verdict::Redirect,
            _ => Verdict::Aborted,
        };
        expected
            .verdicts
            .counter_mut(verdict)
            .count(frame.len() as u64);
        if let Some(reason) = want.drop {
            expected.drops.add(reason, 1);
        }
        for &p in &want.protocols {
            expected.protocols.add(p, 1);
        }
        if after != expected {
            failures.push(format!(
                "{name}: program counters: {}",
                describe(&before, &after)
            ));
        }
        let moved = lb_moved(&lb_before, &lb_after);
        let wanted: BTreeMap<String, (u64, u64)> = want
            .lb
            .iter()
            .map(|c| (c.clone(), (1, want.lb_bytes)))
            .collect();
        if moved != wanted {
            failures.push(format!(
                "{name}: LB counters moved {moved:?}, want {wanted:?}"
            ));
        }
        failures
    }

    /// Runs the uplink once on a frame that must be redirected to a local
    /// target; returns the target's name (`stream/identifier`) from the output MACs.
    fn local_target(&mut self, frame: &[u8]) -> String {
        let run = self.bpf.run(UPLINK, frame, 1);
        assert_eq!(run.action, XDP_REDIRECT, "not redirected: {}", hex(frame));
        let name = self
            .target_by_mac(&run.output[..6])
            .unwrap_or_else(|| panic!("no target has the MAC of {}", hex(&run.output)));
        let (dst, src) = local_macs(&name);
        assert_eq!(run.output, forwarded(frame, dst, src), "{name}: output");
        name
    }

    fn target_by_mac(&self, mac: &[u8]) -> Option<String> {
        let n = (1..=20u8).find(|n| target_mac(*n) == mac)?;
        if let Some((s, _)) = SINGLE.iter().find(|(_, m)| *m == n) {
            return Some(format!("{s}/1"));
        }
        MULTI
            .iter()
            .find(|(_, m)| *m == n)
            .map(|(id, _)| format!("s-multi/{id}"))
    }

    /// The target the reference model picks: the kernel's hash into the stream's Maglev table.
    fn reference_target(&self, stream: &str, hash: u32) -> String {
        let table = &self
            .valid
            .streams
            .iter()
            .find(|s| s.name == stream)
            .expect("stream")
            .table;
        let slot = table[(hash % table.len() as u32) as usize];
        format!("{stream}/{}", slot + 1)
    }
}

/// (destination, source) MAC written for a local target `stream/identifier`.
fn local_macs(target: &str) -> ([u8; 6], [u8; 6]) {
    let (stream, id) = target.split_once('/').expect("stream/identifier");
    let n = if stream == "s-multi" {
        let id: u32 = id.parse().unwrap();
        MULTI
            .iter()
            .find(|(i, _)| *i == id)
            .expect("multi target")
            .1
    } else {
        SINGLE
            .iter()
            .find(|(s, _)| *s == stream)
            .expect("single-target stream")
            .1
    };
    (target_mac(n), our_mac(n))
}

/// LB counters that moved, keyed `vip:NAME`, `flow:NAME`, `target:STREAM/ID`.
fn lb_moved(before: &LbCounters, after: &LbCounters) -> BTreeMap<String, (u64, u64)> {
    let mut moved = BTreeMap::new();
    let groups = [
        ("vip", &before.vips, &after.vips),
        ("flow", &before.flows, &after.flows),
        ("target", &before.targets, &after.targets),
    ];
    for (kind, b, a) in groups {
        for c in a.iter() {
            let old = b
                .iter()
                .find(|o| o.name == c.name)
                .map_or((0, 0), |o| (o.packets, o.bytes));
            let d = (c.packets - old.0, c.bytes - old.1);
            if d != (0, 0) {
                moved.insert(format!("{kind}:{}", c.name), d);
            }
        }
    }
    moved
}

fn describe(before: &ProgramStats, after: &ProgramStats) -> String {
    let mut moved = Vec::new();
    for &v in Verdict::ALL {
        let (a, b) = (after.verdicts.get(v), before.verdicts.get(v));
        if (a.packets, a.bytes) != (b.packets, b.bytes) {
            moved.push(format!(
                "{}+{}/{}B",
                v.name(),
                a.packets - b.packets,
                a.bytes - b.bytes
            ));
        }
    }
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

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// What one run must give.
struct Expect {
    action: u32,
    /// None: the bytes of a dropped packet do not matter.
    output: Option<Vec<u8>>,
    protocols: Vec<P>,
    drop: Option<D>,
    /// LB counters that move by one packet of `lb_bytes` bytes.
    lb: Vec<String>,
    lb_bytes: u64,
}

fn pass(frame: &[u8], protocols: &[P]) -> Expect {
    Expect {
        action: XDP_PASS,
        output: Some(frame.to_vec()),
        protocols: protocols.to_vec(),
        drop: None,
        lb: vec![],
        lb_bytes: 0,
    }
}

fn drop(frame: &[u8], reason: D, protocols: &[P], lb: &[&str]) -> Expect {
    Expect {
        action: XDP_DROP,
        output: Some(frame.to_vec()),
        protocols: protocols.to_vec(),
        drop: Some(reason),
        lb: strings(lb),
        lb_bytes: frame.len() as u64,
    }
}

/// Redirected to a local target: its MACs, tags gone, one hop less; VIP,
/// flow and target counted.
fn to_local(frame: &[u8], vip: &str, flow: &str, target: &str, protocols: &[P]) -> Expect {
    let (dst, src) = local_macs(target);
    Expect {
        action: XDP_REDIRECT,
        output: Some(forwarded(frame, dst, src)),
        protocols: protocols.to_vec(),
        drop: None,
        lb: vec![
            format!("vip:{vip}"),
            format!("flow:{flow}"),
            format!("target:{target}"),
        ],
        lb_bytes: frame.len() as u64,
    }
}

fn assert_all(failures: Vec<String>, cases: usize) {
    assert!(
        failures.is_empty(),
        "{} failures in {cases} cases:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------
// Reference of the kernel's flow hash (murmur3-style, the same on every node)

fn mix(h: u32, k: u32) -> u32 {
    let k = k
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

/// `src`, `dst` as 16 bytes (IPv4 mapped); `ports` only when they are hashed.
fn flow_hash(src: [u8; 16], dst: [u8; 16], ports: Option<(u16, u16)>, protocol: u8) -> u32 {
    let mut h = 0x7461_706du32;
    // The BPF target is little-endian: words are read in native order.
    let w = |a: &[u8; 16], i: usize| {
        u32::from_le_bytes([a[4 * i], a[4 * i + 1], a[4 * i + 2], a[4 * i + 3]])
    };
    for i in 0..4 {
        h = mix(h, w(&src, i));
        h = mix(h, w(&dst, i));
    }
    if let Some((sport, dport)) = ports {
        h = mix(h, (u32::from(sport) << 16) | u32::from(dport));
    }
    h = mix(h, u32::from(protocol));
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

fn m4(a: Ipv4Addr) -> [u8; 16] {
    a.to_ipv6_mapped().octets()
}

// ---------------------------------------------------------------------------
// Tests

#[test]
fn vip_miss_passes_unchanged() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut lab = Lab::new();
    let v4 = eth(&udp4(CLIENT, V4_B, 1000, 80, b"not for a VIP"));
    let v6 = eth(&udp6(CLIENT6, V6_B, 1000, 80, b"not for a VIP"));
    // Next to a VIP, and in another family than an equal-looking VIP.
    let next_door = eth(&tcp4(CLIENT, Ipv4Addr::new(20, 0, 0, 2), 1000, 80));
    let tagged = eth_tagged(&[7], &udp4(CLIENT, V4_B, 1000, 80, b"x"));
    let cases = [
        (
            "ipv4 udp to a non-VIP",
            v4.clone(),
            pass(&v4, &[P::Ipv4, P::Udp]),
        ),
        (
            "ipv6 udp to a non-VIP",
            v6.clone(),
            pass(&v6, &[P::Ipv6, P::Udp]),
        ),
        (
            "tcp to the address next to a VIP",
            next_door.clone(),
            pass(&next_door, &[P::Ipv4, P::Tcp]),
        ),
        (
            "tagged udp to a non-VIP",
            tagged.clone(),
            pass(&tagged, &[P::VlanTagged, P::Ipv4, P::Udp]),
        ),
    ];
    let mut failures = Vec::new();
    for (name, frame, want) in &cases {
        failures.extend(lab.check(name, frame, want));
    }
    assert_all(failures, cases.len());
}

/// Metadata a frame brings with it (a veth peer's XDP program can send
/// some) is dropped before anything else: only the uplink's own mark for a
/// tapped port may reach its TC ingress, which redirects what it names.
#[test]
fn metadata_a_frame_brings_is_dropped() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut lab = Lab::new();
    let miss = eth(&udp4(CLIENT, V4_B, 1000, 80, b"not for a VIP"));
    let hit = eth(&udp4(CLIENT, VIP4, 40000, 1500, b"hello"));
    // A mark as the detour's would look: a key, an interface index, zeroes.
    let meta: Vec<u8> = [0x746d_6474, 0x1234_5678, 3, 0]
        .iter()
        .flat_map(|w: &u32| w.to_ne_bytes())
        .collect();
    let run = lab.bpf.run_with_meta(UPLINK, &meta, &miss);
    assert_eq!(
        (run.action, &run.output),
        (XDP_PASS, &miss),
        "{}",
        hex(&run.output)
    );
    let plain = lab.bpf.run(UPLINK, &hit, 1);
    let run = lab.bpf.run_with_meta(UPLINK, &meta[..4], &hit);
    assert_eq!((run.action, &run.output), (XDP_REDIRECT, &plain.output));
}

#[test]
fn vip_hit_local_target_rewrites_macs_and_redirects() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut lab = Lab::new();
    let plain = eth(&udp4(CLIENT, VIP4, 40000, 1500, b"hello"));
    let tagged = eth_tagged(&[100], &udp4(CLIENT, VIP4, 40000, 1500, b"hello"));
    let qinq = eth_tagged(&[100, 200], &udp4(CLIENT, VIP4, 40000, 1500, b"hello"));
    let mut failures = Vec::new();
    let udp = [P::Ipv4, P::Udp];
    let tagged_udp = [P::VlanTagged, P::Ipv4, P::Udp];
    let cases = [
        (
            "untagged",
            &plain,
            to_local(&plain, "vip4", "dst-range", "s-dst/1", &udp),
        ),
        (
            "802.1q tagged",
            &tagged,
            to_local(&tagged, "vip4", "dst-range", "s-dst/1", &tagged_udp),
        ),
        (
            "qinq tagged",
            &qinq,
            to_local(&qinq, "vip4", "dst-range", "s-dst/1", &tagged_udp),
        ),
    ];
    for (name, frame, want) in &cases {
        failures.extend(lab.check(name, frame, want));
    }
    // Spelled out once: exactly the frame with the target's MACs, tag gone,
    // one hop less.
    let run = lab.bpf.run(UPLINK, &tagged, 1);
    assert_eq!(
        run.output.len(),
        tagged.len() - 4,
        "the 802.1Q tag is removed"
    );
    assert_eq!(run.output[..6], target_mac(6));
    assert_eq!(run.output[6..12], our_mac(6));
    assert_eq!(run.output[12..14], [0x08, 0x00]);
    // The IP packet one hop on: TTL 63, its header checksum made anew.
    let mut ip = tagged[18..].to_vec();
    ip[8] = 63;
    ip[10..12].fill(0);
    let sum = tapmesh_tests::frames::internet_checksum(&[&ip[..20]]);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    assert_eq!(run.output[14..], ip);
    assert_eq!(
        lab.bpf.run(UPLINK, &qinq, 1).output.len(),
        qinq.len() - 8,
        "both tags are removed"
    );
    assert_all(failures, cases.len());
}

/// A local target gets the packet as a router forwards it: one hop less
/// (IPv4: the header checksum follows), none left is dropped and the target
/// not counted. So a neighbour advertisement sent to a VIP with hop limit
/// 255 reaches the target with 254, which neighbour discovery ignores.
#[test]
fn a_local_target_gets_the_packet_one_hop_on_and_none_left_is_dropped() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut lab = Lab::new();
    let with_ttl = |ttl: u8| {
        let mut ip = udp4(CLIENT, VIP4, 40000, 1500, b"hop");
        ip[8] = ttl;
        ip[10..12].fill(0);
        let sum = tapmesh_tests::frames::internet_checksum(&[&ip[..20]]);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        ip
    };
    let (dst, src) = local_macs("s-dst/1");
    let mut failures = Vec::new();
    for (sent, arrived) in [(255u8, 254u8), (64, 63), (2, 1)] {
        let frame = eth(&with_ttl(sent));
        // Spelled out: the same packet with the arriving TTL, its checksum anew.
        let want_ip = with_ttl(arrived);
        let want = to_local(&frame, "vip4", "dst-range", "s-dst/1", &[P::Ipv4, P::Udp]);
        assert_eq!(want.output, Some(ethernet(dst, src, &[], 0x0800, &want_ip)));
        failures.extend(lab.check(&format!("ttl {sent}"), &frame, &want));
    }
    for sent in [1u8, 0] {
        let frame = eth(&with_ttl(sent));
        let want = drop(
            &frame,
            D::TtlExceeded,
            &[P::Ipv4, P::Udp],
            &["vip:vip4", "flow:dst-range"],
        );
        failures.extend(lab.check(&format!("ttl {sent}"), &frame, &want));
    }

    // IPv6, the three-target stream: the hop limit, nothing else.
    let with_hops = |hops: u8| {
        let mut ip = udp6(CLIENT6, VIP6, 40000, 53, b"hop");
        ip[7] = hops;
        ip
    };
    let target = lab.reference_target(
        "s-multi",
        flow_hash(CLIENT6.octets(), VIP6.octets(), Some((40000, 53)), UDP),
    );
    let (dst, src) = local_macs(&target);
    let frame = eth(&with_hops(255));
    let run = lab.bpf.run(UPLINK, &frame, 1);
    assert_eq!(run.action, XDP_REDIRECT);
    assert_eq!(run.output, ethernet(dst, src, &[], 0x86dd, &with_hops(254)));
    let frame = eth(&with_hops(1));
    let want = drop(
        &frame,
        D::TtlExceeded,
        &[P::Ipv6, P::Udp],
        &["vip:vip6", "flow:spread"],
    );
    failures.extend(lab.check("hop limit 1", &frame, &want));
    assert_all(failures, 7);
}

#[test]
fn flows_select_their_stream() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut lab = Lab::new();
    let net10 = Ipv4Addr::new(10, 1, 2, 3);
    let net10_edge = Ipv4Addr::new(10, 1, 255, 255);
    let outside = Ipv4Addr::new(10, 2, 0, 1);
    let udp = [P::Ipv4, P::Udp];
    let tcp = [P::Ipv4, P::Tcp];
    let sctp = [P::Ipv4, P::Sctp];
    // (case, frame, flow, target, protocols)
    type Hit<'a> = (&'a str, Vec<u8>, &'a str, &'a str, &'a [P]);
    let hits: Vec<Hit> = vec![
        // Priority: port 80 is in both prio-hi (60) and prio-lo (50, 80-90).
        (
            "priority: tcp 80 takes the higher flow",
            eth(&tcp4(CLIENT, VIP4, 40000, 80)),
            "prio-hi",
            "s-hi/1",
            &tcp,
        ),
        (
            "priority: tcp 81 only in the lower flow",
            eth(&tcp4(CLIENT, VIP4, 40000, 81)),
            "prio-lo",
            "s-lo/1",
            &tcp,
        ),
        (
            "priority: tcp 90, top of the lower flow",
            eth(&tcp4(CLIENT, VIP4, 40000, 90)),
            "prio-lo",
            "s-lo/1",
            &tcp,
        ),
        // Source CIDR 10.1.0.0/16 (priority 70) beats prio-hi for port 80.
        (
            "source cidr: 10.1.2.3 to tcp 80",
            eth(&tcp4(net10, VIP4, 40000, 80)),
            "src-cidr",
            "s-cidr/1",
            &tcp,
        ),
        (
            "source cidr: 10.1.255.255 to tcp 22",
            eth(&tcp4(net10_edge, VIP4, 40000, 22)),
            "src-cidr",
            "s-cidr/1",
            &tcp,
        ),
        (
            "source cidr: 10.2.0.1 to tcp 80 is outside",
            eth(&tcp4(outside, VIP4, 40000, 80)),
            "prio-hi",
            "s-hi/1",
            &tcp,
        ),
        // Destination port range 1000-1999, edges.
        (
            "dst range: udp 1000",
            eth(&udp4(CLIENT, VIP4, 1, 1000, b"x")),
            "dst-range",
            "s-dst/1",
            &udp,
        ),
        (
            "dst range: udp 1999",
            eth(&udp4(CLIENT, VIP4, 1, 1999, b"x")),
            "dst-range",
            "s-dst/1",
            &udp,
        ),
        // Source port range 5000-5099, edges; dst-range (40) beats src-range (30).
        (
            "src range: udp from 5000",
            eth(&udp4(CLIENT, VIP4, 5000, 3000, b"x")),
            "src-range",
            "s-src/1",
            &udp,
        ),
        (
            "src range: udp from 5099",
            eth(&udp4(CLIENT, VIP4, 5099, 3000, b"x")),
            "src-range",
            "s-src/1",
            &udp,
        ),
        (
            "src and dst range: the dst flow is higher",
            eth(&udp4(CLIENT, VIP4, 5050, 1500, b"x")),
            "dst-range",
            "s-dst/1",
            &udp,
        ),
        // Protocol restriction: sctp to port 80 is not tcp's prio-hi.
        (
            "protocol: sctp to 80",
            eth(&sctp4(CLIENT, VIP4, 40000, 80)),
            "sctp-only",
            "s-sctp/1",
            &sctp,
        ),
        (
            "protocol: icmp echo",
            eth(&ipv4(CLIENT, VIP4, ICMP, &[], &icmp_echo(1, 1, b"ping"))),
            "icmp",
            "s-icmp/1",
            &[P::Ipv4, P::Icmp],
        ),
        // Byte match udp[8:4] = 0xcafebabe (the first payload bytes); else the next flow for port 2000.
        (
            "byte match: cafebabe",
            eth(&udp4(
                CLIENT,
                VIP4,
                40000,
                2000,
                &[0xca, 0xfe, 0xba, 0xbe, 1, 2],
            )),
            "bytes",
            "s-bytes/1",
            &udp,
        ),
        (
            "byte match: cafebabe, nothing after",
            eth(&udp4(CLIENT, VIP4, 40000, 2000, &[0xca, 0xfe, 0xba, 0xbe])),
            "bytes",
            "s-bytes/1",
            &udp,
        ),
        (
            "byte match: deadbeef falls through",
            eth(&udp4(CLIENT, VIP4, 40000, 2000, &[0xde, 0xad, 0xbe, 0xef])),
            "udp-2000",
            "s-udp2000/1",
            &udp,
        ),
        (
            "byte match: cafeba, payload too short",
            eth(&udp4(CLIENT, VIP4, 40000, 2000, &[0xca, 0xfe, 0xba])),
            "udp-2000",
            "s-udp2000/1",
            &udp,
        ),
        (
            "byte match: cafebabe one byte later",
            eth(&udp4(
                CLIENT,
                VIP4,
                40000,
                2000,
                &[0, 0xca, 0xfe, 0xba, 0xbe],
            )),
            "udp-2000",
            "s-udp2000/1",
            &udp,
        ),
    ];
    let mut failures = Vec::new();
    let count = hits.len();
    for (name, frame, flow, target, protocols) in hits {
        failures.extend(lab.check(
            name,
            &frame,
            &to_local(&frame, "vip4", flow, target, protocols),
        ));
    }
    assert_all(failures, count);
}

#[test]
fn no_flow_and_no_target_drop() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut lab = Lab::new();
    let udp = [P::Ipv4, P::Udp];
    let tcp = [P::Ipv4, P::Tcp];
    // (case, frame, reason, protocols, LB counters)
    type Miss<'a> = (&'a str, Vec<u8>, D, &'a [P], &'a [&'a str]);
    let cases: Vec<Miss> = vec![
        (
            "udp 999: below the dst range",
            eth(&udp4(CLIENT, VIP4, 1, 999, b"x")),
            D::NoFlowMatch,
            &udp,
            &["vip:vip4"],
        ),
        (
            "udp 2001 from 4999: outside both ranges",
            eth(&udp4(CLIENT, VIP4, 4999, 2001, b"x")),
            D::NoFlowMatch,
            &udp,
            &["vip:vip4"],
        ),
        (
            "udp from 5100: above the src range",
            eth(&udp4(CLIENT, VIP4, 5100, 3000, b"x")),
            D::NoFlowMatch,
            &udp,
            &["vip:vip4"],
        ),
        (
            "tcp 91 from outside 10.1/16",
            eth(&tcp4(CLIENT, VIP4, 40000, 91)),
            D::NoFlowMatch,
            &tcp,
            &["vip:vip4"],
        ),
        (
            "udp to 80: tcp-only flows",
            eth(&udp4(CLIENT, VIP4, 40000, 80, b"x")),
            D::NoFlowMatch,
            &udp,
            &["vip:vip4"],
        ),
        (
            "gre: no flow for other protocols",
            eth(&ipv4(CLIENT, VIP4, 47, &[], &[0; 8])),
            D::NoFlowMatch,
            &[P::Ipv4, P::OtherL4],
            &["vip:vip4"],
        ),
        (
            "stream without targets",
            eth(&udp4(CLIENT, VIP_EMPTY, 40000, 80, b"x")),
            D::NoTarget,
            &udp,
            &["vip:vip-empty", "flow:to-empty"],
        ),
        (
            "stream without targets, tcp",
            eth(&tcp4(CLIENT, VIP_EMPTY, 40000, 443)),
            D::NoTarget,
            &tcp,
            &["vip:vip-empty", "flow:to-empty"],
        ),
    ];
    let mut failures = Vec::new();
    let count = cases.len();
    for (name, frame, reason, protocols, lb) in cases {
        failures.extend(lab.check(name, &frame, &drop(&frame, reason, protocols, lb)));
    }
    assert_all(failures, count);
}

#[test]
fn maglev_pick_is_deterministic_and_spread() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut lab = Lab::new();
    let before = lab.counters();
    let mut per_target: BTreeMap<String, u64> = BTreeMap::new();
    let mut mismatches = Vec::new();
    let frames = 600u16;
    for sport in 10_000..10_000 + frames {
        let frame = eth(&udp4(CLIENT, VIP_MULTI, sport, 80, b"spread me"));
        let first = lab.local_target(&frame);
        for _ in 0..2 {
            assert_eq!(
                lab.local_target(&frame),
                first,
                "the same frame went elsewhere (sport {sport})"
            );
        }
        let reference = lab.reference_target(
            "s-multi",
            flow_hash(m4(CLIENT), m4(VIP_MULTI), Some((sport, 80)), UDP),
        );
        if first != reference {
            mismatches.push(format!("sport {sport}: {first}, reference {reference}"));
        }
        *per_target.entry(first).or_default() += 1;
    }
    assert_eq!(per_target.len(), 3, "{per_target:?}");
    for (target, n) in &per_target {
        let share = *n as f64 / f64::from(frames);
        assert!(
            (0.20..=0.47).contains(&share),
            "{target} got {n} of {frames}: {per_target:?}"
        );
    }
    // Each frame ran 3 times; the target counters say the same.
    let moved = lb_moved(&before, &lab.counters());
    for (target, n) in &per_target {
        assert_eq!(
            moved.get(&format!("target:{target}")).map(|c| c.0),
            Some(3 * n),
            "{moved:?}"
        );
    }
    assert_eq!(
        moved.get("flow:spread").map(|c| c.0),
        Some(3 * u64::from(frames))
    );
    assert!(
        mismatches.is_empty(),
        "the pick differs from hash % Maglev table:\n{}",
        mismatches.join("\n")
    );
}

#[test]
fn icmp_errors_follow_their_flow() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut lab = Lab::new();
    let mut seen = BTreeMap::<String, u32>::new();
    let mut failures = Vec::new();
    let clients: Vec<Ipv4Addr> = (1..=40).map(|i| Ipv4Addr::new(198, 18, 7, i)).collect();
    for (i, &client) in clients.iter().enumerate() {
        let cport = 30_000 + 7 * i as u16;
        // UDP: client:cport -> VIP:53; the error is about VIP:53 -> client:cport.
        let flow = eth(&udp4(client, VIP_MULTI, cport, 53, b"query"));
        let reply = udp4(
            VIP_MULTI,
            client,
            53,
            cport,
            b"a reply too big for the path",
        );
        let error = eth(&icmp4_frag_needed(ROUTER, VIP_MULTI, &reply));
        let want = lab.local_target(&flow);
        let got = lab.local_target(&error);
        if got != want {
            failures.push(format!(
                "udp {client}:{cport}: flow -> {want}, icmp error -> {got}"
            ));
        }
        // TCP the same way.
        let flow = eth(&tcp4(client, VIP_MULTI, cport, 443));
        let error = eth(&icmp4_frag_needed(
            ROUTER,
            VIP_MULTI,
            &tcp4(VIP_MULTI, client, 443, cport),
        ));
        let (want_tcp, got_tcp) = (lab.local_target(&flow), lab.local_target(&error));
        if got_tcp != want_tcp {
            failures.push(format!(
                "tcp {client}:{cport}: flow -> {want_tcp}, icmp error -> {got_tcp}"
            ));
        }
        *seen.entry(want).or_default() += 1;
        // IPv6: ICMPv6 packet too big.
        let client6 = Ipv6Addr::new(0x2001, 0xdb8, 7, 0, 0, 0, 0, 0x100 + i as u16);
        let flow = eth(&udp6(client6, VIP6, cport, 53, b"query"));
        let error = eth(&icmp6_too_big(
            ROUTER6,
            VIP6,
            &udp6(VIP6, client6, 53, cport, b"a reply too big"),
        ));
        let (want6, got6) = (lab.local_target(&flow), lab.local_target(&error));
        if got6 != want6 {
            failures.push(format!(
                "udp [{client6}]:{cport}: flow -> {want6}, icmpv6 error -> {got6}"
            ));
        }
    }
    assert!(
        seen.len() >= 2,
        "the flows all went to one target, so the test proves little: {seen:?}"
    );

    // Counted once, exactly: an ICMP error counts as its flow's VIP, flow and target.
    let client = clients[0];
    let flow = eth(&udp4(client, VIP_MULTI, 30_000, 53, b"query"));
    let target = lab.local_target(&flow);
    let error = eth(&icmp4_frag_needed(
        ROUTER,
        VIP_MULTI,
        &udp4(VIP_MULTI, client, 53, 30_000, b"reply"),
    ));
    failures.extend(lab.check(
        "icmp frag needed",
        &error,
        &to_local(&error, "vip-multi", "spread", &target, &[P::Ipv4, P::Icmp]),
    ));
    let client6 = Ipv6Addr::new(0x2001, 0xdb8, 7, 0, 0, 0, 0, 0x100);
    let target6 = lab.local_target(&eth(&udp6(client6, VIP6, 30_000, 53, b"query")));
    let error6 = eth(&icmp6_too_big(
        ROUTER6,
        VIP6,
        &udp6(VIP6, client6, 53, 30_000, b"reply"),
    ));
    failures.extend(lab.check(
        "icmpv6 packet too big",
        &error6,
        &to_local(&error6, "vip6", "spread", &target6, &[P::Ipv6, P::Icmpv6]),
    ));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn ipv4_fragments_of_a_datagram_stay_together() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut lab = Lab::new();
    let mut seen = BTreeMap::<String, u32>::new();
    let mut failures = Vec::new();
    for i in 1..=40u8 {
        let client = Ipv4Addr::new(198, 18, 8, i);
        let datagram = udp_v4(client, VIP_MULTI, 40_000 + u16::from(i), 4500, &[0x5a; 40]);
        let first = eth(&fragment4(
            client,
            VIP_MULTI,
            UDP,
            0x100 + u16::from(i),
            0,
            true,
            &datagram[..24],
        ));
        let later = eth(&fragment4(
            client,
            VIP_MULTI,
            UDP,
            0x100 + u16::from(i),
            24,
            false,
            &datagram[24..],
        ));
        let (a, b) = (lab.local_target(&first), lab.local_target(&later));
        let reference =
            lab.reference_target("s-multi", flow_hash(m4(client), m4(VIP_MULTI), None, UDP));
        if a != b || a != reference {
            failures.push(format!("{client}: first fragment -> {a}, later fragment -> {b}, address hash -> {reference}"));
        }
        *seen.entry(a).or_default() += 1;
    }
    assert!(
        seen.len() >= 2,
        "every datagram went to one target, so the test proves little: {seen:?}"
    );

    // Counters, exactly.
    let client = Ipv4Addr::new(198, 18, 8, 1);
    let datagram = udp_v4(client, VIP_MULTI, 40_001, 4500, &[0x5a; 40]);
    let first = eth(&fragment4(
        client,
        VIP_MULTI,
        UDP,
        0x101,
        0,
        true,
        &datagram[..24],
    ));
    let later = eth(&fragment4(
        client,
        VIP_MULTI,
        UDP,
        0x101,
        24,
        false,
        &datagram[24..],
    ));
    let target = lab.reference_target("s-multi", flow_hash(m4(client), m4(VIP_MULTI), None, UDP));
    failures.extend(lab.check(
        "first fragment",
        &first,
        &to_local(
            &first,
            "vip-multi",
            "spread",
            &target,
            &[P::Ipv4, P::Fragment, P::Udp],
        ),
    ));
    failures.extend(lab.check(
        "later fragment",
        &later,
        &to_local(
            &later,
            "vip-multi",
            "spread",
            &target,
            &[P::Ipv4, P::Fragment],
        ),
    ));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A fragment carries no ports it can be checked by (a later one none at
/// all), so only flows that restrict no port may take it: the fragments of
/// a datagram to VIP4's port-selected UDP flows are dropped alike (never
/// given to another port's flow), and a TCP datagram from 10.1/16 takes the
/// port-free `src-cidr` flow with both fragments.
#[test]
fn fragments_take_only_flows_without_ports() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut lab = Lab::new();
    let mut failures = Vec::new();
    // The first fragment carries the first 24 bytes (the whole L4 header).
    let fragments = |src, protocol, l4: &[u8]| {
        (
            eth(&fragment4(src, VIP4, protocol, 0x77, 0, true, &l4[..24])),
            eth(&fragment4(src, VIP4, protocol, 0x77, 24, false, &l4[24..])),
        )
    };
    let udp = [P::Ipv4, P::Fragment, P::Udp];
    let later = [P::Ipv4, P::Fragment];
    // (source port, destination port) of datagrams to VIP4's port-selected UDP flows.
    for (sport, dport) in [(40_000, 1500), (5050, 3000), (40_000, 2000)] {
        let datagram = udp_v4(CLIENT, VIP4, sport, dport, &[0x5a; 40]);
        let (first, second) = fragments(CLIENT, UDP, &datagram);
        let name = format!("udp {CLIENT}:{sport} -> {VIP4}:{dport}");
        failures.extend(lab.check(
            &format!("{name}, first fragment"),
            &first,
            &drop(&first, D::NoFlowMatch, &udp, &["vip:vip4"]),
        ));
        failures.extend(lab.check(
            &format!("{name}, later fragment"),
            &second,
            &drop(&second, D::NoFlowMatch, &later, &["vip:vip4"]),
        ));
    }
    let net10 = Ipv4Addr::new(10, 1, 2, 3);
    let mut segment = tcp_v4(net10, VIP4, 40_000, 80, 0);
    segment.extend_from_slice(&[0x5a; 12]);
    let (first, second) = fragments(net10, TCP, &segment);
    failures.extend(lab.check(
        "tcp from 10.1/16, first fragment",
        &first,
        &to_local(
            &first,
            "vip4",
            "src-cidr",
            "s-cidr/1",
            &[P::Ipv4, P::Fragment, P::Tcp],
        ),
    ));
    failures.extend(lab.check(
        "tcp from 10.1/16, later fragment",
        &second,
        &to_local(&second, "vip4", "src-cidr", "s-cidr/1", &later),
    ));
    assert_all(failures, 8);
}

/// IPv4 VIPs sit in the maps as `::ffff:a.b.c.d`; an IPv6 packet to that
/// address is not for them and passes untouched, counted as IPv6 only.
#[test]
fn ipv6_to_an_ipv4_mapped_vip_address_passes() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut lab = Lab::new();
    let mapped = VIP4.to_ipv6_mapped();
    let udp = eth(&udp6(CLIENT6, mapped, 40_000, 1500, b"x"));
    let tcp = eth(&ipv6(
        CLIENT6,
        mapped,
        TCP,
        &[],
        &tcp_v4(CLIENT, VIP4, 40_000, 80, 0),
    ));
    let mut failures = lab.check("udp to ::ffff:VIP4", &udp, &pass(&udp, &[P::Ipv6, P::Udp]));
    failures.extend(lab.check("tcp to ::ffff:VIP4", &tcp, &pass(&tcp, &[P::Ipv6, P::Tcp])));
    assert_all(failures, 2);
}

// ---------------------------------------------------------------------------
// Remote targets and the tunnel

/// The frame a remote target gets: outer Ethernet, IPv4 (DF, TTL 64, valid
/// checksum), UDP (checksum 0) to the tunnel port, then the input's IP packet.
fn encapsulated(frame: &[u8], dst_mac: [u8; 6], src_mac: [u8; 6], sport: u16) -> Vec<u8> {
    tunnel_frame(
        dst_mac,
        src_mac,
        NODE,
        REMOTE_NODE,
        sport,
        TUNNEL_PORT,
        ip_packet(frame),
    )
}

/// Field-by-field checks of an encapsulated output, for readable failures.
fn check_outer(output: &[u8], frame: &[u8], dst_mac: [u8; 6], src_mac: [u8; 6]) {
    let inner = ip_packet(frame);
    assert_eq!(output.len(), 14 + 20 + 8 + inner.len(), "output length");
    assert_eq!(output[0..6], dst_mac, "outer destination MAC");
    assert_eq!(output[6..12], src_mac, "outer source MAC");
    assert_eq!(output[12..14], [0x08, 0x00], "outer ether type");
    let ip = &output[14..34];
    assert_eq!(ip[0], 0x45, "version/IHL");
    assert_eq!(
        u16::from_be_bytes([ip[2], ip[3]]) as usize,
        28 + inner.len(),
        "total length"
    );
    assert_eq!(ip[6] & 0x40, 0x40, "DF");
    assert_eq!(
        u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff,
        0,
        "not a fragment"
    );
    assert_eq!(ip[8], 64, "TTL");
    assert_eq!(ip[9], UDP, "protocol");
    assert_eq!(
        internet_checksum(&[ip]),
        0,
        "the outer IPv4 header checksum is not valid: {}",
        hex(ip)
    );
    assert_eq!(ip[12..16], NODE.octets(), "outer source");
    assert_eq!(ip[16..20], REMOTE_NODE.octets(), "outer destination");
    let udp = &output[34..42];
    let sport = u16::from_be_bytes([udp[0], udp[1]]);
    assert!(
        (0xc000..=0xffff).contains(&sport),
        "UDP source port {sport:#x}"
    );
    assert_eq!(
        u16::from_be_bytes([udp[2], udp[3]]),
        TUNNEL_PORT,
        "UDP destination port"
    );
    assert_eq!(
        u16::from_be_bytes([udp[4], udp[5]]) as usize,
        8 + inner.len(),
        "UDP length"
    );
    assert_eq!(udp[6..8], [0, 0], "UDP checksum");
    assert_eq!(output[42..], *inner, "inner packet");
}

fn remote_expect(frame: &[u8], action: u32, output: Vec<u8>, protocols: &[P], vip: &str) -> Expect {
    Expect {
        action,
        output: Some(output),
        protocols: protocols.to_vec(),
        drop: None,
        lb: vec![
            format!("vip:{vip}"),
            "flow:to-remote".into(),
            "target:s-remote/1".into(),
        ],
        lb_bytes: frame.len() as u64,
    }
}

#[test]
fn remote_target_is_encapsulated_to_its_node() {
    if !kernel_tests_enabled() {
        return;
    }
    let underlay = Underlay::new(true);
    let mut lab = Lab::new();
    let udp = eth(&udp4(CLIENT, VIP_REMOTE, 40000, 80, b"to another node"));
    let tagged = eth_tagged(&[100], &tcp4(CLIENT, VIP_REMOTE, 40001, 443));
    let v6 = eth(&udp6(CLIENT6, VIP6_REMOTE, 40002, 53, b"v6 inside v4"));
    let sport = |h: u32| 0xc000 | (h as u16 & 0x3fff);
    let cases = [
        (
            "ipv4 udp",
            &udp,
            sport(flow_hash(
                m4(CLIENT),
                m4(VIP_REMOTE),
                Some((40000, 80)),
                UDP,
            )),
            vec![P::Ipv4, P::Udp],
            "vip-remote",
        ),
        (
            "802.1q tagged ipv4 tcp",
            &tagged,
            sport(flow_hash(
                m4(CLIENT),
                m4(VIP_REMOTE),
                Some((40001, 443)),
                TCP,
            )),
            vec![P::VlanTagged, P::Ipv4, P::Tcp],
            "vip-remote",
        ),
        (
            "ipv6 udp",
            &v6,
            sport(flow_hash(
                CLIENT6.octets(),
                VIP6_REMOTE.octets(),
                Some((40002, 53)),
                UDP,
            )),
            vec![P::Ipv6, P::Udp],
            "vip6-remote",
        ),
    ];
    let mac = underlay.mac;
    let failures = underlay.run(|| {
        // Field by field first (readable), then the whole frame and the counters.
        let run = lab.bpf.run(UPLINK, &udp, 1);
        assert!(
            matches!(run.action, XDP_REDIRECT | XDP_TX),
            "action {}: {}",
            run.action,
            hex(&run.output)
        );
        check_outer(&run.output, &udp, REMOTE_MAC, mac);
        let action = run.action;
        let mut failures = Vec::new();
        for (name, frame, sport, protocols, vip) in &cases {
            let want = remote_expect(
                frame,
                action,
                encapsulated(frame, REMOTE_MAC, mac, *sport),
                protocols,
                vip,
            );
            failures.extend(lab.check(name, frame, &want));
        }
        failures
    });
    assert_all(failures, cases.len());
}

#[test]
fn remote_target_without_neighbour_is_dropped_and_counted() {
    if !kernel_tests_enabled() {
        return;
    }
    let underlay = Underlay::new(false);
    let mut lab = Lab::new();
    let frame = eth(&udp4(CLIENT, VIP_REMOTE, 40000, 80, b"to another node"));
    // Passing an encapsulated packet with our own source to the kernel gets it
    // dropped as a martian, so XDP drops it itself; the daemon keeps remote
    // nodes' neighbours resolved with managed entries.
    let mut want = remote_expect(
        &frame,
        XDP_DROP,
        Vec::new(),
        &[P::Ipv4, P::Udp],
        "vip-remote",
    );
    want.output = None;
    want.drop = Some(D::NoNeighbour);
    let failures = underlay.run(|| lab.check("no neighbour", &frame, &want));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn tunnel_packets_are_decapsulated() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut lab = Lab::new();
    let mut failures = Vec::new();

    // Inner packet for a VIP with a local target: Ethernet + inner packet, the target's MACs.
    let inner = udp4(CLIENT, VIP4, 40000, 1500, b"through the tunnel");
    let outer = tunnel(REMOTE_NODE, NODE, TUNNEL_PORT, &inner);
    let (dst, src) = local_macs("s-dst/1");
    // Forwarded: one TTL less (64 → 63), its header checksum made anew.
    let mut forwarded = inner.clone();
    forwarded[8] = 63;
    forwarded[10..12].fill(0);
    let sum = tapmesh_tests::frames::internet_checksum(&[&forwarded[..20]]);
    forwarded[10..12].copy_from_slice(&sum.to_be_bytes());
    let want = Expect {
        action: XDP_REDIRECT,
        output: Some(ethernet(dst, src, &[], 0x0800, &forwarded)),
        protocols: vec![P::Ipv4, P::Udp],
        drop: None,
        lb: strings(&["vip:vip4", "flow:dst-range", "target:s-dst/1"]),
        lb_bytes: (14 + inner.len()) as u64,
    };
    failures.extend(lab.check("inner ipv4 to a local target", &outer, &want));
    // A TTL of 1 has no hop left: dropped, nothing changed.
    let mut last_hop = inner.clone();
    last_hop[8] = 1;
    last_hop[10..12].fill(0);
    let sum = tapmesh_tests::frames::internet_checksum(&[&last_hop[..20]]);
    last_hop[10..12].copy_from_slice(&sum.to_be_bytes());
    let outer_last = tunnel(REMOTE_NODE, NODE, TUNNEL_PORT, &last_hop);
    let want = Expect {
        action: XDP_DROP,
        output: Some(outer_last.clone()),
        protocols: vec![],
        drop: Some(D::TtlExceeded),
        lb: vec![],
        lb_bytes: 0,
    };
    failures.extend(lab.check("inner ipv4 with ttl 1", &outer_last, &want));

    // IPv6 inside: the three-target stream, the target the hash picks.
    let inner6 = udp6(CLIENT6, VIP6, 40000, 53, b"v6 through the tunnel");
    let outer6 = tunnel(REMOTE_NODE, NODE, TUNNEL_PORT, &inner6);
    let target = lab.reference_target(
        "s-multi",
        flow_hash(CLIENT6.octets(), VIP6.octets(), Some((40000, 53)), UDP),
    );
    let (dst, src) = local_macs(&target);
    // Forwarded: one hop less (64 → 63), nothing else changed.
    let mut forwarded6 = inner6.clone();
    forwarded6[7] = 63;
    let want = Expect {
        action: XDP_REDIRECT,
        output: Some(ethernet(dst, src, &[], 0x86dd, &forwarded6)),
        protocols: vec![P::Ipv6, P::Udp],
        drop: None,
        lb: vec![
            "vip:vip6".into(),
            "flow:spread".into(),
            format!("target:{target}"),
        ],
        lb_bytes: (14 + inner6.len()) as u64,
    };
    failures.extend(lab.check("inner ipv6 to a local target", &outer6, &want));

    // Inner packet for a VIP whose target is remote: not sent around again.
    let inner = udp4(CLIENT, VIP_REMOTE, 40000, 80, b"bounced");
    let outer = tunnel(REMOTE_NODE, NODE, TUNNEL_PORT, &inner);
    let want = Expect {
        action: XDP_DROP,
        output: None,
        protocols: vec![P::Ipv4, P::Udp],
        drop: Some(D::TargetNotLocal),
        lb: strings(&["vip:vip-remote", "flow:to-remote"]),
        lb_bytes: (14 + inner.len()) as u64,
    };
    failures.extend(lab.check("inner packet for a remote target", &outer, &want));

    // Inner version nibble 5.
    let mut bad = udp4(CLIENT, VIP4, 40000, 1500, b"x");
    bad[0] = 0x55;
    let outer = tunnel(REMOTE_NODE, NODE, TUNNEL_PORT, &bad);
    let want = Expect {
        action: XDP_DROP,
        output: Some(outer.clone()),
        protocols: vec![],
        drop: Some(D::BadTunnelPacket),
        lb: vec![],
        lb_bytes: 0,
    };
    failures.extend(lab.check("inner version 5", &outer, &want));

    // The tunnel port, but not our address: not for us, untouched.
    let inner = udp4(CLIENT, VIP4, 40000, 1500, b"not ours");
    let other = tunnel(
        REMOTE_NODE,
        Ipv4Addr::new(198, 18, 5, 9),
        TUNNEL_PORT,
        &inner,
    );
    failures.extend(lab.check(
        "tunnel port, another address",
        &other,
        &pass(&other, &[P::Ipv4, P::Udp]),
    ));
    // Our address, another port: not the tunnel either.
    let other_port = tunnel(REMOTE_NODE, NODE, TUNNEL_PORT + 1, &inner);
    failures.extend(lab.check(
        "our address, another port",
        &other_port,
        &pass(&other_port, &[P::Ipv4, P::Udp]),
    ));
    assert_all(failures, 7);
}
