//! The `nsp` plugin: loads the persisted registry, applies the configuration
//! file (and reloads it when it changes), expires targets, and serves the
//! node API on a unix socket any local user may reach.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use super::conduits::Pools;
use super::config::NspConfig;
use super::server::NodeApi;
use super::state::{Nsp, Settings};
use crate::config::{Config, NspSettings};
use crate::core::{Plugin, PluginError};
use crate::lb::service::LbService;
use crate::net::prefix::parse_pool;
use crate::proto::node::conduits_server::ConduitsServer;
use crate::proto::nsp::{
    configuration_manager_server::ConfigurationManagerServer,
    target_registry_server::TargetRegistryServer,
};

/// The Meridio file's name in [`crate::health`].
pub const PLANE: &str = "nsp";

pub struct NspPlugin {
    lb: Arc<LbService>,
    settings: Mutex<NspSettings>,
    /// `[daemon] state_dir`.
    state_dir: Mutex<PathBuf>,
    nsp: Mutex<Option<Arc<Nsp>>>,
    stop: Mutex<Option<CancellationToken>>,
    /// The node socket's file, removed at stop.
    bound: Mutex<Option<crate::uds::Bound>>,
    last_error: Arc<Mutex<Option<String>>>,
    /// Other nodes' targets for the first commit ([`NspPlugin::stage_remote`]).
    staged_remote: Mutex<Vec<super::state::RemoteTarget>>,
}

impl NspPlugin {
    /// Other nodes' targets (cluster mode, kept from before a restart) that
    /// the registry's first write includes; set before the start.
    pub fn stage_remote(&self, remote: Vec<super::state::RemoteTarget>) {
        *self.staged_remote.lock().expect("staged lock") = remote;
    }

    pub fn new(lb: Arc<LbService>) -> Self {
        Self {
            lb,
            settings: Mutex::new(NspSettings::default()),
            state_dir: Mutex::default(),
            nsp: Mutex::new(None),
            stop: Mutex::new(None),
            bound: Mutex::new(None),
            last_error: Arc::default(),
            staged_remote: Mutex::default(),
        }
    }

    /// The running registry; None before start.
    pub fn nsp(&self) -> Option<Arc<Nsp>> {
        self.nsp.lock().expect("nsp lock").clone()
    }

    /// Registered targets: (enabled, disabled); None before start.
    pub fn registry_sizes(&self) -> Option<(usize, usize)> {
        let nsp = self.nsp.lock().expect("nsp lock").clone()?;
        let targets = nsp.snapshot().targets;
        let enabled = targets
            .iter()
            .filter(|t| t.status == super::registry::Status::Enabled)
            .count();
        Some((enabled, targets.len() - enabled))
    }

    fn settings(&self) -> NspSettings {
        self.settings.lock().expect("settings lock").clone()
    }
}

fn read_config(path: Option<&PathBuf>) -> Result<NspConfig, String> {
    match path {
        Some(p) => NspConfig::read(p).map_err(|e| e.to_string()),
        None => Ok(NspConfig::default()),
    }
}

fn stamp(path: &PathBuf) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

fn pool<T: std::str::FromStr>(text: &str) -> Option<(T, u8)> {
    let cidr = parse_pool(text).ok()?;
    Some((cidr.addr.to_string().parse().ok()?, cidr.len))
}

