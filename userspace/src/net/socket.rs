//! A blocking netlink socket for requests and dumps, in the calling
//! thread's network namespace. Plain sends and receives, answers read in
//! place: a dump of thousands of entries costs a fraction of what it does
//! through the async `rtnetlink` connection (which decodes every message
//! and hands it over a channel).

use std::io;
use std::os::fd::AsRawFd;

use netlink_packet_route::RouteNetlinkMessage;
use rtnetlink::packet_core::{
    NetlinkBuffer, NetlinkMessage, NetlinkPayload, NLMSG_DONE, NLMSG_ERROR, NLM_F_ACK, NLM_F_DUMP,
    NLM_F_REQUEST,
};
use rtnetlink::sys::{Socket, SocketAddr};

pub(crate) use rtnetlink::sys::protocols::{NETLINK_NETFILTER, NETLINK_ROUTE};

/// `NLM_F_ACK_TLVS`: the error message carries attributes (an extended ack).
const NLM_F_ACK_TLVS: u16 = 0x200;
/// `NLMSGERR_ATTR_MSG`: the kernel's text for an error.
const NLMSGERR_ATTR_MSG: u16 = 1;

/// The messages of one received datagram, each as its type and its whole
/// bytes (header included); stops at the first malformed one.
pub(crate) fn messages(datagram: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut at = 0;
    std::iter::from_fn(move || {
        let message = NetlinkBuffer::new_checked(datagram.get(at..)?).ok()?;
        let (kind, length) = (message.message_type(), message.length() as usize);
        let whole = &datagram[at..at + length];
        at += (length + 3) & !3;
        Some((kind, whole))
    })
}

pub(crate) struct Netlink {
    socket: Socket,
    sequence: u32,
    buffer: Vec<u8>,
}

/// A refused request: which message (by sequence number), the errno and
/// the kernel's text when it sent one.
#[derive(Debug)]
pub(crate) struct Refused {
    pub sequence: u32,
    pub error: io::Error,
}

impl Netlink {
    pub fn open(protocol: isize) -> io::Result<Self> {
        let mut socket = Socket::new(protocol)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        // Errors without the request echoed, with the kernel's text.
        let _ = socket.set_cap_ack(true);
        let _ = socket.set_ext_ack(true);
        // An answer that never comes is an error, not a hang.
        let timeout = libc::timeval {
            tv_sec: 10,
            tv_usec: 0,
        };
        // SAFETY: a valid socket and a timeval of the size given.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            socket,
            sequence: 0,
            // The kernel fills dump datagrams up to 32 KiB.
            buffer: Vec::with_capacity(64 * 1024),
        })
    }

    pub fn route() -> io::Result<Self> {
        Self::open(NETLINK_ROUTE)
    }

    /// The next sequence number.
    pub fn next_sequence(&mut self) -> u32 {
        self.sequence = self.sequence.wrapping_add(1);
        self.sequence
    }

    /// Sends a dump request and hands each answer (its type and the whole
    /// netlink message) to `each`. One dump at a time: the kernel refuses a
    /// second one on a socket while one runs.
    pub fn dump(
        &mut self,
        request: RouteNetlinkMessage,
        each: impl FnMut(u16, &[u8]),
    ) -> io::Result<()> {
        let sequence = self.next_sequence();
        let bytes = encode(request, NLM_F_REQUEST | NLM_F_DUMP, sequence);
        self.exchange(&bytes, sequence, sequence..=sequence, true, each)
            .map_err(|r| r.error)
    }

    /// Sends one request (with an acknowledgement asked for) and returns the
    /// messages the kernel answered with before the acknowledgement.
    pub fn request(
        &mut self,
        request: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        let mut answers = Vec::new();
        self.request_with(request, flags, |_, whole| {
            if let Ok(NetlinkMessage {
                payload: NetlinkPayload::InnerMessage(m),
                ..
            }) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(whole)
            {
                answers.push(m);
            }
        })?;
        Ok(answers)
    }

    /// Like [`Netlink::request`], handing each answer (its type and the whole
    /// netlink message) to `each` undecoded.
    pub fn request_with(
        &mut self,
        request: RouteNetlinkMessage,
        flags: u16,
        each: impl FnMut(u16, &[u8]),
    ) -> io::Result<()> {
        let sequence = self.next_sequence();
        let bytes = encode(request, NLM_F_REQUEST | NLM_F_ACK | flags, sequence);
        self.exchange(&bytes, sequence, sequence..=sequence, false, each)
            .map_err(|r| r.error)
    }

    /// Sends `bytes` (whole messages, numbered from `first`) and reads
    /// answers until every sequence number of `waiting` is acknowledged (or,
    /// for a dump, finished). Data messages go to `each`. The first refusal
    /// is returned once every answer is in (the kernel answers each message
    /// of a batch); a refusal of a message not waited for (a batch's header)
    /// ends the exchange at once.
    pub fn exchange(
        &mut self,
        bytes: &[u8],
        first: u32,
        waiting: std::ops::RangeInclusive<u32>,
        dump: bool,
        mut each: impl FnMut(u16, &[u8]),
    ) -> Result<(), Refused> {
        let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
        let refused = |sequence, error| Refused { sequence, error };
        self.socket
            .send(bytes, 0)
            .map_err(|e| refused(*waiting.start(), e))?;
        let mut open = (*waiting.end() - *waiting.start()) as usize + 1;
        let mut first_refusal = None;
        while open > 0 {
            self.buffer.clear();
            let n = self
                .socket
                .recv(&mut self.buffer, 0)
                .map_err(|e| refused(*waiting.start(), e))?;
            if n > self.buffer.len() {
                let e = invalid(format!("a netlink datagram of {n} bytes"));
                return Err(refused(*waiting.start(), e));
            }
            let mut at = 0;
            while at < n {
                let message = NetlinkBuffer::new_checked(&self.buffer[at..n])
                    .map_err(|e| refused(*waiting.start(), invalid(e.to_string())))?;
                let length = message.length() as usize;
                let kind = message.message_type();
                let sequence = message.sequence_number();
                let flags = message.flags();
                let payload = message.payload();
                let whole = &self.buffer[at..at + length];
                at += (length + 3) & !3;
                if !waiting.contains(&sequence) {
                    let code = payload
                        .get(..4)
                        .map(|c| i32::from_ne_bytes(c.try_into().expect("4 bytes")));
                    if kind == NLMSG_ERROR && sequence >= first && code.is_some_and(|c| c < 0) {
                        let errno = -code.unwrap_or_default();
                        return Err(refused(sequence, io::Error::from_raw_os_error(errno)));
                    }
                    continue;
                }
                match kind {
                    NLMSG_ERROR | NLMSG_DONE => {
                        let code = payload
                            .get(..4)
                            .map(|c| i32::from_ne_bytes(c.try_into().expect("4 bytes")))
                            .unwrap_or(0);
                        if kind == NLMSG_DONE && !dump {
                            continue;
                        }
                        open = open.saturating_sub(1);
                        if code < 0 && first_refusal.is_none() {
                            let error = match kernel_text(payload, flags) {
                                Some(text) => {
                                    let kind = io::Error::from_raw_os_error(-code).kind();
                                    io::Error::new(kind, Explained { errno: -code, text })
                                }
                                None => io::Error::from_raw_os_error(-code),
                            };
                            first_refusal = Some(refused(sequence, error));
                        }
                    }
                    _ => each(kind, whole),
                }
            }
        }
        match first_refusal {
            Some(r) => Err(r),
            None => Ok(()),
        }
    }
}

