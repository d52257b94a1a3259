//! The service-IP overlay on two nodes: containers deployed through the
//! NetManager REST API reach service IPs; translation, the UDP 50103 tunnel
//! and decapsulation all happen in TC and XDP.

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    sync::atomic::{AtomicU16, Ordering},
    time::Duration,
};

use tapmesh_tests::{
    daemon::{named, packets},
    kernel_tests_enabled,
    net::spawn_in,
    net::{lb_toml, one_target_spec},
    overlay::{deploy_body, one_node, run, TwoNodes, NODE1, NODE2},
    Netns,
};

const WEB: &str = "app.ns.web.ns";
const CLIENT: &str = "app.ns.client.ns";
const RR: &str = "203.0.113.10";
const CLOSEST: &str = "203.0.113.11";
const CLIENT_IP: &str = "203.0.113.100";
const WEB0_IP: &str = "203.0.113.101";
const WEB1_IP: &str = "203.0.113.102";
const UDP_PORT: u16 = 7000;
const TCP_PORT: u16 = 7001;

/// Answers every UDP datagram and TCP connection with `name`, forever (the
/// thread dies with the process; the namespace goes on drop).
fn who_servers(container: &Netns, name: &'static str) {
    let ns = container.name.clone();
    let _ = spawn_in(&ns, move || {
        let udp =
            UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, UDP_PORT)).expect("udp bind");
        let tcp = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, TCP_PORT))
            .expect("tcp bind");
        std::thread::spawn(move || {
            for stream in tcp.incoming().flatten() {
                let mut stream = stream;
                let _ = stream.write_all(name.as_bytes());
            }
        });
        let mut buf = [0u8; 2048];
        while let Ok((_, from)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(name.as_bytes(), from);
        }
    });
    std::thread::sleep(Duration::from_millis(100));
}

/// Client source ports, below the ephemeral range: every flow of a test
/// binary has its own, so a new flow can never meet the conntrack entry of
/// an earlier one (a random port may repeat one).
static NEXT_PORT: AtomicU16 = AtomicU16::new(20000);

/// From inside `client`: one UDP flow (its own socket and source port) per
/// call to `to`:UDP_PORT (IPv4 or IPv6); returns who answered and the
/// address the answer came from.
fn udp_ask(client: &Netns, to: &str, flows: usize) -> Vec<(String, String)> {
    let to: IpAddr = to.parse().unwrap();
    spawn_in(&client.name, move || {
        (0..flows)
            .map(|_| ask_from(NEXT_PORT.fetch_add(1, Ordering::Relaxed), to))
            .collect()
    })
    .join()
    .expect("client thread")
}

/// From inside `client`, from source `port`: one datagram to `to`:UDP_PORT
/// (IPv4 or IPv6); who answered, and from where.
fn udp_ask_from(client: &Netns, port: u16, to: &str) -> (String, String) {
    let to: IpAddr = to.parse().unwrap();
    spawn_in(&client.name, move || ask_from(port, to))
        .join()
        .expect("client thread")
}

/// In the caller's namespace: a datagram from `port` to `to`:UDP_PORT, up
/// to three times; the answer and where it came from.
fn ask_from(port: u16, to: IpAddr) -> (String, String) {
    let any: IpAddr = if to.is_ipv4() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    };
    let s = UdpSocket::bind((any, port)).expect("client bind");
    s.set_read_timeout(Some(Duration::from_millis(2500)))
        .unwrap();
    for _ in 0..3 {
        s.send_to(b"hello", (to, UDP_PORT)).unwrap();
        let mut buf = [0u8; 64];
        if let Ok((n, from)) = s.recv_from(&mut buf) {
            return (
                String::from_utf8_lossy(&buf[..n]).to_string(),
                from.to_string(),
            );
        }
    }
    ("(no answer)".to_string(), String::new())
}

/// One TCP connection per call; returns who answered.
fn tcp_ask(client: &Netns, to: &str, connections: usize) -> Vec<String> {
    let to: Ipv4Addr = to.parse().unwrap();
    spawn_in(&client.name, move || {
        (0..connections)
            .map(|_| {
                let addr = SocketAddrV4::new(to, TCP_PORT).into();
                match TcpStream::connect_timeout(&addr, Duration::from_secs(3)) {
                    Ok(mut s) => {
                        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                        let mut text = String::new();
                        let _ = s.read_to_string(&mut text);
                        text
                    }
                    Err(e) => format!("(connect failed: {e})"),
                }
            })
            .collect()
    })
    .join()
    .expect("client thread")
}

/// Asserts that instance `name` gave every answer, from `service`:UDP_PORT.
fn answered_by(answers: &[(String, String)], name: &str, service: &str) {
    let from = format!("{service}:{UDP_PORT}");
    assert!(
        answers.iter().all(|(n, f)| n == name && *f == from),
        "{answers:?}"
    );
}

/// From `client`: `count` pings of `size` bytes to `to` (IPv4 or IPv6) that
/// may not be fragmented; whether they were answered, and what ping printed.
fn ping_df(client: &Netns, to: &str, size: u32, count: u32) -> (bool, String) {
    let (size, count) = (size.to_string(), count.to_string());
    let mut args = vec!["ping"];
    if to.contains(':') {
        args.push("-6");
    }
    args.extend(["-M", "do", "-s", &size, "-c", &count, "-W", "5", to]);
    run(client, &args)
}

fn alternates(names: &[String]) -> bool {
    names.windows(2).all(|w| w[0] != w[1])
}

/// The lab of most tests: client and web#0 on node 1, web#1 on node 2, each
/// node told about the other's instances.
struct Lab {
    nodes: TwoNodes,
    client: Netns,
    client_ns: String,
    web0: Netns,
    web1: Netns,
    web1_ns: String,
}

fn lab() -> Lab {
    lab_with("")
}

/// [`lab`] with `node1_config` appended to node 1's configuration file.
fn lab_with(node1_config: &str) -> Lab {
    let nodes = TwoNodes::start_with(|_| node1_config.to_string());
    nodes.node1.register("192.0.2.0/26");
    nodes.node2.register("192.0.2.64/26");
    let client = Netns::new("ovc");
    let web0 = Netns::new("ovw0");
    let web1 = Netns::new("ovw1");
    let client_ns = nodes
        .node1
        .deploy(&client, CLIENT, 0, &[("InstanceNumber", CLIENT_IP)]);
    let web_ips0: &[(&str, &str)] = &[
        ("RR", RR),
        ("Closest", CLOSEST),
        ("InstanceNumber", WEB0_IP),
    ];
    let web_ips1: &[(&str, &str)] = &[
        ("RR", RR),
        ("Closest", CLOSEST),
        ("InstanceNumber", WEB1_IP),
    ];
    let web0_ns = nodes.node1.deploy(&web0, WEB, 0, web_ips0);
    let web1_ns = nodes.node2.deploy(&web1, WEB, 1, web_ips1);
    assert!(client_ns.starts_with("192.0.2.") && web1_ns.starts_with("192.0.2."));
    // What the cluster would push to each node.
    nodes.node1.table(WEB, &[(1, &web1_ns, NODE2, web_ips1)]);
    nodes.node2.table(WEB, &[(0, &web0_ns, NODE1, web_ips0)]);
    nodes.node2.table(
        CLIENT,
        &[(0, &client_ns, NODE1, &[("InstanceNumber", CLIENT_IP)])],
    );
    who_servers(&web0, "web0");
    who_servers(&web1, "web1");
    Lab {
        nodes,
        client,
        client_ns,
        web0,
        web1,
        web1_ns,
    }
}

/// A ring tap service "cap" writing a pcap file, and a tap flow on `port`
/// in `direction` to it, on `daemon`; the file's directory lives as long
/// as the first value.
fn capture_port(
    daemon: &tapmesh_tests::daemon::Daemon,
    port: &str,
    direction: &str,
) -> (tapmesh_tests::TempDir, std::path::PathBuf) {
    let dir = tapmesh_tests::TempDir::new("tmovtap");
    let pcap = dir.0.join("port.pcap");
    let pcap_arg = pcap.display().to_string();
    daemon.cli(&["tap-service", "create", "cap", "--pcap", &pcap_arg]);
    daemon.cli(&[
        "tap-flow",
        "create",
        "port",
        "--tap-service",
        "cap",
        "--source",
        port,
        "--direction",
        direction,
    ]);
    (dir, pcap)
}

/// Inner packets found in UDP 50103 datagrams of a pcap file: (src, dst).
fn tunnelled_inner(pcap: &[u8]) -> Vec<(Ipv4Addr, Ipv4Addr)> {
    let mut found = Vec::new();
    let mut at = 24;
    while at + 16 <= pcap.len() {
        let caplen = u32::from_le_bytes(pcap[at + 8..at + 12].try_into().unwrap()) as usize;
        let frame = &pcap[at + 16..(at + 16 + caplen).min(pcap.len())];
        at += 16 + caplen;
        if frame.len() < 14 + 20 + 8 + 20 || frame[12..14] != [8, 0] || frame[23] != 17 {
            continue;
        }
        let udp = 14 + usize::from(frame[14] & 0xf) * 4;
        if u16::from_be_bytes([frame[udp + 2], frame[udp + 3]]) != 50103 {
            continue;
        }
        let inner = &frame[udp + 8..];
        if inner[0] >> 4 == 4 {
            let a = |o: usize| Ipv4Addr::new(inner[o], inner[o + 1], inner[o + 2], inner[o + 3]);
            found.push((a(12), a(16)));
        }
    }
    found
}

#[test]
fn round_robin_and_instance_ips_reach_instances_on_both_nodes_through_the_tunnel() {
    if !kernel_tests_enabled() {
        return;
    }
    let lab = lab();
    let n1 = &lab.nodes.node1;
    // Requests leave node 1's uplink, replies node 2's (what arrives is taken
    // by XDP before a capture could see it).
    let capture = |node: &tapmesh_tests::overlay::Node| {
        let pcap = std::env::temp_dir()
            .join(tapmesh_tests::unique("ovcap"))
            .with_extension("pcap");
        let child = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &node.netns.name,
                "tcpdump",
                "--immediate-mode",
                "-U",
                "-n",
                "-s",
                "200",
                "-i",
                &node.uplink,
                "-w",
            ])
            .arg(&pcap)
            .arg("udp port 50103")
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("tcpdump");
        (child, pcap)
    };
    let captures = [capture(n1), capture(&lab.nodes.node2)];
    // tcpdump writes the file header once it captures.
    let started = tapmesh_tests::net::wait_until(Duration::from_secs(30), || {
        captures
            .iter()
            .all(|(_, p)| std::fs::metadata(p).map(|m| m.len() >= 24).unwrap_or(false))
    });
    assert!(started, "tcpdump did not start");
    std::thread::sleep(Duration::from_millis(200));

    // UDP: every new flow takes the next instance; answers come from the service IP.
    let udp = udp_ask(&lab.client, RR, 6);
    let names: Vec<String> = udp.iter().map(|(n, _)| n.clone()).collect();
    assert!(alternates(&names), "UDP flows did not alternate: {udp:?}");
    assert!(names.iter().all(|n| n == "web0" || n == "web1"), "{udp:?}");
    for (_, from) in &udp {
        assert_eq!(
            from,
            &format!("{RR}:{UDP_PORT}"),
            "answers come from the service IP"
        );
    }
    // TCP: handshakes complete (so replies carry the service IP) and alternate.
    let tcp = tcp_ask(&lab.client, RR, 4);
    assert!(
        alternates(&tcp),
        "TCP connections did not alternate: {tcp:?}"
    );
    assert!(tcp.iter().all(|n| n == "web0" || n == "web1"), "{tcp:?}");

    // Instance IPs reach exactly their instance.
    let to0 = udp_ask(&lab.client, WEB0_IP, 3);
    let to1 = udp_ask(&lab.client, WEB1_IP, 3);
    answered_by(&to0, "web0", WEB0_IP);
    answered_by(&to1, "web1", WEB1_IP);
    assert_eq!(tcp_ask(&lab.client, WEB1_IP, 2), vec!["web1", "web1"]);

    std::thread::sleep(Duration::from_millis(300));
    let mut inner = Vec::new();
    let mut bytes = Vec::new();
    for (mut child, pcap) in captures {
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let _ = child.wait();
        let file = std::fs::read(&pcap).expect("pcap");
        bytes.push(file.len());
        let _ = std::fs::remove_file(&pcap);
        inner.extend(tunnelled_inner(&file));
    }
    let client_ip: Ipv4Addr = CLIENT_IP.parse().unwrap();
    let web1_ns: Ipv4Addr = lab.web1_ns.parse().unwrap();
    // Requests: sender's instance IP → the instance's namespace address.
    assert!(
        inner.contains(&(client_ip, web1_ns)),
        "no request inside UDP 50103: {inner:?} (capture sizes {bytes:?})"
    );
    // Replies: web#1's instance IP → the client's namespace address.
    assert!(
        inner
            .iter()
            .any(|(s, _)| *s == WEB1_IP.parse::<Ipv4Addr>().unwrap()),
        "no reply inside UDP 50103: {inner:?}"
    );

    // Counters: the RR service counted what the client sent to it.
    let status = n1.status();
    let rr = status["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["address"] == RR)
        .expect("RR service");
    assert!(rr["packets"].as_u64().unwrap() >= 6 + 4 * 3, "{rr}");
    let _ = (&lab.web0, &lab.web1);
}

/// Node 1's `tm_ov_instances` entries for instances on `node`.
fn remote_instances(
    n: &tapmesh_tests::overlay::Node,
    node: &str,
) -> Vec<tapmesh_common::overlay::Instance> {
    use aya::maps::{Array, Map, MapData};
    let path = n.pins().join(tapmesh_common::map_names::OV_INSTANCES);
    let map = MapData::from_pin(&path).expect("the pinned instances map");
    let instances: Array<MapData, tapmesh_common::overlay::Instance> =
        Array::try_from(Map::Array(map)).expect("an array");
    let node: Ipv4Addr = node.parse().unwrap();
    instances
        .iter()
        .map(|i| i.expect("an instance"))
        .filter(|i| {
            i.kind == tapmesh_common::overlay::INSTANCE_REMOTE && i.node_addr == node.octets()
        })
        .collect()
}

/// Waits until node 1's one instance on node 2 has next hop `want`
/// (ifindex, dst MAC, src MAC); returns the entry.
fn until_hop(
    n: &tapmesh_tests::overlay::Node,
    want: (u32, [u8; 6], [u8; 6]),
    what: &str,
) -> tapmesh_common::overlay::Instance {
    let mut last = Vec::new();
    let found = tapmesh_tests::net::wait_until(Duration::from_secs(30), || {
        last = remote_instances(n, NODE2);
        last.len() == 1 && (last[0].ifindex, last[0].dst_mac, last[0].src_mac) == want
    });
    assert!(
        found,
        "{what}: node 1's instances on node 2 are {last:?}, not with hop {want:?}"
    );
    last[0]
}

#[test]
fn remote_instances_carry_their_nodes_resolved_next_hop_and_follow_it() {
    if !kernel_tests_enabled() {
        return;
    }
    let lab = lab();
    let (n1, n2) = (&lab.nodes.node1, &lab.nodes.node2);
    let up1 = n1.netns.interface_index(&n1.uplink);
    let up1_mac = n1.netns.mac(&n1.uplink);
    let node2_mac = n2.netns.mac(&n2.uplink);

    // The daemon resolved node 2's next hop (the program skips the FIB).
    let first = until_hop(n1, (up1, node2_mac, up1_mac), "resolved");
    answered_by(&udp_ask(&lab.client, WEB1_IP, 3), "web1", WEB1_IP);

    // The neighbour's MAC changes: the entry follows in place, nothing
    // else of it changes (same generation: bound flows stay bound).
    let moved = [2, 0, 0, 0, 0x51, 1];
    let neigh = |mac: [u8; 6]| {
        n1.netns.ip(&[
            "neigh",
            "replace",
            NODE2,
            "lladdr",
            &tapmesh_tests::fmt_mac(mac),
            "dev",
            &n1.uplink,
            "nud",
            "permanent",
        ])
    };
    neigh(moved);
    let after = until_hop(n1, (up1, moved, up1_mac), "a new neighbour MAC");
    assert_eq!(
        tapmesh_common::overlay::Instance {
            dst_mac: first.dst_mac,
            ..after
        },
        first
    );
    // Back to the real MAC: the tunnel works again.
    neigh(node2_mac);
    until_hop(n1, (up1, node2_mac, up1_mac), "the real MAC again");
    answered_by(&udp_ask(&lab.client, WEB1_IP, 3), "web1", WEB1_IP);
    let lb = n1
        .daemon
        .as_ref()
        .expect("a running daemon")
        .status()
        .plugins
        .into_iter()
        .find(|p| p.name == "lb")
        .map(|p| p.detail)
        .unwrap_or_default();
    assert!(lb.contains("next hops of 1/1 remote nodes"), "{lb}");
}

