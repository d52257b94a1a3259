//! The underlay of the tunnel tests and benchmarks: a namespace where this
//! node ([`NODE`]) reaches the remote node ([`REMOTE_NODE`]) over a veth, so
//! `bpf_fib_lookup` in a BPF_PROG_TEST_RUN from inside it finds a route and
//! (optionally) a neighbour.

use std::net::Ipv4Addr;

use crate::{fmt_mac, Netns};

/// The node tunnel's UDP port.
pub const TUNNEL_PORT: u16 = tapmesh_common::DEFAULT_TUNNEL_PORT;
/// This node's underlay address (tunnel source, decap destination).
pub const NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 5, 1);
/// The remote node, and its MAC in the namespace's neighbour table.
pub const REMOTE_NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 5, 2);
pub const REMOTE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x05, 0x02];

/// The remote node's next hop as the daemon resolves it and hands it to
/// the writers: out of interface `index` (MAC `mac`) to [`REMOTE_MAC`].
pub fn remote_hop(
    index: u32,
    mac: [u8; 6],
) -> std::collections::BTreeMap<Ipv4Addr, tapmesh::net::Hop> {
    let hop = tapmesh::net::Hop {
        ifindex: index,
        dst_mac: REMOTE_MAC,
        src_mac: mac,
        mtu: 1500,
        veth: false,
    };
    std::collections::BTreeMap::from([(REMOTE_NODE, hop)])
}

/// Veth `tma` ([`NODE`]/24) and its peer `tmb`, forwarding on, and (if asked)
/// a permanent neighbour for [`REMOTE_NODE`]. Deleted on drop.
pub struct Underlay {
    pub ns: Netns,
    /// `tma`'s MAC and index.
    pub mac: [u8; 6],
    pub index: u32,
}

impl Underlay {
    pub fn new(neighbour: bool) -> Self {
        let ns = Netns::new("ul");
        ns.ip(&[
            "link", "add", "name", "tma", "type", "veth", "peer", "name", "tmb",
        ]);
        ns.ip(&["addr", "add", &format!("{NODE}/24"), "dev", "tma"]);
        ns.ip(&["link", "set", "dev", "tma", "up"]);
        ns.ip(&["link", "set", "dev", "tmb", "up"]);
        // bpf_fib_lookup answers only where forwarding is on.
        ns.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        if neighbour {
            ns.ip(&[
                "neigh",
                "replace",
                &REMOTE_NODE.to_string(),
                "lladdr",
                &fmt_mac(REMOTE_MAC),
                "dev",
                "tma",
                "nud",
                "permanent",
            ]);
        }
        let mac = ns.mac("tma");
        let index = ns.interface_index("tma");
        Underlay { ns, mac, index }
    }

    /// Runs `f` on a thread inside the namespace (test runs use its FIB).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let name = self.ns.name.clone();
        std::thread::scope(|s| {
            s.spawn(move || {
                tapmesh::net::netns::enter(&name).expect("entering the namespace");
                f()
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }
}
