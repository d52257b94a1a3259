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
    /// Other users who may call it, by uid (comma-separated). Its own uid
    /// and root always may; nobody else unless listed here or by gid.
    #[arg(
        long = "allow-uid",
        env = "TAPMESH_AMBASSADOR_ALLOW_UIDS",
        value_delimiter = ','
    )]
    pub allow_uids: Vec<u32>,
    /// Other users who may call it, by their primary gid (comma-separated).
    #[arg(
        long = "allow-gid",
        env = "TAPMESH_AMBASSADOR_ALLOW_GIDS",
        value_delimiter = ','
    )]
    pub allow_gids: Vec<u32>,
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
        // Colours only on a terminal: `kubectl logs` shows the escapes.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
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
    // Only its own uid (and root) may connect, unless others are listed:
    // then the file is open to all and the peer check below decides.
    let peers = Peers::of(&settings);
    let mode = if peers.others() { 0o666 } else { 0o600 };
    let (listener, bound) = match crate::uds::bind(&settings.socket, mode) {
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
    // Tap messages are small: the node socket's default limits apply here too.
    let limits = crate::config::NspLimits::default();
    let service =
        TapServer::new(tap.clone()).max_decoding_message_size(limits.message_bytes as usize);
    let incoming = crate::uds::incoming_limited(
        listener,
        crate::uds::PeerLimit::new("nsp.limits.connections_per_uid", limits.connections_per_uid),
    );
    // grpc.health.v1 as Meridio's TAPA serves it on this socket (its
    // readiness probe is grpc_health_probe -addr=unix://<socket>): the
    // server ("") and the Tap service SERVING while it serves.
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<TapServer<crate::ambassador::tap::Tap>>()
        .await;
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .max_concurrent_streams(Some(limits.streams_per_connection))
            .layer(tower::util::MapResponseLayer::new(
                crate::codec::clamp_status_message::<tonic::body::Body>,
            ))
            .add_service(health_service)
            .add_service(tonic::service::interceptor::InterceptedService::new(
                service,
                move |r| peers.check(r),
            ))
            .serve_with_incoming_shutdown(incoming, async move { shutdown.cancelled().await }),
    );
    tracing::info!(socket = %settings.socket.display(), name = %settings.name, "ambassador serving");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("stopping: closing every stream");
    health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    health
        .set_not_serving::<TapServer<crate::ambassador::tap::Tap>>()
        .await;
    tap.close_all().await;
    tap.end_watches();
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    bound.remove();
    ExitCode::SUCCESS
}

/// Who may call the ambassador: checked on every call from the peer's
/// credentials (SO_PEERCRED), whatever the socket file's mode.
#[derive(Clone, Debug)]
struct Peers {
    own_uid: u32,
    uids: Vec<u32>,
    gids: Vec<u32>,
}

impl Peers {
    fn of(settings: &AmbassadorSettings) -> Self {
        Self {
            // SAFETY: geteuid has no preconditions.
            own_uid: unsafe { libc::geteuid() },
            uids: settings.allow_uids.clone(),
            gids: settings.allow_gids.clone(),
        }
    }

    fn others(&self) -> bool {
        !self.uids.is_empty() || !self.gids.is_empty()
    }

    fn allows(&self, uid: u32, gid: u32) -> bool {
        uid == 0 || uid == self.own_uid || self.uids.contains(&uid) || self.gids.contains(&gid)
    }

    fn check(&self, request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let cred = request
            .extensions()
            .get::<tonic::transport::server::UdsConnectInfo>()
            .and_then(|info| info.peer_cred);
        match cred {
            Some(c) if self.allows(c.uid(), c.gid()) => Ok(request),
            Some(c) => Err(tonic::Status::permission_denied(format!(
                "uid {} (gid {}) may not use this ambassador: only uid {} and root may, or those given with --allow-uid/--allow-gid",
                c.uid(),
                c.gid(),
                self.own_uid
            ))),
            None => Err(tonic::Status::permission_denied(
                "cannot identify the caller (no peer credentials)",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Peers;

    #[test]
    fn own_uid_root_and_listed_peers_only() {
        let p = Peers {
            own_uid: 1000,
            uids: vec![2000],
            gids: vec![3000],
        };
        assert!(p.allows(0, 0));
        assert!(p.allows(1000, 1000));
        assert!(p.allows(2000, 2000));
        assert!(p.allows(4000, 3000));
        assert!(!p.allows(4000, 4000));
        assert!(!Peers {
            uids: vec![],
            gids: vec![],
            ..p.clone()
        }
        .others());
    }
}
