//! Writing a whole Maglev table into `tm_maglev`: through the daemon's
//! mapping of the map (`dataplane::mapped`) against a batch update of every
//! entry (`dataplane::batch`, how the daemon wrote tables before), in one
//! run on the same loaded object, with the table of a stream of 1000
//! targets (100 003 entries) and the userspace Maglev build beside them.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use aya::maps::{Array, Map};
use tapmesh::{
    dataplane::{batch, mapped::MappedArray},
    lb::maglev::Maglev,
};
use tapmesh_common::map_names as n;

use super::timing::percentile_ms;
use crate::bpf::Bpf;

const TARGETS: u32 = 1000;
const WRITES: usize = 50;
/// Issue 18's target for a full table rewrite.
const TARGET_MS: f64 = 2.0;

fn row(out: &mut String, name: &str, mut times: Vec<Duration>) -> f64 {
    times.sort();
    let p99 = percentile_ms(&times, 99);
    let _ = writeln!(
        out,
        "| {name} | {:.3} | {p99:.3} | {:.3} |",
        percentile_ms(&times, 50),
        times.last().unwrap().as_secs_f64() * 1e3
    );
    p99
}

/// The section of BENCHMARKS.md.
pub fn table_write() -> String {
    let mut bpf = Bpf::load();
    let maglev = Maglev::new(TARGETS, None).expect("Maglev of 1000 targets");
    // Two tables that differ (one target fewer), written in turn at the
    // same place, so every write changes the region.
    let all: Vec<u32> = (0..TARGETS).collect();
    let mut builds = Vec::new();
    let mut tables = Vec::new();
    for active in [&all[..], &all[1..]] {
        let start = Instant::now();
        tables.push(maglev.build(active).expect("table"));
        builds.push(start.elapsed());
    }
    for _ in 2..WRITES {
        let start = Instant::now();
        let _ = maglev.build(&all[(builds.len() % 2)..]).expect("table");
        builds.push(start.elapsed());
    }
    let size = tables[0].len();
    let base = 4096u32;
    let keys: Vec<u32> = (base..base + size as u32).collect();

    let mut mapped_times = Vec::new();
    let mut batch_times = Vec::new();
    {
        let Some(Map::Array(data)) = bpf.ebpf.map(n::MAGLEV) else {
            panic!("tm_maglev is not an array");
        };
        let mut mapped = MappedArray::new(data).expect("mapping tm_maglev");
        for i in 0..WRITES {
            let table = &tables[i % 2];
            let start = Instant::now();
            mapped.write(base, table).expect("mapped write");
            mapped_times.push(start.elapsed());
        }
    }
    let mut array: Array<_, u32> =
        Array::try_from(bpf.ebpf.map_mut(n::MAGLEV).expect("tm_maglev")).expect("u32 array");
    // The last mapped write, as the kernel sees it: every entry by syscall.
    let last = &tables[(WRITES - 1) % 2];
    assert!((0..size).all(|j| array.get(&(base + j as u32), 0).ok() == Some(last[j])));
    for i in 0..WRITES {
        let table = &tables[(i + 1) % 2];
        let start = Instant::now();
        batch::set_many(&mut array, &keys, table).expect("batch update");
        batch_times.push(start.elapsed());
    }
    let last = &tables[WRITES % 2];
    for j in [0, size / 2, size - 1] {
        assert_eq!(array.get(&(base + j as u32), 0).expect("entry"), last[j]);
    }

    let mut out = format!(
        "## Maglev table write\n\n\
         One stream's whole table ({size} entries, {TARGETS} targets) written into `tm_maglev` \
         {WRITES} times, alternating between two tables that differ, on the object loaded by the \
         bench (`tapmesh-bench maglev`). The daemon now writes through a shared mapping of the map \
         (`BPF_F_MMAPABLE`, `dataplane/mapped.rs`); before, it wrote the entries that differ from \
         the spare region by one `BPF_MAP_UPDATE_BATCH` call (`dataplane/batch.rs`), timed here \
         for the whole table, the case of a new stream or a resized table. The last mapped write \
         is read back through the syscall entry by entry, the batch writes are spot-checked. The build \
         row is the userspace Maglev fill of the same table (1000 targets, then 999, \
         `Maglev::build`). Target: a full table rewrite (build + write) p99 ≤ {TARGET_MS} ms.\n\n\
         | case | p50 ms | p99 ms | max ms |\n|---|---:|---:|---:|\n"
    );
    let mapped_p99 = row(&mut out, "write through the mapping", mapped_times);
    row(&mut out, "batch update (before)", batch_times);
    let build_p99 = row(&mut out, "Maglev build (userspace)", builds);
    let total = mapped_p99 + build_p99;
    let _ = writeln!(
        out,
        "\nFull rewrite, build + mapped write at p99: {total:.2} ms — {}.",
        if total <= TARGET_MS { "met" } else { "NOT met" }
    );
    out
}
