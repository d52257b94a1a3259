//! `cargo xtask image --check`: the runtime image as a node runs it.
//!
//! A client, a node and a target namespace (the LB lab). The daemon runs in
//! the image, privileged, in the node's namespace, with the host's bpffs, its
//! admin socket in a host directory and its configuration from a host
//! directory (as the DaemonSet's hostPaths and ConfigMap give it). From the
//! host, the `tapmesh` CLI of a host build reads its status. Then, with
//! `keep_dataplane = true`, the container is stopped and a second one of the
//! same image adopts the programs while a bounded UDP stream through a VIP
//! runs: the XDP link stays the same and no datagram is lost. A last
//! container with `keep_dataplane` off removes everything.
//!
//! Usage: tapmesh-image-check IMAGE (CONTAINERS_CONF and TAPMESH_BIN from xtask).

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use tapmesh::lb::model::LbSpec;
use tapmesh_common::program_names::XDP_UPLINK;
use tapmesh_tests::{
    daemon::tapmesh_bin,
    net::{flow, lb_toml, spawn_in, stream, vip, wait_until, LbLab, UdpReceiver, CLIENT},
    unique,
};

/// The uplink program's name in the status counters.
const COUNTERS: &str = "xdp_uplink";
const VIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const PORT: u16 = 7000;
/// The stream's pace and its bound (the handover must happen well within it).
const STREAM_GAP: Duration = Duration::from_millis(1);
const STREAM_MAX: u64 = 60_000;

fn podman(args: &[&str]) -> Output {
    Command::new("podman")
        .args(["--runtime", "runc"])
        .args(args)
        .output()
        .expect("running podman (CONTAINERS_CONF comes from cargo xtask image)")
}