#[async_trait]
impl Plugin for NspPlugin {
    fn name(&self) -> &'static str {
        "nsp"
    }

    async fn configure(
        &self,
        _scope: CancellationToken,
        config: &Config,
    ) -> Result<(), PluginError> {
        // A bad file stops the daemon at start; later a bad edit is reported and skipped.
        read_config(config.nsp.config_file.as_ref()).map_err(PluginError::new)?;
        // Checked here, before the dataplane attaches anything.
        crate::uds::check_free(&config.nsp.socket)
            .map_err(|e| PluginError::new(format!("nsp.socket: {e}")))?;
        *self.settings.lock().expect("settings lock") = config.nsp.clone();
        *self.state_dir.lock().expect("settings lock") = config.daemon.state_dir.clone();
        Ok(())
    }

    async fn start(&self, scope: CancellationToken) -> Result<(), PluginError> {
        let settings = self.settings();
        let nsp = Arc::new(Nsp::new(
            self.lb.clone(),
            Settings {
                state_file: self
                    .state_dir
                    .lock()
                    .expect("settings lock")
                    .join("nsp-state.json"),
                pools: Pools {
                    v4: pool(&settings.conduit_prefix_v4),
                    v6: pool(&settings.conduit_prefix_v6),
                },
                mtu: settings.conduit_mtu,
                limits: settings.limits.clone(),
            },
            settings.entry_timeout,
        ));
        let config = read_config(settings.config_file.as_ref()).map_err(PluginError::new)?;
        let staged = std::mem::take(&mut *self.staged_remote.lock().expect("staged lock"));
        if !staged.is_empty() {
            nsp.stage_remote(staged).await;
        }
        nsp.start(config)
            .await
            .map_err(|e| PluginError::new(e.to_string()))?;
        if let Some(path) = &settings.config_file {
            let detail = format!("applied {}", path.display());
            crate::health::planes().update(PLANE, |h| {
                h.connected = true;
                h.synced = true;
                h.detail = detail;
            });
        }

        let (listener, bound) = bind(&settings.socket)?;
        *self.bound.lock().expect("bound lock") = Some(bound);
        let stop = scope.child_token();
        let api = NodeApi(nsp.clone());
        let shutdown = stop.clone();
        let limits = &settings.limits;
        let size = limits.message_bytes as usize;
        let incoming = crate::uds::incoming_limited(
            listener,
            crate::uds::PeerLimit::new(
                "nsp.limits.connections_per_uid",
                limits.connections_per_uid,
            ),
        );
        // grpc.health.v1, as Meridio's NSP serves it: the server ("") and
        // each service SERVING while the socket serves.
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<TargetRegistryServer<NodeApi>>().await;
        health
            .set_serving::<ConfigurationManagerServer<NodeApi>>()
            .await;
        health.set_serving::<ConduitsServer<NodeApi>>().await;
        tokio::spawn(
            tonic::transport::Server::builder()
                .max_concurrent_streams(Some(limits.streams_per_connection))
                .layer(tower::util::MapResponseLayer::new(
                    crate::codec::clamp_status_message::<tonic::body::Body>,
                ))
                .add_service(health_service)
                .add_service(TargetRegistryServer::new(api.clone()).max_decoding_message_size(size))
                .add_service(
                    ConfigurationManagerServer::new(api.clone()).max_decoding_message_size(size),
                )
                .add_service(ConduitsServer::new(api).max_decoding_message_size(size))
                .serve_with_incoming_shutdown(incoming, async move { shutdown.cancelled().await }),
        );

        // Expiry (a tenth of the timeout, at most 1 s), links every 2 s, config reload every 500 ms.
        let tick = (settings.entry_timeout / 10).min(Duration::from_secs(1));
        let (worker, done) = (nsp.clone(), stop.clone());
        let file = settings.config_file.clone();
        let last_error = self.last_error.clone();
        tokio::spawn(async move {
            let mut seen = file.as_ref().and_then(stamp);
            let mut expiry = tokio::time::interval(tick);
            let mut links = tokio::time::interval(Duration::from_secs(2));
            let mut reload = tokio::time::interval(Duration::from_millis(500));
            loop {
                tokio::select! {
                    _ = done.cancelled() => break,
                    _ = expiry.tick() => worker.housekeeping(false).await,
                    _ = links.tick() => worker.housekeeping(true).await,
                    _ = reload.tick() => {
                        let Some(path) = &file else { continue };
                        let now = stamp(path);
                        if now == seen {
                            continue;
                        }
                        seen = now;
                        let result = match read_config(Some(path)) {
                            Ok(c) => worker.set_config(c).await.map_err(|e| e.to_string()),
                            Err(e) => Err(e),
                        };
                        match &result {
                            Ok(()) => tracing::info!("reloaded {}", path.display()),
                            Err(e) => tracing::error!("not reloaded, keeping the previous configuration: {e}"),
                        }
                        let failed = result.err();
                        crate::health::planes().update(PLANE, |h| h.reload_error = failed.clone());
                        *last_error.lock().expect("error lock") = failed;
                    }
                }
            }
        });
        *self.nsp.lock().expect("nsp lock") = Some(nsp);
        *self.stop.lock().expect("stop lock") = Some(stop);
        Ok(())
    }

    async fn stop(&self, _scope: CancellationToken) -> Result<(), PluginError> {
        if let Some(stop) = self.stop.lock().expect("stop lock").take() {
            stop.cancel();
        }
        if let Some(bound) = self.bound.lock().expect("bound lock").take() {
            bound.remove();
        }
        Ok(())
    }

    fn status(&self) -> String {
        let nsp = self.nsp.lock().expect("nsp lock").clone();
        let Some(nsp) = nsp else {
            return "not started".into();
        };
        let s = nsp.snapshot();
        let enabled = s
            .targets
            .iter()
            .filter(|t| t.status == super::registry::Status::Enabled)
            .count();
        let mut text = format!(
            "{} streams, {} targets ({} enabled), serving on {}",
            s.config.streams.len(),
            s.targets.len(),
            enabled,
            self.settings().socket.display()
        );
        if let Some(e) = self.last_error.lock().expect("error lock").as_ref() {
            text.push_str(&format!("; config not reloaded: {e}"));
        }
        text
    }
}

/// Binds the node socket (mode 0666: ambassadors run as any user).
fn bind(
    path: &std::path::Path,
) -> Result<(tokio::net::UnixListener, crate::uds::Bound), PluginError> {
    crate::uds::bind(path, 0o666)
        .map_err(|e| PluginError::new(format!("node socket {}: {e}", path.display())))
}
