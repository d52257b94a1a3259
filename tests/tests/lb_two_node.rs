//! Two nodes: the VIP's target lives on node 2; node 1's XDP tunnels the
//! client's packets there (inner IP in UDP 50103), node 2's XDP decapsulates
//! and delivers them; answers return to the client by plain routing.
//!
//! ```text
//! client ── node1 ════ node2 ── target
//! .0.2      .0.1 .2.1  .2.2 .21.1  .21.2 (+ VIP on lo)      (198.18.x.y)
//! ```

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

use tapmesh::lb::model::TargetVia;
use tapmesh_tests::{
    daemon::{named, packets, Daemon},
    kernel_tests_enabled, link,
    net::{lb_toml, one_target_spec},
    Netns,
};

const VIP: &str = "203.0.113.20";

/// Runs `f` on a thread inside namespace `netns`.
fn in_netns<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let netns = netns.to_string();
    std::thread::spawn(move || {
        tapmesh::net::netns::enter(&netns).expect("entering the namespace");
        f()
    })
}

/// An LB file `name` in `dir`: the VIP's TCP and UDP to stream "web", whose
/// target 1 goes `via`.
fn lb_file(dir: &std::path::Path, name: &str, via: TargetVia) -> std::path::PathBuf {
    let path = dir.join(name);
    let spec = one_target_spec(VIP, "web", 4, &["tcp", "udp"], via);
    std::fs::write(&path, lb_toml(&spec)).expect("writing the LB file");
    path
}

#[test]
fn targets_on_the_other_node_are_reached_through_the_tunnel_and_answer() {
    through_the_tunnel(false);
}

/// The client's veth leaves its checksums to the offload (CHECKSUM_PARTIAL,
/// a veth's default): node 1's XDP program tunnels the frames with the
/// pseudo header's sum in them and no skb to say so; node 2 finishes them
/// on its detour (`offload`), or the target would drop every one.
#[test]
fn a_clients_offloaded_checksums_are_finished_on_the_targets_node() {
    through_the_tunnel(true);
}

