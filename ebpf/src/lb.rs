//! VIP load balancing on the uplink: classify into a flow, pick the stream's
//! target by Maglev, forward to it (local: MAC rewrite + redirect; remote:
//! through the tunnel to its node, `tunnel.rs`).

use core::mem::size_of;

use aya_ebpf::{
    bindings::{xdp_action, xdp_md},
    btf_maps::lpm_trie::Key,
    helpers::generated::{bpf_redirect, bpf_xdp_load_bytes},
    programs::XdpContext,
};
use tapmesh_common::{
    lb::{
        ByteMatch, FlowEntry, PortData, PortNatPick, PortIntervals, SourceData, Target, VipAddr,
        VipValue, HOP_TX,
        LOOKUP_DST_PORTS, LOOKUP_SOURCES, LOOKUP_SRC_PORTS, MAX_BYTE_MATCHES, MAX_FLOWS_PER_VIP,
        MAX_MATCH_OFFSET, NO_TARGET, PORT_INTERVALS, PROTO_ICMP, PROTO_OTHER, PROTO_SCTP, PROTO_TCP, PROTO_UDP,
        SLOT_ONE, SLOT_SHARED, TARGET_LOCAL, TARGET_REMOTE,
    },
    tunnel::TunnelConfig,
    DropReason, PacketCounter,
};

use crate::{
    headers::*,
    maps::*,
    packet::{load32, Packet},
    parse::{addr_v6, be16, mapped_v4, Addr, Fragment, Parsed, L3, MAPPED_V4_PREFIX},
    port_nat, tunnel,
};

/// Candidate flows whose byte matches are tried before giving up.
const MAX_CANDIDATES: usize = 4;

/// What the load balancer looks at; for an ICMP error, the flow it reports on
/// (its inner packet with addresses and ports swapped).
struct FlowTuple {
    src: Addr,
    dst: Addr,
    src_port: u16,
    dst_port: u16,
    protocol: u8,
    /// Ports were read (TCP, UDP, SCTP, not a fragment): only then do port
    /// tables, byte matches and the hash use them.
    ports_known: bool,
    /// An ICMP error's quote: the reply, whose bytes say nothing of the
    /// request's, so byte matches are not judged on it.
    quoted: bool,
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
    let p: *const [[u8; 2]; 2] = pkt.header(at, DropReason::TruncatedIcmp).ok()?;
    let p = p as *const [u8; 2];
    // SAFETY: both halves are inside the header just checked.
    Some((be16(p), be16(unsafe { p.add(1) })))
}

/// The flow an ICMP error is about, from its inner packet, swapped; none
/// when the error is not addressed to the source of the packet it quotes.
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
            let version_ihl = unsafe { (*ip).version_ihl };
            let header_len = ((version_ihl & 0x0f) as usize) * 4;
            if version_ihl >> 4 != 4 || header_len < size_of::<Ipv4Hdr>() {
                return None;
            }
            (
                mapped_v4(unsafe { &raw const (*ip).src }),
                mapped_v4(unsafe { &raw const (*ip).dst }),
                unsafe { (*ip).protocol },
                inner + header_len,
            )
        }
        _ => {
            let ip: *const Ipv6Hdr = pkt.header(inner, DropReason::TruncatedIcmp).ok()?;
            (
                addr_v6(unsafe { &raw const (*ip).src }),
                addr_v6(unsafe { &raw const (*ip).dst }),
                unsafe { (*ip).next_header },
                inner + size_of::<Ipv6Hdr>(),
            )
        }
    };
    // An error about a VIP's flow is sent to the VIP (the source of what it
    // quotes); one sent elsewhere is not the load balancer's to deliver.
    if !same_address(&src, &parsed.dst_addr) {
        return None;
    }
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
        quoted: true,
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
        quoted: false,
        l4_offset: pkt.l4_offset,
        l4_end: pkt.l3_end,
    }
}

