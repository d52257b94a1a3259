//! The node's etcd session: its lease (kept in the state directory, so a
//! restart that finds it alive keeps it and nothing flaps), its node record,
//! its registry's targets and identifier claims bound to the lease; a watch
//! of the whole prefix from the revision it listed, fed to the registry (the
//! other nodes' targets) and to `tm_tunnel_peers` (their addresses). When
//! etcd goes away it keeps the last good view, reconnects with a capped
//! backoff, re-lists and applies the difference; a compacted watch re-lists.

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    path::PathBuf,
    sync::{
        atomic::{AtomicI64, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    TxnOpResponse, WatchOptions, WatchStream,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use super::record::{self, Keys, NodeRecord, TargetRecord};
use super::view::View;
use crate::catalog::{resolve::RemoteNode, Catalog};
use crate::dataplane::DataplaneHandle;
use crate::nsp::config::StreamPath;
use crate::nsp::registry::{Kind, Status, Target};
use crate::nsp::state::{IdClaims, Nsp, RemoteTarget};

/// Each etcd request gets this long (a balanced channel may wait forever).
const OP_TIMEOUT: Duration = Duration::from_secs(3);
/// A claim waits at most this long before the registration goes on locally.
const CLAIM_TIMEOUT: Duration = Duration::from_secs(1);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

#[derive(Clone, Debug)]
pub struct Settings {
    pub endpoints: Vec<String>,
    /// CA (and client identity) for https:// endpoints.
    pub tls: Option<etcd_client::TlsOptions>,
    pub lease_ttl: Duration,
    pub prefix: String,
    /// `<state_dir>/cluster.json`: the lease a restart reuses.
    pub state_file: PathBuf,
    /// `<state_dir>/cluster-remote.json`: the other nodes' targets of the
    /// last view applied, which a restart starts from ([`REMOTE_FILE`]).
    pub remote_file: PathBuf,
    pub record: NodeRecord,
}

/// Where the other nodes' targets of the last applied view are kept.
pub const REMOTE_FILE: &str = "cluster-remote.json";

/// The other nodes' targets kept in `path`; none when there is no file or
/// it cannot be read (etcd's view replaces them anyway).
pub fn kept_remote(path: &std::path::Path) -> Vec<RemoteTarget> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .inspect_err(|e| tracing::warn!("{}: {e}; not used", path.display()))
            .unwrap_or_default(),
        Err(_) => Vec::new(),
    }
}

/// Its name among the control planes (`/readyz`, `/metrics`).
pub const PLANE: &str = "cluster";

/// What `status` shows.
#[derive(Clone, Debug, Default)]
pub struct Health {
    pub connected: bool,
    pub error: Option<String>,
    pub revision: i64,
    pub lease: i64,
    pub nodes: Vec<String>,
    /// Nodes seen since the start whose record is gone (lease expired or deleted).
    pub gone: BTreeSet<String>,
    /// Each node's targets in the view.
    pub targets: BTreeMap<String, usize>,
    pub remote_targets: usize,
    pub bad_values: usize,
    /// Listings after the first: each new session's, and a compacted watch's.
    pub relists: u64,
}

#[derive(Debug, Error)]
enum Lost {
    #[error(transparent)]
    Etcd(#[from] etcd_client::Error),
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Ended(String),
}

async fn timed<T>(call: impl Future<Output = Result<T, etcd_client::Error>>) -> Result<T, Lost> {
    match tokio::time::timeout(OP_TIMEOUT, call).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(Lost::Timeout(OP_TIMEOUT)),
    }
}

#[derive(Serialize, Deserialize)]
struct Saved {
    node: String,
    lease: i64,
}

pub struct Agent {
    settings: Settings,
    keys: Keys,
    nsp: Arc<Nsp>,
    dataplane: DataplaneHandle,
    /// Gets the other nodes' prefixes (EDS endpoints there are remote targets).
    catalog: Arc<Catalog>,
    /// The connected client (for claims); `None` while etcd is away.
    client: Mutex<Option<Client>>,
    lease: AtomicI64,
    /// The endpoint of the last session (an index of `settings.endpoints`).
    endpoint: AtomicUsize,
    /// The last revision whose events are all in the view (0: list first).
    applied: AtomicI64,
    /// (lease, this node's keys in etcd under it and their values).
    published: std::sync::Mutex<(i64, BTreeMap<String, Vec<u8>>)>,
    view: std::sync::Mutex<View>,
    health: std::sync::Mutex<Health>,
    /// (lease, identifier claims this node won under it): what the watch
    /// may not have shown yet, so publishing does not claim them again.
    claimed: std::sync::Mutex<(i64, BTreeMap<String, String>)>,
    /// The view changed: the applier task writes it (once for any number
    /// of changes meanwhile, so a burst of watch events is one LB apply).
    dirty: tokio::sync::Notify,
}

