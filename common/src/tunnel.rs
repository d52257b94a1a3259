//! The node-to-node tunnel: an inner IP packet (IPv4 or IPv6) as the payload
//! of UDP between two nodes' underlay IPv4 addresses. The load balancer
//! sends remote targets' packets through it, the service-IP overlay remote
//! instances' packets; the uplink decapsulates what arrives for this node
//! once, for both.

/// How many node addresses `tm_tunnel_peers` holds.
pub const MAX_PEERS: u32 = 1024;
/// Bits of a `tm_tunnel_peers` value: which source named the node (each
/// source sets and clears only its own bit; the entry goes with the last).
pub const PEER_LB: u8 = 1;
pub const PEER_OVERLAY: u8 = 2;
/// Named in the configuration (`lb.tunnel_peers`).
pub const PEER_STATIC: u8 = 4;
/// Named by the cluster's node records.
pub const PEER_CLUSTER: u8 = 8;

/// Entries of `tm_tunnel_slots`, the array copy of `tm_tunnel_peers` the
/// uplink checks first (an array read instead of a hash lookup).
pub const PEER_SLOTS: u32 = 1024;
/// [`PeerSlot::state`]: no known node maps here.
pub const PEER_SLOT_EMPTY: u8 = 0;
/// The slot holds the one known node whose address maps here.
pub const PEER_SLOT_ONE: u8 = 1;
/// Several known nodes map here: ask `tm_tunnel_peers`.
pub const PEER_SLOT_SHARED: u8 = 2;

/// The `tm_tunnel_slots` index of a node's address: its low 10 bits, so the
/// nodes of an underlay subnet of up to 1024 addresses never share a slot.
#[inline(always)]
pub const fn peer_slot(addr: [u8; 4]) -> u32 {
    u32::from_be_bytes(addr) & (PEER_SLOTS - 1)
}

/// Value of `tm_tunnel_slots`.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerSlot {
    /// The node's address when `state` is [`PEER_SLOT_ONE`].
    pub addr: [u8; 4],
    pub state: u8,
    pub _pad: [u8; 3],
}

crate::assert_layout!(PeerSlot, size = 8, align = 1);

#[cfg(feature = "user")]
crate::impl_pod!(PeerSlot);

/// Value of `tm_tunnel` (one entry): this node's tunnel endpoint.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct TunnelConfig {
    /// This node's underlay IPv4 address: the outer source of what it
    /// sends, the outer destination of what it decapsulates.
    pub node_addr: [u8; 4],
    /// The UDP port packets arrive on (and the load balancer sends to); 0:
    /// the tunnel is off (no node address).
    pub port: u16,
    pub _pad: u16,
}

crate::assert_layout!(TunnelConfig, size = 8, align = 2);

#[cfg(feature = "user")]
crate::impl_pod!(TunnelConfig);
