//! A ring's consumers: each runs on its own thread behind a bounded queue,
//! writing frames to a pcap file or sending them out of an interface.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::PathBuf,
    sync::{
        atomic::Ordering,
        mpsc::{self, RecvTimeoutError, SyncSender},
        Arc,
    },
    time::{Duration, Instant, SystemTime},
};

use super::{
    stats::{Counters, Shared},
    FLUSH_INTERVAL,
};
use crate::mirror::pcap::PcapWriter;

/// How long a forward consumer waits for socket buffer space before losing a copy.
const SEND_TIMEOUT: Duration = Duration::from_millis(100);

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

/// A frame as every consumer gets it: one copy, shared.
pub(super) struct Frame {
    pub(super) ts: SystemTime,
    pub(super) bytes: Box<[u8]>,
}

pub(super) type Queue = SyncSender<Arc<Frame>>;

/// The output side of a consumer, opened by `MirrorRing::start` (so errors
/// are reported there, and sockets are made in the caller's namespace).
pub(super) enum Sink {
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
    pub(super) fn open(consumer: &Consumer) -> Result<Self, (&'static str, io::Error)> {
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

pub(super) fn run_consumer(
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
