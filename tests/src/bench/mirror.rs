//! Mirroring throughput on veth: a UDP flood from one
//! namespace to another through the node, with no mirror, tapmesh's TC copy,
//! `tc … action mirred`, and iptables TEE; then tapmesh's rings with a pcap
//! consumer beside tcpdump and xdpdump on the same flood; then the ring and
//! tcpdump under a load that keeps every CPU busy.

use std::fmt::Write as _;
use std::net::{SocketAddrV4, UdpSocket};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tapmesh::admin::proto::{tap_service::Destination, Ring, TapFlow, TapId, TapService};

use super::load::{self, Setup, Source};
use super::timing::kpps;
use crate::{dpdk::Testpmd, link, net::run_in, Daemon, End, Netns};

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
    /// The daemon again, with these arguments (the taps are gone with it).
    fn restart(&mut self, args: &[&str]) {
        self.daemon.stop();
        self.daemon = Daemon::start(&self.node.name, args);
    }

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
        tap_port(&self.daemon, &self.port.interface, service);
    }

    fn untap(&self) {
        untap_port(&self.daemon);
    }
}

/// Tap service and flow "bench": `port`'s outgoing traffic to `service`.
fn tap_port(daemon: &Daemon, port: &str, service: Destination) {
    {
        let s = TapService {
            id: "bench".into(),
            destination: Some(service),
            ..Default::default()
        };
        let f = TapFlow {
            id: "bench".into(),
            tap_service: "bench".into(),
            source: port.to_string(),
            direction: "OUT".into(),
            ..Default::default()
        };
        admin(daemon, async |c| {
            c.create_tap_service(s).await.expect("tap service");
            c.create_tap_flow(f).await.expect("tap flow");
        });
    }
}

