//! Checksums a sender left to an offload. A veth sender's TCP and UDP
//! packets are CHECKSUM_PARTIAL: the L4 checksum field holds only the
//! pseudo header's sum, and the skb says the rest is still to be added. An
//! XDP redirect hands the next device a frame without that note, so the
//! receiver would check the unfinished sum and drop the packet. The uplink
//! therefore detours such a frame (`detour`) instead of redirecting it,
//! and the TC side finishes the sum where the skb no longer says it is
//! pending (the frame was sent from XDP on another node). A complete
//! checksum equal to the pseudo header's sum by chance (1 in 65536) takes
//! the same way and comes out unchanged.

use aya_ebpf::{
    bindings::{xdp_md, BPF_F_PSEUDO_HDR, BPF_F_RECOMPUTE_CSUM},
    helpers::generated::{
        bpf_csum_diff, bpf_l4_csum_replace, bpf_skb_load_bytes, bpf_skb_store_bytes,
    },
    programs::TcContext,
};

use crate::{
    csum,
    headers::{Ipv4Hdr, Ipv6Hdr, ETH_LEN, ETH_P_IP, ETH_P_IPV6, IPPROTO_TCP, IPPROTO_UDP},
    packet::{load16, load32},
};

/// In the detour's last metadata word: finish the L4 checksum.
pub const FINISH: u32 = 1 << 31;
/// With [`FINISH`]: the packet is TCP (a UDP checksum of 0 is written 0xffff).
const TCP: u32 = 1 << 30;

/// The pseudo header's sum, in memory order (see `csum`).
#[inline(always)]
pub fn pseudo(addresses: u64, protocol: u8, l4_len: u16) -> u64 {
    addresses + (protocol as u16).to_be() as u64 + l4_len.to_be() as u64
}

/// Whether a checksum field holds only the pseudo header's sum.
#[inline(always)]
pub fn unfinished(field: u16, pseudo: u64) -> bool {
    field == csum::fold(pseudo)
}

/// The detour's metadata word for a frame whose L4 checksum is unfinished
/// (`FINISH`, TCP or not, the L4 header's offset and length), or 0. Only
/// unfragmented IPv4 and IPv6 without extension headers, right after an
/// untagged Ethernet header: how the uplink hands frames to a port.
/// The context is read with volatile loads: as a call, LLVM passed the
/// packet pointers instead, as 32-bit values the verifier cannot take back.
#[inline(always)]
pub fn check(ctx: *mut xdp_md) -> u32 {
    // SAFETY: the program's context.
    let (start, end) = unsafe {
        (
            core::ptr::read_volatile(&(*ctx).data) as usize,
            core::ptr::read_volatile(&(*ctx).data_end) as usize,
        )
    };
    let ip = start + ETH_LEN;
    if ip + core::mem::size_of::<Ipv4Hdr>() > end {
        return 0;
    }
    // SAFETY: every load is inside bytes checked just before it.
    unsafe {
        let ether_type = load16((start + 12) as *const [u8; 2]);
        let (protocol, l4_at, l4_len, addresses) = if ether_type == ETH_P_IP.to_be() {
            let h = ip as *const Ipv4Hdr;
            let ihl = ((*h).version_ihl & 0x0f) as usize * 4;
            // A fragment's checksum is complete: the stack finishes it first.
            if ihl < 20 || load16(&(*h).frag_off) & 0xff3f != 0 {
                return 0;
            }
            let total = u16::from_be_bytes((*h).total_length) as usize;
            let Some(l4_len) = total.checked_sub(ihl) else {
                return 0;
            };
            let addresses = load32(&(*h).src) as u64 + load32(&(*h).dst) as u64;
            ((*h).protocol, ETH_LEN + ihl, l4_len, addresses)
        } else if ether_type == ETH_P_IPV6.to_be() {
            if ip + core::mem::size_of::<Ipv6Hdr>() > end {
                return 0;
            }
            let h = ip as *const Ipv6Hdr;
            let words = h as *const [u8; 4];
            let mut addresses = 0u64;
            for i in 2..10 {
                addresses += load32(words.add(i)) as u64;
            }
            let l4_len = u16::from_be_bytes((*h).payload_length) as usize;
            ((*h).next_header, ETH_LEN + 40, l4_len, addresses)
        } else {
            return 0;
        };
        let (field_at, flags) = match protocol {
            IPPROTO_UDP if l4_len >= 8 => (6, FINISH),
            IPPROTO_TCP if l4_len >= 20 => (16, FINISH | TCP),
            _ => return 0,
        };
        let field = start + l4_at + field_at;
        if field + 2 > end {
            return 0;
        }
        if !unfinished(load16(field as *const [u8; 2]), pseudo(addresses, protocol, l4_len as u16)) {
            return 0;
        }
        flags | (l4_at as u32) << 16 | l4_len as u32
    }
}

