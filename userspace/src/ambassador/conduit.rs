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
    pub fn start(
        channel: tonic::transport::Channel,
        trench: String,
        name: String,
        timeout: Duration,
    ) -> Self {
        let (tx, view) = watch::channel(ConduitView::default());
        let cancel = CancellationToken::new();
        let task = tokio::spawn(run(channel, trench, name, timeout, tx, cancel.clone()));
        Self { view, cancel, task }
    }
}

async fn run(
    channel: tonic::transport::Channel,
    trench: String,
    name: String,
    timeout: Duration,
    tx: watch::Sender<ConduitView>,
    cancel: CancellationToken,
) {
    let request = ConduitRequest {
        trench: trench.clone(),
        conduit: name.clone(),
    };
    let mut conduits = ConduitsClient::new(channel.clone());
    // Connect until it works.
    let connection = loop {
        let call = tokio::time::timeout(timeout, conduits.connect_conduit(request.clone()));
        tokio::select! {
            _ = cancel.cancelled() => return,
            result = call => match result {
                Ok(Ok(c)) => break c.into_inner(),
                Ok(Err(e)) => tracing::warn!(conduit = %name, "connect: {}", e.message()),
                Err(_) => tracing::warn!(conduit = %name, "connect: timed out"),
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(CONNECT_RETRY) => {}
        }
    };
    tracing::info!(conduit = %name, interface = %connection.interface, ips = ?connection.local_ips, "conduit connected");
    tx.send_modify(|v| v.connection = Some(connection));

    // Follow the conduit's streams; re-watch after an error.
    let mut config = ConfigurationManagerClient::new(channel);
    let filter = pb::Stream {
        name: String::new(),
        conduit: Some(pb::Conduit {
            name: name.clone(),
            trench: Some(pb::Trench {
                name: trench.clone(),
            }),
            destination_port_nats: Vec::new(),
        }),
        max_targets: 0,
    };
    loop {
        if let Ok(response) = config.watch_stream(filter.clone()).await {
            let mut updates = response.into_inner();
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    message = updates.message() => match message {
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
                        _ => break,
                    }
                }
            }
        }
        if cancel.is_cancelled() {
            break;
        }
        tx.send_modify(|v| v.streams = None);
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
    // Closing: give the interface back.
    match tokio::time::timeout(timeout, conduits.disconnect_conduit(request)).await {
        Ok(Ok(_)) => tracing::info!(conduit = %name, "conduit disconnected"),
        Ok(Err(e)) => tracing::warn!(conduit = %name, "disconnect: {}", e.message()),
        Err(_) => tracing::warn!(conduit = %name, "disconnect: timed out"),
    }
}
