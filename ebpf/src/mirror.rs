//! Port mirroring: copies of a source interface's packets, by direction and
//! VLAN, cloned to each tap service's interface. The copies never change,
//! delay or drop the production packet; a failed copy is only counted.
//! (`tm_tc_tap_in` runs the overlay's delivery check first, on every port
//! it is attached to: a packet it refuses is dropped, and not copied.)
//! Copies for a mirror ring go straight into `tm_mirror_copy` (one copy of
//! the bytes, no clone) unless the ring is fed through AF_XDP.

use core::ptr::addr_of_mut;

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_OK},
    helpers::generated::{bpf_ktime_get_ns, bpf_skb_load_bytes},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use tapmesh_common::{ProgramSlot, mirror::{
    filter_bit, CopyHead, MirrorCounter, COPY_MAX_BYTES, COPY_TC_INDEX, DIRECTION_IN,
    DIRECTION_OUT, RULES_PER_PORT,
}};

use crate::{
    headers::{ETH_P_8021AD, ETH_P_8021Q},
    maps::{
        tm_mirror_bits, tm_mirror_copy, tm_mirror_ports, tm_mirror_tmp, tm_mirror_rings, tm_mirror_stats,
        tm_mirror_vlans, tm_xsks,
    },
};

/// Copies the packet for every tap flow of this interface that takes `direction`.
#[inline(always)]
pub fn copy(ctx: &TcContext, direction: u8) {
    copy_unless(ctx, direction, |_| false);
}

/// As [`copy`], unless `copied_before` says a tap saw this packet already
/// (asked only on a tapped port).
#[inline(always)]
pub fn copy_unless(ctx: &TcContext, direction: u8, copied_before: impl Fn(&TcContext) -> bool) {
    // SAFETY: the context's __sk_buff is valid for the program's run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let (word, bit) = filter_bit(ifindex);
    if tm_mirror_bits.get(word).is_none_or(|w| w & bit == 0) {
        return;
    }
    // SAFETY: a map value, read in place under RCU.
    let Some(port) = (unsafe { tm_mirror_ports.get(&ifindex) }) else {
        return;
    };
    // SAFETY: the context's __sk_buff is valid for the program's run.
    let tc_index = unsafe { (*ctx.skb.skb).tc_index };
    if tc_index == COPY_TC_INDEX {
        // A copy back at a tapped port (a veth peer or a bridge of a tap
        // service's interface): copied again, it would circle.
        return;
    }
    if copied_before(ctx) {
        return;
    }
    // Clones take the mark; the packet gets its own back below.
    // SAFETY: tc_index is writable from TC.
    unsafe { (*ctx.skb.skb).tc_index = COPY_TC_INDEX };
    // Read in place: a copy would take 100 bytes of stack from the programs this is inlined into.
    let port = &*port;
    let vlan = vlan_of(ctx);
    let len = ctx.len() as u64;
    // The bytes on the wire: an offloaded tag is not in `len` (a copy gets it back).
    // SAFETY: the context's __sk_buff is valid for the program's run.
    let wire = len + 4 * u64::from(unsafe { (*ctx.skb.skb).vlan_present } != 0);
    for i in 0..RULES_PER_PORT {
        if i as u32 >= port.count {
            break;
        }
        let rule = port.rules[i];
        if rule.directions & direction == 0 {
            continue;
        }
        if rule.vlan_filtered != 0 {
            match tm_mirror_vlans.get(rule.flow) {
                Some(set) if set.contains(vlan) => {}
                _ => continue,
            }
        }
        // A clone's negative return: not sent. NET_XMIT_DROP (1): dropped on
        // the way (a full backlog). NET_XMIT_CN (2): the queue dropped a copy
        // — the noop qdisc of a device without carrier (its far end down)
        // drops every one this way. A ring copy fails when the buffer is full.
        let copied = if rule.ring != 0 {
            to_ring(ctx, rule.ring - 1, rule.generation, len as u32)
        } else {
            ctx.clone_redirect(rule.dest_ifindex, 0).is_ok()
        };
        if let Some(counter) = tm_mirror_stats.get_ptr_mut(rule.flow) {
            // SAFETY: this CPU's slot.
            let counter: &mut MirrorCounter = unsafe { &mut *counter };
            if copied {
                counter.packets += 1;
                counter.bytes += wire;
            } else {
                counter.failed += 1;
            }
        }
    }
    // SAFETY: as above.
    unsafe { (*ctx.skb.skb).tc_index = tc_index };
}

