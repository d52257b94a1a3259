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
    cluster::{registry_target, Lab},
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

/// Times `count` create-if-absent transactions (the identifier claim's
/// shape, on fresh keys) against etcd at `endpoint`; prints each in µs, one
/// per line. Runs in a process inside a node's namespace.
pub fn etcd_claims(endpoint: &str, count: u32) {
    use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp};
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async move {
        let mut client = Client::connect([endpoint], None).await.expect("etcd");
        for i in 0..count {
            let key = format!("/bench/claim/{i}");
            let txn = Txn::new()
                .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(key.as_str(), "n1", None)])
                .or_else([TxnOp::get(key.as_str(), None)]);
            let start = Instant::now();
            client.txn(txn).await.expect("txn");
            println!("{}", start.elapsed().as_micros());
        }
    });
}

/// [`etcd_claims`] from node 1's namespace: etcd's own part of a claim.
fn etcd_alone(lab: &Lab) -> Vec<Duration> {
    let exe = std::env::current_exe().expect("the bench binary");
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &lab.nodes[0].name])
        .arg(&exe)
        .arg("etcd-claims")
        .arg(&lab.etcd.endpoints()[0])
        .arg("50")
        .output()
        .expect("etcd-claims");
    let mut times: Vec<Duration> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .map(Duration::from_micros)
        .collect();
    assert_eq!(times.len(), 50, "{}", String::from_utf8_lossy(&out.stderr));
    times.sort();
    times
}

