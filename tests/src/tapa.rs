//! A lab for the ambassador (TAPA) and the node's target registry:
//!
//! ```text
//!  client ──(uplink veth, XDP on the node side)── node (daemon) ──(conduit veths the daemon makes)── app i
//!  198.18.0.2                              198.18.0.1   198.19.0.<4k+1>/30            198.19.0.<4k+2>/30 + VIPs
//! ```
//!
//! Each application namespace runs `tapmesh ambassador` as uid 65534 with its
//! socket in its own directory; the daemon serves the node socket and reads
//! the Meridio-style configuration from a file the test can rewrite.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use tapmesh::proto::ambassador::{
    stream_status::Status as StreamStatus, tap_client::TapClient, StreamResponse,
};

use crate::{link, net::NODE, Daemon, Netns, TempDir};

/// The lab's Meridio configuration: one trench, one conduit, two streams with
/// a VIP each (UDP and TCP, any port); stream-b takes one target only.
pub const NSP_CONFIG: &str = r#"
[[trenches]]
name = "trench-a"

[[conduits]]
name = "conduit-a"

[[streams]]
name = "stream-a"
conduit = "conduit-a"
max_targets = 4

[[streams]]
name = "stream-b"
conduit = "conduit-a"
max_targets = 1

[[vips]]
name = "vip-a"
address = "203.0.113.10/32"

[[vips]]
name = "vip-b"
address = "203.0.113.11/32"

[[flows]]
name = "flow-a"
stream = "stream-a"
vips = ["vip-a"]
protocols = ["udp", "tcp"]

[[flows]]
name = "flow-b"
stream = "stream-b"
vips = ["vip-b"]
protocols = ["udp", "tcp"]
"#;

pub const VIP_A: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
pub const VIP_B: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 11);
pub const UNPRIVILEGED: u32 = 65534;
/// How long an opened stream may take to become OPEN (a budget for a
/// loaded machine; the benches measure the latency).
pub const OPEN_WITHIN: Duration = Duration::from_secs(30);

/// `tapmesh ambassador` running in an application namespace.
pub struct Ambassador {
    child: Option<Child>,
    pub socket: PathBuf,
    log: PathBuf,
}

impl Ambassador {
    /// Runs `bin ambassador` in namespace `netns` as uid 65534 (`bin` must be
    /// executable by it), with its socket and log in `home`, talking to the
    /// node socket `node_socket`; returns once it listens.
    pub fn spawn(
        netns: &str,
        bin: &Path,
        node_socket: &Path,
        home: &Path,
        refresh: &str,
        env: &[(&str, &str)],
    ) -> Self {
        std::fs::create_dir_all(home).expect("ambassador directory");
        chown(home, UNPRIVILEGED);
        let socket = home.join("ambassador.sock");
        let log = home.join("ambassador.log");
        let uid = UNPRIVILEGED.to_string();
        let child = Command::new("ip")
            .args(["netns", "exec", netns, "setpriv"])
            .args(["--reuid", &uid, "--regid", &uid, "--clear-groups"])
            .arg(bin)
            .arg("ambassador")
            .env("MERIDIO_SOCKET", &socket)
            .env("TAPMESH_NODE_SOCKET", node_socket)
            .env("MERIDIO_NSP_ENTRY_TIMEOUT", refresh)
            .env("MERIDIO_TIMEOUT", "5s")
            .env("MERIDIO_LOG_LEVEL", "debug")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("ambassador log"))
            .spawn()
            .expect("starting the ambassador");
        let amb = Ambassador {
            child: Some(child),
            socket: socket.clone(),
            log,
        };
        let up = crate::net::wait_until(Duration::from_secs(30), || {
            std::os::unix::net::UnixStream::connect(&socket).is_ok()
        });
        assert!(up, "ambassador did not listen: {}", amb.log_text());
        amb
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.pid(), signal) };
    }

    /// SIGKILL: gone without closing anything.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait (the ambassador closes its streams).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if c.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Ambassador {
    fn drop(&mut self) {
        self.stop();
    }
}

pub struct TapaLab {
    // Drop order: ambassadors, daemon, namespaces, files.
    pub ambassadors: Vec<Ambassador>,
    daemon: Option<Daemon>,
    /// Stopped daemons of a kept dataplane: dropping one removes the pins.
    retired: Vec<Daemon>,
    pub client: Netns,
    /// The client's veth.
    pub client_if: String,
    pub node: Netns,
    pub apps: Vec<Netns>,
    pub uplink: String,
    pub dir: TempDir,
    bin: PathBuf,
    daemon_config: PathBuf,
}

impl TapaLab {
    /// Client, node and `apps` empty application namespaces; the daemon started
    /// with registry expiry `expiry`.
    pub fn new(apps: usize, expiry: &str) -> Self {
        Self::new_with(apps, expiry, "")
    }

