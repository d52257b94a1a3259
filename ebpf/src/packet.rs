//! The one bounds check every header access goes through, and the word
//! loads and stores used on the bytes it hands out.

use tapmesh_common::DropReason;

/// The bytes of a packet the program may read directly, `[start, end)`, and
/// the packet's whole length on the wire (a plain number the verifier can
/// compare header lengths against, unlike `end - start`).
#[derive(Copy, Clone)]
pub struct Packet {
    pub start: usize,
    pub end: usize,
    pub wire_len: usize,
}

impl Packet {
    #[inline(always)]
    pub fn new(start: usize, end: usize, wire_len: usize) -> Self {
        Self {
            start,
            end,
            wire_len,
        }
    }

    /// A pointer to a `T` at `offset`, or `missing` when the packet is too short.
    #[inline(always)]
    pub fn header<T>(&self, offset: usize, missing: DropReason) -> Result<*const T, DropReason> {
        let at = self.start + offset;
        if at + core::mem::size_of::<T>() > self.end {
            return Err(missing);
        }
        Ok(at as *const T)
    }

    /// Like [`Packet::header`], for writing.
    #[inline(always)]
    pub fn header_mut<T>(&self, offset: usize, missing: DropReason) -> Result<*mut T, DropReason> {
        self.header::<T>(offset, missing).map(|p| p as *mut T)
    }
}

// Word access to header fields. Headers are byte arrays (alignment 1), which
// LLVM's BPF target reads and writes byte by byte: four loads, shifts and ORs
// for one address word. These helpers access the field as one word instead.
// Packet fields are often not word aligned (the IP header starts at 14); the
// verifier checks packet alignment only under BPF_F_STRICT_ALIGNMENT, which
// the loader does not set, and the JITs of hosts with efficient unaligned
// access (x86-64, arm64) emit plain loads and stores. Words are in memory
// order (`from_ne_bytes` of the bytes), so comparing or hashing them is
// comparing or hashing the bytes.

/// The 4 bytes at `p` as one load.
///
/// # Safety
/// `p` is inside a header [`Packet::header`] returned, or a map value.
#[inline(always)]
pub unsafe fn load32(p: *const [u8; 4]) -> u32 {
    unsafe { core::ptr::read(p as *const u32) }
}

/// The 2 bytes at `p` as one load.
///
/// # Safety
/// As [`load32`].
#[inline(always)]
pub unsafe fn load16(p: *const [u8; 2]) -> u16 {
    unsafe { core::ptr::read(p as *const u16) }
}

/// Writes 4 bytes at `p` with one store.
///
/// # Safety
/// `p` is inside a header [`Packet::header_mut`] returned.
#[inline(always)]
pub unsafe fn store32(p: *mut [u8; 4], v: u32) {
    unsafe { core::ptr::write(p as *mut u32, v) }
}

/// Writes 2 bytes at `p` with one store.
///
/// # Safety
/// As [`store32`].
#[inline(always)]
pub unsafe fn store16(p: *mut [u8; 2], v: u16) {
    unsafe { core::ptr::write(p as *mut u16, v) }
}