fn untap_port(daemon: &Daemon) {
    {
        admin(daemon, async |c| {
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
    let mut lab = Lab::new();
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

    out.push_str(&consumers(&mut lab));
    drop(lab);
    out.push_str(&loaded());
    out
}

/// How long each run of the loaded section lasts.
const LOADED_RUN: Duration = Duration::from_secs(3);

/// One run of the loaded section.
struct LoadedRun {
    load: load::Load,
    /// Frames that crossed the tapped port.
    expected: u64,
    /// Records in the consumer's pcap file.
    written: u64,
}

/// The ring (BPF ring buffer → pcap) and `tcpdump -w` under packet-socket
/// writers on every CPU (the veth benches' load), each run after an
/// unmirrored one, in rounds.
fn loaded() -> String {
    let node = Netns::new("bln");
    let vm1 = Netns::new("bl1");
    let vm2 = Netns::new("bl2");
    let (port, _) = link(&node, "198.18.1.1/24", &vm1, "198.18.1.2/24");
    let _ = link(&node, "198.18.2.1/24", &vm2, "198.18.2.2/24");
    vm1.ip(&["route", "add", "default", "via", "198.18.1.1"]);
    vm2.ip(&["route", "add", "default", "via", "198.18.2.1"]);
    node.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    load::install_sink(&vm2, 9);
    let daemon = Daemon::start(&node.name, &[]);
    let node_name = node.name.clone();
    let setup = Setup {
        keep: vec![Box::new(daemon), Box::new(node)],
        client: vm1,
        server: vm2,
        to: SocketAddrV4::new("198.18.2.2".parse().unwrap(), 9),
    };
    let daemon = setup.keep[0].downcast_ref::<Daemon>().expect("the daemon");
    let node = setup.keep[1].downcast_ref::<Netns>().expect("the node");
    let port = port.interface;
    let dir = std::env::temp_dir().join(crate::unique("tmblcap"));
    std::fs::create_dir_all(&dir).expect("pcap dir");

    let crossed = |f: &dyn Fn() -> load::Load| {
        let rx0 = rx_packets(node, &port);
        let l = f();
        (l, rx_packets(node, &port) - rx0)
    };
    let mut rounds = Vec::new();
    for round in 0..load::ROUNDS {
        let none = load::run(&setup, LOADED_RUN, Source::Frames);
        let pcap = dir.join(format!("ring{round}.pcap"));
        tap_port(
            daemon,
            &port,
            Destination::Ring(Ring {
                pcap: pcap.display().to_string(),
                forward: String::new(),
            }),
        );
        std::thread::sleep(Duration::from_millis(200));
        let (load, expected) = crossed(&|| load::run(&setup, LOADED_RUN, Source::Frames));
        std::thread::sleep(Duration::from_millis(300));
        let listing = admin(daemon, async |c| {
            c.list_taps(tapmesh::admin::proto::ListTapsRequest::default())
                .await
                .expect("list taps")
                .into_inner()
        });
        eprintln!(
            "loaded ring: flow {:?}; ring {:?}",
            listing
                .flows
                .first()
                .map(|f| (f.mirrored_packets, f.failed)),
            listing
                .services
                .first()
                .and_then(|s| s.ring_counters.clone())
        );
        untap_port(daemon);
        let ring = LoadedRun {
            load,
            expected,
            written: pcap_records(&pcap),
        };
        let none2 = load::run(&setup, LOADED_RUN, Source::Frames);
        let file = dir.join(format!("tcpdump{round}.pcap"));
        let child = Command::new("ip")
            .args([
                "netns", "exec", &node_name, "tcpdump", "-i", &port, "-n", "-w",
            ])
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tcpdump");
        std::thread::sleep(Duration::from_millis(1000));
        let (load, expected) = crossed(&|| load::run(&setup, LOADED_RUN, Source::Frames));
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let _ = child.wait_with_output();
        let tcpdump = LoadedRun {
            load,
            expected,
            written: pcap_records(&file),
        };
        rounds.push((none, ring, none2, tcpdump));
    }
    let _ = std::fs::remove_dir_all(&dir);

    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nUnder a load that keeps every CPU busy: {} packet-socket writers of whole frames in vm1 \
         (one per CPU, 64 per sendmmsg, the veth benches' load), UDP through the node to a sink that \
         counts and drops them in vm2; the tap flow takes vm1's port (OUT). Each mirrored run follows \
         an unmirrored one; {} rounds of {} s. delivered = what reached the sink (the production \
         traffic); written = records in the consumer's pcap file; lost = frames that crossed the port \
         and are not in the file.\n",
        rounds[0].0.cpus,
        load::ROUNDS,
        LOADED_RUN.as_secs()
    );
    let _ = writeln!(
        out,
        "| round | consumer | unmirrored delivered kpps | delivered kpps | delivered ÷ unmirrored | written kpps | lost copies |"
    );
    let _ = writeln!(out, "|---|---|---:|---:|---:|---:|---:|");
    let mut ratios = Vec::new();
    for (i, (none, ring, none2, tcpdump)) in rounds.iter().enumerate() {
        for (name, base, run) in [
            ("tapmesh ring (BPF ring buffer) → pcap", none, ring),
            ("tcpdump -w", none2, tcpdump),
        ] {
            let _ = writeln!(
                out,
                "| {} | {name} | {} | {} | {:.2} | {} | {} |",
                i + 1,
                kpps(base.delivered_pps()),
                kpps(run.load.delivered_pps()),
                run.load.delivered_pps() / base.delivered_pps().max(1.0),
                kpps(run.written as f64 / run.load.seconds),
                run.expected.saturating_sub(run.written)
            );
        }
        ratios.push(
            (ring.written as f64 / ring.load.seconds)
                / (tcpdump.written as f64 / tcpdump.load.seconds).max(1.0),
        );
    }
    ratios.sort_by(f64::total_cmp);
    let _ = writeln!(
        out,
        "\nThe ring's written rate against tcpdump's under this load: {:.2}× (median of {}; {:.2}–{:.2}×).",
        ratios[ratios.len() / 2],
        ratios.len(),
        ratios[0],
        ratios[ratios.len() - 1]
    );
    out
}

/// One userspace consumer's run on the flood.
struct Capture {
    /// Sent per second in an unmirrored flood just before.
    none: f64,
    /// Sent per second.
    sent: f64,
    /// Frames that crossed the tapped port (each should be captured).
    expected: u64,
    /// Frames in the consumer's file.
    captured: u64,
    /// CPU time of the consumer's process or threads over the flood, in ns.
    cpu_ns: u64,
}

impl Capture {
    fn lost(&self) -> u64 {
        self.expected.saturating_sub(self.captured)
    }

    fn ns_per_copy(&self) -> f64 {
        self.cpu_ns as f64 / self.captured.max(1) as f64
    }

    /// A table row: the rates over a flood of `secs`, losses and CPU per copy.
    fn row(&self, name: &str, secs: f64) -> String {
        format!(
            "| {name} | {} | {} | {:.2} | {} | {} | {:.0} |",
            kpps(self.none),
            kpps(self.sent),
            self.sent / self.none,
            kpps(self.captured as f64 / secs),
            self.lost(),
            self.ns_per_copy()
        )
    }
}

/// Floods with a ring tapping the port: the sender's rate, the frames that
/// crossed the port and the CPU time of the ring's threads in the daemon.
fn ring_flood(lab: &Lab) -> (f64, u64, u64) {
    let port = &lab.port.interface;
    let pid = daemon_pid(&lab.daemon.socket).unwrap_or(0);
    let cpu0 = cpu_ns(pid, "tm-ring-");
    let rx0 = rx_packets(&lab.node, port);
    let (sent, _, _) = lab.flood();
    let expected = rx_packets(&lab.node, port) - rx0;
    (sent, expected, cpu_ns(pid, "tm-ring-") - cpu0)
}

/// The sender's rate with no mirror, as a baseline just before a consumer's run.
fn unmirrored(lab: &Lab) -> f64 {
    lab.flood().0
}

/// Nanoseconds on CPU of the tasks under /proc/<pid>/task whose name starts with `prefix`.
fn cpu_ns(pid: u32, prefix: &str) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with(prefix))
        })
        .filter_map(|t| {
            let stat = std::fs::read_to_string(t.path().join("schedstat")).ok()?;
            stat.split_whitespace().next()?.parse::<u64>().ok()
        })
        .sum()
}

