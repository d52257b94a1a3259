//! The README's promise for a machine the daemon cannot work on: exit 2, one
//! line that says what to do, and nothing attached or mounted.

use std::os::unix::{fs::PermissionsExt, process::CommandExt};
use std::process::{Command, Output};

use tapmesh_tests::{daemon::tapmesh_bin, kernel_tests_enabled, link, Daemon, Netns};

/// A node namespace with one veth (the would-be uplink).
struct Lab {
    node: Netns,
    _peer: Netns,
    uplink: String,
}

impl Lab {
    fn new() -> Self {
        let node = Netns::new("n");
        let peer = Netns::new("p");
        let (n, _) = link(&node, "198.18.0.1/24", &peer, "198.18.0.2/24");
        Lab {
            node,
            _peer: peer,
            uplink: n.interface,
        }
    }

    /// The id of the XDP program on the uplink, if any.
    fn xdp_program(&self) -> Option<u32> {
        let out = self.node.ip(&["-d", "link", "show", &self.uplink]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let words: Vec<&str> = text.split_whitespace().collect();
        let at = words.iter().position(|w| *w == "prog/xdp")?;
        words.get(at + 2)?.parse().ok()
    }
}

/// Arguments that keep a refused daemon off every shared path.
fn own_paths() -> Vec<String> {
    let (root, socket) = Daemon::paths();
    vec![
        "--bpffs-root".into(),
        root.display().to_string(),
        "--admin-socket".into(),
        socket.display().to_string(),
        "--node-socket".into(),
        socket.with_extension("node.sock").display().to_string(),
        "--state-dir".into(),
        socket.with_extension("state").display().to_string(),
        "--metrics-listen".into(),
        String::new(),
    ]
}

fn code_and_stderr(out: &Output) -> (i32, String) {
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn without_privileges_it_says_which_capabilities_are_missing() {
    if !kernel_tests_enabled() {
        return;
    }
    let lab = Lab::new();
    // A copy of the binary that user nobody may run.
    let dir = std::env::temp_dir().join(tapmesh_tests::unique("tmnoroot"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = dir.join("tapmesh");
    std::fs::copy(tapmesh_bin(), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = Command::new(&bin)
        .arg("daemon")
        .args(["--netns", &lab.node.name, "--uplink", &lab.uplink])
        .args(own_paths())
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        code_and_stderr(&out),
        (
            2,
            "tapmesh: needs root or CAP_BPF + CAP_NET_ADMIN (missing CAP_BPF and \
             CAP_NET_ADMIN); run it with sudo, or give the container those capabilities \
             (the DaemonSet runs privileged)\n"
                .into()
        )
    );
    assert_eq!(lab.xdp_program(), None);
}

#[test]
fn an_uplink_with_another_xdp_program_is_refused_and_left_alone() {
    if !kernel_tests_enabled() {
        return;
    }
    let lab = Lab::new();
    let first = Daemon::start(&lab.node.name, &["--uplink", &lab.uplink]);
    let id = lab.xdp_program().expect("the first daemon's program");
    // Another daemon (other pins, sockets, no metrics port) on the same uplink.
    let out = Command::new(tapmesh_bin())
        .arg("daemon")
        .args(["--netns", &lab.node.name, "--uplink", &lab.uplink])
        .args(own_paths())
        .output()
        .unwrap();
    // Attached through a BPF link, which `ip` cannot detach: the message
    // names the link.
    let link = aya::programs::loaded_links()
        .flatten()
        .find(|l| l.program_id() == id)
        .map(|l| l.id())
        .expect("the first daemon's XDP link");
    assert_eq!(
        code_and_stderr(&out),
        (
            2,
            format!(
                "tapmesh: dataplane.uplinks: {u} already has an XDP program (tm_xdp_uplink, id \
                 {id}) this daemon did not leave there; it is tapmesh's, of a daemon on another \
                 bpffs root or a dataplane kept under another root or pin schema (the `tapmesh \
                 cleanup --bpffs-root ROOT` of the version that left it removes that whole); \
                 detach it (bpftool link detach id {link}; `ip link set dev {u} xdp off` \
                 cannot, it is held by a BPF link), or choose another uplink\n",
                u = lab.uplink
            )
        )
    );
    assert_eq!(
        lab.xdp_program(),
        Some(id),
        "the first program is untouched"
    );
    let running = tapmesh::admin::proto::PluginState::Running as i32;
    assert!(first.status().plugins.iter().all(|p| p.state == running));
}

#[test]
fn where_the_hosts_bpffs_is_not_mounted_it_refuses_unless_told() {
    if !kernel_tests_enabled() {
        return;
    }
    let lab = Lab::new();
    let args = own_paths();
    let root = args[1].clone();
    let socket = std::path::PathBuf::from(&args[3]);
    let daemon = |extra: &[&str]| {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &lab.node.name])
            .arg(tapmesh_bin())
            .arg("daemon")
            .args(["--uplink", &lab.uplink])
            .args(&args)
            .args(extra)
            .env_remove("TAPMESH_CONFIG");
        c
    };
    // `ip netns exec` mounts a fresh /sys: the host's bpffs is not under it.
    let out = daemon(&[]).output().unwrap();
    // The first reason that applies (the machine running the tests may be a container).
    let container = ["/run/.containerenv", "/.dockerenv"]
        .iter()
        .any(|p| std::path::Path::new(p).exists());
    let why = match std::fs::read_link("/proc/1/ns/mnt") {
        _ if container => "it runs in a container",
        Ok(_) => "its mount namespace is not PID 1's, as under `ip netns exec`",
        Err(_) => "PID 1's mount namespace cannot be read to compare",
    };
    assert_eq!(
        code_and_stderr(&out),
        (
            2,
            format!(
                "tapmesh: {root} is not on the host's bpffs: this process does not see the \
                 host's mounts ({why}); pins made here would vanish with it. Run it in the \
                 host's mount namespace (nsenter --net=/run/netns/NAME, or `tapmesh daemon \
                 --netns NAME`, not `ip netns exec`), or mount the host's /sys/fs/bpf into the \
                 container (hostPath, -v /sys/fs/bpf:/sys/fs/bpf); --private-bpffs mounts a \
                 private one anyway\n"
            )
        )
    );
    assert_eq!(lab.xdp_program(), None);

    // Told otherwise, it runs on a private bpffs, and the admin socket answers.
    let mut child = daemon(&["--private-bpffs"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let answered = tapmesh_tests::net::wait_until(std::time::Duration::from_secs(60), || {
        Command::new(tapmesh_bin())
            .args(["status", "--admin-socket"])
            .arg(&socket)
            .output()
            .is_ok_and(|o| o.status.success())
    });
    assert!(lab.xdp_program().is_some());
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    assert!(answered, "the daemon on a private bpffs did not answer");
    assert_eq!(lab.xdp_program(), None);
    assert!(
        !std::path::Path::new(&root).exists(),
        "nothing was pinned on the host's bpffs"
    );
}