/// A TCP sink in `container` on `port`: reads each connection to its end,
/// then answers with the number of bytes it read.
fn tcp_count_sink(container: &Netns, port: u16) {
    let _ = spawn_in(&container.name, move || {
        let tcp = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)).expect("bind");
        std::thread::spawn(move || {
            for mut stream in tcp.incoming().flatten() {
                let mut buf = vec![0u8; 1 << 16];
                let mut total = 0u64;
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    total += n as u64;
                }
                let _ = stream.write_all(total.to_string().as_bytes());
            }
        });
    });
    std::thread::sleep(Duration::from_millis(100));
}

/// From `client`: `bytes` over one TCP connection to `to`:`port` in large
/// writes (the stack hands the veth GSO packets); what the sink counted.
fn tcp_bulk(client: &Netns, to: &str, port: u16, bytes: usize) -> String {
    let to: Ipv4Addr = to.parse().unwrap();
    spawn_in(&client.name, move || {
        let addr = SocketAddrV4::new(to, port).into();
        let mut s = match TcpStream::connect_timeout(&addr, Duration::from_secs(3)) {
            Ok(s) => s,
            Err(e) => return format!("(connect failed: {e})"),
        };
        s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let chunk = vec![7u8; 1 << 16];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len());
            if let Err(e) = s.write_all(&chunk[..n]) {
                return format!("(write failed with {left} bytes left: {e})");
            }
            left -= n;
        }
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        text
    })
    .join()
    .expect("client thread")
}

#[test]
fn tcp_bulk_crosses_the_tunnel_with_a_resolved_hop_and_with_the_fib_lookup() {
    if !kernel_tests_enabled() {
        return;
    }
    const PORT: u16 = 7003;
    const BYTES: usize = 4 << 20;
    let lab = lab();
    let (n1, n2) = (&lab.nodes.node1, &lab.nodes.node2);
    tcp_count_sink(&lab.web1, PORT);
    let up1 = n1.netns.interface_index(&n1.uplink);
    let (up1_mac, node2_mac) = (n1.netns.mac(&n1.uplink), n2.netns.mac(&n2.uplink));

    until_hop(n1, (up1, node2_mac, up1_mac), "resolved");
    assert_eq!(
        tcp_bulk(&lab.client, WEB1_IP, PORT, BYTES),
        BYTES.to_string()
    );

    // A route with two next hops is left to the kernel's lookup per packet,
    // which must take GSO packets as the kernel's forwarding does (their
    // length is that of all their segments).
    n1.netns.ip(&[
        "route",
        "add",
        &format!("{NODE2}/32"),
        "nexthop",
        "via",
        NODE2,
        "dev",
        &n1.uplink,
        "nexthop",
        "via",
        NODE2,
        "dev",
        &n1.uplink,
    ]);
    until_hop(n1, (0, [0; 6], [0; 6]), "left to the FIB");
    assert_eq!(
        tcp_bulk(&lab.client, WEB1_IP, PORT, BYTES),
        BYTES.to_string()
    );
    let _ = &lab.web0;
}

#[test]
fn closest_prefers_the_local_instance_and_undeploy_removes_every_trace() {
    if !kernel_tests_enabled() {
        return;
    }
    let lab = lab();
    let n1 = &lab.nodes.node1;
    let first = udp_ask(&lab.client, CLOSEST, 4);
    answered_by(&first, "web0", CLOSEST);

    let before = n1.container_links();
    assert_eq!(before.len(), 2, "{before:?}");
    n1.undeploy(WEB, 0);
    // Falls back to the next closest, on the other node.
    let after = udp_ask(&lab.client, CLOSEST, 3);
    answered_by(&after, "web1", CLOSEST);
    // No trace: interface, container address, map entries.
    assert_eq!(n1.container_links().len(), 1);
    let (_, inside) = run(&lab.web0, &["ip", "-o", "addr", "show"]);
    assert!(
        !inside.contains("192.0.2."),
        "address left in the container: {inside}"
    );
    let status = n1.status();
    assert!(status["instances"]
        .as_array()
        .unwrap()
        .iter()
        .all(|i| i["number"] != 0 || i["job"] != WEB));
    let pins = n1.pins().join("tm_ov_locals");
    let dump = String::from_utf8_lossy(
        &tapmesh_tests::sh(
            "bpftool",
            &["-j", "map", "dump", "pinned", pins.to_str().unwrap()],
        )
        .stdout,
    )
    .to_string();
    let locals: serde_json::Value = serde_json::from_str(&dump).expect("bpftool JSON");
    assert_eq!(
        locals.as_array().map(|a| a.len()),
        Some(1),
        "only the client is local now: {dump}"
    );
    // Its array copy too: one slot in use.
    let slots_pin = pins.with_file_name("tm_ov_loc_slots");
    let dump = tapmesh_tests::sh(
        "bpftool",
        &["-j", "map", "dump", "pinned", slots_pin.to_str().unwrap()],
    )
    .stdout;
    let slots: serde_json::Value = serde_json::from_slice(&dump).expect("bpftool JSON");
    let used: Vec<&serde_json::Value> = slots
        .as_array()
        .expect("slot entries")
        .iter()
        .map(|e| &e["formatted"]["value"])
        .filter(|v| v["state"] != 0)
        .collect();
    assert_eq!(used.len(), 1, "slots in use: {used:?}");
    // A redeploy takes a fresh address and works again.
    let again = n1.deploy(
        &lab.web0,
        WEB,
        0,
        &[("Closest", CLOSEST), ("InstanceNumber", WEB0_IP)],
    );
    assert!(again.starts_with("192.0.2."));
    // The namespace kept its server (its socket outlives the link).
    let back = udp_ask(&lab.client, CLOSEST, 2);
    assert!(
        back.iter().all(|(n, _)| n == "web0"),
        "{back:?}\nnode 1's log:\n{}",
        n1.daemon.as_ref().unwrap().log_text()
    );
}

/// A tap flow on a container's port, then its delete: the delete took the
/// port's own TC programs (`tm_tc_service`, `tm_tc_tap_in`) with it, and
/// the container's service-IP traffic stopped.
#[test]
fn a_tap_flow_on_a_containers_port_copies_and_its_delete_leaves_the_ports_programs() {
    if !kernel_tests_enabled() {
        return;
    }
    let lab = lab();
    let n1 = &lab.nodes.node1;
    let daemon = n1.daemon.as_ref().unwrap();
    // The client was deployed first: its port has the lower index.
    let mut ports = n1.container_link_indexes();
    ports.sort();
    let port = ports[0].1.clone();
    let filters = || {
        ["ingress", "egress"]
            .map(|hook| run(&n1.netns, &["tc", "filter", "show", "dev", &port, hook]).1)
    };
    let before = filters();
    assert!(
        before[0].contains("tm_tc_service") && before[1].contains("tm_tc_tap_in"),
        "{before:?}"
    );
    answered_by(&udp_ask(&lab.client, CLOSEST, 1), "web0", CLOSEST);

    let dir = tapmesh_tests::TempDir::new("tmovtap");
    let pcap = dir.0.join("client.pcap").display().to_string();
    daemon.cli(&["tap-service", "create", "cap", "--pcap", &pcap]);
    daemon.cli(&[
        "tap-flow",
        "create",
        "cf",
        "--tap-service",
        "cap",
        "--source",
        &port,
        "--direction",
        "BOTH",
    ]);
    let listing: serde_json::Value =
        serde_json::from_str(&daemon.cli(&["tap-flow", "list", "-o", "json"])).expect("JSON");
    assert_eq!(listing[0]["status"], "ACTIVE", "{listing}");
    answered_by(&udp_ask(&lab.client, CLOSEST, 2), "web0", CLOSEST);
    let listing: serde_json::Value =
        serde_json::from_str(&daemon.cli(&["tap-flow", "list", "-o", "json"])).expect("JSON");
    // Two requests out of the port, two answers into it.
    assert_eq!(listing[0]["mirrored_packets"], 4, "{listing}");

    daemon.cli(&["tap-flow", "delete", "cf"]);
    let listing: serde_json::Value =
        serde_json::from_str(&daemon.cli(&["tap-flow", "list", "-o", "json"])).expect("JSON");
    assert!(
        listing.as_array().is_some_and(|f| f.is_empty()),
        "{listing}"
    );
    assert_eq!(filters(), before, "the port's programs");
    answered_by(&udp_ask(&lab.client, CLOSEST, 2), "web0", CLOSEST);
}

/// Found by a tester: on an underlay that keeps "checksum pending" (a veth
/// with its default TX offload, as kind's nodes have, not a NIC that
/// finishes it), a remote instance's reply arrived with the checksum its
/// sender left unfinished, and the reverse translation to the RR or
/// Closest address dialled (in XDP, which cannot tell) left it wrong: the
/// client's kernel dropped every such answer. The daemon turns a veth
/// uplink's TX checksum offload off, as the lab used to do itself.
#[test]
fn answers_from_the_other_node_survive_a_veth_underlay() {
    if !kernel_tests_enabled() {
        return;
    }
    let lab = lab();
    for node in [&lab.nodes.node1, &lab.nodes.node2] {
        let (_, features) = run(&node.netns, &["ethtool", "-k", &node.uplink]);
        assert!(features.contains("tx-checksumming: off"), "{features}");
        let log = node.daemon.as_ref().unwrap().log_text();
        assert!(
            log.contains("its TX checksum offload is turned off"),
            "{log}"
        );
    }
    let answers = udp_ask(&lab.client, RR, 6);
    let names: Vec<String> = answers.iter().map(|(n, _)| n.clone()).collect();
    assert!(
        alternates(&names) && names.contains(&"web1".to_string()),
        "{answers:?}"
    );
    let rr_from = format!("{RR}:{UDP_PORT}");
    assert!(answers.iter().all(|(_, f)| *f == rr_from), "{answers:?}");
    let names = tcp_ask(&lab.client, RR, 4);
    assert!(
        alternates(&names) && names.contains(&"web1".to_string()),
        "{names:?}"
    );
    // Closest with only the remote instance left to pick.
    lab.nodes.node1.undeploy(WEB, 0);
    answered_by(&udp_ask(&lab.client, CLOSEST, 3), "web1", CLOSEST);
    assert_eq!(tcp_ask(&lab.client, CLOSEST, 2), ["web1", "web1"]);
    // The client's kernel saw no bad checksum at all.
    let (_, counters) = run(
        &lab.client,
        &["nstat", "-az", "UdpInCsumErrors", "TcpInCsumErrors"],
    );
    let errors: Vec<&str> = counters
        .lines()
        .filter(|l| l.contains("CsumErrors"))
        .filter(|l| l.split_whitespace().nth(1) != Some("0"))
        .collect();
    assert!(errors.is_empty(), "{counters}");
}

/// What node 2's uplink decapsulates and redirects into a container's port
/// in XDP is copied IN there too (`ebpf/src/detour.rs`), bytes as the
/// container gets them.
#[test]
fn a_tap_flow_copies_what_the_tunnel_delivers_into_a_containers_port() {
    if !kernel_tests_enabled() {
        return;
    }
    let lab = lab();
    let n2 = &lab.nodes.node2;
    let daemon = n2.daemon.as_ref().unwrap();
    let port = n2.container_link_indexes()[0].1.clone();
    // Neighbours resolved first: only the datagrams are copied below.
    answered_by(&udp_ask(&lab.client, WEB1_IP, 1), "web1", WEB1_IP);
    let (_dir, pcap) = capture_port(daemon, &port, "BOTH");
    answered_by(&udp_ask(&lab.client, WEB1_IP, 3), "web1", WEB1_IP);
    let listing: serde_json::Value =
        serde_json::from_str(&daemon.cli(&["tap-flow", "list", "-o", "json"])).expect("JSON");
    // Three requests in through the tunnel, three answers out of the port.
    assert_eq!(listing[0]["mirrored_packets"], 6, "{listing}");
    daemon.cli(&["tap-service", "delete", "cap"]);
    let lines = tapmesh_tests::tshark_rows(&pcap, &["ip.src", "ip.dst", "udp.dstport"]);
    let requests = lines
        .iter()
        .filter(|l| *l == &format!("{CLIENT_IP}\t{}\t{UDP_PORT}", lab.web1_ns))
        .count();
    assert_eq!(requests, 3, "{lines:?}");
    assert_eq!(lines.len(), 6, "{lines:?}");
}