    /// Like [`TapaLab::new`], with `extra` appended to the daemon's
    /// configuration (inside its `[nsp]` section: e.g. `[nsp.limits]` lines).
    pub fn new_with(apps: usize, expiry: &str, extra: &str) -> Self {
        let client = Netns::new("c");
        let node = Netns::new("n");
        let (c, n) = link(&client, "198.18.0.2/24", &node, "198.18.0.1/24");
        client.exec(&["ethtool", "-K", &c.interface, "tx", "off"]);
        client.ip(&["route", "add", "203.0.113.0/24", "via", &NODE.to_string()]);
        node.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        for ns in [&client, &node] {
            ns.exec(&["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0"]);
            ns.exec(&["sysctl", "-qw", "net.ipv4.conf.default.rp_filter=0"]);
        }
        let apps: Vec<Netns> = (0..apps).map(|i| Netns::new(&format!("a{i}"))).collect();
        let dir = TempDir::new("tmtapa");
        // The ambassadors run as an unprivileged user: give them a binary they may run.
        let bin = dir.0.join("tapmesh");
        std::fs::copy(crate::daemon::tapmesh_bin(), &bin).expect("copying the tapmesh binary");
        chmod(&dir.0, 0o755);
        chmod(&bin, 0o755);
        std::fs::write(dir.0.join("nsp.toml"), NSP_CONFIG).expect("writing nsp.toml");
        let daemon_config = dir.0.join("daemon.toml");
        std::fs::write(
            &daemon_config,
            format!(
                "[daemon]\nstate_dir = \"{d}/state\"\n\
                 [nsp]\nsocket = \"{d}/node.sock\"\nconfig_file = \"{d}/nsp.toml\"\n\
                 entry_timeout = \"{expiry}\"\n\
                 conduit_prefix_v4 = \"198.19.0.0/24\"\nconduit_prefix_v6 = \"\"\n{extra}",
                d = dir.0.display()
            ),
        )
        .expect("writing daemon.toml");
        let mut lab = TapaLab {
            ambassadors: Vec::new(),
            daemon: None,
            retired: Vec::new(),
            client,
            node,
            apps,
            uplink: n.interface,
            client_if: c.interface,
            dir,
            bin,
            daemon_config,
        };
        lab.start_daemon();
        lab
    }

    pub fn start_daemon(&mut self) {
        self.start_daemon_at(None, &[]);
    }

    /// Stops the daemon, keeping its dataplane, and starts another on the
    /// same pins (both with `--keep-dataplane`): a rolling update.
    pub fn restart_daemon_kept(&mut self) {
        let mut old = self.daemon.take().expect("a running daemon");
        assert!(old.stop().success(), "daemon stop: {}", old.log_text());
        let root = old.bpffs_root.clone();
        self.retired.push(old);
        self.start_daemon_at(Some(&root), &["--keep-dataplane"]);
    }

    /// Starts the daemon, on the pins under `root` if given, with `extra` arguments.
    pub fn start_daemon_at(&mut self, root: Option<&Path>, extra: &[&str]) {
        assert!(self.daemon.is_none());
        let config = self.daemon_config.display().to_string();
        let socket = self.node_socket().display().to_string();
        let state = self.dir.0.join("state").display().to_string();
        let args = [
            "--node-socket",
            &socket,
            "--state-dir",
            &state,
            "--config",
            &config,
            "--uplink",
            &self.uplink,
            "--xdp-mode",
            "native",
        ];
        let args: Vec<&str> = args.iter().chain(extra).copied().collect();
        self.daemon = Some(match root {
            Some(root) => Daemon::start_at(&self.node.name, root, &args),
            None => Daemon::start(&self.node.name, &args),
        });
    }

