//! The health and metrics listener: after a known number of datagrams through
//! a VIP, `/metrics` (parsed by Prometheus' own OpenMetrics parser) holds
//! exactly what the BPF maps hold (read through the admin API) and exactly
//! the packets sent; `/readyz` waits for every configured control plane.

use std::net::{Ipv4Addr, SocketAddrV4};

use tapmesh::lb::model::LbSpec;
use tapmesh_common::DropReason;
use tapmesh_tests::{
    daemon::{bytes, named, packets, Daemon},
    kernel_tests_enabled,
    net::{
        flow, lb_bytes, lb_packets, send_udp_flows, stream, vip, wait_until, LbLab, UdpReceiver,
        CLIENT,
    },
    scrape::scrape,
    Netns,
};

const VIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const PORT: u16 = 7000;
const LISTEN: &str = "127.0.0.1:9842";

#[test]
fn metrics_equal_the_map_counters_and_the_packets_sent() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut lab = LbLab::new(2, &[VIP]);
    let spec = LbSpec {
        vips: vec![vip("vip", &VIP.to_string())],
        streams: vec![stream("s", 4)],
        flows: vec![flow("udp", &["vip"], "s", &["udp"])],
        targets: lab
            .targets
            .iter()
            .enumerate()
            .map(|(i, t)| t.local("s", i as u32 + 1))
            .collect(),
    };
    lab.start(Some(&spec));
    let daemon = lab.daemon();
    let dst = SocketAddrV4::new(VIP, PORT);
    let receivers: Vec<_> = lab
        .targets
        .iter()
        .map(|t| UdpReceiver::start(&t.netns.name, dst))
        .collect();
    let ports: Vec<u16> = (30_000..30_200).collect();
    let payload = [0x6d; 40];
    let sent = send_udp_flows(&lab.client.name, CLIENT, &ports, dst, 3, &payload);
    assert_eq!(sent, 600);
    assert!(wait_until(std::time::Duration::from_secs(30), || receivers
        .iter()
        .map(UdpReceiver::count)
        .sum::<u64>()
        == sent));
    let frame_len = (14 + 20 + 8 + payload.len()) as u64;

    let s = daemon.status_when(|s| lb_packets(&s.vips, "vip") == sent);
    let m = scrape(&lab.node.name, LISTEN);
    assert_eq!(m.healthz, (200, "ok\n".into()));
    assert_eq!(m.readyz, (200, "ready\n".into()));
    assert!(
        m.content_type.starts_with("application/openmetrics-text"),
        "{}",
        m.content_type
    );
    assert!(m.helps.len() > 10, "{:?}", m.helps);
    for (family, help) in &m.helps {
        assert!(
            !help.is_empty() && !help.ends_with(".."),
            "{family}: {help:?}"
        );
    }

    // The packets sent, exactly.
    assert_eq!(
        m.value("tapmesh_vip_packets_total", &[("vip", "vip")]),
        sent
    );
    assert_eq!(
        m.value("tapmesh_vip_bytes_total", &[("vip", "vip")]),
        sent * frame_len
    );
    assert_eq!(
        m.value("tapmesh_flow_packets_total", &[("flow", "udp")]),
        sent
    );
    assert_eq!(
        m.value("tapmesh_flow_bytes_total", &[("flow", "udp")]),
        sent * frame_len
    );
    let per_target: Vec<u64> = ["s/1", "s/2"]
        .iter()
        .map(|t| m.value("tapmesh_target_packets_total", &[("target", t)]))
        .collect();
    assert_eq!(per_target.iter().sum::<u64>(), sent, "{per_target:?}");
    let redirect = [("program", "xdp_uplink"), ("verdict", "redirect")];
    assert_eq!(m.value("tapmesh_program_packets_total", &redirect), sent);
    assert_eq!(
        m.value("tapmesh_program_bytes_total", &redirect),
        sent * frame_len
    );

    // The maps' counters, exactly (the admin API sums the same per-CPU maps).
    for (name, list, kind) in [
        ("vip", &s.vips, "vip"),
        ("udp", &s.flows, "flow"),
        ("s/1", &s.targets, "target"),
        ("s/2", &s.targets, "target"),
    ] {
        let labels = [(kind, name)];
        assert_eq!(
            m.value(&format!("tapmesh_{kind}_packets_total"), &labels),
            lb_packets(list, name),
            "{kind} {name} packets"
        );
        assert_eq!(
            m.value(&format!("tapmesh_{kind}_bytes_total"), &labels),
            lb_bytes(list, name),
            "{kind} {name} bytes"
        );
    }
    for verdict in ["redirect", "drop", "tx"] {
        let labels = [("program", "xdp_uplink"), ("verdict", verdict)];
        assert_eq!(
            m.value("tapmesh_program_packets_total", &labels),
            packets(&s, "xdp_uplink", verdict),
            "{verdict}"
        );
        assert_eq!(
            m.value("tapmesh_program_bytes_total", &labels),
            bytes(&s, "xdp_uplink", verdict),
            "{verdict} bytes"
        );
    }
    for reason in DropReason::ALL {
        assert_eq!(
            m.value(
                "tapmesh_drop_packets_total",
                &[("program", "xdp_uplink"), ("reason", reason.name())]
            ),
            named(&s, "xdp_uplink", reason.name()),
            "{}",
            reason.name()
        );
    }

    // Everything else a scrape carries.
    for plugin in ["dataplane", "lb", "nsp", "admin", "metrics"] {
        assert_eq!(
            m.value(
                "tapmesh_plugin_state",
                &[("plugin", plugin), ("state", "running")]
            ),
            1,
            "{plugin}"
        );
    }
    assert_eq!(
        m.value(
            "tapmesh_attached",
            &[("interface", &lab.uplink), ("hook", "xdp")]
        ),
        1
    );
    assert_eq!(m.value("tapmesh_lb_entries", &[("kind", "targets")]), 2);
    assert_eq!(
        m.value("tapmesh_registry_targets", &[("status", "enabled")]),
        0
    );
}

