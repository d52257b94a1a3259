//! Offload switches through the ethtool ioctl (the one ioctl of the daemon).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::{check_ifname, At, NetError};

const ETHTOOL_GFLAGS: u32 = 0x25;
const ETHTOOL_SFLAGS: u32 = 0x26;
const ETHTOOL_GGRO: u32 = 0x2b;
const ETHTOOL_GTXCSUM: u32 = 0x16;
const ETHTOOL_STXCSUM: u32 = 0x17;
const ETHTOOL_SGRO: u32 = 0x2c;
const ETH_FLAG_TXVLAN: u32 = 1 << 7;
const ETHTOOL_GSTRINGS: u32 = 0x1b;
const ETHTOOL_GSSET_INFO: u32 = 0x37;
const ETHTOOL_SFEATURES: u32 = 0x3b;
const ETH_SS_FEATURES: u32 = 4;
const ETH_GSTRING_LEN: usize = 32;
/// The feature the legacy TXVLAN flag leaves on: 802.1ad (S-tag) insertion.
const STAG_TX: &str = "tx-vlan-stag-hw-insert";

/// One `ethtool_value` ioctl (`cmd`, `data`) on `ifname` in the calling
/// thread's namespace; returns the value the kernel left in it (the answer
/// of a GET).
fn ethtool_value(ifname: &str, cmd: u32, data: u32) -> std::io::Result<u32> {
    let mut value = [cmd, data];
    ethtool(ifname, &mut value)?;
    Ok(value[1])
}

/// One ethtool ioctl on `ifname` whose request (its first word the command)
/// and answer are `request`, in 4-byte words as the kernel's structs are.
fn ethtool(ifname: &str, request: &mut [u32]) -> std::io::Result<u32> {
    // SAFETY: a plain socket; the descriptor is owned at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; all zeroes is valid.
    let mut ifreq: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifreq.ifr_name.iter_mut().zip(ifname.as_bytes()) {
        *dst = *src as libc::c_char;
    }
    ifreq.ifr_ifru.ifru_data = request.as_mut_ptr().cast();
    // SAFETY: the request is live and as long as the command's struct (the
    // callers size it); the name is NUL-terminated (callers checked it
    // shorter than IFNAMSIZ).
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCETHTOOL as _, &mut ifreq) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SFEATURES answers what it could not do in a positive value.
    Ok(rc as u32)
}

/// The index of feature `name` in `ifname`'s feature bits (the kernel's
/// own order, which only its string set tells), if the kernel has it, and
/// how many features there are.
fn feature_index(ifname: &str, name: &str) -> std::io::Result<Option<(usize, usize)>> {
    // ethtool_sset_info: cmd, reserved, a 64-bit mask of sets (two words in
    // memory order), one count per set asked.
    let mask = (1u64 << ETH_SS_FEATURES).to_ne_bytes();
    let word = |i: usize| u32::from_ne_bytes([mask[i], mask[i + 1], mask[i + 2], mask[i + 3]]);
    let mut info = [ETHTOOL_GSSET_INFO, 0, word(0), word(4), 0];
    ethtool(ifname, &mut info)?;
    let [a, b] = [info[2].to_ne_bytes(), info[3].to_ne_bytes()];
    let answered = u64::from_ne_bytes([a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3]]);
    if answered & (1 << ETH_SS_FEATURES) == 0 {
        return Ok(None);
    }
    let count = info[4] as usize;
    // ethtool_gstrings: cmd, string set, count, then the names.
    let mut strings = vec![0u32; 3 + count * ETH_GSTRING_LEN / 4];
    strings[..3].copy_from_slice(&[ETHTOOL_GSTRINGS, ETH_SS_FEATURES, count as u32]);
    ethtool(ifname, &mut strings)?;
    let names: Vec<u8> = strings[3..].iter().flat_map(|w| w.to_ne_bytes()).collect();
    let index = names.chunks(ETH_GSTRING_LEN).position(|raw| {
        let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
        &raw[..end] == name.as_bytes()
    });
    Ok(index.map(|i| (i, count)))
}

