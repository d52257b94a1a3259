//! `tapmesh cleanup`: removes a kept dataplane with no daemon running — the
//! pinned XDP links (which detaches them), the TC filters of tapmesh's
//! programs, the clsact qdiscs those leave empty, and the pins.

use std::path::Path;

use aya::programs::{links::PinnedLink, tc, TcAttachType};
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
    let ids: std::collections::HashSet<u32> = super::pins::names()
        .filter_map(|name| aya::maps::MapInfo::from_pin(dir.join(name)).ok())
        .map(|info| info.id())
        .collect();
    if ids.is_empty() {
        return Vec::new();
    }
    let me = std::process::id();
    let holds = |fdinfo: &Path| {
        std::fs::read_to_string(fdinfo).is_ok_and(|text| {
            text.lines().any(|line| {
                line.strip_prefix("map_id:")
                    .and_then(|id| id.trim().parse::<u32>().ok())
                    .is_some_and(|id| ids.contains(&id))
            })
        })
    };
    let Ok(processes) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    processes
        .flatten()
        .filter_map(|p| {
            let pid: u32 = p.file_name().to_str()?.parse().ok()?;
            let fds = std::fs::read_dir(p.path().join("fdinfo")).ok()?;
            let held = pid != me && fds.flatten().any(|fd| holds(&fd.path()));
            held.then_some(pid)
        })
        .collect()
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
    for link in net::link::all()? {
        let mut ours = false;
        for name in TC_PROGRAMS {
            for (kind, label) in [
                (TcAttachType::Ingress, "ingress"),
                (TcAttachType::Egress, "egress"),
            ] {
                if tc::qdisc_detach_program(&link.name, kind, name).is_ok() {
                    ours = true;
                    removed.push(format!("TC {label} {name} on {} detached", link.name));
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
        removed.push(format!("pins under {} removed", dir.display()));
    }
    Ok(removed)
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
