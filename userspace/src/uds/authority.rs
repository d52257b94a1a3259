//! Accepting gRPC clients that send a unix socket's path as `:authority`.
//!
//! grpcio ≥ 1.57 (C core), grpc-java and Swift gRPC put the socket path,
//! %-encoded or not, in `:authority` when they dial a unix socket. h2 (under
//! tonic) parses `:authority` as a URI authority before any of our code
//! runs and resets the stream ("malformed authority"), so every call fails
//! (grpc/grpc#38142, hyperium/h2#487). grpc-go sends "localhost" instead.
//!
//! [`FixAuthority`] sits on the accepted stream, in front of h2, and does the
//! same for the client: it reads the client's HTTP/2 frames, decodes every
//! header block (HPACK, with the client's dynamic table), replaces an
//! `:authority` that is not a valid authority by `localhost`, and hands h2
//! the block re-encoded as literals without indexing, so h2's own dynamic
//! table is never used and stays consistent. Every other frame, and
//! everything the server writes, passes unchanged.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The smallest SETTINGS_MAX_FRAME_SIZE a server may have: frames we make
/// are never larger.
const MAX_FRAME: usize = 16_384;
/// The largest header block (compressed) we buffer; h2 refuses decoded
/// header lists above 16 KiB anyway.
const MAX_BLOCK: usize = 1 << 20;
/// The dynamic table size the client may use: h2 advertises no other.
const TABLE_SIZE: usize = 4096;
/// What an invalid `:authority` becomes (grpc-go's choice for unix sockets).
const LOCALHOST: &[u8] = b"localhost";

fn invalid(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

/// Whether h2 accepts `value` as `:authority`.
fn valid_authority(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

enum State {
    /// Inside the connection preface, `n` bytes matched.
    Preface(usize),
    /// At a frame boundary, or `left` payload bytes of a passed frame to go.
    Frames { left: usize },
    /// Not HTTP/2 with prior knowledge: everything passes (h2 decides).
    Passthrough,
}

/// A header block being collected (HEADERS, then CONTINUATIONs).
struct Block {
    stream: u32,
    flags: u8,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
}

/// The byte-level rewriter: client bytes in, what h2 should read out.
pub struct Rewriter {
    state: State,
    pending: Vec<u8>,
    block: Option<Block>,
    decoder: loona_hpack::Decoder<'static>,
    /// `:authority` values replaced so far.
    pub rewritten: u64,
}

impl Default for Rewriter {
    fn default() -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(TABLE_SIZE);
        Rewriter {
            state: State::Preface(0),
            pending: Vec::new(),
            block: None,
            decoder,
            rewritten: 0,
        }
    }
}

impl Rewriter {
    /// Takes bytes read from the client; appends what h2 should read to `out`.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        self.pending.extend_from_slice(data);
        let mut at = 0;
        let result = self.process(&mut at, out);
        self.pending.drain(..at);
        result
    }

    fn process(&mut self, at: &mut usize, out: &mut Vec<u8>) -> io::Result<()> {
        loop {
            let input = &self.pending[*at..];
            match &mut self.state {
                State::Passthrough => {
                    out.extend_from_slice(input);
                    *at += input.len();
                    return Ok(());
                }
                State::Preface(n) => {
                    let take = input.len().min(PREFACE.len() - *n);
                    if input[..take] != PREFACE[*n..*n + take] {
                        self.state = State::Passthrough;
                        continue;
                    }
                    out.extend_from_slice(&input[..take]);
                    *at += take;
                    *n += take;
                    if *n < PREFACE.len() {
                        return Ok(());
                    }
                    self.state = State::Frames { left: 0 };
                }
                State::Frames { left } if *left > 0 => {
                    let take = input.len().min(*left);
                    out.extend_from_slice(&input[..take]);
                    *at += take;
                    *left -= take;
                    if *left > 0 {
                        return Ok(());
                    }
                }
                State::Frames { left } => {
                    if input.len() < FRAME_HEADER {
                        return Ok(());
                    }
                    let length = usize::from(input[0]) << 16
                        | usize::from(input[1]) << 8
                        | usize::from(input[2]);
                    let kind = input[3];
                    let flags = input[4];
                    let stream =
                        u32::from_be_bytes([input[5], input[6], input[7], input[8]]) & 0x7fff_ffff;
                    let in_block = self.block.is_some();
                    if kind != HEADERS && kind != CONTINUATION && !in_block {
                        out.extend_from_slice(&input[..FRAME_HEADER]);
                        *at += FRAME_HEADER;
                        *left = length;
                        continue;
                    }
                    if length > MAX_BLOCK {
                        return Err(invalid(format!("a {length}-byte header frame")));
                    }
                    if input.len() < FRAME_HEADER + length {
                        return Ok(());
                    }
                    let payload = &input[FRAME_HEADER..FRAME_HEADER + length];
                    let end = match (kind, &mut self.block) {
                        (HEADERS, None) => {
                            let block = headers_fragment(stream, flags, payload)?;
                            self.block = Some(block);
                            flags & END_HEADERS != 0
                        }
                        (CONTINUATION, Some(block)) if block.stream == stream => {
                            if block.fragment.len() + payload.len() > MAX_BLOCK {
                                return Err(invalid("a header block above 1 MiB"));
                            }
                            block.fragment.extend_from_slice(payload);
                            flags & END_HEADERS != 0
                        }
                        _ => {
                            return Err(invalid(format!(
                                "frame type {kind} on stream {stream} where a header block's \
                                 CONTINUATION was due (or one without a block)"
                            )))
                        }
                    };
                    *at += FRAME_HEADER + length;
                    if end {
                        let block = self.block.take().expect("a block is open");
                        self.finish(block, out)?;
                    }
                }
            }
        }
    }

    /// Decodes a whole block and writes it out as HEADERS (+ CONTINUATION).
    fn finish(&mut self, block: Block, out: &mut Vec<u8>) -> io::Result<()> {
        let mut fields: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        self.decoder
            .decode_with_cb(&block.fragment, |name, value| {
                fields.push((name.into_owned(), value.into_owned()))
            })
            .map_err(|e| invalid(format!("HPACK: {e}")))?;
        let mut encoded = Vec::with_capacity(block.fragment.len() + 64);
        for (name, value) in &fields {
            let value = if name == b":authority" && !valid_authority(value) {
                self.rewritten += 1;
                LOCALHOST
            } else {
                value.as_slice()
            };
            literal(&mut encoded, name, value);
        }
        let mut first = Vec::with_capacity(5 + encoded.len().min(MAX_FRAME));
        if let Some(p) = block.priority {
            first.extend_from_slice(&p);
        }
        let room = MAX_FRAME - first.len();
        let split = encoded.len().min(room);
        first.extend_from_slice(&encoded[..split]);
        let mut rest = encoded[split..].chunks(MAX_FRAME).peekable();
        let flags = block.flags & (END_STREAM | PRIORITY)
            | if rest.peek().is_none() {
                END_HEADERS
            } else {
                0
            };
        frame(out, HEADERS, flags, block.stream, &first);
        while let Some(chunk) = rest.next() {
            let flags = if rest.peek().is_none() {
                END_HEADERS
            } else {
                0
            };
            frame(out, CONTINUATION, flags, block.stream, chunk);
        }
        Ok(())
    }
}

