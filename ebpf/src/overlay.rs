//! Service-IP overlay (IPv4): translation on a container's host-side veth,
//! the tunnel to other nodes, decapsulation and delivery on the uplink.
//! Tables: `tapmesh_common::overlay`.

use core::{
    intrinsics::{atomic_xadd, AtomicOrdering},
    mem::size_of,
};

use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_fib_lookup as FibParams,
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP, BPF_F_MARK_MANGLED_0,
        BPF_F_PSEUDO_HDR, BPF_NOEXIST,
    },
    helpers::generated::{
        bpf_fib_lookup, bpf_ktime_get_ns, bpf_l4_csum_replace, bpf_redirect, bpf_redirect_neigh,
        bpf_skb_change_tail,
    },
    programs::{TcContext, XdpContext},
};
use tapmesh_common::{
    overlay::{
        local_slot, ConntrackKey, ConntrackValue, FragmentKey, Instance, Local, LocalSlot, Miss,
        OverlayConfig, Service, CONFIG_SERVICES_OUTSIDE_PREFIX, CT_FORWARD, CT_REVERSE,
        INSTANCE_LOCAL, INSTANCE_REMOTE, LOCAL_SLOT_ONE, LOCAL_SLOT_SHARED, POLICY_ROUND_ROBIN,
        SERVICE_SLOTS,
    },
    DropReason,
};

use crate::{
    csum,
    headers::*,
    lb::{adjust_head, outer_ipv4, write_macs},
    maps::*,
    packet::{load16, load32, store16, store32, Packet},
};

const ETH_LEN: usize = size_of::<EthHdr>();
/// Outer IPv4 + UDP.
const TUNNEL_LEN: usize = 20 + 8;
/// The ICMP error: IPv4 header, ICMP header, the offending IPv4 header and 8 bytes.
const ICMP_ERROR_LEN: usize = 20 + 8 + 20 + 8;
const IP_DF: u16 = 0x4000;
const IP_FRAGMENT: u16 = 0x3fff;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO: u8 = 8;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
const BPF_FIB_LKUP_RET_NO_NEIGH: i64 = 7;
const AF_INET: u8 = 2;

/// An IPv4 packet as the overlay sees it. Addresses and ports are words in
/// memory order (network order), as they are compared and written back.
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
    dont_fragment: bool,
    header_len: usize,
    /// [`NOT_FRAGMENT`], [`FIRST_FRAGMENT`] or [`LATER_FRAGMENT`].
    fragment: u8,
    /// The identification field, network order (fragments of a datagram share it).
    id: u16,
}

pub const NOT_FRAGMENT: u8 = 0;
/// Offset 0, more fragments: the one with the ports.
pub const FIRST_FRAGMENT: u8 = 1;
/// No L4 header: translated as its first fragment was (`tm_ov_frags`, `tm_ov_frags6`).
pub const LATER_FRAGMENT: u8 = 2;
const IP_OFFSET: u16 = 0x1fff;

