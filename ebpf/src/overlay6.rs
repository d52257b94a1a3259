//! Service-IP overlay for IPv6 packets (Oakestra's dual stack): the same
//! translation, conntrack and tunnel as `overlay.rs`, with IPv6 addresses.
//! The underlay stays IPv4: an IPv6 packet is the payload of the same UDP
//! tunnel. Service ids, slots, RR turns, instances' kind and generation, and
//! the counters are shared with IPv4; `tm_ov_*6` hold the addresses.

use core::mem::size_of;

use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_NOEXIST,
        TC_ACT_OK,
    },
    helpers::generated::{
        bpf_ktime_get_ns, bpf_l4_csum_replace, bpf_redirect, bpf_skb_change_tail,
    },
    programs::{TcContext, XdpContext},
};
use tapmesh_common::{
    overlay::{
        owner_slot6, Addr6, Instance, Instance6, Local6, Miss6, OverlayConfig6, Scratch6,
        CONFIG_SERVICES_OUTSIDE_PREFIX, CT_FORWARD, CT_REVERSE, INSTANCE_LOCAL, INSTANCE_REMOTE,
        OWNER_SLOT_ONE, OWNER_SLOT_SHARED, OWNER_SLOT_STATE, POLICY_INSTANCE,
    },
    DropReason,
};

use crate::{
    csum,
    headers::*,
    maps::*,
    overlay::{count, on_the_wire, pick, to_node, FIRST_FRAGMENT, LATER_FRAGMENT, NOT_FRAGMENT},
    packet::{load16, load32, store16, store32, Packet},
    parse::{parse, Fragment, Parsed, L3},
    tunnel::{self, write_macs},
};

const IP6_LEN: usize = size_of::<Ipv6Hdr>();
const ICMP6_ECHO_REQUEST: u8 = 128;
const ICMP6_ECHO_REPLY: u8 = 129;
const ICMP6_PACKET_TOO_BIG: u8 = 2;
/// What a "packet too big" quotes: the offending IPv6 header and the 256
/// bytes after it, so its extension headers and the 8 bytes past them that
/// the sender's kernel reads to find the socket are in it (the packet is
/// longer than the tunnel MTU, so they are there to quote). Linux quotes
/// up to 1232; RFC 4443 asks for as much as fits in 1280.
const QUOTE_LEN: usize = IP6_LEN + 256;

/// An IPv6 packet as the overlay sees it (`parse` read it). Its addresses
/// and ports are in the scratch key, its datagram in the scratch fragment
/// key.
#[derive(Clone, Copy)]
struct Ip6 {
    l3: usize,
    l4: usize,
    /// The L4 protocol (after a Fragment header).
    protocol: u8,
    tracked: bool,
    /// Header and payload.
    total_len: u16,
    /// [`NOT_FRAGMENT`], [`FIRST_FRAGMENT`] or [`LATER_FRAGMENT`].
    fragment: u8,
}

/// The packet an ICMPv6 error quotes: its header's offset, protocol and
/// ports (its addresses are the error's, the other way round).
#[derive(Clone, Copy)]
struct Quoted6 {
    at: usize,
    protocol: u8,
    src_port: u16,
    dst_port: u16,
}

/// `overlay::quoted` for ICMPv6 (destination unreachable, packet too big,
/// time exceeded, parameter problem, `kind`): the quoted TCP or UDP packet,
/// with no extension header and its L4 checksum quoted, that went from the
/// error's destination to its source (`s.key`, as the packet arrived).
#[inline(always)]
fn quoted(pkt: &Packet, ip: &Ip6, kind: u8, s: &Scratch6) -> Option<Quoted6> {
    if ip.protocol != IPPROTO_ICMPV6 || ip.fragment != NOT_FRAGMENT || !(1..=4).contains(&kind) {
        return None;
    }
    let at = ip.l4 + 8;
    // Inside the datagram, not in bytes after it.
    if at + 44 > ip.l3 + ip.total_len as usize {
        return None;
    }
    let h: *const [[u8; 4]; 11] = pkt.header(at, DropReason::TruncatedIcmp).ok()?;
    let (src, dst) = (words(&s.key.dst), words(&s.key.src));
    // SAFETY: every load is inside the 44 bytes just checked.
    unsafe {
        let (first, protocol) = ((*h)[0][0], (*h)[1][2]);
        if first >> 4 != 6 || !(protocol == IPPROTO_TCP || protocol == IPPROTO_UDP) {
            return None;
        }
        for i in 0..4 {
            if load32(&(*h)[2 + i]) != src[i] || load32(&(*h)[6 + i]) != dst[i] {
                return None;
            }
        }
        // Its L4 checksum must be quoted too, inside the datagram.
        let l4_end = at + IP6_LEN + if protocol == IPPROTO_UDP { 8 } else { 18 };
        if l4_end > ip.l3 + ip.total_len as usize {
            return None;
        }
        let ports = (*h)[10];
        Some(Quoted6 {
            at,
            protocol,
            src_port: u16::from_be_bytes([ports[0], ports[1]]),
            dst_port: u16::from_be_bytes([ports[2], ports[3]]),
        })
    }
}

