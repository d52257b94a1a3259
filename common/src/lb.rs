//! VIP load balancing tables: VIPs, compiled flows, streams, Maglev, targets.
//!
//! A VIP's flows are compiled in userspace into masks (one bit per flow, bit
//! 0 the highest priority), so the XDP program finds the matching flow with a
//! fixed number of lookups: protocol, destination port, source port and
//! source prefix each give a mask; the lowest set bit of their AND whose byte
//! matches pass wins. Everything a VIP's flows use hangs off a *config id*: a
//! new configuration is written under the VIP's other config id and published
//! by one update of the VIP entry, so no packet sees half of it. Maglev tables
//! are published the same way (a new region, then one update of the stream).

/// VIPs (their `vip_index` is below this).
pub const MAX_VIPS: u32 = 256;
/// Flows per VIP (bits of a [`FlowMask`]).
pub const MAX_FLOWS_PER_VIP: u32 = 64;
/// Config ids: two per VIP (`2 * vip_index` and `2 * vip_index + 1`).
pub const MAX_CONFIGS: u32 = 2 * MAX_VIPS;
/// Entries of `tm_flows`: `config_id * MAX_FLOWS_PER_VIP + bit`.
pub const FLOW_SLOTS: u32 = MAX_CONFIGS * MAX_FLOWS_PER_VIP;
/// Flows with counters (a stable index per flow name).
pub const MAX_FLOWS: u32 = MAX_VIPS * MAX_FLOWS_PER_VIP;
/// Streams (`stream_id` is below this).
pub const MAX_STREAMS: u32 = 1024;
/// Targets over all streams (entries of `tm_targets`, counters in `tm_target_stats`).
pub const MAX_TARGETS: u32 = 16_384;
/// Entries of `tm_maglev` shared by every stream's tables (u32 each).
pub const MAGLEV_CAPACITY: u32 = 1 << 22;
/// `tm_maglev` is created with `BPF_F_MMAPABLE`: the daemon writes a whole
/// table with one copy into its mapping instead of a syscall per entry.
pub const MAGLEV_MAP_FLAGS: u32 = 1 << 10;
/// Entries of each port and source LPM trie.
pub const MAX_PREFIXES: u32 = 65_536;
/// Byte matches per flow.
pub const MAX_BYTE_MATCHES: usize = 4;
/// Byte matches start before this offset into the L4 header (the kernel
/// reads no further; a longer offset is refused).
pub const MAX_MATCH_OFFSET: u16 = 512;
/// Port NAT entries a configuration may hold (`tm_port_nats` has room for
/// twice as many: a VIP's next configuration is written beside the one in force).
pub const MAX_PORT_NATS: u32 = 8192;

/// Protocol classes indexing [`VipConfig::protocol_masks`].
pub const PROTO_TCP: u8 = 0;
pub const PROTO_UDP: u8 = 1;
pub const PROTO_SCTP: u8 = 2;
/// ICMP for an IPv4 VIP, ICMPv6 for an IPv6 VIP.
pub const PROTO_ICMP: u8 = 3;
pub const PROTO_OTHER: u8 = 4;
pub const PROTO_CLASSES: usize = 5;

/// Entries of `tm_vip_slots`, indexed by [`vip_slot`] of an address.
pub const VIP_SLOTS: u32 = 1 << 16;

/// The `tm_vip_slots` index of an address: its eight 16-bit words XORed.
#[inline(always)]
pub fn vip_slot(addr: &[u8; 16]) -> u32 {
    let mut x = 0u16;
    let mut i = 0;
    while i < 16 {
        x ^= u16::from_be_bytes([addr[i], addr[i + 1]]);
        i += 2;
    }
    x as u32
}

/// [`VipSlot::state`].
pub const SLOT_EMPTY: u32 = 0;
/// One host VIP has this slot: compare the address.
pub const SLOT_ONE: u32 = 1;
/// Several host VIPs share this slot: look the address up in `tm_vip_hosts`.
pub const SLOT_SHARED: u32 = 2;

