//! Test harness: network namespaces joined by veth pairs, torn down on drop
//! (also when a test panics), a daemon runner, raw frames and packet builders.
//!
//! Traffic stays inside the namespaces a test creates, on documentation
//! address ranges (198.18.0.0/15, 2001:db8::/32).

pub mod bench;
pub mod bpf;
pub mod cluster;
pub mod daemon;
pub mod dpdk;
pub mod eds;
pub mod etcd;
pub mod fake_hops;
pub mod frames;
pub mod fuzz;
pub mod maps;
pub mod net;
pub mod oakestra;
pub mod overlay;
pub mod python;
pub mod scrape;
pub mod tapa;
pub mod underlay;
pub mod uplink_ref;
pub mod xds_peer;

use std::{
    path::PathBuf,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

pub use daemon::Daemon;
use tapmesh::{
    dataplane::lb::{LbWriter, Resolver, TunnelSettings},
    lb::model::{validate, LbSpec},
};

/// True when the kernel tests can run (root). Without root they are skipped,
/// unless `TAPMESH_REQUIRE_KERNEL_TESTS` is set (CI), where that is a failure.
pub fn kernel_tests_enabled() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        return true;
    }
    if std::env::var_os("TAPMESH_REQUIRE_KERNEL_TESTS").is_some() {
        panic!(
            "kernel tests must run here (TAPMESH_REQUIRE_KERNEL_TESTS is set) but we are not root"
        );
    }
    eprintln!("skipping a kernel test: not root");
    false
}

/// A name unique to this process and call, short enough for an interface (≤ 15).
pub fn unique(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{:05x}{n:x}", std::process::id() & 0xfffff)
}

