//! The one packet parser: Ethernet, 802.1Q/QinQ, IPv4 (options), IPv6
//! (extension headers), TCP, UDP, SCTP, ICMP/ICMPv6.
//!
//! Anything it does not understand (ARP, unknown L4, ESP, ...) parses as far
//! as it can and is not an error; a header that is cut short or contradicts
//! itself is an error named by a [`DropReason`].

use core::mem::size_of;

use tapmesh_common::DropReason;

use crate::{headers::*, packet::Packet};

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

/// What the parser found. Addresses are 16 bytes; IPv4 is IPv4-mapped (`::ffff:a.b.c.d`).
#[derive(Copy, Clone)]
pub struct Parsed {
    pub vlan_count: u8,
    pub vlan_ids: [u16; MAX_VLAN_TAGS],
    pub ether_type: u16,
    pub l3: L3,
    pub l3_offset: usize,
    /// Offset just past the IP packet (from its length field).
    pub l3_end: usize,
    pub fragment: Fragment,
    pub protocol: u8,
    /// Set when the L4 header below was read.
    pub has_l4: bool,
    pub l4_offset: usize,
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    /// Ports in host order (TCP, UDP, SCTP); ICMP type/code in `icmp`.
    pub src_port: u16,
    pub dst_port: u16,
    pub icmp_type: u8,
    pub icmp_code: u8,
}

impl Parsed {
    #[inline(always)]
    const fn empty() -> Self {
        Self {
            vlan_count: 0,
            vlan_ids: [0; MAX_VLAN_TAGS],
            ether_type: 0,
            l3: L3::None,
            l3_offset: 0,
            l3_end: 0,
            fragment: Fragment::None,
            protocol: 0,
            has_l4: false,
            l4_offset: 0,
            src_addr: [0; 16],
            dst_addr: [0; 16],
            src_port: 0,
            dst_port: 0,
            icmp_type: 0,
            icmp_code: 0,
        }
    }
}

#[inline(always)]
fn be16(bytes: [u8; 2]) -> u16 {
    u16::from_be_bytes(bytes)
}

#[inline(always)]
fn mapped_v4(addr: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, addr[0], addr[1], addr[2], addr[3],
    ]
}

#[inline(always)]
pub fn parse(pkt: &Packet) -> Result<Parsed, DropReason> {
    let mut parsed = Parsed::empty();
    let eth: *const EthHdr = pkt.header(0, DropReason::TruncatedEthernet)?;
    let mut ether_type = be16(unsafe { (*eth).ether_type });
    let mut offset = size_of::<EthHdr>();

    for i in 0..MAX_VLAN_TAGS {
        if !matches!(ether_type, ETH_P_8021Q | ETH_P_8021AD | ETH_P_QINQ) {
            break;
        }
        let tag: *const VlanHdr = pkt.header(offset, DropReason::TruncatedVlan)?;
        parsed.vlan_ids[i] = be16(unsafe { (*tag).tci }) & 0x0fff;
        parsed.vlan_count += 1;
        ether_type = be16(unsafe { (*tag).ether_type });
        offset += size_of::<VlanHdr>();
    }
    parsed.ether_type = ether_type;
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
    let ip = unsafe { &*ip };
    if ip.version_ihl >> 4 != 4 {
        return Err(DropReason::BadIpv4Version);
    }
    let header_len = ((ip.version_ihl & 0x0f) as usize) * 4;
    if header_len < size_of::<Ipv4Hdr>() {
        return Err(DropReason::BadIpv4HeaderLength);
    }
    let total_len = be16(ip.total_length) as usize;
    if total_len < header_len {
        return Err(DropReason::BadIpv4TotalLength);
    }
    if offset + total_len > pkt.wire_len {
        return Err(DropReason::TruncatedIpv4);
    }
    let frag = be16(ip.frag_off);
    parsed.fragment = if frag & 0x1fff != 0 {
        Fragment::Later
    } else if frag & 0x2000 != 0 {
        Fragment::First
    } else {
        Fragment::None
    };
    parsed.l3 = L3::V4;
    parsed.l3_end = offset + total_len;
    parsed.protocol = ip.protocol;
    parsed.l4_offset = offset + header_len;
    parsed.src_addr = mapped_v4(ip.src);
    parsed.dst_addr = mapped_v4(ip.dst);
    Ok(())
}

#[inline(always)]
fn parse_ipv6(pkt: &Packet, parsed: &mut Parsed) -> Result<(), DropReason> {
    let offset = parsed.l3_offset;
    let ip: *const Ipv6Hdr = pkt.header(offset, DropReason::TruncatedIpv6)?;
    let ip = unsafe { &*ip };
    if ip.version_class_flow[0] >> 4 != 6 {
        return Err(DropReason::BadIpv6Version);
    }
    let end = offset + size_of::<Ipv6Hdr>() + be16(ip.payload_length) as usize;
    if end > pkt.wire_len {
        return Err(DropReason::TruncatedIpv6);
    }
    parsed.l3 = L3::V6;
    parsed.l3_end = end;
    parsed.src_addr = ip.src;
    parsed.dst_addr = ip.dst;

    let mut next = ip.next_header;
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
                let frag = unsafe { &*frag };
                next = frag.next_header;
                let offset_flags = be16(frag.offset_flags);
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
            let tcp = unsafe { &*tcp };
            let header_len = ((tcp.offset_flags[0] >> 4) as usize) * 4;
            if header_len < size_of::<TcpHdr>() {
                return Err(DropReason::BadTcpHeaderLength);
            }
            if at + header_len > parsed.l3_end {
                return Err(DropReason::TruncatedTcp);
            }
            parsed.src_port = be16(tcp.src_port);
            parsed.dst_port = be16(tcp.dst_port);
        }
        (IPPROTO_UDP, _) => {
            if at + size_of::<UdpHdr>() > parsed.l3_end {
                return Err(DropReason::TruncatedUdp);
            }
            let udp: *const UdpHdr = pkt.header(at, DropReason::TruncatedUdp)?;
            let udp = unsafe { &*udp };
            let udp_len = be16(udp.length) as usize;
            if udp_len < size_of::<UdpHdr>() {
                return Err(DropReason::BadUdpLength);
            }
            if parsed.fragment == Fragment::None && at + udp_len > parsed.l3_end {
                return Err(DropReason::BadUdpLength);
            }
            parsed.src_port = be16(udp.src_port);
            parsed.dst_port = be16(udp.dst_port);
        }
        (IPPROTO_SCTP, _) => {
            if at + size_of::<SctpHdr>() > parsed.l3_end {
                return Err(DropReason::TruncatedSctp);
            }
            let sctp: *const SctpHdr = pkt.header(at, DropReason::TruncatedSctp)?;
            let sctp = unsafe { &*sctp };
            parsed.src_port = be16(sctp.src_port);
            parsed.dst_port = be16(sctp.dst_port);
        }
        (IPPROTO_ICMP, L3::V4) | (IPPROTO_ICMPV6, L3::V6) => {
            if at + size_of::<IcmpHdr>() > parsed.l3_end {
                return Err(DropReason::TruncatedIcmp);
            }
            let icmp: *const IcmpHdr = pkt.header(at, DropReason::TruncatedIcmp)?;
            let icmp = unsafe { &*icmp };
            parsed.icmp_type = icmp.kind;
            parsed.icmp_code = icmp.code;
        }
        _ => return Ok(()),
    }
    parsed.has_l4 = true;
    Ok(())
}
