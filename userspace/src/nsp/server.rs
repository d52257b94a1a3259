//! gRPC on the node socket: `nsp.v1.TargetRegistry`, `nsp.v1.ConfigurationManager`
//! (wire-compatible with Meridio's NSP) and `tapmesh.node.v1.Conduits`.
//! Watches send the filtered list at once and then only when it changes.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};

use super::config::{NspConfig, StreamPath};
use super::registry::{self, Kind, RegistryError, Target};
use super::state::{Caller, Nsp, NspError, Snapshot};
use crate::proto::node::{conduits_server::Conduits, ConduitConnection, ConduitRequest};
use crate::proto::nsp::{
    self as pb, configuration_manager_server::ConfigurationManager,
    target_registry_server::TargetRegistry,
};

/// The context key naming a target's node in watches (cluster mode).
pub const NODE: &str = "node";

pub type WatchStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[derive(Clone)]
pub struct NodeApi(pub Arc<Nsp>);

fn caller<T>(request: &Request<T>) -> Result<Caller, Status> {
    let cred = request
        .extensions()
        .get::<UdsConnectInfo>()
        .and_then(|info| info.peer_cred)
        .ok_or_else(|| {
            Status::permission_denied("cannot identify the caller (no peer credentials)")
        })?;
    let pid = cred
        .pid()
        .ok_or_else(|| Status::permission_denied("the caller's pid is unknown"))?;
    // The kernel says 0 for a peer outside the daemon's PID namespace.
    if pid == 0 {
        return Err(Status::permission_denied(
            "cannot identify the caller: its process is not visible from the daemon's PID \
             namespace; run the daemon in the host's (hostPID: true in the DaemonSet)",
        ));
    }
    Ok(Caller {
        pid,
        uid: cred.uid(),
    })
}

fn status_of(e: NspError) -> Status {
    let message = e.to_string();
    match e {
        NspError::Registry(RegistryError::UnknownStream(_)) | NspError::UnknownConduit { .. } => {
            Status::not_found(message)
        }
        NspError::Registry(RegistryError::Full { .. })
        | NspError::PoolExhausted(_)
        | NspError::Limit { .. } => Status::resource_exhausted(message),
        NspError::Registry(RegistryError::Collision { .. }) => Status::already_exists(message),
        NspError::Registry(_) | NspError::Config(_) => Status::invalid_argument(message),
        NspError::Caller(_) | NspError::NotYours(_) => Status::permission_denied(message),
        NspError::Net(_) | NspError::Lb(_) => Status::internal(message),
    }
}

/// Runs a change on its own task: a client that gives up (its call is
/// dropped) cannot cut a veth creation or a map update in half.
async fn detached<T: Send + 'static>(
    work: impl std::future::Future<Output = Result<T, NspError>> + Send + 'static,
) -> Result<T, Status> {
    tokio::spawn(work)
        .await
        .map_err(|e| Status::internal(format!("the request's task failed: {e}")))?
        .map_err(status_of)
}

/// Checks a Meridio name: 1-253 bytes from `[A-Za-z0-9-+_.]`.
pub fn check_name(what: &str, name: &str) -> Result<(), Status> {
    crate::names::validate_name(what, name).map_err(|e| Status::invalid_argument(e.to_string()))
}

fn stream_path(stream: &pb::Stream) -> Result<StreamPath, Status> {
    let conduit = stream
        .conduit
        .as_ref()
        .ok_or_else(|| Status::invalid_argument("conduit cannot be nil"))?;
    let trench = conduit
        .trench
        .as_ref()
        .ok_or_else(|| Status::invalid_argument("trench cannot be nil"))?;
    check_name("stream name", &stream.name)?;
    check_name("conduit name", &conduit.name)?;
    check_name("trench name", &trench.name)?;
    Ok(StreamPath {
        trench: trench.name.clone(),
        conduit: conduit.name.clone(),
        stream: stream.name.clone(),
    })
}

/// The target of a request; `unregistering`: its status is not read (an
/// unregistration names a target by its IPs, type and stream), so ANY is
/// taken too.
fn target_from(t: pb::Target, unregistering: bool) -> Result<Target, Status> {
    let kind = match pb::target::Type::try_from(t.r#type) {
        Ok(pb::target::Type::Default) => Kind::Default,
        Ok(pb::target::Type::Frontend) => Kind::Frontend,
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "unknown target type {}",
                t.r#type
            )))
        }
    };
    let status = match pb::target::Status::try_from(t.status) {
        Ok(pb::target::Status::Enabled) => registry::Status::Enabled,
        Ok(pb::target::Status::Disabled) => registry::Status::Disabled,
        _ if unregistering => registry::Status::Disabled,
        Ok(pb::target::Status::Any) => {
            return Err(Status::invalid_argument(
                "register a target as ENABLED or DISABLED, not ANY",
            ))
        }
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "unknown target status {}: register a target as ENABLED or DISABLED",
                t.status
            )))
        }
    };
    let stream = match (&t.stream, kind) {
        (Some(s), _) => Some(stream_path(s)?),
        (None, Kind::Frontend) => None,
        (None, Kind::Default) => return Err(Status::invalid_argument("stream cannot be nil")),
    };
    Ok(Target {
        ips: t.ips,
        context: t.context.into_iter().collect(),
        status,
        kind,
        stream,
    })
}

