//! The `ambassador.v1.Tap` service: one trench at a time; Open connects the
//! trench → conduit → stream and returns at once; Close unregisters, then
//! drops the conduit with its last stream and the trench with its last
//! conduit; Watch sends the filtered list at once and then on real changes.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::{watch, Mutex};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::conduit::Conduit;
use super::AmbassadorSettings;
use crate::nsp::server::{check_name, WatchStream};
use crate::proto::ambassador::{self as pb, stream_status, tap_server};
use crate::proto::nsp;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct StreamKey {
    pub trench: String,
    pub conduit: String,
    pub stream: String,
}

impl std::fmt::Display for StreamKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.stream, self.conduit, self.trench)
    }
}

impl StreamKey {
    pub fn to_nsp(&self) -> nsp::Stream {
        nsp::Stream {
            name: self.stream.clone(),
            conduit: Some(nsp::Conduit {
                name: self.conduit.clone(),
                trench: Some(nsp::Trench {
                    name: self.trench.clone(),
                }),
                destination_port_nats: Vec::new(),
            }),
            max_targets: 0,
        }
    }

    fn to_pb(&self) -> pb::Stream {
        pb::Stream {
            name: self.stream.clone(),
            conduit: Some(pb::Conduit {
                name: self.conduit.clone(),
                trench: Some(pb::Trench {
                    name: self.trench.clone(),
                }),
            }),
        }
    }

