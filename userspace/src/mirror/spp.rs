//! The networking-spp etcd contract, agent side.
//!
//! networking-spp's TaaS service driver and its compute-node agent talk through
//! etcd keys under `/spp/openstack/` (see `docs`/the TaaS reference, §2):
//!
//! | key | value |
//! |---|---|
//! | `mirror/<host>/<id>` | `"None"` when free, else the tap flow id holding it |
//! | `tap_info/<host>/<tf>` | `{"service_port","source_port","mirror_in","mirror_out"}` |
//! | `tap_action/<host>/<tf>` | `"plug"` \| `"unplug"` |
//! | `tap_status/<host>/<tf>` | `"up"`, or (our extension) `"error:<reason>"` |
//! | `bind_port/<host>/<port>` | `{"mac_address","vhost_id","vlan_id"?,"interface"?}` |
//!
//! [`SppAgent`] is the agent: it replays every `tap_action` key of its host,
//! then watches the prefix from the next revision, and turns plugs and unplugs
//! into [`TapBackend`] calls. When etcd goes away it keeps what it applied,
//! reconnects with a capped backoff and reconciles everything again.

use std::{
    collections::{BTreeSet, HashMap},
    future::Future,
    sync::Arc,
    time::Duration,
};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::Mutex;
/// Re-exported: [`SppAgent::run`] stops when this is cancelled.
pub use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::model::{Destination, Direction, MirrorError, TapBackend, TapFlow, TapService};

/// networking-spp's key root.
pub const DEFAULT_PREFIX: &str = "/spp/openstack";
/// The value of a free `mirror/<host>/<id>` slot.
pub const FREE_SLOT: &str = "None";
/// `tap_status` after a successful plug.
pub const STATUS_UP: &str = "up";
/// `tap_status` after a failed plug or unplug is this followed by the reason.
pub const STATUS_ERROR_PREFIX: &str = "error:";

/// Each etcd request gets this long. tonic's balanced channel can wait forever
/// for an endpoint that went away, so every call is bounded here.
const OP_TIMEOUT: Duration = Duration::from_secs(3);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Where the agent finds etcd and which host's keys it serves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SppSettings {
    /// etcd client URLs, e.g. `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// The `<host>` part of the keys (Neutron's `binding:host_id`).
    pub host: String,
    /// The key root, [`DEFAULT_PREFIX`] unless given.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Where the agent keeps what it applied and created across restarts
    /// (None: in memory only).
    #[serde(default)]
    pub state_file: Option<std::path::PathBuf>,
}

fn default_prefix() -> String {
    DEFAULT_PREFIX.to_string()
}

impl SppSettings {
    /// Settings with the default prefix.
    pub fn new(endpoints: Vec<String>, host: impl Into<String>) -> Self {
        Self {
            endpoints,
            host: host.into(),
            prefix: default_prefix(),
            state_file: None,
        }
    }
}

/// `tap_info/<host>/<tf_id>` as the driver writes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TapInfo {
    pub service_port: String,
    pub source_port: String,
    #[serde(default)]
    pub mirror_in: Option<u32>,
    #[serde(default)]
    pub mirror_out: Option<u32>,
}

impl TapInfo {
    /// Both mirrors → BOTH, `mirror_in` only → IN, `mirror_out` only → OUT.
    pub fn direction(&self) -> Result<Direction, MirrorError> {
        match (self.mirror_in, self.mirror_out) {
            (Some(_), Some(_)) => Ok(Direction::Both),
            (Some(_), None) => Ok(Direction::In),
            (None, Some(_)) => Ok(Direction::Out),
            (None, None) => Err(MirrorError::Invalid("tap_info has no mirror".into())),
        }
    }

    /// The mirror slots this tap flow holds, without repeats.
    pub fn mirror_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self.mirror_in.into_iter().chain(self.mirror_out).collect();
        ids.dedup();
        ids
    }
}

/// The interface of a port without an `"interface"` in its `bind_port`: the
/// Linux bridge / OVS convention, `"tap"` + the first 11 characters of the id.
pub fn port_interface_name(port_id: &str) -> String {
    let head: String = port_id.chars().take(11).collect();
    format!("tap{head}")
}

