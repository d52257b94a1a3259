//! Service-IP overlay (IPv4): translation on a container's host-side veth,
//! the tunnel to other nodes (`tunnel.rs`), delivery of what the uplink
//! decapsulated. Packets are read by `parse.rs`. Tables:
//! `tapmesh_common::overlay`.

use core::intrinsics::{atomic_xadd, AtomicOrdering};

use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4,
        BPF_F_ADJ_ROOM_ENCAP_L4_UDP, BPF_F_ADJ_ROOM_FIXED_GSO, BPF_F_MARK_MANGLED_0,
        BPF_F_PSEUDO_HDR, BPF_NOEXIST,
    },
    helpers::generated::{
        bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_l4_csum_replace, bpf_redirect, bpf_skb_change_head, bpf_skb_change_tail,
        bpf_skb_load_bytes,
    },
    programs::{TcContext, XdpContext},
};
use tapmesh_common::{
    overlay::{
        local_slot, owner_slot, ConntrackKey, ConntrackValue, FragmentKey, Instance, Local, LocalSlot, Miss,
        HELD_BYTES, HOLDS_PER_ADDRESS, HOLDS_PER_SECOND, HOLDS_PER_VETH, MISS_FROM_STRANGER, STRANGER_ASKS_PER_SECOND,
        OverlayConfig, Service, CONFIG_SERVICES_OUTSIDE_PREFIX, CT_FORWARD, CT_REVERSE,
        INSTANCE_LOCAL, INSTANCE_REMOTE, LOCAL_SLOT_EMPTY, LOCAL_SLOT_ONE, LOCAL_SLOT_SHARED,
        OWNER_SLOT_ONE, OWNER_SLOT_SEEN, OWNER_SLOT_SHARED, OWNER_SLOT_STATE,
        POLICY_INSTANCE, POLICY_ROUND_ROBIN, SERVICE_SLOTS,
    },
    tunnel::TunnelConfig,
    DropReason,
};

use crate::{
    csum,
    headers::*,
    maps::*,
    packet::{load16, load32, store16, store32, Packet},
    parse::{parse, Fragment, Parsed, L3, MAPPED_V4_PREFIX},
    tunnel::{self, write_macs, TUNNEL_LEN},
};

/// The ICMP error: IPv4 header, ICMP header, the offending IPv4 header and 8 bytes.
/// IPv4, ICMP, then the quote: the offending header and 20 bytes (a TCP
/// header's fixed part; see `fragmentation_needed`).
const ICMP_ERROR_LEN: usize = 20 + 8 + QUOTE_LEN;
const QUOTE_LEN: usize = 20 + 20;
const IP_DF: u16 = 0x4000;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO: u8 = 8;

/// An IPv4 packet as the overlay sees it. Addresses are words in memory
/// order (as they are compared and written back; maps hold their bytes),
/// ports host order.
#[derive(Clone, Copy)]
struct Ip4 {
    /// Offset of the IPv4 header.
    l3: usize,
    l4: usize,
    protocol: u8,
    src: u32,
    dst: u32,
    /// TCP/UDP ports; ICMP echo: identifier and 0.
    src_port: u16,
    dst_port: u16,
    /// Ports were found (TCP, UDP, ICMP echo; a first fragment included).
    tracked: bool,
    total_len: u16,
    header_len: usize,
    /// [`NOT_FRAGMENT`], [`FIRST_FRAGMENT`] or [`LATER_FRAGMENT`].
    fragment: u8,
    /// The identification field, network order (fragments of a datagram share it).
    id: u16,
    /// ICMP: the type.
    icmp_type: u8,
}

pub const NOT_FRAGMENT: u8 = 0;
/// Offset 0, more fragments: the one with the ports.
pub const FIRST_FRAGMENT: u8 = 1;
/// No L4 header: translated as its first fragment was (`tm_ov_frags`, `tm_ov_frags6`).
pub const LATER_FRAGMENT: u8 = 2;

/// The overlay's view of a packet `parse` read as IPv4.
#[inline(always)]
fn ip4_of(p: &Parsed) -> Ip4 {
    let fragment = match p.fragment {
        Fragment::None => NOT_FRAGMENT,
        Fragment::First => FIRST_FRAGMENT,
        Fragment::Later => LATER_FRAGMENT,
    };
    let (mut src_port, mut dst_port, mut tracked) = (0, 0, false);
    if p.has_l4 {
        match p.protocol {
            IPPROTO_TCP | IPPROTO_UDP => {
                (src_port, dst_port, tracked) = (p.src_port, p.dst_port, true);
            }
            IPPROTO_ICMP if p.icmp_type == ICMP_ECHO || p.icmp_type == ICMP_ECHO_REPLY => {
                (src_port, tracked) = (p.icmp_id, true);
            }
            _ => {}
        }
    }
    Ip4 {
        l3: p.l3_offset,
        l4: p.l4_offset,
        protocol: p.protocol,
        src: p.src_addr[3],
        dst: p.dst_addr[3],
        src_port,
        dst_port,
        tracked,
        total_len: (p.l3_end - p.l3_offset) as u16,
        header_len: p.l4_offset - p.l3_offset,
        fragment,
        id: p.frag_id as u16,
        icmp_type: p.icmp_type,
    }
}

/// The packet an ICMP error quotes (its IPv4 header, 20 bytes, and ports),
/// addresses as words in memory order.
#[derive(Clone, Copy)]
struct Quoted {
    /// Offset of its IPv4 header.
    at: usize,
    protocol: u8,
    src: u32,
    dst: u32,
    src_port: u16,
    dst_port: u16,
}

/// The quoted packet of an ICMP error about a TCP or UDP flow (destination
/// unreachable, time exceeded, parameter problem), when it has a plain
/// 20-byte header and its ports.
#[inline(always)]
fn quoted(pkt: &Packet, ip: &Ip4) -> Option<Quoted> {
    if ip.protocol != IPPROTO_ICMP
        || ip.fragment != NOT_FRAGMENT
        || !(ip.icmp_type == 3 || ip.icmp_type == 11 || ip.icmp_type == 12)
    {
        return None;
    }
    let at = ip.l4 + 8;
    let h: *const [[u8; 4]; 6] = pkt.header(at, DropReason::TruncatedIcmp).ok()?;
    // SAFETY: every load is inside the 24 bytes just checked.
    let (first, protocol, src, dst, ports) = unsafe {
        let b = h as *const u8;
        (
            *b,
            *b.add(9),
            load32(&(*h)[3]),
            load32(&(*h)[4]),
            (*h)[5],
        )
    };
    // Its first fragment (offset 0) is the one with ports.
    // SAFETY: as above.
    let offset = unsafe { u16::from_be_bytes([(*h)[1][2], (*h)[1][3]]) } & 0x1fff;
    if first != 0x45 || offset != 0 || !(protocol == IPPROTO_TCP || protocol == IPPROTO_UDP) {
        return None;
    }
    Some(Quoted {
        at,
        protocol,
        src,
        dst,
        src_port: u16::from_be_bytes([ports[0], ports[1]]),
        dst_port: u16::from_be_bytes([ports[2], ports[3]]),
    })
}

/// Whether the quote, its L4 checksum included, lies inside the datagram:
/// bytes after it (a frame longer than its IP packet) are no part of the
/// error, nor of its checksum. (Decapsulation leaves none.)
#[inline(always)]
fn quote_in_datagram(ip: &Ip4, q: &Quoted) -> bool {
    let l4_end = q.at + 20 + if q.protocol == IPPROTO_UDP { 8 } else { 18 };
    l4_end <= ip.l3 + ip.total_len as usize
}

