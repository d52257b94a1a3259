//! Compiles a VIP's flows into tables searched with a fixed number of lookups.
//!
//! Flows get bit positions by (priority desc, name asc): bit 0 is the best flow.
//! A packet's candidate set is the AND of four masks (protocol class, destination
//! port LPM, source port LPM, source address LPM); the winner is the lowest set
//! bit whose byte matches pass.

use std::collections::HashMap;

use crate::net::Prefix;

use super::spec::{
    check_flow_count, ByteMatch, Flow, FlowError, FlowSet, PortRange, ProtoClass, Vip,
};

/// Per-bit flow data the classifier needs after the mask lookups.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompiledFlow {
    pub name: String,
    pub stream: String,
    pub priority: u32,
    /// ANDed; checked only when this bit is a candidate.
    pub byte_matches: Vec<ByteMatch>,
}

/// A disjoint elementary port interval `lo..=hi` and the flows whose ranges contain it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortInterval {
    pub lo: u16,
    pub hi: u16,
    pub mask: u64,
}

/// An aligned port prefix: ports whose top `len` bits equal those of `port` (0..=16).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortPrefix {
    pub port: u16,
    pub len: u8,
    pub mask: u64,
}

/// Port table: intervals cover 0..=65535 exactly once (adjacent masks differ);
/// `prefixes` are the intervals split into aligned prefixes, so each port is
/// inside exactly one prefix (an LPM lookup then returns exactly one entry).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortTable {
    pub intervals: Vec<PortInterval>,
    pub prefixes: Vec<PortPrefix>,
    index: HashMap<(u8, u16), u64>,
}

impl PortTable {
    /// LPM lookup over `prefixes` (what the kernel trie does).
    pub fn lookup(&self, port: u16) -> u64 {
        (0..=16u8)
            .rev()
            .find_map(|len| self.index.get(&(len, port & port_netmask(len))).copied())
            .unwrap_or(0)
    }
}

/// Source address entry for an LPM trie over the 16-byte space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceEntry {
    pub prefix: Prefix,
    pub mask: u64,
}

/// Source table: every entry's mask includes the flows of every shorter entry that
/// contains it; entry `::/0` always exists (mask of unrestricted flows).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceTable {
    /// Sorted by (len, addr); the first entry is the /0 default.
    pub entries: Vec<SourceEntry>,
    index: HashMap<Prefix, u64>,
}

impl SourceTable {
    /// LPM lookup over `entries` (what the kernel trie does).
    pub fn lookup(&self, addr: &[u8; 16]) -> u64 {
        (0..=128u8)
            .rev()
            .find_map(|len| self.index.get(&Prefix::new(*addr, len).network()).copied())
            .unwrap_or(0)
    }
}

/// One VIP's compiled tables; `flows[i]` is bit `i` of every mask.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompiledVip {
    pub name: String,
    pub prefix: Prefix,
    pub v6: bool,
    pub flows: Vec<CompiledFlow>,
    /// Indexed by `ProtoClass as usize` (tcp, udp, sctp, icmp, other).
    pub protocol_masks: [u64; ProtoClass::COUNT],
    pub dst_ports: PortTable,
    pub src_ports: PortTable,
    pub sources: SourceTable,
}

/// What the classifier sees of a packet.
#[derive(Clone, Copy, Debug)]
pub struct PacketView<'a> {
    /// IP protocol number (6, 17, 132, 1, 58, ...).
    pub protocol: u8,
    /// Source address; IPv4 as `::ffff:a.b.c.d`.
    pub src: [u8; 16],
    pub src_port: u16,
    pub dst_port: u16,
    /// Bytes from the start of the L4 header.
    pub l4: &'a [u8],
}

impl CompiledVip {
    /// AND of the four table lookups: the flows matching everything but byte matches.
    pub fn candidates(&self, p: &PacketView) -> u64 {
        let class = ProtoClass::of(p.protocol, self.v6);
        // Port-less protocols look up port 0; port-restricted flows are tcp/udp/sctp
        // only, so the protocol mask already excludes them.
        let (sp, dp) = if class.has_ports() {
            (p.src_port, p.dst_port)
        } else {
            (0, 0)
        };
        self.protocol_masks[class as usize]
            & self.dst_ports.lookup(dp)
            & self.src_ports.lookup(sp)
            & self.sources.lookup(&p.src)
    }

