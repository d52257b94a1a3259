//! `cargo xtask demo`: a lab of namespaces with the daemon on node 1, real
//! traffic from node 2, and the counters.
//!
//! ```text
//!                                   ┌── target1 ┐
//!  node2 ──(uplink veth)── node1 ───┼── target2 ┼─ VIP 203.0.113.10 on each
//!  198.18.0.2          198.18.0.1   └── target3 ┘
//!                       XDP uplink ─── pod 198.18.1.2 (TC on its veth)
//! ```
//! node2 sends 300 UDP flows to the VIP (spread over the three targets by
//! Maglev), pings the pod (its traffic mirrored through an AF_XDP ring into a
//! pcap that tshark reads back), and sends three broken frames (dropped by
//! reason). Part two: an application opens a stream through its ambassador.
//! Part three: the service-IP overlay on two nodes as Oakestra NetManagers,
//! with the cluster over MQTT (mosquitto and a cluster service manager peer).
//! Part four: cluster mode, three nodes sharing one registry through etcd.

use std::{net::UdpSocket, process::Command, time::Duration};

use tapmesh_tests::{
    daemon::{named, packets, tapmesh_bin, Daemon},
    fmt_mac,
    frames::{ethernet, ipv4, udp_v4, UDP},
    link, send_frames, Netns,
};

const VIP: &str = "203.0.113.10";
const FLOWS: u16 = 300;

fn main() -> std::process::ExitCode {
    // Namespaces and the daemon are dropped (cleaned up) before the exit code is returned.
    if run() {
        std::process::ExitCode::SUCCESS
    } else {
        eprintln!("demo: something did not work as expected");
        std::process::ExitCode::FAILURE
    }
}

fn tapmesh(args: &[&str], socket: &std::path::Path) -> String {
    let out = Command::new(tapmesh_bin())
        .args(args)
        .arg("--admin-socket")
        .arg(socket)
        .output()
        .expect("running tapmesh");
    let mut text = String::from_utf8_lossy(&out.stdout).to_string();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    text
}