/// An ICMP error from an instance about a packet it got (the quoted packet
/// went from the error's destination to its source) seen as the reply it
/// stands for: the flow, conntrack and translation of that reply.
#[inline(always)]
fn as_reply(ip: &Ip4, q: &Quoted) -> Option<Ip4> {
    (q.src == ip.dst && q.dst == ip.src).then_some(Ip4 {
        protocol: q.protocol,
        src_port: q.dst_port,
        dst_port: q.src_port,
        tracked: true,
        ..*ip
    })
}

/// Gives the quoted packet the addresses `src`, `dst` (its IPv4 checksum,
/// its L4 checksum if the error holds it, and the ICMP checksum over them
/// follow). The ICMP checksum covers no pseudo header: the outer addresses
/// are the caller's.
#[inline(always)]
fn rewrite_quoted(pkt: &Packet, ip: &Ip4, q: &Quoted, src: u32, dst: u32) -> Result<(), DropReason> {
    // The ICMP header and the quoted IPv4 header through one pointer.
    // `black_box`: the compiler knows these bytes were checked in `quoted`,
    // through another pointer, and would drop the check the verifier needs.
    let l4 = core::hint::black_box(ip.l4);
    let h: *mut [[u8; 2]; 14] = pkt.header_mut(l4, DropReason::TruncatedIcmp)?;
    let addrs = csum::diff([q.src, q.dst], [src, dst]);
    let mut icmp = addrs as u64;
    // SAFETY: every field is inside the 28 bytes just checked.
    unsafe {
        let w = (h as *mut u8).add(8) as *mut [u8; 4];
        store32(w.add(3), src);
        store32(w.add(4), dst);
        let old = load16(&(*h)[9]);
        let new = csum::apply(old, addrs);
        store16(&raw mut (*h)[9], new);
        icmp += csum::diff([old as u32], [new as u32]) as u64;
    }
    // The quoted L4 checksum covers the addresses too (a pseudo header).
    let at = q.at + 20 + if q.protocol == IPPROTO_UDP { 6 } else { 16 };
    // Inside the datagram (`quote_in_datagram`).
    if let Ok(field) = pkt.header_mut::<[u8; 2]>(at, DropReason::TruncatedIcmp) {
        // SAFETY: inside the field just checked.
        unsafe {
            let old = load16(field);
            if !(q.protocol == IPPROTO_UDP && old == 0) {
                let mut new = csum::apply(old, addrs);
                if q.protocol == IPPROTO_UDP && new == 0 {
                    new = 0xffff;
                }
                store16(field, new);
                icmp += csum::diff([old as u32], [new as u32]) as u64;
            }
        }
    }
    let icmp = (icmp & 0xffff_ffff) + (icmp >> 32);
    let icmp = ((icmp & 0xffff_ffff) + (icmp >> 32)) as u32;
    // SAFETY: the ICMP checksum (bytes 2..4) is inside the 28 bytes checked above.
    unsafe { store16(&raw mut (*h)[1], csum::apply(load16(&(*h)[1]), icmp)) };
    Ok(())
}

/// An address word as the maps hold it.
#[inline(always)]
fn b4(word: u32) -> [u8; 4] {
    word.to_ne_bytes()
}

/// The word of an address in a map value (or a 4-byte aligned key).
#[inline(always)]
fn w4(bytes: &[u8; 4]) -> u32 {
    // SAFETY: a 4-byte field of a map value at a multiple of 4.
    unsafe { load32(bytes) }
}

/// Whether the IPv4 header at `ip.l3` has "don't fragment" set.
#[inline(always)]
fn dont_fragment(pkt: &Packet, ip: &Ip4) -> Result<bool, DropReason> {
    let hdr: *const Ipv4Hdr = pkt.header(ip.l3, DropReason::TruncatedIpv4)?;
    // SAFETY: inside the header just checked.
    Ok(u16::from_be(unsafe { load16(&(*hdr).frag_off) }) & IP_DF != 0)
}

#[inline(always)]
fn key_of(ip: &Ip4) -> ConntrackKey {
    ConntrackKey {
        src: b4(ip.src),
        dst: b4(ip.dst),
        src_port: ip.src_port,
        dst_port: ip.dst_port,
        protocol: ip.protocol,
        _pad: [0; 3],
    }
}

/// Offset of the L4 checksum and whether it covers the pseudo header.
#[inline(always)]
fn l4_checksum(ip: &Ip4) -> Option<(usize, bool)> {
    match ip.protocol {
        IPPROTO_TCP => Some((ip.l4 + 16, true)),
        IPPROTO_UDP => Some((ip.l4 + 6, true)),
        _ => None,
    }
}

/// Whether a frame is IPv6 (for `overlay6`): the EtherType alone, which
/// decides which subprogram parses it.
#[inline(always)]
pub fn is_ipv6(pkt: &Packet) -> bool {
    match pkt.header::<EthHdr>(0, DropReason::TruncatedEthernet) {
        // SAFETY: inside the header just checked.
        Ok(eth) => (unsafe { load16(&(*eth).ether_type) }) == ETH_P_IPV6.to_be(),
        Err(_) => false,
    }
}

/// Whether a decapsulated IPv4 packet may be for a container here: its
/// destination's slot in `tm_ov_loc_slots` is in use. One array read, so
/// the load balancer's tunnel packets skip the overlay's subprogram (and
/// its parse) when no container has that slot.
#[inline(always)]
pub fn maybe_local(pkt: &Packet) -> bool {
    // Ethernet, then the IPv4 destination at bytes 30..34.
    match pkt.header::<[[u8; 2]; 17]>(0, DropReason::TruncatedIpv4) {
        Ok(p) => {
            // SAFETY: the 4 bytes are inside the 34 just checked.
            let dst = unsafe { load32((p as *const u8).add(30) as *const [u8; 4]) };
            tm_ov_loc_slots
                .get(local_slot(b4(dst)))
                .is_some_and(|s| s.state != LOCAL_SLOT_EMPTY)
        }
        // Too short: the subprogram's parse says why.
        Err(_) => true,
    }
}

/// A packet that did not come through the tunnel, for a container here,
/// with a source in the service prefix (an instance or service IP, which
/// only the tunnel carries between nodes): forged, refused. Otherwise
/// anyone who can route to the node could pose as another node's instance
/// and have the container's replies tunnelled to that node.
#[inline(always)]
pub fn check_untunnelled(parsed: &Parsed) -> Result<(), DropReason> {
    let (src, dst) = (parsed.src_addr[3], parsed.dst_addr[3]);
    match tm_ov_config.get(0) {
        Some(config) if in_prefix(config, src) && local_at(dst).is_some() => {
            Err(DropReason::ServiceSourceOutsideTunnel)
        }
        _ => Ok(()),
    }
}

/// What an overlay delivery carries in `skb->mark` from the TC redirect
/// that makes it to the egress of the container's veth, where
/// [`check_delivery`] reads it. Only programs and sockets of the node's
/// namespace can set a mark: one from a container's namespace is cleared
/// as its packet crosses the veth.
pub const DELIVERY_MARK: u32 = 0x746d_6f76;

