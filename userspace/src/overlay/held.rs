//! Packets a container sent to a service IP no table named yet. The kernel
//! hands them over (`tm_ov_held`) instead of dropping them; once the
//! cluster's table names the address they are sent again, from the
//! container's side of its veth, and the host-side program translates them
//! as any other. So a first packet is not lost to the query (a TCP
//! handshake does not wait a second for its retry). Bounded: a few per
//! address, for as long as a query may take.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// Packets kept per address: the first of a flow, and a few retries or
/// other flows to the same address.
pub const PER_ADDRESS: usize = 8;
/// Addresses with packets kept.
pub const ADDRESSES: usize = 256;
/// How long a packet waits for its address (Oakestra's blocking table
/// query gives up after 5 s).
pub const KEPT: Duration = Duration::from_secs(5);

struct Packet {
    ifindex: u32,
    frame: Vec<u8>,
    at: Instant,
}

/// The packets waiting, by the service IP they were sent to.
#[derive(Default)]
pub struct HeldPackets {
    by_address: BTreeMap<IpAddr, VecDeque<Packet>>,
    /// The service IPs the tables named at their last write: a packet for
    /// one of them that reaches the daemon only now goes on at once.
    named: BTreeSet<IpAddr>,
    /// Kept, sent again, and given up (no room, or never named in time).
    pub kept: u64,
    pub sent: u64,
    pub dropped: u64,
}

impl HeldPackets {
    /// Keeps `frame`, held at `at`, which came in on host-side veth
    /// `ifindex`. Returns its address when the tables name it already (the
    /// caller sends it on).
    pub fn keep(
        &mut self,
        ifindex: u32,
        frame: &[u8],
        at: Instant,
        now: Instant,
    ) -> Option<IpAddr> {
        self.expire(now);
        let Some(to) = destination(frame) else {
            self.dropped += 1;
            return None;
        };
        if now.duration_since(at) >= KEPT {
            self.dropped += 1;
            return None;
        }
        if !self.by_address.contains_key(&to) && self.by_address.len() >= ADDRESSES {
            self.dropped += 1;
            return None;
        }
        let queue = self.by_address.entry(to).or_default();
        if queue.len() >= PER_ADDRESS {
            self.dropped += 1;
            return None;
        }
        queue.push_back(Packet {
            ifindex,
            frame: frame.to_vec(),
            at,
        });
        self.kept += 1;
        self.named.contains(&to).then_some(to)
    }

    /// What the tables name now.
    pub fn set_named(&mut self, named: BTreeSet<IpAddr>) {
        self.named = named;
    }

    /// The packets for `addresses`, in the order they came, by veth.
    pub fn take(&mut self, addresses: &[IpAddr], now: Instant) -> BTreeMap<u32, Vec<Vec<u8>>> {
        self.expire(now);
        let mut out: BTreeMap<u32, Vec<Vec<u8>>> = BTreeMap::new();
        for a in addresses {
            for p in self.by_address.remove(a).into_iter().flatten() {
                out.entry(p.ifindex).or_default().push(p.frame);
            }
        }
        out
    }

    /// Packets waiting.
    pub fn waiting(&self) -> usize {
        self.by_address.values().map(VecDeque::len).sum()
    }

    /// Addresses with packets waiting.
    pub fn addresses(&self) -> Vec<IpAddr> {
        self.by_address.keys().copied().collect()
    }

    /// Gives up the packets that waited [`KEPT`].
    pub fn expire(&mut self, now: Instant) {
        let mut dropped = 0;
        self.by_address.retain(|_, queue| {
            let before = queue.len();
            queue.retain(|p| now.duration_since(p.at) < KEPT);
            dropped += (before - queue.len()) as u64;
            !queue.is_empty()
        });
        self.dropped += dropped;
    }
}

const ETH_HEADER: usize = 14;

/// The destination address of an Ethernet frame carrying IPv4 or IPv6.
pub fn destination(frame: &[u8]) -> Option<IpAddr> {
    address(frame, 16, 24)
}

/// The source address, as [`destination`].
pub fn source(frame: &[u8]) -> Option<IpAddr> {
    address(frame, 12, 8)
}

/// The address at `v4` (IPv4 header offset) or `v6` (IPv6).
fn address(frame: &[u8], v4: usize, v6: usize) -> Option<IpAddr> {
    let ip = frame.get(ETH_HEADER..)?;
    match u16::from_be_bytes([frame[12], frame[13]]) {
        0x0800 => {
            let a: [u8; 4] = ip.get(v4..v4 + 4)?.try_into().ok()?;
            Some(Ipv4Addr::from(a).into())
        }
        0x86dd => {
            let a: [u8; 16] = ip.get(v6..v6 + 16)?.try_into().ok()?;
            Some(Ipv6Addr::from(a).into())
        }
        _ => None,
    }
}

