//! A load for the veth benches that keeps every CPU busy: one sender per
//! CPU, pinned there, each its own flow (its own source port), sending in
//! batches of [`BATCH`] with one sendmmsg(2) per batch. On veth the receive
//! side of each hop runs in softirq on the sending CPU, so the machine's CPUs
//! carry sender and data path together; what a path costs shows as CPU time
//! per delivered packet (all CPUs, from /proc/stat), beside the other paths
//! of the same run.
//!
//! Delivered packets are counted by an nftables rule in the receiving
//! namespace's prerouting hook (before conntrack), which also drops them: no
//! socket or reply adds work, and every path ends the same way.
//!
//! A UDP socket's own work (socket, route, neighbour, skb) is a large share
//! of what those CPUs do, the same in every path. [`Source::Frames`] sends
//! with less: whole Ethernet frames written to the client's veth by a packet
//! socket that bypasses the qdisc. What either sender costs shows beside the
//! paths in [`alone`], the same load dropped as it arrives. (BPF_PROG_RUN
//! live frames cost less still, but on veth they starve every path that
//! needs an skb: in a trial, the generator refilled the peer's ring within
//! one call faster than softirqs emptied it, and 4–10 % of the frames, or
//! fewer, reached an IP stack, where the XDP paths took all of them.)

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd, RawFd},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use crate::{net::spawn_in, Netns};

/// Datagrams per sendmmsg(2).
const BATCH: usize = 64;
/// Runs of each path in a bench, interleaved.
pub const ROUNDS: usize = 3;
/// UDP payload bytes.
const PAYLOAD: usize = 18;

/// Where the load comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// One UDP socket per CPU in the client: what an application pays to
    /// send is paid on the same CPUs as the data path.
    Sockets,
    /// One packet socket per CPU writing ready frames to the client's
    /// veth (no UDP, route or qdisc): a cheaper sender.
    Frames,
}

impl Source {
    /// The heading of a table of this load.
    fn describe(self, cpus: usize) -> String {
        match self {
            Source::Frames => format!(
                "Load from packet sockets: {cpus} writers of whole Ethernet frames to the \
                 client's veth ({BATCH} per sendmmsg, past the qdisc): a cheaper sender, so \
                 more of each CPU goes to the data path"
            ),
            Source::Sockets => format!(
                "Load from UDP sockets: {cpus} senders in the client ({BATCH} datagrams per \
                 sendmmsg): an application's sending cost, the same in every path, paid on the \
                 same CPUs"
            ),
        }
    }
}

/// What one run measured.
#[derive(Clone, Copy, Debug)]
pub struct Load {
    pub seconds: f64,
    pub sent: u64,
    pub delivered: u64,
    /// CPU time (all CPUs) spent while the senders ran, in ns: user + system
    /// + irq + softirq.
    pub busy_ns: u64,
    pub softirq_ns: u64,
    pub cpus: usize,
}

impl Load {
    pub fn sent_pps(&self) -> f64 {
        self.sent as f64 / self.seconds
    }

    pub fn delivered_pps(&self) -> f64 {
        self.delivered as f64 / self.seconds
    }

    /// CPU ns per delivered packet.
    pub fn cpu_per_packet(&self) -> f64 {
        self.busy_ns as f64 / self.delivered.max(1) as f64
    }

    pub fn softirq_per_packet(&self) -> f64 {
        self.softirq_ns as f64 / self.delivered.max(1) as f64
    }

    /// Share of the sent packets that never arrived.
    pub fn lost_share(&self) -> f64 {
        self.sent.saturating_sub(self.delivered) as f64 / self.sent.max(1) as f64
    }

    /// Share of the machine's CPU time that was busy (/proc/stat counts
    /// every process: the bench needs an otherwise idle machine).
    pub fn busy_share(&self) -> f64 {
        self.busy_ns as f64 / (self.seconds * 1e9 * self.cpus as f64)
    }
}

/// The counting sink in `server`: UDP to `port` counted and dropped in
/// prerouting.
pub fn install_sink(server: &Netns, port: u16) {
    nft(
        server,
        &format!(
            "table inet tmsink {{\n  chain pre {{\n    type filter hook prerouting priority -300; \
             policy accept;\n    udp dport {port} counter drop\n  }}\n}}\n"
        ),
    );
}