/// Turns feature bit `index` of `ifname`'s `count` off.
fn feature_off(ifname: &str, index: usize, count: usize) -> std::io::Result<()> {
    // ethtool_sfeatures: cmd, block count (the kernel wants exactly one per
    // 32 of its features), then (valid, requested) per block.
    let blocks = count.div_ceil(32);
    let mut request = vec![0u32; 2 + 2 * blocks];
    request[0] = ETHTOOL_SFEATURES;
    request[1] = blocks as u32;
    request[2 + 2 * (index / 32)] = 1 << (index % 32);
    // ETHTOOL_F_UNSUPPORTED (not changeable here), ETHTOOL_F_WISH (kept on).
    match ethtool(ifname, &mut request)? & 0b11 {
        0 => Ok(()),
        _ => Err(std::io::Error::other(format!(
            "the device keeps {STAG_TX} on (it cannot be turned off here)"
        ))),
    }
}

/// GRO on for `at.ifname` inside `netns` (a veth only receives native-XDP
/// redirected frames while its NAPI runs, which GRO turns on).
pub(crate) fn enable_gro(netns: &File, at: At<'_>) -> Result<(), NetError> {
    check_ifname(at.ifname)?;
    let name = at.ifname.to_string();
    let result = super::netns::run_in(netns, move || {
        ethtool_value(&name, ETHTOOL_SGRO, 1).map(|_| ())
    });
    result.and_then(|r| r).map_err(at.os("enabling GRO"))
}

/// Whether GRO is on for `ifname` in the calling thread's namespace.
pub(crate) fn gro_on(ifname: &str) -> std::io::Result<bool> {
    ethtool_value(ifname, ETHTOOL_GGRO, 0).map(|v| v != 0)
}

/// Turns off TX checksum offload on `ifname` (current namespace); true if
/// it was on. The kernel then finishes a pending L4 checksum, an
/// encapsulated packet's inner one too, before the frame leaves.
pub fn tx_checksum_off(ifname: &str) -> Result<bool, NetError> {
    check_ifname(ifname)?;
    let at = At::here(ifname);
    let on =
        ethtool_value(ifname, ETHTOOL_GTXCSUM, 0).map_err(at.os("reading TX checksum offload"))?;
    if on == 0 {
        return Ok(false);
    }
    ethtool_value(ifname, ETHTOOL_STXCSUM, 0).map_err(at.os("turning off TX checksum offload"))?;
    // A driver may keep a feature it cannot drop and still answer 0.
    match ethtool_value(ifname, ETHTOOL_GTXCSUM, 0).map_err(at.os("reading TX checksum offload"))? {
        0 => Ok(true),
        _ => Err(at.os("turning off TX checksum offload")(
            std::io::Error::other("the driver kept it on"),
        )),
    }
}

/// Turns off TX VLAN offload on `ifname` (current namespace), 802.1Q and
/// 802.1ad, so the kernel writes an offloaded VLAN tag into the frame
/// before it leaves: a veth's XDP side would otherwise see the frame
/// without its tag.
pub fn tx_vlan_offload_off(ifname: &str) -> Result<(), NetError> {
    check_ifname(ifname)?;
    let at = At::here(ifname);
    let flags = ethtool_value(ifname, ETHTOOL_GFLAGS, 0).map_err(at.os("reading offload flags"))?;
    ethtool_value(ifname, ETHTOOL_SFLAGS, flags & !ETH_FLAG_TXVLAN)
        .map(|_| ())
        .map_err(at.os("turning off TX VLAN offload"))?;
    // The legacy flag is 802.1Q's alone; the S-tag's has only a name.
    match feature_index(ifname, STAG_TX).map_err(at.os("reading the feature names"))? {
        Some((index, count)) => {
            feature_off(ifname, index, count).map_err(at.os("turning off 802.1ad TX offload"))
        }
        None => Ok(()),
    }
}
