//! EDS into the VIP maps: an independent control plane (Python grpcio +
//! xds-protos) inside the node's namespace, the daemon's xDS client and
//! catalog, and real packets whose split follows the endpoint weights.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use tapmesh_tests::{
    eds::{self, udp_vip_cluster, wait_ack, wait_nonce_ack, weighted},
    kernel_tests_enabled,
    net::{send_udp_flows, wait_until, UdpReceiver, CLIENT},
    xds_peer::{Cla, Ep, Loc},
};

const VIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 30);
const FLOWS: u16 = 2000;
const VIP2: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 31);
/// The daemon's metrics and probes, in its namespace.
const METRICS: &str = "127.0.0.1:9843";

/// The lab's two targets' addresses, as the control plane names them.
fn addresses(lab: &tapmesh_tests::net::LbLab) -> (String, String) {
    let address = |i: usize| lab.targets[i].address.to_string();
    (address(0), address(1))
}

/// A UDP receiver on port 7000 of each VIP in each target, target by
/// target: [first via vips[0], first via vips[1], second via vips[0], …].
fn receivers(lab: &tapmesh_tests::net::LbLab, vips: [Ipv4Addr; 2]) -> Vec<UdpReceiver> {
    lab.targets
        .iter()
        .flat_map(|t| {
            vips.map(|vip| UdpReceiver::start(&t.netns.name, SocketAddrV4::new(vip, 7000)))
        })
        .collect()
}

#[test]
fn eds_endpoints_feed_a_vip_and_weights_split_real_traffic() {
    if !kernel_tests_enabled() {
        return;
    }
    let (lab, mut cp) = eds::lab(&[VIP], &udp_vip_cluster("svc", VIP));
    let (a, b) = addresses(&lab);
    cp.set("1", &[("svc", weighted(&[(&a, 5000, 3), (&b, 5000, 1)]))]);
    // The ACK comes once the maps hold the endpoints.
    wait_ack(&cp, "1");
    let listing = lab.daemon().cli(&["catalog", "list"]);
    assert!(
        listing.contains("svc (from eds) vip 203.0.113.30"),
        "{listing}"
    );
    assert!(
        listing.contains(&format!("{a}:5000 weight 3 priority 0 slots 3")),
        "{listing}"
    );
    assert!(
        listing.contains(&format!("{b}:5000 weight 1 priority 0 slots 1")),
        "{listing}"
    );

    let rx: Vec<UdpReceiver> = lab
        .targets
        .iter()
        .map(|t| UdpReceiver::start(&t.netns.name, SocketAddrV4::new(VIP, 7000)))
        .collect();
    let counts = || rx.iter().map(UdpReceiver::count).collect::<Vec<u64>>();
    let total = |c: &[u64]| c.iter().sum::<u64>();
    let ports: Vec<u16> = (20000..20000 + FLOWS).collect();
    // One datagram from each of the first `n` ports.
    let send = |n: usize| {
        send_udp_flows(
            &lab.client.name,
            CLIENT,
            &ports[..n],
            SocketAddrV4::new(VIP, 7000),
            1,
            b"eds",
        )
    };
    send(ports.len());
    assert!(
        wait_until(Duration::from_secs(30), || total(&counts()) == FLOWS as u64),
        "{:?}",
        counts()
    );
    let split = counts();
    assert_eq!(split.iter().sum::<u64>(), FLOWS as u64, "{split:?}");
    let heavy = split[0] as f64 / FLOWS as f64;
    assert!((0.68..=0.82).contains(&heavy), "weight 3:1 gave {split:?}");

    // An invalid assignment is NACKed and the maps keep the last good endpoints.
    cp.set(
        "2",
        &[("svc", Cla::single(vec![Ep::new("not-an-ip", 5000)]))],
    );
    let nack = cp.wait_request(Duration::from_secs(20), "NACK of version 2", |r| {
        r.error_detail.is_some()
    });
    assert_eq!(nack.version_info, "1");
    send(100);
    assert!(wait_until(Duration::from_secs(30), || total(&counts())
        == FLOWS as u64 + 100));
    let now = counts();
    assert!(
        now[0] > split[0] && now[1] >= split[1],
        "still the old endpoints: {now:?}"
    );

    // An update to one endpoint moves everything to it.
    cp.set("3", &[("svc", Cla::single(vec![Ep::new(&b, 5000)]))]);
    wait_ack(&cp, "3");
    let before = counts();
    send(200);
    assert!(wait_until(Duration::from_secs(30), || total(&counts())
        == total(&before) + 200));
    let after = counts();
    assert_eq!(after[0], before[0], "the removed backend gets nothing");
    assert_eq!(after[1], before[1] + 200);

    // drop_overloads are not applied (Envoy drops requests; these are
    // flows): said once per new policy, and every flow still gets through.
    let mut with_drops = Cla::single(vec![Ep::new(&b, 5000)]);
    with_drops.drops = vec![("overload".into(), 500_000)];
    cp.set("4", &[("svc", with_drops)]);
    wait_ack(&cp, "4");
    let mut with_drops = Cla::single(vec![Ep::new(&b, 5000).weight(2)]);
    with_drops.drops = vec![("overload".into(), 500_000)];
    cp.set("5", &[("svc", with_drops)]);
    wait_ack(&cp, "5");
    let warned = lab
        .daemon()
        .log_text()
        .matches("drop_overloads (overload 500000 ppm) are served to proxies")
        .count();
    assert_eq!(warned, 1, "{}", lab.daemon().log_text());
    send(200);
    assert!(wait_until(Duration::from_secs(30), || total(&counts())
        == total(&after) + 200));
}

