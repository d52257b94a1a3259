//! Issue 18, memory: the sizes in `[dataplane]` are the pinned maps' sizes
//! (`tm_targets`, the overlay's instance maps and the target, flow and
//! instance counters included),
//! `tapmesh bpf maps` reports what the kernel charges for each map, and LB
//! tables must fit the configured Maglev space, target and flow entries (a refusal
//! changes nothing).

use aya::maps::{Array, Map, MapData};
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use serde_json::Value;
use tapmesh::lb::{maglev::Maglev, model::LbSpec};
use tapmesh_common::{lb::StreamValue, SCHEMA_VERSION};
use tapmesh_tests::{
    daemon::tapmesh_bin,
    kernel_tests_enabled,
    maps::{differences, dump_pinned},
    net::{flow, stream, vip, wait_until, LbLab},
    sh, unique,
};

const VIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const MAGLEV_ENTRIES: u64 = 12_000;
const SIZES: &str = "[dataplane]\nmaglev_entries = 12000\nconntrack_entries = 4096\n\
    conntrack6_entries = 2048\nmirror_copy_bytes = 1048576\ntarget_entries = 1000\nflow_entries = 64\ninstance_entries = 128\n";

fn lab() -> (LbLab, PathBuf, PathBuf) {
    let mut lab = LbLab::new(1, &[VIP]);
    lab.start_configured(SIZES);
    let root = lab.daemon().bpffs_root.clone();
    let pins = root.join(format!("v{SCHEMA_VERSION}"));
    (lab, root, pins)
}

/// What bpftool says of every map pinned in `pins`, by name.
fn bpftool_maps(pins: &Path) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(pins).expect("pin directory") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            continue;
        }
        let shown = sh(
            "bpftool",
            &["-j", "map", "show", "pinned", path.to_str().unwrap()],
        );
        let map: Value = serde_json::from_slice(&shown.stdout).expect("bpftool JSON");
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        out.insert(name, map);
    }
    out
}

fn tapmesh_maps(root: &Path, extra: &[&str]) -> Value {
    let out = Command::new(tapmesh_bin())
        .args(["bpf", "maps", "-o", "json", "--bpffs-root"])
        .arg(root)
        .args(extra)
        .output()
        .expect("running tapmesh bpf maps");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("tapmesh bpf maps JSON")
}