/// Value of `tm_vip_slots`: most packets learn whether they go to a host VIP
/// (and which) from one array read and an address compare.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct VipSlot {
    pub addr: [u8; 16],
    /// Index in `tm_vip_values`.
    pub vip_index: u32,
    pub state: u32,
}

/// A Maglev entry with no target (entries otherwise hold a target index).
pub const NO_TARGET: u32 = u32::MAX;

/// Key of `tm_vips` (LPM trie over the 16-byte address; IPv4 is `::ffff:a.b.c.d`).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct VipKey {
    pub prefix_len: u32,
    pub addr: [u8; 16],
}

/// Value of `tm_vips`.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct VipValue {
    /// Index of the VIP's counters in `tm_vip_stats`.
    pub vip_index: u32,
    /// The configuration in force (index of `tm_vip_configs`, key part of the flow tables).
    pub config_id: u32,
}

/// [`VipConfig::lookups`]: which LPM tries must be searched. Port tables of
/// at most [`PORT_INTERVALS`] intervals are kept in the config itself and
/// binary searched; a source table that is only `/0` is its `sources_all`.
pub const LOOKUP_DST_PORTS: u32 = 1;
pub const LOOKUP_SRC_PORTS: u32 = 2;
pub const LOOKUP_SOURCES: u32 = 4;

/// Port intervals held inline in a [`VipConfig`].
pub const PORT_INTERVALS: usize = 32;

/// Disjoint port intervals covering 0..=65535: interval `i` starts at
/// `starts[i]` (`starts[0] == 0`, ascending) and its flows are `masks[i]`.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct PortIntervals {
    pub masks: [u64; PORT_INTERVALS],
    pub starts: [u16; PORT_INTERVALS],
    pub count: u32,
    pub _pad: u32,
}

impl Default for PortIntervals {
    fn default() -> Self {
        Self {
            masks: [0; PORT_INTERVALS],
            starts: [0; PORT_INTERVALS],
            count: 0,
            _pad: 0,
        }
    }
}

/// Value of `tm_vip_configs`, indexed by config id.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct VipConfig {
    /// Flows accepting each protocol class.
    pub protocol_masks: [u64; PROTO_CLASSES],
    /// Flows in this configuration (bits `0..flow_count`).
    pub flow_count: u32,
    /// `LOOKUP_*` bits.
    pub lookups: u32,
    /// The source mask when the source table is not searched.
    pub sources_all: u64,
    /// Flows restricting neither port: all that a TCP, UDP or SCTP packet
    /// whose ports are unknown (a fragment) may match.
    pub port_free: u64,
    pub dst_ports: PortIntervals,
    pub src_ports: PortIntervals,
}

/// Key of `tm_dst_ports` and `tm_src_ports`: LPM over the config id (32 bits,
/// big-endian) then the port (16 bits); `prefix_len` is 32 + the port prefix length.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct PortKey {
    pub prefix_len: u32,
    pub config_id: [u8; 4],
    pub port: [u8; 2],
    pub _pad: [u8; 2],
}

/// Key of `tm_sources`: LPM over the config id then the source address;
/// `prefix_len` is 32 + the address prefix length (0..=128).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct SourceKey {
    pub prefix_len: u32,
    pub config_id: [u8; 4],
    pub addr: [u8; 16],
}

/// Data part of the `tm_vips` LPM key (the kernel key is `{prefix_len, VipAddr}`).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct VipAddr {
    pub addr: [u8; 16],
}

/// Data part of the port LPM keys (`{prefix_len, PortData}` is a [`PortKey`]).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct PortData {
    pub config_id: [u8; 4],
    pub port: [u8; 2],
    pub _pad: [u8; 2],
}

/// Data part of the source LPM key; the tail pad (never inside a prefix)
/// keeps the value 8-byte aligned in the trie.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct SourceData {
    pub config_id: [u8; 4],
    pub addr: [u8; 16],
    pub _pad: [u8; 4],
}

impl From<&VipKey> for VipAddr {
    fn from(k: &VipKey) -> Self {
        VipAddr { addr: k.addr }
    }
}

