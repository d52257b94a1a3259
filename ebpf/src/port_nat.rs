//! Meridio's destination port NAT, stateless. The way in: after the pick,
//! a packet for a local target whose flow translates ports goes to
//! `tm_xdp_port_nat` by a tail call (the uplink program takes ~920k of the
//! verifier's 1M instructions; an inline rewrite there exceeds it), which
//! gives it the target port and redirects it to the target. The way out: a
//! reply leaving a target from a translated target port gets the client's
//! port back (TC on the conduit veth). Fragments are not translated: only
//! the first carries the ports.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, TC_ACT_OK},
    btf_maps::lpm_trie::Key,
    macros::xdp,
    programs::{TcContext, XdpContext},
};
use tapmesh_common::{
    lb::{NatReplyData, PortNatKey, PortNatPick, TAIL_PORT_NAT, TARGET_LOCAL},
    DropReason, ProgramSlot,
};

use crate::{
    csum,
    headers::{IPPROTO_TCP, IPPROTO_UDP},
    lb::{self, addr_bytes},
    maps::{tm_lb_config, tm_nat_pick, tm_port_nat_rev, tm_port_nats, tm_targets, tm_xdp_tails},
    packet::Packet,
    offload,
    parse::{parse, Fragment, Parsed, L3},
    stats::Stats,
    xdp::{packet_of, xdp_outcome},
};

/// Offset of the checksum in the L4 header, for the protocols translated.
#[inline(always)]
fn checksum_at(parsed: &Parsed) -> Option<usize> {
    if parsed.fragment != Fragment::None || !parsed.has_l4 {
        return None;
    }
    match parsed.protocol {
        IPPROTO_TCP => Some(16),
        IPPROTO_UDP => Some(6),
        _ => None,
    }
}

/// Gives a reply from a VIP's target port the port the client used. The
/// kernel's helper updates the checksum (or leaves it to the offload when
/// the sender left it partial).
#[inline(always)]
pub fn from_target(ctx: &TcContext, parsed: &Parsed) -> Result<i32, DropReason> {
    if !tm_lb_config.get(0).is_some_and(|c| c.port_nat_replies != 0) {
        return Ok(TC_ACT_OK as i32);
    }
    let Some(sum_at) = checksum_at(parsed) else {
        return Ok(TC_ACT_OK as i32);
    };
    let from = parsed.src_port.to_be_bytes();
    let data = NatReplyData {
        protocol: parsed.protocol,
        _pad: 0,
        port: from,
        addr: addr_bytes(&parsed.src_addr),
    };
    let Some(nat) = tm_port_nat_rev.get(&Key::new(160, data)) else {
        return Ok(TC_ACT_OK as i32);
    };
    let to = nat.port.to_be_bytes();
    // The size of the field (2) goes in the flags' low bits.
    let mut flags = 2u64;
    if parsed.protocol == IPPROTO_UDP {
        flags |= BPF_F_MARK_MANGLED_0 as u64;
    }
    let at = parsed.l4_offset;
    ctx.l4_csum_replace(
        at + sum_at,
        u16::from_ne_bytes(from) as u64,
        u16::from_ne_bytes(to) as u64,
        flags,
    )
    .map_err(|_| DropReason::PortNatFailed)?;
    ctx.store(at, &to, 0)
        .map_err(|_| DropReason::PortNatFailed)?;
    Ok(TC_ACT_OK as i32)
}

/// Hands the packet to `tm_xdp_port_nat` with what was picked; returns
/// only if the tail call did not happen (the daemon did not fill the array).
#[inline(always)]
pub fn hand_over(ctx: &XdpContext, pick: PortNatPick) -> DropReason {
    if let Some(slot) = tm_nat_pick.get_ptr_mut(0) {
        // SAFETY: this CPU's entry, read by the tail before anything else
        // runs on this CPU; then control goes there, or comes back on failure.
        unsafe {
            *slot = pick;
            tm_xdp_tails.tail_call(ctx, TAIL_PORT_NAT);
        }
    }
    DropReason::PortNatFailed
}

