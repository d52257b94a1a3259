//! Real traffic through the load balancer: a lab of namespaces (client, node
//! running the daemon on its uplink, targets holding the VIPs), and small
//! senders and receivers that run inside a namespace on their own thread.
//!
//! ```text
//!  client ──(uplink veth, XDP on the node side)── node ──(veth per target)── target i
//!  198.18.0.2                           198.18.0.1 | 198.18.<10+i>.1    198.18.<10+i>.2, VIPs on lo
//! ```
//!
//! The client routes 203.0.113.0/24 and 198.18.0.0/15 through the node; each
//! target's default route is the node, so replies go back by normal routing.
//! Neighbours are static and IPv6 is off, so counters are exact.

use std::{
    collections::HashMap,
    io::{ErrorKind, Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc, Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use tapmesh::{
    admin::proto::{Count, LbListing, ListLbRequest, StatusResponse, TargetId},
    lb::flows::{FlowSpec, VipSpec},
    lb::model::{LbSpec, StreamSpec, TargetSpec, TargetVia},
};

use crate::{fmt_mac, link, unique, Daemon, Netns};

/// The client's address on the uplink.
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// The node's address on the uplink (the client's next hop).
pub const NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

// ---------------------------------------------------------------------------
// Running code inside a namespace

/// Runs `f` on a new thread that has entered namespace `netns` (the caller's
/// thread never changes namespace).
pub fn spawn_in<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<T> {
    let netns = netns.to_string();
    std::thread::Builder::new()
        .name(format!("in-{netns}"))
        .spawn(move || {
            tapmesh::net::netns::enter(&netns)
                .unwrap_or_else(|e| panic!("entering namespace {netns}: {e}"));
            f()
        })
        .expect("spawning a thread")
}

/// Runs `f` inside namespace `netns` and returns its result (a panic in `f` is re-raised here).
pub fn run_in<T: Send + 'static>(netns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    match spawn_in(netns, f).join() {
        Ok(v) => v,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// A steady UDP flow from `CLIENT` to one address, one datagram every `gap`
/// on a fixed schedule (each carries its sequence number), on a thread of
/// its own until [`SteadyUdp::finish`]: a flow for loss across a restart,
/// however long the restart takes.
pub struct SteadyUdp {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    thread: JoinHandle<()>,
}

impl SteadyUdp {
    /// Datagrams sent so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }

    /// Stops the flow; returns how many datagrams it sent.
    pub fn finish(self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        if let Err(panic) = self.thread.join() {
            std::panic::resume_unwind(panic);
        }
        self.sent.load(Ordering::SeqCst)
    }
}

/// Starts a [`SteadyUdp`] flow from `netns` to `to`.
pub fn steady_udp(netns: &str, to: SocketAddrV4, gap: Duration) -> SteadyUdp {
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let (stopping, counting) = (stop.clone(), sent.clone());
    let thread = spawn_in(netns, move || {
        let socket = UdpSocket::bind(SocketAddrV4::new(CLIENT, 0)).expect("bind");
        let start = Instant::now();
        let mut i: u32 = 0;
        while !stopping.load(Ordering::SeqCst) {
            let due = start + gap * i;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            socket.send_to(&i.to_be_bytes(), to).expect("send");
            i += 1;
            counting.store(u64::from(i), Ordering::SeqCst);
        }
    });
    SteadyUdp { stop, sent, thread }
}

/// Polls `done` every 10 ms until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A thread inside a namespace serving until stopped (or dropped); a panic
/// in it is raised again when it stops.
struct Worker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Runs `open` and then `serve` on a thread in `netns`; returns once
    /// `open` succeeded (panics, naming `what`, if it failed or took over
    /// 30 s). `serve` runs until the flag it is given is set.
    fn start<S: 'static>(
        netns: &str,
        what: &str,
        open: impl FnOnce() -> Result<S, String> + Send + 'static,
        serve: impl FnOnce(S, &AtomicBool) + Send + 'static,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready, opened) = mpsc::channel();
        let thread = {
            let stop = stop.clone();
            spawn_in(netns, move || match open() {
                Ok(opened) => {
                    let _ = ready.send(Ok(()));
                    serve(opened, &stop);
                }
                Err(e) => {
                    let _ = ready.send(Err(e));
                }
            })
        };
        match opened.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("opening {what} in {netns}: {e}"),
            Err(e) => panic!("{what} in {netns} did not start: {e}"),
        }
        Worker {
            stop,
            thread: Some(thread),
        }
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            if let Err(panic) = thread.join() {
                if !std::thread::panicking() {
                    std::panic::resume_unwind(panic);
                }
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.halt();
    }
}

