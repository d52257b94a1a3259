//! Service-IP overlay tables (Oakestra's NetManager in the kernel), IPv4.
//!
//! A container's packet to a service IP is translated on the host side of its
//! veth: the destination becomes a chosen instance's namespace address and the
//! source the sender's instance IP. Same node: redirected to the instance's
//! veth. Other node: the translated IP packet is the payload of UDP to that
//! node's tunnel port. Replies are translated back through the conntrack's
//! reverse entries so the client sees the service IP it dialled.
//!
//! As in every map: addresses are byte arrays in network order, ports and
//! other numbers host-order integers.

/// Services (service IPs) with an id below this.
pub const MAX_SERVICES: u32 = 4096;
/// Instance slots per service: RR tables hold one slot per unit of weight.
pub const SERVICE_SLOTS: u32 = 64;
/// Entries of `tm_ov_slots`.
pub const SLOT_ENTRIES: u32 = MAX_SERVICES * SERVICE_SLOTS;
/// Instances, local and remote (`tm_ov_instances`).
pub const MAX_INSTANCES: u32 = 16_384;
/// Containers on this node (`tm_ov_locals`).
pub const MAX_LOCALS: u32 = 1024;
/// Inner sources with a known node (`tm_ov_owners`, `tm_ov_owners6`): an
/// instance's namespace address and instance IP, and this node's containers.
pub const MAX_OWNERS: u32 = 2 * MAX_INSTANCES + MAX_LOCALS;
/// Owner of the inner sources of this node's own containers and instances
/// (`tm_ov_owners`): no tunnel packet may carry them.
pub const OWNER_THIS_NODE: [u8; 4] = [0; 4];
/// Connection tracking entries (two per connection: forward and reverse).
pub const CONNTRACK_ENTRIES: u32 = 131_072;
/// IPv4 datagrams in fragments being translated (`tm_ov_frags`).
pub const FRAGMENT_ENTRIES: u32 = 8192;
/// IPv6 connection tracking entries.
pub const CONNTRACK_ENTRIES6: u32 = 65_536;
/// Service IPs whose miss was signalled and is not answered yet.
pub const PENDING_ENTRIES: u32 = 1024;
/// Asks about a stranger's inner source (`tm_ov_asks`), all strangers
/// together, per second: an outsider may send from any address.
pub const STRANGER_ASKS_PER_SECOND: u64 = 32;
/// [`Miss::flags`]: reported for a tunnel packet from a node no table names.
pub const MISS_FROM_STRANGER: u8 = 1;
/// Bytes of the miss ring buffer.
pub const MISS_RING_BYTES: u32 = 4096 * 16;
/// A packet to an unknown service IP is kept for the daemon up to this
/// size (a container's frame at the tunnel MTU fits); a longer one drops.
pub const HELD_BYTES: u32 = 1536;
/// Bytes of the ring of held packets (`tm_ov_held`): about 160 packets on
/// their way to the daemon.
pub const HELD_RING_BYTES: u32 = 4096 * 64;
/// Packets held per second, all addresses together (`tm_ov_asks` slot 1):
/// a container sending to many unknown addresses costs the daemon little.
pub const HOLDS_PER_SECOND: u64 = 256;
/// Packets held per second for one address (`tm_ov_hold_ips`): one
/// sender streaming to an unknown address leaves the budget to the others.
pub const HOLDS_PER_ADDRESS: u64 = 8;
/// Packets held per second from one container (`tm_ov_hold_ifs`): one
/// sending to many unknown addresses leaves the budget to the others.
pub const HOLDS_PER_VETH: u64 = 32;
/// Addresses, and veths, whose holds are counted this second.
pub const HOLD_ADDRESSES: u32 = 1024;
/// The daemon's sockets sending held packets again (`tm_ov_resend`) at
/// once: one per container's batch, each gone a moment after its send.
pub const RESEND_SOCKETS: u32 = 64;

/// [`Service::policy`]: a new flow takes the next slot, in turn.
pub const POLICY_ROUND_ROBIN: u8 = 1;
/// The first slot: userspace orders instances by cost.
pub const POLICY_CLOSEST: u8 = 2;
/// Exactly one instance (an instance IP).
pub const POLICY_INSTANCE: u8 = 3;

/// [`Instance::kind`].
pub const INSTANCE_EMPTY: u8 = 0;
pub const INSTANCE_LOCAL: u8 = 1;
pub const INSTANCE_REMOTE: u8 = 2;

/// [`ConntrackValue::kind`].
pub const CT_FORWARD: u32 = 1;
pub const CT_REVERSE: u32 = 2;