/// Loads nftables `rules` in `netns` (from a file: `nft -f`).
pub fn nft(netns: &Netns, rules: &str) {
    let file = std::env::temp_dir().join(crate::unique("bench.nft"));
    std::fs::write(&file, rules).expect("writing the nftables rules");
    let out = netns.try_exec(&["nft", "-f", file.to_str().expect("utf-8 path")]);
    let _ = std::fs::remove_file(&file);
    assert!(
        out.status.success(),
        "nft: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Packets the sink has counted (the `tmsink` table of `server`, in
/// whichever family: each namespace has one).
pub fn sink_count(server: &Netns) -> u64 {
    let out = server.try_exec(&["nft", "-j", "list", "ruleset"]);
    assert!(
        out.status.success(),
        "nft list: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("nft -j output is JSON");
    json["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|item| item["rule"]["table"] == "tmsink")
        .filter_map(|item| item["rule"]["expr"].as_array())
        .flatten()
        .find_map(|expr| expr["counter"]["packets"].as_u64())
        .expect("the sink's counter")
}

/// CPU time in jiffies since boot, all CPUs: (busy, softirq).
fn cpu_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
    let line = stat.lines().next().expect("the cpu line");
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal
    let get = |i: usize| v.get(i).copied().unwrap_or(0);
    (get(0) + get(1) + get(2) + get(5) + get(6), get(6))
}

/// The CPUs this process may run on.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: plain libc calls on a zeroed, sized cpu_set_t.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return vec![0];
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

fn pin_to(cpu: usize) {
    // SAFETY: plain libc calls on a zeroed, sized cpu_set_t.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        eprintln!(
            "sender not pinned to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// One sender: batches to `to` until `stop`; returns how many the kernel took.
fn send_until(to: SocketAddrV4, stop: &AtomicBool) -> u64 {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").expect("sender socket");
    socket.connect(to).expect("connect");
    send_batches(socket.as_raw_fd(), &[0; PAYLOAD], stop)
}

/// One frame writer: UDP from `wire` to `to` (source port `sport`) as
/// whole Ethernet frames on a packet socket on the client's veth, past the
/// qdisc, [`BATCH`] per sendmmsg(2), until `stop`; returns how many it sent.
fn write_frames_until(wire: &Wire, to: SocketAddrV4, sport: u16, stop: &AtomicBool) -> u64 {
    let socket = crate::packet_socket(wire.hop.ifindex, true);
    let frame = crate::frames::ethernet(
        wire.hop.dst_mac,
        wire.hop.src_mac,
        &[],
        0x0800,
        &crate::frames::udp4(wire.src, *to.ip(), sport, to.port(), &[0; PAYLOAD]),
    );
    send_batches(socket.as_raw_fd(), &frame, stop)
}

/// `payload` sent on the connected or bound socket `fd`, [`BATCH`] per
/// sendmmsg(2), until `stop`; returns how many the kernel took.
fn send_batches(fd: RawFd, payload: &[u8], stop: &AtomicBool) -> u64 {
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr().cast_mut().cast(),
        iov_len: payload.len(),
    };
    // SAFETY: an all-zero mmsghdr is valid; each then points at the one iovec.
    let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
    for m in &mut msgs {
        m.msg_hdr.msg_iov = &mut iov;
        m.msg_hdr.msg_iovlen = 1;
    }
    let mut sent = 0u64;
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: BATCH messages over a live payload the kernel only reads.
        let n = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), BATCH as u32, 0) };
        // A short batch ends at a message the kernel refused: a packet
        // socket says ENOBUFS when the veth drops the frame, where a UDP
        // socket says nothing. Either way it was sent and lost.
        sent += match usize::try_from(n) {
            Ok(n) if n == BATCH => BATCH as u64,
            Ok(n) => n as u64 + 1,
            Err(_) => 1,
        };
    }
    sent
}

/// A lab ready for the load: where it is sent from, to whom, and what must
/// live while it runs (namespaces, daemons).
pub struct Setup {
    /// Dropped first, in order (daemons before the namespaces they run in).
    pub keep: Vec<Box<dyn std::any::Any>>,
    pub client: Netns,
    pub server: Netns,
    pub to: SocketAddrV4,
}

/// What a frame from the client carries and where it leaves: the next hop
/// (interface and the MACs at either end) and the client's address.
#[derive(Clone, Debug)]
struct Wire {
    hop: tapmesh::net::neigh::Hop,
    src: Ipv4Addr,
}

