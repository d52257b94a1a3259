//! A reference of what `tm_xdp_uplink` must do with a frame, written from
//! the documented rules (ARCHITECTURE: packet paths, VIP load balancing,
//! the node tunnel) rather than from the kernel code: the parser's drop
//! reasons, tunnel decapsulation for known nodes, the VIP lookup of the
//! packet's own family, [`CompiledVip`]'s flow classification (the
//! userspace reference), the flow hash and the stream's Maglev table.
//! The packet fuzzer compares the kernel with it.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use tapmesh::lb::{
    flows::{CompiledFlow, CompiledVip, PacketView, ProtoClass},
    model::{ValidLb, ValidVia},
};
use tapmesh_common::{DropReason as D, Protocol as P};

use crate::frames::{rewritten, tunnel_frame};

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_REDIRECT: u32 = 4;

/// Candidate flows tried before `too_many_candidates`.
pub const MAX_CANDIDATES: usize = 4;

/// The node around the load balancer.
pub struct Node {
    pub lb: ValidLb,
    pub node_addr: Ipv4Addr,
    pub tunnel_port: u16,
    /// Nodes allowed to send into the tunnel.
    pub peers: BTreeSet<Ipv4Addr>,
    /// Local targets' (ifindex, our MAC) by interface name.
    pub interfaces: BTreeMap<String, (u32, [u8; 6])>,
    /// The resolved hop of remote nodes: (ifindex, destination MAC, source
    /// MAC, the egress interface's MTU).
    pub hops: BTreeMap<Ipv4Addr, (u32, [u8; 6], [u8; 6], u32)>,
}

/// What the program must do with one frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub action: u32,
    pub drop: Option<D>,
    /// The frame after the program (None for a drop: its bytes do not matter).
    pub output: Option<Vec<u8>>,
    pub protocols: Vec<P>,
    /// LB counters that move by one packet: `vip:NAME`, `flow:NAME`, `target:STREAM/ID`.
    pub lb: Vec<String>,
    /// Bytes the LB counters count (the frame as it reached the load balancer).
    pub lb_bytes: u64,
}