/// Reads an IPv4 header at `l3` and what follows it, straight-line. `None`:
/// not IPv4.
#[inline(always)]
fn ip4_at(pkt: &Packet, l3: usize, bad: DropReason) -> Result<Option<Ip4>, DropReason> {
    let ip: *const Ipv4Hdr = pkt.header(l3, bad)?;
    // SAFETY: inside the header just checked.
    let (version_ihl, protocol, frag, total_len, src, dst, id) = unsafe {
        (
            (*ip).version_ihl,
            (*ip).protocol,
            u16::from_be(load16(&(*ip).frag_off)),
            u16::from_be(load16(&(*ip).total_length)),
            load32(&(*ip).src),
            load32(&(*ip).dst),
            load16(&(*ip).id),
        )
    };
    if version_ihl >> 4 != 4 {
        return Ok(None);
    }
    let header_len = ((version_ihl & 0x0f) as usize) * 4;
    if header_len < 20 {
        return Err(bad);
    }
    let l4 = l3 + header_len;
    let mut packet = Ip4 {
        l3,
        l4,
        protocol,
        src,
        dst,
        src_port: 0,
        dst_port: 0,
        tracked: false,
        total_len,
        dont_fragment: frag & IP_DF != 0,
        header_len,
        fragment: NOT_FRAGMENT,
        id,
    };
    if frag & IP_OFFSET != 0 {
        packet.fragment = LATER_FRAGMENT;
        return Ok(Some(packet));
    }
    if frag & IP_FRAGMENT != 0 {
        packet.fragment = FIRST_FRAGMENT;
    }
    match protocol {
        IPPROTO_TCP | IPPROTO_UDP => {
            if let Ok(p) = pkt.header::<[[u8; 2]; 2]>(l4, bad) {
                // SAFETY: both ports are inside the 4 bytes just checked.
                unsafe {
                    packet.src_port = load16(&(*p)[0]);
                    packet.dst_port = load16(&(*p)[1]);
                }
                packet.tracked = true;
            }
        }
        IPPROTO_ICMP => {
            if let Ok(p) = pkt.header::<[u8; 6]>(l4, bad) {
                // SAFETY: type and identifier are inside the 6 bytes just checked.
                let kind = unsafe { (*p)[0] };
                if kind == ICMP_ECHO || kind == ICMP_ECHO_REPLY {
                    packet.src_port = unsafe { load16((p as *const u8).add(4) as *const [u8; 2]) };
                    packet.tracked = true;
                }
            }
        }
        _ => {}
    }
    Ok(Some(packet))
}

