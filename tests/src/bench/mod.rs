//! `cargo xtask bench`: one file per family, each giving its rows or its
//! section of BENCHMARKS.md; [`report`] runs them all in one process and
//! writes the document ([`timing`] is how the packet paths are timed).
//!
//! Packet paths: BPF_PROG_TEST_RUN ns/packet per program path, net of the
//! empty program of the same hook. Paths that leave the packet as it is are
//! timed with repeat = 1,000,000 (median of 10 runs). Paths that rewrite the
//! packet (MAC rewrite and VLAN strip, encapsulation, decapsulation) need
//! repeat = 1, because a kernel-side repeat runs the program again on its
//! own output: they are timed as the median of the durations the kernel
//! reports for [`LOOP_CALLS`] single runs, and their net column subtracts the
//! empty program timed the same way, in the same loop, one call after each
//! path call (one `ktime_get_ns` pair and the syscall's cache disturbance are
//! in both).
//!
//! The load-balancing rows ([`lb`]) run with an LB configuration in the maps.
//! The remote-target row needs the kernel's FIB and a neighbour: the
//! repeat = 1 rows ([`lb`], [`overlay`], [`blocks`]) run on a thread inside
//! the [`Underlay`] namespace (deleted also on panic). The other families
//! run real traffic or the control plane: [`control`] (TAPA Open → OPEN),
//! [`mirror`] (mirroring on veth), [`eds`] (EDS update latency), [`cluster`]
//! (a registration's way to another node's maps),
//! [`overlay::rates`] (the overlay on veth), [`lb_veth`] (the VIP load
//! balancer on veth), both under [`load`].

pub mod blocks;
pub mod cluster;
pub mod control;
pub mod eds;
pub mod lb;
pub mod lb_veth;
pub mod load;
pub mod maglev;
pub mod mirror;
pub mod overlay;
pub mod timing;
pub mod xds;

use std::fmt::Write as _;

use tapmesh::dataplane::lb::LbWriter;

use crate::{bpf::Bpf, frames::udp4_frame, underlay::Underlay};
use blocks::BLOCK;
use lb::LB_ENCAP_ROW;
use timing::{measure, pin_to_current_cpu, row, Row, LOOP_CALLS, REPEAT, RUNS};

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

/// The node's MAC on the host end of a container's veth, and the LB's
/// source MAC towards local targets.
pub const OUR_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xee, 1];

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpu}, {cores} cores, kernel {}", kernel.trim())
}

/// The rows timed with repeat = 1 in a loop (LB, overlay, building blocks),
/// run on one pinned thread inside the underlay namespace.
pub fn single_run_rows(bpf: &mut Bpf, writer: &mut LbWriter) -> Vec<Row> {
    let underlay = Underlay::new(true);
    underlay.run(|| {
        pin_to_current_cpu();
        let mut rows = lb::rewrite_rows(bpf, writer, &underlay);
        rows.extend(overlay::rows(bpf, underlay.index, underlay.mac));
        // After the overlay rows: the LRU probe finds their conntrack entry.
        rows.extend(blocks::rows(bpf));
        rows
    })
}

/// The overlay's repeat = 1 rows only, inside the underlay namespace.
pub fn overlay_rows() -> Vec<Row> {
    let mut bpf = Bpf::load();
    let underlay = Underlay::new(true);
    underlay.run(|| {
        pin_to_current_cpu();
        overlay::rows(&mut bpf, underlay.index, underlay.mac)
    })
}

/// The IPv4 overlay decapsulation rows of several builds of the BPF object
/// (files with the same map layout), interleaved: `rounds` rounds of 20 000
/// single runs per build and row, so every build sees the same moments of a
/// shared machine. Prints each round and returns the medians of the rounds'
/// net figures, one line per build and row (each a median of its 20 000
/// runs, or a trimmed mean with `TAPMESH_BENCH_MEAN=1`). Every build must
/// hold the maps this harness writes.
pub fn compare_decap(objects: &[String], rounds: usize) -> String {
    let underlay = Underlay::new(true);
    underlay.run(|| {
        let frames: Vec<(&str, Vec<u8>)> = overlay::decap_frames()
            .into_iter()
            .map(|(name, frame, _)| (name, frame))
            .collect();
        // Fills the maps (and checks every path) as the full run does.
        compare_objects(objects, rounds, &frames, |bpf| {
            overlay::rows(bpf, underlay.index, underlay.mac);
        })
    })
}