    /// Meridio's checks: nil stream, conduit or trench; then the names.
    fn from_pb(stream: Option<&pb::Stream>) -> Result<Self, Status> {
        let stream = stream.ok_or_else(|| Status::invalid_argument("stream cannot be nil"))?;
        let conduit = stream
            .conduit
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("conduit cannot be nil"))?;
        let trench = conduit
            .trench
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("trench cannot be nil"))?;
        check_name("trench name", &trench.name)?;
        check_name("conduit name", &conduit.name)?;
        check_name("stream name", &stream.name)?;
        Ok(Self {
            trench: trench.name.clone(),
            conduit: conduit.name.clone(),
            stream: stream.name.clone(),
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamState {
    Open,
    Pending,
    Unavailable,
    Undefined,
}

impl StreamState {
    fn to_pb(self) -> stream_status::Status {
        match self {
            StreamState::Open => stream_status::Status::Open,
            StreamState::Pending => stream_status::Status::Pending,
            StreamState::Unavailable => stream_status::Status::Unavailable,
            StreamState::Undefined => stream_status::Status::Undefined,
        }
    }
}

struct OpenStream {
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<Option<super::stream::Leftover>>,
}

#[derive(Default)]
struct State {
    trench: Option<String>,
    conduits: BTreeMap<String, Conduit>,
    streams: BTreeMap<StreamKey, OpenStream>,
    /// Closed streams whose unregister is being tried again; an Open of
    /// the same stream stops it (it registers afresh).
    leftovers: BTreeMap<StreamKey, (CancellationToken, tokio::task::JoinHandle<()>)>,
}

#[derive(Clone)]
pub struct Tap {
    settings: Arc<AmbassadorSettings>,
    channel: tonic::transport::Channel,
    state: Arc<Mutex<State>>,
    statuses: Arc<watch::Sender<BTreeMap<StreamKey, StreamState>>>,
    /// Ends every Watch (so a graceful shutdown does not wait for clients).
    shutdown: CancellationToken,
}

impl Tap {
    pub fn new(settings: AmbassadorSettings) -> Self {
        Self {
            channel: crate::uds::lazy_channel(&settings.node_socket),
            settings: Arc::new(settings),
            state: Arc::default(),
            statuses: Arc::new(watch::channel(BTreeMap::new()).0),
            shutdown: CancellationToken::new(),
        }
    }

    fn report(&self, key: &StreamKey, state: StreamState) {
        self.statuses
            .send_if_modified(|all| match all.get_mut(key) {
                Some(s) if *s != state => {
                    *s = state;
                    true
                }
                _ => false,
            });
    }

    pub async fn open(&self, key: StreamKey) -> Result<(), Status> {
        let mut state = self.state.lock().await;
        match &state.trench {
            Some(t) if *t != key.trench => {
                return Err(Status::failed_precondition(
                    "open failed to set trench: another trench is already connected",
                ))
            }
            _ => state.trench = Some(key.trench.clone()),
        }
        if state.streams.contains_key(&key) {
            return Ok(());
        }
        state.leftovers.retain(|_, (_, task)| !task.is_finished());
        if let Some((retrying, task)) = state.leftovers.remove(&key) {
            // A call already sent would remove the new registration (the
            // registry knows a target by its ips, not its identifier).
            retrying.cancel();
            let _ = tokio::time::timeout(self.settings.timeout, task).await;
        }
        let view = state
            .conduits
            .entry(key.conduit.clone())
            .or_insert_with(|| {
                Conduit::start(
                    self.channel.clone(),
                    key.trench.clone(),
                    key.conduit.clone(),
                    self.settings.timeout,
                    self.settings.entry_timeout,
                )
            })
            .view
            .clone();
        let first = super::stream::first_state(&view.borrow(), &key.stream);
        self.statuses.send_modify(|all| {
            all.insert(key.clone(), first);
        });
        let cancel = CancellationToken::new();
        let tap = self.clone();
        let task = tokio::spawn(super::stream::run(
            self.channel.clone(),
            key.clone(),
            self.settings.timeout,
            self.settings.entry_timeout,
            view,
            {
                let key = key.clone();
                move |s| tap.report(&key, s)
            },
            cancel.clone(),
        ));
        state.streams.insert(key, OpenStream { cancel, task });
        Ok(())
    }

    pub async fn close(&self, key: StreamKey) {
        let mut state = self.state.lock().await;
        if state.trench.as_deref() != Some(key.trench.as_str()) {
            return;
        }
        // The tasks end on their own within their call timeouts; waiting for
        // them means a later Open cannot race their last unregister.
        if let Some(s) = state.streams.remove(&key) {
            s.cancel.cancel();
            if let Ok(Some(left)) = s.task.await {
                tracing::warn!(stream = %key, "close: the registry could not be reached; unregistering again every second");
                let retrying = CancellationToken::new();
                let task = tokio::spawn(left.retry(retrying.clone()));
                if let Some((older, _)) = state.leftovers.insert(key.clone(), (retrying, task)) {
                    older.cancel();
                }
            }
        }
        self.statuses
            .send_if_modified(|all| all.remove(&key).is_some());
        if !state.streams.keys().any(|k| k.conduit == key.conduit) {
            if let Some(c) = state.conduits.remove(&key.conduit) {
                c.cancel.cancel();
                let _ = c.task.await;
            }
        }
        if state.conduits.is_empty() {
            state.trench = None;
        }
    }

    /// Ends the Watch streams (at shutdown, after every stream is closed).
    pub fn end_watches(&self) {
        self.shutdown.cancel();
    }

    pub async fn close_all(&self) {
        let keys: Vec<StreamKey> = self.state.lock().await.streams.keys().cloned().collect();
        for key in keys {
            self.close(key).await;
        }
    }
}

/// Meridio's Watch filter: an empty name or a nil parent matches anything.
fn matches(filter: &pb::Stream, key: &StreamKey) -> bool {
    let name = |f: &str, n: &str| f.is_empty() || f == n;
    name(&filter.name, &key.stream)
        && filter.conduit.as_ref().is_none_or(|c| {
            name(&c.name, &key.conduit)
                && c.trench.as_ref().is_none_or(|t| name(&t.name, &key.trench))
        })
}

#[tonic::async_trait]
impl tap_server::Tap for Tap {
    async fn open(&self, request: Request<pb::Stream>) -> Result<Response<()>, Status> {
        let key = StreamKey::from_pb(Some(request.get_ref()))?;
        Tap::open(self, key).await?;
        Ok(Response::new(()))
    }

    async fn close(&self, request: Request<pb::Stream>) -> Result<Response<()>, Status> {
        let key = StreamKey::from_pb(Some(request.get_ref()))?;
        Tap::close(self, key).await;
        Ok(Response::new(()))
    }

    type WatchStream = WatchStream<pb::StreamResponse>;

    async fn watch(
        &self,
        request: Request<pb::Stream>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let filter = request.into_inner();
        let mut changes = self.statuses.subscribe();
        let shutdown = self.shutdown.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut last = None;
            loop {
                let list: Vec<pb::StreamStatus> = changes
                    .borrow_and_update()
                    .iter()
                    .filter(|(k, _)| matches(&filter, k))
                    .map(|(k, s)| pb::StreamStatus {
                        status: s.to_pb() as i32,
                        stream: Some(k.to_pb()),
                    })
                    .collect();
                if last.as_ref() != Some(&list) {
                    let response = pb::StreamResponse {
                        stream_status: list.clone(),
                    };
                    if tx.send(Ok(response)).await.is_err() {
                        return;
                    }
                    last = Some(list);
                }
                tokio::select! {
                    changed = changes.changed() => if changed.is_err() { return },
                    _ = tx.closed() => return,
                    _ = shutdown.cancelled() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
