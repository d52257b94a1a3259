//! The VIP load balancer to a target on another node, on veth, under a load
//! of every CPU ([`super::load`]): tapmesh (node 1's uplink XDP picks the
//! target by Maglev and tunnels the packet to node 2, whose uplink XDP
//! decapsulates it and redirects it to the target) beside what Kubernetes
//! users run with kube-proxy's nftables mode and flannel (an nftables
//! `numgen` DNAT to the endpoint on node 1, kernel VXLAN between the nodes),
//! and plain routing to the target's own address as the floor.
//!
//! ```text
//! client ── node1 ════ node2 ── target (+ VIP on lo)
//! 198.18.0.2  .0.1 .2.1  .2.2 .21.1  .21.2
//! ```

use std::{fmt::Write as _, net::SocketAddrV4, time::Duration};

use tapmesh::lb::model::TargetVia;

use super::load::{self, Setup};
use crate::{
    daemon::Daemon,
    fmt_mac, link,
    net::{lb_toml, one_target_spec},
    Netns,
};

const LOAD: Duration = Duration::from_secs(2);
const VIP: &str = "203.0.113.20";
const TARGET: &str = "198.18.21.2";
const PORT: u16 = 7000;

/// The four namespaces, linked and routed for every variant: client to node
/// 1, node 1 to node 2 (the underlay), node 2 to the target.
struct Lab {
    client: Netns,
    node1: Netns,
    node2: Netns,
    target: Netns,
    /// Interface names: node 1's towards the client and the underlay, node
    /// 2's on the underlay and towards the target, the target's own.
    n1_down: String,
    n1_up: String,
    n2_up: String,
    n2_down: String,
    t_if: String,
}

fn lab() -> Lab {
    let client = Netns::new("lbc");
    let node1 = Netns::new("lbn1");
    let node2 = Netns::new("lbn2");
    let target = Netns::new("lbt");
    let (c_if, n1_down) = link(&client, "198.18.0.2/24", &node1, "198.18.0.1/24");
    let (n1_up, n2_up) = link(&node1, "198.18.2.1/24", &node2, "198.18.2.2/24");
    let (n2_down, t_if) = link(&node2, "198.18.21.1/24", &target, "198.18.21.2/24");
    // As a NIC's sender would: checksums complete (an XDP redirect drops a
    // CHECKSUM_PARTIAL note), the same for every variant.
    client.exec(&["ethtool", "-K", &c_if.interface, "tx", "off"]);
    for n in [&node1, &node2] {
        n.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    }
    client.ip(&["route", "add", "default", "via", "198.18.0.1"]);
    target.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"]);
    target.ip(&["route", "add", "default", "via", "198.18.21.1"]);
    // A native XDP redirect into a veth needs NAPI on the receiving side.
    target.exec(&["ethtool", "-K", &t_if.interface, "gro", "on"]);
    load::install_sink(&target, PORT);
    Lab {
        client,
        node1,
        node2,
        target,
        n1_down: n1_down.interface,
        n1_up: n1_up.interface,
        n2_up: n2_up.interface,
        n2_down: n2_down.interface,
        t_if: t_if.interface,
    }
}

fn vip() -> SocketAddrV4 {
    SocketAddrV4::new(VIP.parse().expect("address"), PORT)
}