/// Makes `s.key` the reply an error with quote `q` stands for (`ip`'s
/// protocol and ports become the quoted flow's, the other way round).
#[inline(always)]
fn as_reply(ip: &Ip6, q: &Quoted6, s: &mut Scratch6) -> Ip6 {
    s.key.protocol = q.protocol;
    s.key.src_port = q.dst_port;
    s.key.dst_port = q.src_port;
    Ip6 {
        protocol: q.protocol,
        tracked: true,
        ..*ip
    }
}

/// Gives the quoted packet the addresses `src`, `dst`, whose change from
/// what it holds adds up to `diff` (as the error's own addresses: they are
/// the same two, swapped), and its L4 checksum if quoted. Returns what the
/// ICMPv6 checksum must add for the quote.
#[inline(always)]
fn rewrite_quoted(
    pkt: &Packet,
    q: &Quoted6,
    src: &Addr6,
    dst: &Addr6,
    diff: u64,
) -> Result<u64, DropReason> {
    // `black_box`: `quoted` checked these bytes through another pointer,
    // and the compiler would drop the check the verifier needs.
    let at = core::hint::black_box(q.at);
    let h: *mut Ipv6Hdr = pkt.header_mut(at, DropReason::TruncatedIcmp)?;
    // SAFETY: both fields are inside the header just checked.
    unsafe {
        store_addr(&raw mut (*h).src, src);
        store_addr(&raw mut (*h).dst, dst);
    }
    let mut icmp = diff;
    let l4 = at + IP6_LEN + if q.protocol == IPPROTO_UDP { 6 } else { 16 };
    // Inside the datagram (`quoted`).
    if let Ok(field) = pkt.header_mut::<[u8; 2]>(l4, DropReason::TruncatedIcmp) {
        // SAFETY: inside the field just checked.
        unsafe {
            let old = load16(field);
            let mut new = csum::apply(old, fold32(diff));
            if q.protocol == IPPROTO_UDP && new == 0 {
                new = 0xffff;
            }
            store16(field, new);
            icmp += (!old as u32 & 0xffff) as u64 + new as u64;
        }
    }
    Ok(icmp)
}

/// This CPU's working space.
#[inline(always)]
fn scratch() -> Result<&'static mut Scratch6, DropReason> {
    // SAFETY: a per-CPU map value only this program run touches.
    tm_ov_scratch6
        .get_ptr_mut(0)
        .map(|p| unsafe { &mut *p })
        .ok_or(DropReason::NoInstance)
}

/// Whether `a` is IPv4-mapped (`::ffff:a.b.c.d`).
#[inline(always)]
fn mapped(a: &Addr6) -> bool {
    let w = words(a);
    w[0] == 0 && w[1] == 0 && w[2] == crate::parse::MAPPED_V4_PREFIX
}

/// The words of an address the maps hold (in a map value or the scratch
/// space, at a multiple of 4), for arithmetic and stores into packets.
#[inline(always)]
fn words(a: &Addr6) -> [u32; 4] {
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

/// An address `parse` read, as the maps hold it.
#[inline(always)]
fn bytes(w: &[u32; 4]) -> Addr6 {
    // SAFETY: 16 bytes either way; words are in memory order.
    unsafe { core::mem::transmute::<[u32; 4], Addr6>(*w) }
}

#[inline(always)]
fn same(a: &Addr6, b: &Addr6) -> bool {
    let (a, b) = (words(a), words(b));
    (a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3]) == 0
}

#[inline(always)]
fn store_addr(p: *mut [u8; 16], a: &Addr6) {
    let w = p as *mut [u8; 4];
    let a = words(a);
    // SAFETY: the caller hands a checked 16-byte field.
    unsafe {
        for i in 0..4 {
            store32(w.add(i), a[i]);
        }
    }
}

/// The overlay's view of a packet `parse` read as IPv6; its addresses
/// and ports go into `s.key`, a fragment's datagram into `s.fragment`.
#[inline(always)]
fn ip6_of(p: &Parsed, s: &mut Scratch6) -> Ip6 {
    let key = &mut s.key;
    key.src = bytes(&p.src_addr);
    key.dst = bytes(&p.dst_addr);
    key.src_port = 0;
    key.dst_port = 0;
    key.protocol = p.protocol;
    key._pad = [0; 3];
    let fragment = match p.fragment {
        Fragment::None => NOT_FRAGMENT,
        Fragment::First => FIRST_FRAGMENT,
        Fragment::Later => LATER_FRAGMENT,
    };
    if fragment != NOT_FRAGMENT {
        s.fragment.src = key.src;
        s.fragment.dst = key.dst;
        s.fragment.id = p.frag_id;
        s.fragment.protocol = p.protocol;
        s.fragment._pad = [0; 3];
    }
    let mut tracked = false;
    if p.has_l4 {
        match p.protocol {
            IPPROTO_TCP | IPPROTO_UDP => {
                key.src_port = p.src_port;
                key.dst_port = p.dst_port;
                tracked = true;
            }
            IPPROTO_ICMPV6
                if p.icmp_type == ICMP6_ECHO_REQUEST || p.icmp_type == ICMP6_ECHO_REPLY =>
            {
                key.src_port = p.icmp_id;
                tracked = true;
            }
            _ => {}
        }
    }
    Ip6 {
        l3: p.l3_offset,
        l4: p.l4_offset,
        protocol: p.protocol,
        tracked,
        total_len: (p.l3_end - p.l3_offset) as u16,
        fragment,
    }
}

