//! Every map the programs use. Names match `tapmesh_common::map_names`.
#![allow(non_upper_case_globals)]

use aya_ebpf::{
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray, RingBuf, XskMap},
    macros::btf_map,
};
use tapmesh_common::{
    lb::{
        FlowEntry, FlowMask, LbConfig, NatReplyData, PortData, PortNatKey, PortNatPick, PortNatValue,
        SourceData, StreamValue, Target, VipAddr, VipConfig, VipSlot, VipValue, FLOW_SLOTS,
        MAGLEV_CAPACITY, MAGLEV_MAP_FLAGS, MAX_CONFIGS, MAX_FLOWS, MAX_PORT_NATS, MAX_PREFIXES, MAX_STREAMS,
        MAX_TARGETS, MAX_VIPS, VIP_SLOTS, VipSender, MAX_VIP_SENDERS,
    },
    mirror::{
        CopyHead, MirrorCounter, MirrorPort, VlanSet, COPY_MAX_BYTES, COPY_RING_BYTES, FILTER_WORDS,
        MAX_MIRROR_PORTS, MAX_RINGS, MAX_TAP_FLOWS,
    },
    overlay::{
        self as ov, ConntrackKey, ConntrackValue, Instance, Local, Miss, OverlayConfig, Service,
    },
    tunnel::{PeerSlot, TunnelConfig, MAX_PEERS, PEER_SLOTS},
    PacketCounter, ProgramSlot, ProgramStats,
};

/// Verdicts, drop reasons and protocols, one entry per [`ProgramSlot`].
#[btf_map]
pub static tm_stats: PerCpuArray<ProgramStats, { ProgramSlot::COUNT as usize }> =
    PerCpuArray::new();

/// VIP address or prefix → its index and the configuration in force.
#[btf_map]
pub static tm_vips: LpmTrie<VipAddr, VipValue, { MAX_VIPS as usize }> = LpmTrie::new();

/// Host VIPs (/128, IPv4 mapped) → its index and configuration: one hash
/// lookup for the common case; prefixes go to `tm_vips`.
#[btf_map]
pub static tm_vip_hosts: HashMap<VipAddr, VipValue, { MAX_VIPS as usize }> = HashMap::new();

/// `vip_slot(address)` → the host VIP there, if any.
#[btf_map]
pub static tm_vip_slots: Array<VipSlot, { VIP_SLOTS as usize }> = Array::new();

/// VIP index → its index and the configuration in force (what a slot leads to).
#[btf_map]
pub static tm_vip_values: Array<VipValue, { MAX_VIPS as usize }> = Array::new();

/// Config id → protocol masks and flow count.
#[btf_map]
pub static tm_vip_configs: Array<VipConfig, { MAX_CONFIGS as usize }> = Array::new();

/// (config id, destination port prefix) → flows.
#[btf_map]
pub static tm_dst_ports: LpmTrie<PortData, FlowMask, { MAX_PREFIXES as usize }> = LpmTrie::new();

/// (config id, source port prefix) → flows.
#[btf_map]
pub static tm_src_ports: LpmTrie<PortData, FlowMask, { MAX_PREFIXES as usize }> = LpmTrie::new();

/// (config id, source address prefix) → flows.
#[btf_map]
pub static tm_sources: LpmTrie<SourceData, FlowMask, { MAX_PREFIXES as usize }> = LpmTrie::new();

/// config id × 64 + bit → the flow.
#[btf_map]
pub static tm_flows: Array<FlowEntry, { FLOW_SLOTS as usize }> = Array::new();

/// Stream id → where its Maglev table is.
#[btf_map]
pub static tm_streams: Array<StreamValue, { MAX_STREAMS as usize }> = Array::new();

/// Every stream's Maglev table: entries hold a slot (identifier − 1).
/// Mappable, so the daemon writes tables by memory copy.
#[btf_map]
pub static tm_maglev: Array<u32, { MAGLEV_CAPACITY as usize }, { MAGLEV_MAP_FLAGS as usize }> =
    Array::new();

