//! Small rtnetlink operations the dataplane needs beyond what aya does.

use netlink_packet_route::tc::TcHandle;
use thiserror::Error;

use crate::config::interface_index;

#[derive(Debug, Error)]
pub enum NetlinkError {
    #[error("interface {0:?} does not exist")]
    NoInterface(String),
    #[error("netlink socket: {0}")]
    Socket(#[from] std::io::Error),
    #[error("{0}")]
    Request(#[from] rtnetlink::Error),
}

/// Runs a netlink future from blocking code inside the daemon's runtime, or
/// on a private runtime when there is none.
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => handle.block_on(future),
        Err(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime")
            .block_on(future),
    }
}

/// Deletes the clsact qdisc of `interface` (and with it every TC filter on it).
pub fn delete_clsact(interface: &str) -> Result<(), NetlinkError> {
    let index =
        interface_index(interface).ok_or_else(|| NetlinkError::NoInterface(interface.into()))?;
    block_on(async move {
        let (connection, handle, _) = rtnetlink::new_connection()?;
        let task = tokio::spawn(connection);
        let mut request = handle.qdisc().del(index as i32);
        let header = &mut request.message_mut().header;
        header.parent = TcHandle::CLSACT;
        header.handle = TcHandle {
            major: 0xffff,
            minor: 0,
        };
        let result = request.execute().await;
        task.abort();
        Ok(result?)
    })
}

/// The index and MAC address of an interface in the calling thread's
/// namespace: two ioctls on one socket of that namespace (/sys may belong to
/// another one), no netlink connection.
pub fn interface_mac(interface: &str) -> Result<(u32, [u8; 6]), NetlinkError> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    let missing = || NetlinkError::NoInterface(interface.into());
    let name = interface.as_bytes();
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(&0) {
        return Err(missing());
    }
    // SAFETY: ifreq is plain data; all zeros is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (to, from) in request.ifr_name.iter_mut().zip(name) {
        *to = *from as libc::c_char;
    }
    // SAFETY: a plain socket call; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: `fd` was just opened and nothing else owns it.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let ask = |request: &mut libc::ifreq, what| {
        // SAFETY: `request` is a valid ifreq the kernel reads the name from
        // and writes the answer into.
        if unsafe { libc::ioctl(socket.as_raw_fd(), what, request as *mut libc::ifreq) } < 0 {
            let e = std::io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::ENODEV) => missing(),
                _ => NetlinkError::Socket(e),
            });
        }
        Ok(())
    };
    ask(&mut request, libc::SIOCGIFINDEX)?;
    // SAFETY: SIOCGIFINDEX filled in the index member.
    let index = unsafe { request.ifr_ifru.ifru_ifindex } as u32;
    ask(&mut request, libc::SIOCGIFHWADDR)?;
    // SAFETY: SIOCGIFHWADDR filled in the hardware address member.
    let address = unsafe { request.ifr_ifru.ifru_hwaddr };
    if ![libc::ARPHRD_ETHER, libc::ARPHRD_LOOPBACK].contains(&address.sa_family) {
        return Err(NetlinkError::NoInterface(format!(
            "{interface} (no Ethernet address)"
        )));
    }
    let mut mac = [0u8; 6];
    for (to, from) in mac.iter_mut().zip(address.sa_data) {
        *to = from as u8;
    }
    Ok((index, mac))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_has_index_and_zero_mac_and_missing_interfaces_are_named() {
        let (index, mac) = interface_mac("lo").expect("lo exists in every namespace");
        assert_eq!(Some(index), interface_index("lo"));
        assert_eq!(mac, [0; 6]);
        let e = interface_mac("tm-no-such0").unwrap_err();
        assert_eq!(e.to_string(), "interface \"tm-no-such0\" does not exist");
        assert!(interface_mac("").is_err());
        assert!(interface_mac("name-longer-than-15").is_err());
    }

    #[test]
    fn ethernet_macs_match_sysfs() {
        let Ok(dir) = std::fs::read_dir("/sys/class/net") else {
            return;
        };
        let read = |path: std::path::PathBuf| std::fs::read_to_string(path).unwrap_or_default();
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if read(entry.path().join("type")).trim() != "1" {
                continue;
            }
            let (index, mac) = interface_mac(&name).expect("an Ethernet interface");
            let want = read(entry.path().join("address"));
            let got = mac.map(|b| format!("{b:02x}")).join(":");
            assert_eq!(got, want.trim(), "{name}");
            assert_eq!(read(entry.path().join("ifindex")).trim(), index.to_string());
        }
    }
}
