//! The daemon namespace's neighbour table, kept in memory: dumped once,
//! then followed through the kernel's neighbour notifications, which are
//! read (without blocking) just before each lookup. A notification is queued
//! on the socket before the change that caused it returns, so a lookup sees
//! every change made before it, as a dump would; a dump of a table of
//! 10 000 entries costs about 5 ms, a catch-up only the changes since.
//!
//! Kept only for the namespace [`keep`] was called in (a socket holds its
//! namespace alive); resolvers in other namespaces dump as before. The
//! kernel creates some entries without a notification (NOARP ones, and
//! INCOMPLETE ones on first use), so a resolver dumps when an address it
//! wants is missing here.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use libc::{RTM_DELNEIGH, RTM_NEWNEIGH};
use netlink_packet_route::neighbour::NeighbourMessage;
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use super::neigh::parse_neighbour;
use super::socket::{messages, Netlink};

/// `struct nlmsghdr`, before the `ndmsg`.
const NLMSG_HEADER: usize = 16;
/// `NTF_PROXY` in `ndmsg.ndm_flags`.
const NTF_PROXY: u8 = 0x08;

/// (interface index, address) → (NUD state, link-layer address).
pub(crate) type Entries = HashMap<(u32, IpAddr), (u16, Vec<u8>)>;

struct Kept {
    /// The namespace (inode of its nsfs file) the table is of.
    netns: u64,
    notifications: Socket,
    entries: Entries,
    buffer: Vec<u8>,
}

static KEPT: Mutex<Option<Kept>> = Mutex::new(None);
/// Dumps after lost notifications, since the process started.
static REDUMPS: AtomicU64 = AtomicU64::new(0);
/// Bumped whenever an entry's usable MAC ([`super::neigh::usable`]) may
/// have changed: an entry added, removed or changed that is or was
/// usable, and every dump. A state change that keeps the MAC usable
/// (REACHABLE, STALE, DELAY, PROBE) does not bump it.
static GENERATION: AtomicU64 = AtomicU64::new(0);

/// The kept table's generation; read inside [`with`] (after its catch-up)
/// to know whether resolutions made under an earlier one still hold.
pub(crate) fn generation() -> u64 {
    GENERATION.load(Ordering::Relaxed)
}

/// How often notifications were lost and the table dumped again.
pub fn redumps() -> u64 {
    REDUMPS.load(Ordering::Relaxed)
}

/// The inode of the calling thread's network namespace.
fn current_netns() -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata("/proc/thread-self/ns/net")?.ino())
}

/// Keeps the neighbour table of the calling thread's namespace from now on.
pub fn keep() -> io::Result<()> {
    let netns = current_netns()?;
    let mut kept = KEPT.lock().unwrap_or_else(|p| p.into_inner());
    if kept.as_ref().is_some_and(|k| k.netns == netns) {
        return Ok(());
    }
    let mut notifications = Socket::new(NETLINK_ROUTE)?;
    notifications.bind(&SocketAddr::new(0, libc::RTMGRP_NEIGH as u32))?;
    // Changes between two lookups should fit; an overflow means a new dump.
    let _ = notifications.set_rx_buf_sz(4 << 20);
    notifications.set_non_blocking(true)?;
    // Subscribed before the dump: a change during it is also notified.
    let entries = dump()?;
    GENERATION.fetch_add(1, Ordering::Relaxed);
    *kept = Some(Kept {
        netns,
        notifications,
        entries,
        buffer: Vec::with_capacity(64 * 1024),
    });
    Ok(())
}

/// Runs `f` on the kept table brought up to date, when the calling thread
/// is in the kept namespace; `None` otherwise (or when following failed:
/// the table is dropped and the caller dumps).
pub(crate) fn with<R>(f: impl FnOnce(&Entries) -> R) -> Option<R> {
    let netns = current_netns().ok()?;
    let mut guard = KEPT.lock().unwrap_or_else(|p| p.into_inner());
    let kept = guard.as_mut().filter(|k| k.netns == netns)?;
    if let Err(e) = kept.catch_up() {
        // Start over from a dump; if that fails too, this caller dumps and
        // the next one tries again.
        let again = kept.discard_queued().and_then(|()| dump());
        match again {
            Ok(entries) => {
                kept.entries = entries;
                GENERATION.fetch_add(1, Ordering::Relaxed);
            }
            Err(e2) => {
                tracing::warn!("the kept neighbour table is behind ({e}; dumping it: {e2})");
                return None;
            }
        }
    }
    Some(f(&kept.entries))
}

impl Kept {
    /// Applies every queued notification; after an overflow, dumps again.
    fn catch_up(&mut self) -> io::Result<()> {
        loop {
            self.buffer.clear();
            match self.notifications.recv(&mut self.buffer, 0) {
                Ok(n) => {
                    let n = n.min(self.buffer.len());
                    apply(&self.buffer[..n], &mut self.entries);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    // Notifications were lost: what is still queued may be
                    // older than a dump, so it goes first, then the dump,
                    // then whatever comes after it (never older than it).
                    tracing::info!("neighbour notifications were lost; dumping the table again");
                    self.discard_queued()?;
                    self.entries = dump()?;
                    GENERATION.fetch_add(1, Ordering::Relaxed);
                    REDUMPS.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    let fd = self.notifications.as_raw_fd();
                    return Err(io::Error::new(
                        e.kind(),
                        format!("reading neighbour notifications (fd {fd}): {e}"),
                    ));
                }
            }
        }
    }
}

impl Kept {
    fn discard_queued(&mut self) -> io::Result<()> {
        loop {
            self.buffer.clear();
            match self.notifications.recv(&mut self.buffer, 0) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// Every neighbour entry of the calling thread's namespace.
fn dump() -> io::Result<Entries> {
    let mut entries = Entries::new();
    let mut request = NeighbourMessage::default();
    request.header.family = AddressFamily::Unspec;
    Netlink::route()?.dump(RouteNetlinkMessage::GetNeighbour(request), |kind, bytes| {
        if kind == RTM_NEWNEIGH {
            if let Some((ifindex, address, state, lladdr)) = parse_neighbour(bytes) {
                entries.insert((ifindex, address), (state, lladdr.to_vec()));
            }
        }
    })?;
    Ok(entries)
}

/// The neighbour changes of one datagram.
fn apply(datagram: &[u8], entries: &mut Entries) {
    for (kind, whole) in messages(datagram) {
        // Only ARP and ND entries, as a dump has them: not the bridge's
        // forwarding entries nor proxy entries, which share the group.
        let ndmsg = whole.get(NLMSG_HEADER..).unwrap_or_default();
        let family = ndmsg.first().copied().map(i32::from);
        let flags = ndmsg.get(10).copied().unwrap_or(0);
        if !matches!(family, Some(libc::AF_INET | libc::AF_INET6)) || flags & NTF_PROXY != 0 {
            continue;
        }
        let Some((ifindex, address, state, lladdr)) = parse_neighbour(whole) else {
            continue;
        };
        let usable = |(state, lladdr): &(u16, Vec<u8>)| super::neigh::usable(*state, lladdr);
        let changed = match kind {
            RTM_NEWNEIGH => {
                let old = entries.insert((ifindex, address), (state, lladdr.to_vec()));
                old.as_ref().and_then(usable) != super::neigh::usable(state, lladdr)
            }
            RTM_DELNEIGH => entries
                .remove(&(ifindex, address))
                .is_some_and(|old| usable(&old).is_some()),
            _ => false,
        };
        if changed {
            GENERATION.fetch_add(1, Ordering::Relaxed);
        }
    }
}