/// A kept dataplane restarted while the xDS server is away lost every packet
/// to the EDS VIP: its first write had no endpoints for it, and after
/// `missing_after` it was applied empty. The endpoints of the last accepted
/// write are kept in the state directory and written before the client
/// starts; they stay until the server sends the cluster.
#[test]
fn a_restart_without_the_server_keeps_the_last_endpoints() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut lab = tapmesh_tests::net::LbLab::new(2, &[VIP]);
    let cp = tapmesh_tests::xds_peer::ControlPlane::start_in(&lab.node.name, false);
    let state = tapmesh_tests::TempDir::new("tmeds");
    let config = state.0.join("daemon.toml");
    std::fs::write(
        &config,
        format!(
            "[metrics]\nlisten = \"{METRICS}\"\n\
             [xds]\nserver = \"{}\"\nnode_id = \"node-1\"\nmissing_after = \"2s\"\n{}",
            cp.address(),
            udp_vip_cluster("svc", VIP)
        ),
    )
    .unwrap();
    let args: Vec<String> = [
        "--config",
        config.to_str().unwrap(),
        "--state-dir",
        state.0.join("state").to_str().unwrap(),
        "--keep-dataplane",
    ]
    .map(String::from)
    .to_vec();
    lab.start_with(None, &args);
    let mut cp = cp;
    let port = cp.port();
    let (a, b) = addresses(&lab);
    cp.set("1", &[("svc", weighted(&[(&a, 7000, 1), (&b, 7000, 1)]))]);
    wait_ack(&cp, "1");
    let before = lab.spread(VIP);
    assert_eq!(before.iter().sum::<u64>(), 200, "{before:?}");
    assert!(before.iter().all(|&n| n > 0), "{before:?}");

    // A steady flow across the restart loses nothing: the new daemon's
    // first write waits for the kept endpoints (before, it swept the EDS
    // VIP out of the kept maps until the catalog wrote it again).
    let rx: Vec<UdpReceiver> = lab
        .targets
        .iter()
        .map(|t| UdpReceiver::start(&t.netns.name, SocketAddrV4::new(VIP, 7000)))
        .collect();
    let sender = tapmesh_tests::net::steady_udp(
        &lab.client.name,
        SocketAddrV4::new(VIP, 7000),
        Duration::from_micros(500),
    );
    std::thread::sleep(Duration::from_secs(1));
    let root = lab.stop_keeping_pins();
    cp.kill();
    let at_stop = sender.sent();
    lab.start_at(&root, &args);
    // A second of the new daemon's own under the flow too.
    std::thread::sleep(Duration::from_secs(1));
    let sent = sender.finish();
    assert!(
        sent > at_stop + 1000,
        "{at_stop} then {sent}: the flow stalled"
    );
    let arrived = || rx.iter().map(UdpReceiver::count).sum::<u64>();
    assert!(
        wait_until(Duration::from_secs(30), || arrived() == sent),
        "{} of {sent} datagrams arrived across the restart",
        arrived()
    );
    drop(rx);

    // At once, and past `missing_after`: the same split, flow for flow.
    assert_eq!(lab.spread(VIP), before);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(lab.spread(VIP), before);
    let listing = lab.daemon().cli(&["catalog", "list"]);
    assert!(listing.contains(&format!("{a}:7000 weight 1")), "{listing}");

    // The server comes back without the cluster (deleted while the node was
    // away): once it was reached and `missing_after` passed, the plane is
    // synced and the node ready, with the kept endpoints still in place
    // (before, it stayed unsynced and /readyz said 503 for good).
    let scrape = || tapmesh_tests::scrape::scrape(&lab.node.name, METRICS);
    assert_eq!(scrape().readyz.0, 503);
    let cp = tapmesh_tests::xds_peer::ControlPlane::start_in_on(&lab.node.name, port, false);
    cp.wait_request(Duration::from_secs(60), "the subscription", |r| {
        r.resource_names == ["svc"]
    });
    let ready = wait_until(Duration::from_secs(30), || scrape().readyz.0 == 200);
    assert!(ready, "{:?}", scrape().readyz);
    assert_eq!(lab.spread(VIP), before);
}

