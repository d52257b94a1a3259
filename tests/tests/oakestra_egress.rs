//! Container egress in Oakestra mode, as Oakestra's NetManager sets it up:
//! IPv4 forwarding on and the containers' subnet masqueraded behind the
//! node's address, while containers are deployed; put back as found with
//! the last undeploy and at stop; a deploy refused, saying why, when the
//! node's forwarding cannot be turned on.

use std::{net::UdpSocket, time::Duration};

use serde_json::json;
use tapmesh::net::nft::{self, Expr};
use tapmesh::overlay::egress::TABLE;
use tapmesh_tests::{
    kernel_tests_enabled,
    net::{run_in, spawn_in},
    oakestra::{
        deploy_json, node, node_engine_post, node_wrapped, register_json, undeploy_json, Cluster,
        Task, HUB,
    },
    overlay::Node,
    Netns,
};

const WEB: &str = "app.ns.web.ns";
/// The internet: an address beyond the node, on the hub's bridge.
const INTERNET: &str = "198.18.2.20";
const ECHO_PORT: u16 = 7100;

fn jobs() -> serde_json::Value {
    json!({
        WEB: {
            "service_ip_list": [{"IpType": "RR", "Address": "203.0.113.10", "Address_v6": ""}],
            "instances": [{"instance_number": 0, "instance_ip": "203.0.113.101", "instance_ip_v6": ""}]
        }
    })
}

fn register(n: &Node) {
    let (status, body) =
        node_engine_post(&n.socket, "/register", &register_json(&n.netns.name, HUB));
    assert_eq!(status, 200, "{body}");
}

fn deploy(n: &Node, task: &Task) -> (u16, String) {
    node_engine_post(
        &n.socket,
        "/container/deploy",
        &deploy_json(task.pid(), WEB, 0, ""),
    )
}

fn forwarding(n: &Node) -> String {
    let out = n.netns.exec(&["sysctl", "-n", "net.ipv4.ip_forward"]);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn egress_table(n: &Node) -> Option<Vec<nft::KernelChain>> {
    run_in(&n.netns.name, || {
        nft::read(TABLE).expect("reading nftables")
    })
}

/// What the kernel holds for `ip saddr S ip daddr != S masquerade`, S a /26.
fn masquerade_rule(subnet: [u8; 4]) -> Vec<Expr> {
    let prefix = |offset, op| {
        vec![
            Expr::Payload {
                base: 1,
                offset,
                len: 4,
                dreg: 1,
            },
            Expr::Bitwise {
                sreg: 1,
                dreg: 1,
                len: 4,
                mask: vec![255, 255, 255, 192],
                xor: vec![0; 4],
            },
            Expr::Cmp {
                sreg: 1,
                op,
                data: subnet.to_vec(),
            },
        ]
    };
    let mut rule = prefix(12, 0);
    rule.extend(prefix(16, 1));
    rule.push(Expr::Masq {
        attributes: Vec::new(),
    });
    rule
}

/// What the kernel holds for `ip saddr S ip daddr != S udp dport 50103 drop`.
fn tunnel_drop_rule(subnet: [u8; 4]) -> Vec<Expr> {
    let mut rule = masquerade_rule(subnet);
    rule.pop();
    rule.extend([
        Expr::Meta { key: 16, dreg: 1 },
        Expr::Cmp {
            sreg: 1,
            op: 0,
            data: vec![17],
        },
        Expr::Payload {
            base: 2,
            offset: 2,
            len: 2,
            dreg: 1,
        },
        Expr::Cmp {
            sreg: 1,
            op: 0,
            data: 50103u16.to_be_bytes().to_vec(),
        },
        Expr::Verdict { code: 0 },
    ]);
    rule
}

/// Datagrams reaching the internet's UDP `port` in `within`, while
/// `send` runs.
fn received_at(internet: &Netns, port: u16, within: Duration, send: impl FnOnce()) -> usize {
    let receiver = spawn_in(&internet.name, move || {
        let udp = UdpSocket::bind((INTERNET, port)).unwrap();
        udp.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let (mut count, until) = (0, std::time::Instant::now() + within);
        let mut buf = [0u8; 2048];
        while std::time::Instant::now() < until {
            if udp.recv_from(&mut buf).is_ok() {
                count += 1;
            }
        }
        count
    });
    std::thread::sleep(Duration::from_millis(100));
    send();
    receiver.join().unwrap()
}

/// A UDP echo on the internet that answers with the source it saw; its
/// log of sources.
fn echo(internet: &Netns) -> std::sync::Arc<std::sync::Mutex<Vec<String>>> {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    let _ = spawn_in(&internet.name, move || {
        let udp = UdpSocket::bind((INTERNET, ECHO_PORT)).unwrap();
        let mut buf = [0u8; 2048];
        while let Ok((_, from)) = udp.recv_from(&mut buf) {
            log.lock().unwrap().push(from.ip().to_string());
            let _ = udp.send_to(from.ip().to_string().as_bytes(), from);
        }
    });
    std::thread::sleep(Duration::from_millis(100));
    seen
}

/// `count` datagrams from the container to the internet, one at a time;
/// each answer (what the internet saw as source) and where it came from.
fn ask_internet(container: &Netns, count: usize) -> Vec<(String, String)> {
    run_in(&container.name, move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        (0..count)
            .map(|_| {
                s.send_to(b"out", (INTERNET, ECHO_PORT)).unwrap();
                let mut buf = [0u8; 64];
                match s.recv_from(&mut buf) {
                    Ok((n, from)) => (
                        String::from_utf8_lossy(&buf[..n]).into_owned(),
                        from.to_string(),
                    ),
                    Err(_) => ("(no answer)".into(), String::new()),
                }
            })
            .collect()
    })
}

