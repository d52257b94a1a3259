//! EDS update latency: the daemon's dataplane, LB
//! service and catalog run in-process inside a namespace, and a
//! `ClusterEndpoints` of 1000 endpoints is handed to the catalog the way the
//! xDS client does (`EndpointSink::apply`, which returns once the LB maps
//! hold the update). The endpoints sit on a directly connected /18 of a veth
//! with permanent neighbour entries, so every one resolves to a local target.
//! The first update of 10 000 endpoints into a fresh dataplane is timed too.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tapmesh::catalog::{Catalog, ClusterBinding};
use tapmesh::config::Config;
use tapmesh::core::Plugin;
use tapmesh::dataplane::{DataplaneHandle, DataplanePlugin};
use tapmesh::lb::service::LbService;
use tapmesh::xds::{ClusterEndpoints, EndpointSink, Locality, SelectedEndpoint};

use super::timing::percentile_ms;
use crate::{
    eds::{backend, backends_netns},
    unique,
};

const ENDPOINTS: usize = 1000;
/// Endpoints of the first update into an empty dataplane (issue 18).
const FIRST: usize = 10_000;
const FIRST_RUNS: usize = 5;
const FIRST_TARGET_MS: f64 = 200.0;
const UPDATES: usize = 50;
const TARGET_MS: f64 = 10.0;
const CLUSTER: &str = "bench";
const VIP: &str = "203.0.113.40";

/// The first `count` endpoints of set `set`.
fn endpoints(set: usize, count: usize) -> ClusterEndpoints {
    ClusterEndpoints {
        cluster: CLUSTER.into(),
        endpoints: (0..count)
            .map(|i| SelectedEndpoint {
                address: IpAddr::V4(backend(set * ENDPOINTS + i)),
                port: 8080,
                weight: 1,
                locality: Locality::default(),
                priority: 0,
                health: tapmesh::xds::HealthStatus::Healthy as i32,
            })
            .collect(),
        standby: Vec::new(),
        drop_overloads: Vec::new(),
    }
}

/// Update times through the catalog, of the LB write alone, and through
/// the catalog with the endpoint count changing every time.
struct Times {
    catalog: Vec<Duration>,
    lb_write: Vec<Duration>,
    resized: Vec<Duration>,
}

/// Times `UPDATES` catalog updates of `ENDPOINTS` endpoints (in the
/// namespace the calling thread is in), then the same writes handed to the
/// LB service directly, already resolved.
/// A dataplane of its own (fresh pins), started.
async fn start_dataplane() -> Result<(DataplanePlugin, DataplaneHandle), String> {
    let mut config = Config::default();
    config.dataplane.bpffs_root = format!("/sys/fs/bpf/tapmesh-test-{}", unique("eds")).into();
    let handle = DataplaneHandle::default();
    let dataplane = DataplanePlugin::new(handle.clone());
    dataplane
        .configure(Default::default(), &config)
        .await
        .map_err(|e| format!("configuring the dataplane: {e}"))?;
    dataplane
        .start(Default::default())
        .await
        .map_err(|e| format!("starting the dataplane: {e}"))?;
    Ok((dataplane, handle))
}

/// The LB service and a catalog with the bench's cluster bound to its VIP.
async fn catalog(handle: &DataplaneHandle) -> (Arc<LbService>, Arc<Catalog>) {
    let lb = Arc::new(LbService::new(handle.clone()));
    let catalog = Catalog::new(lb.clone());
    catalog
        .set_bindings(vec![ClusterBinding {
            name: CLUSTER.into(),
            vip: VIP.into(),
            protocols: vec!["tcp".into(), "udp".into()],
            ports: Vec::new(),
            service_ip: String::new(),
        }])
        .await;
    (lb, catalog)
}