    /// Reference classifier: first candidate (by priority) whose byte matches pass.
    pub fn classify(&self, p: &PacketView) -> Option<&CompiledFlow> {
        let class = ProtoClass::of(p.protocol, self.v6);
        let mut m = self.candidates(p);
        while m != 0 {
            let flow = self.flows.get(m.trailing_zeros() as usize)?;
            if flow.byte_matches.iter().all(|b| b.matches(class, p.l4)) {
                return Some(flow);
            }
            m &= m - 1;
        }
        None
    }
}

/// Compiles every VIP of `set` (in `set.vips` order).
pub fn compile(set: &FlowSet) -> Result<Vec<CompiledVip>, FlowError> {
    set.vips
        .iter()
        .map(|vip| compile_vip(vip, set.flows_of(&vip.name).collect()))
        .collect()
}

/// Compiles one VIP from the flows that reference it.
pub fn compile_vip(vip: &Vip, mut flows: Vec<&Flow>) -> Result<CompiledVip, FlowError> {
    check_flow_count(&vip.name, flows.len())?;
    // Priority desc, then name asc: deterministic bit order.
    flows.sort_by(|a, b| {
        b.priority
            .cmp(&a.priority)
            .then_with(|| a.name.cmp(&b.name))
    });
    let bit = |i: usize| 1u64 << i;

    let mut protocol_masks = [0u64; ProtoClass::COUNT];
    for (i, f) in flows.iter().enumerate() {
        for (c, m) in protocol_masks.iter_mut().enumerate() {
            if f.protocols.is_empty() || f.protocols.iter().any(|p| p.class() as usize == c) {
                *m |= bit(i);
            }
        }
    }

    Ok(CompiledVip {
        name: vip.name.clone(),
        prefix: vip.prefix,
        v6: vip.v6,
        flows: flows
            .iter()
            .map(|f| CompiledFlow {
                name: f.name.clone(),
                stream: f.stream.clone(),
                priority: f.priority,
                byte_matches: f.byte_matches.clone(),
            })
            .collect(),
        protocol_masks,
        dst_ports: port_table(&flows, |f| &f.dst_ports),
        src_ports: port_table(&flows, |f| &f.src_ports),
        sources: source_table(&flows),
    })
}

fn port_netmask(len: u8) -> u16 {
    match len {
        0 => 0,
        l => u16::MAX << (16 - u32::from(l.min(16))),
    }
}

fn port_table(flows: &[&Flow], ranges: fn(&Flow) -> &[PortRange]) -> PortTable {
    // Cut points: every range start and every end + 1.
    let mut cuts: Vec<u32> = vec![0];
    for f in flows {
        for r in ranges(f) {
            cuts.extend([u32::from(r.lo), u32::from(r.hi) + 1]);
        }
    }
    cuts.retain(|&c| c <= 0xffff);
    cuts.sort_unstable();
    cuts.dedup();

    let mut intervals: Vec<PortInterval> = Vec::new();
    for (i, &lo) in cuts.iter().enumerate() {
        let hi = cuts.get(i + 1).map_or(0xffff, |next| next - 1);
        // Both are <= 0xffff by construction.
        let (lo, hi) = (lo as u16, hi as u16);
        let mask = flows.iter().enumerate().fold(0u64, |m, (b, f)| {
            let r = ranges(f);
            if r.is_empty() || r.iter().any(|r| r.contains(lo)) {
                m | 1 << b
            } else {
                m
            }
        });
        match intervals.last_mut() {
            Some(last) if last.mask == mask => last.hi = hi,
            _ => intervals.push(PortInterval { lo, hi, mask }),
        }
    }

    let prefixes: Vec<PortPrefix> = intervals
        .iter()
        .flat_map(|iv| {
            range_prefixes(iv.lo, iv.hi)
                .into_iter()
                .map(move |(port, len)| PortPrefix {
                    port,
                    len,
                    mask: iv.mask,
                })
        })
        .collect();
    let index = prefixes.iter().map(|p| ((p.len, p.port), p.mask)).collect();
    PortTable {
        intervals,
        prefixes,
        index,
    }
}

