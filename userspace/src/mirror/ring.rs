//! AF_XDP mirror rings: the copies `tm_xdp_mirror` redirects into an XSKMAP
//! slot are read here from an AF_XDP socket (copy mode) and fanned out to
//! consumers, each behind its own bounded queue and thread, so a slow
//! consumer loses its own copies and never slows the ring or the others.
//!
//! ```text
//!  ring veth peer ──XDP redirect──▶ RingSocket (UMEM, rx ring, fill ring)
//!                                      │ receive thread: copy out, refill
//!                       ┌──────────────┼──────────────┐  bounded queue each
//!                       ▼              ▼              ▼
//!                 pcap file       AF_PACKET out     …  (one thread each)
//! ```

use std::{
    ffi::CString,
    fmt, io,
    num::NonZeroU32,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    path::PathBuf,
    ptr::NonNull,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc::{self, RecvTimeoutError, SyncSender, TrySendError},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime},
};

use serde::Serialize;
use thiserror::Error;
use xdpilone::{DeviceQueue, Errno, IfInfo, RingRx, Socket, SocketConfig, Umem, UmemConfig};

use super::pcap::PcapWriter;

/// UMEM frames per ring (also the fill and rx ring sizes).
pub const FRAMES: u32 = 4096;
/// Bytes per UMEM frame. In copy mode the kernel keeps 256 bytes of headroom,
/// so the largest frame a ring takes is [`MAX_FRAME`]; longer ones are dropped
/// by the kernel (counted in [`SocketDrops::rx_dropped`]).
pub const FRAME_SIZE: u32 = 2048;
/// The largest frame a ring receives (`FRAME_SIZE` - XDP_PACKET_HEADROOM).
pub const MAX_FRAME: u32 = FRAME_SIZE - 256;
/// Frames each consumer's queue holds before it loses copies.
pub const QUEUE_DEPTH: usize = 4096;
/// How often a pcap consumer writes out what it buffered (at most this long).
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// How long [`RingSocket::open`] retries while the interface queue is still
/// held by a socket that was just closed.
pub const BUSY_WAIT: Duration = Duration::from_secs(1);
/// How long a stop waits for the consumers to hand on what is queued.
pub const STOP_GRACE: Duration = Duration::from_secs(1);
/// How long the receive loop waits in poll(), i.e. how soon it notices a stop.
const POLL_TIMEOUT_MS: libc::c_int = 50;
/// Descriptors read from the rx ring at a time.
const BATCH: u32 = 256;
/// How long a forward consumer waits for socket buffer space before losing a copy.
const SEND_TIMEOUT: Duration = Duration::from_millis(100);

#[derive(Debug, Error)]
pub enum RingError {
    #[error("mirror ring interface {interface:?} does not exist in this network namespace")]
    NoInterface { interface: String },
    #[error("AF_XDP socket on {interface} queue 0: {step}: {source}")]
    Socket {
        interface: String,
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("consumer {consumer} of the mirror ring on {interface}: {step}: {source}")]
    Consumer {
        interface: String,
        consumer: String,
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("mirror ring on {interface}: starting the {thread} thread: {source}")]
    Thread {
        interface: String,
        thread: String,
        #[source]
        source: io::Error,
    },
}

fn errno(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e.get_raw().abs())
}

// ---------------------------------------------------------------------------
// The socket

/// Anonymous, page-aligned memory for a UMEM, unmapped on drop.
struct Area {
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
    unsafe fn bytes(&self, offset: u64, len: u32) -> Option<&[u8]> {
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
    interface: String,
    need_wakeup: bool,
    // Field order is drop order: the rings (and with the last of them the
    // socket) go before the memory the UMEM registered.
    rx: RingRx,
    fill: DeviceQueue,
    area: Area,
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

// ---------------------------------------------------------------------------
// Consumers and counters

/// Where a ring's frames go.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Consumer {
    /// Appended to a (new, truncated) pcap file.
    Pcap(PathBuf),
    /// Sent unchanged out of this interface.
    Forward(String),
}

impl Consumer {
    /// `pcap:<path>` or `forward:<interface>`, as [`ConsumerStats::name`] shows it.
    pub fn name(&self) -> String {
        match self {
            Consumer::Pcap(path) => format!("pcap:{}", path.display()),
            Consumer::Forward(interface) => format!("forward:{interface}"),
        }
    }
}

/// A ring's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RingStats {
    /// Frames read from the socket.
    pub received: u64,
    /// In the order the consumers were given.
    pub consumers: Vec<ConsumerStats>,
}

/// One consumer's counters. Every received frame ends up in `delivered` or
/// `lost` (once the ring is stopped; while running, some are still queued).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ConsumerStats {
    pub name: String,
    /// Written to the pcap file (and flushed) or handed to the interface.
    pub delivered: u64,
    /// Dropped: the consumer's queue was full, or the write or send failed.
    pub lost: u64,
}