/// Readiness and `tapmesh_attached` say what the kernel runs: a program
/// another tool detached is missing there, and `status` says so (found by
/// an independent tester: all three kept saying "attached").
#[test]
fn readiness_and_the_attached_gauge_follow_what_the_kernel_runs() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut lab = LbLab::new(1, &[VIP]);
    lab.start(None);
    let up = lab.uplink.clone();
    let attached = |m: &tapmesh_tests::scrape::Scrape, hook: &str, program: &str| {
        m.value(
            "tapmesh_attached",
            &[("interface", &up), ("hook", hook), ("program", program)],
        )
    };
    let m = scrape(&lab.node.name, LISTEN);
    assert_eq!(m.readyz, (200, "ready\n".into()));
    assert_eq!(attached(&m, "xdp", "tm_xdp_uplink"), 1);
    assert_eq!(attached(&m, "tc-ingress", "tm_tc_tap_out"), 1);

    lab.node
        .exec(&["tc", "filter", "del", "dev", &up, "ingress"]);
    let m = scrape(&lab.node.name, LISTEN);
    assert_eq!(
        m.readyz,
        (
            503,
            format!(
                "not ready: tc-ingress on {up} is no longer attached (tm_tc_tap_out gone from the kernel)\n"
            )
        )
    );
    assert_eq!(attached(&m, "xdp", "tm_xdp_uplink"), 1);
    assert_eq!(attached(&m, "tc-ingress", "tm_tc_tap_out"), 0);
    let status = lab.daemon().cli(&["status"]);
    assert!(
        status.contains(&format!("{up} tc-ingress (gone from the kernel")),
        "{status}"
    );
    // The JSON form says so per attachment.
    let json: serde_json::Value =
        serde_json::from_str(&lab.daemon().cli(&["status", "-o", "json"])).expect("JSON");
    let gone: Vec<(String, bool)> = json["attachments"]
        .as_array()
        .expect("attachments")
        .iter()
        .map(|a| {
            (
                a["hook"].as_str().unwrap_or_default().to_string(),
                a["gone"] == true,
            )
        })
        .collect();
    assert_eq!(gone, [("xdp".into(), false), ("tc-ingress".into(), true)]);
}