/// An instance's ICMP error (a closed port) reaches the client as the
/// kernel's NAT delivers one: from the service IP dialled, quoting the
/// client's own packet, so its connected socket gets ECONNREFUSED, through
/// an instance on this node and one on the other, by instance IP and RR.
#[test]
fn a_closed_port_behind_a_service_ip_is_refused_not_silent() {
    if !kernel_tests_enabled() {
        return;
    }
    use tapmesh_tests::frames::internet_checksum;
    let lab = lab();
    let errors = tapmesh_tests::net::IcmpReceiver::start(&lab.client.name);
    let mut sent = Vec::new();
    for to in [WEB0_IP, WEB1_IP, RR, RR] {
        let to: Ipv4Addr = to.parse().unwrap();
        let (got, from) = spawn_in(&lab.client.name, move || {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.connect((to, 9)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            s.send(b"anyone?").unwrap();
            let mut buf = [0u8; 16];
            (
                s.recv(&mut buf).map_err(|e| e.kind()),
                s.local_addr().unwrap(),
            )
        })
        .join()
        .unwrap();
        assert_eq!(got, Err(std::io::ErrorKind::ConnectionRefused), "to {to}:9");
        sent.push((to, from.port()));
    }
    // The raw socket's thread may still be storing the last error.
    let four = tapmesh_tests::net::wait_until(Duration::from_secs(30), || {
        let errors = errors.packets();
        errors.iter().filter(|p| p.len() > 20 && p[20] == 3).count() >= 4
    });
    assert!(four, "{} ICMP errors seen", errors.packets().len());
    // The bytes: each error from the address dialled, quoting the client's
    // datagram as it left (to that address), the IP and ICMP checksums
    // valid (the client's kernel checks only the outer ones).
    let mut quoted: Vec<(Ipv4Addr, u16)> = Vec::new();
    for p in errors
        .packets()
        .iter()
        .filter(|p| p.len() > 20 && p[20] == 3)
    {
        assert_eq!(internet_checksum(&[&p[..20]]), 0, "IP checksum {p:02x?}");
        assert_eq!(internet_checksum(&[&p[20..]]), 0, "ICMP checksum {p:02x?}");
        let inner = &p[28..];
        assert_eq!(
            internet_checksum(&[&inner[..20]]),
            0,
            "quoted IP checksum {p:02x?}"
        );
        assert_eq!(
            &inner[12..16],
            &p[16..20],
            "quoted source: the client {p:02x?}"
        );
        assert_eq!(
            &inner[16..20],
            &p[12..16],
            "quoted destination: the error's source {p:02x?}"
        );
        // (Its UDP checksum is not checked: a datagram that crossed veth
        // with its checksum offloaded is quoted with a partial one, which
        // no kernel checks, translated as if it were whole.)
        let udp = &inner[20..];
        let dialled = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
        quoted.push((dialled, u16::from_be_bytes([udp[0], udp[1]])));
    }
    quoted.sort();
    sent.sort();
    assert_eq!(quoted, sent);
}

#[test]
fn a_source_port_used_again_for_another_service_ip_gets_its_answers_from_that_one() {
    if !kernel_tests_enabled() {
        return;
    }
    let lab = lab();
    // web#0 is on the client's node: Closest and its instance IP both reach it.
    // Each new flow shows web#0's answers from the address it dialled (two
    // such flows at once look the same to web#0: the later one's shows).
    let from = |service: &str| (String::from("web0"), format!("{service}:{UDP_PORT}"));
    for (first, then) in [(CLOSEST, WEB0_IP), (WEB0_IP, CLOSEST)] {
        let port = NEXT_PORT.fetch_add(1, Ordering::Relaxed);
        assert_eq!(udp_ask_from(&lab.client, port, first), from(first));
        assert_eq!(udp_ask_from(&lab.client, port, then), from(then));
    }
}

#[test]
fn a_table_that_only_reorders_or_adds_service_ips_moves_no_flow() {
    if !kernel_tests_enabled() {
        return;
    }
    let lab = lab();
    // Six flows through RR, alternating between web#0 here and web#1.
    let ports: Vec<u16> = (0..6)
        .map(|_| NEXT_PORT.fetch_add(1, Ordering::Relaxed))
        .collect();
    let ask = || -> Vec<String> {
        ports
            .iter()
            .map(|&p| udp_ask_from(&lab.client, p, RR).0)
            .collect()
    };
    let before = ask();
    assert!(
        alternates(&before) && before.contains(&"web1".to_string()),
        "{before:?}"
    );
    // The cluster sends web#1's entry again: its service IPs reordered,
    // then one more. The flows stay where they are.
    let reordered: &[(&str, &str)] = &[
        ("InstanceNumber", WEB1_IP),
        ("Closest", CLOSEST),
        ("RR", RR),
    ];
    lab.nodes
        .node1
        .table(WEB, &[(1, &lab.web1_ns, NODE2, reordered)]);
    assert_eq!(ask(), before, "after a reordered table");
    let more: &[(&str, &str)] = &[
        ("RR", RR),
        ("RR", "203.0.113.12"),
        ("Closest", CLOSEST),
        ("InstanceNumber", WEB1_IP),
    ];
    lab.nodes
        .node1
        .table(WEB, &[(1, &lab.web1_ns, NODE2, more)]);
    assert_eq!(ask(), before, "after a service IP was added");
    // One it no longer carries: its flows pick again, among what is left.
    let fewer: &[(&str, &str)] = &[("Closest", CLOSEST), ("InstanceNumber", WEB1_IP)];
    lab.nodes
        .node1
        .table(WEB, &[(1, &lab.web1_ns, NODE2, fewer)]);
    assert!(ask().iter().all(|n| n == "web0"), "RR is web#0's alone now");
}

#[test]
fn a_service_ip_of_one_job_is_refused_to_another() {
    if !kernel_tests_enabled() {
        return;
    }
    let lab = lab();
    let n1 = &lab.nodes.node1;
    let other = Netns::new("ovx");
    let deploy = |job: &str, ips: &[(&str, &str)]| {
        n1.api("/container/deploy", &deploy_body(&other, job, 0, ips))
    };
    // Another job's RR address, its instance IP, and a remote instance's
    // instance IP as an RR address: each refused, saying whose it is.
    for (ips, whose) in [
        (&[("RR", RR)][..], "RoundRobin of app.ns.web.ns instance"),
        (
            &[("InstanceNumber", RR)][..],
            "RoundRobin of app.ns.web.ns instance",
        ),
        (
            &[("RR", CLIENT_IP)][..],
            "InstanceNumber of app.ns.client.ns instance 0",
        ),
        (
            &[("Closest", WEB1_IP)][..],
            "InstanceNumber of app.ns.web.ns instance 1",
        ),
    ] {
        let (status, text) = deploy("app.ns.other.ns", ips);
        assert_eq!(
            (status, text.contains(whose)),
            (409, true),
            "{ips:?}: {text}"
        );
    }
    // Its own job's RR address, with its type: shared, as every instance does.
    let (status, text) = deploy(WEB, &[("RR", RR), ("InstanceNumber", "203.0.113.103")]);
    assert_eq!(status, 409, "instance 0 of web is deployed: {text}");
    let (status, text) = n1.api(
        "/container/deploy",
        &deploy_body(
            &other,
            WEB,
            2,
            &[("RR", RR), ("InstanceNumber", "203.0.113.103")],
        ),
    );
    assert_eq!(status, 200, "{text}");
}

#[test]
fn a_table_that_gives_an_address_a_second_meaning_is_refused_and_changes_nothing() {
    if !kernel_tests_enabled() {
        return;
    }
    let lab = lab();
    let n1 = &lab.nodes.node1;
    let pins = n1.pins();
    let client_ns = n1.status()["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["job"] == CLIENT)
        .and_then(|i| i["ns_address"].as_str())
        .expect("the client's namespace address")
        .to_string();
    let before = tapmesh_tests::maps::dump_pinned(&pins);
    let other = "app.ns.other.ns";
    let table = |job: &str, ns: &str, sips: &[(&str, &str)]| {
        let body = format!(
            r#"{{"app_name": "{job}", "instance_list": [{{"instance_number": 1, "namespace_ip": "{ns}", "host_ip": "{NODE2}", "host_port": 50103, "service_ip": [{}]}}]}}"#,
            tapmesh_tests::overlay::service_ips_json(sips)
        );
        n1.api("/tablequery/result", &body)
    };
    for (job, ns, sips, says) in [
        // A container's address as another job's instance IP: node 2's, and
        // one here.
        (
            other,
            "192.0.2.70",
            &[("InstanceNumber", lab.web1_ns.as_str())][..],
            format!("is already the namespace address of {WEB} instance 1"),
        ),
        (
            other,
            "192.0.2.70",
            &[("InstanceNumber", client_ns.as_str())][..],
            "is in this node's container subnet 192.0.2.0/26".to_string(),
        ),
        // Another job's remote instance's address as a namespace address.
        (
            other,
            lab.web1_ns.as_str(),
            &[][..],
            format!("is already the namespace address of {WEB} instance 1"),
        ),
        // Another job's RR address, and web's own instance IP given to the client.
        (
            other,
            "192.0.2.70",
            &[("RR", RR)][..],
            format!("is already RoundRobin of {WEB} instance"),
        ),
        (
            CLIENT,
            "192.0.2.70",
            &[("InstanceNumber", WEB1_IP)][..],
            format!("is already InstanceNumber of {WEB} instance 1"),
        ),
        // An address of this node's container subnet placed on node 2, even
        // for an instance deployed here (it would count once undeployed).
        (
            other,
            "192.0.2.9",
            &[][..],
            "is in this node's container subnet 192.0.2.0/26".to_string(),
        ),
        (
            CLIENT,
            "192.0.2.9",
            &[][..],
            "is in this node's container subnet 192.0.2.0/26".to_string(),
        ),
        // A service IP there, or the node's own address.
        (
            other,
            "192.0.2.70",
            &[("RR", "192.0.2.1")][..],
            "service IP 192.0.2.1 of app.ns.other.ns instance 1 is in this node's container subnet 192.0.2.0/26".to_string(),
        ),
        (
            other,
            "192.0.2.70",
            &[("InstanceNumber", NODE1)][..],
            "is this node's address".to_string(),
        ),
        (other, NODE1, &[][..], "is this node's address".to_string()),
    ] {
        let (status, text) = table(job, ns, sips);
        assert_eq!(
            (status, text.contains(&says)),
            (409, true),
            "{job} {ns} {sips:?}: {text}"
        );
    }
    // One instance listed twice.
    let (status, text) = n1.api(
        "/tablequery/result",
        &format!(
            r#"{{"app_name": "{other}", "instance_list": [{{"instance_number": 1, "namespace_ip": "192.0.2.70", "host_ip": "{NODE2}", "host_port": 50103}}, {{"instance_number": 1, "namespace_ip": "192.0.2.71", "host_ip": "{NODE2}", "host_port": 50103}}]}}"#
        ),
    );
    assert_eq!(
        (status, text.contains("instance 1 is listed twice")),
        (400, true),
        "{text}"
    );
    let diff = tapmesh_tests::maps::differences(&before, &tapmesh_tests::maps::dump_pinned(&pins));
    assert!(diff.is_empty(), "maps changed: {diff:?}");
    // The refused web table left web's entries as they were: both instances answer.
    let answers = udp_ask(&lab.client, WEB1_IP, 3);
    answered_by(&answers, "web1", WEB1_IP);
    let answers = udp_ask(&lab.client, WEB0_IP, 3);
    answered_by(&answers, "web0", WEB0_IP);
    // web#0 listed at an address this node no longer has (its own before
    // a move): still the local instance, taken.
    let web0_ns = n1.status()["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["job"] == WEB && i["number"] == 0)
        .and_then(|i| i["ns_address"].as_str())
        .expect("web#0's namespace address")
        .to_string();
    n1.table(
        WEB,
        &[
            (
                0,
                web0_ns.as_str(),
                "198.18.2.99",
                &[
                    ("RR", RR),
                    ("Closest", CLOSEST),
                    ("InstanceNumber", WEB0_IP),
                ],
            ),
            (
                1,
                lab.web1_ns.as_str(),
                NODE2,
                &[
                    ("RR", RR),
                    ("Closest", CLOSEST),
                    ("InstanceNumber", WEB1_IP),
                ],
            ),
        ],
    );
    answered_by(&udp_ask(&lab.client, WEB0_IP, 2), "web0", WEB0_IP);
    // The same table with addresses of its own is taken.
    let (status, text) = table(other, "192.0.2.70", &[("InstanceNumber", "203.0.113.120")]);
    assert_eq!(status, 200, "{text}");

    // A deploy claims what the cluster's table lists for it too, even a
    // table from before it: web#0 undeployed, its table entry still naming
    // an instance IP another job's container has taken since.
    n1.undeploy(WEB, 0);
    let echo = format!(
        r#"{{"app_name": "{WEB}", "instance_list": [{{"instance_number": 0, "namespace_ip": "192.0.2.50", "host_ip": "{NODE1}", "host_port": 50103, "service_ip": [{}]}}]}}"#,
        tapmesh_tests::overlay::service_ips_json(&[
            ("RR", RR),
            ("InstanceNumber", "203.0.113.150")
        ])
    );
    n1.post("/tablequery/result", &echo);
    let taker = Netns::new("ovt");
    n1.deploy(&taker, other, 0, &[("InstanceNumber", "203.0.113.150")]);
    let again = Netns::new("ovw0b");
    let (status, text) = n1.api(
        "/container/deploy",
        &deploy_body(&again, WEB, 0, &[("RR", RR)]),
    );
    assert_eq!(
        (status, text.contains(&format!("service IP 203.0.113.150 of {WEB} instance 0 is already InstanceNumber of {other} instance 0"))),
        (409, true),
        "{text}"
    );
}

#[test]
fn an_unreadable_state_file_is_kept_aside_not_overwritten() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut lab = lab();
    let state = lab
        .nodes
        .node1
        .socket
        .with_file_name("state")
        .join("netmanager-state.json");
    let garbage = b"{\"registration\": garbage";
    // The EDS identities too (found by an independent tester: that one
    // stopped the daemon from starting, xDS or not).
    let identities = state.with_file_name("eds-identities.json");
    lab.nodes.node1.restart(&[], |_| {
        assert!(state.exists(), "the deployments were saved");
        std::fs::write(&state, garbage).unwrap();
        std::fs::write(&identities, b"{\"garbage\": [1,2,").unwrap();
    });
    let identities_aside = state.with_file_name("eds-identities.refused.json");
    assert_eq!(
        std::fs::read(&identities_aside).ok().as_deref(),
        Some(&b"{\"garbage\": [1,2,"[..])
    );
    // The daemon starts without it; a new registration saves afresh and
    // what the file held is still there for the operator.
    lab.nodes.node1.register("192.0.2.0/26");
    let aside = state.with_file_name("netmanager-state.refused.json");
    assert_eq!(std::fs::read(&aside).ok().as_deref(), Some(&garbage[..]));
    assert!(std::fs::read(&state).is_ok_and(|b| b != garbage));
    let log = lab.nodes.node1.daemon.as_ref().unwrap().log_text();
    assert!(
        log.contains(&format!("kept as {}", aside.display())),
        "{log}"
    );
}

/// The payloads reaching UDP `port` in `container` while `send` runs.
fn payloads_at(container: &Netns, port: u16, send: impl FnOnce()) -> Vec<String> {
    let receiver = spawn_in(&container.name, move || {
        let udp = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)).unwrap();
        udp.set_read_timeout(Some(Duration::from_millis(1500)))
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        while let Ok((n, _)) = udp.recv_from(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        got
    });
    std::thread::sleep(Duration::from_millis(100));
    send();
    receiver.join().unwrap()
}

#[test]
fn a_container_cannot_send_from_another_containers_address() {
    if !kernel_tests_enabled() {
        return;
    }
    let lab = lab();
    let (_, out) = run(
        &lab.client,
        &["ip", "-4", "-o", "addr", "show", "dev", "tmsvc0"],
    );
    let client_ns = out
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .expect("the client's address")
        .to_string();
    // web#0 takes the client's address as a second one of its own.
    lab.web0
        .ip(&["addr", "add", &format!("{client_ns}/32"), "dev", "tmsvc0"]);
    let send = |from: &Netns, source: &str, text: &'static str| {
        let source: Ipv4Addr = source.parse().unwrap();
        let to: Ipv4Addr = WEB1_IP.parse().unwrap();
        let _ = spawn_in(&from.name, move || {
            let s = UdpSocket::bind(SocketAddrV4::new(source, 0)).unwrap();
            for _ in 0..5 {
                s.send_to(text.as_bytes(), SocketAddrV4::new(to, 7005))
                    .unwrap();
            }
        })
        .join();
    };
    let got = payloads_at(&lab.web1, 7005, || {
        send(&lab.web0, &client_ns, "forged");
        send(&lab.client, &client_ns, "real");
    });
    assert_eq!(got, vec!["real"; 5], "only the client's own datagrams");

    // Nor from an address of no container, to anywhere: node 1 would route
    // it on (here to node 2's own address), as it would a tunnel packet a
    // container made with a node's address as its source.
    const FOREIGN: &str = "192.0.2.177";
    lab.web0
        .ip(&["addr", "add", &format!("{FOREIGN}/32"), "dev", "tmsvc0"]);
    let node1 = lab.nodes.node1.daemon.as_ref().unwrap();
    let before = named(&node1.status(), "tc_service", "sender_not_deployed");
    let node2 = &lab.nodes.node2.netns;
    let got = payloads_at(node2, 7006, || {
        let _ = spawn_in(&lab.web0.name, || {
            let s = UdpSocket::bind(SocketAddrV4::new(FOREIGN.parse().unwrap(), 0)).unwrap();
            for _ in 0..5 {
                s.send_to(b"spoofed", (NODE2, 7006)).unwrap();
            }
        })
        .join();
    });
    assert_eq!(got, Vec::<String>::new(), "node 2 got spoofed datagrams");
    let after = named(&node1.status(), "tc_service", "sender_not_deployed");
    assert_eq!(after - before, 5, "each one dropped at node 1 and counted");
}