fn run() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("the demo builds network namespaces: run it as root");
        return false;
    }
    let node1 = Netns::new("node1");
    let node2 = Netns::new("node2");
    let pod = Netns::new("pod");
    let (uplink, remote) = link(&node1, "198.18.0.1/24", &node2, "198.18.0.2/24");
    let (pod_host, pod_if) = link(&node1, "198.18.1.1/24", &pod, "198.18.1.2/24");
    node1.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    node2.ip(&["route", "add", "198.18.1.0/24", "via", "198.18.0.1"]);
    node2.ip(&["route", "add", &format!("{VIP}/32"), "via", "198.18.0.1"]);
    // A real sender computes checksums; veth would leave them to an offload XDP can't see.
    node2.exec(&["ethtool", "-K", &remote.interface, "tx", "off"]);
    pod.ip(&["route", "add", "default", "via", "198.18.1.1"]);

    let mut targets = Vec::new();
    let mut lb = format!(
        "[[vips]]\nname = \"demo-vip\"\naddress = \"{VIP}\"\n[[streams]]\nname = \"demo\"\nmax_targets = 10\n\
         [[flows]]\nname = \"udp-tcp\"\nvips = [\"demo-vip\"]\nstream = \"demo\"\nprotocols = [\"udp\", \"tcp\"]\n"
    );
    for i in 1..=3u8 {
        let ns = Netns::new(&format!("t{i}"));
        let (host, tif) = link(
            &node1,
            &format!("198.18.1{i}.1/24"),
            &ns,
            &format!("198.18.1{i}.2/24"),
        );
        ns.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"]);
        ns.ip(&["route", "add", "default", "via", &format!("198.18.1{i}.1")]);
        // Native XDP redirect into a veth needs NAPI on the receiving end.
        ns.exec(&["ethtool", "-K", &tif.interface, "gro", "on"]);
        lb.push_str(&format!(
            "[[targets]]\nstream = \"demo\"\nidentifier = {i}\nvia = {{ local = {{ interface = \"{}\", mac = \"{}\" }} }}\n",
            host.interface,
            fmt_mac(ns.mac(&tif.interface))
        ));
        targets.push(ns);
    }
    let lb_file = std::env::temp_dir().join(tapmesh_tests::unique("tmdemo-lb"));
    std::fs::write(&lb_file, &lb).expect("writing the LB file");

    println!(
        "lab: node2 ({}) ── node1 ({}) ── 3 targets holding VIP {VIP}, and a pod ({})",
        remote.ipv4, uplink.ipv4, pod_if.ipv4
    );
    println!(
        "starting tapmesh on node1: XDP on {}, TC on {}",
        uplink.interface, pod_host.interface
    );
    let mut daemon = Daemon::start(
        &node1.name,
        &[
            "--uplink",
            &uplink.interface,
            "--tc-interface",
            &pod_host.interface,
        ],
    );
    println!("$ tapmesh lb apply {}", lb_file.display());
    print!(
        "{}",
        tapmesh(&["lb", "apply", lb_file.to_str().unwrap()], &daemon.socket)
    );
    let _ = std::fs::remove_file(&lb_file);

    // Mirror the pod's traffic (both directions) into a pcap through an AF_XDP ring.
    let pcap_dir = std::env::temp_dir().join(tapmesh_tests::unique("tmdemo-pcap"));
    std::fs::create_dir_all(&pcap_dir).expect("pcap dir");
    let pcap = pcap_dir.join("pod.pcap");
    let pcap_arg = pcap.display().to_string();
    for args in [
        vec!["tap-service", "create", "pod-capture", "--pcap", &pcap_arg],
        vec![
            "tap-flow",
            "create",
            "pod-both",
            "--tap-service",
            "pod-capture",
            "--source",
            &pod_host.interface,
            "--direction",
            "BOTH",
        ],
    ] {
        println!("$ tapmesh {}", args.join(" "));
        print!("{}", tapmesh(&args, &daemon.socket));
    }

    // 300 UDP flows from node2 to the VIP, from distinct source ports.
    let node2_name = node2.name.clone();
    std::thread::spawn(move || {
        tapmesh::net::netns::enter(&node2_name).expect("entering node2");
        for port in 0..FLOWS {
            let socket = UdpSocket::bind(("198.18.0.2", 20000 + port)).expect("bind");
            let _ = socket.send_to(b"demo", format!("{VIP}:9000"));
        }
    })
    .join()
    .expect("sender");

    let ping = node2.try_exec(&[
        "ping",
        "-c",
        "10",
        "-i",
        "0.05",
        "-W",
        "2",
        "-q",
        "198.18.1.2",
    ]);
    let ping_text = String::from_utf8_lossy(&ping.stdout);
    let summary = ping_text
        .lines()
        .find(|l| l.contains("transmitted"))
        .unwrap_or("ping printed nothing");
    println!("node2 → VIP: {FLOWS} UDP flows sent; node2 → pod ping: {summary}");

    // Three frames with a broken IPv4 header from node2: dropped in XDP, counted by reason.
    let (a, b) = ("198.18.0.2".parse().unwrap(), "198.18.1.2".parse().unwrap());
    let mut bad = ethernet(
        node1.mac(&uplink.interface),
        node2.mac(&remote.interface),
        &[],
        0x0800,
        &ipv4(a, b, UDP, &[], &udp_v4(a, b, 1, 2, b"x")),
    );
    bad[14] = 0x42;
    send_frames(
        &node2.name,
        &remote.interface,
        &[bad.clone(), bad.clone(), bad],
    );
    std::thread::sleep(Duration::from_millis(200));

    std::thread::sleep(Duration::from_millis(300));
    println!("\n$ tapmesh tap-flow list");
    print!("{}", tapmesh(&["tap-flow", "list"], &daemon.socket));
    println!("$ tapmesh tap-service list");
    print!("{}", tapmesh(&["tap-service", "list"], &daemon.socket));
    let tshark = Command::new("tshark")
        .args([
            "-r",
            &pcap_arg,
            "-T",
            "fields",
            "-e",
            "ip.src",
            "-e",
            "ip.dst",
            "-e",
            "icmp.type",
        ])
        .output();
    let lines: Vec<String> = tshark
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    let requests = lines.iter().filter(|l| l.ends_with("\t8")).count();
    let replies = lines.iter().filter(|l| l.ends_with("\t0")).count();
    println!(
        "tshark -r {pcap_arg}: {} packets ({requests} echo requests node2 → pod, {replies} echo replies pod → node2)",
        lines.len()
    );
    let _ = std::fs::remove_dir_all(&pcap_dir);
    let mirrored_ok = requests == 10 && replies == 10 && lines.len() == 20;

    println!("\n$ tapmesh status");
    print!("{}", tapmesh(&["status"], &daemon.socket));

    let s = daemon.status();
    let shares: Vec<u64> = (1..=3)
        .map(|i| {
            s.targets
                .iter()
                .find(|t| t.name == format!("demo/{i}"))
                .map_or(0, |t| t.packets)
        })
        .collect();
    let received: Vec<u64> = targets
        .iter()
        .map(|t| {
            let out = t.try_exec(&["nstat", "-az", "UdpInDatagrams", "UdpNoPorts"]);
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum()
        })
        .collect();
    println!(
        "\nsummary: the VIP's {FLOWS} flows went to the targets as {shares:?} (Maglev, one slot per identifier); \
         the targets' kernels saw {received:?} UDP datagrams; uplink XDP passed {}, redirected {} and dropped {} \
         ({} with a bad IPv4 header length); the pod's veth carried {} packets to the pod and {} from it",
        packets(&s, "xdp_uplink", "pass"),
        packets(&s, "xdp_uplink", "redirect"),
        packets(&s, "xdp_uplink", "drop"),
        named(&s, "xdp_uplink", "bad_ipv4_header_length"),
        packets(&s, "tc_egress", "pass"),
        packets(&s, "tc_ingress", "pass"),
    );
    let ok = mirrored_ok
        && ping.status.success()
        && named(&s, "xdp_uplink", "bad_ipv4_header_length") == 3
        && shares.iter().sum::<u64>() == FLOWS as u64
        && shares.iter().all(|&n| n > 0)
        && received == shares;
    let exit = daemon.stop();
    let attached = String::from_utf8_lossy(&node1.ip(&["link", "show", &uplink.interface]).stdout)
        .contains("prog/xdp");
    println!("daemon stopped ({exit}); XDP still attached: {attached}");
    let ok = ok && !attached && exit.success();
    println!();
    ok && ambassador_demo() && overlay_demo() && cluster_demo()
}