/// A directory removed with everything in it on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A new directory under the system's temporary one, named `label` and a unique suffix.
    pub fn new(label: &str) -> Self {
        let path = std::env::temp_dir().join(unique(label));
        std::fs::create_dir_all(&path).expect("creating a temporary directory");
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs a command and returns its output, panicking with stderr if it fails.
pub fn sh(program: &str, args: &[&str]) -> Output {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program} {args:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    out
}

/// A network namespace that is deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(label: &str) -> Self {
        let name = unique(&format!("tm{label}"));
        sh("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        // No IPv6 chatter (DAD, router and MLD messages) unless a test asks for it.
        ns.exec(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
        ns.exec(&["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"]);
        ns
    }

    /// `ip -n <ns> …`
    pub fn ip(&self, args: &[&str]) -> Output {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        sh("ip", &all)
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, args: &[&str]) -> Output {
        let mut all = vec!["netns", "exec", self.name.as_str()];
        all.extend_from_slice(args);
        sh("ip", &all)
    }

    /// Like [`Netns::exec`], returning the output whatever the exit status.
    pub fn try_exec(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .output()
            .expect("running ip netns exec")
    }

    /// The MAC address of an interface in this namespace.
    pub fn mac(&self, interface: &str) -> [u8; 6] {
        let out = self.ip(&["-o", "link", "show", interface]);
        let text = String::from_utf8_lossy(&out.stdout);
        let mac = text
            .split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .unwrap_or_else(|| panic!("no MAC for {interface}: {text}"));
        let mut bytes = [0u8; 6];
        for (b, part) in bytes.iter_mut().zip(mac.split(':')) {
            *b = u8::from_str_radix(part, 16).expect("hex MAC");
        }
        bytes
    }

    pub fn interface_index(&self, interface: &str) -> u32 {
        let out = self.ip(&["-o", "link", "show", interface]);
        let text = String::from_utf8_lossy(&out.stdout);
        text.split(':')
            .next()
            .and_then(|n| n.trim().parse().ok())
            .expect("ifindex")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// One end of a veth pair.
#[derive(Clone, Debug)]
pub struct End {
    pub netns: String,
    pub interface: String,
    pub ipv4: String,
}

/// Joins two namespaces with a veth pair, addresses `a_ip`/`b_ip` (CIDR), and
/// static neighbour entries both ways so no ARP is sent.
pub fn link(a: &Netns, a_ip: &str, b: &Netns, b_ip: &str) -> (End, End) {
    let a_if = unique("va");
    let b_if = unique("vb");
    sh(
        "ip",
        &[
            "link", "add", &a_if, "netns", &a.name, "type", "veth", "peer", "name", &b_if, "netns",
            &b.name,
        ],
    );
    for (ns, interface, ip) in [(a, &a_if, a_ip), (b, &b_if, b_ip)] {
        ns.ip(&["addr", "add", ip, "dev", interface]);
        ns.ip(&["link", "set", interface, "up"]);
    }
    let (a_mac, b_mac) = (a.mac(&a_if), b.mac(&b_if));
    let host = |cidr: &str| cidr.split('/').next().unwrap().to_string();
    a.ip(&[
        "neigh",
        "replace",
        &host(b_ip),
        "lladdr",
        &fmt_mac(b_mac),
        "dev",
        &a_if,
        "nud",
        "permanent",
    ]);
    b.ip(&[
        "neigh",
        "replace",
        &host(a_ip),
        "lladdr",
        &fmt_mac(a_mac),
        "dev",
        &b_if,
        "nud",
        "permanent",
    ]);
    (
        End {
            netns: a.name.clone(),
            interface: a_if,
            ipv4: host(a_ip),
        },
        End {
            netns: b.name.clone(),
            interface: b_if,
            ipv4: host(b_ip),
        },
    )
}

pub fn fmt_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Writes `spec` through `writer` into the maps of the programs `bpf`
/// loaded, as the daemon does: tunnel port 50103 sent from `node`, local
/// targets' interfaces resolved by `resolve`.
pub fn write_lb(
    bpf: &mut bpf::Bpf,
    writer: &mut LbWriter,
    spec: &LbSpec,
    node: Option<std::net::Ipv4Addr>,
    resolve: Resolver,
) {
    let valid = validate(spec).expect("a valid LB spec");
    let tunnel = TunnelSettings {
        port: 50103,
        address: node,
    };
    // The tunnel's own map (the LB writer does not write it).
    if node.is_some() {
        tapmesh::dataplane::tunnel::write(&mut bpf.ebpf, tunnel)
            .expect("writing the tunnel config");
    }
    writer
        .apply(&mut bpf.ebpf, &valid, tunnel, resolve)
        .expect("writing the LB maps");
}

/// A packet socket bound to interface `ifindex` of this thread's namespace
/// that sends whole Ethernet frames and receives nothing; `bypass_qdisc`:
/// straight to the device, past the qdisc and tc egress.
pub fn packet_socket(ifindex: u32, bypass_qdisc: bool) -> std::os::fd::OwnedFd {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let last = std::io::Error::last_os_error;
    // SAFETY: a plain socket call; the fd is owned from here on.
    let socket = unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        assert!(fd >= 0, "AF_PACKET socket: {}", last());
        OwnedFd::from_raw_fd(fd)
    };
    if bypass_qdisc {
        let one: libc::c_int = 1;
        // SAFETY: an int option of its own size.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_QDISC_BYPASS,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "PACKET_QDISC_BYPASS: {}", last());
    }
    // SAFETY: an all-zero sockaddr_ll is valid; protocol 0 receives nothing.
    let mut at: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    at.sll_family = libc::AF_PACKET as u16;
    at.sll_ifindex = ifindex as i32;
    // SAFETY: a sockaddr_ll of its own size.
    let rc = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (&at as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "binding to interface {ifindex}: {}", last());
    socket
}

/// Field `field` of every packet in `pcap`, as tshark prints it.
pub fn tshark_fields(pcap: &std::path::Path, field: &str) -> Vec<String> {
    tshark_rows(pcap, &[field])
}

/// `fields` of every packet in `pcap`, one line each, tab-separated as
/// tshark prints them.
pub fn tshark_rows(pcap: &std::path::Path, fields: &[&str]) -> Vec<String> {
    let mut command = std::process::Command::new("tshark");
    command.arg("-r").arg(pcap).args(["-T", "fields"]);
    for field in fields {
        command.args(["-e", field]);
    }
    let out = command.output().expect("tshark");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// Sends raw Ethernet frames out of `interface` from inside namespace `netns`.
pub fn send_frames(netns: &str, interface: &str, frames: &[Vec<u8>]) {
    use std::os::fd::AsRawFd;
    let netns = netns.to_string();
    let interface = interface.to_string();
    let frames = frames.to_vec();
    std::thread::spawn(move || {
        tapmesh::net::netns::enter(&netns).expect("entering the namespace");
        let index = tapmesh::net::link::index(&interface).expect("interface in namespace");
        let socket = packet_socket(index, false);
        for frame in &frames {
            // SAFETY: a live frame the kernel only reads.
            let sent =
                unsafe { libc::send(socket.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
            assert_eq!(
                sent,
                frame.len() as isize,
                "send: {}",
                std::io::Error::last_os_error()
            );
        }
    })
    .join()
    .expect("sender thread");
}