/// A VIP holding a service IP or a remote node of the overlay is refused,
/// and so is the overlay's address inside a VIP, whichever comes second;
/// the refused change leaves the other as it was.
#[test]
fn a_vip_and_the_overlays_addresses_are_kept_apart_whichever_comes_second() {
    if !kernel_tests_enabled() {
        return;
    }
    let (n1, _peer) = one_node();
    n1.register("192.0.2.0/26");
    let c = Netns::new("ovva");
    n1.deploy(&c, WEB, 0, &[("RR", RR)]);
    let via = tapmesh::lb::model::TargetVia::Local {
        interface: n1.container_links().pop().expect("the container's link"),
        mac: tapmesh_tests::fmt_mac(c.mac("tmsvc0")),
    };
    let daemon = n1.daemon.as_ref().unwrap();
    let apply = |address: &str| {
        let file = std::env::temp_dir().join(tapmesh_tests::unique("tmlbo"));
        let spec = one_target_spec(address, "web", 4, &["udp"], via.clone());
        std::fs::write(&file, lb_toml(&spec)).unwrap();
        let out = std::process::Command::new(tapmesh_tests::daemon::tapmesh_bin())
            .args(["lb", "apply", file.to_str().unwrap(), "--admin-socket"])
            .arg(&daemon.socket)
            .output()
            .unwrap();
        let _ = std::fs::remove_file(&file);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let vips = || daemon.cli(&["lb", "list", "-o", "json"]);
    let empty = vips();

    // The service IP is there first.
    let (code, text) = apply("203.0.113.0/28");
    assert_eq!(code, Some(2), "{text}");
    assert!(
        text.contains("the overlay's service IP 203.0.113.10 lies inside VIP \"vip\""),
        "{text}"
    );
    assert_eq!(vips(), empty, "the LB maps as they were");

    // The VIP is there first: a table naming a node inside it is refused
    // (409), one on another node passes.
    let (code, text) = apply("198.51.100.0/24");
    assert_eq!(code, Some(0), "{text}");
    let table = |node: &str| {
        format!(
            r#"{{"app_name": "{CLIENT}", "instance_list": [{{"instance_number": 0, "namespace_ip": "192.0.2.200", "host_ip": "{node}", "host_port": 50103, "service_ip": [{{"IpType": "RR", "Address": "203.0.113.20"}}]}}]}}"#
        )
    };
    let message = |body: &str| {
        let v: serde_json::Value = serde_json::from_str(body).expect("JSON");
        v["message"].as_str().unwrap_or_default().to_string()
    };
    let (status, body) = n1.api("/tablequery/result", &table("198.51.100.7"));
    assert_eq!(status, 409, "{body}");
    assert_eq!(
        message(&body),
        "dataplane: the overlay's remote node 198.51.100.7 lies inside VIP \"vip\": the uplink \
         would balance what the overlay carries; keep VIPs and the overlay's addresses apart"
    );
    let instances =
        |n: &tapmesh_tests::overlay::Node| n.status()["instances"].as_array().map(Vec::len);
    assert_eq!(instances(&n1), Some(1), "only web#0, as before");
    let (status, body) = n1.api("/tablequery/result", &table("198.18.7.7"));
    assert_eq!(status, 200, "{body}");
    assert_eq!(instances(&n1), Some(2));

    // A service IP inside the VIP, from a deploy, is refused the same way.
    let d = Netns::new("ovvb");
    let (status, body) = n1.api(
        "/container/deploy",
        &deploy_body(&d, WEB, 1, &[("RR", "198.51.100.10")]),
    );
    assert_eq!(status, 409, "{body}");
    assert!(
        message(&body).contains("service IP 198.51.100.10 lies inside VIP \"vip\""),
        "{body}"
    );
    assert_eq!(
        n1.container_links().len(),
        1,
        "no link left of the refused deploy"
    );
    assert_eq!(instances(&n1), Some(2));
}

/// A container that is a local target of the load balancer answers from
/// the VIP: its veth lets that source through (a VIP is no container's
/// address), and the client gets every answer.
#[test]
fn a_container_that_is_a_load_balancer_target_answers_from_the_vip() {
    if !kernel_tests_enabled() {
        return;
    }
    const VIP: &str = "198.51.100.10";
    let (n1, client) = one_node();
    n1.register("192.0.2.0/26");
    let c = Netns::new("ovlb");
    n1.deploy(&c, WEB, 0, &[("RR", RR)]);
    c.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"]);
    // Native XDP redirect into a veth needs NAPI on the receiving side; an
    // XDP redirect loses a veth sender's "checksum pending" note.
    c.exec(&["ethtool", "-K", "tmsvc0", "gro", "on"]);
    client.exec(&[
        "sh",
        "-c",
        "for i in /sys/class/net/*; do ethtool -K ${i##*/} tx off 2>/dev/null; done; true",
    ]);
    client.ip(&["route", "add", &format!("{VIP}/32"), "via", NODE1]);
    let host = n1.container_links().pop().expect("the container's link");
    let via = tapmesh::lb::model::TargetVia::Local {
        interface: host,
        mac: tapmesh_tests::fmt_mac(c.mac("tmsvc0")),
    };
    let file = std::env::temp_dir().join(tapmesh_tests::unique("tmlbc"));
    std::fs::write(
        &file,
        lb_toml(&one_target_spec(VIP, "web", 4, &["udp"], via)),
    )
    .unwrap();
    let daemon = n1.daemon.as_ref().unwrap();
    daemon.cli(&["lb", "apply", file.to_str().unwrap()]);
    let _ = std::fs::remove_file(&file);
    // Bound to the VIP, so the answers leave from it.
    let _ = spawn_in(&c.name, || {
        let udp = UdpSocket::bind((VIP, UDP_PORT)).expect("bind on the VIP");
        let mut buf = [0u8; 64];
        while let Ok((_, from)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(b"web0", from);
        }
    });
    std::thread::sleep(Duration::from_millis(100));
    let answers = udp_ask(&client, VIP, 5);
    assert_eq!(answers.len(), 5);
    for (who, from) in &answers {
        assert_eq!(
            (who.as_str(), from.as_str()),
            ("web0", "198.51.100.10:7000")
        );
    }
    let status = daemon.status();
    assert_eq!(named(&status, "tc_service", "sender_not_deployed"), 0);
    let target = status
        .targets
        .iter()
        .find(|t| t.name == "web/1")
        .expect("target");
    assert_eq!(
        target.packets, 5,
        "each datagram went through the load balancer"
    );

    // Another container is no target of the VIP's stream: it may not send
    // from the VIP, while the target may, unasked too.
    let other = Netns::new("ovlc");
    n1.deploy(&other, WEB, 1, &[("RR", RR)]);
    other.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"]);
    let heard = spawn_in(&client.name, || {
        let udp = UdpSocket::bind((NODE2, 7001)).expect("bind on the client");
        udp.set_read_timeout(Some(Duration::from_millis(1500)))
            .unwrap();
        let mut buf = [0u8; 64];
        let mut heard = Vec::new();
        while let Ok((n, _)) = udp.recv_from(&mut buf) {
            heard.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        heard
    });
    std::thread::sleep(Duration::from_millis(100));
    for (ns, what) in [(&other, "other"), (&c, "target")] {
        spawn_in(&ns.name, move || {
            let udp = UdpSocket::bind((VIP, 0)).expect("bind on the VIP");
            for _ in 0..5 {
                udp.send_to(what.as_bytes(), (NODE2, 7001)).unwrap();
            }
        })
        .join()
        .unwrap();
    }
    assert_eq!(heard.join().unwrap(), vec!["target"; 5]);
    let status = daemon.status();
    assert_eq!(named(&status, "tc_service", "sender_not_deployed"), 5);

    // The VIP's IPv4-mapped form is no VIP: over IPv6 it is refused.
    let vip: Ipv4Addr = VIP.parse().unwrap();
    let to = "2001:db8::1".parse().unwrap();
    let ip = tapmesh_tests::frames::udp6(vip.to_ipv6_mapped(), to, 7000, 7000, b"mapped");
    let host_mac = n1.netns.mac(&n1.container_links().pop().unwrap());
    let frame = tapmesh_tests::frames::ethernet(host_mac, c.mac("tmsvc0"), &[], 0x86dd, &ip);
    tapmesh_tests::send_frames(&c.name, "tmsvc0", &vec![frame; 3]);
    let dropped = || named(&daemon.status(), "tc_service", "sender_not_deployed");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while dropped() < 8 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(dropped(), 8);
}

#[test]
fn unknown_service_ips_are_reported_once_and_work_once_the_table_knows_them() {
    if !kernel_tests_enabled() {
        return;
    }
    let lab = lab();
    let n1 = &lab.nodes.node1;
    let unknown = "203.0.113.99";
    let target: Ipv4Addr = unknown.parse().unwrap();
    // A tap of what the client sends, which sees the held datagram once.
    let mut ports = n1.container_link_indexes();
    ports.sort();
    let (_dir, pcap) = capture_port(n1.daemon.as_ref().unwrap(), &ports[0].1, "OUT");
    // One datagram, sent once, to an address no table names: the kernel
    // holds it for the daemon, which asks the cluster.
    let socket = spawn_in(&lab.client.name, move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.send_to(b"hello", SocketAddrV4::new(target, UDP_PORT))
            .unwrap();
        s
    })
    .join()
    .unwrap();
    let status = n1.status_when(|s| s["misses"].as_u64() >= Some(1) && s["held"]["kept"] == 1);
    assert_eq!(status["unresolved"], serde_json::json!([unknown]));
    assert_eq!(status["held"]["waiting"], 1, "{status}");
    let counters = n1.daemon.as_ref().unwrap().status();
    assert_eq!(
        (
            named(&counters, "tc_service", "held_for_query"),
            named(&counters, "tc_service", "unknown_service")
        ),
        (1, 0)
    );
    // The table learns it (web#1 now also carries .99, RR): the held
    // datagram goes on, and its answer comes back to the socket that sent
    // it, which never sent again.
    n1.table(
        WEB,
        &[(
            1,
            &lab.web1_ns,
            NODE2,
            &[("RR", unknown), ("InstanceNumber", WEB1_IP)],
        )],
    );
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut buf = [0u8; 64];
    let (n, from) = socket
        .recv_from(&mut buf)
        .expect("the held datagram's answer");
    assert_eq!(
        (&buf[..n], from.to_string()),
        (&b"web1"[..], format!("{unknown}:{UDP_PORT}"))
    );
    let status = n1.status_when(|s| s["held"]["sent"] == 1);
    assert_eq!(status["unresolved"], serde_json::json!([]));
    assert_eq!(status["held"]["waiting"], 0, "{status}");
    // Copied when it was held, not again when the daemon sent it on.
    n1.daemon
        .as_ref()
        .unwrap()
        .cli(&["tap-service", "delete", "cap"]);
    let rows = tapmesh_tests::tshark_rows(&pcap, &["ip.src", "ip.dst", "udp.dstport", "data.data"]);
    let copies: Vec<&String> = rows.iter().filter(|r| r.contains(unknown)).collect();
    assert_eq!(
        copies,
        [&format!(
            "{}\t{unknown}\t{UDP_PORT}\t68656c6c6f",
            lab.client_ns
        )],
        "{rows:?}"
    );
    let answers = udp_ask(&lab.client, unknown, 2);
    answered_by(&answers, "web1", unknown);

    // Bounded: 20 datagrams to an address never named: one report, 8 held
    // (the kernel's per-address budget), the rest dropped, and those 8
    // given up after 5 s.
    let never: Ipv4Addr = "203.0.113.98".parse().unwrap();
    spawn_in(&lab.client.name, move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        for _ in 0..20 {
            s.send_to(b"x", SocketAddrV4::new(never, UDP_PORT)).unwrap();
        }
    })
    .join()
    .unwrap();
    let status = n1.status_when(|s| s["held"]["kept"] == 9 && s["misses"] == 2);
    std::thread::sleep(Duration::from_millis(300));
    let counters = n1.daemon.as_ref().unwrap().status();
    assert_eq!(
        (
            named(&counters, "tc_service", "held_for_query"),
            named(&counters, "tc_service", "unknown_service")
        ),
        (9, 12)
    );
    let status_now = n1.status();
    assert_eq!(status_now["held"], status["held"], "nothing more came");
    assert_eq!(
        (&status["held"]["waiting"], &status["held"]["dropped"]),
        (&serde_json::json!(8), &serde_json::json!(0)),
        "{status}"
    );
    let status = n1.status_when(|s| s["held"]["waiting"] == 0);
    assert_eq!(status["held"]["dropped"], 8, "{status}");
    assert_eq!(status["held"]["sent"], 1, "{status}");

    // One container's budget: 40 datagrams to 40 unknown addresses within
    // one second of the kernel's clock (sent just after a second began):
    // 32 held, the veth's budget, and 8 dropped.
    spawn_in(&lab.client.name, move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        let mut t = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        loop {
            // SAFETY: writes the given timespec only.
            unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
            if t.tv_nsec < 100_000_000 {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        for i in 0..40u8 {
            let to = Ipv4Addr::new(203, 0, 113, 200 + i);
            s.send_to(b"x", SocketAddrV4::new(to, UDP_PORT)).unwrap();
        }
    })
    .join()
    .unwrap();
    n1.status_when(|s| s["held"]["kept"] == 9 + 32);
    std::thread::sleep(Duration::from_millis(300));
    let counters = n1.daemon.as_ref().unwrap().status();
    assert_eq!(
        (
            named(&counters, "tc_service", "held_for_query"),
            named(&counters, "tc_service", "unknown_service")
        ),
        (9 + 32, 12 + 8)
    );
    assert_eq!(n1.status()["held"]["waiting"], 32);
}

#[test]
fn a_packet_too_big_for_the_tunnel_gets_fragmentation_needed_and_ping_finds_the_mtu() {
    if !kernel_tests_enabled() {
        return;
    }
    let lab = lab();
    // The container's interface is sized for the tunnel: 1500 − 28.
    let (_, link) = run(&lab.client, &["ip", "-o", "link", "show", "tmsvc0"]);
    assert!(link.contains("mtu 1472"), "{link}");
    // Ping through the service IP works (ICMP echo is translated too).
    let (ok, out) = run(&lab.client, &["ping", "-c", "2", "-W", "5", WEB1_IP]);
    assert!(ok, "{out}");
    // A container that sends 1500-byte packets (its own MTU) gets ICMP
    // "fragmentation needed" with the tunnel's MTU ...
    lab.client.ip(&["link", "set", "tmsvc0", "mtu", "1500"]);
    let (ok, out) = ping_df(&lab.client, WEB1_IP, 1472, 1);
    assert!(
        !ok && out.contains("mtu = 1472"),
        "expected Frag needed (mtu = 1472): {out}"
    );
    // ... which the kernel keeps as the path MTU: the next try fails locally,
    // and a packet of that size goes through.
    let (ok, out) = ping_df(&lab.client, WEB1_IP, 1472, 1);
    assert!(
        !ok && out.contains("mtu=1472"),
        "expected the learnt path MTU: {out}"
    );
    let (ok, out) = ping_df(&lab.client, WEB1_IP, 1444, 2);
    assert!(ok, "1472-byte packets fit: {out}");
    let counters = lab.nodes.node1.daemon.as_ref().unwrap().status();
    assert_eq!(named(&counters, "tc_service", "too_big_for_tunnel"), 1);

    // A TCP segment too big for the tunnel (both ends on MTU 1500, one
    // write of a full segment, not GSO) gets the same answer and is sent
    // again smaller. Its checksum is left to the veth (CHECKSUM_PARTIAL),
    // which the kernel will not trim to fewer bytes than the TCP header:
    // the answer was refused (adjust_room_failed) and the connection hung.
    const PORT: u16 = 7005;
    lab.client.ip(&["route", "flush", "cache"]);
    lab.web1.ip(&["link", "set", "tmsvc0", "mtu", "1500"]);
    tcp_count_sink(&lab.web1, PORT);
    assert_eq!(tcp_bulk(&lab.client, WEB1_IP, PORT, 1448), "1448");
    let counters = lab.nodes.node1.daemon.as_ref().unwrap().status();
    assert_eq!(named(&counters, "tc_service", "too_big_for_tunnel"), 2);
    assert_eq!(named(&counters, "tc_service", "adjust_room_failed"), 0);
}

#[test]
fn api_errors_are_clear_and_leave_nothing_behind() {
    if !kernel_tests_enabled() {
        return;
    }
    let nodes = TwoNodes::start();
    let n1 = &nodes.node1;
    let c = Netns::new("ove");
    let body = deploy_body(&c, WEB, 0, &[("RR", RR)]);
    let (status, text) = n1.api("/container/deploy", &body);
    // Oakestra's NetManager answers 400 before /register.
    assert_eq!(
        (status, text.contains("POST /register first")),
        (400, true),
        "{text}"
    );
    // A subnet a container may not have, as for the cluster's answer
    // (found by an independent tester: 0.0.0.0/0 gave a container 0.0.0.3).
    for (subnet, why) in [
        (
            "0.0.0.0/0",
            "a /0 (a node's container subnet is a /8 to /30)",
        ),
        (
            "224.0.0.0/24",
            "a special-purpose range, not for containers",
        ),
        (
            "198.18.2.0/28",
            "overlaps the node's address (198.18.2.1/32)",
        ),
        (
            "203.0.113.0/26",
            "overlaps the service IPs (203.0.113.0/24)",
        ),
    ] {
        let body = format!(
            r#"{{"client_id": "{}", "subnetwork": "{subnet}"}}"#,
            n1.netns.name
        );
        let (status, text) = n1.api("/register", &body);
        assert_eq!(
            (status, text.contains(why)),
            (400, true),
            "{subnet}: {text}"
        );
    }
    // A /30 has room for one container.
    n1.register("192.0.2.0/30");
    let (status, text) = n1.api("/register", r#"{"client_id": "someone-else"}"#);
    assert_eq!(status, 400, "{text}");
    // Registered, a node's subnet stays: another one is said to be refused.
    let again = |subnet: &str| {
        let body = format!(
            r#"{{"client_id": "{}", "subnetwork": "{subnet}"}}"#,
            n1.netns.name
        );
        n1.api("/register", &body)
    };
    let (status, text) = again("192.0.2.64/26");
    assert_eq!(
        (
            status,
            text.contains("registered with subnetwork 192.0.2.0/30")
        ),
        (400, true),
        "{text}"
    );
    assert_eq!(again("192.0.2.0/30").0, 200);
    // Nor does it gain an IPv6 subnet it was registered without.
    let with_v6 = format!(
        r#"{{"client_id": "{}", "subnetwork": "192.0.2.0/30", "subnetwork_v6": "2001:db8:5::/120"}}"#,
        n1.netns.name
    );
    let (status, text) = n1.api("/register", &with_v6);
    assert_eq!(
        (
            status,
            text.contains("registered with subnetwork 192.0.2.0/30;")
        ),
        (400, true),
        "{text}"
    );
    let (status, text) = n1.api(
        "/container/deploy",
        r#"{"pid": 999999999, "serviceName": "a.b.c.d", "instanceNumber": 0}"#,
    );
    assert_eq!(
        (status, text.contains("no process 999999999")),
        (404, true),
        "{text}"
    );
    let (status, text) = n1.api(
        "/container/deploy",
        r#"{"serviceName": "a.b.c.d", "instanceNumber": 0}"#,
    );
    assert_eq!((status, text.contains("pid")), (400, true), "{text}");
    let (status, text) = n1.api("/container/deploy", &body.replace("RR", "Nearest"));
    assert_eq!((status, text.contains("Nearest")), (400, true), "{text}");
    let (status, text) = n1.api("/container/deploy", "{not json");
    assert_eq!(status, 400, "{text}");
    n1.post("/container/deploy", &body);
    let (status, text) = n1.api("/container/deploy", &body);
    assert_eq!(
        (status, text.contains("already deployed")),
        (409, true),
        "{text}"
    );
    let other = Netns::new("ove2");
    let (status, text) = n1.api(
        "/docker/deploy",
        &deploy_body(&other, WEB, 1, &[("RR", RR)]),
    );
    assert_eq!((status, text.contains("exhausted")), (507, true), "{text}");
    let (status, text) = n1.api(
        "/docker/undeploy",
        r#"{"serviceName": "x.y.z.w", "instanceNumber": 3}"#,
    );
    // Oakestra answers 200 to the undeploy of an unknown instance.
    assert_eq!((status, text.as_str()), (200, "{}"));
    // Only the one good deploy left an interface; the failed one left none in `other`.
    assert_eq!(n1.container_links().len(), 1);
    let (_, inside) = run(&other, &["ip", "-o", "link", "show"]);
    assert!(!inside.contains("tmsvc0"), "{inside}");
    // Undeploy frees the address for the next container.
    n1.undeploy(WEB, 0);
    n1.post(
        "/docker/deploy",
        &deploy_body(&other, WEB, 1, &[("RR", RR)]),
    );
    assert_eq!(n1.container_links().len(), 1);
}

/// An undeploy without `instanceNumber` (the seed's `/docker/undeploy`
/// names the service alone) takes the job's one instance on this node. A
/// tester found it took instance 0 whatever was deployed: with several it
/// is refused now, and nothing goes.
#[test]
fn an_undeploy_without_an_instance_number_takes_the_only_one_or_none() {
    if !kernel_tests_enabled() {
        return;
    }
    let lab = lab();
    let n1 = &lab.nodes.node1;
    let web2 = Netns::new("ovu2");
    n1.deploy(&web2, WEB, 2, &[("RR", RR)]);
    assert_eq!(n1.container_links().len(), 3);
    let pins = n1.pins();
    let before = tapmesh_tests::maps::dump_pinned(&pins);
    let (status, text) = n1.api(
        "/container/undeploy",
        &format!(r#"{{"serviceName": "{WEB}"}}"#),
    );
    assert_eq!(
        (status, text.contains("has instances 0, 2 on this node")),
        (400, true),
        "{text}"
    );
    let diff = tapmesh_tests::maps::differences(&before, &tapmesh_tests::maps::dump_pinned(&pins));
    assert!(diff.is_empty(), "maps changed: {diff:?}");
    assert_eq!(n1.container_links().len(), 3);
    answered_by(&udp_ask(&lab.client, WEB0_IP, 1), "web0", WEB0_IP);
    // A job with no instance here: Oakestra's 200, nothing changes.
    let (status, text) = n1.api(
        "/container/undeploy",
        r#"{"serviceName": "app.ns.none.ns"}"#,
    );
    assert_eq!((status, text.as_str()), (200, "{}"));
    assert_eq!(n1.container_links().len(), 3);
    // The client is its job's one instance here.
    let (status, text) = n1.api(
        "/docker/undeploy",
        &format!(r#"{{"serviceName": "{CLIENT}"}}"#),
    );
    assert_eq!((status, text.as_str()), (200, "{}"));
    let (_, inside) = run(&lab.client, &["ip", "-o", "link", "show"]);
    assert!(!inside.contains("tmsvc0"), "{inside}");
    assert_eq!(n1.container_links().len(), 2);
}

#[test]
fn containers_get_ipv6_addresses_and_a_default_route_too() {
    if !kernel_tests_enabled() {
        return;
    }
    let nodes = TwoNodes::start();
    let n1 = &nodes.node1;
    let c = Netns::new("ov6");
    for ns in [&n1.netns, &c] {
        ns.exec(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=0"]);
        ns.exec(&["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=0"]);
    }
    n1.post(
        "/register",
        r#"{"client_id": "v6", "subnetwork": "192.0.2.0/26", "subnetwork_v6": "2001:db8:5::/120"}"#,
    );
    let reply = n1.post("/container/deploy", &deploy_body(&c, WEB, 0, &[("RR", RR)]));
    assert_eq!(reply["nsAddress"], "192.0.2.2");
    assert_eq!(reply["nsAddressv6"], "2001:db8:5::2");
    let (_, addrs) = run(&c, &["ip", "-6", "-o", "addr", "show", "dev", "tmsvc0"]);
    assert!(addrs.contains("2001:db8:5::2/128"), "{addrs}");
    let (_, routes) = run(&c, &["ip", "-6", "route", "show"]);
    assert!(routes.contains("default via 2001:db8:5::1"), "{routes}");
    let (ok, out) = run(&c, &["ping", "-6", "-c", "1", "-W", "5", "2001:db8:5::1"]);
    assert!(ok, "the gateway answers over IPv6: {out}");

    // From an IPv6 address that is not the container's: dropped at its veth.
    // (The gateway's neighbour entry is made permanent: a neighbour
    // solicitation from that address would be dropped and counted too.)
    let gateway_mac = tapmesh_tests::fmt_mac(n1.netns.mac(&n1.container_links().pop().unwrap()));
    c.ip(&[
        "-6",
        "neigh",
        "replace",
        "2001:db8:5::1",
        "lladdr",
        &gateway_mac,
        "dev",
        "tmsvc0",
        "nud",
        "permanent",
    ]);
    c.ip(&[
        "addr",
        "add",
        "2001:db8:77::1/128",
        "dev",
        "tmsvc0",
        "nodad",
    ]);
    let daemon = n1.daemon.as_ref().unwrap();
    let before = named(&daemon.status(), "tc_service", "sender_not_deployed");
    let listener = spawn_in(&n1.netns.name, || {
        let socket = UdpSocket::bind("[::]:7007").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(1500)))
            .unwrap();
        let mut got = 0;
        while socket.recv(&mut [0u8; 64]).is_ok() {
            got += 1;
        }
        got
    });
    std::thread::sleep(Duration::from_millis(100));
    let _ = spawn_in(&c.name, || {
        let socket = UdpSocket::bind("[2001:db8:77::1]:0").unwrap();
        for _ in 0..3 {
            socket.send_to(b"spoofed", "[2001:db8:5::1]:7007").unwrap();
        }
    })
    .join();
    assert_eq!(
        listener.join().unwrap(),
        0,
        "the node got spoofed datagrams"
    );
    let after = named(&daemon.status(), "tc_service", "sender_not_deployed");
    assert_eq!(after - before, 3);
    n1.undeploy(WEB, 0);
    let (_, links) = run(&c, &["ip", "-o", "link", "show"]);
    assert!(!links.contains("tmsvc0"), "{links}");
}

#[test]
fn port_mappings_forward_node_ports_to_the_container_until_undeploy() {
    if !kernel_tests_enabled() {
        return;
    }
    let nodes = TwoNodes::start();
    let (n1, n2) = (&nodes.node1, &nodes.node2);
    n1.register("192.0.2.0/26");
    let web = Netns::new("ovp");
    let body = deploy_body(&web, WEB, 0, &[("RR", RR)]).replace(
        r#""portMappings": """#,
        r#""portMappings": "8080:7000/udp;8081:7001""#,
    );
    n1.post("/container/deploy", &body);
    who_servers(&web, "web0");
    // A second container may not take the same node port.
    let other = Netns::new("ovp2");
    let clash = deploy_body(&other, WEB, 1, &[])
        .replace(r#""portMappings": """#, r#""portMappings": "8080:9/udp""#);
    let (status, text) = n1.api("/container/deploy", &clash);
    assert_eq!((status, text.contains("8080")), (409, true), "{text}");
    let (status, text) = n1.api(
        "/container/deploy",
        &clash.replace("8080:9/udp", "8080:9/sctp"),
    );
    assert_eq!(
        (status, text.contains("HOST:CONTAINER")),
        (400, true),
        "{text}"
    );
    // Nor a port of the node itself: the tunnel's, one a node service
    // holds (its DNAT would take the node's own traffic too), nor one port
    // twice in one request.
    let held = spawn_in(&n1.netns.name, || {
        std::net::TcpListener::bind((std::net::Ipv4Addr::UNSPECIFIED, 8099)).unwrap()
    })
    .join()
    .unwrap();
    for (mappings, code, says) in [
        ("50103:9/udp", 409, "tunnel"),
        ("8099:9", 409, "held by a service of the node"),
        ("8082:9/udp;8082:10/udp", 400, "given twice"),
    ] {
        let (status, text) = n1.api("/container/deploy", &clash.replace("8080:9/udp", mappings));
        assert_eq!((status, text.contains(says)), (code, true), "{text}");
    }
    drop(held);

    // From the other node, to node 1's address.
    let (udp, tcp) = {
        // The who-servers listen on 7000/7001; the node ports are 8080/8081.
        let ns = n2.netns.name.clone();
        spawn_in(&ns, move || {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            s.send_to(b"hi", (NODE1, 8080)).unwrap();
            let mut buf = [0u8; 64];
            let udp = s
                .recv_from(&mut buf)
                .map(|(n, _)| String::from_utf8_lossy(&buf[..n]).to_string());
            let mut tcp = String::new();
            if let Ok(mut c) = TcpStream::connect((NODE1, 8081)) {
                c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let _ = c.read_to_string(&mut tcp);
            }
            (udp.unwrap_or_default(), tcp)
        })
        .join()
        .unwrap()
    };
    assert_eq!((udp.as_str(), tcp.as_str()), ("web0", "web0"));
    // A service-prefix source is the tunnel's alone: sent in plain IP to
    // the node port, it passes the uplink (its destination is the node)
    // and the DNAT, and is refused at the container's veth.
    let refused = || {
        let status = n1.daemon.as_ref().unwrap().status();
        named(&status, "tc_service", "service_source_outside_tunnel")
    };
    let before = refused();
    n2.netns
        .ip(&["addr", "add", "203.0.113.77/32", "dev", "lo"]);
    spawn_in(&n2.netns.name, || {
        let s = UdpSocket::bind("203.0.113.77:40000").unwrap();
        for _ in 0..20 {
            s.send_to(b"forged", (NODE1, 8080)).unwrap();
        }
    })
    .join()
    .unwrap();
    let all = tapmesh_tests::net::wait_until(Duration::from_secs(30), || refused() - before == 20);
    assert!(all, "{} of 20 refused at the veth", refused() - before);
    let (_, rules) = run(
        &n1.netns,
        &["nft", "list", "table", "ip", "tapmesh_netmanager"],
    );
    assert!(rules.contains("dnat to 192.0.2.2:7000"), "{rules}");
    n1.undeploy(WEB, 0);
    let (exists, _) = run(
        &n1.netns,
        &["nft", "list", "table", "ip", "tapmesh_netmanager"],
    );
    assert!(!exists, "the table goes with the last mapping");
}

#[test]
fn an_eds_cluster_bound_to_a_service_ip_picks_its_members_and_weights() {
    if !kernel_tests_enabled() {
        return;
    }
    use tapmesh_tests::xds_peer::{Cla, ControlPlane, Ep};
    const FED: &str = "203.0.113.50";
    let mut cp: Option<ControlPlane> = None;
    let nodes = TwoNodes::start_with(|netns| {
        let plane = ControlPlane::start_in(netns, false);
        let text = format!(
            "[xds]\nserver = \"{}\"\nnode_id = \"node-1\"\nmissing_after = \"60s\"\n\
             [[xds.clusters]]\nname = \"web\"\nservice_ip = \"{FED}\"\n",
            plane.address()
        );
        cp = Some(plane);
        text
    });
    let mut cp = cp.expect("control plane");
    let (n1, n2) = (&nodes.node1, &nodes.node2);
    n1.register("192.0.2.0/26");
    n2.register("192.0.2.64/26");
    let (client, web0, web1) = (Netns::new("ovxc"), Netns::new("ovx0"), Netns::new("ovx1"));
    let c_ns = n1.deploy(&client, CLIENT, 0, &[("InstanceNumber", CLIENT_IP)]);
    let w0 = n1.deploy(&web0, WEB, 0, &[("InstanceNumber", WEB0_IP)]);
    let w1 = n2.deploy(&web1, WEB, 1, &[("InstanceNumber", WEB1_IP)]);
    n1.table(WEB, &[(1, &w1, NODE2, &[("InstanceNumber", WEB1_IP)])]);
    n2.table(
        CLIENT,
        &[(0, &c_ns, NODE1, &[("InstanceNumber", CLIENT_IP)])],
    );
    who_servers(&web0, "web0");
    who_servers(&web1, "web1");

    // Before EDS says anything, the service IP is unknown: reported once.
    let early = udp_ask(&client, FED, 1);
    assert_eq!(early[0].0, "(no answer)");
    assert_eq!(n1.status()["unresolved"], serde_json::json!([FED]));

    cp.set(
        "1",
        &[(
            "web",
            Cla::single(vec![
                Ep::new(&w0, 7000).weight(3),
                Ep::new(&w1, 7000).weight(1),
            ]),
        )],
    );
    cp.wait_request(Duration::from_secs(20), "ACK of version 1", |r| {
        r.version_info == "1" && r.error_detail.is_none() && !r.response_nonce.is_empty()
    });
    // The ACK came after the maps were written: the miss is resolved.
    assert_eq!(n1.status()["unresolved"], serde_json::json!([]));
    // The early packet was held, and goes on now, taking a turn of the
    // round robin: once it has, the 8 flows below take 8 turns in a row
    // (under load it went on among them once, and they saw 7:1).
    n1.status_when(|s| {
        let held = |k: &str| s["held"][k].as_u64().unwrap_or(0);
        held("waiting") == 0 && held("kept") == held("sent") + held("dropped")
    });
    let answers = udp_ask(&client, FED, 8);
    let on = |name: &str| answers.iter().filter(|(n, _)| n == name).count();
    assert_eq!(
        (on("web0"), on("web1")),
        (6, 2),
        "weights 3:1 over 8 flows: {answers:?}"
    );
    assert!(
        answers
            .iter()
            .all(|(_, f)| f == &format!("{FED}:{UDP_PORT}")),
        "{answers:?}"
    );

    let out = std::process::Command::new(tapmesh_tests::daemon::tapmesh_bin())
        .args(["catalog", "list", "--admin-socket"])
        .arg(&n1.daemon.as_ref().unwrap().socket)
        .output()
        .expect("tapmesh catalog list");
    let listing = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        listing.contains(&format!("web (from eds) vip service IP {FED}")),
        "{listing}"
    );
    assert!(
        listing.contains(&format!("{WEB1_IP} InstanceNumber (from netmanager)")),
        "{listing}"
    );
    assert!(
        listing.contains(&format!("{w1} weight 1 at {NODE2}:50103")),
        "{listing}"
    );

    // Only web#1 now: new flows all go there.
    cp.set("2", &[("web", Cla::single(vec![Ep::new(&w1, 7000)]))]);
    cp.wait_request(Duration::from_secs(20), "ACK of version 2", |r| {
        r.version_info == "2" && r.error_detail.is_none()
    });
    let answers = udp_ask(&client, FED, 3);
    assert!(answers.iter().all(|(n, _)| n == "web1"), "{answers:?}");
}

/// Node 1's table for `WEB` on node 2: web#1 (dual stack, `web1_ips`)
/// and web#2 (IPv4 only, namespace 192.0.2.99, `web2_ips`).
fn node1_post_web2(
    node1: &tapmesh_tests::overlay::Node,
    web1_ns: &(String, String),
    web1_ips: &str,
    web2_ips: &str,
) {
    node1.post(
        "/tablequery/result",
        &format!(
            r#"{{"app_name": "{WEB}", "instance_list": [
                {{"instance_number": 1, "namespace_ip": "{}", "namespace_ip_v6": "{}", "host_ip": "{NODE2}", "host_port": 50103, "service_ip": [{web1_ips}]}},
                {{"instance_number": 2, "namespace_ip": "192.0.2.99", "host_ip": "{NODE2}", "host_port": 50103, "service_ip": [{web2_ips}]}}]}}"#,
            web1_ns.0, web1_ns.1
        ),
    );
}