/// Builds of the BPF object side by side on the load balancer's paths to a
/// local target, as [`compare_decap`] does for decapsulation.
pub fn compare_vip(objects: &[String], rounds: usize) -> String {
    compare_objects(objects, rounds, &lb::compare_frames(), |bpf| {
        lb::load(bpf);
    })
}

/// `tm_xdp_uplink` of each build on each frame, after `prepare` filled the
/// build's maps: `rounds` interleaved rounds of 20 000 single runs, each
/// round printed; the medians of the rounds' net figures, one line per build
/// and frame.
fn compare_objects(
    objects: &[String],
    rounds: usize,
    frames: &[(&str, Vec<u8>)],
    prepare: impl Fn(&mut Bpf),
) -> String {
    pin_to_current_cpu();
    let mut builds: Vec<Bpf> = objects.iter().map(|o| Bpf::load_file(o)).collect();
    for bpf in &mut builds {
        prepare(bpf);
    }
    let mut nets = vec![vec![Vec::new(); frames.len()]; builds.len()];
    for round in 0..rounds.max(1) {
        let mut line = format!("round {round}:");
        for (b, bpf) in builds.iter_mut().enumerate() {
            for (f, (_, frame)) in frames.iter().enumerate() {
                let (raw, floor) = timing::measure_calls(bpf, "tm_xdp_uplink", frame, 20_000);
                nets[b][f].push(raw - floor);
                line += &format!(" {:.1}", raw - floor);
            }
            line += " |";
        }
        eprintln!("{line}");
    }
    let mut out = String::new();
    for (b, object) in objects.iter().enumerate() {
        for (f, (name, _)) in frames.iter().enumerate() {
            let v = &mut nets[b][f];
            v.sort_by(f64::total_cmp);
            let _ = writeln!(out, "{:6.1} net  {object}  {name}", v[v.len() / 2]);
        }
    }
    out
}

/// The BPF_PROG_TEST_RUN part of BENCHMARKS.md: the packet paths' table,
/// the target lines about it, and the building blocks' rows.
pub struct Paths {
    pub table: String,
    pub targets: String,
    pub blocks: String,
}

/// Every family, in one run: the text of BENCHMARKS.md.
pub fn report() -> String {
    let Paths {
        table,
        targets,
        blocks: block_table,
    } = paths();
    let control = control::open_latency();
    let mirroring = mirror::rates();
    let eds = eds::update_latency();
    let maglev_write = maglev::table_write();
    let xds_grpc = xds::through_grpc();
    let cluster = cluster::registration_latency() + "\n" + &cluster::many_targets();
    let overlay_rates = overlay::rates();
    let lb_rates = lb_veth::rates();

    format!(
        "# Benchmarks\n\n\
         Written by `cargo xtask bench`. BPF_PROG_TEST_RUN through aya's `TestRun`, with an LB \
         configuration in the maps (2 VIPs, 3 flows, 7 targets). Paths that leave the packet \
         unchanged are the median of {RUNS} runs of {REPEAT} in-kernel repeats. Paths that \
         rewrite it cannot use an in-kernel repeat (it would run again on its own output), so \
         they are the median of the durations the kernel reports for {LOOP_CALLS} single runs \
         (repeat = 1). The VIP miss is timed both ways as a cross-check (repeat = 1 runs see \
         colder caches: each call's syscall work comes between; the local redirect, timed so \
         before, lowers the TTL, so a repeat would not run on the same packet). \
         The net column subtracts the empty program of the same hook timed the same way in the same run; \
         for the repeat = 1 rows, in the same loop, one floor call after each path call (the floor row lists the floor of each row). \
         The remote-target row runs in a network namespace with a route and a permanent \
         neighbour for the remote node (bpf_fib_lookup succeeds, redirect to the underlay veth).\n\n\
         {targets}\n\n\
         Machine: {}\n\n{table}\n\
         ## Building blocks\n\n\
         One kernel operation per program (`ebpf/src/probes.rs`), timed like the rows above \
         (repeat = 1, net of the empty program): the least a path that needs them pays on this \
         machine. A helper call costs tens of ns here, while array lookups, branches and \
         arithmetic are near the 10 ns clock step. The first rows add up the VIP path's own \
         parts (parser, the eight array values and four counters it reads, and the uplink's \
         code present but not run, which shows that program size alone costs nothing).\n\n\
         | operation | timed as | ns/packet | net of floor | Mpps (net) |\n|---|---|---:|---:|---:|\n\
         {block_table}\n{control}\n{mirroring}\n{eds}\n{xds_grpc}\n{maglev_write}\n{cluster}\n{overlay_rates}\n{lb_rates}",
        machine()
    )
}

