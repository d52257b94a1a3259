//! gRPC channels and servers over unix sockets.

mod authority;

use std::path::Path;

use futures::{Stream, StreamExt};
use hyper_util::rt::TokioIo;
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::{Channel, Endpoint};

pub use authority::{FixAuthority, Rewriter};

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

/// Binds a unix socket with `mode`, replacing a stale socket file (not one in use).
pub fn bind(path: &Path, mode: u32) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    check_free(path)?;
    let _ = std::fs::remove_file(path);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(listener)
}
