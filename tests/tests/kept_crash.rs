//! A kept dataplane survives a daemon killed without a stop: with
//! keep_dataplane the uplink's XDP link is pinned when it is attached, so
//! SIGKILL leaves forwarding running and the next start adopts the link.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use tapmesh::lb::model::LbSpec;
use tapmesh_tests::{
    kernel_tests_enabled,
    net::{flow, steady_udp, stream, vip, LbLab, UdpReceiver},
};

const VIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const PORT: u16 = 5000;
/// 2 kpps: one datagram every 500 µs.
const GAP: Duration = Duration::from_micros(500);

#[test]
fn a_killed_daemon_with_keep_dataplane_loses_no_packet_and_the_next_start_adopts_it() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut lab = LbLab::new(1, &[VIP]);
    let spec = LbSpec {
        vips: vec![vip("vip", &VIP.to_string())],
        streams: vec![stream("s", 10)],
        flows: vec![flow("f", &["vip"], "s", &["udp"])],
        targets: vec![lab.targets[0].local("s", 1)],
    };
    lab.start_with(Some(&spec), &["--keep-dataplane".into()]);
    let receiver = UdpReceiver::start(&lab.targets[0].netns.name, SocketAddrV4::new(VIP, PORT));
    let sender = steady_udp(&lab.client.name, SocketAddrV4::new(VIP, PORT), GAP);
    // After 5 s: SIGKILL, and at once a new daemon on the same pins; the
    // flow goes on until the new daemon has run for a few seconds.
    std::thread::sleep(Duration::from_secs(5));
    let before_kill = receiver.count();
    assert!(before_kill > 0, "nothing arrived before the kill");
    lab.kill_and_start(Some(&spec), &["--keep-dataplane".into()]);
    let status = lab.daemon().status();
    assert_eq!(status.attachments[0].mode, "native, kept link replaced");
    std::thread::sleep(Duration::from_secs(3));
    let sent = sender.finish();
    assert!(
        sent > before_kill + 5000,
        "{before_kill} then {sent}: the flow stalled"
    );
    let all = tapmesh_tests::net::wait_until(Duration::from_secs(30), || receiver.count() == sent);
    assert!(
        all,
        "{} of {sent} datagrams arrived ({before_kill} before the kill)",
        receiver.count()
    );
}

/// A kept dataplane restarted with another configuration holds only that
/// configuration's VIPs: a VIP gone from the file no longer matches. Before,
/// its kept entry pointed at a VIP index the new VIP reused, so its traffic
/// went to the new VIP's target.
#[test]
fn a_restart_on_kept_maps_leaves_no_vip_of_the_old_configuration() {
    if !kernel_tests_enabled() {
        return;
    }
    const OTHER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 11);
    let mut lab = LbLab::new(2, &[VIP, OTHER]);
    let old = LbSpec {
        vips: vec![vip("v", &VIP.to_string())],
        streams: vec![stream("s", 10)],
        flows: vec![flow("f", &["v"], "s", &["udp"])],
        targets: vec![lab.targets[0].local("s", 1)],
    };
    lab.start_with(Some(&old), &["--keep-dataplane".into()]);
    assert_eq!(lab.spread(VIP), [200, 0]);
    let new = LbSpec {
        vips: vec![vip("x", &OTHER.to_string())],
        streams: vec![stream("o", 10)],
        flows: vec![flow("g", &["x"], "o", &["udp"])],
        targets: vec![lab.targets[1].local("o", 1)],
    };
    lab.kill_and_start(Some(&new), &["--keep-dataplane".into()]);
    assert_eq!(lab.spread(OTHER), [0, 200]);
    assert_eq!(
        lab.spread_within(VIP, Duration::from_secs(5)),
        [0, 0],
        "the old VIP still matches"
    );
    // The kept host VIP map holds the new VIP alone.
    let pins = lab
        .daemon()
        .bpffs_root
        .join(format!("v{}", tapmesh_common::SCHEMA_VERSION));
    let map = aya::maps::MapData::from_pin(pins.join("tm_vip_hosts")).expect("tm_vip_hosts");
    let hosts: aya::maps::HashMap<_, tapmesh_common::lb::VipAddr, tapmesh_common::lb::VipValue> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(map)).unwrap();
    let addrs: Vec<[u8; 16]> = hosts.keys().map(|k| k.unwrap().addr).collect();
    assert_eq!(addrs, [OTHER.to_ipv6_mapped().octets()]);
}

/// A daemon running with keep_dataplane, its uplink also a TC interface:
/// the lab, the uplink, the pins' root and the admin socket.
fn kept_lab() -> (LbLab, String, std::path::PathBuf, std::path::PathBuf) {
    let mut lab = LbLab::new(0, &[]);
    let uplink = lab.uplink.clone();
    lab.start_with(
        None,
        &[
            "--keep-dataplane".into(),
            "--tc-interface".into(),
            uplink.clone(),
        ],
    );
    let (root, admin) = (lab.daemon().bpffs_root.clone(), lab.daemon().socket.clone());
    (lab, uplink, root, admin)
}