/// Part two: an application asks for its traffic the Meridio way, through
/// `tapmesh ambassador` (unprivileged) and the daemon's target registry.
fn ambassador_demo() -> bool {
    use std::net::{Ipv4Addr, SocketAddrV4};
    use tapmesh::proto::ambassador::stream_status::Status;
    use tapmesh_tests::net::{send_udp_flows, wait_until, UdpReceiver, CLIENT};
    use tapmesh_tests::tapa::{stream, TapCaller, TapaLab, VIP_A};

    println!("ambassador: a client, a node running the daemon, one application namespace");
    let mut lab = TapaLab::new(1, "60s");
    let a = lab.start_ambassador(0, "30s");
    println!(
        "the application's ambassador runs as uid 65534 on {}",
        lab.ambassadors[a].socket.display()
    );
    let mut tap = TapCaller::new(&lab.ambassadors[a].socket);
    let opened = tap.time_open(stream("stream-a", "conduit-a", "trench-a"));
    println!(
        "Open(stream-a.conduit-a.trench-a) → Watch said OPEN after {:.1} ms",
        opened.as_secs_f64() * 1e3
    );
    println!("\n$ tapmesh registry list");
    print!("{}", lab.registry_list());
    let addrs = lab.apps[0].ip(&["-o", "-4", "addr", "show", "conduit0"]);
    println!("the daemon gave the application conduit0 with:");
    for line in String::from_utf8_lossy(&addrs.stdout).lines() {
        println!("  {}", line.split_whitespace().nth(3).unwrap_or(""));
    }
    let rx = UdpReceiver::start(
        &lab.apps[0].name,
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 5000),
    );
    let ports: Vec<u16> = (30000..30100).collect();
    let sent = send_udp_flows(
        &lab.client.name,
        CLIENT,
        &ports,
        SocketAddrV4::new(VIP_A, 5000),
        1,
        b"demo",
    );
    let delivered = wait_until(Duration::from_secs(5), || rx.count() == sent);
    println!(
        "client → {VIP_A}: {sent} UDP flows sent, the application received {}",
        rx.count()
    );
    tap.close(stream("stream-a", "conduit-a", "trench-a"))
        .expect("close");
    let closed = tap.wait_status("stream-a", Status::Open, Duration::from_millis(100));
    let left = lab.registered("stream-a").len();
    println!(
        "Close: {left} targets left in the registry; conduit0 removed: {}",
        !String::from_utf8_lossy(&lab.apps[0].ip(&["-o", "link"]).stdout).contains("conduit0")
    );
    delivered && left == 0 && !closed
}

