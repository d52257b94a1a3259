//! `tapmesh ambassador`: Meridio's TAPA, run unprivileged in the application's
//! network namespace. It serves `ambassador.v1.Tap` on a unix socket and asks
//! the node daemon (node socket) for conduits and registrations.

mod conduit;
mod stream;
mod tap;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};

use crate::config::DEFAULT_NODE_SOCKET;
use crate::proto::ambassador::tap_server::TapServer;

pub use tap::Tap;

/// Settings; the `MERIDIO_*` variables keep Meridio's names and defaults.
#[derive(Clone, Debug, clap::Args)]
pub struct AmbassadorSettings {
    /// Socket the application calls (ambassador.v1.Tap).
    #[arg(long, env = "MERIDIO_SOCKET", default_value = "/ambassador.sock")]
    pub socket: PathBuf,
    /// The node daemon's socket.
    #[arg(long, env = "TAPMESH_NODE_SOCKET", default_value = DEFAULT_NODE_SOCKET)]
    pub node_socket: PathBuf,
    /// Target name (normally the pod name); shown in logs.
    #[arg(long, env = "MERIDIO_NAME", default_value = "nsc")]
    pub name: String,
    /// Registration refresh period.
    #[arg(long, env = "MERIDIO_NSP_ENTRY_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub entry_timeout: Duration,
    /// Bound on each call to the node daemon, and on Close.
    #[arg(long, env = "MERIDIO_TIMEOUT", default_value = "15s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// TRACE, DEBUG, INFO, WARN or ERROR (or a tracing filter).
    #[arg(long, env = "MERIDIO_LOG_LEVEL", default_value = "INFO")]
    pub log_level: String,
}

pub fn run(settings: AmbassadorSettings) -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_new(settings.log_level.to_lowercase())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tapmesh ambassador: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(serve(settings))
}

async fn serve(settings: AmbassadorSettings) -> ExitCode {
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("tapmesh ambassador: signals: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (listener, bound) = match crate::uds::bind(&settings.socket, 0o777) {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "tapmesh ambassador: socket {}: {e}",
                settings.socket.display()
            );
            return ExitCode::FAILURE;
        }
    };
    let tap = Tap::new(settings.clone());
    let stop = tokio_util::sync::CancellationToken::new();
    let shutdown = stop.clone();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TapServer::new(tap.clone()))
            .serve_with_incoming_shutdown(crate::uds::incoming(listener), async move {
                shutdown.cancelled().await
            }),
    );
    tracing::info!(socket = %settings.socket.display(), name = %settings.name, "ambassador serving");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("stopping: closing every stream");
    tap.close_all().await;
    tap.end_watches();
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    bound.remove();
    ExitCode::SUCCESS
}
