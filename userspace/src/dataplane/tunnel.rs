//! This node's tunnel endpoint (`tm_tunnel`), shared by the load balancer
//! and the overlay: worked out from the configuration and written when the
//! dataplane starts, then moved with the uplink's address when
//! `lb.node_address` is not set ([`follow_uplink`]); and the nodes it takes tunnel packets from
//! (`tm_tunnel_peers`), named by the load balancer's remote targets and the
//! overlay's remote instances.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use aya::{
    maps::{Array, HashMap as BpfHashMap},
    Ebpf,
};
use tapmesh_common::{
    map_names as n,
    tunnel::{peer_slot, PeerSlot, TunnelConfig, PEER_SLOT_ONE, PEER_SLOT_SHARED},
};

use super::{map_err, map_mut, map_ref, DataplaneError};
use crate::config::Config;

/// This node's tunnel settings for remote targets, remote instances and
/// decapsulation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TunnelSettings {
    pub port: u16,
    /// The node's underlay address; `None`: the tunnel is off.
    pub address: Option<std::net::Ipv4Addr>,
}

impl TunnelSettings {
    /// `lb.tunnel_port`, and `lb.node_address` or else the first IPv4
    /// address of the first uplink.
    pub fn of(config: &Config) -> Self {
        let uplink = config.dataplane.uplinks.first();
        let address = config
            .lb
            .node_address
            .or_else(|| uplink.and_then(|u| crate::net::addr::first_ipv4(u).ok().flatten()));
        Self {
            port: config.lb.tunnel_port,
            address,
        }
    }

    /// The map value: the tunnel is off without an address.
    pub fn config(&self) -> TunnelConfig {
        match self.address {
            Some(addr) => TunnelConfig {
                node_addr: addr.octets(),
                port: self.port,
                _pad: 0,
            },
            None => TunnelConfig::default(),
        }
    }
}

/// Follows the first IPv4 address of `uplink` (the tunnel endpoint without
/// `lb.node_address`) on the kernel's notifications, as Oakestra's
/// NetManager re-detects its address (there every 2 minutes): a new one
/// moves `tm_tunnel` and is announced to the tunnel's users. While the
/// uplink has none, the last one stays (its replacement may be on the way).
pub async fn follow_uplink(
    handle: super::DataplaneHandle,
    uplink: String,
    stop: tokio_util::sync::CancellationToken,
) {
    use crate::net::watch::{Change, Watch};
    let mut watch = match Watch::start() {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(uplink, "the tunnel address will not follow the uplink: {e}");
            return;
        }
    };
    // The first look covers a change between configure and now.
    let mut first = true;
    loop {
        if !std::mem::take(&mut first) {
            let change = tokio::select! {
                () = stop.cancelled() => return,
                change = watch.next() => change,
            };
            match change {
                Ok(Change::Neighbour { .. }) => continue,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(uplink, "the tunnel address stops following the uplink: {e}");
                    return;
                }
            }
        }
        let name = uplink.clone();
        let found = tokio::task::spawn_blocking(move || crate::net::addr::first_ipv4(&name)).await;
        let Ok(Ok(Some(address))) = found else {
            continue;
        };
        if handle.tunnel().address == Some(address) {
            continue;
        }
        match handle.move_tunnel(address).await {
            Ok(()) => tracing::info!(uplink, %address, "the node's tunnel address moved"),
            Err(e) => tracing::error!(uplink, %address, "the tunnel address could not move: {e}"),
        }
    }
}

/// Writes `tm_tunnel`: the one writer of the tunnel endpoint.
pub fn write(ebpf: &mut Ebpf, settings: TunnelSettings) -> Result<(), DataplaneError> {
    let mut map: Array<_, TunnelConfig> =
        Array::try_from(map_mut(ebpf, n::TUNNEL)?).map_err(map_err(n::TUNNEL))?;
    map.set(0, settings.config(), 0).map_err(map_err(n::TUNNEL))
}

/// Makes `tm_tunnel_peers` name `wanted` for one source (`bit`: `PEER_LB`
/// or `PEER_OVERLAY`), given what that source named before (`had`). Each
/// source sets and clears only its own bit, so the map holds the union of
/// the sources without either knowing the other's nodes. New nodes are
/// added before the caller's targets use them; call it again with the old
/// set to undo.
pub fn write_peers(
    ebpf: &mut Ebpf,
    bit: u8,
    had: &BTreeSet<Ipv4Addr>,
    wanted: &BTreeSet<Ipv4Addr>,
) -> Result<(), DataplaneError> {
    let name = n::TUNNEL_PEERS;
    let mut map: BpfHashMap<_, [u8; 4], u8> =
        BpfHashMap::try_from(map_mut(ebpf, name)?).map_err(map_err(name))?;
    // Every wanted node is checked, not only new ones: maps kept from an
    // earlier daemon may lack them.
    for addr in wanted {
        let key = addr.octets();
        let bits = map.get(&key, 0).unwrap_or(0);
        if bits & bit == 0 {
            map.insert(key, bits | bit, 0).map_err(map_err(name))?;
        }
    }
    for addr in had.difference(wanted) {
        let key = addr.octets();
        match map.get(&key, 0) {
            Ok(bits) if bits & !bit != 0 => map.insert(key, bits & !bit, 0),
            Ok(_) => map.remove(&key),
            Err(_) => Ok(()),
        }
        .map_err(map_err(name))?;
    }
    let touched = wanted.iter().chain(had).map(|a| peer_slot(a.octets()));
    write_slots(ebpf, touched.collect())
}

/// Brings the `tm_tunnel_slots` entries at `touched` in line with the
/// addresses `tm_tunnel_peers` holds, after the hash changed: a slot names
/// the one node mapping to it, or says "shared" (the kernel then asks the
/// hash), or nothing. Derived from the hash, so it holds the same nodes
/// whoever named them (entries kept from an earlier daemon included).
fn write_slots(ebpf: &mut Ebpf, touched: BTreeSet<u32>) -> Result<(), DataplaneError> {
    let name = n::TUNNEL_PEERS;
    let peers: BpfHashMap<_, [u8; 4], u8> =
        BpfHashMap::try_from(map_ref(ebpf, name)?).map_err(map_err(name))?;
    let mut by_slot: BTreeMap<u32, Vec<[u8; 4]>> = BTreeMap::new();
    for key in peers.keys() {
        let key = key.map_err(map_err(name))?;
        if touched.contains(&peer_slot(key)) {
            by_slot.entry(peer_slot(key)).or_default().push(key);
        }
    }
    let name = n::TUNNEL_SLOTS;
    let mut slots: Array<_, PeerSlot> =
        Array::try_from(map_mut(ebpf, name)?).map_err(map_err(name))?;
    for slot in touched {
        let value = match by_slot.get(&slot).map(Vec::as_slice) {
            None | Some([]) => PeerSlot::default(),
            Some([addr]) => PeerSlot {
                addr: *addr,
                state: PEER_SLOT_ONE,
                _pad: [0; 3],
            },
            Some(_) => PeerSlot {
                state: PEER_SLOT_SHARED,
                ..PeerSlot::default()
            },
        };
        if slots.get(&slot, 0).ok() != Some(value) {
            slots.set(slot, value, 0).map_err(map_err(name))?;
        }
    }
    Ok(())
}
