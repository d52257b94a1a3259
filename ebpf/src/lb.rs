//! VIP load balancing on the uplink: classify into a flow, pick the stream's
//! target by Maglev, forward to it (local: MAC rewrite + redirect; remote:
//! inner-IP-in-UDP to its node), and decapsulate tunnel packets for us.

use core::mem::size_of;

use aya_ebpf::{
    bindings::{bpf_fib_lookup as FibParams, xdp_action, xdp_md},
    btf_maps::lpm_trie::Key,
    helpers::generated::{bpf_fib_lookup, bpf_redirect, bpf_xdp_adjust_head, bpf_xdp_load_bytes},
    programs::XdpContext,
};
use tapmesh_common::{
    lb::{
        vip_slot, ByteMatch, FlowEntry, NodeConfig, PortData, PortIntervals, SourceData, Target,
        VipAddr, LOOKUP_DST_PORTS, LOOKUP_SOURCES, LOOKUP_SRC_PORTS, MAX_BYTE_MATCHES,
        MAX_FLOWS_PER_VIP, NO_TARGET, PORT_INTERVALS, PROTO_ICMP, PROTO_OTHER, PROTO_SCTP,
        PROTO_TCP, PROTO_UDP, SLOT_ONE, SLOT_SHARED, TARGET_LOCAL, TARGET_REMOTE,
    },
    DropReason, PacketCounter,
};

use crate::{
    headers::*,
    maps::*,
    packet::Packet,
    parse::{Fragment, Parsed, L3},
};

/// Candidate flows whose byte matches are tried before giving up.
const MAX_CANDIDATES: usize = 4;
/// Byte matches may look this far into the L4 header.
const MAX_MATCH_OFFSET: usize = 512;
/// Outer headers of the tunnel: Ethernet, IPv4, UDP.
const OUTER_LEN: usize = 14 + 20 + 8;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
const BPF_FIB_LKUP_RET_NO_NEIGH: i64 = 7;
const AF_INET: u8 = 2;

/// What the load balancer looks at; for an ICMP error, the flow it reports on
/// (its inner packet with addresses and ports swapped).
struct FlowTuple {
    src: [u8; 16],
    dst: [u8; 16],
    src_port: u16,
    dst_port: u16,
    protocol: u8,
    /// Ports were read (TCP, UDP, SCTP, not a fragment): only then do port
    /// tables, byte matches and the hash use them.
    ports_known: bool,
    l4_offset: usize,
    l4_end: usize,
}

#[inline(always)]
fn has_ports(protocol: u8) -> bool {
    matches!(protocol, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP)
}

#[inline(always)]
fn protocol_class(protocol: u8, l3: L3) -> u8 {
    match (protocol, l3) {
        (IPPROTO_TCP, _) => PROTO_TCP,
        (IPPROTO_UDP, _) => PROTO_UDP,
        (IPPROTO_SCTP, _) => PROTO_SCTP,
        (IPPROTO_ICMP, L3::V4) | (IPPROTO_ICMPV6, L3::V6) => PROTO_ICMP,
        _ => PROTO_OTHER,
    }
}

#[inline(always)]
fn read_ports(pkt: &Packet, at: usize) -> Option<(u16, u16)> {
    let p: *const [u8; 4] = pkt.header(at, DropReason::TruncatedIcmp).ok()?;
    let p = unsafe { *p };
    Some((
        u16::from_be_bytes([p[0], p[1]]),
        u16::from_be_bytes([p[2], p[3]]),
    ))
}