/// Part three: an Oakestra cluster of two tapmesh nodes. A hub runs
/// Debian's mosquitto as the cluster's MQTT broker and the cluster service
/// manager peer (`tests/peers/`); the Node Engine's calls are replayed as its
/// Go client sends them (no subnet, no service IPs): subnets, service and
/// instance IPs and tables come over MQTT. A client on node 1 dials a
/// round-robin service IP and an instance IP on node 2: translated in TC,
/// tunnelled in UDP 50103, decapsulated in XDP.
fn overlay_demo() -> bool {
    use std::net::{SocketAddrV4, UdpSocket};
    use tapmesh_tests::oakestra::{
        deploy_json, node, node_engine_post, register_json, Cluster, Task, HUB,
    };

    let (web, client_job) = ("demo.ns.web.ns", "demo.ns.client.ns");
    let (rr, c_ip, w0_ip, w1_ip) = (
        "203.0.113.10",
        "203.0.113.100",
        "203.0.113.101",
        "203.0.113.102",
    );
    // The cluster's job store: what Oakestra's root would hold.
    let jobs = serde_json::json!({
        web: {
            "service_ip_list": [{"IpType": "RR", "Address": rr, "Address_v6": ""}],
            "instances": [
                {"instance_number": 0, "instance_ip": w0_ip, "instance_ip_v6": ""},
                {"instance_number": 1, "instance_ip": w1_ip, "instance_ip_v6": ""}
            ]
        },
        client_job: {
            "service_ip_list": [],
            "instances": [{"instance_number": 0, "instance_ip": c_ip, "instance_ip_v6": ""}]
        }
    });
    println!("overlay: an Oakestra cluster (mosquitto + cluster service manager at {HUB}), two tapmesh nodes");
    let cluster = Cluster::start(&jobs, "192.0.2.0");
    let peers = |other: &str| format!("[lb]\ntunnel_peers = [\"{other}\"]\n");
    let node1 = node(&cluster, "odn1", "198.18.2.1", &peers("198.18.2.2"));
    let node2 = node(&cluster, "odn2", "198.18.2.2", &peers("198.18.2.1"));
    for n in [&node1, &node2] {
        let (status, body) =
            node_engine_post(&n.socket, "/register", &register_json(&n.netns.name, HUB));
        if status != 200 {
            println!("POST /register → {status} {body}");
            return false;
        }
    }
    let subnet = |n: &tapmesh_tests::overlay::Node| {
        n.status()["registration"]["subnetwork"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    println!(
        "POST /register {{client_id, cluster_address}} → subnets from the cluster over MQTT: node1 {}, node2 {}",
        subnet(&node1),
        subnet(&node2)
    );
    let client = Netns::new("oc");
    let web0 = Netns::new("ow0");
    let web1 = Netns::new("ow1");
    let tasks = [Task::start(&client), Task::start(&web0), Task::start(&web1)];
    let mut addresses = Vec::new();
    for (n, task, job, number) in [
        (&node1, &tasks[0], client_job, 0),
        (&node1, &tasks[1], web, 0),
        (&node2, &tasks[2], web, 1),
    ] {
        let (status, body) = node_engine_post(
            &n.socket,
            "/container/deploy",
            &deploy_json(task.pid(), job, number, ""),
        );
        let reply: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        if status != 200 {
            println!("POST /container/deploy → {status} {body}");
            return false;
        }
        addresses.push(reply["nsAddress"].as_str().unwrap_or("").to_string());
    }
    println!(
        "POST /container/deploy {{pid, serviceName, instanceNumber}} → client {} (node1), web#0 {} (node1), web#1 {} (node2)",
        addresses[0], addresses[1], addresses[2]
    );
    // Each node learns its own instances' service IPs from the table it
    // asks for after a deploy; node 1 learns web#1 the same way.
    let ready = tapmesh_tests::net::wait_until(Duration::from_secs(10), || {
        node1.status()["services"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["address"] == rr && s["instances"] == 2))
    });
    let heard: Vec<String> = cluster
        .messages()
        .iter()
        .filter_map(|m| {
            m["topic"]
                .as_str()
                .map(|t| t.rsplit("/net/").next().unwrap_or(t).to_string())
        })
        .collect();
    let count = |t: &str| heard.iter().filter(|h| *h == t).count();
    println!(
        "MQTT, the cluster heard: {} subnet requests, {} service/deployed, {} tablequery/request",
        count("subnet"),
        count("service/deployed"),
        count("tablequery/request")
    );
    if !ready {
        println!("node1 never had both instances of {rr}");
        return false;
    }
    for (ns, name) in [(&web0, "web#0 on node1"), (&web1, "web#1 on node2")] {
        let _ = tapmesh_tests::net::spawn_in(&ns.name, move || {
            let s = UdpSocket::bind("0.0.0.0:7000").expect("bind");
            let mut buf = [0u8; 512];
            while let Ok((_, from)) = s.recv_from(&mut buf) {
                let _ = s.send_to(name.as_bytes(), from);
            }
        });
    }
    std::thread::sleep(Duration::from_millis(200));
    let ask = |to: &'static str, flows: usize| -> Vec<String> {
        tapmesh_tests::net::spawn_in(&client.name, move || {
            (0..flows)
                .map(|_| {
                    let s = UdpSocket::bind("0.0.0.0:0").unwrap();
                    s.set_read_timeout(Some(Duration::from_millis(700)))
                        .unwrap();
                    // A first packet towards an address the node has not
                    // heard of yet is a miss: the table comes, the retry flows.
                    for _ in 0..3 {
                        let _ = s.send_to(b"hi", SocketAddrV4::new(to.parse().unwrap(), 7000));
                        let mut buf = [0u8; 64];
                        if let Ok((n, from)) = s.recv_from(&mut buf) {
                            return format!("{} (from {from})", String::from_utf8_lossy(&buf[..n]));
                        }
                    }
                    "no answer".into()
                })
                .collect()
        })
        .join()
        .unwrap_or_default()
    };
    let answers = ask(rr, 4);
    println!("client → {rr}:7000 (RR), 4 flows:");
    for a in &answers {
        println!("  {a}");
    }
    let remote = ask(w1_ip, 1);
    println!(
        "client → {w1_ip}:7000 (web#1's instance IP): {}",
        remote.join("")
    );
    // The plugin's status line is refreshed twice a second.
    std::thread::sleep(Duration::from_millis(700));
    let status = tapmesh(&["status"], &node1.daemon.as_ref().unwrap().socket);
    println!("\n$ tapmesh status   (node1, the netmanager plugin)");
    for line in status
        .lines()
        .skip_while(|l| !l.contains("netmanager"))
        .take(8)
    {
        println!("{line}");
    }
    let both = answers.iter().any(|a| a.starts_with("web#0"))
        && answers.iter().any(|a| a.starts_with("web#1"));
    let from_service = answers
        .iter()
        .all(|a| a.contains(&format!("from {rr}:7000")));
    drop(tasks);
    both && from_service && remote.iter().all(|a| a.starts_with("web#1"))
}

