//! tapmesh as a drop-in Oakestra NetManager: the Node Engine's calls as its
//! Go client sends them, the cluster service manager over a real MQTT
//! broker (mosquitto) with the peer in `tests/peers/`, and traffic between
//! nodes through service IPs with no table pushed by hand.

use std::{
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    time::{Duration, Instant},
};

use serde_json::json;
use tapmesh_tests::{
    daemon::named,
    kernel_tests_enabled,
    net::{spawn_in, wait_until},
    oakestra::{
        deploy_json, node, node_engine_post, node_following, register_json, undeploy_json, Cluster,
        Task, HUB,
    },
    overlay::Node,
    Netns,
};

const WEB: &str = "app.ns.web.ns";
const CLIENT: &str = "app.ns.client.ns";
const OAK: &str = "app.ns.oak.ns";
const RR: &str = "203.0.113.10";
const WEB0_IP: &str = "203.0.113.101";
const WEB1_IP: &str = "203.0.113.102";
const CLIENT_IP: &str = "203.0.113.100";
const OAK_IP: &str = "203.0.113.50";
const UDP_PORT: u16 = 7000;

/// The peer's job store: WEB (RR + two instances), CLIENT, and OAK, an
/// instance already running on an Oakestra node at `oak_node`.
fn jobs(oak_node: &str) -> serde_json::Value {
    json!({
        WEB: {
            "service_ip_list": [{"IpType": "RR", "Address": RR, "Address_v6": ""}],
            "instances": [
                {"instance_number": 0, "instance_ip": WEB0_IP, "instance_ip_v6": ""},
                {"instance_number": 1, "instance_ip": WEB1_IP, "instance_ip_v6": ""}
            ]
        },
        CLIENT: {
            "service_ip_list": [],
            "instances": [{"instance_number": 0, "instance_ip": CLIENT_IP, "instance_ip_v6": ""}]
        },
        OAK: {
            "service_ip_list": [],
            "instances": [{
                "instance_number": 0, "instance_ip": OAK_IP, "instance_ip_v6": "",
                "namespace_ip": "192.0.2.200", "namespace_ip_v6": "",
                "host_ip": oak_node, "host_port": "50103", "status": "DEPLOYED"
            }]
        }
    })
}

fn register(n: &Node) {
    let (status, body) =
        node_engine_post(&n.socket, "/register", &register_json(&n.netns.name, HUB));
    assert_eq!(status, 200, "{body}");
}

fn deploy(n: &Node, task: &Task, job: &str, number: u32) -> String {
    let (status, body) = node_engine_post(
        &n.socket,
        "/container/deploy",
        &deploy_json(task.pid(), job, number, ""),
    );
    assert_eq!(status, 200, "{body}");
    let reply: serde_json::Value = serde_json::from_str(&body).expect("deploy reply");
    reply["nsAddress"].as_str().expect("nsAddress").to_string()
}

/// Answers every UDP datagram on UDP_PORT with `name`.
fn who_server(container: &Netns, name: &'static str) {
    let _ = spawn_in(&container.name, move || {
        let udp = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, UDP_PORT)).unwrap();
        let mut buf = [0u8; 2048];
        while let Ok((_, from)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(name.as_bytes(), from);
        }
    });
    std::thread::sleep(Duration::from_millis(100));
}

/// One UDP flow per call from `client` to `to`; who answered and from where
/// (each flow tries 3 times, 700 ms apart).
fn udp_ask(client: &Netns, to: &str, flows: usize) -> Vec<(String, String)> {
    let to: Ipv4Addr = to.parse().unwrap();
    spawn_in(&client.name, move || {
        (0..flows)
            .map(|_| {
                let s = UdpSocket::bind("0.0.0.0:0").unwrap();
                s.set_read_timeout(Some(Duration::from_millis(700)))
                    .unwrap();
                for _ in 0..3 {
                    s.send_to(b"hello", (to, UDP_PORT)).unwrap();
                    let mut buf = [0u8; 64];
                    if let Ok((n, from)) = s.recv_from(&mut buf) {
                        return (String::from_utf8_lossy(&buf[..n]).into(), from.to_string());
                    }
                }
                ("(no answer)".to_string(), String::new())
            })
            .collect()
    })
    .join()
    .expect("client thread")
}

