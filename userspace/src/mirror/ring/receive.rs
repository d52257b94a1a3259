//! A ring's receive loop: reads batches of frames from the socket's rx ring,
//! copies each out once, returns the UMEM frames to the fill ring and offers
//! the copy to every consumer's queue without ever waiting for one.

use std::{
    io,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc::TrySendError,
        Arc,
    },
    time::{Duration, Instant, SystemTime},
};

use super::{
    consumer::{Frame, Queue},
    socket::{RingSocket, FRAMES, FRAME_SIZE},
    stats::Shared,
    FLUSH_INTERVAL,
};

/// How long the receive loop waits in poll(), i.e. how soon it notices a stop.
const POLL_TIMEOUT_MS: libc::c_int = 50;
/// Descriptors read from the rx ring at a time.
const BATCH: u32 = 256;

pub(super) fn run_receiver(
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
