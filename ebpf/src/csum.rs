//! One's-complement checksum arithmetic on words in memory order (RFC 1071:
//! the sum does not depend on byte order, so fields are loaded and stored as
//! they lie in the packet).

/// Folds a 64-bit sum of 32-bit words into 16 bits (not complemented).
#[inline(always)]
pub fn fold(mut sum: u64) -> u16 {
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    let mut s = (sum as u32 & 0xffff) + (sum as u32 >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// The difference that turns a sum over `old` words into one over `new`
/// (RFC 1624), as a 32-bit partial sum.
#[inline(always)]
pub fn diff<const N: usize>(old: [u32; N], new: [u32; N]) -> u32 {
    let mut sum = 0u64;
    for i in 0..N {
        sum += (!old[i]) as u64 + new[i] as u64;
    }
    let sum = (sum & 0xffff_ffff) + (sum >> 32);
    ((sum & 0xffff_ffff) + (sum >> 32)) as u32
}

/// A complete checksum field (as stored) after its data changed by `diff`.
#[inline(always)]
pub fn apply(field: u16, diff: u32) -> u16 {
    !fold((!field) as u64 + diff as u64)
}

/// The checksum of `words` (complemented, ready to store).
#[inline(always)]
pub fn of_words<const N: usize>(words: &[u32; N]) -> u16 {
    let mut sum = 0u64;
    for w in words {
        sum += *w as u64;
    }
    !fold(sum)
}