/// At the egress of a container's host-side veth (what the node's kernel
/// sends it, whichever interface it came in by): the same refusal as
/// [`check_untunnelled`] on the uplink, for every other way in (a second
/// interface, a port mapping's DNAT). A service-prefix source reaches a
/// container only as the overlay's own delivery: through XDP, which skips
/// this hook, or a TC redirect that marks it.
#[inline(always)]
pub fn check_delivery(ctx: &TcContext) -> Result<(), DropReason> {
    // SAFETY: fields of the context's __sk_buff.
    let (mark, protocol) = unsafe { ((*ctx.skb.skb).mark, (*ctx.skb.skb).protocol) };
    if mark == DELIVERY_MARK {
        return Ok(());
    }
    if protocol == ETH_P_IPV6.to_be() as u32 {
        return crate::overlay6::check_delivery(ctx);
    }
    if protocol != ETH_P_IP.to_be() as u32 {
        return Ok(());
    }
    let Some(config) = tm_ov_config.get(0) else {
        return Ok(());
    };
    // Source and destination, read in place when the headers are linear
    // (a helper call costs more than the rest of the check); a packet too
    // short to hold them has neither.
    let pkt = Packet::new(ctx.data(), ctx.data_end(), 0);
    let addrs = match pkt.header::<[[u8; 4]; 2]>(ETH_LEN + 12, DropReason::TruncatedIpv4) {
        // SAFETY: the 8 bytes were just checked.
        Ok(p) => unsafe { *p },
        Err(_) => match ctx.load::<[[u8; 4]; 2]>(ETH_LEN + 12) {
            Ok(a) => a,
            Err(_) => return Ok(()),
        },
    };
    // SAFETY: both words are inside `addrs`.
    let src = unsafe { load32(&addrs[0]) };
    // Every address a container takes packets for: its own, and multicast
    // or broadcast, which the node can send to its veth too.
    let dst = addrs[1];
    let shared = dst[0] >= 224;
    if in_prefix(config, src) && (shared || local_at(w4(&dst)).is_some()) {
        return Err(DropReason::ServiceSourceOutsideTunnel);
    }
    Ok(())
}

/// A packet to an unknown service IP (`UnknownService`) goes to the daemon
/// whole, within the budget: it is sent again once the cluster's table
/// names the address, so the sender loses nothing to the query (Oakestra
/// holds it too). Counted as `HeldForQuery`; one not kept stays a drop.
#[inline(always)]
pub fn hold_unknown(ctx: &TcContext, packed: crate::tc::Packed) -> crate::tc::Packed {
    if !packed.is(DropReason::UnknownService) {
        return packed;
    }
    let skb = ctx.skb.skb;
    let len = ctx.len();
    // Bounds the verifier can see: 1..=HELD_BYTES. A GSO packet would go
    // out again as one datagram.
    // SAFETY: a field of the program's own __sk_buff.
    if len == 0 || len > HELD_BYTES || unsafe { (*skb).gso_size } != 0 {
        return packed;
    }
    if !may_hold(ctx) || !within_budget(1, HOLDS_PER_SECOND) {
        return packed;
    }
    let Some(mut entry) = tm_ov_held.reserve(0) else {
        return packed;
    };
    let held = entry.as_mut_ptr();
    // SAFETY: `held` is the reserved record, HELD_BYTES of data; `ctx.skb`
    // is the program's own packet.
    let read = unsafe {
        (*held).ts_ns = bpf_ktime_get_ns();
        (*held).ifindex = (*skb).ifindex;
        (*held).len = len;
        bpf_skb_load_bytes(
            ctx.skb.skb as *const _,
            0,
            core::ptr::addr_of_mut!((*held).data) as *mut _,
            len,
        )
    };
    if read != 0 {
        entry.discard(0);
        return packed;
    }
    entry.submit(0);
    crate::tc::Packed::from(Err(DropReason::HeldForQuery))
}

/// Whether the daemon sends this packet again after holding it: its socket
/// is in `tm_ov_resend` for this veth (a cookie no container's socket can
/// have; the veth too, on a kernel whose cookies are per namespace), and a
/// tap of the port took its copy when it was held.
#[inline(always)]
pub fn sent_again(ctx: &TcContext) -> bool {
    // SAFETY: the program's own __sk_buff; 0 when the packet has no socket.
    let (cookie, ifindex) = unsafe { (bpf_get_socket_cookie(ctx.skb.skb as *mut _), (*ctx.skb.skb).ifindex) };
    // SAFETY: a map value read under RCU.
    cookie != 0 && unsafe { tm_ov_resend.get(&cookie) }.is_some_and(|&at| at == ifindex)
}

/// Counts a hold against the packet's destination (`tm_ov_hold_ips`)
/// and its veth (`tm_ov_hold_ifs`): whether fewer than
/// [`HOLDS_PER_ADDRESS`] and [`HOLDS_PER_VETH`] were held for them this
/// second.
#[inline(always)]
fn may_hold(ctx: &TcContext) -> bool {
    let mut key = [0u8; 16];
    // SAFETY: a field of the program's own __sk_buff; the loads write
    // within `key`.
    let (loaded, ifindex) = unsafe {
        let skb = ctx.skb.skb;
        let loaded = match u16::from_be((*skb).protocol as u16) {
            ETH_P_IP => {
                key[10] = 0xff;
                key[11] = 0xff;
                bpf_skb_load_bytes(skb as *const _, 14 + 16, key.as_mut_ptr().add(12) as *mut _, 4)
            }
            ETH_P_IPV6 => bpf_skb_load_bytes(skb as *const _, 14 + 24, key.as_mut_ptr() as *mut _, 16),
            _ => -1,
        };
        (loaded, (*skb).ifindex)
    };
    if loaded != 0 {
        return false;
    }
    // SAFETY: a plain helper call.
    let second = unsafe { bpf_ktime_get_ns() } / 1_000_000_000;
    count_second(tm_ov_hold_ifs.get_ptr_mut(&ifindex), second, HOLDS_PER_VETH)
        .unwrap_or_else(|| tm_ov_hold_ifs.insert(&ifindex, &(second << 16 | 1), 0).is_ok())
        && count_second(tm_ov_hold_ips.get_ptr_mut(&key), second, HOLDS_PER_ADDRESS)
            .unwrap_or_else(|| tm_ov_hold_ips.insert(&key, &(second << 16 | 1), 0).is_ok())
}

/// Counts one in `second << 16 | count` at `slot` (None: no entry yet):
/// whether fewer than `limit` were counted this second. Racing CPUs may
/// count a few more.
#[inline(always)]
fn count_second(slot: Option<*mut u64>, second: u64, limit: u64) -> Option<bool> {
    let slot = slot?;
    // SAFETY: a map value of this program's.
    unsafe {
        let value = core::ptr::read_volatile(slot);
        let (at, count) = (value >> 16, value & 0xffff);
        Some(if at != second {
            core::ptr::write_volatile(slot, second << 16 | 1);
            true
        } else if count < limit {
            core::ptr::write_volatile(slot, value + 1);
            true
        } else {
            false
        })
    }
}

/// Sends the kernel one notice per unknown service IP in `tm_ov_pending`.
#[inline(always)]
fn signal_miss(ip: &Ip4) {
    signal_miss_of(ip.dst, ip.src, ip.dst_port, ip.protocol, 0)
}

