//! `cargo xtask bench`: BPF_PROG_TEST_RUN ns/packet per program path, net of
//! the empty program of the same hook, written to BENCHMARKS.md.
//!
//! Paths that leave the packet as it is are timed with repeat = 1,000,000
//! (median of 10 runs). Paths that rewrite the packet would need repeat = 1
//! in a loop, because a kernel-side repeat would rewrite its own output;
//! none exists yet.

use std::{fmt::Write as _, time::Duration};

use tapmesh_tests::{bpf::Bpf, frames::*};

const RUNS: usize = 10;
const REPEAT: u32 = 1_000_000;

struct Path {
    name: &'static str,
    program: &'static str,
    floor: &'static str,
    frame: Vec<u8>,
    /// Expected return value, checked on a single run first.
    action: u32,
}

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    let mid = v.len() / 2;
    let ns = |d: Duration| d.as_nanos() as f64;
    if v.len() % 2 == 0 {
        (ns(v[mid - 1]) + ns(v[mid])) / 2.0
    } else {
        ns(v[mid])
    }
}

fn measure(bpf: &mut Bpf, program: &str, frame: &[u8]) -> f64 {
    bpf.run(program, frame, 10_000); // warm-up
    median((0..RUNS).map(|_| bpf.run(program, frame, REPEAT).duration).collect())
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string()))
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpu}, {cores} cores, kernel {}", kernel.trim())
}

fn main() {
    let out = std::env::args().nth(1).unwrap_or_else(|| "BENCHMARKS.md".into());
    let mut bpf = Bpf::load();
    let v6_tcp = ethernet(MAC_B, MAC_A, &[], 0x86dd, &ipv6(V6_A, V6_B, TCP, &[], &tcp_v4(V4_A, V4_B, 1, 2, 0)));
    let mut bad_ihl = udp4_frame(1, 2, b"x");
    bad_ihl[14] = 0x43;
    let paths = [
        Path { name: "XDP uplink: IPv4/UDP, parse + count, pass", program: "tm_xdp_uplink", floor: "tm_xdp_floor", frame: udp4_frame(1000, 53, &[0; 18]), action: 2 },
        Path { name: "XDP uplink: IPv6/TCP, parse + count, pass", program: "tm_xdp_uplink", floor: "tm_xdp_floor", frame: v6_tcp.clone(), action: 2 },
        Path { name: "XDP uplink: QinQ IPv4/TCP, pass", program: "tm_xdp_uplink", floor: "tm_xdp_floor", frame: ethernet(MAC_B, MAC_A, &[1, 2], 0x0800, &ipv4(V4_A, V4_B, TCP, &[], &tcp_v4(V4_A, V4_B, 1, 2, 0))), action: 2 },
        Path { name: "XDP uplink: bad IHL, drop", program: "tm_xdp_uplink", floor: "tm_xdp_floor", frame: bad_ihl, action: 1 },
        Path { name: "TC ingress: IPv4/UDP, pass", program: "tm_tc_ingress", floor: "tm_tc_floor", frame: udp4_frame(1000, 53, &[0; 18]), action: 0 },
        Path { name: "TC egress: IPv6/TCP, pass", program: "tm_tc_egress", floor: "tm_tc_floor", frame: v6_tcp, action: 0 },
    ];

    let floor_frame = udp4_frame(1000, 53, &[0; 18]);
    let xdp_floor = measure(&mut bpf, "tm_xdp_floor", &floor_frame);
    let tc_floor = measure(&mut bpf, "tm_tc_floor", &floor_frame);
    let mut table = String::new();
    let _ = writeln!(table, "| path | ns/packet (median of {RUNS} × {REPEAT} repeats) | net of floor | Mpps (net) |");
    let _ = writeln!(table, "|---|---:|---:|---:|");
    let _ = writeln!(table, "| XDP floor (empty program) | {xdp_floor:.1} | 0.0 | — |");
    let _ = writeln!(table, "| TC floor (empty program) | {tc_floor:.1} | 0.0 | — |");
    for p in &paths {
        let first = bpf.run(p.program, &p.frame, 1);
        assert_eq!(first.action, p.action, "{}: unexpected return value", p.name);
        assert_eq!(first.output, p.frame, "{}: the packet changed", p.name);
        let raw = measure(&mut bpf, p.program, &p.frame);
        let floor = if p.floor == "tm_xdp_floor" { xdp_floor } else { tc_floor };
        let net = (raw - floor).max(0.0);
        let mpps = if net > 0.0 { format!("{:.0}", 1000.0 / net) } else { "—".into() };
        let _ = writeln!(table, "| {} | {raw:.1} | {net:.1} | {mpps} |", p.name);
    }

    let doc = format!(
        "# Benchmarks\n\n\
         Written by `cargo xtask bench`. BPF_PROG_TEST_RUN through aya's `TestRun`; every path \
         leaves the packet unchanged, so each figure is the median of {RUNS} runs of {REPEAT} \
         in-kernel repeats, and the net column subtracts the empty program of the same hook \
         measured the same way in the same run.\n\n\
         Machine: {}\n\n{table}",
        machine()
    );
    print!("{doc}");
    std::fs::write(&out, doc).unwrap_or_else(|e| panic!("writing {out}: {e}"));
    eprintln!("written to {out}");
}