/// The flow an ICMP error is about, from its inner packet, swapped.
#[inline(always)]
fn icmp_error_tuple(pkt: &Packet, parsed: &Parsed) -> Option<FlowTuple> {
    let is_error = match parsed.l3 {
        L3::V4 => parsed.protocol == IPPROTO_ICMP && matches!(parsed.icmp_type, 3 | 11 | 12),
        L3::V6 => parsed.protocol == IPPROTO_ICMPV6 && matches!(parsed.icmp_type, 1..=4),
        L3::None => false,
    };
    if !is_error || !parsed.has_l4 {
        return None;
    }
    let inner = parsed.l4_offset + size_of::<IcmpHdr>();
    let (src, dst, protocol, l4) = match parsed.l3 {
        L3::V4 => {
            let ip: *const Ipv4Hdr = pkt.header(inner, DropReason::TruncatedIcmp).ok()?;
            let ip = unsafe { &*ip };
            let header_len = ((ip.version_ihl & 0x0f) as usize) * 4;
            if ip.version_ihl >> 4 != 4 || header_len < size_of::<Ipv4Hdr>() {
                return None;
            }
            let map = |a: [u8; 4]| {
                [
                    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
                ]
            };
            (map(ip.src), map(ip.dst), ip.protocol, inner + header_len)
        }
        _ => {
            let ip: *const Ipv6Hdr = pkt.header(inner, DropReason::TruncatedIcmp).ok()?;
            let ip = unsafe { &*ip };
            (ip.src, ip.dst, ip.next_header, inner + size_of::<Ipv6Hdr>())
        }
    };
    let ports = if has_ports(protocol) {
        read_ports(pkt, l4)
    } else {
        None
    };
    let (inner_sport, inner_dport) = ports.unwrap_or((0, 0));
    Some(FlowTuple {
        src: dst,
        dst: src,
        src_port: inner_dport,
        dst_port: inner_sport,
        protocol,
        ports_known: ports.is_some(),
        l4_offset: l4,
        l4_end: parsed.l3_end,
    })
}

/// Fragments, first and later alike, are classified without ports and byte
/// matches and hashed without ports, so every fragment of a datagram takes
/// the same flow and target.
#[inline(always)]
fn tuple_of(pkt: &Parsed) -> FlowTuple {
    let ports_known = pkt.has_l4 && has_ports(pkt.protocol) && pkt.fragment == Fragment::None;
    FlowTuple {
        src: pkt.src_addr,
        dst: pkt.dst_addr,
        src_port: pkt.src_port,
        dst_port: pkt.dst_port,
        protocol: pkt.protocol,
        ports_known,
        l4_offset: pkt.l4_offset,
        l4_end: pkt.l3_end,
    }
}

/// Two 16-byte addresses compared as two 8-byte words.
#[inline(always)]
fn same_address(a: &[u8; 16], b: &[u8; 16]) -> bool {
    let word = |x: &[u8; 16], i: usize| {
        u64::from_ne_bytes([
            x[i],
            x[i + 1],
            x[i + 2],
            x[i + 3],
            x[i + 4],
            x[i + 5],
            x[i + 6],
            x[i + 7],
        ])
    };
    word(a, 0) == word(b, 0) && word(a, 8) == word(b, 8)
}

/// Index of the lowest set bit of a non-zero mask.
#[inline(always)]
fn lowest_bit(mask: u64) -> u32 {
    let mut x = mask;
    let mut n = 0;
    if x & 0xffff_ffff == 0 {
        n += 32;
        x >>= 32;
    }
    if x & 0xffff == 0 {
        n += 16;
        x >>= 16;
    }
    if x & 0xff == 0 {
        n += 8;
        x >>= 8;
    }
    if x & 0xf == 0 {
        n += 4;
        x >>= 4;
    }
    if x & 0x3 == 0 {
        n += 2;
        x >>= 2;
    }
    if x & 0x1 == 0 {
        n += 1;
    }
    n
}

