//! The daemon as an EDS consumer in tests: its `[xds]` configuration, its
//! ACKs to the control plane (`crate::xds_peer`), weighted assignments, and
//! a namespace full of resolvable backends.

use std::{fmt::Write as _, net::Ipv4Addr, time::Duration};

use crate::{
    net::LbLab,
    unique,
    xds_peer::{Cla, ControlPlane, Ep, SeenRequest},
    Netns,
};

/// A daemon configuration: node-1's xDS client of `server` (a cluster the
/// server never sends is applied empty after 30 s), then `more`: further
/// `[xds]` keys, then its `[[xds.clusters]]`.
pub fn xds_config(server: &str, more: &str) -> String {
    format!("[xds]\nserver = \"{server}\"\nnode_id = \"node-1\"\nmissing_after = \"30s\"\n{more}")
}

/// An `[[xds.clusters]]` table: cluster `name` feeds `vip`, for UDP.
pub fn udp_vip_cluster(name: &str, vip: impl std::fmt::Display) -> String {
    format!("[[xds.clusters]]\nname = \"{name}\"\nvip = \"{vip}\"\nprotocols = [\"udp\"]\n")
}

/// An `LbLab` of two targets holding `vips`, a control plane in its node,
/// and the daemon started with `xds_config(<that plane>, more)`.
pub fn lab(vips: &[Ipv4Addr], more: &str) -> (LbLab, ControlPlane) {
    lab_of(vips, more, false)
}

/// [`lab`] with a control plane that serves Delta xDS too (`delta`).
pub fn lab_of(vips: &[Ipv4Addr], more: &str, delta: bool) -> (LbLab, ControlPlane) {
    let mut lab = LbLab::new(2, vips);
    let cp = ControlPlane::start_in(&lab.node.name, delta);
    lab.start_configured(&xds_config(&cp.address(), more));
    (lab, cp)
}

/// Waits (20 s at most) for the daemon's ACK of `version`; the daemon ACKs
/// once the maps hold what the version says.
pub fn wait_ack(cp: &ControlPlane, version: &str) -> SeenRequest {
    cp.wait_request(
        Duration::from_secs(20),
        &format!("ACK of version {version}"),
        |r| r.version_info == version && r.error_detail.is_none() && !r.response_nonce.is_empty(),
    )
}

/// Waits (20 s at most) for the ACK of the last response of `version`: a
/// request on its stream with its nonce and no error (SotW or Delta).
pub fn wait_nonce_ack(cp: &ControlPlane, version: &str) -> SeenRequest {
    // The response may wait for the daemon's subscription.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let sent = loop {
        if let Some(r) = cp
            .responses()
            .into_iter()
            .rfind(|r| r.version_info == version)
        {
            break r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no response of version {version}: {:#?}",
            cp.responses()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    cp.wait_request(
        Duration::from_secs(20),
        &format!("ACK of version {version}"),
        move |r| {
            r.stream == sent.stream && r.response_nonce == sent.nonce && r.error_detail.is_none()
        },
    )
}

/// One locality of endpoints `(address, port, weight)`.
pub fn weighted(endpoints: &[(&str, u32, u32)]) -> Cla {
    Cla::single(
        endpoints
            .iter()
            .map(|&(address, port, weight)| Ep::new(address, port).weight(weight))
            .collect(),
    )
}

/// The `i`-th backend of [`backends_netns`]: 198.18.16.10 + `i`.
pub fn backend(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 16, 10)) + i as u32)
}

/// A namespace whose veth `eb0` (198.18.16.1/18, room for 12 000 backends;
/// peer `eb1`) has backends
/// 0 to `count - 1` as permanent neighbours, backend `i` at MAC
/// 02:00:00:00:<i's two low bytes>, so each resolves to a local target.
pub fn backends_netns(label: &str, count: usize) -> Netns {
    let ns = Netns::new(label);
    ns.ip(&["link", "add", "eb0", "type", "veth", "peer", "name", "eb1"]);
    ns.ip(&["addr", "add", "198.18.16.1/18", "dev", "eb0"]);
    ns.ip(&["link", "set", "eb1", "up"]);
    ns.ip(&["link", "set", "eb0", "up"]);
    let mut batch = String::new();
    for i in 0..count {
        let _ = writeln!(
            batch,
            "neigh replace {} lladdr 02:00:00:00:{:02x}:{:02x} dev eb0 nud permanent",
            backend(i),
            (i >> 8) & 0xff,
            i & 0xff
        );
    }
    let file = std::env::temp_dir().join(unique(&format!("tm{label}neigh")));
    std::fs::write(&file, batch).expect("writing the neighbour batch");
    let path = file.display().to_string();
    let result = std::panic::catch_unwind(|| ns.ip(&["-batch", &path]));
    let _ = std::fs::remove_file(&file);
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
    ns
}
