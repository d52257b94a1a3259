//! Cluster mode: how long a registration on one node takes to reach another
//! node's maps (the registering daemon's etcd write, etcd, the other
//! daemon's watch and its LB apply), and what a daemon holds in memory.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use aya::maps::{Array, Map, MapData};
use tapmesh_common::{
    lb::{StreamValue, NO_TARGET},
    SCHEMA_VERSION,
};

use super::timing::percentile_ms;
use crate::{
    cluster::Lab,
    daemon::Daemon,
    net::wait_until,
    tapa::{stream, TapCaller, NSP_CONFIG, OPEN_WITHIN},
};
use tapmesh::proto::ambassador::stream_status::Status as StreamStatus;

/// stream-a's Maglev table in [`NSP_CONFIG`] (max_targets 4: 401 entries).
const STREAM_A_TABLE: u32 = 401;

fn array<V: aya::Pod>(daemon: &Daemon, name: &str) -> Array<MapData, V> {
    let pin = daemon
        .bpffs_root
        .join(format!("v{SCHEMA_VERSION}"))
        .join(name);
    let data = MapData::from_pin(&pin).unwrap_or_else(|e| panic!("{name}: {e}"));
    Array::try_from(Map::Array(data)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The distinct targets in stream-a's Maglev region of `daemon`'s maps.
fn stream_a_targets(daemon: &Daemon) -> usize {
    let streams: Array<MapData, StreamValue> = array(daemon, "tm_streams");
    let Some(s) = streams
        .iter()
        .flatten()
        .find(|s| s.table_size == STREAM_A_TABLE)
    else {
        return 0;
    };
    let maglev: Array<MapData, u32> = array(daemon, "tm_maglev");
    let targets: BTreeSet<u32> = (s.table_base..s.table_base + s.table_size)
        .filter_map(|i| maglev.get(&i, 0).ok())
        .filter(|&t| t != NO_TARGET)
        .collect();
    targets.len()
}

/// Polls every millisecond (the 10 ms of `wait_until` would be the resolution).
fn within(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    done()
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
}

/// `CYCLES` open/close cycles of stream-a by `tap`'s application, each timed
/// from the Open call until `seen_by`'s maps hold the target.
fn cycles(tap: &mut TapCaller, seen_by: &Daemon) -> Vec<Duration> {
    const CYCLES: usize = 50;
    let s = stream("stream-a", "conduit-a", "trench-a");
    let mut times = Vec::with_capacity(CYCLES);
    for cycle in 0..CYCLES {
        let start = Instant::now();
        tap.open(s.clone()).expect("open stream-a");
        let arrived = within(Duration::from_secs(10), || stream_a_targets(seen_by) == 1);
        assert!(arrived, "cycle {cycle}: not in the maps after 10 s");
        times.push(start.elapsed());
        tap.close(s.clone()).expect("close stream-a");
        let left = within(Duration::from_secs(10), || stream_a_targets(seen_by) == 0);
        assert!(left, "cycle {cycle}: still in the maps after 10 s");
    }
    times.sort();
    times
}

/// An application on node `i` whose conduit stays connected (stream-b
/// keeps it), so a cycle of stream-a is the registration only.
fn warm_app(lab: &mut Lab, i: usize) -> TapCaller {
    let mut tap = lab.app_on(i);
    tap.open(stream("stream-b", "conduit-a", "trench-a"))
        .expect("open stream-b");
    assert!(tap.wait_status("stream-b", StreamStatus::Open, OPEN_WITHIN));
    tap
}

/// Registration on node 2 → the target in node 1's maps, p50/p99, beside
/// the same cycles on node 1 seen in its own maps (no watch on the way).
pub fn registration_latency() -> String {
    let mut lab = Lab::new(3, false, NSP_CONFIG);
    let joined = wait_until(Duration::from_secs(15), || {
        (1..=3).all(|i| lab.cluster_detail(i).contains("3 nodes [n1 n2 n3]"))
    });
    assert!(joined, "{}", lab.cluster_detail(1));
    let mut on2 = warm_app(&mut lab, 2);
    let remote = cycles(&mut on2, lab.daemon(1));
    // stream-b takes one target in the whole trench: node 2's must go first.
    on2.close(stream("stream-b", "conduit-a", "trench-a"))
        .expect("close stream-b");
    let freed = wait_until(Duration::from_secs(10), || {
        !lab.registry(1).iter().any(|r| r.0.starts_with("stream-b."))
    });
    assert!(freed, "{:?}", lab.registry(1));
    let mut on1 = warm_app(&mut lab, 1);
    let local = cycles(&mut on1, lab.daemon(1));
    let p99 = percentile_ms(&remote, 99);
    let verdict = if p99 <= 50.0 { "met" } else { "NOT met" };
    let rss: Vec<String> = (1..=3)
        .map(|i| format!("{} MiB", rss_kib(lab.daemon(i).pid()) / 1024))
        .collect();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## Cluster mode: registration on node 2 → node 1's maps\n"
    );
    let _ = writeln!(
        out,
        "Three daemons and a one-member etcd (Debian's etcd-server) in namespaces. An application \
         opens and closes stream-a {} times through its ambassador (its conduit stays connected); \
         timed from the Open call until node 1's pinned `tm_maglev` region of the stream holds \
         the target (polled every 1 ms). The baseline is the same on node 1 itself: both \
         include the identifier claim (an etcd transaction the registering node waits for); \
         the difference is the target's record put and node 1's watch. Target: p99 ≤ 50 ms — {verdict} \
         ({p99:.1} ms). Daemon memory (VmRSS) afterwards: {}.\n",
        remote.len(),
        rss.join(", ")
    );
    let _ = writeln!(out, "| path | p50 ms | p99 ms | max ms |");
    let _ = writeln!(out, "|---|---:|---:|---:|");
    for (name, t) in [
        (
            "Open on node 2 → target in node 1's maps (through etcd)",
            &remote,
        ),
        (
            "Open on node 1 → target in node 1's maps (baseline)",
            &local,
        ),
    ] {
        let _ = writeln!(
            out,
            "| {name} | {:.1} | {:.1} | {:.1} |",
            percentile_ms(t, 50),
            percentile_ms(t, 99),
            percentile_ms(t, 100)
        );
    }
    out
}