impl Outcome {
    fn drop(reason: D) -> Self {
        Outcome {
            action: XDP_DROP,
            drop: Some(reason),
            output: None,
            protocols: vec![],
            lb: vec![],
            lb_bytes: 0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L3 {
    None,
    V4,
    V6,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fragment {
    None,
    First,
    Later,
}

/// What the parser makes of a frame.
#[derive(Clone, Copy, Debug)]
pub struct Parsed {
    pub vlans: u8,
    pub l3: L3,
    pub l3_offset: usize,
    pub l3_end: usize,
    pub fragment: Fragment,
    pub protocol: u8,
    pub has_l4: bool,
    pub l4_offset: usize,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub src_port: u16,
    pub dst_port: u16,
    pub icmp_type: u8,
}

/// Forwarded one hop on, or not at all: the hop limit, or the TTL and the
/// checksum as the kernel's `ip_decrease_ttl` has it (the IP header at `at`).
fn one_hop_less(frame: &mut [u8], at: usize, v4: bool) -> Result<(), D> {
    let hops = at + if v4 { 8 } else { 7 };
    if frame[hops] <= 1 {
        return Err(D::TtlExceeded);
    }
    frame[hops] -= 1;
    if v4 {
        let sum = u32::from(u16::from_be_bytes([frame[at + 10], frame[at + 11]])) + 0x0100;
        let sum = (sum + u32::from(sum >= 0xffff)) as u16;
        frame[at + 10..at + 12].copy_from_slice(&sum.to_be_bytes());
    }
    Ok(())
}

fn be16(f: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([f[at], f[at + 1]])
}

fn mapped(f: &[u8], at: usize) -> [u8; 16] {
    Ipv4Addr::new(f[at], f[at + 1], f[at + 2], f[at + 3])
        .to_ipv6_mapped()
        .octets()
}

fn v6(f: &[u8], at: usize) -> [u8; 16] {
    f[at..at + 16].try_into().expect("16 bytes")
}

/// The parser's rules: a header cut short or contradicting itself is its
/// drop reason; anything not understood parses as far as it can.
pub fn parse(f: &[u8]) -> Result<Parsed, D> {
    let len = f.len();
    if len < 14 {
        return Err(D::TruncatedEthernet);
    }
    let mut p = Parsed {
        vlans: 0,
        l3: L3::None,
        l3_offset: 14,
        l3_end: 0,
        fragment: Fragment::None,
        protocol: 0,
        has_l4: false,
        l4_offset: 0,
        src: [0; 16],
        dst: [0; 16],
        src_port: 0,
        dst_port: 0,
        icmp_type: 0,
    };
    let mut ether_type = be16(f, 12);
    // Two tags at most (QinQ).
    while p.vlans < 2 && matches!(ether_type, 0x8100 | 0x88a8 | 0x9100) {
        if p.l3_offset + 4 > len {
            return Err(D::TruncatedVlan);
        }
        ether_type = be16(f, p.l3_offset + 2);
        p.l3_offset += 4;
        p.vlans += 1;
    }
    let at = p.l3_offset;
    match ether_type {
        0x0800 => {
            if at + 20 > len {
                return Err(D::TruncatedIpv4);
            }
            if f[at] >> 4 != 4 {
                return Err(D::BadIpv4Version);
            }
            let header = usize::from(f[at] & 0x0f) * 4;
            if header < 20 {
                return Err(D::BadIpv4HeaderLength);
            }
            let total = usize::from(be16(f, at + 2));
            if total < header {
                return Err(D::BadIpv4TotalLength);
            }
            if at + total > len {
                return Err(D::TruncatedIpv4);
            }
            let frag = be16(f, at + 6);
            p.fragment = if frag & 0x1fff != 0 {
                Fragment::Later
            } else if frag & 0x2000 != 0 {
                Fragment::First
            } else {
                Fragment::None
            };
            p.l3 = L3::V4;
            p.l3_end = at + total;
            p.protocol = f[at + 9];
            p.l4_offset = at + header;
            p.src = mapped(f, at + 12);
            p.dst = mapped(f, at + 16);
        }
        0x86dd => parse_ipv6(f, &mut p)?,
        _ => return Ok(p),
    }
    if p.fragment != Fragment::Later {
        parse_l4(f, &mut p)?;
    }
    Ok(p)
}

fn is_extension(next: u8) -> bool {
    matches!(next, 0 | 43 | 60 | 51 | 44)
}

fn parse_ipv6(f: &[u8], p: &mut Parsed) -> Result<(), D> {
    let (len, at) = (f.len(), p.l3_offset);
    if at + 40 > len {
        return Err(D::TruncatedIpv6);
    }
    if f[at] >> 4 != 6 {
        return Err(D::BadIpv6Version);
    }
    let end = at + 40 + usize::from(be16(f, at + 4));
    if end > len {
        return Err(D::TruncatedIpv6);
    }
    p.l3 = L3::V6;
    p.l3_end = end;
    p.src = v6(f, at + 8);
    p.dst = v6(f, at + 24);
    let mut next = f[at + 6];
    let mut at = at + 40;
    // Six extension headers at most; a header that does not start inside the
    // packet ends the walk.
    for _ in 0..6 {
        if at + 2 > end || !is_extension(next) {
            break;
        }
        let need = if next == 44 { 8 } else { 2 };
        if at + need > len {
            return Err(D::TruncatedIpv6Extension);
        }
        let this = next;
        next = f[at];
        match this {
            44 => {
                let flags = be16(f, at + 2);
                p.fragment = if flags & 0xfff8 != 0 {
                    Fragment::Later
                } else if flags & 1 != 0 {
                    Fragment::First
                } else {
                    Fragment::None
                };
                at += 8;
                if p.fragment == Fragment::Later {
                    break;
                }
            }
            51 => at += (usize::from(f[at + 1]) + 2) * 4,
            _ => at += (usize::from(f[at + 1]) + 1) * 8,
        }
    }
    if at > end {
        return Err(D::TruncatedIpv6Extension);
    }
    if is_extension(next) && p.fragment != Fragment::Later {
        return Err(if at + 2 > end {
            D::TruncatedIpv6Extension
        } else {
            D::TooManyIpv6Extensions
        });
    }
    p.protocol = next;
    p.l4_offset = at;
    Ok(())
}

fn parse_l4(f: &[u8], p: &mut Parsed) -> Result<(), D> {
    let at = p.l4_offset;
    match (p.protocol, p.l3) {
        (6, _) => {
            if at + 20 > f.len() {
                return Err(D::TruncatedTcp);
            }
            let header = usize::from(f[at + 12] >> 4) * 4;
            if header < 20 {
                return Err(D::BadTcpHeaderLength);
            }
            if at + header > p.l3_end {
                return Err(D::TruncatedTcp);
            }
        }
        (17, _) => {
            if at + 8 > p.l3_end {
                return Err(D::TruncatedUdp);
            }
            let udp_len = usize::from(be16(f, at + 4));
            // A first fragment's UDP length counts the whole datagram.
            if udp_len < 8 || (p.fragment == Fragment::None && at + udp_len > p.l3_end) {
                return Err(D::BadUdpLength);
            }
        }
        (132, _) => {
            if at + 12 > p.l3_end {
                return Err(D::TruncatedSctp);
            }
        }
        (1, L3::V4) | (58, L3::V6) => {
            if at + 8 > p.l3_end {
                return Err(D::TruncatedIcmp);
            }
            p.icmp_type = f[at];
            p.has_l4 = true;
            return Ok(());
        }
        _ => return Ok(()),
    }
    p.src_port = be16(f, at);
    p.dst_port = be16(f, at + 2);
    p.has_l4 = true;
    Ok(())
}

/// The protocol counters a parsed packet moves.
pub fn protocols(p: &Parsed) -> Vec<P> {
    let mut out = Vec::new();
    if p.vlans != 0 {
        out.push(P::VlanTagged);
    }
    match p.l3 {
        L3::None => {
            out.push(P::NonIp);
            return out;
        }
        L3::V4 => out.push(P::Ipv4),
        L3::V6 => out.push(P::Ipv6),
    }
    if p.fragment != Fragment::None {
        out.push(P::Fragment);
    }
    if !p.has_l4 {
        if p.fragment != Fragment::Later {
            out.push(P::OtherL4);
        }
        return out;
    }
    out.push(match p.protocol {
        6 => P::Tcp,
        17 => P::Udp,
        132 => P::Sctp,
        1 => P::Icmp,
        _ => P::Icmpv6,
    });
    out
}

/// What the load balancer classifies: for an ICMP error, the flow it reports
/// on (its quoted packet, addresses and ports swapped).
#[derive(Clone, Copy, Debug)]
pub struct Tuple {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub src_port: u16,
    pub dst_port: u16,
    pub protocol: u8,
    /// Ports were read (TCP/UDP/SCTP, not a fragment).
    pub ports_known: bool,
    /// An ICMP error's quote: byte matches are not judged on it.
    pub quoted: bool,
    pub l4_offset: usize,
    pub l4_end: usize,
}

fn has_ports(protocol: u8) -> bool {
    matches!(protocol, 6 | 17 | 132)
}

fn icmp_error_tuple(f: &[u8], p: &Parsed) -> Option<Tuple> {
    let error = match p.l3 {
        L3::V4 => p.protocol == 1 && matches!(p.icmp_type, 3 | 11 | 12),
        L3::V6 => p.protocol == 58 && matches!(p.icmp_type, 1..=4),
        L3::None => false,
    };
    if !error || !p.has_l4 {
        return None;
    }
    let inner = p.l4_offset + 8;
    let (src, dst, protocol, l4) = if p.l3 == L3::V4 {
        if inner + 20 > f.len() {
            return None;
        }
        let header = usize::from(f[inner] & 0x0f) * 4;
        if f[inner] >> 4 != 4 || header < 20 {
            return None;
        }
        (
            mapped(f, inner + 12),
            mapped(f, inner + 16),
            f[inner + 9],
            inner + header,
        )
    } else {
        if inner + 40 > f.len() {
            return None;
        }
        (
            v6(f, inner + 8),
            v6(f, inner + 24),
            f[inner + 6],
            inner + 40,
        )
    };
    // Only an error sent to the source of what it quotes (the VIP).
    if src != p.dst {
        return None;
    }
    let ports = (has_ports(protocol) && l4 + 4 <= f.len()).then(|| (be16(f, l4), be16(f, l4 + 2)));
    let (sport, dport) = ports.unwrap_or((0, 0));
    Some(Tuple {
        src: dst,
        dst: src,
        src_port: dport,
        dst_port: sport,
        protocol,
        ports_known: ports.is_some(),
        quoted: true,
        l4_offset: l4,
        l4_end: p.l3_end,
    })
}

pub fn tuple(f: &[u8], p: &Parsed) -> Tuple {
    icmp_error_tuple(f, p).unwrap_or(Tuple {
        src: p.src,
        dst: p.dst,
        src_port: p.src_port,
        dst_port: p.dst_port,
        protocol: p.protocol,
        ports_known: p.has_l4 && has_ports(p.protocol) && p.fragment == Fragment::None,
        quoted: false,
        l4_offset: p.l4_offset,
        l4_end: p.l3_end,
    })
}

/// Flows that do not restrict a port: what a packet without known ports
/// (a fragment, an ICMP error quoting too little) may take.
fn port_free(vip: &CompiledVip) -> u64 {
    let all =
        |t: &tapmesh::lb::flows::PortTable| t.intervals.iter().fold(u64::MAX, |m, i| m & i.mask);
    all(&vip.dst_ports) & all(&vip.src_ports)
}

/// The flow the classifier picks, or why none: [`CompiledVip::classify`]
/// with the documented limits ([`MAX_CANDIDATES`] candidates; ports
/// unknown: port-free flows only, and no byte match passes; an ICMP
/// error's quote: every byte match passes).
pub fn classify<'a>(vip: &'a CompiledVip, f: &[u8], t: &Tuple) -> Result<&'a CompiledFlow, D> {
    let class = ProtoClass::of(t.protocol, vip.v6);
    let l4 = f.get(t.l4_offset..t.l4_end.min(f.len())).unwrap_or(&[]);
    let view = PacketView {
        protocol: t.protocol,
        src: t.src,
        src_port: t.src_port,
        dst_port: t.dst_port,
        l4,
    };
    let mut mask = if t.ports_known || !class.has_ports() {
        vip.candidates(&view)
    } else {
        vip.protocol_masks[class as usize] & port_free(vip) & vip.sources.lookup(&t.src)
    };
    // An ICMP error's flow is the best by its quoted tuple alone.
    let passes = |flow: &CompiledFlow| {
        t.quoted
            || flow
                .byte_matches
                .iter()
                .all(|b| t.ports_known && b.matches(class, l4))
    };
    for _ in 0..MAX_CANDIDATES {
        if mask == 0 {
            return Err(D::NoFlowMatch);
        }
        let flow = &vip.flows[mask.trailing_zeros() as usize];
        if passes(flow) {
            if t.ports_known && !t.quoted {
                // The userspace reference agrees where it applies.
                assert_eq!(vip.classify(&view).map(|f| &f.name), Some(&flow.name));
            }
            return Ok(flow);
        }
        mask &= mask - 1;
    }
    Err(if mask == 0 {
        D::NoFlowMatch
    } else {
        D::TooManyCandidates
    })
}

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

/// The flow hash (the same on every node): source and destination word by
/// word (little-endian loads), ports when known, protocol, murmur3's finish.
pub fn flow_hash(t: &Tuple) -> u32 {
    let w = |a: &[u8; 16], i: usize| u32::from_le_bytes(a[4 * i..4 * i + 4].try_into().unwrap());
    let mut h = 0x7461_706du32;
    for i in 0..4 {
        h = mix(h, w(&t.src, i));
        h = mix(h, w(&t.dst, i));
    }
    if t.ports_known {
        h = mix(h, (u32::from(t.src_port) << 16) | u32::from(t.dst_port));
    }
    h = mix(h, u32::from(t.protocol));
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

impl Node {
    /// The outcome of `frame` on the uplink.
    pub fn uplink(&self, frame: &[u8]) -> Outcome {
        match self.try_uplink(frame) {
            Ok(o) => o,
            Err((reason, lb, protocols, bytes)) => Outcome {
                protocols,
                lb,
                lb_bytes: bytes,
                ..Outcome::drop(reason)
            },
        }
    }

    #[allow(clippy::type_complexity)]
    fn try_uplink(&self, frame: &[u8]) -> Result<Outcome, (D, Vec<String>, Vec<P>, u64)> {
        let bare = |r: D| (r, vec![], vec![], 0);
        let outer = parse(frame).map_err(bare)?;
        let mut frame = frame.to_vec();
        let mut parsed = outer;
        let tunneled = self.is_tunnel(&outer);
        if tunneled {
            let src = Ipv4Addr::new(outer.src[12], outer.src[13], outer.src[14], outer.src[15]);
            if !self.peers.contains(&src) {
                return Err(bare(D::TunnelUnknownNode));
            }
            // Ethernet (the outer MACs) and everything after the UDP header.
            let inner_at = outer.l4_offset + 8;
            let ether_type: u16 = match frame.get(inner_at).map(|b| b >> 4) {
                Some(4) => 0x0800,
                Some(6) => 0x86dd,
                _ => return Err(bare(D::BadTunnelPacket)),
            };
            // The inner packet's own length must be the UDP payload's.
            let room = usize::from(be16(&frame, outer.l4_offset + 4)).saturating_sub(8);
            let length_at = if ether_type == 0x0800 {
                inner_at + 2
            } else {
                inner_at + 4
            };
            // (The program reads the first 6 bytes, whichever the family.)
            if inner_at + 6 > frame.len() || length_at + 2 > frame.len() {
                return Err(bare(D::BadTunnelPacket));
            }
            let inner_len =
                usize::from(be16(&frame, length_at)) + if ether_type == 0x0800 { 0 } else { 40 };
            if inner_len != room {
                return Err(bare(D::BadTunnelPacket));
            }
            // Nothing may follow the datagram.
            if inner_at + room != frame.len() {
                return Err(bare(D::BadTunnelPacket));
            }
            // The outer IPv4 header's checksum (the header has no options).
            let header = &frame[outer.l3_offset..outer.l3_offset + 20];
            let mut sum: u32 = header.chunks(2).map(|w| u32::from(be16(w, 0))).sum();
            sum = (sum & 0xffff) + (sum >> 16);
            sum = (sum & 0xffff) + (sum >> 16);
            if sum != 0xffff {
                return Err(bare(D::BadTunnelPacket));
            }
            // A martian inner source; the program reads the whole source,
            // however short the inner packet says it is. (This node's own
            // addresses are judged for containers only, not modelled.)
            let v4 = ether_type == 0x0800;
            if inner_at + if v4 { 16 } else { 24 } > frame.len() {
                return Err(bare(D::BadTunnelPacket));
            }
            let forged = if v4 {
                let src = Ipv4Addr::new(
                    frame[inner_at + 12],
                    frame[inner_at + 13],
                    frame[inner_at + 14],
                    frame[inner_at + 15],
                );
                let first = src.octets()[0];
                first == 0 || first == 127 || (224..240).contains(&first) || src.is_broadcast()
            } else {
                let src = Ipv6Addr::from(v6(&frame, inner_at + 8));
                src.is_multicast()
                    || src.segments()[0] & 0xffc0 == 0xfe80
                    || src.is_unspecified()
                    || src.is_loopback()
                    || src.to_ipv4_mapped().is_some()
            };
            if forged {
                return Err(bare(D::TunnelForeignSource));
            }
            one_hop_less(&mut frame, inner_at, v4).map_err(bare)?;
            let mut inner = frame[..12].to_vec();
            inner.extend_from_slice(&ether_type.to_be_bytes());
            inner.extend_from_slice(&frame[inner_at..]);
            frame = inner;
            parsed = parse(&frame).map_err(bare)?;
        }
        let protocols = protocols(&parsed);
        let pass = Outcome {
            action: XDP_PASS,
            drop: None,
            output: Some(frame.clone()),
            protocols: protocols.clone(),
            lb: vec![],
            lb_bytes: 0,
        };
        // Out of the tunnel, only VIPs (and containers, not modelled) take
        // packets: nothing is handed to the stack to route on.
        let miss = |pass: Outcome| match tunneled {
            true => Err((D::TunnelUnknownDestination, vec![], protocols.clone(), 0)),
            false => Ok(pass),
        };
        if parsed.l3 == L3::None {
            return miss(pass);
        }
        let t = tuple(&frame, &parsed);
        // VIPs of the packet's own family (an IPv6 packet to `::ffff:a.b.c.d`
        // is not for an IPv4 VIP); compiled prefixes are in the 16-byte space.
        let dst = IpAddr::V6(Ipv6Addr::from(t.dst));
        let v6 = parsed.l3 == L3::V6;
        let Some(vip) = self
            .lb
            .vips
            .iter()
            .filter(|v| v.v6 == v6 && v.prefix.contains(dst))
            .max_by_key(|v| v.prefix.len)
        else {
            return miss(pass);
        };
        let bytes = frame.len() as u64;
        let mut lb = vec![format!("vip:{}", vip.name)];
        let fail = |r: D, lb: &Vec<String>| (r, lb.clone(), protocols.clone(), bytes);
        let flow = classify(vip, &frame, &t).map_err(|r| fail(r, &lb))?;
        lb.push(format!("flow:{}", flow.name));
        let hash = flow_hash(&t);
        let stream = self
            .lb
            .streams
            .iter()
            .find(|s| s.name == flow.stream)
            .expect("a flow's stream exists");
        let slot = match stream.table.len() {
            0 => None,
            n => Some(stream.table[(hash % n as u32) as usize]),
        };
        let target = slot.and_then(|slot| {
            self.lb
                .targets
                .iter()
                .find(|t| t.stream == stream.name && t.identifier == slot.wrapping_add(1))
        });
        let Some(target) = target else {
            return Err(fail(D::NoTarget, &lb));
        };
        let name = format!("target:{}/{}", target.stream, target.identifier);
        let output = match &target.via {
            ValidVia::Local { interface, mac } => {
                // Forwarded here, unless the tunnel's end did it.
                let mut frame = frame.clone();
                if !tunneled {
                    one_hop_less(&mut frame, parsed.l3_offset, !v6).map_err(|r| fail(r, &lb))?;
                }
                let (_, ours) = self.interfaces[interface];
                rewritten(&frame, *mac, ours)
            }
            ValidVia::Remote { .. } if tunneled => return Err(fail(D::TargetNotLocal, &lb)),
            ValidVia::Remote { node } => {
                let (_, dst_mac, src_mac, mtu) = self.hops[node];
                // The IP packet and whatever trailed it in the frame; the
                // outer lengths count the IP packet.
                let ip = &frame[parsed.l3_offset..parsed.l3_end];
                if mtu != 0 && 28 + ip.len() > mtu as usize {
                    // Counted for the target it was meant for, as a failed
                    // FIB lookup is.
                    let mut lb = lb.clone();
                    lb.push(name);
                    return Err(fail(D::TooBigForTunnel, &lb));
                }
                let mut out = tunnel_frame(
                    dst_mac,
                    src_mac,
                    self.node_addr,
                    *node,
                    0xc000 | (hash as u16 & 0x3fff),
                    self.tunnel_port,
                    ip,
                );
                out.extend_from_slice(&frame[parsed.l3_end..]);
                out
            }
        };
        lb.push(name);
        Ok(Outcome {
            action: XDP_REDIRECT,
            drop: None,
            output: Some(output),
            protocols,
            lb,
            lb_bytes: bytes,
        })
    }

    /// UDP (not a fragment) to this node's address and tunnel port.
    fn is_tunnel(&self, p: &Parsed) -> bool {
        p.l3 == L3::V4
            && p.protocol == 17
            && p.has_l4
            && p.l4_offset == p.l3_offset + 20
            && p.fragment == Fragment::None
            && p.dst_port == self.tunnel_port
            && p.dst[12..] == self.node_addr.octets()
    }
}
