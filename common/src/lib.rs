//! Map types shared by the tapmesh BPF programs and the daemon.
//!
//! Every type here is `#[repr(C)]`, has no implicit padding (checked by the
//! `assert_layout!` lines below) and is the only contract between the kernel
//! and userspace halves. Changing a layout means bumping [`SCHEMA_VERSION`],
//! which moves the pin directory.
#![no_std]

pub mod lb;
pub mod mirror;
pub mod overlay;
pub mod stats;
pub mod tunnel;

pub use stats::*;

/// Version of the map layouts; pins live under `<bpffs root>/v<SCHEMA_VERSION>/`.
pub const SCHEMA_VERSION: u32 = 17;

/// Default UDP port of the node-to-node tunnel (inner IP packet as UDP payload).
pub const DEFAULT_TUNNEL_PORT: u16 = 50103;

/// Names of the BPF programs in the object (at most 15 bytes: the kernel's limit).
pub mod program_names {
    pub const XDP_UPLINK: &str = "tm_xdp_uplink";
    pub const TC_INGRESS: &str = "tm_tc_ingress";
    pub const TC_EGRESS: &str = "tm_tc_egress";
    /// An empty XDP program: the floor every benchmark is measured against.
    pub const XDP_FLOOR: &str = "tm_xdp_floor";
    /// An empty TC program: the floor of the TC benchmarks.
    pub const TC_FLOOR: &str = "tm_tc_floor";
    /// On a mirror ring's interface: copies into its AF_XDP socket.
    pub const XDP_MIRROR: &str = "tm_xdp_mirror";
    /// Mirror copies only, on source ports without the TC programs above.
    pub const TC_TAP_OUT: &str = "tm_tc_tap_out";
    pub const TC_TAP_IN: &str = "tm_tc_tap_in";
    /// On a container's host-side veth: service-IP translation and tunnel.
    pub const TC_SERVICE: &str = "tm_tc_service";
    /// On the `xdp:xdp_devmap_xmit`, `xdp:xdp_redirect_err` and
    /// `xdp:xdp_bulk_tx` tracepoints: redirected or sent-back frames a
    /// device refused.
    pub const TP_XMIT: &str = "tm_tp_xmit";
    pub const TP_REDIRECT_ERR: &str = "tm_tp_redir_err";
    pub const TP_BULK_TX: &str = "tm_tp_bulk_tx";
    /// On a conduit's node-side veth: replies get their port NAT undone.
    pub const TC_CONDUIT: &str = "tm_tc_conduit";
    /// The uplink's tail call for a packet whose flow translates ports: the
    /// target port, then the local target (never attached).
    pub const XDP_PORT_NAT: &str = "tm_xdp_port_nat";
}