#[inline(always)]
fn is_zero(a: &Addr6) -> bool {
    let a = words(a);
    a[0] | a[1] | a[2] | a[3] == 0
}

#[inline(always)]
fn in_prefix(config: &OverlayConfig6, a: &Addr6) -> bool {
    let (p, m, a) = (
        words(&config.service_prefix),
        words(&config.service_mask),
        words(a),
    );
    m[0] | m[1] | m[2] | m[3] != 0
        && (a[0] & m[0]) ^ p[0] | (a[1] & m[1]) ^ p[1] | (a[2] & m[2]) ^ p[2] | (a[3] & m[3]) ^ p[3]
            == 0
}

/// Offset of the L4 checksum (all three cover the pseudo header); a later
/// fragment has none.
#[inline(always)]
fn l4_checksum(ip: &Ip6) -> Option<usize> {
    if ip.fragment == LATER_FRAGMENT {
        return None;
    }
    match ip.protocol {
        IPPROTO_TCP => Some(ip.l4 + 16),
        IPPROTO_UDP => Some(ip.l4 + 6),
        IPPROTO_ICMPV6 => Some(ip.l4 + 2),
        _ => None,
    }
}

/// The checksum difference of replacing `old` words by `new` ones (RFC 1624).
#[inline(always)]
fn add_diff(sum: &mut u64, old: &Addr6, new: &Addr6) {
    let (old, new) = (words(old), words(new));
    for i in 0..4 {
        *sum += (!old[i]) as u64 + new[i] as u64;
    }
}

#[inline(always)]
fn fold32(sum: u64) -> u32 {
    let sum = (sum & 0xffff_ffff) + (sum >> 32);
    ((sum & 0xffff_ffff) + (sum >> 32)) as u32
}

/// Tells userspace once about an unknown IPv6 service IP (`tm_ov_pending6`),
/// on the IPv4 misses' ring.
#[inline(always)]
fn signal_miss(s: &mut Scratch6) {
    // SAFETY: a plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    if tm_ov_pending6
        .insert(&s.key.dst, &now, BPF_NOEXIST as u64)
        .is_ok()
    {
        s.miss.service_addr = s.key.dst;
        s.miss.client_addr = s.key.src;
        s.miss.port = s.key.dst_port;
        s.miss.protocol = s.key.protocol;
        s.miss.flags = 0;
        if tm_ov_misses.output_untyped::<Miss6>(&s.miss, 0).is_err() {
            let _ = tm_ov_pending6.remove(&s.key.dst);
        }
    }
}

/// The instance's IPv6 addresses, if it has them.
#[inline(always)]
fn addresses(id: u32) -> Option<&'static Instance6> {
    tm_ov_inst6.get(id).filter(|i| !is_zero(&i.ns_addr))
}

