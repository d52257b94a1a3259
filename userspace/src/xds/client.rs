//! The client's streams: connect, subscribe (Delta or State of the World),
//! validate, apply, ACK/NACK, reconnect. The variant-specific requests and
//! responses are in `sotw.rs` and `delta.rs`.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{node::UserAgentVersionType, Node};
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use futures::future::BoxFuture;
use prost::Message;
use rand::Rng;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::codec::Streaming;
use tonic::transport::{Channel, Endpoint};

use crate::health::planes as health;

use super::delta::Delta;
use super::sotw::Sotw;
use super::{
    select, ClusterEndpoints, ClusterLoadAssignment, EndpointSink, Protocol, XdsSettings,
    CLIENT_FEATURE_NO_OVERPROVISIONING, EDS_TYPE_URL,
};

/// The first reconnect delay (doubled up to `max_backoff`).
const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A vanished server (host or network) is noticed on an idle stream by TCP
/// keepalive: probes after 30 s idle, every 10 s, 3 unanswered (the kernel
/// answers them; the gRPC server never sees them).
const TCP_KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const TCP_KEEPALIVE_RETRIES: u32 = 3;
/// HTTP/2 pings, for a server process that hangs behind a live kernel: no
/// more often than gRPC servers allow by default (grpc-go's and
/// grpc-core's 5 minutes between pings on a stream without data; more
/// often, and the third ping gets a GOAWAY "too_many_pings": a reconnect
/// and a full resend every 2 minutes with a 30 s interval).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(330);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
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

/// What differs between State of the World and Delta: the messages, the
/// call, the first request and how a response is handled.
pub(super) trait Variant {
    type Request: Send + 'static;
    type Response: Send + Clone + PartialEq + 'static;
    /// As logged and shown in the health detail.
    const NAME: &'static str;
    /// The subscription, the first message of a stream.
    fn first(client: &Client) -> Self::Request;
    fn nonce(response: &Self::Response) -> &str;
    /// Opens the stream (EDS's or ADS's service).
    fn call(
        channel: Channel,
        ads: bool,
        outbound: ReceiverStream<Self::Request>,
    ) -> BoxFuture<'static, Result<tonic::Response<Streaming<Self::Response>>, tonic::Status>>;
    /// Validates and applies one response; what to send back.
    fn handle(
        client: &mut Client,
        response: Self::Response,
    ) -> impl Future<Output = Vec<Reply<Self::Request>>> + Send;
}

/// Subscribes and keeps the subscription until `cancel` fires. Never
/// returns early on errors: they are logged and the stream is re-established.
pub async fn run(settings: XdsSettings, sink: Arc<dyn EndpointSink>, cancel: CancellationToken) {
    Client::new(settings, sink, cancel).run().await
}

enum Ended {
    Cancelled,
    /// The server answered the call UNIMPLEMENTED before any response.
    NotOffered,
    /// The stream failed or ended; `responded`: it delivered a response.
    Failed {
        reason: String,
        responded: bool,
    },
}

pub(super) struct Client {
    pub(super) settings: XdsSettings,
    /// Reconnect failures already logged.
    repeats: crate::repeats::Repeats,
    sink: Arc<dyn EndpointSink>,
    cancel: CancellationToken,
    pub(super) node: Node,
    /// State of the World: `version_info` of the last accepted response ("" before the first).
    pub(super) version: String,
    /// Delta: the version of each resource the sink holds from the server.
    pub(super) versions: HashMap<String, String>,
    /// What the sink holds, per cluster.
    applied: HashMap<String, ClusterEndpoints>,
    /// Clusters that arrived in an accepted response or were applied as missing.
    settled: HashSet<String>,
    /// Clusters the sink held at the start ([`EndpointSink::held`]): never
    /// applied as missing.
    held: HashSet<String>,
    missing_deadline: Instant,
    missing_done: bool,
    /// The deadline was pushed for a stream since it was last armed.
    missing_pushed: bool,
    /// The last rejected response and how often it came back.
    pub(super) rejected: Option<Rejected>,
    /// The nonce of the last EDS response on this stream ("" before one).
    pub(super) eds_nonce: String,
    /// The last reply (ACK or NACK) to an EDS response on this stream, what
    /// State of the World sends again after a response of another type.
    pub(super) eds_reply: Option<DiscoveryRequest>,
    /// The fall-back from Delta was logged (once per client).
    sotw_fallback_logged: bool,
}

/// A rejected (type, version): logged once, NACKed with growing delays.
pub(super) struct Rejected {
    type_url: String,
    version: String,
    repeats: u32,
}