/// Completes the TCP, UDP or ICMPv6 checksum of an unfragmented packet
/// that holds the unfinished form a container's kernel leaves for the veth
/// to offload (the folded pseudo-header sum): a frame sent again from a
/// packet socket is taken as is. A checksum that is right, or wrong in any
/// other way, stays (a corrupt packet is not repaired); fragments and
/// extension headers are left alone.
pub fn finish_checksum(frame: &mut [u8]) {
    let Some(proto) = frame.get(12..14) else {
        return;
    };
    match u16::from_be_bytes([proto[0], proto[1]]) {
        0x0800 => finish_v4(frame),
        0x86dd => finish_v6(frame),
        _ => {}
    }
}

fn finish_v4(frame: &mut [u8]) {
    let Some(ip) = frame.get(ETH_HEADER..) else {
        return;
    };
    if ip.len() < 20 {
        return;
    }
    let header = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let fragmented = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0;
    if header < 20 || total < header || total > ip.len() || fragmented {
        return;
    }
    let (protocol, src, dst) = (
        ip[9],
        [ip[12], ip[13], ip[14], ip[15]],
        [ip[16], ip[17], ip[18], ip[19]],
    );
    let l4 = ETH_HEADER + header..ETH_HEADER + total;
    let length = total - header;
    let at = match protocol {
        6 => 16,
        17 => 6,
        _ => return,
    };
    if length < at + 2 {
        return;
    }
    let pseudo = add(0, &src) + add(0, &dst) + u64::from(protocol) + length as u64;
    complete(&mut frame[l4], at, pseudo, protocol == 17);
}

/// Writes the checksum at `at` of `segment` if it holds the offload form
/// of `pseudo` (see [`finish_checksum`]).
fn complete(segment: &mut [u8], at: usize, pseudo: u64, udp: bool) {
    let field = u16::from_be_bytes([segment[at], segment[at + 1]]);
    // A UDP datagram sent without a checksum keeps none.
    if udp && field == 0 {
        return;
    }
    if field != !fold(pseudo) {
        return;
    }
    segment[at] = 0;
    segment[at + 1] = 0;
    let mut checksum = fold(add(pseudo, segment));
    if udp && checksum == 0 {
        checksum = 0xffff;
    }
    segment[at..at + 2].copy_from_slice(&checksum.to_be_bytes());
}

fn finish_v6(frame: &mut [u8]) {
    let Some(ip) = frame.get(ETH_HEADER..) else {
        return;
    };
    if ip.len() < 40 {
        return;
    }
    let payload = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    let next = ip[6];
    if 40 + payload > ip.len() {
        return;
    }
    let mut pseudo = add(0, &ip[8..40]);
    let at = match next {
        6 => 16,
        17 => 6,
        58 => 2,
        _ => return,
    };
    if payload < at + 2 {
        return;
    }
    pseudo += u64::from(next) + payload as u64;
    complete(
        &mut frame[ETH_HEADER + 40..ETH_HEADER + 40 + payload],
        at,
        pseudo,
        next == 17,
    );
}

/// Adds `bytes` as big-endian 16-bit words (a last odd byte padded).
fn add(mut sum: u64, bytes: &[u8]) -> u64 {
    let mut words = bytes.chunks_exact(2);
    for w in &mut words {
        sum += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        sum += u64::from(u16::from_be_bytes([*last, 0]));
    }
    sum
}

/// The one's complement of the folded sum.
fn fold(mut sum: u64) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// `CLOCK_MONOTONIC` in nanoseconds, the kernel's `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes the given timespec only.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    (t.tv_sec as u64).saturating_mul(1_000_000_000) + t.tv_nsec as u64
}

