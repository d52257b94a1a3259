//! The one packet parser: Ethernet, 802.1Q/QinQ, IPv4 (options), IPv6
//! (extension headers), TCP, UDP, SCTP, ICMP/ICMPv6.
//!
//! Anything it does not understand (ARP, unknown L4, ESP, ...) parses as far
//! as it can and is not an error; a header that is cut short or contradicts
//! itself is an error named by a [`DropReason`].

use core::mem::size_of;

use tapmesh_common::DropReason;

use crate::{
    headers::*,
    packet::{load16, load32, Packet},
};

/// At most this many VLAN tags are read (QinQ).
const MAX_VLAN_TAGS: usize = 2;
/// At most this many IPv6 extension headers are walked.
const MAX_IPV6_EXTENSIONS: usize = 6;

#[derive(Copy, Clone, PartialEq, Eq)]
pub enum L3 {
    None,
    V4,
    V6,
}

#[derive(Copy, Clone, PartialEq, Eq)]
pub enum Fragment {
    /// Not a fragment.
    None,
    /// The first fragment: it carries the L4 header.
    First,
    /// A later fragment: no L4 header.
    Later,
}

/// A 16-byte address as four words in memory order (`from_ne_bytes` of each
/// 4 bytes); IPv4 is IPv4-mapped (`::ffff:a.b.c.d`).
pub type Addr = [u32; 4];

/// The third word of every IPv4-mapped address.
pub const MAPPED_V4_PREFIX: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// What the parser found.
#[derive(Copy, Clone)]
pub struct Parsed {
    pub vlan_count: u8,
    pub l3: L3,
    pub l3_offset: usize,
    /// Offset just past the IP packet (from its length field).
    pub l3_end: usize,
    pub fragment: Fragment,
    pub protocol: u8,
    /// Set when the L4 header below was read.
    pub has_l4: bool,
    pub l4_offset: usize,
    pub src_addr: Addr,
    pub dst_addr: Addr,
    /// Ports in host order (TCP, UDP, SCTP); the ICMP type in `icmp_type`.
    pub src_port: u16,
    pub dst_port: u16,
    pub icmp_type: u8,
    /// ICMP/ICMPv6: the first two bytes after the checksum (an echo's
    /// identifier), host order.
    pub icmp_id: u16,
    /// The identification fragments of a datagram share, host order:
    /// IPv4's 16 bits, an IPv6 Fragment header's 32.
    pub frag_id: u32,
}

impl Parsed {
    #[inline(always)]
    const fn empty() -> Self {
        Self {
            vlan_count: 0,
            l3: L3::None,
            l3_offset: 0,
            l3_end: 0,
            fragment: Fragment::None,
            protocol: 0,
            has_l4: false,
            l4_offset: 0,
            src_addr: [0; 4],
            dst_addr: [0; 4],
            src_port: 0,
            dst_port: 0,
            icmp_type: 0,
            icmp_id: 0,
            frag_id: 0,
        }
    }
}

/// A big-endian 16-bit field, in host order.
#[inline(always)]
pub fn be16(p: *const [u8; 2]) -> u16 {
    // SAFETY: callers pass fields of headers `Packet::header` returned.
    u16::from_be(unsafe { load16(p) })
}

/// The IPv4 address at `p`, IPv4-mapped.
#[inline(always)]
pub fn mapped_v4(p: *const [u8; 4]) -> Addr {
    // SAFETY: callers pass fields of headers `Packet::header` returned.
    [0, 0, MAPPED_V4_PREFIX, unsafe { load32(p) }]
}

