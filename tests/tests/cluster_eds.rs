//! EDS endpoints on other nodes of the cluster: an endpoint inside a
//! node's published pod CIDR is a remote target through the tunnel to that
//! node; one that no node claims is listed as unreachable and never used.
//! Real etcd, real xDS peers (one per node, serving the same assignment),
//! real packets from a client entering node 1.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use tapmesh_tests::{
    cluster::{Lab, CLIENT, LEASE_TTL},
    daemon::named,
    eds::{udp_vip_cluster, wait_ack, weighted, xds_config},
    kernel_tests_enabled, link,
    net::{send_udp_flows, wait_until, UdpReceiver},
    tapa::NSP_CONFIG,
    xds_peer::ControlPlane,
    Netns,
};

const VIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 77);
const PORT: u16 = 7000;
/// No node publishes a prefix holding it.
const UNCLAIMED: &str = "198.18.30.10";
const FLOWS: u16 = 2000;

/// Node `i`'s backend: 198.18.1<i>.10, in node `i`'s pod CIDR 198.18.1<i>.0/24.
fn backend(i: usize) -> String {
    format!("198.18.1{i}.10")
}

/// One datagram per flow from the client to the VIP; which backend (index)
/// each flow reached. Every flow must arrive exactly once.
fn round(lab: &Lab, receivers: &[UdpReceiver], first_port: u16) -> BTreeMap<u16, usize> {
    let count = || receivers.iter().map(UdpReceiver::count).sum::<u64>();
    let ports: Vec<u16> = (first_port..first_port + FLOWS).collect();
    let client = &lab.client.as_ref().unwrap().0.name;
    let sent = send_udp_flows(
        client,
        CLIENT,
        &ports,
        SocketAddrV4::new(VIP, PORT),
        1,
        b"eds",
    );
    wait_until(Duration::from_secs(30), || count() >= sent);
    std::thread::sleep(Duration::from_millis(200));
    let mut reached = BTreeMap::new();
    for (i, r) in receivers.iter().enumerate() {
        for (port, n) in r.take().by_port() {
            assert_eq!(n, 1, "flow {port}: {n} datagrams at backend {i}");
            assert!(
                reached.insert(port, i).is_none(),
                "flow {port} reached two backends"
            );
        }
    }
    assert_eq!(reached.len() as u64, sent, "flows lost: {reached:?}");
    reached
}

fn listing(lab: &Lab, i: usize) -> String {
    lab.daemon(i).cli(&["catalog", "list"])
}

fn line_of<'a>(listing: &'a str, address: &str) -> &'a str {
    listing
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("{address}:{PORT} ")))
        .unwrap_or("")
}

/// Two nodes on etcd, each with a backend in its pod CIDR behind it and its
/// own xDS peer serving one assignment: both backends and [`UNCLAIMED`];
/// both nodes have acknowledged it. Nodes in `follows` are not told their
/// address.
fn eds_lab(follows: &[usize]) -> (Lab, Vec<Netns>, Vec<ControlPlane>) {
    let mut backends: Vec<Netns> = Vec::new();
    let mut planes: Vec<ControlPlane> = Vec::new();
    let lab = Lab::build_with(2, true, NSP_CONFIG, 1, LEASE_TTL, false, |lab| {
        lab.follows_uplink = follows.to_vec();
        for i in 1..=2 {
            let b = Netns::new(&format!("b{i}"));
            let (end, _) = link(
                &b,
                &format!("{}/24", backend(i)),
                &lab.nodes[i - 1],
                &format!("198.18.1{i}.1/24"),
            );
            // The backend answers on the VIP (DSR) and computes its checksums.
            b.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"]);
            b.exec(&["ethtool", "-K", &end.interface, "tx", "off"]);
            let cp = ControlPlane::start_in(&lab.nodes[i - 1].name, false);
            lab.node_extra.push(format!(
                "pod_cidrs = [\"198.18.1{i}.0/24\"]\n{}{}",
                xds_config(&cp.address(), ""),
                udp_vip_cluster("svc", VIP)
            ));
            backends.push(b);
            planes.push(cp);
        }
    });
    let assignment = weighted(&[
        (&backend(1), PORT as u32, 1),
        (&backend(2), PORT as u32, 1),
        (UNCLAIMED, PORT as u32, 1),
    ]);
    for cp in &mut planes {
        cp.set("1", &[("svc", assignment.clone())]);
    }
    for cp in &planes {
        wait_ack(cp, "1");
    }
    (lab, backends, planes)
}