/// An errno with the kernel's explanation.
#[derive(Debug)]
struct Explained {
    errno: i32,
    text: String,
}

impl std::fmt::Display for Explained {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let errno = io::Error::from_raw_os_error(self.errno);
        write!(f, "{errno} ({})", self.text)
    }
}

impl std::error::Error for Explained {}

/// The errno of an error from this socket, with or without an explanation.
pub(crate) fn errno_of(e: &io::Error) -> Option<i32> {
    e.raw_os_error().or_else(|| {
        e.get_ref()
            .and_then(|inner| inner.downcast_ref::<Explained>())
            .map(|x| x.errno)
    })
}

/// A route message as bytes, with `flags` and `sequence`.
pub(crate) fn encode(request: RouteNetlinkMessage, flags: u16, sequence: u32) -> Vec<u8> {
    let mut message = NetlinkMessage::from(request);
    message.header.flags = flags;
    message.header.sequence_number = sequence;
    message.finalize();
    let mut bytes = vec![0; message.buffer_len()];
    message.serialize(&mut bytes);
    bytes
}

/// The kernel's text in an error message (an extended ack), if any.
fn kernel_text(payload: &[u8], flags: u16) -> Option<String> {
    if flags & NLM_F_ACK_TLVS == 0 {
        return None;
    }
    // The error code, then the request's header (capped: no payload).
    let mut attributes = payload.get(4 + 16..)?;
    while attributes.len() >= 4 {
        let length = usize::from(u16::from_ne_bytes([attributes[0], attributes[1]]));
        let kind = u16::from_ne_bytes([attributes[2], attributes[3]]) & 0x3fff;
        if length < 4 || length > attributes.len() {
            return None;
        }
        if kind == NLMSGERR_ATTR_MSG {
            let text = &attributes[4..length];
            let text = text.split(|b| *b == 0).next().unwrap_or_default();
            return Some(String::from_utf8_lossy(text).into_owned());
        }
        attributes = attributes.get((length + 3) & !3..).unwrap_or_default();
    }
    None
}