/// What to send for a response: `request`, after `delay`.
pub(super) struct Reply<R> {
    pub(super) delay: Duration,
    pub(super) request: R,
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
            versions: HashMap::new(),
            applied: HashMap::new(),
            settled: HashSet::new(),
            held: HashSet::new(),
            missing_deadline,
            missing_done,
            missing_pushed: false,
            rejected: None,
            eds_nonce: String::new(),
            eds_reply: None,
            sotw_fallback_logged: false,
        }
    }

    async fn run(mut self) {
        for kept in self.sink.held().await {
            if self.subscribed(&kept.cluster) {
                tracing::info!(
                    cluster = %kept.cluster,
                    "{} endpoints kept from before the restart until the server sends the cluster",
                    kept.endpoints.len()
                );
                self.held.insert(kept.cluster.clone());
                self.applied.insert(kept.cluster.clone(), kept);
            }
        }
        let max = self.settings.max_backoff.max(INITIAL_BACKOFF);
        let mut backoff = INITIAL_BACKOFF;
        loop {
            let ended = match self.stream_once().await {
                // stream_once names the missing service; this is not reached.
                Ended::NotOffered => failed("the server does not implement the service".into()),
                ended => ended,
            };
            match ended {
                Ended::Cancelled | Ended::NotOffered => return,
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
            .filter(|c| !self.settled.contains(*c) && !self.held.contains(*c))
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
        // A server never reached has not said it lacks them (Envoy's
        // initial fetch timeout gives up on a server that is there): not
        // synced, so not ready, until it is reached; asked again then.
        let reached = health().snapshot().get(PLANE).is_some_and(|h| h.connected);
        if reached {
            // A held cluster the server reached did not send within the
            // wait keeps its endpoints, and counts as settled: else a
            // cluster deleted while the node was away kept it unready for good.
            let kept: Vec<String> = self
                .held
                .iter()
                .filter(|c| !self.settled.contains(*c))
                .cloned()
                .collect();
            for cluster in kept {
                tracing::info!(
                    %cluster,
                    "the server did not send a cluster kept from before the restart within {:?}: its endpoints stay until it does",
                    self.settings.missing_after
                );
                self.settled.insert(cluster);
            }
            self.report_synced(None);
        } else {
            self.missing_done = false;
            self.missing_pushed = false;
            self.missing_deadline = Instant::now() + self.settings.missing_after;
        }
    }

    /// Records an ACKed version, and whether every subscribed cluster has settled.
    pub(super) fn report_synced(&self, acked: Option<&str>) {
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

    /// Hands the changed assignments of a response to the sink as one
    /// change and marks each settled; refused, none of them is applied.
    pub(super) async fn apply_all(
        &mut self,
        updates: Vec<ClusterEndpoints>,
        version: &str,
    ) -> Result<(), String> {
        let changed: Vec<ClusterEndpoints> = updates
            .iter()
            .filter(|u| self.applied.get(&u.cluster) != Some(*u))
            .cloned()
            .collect();
        for u in &changed {
            tracing::info!(
                cluster = %u.cluster,
                %version,
                endpoints = u.endpoints.len(),
                "applying endpoints"
            );
        }
        let names: Vec<String> = changed.iter().map(|u| format!("{:?}", u.cluster)).collect();
        if !changed.is_empty() {
            self.sink
                .apply_all(changed)
                .await
                .map_err(|e| match &names[..] {
                    [one] => format!("cluster {one}: {e}"),
                    many => format!("clusters {}: {e}", many.join(", ")),
                })?;
        }
        for update in updates {
            let cluster = update.cluster.clone();
            self.settled.insert(cluster.clone());
            self.applied.insert(cluster, update);
        }
        Ok(())
    }

    /// A cluster we subscribed to.
    pub(super) fn subscribed(&self, cluster: &str) -> bool {
        self.settings.clusters.iter().any(|c| c == cluster)
    }

    async fn stream_once(&mut self) -> Ended {
        let endpoint = match Endpoint::from_shared(self.settings.server.clone()) {
            Ok(e) => e
                .connect_timeout(CONNECT_TIMEOUT)
                .tcp_nodelay(true)
                .tcp_keepalive(Some(TCP_KEEPALIVE_IDLE))
                .tcp_keepalive_interval(Some(TCP_KEEPALIVE_INTERVAL))
                .tcp_keepalive_retries(Some(TCP_KEEPALIVE_RETRIES))
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
        if self.settings.protocol != Protocol::Sotw {
            match self.stream::<Delta>(channel.clone()).await {
                Ended::NotOffered if self.settings.protocol == Protocol::Auto => {
                    if !self.sotw_fallback_logged {
                        self.sotw_fallback_logged = true;
                        tracing::info!(
                            server = %self.settings.server,
                            "the server does not implement Delta xDS; using State of the World"
                        );
                    }
                }
                Ended::NotOffered => {
                    return failed(format!(
                        "the server does not implement Delta xDS ({}): set [xds] protocol to \"auto\" or \"sotw\"",
                        if self.settings.ads {
                            "DeltaAggregatedResources"
                        } else {
                            "DeltaEndpoints"
                        }
                    ))
                }
                ended => return ended,
            }
        }
        match self.stream::<Sotw>(channel).await {
            Ended::NotOffered => failed(format!(
                "the server does not implement {}",
                if self.settings.ads {
                    "StreamAggregatedResources"
                } else {
                    "StreamEndpoints"
                }
            )),
            ended => ended,
        }
    }

    /// One stream of variant `V`: subscribe, then validate, apply and answer
    /// every response until the stream ends.
    async fn stream<V: Variant>(&mut self, channel: Channel) -> Ended {
        let (tx, rx) = mpsc::channel(16);
        let first = V::first(self);
        tracing::info!(
            server = %self.settings.server,
            ads = self.settings.ads,
            protocol = V::NAME,
            clusters = ?self.settings.clusters,
            "subscribing to endpoints"
        );
        tx.try_send(first).expect("an empty channel has room");
        // Connected and asking: a server with nothing new (an unchanged
        // snapshot after its restart) sends no headers until it has, and
        // the last error must not read as the state meanwhile.
        let server = self.settings.server.clone();
        health().update(PLANE, |h| {
            h.connected = true;
            h.detail = format!(
                "subscribing at {server} ({}): connected, no response yet",
                V::NAME
            );
        });
        // The server gets the whole wait from when it is reached: the
        // deadline ran from the start (or an earlier stream) and could
        // fall at once, applying clusters as missing it had no time to send.
        // Once until the deadline falls: a server that takes connections and
        // fails every call must not push it on for ever.
        if !self.missing_done && !self.missing_pushed {
            self.missing_pushed = true;
            self.missing_deadline = self
                .missing_deadline
                .max(Instant::now() + self.settings.missing_after);
        }
        let call = V::call(channel, self.settings.ads, ReceiverStream::new(rx));
        let mut inbound = match self.wait(call).await {
            None => return Ended::Cancelled,
            Some(Err(status)) if status.code() == tonic::Code::Unimplemented => {
                return Ended::NotOffered
            }
            Some(Err(status)) => return failed(format!("opening the stream: {status}")),
            Some(Ok(response)) => response.into_inner(),
        };
        let server = self.settings.server.clone();
        health().update(PLANE, |h| {
            h.connected = true;
            h.detail = format!("subscribed at {server} ({})", V::NAME);
        });
        let mut responded = false;
        // The last response: the same one again (a replay) is not answered.
        let mut last: Option<V::Response> = None;
        self.eds_nonce.clear();
        self.eds_reply = None;
        // Replies waiting for their delay (a NACK backing off); a newer
        // response replaces them.
        let mut held: Vec<(Instant, V::Request)> = Vec::new();
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
                Some(Some(Err(status)))
                    if !responded && status.code() == tonic::Code::Unimplemented =>
                {
                    return Ended::NotOffered
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
            let nonce = V::nonce(&response);
            // Only the same response: a server that reuses a nonce for new
            // content still gets it applied and answered (Envoy does not
            // drop responses by nonce).
            if !nonce.is_empty() && last.as_ref() == Some(&response) {
                tracing::debug!(%nonce, "ignoring the same response again");
                continue;
            }
            last = Some(response.clone());
            responded = true;
            held.clear();
            for reply in V::handle(self, response).await {
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

    /// Records a rejection of (`type_url`, `version`): the first is logged
    /// and NACKed at once; each repeat waits longer, up to [`NACK_BACKOFF_MAX`].
    pub(super) fn rejection(
        &mut self,
        type_url: &str,
        version: &str,
        nonce: &str,
        reason: &str,
    ) -> Duration {
        let repeat = self
            .rejected
            .as_ref()
            .is_some_and(|r| r.type_url == type_url && r.version == version);
        let rejected = match &mut self.rejected {
            Some(r) if repeat => {
                r.repeats += 1;
                r
            }
            _ => {
                tracing::warn!(
                    server = %self.settings.server,
                    %version,
                    %nonce,
                    kept = %self.version,
                    "NACK: {reason}"
                );
                let nacked = (version.to_string(), reason.to_string());
                health().update(PLANE, |h| h.last_nack = Some(nacked));
                self.rejected.insert(Rejected {
                    type_url: type_url.to_string(),
                    version: version.to_string(),
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
            %version,
            repeats = rejected.repeats,
            "the server sent a rejected version again; NACK in {delay:?}"
        );
        delay
    }

    /// Decodes one EDS resource (index `i` of the response) and selects its
    /// endpoints: its cluster name, and `None` for a cluster we did not
    /// subscribe to.
    pub(super) fn decode_one(
        &self,
        i: usize,
        any: &Any,
    ) -> Result<(String, Option<ClusterEndpoints>), String> {
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
        if !self.subscribed(&cla.cluster_name) {
            tracing::debug!(cluster = %cla.cluster_name, "ignoring an unsubscribed cluster");
            return Ok((cla.cluster_name, None));
        }
        let selected = select(&cla).map_err(|e| e.to_string())?;
        Ok((cla.cluster_name, Some(selected)))
    }
}

fn failed(reason: String) -> Ended {
    Ended::Failed {
        reason,
        responded: false,
    }
}

pub(super) fn nack_status(message: String) -> RpcStatus {
    RpcStatus {
        code: INVALID_ARGUMENT,
        message,
        details: Vec::new(),
    }
}
