//! A minimal classic-pcap writer (the libpcap file format: microsecond
//! timestamps, Ethernet link type), enough for mirror ring consumers.

use std::{
    fs::File,
    io::{self, BufWriter, Write},
    path::Path,
    time::{SystemTime, UNIX_EPOCH},
};

/// The classic pcap magic (microsecond timestamps), written in native byte order.
pub const MAGIC: u32 = 0xa1b2_c3d4;
/// The largest frame a record holds; longer frames are cut to this.
pub const SNAPLEN: u32 = 65535;
/// Bytes buffered before a write to the file: one write syscall per MiB.
pub const WRITE_BUFFER: usize = 1 << 20;
/// LINKTYPE_ETHERNET.
pub const LINKTYPE_ETHERNET: u32 = 1;

/// A record's 16-byte header for a frame of `len` bytes captured at `ts`
/// (a time before 1970 is written as 0; frames longer than [`SNAPLEN`] are
/// cut to it, so only that many bytes of the frame follow the header).
pub fn record_header(len: usize, ts: SystemTime) -> [u8; 16] {
    let since = ts.duration_since(UNIX_EPOCH).unwrap_or_default();
    let orig_len = u32::try_from(len).unwrap_or(u32::MAX);
    let incl_len = orig_len.min(SNAPLEN);
    let mut header = [0u8; 16];
    // ts_sec is 32 bits in this format (wraps in 2106).
    header[0..4].copy_from_slice(&(since.as_secs() as u32).to_ne_bytes());
    header[4..8].copy_from_slice(&since.subsec_micros().to_ne_bytes());
    header[8..12].copy_from_slice(&incl_len.to_ne_bytes());
    header[12..16].copy_from_slice(&orig_len.to_ne_bytes());
    header
}

/// Appends Ethernet frames to a new pcap file (buffered: call [`PcapWriter::flush`]).
pub struct PcapWriter<W: Write = BufWriter<File>> {
    out: W,
}

impl PcapWriter {
    /// Creates (or truncates) the file at `path` and writes the global header.
    pub fn create(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref();
        let file = File::create(path)
            .map_err(|e| io::Error::new(e.kind(), format!("creating {}: {e}", path.display())))?;
        Self::new(BufWriter::with_capacity(WRITE_BUFFER, file))
    }
}

impl<W: Write> PcapWriter<W> {
    /// Writes the global header to `out`.
    pub fn new(mut out: W) -> io::Result<Self> {
        let mut header = [0u8; 24];
        header[0..4].copy_from_slice(&MAGIC.to_ne_bytes());
        header[4..6].copy_from_slice(&2u16.to_ne_bytes());
        header[6..8].copy_from_slice(&4u16.to_ne_bytes());
        // thiszone (8..12) and sigfigs (12..16) are 0.
        header[16..20].copy_from_slice(&SNAPLEN.to_ne_bytes());
        header[20..24].copy_from_slice(&LINKTYPE_ETHERNET.to_ne_bytes());
        out.write_all(&header)?;
        Ok(PcapWriter { out })
    }

    /// Appends one frame captured at `ts` (a time before 1970 is written as 0).
    pub fn write(&mut self, frame: &[u8], ts: SystemTime) -> io::Result<()> {
        let header = record_header(frame.len(), ts);
        let incl_len = u32::from_ne_bytes(header[8..12].try_into().expect("4 bytes"));
        self.out.write_all(&header)?;
        self.out.write_all(&frame[..incl_len as usize])
    }

    /// Appends records already laid out as [`record_header`] + frame, each.
    pub fn write_records(&mut self, records: &[u8]) -> io::Result<()> {
        self.out.write_all(records)
    }

    /// Writes out what is buffered.
    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    /// The underlying writer (for a `BufWriter<File>`, call `flush` first).
    pub fn into_inner(self) -> W {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn header_and_records() {
        let mut w = PcapWriter::new(Vec::new()).unwrap();
        let ts = UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789);
        w.write(&[1, 2, 3], ts).unwrap();
        let bytes = w.into_inner();
        assert_eq!(bytes.len(), 24 + 16 + 3);
        let word = |at: usize| u32::from_ne_bytes(bytes[at..at + 4].try_into().unwrap());
        assert_eq!(word(0), MAGIC);
        assert_eq!(
            &bytes[4..8],
            &[2u16.to_ne_bytes(), 4u16.to_ne_bytes()].concat()[..]
        );
        assert_eq!(word(16), 65535);
        assert_eq!(word(20), 1);
        assert_eq!(word(24), 1_700_000_000);
        assert_eq!(word(28), 123_456);
        assert_eq!(word(32), 3);
        assert_eq!(word(36), 3);
        assert_eq!(&bytes[40..], &[1, 2, 3]);
    }
}
