//! Mirroring throughput on veth: a UDP flood from one
//! namespace to another through the node, with no mirror, tapmesh's TC copy,
//! `tc … action mirred`, and iptables TEE; then tapmesh's AF_XDP ring with a
//! pcap consumer beside tcpdump on the same flood.

use std::fmt::Write as _;
use std::net::{SocketAddrV4, UdpSocket};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tapmesh::admin::proto::{
    tap_service::Destination, ListTapsRequest, Ring, TapFlow, TapId, TapService,
};

use super::timing::kpps;
use crate::{link, net::run_in, Daemon, End, Netns};

const FLOOD: Duration = Duration::from_secs(2);

struct Lab {
    daemon: Daemon,
    node: Netns,
    vm1: Netns,
    vm2: Netns,
    monitor: Netns,
    port: End,
    tap_if: End,
    vm2_if: End,
    mon_if: End,
}

fn rx_packets(ns: &Netns, interface: &str) -> u64 {
    let out = ns.exec(&[
        "cat",
        &format!("/sys/class/net/{interface}/statistics/rx_packets"),
    ]);
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

fn admin<T>(
    daemon: &Daemon,
    f: impl AsyncFnOnce(
        &mut tapmesh::admin::proto::admin_client::AdminClient<tonic::transport::Channel>,
    ) -> T,
) -> T {
    let socket = daemon.socket.clone();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(async move {
            let mut c = tapmesh::admin::connect(&socket).await.expect("admin API");
            f(&mut c).await
        })
}

impl Lab {
    fn new() -> Self {
        let node = Netns::new("bn");
        let vm1 = Netns::new("b1");
        let vm2 = Netns::new("b2");
        let monitor = Netns::new("bm");
        let (port, _) = link(&node, "198.18.1.1/24", &vm1, "198.18.1.2/24");
        let (_, vm2_if) = link(&node, "198.18.2.1/24", &vm2, "198.18.2.2/24");
        let (tap_if, mon_if) = link(&node, "198.18.3.1/24", &monitor, "198.18.3.2/24");
        vm1.ip(&["route", "add", "default", "via", "198.18.1.1"]);
        vm2.ip(&["route", "add", "default", "via", "198.18.2.1"]);
        node.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        let daemon = Daemon::start(&node.name, &[]);
        Lab {
            daemon,
            node,
            vm1,
            vm2,
            monitor,
            port,
            tap_if,
            vm2_if,
            mon_if,
        }
    }

    /// Floods vm1 → vm2 for [`FLOOD`]; returns (sent, received by vm2, copies at the monitor) per second.
    fn flood(&self) -> (f64, f64, f64) {
        let (rx0, mon0) = (
            rx_packets(&self.vm2, &self.vm2_if.interface),
            rx_packets(&self.monitor, &self.mon_if.interface),
        );
        let sink = self.vm2.name.clone();
        // A socket on the port so the flood is not answered with ICMP.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sink_stop = stop.clone();
        let sink = std::thread::spawn(move || {
            tapmesh::net::netns::enter(&sink).expect("sink namespace");
            let s = UdpSocket::bind("198.18.2.2:9").expect("sink socket");
            s.set_read_timeout(Some(Duration::from_millis(50))).ok();
            let mut buf = [0u8; 2048];
            while !sink_stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = s.recv(&mut buf);
            }
        });
        std::thread::sleep(Duration::from_millis(50));
        let sent = run_in(&self.vm1.name, || {
            let s = UdpSocket::bind("198.18.1.2:0").expect("flood socket");
            s.connect(SocketAddrV4::new("198.18.2.2".parse().unwrap(), 9))
                .expect("connect");
            let payload = [0u8; 18];
            let start = Instant::now();
            let mut sent = 0u64;
            while start.elapsed() < FLOOD {
                for _ in 0..64 {
                    if s.send(&payload).is_ok() {
                        sent += 1;
                    }
                }
            }
            sent
        });
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = sink.join();
        let secs = FLOOD.as_secs_f64();
        let rx = rx_packets(&self.vm2, &self.vm2_if.interface) - rx0;
        let mon = rx_packets(&self.monitor, &self.mon_if.interface) - mon0;
        (sent as f64 / secs, rx as f64 / secs, mon as f64 / secs)
    }

    fn tap(&self, service: Destination) {
        let s = TapService {
            id: "bench".into(),
            destination: Some(service),
            ..Default::default()
        };
        let f = TapFlow {
            id: "bench".into(),
            tap_service: "bench".into(),
            source: self.port.interface.clone(),
            direction: "OUT".into(),
            ..Default::default()
        };
        admin(&self.daemon, async |c| {
            c.create_tap_service(s).await.expect("tap service");
            c.create_tap_flow(f).await.expect("tap flow");
        });
    }

    fn untap(&self) {
        admin(&self.daemon, async |c| {
            c.delete_tap_flow(TapId { id: "bench".into() })
                .await
                .expect("delete flow");
            c.delete_tap_service(TapId { id: "bench".into() })
                .await
                .expect("delete service");
        });
    }
}