fn stream_to_pb(path: &StreamPath, max_targets: u32, config: &NspConfig) -> pb::Stream {
    pb::Stream {
        name: path.stream.clone(),
        conduit: Some(conduit_to_pb(config, &path.trench, &path.conduit)),
        max_targets,
    }
}

/// A conduit as Meridio serves it: with its port NATs, each naming its VIPs in full.
fn conduit_to_pb(config: &NspConfig, trench: &str, conduit: &str) -> pb::Conduit {
    let nats = config
        .conduits
        .iter()
        .filter(|c| c.trench == trench && c.name == conduit)
        .flat_map(|c| &c.destination_port_nats);
    pb::Conduit {
        name: conduit.into(),
        trench: Some(pb::Trench {
            name: trench.into(),
        }),
        destination_port_nats: nats
            .map(|n| pb::conduit::PortNat {
                port: u32::from(n.port),
                target_port: u32::from(n.target_port),
                vips: config
                    .vips
                    .iter()
                    .filter(|v| v.trench == trench && n.vips.contains(&v.name))
                    .map(vip_to_pb)
                    .collect(),
                protocol: n.protocol.to_ascii_lowercase(),
            })
            .collect(),
    }
}

fn target_to_pb(t: &Target, config: &NspConfig) -> pb::Target {
    pb::Target {
        ips: t.ips.clone(),
        context: t.context.clone().into_iter().collect(),
        status: match t.status {
            registry::Status::Enabled => pb::target::Status::Enabled,
            registry::Status::Disabled => pb::target::Status::Disabled,
        } as i32,
        r#type: match t.kind {
            Kind::Default => pb::target::Type::Default,
            Kind::Frontend => pb::target::Type::Frontend,
        } as i32,
        stream: t
            .stream
            .as_ref()
            .map(|p| stream_to_pb(p, config.stream(p).map_or(0, |s| s.max_targets), config)),
    }
}

// Filters as Meridio's: an empty name or a nil parent matches anything.
fn name_matches(filter: &str, name: &str) -> bool {
    filter.is_empty() || filter == name
}

fn trench_matches(filter: Option<&pb::Trench>, trench: &str) -> bool {
    filter.is_none_or(|f| name_matches(&f.name, trench))
}

fn conduit_matches(filter: Option<&pb::Conduit>, trench: &str, conduit: &str) -> bool {
    filter
        .is_none_or(|f| name_matches(&f.name, conduit) && trench_matches(f.trench.as_ref(), trench))
}

fn stream_matches(filter: Option<&pb::Stream>, path: &StreamPath) -> bool {
    filter.is_none_or(|f| {
        name_matches(&f.name, &path.stream)
            && conduit_matches(f.conduit.as_ref(), &path.trench, &path.conduit)
    })
}

fn target_matches(filter: &pb::Target, t: &pb::Target) -> bool {
    (filter.status == pb::target::Status::Any as i32 || filter.status == t.status)
        && filter.r#type == t.r#type
        && match (&filter.stream, &t.stream) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(f), Some(s)) => {
                let path = stream_path(s).unwrap_or_default();
                stream_matches(Some(f), &path)
            }
        }
}

/// A stream of `render(snapshot)` results, sent at once and then only when different.
fn watch<T, F>(nsp: &Nsp, render: F) -> WatchStream<T>
where
    T: PartialEq + Clone + Send + 'static,
    F: Fn(&Snapshot) -> T + Send + 'static,
{
    let mut changes = nsp.subscribe();
    let stream = async_stream(
        move |tx: tokio::sync::mpsc::Sender<Result<T, Status>>| async move {
            let mut last: Option<T> = None;
            loop {
                let now = render(&changes.borrow_and_update());
                if last.as_ref() != Some(&now) {
                    if tx.send(Ok(now.clone())).await.is_err() {
                        return;
                    }
                    last = Some(now);
                }
                tokio::select! {
                    changed = changes.changed() => if changed.is_err() { return },
                    _ = tx.closed() => return,
                }
            }
        },
    );
    Box::pin(stream)
}

