//! The one bounds check every header access goes through.

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
    #[allow(dead_code)]
    pub fn header_mut<T>(&self, offset: usize, missing: DropReason) -> Result<*mut T, DropReason> {
        self.header::<T>(offset, missing).map(|p| p as *mut T)
    }
}