/// The flow's instance: from conntrack, or picked and recorded now (`None`:
/// not a service IP, the packet passes). Leaves the new addresses in `s`.
#[inline(always)]
fn binding(
    s: &mut Scratch6,
    ip: &Ip6,
    config: &OverlayConfig6,
    sender: Option<&'static Local6>,
) -> Result<Option<(u32, u32, &'static Instance)>, DropReason> {
    // A service's packet must come from the container's own address (not
    // a link-local one): it becomes that container's instance IP.
    let sender_here = || sender.ok_or(DropReason::SenderNotDeployed);
    // SAFETY: the values are read right away.
    let found = match (ip.fragment, ip.tracked) {
        (LATER_FRAGMENT, _) => unsafe { tm_ov_frags6.get(&s.fragment) },
        (_, true) => unsafe { tm_ov_ct6.get(&s.key) },
        _ => None,
    };
    if let Some(ct) = found.filter(|ct| ct.kind == CT_FORWARD) {
        if let (Some(inst), Some(inst6)) =
            (tm_ov_instances.get(ct.instance), addresses(ct.instance))
        {
            if inst.generation == ct.generation && inst.kind != 0 {
                sender_here()?;
                s.new_dst = inst6.ns_addr;
                s.new_src = if inst.kind == INSTANCE_LOCAL && !is_zero(&ct.reply_src) {
                    ct.reply_src
                } else {
                    ct.new_src
                };
                if ip.fragment == FIRST_FRAGMENT {
                    // The later fragments carry no ports: they follow this one.
                    let _ = tm_ov_frags6.insert(&s.fragment, ct, 0);
                }
                return Ok(Some((ct.instance, ct.service, inst)));
            }
        }
    }
    // SAFETY: the value is read right away.
    let service = match unsafe { tm_ov_services6.get(&s.key.dst) } {
        Some(svc) => svc,
        None if in_prefix(config, &s.key.dst) => {
            signal_miss(s);
            return Err(DropReason::UnknownService);
        }
        None => return Ok(None),
    };
    if !ip.tracked {
        return Err(DropReason::UnsupportedServicePacket);
    }
    let sender = sender_here()?;
    let id = pick(service)?;
    let inst = match tm_ov_instances.get(id) {
        Some(i) if i.kind != 0 => i,
        _ => return Err(DropReason::NoInstance),
    };
    let inst6 = addresses(id).ok_or(DropReason::NoInstance)?;
    s.new_src = sender.instance_addr;
    s.new_dst = inst6.ns_addr;
    // To a local instance, the packet may be a reply to a flow that
    // instance dialled: its reverse entry gives the source to show.
    s.value.reply_src = [0; 16];
    if inst.kind == INSTANCE_LOCAL {
        s.other = s.key;
        s.other.src = s.new_src;
        s.other.dst = s.new_dst;
        // SAFETY: the value is read right away.
        if let Some(ct) = unsafe { tm_ov_ct6.get(&s.other) } {
            if ct.kind == CT_REVERSE && !same(&ct.service_addr, &s.new_src) {
                s.value.reply_src = ct.service_addr;
            }
        }
    }
    s.value.kind = CT_FORWARD;
    s.value.instance = id;
    s.value.generation = inst.generation;
    s.value.service = service.id;
    s.value.service_addr = s.key.dst;
    s.value.new_src = s.new_src;
    let _ = tm_ov_ct6.insert(&s.key, &s.value, 0);
    if ip.fragment == FIRST_FRAGMENT {
        let _ = tm_ov_frags6.insert(&s.fragment, &s.value, 0);
    }
    if !is_zero(&s.value.reply_src) {
        s.new_src = s.value.reply_src;
    }
    // The reply's entry: from the instance's reply address to the sender.
    s.other.src = inst6.reply_addr;
    s.other.dst = s.key.src;
    if ip.protocol == IPPROTO_ICMPV6 {
        s.other.src_port = s.key.src_port;
        s.other.dst_port = 0;
    } else {
        s.other.src_port = s.key.dst_port;
        s.other.dst_port = s.key.src_port;
    }
    s.other.protocol = ip.protocol;
    s.other._pad = [0; 3];
    s.value.kind = CT_REVERSE;
    s.value.new_src = [0; 16];
    s.value.reply_src = [0; 16];
    let _ = tm_ov_ct6.insert(&s.other, &s.value, 0);
    if inst.kind == INSTANCE_LOCAL {
        // The instance's replies to this sender bind again: an earlier flow
        // from the same ports to another of its service IPs left them
        // showing that one.
        s.other.src = inst6.ns_addr;
        s.other.dst = sender.instance_addr;
        let _ = tm_ov_ct6.remove(&s.other);
    }
    Ok(Some((id, service.id, inst)))
}

/// TC on a container's host-side veth, for its IPv6 packets. Not inlined:
/// the IPv4 path stays as the verifier knew it.
#[inline(never)]
pub fn from_container(ctx: &TcContext, pkt: &Packet) -> crate::tc::Packed {
    crate::tc::Packed::from(try_from_container(ctx, pkt))
}