/// Copies bytes with the helper: no packet pointers, so few verifier states.
#[inline(always)]
fn byte_match(ctx: &XdpContext, t: &FlowTuple, class: u8, m: &ByteMatch) -> bool {
    let offset = m.offset as usize;
    let len = m.len as usize;
    if !t.ports_known
        || m.protocol != class
        || offset >= MAX_MATCH_OFFSET
        || !matches!(len, 1 | 2 | 4)
    {
        return false;
    }
    let at = t.l4_offset + offset;
    if at + len > t.l4_end {
        return false;
    }
    // Always copy the 4 bytes that end where the field ends (the L4 header
    // sits after at least 20 bytes of IP, so they exist), then keep `len` of them.
    let mut buf = [0u8; 4];
    // SAFETY: `buf` has room for the 4 bytes copied.
    let rc = unsafe {
        bpf_xdp_load_bytes(
            ctx.ctx as *mut xdp_md,
            (at + len - 4) as u32,
            buf.as_mut_ptr() as *mut _,
            4,
        )
    };
    if rc != 0 {
        return false;
    }
    let keep = if len == 4 {
        u32::MAX
    } else {
        (1u32 << (8 * len)) - 1
    };
    u32::from_be_bytes(buf) & keep & m.mask == m.value
}

#[inline(always)]
fn mask_of(found: Option<&tapmesh_common::lb::FlowMask>) -> u64 {
    found.map_or(0, |m| m.mask)
}

/// The flows of the interval holding `port`: the last start ≤ port, found by
/// a branch-free binary search (no branches, so no extra verifier states).
#[inline(always)]
fn interval_mask(p: &PortIntervals, port: u16) -> u64 {
    let mut lo = 0usize;
    let mut n = p.count as usize;
    if n > PORT_INTERVALS {
        n = PORT_INTERVALS;
    }
    // 2^5 = PORT_INTERVALS: five halvings find it.
    for _ in 0..5 {
        let half = n >> 1;
        let start = p.starts[(lo + half) & (PORT_INTERVALS - 1)] as u32;
        // 1 when start <= port: the subtraction wraps and sets the top bit.
        let take = (start.wrapping_sub(port as u32 + 1) >> 31) as usize;
        lo += take * half;
        n -= half;
    }
    p.masks[lo & (PORT_INTERVALS - 1)]
}

/// The highest-priority flow of the VIP's configuration that matches.
#[inline(always)]
fn classify(
    ctx: &XdpContext,
    t: &FlowTuple,
    l3: L3,
    config_id: u32,
) -> Result<&'static FlowEntry, DropReason> {
    let config = tm_vip_configs
        .get(config_id)
        .ok_or(DropReason::NoFlowMatch)?;
    let class = protocol_class(t.protocol, l3);
    let mut mask = match config.protocol_masks.get(class as usize) {
        Some(m) => *m,
        None => 0,
    };
    // Small port tables are in the config (binary search); big ones in LPM tries.
    let id = config_id.to_be_bytes();
    if mask != 0 && t.ports_known {
        mask &= if config.lookups & LOOKUP_DST_PORTS != 0 {
            let dst = PortData {
                config_id: id,
                port: t.dst_port.to_be_bytes(),
                _pad: [0; 2],
            };
            mask_of(tm_dst_ports.get(&Key::new(48, dst)))
        } else {
            interval_mask(&config.dst_ports, t.dst_port)
        };
        mask &= if config.lookups & LOOKUP_SRC_PORTS != 0 {
            let src = PortData {
                config_id: id,
                port: t.src_port.to_be_bytes(),
                _pad: [0; 2],
            };
            mask_of(tm_src_ports.get(&Key::new(48, src)))
        } else {
            interval_mask(&config.src_ports, t.src_port)
        };
    }
    if mask != 0 {
        mask &= if config.lookups & LOOKUP_SOURCES != 0 {
            let source = SourceData {
                config_id: id,
                addr: t.src,
                _pad: [0; 4],
            };
            mask_of(tm_sources.get(&Key::new(160, source)))
        } else {
            config.sources_all
        };
    }
    for _ in 0..MAX_CANDIDATES {
        if mask == 0 {
            return Err(DropReason::NoFlowMatch);
        }
        let bit = lowest_bit(mask);
        let flow = tm_flows
            .get(config_id * MAX_FLOWS_PER_VIP + bit)
            .ok_or(DropReason::NoFlowMatch)?;
        let mut all = true;
        for i in 0..MAX_BYTE_MATCHES {
            if i as u32 >= flow.byte_match_count {
                break;
            }
            if !byte_match(ctx, t, class, &flow.byte_matches[i]) {
                all = false;
                break;
            }
        }
        if all {
            return Ok(flow);
        }
        mask &= mask - 1;
    }
    Err(if mask == 0 {
        DropReason::NoFlowMatch
    } else {
        DropReason::TooManyCandidates
    })
}

