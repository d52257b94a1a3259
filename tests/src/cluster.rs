//! Cluster mode on a real etcd, for the tests and the demo: daemons in
//! namespaces on one underlay bridge, etcd (one member, or three) on the
//! bridge's namespace, applications registered through their ambassadors
//! (the NSP API), client traffic entering node 1.
//!
//! ```text
//!  client ── n1 ─┐                   ┌─ n2 ══ conduit ══ app2
//!  192.0.2.2  .1 │  br0 198.51.100.0/24 (etcd .100 .101 .102)
//!                └──────────────────┴─ n3 ══ conduit ══ app3
//! ```

use std::{net::Ipv4Addr, path::PathBuf, time::Duration};

use tapmesh::proto::ambassador::stream_status::Status as StreamStatus;

use crate::{
    daemon::{tapmesh_bin, Daemon},
    etcd::{Certs, EtcdCluster},
    sh,
    tapa::{chmod, stream, Ambassador, TapCaller, OPEN_WITHIN},
    Netns, TempDir,
};

pub const LEASE_TTL: Duration = Duration::from_secs(2);
/// etcd member `m` (0-based) listens on 198.51.100.100 + m.
pub fn etcd_at(m: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 51, 100, 100 + m as u8)
}
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);

pub fn node_address(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 51, 100, i as u8)
}

/// Nodes 1..=n on the bridge, etcd, and (if `client`) a client behind node 1.
pub struct Lab {
    // Drop order: ambassadors, daemons, etcd, namespaces, files.
    pub ambassadors: Vec<Ambassador>,
    pub daemons: Vec<Option<Daemon>>,
    /// Daemons stopped for a restart on their pins, dropped after the others.
    retired: Vec<Daemon>,
    pub etcd: EtcdCluster,
    pub lease_ttl: Duration,
    /// TLS to etcd: its files, and the CA the daemons are told to trust.
    pub certs: Option<Certs>,
    pub ca: Option<PathBuf>,
    pub client: Option<(Netns, String)>,
    pub nodes: Vec<Netns>,
    pub apps: Vec<Netns>,
    _bridge: Netns,
    pub dir: TempDir,
    pub bin: PathBuf,
    /// Each node's uplinks.
    pub uplinks: Vec<Vec<String>>,
    /// The daemons' keep-alive expiry, and TOML appended to their files:
    /// node `i`'s `node_extra[i - 1]` (if any) still in `[cluster]`, then
    /// every node's `daemon_extra`.
    pub entry_timeout: Duration,
    /// Nodes not told their address (`--node-address`): they follow their uplink's.
    pub follows_uplink: Vec<usize>,
    pub node_extra: Vec<String>,
    pub daemon_extra: String,
    /// Node names other than `n<i>`, by node.
    pub names: std::collections::BTreeMap<usize, String>,
}

impl Lab {
    pub fn new(nodes: usize, with_client: bool, nsp_config: &str) -> Self {
        Self::with(nodes, with_client, nsp_config, 1, LEASE_TTL)
    }

    /// `members` etcd members; the daemons' leases last `lease_ttl`.
    pub fn with(
        nodes: usize,
        with_client: bool,
        nsp_config: &str,
        members: usize,
        lease_ttl: Duration,
    ) -> Self {
        Self::build(nodes, with_client, nsp_config, members, lease_ttl, false)
    }

    pub fn build(
        nodes: usize,
        with_client: bool,
        nsp_config: &str,
        members: usize,
        lease_ttl: Duration,
        tls: bool,
    ) -> Self {
        Self::build_with(
            nodes,
            with_client,
            nsp_config,
            members,
            lease_ttl,
            tls,
            |_| {},
        )
    }