#[inline(always)]
fn try_from_container(ctx: &TcContext, pkt: &Packet) -> Result<i32, DropReason> {
    let parsed = parse(pkt)?;
    if parsed.l3 != L3::V6 {
        return Ok(TC_ACT_OK);
    }
    let s = scratch()?;
    let ip = ip6_of(&parsed, s);
    // SAFETY: reading a field of the context.
    let ingress = unsafe { (*ctx.skb.skb).ifindex };
    // As for IPv4 (`overlay::try_from_container`), the source must be the
    // container behind this interface, one neighbour discovery uses (a
    // link-local address, or none while the container checks that its
    // address is free), or a VIP it answers from as a local target of the
    // VIP's stream.
    let nd = (s.key.src[0] == 0xfe && s.key.src[1] & 0xc0 == 0x80) || is_zero(&s.key.src);
    let sender = match nd {
        true => None,
        // SAFETY: a map value, valid for the program's run.
        false => match unsafe { tm_ov_locals6.get(&s.key.src) } {
            Some(l) if l.ifindex == ingress => Some(l),
            // Not an IPv4-mapped address: that would be an IPv4 VIP's key.
            _ if !mapped(&s.key.src) && crate::lb::answers_from(&words(&s.key.src), ingress) => {
                None
            }
            _ => return Err(DropReason::SenderNotDeployed),
        },
    };
    let (Some(config), Some(config6)) = (tm_ov_config.get(0), tm_ov_config6.get(0)) else {
        return Ok(TC_ACT_OK);
    };
    if config6.flags & CONFIG_SERVICES_OUTSIDE_PREFIX == 0 && !in_prefix(config6, &s.key.dst) {
        return Ok(TC_ACT_OK);
    }
    // An ICMPv6 error about a flow goes as the reply it stands for, its
    // quoted packet translated with it (`overlay::try_from_container`).
    let quote = match ip.tracked {
        true => None,
        false => quoted(pkt, &ip, parsed.icmp_type, s),
    };
    let flow = match &quote {
        Some(q) => as_reply(&ip, q, s),
        None => ip,
    };
    let Some((id, service, inst)) = binding(s, &flow, config6, sender)? else {
        return Ok(TC_ACT_OK);
    };
    let wire = on_the_wire(ctx, pkt, ip.l4, ip.protocol);
    count(service, false, wire);
    count(id, true, wire);

    if inst.kind == INSTANCE_REMOTE {
        // SAFETY: reading a field of the context.
        let gso_size = unsafe { (*ctx.skb.skb).gso_size } as usize;
        // As for IPv4 (`overlay::from_container`).
        let udp_gso = gso_size != 0 && ip.protocol == IPPROTO_UDP;
        if udp_gso && ip.total_len as usize + tunnel::TUNNEL_LEN > u16::MAX as usize {
            return Err(DropReason::TooBigForTunnel);
        }
        let too_big = if gso_size == 0 {
            ip.total_len > config.tunnel_mtu
        } else {
            udp_gso && ip.l4 - ip.l3 + 8 + gso_size > config.tunnel_mtu as usize
        };
        if too_big {
            return packet_too_big(ctx, pkt, &s.key.src, config.tunnel_mtu, config6);
        }
    }

    let hdr: *mut Ipv6Hdr = pkt.header_mut(ip.l3, DropReason::TruncatedIpv6)?;
    let mut sum = 0u64;
    add_diff(&mut sum, &s.key.src, &s.new_src);
    add_diff(&mut sum, &s.key.dst, &s.new_dst);
    // SAFETY: both fields are inside the header just checked.
    unsafe {
        store_addr(&raw mut (*hdr).src, &s.new_src);
        store_addr(&raw mut (*hdr).dst, &s.new_dst);
    }
    if let Some(q) = &quote {
        // The quoted packet went from the client to the instance.
        sum += rewrite_quoted(pkt, q, &s.new_dst, &s.new_src, sum)?;
    }
    if let Some(at) = l4_checksum(&ip) {
        let mut flags = BPF_F_PSEUDO_HDR as u64;
        if ip.protocol == IPPROTO_UDP {
            flags |= BPF_F_MARK_MANGLED_0 as u64;
        }
        // SAFETY: the helper checks the offset against the packet.
        unsafe { bpf_l4_csum_replace(ctx.skb.skb, at as u32, 0, fold32(sum) as u64, flags) };
    }

    if inst.kind == INSTANCE_LOCAL {
        let pkt = Packet::new(ctx.data(), ctx.data_end(), pkt.wire_len);
        let eth: *mut EthHdr = pkt.header_mut(0, DropReason::TruncatedEthernet)?;
        write_macs(eth, &inst.dst_mac, &inst.src_mac, ETH_P_IPV6.to_be_bytes());
        ctx.set_mark(crate::overlay::DELIVERY_MARK);
        // SAFETY: a plain helper call.
        return Ok(unsafe { bpf_redirect(inst.ifindex, 0) } as i32);
    }
    let tunnel = tunnel::config().ok_or(DropReason::NoInstance)?;
    if inst.kind != INSTANCE_REMOTE {
        return Err(DropReason::NoInstance);
    }
    // Every fragment of a datagram takes the same outer source port.
    let flow = match ip.fragment {
        NOT_FRAGMENT => (s.key.src_port as u32) << 16 ^ s.key.dst_port as u32,
        _ => s.fragment.id,
    };
    let hash = words(&s.key.src)[3] ^ words(&s.key.dst)[3] ^ flow ^ id;
    let udp = ip.protocol == IPPROTO_UDP;
    to_node(ctx, ip.total_len as usize, inst, tunnel, hash, false, udp)
}

