//! A two-node service-IP overlay lab: nodes are namespaces joined by one
//! veth link (the underlay), each runs a daemon with the NetManager API on
//! a unix socket, containers are namespaces deployed through that API.
//!
//! ```text
//! containers ── node1 (198.18.2.1) ═══ node2 (198.18.2.2) ── containers
//!   192.0.2.0/26                                          192.0.2.64/26
//! ```

use std::{
    io::{Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use crate::{daemon::Daemon, link, Netns};

pub const NODE1: &str = "198.18.2.1";
pub const NODE2: &str = "198.18.2.2";
pub const SERVICE_PREFIX: &str = "203.0.113.0/24";
/// IPv6 service IPs (instance IPs and RR) of the lab.
pub const SERVICE_PREFIX_V6: &str = "2001:db8:ff::/48";

/// One HTTP/1.1 request over a unix socket: (status, body).
pub fn http(socket: &Path, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut stream = UnixStream::connect(socket)
        .unwrap_or_else(|e| panic!("connecting to {}: {e}", socket.display()));
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).expect("sending");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("reading");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A node: its namespace, uplink, daemon and API socket.
pub struct Node {
    pub netns: Netns,
    pub uplink: String,
    pub address: &'static str,
    pub socket: PathBuf,
    pub daemon: Option<Daemon>,
    dir: PathBuf,
    /// The daemon's arguments (a restart uses them again).
    args: Vec<String>,
    /// Stopped daemons: dropping one removes the pins a restart reuses.
    retired: Vec<Daemon>,
}

/// One instance in a table update: its number, namespace IP, node's address,
/// and its service IPs as (IpType, Address) pairs.
pub type TableRow<'a> = (u32, &'a str, &'a str, &'a [(&'a str, &'a str)]);

impl Node {
    pub fn api(&self, path: &str, body: &str) -> (u16, String) {
        http(&self.socket, "POST", path, body)
    }

    /// `POST` that must succeed; returns the JSON body.
    pub fn post(&self, path: &str, body: &str) -> serde_json::Value {
        let (status, text) = self.api(path, body);
        assert_eq!(status, 200, "{path} {body} → {status} {text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}: {text}"))
    }

    pub fn status(&self) -> serde_json::Value {
        let (status, text) = http(&self.socket, "GET", "/status", "");
        assert_eq!(status, 200, "{text}");
        serde_json::from_str(&text).expect("status JSON")
    }

    /// Polls `/status` until `done` holds (up to 30 s, for a loaded
    /// machine), then returns that status; panics with the last one.
    pub fn status_when(&self, done: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let status = self.status();
            if done(&status) {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "status never came: {status}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    pub fn register(&self, subnet: &str) {
        self.post(
            "/register",
            &format!(
                r#"{{"client_id": "{}", "cluster_address": "198.18.2.254", "subnetwork": "{subnet}"}}"#,
                self.netns.name
            ),
        );
    }

    /// Deploys `container` as instance `number` of `job` with `service_ips`
    /// (type, address) pairs; returns its namespace address.
    pub fn deploy(
        &self,
        container: &Netns,
        job: &str,
        number: u32,
        service_ips: &[(&str, &str)],
    ) -> String {
        let reply = self.post(
            "/container/deploy",
            &deploy_body(container, job, number, service_ips),
        );
        reply["nsAddress"].as_str().expect("nsAddress").to_string()
    }

    pub fn undeploy(&self, job: &str, number: u32) {
        self.post(
            "/container/undeploy",
            &format!(r#"{{"serviceName": "{job}", "instanceNumber": {number}}}"#),
        );
    }

    /// Tells this node about instances of `job` on `node` (the cluster's table update).
    pub fn table(&self, job: &str, instances: &[TableRow]) {
        let list: Vec<String> = instances
            .iter()
            .map(|(number, ns, node, sips)| {
                format!(
                    r#"{{"instance_number": {number}, "namespace_ip": "{ns}", "host_ip": "{node}", "host_port": 50103, "service_ip": [{}]}}"#,
                    service_ips_json(sips)
                )
            })
            .collect();
        self.post(
            "/tablequery/result",
            &format!(
                r#"{{"app_name": "{job}", "instance_list": [{}]}}"#,
                list.join(",")
            ),
        );
    }

    /// The running daemon's pinned maps (its `v<schema>` directory).
    pub fn pins(&self) -> PathBuf {
        self.daemon
            .as_ref()
            .expect("a running daemon")
            .bpffs_root
            .join(format!("v{}", tapmesh_common::SCHEMA_VERSION))
    }

    /// Stops the daemon, runs `meanwhile` with no daemon running, then starts
    /// another on the same pins, configuration and state directory with
    /// `extra` arguments.
    pub fn restart(&mut self, extra: &[&str], meanwhile: impl FnOnce(&Node)) {
        let mut old = self.daemon.take().expect("a running daemon");
        assert!(old.stop().success(), "daemon stop: {}", old.log_text());
        let root = old.bpffs_root.clone();
        self.retired.push(old);
        meanwhile(self);
        let mut args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        args.extend_from_slice(extra);
        self.daemon = Some(Daemon::start_at(&self.netns.name, &root, &args));
    }

    /// Host-side interfaces the NetManager created.
    pub fn container_links(&self) -> Vec<String> {
        self.container_link_indexes()
            .into_iter()
            .map(|(_, name)| name)
            .collect()
    }

    /// Host-side interfaces the NetManager created, with their indexes.
    pub fn container_link_indexes(&self) -> Vec<(u32, String)> {
        let out = self.netns.ip(&["-o", "link", "show"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let mut parts = l.split(':');
                let index = parts.next()?.trim().parse().ok()?;
                let name = parts.next()?.trim().split('@').next()?.to_string();
                name.starts_with("tmo").then_some((index, name))
            })
            .collect()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        drop(self.daemon.take());
        self.retired.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn service_ips_json(sips: &[(&str, &str)]) -> String {
    sips.iter()
        .map(|(t, a)| format!(r#"{{"IpType": "{t}", "Address": "{a}"}}"#))
        .collect::<Vec<_>>()
        .join(",")
}

pub fn deploy_body(
    container: &Netns,
    job: &str,
    number: u32,
    service_ips: &[(&str, &str)],
) -> String {
    format!(
        r#"{{"netns": "/run/netns/{}", "serviceName": "{job}", "instanceNumber": {number}, "portMappings": "", "serviceIp": [{}]}}"#,
        container.name,
        service_ips_json(service_ips)
    )
}

/// Two nodes with daemons running (not yet registered).
pub struct TwoNodes {
    pub node1: Node,
    pub node2: Node,
    /// The bridge between the uplinks, when they do not meet directly.
    pub switch: Option<Netns>,
}

pub fn start_node(netns: Netns, uplink: String, address: &'static str, extra: &str) -> Node {
    start_node_wrapped(&[], netns, uplink, address, extra)
}

/// Like [`start_node`], the daemon run by `wrapper` (see [`Daemon::start_wrapped`]).
pub fn start_node_wrapped(
    wrapper: &[&str],
    netns: Netns,
    uplink: String,
    address: &'static str,
    extra: &str,
) -> Node {
    start_node_with(wrapper, netns, uplink, address, extra, true)
}

/// [`start_node_wrapped`]; `fixed`: the daemon is told its address
/// (`--node-address`), else it follows its uplink's.
pub fn start_node_with(
    wrapper: &[&str],
    netns: Netns,
    uplink: String,
    address: &'static str,
    extra: &str,
    fixed: bool,
) -> Node {
    let dir = std::env::temp_dir().join(crate::unique("tmov"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let socket = dir.join("netmanager.sock");
    let config = dir.join("tapmesh.toml");
    std::fs::write(
        &config,
        format!(
            "[netmanager]\nsocket = \"{}\"\nservice_prefix = \"{SERVICE_PREFIX}\"\n\
             service_prefix_v6 = \"{SERVICE_PREFIX_V6}\"\n{extra}",
            socket.display()
        ),
    )
    .expect("config");
    netns.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    // The lab's underlay is a veth with its default TX checksum offload:
    // the daemon turns it off (XDP on the other end cannot carry "checksum
    // pending" along), which every test through the tunnel relies on.
    let mut args: Vec<String> = [
        "--config",
        config.to_str().expect("utf-8 path"),
        "--uplink",
        &uplink,
        "--state-dir",
        dir.join("state").to_str().expect("utf-8 path"),
    ]
    .map(String::from)
    .to_vec();
    if fixed {
        args.extend(["--node-address".to_string(), address.to_string()]);
    }
    let daemon = Daemon::start_wrapped(
        wrapper,
        &netns.name,
        &Daemon::paths().0,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    Node {
        netns,
        uplink,
        address,
        socket,
        daemon: Some(daemon),
        dir,
        args,
        retired: Vec::new(),
    }
}

/// One node (198.18.2.1, its uplink's far end 198.18.2.2 in `peer`) with
/// its daemon running, not yet registered.
pub fn one_node() -> (Node, Netns) {
    one_node_with("")
}

/// [`one_node`] with `extra` lines in its `[netmanager]` section.
pub fn one_node_with(extra: &str) -> (Node, Netns) {
    let n1 = Netns::new("ovn1");
    let peer = Netns::new("ovp");
    let (up1, _) = link(&n1, &format!("{NODE1}/24"), &peer, &format!("{NODE2}/24"));
    (start_node(n1, up1.interface, NODE1, extra), peer)
}

impl TwoNodes {
    pub fn start() -> Self {
        Self::start_with(|_| String::new())
    }

    /// Like [`TwoNodes::start`]; `node1_config(netns name)` is appended to
    /// node 1's configuration file (e.g. an `[xds]` section whose server runs
    /// in that namespace).
    pub fn start_with(node1_config: impl FnOnce(&str) -> String) -> Self {
        let n1 = Netns::new("ovn1");
        let n2 = Netns::new("ovn2");
        let (up1, up2) = link(&n1, &format!("{NODE1}/24"), &n2, &format!("{NODE2}/24"));
        let extra = node1_config(&n1.name);
        TwoNodes {
            node1: start_node(n1, up1.interface, NODE1, &extra),
            node2: start_node(n2, up2.interface, NODE2, ""),
            switch: None,
        }
    }

    /// Two nodes whose uplinks meet on a Linux bridge in a third namespace,
    /// as hosts meet on a switch; `extra` is appended to both nodes'
    /// configuration.
    pub fn bridged(extra: &str) -> Self {
        let n1 = Netns::new("ovn1");
        let n2 = Netns::new("ovn2");
        let switch = Netns::new("ovsw");
        switch.ip(&["link", "add", "br0", "type", "bridge"]);
        switch.ip(&["link", "set", "br0", "up"]);
        let mut uplinks = Vec::new();
        for (node, address) in [(&n1, NODE1), (&n2, NODE2)] {
            let uplink = crate::unique("vu");
            let port = crate::unique("vp");
            crate::sh(
                "ip",
                &[
                    "link",
                    "add",
                    &uplink,
                    "netns",
                    &node.name,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    &port,
                    "netns",
                    &switch.name,
                ],
            );
            switch.ip(&["link", "set", &port, "master", "br0", "up"]);
            node.ip(&["addr", "add", &format!("{address}/24"), "dev", &uplink]);
            node.ip(&["link", "set", &uplink, "up"]);
            uplinks.push(uplink);
        }
        let up2 = uplinks.pop().expect("two uplinks");
        let up1 = uplinks.pop().expect("two uplinks");
        TwoNodes {
            node1: start_node(n1, up1, NODE1, extra),
            node2: start_node(n2, up2, NODE2, extra),
            switch: Some(switch),
        }
    }
}

/// Runs a shell command in a namespace and returns its stdout and stderr.
pub fn run(netns: &Netns, args: &[&str]) -> (bool, String) {
    let out = netns.try_exec(args);
    let mut text = String::from_utf8_lossy(&out.stdout).to_string();
    text += &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}
