//! The node-to-node tunnel (`tapmesh_common::tunnel`), for the load balancer
//! (XDP, remote targets) and the service-IP overlay (TC, remote instances)
//! alike: one encapsulation, one next-hop lookup, one decapsulation.
//!
//! A next hop whose neighbour is not resolved drops the packet, counted as
//! `no_neighbour`, in both hooks. XDP has no other choice: it cannot queue a
//! packet for the kernel's neighbour resolution (`bpf_redirect_neigh` exists
//! for TC only), and one policy for both hooks means one behaviour to reason
//! about and one counter to watch. It is rare, because the daemon keeps the
//! neighbour of every node it tunnels to resolved (managed neighbour entries,
//! which the kernel keeps fresh by itself), for load-balancing targets and
//! overlay instances alike: only the first packets to a node whose entry is
//! still being resolved can meet it. Hops the daemon resolved skip the FIB
//! lookup altogether.

use core::{ffi::c_void, mem::size_of};

use aya_ebpf::{
    bindings::{bpf_fib_lookup as FibParams, xdp_md},
    helpers::generated::{bpf_fib_lookup, bpf_xdp_adjust_head},
    programs::XdpContext,
};
use tapmesh_common::{
    tunnel::{peer_slot, TunnelConfig, PEER_SLOT_ONE, PEER_SLOT_SHARED},
    DropReason,
};

use crate::{
    headers::*,
    maps::{tm_tunnel, tm_tunnel_peers, tm_tunnel_slots},
    packet::{load16, load32, store16, store32, Packet},
    parse::{Fragment, Parsed, L3},
};

/// Outer IPv4 + UDP (after the Ethernet header).
pub const TUNNEL_LEN: usize = 20 + 8;
/// Outer Ethernet + IPv4 + UDP.
pub const OUTER_LEN: usize = size_of::<EthHdr>() + TUNNEL_LEN;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
const BPF_FIB_LKUP_RET_NO_NEIGH: i64 = 7;
const AF_INET: u8 = 2;

/// This node's tunnel endpoint, when the tunnel is on.
#[inline(always)]
pub fn config() -> Option<&'static TunnelConfig> {
    tm_tunnel.get(0).filter(|t| t.port != 0)
}

/// This node's underlay address as a word in memory order.
#[inline(always)]
pub fn node_addr(t: &TunnelConfig) -> u32 {
    // SAFETY: bytes 0..4 of a map value (8-byte aligned).
    unsafe { load32(&t.node_addr) }
}

/// The outer headers of one tunnel packet. Addresses are words in memory
/// order; ports are host order.
pub struct Outer {
    pub src: u32,
    pub dst: u32,
    pub dst_port: u16,
    pub src_port: u16,
    /// Length of the inner IP packet.
    pub inner_len: usize,
}

/// The outer UDP source port for a flow hash: the same for every packet of
/// a flow, spread for ECMP between the nodes.
#[inline(always)]
pub fn source_port(hash: u32) -> u16 {
    0xc000u16 | (hash as u16 & 0x3fff)
}