/// A larger receive buffer than `rmem_max` allows (root only), so bursts are not dropped.
fn force_receive_buffer(fd: std::os::fd::RawFd, bytes: i32) {
    // SAFETY: setsockopt on an open socket with a properly sized int.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&bytes as *const i32).cast(),
            std::mem::size_of::<i32>() as u32,
        )
    };
    assert_eq!(rc, 0, "SO_RCVBUFFORCE: {}", std::io::Error::last_os_error());
}

// ---------------------------------------------------------------------------
// UDP

/// Datagrams one receiver got, per source address.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Received {
    pub from: HashMap<SocketAddrV4, u64>,
}

impl Received {
    pub fn total(&self) -> u64 {
        self.from.values().sum()
    }

    /// Datagrams from one source.
    pub fn of(&self, src: SocketAddrV4) -> u64 {
        self.from.get(&src).copied().unwrap_or(0)
    }

    /// Datagrams per source port (whatever the source address).
    pub fn by_port(&self) -> HashMap<u16, u64> {
        let mut out = HashMap::new();
        for (src, n) in &self.from {
            *out.entry(src.port()).or_default() += n;
        }
        out
    }
}

/// A UDP socket bound inside a namespace, counting datagrams per source
/// until stopped (or dropped).
pub struct UdpReceiver {
    worker: Worker,
    count: Arc<AtomicU64>,
    seen: Arc<Mutex<Received>>,
    pub bind: SocketAddrV4,
}

impl UdpReceiver {
    /// Binds `bind` inside `netns`; returns once the socket is bound.
    pub fn start(netns: &str, bind: SocketAddrV4) -> Self {
        let count = Arc::new(AtomicU64::new(0));
        let seen = Arc::new(Mutex::new(Received::default()));
        let open = move || {
            let socket = UdpSocket::bind(bind).map_err(|e| e.to_string())?;
            force_receive_buffer(socket.as_raw_fd(), 16 << 20);
            socket
                .set_read_timeout(Some(Duration::from_millis(20)))
                .expect("read timeout");
            Ok(socket)
        };
        let serve = {
            let (count, seen) = (count.clone(), seen.clone());
            move |socket: UdpSocket, stop: &AtomicBool| {
                let mut buf = [0u8; 2048];
                loop {
                    match socket.recv_from(&mut buf) {
                        Ok((_, SocketAddr::V4(from))) => {
                            *seen.lock().unwrap().from.entry(from).or_default() += 1;
                            count.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok((_, from)) => panic!("UDP from {from} on {bind}"),
                        // Queued datagrams are read before a stop is noticed.
                        Err(e)
                            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                        {
                            if stop.load(Ordering::SeqCst) {
                                return;
                            }
                        }
                        Err(e) => panic!("receiving on {bind}: {e}"),
                    }
                }
            }
        };
        let worker = Worker::start(netns, &format!("UDP {bind}"), open, serve);
        UdpReceiver {
            worker,
            count,
            seen,
            bind,
        }
    }

    /// Datagrams received so far (since the start, `take` does not reset it).
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    /// What was received since the start or the last `take`, and forgets it.
    pub fn take(&self) -> Received {
        std::mem::take(&mut *self.seen.lock().unwrap())
    }

    /// A copy of what was received since the start or the last `take`.
    pub fn snapshot(&self) -> Received {
        self.seen.lock().unwrap().clone()
    }

    /// Stops after reading what is queued; returns what was received since the last `take`.
    pub fn stop(mut self) -> Received {
        self.worker.halt();
        self.take()
    }
}

/// A UDP socket with SO_REUSEADDR bound to `addr`. A socket just closed may
/// still be held open by a child another test thread is forking (its copy of
/// the fd table lives until exec); with SO_REUSEADDR on both, the port can be
/// bound again at once.
pub fn bind_udp_reusable(addr: SocketAddrV4) -> std::io::Result<UdpSocket> {
    // SAFETY: plain socket calls with checked results; the fd is owned by the
    // returned socket (or closed on error).
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let socket = UdpSocket::from_raw_fd(fd);
        let one: i32 = 1;
        if libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&one as *const i32).cast(),
            4,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        let mut sa: libc::sockaddr_in = std::mem::zeroed();
        sa.sin_family = libc::AF_INET as u16;
        sa.sin_port = addr.port().to_be();
        sa.sin_addr.s_addr = u32::from_ne_bytes(addr.ip().octets());
        let len = std::mem::size_of::<libc::sockaddr_in>() as u32;
        if libc::bind(fd, (&sa as *const libc::sockaddr_in).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(socket)
    }
}

