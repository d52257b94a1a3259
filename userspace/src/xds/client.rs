//! The SotW stream: connect, subscribe, validate, apply, ACK/NACK, reconnect.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{node::UserAgentVersionType, Node};
use envoy_types::pb::envoy::service::discovery::v3::{
    aggregated_discovery_service_client::AggregatedDiscoveryServiceClient, DiscoveryRequest,
    DiscoveryResponse,
};
use envoy_types::pb::envoy::service::endpoint::v3::endpoint_discovery_service_client::EndpointDiscoveryServiceClient;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use futures::future::BoxFuture;
use prost::Message;
use rand::Rng;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::codec::Streaming;
use tonic::transport::Endpoint;

use crate::health::planes as health;

use super::{
    select, ClusterEndpoints, ClusterLoadAssignment, EndpointSink, XdsSettings,
    CLIENT_FEATURE_NO_OVERPROVISIONING, EDS_TYPE_URL,
};

/// The first reconnect delay (doubled up to `max_backoff`).
const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 keepalive, so a vanished server is noticed on an idle stream.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// google.rpc.Code INVALID_ARGUMENT, the code of our NACKs.
const INVALID_ARGUMENT: i32 = 3;
/// A rejected version the server sends again is NACKed after this delay,
/// doubled for every further repeat up to [`NACK_BACKOFF_MAX`] (servers such
/// as go-control-plane's snapshot cache answer a NACK with the same version
/// at once, go-control-plane#962).
const NACK_BACKOFF: Duration = Duration::from_millis(200);
const NACK_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// This client's name in [`crate::health`].
const PLANE: &str = "xds";

/// Subscribes and keeps the subscription until `cancel` fires. Never
/// returns early on errors: they are logged and the stream is re-established.
pub async fn run(settings: XdsSettings, sink: Arc<dyn EndpointSink>, cancel: CancellationToken) {
    Client::new(settings, sink, cancel).run().await
}

enum Ended {
    Cancelled,
    /// The stream failed or ended; `responded`: it delivered a response.
    Failed {
        reason: String,
        responded: bool,
    },
}

struct Client {
    settings: XdsSettings,
    /// Reconnect failures already logged.
    repeats: crate::repeats::Repeats,
    sink: Arc<dyn EndpointSink>,
    cancel: CancellationToken,
    node: Node,
    /// `version_info` of the last accepted response ("" before the first).
    version: String,
    /// What the sink holds, per cluster.
    applied: HashMap<String, ClusterEndpoints>,
    /// Clusters that arrived in an accepted response or were applied as missing.
    settled: HashSet<String>,
    missing_deadline: Instant,
    missing_done: bool,
    /// The last rejected response and how often it came back.
    rejected: Option<Rejected>,
    /// The nonce of the last EDS response on this stream ("" before one).
    eds_nonce: String,
}

/// A rejected (type, version): logged once, NACKed with growing delays.
struct Rejected {
    type_url: String,
    version: String,
    repeats: u32,
}

/// What to send for a response: `request`, after `delay`.
struct Reply {
    delay: Duration,
    request: DiscoveryRequest,
}

impl Client {
    fn new(settings: XdsSettings, sink: Arc<dyn EndpointSink>, cancel: CancellationToken) -> Self {
        let node = Node {
            id: settings.node_id.clone(),
            cluster: settings.node_cluster.clone(),
            user_agent_name: "tapmesh".into(),
            user_agent_version_type: Some(UserAgentVersionType::UserAgentVersion(
                env!("CARGO_PKG_VERSION").into(),
            )),
            client_features: vec![CLIENT_FEATURE_NO_OVERPROVISIONING.into()],
            ..Default::default()
        };
        let missing_deadline = Instant::now() + settings.missing_after;
        let missing_done = settings.clusters.is_empty();
        Client {
            settings,
            repeats: Default::default(),
            sink,
            cancel,
            node,
            version: String::new(),
            applied: HashMap::new(),
            settled: HashSet::new(),
            missing_deadline,
            missing_done,
            rejected: None,
            eds_nonce: String::new(),
        }
    }