impl Agent {
    pub fn new(
        settings: Settings,
        nsp: Arc<Nsp>,
        dataplane: DataplaneHandle,
        catalog: Arc<Catalog>,
    ) -> Arc<Self> {
        let keys = Keys {
            prefix: settings.prefix.clone(),
        };
        Arc::new(Self {
            settings,
            keys,
            nsp,
            dataplane,
            catalog,
            client: Mutex::new(None),
            lease: AtomicI64::new(0),
            endpoint: AtomicUsize::new(0),
            applied: AtomicI64::new(0),
            published: Default::default(),
            view: Default::default(),
            health: Default::default(),
            claimed: Default::default(),
            dirty: tokio::sync::Notify::new(),
        })
    }

    /// This node's record, at the tunnel address it has now.
    fn record(&self) -> Vec<u8> {
        let mut record = self.settings.record.clone();
        record.tunnel_addresses = self.dataplane.tunnel().address.into_iter().collect();
        serde_json::to_vec(&record).unwrap_or_default()
    }

    pub fn node(&self) -> &str {
        &self.settings.record.name
    }

    pub fn health(&self) -> Health {
        self.health.lock().expect("health lock").clone()
    }

    fn set_health(&self, f: impl FnOnce(&mut Health)) {
        f(&mut self.health.lock().expect("health lock"));
    }