/// The client's way to `to`, read in its namespace once the warm-up has
/// resolved the next hop.
fn wire(client: &Netns, to: SocketAddrV4) -> Wire {
    crate::net::run_in(&client.name, move || {
        let hop = tapmesh::net::neigh::Resolver::new()
            .and_then(|mut r| r.next_hops(&[(*to.ip()).into()]))
            .expect("resolving the client's next hop")
            .remove(0)
            .unwrap_or_else(|e| panic!("the client's next hop to {to}: {e:?}"))
            .0;
        // The address the kernel would send from.
        let socket = std::net::UdpSocket::bind("0.0.0.0:0").expect("a UDP socket");
        socket.connect(to).expect("connect");
        let std::net::SocketAddr::V4(local) = socket.local_addr().expect("local address") else {
            panic!("an IPv4 client");
        };
        Wire {
            hop,
            src: *local.ip(),
        }
    })
}

/// Runs every lab `rounds` times with load from `source`, interleaved (a
/// shared machine's load drifts), and keeps each lab's median run by CPU per
/// packet.
fn interleaved(setups: &[&Setup], rounds: usize, duration: Duration, source: Source) -> Vec<Load> {
    let mut runs: Vec<Vec<Load>> = vec![Vec::new(); setups.len()];
    for _ in 0..rounds {
        for (setup, runs) in setups.iter().zip(&mut runs) {
            let load = run(setup, duration, source);
            eprintln!(
                "{} ({source:?}): {:.0} kpps sent, {:.0} kpps delivered, {:.0} CPU ns/packet",
                setup.client.name,
                load.sent_pps() / 1000.0,
                load.delivered_pps() / 1000.0,
                load.cpu_per_packet()
            );
            runs.push(load);
        }
    }
    runs.into_iter()
        .map(|mut r| {
            r.sort_by(|a, b| a.cpu_per_packet().total_cmp(&b.cpu_per_packet()));
            r[r.len() / 2]
        })
        .collect()
}

/// Runs the load from `source` from the lab's client to its address for
/// `duration`, and counts what the sink in its server got ([`install_sink`]
/// first).
pub fn run(setup: &Setup, duration: Duration, source: Source) -> Load {
    let (client, server, to) = (&setup.client, &setup.server, setup.to);
    let allowed = allowed_cpus();
    let cpus = allowed.len();
    // Warm-up: neighbours and first-packet paths (frames then come from
    // other ports: new flows, which the counted time includes).
    let warm = Arc::new(AtomicBool::new(false));
    let w = warm.clone();
    let warming = spawn_in(&client.name, move || send_until(to, &w));
    std::thread::sleep(Duration::from_millis(200));
    warm.store(true, Ordering::Relaxed);
    let _ = warming.join();
    let wire = (source == Source::Frames).then(|| wire(client, to));
    std::thread::sleep(Duration::from_millis(200));

    let before = sink_count(server);
    let stop = Arc::new(AtomicBool::new(false));
    let (busy0, soft0) = cpu_jiffies();
    let start = Instant::now();
    let senders: Vec<_> = allowed
        .iter()
        .enumerate()
        .map(|(i, &cpu)| {
            let (stop, wire) = (stop.clone(), wire.clone());
            spawn_in(&client.name, move || {
                pin_to(cpu);
                match &wire {
                    Some(wire) => write_frames_until(wire, to, 40000 + i as u16, &stop),
                    None => send_until(to, &stop),
                }
            })
        })
        .collect();
    std::thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    let sent: u64 = senders.into_iter().map(|s| s.join().expect("sender")).sum();
    let seconds = start.elapsed().as_secs_f64();
    let (busy1, soft1) = cpu_jiffies();
    // What was sent last is still crossing for a moment.
    std::thread::sleep(Duration::from_millis(300));
    let delivered = sink_count(server) - before;
    // SAFETY: a plain libc call.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Load {
        seconds,
        sent,
        delivered,
        busy_ns: (busy1 - busy0) * 1_000_000_000 / hz,
        softirq_ns: (soft1 - soft0) * 1_000_000_000 / hz,
        cpus,
    }
}