/// What the probe in [`finish`] adds (memory order).
const PROBE: u64 = 1;

/// On the uplink's TC side, for a detoured frame: finishes its L4 checksum
/// unless the skb still says it is pending (then the receiver takes it as
/// it is, or the port's device finishes it). `word` is [`check`]'s.
#[inline(never)]
pub fn finish(ctx: &TcContext, word: u32) {
    let skb = ctx.skb.skb;
    let l4_at = (word >> 16 & 0xff) as usize;
    let l4_len = (word & 0xffff) as usize;
    let field_at = (l4_at + if word & TCP != 0 { 16 } else { 6 }) as u32;
    // Which of the two the skb is: the kernel's helper adds to a pending
    // sum and subtracts from a complete one. Undone right after.
    let flags = BPF_F_PSEUDO_HDR as u64 | 4;
    let before = field(ctx, field_at);
    // SAFETY: the helper checks the offset against the packet.
    let added = unsafe { bpf_l4_csum_replace(skb, field_at, 0, PROBE, flags) };
    let after = field(ctx, field_at);
    // SAFETY: as above.
    let undone = unsafe { bpf_l4_csum_replace(skb, field_at, PROBE, 0, flags) };
    // A failed probe says nothing: the frame goes on as it is.
    let (0, 0, Some(before), Some(after)) = (added, undone, before, after) else {
        return;
    };
    if after == csum::fold(before as u64 + PROBE) {
        return;
    }
    let Some(sum) = sum_of(ctx, l4_at as u32, l4_len as u32) else {
        return;
    };
    // The field holds the pseudo header's sum: the segment's sum as it is
    // is the whole sum.
    let mut value = !csum::fold(sum);
    if word & TCP == 0 && value == 0 {
        value = 0xffff;
    }
    // SAFETY: the helper checks the offset; the value is on the stack.
    unsafe {
        bpf_skb_store_bytes(
            skb,
            field_at,
            &value as *const u16 as *const _,
            2,
            BPF_F_RECOMPUTE_CSUM as u64,
        )
    };
}

/// The 2 bytes at `at` of the skb, in memory order.
#[inline(always)]
fn field(ctx: &TcContext, at: u32) -> Option<u16> {
    ctx.load::<[u8; 2]>(at as usize).ok().map(u16::from_ne_bytes)
}

/// The longest L4 segment finished: a frame the uplink's XDP program can
/// hold (one page, no fragments) is shorter.
const MAX_LEN: u32 = 4096;

/// Sum (memory order, not folded) of `len` bytes of the skb at `at`, in
/// blocks copied to the stack; the last block is zero-padded (an odd last
/// byte is the first of a word padded with zero).
#[inline(always)]
fn sum_of(ctx: &TcContext, mut at: u32, len: u32) -> Option<u64> {
    const BLOCK: u32 = 256;
    let skb = ctx.skb.skb;
    if len > MAX_LEN {
        return None;
    }
    let stop = at + len;
    let mut block = [0u32; BLOCK as usize / 4];
    let mut sum = 0u64;
    for _ in 0..(MAX_LEN / BLOCK) {
        // Kept in a form the verifier bounds: 1..=BLOCK.
        let n = core::hint::black_box(stop - at) as u64;
        if n == 0 {
            break;
        }
        let n = if n > BLOCK as u64 { BLOCK } else { n as u32 & (2 * BLOCK - 1) };
        if n < BLOCK {
            block = [0u32; BLOCK as usize / 4];
        }
        let words = (n + 3) & !3;
        // SAFETY: both helpers are bounded by the block's size.
        let s = unsafe {
            if bpf_skb_load_bytes(skb as *const _, at, block.as_mut_ptr() as *mut _, n) != 0 {
                return None;
            }
            bpf_csum_diff(core::ptr::null_mut(), 0, block.as_mut_ptr(), words, 0)
        };
        if s < 0 {
            return None;
        }
        sum += s as u32 as u64;
        at += n;
    }
    Some(sum)
}