    /// [`Lab::build`], with `configure` changing the lab before the daemons start.
    pub fn build_with(
        nodes: usize,
        with_client: bool,
        nsp_config: &str,
        members: usize,
        lease_ttl: Duration,
        tls: bool,
        configure: impl FnOnce(&mut Lab),
    ) -> Self {
        let bridge = Netns::new("br");
        bridge.ip(&["link", "add", "br0", "type", "bridge"]);
        for m in 0..members {
            bridge.ip(&["addr", "add", &format!("{}/24", etcd_at(m)), "dev", "br0"]);
        }
        bridge.ip(&["link", "set", "br0", "up"]);
        let mut netns = Vec::new();
        let mut uplinks = Vec::new();
        for i in 1..=nodes {
            let ns = Netns::new(&format!("n{i}"));
            let (a, b) = (crate::unique("cu"), crate::unique("cb"));
            sh(
                "ip",
                &[
                    "link",
                    "add",
                    &a,
                    "netns",
                    &ns.name,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    &b,
                    "netns",
                    &bridge.name,
                ],
            );
            ns.ip(&["addr", "add", &format!("{}/24", node_address(i)), "dev", &a]);
            ns.ip(&["link", "set", &a, "up"]);
            bridge.ip(&["link", "set", &b, "master", "br0"]);
            bridge.ip(&["link", "set", &b, "up"]);
            // The node's XDP sends into this veth: its peer needs NAPI.
            bridge.exec(&["ethtool", "-K", &b, "gro", "on"]);
            ns.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
            for key in ["all", "default"] {
                ns.exec(&["sysctl", "-qw", &format!("net.ipv4.conf.{key}.rp_filter=0")]);
            }
            uplinks.push(vec![a]);
            netns.push(ns);
        }
        // Static neighbours between the nodes: no ARP on the tunnel's path.
        let macs: Vec<[u8; 6]> = (0..nodes).map(|i| netns[i].mac(&uplinks[i][0])).collect();
        for i in 0..nodes {
            for j in (0..nodes).filter(|&j| j != i) {
                netns[i].ip(&[
                    "neigh",
                    "replace",
                    &node_address(j + 1).to_string(),
                    "lladdr",
                    &crate::fmt_mac(macs[j]),
                    "dev",
                    &uplinks[i][0],
                    "nud",
                    "permanent",
                ]);
            }
        }
        let client = with_client.then(|| {
            let client = Netns::new("c");
            let (c, n) = crate::link(&client, "192.0.2.2/24", &netns[0], "192.0.2.1/24");
            client.exec(&["ethtool", "-K", &c.interface, "tx", "off"]);
            client.ip(&["route", "add", "203.0.113.0/24", "via", "192.0.2.1"]);
            uplinks[0].insert(0, n.interface);
            for n in &netns[1..] {
                n.ip(&["route", "add", "192.0.2.0/24", "via", "198.51.100.1"]);
            }
            (client, c.interface)
        });
        let hosts: Vec<Ipv4Addr> = (0..members).map(etcd_at).collect();
        let dir = TempDir::new("tmcl");
        let certs = tls.then(|| Certs::new(&dir.0.join("certs"), "etcd", &hosts));
        let etcd = match &certs {
            Some(certs) => EtcdCluster::new_tls_at(&bridge.name, &hosts, certs),
            None => EtcdCluster::new_at(&bridge.name, &hosts),
        };
        let bin = dir.0.join("tapmesh");
        std::fs::copy(tapmesh_bin(), &bin).expect("copying the tapmesh binary");
        chmod(&dir.0, 0o755);
        chmod(&bin, 0o755);
        std::fs::write(dir.0.join("nsp.toml"), nsp_config).expect("writing nsp.toml");
        let mut lab = Lab {
            ambassadors: Vec::new(),
            daemons: Vec::new(),
            retired: Vec::new(),
            etcd,
            lease_ttl,
            ca: certs.as_ref().map(|c| c.ca.clone()),
            certs,
            client,
            nodes: netns,
            apps: Vec::new(),
            _bridge: bridge,
            dir,
            bin,
            uplinks,
            entry_timeout: Duration::from_secs(30),
            follows_uplink: Vec::new(),
            node_extra: Vec::new(),
            names: Default::default(),
            daemon_extra: String::new(),
        };
        configure(&mut lab);
        for i in 1..=nodes {
            let d = lab.start_daemon(i);
            lab.daemons.push(Some(d));
        }
        lab
    }

    pub fn node_dir(&self, i: usize) -> PathBuf {
        self.dir.0.join(format!("n{i}"))
    }

    pub fn node_socket(&self, i: usize) -> PathBuf {
        self.node_dir(i).join("node.sock")
    }

    pub fn start_daemon(&self, i: usize) -> Daemon {
        let args = self.daemon_args(i);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Daemon::start(&self.nodes[i - 1].name, &args)
    }

    /// Stops node `i`'s daemon (it must keep its dataplane: `keep_dataplane`
    /// in `daemon_extra`), runs `meanwhile`, and starts another on its pins.
    pub fn restart_kept(&mut self, i: usize, meanwhile: impl FnOnce(&mut Lab)) {
        let mut old = self.daemons[i - 1].take().expect("daemon running");
        assert!(old.stop().success(), "daemon stop: {}", old.log_text());
        let root = old.bpffs_root.clone();
        meanwhile(self);
        let args = self.daemon_args(i);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.daemons[i - 1] = Some(Daemon::start_at(&self.nodes[i - 1].name, &root, &args));
        self.retired.push(old);
    }