/// Runs `body` on a task feeding a channel; the receiver is the stream.
fn async_stream<T, Fut>(
    body: impl FnOnce(tokio::sync::mpsc::Sender<T>) -> Fut,
) -> tokio_stream::wrappers::ReceiverStream<T>
where
    T: Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(body(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[tonic::async_trait]
impl TargetRegistry for NodeApi {
    async fn register(&self, request: Request<pb::Target>) -> Result<Response<()>, Status> {
        let caller = caller(&request)?;
        let target = target_from(request.into_inner(), false)?;
        let nsp = self.0.clone();
        detached(async move { nsp.register(caller, target).await }).await?;
        Ok(Response::new(()))
    }

    async fn unregister(&self, request: Request<pb::Target>) -> Result<Response<()>, Status> {
        let caller = caller(&request)?;
        let target = target_from(request.into_inner(), true)?;
        let nsp = self.0.clone();
        detached(async move { nsp.unregister(caller, target).await }).await?;
        Ok(Response::new(()))
    }

    type WatchStream = WatchStream<pb::TargetResponse>;

    async fn watch(
        &self,
        request: Request<pb::Target>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let filter = request.into_inner();
        // In cluster mode the whole trench, each target naming its node.
        Ok(Response::new(watch(&self.0, move |s| {
            let local = s.targets.iter().map(|t| (s.node.as_deref(), t));
            let remote = s.remote.iter().map(|r| (Some(r.node.as_str()), &r.target));
            pb::TargetResponse {
                targets: local
                    .chain(remote)
                    .map(|(node, t)| {
                        let mut t = target_to_pb(t, &s.config);
                        if let Some(node) = node {
                            t.context.insert(NODE.into(), node.into());
                        }
                        t
                    })
                    .filter(|t| target_matches(&filter, t))
                    .collect(),
            }
        })))
    }
}

fn vip_to_pb(v: &super::config::VipConfig) -> pb::Vip {
    pb::Vip {
        name: v.name.clone(),
        address: v.address.clone(),
        trench: Some(pb::Trench {
            name: v.trench.clone(),
        }),
    }
}

#[tonic::async_trait]
impl ConfigurationManager for NodeApi {
    type WatchTrenchStream = WatchStream<pb::TrenchResponse>;
    type WatchConduitStream = WatchStream<pb::ConduitResponse>;
    type WatchStreamStream = WatchStream<pb::StreamResponse>;
    type WatchFlowStream = WatchStream<pb::FlowResponse>;
    type WatchVipStream = WatchStream<pb::VipResponse>;
    type WatchAttractorStream = WatchStream<pb::AttractorResponse>;
    type WatchGatewayStream = WatchStream<pb::GatewayResponse>;

    async fn watch_trench(
        &self,
        request: Request<pb::Trench>,
    ) -> Result<Response<Self::WatchTrenchStream>, Status> {
        let filter = request.into_inner();
        Ok(Response::new(watch(&self.0, move |s| pb::TrenchResponse {
            trench: s
                .config
                .trenches
                .iter()
                .find(|t| name_matches(&filter.name, &t.name))
                .map(|t| pb::Trench {
                    name: t.name.clone(),
                }),
        })))
    }

    async fn watch_conduit(
        &self,
        request: Request<pb::Conduit>,
    ) -> Result<Response<Self::WatchConduitStream>, Status> {
        let filter = request.into_inner();
        Ok(Response::new(watch(&self.0, move |s| {
            pb::ConduitResponse {
                conduits: s
                    .config
                    .conduits
                    .iter()
                    .filter(|c| conduit_matches(Some(&filter), &c.trench, &c.name))
                    .map(|c| conduit_to_pb(&s.config, &c.trench, &c.name))
                    .collect(),
            }
        })))
    }

    async fn watch_stream(
        &self,
        request: Request<pb::Stream>,
    ) -> Result<Response<Self::WatchStreamStream>, Status> {
        let filter = request.into_inner();
        Ok(Response::new(watch(&self.0, move |s| pb::StreamResponse {
            streams: s
                .config
                .streams
                .iter()
                .map(|st| {
                    let path = StreamPath {
                        trench: st.trench.clone(),
                        conduit: st.conduit.clone(),
                        stream: st.name.clone(),
                    };
                    (path, st.max_targets)
                })
                .filter(|(path, _)| stream_matches(Some(&filter), path))
                .map(|(path, max)| stream_to_pb(&path, max, &s.config))
                .collect(),
        })))
    }

    async fn watch_flow(
        &self,
        request: Request<pb::Flow>,
    ) -> Result<Response<Self::WatchFlowStream>, Status> {
        let filter = request.into_inner();
        Ok(Response::new(watch(&self.0, move |s| {
            let config = &s.config;
            pb::FlowResponse {
                flows: config
                    .flows
                    .iter()
                    .filter_map(|f| {
                        let st = config
                            .streams
                            .iter()
                            .find(|st| st.trench == f.trench && st.name == f.stream)?;
                        let path = StreamPath {
                            trench: f.trench.clone(),
                            conduit: st.conduit.clone(),
                            stream: st.name.clone(),
                        };
                        let keep = name_matches(&filter.name, &f.name)
                            && stream_matches(filter.stream.as_ref(), &path);
                        keep.then(|| pb::Flow {
                            name: f.name.clone(),
                            source_subnets: f.source_subnets.clone(),
                            destination_port_ranges: f.destination_port_ranges.clone(),
                            source_port_ranges: f.source_port_ranges.clone(),
                            protocols: f.protocols.clone(),
                            priority: f.priority,
                            stream: Some(stream_to_pb(&path, st.max_targets, config)),
                            vips: config
                                .vips
                                .iter()
                                .filter(|v| v.trench == f.trench && f.vips.contains(&v.name))
                                .map(vip_to_pb)
                                .collect(),
                            byte_matches: f.byte_matches.clone(),
                        })
                    })
                    .collect(),
            }
        })))
    }

    async fn watch_vip(
        &self,
        request: Request<pb::Vip>,
    ) -> Result<Response<Self::WatchVipStream>, Status> {
        let filter = request.into_inner();
        Ok(Response::new(watch(&self.0, move |s| pb::VipResponse {
            vips: s
                .config
                .vips
                .iter()
                .filter(|v| {
                    name_matches(&filter.name, &v.name)
                        && trench_matches(filter.trench.as_ref(), &v.trench)
                })
                .map(vip_to_pb)
                .collect(),
        })))
    }

    async fn watch_attractor(
        &self,
        _request: Request<pb::Attractor>,
    ) -> Result<Response<Self::WatchAttractorStream>, Status> {
        // tapmesh attracts VIP traffic with XDP on the uplink; there are no attractors.
        Ok(Response::new(watch(&self.0, |_| {
            pb::AttractorResponse::default()
        })))
    }

    async fn watch_gateway(
        &self,
        _request: Request<pb::Gateway>,
    ) -> Result<Response<Self::WatchGatewayStream>, Status> {
        Ok(Response::new(watch(&self.0, |_| {
            pb::GatewayResponse::default()
        })))
    }
}

#[tonic::async_trait]
impl Conduits for NodeApi {
    async fn connect_conduit(
        &self,
        request: Request<ConduitRequest>,
    ) -> Result<Response<ConduitConnection>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        check_name("trench name", &r.trench)?;
        check_name("conduit name", &r.conduit)?;
        let nsp = self.0.clone();
        let c = detached(async move { nsp.connect(caller, &r.trench, &r.conduit).await }).await?;
        Ok(Response::new(ConduitConnection {
            interface: c.link.peer_ifname.clone(),
            local_ips: c.local_ips(),
            gateways: c.gateways.iter().map(|g| g.to_string()).collect(),
            vips: c.vips.iter().map(|v| v.to_string()).collect(),
        }))
    }

    async fn disconnect_conduit(
        &self,
        request: Request<ConduitRequest>,
    ) -> Result<Response<()>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        check_name("trench name", &r.trench)?;
        check_name("conduit name", &r.conduit)?;
        let nsp = self.0.clone();
        detached(async move { nsp.disconnect(caller, &r.trench, &r.conduit).await }).await?;
        Ok(Response::new(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(status: i32) -> pb::Target {
        pb::Target {
            ips: vec!["192.0.2.1/32".into()],
            status,
            r#type: pb::target::Type::Default as i32,
            stream: Some(pb::Stream {
                name: "s".into(),
                conduit: Some(pb::Conduit {
                    name: "c".into(),
                    trench: Some(pb::Trench { name: "t".into() }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_status_that_is_not_enabled_or_disabled_is_named_in_the_refusal() {
        let any = pb::target::Status::Any as i32;
        let refused = target_from(target(any), false).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        assert!(refused.message().contains("not ANY"), "{refused:?}");
        let refused = target_from(target(77), false).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        assert!(
            refused.message().starts_with("unknown target status 77"),
            "{refused:?}"
        );
        // Unregistering reads no status: any value names the target.
        assert!(target_from(target(any), true).is_ok());
        assert!(target_from(target(77), true).is_ok());
    }
}
