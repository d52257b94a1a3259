//! Programs that do one kernel operation each, for `cargo xtask bench`: the
//! cost of the building blocks every packet path is made of, timed like the
//! paths (net of the empty program). Never attached.

use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, xdp_action, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4,
        BPF_F_ADJ_ROOM_ENCAP_L4_UDP, BPF_F_PSEUDO_HDR, TC_ACT_OK,
    },
    helpers::generated::{bpf_l4_csum_replace, bpf_redirect},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use tapmesh_common::overlay::ConntrackKey;

use crate::{
    lb::adjust_head,
    maps::{tm_node, tm_ov_conntrack, tm_ov_locals},
};

/// One array map lookup.
#[xdp]
pub fn tm_probe_xdp_array(_ctx: XdpContext) -> u32 {
    match tm_node.get(0) {
        Some(n) if n.tunnel_port == 1 => xdp_action::XDP_DROP,
        _ => xdp_action::XDP_PASS,
    }
}

/// One hash map lookup that finds nothing.
#[xdp]
pub fn tm_probe_xdp_hash_miss(_ctx: XdpContext) -> u32 {
    // SAFETY: the value is not used.
    match unsafe { tm_ov_locals.get(&0x0100_00c6) } {
        Some(_) => xdp_action::XDP_DROP,
        None => xdp_action::XDP_PASS,
    }
}

/// `bpf_xdp_adjust_head` making room for 28 bytes.
#[xdp]
pub fn tm_probe_xdp_adjust_head(ctx: XdpContext) -> u32 {
    match adjust_head(&ctx, -28) {
        Ok(()) => xdp_action::XDP_PASS,
        Err(_) => xdp_action::XDP_DROP,
    }
}

/// `bpf_redirect`.
#[xdp]
pub fn tm_probe_xdp_redirect(_ctx: XdpContext) -> u32 {
    // SAFETY: a plain helper call.
    unsafe { bpf_redirect(1, 0) as u32 }
}

/// One LRU hash lookup that finds the entry of the bench's overlay flow.
#[classifier]
pub fn tm_probe_tc_lru_hit(_ctx: TcContext) -> i32 {
    let key = ConntrackKey {
        src: u32::from_ne_bytes([192, 0, 2, 2]),
        dst: u32::from_ne_bytes([203, 0, 113, 10]),
        src_port: 40000u16.to_be(),
        dst_port: 7000u16.to_be(),
        protocol: 17,
        _pad: [0; 3],
    };
    // SAFETY: the value is not used.
    match unsafe { tm_ov_conntrack.get(&key) } {
        Some(_) => TC_ACT_OK,
        None => 2,
    }
}

/// `bpf_l4_csum_replace` on the UDP checksum of an IPv4 packet.
#[classifier]
pub fn tm_probe_tc_l4_csum(ctx: TcContext) -> i32 {
    // SAFETY: the helper checks the offset against the packet.
    unsafe { bpf_l4_csum_replace(ctx.skb.skb, 40, 0, 0x1234, BPF_F_PSEUDO_HDR as u64) };
    TC_ACT_OK
}

/// `bpf_skb_adjust_room` for an IPv4 + UDP encapsulation.
#[classifier]
pub fn tm_probe_tc_adjust_room(ctx: TcContext) -> i32 {
    let flags = (BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP) as u64;
    match ctx.adjust_room(28, BPF_ADJ_ROOM_MAC, flags) {
        Ok(()) => TC_ACT_OK,
        Err(_) => 2,
    }
}

/// `bpf_redirect`.
#[classifier]
pub fn tm_probe_tc_redirect(_ctx: TcContext) -> i32 {
    // SAFETY: a plain helper call.
    unsafe { bpf_redirect(1, 0) as i32 }
}
