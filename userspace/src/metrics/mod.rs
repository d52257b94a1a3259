//! The `metrics` plugin: an HTTP listener (loopback by default) with
//! `/healthz`, `/readyz` and `/metrics` (OpenMetrics text).
//!
//! The port is bound in `configure`, before anything is attached, so a port
//! in use is refused like a bad setting.

mod encode;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Router};
use tokio_util::sync::CancellationToken;

use crate::{
    catalog::Catalog,
    config::Config,
    core::{CoreView, Plugin, PluginError, PluginState},
    dataplane::DataplaneHandle,
    lb::service::LbService,
    mirror::MirrorService,
    nsp::NspPlugin,
};

pub use encode::scrape;

/// What a scrape reads.
pub struct Sources {
    pub core: CoreView,
    pub dataplane: DataplaneHandle,
    pub lb: Arc<LbService>,
    pub mirror: Arc<MirrorService>,
    pub catalog: Arc<Catalog>,
    pub nsp: Arc<NspPlugin>,
}

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Live while no plugin has failed.
async fn healthz(State(s): State<Arc<Sources>>) -> impl IntoResponse {
    let failed: Vec<String> = s
        .core
        .statuses()
        .into_iter()
        .filter(|p| p.state == PluginState::Failed)
        .map(|p| format!("{}: {}", p.name, p.detail))
        .collect();
    if failed.is_empty() {
        (StatusCode::OK, "ok\n".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("failed: {}\n", failed.join("; ")),
        )
    }
}

/// Ready when every plugin runs (so the programs are attached), the kernel
/// still runs what the start attached, and every configured control plane
/// has synced.
async fn readyz(State(s): State<Arc<Sources>>) -> impl IntoResponse {
    let mut waiting: Vec<String> = s
        .core
        .statuses()
        .into_iter()
        // This plugin serves before the core marks it running.
        .filter(|p| p.name != "metrics" && p.state != PluginState::Running)
        .map(|p| format!("{} is {}", p.name, p.state.name()))
        .collect();
    waiting.extend(crate::health::planes().unsynced());
    // What the kernel runs, not what was attached: another tool may have
    // detached a program or removed its interface.
    for (a, there) in s.dataplane.attachments_in_kernel(true).await {
        if !there {
            waiting.push(format!(
                "{} on {} is no longer attached ({} gone from the kernel)",
                a.hook, a.interface, a.program
            ));
        }
    }
    if waiting.is_empty() {
        (StatusCode::OK, "ready\n".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", waiting.join("; ")),
        )
    }
}

async fn metrics(State(s): State<Arc<Sources>>) -> impl IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, OPENMETRICS)],
        scrape(&s).await,
    )
}

pub struct MetricsPlugin {
    sources: Arc<Sources>,
    listener: Mutex<Option<std::net::TcpListener>>,
    address: Mutex<String>,
    stop: Mutex<Option<CancellationToken>>,
}

impl MetricsPlugin {
    pub fn new(sources: Sources) -> Self {
        Self {
            sources: Arc::new(sources),
            listener: Mutex::new(None),
            address: Mutex::new(String::new()),
            stop: Mutex::new(None),
        }
    }
}

/// The control planes a configuration turns on (readiness waits for them).
fn expected_planes(config: &Config) -> Vec<&'static str> {
    let mut planes = Vec::new();
    if !config.xds.server.is_empty() {
        planes.push("xds");
    }
    if config.nsp.config_file.is_some() {
        planes.push(crate::nsp::plugin::PLANE);
    }
    if config.cluster.enabled() {
        planes.push(crate::cluster::agent::PLANE);
    }
    planes
}

#[async_trait]
impl Plugin for MetricsPlugin {
    fn name(&self) -> &'static str {
        "metrics"
    }

    async fn configure(
        &self,
        _scope: CancellationToken,
        config: &Config,
    ) -> Result<(), PluginError> {
        crate::health::planes().expect(&expected_planes(config));
        let address = config.metrics.listen.clone();
        let listener = if address.is_empty() {
            None
        } else {
            let listener = std::net::TcpListener::bind(&address).map_err(|e| {
                PluginError::new(format!(
                    "metrics.listen {address}: {e} (choose another address, or \"\" for none)"
                ))
            })?;
            listener
                .set_nonblocking(true)
                .map_err(|e| PluginError::new(format!("metrics.listen {address}: {e}")))?;
            Some(listener)
        };
        *self.listener.lock().expect("listener lock") = listener;
        *self.address.lock().expect("address lock") = address;
        Ok(())
    }

    async fn start(&self, scope: CancellationToken) -> Result<(), PluginError> {
        let Some(listener) = self.listener.lock().expect("listener lock").take() else {
            return Ok(());
        };
        let listener = tokio::net::TcpListener::from_std(listener)
            .map_err(|e| PluginError::new(format!("metrics listener: {e}")))?;
        let app = Router::new()
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics))
            .with_state(self.sources.clone());
        let stop = scope.child_token();
        tokio::spawn(serve(listener, app, stop.clone()));
        *self.stop.lock().expect("stop lock") = Some(stop);
        Ok(())
    }

    async fn stop(&self, _scope: CancellationToken) -> Result<(), PluginError> {
        if let Some(stop) = self.stop.lock().expect("stop lock").take() {
            stop.cancel();
        }
        Ok(())
    }

    fn status(&self) -> String {
        let address = self.address.lock().expect("address lock").clone();
        if address.is_empty() {
            "off (metrics.listen is empty)".into()
        } else {
            format!("serving /healthz /readyz /metrics on http://{address}")
        }
    }
}

/// Connections served at once: a scraper, the probes and an operator need a
/// few. A connection past them takes the place of the oldest one, so idle
/// or slow clients cannot hold a probe back (kubelet gives up after 1 s)
/// nor take the daemon's file descriptors.
const MAX_CONNECTIONS: usize = 32;
/// Time for a request's headers.
const HEADER_TIME: Duration = Duration::from_secs(5);
/// Time for a whole connection: a scrape takes milliseconds; an idle or
/// slow client is closed and its place freed.
const CONNECTION_TIME: Duration = Duration::from_secs(30);

/// Serves `app` until `stop`, each connection within the limits above.
async fn serve(listener: tokio::net::TcpListener, app: Router, stop: CancellationToken) {
    use std::collections::VecDeque;
    let places = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    // The connections being served, oldest first (each one's own stop).
    let live: Arc<std::sync::Mutex<VecDeque<(u64, CancellationToken)>>> = Arc::default();
    let mut next = 0u64;
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors or memory: wait, as a busy listener should.
                    tracing::debug!("metrics listener: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let place = match places.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                let oldest = live.lock().expect("lock").pop_front();
                if let Some((_, stop)) = oldest {
                    stop.cancel();
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    p = places.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => return,
                    },
                }
            }
        };
        let own = stop.child_token();
        let id = next;
        next += 1;
        live.lock().expect("lock").push_back((id, own.clone()));
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let live = live.clone();
        tokio::spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIME)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::select! {
                _ = own.cancelled() => {}
                _ = tokio::time::timeout(CONNECTION_TIME, connection) => {}
            }
            live.lock().expect("lock").retain(|(i, _)| *i != id);
            drop(place);
        });
    }
}