/// The IPv6 address at `p`.
#[inline(always)]
pub fn addr_v6(p: *const [u8; 16]) -> Addr {
    let w = p as *const [u8; 4];
    // SAFETY: callers pass fields of headers `Packet::header` returned.
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
pub fn parse(pkt: &Packet) -> Result<Parsed, DropReason> {
    let mut parsed = Parsed::empty();
    let eth: *const EthHdr = pkt.header(0, DropReason::TruncatedEthernet)?;
    let mut ether_type = be16(unsafe { &raw const (*eth).ether_type });
    let mut offset = size_of::<EthHdr>();

    for _ in 0..MAX_VLAN_TAGS {
        if !matches!(ether_type, ETH_P_8021Q | ETH_P_8021AD | ETH_P_QINQ) {
            break;
        }
        let tag: *const VlanHdr = pkt.header(offset, DropReason::TruncatedVlan)?;
        parsed.vlan_count += 1;
        ether_type = be16(unsafe { &raw const (*tag).ether_type });
        offset += size_of::<VlanHdr>();
    }
    parsed.l3_offset = offset;

    match ether_type {
        ETH_P_IP => parse_ipv4(pkt, &mut parsed)?,
        ETH_P_IPV6 => parse_ipv6(pkt, &mut parsed)?,
        _ => return Ok(parsed),
    }
    if parsed.fragment != Fragment::Later {
        parse_l4(pkt, &mut parsed)?;
    }
    Ok(parsed)
}

#[inline(always)]
fn parse_ipv4(pkt: &Packet, parsed: &mut Parsed) -> Result<(), DropReason> {
    let offset = parsed.l3_offset;
    let ip: *const Ipv4Hdr = pkt.header(offset, DropReason::TruncatedIpv4)?;
    let version_ihl = unsafe { (*ip).version_ihl };
    if version_ihl >> 4 != 4 {
        return Err(DropReason::BadIpv4Version);
    }
    let header_len = ((version_ihl & 0x0f) as usize) * 4;
    if header_len < size_of::<Ipv4Hdr>() {
        return Err(DropReason::BadIpv4HeaderLength);
    }
    let total_len = be16(unsafe { &raw const (*ip).total_length }) as usize;
    if total_len < header_len {
        return Err(DropReason::BadIpv4TotalLength);
    }
    if offset + total_len > pkt.wire_len {
        return Err(DropReason::TruncatedIpv4);
    }
    let frag = be16(unsafe { &raw const (*ip).frag_off });
    parsed.fragment = if frag & 0x1fff != 0 {
        Fragment::Later
    } else if frag & 0x2000 != 0 {
        Fragment::First
    } else {
        Fragment::None
    };
    parsed.frag_id = be16(unsafe { &raw const (*ip).id }) as u32;
    parsed.l3 = L3::V4;
    parsed.l3_end = offset + total_len;
    parsed.protocol = unsafe { (*ip).protocol };
    parsed.l4_offset = offset + header_len;
    parsed.src_addr = mapped_v4(unsafe { &raw const (*ip).src });
    parsed.dst_addr = mapped_v4(unsafe { &raw const (*ip).dst });
    Ok(())
}

#[inline(always)]
fn parse_ipv6(pkt: &Packet, parsed: &mut Parsed) -> Result<(), DropReason> {
    let offset = parsed.l3_offset;
    let ip: *const Ipv6Hdr = pkt.header(offset, DropReason::TruncatedIpv6)?;
    if unsafe { (*ip).version_class_flow[0] } >> 4 != 6 {
        return Err(DropReason::BadIpv6Version);
    }
    let payload_len = be16(unsafe { &raw const (*ip).payload_length }) as usize;
    let end = offset + size_of::<Ipv6Hdr>() + payload_len;
    if end > pkt.wire_len {
        return Err(DropReason::TruncatedIpv6);
    }
    parsed.l3 = L3::V6;
    parsed.l3_end = end;
    parsed.src_addr = addr_v6(unsafe { &raw const (*ip).src });
    parsed.dst_addr = addr_v6(unsafe { &raw const (*ip).dst });

    let mut next = unsafe { (*ip).next_header };
    let mut at = offset + size_of::<Ipv6Hdr>();
    for _ in 0..MAX_IPV6_EXTENSIONS {
        if at + 2 > end {
            break;
        }
        match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let ext: *const Ipv6ExtHdr = pkt.header(at, DropReason::TruncatedIpv6Extension)?;
                let ext = unsafe { &*ext };
                next = ext.next_header;
                at += (ext.length as usize + 1) * 8;
            }
            IPPROTO_AH => {
                let ext: *const Ipv6ExtHdr = pkt.header(at, DropReason::TruncatedIpv6Extension)?;
                let ext = unsafe { &*ext };
                next = ext.next_header;
                at += (ext.length as usize + 2) * 4;
            }
            IPPROTO_FRAGMENT => {
                let frag: *const Ipv6FragHdr =
                    pkt.header(at, DropReason::TruncatedIpv6Extension)?;
                next = unsafe { (*frag).next_header };
                parsed.frag_id = u32::from_be(unsafe { load32(&raw const (*frag).id) });
                let offset_flags = be16(unsafe { &raw const (*frag).offset_flags });
                parsed.fragment = if offset_flags & 0xfff8 != 0 {
                    Fragment::Later
                } else if offset_flags & 1 != 0 {
                    Fragment::First
                } else {
                    // An atomic fragment (offset 0, no more fragments) is a whole packet.
                    Fragment::None
                };
                at += size_of::<Ipv6FragHdr>();
                if parsed.fragment == Fragment::Later {
                    // What follows is payload, not headers.
                    break;
                }
            }
            _ => break,
        }
    }
    if at > end {
        return Err(DropReason::TruncatedIpv6Extension);
    }
    let is_extension = matches!(
        next,
        IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_AH | IPPROTO_FRAGMENT
    );
    if is_extension && parsed.fragment != Fragment::Later {
        if at + 2 > end {
            return Err(DropReason::TruncatedIpv6Extension);
        }
        return Err(DropReason::TooManyIpv6Extensions);
    }
    parsed.protocol = next;
    parsed.l4_offset = at;
    Ok(())
}

