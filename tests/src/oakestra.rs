//! An Oakestra cluster around tapmesh NetManagers: a hub namespace with the
//! underlay bridge, Debian's `mosquitto` as the cluster's MQTT broker and a
//! cluster service manager peer in Python (`tests/peers/`, paho-mqtt); node
//! namespaces on the bridge run daemons in Oakestra mode. The Node Engine's
//! calls are replayed byte for byte as its Go HTTP client sends them.
//!
//! ```text
//!   node .1   node .2   node .3   (other nodes)
//!      └─────────┴── br0 ─┴───────────┘   hub 198.18.2.254: mosquitto :10003, peer
//! ```

use std::{
    io::{BufRead, Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::{net::wait_until, overlay::Node, sh, unique, Netns};

pub const HUB: &str = "198.18.2.254";
/// Oakestra's cluster MQTT port (free: the hub is a new namespace).
pub const MQTT_PORT: u16 = 10003;

/// The hub: bridge, broker and peer; removed on drop.
pub struct Cluster {
    pub hub: Netns,
    broker: Child,
    peer: Child,
    peer_log: PathBuf,
    dir: PathBuf,
}

impl Cluster {
    /// Starts the broker and the peer with `jobs` (the peer's job store,
    /// JSON) handing out /26 subnets from `subnet_base` on.
    pub fn start(jobs: &serde_json::Value, subnet_base: &str) -> Self {
        let hub = Netns::new("oh");
        hub.ip(&["link", "add", "br0", "type", "bridge"]);
        hub.ip(&["addr", "add", &format!("{HUB}/24"), "dev", "br0"]);
        hub.ip(&["link", "set", "br0", "up"]);
        let dir = std::env::temp_dir().join(unique("tmoak"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!("listener {MQTT_PORT} 0.0.0.0\nallow_anonymous true\npersistence false\n"),
        )
        .expect("mosquitto.conf");
        let broker = broker(&hub, &conf);
        let python = crate::python::venv("tapmesh-mqtt-venv", &["paho-mqtt==2.2.0"]);
        let script =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("peers/cluster_service_manager.py");
        let peer_log = dir.join("peer.log");
        let peer = Command::new("ip")
            .args(["netns", "exec", &hub.name])
            .arg(python)
            .arg(script)
            .arg(MQTT_PORT.to_string())
            .arg(jobs.to_string())
            .arg(subnet_base)
            .stdout(std::fs::File::create(&peer_log).expect("peer log"))
            .stderr(std::fs::File::create(dir.join("peer.err")).expect("peer err"))
            .spawn()
            .expect("the cluster service manager peer");
        let cluster = Cluster {
            hub,
            broker,
            peer,
            peer_log,
            dir,
        };
        let connected = wait_until(Duration::from_secs(20), || {
            cluster
                .messages()
                .iter()
                .any(|m| m.get("connected").is_some())
        });
        assert!(connected, "peer did not connect: {}", cluster.peer_errors());
        cluster
    }

    /// A veth from `netns` to the bridge with `address`/24; the node's
    /// interface name.
    pub fn attach(&self, netns: &Netns, address: &str) -> String {
        let (inner, outer) = (unique("vn"), unique("vh"));
        sh(
            "ip",
            &[
                "link",
                "add",
                &inner,
                "netns",
                &netns.name,
                "type",
                "veth",
                "peer",
                "name",
                &outer,
                "netns",
                &self.hub.name,
            ],
        );
        netns.ip(&["addr", "add", &format!("{address}/24"), "dev", &inner]);
        netns.ip(&["link", "set", &inner, "up"]);
        self.hub.ip(&["link", "set", &outer, "master", "br0"]);
        self.hub.ip(&["link", "set", &outer, "up"]);
        // Frames a node's XDP sends back out (XDP_TX) need NAPI on this end.
        self.hub.exec(&["ethtool", "-K", &outer, "gro", "on"]);
        inner
    }

    /// Every line the peer printed (messages received and published).
    pub fn messages(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(&self.peer_log).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Messages received on topics ending in `suffix`.
    pub fn received(&self, suffix: &str) -> Vec<serde_json::Value> {
        self.messages()
            .into_iter()
            .filter(|m| m["topic"].as_str().is_some_and(|t| t.ends_with(suffix)))
            .collect()
    }

    /// Publishes `payload` on `topic` `count` times from the hub (QoS 1,
    /// through paho, as a cluster component would), retained if asked.
    pub fn publish(&self, topic: &str, payload: &str, retain: bool, count: usize) {
        let python = crate::python::venv("tapmesh-mqtt-venv", &["paho-mqtt==2.2.0"]);
        let script = format!(
            "import paho.mqtt.publish as p\n\
             p.multiple([dict(topic={topic:?}, payload={payload:?}, qos=1, retain={})] * {count}, \
             hostname={HUB:?}, port={MQTT_PORT})\n",
            if retain { "True" } else { "False" }
        );
        let out = Command::new("ip")
            .args(["netns", "exec", &self.hub.name])
            .arg(python)
            .args(["-c", &script])
            .output()
            .expect("python");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Stops the broker (every client loses its connection).
    pub fn stop_broker(&mut self) {
        let _ = self.broker.kill();
        let _ = self.broker.wait();
    }

    /// Starts the broker again, as configured at first.
    pub fn start_broker(&mut self) {
        self.broker = broker(&self.hub, &self.dir.join("mosquitto.conf"));
    }

    pub fn peer_errors(&self) -> String {
        std::fs::read_to_string(self.dir.join("peer.err")).unwrap_or_default()
    }
}

/// mosquitto in the hub with `conf`, listening when this returns.
fn broker(hub: &Netns, conf: &Path) -> Child {
    let broker = Command::new("ip")
        .args(["netns", "exec", &hub.name, "mosquitto", "-c"])
        .arg(conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto (apt-get install mosquitto)");
    let hub_name = hub.name.clone();
    let up = wait_until(Duration::from_secs(30), || {
        let name = hub_name.clone();
        crate::net::run_in(&name, || {
            std::net::TcpStream::connect(("127.0.0.1", MQTT_PORT)).is_ok()
        })
    });
    assert!(up, "mosquitto did not listen on {MQTT_PORT}");
    broker
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.peer.kill();
        let _ = self.peer.wait();
        let _ = self.broker.kill();
        let _ = self.broker.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A node on the hub running a daemon in Oakestra mode (`extra` is added to
/// its `[netmanager]` section).
pub fn node(cluster: &Cluster, label: &str, address: &'static str, extra: &str) -> Node {
    node_wrapped(&[], cluster, label, address, extra)
}

/// Like [`node`], the daemon not told its address: it follows its uplink's.
pub fn node_following(cluster: &Cluster, label: &str, address: &'static str, extra: &str) -> Node {
    let netns = Netns::new(label);
    let uplink = cluster.attach(&netns, address);
    crate::overlay::start_node_with(
        &[],
        netns,
        uplink,
        address,
        &format!("oakestra = true\n{extra}"),
        false,
    )
}

/// Like [`node`], the daemon run by `wrapper` (see `Daemon::start_wrapped`).
pub fn node_wrapped(
    wrapper: &[&str],
    cluster: &Cluster,
    label: &str,
    address: &'static str,
    extra: &str,
) -> Node {
    let netns = Netns::new(label);
    let uplink = cluster.attach(&netns, address);
    crate::overlay::start_node_wrapped(
        wrapper,
        netns,
        uplink,
        address,
        &format!("oakestra = true\n{extra}"),
    )
}

/// One request as Go's net/http client writes it (the Node Engine's
/// `httpClient.Post(url, "application/json", body)` over the unix socket,
/// URL host `localhost:0`); returns status and body.
pub fn node_engine_post(socket: &Path, path: &str, json: &str) -> (u16, String) {
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost:0\r\nUser-Agent: Go-http-client/1.1\r\nContent-Length: {}\r\nContent-Type: application/json\r\nAccept-Encoding: gzip\r\n\r\n{json}",
        json.len()
    );
    let mut stream = UnixStream::connect(socket)
        .unwrap_or_else(|e| panic!("connecting to {}: {e}", socket.display()));
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    stream.write_all(request.as_bytes()).expect("sending");
    // Keep-alive, as Go: read the head, then Content-Length bytes.
    let mut reader = std::io::BufReader::new(stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line).expect("status line");
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {status_line:?}"));
    let mut length = 0;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).expect("header");
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).expect("body");
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// The Node Engine's JSON bodies (Go's encoding/json: struct field order, no spaces).
pub fn register_json(client_id: &str, cluster_address: &str) -> String {
    format!(r#"{{"client_id":"{client_id}","cluster_address":"{cluster_address}"}}"#)
}

pub fn deploy_json(pid: i64, job: &str, number: u32, ports: &str) -> String {
    format!(
        r#"{{"pid":{pid},"serviceName":"{job}","instanceNumber":{number},"portMappings":"{ports}"}}"#
    )
}

pub fn undeploy_json(job: &str, number: u32) -> String {
    deploy_json(-1, job, number, "")
}

/// A process in a container namespace (the Node Engine hands the
/// NetManager the task's pid); killed on drop.
pub struct Task(pub Child);

impl Task {
    pub fn start(container: &Netns) -> Self {
        use std::os::unix::fs::MetadataExt;
        let task = Task(
            Command::new("ip")
                .args(["netns", "exec", &container.name, "sleep", "600"])
                .spawn()
                .expect("sleep"),
        );
        let want = std::fs::metadata(format!("/run/netns/{}", container.name))
            .expect("named netns")
            .ino();
        let path = format!("/proc/{}/ns/net", task.0.id());
        let inside = wait_until(Duration::from_secs(30), || {
            std::fs::metadata(&path).ok().map(|m| m.ino()) == Some(want)
        });
        assert!(inside, "the task did not enter {}", container.name);
        task
    }

    /// The pid whose network namespace is the container's (`ip netns exec`
    /// execs `sleep` in place).
    pub fn pid(&self) -> i64 {
        i64::from(self.0.id())
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