/// Answers a packet too big for the tunnel with ICMPv6 "packet too big"
/// carrying the tunnel MTU, sent back to the container. It quotes the
/// offending packet's first [`QUOTE_LEN`] bytes.
#[inline(always)]
fn packet_too_big(
    ctx: &TcContext,
    pkt: &Packet,
    sender: &Addr6,
    mtu: u16,
    config6: &OverlayConfig6,
) -> Result<i32, DropReason> {
    if is_zero(&config6.gateway) {
        return Err(DropReason::TooBigForTunnel);
    }
    let (gateway, sender) = (words(&config6.gateway), words(sender));
    let eth: *const [[u8; 2]; 6] = pkt.header(0, DropReason::TruncatedEthernet)?;
    // SAFETY: the 12 MAC bytes are inside the header just checked.
    let macs = unsafe { *eth };
    // SAFETY: the helper checks the length.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, (ETH_LEN + QUOTE_LEN) as u32, 0) } != 0 {
        return Err(DropReason::AdjustRoomFailed);
    }
    ctx.adjust_room((IP6_LEN + 8) as i32, BPF_ADJ_ROOM_MAC, 0)
        .map_err(|_| DropReason::AdjustRoomFailed)?;
    const LEN: usize = ETH_LEN + IP6_LEN + 8 + QUOTE_LEN;
    let pkt = Packet::new(ctx.data(), ctx.data_end(), 0);
    let out: *mut [[u8; 2]; LEN / 2] = pkt.header_mut(0, DropReason::AdjustRoomFailed)?;
    let out = out as *mut u8;
    let [l0, l1] = ((8 + QUOTE_LEN) as u16).to_be_bytes();
    let [m0, m1] = mtu.to_be_bytes();
    // SAFETY: every access is inside the LEN bytes just checked.
    unsafe {
        // Back to the sender: the MACs swap.
        let o = out as *mut [u8; 2];
        for i in 0..3 {
            store16(o.add(i), u16::from_ne_bytes(macs[i + 3]));
            store16(o.add(i + 3), u16::from_ne_bytes(macs[i]));
        }
        let w = out.add(ETH_LEN) as *mut [u8; 4];
        store32(w, u32::from_ne_bytes([0x60, 0, 0, 0]));
        store32(w.add(1), u32::from_ne_bytes([l0, l1, IPPROTO_ICMPV6, 255]));
        for i in 0..4 {
            store32(w.add(2 + i), gateway[i]);
            store32(w.add(6 + i), sender[i]);
        }
        // ICMPv6: type 2, code 0, checksum 0 for now, then the MTU.
        let icmp = w.add(10);
        store32(icmp, u32::from_ne_bytes([ICMP6_PACKET_TOO_BIG, 0, 0, 0]));
        store32(icmp.add(1), u32::from_ne_bytes([0, 0, m0, m1]));
        // The pseudo header (addresses, length, next header), then the message.
        let mut sum = u32::from_ne_bytes([0, 0, l0, l1]) as u64
            + u32::from_ne_bytes([0, 0, 0, IPPROTO_ICMPV6]) as u64;
        for i in 0..8 {
            sum += load32(w.add(2 + i)) as u64;
        }
        for i in 0..(8 + QUOTE_LEN) / 4 {
            sum += load32(icmp.add(i)) as u64;
        }
        store16((icmp as *mut u8).add(2) as *mut [u8; 2], !csum::fold(sum));
    }
    crate::stats::Stats::of(tapmesh_common::ProgramSlot::TcService)
        .drop_reason(DropReason::TooBigForTunnel);
    // SAFETY: reading a field of the context, then a plain helper call.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    Ok(unsafe { bpf_redirect(ifindex, 0) } as i32)
}

/// Whether two IPv6 addresses (a map value's, the packet's) are equal, as
/// four word compares.
#[inline(always)]
fn same6(a: &Addr6, b: &Addr6) -> bool {
    let (a, b) = (a as *const Addr6 as *const [u8; 4], b as *const Addr6 as *const [u8; 4]);
    // SAFETY: 16 bytes each, read as four words.
    unsafe { (0..4).all(|i| load32(a.add(i)) == load32(b.add(i))) }
}

/// Whether an IPv6 packet from the tunnel, as `tunnel::decapsulate` left
/// it (Ethernet, then the IPv6 header), is for a container here and has a
/// source that belongs to another node than `node`
/// (`overlay::check_owner`), or to this node (the containers' gateway).
/// Its own subprogram, called before [`from_tunnel`] and not from it: that
/// one's stack and the uplink's leave no room for another value. The keys
/// are read from the packet.
#[inline(never)]
pub fn foreign_source(ctx: &XdpContext, node: u32) -> bool {
    let pkt = crate::xdp::packet_of(ctx);
    // Too short: `from_tunnel`'s parse says why.
    let Ok(h) = pkt.header::<[u8; 54]>(0, DropReason::TruncatedIpv6) else {
        return false;
    };
    // SAFETY: both addresses are inside the 54 bytes just checked; the
    // values are read right away.
    unsafe {
        let (src, dst) = (
            &*((h as *const u8).add(22) as *const Addr6),
            &*((h as *const u8).add(38) as *const Addr6),
        );
        // The containers' gateway is this node's own address.
        if tm_ov_config6.get(0).is_some_and(|c| same6(&c.gateway, src)) {
            return tm_ov_locals6.get(dst).is_some();
        }
        // The owner first, from its slot (an array read) unless the slot is
        // shared: a known one that matches (the usual case) or an unknown
        // one answers without a hash lookup.
        let slot = tm_ov_own_slot6.get_ptr_mut(owner_slot6(src));
        let state = slot.map_or(0, |s| core::ptr::read_volatile(&(*s).state));
        let known = match slot {
            Some(s)
                if state & OWNER_SLOT_STATE == OWNER_SLOT_ONE && same6(&(*s).addr, src) =>
            {
                Some(crate::overlay::check_owner(Some(&(*s).owner), node).is_err())
            }
            Some(_) if state & OWNER_SLOT_STATE == OWNER_SLOT_SHARED => tm_ov_owners6
                .get(src)
                .map(|owner| crate::overlay::check_owner(Some(owner), node).is_err()),
            _ => None,
        };
        match (known, slot) {
            (Some(true), _) => tm_ov_locals6.get(dst).is_some(),
            // Let in, for a container here: marked for the daemon, once.
            (Some(false), Some(s)) => {
                if state & !OWNER_SLOT_STATE == 0 && tm_ov_locals6.get(dst).is_some() {
                    crate::overlay::mark_seen(&raw mut (*s).state);
                }
                false
            }
            (Some(false), None) => false,
            (None, _) => unknown_source(src, dst, *(h as *const u8).add(20)),
        }
    }
}