#[test]
fn a_container_reaches_the_internet_from_the_node_address_while_deployed() {
    if !kernel_tests_enabled() {
        return;
    }
    let cluster = Cluster::start(&jobs(), "192.0.2.64");
    let mut n = node(&cluster, "oen", "198.18.2.1", "");
    let internet = Netns::new("oei");
    cluster.attach(&internet, INTERNET);
    let seen = echo(&internet);
    // The node as found: forwarding off, no table.
    n.netns.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=0"]);
    register(&n);
    assert_eq!(egress_table(&n), None, "nothing before a deploy");
    assert_eq!(forwarding(&n), "0");

    let container = Netns::new("oec");
    let task = Task::start(&container);
    let (status, body) = deploy(&n, &task);
    assert_eq!(status, 200, "{body}");
    let chains = egress_table(&n).expect("the egress table");
    assert_eq!(chains.len(), 1, "{chains:?}");
    let c = &chains[0];
    assert_eq!(
        (
            c.name.as_str(),
            c.hook,
            c.priority,
            c.kind.as_str(),
            c.policy
        ),
        ("postrouting", Some(4), Some(100), "nat", Some(1))
    );
    assert_eq!(
        c.rules,
        [
            tunnel_drop_rule([192, 0, 2, 64]),
            masquerade_rule([192, 0, 2, 64])
        ]
    );
    assert_eq!(forwarding(&n), "1");

    // The node's tunnel port stays out of reach: other nodes would take a
    // container's datagram, from the node's address, as this node's.
    let name = container.name.clone();
    let got = received_at(&internet, 50103, Duration::from_millis(800), move || {
        run_in(&name, || {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            for _ in 0..5 {
                s.send_to(b"forged", (INTERNET, 50103)).unwrap();
            }
        })
    });
    assert_eq!(
        got, 0,
        "container datagrams to the tunnel port left the node"
    );

    // Out through the node: the internet sees the node's address only.
    let answers = ask_internet(&container, 5);
    assert_eq!(
        answers,
        vec![("198.18.2.1".to_string(), format!("{INTERNET}:{ECHO_PORT}")); 5]
    );
    assert_eq!(*seen.lock().unwrap(), vec!["198.18.2.1"; 5]);

    // The last undeploy puts the node back as found.
    let (status, _) = node_engine_post(&n.socket, "/container/undeploy", &undeploy_json(WEB, 0));
    assert_eq!(status, 200);
    assert_eq!(egress_table(&n), None);
    assert_eq!(forwarding(&n), "0");

    // Deployed again, then the daemon stops: the same.
    let (status, body) = deploy(&n, &task);
    assert_eq!(status, 200, "{body}");
    assert!(egress_table(&n).is_some());
    assert_eq!(forwarding(&n), "1");
    let mut daemon = n.daemon.take().expect("daemon");
    assert!(daemon.stop().success(), "{}", daemon.log_text());
    assert_eq!(egress_table(&n), None);
    assert_eq!(forwarding(&n), "0");
    drop(task);
}

#[test]
fn a_deploy_is_refused_with_the_reason_when_forwarding_cannot_be_turned_on() {
    if !kernel_tests_enabled() {
        return;
    }
    let cluster = Cluster::start(&jobs(), "192.0.2.128");
    // As in a container with a read-only /proc/sys.
    let read_only = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        "mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys && exec \"$0\" \"$@\"",
    ];
    let n = node_wrapped(&read_only, &cluster, "oer", "198.18.2.1", "");
    n.netns.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=0"]);
    register(&n);
    let container = Netns::new("oerc");
    let task = Task::start(&container);
    let (status, body) = deploy(&n, &task);
    assert_eq!(status, 500, "{body}");
    let message = serde_json::from_str::<serde_json::Value>(&body).unwrap()["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        message,
        "container egress needs IPv4 forwarding: writing 1 to /proc/sys/net/ipv4/ip_forward \
         (net.ipv4.ip_forward): Read-only file system (os error 30); turn it on for the node \
         (net.ipv4.ip_forward = 1) or set netmanager.masquerade = false"
    );
    // Nothing left: no link, no table, no instance, forwarding as found.
    assert_eq!(n.container_links(), Vec::<String>::new());
    assert_eq!(egress_table(&n), None);
    assert_eq!(forwarding(&n), "0");
    assert_eq!(n.status()["instances"].as_array().map(Vec::len), Some(0));

    // The way out the message names: masquerade off, the deploy works.
    let off = node_wrapped(
        &read_only,
        &cluster,
        "oeo",
        "198.18.2.2",
        "masquerade = false\n",
    );
    off.netns.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=0"]);
    register(&off);
    let (status, body) = deploy(&off, &task);
    assert_eq!(status, 200, "{body}");
    assert_eq!(egress_table(&off), None);
    assert_eq!(forwarding(&off), "0");
    drop(task);
}
