//! Connecting to the admin socket (used by the CLI and the tests).

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use thiserror::Error;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};

use super::proto::admin_client::AdminClient;

#[derive(Debug, Error)]
pub enum AdminClientError {
    #[error(
        "cannot reach the daemon at {path}: {source} (is `tapmesh daemon` running? are you root?)"
    )]
    Connect {
        path: PathBuf,
        source: tonic::transport::Error,
    },
}

/// Opens a client on the daemon's admin socket.
pub async fn connect(path: &Path) -> Result<AdminClient<Channel>, AdminClientError> {
    let socket = path.to_path_buf();
    let channel = Endpoint::from_static("http://tapmesh.admin")
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(socket).await?)) }
        }))
        .await
        .map_err(|source| AdminClientError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(AdminClient::new(channel))
}
