//! The daemon end to end in network namespaces: real packets through the
//! attached XDP and TC programs, counted exactly and read back through the
//! admin API; clean detach on SIGTERM; bad configurations refused.

use std::process::Command;

use tapmesh_tests::{
    daemon::{bytes, named, packets, tapmesh_bin, Daemon},
    frames::{self, ethernet, ipv4, set_ipv4_total_length, udp_v4},
    kernel_tests_enabled, link, send_frames, sh, Netns,
};

/// A node namespace and a peer namespace joined by one veth pair.
struct Lab {
    node: Netns,
    peer: Netns,
    node_if: String,
    peer_if: String,
}

impl Lab {
    fn new() -> Self {
        let node = Netns::new("n");
        let peer = Netns::new("p");
        let (n, p) = link(&node, "198.18.0.1/24", &peer, "198.18.0.2/24");
        Lab {
            node,
            peer,
            node_if: n.interface,
            peer_if: p.interface,
        }
    }

    fn xdp_attached(&self) -> bool {
        self.xdp_on(&self.node_if)
    }

    fn xdp_on(&self, interface: &str) -> bool {
        let out = self.node.ip(&["link", "show", interface]);
        String::from_utf8_lossy(&out.stdout).contains("prog/xdp")
    }

    fn tc_filters(&self) -> String {
        self.tc_filters_on(&self.node_if)
    }

    /// `tc filter show` of both hooks of a node interface.
    fn tc_filters_on(&self, interface: &str) -> String {
        let mut text = String::new();
        for dir in ["ingress", "egress"] {
            let out = sh(
                "tc",
                &[
                    "-n",
                    &self.node.name,
                    "filter",
                    "show",
                    "dev",
                    interface,
                    dir,
                ],
            );
            text.push_str(&String::from_utf8_lossy(&out.stdout));
        }
        text
    }