/// Names of the BPF maps (also their pin file names).
pub mod map_names {
    pub const STATS: &str = "tm_stats";
    pub const VIPS: &str = "tm_vips";
    pub const VIP_HOSTS: &str = "tm_vip_hosts";
    pub const VIP_SLOTS: &str = "tm_vip_slots";
    pub const VIP_VALUES: &str = "tm_vip_values";
    pub const VIP_CONFIGS: &str = "tm_vip_configs";
    pub const DST_PORTS: &str = "tm_dst_ports";
    pub const SRC_PORTS: &str = "tm_src_ports";
    pub const SOURCES: &str = "tm_sources";
    pub const FLOWS: &str = "tm_flows";
    pub const STREAMS: &str = "tm_streams";
    pub const MAGLEV: &str = "tm_maglev";
    pub const TARGETS: &str = "tm_targets";
    pub const LB_CONFIG: &str = "tm_lb_config";
    pub const PORT_NATS: &str = "tm_port_nats";
    pub const PORT_NAT_REPLIES: &str = "tm_port_nat_rev";
    pub const VIP_SENDERS: &str = "tm_vip_senders";
    pub const XDP_TAILS: &str = "tm_xdp_tails";
    pub const PORT_NAT_PICK: &str = "tm_nat_pick";
    pub const TUNNEL: &str = "tm_tunnel";
    pub const TUNNEL_PEERS: &str = "tm_tunnel_peers";
    pub const TUNNEL_SLOTS: &str = "tm_tunnel_slots";
    pub const VIP_STATS: &str = "tm_vip_stats";
    pub const FLOW_STATS: &str = "tm_flow_stats";
    pub const TARGET_STATS: &str = "tm_target_stats";
    pub const UPLINK_BITS: &str = "tm_uplink_bits";
    pub const DETOUR_KEY: &str = "tm_detour_key";
    pub const MIRROR_PORTS: &str = "tm_mirror_ports";
    pub const MIRROR_FILTER: &str = "tm_mirror_bits";
    pub const MIRROR_VLANS: &str = "tm_mirror_vlans";
    pub const MIRROR_STATS: &str = "tm_mirror_stats";
    pub const MIRROR_RINGS: &str = "tm_mirror_rings";
    pub const MIRROR_COPIES: &str = "tm_mirror_copy";
    pub const MIRROR_SCRATCH: &str = "tm_mirror_tmp";
    pub const XSKS: &str = "tm_xsks";
    pub const OV_CONFIG: &str = "tm_ov_config";
    pub const OV_SERVICES: &str = "tm_ov_services";
    pub const OV_SLOTS: &str = "tm_ov_slots";
    pub const OV_ROUND_ROBIN: &str = "tm_ov_rr";
    pub const OV_INSTANCES: &str = "tm_ov_instances";
    pub const OV_LOCALS: &str = "tm_ov_locals";
    pub const OV_LOCAL_SLOTS: &str = "tm_ov_loc_slots";
    pub const OV_OWNERS: &str = "tm_ov_owners";
    pub const OV_OWNER_SLOTS: &str = "tm_ov_own_slots";
    pub const OV_OWNER_SLOTS6: &str = "tm_ov_own_slot6";
    pub const OV_OWNERS6: &str = "tm_ov_owners6";
    pub const OV_CONFIG6: &str = "tm_ov_config6";
    pub const OV_SERVICES6: &str = "tm_ov_services6";
    pub const OV_INSTANCES6: &str = "tm_ov_inst6";
    pub const OV_LOCALS6: &str = "tm_ov_locals6";
    pub const OV_CONNTRACK6: &str = "tm_ov_ct6";
    pub const OV_PENDING6: &str = "tm_ov_pending6";
    pub const OV_FRAGMENTS: &str = "tm_ov_frags";
    pub const OV_FRAGMENTS6: &str = "tm_ov_frags6";
    pub const OV_CONNTRACK: &str = "tm_ov_ct";
    pub const OV_PENDING: &str = "tm_ov_pending";
    pub const OV_ASKS: &str = "tm_ov_asks";
    pub const OV_MISSES: &str = "tm_ov_misses";
    pub const OV_HELD: &str = "tm_ov_held";
    pub const OV_HOLD_ADDRS: &str = "tm_ov_hold_ips";
    pub const OV_HOLD_VETHS: &str = "tm_ov_hold_ifs";
    pub const OV_RESEND: &str = "tm_ov_resend";
    pub const OV_SERVICE_STATS: &str = "tm_ov_svc_stats";
    pub const OV_INSTANCE_STATS: &str = "tm_ov_ins_stats";
}

/// Fails the build (kernel and user side) when a layout is not what was written down.
#[macro_export]
macro_rules! assert_layout {
    ($ty:ty, size = $size:expr, align = $align:expr) => {
        const _: () = assert!(core::mem::size_of::<$ty>() == $size);
        const _: () = assert!(core::mem::align_of::<$ty>() == $align);
    };
}

/// Marks types that userspace may read and write through aya maps.
#[cfg(feature = "user")]
macro_rules! impl_pod {
    ($($ty:ty),* $(,)?) => {
        $( unsafe impl aya::Pod for $ty {} )*
    };
}
#[cfg(feature = "user")]
pub(crate) use impl_pod;