/// [`signal_miss`] for any address: a destination, or an inner source that
/// came through the tunnel (`other`: the packet's other address).
#[inline(always)]
fn signal_miss_of(service: u32, other: u32, port: u16, protocol: u8, flags: u8) {
    // SAFETY: a plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    if tm_ov_pending
        .insert(&b4(service), &now, BPF_NOEXIST as u64)
        .is_ok()
    {
        let miss = Miss {
            service_addr: b4(service),
            client_addr: b4(other),
            port,
            protocol,
            flags,
        };
        // A notice the ring had no room for must not leave the address
        // marked as told: the next packet tries again.
        if tm_ov_misses.output(&miss, 0).is_err() {
            let _ = tm_ov_pending.remove(&b4(service));
        }
    }
}

#[inline(always)]
fn in_prefix(config: &OverlayConfig, addr: u32) -> bool {
    let mask = w4(&config.service_mask);
    mask != 0 && addr & mask == w4(&config.service_prefix)
}

/// A container of this node by its namespace address: from its array slot
/// when it has the slot alone (the slot is returned too, for its `dialled`
/// flag), else from `tm_ov_locals`. An empty slot answers without a lookup.
#[inline(always)]
fn local_at(addr: u32) -> Option<(&'static Local, Option<*mut LocalSlot>)> {
    let slot = tm_ov_loc_slots.get_ptr_mut(local_slot(b4(addr)))?;
    // SAFETY: a map value, valid for the program's run.
    unsafe {
        match (*slot).state {
            LOCAL_SLOT_ONE if w4(&(*slot).addr) == addr => Some((&(*slot).local, Some(slot))),
            LOCAL_SLOT_SHARED => tm_ov_locals.get(&b4(addr)).map(|l| (l, None)),
            _ => None,
        }
    }
}

/// The container at `addr` if it is the one behind interface `ingress`.
#[inline(always)]
fn sender_here(
    addr: u32,
    ingress: u32,
) -> Result<(&'static Local, Option<*mut LocalSlot>), DropReason> {
    match local_at(addr) {
        Some(found) if found.0.ifindex == ingress => Ok(found),
        _ => Err(DropReason::SenderNotDeployed),
    }
}

/// The instance a new flow of `service` takes.
#[inline(always)]
pub fn pick(service: &Service) -> Result<u32, DropReason> {
    if service.slots == 0 {
        return Err(DropReason::NoInstance);
    }
    let mut slot = 0u32;
    if service.policy == POLICY_ROUND_ROBIN {
        // The turn is read, then advanced atomically (BPF v1 has no fetching
        // add): two flows starting at the same instant on two CPUs may share
        // a turn, none is lost.
        let turn = match tm_ov_rr.get_ptr_mut(service.id) {
            // SAFETY: a map value of 4 aligned bytes, shared by every CPU.
            Some(p) => unsafe {
                let turn = core::ptr::read_volatile(p);
                atomic_xadd::<u32, u32, { AtomicOrdering::Relaxed }>(p, 1);
                turn
            },
            None => 0,
        };
        slot = turn % service.slots as u32;
    }
    tm_ov_slots
        .get(service.id * SERVICE_SLOTS + slot)
        .copied()
        .ok_or(DropReason::NoInstance)
}

/// What a flow's packets get: the instance, the new source, and (to a
/// local instance) the reverse translation of a reply.
struct Binding {
    id: u32,
    instance: &'static Instance,
    service: u32,
    new_src: u32,
    reply_src: u32,
}

/// The binding of an established flow: one conntrack lookup, valid while
/// its instance keeps the generation it had.
#[inline(always)]
fn established(key: &ConntrackKey) -> Option<Binding> {
    // SAFETY: the value is read right away.
    binding_of(unsafe { tm_ov_ct.get(key) }?)
}

/// A later fragment's binding: the one its first fragment recorded.
#[inline(always)]
fn fragment_binding(ip: &Ip4) -> Option<Binding> {
    // SAFETY: the value is read right away.
    binding_of(unsafe { tm_ov_frags.get(&fragment_key(ip)) }?)
}

#[inline(always)]
fn fragment_key(ip: &Ip4) -> FragmentKey {
    FragmentKey {
        src: b4(ip.src),
        dst: b4(ip.dst),
        id: ip.id,
        protocol: ip.protocol,
        _pad: 0,
    }
}

#[inline(always)]
fn binding_of(ct: &ConntrackValue) -> Option<Binding> {
    if ct.kind != CT_FORWARD {
        return None;
    }
    let instance = tm_ov_instances.get(ct.instance)?;
    if instance.generation != ct.generation || instance.kind == 0 {
        return None;
    }
    Some(Binding {
        id: ct.instance,
        instance,
        service: ct.service,
        new_src: w4(&ct.new_src),
        reply_src: w4(&ct.reply_src),
    })
}

/// Binds a new flow to an instance of `service`: forward and reverse
/// conntrack entries.
#[inline(always)]
fn bind(
    ip: &Ip4,
    key: &ConntrackKey,
    service: &Service,
    new_src: u32,
) -> Result<Binding, DropReason> {
    let id = pick(service)?;
    let inst = match tm_ov_instances.get(id) {
        Some(i) if i.kind != 0 => i,
        _ => return Err(DropReason::NoInstance),
    };
    let (reply_src_port, reply_dst_port) = if ip.protocol == IPPROTO_ICMP {
        (ip.src_port, 0)
    } else {
        (ip.dst_port, ip.src_port)
    };
    // To a local instance, the packet may be a reply to a flow that instance
    // dialled: its reverse entry is found once, here, and kept.
    let mut reply_src = 0;
    if inst.kind == INSTANCE_LOCAL {
        let translated = ConntrackKey {
            src: b4(new_src),
            dst: inst.ns_addr,
            ..*key
        };
        // SAFETY: the value is read right away.
        if let Some(ct) = unsafe { tm_ov_ct.get(&translated) } {
            if ct.kind == CT_REVERSE && w4(&ct.service_addr) != new_src {
                reply_src = w4(&ct.service_addr);
            }
        }
    }
    let forward = ConntrackValue {
        kind: CT_FORWARD,
        instance: id,
        generation: inst.generation,
        service: service.id,
        service_addr: b4(ip.dst),
        new_src: b4(new_src),
        reply_src: b4(reply_src),
    };
    let _ = tm_ov_ct.insert(key, &forward, 0);
    let reverse_key = ConntrackKey {
        src: inst.reply_addr,
        dst: b4(ip.src),
        src_port: reply_src_port,
        dst_port: reply_dst_port,
        protocol: ip.protocol,
        _pad: [0; 3],
    };
    let reverse = ConntrackValue {
        kind: CT_REVERSE,
        instance: id,
        generation: inst.generation,
        service: service.id,
        service_addr: b4(ip.dst),
        new_src: [0; 4],
        reply_src: [0; 4],
    };
    let _ = tm_ov_ct.insert(&reverse_key, &reverse, 0);
    if inst.kind == INSTANCE_LOCAL {
        // The instance's replies to this sender bind again: an earlier flow
        // from the same ports to another of its service IPs left them
        // showing that one.
        let replies = ConntrackKey {
            src: inst.ns_addr,
            dst: b4(new_src),
            ..reverse_key
        };
        let _ = tm_ov_ct.remove(&replies);
    }
    Ok(Binding {
        id,
        instance: inst,
        service: service.id,
        new_src,
        reply_src,
    })
}

#[inline(always)]
pub fn count(map_index: u32, per_instance: bool, wire: (u64, u64)) {
    let counter = if per_instance {
        tm_ov_ins_stats.get_ptr_mut(map_index)
    } else {
        tm_ov_svc_stats.get_ptr_mut(map_index)
    };
    if let Some(c) = counter {
        // SAFETY: a per-CPU value only this CPU touches.
        unsafe { (*c).count_many(wire.0, wire.1) }
    }
}