/// The outer IPv4 header as five words in memory order, checksum included.
/// The one's-complement sum does not depend on byte order (RFC 1071), so it
/// is summed over the words' 16-bit halves as they are and stored as it is.
#[inline(always)]
fn outer_ipv4(total: u16, src: u32, dst: u32) -> [u32; 5] {
    let [t0, t1] = total.to_be_bytes();
    let mut ip = [
        u32::from_ne_bytes([0x45, 0, t0, t1]),
        u32::from_ne_bytes([0, 0, 0x40, 0]), // id 0, don't fragment
        u32::from_ne_bytes([64, IPPROTO_UDP, 0, 0]), // TTL, protocol, checksum 0
        src,
        dst,
    ];
    let mut sum = 0u32;
    for w in ip {
        sum += (w & 0xffff) + (w >> 16);
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    ip[2] |= ((!sum) & 0xffff) << 16;
    ip
}

/// Writes the outer EtherType, IPv4 and UDP headers into the room the
/// caller made in front of the inner packet (its first [`OUTER_LEN`]
/// bytes); the MACs are the next hop's ([`next_hop`]). Returns the
/// Ethernet header.
#[inline(always)]
pub fn encapsulate(
    pkt: &Packet,
    o: &Outer,
    missing: DropReason,
) -> Result<*mut EthHdr, DropReason> {
    let outer: *mut [[u8; 2]; OUTER_LEN / 2] = pkt.header_mut(0, missing)?;
    let total = (TUNNEL_LEN + o.inner_len) as u16;
    let ip = outer_ipv4(total, o.src, o.dst);
    // SAFETY: every store is inside the 42 bytes just checked.
    unsafe {
        store16(&raw mut (*outer)[6], ETH_P_IP.to_be());
        let w = (outer as *mut u8).add(size_of::<EthHdr>()) as *mut [u8; 4];
        for (i, word) in ip.into_iter().enumerate() {
            store32(w.add(i), word);
        }
        store32(
            w.add(5),
            u32::from(o.src_port.to_be()) | u32::from(o.dst_port.to_be()) << 16,
        );
        store32(w.add(6), u32::from(((8 + o.inner_len) as u16).to_be())); // checksum 0
    }
    Ok(outer as *mut EthHdr)
}

/// Writes an Ethernet header from two MACs that sit as in `Target` and
/// `Instance`: the destination 4-byte aligned, the source 2 bytes past an
/// aligned word (4- and 2-byte loads and stores instead of byte copies).
#[inline(always)]
pub fn write_macs(eth: *mut EthHdr, dst: &[u8; 6], src: &[u8; 6], ether_type: [u8; 2]) {
    let dst = dst.as_ptr();
    let src = src.as_ptr();
    let out = eth as *mut u8;
    // SAFETY: `eth` is a whole header from `Packet::header_mut`; the reads
    // are inside the two MACs.
    unsafe {
        store32(out as *mut _, load32(dst as *const _));
        store16(out.add(4) as *mut _, load16(dst.add(4) as *const _));
        store16(out.add(6) as *mut _, load16(src as *const _));
        store32(out.add(8) as *mut _, load32(src.add(2) as *const _));
        store16(out.add(12) as *mut _, u16::from_ne_bytes(ether_type));
    }
}

/// A next hop the daemon resolved: its interface (0: none, ask the FIB)
/// and the MACs to write.
pub struct Hop<'a> {
    pub ifindex: u32,
    /// The most the outer packet may take out of `ifindex` (0: unchecked).
    pub mtu: u32,
    pub dst_mac: &'a [u8; 6],
    pub src_mac: &'a [u8; 6],
}

/// Writes the next hop's MACs into the encapsulated packet's Ethernet
/// header and returns the interface to send it out of: the hop the daemon
/// resolved, else the kernel's FIB and neighbour table (`ctx`: the
/// program's context, `ifindex`: the interface the lookup starts from).
/// `check_len`: the lookup checks the outer packet's length against the
/// egress MTU; without it (a GSO skb, whose length is that of all its
/// segments) TC's lookup checks the skb as the kernel's forwarding does.
#[inline(always)]
pub fn next_hop(
    ctx: *mut c_void,
    ifindex: u32,
    eth: *mut EthHdr,
    hop: &Hop,
    o: &Outer,
    check_len: bool,
) -> Result<u32, DropReason> {
    if hop.ifindex != 0 {
        // What the FIB lookup's length check would refuse: the egress
        // interface would drop it, uncounted.
        if check_len && hop.mtu != 0 && TUNNEL_LEN + o.inner_len > hop.mtu as usize {
            return Err(DropReason::TooBigForTunnel);
        }
        write_macs(eth, hop.dst_mac, hop.src_mac, ETH_P_IP.to_be_bytes());
        return Ok(hop.ifindex);
    }
    // SAFETY: an all-zero bpf_fib_lookup is valid.
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    fib.family = AF_INET;
    fib.l4_protocol = IPPROTO_UDP;
    fib.sport = o.src_port.to_be();
    fib.dport = o.dst_port.to_be();
    if check_len {
        fib.__bindgen_anon_1.tot_len = (TUNNEL_LEN + o.inner_len) as u16;
    }
    fib.ifindex = ifindex;
    fib.__bindgen_anon_3.ipv4_src = o.src;
    fib.__bindgen_anon_4.ipv4_dst = o.dst;
    // SAFETY: params is a valid, sized bpf_fib_lookup.
    let rc = unsafe { bpf_fib_lookup(ctx, &mut fib, size_of::<FibParams>() as i32, 0) };
    match rc {
        BPF_FIB_LKUP_RET_SUCCESS => {
            // SAFETY: inside the header the caller checked; `fib` is on the
            // stack (byte copies: the stack allows only aligned word access).
            unsafe {
                core::ptr::copy_nonoverlapping(&fib.dmac, &raw mut (*eth).dst, 1);
                core::ptr::copy_nonoverlapping(&fib.smac, &raw mut (*eth).src, 1);
            }
            Ok(fib.ifindex)
        }
        BPF_FIB_LKUP_RET_NO_NEIGH => Err(DropReason::NoNeighbour),
        _ => Err(DropReason::FibLookupFailed),
    }
}

