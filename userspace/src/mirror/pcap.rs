//! A minimal classic-pcap writer (the libpcap file format: microsecond
//! timestamps, Ethernet link type), enough for mirror ring consumers.

use std::{
    fs::File,
    io::{self, Write},
    path::Path,
    time::{SystemTime, UNIX_EPOCH},
};

/// The classic pcap magic (microsecond timestamps), written in native byte order.
pub const MAGIC: u32 = 0xa1b2_c3d4;
/// The largest frame a record holds; longer frames are cut to this.
pub const SNAPLEN: u32 = 65535;
/// Bytes a consumer buffers before a write to the file: one write syscall
/// per MiB (see [`Committed`]).
pub const WRITE_BUFFER: usize = 1 << 20;
/// LINKTYPE_ETHERNET.
pub const LINKTYPE_ETHERNET: u32 = 1;

/// A record's 16-byte header for a frame of `len` bytes captured at `ts`
/// (a time before 1970 is written as 0; frames longer than [`SNAPLEN`] are
/// cut to it, so only that many bytes of the frame follow the header).
pub fn record_header(len: usize, ts: SystemTime) -> [u8; 16] {
    record_header_cut(len, len, ts)
}

/// As [`record_header`] for a frame of `len` bytes of which only the first
/// `captured` were kept.
pub fn record_header_cut(len: usize, captured: usize, ts: SystemTime) -> [u8; 16] {
    let since = ts.duration_since(UNIX_EPOCH).unwrap_or_default();
    let orig_len = u32::try_from(len).unwrap_or(u32::MAX);
    let incl_len = u32::try_from(captured)
        .unwrap_or(u32::MAX)
        .min(orig_len)
        .min(SNAPLEN);
    let mut header = [0u8; 16];
    // ts_sec is 32 bits in this format (wraps in 2106).
    header[0..4].copy_from_slice(&(since.as_secs() as u32).to_ne_bytes());
    header[4..8].copy_from_slice(&since.subsec_micros().to_ne_bytes());
    header[8..12].copy_from_slice(&incl_len.to_ne_bytes());
    header[12..16].copy_from_slice(&orig_len.to_ne_bytes());
    header
}

/// Appends Ethernet frames to a new pcap file (buffered: call [`PcapWriter::flush`]).
pub struct PcapWriter<W: Write = Committed> {
    out: W,
}

/// A file written a buffer at a time, on `flush`: a write that fails (a
/// full disk) is cut back to the end of the last whole one and its bytes
/// are dropped, so the file never ends in half a record and what failed
/// does not turn up later. (A FIFO cannot be cut back.)
pub struct Committed {
    file: File,
    buffer: Vec<u8>,
    /// The file's length after the last whole write.
    len: u64,
    /// Bytes at the start of `buffer` a failure keeps (a new file's
    /// global header, until it is written).
    keep: usize,
}

impl Committed {
    fn new(file: File) -> io::Result<Self> {
        let len = file.metadata()?.len();
        Ok(Committed {
            file,
            buffer: Vec::with_capacity(WRITE_BUFFER),
            len,
            keep: 0,
        })
    }
}

impl Write for Committed {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buffer.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        match self.file.write_all(&self.buffer) {
            Ok(()) => {
                self.len += self.buffer.len() as u64;
                self.buffer.clear();
                self.keep = 0;
                Ok(())
            }
            Err(e) => {
                let _ = self.file.set_len(self.len);
                self.buffer.truncate(self.keep);
                Err(e)
            }
        }
    }
}

impl PcapWriter<Committed> {
    /// Bytes written since the last flush.
    pub fn buffered(&self) -> usize {
        self.out.buffer.len()
    }
}

