//! Programs that do one kernel operation each, for `cargo xtask bench`: the
//! cost of the building blocks every packet path is made of, timed like the
//! paths (net of the empty program). Never attached.

use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, xdp_action, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4,
        BPF_F_ADJ_ROOM_ENCAP_L4_UDP, BPF_F_PSEUDO_HDR, TC_ACT_OK,
    },
    helpers::generated::{bpf_l4_csum_replace, bpf_redirect, bpf_skb_change_head},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use tapmesh_common::{overlay::ConntrackKey, DropReason, PacketCounter, Verdict};

use crate::{
    maps::{
        tm_flow_stats, tm_flows, tm_maglev, tm_ov_ct, tm_ov_locals, tm_stats, tm_streams,
        tm_target_stats, tm_targets, tm_tunnel, tm_vip_configs, tm_vip_slots, tm_vip_stats,
        tm_vip_values,
    },
    packet::Packet,
    tunnel::adjust_head,
};

/// One array map lookup.
#[xdp]
pub fn tm_probe_xdp_array(_ctx: XdpContext) -> u32 {
    match tm_tunnel.get(0) {
        Some(t) if t.port == 1 => xdp_action::XDP_DROP,
        _ => xdp_action::XDP_PASS,
    }
}

/// One hash map lookup that finds nothing.
#[xdp]
pub fn tm_probe_xdp_hash_miss(_ctx: XdpContext) -> u32 {
    // SAFETY: the value is not used.
    match unsafe { tm_ov_locals.get(&[198, 0, 0, 1]) } {
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
        src: [192, 0, 2, 2],
        dst: [203, 0, 113, 10],
        src_port: 40000,
        dst_port: 7000,
        protocol: 17,
        _pad: [0; 3],
    };
    // SAFETY: the value is not used.
    match unsafe { tm_ov_ct.get(&key) } {
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

/// `bpf_skb_change_head` pushing 28 bytes in front of the frame.
#[classifier]
pub fn tm_probe_tc_change_head(ctx: TcContext) -> i32 {
    // SAFETY: a plain helper call.
    match unsafe { bpf_skb_change_head(ctx.skb.skb, 28, 0) } {
        0 => TC_ACT_OK,
        _ => 2,
    }
}

/// `bpf_skb_adjust_room` of 28 bytes without encapsulation flags.
#[classifier]
pub fn tm_probe_tc_adjust_room_plain(ctx: TcContext) -> i32 {
    match ctx.adjust_room(28, BPF_ADJ_ROOM_MAC, 0) {
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

/// 32 conditional branches on packet bytes (none taken for the bench frame).
#[xdp]
pub fn tm_probe_xdp_branches(ctx: XdpContext) -> u32 {
    let pkt = Packet::new(ctx.data(), ctx.data_end(), 0);
    let Ok(p) = pkt.header::<[u8; 64]>(0, DropReason::TruncatedEthernet) else {
        return xdp_action::XDP_PASS;
    };
    for i in 0..32 {
        // SAFETY: inside the 64 bytes just checked.
        if unsafe { core::ptr::read_volatile((p as *const u8).add(i)) } == 0xa5 {
            return xdp_action::XDP_DROP;
        }
    }
    xdp_action::XDP_PASS
}

/// About 200 ALU instructions with no branch: 16 rounds of the flow hash's mix.
#[xdp]
pub fn tm_probe_xdp_alu(ctx: XdpContext) -> u32 {
    let pkt = Packet::new(ctx.data(), ctx.data_end(), 0);
    let Ok(p) = pkt.header::<[[u8; 4]; 16]>(0, DropReason::TruncatedEthernet) else {
        return xdp_action::XDP_PASS;
    };
    let mut h = 0u32;
    for i in 0..16 {
        // SAFETY: inside the 64 bytes just checked.
        let w = unsafe { core::ptr::read_volatile((p as *const u32).add(i)) };
        h = crate::lb::mix(h, w);
    }
    if h == 7 {
        xdp_action::XDP_DROP
    } else {
        xdp_action::XDP_PASS
    }
}

/// The array map values the VIP path reads (slot, VIP, config, flow, stream,
/// Maglev entry, target, node), one read from each.
#[xdp]
pub fn tm_probe_xdp_values(_ctx: XdpContext) -> u32 {
    let mut x = 0u32;
    if let Some(v) = tm_vip_slots.get(0) {
        x ^= v.state
    }
    if let Some(v) = tm_vip_values.get(0) {
        x ^= v.config_id
    }
    if let Some(v) = tm_vip_configs.get(0) {
        x ^= v.lookups
    }
    if let Some(v) = tm_flows.get(0) {
        x ^= v.stream_id
    }
    if let Some(v) = tm_streams.get(0) {
        x ^= v.table_size
    }
    if let Some(v) = tm_maglev.get(0) {
        x ^= *v
    }
    if let Some(v) = tm_targets.get(0) {
        x ^= v.ifindex
    }
    if let Some(v) = tm_tunnel.get(0) {
        x ^= v.port as u32
    }
    if x == 0x1234_5678 {
        xdp_action::XDP_DROP
    } else {
        xdp_action::XDP_PASS
    }
}

/// The per-CPU counters the VIP path adds to (program, VIP, flow, target).
#[xdp]
pub fn tm_probe_xdp_counters(_ctx: XdpContext) -> u32 {
    let count = |c: Option<*mut PacketCounter>| {
        if let Some(c) = c {
            // SAFETY: a per-CPU value only this CPU touches.
            unsafe { (*c).count(60) }
        }
    };
    if let Some(s) = tm_stats.get_ptr_mut(0) {
        // SAFETY: as above.
        count(Some(unsafe {
            (*s).verdicts.counter_mut(Verdict::Pass) as *mut _
        }));
    }
    count(tm_vip_stats.get_ptr_mut(0));
    count(tm_flow_stats.get_ptr_mut(0));
    count(tm_target_stats.get_ptr_mut(0));
    xdp_action::XDP_PASS
}

/// The uplink program's code, never run for the bench frame (its first byte
/// is not 0xa5): what the size of a program costs by itself.
#[xdp]
pub fn tm_probe_xdp_size(ctx: XdpContext) -> u32 {
    let pkt = crate::xdp::packet_of(&ctx);
    let Ok(p) = pkt.header::<[u8; 14]>(0, DropReason::TruncatedEthernet) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: inside the header just checked.
    if unsafe { core::ptr::read_volatile(p as *const u8) } == 0xa5 {
        return crate::xdp::uplink(&ctx);
    }
    xdp_action::XDP_PASS
}

/// The parser alone, on the bench frame (Ethernet, IPv4, UDP).
#[xdp]
pub fn tm_probe_xdp_parse(ctx: XdpContext) -> u32 {
    let pkt = crate::xdp::packet_of(&ctx);
    match crate::parse::parse(&pkt) {
        Ok(p) if p.dst_port != 7 => xdp_action::XDP_PASS,
        _ => xdp_action::XDP_DROP,
    }
}

/// 64 branches in straight-line code, each on another packet byte, taken
/// or not as the bench frame's bytes say (a predictor that kept its state
/// between calls predicts them all).
#[xdp]
pub fn tm_probe_xdp_mixed_branches(ctx: XdpContext) -> u32 {
    let pkt = Packet::new(ctx.data(), ctx.data_end(), 0);
    let Ok(p) = pkt.header::<[u8; 64]>(0, DropReason::TruncatedEthernet) else {
        return xdp_action::XDP_PASS;
    };
    let p = p as *const u8;
    // The branches write a map value: the verifier does not follow its
    // contents, so both sides of each branch end in the same state.
    let Some(acc) = tm_vip_slots.get_ptr_mut(0) else {
        return xdp_action::XDP_PASS;
    };
    let acc = acc as *mut u32;
    macro_rules! step {
        ($($i:literal)*) => {$(
            // SAFETY: inside the 64 bytes just checked; `acc` is a map value.
            unsafe {
                if core::ptr::read_volatile(p.add($i)) & 1 == 0 {
                    core::ptr::write_volatile(acc, $i);
                } else {
                    core::ptr::write_volatile(acc.add(1), $i);
                }
            }
        )*};
    }
    step!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31
          32 33 34 35 36 37 38 39 40 41 42 43 44 45 46 47 48 49 50 51 52 53 54 55 56 57 58 59 60 61 62 63);
    // SAFETY: as above.
    let acc = unsafe { core::ptr::read_volatile(acc) };
    if acc == 7 {
        xdp_action::XDP_DROP
    } else {
        xdp_action::XDP_PASS
    }
}