/// murmur3-style mixing; the same on every node, so replicas agree.
#[inline(always)]
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

#[inline(always)]
fn flow_hash(t: &FlowTuple) -> u32 {
    let mut h = 0x7461_706du32; // "tapm"
    for i in 0..4 {
        let w =
            |a: &[u8; 16]| u32::from_ne_bytes([a[4 * i], a[4 * i + 1], a[4 * i + 2], a[4 * i + 3]]);
        h = mix(h, w(&t.src));
        h = mix(h, w(&t.dst));
    }
    if t.ports_known {
        h = mix(h, (t.src_port as u32) << 16 | t.dst_port as u32);
    }
    h = mix(h, t.protocol as u32);
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[inline(always)]
fn pick_target(flow: &FlowEntry, hash: u32) -> Result<&'static Target, DropReason> {
    let stream = tm_streams.get(flow.stream_id).ok_or(DropReason::NoTarget)?;
    if stream.table_size == 0 {
        return Err(DropReason::NoTarget);
    }
    // Maglev entries hold target indices, so the target is one array read away.
    let index = *tm_maglev
        .get(stream.table_base + hash % stream.table_size)
        .ok_or(DropReason::NoTarget)?;
    if index == NO_TARGET {
        return Err(DropReason::NoTarget);
    }
    match tm_targets.get(index) {
        Some(target) if target.kind != 0 => Ok(target),
        _ => Err(DropReason::NoTarget),
    }
}

#[inline(always)]
fn count(counter: Option<*mut PacketCounter>, bytes: u64) {
    if let Some(c) = counter {
        // SAFETY: a per-CPU value only this CPU touches.
        unsafe { (*c).count(bytes) }
    }
}

#[inline(always)]
fn adjust_head(ctx: &XdpContext, delta: i32) -> Result<(), DropReason> {
    // SAFETY: the helper checks the delta against the buffer.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx as *mut xdp_md, delta) } != 0 {
        return Err(DropReason::AdjustHeadFailed);
    }
    Ok(())
}

#[inline(always)]
fn ether_type_of(l3: L3) -> [u8; 2] {
    match l3 {
        L3::V6 => ETH_P_IPV6.to_be_bytes(),
        _ => ETH_P_IP.to_be_bytes(),
    }
}

/// A target on this node: new MACs (VLAN tags dropped), redirect to its interface.
#[inline(always)]
fn to_local(
    ctx: &XdpContext,
    pkt: &Packet,
    parsed: &Parsed,
    target: &Target,
) -> Result<u32, DropReason> {
    let at = parsed.l3_offset - size_of::<EthHdr>();
    let eth: *mut EthHdr = pkt.header_mut(at, DropReason::TruncatedEthernet)?;
    unsafe {
        (*eth).dst = target.dst_mac;
        (*eth).src = target.src_mac;
        (*eth).ether_type = ether_type_of(parsed.l3);
    }
    if at != 0 {
        adjust_head(ctx, at as i32)?;
    }
    // SAFETY: a plain helper call.
    Ok(unsafe { bpf_redirect(target.ifindex, 0) } as u32)
}

#[repr(C)]
struct Outer {
    eth: EthHdr,
    ip: Ipv4Hdr,
    udp: UdpHdr,
}

#[inline(always)]
fn ipv4_checksum(ip: &Ipv4Hdr) -> [u8; 2] {
    let w = |b: [u8; 2]| u16::from_be_bytes(b) as u32;
    let mut sum = w([ip.version_ihl, ip.tos])
        + w(ip.total_length)
        + w(ip.id)
        + w(ip.frag_off)
        + w([ip.ttl, ip.protocol])
        + w([ip.src[0], ip.src[1]])
        + w([ip.src[2], ip.src[3]])
        + w([ip.dst[0], ip.dst[1]])
        + w([ip.dst[2], ip.dst[3]]);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    (!(sum as u16)).to_be_bytes()
}