/// Answers UDP datagrams over IPv6 (and IPv4) with `name`, forever.
fn who_server6(container: &Netns, name: &'static str) {
    let ns = container.name.clone();
    let _ = spawn_in(&ns, move || {
        let udp = UdpSocket::bind(format!("[::]:{UDP_PORT}")).expect("udp bind");
        let mut buf = [0u8; 2048];
        while let Ok((_, from)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(name.as_bytes(), from);
        }
    });
    std::thread::sleep(Duration::from_millis(100));
}

/// The container interface's link-local address, once DAD has passed.
fn wait_for_link_local(c: &Netns) -> std::net::Ipv6Addr {
    let mut found = None;
    let ready = tapmesh_tests::net::wait_until(Duration::from_secs(30), || {
        let out = c.ip(&["-j", "address", "show", "dev", "tmsvc0"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        found = v
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|l| l["addr_info"].as_array().into_iter().flatten())
            .find(|a| a["scope"] == "link" && a["family"] == "inet6" && a["tentative"].is_null())
            .and_then(|a| a["local"].as_str())
            .and_then(|a| a.parse().ok());
        found.is_some()
    });
    assert!(
        ready,
        "no link-local address on the container's interface: {}",
        String::from_utf8_lossy(&c.ip(&["-6", "address", "show"]).stdout)
    );
    found.unwrap()
}
#[test]
fn ipv6_service_ips_reach_instances_on_both_nodes_and_ping_finds_the_mtu() {
    if !kernel_tests_enabled() {
        return;
    }
    const RR6: &str = "2001:db8:ff::10";
    const CLIENT_IP6: &str = "2001:db8:ff::100";
    const WEB0_IP6: &str = "2001:db8:ff::101";
    const WEB1_IP6: &str = "2001:db8:ff::102";
    let nodes = TwoNodes::start();
    let client = Netns::new("ov6c");
    let web0 = Netns::new("ov6w0");
    let web1 = Netns::new("ov6w1");
    for ns in [
        &nodes.node1.netns,
        &nodes.node2.netns,
        &client,
        &web0,
        &web1,
    ] {
        ns.exec(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=0"]);
        ns.exec(&["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=0"]);
    }
    for (node, v4, v6) in [
        (&nodes.node1, "192.0.2.0/26", "2001:db8:1::/120"),
        (&nodes.node2, "192.0.2.64/26", "2001:db8:2::/120"),
    ] {
        node.post(
            "/register",
            &format!(
                r#"{{"client_id": "{}", "subnetwork": "{v4}", "subnetwork_v6": "{v6}"}}"#,
                node.netns.name
            ),
        );
    }
    let sips = |list: &[(&str, &str, &str)]| {
        list.iter()
            .map(|(t, a, a6)| {
                format!(r#"{{"IpType": "{t}", "Address": "{a}", "Address_v6": "{a6}"}}"#)
            })
            .collect::<Vec<_>>()
            .join(",")
    };
    let deploy = |node: &tapmesh_tests::overlay::Node,
                  c: &Netns,
                  job: &str,
                  n: u32,
                  list: &[(&str, &str, &str)]| {
        let reply = node.post(
            "/container/deploy",
            &format!(
                r#"{{"netns": "/run/netns/{}", "serviceName": "{job}", "instanceNumber": {n}, "portMappings": "", "serviceIp": [{}]}}"#,
                c.name,
                sips(list)
            ),
        );
        (
            reply["nsAddress"].as_str().unwrap().to_string(),
            reply["nsAddressv6"].as_str().unwrap().to_string(),
        )
    };
    let client_ips = [("InstanceNumber", CLIENT_IP, CLIENT_IP6)];
    let web0_ips = [("RR", RR, RR6), ("InstanceNumber", WEB0_IP, WEB0_IP6)];
    let web1_ips = [("RR", RR, RR6), ("InstanceNumber", WEB1_IP, WEB1_IP6)];
    let client_ns = deploy(&nodes.node1, &client, CLIENT, 0, &client_ips);
    let web0_ns = deploy(&nodes.node1, &web0, WEB, 0, &web0_ips);
    let web1_ns = deploy(&nodes.node2, &web1, WEB, 1, &web1_ips);
    assert!(client_ns.1.starts_with("2001:db8:1::"), "{client_ns:?}");
    assert!(web1_ns.1.starts_with("2001:db8:2::"), "{web1_ns:?}");
    let table = |node: &tapmesh_tests::overlay::Node,
                 job: &str,
                 n: u32,
                 ns: &(String, String),
                 at: &str,
                 list: &[(&str, &str, &str)]| {
        node.post(
            "/tablequery/result",
            &format!(
                r#"{{"app_name": "{job}", "instance_list": [{{"instance_number": {n}, "namespace_ip": "{}", "namespace_ip_v6": "{}", "host_ip": "{at}", "host_port": 50103, "service_ip": [{}]}}]}}"#,
                ns.0,
                ns.1,
                sips(list)
            ),
        );
    };
    // Two datagrams to web#1's instance IP, unknown on node 1 yet: one
    // from the client's own address, one from its link-local address
    // (which the kernel holds too). Once the table names the address only
    // the first is sent again: the other would drop as `sender_not_deployed`.
    let link_local = wait_for_link_local(&client);
    let (own, scope) = (client_ns.1.clone(), "tmsvc0");
    spawn_in(&client.name, move || {
        let index = tapmesh::net::link::index(scope).expect("the container's interface");
        let ll = UdpSocket::bind(std::net::SocketAddrV6::new(link_local, 0, 0, index)).unwrap();
        let from_own = UdpSocket::bind(format!("[{own}]:0")).unwrap();
        let to: std::net::Ipv6Addr = WEB1_IP6.parse().unwrap();
        from_own.send_to(b"own", (to, UDP_PORT)).unwrap();
        ll.send_to(b"link-local", (to, UDP_PORT)).unwrap();
    })
    .join()
    .unwrap();
    nodes.node1.status_when(|s| s["held"]["kept"] == 2);
    table(&nodes.node1, WEB, 1, &web1_ns, NODE2, &web1_ips);
    let status = nodes.node1.status_when(|s| {
        s["held"]["sent"].as_u64().unwrap_or(0) + s["held"]["dropped"].as_u64().unwrap_or(0) == 2
    });
    assert_eq!(
        (&status["held"]["sent"], &status["held"]["dropped"]),
        (&serde_json::json!(1), &serde_json::json!(1)),
        "{status}"
    );
    // Node 1 also learns of a web#2 with no IPv6 address: the IPv6 service
    // IP must never pick it (its IPv4 twin may).
    node1_post_web2(
        &nodes.node1,
        &web1_ns,
        &sips(&web1_ips),
        &sips(&[("RR", RR, RR6)]),
    );
    table(&nodes.node2, WEB, 0, &web0_ns, NODE1, &web0_ips);
    table(&nodes.node2, CLIENT, 0, &client_ns, NODE1, &client_ips);
    who_server6(&web0, "web0");
    who_server6(&web1, "web1");

    // An unknown IPv6 service IP: one report, a few packets held, the rest dropped.
    let unknown: std::net::Ipv6Addr = "2001:db8:ff::99".parse().unwrap();
    spawn_in(&client.name, move || {
        let s = UdpSocket::bind("[::]:0").unwrap();
        for _ in 0..20 {
            s.send_to(b"x", (unknown, UDP_PORT)).unwrap();
        }
    })
    .join()
    .unwrap();
    // The report reaches the daemon in its own time; any second one
    // would come right behind it.
    nodes
        .node1
        .status_when(|s| s["misses"].as_u64() >= Some(2) && s["held"]["kept"] == 10);
    std::thread::sleep(Duration::from_millis(300));
    let status = nodes.node1.status();
    assert_eq!(
        status["misses"], 2,
        "web#1's instance IP, then 20 packets with one report: {status}"
    );
    assert_eq!(
        status["unresolved"],
        serde_json::json!([unknown.to_string()])
    );
    // Held for the answer as IPv4 packets are: 8 of them for this address
    // (the kernel's budget per address), the other 12 dropped there.
    assert_eq!(
        (&status["held"]["waiting"], &status["held"]["dropped"]),
        (&serde_json::json!(8), &serde_json::json!(1)),
        "{status}"
    );
    let counters = nodes.node1.daemon.as_ref().unwrap().status();
    assert_eq!(
        (
            named(&counters, "tc_service", "held_for_query"),
            named(&counters, "tc_service", "unknown_service")
        ),
        (10, 12)
    );

    // RR over IPv6: flows alternate between the nodes' instances, and every
    // answer comes from the IPv6 service IP.
    let answers = udp_ask(&client, RR6, 6);
    let names: Vec<String> = answers.iter().map(|(n, _)| n.clone()).collect();
    assert!(
        alternates(&names) && names.contains(&"web1".to_string()),
        "{answers:?}"
    );
    let rr6_from = format!("[{RR6}]:{UDP_PORT}");
    assert!(
        answers.iter().all(|(_, from)| *from == rr6_from),
        "{answers:?}"
    );
    // A source port that reached web#0 by RR6, used again for its instance
    // IP: the answers come from the address dialled each time.
    let port = (0..4)
        .map(|_| NEXT_PORT.fetch_add(1, Ordering::Relaxed))
        .find(|&p| udp_ask_from(&client, p, RR6).0 == "web0")
        .expect("RR6 alternates: one of four flows reaches web#0");
    assert_eq!(
        udp_ask_from(&client, port, WEB0_IP6),
        ("web0".to_string(), format!("[{WEB0_IP6}]:{UDP_PORT}"))
    );
    // An IPv6 instance IP reaches exactly its instance, ICMPv6 echo included.
    let only1 = udp_ask(&client, WEB1_IP6, 3);
    assert!(only1.iter().all(|(n, _)| n == "web1"), "{only1:?}");
    let (ok, out) = run(&client, &["ping", "-6", "-c", "2", "-W", "5", WEB1_IP6]);
    assert!(ok, "{out}");
    // Fragmented IPv6 datagrams (Fragment header) follow their first
    // fragment both ways and come back whole from the service IP.
    echo_servers(&[(&web0, "web0"), (&web1, "web1")], true);
    big_datagrams_come_back_whole(&client, SocketAddr::new(RR6.parse().unwrap(), ECHO_PORT));
    // UDP GSO to the remote instance: 1472 less 40 + 8.
    gso_sends_arrive_as_their_datagrams(&client, &web1, WEB1_IP6.parse().unwrap(), 1424);
    // Too big for the tunnel: ICMPv6 "packet too big" with the tunnel's MTU,
    // which the sender keeps as the path MTU.
    client.ip(&["link", "set", "tmsvc0", "mtu", "1500"]);
    let (ok, out) = ping_df(&client, WEB1_IP6, 1452, 1);
    assert!(
        !ok && out.contains("1472"),
        "expected packet too big (mtu 1472): {out}"
    );
    let (ok, out) = ping_df(&client, WEB1_IP6, 1452, 1);
    assert!(
        !ok && out.contains("1472"),
        "expected the learnt path MTU: {out}"
    );
    let (ok, out) = ping_df(&client, WEB1_IP6, 1424, 2);
    assert!(ok, "1472-byte packets fit: {out}");
    // So does a UDP GSO send whose segments do not fit (1500 bytes each).
    client.ip(&["-6", "route", "flush", "cache"]);
    let to = SocketAddr::new(WEB1_IP6.parse().unwrap(), GSO_PORT);
    gso_too_big_teaches_the_path_mtu(&client, &web1, to, 1452);
    // The "packet too big" quotes enough of a packet with an extension
    // header (destination options) for the sender to take it: its path MTU
    // is learnt again after the cache is flushed.
    client.ip(&["-6", "route", "flush", "cache"]);
    let to: std::net::Ipv6Addr = WEB1_IP6.parse().unwrap();
    spawn_in(&client.name, move || {
        let s = UdpSocket::bind("[::]:0").unwrap();
        // Next header (set by the kernel), length 0 (8 bytes), PadN of 4.
        let options: [u8; 8] = [0, 0, 1, 4, 0, 0, 0, 0];
        // SAFETY: a plain setsockopt on a live socket with an 8-byte buffer.
        let rc = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&s),
                libc::IPPROTO_IPV6,
                libc::IPV6_DSTOPTS,
                options.as_ptr().cast(),
                options.len() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "IPV6_DSTOPTS: {}", std::io::Error::last_os_error());
        let _ = s.send_to(&[0u8; 1440], (to, UDP_PORT));
    })
    .join()
    .unwrap();
    let learnt = tapmesh_tests::net::wait_until(Duration::from_secs(30), || {
        run(&client, &["ip", "-6", "route", "get", WEB1_IP6])
            .1
            .contains("mtu 1472")
    });
    assert!(
        learnt,
        "no path MTU from a packet too big quoting destination options: {}",
        run(&client, &["ip", "-6", "route", "get", WEB1_IP6]).1
    );

    // What node 2's uplink XDP hands to web#1's port through the tunnel is
    // copied by an IN tap flow there (the detour through the uplink's TC
    // ingress), IPv6 as IPv4.
    let n2 = &nodes.node2;
    let daemon = n2.daemon.as_ref().expect("running");
    let port = n2.container_link_indexes()[0].1.clone();
    let (_dir, pcap) = capture_port(daemon, &port, "IN");
    let asked = udp_ask(&client, WEB1_IP6, 3);
    assert!(asked.iter().all(|(n, _)| n == "web1"), "{asked:?}");
    let listing: serde_json::Value =
        serde_json::from_str(&daemon.cli(&["tap-flow", "list", "-o", "json"])).expect("JSON");
    daemon.cli(&["tap-service", "delete", "cap"]);
    let copies = tapmesh_tests::tshark_rows(&pcap, &["ipv6.src", "ipv6.dst", "udp.dstport"]);
    let requests = copies
        .iter()
        .filter(|l| **l == format!("{CLIENT_IP6}\t{}\t{UDP_PORT}", web1_ns.1))
        .count();
    assert_eq!(requests, 3, "{copies:?}");
    // Anything else copied (neighbour discovery) is counted too, no more.
    assert_eq!(listing[0]["mirrored_packets"], copies.len(), "{listing}");

    // A closed port behind an IPv6 service IP: the instance's ICMPv6
    // error reaches the client translated, so its connected socket gets
    // ECONNREFUSED (an instance on this node and one on the other).
    for to in [WEB0_IP6, WEB1_IP6, RR6, RR6] {
        let to: std::net::Ipv6Addr = to.parse().unwrap();
        let got = spawn_in(&client.name, move || {
            let s = UdpSocket::bind("[::]:0").unwrap();
            s.connect((to, 9)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            s.send(b"anyone?").unwrap();
            let mut buf = [0u8; 16];
            s.recv(&mut buf).map_err(|e| e.kind())
        })
        .join()
        .unwrap();
        assert_eq!(
            got,
            Err(std::io::ErrorKind::ConnectionRefused),
            "to [{to}]:9"
        );
    }

    // An IPv6 service-prefix source routed to node 1 through a second
    // interface (no XDP there) is refused at web#0's veth; another source
    // gets through the same way.
    let n1 = &nodes.node1;
    let side = Netns::new("ov6s");
    for ns in [&n1.netns, &side] {
        for key in [
            "all.disable_ipv6=0",
            "default.disable_ipv6=0",
            "default.accept_dad=0",
        ] {
            ns.exec(&["sysctl", "-qw", &format!("net.ipv6.conf.{key}")]);
        }
    }
    n1.netns
        .exec(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
    tapmesh_tests::link(&n1.netns, "2001:db8:99::1/64", &side, "2001:db8:99::2/64");
    side.ip(&["-6", "addr", "add", "2001:db8:ff::77/128", "dev", "lo"]);
    side.ip(&[
        "-6",
        "route",
        "add",
        &format!("{}/128", web0_ns.1),
        "via",
        "2001:db8:99::1",
    ]);
    let web0_6: std::net::Ipv6Addr = web0_ns.1.parse().unwrap();
    let answered = spawn_in(&side.name, move || {
        let s = UdpSocket::bind("[2001:db8:99::2]:40002").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s.send_to(b"side", (web0_6, UDP_PORT)).unwrap();
        let mut buf = [0u8; 64];
        s.recv_from(&mut buf).map(|(n, _)| buf[..n].to_vec()).ok()
    })
    .join()
    .unwrap();
    assert_eq!(
        answered.as_deref(),
        Some(&b"web0"[..]),
        "the side way in works"
    );
    let refused = || {
        let status = n1.daemon.as_ref().unwrap().status();
        named(&status, "tc_service", "service_source_outside_tunnel")
    };
    let before = refused();
    spawn_in(&side.name, move || {
        let s = UdpSocket::bind("[2001:db8:ff::77]:40003").unwrap();
        for _ in 0..20 {
            s.send_to(b"forged", (web0_6, UDP_PORT)).unwrap();
        }
    })
    .join()
    .unwrap();
    let all = tapmesh_tests::net::wait_until(Duration::from_secs(30), || refused() - before == 20);
    assert!(all, "{} of 20 refused at the veth", refused() - before);

    // Nor to the addresses every container takes packets for: multicast
    // sent by the node itself out of each container's veth, from a
    // service-prefix source (a socket free to use any source), IPv6 and IPv4.
    let links: Vec<u32> = n1.container_link_indexes().iter().map(|l| l.0).collect();
    assert_eq!(links.len(), 2, "client and web#0 on node 1");
    let before = refused();
    spawn_in(&n1.netns.name, move || {
        for &ifindex in &links {
            let v6 = transparent_udp("[2001:db8:ff::77]:40005".parse().unwrap());
            let all_nodes =
                std::net::SocketAddrV6::new("ff02::1".parse().unwrap(), UDP_PORT, 0, ifindex);
            let v4 = transparent_udp("203.0.113.77:40005".parse().unwrap());
            let out = libc::ip_mreqn {
                imr_multiaddr: libc::in_addr { s_addr: 0 },
                imr_address: libc::in_addr { s_addr: 0 },
                imr_ifindex: ifindex as i32,
            };
            // SAFETY: a plain setsockopt on a live socket with its struct.
            let rc = unsafe {
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(&v4),
                    libc::IPPROTO_IP,
                    libc::IP_MULTICAST_IF,
                    (&raw const out).cast(),
                    std::mem::size_of::<libc::ip_mreqn>() as libc::socklen_t,
                )
            };
            assert_eq!(
                rc,
                0,
                "IP_MULTICAST_IF: {}",
                std::io::Error::last_os_error()
            );
            for _ in 0..5 {
                v6.send_to(b"forged", all_nodes).unwrap();
                v4.send_to(b"forged", ("224.0.0.1", UDP_PORT)).unwrap();
            }
        }
    })
    .join()
    .unwrap();
    let all = tapmesh_tests::net::wait_until(Duration::from_secs(30), || refused() - before == 20);
    assert!(
        all,
        "{} of 20 multicast refused at the veths",
        refused() - before
    );
}

/// A UDP socket bound to `addr` whether or not the node holds it
/// (`IP_TRANSPARENT` / `IPV6_TRANSPARENT`, as root).
fn transparent_udp(addr: SocketAddr) -> UdpSocket {
    use std::os::fd::FromRawFd;
    let (family, level, option) = match addr {
        SocketAddr::V4(_) => (libc::AF_INET, libc::IPPROTO_IP, libc::IP_TRANSPARENT),
        SocketAddr::V6(_) => (libc::AF_INET6, libc::IPPROTO_IPV6, libc::IPV6_TRANSPARENT),
    };
    // SAFETY: plain libc calls; the descriptor is owned by the socket made from it.
    unsafe {
        let fd = libc::socket(family, libc::SOCK_DGRAM, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let on: libc::c_int = 1;
        let rc = libc::setsockopt(fd, level, option, (&raw const on).cast(), 4);
        assert_eq!(rc, 0, "transparent: {}", std::io::Error::last_os_error());
        let socket = UdpSocket::from_raw_fd(fd);
        let (raw, len) = match addr {
            SocketAddr::V4(a) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from(*a.ip()).to_be(),
                    },
                    sin_zero: [0; 8],
                };
                let mut storage: libc::sockaddr_storage = std::mem::zeroed();
                std::ptr::write((&raw mut storage).cast(), sin);
                (storage, std::mem::size_of::<libc::sockaddr_in>())
            }
            SocketAddr::V6(a) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: a.port().to_be(),
                    sin6_flowinfo: 0,
                    sin6_addr: libc::in6_addr {
                        s6_addr: a.ip().octets(),
                    },
                    sin6_scope_id: 0,
                };
                let mut storage: libc::sockaddr_storage = std::mem::zeroed();
                std::ptr::write((&raw mut storage).cast(), sin6);
                (storage, std::mem::size_of::<libc::sockaddr_in6>())
            }
        };
        let rc = libc::bind(fd, (&raw const raw).cast(), len as libc::socklen_t);
        assert_eq!(rc, 0, "bind {addr}: {}", std::io::Error::last_os_error());
        socket
    }
}

