//! XDP programs: the node uplink, and the empty floor used by benchmarks.

use core::mem::size_of;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use tapmesh_common::{DropReason, ProgramSlot, Verdict};

use crate::{
    headers::UdpHdr,
    detour, lb, overlay, overlay6,
    packet::Packet,
    parse::{parse, L3},
    stats::Stats,
    tunnel,
};

#[xdp]
pub fn tm_xdp_uplink(ctx: XdpContext) -> u32 {
    uplink(&ctx)
}

/// The uplink program's body (also inside a probe, unused, to time code size alone).
#[inline(always)]
pub fn uplink(ctx: &XdpContext) -> u32 {
    detour::clear_foreign(ctx);
    let pkt = packet_of(&ctx);
    let stats = Stats::of(ProgramSlot::XdpUplink);
    let result = try_uplink(ctx, pkt, &stats);
    xdp_outcome(ctx, &stats, pkt.wire_len as u64, result)
}

/// Does nothing: what every benchmark subtracts.
#[xdp]
pub fn tm_xdp_floor(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// The programs are loaded without multi-buffer support (no `xdp.frags`), so
/// the buffer is linear and its length is `data_end - data`: no helper call
/// (a call costs ~20 ns here, a third of the budget). The verifier treats the
/// difference of the two pointers as an unknown number, as it would treat
/// `bpf_xdp_get_buff_len`'s result. The volatile read hides from LLVM that
/// it equals `end - start`: otherwise LLVM drops pointer checks it can prove
/// from length checks, which the verifier does not accept.
#[inline(always)]
pub fn packet_of(ctx: &XdpContext) -> Packet {
    let (start, end) = (ctx.data(), ctx.data_end());
    let len = end - start;
    // SAFETY: a read of a local.
    let wire_len = unsafe { core::ptr::read_volatile(&len) };
    Packet::new(start, end, wire_len)
}

/// Tunnel packets for this node from a known node are decapsulated first and go to a
/// container here (overlay) or to the load balancer, and nowhere else; then VIP
/// traffic is load balanced and everything else passes (but a packet for a container
/// here from a service-prefix source that did not come through the tunnel,
/// `lb::not_a_vip`). A tunnel packet in its usual
/// shape is known from fixed offsets (`tunnel::plain`) and never goes
/// through the parser; only its inner packet is parsed.
#[inline(always)]
fn try_uplink(ctx: &XdpContext, mut pkt: Packet, stats: &Stats) -> Result<u32, DropReason> {
    let tunnel = tunnel::config();
    // (offset, first byte, room in the UDP datagram) of the inner packet of a tunnel packet for us
    // from a known node, and that node. Only nodes may use the tunnel: the
    // source is checked before anything of the inner packet is judged (a
    // stranger's is only read, to ask the cluster about its inner source).
    let (mut parsed, ours) = match tunnel.and_then(|t| tunnel::plain(&pkt, t)) {
        Some(plain) => {
            if let Err(unknown) = tunnel::check_peer(plain.src) {
                overlay::ask_about_sender(ctx);
                return Err(unknown);
            }
            (None, Some((tunnel::OUTER_LEN, plain.first, plain.room, plain.src)))
        }
        None => {
            let parsed = parse(&pkt)?;
            let mut ours = None;
            if tunnel.is_some_and(|t| tunnel::is_ours(&parsed, t)) {
                let node = parsed.src_addr[3];
                tunnel::check_peer(node)?;
                let (first, room) = tunnel::first_byte(&pkt, parsed.l4_offset)?;
                ours = Some((parsed.l4_offset + size_of::<UdpHdr>(), first, room, node));
            }
            (Some(parsed), ours)
        }
    };
    let tunneled = ours.is_some();
    if let Some((inner_at, first, room, node)) = ours {
        let inner = tunnel::decapsulate(ctx, &pkt, inner_at, first, room)?;
        // One call or the other, not nested: each subprogram's stack adds
        // to this one's.
        let delivered = match inner {
            L3::V6 if overlay6::foreign_source(ctx, node) => {
                return Err(DropReason::TunnelForeignSource)
            }
            L3::V6 => overlay6::from_tunnel(ctx)?,
            _ if overlay::maybe_local(&packet_of(ctx)) => overlay::from_tunnel(ctx, node)?,
            _ => None,
        };
        if let Some(action) = delivered {
            return Ok(action);
        }
        pkt = packet_of(ctx);
        parsed = None;
    }
    let parsed = match parsed {
        Some(parsed) => parsed,
        None => parse(&pkt)?,
    };
    stats.parsed(&parsed);
    lb::balance(ctx, &pkt, &parsed, tunnel, tunneled)
}

/// The one place an XDP result becomes a verdict and is counted. A frame
/// for a port here (`detour::port`) is redirected now, or detoured.
#[inline(always)]
pub fn xdp_outcome(
    ctx: &XdpContext,
    stats: &Stats,
    bytes: u64,
    result: Result<u32, DropReason>,
) -> u32 {
    let action = match result {
        Ok(action) if action & detour::TO_PORT != 0 => detour::to_port(ctx, action & !detour::TO_PORT),
        Ok(action) => action,
        Err(reason) => {
            stats.drop_reason(reason);
            xdp_action::XDP_DROP
        }
    };
    let verdict = match action {
        xdp_action::XDP_PASS => Verdict::Pass,
        xdp_action::XDP_DROP => Verdict::Drop,
        xdp_action::XDP_TX => Verdict::Tx,
        xdp_action::XDP_REDIRECT => Verdict::Redirect,
        _ => Verdict::Aborted,
    };
    stats.verdict(verdict, bytes);
    action
}