/// The interface named by a `bind_port` value, if it has a string `"interface"`.
fn bind_port_interface(value: &str) -> Option<String> {
    let json: serde_json::Value = serde_json::from_str(value).ok()?;
    let name = json.get("interface")?.as_str()?;
    (!name.is_empty()).then(|| name.to_string())
}

/// The key layout of one host.
#[derive(Clone, Debug)]
struct Keys {
    root: String,
    host: String,
}

impl Keys {
    fn new(prefix: &str, host: &str) -> Self {
        Self {
            root: prefix.trim_end_matches('/').to_string(),
            host: host.to_string(),
        }
    }

    /// `<root>/<kind>/<host>/`
    fn dir(&self, kind: &str) -> String {
        format!("{}/{kind}/{}/", self.root, self.host)
    }

    fn key(&self, kind: &str, id: &str) -> String {
        format!("{}{id}", self.dir(kind))
    }

    /// The tap flow id of a `tap_action/<host>/<tf_id>` key.
    fn tap_flow_of(&self, key: &[u8]) -> Option<String> {
        let key = std::str::from_utf8(key).ok()?;
        let id = key.strip_prefix(&self.dir("tap_action"))?;
        (!id.is_empty() && !id.contains('/')).then(|| id.to_string())
    }
}

/// What this agent applied for one tap flow.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Applied {
    service: String,
    mirrors: Vec<u32>,
}

/// etcd could not be used: the session ends, the agent reconnects and replays.
#[derive(Debug, Error)]
enum Lost {
    #[error(transparent)]
    Etcd(#[from] etcd_client::Error),
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Watch(String),
}

/// Why one plug failed.
enum Fail {
    Lost(Lost),
    /// Written into `tap_status` as `error:<reason>`.
    Tap(String),
}

impl From<Lost> for Fail {
    fn from(e: Lost) -> Self {
        Self::Lost(e)
    }
}

impl From<MirrorError> for Fail {
    fn from(e: MirrorError) -> Self {
        Self::Tap(e.to_string())
    }
}

/// The outcome of a compare-and-swap.
enum Cas {
    Done,
    /// The compare failed; the key's value then (`None`: no such key).
    Held(Option<String>),
}

async fn timed<T>(call: impl Future<Output = Result<T, etcd_client::Error>>) -> Result<T, Lost> {
    match tokio::time::timeout(OP_TIMEOUT, call).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(Lost::Timeout(OP_TIMEOUT)),
    }
}

/// The networking-spp agent for one host, driving a [`TapBackend`].
pub struct SppAgent {
    settings: SppSettings,
    keys: Keys,
    backend: Arc<dyn TapBackend>,
    /// tf_id → what was applied. The lock is also networking-spp's `plug_sem`:
    /// one plug or unplug at a time.
    applied: Mutex<HashMap<String, Applied>>,
    /// Tap services this agent created (it deletes only those, and only
    /// when no tap flow at all is left on them).
    created: std::sync::Mutex<BTreeSet<String>>,
}

/// The agent's state file: a restart knows which taps are the agent's, so
/// it removes those whose keys were deleted while it was down and leaves
/// alone what others made.
#[derive(Default, Serialize, Deserialize)]
struct Owned {
    applied: HashMap<String, Applied>,
    created: BTreeSet<String>,
}

impl SppAgent {
    /// Runs until `cancel`: replays every existing tap_action key of this host
    /// (plug or unplug), then watches the `tap_action/<host>/` prefix from the
    /// revision after the replay (no gap), handling each change. On a
    /// connection or watch error it keeps the last applied state (it does not
    /// unplug anything), retries with a capped backoff (100 ms .. 5 s), and on
    /// reconnect replays everything again: it plugs what is "plug", unplugs what
    /// is "unplug", and unplugs the taps it had applied whose tap_action key
    /// has disappeared.
    pub async fn run(
        settings: SppSettings,
        backend: Arc<dyn TapBackend>,
        cancel: CancellationToken,
    ) {
        let keys = Keys::new(&settings.prefix, &settings.host);
        let owned: Owned = settings
            .state_file
            .as_ref()
            .and_then(|path| std::fs::read(path).ok().map(|bytes| (path, bytes)))
            .and_then(|(path, bytes)| match serde_json::from_slice(&bytes) {
                Ok(owned) => Some(owned),
                Err(e) => {
                    warn!("spp agent: state {}", crate::statefile::refused(path, &e));
                    None
                }
            })
            .unwrap_or_default();
        // Its taps are its own from the start, not only once etcd answers.
        let saved: Vec<String> = owned.applied.keys().cloned().collect();
        backend.claim_flows(&saved).await;
        let agent = SppAgent {
            settings,
            keys,
            backend,
            applied: Mutex::new(owned.applied),
            created: std::sync::Mutex::new(owned.created),
        };
        agent.run_until(&cancel).await;
    }