#[test]
fn readiness_waits_for_the_xds_server_and_says_why() {
    if !kernel_tests_enabled() {
        return;
    }
    let node = Netns::new("n");
    let config = std::env::temp_dir().join(format!("{}.toml", tapmesh_tests::unique("tmxds")));
    // Nothing listens on port 9 of the namespace's loopback.
    std::fs::write(
        &config,
        "[xds]\nserver = \"http://127.0.0.1:9\"\nmissing_after = \"1s\"\n\
         [[xds.clusters]]\nname = \"svc\"\nvip = \"203.0.113.9\"\n",
    )
    .unwrap();
    let daemon = Daemon::start(&node.name, &["--config", config.to_str().unwrap()]);
    let mut m = scrape(&node.name, LISTEN);
    assert!(wait_until(std::time::Duration::from_secs(20), || {
        m = scrape(&node.name, LISTEN);
        m.readyz.1.contains("refused")
    }));
    let _ = std::fs::remove_file(&config);
    assert_eq!(m.healthz.0, 200);
    assert_eq!(m.readyz.0, 503, "{:?}", m.readyz);
    assert!(
        m.readyz
            .1
            .starts_with("not ready: xds: connecting: transport error: "),
        "{:?}",
        m.readyz
    );
    assert_eq!(
        m.value("tapmesh_control_plane_connected", &[("plane", "xds")]),
        0
    );
    assert_eq!(
        m.value("tapmesh_control_plane_synced", &[("plane", "xds")]),
        0
    );
    // The cluster is applied as empty after `missing_after`, but a server
    // never reached has not said it has none: still not ready (an
    // independent tester found it ready after 15 s).
    std::thread::sleep(std::time::Duration::from_millis(2500));
    assert!(wait_until(std::time::Duration::from_secs(30), || daemon
        .log_text()
        .contains(
            "no ClusterLoadAssignment within 1s: applying it as empty"
        )));
    let m = scrape(&node.name, LISTEN);
    assert_eq!(m.readyz.0, 503, "{:?}", m.readyz);
    assert_eq!(
        m.value("tapmesh_control_plane_synced", &[("plane", "xds")]),
        0
    );
    drop(daemon);
}

/// A server that has nothing to send yet (an unchanged snapshot after its
/// restart sends no headers either): the plane is connected and says it
/// subscribed, not the last error or "not started" (found by an
/// independent tester: "Connection refused" stayed while the stream was open).
#[test]
fn a_stream_open_without_a_response_is_connected_and_says_so() {
    if !kernel_tests_enabled() {
        return;
    }
    let node = Netns::new("n");
    let cp = tapmesh_tests::xds_peer::ControlPlane::start_in(&node.name, false);
    let config = std::env::temp_dir().join(format!("{}.toml", tapmesh_tests::unique("tmxds")));
    std::fs::write(
        &config,
        format!(
            "[xds]\nserver = \"{}\"\nprotocol = \"sotw\"\n\
             [[xds.clusters]]\nname = \"svc\"\nvip = \"203.0.113.9\"\n",
            cp.address()
        ),
    )
    .unwrap();
    let daemon = Daemon::start(&node.name, &["--config", config.to_str().unwrap()]);
    let _ = std::fs::remove_file(&config);
    cp.wait_request(
        std::time::Duration::from_secs(30),
        "the subscription",
        |r| r.response_nonce.is_empty(),
    );
    let want = format!(
        "not ready: xds: subscribing at {} (sotw): connected, no response yet",
        cp.address()
    );
    // The scraper asks /readyz before /metrics: both must have seen the
    // connection, so wait for the two together.
    let mut m = scrape(&node.name, LISTEN);
    let both = wait_until(std::time::Duration::from_secs(30), || {
        m = scrape(&node.name, LISTEN);
        m.value("tapmesh_control_plane_connected", &[("plane", "xds")]) == 1
            && m.readyz.1.trim() == want
    });
    assert!(both, "{:?}", m.readyz);
    assert_eq!((m.readyz.0, m.readyz.1.trim()), (503, want.as_str()));
    drop(daemon);
}