/// `offload`: the client leaves its checksums to its veth.
fn through_the_tunnel(offload: bool) {
    if !kernel_tests_enabled() {
        return;
    }
    let client = Netns::new("c");
    let node1 = Netns::new("n1");
    let node2 = Netns::new("n2");
    let target = Netns::new("t");
    let (c_if, n1_down) = link(&client, "198.18.0.2/24", &node1, "198.18.0.1/24");
    let (n1_up, n2_up) = link(&node1, "198.18.2.1/24", &node2, "198.18.2.2/24");
    let (n2_down, t_if) = link(&node2, "198.18.21.1/24", &target, "198.18.21.2/24");
    // A veth leaves checksums to "hardware" (CHECKSUM_PARTIAL) unless told.
    let tx = if offload { "on" } else { "off" };
    client.exec(&["ethtool", "-K", &c_if.interface, "tx", tx]);
    for n in [&node1, &node2] {
        n.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    }
    client.ip(&["route", "add", &format!("{VIP}/32"), "via", "198.18.0.1"]);
    node2.ip(&["route", "add", "198.18.0.0/24", "via", "198.18.2.1"]);
    target.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"]);
    target.ip(&["route", "add", "default", "via", "198.18.21.1"]);
    // Native XDP redirect into a veth needs NAPI on the receiving side.
    target.exec(&["ethtool", "-K", &t_if.interface, "gro", "on"]);

    let dir = std::env::temp_dir().join(tapmesh_tests::unique("tm2n"));
    std::fs::create_dir_all(&dir).unwrap();
    let node2_address = TargetVia::Remote {
        node: "198.18.2.2".into(),
    };
    let remote = lb_file(&dir, "node1.toml", node2_address);
    let target_link = TargetVia::Local {
        interface: n2_down.interface.clone(),
        mac: tapmesh_tests::fmt_mac(target.mac(&t_if.interface)),
    };
    let local = lb_file(&dir, "node2.toml", target_link);

    let d1 = Daemon::start(
        &node1.name,
        &[
            "--uplink",
            &n1_down.interface,
            "--uplink",
            &n1_up.interface,
            "--node-address",
            "198.18.2.1",
            "--lb-config",
            remote.to_str().unwrap(),
        ],
    );
    let d2 = Daemon::start(
        &node2.name,
        &[
            "--uplink",
            &n2_up.interface,
            "--node-address",
            "198.18.2.2",
            // Node 1 has no target here: named, so its tunnel is taken.
            "--tunnel-peer",
            "198.18.2.1",
            "--lb-config",
            local.to_str().unwrap(),
        ],
    );

    // UDP: 20 datagrams from distinct ports, each echoed by the target;
    // 9 to 1377 bytes, so the sum runs over whole and partial blocks and
    // odd lengths.
    let message = |i: u16| {
        format!("hello {i:>2} ")
            .repeat(1 + 8 * i as usize)
            .into_bytes()
    };
    let echo = in_netns(&target.name, || {
        let socket = UdpSocket::bind(format!("{VIP}:7000")).expect("bind on the VIP");
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 1500];
        let mut seen = 0;
        while seen < 20 {
            let Ok((n, from)) = socket.recv_from(&mut buf) else {
                break;
            };
            socket.send_to(&buf[..n], from).unwrap();
            seen += 1;
        }
        seen
    });
    std::thread::sleep(Duration::from_millis(200));
    let answers = in_netns(&client.name, move || {
        let mut answered = 0;
        for i in 0..20u16 {
            let socket = UdpSocket::bind(("198.18.0.2", 41000 + i)).unwrap();
            socket
                .set_read_timeout(Some(Duration::from_secs(2)))
                .unwrap();
            socket.send_to(&message(i), format!("{VIP}:7000")).unwrap();
            let mut buf = [0u8; 2048];
            if let Ok((n, from)) = socket.recv_from(&mut buf) {
                assert_eq!(
                    from.to_string(),
                    format!("{VIP}:7000"),
                    "the answer comes from the VIP"
                );
                assert_eq!(buf[..n], message(i));
                answered += 1;
            }
        }
        answered
    })
    .join()
    .unwrap();
    let got = echo.join().unwrap();
    if got != 20 {
        eprintln!(
            "node1:\n{}\nnode2:\n{}",
            tapmesh::cli::status::render(&d1.status()),
            tapmesh::cli::status::render(&d2.status())
        );
    }
    assert_eq!(got, 20, "the target got every datagram");
    assert_eq!(answers, 20, "every answer came back: {}", d1.log_text());

    // TCP end to end through the tunnel.
    let server = in_netns(&target.name, || {
        let listener = TcpListener::bind(format!("{VIP}:7001")).unwrap();
        for _ in 0..3 {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf).unwrap();
            s.write_all(&buf[..n]).unwrap();
        }
    });
    std::thread::sleep(Duration::from_millis(200));
    in_netns(&client.name, || {
        for i in 0..3 {
            let mut s = TcpStream::connect_timeout(
                &format!("{VIP}:7001").parse().unwrap(),
                Duration::from_secs(3),
            )
            .expect("TCP connect through the tunnel");
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            s.write_all(format!("tcp {i}").as_bytes()).unwrap();
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf).unwrap();
            assert_eq!(&buf[..n], format!("tcp {i}").as_bytes());
        }
    })
    .join()
    .unwrap();
    server.join().unwrap();

    // Node 1's daemon resolved the next hop to node 2, so the XDP program
    // writes the cached MACs instead of looking the FIB up per packet.
    let target_field = |field: &str| {
        let out = std::process::Command::new("bpftool")
            .args(["map", "lookup", "pinned"])
            .arg(
                d1.bpffs_root
                    .join(format!("v{}/tm_targets", tapmesh_common::SCHEMA_VERSION)),
            )
            .args(["key", "0", "0", "0", "0"])
            .output()
            .expect("bpftool");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.split(&format!("\"{field}\": "))
            .nth(1)
            .and_then(|t| t.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or(0)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while target_field("ifindex") == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(target_field("mtu"), 1500, "the hop's MTU");
    assert_eq!(
        target_field("ifindex"),
        node1.interface_index(&n1_up.interface),
        "the cached hop is node 1's link to node 2"
    );

    // Node 1 sent every VIP packet into the tunnel; node 2 delivered them all.
    let s1 = d1.status();
    let s2 = d2.status();
    let sent = s1
        .targets
        .iter()
        .find(|t| t.name == "web/1")
        .expect("target counter on node 1")
        .packets;
    let delivered = s2
        .targets
        .iter()
        .find(|t| t.name == "web/1")
        .expect("target counter on node 2")
        .packets;
    assert!(sent >= 20 + 3 * 3, "node 1 tunnelled {sent}");
    assert_eq!(sent, delivered, "node 2 delivered what node 1 tunnelled");
    assert_eq!(
        packets(&s1, "xdp_uplink", "redirect"),
        sent,
        "node 1 redirected into the tunnel"
    );
    // Unfinished checksums take the detour, which `pass` counts.
    let (way, other) = if offload {
        ("pass", "redirect")
    } else {
        ("redirect", "pass")
    };
    assert_eq!(
        packets(&s2, "xdp_uplink", way),
        delivered,
        "node 2 sent every packet to the target"
    );
    assert_eq!(packets(&s2, "xdp_uplink", other), 0);
    for reason in [
        "no_target",
        "no_flow_match",
        "target_not_local",
        "bad_tunnel_packet",
        "ttl_exceeded",
        "fib_lookup_failed",
    ] {
        assert_eq!(named(&s1, "xdp_uplink", reason), 0, "node 1 {reason}");
        assert_eq!(named(&s2, "xdp_uplink", reason), 0, "node 2 {reason}");
    }

    // With the hop resolved, a datagram the encapsulation makes bigger than
    // node 1's link to node 2 (MTU 1500) is dropped at node 1 and counted,
    // not sent to be dropped by the link, unseen; one that just fits
    // (1472 + 28 bytes) crosses.
    let sizes_through = |fits: usize| {
        let received = in_netns(&target.name, || {
            let socket = UdpSocket::bind(format!("{VIP}:7001")).expect("bind on the VIP");
            socket
                .set_read_timeout(Some(Duration::from_secs(2)))
                .unwrap();
            let mut buf = [0u8; 2048];
            let mut sizes = Vec::new();
            while let Ok(n) = socket.recv(&mut buf) {
                sizes.push(n);
            }
            sizes
        });
        std::thread::sleep(Duration::from_millis(200));
        in_netns(&client.name, move || {
            let socket = UdpSocket::bind("198.18.0.2:0").unwrap();
            for payload in [fits + 1, fits, fits + 1, fits, fits + 1, fits] {
                socket
                    .send_to(&vec![7u8; payload], format!("{VIP}:7001"))
                    .unwrap();
                std::thread::sleep(Duration::from_millis(20));
            }
        })
        .join()
        .unwrap();
        received.join().unwrap()
    };
    assert_eq!(sizes_through(1444), vec![1444; 3], "only those that fit");
    let s1 = d1.status();
    assert_eq!(named(&s1, "xdp_uplink", "too_big_for_tunnel"), 3);

    // A smaller MTU on that link is followed (the daemon watches links).
    node1.ip(&["link", "set", &n1_up.interface, "mtu", "1400"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while target_field("mtu") != 1400 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(target_field("mtu"), 1400, "the hop's new MTU");
    assert_eq!(sizes_through(1344), vec![1344; 3], "only those that fit");
    let s1 = d1.status();
    assert_eq!(named(&s1, "xdp_uplink", "too_big_for_tunnel"), 6);
    let _ = std::fs::remove_dir_all(&dir);
}