/// `overlay::check_untunnelled` for IPv6: a packet that did not come
/// through the tunnel, for a container here, from the service prefix.
#[inline(always)]
pub fn check_untunnelled(parsed: &Parsed) -> Result<(), DropReason> {
    let Some(config) = tm_ov_config6.get(0) else {
        return Ok(());
    };
    let src = crate::lb::addr_bytes(&parsed.src_addr);
    if !in_prefix(config, &src) {
        return Ok(());
    }
    let dst = crate::lb::addr_bytes(&parsed.dst_addr);
    // SAFETY: the value is only tested for presence.
    match unsafe { tm_ov_locals6.get(&dst) } {
        Some(_) => Err(DropReason::ServiceSourceOutsideTunnel),
        None => Ok(()),
    }
}

/// `overlay::check_delivery` for an unmarked IPv6 packet.
#[inline(always)]
pub fn check_delivery(ctx: &TcContext) -> Result<(), DropReason> {
    let Some(config) = tm_ov_config6.get(0) else {
        return Ok(());
    };
    // In place when linear, as for IPv4.
    let pkt = Packet::new(ctx.data(), ctx.data_end(), 0);
    let addrs = match pkt.header::<[Addr6; 2]>(ETH_LEN + 8, DropReason::TruncatedIpv6) {
        // SAFETY: the 32 bytes were just checked.
        Ok(p) => unsafe { *p },
        Err(_) => match ctx.load::<[Addr6; 2]>(ETH_LEN + 8) {
            Ok(a) => a,
            Err(_) => return Ok(()),
        },
    };
    if !in_prefix(config, &addrs[0]) {
        return Ok(());
    }
    // The container's own address, and multicast and link-local, which
    // the node can send to its veth too.
    let dst = &addrs[1];
    let on_link = dst[0] == 0xff || dst[0] == 0xfe && dst[1] & 0xc0 == 0x80;
    // SAFETY: the value is only tested for presence.
    if on_link || unsafe { tm_ov_locals6.get(dst) }.is_some() {
        return Err(DropReason::ServiceSourceOutsideTunnel);
    }
    Ok(())
}

/// `overlay::unknown_source` for IPv6, for a container here: a source in
/// the service prefix that no table gives to any node is refused, and asked
/// for once unless the tables hold it as a service IP (an instance IP two
/// nodes claim is not judged); any other is not judged.
#[inline(always)]
fn unknown_source(src: &Addr6, dst: &Addr6, protocol: u8) -> bool {
    let Some(config) = tm_ov_config6.get(0) else {
        return false;
    };
    // SAFETY: the value is only tested for presence.
    if !in_prefix(config, src) || unsafe { tm_ov_locals6.get(dst) }.is_none() {
        return false;
    }
    // SAFETY: the value is read right away.
    match unsafe { tm_ov_services6.get(src) } {
        Some(s) if s.policy == POLICY_INSTANCE => return false,
        Some(_) => return true,
        None => {}
    }
    // SAFETY: a plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    if tm_ov_pending6.insert(src, &now, BPF_NOEXIST as u64).is_ok() {
        let told = scratch().is_ok_and(|s| {
            s.miss.service_addr = *src;
            s.miss.client_addr = *dst;
            s.miss.port = 0;
            s.miss.protocol = protocol;
            s.miss.flags = 0;
            tm_ov_misses.output_untyped::<Miss6>(&s.miss, 0).is_ok()
        });
        if !told {
            let _ = tm_ov_pending6.remove(src);
        }
    }
    true
}

