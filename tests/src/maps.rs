//! Every pinned tapmesh map, byte for byte (keys and values as the kernel
//! holds them): what "the maps" are when a test says a refused change left
//! them as they were. Arrays are read in batches (`tm_maglev` has 4M
//! entries), other maps key by key.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;

use aya::maps::{MapInfo, MapType};

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// `union bpf_attr` for element commands.
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value_or_next: u64,
    flags: u64,
}

/// `union bpf_attr` for batch commands.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<()> {
    // SAFETY: `attr` is a valid `union bpf_attr` prefix of the given size.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            size_of::<T>() as u32,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// One map's contents: key bytes → value bytes (all CPUs for per-CPU maps).
pub type Entries = BTreeMap<Vec<u8>, Vec<u8>>;

/// A map's contents, or why it has none to compare (ring buffers, sockets).
#[derive(Debug, PartialEq, Eq)]
pub enum Dump {
    /// Hash maps and tries.
    Entries(Entries),
    /// An array's values one after the other, from index 0.
    Array {
        value_size: usize,
        values: Vec<u8>,
    },
    Unreadable(String),
}

/// Every map pinned directly in `dir` (links live in a subdirectory), by name.
pub fn dump_pinned(dir: &Path) -> BTreeMap<String, Dump> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            continue;
        }
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let info = MapInfo::from_pin(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        out.insert(name, dump(&info));
    }
    out
}

fn dump(info: &MapInfo) -> Dump {
    let kind = info.map_type().expect("map type");
    let per_cpu = matches!(
        kind,
        MapType::PerCpuArray | MapType::PerCpuHash | MapType::LruPerCpuHash
    );
    let cpus = if per_cpu {
        aya::util::nr_cpus().expect("possible CPUs")
    } else {
        1
    };
    let value_size = if per_cpu {
        (info.value_size() as usize).div_ceil(8) * 8 * cpus
    } else {
        info.value_size() as usize
    };
    let key_size = info.key_size() as usize;
    let fd = info.fd().expect("map fd");
    let fd = fd.as_fd().as_raw_fd() as u32;
    match kind {
        MapType::RingBuf | MapType::XskMap | MapType::ProgramArray | MapType::DevMap => {
            return Dump::Unreadable(format!("{kind:?}"));
        }
        MapType::Array | MapType::PerCpuArray => {
            return Dump::Array {
                value_size,
                values: array(fd, info.max_entries(), value_size),
            };
        }
        _ => {}
    }
    let mut entries = Entries::new();
    let mut key: Option<Vec<u8>> = None;
    loop {
        let mut next = vec![0u8; key_size];
        let mut attr = ElemAttr {
            map_fd: fd,
            key: key.as_ref().map_or(0, |k| k.as_ptr() as u64),
            value_or_next: next.as_mut_ptr() as u64,
            ..Default::default()
        };
        match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Err(e) => return Dump::Unreadable(format!("{kind:?}: next key: {e}")),
        }
        let mut value = vec![0u8; value_size];
        let mut attr = ElemAttr {
            map_fd: fd,
            key: next.as_ptr() as u64,
            value_or_next: value.as_mut_ptr() as u64,
            ..Default::default()
        };
        match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
            Ok(()) => {
                entries.insert(next.clone(), value);
            }
            // Removed between the two calls: not a state a test compares.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Dump::Unreadable(format!("{kind:?}: lookup: {e}")),
        }
        key = Some(next);
    }
    Dump::Entries(entries)
}

fn array(fd: u32, len: u32, value_size: usize) -> Vec<u8> {
    const CHUNK: u32 = 65_536;
    let mut all = Vec::with_capacity(len as usize * value_size);
    let mut next = 0u32;
    let mut token = 0u32;
    let mut first = true;
    loop {
        let mut keys = vec![0u32; CHUNK as usize];
        let mut values = vec![0u8; CHUNK as usize * value_size];
        let mut out = 0u32;
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                &token as *const u32 as u64
            },
            out_batch: &mut out as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: CHUNK,
            map_fd: fd,
            ..Default::default()
        };
        let result = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let done = match &result {
            Ok(()) => false,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
            Err(e) => panic!("batch lookup: {e}"),
        };
        for (i, &key) in keys.iter().take(attr.count as usize).enumerate() {
            assert_eq!(key, next, "array entries come in order");
            next += 1;
            all.extend_from_slice(&values[i * value_size..(i + 1) * value_size]);
        }
        if done {
            break;
        }
        token = out;
        first = false;
    }
    assert_eq!(next, len, "every array entry read");
    all
}

/// The names of the maps whose contents differ, with the first differing key.
pub fn differences(a: &BTreeMap<String, Dump>, b: &BTreeMap<String, Dump>) -> Vec<String> {
    let mut out = Vec::new();
    for name in a.keys().chain(b.keys().filter(|k| !a.contains_key(*k))) {
        match (a.get(name), b.get(name)) {
            (Some(Dump::Entries(x)), Some(Dump::Entries(y))) if x != y => {
                let key = x
                    .iter()
                    .find(|(k, v)| y.get(*k) != Some(*v))
                    .or_else(|| y.iter().find(|(k, _)| !x.contains_key(*k)))
                    .map(|(k, _)| k.clone());
                out.push(format!("{name} (first differing key {key:02x?})"));
            }
            (
                Some(Dump::Array {
                    value_size,
                    values: x,
                }),
                Some(Dump::Array { values: y, .. }),
            ) if x != y => {
                let at = x.iter().zip(y.iter()).position(|(a, b)| a != b);
                let index = at.map(|i| i / value_size);
                out.push(format!("{name} (first differing index {index:?})"));
            }
            (x, y) if x != y => out.push(format!("{name}: {x:?} / {y:?}")),
            _ => {}
        }
    }
    out
}