/// `tapmesh cleanup` in the node's namespace: (exit code, stdout, stderr).
fn cleanup(lab: &LbLab, root: &std::path::Path, admin: &std::path::Path) -> (i32, String, String) {
    let out = std::process::Command::new(tapmesh_tests::daemon::tapmesh_bin())
        .args(["cleanup", "--netns", &lab.node.name, "--bpffs-root"])
        .arg(root)
        .arg("--admin-socket")
        .arg(admin)
        .output()
        .expect("tapmesh cleanup");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn cleanup_removes_a_kept_dataplane_without_a_daemon() {
    if !kernel_tests_enabled() {
        return;
    }
    let (mut lab, uplink, root, admin) = kept_lab();
    // Not while a daemon runs.
    let (code, stdout, stderr) = cleanup(&lab, &root, &admin);
    assert_eq!((code, stdout.as_str()), (2, ""), "{stderr}");
    assert!(
        stderr.starts_with("tapmesh: a daemon is running ("),
        "{stderr}"
    );
    // Nor when asked with another admin socket: the daemon holds the maps.
    let elsewhere = root.join("no-such-admin.sock");
    let (code, stdout, stderr) = cleanup(&lab, &root, &elsewhere);
    assert_eq!((code, stdout.as_str()), (2, ""), "{stderr}");
    assert!(stderr.contains("holds the maps pinned under"), "{stderr}");
    assert!(root
        .join(format!("v{}", tapmesh_common::SCHEMA_VERSION))
        .join("links")
        .exists());
    lab.kill_daemon();
    let show = |args: &[&str]| String::from_utf8_lossy(&lab.node.ip(args).stdout).into_owned();
    assert!(
        show(&["link", "show", &uplink]).contains("prog/xdp"),
        "kept XDP gone after SIGKILL"
    );

    let (code, stdout, stderr) = cleanup(&lab, &root, &admin);
    let dir = root.join(format!("v{}", tapmesh_common::SCHEMA_VERSION));
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        stdout,
        format!(
            "XDP link xdp_{uplink} detached\n\
             TC ingress tm_tc_ingress on {uplink} detached\n\
             TC egress tm_tc_egress on {uplink} detached\n\
             clsact on {uplink} removed (left empty)\n\
             pins under {} removed\n",
            dir.display()
        )
    );
    // Nothing left: no XDP, no filter, no clsact, no pin.
    assert!(!show(&["link", "show", &uplink]).contains("xdp"));
    let tc = |args: &[&str]| {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &lab.node.name, "tc"])
            .args(args)
            .output()
            .expect("tc");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(!tc(&["qdisc", "show", "dev", &uplink]).contains("clsact"));
    assert_eq!(tc(&["filter", "show", "dev", &uplink, "ingress"]), "");
    assert_eq!(tc(&["filter", "show", "dev", &uplink, "egress"]), "");
    assert!(!dir.exists(), "{} left", dir.display());
    // A second run finds nothing.
    assert_eq!(cleanup(&lab, &root, &admin).1, "nothing to remove\n");
}

/// `tapmesh cleanup` of one set of pins leaves another running daemon's TC
/// filters alone (their programs use maps a live process holds), on the
/// same namespace's other interface.
#[test]
fn cleanup_leaves_the_tc_filters_of_a_daemon_running_on_other_pins() {
    if !kernel_tests_enabled() {
        return;
    }
    let (mut lab, uplink, root, admin) = kept_lab();
    lab.kill_daemon();
    lab.node
        .ip(&["link", "add", "dm0", "type", "veth", "peer", "name", "dm1"]);
    lab.node.ip(&["link", "set", "dm0", "up"]);
    lab.node.ip(&["link", "set", "dm1", "up"]);
    let (other_root, _) = tapmesh_tests::daemon::Daemon::paths();
    let mut other = tapmesh_tests::daemon::Daemon::start_at(
        &lab.node.name,
        &other_root,
        &["--uplink", "dm0", "--tc-interface", "dm0"],
    );
    let (code, stdout, stderr) = cleanup(&lab, &root, &admin);
    assert_eq!(code, 0, "{stderr}");
    let pid = other.pid();
    for line in [
        format!("TC ingress tm_tc_ingress on {uplink} detached"),
        format!("TC egress tm_tc_egress on {uplink} detached"),
        format!("TC ingress tm_tc_ingress on dm0 left in place: a running daemon's (pid {pid})"),
        format!("TC egress tm_tc_egress on dm0 left in place: a running daemon's (pid {pid})"),
    ] {
        assert!(stdout.lines().any(|l| l == line), "{line:?} in {stdout}");
    }
    let filters = |dir: &str| {
        let out = lab.node.exec(&["tc", "filter", "show", "dev", "dm0", dir]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(filters("ingress").contains("tm_tc_ingress"));
    assert!(filters("egress").contains("tm_tc_egress"));
    assert!(other.stop().success(), "{}", other.log_text());
    assert!(!other.log_text().contains("clsact"), "{}", other.log_text());
    assert_eq!(filters("ingress"), "");
}