    fn ping(&self, count: u32) {
        let n = count.to_string();
        let out =
            self.peer
                .try_exec(&["ping", "-c", &n, "-i", "0.1", "-W", "2", "-q", "198.18.0.1"]);
        assert!(
            out.status.success(),
            "ping failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }

    /// IPv4/UDP frames from the peer to the node, cut or bent as asked.
    fn frame(&self) -> Vec<u8> {
        let dst = self.node.mac(&self.node_if);
        let src = self.peer.mac(&self.peer_if);
        let (a, b) = ("198.18.0.2".parse().unwrap(), "198.18.0.1".parse().unwrap());
        ethernet(
            dst,
            src,
            &[],
            0x0800,
            &ipv4(
                a,
                b,
                frames::UDP,
                &[],
                &udp_v4(a, b, 5000, 9, b"0123456789"),
            ),
        )
    }
}

#[test]
fn real_packets_are_counted_exactly_and_sigterm_detaches_everything() {
    if !kernel_tests_enabled() {
        return;
    }
    let lab = Lab::new();
    let mut daemon = Daemon::start(
        &lab.node.name,
        &["--uplink", &lab.node_if, "--tc-interface", &lab.node_if],
    );

    let status = daemon.status();
    let hooks: Vec<_> = status
        .attachments
        .iter()
        .map(|a| (a.hook.as_str(), a.program.as_str()))
        .collect();
    assert_eq!(
        hooks,
        [
            ("xdp", "tm_xdp_uplink"),
            ("tc-ingress", "tm_tc_ingress"),
            ("tc-egress", "tm_tc_egress")
        ]
    );
    assert_eq!(
        status.attachments[0].mode, "native",
        "veth takes native XDP"
    );
    assert!(
        status.plugins.iter().all(|p| p.state == 4),
        "all running: {:?}",
        status.plugins
    );
    assert!(lab.xdp_attached());

    // Five echo requests in, five replies out.
    lab.ping(5);
    // Three frames with a bad IPv4 header length, two with a UDP header cut short.
    let good = lab.frame();
    let mut bad_ihl = good.clone();
    bad_ihl[14] = 0x43;
    let mut cut_udp = good[..14 + 20 + 4].to_vec();
    set_ipv4_total_length(&mut cut_udp, 14, 24);
    send_frames(
        &lab.peer.name,
        &lab.peer_if,
        &[
            bad_ihl.clone(),
            bad_ihl.clone(),
            bad_ihl,
            cut_udp.clone(),
            cut_udp,
        ],
    );

    let s = daemon.status_when(|s| {
        packets(s, "xdp_uplink", "drop") >= 5 && packets(s, "tc_egress", "pass") >= 5
    });
    assert_eq!(packets(&s, "xdp_uplink", "pass"), 5, "{s:#?}");
    assert_eq!(bytes(&s, "xdp_uplink", "pass"), 5 * 98);
    assert_eq!(packets(&s, "xdp_uplink", "drop"), 5);
    assert_eq!(
        bytes(&s, "xdp_uplink", "drop"),
        3 * good.len() as u64 + 2 * 38
    );
    assert_eq!(named(&s, "xdp_uplink", "bad_ipv4_header_length"), 3);
    assert_eq!(named(&s, "xdp_uplink", "truncated_udp"), 2);
    assert_eq!(named(&s, "xdp_uplink", "icmp"), 5);
    // TC ingress sees what XDP passed; TC egress sees the replies.
    assert_eq!(packets(&s, "tc_ingress", "pass"), 5);
    assert_eq!(packets(&s, "tc_ingress", "drop"), 0);
    assert_eq!(packets(&s, "tc_egress", "pass"), 5);
    assert_eq!(bytes(&s, "tc_egress", "pass"), 5 * 98);
    for program in ["xdp_uplink", "tc_ingress", "tc_egress"] {
        for verdict in ["redirect", "tx", "aborted"] {
            assert_eq!(packets(&s, program, verdict), 0, "{program} {verdict}");
        }
    }

    // bpftool sees the programs by name and the counters with field names.
    let progs = String::from_utf8_lossy(
        &Command::new("bpftool")
            .args(["prog", "show"])
            .output()
            .unwrap()
            .stdout,
    )
    .to_string();
    for name in ["tm_xdp_uplink", "tm_tc_ingress", "tm_tc_egress"] {
        assert!(
            progs.contains(&format!("name {name}")),
            "bpftool prog show lacks {name}"
        );
    }
    let pinned = daemon
        .bpffs_root
        .join(format!("v{}/tm_stats", tapmesh_common::SCHEMA_VERSION));
    let dump = Command::new("bpftool")
        .arg("map")
        .arg("dump")
        .arg("pinned")
        .arg(&pinned)
        .output()
        .unwrap();
    let dump = String::from_utf8_lossy(&dump.stdout);
    for field in [
        "\"verdicts\"",
        "\"pass\"",
        "\"packets\"",
        "\"bad_ipv4_header_length\"",
        "\"icmp\"",
    ] {
        assert!(
            dump.contains(field),
            "bpftool map dump lacks {field}: {dump}"
        );
    }

    let exit = daemon.stop();
    assert!(exit.success(), "daemon exit {exit}: {}", daemon.log_text());
    assert!(!lab.xdp_attached(), "XDP still attached after SIGTERM");
    assert_eq!(lab.tc_filters().trim(), "", "TC filters left after SIGTERM");
    assert!(
        !daemon.bpffs_root.exists(),
        "pins left behind in {}",
        daemon.bpffs_root.display()
    );
    assert!(!daemon.socket.exists(), "admin socket left behind");
}

/// SIGHUP (a closed terminal) stops it as SIGTERM does; its default action
/// killed it with TC programs, pins and sockets left (found by an
/// independent tester).
#[test]
fn sighup_detaches_everything_too() {
    if !kernel_tests_enabled() {
        return;
    }
    let lab = Lab::new();
    // Whatever this test inherited (CI may run under nohup).
    let (root, _) = Daemon::paths();
    let mut daemon = Daemon::start_wrapped(
        &["env", "--default-signal=HUP"],
        &lab.node.name,
        &root,
        &["--uplink", &lab.node_if, "--tc-interface", &lab.node_if],
    );
    assert!(lab.xdp_attached());
    let exit = daemon.stop_with(libc::SIGHUP);
    assert!(exit.success(), "daemon exit {exit}: {}", daemon.log_text());
    assert!(daemon.log_text().contains("SIGHUP: stopping"));
    assert!(!lab.xdp_attached(), "XDP still attached after SIGHUP");
    assert_eq!(lab.tc_filters().trim(), "", "TC filters left after SIGHUP");
    assert!(
        !daemon.bpffs_root.exists(),
        "pins left behind in {}",
        daemon.bpffs_root.display()
    );
    assert!(!daemon.socket.exists(), "admin socket left behind");

    // Under nohup, SIGHUP stays ignored.
    let (root, _) = Daemon::paths();
    let mut kept = Daemon::start_wrapped(
        &["env", "--ignore-signal=HUP"],
        &lab.node.name,
        &root,
        &["--uplink", &lab.node_if],
    );
    // SAFETY: signalling our own child.
    unsafe { libc::kill(kept.pid() as i32, libc::SIGHUP) };
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(lab.xdp_attached(), "stopped by SIGHUP under nohup");
    let _ = kept.status();
    assert!(kept.stop().success(), "{}", kept.log_text());
}

#[test]
fn keep_dataplane_survives_the_daemon_and_a_restart_reuses_the_pins() {
    if !kernel_tests_enabled() {
        return;
    }
    let lab = Lab::new();
    let (root, _) = Daemon::paths();
    let mut first = Daemon::start_at(
        &lab.node.name,
        &root,
        &[
            "--uplink",
            &lab.node_if,
            "--tc-interface",
            &lab.node_if,
            "--keep-dataplane",
        ],
    );
    lab.ping(2);
    assert!(first.stop().success(), "{}", first.log_text());
    assert!(
        lab.xdp_attached(),
        "--keep-dataplane must leave XDP attached"
    );
    assert!(
        lab.tc_filters().contains("tm_tc_ingress"),
        "--keep-dataplane must leave TC attached"
    );
    // Traffic is still counted with no daemon running.
    lab.ping(3);

    let mut second = Daemon::start_at(
        &lab.node.name,
        &root,
        &["--uplink", &lab.node_if, "--tc-interface", &lab.node_if],
    );
    let s = second.status_when(|s| packets(s, "tc_egress", "pass") >= 5);
    assert_eq!(s.attachments[0].mode, "native, kept link replaced");
    assert_eq!(
        packets(&s, "xdp_uplink", "pass"),
        5,
        "counters continue in the pinned map"
    );
    assert_eq!(packets(&s, "tc_egress", "pass"), 5);
    assert!(second.stop().success());
    assert!(!lab.xdp_attached());
    assert_eq!(lab.tc_filters().trim(), "");
    drop(first);
}

/// A kept link stays in the mode it was attached in, so a restart that asks
/// for another mode (`xdp_mode` changed for a rolling update) attaches the
/// program again in that mode; `auto` takes the kept link in either mode.
/// The status names the mode in use either way.
#[test]
fn a_kept_link_in_another_mode_than_asked_is_attached_again_in_that_mode() {
    if !kernel_tests_enabled() {
        return;
    }
    let lab = Lab::new();
    let (root, _) = Daemon::paths();
    let mode = |lab: &Lab| {
        let out = lab.node.ip(&["link", "show", &lab.node_if]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        match (text.contains("xdpgeneric"), text.contains(" xdp ")) {
            (true, _) => "generic",
            (false, true) => "native",
            _ => panic!("no XDP program: {text}"),
        }
    };
    let start = |xdp_mode: &str, keep: bool| {
        let mut args = vec!["--uplink", lab.node_if.as_str(), "--xdp-mode", xdp_mode];
        if keep {
            args.push("--keep-dataplane");
        }
        Daemon::start_at(&lab.node.name, &root, &args)
    };
    let mut first = start("native", true);
    assert_eq!(first.status().attachments[0].mode, "native");
    assert!(first.stop().success(), "{}", first.log_text());
    assert_eq!(mode(&lab), "native", "kept");

    let mut second = start("generic", true);
    assert_eq!(second.status().attachments[0].mode, "generic");
    assert_eq!(mode(&lab), "generic");
    lab.ping(2);
    assert!(second.stop().success(), "{}", second.log_text());

    let mut third = start("auto", false);
    assert_eq!(
        third.status().attachments[0].mode,
        "generic, kept link replaced"
    );
    assert_eq!(mode(&lab), "generic");
    lab.ping(3);
    let s = third.status_when(|s| packets(s, "xdp_uplink", "pass") >= 5);
    assert_eq!(
        packets(&s, "xdp_uplink", "pass"),
        5,
        "ping's echoes, kept counters"
    );
    assert!(third.stop().success(), "{}", third.log_text());
    assert!(!lab.xdp_attached());
    drop((first, second));
}

/// A native XDP program sends back out of a veth uplink only while the
/// peer has NAPI (its own native XDP program, or GRO): the daemon says so
/// at start, naming the peer, and is quiet once GRO is on there.
#[test]
fn a_veth_uplink_whose_peer_cannot_take_xdp_frames_is_named_at_start() {
    if !kernel_tests_enabled() {
        return;
    }
    let lab = Lab::new();
    let warning = "has neither a native XDP program nor GRO on";
    let run = |lab: &Lab| {
        let (root, _) = Daemon::paths();
        let mut d = Daemon::start_at(
            &lab.node.name,
            &root,
            &["--uplink", &lab.node_if, "--xdp-mode", "native"],
        );
        let log = d.log_text();
        assert!(d.stop().success(), "{}", d.log_text());
        log
    };
    lab.peer
        .exec(&["ethtool", "-K", &lab.peer_if, "gro", "off"]);
    let log = run(&lab);
    assert!(
        log.contains(warning) && log.contains(&lab.peer_if),
        "no warning naming {}: {log}",
        lab.peer_if
    );
    lab.peer.exec(&["ethtool", "-K", &lab.peer_if, "gro", "on"]);
    let log = run(&lab);
    assert!(!log.contains(warning), "{log}");
}

/// A second daemon on the pins of a running one is refused before it
/// touches anything: its stop would have removed the first one's pins
/// (an independent tester lost half of a flood that way).
#[test]
fn a_second_daemon_on_the_pins_of_a_running_one_is_refused() {
    if !kernel_tests_enabled() {
        return;
    }
    let lab = Lab::new();
    let (root, _) = Daemon::paths();
    let mut first = Daemon::start_at(&lab.node.name, &root, &["--uplink", &lab.node_if]);
    // The second one on another interface: only the pins are shared.
    lab.node
        .ip(&["link", "add", "dm0", "type", "veth", "peer", "name", "dm1"]);
    lab.node.ip(&["link", "set", "dm0", "up"]);
    let (_, other_socket) = Daemon::paths();
    let (code, stderr) = refused(&[
        "--netns",
        lab.node.name.as_str(),
        "--bpffs-root",
        root.to_str().unwrap(),
        "--admin-socket",
        other_socket.to_str().unwrap(),
        "--node-socket",
        &format!("{}.node", other_socket.display()),
        "--metrics-listen",
        "",
        "--uplink",
        "dm0",
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("is in use by another process")
            && stderr.contains(&first.pid().to_string()),
        "{stderr}"
    );
    // The first one is whole: its pins, its program, its traffic.
    assert!(root
        .join(format!("v{}", tapmesh_common::SCHEMA_VERSION))
        .exists());
    assert!(lab.xdp_attached());
    lab.ping(2);
    let s = first.status_when(|s| packets(s, "xdp_uplink", "pass") >= 2);
    assert_eq!(packets(&s, "xdp_uplink", "pass"), 2);
    assert!(first.stop().success(), "{}", first.log_text());
}

/// An uplink renamed while no daemon ran keeps its kept link: the next
/// daemon, told the new name, adopts it (it was refused as a stranger's
/// program, and detaching it as the message said meant an outage).
#[test]
fn a_kept_uplink_renamed_while_no_daemon_ran_is_adopted() {
    if !kernel_tests_enabled() {
        return;
    }
    let lab = Lab::new();
    let (root, _) = Daemon::paths();
    let mut first = Daemon::start_at(
        &lab.node.name,
        &root,
        &["--uplink", &lab.node_if, "--keep-dataplane"],
    );
    lab.ping(2);
    assert!(first.stop().success(), "{}", first.log_text());
    lab.node.ip(&["link", "set", &lab.node_if, "down"]);
    lab.node.ip(&["link", "set", &lab.node_if, "name", "wan0"]);
    lab.node.ip(&["link", "set", "wan0", "up"]);
    let mut second = Daemon::start_at(&lab.node.name, &root, &["--uplink", "wan0"]);
    assert_eq!(
        second.status().attachments[0].mode,
        "native, kept link replaced"
    );
    // The kept counters go on: IPv4 (the pings; the link coming up again
    // sends IPv6 neighbour discovery besides).
    let ipv4 = |s: &tapmesh::admin::proto::StatusResponse| named(s, "xdp_uplink", "ipv4");
    assert_eq!(ipv4(&second.status()), 2);
    lab.ping(3);
    let s = second.status_when(|s| ipv4(s) >= 5);
    assert_eq!(ipv4(&s), 5);
    assert!(second.stop().success(), "{}", second.log_text());
    let out = lab.node.ip(&["link", "show", "wan0"]);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("prog/xdp"));
    drop(first);
}

/// A kept restart whose configuration no longer names an uplink or a TC
/// interface takes the earlier daemon's programs off them at start: the
/// XDP link and `tm_tc_tap_out` of the former uplink, the full TC programs
/// of the former TC interface (they ran on, sharing the new daemon's maps).
#[test]
fn a_kept_restart_detaches_what_the_configuration_no_longer_names() {
    if !kernel_tests_enabled() {
        return;
    }
    let lab = Lab::new();
    let (former_uplink, _) = link(&lab.node, "198.18.1.1/24", &lab.peer, "198.18.1.2/24");
    let (former_tc, _) = link(&lab.node, "198.18.2.1/24", &lab.peer, "198.18.2.2/24");
    let (b, c) = (former_uplink.interface, former_tc.interface);
    let (root, _) = Daemon::paths();
    let mut first = Daemon::start_at(
        &lab.node.name,
        &root,
        &[
            "--uplink",
            &lab.node_if,
            "--uplink",
            &b,
            "--tc-interface",
            &c,
            "--keep-dataplane",
        ],
    );
    assert!(first.stop().success(), "{}", first.log_text());
    assert!(lab.xdp_on(&b));
    assert!(lab.tc_filters_on(&b).contains("tm_tc_tap_out"));
    let on_c = lab.tc_filters_on(&c);
    assert!(
        on_c.contains("tm_tc_ingress") && on_c.contains("tm_tc_egress"),
        "{on_c}"
    );

    let mut second = Daemon::start_at(&lab.node.name, &root, &["--uplink", &lab.node_if]);
    assert!(!lab.xdp_on(&b), "the former uplink keeps its XDP program");
    let left = format!("{}{}", lab.tc_filters_on(&b), lab.tc_filters_on(&c));
    assert!(!left.contains("tm_"), "left attached: {left}");
    let log = second.log_text();
    assert!(
        log.contains(&format!("XDP link on {b} detached (no longer an uplink)")),
        "{log}"
    );
    // The clsact qdiscs the first daemon made, left empty, went too.
    for interface in [&b, &c] {
        let out = lab.node.exec(&["tc", "qdisc", "show", "dev", interface]);
        let qdiscs = String::from_utf8_lossy(&out.stdout);
        assert!(!qdiscs.contains("clsact"), "{interface}: {qdiscs}");
        assert!(
            log.contains(&format!("clsact on {interface} removed (left empty)")),
            "{log}"
        );
    }
    // The uplink that stays took the new program in place and counts on.
    assert_eq!(
        second.status().attachments[0].mode,
        "native, kept link replaced"
    );
    lab.ping(2);
    let s = second.status_when(|s| named(s, "xdp_uplink", "ipv4") >= 2);
    assert_eq!(named(&s, "xdp_uplink", "ipv4"), 2);
    assert!(second.stop().success(), "{}", second.log_text());
    drop(first);
}

/// Runs the daemon expecting it to refuse; returns (exit code, stderr).
fn refused(args: &[&str]) -> (i32, String) {
    let out = Command::new(tapmesh_bin())
        .arg("daemon")
        .args(args)
        .output()
        .expect("running tapmesh");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn bad_configurations_exit_with_one_line_and_attach_nothing() {
    if !kernel_tests_enabled() {
        return;
    }
    let lab = Lab::new();
    let (root, socket) = Daemon::paths();
    let _cleanup = RemoveOnDrop(vec![root.clone()]);
    let base = [
        "--netns",
        lab.node.name.as_str(),
        "--bpffs-root",
        root.to_str().unwrap(),
        "--admin-socket",
        socket.to_str().unwrap(),
    ];
    let dir = std::env::temp_dir().join(tapmesh_tests::unique("tmcfg"));
    std::fs::create_dir_all(&dir).unwrap();
    let _cleanup_dir = RemoveOnDrop(vec![dir.clone()]);
    let bad_value = dir.join("bad.toml");
    std::fs::write(&bad_value, "[dataplane]\nxdp_mode = \"turbo\"\n").unwrap();
    let unknown_key = dir.join("unknown.toml");
    std::fs::write(&unknown_key, "[dataplane]\nuplink = \"eth0\"\n").unwrap();
    let missing = dir.join("missing.toml");
    // A local target on an interface this namespace does not have: it was
    // found only after the dataplane was attached (exit 1).
    let no_interface = dir.join("lb.toml");
    std::fs::write(
        &no_interface,
        "[[vips]]\nname = \"v\"\naddress = \"203.0.113.10\"\n\n[[streams]]\nname = \"s\"\nmax_targets = 4\n\n\
         [[flows]]\nname = \"f\"\nvips = [\"v\"]\nstream = \"s\"\nprotocols = [\"udp\"]\n\n\
         [[targets]]\nstream = \"s\"\nidentifier = 1\n\
         via = { local = { interface = \"nosuch9\", mac = \"02:00:00:00:00:01\" } }\n",
    )
    .unwrap();

    let cases: Vec<(Vec<&str>, i32, &str)> = vec![
        (
            vec!["--uplink", "nosuch0"],
            2,
            "dataplane.uplinks: interface \"nosuch0\" does not exist",
        ),
        (
            vec!["--tc-interface", "nosuch1"],
            2,
            "dataplane.tc_interfaces: interface \"nosuch1\" does not exist",
        ),
        (
            vec!["--config", missing.to_str().unwrap()],
            2,
            "cannot read config file",
        ),
        (
            vec!["--config", bad_value.to_str().unwrap()],
            2,
            "line 2: unknown variant `turbo`",
        ),
        (
            vec!["--config", unknown_key.to_str().unwrap()],
            2,
            "unknown field `uplink`",
        ),
        (vec!["--log-level", "tapmesh=loud"], 2, "daemon.log_level"),
        // Two of its own APIs on one socket: it failed after attaching, blamed on another process.
        (
            vec![
                "--uplink",
                &lab.node_if,
                "--node-socket",
                socket.to_str().unwrap(),
            ],
            2,
            "nsp.socket: ",
        ),
        (
            vec![
                "--uplink",
                &lab.node_if,
                "--lb-config",
                no_interface.to_str().unwrap(),
            ],
            2,
            "target 1 of stream \"s\": interface \"nosuch9\" does not exist",
        ),
        // A bare word was a target to the filter: the daemon ran and logged nothing.
        (
            vec!["--log-level", "warning"],
            2,
            "daemon.log_level: \"warning\" is not a level",
        ),
        // Native XDP on lo fails after the veth got its program: everything is rolled back.
        (
            vec![
                "--uplink",
                &lab.node_if,
                "--uplink",
                "lo",
                "--xdp-mode",
                "native",
            ],
            1,
            "plugin dataplane: start failed: attaching xdp to lo",
        ),
    ];
    for (extra, code, message) in cases {
        let args: Vec<&str> = base.iter().copied().chain(extra.iter().copied()).collect();
        let (got_code, stderr) = refused(&args);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.contains(" INFO ")).collect();
        assert_eq!(got_code, code, "{extra:?}: {stderr}");
        assert_eq!(lines.len(), 1, "{extra:?}: want one line, got {stderr:?}");
        assert!(
            lines[0].starts_with("tapmesh: ") && lines[0].contains(message),
            "{extra:?}: {stderr}"
        );
        assert!(!lab.xdp_attached(), "{extra:?}: XDP left attached");
        assert_eq!(lab.tc_filters().trim(), "", "{extra:?}: TC left attached");
        assert!(
            !root
                .join(format!("v{}", tapmesh_common::SCHEMA_VERSION))
                .exists(),
            "{extra:?}: pins left behind"
        );
        assert!(!socket.exists(), "{extra:?}: socket left behind");
    }
}

/// Removes directories when dropped, also when the test panics.
struct RemoveOnDrop(Vec<std::path::PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        for dir in &self.0 {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

#[test]
fn a_second_daemon_on_the_same_socket_is_refused() {
    if !kernel_tests_enabled() {
        return;
    }
    let lab = Lab::new();
    let daemon = Daemon::start(&lab.node.name, &[]);
    // A second daemon for another node namespace, on the first one's socket:
    // refused before its uplink gets a program.
    let other = Lab::new();
    let (root, _) = Daemon::paths();
    let node_socket = daemon.socket.with_extension("node.sock");
    let state = daemon.socket.with_extension("state");
    let base = [
        "--netns",
        &other.node.name,
        "--bpffs-root",
        root.to_str().unwrap(),
        "--uplink",
        &other.node_if,
        "--state-dir",
        state.to_str().unwrap(),
    ];
    let (code, stderr) = refused(
        &[
            &base[..],
            &["--admin-socket", daemon.socket.to_str().unwrap()],
            &["--node-socket", "/tmp/tapmesh-unused-node.sock"],
        ]
        .concat(),
    );
    assert_eq!(code, 2, "{stderr}");
    assert_eq!(
        stderr,
        format!(
            "tapmesh: plugin admin: configure failed: daemon.admin_socket: {} is in use by another process (another tapmesh daemon?)\n",
            daemon.socket.display()
        )
    );
    assert!(
        !other.xdp_attached(),
        "XDP attached before the socket check"
    );
    // The node socket likewise.
    let (code, stderr) = refused(
        &[
            &base[..],
            &["--admin-socket", "/tmp/tapmesh-unused-admin.sock"],
            &["--node-socket", node_socket.to_str().unwrap()],
        ]
        .concat(),
    );
    assert_eq!(code, 2, "{stderr}");
    assert_eq!(
        stderr,
        format!(
            "tapmesh: plugin nsp: configure failed: nsp.socket: {} is in use by another process (another tapmesh daemon?)\n",
            node_socket.display()
        )
    );
    assert!(
        !other.xdp_attached(),
        "XDP attached before the socket check"
    );
    assert!(!std::path::Path::new("/tmp/tapmesh-unused-admin.sock").exists());
    // And the metrics port, in the first daemon's namespace.
    let (code, stderr) = refused(&[
        "--netns",
        &lab.node.name,
        "--bpffs-root",
        root.to_str().unwrap(),
        "--admin-socket",
        "/tmp/tapmesh-unused-admin.sock",
        "--node-socket",
        "/tmp/tapmesh-unused-node.sock",
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert_eq!(
        stderr,
        "tapmesh: plugin metrics: configure failed: metrics.listen 127.0.0.1:9842: \
         Address already in use (os error 98) (choose another address, or \"\" for none)\n"
    );
    // The first daemon is untouched.
    let names: Vec<_> = daemon
        .status()
        .plugins
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert_eq!(
        names,
        [
            "dataplane",
            "lb",
            "nsp",
            "cluster",
            "mirror",
            "catalog",
            "netmanager",
            "admin",
            "metrics"
        ]
    );
}

/// `[daemon] log_format = "json"`: every line the daemon writes, from its
/// start to its stop, is one JSON object with a level and a message.
#[test]
fn json_logs_are_one_object_per_line() {
    if !kernel_tests_enabled() {
        return;
    }
    let lab = Lab::new();
    let dir = tapmesh_tests::TempDir::new("tmjsonlog");
    let config = dir.0.join("daemon.toml");
    std::fs::write(&config, "[daemon]\nlog_format = \"json\"\n").unwrap();
    let mut daemon = Daemon::start(
        &lab.node.name,
        &[
            "--config",
            config.to_str().unwrap(),
            "--uplink",
            &lab.node_if,
        ],
    );
    assert!(daemon.stop().success(), "{}", daemon.log_text());
    let text = daemon.log_text();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    for line in &lines {
        let level = line["level"].as_str().unwrap_or_default();
        assert!(
            ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"].contains(&level),
            "no level: {line}"
        );
        assert!(line["fields"]["message"].is_string(), "no message: {line}");
    }
    let messages: Vec<(&str, &str)> = lines
        .iter()
        .map(|l| {
            (
                l["level"].as_str().unwrap_or_default(),
                l["fields"]["message"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    for said in [
        "tapmesh daemon running",
        "SIGTERM: stopping",
        "tapmesh daemon stopped",
    ] {
        assert!(
            messages.contains(&("INFO", said)),
            "{said:?} missing: {text}"
        );
    }
}