/// Target index (what Maglev entries hold) → how to reach the target.
#[btf_map]
pub static tm_targets: Array<Target, { MAX_TARGETS as usize }> = Array::new();

/// Settings of the load balancer as a whole (one entry).
#[btf_map]
pub static tm_lb_config: Array<LbConfig, 1> = Array::new();

/// (config id, flow bit, protocol, destination port) → the target port.
#[btf_map]
pub static tm_port_nats: HashMap<PortNatKey, PortNatValue, { 2 * MAX_PORT_NATS as usize }> =
    HashMap::new();

/// (protocol, target port, VIP prefix) → the port a reply's source goes back to.
#[btf_map]
pub static tm_port_nat_rev: LpmTrie<NatReplyData, PortNatValue, { 2 * MAX_PORT_NATS as usize }> =
    LpmTrie::new();

/// (local target's interface, VIP index) → 1: a container behind that
/// interface may send from that VIP.
#[btf_map]
pub static tm_vip_senders: HashMap<VipSender, u8, { 2 * MAX_VIP_SENDERS as usize }> =
    HashMap::new();

/// Programs the uplink tail-calls (`TAIL_PORT_NAT`: `tm_xdp_port_nat`),
/// filled by the daemon at load: their code is verified on its own, not
/// inside the uplink's 1M-instruction budget.
#[btf_map]
pub static tm_xdp_tails: ProgramArray<1> = ProgramArray::new();

/// What the uplink picked for the packet it hands to a tail (one per CPU).
#[btf_map]
pub static tm_nat_pick: PerCpuArray<PortNatPick, 1> = PerCpuArray::new();

/// This node's tunnel endpoint (one entry), for the load balancer and the overlay.
#[btf_map]
pub static tm_tunnel: Array<TunnelConfig, 1> = Array::new();

/// Underlay address of every node this one may take tunnel packets from →
/// which sources named it (`PEER_LB`, `PEER_OVERLAY`).
#[btf_map]
pub static tm_tunnel_peers: HashMap<[u8; 4], u8, { MAX_PEERS as usize }> = HashMap::new();

/// `tm_tunnel_peers` by `peer_slot` of the address: the node that has the
/// slot alone, or "shared" (then the hash is asked).
#[btf_map]
pub static tm_tunnel_slots: Array<PeerSlot, { PEER_SLOTS as usize }> = Array::new();

/// Packets and bytes per VIP, flow and target.
#[btf_map]
pub static tm_vip_stats: PerCpuArray<PacketCounter, { MAX_VIPS as usize }> = PerCpuArray::new();
#[btf_map]
pub static tm_flow_stats: PerCpuArray<PacketCounter, { MAX_FLOWS as usize }> = PerCpuArray::new();
#[btf_map]
pub static tm_target_stats: PerCpuArray<PacketCounter, { MAX_TARGETS as usize }> =
    PerCpuArray::new();

/// Bit per uplink ifindex (as `tm_mirror_bits`): whose failed redirects count.
#[btf_map]
pub static tm_uplink_bits: Array<u64, { FILTER_WORDS as usize }> = Array::new();

/// The key of the uplink's mark for a detoured frame (`detour.rs`): random,
/// written by the daemon at each start; 0 (none yet) turns detours off.
#[btf_map]
pub static tm_detour_key: Array<u64, 1> = Array::new();

// Port mirroring.
/// Source interface index → its tap flows.
#[btf_map]
pub static tm_mirror_ports: HashMap<u32, MirrorPort, { MAX_MIRROR_PORTS as usize }> =
    HashMap::new();
