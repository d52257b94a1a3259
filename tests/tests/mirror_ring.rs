//! AF_XDP mirror rings on a real kernel. In one namespace:
//!
//! ```text
//!  A ──veth── B  (tm_xdp_mirror: every frame → tm_xsks[0] = the ring's AF_XDP socket)
//!                      MirrorRing ─▶ pcap file(s)
//!                                 └▶ forward out of C ──veth── D (captured)
//! ```
//!
//! Frames are written raw out of A; what the ring received, what its
//! consumers delivered or lost, the pcap file (read back by hand and by
//! tshark) and what D received are all compared with what was sent.

use std::{
    ffi::CString,
    io::Read,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use aya::{
    maps::{HashMap, XskMap},
    programs::{Xdp, XdpMode},
    Ebpf,
};
use tapmesh::mirror::ring::{Consumer, ConsumerStats, MirrorRing, RingSocket, RingStats};
use tapmesh_common::{map_names, program_names};
use tapmesh_tests::{
    frames::{ethernet, ipv4, udp_v4, MAC_A, MAC_B, UDP, V4_A, V4_B},
    kernel_tests_enabled,
    net::{run_in, wait_until},
    send_frames, unique, Netns,
};

/// A directory removed (with its contents) on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let path = std::env::temp_dir().join(unique("tmring"));
        std::fs::create_dir_all(&path).expect("creating a temp dir");
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A namespace with veth pairs A↔B (the ring) and C↔D (a forward target), all up.
struct Lab {
    netns: Netns,
    a: String,
    b: String,
    c: String,
    d: String,
}

impl Lab {
    fn new(label: &str) -> Self {
        let netns = Netns::new(label);
        let [a, b, c, d] = ["a", "b", "c", "d"].map(|x| unique(&format!("tm{x}")));
        for (x, y) in [(&a, &b), (&c, &d)] {
            netns.ip(&["link", "add", x, "type", "veth", "peer", "name", y]);
        }
        for x in [&a, &b, &c, &d] {
            netns.ip(&["link", "set", x, "up"]);
        }
        Lab { netns, a, b, c, d }
    }
}

/// Native XDP, else generic (as the daemon attaches it).
const AUTO: &[(XdpMode, &str)] = &[(XdpMode::Driver, "native"), (XdpMode::Skb, "generic")];
/// Generic XDP only.
const GENERIC: &[(XdpMode, &str)] = &[(XdpMode::Skb, "generic")];

/// The BPF object with `tm_xdp_mirror` on `interface` (the first of `modes`
/// that works) redirecting into `socket` (slot 0). Call inside the namespace;
/// keep the result alive.
fn mirror_into(interface: &str, socket: &RingSocket, modes: &[(XdpMode, &str)]) -> Ebpf {
    let mut ebpf = Ebpf::load(tapmesh::dataplane::BPF_OBJECT).expect("loading the BPF object");
    let program: &mut Xdp = ebpf
        .program_mut(program_names::XDP_MIRROR)
        .expect("tm_xdp_mirror in the object")
        .try_into()
        .expect("an XDP program");
    program.load().expect("loading tm_xdp_mirror");
    let mut errors = Vec::new();
    let mut attached = false;
    for &(mode, label) in modes {
        match program.attach(interface, mode) {
            Ok(_) => {
                eprintln!("tm_xdp_mirror on {interface}: {label} XDP");
                attached = true;
                break;
            }
            Err(e) => errors.push(format!("{label}: {e}")),
        }
    }
    assert!(
        attached,
        "attaching tm_xdp_mirror to {interface}: {errors:?}"
    );
    let ifindex = tapmesh::net::link::index(interface).expect("ring interface index");
    let mut rings: HashMap<_, u32, u32> = HashMap::try_from(
        ebpf.map_mut(map_names::MIRROR_RINGS)
            .expect("tm_mirror_rings"),
    )
    .expect("tm_mirror_rings as a hash map");
    rings
        .insert(ifindex, 0, 0)
        .expect("tm_mirror_rings[ring] = 0");
    let mut xsks = XskMap::try_from(ebpf.map_mut(map_names::XSKS).expect("tm_xsks"))
        .expect("tm_xsks as an XSKMAP");
    xsks.set(0, socket.fd(), 0).expect("tm_xsks[0] = socket");
    ebpf
}

/// Distinct UDP frames (60-124 bytes): frame `i` has source port 20000 + i and
/// carries `i` in its payload.
fn udp_frames(n: u32) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let mut data = i.to_be_bytes().to_vec();
            data.extend((0..14 + i % 64).map(|k| (i as u8).wrapping_mul(31).wrapping_add(k as u8)));
            ethernet(
                MAC_B,
                MAC_A,
                &[],
                0x0800,
                &ipv4(
                    V4_A,
                    V4_B,
                    UDP,
                    &[],
                    &udp_v4(V4_A, V4_B, 20000 + i as u16, 40000, &data),
                ),
            )
        })
        .collect()
}