/// The uplink's tail for a packet whose flow translates ports; counted in
/// the uplink's slot (its protocols were counted there).
#[xdp]
pub fn tm_xdp_port_nat(ctx: XdpContext) -> u32 {
    let stats = Stats::of(ProgramSlot::XdpUplink);
    let (result, bytes) = match tm_nat_pick.get(0) {
        Some(pick) => (to_target_port(&ctx, pick), pick.bytes as u64),
        None => (Err(DropReason::PortNatFailed), 0),
    };
    xdp_outcome(&ctx, &stats, bytes, result)
}

/// The target port (if the flow names one for this protocol and port),
/// then the local target as the uplink would send it.
#[inline(always)]
fn to_target_port(ctx: &XdpContext, pick: &PortNatPick) -> Result<u32, DropReason> {
    let target = match tm_targets.get(pick.target) {
        Some(t) if t.kind == TARGET_LOCAL => t,
        _ => return Err(DropReason::NoTarget),
    };
    let pkt = packet_of(ctx);
    let parsed = parse(&pkt)?;
    if let Some(sum_at) = checksum_at(&parsed) {
        let key = PortNatKey {
            flow: pick.flow,
            port: parsed.dst_port,
            protocol: parsed.protocol,
            _pad: 0,
        };
        // SAFETY: the value is read right away.
        if let Some(nat) = unsafe { tm_port_nats.get(&key) } {
            set_dst_port(&pkt, &parsed, sum_at, nat.port)?;
        }
    }
    lb::to_local(ctx, &pkt, &parsed, target)
}

/// Writes the destination port and updates the checksum (RFC 1624); a UDP
/// datagram without one (0) keeps none, and an unfinished one (the pseudo
/// header's sum, `offload`) stays as it is: the ports are not in it.
#[inline(always)]
fn set_dst_port(pkt: &Packet, parsed: &Parsed, sum_at: usize, port: u16) -> Result<(), DropReason> {
    let at = parsed.l4_offset;
    let dst: *mut [u8; 2] = pkt.header_mut(at + 2, DropReason::PortNatFailed)?;
    let sum: *mut [u8; 2] = pkt.header_mut(at + sum_at, DropReason::PortNatFailed)?;
    let new = port.to_be_bytes();
    // SAFETY: both lie inside the packet (checked above).
    unsafe {
        let field = u16::from_ne_bytes(*sum);
        if !(parsed.protocol == IPPROTO_UDP && field == 0) && !unfinished(parsed, field) {
            let diff = csum::diff(
                [u16::from_ne_bytes(*dst) as u32],
                [u16::from_ne_bytes(new) as u32],
            );
            let mut updated = csum::apply(field, diff);
            if parsed.protocol == IPPROTO_UDP && updated == 0 {
                updated = 0xffff;
            }
            *sum = updated.to_ne_bytes();
        }
        *dst = new;
    }
    Ok(())
}

/// Whether `field` holds only the pseudo header's sum (`offload`), in a
/// packet `offload::check` looks at too (IPv6 without extension headers).
#[inline(always)]
fn unfinished(parsed: &Parsed, field: u16) -> bool {
    if parsed.l3 == L3::V6 && parsed.l4_offset != parsed.l3_offset + 40 {
        return false;
    }
    let (s, d) = (&parsed.src_addr, &parsed.dst_addr);
    let addresses = match parsed.l3 {
        L3::V4 => s[3] as u64 + d[3] as u64,
        _ => {
            let mut sum = 0u64;
            for i in 0..4 {
                sum += s[i] as u64 + d[i] as u64;
            }
            sum
        }
    };
    let len = parsed.l3_end.wrapping_sub(parsed.l4_offset) as u16;
    offload::unfinished(field, offload::pseudo(addresses, parsed.protocol, len))
}