/// The packets and bytes a packet from a container stands for on the
/// wire: a GSO packet's segments, each with its own copy of the headers
/// up to the end of the TCP or UDP header at `l4`, as the receiving end
/// counts them.
#[inline(always)]
pub fn on_the_wire(ctx: &TcContext, pkt: &Packet, l4: usize, protocol: u8) -> (u64, u64) {
    let len = ctx.len() as u64;
    // SAFETY: reading a field of the context.
    let segments = unsafe { (*ctx.skb.skb).gso_segs } as u64;
    if segments <= 1 {
        return (1, len);
    }
    let header = match protocol {
        IPPROTO_UDP => 8,
        IPPROTO_TCP => match pkt.header::<[u8; 13]>(l4, DropReason::TruncatedTcp) {
            // SAFETY: inside the 13 bytes just checked.
            Ok(h) => usize::from(unsafe { (*h)[12] } >> 4) * 4,
            Err(_) => return (segments, len),
        },
        _ => return (segments, len),
    };
    (segments, len + (segments - 1) * (l4 + header) as u64)
}

/// Rewrites the addresses of the IPv4 header at `ip.l3` and its checksum;
/// returns the checksum difference for the L4 pseudo header.
#[inline(always)]
fn rewrite_addresses(pkt: &Packet, ip: &Ip4, src: u32, dst: u32) -> Result<u32, DropReason> {
    let hdr: *mut Ipv4Hdr = pkt.header_mut(ip.l3, DropReason::TruncatedIpv4)?;
    let diff = csum::diff([ip.src, ip.dst], [src, dst]);
    // SAFETY: every field is inside the header just checked.
    unsafe {
        store32(&raw mut (*hdr).src, src);
        store32(&raw mut (*hdr).dst, dst);
        let old = load16(&(*hdr).checksum);
        store16(&raw mut (*hdr).checksum, csum::apply(old, diff));
    }
    Ok(diff)
}

/// The L4 checksum after an address change, in a complete (not offloaded)
/// packet: XDP. A UDP checksum of 0 (none) stays 0.
#[inline(always)]
fn fix_l4_full(pkt: &Packet, ip: &Ip4, diff: u32) -> Result<(), DropReason> {
    let Some((at, _)) = l4_checksum(ip) else {
        return Ok(());
    };
    let field: *mut [u8; 2] = pkt.header_mut(at, DropReason::TruncatedUdp)?;
    // SAFETY: inside the field just checked.
    unsafe {
        let old = load16(field);
        if ip.protocol == IPPROTO_UDP && old == 0 {
            return Ok(());
        }
        let mut new = csum::apply(old, diff);
        if ip.protocol == IPPROTO_UDP && new == 0 {
            new = 0xffff;
        }
        store16(field, new);
    }
    Ok(())
}

/// The L4 checksum after an address change in TC: the kernel's helper knows
/// whether the checksum is offloaded (then only the pseudo header is in it).
#[inline(always)]
fn fix_l4_skb(ctx: &TcContext, ip: &Ip4, diff: u32) {
    if let Some((at, _)) = l4_checksum(ip) {
        let mut flags = BPF_F_PSEUDO_HDR as u64;
        if ip.protocol == IPPROTO_UDP {
            flags |= BPF_F_MARK_MANGLED_0 as u64;
        }
        // SAFETY: the helper checks the offset against the packet.
        unsafe { bpf_l4_csum_replace(ctx.skb.skb, at as u32, 0, diff as u64, flags) };
    }
}

/// Refuses a tunnel packet for a container here whose inner source is
/// known to belong to a node other than `node`, the one that sent it
/// (`OWNER_THIS_NODE` never matches: a sender is never this node). A
/// source with no known owner is the caller's to judge ([`unknown_source`]).
#[inline(always)]
pub fn check_owner(owner: Option<&[u8; 4]>, node: u32) -> Result<(), DropReason> {
    match owner {
        // SAFETY: a 4-byte map value.
        Some(owner) if unsafe { load32(owner) } != node => Err(DropReason::TunnelForeignSource),
        _ => Ok(()),
    }
}

/// [`check_owner`] for an IPv4 inner source: its slot in `tm_ov_own_slots`
/// answers (an array read, which the verifier inlines); only a slot that
/// several owners share, or that is being rewritten, asks `tm_ov_owners`.
#[inline(always)]
fn check_owner_slot(pkt: &Packet, ip: &Ip4, node: u32) -> Result<(), DropReason> {
    let Some(slot) = tm_ov_own_slots.get_ptr_mut(owner_slot(b4(ip.src))) else {
        return Ok(());
    };
    // SAFETY: a map value, valid for the program's run; the daemon rewrites
    // whole slots, this only sets one bit of `state`, atomically.
    let (seen, state) = unsafe { (&raw mut (*slot).state, core::ptr::read_volatile(&(*slot).state)) };
    // SAFETY: as above.
    let slot = unsafe { &*slot };
    match state & OWNER_SLOT_STATE {
        OWNER_SLOT_ONE if w4(&slot.addr) == ip.src => {
            check_owner(Some(&slot.owner), node)?;
            if state & !OWNER_SLOT_STATE == 0 {
                mark_seen(seen);
            }
            Ok(())
        }
        OWNER_SLOT_SHARED => {
            // The key is read from the packet: a copy on the stack would
            // push the deepest call past the 512 bytes of stack.
            let src: *const [u8; 4] = pkt.header(ip.l3 + 12, DropReason::BadTunnelPacket)?;
            // SAFETY: the key is inside the header just checked; the value is read right away.
            match unsafe { tm_ov_owners.get(&*src) } {
                Some(owner) => {
                    check_owner(Some(owner), node)?;
                    // The mark is the slot's: the daemon credits every
                    // address it asks about that maps here.
                    if state & !OWNER_SLOT_STATE == 0 {
                        mark_seen(seen);
                    }
                    Ok(())
                }
                None => unknown_source(ip),
            }
        }
        _ => unknown_source(ip),
    }
}

/// Marks a slot seen without touching its state proper (the daemon may be
/// rewriting the slot: a plain store could undo that). An atomic add, the
/// one atomic this BPF CPU version has for 32 bits: CPUs racing past the
/// caller's test may each add, which only raises the bits above
/// [`OWNER_SLOT_STATE`], all of which mean seen.
#[inline(always)]
pub fn mark_seen(state: *mut u32) {
    // SAFETY: a map value's word.
    unsafe {
        atomic_xadd::<u32, u32, { AtomicOrdering::Relaxed }>(state, OWNER_SLOT_SEEN);
    }
}

/// A tunnelled source no table gives to any node. In the service prefix
/// it is one of three things. An instance IP this node has not learnt:
/// refused, and asked for once like an unknown destination, so the retry
/// passes once the table names its node (the reply to it would miss the
/// same table: the first exchange is lost either way). An instance IP the
/// tables hold but two nodes claim (mid-move): not judged. Another service
/// IP (RR, Closest), which no node sends from: refused. Outside the prefix
/// it is not judged: an address there is a namespace address (sent from
/// only by an instance without an instance IP) or a load-balanced client's
/// own, which no table or query can tie to a node.
#[inline(always)]
fn unknown_source(ip: &Ip4) -> Result<(), DropReason> {
    match tm_ov_config.get(0) {
        Some(config) if in_prefix(config, ip.src) => {
            // SAFETY: the value is read right away.
            match unsafe { tm_ov_services.get(&b4(ip.src)) } {
                Some(s) if s.policy == POLICY_INSTANCE => return Ok(()),
                Some(_) => {}
                None => signal_miss_of(ip.src, ip.dst, ip.src_port, ip.protocol, 0),
            }
            Err(DropReason::TunnelForeignSource)
        }
        _ => Ok(()),
    }
}

