//! EDS through a real gRPC xDS server: the daemon (its own process, as
//! deployed) subscribes to an independent Python grpcio control plane
//! (`xds_peer`), and every update is timed on the server's clock, from the
//! response it queued to the ACK of that version it read back. The daemon
//! ACKs once the maps hold the update.

use std::fmt::Write as _;
use std::time::Duration;

use super::timing::percentile_ms;
use crate::{
    daemon::Daemon,
    eds::{backend, backends_netns, udp_vip_cluster, xds_config},
    unique,
    xds_peer::{Cla, ControlPlane, Ep},
};

const CLUSTER: &str = "bench";
const VIP: &str = "203.0.113.41";
const CHURN: usize = 1000;
const UPDATES: usize = 50;
const FIRST: usize = 10_000;
const CHURN_TARGET_MS: f64 = 10.0;
const FIRST_TARGET_MS: f64 = 200.0;

fn cla(backends: impl Iterator<Item = usize>) -> Cla {
    Cla::single(
        backends
            .map(|i| Ep::new(&backend(i).to_string(), 8080))
            .collect(),
    )
}

/// Server time (ms) from the response of `version` to its ACK.
fn set_to_ack(cp: &mut ControlPlane, version: &str, endpoints: Cla) -> Result<f64, String> {
    cp.set(version, &[(CLUSTER, endpoints)]);
    let v = version.to_string();
    let ack = cp.wait_request(
        Duration::from_secs(60),
        &format!("ACK of {version}"),
        move |r| r.version_info == v && r.error_detail.is_none() && !r.response_nonce.is_empty(),
    );
    let sent = cp
        .responses()
        .into_iter()
        .filter(|r| r.version_info == version && r.nonce == ack.response_nonce)
        .map(|r| r.server_ns)
        .next()
        .ok_or_else(|| format!("no response of version {version} with the ACK's nonce"))?;
    Ok(ack.server_ns.saturating_sub(sent) as f64 / 1e6)
}

fn measure(ns: &str) -> Result<(Vec<f64>, Vec<f64>), String> {
    let mut cp = ControlPlane::start_in(ns);
    let dir = std::env::temp_dir().join(unique("tmxb"));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let config = dir.join("daemon.toml");
    let state = dir.join("state").display().to_string();
    let text = xds_config(&cp.address(), &udp_vip_cluster(CLUSTER, VIP));
    std::fs::write(&config, text).map_err(|e| e.to_string())?;
    let config_arg = config.display().to_string();
    let (bpffs_root, _) = Daemon::paths();
    let args = [
        "--config",
        config_arg.as_str(),
        "--state-dir",
        state.as_str(),
    ];
    let daemon = Daemon::start_at(ns, &bpffs_root, &args);
    let result = (|| {
        // The first update: 10 000 endpoints into an empty dataplane.
        let first = vec![set_to_ack(&mut cp, "first", cla(0..FIRST))?];
        // Churn: 1000 endpoints, alternating between two disjoint sets.
        let mut churn = Vec::new();
        for u in 0..UPDATES {
            let from = (u % 2) * CHURN;
            churn.push(set_to_ack(
                &mut cp,
                &format!("c{u}"),
                cla(from..from + CHURN),
            )?);
        }
        Ok((first, churn))
    })();
    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// The section of BENCHMARKS.md.
pub fn through_grpc() -> String {
    let ns = backends_netns("ex", FIRST);
    let measured = measure(&ns.name);
    drop(ns);
    let mut out = String::from("## EDS through a real gRPC xDS server\n\n");
    let (first, mut churn) = match measured {
        Ok(m) => m,
        Err(e) => {
            let _ = writeln!(out, "Not measured: {e}\n");
            return out;
        }
    };
    churn.sort_by(f64::total_cmp);
    let ms = |v: &[f64], p: usize| {
        percentile_ms(
            &v.iter()
                .map(|&x| Duration::from_secs_f64(x / 1e3))
                .collect::<Vec<_>>(),
            p,
        )
    };
    let churn_p99 = ms(&churn, 99);
    let verdict = |v: f64, target: f64| if v <= target { "met" } else { "NOT met" };
    let _ = writeln!(
        out,
        "The daemon runs as deployed (its own process, `[xds]` pointing at the control plane) \
         and subscribes to an independent control plane: a Python grpcio server on Envoy's \
         generated stubs (`tests/src/xds_peer.rs`, SotW EDS). Each update is timed on the \
         server's clock, from the moment it queued the `DiscoveryResponse` to the moment it read \
         the ACK of that version; the daemon ACKs once the maps hold the update. So the time \
         includes the server's encoding, gRPC both ways, the daemon's decoding, validation, \
         backend resolution (permanent neighbours on a directly connected /18) and map writes. \
         First row: one update of {FIRST} endpoints into an empty dataplane (the VIP, the stream \
         and a Maglev table of 1 000 003 entries are created). Second row: {UPDATES} updates of \
         {CHURN} endpoints alternating between two disjoint sets, so every update replaces every \
         target and the whole table. Targets: first {FIRST} endpoints ≤ {FIRST_TARGET_MS:.0} ms \
         — {} ({:.1} ms); churn p99 ≤ {CHURN_TARGET_MS:.0} ms — {} ({churn_p99:.1} ms).\n",
        verdict(first[0], FIRST_TARGET_MS),
        first[0],
        verdict(churn_p99, CHURN_TARGET_MS),
    );
    let _ = writeln!(
        out,
        "| case | p50 ms | p99 ms | max ms |\n|---|---:|---:|---:|"
    );
    let _ = writeln!(
        out,
        "| first update, {FIRST} endpoints | {:.1} | {:.1} | {:.1} |",
        first[0], first[0], first[0]
    );
    let _ = writeln!(
        out,
        "| {CHURN} endpoints, all replaced | {:.1} | {churn_p99:.1} | {:.1} |",
        ms(&churn, 50),
        churn.last().copied().unwrap_or_default()
    );
    out
}