/// The daemon's default (`protocol = "auto"`) against a server with Delta:
/// it subscribes over Delta; each change is applied with real packets
/// following it, and a cluster the server removes stops taking traffic.
#[test]
fn delta_eds_changes_and_removals_reach_the_maps() {
    if !kernel_tests_enabled() {
        return;
    }
    let clusters = udp_vip_cluster("svc", VIP) + &udp_vip_cluster("other", VIP2);
    let (lab, mut cp) = eds::lab_of(&[VIP, VIP2], &clusters, true);
    let (a, b) = addresses(&lab);
    cp.set(
        "1",
        &[
            ("svc", Cla::single(vec![Ep::new(&a, 5000)])),
            ("other", Cla::single(vec![Ep::new(&b, 5000)])),
        ],
    );
    let ack = wait_nonce_ack(&cp, "1");
    assert_eq!(ack.method, "delta_eds");
    let rx = receivers(&lab, [VIP, VIP2]);
    // rx: [a via VIP, a via VIP2, b via VIP, b via VIP2]
    let counts = || rx.iter().map(UdpReceiver::count).collect::<Vec<u64>>();
    let send_within = |vip: Ipv4Addr, n: u16, within: Duration| {
        let before: u64 = counts().iter().sum();
        let ports: Vec<u16> = (30000..30000 + n).collect();
        send_udp_flows(
            &lab.client.name,
            CLIENT,
            &ports,
            SocketAddrV4::new(vip, 7000),
            1,
            b"delta",
        );
        wait_until(within, || {
            counts().iter().sum::<u64>() == before + u64::from(n)
        });
    };
    let send = |vip: Ipv4Addr, n: u16| send_within(vip, n, Duration::from_secs(30));
    send(VIP, 100);
    send(VIP2, 50);
    assert_eq!(counts(), vec![100, 0, 0, 50]);

    // svc moves to b: only svc is sent, and its traffic follows.
    cp.set("2", &[("svc", Cla::single(vec![Ep::new(&b, 5000)]))]);
    wait_nonce_ack(&cp, "2");
    assert_eq!(cp.responses().last().unwrap().clusters, vec!["svc"]);
    send(VIP, 100);
    assert_eq!(counts(), vec![100, 0, 100, 50]);

    // "other" is removed: its VIP reaches no target any more.
    cp.remove("3", &["other"]);
    wait_nonce_ack(&cp, "3");
    assert_eq!(cp.responses().last().unwrap().removed, vec!["other"]);
    // None arrive: the wait is a quiet period.
    send_within(VIP2, 50, Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(300));
    send(VIP, 10);
    assert_eq!(counts(), vec![100, 0, 110, 50]);
    assert!(cp
        .requests()
        .iter()
        .all(|r| r.method == "delta_eds" && r.error_detail.is_none()));
}

