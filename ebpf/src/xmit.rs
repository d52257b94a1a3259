//! Frames the uplink program redirected that the receiving device refused (a
//! veth whose peer has no NAPI: native XDP into a veth needs GRO or an XDP
//! program there). The kernel acts on a redirect after the program has
//! returned, so only its tracepoints see the loss: `xdp:xdp_redirect_err`
//! (refused at once: -EOPNOTSUPP from such a veth) and `xdp:xdp_devmap_xmit`
//! (refused when the queued frames are sent); and a frame sent back out of
//! the uplink (XDP_TX) that the device refused, `xdp:xdp_bulk_tx` (a veth
//! whose peer has no NAPI again; found by a tester: counted as sent, lost
//! unseen). All become the uplink program's `redirect_failed` drop counter.

use aya_ebpf::{macros::tracepoint, programs::TracePointContext, EbpfContext};
use tapmesh_common::{mirror::filter_bit, DropReason, ProgramSlot};

use crate::{maps::tm_uplink_bits, stats::Stats};

/// Offsets in the tracepoints' records (tracefs `events/xdp/<name>/format`;
/// unchanged since Linux 5.8).
const FROM_IFINDEX: usize = 8;
const DROPS: usize = 20;
const ERR_IFINDEX: usize = 16;
const BULK_IFINDEX: usize = 8;
const BULK_DROPS: usize = 16;

/// A 4-byte field of the tracepoint's record, loaded straight from the
/// context: the verifier allows aligned reads of a tracepoint's record, and
/// this runs once per flushed bulk (per packet on a veth fed one at a
/// time, as in the veth benches), where a
/// `bpf_probe_read_kernel` call cost more than the rest of the program.
///
/// # Safety
///
/// `offset` must be a 4-byte aligned field inside the record of the
/// tracepoint the program is attached to.
#[inline(always)]
unsafe fn field(ctx: &TracePointContext, offset: usize) -> i32 {
    // SAFETY: per the caller, inside the record and aligned.
    unsafe { core::ptr::read((ctx.as_ptr() as *const u8).add(offset) as *const i32) }
}

#[tracepoint]
pub fn tm_tp_xmit(ctx: TracePointContext) -> u32 {
    // SAFETY: offsets inside the record of the tracepoint this is attached
    // to. Most bulks lose nothing: the sender is read only when one did.
    let drops = unsafe { field(&ctx, DROPS) };
    if drops > 0 {
        count(unsafe { field(&ctx, FROM_IFINDEX) }, drops as u64);
    }
    0
}

#[tracepoint]
pub fn tm_tp_redir_err(ctx: TracePointContext) -> u32 {
    // SAFETY: an offset inside the record of the tracepoint this is attached to.
    count(unsafe { field(&ctx, ERR_IFINDEX) }, 1);
    0
}

#[tracepoint]
pub fn tm_tp_bulk_tx(ctx: TracePointContext) -> u32 {
    // SAFETY: offsets inside the record of the tracepoint this is attached
    // to. The device is the one that sent back what it received.
    let drops = unsafe { field(&ctx, BULK_DROPS) };
    if drops > 0 {
        count(unsafe { field(&ctx, BULK_IFINDEX) }, drops as u64);
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
