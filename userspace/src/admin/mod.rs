//! The admin API: gRPC on a unix socket only root may use.

mod client;
mod lb;
mod mirror;

use std::{
    path::{Path, PathBuf},
    sync::Mutex,
};

use async_trait::async_trait;
use tapmesh_common::{DropReason, Protocol, Verdict};
use tokio::{net::UnixListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tonic::{transport::server::UdsConnectInfo, Request, Response, Status};

pub use client::{connect, connect_within, AdminClientError, CALL_TIMEOUT};
pub use lb::config as lb_config;

use std::sync::Arc;

use crate::{
    catalog::Catalog,
    config::Config,
    core::{CoreView, Plugin, PluginError, PluginState},
    dataplane::{DataplaneHandle, ProgramCounters},
    lb::service::LbService,
    mirror::MirrorService,
};

pub mod proto {
    tonic::include_proto!("tapmesh.admin.v1");
}

use proto::admin_server::{Admin, AdminServer};

/// Answers admin calls from the core's, the dataplane's and the LB's state.
pub struct AdminService {
    core: CoreView,
    dataplane: DataplaneHandle,
    lb: Arc<LbService>,
    mirror: Arc<MirrorService>,
    catalog: Arc<Catalog>,
}

/// The control planes' health as the admin API reports it.
fn control_planes() -> Vec<proto::ControlPlane> {
    crate::health::planes()
        .snapshot()
        .into_iter()
        .map(|(name, h)| {
            let (last_nack, last_nack_reason) = h.last_nack.unwrap_or_default();
            proto::ControlPlane {
                name: name.into(),
                expected: h.expected,
                connected: h.connected,
                synced: h.synced,
                detail: h.detail,
                last_ack: h.last_ack.unwrap_or_default(),
                last_nack,
                last_nack_reason,
                reload_error: h.reload_error.unwrap_or_default(),
            }
        })
        .collect()
}

/// The cluster row of the status; `None` without `[cluster]`.
fn cluster() -> Option<proto::ClusterStatus> {
    let (node, h, nodes) = crate::cluster::status()?;
    Some(proto::ClusterStatus {
        node,
        etcd_connected: h.connected,
        etcd_error: if h.connected {
            String::new()
        } else {
            h.error.unwrap_or_else(|| "connecting".into())
        },
        revision: h.revision,
        lease: h.lease,
        nodes: nodes
            .into_iter()
            .map(|n| proto::ClusterNode {
                name: n.name,
                state: n.state.into(),
                targets: n.targets as u64,
            })
            .collect(),
        bad_values: h.bad_values as u64,
        relists: h.relists,
    })
}

fn state_of(state: PluginState) -> proto::PluginState {
    match state {
        PluginState::Registered => proto::PluginState::Registered,
        PluginState::Configured => proto::PluginState::Configured,
        PluginState::Starting => proto::PluginState::Starting,
        PluginState::Running => proto::PluginState::Running,
        PluginState::Stopping => proto::PluginState::Stopping,
        PluginState::Stopped => proto::PluginState::Stopped,
        PluginState::Failed => proto::PluginState::Failed,
    }
}

pub fn counters_to_proto(c: &ProgramCounters) -> proto::ProgramCounters {
    let count = |name: &str, packets: u64, bytes: u64| proto::Count {
        name: name.into(),
        packets,
        bytes,
    };
    proto::ProgramCounters {
        program: c.slot.name().into(),
        verdicts: Verdict::ALL
            .iter()
            .map(|&v| {
                let pc = c.stats.verdicts.get(v);
                count(v.name(), pc.packets, pc.bytes)
            })
            .collect(),
        drops: DropReason::ALL
            .iter()
            .map(|&r| count(r.name(), c.stats.drops.get(r), 0))
            .collect(),
        protocols: Protocol::ALL
            .iter()
            .map(|&p| count(p.name(), c.stats.protocols.get(p), 0))
            .collect(),
    }
}

/// Only root (uid 0) may call; the socket's mode already says so, this checks the peer.
fn check_root<T>(request: &Request<T>) -> Result<(), Status> {
    let uid = request
        .extensions()
        .get::<UdsConnectInfo>()
        .and_then(|info| info.peer_cred)
        .map(|cred| cred.uid());
    match uid {
        Some(0) => Ok(()),
        Some(uid) => Err(Status::permission_denied(format!(
            "the admin API is for root; caller uid is {uid}"
        ))),
        None => Err(Status::permission_denied("cannot identify the caller")),
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn status(
        &self,
        request: Request<proto::StatusRequest>,
    ) -> Result<Response<proto::StatusResponse>, Status> {
        check_root(&request)?;
        let plugins = self
            .core
            .statuses()
            .into_iter()
            .map(|s| proto::PluginStatus {
                name: s.name.into(),
                state: state_of(s.state) as i32,
                detail: s.detail,
            })
            .collect();
        let attachments = self
            .dataplane
            .attachments_in_kernel(false)
            .await
            .into_iter()
            .map(|(a, there)| proto::Attachment {
                interface: a.interface,
                hook: a.hook.to_string(),
                program: a.program.into(),
                mode: a.mode,
                gone: !there,
            })
            .collect();
        let programs = match self.dataplane.counters().await {
            Ok(list) => list.iter().map(counters_to_proto).collect(),
            Err(_) => Vec::new(),
        };
        let (vips, flows, targets) = match self.dataplane.lb_counters().await {
            Ok(c) => lb::counters(c),
            Err(_) => Default::default(),
        };
        Ok(Response::new(proto::StatusResponse {
            version: crate::VERSION.into(),
            plugins,
            attachments,
            programs,
            pin_directory: self
                .dataplane
                .pin_dir()
                .await
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            vips,
            flows,
            targets,
            control_planes: control_planes(),
            cluster: cluster(),
        }))
    }

    async fn set_vip(
        &self,
        request: Request<proto::Vip>,
    ) -> Result<Response<proto::LbReply>, Status> {
        check_root(&request)?;
        self.lb
            .set_vip(lb::vip(request.into_inner()))
            .await
            .map_err(lb::status_of)?;
        Ok(Response::new(proto::LbReply {}))
    }

    async fn delete_vip(
        &self,
        request: Request<proto::Name>,
    ) -> Result<Response<proto::LbReply>, Status> {
        check_root(&request)?;
        self.lb
            .delete_vip(&request.into_inner().name)
            .await
            .map_err(lb::status_of)?;
        Ok(Response::new(proto::LbReply {}))
    }

    async fn set_stream(
        &self,
        request: Request<proto::Stream>,
    ) -> Result<Response<proto::LbReply>, Status> {
        check_root(&request)?;
        self.lb
            .set_stream(lb::stream(request.into_inner()))
            .await
            .map_err(lb::status_of)?;
        Ok(Response::new(proto::LbReply {}))
    }

    async fn delete_stream(
        &self,
        request: Request<proto::Name>,
    ) -> Result<Response<proto::LbReply>, Status> {
        check_root(&request)?;
        self.lb
            .delete_stream(&request.into_inner().name)
            .await
            .map_err(lb::status_of)?;
        Ok(Response::new(proto::LbReply {}))
    }

    async fn set_flow(
        &self,
        request: Request<proto::Flow>,
    ) -> Result<Response<proto::LbReply>, Status> {
        check_root(&request)?;
        self.lb
            .set_flow(lb::flow(request.into_inner()))
            .await
            .map_err(lb::status_of)?;
        Ok(Response::new(proto::LbReply {}))
    }

    async fn delete_flow(
        &self,
        request: Request<proto::Name>,
    ) -> Result<Response<proto::LbReply>, Status> {
        check_root(&request)?;
        self.lb
            .delete_flow(&request.into_inner().name)
            .await
            .map_err(lb::status_of)?;
        Ok(Response::new(proto::LbReply {}))
    }

    async fn set_target(
        &self,
        request: Request<proto::Target>,
    ) -> Result<Response<proto::LbReply>, Status> {
        check_root(&request)?;
        let target = lb::target(request.into_inner())?;
        self.lb.set_target(target).await.map_err(lb::status_of)?;
        Ok(Response::new(proto::LbReply {}))
    }

    async fn delete_target(
        &self,
        request: Request<proto::TargetId>,
    ) -> Result<Response<proto::LbReply>, Status> {
        check_root(&request)?;
        let id = request.into_inner();
        self.lb
            .delete_target(&id.stream, id.identifier)
            .await
            .map_err(lb::status_of)?;
        Ok(Response::new(proto::LbReply {}))
    }

    async fn apply_lb(
        &self,
        request: Request<proto::LbConfig>,
    ) -> Result<Response<proto::LbReply>, Status> {
        check_root(&request)?;
        let spec = lb::spec(request.into_inner())?;
        self.lb.apply(spec).await.map_err(lb::status_of)?;
        Ok(Response::new(proto::LbReply {}))
    }

    async fn list_lb(
        &self,
        request: Request<proto::ListLbRequest>,
    ) -> Result<Response<proto::LbListing>, Status> {
        check_root(&request)?;
        let (vips, flows, targets) = match self.dataplane.lb_counters().await {
            Ok(c) => lb::counters(c),
            Err(_) => Default::default(),
        };
        Ok(Response::new(proto::LbListing {
            config: Some(lb::config(self.lb.spec().await)),
            vips,
            flows,
            targets,
        }))
    }

    async fn create_tap_service(
        &self,
        request: Request<proto::TapService>,
    ) -> Result<Response<proto::TapReply>, Status> {
        check_root(&request)?;
        let service = mirror::service(request.into_inner()).map_err(mirror::status_of)?;
        let m = self.mirror.clone();
        detached(async move { m.create_service(service).await }).await?;
        Ok(Response::new(proto::TapReply {}))
    }

    async fn delete_tap_service(
        &self,
        request: Request<proto::TapId>,
    ) -> Result<Response<proto::TapReply>, Status> {
        check_root(&request)?;
        let (m, id) = (self.mirror.clone(), request.into_inner().id);
        detached(async move { m.delete_service(&id).await }).await?;
        Ok(Response::new(proto::TapReply {}))
    }

    async fn create_tap_flow(
        &self,
        request: Request<proto::TapFlow>,
    ) -> Result<Response<proto::TapReply>, Status> {
        check_root(&request)?;
        let flow = mirror::flow(request.into_inner()).map_err(mirror::status_of)?;
        let m = self.mirror.clone();
        detached(async move { m.create_flow(flow).await }).await?;
        Ok(Response::new(proto::TapReply {}))
    }

    async fn delete_tap_flow(
        &self,
        request: Request<proto::TapId>,
    ) -> Result<Response<proto::TapReply>, Status> {
        check_root(&request)?;
        let (m, id) = (self.mirror.clone(), request.into_inner().id);
        detached(async move { m.delete_flow(&id).await }).await?;
        Ok(Response::new(proto::TapReply {}))
    }

    async fn list_catalog(
        &self,
        request: Request<proto::ListCatalogRequest>,
    ) -> Result<Response<proto::CatalogListing>, Status> {
        check_root(&request)?;
        let services = self
            .catalog
            .services()
            .await
            .into_iter()
            .map(|s| proto::CatalogService {
                name: s.name,
                source: s.source.into(),
                vip: s.vip,
                backends: s
                    .backends
                    .into_iter()
                    .map(|b| proto::CatalogBackend {
                        address: b.address.to_string(),
                        port: b.port.into(),
                        weight: b.weight,
                        priority: b.priority,
                        locality: b.locality,
                        slots: b.slots,
                        note: b.note,
                    })
                    .collect(),
            })
            .collect();
        Ok(Response::new(proto::CatalogListing { services }))
    }

    async fn list_taps(
        &self,
        request: Request<proto::ListTapsRequest>,
    ) -> Result<Response<proto::TapListing>, Status> {
        check_root(&request)?;
        let (services, flows) = self.mirror.list().await;
        Ok(Response::new(mirror::listing(services, flows)))
    }
}

/// Runs a tap change on its own task: a client that gives up cannot cut a
/// ring's set-up or a map update in half.
async fn detached(
    work: impl std::future::Future<Output = Result<(), crate::mirror::model::MirrorError>>
        + Send
        + 'static,
) -> Result<(), Status> {
    tokio::spawn(work)
        .await
        .map_err(|e| Status::internal(format!("the request's task failed: {e}")))?
        .map_err(mirror::status_of)
}

/// The admin socket may be bound: absent, or a stale socket nobody serves.
fn check(path: &Path) -> Result<(), PluginError> {
    crate::uds::check_free(path).map_err(|e| PluginError::new(format!("daemon.admin_socket: {e}")))
}

/// Binds `path` (mode 0600), refusing to take over a socket another daemon still serves.
fn bind(path: &Path) -> Result<(UnixListener, crate::uds::Bound), PluginError> {
    crate::uds::bind(path, 0o600).map_err(|e| PluginError::new(format!("daemon.admin_socket: {e}")))
}

struct Serving {
    bound: crate::uds::Bound,
    stop: CancellationToken,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

pub struct AdminPlugin {
    core: CoreView,
    dataplane: DataplaneHandle,
    lb: Arc<LbService>,
    mirror: Arc<MirrorService>,
    catalog: Arc<Catalog>,
    socket: Mutex<PathBuf>,
    serving: tokio::sync::Mutex<Option<Serving>>,
}

impl AdminPlugin {
    pub fn new(
        core: CoreView,
        dataplane: DataplaneHandle,
        lb: Arc<LbService>,
        mirror: Arc<MirrorService>,
        catalog: Arc<Catalog>,
    ) -> Self {
        Self {
            core,
            dataplane,
            lb,
            mirror,
            catalog,
            socket: Mutex::new(PathBuf::new()),
            serving: tokio::sync::Mutex::new(None),
        }
    }

    fn socket(&self) -> PathBuf {
        self.socket.lock().expect("socket lock").clone()
    }
}

#[async_trait]
impl Plugin for AdminPlugin {
    fn name(&self) -> &'static str {
        "admin"
    }

    async fn configure(
        &self,
        _scope: CancellationToken,
        config: &Config,
    ) -> Result<(), PluginError> {
        // Checked here, before the dataplane attaches anything.
        check(&config.daemon.admin_socket)?;
        *self.socket.lock().expect("socket lock") = config.daemon.admin_socket.clone();
        Ok(())
    }

    async fn start(&self, scope: CancellationToken) -> Result<(), PluginError> {
        let (listener, bound) = bind(&self.socket())?;
        let service = AdminService {
            core: self.core.clone(),
            dataplane: self.dataplane.clone(),
            lb: self.lb.clone(),
            mirror: self.mirror.clone(),
            catalog: self.catalog.clone(),
        };
        let stop = scope.child_token();
        let shutdown = stop.clone();
        let task = tokio::spawn(
            tonic::transport::Server::builder()
                .layer(tower::util::MapResponseLayer::new(
                    crate::codec::clamp_status_message::<tonic::body::Body>,
                ))
                .add_service(AdminServer::new(service))
                .serve_with_incoming_shutdown(crate::uds::incoming(listener), async move {
                    shutdown.cancelled().await
                }),
        );
        *self.serving.lock().await = Some(Serving { bound, stop, task });
        Ok(())
    }

    async fn stop(&self, _scope: CancellationToken) -> Result<(), PluginError> {
        if let Some(serving) = self.serving.lock().await.take() {
            serving.stop.cancel();
            let _ = serving.task.await;
            serving.bound.remove();
        }
        Ok(())
    }

    fn status(&self) -> String {
        format!("serving on {}", self.socket().display())
    }
}