impl From<&PortKey> for PortData {
    fn from(k: &PortKey) -> Self {
        PortData {
            config_id: k.config_id,
            port: k.port,
            _pad: [0; 2],
        }
    }
}

impl From<&SourceKey> for SourceData {
    fn from(k: &SourceKey) -> Self {
        SourceData {
            config_id: k.config_id,
            addr: k.addr,
            _pad: [0; 4],
        }
    }
}

/// Flows matching one port prefix or source prefix.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct FlowMask {
    pub mask: u64,
}

/// `l4[offset..offset + len] & mask == value` (big-endian, len 1, 2 or 4),
/// only for packets of protocol class `protocol`.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct ByteMatch {
    pub offset: u16,
    pub len: u8,
    pub protocol: u8,
    pub mask: u32,
    pub value: u32,
}

/// Value of `tm_flows`: a flow of a configuration and what it leads to.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct FlowEntry {
    pub stream_id: u32,
    /// Index of the flow's counters in `tm_flow_stats`.
    pub stats_index: u32,
    pub byte_match_count: u32,
    /// Non-zero: the flow's stream translates some ports of this VIP;
    /// `port_nat - 1` is this entry's index in `tm_flows`, the flow part of
    /// its `tm_port_nats` keys (read from here, so the verifier need not
    /// keep the classifier's flow bit apart on every path).
    pub port_nat: u32,
    pub byte_matches: [ByteMatch; MAX_BYTE_MATCHES],
}

/// Value of `tm_streams`, indexed by stream id: where its Maglev table is.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct StreamValue {
    /// First entry of the table in `tm_maglev`.
    pub table_base: u32,
    /// Entries (a prime); 0 = the stream has no table (no target).
    pub table_size: u32,
}

pub const TARGET_LOCAL: u32 = 1;
pub const TARGET_REMOTE: u32 = 2;

/// Value of `tm_targets` (an array indexed by the target index that Maglev
/// tables hold): how to reach a target; `kind` 0 is an empty entry.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Target {
    /// [`TARGET_LOCAL`] or [`TARGET_REMOTE`].
    pub kind: u32,
    /// Local: the interface to redirect to. Remote: the egress interface of
    /// the next hop to the node when the daemon has resolved it (0: ask
    /// `bpf_fib_lookup` per packet).
    pub ifindex: u32,
    /// Index of the target's counters in `tm_target_stats`.
    pub stats_index: u32,
    /// Remote, with a resolved hop: the egress interface's MTU, which the
    /// outer packet may not exceed (0: not checked). Was padding: a map
    /// pinned before holds 0 there.
    pub mtu: u32,
    /// Destination and source MAC written before the redirect (local: the
    /// target's and ours; remote: the next hop's and the egress interface's).
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    /// Remote: [`HOP_TX`] or 0. Was padding: a map pinned before holds 0
    /// there (a redirect, until the daemon writes its hops).
    pub hop_flags: u8,
    pub _pad2: [u8; 3],
    /// Remote: the node to tunnel to (IPv4 mapped `::ffff:a.b.c.d`).
    pub node_addr: [u8; 16],
}

/// In `Target::hop_flags`: the resolved hop's interface is not a veth, so
/// a frame sent back out of the interface it came in on may go by XDP_TX.
/// Otherwise (a veth, or no hop resolved: the FIB's answer is not known to
/// be one or the other) it goes by redirect: a veth's XDP_TX does not wake
/// its peer unless the peer runs an XDP program, so the frames wait in the
/// peer's ring (found by a tester: counted as sent, never seen).
pub const HOP_TX: u8 = 1;

/// Value of `tm_lb_config` (one entry): settings of the load balancer as a whole.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct LbConfig {
    /// VIPs given as prefixes (in `tm_vips`); host VIPs are in `tm_vip_hosts`.
    pub vip_prefixes: u32,
    /// Entries of `tm_port_nat_rev` (0: replies are not looked up).
    pub port_nat_replies: u32,
}

/// Key of `tm_port_nats`: a flow of a VIP configuration (its `tm_flows`
/// index, `config_id * 64 + bit`), the destination port the client used and
/// the IP protocol (6 or 17).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortNatKey {
    pub flow: u32,
    pub port: u16,
    pub protocol: u8,
    pub _pad: u8,
}