/// Moves the start of an XDP packet by `delta` bytes.
#[inline(always)]
pub fn adjust_head(ctx: &XdpContext, delta: i32) -> Result<(), DropReason> {
    // SAFETY: the helper checks the delta against the buffer.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx as *mut xdp_md, delta) } != 0 {
        return Err(DropReason::AdjustHeadFailed);
    }
    Ok(())
}

/// A tunnel packet for this node in its usual shape ([`plain`]).
pub struct Plain {
    /// The outer source, a word in memory order.
    pub src: u32,
    /// The inner packet's first byte (at [`OUTER_LEN`]).
    pub first: u8,
    /// The UDP payload's length: the most the inner packet may take.
    pub room: usize,
}

/// A tunnel packet for this node in its usual shape, read at fixed offsets
/// before any parse: Ethernet without a VLAN tag, IPv4 without options and
/// not a fragment, UDP to this node's address and tunnel port, the lengths
/// the parser accepts, and at least one inner byte. `None` for anything
/// else, which the parser then reads and judges (a tagged or optioned
/// tunnel packet is still decapsulated there, a bad length dropped with its
/// reason): what this takes, the parser would take with the same fields,
/// so it saves the outer parse without changing a verdict or a counter.
#[inline(always)]
pub fn plain(pkt: &Packet, t: &TunnelConfig) -> Option<Plain> {
    let h: *const [u8; OUTER_LEN + 1] = pkt.header(0, DropReason::TruncatedEthernet).ok()?;
    let w = h as *const [u8; 2];
    // SAFETY: every load is inside the 43 bytes just checked.
    let (ether_type, version_ihl, total, frag, protocol, src, dst, port, udp_len, first) = unsafe {
        (
            load16(w.add(6)),
            *(w as *const u8).add(14),
            u16::from_be(load16(w.add(8))) as usize,
            load16(w.add(10)),
            *(w as *const u8).add(23),
            load32(w.add(13) as *const [u8; 4]),
            load32(w.add(15) as *const [u8; 4]),
            load16(w.add(18)),
            u16::from_be(load16(w.add(19))) as usize,
            *(w as *const u8).add(OUTER_LEN),
        )
    };
    let plain = ether_type == ETH_P_IP.to_be()
        && version_ihl == 0x45
        && protocol == IPPROTO_UDP
        // Neither "more fragments" nor an offset (IP_DF may be set).
        && frag & 0x3fffu16.to_be() == 0
        && dst == node_addr(t)
        && port == t.port.to_be()
        && total >= TUNNEL_LEN
        && size_of::<EthHdr>() + total <= pkt.wire_len
        && udp_len >= size_of::<UdpHdr>()
        && udp_len + 20 <= total;
    plain.then_some(Plain {
        src,
        first,
        room: udp_len.saturating_sub(size_of::<UdpHdr>()),
    })
}

/// The first byte of the inner packet behind the UDP header at `udp` (as
/// the parser found it), or `bad_tunnel_packet` when there is none, and
/// the UDP payload's length (the parser checked it is at least 8). Read
/// as the ninth byte from the UDP header: a check of one byte at a
/// variable offset is one LLVM folds into a form the verifier cannot
/// follow (`pkt >= pkt_end` at offset 0).
#[inline(always)]
pub fn first_byte(pkt: &Packet, udp: usize) -> Result<(u8, usize), DropReason> {
    let at: *const [u8; 9] = pkt.header(udp, DropReason::BadTunnelPacket)?;
    // SAFETY: inside the 9 bytes just checked.
    let (first, udp_len) = unsafe { ((*at)[8], u16::from_be_bytes([(*at)[4], (*at)[5]])) };
    Ok((first, (udp_len as usize).saturating_sub(size_of::<UdpHdr>())))
}

