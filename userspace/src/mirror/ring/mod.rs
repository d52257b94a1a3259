//! Mirror rings: copies reach userspace either straight from TC through
//! the `tm_mirror_copy` ring buffer (`feed`, one reader for all rings) or
//! through an AF_XDP socket (copy mode) that `tm_xdp_mirror` redirects a
//! ring veth's frames into. Either way they are fanned out to consumers,
//! each behind its own bounded queue and thread, so a slow consumer loses
//! its own copies and never slows the ring or the others.
//!
//! ```text
//!  TC ──tm_mirror_copy──▶ CopyFeed (one thread, all rings) ─┐
//!  ring veth peer ──XDP redirect──▶ RingSocket ──receive thread┤ copy out once
//!                       ┌──────────────┬──────────────┬───────┘  bounded queue each
//!                       ▼              ▼              ▼
//!                 pcap file       AF_PACKET out     …  (one thread each)
//! ```
//!
//! `feed` reads the ring buffer, `socket` holds the AF_XDP socket and its
//! UMEM, `receive` its receive loop, `consumer` the consumers' outputs and
//! threads, `stats` the counters; this file starts and stops a ring.

mod consumer;
mod feed;
mod receive;
mod socket;
mod stats;

use std::{
    fmt, io,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc, Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use thiserror::Error;
use xdpilone::Errno;

pub use consumer::Consumer;
use consumer::{run_consumer, Queue, Sink};
pub use feed::CopyFeed;
use receive::run_receiver;
pub use socket::{RingSocket, SocketDrops, BUSY_WAIT, FRAMES, FRAME_SIZE, MAX_FRAME};
pub use stats::{ConsumerStats, RingStats};
use stats::{Counters, Shared};

/// Frames each consumer's queue holds before it loses copies (an AF_XDP
/// ring's; see [`FED_QUEUE_DEPTH`]).
pub const QUEUE_DEPTH: usize = 8192;
/// The same for a ring fed from the ring buffer, whose rounds are longer:
/// with 8192 a pcap consumer lost 5–14 % of 750 kpps of copies on 2 busy
/// vCPUs (its thread waits its turn beside the senders).
pub const FED_QUEUE_DEPTH: usize = 131_072;
/// The most bytes of records a consumer's queue holds, whatever the frames.
pub const QUEUE_BYTES: usize = 32 << 20;
/// How often a pcap consumer writes out what it buffered (at most this long).
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// How long a stop waits for the consumers to hand on what is queued.
pub const STOP_GRACE: Duration = Duration::from_secs(1);

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
    /// Fed from the ring buffer as this slot.
    feed: Option<(Arc<CopyFeed>, u32)>,
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
    /// up in the calling thread's namespace) and starts the threads that
    /// read the AF_XDP socket and write to the consumers.
    pub fn start(socket: RingSocket, consumers: Vec<Consumer>) -> Result<Self, RingError> {
        let interface = socket.interface.clone();
        let (mut ring, queues) = Self::start_consumers(interface.clone(), consumers)?;
        let (shared, stop) = (ring.shared.clone(), ring.stop.clone());
        let handle = std::thread::Builder::new()
            .name(format!("tm-ring-{interface}"))
            .spawn(move || run_receiver(socket, queues, shared, stop))
            .map_err(|source| RingError::Thread {
                interface,
                thread: "receive".into(),
                source,
            })?;
        ring.receiver = Some(handle);
        Ok(ring)
    }

    /// As [`MirrorRing::start`] for a ring fed by `feed` as (slot,
    /// generation); `name` stands for the interface in errors and logs.
    pub fn start_fed(
        name: String,
        feed: Arc<CopyFeed>,
        (slot, generation): (u32, u8),
        consumers: Vec<Consumer>,
    ) -> Result<Self, RingError> {
        let steady = consumers.iter().any(|c| matches!(c, Consumer::Forward(_)));
        let (mut ring, queues) = Self::start_consumers(name, consumers)?;
        feed.attach(slot, generation, queues, ring.shared.clone(), steady);
        ring.feed = Some((feed, slot));
        Ok(ring)
    }

    fn start_consumers(
        interface: String,
        consumers: Vec<Consumer>,
    ) -> Result<(Self, Vec<Queue>), RingError> {
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
            stop,
            receiver: None,
            feed: None,
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
            let (queue, rx) = mpsc::channel();
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
        Ok((ring, queues))
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
    pub fn stop(self) -> RingStats {
        self.stop_within(STOP_GRACE)
    }

    /// [`MirrorRing::stop`] with another grace than [`STOP_GRACE`] (a test on
    /// a loaded machine gives a slow consumer the time to finish).
    pub fn stop_within(mut self, grace: Duration) -> RingStats {
        self.halt(grace);
        self.shared.stats()
    }

    fn halt(&mut self, grace: Duration) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some((feed, slot)) = self.feed.take() {
            feed.detach(slot);
        }
        let ring = &self.shared.interface;
        if let Some(receiver) = self.receiver.take() {
            if receiver.join().is_err() {
                tracing::error!(ring = %ring, "the receive thread panicked");
            }
        }
        let deadline = Instant::now() + grace;
        for (index, consumer) in self.consumers.drain(..).enumerate() {
            while !consumer.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
            let name = &self.shared.names[index];
            if !consumer.is_finished() {
                tracing::warn!(
                    ring = %ring,
                    consumer = %name,
                    "consumer still busy {grace:?} after the stop; leaving it to finish"
                );
            } else if consumer.join().is_err() {
                tracing::error!(ring = %ring, consumer = %name, "the consumer thread panicked");
            }
        }
    }
}

impl Drop for MirrorRing {
    fn drop(&mut self) {
        self.halt(STOP_GRACE);
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