/// Value of `tm_port_nats` (the target port) and `tm_port_nat_rev` (the port
/// a reply's source goes back to).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct PortNatValue {
    pub port: u16,
    pub _pad: u16,
}

/// Value of `tm_nat_pick` (per CPU): what the uplink picked for a
/// packet it hands to `tm_xdp_port_nat` (a tail call keeps only the packet).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct PortNatPick {
    /// The flow part of the `tm_port_nats` keys (`FlowEntry::port_nat - 1`).
    pub flow: u32,
    /// The target's index in `tm_targets`.
    pub target: u32,
    /// The packet's length as the load balancer saw it (after a
    /// decapsulation: the inner frame's), counted with the tail's verdict.
    pub bytes: u32,
    pub _pad: u32,
}

/// Index of `tm_xdp_port_nat` in `tm_xdp_tails`.
pub const TAIL_PORT_NAT: u32 = 0;

/// Key of `tm_vip_senders`: the interface of a local target whose stream
/// serves a flow of the VIP at `vip_index`. A container behind it may send
/// from that VIP (its answers); any other may not.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct VipSender {
    pub ifindex: u32,
    pub vip_index: u32,
}

/// Distinct (interface, VIP) pairs a configuration may have; `tm_vip_senders`
/// has room for twice as many, as a change adds its new pairs before it
/// removes the gone ones.
pub const MAX_VIP_SENDERS: u32 = 16_384;

/// Data part of the `tm_port_nat_rev` LPM key: protocol, source port (the
/// target port, big-endian) and the VIP prefix (IPv4 mapped). The prefix
/// length is 32 + the VIP's mapped prefix length.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct NatReplyData {
    pub protocol: u8,
    pub _pad: u8,
    pub port: [u8; 2],
    pub addr: [u8; 16],
}

crate::assert_layout!(VipKey, size = 20, align = 4);
crate::assert_layout!(VipValue, size = 8, align = 4);
crate::assert_layout!(
    PortIntervals,
    size = 8 * PORT_INTERVALS + 2 * PORT_INTERVALS + 8,
    align = 8
);
crate::assert_layout!(
    VipConfig,
    size = 8 * PROTO_CLASSES + 24 + 2 * (10 * PORT_INTERVALS + 8),
    align = 8
);
crate::assert_layout!(PortKey, size = 12, align = 4);
crate::assert_layout!(SourceKey, size = 24, align = 4);
crate::assert_layout!(FlowMask, size = 8, align = 8);
crate::assert_layout!(VipAddr, size = 16, align = 1);
crate::assert_layout!(VipSlot, size = 24, align = 4);
crate::assert_layout!(PortData, size = 8, align = 1);
crate::assert_layout!(SourceData, size = 24, align = 1);
crate::assert_layout!(ByteMatch, size = 12, align = 4);
crate::assert_layout!(FlowEntry, size = 16 + 12 * MAX_BYTE_MATCHES, align = 4);
crate::assert_layout!(StreamValue, size = 8, align = 4);
crate::assert_layout!(Target, size = 48, align = 4);
crate::assert_layout!(LbConfig, size = 8, align = 4);
crate::assert_layout!(PortNatKey, size = 8, align = 4);
crate::assert_layout!(PortNatValue, size = 4, align = 2);
crate::assert_layout!(PortNatPick, size = 16, align = 4);
crate::assert_layout!(NatReplyData, size = 20, align = 1);
crate::assert_layout!(VipSender, size = 8, align = 4);

#[cfg(feature = "user")]
crate::impl_pod!(
    VipKey,
    VipValue,
    VipConfig,
    PortIntervals,
    PortKey,
    SourceKey,
    FlowMask,
    VipAddr,
    VipSlot,
    PortData,
    SourceData,
    ByteMatch,
    FlowEntry,
    StreamValue,
    Target,
    LbConfig,
    PortNatKey,
    PortNatValue,
    PortNatPick,
    NatReplyData,
    VipSender
);