/// A response whose assignments the maps cannot hold together is NACKed
/// as a whole: none of its clusters reaches the maps, also those that
/// would have fit alone (written one at a time, the first stayed while
/// the NACK said the previous version holds).
#[test]
fn a_response_refused_at_write_time_leaves_every_cluster_as_it_was() {
    if !kernel_tests_enabled() {
        return;
    }
    // Room for one stream of 100 slots beside a small one, not for two.
    let clusters = udp_vip_cluster("svc", VIP)
        + &udp_vip_cluster("other", VIP2)
        + "[dataplane]\nmaglev_entries = 16384\n";
    let (lab, mut cp) = eds::lab(&[VIP, VIP2], &clusters);
    let (a, b) = addresses(&lab);
    cp.set(
        "1",
        &[
            ("svc", Cla::single(vec![Ep::new(&a, 5000)])),
            ("other", Cla::single(vec![Ep::new(&a, 5000)])),
        ],
    );
    wait_ack(&cp, "1");
    let heavy = || {
        Cla::single(vec![
            Ep::new(&a, 5000).weight(1),
            Ep::new(&b, 5000).weight(99),
        ])
    };
    cp.set("2", &[("svc", heavy()), ("other", heavy())]);
    let nack = cp.wait_request(Duration::from_secs(20), "NACK of version 2", |r| {
        r.error_detail.is_some()
    });
    assert_eq!(nack.version_info, "1", "{nack:?}");
    let why = nack.error_detail.unwrap();
    assert!(why.contains("maglev_entries"), "{why}");

    // Every flow to either VIP still reaches a alone, as version 1 says.
    let rx = receivers(&lab, [VIP, VIP2]);
    let counts = || rx.iter().map(UdpReceiver::count).collect::<Vec<u64>>();
    for (vip, from) in [(VIP, 30000), (VIP2, 31000)] {
        let ports: Vec<u16> = (from..from + 100).collect();
        send_udp_flows(
            &lab.client.name,
            CLIENT,
            &ports,
            SocketAddrV4::new(vip, 7000),
            1,
            b"whole",
        );
    }
    wait_until(Duration::from_secs(30), || {
        counts().iter().sum::<u64>() == 200
    });
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        counts(),
        vec![100, 100, 0, 0],
        "[a via VIP, a via VIP2, b, b]"
    );
}

/// A backend on the node's network with no neighbour entry (the node never
/// sent it a packet) is left out of the first write, then resolved: the
/// daemon asks the kernel (as a packet for it would), and the next look
/// (once a second) writes it in. Before, it stayed out until the cluster
/// changed.
#[test]
fn a_backend_without_a_neighbour_entry_is_resolved_and_takes_traffic() {
    if !kernel_tests_enabled() {
        return;
    }
    let (lab, mut cp) = eds::lab(&[VIP], &udp_vip_cluster("svc", VIP));
    let (a, b) = addresses(&lab);
    // The lab's static entry for b goes: no entry, as on a fresh node.
    lab.node
        .ip(&["neigh", "del", &b, "dev", &lab.targets[1].node_if]);
    cp.set("1", &[("svc", weighted(&[(&a, 7000, 1), (&b, 7000, 1)]))]);
    wait_ack(&cp, "1");
    let resolved = wait_until(Duration::from_secs(15), || {
        lab.daemon()
            .cli(&["catalog", "list"])
            .contains(&format!("{b}:7000 weight 1 priority 0 slots 1"))
    });
    assert!(resolved, "{}", lab.daemon().cli(&["catalog", "list"]));
    // It was left out first, and the kernel asked for it.
    let asked = format!("asked the kernel to resolve a backend backend={b}");
    assert!(
        lab.daemon().log_text().contains(&asked),
        "{}",
        lab.daemon().log_text()
    );
    let spread = lab.spread(VIP);
    assert!(spread.iter().all(|&n| n > 0), "{spread:?}");
}

