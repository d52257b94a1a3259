//! An array map mapped into the daemon's memory (`BPF_F_MMAPABLE`), for
//! `tm_maglev`: a table of 100 000 entries is one pass over memory (tens of
//! µs) where a batch update takes about 25 ms (the kernel copies and
//! updates entry by entry).

use std::{
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
    sync::atomic::{fence, Ordering},
};

use aya::maps::MapData;
use tapmesh_common::lb::MAGLEV_MAP_FLAGS as MMAPABLE;

/// A writable shared mapping of a whole u32 array map.
pub struct MappedArray {
    base: NonNull<u8>,
    bytes: usize,
    entries: u32,
    /// Bytes between two entries (values are rounded up to 8 bytes).
    stride: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value; writes go
// through `&mut self`.
unsafe impl Send for MappedArray {}

impl std::fmt::Debug for MappedArray {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MappedArray({} entries)", self.entries)
    }
}

impl MappedArray {
    /// Maps `map`, a u32 array created `BPF_F_MMAPABLE`.
    pub fn new(map: &MapData) -> Result<Self, String> {
        let info = map.info().map_err(|e| e.to_string())?;
        if info.map_flags() & MMAPABLE == 0 {
            return Err("the map was created without BPF_F_MMAPABLE".into());
        }
        if info.value_size() != 4 {
            return Err(format!("values of {} bytes, not 4", info.value_size()));
        }
        let entries = info.max_entries();
        // The kernel rounds array values up to 8 bytes.
        let stride = (info.value_size() as usize).next_multiple_of(8);
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let bytes = (entries as usize * stride).div_ceil(page) * page;
        let fd = map.fd().as_fd().as_raw_fd();
        // SAFETY: a fresh shared mapping of the map's fd; nothing else
        // refers to the address range it returns.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(format!("mmap: {}", std::io::Error::last_os_error()));
        }
        let base = NonNull::new(addr.cast()).ok_or("mmap returned null")?;
        Ok(Self {
            base,
            bytes,
            entries,
            stride,
        })
    }

    /// Writes `values` to entries `first`, `first + 1`, …; programs see
    /// each entry change whole (aligned 4-byte stores).
    pub fn write(&mut self, first: u32, values: &[u32]) -> Result<(), String> {
        let end = u64::from(first) + values.len() as u64;
        if end > u64::from(self.entries) {
            return Err(format!(
                "entries {first}..{end} are past the map's {}",
                self.entries
            ));
        }
        for (i, value) in values.iter().enumerate() {
            let offset = (first as usize + i) * self.stride;
            // SAFETY: offset + 4 <= entries * stride <= bytes (checked
            // above), and the mapping is 8-aligned.
            unsafe {
                self.base
                    .as_ptr()
                    .add(offset)
                    .cast::<u32>()
                    .write_volatile(*value)
            };
        }
        // The table is whole before whatever publishes it is written.
        fence(Ordering::SeqCst);
        Ok(())
    }
}

impl Drop for MappedArray {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.bytes) };
    }
}