impl PcapWriter {
    /// Opens the file at `path` (mode 0600: copies of other hosts' traffic)
    /// to append to it: a file this writer made before (same global header)
    /// keeps its records and gets more, so a restart loses no capture; any
    /// other non-empty file is first renamed to `<path>.<unix seconds>`; a
    /// new or empty file gets the global header.
    pub fn create(path: impl AsRef<Path>) -> io::Result<Self> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let path = path.as_ref();
        let context = |what: &str| {
            let path = path.display().to_string();
            let what = what.to_string();
            move |e: io::Error| io::Error::new(e.kind(), format!("{what} {path}: {e}"))
        };
        let mut existing = [0u8; 24];
        // A FIFO (a live reader such as tshark) or a device is a new stream:
        // opening it to read would block until a writer came, or steal data.
        let regular = match std::fs::metadata(path) {
            Ok(meta) => meta.is_file(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => true,
            Err(e) => return Err(context("opening")(e)),
        };
        let ours = regular
            && match File::open(path) {
                Ok(mut f) => {
                    let len = f.metadata().map_err(context("reading"))?.len();
                    let whole = io::Read::read_exact(&mut f, &mut existing).is_ok();
                    let mine = whole && existing == global_header();
                    if len > 0 && !mine {
                        let since = SystemTime::now()
                            .duration_since(UNIX_EPOCH)
                            .unwrap_or_default()
                            .as_secs();
                        let aside = path.with_file_name(format!(
                            "{}.{since}",
                            path.file_name().unwrap_or_default().to_string_lossy()
                        ));
                        std::fs::rename(path, &aside).map_err(context("moving aside"))?;
                        tracing::warn!(
                            "{} was not a capture of tapmesh's; moved to {}",
                            path.display(),
                            aside.display()
                        );
                    }
                    if len > 0 && mine {
                        cut_to_whole_records(path, f, len).map_err(context("repairing"))?;
                    }
                    len > 0 && mine
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => false,
                Err(e) => return Err(context("opening")(e)),
            };
        // Non-blocking: a FIFO with no reader fails at once (ENXIO) instead
        // of holding the caller, and the mirror service with it, until one
        // comes. Writes block again as usual.
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ENXIO) => io::Error::new(
                    e.kind(),
                    format!(
                        "opening {}: a FIFO with no reader (start the reader first)",
                        path.display()
                    ),
                ),
                _ => context("opening")(e),
            })?;
        clear_nonblocking(&file).map_err(context("opening"))?;
        // A file made earlier (by another program, or before this mode) too;
        // a FIFO or device keeps the modes its owner gave it.
        if regular {
            file.set_permissions(std::fs::Permissions::from_mode(0o600))
                .map_err(context("restricting"))?;
        }
        let out = Committed::new(file).map_err(context("reading"))?;
        if ours {
            Ok(PcapWriter { out })
        } else {
            // The header at once: a capture with no copy yet is still a
            // pcap file (empty, readers took it for another format).
            let mut w = Self::new(out)?;
            w.out.keep = w.out.buffer.len();
            w.out.flush().map_err(context("writing the header of"))?;
            Ok(w)
        }
    }
}

/// Cuts the capture at `path` (read through `file`, at the end of its
/// global header; `len` bytes) after its last whole record. Records
/// appended behind a cut one (a crash, a full disk under another writer, a
/// copy cut short) would make every reader give up at the cut.
fn cut_to_whole_records(path: &Path, file: File, len: u64) -> io::Result<()> {
    use io::{BufRead, Read};
    let mut reader = io::BufReader::with_capacity(WRITE_BUFFER, file);
    let mut end = 24u64;
    loop {
        let mut header = [0u8; 16];
        if end + 16 > len || reader.read_exact(&mut header).is_err() {
            break;
        }
        let incl_len = u32::from_ne_bytes(header[8..12].try_into().expect("4 bytes"));
        let next = end + 16 + u64::from(incl_len);
        // A length no record of this writer has is the start of garbage.
        if incl_len > SNAPLEN || next > len {
            break;
        }
        // Skips the frame, within the buffer when it is there.
        let buffered = reader.fill_buf()?.len();
        if incl_len as usize <= buffered {
            reader.consume(incl_len as usize);
        } else {
            reader.seek_relative(i64::from(incl_len))?;
        }
        end = next;
    }
    if end < len {
        std::fs::OpenOptions::new()
            .write(true)
            .open(path)?
            .set_len(end)?;
        tracing::warn!(
            "{}: its last {} bytes were not a whole record; cut before appending",
            path.display(),
            len - end
        );
    }
    Ok(())
}