/// The records of a classic pcap stream (checking the global header and record lengths).
fn pcap_records(bytes: &[u8]) -> Vec<Vec<u8>> {
    assert!(bytes.len() >= 24, "pcap shorter than its header");
    let word = |at: usize| u32::from_ne_bytes(bytes[at..at + 4].try_into().unwrap());
    assert_eq!(word(0), 0xa1b2_c3d4, "magic");
    assert_eq!(
        &bytes[4..8],
        &[2u16.to_ne_bytes(), 4u16.to_ne_bytes()].concat()[..]
    );
    assert_eq!(word(16), 65535, "snaplen");
    assert_eq!(word(20), 1, "linktype");
    let mut records = Vec::new();
    let mut at = 24;
    while at < bytes.len() {
        assert!(at + 16 <= bytes.len(), "truncated record header at {at}");
        let (incl, orig) = (word(at + 8) as usize, word(at + 12) as usize);
        assert_eq!(incl, orig, "record at {at} was cut");
        assert!(at + 16 + incl <= bytes.len(), "truncated record at {at}");
        records.push(bytes[at + 16..at + 16 + incl].to_vec());
        at += 16 + incl;
    }
    records
}

/// `tshark -r path`: (frame.len, udp.srcport) of every packet.
fn tshark(path: &Path) -> Vec<(usize, u16)> {
    let out = Command::new("tshark")
        .args(["-n", "-r"])
        .arg(path)
        .args(["-T", "fields", "-e", "frame.len", "-e", "udp.srcport"])
        .output()
        .expect("running tshark");
    assert!(
        out.status.success(),
        "tshark -r {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| {
            let mut fields = line.split('\t');
            let len = fields.next().and_then(|f| f.parse().ok());
            let port = fields.next().and_then(|f| f.parse().ok());
            match (len, port) {
                (Some(len), Some(port)) => (len, port),
                _ => panic!("tshark line {line:?}"),
            }
        })
        .collect()
}

/// An AF_PACKET socket capturing what arrives on `interface` (call inside its namespace).
fn capture_socket(interface: &str) -> OwnedFd {
    let index = tapmesh::net::link::index(interface).expect("capture interface");
    let all = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket calls with checked results.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(all));
        assert!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
        let socket = OwnedFd::from_raw_fd(fd);
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = all;
        addr.sll_ifindex = index as i32;
        let rc = libc::bind(
            fd,
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
        let size: i32 = 16 << 20;
        let rc = libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&size as *const i32).cast(),
            4,
        );
        assert_eq!(rc, 0, "SO_RCVBUFFORCE: {}", std::io::Error::last_os_error());
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        let rc = libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        );
        assert_eq!(rc, 0, "SO_RCVTIMEO: {}", std::io::Error::last_os_error());
        socket
    }
}

/// Frames arriving on a capture socket until `quiet` passes without one
/// (outgoing frames are not counted).
fn captured(socket: &OwnedFd, quiet: Duration) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    let mut last = Instant::now();
    let mut buf = vec![0u8; 65536];
    while last.elapsed() < quiet {
        // SAFETY: receiving into a live buffer and address of the right sizes.
        let (n, pkttype) = unsafe {
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            let n = libc::recvfrom(
                socket.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&mut addr as *mut libc::sockaddr_ll).cast(),
                &mut len,
            );
            (n, addr.sll_pkttype)
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            assert!(
                matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ),
                "recvfrom: {e}"
            );
            continue;
        }
        if pkttype != libc::PACKET_OUTGOING {
            frames.push(buf[..n as usize].to_vec());
            last = Instant::now();
        }
    }
    frames
}

