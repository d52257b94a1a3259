//! TAP devices (a VM's network card on the host side). The kernel makes
//! them only through /dev/net/tun, not rtnetlink: one open and two ioctls.

use std::os::fd::AsRawFd;

use super::NetError;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

/// Creates a persistent TAP device `name` in the calling thread's namespace
/// (it stays when our descriptor closes; a VM opens it by name).
pub fn add_persistent(name: &str) -> Result<(), NetError> {
    super::check_ifname(name)?;
    let fail = |what: &str| NetError::kernel(format!("{what} TAP device {name}"));
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(fail("opening /dev/net/tun for"))?;
    // SAFETY: ifreq is plain old data; zeroed is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *slot = byte as libc::c_char;
    }
    request.ifr_ifru.ifru_flags = IFF_TAP | IFF_NO_PI;
    // SAFETY: a tun descriptor and a valid ifreq.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &mut request) } != 0 {
        return Err(fail("creating")(std::io::Error::last_os_error()));
    }
    // SAFETY: TUNSETPERSIST takes an integer argument.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETPERSIST, 1 as libc::c_ulong) } != 0 {
        return Err(fail("keeping")(std::io::Error::last_os_error()));
    }
    Ok(())
}