/// Puts the packet's first bytes (up to `COPY_MAX_BYTES`) into the ring
/// buffer for mirror ring `ring`, in a record of exactly their size: put
/// together in `tm_mirror_tmp` first, since a reservation must have a size
/// the verifier knows (size classes multiplied its work on every program
/// that copies).
#[inline(always)]
fn to_ring(ctx: &TcContext, ring: u8, generation: u8, len: u32) -> bool {
    let Some(scratch) = tm_mirror_tmp.get_ptr_mut(0) else {
        return false;
    };
    let caplen = if len > COPY_MAX_BYTES { COPY_MAX_BYTES } else { len };
    // Bounds the verifier can see: 1..=COPY_MAX_BYTES.
    if caplen == 0 || caplen > COPY_MAX_BYTES {
        return false;
    }
    // SAFETY: `bytes` is COPY_MAX_BYTES writable bytes of this CPU's value.
    let read = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb as *const _,
            0,
            addr_of_mut!((*scratch).bytes) as *mut _,
            caplen,
        )
    };
    if read != 0 {
        return false;
    }
    // SAFETY: fields of the valid __sk_buff; the scratch value is this CPU's.
    let record = unsafe {
        let skb = ctx.skb.skb;
        let (vlan_proto, vlan_tci) = if (*skb).vlan_present != 0 {
            (u16::from_be((*skb).vlan_proto as u16), (*skb).vlan_tci as u16)
        } else {
            (0, 0)
        };
        addr_of_mut!((*scratch).head).write(CopyHead {
            ts_ns: bpf_ktime_get_ns(),
            len,
            caplen,
            ring,
            generation,
            vlan_proto,
            vlan_tci,
            _pad: 0,
        });
        core::slice::from_raw_parts(
            scratch as *const u8,
            size_of::<CopyHead>() + caplen as usize,
        )
    };
    tm_mirror_copy.output_untyped::<[u8]>(record, 0).is_ok()
}

/// The VLAN id of the packet: the offloaded tag, else an 802.1Q/802.1ad
/// header in the frame, else 0 (untagged).
#[inline(always)]
fn vlan_of(ctx: &TcContext) -> u16 {
    // SAFETY: fields of the valid __sk_buff.
    let (present, tci) = unsafe { ((*ctx.skb.skb).vlan_present, (*ctx.skb.skb).vlan_tci) };
    if present != 0 {
        return (tci & 0xfff) as u16;
    }
    let mut tag = [0u8; 4];
    // The raw helper with a constant length (aya's wrapper clamps the length
    // to the packet, which the verifier sees as possibly zero).
    // SAFETY: `tag` is 4 writable bytes on the stack.
    let read =
        unsafe { bpf_skb_load_bytes(ctx.skb.skb as *const _, 12, tag.as_mut_ptr() as *mut _, 4) };
    if read != 0 {
        return 0;
    }
    let proto = u16::from_be_bytes([tag[0], tag[1]]);
    if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
        u16::from_be_bytes([tag[2], tag[3]]) & 0xfff
    } else {
        0
    }
}

/// On a mirror ring's interface: every frame goes to the ring's AF_XDP
/// socket (no socket: dropped, the copy has nowhere else to go).
#[xdp]
pub fn tm_xdp_mirror(ctx: XdpContext) -> u32 {
    // SAFETY: the context's xdp_md is valid for the program's run.
    let ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    // SAFETY: a map value read under RCU.
    let Some(&slot) = (unsafe { tm_mirror_rings.get(&ifindex) }) else {
        return xdp_action::XDP_DROP;
    };
    tm_xsks.redirect(slot, 0).unwrap_or(xdp_action::XDP_DROP)
}

/// On a source port that has no TC programs of its own: only the copies;
/// the packet always goes on (`TC_ACT_OK`), whatever it holds. Also on
/// each uplink's ingress: a frame its XDP program passed for a tapped port
/// goes to that port (`detour`), and is not a copy of the uplink's own.
#[classifier]
pub fn tm_tc_tap_out(ctx: TcContext) -> i32 {
    if let Some(action) = crate::detour::take(&ctx) {
        return action;
    }
    copy(&ctx, DIRECTION_OUT);
    TC_ACT_OK
}

/// On a port's egress (what is sent to it): the copies. On a container's
/// veth, first the overlay's check of where a service-prefix source came
/// from, counted with the container's service program (`tc_service`).
#[classifier]
pub fn tm_tc_tap_in(ctx: TcContext) -> i32 {
    if let Err(reason) = crate::overlay::check_delivery(&ctx) {
        return crate::tc::refused(ProgramSlot::TcService, reason, ctx.len() as u64);
    }
    copy(&ctx, DIRECTION_IN);
    // The mark was for the check alone: a port whose peer is in this
    // namespace would hand it on to the node's firewall and routing (a
    // copy keeps it, so another container's veth takes it too).
    // SAFETY: fields of the context's __sk_buff; mark is writable from TC.
    unsafe {
        if (*ctx.skb.skb).mark == crate::overlay::DELIVERY_MARK {
            (*ctx.skb.skb).mark = 0;
        }
    }
    TC_ACT_OK
}
