//! Copies of what the uplink's XDP program sends into a port. A port's IN
//! copies are taken at its TC egress, which `bpf_redirect` from XDP skips.
//! So a frame for a port with IN tap flows is not redirected in XDP: it is
//! passed to the stack with a mark in its metadata (the daemon's random key
//! and the port's ifindex), and the uplink's TC ingress (`tm_tc_tap_out`,
//! or `tm_tc_ingress` on an uplink that is also a TC interface) redirects it
//! to the port's egress, where the copies are taken. Tapped ports take this
//! way, and frames whose L4 checksum a sender left unfinished (`offload`:
//! the skb carries the note that it is); a driver without XDP metadata
//! keeps the plain redirect. The key is what makes the mark trusted: metadata can also come
//! from a veth peer's XDP program, which cannot know it.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::{bpf_redirect, bpf_skb_vlan_pop, bpf_xdp_adjust_meta},
    programs::{TcContext, XdpContext},
};
use tapmesh_common::mirror::{filter_bit, DETOUR_META_LEN, DIRECTION_IN, RULES_PER_PORT};

use crate::{
    offload,
    maps::{tm_detour_key, tm_mirror_bits, tm_mirror_ports, tm_uplink_bits},
    packet::{load32, store32},
};

const META_LEN: usize = DETOUR_META_LEN;

/// Set in a path's result for "to the port whose ifindex is the rest":
/// [`to_port`] runs once, in `xdp_outcome`, not inside each path (the
/// uplink is near the verifier's limits of work and stack). No XDP action
/// or ifindex has this bit.
pub const TO_PORT: u32 = 1 << 31;

/// A path's result for a frame ready for port `ifindex`.
#[inline(always)]
pub fn port(ifindex: u32) -> u32 {
    TO_PORT | ifindex
}

/// [`port`] as a call, as wide as the `bpf_redirect` it stands for: so the
/// tunnel paths keep the code they had (the IPv4 one's frame and the
/// uplink's main frame share the 512 bytes of stack with nothing to spare;
/// inlined, the value took 16 more).
#[inline(never)]
pub fn port_call(ifindex: u32) -> i64 {
    port(ifindex) as i64
}

/// The XDP program's last step for a frame bound for port `ifindex`: a
/// redirect, unless the port's IN copies or an unfinished L4 checksum
/// (`offload`) need the skb the TC side has.
#[inline(always)]
pub fn to_port(ctx: &XdpContext, ifindex: u32) -> u32 {
    let (word, bit) = filter_bit(ifindex);
    let tapped = tm_mirror_bits.get(word).is_some_and(|w| w & bit != 0);
    if detour(ctx, ifindex, tapped) {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: a plain helper call.
    unsafe { bpf_redirect(ifindex, 0) as u32 }
}

/// Marks the frame for its detour if a tap flow of port `ifindex` takes
/// the packets sent to it, or its L4 checksum is unfinished. Inlined: as a
/// call it cost every local delivery 40–80 ns in the bench's cold-cache
/// runs, and it takes no stack the main frame lacks.
#[inline(always)]
fn detour(ctx: &XdpContext, ifindex: u32, tapped: bool) -> bool {
    let finish = offload::check(ctx.ctx);
    (finish != 0 || tapped && takes_in(ifindex)) && mark(ctx, ifindex, finish)
}

/// Whether a tap flow of port `ifindex` takes the packets sent to it.
#[inline(always)]
fn takes_in(ifindex: u32) -> bool {
    // SAFETY: a map value, read in place under RCU.
    let Some(port) = (unsafe { tm_mirror_ports.get(&ifindex) }) else {
        return false;
    };
    for i in 0..RULES_PER_PORT {
        if i as u32 >= port.count {
            break;
        }
        if port.rules[i].directions & DIRECTION_IN != 0 {
            return true;
        }
    }
    false
}

/// This start's key; 0 (none written yet) turns detours off.
#[inline(always)]
fn key() -> u64 {
    tm_detour_key.get(0).copied().unwrap_or(0)
}

/// Puts the key, `ifindex` and `finish` (`offload::check`'s word) in
/// front of the frame.
#[inline(always)]
fn mark(ctx: &XdpContext, ifindex: u32, finish: u32) -> bool {
    let key = key();
    if key == 0 {
        return false;
    }
    // SAFETY: the helper checks the room; the pointers are read after it.
    unsafe {
        if bpf_xdp_adjust_meta(ctx.ctx, -(META_LEN as i32)) != 0 {
            return false;
        }
        let meta = (*ctx.ctx).data_meta as usize;
        if meta + META_LEN > ctx.data() {
            return false;
        }
        store32(meta as *mut [u8; 4], key as u32);
        store32((meta + 4) as *mut [u8; 4], (key >> 32) as u32);
        store32((meta + 8) as *mut [u8; 4], ifindex);
        store32((meta + 12) as *mut [u8; 4], finish);
    }
    true
}

/// On the uplink's TC ingress: the redirect of a frame `to_port` passed,
/// `None` for every other packet.
#[inline(always)]
pub fn take(ctx: &TcContext) -> Option<i32> {
    let skb = ctx.skb.skb;
    // SAFETY: fields of the context; the metadata is read after its bounds check.
    unsafe {
        let (meta, data) = ((*skb).data_meta as usize, (*skb).data as usize);
        if meta + META_LEN > data {
            return None;
        }
        let (low, high) = (load32(meta as *const [u8; 4]), load32((meta + 4) as *const [u8; 4]));
        let key = key();
        if key == 0 || low != key as u32 || high != (key >> 32) as u32 {
            return None;
        }
        // Only the uplink's XDP program writes it.
        let (word, bit) = filter_bit((*skb).ifindex);
        if tm_uplink_bits.get(word).is_none_or(|w| w & bit == 0) {
            return None;
        }
        let port = load32((meta + 8) as *const [u8; 4]);
        let finish = load32((meta + 12) as *const [u8; 4]);
        // The metadata may travel on with the frame: the key must not.
        store32(meta as *mut [u8; 4], 0);
        store32((meta + 4) as *mut [u8; 4], 0);
        if finish & offload::FINISH != 0 {
            offload::finish(ctx, finish);
        }
        // A tag the NIC took off is no part of the frame XDP rewrote for the
        // port (in-frame tags it dropped); the plain redirect drops it too.
        if (*skb).vlan_present != 0 {
            bpf_skb_vlan_pop(skb);
        }
        // The port's egress takes it as the overlay's delivery.
        (*skb).mark = crate::overlay::DELIVERY_MARK;
        Some(bpf_redirect(port, 0) as i32)
    }
}

/// Drops metadata a frame brought with it (a veth peer's XDP program can
/// send some), so the TC side sees only this program's mark (the key is
/// what it trusts; this keeps foreign bytes from reaching the stack). One
/// load and a compare when there is none.
#[inline(always)]
pub fn clear_foreign(ctx: &XdpContext) {
    // SAFETY: fields of the context; the helper checks the delta.
    unsafe {
        let (meta, data) = ((*ctx.ctx).data_meta as usize, (*ctx.ctx).data as usize);
        if meta < data {
            bpf_xdp_adjust_meta(ctx.ctx, (data - meta) as i32);
        }
    }
}
