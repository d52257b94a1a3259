//! A ring's receive loop: reads the frames waiting on the socket's rx ring
//! in one round, copies them out once as pcap records, returns the UMEM
//! frames to the fill ring together and offers the batch to every
//! consumer's queue without ever waiting for one.

use std::{
    io,
    os::fd::RawFd,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant, SystemTime},
};

use xdpilone::xdp::XdpDesc;

use super::{
    consumer::{Batch, Queue},
    socket::{RingSocket, FRAME_SIZE},
    stats::Shared,
    FLUSH_INTERVAL, QUEUE_BYTES, QUEUE_DEPTH,
};
use crate::mirror::pcap::record_header;

/// How long the receive loop waits in poll(), i.e. how soon it notices a stop.
const POLL_TIMEOUT_MS: libc::c_int = 50;
/// Descriptors read from the rx ring at a time.
pub const BATCH: u32 = 1024;
/// After a round that did not fill a batch, how long the loop lets frames
/// gather before the next: one wake-up (for it and each consumer) per this
/// long instead of one per frame, while the rx ring holds far more than
/// arrives meanwhile (8192 frames are 8 ms at 1 Mpps). Measured on 2 busy
/// vCPUs: at 250 µs the wake-ups cost more CPU per copy than the copying;
/// at 1 ms a stalled thread lost copies.
pub const LINGER: Duration = Duration::from_micros(500);

pub(super) fn run_receiver(
    mut socket: RingSocket,
    queues: Vec<Queue>,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
) {
    let mut descs: Vec<XdpDesc> = Vec::with_capacity(BATCH as usize);
    let mut last_drops = Instant::now();
    let mut poll_failed = false;
    let what = format!("the AF_XDP socket of mirror ring {}", shared.interface);
    while !stop.load(Ordering::Relaxed) {
        if socket.rx.available() == 0 && !wait_readable(socket.fd(), &what, &mut poll_failed) {
            break;
        }

        // Read what is there, copy it out as pcap records, give the frames back.
        {
            let mut reader = socket.rx.receive(BATCH);
            descs.extend(std::iter::from_fn(|| reader.read()));
            reader.release();
        }
        // Also while nothing arrives: drops happen exactly then (frames too long).
        if last_drops.elapsed() >= FLUSH_INTERVAL {
            last_drops = Instant::now();
            store_drops(&socket, &shared);
        }
        if descs.is_empty() {
            continue;
        }
        let ts = SystemTime::now();
        let size = descs.iter().map(|d| 16 + d.len as usize).sum();
        let mut records = Vec::with_capacity(size);
        let mut frames = 0;
        for desc in &descs {
            // SAFETY: the frame is ours until it goes back to the fill ring below.
            if let Some(bytes) = unsafe { socket.area.bytes(desc.addr, desc.len) } {
                records.extend_from_slice(&record_header(bytes.len(), ts));
                records.extend_from_slice(bytes);
                frames += 1;
            }
        }
        let mut writer = socket.fill.fill(descs.len() as u32);
        // The fill ring has room for every frame of the UMEM, so all fit.
        writer.insert(
            descs
                .drain(..)
                .map(|d| d.addr - d.addr % u64::from(FRAME_SIZE)),
        );
        writer.commit();
        drop(writer);
        if socket.need_wakeup && socket.fill.needs_wakeup() {
            socket.fill.wake();
        }

        shared.received.fetch_add(frames, Ordering::Relaxed);
        offer(
            Arc::new(Batch { frames, records }),
            &queues,
            &shared,
            QUEUE_DEPTH,
        );
        if frames < u64::from(BATCH) {
            std::thread::sleep(LINGER);
        }
    }
    store_drops(&socket, &shared);
    // Dropping `queues` lets the consumers finish what is queued and exit.
}

/// Waits in poll() until `fd` is readable or [`POLL_TIMEOUT_MS`] passes;
/// false if the descriptor is gone. `what` names it in the log.
pub(super) fn wait_readable(fd: RawFd, what: &str, poll_failed: &mut bool) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let rc = unsafe { libc::poll(&mut pfd, 1, POLL_TIMEOUT_MS) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            if !*poll_failed {
                *poll_failed = true;
                tracing::warn!("{what}: poll failed: {e}");
            }
            std::thread::sleep(Duration::from_millis(POLL_TIMEOUT_MS as u64));
        }
    } else if pfd.revents & libc::POLLNVAL != 0 {
        tracing::error!("{what} is gone; stopping");
        return false;
    }
    true
}

/// Hands the batch to every consumer whose queue has room for all of it
/// (at most `depth` frames and [`QUEUE_BYTES`] queued); the others lose its
/// frames.
pub(super) fn offer(batch: Arc<Batch>, queues: &[Queue], shared: &Shared, depth: usize) {
    let bytes = batch.records.len() as u64;
    for (queue, counters) in queues.iter().zip(&shared.consumers) {
        // Only this thread adds to the queued counts, so the room seen here stays.
        let queued = counters.queued.load(Ordering::Acquire);
        let queued_bytes = counters.queued_bytes.load(Ordering::Acquire);
        if queued + batch.frames <= depth as u64 && queued_bytes + bytes <= QUEUE_BYTES as u64 {
            counters.queued.fetch_add(batch.frames, Ordering::AcqRel);
            counters.queued_bytes.fetch_add(bytes, Ordering::AcqRel);
            if queue.send(batch.clone()).is_ok() {
                continue;
            }
            counters.queued.fetch_sub(batch.frames, Ordering::AcqRel);
            counters.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
        }
        counters.lost.fetch_add(batch.frames, Ordering::Relaxed);
    }
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
