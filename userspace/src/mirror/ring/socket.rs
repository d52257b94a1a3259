//! The AF_XDP socket of a ring: its UMEM (anonymous memory registered with
//! the kernel), the fill ring every free frame waits in, and the rx ring
//! the kernel puts received frames on.

use std::{
    ffi::CString,
    fmt, io,
    num::NonZeroU32,
    os::fd::RawFd,
    ptr::NonNull,
    time::{Duration, Instant},
};

use serde::Serialize;
use xdpilone::{DeviceQueue, IfInfo, RingRx, Socket, SocketConfig, Umem, UmemConfig};

use super::{errno, RingError};

/// UMEM frames per ring (also the fill and rx ring sizes).
pub const FRAMES: u32 = 8192;
/// Bytes per UMEM frame. In copy mode the kernel keeps 256 bytes of headroom,
/// so the largest frame a ring takes is [`MAX_FRAME`]; longer ones are dropped
/// by the kernel (counted in [`SocketDrops::rx_dropped`]).
pub const FRAME_SIZE: u32 = 2048;
/// The largest frame a ring receives (`FRAME_SIZE` - XDP_PACKET_HEADROOM).
pub const MAX_FRAME: u32 = FRAME_SIZE - 256;
/// How long [`RingSocket::open`] retries while the interface queue is still
/// held by a socket that was just closed.
pub const BUSY_WAIT: Duration = Duration::from_secs(1);

/// Anonymous, page-aligned memory for a UMEM, unmapped on drop.
pub(super) struct Area {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the area is plain memory owned by this value; nothing about it is
// tied to the thread that mapped it.
unsafe impl Send for Area {}

impl Area {
    fn new(len: usize) -> io::Result<Self> {
        // SAFETY: an anonymous private mapping; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave NULL"))?;
        Ok(Area { ptr, len })
    }

    fn slice(&self) -> NonNull<[u8]> {
        NonNull::slice_from_raw_parts(self.ptr, self.len)
    }

    /// The bytes at `offset..offset + len`, if they lie inside the area.
    ///
    /// # Safety
    ///
    /// The kernel must not be writing these bytes (a frame read from the rx
    /// ring and not yet returned to the fill ring).
    pub(super) unsafe fn bytes(&self, offset: u64, len: u32) -> Option<&[u8]> {
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(len as usize)?;
        if end > self.len {
            return None;
        }
        // SAFETY: in bounds (checked above) of a live mapping; no concurrent
        // writer per the caller's promise.
        Some(unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(start), len as usize) })
    }
}

impl Drop for Area {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// An AF_XDP socket (xdpilone, copy mode, XDP_USE_NEED_WAKEUP if available)
/// bound to an interface's queue 0, with its own UMEM of [`FRAMES`] frames of
/// [`FRAME_SIZE`] bytes, every frame not holding a received packet kept in the
/// fill ring.
pub struct RingSocket {
    pub(super) interface: String,
    pub(super) need_wakeup: bool,
    // Field order is drop order: the rings (and with the last of them the
    // socket) go before the memory the UMEM registered.
    pub(super) rx: RingRx,
    pub(super) fill: DeviceQueue,
    pub(super) area: Area,
}

impl fmt::Debug for RingSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RingSocket")
            .field("interface", &self.interface)
            .field("fd", &self.fd())
            .field("need_wakeup", &self.need_wakeup)
            .finish()
    }
}

impl RingSocket {
    /// Creates the socket and binds it to `interface` queue 0 (in the
    /// calling thread's network namespace). Frames arrive once its
    /// [`RingSocket::fd`] is in the XSKMAP slot the XDP program redirects to.
    pub fn open(interface: &str) -> Result<Self, RingError> {
        let no_interface = || RingError::NoInterface {
            interface: interface.into(),
        };
        if crate::net::link::index(interface).is_none() {
            return Err(no_interface());
        }
        let name = CString::new(interface).map_err(|_| no_interface())?;
        let mut flags = SocketConfig::XDP_BIND_COPY | SocketConfig::XDP_BIND_NEED_WAKEUP;
        let deadline = Instant::now() + BUSY_WAIT;
        loop {
            let error = match Self::open_with(interface, &name, flags) {
                Ok(socket) => return Ok(socket),
                Err(e) => e,
            };
            let bind_errno = match &error {
                RingError::Socket {
                    step: "bind",
                    source,
                    ..
                } => source.raw_os_error(),
                _ => None,
            };
            match bind_errno {
                // The queue is released some time after a socket on it is
                // closed (the kernel frees the old UMEM pool in a work item).
                Some(libc::EBUSY) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                // Kernels before 5.4 refuse the need-wakeup flag.
                Some(libc::EINVAL) if flags & SocketConfig::XDP_BIND_NEED_WAKEUP != 0 => {
                    flags = SocketConfig::XDP_BIND_COPY
                }
                _ => return Err(error),
            }
        }
    }

