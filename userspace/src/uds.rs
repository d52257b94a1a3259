//! gRPC channels and servers over unix sockets.

/// Writes and connection info of a stream wrapper `$wrapper<S>` go
/// straight to its `inner` stream (the wrappers differ only in reading).
macro_rules! writes_through_inner {
    ($wrapper:ident) => {
        impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for $wrapper<S> {
            fn poll_write(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
            }

            fn poll_write_vectored(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                self.inner.is_write_vectored()
            }

            fn poll_flush(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
            }

            fn poll_shutdown(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
            }
        }

        impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected
            for $wrapper<S>
        {
            type ConnectInfo = S::ConnectInfo;

            fn connect_info(&self) -> Self::ConnectInfo {
                self.inner.connect_info()
            }
        }
    };
}

mod authority;
mod peers;

use std::path::Path;

use futures::{Stream, StreamExt};
use hyper_util::rt::TokioIo;
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::{Channel, Endpoint};

pub use authority::{FixAuthority, Rewriter};
pub use peers::{Counted, PeerLimit};

/// A channel that connects on first use and reconnects after a failure, so a
/// restarted server is found again.
pub fn lazy_channel(path: &Path) -> Channel {
    let socket = path.to_path_buf();
    Endpoint::from_static("http://tapmesh.local").connect_with_connector_lazy(tower::service_fn(
        move |_| {
            let socket = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(socket).await?)) }
        },
    ))
}

/// The connections of a gRPC server's unix socket, each behind
/// [`FixAuthority`], so clients that send the socket path as `:authority`
/// (grpcio ≥ 1.57, grpc-java, Swift gRPC) are served too.
pub fn incoming(
    listener: UnixListener,
) -> impl Stream<Item = std::io::Result<FixAuthority<UnixStream>>> {
    UnixListenerStream::new(listener).map(|conn| conn.map(FixAuthority::new))
}

/// [`incoming`] with each peer uid's open connections bounded by `limit`:
/// one past it is closed at once (and a warning names the setting).
pub fn incoming_limited(
    listener: UnixListener,
    limit: PeerLimit,
) -> impl Stream<Item = std::io::Result<FixAuthority<Counted<UnixStream>>>> {
    UnixListenerStream::new(listener).filter_map(move |conn| {
        futures::future::ready(match conn {
            Ok(stream) => limit.admit(stream).map(|c| Ok(FixAuthority::new(c))),
            Err(e) => Some(Err(e)),
        })
    })
}
/// Fails if `path` is a socket another process serves, or not a socket at
/// all; a daemon checks its sockets so before it attaches anything.
pub fn check_free(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        ));
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!(
                "{} is in use by another process (another tapmesh daemon?)",
                path.display()
            ),
        ));
    }
    Ok(())
}

/// A socket file this process bound. [`Bound::remove`] removes it only if
/// the path still names that file: a stop never deletes a file someone else
/// put there since (or one that was never ours).
#[derive(Debug)]
pub struct Bound {
    path: std::path::PathBuf,
    id: (u64, u64),
}

impl Bound {
    pub fn remove(&self) {
        use std::os::unix::fs::MetadataExt;
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.id {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// Binds a unix socket with `mode`. A file at `path` is removed only if it
/// is a stale socket (nobody answers on it); any other file, or a socket in
/// use, is refused ([`check_free`]). Every socket of tapmesh is bound here.
pub fn bind(path: &Path, mode: u32) -> std::io::Result<(tokio::net::UnixListener, Bound)> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    check_free(path)?;
    if std::fs::symlink_metadata(path).is_ok() {
        std::fs::remove_file(path).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("removing the stale socket {}: {e}", path.display()),
            )
        })?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    let meta = std::fs::symlink_metadata(path)?;
    let bound = Bound {
        path: path.to_path_buf(),
        id: (meta.dev(), meta.ino()),
    };
    if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)) {
        bound.remove();
        return Err(e);
    }
    Ok((listener, bound))
}