fn consumer<'a>(stats: &'a RingStats, name: &str) -> &'a ConsumerStats {
    stats
        .consumers
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no consumer {name} in {stats:?}"))
}

/// N frames out of A: the ring receives each once, the pcap file holds each
/// (byte for byte, in order, readable by tshark) and D receives each.
#[test]
fn every_frame_reaches_every_consumer() {
    if kernel_tests_enabled() {
        every_frame_reaches_every_consumer_with(AUTO);
    }
}

/// The same with `tm_xdp_mirror` in generic XDP (the daemon's fallback).
#[test]
fn every_frame_reaches_every_consumer_generic_xdp() {
    if kernel_tests_enabled() {
        every_frame_reaches_every_consumer_with(GENERIC);
    }
}

fn every_frame_reaches_every_consumer_with(modes: &'static [(XdpMode, &'static str)]) {
    const N: u32 = 200;
    let lab = Lab::new("rg");
    let dir = TempDir::new();
    let pcap = dir.0.join("ring.pcap");
    let sent = udp_frames(N);
    let (netns, a, b, c, d) = (
        lab.netns.name.clone(),
        lab.a.clone(),
        lab.b.clone(),
        lab.c.clone(),
        lab.d.clone(),
    );
    let (stats, drops, at_d, stop_time) = {
        let pcap = pcap.clone();
        let sent = sent.clone();
        run_in(&lab.netns.name, move || {
            let socket = RingSocket::open(&b).expect("opening the ring socket");
            let _ebpf = mirror_into(&b, &socket, modes);
            let capture = capture_socket(&d);
            let ring = MirrorRing::start(
                socket,
                vec![Consumer::Pcap(pcap.clone()), Consumer::Forward(c.clone())],
            )
            .expect("starting the ring");
            let started = Instant::now();
            send_frames(&netns, &a, &sent);
            let all = wait_until(Duration::from_secs(20), || {
                let s = ring.stats();
                s.received >= u64::from(N)
                    && s.consumers
                        .iter()
                        .all(|c| c.delivered + c.lost >= u64::from(N))
            });
            let elapsed = started.elapsed();
            assert!(all, "not everything arrived: {:?}", ring.stats());
            eprintln!(
                "{N} frames sent and handed to both consumers in {:.1} ms",
                elapsed.as_secs_f64() * 1e3
            );
            let at_d = captured(&capture, Duration::from_millis(300));
            let drops = ring.socket_drops();
            let stopping = Instant::now();
            let stats = ring.stop();
            (stats, drops, at_d, stopping.elapsed())
        })
    };
    eprintln!("{stats:?}, socket drops {drops:?}, stop took {stop_time:?}");

    let n = u64::from(N);
    assert_eq!(stats.received, n, "{stats:?} {drops:?}");
    let p = consumer(&stats, &format!("pcap:{}", pcap.display()));
    assert_eq!((p.delivered, p.lost), (n, 0), "pcap consumer");
    let f = consumer(&stats, &format!("forward:{}", lab.c));
    assert_eq!((f.delivered, f.lost), (n, 0), "forward consumer");
    assert!(
        stop_time < Duration::from_secs(1),
        "stop took {stop_time:?}"
    );

    // The pcap file, by hand: every frame, byte for byte, in order.
    let bytes = std::fs::read(&pcap).expect("reading the pcap file");
    let records = pcap_records(&bytes);
    assert_eq!(records.len(), sent.len(), "pcap records");
    for (i, (got, want)) in records.iter().zip(&sent).enumerate() {
        assert_eq!(got, want, "pcap record {i}");
    }
    // And by tshark: N Ethernet/IPv4/UDP frames of the sent lengths and ports.
    let dissected = tshark(&pcap);
    let want: Vec<(usize, u16)> = sent
        .iter()
        .enumerate()
        .map(|(i, f)| (f.len(), 20000 + i as u16))
        .collect();
    assert_eq!(dissected, want, "tshark's reading of the pcap file");

    // D got every frame exactly once, unchanged.
    assert_eq!(at_d.len(), sent.len(), "frames received on D");
    let (mut got, mut want) = (at_d.clone(), sent.clone());
    got.sort();
    want.sort();
    assert!(got == want, "D received other frames than were sent");
    if at_d != sent {
        eprintln!("note: D received the frames in another order");
    }
}