/// `overlay::ask_about_sender` for an inner IPv6 packet (its header at
/// `at`): a service-prefix source no table holds, for a container here, is
/// asked about within the strangers' budget.
#[inline(always)]
pub fn ask_about_sender(pkt: &Packet, at: usize) {
    let Ok(h) = pkt.header::<[[u8; 4]; 10]>(at, DropReason::BadTunnelPacket) else {
        return;
    };
    let Some(config) = tm_ov_config6.get(0) else {
        return;
    };
    let (mut src, mut dst) = ([0u8; 16], [0u8; 16]);
    // SAFETY: the addresses (bytes 8..40) are inside the 40 bytes just checked.
    unsafe {
        let h = h as *const u8;
        core::ptr::copy_nonoverlapping(h.add(8), src.as_mut_ptr(), 16);
        core::ptr::copy_nonoverlapping(h.add(24), dst.as_mut_ptr(), 16);
    }
    // SAFETY: the values are only tested for presence.
    let (known, local) = unsafe {
        (tm_ov_services6.get(&src).is_some(), tm_ov_locals6.get(&dst).is_some())
    };
    if known || !local || !in_prefix(config, &src) {
        return;
    }
    // As for IPv4: a pending address spends nothing, a stale one is asked again.
    // SAFETY: a plain helper call; the value is read right away.
    let now = unsafe { bpf_ktime_get_ns() };
    let pending = match unsafe { tm_ov_pending6.get(&src) } {
        Some(t) if now.wrapping_sub(*t) < crate::overlay::STALE_PENDING_NS => true,
        Some(_) => {
            let _ = tm_ov_pending6.remove(&src);
            false
        }
        None => false,
    };
    if pending || !crate::overlay::stranger_may_ask() {
        return;
    }
    if tm_ov_pending6.insert(&src, &now, BPF_NOEXIST as u64).is_ok() {
        let miss = Miss6 {
            service_addr: src,
            client_addr: dst,
            port: 0,
            // SAFETY: inside the header checked above.
            protocol: unsafe { (*h)[1][2] },
            flags: tapmesh_common::overlay::MISS_FROM_STRANGER,
        };
        if tm_ov_misses.output_untyped::<Miss6>(&miss, 0).is_err() {
            let _ = tm_ov_pending6.remove(&src);
        }
    }
}

/// XDP on the uplink, after `tunnel::decapsulate`: an IPv6 packet for one of this node's containers gets
/// the reverse translation if it is a reply and is redirected. `None`: not
/// for a container here, nothing was changed.
#[inline(never)]
pub fn from_tunnel(ctx: &XdpContext) -> Result<Option<u32>, DropReason> {
    let pkt = &crate::xdp::packet_of(ctx);
    let parsed = &parse(pkt)?;
    if parsed.l3 != L3::V6 {
        return Ok(None);
    }
    let s = scratch()?;
    let ip = ip6_of(parsed, s);
    // SAFETY: the value is read right away.
    let Some(local) = (unsafe { tm_ov_locals6.get(&s.key.dst) }) else {
        return Ok(None);
    };
    // SAFETY: the values are read right away.
    let reverse = match (ip.fragment, ip.tracked) {
        (LATER_FRAGMENT, _) => unsafe { tm_ov_frags6.get(&s.fragment) },
        (_, true) => unsafe { tm_ov_ct6.get(&s.key) },
        _ => None,
    };
    // An ICMPv6 error about a flow the container dialled: its reply's
    // reverse entry, for the error and its quote (`overlay::reverse_quoted`).
    let quote = match ip.tracked {
        true => None,
        false => quoted(pkt, &ip, parsed.icmp_type, s),
    };
    let reverse = match &quote {
        Some(q) => {
            s.other = s.key;
            s.other.protocol = q.protocol;
            s.other.src_port = q.dst_port;
            s.other.dst_port = q.src_port;
            // SAFETY: the value is read right away.
            unsafe { tm_ov_ct6.get(&s.other) }
        }
        None => reverse,
    };
    if let Some(ct) =
        reverse.filter(|ct| ct.kind == CT_REVERSE && !same(&ct.service_addr, &s.key.src))
    {
        if ip.fragment == FIRST_FRAGMENT {
            // For the later fragments, which carry no ports.
            let _ = tm_ov_frags6.insert(&s.fragment, ct, 0);
        }
        // Only the source changes: it becomes the service IP the client dialled.
        let hdr: *mut Ipv6Hdr = pkt.header_mut(ip.l3, DropReason::BadTunnelPacket)?;
        let mut sum = 0u64;
        add_diff(&mut sum, &s.key.src, &ct.service_addr);
        // SAFETY: the field is inside the header just checked.
        unsafe { store_addr(&raw mut (*hdr).src, &ct.service_addr) };
        if let Some(q) = &quote {
            // And the quote's destination, the same address.
            let to = ct.service_addr;
            sum += rewrite_quoted(pkt, q, &s.key.dst, &to, sum)?;
        }
        if let Some(at) = l4_checksum(&ip) {
            let field: *mut [u8; 2] = pkt.header_mut(at, DropReason::BadTunnelPacket)?;
            // SAFETY: inside the field just checked.
            unsafe {
                let mut new = csum::apply(load16(field), fold32(sum));
                if ip.protocol == IPPROTO_UDP && new == 0 {
                    new = 0xffff;
                }
                store16(field, new);
            }
        }
    }
    let eth: *mut EthHdr = pkt.header_mut(0, DropReason::BadTunnelPacket)?;
    write_macs(eth, &local.mac, &local.host_mac, ETH_P_IPV6.to_be_bytes());
    Ok(Some(crate::detour::port_call(local.ifindex) as u32))
}