/// The kernel path's cost over tapmesh's beyond the load-alone row, as a
/// phrase. That row is received without XDP and at its own, higher rate,
/// so the figure moves with the load and only approximates what the data
/// paths themselves cost.
pub fn net_ratio(ours: &Load, kernel: &Load, alone: &Load) -> String {
    let (ours, kernel, alone) = (
        ours.cpu_per_packet(),
        kernel.cpu_per_packet(),
        alone.cpu_per_packet(),
    );
    // Within a tenth of the load alone, the difference is the runs' noise.
    if ours - alone < alone / 10.0 {
        return format!(
            "beyond the load-alone row, no ratio: tapmesh cost {:+.0} ns/packet against it, \
             within this machine's noise",
            ours - alone
        );
    }
    format!(
        "beyond the load-alone row (an approximation of the data paths' own cost, which moves \
         with the load: {:.0} against {:.0} ns/packet): {:.2}×",
        ours - alone,
        kernel - alone,
        (kernel - alone) / (ours - alone)
    )
}

/// Runs the labs (tapmesh, the kernel's alternative, the floor, then
/// [`alone`]) under each load, [`ROUNDS`] times interleaved, and writes a
/// table per load with the per-CPU ratio against `target`; `names` are the
/// first three's rows.
pub fn compare(
    out: &mut String,
    labs: &[Setup; 4],
    duration: Duration,
    names: [&str; 3],
    target: f64,
) {
    for source in [Source::Frames, Source::Sockets] {
        let runs = interleaved(&labs.each_ref(), ROUNDS, duration, source);
        report(
            out,
            source,
            [
                (names[0], &runs[0]),
                (names[1], &runs[1]),
                (names[2], &runs[2]),
                ("the load alone, dropped on arrival at node 1", &runs[3]),
            ],
            target,
        );
    }
}

/// The table of a veth section (tapmesh, the kernel's alternative, the
/// floor, the load alone, in that order) and the per-CPU ratio against
/// `target`.
fn report(out: &mut String, source: Source, rows: [(&str, &Load); 4], target: f64) {
    use std::fmt::Write as _;
    let kernel_name = rows[1].0;
    let _ = writeln!(out, "### {}\n", source.describe(rows[0].1.cpus));
    let _ = writeln!(
        out,
        "| data path | sent kpps | delivered kpps | lost | CPU busy | CPU ns/packet | of which softirq |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|");
    for (name, l) in rows {
        let _ = writeln!(
            out,
            "| {name} | {} | {} | {:.1} % | {:.0} % | {:.0} | {:.0} |",
            super::timing::kpps(l.sent_pps()),
            super::timing::kpps(l.delivered_pps()),
            l.lost_share() * 100.0,
            l.busy_share() * 100.0,
            l.cpu_per_packet(),
            l.softirq_per_packet()
        );
    }
    let [(_, ours), (_, kernel), _, (_, alone)] = rows;
    let per_cpu = kernel.cpu_per_packet() / ours.cpu_per_packet();
    let _ = writeln!(
        out,
        "\nPackets per CPU-second, tapmesh against {kernel_name}: {per_cpu:.2}× (target ≥ \
         {target}× — {}); {}.\n",
        if per_cpu >= target { "met" } else { "NOT met" },
        net_ratio(ours, kernel, alone)
    );
}

/// The row every path is compared with: the load alone. The client's
/// packets reach node 1's end of its veth and are counted and dropped there
/// on arrival (nftables, netdev ingress), before any IP processing: what
/// every path pays before its own work.
/// `tx_checksums`: whether the client's veth computes checksums, as the
/// lab's own client does.
pub fn alone(port: u16, tx_checksums: bool) -> Setup {
    let client = Netns::new("ldc");
    let node = Netns::new("ldn");
    let (c_if, n_if) = crate::link(&client, "198.18.30.2/24", &node, "198.18.30.1/24");
    if !tx_checksums {
        client.exec(&["ethtool", "-K", &c_if.interface, "tx", "off"]);
    }
    client.ip(&["route", "add", "default", "via", "198.18.30.1"]);
    nft(
        &node,
        &format!(
            "table netdev tmsink {{\n  chain in {{\n    type filter hook ingress device \"{}\" \
             priority -500; policy accept;\n    udp dport {port} counter drop\n  }}\n}}\n",
            n_if.interface
        ),
    );
    Setup {
        keep: Vec::new(),
        client,
        server: node,
        to: SocketAddrV4::new(Ipv4Addr::new(198, 18, 31, 1), port),
    }
}