/// Sends from namespace `netns` `rounds` datagrams on each flow `src:port`
/// (one socket per flow, bound to that address and port) to `dst`: first one
/// datagram on every flow, then the next round. Every 64 datagrams it pauses
/// 1 ms so no queue on the way overflows. Returns the datagrams sent.
pub fn send_udp_flows(
    netns: &str,
    src: Ipv4Addr,
    ports: &[u16],
    dst: SocketAddrV4,
    rounds: u32,
    payload: &[u8],
) -> u64 {
    let ports = ports.to_vec();
    let payload = payload.to_vec();
    run_in(netns, move || {
        let mut sent = 0u64;
        for _ in 0..rounds {
            for &port in &ports {
                let socket = bind_udp_reusable(SocketAddrV4::new(src, port))
                    .unwrap_or_else(|e| panic!("binding UDP {src}:{port}: {e}"));
                let n = socket
                    .send_to(&payload, dst)
                    .unwrap_or_else(|e| panic!("sending {src}:{port} -> {dst}: {e}"));
                assert_eq!(n, payload.len());
                sent += 1;
                if sent.is_multiple_of(64) {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
        sent
    })
}

// ---------------------------------------------------------------------------
// TCP

/// A TCP echo server inside a namespace: each connection is read to its end
/// and everything read is sent back, then closed. Counts completed echoes.
pub struct TcpEchoServer {
    // Stops (and joins) the server thread when dropped.
    _worker: Worker,
    echoed: Arc<AtomicU64>,
    pub bind: SocketAddrV4,
}

impl TcpEchoServer {
    pub fn start(netns: &str, bind: SocketAddrV4) -> Self {
        let echoed = Arc::new(AtomicU64::new(0));
        let open = move || {
            let listener = TcpListener::bind(bind).map_err(|e| e.to_string())?;
            listener
                .set_nonblocking(true)
                .expect("non-blocking listener");
            Ok(listener)
        };
        let serve = {
            let echoed = echoed.clone();
            move |listener: TcpListener, stop: &AtomicBool| {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((mut conn, _)) => {
                            conn.set_nonblocking(false).expect("blocking connection");
                            conn.set_read_timeout(Some(Duration::from_secs(3)))
                                .expect("timeout");
                            conn.set_write_timeout(Some(Duration::from_secs(3)))
                                .expect("timeout");
                            let mut data = Vec::new();
                            if conn.read_to_end(&mut data).is_ok() && conn.write_all(&data).is_ok()
                            {
                                echoed.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(2))
                        }
                        Err(e) => panic!("accepting on {bind}: {e}"),
                    }
                }
            }
        };
        let worker = Worker::start(netns, &format!("TCP {bind}"), open, serve);
        TcpEchoServer {
            _worker: worker,
            echoed,
            bind,
        }
    }

    /// Connections echoed to their end so far.
    pub fn echoed(&self) -> u64 {
        self.echoed.load(Ordering::SeqCst)
    }
}

/// From namespace `netns`, one connection to `dst` per message, one after the
/// other: connect, send the message, half-close, read until the server closes.
/// Returns what each connection read back, or why it failed.
pub fn tcp_echo(
    netns: &str,
    dst: SocketAddrV4,
    messages: &[Vec<u8>],
) -> Vec<Result<Vec<u8>, String>> {
    let messages = messages.to_vec();
    run_in(netns, move || {
        messages
            .iter()
            .map(|m| {
                let mut conn = TcpStream::connect_timeout(&dst.into(), Duration::from_secs(3))
                    .map_err(|e| format!("connect {dst}: {e}"))?;
                conn.set_read_timeout(Some(Duration::from_secs(3)))
                    .map_err(|e| e.to_string())?;
                conn.set_write_timeout(Some(Duration::from_secs(3)))
                    .map_err(|e| e.to_string())?;
                conn.write_all(m).map_err(|e| format!("send: {e}"))?;
                conn.shutdown(std::net::Shutdown::Write)
                    .map_err(|e| format!("shutdown: {e}"))?;
                let mut back = Vec::new();
                conn.read_to_end(&mut back)
                    .map_err(|e| format!("read: {e}"))?;
                Ok(back)
            })
            .collect()
    })
}

// ---------------------------------------------------------------------------
// ICMP

pub use crate::frames::internet_checksum;

/// An ICMPv4 message: type, code, the 4 "rest of header" bytes, data; with its checksum.
pub fn icmp_v4(icmp_type: u8, code: u8, rest: [u8; 4], data: &[u8]) -> Vec<u8> {
    let mut m = vec![icmp_type, code, 0, 0];
    m.extend_from_slice(&rest);
    m.extend_from_slice(data);
    let sum = internet_checksum(&[&m]);
    m[2..4].copy_from_slice(&sum.to_be_bytes());
    m
}

/// ICMP "destination unreachable, fragmentation needed" (type 3 code 4) with
/// the next-hop MTU, quoting `original` (an IPv4 packet, header and all).
pub fn icmp_frag_needed(mtu: u16, original: &[u8]) -> Vec<u8> {
    let m = mtu.to_be_bytes();
    icmp_v4(3, 4, [0, 0, m[0], m[1]], original)
}

/// A raw ICMP socket inside a namespace keeping every ICMP packet the host
/// receives (IPv4 header included) until stopped.
pub struct IcmpReceiver {
    // Stops (and joins) the receiving thread when dropped.
    _worker: Worker,
    seen: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl IcmpReceiver {
    pub fn start(netns: &str) -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let open = || {
            // SAFETY: plain socket calls with checked results; the fd is owned
            // (and closed) by the returned OwnedFd.
            unsafe {
                let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error().to_string());
                }
                let fd = OwnedFd::from_raw_fd(fd);
                let timeout = libc::timeval {
                    tv_sec: 0,
                    tv_usec: 20_000,
                };
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&timeout as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as u32,
                );
                Ok(fd)
            }
        };
        let serve = {
            let seen = seen.clone();
            move |fd: OwnedFd, stop: &AtomicBool| {
                let mut buf = [0u8; 2048];
                loop {
                    // SAFETY: recv into a buffer of the given length on an open socket.
                    let n = unsafe {
                        libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0)
                    };
                    if n > 0 {
                        seen.lock().unwrap().push(buf[..n as usize].to_vec());
                    } else if stop.load(Ordering::SeqCst) {
                        break;
                    }
                }
            }
        };
        let worker = Worker::start(netns, "a raw ICMP socket", open, serve);
        IcmpReceiver {
            _worker: worker,
            seen,
        }
    }

    /// The packets (IPv4 header first) received so far.
    pub fn packets(&self) -> Vec<Vec<u8>> {
        self.seen.lock().unwrap().clone()
    }
}