/// Minimal aligned prefixes (port, len) covering exactly `lo..=hi`.
fn range_prefixes(lo: u16, hi: u16) -> Vec<(u16, u8)> {
    let (mut start, hi) = (u32::from(lo), u32::from(hi));
    let mut out = Vec::new();
    while start <= hi {
        // Largest aligned block at `start` that stays within `hi`.
        let mut size: u32 = if start == 0 {
            1 << 16
        } else {
            1 << start.trailing_zeros().min(16)
        };
        while start + size - 1 > hi {
            size >>= 1;
        }
        out.push((start as u16, (16 - size.trailing_zeros()) as u8));
        start += size;
    }
    out
}

fn source_table(flows: &[&Flow]) -> SourceTable {
    let default = Prefix::new([0; 16], 0);
    let mut prefixes: Vec<Prefix> = flows
        .iter()
        .flat_map(|f| f.source_subnets.iter().copied())
        .chain([default])
        .collect();
    prefixes.sort_by_key(|p| (p.len, p.addr));
    prefixes.dedup();

    let entries: Vec<SourceEntry> = prefixes
        .into_iter()
        .map(|prefix| {
            let mask = flows.iter().enumerate().fold(0u64, |m, (b, f)| {
                let s = &f.source_subnets;
                if s.is_empty() || s.iter().any(|q| q.covers(&prefix)) {
                    m | 1 << b
                } else {
                    m
                }
            });
            SourceEntry { prefix, mask }
        })
        .collect();
    let index = entries.iter().map(|e| (e.prefix, e.mask)).collect();
    SourceTable { entries, index }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lb::flows::spec::{FlowSpec, VipSpec};
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    fn spec(name: &str, prio: i32) -> FlowSpec {
        FlowSpec {
            name: name.into(),
            priority: prio,
            stream: format!("st-{name}"),
            vips: s(&["v4"]),
            ..Default::default()
        }
    }

    fn build(flows: &[FlowSpec]) -> CompiledVip {
        let vips = [
            VipSpec {
                name: "v4".into(),
                address: "20.0.0.1".into(),
            },
            VipSpec {
                name: "v6".into(),
                address: "2001:db8::1".into(),
            },
        ];
        let set = FlowSet::parse(&vips, flows).unwrap();
        compile(&set).unwrap().remove(0)
    }

    fn v4(a: &str) -> [u8; 16] {
        a.parse::<Ipv4Addr>().unwrap().to_ipv6_mapped().octets()
    }

    fn pkt(protocol: u8, src: [u8; 16], src_port: u16, dst_port: u16, l4: &[u8]) -> PacketView<'_> {
        PacketView {
            protocol,
            src,
            src_port,
            dst_port,
            l4,
        }
    }

    fn name(vip: &CompiledVip, p: &PacketView) -> Option<String> {
        vip.classify(p).map(|f| f.name.clone())
    }

    #[test]
    fn priority_and_ties() {
        let mut low = spec("low", 1);
        low.protocols = s(&["tcp"]);
        let mut b = spec("b-high", 5);
        b.protocols = s(&["tcp"]);
        b.destination_port_ranges = s(&["80-90"]);
        let mut a = spec("a-high", 5);
        a.protocols = s(&["tcp"]);
        a.destination_port_ranges = s(&["85"]);
        let vip = build(&[low, b, a]);
        let names: Vec<_> = vip.flows.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["a-high", "b-high", "low"]);
        assert_eq!(vip.flows[0].stream, "st-a-high");
        let src = v4("1.2.3.4");
        assert_eq!(
            name(&vip, &pkt(6, src, 1, 85, &[])).as_deref(),
            Some("a-high"),
            "tie -> name asc"
        );
        assert_eq!(
            name(&vip, &pkt(6, src, 1, 80, &[])).as_deref(),
            Some("b-high")
        );
        assert_eq!(name(&vip, &pkt(6, src, 1, 91, &[])).as_deref(), Some("low"));
        assert_eq!(name(&vip, &pkt(17, src, 1, 85, &[])), None);
        assert_eq!(vip.protocol_masks, [0b111, 0, 0, 0, 0]);
    }

    #[test]
    fn protocol_masks_and_icmp() {
        let mut icmp = spec("icmp", 3);
        icmp.protocols = s(&["icmp"]);
        let any = spec("any", 1);
        let mut us = spec("udp-sctp", 2);
        us.protocols = s(&["udp", "sctp"]);
        us.source_port_ranges = s(&["0"]);
        let vip = build(&[icmp, any, us]);
        // Bits: icmp=0, udp-sctp=1, any=2.
        assert_eq!(vip.protocol_masks, [0b100, 0b110, 0b110, 0b101, 0b100]);
        let src = v4("9.9.9.9");
        assert_eq!(name(&vip, &pkt(1, src, 7, 7, &[])).as_deref(), Some("icmp"));
        assert_eq!(
            name(&vip, &pkt(58, src, 0, 0, &[])).as_deref(),
            Some("any"),
            "ICMPv6 on a v4 VIP is other"
        );
        assert_eq!(
            name(&vip, &pkt(17, src, 0, 9, &[])).as_deref(),
            Some("udp-sctp")
        );
        assert_eq!(name(&vip, &pkt(17, src, 1, 9, &[])).as_deref(), Some("any"));
        assert_eq!(name(&vip, &pkt(47, src, 0, 0, &[])).as_deref(), Some("any"));
    }

    fn check_port_table(t: &PortTable) {
        let mut next = 0u32;
        for (i, iv) in t.intervals.iter().enumerate() {
            assert_eq!(u32::from(iv.lo), next, "disjoint and gapless");
            assert!(iv.lo <= iv.hi);
            if i > 0 {
                assert_ne!(
                    t.intervals[i - 1].mask,
                    iv.mask,
                    "adjacent equal masks are merged"
                );
            }
            next = u32::from(iv.hi) + 1;
        }
        assert_eq!(next, 0x10000, "covers 0..=65535");
        // Expand the prefixes: each is aligned and lies inside one interval with its
        // mask, and every port is covered exactly once, so each interval's prefixes
        // expand to exactly that interval.
        let mut seen = vec![0u8; 0x10000];
        for p in &t.prefixes {
            let (start, size) = (usize::from(p.port), 1usize << (16 - p.len));
            assert_eq!(start % size, 0, "aligned: {p:?}");
            let iv = t
                .intervals
                .iter()
                .find(|iv| iv.lo <= p.port && p.port <= iv.hi)
                .unwrap();
            assert!(
                start + size - 1 <= usize::from(iv.hi),
                "{p:?} leaves {iv:?}"
            );
            assert_eq!(p.mask, iv.mask);
            for x in &mut seen[start..start + size] {
                *x += 1;
            }
        }
        assert!(
            seen.iter().all(|&c| c == 1),
            "every port in exactly one prefix"
        );
        for iv in &t.intervals {
            for port in [iv.lo, iv.hi, iv.lo + (iv.hi - iv.lo) / 2] {
                assert_eq!(t.lookup(port), iv.mask);
            }
        }
    }

    #[test]
    fn port_tables() {
        let mut a = spec("a", 3);
        a.protocols = s(&["tcp"]);
        a.destination_port_ranges = s(&["80", "1000-2000", "65535"]);
        let mut b = spec("b", 2);
        b.protocols = s(&["tcp"]);
        b.destination_port_ranges = s(&["0-80", "1500-3000"]);
        let c = spec("c", 1);
        let vip = build(&[a, b, c]);
        let iv: Vec<_> = vip
            .dst_ports
            .intervals
            .iter()
            .map(|i| (i.lo, i.hi, i.mask))
            .collect();
        assert_eq!(
            iv,
            [
                (0, 79, 0b110),
                (80, 80, 0b111),
                (81, 999, 0b100),
                (1000, 1499, 0b101),
                (1500, 2000, 0b111),
                (2001, 3000, 0b110),
                (3001, 65534, 0b100),
                (65535, 65535, 0b101),
            ]
        );
        check_port_table(&vip.dst_ports);
        assert_eq!(
            vip.src_ports.intervals,
            [PortInterval {
                lo: 0,
                hi: 0xffff,
                mask: 0b111
            }]
        );
        assert_eq!(
            vip.src_ports.prefixes,
            [PortPrefix {
                port: 0,
                len: 0,
                mask: 0b111
            }]
        );
        // 81..=999 = 81/16 82/15 84/14 88/13 96/11 128/9 256/8 512/8 768/9 896/10 960/11 992/13.
        let p: Vec<_> = vip
            .dst_ports
            .prefixes
            .iter()
            .filter(|p| p.mask == 0b100)
            .map(|p| (p.port, p.len))
            .take(12)
            .collect();
        assert_eq!(
            p,
            [
                (81, 16),
                (82, 15),
                (84, 14),
                (88, 13),
                (96, 11),
                (128, 9),
                (256, 8),
                (512, 8),
                (768, 9),
                (896, 10),
                (960, 11),
                (992, 13)
            ]
        );
    }

    #[test]
    fn range_prefix_decomposition() {
        assert_eq!(range_prefixes(0, 65535), [(0, 0)]);
        assert_eq!(range_prefixes(5, 5), [(5, 16)]);
        assert_eq!(range_prefixes(65535, 65535), [(65535, 16)]);
        assert_eq!(range_prefixes(1, 65535).len(), 16);
        assert_eq!(range_prefixes(1024, 2047), [(1024, 6)]);
        let mut rng = Rng(7);
        for _ in 0..300 {
            let (a, b) = (rng.below(0x10000) as u16, rng.below(0x10000) as u16);
            let (lo, hi) = (a.min(b), a.max(b));
            let mut ports: Vec<u32> = range_prefixes(lo, hi)
                .iter()
                .flat_map(|&(p, l)| u32::from(p)..u32::from(p) + (1 << (16 - l)))
                .collect();
            ports.sort_unstable();
            assert_eq!(ports, (u32::from(lo)..=u32::from(hi)).collect::<Vec<_>>());
            assert!(
                range_prefixes(lo, hi).len() <= 30,
                "minimal: at most 2*16-2"
            );
        }
    }

    #[test]
    fn sources_longest_prefix() {
        let mut a = spec("a", 4);
        a.source_subnets = s(&["10.0.0.0/8"]);
        let mut b = spec("b", 3);
        b.source_subnets = s(&["10.1.0.0/16"]);
        let c = spec("c", 1);
        let mut d = spec("d", 2);
        d.source_subnets = s(&["10.1.2.0/24", "2001::/32"]);
        let mut e = spec("e", 0);
        e.source_subnets = s(&["::/0", "10.9.0.0/16"]);
        let vip = build(&[a, b, c, d, e]);
        // Bits: a=0 b=1 d=2 c=3 e=4.
        let entries: Vec<_> = vip
            .sources
            .entries
            .iter()
            .map(|e| (e.prefix, e.mask))
            .collect();
        let p = |c: &str| c.parse::<Prefix>().unwrap().mapped().network();
        assert_eq!(
            entries,
            [
                (p("::/0"), 0b11000),
                (p("2001::/32"), 0b11100),
                (p("10.0.0.0/8"), 0b11001),
                (p("10.1.0.0/16"), 0b11011),
                (p("10.9.0.0/16"), 0b11001),
                (p("10.1.2.0/24"), 0b11111),
            ]
        );
        let l = |a: [u8; 16]| vip.sources.lookup(&a);
        assert_eq!(l(v4("10.1.2.3")), 0b11111);
        assert_eq!(l(v4("10.1.3.3")), 0b11011);
        assert_eq!(l(v4("10.2.0.0")), 0b11001);
        assert_eq!(l(v4("11.0.0.0")), 0b11000, "miss falls to the /0 default");
        assert_eq!(
            l("2001:0:1::5".parse::<Ipv6Addr>().unwrap().octets()),
            0b11100
        );
        assert_eq!(l("2002::".parse::<Ipv6Addr>().unwrap().octets()), 0b11000);
        let src = v4("10.1.3.3");
        assert_eq!(name(&vip, &pkt(6, src, 1, 1, &[])).as_deref(), Some("a"));
        assert_eq!(
            name(&vip, &pkt(6, v4("11.0.0.0"), 1, 1, &[])).as_deref(),
            Some("c")
        );

        // A flow-less VIP still has the default entry.
        let empty = build(&[]);
        assert_eq!(
            empty.sources.entries,
            [SourceEntry {
                prefix: p("::/0"),
                mask: 0
            }]
        );
        assert_eq!(empty.classify(&pkt(6, src, 1, 1, &[])), None);
    }

    #[test]
    fn v4_zero_prefix_restricts_to_v4_space() {
        let mut a = spec("a", 1);
        a.source_subnets = s(&["0.0.0.0/0", "2001::/16"]);
        let vip = build(&[a]);
        assert_eq!(vip.sources.lookup(&v4("1.2.3.4")), 1);
        assert_eq!(
            vip.sources
                .lookup(&"2001::1".parse::<Ipv6Addr>().unwrap().octets()),
            1
        );
        assert_eq!(
            vip.sources
                .lookup(&"3001::1".parse::<Ipv6Addr>().unwrap().octets()),
            0
        );
    }

    fn tcp_header(dst_port: u16) -> Vec<u8> {
        let mut h = vec![0u8; 20];
        h[0..2].copy_from_slice(&40000u16.to_be_bytes());
        h[2..4].copy_from_slice(&dst_port.to_be_bytes());
        h
    }

    #[test]
    fn byte_match_example() {
        for m in ["tcp[2:2] = 5001", "tcp[0:4] & 0x0000ffff = 5001"] {
            let mut f = spec("bm", 1);
            f.byte_matches = s(&[m]);
            let vip = build(&[f]);
            let src = v4("1.1.1.1");
            let (h1, h2) = (tcp_header(5001), tcp_header(5002));
            assert_eq!(
                name(&vip, &pkt(6, src, 40000, 5001, &h1)).as_deref(),
                Some("bm"),
                "{m}"
            );
            assert_eq!(name(&vip, &pkt(6, src, 40000, 5002, &h2)), None, "{m}");
            assert_eq!(
                name(&vip, &pkt(17, src, 40000, 5001, &h1)),
                None,
                "{m}: not tcp"
            );
            assert_eq!(
                name(&vip, &pkt(6, src, 40000, 5001, &h1[..3])),
                None,
                "{m}: short"
            );
        }
    }

    #[test]
    fn byte_match_falls_through_to_next_priority() {
        let mut hi = spec("hi", 9);
        hi.byte_matches = s(&["udp[8:1] = 1", "udp[9:1] & 0xf0 = 0x20"]);
        let lo = spec("lo", 1);
        let vip = build(&[hi, lo]);
        let src = v4("1.1.1.1");
        let mut l4 = [0u8; 10];
        l4[8] = 1;
        l4[9] = 0x2f;
        assert_eq!(vip.candidates(&pkt(17, src, 1, 2, &l4)), 0b11);
        assert_eq!(name(&vip, &pkt(17, src, 1, 2, &l4)).as_deref(), Some("hi"));
        l4[9] = 0x3f;
        assert_eq!(name(&vip, &pkt(17, src, 1, 2, &l4)).as_deref(), Some("lo"));
    }

    #[test]
    fn too_many_flows() {
        let vip = Vip {
            name: "big".into(),
            prefix: Prefix::new([0; 16], 0),
            v6: true,
        };
        let flows: Vec<Flow> = (0..65)
            .map(|i| {
                Flow::parse(&FlowSpec {
                    vips: s(&["big"]),
                    ..spec(&format!("f{i}"), 0)
                })
                .unwrap()
            })
            .collect();
        let set = FlowSet {
            vips: vec![vip.clone()],
            flows,
        };
        let err = compile(&set).unwrap_err();
        assert_eq!(
            err,
            FlowError::TooManyFlows {
                vip: "big".into(),
                count: 65
            }
        );
        assert!(err.to_string().contains("\"big\""), "{err}");
        let ok = compile_vip(&vip, set.flows.iter().take(64).collect()).unwrap();
        assert_eq!(ok.flows.len(), 64);
        assert_eq!(ok.protocol_masks[0], u64::MAX);
    }

    // ---- randomized comparison with a brute-force linear classifier ----

    struct Rng(u64);

    impl Rng {
        // splitmix64
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn chance(&mut self, pct: u64) -> bool {
            self.below(100) < pct
        }
        fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
            &v[self.below(v.len() as u64) as usize]
        }
    }

    const PORTS: [u16; 10] = [0, 1, 53, 79, 80, 443, 1000, 3000, 65534, 65535];
    const V4_BASES: [[u8; 4]; 4] = [
        [10, 0, 0, 0],
        [10, 1, 0, 0],
        [10, 1, 2, 0],
        [192, 168, 0, 0],
    ];
    const V6_BASES: [&str; 3] = ["2001:db8::", "2001:db8:1::", "fd00::"];

    fn rand_port(r: &mut Rng) -> u16 {
        let p = *r.pick(&PORTS);
        match r.below(4) {
            0 => r.below(0x10000) as u16,
            1 => p.wrapping_add(1),
            2 => p.wrapping_sub(1),
            _ => p,
        }
    }

    fn rand_ranges(r: &mut Rng) -> Vec<String> {
        (0..1 + r.below(3))
            .map(|_| {
                let lo = rand_port(r);
                let hi = if r.chance(30) {
                    lo
                } else {
                    lo.saturating_add(r.below(2000) as u16)
                };
                match r.below(10) {
                    0 => "any".to_string(),
                    1 => lo.to_string(),
                    _ => format!("{lo}-{hi}"),
                }
            })
            .collect()
    }

    fn rand_v4(r: &mut Rng) -> [u8; 16] {
        let base = u32::from_be_bytes(*r.pick(&V4_BASES));
        let bits = r.below(33) as u32;
        let noise = if bits == 0 {
            0
        } else {
            (r.next() as u32) >> (32 - bits)
        };
        Ipv4Addr::from(base ^ noise).to_ipv6_mapped().octets()
    }

    fn rand_v6(r: &mut Rng) -> [u8; 16] {
        let base = u128::from_be_bytes(r.pick(&V6_BASES).parse::<Ipv6Addr>().unwrap().octets());
        let bits = r.below(129) as u32;
        let noise = if bits == 0 {
            0
        } else {
            (u128::from(r.next()) << 64 | u128::from(r.next())) >> (128 - bits)
        };
        (base ^ noise).to_be_bytes()
    }

    fn rand_cidr(r: &mut Rng) -> String {
        match r.below(12) {
            0 => "0.0.0.0/0".into(),
            1 => "::/0".into(),
            2..=6 => {
                let a = rand_v4(r);
                format!(
                    "{}/{}",
                    Ipv4Addr::new(a[12], a[13], a[14], a[15]),
                    r.below(33)
                )
            }
            _ => format!("{}/{}", Ipv6Addr::from(rand_v6(r)), r.below(129)),
        }
    }

    fn rand_flow(r: &mut Rng, i: usize) -> FlowSpec {
        let mut f = spec(&format!("f{}-{i}", r.below(100)), r.below(5) as i32);
        f.vips = match r.below(3) {
            0 => s(&["v4"]),
            1 => s(&["v6"]),
            _ => s(&["v4", "v6"]),
        };
        if r.chance(70) {
            for p in ["tcp", "udp", "sctp", "icmp"] {
                if r.chance(40) {
                    f.protocols.push(p.into());
                }
            }
        }
        let portful = !f.protocols.is_empty() && !f.protocols.iter().any(|p| p == "icmp");
        if portful && r.chance(60) {
            f.destination_port_ranges = rand_ranges(r);
        }
        if portful && r.chance(40) {
            f.source_port_ranges = rand_ranges(r);
        }
        if r.chance(60) {
            f.source_subnets = (0..1 + r.below(3)).map(|_| rand_cidr(r)).collect();
        }
        // On a protocol the flow takes (one that can match at all).
        let takes: Vec<&str> = ["tcp", "udp", "sctp"]
            .into_iter()
            .filter(|p| f.protocols.is_empty() || f.protocols.iter().any(|q| q == p))
            .collect();
        if !takes.is_empty() && r.chance(25) {
            let proto = r.pick(&takes);
            let (off, v) = (r.below(8), r.below(4));
            f.byte_matches.push(format!("{proto}[{off}:1] & 0x3 = {v}"));
        }
        f
    }

    /// Linear reference: sort by (priority desc, name asc), first flow matching every field.
    fn brute<'a>(flows: &'a [Flow], vip: &str, v6: bool, p: &PacketView) -> Option<&'a str> {
        let mut fl: Vec<&Flow> = flows
            .iter()
            .filter(|f| f.vips.iter().any(|v| v == vip))
            .collect();
        fl.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.name.cmp(&b.name)));
        let icmp = if v6 { 58 } else { 1 };
        let proto_num = |p: &crate::lb::flows::spec::Protocol| match p {
            crate::lb::flows::spec::Protocol::Tcp => 6,
            crate::lb::flows::spec::Protocol::Udp => 17,
            crate::lb::flows::spec::Protocol::Sctp => 132,
            crate::lb::flows::spec::Protocol::Icmp => icmp,
        };
        let src = u128::from_be_bytes(p.src);
        let in_prefix = |q: &Prefix| {
            let shift = 128 - u32::from(q.len);
            shift == 128 || (src >> shift) == (u128::from_be_bytes(q.octets()) >> shift)
        };
        let in_ports = |rs: &[PortRange], port: u16| {
            rs.is_empty() || rs.iter().any(|r| r.lo <= port && port <= r.hi)
        };
        let bm_ok = |b: &ByteMatch| {
            let o = usize::from(b.offset);
            let n = usize::from(b.nbytes);
            proto_num(&b.protocol) == p.protocol
                && o + n <= p.l4.len()
                && p.l4[o..o + n]
                    .iter()
                    .fold(0u32, |w, &x| w << 8 | u32::from(x))
                    & b.mask
                    == b.value
        };
        fl.into_iter()
            .find(|f| {
                (f.protocols.is_empty() || f.protocols.iter().any(|x| proto_num(x) == p.protocol))
                    && (f.source_subnets.is_empty() || f.source_subnets.iter().any(in_prefix))
                    && in_ports(&f.dst_ports, p.dst_port)
                    && in_ports(&f.src_ports, p.src_port)
                    && f.byte_matches.iter().all(bm_ok)
            })
            .map(|f| f.name.as_str())
    }

    #[test]
    fn randomized_against_brute_force() {
        let mut r = Rng(0x5eed_f10e);
        let vips = [
            VipSpec {
                name: "v4".into(),
                address: "20.0.0.1".into(),
            },
            VipSpec {
                name: "v6".into(),
                address: "2001:db8::1".into(),
            },
        ];
        let (mut hits, mut misses, mut bm_hits) = (0, 0, 0);
        for _ in 0..20 {
            let n = 1 + r.below(20) as usize;
            let specs: Vec<FlowSpec> = (0..n).map(|i| rand_flow(&mut r, i)).collect();
            let set = FlowSet::parse(&vips, &specs).unwrap();
            for vip in compile(&set).unwrap() {
                check_port_table(&vip.dst_ports);
                check_port_table(&vip.src_ports);
                assert_eq!(vip.sources.entries[0].prefix.len, 0);
                for _ in 0..2000 {
                    let proto = *r.pick(&[6u8, 17, 132, 1, 58, 47]);
                    let src = if vip.v6 != r.chance(10) {
                        rand_v6(&mut r)
                    } else {
                        rand_v4(&mut r)
                    };
                    let l4: Vec<u8> = (0..r.below(12)).map(|_| r.below(4) as u8).collect();
                    let p = pkt(proto, src, rand_port(&mut r), rand_port(&mut r), &l4);
                    let got = vip.classify(&p);
                    let want = brute(&set.flows, &vip.name, vip.v6, &p);
                    assert_eq!(
                        got.map(|f| f.name.as_str()),
                        want,
                        "vip {} packet {p:?}",
                        vip.name
                    );
                    match got {
                        Some(f) if !f.byte_matches.is_empty() => bm_hits += 1,
                        Some(_) => hits += 1,
                        None => misses += 1,
                    }
                }
            }
        }
        // Not vacuous: all outcomes occur often.
        assert!(
            hits > 5000 && misses > 5000 && bm_hits > 100,
            "{hits} {misses} {bm_hits}"
        );
    }
}
