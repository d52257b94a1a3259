//! Unikernels as Oakestra's Node Engine deploys them: `/unikernel/deploy`
//! with pid 0 makes the named namespace `<job>.instance.<n>` with the veth,
//! a bridge `virbr0` 192.168.1.1/30 holding the TAP device `tap0`, and NAT to
//! the VM at 192.168.1.2; the instance's service IPs reach the VM (a
//! namespace on the bridge stands in for it); `/unikernel/undeploy` removes
//! it all.

use std::{net::UdpSocket, process::Command, time::Duration};

use serde_json::json;
use tapmesh::net::nft::{self, Expr};
use tapmesh_tests::{
    kernel_tests_enabled,
    net::{run_in, spawn_in, wait_until},
    oakestra::{deploy_json, node, node_engine_post, register_json, Cluster, Task, HUB},
    sh, unique, Netns,
};

const RR: &str = "203.0.113.10";
const UK_IP: &str = "203.0.113.101";
const CLIENT_IP: &str = "203.0.113.100";

/// A named namespace made by the daemon, deleted on drop if still there.
struct NamedNs(String);

impl Drop for NamedNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.0])
            .output();
    }
}

fn ip_json(ns: &str, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["-n", ns, "-j"];
    all.extend_from_slice(args);
    let out = sh("ip", &all);
    serde_json::from_slice(&out.stdout).expect("ip -j output")
}