/// Makes writes to `file` block again (see [`PcapWriter::create`]).
fn clear_nonblocking(file: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: fcntl on an fd this function borrows; results checked.
    unsafe {
        let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) < 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The global header this writer puts at the start of a file.
fn global_header() -> [u8; 24] {
    let mut header = [0u8; 24];
    header[0..4].copy_from_slice(&MAGIC.to_ne_bytes());
    header[4..6].copy_from_slice(&2u16.to_ne_bytes());
    header[6..8].copy_from_slice(&4u16.to_ne_bytes());
    // thiszone (8..12) and sigfigs (12..16) are 0.
    header[16..20].copy_from_slice(&SNAPLEN.to_ne_bytes());
    header[20..24].copy_from_slice(&LINKTYPE_ETHERNET.to_ne_bytes());
    header
}

impl<W: Write> PcapWriter<W> {
    /// Writes the global header to `out`.
    pub fn new(mut out: W) -> io::Result<Self> {
        out.write_all(&global_header())?;
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

    /// The underlying writer (for a file, call `flush` first).
    pub fn into_inner(self) -> W {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_fifo_without_a_reader_is_refused_at_once_and_one_with_a_reader_taken() {
        let dir = std::env::temp_dir().join(format!("tapmesh-fifo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("live");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a plain mkfifo on a path of our own.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let started = std::time::Instant::now();
        let e = PcapWriter::create(&fifo).err().expect("no reader");
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(e.to_string().contains("a FIFO with no reader"), "{e}");
        let reader = std::thread::spawn({
            let fifo = fifo.clone();
            move || std::fs::read(fifo).unwrap()
        });
        // The reader opens when it runs; until then the FIFO has none.
        let mut w = loop {
            match PcapWriter::create(&fifo) {
                Ok(w) => break w,
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        w.flush().unwrap();
        drop(w);
        assert_eq!(reader.join().unwrap(), global_header());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// (incl_len of each record) of a classic pcap file; panics on a cut one.
    fn records(bytes: &[u8]) -> Vec<u32> {
        let mut at = 24;
        let mut out = Vec::new();
        while at < bytes.len() {
            let incl = u32::from_ne_bytes(bytes[at + 8..at + 12].try_into().unwrap());
            at += 16 + incl as usize;
            assert!(at <= bytes.len(), "a cut record at the end");
            out.push(incl);
        }
        out
    }

    #[test]
    fn a_cut_record_at_the_end_is_removed_before_appending() {
        let dir = std::env::temp_dir().join(format!("tapmesh-cut-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.pcap");
        let mut w = PcapWriter::create(&path).unwrap();
        for n in [60, 70, 80] {
            w.write(&vec![1u8; n], SystemTime::now()).unwrap();
        }
        w.flush().unwrap();
        drop(w);
        let len = std::fs::metadata(&path).unwrap().len();
        // Half of the last record (a crash, a copy cut short).
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 20)
            .unwrap();
        let mut w = PcapWriter::create(&path).unwrap();
        w.write(&[2u8; 90], SystemTime::now()).unwrap();
        w.flush().unwrap();
        drop(w);
        assert_eq!(records(&std::fs::read(&path).unwrap()), [60, 70, 90]);
        // A whole file is left as it is.
        let mut w = PcapWriter::create(&path).unwrap();
        w.write(&[3u8; 64], SystemTime::now()).unwrap();
        w.flush().unwrap();
        drop(w);
        assert_eq!(records(&std::fs::read(&path).unwrap()), [60, 70, 90, 64]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_is_appended_to_private_and_a_foreign_one_moved_aside() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("tapmesh-pcap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.pcap");
        std::fs::write(&path, b"not a capture").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        for round in 1..=2u64 {
            let mut w = PcapWriter::create(&path).unwrap();
            if round == 1 {
                // A new capture is a pcap file before its first record.
                assert_eq!(std::fs::read(&path).unwrap(), global_header());
            }
            w.write(&[round as u8; 10], UNIX_EPOCH).unwrap();
            w.flush().unwrap();
            let bytes = std::fs::read(&path).unwrap();
            assert_eq!(bytes.len() as u64, 24 + round * 26, "round {round}");
            assert_eq!(mode(&path), 0o600);
        }
        let aside: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name() != "c.pcap")
            .collect();
        assert_eq!(aside.len(), 1);
        assert_eq!(std::fs::read(aside[0].path()).unwrap(), b"not a capture");
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A FIFO (tshark reading live) is written to at once, never read from
    /// or chmodded; a reader that opened first gets the header.
    #[test]
    fn a_fifo_gets_a_new_stream_without_being_read() {
        use std::ffi::CString;
        use std::os::fd::FromRawFd;
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("tapmesh-pcap-fifo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("live.pcap");
        let c_path = CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid path; the fd is owned at once.
        let mut reader = unsafe {
            assert_eq!(libc::mkfifo(c_path.as_ptr(), 0o640), 0);
            let fd = libc::open(c_path.as_ptr(), libc::O_RDONLY | libc::O_NONBLOCK);
            assert!(fd >= 0);
            File::from_raw_fd(fd)
        };
        let (done, opened) = std::sync::mpsc::channel();
        let writer_path = path.clone();
        std::thread::spawn(move || {
            let mut w = PcapWriter::create(&writer_path).unwrap();
            w.flush().unwrap();
            let _ = done.send(w);
        });
        let w = opened
            .recv_timeout(Duration::from_secs(5))
            .expect("PcapWriter::create blocked on a FIFO");
        let mut header = [0u8; 24];
        io::Read::read_exact(&mut reader, &mut header).unwrap();
        assert_eq!(header, global_header());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        drop(w);
        std::fs::remove_dir_all(dir).unwrap();
    }

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
