//! Open connections per peer uid on a unix socket. Streams per connection
//! are HTTP/2's to bound; this bounds the connections themselves, idle ones
//! included, so one user cannot hold the daemon's memory with thousands of
//! connections it never uses. Root is not counted (as for conduits).

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::UnixStream;

use crate::repeats::Repeats;

/// The open connections of each uid, and the limit (named by its setting).
#[derive(Clone)]
pub struct PeerLimit {
    setting: &'static str,
    limit: u32,
    open: Arc<Mutex<HashMap<u32, u32>>>,
    warnings: Arc<Mutex<Repeats>>,
    /// Refused connections still being told why (bounded: past it, one is
    /// closed without a word).
    telling: Arc<tokio::sync::Semaphore>,
}

/// Refused connections told why at once, at most.
const TELLING: usize = 64;
/// How long a refused connection is kept to read the client's first bytes,
/// so that it reads the reason instead of failing its write.
const LINGER: std::time::Duration = std::time::Duration::from_secs(1);

impl PeerLimit {
    pub fn new(setting: &'static str, limit: u32) -> Self {
        Self {
            setting,
            limit,
            open: Arc::default(),
            warnings: Arc::default(),
            telling: Arc::new(tokio::sync::Semaphore::new(TELLING)),
        }
    }

    /// The connection counted under its peer's uid, or None (it is closed
    /// when dropped) past the limit.
    pub fn admit(&self, stream: UnixStream) -> Option<Counted<UnixStream>> {
        let uid = match stream.peer_cred() {
            Ok(cred) => cred.uid(),
            Err(e) => {
                tracing::warn!("a connection without peer credentials closed: {e}");
                return None;
            }
        };
        if uid == 0 {
            return Some(Counted {
                inner: stream,
                _held: None,
            });
        }
        let mut open = self.open.lock().expect("peer counts lock");
        let count = open.entry(uid).or_default();
        if *count >= self.limit {
            let reason = format!(
                "limit {} = {} reached: uid {uid} has {count} connections; closed a new one",
                self.setting, self.limit
            );
            let line = self
                .warnings
                .lock()
                .expect("peer warnings lock")
                .note(&reason, Instant::now());
            if let Some(line) = line {
                tracing::warn!("{line}");
            }
            let why = format!(
                "limit {} = {} reached: uid {uid} has {count} connections",
                self.setting, self.limit
            );
            self.tell(stream, &why);
            return None;
        }
        *count += 1;
        Some(Counted {
            inner: stream,
            _held: Some(Held {
                uid,
                open: self.open.clone(),
            }),
        })
    }
}

impl PeerLimit {
    /// Tells a refused connection why in HTTP/2 (the server's SETTINGS,
    /// then GOAWAY with ENHANCE_YOUR_CALM and the reason as debug data,
    /// which gRPC clients log), then closes it once the
    /// client closes or after [`LINGER`], reading what it sends meanwhile.
    fn tell(&self, stream: UnixStream, why: &str) {
        let Ok(permit) = self.telling.clone().try_acquire_owned() else {
            return;
        };
        let frames = refusal(why);
        if stream.try_write(&frames).is_err() {
            return;
        }
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let _ = tokio::time::timeout(LINGER, async {
                loop {
                    stream.readable().await?;
                    match stream.try_read(&mut buf) {
                        Ok(0) => return Ok(()),
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(e),
                    }
                }
            })
            .await;
            drop(permit);
        });
    }
}

/// The server's HTTP/2 preface (an empty SETTINGS frame) and a GOAWAY
/// (last stream 0, ENHANCE_YOUR_CALM) carrying `why`.
fn refusal(why: &str) -> Vec<u8> {
    const ENHANCE_YOUR_CALM: u32 = 0xb;
    let why = &why.as_bytes()[..why.len().min(1024)];
    let mut out = vec![0, 0, 0, 0x4, 0, 0, 0, 0, 0];
    let len = (8 + why.len()) as u32;
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.extend_from_slice(&[0x7, 0, 0, 0, 0, 0]);
    out.extend_from_slice(&0u32.to_be_bytes());
    out.extend_from_slice(&ENHANCE_YOUR_CALM.to_be_bytes());
    out.extend_from_slice(why);
    out
}

/// One counted connection: uncounted when dropped.
struct Held {
    uid: u32,
    open: Arc<Mutex<HashMap<u32, u32>>>,
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut open = self.open.lock().expect("peer counts lock");
        if let Some(count) = open.get_mut(&self.uid) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.uid);
            }
        }
    }
}

/// An admitted connection; reads and writes go straight to `inner`.
pub struct Counted<S> {
    inner: S,
    /// Uncounts the connection when it closes (None for root).
    _held: Option<Held>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

writes_through_inner!(Counted);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_is_settings_then_goaway_with_the_reason() {
        let frames = refusal("limit x = 2 reached");
        assert_eq!(&frames[..9], &[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        let goaway = &frames[9..];
        assert_eq!(&goaway[..9], &[0, 0, 27, 7, 0, 0, 0, 0, 0]);
        assert_eq!(&goaway[9..17], &[0, 0, 0, 0, 0, 0, 0, 0xb]);
        assert_eq!(&goaway[17..], b"limit x = 2 reached");
    }
}
