//! The host is never a container: NetManager refuses to deploy into the
//! daemon's network namespace, the initial one, or something that is not a
//! network namespace, and a refused request changes no route, link or
//! address of the node. Client mistakes get 4xx, oversized bodies 413, and
//! no reply echoes what it was sent.

use std::{
    io::{Read, Write},
    os::unix::{fs::MetadataExt, net::UnixStream},
    path::Path,
    process::{Child, Command},
    time::Duration,
};

use tapmesh_tests::{
    kernel_tests_enabled,
    overlay::{deploy_body, one_node, one_node_with, Node},
    Netns, TempDir,
};

const JOB: &str = "app.ns.web.ns";

/// Routes (both families, every table), links and addresses of a namespace,
/// as `ip -j` prints them.
fn network_of(netns: &Netns) -> Vec<serde_json::Value> {
    [
        &["-j", "-4", "route", "show", "table", "all"][..],
        &["-j", "-6", "route", "show", "table", "all"],
        &["-j", "link", "show"],
        &["-j", "address", "show"],
    ]
    .iter()
    .map(|args| {
        let out = netns.ip(args);
        serde_json::from_slice(&out.stdout).expect("ip -j output")
    })
    .collect()
}

fn inode(path: &str) -> u64 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .ino()
}

fn message(text: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
    v["message"].as_str().expect("message").to_string()
}

/// A process that lives in `netns` until dropped.
struct Sleeper(Child);