    /// Runs until `cancel`. Nothing is deleted on stop: the lease outlives a
    /// restart, and expires for everyone if the node does not come back.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        tracing::info!(node = self.node(), endpoints = ?self.settings.endpoints, "cluster: joining");
        let applier = {
            let agent = self.clone();
            let cancel = cancel.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = agent.dirty.notified() => agent.apply().await,
                    }
                }
            })
        };
        let _applier = AbortOnDrop(applier);
        let mut delay = BACKOFF_MIN;
        loop {
            let mut watching = false;
            let result = tokio::select! {
                _ = cancel.cancelled() => break,
                r = self.session(&cancel, &mut watching) => r,
            };
            *self.client.lock().await = None;
            if cancel.is_cancelled() {
                break;
            }
            if watching {
                delay = BACKOFF_MIN;
            }
            let mut error = match result {
                Ok(()) => "the session ended".to_string(),
                Err(e) => crate::causes(&e),
            };
            if error.contains("invalid peer certificate") {
                error.push_str(
                    " (is etcd's certificate signed by cluster.ca_file, for this address?)",
                );
            }
            let first = self.health().error.as_deref() != Some(error.as_str());
            if first {
                tracing::warn!(
                    "cluster: etcd {:?}: {error}; keeping the last view, retrying",
                    self.settings.endpoints
                );
            }
            crate::health::planes().update(PLANE, |h| {
                h.connected = false;
                h.detail = format!("etcd {:?}: {error}", self.settings.endpoints);
            });
            self.set_health(|h| {
                h.connected = false;
                h.error = Some(error);
            });
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(BACKOFF_MAX);
        }
    }

    async fn session(&self, cancel: &CancellationToken, watching: &mut bool) -> Result<(), Lost> {
        let mut client = self.connect().await?;
        let lease = self.lease(&mut client).await?;
        let (keeper, kept) = timed(client.lease_keep_alive(lease)).await?;
        // The lease is kept alive by a task of its own: a long publish (a
        // thousand targets registered at once) must not starve it, or the
        // lease expires and takes every key of this node with it.
        let (lost_tx, mut lease_lost) = tokio::sync::oneshot::channel();
        let keeping = tokio::spawn(keep_alive(
            keeper,
            kept,
            self.settings.lease_ttl / 3,
            lost_tx,
        ));
        let _keeping = AbortOnDrop(keeping);
        let mut moved = self.dataplane.watch_tunnel();
        moved.mark_unchanged();
        self.put_node(&mut client, lease).await?;

        // What this node has in etcd: kept from the last session while its
        // lease lives (its keys died with an expired one).
        let mut published = {
            let mut kept = self.published.lock().expect("published lock");
            if kept.0 != lease {
                *kept = (lease, BTreeMap::new());
            }
            kept.1.clone()
        };
        // Listed at every session, not resumed from the last revision: etcd
        // may have been wiped or restored meanwhile (its revisions then start
        // lower, and a watch from ours would miss every change below it).
        let again = self.applied.load(Ordering::Relaxed) != 0;
        let from = self.relist(&mut client, &mut published).await?;
        if again {
            self.set_health(|h| h.relists += 1);
            tracing::info!(
                node = self.node(),
                revision = from,
                "cluster: listed again for the new session"
            );
        }
        *self.client.lock().await = Some(client.clone());
        // Before the first publish: a change it makes or misses (an
        // identifier lost to another node) is published again at once.
        let mut changes = self.nsp.subscribe();
        let result = self.publish(&mut client, lease, &mut published).await;
        self.published.lock().expect("published lock").1 = published.clone();
        result?;

        let mut stream = self.watch(&mut client, from).await?;
        *watching = true;
        // Listed, applied, published and watching: the view is whole.
        crate::health::planes().update(PLANE, |h| {
            h.connected = true;
            h.synced = true;
            h.detail = format!("watching etcd from revision {from}");
        });
        self.set_health(|h| {
            h.connected = true;
            h.error = None;
            h.revision = h.revision.max(from);
            h.lease = lease;
        });
        tracing::info!(
            node = self.node(),
            lease,
            revision = from,
            "cluster: joined"
        );
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                lost = &mut lease_lost => return Err(match lost {
                    Ok(KeepAlive::Expired) => {
                        // Expired (etcd away longer than the TTL): a new
                        // lease, and everything published again.
                        self.lease.store(0, Ordering::Relaxed);
                        Lost::Ended(format!("lease {lease:x} expired"))
                    }
                    Ok(KeepAlive::Lost(e)) => e,
                    Err(_) => Lost::Ended("the lease keep-alive task ended".into()),
                }),
                changed = moved.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    // The node's address moved with its uplink's: this
                    // connection is bound to the old one. A new session
                    // (same lease) puts the record at the new address.
                    return Err(Lost::Ended("the node's address moved; connecting from the new one".into()));
                }
                changed = changes.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    let result = self.publish(&mut client, lease, &mut published).await;
                    self.published.lock().expect("published lock").1 = published.clone();
                    result?;
                }
                message = stream.message() => {
                    let Some(response) = message? else {
                        return Err(Lost::Ended("the watch stream ended".into()));
                    };
                    if response.canceled() {
                        if response.compact_revision() > 0 {
                            // Compacted past our revision: list again, apply
                            // the difference, watch on from the listing.
                            tracing::info!(
                                node = self.node(),
                                "cluster: revision {} was compacted (at {}); listing again",
                                self.applied.load(Ordering::Relaxed) + 1,
                                response.compact_revision()
                            );
                            self.set_health(|h| h.relists += 1);
                            let from = self.relist(&mut client, &mut published).await?;
                            let result = self.publish(&mut client, lease, &mut published).await;
                            self.published.lock().expect("published lock").1 = published.clone();
                            result?;
                            stream = self.watch(&mut client, from).await?;
                            continue;
                        }
                        return Err(Lost::Ended(format!(
                            "etcd cancelled the watch ({})",
                            response.cancel_reason()
                        )));
                    }
                    let mut changed = false;
                    let mut ours = false;
                    let mut node_gone = false;
                    let mut last = 0;
                    {
                        let mut view = self.view.lock().expect("view lock");
                        for event in response.events() {
                            let Some(kv) = event.kv() else { continue };
                            last = last.max(kv.mod_revision());
                            changed |= match event.event_type() {
                                EventType::Put => view.put(&self.keys, kv.key(), kv.value(), kv.mod_revision()),
                                EventType::Delete => view.delete(&self.keys, kv.key()),
                            };
                            let deleted = event.event_type() == EventType::Delete;
                            match self.keys.parse(kv.key()) {
                                // Our record, deleted or changed by someone else: put back.
                                Some(record::Key::Node(name)) if name == self.node() => {
                                    node_gone |= deleted
                                        || kv.lease() != lease
                                        || kv.value() != self.record().as_slice();
                                }
                                // A claim we won, deleted or taken: claimed again
                                // (or its loss logged) by the publish below.
                                Some(record::Key::Id) => {
                                    let key = String::from_utf8_lossy(kv.key());
                                    let mut claimed = self.claimed.lock().expect("claimed lock");
                                    let owner = claimed.1.get(key.as_ref()).cloned();
                                    if owner.is_some_and(|o| deleted || kv.value() != o.as_bytes()) {
                                        claimed.1.remove(key.as_ref());
                                        ours = true;
                                    }
                                }
                                _ => {}
                            }
                            // Our own keys as etcd has them (someone else may change them).
                            if matches!(self.keys.parse(kv.key()),
                                Some(record::Key::Target { node, .. }) if node == self.node())
                            {
                                let key = String::from_utf8_lossy(kv.key()).into_owned();
                                ours |= match event.event_type() {
                                    EventType::Put => published
                                        .insert(key, kv.value().to_vec())
                                        .as_deref() != Some(kv.value()),
                                    EventType::Delete => published.remove(&key).is_some(),
                                };
                            }
                        }
                    }
                    if node_gone {
                        tracing::warn!(node = self.node(), "cluster: this node's record was changed or deleted by someone else; putting it back");
                        self.put_node(&mut client, lease).await?;
                    }
                    if ours {
                        let result = self.publish(&mut client, lease, &mut published).await;
                        self.published.lock().expect("published lock").1 = published.clone();
                        result?;
                    }
                    // Every event up to `last` is in the view now: a new
                    // session resumes after it.
                    self.applied.fetch_max(last, Ordering::Relaxed);
                    let revision = response.header().map_or(last, |h| h.revision());
                    let bad = self.view.lock().expect("view lock").bad_values();
                    self.set_health(|h| {
                        h.revision = h.revision.max(revision);
                        h.bad_values = bad;
                    });
                    if changed {
                        self.dirty.notify_one();
                    }
                }
            }
        }
    }

    /// Puts this node's record under `lease`, unless another lease holds
    /// the name: two daemons with one node name would each delete the
    /// other's targets as foreign keys under their own name, without end.
    /// A record without a lease (not a daemon's) is replaced.
    async fn put_node(&self, client: &mut Client, lease: i64) -> Result<(), Lost> {
        let key = self.keys.node(self.node());
        let mut holder = 0;
        for allowed in [lease, 0] {
            let txn = Txn::new()
                .when([Compare::lease(key.as_str(), CompareOp::Equal, allowed)])
                .and_then([TxnOp::put(
                    key.as_str(),
                    self.record(),
                    Some(PutOptions::new().with_lease(lease)),
                )])
                .or_else([TxnOp::get(key.as_str(), None)]);
            let response = timed(client.txn(txn)).await?;
            if response.succeeded() {
                return Ok(());
            }
            holder = response
                .op_responses()
                .into_iter()
                .find_map(|op| match op {
                    TxnOpResponse::Get(get) => get.kvs().first().map(|kv| kv.lease()),
                    _ => None,
                })
                .unwrap_or(0);
        }
        Err(Lost::Ended(format!(
            "node name {:?} is held by another daemon (etcd lease {holder:x}): give each node \
             its own cluster.node_name (after a restart that lost its lease, this waits until \
             the old lease expires)",
            self.node()
        )))
    }

    /// A client of one member that answers a linearizable read (so is part
    /// of a quorum): the one of the last session first, then the others in
    /// turn. One member per session: a balanced channel keeps sending
    /// requests to a member that is down.
    async fn connect(&self) -> Result<Client, Lost> {
        let endpoints = &self.settings.endpoints;
        let first = self.endpoint.load(Ordering::Relaxed);
        let mut failed = None;
        for k in 0..endpoints.len() {
            let at = (first + k) % endpoints.len();
            let mut options = ConnectOptions::new()
                .with_connect_timeout(Duration::from_secs(2))
                .with_timeout(OP_TIMEOUT)
                .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
            if let Some(tls) = &self.settings.tls {
                options = options.with_tls(tls.clone());
            }
            let attempt = async {
                let mut client = timed(Client::connect([&endpoints[at]], Some(options))).await?;
                timed(client.get(self.keys.node(self.node()), None)).await?;
                Ok::<_, Lost>(client)
            };
            match attempt.await {
                Ok(client) => {
                    self.endpoint.store(at, Ordering::Relaxed);
                    return Ok(client);
                }
                Err(e) => failed = Some(e),
            }
        }
        Err(failed.unwrap_or_else(|| Lost::Ended("no etcd endpoint is configured".into())))
    }

    /// Lists the prefix: the view becomes it (the registry and maps get
    /// only the difference) and `published` what this node has in etcd.
    /// Returns the listing's revision.
    async fn relist(
        &self,
        client: &mut Client,
        published: &mut BTreeMap<String, Vec<u8>>,
    ) -> Result<i64, Lost> {
        let listing = timed(client.get(
            self.settings.prefix.as_str(),
            Some(GetOptions::new().with_prefix()),
        ))
        .await?;
        let revision = listing.header().map_or(0, |h| h.revision());
        let changed = {
            let mut view = self.view.lock().expect("view lock");
            view.replace(
                &self.keys,
                listing
                    .kvs()
                    .iter()
                    .map(|kv| (kv.key(), kv.value(), kv.mod_revision())),
            )
        };
        *published = listing
            .kvs()
            .iter()
            .filter(|kv| {
                matches!(self.keys.parse(kv.key()),
                    Some(record::Key::Target { node, .. }) if node == self.node())
            })
            .map(|kv| {
                (
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    kv.value().to_vec(),
                )
            })
            .collect();
        self.applied.store(revision, Ordering::Relaxed);
        let bad = self.view.lock().expect("view lock").bad_values();
        self.set_health(|h| {
            // A listing is the store as it is: a wiped one starts lower.
            h.revision = revision;
            h.bad_values = bad;
        });
        if changed {
            self.dirty.notify_one();
        }
        Ok(revision)
    }

    /// A watch of the whole prefix from the revision after `from`.
    async fn watch(&self, client: &mut Client, from: i64) -> Result<WatchStream, Lost> {
        timed(
            client.watch(
                self.settings.prefix.as_str(),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(from + 1),
                ),
            ),
        )
        .await
    }

    /// The saved lease if etcd still has it, else a new one (saved).
    async fn lease(&self, client: &mut Client) -> Result<i64, Lost> {
        let node = self.node().to_string();
        let mut id = self.lease.load(Ordering::Relaxed);
        if id == 0 {
            id = std::fs::read(&self.settings.state_file)
                .ok()
                .and_then(|b| serde_json::from_slice::<Saved>(&b).ok())
                .filter(|s| s.node == node)
                .map_or(0, |s| s.lease);
        }
        if id != 0 {
            let alive = timed(client.lease_time_to_live(id, None)).await?;
            if alive.ttl() > 0 {
                self.lease.store(id, Ordering::Relaxed);
                return Ok(id);
            }
            // Found by a tester: with a lease shorter than a start (the
            // programs' load takes seconds), every restart did this unseen.
            tracing::warn!(
                "cluster: lease {id:x} expired (a restart or a time away from etcd longer \
                 than lease_ttl, {:?}): this node's targets and claims are written again \
                 under a new one, and other nodes see them go and come back",
                self.settings.lease_ttl
            );
        }
        let ttl = self.settings.lease_ttl.as_secs() as i64;
        let id = timed(client.lease_grant(ttl, None)).await?.id();
        self.lease.store(id, Ordering::Relaxed);
        if let Err(e) =
            crate::statefile::save(&self.settings.state_file, &Saved { node, lease: id })
        {
            tracing::error!(
                "cluster: saving the lease to {}: {e}",
                self.settings.state_file.display()
            );
        }
        Ok(id)
    }

    /// Makes this node's target keys and claims match its registry.
    async fn publish(
        &self,
        client: &mut Client,
        lease: i64,
        published: &mut BTreeMap<String, Vec<u8>>,
    ) -> Result<(), Lost> {
        let snapshot = self.nsp.snapshot();
        let connections = self.nsp.connections().await;
        let mut wanted = BTreeMap::new();
        for target in &snapshot.targets {
            let Some(key) = self.keys.target(self.node(), target) else {
                continue;
            };
            let served = connections.iter().any(|c| c.local_ips() == target.ips);
            let record = TargetRecord {
                node: self.node().to_string(),
                target: target.clone(),
                served,
            };
            wanted.insert(key, serde_json::to_vec(&record).unwrap_or_default());
        }
        // Many changes go in few transactions: one etcd commit (and disk
        // sync) for up to TXN_OPS keys instead of one each.
        let puts: Vec<(&String, &Vec<u8>)> = wanted
            .iter()
            .filter(|(k, v)| published.get(*k) != Some(*v))
            .collect();
        for batch in puts.chunks(TXN_OPS) {
            let ops: Vec<TxnOp> = batch
                .iter()
                .map(|(k, v)| {
                    TxnOp::put(
                        k.as_str(),
                        (*v).clone(),
                        Some(PutOptions::new().with_lease(lease)),
                    )
                })
                .collect();
            timed(client.txn(Txn::new().and_then(ops))).await?;
            for (k, v) in batch {
                published.insert((*k).clone(), (*v).clone());
            }
        }
        let gone: Vec<String> = published
            .keys()
            .filter(|k| !wanted.contains_key(*k))
            .cloned()
            .collect();
        for batch in gone.chunks(TXN_OPS) {
            let ops: Vec<TxnOp> = batch
                .iter()
                .map(|k| TxnOp::delete(k.as_str(), None))
                .collect();
            timed(client.txn(Txn::new().and_then(ops))).await?;
            for k in batch {
                published.remove(k);
            }
        }
        self.reconcile_claims(client, lease, &snapshot.targets)
            .await
    }

    /// Claims the identifiers of this node's ENABLED targets (those enabled
    /// while etcd was away) and releases the ones it no longer uses.
    /// Whether this node won `key` for `owner` under `lease`.
    fn won(&self, lease: i64, key: &str, owner: &str) -> bool {
        let claimed = self.claimed.lock().expect("claimed lock");
        claimed.0 == lease && claimed.1.get(key).map(String::as_str) == Some(owner)
    }

    fn record_win(&self, lease: i64, key: &str, owner: &str) {
        let mut claimed = self.claimed.lock().expect("claimed lock");
        if claimed.0 != lease {
            *claimed = (lease, BTreeMap::new());
        }
        claimed.1.insert(key.to_string(), owner.to_string());
    }

    async fn reconcile_claims(
        &self,
        client: &mut Client,
        lease: i64,
        targets: &[Target],
    ) -> Result<(), Lost> {
        let mut wanted = BTreeMap::new();
        for t in targets {
            if let (Status::Enabled, Kind::Default, Some(path), Some(id)) =
                (t.status, t.kind, &t.stream, t.identifier())
            {
                let owner = record::claim_owner(self.node(), t);
                wanted.insert(self.keys.id(path, id), (owner, t.key(), id));
            }
        }
        let mine = format!("{}/", self.node());
        let held: Vec<(String, String)> = {
            let view = self.view.lock().expect("view lock");
            view.claims
                .iter()
                .filter(|(_, owner)| owner.starts_with(&mine))
                .map(|(k, o)| (k.clone(), o.clone()))
                .collect()
        };
        for (key, owner) in &held {
            if wanted.get(key).map(|w| &w.0) != Some(owner) {
                let txn = Txn::new()
                    .when([Compare::value(
                        key.as_str(),
                        CompareOp::Equal,
                        owner.as_str(),
                    )])
                    .and_then([TxnOp::delete(key.as_str(), None)]);
                timed(client.txn(txn)).await?;
                self.claimed.lock().expect("claimed lock").1.remove(key);
            }
        }
        for (key, (owner, target, id)) in wanted {
            if held.iter().any(|(k, o)| *k == key && *o == owner) || self.won(lease, &key, &owner) {
                continue;
            }
            if claim(client, &key, &owner, lease).await? {
                self.record_win(lease, &key, &owner);
                continue;
            }
            // Enabled while etcd was away, and another node's target won it.
            match self.nsp.lost_identifier(&target, id).await {
                Ok(true) => tracing::warn!(
                    node = self.node(),
                    "cluster: {key} is held by another node's target; ours is DISABLED again \
                     and must pick another identifier"
                ),
                Ok(false) => {}
                Err(e) => tracing::error!("cluster: giving up {key}: {e}"),
            }
        }
        Ok(())
    }

    /// `target` of `node` as every node is to use it: an ENABLED target
    /// whose identifier's claim another target holds (both were enabled
    /// while etcd was away) counts as DISABLED, so all nodes agree on one
    /// holder before the loser's own record says so.
    fn claim_holder(&self, view: &View, node: &str, target: &Target) -> Target {
        let mut target = target.clone();
        if let (Status::Enabled, Kind::Default, Some(path), Some(id)) = (
            target.status,
            target.kind,
            &target.stream,
            target.identifier(),
        ) {
            let owner = view.claims.get(&self.keys.id(path, id));
            if owner.is_some_and(|o| *o != record::claim_owner(node, &target)) {
                target.status = Status::Disabled;
            }
        }
        target
    }

    /// Hands the view to the registry (other nodes' targets), the
    /// dataplane (their tunnel addresses) and the catalog (their prefixes).
    /// Saves `remote` (what the maps now hold) off this task: the latest
    /// applied view wins when saves overlap.
    fn keep_remote(&self, remote: Vec<RemoteTarget>) {
        static LATEST: std::sync::Mutex<u64> = std::sync::Mutex::new(0);
        static ISSUED: AtomicI64 = AtomicI64::new(0);
        let mine = ISSUED.fetch_add(1, Ordering::Relaxed) as u64 + 1;
        let path = self.settings.remote_file.clone();
        tokio::task::spawn_blocking(move || {
            let mut latest = LATEST.lock().unwrap_or_else(|e| e.into_inner());
            if mine < *latest {
                return;
            }
            *latest = mine;
            if let Err(e) = crate::statefile::save(&path, &remote) {
                tracing::warn!("cluster: the other nodes' targets not saved: {e}");
            }
        });
    }

    async fn apply(&self) {
        let (remote, peers, nodes, health) = {
            let view = self.view.lock().expect("view lock");
            let own = self.dataplane.tunnel().address;
            // A record giving this node's own address is not another node:
            // its targets are left out (the LB refuses a remote target
            // here, and the whole view with it).
            let address = |node: &str| {
                view.nodes
                    .get(node)
                    .and_then(|n| n.tunnel_addresses.first().copied())
                    .filter(|a| Some(*a) != own)
            };
            let remote: Vec<RemoteTarget> = view
                .targets
                .values()
                .filter(|r| r.node != self.node())
                .map(|r| RemoteTarget {
                    node: r.node.clone(),
                    address: address(&r.node),
                    served: r.served,
                    target: self.claim_holder(&view, &r.node, &r.target),
                })
                .collect();
            let peers: BTreeSet<std::net::Ipv4Addr> = view
                .nodes
                .values()
                .filter(|n| n.name != self.node())
                .flat_map(|n| n.tunnel_addresses.iter().copied())
                .filter(|a| Some(*a) != own)
                .collect();
            // Without a tunnel address of its own this node has no remote
            // targets; a node claiming this node's address is not another.
            let nodes: Vec<RemoteNode> = match own {
                None => Vec::new(),
                Some(own) => view
                    .nodes
                    .values()
                    .filter_map(|n| {
                        let this = n.name == self.node();
                        let tunnel = *n.tunnel_addresses.first()?;
                        (this || tunnel != own).then(|| RemoteNode {
                            name: n.name.clone(),
                            tunnel,
                            prefixes: n.prefixes(),
                            this,
                        })
                    })
                    .collect(),
            };
            let mut targets = BTreeMap::new();
            for r in view.targets.values() {
                *targets.entry(r.node.clone()).or_insert(0) += 1;
            }
            (
                remote,
                peers,
                nodes,
                (
                    view.nodes.keys().cloned().collect::<Vec<_>>(),
                    view.bad_values(),
                    targets,
                ),
            )
        };
        let count = remote.len();
        self.set_health(|h| {
            h.gone.extend(h.nodes.iter().cloned());
            for n in &health.0 {
                h.gone.remove(n);
            }
            h.nodes = health.0;
            h.bad_values = health.1;
            h.targets = health.2;
            h.remote_targets = count;
        });
        // Peers first: a new node's packets are taken before its targets are used.
        if let Err(e) = self.dataplane.set_cluster_peers(peers).await {
            tracing::error!("cluster: tunnel peers: {e}");
        }
        match self.nsp.set_remote(remote.clone()).await {
            Ok(()) => self.keep_remote(remote),
            Err(e) => tracing::error!("cluster: other nodes' targets not applied: {e}"),
        }
        self.catalog.set_nodes(nodes).await;
    }
}

