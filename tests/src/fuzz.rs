//! The packet fuzzer's tools: seeded mutation of frames, the seed corpus
//! kept in the repository (`tests/fuzz/corpus/*.hex`), and frames that
//! made a difference saved as hex and pcap.

use std::{
    fs,
    path::{Path, PathBuf},
    time::SystemTime,
};

use rand::{rngs::StdRng, Rng, SeedableRng};
use tapmesh::mirror::pcap::PcapWriter;

/// How long a run goes: `TAPMESH_FUZZ_CASES` cases (else the default), or
/// `TAPMESH_FUZZ_SECONDS` if that comes first.
pub struct Settings {
    pub cases: u64,
    pub seconds: Option<u64>,
    /// `TAPMESH_FUZZ_SEED`, else fixed, so a run is repeatable.
    pub seed: u64,
}

pub fn settings(default_cases: u64) -> Settings {
    let var = |name: &str| {
        std::env::var(name).ok().map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}={v}: not a number"))
        })
    };
    Settings {
        cases: var("TAPMESH_FUZZ_CASES").unwrap_or(default_cases),
        seconds: var("TAPMESH_FUZZ_SECONDS"),
        seed: var("TAPMESH_FUZZ_SEED").unwrap_or(0x7461_706d),
    }
}

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// Values that sit on the edges parsers get wrong.
const BYTES: &[u8] = &[
    0, 1, 4, 5, 6, 8, 0x0f, 0x11, 0x20, 0x3f, 0x40, 0x45, 0x46, 0x60, 0x7f, 0x80, 0xff,
];
const WORDS: &[u16] = &[
    0, 1, 7, 8, 19, 20, 27, 28, 40, 0x2000, 0x1fff, 0x3fff, 0x4000, 0x0800, 0x86dd, 0x8100, 0x88a8,
    0xffff,
];

/// One to four random edits: bit flips, edge values at any byte or header
/// word, cuts, appended bytes, bytes inserted or removed.
pub fn mutate(rng: &mut StdRng, frame: &mut Vec<u8>) {
    for _ in 0..rng.random_range(1..=4) {
        let len = frame.len();
        match rng.random_range(0..8) {
            0 if len > 0 => {
                let at = rng.random_range(0..len);
                frame[at] ^= 1 << rng.random_range(0..8);
            }
            1 if len > 0 => {
                let at = rng.random_range(0..len);
                frame[at] = BYTES[rng.random_range(0..BYTES.len())];
            }
            2 if len > 1 => {
                let at = rng.random_range(0..len - 1);
                let w = WORDS[rng.random_range(0..WORDS.len())];
                frame[at..at + 2].copy_from_slice(&w.to_be_bytes());
            }
            3 if len > 0 => frame.truncate(rng.random_range(0..len)),
            4 => {
                let n = rng.random_range(1..64);
                frame.extend((0..n).map(|_| rng.random::<u8>()));
            }
            5 => {
                let at = rng.random_range(0..=len);
                let n = rng.random_range(1..9);
                frame.splice(at..at, (0..n).map(|_| rng.random::<u8>()));
            }
            6 if len > 0 => {
                let at = rng.random_range(0..len);
                let end = (at + rng.random_range(1..9)).min(len);
                frame.drain(at..end);
            }
            _ => {
                // A length field of its own value plus or minus a little.
                if len > 20 {
                    let at = rng.random_range(12..len - 1);
                    let w = u16::from_be_bytes([frame[at], frame[at + 1]]);
                    let d: i16 = rng.random_range(-9..=9);
                    frame[at..at + 2].copy_from_slice(&w.wrapping_add_signed(d).to_be_bytes());
                }
            }
        }
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(text: &str) -> Result<Vec<u8>, String> {
    let digits: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if !digits.len().is_multiple_of(2) {
        return Err("an odd number of hex digits".into());
    }
    digits
        .chunks(2)
        .map(|pair| {
            u8::from_str_radix(std::str::from_utf8(pair).unwrap_or("zz"), 16)
                .map_err(|_| format!("not hex: {:?}", String::from_utf8_lossy(pair)))
        })
        .collect()
}

/// The repository's corpus directory.
pub fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus")
}

/// One corpus file: `# expect: VERDICT` (a drop reason's name, `pass` or
/// `redirect`), other `#` lines free, then the frame in hex.
pub struct Entry {
    pub name: String,
    pub expect: String,
    pub frame: Vec<u8>,
}

/// Every `*.hex` file of `dir`, sorted by name.
pub fn read_corpus(dir: &Path) -> Vec<Entry> {
    let mut paths: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "hex"))
        .collect();
    paths.sort();
    paths
        .iter()
        .map(|path| {
            let text = fs::read_to_string(path).expect("a corpus file");
            let expect = text
                .lines()
                .find_map(|l| l.strip_prefix("# expect:"))
                .unwrap_or_else(|| panic!("{}: no \"# expect:\" line", path.display()))
                .trim()
                .to_string();
            let body: String = text
                .lines()
                .filter(|l| !l.starts_with('#'))
                .collect::<Vec<_>>()
                .join("");
            let frame = unhex(&body).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            Entry {
                name: path.file_stem().unwrap().to_string_lossy().into_owned(),
                expect,
                frame,
            }
        })
        .collect()
}

/// Writes a corpus file (see [`Entry`]).
pub fn write_entry(dir: &Path, name: &str, about: &str, expect: &str, frame: &[u8]) {
    fs::create_dir_all(dir).expect("creating the corpus directory");
    let body: Vec<String> = frame.chunks(32).map(hex).collect();
    let text = format!("# {about}\n# expect: {expect}\n{}\n", body.join("\n"));
    fs::write(dir.join(format!("{name}.hex")), text).expect("writing a corpus file");
}

/// Saves a frame that made a difference as `dir/<name>.hex` (with `why`
/// and an expect line to fill in, ready to move into the corpus) and
/// `dir/<name>.pcap`; returns the hex file's path.
pub fn save_failure(dir: &Path, name: &str, why: &str, frame: &[u8]) -> PathBuf {
    let about = why.replace('\n', "\n# ");
    write_entry(dir, name, &about, "FILL-IN", frame);
    let file = fs::File::create(dir.join(format!("{name}.pcap"))).expect("creating a pcap file");
    let mut pcap = PcapWriter::new(file).expect("writing a pcap header");
    pcap.write(frame, SystemTime::now())
        .expect("writing a pcap record");
    dir.join(format!("{name}.hex"))
}

/// A random byte string of 0..=`max` bytes.
pub fn random_bytes(rng: &mut StdRng, max: usize) -> Vec<u8> {
    let n = rng.random_range(0..=max);
    (0..n).map(|_| rng.random::<u8>()).collect()
}
