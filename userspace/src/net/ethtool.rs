//! Offload switches through the ethtool ioctl (the one ioctl of the daemon).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::{check_ifname, At, NetError};

const ETHTOOL_GFLAGS: u32 = 0x25;
const ETHTOOL_SFLAGS: u32 = 0x26;
const ETHTOOL_SGRO: u32 = 0x2c;
const ETH_FLAG_TXVLAN: u32 = 1 << 7;

/// One `ethtool_value` ioctl (`cmd`, `data`) on `ifname` in the calling
/// thread's namespace; returns the value the kernel left in it (the answer
/// of a GET).
fn ethtool_value(ifname: &str, cmd: u32, data: u32) -> std::io::Result<u32> {
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    // SAFETY: a plain socket; the descriptor is owned at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut value = EthtoolValue { cmd, data };
    // SAFETY: ifreq is plain data; all zeroes is valid.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in request.ifr_name.iter_mut().zip(ifname.as_bytes()) {
        *dst = *src as libc::c_char;
    }
    request.ifr_ifru.ifru_data = (&mut value as *mut EthtoolValue).cast();
    // SAFETY: the request points at a live ethtool_value; the name is NUL-terminated
    // (callers checked it shorter than IFNAMSIZ).
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCETHTOOL as _, &mut request) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(value.data)
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

/// Turns off TX VLAN offload on `ifname` (current namespace), so the kernel
/// writes an offloaded VLAN tag into the frame before it leaves: a veth's
/// XDP side would otherwise see the frame without its tag.
pub fn tx_vlan_offload_off(ifname: &str) -> Result<(), NetError> {
    check_ifname(ifname)?;
    let at = At::here(ifname);
    let flags = ethtool_value(ifname, ETHTOOL_GFLAGS, 0).map_err(at.os("reading offload flags"))?;
    ethtool_value(ifname, ETHTOOL_SFLAGS, flags & !ETH_FLAG_TXVLAN)
        .map(|_| ())
        .map_err(at.os("turning off TX VLAN offload"))
}