const ECHO_PORT: u16 = 7003;

/// Echo servers on [`ECHO_PORT`] (IPv4 or IPv6): the name, then the datagram they got.
fn echo_servers(containers: &[(&Netns, &'static str)], v6: bool) {
    for (c, name) in containers {
        let name = *name;
        let bind = if v6 { "[::]" } else { "0.0.0.0" };
        let _ = spawn_in(&c.name, move || {
            let udp = UdpSocket::bind(format!("{bind}:{ECHO_PORT}")).expect("udp bind");
            let mut buf = [0u8; 9000];
            while let Ok((n, from)) = udp.recv_from(&mut buf) {
                let reply = [name.as_bytes(), &buf[..n]].concat();
                let _ = udp.send_to(&reply, from);
            }
        });
    }
    std::thread::sleep(Duration::from_millis(100));
}

/// One flow per call of a 4000-byte datagram (fragments over the 1472-byte
/// MTU) to an echo server: (who answered, from where, the answer was the
/// datagram whole).
fn ask_big(client: &Netns, to: SocketAddr, flows: u8) -> Vec<(String, String, bool)> {
    spawn_in(&client.name, move || {
        (0..flows)
            .map(|flow| {
                let any = if to.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" };
                let s = UdpSocket::bind(any).unwrap();
                s.set_read_timeout(Some(Duration::from_millis(2500)))
                    .unwrap();
                let datagram: Vec<u8> = (0..4000u32).map(|i| (i as u8) ^ flow).collect();
                for _ in 0..3 {
                    s.send_to(&datagram, to).unwrap();
                    let mut buf = [0u8; 9000];
                    if let Ok((n, from)) = s.recv_from(&mut buf) {
                        let whole = n == 4004 && buf[4..n] == datagram[..];
                        return (
                            String::from_utf8_lossy(&buf[..4]).to_string(),
                            from.to_string(),
                            whole,
                        );
                    }
                }
                ("(no answer)".to_string(), String::new(), false)
            })
            .collect()
    })
    .join()
    .expect("client thread")
}

/// Four flows of 4000-byte datagrams to the RR service IP `to` (web0 and
/// web1 echo): the flows alternate between the instances, and every answer
/// is the datagram whole, from the service IP.
fn big_datagrams_come_back_whole(client: &Netns, to: SocketAddr) {
    let answers = ask_big(client, to, 4);
    let names: Vec<String> = answers.iter().map(|(n, _, _)| n.clone()).collect();
    assert!(
        alternates(&names) && names.contains(&"web1".to_string()),
        "{answers:?}"
    );
    let from = to.to_string();
    assert!(
        answers.iter().all(|(_, f, whole)| *f == from && *whole),
        "every answer whole and from the service IP {from}: {answers:?}"
    );
}

const GSO_PORT: u16 = 7004;

/// Receives datagrams on [`GSO_PORT`] in `container` until `count` came or
/// none came for 3 s; returns them.
fn receive_datagrams(
    container: &Netns,
    v6: bool,
    count: usize,
) -> std::thread::JoinHandle<Vec<Vec<u8>>> {
    let bind = if v6 { "[::]" } else { "0.0.0.0" };
    let socket = tapmesh_tests::net::run_in(&container.name, move || {
        UdpSocket::bind(format!("{bind}:{GSO_PORT}")).expect("udp bind")
    });
    socket
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    std::thread::spawn(move || {
        let mut got = Vec::new();
        let mut buf = [0u8; 9000];
        while got.len() < count {
            match socket.recv(&mut buf) {
                Ok(n) => got.push(buf[..n].to_vec()),
                Err(_) => break,
            }
        }
        got
    })
}

/// From inside `client`: one `send` of `total` bytes that the kernel cuts
/// into datagrams of `segment` bytes (`UDP_SEGMENT`, UDP GSO, as QUIC
/// stacks send); returns the bytes sent.
fn send_gso(client: &Netns, to: SocketAddr, segment: u16, total: usize) -> Vec<u8> {
    let payload: Vec<u8> = (0..total).map(|i| (i % 251) as u8).collect();
    let sent = try_send_gso(client, to, segment, payload);
    assert_eq!(sent.as_ref().ok(), Some(&total), "GSO send: {sent:?}");
    (0..total).map(|i| (i % 251) as u8).collect()
}

/// [`send_gso`] of `payload`, which may fail.
fn try_send_gso(
    client: &Netns,
    to: SocketAddr,
    segment: u16,
    payload: Vec<u8>,
) -> std::io::Result<usize> {
    spawn_in(&client.name, move || {
        use std::os::fd::AsRawFd;
        let any = if to.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" };
        let s = UdpSocket::bind(any).unwrap();
        let size = libc::c_int::from(segment);
        // SAFETY: a valid socket and an int option of the right size.
        let rc = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_UDP,
                libc::UDP_SEGMENT,
                (&raw const size).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "UDP_SEGMENT: {}", std::io::Error::last_os_error());
        s.send_to(&payload, to)
    })
    .join()
    .expect("client thread")
}

/// A UDP GSO send to `to` whose segments of `segment` bytes do not fit
/// the tunnel: none arrives at `server`, and the ICMP answer (the tunnel's
/// MTU) becomes the client's path MTU, so its next such send fails at once.
fn gso_too_big_teaches_the_path_mtu(client: &Netns, server: &Netns, to: SocketAddr, segment: u16) {
    let to = SocketAddr::new(to.ip(), GSO_PORT);
    let received = receive_datagrams(server, to.is_ipv6(), 1);
    send_gso(client, to, segment, 2 * usize::from(segment));
    let learnt = tapmesh_tests::net::wait_until(Duration::from_secs(10), || {
        try_send_gso(client, to, segment, vec![0; 2 * usize::from(segment)]).is_err()
    });
    assert!(learnt, "the path MTU was not learnt from the ICMP answer");
    assert_eq!(received.join().unwrap().len(), 0);
}

/// A UDP GSO send to `to` (an instance IP) arrives as the datagrams the
/// socket asked for, whole: segments of 1000 bytes, then of the largest
/// size the tunnel carries (`largest`, the container's MTU less the IP and
/// UDP headers), the last one shorter.
fn gso_sends_arrive_as_their_datagrams(client: &Netns, server: &Netns, to: IpAddr, largest: u16) {
    let to = SocketAddr::new(to, GSO_PORT);
    for (segment, total) in [(1000u16, 5000usize), (largest, 4000)] {
        let count = total.div_ceil(usize::from(segment));
        let received = receive_datagrams(server, to.is_ipv6(), count);
        let sent = send_gso(client, to, segment, total);
        let got = received.join().unwrap();
        let want: Vec<Vec<u8>> = sent
            .chunks(usize::from(segment))
            .map(<[u8]>::to_vec)
            .collect();
        assert!(
            got == want,
            "{total} bytes in segments of {segment} to {to}: expected {} datagrams of {:?} bytes, got {:?}",
            want.len(),
            want.iter().map(Vec::len).collect::<Vec<_>>(),
            got.iter().map(Vec::len).collect::<Vec<_>>()
        );
    }
}

#[test]
fn udp_gso_sends_reach_a_remote_instance_as_their_datagrams() {
    if !kernel_tests_enabled() {
        return;
    }
    let lab = lab();
    // The hop to node 2 resolved (a GSO packet is never held).
    answered_by(&udp_ask(&lab.client, WEB1_IP, 1), "web1", WEB1_IP);
    let web1_counts = || {
        let status = lab.nodes.node1.status();
        let i = status["instances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["job"] == WEB && i["number"] == 1)
            .cloned()
            .unwrap_or_else(|| panic!("no web#1 in {status}"));
        (i["packets"].as_u64().unwrap(), i["bytes"].as_u64().unwrap())
    };
    let before = web1_counts();
    // 1472 (the tunnel MTU) less 20 + 8.
    gso_sends_arrive_as_their_datagrams(&lab.client, &lab.web1, WEB1_IP.parse().unwrap(), 1444);
    // Counted as the datagrams on the wire: 5 of 1000 bytes, then 1444,
    // 1444 and 1112, each with its 42 bytes of Ethernet, IPv4 and UDP
    // (one packet of 5042 bytes before).
    let after = web1_counts();
    assert_eq!(
        (after.0 - before.0, after.1 - before.1),
        (8, 5 * 1042 + 2 * 1486 + 1154)
    );
    // To the instance on the same node (no tunnel) as well.
    gso_sends_arrive_as_their_datagrams(&lab.client, &lab.web0, WEB0_IP.parse().unwrap(), 1444);
    // A container on a larger MTU than the tunnel's sends segments that
    // cannot cross it: the packet is answered with ICMP "fragmentation
    // needed" (the tunnel's MTU) and counted, none arrives.
    lab.client.ip(&["link", "set", "tmsvc0", "mtu", "1500"]);
    let to = SocketAddr::new(WEB1_IP.parse().unwrap(), GSO_PORT);
    gso_too_big_teaches_the_path_mtu(&lab.client, &lab.web1, to, 1472);
    let counters = lab.nodes.node1.daemon.as_ref().unwrap().status();
    assert_eq!(named(&counters, "tc_service", "too_big_for_tunnel"), 1);
}

#[test]
fn fragmented_datagrams_reach_service_ips_and_come_back_whole() {
    if !kernel_tests_enabled() {
        return;
    }
    let lab = lab();
    echo_servers(&[(&lab.web0, "web0"), (&lab.web1, "web1")], false);
    big_datagrams_come_back_whole(&lab.client, SocketAddr::new(RR.parse().unwrap(), ECHO_PORT));
}

#[test]
fn a_restarted_daemon_takes_its_containers_back_whether_their_links_were_kept_or_not() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut lab = lab_with("[dataplane]\nkeep_dataplane = true\n");
    let links = lab.nodes.node1.container_links();
    assert_eq!(links.len(), 2, "client and web0 on node 1: {links:?}");
    let indexes = lab.nodes.node1.container_link_indexes();
    let answered = |lab: &Lab, what: &str| {
        let udp = udp_ask(&lab.client, RR, 4);
        let names: Vec<String> = udp.iter().map(|(n, _)| n.clone()).collect();
        assert!(
            alternates(&names) && names.iter().all(|n| n == "web0" || n == "web1"),
            "{what}: RR flows {udp:?}"
        );
        assert!(
            udp.iter()
                .all(|(_, from)| from == &format!("{RR}:{UDP_PORT}")),
            "{what}: answers not from the service IP: {udp:?}"
        );
        assert_eq!(
            tcp_ask(&lab.client, WEB1_IP, 2),
            ["web1", "web1"],
            "{what}: TCP to web#1's instance IP"
        );
    };
    answered(&lab, "before any restart");

    // Kept: the links stay and the kernel keeps forwarding with no daemon.
    // An unknown service IP left pending by the stopped daemon (it read the
    // notice but stopped before it cleared the entry) is reported again by
    // the next one.
    let client = &lab.client;
    let pins = lab
        .nodes
        .node1
        .pins()
        .join(tapmesh_common::map_names::OV_PENDING);
    const LEFT_PENDING: &str = "203.0.113.99";
    lab.nodes
        .node1
        .restart(&["--keep-dataplane=false"], |node| {
            let data = aya::maps::MapData::from_pin(&pins).expect("the pinned pending map");
            let mut pending: aya::maps::HashMap<_, [u8; 4], u64> =
                aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(data))
                    .expect("an LRU hash");
            let left: Ipv4Addr = LEFT_PENDING.parse().unwrap();
            pending
                .insert(left.octets(), 1, 0)
                .expect("a pending entry");
            assert_eq!(node.container_links(), links, "kept links while stopped");
            let (ok, text) = run(client, &["ping", "-c", "1", "-W", "5", WEB1_IP]);
            assert!(
                ok,
                "no daemon, kept dataplane: ping web#1's instance IP: {text}"
            );
        });
    assert_eq!(
        lab.nodes.node1.container_link_indexes(),
        indexes,
        "the kept links are adopted, not made again"
    );
    let status = lab.nodes.node1.status();
    assert_eq!(
        status["instances"].as_array().map(|a| a.len()),
        Some(3),
        "restored instances (2 local, 1 remote): {status}"
    );
    answered(&lab, "after a restart with kept links");
    let to: Ipv4Addr = LEFT_PENDING.parse().unwrap();
    spawn_in(&lab.client.name, move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.send_to(b"x", (to, UDP_PORT)).unwrap();
    })
    .join()
    .unwrap();
    let reported = tapmesh_tests::net::wait_until(Duration::from_secs(30), || {
        lab.nodes.node1.status()["unresolved"]
            .as_array()
            .is_some_and(|a| a.iter().any(|v| v == LEFT_PENDING))
    });
    assert!(reported, "{}", lab.nodes.node1.status());

    // Not kept: the stop removes the links, the next daemon makes new ones
    // in the same namespaces with the same addresses and MACs (what an LB
    // target on such a link names).
    let macs = |lab: &Lab| {
        let node = &lab.nodes.node1;
        let host: Vec<[u8; 6]> = links.iter().map(|l| node.netns.mac(l)).collect();
        (host, lab.client.mac("tmsvc0"), lab.web0.mac("tmsvc0"))
    };
    let macs_before = macs(&lab);
    lab.nodes.node1.restart(&[], |node| {
        assert_eq!(
            node.container_links(),
            Vec::<String>::new(),
            "links removed at stop"
        );
    });
    assert_eq!(lab.nodes.node1.container_links(), links, "links made again");
    let remade = lab.nodes.node1.container_link_indexes();
    assert!(
        remade.iter().all(|l| !indexes.contains(l)),
        "new links (new indexes): {remade:?} after {indexes:?}"
    );
    assert_eq!(
        macs(&lab),
        macs_before,
        "the links made again keep their MACs"
    );
    answered(&lab, "after a restart that removed the links");

    // What was restored undeploys like anything else.
    lab.nodes.node1.undeploy(WEB, 0);
    assert_eq!(lab.nodes.node1.container_links().len(), 1);
    let udp = udp_ask(&lab.client, RR, 2);
    assert!(
        udp.iter().all(|(n, _)| n == "web1"),
        "after undeploying web#0: {udp:?}"
    );
}