/// Registration on node 2 → the target in node 1's maps, p50/p99, beside
/// the same cycles on node 1 seen in its own maps (no watch on the way),
/// and etcd's own claim transaction.
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
    let etcd = etcd_alone(&lab);
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
         the difference is the target's record put and node 1's watch. The last row is that \
         transaction alone (create-if-absent on a fresh key, from node 1's namespace, 50 times): \
         etcd's commit, which this machine's disk sets. Target: p99 ≤ 50 ms — {verdict} \
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
        ("etcd alone: one claim transaction", &etcd),
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

/// [`NSP_CONFIG`] with stream-m, room for 1000 targets (its Maglev table
/// the smallest prime ≥ 100 000), behind vip-m.
const MANY_CONFIG: &str = r#"
[[trenches]]
name = "trench-a"

[[conduits]]
name = "conduit-a"

[[streams]]
name = "stream-a"
conduit = "conduit-a"
max_targets = 4

[[streams]]
name = "stream-m"
conduit = "conduit-a"
max_targets = 1000

[[vips]]
name = "vip-m"
address = "203.0.113.12/32"

[[flows]]
name = "flow-m"
stream = "stream-m"
vips = ["vip-m"]
protocols = ["udp", "tcp"]
"#;
const MANY: u32 = 1000;

/// The ENABLED targets of stream-m that node `i`'s registry lists (the
/// view its LB tables are built from; all of one conduit's targets share
/// one next hop, so the Maglev region cannot tell them apart).
fn stream_m_enabled(lab: &Lab, i: usize) -> usize {
    lab.registry(i)
        .iter()
        .filter(|r| r.0.starts_with("stream-m.") && r.2 == "ENABLED")
        .count()
}

/// Registers targets `first..first + count` of stream-m with `ip` (an
/// address with its prefix length) on the
/// node socket, as Meridio's NSP clients do (DISABLED, then ENABLED), 32 at
/// a time; prints `registered <n>` and every refusal. Runs in a process
/// inside the node's namespace (root there may register any address).
pub fn register_many(socket: &str, node: u32, first: u32, count: u32) {
    use tapmesh::proto::nsp::{target, target_registry_client::TargetRegistryClient};
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let done = rt.block_on(async move {
        let client =
            TargetRegistryClient::new(tapmesh::uds::lazy_channel(std::path::Path::new(socket)));
        let ids: Vec<u32> = (first..first + count).collect();
        let mut done = 0;
        for chunk in ids.chunks(32) {
            let mut calls = tokio::task::JoinSet::new();
            for &id in chunk {
                let mut client = client.clone();
                let k = id - first;
                let ip = format!("198.18.{}.{}/32", 100 + 4 * node + k / 250, k % 250 + 1);
                calls.spawn(async move {
                    let disabled = registry_target("stream-m", &ip, id, target::Status::Disabled);
                    client.register(disabled).await?;
                    let enabled = registry_target("stream-m", &ip, id, target::Status::Enabled);
                    client.register(enabled).await
                });
            }
            while let Some(result) = calls.join_next().await {
                match result.expect("task") {
                    Ok(_) => done += 1,
                    Err(e) => println!("refused: {:?} {}", e.code(), e.message()),
                }
            }
        }
        done
    });
    println!("registered {done}");
}

/// 1000 targets of one stream registered over 3 nodes at once (334, 333,
/// 333): how long until every node's registry lists all of them, and what
/// each daemon then holds in memory.
pub fn many_targets() -> String {
    let lab = Lab::build_with(
        3,
        false,
        MANY_CONFIG,
        1,
        // The daemon's default: the labs' 2 s is for fault tests, and a
        // lease is only refreshed every third of it.
        Duration::from_secs(10),
        false,
        |lab| {
            lab.entry_timeout = Duration::from_secs(600);
            lab.daemon_extra = "[nsp.limits]\ntargets_per_conduit = 400\n".into();
        },
    );
    let joined = wait_until(Duration::from_secs(15), || {
        (1..=3).all(|i| lab.cluster_detail(i).contains("3 nodes [n1 n2 n3]"))
    });
    assert!(joined, "{}", lab.cluster_detail(1));
    let rss_before: Vec<u64> = (1..=3).map(|i| rss_kib(lab.daemon(i).pid())).collect();
    let exe = std::env::current_exe().expect("the bench binary");
    let shares = [(1, 334), (335, 333), (668, 333)];
    let start = Instant::now();
    let children: Vec<_> = (1..=3)
        .map(|i| {
            let (first, count) = shares[i - 1];
            std::process::Command::new("ip")
                .args(["netns", "exec", &lab.nodes[i - 1].name])
                .arg(&exe)
                .arg("register-many")
                .arg(lab.node_socket(i))
                .arg(i.to_string())
                .arg(first.to_string())
                .arg(count.to_string())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("register-many")
        })
        .collect();
    let mut registered = Vec::new();
    for (child, (_, count)) in children.into_iter().zip(shares) {
        let out = child.wait_with_output().expect("register-many");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert_eq!(text.trim(), format!("registered {count}"), "{text}");
        registered.push(start.elapsed());
    }
    let converged: Vec<Duration> = (1..=3)
        .map(|i| {
            // Every 100 ms: a listing of 1000 rows is work for the daemon.
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut all = false;
            while !all && Instant::now() < deadline {
                all = stream_m_enabled(&lab, i) == MANY as usize;
                if !all {
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            let mut seen = std::collections::BTreeMap::new();
            for r in lab.registry(i) {
                *seen
                    .entry((r.0.split('.').next().unwrap_or("").to_string(), r.2, r.3))
                    .or_insert(0) += 1;
            }
            let warnings: Vec<String> = (1..=3)
                .flat_map(|n| {
                    let log = lab.daemon(n).log_text();
                    let lines: Vec<String> = log
                        .lines()
                        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                        .take(6)
                        .map(|l| format!("n{n}: {l}"))
                        .collect();
                    lines
                })
                .collect();
            assert!(
                all,
                "node {i}: {} targets; rows {seen:?}; {warnings:#?}",
                stream_m_enabled(&lab, i)
            );
            start.elapsed()
        })
        .collect();
    let rss_after: Vec<u64> = (1..=3).map(|i| rss_kib(lab.daemon(i).pid())).collect();
    let secs = |d: &Duration| format!("{:.1}", d.as_secs_f64());
    let mut out = String::new();
    let _ = writeln!(out, "## Cluster mode: 1000 targets over 3 nodes\n");
    let _ = writeln!(
        out,
        "Three daemons and a one-member etcd in namespaces (lease 10 s, the default). A client \
         in each node's namespace (root there) registers that node's share of stream-m's 1000 \
         targets, each at its own address (334, 333, 333; DISABLED then ENABLED, as Meridio's \
         clients do, 32 calls in flight), all three at once. The addresses are on no conduit, so \
         a node does not load balance to its own share; the registry, the identifier claims, \
         etcd and the other nodes' watches do the same work as for real targets. Timed from the start \
         until every registration was answered, and until each node's registry listed all \
         1000 ENABLED (`tapmesh registry list`, polled every 100 ms; its LB tables are built \
         from that view). Memory is VmRSS.\n"
    );
    let _ = writeln!(out, "| node | registrations answered s | all 1000 listed s | VmRSS before MiB | VmRSS after MiB |");
    let _ = writeln!(out, "|---|---:|---:|---:|---:|");
    for i in 0..3 {
        let _ = writeln!(
            out,
            "| n{} | {} | {} | {} | {} |",
            i + 1,
            secs(&registered[i]),
            secs(&converged[i]),
            rss_before[i] / 1024,
            rss_after[i] / 1024
        );
    }
    out
}
