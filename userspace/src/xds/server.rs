//! An EDS server for the proxies on this node: State-of-the-World
//! `EndpointDiscoveryService.StreamEndpoints` serving the catalog's accepted
//! EDS clusters as `ClusterLoadAssignment`s, so an Envoy next to the daemon
//! reads the same endpoints the dataplane uses. `DeltaEndpoints` and
//! `FetchEndpoints` answer UNIMPLEMENTED.
//!
//! What is served comes from a [`watch`] of [`Assignments`] (the catalog's
//! `Catalog::watch_loads`, which passes it in: the catalog is above xds); [`assignment`] turns the
//! catalog's selected endpoints into a `ClusterLoadAssignment`.
//!
//! Per stream (one proxy), following /work/shared/reference/xds.md §1.4:
//! * Requests name the clusters explicitly (EDS has no wildcard; `"*"` is an
//!   ordinary, unknown name). Each request replaces the subscription; an
//!   empty list unsubscribes everything.
//! * A response carries only the subscribed assignments the proxy does not
//!   hold yet or that changed since they were last sent to it (SotW EDS may
//!   carry a subset, rule 6); newly subscribed names are always sent.
//!   Nothing is sent when nothing it subscribed to changed, so an ACK, an
//!   unchanged catalog update or a change to other clusters gets no answer.
//! * Names the catalog does not know get nothing (the proxy's initial fetch
//!   timeout decides, rule 8) until they appear. A cluster sent earlier that
//!   the catalog no longer holds is sent once as an empty assignment
//!   (no backends).
//! * `version_info` is per stream: a counter that grows by one with every
//!   response. It starts after the number in the stream's first request
//!   when that is one (a reconnecting proxy sees it keep growing), else at 1.
//! * Nonces are per stream ("1", "2", …). A request whose non-empty
//!   `response_nonce` is not the last nonce sent is stale and ignored.
//! * A NACK (`error_detail` set) is logged; nothing is resent until the
//!   rejected clusters change (or are subscribed anew).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{
    address, socket_address, Address, ControlPlane, HealthStatus, Locality as PbLocality,
    SocketAddress,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    cluster_load_assignment::{policy::DropOverload as PbDropOverload, Policy},
    lb_endpoint, Endpoint, LbEndpoint, LocalityLbEndpoints,
};
use envoy_types::pb::envoy::r#type::v3::{fractional_percent::DenominatorType, FractionalPercent};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::endpoint::v3::endpoint_discovery_service_server::{
    EndpointDiscoveryService, EndpointDiscoveryServiceServer,
};
use envoy_types::pb::google::protobuf::{Any, UInt32Value};
use prost::Message;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use super::{ClusterEndpoints, ClusterLoadAssignment, Locality, EDS_TYPE_URL};

/// `policy.overprovisioning_factor` in the served assignments (percent).
pub const OVERPROVISIONING_FACTOR: u32 = 1_000_000;

/// What the server serves: assignments by cluster name.
pub type Assignments = Arc<BTreeMap<String, ClusterLoadAssignment>>;