#[test]
fn generic_xdp_uplinks_carry_the_overlay_both_ways_through_a_bridge() {
    if !kernel_tests_enabled() {
        return;
    }
    let nodes = TwoNodes::bridged("[dataplane]\nxdp_mode = \"generic\"\n");
    nodes.node1.register("192.0.2.0/26");
    nodes.node2.register("192.0.2.64/26");
    let client = Netns::new("ovc");
    let web1 = Netns::new("ovw1");
    let client_ns = nodes
        .node1
        .deploy(&client, CLIENT, 0, &[("InstanceNumber", CLIENT_IP)]);
    let web_ips1: &[(&str, &str)] = &[
        ("RR", RR),
        ("Closest", CLOSEST),
        ("InstanceNumber", WEB1_IP),
    ];
    let web1_ns = nodes.node2.deploy(&web1, WEB, 1, web_ips1);
    nodes.node1.table(WEB, &[(1, &web1_ns, NODE2, web_ips1)]);
    nodes.node2.table(
        CLIENT,
        &[(0, &client_ns, NODE1, &[("InstanceNumber", CLIENT_IP)])],
    );
    who_servers(&web1, "web1");
    // One answered exchange first: web1's server is up, nothing resent below.
    answered_by(&udp_ask(&client, WEB1_IP, 1), "web1", WEB1_IP);
    let redirects = |node: &tapmesh_tests::overlay::Node, at_least: u64| {
        let daemon = node.daemon.as_ref().expect("running");
        let status = daemon.status_when(|s| packets(s, "xdp_uplink", "redirect") >= at_least);
        packets(&status, "xdp_uplink", "redirect")
    };
    let before = [redirects(&nodes.node1, 1), redirects(&nodes.node2, 1)];
    answered_by(&udp_ask(&client, WEB1_IP, 3), "web1", WEB1_IP);
    answered_by(&udp_ask(&client, RR, 3), "web1", RR);
    // Generic XDP took them out of the tunnel: the requests on node 2, the
    // answers on node 1 (a TC program's redirect straight into a veth pair
    // would have been skipped: docs/ARCHITECTURE.md, "Attach and detach").
    for (node, before) in [&nodes.node1, &nodes.node2].into_iter().zip(before) {
        let now = redirects(node, before + 6);
        assert_eq!(now - before, 6, "{}", node.netns.name);
    }
    assert_eq!(tcp_ask(&client, RR, 2), vec!["web1", "web1"]);
    let _ = &nodes.switch;
}