/// Value of `tm_ov_services` (key: the service IP).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Service {
    /// Row in `tm_ov_slots` and index of its counters.
    pub id: u32,
    pub policy: u8,
    /// Slots in use (1..=SERVICE_SLOTS); 0: no instance.
    pub slots: u8,
    pub _pad: [u8; 2],
}

/// Value of `tm_ov_instances`: where an instance is and how to reach it.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Instance {
    /// Its namespace address (the destination after translation).
    pub ns_addr: [u8; 4],
    /// The address its replies come from: its instance IP (or `ns_addr`).
    pub reply_addr: [u8; 4],
    /// Remote: the node's tunnel address; local: 0.
    pub node_addr: [u8; 4],
    /// Remote: the node's tunnel port.
    pub node_port: u16,
    pub kind: u8,
    pub _pad: u8,
    /// Bumped when the slot is reused or removed: older conntrack entries
    /// that name it pick again.
    pub generation: u32,
    /// Local: its host-side veth; remote: the uplink towards the node
    /// (0: not resolved, the program asks the FIB).
    pub ifindex: u32,
    /// Local: the container's MAC; remote: the next hop's.
    pub dst_mac: [u8; 6],
    /// Local: the host side's MAC; remote: the uplink's.
    pub src_mac: [u8; 6],
}

/// Value of `tm_ov_locals` (key: a container's namespace address).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Local {
    /// Its host-side veth.
    pub ifindex: u32,
    /// The source its packets get after translation (its instance IP).
    pub instance_addr: [u8; 4],
    pub mac: [u8; 6],
    pub host_mac: [u8; 6],
}

/// Key of `tm_ov_ct`. ICMP echo uses the identifier as `src_port`
/// and 0 as `dst_port`, in both directions.
#[repr(C, align(4))]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConntrackKey {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub src_port: u16,
    pub dst_port: u16,
    pub protocol: u8,
    pub _pad: [u8; 3],
}

/// Key of `tm_ov_frags`: the fragments of one IPv4 datagram, as they
/// arrive (before translation).
#[repr(C, align(4))]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragmentKey {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    /// The IP identification field.
    pub id: u16,
    pub protocol: u8,
    pub _pad: u8,
}

/// Key of `tm_ov_frags6`: the fragments of one IPv6 datagram (its
/// Fragment header's identification), as they arrive.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragmentKey6 {
    pub src: Addr6,
    pub dst: Addr6,
    /// The identification field.
    pub id: u32,
    /// The header after the Fragment header.
    pub protocol: u8,
    pub _pad: [u8; 3],
}

/// Value of `tm_ov_ct`.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct ConntrackValue {
    pub kind: u32,
    /// The instance chosen, valid while its generation matches (an
    /// instance's generation changes with its entry or its service IPs).
    pub instance: u32,
    pub generation: u32,
    /// Forward: the service's id (its counters).
    pub service: u32,
    /// Reverse: the service IP the client dialled (the reply's new source).
    pub service_addr: [u8; 4],
    /// Forward: the sender's instance IP (the new source).
    pub new_src: [u8; 4],
    /// Forward to a local instance: the source the packet then gets if it
    /// is a reply to a flow that container dialled (0: none).
    pub reply_src: [u8; 4],
}

/// The overlay's settings (one entry of `tm_ov_config`).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct OverlayConfig {
    /// The largest inner IP packet the tunnel (`tm_tunnel`) carries: a
    /// container's bigger one with DF set gets ICMP "fragmentation needed"
    /// with this MTU (the service path answers it; the tunnel itself does
    /// not look at sizes).
    pub tunnel_mtu: u16,
    pub _pad: u16,
    /// Source of ICMP errors sent to containers (their gateway).
    pub gateway: [u8; 4],
    /// Destinations in this prefix that are not known service IPs are
    /// signalled as misses (prefix, mask).
    pub service_prefix: [u8; 4],
    pub service_mask: [u8; 4],
    /// [`CONFIG_SERVICES_OUTSIDE_PREFIX`]: some service IP lies outside the
    /// prefix. Without it, a container's packet to an address outside the
    /// prefix passes at once, with no conntrack or service lookup.
    pub flags: u32,
}

/// [`OverlayConfig::flags`] bit.
pub const CONFIG_SERVICES_OUTSIDE_PREFIX: u32 = 1;

/// Entries of `tm_ov_loc_slots`.
pub const LOCAL_SLOTS: u32 = 1024;
/// [`LocalSlot::state`].
pub const LOCAL_SLOT_EMPTY: u32 = 0;
/// The slot holds the one container whose address maps here.
pub const LOCAL_SLOT_ONE: u32 = 1;
/// Several containers map here: ask `tm_ov_locals`.
pub const LOCAL_SLOT_SHARED: u32 = 2;