/// Removes a directory when dropped.
struct RemoveDir(std::path::PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Lab {
    /// The load from the client to `to`, counted at the target.
    fn setup(self, to: SocketAddrV4, mut keep: Vec<Box<dyn std::any::Any>>) -> Setup {
        keep.push(Box::new(self.node1));
        keep.push(Box::new(self.node2));
        Setup {
            client: self.client,
            server: self.target,
            to,
            keep,
        }
    }
}

/// tapmesh on both nodes, as in the two-node LB test.
fn tapmesh_lab() -> Setup {
    let l = lab();
    let dir = RemoveDir(std::env::temp_dir().join(crate::unique("tmlbb")));
    std::fs::create_dir_all(&dir.0).expect("a temporary directory");
    let write = |name: &str, via: TargetVia| {
        let path = dir.0.join(name);
        let spec = one_target_spec(VIP, "web", 4, &["udp"], via);
        std::fs::write(&path, lb_toml(&spec)).expect("writing the LB file");
        path
    };
    let remote = write(
        "node1.toml",
        TargetVia::Remote {
            node: "198.18.2.2".into(),
        },
    );
    let local = write(
        "node2.toml",
        TargetVia::Local {
            interface: l.n2_down.clone(),
            mac: fmt_mac(l.target.mac(&l.t_if)),
        },
    );
    // `TAPMESH_BENCH_XDP_MODE=generic`: both daemons' uplinks in generic
    // (skb) mode, which on veth skips the skb → xdp_buff copy, the NAPI
    // rings and the skb rebuilt after a redirect.
    let mode = std::env::var("TAPMESH_BENCH_XDP_MODE").unwrap_or("auto".into());
    let (m1, m2) = (mode.clone(), mode);
    let d1 = Daemon::start(
        &l.node1.name,
        &[
            "--xdp-mode",
            &m1,
            "--uplink",
            &l.n1_down,
            "--uplink",
            &l.n1_up,
            "--node-address",
            "198.18.2.1",
            "--lb-config",
            remote.to_str().expect("utf-8 path"),
        ],
    );
    let d2 = Daemon::start(
        &l.node2.name,
        &[
            "--xdp-mode",
            &m2,
            "--uplink",
            &l.n2_up,
            "--node-address",
            "198.18.2.2",
            "--tunnel-peer",
            "198.18.2.1",
            "--lb-config",
            local.to_str().expect("utf-8 path"),
        ],
    );
    // The daemons stop before their configuration goes.
    l.setup(vip(), vec![Box::new(d1), Box::new(d2), Box::new(dir)])
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kernel {
    /// nftables `numgen` DNAT on node 1, VXLAN 42 between the nodes.
    Balanced,
    /// The target's subnet routed through node 2's underlay address.
    Routed,
}

fn kernel_lab(kind: Kernel) -> Setup {
    let l = lab();
    l.node2
        .ip(&["route", "add", "198.18.0.0/24", "via", "198.18.2.1"]);
    if kind == Kernel::Routed {
        l.node1
            .ip(&["route", "add", "198.18.21.0/24", "via", "198.18.2.2"]);
        let to = SocketAddrV4::new(TARGET.parse().expect("address"), PORT);
        return l.setup(to, Vec::new());
    }
    for (n, dev, local, remote, vx) in [
        (
            &l.node1,
            &l.n1_up,
            "198.18.2.1",
            "198.18.2.2",
            "198.18.4.1/30",
        ),
        (
            &l.node2,
            &l.n2_up,
            "198.18.2.2",
            "198.18.2.1",
            "198.18.4.2/30",
        ),
    ] {
        n.ip(&[
            "link", "add", "vx42", "type", "vxlan", "id", "42", "local", local, "remote", remote,
            "dstport", "4789", "dev", dev,
        ]);
        n.ip(&["addr", "add", vx, "dev", "vx42"]);
        n.ip(&["link", "set", "vx42", "mtu", "1450", "up"]);
    }
    l.node1
        .ip(&["route", "add", "198.18.21.0/24", "via", "198.18.4.2"]);
    // kube-proxy's nftables mode: the service's DNAT picks an endpoint by
    // numgen (one endpoint here, as tapmesh's stream has one target).
    let rules = format!(
        "table ip kube-proxy {{\n  chain services {{\n    type nat hook prerouting priority dstnat; \
         policy accept;\n    ip daddr {VIP} udp dport {PORT} dnat to numgen random mod 1 map \
         {{ 0 : {TARGET} }}\n  }}\n}}\n"
    );
    load::nft(&l.node1, &rules);
    l.setup(vip(), Vec::new())
}

/// The "VIP load balancer on veth" section of BENCHMARKS.md.
pub fn rates() -> String {
    let labs = [
        tapmesh_lab(),
        kernel_lab(Kernel::Balanced),
        kernel_lab(Kernel::Routed),
        load::alone(PORT, false),
    ];
    let mut out = String::new();
    let _ = writeln!(out, "## VIP load balancer on veth\n");
    let _ = writeln!(
        out,
        "A client sends UDP to a VIP whose one target is on node 2, behind node 1: one load per \
         CPU (pinned, each its own flow, 18-byte payloads), {} s after a warm-up, each path {} \
         times interleaved with the others (the median run by CPU per packet is shown); the \
         target's namespace counts and drops what arrives (nftables, prerouting). CPU ns/packet \
         is all CPUs' busy time over delivered packets, as in the overlay section. tapmesh: node \
         1's uplink XDP (Maglev pick, UDP 50103 encapsulation, redirect out of the underlay \
         veth), node 2's uplink XDP (decapsulation, redirect to the target). Kernel: \
         kube-proxy's nftables mode (a `numgen` DNAT map) on node 1 and kernel VXLAN between the \
         nodes. Floor: the two nodes routing to the target's own address. The load alone: the \
         client's packets counted and dropped as they reach node 1 (nftables, netdev ingress), \
         what every path pays before its own work; the data paths' own cost is what they take \
         beyond it. Lost: sent but never counted at the sink.\n",
        LOAD.as_secs(),
        load::ROUNDS
    );
    load::compare(
        &mut out,
        &labs,
        LOAD,
        [
            "tapmesh (XDP Maglev + UDP tunnel + XDP)",
            "nftables numgen DNAT + kernel VXLAN",
            "floor: plain routing to the target",
        ],
        3.0,
    );
    out
}
