//! The copies TC puts straight into the `tm_mirror_copy` ring buffer, for
//! every mirror ring fed that way: one thread reads the buffer in rounds,
//! lays each ring's copies out as pcap records and hands each ring's batch
//! to that ring's consumer queues, exactly as an AF_XDP ring's receive loop
//! does. A copy costs the sender one copy of its bytes and no clone, no
//! veth and no second softirq.

use std::{
    io,
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, SystemTime},
};

use aya::maps::{MapData, RingBuf};
use tapmesh_common::mirror::{CopyHead, MAX_RINGS};

use super::{
    consumer::{Batch, Queue},
    receive::{offer, wait_readable},
    stats::Shared,
    FED_QUEUE_DEPTH, QUEUE_DEPTH,
};
use crate::mirror::pcap::{record_header_cut, SNAPLEN};

const HEAD: usize = size_of::<CopyHead>();
/// Records per batch handed to the consumers.
const BATCH: u32 = (QUEUE_DEPTH / 4) as u32;
/// The longest the reader lets copies gather between rounds (see [`linger`]).
/// On a busy machine every wake-up of this thread and of each consumer
/// costs CPU the mirrored traffic needs: with 500 µs the sender kept about
/// 0.72 of its unmirrored rate on 2 vCPUs, with 4 ms 0.82, with 20 ms
/// 0.86–0.92. The buffer holds about 170 ms of 64-byte copies at 1 Mpps.
const LINGER: Duration = Duration::from_millis(20);
/// The same while a ring forwards its copies: bursts of 20 ms of traffic
/// overflowed the receiving application's queue (dpdk-testpmd on
/// `net_af_packet` lost a quarter of them).
const LINGER_STEADY: Duration = Duration::from_millis(1);

/// Where one ring's copies go.
struct Outlet {
    queues: Vec<Queue>,
    shared: Arc<Shared>,
    /// It forwards copies: they go on in a steady stream, not in bursts.
    steady: bool,
    /// Only copies of this generation are its.
    generation: u8,
}

/// The reader of `tm_mirror_copy` and the rings it feeds.
pub struct CopyFeed {
    outlets: Arc<Mutex<Vec<Option<Outlet>>>>,
    stop: Arc<AtomicBool>,
    flush: Arc<Flush>,
    reader: Mutex<Option<JoinHandle<()>>>,
}

/// [`CopyFeed::flush`]'s requests, and the last one a round answered.
#[derive(Default)]
struct Flush {
    asked: AtomicU64,
    answered: AtomicU64,
}

/// Why the reader did not start, and the map it was given (for the next try).
pub struct NotStarted {
    pub error: io::Error,
    pub buffer: Option<Box<RingBuf<MapData>>>,
}

impl std::fmt::Debug for CopyFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CopyFeed").finish_non_exhaustive()
    }
}

impl CopyFeed {
    /// Starts the reader thread on the (taken) ring buffer map of `bytes`.
    /// A thread that cannot start gives the map back, for the next try.
    pub fn start(buffer: RingBuf<MapData>, bytes: u32) -> Result<Arc<Self>, NotStarted> {
        let outlets: Arc<Mutex<Vec<Option<Outlet>>>> =
            Arc::new(Mutex::new((0..MAX_RINGS).map(|_| None).collect()));
        let stop = Arc::new(AtomicBool::new(false));
        let flush = Arc::new(Flush::default());
        // Handed over through a slot: a closure that never ran is dropped
        // with what it holds.
        let handover = Arc::new(Mutex::new(Some(buffer)));
        let spawned = {
            let (outlets, stop, flush, handover) = (
                outlets.clone(),
                stop.clone(),
                flush.clone(),
                handover.clone(),
            );
            std::thread::Builder::new()
                .name("tm-ring-copies".into())
                .spawn(move || {
                    let buffer = handover.lock().unwrap_or_else(|e| e.into_inner()).take();
                    if let Some(buffer) = buffer {
                        read(buffer, bytes, &outlets, &stop, &flush);
                    }
                })
        };
        let reader = match spawned {
            Ok(reader) => reader,
            Err(e) => {
                let back = handover.lock().unwrap_or_else(|e| e.into_inner()).take();
                return Err(NotStarted {
                    error: e,
                    buffer: back.map(Box::new),
                });
            }
        };
        Ok(Arc::new(CopyFeed {
            outlets,
            stop,
            flush,
            reader: Mutex::new(Some(reader)),
        }))
    }