/// A consumer that cannot keep up (a pcap "file" that is a FIFO nobody reads
/// until the end, pipe buffer 4 KiB) and one whose every send fails (a down
/// interface) lose their copies, counted; the ring still receives every
/// frame and a fast pcap consumer still gets all of them.
#[test]
fn a_slow_or_failing_consumer_loses_only_its_own_copies() {
    if !kernel_tests_enabled() {
        return;
    }
    // More than the slow consumer can absorb: its queue (8192 frames) and
    // the pipe (4 KiB); its write buffer (1 MiB) is flushed into the pipe
    // within 100 ms, i.e. before the second batch, and blocks there.
    const BATCHES: u32 = 10;
    const PER_BATCH: u32 = 2000; // < the rx ring, the fill ring and a queue
    const N: u32 = BATCHES * PER_BATCH;
    let lab = Lab::new("rl");
    lab.netns.ip(&["link", "set", &lab.c, "down"]);
    let dir = TempDir::new();
    let fast = dir.0.join("fast.pcap");
    let fifo = dir.0.join("slow.pcap");
    let fifo_c = CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid path.
    assert_eq!(unsafe { libc::mkfifo(fifo_c.as_ptr(), 0o600) }, 0, "mkfifo");
    // The read end first (non-blocking, so neither open waits for the other).
    // SAFETY: a valid path; the fd is owned at once.
    let reader = unsafe {
        let fd = libc::open(
            fifo_c.as_ptr(),
            libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC,
        );
        assert!(
            fd >= 0,
            "opening the FIFO: {}",
            std::io::Error::last_os_error()
        );
        OwnedFd::from_raw_fd(fd)
    };
    // SAFETY: fcntl on an open fd.
    let pipe_size = unsafe { libc::fcntl(reader.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) };
    assert!(
        pipe_size > 0,
        "F_SETPIPE_SZ: {}",
        std::io::Error::last_os_error()
    );

    let sent = udp_frames(N);
    let (netns, a, b, c) = (
        lab.netns.name.clone(),
        lab.a.clone(),
        lab.b.clone(),
        lab.c.clone(),
    );
    let fast_name = format!("pcap:{}", fast.display());
    let slow_name = format!("pcap:{}", fifo.display());
    let down_name = format!("forward:{c}");
    let (stats, drops, drained) = {
        let (fast, fifo, sent) = (fast.clone(), fifo.clone(), sent.clone());
        let (fast_name, down_name) = (fast_name.clone(), down_name.clone());
        run_in(&lab.netns.name, move || {
            let socket = RingSocket::open(&b).expect("opening the ring socket");
            let _ebpf = mirror_into(&b, &socket, AUTO);
            let ring = MirrorRing::start(
                socket,
                vec![
                    Consumer::Pcap(fast),
                    Consumer::Forward(c),
                    Consumer::Pcap(fifo),
                ],
            )
            .expect("starting the ring");
            let started = Instant::now();
            let mut first_batch = None;
            for (i, batch) in sent.chunks(PER_BATCH as usize).enumerate() {
                let batch_start = Instant::now();
                send_frames(&netns, &a, batch);
                let until = ((i + 1) * PER_BATCH as usize) as u64;
                let received =
                    wait_until(Duration::from_secs(20), || ring.stats().received >= until);
                first_batch.get_or_insert(batch_start.elapsed());
                // The fast consumer keeps up: it counts frames once flushed (≤ 100 ms).
                let flushed = wait_until(Duration::from_secs(20), || {
                    consumer(&ring.stats(), &fast_name).delivered >= until
                });
                assert!(
                    received && flushed,
                    "after batch {i}: {:?}, socket drops {:?}",
                    ring.stats(),
                    ring.socket_drops()
                );
            }
            let elapsed = started.elapsed();
            if let Some(first) = first_batch {
                eprintln!(
                    "first batch: {PER_BATCH} frames sent and received in {:.1} ms ({:.0} pps, sender-bound)",
                    first.as_secs_f64() * 1e3,
                    f64::from(PER_BATCH) / first.as_secs_f64()
                );
            }
            eprintln!(
                "{N} frames in {BATCHES} batches in {:.0} ms (with waits for the 100 ms flushes)",
                elapsed.as_secs_f64() * 1e3
            );
            // The down interface failed every send at once.
            let so_far = ring.stats();
            assert_eq!(consumer(&so_far, &down_name).lost, u64::from(N));
            // Now read the FIFO, so the slow consumer can finish on stop.
            let drain = std::thread::spawn(move || {
                // SAFETY: fcntl on an open fd: back to blocking reads.
                unsafe { libc::fcntl(reader.as_raw_fd(), libc::F_SETFL, 0) };
                let mut file = std::fs::File::from(reader);
                let mut bytes = Vec::new();
                file.read_to_end(&mut bytes).expect("reading the FIFO");
                bytes
            });
            let drops = ring.socket_drops();
            // The slow consumer writes out its whole queue through the
            // 4 KiB pipe: on a loaded machine that may take more than the
            // daemon's 1 s grace, which would leave copies uncounted.
            let stats = ring.stop_within(Duration::from_secs(60));
            let drained = drain.join().expect("FIFO reader");
            (stats, drops, drained)
        })
    };
    eprintln!("{stats:?}, socket drops {drops:?}");

    let n = u64::from(N);
    assert_eq!(stats.received, n, "received");
    let fast_stats = consumer(&stats, &fast_name);
    assert_eq!((fast_stats.delivered, fast_stats.lost), (n, 0), "fast pcap");
    let down = consumer(&stats, &down_name);
    assert_eq!(
        (down.delivered, down.lost),
        (0, n),
        "forward to a down interface"
    );
    let slow = consumer(&stats, &slow_name);
    assert!(slow.lost > 0, "the slow consumer lost nothing: {slow:?}");
    assert_eq!(
        slow.delivered + slow.lost,
        n,
        "slow consumer: every copy is accounted for"
    );
    // What the slow consumer delivered is exactly what came out of the FIFO,
    // and those are sent frames, in order (a subsequence of what was sent).
    let records = pcap_records(&drained);
    assert_eq!(
        records.len() as u64,
        slow.delivered,
        "records read from the FIFO"
    );
    let mut next = sent.iter();
    for (i, r) in records.iter().enumerate() {
        assert!(
            next.any(|s| s == r),
            "FIFO record {i} is not a sent frame in order"
        );
    }
    // The fast file has all of them.
    let fast_records = pcap_records(&std::fs::read(&fast).expect("reading the fast pcap"));
    assert!(
        fast_records == sent,
        "the fast pcap differs from what was sent"
    );
}