/// The first `ClusterEndpoints` of [`FIRST`] endpoints into a fresh
/// dataplane (new VIP, stream and a Maglev table of 1 000 003 entries),
/// [`FIRST_RUNS`] times.
async fn first_applies() -> Result<Vec<Duration>, String> {
    let mut times = Vec::new();
    for _ in 0..FIRST_RUNS {
        let (dataplane, handle) = start_dataplane().await?;
        let result = async {
            let (lb, catalog) = catalog(&handle).await;
            let start = Instant::now();
            catalog.apply(endpoints(0, FIRST)).await?;
            times.push(start.elapsed());
            let n = lb.spec().await.targets.len();
            if n != FIRST {
                return Err(format!("{n} targets in the maps, not {FIRST}"));
            }
            Ok(())
        }
        .await;
        if let Err(e) = dataplane.stop(Default::default()).await {
            eprintln!("stopping the bench dataplane: {e}");
        }
        result?;
    }
    Ok(times)
}

async fn measure() -> Result<Times, String> {
    let (dataplane, handle) = start_dataplane().await?;
    let result = async {
        let (lb, catalog) = catalog(&handle).await;
        // Every endpoint must have become a target, or the maps got less than asked.
        let check = async |set: usize, count: usize| -> Result<(), String> {
            let spec = lb.spec().await;
            let n = spec.targets.len();
            if n != count {
                return Err(format!(
                    "endpoint set {set}: {n} targets in the maps, not {count}"
                ));
            }
            Ok(())
        };
        // Warm-up: the first write creates the VIP, stream and flow.
        catalog.apply(endpoints(0, ENDPOINTS)).await?;
        check(0, ENDPOINTS).await?;
        let eds_part = async || {
            lb.sources()
                .await
                .into_iter()
                .find(|(source, _)| *source == tapmesh::catalog::LB_SOURCE)
                .map(|(_, spec)| spec)
                .ok_or_else(|| "no EDS part in the LB service".to_string())
        };
        let mut parts = vec![eds_part().await?];
        let mut times = Vec::with_capacity(UPDATES);
        for u in 0..UPDATES {
            let set = (u + 1) % 2;
            let update = endpoints(set, ENDPOINTS);
            let start = Instant::now();
            catalog.apply(update).await?;
            times.push(start.elapsed());
            check(set, ENDPOINTS).await?;
            if u == 0 {
                parts.push(eds_part().await?);
            }
        }
        // The same writes without the catalog (no debounce, no resolving).
        let mut lb_write = Vec::with_capacity(UPDATES);
        for u in 0..UPDATES {
            let part = parts[u % 2].clone();
            let start = Instant::now();
            lb.set_source(tapmesh::catalog::LB_SOURCE, part)
                .await
                .map_err(|e| format!("LB write: {e}"))?;
            lb_write.push(start.elapsed());
        }
        // One endpoint fewer or more each time: the Maglev table changes.
        let mut resized = Vec::with_capacity(UPDATES);
        for u in 0..UPDATES {
            let (set, count) = (u % 2, ENDPOINTS - 1 + u % 2);
            let start = Instant::now();
            catalog.apply(endpoints(set, count)).await?;
            resized.push(start.elapsed());
            check(set, count).await?;
        }
        Ok(Times {
            catalog: times,
            lb_write,
            resized,
        })
    }
    .await;
    if let Err(e) = dataplane.stop(Default::default()).await {
        eprintln!("stopping the bench dataplane: {e}");
    }
    result
}