// ---------------------------------------------------------------------------
// LB specs

pub fn vip(name: &str, address: &str) -> VipSpec {
    VipSpec {
        name: name.into(),
        address: address.into(),
    }
}

pub fn stream(name: &str, max_targets: u32) -> StreamSpec {
    StreamSpec {
        name: name.into(),
        max_targets,
        table_size: None,
        port_nats: Vec::new(),
    }
}

/// Target `identifier` of `stream`, going `via`.
pub fn target(stream: &str, identifier: u32, via: TargetVia) -> TargetSpec {
    TargetSpec {
        stream: stream.into(),
        identifier,
        via,
    }
}

/// VIP "vip" at `address`, stream `stream` of `max_targets`, flow "f" of
/// `protocols` from the VIP to the stream, and the stream's target 1 going `via`.
pub fn one_target_spec(
    address: &str,
    stream_name: &str,
    max_targets: u32,
    protocols: &[&str],
    via: TargetVia,
) -> LbSpec {
    LbSpec {
        vips: vec![vip("vip", address)],
        streams: vec![stream(stream_name, max_targets)],
        flows: vec![flow("f", &["vip"], stream_name, protocols)],
        targets: vec![target(stream_name, 1, via)],
    }
}

/// A flow of `vips` to `stream` matching `protocols`; set the other fields with `..`.
pub fn flow(name: &str, vips: &[&str], stream: &str, protocols: &[&str]) -> FlowSpec {
    FlowSpec {
        name: name.into(),
        vips: vips.iter().map(|v| v.to_string()).collect(),
        stream: stream.into(),
        protocols: protocols.iter().map(|p| p.to_string()).collect(),
        ..Default::default()
    }
}