/// Node 2's backend's share of `reached` is half, ±15 %.
fn halved(reached: &BTreeMap<u16, usize>) {
    let on_n2 = reached.values().filter(|&&b| b == 1).count();
    let share = on_n2 as f64 / FLOWS as f64;
    assert!(
        (0.425..=0.575).contains(&share),
        "node 2's backend took {on_n2} of {FLOWS}"
    );
}

#[test]
fn eds_endpoints_in_another_nodes_pod_cidr_are_reached_through_the_tunnel() {
    if !kernel_tests_enabled() {
        return;
    }
    let (mut lab, backends, planes) = eds_lab(&[]);
    // The node records may come after the ACK: the catalog resolves again.
    let remote_on_both = wait_until(Duration::from_secs(30), || {
        line_of(&listing(&lab, 1), &backend(2)).contains(" slots 1 on node n2 ")
            && line_of(&listing(&lab, 2), &backend(1)).contains(" slots 1 on node n1 ")
    });
    assert!(remote_on_both, "{}\n{}", listing(&lab, 1), listing(&lab, 2));
    for i in 1..=2 {
        let l = listing(&lab, i);
        assert!(
            line_of(&l, &backend(i)).contains(" slots 1 locality"),
            "{l}"
        );
        assert!(line_of(&l, UNCLAIMED).contains(" unreachable "), "{l}");
    }

    let receivers: Vec<UdpReceiver> = backends
        .iter()
        .map(|b| UdpReceiver::start(&b.name, SocketAddrV4::new(VIP, PORT)))
        .collect();
    halved(&round(&lab, &receivers, 20000));
    let not_local = named(&lab.daemon(2).status(), "xdp_uplink", "target_not_local");
    assert_eq!(not_local, 0, "node 2 picked another target than node 1");

    // Node 2 leaves: its record goes with its lease, its backend is
    // unreachable for node 1, and every flow goes to node 1's backend.
    drop(lab.daemons[1].take());
    let left = wait_until(LEASE_TTL + Duration::from_secs(30), || {
        line_of(&listing(&lab, 1), &backend(2)).contains(" unreachable ")
    });
    assert!(left, "{}", listing(&lab, 1));
    let reached = round(&lab, &receivers, 30000);
    assert!(reached.values().all(|&b| b == 0), "{reached:?}");
    drop(receivers);
    drop(lab);
    drop(planes);
}

#[test]
fn a_node_whose_uplink_address_moves_is_reached_at_the_new_one() {
    if !kernel_tests_enabled() {
        return;
    }
    let (lab, backends, planes) = eds_lab(&[2]);
    let remote = wait_until(Duration::from_secs(30), || {
        line_of(&listing(&lab, 1), &backend(2)).contains(" on node n2 ")
    });
    assert!(remote, "{}", listing(&lab, 1));
    let receivers: Vec<UdpReceiver> = backends
        .iter()
        .map(|b| UdpReceiver::start(&b.name, SocketAddrV4::new(VIP, PORT)))
        .collect();
    halved(&round(&lab, &receivers, 20000));

    // Node 2's uplink gets another address: its record follows, node 1
    // tunnels to the new one, and node 2 decapsulates there.
    let (n2, uplink) = (&lab.nodes[1], &lab.uplinks[1][0]);
    n2.ip(&["addr", "del", "198.51.100.2/24", "dev", uplink]);
    n2.ip(&["addr", "add", "198.51.100.12/24", "dev", uplink]);
    let moved = wait_until(Duration::from_secs(30), || {
        lab.daemon(1)
            .status()
            .plugins
            .iter()
            .any(|p| p.name == "cluster" && p.detail.contains("2 nodes"))
            && remote_node_of(&lab) == Some(Ipv4Addr::new(198, 51, 100, 12))
    });
    assert!(moved, "node 1 still tunnels to {:?}", remote_node_of(&lab));
    halved(&round(&lab, &receivers, 30000));
    drop(receivers);
    drop((lab, backends, planes));
}

/// The tunnel address of node 1's remote target (node 2's backend).
fn remote_node_of(lab: &Lab) -> Option<Ipv4Addr> {
    use aya::maps::{Array, Map, MapData};
    use tapmesh_common::{
        lb::{Target, TARGET_REMOTE},
        SCHEMA_VERSION,
    };
    let pins = lab.daemon(1).bpffs_root.join(format!("v{SCHEMA_VERSION}"));
    let data = MapData::from_pin(pins.join("tm_targets")).ok()?;
    let targets: Array<MapData, Target> = Array::try_from(Map::Array(data)).ok()?;
    let found = targets
        .iter()
        .filter_map(Result::ok)
        .find(|t| t.kind == TARGET_REMOTE)
        .map(|t| {
            let a = t.node_addr;
            Ipv4Addr::new(a[12], a[13], a[14], a[15])
        });
    found
}