/// Whether a parsed packet is tunnel traffic for this node: IPv4 without
/// options (no node sends them; the kernel judges one that has them), UDP,
/// not a fragment, to this node's address and tunnel port.
#[inline(always)]
pub fn is_ours(parsed: &Parsed, t: &TunnelConfig) -> bool {
    parsed.l3 == L3::V4
        && parsed.protocol == IPPROTO_UDP
        && parsed.has_l4
        && parsed.l4_offset == parsed.l3_offset + 20
        && parsed.fragment == Fragment::None
        && parsed.dst_port == t.port
        && parsed.dst_addr[3] == node_addr(t)
}

/// Refuses a tunnel packet whose outer source (a word in memory order) is
/// not a node the daemon named (`tm_tunnel_peers`): only nodes may use the
/// tunnel. The source's slot in `tm_tunnel_slots` answers first (an array
/// read, inlined by the verifier, where a hash lookup is a call: 11-15 ns
/// here); only a slot two nodes share asks the hash.
#[inline(always)]
pub fn check_peer(src: u32) -> Result<(), DropReason> {
    let bytes = src.to_ne_bytes();
    let known = match tm_tunnel_slots.get(peer_slot(bytes)) {
        // SAFETY: bytes 0..4 of a map value (4-byte aligned).
        Some(s) if s.state == PEER_SLOT_ONE => (unsafe { load32(&s.addr) }) == src,
        // SAFETY: a lookup; the value is not kept.
        Some(s) if s.state == PEER_SLOT_SHARED => unsafe { tm_tunnel_peers.get(&bytes) }.is_some(),
        _ => false,
    };
    if known {
        Ok(())
    } else {
        Err(DropReason::TunnelUnknownNode)
    }
}

/// Forwarded, as a router would: one hop less (the IPv4 checksum follows,
/// RFC 1624, as the kernel's `ip_decrease_ttl`), none left is the end of
/// it. A hop limit of 255 is what neighbour discovery trusts as sent on the
/// link, a TTL of 255 what GTSM (RFC 5082) trusts as one hop away; a
/// forwarded packet never arrives so. `short`: the reason for a header cut
/// short.
#[inline(always)]
pub fn one_hop_less(pkt: &Packet, at: usize, l3: L3, short: DropReason) -> Result<(), DropReason> {
    if l3 == L3::V6 {
        let h: *mut [u8; 8] = pkt.header_mut(at, short)?;
        // SAFETY: inside the 8 bytes just checked.
        unsafe {
            let hops = (*h)[7];
            if hops <= 1 {
                return Err(DropReason::TtlExceeded);
            }
            (*h)[7] = hops - 1;
        }
    } else {
        let h: *mut [[u8; 2]; 6] = pkt.header_mut(at, short)?;
        // SAFETY: inside the 12 bytes just checked.
        unsafe {
            let ttl = (*h)[4][0];
            if ttl <= 1 {
                return Err(DropReason::TtlExceeded);
            }
            (*h)[4][0] = ttl - 1;
            // The TTL's word lost 0x0100.
            let sum = u32::from(u16::from_be_bytes((*h)[5])) + 0x0100;
            (*h)[5] = ((sum + u32::from(sum >= 0xffff)) as u16).to_be_bytes();
        }
    }
    Ok(())
}

