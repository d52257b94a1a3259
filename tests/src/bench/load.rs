//! A load for the veth benches that keeps every CPU busy: one UDP sender
//! per CPU, pinned there, each its own flow (its own source port), sending
//! in batches of [`BATCH`] with one sendmmsg(2) per batch. On veth the
//! receive side of each hop runs in softirq on the sending CPU, so the
//! machine's CPUs carry sender and data path together; what a path costs
//! shows as CPU time per delivered packet (all CPUs, from /proc/stat),
//! beside the other paths of the same run.
//!
//! Delivered packets are counted by an nftables rule in the receiving
//! namespace's prerouting hook (before conntrack), which also drops them: no
//! socket or reply adds work, and every path ends the same way.

use std::{
    net::SocketAddrV4,
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

/// Packets the sink has counted.
pub fn sink_count(server: &Netns) -> u64 {
    let out = server.try_exec(&["nft", "-j", "list", "table", "inet", "tmsink"]);
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
    let fd = std::os::fd::AsRawFd::as_raw_fd(&socket);
    let payload = [0u8; PAYLOAD];
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr().cast_mut().cast(),
        iov_len: PAYLOAD,
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
        if n > 0 {
            sent += n as u64;
        }
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

/// Runs every lab `rounds` times, interleaved (a shared machine's load
/// drifts), and keeps each lab's median run by CPU per packet.
pub fn interleaved(setups: &[&Setup], rounds: usize, duration: Duration) -> Vec<Load> {
    let mut runs: Vec<Vec<Load>> = vec![Vec::new(); setups.len()];
    for _ in 0..rounds {
        for (setup, runs) in setups.iter().zip(&mut runs) {
            let load = run(&setup.client, &setup.server, setup.to, duration);
            eprintln!(
                "{}: {:.0} kpps delivered, {:.0} CPU ns/packet",
                setup.client.name,
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

/// Runs the load from `client` to `to` for `duration` and counts what the
/// sink in `server` got ([`install_sink`] first).
pub fn run(client: &Netns, server: &Netns, to: SocketAddrV4, duration: Duration) -> Load {
    let allowed = allowed_cpus();
    let cpus = allowed.len();
    // Warm-up: neighbours, conntrack entries, first-packet paths.
    let warm = Arc::new(AtomicBool::new(false));
    let w = warm.clone();
    let warming = spawn_in(&client.name, move || send_until(to, &w));
    std::thread::sleep(Duration::from_millis(200));
    warm.store(true, Ordering::Relaxed);
    let _ = warming.join();
    std::thread::sleep(Duration::from_millis(200));

    let before = sink_count(server);
    let stop = Arc::new(AtomicBool::new(false));
    let (busy0, soft0) = cpu_jiffies();
    let start = Instant::now();
    let senders: Vec<_> = allowed
        .iter()
        .map(|&cpu| {
            let stop = stop.clone();
            spawn_in(&client.name, move || {
                pin_to(cpu);
                send_until(to, &stop)
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

/// The kernel path's cost over tapmesh's, each net of the floor (what the
/// data path itself costs, without the senders and the sink), as a phrase.
pub fn net_ratio(ours: &Load, kernel: &Load, floor: &Load) -> String {
    let (ours, kernel, floor) = (
        ours.cpu_per_packet(),
        kernel.cpu_per_packet(),
        floor.cpu_per_packet(),
    );
    // Within a tenth of the floor, the difference is the runs' noise.
    if ours - floor < floor / 10.0 {
        return format!(
            "net of the floor, no ratio: tapmesh cost {:+.0} ns/packet against plain routing \
             (it forwards without the nodes' IP stacks), within this machine's noise",
            ours - floor
        );
    }
    format!(
        "net of the floor (the data path's own cost): {:.2}×",
        (kernel - floor) / (ours - floor)
    )
}

/// The table of a veth section (tapmesh, the kernel's alternative, the
/// floor, in that order) and the per-CPU ratio against `target`.
pub fn report(out: &mut String, rows: [(&str, &Load); 3], kernel_name: &str, target: f64) {
    use std::fmt::Write as _;
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
    let [(_, ours), (_, kernel), (_, floor)] = rows;
    let per_cpu = kernel.cpu_per_packet() / ours.cpu_per_packet();
    let _ = writeln!(
        out,
        "\nPackets per CPU-second, tapmesh against {kernel_name}: {per_cpu:.2}× (target ≥ \
         {target}× — {}); {}.",
        if per_cpu >= target { "met" } else { "NOT met" },
        net_ratio(ours, kernel, floor)
    );
}