/// The "Mirroring on veth" section of BENCHMARKS.md.
pub fn rates() -> String {
    let lab = Lab::new();
    let mut out = String::new();
    let _ = writeln!(out, "## Mirroring on veth\n");
    let _ = writeln!(
        out,
        "A UDP flood (18-byte payload, one socket, {} s) from vm1 through the node to vm2; the tap flow \
         takes vm1's port in direction OUT; copies go to a monitor namespace's veth. kpps = thousands of \
         packets per second, in the same run.\n",
        FLOOD.as_secs()
    );
    let _ = writeln!(out, "| mirror | sent kpps | delivered kpps | copies kpps |");
    let _ = writeln!(out, "|---|---:|---:|---:|");
    let mut row = |name: &str, (s, r, m): (f64, f64, f64)| {
        let _ = writeln!(out, "| {name} | {} | {} | {} |", kpps(s), kpps(r), kpps(m));
    };
    row("none", lab.flood());

    lab.tap(Destination::Interface(lab.tap_if.interface.clone()));
    row("tapmesh TC copy (bpf_clone_redirect)", lab.flood());
    lab.untap();

    let port = lab.port.interface.clone();
    lab.node
        .exec(&["tc", "qdisc", "add", "dev", &port, "clsact"]);
    // u32 matching everything (this kernel has no matchall classifier).
    lab.node.exec(&[
        "tc",
        "filter",
        "add",
        "dev",
        &port,
        "ingress",
        "protocol",
        "all",
        "u32",
        "match",
        "u32",
        "0",
        "0",
        "action",
        "mirred",
        "egress",
        "mirror",
        "dev",
        &lab.tap_if.interface,
    ]);
    row("tc u32 + mirred egress mirror", lab.flood());
    lab.node
        .exec(&["tc", "qdisc", "del", "dev", &port, "clsact"]);

    let tee = [
        "-t",
        "mangle",
        "-A",
        "PREROUTING",
        "-i",
        &port,
        "-j",
        "TEE",
        "--gateway",
        "198.18.3.2",
    ];
    let teed = lab.node.try_exec(&[&["iptables"][..], &tee[..]].concat());
    if teed.status.success() {
        row("iptables TEE", lab.flood());
        let mut del = tee.to_vec();
        del[2] = "-D";
        lab.node.try_exec(&[&["iptables"][..], &del[..]].concat());
    } else {
        let _ = writeln!(
            out,
            "| iptables TEE | (not available: {}) | | |",
            String::from_utf8_lossy(&teed.stderr).trim()
        );
    }

    // Userspace consumers: tapmesh's AF_XDP ring (pcap writer) and tcpdump, same flood.
    let dir = std::env::temp_dir().join(crate::unique("tmbpcap"));
    std::fs::create_dir_all(&dir).expect("pcap dir");
    let pcap = dir.join("ring.pcap");
    lab.tap(Destination::Ring(Ring {
        pcap: pcap.display().to_string(),
        forward: String::new(),
    }));
    let (sent, _, _) = lab.flood();
    let listing = admin(&lab.daemon, async |c| {
        c.list_taps(ListTapsRequest {})
            .await
            .expect("list")
            .into_inner()
    });
    let ring = listing
        .services
        .first()
        .and_then(|s| s.ring_counters.clone())
        .unwrap_or_default();
    let written = ring.consumers.first().map_or(0, |c| c.delivered);
    let lost = ring.consumers.first().map_or(0, |c| c.lost);
    lab.untap();
    let secs = FLOOD.as_secs_f64();
    let _ = writeln!(
        out,
        "\n| userspace consumer | sent kpps | received kpps | written kpps | lost |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|");
    let _ = writeln!(
        out,
        "| tapmesh AF_XDP ring → pcap | {} | {} | {} | {lost} |",
        kpps(sent),
        kpps(ring.received as f64 / secs),
        kpps(written as f64 / secs)
    );
    let tcpdump_file = dir.join("tcpdump.pcap");
    let tcpdump = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.node.name,
            "tcpdump",
            "-i",
            &port,
            "-n",
            "-w",
        ])
        .arg(&tcpdump_file)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tcpdump");
    std::thread::sleep(Duration::from_millis(800));
    let (sent, _, _) = lab.flood();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(tcpdump.id() as i32, libc::SIGINT) };
    let output = tcpdump.wait_with_output().expect("tcpdump output");
    let text = String::from_utf8_lossy(&output.stderr);
    let count = |what: &str| {
        text.lines()
            .find(|l| l.contains(what))
            .and_then(|l| l.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let _ = writeln!(
        out,
        "| tcpdump -w (libpcap, AF_PACKET) | {} | {} | {} | {} |",
        kpps(sent),
        kpps(count("received by filter") as f64 / secs),
        kpps(count("captured") as f64 / secs),
        count("dropped by kernel")
    );
    let _ = std::fs::remove_dir_all(&dir);
    out
}