    pub fn stop_daemon(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            assert!(d.stop().success(), "daemon stop: {}", d.log_text());
        }
    }

    pub fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().expect("daemon running")
    }

    pub fn node_socket(&self) -> PathBuf {
        self.dir.0.join("node.sock")
    }

    /// Replaces the Meridio configuration file (the daemon reloads it).
    pub fn write_config(&self, text: &str) {
        let tmp = self.dir.0.join("nsp.toml.new");
        std::fs::write(&tmp, text).expect("writing nsp.toml");
        std::fs::rename(tmp, self.dir.0.join("nsp.toml")).expect("replacing nsp.toml");
    }

    /// Starts an ambassador in application `app` as uid 65534, refreshing every `refresh`.
    pub fn start_ambassador(&mut self, app: usize, refresh: &str) -> usize {
        self.start_ambassador_with(app, refresh, &[])
    }

    /// The copy of the tapmesh binary that any user may run.
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// Like [`TapaLab::start_ambassador`], with more environment variables.
    pub fn start_ambassador_with(
        &mut self,
        app: usize,
        refresh: &str,
        env: &[(&str, &str)],
    ) -> usize {
        let home = self
            .dir
            .0
            .join(format!("app{app}-{}", self.ambassadors.len()));
        let amb = Ambassador::spawn(
            &self.apps[app].name,
            &self.bin,
            &self.node_socket(),
            &home,
            refresh,
            env,
        );
        self.ambassadors.push(amb);
        self.ambassadors.len() - 1
    }

    /// Starts an ambassador in every application (refreshing every
    /// `refresh`); returns a caller of each, in application order.
    pub fn start_ambassadors(&mut self, refresh: &str) -> Vec<TapCaller> {
        (0..self.apps.len())
            .map(|app| {
                let a = self.start_ambassador(app, refresh);
                TapCaller::new(&self.ambassadors[a].socket)
            })
            .collect()
    }

    /// Starts an ambassador in application `app` and opens "stream-a" of
    /// conduit-a in trench-a through it; returns the ambassador and its
    /// caller once the stream is OPEN.
    pub fn open_stream_a(&mut self, app: usize, refresh: &str) -> (usize, TapCaller) {
        let a = self.start_ambassador(app, refresh);
        let mut tap = TapCaller::new(&self.ambassadors[a].socket);
        tap.open(stream("stream-a", "conduit-a", "trench-a"))
            .unwrap();
        assert!(
            tap.wait_status("stream-a", StreamStatus::Open, OPEN_WITHIN),
            "not OPEN: {}",
            self.ambassadors[a].log_text()
        );
        (a, tap)
    }

    /// Registered targets as `tapmesh registry list` prints them.
    pub fn registry_list(&self) -> String {
        let out = Command::new(crate::daemon::tapmesh_bin())
            .args(["registry", "list", "--node-socket"])
            .arg(self.node_socket())
            .output()
            .expect("tapmesh registry list");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// (identifier, status) of each target of `stream` in the registry.
    pub fn registered(&self, stream: &str) -> Vec<(String, String)> {
        let full = format!("{stream}.conduit-a.trench-a");
        self.registry_list()
            .lines()
            .skip(1)
            .filter_map(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                (cols.first() == Some(&full.as_str()))
                    .then(|| (cols[1].to_string(), cols[2].to_string()))
            })
            .collect()
    }
}

pub fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn chown(path: &Path, uid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(uid)).expect("chown");
}

/// A Tap client of one ambassador, on its own runtime.
pub struct TapCaller {
    runtime: tokio::runtime::Runtime,
    client: TapClient<tonic::transport::Channel>,
}

pub fn stream(name: &str, conduit: &str, trench: &str) -> tapmesh::proto::ambassador::Stream {
    tapmesh::cli::nsp::stream_request(trench, conduit, name)
}

impl TapCaller {
    pub fn new(socket: &Path) -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let client = {
            let _guard = runtime.enter();
            TapClient::new(tapmesh::uds::lazy_channel(socket))
        };
        Self { runtime, client }
    }

    pub fn open(&mut self, s: tapmesh::proto::ambassador::Stream) -> Result<(), tonic::Status> {
        let mut c = self.client.clone();
        self.runtime
            .block_on(async move { c.open(s).await.map(|_| ()) })
    }

    pub fn close(&mut self, s: tapmesh::proto::ambassador::Stream) -> Result<(), tonic::Status> {
        let mut c = self.client.clone();
        self.runtime
            .block_on(async move { c.close(s).await.map(|_| ()) })
    }

    /// Watches every stream until `done` holds for an update (or `timeout`);
    /// returns every update seen.
    pub fn watch_until(
        &mut self,
        timeout: Duration,
        done: impl Fn(&StreamResponse) -> bool,
    ) -> Vec<StreamResponse> {
        let mut c = self.client.clone();
        self.runtime.block_on(async move {
            let mut seen = Vec::new();
            let all = tapmesh::proto::ambassador::Stream::default();
            let Ok(r) = c.watch(all).await else {
                return seen;
            };
            let mut updates = r.into_inner();
            let _ = tokio::time::timeout(timeout, async {
                while let Ok(Some(m)) = updates.message().await {
                    let stop = done(&m);
                    seen.push(m);
                    if stop {
                        break;
                    }
                }
            })
            .await;
            seen
        })
    }

    /// Opens `s` with a Watch already listening; returns the time from the
    /// Open call to the Watch update that says OPEN.
    pub fn time_open(&mut self, s: tapmesh::proto::ambassador::Stream) -> Duration {
        let mut c = self.client.clone();
        self.runtime.block_on(async move {
            let mut updates = c.watch(s.clone()).await.expect("watch").into_inner();
            updates.message().await.expect("snapshot");
            let start = Instant::now();
            c.open(s.clone()).await.expect("open");
            while let Ok(Some(m)) = updates.message().await {
                if status_of(&m, &s.name) == Some(StreamStatus::Open) {
                    return start.elapsed();
                }
            }
            panic!("watch ended before {} was OPEN", s.name);
        })
    }

    /// Waits until stream `name` has `status`; true if it did within `timeout`.
    pub fn wait_status(&mut self, name: &str, status: StreamStatus, timeout: Duration) -> bool {
        let seen = self.watch_until(timeout, |m| status_of(m, name) == Some(status));
        seen.last().and_then(|m| status_of(m, name)) == Some(status)
    }
}

/// The status of stream `name` in a Watch update.
pub fn status_of(m: &StreamResponse, name: &str) -> Option<StreamStatus> {
    m.stream_status
        .iter()
        .find(|s| s.stream.as_ref().is_some_and(|st| st.name == name))
        .and_then(|s| StreamStatus::try_from(s.status).ok())
}