/// Part four: cluster mode on etcd. Three daemons share one registry per
/// trench through Debian's etcd; applications open a stream on nodes 2 and
/// 3, and client traffic entering node 1 is spread over both by the one
/// Maglev every node builds (node 3's share through the UDP tunnel).
fn cluster_demo() -> bool {
    use std::net::SocketAddrV4;
    use tapmesh_tests::cluster::{open_a, Lab, CLIENT};
    use tapmesh_tests::net::{send_udp_flows, wait_until, UdpReceiver};
    use tapmesh_tests::tapa::{NSP_CONFIG, VIP_A};

    println!();
    println!("cluster: three tapmesh nodes and etcd in namespaces; applications on nodes 2 and 3");
    let mut lab = Lab::new(3, true, NSP_CONFIG);
    let joined = wait_until(Duration::from_secs(15), || {
        (1..=3).all(|i| lab.cluster_detail(i).contains("3 nodes [n1 n2 n3]"))
    });
    println!("node 1's cluster plugin: {}", lab.cluster_detail(1));
    let _taps: Vec<_> = [2, 3].into_iter().map(|i| open_a(&mut lab, i)).collect();
    let seen = wait_until(Duration::from_secs(10), || {
        let mut nodes: Vec<String> = lab
            .registry(1)
            .into_iter()
            .filter(|r| r.0 == "stream-a.conduit-a.trench-a" && r.2 == "ENABLED")
            .map(|r| r.3)
            .collect();
        nodes.sort();
        nodes == ["n2", "n3"]
    });
    println!("\n$ tapmesh registry list   (node 1's socket: the whole trench)");
    let list = Command::new(tapmesh_bin())
        .args(["registry", "list", "--node-socket"])
        .arg(lab.node_socket(1))
        .output()
        .expect("tapmesh registry list");
    print!("{}", String::from_utf8_lossy(&list.stdout));
    // Until every node's maps hold both targets, a round can miss one.
    let to = SocketAddrV4::new(VIP_A, 7000);
    let client = lab.client.as_ref().expect("a client").0.name.clone();
    let ports: Vec<u16> = (20000..20300).collect();
    let mut counts = (0, 0, 0);
    let spread = wait_until(Duration::from_secs(15), || {
        let on2 = UdpReceiver::start(&lab.apps[0].name, to);
        let on3 = UdpReceiver::start(&lab.apps[1].name, to);
        let sent = send_udp_flows(&client, CLIENT, &ports, to, 1, b"cluster");
        wait_until(Duration::from_secs(2), || on2.count() + on3.count() >= sent);
        counts = (sent, on2.stop().total(), on3.stop().total());
        counts.1 + counts.2 == sent && counts.1 > 0 && counts.2 > 0
    });
    println!(
        "client → {to} into node 1: {} UDP flows, {} reached the application on node 2 and {} the one on node 3",
        counts.0, counts.1, counts.2
    );
    println!("node 1's cluster plugin: {}", lab.cluster_detail(1));
    joined && seen && spread
}