/// The bytes of an address (for map keys).
#[inline(always)]
pub fn addr_bytes(a: &Addr) -> [u8; 16] {
    // SAFETY: 16 bytes either way; words are in memory order.
    unsafe { core::mem::transmute::<Addr, [u8; 16]>(*a) }
}

/// The words of an address held in a map value (4-byte aligned there).
#[inline(always)]
fn addr_words(a: &[u8; 16]) -> Addr {
    let w = a.as_ptr() as *const [u8; 4];
    // SAFETY: four words inside `a`.
    unsafe {
        [
            load32(w),
            load32(w.add(1)),
            load32(w.add(2)),
            load32(w.add(3)),
        ]
    }
}

#[inline(always)]
fn same_address(a: &Addr, b: &Addr) -> bool {
    (a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3]) == 0
}

/// [`tapmesh_common::lb::vip_slot`] computed on words: XOR the words, fold the halves, and swap
/// the bytes of the result (the words are little-endian loads of big-endian data).
#[inline(always)]
fn vip_slot_of(a: &Addr) -> u32 {
    let x = a[0] ^ a[1] ^ a[2] ^ a[3];
    ((x ^ (x >> 16)) as u16).swap_bytes() as u32
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
        || offset >= MAX_MATCH_OFFSET as usize
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
    // 2^5 = PORT_INTERVALS: at most five halvings find it; a table of one
    // interval (ports unrestricted) needs none.
    for _ in 0..5 {
        if n <= 1 {
            break;
        }
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
    // Ports unknown (a fragment): no port-restricted flow may take it. (No
    // branch: each one multiplies the verifier's states below. Flows of
    // port-less classes restrict no port, so `port_free` keeps them.)
    mask &= config.port_free | 0u64.wrapping_sub(t.ports_known as u64);
    if mask != 0 {
        mask &= if config.lookups & LOOKUP_SOURCES != 0 {
            let source = SourceData {
                config_id: id,
                addr: addr_bytes(&t.src),
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
        // An error's flow is the best one by its tuple alone. Masked, not
        // branched: the uplink is at the verifier's limit of states.
        let byte_matches = flow.byte_match_count & 0u32.wrapping_sub(!t.quoted as u32);
        let mut all = true;
        for i in 0..MAX_BYTE_MATCHES {
            if i as u32 >= byte_matches {
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

const HASH_SEED: u32 = 0x7461_706d; // "tapm"

/// murmur3-style mixing; the same on every node, so replicas agree.
#[inline(always)]
pub const fn mix(h: u32, k: u32) -> u32 {
    let k = k
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

/// The hash state after the first three words of an IPv4-mapped source and
/// destination (`0`, `0`, `::ffff`), which are the same for every IPv4 packet.
const HASH_V4_PREFIX: u32 = {
    let mut h = HASH_SEED;
    h = mix(mix(h, 0), 0);
    h = mix(mix(h, 0), 0);
    mix(mix(h, MAPPED_V4_PREFIX), MAPPED_V4_PREFIX)
};

/// Source and destination word by word, then ports, then protocol.
#[inline(always)]
fn flow_hash(t: &FlowTuple, l3: L3) -> u32 {
    let mut h;
    if l3 == L3::V4 {
        h = mix(mix(HASH_V4_PREFIX, t.src[3]), t.dst[3]);
    } else {
        h = HASH_SEED;
        for i in 0..4 {
            h = mix(h, t.src[i]);
            h = mix(h, t.dst[i]);
        }
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
fn pick_target(flow: &FlowEntry, hash: u32) -> Result<(u32, &'static Target), DropReason> {
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
        Some(target) if target.kind != 0 => Ok((index, target)),
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
fn ether_type_of(l3: L3) -> [u8; 2] {
    match l3 {
        L3::V6 => ETH_P_IPV6.to_be_bytes(),
        _ => ETH_P_IP.to_be_bytes(),
    }
}

/// Writes an Ethernet header with the target's MACs (`dst_mac` and
/// `src_mac` sit at offsets 16 and 22 of the 4-byte aligned `Target`).
#[inline(always)]
fn write_eth(eth: *mut EthHdr, target: &Target, ether_type: [u8; 2]) {
    tunnel::write_macs(eth, &target.dst_mac, &target.src_mac, ether_type)
}

/// A target on this node: new MACs (VLAN tags dropped), redirect to its interface.
#[inline(always)]
pub fn to_local(
    ctx: &XdpContext,
    pkt: &Packet,
    parsed: &Parsed,
    target: &Target,
) -> Result<u32, DropReason> {
    let at = parsed.l3_offset - size_of::<EthHdr>();
    let eth: *mut EthHdr = pkt.header_mut(at, DropReason::TruncatedEthernet)?;
    write_eth(eth, target, ether_type_of(parsed.l3));
    if at != 0 {
        tunnel::adjust_head(ctx, at as i32)?;
    }
    Ok(crate::detour::port(target.ifindex))
}

/// A target on another node: the inner IP packet as the payload of UDP to
/// that node's tunnel port, out of the interface and to the MAC of the hop
/// the daemon resolved, or the kernel's FIB and neighbour table give.
#[inline(always)]
fn to_remote(
    ctx: &XdpContext,
    parsed: &Parsed,
    target: &Target,
    t: &TunnelConfig,
    hash: u32,
) -> Result<u32, DropReason> {
    let outer = tunnel::Outer {
        src: tunnel::node_addr(t),
        dst: addr_words(&target.node_addr)[3],
        dst_port: t.port,
        src_port: tunnel::source_port(hash),
        inner_len: parsed.l3_end - parsed.l3_offset,
    };
    tunnel::adjust_head(ctx, parsed.l3_offset as i32 - tunnel::OUTER_LEN as i32)?;
    let pkt = Packet::new(ctx.data(), ctx.data_end(), 0);
    let eth = tunnel::encapsulate(&pkt, &outer, DropReason::AdjustHeadFailed)?;
    let hop = tunnel::Hop {
        ifindex: target.ifindex,
        mtu: target.mtu,
        dst_mac: &target.dst_mac,
        src_mac: &target.src_mac,
    };
    let ingress = ctx.ingress_ifindex() as u32;
    let egress = tunnel::next_hop(ctx.ctx as *mut _, ingress, eth, &hop, &outer, true)?;
    if egress == ingress && target.hop_flags & HOP_TX != 0 {
        return Ok(xdp_action::XDP_TX);
    }
    // SAFETY: a plain helper call.
    Ok(unsafe { bpf_redirect(egress, 0) } as u32)
}

/// The VIP holding `addr` (IPv4 mapped): its slot in `tm_vip_slots` first,
/// the hash for a slot two VIPs share, then the prefix trie when some VIP is
/// a prefix (a trie lookup saved otherwise).
#[inline(always)]
pub fn vip_at(addr: &Addr) -> Option<&'static VipValue> {
    let key = VipAddr {
        addr: addr_bytes(addr),
    };
    let host = match tm_vip_slots.get(vip_slot_of(addr)) {
        Some(s) if s.state == SLOT_ONE && same_address(&addr_words(&s.addr), addr) => {
            tm_vip_values.get(s.vip_index)
        }
        // SAFETY: the value is read right away.
        Some(s) if s.state == SLOT_SHARED => unsafe { tm_vip_hosts.get(&key) },
        _ => None,
    };
    if host.is_some() {
        return host;
    }
    let prefixes = tm_lb_config.get(0).is_some_and(|c| c.vip_prefixes != 0);
    prefixes.then(|| tm_vips.get(&Key::new(128, key))).flatten()
}

/// Whether a container behind `ifindex` may send from `addr` (IPv4
/// mapped): a VIP, and the interface is a local target's of a stream that
/// serves one of its flows, whose answers leave from the VIP.
#[inline(always)]
pub fn answers_from(addr: &Addr, ifindex: u32) -> bool {
    vip_at(addr).is_some_and(|vip| {
        let key = tapmesh_common::lb::VipSender { ifindex, vip_index: vip.vip_index };
        // SAFETY: only whether it is there is read.
        unsafe { tm_vip_senders.get(&key) }.is_some()
    })
}

/// Not VIP traffic: the kernel's to route, unless it is a forged packet
/// for a container here (checked only for packets that did not come
/// through the tunnel; here, at the end of a path, the check adds little
/// to the verifier's work). Out of the tunnel, only containers here and
/// VIPs take packets: anything else would be routed on, a relay for
/// whoever can send with a node's address.
#[inline(always)]
fn not_a_vip(parsed: &Parsed, tunneled: bool) -> Result<u32, DropReason> {
    match parsed.l3 {
        _ if tunneled => return Err(DropReason::TunnelUnknownDestination),
        L3::V4 => crate::overlay::check_untunnelled(parsed)?,
        L3::V6 => crate::overlay6::check_untunnelled(parsed)?,
        _ => {}
    }
    Ok(xdp_action::XDP_PASS)
}

/// The load balancer for one parsed packet. `tunneled`: it came out of our
/// tunnel, so only a local target may take it.
#[inline(always)]
pub fn balance(
    ctx: &XdpContext,
    pkt: &Packet,
    parsed: &Parsed,
    tunnel: Option<&TunnelConfig>,
    tunneled: bool,
) -> Result<u32, DropReason> {
    if parsed.l3 == L3::None {
        return Ok(xdp_action::XDP_PASS);
    }
    let tuple = match icmp_error_tuple(pkt, parsed) {
        Some(t) => t,
        None => tuple_of(parsed),
    };
    // IPv4 VIPs live in the maps as `::ffff:a.b.c.d`: an IPv6 packet to
    // such an address is not for them.
    if parsed.l3 == L3::V6
        && tuple.dst[0] | tuple.dst[1] == 0
        && tuple.dst[2] == MAPPED_V4_PREFIX
    {
        return match tunneled {
            true => Err(DropReason::TunnelUnknownDestination),
            false => Ok(xdp_action::XDP_PASS),
        };
    }
    let Some(vip) = vip_at(&tuple.dst) else {
        return not_a_vip(parsed, tunneled);
    };
    let bytes = pkt.wire_len as u64;
    count(tm_vip_stats.get_ptr_mut(vip.vip_index), bytes);
    let flow = classify(ctx, &tuple, parsed.l3, vip.config_id)?;
    count(tm_flow_stats.get_ptr_mut(flow.stats_index), bytes);
    let hash = flow_hash(&tuple, parsed.l3);
    let (index, target) = pick_target(flow, hash)?;
    match target.kind {
        TARGET_LOCAL => {
            // Forwarded here (a tunnelled packet lost its hop at its
            // decapsulation; a remote target's loses it at its node).
            if !tunneled {
                let short = match parsed.l3 {
                    L3::V6 => DropReason::TruncatedIpv6,
                    _ => DropReason::TruncatedIpv4,
                };
                tunnel::one_hop_less(pkt, parsed.l3_offset, parsed.l3, short)?;
            }
            count(tm_target_stats.get_ptr_mut(target.stats_index), bytes);
            // The port is translated where the target is (a tunnelled packet
            // is classified again at its node, by the port the client used).
            if flow.port_nat != 0 {
                let pick = PortNatPick {
                    flow: flow.port_nat - 1,
                    target: index,
                    bytes: bytes as u32,
                    _pad: 0,
                };
                return Err(port_nat::hand_over(ctx, pick));
            }
            to_local(ctx, pkt, parsed, target)
        }
        TARGET_REMOTE if !tunneled => {
            let tunnel = tunnel.ok_or(DropReason::NoTarget)?;
            count(tm_target_stats.get_ptr_mut(target.stats_index), bytes);
            to_remote(ctx, parsed, target, tunnel, hash)
        }
        TARGET_REMOTE => Err(DropReason::TargetNotLocal),
        _ => Err(DropReason::NoTarget),
    }
}