/// The `ClusterLoadAssignment` proxies get for the catalog's endpoints of a
/// cluster: every endpoint the management server sent, by (priority,
/// locality), with its health as received, except that a chosen endpoint
/// the dataplane could not take (`unreachable` from this node) is
/// UNHEALTHY. Usable endpoints carry their share within their priority as
/// weight and each locality the sum of its usable endpoints' weights
/// (saturated at `u32::MAX`; none when it has no usable endpoint), so
/// locality-weighted and plain load balancing split traffic alike, as the
/// dataplane does. `drop_overloads` are carried in parts per million, and
/// an overprovisioning factor that makes Envoy fail over as the dataplane
/// does ([`OVERPROVISIONING_FACTOR`]).
pub fn assignment(c: &ClusterEndpoints, unreachable: &BTreeSet<IpAddr>) -> ClusterLoadAssignment {
    let chosen = c.endpoints.iter().map(|e| {
        let down = unreachable.contains(&e.address);
        (e, !down, down)
    });
    let standby = c.standby.iter().map(|s| (&s.endpoint, s.usable, false));
    let mut groups: BTreeMap<(u32, &Locality), (u64, Vec<LbEndpoint>)> = BTreeMap::new();
    for (e, usable, down) in chosen.chain(standby) {
        let group = groups.entry((e.priority, &e.locality)).or_default();
        if usable {
            group.0 += u64::from(e.weight.max(1));
        }
        group.1.push(LbEndpoint {
            host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                address: Some(Address {
                    address: Some(address::Address::SocketAddress(SocketAddress {
                        protocol: socket_address::Protocol::Tcp as i32,
                        address: e.address.to_string(),
                        port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(
                            e.port,
                        ))),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            })),
            health_status: if down {
                HealthStatus::Unhealthy as i32
            } else {
                e.health
            },
            load_balancing_weight: Some(UInt32Value {
                value: e.weight.max(1),
            }),
            ..Default::default()
        });
    }
    let endpoints = groups
        .into_iter()
        .map(
            |((priority, locality), (sum, lb_endpoints))| LocalityLbEndpoints {
                locality: Some(PbLocality {
                    region: locality.region.clone(),
                    zone: locality.zone.clone(),
                    sub_zone: locality.sub_zone.clone(),
                }),
                lb_endpoints,
                load_balancing_weight: (sum > 0).then(|| UInt32Value {
                    value: u32::try_from(sum).unwrap_or(u32::MAX),
                }),
                priority,
                ..Default::default()
            },
        )
        .collect();
    let policy = Some(Policy {
        // Envoy's default (1.4) would send part of a priority's load on to
        // the next one as soon as one of its endpoints is unusable, and
        // scale localities down the same way; the dataplane uses the best
        // priority with any usable endpoint, each locality by its usable
        // endpoints' weights. A factor this large makes Envoy do the same
        // (any usable endpoint counts the priority, or the locality, as
        // whole: Envoy takes min(100, factor × usable ÷ all), so one of
        // 10 000 suffices).
        overprovisioning_factor: Some(UInt32Value {
            value: OVERPROVISIONING_FACTOR,
        }),
        drop_overloads: c
            .drop_overloads
            .iter()
            .map(|d| PbDropOverload {
                category: d.category.clone(),
                drop_percentage: Some(FractionalPercent {
                    numerator: d.parts_per_million,
                    denominator: DenominatorType::Million as i32,
                }),
            })
            .collect(),
        ..Default::default()
    });
    ClusterLoadAssignment {
        cluster_name: c.cluster.clone(),
        endpoints,
        policy,
        ..Default::default()
    }
}

/// The empty assignment of `cluster` (no backends).
fn empty(cluster: &str) -> ClusterLoadAssignment {
    ClusterLoadAssignment {
        cluster_name: cluster.into(),
        ..Default::default()
    }
}

/// A bound EDS server, not yet serving.
pub struct EdsServer {
    listener: TcpListener,
    loads: watch::Receiver<Assignments>,
}

impl EdsServer {
    /// Binds `address` ("127.0.0.1:18001"); serves nothing until [`Self::run`].
    pub async fn bind(address: &str, loads: watch::Receiver<Assignments>) -> std::io::Result<Self> {
        let listener = TcpListener::bind(address).await?;
        Ok(EdsServer { listener, loads })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `cancel` fires; open streams end then too.
    pub async fn run(self, cancel: CancellationToken) -> Result<(), tonic::transport::Error> {
        let local = self.listener.local_addr().ok();
        tracing::info!(address = ?local, "EDS server listening");
        let service = Eds::new(self.loads, cancel.clone());
        let result = tonic::transport::Server::builder()
            .layer(tower::util::MapResponseLayer::new(
                crate::codec::clamp_status_message::<tonic::body::Body>,
            ))
            .add_service(EndpointDiscoveryServiceServer::new(service))
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(self.listener),
                cancel.cancelled_owned(),
            )
            .await;
        tracing::info!(address = ?local, "EDS server stopped");
        result
    }
}

/// The `EndpointDiscoveryService` implementation (for embedding in another
/// tonic server; [`EdsServer`] runs it on its own listener).
pub struct Eds {
    loads: watch::Receiver<Assignments>,
    cancel: CancellationToken,
    streams: AtomicU64,
}

impl Eds {
    pub fn new(loads: watch::Receiver<Assignments>, cancel: CancellationToken) -> Self {
        Eds {
            loads,
            cancel,
            streams: AtomicU64::new(0),
        }
    }
}