/// The pid of the daemon serving `socket` (its command line names it).
fn daemon_pid(socket: &std::path::Path) -> Option<u32> {
    let needle = socket.as_os_str().as_encoded_bytes();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|p| {
        let pid = p.file_name().to_str()?.parse::<u32>().ok()?;
        let cmdline = std::fs::read(p.path().join("cmdline")).ok()?;
        cmdline
            .windows(needle.len())
            .any(|w| w == needle)
            .then_some(pid)
    })
}

/// Frames in a classic pcap file (records walked by their headers).
fn pcap_records(path: &std::path::Path) -> u64 {
    let Ok(bytes) = std::fs::read(path) else {
        return 0;
    };
    let mut at = 24;
    let mut n = 0;
    while let Some(h) = bytes.get(at..at + 16) {
        at += 16 + u32::from_ne_bytes(h[8..12].try_into().unwrap()) as usize;
        if at > bytes.len() {
            break;
        }
        n += 1;
    }
    n
}

/// Floods with a capture tool running in the node namespace on the tapped
/// port, writing to `file` (its frames counted from the file).
fn with_tool(lab: &Lab, tool: &[&str], file: &std::path::Path) -> Option<Capture> {
    let port = &lab.port.interface;
    let none = unmirrored(lab);
    let child = Command::new("ip")
        .args(["netns", "exec", &lab.node.name])
        .args(tool)
        .arg(file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    std::thread::sleep(Duration::from_millis(1000));
    // `ip netns exec` execs the tool, so the child's pid is the tool's.
    let pid = child.id();
    let cpu0 = cpu_ns(pid, "");
    let rx0 = rx_packets(&lab.node, port);
    let (sent, _, _) = lab.flood();
    let expected = rx_packets(&lab.node, port) - rx0;
    let cpu = cpu_ns(pid, "") - cpu0;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid as i32, libc::SIGINT) };
    let status = child.wait_with_output().ok()?.status;
    let captured = pcap_records(file);
    (captured > 0 || status.success()).then_some(Capture {
        none,
        sent,
        expected,
        captured,
        cpu_ns: cpu,
    })
}

/// A ring writing the copies to `pcap` during a flood.
fn ring_capture(lab: &Lab, pcap: &std::path::Path) -> Capture {
    let none = unmirrored(lab);
    lab.tap(Destination::Ring(Ring {
        pcap: pcap.display().to_string(),
        forward: String::new(),
    }));
    std::thread::sleep(Duration::from_millis(200));
    let (sent, expected, cpu) = ring_flood(lab);
    lab.untap();
    Capture {
        none,
        sent,
        expected,
        captured: pcap_records(pcap),
        cpu_ns: cpu,
    }
}