    async fn run(mut self) {
        let max = self.settings.max_backoff.max(INITIAL_BACKOFF);
        let mut backoff = INITIAL_BACKOFF;
        loop {
            match self.stream_once().await {
                Ended::Cancelled => return,
                Ended::Failed { reason, responded } => {
                    if responded {
                        backoff = INITIAL_BACKOFF;
                        self.repeats.clear();
                    }
                    let delay = backoff.mul_f64(rand::rng().random_range(0.5..=1.0));
                    health().update(PLANE, |h| {
                        h.connected = false;
                        h.detail = reason.clone();
                    });
                    if let Some(line) = self.repeats.note(&reason, Instant::now().into_std()) {
                        tracing::warn!(
                            server = %self.settings.server,
                            "xDS stream ended: {line}; reconnecting in {delay:?}"
                        );
                    }
                    if self.wait(tokio::time::sleep(delay)).await.is_none() {
                        return;
                    }
                    backoff = (backoff * 2).min(max);
                }
            }
        }
    }

    /// Runs `fut` until it completes (`Some`) or the client is cancelled
    /// (`None`), applying missing clusters when their deadline passes meanwhile.
    async fn wait<F: Future>(&mut self, fut: F) -> Option<F::Output> {
        let cancel = self.cancel.clone();
        tokio::pin!(fut);
        loop {
            let pending = !self.missing_done;
            let deadline = self.missing_deadline;
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return None,
                out = &mut fut => return Some(out),
                _ = tokio::time::sleep_until(deadline), if pending => self.apply_missing().await,
            }
        }
    }

    async fn apply_missing(&mut self) {
        self.missing_done = true;
        let missing: Vec<String> = self
            .settings
            .clusters
            .iter()
            .filter(|c| !self.settled.contains(*c))
            .cloned()
            .collect();
        for cluster in missing {
            tracing::warn!(
                %cluster,
                "no ClusterLoadAssignment within {:?}: applying it as empty",
                self.settings.missing_after
            );
            let empty = ClusterEndpoints::empty(&cluster);
            match self.sink.apply(empty.clone()).await {
                Ok(()) => {
                    self.applied.insert(cluster.clone(), empty);
                }
                Err(e) => tracing::warn!(%cluster, "applying the empty assignment failed: {e}"),
            }
            self.settled.insert(cluster);
        }
        self.report_synced(None);
    }

    /// Records an ACKed version, and whether every subscribed cluster has settled.
    fn report_synced(&self, acked: Option<&str>) {
        let synced = self
            .settings
            .clusters
            .iter()
            .all(|c| self.settled.contains(c));
        health().update(PLANE, |h| {
            h.synced |= synced;
            if let Some(version) = acked {
                h.last_ack = Some(version.to_string());
            }
        });
    }

    fn request(&self, nonce: &str, node: bool) -> DiscoveryRequest {
        DiscoveryRequest {
            version_info: self.version.clone(),
            node: node.then(|| self.node.clone()),
            resource_names: self.settings.clusters.clone(),
            type_url: EDS_TYPE_URL.into(),
            response_nonce: nonce.into(),
            ..Default::default()
        }
    }

    async fn stream_once(&mut self) -> Ended {
        let failed = |reason: String| Ended::Failed {
            reason,
            responded: false,
        };
        let endpoint = match Endpoint::from_shared(self.settings.server.clone()) {
            Ok(e) => e
                .connect_timeout(CONNECT_TIMEOUT)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
                .keep_alive_timeout(KEEPALIVE_TIMEOUT)
                .keep_alive_while_idle(true),
            Err(e) => return failed(format!("bad server address: {e}")),
        };
        let channel = match self.wait(endpoint.connect()).await {
            None => return Ended::Cancelled,
            Some(Err(e)) => return failed(format!("connecting: {}", crate::causes(&e))),
            Some(Ok(c)) => c,
        };
        let (tx, rx) = mpsc::channel(16);
        let first = self.request("", true);
        tracing::info!(
            server = %self.settings.server,
            ads = self.settings.ads,
            version = %first.version_info,
            clusters = ?first.resource_names,
            "subscribing to endpoints"
        );
        tx.try_send(first).expect("an empty channel has room");
        let outbound = ReceiverStream::new(rx);
        let call: BoxFuture<
            'static,
            Result<tonic::Response<Streaming<DiscoveryResponse>>, tonic::Status>,
        > = if self.settings.ads {
            Box::pin(async move {
                AggregatedDiscoveryServiceClient::new(channel)
                    .stream_aggregated_resources(outbound)
                    .await
            })
        } else {
            Box::pin(async move {
                EndpointDiscoveryServiceClient::new(channel)
                    .stream_endpoints(outbound)
                    .await
            })
        };
        let mut inbound = match self.wait(call).await {
            None => return Ended::Cancelled,
            Some(Err(status)) => return failed(format!("opening the stream: {status}")),
            Some(Ok(response)) => response.into_inner(),
        };
        let server = self.settings.server.clone();
        health().update(PLANE, |h| {
            h.connected = true;
            h.detail = format!("subscribed at {server}");
        });
        let mut responded = false;
        let mut last_nonce: Option<String> = None;
        self.eds_nonce.clear();
        // Replies waiting for their delay (a NACK backing off); a newer
        // response replaces them.
        let mut held: Vec<(Instant, DiscoveryRequest)> = Vec::new();
        loop {
            let due = held.first().map(|(at, _)| *at);
            let next = self
                .wait(async {
                    match due {
                        Some(at) => tokio::select! {
                            message = inbound.message() => Some(message),
                            _ = tokio::time::sleep_until(at) => None,
                        },
                        None => Some(inbound.message().await),
                    }
                })
                .await;
            let response = match next {
                None => return Ended::Cancelled,
                Some(None) => {
                    let now = Instant::now();
                    while held.first().is_some_and(|(at, _)| *at <= now) {
                        let (_, request) = held.remove(0);
                        if tx.send(request).await.is_err() {
                            return Ended::Failed {
                                reason: "the request stream closed".into(),
                                responded,
                            };
                        }
                    }
                    continue;
                }
                Some(Some(Err(status))) => {
                    return Ended::Failed {
                        reason: status.to_string(),
                        responded,
                    }
                }
                Some(Some(Ok(None))) => {
                    return Ended::Failed {
                        reason: "the server closed the stream".into(),
                        responded,
                    }
                }
                Some(Some(Ok(Some(r)))) => r,
            };
            if !response.nonce.is_empty() && last_nonce.as_deref() == Some(response.nonce.as_str())
            {
                tracing::debug!(nonce = %response.nonce, "ignoring a response with a stale nonce");
                continue;
            }
            last_nonce = Some(response.nonce.clone());
            responded = true;
            held.clear();
            for reply in self.handle(response).await {
                if !reply.delay.is_zero() {
                    held.push((Instant::now() + reply.delay, reply.request));
                } else if tx.send(reply.request).await.is_err() {
                    return Ended::Failed {
                        reason: "the request stream closed".into(),
                        responded,
                    };
                }
            }
        }
    }

    /// Validates and applies one response; returns its ACK or NACK (and,
    /// after a response of another type, the EDS request again, so the
    /// subscription does not wait for a reconnect).
    async fn handle(&mut self, response: DiscoveryResponse) -> Vec<Reply> {
        if response.type_url != EDS_TYPE_URL {
            let reason = format!(
                "unexpected resource type {:?} (subscribed to {EDS_TYPE_URL})",
                response.type_url
            );
            let delay = self.rejection(&response, &reason);
            let nack = DiscoveryRequest {
                type_url: response.type_url.clone(),
                response_nonce: response.nonce.clone(),
                error_detail: Some(nack_status(reason)),
                ..Default::default()
            };
            let again = self.request(&self.eds_nonce, false);
            return vec![
                Reply {
                    delay,
                    request: nack,
                },
                Reply {
                    delay,
                    request: again,
                },
            ];
        }
        self.eds_nonce = response.nonce.clone();
        let updates = match self.decode(&response) {
            Ok(updates) => updates,
            Err(reason) => return vec![self.nack(&response, reason)],
        };
        for update in updates {
            let cluster = update.cluster.clone();
            if self.applied.get(&cluster) != Some(&update) {
                tracing::info!(
                    %cluster,
                    version = %response.version_info,
                    endpoints = update.endpoints.len(),
                    "applying endpoints"
                );
                if let Err(e) = self.sink.apply(update.clone()).await {
                    return vec![self.nack(&response, format!("cluster {cluster:?}: {e}"))];
                }
                self.applied.insert(cluster.clone(), update);
            }
            self.settled.insert(cluster);
        }
        self.version = response.version_info.clone();
        self.rejected = None;
        self.report_synced(Some(&response.version_info));
        tracing::debug!(version = %self.version, nonce = %response.nonce, "ACK");
        vec![Reply {
            delay: Duration::ZERO,
            request: self.request(&response.nonce, false),
        }]
    }

    fn nack(&mut self, response: &DiscoveryResponse, reason: String) -> Reply {
        let delay = self.rejection(response, &reason);
        Reply {
            delay,
            request: DiscoveryRequest {
                error_detail: Some(nack_status(reason)),
                ..self.request(&response.nonce, false)
            },
        }
    }

    /// Records a rejection: the first of a (type, version) is logged and
    /// NACKed at once; each repeat waits longer, up to [`NACK_BACKOFF_MAX`].
    fn rejection(&mut self, response: &DiscoveryResponse, reason: &str) -> Duration {
        let repeat = self
            .rejected
            .as_ref()
            .is_some_and(|r| r.type_url == response.type_url && r.version == response.version_info);
        let rejected = match &mut self.rejected {
            Some(r) if repeat => {
                r.repeats += 1;
                r
            }
            _ => {
                tracing::warn!(
                    server = %self.settings.server,
                    version = %response.version_info,
                    nonce = %response.nonce,
                    kept = %self.version,
                    "NACK: {reason}"
                );
                let nacked = (response.version_info.clone(), reason.to_string());
                health().update(PLANE, |h| h.last_nack = Some(nacked));
                self.rejected.insert(Rejected {
                    type_url: response.type_url.clone(),
                    version: response.version_info.clone(),
                    repeats: 0,
                })
            }
        };
        if rejected.repeats == 0 {
            return Duration::ZERO;
        }
        let delay = NACK_BACKOFF
            .saturating_mul(1 << (rejected.repeats - 1).min(16))
            .min(NACK_BACKOFF_MAX);
        tracing::debug!(
            version = %response.version_info,
            repeats = rejected.repeats,
            "the server sent a rejected version again; NACK in {delay:?}"
        );
        delay
    }

    /// The selected assignments of a response, or why it is rejected.
    fn decode(&self, response: &DiscoveryResponse) -> Result<Vec<ClusterEndpoints>, String> {
        let mut names = HashSet::new();
        let mut out = Vec::new();
        for (i, any) in response.resources.iter().enumerate() {
            if any.type_url != EDS_TYPE_URL {
                return Err(format!(
                    "resources[{i}] has type {:?}, not {EDS_TYPE_URL}",
                    any.type_url
                ));
            }
            let cla = ClusterLoadAssignment::decode(any.value.as_slice())
                .map_err(|e| format!("resources[{i}] does not decode: {e}"))?;
            if cla.cluster_name.is_empty() {
                return Err(format!(
                    "resources[{i}]: ClusterLoadAssignment.cluster_name is empty"
                ));
            }
            if !names.insert(cla.cluster_name.clone()) {
                return Err(format!(
                    "ClusterLoadAssignment {:?} appears twice",
                    cla.cluster_name
                ));
            }
            if !self.settings.clusters.contains(&cla.cluster_name) {
                tracing::debug!(cluster = %cla.cluster_name, "ignoring an unsubscribed cluster");
                continue;
            }
            out.push(select(&cla).map_err(|e| e.to_string())?);
        }
        Ok(out)
    }
}

fn nack_status(message: String) -> RpcStatus {
    RpcStatus {
        code: INVALID_ARGUMENT,
        message,
        details: Vec::new(),
    }
}
