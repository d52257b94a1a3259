//! `tapmesh bpf maps`: what each pinned map costs in kernel memory, as the
//! kernel itself charges it (the `memlock` line of the map's fdinfo, which
//! bpftool shows as `bytes_memlock`).

use std::{
    os::fd::{AsFd, AsRawFd},
    path::Path,
};

use aya::maps::{MapInfo, MapType};
use serde::Serialize;

use super::inspect::InspectError;

/// One pinned map.
#[derive(Debug, Serialize)]
pub struct MapMemory {
    pub name: &'static str,
    /// The kernel's name of the map type, as bpftool prints it.
    pub kind: String,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    /// One copy of every value per possible CPU.
    pub per_cpu: bool,
    /// Bytes the kernel charges for the map.
    pub memlock: u64,
}

/// Every pinned map, the total, and the total on a machine with
/// `estimate_cpus` possible CPUs (the per-CPU maps scaled).
#[derive(Debug, Serialize)]
pub struct MapsMemory {
    pub maps: Vec<MapMemory>,
    pub total: u64,
    /// The part of `total` in per-CPU maps.
    pub per_cpu_total: u64,
    pub possible_cpus: u32,
    pub estimate_cpus: u32,
    pub estimate_total: u64,
}

fn kind(t: MapType) -> String {
    let known = match t {
        MapType::Array => "array",
        MapType::Hash => "hash",
        MapType::LruHash => "lru_hash",
        MapType::LpmTrie => "lpm_trie",
        MapType::PerCpuArray => "percpu_array",
        MapType::PerCpuHash => "percpu_hash",
        MapType::LruPerCpuHash => "lru_percpu_hash",
        MapType::RingBuf => "ringbuf",
        MapType::XskMap => "xskmap",
        MapType::ProgramArray => "prog_array",
        other => return format!("{other:?}"),
    };
    known.to_string()
}

/// The `memlock:` bytes of an open map, from this process's fdinfo.
fn memlock(info: &MapInfo) -> Result<u64, String> {
    let fd = info.fd().map_err(|e| e.to_string())?;
    let path = format!("/proc/self/fdinfo/{}", fd.as_fd().as_raw_fd());
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| format!("{path} has no memlock line"))
}

/// Reads every map pinned in `dir`; `estimate_cpus` of 0 means this machine's count.
pub fn maps(dir: &Path, estimate_cpus: u32) -> Result<MapsMemory, InspectError> {
    let mut maps = Vec::new();
    for name in super::pins::names() {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let err = |message: String| InspectError::Map { name, message };
        let info = MapInfo::from_pin(&path).map_err(|e| err(e.to_string()))?;
        let map_type = info.map_type().map_err(|e| err(e.to_string()))?;
        maps.push(MapMemory {
            name,
            kind: kind(map_type),
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
            per_cpu: matches!(
                map_type,
                MapType::PerCpuArray | MapType::PerCpuHash | MapType::LruPerCpuHash
            ),
            memlock: memlock(&info).map_err(err)?,
        });
    }
    maps.sort_by(|a, b| b.memlock.cmp(&a.memlock).then(a.name.cmp(b.name)));
    let total = maps.iter().map(|m| m.memlock).sum();
    let per_cpu_total: u64 = maps.iter().filter(|m| m.per_cpu).map(|m| m.memlock).sum();
    let possible_cpus = aya::util::nr_cpus().map_or(1, |n| n as u32).max(1);
    let estimate_cpus = if estimate_cpus == 0 {
        possible_cpus
    } else {
        estimate_cpus
    };
    let estimate_total =
        total - per_cpu_total + per_cpu_total * u64::from(estimate_cpus) / u64::from(possible_cpus);
    Ok(MapsMemory {
        maps,
        total,
        per_cpu_total,
        possible_cpus,
        estimate_cpus,
        estimate_total,
    })
}
