//! etcd servers for tests: one member on loopback (no root needed), or a
//! cluster of members on addresses of one test namespace ([`EtcdCluster`]),
//! with `etcdctl` helpers to read and write keys the way another client would.
//!
//! Needs `/usr/bin/etcd` and `/usr/bin/etcdctl` (Debian `etcd-server` and
//! `etcd-client`; `cargo xtask setup` installs them).

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

pub const ETCD: &str = "/usr/bin/etcd";
pub const ETCDCTL: &str = "/usr/bin/etcdctl";

/// How long a start may take before the test fails.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running etcd; killed, and its directory removed, on drop.
pub struct Etcd {
    /// The client URL, e.g. `http://127.0.0.1:40123`. It stays the same across
    /// [`Etcd::stop`] / [`Etcd::start`].
    pub endpoint: String,
    /// The client URL the running server answers on: `endpoint`, except
    /// after [`Etcd::start_partitioned`].
    active: String,
    name: String,
    peer_url: String,
    dir: PathBuf,
    child: Option<Child>,
    /// How many times it was started (one log file per start).
    starts: u32,
    /// The network namespace it (and etcdctl) run in; `None`: the test's own.
    netns: Option<String>,
    /// `--initial-cluster`: itself, or every member of its cluster.
    initial_cluster: String,
    token: String,
    /// The log of the current start.
    log: PathBuf,
    /// TLS on the client URLs (clients must show a certificate of the same CA).
    tls: Option<Certs>,
}

/// Files for TLS to etcd, made with the openssl CLI: a CA, a server
/// certificate for some addresses and a client certificate, both signed by it.
#[derive(Clone, Debug)]
pub struct Certs {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running openssl: {e}"));
    assert!(
        out.status.success(),
        "openssl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Certs {
    /// A new CA in `dir` (named `label`), and certificates it signs: the
    /// server's for `hosts`, a client's.
    pub fn new(dir: &Path, label: &str, hosts: &[std::net::Ipv4Addr]) -> Self {
        std::fs::create_dir_all(dir).expect("creating the certificate directory");
        let file = |name: &str| dir.join(format!("{label}-{name}"));
        let path = |p: &PathBuf| p.display().to_string();
        let (ca, ca_key) = (file("ca.pem"), file("ca.key"));
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        let mut args = vec!["req", "-x509"];
        args.extend(ec);
        let (ca_s, ca_key_s) = (path(&ca), path(&ca_key));
        let subject = format!("/CN=tapmesh test CA {label}");
        args.extend([
            "-keyout", &ca_key_s, "-out", &ca_s, "-days", "2", "-subj", &subject,
        ]);
        openssl(&args);
        let sign = |name: &str, ext: String| -> (PathBuf, PathBuf) {
            let (cert, key, csr, extfile) = (
                file(&format!("{name}.pem")),
                file(&format!("{name}.key")),
                file(&format!("{name}.csr")),
                file(&format!("{name}.ext")),
            );
            std::fs::write(&extfile, ext).expect("writing the extensions");
            let (key_s, csr_s, cert_s, ext_s) =
                (path(&key), path(&csr), path(&cert), path(&extfile));
            let cn = format!("/CN={name}");
            let mut args = vec!["req"];
            args.extend(ec);
            args.extend(["-keyout", &key_s, "-out", &csr_s, "-subj", &cn]);
            openssl(&args);
            openssl(&[
                "x509",
                "-req",
                "-in",
                &csr_s,
                "-CA",
                &ca_s,
                "-CAkey",
                &ca_key_s,
                "-CAcreateserial",
                "-out",
                &cert_s,
                "-days",
                "2",
                "-extfile",
                &ext_s,
            ]);
            (cert, key)
        };
        let sans: Vec<String> = hosts
            .iter()
            .map(|h| format!("IP:{h}"))
            .chain(["IP:127.0.0.1".to_string()])
            .collect();
        let (server_cert, server_key) = sign(
            "server",
            format!(
                "subjectAltName={}\nextendedKeyUsage=serverAuth,clientAuth\n",
                sans.join(",")
            ),
        );
        let (client_cert, client_key) = sign("client", "extendedKeyUsage=clientAuth\n".to_string());
        Certs {
            ca,
            server_cert,
            server_key,
            client_cert,
            client_key,
        }
    }
}

/// A free loopback TCP port (bound to port 0, then released).
fn free_ports<const N: usize>() -> [u16; N] {
    // Hold every listener until all ports are known, so they differ.
    let listeners: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("binding a loopback port"))
        .collect();
    let mut ports = [0; N];
    for (port, listener) in ports.iter_mut().zip(&listeners) {
        *port = listener.local_addr().expect("local address").port();
    }
    ports
}

