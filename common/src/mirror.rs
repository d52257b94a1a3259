//! Port mirroring (tap flows): per source interface, the rules that copy its
//! packets to a tap service's interface, VLAN filters and counters.

use crate::assert_layout;

/// Tap flows in all (indices of `tm_mirror_vlans` and `tm_mirror_stats`).
pub const MAX_TAP_FLOWS: u32 = 1024;
/// Source interfaces with tap flows.
pub const MAX_MIRROR_PORTS: u32 = 1024;
/// Words of `tm_mirror_bits`: one bit per interface index (modulo
/// 64 × FILTER_WORDS), set for every source interface in `tm_mirror_ports`,
/// so an interface without tap flows costs an array read, not a hash lookup.
pub const FILTER_WORDS: u32 = 1024;

/// The word and bit of `ifindex` in `tm_mirror_bits`.
#[inline(always)]
pub const fn filter_bit(ifindex: u32) -> (u32, u64) {
    ((ifindex >> 6) & (FILTER_WORDS - 1), 1u64 << (ifindex & 63))
}
/// Tap flows one source interface can have.
pub const RULES_PER_PORT: usize = 8;
/// Mirror rings.
pub const MAX_RINGS: u32 = 64;

/// Bytes of `tm_mirror_copy`, the ring buffer that carries copies for
/// mirror rings straight from TC (a power of two pages).
pub const COPY_RING_BYTES: u32 = 16 << 20;
/// Bytes of `tm_mirror_tmp`, the per-CPU place a copy is put together
/// before it goes into `tm_mirror_copy` (a per-CPU value holds 32 KiB).
pub const COPY_SCRATCH_BYTES: u32 = 32768;
/// The most of one packet a copy in `tm_mirror_copy` holds (a GSO packet
/// is one packet at TC; longer ones are cut, their length kept).
pub const COPY_MAX_BYTES: u32 = COPY_SCRATCH_BYTES - size_of::<CopyHead>() as u32;

/// The head of a record in `tm_mirror_copy`; `caplen` packet bytes follow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CopyHead {
    /// `CLOCK_MONOTONIC` when copied, in nanoseconds.
    pub ts_ns: u64,
    /// The packet's length.
    pub len: u32,
    /// The bytes that follow (at most `COPY_MAX_BYTES`).
    pub caplen: u32,
    /// The mirror ring (`MirrorRule::ring` - 1).
    pub ring: u8,
    /// `MirrorRule::generation`: tells this ring's copies from those of an
    /// earlier ring in the same slot still in the buffer.
    pub generation: u8,
    /// The offloaded VLAN tag's protocol (network order), 0 when the packet
    /// has none; the tag is not in the bytes and goes back in after the MACs.
    pub vlan_proto: u16,
    pub vlan_tci: u16,
    pub _pad: u16,
}
assert_layout!(CopyHead, size = 24, align = 8);

/// Direction bits, TaaS's meaning relative to the source port: IN is traffic
/// to the port (TC egress of its host-side interface), OUT traffic from it
/// (TC ingress).
/// The `tc_index` a copy carries (its original keeps its own): a copy that
/// comes back to a tapped port (through a veth peer or a bridge) is not
/// copied again, so copies never circle. Nothing else sets `tc_index` since
/// Linux 6.3 removed dsmark and tcindex; clones and veth pairs keep it.
pub const COPY_TC_INDEX: u32 = 0x7a70;

pub const DIRECTION_IN: u8 = 1;
pub const DIRECTION_OUT: u8 = 2;

/// One tap flow on a source interface.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MirrorRule {
    /// The tap flow's index (VLAN set and counters).
    pub flow: u32,
    /// Where copies go (egress of this interface).
    pub dest_ifindex: u32,
    /// `DIRECTION_IN` | `DIRECTION_OUT`.
    pub directions: u8,
    /// Non-zero: only VLANs in `tm_mirror_vlans[flow]` (untagged counts as VLAN 0).
    pub vlan_filtered: u8,
    /// Non-zero: the copy goes into `tm_mirror_copy` for mirror ring
    /// `ring - 1` instead of out of `dest_ifindex`.
    pub ring: u8,
    /// Copied into each copy's `CopyHead::generation`.
    pub generation: u8,
}
assert_layout!(MirrorRule, size = 12, align = 4);

/// `tm_mirror_ports` value, keyed by the source interface's index.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MirrorPort {
    pub count: u32,
    pub rules: [MirrorRule; RULES_PER_PORT],
}
assert_layout!(MirrorPort, size = 100, align = 4);

/// A set of VLAN ids 0..=4095.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VlanSet {
    pub bits: [u64; 64],
}
assert_layout!(VlanSet, size = 512, align = 8);

impl Default for VlanSet {
    fn default() -> Self {
        Self { bits: [0; 64] }
    }
}

impl VlanSet {
    pub fn insert(&mut self, vlan: u16) {
        let v = (vlan & 0xfff) as usize;
        self.bits[v / 64] |= 1 << (v % 64);
    }

    pub fn contains(&self, vlan: u16) -> bool {
        let v = (vlan & 0xfff) as usize;
        self.bits[v / 64] & (1 << (v % 64)) != 0
    }
}

/// Per tap flow, per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MirrorCounter {
    pub packets: u64,
    pub bytes: u64,
    /// `bpf_clone_redirect` failed (the production packet went on regardless).
    pub failed: u64,
}
assert_layout!(MirrorCounter, size = 24, align = 8);

#[cfg(feature = "user")]
crate::impl_pod!(MirrorRule, MirrorPort, VlanSet, MirrorCounter, CopyHead);

/// Bytes of the metadata `tm_xdp_uplink` puts before a frame it hands to
/// the uplink's TC ingress instead of redirecting it into a port with IN
/// copies: the daemon's key (`tm_detour_key`, random at each start), then
/// the port's ifindex and 4 zero bytes.
pub const DETOUR_META_LEN: usize = 16;