/// Keys written in one transaction (etcd's default limit is 128 operations).
const TXN_OPS: usize = 64;

/// How the keep-alive task ended.
enum KeepAlive {
    /// etcd answered with TTL 0: the lease is gone.
    Expired,
    Lost(Lost),
}

/// Aborts a task when dropped (the session's keep-alive ends with it).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Refreshes the lease every `every` and watches etcd's answers, until the
/// lease is lost; then says why on `lost`.
async fn keep_alive(
    mut keeper: etcd_client::LeaseKeeper,
    mut kept: etcd_client::LeaseKeepAliveStream,
    every: Duration,
    lost: tokio::sync::oneshot::Sender<KeepAlive>,
) {
    let mut refresh = tokio::time::interval(every);
    let why = loop {
        tokio::select! {
            _ = refresh.tick() => {
                if let Err(e) = timed(keeper.keep_alive()).await {
                    break KeepAlive::Lost(e);
                }
            }
            answer = kept.message() => match answer {
                Ok(Some(a)) if a.ttl() > 0 => {}
                Ok(Some(_)) => break KeepAlive::Expired,
                Ok(None) => break KeepAlive::Lost(Lost::Ended("the lease keep-alive stream ended".into())),
                Err(e) => break KeepAlive::Lost(e.into()),
            },
        }
    };
    let _ = lost.send(why);
}