#[inline(always)]
fn parse_l4(pkt: &Packet, parsed: &mut Parsed) -> Result<(), DropReason> {
    let at = parsed.l4_offset;
    match (parsed.protocol, parsed.l3) {
        (IPPROTO_TCP, _) => {
            let tcp: *const TcpHdr = pkt.header(at, DropReason::TruncatedTcp)?;
            let header_len = ((unsafe { (*tcp).offset_flags[0] } >> 4) as usize) * 4;
            if header_len < size_of::<TcpHdr>() {
                return Err(DropReason::BadTcpHeaderLength);
            }
            if at + header_len > parsed.l3_end {
                return Err(DropReason::TruncatedTcp);
            }
            parsed.src_port = be16(unsafe { &raw const (*tcp).src_port });
            parsed.dst_port = be16(unsafe { &raw const (*tcp).dst_port });
        }
        (IPPROTO_UDP, _) => {
            if at + size_of::<UdpHdr>() > parsed.l3_end {
                return Err(DropReason::TruncatedUdp);
            }
            let udp: *const UdpHdr = pkt.header(at, DropReason::TruncatedUdp)?;
            let udp_len = be16(unsafe { &raw const (*udp).length }) as usize;
            if udp_len < size_of::<UdpHdr>() {
                return Err(DropReason::BadUdpLength);
            }
            if parsed.fragment == Fragment::None && at + udp_len > parsed.l3_end {
                return Err(DropReason::BadUdpLength);
            }
            parsed.src_port = be16(unsafe { &raw const (*udp).src_port });
            parsed.dst_port = be16(unsafe { &raw const (*udp).dst_port });
        }
        (IPPROTO_SCTP, _) => {
            if at + size_of::<SctpHdr>() > parsed.l3_end {
                return Err(DropReason::TruncatedSctp);
            }
            let sctp: *const SctpHdr = pkt.header(at, DropReason::TruncatedSctp)?;
            parsed.src_port = be16(unsafe { &raw const (*sctp).src_port });
            parsed.dst_port = be16(unsafe { &raw const (*sctp).dst_port });
        }
        (IPPROTO_ICMP, L3::V4) | (IPPROTO_ICMPV6, L3::V6) => {
            if at + size_of::<IcmpHdr>() > parsed.l3_end {
                return Err(DropReason::TruncatedIcmp);
            }
            let icmp: *const IcmpHdr = pkt.header(at, DropReason::TruncatedIcmp)?;
            parsed.icmp_type = unsafe { (*icmp).kind };
            parsed.icmp_id = be16(unsafe { &raw const (*icmp).rest } as *const [u8; 2]);
        }
        _ => return Ok(()),
    }
    parsed.has_l4 = true;
    Ok(())
}
