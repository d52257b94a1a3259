//! A daemon's unix sockets (node socket, NetManager API, admin API) never
//! delete what they find at their path: a file that is not a socket, or a
//! socket another process serves, is refused at start (exit 2, one line,
//! nothing attached); only a stale socket is replaced; and a stop removes
//! only the socket file the daemon made.

use std::{
    os::unix::net::UnixListener,
    path::{Path, PathBuf},
    process::Command,
};

use tapmesh_tests::{daemon::tapmesh_bin, kernel_tests_enabled, link, Daemon, Netns, TempDir};

struct Node {
    netns: Netns,
    _peer: Netns,
    uplink: String,
    dir: TempDir,
}

impl Node {
    fn new() -> Self {
        let netns = Netns::new("sk");
        let peer = Netns::new("skp");
        let (n, _) = link(&netns, "198.18.0.1/24", &peer, "198.18.0.2/24");
        Node {
            netns,
            _peer: peer,
            uplink: n.interface,
            dir: TempDir::new("tmsock"),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.0.join(name)
    }

    fn xdp_attached(&self) -> bool {
        let out = self.netns.ip(&["link", "show", &self.uplink]);
        String::from_utf8_lossy(&out.stdout).contains("prog/xdp")
    }

    /// The daemon's arguments: its own pins, admin and node sockets and a
    /// NetManager API on `netmanager.sock`, unless `args` name them.
    fn args(&self, extra: &[&str]) -> Vec<String> {
        let config = self.path("tapmesh.toml");
        std::fs::write(
            &config,
            format!(
                "[netmanager]\nsocket = \"{}\"\n[metrics]\nlisten = \"\"\n",
                self.path("netmanager.sock").display()
            ),
        )
        .expect("config");
        let mut args: Vec<String> = [
            "--config",
            config.to_str().unwrap(),
            "--uplink",
            &self.uplink,
            "--state-dir",
            self.path("state").to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec();
        if !extra.contains(&"--node-socket") {
            args.push("--node-socket".into());
            args.push(self.path("node.sock").display().to_string());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    /// Runs a daemon that must refuse to start: (exit code, stderr).
    fn refused(&self, extra: &[&str]) -> (i32, String) {
        let (root, _) = Daemon::paths();
        let admin = if extra.contains(&"--admin-socket") {
            vec![]
        } else {
            vec![
                "--admin-socket".to_string(),
                self.path("admin.sock").display().to_string(),
            ]
        };
        let out = Command::new(tapmesh_bin())
            .args(["daemon", "--netns", &self.netns.name, "--bpffs-root"])
            .arg(&root)
            .args(admin)
            .args(self.args(extra))
            .env_remove("TAPMESH_CONFIG")
            .output()
            .expect("running tapmesh");
        let _ = std::fs::remove_dir_all(&root);
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

const CONTENT: &str = "someone's file\n";

fn a_file(path: &Path) {
    std::fs::write(path, CONTENT).expect("file");
}

fn intact(path: &Path) {
    assert_eq!(
        std::fs::read_to_string(path).expect("the file is still there"),
        CONTENT
    );
}

#[test]
fn a_file_that_is_not_a_socket_is_refused_and_kept() {
    if !kernel_tests_enabled() {
        return;
    }
    let node = Node::new();
    for (setting, name, plugin) in [
        ("nsp.socket", "node.sock", "nsp"),
        ("netmanager.socket", "netmanager.sock", "netmanager"),
        ("daemon.admin_socket", "admin.sock", "admin"),
    ] {
        let path = node.path(name);
        a_file(&path);
        let (code, stderr) = node.refused(&[]);
        assert_eq!(code, 2, "{stderr}");
        assert_eq!(
            stderr,
            format!(
                "tapmesh: plugin {plugin}: configure failed: {setting}: {} exists and is not a socket\n",
                path.display()
            )
        );
        intact(&path);
        assert!(!node.xdp_attached(), "{setting}: XDP attached");
        std::fs::remove_file(&path).expect("cleanup");
    }
}

#[test]
fn a_socket_in_use_is_refused_and_a_stale_one_replaced() {
    if !kernel_tests_enabled() {
        return;
    }
    let node = Node::new();
    let path = node.path("netmanager.sock");
    let serving = UnixListener::bind(&path).expect("bind");
    let (code, stderr) = node.refused(&[]);
    assert_eq!(code, 2, "{stderr}");
    assert_eq!(
        stderr,
        format!(
            "tapmesh: plugin netmanager: configure failed: netmanager.socket: {} is in use by another process (another tapmesh daemon?)\n",
            path.display()
        )
    );
    assert!(path.exists());
    assert!(!node.xdp_attached());
    // Nobody serves it any more: a stale socket, which the daemon replaces
    // (and the node socket's too).
    drop(serving);
    drop(UnixListener::bind(node.path("node.sock")).expect("bind"));
    let args = node.args(&[]);
    let daemon = Daemon::start(
        &node.netns.name,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    for name in ["netmanager.sock", "node.sock"] {
        assert!(
            std::os::unix::net::UnixStream::connect(node.path(name)).is_ok(),
            "{name} not served"
        );
    }
    drop(daemon);
}

#[test]
fn a_stop_removes_only_the_socket_files_the_daemon_made() {
    if !kernel_tests_enabled() {
        return;
    }
    let node = Node::new();
    let args = node.args(&[]);
    let mut daemon = Daemon::start(
        &node.netns.name,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    // While it runs, someone puts their own files where its sockets were.
    let replaced = ["netmanager.sock", "node.sock"].map(|n| node.path(n));
    for path in &replaced {
        let tmp = path.with_extension("new");
        a_file(&tmp);
        std::fs::rename(&tmp, path).expect("rename");
    }
    let admin = daemon.socket.clone();
    assert!(daemon.stop().success(), "{}", daemon.log_text());
    for path in &replaced {
        intact(path);
    }
    // Its own admin socket, unchanged, is removed.
    assert!(!admin.exists());
}
