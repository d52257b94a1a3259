//! TC programs on the host side of an interface: ingress sees packets the
//! interface receives (from a pod), egress sees packets sent to it.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use tapmesh_common::{
    mirror::{DIRECTION_IN, DIRECTION_OUT},
    DropReason, ProgramSlot, Verdict,
};

use crate::{mirror, overlay, overlay6, packet::Packet, parse::parse, port_nat, stats::Stats};

/// Bytes pulled into the linear area so the parser sees every header.
const PULL_LEN: u32 = 512;

#[classifier]
pub fn tm_tc_ingress(ctx: TcContext) -> i32 {
    let stats = Stats::of(ProgramSlot::TcIngress);
    // An uplink's XDP program passed it for a tapped port (`detour`).
    if let Some(action) = crate::detour::take(&ctx) {
        return tc_outcome(&stats, ctx.len() as u64, Ok(action));
    }
    // Received on the host side = sent by the port: TaaS OUT.
    mirror::copy(&ctx, DIRECTION_OUT);
    let result = try_tc(&ctx, &stats);
    tc_outcome(&stats, ctx.len() as u64, result)
}

#[classifier]
pub fn tm_tc_egress(ctx: TcContext) -> i32 {
    // Sent on the host side = to the port: TaaS IN.
    mirror::copy(&ctx, DIRECTION_IN);
    let stats = Stats::of(ProgramSlot::TcEgress);
    let result = try_tc(&ctx, &stats);
    tc_outcome(&stats, ctx.len() as u64, result)
}

/// On a container's host-side veth (ingress: what the container sends):
/// service-IP translation, local delivery and the tunnel.
#[classifier]
pub fn tm_tc_service(ctx: TcContext) -> i32 {
    mirror::copy_unless(&ctx, DIRECTION_OUT, overlay::sent_again);
    let stats = Stats::of(ProgramSlot::TcService);
    let packed = match linear_packet(&ctx) {
        Ok(pkt) if overlay::is_ipv6(&pkt) => overlay6::from_container(&ctx, &pkt),
        Ok(pkt) => overlay::from_container(&ctx, &pkt),
        Err(reason) => Packed::from(Err(reason)),
    };
    let packed = overlay::hold_unknown(&ctx, packed);
    tc_packed(&stats, ctx.len() as u64, packed)
}

/// On a conduit's node-side veth (ingress: what the application sends):
/// replies from a translated target port get the client's port back.
#[classifier]
pub fn tm_tc_conduit(ctx: TcContext) -> i32 {
    mirror::copy(&ctx, DIRECTION_OUT);
    let stats = Stats::of(ProgramSlot::TcConduit);
    let result = try_conduit(&ctx, &stats);
    tc_outcome(&stats, ctx.len() as u64, result)
}

#[inline(always)]
fn try_conduit(ctx: &TcContext, stats: &Stats) -> Result<i32, DropReason> {
    let pkt = linear_packet(ctx)?;
    let parsed = parse(&pkt)?;
    stats.parsed(&parsed);
    port_nat::from_target(ctx, &parsed)
}

/// Does nothing: what TC benchmarks subtract.
#[classifier]
pub fn tm_tc_floor(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

/// Makes the first `PULL_LEN` bytes (or the whole packet) directly readable.
#[inline(always)]
fn linear_packet(ctx: &TcContext) -> Result<Packet, DropReason> {
    let wire_len = ctx.len();
    let want = if wire_len < PULL_LEN {
        wire_len
    } else {
        PULL_LEN
    };
    // Compared as pointers: subtracting them needs more than CAP_BPF.
    if ctx.data() + want as usize > ctx.data_end() {
        ctx.pull_data(want).map_err(|_| DropReason::PullFailed)?;
    }
    Ok(Packet::new(ctx.data(), ctx.data_end(), wire_len as usize))
}

#[inline(always)]
fn try_tc(ctx: &TcContext, stats: &Stats) -> Result<i32, DropReason> {
    let pkt = linear_packet(ctx)?;
    let parsed = parse(&pkt)?;
    stats.parsed(&parsed);
    Ok(TC_ACT_OK)
}

/// A TC result as one scalar, for subprograms to return: a `Result` would
/// come back through the caller's stack, and LLVM may leave that address in
/// R0, which the verifier refuses ("cannot return stack pointer to the
/// caller"). The action, or a drop reason's index with bit 32 set.
#[derive(Clone, Copy)]
pub struct Packed(u64);

impl Packed {
    /// Whether it is a drop for `reason`.
    #[inline(always)]
    pub fn is(&self, reason: DropReason) -> bool {
        self.0 == 1 << 32 | reason as u32 as u64
    }
}

impl From<Result<i32, DropReason>> for Packed {
    #[inline(always)]
    fn from(result: Result<i32, DropReason>) -> Self {
        Packed(match result {
            Ok(action) => action as u32 as u64,
            Err(reason) => 1 << 32 | reason as u32 as u64,
        })
    }
}

/// A drop outside the programs above (`mirror::tm_tc_tap_in`), counted
/// as theirs are, under `slot`.
#[inline(always)]
pub fn refused(slot: ProgramSlot, reason: DropReason, bytes: u64) -> i32 {
    tc_outcome(&Stats::of(slot), bytes, Err(reason))
}

#[inline(always)]
fn tc_outcome(stats: &Stats, bytes: u64, result: Result<i32, DropReason>) -> i32 {
    tc_packed(stats, bytes, Packed::from(result))
}

/// The one place a TC result becomes a verdict and is counted.
#[inline(always)]
fn tc_packed(stats: &Stats, bytes: u64, packed: Packed) -> i32 {
    let action = if packed.0 >> 32 != 0 {
        stats.drop_index(packed.0 as u32);
        TC_ACT_SHOT
    } else {
        packed.0 as u32 as i32
    };
    let verdict = match action {
        TC_ACT_OK => Verdict::Pass,
        TC_ACT_SHOT => Verdict::Drop,
        TC_ACT_REDIRECT => Verdict::Redirect,
        _ => Verdict::Aborted,
    };
    stats.verdict(verdict, bytes);
    action
}