/// Consumers that cannot be opened are refused at start, naming what failed where.
#[test]
fn bad_consumers_are_refused() {
    if !kernel_tests_enabled() {
        return;
    }
    let lab = Lab::new("rb");
    let dir = TempDir::new();
    let (b, c) = (lab.b.clone(), lab.c.clone());
    let (missing_dir, file) = (dir.0.join("no/such/dir.pcap"), dir.0.join("x.pcap"));
    let errors = run_in(&lab.netns.name, move || {
        let mut errors = Vec::new();
        for consumers in [
            vec![Consumer::Forward("tmnosuchif".into())],
            vec![Consumer::Pcap(missing_dir)],
            vec![
                Consumer::Pcap(file.clone()),
                Consumer::Forward(c),
                Consumer::Pcap(file),
            ],
        ] {
            let socket = RingSocket::open(&b).expect("opening the ring socket");
            match MirrorRing::start(socket, consumers) {
                Ok(_) => panic!("started with bad consumers"),
                Err(e) => errors.push(e.to_string()),
            }
        }
        // The socket was closed with each refused ring: the queue is free again
        // (open waits while the kernel releases it).
        let reopening = Instant::now();
        drop(RingSocket::open(&b).expect("reopening the ring socket"));
        eprintln!("reopened the ring socket in {:?}", reopening.elapsed());
        errors.push(
            RingSocket::open("tmnosuchif")
                .expect_err("a socket on a missing interface")
                .to_string(),
        );
        errors
    });
    eprintln!("{errors:#?}");
    assert!(errors[0].contains("forward:tmnosuchif") && errors[0].contains(&lab.b));
    assert!(errors[1].contains("No such file") && errors[1].contains("no/such/dir"));
    assert!(errors[2].contains("given twice"));
    assert!(errors[3].contains("tmnosuchif") && errors[3].contains("does not exist"));
}