#[derive(Default)]
struct Counters {
    delivered: AtomicU64,
    lost: AtomicU64,
}

struct Shared {
    interface: String,
    received: AtomicU64,
    names: Vec<String>,
    consumers: Vec<Counters>,
    drops: [AtomicU64; 3],
}

impl Shared {
    fn stats(&self) -> RingStats {
        RingStats {
            received: self.received.load(Ordering::Relaxed),
            consumers: self
                .names
                .iter()
                .zip(&self.consumers)
                .map(|(name, c)| ConsumerStats {
                    name: name.clone(),
                    delivered: c.delivered.load(Ordering::Relaxed),
                    lost: c.lost.load(Ordering::Relaxed),
                })
                .collect(),
        }
    }
}

/// A frame as every consumer gets it: one copy, shared.
struct Frame {
    ts: SystemTime,
    bytes: Box<[u8]>,
}

type Queue = SyncSender<Arc<Frame>>;

/// The output side of a consumer, opened by `MirrorRing::start` (so errors
/// are reported there, and sockets are made in the caller's namespace).
enum Sink {
    Pcap {
        writer: PcapWriter,
        /// Written since the last flush (counted as delivered once flushed).
        pending: u64,
    },
    Forward {
        socket: OwnedFd,
    },
}

impl Sink {
    fn open(consumer: &Consumer) -> Result<Self, (&'static str, io::Error)> {
        match consumer {
            Consumer::Pcap(path) => Ok(Sink::Pcap {
                writer: PcapWriter::create(path).map_err(|e| ("opening", e))?,
                pending: 0,
            }),
            Consumer::Forward(interface) => {
                let index = crate::net::link::index(interface).ok_or_else(|| {
                    (
                        "looking up the interface",
                        io::Error::new(io::ErrorKind::NotFound, "no such interface"),
                    )
                })?;
                Ok(Sink::Forward {
                    socket: packet_socket(index).map_err(|e| ("opening an AF_PACKET socket", e))?,
                })
            }
        }
    }

    fn deliver(&mut self, frame: &Frame, counters: &Counters, failure: &mut Failure) {
        match self {
            Sink::Pcap { writer, pending } => match writer.write(&frame.bytes, frame.ts) {
                Ok(()) => *pending += 1,
                Err(e) => {
                    counters.lost.fetch_add(1, Ordering::Relaxed);
                    failure.note("writing", &e);
                }
            },
            Sink::Forward { socket } => {
                // SAFETY: sending from a live buffer on an open socket.
                let sent = unsafe {
                    libc::send(
                        socket.as_raw_fd(),
                        frame.bytes.as_ptr().cast(),
                        frame.bytes.len(),
                        0,
                    )
                };
                if sent == frame.bytes.len() as isize {
                    counters.delivered.fetch_add(1, Ordering::Relaxed);
                } else {
                    counters.lost.fetch_add(1, Ordering::Relaxed);
                    let e = if sent < 0 {
                        io::Error::last_os_error()
                    } else {
                        io::Error::other(format!("sent {sent} of {} bytes", frame.bytes.len()))
                    };
                    failure.note("sending", &e);
                }
            }
        }
    }

    fn flush(&mut self, counters: &Counters, failure: &mut Failure) {
        if let Sink::Pcap { writer, pending } = self {
            if *pending == 0 {
                return;
            }
            match writer.flush() {
                Ok(()) => counters.delivered.fetch_add(*pending, Ordering::Relaxed),
                Err(e) => {
                    failure.note("flushing", &e);
                    counters.lost.fetch_add(*pending, Ordering::Relaxed)
                }
            };
            *pending = 0;
        }
    }
}

/// An AF_PACKET socket that sends out of `ifindex` and receives nothing
/// (protocol 0), with a send timeout so a stuck interface cannot hold a
/// consumer thread for long.
fn packet_socket(ifindex: u32) -> io::Result<OwnedFd> {
    // SAFETY: plain socket calls with checked results; the fd is owned at once.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let socket = OwnedFd::from_raw_fd(fd);
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = ifindex as i32;
        if libc::bind(
            fd,
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: SEND_TIMEOUT.as_micros() as libc::suseconds_t,
        };
        if libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(socket)
    }
}

/// Logs a consumer's first failure of each kind, then only counts.
struct Failure<'a> {
    interface: &'a str,
    consumer: &'a str,
    logged: Vec<&'static str>,
}

impl Failure<'_> {
    fn note(&mut self, what: &'static str, e: &io::Error) {
        if !self.logged.contains(&what) {
            self.logged.push(what);
            tracing::warn!(
                ring = self.interface,
                consumer = self.consumer,
                "{what} failed: {e}; counting lost copies from now on, not logging each"
            );
        }
    }
}