    /// From now on ring `slot`'s copies go to these queues; `steady` for a
    /// ring that forwards them (see [`LINGER_STEADY`]).
    pub(super) fn attach(
        &self,
        slot: u32,
        generation: u8,
        queues: Vec<Queue>,
        shared: Arc<Shared>,
        steady: bool,
    ) {
        let mut outlets = self.outlets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(outlet) = outlets.get_mut(slot as usize) {
            *outlet = Some(Outlet {
                queues,
                shared,
                steady,
                generation,
            });
        }
    }

    /// Returns once every copy in the buffer when it was called is in its
    /// ring's queues (a round that began after the call emptied the buffer),
    /// or after `timeout`; false then. Without it a stop lost the copies of
    /// the reader's last pause (up to [`LINGER`]).
    pub fn flush(&self, timeout: Duration) -> bool {
        let ask = self.flush.asked.fetch_add(1, Ordering::AcqRel) + 1;
        let deadline = std::time::Instant::now() + timeout;
        while self.flush.answered.load(Ordering::Acquire) < ask {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// Ring `slot`'s queues are dropped (its consumers finish what is queued);
    /// copies still in the buffer for it are discarded.
    pub(super) fn detach(&self, slot: u32) {
        let mut outlets = self.outlets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(outlet) = outlets.get_mut(slot as usize) {
            *outlet = None;
        }
    }
}

impl Drop for CopyFeed {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let reader = self.reader.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(reader) = reader {
            if reader.join().is_err() {
                tracing::error!("the mirror copy reader panicked");
            }
        }
    }
}

/// One ring's records of the current round.
#[derive(Default)]
struct Pending {
    /// The generation of the ring they are for.
    generation: u8,
    frames: u64,
    records: Vec<u8>,
}

fn read(
    mut buffer: RingBuf<MapData>,
    size: u32,
    outlets: &Mutex<Vec<Option<Outlet>>>,
    stop: &AtomicBool,
    flush: &Flush,
) {
    let mut pending: Vec<Pending> = (0..MAX_RINGS).map(|_| Pending::default()).collect();
    let mut poll_failed = false;
    while !stop.load(Ordering::Relaxed) {
        // Requests made before this round are answered once it empties the buffer.
        let asked = flush.asked.load(Ordering::Acquire);
        // Monotonic (the copies' clock) to wall-clock time, once per round.
        let epoch = realtime_minus_monotonic();
        // A round: batches until the buffer is empty.
        let (mut read, mut bytes) = (0, 0);
        let mut steady;
        loop {
            generations(&mut pending, outlets);
            let (n, b) = gather(&mut buffer, &mut pending, epoch);
            (read, bytes) = (read + n, bytes + b);
            steady = dispatch(&mut pending, outlets);
            if n < BATCH {
                flush.answered.store(asked, Ordering::Release);
                break;
            }
            if stop.load(Ordering::Relaxed) {
                break;
            }
        }
        if read == 0 {
            if !wait_readable(
                buffer.as_raw_fd(),
                "the mirror copies' ring buffer",
                &mut poll_failed,
            ) {
                break;
            }
            continue;
        }
        let most = if steady { LINGER_STEADY } else { LINGER };
        std::thread::sleep(linger(bytes, size, most));
    }
}

/// Reads up to [`BATCH`] records into `pending`; the records read and the
/// buffer bytes they took.
fn gather(buffer: &mut RingBuf<MapData>, pending: &mut [Pending], epoch: u64) -> (u32, usize) {
    let (mut read, mut bytes) = (0, 0);
    while read < BATCH {
        let Some(item) = buffer.next() else {
            break;
        };
        read += 1;
        // The kernel's 8-byte header, the record rounded up to 8.
        bytes += 8 + item.len().next_multiple_of(8);
        let Some((head, data)) = parse(&item) else {
            continue;
        };
        // Records of no ring, or of a ring gone from its slot, are dropped.
        let Some(p) = pending
            .get_mut(head.ring as usize)
            .filter(|p| p.generation != 0 && p.generation == head.generation)
        else {
            continue;
        };
        let ts = SystemTime::UNIX_EPOCH + Duration::from_nanos(head.ts_ns.saturating_add(epoch));
        push_record(&mut p.records, &head, data, ts);
        p.frames += 1;
    }
    (read, bytes)
}

/// Takes each slot's current generation (0: no ring) for the next batch.
fn generations(pending: &mut [Pending], outlets: &Mutex<Vec<Option<Outlet>>>) {
    let outlets = outlets.lock().unwrap_or_else(|e| e.into_inner());
    for (p, outlet) in pending.iter_mut().zip(outlets.iter()) {
        p.generation = outlet.as_ref().map_or(0, |o| o.generation);
    }
}

/// Hands each ring's pending records to its consumers as one batch; true
/// if a ring forwards its copies.
fn dispatch(pending: &mut [Pending], outlets: &Mutex<Vec<Option<Outlet>>>) -> bool {
    let outlets = outlets.lock().unwrap_or_else(|e| e.into_inner());
    for (p, outlet) in pending.iter_mut().zip(outlets.iter()) {
        if p.frames == 0 {
            continue;
        }
        let batch = Batch {
            frames: std::mem::take(&mut p.frames),
            records: std::mem::take(&mut p.records),
        };
        // A ring detached (or replaced) meanwhile: its copies have no one to go to.
        if let Some(o) = outlet.as_ref().filter(|o| o.generation == p.generation) {
            o.shared.received.fetch_add(batch.frames, Ordering::Relaxed);
            offer(Arc::new(batch), &o.queues, &o.shared, FED_QUEUE_DEPTH);
        }
    }
    outlets.iter().flatten().any(|o| o.steady)
}

/// The pause after a round that took `bytes` of the buffer: `most` when
/// that was little, shorter as it nears an eighth of the buffer, none
/// beyond, so the buffer stays mostly free at any rate the reader keeps up
/// with.
fn linger(bytes: usize, size: u32, most: Duration) -> Duration {
    let eighth = f64::from(size) / 8.0;
    most.mul_f64((1.0 - bytes as f64 / eighth).max(0.0))
}

/// The record's head and its bytes, if the record is whole.
fn parse(record: &[u8]) -> Option<(CopyHead, &[u8])> {
    let head = record.get(..HEAD)?;
    // SAFETY: HEAD bytes; CopyHead is plain data, read unaligned.
    let head: CopyHead = unsafe { std::ptr::read_unaligned(head.as_ptr().cast()) };
    let bytes = record.get(HEAD..HEAD + head.caplen as usize)?;
    Some((head, bytes))
}

/// Appends a pcap record; an offloaded VLAN tag goes back in after the MACs.
fn push_record(records: &mut Vec<u8>, head: &CopyHead, bytes: &[u8], ts: SystemTime) {
    let len = head.len as usize;
    if head.vlan_proto == 0 || bytes.len() < 12 {
        records.extend_from_slice(&record_header_cut(len, bytes.len(), ts));
        records.extend_from_slice(&bytes[..bytes.len().min(SNAPLEN as usize)]);
        return;
    }
    // With the tag the record still holds at most SNAPLEN bytes.
    let bytes = &bytes[..bytes.len().min(SNAPLEN as usize - 4)];
    records.extend_from_slice(&record_header_cut(len + 4, bytes.len() + 4, ts));
    records.extend_from_slice(&bytes[..12]);
    records.extend_from_slice(&head.vlan_proto.to_be_bytes());
    records.extend_from_slice(&head.vlan_tci.to_be_bytes());
    records.extend_from_slice(&bytes[12..]);
}

fn realtime_minus_monotonic() -> u64 {
    let now = |clock| {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: a valid timespec to write into.
        unsafe { libc::clock_gettime(clock, &mut ts) };
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    };
    now(libc::CLOCK_REALTIME).saturating_sub(now(libc::CLOCK_MONOTONIC))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tapmesh_common::mirror::COPY_RING_BYTES;

    fn head(len: u32, caplen: u32, vlan_proto: u16, vlan_tci: u16) -> CopyHead {
        CopyHead {
            ts_ns: 0,
            len,
            caplen,
            ring: 3,
            generation: 1,
            vlan_proto,
            vlan_tci,
            _pad: 0,
        }
    }

    #[test]
    fn a_tag_put_back_into_a_cut_copy_keeps_the_record_within_the_snap_length() {
        let frame = vec![7u8; 65535];
        let ts = SystemTime::UNIX_EPOCH;
        let mut records = Vec::new();
        push_record(&mut records, &head(70000, 65535, 0x8100, 5), &frame, ts);
        assert_eq!(&records[..16], &record_header_cut(70004, 65535, ts));
        assert_eq!(
            records.len(),
            16 + 65535,
            "the header's incl_len bytes follow"
        );
    }

    #[test]
    fn the_pause_shrinks_as_a_round_takes_more_of_the_buffer() {
        let eighth = COPY_RING_BYTES as usize / 8;
        let size = COPY_RING_BYTES;
        assert_eq!(linger(0, size, LINGER), LINGER);
        assert_eq!(linger(eighth / 2, size, LINGER), LINGER / 2);
        assert_eq!(linger(eighth / 2, size, LINGER_STEADY), LINGER_STEADY / 2);
        assert_eq!(linger(eighth, size, LINGER), Duration::ZERO);
        assert_eq!(linger(eighth * 3, size, LINGER), Duration::ZERO);
        assert_eq!(linger(eighth / 2, size * 2, LINGER), LINGER * 3 / 4);
    }

    #[test]
    fn a_record_is_its_head_and_caplen_bytes() {
        let h = head(70, 4, 0, 0);
        let mut record = vec![0u8; HEAD];
        // SAFETY: HEAD bytes written from a CopyHead.
        unsafe { std::ptr::write_unaligned(record.as_mut_ptr().cast(), h) };
        record.extend_from_slice(&[1, 2, 3, 4, 9, 9]);
        let (got, bytes) = parse(&record).unwrap();
        assert_eq!((got, bytes), (h, &[1u8, 2, 3, 4][..]));
        assert!(parse(&record[..HEAD + 3]).is_none(), "cut short");
        assert!(parse(&record[..HEAD - 1]).is_none());
    }

    #[test]
    fn an_offloaded_tag_goes_back_after_the_macs() {
        let frame: Vec<u8> = (0..20).collect();
        let ts = SystemTime::UNIX_EPOCH + Duration::from_micros(5_000_007);
        let mut records = Vec::new();
        push_record(&mut records, &head(20, 20, 0x8100, 0x2_00a), &frame, ts);
        let want_header = record_header_cut(24, 24, ts);
        assert_eq!(&records[..16], &want_header);
        assert_eq!(&records[16..28], &frame[..12]);
        assert_eq!(&records[28..32], &[0x81, 0x00, 0x20, 0x0a]);
        assert_eq!(&records[32..], &frame[12..]);

        let mut plain = Vec::new();
        push_record(&mut plain, &head(1000, 20, 0, 0), &frame, ts);
        assert_eq!(&plain[..16], &record_header_cut(1000, 20, ts));
        assert_eq!(&plain[16..], &frame[..]);
    }
}
