//! Building test frames byte by byte (with correct checksums), and cutting them.

use std::net::{Ipv4Addr, Ipv6Addr};

pub const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
pub const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];
pub const V4_A: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const V4_B: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const V6_A: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
pub const V6_B: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMP: u8 = 1;
pub const ICMPV6: u8 = 58;
pub const SCTP: u8 = 132;

/// The Internet checksum (RFC 1071) over the concatenated chunks.
pub fn internet_checksum(chunks: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    let mut odd: Option<u8> = None;
    for chunk in chunks {
        for &b in *chunk {
            match odd.take() {
                Some(hi) => sum += u32::from(u16::from_be_bytes([hi, b])),
                None => odd = Some(b),
            }
        }
    }
    if let Some(hi) = odd {
        sum += u32::from(u16::from_be_bytes([hi, 0]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet frame with optional VLAN tags (outer first).
pub fn ethernet(
    dst: [u8; 6],
    src: [u8; 6],
    vlans: &[u16],
    ether_type: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut f = Vec::with_capacity(18 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    for (i, vlan) in vlans.iter().enumerate() {
        let tpid: u16 = if i == 0 && vlans.len() > 1 {
            0x88a8
        } else {
            0x8100
        };
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&vlan.to_be_bytes());
    }
    f.extend_from_slice(&ether_type.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An IPv4 packet; `options` must be a multiple of 4 bytes.
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, options: &[u8], payload: &[u8]) -> Vec<u8> {
    assert_eq!(options.len() % 4, 0);
    let header_len = 20 + options.len();
    let total = (header_len + payload.len()) as u16;
    let mut p = vec![0x40 | (header_len / 4) as u8, 0];
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0x12, 0x34, 0x40, 0x00, 64, protocol, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(options);
    let sum = internet_checksum(&[&p]);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

/// An IPv6 packet; `extensions` is the raw chain, `first_next` the type of its first header.
pub fn ipv6(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    first_next: u8,
    extensions: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&((extensions.len() + payload.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[first_next, 64]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(extensions);
    p.extend_from_slice(payload);
    p
}

fn pseudo_v4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, len: usize) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&[0, protocol]);
    p.extend_from_slice(&(len as u16).to_be_bytes());
    p
}

/// A UDP datagram with its checksum over the IPv4 pseudo header.
pub fn udp_v4(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, data: &[u8]) -> Vec<u8> {
    let len = 8 + data.len();
    let mut u = Vec::with_capacity(len);
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&(len as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(data);
    let sum = internet_checksum(&[&pseudo_v4(src, dst, UDP, len), &u]);
    u[6..8].copy_from_slice(&if sum == 0 { 0xffff } else { sum }.to_be_bytes());
    u
}

/// A TCP SYN with `option_words` 4-byte words of NOP options.
pub fn tcp_v4(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    option_words: usize,
) -> Vec<u8> {
    let len = 20 + 4 * option_words;
    let mut t = Vec::with_capacity(len);
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0]);
    t.extend_from_slice(&[((len / 4) as u8) << 4, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
    t.extend(std::iter::repeat_n(1u8, 4 * option_words));
    let sum = internet_checksum(&[&pseudo_v4(src, dst, TCP, len), &t]);
    t[16..18].copy_from_slice(&sum.to_be_bytes());
    t
}

/// An ICMP echo request.
pub fn icmp_echo(id: u16, seq: u16, data: &[u8]) -> Vec<u8> {
    let mut m = vec![8, 0, 0, 0];
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(data);
    let sum = internet_checksum(&[&m]);
    m[2..4].copy_from_slice(&sum.to_be_bytes());
    m
}

/// Frames of the common kinds between A and B.
pub fn udp4_frame(sport: u16, dport: u16, data: &[u8]) -> Vec<u8> {
    eth(&udp4(V4_A, V4_B, sport, dport, data))
}

pub fn tcp4_frame(sport: u16, dport: u16) -> Vec<u8> {
    eth(&tcp4(V4_A, V4_B, sport, dport))
}

/// Rewrites the IPv4 total length (and checksum) of a frame whose IPv4 header starts at `l3`.
pub fn set_ipv4_total_length(frame: &mut [u8], l3: usize, total: u16) {
    frame[l3 + 2..l3 + 4].copy_from_slice(&total.to_be_bytes());
    frame[l3 + 10..l3 + 12].copy_from_slice(&[0, 0]);
    let ihl = usize::from(frame[l3] & 0x0f) * 4;
    let sum = internet_checksum(&[&frame[l3..l3 + ihl]]);
    frame[l3 + 10..l3 + 12].copy_from_slice(&sum.to_be_bytes());
}

/// Rewrites the IPv6 payload length of a frame whose IPv6 header starts at `l3`.
pub fn set_ipv6_payload_length(frame: &mut [u8], l3: usize, len: u16) {
    frame[l3 + 4..l3 + 6].copy_from_slice(&len.to_be_bytes());
}

/// What the uplink makes of an IP packet for a remote target: Ethernet, IPv4
/// (DF, TTL 64, valid checksum) from `src` to `dst`, UDP `sport` → `dport`
/// with checksum 0, then the packet unchanged.
#[allow(clippy::too_many_arguments)]
pub fn tunnel_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    inner: &[u8],
) -> Vec<u8> {
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&((20 + 8 + inner.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0x40, 0x00, 64, UDP, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let sum = internet_checksum(&[&ip]);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    ip.extend_from_slice(&udp_header(sport, dport, inner));
    ethernet(dst_mac, src_mac, &[], 0x0800, &ip)
}

// ---------------------------------------------------------------------------
// IP packets, and the frames around them from A's MAC to B's

/// Offset of the ether type after the VLAN tags.
pub fn ether_type_at(frame: &[u8]) -> usize {
    let mut at = 12;
    while matches!(
        u16::from_be_bytes([frame[at], frame[at + 1]]),
        0x8100 | 0x88a8 | 0x9100
    ) {
        at += 4;
    }
    at
}

/// The frame with new MACs and no VLAN tags.
pub fn rewritten(frame: &[u8], dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
    let mut out = Vec::with_capacity(frame.len());
    out.extend_from_slice(&dst);
    out.extend_from_slice(&src);
    out.extend_from_slice(&frame[ether_type_at(frame)..]);
    out
}

/// `frame` as a router forwards it to `dst` from `src`: [`rewritten`], with
/// one hop less (IPv4: the TTL, and the header checksum made anew; IPv6:
/// the hop limit).
pub fn forwarded(frame: &[u8], dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
    let mut out = rewritten(frame, dst, src);
    let ip = &mut out[14..];
    match ip[0] >> 4 {
        4 => {
            ip[8] -= 1;
            ip[10..12].fill(0);
            let header = usize::from(ip[0] & 0x0f) * 4;
            let sum = internet_checksum(&[&ip[..header]]);
            ip[10..12].copy_from_slice(&sum.to_be_bytes());
        }
        6 => ip[7] -= 1,
        _ => {}
    }
    out
}

/// The IP packet a frame carries.
pub fn ip_packet(frame: &[u8]) -> &[u8] {
    &frame[ether_type_at(frame) + 2..]
}

/// `ip` in an untagged frame from A's MAC to B's (the ether type from the IP version).
pub fn eth(ip: &[u8]) -> Vec<u8> {
    eth_tagged(&[], ip)
}

/// `ip` in a frame with VLAN tags `vlans` (outer first).
pub fn eth_tagged(vlans: &[u16], ip: &[u8]) -> Vec<u8> {
    let ether_type = if ip[0] >> 4 == 6 { 0x86dd } else { 0x0800 };
    ethernet(MAC_B, MAC_A, vlans, ether_type, ip)
}

/// An IPv4 UDP packet (valid checksums).
pub fn udp4(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, data: &[u8]) -> Vec<u8> {
    ipv4(src, dst, UDP, &[], &udp_v4(src, dst, sport, dport, data))
}

/// An IPv4 TCP SYN (valid checksums).
pub fn tcp4(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    ipv4(src, dst, TCP, &[], &tcp_v4(src, dst, sport, dport, 0))
}

/// An IPv4 SCTP packet with one chunk header (no CRC32c: nothing here checks it).
pub fn sctp4(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    let mut s = Vec::new();
    s.extend_from_slice(&sport.to_be_bytes());
    s.extend_from_slice(&dport.to_be_bytes());
    s.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0]); // verification tag, checksum
    s.extend_from_slice(&[1, 0, 0, 4]); // an empty INIT-like chunk header
    ipv4(src, dst, SCTP, &[], &s)
}

/// A UDP datagram with checksum 0 (for IPv6 where the program does not check it,
/// and for tunnel headers).
pub fn udp_header(sport: u16, dport: u16, data: &[u8]) -> Vec<u8> {
    let mut u = Vec::new();
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + data.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(data);
    u
}

/// An IPv6 UDP packet (UDP checksum 0).
pub fn udp6(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16, data: &[u8]) -> Vec<u8> {
    ipv6(src, dst, UDP, &[], &udp_header(sport, dport, data))
}

/// An IPv4 packet's fragment: `offset` in bytes, `more` fragments follow.
pub fn fragment4(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    id: u16,
    offset: u16,
    more: bool,
    payload: &[u8],
) -> Vec<u8> {
    let mut p = ipv4(src, dst, protocol, &[], payload);
    p[4..6].copy_from_slice(&id.to_be_bytes());
    let field = (offset / 8) | if more { 0x2000 } else { 0 };
    p[6..8].copy_from_slice(&field.to_be_bytes());
    p[10..12].copy_from_slice(&[0, 0]);
    let sum = internet_checksum(&[&p[..20]]);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p
}

/// ICMP destination unreachable, fragmentation needed (type 3 code 4) about `inner`.
pub fn icmp4_frag_needed(from: Ipv4Addr, to: Ipv4Addr, inner: &[u8]) -> Vec<u8> {
    let mut m = vec![3, 4, 0, 0, 0, 0, 0x05, 0xdc]; // next-hop MTU 1500
                                                    // The IP header and the first 8 bytes of its payload, as RFC 792 asks.
    let ihl = usize::from(inner[0] & 0x0f) * 4;
    m.extend_from_slice(&inner[..(ihl + 8).min(inner.len())]);
    let sum = internet_checksum(&[&m]);
    m[2..4].copy_from_slice(&sum.to_be_bytes());
    ipv4(from, to, ICMP, &[], &m)
}

/// ICMPv6 packet too big (type 2) about `inner`.
pub fn icmp6_too_big(from: Ipv6Addr, to: Ipv6Addr, inner: &[u8]) -> Vec<u8> {
    let mut m = vec![2, 0, 0, 0, 0, 0, 0x05, 0x00]; // MTU 1280
    m.extend_from_slice(inner);
    ipv6(from, to, ICMPV6, &[], &m)
}

/// A tunnel packet as another node sends it: the inner IP packet as the
/// payload of UDP from `from`:0xc123 to `to`:`port`.
pub fn tunnel(from: Ipv4Addr, to: Ipv4Addr, port: u16, inner: &[u8]) -> Vec<u8> {
    eth(&udp4(from, to, 0xc123, port, inner))
}

/// An IPv6 TCP SYN (valid checksum over the IPv6 pseudo header).
pub fn tcp6(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16) -> Vec<u8> {
    let mut t = tcp_v4(
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        sport,
        dport,
        0,
    );
    t[16..18].copy_from_slice(&[0, 0]);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&(t.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, TCP]);
    let sum = internet_checksum(&[&pseudo, &t]);
    t[16..18].copy_from_slice(&sum.to_be_bytes());
    ipv6(src, dst, TCP, &[], &t)
}