/// A plain tunnel packet from a node no table or setting names yet
/// (dropped as `tunnel_unknown_node` by the caller): when its inner IPv4
/// or IPv6 (`overlay6::ask_about_sender`) packet is for a container here from a service-prefix address no table
/// holds, that address is asked for as an unknown source from a known node
/// is ([`unknown_source`]). The cluster's answer places the address on its
/// node, which may use the tunnel from then on: nodes that join later reach
/// this one as in Oakestra, where any node is accepted, and the cluster
/// still decides who is a node. Reads, changes nothing.
#[inline(never)]
pub fn ask_about_sender(ctx: &XdpContext) {
    let pkt = crate::xdp::packet_of(ctx);
    let Ok(h) = pkt.header::<[u8; 20]>(tunnel::OUTER_LEN, DropReason::BadTunnelPacket) else {
        return;
    };
    // SAFETY: inside the 20 bytes just checked.
    if unsafe { (*h)[0] } >> 4 == 6 {
        return crate::overlay6::ask_about_sender(&pkt, tunnel::OUTER_LEN);
    }
    // SAFETY: every load is inside the 20 bytes just checked.
    let (version_ihl, protocol, src, dst) = unsafe {
        let w = h as *const [u8; 4];
        ((*h)[0], (*h)[9], load32(w.add(3)), load32(w.add(4)))
    };
    let Some(config) = tm_ov_config.get(0) else {
        return;
    };
    // SAFETY: only whether it is there is read.
    let known = unsafe { tm_ov_services.get(&b4(src)) }.is_some();
    // Options move nothing read here: the addresses and protocol are at
    // fixed offsets.
    let ipv4 = version_ihl >> 4 == 4 && version_ihl & 0x0f >= 5;
    if ipv4 && in_prefix(config, src) && !known && local_at(dst).is_some() {
        // An address asked about already (still pending) spends nothing of
        // the strangers' budget: repeats must not crowd out a new one. The
        // daemon clears an entry a second after it read it; one older than
        // `STALE_PENDING_NS` was left by a daemon gone meanwhile: asked again.
        // SAFETY: a plain helper call; the value is read right away.
        let now = unsafe { bpf_ktime_get_ns() };
        let pending = match unsafe { tm_ov_pending.get(&b4(src)) } {
            Some(at) if now.wrapping_sub(*at) < STALE_PENDING_NS => true,
            Some(_) => {
                let _ = tm_ov_pending.remove(&b4(src));
                false
            }
            None => false,
        };
        if !pending && stranger_may_ask() {
            signal_miss_of(src, dst, 0, protocol, MISS_FROM_STRANGER);
        }
    }
}

/// How old a stranger's pending ask may be before it is asked again (the
/// daemon clears its entries after 1 s).
pub const STALE_PENDING_NS: u64 = 3_000_000_000;

/// Whether strangers together have asked fewer than
/// [`STRANGER_ASKS_PER_SECOND`] times this second (counted here): an
/// outsider can send from any address, and every ask is work for the
/// daemon and a query to the cluster. Not atomic: CPUs racing may ask a
/// few more.
#[inline(always)]
pub fn stranger_may_ask() -> bool {
    within_budget(0, STRANGER_ASKS_PER_SECOND)
}

/// Counts one against budget `index` of `tm_ov_asks`: whether fewer than
/// `per_second` were counted this second.
#[inline(always)]
fn within_budget(index: u32, per_second: u64) -> bool {
    // SAFETY: a plain helper call.
    let second = unsafe { bpf_ktime_get_ns() } / 1_000_000_000;
    count_second(tm_ov_asks.get_ptr_mut(index), second, per_second).unwrap_or(false)
}

/// The service IP a container dialled for the flow an ICMP error quotes,
/// when the error comes from the instance the quoted packet went to: its
/// reply's reverse entry.
#[inline(always)]
fn reverse_quoted(ip: &Ip4, q: &Quoted) -> Option<u32> {
    if q.src != ip.dst || q.dst != ip.src {
        return None;
    }
    let key = ConntrackKey {
        src: b4(q.dst),
        dst: b4(q.src),
        src_port: q.dst_port,
        dst_port: q.src_port,
        protocol: q.protocol,
        _pad: [0; 3],
    };
    // SAFETY: the value is read right away.
    match unsafe { tm_ov_ct.get(&key) } {
        Some(ct) if ct.kind == CT_REVERSE && w4(&ct.service_addr) != q.dst => Some(w4(&ct.service_addr)),
        _ => None,
    }
}

/// The reverse translation for a reply about to be delivered: its source
/// becomes the service IP the client dialled.
#[inline(always)]
fn reverse_source(ip: &Ip4) -> Option<u32> {
    // SAFETY: the values are read right away.
    let ct = match (ip.fragment, ip.tracked) {
        (LATER_FRAGMENT, _) => unsafe { tm_ov_frags.get(&fragment_key(ip)) },
        (_, true) => unsafe { tm_ov_ct.get(&key_of(ip)) },
        _ => None,
    };
    match ct {
        Some(ct) if ct.kind == CT_REVERSE && w4(&ct.service_addr) != ip.src => {
            if ip.fragment == FIRST_FRAGMENT {
                // For the later fragments, which carry no ports.
                let _ = tm_ov_frags.insert(&fragment_key(ip), ct, 0);
            }
            Some(w4(&ct.service_addr))
        }
        _ => None,
    }
}

/// TC on a container's host-side veth, for packets the container sends
/// (IPv4; anything else but IPv6 passes). Not inlined: the IPv4 and IPv6
/// paths each get their own stack frame (the program's and the deepest
/// call's must fit in 512 bytes together), and the verifier walks each
/// once.
#[inline(never)]
pub fn from_container(ctx: &TcContext, pkt: &Packet) -> crate::tc::Packed {
    crate::tc::Packed::from(try_from_container(ctx, pkt))
}