    /// Keeps what is applied and created (after each plug or unplug).
    fn save(&self, applied: &HashMap<String, Applied>) {
        let Some(path) = &self.settings.state_file else {
            return;
        };
        let owned = Owned {
            applied: applied.clone(),
            created: self.created.lock().expect("created lock").clone(),
        };
        if let Err(e) = crate::statefile::save(path, &owned) {
            warn!("spp agent: persisting {}: {e}", path.display());
        }
    }

    async fn run_until(&self, cancel: &CancellationToken) {
        info!(
            host = %self.settings.host,
            endpoints = ?self.settings.endpoints,
            "spp agent: watching {}",
            self.keys.dir("tap_action")
        );
        let mut delay = BACKOFF_MIN;
        loop {
            let mut watching = false;
            // A stop may interrupt a plug or unplug: each step is idempotent and
            // the next start replays the keys.
            let result = tokio::select! {
                _ = cancel.cancelled() => break,
                result = self.session(cancel, &mut watching) => result,
            };
            if cancel.is_cancelled() {
                break;
            }
            if watching {
                delay = BACKOFF_MIN;
            }
            let error = match result {
                Ok(()) => "the session ended".to_string(),
                Err(e) => e.to_string(),
            };
            warn!(
                "spp agent: etcd {:?}: {error}; keeping the applied taps, retrying in {delay:?}",
                self.settings.endpoints
            );
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(BACKOFF_MAX);
        }
        info!(host = %self.settings.host, "spp agent: stopped");
    }

    /// Connects, replays, then watches until an error (or `cancel`).
    async fn session(&self, cancel: &CancellationToken, watching: &mut bool) -> Result<(), Lost> {
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        let client = timed(Client::connect(&self.settings.endpoints, Some(options))).await?;
        let mut session = Session {
            agent: self,
            client,
        };
        let revision = session.replay(cancel).await?;
        let dir = self.keys.dir("tap_action");
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1);
        let mut stream = timed(session.client.watch(dir.as_str(), Some(options))).await?;
        let mut removed = self.backend.removed_flows();
        *watching = true;
        debug!("spp agent: watching {dir} from revision {}", revision + 1);
        loop {
            let gone = async {
                match removed.as_mut() {
                    Some(r) => r.recv().await,
                    None => std::future::pending().await,
                }
            };
            let message = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                message = stream.message() => message?,
                gone = gone => {
                    match gone {
                        Ok(tf) => session.port_gone(&tf).await?,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => removed = None,
                        // Missed some: the next replay reconciles.
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    }
                    continue;
                }
            };
            let Some(response) = message else {
                return Err(Lost::Watch("the watch stream ended".into()));
            };
            if response.canceled() {
                return Err(Lost::Watch(format!(
                    "etcd cancelled the watch ({}; compacted at revision {})",
                    response.cancel_reason(),
                    response.compact_revision()
                )));
            }
            let mut flows: Vec<String> = Vec::new();
            for event in response.events() {
                let Some(kv) = event.kv() else { continue };
                match self.keys.tap_flow_of(kv.key()) {
                    Some(tf) if !flows.contains(&tf) => flows.push(tf),
                    Some(_) => {}
                    None => debug!(
                        "spp agent: ignoring key {:?}",
                        String::from_utf8_lossy(kv.key())
                    ),
                }
            }
            for tf in flows {
                session.handle(&tf).await?;
            }
        }
    }
}

/// One connection to etcd.
struct Session<'a> {
    agent: &'a SppAgent,
    client: Client,
}