/// Puts `owner` under `key` if no one holds it; true if `owner` holds it now.
async fn claim(client: &mut Client, key: &str, owner: &str, lease: i64) -> Result<bool, Lost> {
    let txn = Txn::new()
        .when([Compare::create_revision(key, CompareOp::Equal, 0)])
        .and_then([TxnOp::put(
            key,
            owner,
            Some(PutOptions::new().with_lease(lease)),
        )])
        .or_else([TxnOp::get(key, None)]);
    let response = timed(client.txn(txn)).await?;
    if response.succeeded() {
        return Ok(true);
    }
    let holder = response.op_responses().into_iter().find_map(|op| match op {
        TxnOpResponse::Get(get) => get.kvs().first().map(|kv| {
            (
                String::from_utf8_lossy(kv.value()).into_owned(),
                kv.lease(),
                kv.mod_revision(),
            )
        }),
        _ => None,
    });
    let Some((value, held_under, revision)) = holder else {
        return Ok(false);
    };
    if value == owner {
        return Ok(true);
    }
    // Every node claims under its lease, as "<node>/<target>": a value
    // without a lease or of another shape is no node's claim (a stray
    // put), and taking it would leave a live target DISABLED until someone
    // deleted the key. Taken over unless it changed meanwhile.
    let a_claim = held_under != 0
        && value
            .split_once('/')
            .is_some_and(|(n, t)| !n.is_empty() && !t.is_empty());
    if a_claim {
        return Ok(false);
    }
    tracing::warn!("cluster: {key} held {value:?}, which no node claims so (no lease, or not node/target); taking it");
    let txn = Txn::new()
        .when([Compare::mod_revision(key, CompareOp::Equal, revision)])
        .and_then([TxnOp::put(
            key,
            owner,
            Some(PutOptions::new().with_lease(lease)),
        )]);
    Ok(timed(client.txn(txn)).await?.succeeded())
}

#[async_trait::async_trait]
impl IdClaims for Agent {
    async fn claim(&self, stream: &StreamPath, id: u32, target: &Target) -> Result<bool, String> {
        let client = self.client.lock().await.clone();
        let Some(mut client) = client else {
            return Err("etcd is not connected".into());
        };
        let lease = self.lease.load(Ordering::Relaxed);
        let key = self.keys.id(stream, id);
        let owner = record::claim_owner(self.node(), target);
        match tokio::time::timeout(CLAIM_TIMEOUT, claim(&mut client, &key, &owner, lease)).await {
            Ok(Ok(won)) => {
                if won {
                    self.record_win(lease, &key, &owner);
                }
                Ok(won)
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("etcd did not answer within {CLAIM_TIMEOUT:?}")),
        }
    }
}