impl Sleeper {
    fn start(netns: &Netns) -> Self {
        let child = Command::new("ip")
            .args(["netns", "exec", &netns.name, "sleep", "600"])
            .spawn()
            .expect("sleep");
        let pid = child.id();
        // `ip netns exec` runs sleep in its own process once it has entered.
        let target = inode(&format!("/run/netns/{}", netns.name));
        let entered = tapmesh_tests::net::wait_until(Duration::from_secs(30), || {
            std::fs::metadata(format!("/proc/{pid}/ns/net")).is_ok_and(|m| m.ino() == target)
        });
        assert!(entered, "sleep did not enter {}", netns.name);
        Self(child)
    }
}

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn deploy_with(node: &Node, which: &str) -> (u16, String) {
    node.api(
        "/container/deploy",
        &format!(r#"{{{which}, "serviceName": "{JOB}", "instanceNumber": 0, "serviceIp": [{{"IpType": "RR", "Address": "203.0.113.10"}}]}}"#),
    )
}

#[test]
fn the_host_is_never_a_container_and_a_refusal_changes_nothing() {
    if !kernel_tests_enabled() {
        return;
    }
    let (node, _peer) = one_node();
    // The node's default route: what a deploy into its namespace used to replace.
    node.netns
        .ip(&["route", "add", "default", "via", "198.18.2.2"]);
    node.register("192.0.2.0/26");
    let before = network_of(&node.netns);
    let daemon_ns = inode(&format!("/run/netns/{}", node.netns.name));
    // Where pid 1 is not ours to look at (a sandbox without ptrace rights
    // over it), the daemon cannot open it either: then 404.
    let init_ns = std::fs::metadata("/proc/1/ns/net").ok().map(|m| m.ino());
    let daemon_pid = node.daemon.as_ref().expect("daemon").pid();
    let sleeper = Sleeper::start(&node.netns);
    let not_a_namespace = TempDir::new("tmnm");
    let file = not_a_namespace.0.join("netns");
    std::fs::write(&file, "not a namespace").expect("file");
    let own = |what: String| {
        format!("{what} is in the daemon's network namespace (net:[{daemon_ns}]): a container needs a namespace of its own")
    };
    let initial = |what: String, unreadable: String| {
        match init_ns {
        Some(ino) => (403, format!("{what} is in the host's initial network namespace (net:[{ino}]): a container needs a namespace of its own")),
        None => (404, unreadable),
    }
    };
    let denied = "Permission denied (os error 13)";
    let mut cases: Vec<(String, u16, String)> = vec![
        (
            format!(r#""pid": {daemon_pid}"#),
            403,
            own(format!("pid {daemon_pid}")),
        ),
        (
            format!(r#""pid": {}"#, sleeper.0.id()),
            403,
            own(format!("pid {}", sleeper.0.id())),
        ),
        (
            format!(r#""netns": "/run/netns/{}""#, node.netns.name),
            403,
            own(format!("netns \"/run/netns/{}\"", node.netns.name)),
        ),
        (
            format!(r#""netns": "{}""#, file.display()),
            400,
            format!(
                "netns {:?} is not a network namespace: it is not a namespace file (nsfs)",
                file.display().to_string()
            ),
        ),
        (
            format!(r#""netns": "/proc/{daemon_pid}/ns/mnt""#),
            400,
            format!("netns \"/proc/{daemon_pid}/ns/mnt\" is not a network namespace: it is a namespace, but not a network namespace"),
        ),
        // This test's own process: in the namespace the daemon was started from.
        (
            format!(r#""pid": {}"#, std::process::id()),
            403,
            format!(
                "pid {} is in {} (net:[{}]): a container needs a namespace of its own",
                std::process::id(),
                if init_ns == Some(inode("/proc/self/ns/net")) {
                    "the host's initial network namespace"
                } else {
                    "the host's network namespace, where the daemon was started"
                },
                inode("/proc/self/ns/net")
            ),
        ),
    ];
    let (status, expected) = initial(
        "netns \"/proc/1/ns/net\"".into(),
        format!("network namespace \"/proc/1/ns/net\" cannot be opened ({denied})"),
    );
    cases.push((r#""netns": "/proc/1/ns/net""#.to_string(), status, expected));
    let (status, expected) = initial(
        "pid 1".into(),
        format!("no process 1 with a network namespace ({denied})"),
    );
    cases.push(("\"pid\": 1".to_string(), status, expected));
    for (which, status, expected) in cases {
        let (got, text) = deploy_with(&node, &which);
        assert_eq!((got, message(&text)), (status, expected), "{which}");
        assert_eq!(
            network_of(&node.netns),
            before,
            "{which}: the node's routes, links or addresses changed"
        );
        assert!(node.container_links().is_empty(), "{which}");
    }
    assert_eq!(node.status()["instances"].as_array().map(Vec::len), Some(0));
}

/// One HTTP request with a body of `length` bytes; the body is written on
/// another thread, so a server that answers before reading it all is heard.
fn big_request(socket: &Path, path: &str, body: Vec<u8>) -> (u16, Vec<u8>) {
    let mut stream = UnixStream::connect(socket).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).expect("head");
    let mut writer = stream.try_clone().expect("clone");
    let sending = std::thread::spawn(move || {
        let _ = writer.write_all(&body);
    });
    let mut response = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => response.extend_from_slice(&buf[..n]),
            Err(_) if !response.is_empty() => break,
            Err(e) => panic!("reading: {e}"),
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
    let _ = sending.join();
    let text = String::from_utf8_lossy(&response);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.as_bytes().to_vec())
        .unwrap_or_default();
    (status, body)
}

#[test]
fn client_mistakes_get_4xx_and_no_echo() {
    if !kernel_tests_enabled() {
        return;
    }
    let (node, _peer) = one_node();
    node.register("192.0.2.0/26");
    let c = Netns::new("ovc");
    node.post(
        "/container/deploy",
        &deploy_body(&c, JOB, 0, &[("RR", "203.0.113.10")]),
    );
    let inside = network_of(&c);
    // Nothing would bring replies back to it from other nodes: said at deploy.
    let log = node.daemon.as_ref().unwrap().log_text();
    assert!(
        log.contains("no InstanceNumber service IP: replies to what it sends to instances on other nodes cannot reach it"),
        "{log}"
    );
    // A second deploy into one namespace: a conflict, and the first one's
    // interface, addresses and routes stay as they were.
    let (status, text) = node.api(
        "/container/deploy",
        &deploy_body(&c, "other.ns.web.ns", 0, &[("RR", "203.0.113.11")]),
    );
    let id = inode(&format!("/run/netns/{}", c.name));
    assert_eq!(
        (status, message(&text)),
        (
            409,
            format!(
                "network namespace net:[{id}] (/run/netns/{}) already holds {JOB} instance 0; one container per namespace",
                c.name
            )
        )
    );
    assert_eq!(network_of(&c), inside);
    assert_eq!(node.container_links().len(), 1);

    // Over the body limit (1 MiB): 413 with a JSON message on every path,
    // answered without reading it all.
    for path in ["/container/deploy", "/tablequery/result", "/register"] {
        let (status, body) = big_request(&node.socket, path, vec![b' '; 3 << 20]);
        let text = String::from_utf8_lossy(&body);
        assert_eq!(status, 413, "{path}: {text}");
        assert!(message(&text).contains("length limit"), "{path}: {text}");
        assert!(body.len() < 512, "{path}: {} bytes answered", body.len());
    }
    // A path or a method it does not serve: JSON too.
    let (status, text) = tapmesh_tests::overlay::http(&node.socket, "POST", "/nothing", "{}");
    assert_eq!(
        (status, message(&text)),
        (404, "no such path: /nothing".into())
    );
    let (status, text) = tapmesh_tests::overlay::http(&node.socket, "GET", "/register", "");
    assert_eq!(
        (status, message(&text)),
        (405, "GET is not taken here (POST, or GET /status)".into())
    );

    // Under the limit, a long bad value is named, not echoed.
    let name = "x".repeat(900_000);
    let request = format!(
        r#"{{"netns": "/run/netns/{}", "serviceName": "{name}", "instanceNumber": 0}}"#,
        c.name
    );
    let (status, body) = big_request(&node.socket, "/container/deploy", request.into_bytes());
    assert_eq!(status, 400);
    assert!(body.len() < 512, "{} bytes answered", body.len());
    let request = format!(
        r#"{{"netns": "/run/netns/{}", "serviceName": "a.b", "instanceNumber": "{name}"}}"#,
        c.name
    );
    let (status, body) = big_request(&node.socket, "/container/deploy", request.into_bytes());
    assert_eq!(status, 400);
    assert!(body.len() < 512, "{} bytes answered", body.len());
    assert_eq!(node.container_links().len(), 1);

    // A container whose namespace is deleted under it: listed as gone.
    let doomed = Netns::new("ovd");
    node.post(
        "/container/deploy",
        &deploy_body(&doomed, "gone.ns.web.ns", 0, &[]),
    );
    drop(doomed);
    let location = || {
        node.status()["instances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["job"] == "gone.ns.web.ns")
            .map(|i| i["location"].as_str().unwrap().to_string())
            .unwrap_or_default()
    };
    let said = tapmesh_tests::net::wait_until(Duration::from_secs(30), || {
        location().ends_with("is gone: was its namespace deleted? undeploy it)")
    });
    assert!(said, "{}", location());
    node.undeploy("gone.ns.web.ns", 0);
    assert_eq!(location(), "");
}

fn jobs(node: &Node) -> Vec<String> {
    node.status()["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .map(|i| i["job"].as_str().expect("job").to_string())
        .collect()
}

/// A namespace whose instance lost its veth is free again: the link was
/// deleted, or the namespace died and the kernel gave its identity to a
/// new one (a restarted container's). A deploy into it undeploys the dead
/// instance instead of answering 409.
#[test]
fn a_namespace_whose_instance_lost_its_veth_takes_a_new_deploy() {
    if !kernel_tests_enabled() {
        return;
    }
    let (node, _peer) = one_node();
    node.register("192.0.2.0/26");
    let c = Netns::new("ovr");
    node.post(
        "/container/deploy",
        &deploy_body(&c, JOB, 0, &[("RR", "203.0.113.10")]),
    );
    let links = node.container_links();
    assert_eq!(links.len(), 1, "{links:?}");
    node.netns.ip(&["link", "del", &links[0]]);
    let other = "other.ns.web.ns";
    let answer = node.post(
        "/container/deploy",
        &deploy_body(&c, other, 0, &[("RR", "203.0.113.11")]),
    );
    assert_eq!(jobs(&node), vec![other.to_string()]);
    assert_eq!(node.container_links().len(), 1);
    let address = answer["nsAddress"].as_str().expect("nsAddress");
    let inside =
        String::from_utf8_lossy(&c.ip(&["-4", "-o", "address", "show"]).stdout).into_owned();
    assert!(inside.contains(&format!("inet {address}/32")), "{inside}");
    let log = node.daemon.as_ref().unwrap().log_text();
    assert!(
        log.contains("its container veth is gone and a new deploy takes its place: undeployed"),
        "{log}"
    );
    // The same job and instance again, in a new namespace (a restarted
    // container) while the old entry's veth is gone: deployed, not 409.
    let links = node.container_links();
    node.netns.ip(&["link", "del", &links[0]]);
    let c2 = Netns::new("ovr");
    node.post(
        "/container/deploy",
        &deploy_body(&c2, other, 0, &[("RR", "203.0.113.11")]),
    );
    assert_eq!(jobs(&node), vec![other.to_string()]);
    assert_eq!(node.container_links().len(), 1);
    drop(c);

    // The namespace dies; a new one may get its identity (the kernel
    // hands out the lowest free number, which parallel tests may take).
    let id = inode(&format!("/run/netns/{}", c2.name));
    drop(c2);
    let gone = tapmesh_tests::net::wait_until(Duration::from_secs(30), || {
        node.container_links().is_empty()
    });
    assert!(gone, "{:?}", node.container_links());
    let mut tried = Vec::new();
    let reused = loop {
        let n = Netns::new("ovr");
        if inode(&format!("/run/netns/{}", n.name)) == id {
            break Some(n);
        }
        tried.push(n);
        if tried.len() == 32 {
            break None;
        }
    };
    drop(tried);
    match reused {
        Some(n) => {
            node.post(
                "/container/deploy",
                &deploy_body(&n, "third.ns.web.ns", 0, &[("RR", "203.0.113.12")]),
            );
            assert_eq!(jobs(&node), vec!["third.ns.web.ns".to_string()]);
            assert_eq!(node.container_links().len(), 1);
        }
        None => {
            eprintln!("net:[{id}] was not given to any of 32 new namespaces; that part not run")
        }
    }
}

/// A new instance's counters start at zero, though its id may be one a
/// gone instance had (ids are reused once the writer emptied them); its
/// own, and its service's, stay across a restart that keeps the dataplane.
#[test]
fn a_new_instance_starts_with_no_packets_of_an_earlier_one() {
    if !kernel_tests_enabled() {
        return;
    }
    let (mut node, _peer) = one_node_with("[dataplane]\nkeep_dataplane = true\n");
    node.register("192.0.2.0/26");
    let client = Netns::new("ovk");
    node.post(
        "/container/deploy",
        &deploy_body(&client, "app.ns.client.ns", 0, &[]),
    );
    let job = "app.ns.c.ns";
    let sip = "203.0.113.60";
    node.table(
        job,
        &[(
            3,
            "198.51.100.70",
            tapmesh_tests::overlay::NODE2,
            &[("RR", sip)],
        )],
    );
    tapmesh_tests::net::spawn_in(&client.name, move || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        for _ in 0..5 {
            s.send_to(b"x", (sip, 7000)).unwrap();
        }
    })
    .join()
    .unwrap();
    let packets = |number: u64| {
        node.status()["instances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["job"] == job && i["number"] == number)
            .map(|i| (i["packets"].as_u64().unwrap(), i["bytes"].as_u64().unwrap()))
    };
    let counted = tapmesh_tests::net::wait_until(Duration::from_secs(30), || {
        packets(3).is_some_and(|(p, _)| p == 5)
    });
    assert!(counted, "{:?}", node.status());
    node.table(job, &[]);
    let c = Netns::new("ovk");
    node.post(
        "/container/deploy",
        &deploy_body(&c, job, 0, &[("RR", sip)]),
    );
    assert_eq!(packets(0), Some((0, 0)), "{}", node.status());

    // From there it counts its own packets, as does the service, and
    // both keep them across a restart that keeps the dataplane.
    tapmesh_tests::net::spawn_in(&client.name, move || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        for _ in 0..2 {
            s.send_to(b"x", (sip, 7000)).unwrap();
        }
    })
    .join()
    .unwrap();
    let counts = |node: &Node| {
        let status = node.status();
        let instance = status["instances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["job"] == job && i["number"] == 0)
            .map(|i| i["packets"].as_u64().unwrap());
        let service = status["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["address"] == sip)
            .map(|s| s["packets"].as_u64().unwrap());
        (instance, service)
    };
    let counted = tapmesh_tests::net::wait_until(Duration::from_secs(30), || {
        counts(&node) == (Some(2), Some(2))
    });
    assert!(counted, "{:?}", counts(&node));
    node.restart(&[], |_| {});
    let kept = tapmesh_tests::net::wait_until(Duration::from_secs(30), || {
        counts(&node) == (Some(2), Some(2))
    });
    assert!(kept, "after the restart: {:?}", counts(&node));
}

/// A clean stop with the NetManager on logs no error: an LB write kicked
/// on the way down (the NetManager leaving the catalog) found the
/// dataplane stopped and said so as an ERROR, at every rolling update.
#[test]
fn a_stop_with_the_netmanager_on_logs_no_error() {
    if !kernel_tests_enabled() {
        return;
    }
    let (mut node, _peer) = one_node();
    let daemon = node.daemon.as_mut().expect("running");
    assert!(daemon.stop().success(), "{}", daemon.log_text());
    let log = daemon.log_text();
    assert!(!log.contains("ERROR"), "{log}");
}

/// A broker that does not answer is retried every second and said once
/// (then summarised every 10 minutes): it was a warning every second
/// (found by an independent tester).
#[test]
fn a_broker_away_is_said_once_not_every_second() {
    if !kernel_tests_enabled() {
        return;
    }
    // Nothing listens on the discard port here.
    let (mut node, _peer) = one_node_with("oakestra = true\nmqtt_broker = \"127.0.0.1:9\"\n");
    node.post(
        "/register",
        r#"{"client_id": "away", "subnetwork": "192.0.2.0/26"}"#,
    );
    std::thread::sleep(Duration::from_millis(3500));
    let daemon = node.daemon.as_mut().expect("running");
    tapmesh_tests::net::wait_until(Duration::from_secs(30), || {
        daemon.log_text().contains("MQTT broker")
    });
    let log = daemon.log_text();
    assert_eq!(log.matches("MQTT broker").count(), 1, "{log}");
    assert!(daemon.stop().success());
}
