//! `tapmesh cleanup`: removes a kept dataplane with no daemon running — the
//! pinned XDP links (which detaches them), the TC filters of tapmesh's
//! programs, the clsact qdiscs those leave empty, and the pins.

use std::{collections::HashSet, path::Path};

use aya::programs::{links::PinnedLink, tc::SchedClassifierLink, TcAttachType};
use futures::TryStreamExt;
use tapmesh_common::{program_names as p, SCHEMA_VERSION};

use crate::net::{self, NetError};

/// Every TC program a daemon attaches.
const TC_PROGRAMS: [&str; 7] = [
    p::TC_INGRESS,
    p::TC_EGRESS,
    p::TC_FLOOR,
    p::TC_SERVICE,
    p::TC_TAP_IN,
    p::TC_CONDUIT,
    p::TC_TAP_OUT,
];

/// Other processes holding a map pinned under `dir` (a daemon running with
/// another admin socket than the one checked): from every process's fd
/// info, where a BPF map's fd shows `map_id:`.
pub fn holders(dir: &Path) -> Vec<u32> {
    let ids = pinned_map_ids(dir);
    if ids.is_empty() {
        return Vec::new();
    }
    let mut pids: Vec<u32> = held_maps()
        .into_iter()
        .filter(|(id, _)| ids.contains(id))
        .flat_map(|(_, pids)| pids)
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// The ids of the maps pinned under `dir`.
fn pinned_map_ids(dir: &Path) -> HashSet<u32> {
    super::pins::names()
        .filter_map(|name| aya::maps::MapInfo::from_pin(dir.join(name)).ok())
        .map(|info| info.id())
        .collect()
}

/// The ids of the maps the program with id `program` uses.
fn maps_of(program: u32) -> Vec<u32> {
    aya::programs::loaded_programs()
        .flatten()
        .find(|p| p.id() == program)
        .and_then(|info| info.map_ids().ok().flatten())
        .unwrap_or_default()
}

/// What a kept dataplane left on interfaces the configuration no longer
/// names, removed at start: the XDP links of former uplinks (and their
/// `tm_tc_tap_out`), the full TC programs of former `tc_interfaces`. Only
/// programs on the maps pinned in `pin_dir`: another daemon's stay.
/// Containers', conduits' and taps' programs are their plugins' to restore.
/// What was removed, one line each.
pub fn unconfigured(pin_dir: &Path, uplinks: &[String], tc_interfaces: &[String]) -> Vec<String> {
    let mut removed = Vec::new();
    let mut former_uplinks = Vec::new();
    if let Ok(entries) = std::fs::read_dir(pin_dir.join("links")) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(interface) = name.strip_prefix("xdp_") else {
                continue;
            };
            if uplinks.iter().any(|u| u == interface) {
                continue;
            }
            // Unpinned and dropped, the link goes and the program with it.
            match PinnedLink::from_pin(entry.path()).map(|l| l.unpin()) {
                Ok(Ok(link)) => drop(link),
                _ => {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
            removed.push(format!(
                "XDP link on {interface} detached (no longer an uplink)"
            ));
            former_uplinks.push(interface.to_string());
        }
    }
    let ours = pinned_map_ids(pin_dir);
    let Ok(interfaces) = net::link::all() else {
        return removed;
    };
    for link in interfaces {
        let tc_interface = tc_interfaces.contains(&link.name);
        let former_uplink = former_uplinks.contains(&link.name);
        let mut detached = false;
        for (kind, label) in [
            (TcAttachType::Ingress, "ingress"),
            (TcAttachType::Egress, "egress"),
        ] {
            let stale = |name: &str| match kind {
                TcAttachType::Ingress => {
                    (name == p::TC_INGRESS && !tc_interface)
                        || (name == p::TC_TAP_OUT && former_uplink)
                }
                _ => name == p::TC_EGRESS && !tc_interface,
            };
            let filters = net::qdisc::bpf_filters(&link.name, kind == TcAttachType::Egress)
                .unwrap_or_default();
            for f in filters.iter().filter(|f| stale(&f.name)) {
                let on_our_maps = f
                    .program
                    .is_some_and(|id| maps_of(id).iter().any(|m| ours.contains(m)));
                if !on_our_maps {
                    continue;
                }
                if detach(&link.name, kind, f) {
                    detached = true;
                    removed.push(format!(
                        "TC {label} {} on {} detached (not in the configuration)",
                        f.name, link.name
                    ));
                }
            }
        }
        // As `tapmesh cleanup` does: a qdisc anyone's filter still uses stays.
        if detached && net::qdisc::delete_clsact_if_empty(&link.name).unwrap_or(false) {
            removed.push(format!("clsact on {} removed (left empty)", link.name));
        }
    }
    removed
}

/// Every BPF map another process holds an fd of, with those processes.
fn held_maps() -> std::collections::HashMap<u32, Vec<u32>> {
    let mut held: std::collections::HashMap<u32, Vec<u32>> = Default::default();
    let me = std::process::id();
    let Ok(processes) = std::fs::read_dir("/proc") else {
        return held;
    };
    for p in processes.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fdinfo")) else {
            continue;
        };
        if pid == me {
            continue;
        }
        for fd in fds.flatten() {
            let Ok(text) = std::fs::read_to_string(fd.path()) else {
                continue;
            };
            let id = text.lines().find_map(|line| {
                line.strip_prefix("map_id:")
                    .and_then(|id| id.trim().parse::<u32>().ok())
            });
            if let Some(id) = id {
                let pids = held.entry(id).or_default();
                if !pids.contains(&pid) {
                    pids.push(pid);
                }
            }
        }
    }
    held
}