    fn daemon_args(&self, i: usize) -> Vec<String> {
        let d = self.node_dir(i);
        std::fs::create_dir_all(&d).unwrap();
        chmod(&d, 0o755);
        let config = d.join("daemon.toml");
        let tls = match (&self.certs, &self.ca) {
            (Some(c), Some(ca)) => format!(
                "ca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
                ca.display(),
                c.client_cert.display(),
                c.client_key.display()
            ),
            _ => String::new(),
        };
        std::fs::write(
            &config,
            format!(
                "[nsp]\nconfig_file = \"{nsp}\"\nentry_timeout = \"{expiry}s\"\n\
                 conduit_prefix_v4 = \"198.19.{i}.0/24\"\nconduit_prefix_v6 = \"\"\n\
                 [cluster]\netcd_endpoints = {etcd:?}\nnode_name = \"{name}\"\n\
                 lease_ttl = \"{ttl}s\"\n",
                nsp = self.dir.0.join("nsp.toml").display(),
                etcd = self.etcd.endpoints(),
                ttl = self.lease_ttl.as_secs(),
                expiry = self.entry_timeout.as_secs(),
                name = self.names.get(&i).cloned().unwrap_or(format!("n{i}")),
            ) + &tls
                + self.node_extra.get(i - 1).map_or("", String::as_str)
                + &self.daemon_extra,
        )
        .unwrap();
        let mut args: Vec<String> = vec![
            "--config".into(),
            config.display().to_string(),
            "--node-socket".into(),
            self.node_socket(i).display().to_string(),
            "--state-dir".into(),
            d.join("state").display().to_string(),
        ];
        if !self.follows_uplink.contains(&i) {
            args.extend(["--node-address".into(), node_address(i).to_string()]);
        }
        for u in &self.uplinks[i - 1] {
            args.push("--uplink".into());
            args.push(u.clone());
        }
        args
    }

    pub fn daemon(&self, i: usize) -> &Daemon {
        self.daemons[i - 1].as_ref().expect("daemon running")
    }

    pub fn cluster_detail(&self, i: usize) -> String {
        self.daemon(i)
            .status()
            .plugins
            .iter()
            .find(|p| p.name == "cluster")
            .map(|p| p.detail.clone())
            .unwrap_or_default()
    }

    /// A new application namespace with an ambassador talking to node `i`.
    pub fn app_on(&mut self, i: usize) -> TapCaller {
        let app = Netns::new(&format!("a{i}"));
        let home = self.dir.0.join(format!("app{}", self.apps.len()));
        let amb = Ambassador::spawn(&app.name, &self.bin, &self.node_socket(i), &home, "2s", &[]);
        let tap = TapCaller::new(&amb.socket);
        self.ambassadors.push(amb);
        self.apps.push(app);
        tap
    }

    /// `tapmesh registry list` against node `i`: (stream, identifier, status, node) rows.
    pub fn registry(&self, i: usize) -> Vec<(String, String, String, String)> {
        let out = std::process::Command::new(tapmesh_bin())
            .args(["registry", "list", "--node-socket"])
            .arg(self.node_socket(i))
            .output()
            .expect("tapmesh registry list");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .skip(1)
            .map(|l| {
                let c: Vec<&str> = l.split_whitespace().collect();
                (c[0].into(), c[1].into(), c[2].into(), c[4].into())
            })
            .collect()
    }
}

/// An application on node `i` with `stream-a` OPEN (the Meridio config of
/// [`crate::tapa::NSP_CONFIG`]).
pub fn open_a(lab: &mut Lab, i: usize) -> TapCaller {
    let mut tap = lab.app_on(i);
    tap.open(stream("stream-a", "conduit-a", "trench-a"))
        .unwrap();
    assert!(
        tap.wait_status("stream-a", StreamStatus::Open, OPEN_WITHIN),
        "not OPEN on node {i}: {}",
        lab.ambassadors.last().unwrap().log_text()
    );
    tap
}

/// Target `id` at `ip` of `stream` (in conduit-a of trench-a) as the
/// registry's wire type, as Meridio's NSP clients send it.
pub fn registry_target(
    stream: &str,
    ip: &str,
    id: u32,
    status: tapmesh::proto::nsp::target::Status,
) -> tapmesh::proto::nsp::Target {
    use tapmesh::proto::nsp::{target, Conduit, Stream, Target, Trench};
    Target {
        ips: vec![ip.to_string()],
        context: [("identifier".to_string(), id.to_string())].into(),
        status: status as i32,
        r#type: target::Type::Default as i32,
        stream: Some(Stream {
            name: stream.into(),
            conduit: Some(Conduit {
                name: "conduit-a".into(),
                trench: Some(Trench {
                    name: "trench-a".into(),
                }),
                destination_port_nats: vec![],
            }),
            max_targets: 0,
        }),
    }
}
