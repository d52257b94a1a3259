//! A ring's counters: shared between its threads as atomics, reported as
//! plain values.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// A ring's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RingStats {
    /// Frames read from the socket.
    pub received: u64,
    /// In the order the consumers were given.
    pub consumers: Vec<ConsumerStats>,
    /// Copies the kernel could not put into the socket (its `XDP_STATISTICS`):
    /// `rx_dropped` (e.g. longer than a frame) and `rx_ring_full` (the
    /// receive loop fell behind). Neither reaches any consumer.
    pub socket_dropped: u64,
    pub ring_full: u64,
}

impl RingStats {
    /// Every copy the ring lost before a consumer saw it.
    pub fn drops(&self) -> u64 {
        self.socket_dropped + self.ring_full
    }
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
pub(super) struct Counters {
    pub(super) delivered: AtomicU64,
    pub(super) lost: AtomicU64,
    /// Frames handed to the consumer's queue and not yet taken off it.
    pub(super) queued: AtomicU64,
    /// Their pcap records' bytes.
    pub(super) queued_bytes: AtomicU64,
}

pub(super) struct Shared {
    pub(super) interface: String,
    pub(super) received: AtomicU64,
    pub(super) names: Vec<String>,
    pub(super) consumers: Vec<Counters>,
    pub(super) drops: [AtomicU64; 3],
}

impl Shared {
    pub(super) fn stats(&self) -> RingStats {
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
            socket_dropped: self.drops[0].load(Ordering::Relaxed),
            ring_full: self.drops[1].load(Ordering::Relaxed),
        }
    }
}