/// Localities without weights and DEGRADED endpoints, as Envoy reads them:
/// without locality weights each endpoint shares by its own weight across
/// the priority (not by locality first); DEGRADED endpoints take the
/// traffic only when no endpoint is healthy.
#[test]
fn unweighted_localities_and_degraded_endpoints_split_traffic_as_envoy() {
    if !kernel_tests_enabled() {
        return;
    }
    const FLOWS: u16 = 1000;
    let more = format!(
        "{}[metrics]\nlisten = \"{METRICS}\"\n",
        udp_vip_cluster("svc", VIP)
    );
    let (lab, mut cp) = eds::lab(&[VIP], &more);
    let (a, b) = addresses(&lab);
    let rx: Vec<UdpReceiver> = lab
        .targets
        .iter()
        .map(|t| UdpReceiver::start(&t.netns.name, SocketAddrV4::new(VIP, 7000)))
        .collect();
    let counts = || rx.iter().map(UdpReceiver::count).collect::<Vec<u64>>();
    // One datagram from each of FLOWS new ports; what each target got.
    let mut next_port = 20000;
    let mut send = || {
        let before = counts();
        let ports: Vec<u16> = (next_port..next_port + FLOWS).collect();
        next_port += FLOWS;
        send_udp_flows(
            &lab.client.name,
            CLIENT,
            &ports,
            SocketAddrV4::new(VIP, 7000),
            1,
            b"loc",
        );
        let total = |c: &[u64]| c.iter().sum::<u64>();
        let expected = total(&before) + u64::from(FLOWS);
        assert!(
            wait_until(Duration::from_secs(30), || total(&counts()) == expected),
            "{:?}",
            counts()
        );
        let now = counts();
        [now[0] - before[0], now[1] - before[1]]
    };
    let listing = || lab.daemon().cli(&["catalog", "list"]);

    // a alone in zone x, b (weight 3) in zone y, no locality weights: 1:3.
    // Split by locality first, a would get half.
    let split_zones = Cla {
        localities: vec![
            Loc::new("x", 0, vec![Ep::new(&a, 5000)]),
            Loc::new("y", 0, vec![Ep::new(&b, 5000).weight(3)]),
        ],
        ..Default::default()
    };
    cp.set("1", &[("svc", split_zones)]);
    wait_ack(&cp, "1");
    let l = listing();
    assert!(
        l.contains(&format!("{a}:5000 weight 1 priority 0 slots 1 locality x")),
        "{l}"
    );
    assert!(
        l.contains(&format!("{b}:5000 weight 3 priority 0 slots 3 locality y")),
        "{l}"
    );
    let got = send();
    let light = got[0] as f64 / f64::from(FLOWS);
    assert!((0.17..=0.33).contains(&light), "1:3 gave {got:?}");
    // Each endpoint's targets (one per identifier) carry its address: their
    // packets add up to what it received.
    let scrape = tapmesh_tests::scrape::scrape(&lab.node.name, METRICS);
    for (endpoint, received, targets) in [(&a, got[0], 1), (&b, got[1], 3)] {
        let endpoint = format!("{endpoint}:5000");
        let series: Vec<u64> = scrape
            .samples
            .iter()
            .filter(|(n, l, _)| {
                n == "tapmesh_target_packets_total"
                    && l.get("endpoint") == Some(&endpoint)
                    && l.get("target").is_some_and(|t| t.starts_with("eds.svc/"))
            })
            .map(|(_, _, v)| *v as u64)
            .collect();
        assert_eq!(series.len(), targets, "{endpoint}: {series:?}");
        assert_eq!(
            series.iter().sum::<u64>(),
            received,
            "{endpoint}: {series:?}"
        );
    }

    // Nothing healthy: the DEGRADED endpoint takes every flow.
    let degraded = |b_health: &str| Cla {
        localities: vec![
            Loc::new("x", 0, vec![Ep::new(&a, 5000).health("DEGRADED")]),
            Loc::new("y", 0, vec![Ep::new(&b, 5000).health(b_health)]),
        ],
        ..Default::default()
    };
    cp.set("2", &[("svc", degraded("UNHEALTHY"))]);
    wait_ack(&cp, "2");
    let l = listing();
    assert!(
        l.contains(&format!(
            "{a}:5000 weight 1 priority 0 slots 1 DEGRADED locality x"
        )),
        "{l}"
    );
    assert!(
        l.contains(&format!(
            "{b}:5000 weight 1 priority 0 UNHEALTHY locality y"
        )),
        "{l}"
    );
    assert_eq!(send(), [u64::from(FLOWS), 0]);

    // A healthy endpoint back: the DEGRADED one is idle again.
    cp.set("3", &[("svc", degraded("HEALTHY"))]);
    wait_ack(&cp, "3");
    let l = listing();
    assert!(
        l.contains(&format!("{a}:5000 weight 1 priority 0 DEGRADED locality x")),
        "{l}"
    );
    assert_eq!(send(), [0, u64::from(FLOWS)]);
}