    fn open_with(interface: &str, name: &CString, bind_flags: u16) -> Result<Self, RingError> {
        let fail = |step: &'static str| {
            move |source: io::Error| RingError::Socket {
                interface: interface.into(),
                step,
                source,
            }
        };
        let area = Area::new(FRAMES as usize * FRAME_SIZE as usize)
            .map_err(fail("mapping the UMEM memory"))?;
        let config = UmemConfig {
            fill_size: FRAMES,
            // Nothing is transmitted, but the kernel wants a completion ring.
            complete_size: 64,
            frame_size: FRAME_SIZE,
            headroom: 0,
            flags: 0,
        };
        // SAFETY: `area` is page-aligned (mmap), valid for its length, and
        // outlives every ring of this socket (it is dropped last).
        let umem = unsafe { Umem::new(config, area.slice()) }
            .map_err(|e| fail("registering the UMEM")(errno(e)))?;
        let mut info = IfInfo::invalid();
        info.from_name(name)
            .map_err(|e| fail("looking up the interface")(errno(e)))?;
        info.set_queue(0);
        let socket = Socket::with_shared(&info, &umem)
            .map_err(|e| fail("preparing the socket")(errno(e)))?;
        let mut fill = umem
            .fq_cq(&socket)
            .map_err(|e| fail("creating the fill and completion rings")(errno(e)))?;
        let user = umem
            .rx_tx(
                &socket,
                &SocketConfig {
                    rx_size: NonZeroU32::new(FRAMES),
                    tx_size: None,
                    bind_flags,
                },
            )
            .map_err(|e| fail("creating the rx ring")(errno(e)))?;
        let rx = user
            .map_rx()
            .map_err(|e| fail("mapping the rx ring")(errno(e)))?;
        umem.bind(&user).map_err(|e| fail("bind")(errno(e)))?;
        // Every frame starts in the fill ring.
        let mut writer = fill.fill(FRAMES);
        let filled = writer.insert((0..FRAMES).map(|i| u64::from(i) * u64::from(FRAME_SIZE)));
        writer.commit();
        drop(writer);
        if filled != FRAMES {
            return Err(fail("filling the fill ring")(io::Error::other(format!(
                "only {filled} of {FRAMES} frames fit"
            ))));
        }
        // `umem` and `user` only hold references to the socket, which `rx`
        // and `fill` keep.
        Ok(RingSocket {
            interface: interface.into(),
            need_wakeup: bind_flags & SocketConfig::XDP_BIND_NEED_WAKEUP != 0,
            rx,
            fill,
            area,
        })
    }

    /// The socket's fd, to be put into the XSKMAP by whoever owns the maps
    /// (valid as long as this socket or the ring running it lives).
    pub fn fd(&self) -> RawFd {
        self.rx.as_raw_fd()
    }

    /// The interface the socket is bound to.
    pub fn interface(&self) -> &str {
        &self.interface
    }

    /// The kernel's drop counters of this socket.
    pub fn drops(&self) -> Result<SocketDrops, RingError> {
        let s = self.fill.statistics_v2().map_err(|e| RingError::Socket {
            interface: self.interface.clone(),
            step: "reading XDP_STATISTICS",
            source: errno(e),
        })?;
        Ok(SocketDrops {
            rx_dropped: s.rx_dropped,
            rx_ring_full: s.rx_ring_full,
            fill_ring_empty: s.rx_fill_ring_empty_descs,
        })
    }
}

// The receive thread takes the socket.
const _: () = {
    const fn assert_send<T: Send>() {}
    assert_send::<RingSocket>();
};

/// What the kernel could not put into a ring's socket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SocketDrops {
    /// Frames dropped, e.g. longer than [`MAX_FRAME`].
    pub rx_dropped: u64,
    /// Frames dropped because the rx ring was full (the receive loop fell behind).
    pub rx_ring_full: u64,
    /// Times the fill ring was empty when a frame came.
    pub fill_ring_empty: u64,
}