#[test]
fn idle_and_slow_connections_are_closed_and_leave_room_for_the_probes() {
    if !kernel_tests_enabled() {
        return;
    }
    let node = Netns::new("n");
    let daemon = Daemon::start(&node.name, &[]);
    let (probe, closed) = tapmesh_tests::net::run_in(&node.name, || {
        use std::io::{Read, Write};
        use std::net::TcpStream;
        use std::time::{Duration, Instant};
        // More connections than the listener serves at once, sending
        // nothing, and one that stops half way through its headers.
        let mut idle: Vec<TcpStream> = (0..40)
            .map(|_| TcpStream::connect(LISTEN).unwrap())
            .collect();
        idle[0]
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            .unwrap();
        let start = Instant::now();
        let mut probe = TcpStream::connect(LISTEN).unwrap();
        probe
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        probe
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut answer = String::new();
        let _ = probe.read_to_string(&mut answer);
        let probe = (
            answer.lines().next().unwrap_or("").to_string(),
            start.elapsed(),
        );
        // The daemon closes each of them: the oldest for the later ones,
        // the rest within 5 s: a read ends (EOF or reset), not a timeout.
        std::thread::sleep(Duration::from_secs(14).saturating_sub(start.elapsed()));
        let closed = idle
            .iter_mut()
            .map(|c| {
                c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let mut rest = Vec::new();
                // A reset counts: a connection closed with its request
                // unread (an evicted one) ends that way.
                match c.read_to_end(&mut rest) {
                    Ok(_) => true,
                    Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
                }
            })
            .filter(|&ended| ended)
            .count();
        (probe, closed)
    });
    assert_eq!(probe.0, "HTTP/1.1 200 OK", "{probe:?}");
    // It takes the oldest one's place at once (kubelet waits 1 s).
    assert!(probe.1 < std::time::Duration::from_secs(1), "{probe:?}");
    assert_eq!(closed, 40);
    drop(daemon);
}

/// In cluster mode the node is ready once it has listed the cluster and
/// watches it, not before (an independent tester found it ready with etcd
/// unreachable).
#[test]
fn readiness_waits_for_etcd_in_cluster_mode() {
    if !kernel_tests_enabled() {
        return;
    }
    let node = Netns::new("n");
    let mut etcd = tapmesh_tests::etcd::Etcd::new_in(&node.name);
    etcd.stop();
    let config = std::env::temp_dir().join(format!("{}.toml", tapmesh_tests::unique("tmcl")));
    std::fs::write(
        &config,
        format!(
            "[cluster]\netcd_endpoints = [\"{}\"]\nnode_name = \"n1\"\n",
            etcd.endpoint
        ),
    )
    .unwrap();
    let daemon = Daemon::start(&node.name, &["--config", config.to_str().unwrap()]);
    let _ = std::fs::remove_file(&config);
    let mut m = scrape(&node.name, LISTEN);
    assert!(wait_until(std::time::Duration::from_secs(20), || {
        m = scrape(&node.name, LISTEN);
        m.readyz.1.contains("etcd")
    }));
    assert_eq!(m.readyz.0, 503, "{:?}", m.readyz);
    assert!(
        m.readyz.1.starts_with(&format!(
            "not ready: cluster: etcd [\"{}\"]: ",
            etcd.endpoint
        )),
        "{:?}",
        m.readyz
    );
    assert_eq!(
        m.value("tapmesh_control_plane_connected", &[("plane", "cluster")]),
        0
    );
    assert_eq!(
        m.value("tapmesh_control_plane_synced", &[("plane", "cluster")]),
        0
    );

    etcd.start();
    assert!(
        wait_until(std::time::Duration::from_secs(30), || {
            m = scrape(&node.name, LISTEN);
            m.readyz.0 == 200
        }),
        "{:?}",
        m.readyz
    );
    assert_eq!(
        m.value("tapmesh_control_plane_synced", &[("plane", "cluster")]),
        1
    );
    drop(daemon);
}