/// The "EDS update → maps" section of BENCHMARKS.md.
pub fn update_latency() -> String {
    // Permanent neighbours for the two endpoint sets; the first update's
    // 10 000 in a namespace of their own (a bigger neighbour table makes
    // every resolution dearer).
    let ns = backends_netns("eb", 2 * ENDPOINTS);
    let ns_first = backends_netns("ef", FIRST);
    let (name, name_first) = (ns.name.clone(), ns_first.name.clone());
    let measured = std::thread::spawn(move || {
        let runtime = || {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(|e| format!("runtime: {e}"))
        };
        // Each namespace's neighbour table kept, as the daemon keeps its own.
        let keep = |e: std::io::Error| format!("keeping the neighbour table: {e}");
        tapmesh::net::netns::enter(&name).map_err(|e| format!("entering {name}: {e}"))?;
        tapmesh::net::neigh_table::keep().map_err(keep)?;
        let times = runtime()?.block_on(measure())?;
        tapmesh::net::netns::enter(&name_first)
            .map_err(|e| format!("entering {name_first}: {e}"))?;
        tapmesh::net::neigh_table::keep().map_err(keep)?;
        let first = runtime()?.block_on(first_applies())?;
        Ok::<_, String>((times, first))
    })
    .join()
    .unwrap_or_else(|_| Err("the bench thread panicked".into()));
    drop(ns);
    drop(ns_first);

    let mut out = String::new();
    let _ = writeln!(out, "## EDS update → maps\n");
    let (mut times, mut lb_write, mut resized, mut first) = match measured {
        Ok((t, first)) => (t.catalog, t.lb_write, t.resized, first),
        Err(e) => {
            let _ = writeln!(out, "Not measured: {e}\n");
            return out;
        }
    };
    times.sort();
    lb_write.sort();
    resized.sort();
    first.sort();
    let (p50, p99, max) = (
        percentile_ms(&times, 50),
        percentile_ms(&times, 99),
        percentile_ms(&times, 100),
    );
    let verdict = if p99 <= TARGET_MS { "met" } else { "NOT met" };
    let first_p99 = percentile_ms(&first, 99);
    let first_verdict = if first_p99 <= FIRST_TARGET_MS {
        "met"
    } else {
        "NOT met"
    };
    let _ = writeln!(
        out,
        "{UPDATES} updates of one cluster's `ClusterEndpoints` ({ENDPOINTS} endpoints, alternating \
         between two disjoint sets, so every update replaces every target), handed in-process to \
         the catalog as the xDS client does (`EndpointSink::apply`, which returns once the LB maps \
         hold the update, the point where the client ACKs). Each endpoint is resolved to a local \
         target (interface and neighbour MAC) on a directly connected /18 with permanent \
         neighbour entries; the time includes the catalog's {} ms debounce window (the backends \
         are resolved while it runs). The second row \
         hands the same two resolved LB parts to `LbService::set_source` directly: the map \
         write alone. The third goes through the catalog with {} and {ENDPOINTS} endpoints in \
         turn, so the active Maglev slots change with every update: the table is rebuilt and \
         written whole into the spare region (through the mapping of `tm_maglev`). The last row \
         is the first update of {FIRST} endpoints into a fresh dataplane, {FIRST_RUNS} times, in a \
         namespace with {FIRST} neighbours: the \
         VIP, the stream and its Maglev table of 1 000 003 entries are created. Targets: first \
         row p99 ≤ {TARGET_MS:.0} ms — {verdict} ({p99:.1} ms); last row p99 ≤ \
         {FIRST_TARGET_MS:.0} ms — {first_verdict} ({first_p99:.1} ms).\n",
        tapmesh::catalog::DEBOUNCE.as_millis(),
        ENDPOINTS - 1
    );
    let _ = writeln!(out, "| case | p50 ms | p99 ms | max ms |");
    let _ = writeln!(out, "|---|---:|---:|---:|");
    let _ = writeln!(
        out,
        "| {ENDPOINTS} endpoints, all replaced (catalog: debounce, resolve, LB write) | {p50:.1} | {p99:.1} | {max:.1} |"
    );
    let _ = writeln!(
        out,
        "| the LB write alone (`LbService::set_source`) | {:.1} | {:.1} | {:.1} |",
        percentile_ms(&lb_write, 50),
        percentile_ms(&lb_write, 99),
        percentile_ms(&lb_write, 100)
    );
    let _ = writeln!(
        out,
        "| {} ↔ {ENDPOINTS} endpoints (catalog; the Maglev table changes each time) | {:.1} | {:.1} | {:.1} |",
        ENDPOINTS - 1,
        percentile_ms(&resized, 50),
        percentile_ms(&resized, 99),
        percentile_ms(&resized, 100)
    );
    let _ = writeln!(
        out,
        "| first update: {FIRST} endpoints into a fresh dataplane (catalog) | {:.1} | {first_p99:.1} | {:.1} |",
        percentile_ms(&first, 50),
        percentile_ms(&first, 100)
    );
    out
}