#[tonic::async_trait]
impl EndpointDiscoveryService for Eds {
    type StreamEndpointsStream = ReceiverStream<Result<DiscoveryResponse, Status>>;
    type DeltaEndpointsStream = futures::stream::Empty<Result<DeltaDiscoveryResponse, Status>>;

    async fn stream_endpoints(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamEndpointsStream>, Status> {
        let peer = request
            .remote_addr()
            .map_or_else(|| "?".to_string(), |a| a.to_string());
        let id = self.streams.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = mpsc::channel(16);
        let stream = ProxyStream::new(id, peer);
        tokio::spawn(stream.run(
            request.into_inner(),
            tx,
            self.loads.clone(),
            self.cancel.clone(),
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn delta_endpoints(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaEndpointsStream>, Status> {
        Err(Status::unimplemented(
            "incremental EDS is not served; use StreamEndpoints",
        ))
    }

    async fn fetch_endpoints(
        &self,
        _request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        Err(Status::unimplemented(
            "REST EDS is not served; use StreamEndpoints",
        ))
    }
}

/// The state of one proxy's stream.
struct ProxyStream {
    id: u64,
    peer: String,
    node: String,
    requests: u64,
    /// The subscription (the last request's `resource_names`).
    names: BTreeSet<String>,
    /// What was last sent of each subscribed cluster.
    sent: BTreeMap<String, ClusterLoadAssignment>,
    /// `version_info` of the last response.
    version: u64,
    nonce: u64,
    /// The nonce of the last response ("" before the first).
    last_nonce: String,
}

impl ProxyStream {
    fn new(id: u64, peer: String) -> Self {
        ProxyStream {
            id,
            peer,
            node: String::new(),
            requests: 0,
            names: BTreeSet::new(),
            sent: BTreeMap::new(),
            version: 0,
            nonce: 0,
            last_nonce: String::new(),
        }
    }

    async fn run(
        mut self,
        mut inbound: Streaming<DiscoveryRequest>,
        tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
        mut loads: watch::Receiver<Assignments>,
        cancel: CancellationToken,
    ) {
        tracing::debug!(stream = self.id, peer = %self.peer, "EDS stream opened");
        let mut watching = true;
        loop {
            let out = tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tx.closed() => break,
                message = inbound.message() => match message {
                    Ok(Some(request)) => {
                        let current = loads.borrow_and_update().clone();
                        self.on_request(request, &current)
                    }
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(stream = self.id, node = %self.node, "EDS stream failed: {status}");
                        break;
                    }
                },
                changed = loads.changed(), if watching => match changed {
                    Ok(()) => {
                        let current = loads.borrow_and_update().clone();
                        Ok(self.update(&current))
                    }
                    Err(_) => {
                        // The catalog is gone: keep answering with what it last held.
                        watching = false;
                        Ok(None)
                    }
                },
            };
            let out = match out {
                Ok(None) => continue,
                Ok(Some(response)) => Ok(response),
                Err(status) => Err(status),
            };
            let fatal = out.is_err();
            if tx.send(out).await.is_err() || fatal {
                break;
            }
        }
        tracing::debug!(stream = self.id, node = %self.node, "EDS stream closed");
    }

    /// Handles one request; returns the response to send, if any, or the
    /// status that ends the stream.
    fn on_request(
        &mut self,
        request: DiscoveryRequest,
        current: &Assignments,
    ) -> Result<Option<DiscoveryResponse>, Status> {
        if !request.type_url.is_empty() && request.type_url != EDS_TYPE_URL {
            tracing::warn!(stream = self.id, node = %self.node, type_url = %request.type_url, "EDS request for another resource type");
            return Err(Status::invalid_argument(format!(
                "this stream serves {EDS_TYPE_URL}, not {:?}",
                request.type_url
            )));
        }
        self.requests += 1;
        if self.requests == 1 {
            if let Some(node) = &request.node {
                self.node = node.id.clone();
            }
            // A reconnecting proxy keeps seeing versions grow.
            if let Ok(v) = request.version_info.parse::<u64>() {
                self.version = v;
            }
            tracing::info!(
                stream = self.id,
                peer = %self.peer,
                node = %self.node,
                version = %request.version_info,
                clusters = ?request.resource_names,
                "EDS subscription"
            );
        }
        if !request.response_nonce.is_empty() && request.response_nonce != self.last_nonce {
            tracing::debug!(
                stream = self.id,
                node = %self.node,
                nonce = %request.response_nonce,
                last = %self.last_nonce,
                "ignoring a request with a stale nonce"
            );
            return Ok(None);
        }
        if let Some(error) = &request.error_detail {
            tracing::warn!(
                stream = self.id,
                node = %self.node,
                version = %request.version_info,
                nonce = %request.response_nonce,
                "the proxy rejected EDS version {}: {}",
                self.version,
                error.message
            );
        } else if !request.response_nonce.is_empty() {
            tracing::debug!(stream = self.id, node = %self.node, version = %request.version_info, "ACK");
        }
        let names: BTreeSet<String> = request.resource_names.into_iter().collect();
        if names != self.names {
            if self.requests > 1 {
                tracing::info!(stream = self.id, node = %self.node, clusters = ?names, "EDS subscription changed");
            }
            self.sent.retain(|name, _| names.contains(name));
            self.names = names;
        }
        Ok(self.update(current))
    }

    /// The response carrying what the proxy's subscription lacks, if anything.
    fn update(&mut self, current: &Assignments) -> Option<DiscoveryResponse> {
        let mut changed = Vec::new();
        for name in &self.names {
            let now = match (current.get(name), self.sent.get(name)) {
                (Some(cla), sent) if sent != Some(cla) => cla.clone(),
                (None, Some(sent)) if *sent != empty(name) => empty(name),
                _ => continue,
            };
            changed.push(now);
        }
        if changed.is_empty() {
            return None;
        }
        self.version += 1;
        self.nonce += 1;
        self.last_nonce = self.nonce.to_string();
        tracing::info!(
            stream = self.id,
            node = %self.node,
            version = self.version,
            clusters = ?changed.iter().map(|c| c.cluster_name.as_str()).collect::<Vec<_>>(),
            "sending endpoints"
        );
        let resources = changed
            .iter()
            .map(|cla| Any {
                type_url: EDS_TYPE_URL.into(),
                value: cla.encode_to_vec(),
            })
            .collect();
        for cla in changed {
            self.sent.insert(cla.cluster_name.clone(), cla);
        }
        Some(DiscoveryResponse {
            version_info: self.version.to_string(),
            resources,
            type_url: EDS_TYPE_URL.into(),
            nonce: self.last_nonce.clone(),
            control_plane: Some(ControlPlane {
                identifier: format!("tapmesh/{}", env!("CARGO_PKG_VERSION")),
            }),
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xds::{select, DropOverload, SelectedEndpoint};

    fn ep(address: &str, weight: u32, zone: &str, priority: u32) -> SelectedEndpoint {
        SelectedEndpoint {
            address: address.parse().unwrap(),
            port: 5000,
            weight,
            locality: Locality {
                zone: zone.into(),
                ..Default::default()
            },
            priority,
            health: HealthStatus::Healthy as i32,
        }
    }

    fn cluster(name: &str, endpoints: Vec<SelectedEndpoint>) -> ClusterEndpoints {
        ClusterEndpoints {
            cluster: name.into(),
            endpoints,
            standby: Vec::new(),
            drop_overloads: Vec::new(),
        }
    }

    fn loads(clusters: &[ClusterEndpoints]) -> Assignments {
        Arc::new(
            clusters
                .iter()
                .map(|c| (c.cluster.clone(), assignment(c, &BTreeSet::new())))
                .collect(),
        )
    }

    fn request(names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
        DiscoveryRequest {
            version_info: version.into(),
            resource_names: names.iter().map(|n| n.to_string()).collect(),
            type_url: EDS_TYPE_URL.into(),
            response_nonce: nonce.into(),
            ..Default::default()
        }
    }

    fn names(r: &DiscoveryResponse) -> Vec<String> {
        r.resources
            .iter()
            .map(|a| {
                ClusterLoadAssignment::decode(a.value.as_slice())
                    .unwrap()
                    .cluster_name
            })
            .collect()
    }

    #[test]
    fn assignment_round_trips_through_selection() {
        let mut c = cluster(
            "svc",
            vec![
                ep("10.0.0.1", 3, "a", 0),
                ep("10.0.0.2", 1, "a", 0),
                ep("10.0.0.3", 2, "b", 0),
            ],
        );
        c.drop_overloads.push(DropOverload {
            category: "lb".into(),
            parts_per_million: 250_000,
        });
        let cla = assignment(&c, &BTreeSet::new());
        assert_eq!(cla.endpoints.len(), 2);
        assert_eq!(
            cla.endpoints[0]
                .load_balancing_weight
                .as_ref()
                .unwrap()
                .value,
            4
        );
        assert_eq!(select(&cla).unwrap(), c, "the dataplane reads the same");
    }

    #[test]
    fn every_priority_is_served_with_health_and_unreachable_ones_are_unhealthy() {
        use envoy_types::pb::envoy::config::endpoint::v3::LocalityLbEndpoints as L;
        let lle = |zone: &str, priority: u32, eps: Vec<(&str, HealthStatus, u32)>| L {
            locality: Some(PbLocality {
                zone: zone.into(),
                ..Default::default()
            }),
            priority,
            lb_endpoints: eps
                .into_iter()
                .map(|(ip, health, weight)| LbEndpoint {
                    host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                        address: Some(Address {
                            address: Some(address::Address::SocketAddress(SocketAddress {
                                address: ip.into(),
                                port_specifier: Some(socket_address::PortSpecifier::PortValue(80)),
                                ..Default::default()
                            })),
                        }),
                        ..Default::default()
                    })),
                    health_status: health as i32,
                    load_balancing_weight: Some(UInt32Value { value: weight }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let received = ClusterLoadAssignment {
            cluster_name: "svc".into(),
            endpoints: vec![
                lle(
                    "a",
                    0,
                    vec![
                        ("10.0.0.1", HealthStatus::Healthy, 2),
                        ("10.0.0.2", HealthStatus::Unknown, 1),
                        ("10.0.0.3", HealthStatus::Draining, 5),
                    ],
                ),
                lle("b", 1, vec![("10.0.1.1", HealthStatus::Healthy, 1)]),
            ],
            ..Default::default()
        };
        let c = select(&received).unwrap();
        assert_eq!(c.endpoints.len(), 2);
        // All reachable: the proxy selects what the dataplane selected.
        let served = assignment(&c, &BTreeSet::new());
        assert_eq!(select(&served).unwrap(), c);
        let health = |cla: &ClusterLoadAssignment| -> Vec<(u32, String, i32)> {
            cla.endpoints
                .iter()
                .flat_map(|l| {
                    l.lb_endpoints.iter().map(move |e| {
                        let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &e.host_identifier
                        else {
                            unreachable!()
                        };
                        let Some(address::Address::SocketAddress(sa)) =
                            &ep.address.as_ref().unwrap().address
                        else {
                            unreachable!()
                        };
                        (l.priority, sa.address.clone(), e.health_status)
                    })
                })
                .collect()
        };
        assert_eq!(
            health(&served),
            vec![
                (0, "10.0.0.1".into(), HealthStatus::Healthy as i32),
                (0, "10.0.0.2".into(), HealthStatus::Unknown as i32),
                (0, "10.0.0.3".into(), HealthStatus::Draining as i32),
                (1, "10.0.1.1".into(), HealthStatus::Healthy as i32),
            ]
        );
        // 10.0.0.1 is not in the maps: UNHEALTHY for the proxy too.
        let down: BTreeSet<IpAddr> = ["10.0.0.1".parse().unwrap()].into();
        let served = assignment(&c, &down);
        assert_eq!(
            health(&served)[0],
            (0, "10.0.0.1".into(), HealthStatus::Unhealthy as i32)
        );
        let reselected = select(&served).unwrap();
        assert_eq!(reselected.endpoints.len(), 1);
        assert_eq!(reselected.endpoints[0].address.to_string(), "10.0.0.2");
        // Its locality weighs what the dataplane sends it: 10.0.0.2's
        // share alone (it counted the unreachable one's too).
        let share = c
            .endpoints
            .iter()
            .find(|e| e.address.to_string() == "10.0.0.2")
            .unwrap()
            .weight;
        assert_eq!(
            served.endpoints[0].load_balancing_weight,
            Some(UInt32Value { value: share })
        );
        // Envoy then keeps the whole load on priority 0 and the locality,
        // as the dataplane does.
        assert_eq!(
            served.policy.unwrap().overprovisioning_factor,
            Some(UInt32Value { value: 1_000_000 })
        );
    }

    #[test]
    fn responses_carry_only_what_the_proxy_lacks() {
        let mut st = ProxyStream::new(1, "test".into());
        let v1 = loads(&[
            cluster("svc", vec![ep("10.0.0.1", 1, "z", 0)]),
            cluster("other", vec![ep("10.0.0.9", 1, "z", 0)]),
        ]);
        // Unknown names get nothing.
        assert!(st
            .on_request(request(&["nope"], "", ""), &v1)
            .unwrap()
            .is_none());
        let r = st
            .on_request(request(&["svc", "nope"], "", ""), &v1)
            .unwrap()
            .unwrap();
        assert_eq!((r.version_info.as_str(), r.nonce.as_str()), ("1", "1"));
        assert_eq!(names(&r), ["svc"]);
        // ACK: nothing new.
        assert!(st
            .on_request(request(&["svc", "nope"], "1", "1"), &v1)
            .unwrap()
            .is_none());
        // A change elsewhere, or no change, sends nothing.
        let v2 = loads(&[
            cluster("svc", vec![ep("10.0.0.1", 1, "z", 0)]),
            cluster("other", vec![ep("10.0.0.8", 1, "z", 0)]),
        ]);
        assert!(st.update(&v2).is_none());
        // A change of the subscribed cluster: one new version.
        let v3 = loads(&[cluster("svc", vec![ep("10.0.0.2", 1, "z", 0)])]);
        let r = st.update(&v3).unwrap();
        assert_eq!((r.version_info.as_str(), r.nonce.as_str()), ("2", "2"));
        assert!(st.update(&v3).is_none());
        // A stale nonce is ignored, even with new names.
        assert!(st
            .on_request(request(&["svc", "other"], "1", "1"), &v3)
            .unwrap()
            .is_none());
        // A NACK is not answered by a resend.
        let mut nack = request(&["svc"], "1", "2");
        nack.error_detail = Some(Default::default());
        assert!(st.on_request(nack, &v3).unwrap().is_none());
        // A newly subscribed name is sent, alone.
        let r = st
            .on_request(request(&["svc", "other"], "1", "2"), &v2)
            .unwrap()
            .unwrap();
        assert_eq!(names(&r), ["other", "svc"], "svc changed back too");
        assert_eq!(r.version_info, "3");
        // A cluster the catalog dropped becomes empty, once.
        let v4 = loads(&[cluster("svc", vec![ep("10.0.0.2", 1, "z", 0)])]);
        let r = st.update(&v4).unwrap();
        let other = ClusterLoadAssignment::decode(
            r.resources
                .iter()
                .find(|a| {
                    ClusterLoadAssignment::decode(a.value.as_slice())
                        .unwrap()
                        .cluster_name
                        == "other"
                })
                .unwrap()
                .value
                .as_slice(),
        )
        .unwrap();
        assert!(other.endpoints.is_empty());
        assert!(st.update(&v4).is_none());
        // Unsubscribing and subscribing again resends.
        assert!(st
            .on_request(request(&[], "4", "4"), &v4)
            .unwrap()
            .is_none());
        let r = st
            .on_request(request(&["svc"], "4", "4"), &v4)
            .unwrap()
            .unwrap();
        assert_eq!(names(&r), ["svc"]);
    }

    #[test]
    fn versions_continue_after_a_reconnect_and_other_types_fail() {
        let mut st = ProxyStream::new(2, "test".into());
        let v = loads(&[cluster("svc", vec![ep("10.0.0.1", 1, "z", 0)])]);
        let r = st
            .on_request(request(&["svc"], "7", ""), &v)
            .unwrap()
            .unwrap();
        assert_eq!(r.version_info, "8");
        let mut other = request(&["svc"], "8", "1");
        other.type_url = "type.googleapis.com/envoy.config.cluster.v3.Cluster".into();
        assert!(st.on_request(other, &v).is_err());
    }
}