fn services(n: &tapmesh_tests::overlay::Node) -> Vec<(String, u64)> {
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
fn a_unikernel_gets_its_namespace_bridge_tap_and_nat_and_its_service_ips_reach_the_vm() {
    if !kernel_tests_enabled() {
        return;
    }
    let job = format!("app.ns.{}.ns", unique("uk"));
    let client_job = format!("app.ns.{}.ns", unique("ukc"));
    let jobs = json!({
        &job: {
            "service_ip_list": [{"IpType": "RR", "Address": RR, "Address_v6": ""}],
            "instances": [{"instance_number": 0, "instance_ip": UK_IP, "instance_ip_v6": ""}]
        },
        &client_job: {
            "service_ip_list": [],
            "instances": [{"instance_number": 0, "instance_ip": CLIENT_IP, "instance_ip_v6": ""}]
        }
    });
    let cluster = Cluster::start(&jobs, "192.0.2.0");
    let n = node(&cluster, "ukn", "198.18.2.1", "");
    let body = deploy_json(0, &job, 0, "");
    assert_eq!(
        body,
        format!(r#"{{"pid":0,"serviceName":"{job}","instanceNumber":0,"portMappings":""}}"#)
    );
    let (status, _) = node_engine_post(&n.socket, "/unikernel/deploy", &body);
    assert_eq!(status, 400, "before /register, as Oakestra");
    let (status, reply) =
        node_engine_post(&n.socket, "/register", &register_json(&n.netns.name, HUB));
    assert_eq!(status, 200, "{reply}");

    let name = format!("{job}.instance.0");
    let _named = NamedNs(name.clone());
    let (status, reply) = node_engine_post(&n.socket, "/unikernel/deploy", &body);
    assert_eq!(status, 200, "{reply}");
    let reply: serde_json::Value = serde_json::from_str(&reply).unwrap();
    let ns_addr = reply["nsAddress"].as_str().unwrap().to_string();
    assert_eq!(reply["serviceName"], job.as_str());
    assert!(ns_addr.starts_with("192.0.2."), "{reply}");
    let (status, _) = node_engine_post(&n.socket, "/unikernel/deploy", &body);
    assert_eq!(status, 409, "the namespace exists");
    // Found by a tester: a name whose namespace cannot exist (over 255
    // bytes as `<serviceName>.instance.<n>`) was a 500 that hid why.
    let long = format!("app.ns.{}.ns", "a".repeat(240));
    let (status, reply) = node_engine_post(
        &n.socket,
        "/unikernel/deploy",
        &deploy_json(0, &long, 4_000_000_000, ""),
    );
    assert_eq!(status, 400, "{reply}");
    let netns_len = long.len() + ".instance.4000000000".len();
    assert!(
        reply.contains(&format!("would be {netns_len} bytes, over 255")),
        "{reply}"
    );
    let (status, reply) = node_engine_post(
        &n.socket,
        "/unikernel/deploy",
        &format!(
            r#"{{"pid":0,"serviceName":"{job}","instanceNumber":4294967296,"portMappings":""}}"#
        ),
    );
    assert_eq!(status, 400, "{reply}");
    assert!(reply.contains("must be in 0..=4294967295"), "{reply}");

    // The namespace as the Node Engine expects it (its qemu path reads one
    // default route, its link's address and tap0's MAC; crosvm tap0's MAC).
    assert!(std::path::Path::new(&format!("/run/netns/{name}")).exists());
    let addr = ip_json(&name, &["-4", "addr", "show", "dev", "tmsvc0"]);
    assert_eq!(addr[0]["addr_info"][0]["local"], ns_addr.as_str());
    let routes = ip_json(&name, &["-4", "route", "show", "default"]);
    assert_eq!(routes.as_array().unwrap().len(), 1, "{routes}");
    assert_eq!(routes[0]["gateway"], "192.0.2.1");
    assert_eq!(routes[0]["dev"], "tmsvc0");
    let tap = ip_json(&name, &["-d", "link", "show", "tap0"]);
    assert_eq!(tap[0]["linkinfo"]["info_kind"], "tun", "{tap}");
    assert_eq!(tap[0]["linkinfo"]["info_data"]["type"], "tap", "{tap}");
    assert_eq!(tap[0]["master"], "virbr0");
    assert_eq!(tap[0]["address"].as_str().map(str::len), Some(17));
    let bridge = ip_json(&name, &["-4", "addr", "show", "dev", "virbr0"]);
    assert_eq!(bridge[0]["addr_info"][0]["local"], "192.168.1.1");
    assert_eq!(bridge[0]["addr_info"][0]["prefixlen"], 30);
    assert!(bridge[0]["flags"]
        .as_array()
        .unwrap()
        .contains(&json!("UP")));
    let forward = sh(
        "ip",
        &[
            "netns",
            "exec",
            &name,
            "sysctl",
            "-n",
            "net.ipv4.ip_forward",
        ],
    );
    assert_eq!(String::from_utf8_lossy(&forward.stdout).trim(), "1");
    let veth_index = ip_json(&name, &["link", "show", "tmsvc0"])[0]["ifindex"]
        .as_u64()
        .unwrap() as u32;
    let chains = run_in(&name, || nft::read("tapmesh_unikernel").unwrap()).expect("NAT table");
    let rule = |chain: &str| {
        let c = chains.iter().find(|c| c.name == chain).expect(chain);
        (c.hook, c.priority, c.kind.clone(), c.rules.clone())
    };
    let nat = |meta_key, addr: [u8; 4], nat_type| {
        vec![vec![
            Expr::Meta {
                key: meta_key,
                dreg: 1,
            },
            Expr::Cmp {
                sreg: 1,
                op: 0,
                data: veth_index.to_ne_bytes().to_vec(),
            },
            Expr::Immediate {
                dreg: 1,
                data: addr.to_vec(),
            },
            // Type, IPv4, address registers (min = max), "map IPs" flag.
            Expr::Nat {
                attributes: vec![(1, nat_type), (2, 2), (3, 1), (4, 1), (7, 1)],
            },
        ]]
    };
    assert_eq!(
        rule("prerouting"),
        (
            Some(0),
            Some(-100),
            "nat".into(),
            nat(4, [192, 168, 1, 2], 1)
        )
    );
    let ns_octets = ns_addr.parse::<std::net::Ipv4Addr>().unwrap().octets();
    assert_eq!(
        rule("postrouting"),
        (Some(4), Some(100), "nat".into(), nat(5, ns_octets, 0))
    );

    // A stand-in for the VM: a namespace on virbr0 at 192.168.1.2.
    let vm = Netns::new("ukvm");
    let (inside, outside) = (unique("ukv"), unique("ukb"));
    sh(
        "ip",
        &[
            "link", "add", &inside, "netns", &name, "type", "veth", "peer", "name", &outside,
            "netns", &vm.name,
        ],
    );
    sh(
        "ip",
        &[
            "-n", &name, "link", "set", &inside, "master", "virbr0", "up",
        ],
    );
    vm.ip(&["addr", "add", "192.168.1.2/30", "dev", &outside]);
    vm.ip(&["link", "set", &outside, "up"]);
    vm.ip(&["route", "add", "default", "via", "192.168.1.1"]);
    let _ = spawn_in(&vm.name, || {
        let udp = UdpSocket::bind("192.168.1.2:7000").unwrap();
        let mut buf = [0u8; 512];
        while let Ok((_, from)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(format!("vm saw {}", from.ip()).as_bytes(), from);
        }
    });

    // A container on the node dials the unikernel's service IPs.
    let client = Netns::new("ukcl");
    let task = Task::start(&client);
    let (status, reply) = node_engine_post(
        &n.socket,
        "/container/deploy",
        &deploy_json(task.pid(), &client_job, 0, ""),
    );
    assert_eq!(status, 200, "{reply}");
    let ok = wait_until(Duration::from_secs(30), || {
        let s = services(&n);
        // The client's own instance IP too: it is the source replies go to.
        s.contains(&(UK_IP.into(), 1))
            && s.contains(&(RR.into(), 1))
            && s.contains(&(CLIENT_IP.into(), 1))
    });
    assert!(ok, "{:?}", services(&n));
    let ask = |to: &'static str| {
        run_in(&client.name, move || {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.set_read_timeout(Some(Duration::from_millis(700)))
                .unwrap();
            for _ in 0..3 {
                s.send_to(b"hi", (to, 7000)).unwrap();
                let mut buf = [0u8; 64];
                if let Ok((len, from)) = s.recv_from(&mut buf) {
                    return (
                        String::from_utf8_lossy(&buf[..len]).into_owned(),
                        from.to_string(),
                    );
                }
            }
            ("(no answer)".into(), String::new())
        })
    };
    for to in [UK_IP, RR] {
        assert_eq!(
            ask(to),
            (format!("vm saw {CLIENT_IP}"), format!("{to}:7000")),
            "to {to}"
        );
    }
    let deployed = cluster.received("/net/service/deployed");
    assert!(
        deployed
            .iter()
            .any(|m| m["payload"]["appname"] == job.as_str()
                && m["payload"]["nsip"] == ns_addr.as_str()),
        "{deployed:?}"
    );

    // Undeploy as the Node Engine sends it: everything goes, the client stays.
    let undeploy = deploy_json(-1, &job, 0, "");
    let (status, _) = node_engine_post(&n.socket, "/unikernel/undeploy", &undeploy);
    assert_eq!(status, 200);
    assert!(!std::path::Path::new(&format!("/run/netns/{name}")).exists());
    assert_eq!(n.container_links().len(), 1, "the client's link only");
    assert!(!services(&n).iter().any(|(a, _)| a == UK_IP));
    // The notice reaches the cluster's peer asynchronously.
    let told = wait_until(Duration::from_secs(30), || {
        cluster
            .received("/net/service/undeployed")
            .iter()
            .any(|m| m["payload"]["appname"] == job.as_str())
    });
    assert!(told, "{:?}", cluster.received("/net/service/undeployed"));
    let (status, _) = node_engine_post(&n.socket, "/unikernel/undeploy", &undeploy);
    assert_eq!(status, 200, "as Oakestra: not there is 200");
    drop(task);
}

#[test]
fn a_unikernel_takes_its_service_ips_and_weight_and_undeploy_deletes_only_a_namespace_made_for_it()
{
    if !kernel_tests_enabled() {
        return;
    }
    let (mut n, _peer) = tapmesh_tests::overlay::one_node();
    n.register("192.0.2.0/26");
    let job = format!("app.ns.{}.ns", unique("ukw"));
    let body = format!(
        r#"{{"pid": 0, "serviceName": "{job}", "instanceNumber": 0, "portMappings": "", "weight": 3, "serviceIp": [{{"IpType": "InstanceNumber", "Address": "{UK_IP}"}}, {{"IpType": "RR", "Address": "{RR}"}}]}}"#
    );
    let made = NamedNs(format!("{job}.instance.0"));
    n.post("/unikernel/deploy", &body);
    let listed = services(&n);
    assert!(
        listed.contains(&(UK_IP.into(), 1)) && listed.contains(&(RR.into(), 1)),
        "{listed:?}"
    );
    let state_file = n
        .socket
        .with_file_name("state")
        .join("netmanager-state.json");
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&state_file).unwrap()).unwrap();
    assert_eq!(state["local"][0]["record"]["weight"], 3, "{state}");

    // A container in a namespace that happens to bear a unikernel's name:
    // a unikernel undeploy of it removes its link, not its namespace.
    let borrowed = NamedNs(format!("{job}.instance.1"));
    sh("ip", &["netns", "add", &borrowed.0]);
    n.post(
        "/container/deploy",
        &format!(
            r#"{{"netns": "/run/netns/{}", "serviceName": "{job}", "instanceNumber": 1, "portMappings": ""}}"#,
            borrowed.0
        ),
    );
    let undeploy = |n: &tapmesh_tests::overlay::Node, number: u32, path: &str| {
        n.post(
            path,
            &format!(r#"{{"serviceName": "{job}", "instanceNumber": {number}}}"#),
        )
    };
    undeploy(&n, 1, "/unikernel/undeploy");
    assert!(std::path::Path::new(&format!("/run/netns/{}", borrowed.0)).exists());
    let links = ip_json(&borrowed.0, &["link", "show"]);
    assert_eq!(
        links.as_array().unwrap().len(),
        1,
        "only lo is left: {links}"
    );
    // A second unikernel; then a restart that relinks both (the links go
    // at a stop that does not keep the dataplane).
    let second = NamedNs(format!("{job}.instance.2"));
    n.post(
        "/unikernel/deploy",
        &body
            .replace(r#""instanceNumber": 0"#, r#""instanceNumber": 2"#)
            .replace(UK_IP, "203.0.113.102"),
    );
    let nat_iif = |ns: &str| {
        let chains = run_in(ns, || nft::read("tapmesh_unikernel").unwrap()).expect("NAT table");
        let pre = chains
            .iter()
            .find(|c| c.name == "prerouting")
            .expect("prerouting");
        match &pre.rules[0][1] {
            Expr::Cmp { data, .. } => u32::from_ne_bytes(data[..4].try_into().unwrap()),
            other => panic!("{other:?}"),
        }
    };
    let veth_index = |ns: &str| {
        ip_json(ns, &["link", "show", "tmsvc0"])[0]["ifindex"]
            .as_u64()
            .unwrap() as u32
    };
    let before = veth_index(&made.0);
    assert_eq!(nat_iif(&made.0), before);
    n.restart(&[], |_| {});
    // The VM's NAT names the new veth.
    let after = veth_index(&made.0);
    assert_ne!(after, before, "relinked");
    assert_eq!(nat_iif(&made.0), after);
    assert_eq!(nat_iif(&second.0), veth_index(&second.0));
    // Its veth deleted (the VM side gone), the same unikernel is deployed
    // again: the dead entry and the namespace made for it go first, not 409.
    sh("ip", &["-n", &second.0, "link", "del", "tmsvc0"]);
    n.post(
        "/unikernel/deploy",
        &body
            .replace(r#""instanceNumber": 0"#, r#""instanceNumber": 2"#)
            .replace(UK_IP, "203.0.113.102"),
    );
    assert_eq!(nat_iif(&second.0), veth_index(&second.0));
    assert!(
        services(&n).contains(&("203.0.113.102".into(), 1)),
        "{:?}",
        services(&n)
    );

    // The unikernel's own namespace goes with it, whichever path undeploys it.
    undeploy(&n, 2, "/container/undeploy");
    assert!(!std::path::Path::new(&format!("/run/netns/{}", second.0)).exists());
    // A namespace made since under its name is not its own: it stays.
    sh("ip", &["netns", "delete", &made.0]);
    sh("ip", &["netns", "add", &made.0]);
    undeploy(&n, 0, "/unikernel/undeploy");
    assert!(std::path::Path::new(&format!("/run/netns/{}", made.0)).exists());
    assert!(services(&n).is_empty(), "{:?}", services(&n));
}
