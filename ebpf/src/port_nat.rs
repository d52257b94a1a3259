//! Meridio's destination port NAT, stateless: a reply leaving a target from
//! a translated target port gets the client's port back (TC on the conduit
//! veth). The way in (the target port after the pick, in `tm_xdp_uplink`)
//! is not built: the uplink program already takes ~907k of the verifier's
//! 1M instructions and an inline rewrite there exceeds it (see
//! docs/ARCHITECTURE.md). Fragments are not translated: only the first
//! carries the ports.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, TC_ACT_OK},
    btf_maps::lpm_trie::Key,
    programs::TcContext,
};
use tapmesh_common::{lb::NatReplyData, DropReason};

use crate::{
    headers::{IPPROTO_TCP, IPPROTO_UDP},
    lb::addr_bytes,
    maps::{tm_lb_config, tm_port_nat_rev},
    parse::{Fragment, Parsed},
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
