//! Frames the uplink program redirected that the receiving device refused (a
//! veth whose peer has no NAPI: native XDP into a veth needs GRO or an XDP
//! program there). The kernel acts on a redirect after the program has
//! returned, so only its tracepoints see the loss: `xdp:xdp_redirect_err`
//! (refused at once: -EOPNOTSUPP from such a veth) and `xdp:xdp_devmap_xmit`
//! (refused when the queued frames are sent). Both become the uplink
//! program's `redirect_failed` drop counter.

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use tapmesh_common::{mirror::filter_bit, DropReason, ProgramSlot};

use crate::{maps::tm_uplink_bits, stats::Stats};

/// Offsets in the tracepoints' records (tracefs `events/xdp/<name>/format`;
/// unchanged since Linux 5.8).
const FROM_IFINDEX: usize = 8;
const DROPS: usize = 20;
const ERR_IFINDEX: usize = 16;

#[tracepoint]
pub fn tm_tp_xmit(ctx: TracePointContext) -> u32 {
    // A record that cannot be read counts nothing; there is no verdict here.
    let _ = try_tm_tp_xmit(&ctx);
    0
}

fn try_tm_tp_xmit(ctx: &TracePointContext) -> Result<(), i32> {
    // SAFETY: offsets inside the record of the tracepoint this is attached to.
    let (from, drops) = unsafe { (ctx.read_at::<i32>(FROM_IFINDEX)?, ctx.read_at::<i32>(DROPS)?) };
    if drops <= 0 {
        return Ok(());
    }
    count(from, drops as u64);
    Ok(())
}

#[tracepoint]
pub fn tm_tp_redir_err(ctx: TracePointContext) -> u32 {
    // SAFETY: an offset inside the record of the tracepoint this is attached to.
    if let Ok(from) = unsafe { ctx.read_at::<i32>(ERR_IFINDEX) } {
        count(from, 1);
    }
    0
}

/// Counts only frames an uplink received (other XDP programs may redirect too).
#[inline(always)]
fn count(from: i32, n: u64) {
    let (word, bit) = filter_bit(from as u32);
    if tm_uplink_bits.get(word).is_none_or(|w| w & bit == 0) {
        return;
    }
    Stats::of(ProgramSlot::XdpUplink).drop_reasons(DropReason::RedirectFailed, n);
}
