//! `cargo xtask bench`, overlay section: one UDP flow from a client
//! container on node 1 to a service IP whose instance is on node 2, through
//! tapmesh (TC translation + UDP 50103 tunnel + XDP decap) and through what a
//! Kubernetes user runs with flannel and kube-proxy (nftables DNAT + kernel
//! VXLAN), in the same run on the same kind of veth lab.

use std::{
    fmt::Write as _,
    net::{SocketAddrV4, UdpSocket},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use crate::{
    link,
    net::spawn_in,
    overlay::{TwoNodes, NODE1, NODE2},
    Netns,
};

const FLOOD: Duration = Duration::from_secs(2);
const SERVICE: &str = "203.0.113.10";
const PORT: u16 = 7000;

/// Floods `to` from `client` for [`FLOOD`] while `server` counts what
/// arrives on [`PORT`]; returns (sent, received) per second.
fn flood(client: &Netns, server: &Netns, to: &str) -> (f64, f64) {
    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let (s2, r2) = (stop.clone(), received.clone());
    let sink = spawn_in(&server.name, move || {
        let s = UdpSocket::bind(SocketAddrV4::new(0.into(), PORT)).expect("sink socket");
        s.set_read_timeout(Some(Duration::from_millis(50))).ok();
        let mut buf = [0u8; 2048];
        while !s2.load(Ordering::Relaxed) {
            if s.recv(&mut buf).is_ok() {
                r2.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    std::thread::sleep(Duration::from_millis(100));
    let to: SocketAddrV4 = SocketAddrV4::new(to.parse().expect("address"), PORT);
    let sent = spawn_in(&client.name, move || {
        let s = UdpSocket::bind("0.0.0.0:0").expect("flood socket");
        s.connect(to).expect("connect");
        let payload = [0u8; 18];
        let start = Instant::now();
        let mut sent = 0u64;
        while start.elapsed() < FLOOD {
            for _ in 0..64 {
                if s.send(&payload).is_ok() {
                    sent += 1;
                }
            }
        }
        sent
    })
    .join()
    .expect("flood thread");
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let _ = sink.join();
    let secs = FLOOD.as_secs_f64();
    (
        sent as f64 / secs,
        received.load(Ordering::Relaxed) as f64 / secs,
    )
}

fn tapmesh_rate() -> (f64, f64) {
    let nodes = TwoNodes::start();
    nodes.node1.register("192.0.2.0/26");
    nodes.node2.register("192.0.2.64/26");
    let client = Netns::new("obc");
    let server = Netns::new("obs");
    let c_ns = nodes.node1.deploy(
        &client,
        "bench.ns.client.ns",
        0,
        &[("InstanceNumber", "203.0.113.100")],
    );
    let sips: &[(&str, &str)] = &[("RR", SERVICE), ("InstanceNumber", "203.0.113.102")];
    let s_ns = nodes.node2.deploy(&server, "bench.ns.web.ns", 0, sips);
    nodes
        .node1
        .table("bench.ns.web.ns", &[(0, &s_ns, NODE2, sips)]);
    nodes.node2.table(
        "bench.ns.client.ns",
        &[(0, &c_ns, NODE1, &[("InstanceNumber", "203.0.113.100")])],
    );
    flood(&client, &server, SERVICE)
}

/// Client and server behind their nodes' veths, VXLAN 42 between the nodes,
/// nftables DNAT of the service IP on node 1.
fn kernel_rate() -> (f64, f64) {
    let n1 = Netns::new("okn1");
    let n2 = Netns::new("okn2");
    let client = Netns::new("okc");
    let server = Netns::new("oks");
    let (u1, u2) = link(&n1, "198.18.3.1/24", &n2, "198.18.3.2/24");
    let _ = link(&client, "192.0.2.2/26", &n1, "192.0.2.1/26");
    let _ = link(&server, "192.0.2.66/26", &n2, "192.0.2.65/26");
    client.ip(&["route", "add", "default", "via", "192.0.2.1"]);
    server.ip(&["route", "add", "default", "via", "192.0.2.65"]);
    // VXLAN 42 point to point, an address on each end, the other node's
    // container subnet routed through it (flannel's vxlan backend, in short).
    for (n, local, remote, vx, peer_vx, other) in [
        (
            &n1,
            "198.18.3.1",
            "198.18.3.2",
            "198.18.4.1/30",
            "198.18.4.2",
            "192.0.2.64/26",
        ),
        (
            &n2,
            "198.18.3.2",
            "198.18.3.1",
            "198.18.4.2/30",
            "198.18.4.1",
            "192.0.2.0/26",
        ),
    ] {
        n.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        let dev = if n.name == n1.name {
            u1.interface.clone()
        } else {
            u2.interface.clone()
        };
        n.ip(&[
            "link", "add", "vx42", "type", "vxlan", "id", "42", "local", local, "remote", remote,
            "dstport", "4789", "dev", &dev,
        ]);
        n.ip(&["addr", "add", vx, "dev", "vx42"]);
        n.ip(&["link", "set", "vx42", "mtu", "1450", "up"]);
        n.ip(&["route", "add", other, "via", peer_vx]);
    }
    let rules = std::env::temp_dir().join(crate::unique("obnft"));
    std::fs::write(
        &rules,
        "table ip bench {\n  chain pre {\n    type nat hook prerouting priority dstnat; policy accept;\n    \
         ip daddr 203.0.113.10 udp dport 7000 dnat to 192.0.2.66\n  }\n}\n",
    )
    .expect("nft rules file");
    let out = n1.try_exec(&["nft", "-f", rules.to_str().expect("utf-8 path")]);
    let _ = std::fs::remove_file(&rules);
    assert!(
        out.status.success(),
        "nft: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    flood(&client, &server, SERVICE)
}

fn kpps(v: f64) -> String {
    format!("{:.0}", v / 1000.0)
}

pub fn overlay_rates() -> String {
    let ours = tapmesh_rate();
    let kernel = kernel_rate();
    let mut out = String::new();
    let _ = writeln!(out, "## Service-IP overlay on veth\n");
    let _ = writeln!(
        out,
        "One UDP flow (18-byte payload, one socket, {} s) from a client container on node 1 to a \
         service IP whose instance is on node 2; kpps = thousands of packets per second, in the \
         same run. tapmesh: TC translation + UDP 50103 encapsulation on the container's veth, XDP \
         decapsulation on node 2's uplink. Kernel: nftables DNAT on node 1 + kernel VXLAN between \
         the nodes (flannel + kube-proxy's data path).\n",
        FLOOD.as_secs()
    );
    let _ = writeln!(out, "| data path | sent kpps | delivered kpps |");
    let _ = writeln!(out, "|---|---:|---:|");
    let _ = writeln!(
        out,
        "| tapmesh (TC + UDP tunnel + XDP) | {} | {} |",
        kpps(ours.0),
        kpps(ours.1)
    );
    let _ = writeln!(
        out,
        "| nftables DNAT + kernel VXLAN | {} | {} |",
        kpps(kernel.0),
        kpps(kernel.1)
    );
    out
}