#[test]
fn configured_sizes_are_the_pinned_sizes_and_each_maps_kernel_memory_is_reported() {
    if !kernel_tests_enabled() {
        return;
    }
    let (mut lab, root, pins) = lab();
    let shown = bpftool_maps(&pins);
    for (map, entries) in [
        ("tm_maglev", 12_000),
        ("tm_ov_ct", 4096),
        ("tm_ov_ct6", 2048),
        ("tm_mirror_copy", 1 << 20),
        ("tm_targets", 1000),
        ("tm_target_stats", 1000),
        ("tm_flow_stats", 64),
        ("tm_ov_instances", 128),
        ("tm_ov_inst6", 128),
        ("tm_ov_ins_stats", 128),
    ] {
        assert_eq!(shown[map]["max_entries"], entries, "{map}: {}", shown[map]);
    }
    // Mappable (BPF_F_MMAPABLE): the daemon writes tables through a mapping.
    assert_eq!(shown["tm_maglev"]["flags"], 1024, "{}", shown["tm_maglev"]);

    let report = tapmesh_maps(&root, &[]);
    let maps = report["maps"].as_array().expect("maps");
    assert_eq!(maps.len(), shown.len(), "every pinned map is listed");
    let mut total = 0;
    let mut per_cpu = 0;
    for m in maps {
        let name = m["name"].as_str().unwrap();
        let kernel = &shown[name];
        let memlock = m["memlock"].as_u64().unwrap();
        assert_eq!(
            Some(memlock),
            kernel["bytes_memlock"].as_u64(),
            "{name}: {m} vs {kernel}"
        );
        assert_eq!(m["max_entries"], kernel["max_entries"], "{name}");
        assert_eq!(m["kind"], kernel["type"], "{name}");
        let kernel_per_cpu = kernel["type"].as_str().unwrap().contains("percpu");
        assert_eq!(m["per_cpu"], kernel_per_cpu, "{name}");
        total += memlock;
        if kernel_per_cpu {
            per_cpu += memlock;
        }
    }
    assert_eq!(report["total"], total);
    assert_eq!(report["per_cpu_total"], per_cpu);
    assert!(per_cpu > 0, "the counters are per CPU");
    // The 12000-entry Maglev space is charged by entry (8 bytes each).
    let maglev = maps.iter().find(|m| m["name"] == "tm_maglev").unwrap();
    assert!(maglev["memlock"].as_u64().unwrap() >= 8 * MAGLEV_ENTRIES);
    // Mappable: the values start on a page and fill whole pages.
    assert!(
        maglev["memlock"].as_u64().unwrap() < 8 * MAGLEV_ENTRIES + 3 * 4096,
        "{maglev}"
    );

    // On 64 CPUs the per-CPU maps scale with the count, the rest stays.
    let cpus = report["possible_cpus"].as_u64().unwrap();
    let at64 = tapmesh_maps(&root, &["--cpus", "64"]);
    assert_eq!(at64["estimate_cpus"], 64);
    assert_eq!(
        at64["estimate_total"],
        total - per_cpu + per_cpu * 64 / cpus
    );

    // A daemon started on these pins with other sizes replaces the maps
    // whose size changed, and says so.
    let config = std::env::temp_dir().join(format!("{}.toml", unique("tmsizes")));
    std::fs::write(&config, "[dataplane]\nconntrack_entries = 8192\n").unwrap();
    lab.kill_and_start(None, &["--config".into(), config.display().to_string()]);
    let _ = std::fs::remove_file(&config);
    let shown = bpftool_maps(&pins);
    assert_eq!(shown["tm_ov_ct"]["max_entries"], 8192);
    assert_eq!(
        shown["tm_maglev"]["max_entries"],
        1 << 22,
        "back to the default"
    );
    assert_eq!(
        shown["tm_ov_ct6"]["max_entries"], 65_536,
        "back to the default"
    );
    assert_eq!(
        shown["tm_mirror_copy"]["max_entries"],
        16 << 20,
        "back to the default"
    );
    for map in [
        "tm_targets",
        "tm_target_stats",
        "tm_flow_stats",
        "tm_ov_instances",
        "tm_ov_inst6",
        "tm_ov_ins_stats",
    ] {
        assert_eq!(
            shown[map]["max_entries"], 16_384,
            "{map} back to the default"
        );
    }
    let log = lab.daemon().log_text();
    assert!(
        log.contains("tm_ov_ct") && log.contains("replacing it"),
        "{log}"
    );
}

fn sized_stream(name: &str, table_size: u32) -> tapmesh::lb::model::StreamSpec {
    let mut s = stream(name, 10);
    s.table_size = Some(table_size);
    s
}

/// The one published Maglev table, read through the syscall interface
/// (`tm_streams` for where it is, then `tm_maglev` entry by entry).
fn kernel_table(pins: &Path) -> Vec<u32> {
    let open = |name: &str| {
        Map::Array(MapData::from_pin(pins.join(name)).unwrap_or_else(|e| panic!("{name}: {e}")))
    };
    let streams: Array<MapData, StreamValue> = Array::try_from(open("tm_streams")).unwrap();
    let published: Vec<StreamValue> = streams
        .iter()
        .map(|v| v.unwrap())
        .filter(|v| v.table_size != 0)
        .collect();
    assert_eq!(published.len(), 1, "one stream: {published:?}");
    let maglev: Array<MapData, u32> = Array::try_from(open("tm_maglev")).unwrap();
    let StreamValue {
        table_base,
        table_size,
    } = published[0];
    (table_base..table_base + table_size)
        .map(|i| maglev.get(&i, 0).unwrap())
        .collect()
}

/// The kernel's table is the userspace Maglev table of `size` entries
/// over slots 0 and 1, entry for entry (slots name target indices there).
fn is_maglev_table(kernel: &[u32], size: u32) -> bool {
    let want = Maglev::new(10, Some(size)).unwrap().build(&[0, 1]).unwrap();
    let mut index_of = BTreeMap::new();
    kernel.len() == want.len()
        && want
            .iter()
            .zip(kernel)
            .all(|(slot, index)| *index_of.entry(*slot).or_insert(*index) == *index)
        && index_of.len() == 2
        && index_of.values().collect::<BTreeSet<_>>().len() == 2
}