/// The header block fragment of a HEADERS frame, padding removed.
fn headers_fragment(stream: u32, flags: u8, payload: &[u8]) -> io::Result<Block> {
    let mut body = payload;
    let mut pad = 0;
    if flags & PADDED != 0 {
        let (&n, rest) = body
            .split_first()
            .ok_or_else(|| invalid("a padded HEADERS frame without its pad length"))?;
        pad = usize::from(n);
        body = rest;
    }
    let mut priority = None;
    if flags & PRIORITY != 0 {
        if body.len() < 5 {
            return Err(invalid("a HEADERS frame too short for its priority"));
        }
        priority = Some(body[..5].try_into().expect("5 bytes"));
        body = &body[5..];
    }
    if pad > body.len() {
        return Err(invalid("HEADERS padding longer than the frame"));
    }
    Ok(Block {
        stream,
        flags,
        priority,
        fragment: body[..body.len() - pad].to_vec(),
    })
}

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let length = payload.len() as u32;
    out.extend_from_slice(&length.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// "Literal header field without indexing, new name", no Huffman coding.
fn literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0);
    for s in [name, value] {
        integer(out, s.len(), 7, 0);
        out.extend_from_slice(s);
    }
}

/// An HPACK integer with an `n`-bit prefix (RFC 7541 §5.1).
fn integer(out: &mut Vec<u8>, mut value: usize, n: u8, high: u8) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(high | value as u8);
        return;
    }
    out.push(high | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

/// An accepted stream whose client frames go through a [`Rewriter`].
pub struct FixAuthority<S> {
    inner: S,
    rewriter: Rewriter,
    output: Vec<u8>,
    offset: usize,
    eof: bool,
}

impl<S> FixAuthority<S> {
    pub fn new(inner: S) -> Self {
        FixAuthority {
            inner,
            rewriter: Rewriter::default(),
            output: Vec::new(),
            offset: 0,
            eof: false,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FixAuthority<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.offset < this.output.len() {
                let n = buf.remaining().min(this.output.len() - this.offset);
                buf.put_slice(&this.output[this.offset..this.offset + n]);
                this.offset += n;
                if this.offset == this.output.len() {
                    this.output.clear();
                    this.offset = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 8192];
            let mut read = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                // A cut frame goes to h2 as it is; it reports the error.
                this.eof = true;
                this.output.append(&mut this.rewriter.pending);
                continue;
            }
            let before = this.rewriter.rewritten;
            this.rewriter.feed(read.filled(), &mut this.output)?;
            if before == 0 && this.rewriter.rewritten > 0 {
                tracing::debug!("a client sent an invalid :authority; serving it as localhost");
            }
        }
    }
}

writes_through_inner!(FixAuthority);

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<(String, String)>)> {
        assert!(bytes.starts_with(PREFACE));
        let mut decoder = loona_hpack::Decoder::new();
        let mut rest = &bytes[PREFACE.len()..];
        let mut frames = Vec::new();
        let mut block = Vec::new();
        while !rest.is_empty() {
            let length =
                usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
            let (kind, flags) = (rest[3], rest[4]);
            let stream = u32::from_be_bytes(rest[5..9].try_into().unwrap());
            let payload = &rest[9..9 + length];
            assert!(length <= MAX_FRAME);
            let mut headers = Vec::new();
            if kind == HEADERS || kind == CONTINUATION {
                let skip = if kind == HEADERS && flags & PRIORITY != 0 {
                    5
                } else {
                    0
                };
                assert_eq!(flags & PADDED, 0);
                block.extend_from_slice(&payload[skip..]);
                if flags & END_HEADERS != 0 {
                    headers = decoder
                        .decode(&block)
                        .unwrap()
                        .into_iter()
                        .map(|(n, v)| {
                            (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap())
                        })
                        .collect();
                    block.clear();
                }
            }
            frames.push((kind, flags, stream, headers));
            rest = &rest[9 + length..];
        }
        frames
    }

    fn raw_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        frame(&mut out, kind, flags, stream, payload);
        out
    }

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_path_authority_becomes_localhost_and_the_table_stays_in_step() {
        // As gRPC's C core sends it: literals with incremental indexing
        // (`:authority` by the static name index 1), then the same request
        // from the dynamic table (62: te, 63: content-type, 64: :authority,
        // 65: :path).
        let literal_indexed = |out: &mut Vec<u8>, name: Result<u8, &str>, value: &str| {
            match name {
                Ok(index) => out.push(0x40 | index),
                Err(name) => {
                    out.extend_from_slice(&[0x40, name.len() as u8]);
                    out.extend_from_slice(name.as_bytes());
                }
            }
            out.push(value.len() as u8);
            out.extend_from_slice(value.as_bytes());
        };
        let mut first = vec![0x83, 0x86];
        literal_indexed(&mut first, Ok(4), "/ambassador.v1.Tap/Open");
        literal_indexed(&mut first, Ok(1), "%2Ftmp%2Fambassador.sock");
        literal_indexed(&mut first, Ok(31), "application/grpc");
        literal_indexed(&mut first, Err("te"), "trailers");
        let second = vec![0x83, 0x86, 0xc1, 0xc0, 0xbf, 0xbe];
        let mut client = PREFACE.to_vec();
        // SETTINGS, then a padded block with priority split over a CONTINUATION.
        client.extend(raw_frame(0x4, 0, 0, &[]));
        let mut payload = vec![3u8];
        payload.extend_from_slice(&[0, 0, 0, 0, 15]);
        payload.extend_from_slice(&first[..10]);
        payload.extend_from_slice(&[0, 0, 0]);
        client.extend(raw_frame(HEADERS, PADDED | PRIORITY, 1, &payload));
        client.extend(raw_frame(CONTINUATION, END_HEADERS, 1, &first[10..]));
        client.extend(raw_frame(0x0, END_STREAM, 1, b"\0\0\0\0\0"));
        client.extend(raw_frame(HEADERS, END_HEADERS | END_STREAM, 3, &second));

        // Byte by byte: the rewriter keeps partial frames.
        let mut rw = Rewriter::default();
        let mut out = Vec::new();
        for b in &client {
            rw.feed(std::slice::from_ref(b), &mut out).unwrap();
        }
        assert_eq!(rw.rewritten, 2);
        let frames = decode_all(&out);
        let expected = pairs(&[
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/ambassador.v1.Tap/Open"),
            (":authority", "localhost"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]);
        assert_eq!(frames.len(), 4);
        assert_eq!((frames[0].0, frames[0].3.len()), (0x4, 0));
        assert_eq!(
            frames[1],
            (HEADERS, PRIORITY | END_HEADERS, 1, expected.clone())
        );
        assert_eq!(frames[2], (0x0, END_STREAM, 1, vec![]));
        assert_eq!(
            frames[3],
            (HEADERS, END_HEADERS | END_STREAM, 3, expected.clone())
        );
        // The data frame passed byte for byte.
        let data = raw_frame(0x0, END_STREAM, 1, b"\0\0\0\0\0");
        assert!(out.windows(data.len()).any(|w| w == data));
    }

    #[test]
    fn huffman_coded_requests_of_rfc_7541_pass_with_their_authority() {
        // RFC 7541 C.4.1–C.4.3: three requests, Huffman coded, sharing the
        // dynamic table; www.example.com is a valid authority and stays.
        let blocks = [
            "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
            "8286 84be 5886 a8eb 1064 9cbf",
            "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
        ];
        let mut client = PREFACE.to_vec();
        for (i, b) in blocks.iter().enumerate() {
            client.extend(raw_frame(HEADERS, END_HEADERS, 1 + 2 * i as u32, &hex(b)));
        }
        let mut rw = Rewriter::default();
        let mut out = Vec::new();
        rw.feed(&client, &mut out).unwrap();
        assert_eq!(rw.rewritten, 0);
        let frames = decode_all(&out);
        let heads: Vec<_> = frames.into_iter().map(|f| f.3).collect();
        assert_eq!(
            heads,
            vec![
                pairs(&[
                    (":method", "GET"),
                    (":scheme", "http"),
                    (":path", "/"),
                    (":authority", "www.example.com")
                ]),
                pairs(&[
                    (":method", "GET"),
                    (":scheme", "http"),
                    (":path", "/"),
                    (":authority", "www.example.com"),
                    ("cache-control", "no-cache")
                ]),
                pairs(&[
                    (":method", "GET"),
                    (":scheme", "https"),
                    (":path", "/index.html"),
                    (":authority", "www.example.com"),
                    ("custom-key", "custom-value")
                ]),
            ]
        );
    }

    #[test]
    fn large_blocks_are_split_and_bad_input_is_refused() {
        let mut encoder = loona_hpack::Encoder::new();
        let big = vec![b'x'; 40_000];
        let block = encoder.encode(vec![
            (&b":authority"[..], &b"/run/node.sock"[..]),
            (b"x-big", &big[..]),
        ]);
        let mut client = PREFACE.to_vec();
        client.extend(raw_frame(HEADERS, 0, 1, &block[..16_000]));
        client.extend(raw_frame(CONTINUATION, END_HEADERS, 1, &block[16_000..]));
        let mut rw = Rewriter::default();
        let mut out = Vec::new();
        rw.feed(&client, &mut out).unwrap();
        let frames = decode_all(&out);
        assert_eq!(
            frames.iter().map(|f| (f.0, f.1)).collect::<Vec<_>>(),
            vec![(HEADERS, 0), (CONTINUATION, 0), (CONTINUATION, END_HEADERS)]
        );
        assert_eq!(frames[2].3[0], pairs(&[(":authority", "localhost")])[0]);
        assert_eq!(frames[2].3[1].1.len(), 40_000);

        // Another frame inside a header block, a table size above h2's.
        let mut client = PREFACE.to_vec();
        client.extend(raw_frame(HEADERS, 0, 1, &block[..100]));
        client.extend(raw_frame(0x0, 0, 1, b"x"));
        assert!(Rewriter::default().feed(&client, &mut Vec::new()).is_err());
        let mut client = PREFACE.to_vec();
        client.extend(raw_frame(HEADERS, END_HEADERS, 1, &hex("3fe2 1f 82")));
        assert!(Rewriter::default().feed(&client, &mut Vec::new()).is_err());

        // Not HTTP/2: passed as is.
        let mut out = Vec::new();
        Rewriter::default()
            .feed(b"GET / HTTP/1.1\r\n\r\n", &mut out)
            .unwrap();
        assert_eq!(out, b"GET / HTTP/1.1\r\n\r\n");
    }
}