/// Removes the outer headers of a tunnel packet for this node (the inner
/// packet starts at `inner`, its first byte is `first`), leaving Ethernet
/// (its MACs kept) and the inner IP packet, whose version it returns. The
/// version is checked first: a packet that is neither IPv4 nor IPv6 inside
/// is left as it is and dropped. The caller reads `first` ([`plain`],
/// [`first_byte`]).
#[inline(always)]
pub fn decapsulate(
    ctx: &XdpContext,
    pkt: &Packet,
    inner: usize,
    first: u8,
    room: usize,
) -> Result<L3, DropReason> {
    let (l3, ether_type) = match first >> 4 {
        4 => (L3::V4, ETH_P_IP),
        6 => (L3::V6, ETH_P_IPV6),
        _ => return Err(DropReason::BadTunnelPacket),
    };
    // The inner packet must fill the UDP datagram (`room` bytes) exactly,
    // as every encapsulation here makes it: one that runs on past it (into
    // bytes after the outer IP packet) is not what the outer headers say
    // they carry, and bytes after it would ride along unseen (several
    // packets merged by GRO before generic XDP, or smuggled data).
    let head: *const [[u8; 2]; 3] = pkt.header(inner, DropReason::BadTunnelPacket)?;
    // SAFETY: inside the 6 bytes just checked.
    let inner_len = unsafe {
        match l3 {
            L3::V6 => 40 + u16::from_be_bytes((*head)[2]) as usize,
            _ => u16::from_be_bytes((*head)[1]) as usize,
        }
    };
    if inner_len != room {
        return Err(DropReason::BadTunnelPacket);
    }
    // Nor may anything follow the datagram (a UDP length short of the IP
    // payload, bytes after the IP packet): it would ride along unseen.
    if inner + room != pkt.wire_len {
        return Err(DropReason::BadTunnelPacket);
    }
    check_outer_checksum(pkt, inner)?;
    if martian_source(pkt, inner, l3)? {
        return Err(DropReason::TunnelForeignSource);
    }
    one_hop_less(pkt, inner, l3, DropReason::BadTunnelPacket)?;
    let outer: *const [[u8; 4]; 3] = pkt.header(0, DropReason::TruncatedEthernet)?;
    // SAFETY: the header was just checked; the MACs move as three words.
    let macs = unsafe {
        let from = outer as *const [u8; 4];
        [load32(from), load32(from.add(1)), load32(from.add(2))]
    };
    adjust_head(ctx, (inner - size_of::<EthHdr>()) as i32)?;
    // Written at offset 0 of the new start: a fixed offset the verifier
    // checks without reasoning about `inner`.
    let pkt = Packet::new(ctx.data(), ctx.data_end(), 0);
    let eth: *mut EthHdr = pkt.header_mut(0, DropReason::BadTunnelPacket)?;
    // SAFETY: inside the header just checked.
    unsafe {
        let to = eth as *mut [u8; 4];
        for (i, word) in macs.into_iter().enumerate() {
            store32(to.add(i), word);
        }
        store16(&raw mut (*eth).ether_type, ether_type.to_be());
    }
    Ok(l3)
}

/// Refuses an outer IPv4 header (20 bytes, right before the UDP header in
/// front of `inner`) whose checksum is wrong, as the kernel's `ip_rcv`
/// would: XDP sees the packet before it.
#[inline(always)]
fn check_outer_checksum(pkt: &Packet, inner: usize) -> Result<(), DropReason> {
    let ip: *const [[u8; 2]; 10] = pkt.header(inner - TUNNEL_LEN, DropReason::BadTunnelPacket)?;
    let mut sum = 0u32;
    for i in 0..10 {
        // SAFETY: inside the 20 bytes just checked.
        sum += u32::from(unsafe { load16(&(*ip)[i]) });
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    if sum == 0xffff {
        Ok(())
    } else {
        Err(DropReason::BadTunnelPacket)
    }
}

/// Whether the inner packet at `inner` has a source the kernel refuses
/// from any interface but loopback (a martian: IPv4 this network,
/// loopback, multicast, broadcast; IPv6 multicast, loopback, IPv4-mapped,
/// which a dual-stack socket would take for the IPv4 address), or IPv6
/// `::` or link-local (no node forwards a packet from either). Decapsulated in XDP, the
/// packet would skip the kernel's check. (This node's own addresses are
/// judged for packets to its containers: `overlay::from_tunnel`.)
#[inline(always)]
fn martian_source(pkt: &Packet, inner: usize, l3: L3) -> Result<bool, DropReason> {
    if l3 == L3::V6 {
        let h: *const [[u8; 4]; 6] = pkt.header(inner, DropReason::BadTunnelPacket)?;
        // SAFETY: the source (bytes 8..24) is inside the 24 bytes just checked.
        let w = unsafe { [load32(&(*h)[2]), load32(&(*h)[3]), load32(&(*h)[4]), load32(&(*h)[5])] };
        // SAFETY: as above.
        let (first, second) = unsafe { ((*h)[2][0], (*h)[2][1]) };
        let low = w[0] == 0 && w[1] == 0;
        return Ok(first == 0xff
            || first == 0xfe && second & 0xc0 == 0x80
            || low && w[2] == 0 && (w[3] == 0 || w[3] == 1u32.to_be())
            || low && w[2] == 0xffffu32.to_be());
    }
    let h: *const [[u8; 4]; 4] = pkt.header(inner, DropReason::BadTunnelPacket)?;
    // SAFETY: the source (bytes 12..16) is inside the 16 bytes just checked.
    let (src, first) = unsafe { (load32(&(*h)[3]), (*h)[3][0]) };
    Ok(first == 0 || first == 127 || (224..240).contains(&first) || src == u32::MAX)
}