#[inline(always)]
fn try_from_container(ctx: &TcContext, pkt: &Packet) -> Result<i32, DropReason> {
    let pkt = *pkt;
    use aya_ebpf::bindings::TC_ACT_OK;

    let parsed = parse(&pkt)?;
    if parsed.l3 != L3::V4 {
        return Ok(TC_ACT_OK);
    }
    let ip = ip4_of(&parsed);
    // Whatever it sends, the source must be the container behind this
    // interface: another's address would borrow its instance IP and its
    // flows, any other would pose as a node in a tunnel packet of its own
    // making (Cilium drops a pod's packet from a source not its own too).
    // A container that is a local target of the load balancer answers from
    // its stream's VIPs: that passes, but never to a service IP.
    // SAFETY: reading a field of the context.
    let ingress = unsafe { (*ctx.skb.skb).ifindex };
    let sender = sender_here(ip.src, ingress);
    if sender.is_err() && !crate::lb::answers_from(&[0, 0, MAPPED_V4_PREFIX, ip.src], ingress) {
        return Err(DropReason::SenderNotDeployed);
    }
    let Some(config) = tm_ov_config.get(0) else {
        return Ok(TC_ACT_OK);
    };
    if config.flags & CONFIG_SERVICES_OUTSIDE_PREFIX == 0 && !in_prefix(config, ip.dst) {
        return Ok(TC_ACT_OK);
    }
    // An ICMP error about a flow (a closed port, say) goes as the reply it
    // stands for, and the packet it quotes is translated with it: the
    // client's kernel finds its socket by that packet.
    let quote = match ip.tracked {
        true => None,
        false => quoted(&pkt, &ip)
            .filter(|q| quote_in_datagram(&ip, q))
            .and_then(|q| as_reply(&ip, &q).map(|f| (f, q))),
    };
    let flow = quote.map_or(ip, |(f, _)| f);
    let key = key_of(&flow);
    let found = match ip.fragment {
        LATER_FRAGMENT => fragment_binding(&ip),
        _ => flow.tracked.then(|| established(&key)).flatten(),
    };
    let binding = match found {
        Some(b) => {
            sender?;
            b
        }
        None => {
            // SAFETY: the value is read right away.
            let service = match unsafe { tm_ov_services.get(&b4(ip.dst)) } {
                Some(s) => s,
                None if in_prefix(config, ip.dst) => {
                    signal_miss(&flow);
                    return Err(DropReason::UnknownService);
                }
                None => return Ok(TC_ACT_OK),
            };
            if !flow.tracked {
                return Err(DropReason::UnsupportedServicePacket);
            }
            let (sender, slot) = sender?;
            if let Some(slot) = slot {
                // SAFETY: a map value; written once, when it changes.
                unsafe {
                    if (*slot).dialled == 0 {
                        core::ptr::write_volatile(&raw mut (*slot).dialled, 1);
                    }
                }
            }
            bind(&flow, &key, service, w4(&sender.instance_addr))?
        }
    };
    let (id, inst) = (binding.id, binding.instance);
    if ip.fragment == FIRST_FRAGMENT {
        // The later fragments carry no ports: they follow this one.
        let value = ConntrackValue {
            kind: CT_FORWARD,
            instance: id,
            generation: inst.generation,
            service: binding.service,
            service_addr: b4(ip.dst),
            new_src: b4(binding.new_src),
            reply_src: b4(binding.reply_src),
        };
        let _ = tm_ov_frags.insert(&fragment_key(&ip), &value, 0);
    }
    let wire = on_the_wire(ctx, &pkt, ip.l4, ip.protocol);
    count(binding.service, false, wire);
    count(id, true, wire);

    if inst.kind == INSTANCE_REMOTE {
        // SAFETY: reading a field of the context.
        let gso_size = unsafe { (*ctx.skb.skb).gso_size } as usize;
        // A UDP GSO packet's segments keep their size through the tunnel
        // (`to_node`): each must fit it. Its own length must leave room for
        // the outer header's 16-bit length.
        let udp_gso = gso_size != 0 && ip.protocol == IPPROTO_UDP;
        if udp_gso && ip.total_len as usize + TUNNEL_LEN > u16::MAX as usize {
            return Err(DropReason::TooBigForTunnel);
        }
        let too_big = if gso_size == 0 {
            ip.total_len > config.tunnel_mtu
        } else {
            udp_gso && ip.header_len + 8 + gso_size > config.tunnel_mtu as usize
        };
        if too_big {
            // `fragmentation_needed` trims the packet, which ends its GSO.
            // A UDP GSO packet has no DF (the stack sets it only on a packet
            // within the MTU) though each datagram sent alone would have it,
            // and its segments cannot be fragmented here: it is answered too.
            if udp_gso || dont_fragment(&pkt, &ip)? {
                return fragmentation_needed(ctx, &pkt, &ip, config);
            }
            return Err(DropReason::TooBigForTunnel);
        }
    }

    // A reply to a flow the local instance dialled gets that flow's service
    // IP as its source at once.
    let new_dst = w4(&inst.ns_addr);
    let new_src = if inst.kind == INSTANCE_LOCAL && binding.reply_src != 0 {
        binding.reply_src
    } else {
        binding.new_src
    };
    let diff = rewrite_addresses(&pkt, &ip, new_src, new_dst)?;
    if ip.fragment != LATER_FRAGMENT {
        fix_l4_skb(ctx, &ip, diff);
    }
    if let Some((_, q)) = quote {
        // The quoted packet went from the client to the instance.
        let pkt = Packet::new(ctx.data(), ctx.data_end(), pkt.wire_len);
        rewrite_quoted(&pkt, &ip, &q, new_dst, new_src)?;
    }

    if inst.kind == INSTANCE_LOCAL {
        let pkt = Packet::new(ctx.data(), ctx.data_end(), pkt.wire_len);
        let eth: *mut EthHdr = pkt.header_mut(0, DropReason::TruncatedEthernet)?;
        write_macs(eth, &inst.dst_mac, &inst.src_mac, ETH_P_IP.to_be_bytes());
        ctx.set_mark(DELIVERY_MARK);
        // SAFETY: a plain helper call.
        return Ok(unsafe { bpf_redirect(inst.ifindex, 0) } as i32);
    }
    let tunnel = tunnel::config().ok_or(DropReason::NoInstance)?;
    if inst.kind != INSTANCE_REMOTE {
        return Err(DropReason::NoInstance);
    }
    // Every fragment of a datagram takes the same outer source port.
    let ports = match ip.fragment {
        NOT_FRAGMENT => (ip.src_port as u32) << 16 ^ ip.dst_port as u32,
        _ => ip.id as u32,
    };
    let hash = ip.src ^ ip.dst ^ ports ^ id;
    // A fragment's checksum is complete: the stack checksums a datagram
    // before cutting it (an offloaded one is finished in software first).
    let complete = ip.fragment != NOT_FRAGMENT;
    let udp = ip.protocol == IPPROTO_UDP;
    to_node(ctx, ip.total_len as usize, inst, tunnel, hash, complete, udp)
}

/// Sends an IP packet (`inner_len` bytes after Ethernet) through the
/// tunnel to a remote instance's node.
#[inline(always)]
pub fn to_node(
    ctx: &TcContext,
    inner_len: usize,
    inst: &Instance,
    t: &TunnelConfig,
    hash: u32,
    complete_v4: bool,
    udp: bool,
) -> Result<i32, DropReason> {
    let outer = tunnel::Outer {
        src: tunnel::node_addr(t),
        dst: w4(&inst.node_addr),
        dst_port: inst.node_port,
        src_port: tunnel::source_port(hash ^ hash >> 16),
        inner_len,
    };
    // SAFETY: reading a field of the context.
    let gso = unsafe { (*ctx.skb.skb).gso_size != 0 };
    if gso || !complete_v4 {
        // The kernel must know the tunnel: a GSO packet is segmented later
        // (inner headers, the UDP tunnel GSO type); an offloaded checksum
        // (TC cannot tell one) is finished by a NIC that parses the packet
        // itself at the first L4 header unless the skb says encapsulated,
        // so the inner one would stay unfinished; an IPv6 inner packet
        // needs the outer IPv4 protocol.
        let mut flags = (BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP) as u64;
        if gso && udp {
            // Each UDP GSO segment is a datagram of the sender's size: the
            // kernel refuses to shrink it, and the caller checked that it
            // fits the tunnel as it is (TCP's segments shrink by our 28).
            flags |= BPF_F_ADJ_ROOM_FIXED_GSO as u64;
        }
        ctx.adjust_room(TUNNEL_LEN as i32, BPF_ADJ_ROOM_MAC, flags)
            .map_err(|_| DropReason::AdjustRoomFailed)?;
    } else {
        // An IPv4 fragment, its checksum complete: room in front of the
        // frame is all it needs (~40 ns here against ~100 for
        // adjust_room). The 42 bytes are written whole below (the old
        // Ethernet header lies inside them).
        // SAFETY: a plain helper call on the context's skb.
        if unsafe { bpf_skb_change_head(ctx.skb.skb, TUNNEL_LEN as u32, 0) } != 0 {
            return Err(DropReason::AdjustRoomFailed);
        }
    }
    let pkt = Packet::new(ctx.data(), ctx.data_end(), 0);
    let eth = tunnel::encapsulate(&pkt, &outer, DropReason::AdjustRoomFailed)?;
    let hop = tunnel::Hop {
        ifindex: inst.ifindex,
        // The service path checks the tunnel MTU itself.
        mtu: 0,
        dst_mac: &inst.dst_mac,
        src_mac: &inst.src_mac,
    };
    // SAFETY: reading a field of the context.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let egress = tunnel::next_hop(ctx.skb.skb as *mut _, ifindex, eth, &hop, &outer, !gso)?;
    // SAFETY: a plain helper call.
    Ok(unsafe { bpf_redirect(egress, 0) } as i32)
}