fn require_binaries() {
    for binary in [ETCD, ETCDCTL] {
        if !Path::new(binary).exists() {
            panic!(
                "{binary} is missing: these tests need an etcd server and etcdctl \
                 (Debian packages etcd-server and etcd-client; `cargo xtask setup` installs them)"
            );
        }
    }
}

impl Etcd {
    /// Starts etcd on free loopback ports with its data in a new temporary directory.
    pub fn new() -> Self {
        Self::start_in(None, "127.0.0.1")
    }

    /// Starts etcd inside network namespace `netns` (on its loopback), for a
    /// daemon that runs there.
    pub fn new_in(netns: &str) -> Self {
        Self::start_in(Some(netns.to_string()), "127.0.0.1")
    }

    /// Starts etcd inside network namespace `netns` on address `host` (one
    /// of the namespace's), for daemons in other namespaces that route there.
    pub fn new_at(netns: &str, host: std::net::Ipv4Addr) -> Self {
        Self::start_in(Some(netns.to_string()), &host.to_string())
    }

    fn start_in(netns: Option<String>, host: &str) -> Self {
        require_binaries();
        let name = crate::unique("etcd");
        let dir = std::env::temp_dir().join(format!("tapmesh-{name}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating the etcd directory");
        let [client, peer] = free_ports::<2>();
        let endpoint = format!("http://{host}:{client}");
        let peer_url = format!("http://{host}:{peer}");
        let mut etcd = Etcd {
            active: endpoint.clone(),
            endpoint,
            initial_cluster: format!("{name}={peer_url}"),
            token: name.clone(),
            name,
            peer_url,
            dir,
            child: None,
            starts: 0,
            netns,
            log: PathBuf::new(),
            tls: None,
        };
        etcd.start();
        etcd
    }

    /// `program`, inside the namespace if there is one (`ip netns exec` execs it, same pid).
    fn command(&self, program: &str) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, program]);
                c
            }
            None => Command::new(program),
        }
    }

    /// The data and log directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// (Re)starts it on the same data directory and ports; waits until it answers.
    pub fn start(&mut self) {
        let endpoint = self.endpoint.clone();
        self.launch(&endpoint);
    }

    /// Starts it on the same data directory but on another client port, as if
    /// the network between `endpoint`'s clients and etcd were cut: the test
    /// can change keys (with the helpers below) that those clients cannot see.
    /// [`Etcd::stop`] then [`Etcd::start`] to heal.
    pub fn start_partitioned(&mut self) {
        let [port] = free_ports::<1>();
        self.launch(&format!("http://127.0.0.1:{port}"));
    }

    /// Stops it, removes its data and starts it empty (a wiped or replaced
    /// store: its revisions start again from 1).
    pub fn wipe(&mut self) {
        self.stop();
        std::fs::remove_dir_all(self.dir.join("data")).expect("removing etcd's data");
        self.start();
    }

    /// Kills it (an outage); the data stays.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn launch(&mut self, client_url: &str) {
        self.spawn(client_url);
        self.wait_ready();
    }

    /// Starts the process without waiting (a cluster member answers only
    /// once a quorum runs).
    fn spawn(&mut self, client_url: &str) {
        assert!(self.child.is_none(), "etcd is already running");
        self.starts += 1;
        let log_path = self.dir.join(format!("etcd-{}.log", self.starts));
        let log = std::fs::File::create(&log_path).expect("etcd log file");
        let state = if self.dir.join("data").exists() {
            "existing"
        } else {
            "new"
        };
        let child = self
            .command(ETCD)
            .arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .args(["--listen-client-urls", client_url])
            .args(["--advertise-client-urls", client_url])
            .args(["--listen-peer-urls", &self.peer_url])
            .args(["--initial-advertise-peer-urls", &self.peer_url])
            .args(self.tls.iter().flat_map(|t| {
                [
                    "--cert-file".into(),
                    t.server_cert.clone().into_os_string(),
                    "--key-file".into(),
                    t.server_key.clone().into_os_string(),
                    "--trusted-ca-file".into(),
                    t.ca.clone().into_os_string(),
                    "--client-cert-auth".into(),
                ]
            }))
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-token", &self.token])
            .args(["--initial-cluster-state", state])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("etcd log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {ETCD}: {e}"));
        self.child = Some(child);
        self.active = client_url.to_string();
        self.log = log_path;
    }

    /// Waits until it answers `endpoint health`, or fails the test with its log.
    fn wait_ready(&mut self) {
        let (log_path, client_url) = (self.log.clone(), self.active.clone());
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                panic!(
                    "etcd exited with {status} while starting; its log ({}):\n{}",
                    log_path.display(),
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            let health = self.etcdctl(&["endpoint", "health"]);
            if health.status.success() {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "etcd on {client_url} did not answer within {START_TIMEOUT:?}; its log ({}):\n{}",
                    log_path.display(),
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `etcdctl --endpoints <the running server> <args>`.
    pub fn etcdctl(&self, args: &[&str]) -> Output {
        self.command(ETCDCTL)
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.active))
            .args(["--dial-timeout=1s", "--command-timeout=3s"])
            .args(self.tls.iter().flat_map(|t| {
                [
                    format!("--cacert={}", t.ca.display()),
                    format!("--cert={}", t.client_cert.display()),
                    format!("--key={}", t.client_key.display()),
                ]
            }))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running {ETCDCTL}: {e}"))
    }

    fn etcdctl_ok(&self, args: &[&str]) -> Output {
        let out = self.etcdctl(args);
        if !out.status.success() {
            panic!(
                "etcdctl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        out
    }

    pub fn put(&self, key: &str, value: &str) {
        self.etcdctl_ok(&["put", "--", key, value]);
    }

    /// The value of `key`, `None` if it does not exist.
    pub fn get(&self, key: &str) -> Option<String> {
        let out = self.etcdctl_ok(&["get", "--", key]);
        let text = String::from_utf8_lossy(&out.stdout);
        // "<key>\n<value>\n"; nothing when the key does not exist.
        let (_, value) = text.split_once('\n')?;
        Some(value.strip_suffix('\n').unwrap_or(value).to_string())
    }

    /// Every key under `prefix`, sorted by key.
    pub fn get_prefix(&self, prefix: &str) -> Vec<String> {
        let out = self.etcdctl_ok(&["get", "--prefix", "--keys-only", "--", prefix]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|line| !line.is_empty())
            .map(String::from)
            .collect()
    }

    /// The store's revision now.
    pub fn revision(&self) -> i64 {
        let out = self.etcdctl_ok(&["get", "-w", "json", "--", "/"]);
        let reply: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("etcdctl get -w json");
        reply["header"]["revision"]
            .as_i64()
            .expect("a revision in the header")
    }

    /// Compacts the history up to `revision` (a watch from before it is cancelled).
    pub fn compact(&self, revision: i64) {
        self.etcdctl_ok(&["compact", &revision.to_string()]);
    }

    /// Deletes `key`; true if it existed.
    pub fn delete(&self, key: &str) -> bool {
        let out = self.etcdctl_ok(&["del", "--", key]);
        String::from_utf8_lossy(&out.stdout).trim() == "1"
    }
}

/// A cluster of etcd members, each on its own address of one namespace (on
/// the usual ports: the namespace is the test's own, so nothing else uses
/// them). Every member is killed, and its directory removed, on drop.
pub struct EtcdCluster {
    pub members: Vec<Etcd>,
}

impl EtcdCluster {
    /// Starts one member on each of `hosts` (addresses of `netns`) and waits
    /// until every member answers.
    pub fn new_at(netns: &str, hosts: &[std::net::Ipv4Addr]) -> Self {
        Self::start(netns, hosts, None)
    }

    /// [`EtcdCluster::new_at`] with TLS (https:// client URLs, client
    /// certificates of the same CA required).
    pub fn new_tls_at(netns: &str, hosts: &[std::net::Ipv4Addr], certs: &Certs) -> Self {
        Self::start(netns, hosts, Some(certs.clone()))
    }

    fn start(netns: &str, hosts: &[std::net::Ipv4Addr], tls: Option<Certs>) -> Self {
        require_binaries();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let token = crate::unique("etcdc");
        let mut members: Vec<Etcd> = hosts
            .iter()
            .map(|host| {
                let name = crate::unique("etcd");
                let dir = std::env::temp_dir().join(format!("tapmesh-{name}"));
                let _ = std::fs::remove_dir_all(&dir);
                std::fs::create_dir_all(&dir).expect("creating the etcd directory");
                let endpoint = format!("{scheme}://{host}:2379");
                Etcd {
                    active: endpoint.clone(),
                    endpoint,
                    name,
                    peer_url: format!("http://{host}:2380"),
                    dir,
                    child: None,
                    starts: 0,
                    netns: Some(netns.to_string()),
                    initial_cluster: String::new(),
                    token: token.clone(),
                    log: PathBuf::new(),
                    tls: tls.clone(),
                }
            })
            .collect();
        let initial = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url))
            .collect::<Vec<_>>()
            .join(",");
        for m in &mut members {
            m.initial_cluster = initial.clone();
        }
        let mut cluster = EtcdCluster { members };
        cluster.start_all();
        cluster
    }

    /// Every member's client URL.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.endpoint.clone()).collect()
    }

    /// Starts every stopped member (all before waiting: a member answers only
    /// with a quorum) and waits until each answers.
    pub fn start_all(&mut self) {
        let stopped: Vec<usize> = (0..self.members.len())
            .filter(|&i| !self.members[i].is_running())
            .collect();
        for &i in &stopped {
            let url = self.members[i].endpoint.clone();
            self.members[i].spawn(&url);
        }
        for &i in &stopped {
            self.members[i].wait_ready();
        }
    }

    /// Kills every member (an outage of the whole cluster); the data stays.
    pub fn stop_all(&mut self) {
        for m in &mut self.members {
            m.stop();
        }
    }

    /// The member that is the Raft leader now.
    pub fn leader(&self) -> usize {
        let out = self.running().etcdctl_ok(&[
            "endpoint",
            "status",
            "-w",
            "json",
            &format!("--endpoints={}", self.endpoints().join(",")),
        ]);
        let list: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("etcdctl endpoint status -w json");
        let leader = |e: &serde_json::Value| {
            e["Status"]["leader"].as_u64() == e["Status"]["header"]["member_id"].as_u64()
        };
        let endpoint = list
            .as_array()
            .and_then(|a| a.iter().find(|e| leader(e)))
            .and_then(|e| e["Endpoint"].as_str())
            .expect("a leader")
            .to_string();
        self.members
            .iter()
            .position(|m| m.endpoint == endpoint)
            .expect("the leader is a member")
    }

    /// A running member, for etcdctl.
    fn running(&self) -> &Etcd {
        self.members
            .iter()
            .find(|m| m.is_running())
            .expect("no etcd member is running")
    }

    pub fn put(&self, key: &str, value: &str) {
        self.running().put(key, value)
    }

    pub fn get(&self, key: &str) -> Option<String> {
        self.running().get(key)
    }

    pub fn get_prefix(&self, prefix: &str) -> Vec<String> {
        self.running().get_prefix(prefix)
    }

    pub fn etcdctl(&self, args: &[&str]) -> Output {
        self.running().etcdctl(args)
    }
}

impl Default for Etcd {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
        if std::env::var_os("TAPMESH_KEEP_ETCD").is_some() {
            eprintln!("keeping the etcd directory {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