/// The `tm_ov_loc_slots` index of a container address: its low 10 bits, so
/// a node subnet of up to 1024 addresses never shares a slot.
#[inline(always)]
pub const fn local_slot(addr: [u8; 4]) -> u32 {
    u32::from_be_bytes(addr) & (LOCAL_SLOTS - 1)
}

/// Value of `tm_ov_loc_slots`: the decapsulation path's array copy of a
/// `tm_ov_locals` entry, found without a hash lookup.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalSlot {
    pub addr: [u8; 4],
    pub state: u32,
    /// Non-zero once the container has dialled a service IP (set by the
    /// kernel when it binds such a flow; the writer sets it when it rewrites
    /// a slot it already held): only then can a tunnel packet to it be a
    /// reply that needs the reverse translation (a conntrack lookup).
    pub dialled: u32,
    pub local: Local,
}

/// Entries of `tm_ov_own_slots`.
pub const OWNER_SLOTS: u32 = 4096;
/// [`OwnerSlot::state`]: no known owner's address maps here (the source is
/// judged by where it lies: `overlay::unknown_source` in the BPF programs).
pub const OWNER_SLOT_EMPTY: u32 = 0;
/// The slot holds the one known owner whose address maps here.
pub const OWNER_SLOT_ONE: u32 = 1;
/// Several owners map here, or the slot is being rewritten: ask `tm_ov_owners`.
pub const OWNER_SLOT_SHARED: u32 = 2;
/// The state proper, below [`OWNER_SLOT_SEEN`].
pub const OWNER_SLOT_STATE: u32 = 0xff;
/// Added to a slot's `state` by the decapsulation path (atomically, when no
/// bit above [`OWNER_SLOT_STATE`] is set yet) when a packet from the slot's
/// one owner's address passes; any bit above the state means seen. The
/// daemon reads and clears the mark, so a remote job whose packets only
/// arrive (one-way flows) still counts as used and keeps its table.
pub const OWNER_SLOT_SEEN: u32 = 0x100;

/// The `tm_ov_own_slots` index of an inner IPv4 source: its low 12 bits.
#[inline(always)]
pub const fn owner_slot(addr: [u8; 4]) -> u32 {
    u32::from_be_bytes(addr) & (OWNER_SLOTS - 1)
}

/// Value of `tm_ov_own_slots`: the decapsulation path's array copy of a
/// `tm_ov_owners` entry, read without a hash lookup (one costs ~30 ns on
/// that path).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct OwnerSlot {
    /// The inner source when `state` is [`OWNER_SLOT_ONE`].
    pub addr: [u8; 4],
    /// The tunnel address of the node that may send it ([`OWNER_THIS_NODE`]: none).
    pub owner: [u8; 4],
    pub state: u32,
}

/// An IPv6 address (network order bytes).
pub type Addr6 = [u8; 16];

/// The `tm_ov_own_slot6` index of an inner IPv6 source: the low 12 bits of
/// its last word ([`OWNER_SLOTS`] entries, the states of [`OwnerSlot`]).
#[inline(always)]
pub const fn owner_slot6(addr: &Addr6) -> u32 {
    u32::from_be_bytes([addr[12], addr[13], addr[14], addr[15]]) & (OWNER_SLOTS - 1)
}

/// Value of `tm_ov_own_slot6`: [`OwnerSlot`] for an IPv6 source
/// (`tm_ov_owners6`).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct OwnerSlot6 {
    pub addr: Addr6,
    pub owner: [u8; 4],
    pub state: u32,
}

/// The IPv6 overlay's settings (one entry of `tm_ov_config6`); the tunnel
/// is `tm_tunnel`, its MTU `OverlayConfig`'s.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct OverlayConfig6 {
    /// Source of ICMPv6 errors sent to containers (their gateway).
    pub gateway: Addr6,
    pub service_prefix: Addr6,
    pub service_mask: Addr6,
    /// [`CONFIG_SERVICES_OUTSIDE_PREFIX`] for IPv6 service IPs.
    pub flags: u32,
}

/// Value of `tm_ov_inst6` (index: the instance id): an instance's IPv6
/// addresses; the rest (kind, generation, where it is) is in `tm_ov_instances`.
#[repr(C, align(4))]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Instance6 {
    /// Its namespace address (all zero: the instance has no IPv6).
    pub ns_addr: Addr6,
    /// The address its replies come from: its IPv6 instance IP (or `ns_addr`).
    pub reply_addr: Addr6,
}