#[inline(always)]
fn key_of(ip: &Ip4) -> ConntrackKey {
    ConntrackKey {
        src: ip.src,
        dst: ip.dst,
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

/// Sends the kernel one notice per unknown service IP in `tm_ov_pending`.
#[inline(always)]
fn signal_miss(ip: &Ip4) {
    // SAFETY: a plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    if tm_ov_pending
        .insert(&ip.dst, &now, BPF_NOEXIST as u64)
        .is_ok()
    {
        let miss = Miss {
            service_addr: ip.dst,
            client_addr: ip.src,
            port: ip.dst_port,
            protocol: ip.protocol,
            _pad: 0,
        };
        let _ = tm_ov_misses.output(&miss, 0);
    }
}

#[inline(always)]
fn in_prefix(config: &OverlayConfig, addr: u32) -> bool {
    config.service_mask != 0 && addr & config.service_mask == config.service_prefix
}

/// A container of this node by its namespace address: from its array slot
/// when it has the slot alone (the slot is returned too, for its `dialled`
/// flag), else from `tm_ov_locals`. An empty slot answers without a lookup.
#[inline(always)]
fn local_at(addr: u32) -> Option<(&'static Local, Option<*mut LocalSlot>)> {
    let slot = tm_ov_local_slots.get_ptr_mut(local_slot(addr))?;
    // SAFETY: a map value, valid for the program's run.
    unsafe {
        match (*slot).state {
            LOCAL_SLOT_ONE if (*slot).addr == addr => Some((&(*slot).local, Some(slot))),
            LOCAL_SLOT_SHARED => tm_ov_locals.get(&addr).map(|l| (l, None)),
            _ => None,
        }
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
    binding_of(unsafe { tm_ov_conntrack.get(key) }?)
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
        src: ip.src,
        dst: ip.dst,
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
        new_src: ct.new_src,
        reply_src: ct.reply_src,
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
            src: new_src,
            dst: inst.ns_addr,
            ..*key
        };
        // SAFETY: the value is read right away.
        if let Some(ct) = unsafe { tm_ov_conntrack.get(&translated) } {
            if ct.kind == CT_REVERSE && ct.service_addr != new_src {
                reply_src = ct.service_addr;
            }
        }
    }
    let forward = ConntrackValue {
        kind: CT_FORWARD,
        instance: id,
        generation: inst.generation,
        service: service.id,
        service_addr: ip.dst,
        new_src,
        reply_src,
    };
    let _ = tm_ov_conntrack.insert(key, &forward, 0);
    let reverse_key = ConntrackKey {
        src: inst.reply_addr,
        dst: ip.src,
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
        service_addr: ip.dst,
        new_src: 0,
        reply_src: 0,
    };
    let _ = tm_ov_conntrack.insert(&reverse_key, &reverse, 0);
    Ok(Binding {
        id,
        instance: inst,
        service: service.id,
        new_src,
        reply_src,
    })
}

#[inline(always)]
pub fn count(map_index: u32, per_instance: bool, bytes: u64) {
    let counter = if per_instance {
        tm_ov_inst_stats.get_ptr_mut(map_index)
    } else {
        tm_ov_svc_stats.get_ptr_mut(map_index)
    };
    if let Some(c) = counter {
        // SAFETY: a per-CPU value only this CPU touches.
        unsafe { (*c).count(bytes) }
    }
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

/// The reverse translation for a reply about to be delivered: its source
/// becomes the service IP the client dialled.
#[inline(always)]
fn reverse_source(ip: &Ip4) -> Option<u32> {
    // SAFETY: the values are read right away.
    let ct = match (ip.fragment, ip.tracked) {
        (LATER_FRAGMENT, _) => unsafe { tm_ov_frags.get(&fragment_key(ip)) },
        (_, true) => unsafe { tm_ov_conntrack.get(&key_of(ip)) },
        _ => None,
    };
    match ct {
        Some(ct) if ct.kind == CT_REVERSE && ct.service_addr != ip.src => {
            if ip.fragment == FIRST_FRAGMENT {
                // For the later fragments, which carry no ports.
                let _ = tm_ov_frags.insert(&fragment_key(ip), ct, 0);
            }
            Some(ct.service_addr)
        }
        _ => None,
    }
}

/// Whether a frame is IPv6 (for `overlay6`).
#[inline(always)]
pub fn is_ipv6(pkt: &Packet) -> bool {
    match pkt.header::<EthHdr>(0, DropReason::TruncatedEthernet) {
        // SAFETY: inside the header just checked.
        Ok(eth) => (unsafe { load16(&(*eth).ether_type) }) == ETH_P_IPV6.to_be(),
        Err(_) => false,
    }
}

/// TC on a container's host-side veth, for packets the container sends. Not
/// inlined: the IPv4 and IPv6 paths each get their own stack frame (the
/// program's and the deepest call's must fit in 512 bytes together).
#[inline(never)]
pub fn from_container(ctx: &TcContext, pkt: &Packet) -> Result<i32, DropReason> {
    let pkt = *pkt;
    use aya_ebpf::bindings::TC_ACT_OK;

    let eth: *const EthHdr = pkt.header(0, DropReason::TruncatedEthernet)?;
    // SAFETY: inside the header just checked.
    if unsafe { load16(&(*eth).ether_type) } != ETH_P_IP.to_be() {
        return Ok(TC_ACT_OK);
    }
    let Some(ip) = ip4_at(&pkt, ETH_LEN, DropReason::TruncatedIpv4)? else {
        return Err(DropReason::BadIpv4Version);
    };
    let Some(config) = tm_ov_config.get(0) else {
        return Ok(TC_ACT_OK);
    };
    if config.flags & CONFIG_SERVICES_OUTSIDE_PREFIX == 0 && !in_prefix(config, ip.dst) {
        return Ok(TC_ACT_OK);
    }
    let key = key_of(&ip);
    let found = match ip.fragment {
        LATER_FRAGMENT => fragment_binding(&ip),
        _ => ip.tracked.then(|| established(&key)).flatten(),
    };
    let binding = match found {
        Some(b) => b,
        None => {
            // SAFETY: the value is read right away.
            let service = match unsafe { tm_ov_services.get(&ip.dst) } {
                Some(s) => s,
                None if in_prefix(config, ip.dst) => {
                    signal_miss(&ip);
                    return Err(DropReason::UnknownService);
                }
                None => return Ok(TC_ACT_OK),
            };
            if !ip.tracked {
                return Err(DropReason::UnsupportedServicePacket);
            }
            let (sender, slot) = local_at(ip.src).ok_or(DropReason::SenderNotDeployed)?;
            if let Some(slot) = slot {
                // SAFETY: a map value; written once, when it changes.
                unsafe {
                    if (*slot).dialled == 0 {
                        core::ptr::write_volatile(&raw mut (*slot).dialled, 1);
                    }
                }
            }
            bind(&ip, &key, service, sender.instance_addr)?
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
            service_addr: ip.dst,
            new_src: binding.new_src,
            reply_src: binding.reply_src,
        };
        let _ = tm_ov_frags.insert(&fragment_key(&ip), &value, 0);
    }
    let bytes = ctx.len() as u64;
    count(binding.service, false, bytes);
    count(id, true, bytes);

    if inst.kind == INSTANCE_REMOTE
        && ip.total_len > config.tunnel_mtu
        // SAFETY: reading a field of the context.
        && unsafe { (*ctx.skb.skb).gso_size } == 0
    {
        if ip.dont_fragment {
            return fragmentation_needed(ctx, &pkt, &ip, config);
        }
        return Err(DropReason::TooBigForTunnel);
    }

    // A reply to a flow the local instance dialled gets that flow's service
    // IP as its source at once.
    let new_dst = inst.ns_addr;
    let new_src = if inst.kind == INSTANCE_LOCAL && binding.reply_src != 0 {
        binding.reply_src
    } else {
        binding.new_src
    };
    let diff = rewrite_addresses(&pkt, &ip, new_src, new_dst)?;
    if ip.fragment != LATER_FRAGMENT {
        fix_l4_skb(ctx, &ip, diff);
    }

    if inst.kind == INSTANCE_LOCAL {
        let pkt = Packet::new(ctx.data(), ctx.data_end(), pkt.wire_len);
        let eth: *mut EthHdr = pkt.header_mut(0, DropReason::TruncatedEthernet)?;
        write_macs(eth, &inst.dst_mac, &inst.src_mac, ETH_P_IP.to_be_bytes());
        // SAFETY: a plain helper call.
        return Ok(unsafe { bpf_redirect(inst.ifindex, 0) } as i32);
    }
    if inst.kind != INSTANCE_REMOTE || config.tunnel_port == 0 {
        return Err(DropReason::NoInstance);
    }
    // Every fragment of a datagram takes the same outer source port.
    let ports = match ip.fragment {
        NOT_FRAGMENT => (ip.src_port as u32) << 16 ^ ip.dst_port as u32,
        _ => ip.id as u32,
    };
    let hash = ip.src ^ ip.dst ^ ports ^ id;
    encapsulate(ctx, ip.total_len as usize, inst, config, hash)?;
    tunnel_out(ctx, inst, config)
}

/// Puts outer IPv4 + UDP to the instance's node in front of the IP packet.
#[inline(always)]
pub fn encapsulate(
    ctx: &TcContext,
    inner_len: usize,
    inst: &Instance,
    config: &OverlayConfig,
    hash: u32,
) -> Result<(), DropReason> {
    let flags = (BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP) as u64;
    ctx.adjust_room(TUNNEL_LEN as i32, BPF_ADJ_ROOM_MAC, flags)
        .map_err(|_| DropReason::AdjustRoomFailed)?;
    let pkt = Packet::new(ctx.data(), ctx.data_end(), 0);
    let outer: *mut [[u8; 2]; 21] = pkt.header_mut(0, DropReason::AdjustRoomFailed)?;
    let words = outer_ipv4(
        (TUNNEL_LEN + inner_len) as u16,
        config.node_addr,
        inst.node_addr,
    );
    let sport = 0xc000u16 | ((hash ^ hash >> 16) as u16 & 0x3fff);
    // SAFETY: every store is inside the 42 bytes just checked.
    unsafe {
        // The outer packet is IPv4 whatever the inner one is.
        store16(&raw mut (*outer)[6], ETH_P_IP.to_be());
        let w = (outer as *mut u8).add(ETH_LEN) as *mut [u8; 4];
        for (i, word) in words.into_iter().enumerate() {
            store32(w.add(i), word);
        }
        store32(
            w.add(5),
            u32::from(sport.to_be()) | u32::from(inst.node_port) << 16,
        );
        store32(w.add(6), u32::from(((8 + inner_len) as u16).to_be()));
    }
    Ok(())
}

/// Sends an encapsulated packet to the next hop the daemon resolved, or the
/// one the FIB gives.
#[inline(always)]
pub fn tunnel_out(
    ctx: &TcContext,
    inst: &Instance,
    config: &OverlayConfig,
) -> Result<i32, DropReason> {
    let pkt = Packet::new(ctx.data(), ctx.data_end(), 0);
    let eth: *mut EthHdr = pkt.header_mut(0, DropReason::AdjustRoomFailed)?;
    if inst.ifindex != 0 {
        write_macs(eth, &inst.dst_mac, &inst.src_mac, ETH_P_IP.to_be_bytes());
        // SAFETY: a plain helper call.
        return Ok(unsafe { bpf_redirect(inst.ifindex, 0) } as i32);
    }
    // SAFETY: an all-zero bpf_fib_lookup is valid.
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    fib.family = AF_INET;
    fib.l4_protocol = IPPROTO_UDP;
    fib.dport = inst.node_port;
    fib.__bindgen_anon_1.tot_len = (ctx.len() as usize - ETH_LEN) as u16;
    // SAFETY: reading a field of the context.
    fib.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    fib.__bindgen_anon_3.ipv4_src = config.node_addr;
    fib.__bindgen_anon_4.ipv4_dst = inst.node_addr;
    // SAFETY: params is a valid, sized bpf_fib_lookup.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.skb.skb as *mut _,
            &mut fib,
            size_of::<FibParams>() as i32,
            0,
        )
    };
    if rc == BPF_FIB_LKUP_RET_NO_NEIGH {
        // The kernel resolves the neighbour and sends the packet after.
        // SAFETY: a plain helper call (no next-hop parameters: the FIB's).
        return Ok(unsafe { bpf_redirect_neigh(fib.ifindex, core::ptr::null_mut(), 0, 0) } as i32);
    }
    if rc != BPF_FIB_LKUP_RET_SUCCESS {
        return Err(DropReason::FibLookupFailed);
    }
    // SAFETY: inside the header checked above; `fib` is on the stack (byte
    // copies: the stack allows only aligned word access).
    unsafe {
        core::ptr::copy_nonoverlapping(&fib.dmac, &raw mut (*eth).dst, 1);
        core::ptr::copy_nonoverlapping(&fib.smac, &raw mut (*eth).src, 1);
    }
    // SAFETY: a plain helper call.
    Ok(unsafe { bpf_redirect(fib.ifindex, 0) } as i32)
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
    // Keep the offending header and 8 bytes, then make room for ours.
    let keep = (ETH_LEN + 28) as u32;
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
    let [l0, l1] = ((20 + 8 + 28) as u16).to_be_bytes();
    let ip_words = [
        u32::from_ne_bytes([0x45, 0xc0, l0, l1]),
        0,
        u32::from_ne_bytes([64, IPPROTO_ICMP, 0, 0]),
        config.gateway,
        ip.src,
    ];
    let ip_sum = csum::of_words(&ip_words);
    let [m0, m1] = config.tunnel_mtu.to_be_bytes();
    // SAFETY: every access is inside the 70 bytes just checked.
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
        let mut icmp = [0u32; 9];
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

/// What [`from_tunnel`] did with a packet.
pub enum Tunnel {
    /// Delivered to a container: the XDP action.
    Delivered(u32),
    /// Tunnel traffic for this node carrying an IPv6 packet: `overlay6`'s.
    Inner6,
    /// Not for a container here; nothing was changed.
    NotOurs,
}

/// Whether the packet may be overlay tunnel traffic (UDP to the tunnel
/// port): only then is [`from_tunnel`] called, a subprogram call saved on
/// every other packet.
#[inline(always)]
pub fn maybe_tunnel(pkt: &Packet) -> bool {
    let Some(config) = tm_ov_config.get(0) else {
        return false;
    };
    match pkt.header::<[[u8; 2]; 19]>(0, DropReason::TruncatedIpv4) {
        // SAFETY: the UDP destination port (bytes 36..38) is inside the 38 bytes just checked.
        Ok(p) => config.tunnel_port != 0 && unsafe { load16(&(*p)[18]) } == config.tunnel_port,
        Err(_) => false,
    }
}

/// XDP on the uplink: a tunnel packet for one of this node's containers is
/// decapsulated, translated back if it is a reply, and redirected to the
/// container's veth. `None`: not ours, nothing was changed. Not inlined: a
/// subprogram keeps the load balancer's code after it as the verifier knew it.
#[inline(never)]
pub fn from_tunnel(ctx: &XdpContext, pkt: &Packet) -> Result<Tunnel, DropReason> {
    let Some(config) = tm_ov_config.get(0) else {
        return Ok(Tunnel::NotOurs);
    };
    if config.tunnel_port == 0 {
        return Ok(Tunnel::NotOurs);
    }
    let outer: *const [[u8; 2]; 21] = match pkt.header(0, DropReason::TruncatedIpv4) {
        Ok(p) => p,
        Err(_) => return Ok(Tunnel::NotOurs),
    };
    let outer = outer as *const [u8; 2];
    // SAFETY: every read is inside the 42 bytes just checked.
    let (ether_type, version_ihl_proto, dst_hi, dst_lo, dport, frag) = unsafe {
        (
            load16(outer.add(6)),
            load16(outer.add(7)),
            load16(outer.add(15)),
            load16(outer.add(16)),
            load16(outer.add(18)),
            u16::from_be(load16(outer.add(10))),
        )
    };
    let [version_ihl, _] = version_ihl_proto.to_ne_bytes();
    // SAFETY: reading the protocol byte inside the header checked above.
    let protocol = unsafe { *(outer as *const u8).add(ETH_LEN + 9) };
    let dst = (dst_hi as u32) | (dst_lo as u32) << 16;
    if ether_type != ETH_P_IP.to_be()
        || version_ihl != 0x45
        || protocol != IPPROTO_UDP
        || dport != config.tunnel_port
        || dst != config.node_addr
        || frag & IP_FRAGMENT != 0
    {
        return Ok(Tunnel::NotOurs);
    }
    let inner_at = ETH_LEN + TUNNEL_LEN;
    let Some(ip) = ip4_at(pkt, inner_at, DropReason::BadTunnelPacket)? else {
        return Ok(Tunnel::Inner6);
    };
    if inner_at + ip.total_len as usize > pkt.wire_len {
        return Err(DropReason::BadTunnelPacket);
    }
    let Some((local, slot)) = local_at(ip.dst) else {
        return Ok(Tunnel::NotOurs);
    };
    // Only a container that dialled a service IP gets replies to translate.
    // SAFETY: a map value.
    let dialled = slot.is_none_or(|s| unsafe { core::ptr::read_volatile(&(*s).dialled) } != 0);
    if let Some(service_addr) = dialled.then(|| reverse_source(&ip)).flatten() {
        let diff = rewrite_addresses(pkt, &ip, service_addr, ip.dst)?;
        if ip.fragment != LATER_FRAGMENT {
            fix_l4_full(pkt, &ip, diff)?;
        }
    }
    let eth: *mut EthHdr = pkt.header_mut(TUNNEL_LEN, DropReason::BadTunnelPacket)?;
    write_macs(eth, &local.mac, &local.host_mac, ETH_P_IP.to_be_bytes());
    adjust_head(ctx, TUNNEL_LEN as i32)?;
    // SAFETY: a plain helper call.
    Ok(Tunnel::Delivered(
        unsafe { bpf_redirect(local.ifindex, 0) } as u32
    ))
}