fn run_consumer(
    queue: mpsc::Receiver<Arc<Frame>>,
    mut sink: Sink,
    shared: Arc<Shared>,
    index: usize,
) {
    let counters = &shared.consumers[index];
    let mut failure = Failure {
        interface: &shared.interface,
        consumer: &shared.names[index],
        logged: Vec::new(),
    };
    let mut last_flush = Instant::now();
    loop {
        let wait = FLUSH_INTERVAL.saturating_sub(last_flush.elapsed());
        match queue.recv_timeout(wait) {
            Ok(frame) => sink.deliver(&frame, counters, &mut failure),
            Err(RecvTimeoutError::Timeout) => {}
            // The receive loop stopped and everything queued was delivered.
            Err(RecvTimeoutError::Disconnected) => break,
        }
        if last_flush.elapsed() >= FLUSH_INTERVAL {
            sink.flush(counters, &mut failure);
            last_flush = Instant::now();
        }
    }
    sink.flush(counters, &mut failure);
}

// ---------------------------------------------------------------------------
// The receive loop

fn run_receiver(
    mut socket: RingSocket,
    queues: Vec<Queue>,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
) {
    let mut returned: Vec<u64> = Vec::with_capacity(FRAMES as usize);
    let mut batch: Vec<Arc<Frame>> = Vec::with_capacity(BATCH as usize);
    let mut last_drops = Instant::now();
    let mut poll_failed = false;
    while !stop.load(Ordering::Relaxed) {
        if socket.rx.available() == 0 {
            let mut pfd = libc::pollfd {
                fd: socket.fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let rc = unsafe { libc::poll(&mut pfd, 1, POLL_TIMEOUT_MS) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    if !poll_failed {
                        poll_failed = true;
                        tracing::warn!(ring = %shared.interface, "poll failed: {e}");
                    }
                    std::thread::sleep(Duration::from_millis(POLL_TIMEOUT_MS as u64));
                }
            } else if pfd.revents & libc::POLLNVAL != 0 {
                tracing::error!(ring = %shared.interface, "the AF_XDP socket is gone; stopping");
                break;
            }
        }

        let ts = SystemTime::now();
        {
            let mut reader = socket.rx.receive(BATCH);
            while let Some(desc) = reader.read() {
                // SAFETY: the frame is ours until it goes back to the fill ring below.
                if let Some(bytes) = unsafe { socket.area.bytes(desc.addr, desc.len) } {
                    batch.push(Arc::new(Frame {
                        ts,
                        bytes: bytes.into(),
                    }));
                }
                returned.push(desc.addr - desc.addr % u64::from(FRAME_SIZE));
            }
            reader.release();
        }
        if !returned.is_empty() {
            let mut writer = socket.fill.fill(returned.len() as u32);
            let n = writer.insert(returned.iter().copied()) as usize;
            writer.commit();
            drop(writer);
            // The fill ring holds every frame, so there is always room;
            // anything left waits for the next round.
            returned.drain(..n);
        }
        if socket.need_wakeup && socket.fill.needs_wakeup() {
            socket.fill.wake();
        }

        shared
            .received
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        for frame in batch.drain(..) {
            for (queue, counters) in queues.iter().zip(&shared.consumers) {
                match queue.try_send(frame.clone()) {
                    Ok(()) => {}
                    Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                        counters.lost.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }

        if last_drops.elapsed() >= FLUSH_INTERVAL {
            last_drops = Instant::now();
            store_drops(&socket, &shared);
        }
    }
    store_drops(&socket, &shared);
    // Dropping `queues` lets the consumers finish what is queued and exit.
}

fn store_drops(socket: &RingSocket, shared: &Shared) {
    if let Ok(d) = socket.drops() {
        for (slot, value) in
            shared
                .drops
                .iter()
                .zip([d.rx_dropped, d.rx_ring_full, d.fill_ring_empty])
        {
            slot.store(value, Ordering::Relaxed);
        }
    }
}

// ---------------------------------------------------------------------------
// The ring

/// A running ring: one thread polls the socket and hands each frame (one
/// shared copy) to every consumer through a bounded queue of
/// [`QUEUE_DEPTH`] frames; a full queue loses that copy for that consumer
/// only (counted as `lost`), never blocking the receive loop. Each consumer
/// runs on its own thread: a pcap consumer appends to its file (flushing at
/// least every [`FLUSH_INTERVAL`] and on stop), a forward consumer sends the
/// frame unchanged out of its interface through an AF_PACKET socket.
pub struct MirrorRing {
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    receiver: Option<JoinHandle<()>>,
    consumers: Vec<JoinHandle<()>>,
}

impl fmt::Debug for MirrorRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MirrorRing")
            .field("interface", &self.shared.interface)
            .field("stats", &self.shared.stats())
            .finish()
    }
}

