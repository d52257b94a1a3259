//! A ring's consumers: each runs on its own thread behind a bounded queue,
//! writing frames to a pcap file or sending them out of an interface.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::PathBuf,
    sync::{
        atomic::Ordering,
        mpsc::{self, RecvTimeoutError, Sender},
        Arc,
    },
    time::{Duration, Instant},
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
    /// Appended to a pcap file (mode 0600; one of ours keeps its records).
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

/// The frames of one receive round as every consumer gets them (one copy,
/// shared): pcap records (header, then the whole frame) back to back, so a
/// pcap consumer writes them as they are.
pub(super) struct Batch {
    pub(super) frames: u64,
    pub(super) records: Vec<u8>,
}

impl Batch {
    /// The frames, in order.
    fn frames(&self) -> impl Iterator<Item = &[u8]> {
        let mut rest = &self.records[..];
        std::iter::from_fn(move || {
            let header = rest.get(..16)?;
            let len = u32::from_ne_bytes(header[8..12].try_into().ok()?) as usize;
            let frame = rest.get(16..16 + len)?;
            rest = &rest[16 + len..];
            Some(frame)
        })
    }
}

/// A consumer's queue; its depth in frames is kept in `Counters::queued`.
pub(super) type Queue = Sender<Arc<Batch>>;

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

    fn deliver(&mut self, batch: &Batch, counters: &Counters, failure: &mut Failure) {
        match self {
            Sink::Pcap { writer, pending } => {
                // Buffered; written a MiB at a time, and a failed write
                // loses exactly the frames it held (`flush`).
                match writer.write_records(&batch.records) {
                    Ok(()) => *pending += batch.frames,
                    Err(e) => {
                        counters.lost.fetch_add(batch.frames, Ordering::Relaxed);
                        failure.note("writing", &e);
                    }
                }
                if writer.buffered() >= crate::mirror::pcap::WRITE_BUFFER {
                    self.flush(counters, failure);
                }
            }
            Sink::Forward { socket } => {
                let frames: Vec<&[u8]> = batch.frames().collect();
                let mut rest = &frames[..];
                while !rest.is_empty() {
                    match send_frames(socket, rest) {
                        Ok(sent) => {
                            counters.delivered.fetch_add(sent as u64, Ordering::Relaxed);
                            rest = &rest[sent..];
                        }
                        // The first frame left failed; the others are tried again.
                        Err(e) => {
                            counters.lost.fetch_add(1, Ordering::Relaxed);
                            failure.note("sending", &e);
                            rest = &rest[1..];
                        }
                    }
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

/// Sends frames from the start of `frames` with one sendmmsg(2), each
/// unchanged as one packet; how many went, at least one, or why the first
/// did not.
fn send_frames(socket: &OwnedFd, frames: &[&[u8]]) -> io::Result<usize> {
    const MAX: usize = 256;
    let n = frames.len().min(MAX);
    let mut iovs: [libc::iovec; MAX] = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; MAX];
    // SAFETY: an all-zero mmsghdr is a valid value (null pointers, zero lengths).
    let mut msgs: [libc::mmsghdr; MAX] = unsafe { std::mem::zeroed() };
    for (i, frame) in frames[..n].iter().enumerate() {
        iovs[i] = libc::iovec {
            iov_base: frame.as_ptr().cast_mut().cast(),
            iov_len: frame.len(),
        };
        msgs[i].msg_hdr.msg_iov = &mut iovs[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    // SAFETY: `n` messages, each pointing at one iovec over a live frame
    // that the kernel only reads.
    let sent = unsafe { libc::sendmmsg(socket.as_raw_fd(), msgs.as_mut_ptr(), n as u32, 0) };
    if sent <= 0 {
        return Err(if sent < 0 {
            io::Error::last_os_error()
        } else {
            io::Error::other("nothing sent")
        });
    }
    let sent = sent as usize;
    if let Some(i) = (0..sent).find(|&i| msgs[i].msg_len as usize != frames[i].len()) {
        return if i == 0 {
            Err(io::Error::other(format!(
                "sent {} of {} bytes",
                msgs[0].msg_len,
                frames[0].len()
            )))
        } else {
            Ok(i)
        };
    }
    Ok(sent)
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
    queue: mpsc::Receiver<Arc<Batch>>,
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
            Ok(batch) => {
                sink.deliver(&batch, counters, &mut failure);
                counters.queued.fetch_sub(batch.frames, Ordering::AcqRel);
                counters
                    .queued_bytes
                    .fetch_sub(batch.records.len() as u64, Ordering::AcqRel);
            }
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

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::mirror::pcap::record_header;

    #[test]
    fn a_batch_yields_its_frames() {
        let ts = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut records = Vec::new();
        for frame in [&[1u8, 2, 3][..], &[], &[4; 60]] {
            records.extend_from_slice(&record_header(frame.len(), ts));
            records.extend_from_slice(frame);
        }
        let batch = Batch { frames: 3, records };
        let frames: Vec<&[u8]> = batch.frames().collect();
        assert_eq!(frames, [&[1u8, 2, 3][..], &[], &[4; 60]]);
    }
}