/// Every packet path and building block through BPF_PROG_TEST_RUN, in one run.
pub fn paths() -> Paths {
    let mut bpf = Bpf::load();
    let mut writer = lb::load(&mut bpf);
    let floor_frame = udp4_frame(1000, 53, &[0; 18]);
    let xdp_floor = measure(&mut bpf, "tm_xdp_floor", &floor_frame);
    let tc_floor = measure(&mut bpf, "tm_tc_floor", &floor_frame);
    let repeated = format!("median of {RUNS} × {REPEAT} repeats");
    let mut table = String::new();
    let _ = writeln!(
        table,
        "| path | timed as | ns/packet | net of floor | Mpps (net) |"
    );
    let _ = writeln!(table, "|---|---|---:|---:|---:|");
    let _ = writeln!(
        table,
        "| XDP floor (empty program) | {repeated} | {xdp_floor:.1} | 0.0 | — |"
    );
    let _ = writeln!(
        table,
        "| TC floor (empty program) | {repeated} | {tc_floor:.1} | 0.0 | — |"
    );
    lb::repeated_rows(&mut bpf, &mut table, &repeated, xdp_floor, tc_floor);

    // Rewriting paths: repeat = 1 in a loop, inside the underlay namespace.
    let loop_rows = single_run_rows(&mut bpf, &mut writer);
    let single = format!("median of {LOOP_CALLS} runs, repeat = 1");
    let floors: Vec<String> = loop_rows
        .iter()
        .map(|(_, _, floor)| format!("{floor:.0}"))
        .collect();
    let _ = writeln!(
        table,
        "| XDP floor (empty program), alternating with each row below | {single} | {} | 0.0 | — |",
        floors.join(" / ")
    );
    let mut encap_net = 0.0;
    let (mut service_net, mut decap_net) = (0.0, 0.0f64);
    let (blocks, loop_rows): (Vec<_>, Vec<_>) = loop_rows
        .into_iter()
        .partition(|(name, _, _)| name.starts_with(BLOCK));
    for (name, raw, floor) in loop_rows {
        row(&mut table, name, &single, raw, floor);
        if name == LB_ENCAP_ROW {
            encap_net = (raw - floor).max(0.0);
        }
        if name.starts_with("TC service: UDP") && name.ends_with("(resolved next hop)") {
            service_net = (raw - floor).max(0.0);
        }
        if name.contains("→ container") {
            decap_net = decap_net.max((raw - floor).max(0.0));
        }
    }
    let mut block_table = String::new();
    for (name, raw, floor) in blocks {
        row(
            &mut block_table,
            name.trim_start_matches(BLOCK),
            &single,
            raw,
            floor,
        );
    }
    let verdict = if encap_net <= 60.0 { "met" } else { "NOT met" };
    let overlay_verdict = format!(
        "Targets (overlay): TC service translation + encapsulation ≤ 120 ns net (issue 18) — {} ({service_net:.1} ns); \
         XDP decapsulation ≤ 30 ns net — {} ({decap_net:.1} ns, the slower of the two decap rows).",
        if service_net <= 120.0 { "met" } else { "NOT met" },
        if decap_net <= 30.0 { "met" } else { "NOT met" },
    );

    Paths {
        table,
        targets: format!(
            "Target: VIP hit with encapsulation ≤ 60 ns net — {verdict} ({encap_net:.1} ns).\n\n{overlay_verdict}"
        ),
        blocks: block_table,
    }
}
