//! Connecting to the admin socket (used by the CLI and the tests).

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use thiserror::Error;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};

use super::proto::admin_client::AdminClient;

#[derive(Debug, Error)]
pub enum AdminClientError {
    /// `cause` is the whole chain: "transport error" alone hid whether the
    /// socket is missing, refused or not permitted.
    #[error(
        "cannot reach the daemon at {path}: {cause} (is `tapmesh daemon` running? are you root?)"
    )]
    Connect { path: PathBuf, cause: String },
}

/// How long a call may wait for the daemon's answer: a stopped or wedged
/// daemon still accepts connections (the kernel queues them), and the CLI
/// must not hang on it.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Opens a client on the daemon's admin socket.
pub async fn connect(path: &Path) -> Result<AdminClient<Channel>, AdminClientError> {
    connect_within(path, CALL_TIMEOUT).await
}

/// [`connect`], each call bounded by `timeout` (its error says "Timeout expired").
pub async fn connect_within(
    path: &Path,
    timeout: Duration,
) -> Result<AdminClient<Channel>, AdminClientError> {
    let socket = path.to_path_buf();
    let channel = Endpoint::from_static("http://tapmesh.admin")
        .connect_timeout(timeout)
        .timeout(timeout)
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(socket).await?)) }
        }))
        .await
        .map_err(|source| AdminClientError::Connect {
            path: path.to_path_buf(),
            cause: crate::causes(&source),
        })?;
    Ok(AdminClient::new(channel))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_daemon_that_never_answers_is_an_error_not_a_hang() {
        let dir = std::env::temp_dir().join(format!("tapmesh-admin-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("admin.sock");
        // Accepts and holds connections, says nothing: a stopped daemon.
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let held = tokio::spawn(async move {
            let mut kept = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                kept.push(stream);
            }
        });
        let started = std::time::Instant::now();
        let answer = async {
            let mut client = connect_within(&path, Duration::from_millis(500)).await?;
            Ok::<_, Box<dyn std::error::Error>>(
                client
                    .status(super::super::proto::StatusRequest::default())
                    .await?,
            )
        }
        .await;
        held.abort();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(answer.is_err());
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }
}