/// A target on another node: the inner IP packet as the payload of UDP to
/// that node's tunnel port, out of the interface and to the MAC the kernel's
/// FIB and neighbour table give.
#[inline(always)]
fn to_remote(
    ctx: &XdpContext,
    parsed: &Parsed,
    target: &Target,
    node: &NodeConfig,
    hash: u32,
) -> Result<u32, DropReason> {
    let inner_len = parsed.l3_end - parsed.l3_offset;
    adjust_head(ctx, parsed.l3_offset as i32 - OUTER_LEN as i32)?;
    let pkt = Packet::new(ctx.data(), ctx.data_end(), 0);
    let outer: *mut Outer = pkt.header_mut(0, DropReason::AdjustHeadFailed)?;
    let outer = unsafe { &mut *outer };
    let node_dst = [
        target.node_addr[12],
        target.node_addr[13],
        target.node_addr[14],
        target.node_addr[15],
    ];
    let total = (20 + 8 + inner_len) as u16;
    outer.ip = Ipv4Hdr {
        version_ihl: 0x45,
        tos: 0,
        total_length: total.to_be_bytes(),
        id: [0, 0],
        frag_off: 0x4000u16.to_be_bytes(), // don't fragment
        ttl: 64,
        protocol: IPPROTO_UDP,
        checksum: [0, 0],
        src: node.addr_v4,
        dst: node_dst,
    };
    outer.ip.checksum = ipv4_checksum(&outer.ip);
    let sport = 0xc000u16 | (hash as u16 & 0x3fff); // entropy for ECMP
    outer.udp = UdpHdr {
        src_port: sport.to_be_bytes(),
        dst_port: node.tunnel_port.to_be_bytes(),
        length: ((8 + inner_len) as u16).to_be_bytes(),
        checksum: [0, 0],
    };
    outer.eth.ether_type = ETH_P_IP.to_be_bytes();

    // A next hop the daemon resolved (kept current, Katran-style) saves the
    // FIB lookup, the most expensive step of this path.
    if target.ifindex != 0 {
        outer.eth.dst = target.dst_mac;
        outer.eth.src = target.src_mac;
        if target.ifindex == ctx.ingress_ifindex() as u32 {
            return Ok(xdp_action::XDP_TX);
        }
        // SAFETY: a plain helper call.
        return Ok(unsafe { bpf_redirect(target.ifindex, 0) } as u32);
    }
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    fib.family = AF_INET;
    fib.l4_protocol = IPPROTO_UDP;
    fib.sport = sport.to_be();
    fib.dport = node.tunnel_port.to_be();
    fib.__bindgen_anon_1.tot_len = total;
    fib.ifindex = ctx.ingress_ifindex() as u32;
    fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(node.addr_v4);
    fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(node_dst);
    // SAFETY: params is a valid, sized bpf_fib_lookup.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx as *mut _,
            &mut fib,
            size_of::<FibParams>() as i32,
            0,
        )
    };
    match rc {
        BPF_FIB_LKUP_RET_SUCCESS => {
            outer.eth.dst = fib.dmac;
            outer.eth.src = fib.smac;
            if fib.ifindex == ctx.ingress_ifindex() as u32 {
                Ok(xdp_action::XDP_TX)
            } else {
                // SAFETY: a plain helper call.
                Ok(unsafe { bpf_redirect(fib.ifindex, 0) } as u32)
            }
        }
        // The daemon keeps remote nodes' neighbours resolved (managed entries).
        BPF_FIB_LKUP_RET_NO_NEIGH => Err(DropReason::NoNeighbour),
        _ => Err(DropReason::FibLookupFailed),
    }
}

