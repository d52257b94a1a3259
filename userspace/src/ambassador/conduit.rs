//! A conduit of the ambassador: connects through the node daemon (retrying
//! every 2 s) and follows the conduit's streams in the configuration.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::proto::node::{conduits_client::ConduitsClient, ConduitConnection, ConduitRequest};
use crate::proto::nsp::{self as pb, configuration_manager_client::ConfigurationManagerClient};

/// What the conduit's streams need to know.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ConduitView {
    /// Set once the daemon has given this namespace its interface.
    pub connection: Option<ConduitConnection>,
    /// The conduit's streams in the configuration (name → maxTargets);
    /// `None` until the first answer.
    pub streams: Option<BTreeMap<String, u32>>,
}

pub struct Conduit {
    pub view: watch::Receiver<ConduitView>,
    pub cancel: CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
}

const CONNECT_RETRY: Duration = Duration::from_secs(2);

impl Conduit {
    /// `refresh`: how often the connection is confirmed with the daemon (it
    /// is idempotent; a daemon that lost it makes it again).
    pub fn start(
        channel: tonic::transport::Channel,
        trench: String,
        name: String,
        timeout: Duration,
        refresh: Duration,
    ) -> Self {
        let (tx, view) = watch::channel(ConduitView::default());
        let cancel = CancellationToken::new();
        let task = tokio::spawn(run(
            channel,
            ConduitRequest {
                trench,
                conduit: name,
            },
            timeout,
            refresh,
            tx,
            cancel.clone(),
        ));
        Self { view, cancel, task }
    }
}

async fn run(
    channel: tonic::transport::Channel,
    request: ConduitRequest,
    timeout: Duration,
    refresh: Duration,
    tx: watch::Sender<ConduitView>,
    cancel: CancellationToken,
) {
    let name = request.conduit.clone();
    let mut conduits = ConduitsClient::new(channel.clone());
    let mut config = ConfigurationManagerClient::new(channel);
    let filter = pb::Stream {
        name: String::new(),
        conduit: Some(pb::Conduit {
            name: request.conduit.clone(),
            trench: Some(pb::Trench {
                name: request.trench.clone(),
            }),
            destination_port_nats: Vec::new(),
        }),
        max_targets: 0,
    };
    let mut updates: Option<tonic::Streaming<pb::StreamResponse>> = None;
    let mut confirm = tokio::time::Instant::now();
    // A conduit that cannot connect retries every few seconds: each reason
    // is logged once, then summarised.
    let mut repeats = crate::repeats::Repeats::default();
    while !cancel.is_cancelled() {
        // (Re)connect when due: at once, after a failure, and every `refresh`.
        if tokio::time::Instant::now() >= confirm {
            let call = tokio::time::timeout(timeout, conduits.connect_conduit(request.clone()));
            let result = tokio::select! {
                _ = cancel.cancelled() => break,
                result = call => result,
            };
            match result {
                Ok(Ok(c)) => {
                    let c = c.into_inner();
                    tx.send_if_modified(|v| {
                        let new = Some(c.clone());
                        let changed = v.connection != new;
                        if changed {
                            tracing::info!(conduit = %name, interface = %c.interface, ips = ?c.local_ips, "conduit connected");
                        }
                        v.connection = new;
                        changed
                    });
                    confirm = tokio::time::Instant::now() + refresh;
                    repeats.clear();
                }
                Ok(Err(e)) => {
                    let reason = format!("connect: {}", e.message());
                    if let Some(line) = repeats.note(&reason, std::time::Instant::now()) {
                        tracing::warn!(conduit = %name, "{line}");
                    }
                    confirm = tokio::time::Instant::now() + CONNECT_RETRY;
                }
                Err(_) => {
                    if let Some(line) =
                        repeats.note("connect: timed out", std::time::Instant::now())
                    {
                        tracing::warn!(conduit = %name, "{line}");
                    }
                    confirm = tokio::time::Instant::now() + CONNECT_RETRY;
                }
            }
        }
        // Follow the conduit's streams (re-watch after an error).
        if updates.is_none() && tx.borrow().connection.is_some() {
            match config.watch_stream(filter.clone()).await {
                Ok(r) => updates = Some(r.into_inner()),
                Err(_) => {
                    tx.send_if_modified(|v| v.streams.take().is_some());
                    confirm = confirm.min(tokio::time::Instant::now() + Duration::from_secs(1));
                }
            }
        }
        let next = async {
            match updates.as_mut() {
                Some(u) => u.message().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep_until(confirm) => {}
            message = next => match message {
                Ok(Some(list)) => {
                    let streams = list.streams.into_iter().map(|s| {
                        // A registry that predates maxTargets means 100 (as Meridio).
                        let max = if s.max_targets == 0 { 100 } else { s.max_targets };
                        (s.name, max)
                    }).collect();
                    tx.send_if_modified(|v| {
                        let new = Some(streams);
                        let changed = v.streams != new;
                        v.streams = new;
                        changed
                    });
                }
                _ => {
                    updates = None;
                    tx.send_if_modified(|v| v.streams.take().is_some());
                    confirm = confirm.min(tokio::time::Instant::now() + Duration::from_secs(1));
                }
            }
        }
    }
    // Closing: give the interface back (also after a connect cut short).
    match tokio::time::timeout(timeout, conduits.disconnect_conduit(request)).await {
        Ok(Ok(_)) => tracing::info!(conduit = %name, "conduit disconnected"),
        Ok(Err(e)) => tracing::warn!(conduit = %name, "disconnect: {}", e.message()),
        Err(_) => tracing::warn!(conduit = %name, "disconnect: timed out"),
    }
}