/// Sends `frames` out of interface `index` of namespace `netns` (a
/// container's own end of its veth, found from the host side's peer
/// index, not by a name the container could give another interface),
/// checksums completed. `announce` gets the sending socket's cookie (0 if
/// unknown) before the first frame goes. Returns how many were sent, and
/// the cookie.
pub fn send_from(
    netns: &File,
    index: u32,
    frames: Vec<Vec<u8>>,
    announce: impl FnOnce(u64) + Send,
) -> std::io::Result<(usize, u64)> {
    crate::net::netns::run_in(netns, move || {
        let socket = packet_socket()?;
        let cookie = socket_cookie(&socket);
        announce(cookie);
        let mut sent = 0;
        for mut frame in frames {
            if frame.len() < ETH_HEADER {
                continue;
            }
            finish_checksum(&mut frame);
            // SAFETY: a zeroed sockaddr_ll naming the interface; the frame is
            // a live buffer of its length.
            let rc = unsafe {
                let mut to: libc::sockaddr_ll = std::mem::zeroed();
                to.sll_family = libc::AF_PACKET as u16;
                to.sll_protocol = u16::from_ne_bytes([frame[12], frame[13]]);
                to.sll_ifindex = index as i32;
                to.sll_halen = 6;
                to.sll_addr[..6].copy_from_slice(&frame[..6]);
                libc::sendto(
                    std::os::fd::AsRawFd::as_raw_fd(&socket),
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    (&to as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            if rc >= 0 {
                sent += 1;
            }
        }
        Ok((sent, cookie))
    })?
}

/// The kernel's cookie of `socket` (what `bpf_get_socket_cookie` reads), 0
/// if it cannot say.
fn socket_cookie(socket: &OwnedFd) -> u64 {
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: writes at most `len` bytes into `cookie`.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(socket),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        cookie
    } else {
        0
    }
}

/// An AF_PACKET socket that only sends (protocol 0 receives nothing).
fn packet_socket() -> std::io::Result<OwnedFd> {
    // SAFETY: a plain socket call; the descriptor is owned at once.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn udp4(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + 8];
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        let total = (20 + 8 + payload.len()) as u16;
        f[14] = 0x45;
        f[16..18].copy_from_slice(&total.to_be_bytes());
        f[14 + 8] = 64;
        f[14 + 9] = 17;
        f[14 + 12..14 + 16].copy_from_slice(&[192, 0, 2, 1]);
        f[14 + 16..14 + 20].copy_from_slice(&[198, 51, 100, 7]);
        f[34..36].copy_from_slice(&4000u16.to_be_bytes());
        f[36..38].copy_from_slice(&53u16.to_be_bytes());
        f[38..40].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// The sum over pseudo-header and segment of a correct checksum is 0xffff.
    fn verifies_v4(f: &[u8]) -> bool {
        let ip = &f[14..];
        let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        let sum = add(0, &ip[12..20]) + 17 + (total - 20) as u64;
        fold(add(sum, &ip[20..total])) == 0
    }

    /// What a container leaves for offload: the folded pseudo-header sum.
    fn offload_form(f: &mut [u8]) {
        let ip = &f[14..];
        let length = u16::from_be_bytes([ip[2], ip[3]]) - 20;
        let pseudo = add(0, &ip[12..20]) + 17 + u64::from(length);
        let partial = !fold(pseudo);
        f[40..42].copy_from_slice(&partial.to_be_bytes());
    }

    #[test]
    fn an_unfinished_udp_checksum_is_completed_and_others_stay() {
        let mut f = udp4(b"hello");
        offload_form(&mut f);
        finish_checksum(&mut f);
        assert!(verifies_v4(&f), "{:02x?}", &f[40..42]);
        // Right already: unchanged.
        let done = f.clone();
        finish_checksum(&mut f);
        assert_eq!(f, done);
        // Corrupt: not repaired.
        let mut bad = udp4(b"hello");
        bad[40..42].copy_from_slice(&[0x12, 0x34]);
        let before = bad.clone();
        finish_checksum(&mut bad);
        assert_eq!(bad, before);
        // None: stays none.
        let mut none = udp4(b"hello");
        finish_checksum(&mut none);
        assert_eq!(&none[40..42], &[0, 0]);
    }

    #[test]
    fn a_later_fragment_is_left_alone() {
        let mut f = udp4(b"hello");
        offload_form(&mut f);
        f[14 + 6..14 + 8].copy_from_slice(&0x2000u16.to_be_bytes());
        let before = f.clone();
        finish_checksum(&mut f);
        assert_eq!(f, before);
    }

    #[test]
    fn packets_are_kept_per_address_within_bounds_and_expire() {
        let mut held = HeldPackets::default();
        let t0 = Instant::now();
        let f = udp4(b"x");
        for _ in 0..PER_ADDRESS + 2 {
            assert_eq!(held.keep(7, &f, t0, t0), None);
        }
        assert_eq!((held.kept, held.dropped), (PER_ADDRESS as u64, 2));
        let to: IpAddr = Ipv4Addr::new(198, 51, 100, 7).into();
        assert_eq!(held.addresses(), [to]);
        let taken = held.take(&[to], t0);
        assert_eq!(taken[&7].len(), PER_ADDRESS);
        assert!(held.addresses().is_empty());
        held.keep(7, &f, t0, t0);
        assert!(held.take(&[to], t0 + KEPT).is_empty());
        assert_eq!(held.dropped, 3);
        // One that waited its time in the ring is not kept; one for an
        // address named meanwhile is handed back at once.
        assert_eq!(held.keep(7, &f, t0, t0 + KEPT), None);
        assert_eq!(held.dropped, 4);
        held.set_named([to].into());
        assert_eq!(held.keep(7, &f, t0 + KEPT, t0 + KEPT), Some(to));
        assert_eq!(held.take(&[to], t0 + KEPT)[&7].len(), 1);
    }
}
