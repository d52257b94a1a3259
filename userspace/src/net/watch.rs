//! The kernel's notifications of link, address, route, rule and neighbour
//! changes (rtnetlink multicast groups), read on a non-blocking socket of
//! the namespace the watch was started in.

use std::io;
use std::net::IpAddr;
use std::os::fd::AsRawFd;

use libc::{
    RTM_DELADDR, RTM_DELLINK, RTM_DELNEIGH, RTM_DELROUTE, RTM_DELRULE, RTM_NEWADDR, RTM_NEWLINK,
    RTM_NEWNEIGH, RTM_NEWROUTE, RTM_NEWRULE,
};
use rtnetlink::sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use tokio::io::unix::AsyncFd;

use super::NetError;

/// One change the kernel reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// A link appeared, changed (state, address, MTU) or went.
    Link { index: u32 },
    /// An address, route or policy rule changed.
    Routing,
    /// A neighbour entry changed (state or link-layer address) or went.
    Neighbour { ifindex: u32, address: IpAddr },
    /// Notifications were lost (the socket's buffer overflowed): anything
    /// may have changed.
    Lost,
}

pub struct Watch {
    socket: AsyncFd<Socket>,
    buffer: Vec<u8>,
    pending: std::collections::VecDeque<Change>,
}

impl Watch {
    /// Starts watching links, addresses, routes and rules (IPv4 and IPv6)
    /// and neighbours in the calling thread's namespace. Needs a Tokio runtime.
    pub fn start() -> Result<Self, NetError> {
        let failed = NetError::kernel("watching the kernel's network notifications");
        let open = || -> io::Result<AsyncFd<Socket>> {
            let mut socket = Socket::new(NETLINK_ROUTE)?;
            let groups = libc::RTMGRP_LINK
                | libc::RTMGRP_NEIGH
                | libc::RTMGRP_IPV4_IFADDR
                | libc::RTMGRP_IPV4_ROUTE
                | libc::RTMGRP_IPV4_RULE
                | libc::RTMGRP_IPV6_IFADDR
                | libc::RTMGRP_IPV6_ROUTE;
            // The group bits (libc has them as c_int) are all positive.
            socket.bind(&SocketAddr::new(0, groups as u32))?;
            // Bursts (many links at once) should fit; a loss is still noticed.
            let _ = socket.set_rx_buf_sz(1 << 20);
            socket.set_non_blocking(true)?;
            // SAFETY: the socket owns its descriptor and stays inside the
            // AsyncFd until both are dropped together.
            unsafe { AsyncFd::register_with_interest(socket, tokio::io::Interest::READABLE) }
                .map_err(|e| e.into_parts().1)
        };
        Ok(Self {
            socket: open().map_err(failed)?,
            buffer: Vec::with_capacity(64 * 1024),
            pending: Default::default(),
        })
    }

    /// The next change.
    pub async fn next(&mut self) -> Result<Change, NetError> {
        loop {
            if let Some(change) = self.pending.pop_front() {
                return Ok(change);
            }
            let mut guard = self
                .socket
                .readable()
                .await
                .map_err(NetError::kernel("waiting for notifications"))?;
            self.buffer.clear();
            let read = guard.try_io(|s| s.get_ref().recv(&mut self.buffer, 0));
            match read {
                Err(_would_block) => continue,
                Ok(Ok(n)) => {
                    let n = n.min(self.buffer.len());
                    parse(&self.buffer[..n], &mut self.pending);
                }
                Ok(Err(e)) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    return Ok(Change::Lost);
                }
                Ok(Err(e)) => {
                    let fd = self.socket.get_ref().as_raw_fd();
                    return Err(NetError::kernel(format!("reading notifications (fd {fd})"))(e));
                }
            }
        }
    }
}

/// The changes in one datagram.
fn parse(datagram: &[u8], out: &mut std::collections::VecDeque<Change>) {
    for (kind, whole) in super::socket::messages(datagram) {
        let change = match kind {
            RTM_NEWLINK | RTM_DELLINK => {
                // struct ifinfomsg after the 16-byte header: family, pad,
                // type, then the index.
                let Some(index) = whole.get(20..24) else {
                    continue;
                };
                Change::Link {
                    index: u32::from_ne_bytes(index.try_into().expect("4 bytes")),
                }
            }
            RTM_NEWADDR | RTM_DELADDR | RTM_NEWROUTE | RTM_DELROUTE | RTM_NEWRULE | RTM_DELRULE => {
                Change::Routing
            }
            RTM_NEWNEIGH | RTM_DELNEIGH => match super::neigh::parse_neighbour(whole) {
                Some((ifindex, address, _, _)) => Change::Neighbour { ifindex, address },
                None => continue,
            },
            _ => continue,
        };
        // Runs of the same change collapse into one.
        if out.back() != Some(&change) {
            out.push_back(change);
        }
    }
}
