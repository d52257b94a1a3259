//! The kernel's notifications of link, address, route, rule and neighbour
//! changes (rtnetlink multicast groups), read on a non-blocking socket of
//! the namespace the watch was started in.

use std::io;
use std::net::IpAddr;
use std::os::fd::AsRawFd;

use rtnetlink::packet_core::NetlinkBuffer;
use rtnetlink::sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use tokio::io::unix::AsyncFd;

use super::NetError;

const RTMGRP_LINK: u32 = 0x1;
const RTMGRP_NEIGH: u32 = 0x4;
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV4_ROUTE: u32 = 0x40;
const RTMGRP_IPV4_RULE: u32 = 0x80;
const RTMGRP_IPV6_IFADDR: u32 = 0x100;
const RTMGRP_IPV6_ROUTE: u32 = 0x400;

const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_NEWNEIGH: u16 = 28;
const RTM_DELNEIGH: u16 = 29;
const RTM_NEWRULE: u16 = 32;
const RTM_DELRULE: u16 = 33;

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
            let groups = RTMGRP_LINK
                | RTMGRP_NEIGH
                | RTMGRP_IPV4_IFADDR
                | RTMGRP_IPV4_ROUTE
                | RTMGRP_IPV4_RULE
                | RTMGRP_IPV6_IFADDR
                | RTMGRP_IPV6_ROUTE;
            socket.bind(&SocketAddr::new(0, groups))?;
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
    let mut at = 0;
    while at < datagram.len() {
        let Ok(message) = NetlinkBuffer::new_checked(&datagram[at..]) else {
            return;
        };
        let length = message.length() as usize;
        let whole = &datagram[at..at + length];
        at += (length + 3) & !3;
        let change = match message.message_type() {
            RTM_NEWLINK | RTM_DELLINK => {
                // struct ifinfomsg: family, pad, type, then the index.
                let payload = message.payload();
                let Some(index) = payload.get(4..8) else {
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
