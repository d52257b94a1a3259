//! Meridio's destination port NAT, stateless: after the load balancer picked
//! a local target, a TCP or UDP packet to a translated port of the VIP gets
//! the target port (XDP, complete checksums); a reply leaving the target
//! from that port gets the client's port back (TC on the conduit veth).
//! Fragments are not translated: only the first carries the ports.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, TC_ACT_OK},
    btf_maps::lpm_trie::Key,
    programs::TcContext,
};
use tapmesh_common::{
    lb::{NatReplyData, PortNatKey},
    DropReason,
};

use crate::{
    csum,
    headers::{IPPROTO_TCP, IPPROTO_UDP},
    lb::addr_bytes,
    maps::{tm_lb_config, tm_port_nat_rev, tm_port_nats},
    packet::{load16, load32, store16, store32, Packet},
    parse::{Fragment, Parsed},
};

/// Offset of the checksum in the L4 header, for the protocols translated.
#[inline(always)]
fn checksum_at(parsed: &Parsed) -> Option<(usize, DropReason)> {
    if parsed.fragment != Fragment::None || !parsed.has_l4 {
        return None;
    }
    match parsed.protocol {
        IPPROTO_TCP => Some((16, DropReason::TruncatedTcp)),
        IPPROTO_UDP => Some((6, DropReason::TruncatedUdp)),
        _ => None,
    }
}

/// Rewrites the destination port of a packet of flow `bit` of VIP
/// configuration `config_id` when its port is translated, and the checksum
/// incrementally (a UDP checksum of 0, none, stays 0).
#[inline(always)]
pub fn to_target(
    pkt: &Packet,
    parsed: &Parsed,
    config_id: u32,
    bit: u32,
) -> Result<(), DropReason> {
    let Some((sum_at, missing)) = checksum_at(parsed) else {
        return Ok(());
    };
    let key = PortNatKey {
        config_id,
        port: parsed.dst_port,
        protocol: parsed.protocol,
        flow_bit: bit as u8,
    };
    // SAFETY: the value is read right away.
    let Some(nat) = (unsafe { tm_port_nats.get(&key) }) else {
        return Ok(());
    };
    let to = nat.port.to_be_bytes();
    let ports: *mut [u8; 4] = pkt.header_mut(parsed.l4_offset, missing)?;
    let field: *mut [u8; 2] = pkt.header_mut(parsed.l4_offset + sum_at, missing)?;
    // SAFETY: both are inside the headers just checked.
    unsafe {
        let old = load32(ports);
        let mut bytes = old.to_ne_bytes();
        bytes[2] = to[0];
        bytes[3] = to[1];
        let new = u32::from_ne_bytes(bytes);
        store32(ports, new);
        let sum = load16(field);
        let udp = parsed.protocol == IPPROTO_UDP;
        if udp && sum == 0 {
            return Ok(());
        }
        let mut updated = csum::apply(sum, csum::diff([old], [new]));
        if udp && updated == 0 {
            updated = 0xffff;
        }
        store16(field, updated);
    }
    Ok(())
}

/// Gives a reply from a VIP's target port the port the client used. The
/// kernel's helper updates the checksum (or leaves it to the offload when
/// the sender left it partial).
#[inline(always)]
pub fn from_target(ctx: &TcContext, parsed: &Parsed) -> Result<i32, DropReason> {
    if !tm_lb_config.get(0).is_some_and(|c| c.port_nat_replies != 0) {
        return Ok(TC_ACT_OK as i32);
    }
    let Some((sum_at, _)) = checksum_at(parsed) else {
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