/// A process that holds a map the program with id `program` uses: the
/// program belongs to a running daemon's dataplane.
fn running_owner(program: u32, held: &std::collections::HashMap<u32, Vec<u32>>) -> Option<u32> {
    let info = aya::programs::loaded_programs()
        .flatten()
        .find(|p| p.id() == program)?;
    info.map_ids()
        .ok()
        .flatten()?
        .iter()
        .find_map(|id| held.get(id).and_then(|pids| pids.first().copied()))
}

/// What was removed, one line each.
pub async fn remove_kept(bpffs_root: &Path) -> Result<Vec<String>, NetError> {
    let mut removed = Vec::new();
    let dir = bpffs_root.join(format!("v{SCHEMA_VERSION}"));
    if let Ok(entries) = std::fs::read_dir(dir.join("links")) {
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            match PinnedLink::from_pin(&path).map(|l| l.unpin()) {
                Ok(Ok(link)) => {
                    drop(link);
                    removed.push(format!("XDP link {name} detached"));
                }
                _ => {
                    let _ = std::fs::remove_file(&path);
                    removed.push(format!("stale link pin {name} removed"));
                }
            }
        }
    }
    // Filters of tapmesh's programs, unless a running daemon's: one whose
    // program uses maps a live process holds belongs to another dataplane.
    let held = held_maps();
    for link in net::link::all()? {
        let mut ours = false;
        for (kind, label) in [
            (TcAttachType::Ingress, "ingress"),
            (TcAttachType::Egress, "egress"),
        ] {
            let filters = net::qdisc::bpf_filters(&link.name, kind == TcAttachType::Egress)
                .unwrap_or_default();
            for f in filters
                .iter()
                .filter(|f| TC_PROGRAMS.contains(&f.name.as_str()))
            {
                if let Some(pid) = f.program.and_then(|id| running_owner(id, &held)) {
                    removed.push(format!(
                        "TC {label} {} on {} left in place: a running daemon's (pid {pid})",
                        f.name, link.name
                    ));
                    continue;
                }
                if detach(&link.name, kind, f) {
                    ours = true;
                    removed.push(format!("TC {label} {} on {} detached", f.name, link.name));
                }
            }
        }
        if ours && filters(link.index).await? == 0 {
            net::qdisc::delete_clsact(&link.name)?;
            removed.push(format!("clsact on {} removed (left empty)", link.name));
        }
    }
    if dir.exists() {
        super::pins::remove(&dir);
        removed.push(match dir.exists() {
            false => format!("pins under {} removed", dir.display()),
            true => format!(
                "pins under {} NOT all removed (files there that are not tapmesh's?)",
                dir.display()
            ),
        });
    }
    Ok(removed)
}

/// Detaches the filter `f` found on `interface`'s hook `kind`; whether it went.
fn detach(interface: &str, kind: TcAttachType, f: &net::qdisc::BpfFilter) -> bool {
    SchedClassifierLink::attached(interface, kind, f.priority, f.handle.into(), None)
        .is_ok_and(|l| aya::programs::links::Link::detach(l).is_ok())
}

/// TC filters left on an interface's clsact (ingress and egress).
async fn filters(ifindex: u32) -> Result<usize, NetError> {
    let handle = net::netlink_here()?;
    let mut count = 0;
    for egress in [false, true] {
        let mut request = handle.traffic_filter(ifindex as i32).get();
        request = if egress {
            request.egress()
        } else {
            request.ingress()
        };
        let found: Vec<_> = request
            .execute()
            .try_collect()
            .await
            .map_err(net::At::here("clsact").nl("listing TC filters"))?;
        count += found.len();
    }
    Ok(count)
}