/// A kept dataplane's restart swaps each TC filter's program in place (the
/// same priority and handle): a container's stream to a service IP loses
/// nothing while the new daemon attaches. Before, each filter was removed
/// and added again, and what a container sent in between went out
/// untranslated.
#[test]
fn a_kept_restart_swaps_the_tc_programs_in_place_and_loses_no_datagram() {
    if !kernel_tests_enabled() {
        return;
    }
    const PORT: u16 = 7010;
    let mut lab = lab_with("[dataplane]\nkeep_dataplane = true\n");
    let receiver = tapmesh_tests::net::UdpReceiver::start(
        &lab.web1.name,
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, PORT),
    );
    // The client's port on node 1 ("local (<interface>)" in the status).
    let status = lab.nodes.node1.status();
    let location = status["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .find(|i| i["job"] == CLIENT)
        .and_then(|i| i["location"].as_str())
        .expect("the client's instance")
        .to_string();
    let port = location
        .strip_prefix("local (")
        .and_then(|l| l.strip_suffix(')'))
        .unwrap_or_else(|| panic!("the client's location: {location}"))
        .to_string();
    // Its ingress filter as `tc` shows it: (preference and handle, program id).
    let filter = |lab: &Lab| {
        let (ok, text) = run(
            &lab.nodes.node1.netns,
            &["tc", "filter", "show", "dev", &port, "ingress"],
        );
        assert!(ok, "{text}");
        let line = text
            .lines()
            .find(|l| l.contains("tm_tc_service"))
            .unwrap_or_else(|| panic!("no tm_tc_service filter: {text}"))
            .to_string();
        let id = line
            .split_whitespace()
            .skip_while(|w| *w != "id")
            .nth(1)
            .expect("a program id")
            .to_string();
        let place = line
            .split(" tm_tc_service")
            .next()
            .unwrap_or_default()
            .to_string();
        (place, id)
    };
    let (place, id) = filter(&lab);
    let to = SocketAddrV4::new(WEB1_IP.parse().unwrap(), PORT);
    // Up to 10 kpps (100 µs after each send, no bursts to catch up) until
    // half a second after the new daemon is up; returns how many it sent.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = stop.clone();
    let sender = spawn_in(&lab.client.name, move || {
        let socket = UdpSocket::bind("0.0.0.0:0").expect("bind");
        let mut sent = 0u64;
        while !stopped.load(Ordering::Relaxed) {
            socket.send_to(&sent.to_be_bytes(), to).expect("send");
            sent += 1;
            std::thread::sleep(Duration::from_micros(100));
        }
        sent
    });
    std::thread::sleep(Duration::from_millis(500));
    let before = receiver.count();
    assert!(before > 0, "nothing arrived before the restart");
    lab.nodes.node1.restart(&[], |_| {});
    let after_restart = receiver.count();
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let sent = sender.join().expect("sender");
    assert!(
        receiver.count() > after_restart,
        "nothing crossed after the restart"
    );
    let log = lab.nodes.node1.daemon.as_ref().expect("running").log_text();
    assert!(
        !log.contains("could not take the new program in place"),
        "a filter was replaced, not swapped: {log}"
    );
    let (place_now, id_now) = filter(&lab);
    assert_eq!(place_now, place, "the same preference and handle");
    assert_ne!(id_now, id, "the new daemon's program");
    let all = tapmesh_tests::net::wait_until(Duration::from_secs(30), || receiver.count() == sent);
    assert!(
        all,
        "{} of {sent} datagrams arrived ({before} before the restart, {after_restart} once the \
         new daemon was up)",
        receiver.count()
    );
}

/// An EDS update whose service-IP cluster lies inside an admin VIP is
/// refused whole (a NACK that names the overlap): the endpoints of its VIP
/// cluster are not written either, and every pinned map stays as it was.
#[test]
fn an_eds_update_the_overlay_refuses_changes_no_map() {
    if !kernel_tests_enabled() {
        return;
    }
    use tapmesh_tests::xds_peer::{Cla, ControlPlane, Ep};
    const FED: &str = "203.0.113.50";
    const API_VIP: &str = "198.51.100.80";
    let mut cp: Option<ControlPlane> = None;
    let nodes = TwoNodes::start_with(|netns| {
        let plane = ControlPlane::start_in(netns, false);
        let text = format!(
            "[xds]\nserver = \"{}\"\nnode_id = \"node-1\"\nmissing_after = \"60s\"\n\
             [[xds.clusters]]\nname = \"web\"\nservice_ip = \"{FED}\"\n\
             [[xds.clusters]]\nname = \"api\"\nvip = \"{API_VIP}\"\n",
            plane.address()
        );
        cp = Some(plane);
        text
    });
    let mut cp = cp.expect("control plane");
    let n1 = &nodes.node1;
    n1.register("192.0.2.0/26");
    let web0 = Netns::new("ovxr");
    let w0 = n1.deploy(&web0, WEB, 0, &[("InstanceNumber", WEB0_IP)]);
    let daemon = n1.daemon.as_ref().unwrap();
    // An admin VIP prefix over the service IP EDS will feed.
    let via = tapmesh::lb::model::TargetVia::Local {
        interface: n1.container_links().pop().expect("the container's link"),
        mac: tapmesh_tests::fmt_mac(web0.mac("tmsvc0")),
    };
    let file = std::env::temp_dir().join(tapmesh_tests::unique("tmlbe"));
    let spec = one_target_spec("203.0.113.48/29", "web", 4, &["udp"], via);
    std::fs::write(&file, lb_toml(&spec)).unwrap();
    daemon.cli(&["lb", "apply", file.to_str().unwrap()]);
    let _ = std::fs::remove_file(&file);
    let listed = daemon.cli(&["lb", "list", "-o", "json"]);
    assert!(listed.contains("203.0.113.48/29"), "{listed}");
    let pins = daemon
        .bpffs_root
        .join(format!("v{}", tapmesh_common::SCHEMA_VERSION));
    let before = tapmesh_tests::maps::dump_pinned(&pins);

    cp.set(
        "1",
        &[
            ("web", Cla::single(vec![Ep::new(&w0, 7000)])),
            ("api", Cla::single(vec![Ep::new(&w0, 7000)])),
        ],
    );
    let nack = cp.wait_request(Duration::from_secs(20), "NACK of version 1", |r| {
        r.error_detail.is_some()
    });
    let error = nack.error_detail.unwrap_or_default();
    assert!(
        error.contains(&format!(
            "the overlay's service IP {FED} lies inside VIP \"vip\""
        )),
        "{error}"
    );
    let after = tapmesh_tests::maps::dump_pinned(&pins);
    assert_eq!(
        tapmesh_tests::maps::differences(&before, &after),
        Vec::<String>::new(),
        "maps changed by a refused update"
    );
}