/// Answers a packet too big for the tunnel with ICMP "fragmentation needed"
/// (type 3 code 4) carrying the tunnel MTU, sent back to the container.
#[inline(always)]
fn fragmentation_needed(
    ctx: &TcContext,
    pkt: &Packet,
    ip: &Ip4,
    config: &OverlayConfig,
) -> Result<i32, DropReason> {
    if ip.header_len != 20 {
        return Err(DropReason::TooBigForTunnel);
    }
    let eth: *const [[u8; 2]; 6] = pkt.header(0, DropReason::TruncatedEthernet)?;
    // SAFETY: the 12 MAC bytes are inside the header just checked.
    let macs = unsafe { *eth };
    // Keep the offending header and 20 bytes, then make room for ours. The
    // kernel trims an offloaded (CHECKSUM_PARTIAL) packet no shorter than
    // its L4 checksum field: 8 bytes would refuse every TCP segment. A
    // packet too big for the tunnel always has the 20.
    let keep = (ETH_LEN + QUOTE_LEN) as u32;
    // SAFETY: the helper checks the length.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, keep, 0) } != 0 {
        return Err(DropReason::AdjustRoomFailed);
    }
    ctx.adjust_room(28, BPF_ADJ_ROOM_MAC, 0)
        .map_err(|_| DropReason::AdjustRoomFailed)?;
    let pkt = Packet::new(ctx.data(), ctx.data_end(), 0);
    let out: *mut [[u8; 2]; (ETH_LEN + ICMP_ERROR_LEN) / 2] =
        pkt.header_mut(0, DropReason::AdjustRoomFailed)?;
    let out = out as *mut [u8; 2];
    let [l0, l1] = (ICMP_ERROR_LEN as u16).to_be_bytes();
    let ip_words = [
        u32::from_ne_bytes([0x45, 0xc0, l0, l1]),
        0,
        u32::from_ne_bytes([64, IPPROTO_ICMP, 0, 0]),
        w4(&config.gateway),
        ip.src,
    ];
    let ip_sum = csum::of_words(&ip_words);
    let [m0, m1] = config.tunnel_mtu.to_be_bytes();
    // SAFETY: every access is inside the 82 bytes just checked.
    unsafe {
        // Back to the sender: the MACs swap.
        for i in 0..3 {
            store16(out.add(i), u16::from_ne_bytes(macs[i + 3]));
            store16(out.add(i + 3), u16::from_ne_bytes(macs[i]));
        }
        let w = (out as *mut u8).add(ETH_LEN) as *mut [u8; 4];
        for (i, word) in ip_words.into_iter().enumerate() {
            store32(w.add(i), word);
        }
        store16((out as *mut u8).add(ETH_LEN + 10) as *mut [u8; 2], ip_sum);
        // ICMP: type 3 code 4, checksum, unused, next-hop MTU, then the quote.
        store32(w.add(5), u32::from_ne_bytes([3, 4, 0, 0]));
        store32(w.add(6), u32::from_ne_bytes([0, 0, m0, m1]));
        let mut icmp = [0u32; (8 + QUOTE_LEN) / 4];
        for (i, word) in icmp.iter_mut().enumerate() {
            *word = load32(w.add(5 + i));
        }
        store16(
            (out as *mut u8).add(ETH_LEN + 22) as *mut [u8; 2],
            csum::of_words(&icmp),
        );
    }
    // SAFETY: reading a field of the context, then a plain helper call.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    ctx_count_too_big();
    Ok(unsafe { bpf_redirect(ifindex, 0) } as i32)
}

#[inline(always)]
fn ctx_count_too_big() {
    crate::stats::Stats::of(tapmesh_common::ProgramSlot::TcService)
        .drop_reason(DropReason::TooBigForTunnel);
}

/// XDP on the uplink, after `tunnel::decapsulate`: an IPv4 packet for one
/// of this node's containers from `node` (the outer source, a word in
/// memory order) is checked against the owner of its source
/// ([`check_owner`]), translated back if it is a reply and redirected to
/// the container's veth. `None`: not for a container here, nothing was
/// changed. Not inlined, and the parse is inside: the verifier walks this
/// once, not once for every way the caller's parse can end.
#[inline(never)]
pub fn from_tunnel(ctx: &XdpContext, node: u32) -> Result<Option<u32>, DropReason> {
    let pkt = &crate::xdp::packet_of(ctx);
    let parsed = &parse(pkt)?;
    if parsed.l3 != L3::V4 {
        return Ok(None);
    }
    let ip = ip4_of(parsed);
    let Some((local, slot)) = local_at(ip.dst) else {
        return Ok(None);
    };
    // This node's own addresses come from no other node (the kernel drops
    // such a source on arrival).
    let gateway = tm_ov_config.get(0).map_or(0, |c| w4(&c.gateway));
    if tunnel::config().is_some_and(|t| tunnel::node_addr(t) == ip.src) || ip.src == gateway {
        return Err(DropReason::TunnelForeignSource);
    }
    check_owner_slot(pkt, &ip, node)?;
    // Only a container that dialled a service IP gets replies to translate.
    // SAFETY: a map value.
    let dialled = slot.is_none_or(|s| unsafe { core::ptr::read_volatile(&(*s).dialled) } != 0);
    if let Some(service_addr) = dialled.then(|| reverse_source(&ip)).flatten() {
        let diff = rewrite_addresses(pkt, &ip, service_addr, ip.dst)?;
        if ip.fragment != LATER_FRAGMENT {
            fix_l4_full(pkt, &ip, diff)?;
        }
    } else if dialled && !ip.tracked {
        // An ICMP error about a flow the container dialled: from the
        // service IP it dialled, and so is the packet it quotes.
        if let Some(q) = quoted(pkt, &ip) {
            if let Some(service_addr) = reverse_quoted(&ip, &q) {
                rewrite_addresses(pkt, &ip, service_addr, ip.dst)?;
                rewrite_quoted(pkt, &ip, &q, q.src, service_addr)?;
            }
        }
    }
    let eth: *mut EthHdr = pkt.header_mut(0, DropReason::BadTunnelPacket)?;
    write_macs(eth, &local.mac, &local.host_mac, ETH_P_IP.to_be_bytes());
    Ok(Some(crate::detour::port_call(local.ifindex) as u32))
}
