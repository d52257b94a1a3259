//! Wire headers, byte arrays in network order (alignment 1, no padding).

/// Bytes of an Ethernet header.
pub const ETH_LEN: usize = core::mem::size_of::<EthHdr>();

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;
pub const ETH_P_QINQ: u16 = 0x9100;

pub const IPPROTO_HOPOPTS: u8 = 0;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ROUTING: u8 = 43;
pub const IPPROTO_FRAGMENT: u8 = 44;
pub const IPPROTO_AH: u8 = 51;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_DSTOPTS: u8 = 60;
pub const IPPROTO_SCTP: u8 = 132;

#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub ether_type: [u8; 2],
}

#[repr(C)]
pub struct VlanHdr {
    pub tci: [u8; 2],
    pub ether_type: [u8; 2],
}

#[repr(C)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub total_length: [u8; 2],
    pub id: [u8; 2],
    pub frag_off: [u8; 2],
    pub ttl: u8,
    pub protocol: u8,
    pub checksum: [u8; 2],
    pub src: [u8; 4],
    pub dst: [u8; 4],
}

#[repr(C)]
pub struct Ipv6Hdr {
    pub version_class_flow: [u8; 4],
    pub payload_length: [u8; 2],
    pub next_header: u8,
    pub hop_limit: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
}

/// The first two bytes of every IPv6 extension header we walk.
#[repr(C)]
pub struct Ipv6ExtHdr {
    pub next_header: u8,
    pub length: u8,
}

#[repr(C)]
pub struct Ipv6FragHdr {
    pub next_header: u8,
    pub reserved: u8,
    pub offset_flags: [u8; 2],
    pub id: [u8; 4],
}

#[repr(C)]
pub struct TcpHdr {
    pub src_port: [u8; 2],
    pub dst_port: [u8; 2],
    pub seq: [u8; 4],
    pub ack: [u8; 4],
    pub offset_flags: [u8; 2],
    pub window: [u8; 2],
    pub checksum: [u8; 2],
    pub urgent: [u8; 2],
}

#[repr(C)]
pub struct UdpHdr {
    pub src_port: [u8; 2],
    pub dst_port: [u8; 2],
    pub length: [u8; 2],
    pub checksum: [u8; 2],
}

#[repr(C)]
pub struct SctpHdr {
    pub src_port: [u8; 2],
    pub dst_port: [u8; 2],
    pub tag: [u8; 4],
    pub checksum: [u8; 4],
}

#[repr(C)]
pub struct IcmpHdr {
    pub kind: u8,
    pub code: u8,
    pub checksum: [u8; 2],
    pub rest: [u8; 4],
}

tapmesh_common::assert_layout!(EthHdr, size = 14, align = 1);
tapmesh_common::assert_layout!(VlanHdr, size = 4, align = 1);
tapmesh_common::assert_layout!(Ipv4Hdr, size = 20, align = 1);
tapmesh_common::assert_layout!(Ipv6Hdr, size = 40, align = 1);
tapmesh_common::assert_layout!(Ipv6FragHdr, size = 8, align = 1);
tapmesh_common::assert_layout!(TcpHdr, size = 20, align = 1);
tapmesh_common::assert_layout!(UdpHdr, size = 8, align = 1);
tapmesh_common::assert_layout!(SctpHdr, size = 12, align = 1);
tapmesh_common::assert_layout!(IcmpHdr, size = 8, align = 1);