fn podman_ok(args: &[&str]) -> String {
    let out = podman(args);
    assert!(
        out.status.success(),
        "podman {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The host side of a node: the directories the DaemonSet mounts, and the
/// pins' root on the host's bpffs. Removed on drop.
struct Node {
    dir: PathBuf,
    bpffs_root: PathBuf,
}

impl Node {
    fn new(daemon_toml: impl FnOnce(&Path) -> String, lb_toml: &str) -> Self {
        let id = unique("img");
        let dir = PathBuf::from(format!("/run/tapmesh-test-{id}"));
        let bpffs_root = PathBuf::from(format!("/sys/fs/bpf/tapmesh-test-{id}"));
        for sub in ["run", "etc", "state"] {
            std::fs::create_dir_all(dir.join(sub)).expect("node directories");
        }
        let node = Node { dir, bpffs_root };
        std::fs::write(
            node.dir.join("etc/tapmesh.toml"),
            daemon_toml(&node.bpffs_root),
        )
        .expect("daemon config");
        std::fs::write(node.dir.join("etc/lb.toml"), lb_toml).expect("LB config");
        node
    }

    fn admin_socket(&self) -> PathBuf {
        self.dir.join("run/admin.sock")
    }

    fn pins(&self) -> PathBuf {
        self.bpffs_root
            .join(format!("v{}", tapmesh_common::SCHEMA_VERSION))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.bpffs_root);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A daemon container; removed (killed if need be) on drop.
struct Container {
    name: String,
}

impl Container {
    /// `podman run` of the image's daemon in namespace `netns`, mounted as
    /// the DaemonSet mounts it.
    fn start(image: &str, netns: &str, node: &Node, env: &[&str]) -> Self {
        let name = unique("tapmesh-check-");
        let volume = |host: PathBuf, inside: &str| format!("{}:{inside}", host.display());
        let mut args = vec![
            "run".to_string(),
            "-d".into(),
            "--name".into(),
            name.clone(),
            "--privileged".into(),
            "--pid".into(),
            "host".into(),
            "--network".into(),
            format!("ns:/run/netns/{netns}"),
            "-v".into(),
            "/sys/fs/bpf:/sys/fs/bpf".into(),
            "-v".into(),
            "/run/netns:/run/netns:rslave".into(),
            "-v".into(),
            volume(node.dir.join("run"), "/run/tapmesh"),
            "-v".into(),
            volume(node.dir.join("etc"), "/etc/tapmesh:ro"),
            "-v".into(),
            volume(node.dir.join("state"), "/var/lib/tapmesh"),
        ];
        for e in env {
            args.push("-e".into());
            args.push(e.to_string());
        }
        args.extend([
            image.to_string(),
            "daemon".into(),
            "--config".into(),
            "/etc/tapmesh/tapmesh.toml".into(),
        ]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        podman_ok(&args);
        Container { name }
    }

    fn logs(&self) -> String {
        let out = podman(&["logs", &self.name]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// SIGTERM (podman stop), then the daemon's exit code.
    fn stop(&self) -> i32 {
        podman_ok(&["stop", "-t", "20", &self.name]);
        podman_ok(&["inspect", "--format", "{{.State.ExitCode}}", &self.name])
            .trim()
            .parse()
            .expect("exit code")
    }

    /// A command in the running container (bpftool, as an operator would).
    fn exec(&self, args: &[&str]) -> String {
        let mut all = vec!["exec", self.name.as_str()];
        all.extend_from_slice(args);
        podman_ok(&all)
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman(&["rm", "-f", "-t", "0", &self.name]);
    }
}

/// What the check reads from `tapmesh status`. Today from its text; when
/// `status -o json` exists, `read_status` deserializes that instead and the
/// rest of the check stays as it is.
#[derive(Debug, Default)]
struct NodeStatus {
    /// (interface, hook, program, mode)
    attachments: Vec<(String, String, String, String)>,
    pins: String,
    /// LB counters by name (VIPs, flows, targets): packets.
    lb_packets: Vec<(String, u64)>,
    /// (program, verdict, packets) from the pinned counter maps.
    verdicts: Vec<(String, String, u64)>,
}

impl NodeStatus {
    fn lb(&self, name: &str) -> u64 {
        self.lb_packets
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0, |(_, p)| *p)
    }

    /// Packets a program saw, all verdicts.
    fn program(&self, name: &str) -> u64 {
        self.verdicts
            .iter()
            .filter(|(p, _, _)| p == name)
            .map(|(_, _, n)| n)
            .sum()
    }
}

/// Runs the host's `tapmesh status` against the socket; None while it fails.
fn read_status(socket: &Path) -> Option<NodeStatus> {
    let out = Command::new(tapmesh_bin())
        .arg("status")
        .arg("--admin-socket")
        .arg(socket)
        .output()
        .expect("running the host's tapmesh");
    out.status
        .success()
        .then(|| parse_status(&String::from_utf8_lossy(&out.stdout)))
}

fn parse_status(text: &str) -> NodeStatus {
    let mut status = NodeStatus::default();
    let mut section = "";
    let mut program = String::new();
    for line in text.lines() {
        if let Some(pins) = line.strip_prefix("pins: ") {
            status.pins = pins.trim().to_string();
            continue;
        }
        if !line.starts_with(' ') {
            section = line.trim_end_matches(':');
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        match section {
            "attachments" if words.len() >= 3 => {
                let rest = words[3..].join(" ");
                status.attachments.push((
                    words[0].into(),
                    words[1].into(),
                    words[2].into(),
                    rest.trim_matches(|c| c == '(' || c == ')').into(),
                ));
            }
            "counters (all CPUs)" if words.len() == 1 && !line.starts_with("    ") => {
                program = words[0].to_string();
            }
            "counters (all CPUs)" if words.get(2) == Some(&"packets") => {
                status.verdicts.push((
                    program.clone(),
                    words[0].into(),
                    words[1].parse().expect("a packet count"),
                ));
            }
            "vips" | "flows" | "targets" if words.get(2) == Some(&"packets") => {
                status
                    .lb_packets
                    .push((words[0].into(), words[1].parse().expect("a packet count")));
            }
            _ => {}
        }
    }
    status
}

/// Waits (at most 30 s) until the daemon answers on the host's socket.
fn wait_status(container: &Container, socket: &Path) -> (NodeStatus, Duration) {
    let began = Instant::now();
    while began.elapsed() < Duration::from_secs(30) {
        if let Some(s) = read_status(socket) {
            return (s, began.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "`tapmesh status` on the host got no answer in 30 s; container log:\n{}",
        container.logs()
    );
}

/// The id of the XDP program on `interface` in `netns` (0: none), from the kernel.
fn xdp_program(netns: &str, interface: &str) -> u64 {
    let out = Command::new("ip")
        .args(["-n", netns, "-j", "-d", "link", "show", "dev", interface])
        .output()
        .expect("ip link");
    let links: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j link output");
    links[0]["xdp"]["prog"]["id"].as_u64().unwrap_or(0)
}

/// The bpf_link that holds program `prog`, from the image's bpftool.
fn link_of(container: &Container, prog: u64) -> u64 {
    let links: serde_json::Value =
        serde_json::from_str(&container.exec(&["bpftool", "-j", "link", "show"]))
            .expect("bpftool -j link show");
    links
        .as_array()
        .expect("a list of links")
        .iter()
        .find(|l| l["prog_id"].as_u64() == Some(prog))
        .and_then(|l| l["id"].as_u64())
        .unwrap_or_else(|| panic!("no bpf_link holds program {prog}: {links}"))
}

/// Sends one datagram every STREAM_GAP from the client to the VIP until told to stop.
struct UdpStream {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl UdpStream {
    fn start(netns: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = spawn_in(netns, move || {
            let socket = std::net::UdpSocket::bind(SocketAddrV4::new(CLIENT, 40_000))
                .expect("binding the stream's socket");
            let mut sent = 0u64;
            while !flag.load(Ordering::SeqCst) && sent < STREAM_MAX {
                socket
                    .send_to(&sent.to_be_bytes(), SocketAddrV4::new(VIP, PORT))
                    .expect("sending");
                sent += 1;
                std::thread::sleep(STREAM_GAP);
            }
            sent
        });
        UdpStream { stop, thread }
    }

    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().expect("the stream's thread")
    }
}

fn main() {
    let image = std::env::args()
        .nth(1)
        .expect("usage: tapmesh-image-check IMAGE");
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "the image check needs root");
    let began = Instant::now();

    let lab = LbLab::new(1, &[VIP]);
    let spec = LbSpec {
        vips: vec![vip("vip", &VIP.to_string())],
        streams: vec![stream("s", 4)],
        flows: vec![flow("udp", &["vip"], "s", &["udp"])],
        targets: vec![lab.targets[0].local("s", 1)],
    };
    let uplink = lab.uplink.clone();
    let node = Node::new(
        |bpffs_root| {
            format!(
                "[daemon]\nadmin_socket = \"/run/tapmesh/admin.sock\"\nstate_dir = \"/var/lib/tapmesh\"\n\n\
                 [dataplane]\nbpffs_root = \"{}\"\nuplinks = [\"{uplink}\"]\nxdp_mode = \"native\"\nkeep_dataplane = true\n\n\
                 [lb]\nconfig_file = \"/etc/tapmesh/lb.toml\"\n\n\
                 [nsp]\nsocket = \"/run/tapmesh/node.sock\"\n",
                bpffs_root.display()
            )
        },
        &lb_toml(&spec),
    );
    let socket = node.admin_socket();
    let receiver = UdpReceiver::start(&lab.targets[0].netns.name, SocketAddrV4::new(VIP, PORT));

    // 1. The daemon in the image; the host's CLI reads it over the shared directory.
    let first = Container::start(&image, &lab.node.name, &node, &[]);
    let (status, ready_after) = wait_status(&first, &socket);
    println!("check: first container answered `tapmesh status` after {ready_after:.1?}");
    let xdp = (
        uplink.clone(),
        "xdp".to_string(),
        XDP_UPLINK.to_string(),
        "native".to_string(),
    );
    // The uplink's TC hook copies what its XDP program sends into a tapped
    // port (`tm_tc_tap_out`).
    let tap_out = (
        uplink.clone(),
        "tc-ingress".to_string(),
        "tm_tc_tap_out".to_string(),
        String::new(),
    );
    assert_eq!(status.attachments, vec![xdp, tap_out.clone()], "{status:?}");
    assert_eq!(status.pins, node.pins().display().to_string());
    assert!(
        node.pins().is_dir(),
        "the pins are on the host's bpffs ({})",
        node.pins().display()
    );
    let first_prog = xdp_program(&lab.node.name, &uplink);
    assert_ne!(first_prog, 0, "no XDP program on {uplink}");
    let link = link_of(&first, first_prog);
    let name = first.exec(&[
        "bpftool",
        "-j",
        "prog",
        "show",
        "id",
        &first_prog.to_string(),
    ]);
    assert!(
        name.contains(&format!("\"{XDP_UPLINK}\"")),
        "bpftool prog show: {name}"
    );

    // Counters from the host, packet for packet.
    let warmup = UdpStream::start(&lab.client.name);
    assert!(wait_until(Duration::from_secs(5), || receiver.count() >= 100));
    let warm = warmup.stop();
    assert!(wait_until(Duration::from_secs(5), || receiver.count() >= warm));
    let mut counted = NodeStatus::default();
    wait_until(Duration::from_secs(5), || {
        counted = read_status(&socket).expect("status");
        counted.lb("s/1") >= warm
    });
    assert_eq!(
        receiver.count(),
        warm,
        "every warm-up datagram arrived once"
    );
    for name in ["vip", "udp", "s/1"] {
        assert_eq!(counted.lb(name), warm, "{name}: {counted:?}");
    }
    // Nothing else crosses the uplink (no IPv6, static neighbours).
    assert_eq!(counted.program(COUNTERS), warm, "{counted:?}");
    println!("check: {warm} datagrams through the VIP, counted by the daemon in the image");

    // 2. Handover: the first container stops (keep_dataplane), a second adopts.
    let stream = UdpStream::start(&lab.client.name);
    std::thread::sleep(Duration::from_millis(300));
    let handover = Instant::now();
    let code = first.stop();
    assert_eq!(code, 0, "first daemon's exit code; log:\n{}", first.logs());
    assert_eq!(
        xdp_program(&lab.node.name, &uplink),
        first_prog,
        "keep_dataplane leaves the program attached"
    );
    std::thread::sleep(Duration::from_millis(300));
    let second = Container::start(&image, &lab.node.name, &node, &[]);
    let (status, _) = wait_status(&second, &socket);
    let handover = handover.elapsed();
    assert_eq!(status.attachments.len(), 2, "{status:?}");
    assert_eq!(
        status.attachments[0].3, "native, kept link replaced",
        "{status:?}"
    );
    assert_eq!(status.attachments[1].2, tap_out.2, "{status:?}");
    let second_prog = xdp_program(&lab.node.name, &uplink);
    assert_ne!(second_prog, 0);
    assert_eq!(
        link_of(&second, second_prog),
        link,
        "the second daemon replaces the program inside the same bpf_link"
    );
    std::thread::sleep(Duration::from_millis(300));
    let sent = stream.stop();
    assert!(sent < STREAM_MAX, "the handover outlasted the stream");
    let total = warm + sent;
    wait_until(Duration::from_secs(5), || receiver.count() >= total);
    let got = receiver.count() - warm;
    println!(
        "check: handover (stop, start, ready) took {handover:.1?}; stream: {sent} sent, {got} received, {} lost",
        sent.saturating_sub(got)
    );
    assert_eq!(
        got, sent,
        "datagrams lost while the second container took over"
    );
    let status = read_status(&socket).expect("status");
    assert_eq!(
        status.program(COUNTERS),
        total,
        "the program counters continue in the adopted maps: {status:?}"
    );
    // The LB's own counters start again when the new daemon applies its file.
    println!(
        "check: after the handover the LB counters read {} of {total} (restarted), the program counters {total}",
        status.lb("s/1")
    );
    println!(
        "check: XDP link {link} kept (program {first_prog} -> {second_prog}); counters continue ({total})"
    );

    // 3. Removal: a daemon told not to keep the dataplane leaves nothing.
    assert_eq!(second.stop(), 0, "second daemon; log:\n{}", second.logs());
    let last = Container::start(
        &image,
        &lab.node.name,
        &node,
        &["TAPMESH_KEEP_DATAPLANE=false"],
    );
    wait_status(&last, &socket);
    assert_eq!(last.stop(), 0, "last daemon; log:\n{}", last.logs());
    assert_eq!(xdp_program(&lab.node.name, &uplink), 0, "XDP detached");
    assert!(!node.pins().exists(), "pins removed from the host's bpffs");
    assert!(!socket.exists(), "admin socket removed");
    drop(receiver);
    println!(
        "image check: 1 passed, 0 failed ({:.0} s)",
        began.elapsed().as_secs_f64()
    );
}