fn status_services(n: &Node) -> Vec<(String, u64)> {
    n.status()["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["address"].as_str().unwrap().to_string(),
                s["instances"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn node_engine_calls_and_the_cluster_over_mqtt_give_rr_and_undeploy_reaches_other_nodes() {
    if !kernel_tests_enabled() {
        return;
    }
    let cluster = Cluster::start(&jobs("198.18.2.9"), "192.0.2.0");
    // No node lists another (`lb.tunnel_peers`): each learns from the
    // cluster which nodes may send to it, as Oakestra's nodes do.
    let n1 = node(&cluster, "oan1", "198.18.2.1", "");
    let n2 = node(&cluster, "oan2", "198.18.2.2", "");
    let n3 = node(&cluster, "oan3", "198.18.2.3", "");

    // Before /register: Oakestra's 400 for a deploy.
    let (status, _) =
        node_engine_post(&n1.socket, "/container/deploy", &deploy_json(1, WEB, 0, ""));
    assert_eq!(status, 400);
    // /register with no subnet: 200, the subnet comes from the cluster.
    for n in [&n1, &n2, &n3] {
        register(n);
    }
    let subnets: Vec<String> = [&n1, &n2, &n3]
        .iter()
        .map(|n| {
            n.status()["registration"]["subnetwork"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let mut sorted = subnets.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        ["192.0.2.0/26", "192.0.2.128/26", "192.0.2.64/26"],
        "{subnets:?}"
    );
    let requests = cluster.received("/net/subnet");
    assert_eq!(requests.len(), 3, "{requests:?}");
    assert!(requests
        .iter()
        .all(|m| m["payload"] == json!({"METHOD": "GET"}) && m["qos"] == 1));

    let (web0, web1, client) = (Netns::new("oaw0"), Netns::new("oaw1"), Netns::new("oac"));
    let (t0, t1, tc) = (Task::start(&web0), Task::start(&web1), Task::start(&client));
    let ns0 = deploy(&n1, &t0, WEB, 0);
    let ns1 = deploy(&n2, &t1, WEB, 1);
    deploy(&n3, &tc, CLIENT, 0);
    assert!(ns0.starts_with("192.0.2.") && ns1.starts_with("192.0.2."));
    // Oakestra's NetManager refuses a name that is not four parts.
    let (status, body) = node_engine_post(
        &n3.socket,
        "/container/deploy",
        &deploy_json(tc.pid(), "web", 2, ""),
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("four non-empty parts"), "{body}");
    who_server(&web0, "web0");
    who_server(&web1, "web1");

    // The cluster heard of each deployment as Oakestra's NetManager tells it.
    let deployed = cluster.received("/net/service/deployed");
    assert!(
        deployed.iter().all(|m| m["payload"]["appname"] != "web"),
        "{deployed:?}"
    );
    let web0_notice = deployed
        .iter()
        .find(|m| m["payload"]["appname"] == WEB && m["payload"]["instance_number"] == 0)
        .expect("web#0 notice");
    assert_eq!(
        web0_notice["payload"],
        json!({"appname": WEB, "status": "DEPLOYED", "instance_number": 0, "nsip": ns0,
               "nsipv6": "", "host_port": "50103", "host_ip": "198.18.2.1"})
    );
    assert!(web0_notice["topic"]
        .as_str()
        .unwrap()
        .starts_with(&format!("nodes/{}/", n1.netns.name)));

    // Each node's own instance got its service and instance IPs from the
    // table (no serviceIp in the deploy): web#0 is in RR's pool on node 1.
    let ok = wait_until(Duration::from_secs(30), || {
        let s = status_services(&n1);
        s.contains(&(WEB0_IP.into(), 1)) && s.contains(&(RR.into(), 2))
    });
    assert!(ok, "node 1's services: {:?}", status_services(&n1));

    // Node 3 knows nothing of RR: the first packet is a miss (held), the
    // daemon asks the cluster by service IP, and the packets flow. Nodes 1
    // and 2 know nothing of node 3 either: its first packet to each is
    // dropped, and they ask the cluster about its source, the client's
    // instance IP, which places it on node 3.
    let first = Instant::now();
    let mut heard = std::collections::BTreeSet::new();
    let ok = wait_until(Duration::from_secs(30), || {
        heard.extend(udp_ask(&client, RR, 2).into_iter().map(|(n, _)| n));
        heard.contains("web0") && heard.contains("web1")
    });
    assert!(
        ok,
        "RR never answered from both instances ({heard:?}); node 1 log: {}",
        n1.daemon.as_ref().unwrap().log_text()
    );
    eprintln!(
        "answers from both through misses after {:?}",
        first.elapsed()
    );
    for n in [&n1, &n2] {
        let status = n.daemon.as_ref().unwrap().status();
        assert!(
            named(&status, "xdp_uplink", "tunnel_unknown_node") >= 1,
            "node 3 was unknown to {} at first",
            n.netns.name
        );
    }
    let by_ip = cluster.received("/net/tablequery/request");
    assert!(
        by_ip
            .iter()
            .any(|m| m["payload"] == json!({"sname": "", "sip": RR})
                && m["topic"]
                    .as_str()
                    .unwrap()
                    .starts_with(&format!("nodes/{}/", n3.netns.name))),
        "{by_ip:?}"
    );
    for n in [&n1, &n2] {
        assert!(
            by_ip
                .iter()
                .any(|m| m["payload"] == json!({"sname": "", "sip": CLIENT_IP})
                    && m["topic"]
                        .as_str()
                        .unwrap()
                        .starts_with(&format!("nodes/{}/", n.netns.name))),
            "{} did not ask about node 3's source: {by_ip:?}",
            n.netns.name
        );
    }
    assert!(
        by_ip
            .iter()
            .any(|m| m["payload"] == json!({"sname": WEB, "sip": ""})),
        "no table query by job name after a deploy: {by_ip:?}"
    );

    // RR alternates between the two instances; answers come from RR.
    let answers = udp_ask(&client, RR, 6);
    let names: Vec<&str> = answers.iter().map(|(n, _)| n.as_str()).collect();
    assert!(names.windows(2).all(|w| w[0] != w[1]), "{answers:?}");
    assert!(
        names.iter().all(|n| *n == "web0" || *n == "web1"),
        "{answers:?}"
    );
    assert!(
        answers
            .iter()
            .all(|(_, f)| *f == format!("{RR}:{UDP_PORT}")),
        "{answers:?}"
    );

    // Undeploy web#1: through the cluster to node 3 within a second.
    let started = Instant::now();
    let (status, _) = node_engine_post(&n2.socket, "/container/undeploy", &undeploy_json(WEB, 1));
    assert_eq!(status, 200);
    let gone = wait_until(Duration::from_secs(1), || {
        status_services(&n3).contains(&(RR.into(), 1))
    });
    let took = started.elapsed();
    assert!(
        gone,
        "node 3 still has 2 RR instances after {took:?}: {:?}",
        status_services(&n3)
    );
    eprintln!("undeploy reached node 3 in {took:?}");
    let answers = udp_ask(&client, RR, 4);
    assert!(answers.iter().all(|(n, _)| n == "web0"), "{answers:?}");
    // Oakestra: undeploying what is not there is still 200.
    let (status, _) = node_engine_post(&n2.socket, "/container/undeploy", &undeploy_json(WEB, 7));
    assert_eq!(status, 200);
    drop((t0, t1, tc));
}

#[test]
fn a_proxytun_packet_reaches_a_container_and_the_reply_leaves_as_proxytun_from_the_instance_ip() {
    if !kernel_tests_enabled() {
        return;
    }
    const OAK_NODE: &str = "198.18.2.9";
    let cluster = Cluster::start(&jobs(OAK_NODE), "192.0.2.0");
    let n1 = node(
        &cluster,
        "oapn",
        "198.18.2.1",
        &format!("[lb]\ntunnel_peers = [\"{OAK_NODE}\"]\n"),
    );
    // An Oakestra worker: its ProxyTUN is a UDP socket on 50103.
    let oak = Netns::new("oak");
    cluster.attach(&oak, OAK_NODE);
    register(&n1);
    let web0 = Netns::new("oapw");
    let task = Task::start(&web0);
    let ns0: Ipv4Addr = deploy(&n1, &task, WEB, 0).parse().unwrap();
    who_server(&web0, "web0");
    let ok = wait_until(Duration::from_secs(30), || {
        status_services(&n1).contains(&(WEB0_IP.into(), 1))
    });
    assert!(ok, "web#0 has no instance IP: {:?}", status_services(&n1));

    // ProxyTUN's form: the inner packet from OAK's instance IP to web#0's
    // namespace address, alone in a UDP datagram to the node's port 50103.
    let oak_ip: Ipv4Addr = OAK_IP.parse().unwrap();
    let inner = tapmesh_tests::frames::udp4(oak_ip, ns0, 40000, UDP_PORT, b"ping");
    let reply = spawn_in(&oak.name, move || {
        let s = UdpSocket::bind((OAK_NODE, 50103)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            s.send_to(&inner, ("198.18.2.1", 50103)).unwrap();
            let mut buf = [0u8; 2048];
            if let Ok((n, from)) = s.recv_from(&mut buf) {
                return Some((buf[..n].to_vec(), from));
            }
        }
        None
    })
    .join()
    .unwrap();
    let (packet, from) = reply.unwrap_or_else(|| {
        panic!(
            "no reply; node log: {}",
            n1.daemon.as_ref().unwrap().log_text()
        )
    });
    // From the node (its source port spreads flows; ProxyTUN reads any).
    assert_eq!(from.ip().to_string(), "198.18.2.1");
    // The reply: IPv4/UDP from web#0's instance IP to OAK's namespace
    // address (the cluster's table, asked for on the miss), nothing else.
    assert_eq!(packet[0], 0x45, "{packet:02x?}");
    assert_eq!(packet[9], 17);
    assert_eq!(
        &packet[12..16],
        &WEB0_IP.parse::<Ipv4Addr>().unwrap().octets()
    );
    assert_eq!(&packet[16..20], &[192, 0, 2, 200]);
    assert_eq!(
        u16::from_be_bytes([packet[2], packet[3]]) as usize,
        packet.len()
    );
    let web0_ip: Ipv4Addr = WEB0_IP.parse().unwrap();
    let oak_ns = Ipv4Addr::new(192, 0, 2, 200);
    // Ports, length, payload and a UDP checksum valid for the new addresses.
    assert_eq!(
        &packet[20..],
        &tapmesh_tests::frames::udp_v4(web0_ip, oak_ns, UDP_PORT, 40000, b"web0")[..],
    );
    assert_eq!(
        tapmesh_tests::frames::internet_checksum(&[&packet[..20]]),
        0,
        "IP checksum"
    );
    let misses = cluster.received("/net/tablequery/request");
    assert!(
        misses
            .iter()
            .any(|m| m["payload"] == json!({"sname": "", "sip": OAK_IP})),
        "{misses:?}"
    );

    // Outside the tunnel the same source is refused: plain IP from OAK's
    // instance IP, routed to the node for web#0, is dropped on the uplink
    // (else anyone who can route to the node could pose as OAK and have
    // web#0's replies tunnelled to OAK's node).
    oak.ip(&["addr", "add", &format!("{OAK_IP}/32"), "dev", "lo"]);
    oak.ip(&["route", "add", &format!("{ns0}/32"), "via", "198.18.2.1"]);
    let refused = || {
        let counters = n1.daemon.as_ref().unwrap().status();
        named(&counters, "xdp_uplink", "service_source_outside_tunnel")
    };
    let before = refused();
    spawn_in(&oak.name, move || {
        let s = UdpSocket::bind((OAK_IP, 40001)).unwrap();
        for _ in 0..20 {
            s.send_to(b"forged", (ns0, UDP_PORT)).unwrap();
        }
    })
    .join()
    .unwrap();
    let all = wait_until(Duration::from_secs(30), || refused() - before == 20);
    assert!(all, "{} of 20 plain packets refused", refused() - before);

    // Nor by another way in: routed to the node through a second interface,
    // which no XDP program watches, the same source is refused at web#0's
    // veth, while a source outside the service prefix gets through there.
    let side = Netns::new("oas");
    tapmesh_tests::link(&n1.netns, "198.51.100.1/24", &side, "198.51.100.2/24");
    side.ip(&["addr", "add", &format!("{OAK_IP}/32"), "dev", "lo"]);
    side.ip(&["route", "add", &format!("{ns0}/32"), "via", "198.51.100.1"]);
    let answered = spawn_in(&side.name, move || {
        let s = UdpSocket::bind(("198.51.100.2", 40002)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s.send_to(b"side", (ns0, UDP_PORT)).unwrap();
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
    let refused_at_veth = || {
        let counters = n1.daemon.as_ref().unwrap().status();
        named(&counters, "tc_service", "service_source_outside_tunnel")
    };
    let before = refused_at_veth();
    spawn_in(&side.name, move || {
        let s = UdpSocket::bind((OAK_IP, 40003)).unwrap();
        for _ in 0..20 {
            s.send_to(b"forged", (ns0, UDP_PORT)).unwrap();
        }
    })
    .join()
    .unwrap();
    let all = wait_until(Duration::from_secs(30), || refused_at_veth() - before == 20);
    assert!(
        all,
        "{} of 20 refused at the veth",
        refused_at_veth() - before
    );
    drop(side);

    // OAK's interest came with the table; unused for 10 s, it is removed
    // (unsubscribed, interest/remove, entries dropped). WEB, deployed here, stays.
    let asked = Instant::now();
    let removed = wait_until(Duration::from_secs(15), || {
        !cluster.received("/net/interest/remove").is_empty()
    });
    assert!(removed, "no interest/remove");
    let took = asked.elapsed();
    let removals: Vec<_> = cluster
        .received("/net/interest/remove")
        .into_iter()
        .map(|m| m["payload"].clone())
        .collect();
    assert_eq!(removals, [json!({"appname": OAK})]);
    assert!(took >= Duration::from_secs(8), "removed after {took:?}");
    let ok = wait_until(Duration::from_secs(30), || {
        !status_services(&n1).iter().any(|(a, _)| a == OAK_IP)
    });
    assert!(ok, "{:?}", status_services(&n1));
    assert!(status_services(&n1).contains(&(WEB0_IP.into(), 1)));
    drop(task);
}

/// One-way traffic: OAK's packets reach web#0, which never answers. The
/// first is refused (OAK's instance IP is unknown), asked for, and the
/// table lets the rest in; while they keep arriving the interest stays
/// (arrivals count as use, not only packets sent to OAK), and once they
/// stop it goes after its idle time.
#[test]
fn a_one_way_flow_from_another_node_keeps_its_table_while_it_arrives() {
    if !kernel_tests_enabled() {
        return;
    }
    const OAK_NODE: &str = "198.18.2.9";
    const QUIET_PORT: u16 = 7009;
    let cluster = Cluster::start(&jobs(OAK_NODE), "192.0.2.0");
    let n1 = node(
        &cluster,
        "oaow",
        "198.18.2.1",
        &format!("[lb]\ntunnel_peers = [\"{OAK_NODE}\"]\n"),
    );
    let oak = Netns::new("oao");
    cluster.attach(&oak, OAK_NODE);
    register(&n1);
    let web0 = Netns::new("oaw");
    let task = Task::start(&web0);
    let ns0: Ipv4Addr = deploy(&n1, &task, WEB, 0).parse().unwrap();
    // A socket that reads and never answers.
    let (bound, ready) = std::sync::mpsc::channel();
    let counted = spawn_in(&web0.name, move || {
        let s = UdpSocket::bind(("0.0.0.0", QUIET_PORT)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let _ = bound.send(());
        let mut got = 0u32;
        let mut buf = [0u8; 64];
        while s.recv(&mut buf).is_ok() {
            got += 1;
        }
        got
    });
    ready.recv().unwrap();

    let oak_ip: Ipv4Addr = OAK_IP.parse().unwrap();
    let inner = tapmesh_tests::frames::udp4(oak_ip, ns0, 40000, QUIET_PORT, b"log");
    // 15 s at 4 per second: past the 10 s idle time while it lasts.
    const SENT: u32 = 60;
    spawn_in(&oak.name, move || {
        let s = UdpSocket::bind((OAK_NODE, 50103)).unwrap();
        for _ in 0..SENT {
            s.send_to(&inner, ("198.18.2.1", 50103)).unwrap();
            std::thread::sleep(Duration::from_millis(250));
        }
    })
    .join()
    .unwrap();
    let sent_until = Instant::now();
    assert!(
        cluster.received("/net/interest/remove").is_empty(),
        "the interest went while OAK's packets arrived"
    );
    let got = counted.join().unwrap();
    // The first, and those sent before the table was in (3 s allowed), were refused.
    assert!((SENT - 12..SENT).contains(&got), "{got} of {SENT} arrived");
    let removed = wait_until(Duration::from_secs(15), || {
        !cluster.received("/net/interest/remove").is_empty()
    });
    assert!(removed, "no interest/remove after the flow stopped");
    assert!(sent_until.elapsed() >= Duration::from_secs(7));
    drop(task);
}

#[test]
fn a_node_whose_uplink_address_changes_reports_it_and_traffic_follows() {
    if !kernel_tests_enabled() {
        return;
    }
    let cluster = Cluster::start(&jobs("198.18.2.9"), "192.0.2.64");
    // Node 1 is not told its address: it uses and follows its uplink's.
    // Node 3 takes tunnel packets from node 1's new address only once a
    // table names it.
    let n1 = node_following(
        &cluster,
        "oam1",
        "198.18.2.1",
        "[lb]\ntunnel_peers = [\"198.18.2.3\"]\n",
    );
    let n3 = node(
        &cluster,
        "oam3",
        "198.18.2.3",
        "[lb]\ntunnel_peers = [\"198.18.2.1\"]\n",
    );
    register(&n1);
    register(&n3);
    let (web0, client) = (Netns::new("oamw"), Netns::new("oamc"));
    let (t0, tc) = (Task::start(&web0), Task::start(&client));
    deploy(&n1, &t0, WEB, 0);
    deploy(&n3, &tc, CLIENT, 0);
    who_server(&web0, "web0");
    let answered = || udp_ask(&client, WEB0_IP, 1)[0].0 == "web0";
    assert!(
        wait_until(Duration::from_secs(30), answered),
        "web#0 never answered; node 3 log: {}",
        n3.daemon.as_ref().unwrap().log_text()
    );
    let deployed = cluster.received("/net/service/deployed");
    assert_eq!(
        deployed[0]["payload"]["host_ip"], "198.18.2.1",
        "{deployed:?}"
    );

    // The uplink's address changes (DHCP, a move): removed, then the new one.
    n1.netns
        .ip(&["addr", "del", "198.18.2.1/24", "dev", &n1.uplink]);
    n1.netns
        .ip(&["addr", "add", "198.18.2.11/24", "dev", &n1.uplink]);
    let moved = Instant::now();
    let reported = wait_until(Duration::from_secs(30), || {
        !cluster.received("/net/service/address-changed").is_empty()
    });
    assert!(
        reported,
        "no address-changed: {}",
        n1.daemon.as_ref().unwrap().log_text()
    );
    eprintln!("address change reported after {:?}", moved.elapsed());
    // One report per local instance, in Oakestra's shape and QoS.
    std::thread::sleep(Duration::from_millis(300));
    let notices = cluster.received("/net/service/address-changed");
    assert_eq!(notices.len(), 1, "{notices:?}");
    assert_eq!(
        notices[0]["payload"],
        json!({"appname": WEB, "status": "", "instance_number": 0, "nsip": "",
               "nsipv6": "", "host_port": "50103", "host_ip": "198.18.2.11"})
    );
    assert_eq!(notices[0]["qos"], 1);
    assert!(notices[0]["topic"]
        .as_str()
        .unwrap()
        .starts_with(&format!("nodes/{}/", n1.netns.name)));

    // The cluster tells node 3 (updates_available), node 3 reads WEB's
    // table again and sends to the new address; the replies come from it.
    assert!(
        wait_until(Duration::from_secs(30), answered),
        "web#0 unreachable after the move; node 3 log: {}",
        n3.daemon.as_ref().unwrap().log_text()
    );
    eprintln!("traffic followed after {:?}", moved.elapsed());

    // It moves again while the daemon is down: the restarted daemon finds
    // the address it saved its state at gone and reports the new one.
    let mut n1 = n1;
    n1.restart(&[], |n| {
        n.netns
            .ip(&["addr", "del", "198.18.2.11/24", "dev", &n.uplink]);
        n.netns
            .ip(&["addr", "add", "198.18.2.21/24", "dev", &n.uplink]);
    });
    // The report of `host_ip` reaches the cluster, and node 3 follows.
    let follows = |n1: &Node, host_ip: &str, when: &str| {
        let reported = wait_until(Duration::from_secs(30), || {
            cluster
                .received("/net/service/address-changed")
                .iter()
                .any(|m| m["payload"]["host_ip"] == host_ip)
        });
        assert!(
            reported,
            "no address-changed {when}: {}",
            n1.daemon.as_ref().unwrap().log_text()
        );
        assert!(
            wait_until(Duration::from_secs(30), answered),
            "web#0 unreachable {when}; node 3 log: {}",
            n3.daemon.as_ref().unwrap().log_text()
        );
    };
    follows(&n1, "198.18.2.21", "after the move while down");

    // Moved while down once more, and the first daemon after it never
    // reaches the broker: the one after that still reports the move.
    n1.restart(&[], |n| {
        n.netns
            .ip(&["addr", "del", "198.18.2.21/24", "dev", &n.uplink]);
        n.netns
            .ip(&["addr", "add", "198.18.2.31/24", "dev", &n.uplink]);
        n.netns.ip(&["route", "add", "prohibit", "198.18.2.254/32"]);
    });
    std::thread::sleep(Duration::from_secs(6));
    n1.restart(&[], |n| {
        n.netns.ip(&["route", "del", "prohibit", "198.18.2.254/32"]);
    });
    follows(&n1, "198.18.2.31", "once the broker was back");
    drop((t0, tc));
}

/// The broker away for a while, with misses for 250 unknown service IPs
/// twice: table queries are not queued meanwhile (they filled the request
/// queue, and the node's subscription after the reconnect failed for
/// good). Back, the node subscribes again and takes a table of 60
/// instances, about 20 KB (rumqttc's default 10 KiB limit refused it and
/// dropped the connection).
#[test]
fn after_the_broker_was_away_a_large_table_arrives() {
    if !kernel_tests_enabled() {
        return;
    }
    const BIG: &str = "app.ns.big.ns";
    const BIG_RR: &str = "203.0.113.20";
    let instances: Vec<serde_json::Value> = (0..60)
        .map(|i| {
            json!({
                "instance_number": i, "instance_ip": format!("203.0.113.{}", 150 + i),
                "instance_ip_v6": "", "namespace_ip": format!("198.51.100.{}", 10 + i),
                "namespace_ip_v6": "", "host_ip": "198.18.2.9", "host_port": "50103",
                "status": "DEPLOYED"
            })
        })
        .collect();
    let mut store = jobs("198.18.2.9");
    store[BIG] = json!({
        "service_ip_list": [{"IpType": "RR", "Address": BIG_RR, "Address_v6": ""}],
        "instances": instances
    });
    let mut cluster = Cluster::start(&store, "192.0.2.0");
    let n1 = node(&cluster, "oab1", "198.18.2.1", "");
    register(&n1);
    let client = Netns::new("oabc");
    let task = Task::start(&client);
    deploy(&n1, &task, CLIENT, 0);

    cluster.stop_broker();
    // A deploy while the broker is away is still answered.
    let web = Netns::new("oabw");
    let web_task = Task::start(&web);
    deploy(&n1, &web_task, WEB, 0);
    let misses = |count: u8| {
        spawn_in(&client.name, move || {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            for last in 1..=count {
                if ![10, 20, 50, 100, 101, 102].contains(&last) && last < 150 || last > 210 {
                    let _ = s.send_to(b"miss", (Ipv4Addr::new(203, 0, 113, last), UDP_PORT));
                }
            }
        })
        .join()
        .unwrap()
    };
    misses(254);
    std::thread::sleep(Duration::from_millis(2100));
    misses(254);
    std::thread::sleep(Duration::from_millis(500));
    cluster.start_broker();

    let ok = wait_until(Duration::from_secs(20), || {
        let _ = spawn_in(&client.name, || {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            let _ = s.send_to(b"big", (BIG_RR.parse::<Ipv4Addr>().unwrap(), UDP_PORT));
        })
        .join();
        status_services(&n1).contains(&(BIG_RR.into(), 60))
    });
    assert!(
        ok,
        "node 1's services: {:?}; log: {}",
        status_services(&n1),
        n1.daemon.as_ref().unwrap().log_text()
    );
    let answers = cluster.received("/net/tablequery/result");
    assert!(
        answers.iter().any(|m| m["payload"]["app_name"] == BIG),
        "{answers:?}"
    );
    drop(web_task);
}

/// A subnet answer over the node's own network is refused (taken, it put
/// the network's addresses on container gateways and cut the node off),
/// and a deploy says why instead of "the cluster has not answered".
#[test]
fn a_cluster_subnet_over_the_nodes_network_is_refused_and_a_deploy_says_why() {
    if !kernel_tests_enabled() {
        return;
    }
    // The peer hands out /26s from the underlay's own 198.18.2.0/24.
    let cluster = Cluster::start(&jobs("198.18.2.9"), "198.18.2.0");
    let n1 = node(&cluster, "oas1", "198.18.2.1", "");
    // The Node Engine hears of it: Oakestra's NetManager does not start
    // with a subnet it cannot use (it answered 200 and every deploy failed).
    let (status, body) =
        node_engine_post(&n1.socket, "/register", &register_json(&n1.netns.name, HUB));
    assert_eq!(status, 500, "{body}");
    assert!(
        body.contains("the cluster's answer was refused")
            && body.contains("overlaps the node's address (198.18.2.1/32)"),
        "{body}"
    );
    assert_eq!(cluster.received("/net/subnetwork/result").len(), 1);
    // Registering again asks again.
    let (status, _) =
        node_engine_post(&n1.socket, "/register", &register_json(&n1.netns.name, HUB));
    assert_eq!(status, 500);
    assert_eq!(cluster.received("/net/subnet").len(), 2);
    let client = Netns::new("oasc");
    let task = Task::start(&client);
    let (status, body) = node_engine_post(
        &n1.socket,
        "/container/deploy",
        &deploy_json(task.pid(), CLIENT, 0, ""),
    );
    assert_eq!(status, 500, "{body}");
    // The second answer (the peer's next /26) was refused too.
    let message: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        message["message"],
        "no subnet yet: the cluster's answer was refused (cluster subnet \"198.18.2.64\": overlaps the node's network (198.18.2.0/24))"
    );
    assert_eq!(
        n1.status()["registration"]["subnetwork"],
        "",
        "{:?}",
        n1.status()
    );
}

/// A retained table (an old answer the broker kept) is not applied when
/// the node subscribes, nor a live one nobody asked for: Oakestra takes
/// answers to its open queries only.
/// And a burst of 50 `updates_available` for a job asks for its table
/// again only once the open query is answered, not 50 times.
#[test]
fn a_retained_table_is_ignored_and_a_burst_of_updates_waits_for_the_open_query() {
    if !kernel_tests_enabled() {
        return;
    }
    const GHOST_RR: &str = "203.0.113.77";
    const DUP: &str = "app.ns.dup.ns";
    const DUP_RR: &str = "203.0.113.78";
    // A job whose table the node refuses: instance 0 listed twice.
    let mut known = jobs("198.18.2.9");
    known[DUP] = json!({
        "service_ip_list": [{"IpType": "RR", "Address": DUP_RR, "Address_v6": ""}],
        "instances": (0..2).map(|i| json!({
            "instance_number": 0, "instance_ip": format!("203.0.113.{}", 90 + i),
            "instance_ip_v6": "", "namespace_ip": format!("198.51.100.{}", 90 + i),
            "namespace_ip_v6": "", "host_ip": "198.18.2.9", "host_port": "50103",
            "status": "DEPLOYED"
        })).collect::<Vec<_>>()
    });
    let cluster = Cluster::start(&known, "192.0.2.0");
    // Kept by the broker for the node's topic before the node connects.
    let ghost = json!({
        "app_name": "app.ns.ghost.ns", "query_key": "app.ns.ghost.ns",
        "instance_list": (0..3).map(|i| json!({
            "instance_number": i, "instance_ip": format!("203.0.113.{}", 80 + i),
            "instance_ip_v6": "", "namespace_ip": format!("198.51.100.{}", 80 + i),
            "namespace_ip_v6": "", "host_ip": "198.18.2.9", "host_port": "50103",
            "service_ip": [{"IpType": "RR", "Address": GHOST_RR, "Address_v6": ""}]
        })).collect::<Vec<_>>()
    });
    let n1 = node(&cluster, "oar1", "198.18.2.1", "");
    cluster.publish(
        &format!("nodes/{}/net/tablequery/result", n1.netns.name),
        &ghost.to_string(),
        true,
        1,
    );
    register(&n1);
    let web = Netns::new("oarw");
    let task = Task::start(&web);
    deploy(&n1, &task, WEB, 0);
    let subscribed = wait_until(Duration::from_secs(30), || {
        status_services(&n1).contains(&(RR.into(), 1))
    });
    assert!(subscribed, "{:?}", status_services(&n1));
    std::thread::sleep(Duration::from_millis(500));
    let services = status_services(&n1);
    assert!(
        !services.iter().any(|(a, _)| a == GHOST_RR),
        "the retained table was applied: {services:?}"
    );
    // Nor a live one that answers no query the node sent.
    cluster.publish(
        &format!("nodes/{}/net/tablequery/result", n1.netns.name),
        &ghost.to_string(),
        false,
        1,
    );
    let ignored = wait_until(Duration::from_secs(30), || {
        n1.daemon.as_ref().unwrap().log_text().contains(
            "a table that answers no open query (asked in the last 5 s) ignored job=app.ns.ghost.ns query_key=app.ns.ghost.ns",
        )
    });
    assert!(ignored, "{}", n1.daemon.as_ref().unwrap().log_text());
    let services = status_services(&n1);
    assert!(
        !services.iter().any(|(a, _)| a == GHOST_RR),
        "a table nobody asked for was applied: {services:?}"
    );
    // A table the node refuses makes no interest: the one the cluster
    // noted with the query is removed.
    let dup_rr: Ipv4Addr = DUP_RR.parse().unwrap();
    spawn_in(&web.name, move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.send_to(b"x", (dup_rr, UDP_PORT)).unwrap();
    })
    .join()
    .unwrap();
    let removed = wait_until(Duration::from_secs(30), || {
        cluster
            .received("/net/interest/remove")
            .iter()
            .any(|m| m["payload"]["appname"] == DUP)
    });
    let log = n1.daemon.as_ref().unwrap().log_text();
    assert!(removed, "no interest/remove for the refused table: {log}");
    assert!(log.contains("instance 0 is listed twice"), "{log}");

    let asked = || {
        cluster
            .received("/net/tablequery/request")
            .iter()
            .filter(|m| m["payload"]["sname"] == WEB)
            .count()
    };
    // Quiet first: the deploy's own query answered.
    std::thread::sleep(Duration::from_millis(2100));
    let before = asked();
    cluster.publish(&format!("jobs/{WEB}/updates_available"), "{}", false, 50);
    std::thread::sleep(Duration::from_millis(1000));
    // An answer closes the query, and an update after it asks again (it
    // may be newer than the answer): how many depends on how the burst and
    // the answers interleave (1 to 6 here; the old daemon asked 50 times).
    let burst = asked() - before;
    assert!(
        (1..25).contains(&burst),
        "{burst} table queries for 50 updates"
    );
}

#[test]
fn a_restarted_node_asks_again_for_the_tables_it_kept_hears_their_updates_and_lets_idle_ones_go() {
    if !kernel_tests_enabled() {
        return;
    }
    const OAK_NODE: &str = "198.18.2.9";
    let cluster = Cluster::start(&jobs(OAK_NODE), "192.0.2.0");
    let mut n1 = node(&cluster, "oark", "198.18.2.1", "");
    register(&n1);
    let client = Netns::new("oarc");
    let task = Task::start(&client);
    deploy(&n1, &task, CLIENT, 0);
    // A container whose namespace is gone while the daemon is down.
    let gone = Netns::new("oarg");
    let gone_task = Task::start(&gone);
    let gone_ns = deploy(&n1, &gone_task, WEB, 0);
    // The client dials OAK's instance IP: the node asks by IP and keeps the table.
    let held = wait_until(Duration::from_secs(30), || {
        udp_ask(&client, OAK_IP, 1);
        status_services(&n1).contains(&(OAK_IP.into(), 1))
    });
    assert!(held, "OAK's table never came: {:?}", status_services(&n1));
    let me = format!("nodes/{}/", n1.netns.name);
    let queries_for = |job: &str| {
        cluster
            .received("/net/tablequery/request")
            .iter()
            .filter(|m| {
                m["payload"] == json!({"sname": job, "sip": ""})
                    && m["topic"].as_str().unwrap().starts_with(&me)
            })
            .count()
    };
    let before = queries_for(OAK);

    // Restarted, the node still holds OAK's table (its state file): it asks
    // for it again, and for the job deployed here.
    let client_before = queries_for(CLIENT);
    n1.restart(&[], move |_| drop((gone_task, gone)));
    assert!(status_services(&n1).contains(&(OAK_IP.into(), 1)));
    // The cluster hears it is undeployed, as when a veth dies (found by a
    // tester: it kept the instance, and the Node Engine's undeploy then
    // found nothing here to report).
    let told = wait_until(Duration::from_secs(30), || {
        cluster.received("/net/service/undeployed").iter().any(|m| {
            m["topic"].as_str().unwrap().starts_with(&me)
                && m["payload"]
                    == json!({"appname": WEB, "status": "UNDEPLOYED", "instance_number": 0,
                              "nsip": gone_ns, "nsipv6": "", "host_port": "50103",
                              "host_ip": "198.18.2.1"})
        })
    });
    assert!(told, "{:?}", cluster.received("/net/service/undeployed"));
    let asked = wait_until(Duration::from_secs(30), || {
        queries_for(OAK) == before + 1 && queries_for(CLIENT) == client_before + 1
    });
    assert!(
        asked,
        "after the restart: {} queries for OAK (before {before}), {} for CLIENT (before {client_before})",
        queries_for(OAK),
        queries_for(CLIENT)
    );
    // It is subscribed to OAK's updates: one makes it ask again.
    std::thread::sleep(Duration::from_millis(2100));
    cluster.publish(
        &format!("jobs/{OAK}/updates_available"),
        r#"{"type":"DEPLOYMENT"}"#,
        false,
        1,
    );
    let asked = wait_until(Duration::from_secs(30), || queries_for(OAK) == before + 2);
    assert!(
        asked,
        "{} queries for OAK after an update",
        queries_for(OAK)
    );
    // Unused, the kept table goes as any other: interest removed, entries dropped.
    let removed = wait_until(Duration::from_secs(20), || {
        cluster
            .received("/net/interest/remove")
            .iter()
            .any(|m| m["payload"] == json!({"appname": OAK}))
    });
    assert!(removed, "no interest/remove for OAK after the restart");
    assert!(!status_services(&n1).contains(&(OAK_IP.into(), 1)));
    drop(task);
}

/// A stranger (no node: anyone on the underlay) may make a node ask about
/// its inner sources, but only so often: at most 32 notices a second in the
/// kernel, 16 open queries on a budget of their own (found by an
/// independent tester and a review: one notice per packet, and the shared
/// budget of 256 held full).
#[test]
fn a_strangers_inner_sources_are_asked_about_only_so_often() {
    if !kernel_tests_enabled() {
        return;
    }
    const STRANGER: &str = "198.18.2.66";
    let cluster = Cluster::start(&jobs("198.18.2.9"), "192.0.2.0");
    let n1 = node(&cluster, "oast", "198.18.2.1", "");
    register(&n1);
    let client = Netns::new("oasc");
    let task = Task::start(&client);
    let ns: Ipv4Addr = deploy(&n1, &task, CLIENT, 0).parse().unwrap();
    let outsider = Netns::new("oaso");
    cluster.attach(&outsider, STRANGER);
    let before = cluster.received("/net/tablequery/request").len();
    // 2000 packets from 200 inner sources (203.0.113.0/24, the service
    // prefix, none of them known), in under a second.
    let started = Instant::now();
    spawn_in(&outsider.name, move || {
        let s = UdpSocket::bind((STRANGER, 50103)).unwrap();
        for i in 0..2000u32 {
            let src = Ipv4Addr::new(203, 0, 113, 30 + (i % 200) as u8);
            let inner = tapmesh_tests::frames::udp4(src, ns, 40000, UDP_PORT, b"in");
            s.send_to(&inner, ("198.18.2.1", 50103)).unwrap();
        }
    })
    .join()
    .unwrap();
    let took = started.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let status = n1
        .daemon
        .as_ref()
        .unwrap()
        .status_when(|s| named(s, "xdp_uplink", "tunnel_unknown_node") >= 2000);
    assert_eq!(named(&status, "xdp_uplink", "tunnel_unknown_node"), 2000);
    let seconds = took.as_secs() + 1;
    let misses = n1.status()["misses"].as_u64().unwrap();
    assert!(
        (1..=32 * (seconds + 1)).contains(&misses),
        "{misses} notices in {took:?}"
    );
    let asked: Vec<_> = cluster.received("/net/tablequery/request")[before..]
        .iter()
        .filter(|m| {
            m["payload"]["sip"]
                .as_str()
                .is_some_and(|s| s.starts_with("203.0.113."))
        })
        .cloned()
        .collect();
    assert!(
        (1..=16 * (seconds / 2 + 1)).contains(&(asked.len() as u64)),
        "{} queries in {took:?}: {asked:?}",
        asked.len()
    );
    drop(task);
}