/// Tap flow → the VLANs it passes (when filtered).
#[btf_map]
pub static tm_mirror_bits: Array<u64, { FILTER_WORDS as usize }> = Array::new();
#[btf_map]
pub static tm_mirror_vlans: Array<VlanSet, { MAX_TAP_FLOWS as usize }> = Array::new();
#[btf_map]
pub static tm_mirror_stats: PerCpuArray<MirrorCounter, { MAX_TAP_FLOWS as usize }> =
    PerCpuArray::new();
/// Mirror ring interface index → its slot in `tm_xsks`.
#[btf_map]
pub static tm_mirror_rings: HashMap<u32, u32, { MAX_RINGS as usize }> = HashMap::new();
#[btf_map]
pub static tm_xsks: XskMap<{ MAX_RINGS as usize }> = XskMap::new();
/// Copies for mirror rings made straight from TC: a `CopyHead` and the bytes.
#[btf_map]
pub static tm_mirror_copy: RingBuf<CopyHead, { COPY_RING_BYTES as usize }> = RingBuf::new();
/// Where a copy is put together (one per CPU: TC programs do not nest on a CPU).
#[btf_map]
pub static tm_mirror_tmp: PerCpuArray<CopyScratch, 1> = PerCpuArray::new();

/// A copy as it goes into `tm_mirror_copy`: its head, then `caplen` bytes.
#[repr(C)]
pub struct CopyScratch {
    pub head: CopyHead,
    pub bytes: [u8; COPY_MAX_BYTES as usize],
}

// Service-IP overlay.
#[btf_map]
pub static tm_ov_config: Array<OverlayConfig, 1> = Array::new();
/// Service IP → its id, policy and slot count.
#[btf_map]
pub static tm_ov_services: HashMap<[u8; 4], Service, { ov::MAX_SERVICES as usize }> =
    HashMap::new();
/// service id × SERVICE_SLOTS + slot → instance id.
#[btf_map]
pub static tm_ov_slots: Array<u32, { ov::SLOT_ENTRIES as usize }> = Array::new();
/// Round-robin turn per service id (shared by every CPU).
#[btf_map]
pub static tm_ov_rr: Array<u32, { ov::MAX_SERVICES as usize }> = Array::new();
#[btf_map]
pub static tm_ov_instances: Array<Instance, { ov::MAX_INSTANCES as usize }> = Array::new();
/// A container's namespace address → its veth and instance IP.
#[btf_map]
pub static tm_ov_locals: HashMap<[u8; 4], Local, { ov::MAX_LOCALS as usize }> = HashMap::new();
/// The same, by `local_slot(address)`, for the per-packet paths.
#[btf_map]
pub static tm_ov_loc_slots: Array<ov::LocalSlot, { ov::LOCAL_SLOTS as usize }> = Array::new();
/// An inner source → the tunnel address of the node that may send it
/// (`OWNER_THIS_NODE`: none, it is ours).
#[btf_map]
pub static tm_ov_owners: HashMap<[u8; 4], [u8; 4], { ov::MAX_OWNERS as usize }> = HashMap::new();
/// The same, by `owner_slot(address)`, for the decapsulation path.
#[btf_map]
pub static tm_ov_own_slots: Array<ov::OwnerSlot, { ov::OWNER_SLOTS as usize }> = Array::new();
/// The same, by `owner_slot6(address)`.
#[btf_map]
pub static tm_ov_own_slot6: Array<ov::OwnerSlot6, { ov::OWNER_SLOTS as usize }> = Array::new();
/// The same for IPv6 inner sources.
#[btf_map]
pub static tm_ov_owners6: HashMap<ov::Addr6, [u8; 4], { ov::MAX_OWNERS as usize }> =
    HashMap::new();
#[btf_map]
pub static tm_ov_ct: LruHashMap<ConntrackKey, ConntrackValue, { ov::CONNTRACK_ENTRIES as usize }> =
    LruHashMap::new();
