//! EDS backends keep their Maglev identity (keyed by address and port)
//! across updates and daemon restarts: an independent control plane
//! (Python grpcio + xds-protos) feeds 1000 endpoints to the daemon, and the
//! test counts, in the daemon's real `tm_maglev` table, the entries whose
//! backend changed when one endpoint goes, when the order changes and when
//! the daemon restarts.

use std::path::Path;
use std::time::Duration;

use aya::maps::{Array, Map, MapData};
use tapmesh_common::{
    lb::{StreamValue, Target, TARGET_LOCAL},
    SCHEMA_VERSION,
};
use tapmesh_tests::{
    daemon::Daemon,
    eds::{backends_netns, udp_vip_cluster, xds_config},
    kernel_tests_enabled, unique,
    xds_peer::{Cla, ControlPlane, Ep},
};

const BACKENDS: usize = 1000;

/// The i-th backend on the node's eb0, MAC 02:00:00:00:hi:lo.
fn backend(i: usize) -> String {
    tapmesh_tests::eds::backend(i).to_string()
}

fn array<V: aya::Pod>(pins: &Path, name: &str) -> Array<MapData, V> {
    let data = MapData::from_pin(pins.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    Array::try_from(Map::Array(data)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The backend (its MAC's low 16 bits) of every entry of the one EDS
/// stream's Maglev table, in table order.
fn table(daemon: &Daemon) -> Vec<u16> {
    let pins = daemon.bpffs_root.join(format!("v{SCHEMA_VERSION}"));
    let streams: Array<MapData, StreamValue> = array(&pins, "tm_streams");
    let used: Vec<StreamValue> = streams
        .iter()
        .map(|s| s.expect("tm_streams"))
        .filter(|s| s.table_size > 0)
        .collect();
    assert_eq!(used.len(), 1, "one stream has a table");
    let maglev: Array<MapData, u32> = array(&pins, "tm_maglev");
    let targets: Array<MapData, Target> = array(&pins, "tm_targets");
    let mut macs = std::collections::HashMap::new();
    (used[0].table_base..used[0].table_base + used[0].table_size)
        .map(|i| {
            let index = maglev.get(&i, 0).expect("tm_maglev");
            *macs.entry(index).or_insert_with(|| {
                let t = targets.get(&index, 0).expect("tm_targets");
                assert_eq!(t.kind, TARGET_LOCAL, "entry {i}");
                u16::from_be_bytes([t.dst_mac[4], t.dst_mac[5]])
            })
        })
        .collect()
}

/// Entries whose backend differs; panics if the sizes differ.
fn moved(before: &[u16], after: &[u16]) -> usize {
    assert_eq!(before.len(), after.len(), "the table size changed");
    before.iter().zip(after).filter(|(a, b)| a != b).count()
}

fn cla(backends: impl Iterator<Item = usize>) -> Cla {
    Cla::single(backends.map(|i| Ep::new(&backend(i), 8080)).collect())
}

#[test]
fn removing_one_of_1000_backends_moves_only_its_share_and_restarts_move_nothing() {
    if !kernel_tests_enabled() {
        return;
    }
    // Every backend, and one more, resolves on the node's eb0.
    let ns = backends_netns("ei", BACKENDS + 1);
    let mut cp = ControlPlane::start_in(&ns.name, false);
    let dir = std::env::temp_dir().join(unique("tmei"));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("daemon.toml");
    let clusters = udp_vip_cluster("svc", "203.0.113.50");
    std::fs::write(&config, xds_config(&cp.address(), &clusters)).unwrap();
    let state = dir.join("state").display().to_string();
    let config_arg = config.display().to_string();
    let args = [
        "--config",
        config_arg.as_str(),
        "--state-dir",
        state.as_str(),
    ];
    let (bpffs_root, _) = Daemon::paths();
    let mut daemon = Daemon::start_at(&ns.name, &bpffs_root, &args);
    // The ACK of `version` on a stream after `after` (the daemon's stream).
    let acked_after = |cp: &ControlPlane, version: &str, after: u32| {
        let v = version.to_string();
        cp.wait_request(
            Duration::from_secs(60),
            &format!("ACK of {version}"),
            move |r| {
                r.stream > after
                    && r.version_info == v
                    && r.error_detail.is_none()
                    && !r.response_nonce.is_empty()
            },
        );
    };
    let acked = |cp: &ControlPlane, version: &str| acked_after(cp, version, 0);

    cp.set("1", &[("svc", cla(0..BACKENDS))]);
    acked(&cp, "1");
    let all = table(&daemon);
    let size = all.len();
    assert!(size >= 100 * BACKENDS, "{size} entries");

    // The first endpoint goes: its entries move, and at most 1 % more.
    cp.set("2", &[("svc", cla(1..BACKENDS))]);
    acked(&cp, "2");
    let without_first = table(&daemon);
    let of_first = all.iter().filter(|&&b| b == 0).count();
    assert!(of_first > 0);
    assert!(without_first.iter().all(|&b| b != 0), "backend 0 is gone");
    let n = moved(&all, &without_first);
    let limit = size / BACKENDS + size / 100;
    eprintln!(
        "removing 1 of {BACKENDS}: {n} of {size} entries moved ({:.3} %), {of_first} were its own",
        n as f64 * 100.0 / size as f64
    );
    assert!(n <= limit, "{n} of {size} entries moved (limit {limit})");

    // The same endpoints in another order: nothing moves.
    cp.set("3", &[("svc", cla((1..BACKENDS).rev()))]);
    acked(&cp, "3");
    assert_eq!(moved(&without_first, &table(&daemon)), 0);

    // A restart (maps made afresh) with the same endpoints: the identities
    // come back from the state directory, and so does every entry.
    assert!(daemon.stop().success(), "{}", daemon.log_text());
    drop(daemon);
    let saved = std::fs::read_to_string(dir.join("state/eds-identities.json")).unwrap();
    assert!(
        saved.contains(&format!("\"{}:8080\": [\n        1000\n", backend(999))),
        "{saved}"
    );
    let first_stream = cp.requests().iter().map(|r| r.stream).max().unwrap();
    let mut daemon = Daemon::start_at(&ns.name, &bpffs_root, &args);
    acked_after(&cp, "3", first_stream);
    let restarted = table(&daemon);
    assert_eq!(moved(&without_first, &restarted), 0);

    // And the freed identifier goes to the next new backend only.
    cp.set("4", &[("svc", cla(1..=BACKENDS))]);
    acked(&cp, "4");
    let with_new = table(&daemon);
    let n = moved(&restarted, &with_new);
    assert!(n <= limit, "{n} of {size} entries moved (limit {limit})");
    assert!(with_new.iter().any(|&b| b as usize == BACKENDS));
    assert!(daemon.stop().success(), "{}", daemon.log_text());
    let _ = std::fs::remove_dir_all(&dir);
}
