//! Timing BPF_PROG_TEST_RUN: repeated runs for paths that leave the packet
//! as it is, single runs in a loop beside the empty program for paths that
//! rewrite it, and the table row both give.

use std::{fmt::Write as _, time::Duration};

use crate::bpf::Bpf;

pub const RUNS: usize = 10;
pub const REPEAT: u32 = 1_000_000;
/// Single runs per repeat = 1 row (after a warm-up of a tenth of that).
pub const LOOP_CALLS: usize = 200_000;

/// A repeat = 1 row: its name, and the medians of the path and of the floor.
pub type Row = (&'static str, f64, f64);

/// The median; with `TAPMESH_BENCH_MEAN` set, the mean of the middle 80 %
/// instead. The kernel's single-run durations come in clock steps (10 ns
/// here), so medians move only by whole steps; the trimmed mean resolves
/// less, which a same-run comparison of two builds needs.
fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    if std::env::var_os("TAPMESH_BENCH_MEAN").is_some() {
        let (lo, hi) = (v.len() / 10, v.len() - v.len() / 10);
        return v[lo..hi].iter().map(|d| d.as_nanos() as f64).sum::<f64>() / (hi - lo) as f64;
    }
    let mid = v.len() / 2;
    let ns = |d: Duration| d.as_nanos() as f64;
    if v.len().is_multiple_of(2) {
        (ns(v[mid - 1]) + ns(v[mid])) / 2.0
    } else {
        ns(v[mid])
    }
}

pub fn measure(bpf: &mut Bpf, program: &str, frame: &[u8]) -> f64 {
    bpf.run(program, frame, 10_000); // warm-up
    median(
        (0..RUNS)
            .map(|_| bpf.run(program, frame, REPEAT).duration)
            .collect(),
    )
}

/// Median durations of `LOOP_CALLS` single runs of `program` and of the
/// empty XDP program, called alternately so both see the same conditions
/// (the other core's load, frequency, cache pressure) at the same time.
pub fn measure_loop(bpf: &mut Bpf, program: &str, frame: &[u8]) -> (f64, f64) {
    measure_calls(bpf, program, frame, LOOP_CALLS)
}

/// [`measure_loop`] with `calls` single runs.
pub fn measure_calls(bpf: &mut Bpf, program: &str, frame: &[u8], calls: usize) -> (f64, f64) {
    let floor_program = if program.starts_with("tm_tc") || program.starts_with("tm_probe_tc") {
        "tm_tc_floor"
    } else {
        "tm_xdp_floor"
    };
    for _ in 0..calls / 10 {
        bpf.run(program, frame, 1);
        bpf.run(floor_program, frame, 1);
    }
    let mut path = Vec::with_capacity(calls);
    let mut floor = Vec::with_capacity(calls);
    for _ in 0..calls {
        path.push(bpf.run(program, frame, 1).duration);
        floor.push(bpf.run(floor_program, frame, 1).duration);
    }
    (median(path), median(floor))
}

/// Keeps the timing thread on one CPU: per-CPU counters and caches stay warm
/// the same way for the floor and every path.
pub fn pin_to_current_cpu() {
    // SAFETY: plain libc calls on a zeroed, sized cpu_set_t.
    unsafe {
        let cpu = libc::sched_getcpu();
        if cpu < 0 {
            return;
        }
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            eprintln!(
                "not pinned to CPU {cpu}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

pub fn row(table: &mut String, name: &str, method: &str, raw: f64, floor: f64) {
    let net = (raw - floor).max(0.0);
    let mpps = if net > 0.0 {
        format!("{:.0}", 1000.0 / net)
    } else {
        "—".into()
    };
    let _ = writeln!(
        table,
        "| {name} | {method} | {raw:.1} | {net:.1} | {mpps} |"
    );
}

/// Percentile `p` (0..=100) of sorted durations, in ms.
pub fn percentile_ms(sorted: &[Duration], p: usize) -> f64 {
    let i = ((sorted.len() * p).div_ceil(100)).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1e3
}

/// Thousands, rounded: packets per second as kpps.
pub fn kpps(v: f64) -> String {
    format!("{:.0}", v / 1e3)
}