/// True when the packet is tunnel traffic addressed to this node.
#[inline(always)]
pub fn is_tunnel(parsed: &Parsed, node: &NodeConfig) -> bool {
    node.tunnel_port != 0
        && parsed.l3 == L3::V4
        && parsed.protocol == IPPROTO_UDP
        && parsed.has_l4
        && parsed.fragment == Fragment::None
        && parsed.dst_port == node.tunnel_port
        && parsed.dst_addr[12..16] == node.addr_v4
        && parsed.dst_addr[10] == 0xff
}

/// Removes the outer headers, leaving Ethernet + the inner IP packet.
#[inline(always)]
pub fn decapsulate(ctx: &XdpContext, pkt: &Packet, parsed: &Parsed) -> Result<(), DropReason> {
    let inner = parsed.l4_offset + size_of::<UdpHdr>();
    let first: *const u8 = pkt.header(inner, DropReason::BadTunnelPacket)?;
    let ether_type = match unsafe { *first } >> 4 {
        4 => ETH_P_IP,
        6 => ETH_P_IPV6,
        _ => return Err(DropReason::BadTunnelPacket),
    };
    let outer: *const EthHdr = pkt.header(0, DropReason::TruncatedEthernet)?;
    let (dst, src) = unsafe { ((*outer).dst, (*outer).src) };
    let eth: *mut EthHdr =
        pkt.header_mut(inner - size_of::<EthHdr>(), DropReason::BadTunnelPacket)?;
    unsafe {
        (*eth).dst = dst;
        (*eth).src = src;
        (*eth).ether_type = ether_type.to_be_bytes();
    }
    adjust_head(ctx, (inner - size_of::<EthHdr>()) as i32)
}

/// The load balancer for one parsed packet. `tunneled`: it came out of our
/// tunnel, so only a local target may take it.
#[inline(always)]
pub fn balance(
    ctx: &XdpContext,
    pkt: &Packet,
    parsed: &Parsed,
    node: Option<&NodeConfig>,
    tunneled: bool,
) -> Result<u32, DropReason> {
    if parsed.l3 == L3::None {
        return Ok(xdp_action::XDP_PASS);
    }
    let tuple = match icmp_error_tuple(pkt, parsed) {
        Some(t) => t,
        None => tuple_of(parsed),
    };
    let prefixes = node.is_some_and(|n| n.vip_prefixes != 0);
    let addr = VipAddr { addr: tuple.dst };
    let host = match tm_vip_slots.get(vip_slot(&tuple.dst)) {
        Some(s) if s.state == SLOT_ONE && same_address(&s.addr, &tuple.dst) => {
            tm_vip_values.get(s.vip_index)
        }
        // SAFETY: the value is read right away.
        Some(s) if s.state == SLOT_SHARED => unsafe { tm_vip_hosts.get(&addr) },
        _ => None,
    };
    let vip = match host {
        Some(v) => v,
        None => {
            match prefixes
                .then(|| tm_vips.get(&Key::new(128, addr)))
                .flatten()
            {
                Some(v) => v,
                None => return Ok(xdp_action::XDP_PASS),
            }
        }
    };
    let bytes = pkt.wire_len as u64;
    count(tm_vip_stats.get_ptr_mut(vip.vip_index), bytes);
    let flow = classify(ctx, &tuple, parsed.l3, vip.config_id)?;
    count(tm_flow_stats.get_ptr_mut(flow.stats_index), bytes);
    let hash = flow_hash(&tuple);
    let target = pick_target(flow, hash)?;
    match target.kind {
        TARGET_LOCAL => {
            count(tm_target_stats.get_ptr_mut(target.stats_index), bytes);
            to_local(ctx, pkt, parsed, target)
        }
        TARGET_REMOTE if !tunneled => {
            let node = node
                .filter(|n| n.tunnel_port != 0)
                .ok_or(DropReason::NoTarget)?;
            count(tm_target_stats.get_ptr_mut(target.stats_index), bytes);
            to_remote(ctx, parsed, target, node, hash)
        }
        TARGET_REMOTE => Err(DropReason::TargetNotLocal),
        _ => Err(DropReason::NoTarget),
    }
}