/// 200 flows to the VIP: all arrive, some at each target.
fn datagrams_cross(lab: &LbLab, when: &str) {
    let counts = lab.spread(VIP);
    assert_eq!(counts.iter().sum::<u64>(), 200, "{when}: {counts:?}");
    assert!(
        counts.iter().all(|&c| c > 0),
        "{when}: both targets get flows: {counts:?}"
    );
}

#[test]
fn lb_tables_must_fit_the_configured_maglev_space_and_a_refusal_changes_nothing() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut lab = LbLab::new(2, &[VIP]);
    lab.start_configured(SIZES);
    let pins = lab.daemon().bpffs_root.join(format!("v{SCHEMA_VERSION}"));
    let good = LbSpec {
        vips: vec![vip("v", &VIP.to_string())],
        streams: vec![sized_stream("s", 10_007)],
        flows: vec![flow("all", &["v"], "s", &["udp"])],
        targets: vec![lab.targets[0].local("s", 1), lab.targets[1].local("s", 2)],
    };
    lab.apply(&good).expect("a 10007-entry table fits in 12000");
    // Written through the daemon's mapping, read back by syscall.
    assert!(is_maglev_table(&kernel_table(&pins), 10_007));
    datagrams_cross(&lab, "applied");
    let before = dump_pinned(&pins);
    // `spec` is refused with an error that says `why`, and no map changed.
    let refused = |spec: &LbSpec, why: &str| {
        let refused = lab.apply(spec).expect_err(why);
        assert!(refused.contains(why), "{refused}");
        let diff = differences(&before, &dump_pinned(&pins));
        assert!(diff.is_empty(), "maps changed: {diff:?}");
    };

    // Two tables of 10007 + 2003 entries: more than the space holds.
    let mut two = good.clone();
    two.streams.push(sized_stream("t", 2003));
    refused(
        &two,
        "need 12010 entries in all; dataplane.maglev_entries is 12000",
    );

    // A bigger table alone fits, but not beside the one it replaces
    // (traffic keeps the old table until the new one is whole).
    let mut bigger = good.clone();
    bigger.streams = vec![sized_stream("s", 10_009)];
    refused(
        &bigger,
        "Maglev table space (raise dataplane.maglev_entries)",
    );

    // More targets than `tm_targets` has entries.
    let mut many = good.clone();
    many.streams = vec![stream("s", 2000)];
    many.targets = (1..=1001)
        .map(|i| lab.targets[i % 2].local("s", i as u32))
        .collect();
    refused(
        &many,
        "1001 targets are defined; dataplane.target_entries is 1000",
    );

    // More flows than `tm_flow_stats` has entries: 33 on one VIP, 32 on another.
    let mut flows = good.clone();
    flows.vips.push(vip("w", "203.0.113.11"));
    flows.flows = (0..65u16)
        .map(|i| {
            let on = if i < 33 { "v" } else { "w" };
            let mut f = flow(&format!("f{i}"), &[on], "s", &["udp"]);
            f.destination_port_ranges = vec![(1000 + i).to_string()];
            f
        })
        .collect();
    refused(&flows, "65 flows are defined; dataplane.flow_entries is 64");
    datagrams_cross(&lab, "after the refusals");

    // A restart on these pins with a larger space: tm_maglev is replaced,
    // and tm_streams with it (its streams pointed into the old tables).
    let config = std::env::temp_dir().join(format!("{}.toml", unique("tmsizes")));
    std::fs::write(&config, "[dataplane]\nmaglev_entries = 30011\n").unwrap();
    lab.kill_and_start(
        Some(&bigger),
        &["--config".into(), config.display().to_string()],
    );
    let _ = std::fs::remove_file(&config);
    let log = lab.daemon().log_text();
    assert!(
        log.contains("tm_maglev") && log.contains("replacing it with tm_maglev"),
        "{log}"
    );
    wait_until(Duration::from_secs(30), || {
        is_maglev_table(&kernel_table(&pins), 10_009)
    });
    assert!(is_maglev_table(&kernel_table(&pins), 10_009));
    datagrams_cross(&lab, "after the restart");
}