/// Budgets per second, each `second << 16 | count`: slot 0, asks about
/// strangers' inner sources; slot 1, packets held for the daemon.
#[btf_map]
pub static tm_ov_asks: Array<u64, 2> = Array::new();
/// Service IPs signalled as unknown and not answered yet → when.
#[btf_map]
pub static tm_ov_pending: LruHashMap<[u8; 4], u64, { ov::PENDING_ENTRIES as usize }> =
    LruHashMap::new();
#[btf_map]
pub static tm_ov_misses: RingBuf<Miss, { ov::MISS_RING_BYTES as usize }> = RingBuf::new();
/// Packets to unknown service IPs, for the daemon to send again once known.
#[btf_map]
pub static tm_ov_held: RingBuf<ov::Held, { ov::HELD_RING_BYTES as usize }> = RingBuf::new();
/// Service IP (IPv4 as `::ffff:a.b.c.d`) → packets held for it this
/// second: `second << 16 | count`.
#[btf_map]
pub static tm_ov_hold_ips: LruHashMap<ov::Addr6, u64, { ov::HOLD_ADDRESSES as usize }> =
    LruHashMap::new();
/// Host-side veth index → packets held from it this second, as above.
#[btf_map]
pub static tm_ov_hold_ifs: LruHashMap<u32, u64, { ov::HOLD_ADDRESSES as usize }> =
    LruHashMap::new();
/// Cookies of the daemon's sockets that send held packets again → the
/// host-side veth they arrive on: a tap took its copy when it was held.
#[btf_map]
pub static tm_ov_resend: HashMap<u64, u32, { ov::RESEND_SOCKETS as usize }> = HashMap::new();
// The same for IPv6 service IPs (ids, slots, RR turns, instances' kind and
// generation, counters and the tunnel are shared with IPv4).
#[btf_map]
pub static tm_ov_config6: Array<ov::OverlayConfig6, 1> = Array::new();
#[btf_map]
pub static tm_ov_services6: HashMap<ov::Addr6, Service, { ov::MAX_SERVICES as usize }> =
    HashMap::new();
#[btf_map]
pub static tm_ov_inst6: Array<ov::Instance6, { ov::MAX_INSTANCES as usize }> = Array::new();
#[btf_map]
pub static tm_ov_locals6: HashMap<ov::Addr6, ov::Local6, { ov::MAX_LOCALS as usize }> =
    HashMap::new();
#[btf_map]
pub static tm_ov_ct6: LruHashMap<
    ov::ConntrackKey6,
    ov::ConntrackValue6,
    { ov::CONNTRACK_ENTRIES6 as usize },
> = LruHashMap::new();
/// The translation of a fragmented datagram, recorded at its first fragment
/// for the later ones (which carry no ports): a forward entry on the
/// sender's side, a reverse one (the dialled service IP) on the receiver's.
#[btf_map]
pub static tm_ov_frags: LruHashMap<
    ov::FragmentKey,
    ConntrackValue,
    { ov::FRAGMENT_ENTRIES as usize },
> = LruHashMap::new();
/// [`tm_ov_frags`] for IPv6 datagrams (Fragment header).
#[btf_map]
pub static tm_ov_frags6: LruHashMap<
    ov::FragmentKey6,
    ov::ConntrackValue6,
    { ov::FRAGMENT_ENTRIES as usize },
> = LruHashMap::new();
#[btf_map]
pub static tm_ov_pending6: LruHashMap<ov::Addr6, u64, { ov::PENDING_ENTRIES as usize }> =
    LruHashMap::new();
#[btf_map]
pub static tm_ov_scratch6: PerCpuArray<ov::Scratch6, 1> = PerCpuArray::new();
#[btf_map]
pub static tm_ov_svc_stats: PerCpuArray<PacketCounter, { ov::MAX_SERVICES as usize }> =
    PerCpuArray::new();
#[btf_map]
pub static tm_ov_ins_stats: PerCpuArray<PacketCounter, { ov::MAX_INSTANCES as usize }> =
    PerCpuArray::new();
