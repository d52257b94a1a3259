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
}

impl PeerLimit {
    pub fn new(setting: &'static str, limit: u32) -> Self {
        Self {
            setting,
            limit,
            open: Arc::default(),
            warnings: Arc::default(),
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