impl Session<'_> {
    fn key(&self, kind: &str, id: &str) -> String {
        self.agent.keys.key(kind, id)
    }

    /// The value (lossy UTF-8) and mod revision of a key.
    async fn get(&mut self, key: &str) -> Result<Option<(String, i64)>, Lost> {
        let mut response = timed(self.client.get(key, None)).await?;
        Ok(response.take_kvs().into_iter().next().map(|kv| {
            (
                String::from_utf8_lossy(kv.value()).into_owned(),
                kv.mod_revision(),
            )
        }))
    }

    async fn put(&mut self, key: &str, value: &str) -> Result<(), Lost> {
        timed(self.client.put(key, value, None)).await?;
        Ok(())
    }

    /// Puts `to` if the key's value is `from`.
    async fn cas(&mut self, key: &str, from: &str, to: &str) -> Result<Cas, Lost> {
        let txn = Txn::new()
            .when([Compare::value(key, CompareOp::Equal, from)])
            .and_then([TxnOp::put(key, to, None)])
            .or_else([TxnOp::get(key, None)]);
        let response = timed(self.client.txn(txn)).await?;
        if response.succeeded() {
            return Ok(Cas::Done);
        }
        let current = response.op_responses().into_iter().find_map(|op| match op {
            TxnOpResponse::Get(get) => Some(
                get.kvs()
                    .first()
                    .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
            ),
            _ => None,
        });
        Ok(Cas::Held(current.flatten()))
    }

    /// Replays every tap_action key of this host and reconciles; returns the
    /// revision the replay read.
    async fn replay(&mut self, cancel: &CancellationToken) -> Result<i64, Lost> {
        let dir = self.agent.keys.dir("tap_action");
        let response = timed(
            self.client
                .get(dir.as_str(), Some(GetOptions::new().with_prefix())),
        )
        .await?;
        let revision = response.header().map(|h| h.revision()).unwrap_or(0);
        let present: Vec<String> = response
            .kvs()
            .iter()
            .filter_map(|kv| self.agent.keys.tap_flow_of(kv.key()))
            .collect();
        let gone: Vec<String> = {
            let applied = self.agent.applied.lock().await;
            let mut gone: Vec<String> = applied
                .keys()
                .filter(|tf| !present.contains(tf))
                .cloned()
                .collect();
            gone.sort();
            gone
        };
        info!(
            "spp agent: replaying {} tap_action keys at revision {revision}, {} applied taps lost their key",
            present.len(),
            gone.len()
        );
        for tf in gone.iter().chain(&present) {
            if cancel.is_cancelled() {
                break;
            }
            self.handle(tf).await?;
        }
        Ok(revision)
    }

    /// networking-spp's `_do_tap_plug_unplug`: reads tap_info and the newest
    /// tap_action, then plugs or unplugs. Only etcd failures are returned.
    /// The backend removed `tf` because its port went away: as networking-spp's
    /// agent does when a port is unplugged, the tap is torn down in etcd too
    /// (slots freed, its keys deleted).
    async fn port_gone(&mut self, tf: &str) -> Result<(), Lost> {
        let agent = self.agent;
        let mut applied = agent.applied.lock().await;
        if !applied.contains_key(tf) {
            return Ok(());
        }
        info!(tap_flow = tf, "spp agent: its port is gone, unplugging");
        let info = self.get(&self.key("tap_info", tf)).await?;
        let revision = self
            .get(&self.key("tap_action", tf))
            .await?
            .map_or(0, |(_, revision)| revision);
        let result = self
            .unplug(&mut applied, tf, info.map(|(v, _)| v), revision)
            .await;
        agent.save(&applied);
        result
    }

    async fn handle(&mut self, tf: &str) -> Result<(), Lost> {
        let agent = self.agent;
        let mut applied = agent.applied.lock().await;
        let result = self.handle_locked(&mut applied, tf).await;
        agent.save(&applied);
        result
    }

    async fn handle_locked(
        &mut self,
        applied: &mut HashMap<String, Applied>,
        tf: &str,
    ) -> Result<(), Lost> {
        let info = self.get(&self.key("tap_info", tf)).await?;
        let action = self.get(&self.key("tap_action", tf)).await?;
        match action {
            Some((action, _)) if action == "plug" => match info {
                Some((info, _)) => self.plug(applied, tf, &info).await,
                None => {
                    debug!(tap_flow = tf, "spp agent: already deleted");
                    Ok(())
                }
            },
            Some((action, revision)) if action == "unplug" => {
                self.unplug(applied, tf, info.map(|(v, _)| v), revision)
                    .await
            }
            Some((other, _)) => {
                warn!(tap_flow = tf, "spp agent: unknown tap_action {other:?}");
                let status = format!("{STATUS_ERROR_PREFIX}unknown tap_action {other:?}");
                self.put(&self.key("tap_status", tf), &status).await
            }
            None if applied.contains_key(tf) => {
                info!(
                    tap_flow = tf,
                    "spp agent: tap_action disappeared, unplugging"
                );
                self.unplug(applied, tf, info.map(|(v, _)| v), 0).await
            }
            None => {
                debug!(tap_flow = tf, "spp agent: no tap_action, nothing applied");
                Ok(())
            }
        }
    }

    async fn plug(
        &mut self,
        applied: &mut HashMap<String, Applied>,
        tf: &str,
        raw_info: &str,
    ) -> Result<(), Lost> {
        let info: TapInfo = match serde_json::from_str(raw_info) {
            Ok(info) => info,
            Err(e) => {
                let reason = format!("tap_info is not valid: {e}");
                return self.fail(applied, tf, None, reason).await;
            }
        };
        let mut service_ensured = false;
        match self.apply(applied, tf, &info, &mut service_ensured).await {
            Ok(()) => Ok(()),
            Err(Fail::Lost(e)) => Err(e),
            Err(Fail::Tap(reason)) => {
                let service = service_ensured.then_some(info.service_port.as_str());
                self.fail(applied, tf, service, reason).await
            }
        }
    }

    async fn apply(
        &mut self,
        applied: &mut HashMap<String, Applied>,
        tf: &str,
        info: &TapInfo,
        service_ensured: &mut bool,
    ) -> Result<(), Fail> {
        let direction = info.direction()?;
        let mirrors = info.mirror_ids();
        for id in &mirrors {
            let slot = self.key("mirror", &id.to_string());
            match self.cas(&slot, FREE_SLOT, tf).await? {
                Cas::Done => debug!(tap_flow = tf, "spp agent: took mirror slot {id}"),
                Cas::Held(Some(holder)) if holder == tf => {}
                Cas::Held(Some(holder)) => {
                    return Err(Fail::Tap(format!(
                        "mirror slot {id} is held by tap flow {holder}"
                    )))
                }
                Cas::Held(None) => {
                    return Err(Fail::Tap(format!("mirror slot {id} does not exist")))
                }
            }
        }
        let service_interface = self.port_interface(&info.service_port).await?;
        let source_interface = self.port_interface(&info.source_port).await?;
        let backend = &self.agent.backend;
        let existed = backend.service_exists(&info.service_port).await;
        backend
            .ensure_service(TapService {
                id: info.service_port.clone(),
                name: info.service_port.clone(),
                destination: Destination::Interface(service_interface),
            })
            .await?;
        *service_ensured = true;
        if !existed {
            let mut created = self.agent.created.lock().expect("created lock");
            created.insert(info.service_port.clone());
        }
        backend
            .ensure_flow(TapFlow {
                id: tf.to_string(),
                name: tf.to_string(),
                tap_service: info.service_port.clone(),
                source: source_interface.clone(),
                direction,
                vlan_filter: None,
            })
            .await?;
        let record = Applied {
            service: info.service_port.clone(),
            mirrors,
        };
        info!(
            tap_flow = tf,
            source = %source_interface,
            direction = direction.as_str(),
            "spp agent: plugged {record:?}"
        );
        // Plugged again with other tap_info: what the old one held and the
        // new one does not is given back.
        let replaced = applied.insert(tf.to_string(), record.clone());
        if let Some(old) = replaced {
            for id in old.mirrors.iter().filter(|m| !record.mirrors.contains(m)) {
                let slot = self.key("mirror", &id.to_string());
                if let Cas::Done = self.cas(&slot, tf, FREE_SLOT).await? {
                    debug!(tap_flow = tf, "spp agent: freed mirror slot {id}");
                }
            }
            if old.service != record.service {
                if let Err(e) = self.drop_service_if_unused(applied, &old.service).await {
                    warn!(
                        tap_flow = tf,
                        "spp agent: deleting tap service {}: {e}", old.service
                    );
                }
            }
        }
        self.put(&self.key("tap_status", tf), STATUS_UP).await?;
        Ok(())
    }

    /// A plug failed: undo what it did, give the slots back, write the error.
    async fn fail(
        &mut self,
        applied: &mut HashMap<String, Applied>,
        tf: &str,
        ensured_service: Option<&str>,
        reason: String,
    ) -> Result<(), Lost> {
        warn!(tap_flow = tf, "spp agent: plug failed: {reason}");
        let mut services = BTreeSet::new();
        if let Some(previous) = applied.remove(tf) {
            if let Err(e) = self.agent.backend.delete_flow(tf).await {
                warn!(tap_flow = tf, "spp agent: deleting the tap flow: {e}");
            }
            services.insert(previous.service);
        }
        services.extend(ensured_service.map(String::from));
        for service in services {
            if let Err(e) = self.drop_service_if_unused(applied, &service).await {
                warn!(
                    tap_flow = tf,
                    "spp agent: deleting tap service {service}: {e}"
                );
            }
        }
        self.release_slots(tf).await?;
        let status = format!("{STATUS_ERROR_PREFIX}{reason}");
        self.put(&self.key("tap_status", tf), &status).await
    }

    /// Deletes the flow, the service if no other applied flow uses it, gives
    /// the slots back and deletes tap_info, tap_action and tap_status (unless
    /// tap_action changed meanwhile: its event comes next).
    async fn unplug(
        &mut self,
        applied: &mut HashMap<String, Applied>,
        tf: &str,
        raw_info: Option<String>,
        action_revision: i64,
    ) -> Result<(), Lost> {
        let record = applied.remove(tf);
        let mirrors = record
            .as_ref()
            .map(|r| r.mirrors.clone())
            .unwrap_or_default();
        let service = record.as_ref().map(|r| r.service.clone()).or_else(|| {
            raw_info
                .as_deref()
                .and_then(|raw| serde_json::from_str::<TapInfo>(raw).ok())
                .map(|info| info.service_port)
        });
        if let Err(e) = self.agent.backend.delete_flow(tf).await {
            warn!(tap_flow = tf, "spp agent: unplug failed: {e}");
            if let Some(record) = record {
                applied.insert(tf.to_string(), record);
            }
            let status = format!("{STATUS_ERROR_PREFIX}{e}");
            return self.put(&self.key("tap_status", tf), &status).await;
        }
        if let Some(service) = &service {
            if let Err(e) = self.drop_service_if_unused(applied, service).await {
                warn!(
                    tap_flow = tf,
                    "spp agent: deleting tap service {service}: {e}"
                );
            }
        }
        self.release_slots(tf).await?;
        let action_key = self.key("tap_action", tf);
        let txn = Txn::new()
            .when([Compare::mod_revision(
                action_key.as_str(),
                CompareOp::Equal,
                action_revision,
            )])
            .and_then([
                TxnOp::delete(self.key("tap_info", tf), None),
                TxnOp::delete(action_key.as_str(), None),
                TxnOp::delete(self.key("tap_status", tf), None),
            ]);
        let response = timed(self.client.txn(txn)).await?;
        if response.succeeded() {
            info!(
                tap_flow = tf,
                "spp agent: unplugged (mirror slots {mirrors:?})"
            );
        } else {
            info!(
                tap_flow = tf,
                "spp agent: unplugged, but tap_action changed meanwhile; handling it next"
            );
        }
        Ok(())
    }

    async fn drop_service_if_unused(
        &self,
        applied: &HashMap<String, Applied>,
        service: &str,
    ) -> Result<(), MirrorError> {
        if applied.values().any(|a| a.service == service) {
            return Ok(());
        }
        if !self
            .agent
            .created
            .lock()
            .expect("created lock")
            .contains(service)
        {
            debug!("spp agent: tap service {service} is not the agent's; kept");
            return Ok(());
        }
        // Flows others made on it (the CLI, the admin API) keep it.
        if self.agent.backend.service_in_use(service).await {
            info!("spp agent: tap service {service} still has other tap flows; kept");
            return Ok(());
        }
        self.agent.backend.delete_service(service).await?;
        self.agent
            .created
            .lock()
            .expect("created lock")
            .remove(service);
        Ok(())
    }

    /// Puts "None" into every mirror slot of this host that holds `tf`.
    async fn release_slots(&mut self, tf: &str) -> Result<(), Lost> {
        let dir = self.agent.keys.dir("mirror");
        let response = timed(
            self.client
                .get(dir.as_str(), Some(GetOptions::new().with_prefix())),
        )
        .await?;
        let held: Vec<String> = response
            .kvs()
            .iter()
            .filter(|kv| kv.value() == tf.as_bytes())
            .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
            .collect();
        for slot in held {
            if let Cas::Done = self.cas(&slot, tf, FREE_SLOT).await? {
                debug!(tap_flow = tf, "spp agent: freed {slot}");
            }
        }
        Ok(())
    }

    /// A port's interface: `bind_port`'s `"interface"`, else the tap naming convention.
    async fn port_interface(&mut self, port: &str) -> Result<String, Lost> {
        let bound = self.get(&self.key("bind_port", port)).await?;
        Ok(bound
            .and_then(|(value, _)| bind_port_interface(&value))
            .unwrap_or_else(|| port_interface_name(port)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names() {
        assert_eq!(port_interface_name("0123456789abcdef"), "tap0123456789a");
        assert_eq!(port_interface_name("abc"), "tapabc");
        assert_eq!(
            bind_port_interface(
                r#"{"mac_address":"fa:16:3e:00:00:01","vhost_id":1,"interface":"vm1"}"#
            ),
            Some("vm1".into())
        );
        assert_eq!(bind_port_interface(r#"{"vhost_id":1}"#), None);
        assert_eq!(bind_port_interface(r#"{"interface":7}"#), None);
        assert_eq!(bind_port_interface("not json"), None);
    }

    #[test]
    fn tap_info_directions() {
        let parse = |s: &str| serde_json::from_str::<TapInfo>(s).unwrap();
        let both = parse(r#"{"service_port":"s","source_port":"p","mirror_in":0,"mirror_out":1}"#);
        assert_eq!(both.direction().unwrap(), Direction::Both);
        assert_eq!(both.mirror_ids(), vec![0, 1]);
        let inn =
            parse(r#"{"service_port":"s","source_port":"p","mirror_in":3,"mirror_out":null}"#);
        assert_eq!(inn.direction().unwrap(), Direction::In);
        assert_eq!(inn.mirror_ids(), vec![3]);
        let out = parse(r#"{"service_port":"s","source_port":"p","mirror_out":2}"#);
        assert_eq!(out.direction().unwrap(), Direction::Out);
        let none =
            parse(r#"{"service_port":"s","source_port":"p","mirror_in":null,"mirror_out":null}"#);
        assert_eq!(
            none.direction().unwrap_err().to_string(),
            "tap_info has no mirror"
        );
    }

    #[test]
    fn keys() {
        let keys = Keys::new("/spp/openstack/", "node1");
        assert_eq!(keys.key("mirror", "0"), "/spp/openstack/mirror/node1/0");
        assert_eq!(
            keys.tap_flow_of(b"/spp/openstack/tap_action/node1/tf1"),
            Some("tf1".into())
        );
        assert_eq!(
            keys.tap_flow_of(b"/spp/openstack/tap_action/node10/tf1"),
            None
        );
        assert_eq!(keys.tap_flow_of(b"/spp/openstack/tap_action/node1/"), None);
        assert_eq!(
            keys.tap_flow_of(b"/spp/openstack/tap_action/node1/a/b"),
            None
        );
        let settings: SppSettings =
            serde_json::from_str(r#"{"endpoints":["http://127.0.0.1:2379"],"host":"h"}"#).unwrap();
        assert_eq!(settings.prefix, DEFAULT_PREFIX);
    }
}