impl MirrorRing {
    /// Opens every consumer (pcap files are created, forward interfaces looked
    /// up in the calling thread's namespace) and starts the threads.
    pub fn start(socket: RingSocket, consumers: Vec<Consumer>) -> Result<Self, RingError> {
        let interface = socket.interface.clone();
        let mut sinks = Vec::with_capacity(consumers.len());
        for (index, consumer) in consumers.iter().enumerate() {
            if consumers[..index].contains(consumer) {
                return Err(RingError::Consumer {
                    interface,
                    consumer: consumer.name(),
                    step: "checking the consumers",
                    source: io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "given twice (one consumer per file or interface)",
                    ),
                });
            }
            let sink = Sink::open(consumer).map_err(|(step, source)| RingError::Consumer {
                interface: interface.clone(),
                consumer: consumer.name(),
                step,
                source,
            })?;
            sinks.push(sink);
        }
        let shared = Arc::new(Shared {
            interface: interface.clone(),
            received: AtomicU64::new(0),
            names: consumers.iter().map(Consumer::name).collect(),
            consumers: consumers.iter().map(|_| Counters::default()).collect(),
            drops: Default::default(),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let mut ring = MirrorRing {
            shared: shared.clone(),
            stop: stop.clone(),
            receiver: None,
            consumers: Vec::new(),
        };
        let thread_error = |thread: String| {
            let interface = interface.clone();
            move |source| RingError::Thread {
                interface,
                thread,
                source,
            }
        };
        let mut queues = Vec::with_capacity(sinks.len());
        for (index, sink) in sinks.into_iter().enumerate() {
            let (queue, rx) = mpsc::sync_channel(QUEUE_DEPTH);
            let shared = shared.clone();
            // On an error here `ring` is dropped: the consumers started so far
            // see their queue closed and exit.
            let handle = std::thread::Builder::new()
                .name(format!("tm-ring-c{index}"))
                .spawn(move || run_consumer(rx, sink, shared, index))
                .map_err(thread_error(consumers[index].name()))?;
            ring.consumers.push(handle);
            queues.push(queue);
        }
        let handle = std::thread::Builder::new()
            .name(format!("tm-ring-{interface}"))
            .spawn(move || run_receiver(socket, queues, shared, stop))
            .map_err(thread_error("receive".into()))?;
        ring.receiver = Some(handle);
        Ok(ring)
    }

    /// The counters so far.
    pub fn stats(&self) -> RingStats {
        self.shared.stats()
    }

    /// The kernel's drop counters of the ring's socket (refreshed every
    /// [`FLUSH_INTERVAL`] while running).
    pub fn socket_drops(&self) -> SocketDrops {
        let [rx_dropped, rx_ring_full, fill_ring_empty] =
            [0, 1, 2].map(|i| self.shared.drops[i].load(Ordering::Relaxed));
        SocketDrops {
            rx_dropped,
            rx_ring_full,
            fill_ring_empty,
        }
    }

    /// The interface the ring's socket is bound to.
    pub fn interface(&self) -> &str {
        &self.shared.interface
    }

    /// Stops the threads and returns the final counters: the receive loop
    /// stops within 50 ms (closing the socket); each consumer then hands on
    /// what is still queued and flushes its pcap file. A consumer still busy
    /// after [`STOP_GRACE`] (blocked in a write, e.g. to a FIFO nobody reads)
    /// is left to finish on its own and its copies still queued are not
    /// counted yet.
    pub fn stop(mut self) -> RingStats {
        self.halt();
        self.shared.stats()
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let ring = &self.shared.interface;
        if let Some(receiver) = self.receiver.take() {
            if receiver.join().is_err() {
                tracing::error!(ring = %ring, "the receive thread panicked");
            }
        }
        let deadline = Instant::now() + STOP_GRACE;
        for (index, consumer) in self.consumers.drain(..).enumerate() {
            while !consumer.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
            let name = &self.shared.names[index];
            if !consumer.is_finished() {
                tracing::warn!(
                    ring = %ring,
                    consumer = %name,
                    "consumer still busy {STOP_GRACE:?} after the stop; leaving it to finish"
                );
            } else if consumer.join().is_err() {
                tracing::error!(ring = %ring, consumer = %name, "the consumer thread panicked");
            }
        }
    }
}

impl Drop for MirrorRing {
    fn drop(&mut self) {
        self.halt();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumer_names() {
        assert_eq!(
            Consumer::Pcap("/tmp/x.pcap".into()).name(),
            "pcap:/tmp/x.pcap"
        );
        assert_eq!(Consumer::Forward("eth1".into()).name(), "forward:eth1");
    }

    #[test]
    fn a_missing_interface_is_named() {
        let e = RingSocket::open("tm-no-such-if").unwrap_err().to_string();
        assert!(e.contains("tm-no-such-if"), "{e}");
    }
}
