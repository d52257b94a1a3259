//! Many entries of an array map in one `BPF_MAP_UPDATE_BATCH` call (aya has
//! no batch operations): a Maglev table of 100 000 entries is one syscall
//! instead of 100 000. Kernels without it (before 5.6) get one update per entry.

use std::os::fd::{AsFd, AsRawFd};

use aya::maps::{Array, IterableMap, MapData};

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
/// The kernel's ENOTSUPP (not in libc): the map type has no batch operations.
const ENOTSUPP: i32 = 524;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
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

/// Sets `values[i]` at index `keys[i]`, in order.
pub fn set_many<V: aya::Pod>(
    map: &mut Array<&mut MapData, V>,
    keys: &[u32],
    values: &[V],
) -> std::io::Result<()> {
    let invalid = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, what);
    if keys.len() != values.len() {
        return Err(invalid(format!(
            "{} keys for {} values",
            keys.len(),
            values.len()
        )));
    }
    if let Some(&key) = keys.iter().find(|&&k| k >= map.len()) {
        return Err(invalid(format!(
            "index {key} is past the map's {} entries",
            map.len()
        )));
    }
    if keys.is_empty() {
        return Ok(());
    }
    let count = u32::try_from(keys.len()).map_err(|_| invalid("too many entries".into()))?;
    let fd = map.map().fd().as_fd().as_raw_fd();
    let mut attr = BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count,
        map_fd: fd as u32,
        elem_flags: 0,
        flags: 0,
    };
    // SAFETY: `attr` points at `count` keys and values that outlive the
    // call (`V` is `Pod`, so its bytes are what the map holds); the kernel
    // reads them and writes only `attr.count`.
    let done = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_UPDATE_BATCH,
            &mut attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>(),
        )
    };
    if done == 0 {
        return Ok(());
    }
    let error = std::io::Error::last_os_error();
    match error.raw_os_error() {
        Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) | Some(ENOTSUPP) => {
            for (key, value) in keys.iter().zip(values) {
                map.set(*key, value, 0).map_err(std::io::Error::other)?;
            }
            Ok(())
        }
        _ => Err(error),
    }
}