fn quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn list(items: &[String]) -> String {
    format!(
        "[{}]",
        items
            .iter()
            .map(|s| quote(s))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// The spec as the TOML `--lb-config` reads.
pub fn lb_toml(spec: &LbSpec) -> String {
    let mut t = String::new();
    for v in &spec.vips {
        t += &format!(
            "[[vips]]\nname = {}\naddress = {}\n\n",
            quote(&v.name),
            quote(&v.address)
        );
    }
    for s in &spec.streams {
        t += &format!(
            "[[streams]]\nname = {}\nmax_targets = {}\n",
            quote(&s.name),
            s.max_targets
        );
        if let Some(size) = s.table_size {
            t += &format!("table_size = {size}\n");
        }
        t += "\n";
    }
    for f in &spec.flows {
        t += &format!(
            "[[flows]]\nname = {}\nvips = {}\nstream = {}\npriority = {}\n",
            quote(&f.name),
            list(&f.vips),
            quote(&f.stream),
            f.priority
        );
        t += &format!("protocols = {}\n", list(&f.protocols));
        t += &format!(
            "destination_port_ranges = {}\n",
            list(&f.destination_port_ranges)
        );
        t += &format!("source_port_ranges = {}\n", list(&f.source_port_ranges));
        t += &format!("source_subnets = {}\n", list(&f.source_subnets));
        t += &format!("byte_matches = {}\n\n", list(&f.byte_matches));
    }
    for target in &spec.targets {
        let via = match &target.via {
            TargetVia::Local { interface, mac } => {
                format!(
                    "{{ local = {{ interface = {}, mac = {} }} }}",
                    quote(interface),
                    quote(mac)
                )
            }
            TargetVia::Remote { node } => format!("{{ remote = {{ node = {} }} }}", quote(node)),
        };
        t += &format!(
            "[[targets]]\nstream = {}\nidentifier = {}\nvia = {via}\n\n",
            quote(&target.stream),
            target.identifier
        );
    }
    t
}

/// Packets of the named entry of a VIP, flow or target count list (0 if absent).
pub fn lb_packets(list: &[Count], name: &str) -> u64 {
    list.iter()
        .find(|c| c.name == name)
        .map_or(0, |c| c.packets)
}

/// Bytes of the named entry of a count list (0 if absent).
pub fn lb_bytes(list: &[Count], name: &str) -> u64 {
    list.iter().find(|c| c.name == name).map_or(0, |c| c.bytes)
}

/// Packets of every target in a status, by name.
pub fn target_packets(status: &StatusResponse) -> HashMap<String, u64> {
    status
        .targets
        .iter()
        .map(|c| (c.name.clone(), c.packets))
        .collect()
}

// ---------------------------------------------------------------------------
// The lab

/// A target namespace behind the node.
pub struct LbTarget {
    pub netns: Netns,
    /// The node-side veth (what a local target's `interface` names).
    pub node_if: String,
    /// The veth inside the target namespace.
    pub target_if: String,
    /// The MAC of `target_if` (what a local target's `mac` is).
    pub mac: [u8; 6],
    /// The address of `target_if`.
    pub address: Ipv4Addr,
}

impl LbTarget {
    /// This target as a local target of `stream` with `identifier`.
    pub fn local(&self, stream: &str, identifier: u32) -> TargetSpec {
        let via = TargetVia::Local {
            interface: self.node_if.clone(),
            mac: fmt_mac(self.mac),
        };
        target(stream, identifier, via)
    }
}

/// The admin API's form of a spec holding only what `fill` puts in it.
fn wire(fill: impl FnOnce(&mut LbSpec)) -> tapmesh::admin::proto::LbConfig {
    let mut spec = LbSpec::default();
    fill(&mut spec);
    tapmesh::admin::lb_config(spec)
}

/// An admin call's answer, with its error as text.
fn answered<T>(answer: Result<T, tonic::Status>) -> Result<(), String> {
    answer.map(|_| ()).map_err(|e| e.to_string())
}

/// Removes a file when dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runs `$body` with `$c` a fresh admin client of `$lab`'s daemon, on a
/// current-thread runtime (a macro, so the client's type need not be named).
macro_rules! admin_call {
    ($lab:expr, |$c:ident| $body:expr) => {{
        let socket = $lab.daemon().socket.clone();
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime")
            .block_on(async move {
                #[allow(unused_mut)]
                let mut $c = tapmesh::admin::connect(&socket)
                    .await
                    .expect("connecting to the admin API");
                $body
            })
    }};
}

/// Client, node and targets; the daemon once `start`ed. Dropping it stops the
/// daemon first, then deletes the namespaces.
pub struct LbLab {
    // Field order is drop order: the daemon goes before its namespace.
    daemon: Option<Daemon>,
    /// Killed daemons, kept until the end: dropping one removes the pins.
    killed: Vec<Daemon>,
    config_files: Vec<RemoveOnDrop>,
    pub client: Netns,
    pub node: Netns,
    pub targets: Vec<LbTarget>,
    /// The client's veth.
    pub client_if: String,
    /// The node's veth facing the client (the XDP uplink).
    pub uplink: String,
}

impl LbLab {
    /// 200 UDP flows from the client to `vip`:7000, one datagram each:
    /// how many each target received (all 200 arrive, or this waits 30 s).
    pub fn spread(&self, vip: Ipv4Addr) -> Vec<u64> {
        self.spread_within(vip, Duration::from_secs(30))
    }

    /// [`Self::spread`], waiting at most `within` (a quiet period where
    /// none is to arrive).
    pub fn spread_within(&self, vip: Ipv4Addr, within: Duration) -> Vec<u64> {
        let dst = SocketAddrV4::new(vip, 7000);
        let receivers: Vec<UdpReceiver> = self
            .targets
            .iter()
            .map(|t| UdpReceiver::start(&t.netns.name, dst))
            .collect();
        let ports: Vec<u16> = (31_000..31_200).collect();
        let sent = send_udp_flows(&self.client.name, CLIENT, &ports, dst, 1, &[0x5a; 32]);
        assert_eq!(sent, 200);
        wait_until(within, || {
            receivers.iter().map(UdpReceiver::count).sum::<u64>() >= sent
        });
        receivers.into_iter().map(|r| r.stop().total()).collect()
    }

    /// The namespaces and links, `targets` targets each holding `vips` on `lo`.
    pub fn new(targets: usize, vips: &[Ipv4Addr]) -> Self {
        assert!(targets <= 100, "target addresses are 198.18.<10+i>.0/24");
        let client = Netns::new("c");
        let node = Netns::new("n");
        let (c, n) = link(
            &client,
            &format!("{CLIENT}/24"),
            &node,
            &format!("{NODE}/24"),
        );
        // Full checksums from the client, as on a wire: a veth otherwise sends
        // CHECKSUM_PARTIAL packets whose L4 checksum is only the pseudo-header
        // sum, and an XDP redirect (xdp_frame, no skb metadata) delivers them as
        // they are, so the target would drop them (UdpInCsumErrors).
        client.exec(&["ethtool", "-K", &c.interface, "tx", "off"]);
        client.ip(&["route", "add", "203.0.113.0/24", "via", &NODE.to_string()]);
        client.ip(&["route", "add", "198.18.0.0/15", "via", &NODE.to_string()]);
        node.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        // Replies come from VIPs the node has no route for: no reverse-path filter.
        for ns in [&client, &node] {
            ns.exec(&["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0"]);
            ns.exec(&["sysctl", "-qw", "net.ipv4.conf.default.rp_filter=0"]);
        }
        node.exec(&[
            "sysctl",
            "-qw",
            &format!("net.ipv4.conf.{}.rp_filter=0", n.interface),
        ]);
        let mut lab_targets = Vec::new();
        for i in 0..targets {
            let netns = Netns::new(&format!("t{}", i + 1));
            netns.exec(&["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0"]);
            netns.exec(&["sysctl", "-qw", "net.ipv4.conf.default.rp_filter=0"]);
            let node_ip = format!("198.18.{}.1", 10 + i);
            let (node_end, target_end) = link(
                &node,
                &format!("{node_ip}/24"),
                &netns,
                &format!("198.18.{}.2/24", 10 + i),
            );
            node.exec(&[
                "sysctl",
                "-qw",
                &format!("net.ipv4.conf.{}.rp_filter=0", node_end.interface),
            ]);
            for v in vips {
                netns.ip(&["addr", "add", &format!("{v}/32"), "dev", "lo"]);
            }
            netns.ip(&["route", "add", "default", "via", &node_ip]);
            // Native XDP redirect into a veth needs NAPI on the receiving peer.
            netns.exec(&["ethtool", "-K", &target_end.interface, "gro", "on"]);
            let mac = netns.mac(&target_end.interface);
            lab_targets.push(LbTarget {
                node_if: node_end.interface,
                target_if: target_end.interface,
                mac,
                address: target_end.ipv4.parse().expect("IPv4"),
                netns,
            });
        }
        LbLab {
            daemon: None,
            killed: Vec::new(),
            config_files: Vec::new(),
            client,
            node,
            targets: lab_targets,
            client_if: c.interface,
            uplink: n.interface,
        }
    }

    /// Starts the daemon on the node with XDP on the uplink and, if given, `spec`
    /// written to a file and passed with `--lb-config`.
    pub fn start(&mut self, spec: Option<&LbSpec>) {
        self.start_with(spec, &[]);
    }

    /// Like [`LbLab::start`] with more daemon arguments.
    pub fn start_with(&mut self, spec: Option<&LbSpec>, extra: &[String]) {
        assert!(self.daemon.is_none(), "the daemon is already running");
        let mut args = vec![
            "--uplink".to_string(),
            self.uplink.clone(),
            "--xdp-mode".into(),
            "native".into(),
        ];
        args.extend(extra.iter().cloned());
        if let Some(spec) = spec {
            args.push("--lb-config".into());
            args.push(self.write_file("tmlb", &lb_toml(spec)));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let daemon = Daemon::start(&self.node.name, &args);
        self.daemon = Some(daemon);
    }

    /// SIGKILLs the daemon (no stop runs); returns its bpffs root and admin
    /// socket (the pins stay until the lab is dropped).
    pub fn kill_daemon(&mut self) -> (PathBuf, PathBuf) {
        let mut old = self.daemon.take().expect("a running daemon");
        old.kill();
        let paths = (old.bpffs_root.clone(), old.socket.clone());
        self.killed.push(old);
        paths
    }

    /// SIGKILLs the daemon (no stop runs) and starts another on the same
    /// pins with `spec` and `args` (besides the uplink); returns when it answers.
    pub fn kill_and_start(&mut self, spec: Option<&LbSpec>, args: &[String]) {
        let mut old = self.daemon.take().expect("a running daemon");
        old.kill();
        let root = old.bpffs_root.clone();
        self.killed.push(old);
        let mut all = args.to_vec();
        if let Some(spec) = spec {
            all.push("--lb-config".into());
            all.push(self.write_file("tmlb", &lb_toml(spec)));
        }
        self.start_at(&root, &all);
    }

    /// Starts a daemon on the pins under `root` (a kept dataplane) with
    /// `args` besides the uplink; the previous daemon must have stopped.
    pub fn start_at(&mut self, root: &std::path::Path, args: &[String]) {
        assert!(self.daemon.is_none(), "the daemon is already running");
        let mut all = vec![
            "--uplink".to_string(),
            self.uplink.clone(),
            "--xdp-mode".into(),
            "native".into(),
        ];
        all.extend(args.iter().cloned());
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        self.daemon = Some(Daemon::start_at(&self.node.name, root, &all));
    }

    /// Like [`LbLab::start`] with no LB spec and `config` as the daemon's
    /// configuration file.
    pub fn start_configured(&mut self, config: &str) {
        let path = self.write_file("tmcfg", config);
        self.start_with(None, &["--config".into(), path]);
    }

    /// Writes `text` to a new TOML file (named after `label`) removed with the lab.
    fn write_file(&mut self, label: &str, text: &str) -> String {
        let path = std::env::temp_dir().join(format!("{}.toml", unique(label)));
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        self.config_files.push(RemoveOnDrop(path.clone()));
        path.display().to_string()
    }

    pub fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().expect("the daemon is not started")
    }

    /// SIGTERMs the daemon and waits; what it leaves (a kept dataplane) stays
    /// until the lab is dropped. Returns its bpffs root.
    pub fn stop_keeping_pins(&mut self) -> PathBuf {
        let mut old = self.daemon.take().expect("a running daemon");
        let status = old.stop();
        assert!(status.success(), "daemon stop: {status}");
        let root = old.bpffs_root.clone();
        self.killed.push(old);
        root
    }

    /// Stops the daemon (its pins go with it); the namespaces stay.
    pub fn stop(&mut self) {
        self.daemon = None;
    }

    /// Adds `ip` (/24) to the client's veth, with a static neighbour on the node.
    pub fn add_client_address(&self, ip: Ipv4Addr) {
        self.client
            .ip(&["addr", "add", &format!("{ip}/24"), "dev", &self.client_if]);
        let mac = fmt_mac(self.client.mac(&self.client_if));
        self.node.ip(&[
            "neigh",
            "replace",
            &ip.to_string(),
            "lladdr",
            &mac,
            "dev",
            &self.uplink,
            "nud",
            "permanent",
        ]);
    }

    /// The MAC of the node's uplink (where the client's frames go).
    pub fn uplink_mac(&self) -> [u8; 6] {
        self.node.mac(&self.uplink)
    }

    /// The client's MAC.
    pub fn client_mac(&self) -> [u8; 6] {
        self.client.mac(&self.client_if)
    }

    /// Replaces the whole LB configuration through the admin API.
    pub fn apply(&self, spec: &LbSpec) -> Result<(), String> {
        let config = tapmesh::admin::lb_config(spec.clone());
        admin_call!(self, |c| answered(c.apply_lb(config).await))
    }

    /// Adds or replaces one target through the admin API.
    pub fn set_target(&self, target: &TargetSpec) -> Result<(), String> {
        let target = wire(|s| s.targets.push(target.clone())).targets.remove(0);
        admin_call!(self, |c| answered(c.set_target(target).await))
    }

    /// Deletes one target through the admin API.
    pub fn delete_target(&self, stream: &str, identifier: u32) -> Result<(), String> {
        let stream = stream.into();
        admin_call!(self, |c| answered(
            c.delete_target(TargetId { stream, identifier }).await
        ))
    }

    /// Adds or replaces one flow through the admin API.
    pub fn set_flow(&self, flow: &FlowSpec) -> Result<(), String> {
        let flow = wire(|s| s.flows.push(flow.clone())).flows.remove(0);
        admin_call!(self, |c| answered(c.set_flow(flow).await))
    }

    /// The configuration in force and its counters.
    pub fn list(&self) -> LbListing {
        admin_call!(self, |c| c
            .list_lb(ListLbRequest {})
            .await
            .expect("ListLb")
            .into_inner())
    }
}