/// tapmesh's rings writing pcap (fed through the BPF ring buffer, and
/// through AF_XDP), `tcpdump -w` and `xdpdump -w` on the same flood, each
/// with the sender's rate against an unmirrored flood just before it (this
/// machine's rate drifts between floods).
fn consumers(lab: &mut Lab) -> String {
    let mut out = String::new();
    let dir = std::env::temp_dir().join(crate::unique("tmbpcap"));
    std::fs::create_dir_all(&dir).expect("pcap dir");
    let port = lab.port.interface.clone();

    let ring = ring_capture(lab, &dir.join("ring.pcap"));

    let tcpdump = with_tool(
        lab,
        &["tcpdump", "-i", &port, "-n", "-w"],
        &dir.join("tcpdump.pcap"),
    );
    let xdpdump = with_tool(
        lab,
        &[
            "xdpdump",
            "-i",
            &port,
            "--load-xdp-program",
            "--use-pcap",
            "-w",
        ],
        &dir.join("xdpdump.pcap"),
    );

    let dpdk = with_testpmd(lab);

    lab.restart(&["--mirror-ring-transport", "af_xdp"]);
    let xdp_ring = ring_capture(lab, &dir.join("xdp-ring.pcap"));
    lab.restart(&[]);

    let secs = FLOOD.as_secs_f64();
    let _ = writeln!(
        out,
        "\nUserspace consumers writing pcap, one after another on the same flood: copies the consumer \
         wrote to its file (counted in the file) against frames that crossed the tapped port; CPU is the \
         consumer's own (the ring's threads in the daemon, the tool's process), softirq not included. \
         The sender's rate is set against an unmirrored flood just before each run.\n"
    );
    let _ = writeln!(
        out,
        "| userspace consumer | unmirrored kpps | sent kpps | sent ÷ unmirrored | written kpps | lost copies | CPU ns/copy |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|");
    let mut line = |name: &str, c: Option<&Capture>| match c {
        Some(c) => {
            let _ = writeln!(out, "{}", c.row(name, secs));
        }
        None => {
            let _ = writeln!(out, "| {name} | (not available) | | | | | |");
        }
    };
    line("tapmesh ring (BPF ring buffer) → pcap", Some(&ring));
    line("tapmesh ring (AF_XDP) → pcap", Some(&xdp_ring));
    line("tcpdump -w (libpcap, AF_PACKET)", tcpdump.as_ref());
    line("xdpdump -w (xdp-tools, perf ring)", xdpdump.as_ref());
    let mut against = Vec::new();
    for (name, c) in [("tcpdump -w", &tcpdump), ("xdpdump -w", &xdpdump)] {
        if let Some(c) = c {
            against.push(format!(
                "{name}: {:.2}× its written rate, {:.2}× its CPU per copy",
                ring.captured as f64 / c.captured.max(1) as f64,
                ring.ns_per_copy() / c.ns_per_copy().max(1.0),
            ));
        }
    }
    let _ = writeln!(
        out,
        "\ntapmesh's ring (BPF ring buffer, the default) against {}; the sender keeps {:.0} % of its \
         unmirrored rate with it on ({:.0} % with the AF_XDP ring).",
        against.join("; "),
        100.0 * ring.sent / ring.none,
        100.0 * xdp_ring.sent / xdp_ring.none
    );
    let _ = writeln!(
        out,
        "\nA DPDK consumer (networking-spp's mirror role) on the same flood: the ring forwards its \
         copies out of the tap interface, and Debian's `dpdk-testpmd` (rxonly, `net_af_packet` on \
         the monitor's end, no hugepages) receives them; received = its port's RX-packets. CPU is \
         the ring's threads' in the daemon: testpmd polls one core whatever arrives.\n"
    );
    let _ = writeln!(
        out,
        "| consumer | unmirrored kpps | sent kpps | sent ÷ unmirrored | received kpps | lost copies | ring CPU ns/copy |\n|---|---:|---:|---:|---:|---:|---:|"
    );
    match &dpdk {
        Ok(c) => {
            let row = c.row("tapmesh ring → forward → dpdk-testpmd", secs);
            let _ = writeln!(out, "{row}");
        }
        Err(e) => {
            let _ = writeln!(out, "| dpdk-testpmd | not measured: {e} | | | | | |");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    out
}

/// The ring forwarding its copies to `dpdk-testpmd` on the monitor's end
/// during a flood; `captured` is what testpmd received.
fn with_testpmd(lab: &Lab) -> Result<Capture, String> {
    let none = unmirrored(lab);
    lab.tap(Destination::Ring(Ring {
        pcap: String::new(),
        forward: lab.tap_if.interface.clone(),
    }));
    let testpmd = match Testpmd::start(&lab.monitor.name, &lab.mon_if.interface) {
        Ok(t) => t,
        Err(e) => {
            lab.untap();
            return Err(e);
        }
    };
    std::thread::sleep(Duration::from_millis(200));
    let (sent, expected, cpu) = ring_flood(lab);
    std::thread::sleep(Duration::from_millis(300));
    let (received, _) = testpmd.stop();
    lab.untap();
    Ok(Capture {
        none,
        sent,
        expected,
        captured: received?,
        cpu_ns: cpu,
    })
}