/// Value of `tm_ov_locals6` (key: a container's IPv6 namespace address).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Local6 {
    pub ifindex: u32,
    /// The source its packets get after translation (its IPv6 instance IP).
    pub instance_addr: Addr6,
    pub mac: [u8; 6],
    pub host_mac: [u8; 6],
}

/// Key of `tm_ov_ct6`, as [`ConntrackKey`] (ICMPv6 echo: the identifier).
#[repr(C, align(4))]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConntrackKey6 {
    pub src: Addr6,
    pub dst: Addr6,
    pub src_port: u16,
    pub dst_port: u16,
    pub protocol: u8,
    pub _pad: [u8; 3],
}

/// Value of `tm_ov_ct6`, as [`ConntrackValue`].
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct ConntrackValue6 {
    pub kind: u32,
    pub instance: u32,
    pub generation: u32,
    pub service: u32,
    pub service_addr: Addr6,
    pub new_src: Addr6,
    pub reply_src: Addr6,
}

/// Per-CPU working space of the IPv6 paths (`tm_ov_scratch6`, not pinned):
/// their keys and values are too big for the stack next to the IPv4 path's.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Scratch6 {
    /// The packet's conntrack key (its addresses and ports as they arrived).
    pub key: ConntrackKey6,
    pub other: ConntrackKey6,
    pub value: ConntrackValue6,
    pub new_src: Addr6,
    pub new_dst: Addr6,
    pub miss: Miss6,
    /// The datagram of a fragment.
    pub fragment: FragmentKey6,
}

/// [`Miss`] for an IPv6 service IP, on the same ring (told apart by length).
#[repr(C, align(4))]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Miss6 {
    pub service_addr: Addr6,
    pub client_addr: Addr6,
    pub port: u16,
    pub protocol: u8,
    /// [`MISS_FROM_STRANGER`], or 0.
    pub flags: u8,
}

/// What the kernel tells userspace about a service IP it does not know.
#[repr(C, align(4))]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Miss {
    pub service_addr: [u8; 4],
    /// The container that asked (its namespace address).
    pub client_addr: [u8; 4],
    /// Destination port and protocol of the first packet.
    pub port: u16,
    pub protocol: u8,
    /// [`MISS_FROM_STRANGER`], or 0.
    pub flags: u8,
}

/// A packet a container sent to a service IP no table names yet, as the
/// host-side veth received it: the daemon sends it again once the
/// cluster's answer is in (`tm_ov_held`).
#[repr(C)]
#[derive(Copy, Clone, Debug)]
pub struct Held {
    /// `CLOCK_MONOTONIC` when held, in nanoseconds: a frame that waited in
    /// the ring (the daemon away) is not sent again after its time.
    pub ts_ns: u64,
    /// The host-side veth it came in on.
    pub ifindex: u32,
    /// How many bytes of `data` are the frame.
    pub len: u32,
    pub data: [u8; HELD_BYTES as usize],
}

crate::assert_layout!(Service, size = 8, align = 4);
crate::assert_layout!(Instance, size = 36, align = 4);
crate::assert_layout!(Local, size = 20, align = 4);
crate::assert_layout!(ConntrackKey, size = 16, align = 4);
crate::assert_layout!(ConntrackValue, size = 28, align = 4);
crate::assert_layout!(OverlayConfig, size = 20, align = 4);
crate::assert_layout!(LocalSlot, size = 32, align = 4);
crate::assert_layout!(OwnerSlot, size = 12, align = 4);
crate::assert_layout!(OwnerSlot6, size = 24, align = 4);
crate::assert_layout!(Miss, size = 12, align = 4);
crate::assert_layout!(Held, size = 16 + HELD_BYTES as usize, align = 8);
crate::assert_layout!(OverlayConfig6, size = 52, align = 4);
crate::assert_layout!(Instance6, size = 32, align = 4);
crate::assert_layout!(Local6, size = 32, align = 4);
crate::assert_layout!(ConntrackKey6, size = 40, align = 4);
crate::assert_layout!(ConntrackValue6, size = 64, align = 4);
crate::assert_layout!(Scratch6, size = 252, align = 4);
crate::assert_layout!(Miss6, size = 36, align = 4);
crate::assert_layout!(FragmentKey, size = 12, align = 4);
crate::assert_layout!(FragmentKey6, size = 40, align = 4);

#[cfg(feature = "user")]
crate::impl_pod!(
    Service,
    Instance,
    Local,
    ConntrackKey,
    ConntrackValue,
    OverlayConfig,
    LocalSlot,
    OwnerSlot,
    OwnerSlot6,
    Miss,
    OverlayConfig6,
    Instance6,
    Local6,
    ConntrackKey6,
    ConntrackValue6,
    Miss6,
    FragmentKey,
    FragmentKey6
);
